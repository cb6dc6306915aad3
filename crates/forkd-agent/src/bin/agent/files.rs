//! File ops: uploads in bounded pieces through a temporary file that is renamed into place,
//! reads at an offset, directory listings, stat, mkdir and remove. Paths must be absolute;
//! symlinks are reported as themselves (`lstat`), not followed.

use crate::{Failure, Res, lock};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use forkd_agent::{
    ErrorCode, FileEntry, FileKind, MAX_FILE_CHUNK, MAX_LINE, MAX_LIST_ENTRIES, MAX_OPEN_FILES,
    Reply,
};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Default permission bits of an uploaded file.
const DEFAULT_MODE: u32 = 0o644;

/// An upload untouched for this long is aborted when another upload opens. (A host that
/// disconnects normally gets its uploads aborted at once, when the agent reads EOF; one that
/// reconnects before the agent notices leaves them behind until then.)
const UPLOAD_IDLE: std::time::Duration = std::time::Duration::from_secs(600);

/// A listing stops before its JSON could come near the line limit.
const MAX_LIST_BYTES: usize = MAX_LINE / 2;

fn absolute(path: &str) -> Res<&Path> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(Failure::bad(format!("path {path:?} is not absolute")));
    }
    Ok(p)
}

/// Eight random hex digits for a temporary name (not secret: `O_EXCL` guards against clashes).
fn random_suffix() -> String {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most b.len() bytes into `b`, which we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let c = COUNTER.fetch_add(1, Ordering::Relaxed) as u32;
        b = (t ^ c.rotate_left(16) ^ std::process::id()).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Upload {
    file: File,
    tmp: PathBuf,
    target: PathBuf,
    size: u64,
    /// Closed or aborted: later writes fail.
    done: bool,
    last_used: std::time::Instant,
}

impl Upload {
    fn discard(&mut self) {
        if !self.done {
            self.done = true;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The open uploads of this agent.
#[derive(Default)]
pub struct Uploads {
    open: Mutex<HashMap<u64, Arc<Mutex<Upload>>>>,
    next: AtomicU64,
}

impl Uploads {
    pub fn open(&self, path: &str, mode: Option<u32>) -> Res<u64> {
        let target = absolute(path)?;
        let mode = mode.unwrap_or(DEFAULT_MODE);
        if mode > 0o7777 {
            return Err(Failure::bad(format!(
                "mode {mode:o} is not a permission mode"
            )));
        }
        let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
            return Err(Failure::bad(format!("{path:?} names no file")));
        };
        if let Ok(m) = std::fs::symlink_metadata(target)
            && m.is_dir()
        {
            return Err(Failure::new(
                ErrorCode::IsADirectory,
                format!("{path} is a directory"),
            ));
        }
        self.expire_idle();
        if lock(&self.open).len() >= MAX_OPEN_FILES {
            return Err(Failure::new(
                ErrorCode::Busy,
                format!("{MAX_OPEN_FILES} uploads are open; close one first"),
            ));
        }
        let mut attempt = 0;
        let (file, tmp) = loop {
            let tmp = dir.join(format!(
                ".{}.forkd-{}",
                name.to_string_lossy(),
                random_suffix()
            ));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
            {
                Ok(f) => break (f, tmp),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => {
                    attempt += 1;
                }
                Err(e) => {
                    return Err(Failure::io(
                        format!("create a file in {}", dir.display()),
                        &e,
                    ));
                }
            }
        };
        // Exactly `mode`, whatever the umask.
        if let Err(e) = file.set_permissions(std::fs::Permissions::from_mode(mode)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Failure::io(format!("chmod {}", tmp.display()), &e));
        }
        let handle = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let up = Upload {
            file,
            tmp,
            target: target.to_path_buf(),
            size: 0,
            done: false,
            last_used: std::time::Instant::now(),
        };
        lock(&self.open).insert(handle, Arc::new(Mutex::new(up)));
        Ok(handle)
    }

    fn get(&self, handle: u64) -> Res<Arc<Mutex<Upload>>> {
        lock(&self.open)
            .get(&handle)
            .cloned()
            .ok_or_else(|| Failure::new(ErrorCode::NotFound, format!("no open upload {handle}")))
    }

    pub fn write(&self, handle: u64, data: &str) -> Res<u64> {
        // Four base64 characters per three bytes: refuse oversized pieces before decoding.
        if data.len() / 4 * 3 > MAX_FILE_CHUNK + 3 {
            return Err(Failure::bad(format!(
                "a file_write carries at most {MAX_FILE_CHUNK} bytes"
            )));
        }
        let bytes = B64
            .decode(data)
            .map_err(|e| Failure::bad(format!("data is not base64: {e}")))?;
        if bytes.len() > MAX_FILE_CHUNK {
            return Err(Failure::bad(format!(
                "a file_write carries at most {MAX_FILE_CHUNK} bytes"
            )));
        }
        let up = self.get(handle)?;
        let mut up = lock(&up);
        if up.done {
            return Err(Failure::new(
                ErrorCode::NotFound,
                format!("upload {handle} is closed"),
            ));
        }
        if let Err(e) = up.file.write_all(&bytes) {
            return Err(Failure::io(format!("write {}", up.tmp.display()), &e));
        }
        up.size += bytes.len() as u64;
        up.last_used = std::time::Instant::now();
        Ok(up.size)
    }

    /// Commit (fsync, rename over the target, fsync the directory) or discard an upload.
    pub fn close(&self, handle: u64, commit: bool) -> Res<(String, u64)> {
        let up = lock(&self.open)
            .remove(&handle)
            .ok_or_else(|| Failure::new(ErrorCode::NotFound, format!("no open upload {handle}")))?;
        let mut up = lock(&up);
        if up.done {
            return Err(Failure::new(
                ErrorCode::NotFound,
                format!("upload {handle} is closed"),
            ));
        }
        let path = up.target.to_string_lossy().into_owned();
        if !commit {
            up.discard();
            return Ok((path, up.size));
        }
        if let Err(e) = up.file.sync_all() {
            up.discard();
            return Err(Failure::io(format!("fsync {}", up.tmp.display()), &e));
        }
        if let Err(e) = std::fs::rename(&up.tmp, &up.target) {
            up.discard();
            return Err(Failure::io(format!("rename to {path}"), &e));
        }
        up.done = true;
        if let Some(dir) = up.target.parent()
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok((path, up.size))
    }

    /// Abort uploads nobody has written to for [`UPLOAD_IDLE`].
    fn expire_idle(&self) {
        let mut open = lock(&self.open);
        let idle: Vec<u64> = open
            .iter()
            .filter(|(_, u)| {
                u.try_lock()
                    .is_ok_and(|u| u.last_used.elapsed() > UPLOAD_IDLE)
            })
            .map(|(h, _)| *h)
            .collect();
        for h in idle {
            if let Some(u) = open.remove(&h) {
                lock(&u).discard();
            }
        }
    }

    /// Abort every open upload (the host went away): their temporary files are deleted.
    pub fn abort_all(&self) {
        let all: Vec<_> = lock(&self.open).drain().map(|(_, u)| u).collect();
        for up in all {
            lock(&up).discard();
        }
    }
}

fn kind(m: &std::fs::Metadata) -> FileKind {
    let t = m.file_type();
    if t.is_symlink() {
        FileKind::Symlink
    } else if t.is_dir() {
        FileKind::Dir
    } else if t.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    }
}

fn entry(path: &Path, m: &std::fs::Metadata) -> FileEntry {
    FileEntry {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        path: path.to_string_lossy().into_owned(),
        kind: kind(m),
        size: m.len(),
        mode: m.mode() & 0o7777,
        mtime: m.mtime(),
    }
}

pub fn stat(path: &str) -> Res<FileEntry> {
    let p = absolute(path)?;
    let m = std::fs::symlink_metadata(p).map_err(|e| Failure::io(format!("stat {path}"), &e))?;
    Ok(entry(p, &m))
}

pub fn read(path: &str, offset: u64, len: u64) -> Res<Reply> {
    let p = absolute(path)?;
    if len > MAX_FILE_CHUNK as u64 {
        return Err(Failure::bad(format!(
            "a file_read returns at most {MAX_FILE_CHUNK} bytes"
        )));
    }
    let mut f = File::open(p).map_err(|e| Failure::io(format!("open {path}"), &e))?;
    let m = f
        .metadata()
        .map_err(|e| Failure::io(format!("stat {path}"), &e))?;
    if m.is_dir() {
        return Err(Failure::new(
            ErrorCode::IsADirectory,
            format!("{path} is a directory"),
        ));
    }
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| Failure::io(format!("seek {path}"), &e))?;
    let mut buf = Vec::with_capacity(len as usize);
    f.take(len)
        .read_to_end(&mut buf)
        .map_err(|e| Failure::io(format!("read {path}"), &e))?;
    // Short read: the end. A regular file also ends at its size.
    let eof = (buf.len() as u64) < len || (m.is_file() && offset + buf.len() as u64 >= m.len());
    Ok(Reply::FileData {
        data: B64.encode(&buf),
        eof,
        size: m.len(),
    })
}

