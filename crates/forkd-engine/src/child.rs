//! One VM process and one child's life.
//!
//! [`VmGuard`] owns a QEMU process and its run directory (sockets, overlay, logs) and removes
//! both when dropped, on every path — success, error, panic or Ctrl-C — unless detached for
//! `--keep`. [`ChildState`] is the explicit life of a forked child:
//! `Starting → Restored → Ready → Gone` (any state may go straight to `Gone`).

use crate::agent::AgentConn;
use crate::error::{EngineError, IoCtx, Result};
use crate::mux::AgentError;
use crate::qmp::Qmp;
use crate::util::{Interrupt, tail};
use forkd_agent::{ErrorCode, ExecReply, ExecRequest, IdentityRequest, RunReply};
use serde::Serialize;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where a child is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildState {
    /// QEMU launched, the device state is being loaded.
    Starting,
    /// Migration loaded and the vCPUs resumed (`cont`).
    Restored,
    /// The agent answered and the child has its own identity.
    Ready,
    /// Stopped, failed, or handed over (`--keep`); nothing more happens to it here.
    Gone,
}

impl ChildState {
    fn can_go(self, to: ChildState) -> bool {
        use ChildState::*;
        matches!(
            (self, to),
            (Starting, Restored) | (Restored, Ready) | (_, Gone)
        )
    }
}

/// A QEMU process plus its run directory; cleaned up on drop unless [`VmGuard::detach`]ed.
pub struct VmGuard {
    pub run_dir: PathBuf,
    pub qmp_sock: PathBuf,
    pub agent_sock: PathBuf,
    pub log: PathBuf,
    process: Option<Child>,
    keep: bool,
    /// The QEMU's cgroup (removed after QEMU, when the guard goes).
    cgroup: Option<crate::cgroup::Cgroup>,
    /// Descriptors QEMU inherits at spawn (closed here once it started).
    pass: Vec<std::fs::File>,
    /// QEMU gets SIGKILL when the thread that spawned it exits (`PR_SET_PDEATHSIG`). True
    /// unless [`VmGuard::outlive_spawner`] was called before [`VmGuard::spawn`].
    die_with_spawner: bool,
    /// The child's network back end (stopped after QEMU).
    net: Option<Box<crate::net::NetLink>>,
    /// A seccomp filter QEMU gets before exec (see [`crate::lazymem`]).
    filter: Option<seccompiler::BpfProgram>,
}

/// Unix socket paths are limited to 108 bytes.
const MAX_SOCK_PATH: usize = 100;

