//! A small synchronous QMP client over a Unix socket: greeting, capability negotiation,
//! commands (with their `return` or `error`), and events skipped while waiting.

use crate::error::{EngineError, Result};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

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

    fn read_msg(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| EngineError::Qmp(format!("read: {e}")))?;
        if n == 0 {
            return Err(EngineError::Qmp(
                "QEMU closed the QMP connection (it exited)".into(),
            ));
        }
        serde_json::from_str(&line).map_err(|e| EngineError::Qmp(format!("bad JSON {line:?}: {e}")))
    }

    /// Run one command; returns its `return` value or the QMP error as [`EngineError::Qmp`].
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value> {
        let mut msg = json!({ "execute": cmd });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| EngineError::Qmp(e.to_string()))?;
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .map_err(|e| EngineError::Qmp(format!("write {cmd}: {e}")))?;
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
