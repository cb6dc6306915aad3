//! pack -> unpack round trips, sparse encoding, and interoperability with GNU tar.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::process::Command;

use common::sha256_hex;
use forkd_store::pack::{NoProgress, PackOptions, UnpackOptions, pack, unpack};
use forkd_store::sparse::hash_file;
use forkd_store::{FileEntry, Manifest, Overwrite, Snapshot, Store, Tag};

/// An image with a sparse 32 MiB memory.bin (data pages + zero data), a dense file, an empty
/// file and a small state file.
fn make_image(store: &Store, tag: &str) -> Snapshot {
    let st = store.stage().unwrap();
    let mem = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(st.dir().join("memory.bin"))
        .unwrap();
    mem.set_len(32 << 20).unwrap();
    for i in 0..40u64 {
        let page: Vec<u8> = (0..4096).map(|j| ((i * 31 + j) % 251) as u8 + 1).collect();
        mem.write_all_at(&page, (i * i * 37 % 8000) * 4096).unwrap();
    }
    mem.write_all_at(&[0u8; 65536], 9000 * 4096).unwrap(); // zeros stored as data
    mem.write_all_at(b"tail", (32 << 20) - 4).unwrap(); // data in the last block
    let dense: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8 + 1).collect();
    fs::write(st.dir().join("disk.img"), &dense).unwrap();
    fs::write(st.dir().join("empty"), b"").unwrap();
    fs::write(st.dir().join("vmstate"), b"QEVM state").unwrap();
    let mut m = Manifest::new(tag, "1.0", 32, common::engine());
    for name in ["memory.bin", "disk.img", "empty", "vmstate"] {
        let (size, sha256) = hash_file(&File::open(st.dir().join(name)).unwrap()).unwrap();
        m.files.insert(
            name.into(),
            FileEntry {
                size,
                sha256,
                role: None,
            },
        );
    }
    st.commit(&Tag::parse(tag).unwrap(), &m, Overwrite::No)
        .unwrap()
}

#[test]
fn round_trip_keeps_bytes_and_holes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let sa = Store::open(a.path()).unwrap();
    let snap = make_image(&sa, "img");
    let file = out.path().join("img.forkd-snapshot.tar.zst");
    let stats = pack(&snap, &file, &PackOptions::default(), &NoProgress).unwrap();
    assert!(
        stats.data_bytes < 1 << 20,
        "zero runs were compressed: {stats:?}"
    );
    assert!(stats.packed_bytes > 0);
    // No temporary file left beside the output.
    assert_eq!(fs::read_dir(out.path()).unwrap().count(), 1);

    let sb = Store::open(b.path()).unwrap();
    let got = unpack(&sb, &file, &UnpackOptions::default(), &NoProgress).unwrap();
    assert_eq!(got.tag.as_str(), "img");
    for (name, e) in &snap.manifest.files {
        let (size, digest) = hash_file(&File::open(got.path(name)).unwrap()).unwrap();
        assert_eq!((size, &digest), (e.size, &e.sha256), "{name}");
    }
    let disk = fs::metadata(got.path("memory.bin")).unwrap().blocks() * 512;
    assert!(disk < 1 << 20, "memory.bin takes {disk} bytes on disk");

    // Same pack again: refused without overwrite, accepted with it, and under another tag.
    let err = unpack(&sb, &file, &UnpackOptions::default(), &NoProgress).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    let opts = UnpackOptions {
        tag: None,
        overwrite: Overwrite::Yes,
        ..Default::default()
    };
    unpack(&sb, &file, &opts, &NoProgress).unwrap();
    let opts = UnpackOptions {
        tag: Some(Tag::parse("other").unwrap()),
        overwrite: Overwrite::No,
        ..Default::default()
    };
    assert_eq!(
        unpack(&sb, &file, &opts, &NoProgress).unwrap().tag.as_str(),
        "other"
    );
    assert_eq!(sb.list().unwrap().len(), 2);
}

#[test]
fn gnu_tar_reads_our_packs() {
    let a = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let sa = Store::open(a.path()).unwrap();
    let snap = make_image(&sa, "img");
    let file = out.path().join("p.tar.zst");
    pack(
        &snap,
        &file,
        &PackOptions {
            level: 1,
            workers: 2,
            memory_budget: 0, // exercise the spill path (data in frames of their own)
        },
        &NoProgress,
    )
    .unwrap();
    let x = out.path().join("x");
    fs::create_dir(&x).unwrap();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "zstd -dc '{}' | tar -xf - -C '{}'",
            file.display(),
            x.display()
        ))
        .status()
        .expect("needs zstd and GNU tar (apt-get install zstd tar)");
    assert!(st.success());
    let names: Vec<_> = tar_list(&file);
    assert_eq!(
        names,
        [
            "manifest.toml",
            "disk.img",
            "empty",
            "memory.bin",
            "vmstate"
        ]
    );
    for (name, e) in &snap.manifest.files {
        let data = fs::read(x.join(name)).unwrap();
        assert_eq!(
            sha256_hex(&data),
            e.sha256,
            "GNU tar extracted {name} differently"
        );
    }
}

