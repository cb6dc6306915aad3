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

/// Longest accepted request line, in bytes; longer lines are answered with an error. The agent
/// never sends a longer response line either.
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// Most raw bytes in one `stdout`/`stderr` event of a streamed `exec`.
pub const STREAM_CHUNK: usize = 64 * 1024;

/// Most decoded bytes in one `file_write` or `file_read`.
pub const MAX_FILE_CHUNK: usize = 1024 * 1024;

/// Most requests the agent works on at once; beyond that it answers [`ErrorCode::Busy`].
pub const MAX_IN_FLIGHT: usize = 64;

/// Most upload handles open at once.
pub const MAX_OPEN_FILES: usize = 64;

/// Most entries one `file_list` returns (then `truncated` is set).
pub const MAX_LIST_ENTRIES: usize = 100_000;

/// Most raw bytes of stdout (and of stderr) a non-streamed `exec` returns (then `truncated`).
pub const MAX_EXEC_OUTPUT: usize = 4 * 1024 * 1024;

/// Feature names an agent reports in [`HelloReply::features`].
pub mod feature {
    /// Requests are handled concurrently; responses may come out of order.
    pub const CONCURRENT: &str = "concurrent";
    /// `exec` with `stream: true` sends output events; `stdin_b64` is accepted.
    pub const EXEC_STREAM: &str = "exec_stream";
    /// The `signal` op.
    pub const SIGNAL: &str = "signal";
    /// The file ops (`file_*`, `mkdir`, `remove`).
    pub const FILES: &str = "files";
    /// The `zero_free` op.
    pub const ZERO_FREE: &str = "zero_free";
    /// Everything this build supports.
    pub const ALL: &[&str] = &[CONCURRENT, EXEC_STREAM, SIGNAL, FILES, ZERO_FREE];
}

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
    /// Signal the process group of a running `exec`: answered with [`Reply::Signal`].
    Signal(SignalRequest),
    /// Start an upload to a temporary file next to `path`: answered with [`Reply::FileHandle`].
    FileOpenWrite {
        path: String,
        /// Permission bits of the new file (default 0o644).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
    },
    /// Append base64 `data` (at most [`MAX_FILE_CHUNK`] decoded bytes) to an upload:
    /// answered with [`Reply::FileWritten`].
    FileWrite { handle: u64, data: String },
    /// Finish an upload: `commit` renames it over its path (after fsync), otherwise it is
    /// deleted. Answered with [`Reply::FileClosed`].
    FileCloseWrite { handle: u64, commit: bool },
    /// Read at most `len` ([`MAX_FILE_CHUNK`]) bytes at `offset`: answered with [`Reply::FileData`].
    FileRead {
        path: String,
        #[serde(default)]
        offset: u64,
        len: u64,
    },
    /// The entries of a directory (not following symlinks): answered with [`Reply::FileList`].
    FileList { path: String },
    /// One path's metadata (not following symlinks): answered with [`Reply::FileStat`].
    FileStat { path: String },
    /// Create a directory (and its parents with `parents`): answered with [`Reply::Done`].
    Mkdir {
        path: String,
        #[serde(default)]
        parents: bool,
    },
    /// Remove a file, symlink or empty directory (any directory with `recursive`): answered
    /// with [`Reply::Done`].
    Remove {
        path: String,
        #[serde(default)]
        recursive: bool,
    },
    /// Zero the guest's free memory (taken and given back, leaving a margin), so that a saved
    /// parent holds no stale bytes: answered with [`Reply::ZeroFree`]. Sent by `forkd build`
    /// before the parent is saved.
    ZeroFree,
}

/// Send `signal` to the process group of the running `exec` whose command has pid `pid`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SignalRequest {
    pub pid: u32,
    pub signal: i32,
}

/// The wire names of every [`Op`] this build knows.
pub const OPS: &[&str] = &[
    "hello",
    "exec",
    "identity",
    "warm",
    "run",
    "signal",
    "file_open_write",
    "file_write",
    "file_close_write",
    "file_read",
    "file_list",
    "file_stat",
    "mkdir",
    "remove",
    "zero_free",
];

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
    /// Binary stdin, base64-encoded (instead of `stdin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_b64: Option<String>,
    /// Send output as [`Event`]s while the command runs (the final reply's stdout/stderr are
    /// then empty).
    #[serde(default, skip_serializing_if = "is_false")]
    pub stream: bool,
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
    /// Bring the NIC up with this address (a child forked with a network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetSetup>,
}