impl VmGuard {
    /// Create `run_dir` (must not exist; 0700, its parent too) and launch QEMU with `args`
    /// (built for this dir's sockets). QEMU gets its own process group so a terminal's Ctrl-C
    /// reaches only forkd, which then stops the VMs itself.
    pub fn create(run_dir: &Path) -> Result<VmGuard> {
        crate::run::create_run_dir(run_dir)?;
        let g = VmGuard {
            run_dir: run_dir.to_path_buf(),
            qmp_sock: run_dir.join("qmp.sock"),
            agent_sock: run_dir.join("agent.sock"),
            log: run_dir.join("qemu.log"),
            process: None,
            keep: false,
            cgroup: None,
            pass: Vec::new(),
            die_with_spawner: true,
            filter: None,
            net: None,
        };
        if g.agent_sock.as_os_str().len() > MAX_SOCK_PATH {
            return Err(EngineError::Io {
                what: "socket path too long (set FORKD_HOME to a shorter path)",
                path: g.agent_sock.clone(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        Ok(g)
    }

    /// Let QEMU live on after the thread that spawns it (and this process) exits: for children
    /// that are kept (`fork --keep`) or handed to a daemon. Decided before [`VmGuard::spawn`];
    /// such a child left by a crash is found by [`crate::run::sweep_orphans`].
    pub fn outlive_spawner(&mut self) {
        self.die_with_spawner = false;
    }

    /// Start QEMU. Whatever it creates (sockets, files) is 0600, and unless
    /// [`VmGuard::outlive_spawner`] was called it is killed when the calling thread exits, so
    /// `kill -9` of forkd leaves no VM running: call it from a thread that outlives the VM.
    pub fn spawn(&mut self, qemu: &Path, args: &[String]) -> Result<()> {
        let log = forkd_store::private_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.log)
            .at("cannot create", &self.log)?;
        let log2 = log.try_clone().at("cannot open", &self.log)?;
        let mut cmd = Command::new(qemu);
        crate::util::private_and_tied(&mut cmd, self.die_with_spawner);
        cmd.args(args)
            .env("TMPDIR", &self.run_dir) // snapshot=on overlays land here, removed with the dir
            .env("MALLOC_ARENA_MAX", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        let join = self.confine_command(&mut cmd)?;
        if let Some(prog) = self.filter.clone() {
            // SAFETY: the hook only calls prctl(2) and seccomp(2) (async-signal-safe) on a
            // program built before the fork; it allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    seccompiler::apply_filter(&prog).map_err(|e| match e {
                        seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e) => e,
                        _ => std::io::ErrorKind::Other.into(),
                    })
                });
            }
        }
        let child = cmd.spawn().at("cannot start", qemu)?;
        if self.die_with_spawner {
            // A confined QEMU loses its parent-death signal when it changes user.
            crate::reaper::tie(child.id());
        }
        drop(join);
        self.pass.clear(); // QEMU has its own copies now
        self.process = Some(child);
        Ok(())
    }

    /// Start this VM's network back end (before [`VmGuard::spawn`]); returns the descriptor
    /// number QEMU will find its end of the link at, and the host ports that were bound.
    pub fn start_net(
        &mut self,
        plan: &crate::net::NetPlan,
        user: Option<(u32, u32)>,
    ) -> Result<(std::os::fd::RawFd, Vec<crate::net::PortMap>)> {
        let (link, qemu_end) = crate::net::start(plan, &self.run_dir, user, self.die_with_spawner)?;
        let ports = link.ports.clone();
        self.net = Some(Box::new(link));
        Ok((self.pass_fd(qemu_end), ports))
    }

    /// Put this VM's QEMU, when it starts, into `cg`; the guard owns the group from now on.
    pub fn set_cgroup(&mut self, cg: crate::cgroup::Cgroup) {
        self.cgroup = Some(cg);
    }

    /// The directories of this VM's cgroup (empty without one).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        self.cgroup
            .as_ref()
            .map(|c| c.dirs().to_vec())
            .unwrap_or_default()
    }

    /// The child's memory is served lazily: its QEMU must fault it in without huge-page
    /// read-around ([`crate::lazymem`]). Call before [`VmGuard::spawn`].
    pub fn lazy_memory(&mut self) -> Result<()> {
        let prog = crate::lazymem::no_hugepage_filter()
            .map_err(|e| EngineError::Seccomp(e.to_string()))?;
        self.filter = Some(prog);
        Ok(())
    }

    /// Hand `file` to QEMU at spawn as an inherited descriptor; returns its number there.
    pub fn pass_fd(&mut self, file: std::fs::File) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        self.pass.push(file);
        fd
    }

    /// Between fork and exec: join the cgroup (so QEMU is charged from its first page) and
    /// let the passed descriptors survive exec. Returns the open `cgroup.procs` files, which
    /// must stay open until the spawn returns.
    fn confine_command(&self, cmd: &mut Command) -> Result<Option<crate::cgroup::Join>> {
        use std::os::fd::AsRawFd;
        let join = match &self.cgroup {
            Some(cg) => Some(cg.prepare_join().map_err(|e| EngineError::Io {
                what: "cannot join the cgroup of",
                path: self.run_dir.clone(),
                source: std::io::Error::other(e),
            })?),
            None => None,
        };
        let procs = join.as_ref().map(|j| j.raw_fds()).unwrap_or_default();
        let pass: Vec<i32> = self.pass.iter().map(|f| f.as_raw_fd()).collect();
        // SAFETY: the hook only calls write(2) and fcntl(2), both async-signal-safe, on
        // descriptors that stay open until spawn() returns (`join` and `self.pass`).
        unsafe {
            cmd.pre_exec(move || {
                crate::cgroup::enter_raw(&procs)?;
                for &fd in &pass {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Ok(join)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }

    /// Whether QEMU is still running.
    pub fn alive(&mut self) -> bool {
        let Some(p) = self.process.as_mut() else {
            return false;
        };
        match p.try_wait() {
            Ok(None) => true,
            _ => {
                // Reaped by try_wait (or unknowable): no longer ours to kill.
                let pid = p.id();
                self.process = None;
                if self.die_with_spawner {
                    crate::reaper::untie(pid);
                }
                false
            }
        }
    }

    /// QEMU's own output (errors are printed there).
    pub fn log_tail(&self) -> String {
        tail(&self.log, 8)
    }

    /// Wait for QEMU to exit by itself (after `quit`), killing it after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) {
        let start = Instant::now();
        while self.alive() && start.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.stop();
    }

    /// Kill QEMU now (SIGKILL: a child's state is disposable) and reap it.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.kill();
            if self.die_with_spawner {
                crate::reaper::untie(p.id()); // before the reap frees the pid
            }
            let _ = p.wait();
        }
        drop(self.net.take()); // after QEMU: it sees EOF anyway, this only makes it certain
    }

    /// Leave the VM running and its run directory in place (`--keep`).
    pub fn detach(mut self) -> (u32, PathBuf) {
        self.keep = true;
        let pid = self.pid().unwrap_or(0);
        // Dropping the Child handle does not kill the process.
        if let Some(p) = self.process.take()
            && self.die_with_spawner
        {
            crate::reaper::untie(p.id());
        }
        if let Some(cg) = self.cgroup.take() {
            cg.detach(); // `forkd kill` removes it (its dirs are in child.json)
        }
        if let Some(net) = self.net.take() {
            net.detach(); // it stops at EOF when QEMU exits
        }
        (pid, self.run_dir.clone())
    }
}

