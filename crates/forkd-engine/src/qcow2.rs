//! The one kind of qcow2 a branch may hold: a plain v2/v3 image of disk changes, with no
//! backing file name, external data file, encryption or corruption flag in its header. QEMU
//! would open the paths such a header names, and a branch may come from a hub: its chain is
//! given on the command line instead (see [`crate::spec::Launch`]).

use crate::error::{EngineError, IoCtx, Result};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

const MAGIC: u32 = 0x5146_49fb;
/// Incompatible feature bits QEMU may set that change nothing here: dirty (lazy refcounts),
/// compression type, extended L2 entries. Corrupt (1) and external data file (2) are refused,
/// as is any bit this code does not know.
const ALLOWED_INCOMPATIBLE: u64 = (1 << 0) | (1 << 3) | (1 << 4);

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Check the header of `path` (read without following a link).
pub fn check_plain(path: &Path) -> Result<()> {
    let f = forkd_store::open_nofollow(path).at("cannot open", path)?;
    let mut h = [0u8; 104];
    f.read_exact_at(&mut h, 0)
        .map_err(|_| bad(path, "shorter than a qcow2 header"))?;
    check_header(&h).map_err(|why| bad(path, why))
}

fn bad(path: &Path, why: &str) -> EngineError {
    EngineError::Corrupt(format!("{}: {why}", path.display()))
}

fn check_header(h: &[u8; 104]) -> std::result::Result<(), &'static str> {
    if be32(h, 0) != MAGIC {
        return Err("not a qcow2 image");
    }
    let version = be32(h, 4);
    if !(2..=3).contains(&version) {
        return Err("unknown qcow2 version");
    }
    if be64(h, 8) != 0 || be32(h, 16) != 0 {
        return Err("names a backing file (a branch's chain comes from its manifest)");
    }
    if be32(h, 32) != 0 {
        return Err("is encrypted");
    }
    if version == 3 && be64(h, 72) & !ALLOWED_INCOMPATIBLE != 0 {
        return Err("has an external data file, a corruption flag or an unknown feature");
    }
    Ok(())
}

/// Clear the backing file name QEMU wrote into a child's overlay (`qemu-img rebase -u -b ""`).
pub fn drop_backing(qemu_img: &Path, path: &Path) -> Result<()> {
    let out = Command::new(qemu_img)
        .args(["rebase", "-u", "-f", "qcow2", "-b", ""])
        .arg(path)
        .output()
        .map_err(|e| EngineError::Io {
            what: "cannot run (apt-get install qemu-utils)",
            path: qemu_img.to_path_buf(),
            source: e,
        })?;
    if !out.status.success() {
        return Err(EngineError::Qmp(format!(
            "qemu-img rebase failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, backing: u64, incompatible: u64) -> [u8; 104] {
        let mut h = [0u8; 104];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[8..16].copy_from_slice(&backing.to_be_bytes());
        h[72..80].copy_from_slice(&incompatible.to_be_bytes());
        h
    }

    #[test]
    fn only_plain_qcow2_headers_pass() {
        assert!(check_header(&header(3, 0, 0)).is_ok());
        assert!(check_header(&header(3, 0, 1)).is_ok(), "dirty bit");
        assert!(check_header(&header(3, 512, 0)).is_err(), "backing file");
        assert!(check_header(&header(3, 0, 1 << 2)).is_err(), "data file");
        assert!(check_header(&header(3, 0, 1 << 40)).is_err(), "unknown");
        assert!(check_header(&header(4, 0, 0)).is_err(), "version");
        let mut raw = header(3, 0, 0);
        raw[0] = 0;
        assert!(check_header(&raw).is_err(), "magic");
    }
}
