//! The download cache, `$FORKD_HOME/cache`: verified blobs by digest (so an interrupted pull
//! resumes and a blob present locally is never fetched again) and per-image lock files (so two
//! pulls of one image download it once).

use crate::error::{HubError, Result};
use crate::layout::sha256_digest;
use bytes::Bytes;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

/// An exclusive per-image lock; released on drop (closing the file drops the flock).
pub struct CacheLock {
    _file: std::fs::File,
}

impl Cache {
    pub fn new(home: &Path) -> Self {
        Self {
            root: home.join("cache"),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.root.join(crate::layout::blob_key(digest))
    }

    /// A cached blob, re-verified; a corrupt entry is removed and reported as absent.
    pub fn get(&self, digest: &str) -> Option<Bytes> {
        let p = self.blob_path(digest);
        let data = std::fs::read(&p).ok()?;
        if sha256_digest(&data) == digest {
            Some(Bytes::from(data))
        } else {
            tracing::warn!("removing corrupt cache entry {}", p.display());
            let _ = std::fs::remove_file(&p);
            None
        }
    }

    /// Store a verified blob: temp file in the cache, then rename (readers never see a part).
    pub fn put(&self, digest: &str, data: &[u8]) -> Result<()> {
        let p = self.blob_path(digest);
        let dir = p.parent().expect("blob path has a parent");
        let what = || format!("cannot write the download cache {}", self.root.display());
        fs_err::create_dir_all(dir).map_err(HubError::io(what()))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".dl-")
            .tempfile_in(dir)
            .map_err(HubError::io(what()))?;
        tmp.write_all(data).map_err(HubError::io(what()))?;
        tmp.persist(&p).map_err(|e| HubError::io(what())(e.error))?;
        Ok(())
    }

    /// Lock the image `digest`. If another pull holds it, `on_wait` is told, then this waits.
    pub fn lock(&self, digest: &str, on_wait: impl FnOnce()) -> Result<CacheLock> {
        use rustix::fs::{FlockOperation, flock};
        let dir = self.root.join("locks");
        let what = || format!("cannot create a lock in {}", dir.display());
        fs_err::create_dir_all(&dir).map_err(HubError::io(what()))?;
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{hex}.lock")))
            .map_err(HubError::io(what()))?;
        if flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
            on_wait();
            flock(&file, FlockOperation::LockExclusive)
                .map_err(|e| HubError::io(what())(e.into()))?;
        }
        Ok(CacheLock { _file: file })
    }
}