impl Drop for VmGuard {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.run_dir);
        drop(self.cgroup.take()); // QEMU is reaped: the group is empty and goes
    }
}

/// How long a child's `exec` command or warm-worker `run` may take unless told otherwise.
pub const DEFAULT_WORK_TIMEOUT: Duration = Duration::from_secs(60);

/// What a child does once it is up.
#[derive(Debug, Clone)]
pub struct Work {
    pub exec: Option<ExecRequest>,
    pub run_code: Option<String>,
    /// Limit for `run_code`, and for `exec` when its request has no `timeout_ms` of its own.
    /// A command that exceeds it is killed and the child is reported as timed out.
    pub timeout: Duration,
}

impl Default for Work {
    fn default() -> Self {
        Work {
            exec: None,
            run_code: None,
            timeout: DEFAULT_WORK_TIMEOUT,
        }
    }
}

/// Everything a child thread needs (shared, read-only).
pub struct ChildPlan<'a> {
    pub qemu: &'a Path,
    pub vmstate: &'a Path,
    pub tag: &'a str,
    pub ready_timeout: Duration,
    pub work: &'a Work,
    pub interrupt: &'a Interrupt,
    /// Limits how many children start at once; held from launch until ready.
    pub start_gate: &'a crate::gate::StartGate,
    /// The guest side of the network, when children have one.
    pub net: Option<&'a forkd_agent::NetSetup>,
    /// Unplug the NIC before the child resumes: a child without a network, of a branch whose
    /// source may have had one (its guest driver would still believe in a carrier).
    pub unplug: bool,
}

/// The outcome of one child, as reported to the user.
#[derive(Debug, Clone, Serialize)]
pub struct ChildReport {
    pub index: usize,
    pub id: String,
    pub hostname: String,
    pub state: ChildState,
    /// The child came up: restored, its agent answered, it has its own identity.
    pub up: bool,
    /// The child came up *and* its work succeeded: the `exec` command exited 0, the `run` code
    /// finished, nothing timed out. `false` whenever `up` is.
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Milliseconds from launch until `cont` / until the agent answered.
    pub restored_ms: Option<u64>,
    pub ready_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecReply>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<RunReply>,
    /// The `exec` command or `run` code exceeded the work timeout (the child itself is fine).
    pub timed_out: bool,
    /// Guest ports reachable on the host's loopback (`--expose`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<crate::net::PortMap>,
    /// The child has a network (`--net`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub net: bool,
}

