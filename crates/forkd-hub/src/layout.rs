//! Hub layout v1: object keys and the JSON documents stored at them (docs/HUB-LAYOUT.md).

use crate::reference::{Reference, Target};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The hub layout version this client reads and writes.
pub const LAYOUT: u32 = 1;
/// The `layout` of a tag file whose image manifest blob is one zstd frame of its JSON, which
/// forkd pushes. A client that reads only plain manifests (tag layout 1) refuses such a tag
/// with "upgrade forkd" rather than failing to parse the manifest; this one reads both.
pub const TAG_LAYOUT: u32 = 2;
/// Chunk size of `fixed` chunking, which layout 1 clients wrote (4 MiB). Still read.
pub const CHUNK_SIZE: u64 = 4 << 20;
/// Content-defined chunking of a disk image (`fastcdc`, FastCDC 2020; other files below): cuts where
/// the content says, so equal data at different offsets of two ext4 images, or of two builds,
/// makes equal chunks. The sizes come from bench/chunks.py on images built here (RESULTS.md,
/// "chunks"): 64 KiB on average shares 56% of python-numpy's rootfs with another recipe's,
/// where fixed 4 MiB chunks share nothing, and 16 KiB..256 KiB bounds keep the manifest and
/// the per-chunk work small.
pub const CDC_MIN: u32 = 16 << 10;
pub const CDC_AVG: u32 = 64 << 10;
pub const CDC_MAX: u32 = 256 << 10;

/// Every file but a disk is cut twice as fine: 8 KiB..128 KiB, 32 KiB on average. Guest memory
/// differs from a rebuild's (or another recipe's) in pages scattered among equal ones (slab
/// pointers, timestamps), so a large chunk is new as soon as one of its pages is. The kernel
/// and initrd are cut alike because boot copies them into guest memory, where they stay: cut
/// the same way, they are stored once. Measured on two builds of python-numpy (RESULTS.md,
/// session 10), the rebuild brings this much that the first build lacks:
///
/// | memory, kernel, initrd cut at | new in the rebuild | image stored | numpy lazy first answer |
/// |---|---|---|---|
/// | 64 KiB (the disk's) | 10.5% | 113.5 MiB | 2.02-2.06 s |
/// | 32 KiB | 8.9% | 115.1 MiB | 2.07-2.15 s |
/// | 16 KiB | 7.4% | 115.7 MiB | 2.26-2.30 s (every chunk costs its own work) |
/// | 16 KiB, memory only | 7.5% | 126.8 MiB | (the kernel no longer matched its copy) |
///
/// The disk keeps 64 KiB: files are larger than pages, and its sharing did not gain.
pub const FINE_CDC_MIN: u32 = 8 << 10;
pub const FINE_CDC_AVG: u32 = 32 << 10;
pub const FINE_CDC_MAX: u32 = 128 << 10;

/// The content-defined chunk sizes a push uses for an image file with this manifest `role`:
/// (min, average, max). A disk is `rootfs` (a parent's rootfs.ext4, a branch's disk).
pub fn cdc_sizes(role: Option<&str>) -> (u32, u32, u32) {
    if role == Some("rootfs") {
        (CDC_MIN, CDC_AVG, CDC_MAX)
    } else {
        (FINE_CDC_MIN, FINE_CDC_AVG, FINE_CDC_MAX)
    }
}

/// A push packs new chunks into blobs of about this many stored bytes; readers fetch ranges of
/// them, so a small chunk costs no round trip of its own.
pub const PACK_TARGET: u64 = 16 << 20;
pub const MEDIA_TYPE: &str = "application/vnd.forkd.image.v1+json";

pub const HUB_INFO_KEY: &str = "forkd-hub.json";
pub const CATALOG_KEY: &str = "catalog.json";

