//! Engine commands: `snapshot`, `build-tiny`, `fork`, `ps`, `exec`, `kill`, `doctor`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use forkd_engine::Interrupt;
use forkd_engine::child::Work;
use forkd_engine::fork::ForkOptions;
use forkd_engine::qemu::Qemu;
use forkd_engine::snapshot::SnapshotOptions;
use forkd_store::{ImageName, Overwrite, Snapshot, Tag};

use super::vm::VmArgs;
use crate::ctx::Ctx;
use crate::report::Hint;

mod output;
use output::print_report;

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// Boot a parent VM, warm it up, and save it as a snapshot in the store; or save a running
    /// child as a branch (--from)
    #[command(after_help = "Examples:\n  \
        forkd snapshot --tag mine --kernel vmlinuz --initrd initrd.img --rootfs rootfs.ext4\n  \
        forkd snapshot --tag py --kernel K --initrd I --rootfs R --warm python --preload 'import numpy'\n  \
        forkd snapshot --tag mine --kernel K --rootfs R --warmup 'echo ready > /run/x' --force\n  \
        forkd snapshot --from tiny-3fa2c1-0 --tag tiny-step1     # branch a kept child (forkd ps)\n  \
        forkd fork --tag tiny-step1 -n 5                          # its children start from its state\n\n\
        With --from, the child is paused only while its state is read (tens of ms) and runs on. \
        The branch stores only the memory pages and disk blocks that differ from the image the \
        child was forked from, and needs that image (its parent) to fork: `forkd images list` \
        shows the chain, and `forkd push`/`pull` move the parents with it.")]
    Snapshot(SnapshotArgs),
    /// Snapshot the tiny recipe (busybox + agent) built by recipes/tiny/build.sh
    #[command(after_help = "Examples:\n  \
        recipes/tiny/build.sh && forkd build-tiny     # assets, then a warm parent tagged tiny\n  \
        forkd build-tiny --tag tiny-small --mem-mib 128\n  \
        forkd build-tiny --force                      # replace an existing tiny")]
    BuildTiny(TinyArgs),
    /// Fork N copy-on-write children from a snapshot
    #[command(after_help = "Examples:\n  \
        forkd fork --tag tiny -n 10 --exec 'echo hello from $(hostname)'\n  \
        forkd fork --tag tiny:1 -n 3 --json                  # NAME:VERSION, as `forkd images` shows\n  \
        forkd fork --tag python-numpy -n 100 --run 'np.arange(10).sum()'\n  \
        forkd fork --tag tiny -n 2 --keep && forkd ps        # leave them running\n  \
        forkd fork --tag tiny --net --allow pypi.org --allow files.pythonhosted.org:443\n  \
        forkd fork --tag tiny --net --allow host:8000 --exec 'wget -qO- http://10.0.2.2:8000/'\n  \
        forkd fork --tag tiny --keep --net --expose 8080     # host port in the result and `ps`\n  \
        forkd fork --tag acme/python-numpy -n 10 --hub http://hub.lan:8080 --trust acme.pub\n\n\
        --tag OWNER/NAME[:VERSION] forks the local image NAME; when the store lacks it, it is \
        pulled from --hub (checked and signed exactly as `forkd pull` does) and the children \
        start as soon as its manifest is verified: they read the image through a lazy mount \
        that downloads each chunk when it is first touched, while the rest streams in. The \
        command ends when the image is installed, as a pull leaves it. --no-lazy pulls it \
        whole first; --keep does too (kept children outlive this command).\n\n\
        Children have no network unless --net is given. With it, each child has its own \
        user-mode network (10.0.2.15, gateway 10.0.2.2, DNS 10.0.2.3) and all egress is denied \
        but what --allow lists. The host's loopback is 10.0.2.2 in the guest and is reached only \
        through `--allow host:PORT`; private ranges and 169.254.0.0/16 only by address. \
        --allow/--allow-all/--expose imply --net.\n\n\
        Each child is named TAG-SESSION-INDEX (its hostname too), the id ps/exec/kill/cp take. \
        Exit code 3 when any child failed to come up, timed out, or its --exec command exited \
        non-zero (`ok: false` in --json). Guest output in the table has control characters \
        escaped; --json has it exactly.")]
    Fork(ForkArgs),
    /// Check this host: QEMU, accelerator, guest kernel, disk space
    #[command(after_help = "Examples:\n  forkd doctor\n  forkd doctor --json")]
    Doctor {
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    #[arg(long)]
    tag: String,
    /// Save this running child (an id from `forkd ps`) as a branch instead of booting a parent
    #[arg(long, value_name = "CHILD_ID", conflicts_with_all = ["kernel", "initrd", "rootfs", "warmup", "warm", "preload", "cmdline"])]
    from: Option<String>,
    #[arg(long, value_name = "FILE", required_unless_present = "from")]
    kernel: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    #[arg(long, value_name = "FILE", required_unless_present = "from")]
    rootfs: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Shell command run in the parent before the snapshot (must exit 0)
    #[arg(long)]
    warmup: Option<String>,
    /// Start a warm worker before the snapshot: sh or python
    #[arg(long, value_name = "KIND")]
    warm: Option<String>,
    /// Code the warm worker runs before the snapshot (e.g. "import numpy")
    #[arg(long, requires = "warm")]
    preload: Option<String>,
    /// Kernel command line [default: console=ttyS0 quiet panic=-1]
    #[arg(long)]
    cmdline: Option<String>,
    /// Replace an existing tag
    #[arg(long)]
    force: bool,
    /// With --from: print what was saved as JSON
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    vm: VmArgs,
}

