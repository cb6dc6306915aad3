//! Small filesystem helpers: fsync of directories, unique names, errors with paths, and the
//! private modes of everything forkd keeps (0700 directories, 0600 files, whatever the umask).

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// An I/O error together with the path it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct PathError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

pub(crate) trait IoContext<T> {
    fn at(self, op: &'static str, path: &Path) -> Result<T, PathError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, op: &'static str, path: &Path) -> Result<T, PathError> {
        self.map_err(|source| PathError {
            op,
            path: path.to_path_buf(),
            source,
        })
    }
}

/// fsync a directory so that renames and creations inside it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), PathError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .at("cannot sync directory", dir)
}

/// A name unique on this host for this process lifetime: pid, time, counter.
pub(crate) fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("{prefix}{}-{nanos:x}-{n}", std::process::id())
}

/// Allocated bytes of a file (st_blocks * 512).
pub(crate) fn disk_usage(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks() * 512
}

/// The mode of every directory forkd makes: only its owner may list, enter or write it.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every file forkd writes (snapshots hold guest RAM, keys are secrets).
pub const FILE_MODE: u32 = 0o600;

/// Create `dir` and any missing parents as 0700 (the mode is passed to mkdir, so no umask can
/// widen it), and make an existing `dir` that others can reach 0700 again. A `dir` that is not
/// a directory, or that belongs to another user, is left alone and refused.
pub fn private_dir(dir: &Path) -> Result<(), PathError> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .at("cannot create directory", dir)?;
    let meta = std::fs::symlink_metadata(dir).at("cannot inspect", dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists and is not a directory (a symbolic link is not followed)",
        ))
        .at("refusing to use", dir);
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "is mode {mode:o} and belongs to uid {} (other users could read it)",
                meta.uid()
            ),
        ))
        .at("refusing to use", dir);
    }
    tracing::warn!(
        "{} was mode {mode:o}: other users could read it; made it {DIR_MODE:o}",
        dir.display()
    );
    std::fs::set_permissions(dir, Permissions::from_mode(DIR_MODE)).at("cannot chmod", dir)
}

/// Options that create a file 0600 (never wider, whatever the umask) and never follow a
/// symbolic link at its name.
pub fn private_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    o
}

/// Make an open file 0600 (an existing file keeps its mode when opened for writing).
pub fn make_private(f: &File, path: &Path) -> Result<(), PathError> {
    f.set_permissions(Permissions::from_mode(FILE_MODE))
        .at("cannot chmod", path)
}

/// Write `data` to `path` as a private file (0600, no symbolic link followed), replacing
/// what it held.
pub fn write_private(path: &Path, data: impl AsRef<[u8]>) -> Result<(), PathError> {
    use std::io::Write;
    let mut f = private_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .at("cannot write", path)?;
    make_private(&f, path)?;
    f.write_all(data.as_ref()).at("cannot write", path)
}

/// Open an existing file for reading, refusing a symbolic link in its last component.
pub fn open_nofollow(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

/// A process's start time in clock ticks since boot (field 22 of /proc/PID/stat): with the pid
/// it names one process, even after the pid is reused.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(19)?.parse().ok()
}