impl ChildReport {
    /// A child that is about to start: the one place a report is made.
    pub fn new(index: usize, id: String, hostname: String) -> ChildReport {
        ChildReport {
            index,
            id,
            hostname,
            state: ChildState::Starting,
            up: false,
            ok: false,
            error: None,
            restored_ms: None,
            ready_ms: None,
            pid: None,
            exec: None,
            run: None,
            timed_out: false,
            ports: Vec::new(),
            net: false,
        }
    }

    /// A child that failed before its VM could start.
    pub fn failed(index: usize, id: String, e: &EngineError) -> ChildReport {
        let hostname = child_hostname(&id);
        let mut r = ChildReport::new(index, id, hostname);
        r.state = ChildState::Gone;
        r.error = Some(e.to_string());
        r
    }

    /// Whether the work (if any) succeeded: no timeout, `exec` exited 0. A child that is up
    /// and did no work is a success.
    fn work_ok(&self) -> bool {
        !self.timed_out && self.exec.as_ref().is_none_or(|x| x.exit_code == Some(0))
    }
}

/// A child's id: `TAG-SESSION-INDEX`, where SESSION is random per `fork`, so two forks of the
/// same tag (even at the same time) never name two children alike. The id is what `forkd ps`,
/// `exec`, `kill` and `cp` take, and (cut to fit) the child's hostname.
pub fn child_id(tag: &str, session: &str, index: usize) -> String {
    format!("{tag}-{session}-{index}")
}

/// The hostname a child gets: its id, cut to the 64 bytes Linux allows by shortening the tag
/// part (the distinct session and index stay).
pub fn child_hostname(id: &str) -> String {
    const MAX: usize = 63;
    if id.len() <= MAX {
        return id.to_string();
    }
    // The id is ASCII (tags are [a-z0-9._-]); keep the tail, which holds session and index.
    let mut parts = id.rsplitn(3, '-');
    let (index, session, tag) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let room = MAX.saturating_sub(index.len() + session.len() + 2);
    let tag: String = tag.chars().take(room).collect();
    format!(
        "{}-{session}-{index}",
        tag.trim_end_matches(['-', '.', '_'])
    )
}

/// One child's life: launch QEMU (argv built by `args`), restore, resume, wait for the agent,
/// give it an identity, do the work. Returns the report and, when it came up, its guard.
pub fn run_child(
    plan: &ChildPlan<'_>,
    index: usize,
    id: String,
    mut guard: VmGuard,
    args: Vec<String>,
) -> (ChildReport, Option<VmGuard>) {
    let hostname = child_hostname(&id);
    let mut report = ChildReport::new(index, id, hostname.clone());
    let start = Instant::now();
    let result = life(plan, &hostname, &mut guard, args, &mut report, start);
    report.pid = guard.pid();
    match result {
        Ok(()) => {
            report.up = true;
            report.ok = report.work_ok();
            (report, Some(guard))
        }
        Err(e) => {
            let log = guard.log_tail();
            let mut msg = e.to_string();
            if !log.trim().is_empty() {
                msg.push_str(&format!(" [qemu: {}]", log.trim().replace('\n', " | ")));
            }
            tracing::warn!("child {index} failed: {msg}");
            advance(&mut report, ChildState::Gone);
            report.error = Some(msg);
            drop(guard); // kills QEMU, removes the run directory
            (report, None)
        }
    }
}

fn advance(report: &mut ChildReport, to: ChildState) {
    debug_assert!(report.state.can_go(to), "{:?} -> {to:?}", report.state);
    tracing::debug!("child {}: {:?} -> {to:?}", report.index, report.state);
    report.state = to;
}

/// `Err(Interrupted)` once `i` is set: checked between a child's steps.
fn stop_if_set(i: &Interrupt) -> Result<()> {
    if i.is_set() {
        Err(EngineError::Interrupted)
    } else {
        Ok(())
    }
}

