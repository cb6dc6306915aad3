//! The local chunk store, `$FORKD_HOME/cache/chunks/`: every chunk a pull or a lazy fork has
//! verified, kept as its stored (zstd) bytes, found by its digest, shared by every image. A
//! pull takes from here what it has and downloads only the rest, so a chunk that two images
//! share (the kernel, the Debian base, Python) crosses the network once.
//!
//! ```text
//! cache/chunks/<pid>-<start>-<n>.pack   stored bytes of chunks, one after another
//! cache/chunks/<pid>-<start>-<n>.idx    a line per chunk: "<64 hex> <offset> <length>"
//! cache/manifests/<64 hex>.json         image manifests of pulled images: what `forkd gc` keeps
//! ```
//!
//! Why segments and not a file per chunk: an image is about 20 000 chunks of 64 KiB on
//! average. As files, each was a create, a write and a rename in a directory, and a pull of
//! bench/pull.sh's image took 0.55 s longer with the store than without; in segments, a chunk
//! is one positioned write and one appended index line. Each store (each pull) appends to
//! segments of its own, named by its process and that process's start time, so no two
//! writers share a file; `forkd gc` rewrites a segment without the chunks no image needs, and
//! leaves alone the segments of a process that is still running.
//!
//! The store is a cache: nothing read from it is trusted. A chunk is used only if its bytes
//! hash to its digest (otherwise it is forgotten and fetched again), the index is read with a
//! cap and a malformed line (a torn write) is skipped, and every file is opened beneath a
//! directory opened without following links, and itself without following one. An index line
//! is appended only after the chunk's bytes are written, so a crash loses at most the chunks
//! being written.
//!
//! Why the stored bytes and not the raw ones: they are what the digest names, so a chunk is
//! verified before zstd sees it, exactly as one from the hub; and they are about a third of
//! the raw size. Installed images stay plain files that children map: chunks cut by content
//! do not sit on file system block boundaries, so images cannot share blocks with the store
//! (reflink) or with each other; the store costs the images' download size again on disk,
//! once per distinct chunk, and `forkd gc` gives it back when no image needs it.

use crate::cache::{io_err, open_dir_at};
use crate::error::{HubError, Result};
use crate::layout::{self, Chunk, ImageManifest};
use crate::reference::digest_hex as hex_of;
use bytes::Bytes;
use forkd_store::Home;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use sha2::{Digest as _, Sha256};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Largest index file read (about 750 000 chunks).
const MAX_INDEX_BYTES: u64 = 64 << 20;
/// Largest chunk the store lists (a hub chunk's stored size is at most 65 MiB).
const MAX_STORED: u64 = 65 << 20;
/// A writer starts a new segment past this size.
const SEGMENT_BYTES: u64 = 1 << 30;

/// Where a chunk's bytes are: segment number (into `Index::segs`), offset, length.
type Loc = (usize, u64, u64);
/// An index line: digest, offset, length.
type Entry = ([u8; 32], u64, u64);

#[derive(Default)]
struct Index {
    /// Segment stems (`<pid>-<start>-<n>`), and each one's pack once opened.
    segs: Vec<(String, Option<Arc<File>>)>,
    by_digest: HashMap<[u8; 32], Vec<Loc>>,
}

struct Writer {
    seg: usize,
    pack: Arc<File>,
    idx: File,
    end: u64,
}

pub struct ChunkStore {
    dir: OwnedFd,
    manifests: OwnedFd,
    path: PathBuf,
    index: RwLock<Index>,
    writer: Mutex<Option<Writer>>,
    /// This process's segment name prefix, `<pid>-<start>-`.
    me: String,
    hits: AtomicU64,
    /// Set after a write failed: the store is a cache, and a pull goes on without it.
    disabled: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for ChunkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkStore")
            .field("path", &self.path)
            .finish()
    }
}

fn key_of(digest: &str) -> Option<[u8; 32]> {
    let mut k = [0u8; 32];
    hex::decode_to_slice(hex_of(digest)?, &mut k).ok()?;
    Some(k)
}