#[derive(clap::Args, Debug)]
pub struct TinyArgs {
    #[arg(long, default_value = "tiny")]
    tag: String,
    /// Directory with vmlinuz, initrd.img, rootfs.ext4 [default: $FORKD_ASSETS/tiny]
    #[arg(long, value_name = "DIR")]
    assets: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    vm: VmArgs,
}

#[derive(clap::Args, Debug)]
pub struct ForkArgs {
    /// The image: TAG or NAME:VERSION from the store, or OWNER/NAME[:VERSION] from a hub
    #[arg(long)]
    tag: String,
    /// Number of children
    #[arg(short = 'n', long, default_value_t = 1)]
    n: usize,
    /// Shell command run in every child; its exit code and output are reported
    #[arg(long)]
    exec: Option<String>,
    /// Code run in every child's warm worker (snapshot made with --warm)
    #[arg(long)]
    run: Option<String>,
    /// Leave the children running (see forkd ps / exec / kill)
    #[arg(long)]
    keep: bool,
    /// Seconds to wait for each child's agent
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Seconds each child's --exec command or --run code may take; one that runs longer is
    /// killed and reported as timed out
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    exec_timeout: u64,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    net: NetArgs,
    #[command(flatten)]
    hub: ForkHubArgs,
    #[command(flatten)]
    vm: VmArgs,
}

/// Where `forkd fork --tag OWNER/NAME` pulls from when the store lacks NAME.
#[derive(clap::Args, Debug, Default)]
pub struct ForkHubArgs {
    /// Hub to pull OWNER/NAME from when the store lacks it [default: file://$FORKD_HOME/hub]
    #[arg(long, env = "FORKD_HUB", value_name = "URL")]
    hub: Option<String>,
    /// Trust this minisign public key for OWNER (a key, or a .pub file); repeatable
    #[arg(long, value_name = "KEY")]
    trust: Vec<String>,
    /// Accept an unsigned or wrongly signed image
    #[arg(long)]
    insecure: bool,
    /// Pull the whole image before the first child starts
    #[arg(long)]
    no_lazy: bool,
    /// Seconds a child's read waits for a chunk of a lazily pulled image before it fails
    #[arg(long, value_name = "SECONDS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    chunk_timeout: u64,
}

impl ForkHubArgs {
    fn pull_config(&self) -> anyhow::Result<forkd_sandbox::images::PullConfig> {
        Ok(forkd_sandbox::images::PullConfig {
            hub: self.hub.clone(),
            // A key, or a .pub file holding one (as `forkd pull --trust`).
            trust: self.trust.clone(),
            insecure: self.insecure,
            attempts: std::env::var("FORKD_HUB_ATTEMPTS")
                .ok()
                .and_then(|v| v.parse().ok()),
            read_timeout: Some(Duration::from_secs(self.chunk_timeout)),
            ..Default::default()
        })
    }
}