/// The guest side of every child's network (forkd-net's stack answers for the gateway and the
/// name server). The agent configures it when it starts in a parent, so that children inherit
/// a link that only needs its carrier; the same values come in [`IdentityRequest::net`].
pub mod guest_net {
    use std::net::Ipv4Addr;
    /// The guest's address; the same in every child, each alone on its own link.
    pub const ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
    pub const PREFIX: u8 = 24;
    /// The gateway, which also stands for the host's loopback.
    pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
    /// The only name server (it filters answers).
    pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
}

impl NetSetup {
    /// [`guest_net`] as a request.
    pub fn standard() -> NetSetup {
        NetSetup {
            addr: guest_net::ADDR.to_string(),
            prefix: guest_net::PREFIX,
            gateway: guest_net::GATEWAY.to_string(),
            dns: guest_net::DNS.to_string(),
        }
    }
}

/// The guest side of a child's network: one IPv4 address on the first NIC, a default route
/// and a resolver. Every child gets the same values; each is alone on its own link.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NetSetup {
    /// Dotted IPv4 address, e.g. `10.0.2.15`.
    pub addr: String,
    /// Prefix length of the link's network (e.g. 24).
    pub prefix: u8,
    /// The default gateway.
    pub gateway: String,
    /// The only name server the guest is given (`/etc/resolv.conf`).
    pub dns: String,
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

fn is_false(b: &bool) -> bool {
    !*b
}

/// One response line: `{"v":1,"id":7,"ok":true,"reply":{...}}`,
/// `{"v":1,"id":7,"ok":false,"error":"...","code":"not_found"}`, or an event frame of a
/// streamed request `{"v":1,"id":7,"ok":true,"event":{...}}` (more frames follow).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub v: u32,
    pub id: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<Reply>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Kind of error (agents before error codes send none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    /// Progress of a streamed request; the final response has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<Event>,
}

impl Response {
    pub fn ok(id: u64, reply: Reply) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            id,
            ok: true,
            reply: Some(reply),
            error: None,
            code: None,
            event: None,
        }
    }
    /// An error of kind [`ErrorCode::Other`].
    pub fn err(id: u64, error: impl Into<String>) -> Self {
        Self::err_code(id, ErrorCode::Other, error)
    }
    pub fn err_code(id: u64, code: ErrorCode, error: impl Into<String>) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            id,
            ok: false,
            reply: None,
            error: Some(error.into()),
            code: Some(code),
            event: None,
        }
    }
    /// An event frame of a streamed request.
    pub fn event(id: u64, event: Event) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            id,
            ok: true,
            reply: None,
            error: None,
            code: None,
            event: Some(event),
        }
    }
    /// What this frame means to the request it answers: an event (more frames follow) or
    /// the final result.
    pub fn into_frame(self) -> Frame {
        if let Some(e) = self.event {
            return Frame::Event(e);
        }
        Frame::Done(match (self.ok, self.reply, self.error) {
            (true, Some(r), _) => Ok(r),
            (_, _, Some(message)) => Err(WireError {
                code: self.code.unwrap_or(ErrorCode::Other),
                message,
            }),
            (true, None, None) => Err(WireError {
                code: ErrorCode::Other,
                message: "malformed response: ok without a reply or an event".into(),
            }),
            (false, _, None) => Err(WireError {
                code: self.code.unwrap_or(ErrorCode::Other),
                message: "error without a message".into(),
            }),
        })
    }
}

/// A response line seen from the request it answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Progress; the request is still running.
    Event(Event),
    /// The final answer; nothing more comes for this id.
    Done(Result<Reply, WireError>),
}

/// An error answer: its kind and the agent's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code.as_str())
    }
}

