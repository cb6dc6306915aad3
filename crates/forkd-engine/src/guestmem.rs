//! A child's guest RAM seen from the host: the private mapping of its memory file in QEMU, and
//! which of its pages the guest has written.
//!
//! QEMU maps the memory file `MAP_PRIVATE`. A page the guest never wrote is still the file's
//! page (or not present at all); a written page was copied on write into anonymous memory.
//! `/proc/PID/pagemap` tells the two apart per page (bit 63 present, 62 swapped, 61 file-backed),
//! so the pages a branch must store are found without reading the other gigabytes.

use crate::error::{EngineError, IoCtx, Result};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;

/// Guest and host page size.
pub const PAGE: u64 = 4096;
const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
const FILE_OR_SHARED: u64 = 1 << 61;
/// Longest /proc/PID/maps read (QEMU has a few hundred mappings).
const MAX_MAPS: u64 = 4 << 20;

/// The guest RAM mapping in one QEMU process.
#[derive(Debug)]
pub struct Mapping {
    pid: u32,
    start: u64,
    len: u64,
}

/// Find the mapping of the memory file `file` (its metadata) of `len` bytes in process `pid`:
/// the one whose device and inode are the file's, from offset 0, exactly `len` long.
pub fn find_mapping(pid: u32, file: &std::fs::Metadata, len: u64) -> Result<Mapping> {
    find_mapping_of(pid, [file.dev(), file.ino()], len)
}

/// [`find_mapping`] of the file with this `[device, inode]`.
pub fn find_mapping_of(pid: u32, file: [u64; 2], len: u64) -> Result<Mapping> {
    use std::io::Read;
    let path = PathBuf::from(format!("/proc/{pid}/maps"));
    let mut text = String::new();
    File::open(&path)
        .at("cannot open", &path)?
        .take(MAX_MAPS)
        .read_to_string(&mut text)
        .at("cannot read", &path)?;
    let (major, minor) = (
        rustix::fs::major(file[0]) as u64,
        rustix::fs::minor(file[0]) as u64,
    );
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 {
            continue;
        }
        let Some((a, b)) = f[0].split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        let dev_ok = f[3].split_once(':').is_some_and(|(ma, mi)| {
            u64::from_str_radix(ma, 16) == Ok(major) && u64::from_str_radix(mi, 16) == Ok(minor)
        });
        if dev_ok
            && f[4].parse::<u64>() == Ok(file[1])
            && u64::from_str_radix(f[2], 16) == Ok(0)
            && end.checked_sub(start) == Some(len)
            && f[1].ends_with('p')
        {
            return Ok(Mapping { pid, start, len });
        }
    }
    Err(EngineError::Chain(format!(
        "QEMU (pid {pid}) does not map this image's memory file: the image was replaced or \
         removed after the child was forked, so its changes cannot be told apart"
    )))
}

impl Mapping {
    /// The pages (indices from the start of guest RAM) the guest has written: private copies
    /// in the mapping, resident or swapped. Call with the VM stopped.
    pub fn dirty_pages(&self, npages: u64) -> Result<Vec<u64>> {
        if npages * PAGE != self.len {
            return Err(EngineError::Corrupt(format!(
                "{npages} pages do not fill a {} byte mapping",
                self.len
            )));
        }
        let path = PathBuf::from(format!("/proc/{}/pagemap", self.pid));
        let f = File::open(&path).at("cannot open", &path)?;
        let mut out = Vec::new();
        const BATCH: u64 = 64 * 1024;
        let mut buf = vec![0u8; (BATCH * 8) as usize];
        let mut page = 0;
        while page < npages {
            let n = (npages - page).min(BATCH);
            let b = &mut buf[..(n * 8) as usize];
            f.read_exact_at(b, (self.start / PAGE + page) * 8)
                .at("cannot read", &path)?;
            for (i, e) in b.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                if (e & PRESENT != 0 && e & FILE_OR_SHARED == 0) || e & SWAPPED != 0 {
                    out.push(page + i as u64);
                }
            }
            page += n;
        }
        Ok(out)
    }

    /// The contents of `pages` (sorted), concatenated.
    pub fn read_pages(&self, pages: &[u64]) -> Result<Vec<u8>> {
        let path = PathBuf::from(format!("/proc/{}/mem", self.pid));
        let f = File::open(&path).at("cannot open", &path)?;
        let mut out = vec![0u8; pages.len() * PAGE as usize];
        let mut at = 0usize;
        for (first, n) in page_runs(pages) {
            if (first + n) * PAGE > self.len {
                return Err(EngineError::Corrupt(
                    "page past the end of guest RAM".into(),
                ));
            }
            let len = (n * PAGE) as usize;
            f.read_exact_at(&mut out[at..at + len], self.start + first * PAGE)
                .at("cannot read guest memory from", &path)?;
            at += len;
        }
        Ok(out)
    }
}

/// Runs of consecutive page numbers in a sorted list: (first, length).
pub(crate) fn page_runs(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((first, n)) if *first + *n == p => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}
