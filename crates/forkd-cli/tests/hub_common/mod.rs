//! Shared helpers for the hub integration tests: a synthetic snapshot installed through the
//! store's staging API, running the real `forkd` binary, a `forkd hub serve` child, and a tiny
//! misbehaving HTTP server that serves a real hub directory.
#![allow(dead_code)]

pub mod faulty;

use forkd_store::{EngineInfo, FileEntry, Manifest, Overwrite, Store, Tag};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub const FORKD: &str = env!("CARGO_BIN_EXE_forkd");

/// Deterministic pseudo-random bytes (xorshift), so tests need no rand crate.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_file(p: &Path) -> String {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(p).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// Install a synthetic snapshot as `tag` in `home`: a sparse memory.bin (`mem_mib` MiB) with
/// scattered random pages, a random state file, and a small ext4 made by mkfs.ext4 -d.
pub fn make_snapshot(home: &Path, tag: &str, mem_mib: u64, seed: u64) {
    make_snapshot_with(home, tag, mem_mib, seed, "pc-i440fx-7.2");
}

/// [`make_snapshot`] with a chosen QEMU machine type.
pub fn make_snapshot_with(home: &Path, tag: &str, mem_mib: u64, seed: u64, machine: &str) {
    let store = Store::open(home).unwrap();
    let staging = store.stage().unwrap();
    let dir = staging.dir().to_path_buf();
    let mem = std::fs::File::create(dir.join("memory.bin")).unwrap();
    let size = mem_mib << 20;
    mem.set_len(size).unwrap();
    let pages = size / 4096;
    for i in 0..pages / 16 {
        let page = (i * 16 + (seed + i * 7) % 16) % pages;
        mem.write_all_at(&noise(seed ^ page, 4096), page * 4096)
            .unwrap();
    }
    drop(mem);
    std::fs::write(dir.join("vmstate"), noise(seed + 1, 300_000)).unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("hello.txt"), format!("hello {seed}\n")).unwrap();
    std::fs::write(src.path().join("blob.bin"), noise(seed + 2, 1 << 20)).unwrap();
    // mkfs -d copies the files' times into their inodes: fix them too.
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    for p in [
        src.path().join("hello.txt"),
        src.path().join("blob.bin"),
        src.path().to_path_buf(),
    ] {
        let f = std::fs::File::open(&p).unwrap();
        f.set_times(
            std::fs::FileTimes::new()
                .set_accessed(when)
                .set_modified(when),
        )
        .unwrap();
    }
    // A fixed UUID, hash seed and clock: the same seed makes the same image, so chunk-sharing
    // figures do not move between runs (a random UUID moved them by a few percent).
    let st = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-U",
            "6f726b64-0000-4000-8000-000000000001",
            "-E",
            "root_owner=0:0,hash_seed=6f726b64-0000-4000-8000-000000000002",
            "-d",
        ])
        .env("E2FSPROGS_FAKE_TIME", "1700000000")
        .arg(src.path())
        .arg(dir.join("rootfs.ext4"))
        .arg("8M")
        .status()
        .expect("mkfs.ext4 is missing: install the e2fsprogs package");
    assert!(st.success(), "mkfs.ext4 failed");
    let engine = EngineInfo {
        name: "qemu".into(),
        version: "7.2.0".into(),
        machine_type: machine.into(),
        cpu_model: "qemu64".into(),
        accel_hint: None,
    };
    let mut m = Manifest::new(tag, "1", mem_mib, engine);
    m.description = format!("synthetic test snapshot {seed}");
    commit_files(staging, tag, m, &["memory.bin", "vmstate", "rootfs.ext4"]);
}

/// List `files` of the staging directory (size, sha256, and the role a built image gives a
/// file of that name) in `m`, and install it as `tag`.
pub fn commit_files(
    staging: forkd_store::Staging,
    tag: &str,
    mut m: Manifest,
    files: &[&str],
) -> Manifest {
    for name in files {
        let p = staging.dir().join(name);
        m.files.insert(
            name.to_string(),
            FileEntry {
                size: std::fs::metadata(&p).unwrap().len(),
                sha256: sha256_file(&p),
                role: match *name {
                    "memory.bin" => Some("memory".into()),
                    "rootfs.ext4" => Some("rootfs".into()),
                    "vmstate" => Some("vmstate".into()),
                    _ => None,
                },
            },
        );
    }
    staging
        .commit(&Tag::parse(tag).unwrap(), &m, Overwrite::No)
        .unwrap()
        .manifest
}

/// sha256 of every file of an installed tag (data files, not manifest.toml or the provenance
/// a pull writes beside them).
pub fn tag_hashes(home: &Path, tag: &str) -> BTreeMap<String, String> {
    let dir = home.join("images").join(tag);
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if name != "manifest.toml" && name != "origin.json" && name != "workingset.json" {
            out.insert(name, sha256_file(&e.path()));
        }
    }
    out
}

