//! The hub's error type.

use crate::sign::SignError;
use crate::transport::{OpenError, TransportError};

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Reference(#[from] crate::reference::ReferenceError),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("{what} from {hub}")]
    Transport {
        what: String,
        hub: String,
        #[source]
        source: TransportError,
    },
    #[error("{reference} was not found on {hub}")]
    NotFound { reference: String, hub: String },
    #[error("{hub} is not a forkd hub (no forkd-hub.json)")]
    NotAHub { hub: String },
    #[error(
        "{hub} uses hub layout {found}; this forkd understands layout {} — upgrade forkd",
        crate::layout::LAYOUT
    )]
    LayoutTooNew { hub: String, found: u32 },
    #[error("{what} on {hub} is not valid: {msg}")]
    BadDocument {
        what: String,
        hub: String,
        msg: String,
    },
    #[error("{what} is corrupt: expected {expected}, got {actual}")]
    Corrupt {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("signature check failed for {reference}")]
    Signature {
        reference: String,
        #[source]
        source: SignError,
    },
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error("{reference} has a bad engine.json; nothing was installed: {reason}")]
    BadEngine { reference: String, reason: String },
    #[error("this host cannot run {reference}: {reason}")]
    Incompatible { reference: String, reason: String },
    #[error(transparent)]
    Store(#[from] forkd_store::StoreError),
    #[error(transparent)]
    Lock(#[from] forkd_store::PathError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("the pull did not finish within its deadline of {after:?}")]
    Deadline { after: std::time::Duration },
}

impl HubError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HubError {
        let what = what.into();
        move |source| HubError::Io { what, source }
    }
}

pub type Result<T, E = HubError> = std::result::Result<T, E>;