/// Largest forkd-hub.json a client reads or `hub serve` stores.
pub const MAX_HUB_INFO_BYTES: u64 = 64 << 10;
/// Largest tag file a client reads or `hub serve` stores (a signature is well under 1 KiB).
pub const MAX_TAG_BYTES: u64 = 64 << 10;
/// Largest catalogue a client reads or `hub serve` stores (tens of thousands of versions).
pub const MAX_CATALOG_BYTES: u64 = 16 << 20;
/// Largest image manifest a client reads, stored or decompressed: about a million chunks of
/// about 240 bytes of JSON each, i.e. some 30-60 GiB of non-zero data at 32-64 KiB chunks.
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;
/// Largest pack offset a reader follows: `pack_offset + stored_size` must be within it. forkd
/// writes packs of about 16 MiB; this bounds what a ranged GET can ask for (and what a server
/// that ignores `Range` makes the client read and drop).
pub const MAX_PACK: u64 = 1 << 30;

/// `blobs/sha256/<2 hex>/<64 hex>` for a `sha256:<hex>` digest (validated by the caller).
pub fn blob_key(digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    format!("blobs/sha256/{}/{hex}", &hex[..2])
}

pub fn version_tag_key(owner: &str, name: &str, version: &str) -> String {
    format!("tags/{owner}/{name}/{version}.json")
}

/// Tag file for a digest pin; `_` cannot start a VERSION, so this never collides.
pub fn digest_tag_key(owner: &str, name: &str, digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    format!("tags/{owner}/{name}/_digests/{hex}.json")
}

pub fn tag_key(r: &Reference) -> String {
    match &r.target {
        Target::Version(v) => version_tag_key(&r.owner, &r.name, v),
        Target::Digest(d) => digest_tag_key(&r.owner, &r.name, d),
    }
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HubInfo {
    pub layout: u32,
}

/// `tags/OWNER/NAME/VERSION.json` (and `_digests/HEX.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TagFile {
    pub layout: u32,
    /// `OWNER/NAME`
    pub image: String,
    /// Digest of the image manifest blob.
    pub digest: String,
    /// Sum of stored blob sizes.
    pub size: u64,
    /// minisign signature of the image manifest blob bytes; its trusted comment binds
    /// `image=` and `digest=`. `None` for images pushed unsigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// One stored chunk of a file: raw bytes `[offset, offset+len)` compressed as one zstd frame.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub len: u64,
    /// sha256 of the stored (compressed) bytes; also the blob's address.
    pub digest: String,
    pub stored_size: u64,
    /// The blob that holds the stored bytes, at `pack_offset` (a pack of chunks). Absent: the
    /// chunk is a blob of its own, addressed by `digest` (layout 1 pushes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack_offset: Option<u64>,
}

