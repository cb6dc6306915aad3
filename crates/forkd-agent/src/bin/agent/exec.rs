//! `exec`: run a program with optional stdin, environment and timeout.
//!
//! The reply is sent when the command's own process has exited and its stdout/stderr are
//! drained; a background process that inherited the pipes only gets [`GRACE`] more to finish
//! writing, then the agent closes its ends and replies (see docs/AGENT-PROTOCOL.md).
//!
//! Each command starts in its own process group (its pid), so `signal` reaches the whole tree.
//! With `stream`, output is sent as events while the command runs: each chunk is written to
//! the host before more is read from the pipe, so a host that does not read stalls the command
//! instead of growing the agent's memory.

use crate::{Failure, Res, reaper};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use forkd_agent::{ErrorCode, Event, ExecReply, ExecRequest, MAX_EXEC_OUTPUT, STREAM_CHUNK};
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Pids (= process group ids) of the commands of `exec`s still in progress (with a count, in
/// case a pid is reused while an earlier exec with it is finishing).
#[derive(Default)]
pub struct Running(Mutex<HashMap<u32, usize>>);

impl Running {
    /// Send `signal` to the process group of a running exec's command.
    pub fn signal(&self, pid: u32, signal: i32) -> Res<()> {
        if !(0..=64).contains(&signal) {
            return Err(Failure::bad(format!("no such signal {signal}")));
        }
        let running = crate::lock(&self.0);
        if !running.contains_key(&pid) {
            return Err(Failure::new(
                ErrorCode::NotFound,
                format!("pid {pid} is not the command of a running exec"),
            ));
        }
        // SAFETY: kill(2) with plain integers. The group is that of a command whose exec is
        // still in progress (registered under this lock), so the id has not been reused.
        let rc = unsafe { libc::kill(-(pid as libc::pid_t), signal) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(Failure::io(format!("kill process group {pid}"), &e));
        }
        Ok(())
    }
}

/// Registration of one command in [`Running`], undone on drop.
struct Registered<'a>(&'a Running, u32);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut running = crate::lock(&self.0.0);
        if let Some(n) = running.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                running.remove(&self.1);
            }
        }
    }
}

/// Sends one event to the host; false when the host is gone.
pub type Emit<'a> = &'a dyn Fn(Event) -> bool;

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long output is still collected after the command's own process exits.
pub const GRACE: Duration = Duration::from_millis(100);

/// Poll tick when no pidfd tells us the child exited.
const TICK: Duration = Duration::from_millis(10);

/// One output pipe being drained (non-blocking).
struct Stream {
    fd: Option<OwnedFd>,
    buf: Vec<u8>,
    stderr: bool,
    truncated: bool,
    /// Read buffer (one event's worth).
    chunk: Vec<u8>,
}

/// What to do with output.
enum Sink<'a> {
    /// Keep up to [`MAX_EXEC_OUTPUT`] bytes for the reply.
    Collect,
    /// Send it to the host as events.
    Stream(Emit<'a>),
    /// The host is gone: read and drop.
    Discard,
}

