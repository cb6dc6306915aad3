//! forkd-agent: the guest side of forkd. Runs inside the VM (often as PID 1 after the initramfs
//! hands over), listens on the virtio-serial port `forkd.agent`, and answers newline-delimited
//! JSON requests (see docs/AGENT-PROTOCOL.md).
//!
//! It must survive being snapshotted and restored into many children: when the host side of the
//! port is not connected, reads return EOF; the agent then waits and reads again, forever.

mod exec;
mod identity;
mod port;
mod reaper;
mod warm;

use forkd_agent::{
    HelloReply, MAX_LINE, Op, PROTOCOL_VERSION, Reply, Request, Response, encode_line,
};
use std::io::Write;

/// Everything the agent remembers between requests.
#[derive(Default)]
struct State {
    instance: Option<String>,
    worker: Option<warm::Worker>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--version") {
        println!(
            "forkd-agent {} (protocol {PROTOCOL_VERSION})",
            forkd_agent::AGENT_VERSION
        );
        return;
    }
    // Before any other thread starts: reap every child (we may be PID 1), see reaper.rs.
    reaper::init();
    // `forkd-agent --stdio` serves one session on stdin/stdout (for testing on a host).
    let stdio = args.get(1).map(String::as_str) == Some("--stdio");
    let mut state = State::default();
    if stdio {
        let stdin = std::io::stdin();
        let mut out = std::io::stdout();
        let mut line = String::new();
        while {
            line.clear();
            std::io::BufRead::read_line(&mut stdin.lock(), &mut line).unwrap_or(0) > 0
        } {
            let resp = handle_line(line.trim_end().as_bytes(), &mut state);
            let _ = out.write_all(&encode_line(&resp));
            let _ = out.flush();
        }
        return;
    }
    eprintln!(
        "forkd-agent {} starting (pid {})",
        forkd_agent::AGENT_VERSION,
        std::process::id()
    );
    let mut port = port::Port::open_forever();
    loop {
        let line = port.read_line();
        let resp = handle_line(&line, &mut state);
        port.write_line(&encode_line(&resp));
    }
}

fn handle_line(line: &[u8], state: &mut State) -> Response {
    if line.len() > MAX_LINE {
        return Response::err(0, format!("request longer than {MAX_LINE} bytes"));
    }
    let req: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            // Try to recover the id so the host can correlate the error.
            let id = serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("id").and_then(|i| i.as_u64()))
                .unwrap_or(0);
            return Response::err(id, format!("bad request: {e}"));
        }
    };
    if req.v != PROTOCOL_VERSION {
        return Response::err(
            req.id,
            format!(
                "protocol version {} not supported (agent speaks {PROTOCOL_VERSION})",
                req.v
            ),
        );
    }
    let id = req.id;
    let result = match req.op {
        Op::Hello => Ok(Reply::Hello(hello(state))),
        Op::Exec(x) => exec::run(&x).map(Reply::Exec),
        Op::Identity(x) => {
            if let Some(i) = &x.instance {
                state.instance = Some(i.clone());
            }
            identity::apply(&x).map(Reply::Identity)
        }
        Op::Warm(x) => warm::start(&x, &mut state.worker).map(Reply::Warm),
        Op::Run(x) => warm::run(&x, &mut state.worker).map(Reply::Run),
    };
    match result {
        Ok(reply) => Response::ok(id, reply),
        Err(e) => Response::err(id, e),
    }
}

fn hello(state: &State) -> HelloReply {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let uptime_s = read("/proc/uptime")
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    HelloReply {
        agent_version: forkd_agent::AGENT_VERSION.to_string(),
        protocol: PROTOCOL_VERSION,
        boot_id: read("/proc/sys/kernel/random/boot_id"),
        hostname: read("/proc/sys/kernel/hostname"),
        uptime_s,
        instance: state.instance.clone(),
        warm: state.worker.is_some(),
    }
}