fn open_at(dir: &impl AsFd, name: &str, flags: OFlags) -> rustix::io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    // A FIFO or a device planted in place of a segment is not read.
    if FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) != FileType::RegularFile {
        return Err(rustix::io::Errno::INVAL);
    }
    Ok(File::from(fd))
}

/// The entries of one index file: (digest, offset, length). Malformed lines are skipped.
fn read_index(dir: &impl AsFd, stem: &str) -> Vec<Entry> {
    let Ok(f) = open_at(
        dir,
        &format!("{stem}.idx"),
        OFlags::RDONLY | OFlags::NONBLOCK,
    ) else {
        return Vec::new();
    };
    let mut bytes = Vec::new();
    if f.take(MAX_INDEX_BYTES).read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    // Line by line: garbage in one line (a torn write) loses that line only.
    bytes
        .split(|&b| b == b'\n')
        .filter_map(|l| {
            let l = std::str::from_utf8(l).ok()?;
            let mut it = l.split(' ');
            let mut k = [0u8; 32];
            hex::decode_to_slice(it.next()?, &mut k).ok()?;
            let off: u64 = it.next()?.parse().ok()?;
            let len: u64 = it.next()?.parse().ok()?;
            let sane = len > 0 && len <= MAX_STORED && off.checked_add(len).is_some();
            (it.next().is_none() && sane).then_some((k, off, len))
        })
        .collect()
}

/// Whether the process that names a segment stem `<pid>-<start>-<n>` is still running.
fn writer_alive(stem: &str) -> bool {
    let mut it = stem.split('-');
    let (Some(pid), Some(start)) = (
        it.next().and_then(|p| p.parse::<u32>().ok()),
        it.next().and_then(|s| s.parse::<u64>().ok()),
    ) else {
        return false;
    };
    forkd_store::process_start_time(pid) == Some(start)
}

