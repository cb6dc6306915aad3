//! The download cache, `$FORKD_HOME/cache`: `partial/<image hex>/` holds the files of a pull
//! that has not been installed yet plus its journal (so an interrupted pull resumes), and
//! `locks/<image hex>.lock` serialises pulls of one image (so two pulls download it once).

use crate::error::{HubError, Result};
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

    /// Where a pull of image `digest` writes its files and journal until it is installed.
    pub fn partial_dir(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.root.join("partial").join(hex)
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
