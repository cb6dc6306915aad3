//! Hole-aware I/O: data ranges, zero-block detection, sparse writing and streaming hashes.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};

use forkd_store::sparse::{SparseWriter, copy_sparse, data_ranges, hash_file, nonzero_extents};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A new, empty file open for reading and writing.
fn new_file(path: &std::path::Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap()
}

/// A 64 MiB sparse file with data pages at some offsets and one explicitly written zero page.
fn sample(dir: &std::path::Path) -> (File, Vec<u64>) {
    let f = new_file(&dir.join("mem"));
    f.set_len(64 << 20).unwrap();
    let mut rng = Rng(42);
    let mut pages: Vec<u64> = (0..200).map(|_| rng.next() % (16384 - 1)).collect();
    pages.sort();
    pages.dedup();
    for &p in &pages {
        let data: Vec<u8> = (0..4096).map(|_| rng.next() as u8 | 1).collect();
        f.write_all_at(&data, p * 4096).unwrap();
    }
    f.write_all_at(&[0u8; 8192], 16383 * 4096 - 8192).unwrap(); // zero data, not a hole
    (f, pages)
}

#[test]
fn ranges_extents_and_hash() {
    let dir = tempfile::tempdir().unwrap();
    let (f, pages) = sample(dir.path());
    let full = fs::read(dir.path().join("mem")).unwrap();
    let ranges = data_ranges(&f, full.len() as u64).unwrap();
    for &p in &pages {
        assert!(
            ranges.iter().any(|r| r.contains(&(p * 4096))),
            "page {p} not in data ranges"
        );
    }
    let ext = nonzero_extents(&f, full.len() as u64).unwrap();
    let covered: u64 = ext.iter().map(|r| r.end - r.start).sum();
    assert_eq!(covered, pages.len() as u64 * 4096);
    for r in &ext {
        assert_eq!(r.start % 4096, 0);
    }
    let (size, digest) = hash_file(&f).unwrap();
    assert_eq!(size, full.len() as u64);
    assert_eq!(digest, common::sha256_hex(&full));
}

#[test]
fn copy_keeps_holes() {
    let dir = tempfile::tempdir().unwrap();
    let (f, pages) = sample(dir.path());
    let full = fs::read(dir.path().join("mem")).unwrap();
    let dst = File::create(dir.path().join("copy")).unwrap();
    let (size, digest) = copy_sparse(&f, dst).unwrap();
    assert_eq!(size, 64 << 20);
    assert_eq!(digest, common::sha256_hex(&full));
    assert!(
        fs::read(dir.path().join("copy")).unwrap() == full,
        "copy differs"
    );
    let blocks = fs::metadata(dir.path().join("copy")).unwrap().blocks() * 512;
    let data = pages.len() as u64 * 4096;
    assert!(
        blocks <= data + data / 10,
        "copy takes {blocks} bytes for {data} of data"
    );
}

#[test]
fn writer_handles_unaligned_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(7);
    let mut expect = Vec::new();
    let mut w = SparseWriter::new(File::create(dir.path().join("out")).unwrap());
    for _ in 0..300 {
        let n = (rng.next() % 20000) as usize;
        match rng.next() % 3 {
            0 => {
                w.write_zeros(n as u64).unwrap();
                expect.resize(expect.len() + n, 0);
            }
            1 => {
                let z = vec![0u8; n];
                w.write_data(&z).unwrap();
                expect.extend_from_slice(&z);
            }
            _ => {
                let d: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                w.write_data(&d).unwrap();
                expect.extend_from_slice(&d);
            }
        }
    }
    w.write_data(&[5]).unwrap();
    expect.push(5);
    w.write_zeros(10_000).unwrap();
    expect.resize(expect.len() + 10_000, 0);
    let (size, written, digest) = w.finish().unwrap();
    assert_eq!(size, expect.len() as u64);
    assert!(written < size);
    assert_eq!(digest, common::sha256_hex(&expect));
    assert!(
        fs::read(dir.path().join("out")).unwrap() == expect,
        "content differs"
    );
}

#[test]
fn write_sparse_at_skips_zero_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("out"))
        .unwrap();
    f.set_len(1 << 20).unwrap();
    // Block 0 zero, block 1 data, block 2 zero, a trailing partial block of data.
    let mut data = vec![0u8; 3 * 4096 + 100];
    data[4096 + 7] = 1;
    data[3 * 4096 + 99] = 2;
    forkd_store::sparse::write_sparse_at(&f, &data, 8192).unwrap();
    let mut back = vec![0u8; data.len()];
    f.read_exact_at(&mut back, 8192).unwrap();
    assert_eq!(back, data);
    let ranges = data_ranges(&f, 1 << 20).unwrap();
    assert!(ranges.iter().all(|r| !r.contains(&8192)), "{ranges:?}");
}

#[test]
fn punching_zero_blocks_frees_their_disk_and_keeps_the_content() {
    let dir = tempfile::tempdir().unwrap();
    let f = new_file(&dir.path().join("ram"));
    // 8 MiB written whole: zeros, with data in three places (one unaligned, one at the end).
    let mut content = vec![0u8; 8 << 20];
    content[4096..8192].fill(7);
    content[(3 << 20) + 100] = 1;
    let n = content.len();
    content[n - 1] = 9;
    f.write_all_at(&content, 0).unwrap();
    f.sync_all().unwrap();
    let (before_len, before_hash) = hash_file(&f).unwrap();
    assert!(f.metadata().unwrap().blocks() * 512 >= 8 << 20);

    forkd_store::sparse::punch_zero_blocks(&f).unwrap();

    assert_eq!(hash_file(&f).unwrap(), (before_len, before_hash));
    let on_disk = f.metadata().unwrap().blocks() * 512;
    assert!(on_disk <= 64 << 10, "{on_disk} bytes still allocated");
    let extents = nonzero_extents(&f, before_len).unwrap();
    assert_eq!(
        extents,
        vec![
            4096..8192,
            3 << 20..(3 << 20) + 4096,
            (8 << 20) - 4096..8 << 20
        ]
    );
}