/// What kind of error a request ran into. Unknown codes (from a newer agent) read as `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadRequest,
    NotFound,
    Exists,
    NotADirectory,
    IsADirectory,
    NoSpace,
    PermissionDenied,
    Timeout,
    Busy,
    Unsupported,
    Io,
    Other,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::BadRequest,
        ErrorCode::NotFound,
        ErrorCode::Exists,
        ErrorCode::NotADirectory,
        ErrorCode::IsADirectory,
        ErrorCode::NoSpace,
        ErrorCode::PermissionDenied,
        ErrorCode::Timeout,
        ErrorCode::Busy,
        ErrorCode::Unsupported,
        ErrorCode::Io,
        ErrorCode::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Exists => "exists",
            ErrorCode::NotADirectory => "not_a_directory",
            ErrorCode::IsADirectory => "is_a_directory",
            ErrorCode::NoSpace => "no_space",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Busy => "busy",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Io => "io",
            ErrorCode::Other => "other",
        }
    }

    /// The code for a wire name; unknown names are [`ErrorCode::Other`].
    pub fn parse(s: &str) -> ErrorCode {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .unwrap_or(ErrorCode::Other)
    }

    /// The code for an OS error number.
    pub fn from_errno(errno: i32) -> ErrorCode {
        match errno {
            libc::ENOENT | libc::ESRCH => ErrorCode::NotFound,
            libc::EEXIST => ErrorCode::Exists,
            libc::ENOTDIR => ErrorCode::NotADirectory,
            libc::EISDIR => ErrorCode::IsADirectory,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ErrorCode::NoSpace,
            libc::EACCES | libc::EPERM | libc::EROFS => ErrorCode::PermissionDenied,
            libc::ETIMEDOUT => ErrorCode::Timeout,
            libc::EBUSY | libc::EAGAIN | libc::EMFILE | libc::ENFILE => ErrorCode::Busy,
            libc::EINVAL | libc::ENAMETOOLONG | libc::ELOOP => ErrorCode::BadRequest,
            libc::ENOSYS | libc::EOPNOTSUPP | libc::EXDEV => ErrorCode::Unsupported,
            _ => ErrorCode::Io,
        }
    }

    /// The code for an I/O error (by errno when it has one).
    pub fn from_io(e: &std::io::Error) -> ErrorCode {
        match e.raw_os_error() {
            Some(n) => Self::from_errno(n),
            None => match e.kind() {
                std::io::ErrorKind::NotFound => ErrorCode::NotFound,
                std::io::ErrorKind::AlreadyExists => ErrorCode::Exists,
                std::io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
                std::io::ErrorKind::TimedOut => ErrorCode::Timeout,
                std::io::ErrorKind::InvalidInput => ErrorCode::BadRequest,
                std::io::ErrorKind::StorageFull => ErrorCode::NoSpace,
                _ => ErrorCode::Io,
            },
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(ErrorCode::parse(&s))
    }
}

/// Progress of a streamed `exec`, sent as `{"v":1,"id":7,"ok":true,"event":{...}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// The command started as `pid` (also its process group: see [`Op::Signal`]).
    Started {
        pid: u32,
    },
    /// Output bytes, base64 (at most [`STREAM_CHUNK`] raw bytes).
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
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
    Signal,
    FileHandle {
        handle: u64,
    },
    /// Bytes written to the upload so far.
    FileWritten {
        size: u64,
    },
    /// The upload is committed at `path` (or discarded); `size` bytes were written.
    FileClosed {
        path: String,
        size: u64,
    },
    /// `data` is base64; `eof` when the read reached the end; `size` is the file's size.
    FileData {
        data: String,
        eof: bool,
        size: u64,
    },
    FileList {
        entries: Vec<FileEntry>,
        /// More entries exist than were returned.
        #[serde(default, skip_serializing_if = "is_false")]
        truncated: bool,
    },
    FileStat {
        entry: FileEntry,
    },
    Done,
    /// Bytes of free memory the agent took (zeroed) and gave back.
    ZeroFree {
        zeroed: u64,
    },
}

/// Metadata of one path (from `lstat`: a symlink is reported as itself).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub name: String,
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: i64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
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
    /// What this agent supports beyond the original protocol (see [`feature`]); empty from
    /// agents that predate it.
    #[serde(default)]
    pub features: Vec<String>,
}

