//! A read-only FUSE file system over an image that is still being pulled
//! ([`forkd_hub::lazy::LazyImage`]): one flat directory with the image's files and its
//! `manifest.toml`. A read returns once the chunks under it were downloaded and verified; the
//! guest never sees a byte that did not match its digest.
//!
//! Why FUSE and not userfaultfd (docs/ENGINE.md has the whole argument): QEMU maps memory.bin
//! privately (`share=off`), so every child of an image shares the kernel's page cache of that
//! one file. A FUSE file keeps that: the first child to touch a page makes the kernel ask us
//! once, and every other child maps the same cached page. userfaultfd works per process and
//! per mapping: each child's faults would have to be served into each child, and a restored
//! QEMU would need to hand its RAM's userfaultfd over. The rootfs needs no new mechanism either:
//! QEMU's disk overlay reads its backing file through the same mount.
//!
//! Files are opened with `FOPEN_KEEP_CACHE` (what was read stays valid: the content of an
//! image never changes), and accept `O_RDWR` opens (QEMU 7.2 opens memory.bin read-write even
//! for a private mapping) but refuse every write.

use forkd_hub::lazy::LazyImage;
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen,
    ReplyWrite, Request, SessionACL, WriteFlags,
};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

pub mod record;

/// How long the kernel may cache names and attributes: an image never changes.
const TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum LazyFsError {
    #[error("cannot mount the lazy image at {path}: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prepare the mount point {path}: {source}")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the directory shows besides the image's files: small files served from memory
/// (manifest.toml).
struct Extra {
    name: String,
    data: Vec<u8>,
}

/// What a mount shows: files by index, read by range. A read may block (on a download).
pub trait Source: Send + Sync + 'static {
    /// Every file's name and size, in index order.
    fn files(&self) -> Vec<(String, u64)>;
    /// Up to `len` bytes of file `file` at `offset` (short only at the end of the file).
    fn read_at(&self, file: usize, offset: u64, len: usize) -> Result<Vec<u8>, String>;
}

impl Source for LazyImage {
    fn files(&self) -> Vec<(String, u64)> {
        self.image()
            .files
            .iter()
            .map(|f| (f.name.clone(), f.size))
            .collect()
    }
    fn read_at(&self, file: usize, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        LazyImage::read_at(self, file, offset, len).map_err(|e| e.to_string())
    }
}

/// Most reads waiting on their own threads at once (each may wait for a download).
const MAX_READ_THREADS: usize = 256;

struct LazyFs {
    active: Arc<std::sync::atomic::AtomicUsize>,
    src: Arc<dyn Source>,
    files: Vec<(String, u64)>,
    extra: Vec<Extra>,
    errors: Arc<Mutex<Errors>>,
}

/// Reads that failed: how many, and the first reason (it names the chunk).
#[derive(Debug, Default, Clone)]
pub struct Errors {
    pub count: u64,
    pub first: Option<String>,
}

const ROOT: u64 = 1;

impl LazyFs {
    fn extra_ino(&self, i: usize) -> u64 {
        ROOT + 1 + i as u64
    }
    fn file_ino(&self, i: usize) -> u64 {
        ROOT + 1 + self.extra.len() as u64 + i as u64
    }
    /// What an inode is: `Ok(Err(i))` the i-th extra file, `Ok(Ok(i))` the i-th image file.
    fn node(&self, ino: u64) -> Option<Result<usize, usize>> {
        let first_file = ROOT + 1 + self.extra.len() as u64;
        if ino > ROOT && ino < first_file {
            Some(Err((ino - ROOT - 1) as usize))
        } else if ino >= first_file && ((ino - first_file) as usize) < self.files.len() {
            Some(Ok((ino - first_file) as usize))
        } else {
            None
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, size, perm) = if ino == ROOT {
            (FileType::Directory, 0, 0o555)
        } else {
            let size = match self.node(ino)? {
                Err(i) => self.extra[i].data.len() as u64,
                Ok(i) => self.files[i].1,
            };
            (FileType::RegularFile, size, 0o444)
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        })
    }

    fn names(&self) -> impl Iterator<Item = (u64, &str)> {
        let extra = self
            .extra
            .iter()
            .enumerate()
            .map(|(i, e)| (self.extra_ino(i), e.name.as_str()));
        let files = self
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| (self.file_ino(i), f.0.as_str()));
        extra.chain(files)
    }
}

