//! Commands in a sandbox: streamed to the caller ([`Running`]) or kept in the background
//! ([`BackgroundCommand`]) with their output in capped files in the sandbox's run directory.

use crate::error::{Result, SandboxError};
use base64::Engine as _;
use forkd_agent::{ExecReply, ExecRequest};
use forkd_engine::mux::{AgentClient, AgentError, ExecEvent, ExecStream};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What a caller asks to run. Exactly one of `cmd` and `argv`; at most one of `stdin` and
/// `stdin_data`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CommandRequest {
    pub cmd: Option<String>,
    pub argv: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// Text for the command's stdin.
    pub stdin: Option<String>,
    /// Bytes for the command's stdin.
    pub stdin_data: Option<Vec<u8>>,
    /// Kill the command after this long; `None`: the default (60 s), or no limit for a
    /// background command.
    pub timeout: Option<Duration>,
    pub background: bool,
}

/// How long a foreground command may run unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// "No limit" for the agent, which always applies one: 30 days.
const NO_LIMIT: Duration = Duration::from_secs(30 * 24 * 3600);
/// Bytes of each stream a background command keeps; the rest is counted as dropped.
pub const KEEP_OUTPUT: u64 = 8 << 20;

impl CommandRequest {
    pub(crate) fn to_exec(&self) -> Result<ExecRequest> {
        let bad = |field, reason: &str| SandboxError::BadRequest {
            field,
            reason: reason.to_string(),
        };
        match (&self.cmd, &self.argv) {
            (Some(_), Some(_)) => return Err(bad("cmd", "give `cmd` or `argv`, not both")),
            (None, None) => return Err(bad("cmd", "give `cmd` (a shell line) or `argv`")),
            (None, Some(a)) if a.is_empty() => return Err(bad("argv", "must not be empty")),
            _ => {}
        }
        if self.stdin.is_some() && self.stdin_data.is_some() {
            return Err(bad("stdin", "give `stdin` or `stdin_data`, not both"));
        }
        if let Some(cwd) = &self.cwd
            && !cwd.starts_with('/')
        {
            return Err(bad("cwd", "must be an absolute guest path"));
        }
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(SandboxError::BadRequest {
                    field: "env",
                    reason: format!("{k:?} is not a valid variable name"),
                });
            }
        }
        let timeout = match (self.timeout, self.background) {
            (Some(t), _) if !t.is_zero() => t,
            (_, true) => NO_LIMIT,
            _ => DEFAULT_TIMEOUT,
        };
        Ok(ExecRequest {
            argv: self.argv.clone(),
            shell: self.cmd.clone(),
            env: self.env.clone(),
            stdin: self.stdin.clone(),
            stdin_b64: self
                .stdin_data
                .as_deref()
                .map(|d| base64::engine::general_purpose::STANDARD.encode(d)),
            timeout_ms: Some(timeout.as_millis() as u64),
            cwd: self.cwd.clone(),
            stream: true,
        })
    }
}

/// One event of a command's life, as streamed to a caller.
#[derive(Debug, Clone)]
pub enum OutputEvent {
    Started { pid: u32 },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExecReply),
}

/// A command running in the foreground: its events come from [`Running::next`]. Dropping it
/// before the exit kills the command (SIGKILL to its process group): a caller that went away
/// leaves nothing running.
pub struct Running {
    agent: AgentClient,
    stream: ExecStream,
    pid: Option<u32>,
    finished: bool,
    /// Events still to hand out (an old agent's output, replayed from its final reply).
    queued: std::collections::VecDeque<OutputEvent>,
    /// The sandbox's busy lock, held shared while the command runs (a snapshot refuses).
    _busy: Option<forkd_store::FileLock>,
}

