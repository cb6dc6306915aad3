//! Reading a pack (untrusted input) into the store.
//!
//! Every size in the manifest is a ceiling: an entry is checked against it before any of its
//! data is read, so a decompression bomb is refused after one header.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::Path;

use super::tarfmt::{self, BLOCK, Kind};
use super::{PackError, Progress, invalid, read_error};
use crate::fsutil::IoContext;
use crate::manifest::{MANIFEST_NAME, MAX_MANIFEST_BYTES, MAX_TOTAL_SIZE, Manifest};
use crate::sparse::{CHUNK, SparseWriter};
use crate::store::{Overwrite, Snapshot, Store, StoreError};
use crate::tag::Tag;

/// How much zero padding may follow the end-of-archive marker (GNU tar pads to 10 KiB records).
const MAX_TRAILER: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct UnpackOptions {
    /// Install under this tag instead of the manifest's `name`.
    pub tag: Option<Tag>,
    /// Replace an existing image with the same tag.
    pub overwrite: Overwrite,
    /// Refuse packs whose files add up to more than this many logical bytes.
    pub max_total_size: u64,
    /// A check of the unpacked files before they are installed (the engine checks its
    /// `engine.json` against the manifest); its error refuses the pack.
    pub check: Option<ImageCheck>,
}

/// Checks an image directory against its manifest before it is installed; `Err(why)` refuses.
pub type ImageCheck = fn(&Path, &Manifest) -> Result<(), String>;

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            tag: None,
            overwrite: Overwrite::No,
            max_total_size: MAX_TOTAL_SIZE,
            check: None,
        }
    }
}

/// Unpack the pack file `input` into `store`.
pub fn unpack(
    store: &Store,
    input: &Path,
    opts: &UnpackOptions,
    progress: &dyn Progress,
) -> Result<Snapshot, PackError> {
    let file = File::open(input).at("cannot open", input)?;
    unpack_from_reader(store, file, opts, progress)
}

/// Unpack a pack read from `r` (e.g. a download stream) into `store`. On any error the store
/// is left exactly as it was.
pub fn unpack_from_reader<R: Read>(
    store: &Store,
    r: R,
    opts: &UnpackOptions,
    progress: &dyn Progress,
) -> Result<Snapshot, PackError> {
    let dec = zstd::stream::read::Decoder::new(r).map_err(PackError::Read)?;
    let mut tar = TarIn { r: dec };
    let manifest = read_manifest(&mut tar)?;
    let tag = match &opts.tag {
        Some(t) => t.clone(),
        None => Tag::parse(&manifest.name).map_err(|source| PackError::NameNotATag {
            name: manifest.name.clone(),
            source,
        })?,
    };
    if manifest.total_size() > opts.max_total_size {
        return Err(invalid(format!(
            "the pack declares {} bytes of files, more than the limit of {}",
            manifest.total_size(),
            opts.max_total_size
        )));
    }
    if opts.overwrite == Overwrite::No && store.get(&tag).is_ok() {
        return Err(StoreError::Exists(tag).into());
    }
    if let Some(digest) = &manifest.parent_digest
        && store.find_by_digest(digest)?.is_none()
    {
        return Err(PackError::MissingParent {
            parent_tag: manifest.parent_tag.clone().unwrap_or_default(),
            digest: digest.clone(),
        });
    }
    progress.start(manifest.total_size());
    let staging = store.stage()?;
    let mut seen = BTreeSet::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let block = tar.block()?;
        if tarfmt::is_end(&block) {
            break;
        }
        let p = tarfmt::parse(&block)?;
        let Some(entry) = manifest.files.get(&p.name) else {
            return Err(invalid(if p.name == MANIFEST_NAME {
                "manifest.toml appears twice".to_string()
            } else {
                format!("entry {:?} is not listed in the manifest", p.name)
            }));
        };
        if !seen.insert(p.name.clone()) {
            return Err(invalid(format!("entry {:?} appears twice", p.name)));
        }
        let (real_size, map) = match p.kind {
            Kind::Regular => (p.stored, vec![(0, p.stored)]),
            Kind::Sparse {
                real_size,
                mut map,
                mut extended,
            } => {
                while extended {
                    extended = tarfmt::parse_ext(&tar.block()?, &p.name, &mut map)?;
                }
                (real_size, map)
            }
        };
        // The declared size is the ceiling: decide before reading any data.
        if real_size > entry.size || p.stored > entry.size {
            return Err(invalid(format!(
                "entry {:?} holds {} bytes but the manifest declares {}; refusing to read past the declared size",
                p.name,
                real_size.max(p.stored),
                entry.size
            )));
        }
        if real_size != entry.size {
            return Err(invalid(format!(
                "size mismatch for {:?}: the entry holds {real_size} bytes but the manifest declares {}",
                p.name, entry.size
            )));
        }
        tarfmt::check_map(&p.name, &map, real_size, p.stored)?;

        let path = staging.dir().join(&p.name);
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .at("cannot create", &path)?;
        let mut w = SparseWriter::new(file);
        for &(off, len) in &map {
            let gap = off - w.position();
            w.write_zeros(gap).at("cannot write", &path)?;
            progress.advance(gap);
            let mut left = len;
            while left > 0 {
                let n = (left as usize).min(CHUNK);
                tar.exact(&mut buf[..n])?;
                w.write_data(&buf[..n]).at("cannot write", &path)?;
                left -= n as u64;
                progress.advance(n as u64);
            }
        }
        let gap = real_size - w.position();
        w.write_zeros(gap).at("cannot write", &path)?;
        progress.advance(gap);
        tar.exact(&mut buf[..tarfmt::padding(p.stored)])?;
        let (_, _, digest) = w.finish().at("cannot write", &path)?;
        if digest != entry.sha256 {
            return Err(invalid(format!(
                "digest mismatch for {:?}: its content has sha256 {digest} but the manifest says {}",
                p.name, entry.sha256
            )));
        }
    }
    if let Some(missing) = manifest.files.keys().find(|n| !seen.contains(*n)) {
        return Err(invalid(format!(
            "{missing:?} is listed in the manifest but missing from the pack"
        )));
    }
    tar.trailer()?;
    if let Some(check) = opts.check {
        check(staging.dir(), &manifest).map_err(invalid)?;
    }
    Ok(staging.commit(&tag, &manifest, opts.overwrite)?)
}

