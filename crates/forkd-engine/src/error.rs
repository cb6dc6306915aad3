//! Engine errors: each says what went wrong and, where it can, what to do about it.

use forkd_agent::{ErrorCode, WireError};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "QEMU not found at {0} — install it: apt-get install qemu-system-x86 (or set FORKD_QEMU)"
    )]
    QemuMissing(PathBuf),
    #[error(
        "QEMU {found} at {path} is too old: forkd needs {need} or newer (apt-get install qemu-system-x86 from a newer release)"
    )]
    QemuTooOld {
        path: PathBuf,
        found: String,
        need: String,
    },
    #[error("cannot tell the version of {path}: it printed {output:?}")]
    QemuVersion { path: PathBuf, output: String },
    #[error(
        "this QEMU ({qemu}) has no machine type {machine}, which the snapshot was taken with; \
         use QEMU {snap_qemu} or newer"
    )]
    MachineMismatch {
        machine: String,
        qemu: String,
        snap_qemu: String,
    },
    #[error(
        "the snapshot was taken with QEMU {snap}, but this host has QEMU {host}: a saved machine \
         only restores on the same or a newer QEMU — upgrade qemu-system-x86"
    )]
    QemuOlderThanSnapshot { snap: String, host: String },
    #[error("snapshot file {0} is missing")]
    MissingFile(PathBuf),
    #[error("snapshot is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "memory file {path} holds {actual} bytes but the machine has {expected} bytes of RAM \
         ({mib} MiB); the snapshot is truncated or does not belong to this machine"
    )]
    MemorySize {
        path: PathBuf,
        actual: u64,
        expected: u64,
        mib: u64,
    },
    #[error("{0}")]
    Capacity(Box<Capacity>),
    #[error("KVM was requested but is not usable here: {0}")]
    NoKvm(String),
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("guest agent: {0}")]
    Agent(String),
    /// A request to the guest agent failed (typed: match on the [`AgentError`]).
    #[error("guest agent: {0}")]
    AgentCall(AgentError),
    #[error("the parent VM failed: {msg}{}", tail_suffix(.console))]
    Parent { msg: String, console: String },
    #[error("the warm-up command failed (exit {code:?}): {stderr}")]
    Warmup { code: Option<i32>, stderr: String },
    #[error("interrupted")]
    Interrupted,
    /// The host file system under the child's disk overlay filled up: QEMU stopped the VM
    /// with an I/O error (QMP `BLOCK_IO_ERROR`, `nospace`) instead of letting the guest write.
    #[error(
        "disk full: the host file system holding {dir} has no space left for the child's disk \
         overlay; QEMU paused the VM ({device}: {detail})"
    )]
    DiskFull {
        dir: PathBuf,
        device: String,
        detail: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no running child {0} (see `forkd ps`)")]
    NoSuchChild(String),
    #[error("child {0} is paused: resume it first (forkd resume {0}, or sb.resume())")]
    ChildPaused(String),
    #[error(
        "child {0} is busy: a command is running in it or another snapshot of it is being taken; \
         retry when it is done"
    )]
    ChildBusy(String),
    #[error(
        "image {image} needs its parent {parent} ({digest}), which is not in the local store; \
         pull the branch again from its hub (its parents come with it), or install the parent"
    )]
    ParentMissing {
        image: String,
        parent: String,
        digest: String,
    },
    #[error("branch chain: {0}")]
    Chain(String),
    #[error("network: {0}")]
    Net(String),
    #[error("cannot build the seccomp filter of a lazily served child: {0}")]
    Seccomp(String),
    #[error(
        "host port {port} is already in use; expose the guest port on another host port, or \
         give only the guest port to get a free one"
    )]
    PortTaken { port: u16 },
    #[error(
        "host port {port} can be given to one child only, and {n} were asked for; expose just \
         the guest port to give each child its own host port"
    )]
    FixedPortShared { port: u16, n: usize },
    #[error(
        "image {image} was snapshotted without a network card (device layout {layout}), so \
         its children cannot have a network; rebuild it with this forkd (`forkd build` of its \
         recipe, or `forkd snapshot`), which gives every snapshot a NIC"
    )]
    NoNic { image: String, layout: String },
    #[error(transparent)]
    Store(Box<forkd_store::StoreError>),
}

impl From<forkd_store::StoreError> for EngineError {
    fn from(e: forkd_store::StoreError) -> EngineError {
        EngineError::Store(Box::new(e))
    }
}

impl From<AgentError> for EngineError {
    fn from(e: AgentError) -> EngineError {
        match e {
            AgentError::Interrupted => EngineError::Interrupted,
            e => EngineError::AgentCall(e),
        }
    }
}

impl From<forkd_store::PathError> for EngineError {
    fn from(e: forkd_store::PathError) -> EngineError {
        EngineError::Io {
            what: e.op,
            path: e.path,
            source: e.source,
        }
    }
}

fn tail_suffix(console: &str) -> String {
    if console.trim().is_empty() {
        String::new()
    } else {
        format!(
            "\n--- last lines of the guest console ---\n{}",
            console.trim_end()
        )
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Attach a path and a verb to an io::Error.
pub trait IoCtx<T> {
    fn at(self, what: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoCtx<T> for std::io::Result<T> {
    fn at(self, what: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| EngineError::Io {
            what,
            path: path.into(),
            source,
        })
    }
}

/// Everything that can go wrong talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent answered with an error.
    #[error("{message} ({code})")]
    Guest { code: ErrorCode, message: String },
    /// No answer in time (the request may still complete in the guest).
    #[error("no answer within {0:?} (timed out)")]
    Timeout(Duration),
    /// The connection is closed (the VM went away, or the client was dropped).
    #[error("the connection to the agent is closed")]
    Closed,
    #[error("agent connection: {0}")]
    Io(#[from] std::io::Error),
    /// The agent broke the protocol (an oversized line, a reply of the wrong kind, ...).
    #[error("agent protocol error: {0}")]
    Protocol(String),
    /// The interrupt flag was set while waiting.
    #[error("interrupted")]
    Interrupted,
}

impl AgentError {
    /// Worth retrying (perhaps on a new connection): a timeout, a lost connection, a busy agent.
    pub fn is_transient(&self) -> bool {
        match self {
            AgentError::Timeout(_) | AgentError::Closed | AgentError::Io(_) => true,
            AgentError::Guest { code, .. } => *code == ErrorCode::Busy,
            AgentError::Protocol(_) | AgentError::Interrupted => false,
        }
    }

    /// The guest's error code, for [`AgentError::Guest`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            AgentError::Guest { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<WireError> for AgentError {
    fn from(e: WireError) -> AgentError {
        AgentError::Guest {
            code: e.code,
            message: e.message,
        }
    }
}

/// Why `n` children do not fit: the arithmetic, for the user and for programs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Capacity {
    pub n: usize,
    pub per_child_mib: u64,
    pub qemu_mib: u64,
    pub guest_mib: u64,
    pub need_mib: u64,
    pub available_mib: u64,
    pub max_children: u64,
}

impl std::fmt::Display for Capacity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} children need about {} MiB ({} MiB each: {} MiB QEMU + 1/8 of {} MiB guest RAM), \
             but only {} MiB is available (MemAvailable; forkd uses at most 90 %): at most {} \
             children fit",
            self.n,
            self.need_mib,
            self.per_child_mib,
            self.qemu_mib,
            self.guest_mib,
            self.available_mib,
            self.max_children
        )
    }
}