/// A child's network (`forkd fork`).
#[derive(clap::Args, Debug, Default)]
pub struct NetArgs {
    /// Give each child a network: its own user-mode link, egress denied but --allow
    #[arg(long)]
    net: bool,
    /// Allow egress to HOST|DOMAIN|CIDR[:PORT] (repeatable); `host` is the host's loopback
    /// (10.0.2.2 in the guest), `*.example.com` the subdomains of example.com
    #[arg(long, value_name = "RULE")]
    allow: Vec<String>,
    /// Allow egress to every public address (private ranges, the host and 169.254.0.0/16
    /// still need --allow by address)
    #[arg(long)]
    allow_all: bool,
    /// Reach GUEST_PORT from the host's 127.0.0.1 (repeatable): a free host port per child,
    /// or HOST_PORT:GUEST_PORT for one child
    #[arg(long, value_name = "[HOST_PORT:]GUEST_PORT")]
    expose: Vec<String>,
    /// Each child's bandwidth, both directions together, in Mbit/s (0: unlimited)
    #[arg(long, value_name = "MBIT", default_value_t = 100)]
    net_rate: u32,
}

impl NetArgs {
    /// The network asked for, if any.
    pub fn network(&self) -> Option<forkd_sandbox::Network> {
        let wanted =
            self.net || self.allow_all || !self.allow.is_empty() || !self.expose.is_empty();
        wanted.then(|| forkd_sandbox::Network {
            allow: self.allow.clone(),
            allow_all: self.allow_all,
            expose: self
                .expose
                .iter()
                .map(|e| forkd_sandbox::ExposeSpec::Text(e.clone()))
                .collect(),
            rate_mbit: Some(self.net_rate),
        })
    }
}

/// The engine's plan for `net`, or a clear error about the flag at fault.
fn net_plan(net: &NetArgs) -> anyhow::Result<Option<forkd_engine::net::NetPlan>> {
    let Some(n) = net.network() else {
        return Ok(None);
    };
    let program = forkd_sandbox::network::netd_program()
        .context("cannot find the forkd binary to serve the children's networks")?;
    let plan = n.plan(&program).map_err(|e| {
        anyhow::Error::new(e).context(Hint(
            "--allow takes 1.2.3.4, 10.0.0.0/8, example.com, *.example.com or host, each with \
             an optional :PORT; --expose takes GUEST_PORT or HOST_PORT:GUEST_PORT"
                .into(),
        ))
    })?;
    if n.allow_all {
        eprintln!("warning: --allow-all: every child may reach any public address on the internet");
    }
    Ok(Some(plan))
}

/// The local image `name` (TAG or NAME:VERSION), with a hint on how to get one.
pub(super) fn find_image(ctx: &Ctx, name: &ImageName) -> anyhow::Result<Snapshot> {
    ctx.store()?
        .find(name)
        .with_context(|| format!("no image {name} in the local store"))
        .context(Hint(
            "`forkd images` lists the local images; get one with `forkd pull OWNER/NAME --hub \
             URL`, or build the tiny one with `forkd build-tiny`"
                .into(),
        ))
}

fn locate_qemu(vm: &VmArgs) -> anyhow::Result<Qemu> {
    Qemu::locate(vm.qemu.as_deref()).context(Hint(
        "run `forkd doctor`; scripts/setup-engine.sh installs everything".into(),
    ))
}