pub fn list(path: &str) -> Res<Reply> {
    let p = absolute(path)?;
    let dir = std::fs::read_dir(p).map_err(|e| Failure::io(format!("list {path}"), &e))?;
    let mut entries = Vec::new();
    let mut bytes = 0usize;
    let mut truncated = false;
    for d in dir {
        let d = d.map_err(|e| Failure::io(format!("list {path}"), &e))?;
        let child = d.path();
        let Ok(m) = std::fs::symlink_metadata(&child) else {
            continue; // removed meanwhile
        };
        let e = entry(&child, &m);
        bytes += e.name.len() + e.path.len() + 128;
        if entries.len() >= MAX_LIST_ENTRIES || bytes > MAX_LIST_BYTES {
            truncated = true;
            break;
        }
        entries.push(e);
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Reply::FileList { entries, truncated })
}

pub fn mkdir(path: &str, parents: bool) -> Res<()> {
    let p = absolute(path)?;
    let r = if parents {
        std::fs::create_dir_all(p)
    } else {
        std::fs::create_dir(p)
    };
    r.map_err(|e| Failure::io(format!("mkdir {path}"), &e))
}

pub fn remove(path: &str, recursive: bool) -> Res<()> {
    let p = absolute(path)?;
    if p.parent().is_none() {
        return Err(Failure::bad("refusing to remove /"));
    }
    let m = std::fs::symlink_metadata(p).map_err(|e| Failure::io(format!("stat {path}"), &e))?;
    let r = match (m.is_dir(), recursive) {
        (true, true) => std::fs::remove_dir_all(p),
        (true, false) => std::fs::remove_dir(p),
        (false, _) => std::fs::remove_file(p),
    };
    r.map_err(|e| Failure::io(format!("remove {path}"), &e))
}