fn tar_list(file: &std::path::Path) -> Vec<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("zstd -dc '{}' | tar -tf -", file.display()))
        .output()
        .expect("needs zstd and GNU tar");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn python_tarfile_reads_our_packs() {
    let a = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let sa = Store::open(a.path()).unwrap();
    let snap = make_image(&sa, "img");
    let file = out.path().join("p.tar.zst");
    pack(&snap, &file, &PackOptions::default(), &NoProgress).unwrap();
    let tarfile = out.path().join("p.tar");
    let st = Command::new("zstd")
        .args(["-dq", "-o"])
        .arg(&tarfile)
        .arg(&file)
        .status()
        .unwrap();
    assert!(st.success());
    let script = "import tarfile,hashlib,sys\n\
                  t=tarfile.open(sys.argv[1])\n\
                  for m in t.getmembers():\n    print(m.name, hashlib.sha256(t.extractfile(m).read()).hexdigest() if m.name!='manifest.toml' else '')\n";
    let outp = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&tarfile)
        .output()
        .expect("needs python3 (apt-get install python3)");
    assert!(
        outp.status.success(),
        "{}",
        String::from_utf8_lossy(&outp.stderr)
    );
    let text = String::from_utf8(outp.stdout).unwrap();
    for (name, e) in &snap.manifest.files {
        assert!(
            text.contains(&format!("{name} {}", e.sha256)),
            "{name} in:\n{text}"
        );
    }
}

#[test]
fn pack_detects_store_corruption_and_leaves_no_output() {
    let a = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let sa = Store::open(a.path()).unwrap();
    let snap = make_image(&sa, "img");
    // Flip one byte of a stored file (same size, different content).
    let f = OpenOptions::new()
        .write(true)
        .open(snap.path("disk.img"))
        .unwrap();
    f.write_all_at(b"\0", 5000).unwrap();
    let file = out.path().join("img.forkd-snapshot.tar.zst");
    let err = pack(&snap, &file, &PackOptions::default(), &NoProgress).unwrap_err();
    assert!(
        err.to_string()
            .contains("disk.img of image `img` is corrupt"),
        "{err}"
    );
    assert_eq!(
        fs::read_dir(out.path()).unwrap().count(),
        0,
        "partial output left behind"
    );
}

#[test]
fn both_read_paths_write_the_same_pack() {
    let a = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let sa = Store::open(a.path()).unwrap();
    let snap = make_image(&sa, "img");
    let kept = out.path().join("kept.zst");
    let reread = out.path().join("reread.zst");
    let opts = PackOptions {
        workers: 1,
        ..Default::default()
    };
    pack(&snap, &kept, &opts, &NoProgress).unwrap();
    let opts = PackOptions {
        workers: 1,
        memory_budget: 4096,
        ..Default::default()
    };
    pack(&snap, &reread, &opts, &NoProgress).unwrap();
    let plain = |p: &std::path::Path| zstd::decode_all(File::open(p).unwrap()).unwrap();
    assert!(
        plain(&kept) == plain(&reread),
        "the two paths produced different archives"
    );
}

#[test]
fn we_read_packs_written_by_gnu_tar() {
    // Another implementation: GNU tar --format=gnu --sparse, piped through zstd.
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let sa = Store::open(a.path()).unwrap();
    let snap = make_image(&sa, "img");
    let file = b.path().join("gnu.tar.zst");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar --format=gnu --sparse -C '{}' -cf - manifest.toml memory.bin disk.img empty vmstate | zstd -q -o '{}'",
            snap.dir.display(),
            file.display()
        ))
        .status()
        .expect("needs zstd and GNU tar (apt-get install zstd tar)");
    assert!(st.success());
    let sb = Store::open(&b.path().join("store")).unwrap();
    let got = unpack(&sb, &file, &UnpackOptions::default(), &NoProgress).unwrap();
    for (name, e) in &snap.manifest.files {
        let (size, digest) = hash_file(&File::open(got.path(name)).unwrap()).unwrap();
        assert_eq!((size, &digest), (e.size, &e.sha256), "{name}");
    }
    let disk = fs::metadata(got.path("memory.bin")).unwrap().blocks() * 512;
    assert!(disk < 1 << 20, "memory.bin takes {disk} bytes on disk");
    // GNU tar did write a sparse ('S') entry for memory.bin.
    let raw = zstd::decode_all(File::open(&file).unwrap()).unwrap();
    let has_sparse = raw
        .chunks(512)
        .any(|b| b.len() == 512 && b[156] == b'S' && b.starts_with(b"memory.bin\0"));
    assert!(
        has_sparse,
        "GNU tar wrote no sparse entry; the test proves less than it claims"
    );
}
