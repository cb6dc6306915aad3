//! The local chunk store, `$FORKD_HOME/cache/chunks/`: every chunk a pull or a lazy fork has
//! verified, kept as the stored (zstd) bytes under its digest, shared by every image. A pull
//! takes from here what it has and downloads only the rest, so a chunk that two images share
//! (the kernel, the Debian base, Python) crosses the network once.
//!
//! ```text
//! cache/chunks/<2 hex>/<64 hex>      stored bytes of the chunk sha256:<64 hex>
//! cache/chunks/<2 hex>/.tmp-*        a chunk being written (renamed into place when whole)
//! cache/manifests/<64 hex>.json      image manifests of pulled images: what `forkd gc` keeps
//! ```
//!
//! The store is a cache: nothing read from it is trusted. A chunk is used only if its bytes
//! hash to its name (a torn or tampered file is removed and fetched again), every path is
//! opened beneath a directory this forkd opened without following links, and a chunk is
//! renamed into place only once written whole, so a crash leaves at most a `.tmp-` file that
//! `forkd gc` removes.
//!
//! Why the stored bytes and not the raw ones: they are what the digest names, so a chunk is
//! verified before zstd sees it, exactly as one from the hub; and they are about a third of
//! the raw size. Installed images stay plain files (children map them); the cache costs the
//! image's download size again on disk, and `forkd gc` gives it back once no image needs it.

use crate::cache::{io_err, open_dir_at};
use crate::error::{HubError, Result};
use crate::layout::{self, Chunk, ImageManifest};
use crate::progress::Progress;
use crate::transport::Transport;
use bytes::Bytes;
use forkd_store::Home;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use sha2::{Digest as _, Sha256};
use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// Chunks of one pack whose stored bytes lie at most this far apart are fetched in one ranged
/// GET, the gap downloaded and dropped: a round trip (20 ms on the link bench/lazy.sh models)
/// costs more than 64 KiB at 100 Mbit/s (5 ms).
pub const MAX_GAP: u64 = 64 << 10;
/// Largest span one ranged GET asks for: big enough that a pull is a few hundred requests,
/// small enough that 8 of them in flight keep the link busy and a retry repeats little.
pub const MAX_SPAN: u64 = 4 << 20;

#[derive(Debug)]
pub struct ChunkStore {
    chunks: OwnedFd,
    manifests: OwnedFd,
    path: PathBuf,
    hits: AtomicU64,
}

fn hex_of(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(hex)
}

