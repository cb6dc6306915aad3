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
    #[error("{hub} uses hub layout {found}; this forkd understands layout {knows} — upgrade forkd")]
    LayoutTooNew { hub: String, found: u32, knows: u32 },
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
    /// A lazy pull was abandoned by its caller before it ended (what was verified is kept).
    #[error("the download was abandoned: {0}")]
    Abandoned(String),
    /// A push of a branch whose parent is not installed here.
    #[error(
        "`{tag}` is a branch of {parent_tag} ({digest}), which is not in the local store: a branch cannot be pushed without its parent"
    )]
    ParentNotLocal {
        tag: String,
        parent_tag: String,
        digest: String,
    },
    /// A branch's chain of parents cannot be pulled (or pushed) as it is.
    #[error("{reference}: {problem}")]
    Chain {
        reference: String,
        problem: ChainProblem,
    },
}

/// What is wrong with a chain of parents.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChainProblem {
    #[error(
        "it is a branch of {parent_tag} ({digest}), which is not in the local store, and the hub names no parent for it"
    )]
    NoParent { parent_tag: String, digest: String },
    #[error(
        "its parent {parent} ({parent_tag}, {digest}) is neither in the local store nor on the hub"
    )]
    ParentNotOnHub {
        parent: String,
        parent_tag: String,
        digest: String,
    },
    #[error(
        "parent digest mismatch: the hub's {parent} holds the image {actual}, but the branch was made from {expected}; refusing it"
    )]
    DigestMismatch {
        parent: String,
        expected: String,
        actual: String,
    },
    #[error("its chain of parents loops back to {at} (a cycle); refusing it")]
    Cycle { at: String },
    #[error("its chain of parents is longer than {max} images; refusing it")]
    TooDeep { max: usize },
    #[error("the local tag `{tag}` holds its parent, which the branch would replace")]
    ReplacesParent { tag: String },
}

impl HubError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HubError {
        let what = what.into();
        move |source| HubError::Io { what, source }
    }
}

pub type Result<T, E = HubError> = std::result::Result<T, E>;
