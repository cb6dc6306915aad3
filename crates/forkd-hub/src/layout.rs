//! Hub layout v1: object keys and the JSON documents stored at them (docs/HUB-LAYOUT.md).

use crate::reference::{Reference, Target};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The hub layout version this client reads and writes.
pub const LAYOUT: u32 = 1;
/// Chunk size used by this client when pushing (recorded per image manifest).
pub const CHUNK_SIZE: u64 = 4 << 20;
pub const MEDIA_TYPE: &str = "application/vnd.forkd.image.v1+json";

pub const HUB_INFO_KEY: &str = "forkd-hub.json";
pub const CATALOG_KEY: &str = "catalog.json";

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    /// Whole-file sha256 (64 hex), identical to manifest.toml's.
    pub sha256: String,
    /// Data chunks in offset order; byte ranges not covered are zeros (holes).
    pub chunks: Vec<Chunk>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Chunking {
    /// `fixed` in layout 1; other values are refused until a client knows them.
    pub algorithm: String,
    pub size: u64,
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
}

impl ImageManifest {
    pub fn stored_size(&self) -> u64 {
        self.files
            .iter()
            .flat_map(|f| &f.chunks)
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
