//! The wire types of the REST API (docs/API.md) and its error body. They describe the OpenAPI
//! document too: each derives `ToSchema`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use forkd_sandbox::{ErrorKind, SandboxError, SandboxInfo};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the daemon answers.
    pub status: String,
    pub version: String,
    pub sandboxes: usize,
    pub uptime_s: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Image {
    pub tag: String,
    pub name: String,
    pub version: String,
    pub memory_mib: u64,
    /// Sum of the files' logical sizes.
    pub size_bytes: u64,
    /// Bytes allocated on disk.
    pub disk_bytes: u64,
    pub created: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImageList {
    pub images: Vec<Image>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    /// `OWNER/NAME[:VERSION]`
    #[serde(rename = "ref")]
    pub reference: String,
    /// Hub URL (default: the daemon's `--hub`, else `$FORKD_HUB`, else the embedded hub).
    #[serde(default)]
    pub hub: Option<String>,
    /// Extra minisign public keys to trust (key text).
    #[serde(default)]
    pub trust: Vec<String>,
    #[serde(default)]
    pub insecure: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The new image's tag (`[a-z0-9][a-z0-9._-]*`).
    pub tag: String,
    /// Replace an existing image with that tag.
    #[serde(default)]
    pub force: bool,
}

/// A branch: a running sandbox saved as an image that holds only what changed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Branch {
    /// The new image's tag; create sandboxes from it as from any image.
    pub tag: String,
    /// The image the sandbox was forked from (the branch's parent).
    pub parent: String,
    /// The branch's content digest (`sha256:…`).
    pub digest: String,
    /// How long the sandbox was paused while its state was read.
    pub pause_ms: u64,
    /// Guest memory pages the sandbox had written, and of those the pages that differ from
    /// the parent's (what the branch stores).
    pub dirty_pages: u64,
    pub own_pages: u64,
    /// Bytes of disk changes.
    pub disk_bytes: u64,
    pub total_ms: u64,
}