impl ChunkStore {
    /// Open (creating) the chunk store of `home`, each directory relative to its parent and
    /// never through a link, and read its index.
    pub fn open(home: &Home) -> Result<ChunkStore> {
        let root = home.cache_dir();
        let home_fd = rustix::fs::open(
            home.path(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err(format!("cannot open {}", home.path().display())))?;
        let name = root.file_name().and_then(|n| n.to_str()).unwrap_or("cache");
        let cache = open_dir_at(&home_fd, name, &root)?;
        let path = root.join("chunks");
        let dir = open_dir_at(&cache, "chunks", &path)?;
        let manifests = open_dir_at(&cache, "manifests", &root.join("manifests"))?;
        let pid = std::process::id();
        let me = format!(
            "{pid}-{}-",
            forkd_store::process_start_time(pid).unwrap_or(0)
        );
        let mut index = Index::default();
        for stem in stems(&dir)? {
            let seg = index.segs.len();
            for (k, off, len) in read_index(&dir, &stem) {
                index.by_digest.entry(k).or_default().push((seg, off, len));
            }
            index.segs.push((stem, None));
        }
        Ok(ChunkStore {
            dir,
            manifests,
            path,
            index: RwLock::new(index),
            writer: Mutex::new(None),
            me,
            hits: AtomicU64::new(0),
            disabled: Default::default(),
        })
    }

    /// Stored bytes served from here so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Whether the store lists chunk `c` ([`ChunkStore::get`] checks the bytes).
    pub fn contains(&self, c: &Chunk) -> bool {
        let Some(k) = key_of(&c.digest) else {
            return false;
        };
        let ix = self.index.read().unwrap_or_else(|p| p.into_inner());
        ix.by_digest
            .get(&k)
            .is_some_and(|v| v.iter().any(|&(_, _, len)| len == c.stored_size))
    }

    fn pack(&self, seg: usize) -> Option<Arc<File>> {
        {
            let ix = self.index.read().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = &ix.segs.get(seg)?.1 {
                return Some(f.clone());
            }
        }
        let mut ix = self.index.write().unwrap_or_else(|p| p.into_inner());
        let stem = ix.segs.get(seg)?.0.clone();
        let f = Arc::new(
            open_at(
                &self.dir,
                &format!("{stem}.pack"),
                OFlags::RDONLY | OFlags::NONBLOCK,
            )
            .ok()?,
        );
        ix.segs[seg].1 = Some(f.clone());
        Some(f)
    }

    /// The stored bytes of chunk `c`, if the store has them and they hash to its digest. A
    /// place that does not hold them is forgotten (the chunk is then fetched again).
    pub fn get(&self, c: &Chunk) -> Option<Bytes> {
        let k = key_of(&c.digest)?;
        let locs = {
            let ix = self.index.read().unwrap_or_else(|p| p.into_inner());
            ix.by_digest.get(&k)?.clone()
        };
        for loc @ (seg, off, len) in locs {
            let ok = (len == c.stored_size)
                .then(|| self.pack(seg))
                .flatten()
                .and_then(|f| {
                    let mut buf = vec![0u8; len as usize];
                    f.read_exact_at(&mut buf, off).ok()?;
                    (Sha256::digest(&buf)[..] == k[..]).then_some(buf)
                });
            match ok {
                Some(buf) => {
                    self.hits.fetch_add(len, Ordering::Relaxed);
                    return Some(Bytes::from(buf));
                }
                None => {
                    tracing::warn!(
                        "the cached chunk {} is damaged or gone; fetching it again",
                        c.digest
                    );
                    let mut ix = self.index.write().unwrap_or_else(|p| p.into_inner());
                    if let Some(v) = ix.by_digest.get_mut(&k) {
                        v.retain(|l| *l != loc);
                        if v.is_empty() {
                            ix.by_digest.remove(&k);
                        }
                    }
                }
            }
        }
        None
    }

    /// A new segment of this process's, open for writing.
    fn new_segment(&self) -> Result<Writer> {
        static N: AtomicU64 = AtomicU64::new(0);
        let stem = format!("{}{}", self.me, N.fetch_add(1, Ordering::Relaxed));
        let create = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL;
        let shown = |ext: &str| self.path.join(format!("{stem}.{ext}"));
        let pack = open_at(&self.dir, &format!("{stem}.pack"), create)
            .map_err(io_err(format!("cannot create {}", shown("pack").display())))?;
        let idx = open_at(&self.dir, &format!("{stem}.idx"), create | OFlags::APPEND)
            .map_err(io_err(format!("cannot create {}", shown("idx").display())))?;
        let pack = Arc::new(pack);
        let mut ix = self.index.write().unwrap_or_else(|p| p.into_inner());
        ix.segs.push((stem, Some(pack.clone())));
        Ok(Writer {
            seg: ix.segs.len() - 1,
            pack,
            idx,
            end: 0,
        })
    }

    /// Keep the stored bytes of a chunk whose digest the caller verified: written, then listed
    /// in the index, so a reader never finds part of a chunk. Never fails: the store is a
    /// cache, so after a write error (a full disk, a store made by another user) it warns once
    /// and keeps nothing more, and the pull goes on without it.
    pub fn put(&self, digest: &str, data: &[u8]) {
        let Some(k) = key_of(digest) else {
            return;
        };
        if self.disabled.load(Ordering::Relaxed) {
            return;
        }
        {
            let ix = self.index.read().unwrap_or_else(|p| p.into_inner());
            // A place that was found damaged is gone from the list: store the good bytes.
            if ix.by_digest.get(&k).is_some_and(|v| !v.is_empty()) {
                return;
            }
        }
        if let Err(e) = self.append(k, data)
            && !self.disabled.swap(true, Ordering::Relaxed)
        {
            tracing::warn!("not keeping chunks in the local chunk store any more: {e}");
        }
    }

    /// Write a chunk's stored bytes to this process's segment and list them.
    fn append(&self, k: [u8; 32], data: &[u8]) -> Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if w.as_ref().is_none_or(|w| w.end >= SEGMENT_BYTES) {
            *w = Some(self.new_segment()?);
        }
        let w = w.as_mut().expect("a segment");
        let off = w.end;
        let shown = || format!("cannot write the chunk store {}", self.path.display());
        w.pack
            .write_all_at(data, off)
            .map_err(HubError::io(shown()))?;
        w.end += data.len() as u64;
        // One write per line: `writeln!` on a File writes each formatted piece on its own,
        // a handful of system calls per chunk, and some 20 000 chunks per image.
        let line = format!("{} {off} {}\n", hex::encode(k), data.len());
        w.idx
            .write_all(line.as_bytes())
            .map_err(HubError::io(shown()))?;
        let seg = w.seg;
        let mut ix = self.index.write().unwrap_or_else(|p| p.into_inner());
        ix.by_digest
            .entry(k)
            .or_default()
            .push((seg, off, data.len() as u64));
        Ok(())
    }

