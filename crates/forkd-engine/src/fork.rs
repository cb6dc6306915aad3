//! Fork N copy-on-write children from a snapshot directory, concurrently.
//!
//! Every child maps the parent's memory.bin privately (`share=off`: copy-on-write in the host
//! page cache), loads the small vmstate (x-ignore-shared: no RAM in it), resumes, and gets its
//! own disk overlay, agent socket and identity. Children are independent threads; one that
//! fails is reported and the rest go on.

use crate::child::{ChildPlan, ChildReport, ChildState, VmGuard, Work, child_id, run_child};
use crate::error::{EngineError, Result};
use crate::gate::{StartGate, max_starting};
use crate::qemu::{AccelChoice, Qemu, resolve_accel};
use crate::run::KeptChild;
use crate::spec::{Launch, Role, VmSpec};
use crate::util::Interrupt;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Environment hook for tests: `FORKD_TEST_BREAK_CHILD=K` points child K's memory backend at a
/// file that does not exist, so that one QEMU really fails to start.
pub const BREAK_CHILD_ENV: &str = "FORKD_TEST_BREAK_CHILD";

/// Progress callback, called once per child as it finishes.
pub type OnChild = Box<dyn Fn(&ChildReport) + Send + Sync>;

pub struct ForkOptions {
    pub n: usize,
    pub tag: String,
    pub accel: AccelChoice,
    pub work: Work,
    pub keep: bool,
    /// `$FORKD_HOME/run`: one directory per child.
    pub run_root: PathBuf,
    pub ready_timeout: Duration,
    pub interrupt: Interrupt,
    /// Called from child threads as each child finishes (for progress bars).
    pub on_child: Option<OnChild>,
    /// A branch's chain ([`crate::branch::layers`]); `None` for an image without a parent.
    pub layers: Option<crate::branch::Layers>,
    /// Give every child a network through this back end (`--net`); `None`: no network.
    pub net: Option<crate::net::NetPlan>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ForkReport {
    pub tag: String,
    pub requested: usize,
    /// Children that came up (restored, agent answered).
    pub alive: usize,
    /// Children that came up and whose work succeeded (see [`ChildReport::ok`]); the fork
    /// succeeded only when this equals `requested`.
    pub succeeded: usize,
    pub accel: String,
    /// Wall-clock from the start of `fork` until every child answered (or failed).
    pub wall_ms: u64,
    pub estimate_mib: u64,
    pub children: Vec<ChildReport>,
    /// Children left running (`--keep`).
    pub kept: Vec<String>,
}

/// The cheap checks that make a broken snapshot fail before any VM starts.
pub fn preflight(
    dir: &Path,
    qemu: &Qemu,
    layers: Option<&crate::branch::Layers>,
) -> Result<VmSpec> {
    let spec = VmSpec::load(dir)?;
    if spec.parent.is_some() != layers.is_some() {
        return Err(EngineError::Chain(format!(
            "{}: {}",
            dir.display(),
            if layers.is_some() {
                "layers given for an image without a parent"
            } else {
                "a branch forks only with its chain (forkd_engine::branch::layers)"
            }
        )));
    }
    // A branch's files outside its own directory: the root's kernel, its built memory, the
    // disks under its own.
    let outside = layers.into_iter().flat_map(|l| {
        [l.kernel.clone(), l.memory.clone()]
            .into_iter()
            .chain(l.disks.iter().cloned())
    });
    for p in spec
        .own_files()
        .into_iter()
        .map(|f| dir.join(f))
        .chain(outside)
    {
        if !p.is_file() {
            return Err(EngineError::MissingFile(p));
        }
    }
    let mem = dir.join(&spec.memory);
    let actual = std::fs::metadata(&mem).map(|m| m.len()).unwrap_or(0);
    let expected = spec.mem_bytes()?;
    if actual != expected {
        return Err(EngineError::MemorySize {
            path: mem,
            actual,
            expected,
            mib: spec.mem_mib,
        });
    }
    // QEMU's migration stream starts with the magic "QEVM" and version 3.
    let vmstate = dir.join(&spec.vmstate);
    let mut head = [0u8; 8];
    let ok = std::fs::File::open(&vmstate)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok();
    if !ok || head != [b'Q', b'E', b'V', b'M', 0, 0, 0, 3] {
        return Err(EngineError::Corrupt(format!(
            "{} is not a QEMU migration stream (bad header)",
            vmstate.display()
        )));
    }
    // Migration streams load on the same or a newer QEMU, not on an older one.
    let snap_v = crate::qemu::parse_version(&format!("version {}", spec.qemu_version));
    if snap_v.is_some_and(|v| qemu.version < v) {
        return Err(EngineError::QemuOlderThanSnapshot {
            snap: spec.qemu_version.clone(),
            host: qemu.version_string(),
        });
    }
    if !qemu.has_machine(&spec.machine)? {
        return Err(EngineError::MachineMismatch {
            machine: spec.machine.clone(),
            qemu: qemu.version_string(),
            snap_qemu: spec.qemu_version.clone(),
        });
    }
    Ok(spec)
}

/// Fork `opts.n` children. Without `opts.keep` each child is stopped once its work is done;
/// with it, each child that came up is recorded in `run/<id>/child.json` and left running
/// (detached: `forkd ps`/`exec`/`kill`, or a daemon, take it from there).
/// Whether `n` children of the snapshot in `dir` fit on this host: the admission check `fork`
/// starts with, for callers that must answer before they start (a streamed API response).
/// Returns the estimate in MiB.
pub fn admit(dir: &Path, n: usize) -> Result<u64> {
    let spec = VmSpec::load(dir)?;
    crate::memory::check_capacity(&spec, n)
}

pub fn fork(dir: &Path, qemu: &Qemu, opts: &ForkOptions) -> Result<ForkReport> {
    let (mut report, guards) = fork_children(dir, qemu, opts, opts.keep)?;
    for (child, guard) in report.children.iter_mut().zip(guards) {
        let Some(guard) = guard else {
            child.state = ChildState::Gone;
            continue;
        };
        // Record first, detach second: if the record cannot be written, dropping the guard
        // stops the VM, so no QEMU runs that nothing can see.
        let rec = KeptChild::new(child, &opts.tag, dir, &guard);
        match rec.save() {
            Ok(()) => {
                guard.detach();
                report.kept.push(child.id.clone());
            }
            Err(e) => {
                child.ok = false;
                child.up = false;
                child.state = ChildState::Gone;
                child.error = Some(format!("cannot record kept child: {e}"));
                drop(guard);
            }
        }
    }
    report.tally();
    Ok(report)
}

/// Fork `opts.n` children and hand every child that came up to the caller, still running,
/// with the guard that owns its QEMU and run directory (`opts.keep` is ignored). The guards
/// are in the same order as `report.children`; `None` where a child failed. This is what a
/// daemon uses: it owns the children for their whole life.
pub fn fork_owned(
    dir: &Path,
    qemu: &Qemu,
    opts: &ForkOptions,
) -> Result<(ForkReport, Vec<Option<VmGuard>>)> {
    fork_children(dir, qemu, opts, true)
}

fn fork_children(
    dir: &Path,
    qemu: &Qemu,
    opts: &ForkOptions,
    keep: bool,
) -> Result<(ForkReport, Vec<Option<VmGuard>>)> {
    let start = Instant::now();
    let layers = opts.layers.as_ref();
    let spec = preflight(dir, qemu, layers)?;
    if opts.net.is_some() && !spec.has_nic() {
        return Err(EngineError::NoNic {
            image: opts.tag.clone(),
            layout: spec.layout.clone(),
        });
    }
    let estimate_mib = crate::memory::check_capacity(&spec, opts.n)?;
    let accel = resolve_accel(opts.accel)?;
    let confine = crate::confine::Confine::for_host(qemu);
    let net_user = match &confine.runas {
        Some(u) => Some(crate::confine::user_ids(u).ok_or_else(|| {
            EngineError::Net(format!(
                "user {u} (for the network back end) does not exist"
            ))
        })?),
        None => None,
    };
    if let Some(plan) = &opts.net {
        crate::net::check_fixed_ports(&plan.fixed_ports, opts.n)?;
    }
    let limits = crate::cgroup::Limits::for_guest(spec.mem_mib);
    tracing::debug!("children confined: {confine:?}, limits {limits:?}");
    let session = hex::encode(crate::util::random_bytes(3)?);
    let break_child: Option<usize> = std::env::var(BREAK_CHILD_ENV)
        .ok()
        .and_then(|v| v.parse().ok());
    let vmstate = dir.join(&spec.vmstate);
    // What a crashed fork left (its owner is dead): kill its QEMUs, remove its directories.
    for d in crate::run::sweep_orphans(&opts.run_root) {
        tracing::info!("removed {} left by a forkd that died", d.display());
    }
    let stub_dir = opts.run_root.join(format!(".fork-{}-{session}", opts.tag));
    crate::run::create_run_dir(&stub_dir)?;
    let stub_dir = StubDir(stub_dir);
    let stub_path = stub_dir.0.join("vmlinuz-stub");
    let stub = stub_path.as_path();
    let kernel = layers.map_or_else(|| dir.join(&spec.kernel), |l| l.kernel.clone());
    crate::spec::write_stub_kernel(&kernel, stub)?;
    crate::util::disable_thp_for_children();
    let start_gate = StartGate::new(max_starting());
    let plan = ChildPlan {
        qemu: &qemu.bin,
        vmstate: &vmstate,
        tag: &opts.tag,
        ready_timeout: opts.ready_timeout,
        work: &opts.work,
        interrupt: &opts.interrupt,
        start_gate: &start_gate,
        net: opts.net.as_ref().map(|n| &n.guest),
        unplug: opts.net.is_none() && spec.parent.is_some() && spec.has_nic(),
    };

    let results: Vec<(ChildReport, Option<VmGuard>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..opts.n)
            .map(|i| {
                let plan = &plan;
                let spec = &spec;
                let session = &session;
                let confine = &confine;
                std::thread::Builder::new()
                    .name(format!("child-{i}"))
                    .stack_size(256 * 1024)
                    .spawn_scoped(scope, move || {
                        let id = child_id(&opts.tag, session, i);
                        let mut guard = match VmGuard::create(&opts.run_root.join(&id)) {
                            Ok(g) => g,
                            Err(e) => return (ChildReport::failed(i, id, &e), None),
                        };
                        if confine.cgroups {
                            child_cgroup(&mut guard, &id, limits);
                        }
                        if keep {
                            // Handed over running: this thread ends before the VM does.
                            // Otherwise the VM is stopped below, before this thread ends, and
                            // dies with it if forkd is killed.
                            guard.outlive_spawner();
                        }
                        let (net_fd, ports) = match &opts.net {
                            Some(plan) => match guard.start_net(plan, net_user) {
                                Ok((fd, ports)) => (Some(fd), ports),
                                Err(e) => return (ChildReport::failed(i, id, &e), None),
                            },
                            None => (None, Vec::new()),
                        };
                        let args = Launch {
                            spec,
                            dir,
                            accel,
                            qmp_sock: &guard.qmp_sock,
                            agent_sock: &guard.agent_sock,
                            role: Role::Child,
                            memory_override: (break_child == Some(i))
                                .then(|| guard.run_dir.join("no-such-memory.bin")),
                            kernel_override: Some(stub.to_path_buf()),
                            confine: Some(confine),
                            layers,
                            net_fd,
                        }
                        .args();
                        let mut out = run_child(plan, i, id, guard, args);
                        out.0.ports = ports;
                        out.0.net = opts.net.is_some();
                        if !keep {
                            // Its work is done: stop it now, so finished children do not
                            // compete for the CPU with those still coming up.
                            out.1 = None;
                        }
                        if let Some(cb) = &opts.on_child {
                            cb(&out.0);
                        }
                        out
                    })
                    .expect("spawning a thread")
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                h.join().unwrap_or_else(|_| {
                    let e = EngineError::Agent("child thread panicked".into());
                    (
                        ChildReport::failed(i, child_id(&opts.tag, &session, i), &e),
                        None,
                    )
                })
            })
            .collect()
    });
    let wall_ms = start.elapsed().as_millis() as u64;
    drop(stub_dir);
    if opts.interrupt.is_set() {
        return Err(EngineError::Interrupted); // guards dropped above: every VM is gone
    }
    let (children, guards): (Vec<ChildReport>, Vec<Option<VmGuard>>) = results.into_iter().unzip();
    let mut report = ForkReport {
        tag: opts.tag.clone(),
        requested: opts.n,
        alive: 0,
        succeeded: 0,
        accel: accel.name().to_string(),
        wall_ms,
        estimate_mib,
        children,
        kept: Vec::new(),
    };
    report.tally();
    Ok((report, guards))
}

/// Give a child its cgroup. A host where one cannot be made (it passed the probe, so this
/// is rare: a full hierarchy, a race) still forks, without limits for this child.
fn child_cgroup(guard: &mut VmGuard, id: &str, limits: Option<crate::cgroup::Limits>) {
    let (Ok(h), Some(limits)) = (crate::cgroup::host(), limits) else {
        return;
    };
    match crate::cgroup::Cgroup::create(h, id, limits) {
        Ok(cg) => guard.set_cgroup(cg),
        Err(e) => tracing::warn!("child {id} runs without a cgroup: {e}"),
    }
}

impl ForkReport {
    /// Recount `alive` and `succeeded` from the children.
    fn tally(&mut self) {
        self.alive = self.children.iter().filter(|c| c.up).count();
        self.succeeded = self.children.iter().filter(|c| c.ok).count();
    }

    /// Whether every requested child came up and did its work successfully.
    pub fn all_ok(&self) -> bool {
        self.succeeded == self.requested
    }
}

/// The per-fork scratch directory (stub kernel), removed on every path.
struct StubDir(PathBuf);

impl Drop for StubDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