pub fn run(cmd: Cmd, ctx: &Ctx) -> anyhow::Result<()> {
    match cmd {
        Cmd::Snapshot(a) if a.from.is_some() => branch(ctx, a),
        Cmd::Snapshot(a) => {
            let warm = a.warm.as_ref().map(|k| forkd_agent::WarmRequest {
                kind: Some(k.clone()),
                argv: None,
                preload: a.preload.clone(),
            });
            let (Some(kernel), Some(rootfs)) = (a.kernel, a.rootfs) else {
                bail!("--kernel and --rootfs are needed (or --from CHILD_ID)");
            };
            let opts = SnapshotOptions {
                kernel,
                initrd: a.initrd,
                rootfs,
                mem_mib: a.mem_mib,
                vcpus: a.vcpus,
                cmdline: a.cmdline,
                warmup: a.warmup,
                warm,
                accel: a.vm.accel,
                boot_timeout: Duration::from_secs(300),
            };
            snapshot(ctx, &a.tag, &opts, &a.vm, a.force)
        }
        Cmd::BuildTiny(a) => {
            let dir = match a.assets {
                Some(d) => d,
                None => forkd_recipe::parent::tiny_assets(&ctx.home_dir()?),
            };
            let f = |n: &str| dir.join(n);
            if !f("vmlinuz").is_file() || !f("initrd.img").is_file() || !f("rootfs.ext4").is_file()
            {
                return Err(anyhow::anyhow!(
                    "tiny recipe assets missing in {}",
                    dir.display()
                ))
                .context(Hint("build them first: recipes/tiny/build.sh".into()));
            }
            let opts = SnapshotOptions {
                kernel: f("vmlinuz"),
                initrd: Some(f("initrd.img")),
                rootfs: f("rootfs.ext4"),
                mem_mib: a.mem_mib,
                vcpus: 1,
                cmdline: None,
                warmup: Some("echo warm > /run/forkd-warm && cat /etc/motd".into()),
                warm: Some(forkd_agent::WarmRequest {
                    kind: Some("sh".into()),
                    argv: None,
                    preload: Some("WARM_SINCE=$(cat /proc/uptime)".into()),
                }),
                accel: a.vm.accel,
                boot_timeout: Duration::from_secs(300),
            };
            snapshot(ctx, &a.tag, &opts, &a.vm, a.force)
        }
        Cmd::Fork(a) => fork(ctx, a),
        Cmd::Doctor { json } => {
            let store = ctx.store()?;
            let checks = forkd_engine::doctor::run(store.home());
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                for c in &checks {
                    println!(
                        "{:<5} {:<13} {}",
                        if c.ok { "ok" } else { "FAIL" },
                        c.name,
                        c.detail
                    );
                    if let Some(fix) = &c.fix {
                        println!("      {:<13} -> {fix}", "");
                    }
                }
            }
            if checks.iter().any(|c| !c.ok) {
                bail!("some checks failed");
            }
            Ok(())
        }
    }
}

