//! Hostile or broken packs: each gets a clear error and leaves the store byte-for-byte as it was.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{RawTar, chain, install, manifest_for, tree};
use forkd_store::pack::{NoProgress, PackOptions, UnpackOptions, pack, unpack_from_reader};
use forkd_store::{Manifest, Overwrite, Store, Tag};

const MEM: &[u8] = b"memory contents";
const STATE: &[u8] = b"vmstate contents";

fn good_manifest() -> Manifest {
    manifest_for("hostile", &[("memory.bin", MEM), ("vmstate", STATE)])
}

fn manifest_text(m: &Manifest) -> Vec<u8> {
    m.to_toml().unwrap().into_bytes()
}

/// A store that already holds an image, and a fingerprint of every byte in it.
struct Fixture {
    home: tempfile::TempDir,
    store: Store,
    before: std::collections::BTreeMap<PathBuf, String>,
}

fn fixture() -> Fixture {
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    install(&store, "existing", &[("memory.bin", b"keep me")]);
    let before = tree(home.path());
    Fixture {
        home,
        store,
        before,
    }
}

/// Unpack `pack`; it must fail with `gist` in the message, and change nothing in the store.
fn refused_with(pack: &[u8], opts: &UnpackOptions, gist: &str) -> String {
    let f = fixture();
    let err = unpack_from_reader(&f.store, pack, opts, &NoProgress).unwrap_err();
    let msg = chain(&err);
    assert!(msg.contains(gist), "expected {gist:?} in: {msg}");
    assert_eq!(
        tree(f.home.path()),
        f.before,
        "the store changed after: {msg}"
    );
    // Opening again sweeps nothing either: no leftovers were created.
    Store::open(f.home.path()).unwrap();
    assert_eq!(tree(f.home.path()), f.before);
    msg
}

fn refused(pack: &[u8], gist: &str) -> String {
    refused_with(pack, &UnpackOptions::default(), gist)
}

fn with_entries(extra: impl FnOnce(&mut RawTar)) -> Vec<u8> {
    let mut t = RawTar::new();
    t.file("manifest.toml", &manifest_text(&good_manifest()));
    extra(&mut t);
    t.zst()
}

#[test]
fn a_valid_hand_made_pack_is_accepted() {
    // The control for every case below: the same construction, untampered, installs.
    let f = fixture();
    let pack = with_entries(|t| {
        t.file("memory.bin", MEM).file("vmstate", STATE);
    });
    let snap =
        unpack_from_reader(&f.store, &pack[..], &UnpackOptions::default(), &NoProgress).unwrap();
    assert_eq!(std::fs::read(snap.path("memory.bin")).unwrap(), MEM);
}

#[test]
fn dotdot_path() {
    refused(
        &with_entries(|t| {
            t.file("../memory.bin", MEM);
        }),
        "contains '..'",
    );
}

#[test]
fn absolute_path() {
    refused(
        &with_entries(|t| {
            t.file("/tmp/memory.bin", MEM);
        }),
        "absolute path",
    );
}

#[test]
fn nested_path() {
    refused(
        &with_entries(|t| {
            t.file("sub/memory.bin", MEM);
        }),
        "flat file names only",
    );
}

#[test]
fn symlink_entry() {
    refused(
        &with_entries(|t| {
            t.entry("memory.bin", b'2', b"");
        }),
        "is a symbolic link",
    );
}

#[test]
fn hardlink_entry() {
    refused(
        &with_entries(|t| {
            t.entry("memory.bin", b'1', b"");
        }),
        "is a hard link",
    );
}

#[test]
fn char_device_entry() {
    refused(
        &with_entries(|t| {
            t.entry("memory.bin", b'3', b"");
        }),
        "is a character device",
    );
}

#[test]
fn block_device_entry() {
    refused(
        &with_entries(|t| {
            t.entry("memory.bin", b'4', b"");
        }),
        "is a block device",
    );
}

#[test]
fn fifo_entry() {
    refused(
        &with_entries(|t| {
            t.entry("memory.bin", b'6', b"");
        }),
        "is a FIFO",
    );
}

#[test]
fn directory_entry() {
    refused(
        &with_entries(|t| {
            t.entry("memory.bin", b'5', b"");
        }),
        "is a directory",
    );
}

#[test]
fn duplicate_names() {
    refused(
        &with_entries(|t| {
            t.file("memory.bin", MEM)
                .file("memory.bin", MEM)
                .file("vmstate", STATE);
        }),
        "\"memory.bin\" appears twice",
    );
}