impl Running {
    pub(crate) fn new(
        agent: AgentClient,
        stream: ExecStream,
        busy: Option<forkd_store::FileLock>,
    ) -> Running {
        Running {
            agent,
            stream,
            pid: None,
            finished: false,
            queued: Default::default(),
            _busy: busy,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The next event, waiting at most `timeout`; `Ok(None)` when nothing came in that time.
    /// After `Exit` (or an error) the stream is over.
    pub fn next(&mut self, timeout: Duration) -> Result<Option<OutputEvent>> {
        if let Some(ev) = self.queued.pop_front() {
            return Ok(Some(ev));
        }
        if self.finished {
            return Ok(None);
        }
        let Some(ev) = self.stream.next(timeout) else {
            self.finished = true;
            return Ok(None);
        };
        Ok(Some(match ev {
            ExecEvent::Started { pid } => {
                self.pid = Some(pid);
                OutputEvent::Started { pid }
            }
            ExecEvent::Stdout(b) => OutputEvent::Stdout(b),
            ExecEvent::Stderr(b) => OutputEvent::Stderr(b),
            ExecEvent::Exit(mut x) => {
                self.finished = true;
                // An agent without streaming returns the output in the reply itself.
                let out = std::mem::take(&mut x.stdout);
                let err = std::mem::take(&mut x.stderr);
                if out.is_empty() && err.is_empty() {
                    OutputEvent::Exit(x)
                } else {
                    self.queued.push_back(OutputEvent::Stderr(err.into_bytes()));
                    self.queued.push_back(OutputEvent::Exit(x));
                    OutputEvent::Stdout(out.into_bytes())
                }
            }
            // Nothing came within `timeout`: not an error, the command is still running.
            ExecEvent::Failed(AgentError::Timeout(_)) => return Ok(None),
            ExecEvent::Failed(e) => {
                self.finished = true;
                return Err(e.into());
            }
        }))
    }

    /// Whether the stream has ended (exit or failure) and every event was handed out.
    pub fn finished(&self) -> bool {
        self.finished && self.queued.is_empty()
    }

    /// Keep the command running when this handle is dropped.
    fn disarm(&mut self) {
        self.finished = true;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(pid) = self.pid {
            tracing::debug!("caller went away: killing command pid {pid}");
            if let Err(e) = self.agent.signal(pid, libc::SIGKILL) {
                tracing::debug!("cannot kill pid {pid}: {e}");
            }
        }
    }
}

/// The state of a background command (also its shape in the REST API).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CommandStatus {
    pub command_id: String,
    pub pid: Option<u32>,
    pub running: bool,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub duration_ms: Option<u64>,
    /// Set when the command's stream failed (the VM stopped, say) instead of exiting.
    pub error: Option<String>,
}

/// What a background command printed so far.
#[derive(Debug, Clone)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
    pub running: bool,
}

struct Sink {
    path: PathBuf,
    file: std::fs::File,
    kept: u64,
    dropped: u64,
}

impl Sink {
    fn create(path: PathBuf) -> Result<Sink> {
        let file = forkd_store::private_options()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| SandboxError::Io {
                what: "cannot create",
                path: path.clone(),
                source,
            })?;
        Ok(Sink {
            path,
            file,
            kept: 0,
            dropped: 0,
        })
    }

    fn push(&mut self, b: &[u8]) {
        let room = KEEP_OUTPUT.saturating_sub(self.kept) as usize;
        let take = b.len().min(room);
        if take > 0 && self.file.write_all(&b[..take]).is_ok() {
            self.kept += take as u64;
        } else {
            self.dropped += take as u64;
        }
        self.dropped += (b.len() - take) as u64;
    }

    fn read(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Ok(mut f) = std::fs::File::open(&self.path) {
            let _ = f.seek(SeekFrom::Start(0));
            let _ = f.take(KEEP_OUTPUT).read_to_end(&mut out);
        }
        out
    }
}

/// The two capped output files of a background command, made before it starts.
pub struct Sinks {
    out: Sink,
    err: Sink,
}

impl Sinks {
    pub(crate) fn create(run_dir: &Path, id: &str) -> Result<Sinks> {
        let out = Sink::create(run_dir.join(format!("{id}.stdout")))?;
        let err = Sink::create(run_dir.join(format!("{id}.stderr"))).inspect_err(|_| {
            let _ = std::fs::remove_file(&out.path);
        })?;
        Ok(Sinks { out, err })
    }
}

