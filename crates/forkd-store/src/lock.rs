//! Advisory file locks (std's `File::lock`, an flock), with a notice when we have to wait. The
//! one lock of forkd: the store and the hub's download cache both take theirs here.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::fsutil::{IoContext, PathError};

/// An exclusive lock, released on drop.
#[derive(Debug)]
pub struct FileLock {
    file: File,
    #[allow(dead_code)]
    path: PathBuf,
}

impl FileLock {
    /// Take the exclusive lock on `path` (created if missing), blocking if another process holds
    /// it. Before blocking, `on_wait(path)` is called once so the user learns why nothing happens.
    pub fn exclusive(path: &Path, on_wait: impl FnOnce(&Path)) -> Result<FileLock, PathError> {
        let file = open_or_create(path)?;
        if let Some(l) = try_take(&file, path)? {
            return Ok(l);
        }
        on_wait(path);
        file.lock().at("cannot lock", path)?;
        Ok(FileLock {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Take a shared lock on `path` (created if missing), waiting while someone holds it
    /// exclusively. Many holders may share it; [`FileLock::try_exclusive`] fails while any does.
    pub fn shared(path: &Path) -> Result<FileLock, PathError> {
        let file = open_or_create(path)?;
        file.lock_shared().at("cannot lock", path)?;
        Ok(FileLock {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Take the exclusive lock on `path` (created if missing) without waiting: `Ok(None)` when
    /// another process holds it.
    pub fn try_exclusive(path: &Path) -> Result<Option<FileLock>, PathError> {
        try_take(&open_or_create(path)?, path)
    }

    /// Try to take the lock on an existing file without waiting. `Ok(None)` when it is held by
    /// someone else or the file does not exist.
    pub(crate) fn try_existing(path: &Path) -> Result<Option<FileLock>, PathError> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).at("cannot open lock file", path),
        };
        try_take(&file, path)
    }

    /// Create a new lock file at `path` (a fresh unique name) that is already locked when it
    /// appears: it is made and locked under a hidden temporary name, then renamed into place, so
    /// a sweeper never sees an unlocked lock file of a live owner.
    pub(crate) fn create_new(path: &Path) -> Result<FileLock, PathError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(crate::fsutil::unique_name(".new-"));
        let file = crate::fsutil::private_options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .at("cannot create lock file", &tmp)?;
        let locked = file.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => {
                std::io::Error::from(std::io::ErrorKind::WouldBlock)
            }
            std::fs::TryLockError::Error(e) => e,
        });
        if let Err(e) = locked.and_then(|()| std::fs::rename(&tmp, path)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).at("cannot create lock file", path);
        }
        Ok(FileLock {
            file,
            path: path.to_path_buf(),
        })
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

/// The default notice: a warning that is shown without -v.
pub(crate) fn warn_waiting(path: &Path) {
    tracing::warn!(
        "waiting for lock on {} (held by another forkd process)...",
        path.display()
    );
}

fn open_or_create(path: &Path) -> Result<File, PathError> {
    crate::fsutil::private_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .at("cannot open lock file", path)
}

/// Lock `file` (at `path`) if nobody holds it; the lock lives in a handle of its own.
fn try_take(file: &File, path: &Path) -> Result<Option<FileLock>, PathError> {
    match file.try_lock() {
        Ok(()) => Ok(Some(FileLock {
            file: file.try_clone().at("cannot lock", path)?,
            path: path.to_path_buf(),
        })),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e).at("cannot lock", path),
    }
}
