//! Install the synthetic benchmark snapshot into a store (used by bench/pack.sh):
//! a sparse 1 GiB memory.bin with ~3% random pages (seeded), a 256 MiB ext4 made by
//! `mkfs.ext4 -d` from a directory of generated files, and a 320 KiB state file.
//!
//! Usage: synth_snapshot STORE_DIR TAG [SEED]

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use forkd_store::sparse::hash_file;
use forkd_store::{EngineInfo, FileEntry, Manifest, Overwrite, Store, Tag};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn generate(dir: &Path, seed: u64) -> u64 {
    let mut rng = Rng(seed);
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
        let p = rng.next() % pages;
        if chosen.insert(p) {
            rng.fill(&mut page);
            mem.write_all_at(&page, p * 4096).unwrap();
        }
    }
    let tree = dir.join("rootfs-tree");
    fs::create_dir_all(tree.join("usr/lib/python3")).unwrap();
    fs::create_dir_all(tree.join("etc")).unwrap();
    for i in 0..200 {
        let text: String = (0..(200 + rng.next() % 4000))
            .map(|j| format!("line {j} of module {i}: value={}\n", rng.next() % 1000))
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
        .expect("mkfs.ext4 not found: install e2fsprogs (apt-get install e2fsprogs)");
    assert!(
        st.success(),
        "mkfs.ext4 -d failed (needs e2fsprogs >= 1.43)"
    );
    fs::remove_dir_all(&tree).unwrap();
    let mut state = vec![0u8; 320 * 1024];
    rng.fill(&mut state[..200 * 1024]);
    fs::write(dir.join("vmstate"), state).unwrap();
    chosen.len() as u64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: synth_snapshot STORE_DIR TAG [SEED]");
        std::process::exit(2);
    }
    let seed = args
        .get(3)
        .map_or(0x5eed, |s| s.parse().expect("SEED is a number"));
    let store = Store::open(Path::new(&args[1])).unwrap();
    let st = store.stage().unwrap();
    let pages = generate(st.dir(), seed);
    let mut m = Manifest::new(
        &args[2],
        "1.0",
        1024,
        EngineInfo {
            name: "qemu".into(),
            version: "7.2.0".into(),
            machine_type: "pc-i440fx-7.2".into(),
            cpu_model: "qemu64".into(),
            accel_hint: None,
        },
    );
    m.base_image = "synthetic".into();
    for (file, role) in [
        ("memory.bin", "memory"),
        ("rootfs.ext4", "rootfs"),
        ("vmstate", "vmstate"),
    ] {
        let (size, sha256) = hash_file(&File::open(st.dir().join(file)).unwrap()).unwrap();
        m.files.insert(
            file.into(),
            FileEntry {
                size,
                sha256,
                role: Some(role.into()),
            },
        );
    }
    st.commit(&Tag::parse(&args[2]).unwrap(), &m, Overwrite::No)
        .unwrap();
    println!("{}", pages * 4096);
}
