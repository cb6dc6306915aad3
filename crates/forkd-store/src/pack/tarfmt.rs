//! Tar headers as pack format v1 uses them: GNU headers, regular and old-GNU sparse entries.

use std::ops::Range;

use tar::{EntryType, GnuExtSparseHeader, Header};

use super::{PackError, invalid};

pub(crate) const BLOCK: usize = 512;
/// Sparse map entries in the main header and in each extension header.
pub(crate) const MAP_IN_HEADER: usize = 4;
pub(crate) const MAP_IN_EXT: usize = 21;
/// Ceiling on sparse map entries per file (each costs 16 bytes of memory while unpacking).
pub(crate) const MAX_MAP_ENTRIES: usize = 1 << 22;

/// Padding after `size` bytes of entry data.
pub(crate) fn padding(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

fn base(name: &str, mtime: u64) -> Result<Header, PackError> {
    let mut h = Header::new_gnu();
    h.set_path(name)
        .map_err(|e| invalid(format!("cannot store name {name:?}: {e}")))?;
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    Ok(h)
}

/// A header for a regular file entry.
pub(crate) fn regular(name: &str, size: u64, mtime: u64) -> Result<Vec<u8>, PackError> {
    let mut h = base(name, mtime)?;
    h.set_entry_type(EntryType::Regular);
    h.set_size(size);
    h.set_cksum();
    Ok(h.as_bytes().to_vec())
}

/// Header + extension headers for an old-GNU sparse entry ('S') of logical size `size` whose
/// data is `extents` (sorted, disjoint). A trailing hole gets a final `(size, 0)` map entry,
/// as GNU tar writes it.
pub(crate) fn sparse(
    name: &str,
    size: u64,
    extents: &[Range<u64>],
    mtime: u64,
) -> Result<Vec<u8>, PackError> {
    let mut map: Vec<(u64, u64)> = extents.iter().map(|r| (r.start, r.end - r.start)).collect();
    if map.last().is_none_or(|&(o, l)| o + l < size) {
        map.push((size, 0));
    }
    let stored: u64 = map.iter().map(|m| m.1).sum();
    let mut h = base(name, mtime)?;
    h.set_entry_type(EntryType::GNUSparse);
    h.set_size(stored);
    let gnu = h.as_gnu_mut().expect("new_gnu header");
    gnu.set_real_size(size);
    for (slot, &(off, len)) in gnu.sparse.iter_mut().zip(&map) {
        slot.set_offset(off);
        slot.set_length(len);
    }
    gnu.set_is_extended(map.len() > MAP_IN_HEADER);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    let rest: Vec<_> = map.iter().skip(MAP_IN_HEADER).collect();
    let n = rest.chunks(MAP_IN_EXT).len();
    for (i, chunk) in rest.chunks(MAP_IN_EXT).enumerate() {
        let mut ext = GnuExtSparseHeader::new();
        for (slot, &&(off, len)) in ext.sparse.iter_mut().zip(chunk) {
            slot.set_offset(off);
            slot.set_length(len);
        }
        ext.set_is_extended(i + 1 < n);
        out.extend_from_slice(ext.as_bytes());
    }
    Ok(out)
}

/// What a parsed header says, before the sparse map (if any) is read.
pub(crate) struct Parsed {
    pub name: String,
    pub kind: Kind,
    /// Bytes of data stored in the archive after the header(s).
    pub stored: u64,
}

pub(crate) enum Kind {
    Regular,
    /// Logical size, the map entries from the main header, and whether extension headers follow.
    Sparse {
        real_size: u64,
        map: Vec<(u64, u64)>,
        extended: bool,
    },
}

fn field_str(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

/// Parse and check one 512-byte header: checksum, a flat safe name, an allowed entry type.
pub(crate) fn parse(block: &[u8; BLOCK]) -> Result<Parsed, PackError> {
    let h = Header::from_byte_slice(block);
    let stored_sum = h
        .cksum()
        .map_err(|_| invalid("a tar header has an unreadable checksum (not a tar archive?)"))?;
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                b' ' as u32
            } else {
                b as u32
            }
        })
        .sum();
    if sum != stored_sum {
        return Err(invalid(
            "a tar header has a bad checksum (corrupt archive?)",
        ));
    }
    let raw = field_str(&block[..100]);
    let name = String::from_utf8_lossy(raw).into_owned();
    let is_ustar = &block[257..263] == b"ustar\0";
    if is_ustar && block[345] != 0 {
        return Err(invalid(format!(
            "entry {name:?} uses a ustar path prefix; packs hold flat file names only"
        )));
    }
    check_name(&name, raw)?;
    let ty = block[156];
    let what = match ty {
        b'0' | b'\0' | b'S' => None,
        b'2' => Some("a symbolic link"),
        b'1' => Some("a hard link"),
        b'3' => Some("a character device"),
        b'4' => Some("a block device"),
        b'6' => Some("a FIFO (named pipe)"),
        b'5' => Some("a directory"),
        b'L' | b'K' => Some("a GNU long-name record"),
        b'x' | b'g' => Some("a pax extended header"),
        _ => Some("of an unsupported type"),
    };
    if let Some(what) = what {
        return Err(invalid(format!(
            "entry {name:?} is {what}; packs may contain only regular files"
        )));
    }
    let stored = h
        .entry_size()
        .map_err(|_| invalid(format!("entry {name:?} has an unreadable size")))?;
    let kind = if ty == b'S' {
        let gnu = h
            .as_gnu()
            .ok_or_else(|| invalid(format!("sparse entry {name:?} is not in GNU format")))?;
        let real_size = gnu
            .real_size()
            .map_err(|_| invalid(format!("sparse entry {name:?} has an unreadable size")))?;
        let mut map = Vec::new();
        read_map(&gnu.sparse, &name, &mut map)?;
        Kind::Sparse {
            real_size,
            map,
            extended: gnu.is_extended(),
        }
    } else {
        Kind::Regular
    };
    Ok(Parsed { name, kind, stored })
}

