//! Hole-aware file I/O: find where a file holds data, write zero blocks as holes, and compute
//! the sha256 of the logical content while streaming (zeros are hashed from a static buffer,
//! never read from disk).

use std::fs::File;
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};

/// The granularity of zero detection and hole punching.
pub const BLOCK: u64 = 4096;
/// Read size when streaming data ranges.
pub(crate) const CHUNK: usize = 1 << 20;

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Feed `n` zero bytes to `hasher` without touching memory other than a static buffer.
pub fn hash_zeros(hasher: &mut Sha256, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// Whether every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let (chunks, rest) = buf.as_chunks::<64>();
    chunks.iter().all(|c| {
        let mut acc = 0u64;
        for w in c.as_chunks::<8>().0 {
            acc |= u64::from_ne_bytes(*w);
        }
        acc == 0
    }) && rest.iter().all(|&b| b == 0)
}

/// The ranges of `file` (of length `len`) that may hold data, from SEEK_DATA/SEEK_HOLE.
/// Everything outside them reads as zeros. Without filesystem support, the whole file.
pub fn data_ranges(file: &File, len: u64) -> io::Result<Vec<Range<u64>>> {
    use rustix::fs::{SeekFrom, seek};
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < len {
        let start = match seek(file, SeekFrom::Data(off)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) if out.is_empty() => {
                return Ok(std::iter::once(0..len).collect());
            }
            Err(e) => return Err(e.into()),
        };
        if start >= len {
            break;
        }
        let end = match seek(file, SeekFrom::Hole(start)) {
            Ok(e) => e.min(len),
            Err(e) => return Err(e.into()),
        };
        out.push(start..end);
        off = end;
    }
    Ok(out)
}

/// One piece of a file's content, in order: bytes read from a data range, or a gap of zeros.
pub(crate) enum Piece<'a> {
    Data(u64, &'a [u8]),
    Hole(u64),
}

/// Call `f` for the content of each data range in order, read in chunks of at most [`CHUNK`]
/// bytes, and for every gap between them (including a trailing one).
pub(crate) fn stream_file(
    file: &File,
    len: u64,
    mut f: impl FnMut(Piece<'_>) -> io::Result<()>,
) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    for r in data_ranges(file, len)? {
        if r.start > pos {
            f(Piece::Hole(r.start - pos))?;
        }
        let mut off = r.start;
        while off < r.end {
            let n = ((r.end - off) as usize).min(CHUNK);
            file.read_exact_at(&mut buf[..n], off).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    io::Error::other("file shrank while it was being read")
                } else {
                    e
                }
            })?;
            f(Piece::Data(off, &buf[..n]))?;
            off += n as u64;
        }
        pos = r.end;
    }
    if len > pos {
        f(Piece::Hole(len - pos))?;
    }
    Ok(())
}

/// The 4 KiB-aligned extents of `file` that hold non-zero bytes (holes and zero blocks left
/// out), merged and clipped to `len`. Reads only the data ranges.
pub fn nonzero_extents(file: &File, len: u64) -> io::Result<Vec<Range<u64>>> {
    let mut extents: Vec<Range<u64>> = Vec::new();
    stream_file(file, len, |piece| {
        if let Piece::Data(off, buf) = piece {
            // Data ranges start on filesystem block boundaries; check 4 KiB blocks in place.
            let mut i = 0usize;
            while i < buf.len() {
                let boff = off + i as u64;
                let end = ((boff / BLOCK + 1) * BLOCK - off).min(buf.len() as u64) as usize;
                if !is_zero(&buf[i..end]) {
                    let r = boff..off + end as u64;
                    match extents.last_mut() {
                        Some(last) if last.end == r.start => last.end = r.end,
                        _ => extents.push(r),
                    }
                }
                i = end;
            }
        }
        Ok(())
    })?;
    Ok(extents)
}

/// Turn every all-zero 4 KiB block of `file` into a hole (its content is unchanged). For a
/// file that was written whole, such as a guest's RAM, where zeroed pages took up disk.
pub fn punch_zero_blocks(file: &File) -> io::Result<()> {
    use rustix::fs::{FallocateFlags, fallocate};
    let len = file.metadata()?.len();
    let mut pos = 0u64;
    let punch = |start: u64, end: u64| -> io::Result<()> {
        if end > start {
            fallocate(
                file,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                start,
                end - start,
            )?;
        }
        Ok(())
    };
    for r in nonzero_extents(file, len)? {
        punch(pos, r.start)?;
        pos = r.end;
    }
    punch(pos, len)
}

/// Writes a stream of logical content into a new, empty file, leaving every all-zero 4 KiB
/// block as a hole, and hashes the content as it goes.
pub struct SparseWriter {
    file: File,
    pos: u64,
    hasher: Sha256,
    /// The current incomplete block; it starts at `pos - block.len()`, a multiple of BLOCK.
    block: Vec<u8>,
    /// Bytes actually written (not left as holes).
    written: u64,
}