#[test]
fn file_not_in_manifest() {
    refused(
        &with_entries(|t| {
            t.file("memory.bin", MEM)
                .file("vmstate", STATE)
                .file("evil.sh", b"x");
        }),
        "\"evil.sh\" is not listed in the manifest",
    );
}

#[test]
fn listed_file_missing() {
    refused(
        &with_entries(|t| {
            t.file("memory.bin", MEM);
        }),
        "\"vmstate\" is listed in the manifest but missing",
    );
}

#[test]
fn size_mismatch() {
    refused(
        &with_entries(|t| {
            t.file("memory.bin", &MEM[..5]).file("vmstate", STATE);
        }),
        "size mismatch for \"memory.bin\"",
    );
}

#[test]
fn digest_mismatch() {
    let mut tampered = MEM.to_vec();
    tampered[0] ^= 1;
    refused(
        &with_entries(|t| {
            t.file("memory.bin", &tampered).file("vmstate", STATE);
        }),
        "digest mismatch for \"memory.bin\"",
    );
}

#[test]
fn manifest_not_first() {
    let mut t = RawTar::new();
    t.file("memory.bin", MEM)
        .file("manifest.toml", &manifest_text(&good_manifest()))
        .file("vmstate", STATE);
    refused(
        &t.zst(),
        "first entry must be manifest.toml, found \"memory.bin\"",
    );
}

#[test]
fn manifest_twice() {
    let text = manifest_text(&good_manifest());
    refused(
        &with_entries(|t| {
            t.file("manifest.toml", &text);
        }),
        "manifest.toml appears twice",
    );
}

#[test]
fn manifest_not_toml() {
    let mut t = RawTar::new();
    t.file("manifest.toml", b"format_version = 1\nname = \n[[[")
        .file("memory.bin", MEM);
    refused(&t.zst(), "not valid TOML");
}

#[test]
fn format_version_too_new() {
    let text = String::from_utf8(manifest_text(&good_manifest()))
        .unwrap()
        .replace("format_version = 1", "format_version = 3");
    let mut t = RawTar::new();
    t.file("manifest.toml", text.as_bytes());
    refused(
        &t.zst(),
        "uses format version 3; this forkd understands up to 2 — upgrade forkd",
    );
}

