//! A file whose non-zero data is over `PackOptions::memory_budget` is still read only once:
//! its data is compressed on the side into a separate zstd frame and spliced into the pack.
//! (One test per binary: it measures this thread's read counter in /proc/thread-self/io.)

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::process::Command;

use common::sha256_hex;
use forkd_store::pack::{NoProgress, PackOptions, UnpackOptions, pack, unpack};
use forkd_store::sparse::hash_file;
use forkd_store::{FileEntry, Manifest, Overwrite, Snapshot, Store, Tag};

const MIB: u64 = 1 << 20;

/// memory.bin: 64 MiB logical, 6 MiB of non-zero data in runs between holes, plus 128 KiB of
/// zeros written as data; disk.img: 3 MiB dense; vmstate: small. Returns the image and the
/// number of non-zero bytes.
fn make_image(store: &Store) -> (Snapshot, u64) {
    let st = store.stage().unwrap();
    let mem = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(st.dir().join("memory.bin"))
        .unwrap();
    mem.set_len(64 * MIB).unwrap();
    let run: Vec<u8> = (0..MIB as usize)
        .map(|i| ((i * 7 + i / 4096 * 13) % 251) as u8 + 1)
        .collect();
    for k in 0..6u64 {
        mem.write_all_at(&run, k * 10 * MIB + 4096 * k).unwrap();
    }
    mem.write_all_at(&[0u8; 128 << 10], 61 * MIB).unwrap();
    let dense: Vec<u8> = (0..3 * MIB as usize).map(|i| (i % 253) as u8 + 1).collect();
    fs::write(st.dir().join("disk.img"), &dense).unwrap();
    fs::write(st.dir().join("vmstate"), b"QEVM state").unwrap();
    let mut m = Manifest::new("big", "1.0", 64, common::engine());
    for name in ["memory.bin", "disk.img", "vmstate"] {
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
    let snap = st
        .commit(&Tag::parse("big").unwrap(), &m, Overwrite::No)
        .unwrap();
    (snap, 6 * MIB + 3 * MIB + 10)
}

/// Bytes this thread has read through read(2)-like calls so far.
fn rchar() -> u64 {
    let io = fs::read_to_string("/proc/thread-self/io")
        .expect("/proc/thread-self/io is needed (Linux with task I/O accounting)");
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .expect("rchar in /proc/thread-self/io")
        .trim()
        .parse()
        .unwrap()
}

/// Lengths of the concatenated zstd frames in `data`.
fn frames(data: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = zstd::zstd_safe::find_frame_compressed_size(rest).expect("a valid zstd frame");
        out.push(n);
        rest = &rest[n..];
    }
    out
}

#[test]
fn over_budget_files_are_read_once_and_round_trip() {
    let a = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let sa = Store::open(a.path()).unwrap();
    let (snap, nonzero) = make_image(&sa);
    let file = out.path().join("big.forkd-snapshot.tar.zst");
    let opts = PackOptions {
        level: 3,
        workers: 2,
        memory_budget: MIB as usize,
    };
    let before = rchar();
    let stats = pack(&snap, &file, &opts, &NoProgress).unwrap();
    let read = rchar() - before;

    // (b) Read once: the old re-read path read the data twice (~2x).
    assert_eq!(stats.data_bytes, nonzero, "{stats:?}");
    assert!(
        read * 10 <= nonzero * 11,
        "pack read {read} bytes for {nonzero} bytes of non-zero data (more than 1.1x)"
    );
    assert!(
        read >= nonzero,
        "read {read} < {nonzero}: measurement broken"
    );
    // No spill file left beside the output.
    assert_eq!(fs::read_dir(out.path()).unwrap().count(), 1);

    // The pack is several frames: main, spliced memory.bin data, main, spliced disk.img, main.
    let bytes = fs::read(&file).unwrap();
    let lens = frames(&bytes);
    assert!(lens.len() >= 5, "frames: {lens:?}");

    // (a) Byte-identical round trip, holes kept.
    let b = tempfile::tempdir().unwrap();
    let sb = Store::open(b.path()).unwrap();
    let got = unpack(&sb, &file, &UnpackOptions::default(), &NoProgress).unwrap();
    for (name, e) in &snap.manifest.files {
        let ours = fs::read(snap.path(name)).unwrap();
        let theirs = fs::read(got.path(name)).unwrap();
        assert!(ours == theirs, "{name} differs after the round trip");
        assert_eq!(sha256_hex(&theirs), e.sha256);
    }
    let disk = fs::metadata(got.path("memory.bin")).unwrap().blocks() * 512;
    assert!(disk < 8 * MIB, "memory.bin takes {disk} bytes on disk");

    // Truncated exactly at a frame boundary (every one but the end): refused, store unchanged.
    let c = tempfile::tempdir().unwrap();
    let sc = Store::open(c.path()).unwrap();
    let cut = out.path().join("cut.zst");
    let mut end = 0;
    for n in &lens[..lens.len() - 1] {
        end += n;
        fs::write(&cut, &bytes[..end]).unwrap();
        let err = unpack(&sc, &cut, &UnpackOptions::default(), &NoProgress).unwrap_err();
        assert!(err.to_string().contains("truncated"), "cut at {end}: {err}");
        assert!(sc.list().unwrap().is_empty());
    }
    fs::remove_file(&cut).unwrap();

    // (c) GNU tar lists and extracts it (through the zstd CLI, which reads all frames).
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
    assert!(st.success(), "zstd -dc | tar -x failed");
    let list = Command::new("sh")
        .arg("-c")
        .arg(format!("zstd -dc '{}' | tar -tf -", file.display()))
        .output()
        .expect("needs zstd and GNU tar (apt-get install zstd tar)");
    assert!(list.status.success());
    let names: Vec<String> = String::from_utf8(list.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(
        names,
        ["manifest.toml", "disk.img", "memory.bin", "vmstate"]
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
