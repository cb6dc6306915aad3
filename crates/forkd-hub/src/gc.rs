//! `forkd gc`: give back the disk the download cache holds for nothing. Removes the chunks of
//! the local chunk store that no installed image needs, the image manifests of images that
//! are gone, unfinished chunk writes, and partial downloads no pull is working on (a partial
//! download is what lets an interrupted pull resume; gc drops that, on purpose).
//!
//! What an image needs is read from the manifests remembered when it was pulled
//! (`cache/manifests/`), matched by the hub digest its `origin.json` records. Images that
//! were built or unpacked here have no chunks in the store.

use crate::cache::Cache;
use crate::chunks::{ChunkStore, GcCount};
use crate::error::{HubError, Result};
use forkd_store::{FileLock, Store};
use std::collections::HashSet;

/// What [`collect`] removed (or, on a dry run, would remove).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Chunks no image needs, unfinished writes among them, and their size on disk.
    pub chunks_removed: u64,
    pub chunk_bytes_freed: u64,
    /// Remembered image manifests of images no longer installed.
    pub manifests_removed: u64,
    /// Partial downloads no running pull holds, and their size on disk.
    pub partials_removed: u64,
    pub partial_bytes_freed: u64,
    /// What stays: chunks installed images need.
    pub chunks_kept: u64,
    pub chunk_bytes_kept: u64,
}

impl GcReport {
    pub fn bytes_freed(&self) -> u64 {
        self.chunk_bytes_freed + self.partial_bytes_freed
    }
}

/// Collect the garbage of `store`'s download cache.
pub fn collect(store: &Store, dry_run: bool) -> Result<GcReport> {
    let mut keep = HashSet::new();
    for img in store.list()? {
        if let Ok(Some(o)) = store.origin(&img.tag) {
            keep.insert(o.digest);
        }
    }
    let cache = Cache::new(store.home());
    let partial_root = cache.root().join("partial");
    let mut report = GcReport {
        dry_run,
        ..Default::default()
    };
    // Partial downloads first: they need nothing to be removed, and free the most on a full
    // disk.
    for e in std::fs::read_dir(&partial_root)
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let digest = format!("sha256:{name}");
        if crate::reference::digest_hex(&digest).is_none() {
            continue;
        }
        // A pull holds the image's lock for as long as it works in its partial directory.
        let lock_path = cache.root().join("locks").join(format!("{name}.lock"));
        let Some(_held): Option<FileLock> = FileLock::try_exclusive(&lock_path)? else {
            continue;
        };
        let dir = e.path();
        // Not followed: a link in place of the directory is removed as a link.
        let meta = std::fs::symlink_metadata(&dir)
            .map_err(HubError::io(format!("cannot read {}", dir.display())))?;
        let size = if meta.is_dir() {
            std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|f| f.path().symlink_metadata().ok())
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .sum()
        } else {
            0
        };
        report.partials_removed += 1;
        report.partial_bytes_freed += size;
        if !dry_run {
            let r = if meta.is_dir() {
                std::fs::remove_dir_all(&dir)
            } else {
                std::fs::remove_file(&dir)
            };
            r.map_err(HubError::io(format!("cannot remove {}", dir.display())))?;
        }
    }
    let chunks = ChunkStore::open(store.home())?;
    let GcCount {
        chunks: n,
        bytes,
        manifests,
        kept_chunks,
        kept_bytes,
    } = chunks.gc(&keep, &cache.root().join("locks"), dry_run)?;
    report.chunks_removed = n;
    report.chunk_bytes_freed = bytes;
    report.manifests_removed = manifests;
    report.chunks_kept = kept_chunks;
    report.chunk_bytes_kept = kept_bytes;
    Ok(report)
}
