//! One read pass over a file being packed: its non-zero 4 KiB extents, the sha256 of its
//! content, and its non-zero data. The data is kept in memory up to a budget; past it, it is
//! compressed (as one zstd frame) into an unlinked temporary file, which the writer later
//! copies verbatim into the pack once the entry's header (with the sparse map) is written.

use std::fs::{self, File};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{PackError, Progress};
use crate::fsutil::{IoContext, unique_name};
use crate::sparse::{BLOCK, Piece, hash_zeros, is_zero, stream_file};

pub(super) type Encoder<W> = zstd::stream::write::Encoder<'static, W>;

/// A zstd encoder with the pack's settings (level, workers, content checksum).
pub(super) fn encoder<W: Write>(w: W, level: i32, workers: u32) -> Result<Encoder<W>, PackError> {
    let mut enc = Encoder::new(w, level).map_err(PackError::Write)?;
    enc.multithread(workers).map_err(PackError::Write)?;
    enc.include_checksum(true).map_err(PackError::Write)?;
    Ok(enc)
}

/// Where a file's non-zero data went.
pub(super) enum Body {
    /// The bytes of the extents, concatenated.
    Kept(Vec<u8>),
    /// One complete zstd frame holding those bytes, rewound to its start.
    Spilled(File),
}

pub(super) struct Scanned {
    pub extents: Vec<Range<u64>>,
    /// Lowercase-hex sha256 of the whole logical content.
    pub digest: String,
    pub body: Body,
}

/// Settings for [`read_once`].
pub(super) struct Spill<'a> {
    pub budget: usize,
    pub dir: &'a Path,
    pub level: i32,
    pub workers: u32,
}

enum Sink {
    Mem(Vec<u8>),
    Spill(Encoder<BufWriter<File>>),
}

impl Sink {
    fn push(&mut self, data: &[u8], s: &Spill<'_>) -> Result<(), PackError> {
        match self {
            Sink::Mem(v) if v.len() + data.len() <= s.budget => v.extend_from_slice(data),
            Sink::Mem(v) => {
                let mut enc = encoder(
                    BufWriter::with_capacity(1 << 20, spill_file(s.dir)?),
                    s.level,
                    s.workers,
                )?;
                enc.write_all(v).map_err(PackError::Write)?;
                enc.write_all(data).map_err(PackError::Write)?;
                tracing::debug!(
                    kept = v.len(),
                    "file data over the memory budget: compressing to a spill file"
                );
                *self = Sink::Spill(enc);
            }
            Sink::Spill(enc) => enc.write_all(data).map_err(PackError::Write)?,
        }
        Ok(())
    }

    fn finish(self) -> Result<Body, PackError> {
        Ok(match self {
            Sink::Mem(v) => Body::Kept(v),
            Sink::Spill(enc) => {
                let w = enc.finish().map_err(PackError::Write)?;
                let mut f = w
                    .into_inner()
                    .map_err(|e| PackError::Write(e.into_error()))?;
                f.seek(SeekFrom::Start(0)).map_err(PackError::Write)?;
                Body::Spilled(f)
            }
        })
    }
}

/// A new temporary file in `dir`, already unlinked (nothing to clean up, whatever happens).
fn spill_file(dir: &Path) -> Result<File, PackError> {
    let path = dir.join(format!(".forkd-pack-spill-{}", unique_name("")));
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .at("cannot create a temporary file", &path)?;
    fs::remove_file(&path).at("cannot remove", &path)?;
    Ok(f)
}

/// Read `file` (of length `len`) exactly once; see the module docs.
pub(super) fn read_once(
    file: &File,
    path: &Path,
    len: u64,
    spill: &Spill<'_>,
    progress: &dyn Progress,
) -> Result<Scanned, PackError> {
    let mut extents: Vec<Range<u64>> = Vec::new();
    let mut hasher = Sha256::new();
    let mut sink = Sink::Mem(Vec::new());
    let mut failed: Option<PackError> = None;
    let res = stream_file(file, len, |piece| {
        match piece {
            Piece::Hole(n) => {
                hash_zeros(&mut hasher, n);
                progress.advance(n);
            }
            Piece::Data(off, buf) => {
                hasher.update(buf);
                // Data ranges start on filesystem block boundaries; check 4 KiB blocks in place
                // and hand on runs of non-zero blocks.
                let mut i = 0usize;
                let mut run = 0usize; // start of the current non-zero run in `buf`
                while i < buf.len() {
                    let boff = off + i as u64;
                    let end = ((boff / BLOCK + 1) * BLOCK - off).min(buf.len() as u64) as usize;
                    if is_zero(&buf[i..end]) {
                        if run < i {
                            push(
                                &mut sink,
                                &mut extents,
                                off,
                                &buf[run..i],
                                run,
                                spill,
                                &mut failed,
                            )?;
                        }
                        run = end;
                    }
                    i = end;
                }
                if run < buf.len() {
                    push(
                        &mut sink,
                        &mut extents,
                        off,
                        &buf[run..],
                        run,
                        spill,
                        &mut failed,
                    )?;
                }
                progress.advance(buf.len() as u64);
            }
        }
        Ok(())
    });
    if let Some(e) = failed {
        return Err(e);
    }
    res.at("cannot read (did it change while packing?)", path)?;
    Ok(Scanned {
        extents,
        digest: hex::encode(hasher.finalize()),
        body: sink.finish()?,
    })
}

/// Record `data` (at `off + at` in the file) as an extent and hand it to the sink; a sink
/// error is parked in `failed` and reported to `stream_file` as an abort.
fn push(
    sink: &mut Sink,
    extents: &mut Vec<Range<u64>>,
    off: u64,
    data: &[u8],
    at: usize,
    spill: &Spill<'_>,
    failed: &mut Option<PackError>,
) -> io::Result<()> {
    let r = off + at as u64..off + (at + data.len()) as u64;
    match extents.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ => extents.push(r),
    }
    sink.push(data, spill).map_err(|e| {
        *failed = Some(e);
        io::Error::other("aborted")
    })
}