impl From<forkd_engine::image::Branched> for Branch {
    fn from(b: forkd_engine::image::Branched) -> Self {
        Branch {
            tag: b.snapshot.tag.to_string(),
            parent: b.parent.to_string(),
            digest: b.snapshot.manifest.digest(),
            pause_ms: b.output.pause_ms,
            dirty_pages: b.output.dirty_pages,
            own_pages: b.output.own_pages,
            disk_bytes: b.output.disk_bytes,
            total_ms: b.output.total_ms,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Sandbox {
    pub id: String,
    pub image: String,
    /// `running`, `paused` or `stopped`.
    pub state: String,
    pub hostname: String,
    pub pid: u32,
    /// RFC 3339.
    pub created_at: String,
    pub expires_at: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    pub memory_mib: u64,
    pub restored_ms: Option<u64>,
    pub ready_ms: Option<u64>,
    /// The sandbox has a network (created with `network`).
    pub net: bool,
    /// Guest ports reachable on the host's 127.0.0.1 (`network.expose`).
    pub ports: Vec<PortMapping>,
}

/// A guest port and the host port (on 127.0.0.1) that reaches it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct PortMapping {
    pub guest: u16,
    pub host: u16,
}

fn rfc3339(unix: u64) -> String {
    jiff::Timestamp::from_second(unix as i64)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

impl From<SandboxInfo> for Sandbox {
    fn from(s: SandboxInfo) -> Self {
        Sandbox {
            id: s.id,
            image: s.image,
            state: serde_json::to_value(s.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            hostname: s.hostname,
            pid: s.pid,
            created_at: rfc3339(s.created_unix),
            expires_at: s.expires_unix.map(rfc3339),
            labels: s.labels,
            env: s.env,
            memory_mib: s.memory_mib,
            restored_ms: s.restored_ms,
            ready_ms: s.ready_ms,
            net: s.net,
            ports: s
                .ports
                .iter()
                .map(|p| PortMapping {
                    guest: p.guest,
                    host: p.host,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
}

fn one() -> usize {
    1
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxes {
    /// A local tag, or a hub reference `OWNER/NAME[:VERSION]` (pulled when missing).
    pub image: String,
    #[serde(default = "one")]
    pub count: usize,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub ttl_s: Option<u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Give each sandbox a network; without it a sandbox has none. Egress is denied except
    /// what `allow` lists.
    #[serde(default)]
    pub network: Option<forkd_sandbox::Network>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChildResult {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Sandbox>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreateResult {
    pub image: String,
    pub requested: usize,
    pub created: usize,
    pub wall_ms: u64,
    pub results: Vec<ChildResult>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandBody {
    /// A shell line, run with `/bin/sh -c`.
    #[serde(default)]
    pub cmd: Option<String>,
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// stdin as text.
    #[serde(default)]
    pub stdin: Option<String>,
    /// stdin as base64 bytes.
    #[serde(default)]
    pub stdin_data: Option<String>,
    /// Seconds; 0 means no limit for a background command. Default 60.
    #[serde(default)]
    pub timeout_s: Option<f64>,
    #[serde(default)]
    pub background: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CommandStarted {
    pub command_id: String,
    pub pid: Option<u32>,
}

pub use forkd_sandbox::CommandStatus;

#[derive(Debug, Serialize, ToSchema)]
pub struct CommandList {
    pub commands: Vec<CommandStatus>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CommandOutput {
    /// base64
    pub stdout: String,
    /// base64
    pub stderr: String,
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
    pub running: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    /// A signal number (15) or name (`TERM`, `SIGKILL`).
    pub signal: serde_json::Value,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct WaitQuery {
    /// Seconds to wait (default 30).
    pub timeout_s: Option<f64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunBody {
    pub code: String,
    #[serde(default)]
    pub timeout_s: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunResult {
    pub output: String,
    pub duration_ms: u64,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct PathQuery {
    /// An absolute guest path.
    pub path: String,
    /// Octal file mode for uploads (default 0644).
    pub mode: Option<String>,
    /// mkdir: create missing parents.
    #[serde(default)]
    pub parents: bool,
    /// remove: remove a directory and everything in it.
    #[serde(default)]
    pub recursive: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct LabelQuery {
    /// `k=v`; repeat for more (all must match).
    pub label: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Written {
    pub path: String,
    pub size: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FileEntry {
    pub name: String,
    pub path: String,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    pub mtime: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FileList {
    pub entries: Vec<FileEntry>,
    /// The directory has more entries than one listing returns.
    pub truncated: bool,
}

/// The body of every error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, for programs: `bad_request`, `unauthorized`, `not_found`, `conflict`,
    /// `too_large`, `capacity`, `guest`, `timeout`, `internal`.
    pub code: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// The guest's own code when `code` is `guest` (`no_space`, `not_found`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_code: Option<String>,
    /// For `capacity`: the arithmetic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<serde_json::Value>,
}

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub detail: Box<ErrorDetail>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            detail: Box::new(ErrorDetail {
                code: code.to_string(),
                message: message.into(),
                hint: None,
                guest_code: None,
                capacity: None,
            }),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn hint(mut self, h: impl Into<String>) -> ApiError {
        self.detail.hint = Some(h.into());
        self
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl From<SandboxError> for ApiError {
    fn from(e: SandboxError) -> Self {
        let (status, code) = match e.kind() {
            ErrorKind::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ErrorKind::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
            ErrorKind::Conflict => (StatusCode::CONFLICT, "conflict"),
            ErrorKind::Capacity => (StatusCode::UNPROCESSABLE_ENTITY, "capacity"),
            ErrorKind::Guest => (StatusCode::BAD_GATEWAY, "guest"),
            ErrorKind::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let mut a = ApiError::new(status, code, error_chain(&e));
        a.detail.hint = e.hint();
        a.detail.guest_code = e.guest_code().and_then(|c| {
            serde_json::to_value(c)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
        });
        a.detail.capacity = e.capacity().and_then(|c| serde_json::to_value(c).ok());
        a
    }
}

/// An error and its causes on one line: `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(ErrorBody {
                error: *self.detail,
            }),
        )
            .into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
