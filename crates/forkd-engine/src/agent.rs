//! Host side of the guest agent protocol: one connection on a VM's agent socket.
//!
//! [`AgentConn`] is the engine's per-child connection (restore, identity, the work); it is a
//! thin wrapper over the multiplexing [`AgentClient`], which does the framing.

use crate::error::{EngineError, Result};
use crate::mux::{AgentClient, AgentError};
use forkd_agent::{
    ExecReply, ExecRequest, HelloReply, IdentityReply, IdentityRequest, Op, Reply, RunReply,
    WarmReply, WarmRequest,
};
use std::path::Path;
use std::time::{Duration, Instant};

pub struct AgentConn {
    client: AgentClient,
}

impl AgentConn {
    pub fn connect(path: &Path) -> Result<AgentConn> {
        let client = AgentClient::connect(path)
            .map_err(|e| EngineError::Agent(format!("connect {}: {e}", path.display())))?;
        Ok(AgentConn { client })
    }

    /// The multiplexing client underneath, for good.
    pub fn into_client(self) -> AgentClient {
        self.client
    }

    /// The multiplexing client underneath (clone it to use the connection from other threads).
    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    /// Make every wait on this connection give up with [`EngineError::Interrupted`] once
    /// `interrupt` is set (Ctrl-C while a child runs a long command).
    pub fn set_interrupt(&mut self, interrupt: crate::util::Interrupt) {
        self.client.set_interrupt(interrupt);
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
                return Err(EngineError::Agent(format!(
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
            match c.client.call(Op::Hello, Duration::from_millis(250)) {
                Ok(Reply::Hello(h)) => return Ok((conn.take().expect("connected"), h)),
                Ok(other) => last_err = format!("unexpected reply {other:?}"),
                // Still resuming: keep the connection, ask again (a late answer to the
                // earlier hello is dropped: nobody waits for its id any more).
                Err(e @ AgentError::Timeout(_)) => last_err = e.to_string(),
                Err(e) => {
                    last_err = e.to_string();
                    conn = None;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        Err(EngineError::Agent(format!(
            "no answer after {timeout:?}: {last_err}"
        )))
    }

    /// Send one request and wait up to `timeout` for the response with the same id. Answers
    /// to earlier, abandoned requests (on this or an older connection) are dropped.
    pub fn call_timeout(&mut self, op: Op, timeout: Duration) -> Result<Reply> {
        Ok(self.client.call(op, timeout)?)
    }

    pub fn hello(&mut self) -> Result<HelloReply> {
        Ok(self.client.hello()?)
    }

    pub fn exec(&mut self, req: ExecRequest) -> Result<ExecReply> {
        Ok(self.client.exec(req)?)
    }

    pub fn shell(&mut self, cmd: &str, timeout: Duration) -> Result<ExecReply> {
        Ok(self.client.shell(cmd, timeout)?)
    }

    pub fn identity(&mut self, req: IdentityRequest) -> Result<IdentityReply> {
        Ok(self.client.identity(req)?)
    }

    pub fn warm(&mut self, req: WarmRequest) -> Result<WarmReply> {
        Ok(self.client.warm(req)?)
    }

    pub fn run(&mut self, code: &str, timeout: Duration) -> Result<RunReply> {
        Ok(self.client.run(code, timeout)?)
    }
}