/// `snapshot --from CHILD`: a branch of a running child, through the daemon when one runs.
fn branch(ctx: &Ctx, a: SnapshotArgs) -> anyhow::Result<()> {
    let id = a.from.as_deref().unwrap_or_default();
    let overwrite = if a.force {
        Overwrite::Yes
    } else {
        Overwrite::No
    };
    let backend = super::sandbox::backend_with(ctx, Some(&a.vm))?;
    let saved = backend
        .snapshot(id, &a.tag, overwrite)
        .map_err(super::sandbox::with_hint)
        .with_context(|| format!("cannot snapshot child {id}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&saved)?);
    } else if !ctx.quiet {
        eprintln!(
            "branch {} saved from {id} (a branch of {}): paused {} ms, {} changed pages ({}), \
             disk changes {}",
            saved.tag,
            saved.parent,
            saved.pause_ms,
            saved.own_pages,
            crate::report::human_bytes(saved.own_pages * 4096),
            crate::report::human_bytes(saved.disk_bytes),
        );
    }
    Ok(())
}

fn snapshot(
    ctx: &Ctx,
    tag: &str,
    opts: &SnapshotOptions,
    vm: &VmArgs,
    force: bool,
) -> anyhow::Result<()> {
    let tag = Tag::parse(tag)?;
    let store = ctx.store()?;
    let overwrite = if force { Overwrite::Yes } else { Overwrite::No };
    forkd_engine::image::check_tag_free(&store, &tag, overwrite)?;
    let qemu = locate_qemu(vm)?;
    let interrupt = Interrupt::install();
    if !ctx.quiet {
        eprintln!(
            "booting the parent ({} MiB, {} vCPU)...",
            opts.mem_mib, opts.vcpus
        );
    }
    let stored =
        forkd_engine::image::snapshot_into_store(&store, &tag, opts, &qemu, overwrite, &interrupt)?;
    if !ctx.quiet {
        eprintln!(
            "snapshot {} saved: parent up in {} ms, state saved in {} ms ({})",
            tag,
            stored.output.boot_ms,
            stored.output.save_ms,
            stored.snapshot.dir.display()
        );
    }
    Ok(())
}

fn fork(ctx: &Ctx, a: ForkArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    if a.n == 0 {
        bail!("-n must be at least 1");
    }
    // Find QEMU and ask it for its machine types while the hub is read (a lazy fork's first
    // child waited some 150 ms for those QEMU starts); joined where the fork needs QEMU.
    // Not with --keep, which may hand the children to a daemon.
    let early_qemu = (!a.keep).then(|| {
        let vm = a.vm.clone();
        std::thread::spawn(move || {
            let q = locate_qemu(&vm)?;
            // An error here is met again, and reported, where the fork checks its machine.
            let _ = q.machines();
            Ok::<_, anyhow::Error>(q)
        })
    });
    // OWNER/NAME[:VERSION]: the local NAME, or pulled (lazily, unless --keep or --no-lazy).
    let mut lazy = None;
    let name = if a.tag.contains('/') {
        let store = ctx.store()?;
        let (reference, tag) = forkd_sandbox::images::parse(&a.tag, "--tag")?;
        if store.get(&tag).is_err() {
            let cfg = a.hub.pull_config()?;
            let shown = cfg.hub.clone().unwrap_or_else(|| "the embedded hub".into());
            if a.keep || a.hub.no_lazy {
                if !ctx.quiet {
                    eprintln!("pulling {reference} whole before forking");
                }
                let progress = crate::commands::hub_progress::Bars::new(ctx);
                forkd_sandbox::images::pull(&store, &reference, tag.clone(), &cfg, Some(&progress))
                    .with_context(|| format!("cannot pull {reference} from {shown}"))?;
            } else {
                let progress = crate::commands::hub_progress::Bars::messages_only(ctx);
                let pull = forkd_sandbox::images::start_lazy(
                    &store,
                    &reference,
                    tag.clone(),
                    &cfg,
                    std::sync::Arc::new(progress),
                )
                .with_context(|| format!("cannot pull {reference} from {shown}"))?;
                if pull.is_lazy() && !ctx.quiet {
                    eprintln!(
                        "forking {reference} while it downloads ({} to fetch)",
                        crate::report::human_bytes(pull.downloaded().1)
                    );
                }
                lazy = Some(pull);
            }
        }
        ImageName::Tag(tag)
    } else {
        ImageName::parse(&a.tag)?
    };
    // NAME:VERSION names the local image whose manifest says so; the daemon takes its tag.
    let tag_arg = match &name {
        ImageName::Tag(t) => t.to_string(),
        ImageName::Versioned { .. } => find_image(ctx, &name)?.tag.to_string(),
    };
    if a.keep
        && let forkd_server::backend::Backend::Daemon(_) = super::sandbox::backend(ctx)?
    {
        // A daemon runs: it becomes the kept children's owner.
        if a.run.is_some() {
            return Err(anyhow::anyhow!(
                "--run with --keep is not supported while a daemon owns the children"
            ))
            .context(Hint(
                "fork --keep first, then run code in each: the SDK's sb.run_code(), or \
                 POST /v1/sandboxes/ID/run"
                    .into(),
            ));
        }
        return super::sandbox::fork_kept(
            ctx,
            &tag_arg,
            a.net.network(),
            a.n,
            a.exec.as_deref(),
            Duration::from_secs(a.exec_timeout),
            a.json,
        );
    }
    // What can fail before the children start fails inside this block, so that a lazy
    // fork's pull still ends (and reports) below.
    let clock = std::sync::Arc::new(LazyClock::new(started));
    let result = (|| -> anyhow::Result<forkd_engine::fork::ForkReport> {
        let net = net_plan(&a.net)?;
        let store = ctx.store()?;
        let snap = match &lazy {
            Some(l) => l.snapshot().clone(),
            None => find_image(ctx, &name)?,
        };
        let tag = snap.tag.clone();
        let qemu = match early_qemu {
            Some(t) => t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?,
            None => locate_qemu(&a.vm)?,
        };
        forkd_engine::image::check_consistent(&snap)?;
        let progress = ctx.show_progress().then(|| {
            let pb = indicatif::ProgressBar::new(a.n as u64);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} forking {pos}/{len} children [{elapsed}]",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb.enable_steady_tick(Duration::from_millis(120));
            pb
        });
        let opts = ForkOptions {
            n: a.n,
            tag: tag.as_str().to_string(),
            accel: a.vm.accel,
            work: Work {
                exec: a.exec.map(|s| forkd_agent::ExecRequest {
                    shell: Some(s),
                    ..Default::default()
                }),
                run_code: a.run,
                timeout: Duration::from_secs(a.exec_timeout),
            },
            keep: a.keep,
            run_root: store.home().run_dir(),
            ready_timeout: Duration::from_secs(a.timeout),
            interrupt: Interrupt::install(),
            on_child: Some({
                let pb = progress.clone();
                let clock = clock.clone();
                let meter = lazy.as_ref().and_then(|l| l.meter());
                Box::new(move |_: &forkd_engine::child::ChildReport| {
                    if let Some(pb) = &pb {
                        pb.inc(1);
                    }
                    clock.first_child(meter.as_deref());
                }) as forkd_engine::fork::OnChild
            }),
            layers: forkd_engine::branch::layers(&store, &snap)?,
            net,
        };
        let result = forkd_engine::fork::fork(&snap.dir, &qemu, &opts);
        clock.forked();
        if let Some(pb) = &progress {
            pb.finish_and_clear();
        }
        result.with_context(|| format!("cannot fork {tag}"))
    })();
    // A lazy fork's pull ends first, whatever the fork did: the image gets installed, and a
    // fork that failed on a read says which chunk was missing and why.
    let pulled = match lazy {
        Some(l) => {
            if let Err(e) = &result {
                // No child runs from it: stop the download now (what was verified is kept).
                l.abandon(&format!("the fork failed: {e:#}"));
            }
            Some(finish_lazy(ctx, l, &a.tag, &clock))
        }
        None => None,
    };
    let (pull_json, pull_result) = match pulled {
        Some((json, result)) => (Some(json), result),
        None => (None, Ok(())),
    };
    let report = match result {
        Ok(r) => r,
        // The pull's error says which chunk and why; the fork's is what that did to it.
        Err(fork) => {
            return Err(match pull_result {
                Err(pull) if !pull.chain().any(is_abandoned) => {
                    pull.context(format!("cannot fork {} ({fork:#})", a.tag))
                }
                _ => fork,
            });
        }
    };
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        if let (Some(json), Some(obj)) = (pull_json, v.as_object_mut()) {
            obj.insert("pull".into(), json);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_report(&report);
    }
    pull_result?;
    children_outcome(
        report.requested,
        report.requested - report.alive,
        report
            .children
            .iter()
            .filter(|c| c.up && c.timed_out)
            .count(),
        report.children.iter().filter(|c| c.up && !c.ok).count(),
    )
}

