//! Errors of the sandbox API. Front ends map [`SandboxError::kind`] to what they show (an HTTP
//! status, an exit code); they never look at the text.

use forkd_engine::mux::AgentError;
use forkd_engine::{Capacity, EngineError};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("no running child {0}")]
    NoSuchSandbox(String),
    #[error("no command {command} in sandbox {sandbox}")]
    NoSuchCommand { sandbox: String, command: String },
    #[error("no image `{0}` in the local store")]
    NoSuchImage(String),
    #[error("{field}: {reason}")]
    BadRequest { field: &'static str, reason: String },
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    #[error("sandbox {0} is paused")]
    Paused(String),
    #[error("sandbox {0} has stopped")]
    Stopped(String),
    #[error("sandbox {0} is busy: a command runs in it, or another snapshot of it is being taken")]
    Busy(String),
    #[error("{0}")]
    Capacity(Box<Capacity>),
    #[error("the guest refused: {message}")]
    Guest {
        code: forkd_agent::ErrorCode,
        message: String,
    },
    #[error("image {image} has an agent too old for this call (it lacks `{feature}`)")]
    OldAgent {
        image: String,
        feature: &'static str,
    },
    #[error("the guest did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the command is still running after {0:?}")]
    StillRunning(Duration),
    #[error("the guest agent: {0}")]
    Agent(AgentError),
    #[error(transparent)]
    Engine(Box<EngineError>),
    #[error(transparent)]
    Store(#[from] forkd_store::StoreError),
    #[error(transparent)]
    Image(Box<forkd_engine::image::ImageError>),
    #[error("cannot pull {reference}")]
    Pull {
        reference: String,
        #[source]
        source: Box<forkd_hub::HubError>,
    },
    #[error("cannot serve {reference} while it downloads")]
    Lazy {
        reference: String,
        #[source]
        source: Box<forkd_lazyfs::LazyFsError>,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What kind of failure, for front ends (HTTP status, exit code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    BadRequest,
    Conflict,
    Capacity,
    Guest,
    Timeout,
    Internal,
}

impl SandboxError {
    pub fn kind(&self) -> ErrorKind {
        use SandboxError::*;
        match self {
            NoSuchSandbox(_) | NoSuchCommand { .. } | NoSuchImage(_) => ErrorKind::NotFound,
            Store(forkd_store::StoreError::NotFound(_)) => ErrorKind::NotFound,
            BadRequest { .. } | Network(_) => ErrorKind::BadRequest,
            Engine(e)
                if matches!(
                    **e,
                    EngineError::NoNic { .. } | EngineError::FixedPortShared { .. }
                ) =>
            {
                ErrorKind::BadRequest
            }
            Engine(e) if matches!(**e, EngineError::PortTaken { .. }) => ErrorKind::Conflict,
            Paused(_) | Stopped(_) | Busy(_) | OldAgent { .. } => ErrorKind::Conflict,
            Image(e)
                if matches!(
                    **e,
                    forkd_engine::image::ImageError::Store(forkd_store::StoreError::Exists(_))
                ) =>
            {
                ErrorKind::Conflict
            }
            Image(e)
                if matches!(
                    **e,
                    forkd_engine::image::ImageError::Engine(EngineError::ParentMissing { .. })
                ) =>
            {
                ErrorKind::NotFound
            }
            Capacity(_) => ErrorKind::Capacity,
            Guest { .. } => ErrorKind::Guest,
            Timeout(_) | StillRunning(_) => ErrorKind::Timeout,
            Agent(AgentError::Timeout(_)) => ErrorKind::Timeout,
            Pull { source, .. } if matches!(**source, forkd_hub::HubError::NotFound { .. }) => {
                ErrorKind::NotFound
            }
            _ => ErrorKind::Internal,
        }
    }

    /// The guest's own error code (`no_space`, `not_found`, …) when the guest refused.
    pub fn guest_code(&self) -> Option<forkd_agent::ErrorCode> {
        match self {
            SandboxError::Guest { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The arithmetic, when children did not fit.
    pub fn capacity(&self) -> Option<&Capacity> {
        match self {
            SandboxError::Capacity(c) => Some(c),
            _ => None,
        }
    }

    /// What the user can do about it, when we know.
    pub fn hint(&self) -> Option<String> {
        use SandboxError::*;
        Some(match self {
            NoSuchSandbox(_) => "list the sandboxes: GET /v1/sandboxes (forkd ps)".into(),
            NoSuchImage(t) => format!(
                "pull it (`forkd pull OWNER/{t}`, or pass the hub reference OWNER/{t} as the image), \
                 or build it (`forkd build recipes/{t}`); `forkd images list` shows what is local"
            ),
            Paused(id) => format!("resume it first: POST /v1/sandboxes/{id}/resume"),
            Busy(_) => "wait for its commands to finish (or kill them), then retry".into(),
            OldAgent { image, .. } => format!(
                "rebuild the image with this forkd (`forkd build recipes/{image}`, or `forkd build-tiny` for tiny) \
                 or pull a newer version"
            ),
            Capacity(c) => format!(
                "ask for at most {} children, or stop some sandboxes first",
                c.max_children
            ),
            Guest {
                code: forkd_agent::ErrorCode::NoSpace,
                ..
            } => "the sandbox's disk is full: remove files in it, or use an image with a larger rootfs".into(),
            Agent(AgentError::Closed) => {
                "the sandbox's VM may have exited; GET /v1/sandboxes/{id} shows its state".into()
            }
            _ => return None,
        })
    }
}

impl From<EngineError> for SandboxError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Capacity(c) => SandboxError::Capacity(c),
            EngineError::NoSuchChild(id) => SandboxError::NoSuchSandbox(id),
            e => SandboxError::Engine(Box::new(e)),
        }
    }
}

impl From<AgentError> for SandboxError {
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::Guest { code, message } => SandboxError::Guest { code, message },
            AgentError::Timeout(d) => SandboxError::Timeout(d),
            e => SandboxError::Agent(e),
        }
    }
}

pub type Result<T, E = SandboxError> = std::result::Result<T, E>;
