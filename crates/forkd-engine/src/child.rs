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
use crate::util::{Interrupt, sh_quote, tail};
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
}

/// Unix socket paths are limited to 108 bytes.
const MAX_SOCK_PATH: usize = 100;

impl VmGuard {
    /// Create `run_dir` (must not exist) and launch QEMU with `args` (built for this dir's
    /// sockets). QEMU gets its own process group so a terminal's Ctrl-C reaches only forkd,
    /// which then stops the VMs itself.
    pub fn create(run_dir: &Path) -> Result<VmGuard> {
        std::fs::create_dir_all(run_dir).at("cannot create run directory", run_dir)?;
        let g = VmGuard {
            run_dir: run_dir.to_path_buf(),
            qmp_sock: run_dir.join("qmp.sock"),
            agent_sock: run_dir.join("agent.sock"),
            log: run_dir.join("qemu.log"),
            process: None,
            keep: false,
        };
        if g.agent_sock.as_os_str().len() > MAX_SOCK_PATH {
            return Err(EngineError::Io {
                what: "socket path too long (set FORKD_HOME to a shorter path)",
                path: g.agent_sock.clone(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        // Until a record names it, the directory is ours: if we die, a sweep cleans it up.
        crate::run::write_owner(run_dir)?;
        Ok(g)
    }

    pub fn spawn(&mut self, qemu: &Path, args: &[String]) -> Result<()> {
        let log = std::fs::File::create(&self.log).at("cannot create", &self.log)?;
        let log2 = log.try_clone().at("cannot open", &self.log)?;
        let child = Command::new(qemu)
            .args(args)
            .env("TMPDIR", &self.run_dir) // snapshot=on overlays land here, removed with the dir
            .env("MALLOC_ARENA_MAX", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .at("cannot start", qemu)?;
        self.process = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }

    /// Whether QEMU is still running.
    pub fn alive(&mut self) -> bool {
        match self.process.as_mut() {
            Some(p) => matches!(p.try_wait(), Ok(None)),
            None => false,
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
            let _ = p.wait();
        }
    }

    /// Leave the VM running and its run directory in place (`--keep`).
    pub fn detach(mut self) -> (u32, PathBuf) {
        self.keep = true;
        let pid = self.pid().unwrap_or(0);
        // Dropping the Child handle does not kill the process.
        self.process = None;
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

fn life(
    plan: &ChildPlan<'_>,
    hostname: &str,
    guard: &mut VmGuard,
    args: Vec<String>,
    report: &mut ChildReport,
    start: Instant,
) -> Result<()> {
    let check = |i: &Interrupt| {
        if i.is_set() {
            Err(EngineError::Interrupted)
        } else {
            Ok(())
        }
    };
    check(plan.interrupt)?;
    let starting = plan.start_gate.enter();
    check(plan.interrupt)?;
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
    let uri = format!("exec:cat {}", sh_quote(&plan.vmstate.to_string_lossy()));
    qmp.execute("migrate-incoming", Some(serde_json::json!({ "uri": uri })))?;
    qmp.wait_migration(Duration::from_secs(60))?;
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
    let check = |i: &Interrupt| {
        if i.is_set() {
            Err(EngineError::Interrupted)
        } else {
            Ok(())
        }
    };
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