/// Whether an error is the lazy pull's own stop (after a fork that failed first).
fn is_abandoned(e: &(dyn std::error::Error + 'static)) -> bool {
    matches!(
        e.downcast_ref::<forkd_hub::HubError>(),
        Some(forkd_hub::HubError::Abandoned(_))
    )
}

/// When a lazy fork's children answered, from the start of the command, and what had been
/// downloaded by the first (what bench/lazy.sh measures).
struct LazyClock {
    started: std::time::Instant,
    first_bytes: std::sync::atomic::AtomicU64,
    first_ms: std::sync::atomic::AtomicU64,
    /// What every child's reads had cost by the first answer.
    first_reads: std::sync::Mutex<Option<serde_json::Value>>,
    forked_ms: std::sync::atomic::AtomicU64,
}

impl LazyClock {
    fn new(started: std::time::Instant) -> LazyClock {
        let unset = || std::sync::atomic::AtomicU64::new(u64::MAX);
        LazyClock {
            started,
            first_bytes: unset(),
            first_ms: unset(),
            first_reads: std::sync::Mutex::new(None),
            forked_ms: unset(),
        }
    }

    fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn first_child(&self, image: Option<&forkd_hub::lazy::LazyImage>) {
        use std::sync::atomic::Ordering::Relaxed;
        if self
            .first_ms
            .compare_exchange(u64::MAX, self.ms(), Relaxed, Relaxed)
            .is_ok()
            && let Some(m) = image
        {
            self.first_bytes.store(m.fetched(), Relaxed);
            *self.first_reads.lock().unwrap_or_else(|p| p.into_inner()) = Some(reads_json(m));
        }
    }

    fn forked(&self) {
        self.forked_ms
            .store(self.ms(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// What the reads of a lazily served image have cost so far.
fn reads_json(m: &forkd_hub::lazy::LazyImage) -> serde_json::Value {
    let (asked, in_flight) = m.waited();
    serde_json::json!({
        "read_bytes": m.touched(),
        "waited_for_requested_ms": asked.as_millis() as u64,
        "waited_for_in_flight_ms": in_flight.as_millis() as u64,
    })
}

/// The end of a lazy fork: wait for the image to be installed, and say what it cost. The
/// JSON has what was downloaded, and the error (if any) is the pull's, with the first read
/// that failed (it names the chunk).
fn finish_lazy(
    ctx: &Ctx,
    l: forkd_sandbox::images::LazyPull,
    shown: &str,
    clock: &LazyClock,
) -> (serde_json::Value, anyhow::Result<()>) {
    let lazy = l.is_lazy();
    let (now, total) = l.downloaded();
    let meter = l.meter();
    let read_errors = l.read_errors();
    if lazy && !ctx.quiet && now < total {
        eprintln!(
            "finishing the download of {shown}: {} of {} so far",
            crate::report::human_bytes(now),
            crate::report::human_bytes(total)
        );
    }
    let t = std::time::Instant::now();
    let out = l.finish();
    let get = |a: &std::sync::atomic::AtomicU64| {
        Some(a.load(std::sync::atomic::Ordering::Relaxed)).filter(|v| *v != u64::MAX)
    };
    let mut json = serde_json::json!({
        "reference": shown,
        "lazy": lazy,
        "image_bytes": total,
        "downloaded_at_first_child": get(&clock.first_bytes),
        "first_child_ms": get(&clock.first_ms),
        "children_done_ms": get(&clock.forked_ms),
        "finish_seconds": t.elapsed().as_secs_f64(),
        "demanded_bytes": meter.as_ref().map(|m| m.demanded()),
        // How long the guests' reads waited for chunks (summed over reads: they overlap), and
        // the stored bytes of the chunks they read; at the first answer and at the end.
        "reads": meter.as_deref().map(reads_json),
        "reads_at_first_child": clock
            .first_reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(),
        "failed_reads": read_errors.as_ref().map(|e| e.count).unwrap_or(0),
        "first_read_error": read_errors.as_ref().and_then(|e| e.first.clone()),
    });
    let result = match out {
        Ok(out) => {
            json["installed"] = serde_json::json!(out.tag.as_str());
            json["downloaded_bytes"] = serde_json::json!(out.downloaded_bytes);
            json["cached_bytes"] = serde_json::json!(out.cached_bytes);
            if !ctx.quiet && lazy {
                eprintln!(
                    "installed {shown} as `{}` ({} downloaded)",
                    out.tag,
                    crate::report::human_bytes(out.downloaded_bytes)
                );
            }
            Ok(())
        }
        Err(e) => {
            let mut err = anyhow::Error::new(e);
            json["error"] = serde_json::json!(format!("{err:#}"));
            if let Some(first) = read_errors.and_then(|r| r.first) {
                err = err.context(format!("children's reads failed: {first}"));
            }
            Err(err.context(Hint(
                "what was verified is kept: `forkd pull` (or the same fork) resumes it".into(),
            )))
        }
    };
    (json, result)
}

/// The end of a fork: `Ok` when every child came up and did its work, else an
/// [`ExitWith`](crate::report::ExitWith) error with exit code 3 that says how many failed how.
pub(super) fn children_outcome(
    requested: usize,
    not_up: usize,
    timed_out: usize,
    not_ok_but_up: usize,
) -> anyhow::Result<()> {
    let exited = not_ok_but_up.saturating_sub(timed_out);
    if not_up + not_ok_but_up == 0 {
        return Ok(());
    }
    let mut parts = Vec::new();
    if not_up > 0 {
        parts.push(format!("{not_up} failed"));
    }
    if timed_out > 0 {
        parts.push(format!("{timed_out} timed out"));
    }
    if exited > 0 {
        parts.push(format!("{exited} exited non-zero"));
    }
    Err(anyhow::Error::new(crate::report::ExitWith {
        code: crate::report::exit::CHILDREN_FAILED,
        message: format!(
            "{} of {requested} children: {}",
            not_up + not_ok_but_up,
            parts.join(", ")
        ),
    }))
}
