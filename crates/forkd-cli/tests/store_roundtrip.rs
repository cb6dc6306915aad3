//! Done-when round trip: a synthetic snapshot (sparse 1 GiB memory.bin with scattered random
//! pages, a 256 MiB ext4 made by mkfs.ext4 from a directory of files, a state file) goes through
//! the real `forkd pack` and `forkd unpack` into another FORKD_HOME with identical bytes, and
//! the unpacked memory.bin stays sparse.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use forkd_store::sparse::hash_file;
use forkd_store::{EngineInfo, FileEntry, Manifest, Overwrite, Store, Tag};

/// xorshift64*: a seeded, dependency-free RNG.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn forkd(home: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_forkd"))
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .unwrap()
}

/// Write the synthetic snapshot's files into `dir`; returns the number of distinct data pages
/// in memory.bin.
fn synth_snapshot(dir: &Path, seed: u64) -> u64 {
    let mut rng = Rng(seed);
    // memory.bin: 1 GiB, ~3% of its 4 KiB pages random, written with pwrite.
    let mem = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dir.join("memory.bin"))
        .unwrap();
    let pages = (1u64 << 30) / 4096;
    mem.set_len(1 << 30).unwrap();
    let mut chosen = BTreeSet::new();
    let mut page = [0u8; 4096];
    while chosen.len() < (pages * 3 / 100) as usize {
        let p = rng.next_u64() % pages;
        if chosen.insert(p) {
            rng.fill(&mut page);
            mem.write_all_at(&page, p * 4096).unwrap();
        }
    }
    // rootfs.ext4: 256 MiB, made by mkfs.ext4 -d from generated files.
    let tree = dir.join("rootfs-tree");
    fs::create_dir_all(tree.join("usr/lib/python3")).unwrap();
    fs::create_dir_all(tree.join("etc")).unwrap();
    for i in 0..200 {
        let text: String = (0..(200 + rng.next_u64() % 4000))
            .map(|j| format!("line {j} of module {i}: value={}\n", rng.next_u64() % 1000))
            .collect();
        fs::write(tree.join(format!("usr/lib/python3/mod{i}.py")), text).unwrap();
    }
    for i in 0..8 {
        let mut blob = vec![0u8; 2 << 20];
        rng.fill(&mut blob);
        fs::write(tree.join(format!("usr/lib/blob{i}.so")), blob).unwrap();
    }
    fs::write(tree.join("etc/hostname"), "forkd-parent\n").unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(dir.join("rootfs.ext4"))
        .arg("256M")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("mkfs.ext4 not found: install the e2fsprogs package (apt-get install e2fsprogs)");
    assert!(
        st.success(),
        "mkfs.ext4 -d failed (needs e2fsprogs >= 1.43)"
    );
    fs::remove_dir_all(&tree).unwrap();
    // vmstate: a QEMU-migration-sized state file.
    let mut state = vec![0u8; 320 * 1024];
    rng.fill(&mut state[..200 * 1024]);
    fs::write(dir.join("vmstate"), state).unwrap();
    chosen.len() as u64
}

fn manifest_for_dir(dir: &Path, name: &str) -> Manifest {
    let mut m = Manifest::new(
        name,
        "1.0",
        1024,
        EngineInfo {
            name: "qemu".into(),
            version: "7.2.0".into(),
            machine_type: "pc-i440fx-7.2".into(),
            cpu_model: "qemu64".into(),
            accel_hint: Some("tcg".into()),
        },
    );
    m.base_image = "synthetic".into();
    for (file, role) in [
        ("memory.bin", "memory"),
        ("rootfs.ext4", "rootfs"),
        ("vmstate", "vmstate"),
    ] {
        let (size, sha256) = hash_file(&File::open(dir.join(file)).unwrap()).unwrap();
        m.files.insert(
            file.into(),
            FileEntry {
                size,
                sha256,
                role: Some(role.into()),
            },
        );
    }
    m
}

#[test]
fn synthetic_snapshot_round_trip() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();

    let store_a = Store::open(a.path()).unwrap();
    let st = store_a.stage().unwrap();
    let data_pages = synth_snapshot(st.dir(), 0x5eed);
    let m = manifest_for_dir(st.dir(), "synthetic");
    let tag = Tag::parse("synthetic").unwrap();
    st.commit(&tag, &m, Overwrite::No).unwrap();

    let file = out.path().join("synthetic.forkd-snapshot.tar.zst");
    let o = forkd(
        a.path(),
        &["pack", "synthetic", "-o", file.to_str().unwrap()],
    );
    assert!(
        o.status.success(),
        "pack failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let packed = fs::metadata(&file).unwrap().len();
    assert!(packed < 200 << 20, "pack is {packed} bytes");

    let o = forkd(b.path(), &["unpack", file.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "unpack failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    let snap = Store::open(b.path()).unwrap().get(&tag).unwrap();
    assert_eq!(snap.manifest.files, m.files);
    for (name, e) in &m.files {
        // Hash the unpacked bytes independently of the unpacker's own check.
        let (size, digest) = hash_file(&File::open(snap.path(name)).unwrap()).unwrap();
        assert_eq!(size, e.size, "{name} size");
        assert_eq!(digest, e.sha256, "{name} sha256");
    }
    let data = data_pages * 4096;
    let on_disk = fs::metadata(snap.path("memory.bin")).unwrap().blocks() * 512;
    assert!(
        on_disk <= data + data / 10 && on_disk >= data - data / 10,
        "unpacked memory.bin takes {on_disk} bytes on disk for {data} bytes of non-zero data"
    );
}