/// Append the non-empty entries of a sparse map block to `map`.
pub(crate) fn read_map(
    slots: &[tar::GnuSparseHeader],
    name: &str,
    map: &mut Vec<(u64, u64)>,
) -> Result<(), PackError> {
    for s in slots {
        if s.is_empty() {
            break;
        }
        let bad = |_| invalid(format!("sparse entry {name:?} has an unreadable map"));
        map.push((s.offset().map_err(bad)?, s.length().map_err(bad)?));
    }
    if map.len() > MAX_MAP_ENTRIES {
        return Err(invalid(format!(
            "sparse entry {name:?} has more than {MAX_MAP_ENTRIES} map entries"
        )));
    }
    Ok(())
}

fn check_name(name: &str, raw: &[u8]) -> Result<(), PackError> {
    if raw.is_empty() {
        return Err(invalid("an entry has an empty name"));
    }
    if std::str::from_utf8(raw).is_err() {
        return Err(invalid(format!("entry name {name:?} is not UTF-8")));
    }
    if name.starts_with('/') {
        return Err(invalid(format!(
            "entry {name:?} has an absolute path; packs hold flat file names only"
        )));
    }
    if name.split(['/', '\\']).any(|c| c == "..") {
        return Err(invalid(format!(
            "entry {name:?} contains '..' and would escape the target directory"
        )));
    }
    if name.contains('/') || name.contains('\\') {
        return Err(invalid(format!(
            "entry {name:?} names a path; packs hold flat file names only"
        )));
    }
    Ok(())
}

/// Check a complete sparse map against the declared logical size and the stored byte count.
pub(crate) fn check_map(
    name: &str,
    map: &[(u64, u64)],
    real_size: u64,
    stored: u64,
) -> Result<(), PackError> {
    let mut pos = 0u64;
    let mut sum = 0u64;
    for &(off, len) in map {
        let end = off
            .checked_add(len)
            .ok_or_else(|| invalid(format!("sparse entry {name:?} has an overflowing map")))?;
        if off < pos || end > real_size {
            return Err(invalid(format!(
                "sparse entry {name:?} has a map that overlaps, goes backwards or exceeds its size"
            )));
        }
        pos = end;
        sum += len;
    }
    if sum != stored {
        return Err(invalid(format!(
            "sparse entry {name:?}: its map covers {sum} bytes but the entry stores {stored}"
        )));
    }
    Ok(())
}

/// Whether a 512-byte block is all zero (the end-of-archive marker).
pub(crate) fn is_end(block: &[u8; BLOCK]) -> bool {
    block.iter().all(|&b| b == 0)
}

/// Parse an extension header's map entries; returns whether another extension header follows.
pub(crate) fn parse_ext(
    block: &[u8; BLOCK],
    name: &str,
    map: &mut Vec<(u64, u64)>,
) -> Result<bool, PackError> {
    let mut ext = GnuExtSparseHeader::new();
    ext.as_mut_bytes().copy_from_slice(block);
    let before = map.len();
    read_map(&ext.sparse, name, map)?;
    if map.len() == before {
        // Each extension header must add to the map; otherwise a chain of empty ones could
        // keep the reader busy forever.
        return Err(invalid(format!(
            "sparse entry {name:?} has an empty extension header"
        )));
    }
    Ok(ext.is_extended())
}