/// Counts the compressed bytes the unpacker pulls from its input.
struct Counting<'a>(&'a [u8], Arc<AtomicU64>);
impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn incompressible(n: usize) -> Vec<u8> {
    let mut x = 0x9e3779b97f4a7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn decompression_bomb_entry_larger_than_declared() {
    // The manifest declares 15 bytes; the entry holds 16 MiB. Refused at the header: the
    // unpacker must stop long before reading the 16 MiB.
    let big = incompressible(16 << 20);
    let pack = with_entries(|t| {
        t.file("memory.bin", &big).file("vmstate", STATE);
    });
    let f = fixture();
    let read = Arc::new(AtomicU64::new(0));
    let err = unpack_from_reader(
        &f.store,
        Counting(&pack, read.clone()),
        &UnpackOptions::default(),
        &NoProgress,
    )
    .unwrap_err();
    let msg = chain(&err);
    assert!(
        msg.contains("refusing to read past the declared size"),
        "{msg}"
    );
    assert!(
        read.load(Ordering::Relaxed) < 2 << 20,
        "read {} bytes",
        read.load(Ordering::Relaxed)
    );
    assert_eq!(tree(f.home.path()), f.before);
}

#[test]
fn decompression_bomb_sparse_entry() {
    // A sparse entry claiming a 1 TiB logical size for a 15-byte file.
    let mut h = tar::Header::new_gnu();
    h.set_path("memory.bin").unwrap();
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_size(0);
    let g = h.as_gnu_mut().unwrap();
    g.set_real_size(1 << 40);
    g.sparse[0].set_offset(1 << 40);
    g.sparse[0].set_length(0);
    h.set_cksum();
    refused(
        &with_entries(|t| {
            t.raw(h.as_bytes());
        }),
        "refusing to read past the declared size",
    );
}

#[test]
fn decompression_bomb_huge_manifest() {
    let mut text = manifest_text(&good_manifest());
    text.extend(std::iter::repeat_n(b'#', 2 << 20));
    let mut t = RawTar::new();
    t.file("manifest.toml", &text);
    refused(&t.zst(), "manifest.toml is 2097");
}

#[test]
fn trailing_garbage_after_archive() {
    let mut t = RawTar::new();
    t.file("manifest.toml", &manifest_text(&good_manifest()))
        .file("memory.bin", MEM)
        .file("vmstate", STATE);
    t.raw(&[0u8; 1024]).raw(b"garbage");
    t.out.resize(t.out.len().div_ceil(512) * 512, 0);
    let z = zstd::encode_all(&t.out[..], 3).unwrap();
    refused(&z, "unexpected data after the end of the archive");
}

#[test]
fn truncated_file() {
    // A real pack (made by `pack`) cut at several points.
    let src = tempfile::tempdir().unwrap();
    let s = Store::open(src.path()).unwrap();
    let big = incompressible(300_000);
    let snap = install(&s, "hostile", &[("memory.bin", &big), ("vmstate", STATE)]);
    let file = src.path().join("p.forkd-snapshot.tar.zst");
    pack(&snap, &file, &PackOptions::default(), &NoProgress).unwrap();
    let full = std::fs::read(&file).unwrap();
    for cut in [
        0,
        4,
        100,
        full.len() / 3,
        full.len() / 2,
        full.len() - 200,
        full.len() - 1,
    ] {
        refused(&full[..cut], "truncated or corrupt");
    }
    // The uncut pack installs (the control).
    let f = fixture();
    unpack_from_reader(&f.store, &full[..], &UnpackOptions::default(), &NoProgress).unwrap();
}

#[test]
fn corrupt_zstd_data() {
    // A byte flipped inside a real (checksummed) pack: the zstd checksum or our sha256 catch it.
    let src = tempfile::tempdir().unwrap();
    let s = Store::open(src.path()).unwrap();
    let big = incompressible(300_000);
    let snap = install(&s, "hostile", &[("memory.bin", &big), ("vmstate", STATE)]);
    let file = src.path().join("p.forkd-snapshot.tar.zst");
    pack(&snap, &file, &PackOptions::default(), &NoProgress).unwrap();
    let mut full = std::fs::read(&file).unwrap();
    let mid = full.len() / 2;
    full[mid] ^= 0x55;
    let msg = refused(&full, "");
    assert!(
        msg.contains("corrupt") || msg.contains("digest mismatch"),
        "{msg}"
    );
}

#[test]
fn not_a_pack_at_all() {
    refused(b"PK\x03\x04 this is a zip", "truncated or corrupt");
}

#[test]
fn unsafe_tag_from_manifest_name() {
    for name in ["../../etc", "/abs", "a/b", "..", ".hidden", "UPPER"] {
        let mut m = good_manifest();
        m.name = name.into();
        let mut t = RawTar::new();
        t.file("manifest.toml", &manifest_text(&m))
            .file("memory.bin", MEM)
            .file("vmstate", STATE);
        refused(
            &t.zst(),
            "cannot be used as a local tag; choose one with --tag",
        );
    }
}

#[test]
fn unsafe_tag_is_unrepresentable() {
    // --tag takes a Tag, which cannot hold an unsafe name.
    for name in ["../x", "/x", "a/b", "..", "x\0y"] {
        assert!(Tag::parse(name).is_err(), "{name:?}");
    }
}

#[test]
fn existing_tag_without_force() {
    let mut m = good_manifest();
    m.name = "existing".into();
    let mut t = RawTar::new();
    t.file("manifest.toml", &manifest_text(&m))
        .file("memory.bin", MEM)
        .file("vmstate", STATE);
    let opts = UnpackOptions {
        tag: None,
        overwrite: Overwrite::No,
        ..Default::default()
    };
    refused_with(&t.zst(), &opts, "already exists; pass --force");
}

#[test]
fn total_size_over_the_callers_limit() {
    let pack = with_entries(|t| {
        t.file("memory.bin", MEM).file("vmstate", STATE);
    });
    let opts = UnpackOptions {
        max_total_size: 10,
        ..Default::default()
    };
    refused_with(&pack, &opts, "more than the limit of 10");
}

#[test]
fn endless_chain_of_empty_sparse_extension_headers() {
    // A sparse header promising extension headers, followed by empty ones that each promise
    // another: zstd makes millions of them from a few bytes. Refused at the first.
    let mut h = tar::Header::new_gnu();
    h.set_path("memory.bin").unwrap();
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_size(0);
    let g = h.as_gnu_mut().unwrap();
    g.set_real_size(MEM.len() as u64);
    g.sparse[0].set_offset(0);
    g.sparse[0].set_length(0);
    g.set_is_extended(true);
    h.set_cksum();
    let mut ext = tar::GnuExtSparseHeader::new();
    ext.set_is_extended(true);
    let pack = with_entries(|t| {
        t.raw(h.as_bytes());
        for _ in 0..100_000 {
            t.raw(ext.as_bytes());
        }
    });
    refused(&pack, "empty extension header");
}
