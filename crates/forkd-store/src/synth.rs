//! Synthetic snapshots for tests and benchmarks: a sparse memory image with scattered random
//! pages, an ext4 root filesystem made by `mkfs.ext4 -d` from generated files, and a state
//! file. Deterministic for a given seed, so a benchmark and a test measure the same bytes.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::manifest::{EngineInfo, FileEntry, Manifest};
use crate::sparse::hash_file;
use crate::store::{Overwrite, Snapshot, Store, StoreError};
use crate::tag::Tag;

const PAGE: u64 = 4096;

/// xorshift64*: a seeded, dependency-free generator (not for anything secret).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// What to generate. The default is the foundation issue's benchmark snapshot: 1 GiB of
/// memory with 3% random pages, a 256 MiB ext4 and a 320 KiB state file.
#[derive(Debug, Clone)]
pub struct Synth {
    pub memory_bytes: u64,
    /// Share of memory pages that hold random data, in percent.
    pub data_percent: u64,
    pub rootfs_mib: u64,
    pub state_bytes: usize,
    pub seed: u64,
}

impl Default for Synth {
    fn default() -> Self {
        Synth {
            memory_bytes: 1 << 30,
            data_percent: 3,
            rootfs_mib: 256,
            state_bytes: 320 * 1024,
            seed: 0x5eed,
        }
    }
}

/// Write `memory.bin`, `rootfs.ext4` and `vmstate` into `dir`. Returns the number of memory
/// pages holding data (each distinct, so `pages * 4096` is the non-zero data).
pub fn write_files(dir: &Path, spec: &Synth) -> io::Result<u64> {
    let mut rng = Rng(spec.seed);
    let mem = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dir.join("memory.bin"))?;
    let pages = spec.memory_bytes / PAGE;
    mem.set_len(spec.memory_bytes)?;
    let mut chosen = BTreeSet::new();
    let mut page = [0u8; PAGE as usize];
    while (chosen.len() as u64) < pages * spec.data_percent / 100 {
        let p = rng.next_u64() % pages;
        if chosen.insert(p) {
            rng.fill(&mut page);
            mem.write_all_at(&page, p * PAGE)?;
        }
    }

    let tree = dir.join(".rootfs-tree");
    fs::create_dir_all(tree.join("usr/lib/python3"))?;
    fs::create_dir_all(tree.join("etc"))?;
    for i in 0..200 {
        let text: String = (0..(200 + rng.next_u64() % 4000))
            .map(|j| format!("line {j} of module {i}: value={}\n", rng.next_u64() % 1000))
            .collect();
        fs::write(tree.join(format!("usr/lib/python3/mod{i}.py")), text)?;
    }
    for i in 0..8 {
        let mut blob = vec![0u8; 2 << 20];
        rng.fill(&mut blob);
        fs::write(tree.join(format!("usr/lib/blob{i}.so")), blob)?;
    }
    fs::write(tree.join("etc/hostname"), "forkd-parent\n")?;
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(dir.join("rootfs.ext4"))
        .arg(format!("{}M", spec.rootfs_mib))
        .stdout(Stdio::null())
        .status()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot run mkfs.ext4 ({e}): install e2fsprogs (apt-get install e2fsprogs)"
                ),
            )
        })?;
    fs::remove_dir_all(&tree)?;
    if !status.success() {
        return Err(io::Error::other(
            "mkfs.ext4 -d failed (it needs e2fsprogs 1.43 or newer)",
        ));
    }

    let mut state = vec![0u8; spec.state_bytes];
    let filled = spec.state_bytes * 5 / 8;
    rng.fill(&mut state[..filled]);
    fs::write(dir.join("vmstate"), state)?;
    Ok(chosen.len() as u64)
}

/// A manifest for the synthetic files in `dir`, with their sizes and sha256s.
pub fn manifest_for_dir(dir: &Path, name: &str, memory_mib: u64) -> io::Result<Manifest> {
    let mut m = Manifest::new(
        name,
        "1.0",
        memory_mib,
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
        let (size, sha256) = hash_file(&File::open(dir.join(file))?)?;
        m.files.insert(
            file.into(),
            FileEntry {
                size,
                sha256,
                role: Some(role.into()),
            },
        );
    }
    Ok(m)
}

/// Generate a synthetic snapshot and install it into `store` as `tag`. Returns the snapshot
/// and its number of memory data pages.
pub fn install(store: &Store, tag: &Tag, spec: &Synth) -> Result<(Snapshot, u64), StoreError> {
    let staging = store.stage()?;
    let io_err = |e: io::Error| StoreError::Staging(format!("synthetic snapshot: {e}"));
    let pages = write_files(staging.dir(), spec).map_err(io_err)?;
    let manifest =
        manifest_for_dir(staging.dir(), tag.as_str(), spec.memory_bytes >> 20).map_err(io_err)?;
    let snap = staging.commit(tag, &manifest, Overwrite::No)?;
    Ok((snap, pages))
}