impl ChunkStore {
    /// Open (creating) the chunk store of `home`, each directory relative to its parent and
    /// never through a link.
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
        let chunks = open_dir_at(&cache, "chunks", &path)?;
        let manifests = open_dir_at(&cache, "manifests", &root.join("manifests"))?;
        Ok(ChunkStore {
            chunks,
            manifests,
            path,
            hits: AtomicU64::new(0),
        })
    }

    /// Stored bytes served from here so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    fn subdir(&self, hex: &str) -> Result<OwnedFd> {
        open_dir_at(&self.chunks, &hex[..2], &self.path.join(&hex[..2]))
    }

    /// Whether the store holds chunk `c` (by name; [`ChunkStore::get`] checks the bytes).
    pub fn contains(&self, c: &Chunk) -> bool {
        let Some(hex) = hex_of(&c.digest) else {
            return false;
        };
        rustix::fs::statat(
            &self.chunks,
            format!("{}/{hex}", &hex[..2]).as_str(),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .is_ok_and(|st| {
            FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
                && st.st_size as u64 == c.stored_size
        })
    }

    /// The stored bytes of chunk `c`, if the store has them and they hash to its digest. A
    /// file that does not is removed (the chunk is then fetched again).
    pub fn get(&self, c: &Chunk) -> Option<Bytes> {
        let hex = hex_of(&c.digest)?;
        let dir = self.subdir(hex).ok()?;
        let fd = rustix::fs::openat(
            &dir,
            hex,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .ok()?;
        let st = rustix::fs::fstat(&fd).ok()?;
        let mut ok = FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
            && st.st_size as u64 == c.stored_size;
        let mut data = Vec::new();
        if ok {
            data.reserve(c.stored_size as usize);
            ok = std::fs::File::from(fd)
                .take(c.stored_size)
                .read_to_end(&mut data)
                .is_ok()
                && hex::encode(Sha256::digest(&data)) == hex;
        }
        if !ok {
            tracing::warn!(
                "the cached chunk {} is damaged; removing it and fetching it again",
                c.digest
            );
            let _ = rustix::fs::unlinkat(&dir, hex, AtFlags::empty());
            return None;
        }
        self.hits.fetch_add(c.stored_size, Ordering::Relaxed);
        Some(Bytes::from(data))
    }

    /// Keep the stored bytes of a chunk whose digest the caller verified. Written under a
    /// temporary name and renamed into place, so a reader never sees part of a chunk.
    pub fn put(&self, digest: &str, data: &[u8]) -> Result<()> {
        let Some(hex) = hex_of(digest) else {
            return Ok(());
        };
        let dir = self.subdir(hex)?;
        if rustix::fs::statat(&dir, hex, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
            return Ok(());
        }
        let tmp = format!(".tmp-{hex}-{}-{}", std::process::id(), unique());
        let shown = self.path.join(&hex[..2]).join(&tmp);
        let fd = rustix::fs::openat(
            &dir,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(io_err(format!("cannot write {}", shown.display())))?;
        let written = std::fs::File::from(fd).write_all(data);
        if let Err(e) = written {
            let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
            return Err(HubError::Io {
                what: format!("cannot write the chunk cache {}", shown.display()),
                source: e,
            });
        }
        rustix::fs::renameat(&dir, tmp.as_str(), &dir, hex).map_err(|e| {
            let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
            io_err(format!("cannot write {}", shown.display()))(e)
        })
    }

    /// Keep the image manifest `body` (digest `digest`, verified by the caller) of an image
    /// being installed: `forkd gc` keeps the chunks of every installed image's manifest.
    pub fn remember(&self, digest: &str, body: &[u8]) -> Result<()> {
        let Some(hex) = hex_of(digest) else {
            return Ok(());
        };
        let name = format!("{hex}.json");
        let tmp = format!(".tmp-{hex}-{}-{}", std::process::id(), unique());
        let shown = self.path.with_file_name("manifests").join(&name);
        let fd = rustix::fs::openat(
            &self.manifests,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(io_err(format!("cannot write {}", shown.display())))?;
        std::fs::File::from(fd)
            .write_all(body)
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
    /// remembered manifest not in `keep`, and every `.tmp-` file not written by a live
    /// process of this store. `dry_run` counts without removing.
    pub fn gc(&self, keep: &HashSet<String>, dry_run: bool) -> Result<GcCount> {
        let mut count = GcCount::default();
        let mut wanted: HashSet<String> = HashSet::new();
        for (name, _) in list(&self.manifests)? {
            let Some(hex) = name
                .strip_suffix(".json")
                .filter(|h| hex_of(&format!("sha256:{h}")).is_some())
            else {
                count.removed_files += remove(&self.manifests, &name, dry_run);
                continue;
            };
            if !keep.contains(&format!("sha256:{hex}")) {
                count.manifests += 1;
                count.removed_files += remove(&self.manifests, &name, dry_run);
                continue;
            }
            match read_manifest(&self.manifests, &name) {
                Some(m) => wanted.extend(
                    m.files
                        .iter()
                        .flat_map(|f| f.chunks.iter().map(|c| c.digest.clone())),
                ),
                None => count.removed_files += remove(&self.manifests, &name, dry_run),
            }
        }
        for (sub, ty) in list(&self.chunks)? {
            let ok_sub = ty == FileType::Directory
                && sub.len() == 2
                && sub.bytes().all(|b| b.is_ascii_hexdigit());
            if !ok_sub {
                count.removed_files += remove(&self.chunks, &sub, dry_run);
                continue;
            }
            let dir = self.subdir(&sub)?;
            for (name, _) in list(&dir)? {
                let size = rustix::fs::statat(&dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                    .map(|s| s.st_blocks as u64 * 512)
                    .unwrap_or(0);
                let keep_it = if let Some(rest) = name.strip_prefix(".tmp-") {
                    // .tmp-<hex>-<pid>-<n>: kept while its writer may still be at it.
                    rest.split('-')
                        .nth(1)
                        .and_then(|p| p.parse::<i32>().ok())
                        .is_some_and(|pid| {
                            pid != std::process::id() as i32
                                && std::path::Path::new(&format!("/proc/{pid}")).exists()
                        })
                } else {
                    wanted.contains(&format!("sha256:{name}"))
                };
                if !keep_it {
                    count.chunks += 1;
                    count.bytes += size;
                    count.removed_files += remove(&dir, &name, dry_run);
                } else {
                    count.kept_chunks += 1;
                    count.kept_bytes += size;
                }
            }
        }
        Ok(count)
    }
}

/// What [`ChunkStore::gc`] removed (or would remove).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GcCount {
    /// Chunk files (and unfinished writes) no image needs.
    pub chunks: u64,
    /// Their size on disk.
    pub bytes: u64,
    /// Image manifests of images no longer installed.
    pub manifests: u64,
    /// Chunks kept, and their size on disk.
    pub kept_chunks: u64,
    pub kept_bytes: u64,
    #[serde(skip)]
    pub removed_files: u64,
}

fn unique() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn list(dir: &impl AsFd) -> Result<Vec<(String, FileType)>> {
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err("cannot list the chunk cache".into()))?;
    let mut out = Vec::new();
    let mut d =
        rustix::fs::Dir::read_from(&fd).map_err(io_err("cannot list the chunk cache".into()))?;
    for e in d.by_ref() {
        let e = e.map_err(io_err("cannot list the chunk cache".into()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != "." && name != ".." {
            out.push((name, e.file_type()));
        }
    }
    Ok(out)
}

/// Remove `name` under `dir` (a directory with what is in it); links are removed, never
/// followed. Returns 1 if it was (or, on a dry run, would be) removed.
fn remove(dir: &impl AsFd, name: &str, dry_run: bool) -> u64 {
    if dry_run {
        return 1;
    }
    if rustix::fs::unlinkat(dir, name, AtFlags::empty()).is_ok() {
        return 1;
    }
    // A directory: empty it first (its entries are files this cache wrote).
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
    u64::from(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).is_ok())
}

fn read_manifest(dir: &impl AsFd, name: &str) -> Option<ImageManifest> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .ok()?;
    let mut body = Vec::new();
    std::fs::File::from(fd)
        .take(layout::MAX_MANIFEST_BYTES)
        .read_to_end(&mut body)
        .ok()?;
    let hex = name.strip_suffix(".json")?;
    (hex::encode(Sha256::digest(&body)) == hex)
        .then(|| serde_json::from_slice(&body).ok())
        .flatten()
}

/// One ranged GET: consecutive chunks of a batch stored next to each other in one blob.
struct Span {
    key: String,
    start: u64,
    end: u64,
    /// (position in the batch, offset of its bytes from `start`, stored size)
    members: Vec<(usize, u64, u64)>,
}

/// Whether chunk `b` can join a ranged GET that ends with chunk `a` and began at `start`:
/// the same blob, after `a` and close to it, and the whole span not too long.
pub fn adjacent(a: &Chunk, b: &Chunk, start: u64) -> bool {
    let (ka, ra) = a.location();
    let (kb, rb) = b.location();
    ka == kb && rb.start >= ra.end && rb.start - ra.end <= MAX_GAP && rb.end - start <= MAX_SPAN
}

/// The stored bytes of each chunk of `batch`, in order, each checked against its digest
/// later by [`crate::fetch::unpack_chunk`]: from the local store when it has them, else from
/// the hub, chunks that lie next to each other in one blob in one ranged GET. The second
/// value is the number of bytes downloaded.
pub(crate) async fn get_chunks(
    hub: &dyn Transport,
    store: Option<&ChunkStore>,
    batch: &[&Chunk],
    attempts: u32,
    progress: &dyn Progress,
) -> Result<(Vec<(Bytes, bool)>, u64)> {
    let mut out: Vec<Option<(Bytes, bool)>> = vec![None; batch.len()];
    let mut spans: Vec<Span> = Vec::new();
    for (i, c) in batch.iter().enumerate() {
        if let Some(data) = store.and_then(|s| s.get(c)) {
            out[i] = Some((data, true));
            continue;
        }
        let (key, r) = c.location();
        match spans.last_mut() {
            Some(s)
                if s.key == key
                    && r.start >= s.end
                    && r.start - s.end <= MAX_GAP
                    && r.end - s.start <= MAX_SPAN =>
            {
                s.members.push((i, r.start - s.start, c.stored_size));
                s.end = r.end;
            }
            _ => spans.push(Span {
                key,
                start: r.start,
                end: r.end,
                members: vec![(i, 0, c.stored_size)],
            }),
        }
    }
    let mut downloaded = 0;
    let got = futures::future::try_join_all(spans.iter().map(|s| async move {
        let data = crate::remote::get_range_retry(hub, &s.key, s.start..s.end, attempts, progress)
            .await
            .map_err(crate::remote::transport_err(
                hub,
                format!(
                    "cannot download blob {} (bytes {}..{})",
                    s.key, s.start, s.end
                ),
            ))?;
        if data.len() as u64 != s.end - s.start {
            return Err(HubError::Corrupt {
                what: format!("{} bytes {}..{}", s.key, s.start, s.end),
                expected: format!("{} bytes", s.end - s.start),
                actual: format!("{} bytes", data.len()),
            });
        }
        Ok::<_, HubError>(data)
    }))
    .await?;
    for (s, data) in spans.iter().zip(got) {
        downloaded += data.len() as u64;
        for &(i, at, len) in &s.members {
            out[i] = Some((data.slice(at as usize..(at + len) as usize), false));
        }
    }
    Ok((
        out.into_iter()
            .map(|o| o.expect("every chunk got"))
            .collect(),
        downloaded,
    ))
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

    #[test]
    fn put_get_and_damage() {
        let t = tempfile::tempdir().unwrap();
        let home = Home::new(t.path());
        let s = ChunkStore::open(&home).unwrap();
        let c = chunk(b"hello chunk");
        assert!(s.get(&c).is_none());
        s.put(&c.digest, b"hello chunk").unwrap();
        assert!(s.contains(&c));
        assert_eq!(&s.get(&c).unwrap()[..], b"hello chunk");
        assert_eq!(s.hits(), 11);
        // Damaged bytes of the right size are refused and removed.
        let hex = hex_of(&c.digest).unwrap();
        let p = t.path().join("cache/chunks").join(&hex[..2]).join(hex);
        std::fs::write(&p, b"HELLO CHUNK").unwrap();
        assert!(s.get(&c).is_none());
        assert!(!p.exists());
        // A link in its place is not followed.
        std::os::unix::fs::symlink("/etc/hostname", &p).unwrap();
        assert!(s.get(&c).is_none());
    }

    #[test]
    fn gc_keeps_what_a_kept_manifest_lists() {
        let t = tempfile::tempdir().unwrap();
        let home = Home::new(t.path());
        let s = ChunkStore::open(&home).unwrap();
        let (a, b) = (chunk(b"kept"), chunk(b"dropped"));
        s.put(&a.digest, b"kept").unwrap();
        s.put(&b.digest, b"dropped").unwrap();
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
                chunks: vec![a.clone()],
            }],
            parent: None,
            working_set: None,
        };
        let body = serde_json::to_vec(&m).unwrap();
        let d = layout::sha256_digest(&body);
        s.remember(&d, &body).unwrap();
        let gone = s.remember(&layout::sha256_digest(b"x"), b"x");
        assert!(gone.is_ok());
        let keep = HashSet::from([d.clone()]);
        let dry = s.gc(&keep, true).unwrap();
        assert_eq!((dry.chunks, dry.manifests), (1, 1));
        assert!(s.contains(&b), "a dry run removes nothing");
        let n = s.gc(&keep, false).unwrap();
        assert_eq!((n.chunks, n.manifests, n.kept_chunks), (1, 1, 1));
        assert!(s.contains(&a) && !s.contains(&b));
        // Nothing kept: everything goes.
        let n = s.gc(&HashSet::new(), false).unwrap();
        assert_eq!((n.chunks, n.manifests), (1, 1));
        assert!(!s.contains(&a));
    }
}