impl SparseWriter {
    /// `file` must be empty (freshly created) and opened for writing.
    pub fn new(file: File) -> SparseWriter {
        SparseWriter {
            file,
            pos: 0,
            hasher: Sha256::new(),
            block: Vec::with_capacity(BLOCK as usize),
            written: 0,
        }
    }

    /// Logical bytes received so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Append `data` to the logical content.
    pub fn write_data(&mut self, mut data: &[u8]) -> io::Result<()> {
        self.hasher.update(data);
        if !self.block.is_empty() {
            let k = data.len().min(BLOCK as usize - self.block.len());
            self.block.extend_from_slice(&data[..k]);
            self.pos += k as u64;
            data = &data[k..];
            if self.block.len() == BLOCK as usize {
                self.flush_block()?;
            }
        }
        // Now pos is block-aligned (or data is empty). Write runs of non-zero blocks directly.
        let full = data.len() / BLOCK as usize * BLOCK as usize;
        let mut i = 0usize;
        while i < full {
            let mut j = i;
            while j < full && !is_zero(&data[j..j + BLOCK as usize]) {
                j += BLOCK as usize;
            }
            if j > i {
                self.file.write_all_at(&data[i..j], self.pos)?;
                self.written += (j - i) as u64;
                self.pos += (j - i) as u64;
                i = j;
            } else {
                self.pos += BLOCK;
                i += BLOCK as usize;
            }
        }
        self.block.extend_from_slice(&data[full..]);
        self.pos += (data.len() - full) as u64;
        Ok(())
    }

    /// Append `n` zero bytes (a hole).
    pub fn write_zeros(&mut self, mut n: u64) -> io::Result<()> {
        hash_zeros(&mut self.hasher, n);
        if !self.block.is_empty() {
            let k = n.min(BLOCK - self.block.len() as u64) as usize;
            self.block.resize(self.block.len() + k, 0);
            self.pos += k as u64;
            n -= k as u64;
            if self.block.len() == BLOCK as usize {
                self.flush_block()?;
            }
            if n == 0 {
                return Ok(());
            }
        }
        let skip = n / BLOCK * BLOCK;
        self.pos += skip;
        let rest = (n - skip) as usize;
        self.block.resize(rest, 0);
        self.pos += rest as u64;
        Ok(())
    }

    fn flush_block(&mut self) -> io::Result<()> {
        if !is_zero(&self.block) {
            let start = self.pos - self.block.len() as u64;
            self.file.write_all_at(&self.block, start)?;
            self.written += self.block.len() as u64;
        }
        self.block.clear();
        Ok(())
    }

    /// Write the last partial block, set the file length (trailing holes), and return the
    /// logical size, the number of bytes written as data, and the lowercase-hex sha256.
    pub fn finish(mut self) -> io::Result<(u64, u64, String)> {
        self.flush_block()?;
        self.file.set_len(self.pos)?;
        Ok((self.pos, self.written, hex::encode(self.hasher.finalize())))
    }
}

impl Write for SparseWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_data(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Write `data` at `offset` of `file`, leaving every all-zero 4 KiB block unwritten: in a file
/// sized beforehand (`set_len`) such blocks read as zeros and take no disk.
pub fn write_sparse_at(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    let mut run: Option<usize> = None;
    for start in (0..data.len()).step_by(BLOCK as usize) {
        let end = (start + BLOCK as usize).min(data.len());
        match (is_zero(&data[start..end]), run) {
            (false, None) => run = Some(start),
            (true, Some(s)) => {
                file.write_all_at(&data[s..start], offset + s as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(s) = run {
        file.write_all_at(&data[s..], offset + s as u64)?;
    }
    Ok(())
}

/// Copy `src` into the new, empty file `dst`: holes and zero blocks stay holes. Reads each
/// data range once. Returns (size, sha256 hex) of the content.
pub fn copy_sparse(src: &File, dst: File) -> io::Result<(u64, String)> {
    let len = src.metadata()?.len();
    let mut w = SparseWriter::new(dst);
    stream_file(src, len, |piece| match piece {
        Piece::Data(_, buf) => w.write_data(buf),
        Piece::Hole(n) => w.write_zeros(n),
    })?;
    let (size, _, digest) = w.finish()?;
    Ok((size, digest))
}

/// sha256 (lowercase hex) and size of a file's content, reading only its data ranges.
pub fn hash_file(file: &File) -> io::Result<(u64, String)> {
    let len = file.metadata()?.len();
    let mut h = Sha256::new();
    stream_file(file, len, |piece| {
        match piece {
            Piece::Data(_, buf) => h.update(buf),
            Piece::Hole(n) => hash_zeros(&mut h, n),
        }
        Ok(())
    })?;
    Ok((len, hex::encode(h.finalize())))
}
