//! `exec`: run a program with optional stdin, environment and timeout.
//!
//! The reply is sent when the command's own process has exited and its stdout/stderr are
//! drained; a background process that inherited the pipes only gets [`GRACE`] more to finish
//! writing, then the agent closes its ends and replies (see docs/AGENT-PROTOCOL.md).

use crate::reaper;
use forkd_agent::{ExecReply, ExecRequest};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long output is still collected after the command's own process exits.
pub const GRACE: Duration = Duration::from_millis(100);

/// Poll tick when no pidfd tells us the child exited.
const TICK: Duration = Duration::from_millis(10);

/// One output pipe being drained (non-blocking).
struct Stream {
    fd: Option<OwnedFd>,
    buf: Vec<u8>,
}

impl Stream {
    fn new(fd: Option<OwnedFd>) -> Stream {
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
        }
    }

    /// Read everything available now; close on EOF or error.
    fn drain(&mut self) {
        let Some(fd) = &self.fd else { return };
        let mut chunk = [0u8; 65536];
        loop {
            // SAFETY: reads at most chunk.len() bytes into a buffer we own from our own fd.
            let n = unsafe { libc::read(fd.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len()) };
            if n > 0 {
                self.buf.extend_from_slice(&chunk[..n as usize]);
                continue;
            }
            let err = std::io::Error::last_os_error().raw_os_error();
            if n < 0 && err == Some(libc::EINTR) {
                continue;
            }
            if n < 0 && err == Some(libc::EAGAIN) {
                return;
            }
            self.fd = None; // EOF (every writer closed) or a read error
            return;
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

fn command(req: &ExecRequest) -> Result<Command, String> {
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
        _ => return Err("exec needs exactly one of `argv` (non-empty) or `shell`".into()),
    };
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", DEFAULT_PATH);
    }
    cmd.envs(&req.env);
    cmd.current_dir(req.cwd.as_deref().unwrap_or("/"));
    cmd.stdin(if req.stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    Ok(cmd)
}

pub fn run(req: &ExecRequest) -> Result<ExecReply, String> {
    let mut cmd = command(req)?;
    let start = Instant::now();
    let (mut child, watch) = reaper::spawn(&mut cmd).map_err(|e| format!("spawn failed: {e}"))?;
    if let (Some(data), Some(mut sin)) = (req.stdin.clone(), child.stdin.take()) {
        std::thread::spawn(move || {
            let _ = sin.write_all(data.as_bytes());
        });
    }
    let mut streams = [
        Stream::new(child.stdout.take().map(OwnedFd::from)),
        Stream::new(child.stderr.take().map(OwnedFd::from)),
    ];
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
            streams.iter_mut().for_each(Stream::drain); // whatever is already buffered
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
        streams.iter_mut().for_each(Stream::drain);
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
    })
}
