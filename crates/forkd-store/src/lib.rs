//! Snapshot manifest, local store and pack format.
//!
//! - [`Tag`]: a validated local tag name, safe to use as a directory name.
//! - [`manifest`]: `manifest.toml`, the description of one snapshot (untrusted input when parsed).
//! - [`Home`]: the `$FORKD_HOME` layout, the one owner of every path in it.
//! - [`Store`]: the local store under `$FORKD_HOME` with atomic installs and a store lock.
//! - [`lock`]: the advisory file lock every part of forkd takes.
//! - [`sparse`]: hole-aware file I/O and hashing while streaming.
//! - [`pack`]: the portable `.forkd-snapshot.tar.zst` format.
//!
//! Installing a snapshot (what the engine and the hub do):
//!
//! ```no_run
//! use std::fs::File;
//! use forkd_store::{EngineInfo, FileEntry, Manifest, Overwrite, Store, Tag, sparse};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Store::open_default()?;
//! let staging = store.stage()?; // tmp/stage-…; deleted on drop unless committed
//! // Copy (or write) the files into the staging directory, holes kept as holes.
//! let src = File::open("/somewhere/memory.bin")?;
//! let (size, sha256) = sparse::copy_sparse(&src, File::create(staging.dir().join("memory.bin"))?)?;
//! let engine = EngineInfo {
//!     name: "qemu".into(),
//!     version: "7.2.0".into(),
//!     machine_type: "pc-i440fx-7.2".into(),
//!     cpu_model: "qemu64".into(),
//!     accel_hint: None,
//! };
//! let mut manifest = Manifest::new("python-numpy", "1.0", 512, engine);
//! manifest.files.insert("memory.bin".into(), FileEntry { size, sha256, role: Some("memory".into()) });
//! // Checks the files against the manifest, fsyncs, and renames into images/<tag> atomically.
//! let snapshot = staging.commit(&Tag::parse("python-numpy")?, &manifest, Overwrite::No)?;
//! println!("{}", snapshot.path("memory.bin").display());
//! # Ok(())
//! # }
//! ```

mod fsutil;
pub mod home;
pub mod lock;
mod lookup;
pub mod manifest;
pub mod origin;
pub mod pack;
pub mod sparse;
mod staging;
mod store;
pub mod synth;
mod tag;
pub mod workingset;

pub use fsutil::{
    DIR_MODE, FILE_MODE, PathError, make_private, open_nofollow, private_dir, private_options,
    process_start_time, write_private,
};
pub use home::{Home, default_home};
pub use lock::FileLock;
pub use lookup::{ImageName, LookupError};
pub use manifest::{EngineInfo, FileEntry, Manifest, ManifestError};
pub use origin::Origin;
pub use staging::Staging;
pub use store::{FileCheck, ImageInfo, Overwrite, Snapshot, Store, StoreError};
pub use tag::{Tag, TagError};

/// The version of forkd this library belongs to (written into new manifests).
pub const FORKD_VERSION: &str = env!("CARGO_PKG_VERSION");