impl Stream {
    fn new(fd: Option<OwnedFd>, stderr: bool) -> Stream {
        if let Some(f) = &fd {
            // SAFETY: fcntl on a descriptor we own; only toggles O_NONBLOCK on our read end.
            unsafe {
                let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
                libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
        }
        Stream {
            fd,
            buf: Vec::new(),
            stderr,
            truncated: false,
            chunk: vec![0u8; STREAM_CHUNK],
        }
    }

    /// Read everything available now; close on EOF or error. Returns false if the sink is a
    /// stream whose host has gone away.
    fn drain(&mut self, sink: &Sink<'_>) -> bool {
        let Some(fd) = &self.fd else { return true };
        let chunk = &mut self.chunk;
        loop {
            // SAFETY: reads at most chunk.len() bytes into a buffer we own from our own fd.
            let n = unsafe { libc::read(fd.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len()) };
            if n > 0 {
                let data = &chunk[..n as usize];
                match sink {
                    Sink::Collect => {
                        let room = MAX_EXEC_OUTPUT.saturating_sub(self.buf.len());
                        if data.len() > room {
                            self.truncated = true;
                        }
                        self.buf.extend_from_slice(&data[..data.len().min(room)]);
                    }
                    Sink::Stream(emit) => {
                        let data = B64.encode(data);
                        let ev = if self.stderr {
                            Event::Stderr { data }
                        } else {
                            Event::Stdout { data }
                        };
                        if !emit(ev) {
                            return false;
                        }
                    }
                    Sink::Discard => {}
                }
                continue;
            }
            let err = std::io::Error::last_os_error().raw_os_error();
            if n < 0 && err == Some(libc::EINTR) {
                continue;
            }
            if n < 0 && err == Some(libc::EAGAIN) {
                return true;
            }
            self.fd = None; // EOF (every writer closed) or a read error
            return true;
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}

fn pollfd(fd: BorrowedFd<'_>) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Wait until one of `fds` is ready or `max` passes.
fn poll(fds: &mut [libc::pollfd], max: Duration) {
    let ms = max.as_millis().clamp(1, 60_000) as libc::c_int;
    // SAFETY: `fds` is a valid slice of initialised pollfd structs for the whole call.
    unsafe {
        libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms);
    }
}

fn command(req: &ExecRequest) -> Res<Command> {
    let mut cmd = match (&req.argv, &req.shell) {
        (Some(argv), None) if !argv.is_empty() => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
        (None, Some(sh)) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(sh);
            c
        }
        _ => {
            return Err(Failure::bad(
                "exec needs exactly one of `argv` (non-empty) or `shell`",
            ));
        }
    };
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", DEFAULT_PATH);
    }
    cmd.envs(&req.env);
    cmd.current_dir(req.cwd.as_deref().unwrap_or("/"));
    cmd.stdin(if req.stdin.is_some() || req.stdin_b64.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    // Its own process group, so a signal can reach everything it starts.
    cmd.process_group(0);
    Ok(cmd)
}

fn stdin_bytes(req: &ExecRequest) -> Res<Option<Vec<u8>>> {
    match (&req.stdin, &req.stdin_b64) {
        (Some(_), Some(_)) => Err(Failure::bad(
            "exec takes at most one of `stdin` and `stdin_b64`",
        )),
        (Some(s), None) => Ok(Some(s.clone().into_bytes())),
        (None, Some(b)) => B64
            .decode(b)
            .map(Some)
            .map_err(|e| Failure::bad(format!("stdin_b64 is not base64: {e}"))),
        (None, None) => Ok(None),
    }
}

/// SIGKILL a process group (best effort).
fn kill_group(pid: u32) {
    // SAFETY: kill(2) with plain integers on the group of a command we still track.
    unsafe {
        libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
    }
}

pub fn run(req: &ExecRequest, running: &Running, emit: Emit<'_>) -> Res<ExecReply> {
    let mut cmd = command(req)?;
    let stdin = stdin_bytes(req)?;
    let start = Instant::now();
    let (mut child, watch) = {
        // Registered under the lock `signal` takes, so a signal never misses a new command.
        let mut reg = crate::lock(&running.0);
        let spawned = reaper::spawn(&mut cmd).map_err(|e| Failure::io("spawn failed", &e))?;
        *reg.entry(spawned.0.id()).or_default() += 1;
        spawned
    };
    let pid = child.id();
    let _registered = Registered(running, pid);
    let mut sink = if req.stream {
        Sink::Stream(emit)
    } else {
        Sink::Collect
    };
    if req.stream && !emit(Event::Started { pid }) {
        kill_group(pid);
        sink = Sink::Discard;
    }
    if let (Some(data), Some(mut sin)) = (stdin, child.stdin.take()) {
        std::thread::spawn(move || {
            let _ = sin.write_all(&data);
        });
    }
    let mut streams = [
        Stream::new(child.stdout.take().map(OwnedFd::from), false),
        Stream::new(child.stderr.take().map(OwnedFd::from), true),
    ];
    // Drain both pipes; if the host of a stream went away, kill the command's group and
    // drop the rest of its output.
    let drain_all = |streams: &mut [Stream; 2], sink: &mut Sink<'_>| {
        for s in streams.iter_mut() {
            if !s.drain(sink) {
                kill_group(pid);
                *sink = Sink::Discard;
                s.drain(sink);
            }
        }
    };
    let deadline = start + Duration::from_millis(req.timeout_ms.unwrap_or(60_000));
    let mut status: Option<ExitStatus> = None;
    let mut grace_end = None;
    let mut timed_out = false;
    loop {
        if status.is_none() {
            status = watch.try_status();
        }
        let now = Instant::now();
        if status.is_some() && grace_end.is_none() {
            grace_end = Some(now + GRACE);
        }
        if status.is_some() && streams.iter().all(|s| s.fd.is_none()) {
            break;
        }
        if grace_end.is_some_and(|g| now >= g) {
            drain_all(&mut streams, &mut sink); // whatever is already buffered
            break;
        }
        if status.is_none() && !timed_out && now >= deadline {
            timed_out = true;
            watch.kill();
        }
        let wait = match (grace_end, &watch.pidfd) {
            (Some(g), _) => g - now,
            (None, None) => TICK,
            (None, Some(_)) if timed_out => Duration::from_secs(1),
            (None, Some(_)) => deadline - now,
        };
        let mut fds: Vec<libc::pollfd> = streams
            .iter()
            .filter_map(|s| s.fd.as_ref().map(|f| pollfd(f.as_fd())))
            .collect();
        let pidfd_at = match (&watch.pidfd, status) {
            (Some(p), None) => {
                fds.push(pollfd(p.as_fd()));
                Some(fds.len() - 1)
            }
            _ => None,
        };
        poll(&mut fds, wait);
        drain_all(&mut streams, &mut sink);
        if pidfd_at.is_some_and(|i| fds[i].revents != 0) {
            // The process has exited; the reaper collects it on the SIGCHLD that follows.
            status = Some(watch.wait());
        }
    }
    let status = status.expect("loop ends only after the child exited");
    Ok(ExecReply {
        exit_code: if timed_out { None } else { status.code() },
        signal: status.signal(),
        timed_out,
        stdout: streams[0].text(),
        stderr: streams[1].text(),
        duration_ms: start.elapsed().as_millis() as u64,
        truncated: streams.iter().any(|s| s.truncated),
    })
}