/// Everything under images/ with its hash: equal before and after means "store unchanged".
pub fn store_state(home: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.insert(p.clone(), "dir".into());
                walk(&p, out);
            } else {
                out.insert(p.clone(), sha256_file(&p));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&home.join("images"), &mut out);
    out
}

/// No staging leftovers (a failed pull cleans up).
pub fn assert_no_staging(home: &Path) {
    let tmp = home.join("tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|rd| rd.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.iter()
            .all(|n| !n.to_string_lossy().starts_with("stage-")
                || n.to_string_lossy().ends_with(".lock")),
        "staging left behind in {}: {left:?}",
        tmp.display()
    );
}

pub fn forkd(home: &Path, args: &[&str]) -> Output {
    forkd_env(home, args, &[])
}

pub fn forkd_env(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(FORKD);
    c.args(args)
        .env("FORKD_HOME", home)
        .env_remove("FORKD_HUB")
        .env_remove("FORKD_HUB_TOKEN")
        .env("FORKD_HUB_ATTEMPTS", "2");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "forkd failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The command failed and its stderr says `gist` (case-insensitive).
pub fn fails_with(out: &Output, gist: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "expected failure, got success; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.to_lowercase().contains(&gist.to_lowercase()),
        "stderr lacks {gist:?}:\n{err}"
    );
    err
}

/// A publisher home with a key and a snapshot tagged `tag`; returns the public key line.
pub fn publisher(home: &Path, tag: &str, mem_mib: u64, seed: u64) -> String {
    make_snapshot(home, tag, mem_mib, seed);
    ok(&forkd(home, &["key", "generate"]));
    std::fs::read_to_string(home.join("keys/forkd.pub"))
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string()
}

/// `forkd hub serve` on 127.0.0.1 with a random port; killed on drop.
pub struct HubServer {
    pub child: Child,
    pub url: String,
    pub token_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl HubServer {
    pub fn start(root: &Path, token: &str) -> HubServer {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        let mut child = Command::new(FORKD)
            .args(["hub", "serve", "--listen", "127.0.0.1:0", "--root"])
            .arg(root)
            .arg("--token-file")
            .arg(&token_file)
            .env("FORKD_HOME", dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line.trim().rsplit(' ').next().unwrap().to_string();
        assert!(
            url.starts_with("http://127.0.0.1:"),
            "unexpected serve banner {line:?}"
        );
        HubServer {
            child,
            url,
            token_file,
            _dir: dir,
        }
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn write_file(p: &Path, data: &[u8]) {
    std::fs::File::create(p).unwrap().write_all(data).unwrap();
}

/// Blob paths (relative to the hub root) of an image's data chunks, largest first.
pub fn data_blobs(hub_root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<(u64, PathBuf)> = Vec::new();
    for a in std::fs::read_dir(hub_root.join("blobs/sha256")).unwrap() {
        for b in std::fs::read_dir(a.unwrap().path()).unwrap() {
            let p = b.unwrap().path();
            let len = std::fs::metadata(&p).unwrap().len();
            let body = std::fs::read(&p).unwrap();
            if !is_manifest(&body) {
                v.push((len, p));
            }
        }
    }
    v.sort_by_key(|x| std::cmp::Reverse(x.0));
    v.into_iter().map(|x| x.1).collect()
}

/// A publisher home with `acme/snap:v1` pushed (signed) to its embedded file hub.
pub struct Published {
    _dir: tempfile::TempDir,
    pub home: PathBuf,
    pub key: String,
    pub root: PathBuf,
}

impl Published {
    pub fn new(mem_mib: u64, seed: u64) -> Published {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_path_buf();
        let key = publisher(&home, "snap", mem_mib, seed);
        ok(&forkd(&home, &["push", "snap", "acme/snap:v1"]));
        let root = home.join("hub");
        Published {
            _dir: dir,
            home,
            key,
            root,
        }
    }
    pub fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

/// The JSON of the image manifest blob at `path` (one zstd frame, as forkd pushes it, or plain).
pub fn manifest_json(path: &Path) -> serde_json::Value {
    let body = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let im = forkd_hub::layout::decode_manifest(&body)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::to_value(im).unwrap()
}

/// Whether a blob is an image manifest: its JSON, or a zstd frame of it (what forkd pushes),
/// told from a pack of chunks by the first bytes it decompresses to.
pub fn is_manifest(body: &[u8]) -> bool {
    use std::io::Read as _;
    if body.starts_with(b"{") {
        return true;
    }
    let mut head = [0u8; 9];
    zstd::stream::read::Decoder::new(body)
        .and_then(|mut d| d.read_exact(&mut head))
        .is_ok()
        && &head == b"{\"layout\""
}