struct BgState {
    pid: Option<u32>,
    exit: Option<ExecReply>,
    error: Option<String>,
    out: Sink,
    err: Sink,
}

/// A command started with `background: true`. A thread drains its stream into two capped
/// files; callers wait for it, read its output, or signal it.
pub struct BackgroundCommand {
    id: String,
    state: Mutex<BgState>,
    done: Condvar,
}

impl BackgroundCommand {
    pub(crate) fn start(
        id: String,
        mut running: Running,
        sinks: Sinks,
    ) -> Result<Arc<BackgroundCommand>> {
        let Sinks { out, err } = sinks;
        // The first event is the pid; wait for it so callers can signal at once.
        let mut first = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        while first.is_none() && Instant::now() < deadline && !running.finished() {
            first = running.next(Duration::from_millis(200))?;
        }
        let cmd = Arc::new(BackgroundCommand {
            id: id.clone(),
            state: Mutex::new(BgState {
                pid: None,
                exit: None,
                error: None,
                out,
                err,
            }),
            done: Condvar::new(),
        });
        if let Some(ev) = first {
            cmd.apply(ev);
        }
        let c = cmd.clone();
        std::thread::Builder::new()
            .name(format!("bg-{id}"))
            .stack_size(128 * 1024)
            .spawn(move || {
                while !running.finished() {
                    match running.next(Duration::from_secs(1)) {
                        Ok(Some(ev)) => c.apply(ev),
                        Ok(None) => {}
                        Err(e) => {
                            c.lock().error = Some(e.to_string());
                            break;
                        }
                    }
                }
                running.disarm();
                c.done.notify_all();
            })
            .map_err(|source| SandboxError::Io {
                what: "cannot start a thread for",
                path: PathBuf::from(&id),
                source,
            })?;
        Ok(cmd)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BgState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply(&self, ev: OutputEvent) {
        let mut s = self.lock();
        match ev {
            OutputEvent::Started { pid } => s.pid = Some(pid),
            OutputEvent::Stdout(b) => s.out.push(&b),
            OutputEvent::Stderr(b) => s.err.push(&b),
            OutputEvent::Exit(x) => {
                s.exit = Some(x);
                drop(s);
                self.done.notify_all();
            }
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn pid(&self) -> Option<u32> {
        self.lock().pid
    }

    pub fn status(&self) -> CommandStatus {
        let s = self.lock();
        CommandStatus {
            command_id: self.id.clone(),
            pid: s.pid,
            running: s.exit.is_none() && s.error.is_none(),
            exit_code: s.exit.as_ref().and_then(|x| x.exit_code),
            signal: s.exit.as_ref().and_then(|x| x.signal),
            timed_out: s.exit.as_ref().is_some_and(|x| x.timed_out),
            duration_ms: s.exit.as_ref().map(|x| x.duration_ms),
            error: s.error.clone(),
        }
    }

    /// Wait until the command has exited, at most `timeout`.
    pub fn wait(&self, timeout: Duration) -> Result<CommandStatus> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while s.exit.is_none() && s.error.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SandboxError::StillRunning(timeout));
            }
            s = self
                .done
                .wait_timeout(s, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        drop(s);
        Ok(self.status())
    }

    pub fn output(&self) -> Output {
        let s = self.lock();
        Output {
            stdout: s.out.read(),
            stderr: s.err.read(),
            stdout_dropped: s.out.dropped,
            stderr_dropped: s.err.dropped,
            running: s.exit.is_none() && s.error.is_none(),
        }
    }

    /// The sandbox is going away: wake every waiter.
    pub(crate) fn abandon(&self) {
        let mut s = self.lock();
        if s.exit.is_none() && s.error.is_none() {
            s.error = Some("the sandbox was stopped".into());
        }
        drop(s);
        self.done.notify_all();
    }
}
