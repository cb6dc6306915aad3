//! Helpers shared by the store tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use forkd_store::{EngineInfo, FileEntry, Manifest, Overwrite, Snapshot, Store, Tag};
use sha2::{Digest, Sha256};

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub fn engine() -> EngineInfo {
    EngineInfo {
        name: "qemu".into(),
        version: "7.2.0".into(),
        machine_type: "pc-i440fx-7.2".into(),
        cpu_model: "qemu64".into(),
        accel_hint: Some("tcg".into()),
    }
}

/// A valid manifest listing `files` (name, content).
pub fn manifest_for(name: &str, files: &[(&str, &[u8])]) -> Manifest {
    let mut m = Manifest::new(name, "1.0", 256, engine());
    m.description = "test image".into();
    m.base_image = "debian:bookworm".into();
    for (n, data) in files {
        m.files.insert(
            n.to_string(),
            FileEntry {
                size: data.len() as u64,
                sha256: sha256_hex(data),
                role: None,
            },
        );
    }
    m
}

/// Install an image `tag` holding `files` through the public Staging API.
pub fn install(store: &Store, tag: &str, files: &[(&str, &[u8])]) -> Snapshot {
    let st = store.stage().unwrap();
    for (n, data) in files {
        fs::write(st.dir().join(n), data).unwrap();
    }
    let m = manifest_for(tag, files);
    st.commit(&Tag::parse(tag).unwrap(), &m, Overwrite::No)
        .unwrap()
}

/// Every path under `root` with its kind, size and sha256: compare before/after to prove a
/// failed operation changed nothing. Lock files under locks/ are included too.
pub fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_path_buf();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            out.insert(rel, "dir".into());
            walk(root, &p, out);
        } else if ft.is_symlink() {
            out.insert(rel, format!("symlink {:?}", fs::read_link(&p).unwrap()));
        } else {
            let data = fs::read(&p).unwrap();
            out.insert(rel, format!("file {} {}", data.len(), sha256_hex(&data)));
        }
    }
}

/// The error and all its causes, joined: what the user would read.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Builds tar archives by hand, including entries no honest writer would produce.
pub struct RawTar {
    pub out: Vec<u8>,
}

impl RawTar {
    pub fn new() -> RawTar {
        RawTar { out: Vec::new() }
    }

    /// An entry with an arbitrary raw name and type flag, and `data` as its content.
    pub fn entry(&mut self, name: &str, ty: u8, data: &[u8]) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::new(ty));
        if ty == b'2' || ty == b'1' {
            h.set_link_name("/etc/passwd").unwrap();
            h.set_size(0);
        }
        h.set_cksum();
        self.out.extend_from_slice(h.as_bytes());
        if ty == b'0' {
            self.out.extend_from_slice(data);
            self.out.resize(self.out.len().div_ceil(512) * 512, 0);
        }
        self
    }

    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.entry(name, b'0', data)
    }

    /// Raw bytes (e.g. a hand-made header).
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.out.extend_from_slice(bytes);
        self
    }

    pub fn zst(&mut self) -> Vec<u8> {
        self.out.extend_from_slice(&[0u8; 1024]);
        zstd::encode_all(&self.out[..], 3).unwrap()
    }
}
