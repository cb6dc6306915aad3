//! A small synchronous QMP client over a Unix socket: greeting, capability negotiation,
//! commands (with their `return` or `error`), and events skipped while waiting.

use crate::error::{EngineError, Result};
use serde_json::{Value, json};
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Longest QMP message accepted (replies forkd asks for are a few KiB).
pub const MAX_QMP_LINE: usize = 1024 * 1024;

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for command replies.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connect (retrying until the socket appears or `timeout` passes) and negotiate.
    pub fn connect(path: &Path, timeout: Duration, alive: &mut dyn FnMut() -> bool) -> Result<Qmp> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if start.elapsed() > timeout || !alive() {
                        return Err(EngineError::Qmp(format!(
                            "cannot connect to {}: {e}",
                            path.display()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| EngineError::Qmp(e.to_string()))?;
        let writer = stream
            .try_clone()
            .map_err(|e| EngineError::Qmp(e.to_string()))?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = q.read_msg()?;
        if greeting.get("QMP").is_none() {
            return Err(EngineError::Qmp(format!("unexpected greeting: {greeting}")));
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// One message, at most [`MAX_QMP_LINE`] bytes: a child's QEMU is not trusted either.
    fn read_msg(&mut self) -> Result<Value> {
        let mut line = Vec::new();
        let more = crate::util::read_line_capped(&mut self.reader, &mut line, MAX_QMP_LINE)
            .map_err(|e| EngineError::Qmp(format!("QEMU: {e}")))?;
        if !more {
            return Err(EngineError::Qmp(
                "QEMU closed the QMP connection (it exited)".into(),
            ));
        }
        serde_json::from_slice(&line).map_err(|e| {
            let head = String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
            EngineError::Qmp(format!("bad JSON {head:?}: {e}"))
        })
    }

    /// Run one command; returns its `return` value or the QMP error as [`EngineError::Qmp`].
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value> {
        self.execute_passing(cmd, args, None)
    }

    /// Plug the NIC of layout v2 (`nic0`) in or out, as the guest's driver sees it.
    pub fn set_nic_link(&mut self, up: bool) -> Result<()> {
        self.execute(
            "set_link",
            Some(serde_json::json!({ "name": "nic0", "up": up })),
        )
        .map(|_| ())
    }

    /// [`Qmp::execute`], handing QEMU the descriptor `fd` with the command (`SCM_RIGHTS`), as
    /// `getfd` and `add-fd` expect: a sandboxed QEMU opens no path of ours itself.
    pub fn execute_passing(
        &mut self,
        cmd: &str,
        args: Option<Value>,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<Value> {
        let mut msg = json!({ "execute": cmd });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| EngineError::Qmp(e.to_string()))?;
        bytes.push(b'\n');
        let sent = match fd {
            None => self.writer.write_all(&bytes),
            Some(fd) => send_with_fd(&self.writer, &bytes, fd),
        };
        sent.map_err(|e| EngineError::Qmp(format!("write {cmd}: {e}")))?;
        loop {
            let v = self.read_msg()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let desc = e
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                return Err(EngineError::Qmp(format!("{cmd}: {desc}")));
            }
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Poll `query-migrate` until `completed`; a `failed` migration or timeout is an error.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut nap = Duration::from_millis(1);
        loop {
            let r = self.execute("query-migrate", None)?;
            match r.get("status").and_then(Value::as_str).unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let why = r
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(EngineError::Qmp(format!("migration failed: {why}")));
                }
                _ => {}
            }
            if start.elapsed() > timeout {
                return Err(EngineError::Qmp(format!(
                    "migration not done after {timeout:?}: {r}"
                )));
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(20));
        }
    }

    /// Set migration capabilities, e.g. `[("x-ignore-shared", true)]`.
    pub fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<()> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({ "capability": c, "state": on }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )?;
        Ok(())
    }

    pub fn status(&mut self) -> Result<String> {
        let r = self.execute("query-status", None)?;
        Ok(r.get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string())
    }
}

/// Write all of `bytes` to `sock`, the first part carrying `fd` as ancillary data.
fn send_with_fd(
    mut sock: &UnixStream,
    bytes: &[u8],
    fd: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    let fds = [fd];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("no room for the descriptor"));
    }
    let n = sendmsg(
        sock,
        &[std::io::IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    sock.write_all(&bytes[n..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A QMP peer (a compromised QEMU) that sends one endless line: the client gives up at
    /// [`MAX_QMP_LINE`] instead of buffering everything (a `String` growing without bound).
    #[test]
    fn an_endless_qmp_line_is_refused_at_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let total: usize = 256 << 20;
        let server = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let chunk = vec![b'x'; 1 << 20];
            let mut sent = 0;
            while sent < total {
                if c.write_all(&chunk).is_err() {
                    break;
                }
                sent += chunk.len();
            }
            sent
        });
        let err = match Qmp::connect(&sock, Duration::from_secs(5), &mut || true) {
            Ok(_) => panic!("an endless greeting was accepted"),
            Err(e) => e.to_string(),
        };
        let sent = server.join().unwrap();
        assert!(err.contains("longer than"), "{err}");
        assert!(
            sent < total / 4,
            "the client read {} MiB of one line before giving up",
            sent >> 20
        );
    }
}