    /// Keep the image manifest `body` (digest `digest`, verified by the caller) of an image
    /// being installed: `forkd gc` keeps the chunks of every installed image's manifest.
    pub fn remember(&self, digest: &str, body: &[u8]) -> Result<()> {
        let Some(hex) = hex_of(digest) else {
            return Ok(());
        };
        let name = format!("{hex}.json");
        let tmp = format!(".tmp-{}{hex}", self.me);
        let shown = self.path.with_file_name("manifests").join(&name);
        let _ = rustix::fs::unlinkat(&self.manifests, tmp.as_str(), AtFlags::empty());
        let mut f = open_at(
            &self.manifests,
            &tmp,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
        )
        .map_err(io_err(format!("cannot write {}", shown.display())))?;
        f.write_all(body)
            .map_err(HubError::io(format!("cannot write {}", shown.display())))?;
        rustix::fs::renameat(
            &self.manifests,
            tmp.as_str(),
            &self.manifests,
            name.as_str(),
        )
        .map_err(io_err(format!("cannot write {}", shown.display())))
    }

    /// Remove every chunk that none of the image manifests `keep` (by digest) lists, every
    /// remembered manifest not in `keep` (unless a pull holds its lock in `locks`), and every
    /// file that is not part of a segment. A segment whose writer still runs is left alone. In
    /// a segment with chunks to keep and to drop, the dropped ones are punched out (their
    /// blocks freed in place, the index written again without them): gc needs no free space,
    /// which is when it is run. `dry_run` counts without removing.
    pub fn gc(
        &self,
        keep: &HashSet<String>,
        locks: &std::path::Path,
        dry_run: bool,
    ) -> Result<GcCount> {
        let mut count = GcCount::default();
        let mut wanted: HashSet<[u8; 32]> = HashSet::new();
        for (name, _) in list(&self.manifests)? {
            let hex = name
                .strip_suffix(".json")
                .filter(|h| hex_of(&format!("sha256:{h}")).is_some());
            let Some(hex) = hex else {
                // `.tmp-<pid>-<start>-<hex>` of a live writer is about to be renamed.
                let live = name.strip_prefix(".tmp-").is_some_and(writer_alive);
                if !live {
                    remove(&self.manifests, &name, dry_run);
                }
                continue;
            };
            if !keep.contains(&format!("sha256:{hex}")) {
                // A pull holds its image's lock from before it remembers the manifest until
                // the image is installed: then `keep` did not know it yet.
                let lock = locks.join(format!("{hex}.lock"));
                let held = lock.exists()
                    && forkd_store::FileLock::try_exclusive(&lock)
                        .map(|l| l.is_none())
                        .unwrap_or(true);
                if !held {
                    count.manifests += 1;
                    remove(&self.manifests, &name, dry_run);
                    continue;
                }
            }
            match read_manifest(&self.manifests, &name) {
                Some(m) => wanted.extend(
                    m.files
                        .iter()
                        .flat_map(|f| f.chunks.iter().filter_map(|c| key_of(&c.digest))),
                ),
                None => {
                    remove(&self.manifests, &name, dry_run);
                }
            }
        }
        let live = |stem: &str| stem.starts_with(&self.me) || writer_alive(stem);
        let stems = stems(&self.dir)?;
        // Anything else in the directory: old layouts, strays, halves of a dead segment.
        for (name, _) in list(&self.dir)? {
            let stem = name
                .strip_suffix(".pack")
                .or_else(|| name.strip_suffix(".idx"));
            let part_of_segment = stem.is_some_and(|s| stems.iter().any(|t| t == s) || live(s));
            if !part_of_segment {
                count.chunks += 1;
                count.bytes += allocated(&self.dir, &name);
                remove(&self.dir, &name, dry_run);
            }
        }
        let mut seen: HashSet<[u8; 32]> = HashSet::new();
        for stem in stems {
            let entries = read_index(&self.dir, &stem);
            let pack_name = format!("{stem}.pack");
            let idx_name = format!("{stem}.idx");
            let size = allocated(&self.dir, &pack_name);
            if live(&stem) {
                count.kept_chunks += entries.len() as u64;
                count.kept_bytes += size;
                seen.extend(entries.iter().map(|e| e.0));
                continue;
            }
            // Kept: the first place of each wanted chunk.
            let (kept, dropped): (Vec<Entry>, Vec<Entry>) = entries
                .into_iter()
                .partition(|(k, _, _)| wanted.contains(k) && seen.insert(*k));
            let kept_bytes = kept.iter().fold(0u64, |a, e| a.saturating_add(e.2));
            count.kept_chunks += kept.len() as u64;
            count.kept_bytes += kept_bytes.min(size);
            if kept.is_empty() {
                // Nothing to keep (or an index with nothing valid in it): the whole segment.
                count.chunks += dropped.len() as u64;
                count.bytes += size + allocated(&self.dir, &idx_name);
                // The index goes first: a pack without one is a stray, never half read.
                remove(&self.dir, &idx_name, dry_run);
                remove(&self.dir, &pack_name, dry_run);
                continue;
            }
            if dropped.is_empty() {
                continue;
            }
            count.chunks += dropped.len() as u64;
            count.bytes += size.saturating_sub(kept_bytes);
            if dry_run {
                continue;
            }
            // The index without the dropped chunks replaces the old one (renamed into place),
            // then their bytes are punched out of the pack.
            let tmp = format!(".tmp-{}{stem}.idx", self.me);
            let mut text = String::new();
            for (k, off, len) in &kept {
                text.push_str(&format!("{} {off} {len}\n", hex::encode(k)));
            }
            let shown = || format!("cannot rewrite {}", self.path.join(&idx_name).display());
            let _ = rustix::fs::unlinkat(&self.dir, tmp.as_str(), AtFlags::empty());
            let mut f = open_at(
                &self.dir,
                &tmp,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
            )
            .map_err(io_err(shown()))?;
            f.write_all(text.as_bytes())
                .map_err(HubError::io(shown()))?;
            rustix::fs::renameat(&self.dir, tmp.as_str(), &self.dir, idx_name.as_str())
                .map_err(io_err(shown()))?;
            if let Ok(pack) = open_at(&self.dir, &pack_name, OFlags::RDWR | OFlags::NONBLOCK) {
                for (_, off, len) in &dropped {
                    let _ = rustix::fs::fallocate(
                        &pack,
                        rustix::fs::FallocateFlags::PUNCH_HOLE
                            | rustix::fs::FallocateFlags::KEEP_SIZE,
                        *off,
                        *len,
                    );
                }
            }
        }
        Ok(count)
    }
}

