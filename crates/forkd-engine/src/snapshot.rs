//! Boot a parent VM, warm it, and save it as a snapshot directory:
//! `vmlinuz`, `initrd.img`, `rootfs.ext4`, `memory.bin`, `vmstate`, `engine.json`.
//!
//! The parent's RAM lives in memory.bin (`share=on`), so saving it costs nothing: QMP `stop`
//! (which also flushes the disk), `x-ignore-shared`, and `migrate` writes only device + vCPU
//! state. The parent is then killed; nobody writes rootfs.ext4 or memory.bin again.

use crate::agent::AgentConn;
use crate::child::VmGuard;
use crate::error::{EngineError, IoCtx, Result};
use crate::qemu::{AccelChoice, CPU_MODEL, MACHINE_TYPE, Qemu, resolve_accel};
use crate::qmp::Qmp;
use crate::spec::*;
use crate::util::{Interrupt, sh_quote, tail};
use forkd_agent::WarmRequest;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// `no_timer_check`: under a loaded TCG host the kernel's IO-APIC timer check can fail and panic.
///
/// `nokaslr norandmaps`: the parent boots and warms up with a fixed kernel and process layout,
/// so two builds of one recipe place the same objects at the same addresses and their memory
/// shares pages (python-numpy rebuilt: 58% of its memory pages found in the first build with
/// randomisation, 78% without; its download 18% -> 11%, bench/RESULTS.md). Randomising a
/// parent protects nothing: every child of an image shares its layout, and anyone who can
/// pull the image can read it. The price: the layout of the warm processes is the same in
/// every build of a recipe and kernel, so a private image built from a public recipe does not
/// hide it either. Programs exec'd later in a child are randomised again (see
/// [`RANDOMIZE_AGAIN`]), from the entropy each child is given when it is forked.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet panic=-1 no_timer_check nokaslr norandmaps";

/// The kernel's default (full randomisation), set again in a parent booted with `norandmaps`
/// before it is saved: its running processes (and what they fork without exec) keep their
/// fixed layout; programs exec'd later, in a child, are randomised.
const RANDOMIZE_AGAIN: &str = "echo 2 > /proc/sys/kernel/randomize_va_space";

