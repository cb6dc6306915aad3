//! The download cache, `$FORKD_HOME/cache`: `partial/<image hex>/` holds the files of a pull
//! that has not been installed yet plus its journal (so an interrupted pull resumes), and
//! `locks/<image hex>.lock` serialises pulls of one image (so two pulls download it once).
//!
//! Nothing in the cache is trusted to be what this forkd left there: every directory and file
//! of `partial/` is opened relative to its parent's descriptor with `O_NOFOLLOW`, and a
//! symbolic link, a hard-linked file or anything but a regular file found in its place is
//! removed (never followed) and made afresh.

use crate::error::{HubError, Result};
use forkd_store::{FileLock, Home};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Cache {
    home: PathBuf,
    root: PathBuf,
}

/// The open directory `cache/partial/<image hex>/` of one pull.
#[derive(Debug)]
pub struct Partial {
    dir: OwnedFd,
    path: PathBuf,
}

pub(crate) fn io_err(what: String) -> impl FnOnce(rustix::io::Errno) -> HubError {
    move |e| HubError::Io {
        what,
        source: e.into(),
    }
}

/// Open (creating it if missing) the directory `name` under `parent` without following a
/// link; anything else found there is removed first.
pub(crate) fn open_dir_at(parent: &impl AsFd, name: &str, shown: &Path) -> Result<OwnedFd> {
    let err = || format!("cannot open the cache directory {}", shown.display());
    if let Ok(st) = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)
        && FileType::from_raw_mode(st.st_mode) != FileType::Directory
    {
        tracing::warn!(
            "{} is not a directory (a symbolic link?); removing it, not following it",
            shown.display()
        );
        rustix::fs::unlinkat(parent, name, AtFlags::empty()).map_err(io_err(err()))?;
    }
    match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(io_err(err())(e)),
    }
    rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err(err()))
}

impl Cache {
    /// The download cache of the store at `home`.
    pub fn new(home: &Home) -> Self {
        Self {
            home: home.path().to_path_buf(),
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

    /// Open (creating) `partial/<image hex>/`, each component relative to its parent, never
    /// through a link.
    pub fn partial(&self, digest: &str) -> Result<Partial> {
        let home = rustix::fs::open(
            &self.home,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err(format!("cannot open {}", self.home.display())))?;
        let cache_name = self
            .root
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("cache");
        let cache = open_dir_at(&home, cache_name, &self.root)?;
        let partial = open_dir_at(&cache, "partial", &self.root.join("partial"))?;
        let path = self.partial_dir(digest);
        let dir = open_dir_at(&partial, hex_of(digest), &path)?;
        Ok(Partial { dir, path })
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

impl Partial {
    /// The directory's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Open the file `name` for reading and writing, creating it (0600) if missing. A link or
    /// anything but a regular file with one name in its place is removed, never followed.
    /// `append` opens it for appending (the journal).
    pub fn open_file(&self, name: &str, append: bool) -> Result<File> {
        let shown = self.path.join(name);
        let err = || format!("cannot open {}", shown.display());
        if let Ok(st) = rustix::fs::statat(&self.dir, name, AtFlags::SYMLINK_NOFOLLOW)
            && (FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_nlink != 1)
        {
            tracing::warn!(
                "{} is not a plain file of this cache (a link?); removing it, not following it",
                shown.display()
            );
            rustix::fs::unlinkat(&self.dir, name, AtFlags::empty()).map_err(io_err(err()))?;
        }
        let mut flags = OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        if append {
            flags |= OFlags::APPEND;
        }
        let fd = rustix::fs::openat(&self.dir, name, flags, Mode::from_raw_mode(0o600))
            .map_err(io_err(err()))?;
        // Between the check and the open, a link could have become a hard link: check the
        // file that was opened.
        let st = rustix::fs::fstat(&fd).map_err(io_err(err()))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_nlink != 1 {
            return Err(HubError::Invalid(format!(
                "{} changed while it was opened; refusing to use it",
                shown.display()
            )));
        }
        Ok(File::from(fd))
    }

    /// Whether `name` exists here (as anything).
    pub fn exists(&self, name: &str) -> bool {
        rustix::fs::statat(&self.dir, name, AtFlags::SYMLINK_NOFOLLOW).is_ok()
    }

    /// Move the file `name` to `to` (on the same file system).
    pub fn move_out(&self, name: &str, to: &Path) -> Result<()> {
        rustix::fs::renameat(&self.dir, name, rustix::fs::CWD, to).map_err(io_err(format!(
            "cannot move {} into the store",
            self.path.join(name).display()
        )))
    }

    /// Delete the directory and what is in it (links are removed, not followed).
    pub fn remove(self) {
        drop(self.dir);
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}
