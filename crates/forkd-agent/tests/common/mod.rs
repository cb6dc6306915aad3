//! The agent binary driven over stdin/stdout (`--stdio`), shared by the integration tests.
#![allow(dead_code)]

use forkd_agent::{Op, PROTOCOL_VERSION, Reply, Request, Response, encode_line};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

pub struct Agent {
    pub child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
    id: u64,
}

impl Agent {
    pub fn start() -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_forkd-agent"))
            .arg("--stdio")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Agent { child, out, id: 0 }
    }
    pub fn raw(&mut self, line: &str) -> Response {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        let mut resp = String::new();
        self.out.read_line(&mut resp).unwrap();
        serde_json::from_str(&resp).unwrap()
    }
    pub fn call(&mut self, op: Op) -> Result<Reply, String> {
        self.id += 1;
        let req = Request {
            v: PROTOCOL_VERSION,
            id: self.id,
            op,
        };
        let line = String::from_utf8(encode_line(&req)).unwrap();
        let r = self.raw(line.trim_end());
        assert_eq!(r.id, self.id);
        if r.ok {
            Ok(r.reply.unwrap())
        } else {
            Err(r.error.unwrap())
        }
    }
}

impl Agent {
    /// Send a request without waiting; returns its id.
    pub fn send(&mut self, op: Op) -> u64 {
        self.id += 1;
        let req = Request {
            v: PROTOCOL_VERSION,
            id: self.id,
            op,
        };
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(&encode_line(&req)).unwrap();
        stdin.flush().unwrap();
        self.id
    }
    /// The next response line, whichever request it belongs to.
    pub fn recv(&mut self) -> Response {
        let mut resp = String::new();
        assert!(self.out.read_line(&mut resp).unwrap() > 0, "agent closed");
        serde_json::from_str(&resp).unwrap()
    }
    /// A request and its final response, with the error code on failure.
    pub fn call_code(&mut self, op: Op) -> Result<Reply, (forkd_agent::ErrorCode, String)> {
        let id = self.send(op);
        let r = self.recv();
        assert_eq!(r.id, id);
        match r.into_frame() {
            forkd_agent::Frame::Done(Ok(reply)) => Ok(reply),
            forkd_agent::Frame::Done(Err(e)) => Err((e.code, e.message)),
            forkd_agent::Frame::Event(e) => panic!("unexpected event {e:?}"),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run a shell command in the agent; panic unless it answers with an exec reply.
pub fn sh(a: &mut Agent, script: &str) -> forkd_agent::ExecReply {
    let r = a.call(Op::Exec(forkd_agent::ExecRequest {
        shell: Some(script.into()),
        timeout_ms: Some(30_000),
        ..Default::default()
    }));
    match r {
        Ok(Reply::Exec(x)) => x,
        other => panic!("exec {script:?}: {other:?}"),
    }
}