fn life(
    plan: &ChildPlan<'_>,
    hostname: &str,
    guard: &mut VmGuard,
    args: Vec<String>,
    report: &mut ChildReport,
    start: Instant,
) -> Result<()> {
    let check = stop_if_set;
    check(plan.interrupt)?;
    let starting = plan.start_gate.enter();
    check(plan.interrupt)?;
    // The device state goes in as an open descriptor: a sandboxed QEMU may not exec `cat`,
    // and need not be able to open the store's files itself.
    let vmstate = std::fs::File::open(plan.vmstate).at("cannot open", plan.vmstate)?;
    if crate::lazymem::on_fuse(plan.vmstate) {
        guard.lazy_memory()?;
    }
    let uri = format!("fd:{}", guard.pass_fd(vmstate));
    guard.spawn(plan.qemu, &args)?;
    let qmp_sock = guard.qmp_sock.clone();
    let mut qmp = {
        let g = &mut *guard;
        let intr = plan.interrupt;
        Qmp::connect(&qmp_sock, Duration::from_secs(30), &mut || {
            g.alive() && !intr.is_set()
        })?
    };
    qmp.set_capabilities(&[("x-ignore-shared", true)])?;
    qmp.execute("migrate-incoming", Some(serde_json::json!({ "uri": uri })))?;
    qmp.wait_migration(Duration::from_secs(60))?;
    if plan.unplug {
        qmp.set_nic_link(false)?;
    }
    if plan.net.is_some() {
        // The parent was saved with its NIC unplugged, so the guest's driver holds "no
        // carrier". QEMU sees the link as up already (it has a back end now) and would not
        // signal a change: take it down and up, which raises the config interrupt the driver
        // needs (measured: without it the guest keeps NO-CARRIER and sends nothing).
        qmp.set_nic_link(false)?;
        qmp.set_nic_link(true)?;
    }
    qmp.execute("cont", None)?;
    report.restored_ms = Some(start.elapsed().as_millis() as u64);
    advance(report, ChildState::Restored);
    check(plan.interrupt)?;

    // From here on the guest runs and may write to its disk. If the host file system under
    // the overlay fills up, QEMU pauses the VM (werror=enospc) and the agent simply stops
    // answering: a watcher on QMP sees that, stops the waits and says "disk full".
    let overlay_dir = guard.run_dir.clone();
    let waits = Interrupt::never();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let watcher = std::thread::Builder::new()
            .name(format!("disk-watch-{}", report.index))
            .stack_size(128 * 1024)
            .spawn_scoped(scope, || {
                watch_disk(&mut qmp, &overlay_dir, &stop, &waits, plan.interrupt)
            })
            .at("cannot start a thread for", &overlay_dir)?;
        let worked = serve(plan, hostname, guard, report, start, &waits, starting);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        watcher.thread().unpark();
        let disk = watcher.join().unwrap_or(None);
        match disk {
            Some(e) => Err(e),
            None => worked,
        }
    })
}

/// How often the disk watcher asks QEMU whether the VM is still running.
const DISK_WATCH_EVERY: Duration = Duration::from_millis(500);

/// Watch one child's QMP until `stop`: when QEMU reports a block I/O error (a
/// `BLOCK_IO_ERROR` event, or the VM in state `io-error`), set `waits` so the agent calls
/// return now, and return the error. Also passes a Ctrl-C (`outer`) on to `waits`.
fn watch_disk(
    qmp: &mut Qmp,
    overlay_dir: &Path,
    stop: &std::sync::atomic::AtomicBool,
    waits: &Interrupt,
    outer: &Interrupt,
) -> Option<EngineError> {
    use std::sync::atomic::Ordering;
    while !stop.load(Ordering::Relaxed) {
        if outer.is_set() {
            waits.set();
        }
        let status = match qmp.status() {
            Ok(s) => s,
            Err(_) => return None, // QEMU is gone: the child's own error says why
        };
        if let Some(e) = block_io_error(qmp, &status, overlay_dir) {
            tracing::debug!("disk watcher: {e}");
            waits.set();
            return Some(e);
        }
        std::thread::park_timeout(DISK_WATCH_EVERY);
    }
    None
}

