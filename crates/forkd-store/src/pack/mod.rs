//! The portable pack format v1: `.forkd-snapshot.tar.zst` (spec: docs/PACK-FORMAT.md).
//!
//! zstd (one or more concatenated frames) holding a GNU tar archive: `manifest.toml` first, then every file the
//! manifest lists, exactly once, as regular or GNU sparse entries. [`pack`] writes one from an
//! installed image; [`unpack`] reads one (untrusted) into the store.

mod once;
mod read;
mod tarfmt;
mod write;

use std::io;

pub use read::{ImageCheck, UnpackOptions, unpack, unpack_from_reader};
pub use write::{PackOptions, PackStats, pack, pack_to_writer};

use crate::fsutil::PathError;
use crate::manifest::ManifestError;
use crate::store::StoreError;
use crate::tag::TagError;

/// The conventional file suffix of a pack.
pub const PACK_SUFFIX: &str = ".forkd-snapshot.tar.zst";

/// Receives progress in logical (uncompressed, holes included) bytes. Keep reporting (bars,
/// logs) outside the library: the CLI implements this with indicatif.
pub trait Progress: Sync {
    /// The total number of logical bytes, once known.
    fn start(&self, _total: u64) {}
    /// `bytes` more logical bytes are done.
    fn advance(&self, _bytes: u64) {}
}

/// A [`Progress`] that reports nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Io(#[from] PathError),
    #[error("the pack's manifest is unusable")]
    Manifest(#[from] ManifestError),
    #[error("the pack's name {name:?} cannot be used as a local tag; choose one with --tag")]
    NameNotATag {
        name: String,
        #[source]
        source: TagError,
    },
    #[error("invalid pack: {0}")]
    Invalid(String),
    #[error(
        "`{tag}` is a branch of {parent}: a pack holds one whole image, and a branch holds only its changes, so forkd does not pack branches"
    )]
    Branch { tag: String, parent: String },
    #[error(
        "the pack holds a branch of {parent_tag} ({digest}), which is not in the local store: a branch cannot be installed without its parent"
    )]
    MissingParent { parent_tag: String, digest: String },
    #[error("{0}")]
    Image(String),
    #[error("invalid pack: it is truncated or corrupt ({0})")]
    Truncated(io::Error),
    #[error("cannot read the pack: {0}")]
    Read(io::Error),
    #[error("cannot write the pack: {0}")]
    Write(io::Error),
    #[error(
        "{name} of image `{tag}` is corrupt: its sha256 is {actual} but the manifest says {expected}"
    )]
    Corrupt {
        tag: String,
        name: String,
        expected: String,
        actual: String,
    },
}

pub(crate) fn invalid(msg: impl Into<String>) -> PackError {
    PackError::Invalid(msg.into())
}

/// Classify an error from the (decompressing) input stream.
pub(crate) fn read_error(e: io::Error) -> PackError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData | io::ErrorKind::Other => {
            PackError::Truncated(e)
        }
        _ => PackError::Read(e),
    }
}