impl HelloReply {
    pub fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecReply {
    /// Exit code; `None` when killed by a signal (see `signal`) or by the timeout.
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Output as UTF-8 (invalid bytes replaced by U+FFFD); empty when streamed.
    pub stdout: String,
    pub stderr: String,
    pub duration_ms: u64,
    /// Output beyond [`MAX_EXEC_OUTPUT`] bytes per stream was dropped (use `stream`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub truncated: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IdentityReply {
    pub hostname: String,
    /// Bytes of host entropy mixed in.
    pub seeded_bytes: usize,
    /// How far the clock was stepped, in milliseconds (positive: forward).
    pub clock_step_ms: i64,
    /// The interface that was brought up, when a network was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_iface: Option<String>,
    /// TCP connections inherited from the parent (not on loopback) that were reset; `None`
    /// when the guest kernel cannot say (no sock_diag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_reset: Option<usize>,
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
        assert_eq!(
            s,
            "{\"v\":1,\"id\":2,\"ok\":false,\"error\":\"nope\",\"code\":\"other\"}\n"
        );
        // An old agent's error (no code) still reads, as `other`.
        let old: Response =
            serde_json::from_str(r#"{"v":1,"id":2,"ok":false,"error":"nope"}"#).unwrap();
        assert_eq!(
            old.into_frame(),
            Frame::Done(Err(WireError {
                code: ErrorCode::Other,
                message: "nope".into()
            }))
        );
    }

    #[test]
    fn error_codes_roundtrip_and_unknown_is_other() {
        for c in ErrorCode::ALL {
            let s = serde_json::to_string(&c).unwrap();
            assert_eq!(s, format!("\"{}\"", c.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&s).unwrap(), c);
        }
        assert_eq!(
            serde_json::from_str::<ErrorCode>("\"brand_new\"").unwrap(),
            ErrorCode::Other
        );
        let r: Response =
            serde_json::from_str(r#"{"v":1,"id":3,"ok":false,"error":"full","code":"no_space"}"#)
                .unwrap();
        assert_eq!(r.code, Some(ErrorCode::NoSpace));
    }

    #[test]
    fn errno_mapping() {
        let cases = [
            (libc::ENOSPC, ErrorCode::NoSpace),
            (libc::EDQUOT, ErrorCode::NoSpace),
            (libc::ENOENT, ErrorCode::NotFound),
            (libc::EEXIST, ErrorCode::Exists),
            (libc::ENOTDIR, ErrorCode::NotADirectory),
            (libc::EISDIR, ErrorCode::IsADirectory),
            (libc::EACCES, ErrorCode::PermissionDenied),
            (libc::EPERM, ErrorCode::PermissionDenied),
            (libc::EROFS, ErrorCode::PermissionDenied),
            (libc::ETIMEDOUT, ErrorCode::Timeout),
            (libc::EINVAL, ErrorCode::BadRequest),
            (libc::ENOSYS, ErrorCode::Unsupported),
            (libc::EIO, ErrorCode::Io),
        ];
        for (errno, code) in cases {
            assert_eq!(ErrorCode::from_errno(errno), code, "errno {errno}");
            let e = std::io::Error::from_raw_os_error(errno);
            assert_eq!(ErrorCode::from_io(&e), code);
        }
    }

    #[test]
    fn events_and_new_ops_shapes() {
        let e = Response::event(7, Event::Started { pid: 321 });
        let s = String::from_utf8(encode_line(&e)).unwrap();
        assert_eq!(
            s,
            "{\"v\":1,\"id\":7,\"ok\":true,\"event\":{\"kind\":\"started\",\"pid\":321}}\n"
        );
        let back: Response = serde_json::from_str(s.trim()).unwrap();
        assert_eq!(back.into_frame(), Frame::Event(Event::Started { pid: 321 }));
        let r: Request =
            serde_json::from_str(r#"{"v":1,"id":1,"op":"signal","pid":321,"signal":15}"#).unwrap();
        assert_eq!(
            r.op,
            Op::Signal(SignalRequest {
                pid: 321,
                signal: 15
            })
        );
        let r: Request =
            serde_json::from_str(r#"{"v":1,"id":1,"op":"file_open_write","path":"/x"}"#).unwrap();
        assert_eq!(
            r.op,
            Op::FileOpenWrite {
                path: "/x".into(),
                mode: None
            }
        );
        let s = String::from_utf8(encode_line(&Response::ok(1, Reply::Signal))).unwrap();
        assert!(s.contains("\"reply\":{\"kind\":\"signal\"}"), "{s}");
        // A hello from an agent without features.
        let h: HelloReply = serde_json::from_str(
            r#"{"agent_version":"0.1.0","protocol":1,"boot_id":"b","hostname":"h","uptime_s":1.0,"warm":false}"#,
        )
        .unwrap();
        assert!(h.features.is_empty() && !h.has(feature::FILES));
    }
}