/// The stems of the segments in `dir`: names with both a `.pack` and an `.idx`.
fn stems(dir: &impl AsFd) -> Result<Vec<String>> {
    let names: HashSet<String> = list(dir)?.into_iter().map(|(n, _)| n).collect();
    let mut out: Vec<String> = names
        .iter()
        .filter_map(|n| n.strip_suffix(".pack"))
        .filter(|s| names.contains(&format!("{s}.idx")))
        .map(str::to_string)
        .collect();
    out.sort();
    Ok(out)
}

/// What [`ChunkStore::gc`] removed (or would remove).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GcCount {
    /// Chunks (and stray files) no image needs.
    pub chunks: u64,
    /// The disk they take.
    pub bytes: u64,
    /// Image manifests of images no longer installed.
    pub manifests: u64,
    /// Chunks kept, and the disk they take.
    pub kept_chunks: u64,
    pub kept_bytes: u64,
}

fn allocated(dir: &impl AsFd, name: &str) -> u64 {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .map(|s| s.st_blocks as u64 * 512)
        .unwrap_or(0)
}

fn list(dir: &impl AsFd) -> Result<Vec<(String, FileType)>> {
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err("cannot list the chunk store".into()))?;
    let mut out = Vec::new();
    let mut d =
        rustix::fs::Dir::read_from(&fd).map_err(io_err("cannot list the chunk store".into()))?;
    for e in d.by_ref() {
        let e = e.map_err(io_err("cannot list the chunk store".into()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != "." && name != ".." {
            out.push((name, e.file_type()));
        }
    }
    Ok(out)
}

/// Remove `name` under `dir` (a directory with what is in it, one level: what this store or
/// an older layout of it wrote); links are removed, never followed.
fn remove(dir: &impl AsFd, name: &str, dry_run: bool) {
    if dry_run || rustix::fs::unlinkat(dir, name, AtFlags::empty()).is_ok() {
        return;
    }
    if let Ok(sub) = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        for (n, _) in list(&sub).unwrap_or_default() {
            let _ = rustix::fs::unlinkat(&sub, n.as_str(), AtFlags::empty());
        }
    }
    let _ = rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR);
}