/// The block I/O error QEMU has reported, if any: from a `BLOCK_IO_ERROR` event seen so far,
/// or, when the VM sits in `io-error`, from `query-block`'s per-device `io-status`.
fn block_io_error(qmp: &mut Qmp, status: &str, overlay_dir: &Path) -> Option<EngineError> {
    use serde_json::Value;
    let event = qmp
        .events
        .iter()
        .find(|e| e.get("event").and_then(Value::as_str) == Some("BLOCK_IO_ERROR"))
        .cloned();
    let (device, nospace, detail) = match event {
        Some(e) => {
            let d = &e["data"];
            let dev = d["device"]
                .as_str()
                .filter(|s| !s.is_empty())
                .or(d["node-name"].as_str())
                .unwrap_or("disk");
            (
                dev.to_string(),
                d["nospace"].as_bool().unwrap_or(false),
                d["reason"].as_str().unwrap_or("I/O error").to_string(),
            )
        }
        None if status == "io-error" => {
            let blocks = qmp.execute("query-block", None).ok()?;
            let bad = blocks.as_array()?.iter().find(|b| {
                b.get("io-status")
                    .and_then(Value::as_str)
                    .is_some_and(|s| s != "ok")
            })?;
            let io = bad["io-status"].as_str().unwrap_or("failed");
            (
                bad["device"].as_str().unwrap_or("disk").to_string(),
                io == "nospace",
                format!("io-status {io}"),
            )
        }
        None => return None,
    };
    Some(if nospace {
        EngineError::DiskFull {
            dir: overlay_dir.to_path_buf(),
            device,
            detail,
        }
    } else {
        EngineError::Qmp(format!(
            "the VM stopped on a host I/O error on {device}: {detail}"
        ))
    })
}

/// A restored child's agent, identity and work. `waits` ends every wait early (Ctrl-C, or
/// the disk watcher).
fn serve(
    plan: &ChildPlan<'_>,
    hostname: &str,
    guard: &mut VmGuard,
    report: &mut ChildReport,
    start: Instant,
    waits: &Interrupt,
    starting: crate::gate::StartSlot<'_>,
) -> Result<()> {
    let check = stop_if_set;
    let agent_sock = guard.agent_sock.clone();
    let (mut agent, _hello) = {
        let g = &mut *guard;
        AgentConn::wait_ready(&agent_sock, plan.ready_timeout, &mut || {
            g.alive() && !waits.is_set()
        })?
    };
    agent.set_interrupt(waits.clone());
    check(waits)?;
    let now_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    agent.identity(IdentityRequest {
        hostname: Some(hostname.to_string()),
        seed_hex: Some(hex::encode(crate::util::random_bytes(64)?)),
        time_unix_ns: Some(now_ns),
        instance: Some(report.id.clone()),
        net: plan.net.cloned(),
    })?;
    report.ready_ms = Some(start.elapsed().as_millis() as u64);
    advance(report, ChildState::Ready);
    drop(starting);

    let limit = plan.work.timeout;
    if let Some(x) = &plan.work.exec {
        let mut req = x.clone();
        req.timeout_ms.get_or_insert(limit.as_millis() as u64);
        let reply = agent.exec(req)?;
        if reply.timed_out {
            report.timed_out = true;
            report.error = Some(format!(
                "exec timed out after {:.1} s",
                reply.duration_ms as f64 / 1000.0
            ));
        }
        report.exec = Some(reply);
    }
    if let Some(code) = &plan.work.run_code {
        if report.timed_out {
            return Ok(()); // the exec already used up the child's time
        }
        match agent.run(code, limit) {
            Ok(r) => report.run = Some(r),
            // The agent gave up on the worker (and restarts it on the next `warm`); the child
            // itself answered, so this is the command's outcome, not a failed child.
            Err(EngineError::AgentCall(
                e @ (AgentError::Timeout(_)
                | AgentError::Guest {
                    code: ErrorCode::Timeout,
                    ..
                }),
            )) => {
                report.timed_out = true;
                report.error = Some(format!("run timed out after {limit:?}: {e}"));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
