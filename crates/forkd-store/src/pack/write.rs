//! Writing a pack from an installed image.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::tarfmt::{self, padding};
use super::{PackError, Progress, invalid};
use crate::fsutil::{IoContext, sync_dir, unique_name};
use crate::manifest::MANIFEST_NAME;
use crate::sparse::{CHUNK, hash_zeros, scan};
use crate::store::Snapshot;

#[derive(Debug, Clone)]
pub struct PackOptions {
    /// zstd level (1-19; 3 is the default).
    pub level: i32,
    /// zstd worker threads; 0 = one per CPU.
    pub workers: u32,
    /// Non-zero data of one file kept in memory between reading and compressing it, so that it
    /// is read once. A file with more is read twice (found, then streamed) instead.
    pub memory_budget: usize,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            level: 3,
            workers: 0,
            memory_budget: 256 << 20,
        }
    }
}

/// What a pack run did.
#[derive(Debug, Clone, Default)]
pub struct PackStats {
    /// Sum of the files' logical sizes.
    pub logical_bytes: u64,
    /// Bytes given to the compressor as file data (holes and zero blocks excluded).
    pub data_bytes: u64,
    /// Size of the compressed output.
    pub packed_bytes: u64,
}

/// Pack `snapshot` into the file `out`, written as `out.tmp-…` and renamed on success (never a
/// partial file at `out`).
pub fn pack(
    snapshot: &Snapshot,
    out: &Path,
    opts: &PackOptions,
    progress: &dyn Progress,
) -> Result<PackStats, PackError> {
    let file_name = out
        .file_name()
        .ok_or_else(|| invalid(format!("{} is not a file path", out.display())))?;
    let tmp = out.with_file_name(format!(
        "{}.tmp-{}",
        file_name.to_string_lossy(),
        unique_name("")
    ));
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .at("cannot create", &tmp)?;
    let result = (|| {
        let w = CountingWriter {
            inner: BufWriter::with_capacity(1 << 20, file),
            count: 0,
        };
        let (mut stats, w) = pack_to_writer(snapshot, w, opts, progress)?;
        stats.packed_bytes = w.count;
        let file = w
            .inner
            .into_inner()
            .map_err(|e| PackError::Write(e.into_error()))?;
        file.sync_all().at("cannot sync", &tmp)?;
        fs::rename(&tmp, out).at("cannot create", out)?;
        if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(dir)?;
        }
        Ok(stats)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Pack `snapshot` into `w` (one zstd frame); returns the stats and `w` back.
/// `packed_bytes` is left 0 (the caller knows what it wrote).
pub fn pack_to_writer<W: Write>(
    snapshot: &Snapshot,
    w: W,
    opts: &PackOptions,
    progress: &dyn Progress,
) -> Result<(PackStats, W), PackError> {
    let m = &snapshot.manifest;
    let mut enc = zstd::stream::write::Encoder::new(w, opts.level).map_err(PackError::Write)?;
    let workers = if opts.workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    } else {
        opts.workers
    };
    enc.multithread(workers).map_err(PackError::Write)?;
    enc.include_checksum(true).map_err(PackError::Write)?;
    let mtime = m.created_at.as_second().max(0) as u64;
    let mut stats = PackStats {
        logical_bytes: m.total_size(),
        ..Default::default()
    };
    progress.start(stats.logical_bytes);

    let mpath = snapshot.path(MANIFEST_NAME);
    let mtext = fs::read(&mpath).at("cannot read", &mpath)?;
    write_all(
        &mut enc,
        &tarfmt::regular(MANIFEST_NAME, mtext.len() as u64, mtime)?,
    )?;
    write_all(&mut enc, &mtext)?;
    write_all(&mut enc, &[0u8; 512][..padding(mtext.len() as u64)])?;

    let mut buf = vec![0u8; CHUNK];
    for (name, entry) in &m.files {
        let path = snapshot.path(name);
        let file = File::open(&path).at("cannot open", &path)?;
        let len = file.metadata().at("cannot stat", &path)?.len();
        if len != entry.size {
            return Err(corrupt_size(snapshot, name, len, entry.size));
        }
        // One read finds the non-zero blocks, hashes the content and keeps the data (up to a
        // budget); only files with more non-zero data than that are read a second time.
        let scan = scan(&file, len, opts.memory_budget).at("cannot read", &path)?;
        let extents = scan.extents;
        let dense = len == 0 || (extents.len() == 1 && extents[0] == (0..len));
        let header = if dense {
            tarfmt::regular(name, len, mtime)?
        } else {
            tarfmt::sparse(name, len, &extents, mtime)?
        };
        let stored: u64 = extents.iter().map(|r| r.end - r.start).sum();
        let actual = match scan.kept {
            Some((data, digest)) => {
                check_digest(snapshot, name, &entry.sha256, digest)?;
                write_all(&mut enc, &header)?;
                for c in data.chunks(CHUNK) {
                    write_all(&mut enc, c)?;
                    progress.advance(c.len() as u64);
                }
                progress.advance(len - stored);
                None
            }
            None => {
                write_all(&mut enc, &header)?;
                Some(stream_extents(
                    &file, &path, &extents, len, &mut enc, &mut buf, progress,
                )?)
            }
        };
        if let Some(actual) = actual {
            check_digest(snapshot, name, &entry.sha256, actual)?;
        }
        write_all(&mut enc, &[0u8; 512][..padding(stored)])?;
        stats.data_bytes += stored;
    }
    write_all(&mut enc, &[0u8; 1024])?;
    let w = enc.finish().map_err(PackError::Write)?;
    Ok((stats, w))
}

/// Read `extents` of `file` again, hash the content (zeros for the gaps) and compress the data.
fn stream_extents(
    file: &File,
    path: &Path,
    extents: &[std::ops::Range<u64>],
    len: u64,
    enc: &mut impl Write,
    buf: &mut [u8],
    progress: &dyn Progress,
) -> Result<String, PackError> {
    let mut hasher = Sha256::new();
    let mut pos = 0u64;
    for r in extents {
        hash_zeros(&mut hasher, r.start - pos);
        progress.advance(r.start - pos);
        let mut off = r.start;
        while off < r.end {
            let n = ((r.end - off) as usize).min(CHUNK);
            file.read_exact_at(&mut buf[..n], off)
                .at("cannot read (did it change while packing?)", path)?;
            hasher.update(&buf[..n]);
            write_all(enc, &buf[..n])?;
            off += n as u64;
            progress.advance(n as u64);
        }
        pos = r.end;
    }
    hash_zeros(&mut hasher, len - pos);
    progress.advance(len - pos);
    Ok(hex::encode(hasher.finalize()))
}

fn check_digest(s: &Snapshot, name: &str, expected: &str, actual: String) -> Result<(), PackError> {
    if actual == expected {
        return Ok(());
    }
    Err(PackError::Corrupt {
        tag: s.tag.to_string(),
        name: name.to_string(),
        expected: expected.to_string(),
        actual,
    })
}

fn write_all(w: &mut impl Write, data: &[u8]) -> Result<(), PackError> {
    w.write_all(data).map_err(PackError::Write)
}

fn corrupt_size(s: &Snapshot, name: &str, len: u64, expected: u64) -> PackError {
    PackError::Image(format!(
        "image `{}` is corrupt: {name} is {len} bytes but its manifest says {expected}",
        s.tag
    ))
}
