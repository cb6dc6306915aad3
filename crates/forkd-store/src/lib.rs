//! Snapshot manifest, local store and pack format.
//!
//! - [`Tag`]: a validated local tag name, safe to use as a directory name.
//! - [`manifest`]: `manifest.toml`, the description of one snapshot (untrusted input when parsed).
//! - [`Store`]: the local store under `$FORKD_HOME` with atomic installs and a store lock.
//! - [`sparse`]: hole-aware file I/O and hashing while streaming.
//! - [`pack`]: the portable `.forkd-snapshot.tar.zst` format.

mod fsutil;
mod lock;
pub mod manifest;
pub mod pack;
pub mod sparse;
mod staging;
mod store;
mod tag;

pub use manifest::{EngineInfo, FileEntry, Manifest, ManifestError};
pub use staging::Staging;
pub use store::{ImageInfo, Overwrite, Snapshot, Store, StoreError};
pub use tag::{Tag, TagError};

/// The version of forkd this library belongs to (written into new manifests).
pub const FORKD_VERSION: &str = env!("CARGO_PKG_VERSION");