impl Chunk {
    /// Where the stored bytes are on the hub: a blob key and a byte range of it.
    pub fn location(&self) -> (String, std::ops::Range<u64>) {
        match &self.pack {
            Some(p) => {
                let at = self.pack_offset.unwrap_or(0);
                (blob_key(p), at..at.saturating_add(self.stored_size))
            }
            None => (blob_key(&self.digest), 0..self.stored_size),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    /// Whole-file sha256 (64 hex), identical to manifest.toml's.
    pub sha256: String,
    /// Data chunks in offset order; byte ranges not covered are zeros (holes).
    pub chunks: Vec<Chunk>,
    /// How this file was cut, when not as the image's `chunking` says (forkd cuts all but the
    /// disk finer: [`cdc_sizes`]). A record, like `chunking`: readers use offsets and lengths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunking: Option<Chunking>,
}

impl FileEntry {
    /// The indices of the chunks that overlap `[offset, offset + len)` (none for a hole).
    /// Chunks are sorted by offset and do not overlap (a validated manifest).
    pub fn covering(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let end = offset.saturating_add(len);
        let a = self.chunks.partition_point(|c| c.offset + c.len <= offset);
        let b = self.chunks.partition_point(|c| c.offset < end);
        a..b.max(a)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunking {
    /// `fixed` (cut every `size` bytes) or `fastcdc` (content-defined: FastCDC 2020 with
    /// `min`, average `size` and `max`). Other values are refused until a client knows them.
    /// Readers use only each chunk's `offset` and `len`; this records how a pusher cut.
    pub algorithm: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
}

impl Chunking {
    /// The chunking this client pushes with, as the image records it (a disk's).
    pub fn fastcdc() -> Chunking {
        Chunking::fastcdc_of((CDC_MIN, CDC_AVG, CDC_MAX))
    }

    /// FastCDC with these (min, average, max) sizes.
    pub fn fastcdc_of((min, avg, max): (u32, u32, u32)) -> Chunking {
        Chunking {
            algorithm: "fastcdc".into(),
            size: avg.into(),
            min: Some(min.into()),
            max: Some(max.into()),
        }
    }
}

/// The first bytes of a zstd frame; a JSON document starts with `{`.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Largest zstd window a manifest frame may ask for (16 MiB): a hostile frame cannot make a
/// reader allocate the format's 2 GiB, and forkd's own frames use far less.
const MANIFEST_WINDOW_LOG_MAX: u32 = 24;
/// zstd level of a pushed manifest: 4.5x smaller than its JSON (python-numpy's 1.4 MB to
/// 0.3 MB, 90 ms less before a lazy fork's first child at 100 Mbit/s), in some 30 ms.
const MANIFEST_LEVEL: i32 = 9;

/// The image manifest blob a push stores: its compact JSON, as one zstd frame.
pub fn encode_manifest(m: &ImageManifest) -> Vec<u8> {
    let json = serde_json::to_vec(m).expect("serialisable");
    zstd::bulk::compress(&json, MANIFEST_LEVEL).expect("compressing to memory does not fail")
}

/// Parse an image manifest blob (untrusted): one zstd frame of the JSON, or the JSON itself
/// (what forkd pushed before), decompressed to at most [`MAX_MANIFEST_BYTES`] and to at most
/// [`MANIFEST_MAX_RATIO`] times its stored size.
pub fn decode_manifest(body: &[u8]) -> Result<ImageManifest, String> {
    decode_manifest_within(body, MAX_MANIFEST_BYTES)
}

/// How much larger than its stored bytes a manifest's JSON may be (plus 1 MiB). Digests do not
/// compress, so forkd's manifests are 4-5x; a frame that claims more is a bomb: without this, a
/// frame of some kilobytes could make a reader hold and parse 256 MiB.
pub const MANIFEST_MAX_RATIO: u64 = 32;

fn decode_manifest_within(body: &[u8], max: u64) -> Result<ImageManifest, String> {
    use std::io::Read as _;
    if !body.starts_with(&ZSTD_MAGIC) {
        return serde_json::from_slice(body).map_err(|e| format!("not an image manifest: {e}"));
    }
    let bad = |e: std::io::Error| format!("not a zstd frame: {e}");
    let mut d = zstd::stream::read::Decoder::new(body)
        .map_err(bad)?
        .single_frame();
    d.window_log_max(MANIFEST_WINDOW_LOG_MAX).map_err(bad)?;
    let cap = max.min((body.len() as u64).saturating_mul(MANIFEST_MAX_RATIO) + (1 << 20));
    let mut json = Vec::new();
    d.by_ref()
        .take(cap + 1)
        .read_to_end(&mut json)
        .map_err(bad)?;
    if json.len() as u64 > cap {
        return Err(format!(
            "it decompresses to more than {cap} bytes ({MANIFEST_MAX_RATIO}x its {} stored bytes + 1 MiB, at most {max})",
            body.len()
        ));
    }
    let rest = d.finish();
    if !rest.buffer().is_empty() || !rest.get_ref().is_empty() {
        return Err("it has bytes after its zstd frame".into());
    }
    serde_json::from_slice(&json).map_err(|e| format!("not an image manifest: {e}"))
}

/// The image manifest blob.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageManifest {
    pub layout: u32,
    pub media_type: String,
    pub chunking: Chunking,
    /// `zstd` in layout 1.
    pub compression: String,
    /// The snapshot's manifest.toml, verbatim.
    pub manifest_toml: String,
    pub files: Vec<FileEntry>,
    /// A branch's parent on the hub (manifest.toml format version 2 only): where a pull finds
    /// the image the branch was made from, by its digest pin. Absent for plain images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// The chunks a freshly forked child read first, in order (docs/HUB-LAYOUT.md section 2):
    /// indices into the image's chunks, files in order and each file's chunks in order. A lazy
    /// fork fetches them before the rest. A hint: it changes only the order of a download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_set: Option<Vec<u32>>,
}

/// Most entries of an image manifest's `working_set` a reader uses.
pub const MAX_WORKING_SET: usize = 1 << 16;

impl ImageManifest {
    /// The first chunking algorithm (the image's, then each file's) this client cannot read.
    pub fn unknown_chunking(&self) -> Option<&str> {
        std::iter::once(&self.chunking)
            .chain(self.files.iter().filter_map(|f| f.chunking.as_ref()))
            .map(|c| c.algorithm.as_str())
            .find(|a| !matches!(*a, "fixed" | "fastcdc"))
    }

    /// The chunks (flat indices) covering each range of `ws`, first touched first, each once;
    /// ranges of files the image does not have are skipped.
    pub fn working_set_of(&self, ws: &forkd_store::workingset::WorkingSet) -> Vec<u32> {
        let first = self.chunk_starts();
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for t in &ws.touches {
            let Some(fi) = self.files.iter().position(|f| f.name == t.file) else {
                continue;
            };
            for i in self.files[fi].covering(t.offset, t.len) {
                let flat = (first[fi] + i) as u32;
                if seen.insert(flat) && out.len() < MAX_WORKING_SET {
                    out.push(flat);
                }
            }
        }
        out
    }

    /// Where each file's chunks start in the flat list of all chunks (files in order, each
    /// file's chunks in order), and one past the last chunk: the numbering `working_set` uses.
    pub fn chunk_starts(&self) -> Vec<usize> {
        let mut starts = Vec::with_capacity(self.files.len() + 1);
        let mut n = 0;
        for f in &self.files {
            starts.push(n);
            n += f.chunks.len();
        }
        starts.push(n);
        starts
    }

    /// The valid part of `working_set` as the byte ranges of its chunks, to keep beside an
    /// installed image (so that a push of a pulled image publishes it again).
    pub fn working_set_touches(&self) -> Option<forkd_store::workingset::WorkingSet> {
        let flat: Vec<(&str, &Chunk)> = self
            .files
            .iter()
            .flat_map(|f| f.chunks.iter().map(move |c| (f.name.as_str(), c)))
            .collect();
        let touches: Vec<_> = self
            .working_set()
            .into_iter()
            .map(|i| forkd_store::workingset::Touch {
                file: flat[i].0.to_string(),
                offset: flat[i].1.offset,
                len: flat[i].1.len,
            })
            .collect();
        (!touches.is_empty()).then_some(forkd_store::workingset::WorkingSet {
            version: 1,
            touches,
        })
    }

    /// The valid part of `working_set`: indices of chunks the image has, at most
    /// [`MAX_WORKING_SET`].
    pub fn working_set(&self) -> Vec<usize> {
        let n = self.chunk_starts().last().copied().unwrap_or(0);
        self.working_set
            .iter()
            .flatten()
            .map(|&i| i as usize)
            .filter(|&i| i < n)
            .take(MAX_WORKING_SET)
            .collect()
    }
}

/// Where a branch's parent is on the hub (docs/HUB-LAYOUT.md section 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// `OWNER/NAME` of the parent.
    pub image: String,
    /// The VERSION it was pushed as (informative: pulls follow `digest`).
    pub version: String,
    /// The parent's image manifest digest; read from `tags/OWNER/NAME/_digests/<hex>.json`.
    pub digest: String,
}

impl ParentRef {
    /// The digest-pinned reference a pull follows (`OWNER/NAME@sha256:HEX`), checked.
    pub fn reference(&self) -> Result<Reference, String> {
        let r = Reference::parse(&format!("{}@{}", self.image, self.digest))
            .map_err(|e| format!("its parent reference is not valid: {e}"))?;
        if !crate::reference::is_version(&self.version) {
            return Err(format!(
                "its parent's version {:?} is not a valid VERSION",
                self.version
            ));
        }
        Ok(r)
    }
}

impl ImageManifest {
    /// Bytes a pull of the image downloads at most: each distinct chunk once (a chunk listed
    /// twice, at two offsets or in two files, is fetched once).
    pub fn stored_size(&self) -> u64 {
        let mut seen = std::collections::HashSet::new();
        self.files
            .iter()
            .flat_map(|f| &f.chunks)
            .filter(|c| seen.insert(c.digest.as_str()))
            .map(|c| c.stored_size)
            .sum()
    }
    pub fn apparent_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
    pub fn data_size(&self) -> u64 {
        self.files
            .iter()
            .flat_map(|f| &f.chunks)
            .map(|c| c.len)
            .sum()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Catalog {
    pub layout: u32,
    pub images: Vec<CatalogImage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CatalogImage {
    /// `OWNER/NAME`
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub versions: Vec<CatalogVersion>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CatalogVersion {
    pub version: String,
    pub digest: String,
    /// Bytes to download (stored blobs).
    pub size: u64,
    /// Apparent size of the snapshot's files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size: Option<u64>,
    pub created_at: String,
}

/// What a key of the layout names; anything else is not part of a hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutKey {
    HubInfo,
    Catalog,
    /// `blobs/sha256/<2 hex>/<64 hex>`: the 64 hex.
    Blob(String),
    /// `tags/OWNER/NAME/VERSION.json`
    Tag {
        owner: String,
        name: String,
        version: String,
    },
    /// `tags/OWNER/NAME/_digests/<64 hex>.json`
    DigestTag {
        owner: String,
        name: String,
        hex: String,
    },
}

impl LayoutKey {
    /// Classify `key` (relative, `/`-separated); `None` when the layout has no such key.
    pub fn parse(key: &str) -> Option<LayoutKey> {
        use crate::reference::{Reference, digest_hex, is_version};
        let hex_of = |h: &str| digest_hex(&format!("sha256:{h}")).map(str::to_string);
        // OWNER and NAME follow the reference rules (one parser for both).
        let repo_ok = |o: &str, n: &str| Reference::parse(&format!("{o}/{n}")).is_ok();
        let parts: Vec<&str> = key.split('/').collect();
        match parts.as_slice() {
            [HUB_INFO_KEY] => Some(LayoutKey::HubInfo),
            [CATALOG_KEY] => Some(LayoutKey::Catalog),
            ["blobs", "sha256", pre, hex] => {
                let hex = hex_of(hex)?;
                (hex[..2] == **pre).then_some(LayoutKey::Blob(hex))
            }
            ["tags", owner, name, file] if repo_ok(owner, name) => {
                let version = file.strip_suffix(".json")?;
                is_version(version).then(|| LayoutKey::Tag {
                    owner: owner.to_string(),
                    name: name.to_string(),
                    version: version.to_string(),
                })
            }
            ["tags", owner, name, "_digests", file] if repo_ok(owner, name) => {
                let hex = hex_of(file.strip_suffix(".json")?)?;
                Some(LayoutKey::DigestTag {
                    owner: owner.to_string(),
                    name: name.to_string(),
                    hex,
                })
            }
            _ => None,
        }
    }

    /// The most bytes a well-formed object at this key can hold; `blob_max` for blobs (image
    /// manifests and chunks share the address space).
    pub fn max_size(&self, blob_max: u64) -> u64 {
        match self {
            LayoutKey::HubInfo => MAX_HUB_INFO_BYTES,
            LayoutKey::Catalog => MAX_CATALOG_BYTES,
            LayoutKey::Blob(_) => blob_max,
            LayoutKey::Tag { .. } | LayoutKey::DigestTag { .. } => MAX_TAG_BYTES,
        }
    }

    /// Check a document about to be stored at this key: tags must name the image and digest of
    /// their path, the catalogue and forkd-hub.json must parse. Blobs are checked by hash.
    pub fn validate(&self, body: &[u8]) -> Result<(), String> {
        let tag = |owner: &str, name: &str| -> Result<TagFile, String> {
            let t: TagFile =
                serde_json::from_slice(body).map_err(|e| format!("not a tag file: {e}"))?;
            if crate::reference::digest_hex(&t.digest).is_none() {
                return Err(format!("digest {:?} is not sha256:<64 hex>", t.digest));
            }
            if t.image != format!("{owner}/{name}") {
                return Err(format!("it names image {:?}, not {owner}/{name}", t.image));
            }
            Ok(t)
        };
        match self {
            LayoutKey::Blob(_) => Ok(()),
            LayoutKey::HubInfo => serde_json::from_slice::<HubInfo>(body)
                .map(drop)
                .map_err(|e| format!("not a forkd-hub.json: {e}")),
            LayoutKey::Catalog => {
                let (_, skipped) = Catalog::parse_checked(body)?;
                match skipped.first() {
                    None => Ok(()),
                    Some(why) => Err(why.clone()),
                }
            }
            LayoutKey::Tag { owner, name, .. } => tag(owner, name).map(drop),
            LayoutKey::DigestTag { owner, name, hex } => {
                let t = tag(owner, name)?;
                if t.digest != format!("sha256:{hex}") {
                    return Err(format!("it points at {}, not at its path", t.digest));
                }
                Ok(())
            }
        }
    }
}

impl CatalogImage {
    /// Whether the entry is well formed: `OWNER/NAME`, valid versions and digests.
    pub fn check(&self) -> Result<(), String> {
        let name_ok = self.name.split_once('/').is_some_and(|(o, n)| {
            !n.contains(['/', ':', '@'])
                && crate::reference::Reference::parse(&format!("{o}/{n}")).is_ok()
        });
        if !name_ok {
            return Err(format!("{:?} is not OWNER/NAME", self.name));
        }
        for v in &self.versions {
            if !crate::reference::is_version(&v.version) {
                return Err(format!(
                    "{}: version {:?} is not valid",
                    self.name, v.version
                ));
            }
            if crate::reference::digest_hex(&v.digest).is_none() {
                return Err(format!(
                    "{}:{}: digest {:?} is not sha256:<64 hex>",
                    self.name, v.version, v.digest
                ));
            }
        }
        Ok(())
    }
}

impl Catalog {
    /// Parse an untrusted catalogue: the document must be a catalogue object, but a bad image
    /// entry is skipped (and described in the second value) so one entry cannot hide the rest.
    pub fn parse_checked(body: &[u8]) -> Result<(Catalog, Vec<String>), String> {
        #[derive(Deserialize)]
        struct Raw {
            layout: u32,
            images: Vec<serde_json::Value>,
        }
        let raw: Raw = serde_json::from_slice(body)
            .map_err(|e| format!("not a catalogue ({{\"layout\": 1, \"images\": [...]}}): {e}"))?;
        let mut images = Vec::with_capacity(raw.images.len());
        let mut skipped = Vec::new();
        for (i, v) in raw.images.into_iter().enumerate() {
            match serde_json::from_value::<CatalogImage>(v) {
                Ok(img) => match img.check() {
                    Ok(()) => images.push(img),
                    Err(why) => skipped.push(format!("entry {i}: {why}")),
                },
                Err(e) => skipped.push(format!("entry {i}: {e}")),
            }
        }
        Ok((
            Catalog {
                layout: raw.layout,
                images,
            },
            skipped,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_keys() {
        let hex = "ab".to_string() + &"c".repeat(62);
        assert_eq!(LayoutKey::parse("forkd-hub.json"), Some(LayoutKey::HubInfo));
        assert_eq!(LayoutKey::parse("catalog.json"), Some(LayoutKey::Catalog));
        assert_eq!(
            LayoutKey::parse(&format!("blobs/sha256/ab/{hex}")),
            Some(LayoutKey::Blob(hex.clone()))
        );
        assert!(matches!(
            LayoutKey::parse("tags/acme/tiny/1.json"),
            Some(LayoutKey::Tag { .. })
        ));
        assert!(matches!(
            LayoutKey::parse(&format!("tags/acme/tiny/_digests/{hex}.json")),
            Some(LayoutKey::DigestTag { .. })
        ));
        for bad in [
            "junk/anything/big.bin",
            &format!("blobs/sha256/cd/{hex}"),
            "blobs/sha256/ab/xyz",
            "tags/acme/tiny/1.txt",
            "tags/Acme/tiny/1.json",
            "tags/acme/tiny/_x.json",
            "tags/acme/tiny/_digests/abc.json",
            "catalog.json/x",
            ".uploads/x",
        ] {
            assert_eq!(LayoutKey::parse(bad), None, "{bad}");
        }
    }

    fn image_manifest_json(parent: Option<&str>) -> String {
        let parent = parent
            .map(|p| format!(",\n  \"parent\": {p}"))
            .unwrap_or_default();
        format!(
            r#"{{"layout": 1, "media_type": "{MEDIA_TYPE}",
  "chunking": {{"algorithm": "fixed", "size": 4194304}}, "compression": "zstd",
  "manifest_toml": "", "files": []{parent}}}"#
        )
    }

    #[test]
    fn a_manifest_is_read_compressed_or_plain_and_a_bomb_is_refused() {
        let im: ImageManifest = serde_json::from_str(&image_manifest_json(None)).unwrap();
        let packed = encode_manifest(&im);
        assert!(packed.starts_with(&ZSTD_MAGIC));
        let json = serde_json::to_vec(&im).unwrap();
        for body in [packed.as_slice(), json.as_slice()] {
            let back = decode_manifest(body).unwrap();
            assert_eq!(serde_json::to_vec(&back).unwrap(), json);
        }
        // Garbage after the magic, a cut frame, a frame of more than the cap, a frame that
        // expands more than its ratio, and a frame that asks for a larger window.
        let mut junk = ZSTD_MAGIC.to_vec();
        junk.extend_from_slice(b"not zstd at all");
        assert!(decode_manifest(&junk).unwrap_err().contains("zstd"));
        assert!(decode_manifest(&packed[..packed.len() - 3]).is_err());
        let e = decode_manifest_within(&packed, json.len() as u64 - 1).unwrap_err();
        assert!(e.contains("more than"), "{e}");
        let spaces = vec![b' '; (4 << 20) + 10];
        let bomb = zstd::bulk::compress(&spaces, 19).unwrap();
        assert!(bomb.len() < 4096, "{}", bomb.len());
        let e = decode_manifest(&bomb).unwrap_err();
        assert!(e.contains("32x"), "{e}");
        let mut wide = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        wide.window_log(MANIFEST_WINDOW_LOG_MAX + 2).unwrap();
        std::io::Write::write_all(&mut wide, &json).unwrap();
        let wide = wide.finish().unwrap();
        let e = decode_manifest(&wide).unwrap_err();
        assert!(e.contains("zstd"), "{e}");
        // Two frames: the format is one.
        let two = [packed.clone(), packed.clone()].concat();
        let e = decode_manifest(&two).unwrap_err();
        assert!(e.contains("after its zstd frame"), "{e}");
        assert!(
            decode_manifest(b"[1, 2]")
                .unwrap_err()
                .contains("not an image manifest")
        );
    }

    #[test]
    fn a_file_may_say_how_it_was_cut_and_an_unknown_way_is_found() {
        let file = |chunking: &str| {
            format!(
                r#"{{"layout": 1, "media_type": "{MEDIA_TYPE}",
  "chunking": {{"algorithm": "fastcdc", "size": 65536, "min": 16384, "max": 262144}},
  "compression": "zstd", "manifest_toml": "",
  "files": [{{"name": "memory.bin", "size": 0, "sha256": "", "chunks": []{chunking}}}]}}"#
            )
        };
        let plain: ImageManifest = serde_json::from_str(&file("")).unwrap();
        assert_eq!(plain.files[0].chunking, None);
        assert_eq!(plain.unknown_chunking(), None);
        let v = serde_json::to_value(&plain).unwrap();
        assert!(v["files"][0].get("chunking").is_none(), "{v}");

        let fine =
            r#", "chunking": {"algorithm": "fastcdc", "size": 32768, "min": 8192, "max": 131072}"#;
        let im: ImageManifest = serde_json::from_str(&file(fine)).unwrap();
        assert_eq!(
            im.files[0].chunking,
            Some(Chunking::fastcdc_of(cdc_sizes(None)))
        );
        assert_eq!(im.unknown_chunking(), None);

        let odd = r#", "chunking": {"algorithm": "rabin", "size": 32768}"#;
        let im: ImageManifest = serde_json::from_str(&file(odd)).unwrap();
        assert_eq!(im.unknown_chunking(), Some("rabin"));
        assert_eq!(cdc_sizes(Some("rootfs")), (CDC_MIN, CDC_AVG, CDC_MAX));
        assert_eq!(
            cdc_sizes(Some("memory")),
            (FINE_CDC_MIN, FINE_CDC_AVG, FINE_CDC_MAX)
        );
    }

    #[test]
    fn parent_is_optional_and_omitted_when_absent() {
        let old: ImageManifest = serde_json::from_str(&image_manifest_json(None)).unwrap();
        assert_eq!(old.parent, None);
        let text = serde_json::to_string(&old).unwrap();
        assert!(!text.contains("parent"), "{text}");

        let d = format!("sha256:{}", "ab".repeat(32));
        let p = format!(r#"{{"image": "acme/tiny", "version": "1", "digest": "{d}"}}"#);
        let im: ImageManifest = serde_json::from_str(&image_manifest_json(Some(&p))).unwrap();
        let parent = im.parent.clone().unwrap();
        assert_eq!(parent.image, "acme/tiny");
        let r = parent.reference().unwrap();
        assert_eq!(r.to_string(), format!("acme/tiny@{d}"));
        let again: ImageManifest =
            serde_json::from_str(&serde_json::to_string(&im).unwrap()).unwrap();
        assert_eq!(again.parent, im.parent);
    }

    #[test]
    fn bad_parent_references_are_refused() {
        let d = format!("sha256:{}", "ab".repeat(32));
        for (image, version, digest) in [
            ("acme", "1", d.as_str()),
            ("acme/tiny/x", "1", d.as_str()),
            ("Acme/tiny", "1", d.as_str()),
            ("acme/tiny", "_x", d.as_str()),
            ("acme/tiny", "1", "sha256:abc"),
            ("acme/tiny:2", "1", d.as_str()),
        ] {
            let p = ParentRef {
                image: image.into(),
                version: version.into(),
                digest: digest.into(),
            };
            assert!(p.reference().is_err(), "{p:?}");
        }
    }
}
