//! Request and response types. Kept small and explicit: adding a field is backward compatible
//! (unknown fields are ignored, missing optional ones default); changing meaning bumps
//! [`PROTOCOL_VERSION`].

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of the wire protocol spoken by this build.
pub const PROTOCOL_VERSION: u32 = 1;

/// Name of the virtio-serial port the agent listens on.
pub const PORT_NAME: &str = "forkd.agent";

/// Version of the agent binary (the crate version).
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Longest accepted request line, in bytes; longer lines are answered with an error.
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// One request from the host: `{"v":1,"id":7,"op":"exec",...}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    /// Protocol version the host speaks.
    pub v: u32,
    /// Correlates the response; chosen by the host.
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

/// What the host asks for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Liveness and identity: answered with [`Reply::Hello`].
    Hello,
    /// Run a command and wait for it: answered with [`Reply::Exec`].
    Exec(ExecRequest),
    /// Give this VM its own identity after a fork: answered with [`Reply::Identity`].
    Identity(IdentityRequest),
    /// Start (or replace) the long-lived warm worker: answered with [`Reply::Warm`].
    Warm(WarmRequest),
    /// Send code to the warm worker and wait for its answer: answered with [`Reply::Run`].
    Run(RunRequest),
}

/// Run a program. Exactly one of `argv` and `shell` must be given.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecRequest {
    /// Program and arguments, run directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// A shell command line, run as `/bin/sh -c SHELL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Extra environment variables (added to the agent's environment).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Bytes written to the program's stdin (UTF-8 text), then stdin is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Kill the program after this many milliseconds (default 60 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Working directory (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// New identity for a freshly forked child.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IdentityRequest {
    /// New hostname (also written to /etc/hostname when that file exists and is writable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Fresh entropy from the host, hex-encoded; mixed into the kernel RNG, which is then reseeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_hex: Option<String>,
    /// Host wall-clock time in nanoseconds since the Unix epoch; the guest clock is stepped to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_unix_ns: Option<u64>,
    /// An instance id the host gives this VM; reported by later `hello`s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// Start a warm worker process. `kind` picks a built-in worker (`sh` or `python`); otherwise
/// `argv` names a program that speaks the worker protocol on stdin/stdout.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WarmRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// Code run once in the worker right after it starts (e.g. `import numpy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preload: Option<String>,
}

/// Code for the warm worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunRequest {
    pub code: String,
    /// Give up after this many milliseconds (default 60 000); the worker is then restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// One response line: `{"v":1,"id":7,"ok":true,"reply":{...}}` or `{"v":1,"id":7,"ok":false,"error":"..."}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub v: u32,
    pub id: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<Reply>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(id: u64, reply: Reply) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            id,
            ok: true,
            reply: Some(reply),
            error: None,
        }
    }
    pub fn err(id: u64, error: impl Into<String>) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            id,
            ok: false,
            reply: None,
            error: Some(error.into()),
        }
    }
}

/// The successful result of each [`Op`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    Hello(HelloReply),
    Exec(ExecReply),
    Identity(IdentityReply),
    Warm(WarmReply),
    Run(RunReply),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HelloReply {
    pub agent_version: String,
    pub protocol: u32,
    /// The kernel's boot id (shared by all children of one parent: they come from the same boot).
    pub boot_id: String,
    pub hostname: String,
    /// Seconds since the guest kernel booted (children continue the parent's count).
    pub uptime_s: f64,
    /// The id given by the last `identity` request, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Whether a warm worker is running.
    pub warm: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecReply {
    /// Exit code; `None` when killed by a signal (see `signal`) or by the timeout.
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Output as UTF-8 (invalid bytes replaced by U+FFFD).
    pub stdout: String,
    pub stderr: String,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IdentityReply {
    pub hostname: String,
    /// Bytes of host entropy mixed in.
    pub seeded_bytes: usize,
    /// How far the clock was stepped, in milliseconds (positive: forward).
    pub clock_step_ms: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WarmReply {
    pub pid: u32,
    /// Output of the preload code, if any.
    pub preload_output: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunReply {
    pub output: String,
    pub duration_ms: u64,
}

/// Encode one request as a line (with the trailing newline).
pub fn encode_line<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail (no maps with non-string keys).
    let mut v = serde_json::to_vec(msg).unwrap_or_default();
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_and_shape() {
        let r = Request {
            v: 1,
            id: 3,
            op: Op::Exec(ExecRequest {
                shell: Some("echo hi".into()),
                ..Default::default()
            }),
        };
        let line = encode_line(&r);
        let text = std::str::from_utf8(&line).unwrap();
        assert_eq!(
            text,
            "{\"v\":1,\"id\":3,\"op\":\"exec\",\"shell\":\"echo hi\"}\n"
        );
        let back: Request = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn hello_parses_and_unknown_fields_ignored() {
        let r: Request = serde_json::from_str(r#"{"v":1,"id":9,"op":"hello","extra":1}"#).unwrap();
        assert_eq!(r.op, Op::Hello);
        let bad = serde_json::from_str::<Request>(r#"{"v":1,"id":9,"op":"reboot"}"#);
        assert!(bad.is_err());
    }

    #[test]
    fn response_shapes() {
        let ok = Response::ok(
            1,
            Reply::Run(RunReply {
                output: "2".into(),
                duration_ms: 1,
            }),
        );
        let s = String::from_utf8(encode_line(&ok)).unwrap();
        assert!(s.contains("\"kind\":\"run\""), "{s}");
        let back: Response = serde_json::from_str(s.trim()).unwrap();
        assert_eq!(back, ok);
        let e = Response::err(2, "nope");
        let s = String::from_utf8(encode_line(&e)).unwrap();
        assert_eq!(s, "{\"v\":1,\"id\":2,\"ok\":false,\"error\":\"nope\"}\n");
    }
}