#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub rootfs: PathBuf,
    pub mem_mib: u64,
    pub vcpus: u32,
    pub cmdline: Option<String>,
    /// Shell command run in the parent before the snapshot; must exit 0.
    pub warmup: Option<String>,
    /// Warm worker started in the parent before the snapshot.
    pub warm: Option<WarmRequest>,
    pub accel: AccelChoice,
    pub boot_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct SnapshotOutput {
    pub spec: VmSpec,
    /// (file name, role) of every file written, engine.json included.
    pub files: Vec<(String, &'static str)>,
    pub boot_ms: u64,
    pub save_ms: u64,
    pub warmup_output: Option<String>,
}

pub(crate) fn copy_sparse(src: &Path, dst: &Path) -> Result<()> {
    if !src.is_file() {
        return Err(EngineError::MissingFile(src.to_path_buf()));
    }
    // cp keeps holes (a rootfs image is mostly empty) and reflinks where the filesystem can.
    let st = Command::new("cp")
        .args(["--sparse=always", "--reflink=auto", "--"])
        .arg(src)
        .arg(dst)
        .status()
        .at("cannot run cp for", src)?;
    if !st.success() {
        return Err(EngineError::Io {
            what: "cannot copy",
            path: src.to_path_buf(),
            source: std::io::Error::other(format!("cp exited with {st}")),
        });
    }
    Ok(())
}

/// Take a snapshot into `out` (an empty directory, e.g. a store staging dir); `run_dir` holds
/// the parent's sockets and logs while it runs and is removed afterwards.
pub fn take(
    qemu: &Qemu,
    opts: &SnapshotOptions,
    out: &Path,
    run_dir: &Path,
    interrupt: &Interrupt,
) -> Result<SnapshotOutput> {
    if opts.mem_mib < 64 || opts.vcpus == 0 {
        return Err(EngineError::Corrupt(
            "guest needs at least 64 MiB and 1 vCPU".into(),
        ));
    }
    let accel = resolve_accel(opts.accel)?;
    copy_sparse(&opts.kernel, &out.join(KERNEL_FILE))?;
    if let Some(i) = &opts.initrd {
        copy_sparse(i, &out.join(INITRD_FILE))?;
    }
    copy_sparse(&opts.rootfs, &out.join(ROOTFS_FILE))?;
    let mem = out.join(MEMORY_FILE);
    let f = forkd_store::private_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&mem)
        .at("cannot create", &mem)?;
    f.set_len(opts.mem_mib * 1024 * 1024)
        .at("cannot size", &mem)?;
    drop(f);

    let spec = VmSpec {
        format: SPEC_FORMAT,
        layout: match std::env::var(crate::spec::TEST_LAYOUT_ENV).as_deref() {
            Ok(crate::spec::LAYOUT_V1) => crate::spec::LAYOUT_V1.to_string(),
            _ => LAYOUT.to_string(),
        },
        qemu_version: qemu.version_string(),
        machine: MACHINE_TYPE.to_string(),
        cpu: CPU_MODEL.to_string(),
        mem_mib: opts.mem_mib,
        vcpus: opts.vcpus,
        accel: accel.name().to_string(),
        cmdline: opts
            .cmdline
            .clone()
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
        kernel: KERNEL_FILE.to_string(),
        initrd: opts.initrd.as_ref().map(|_| INITRD_FILE.to_string()),
        rootfs: ROOTFS_FILE.to_string(),
        memory: MEMORY_FILE.to_string(),
        vmstate: VMSTATE_FILE.to_string(),
        warm: opts.warm.is_some(),
        parent: None,
    };

    let mut guard = VmGuard::create(run_dir)?;
    let console = run_dir.join("console.log");
    let args = Launch {
        spec: &spec,
        dir: out,
        accel,
        qmp_sock: &guard.qmp_sock,
        agent_sock: &guard.agent_sock,
        role: Role::Parent {
            console: console.clone(),
        },
        memory_override: None,
        kernel_override: None,
        confine: None,
        layers: None,
        net_fd: None,
    }
    .args();
    tracing::debug!("parent: {} {}", qemu.bin.display(), args.join(" "));
    let start = Instant::now();
    guard.spawn(&qemu.bin, &args)?;
    let fail = |guard: &VmGuard, msg: String| EngineError::Parent {
        msg: format!("{msg} {}", guard.log_tail().trim()),
        console: tail(&console, 15),
    };

    let qmp_sock = guard.qmp_sock.clone();
    let mut qmp = {
        let g = &mut guard;
        Qmp::connect(&qmp_sock, Duration::from_secs(30), &mut || {
            g.alive() && !interrupt.is_set()
        })
        .map_err(|e| fail(g, e.to_string()))?
    };
    if spec.has_nic() {
        // The NIC has no back end in a parent. Saying so (no carrier) before the guest looks
        // makes every child start unplugged: with no carrier its routes are ignored and a
        // connect fails at once, and a child given a network is plugged in by the host.
        qmp.set_nic_link(false)
            .map_err(|e| fail(&mut guard, e.to_string()))?;
    }
    let agent_sock = guard.agent_sock.clone();
    let (mut agent, hello) = {
        let g = &mut guard;
        AgentConn::wait_ready(&agent_sock, opts.boot_timeout, &mut || {
            g.alive() && !interrupt.is_set()
        })
        .map_err(|e| {
            if interrupt.is_set() {
                EngineError::Interrupted
            } else {
                fail(g, e.to_string())
            }
        })?
    };
    agent.set_interrupt(interrupt.clone());
    let boot_ms = start.elapsed().as_millis() as u64;
    tracing::info!(
        "parent up in {boot_ms} ms (agent {}, uptime {:.1}s)",
        hello.agent_version,
        hello.uptime_s
    );

    let mut warmup_output = None;
    if let Some(cmd) = &opts.warmup {
        let r = agent.shell(cmd, Duration::from_secs(1800))?;
        if r.exit_code != Some(0) {
            return Err(EngineError::Warmup {
                code: r.exit_code,
                stderr: r.stderr,
            });
        }
        warmup_output = Some(r.stdout);
    }
    if let Some(w) = &opts.warm {
        let r = agent.warm(w.clone())?;
        warmup_output
            .get_or_insert_with(String::new)
            .push_str(&r.preload_output);
    }
    // Turn address randomisation back on for what children exec, if the build had it off. A
    // guest that refuses fails the build: its children would run every new program at one
    // fixed address, while the docs say they do not.
    if spec.cmdline.split_whitespace().any(|w| w == "norandmaps") {
        let r = agent.shell(RANDOMIZE_AGAIN, Duration::from_secs(60))?;
        if r.exit_code != Some(0) {
            return Err(EngineError::Agent(format!(
                "cannot turn address randomisation back on in the parent ({RANDOMIZE_AGAIN}: \
                 exit {:?}, {})",
                r.exit_code,
                r.stderr.trim()
            )));
        }
    }
    // Sync the guest's page cache to its disk so the saved rootfs is complete on its own.
    agent.shell("sync", Duration::from_secs(120))?;
    // Zero what the guest freed (boot, warm-up), so the saved RAM holds only live bytes: the
    // rest are holes, never pushed or fetched, and two builds of a recipe differ less. An
    // agent without the op (an image built before it) is saved as it is, and so is a parent
    // whose disk could not take its RAM whole: zeroing writes every free page through the
    // shared mapping before the zero pages are punched out again.
    let ram = opts.mem_mib << 20;
    let room = rustix::fs::statvfs(out)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .unwrap_or(0);
    if !hello.has(forkd_agent::feature::ZERO_FREE) {
        tracing::debug!("the agent cannot zero free memory: saved as it is");
    } else if room <= ram + (ram >> 3) {
        tracing::warn!(
            "not zeroing free guest memory: {} MiB free for {} MiB of RAM in {}",
            room >> 20,
            ram >> 20,
            out.display()
        );
    } else {
        let t = Instant::now();
        // Any failure stops the build: an agent that did not answer may still hold most of
        // the guest's memory, and every child would resume inside that.
        match agent.call_timeout(forkd_agent::Op::ZeroFree, Duration::from_secs(600))? {
            forkd_agent::Reply::ZeroFree { zeroed } => tracing::info!(
                "zeroed {} MiB of free guest memory in {} ms",
                zeroed >> 20,
                t.elapsed().as_millis()
            ),
            other => {
                return Err(EngineError::Agent(format!("zero_free answered {other:?}")));
            }
        }
    }
    if interrupt.is_set() {
        return Err(EngineError::Interrupted);
    }
    // Disconnect first: children start with the host side closed, as they will find it.
    drop(agent);
    std::thread::sleep(Duration::from_millis(50));

    let save = Instant::now();
    qmp.execute("stop", None)?; // pauses vCPUs and flushes every block device
    qmp.set_capabilities(&[("x-ignore-shared", true)])?;
    let vmstate = out.join(VMSTATE_FILE);
    let uri = format!("exec:cat > {}", sh_quote(&vmstate.to_string_lossy()));
    qmp.execute("migrate", Some(serde_json::json!({ "uri": uri })))?;
    qmp.wait_migration(Duration::from_secs(120))?;
    let _ = qmp.execute("quit", None);
    guard.wait_exit(Duration::from_secs(10));
    let save_ms = save.elapsed().as_millis() as u64;
    drop(guard);
    if !vmstate.is_file() {
        return Err(EngineError::MissingFile(vmstate));
    }
    // QEMU wrote guest RAM through a shared mapping: pages the guest zeroed take disk blocks.
    // A file system that cannot punch holes keeps them as zeros (they still are holes on the
    // hub).
    let memory = out.join(MEMORY_FILE);
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&memory)
        .and_then(|f| forkd_store::sparse::punch_zero_blocks(&f))
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
            tracing::warn!("{} keeps its zero pages: {e}", memory.display());
        }
        Err(e) => return Err(e).at("cannot punch the zero pages of", &memory),
    }
    spec.save(out)?;
    let mut files = vec![
        (KERNEL_FILE.to_string(), "kernel"),
        (ROOTFS_FILE.to_string(), "rootfs"),
        (MEMORY_FILE.to_string(), "memory"),
        (VMSTATE_FILE.to_string(), "vmstate"),
        (SPEC_FILE.to_string(), "engine"),
    ];
    if opts.initrd.is_some() {
        files.push((INITRD_FILE.to_string(), "initrd"));
    }
    Ok(SnapshotOutput {
        spec,
        files,
        boot_ms,
        save_ms,
        warmup_output,
    })
}