fn read_manifest(dir: &impl AsFd, name: &str) -> Option<ImageManifest> {
    let f = open_at(dir, name, OFlags::RDONLY | OFlags::NONBLOCK).ok()?;
    let mut body = Vec::new();
    f.take(layout::MAX_MANIFEST_BYTES)
        .read_to_end(&mut body)
        .ok()?;
    let hex = name.strip_suffix(".json")?;
    (hex::encode(Sha256::digest(&body)) == hex)
        .then(|| layout::decode_manifest(&body).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(data: &[u8]) -> Chunk {
        Chunk {
            offset: 0,
            len: 1,
            digest: layout::sha256_digest(data),
            stored_size: data.len() as u64,
            pack: None,
            pack_offset: None,
        }
    }

    fn segments(home: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(home.join("cache/chunks"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "pack"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn put_get_reopen_and_damage() {
        let t = tempfile::tempdir().unwrap();
        let home = Home::new(t.path());
        let s = ChunkStore::open(&home).unwrap();
        let (a, b) = (chunk(b"hello chunk"), chunk(b"another one"));
        assert!(s.get(&a).is_none());
        s.put(&a.digest, b"hello chunk");
        s.put(&b.digest, b"another one");
        s.put(&a.digest, b"hello chunk");
        assert!(s.contains(&a));
        assert_eq!(&s.get(&a).unwrap()[..], b"hello chunk");
        assert_eq!(s.hits(), 11);
        let packs = segments(t.path());
        assert_eq!(packs.len(), 1);
        assert_eq!(
            std::fs::metadata(&packs[0]).unwrap().len(),
            22,
            "stored once each"
        );
        // Another process (a new store) finds them through the index.
        drop(s);
        let s = ChunkStore::open(&home).unwrap();
        assert_eq!(&s.get(&b).unwrap()[..], b"another one");
        // Damaged bytes are refused and forgotten.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&packs[0])
            .unwrap();
        f.write_all_at(b"HELLO", 0).unwrap();
        assert!(s.get(&a).is_none());
        assert!(!s.contains(&a));
        // A link in place of a segment is not followed.
        drop(s);
        std::fs::remove_file(&packs[0]).unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"xxxxxxxxxxxanother one").unwrap();
        std::os::unix::fs::symlink(&victim, &packs[0]).unwrap();
        let s = ChunkStore::open(&home).unwrap();
        assert!(s.get(&b).is_none());
    }

    #[test]
    fn gc_keeps_what_a_kept_manifest_lists() {
        let t = tempfile::tempdir().unwrap();
        let home = Home::new(t.path());
        let s = ChunkStore::open(&home).unwrap();
        let (a, b) = (chunk(b"kept"), chunk(b"dropped"));
        s.put(&a.digest, b"kept");
        s.put(&b.digest, b"dropped");
        let m = ImageManifest {
            layout: layout::LAYOUT,
            media_type: layout::MEDIA_TYPE.into(),
            chunking: layout::Chunking::fastcdc(),
            compression: "zstd".into(),
            manifest_toml: String::new(),
            files: vec![layout::FileEntry {
                name: "f".into(),
                size: 1,
                sha256: String::new(),
                chunking: None,
                chunks: vec![a.clone()],
            }],
            parent: None,
            working_set: None,
        };
        let body = serde_json::to_vec(&m).unwrap();
        let d = layout::sha256_digest(&body);
        s.remember(&d, &body).unwrap();
        s.remember(&layout::sha256_digest(b"x"), b"x").unwrap();
        drop(s);
        // The segment's writer is gone once it is renamed to another process's name.
        let old = segments(t.path()).remove(0);
        let stem = old.file_stem().unwrap().to_str().unwrap().to_string();
        let dead = "1-1-0";
        std::fs::rename(&old, old.with_file_name(format!("{dead}.pack"))).unwrap();
        std::fs::rename(
            old.with_file_name(format!("{stem}.idx")),
            old.with_file_name(format!("{dead}.idx")),
        )
        .unwrap();
        let s = ChunkStore::open(&home).unwrap();
        let keep = HashSet::from([d.clone()]);
        let dry = s.gc(&keep, &t.path().join("cache/locks"), true).unwrap();
        assert_eq!((dry.chunks, dry.manifests, dry.kept_chunks), (1, 1, 1));
        assert!(s.contains(&b), "a dry run removes nothing");
        let n = s.gc(&keep, &t.path().join("cache/locks"), false).unwrap();
        assert_eq!((n.chunks, n.manifests, n.kept_chunks), (1, 1, 1));
        drop(s);
        let s = ChunkStore::open(&home).unwrap();
        assert!(s.get(&a).is_some() && !s.contains(&b));
        // The dropped chunk's bytes were punched out in place (it was stored after "kept").
        let pack = t.path().join(format!("cache/chunks/{dead}.pack"));
        let bytes = std::fs::read(&pack).unwrap();
        assert_eq!(&bytes[..4], b"kept");
        assert_eq!(
            &bytes[4..],
            &[0u8; 7],
            "the dropped chunk's bytes are still there"
        );
        // A manifest whose pull holds its lock is kept though no installed image names it.
        std::fs::create_dir_all(t.path().join("cache/locks")).unwrap();
        let hex = d.strip_prefix("sha256:").unwrap();
        let lock = forkd_store::FileLock::exclusive(
            &t.path().join(format!("cache/locks/{hex}.lock")),
            |_| {},
        )
        .unwrap();
        let n = s
            .gc(&HashSet::new(), &t.path().join("cache/locks"), false)
            .unwrap();
        assert_eq!((n.chunks, n.manifests, n.kept_chunks), (0, 0, 1), "{n:?}");
        // Without the lock, nothing is kept: the segment goes whole.
        drop(lock);
        let n = s
            .gc(&HashSet::new(), &t.path().join("cache/locks"), false)
            .unwrap();
        assert_eq!((n.chunks, n.manifests, n.kept_chunks), (1, 1, 0), "{n:?}");
        assert!(!pack.exists());
    }
}