/// The first entry must be a regular `manifest.toml` of bounded size.
fn read_manifest<R: Read>(tar: &mut TarIn<R>) -> Result<Manifest, PackError> {
    let block = tar.block()?;
    if tarfmt::is_end(&block) {
        return Err(invalid(
            "the archive is empty; its first entry must be manifest.toml",
        ));
    }
    let p = tarfmt::parse(&block)?;
    if p.name != MANIFEST_NAME || !matches!(p.kind, Kind::Regular) {
        return Err(invalid(format!(
            "the first entry must be manifest.toml, found {:?}",
            p.name
        )));
    }
    if p.stored > MAX_MANIFEST_BYTES {
        return Err(invalid(format!(
            "manifest.toml is {} bytes, more than the {MAX_MANIFEST_BYTES}-byte limit",
            p.stored
        )));
    }
    let mut text = vec![0u8; p.stored as usize];
    tar.exact(&mut text)?;
    let mut pad = [0u8; BLOCK];
    tar.exact(&mut pad[..tarfmt::padding(p.stored)])?;
    let text = String::from_utf8(text).map_err(|_| invalid("manifest.toml is not UTF-8"))?;
    Ok(Manifest::parse(&text)?)
}

/// The decompressed tar stream.
struct TarIn<R: Read> {
    r: R,
}

impl<R: Read> TarIn<R> {
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), PackError> {
        self.r.read_exact(buf).map_err(read_error)
    }

    fn block(&mut self) -> Result<[u8; BLOCK], PackError> {
        let mut b = [0u8; BLOCK];
        self.exact(&mut b)?;
        Ok(b)
    }

    /// After the first zero block: only zeros may follow (bounded), and the zstd frame must end
    /// cleanly (its checksum is verified by the decoder at the end).
    fn trailer(&mut self) -> Result<(), PackError> {
        let mut total = 0u64;
        let mut buf = [0u8; 8192];
        loop {
            let n = match self.r.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e)),
            };
            if n == 0 {
                return Ok(());
            }
            total += n as u64;
            if total > MAX_TRAILER || buf[..n].iter().any(|&b| b != 0) {
                return Err(invalid("unexpected data after the end of the archive"));
            }
        }
    }
}
