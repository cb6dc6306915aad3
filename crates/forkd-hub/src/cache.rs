//! The download cache, `$FORKD_HOME/cache`: `partial/<image hex>/` holds the files of a pull
//! that has not been installed yet plus its journal (so an interrupted pull resumes), and
//! `locks/<image hex>.lock` serialises pulls of one image (so two pulls download it once).

use crate::error::{HubError, Result};
use forkd_store::{FileLock, Home};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// The download cache of the store at `home`.
    pub fn new(home: &Home) -> Self {
        Self {
            root: home.cache_dir(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a pull of image `digest` writes its files and journal until it is installed.
    pub fn partial_dir(&self, digest: &str) -> PathBuf {
        self.root.join("partial").join(hex_of(digest))
    }

    /// Lock the image `digest` (released on drop). If another pull holds it, `on_wait` is
    /// told, then this waits.
    pub fn lock(&self, digest: &str, on_wait: impl FnOnce()) -> Result<FileLock> {
        let dir = self.root.join("locks");
        fs_err::create_dir_all(&dir).map_err(HubError::io(format!(
            "cannot create a lock in {}",
            dir.display()
        )))?;
        let path = dir.join(format!("{}.lock", hex_of(digest)));
        Ok(FileLock::exclusive(&path, |_| on_wait())?)
    }
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}
