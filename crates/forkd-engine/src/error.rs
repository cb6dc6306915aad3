//! Engine errors: each says what went wrong and, where it can, what to do about it.

use std::path::PathBuf;

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
    Capacity(crate::memory::Capacity),
    #[error("KVM was requested but is not usable here: {0}")]
    NoKvm(String),
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("guest agent: {0}")]
    Agent(String),
    /// A request to the guest agent failed (typed: match on the [`AgentError`]).
    #[error("guest agent: {0}")]
    AgentCall(crate::mux::AgentError),
    #[error("the parent VM failed: {msg}{}", tail_suffix(.console))]
    Parent { msg: String, console: String },
    #[error("the warm-up command failed (exit {code:?}): {stderr}")]
    Warmup { code: Option<i32>, stderr: String },
    #[error("interrupted")]
    Interrupted,
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no running child {0} (see `forkd ps`)")]
    NoSuchChild(String),
}

impl From<crate::mux::AgentError> for EngineError {
    fn from(e: crate::mux::AgentError) -> EngineError {
        match e {
            crate::mux::AgentError::Interrupted => EngineError::Interrupted,
            e => EngineError::AgentCall(e),
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
