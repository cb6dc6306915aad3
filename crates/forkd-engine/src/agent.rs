//! Host side of the guest agent protocol: one connection on a VM's agent socket.

use crate::error::{EngineError, Result};
use forkd_agent::{
    ExecReply, ExecRequest, HelloReply, IdentityReply, IdentityRequest, Op, PROTOCOL_VERSION,
    Reply, Request, Response, RunReply, RunRequest, WarmReply, WarmRequest, encode_line,
};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub struct AgentConn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    interrupt: Option<crate::util::Interrupt>,
}

/// How often a waiting call looks at the interrupt flag.
const INTERRUPT_POLL: Duration = Duration::from_millis(100);

/// Most frames one call skips (answers to other requests, torn lines) before giving up, so a
/// flood of stale output cannot keep a call busy until its deadline.
const MAX_STALE_FRAMES: usize = 4096;

/// A random first request id for a new connection. The agent answers a request even when the
/// connection that sent it is gone: the guest's write blocks until the next host connects, so
/// a new connection may first read the answer to an old, abandoned request (a timed-out
/// `exec`, say). Ids that differ between connections keep such answers from matching.
fn first_id() -> u64 {
    let b = crate::util::random_bytes(8);
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    // Below 2^53 (exact in any JSON reader) and far from overflow when incremented.
    (u64::from_le_bytes(a) & ((1 << 53) - 1)).max(1)
}

fn err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Agent(e.to_string())
}

impl AgentConn {
    pub fn connect(path: &Path) -> Result<AgentConn> {
        let s = UnixStream::connect(path)
            .map_err(|e| err(format!("connect {}: {e}", path.display())))?;
        let writer = s.try_clone().map_err(err)?;
        Ok(AgentConn {
            reader: BufReader::new(s),
            writer,
            next_id: first_id(),
            interrupt: None,
        })
    }

    /// Make every wait on this connection give up with [`EngineError::Interrupted`] once
    /// `interrupt` is set (Ctrl-C while a child runs a long command).
    pub fn set_interrupt(&mut self, interrupt: crate::util::Interrupt) {
        self.interrupt = Some(interrupt);
    }

    /// Connect and wait until the agent answers `hello` (it may still be booting, or resuming
    /// from a snapshot). `alive` is polled so a dead VM fails fast instead of timing out.
    pub fn wait_ready(
        path: &Path,
        timeout: Duration,
        alive: &mut dyn FnMut() -> bool,
    ) -> Result<(AgentConn, HelloReply)> {
        let start = Instant::now();
        let mut last_err = String::from("no answer");
        let mut conn: Option<AgentConn> = None;
        while start.elapsed() < timeout {
            if !alive() {
                return Err(err(format!(
                    "the VM exited before its agent answered ({last_err})"
                )));
            }
            if conn.is_none() {
                match AgentConn::connect(path) {
                    Ok(c) => conn = Some(c),
                    Err(e) => {
                        last_err = e.to_string();
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            match c.call_timeout(Op::Hello, Duration::from_millis(250)) {
                Ok(Reply::Hello(h)) => return Ok((conn.take().expect("connected"), h)),
                Ok(other) => last_err = format!("unexpected reply {other:?}"),
                Err(EngineError::Agent(e)) if e.contains("timed out") => last_err = e,
                Err(e) => {
                    last_err = e.to_string();
                    conn = None;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        Err(err(format!("no answer after {timeout:?}: {last_err}")))
    }

    /// Send one request and wait up to `timeout` for the response with the same id. Answers
    /// to earlier, abandoned requests (on this or an older connection) and torn lines are
    /// skipped, at most [`MAX_STALE_FRAMES`] of them.
    pub fn call_timeout(&mut self, op: Op, timeout: Duration) -> Result<Reply> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request {
            v: PROTOCOL_VERSION,
            id,
            op,
        };
        self.writer
            .write_all(&encode_line(&req))
            .map_err(|e| err(format!("send: {e}")))?;
        let deadline = Instant::now() + timeout;
        let mut line = String::new();
        let mut stale = 0usize;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(err(format!("timed out after {timeout:?}")));
            }
            if self.interrupt.as_ref().is_some_and(|i| i.is_set()) {
                return Err(EngineError::Interrupted);
            }
            let slice = if self.interrupt.is_some() {
                left.min(INTERRUPT_POLL)
            } else {
                left
            };
            self.reader
                .get_ref()
                .set_read_timeout(Some(slice))
                .map_err(err)?;
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err(err("connection closed")),
                Ok(_) if !line.ends_with('\n') => continue, // partial line; keep reading
                Ok(_) => {}
                // Partial data stays in `line`; the deadline is checked at the loop's top.
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue;
                }
                Err(e) => return Err(err(format!("receive: {e}"))),
            }
            let parsed = serde_json::from_str::<Response>(line.trim_end());
            let resp = match parsed {
                Ok(r) if r.id == id => r,
                other => {
                    match other {
                        Ok(r) => tracing::debug!(
                            "agent: skipping the answer to request {} (waiting for {id})",
                            r.id
                        ),
                        Err(e) => tracing::debug!(
                            "agent: skipping an unreadable line ({e}): {:?}",
                            line.chars().take(200).collect::<String>()
                        ),
                    }
                    line.clear();
                    stale += 1;
                    if stale >= MAX_STALE_FRAMES {
                        return Err(err(format!(
                            "no answer to request {id}: skipped {stale} stale or unreadable frames"
                        )));
                    }
                    continue;
                }
            };
            line.clear();
            return match (resp.ok, resp.reply, resp.error) {
                (true, Some(r), _) => Ok(r),
                (_, _, Some(e)) => Err(err(e)),
                _ => Err(err("malformed response")),
            };
        }
    }

    pub fn hello(&mut self) -> Result<HelloReply> {
        match self.call_timeout(Op::Hello, Duration::from_secs(60))? {
            Reply::Hello(h) => Ok(h),
            r => Err(err(format!("unexpected reply {r:?}"))),
        }
    }

    pub fn exec(&mut self, req: ExecRequest) -> Result<ExecReply> {
        let t = Duration::from_millis(req.timeout_ms.unwrap_or(60_000) + 10_000);
        match self.call_timeout(Op::Exec(req), t)? {
            Reply::Exec(x) => Ok(x),
            r => Err(err(format!("unexpected reply {r:?}"))),
        }
    }

    pub fn shell(&mut self, cmd: &str, timeout: Duration) -> Result<ExecReply> {
        self.exec(ExecRequest {
            shell: Some(cmd.to_string()),
            timeout_ms: Some(timeout.as_millis() as u64),
            ..Default::default()
        })
    }

    pub fn identity(&mut self, req: IdentityRequest) -> Result<IdentityReply> {
        match self.call_timeout(Op::Identity(req), Duration::from_secs(120))? {
            Reply::Identity(x) => Ok(x),
            r => Err(err(format!("unexpected reply {r:?}"))),
        }
    }

    pub fn warm(&mut self, req: WarmRequest) -> Result<WarmReply> {
        match self.call_timeout(Op::Warm(req), Duration::from_secs(900))? {
            Reply::Warm(x) => Ok(x),
            r => Err(err(format!("unexpected reply {r:?}"))),
        }
    }

    pub fn run(&mut self, code: &str, timeout: Duration) -> Result<RunReply> {
        let req = RunRequest {
            code: code.to_string(),
            timeout_ms: Some(timeout.as_millis() as u64),
        };
        match self.call_timeout(Op::Run(req), timeout + Duration::from_secs(10))? {
            Reply::Run(x) => Ok(x),
            r => Err(err(format!("unexpected reply {r:?}"))),
        }
    }
}