/// The kernel's read-ahead on these files is left as it is, unless `FORKD_LAZY_READAHEAD_KB`
/// (a knob for benchmarks, 4..16384) sets it. Measured with bench/lazy.sh (python-numpy):
/// 128 KiB changed nothing, because a guest's page fault does not read around by read-ahead.
/// QEMU marks guest RAM `MADV_HUGEPAGE`, and a fault in such a file mapping reads the aligned
/// 4 MiB around it (the recorded working set is 4 MiB groups of 1 MiB reads, 1 MiB being
/// FUSE's largest request); `PR_SET_THP_DISABLE` on QEMU did not change that either.
fn readahead() -> Option<u32> {
    std::env::var("FORKD_LAZY_READAHEAD_KB")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|kb| (4..=16384).contains(kb))
        .map(|kb| kb << 10)
}

impl Filesystem for LazyFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        if let Some(want) = readahead()
            && let Err(nearest) = config.set_max_readahead(want)
        {
            let _ = config.set_max_readahead(nearest);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if u64::from(parent) != ROOT {
            return reply.error(Errno::ENOENT);
        }
        match self
            .names()
            .find(|(_, n)| OsStr::new(n) == name)
            .and_then(|(ino, _)| self.attr(ino))
        {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.into()) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.node(ino.into()).is_none() {
            return reply.error(Errno::ENOENT);
        }
        if flags.0 & (rustix::fs::OFlags::TRUNC.bits() as i32) != 0 {
            return reply.error(Errno::EROFS);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.node(ino.into()) {
            None => reply.error(Errno::ENOENT),
            Some(Err(i)) => {
                let data = &self.extra[i].data;
                let start = (offset as usize).min(data.len());
                let end = start.saturating_add(size as usize).min(data.len());
                reply.data(&data[start..end]);
            }
            Some(Ok(i)) => {
                // A read may wait for a download: not on the session's thread, so that other
                // requests (other children's reads of chunks that are here) go on. At most
                // MAX_READ_THREADS wait at once; past that, reads are served in turn here.
                let src = self.src.clone();
                let errors = self.errors.clone();
                let active = self.active.clone();
                let serve = move || {
                    match src.read_at(i, offset, size as usize) {
                        Ok(buf) => reply.data(&buf),
                        Err(e) => {
                            tracing::debug!("lazy read failed: {e}");
                            let mut er = errors.lock().unwrap_or_else(|p| p.into_inner());
                            er.count += 1;
                            er.first.get_or_insert(e);
                            reply.error(Errno::EIO);
                        }
                    }
                    active.fetch_sub(1, Ordering::Relaxed);
                };
                if self.active.fetch_add(1, Ordering::Relaxed) >= MAX_READ_THREADS {
                    serve();
                    return;
                }
                let spawned = std::thread::Builder::new()
                    .name("lazyfs-read".into())
                    .spawn(serve);
                if let Err(e) = spawned {
                    // The reply is dropped with the closure: the kernel gets EIO.
                    self.active.fetch_sub(1, Ordering::Relaxed);
                    let mut er = self.errors.lock().unwrap_or_else(|p| p.into_inner());
                    er.count += 1;
                    er.first
                        .get_or_insert_with(|| format!("cannot start a read thread: {e}"));
                }
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        reply.ok();
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if u64::from(ino) != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
        ]
        .into_iter()
        .chain(self.names().map(|(i, n)| (i, FileType::RegularFile, n)));
        for (k, (ino, kind, name)) in entries.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (k + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted lazy image. Dropping it unmounts (detached: a child that still maps a file keeps
/// its pages until it exits) and removes the mount point.
pub struct Mount {
    session: Option<fuser::BackgroundSession>,
    dir: PathBuf,
    errors: Arc<Mutex<Errors>>,
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mount").field("dir", &self.dir).finish()
    }
}

/// Mount `src` at a new mount point in `root` ([`mount_point`]: a directory private to this
/// user, since the mount lets any user that reaches it read, so that a child's QEMU still reads
/// it after it dropped to its unprivileged user), after sweeping `root` of the mounts of
/// processes that died. `manifest_toml` is shown as `manifest.toml`. On failure nothing is
/// left behind.
pub fn mount_in(
    root: &Path,
    label: &str,
    src: Arc<dyn Source>,
    manifest_toml: &str,
) -> Result<Mount, LazyFsError> {
    sweep(root);
    let dir = mount_point(root, label)?;
    mount_at(src, manifest_toml, &dir).inspect_err(|_| {
        let _ = std::fs::remove_dir(&dir);
    })
}

fn mount_at(src: Arc<dyn Source>, manifest_toml: &str, dir: &Path) -> Result<Mount, LazyFsError> {
    let errors = Arc::new(Mutex::new(Errors::default()));
    let fs = LazyFs {
        active: Default::default(),
        files: src.files(),
        src,
        extra: vec![Extra {
            name: "manifest.toml".into(),
            data: manifest_toml.as_bytes().to_vec(),
        }],
        errors: errors.clone(),
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("forkd-lazy".into()),
        MountOption::Subtype("forkd".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
        MountOption::NoAtime,
    ];
    config.acl = SessionACL::All;
    let session = fuser::spawn_mount(fs, dir, &config).map_err(|source| LazyFsError::Mount {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(Mount {
        session: Some(session),
        dir: dir.to_path_buf(),
        errors,
    })
}

impl Mount {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The reads that failed so far.
    pub fn errors(&self) -> Errors {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        detach(&self.dir);
        // The session thread ends when the kernel lets go of the connection; not waited for.
        drop(self.session.take());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Unmount whatever is mounted at `dir`, lazily (`MNT_DETACH`), without following a link.
pub fn detach(dir: &Path) {
    use rustix::mount::UnmountFlags;
    match rustix::mount::unmount(dir, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW) {
        Ok(()) | Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => tracing::warn!("cannot unmount {}: {e}", dir.display()),
    }
}

/// Where a store's lazy mounts live: `$FORKD_HOME/cache/lazy`, a directory private to this
/// user ([`mount_point`] checks it; a mount in it lets any user that reaches it read).
pub fn mounts_dir(home: &forkd_store::Home) -> PathBuf {
    home.cache_dir().join("lazy")
}

/// A new, empty mount point in `root` (made private to this user if needed) for `label`:
/// `<label>-<pid>-<start time>-<n>`, so that a sweep can tell whether its process still runs
/// (a pid alone can be reused by a restarted daemon) and two mounts never share a name.
pub fn mount_point(root: &Path, label: &str) -> Result<PathBuf, LazyFsError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    private_root(root).map_err(|source| LazyFsError::MountPoint {
        path: root.to_path_buf(),
        source,
    })?;
    let pid = std::process::id();
    let dir = root.join(format!(
        "{label}-{pid}-{}-{}",
        forkd_store::process_start_time(pid).unwrap_or(0),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir(&dir).map_err(|source| LazyFsError::MountPoint {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

/// Unmount and remove the mount points in `root` whose process is gone (`kill -9` mid-fork):
/// their reads fail with "transport endpoint is not connected" until they are unmounted.
/// `root` is checked first (a directory private to this user, not a link).
pub fn sweep(root: &Path) {
    if !root.exists() || private_root(root).is_err() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let mut parts = name.rsplitn(4, '-');
        let (_, start, pid) = (parts.next(), parts.next(), parts.next());
        let (Some(Ok(start)), Some(Ok(pid))) =
            (start.map(str::parse::<u64>), pid.map(str::parse::<u32>))
        else {
            continue;
        };
        if forkd_store::process_start_time(pid) == Some(start) {
            continue;
        }
        let dir = e.path();
        tracing::info!("removing the stale lazy mount {}", dir.display());
        detach(&dir);
        let _ = std::fs::remove_dir(&dir);
    }
}

/// `root` made (0700) if missing, and then a directory of this user that no one else can enter:
/// a mount in it is `allow_other`, so its parent is what keeps other users out.
fn private_root(root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    forkd_store::private_dir(root).map_err(|e| std::io::Error::other(e.to_string()))?;
    let meta = std::fs::symlink_metadata(root)?;
    if meta.uid() != rustix::process::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "belongs to uid {} with mode {:o}; lazy mounts need a directory private to this user",
                meta.uid(),
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_unique_and_the_sweep_removes_only_dead_ones() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("lazy");
        let a = mount_point(&root, "abc").unwrap();
        let b = mount_point(&root, "abc").unwrap();
        assert_ne!(a, b);
        let pid = std::process::id();
        assert!(
            a.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(&format!("abc-{pid}-")),
            "{a:?}"
        );
        // A process that is gone: same pid, another start time.
        let dead = root.join(format!("abc-{pid}-1-0"));
        std::fs::create_dir(&dead).unwrap();
        sweep(&root);
        assert!(
            a.exists() && b.exists(),
            "a live process's mount points were swept"
        );
        assert!(!dead.exists(), "a dead process's mount point was kept");
    }

    #[test]
    fn a_root_of_another_user_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("lazy");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
        if rustix::process::geteuid().is_root() {
            rustix::fs::chown(&root, Some(rustix::process::Uid::from_raw(65534)), None).unwrap();
            assert!(mount_point(&root, "x").is_err());
        }
        // A link in its place is not followed.
        let link = d.path().join("link");
        std::os::unix::fs::symlink(d.path(), &link).unwrap();
        assert!(mount_point(&link, "x").is_err());
    }
}
