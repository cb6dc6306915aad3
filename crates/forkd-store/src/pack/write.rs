//! Writing a pack from an installed image.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use super::once::{Body, Encoder, Spill, encoder, read_once};
use super::tarfmt::{self, padding};
use super::{PackError, Progress, invalid};
use crate::fsutil::{IoContext, sync_dir, unique_name};
use crate::manifest::MANIFEST_NAME;
use crate::sparse::CHUNK;
use crate::store::Snapshot;

#[derive(Debug, Clone)]
pub struct PackOptions {
    /// zstd level (1-19; 3 is the default).
    pub level: i32,
    /// zstd worker threads; 0 = one per CPU.
    pub workers: u32,
    /// Non-zero data of one file kept in memory between reading it and writing its tar entry
    /// (whose header, with the sparse map, must come first). A file with more is compressed
    /// while it is read into an unlinked temporary file next to the output (one zstd frame),
    /// then copied into the pack: every file is read exactly once either way.
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
    refuse_branch(snapshot)?;
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
        let dir = out.parent().filter(|p| !p.as_os_str().is_empty());
        let dir = dir.unwrap_or(Path::new("."));
        let (mut stats, w) = pack_frames(snapshot, w, opts, dir, progress)?;
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

/// A pack holds one whole image: a branch (only its changes over a parent) is refused.
fn refuse_branch(snapshot: &Snapshot) -> Result<(), PackError> {
    if snapshot.manifest.is_branch() {
        return Err(PackError::Branch {
            tag: snapshot.tag.to_string(),
            parent: snapshot
                .manifest
                .parent_tag
                .clone()
                .unwrap_or_else(|| "its parent".into()),
        });
    }
    Ok(())
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

/// Pack `snapshot` into `w`; returns the stats and `w` back. `packed_bytes` is left 0 (the
/// caller knows what it wrote). Spill files (see [`PackOptions::memory_budget`]) go to the
/// system's temporary directory.
pub fn pack_to_writer<W: Write>(
    snapshot: &Snapshot,
    w: W,
    opts: &PackOptions,
    progress: &dyn Progress,
) -> Result<(PackStats, W), PackError> {
    refuse_branch(snapshot)?;
    pack_frames(snapshot, w, opts, &std::env::temp_dir(), progress)
}

/// The zstd output: a sequence of frames. Every file is read once; a file's data that was
/// compressed on the side (over the memory budget) is spliced in as its own frame.
struct Frames<W: Write> {
    enc: Option<Encoder<W>>,
    level: i32,
    workers: u32,
}

impl<W: Write> Frames<W> {
    fn write_all(&mut self, data: &[u8]) -> Result<(), PackError> {
        let enc = self.enc.as_mut().expect("encoder present between frames");
        enc.write_all(data).map_err(PackError::Write)
    }

    /// End the current frame, copy the complete frame `frame` verbatim, start a new frame.
    fn splice(&mut self, frame: &mut File) -> Result<(), PackError> {
        let enc = self.enc.take().expect("encoder present between frames");
        let mut w = enc.finish().map_err(PackError::Write)?;
        io::copy(frame, &mut w).map_err(PackError::Write)?;
        self.enc = Some(encoder(w, self.level, self.workers)?);
        Ok(())
    }

    fn finish(mut self) -> Result<W, PackError> {
        let enc = self.enc.take().expect("encoder present between frames");
        enc.finish().map_err(PackError::Write)
    }
}

fn pack_frames<W: Write>(
    snapshot: &Snapshot,
    w: W,
    opts: &PackOptions,
    spill_dir: &Path,
    progress: &dyn Progress,
) -> Result<(PackStats, W), PackError> {
    let m = &snapshot.manifest;
    let workers = if opts.workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    } else {
        opts.workers
    };
    let mut out = Frames {
        enc: Some(encoder(w, opts.level, workers)?),
        level: opts.level,
        workers,
    };
    let spill = Spill {
        budget: opts.memory_budget,
        dir: spill_dir,
        level: opts.level,
        workers,
    };
    let mtime = m.created_at.as_second().max(0) as u64;
    let mut stats = PackStats {
        logical_bytes: m.total_size(),
        ..Default::default()
    };
    progress.start(stats.logical_bytes);

    let mpath = snapshot.path(MANIFEST_NAME);
    let mtext = fs::read(&mpath).at("cannot read", &mpath)?;
    out.write_all(&tarfmt::regular(MANIFEST_NAME, mtext.len() as u64, mtime)?)?;
    out.write_all(&mtext)?;
    out.write_all(&[0u8; 512][..padding(mtext.len() as u64)])?;

    for (name, entry) in &m.files {
        let path = snapshot.path(name);
        let file = File::open(&path).at("cannot open", &path)?;
        let len = file.metadata().at("cannot stat", &path)?.len();
        if len != entry.size {
            return Err(corrupt_size(snapshot, name, len, entry.size));
        }
        // One read finds the non-zero blocks (the sparse map goes in the header, before the
        // data), hashes the content and keeps or side-compresses the data.
        let scanned = read_once(&file, &path, len, &spill, progress)?;
        check_digest(snapshot, name, &entry.sha256, scanned.digest)?;
        let extents = scanned.extents;
        let dense = len == 0 || (extents.len() == 1 && extents[0] == (0..len));
        let header = if dense {
            tarfmt::regular(name, len, mtime)?
        } else {
            tarfmt::sparse(name, len, &extents, mtime)?
        };
        let stored: u64 = extents.iter().map(|r| r.end - r.start).sum();
        out.write_all(&header)?;
        match scanned.body {
            Body::Kept(data) => {
                for c in data.chunks(CHUNK) {
                    out.write_all(c)?;
                }
            }
            Body::Spilled(mut frame) => out.splice(&mut frame)?,
        }
        out.write_all(&[0u8; 512][..padding(stored)])?;
        stats.data_bytes += stored;
    }
    out.write_all(&[0u8; 1024])?;
    Ok((stats, out.finish()?))
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

fn corrupt_size(s: &Snapshot, name: &str, len: u64, expected: u64) -> PackError {
    PackError::Image(format!(
        "image `{}` is corrupt: {name} is {len} bytes but its manifest says {expected}",
        s.tag
    ))
}
