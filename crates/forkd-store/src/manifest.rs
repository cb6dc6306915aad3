//! `manifest.toml`: what a snapshot is, and the size + sha256 of every file in it.
//!
//! Parsing is for untrusted input (a pack from the network): [`Manifest::parse`] checks the
//! format version first, then every field. Unknown fields within a known version are ignored
//! (forward compatibility); only `format_version` gates.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The newest manifest / pack format this forkd understands: 2 adds a parent (a branch).
pub const FORMAT_VERSION: u32 = 2;
/// The format of an image without a parent. It is still written as 1, so that a forkd that
/// knows only version 1 reads every image it could use.
pub const PLAIN_FORMAT_VERSION: u32 = 1;
/// The format of an image with a parent (a branch, docs/PACK-FORMAT.md section 6).
pub const BRANCH_FORMAT_VERSION: u32 = 2;
/// The name of the manifest inside an image directory and as the first pack entry.
pub const MANIFEST_NAME: &str = "manifest.toml";
/// Ceiling for one file and for the sum of all files (1 TiB).
pub const MAX_TOTAL_SIZE: u64 = 1 << 40;
/// Ceiling for the number of files in one snapshot.
pub const MAX_FILES: usize = 1024;
/// Ceiling for the manifest text itself (1 MiB).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// What a snapshot file name may look like, for error messages.
pub const FILE_NAME_RULES: &str = "file names are 1 to 100 characters of A-Z, a-z, 0-9, '.', '_' \
                                   and '-', do not start with '.', and name no directory";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub base_image: String,
    /// Guest architecture, e.g. "x86_64".
    pub arch: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// When the snapshot was taken (RFC 3339, UTC).
    pub created_at: jiff::Timestamp,
    /// The forkd version that made the snapshot.
    pub forkd_version: String,
    /// The parent of a branch, as `NAME:VERSION` where it was made (informative: the parent
    /// is found by `parent_digest`). Absent or empty in format version 1, required in 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_tag: Option<String>,
    /// The parent's [`Manifest::digest`] (`sha256:<64 hex>`): which image this one changes.
    /// Format version 2 only, and required there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_digest: Option<String>,
    pub engine: EngineInfo,
    /// Free-form metadata (licences, recipe, source URL, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Every file of the snapshot except manifest.toml itself, by flat file name.
    pub files: BTreeMap<String, FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineInfo {
    /// e.g. "qemu"
    pub name: String,
    /// e.g. "7.2.0"
    pub version: String,
    /// Pinned, versioned machine type, e.g. "pc-i440fx-7.2".
    pub machine_type: String,
    /// Named CPU model (not host/max), e.g. "qemu64".
    pub cpu_model: String,
    /// "kvm" or "tcg": what the parent ran under (a hint, not a requirement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel_hint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Logical (apparent) size in bytes.
    pub size: u64,
    /// sha256 of the logical content, lowercase hex.
    pub sha256: String,
    /// "memory", "rootfs", "vmstate", ... Informative, except that `forkd push` cuts a
    /// `rootfs` into larger chunks than other files (forkd-hub `layout::cdc_sizes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid TOML: {0}")]
    Toml(String),
    #[error(
        "this pack/manifest uses format version {0}; this forkd understands up to {FORMAT_VERSION} — upgrade forkd"
    )]
    TooNew(i64),
    #[error(
        "manifest has no valid format_version (expected an integer from 1 to {FORMAT_VERSION})"
    )]
    BadVersion,
    #[error("manifest is invalid: {0}")]
    Invalid(String),
    #[error("manifest is larger than {MAX_MANIFEST_BYTES} bytes")]
    TooLarge,
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, ManifestError> {
    Err(ManifestError::Invalid(msg.into()))
}

/// Whether `name` may be a file of a snapshot (flat, no leading dot, not manifest.toml).
pub fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `sha256:` and 64 lowercase hex digits.
pub fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn check_text(field: &str, value: &str, required: bool, max: usize) -> Result<(), ManifestError> {
    if required && value.trim().is_empty() {
        return invalid(format!("`{field}` must not be empty"));
    }
    if value.len() > max {
        return invalid(format!("`{field}` is longer than {max} bytes"));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return invalid(format!("`{field}` contains control characters"));
    }
    Ok(())
}

impl Manifest {
    /// Parse and validate untrusted manifest text.
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        if text.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge);
        }
        // Gate on the version before looking at anything else: a newer format may have changed
        // every other field, and the useful error is "upgrade forkd".
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ManifestError::Toml(e.message().to_string()))?;
        // Accept a native TOML datetime for created_at as well as the RFC 3339 string we write.
        if let Some(toml::Value::Datetime(dt)) = table.get("created_at") {
            let s = dt.to_string();
            table.insert("created_at".into(), toml::Value::String(s));
        }
        match table.get("format_version") {
            Some(toml::Value::Integer(v)) if *v > FORMAT_VERSION as i64 => {
                return Err(ManifestError::TooNew(*v));
            }
            Some(toml::Value::Integer(v)) if *v >= 1 => {}
            _ => return Err(ManifestError::BadVersion),
        }
        let m: Manifest = table
            .try_into()
            .map_err(|e: toml::de::Error| ManifestError::Invalid(e.message().to_string()))?;
        m.validate()?;
        Ok(m)
    }

    /// Check every rule a manifest of format version 1 must follow.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format_version > FORMAT_VERSION {
            return Err(ManifestError::TooNew(self.format_version as i64));
        }
        if self.format_version == 0 {
            return Err(ManifestError::BadVersion);
        }
        check_text("name", &self.name, true, 256)?;
        check_text("version", &self.version, true, 128)?;
        check_text("description", &self.description, false, 4096)?;
        check_text("base_image", &self.base_image, false, 1024)?;
        check_text("arch", &self.arch, true, 32)?;
        check_text("forkd_version", &self.forkd_version, true, 64)?;
        check_text("engine.name", &self.engine.name, true, 64)?;
        check_text("engine.version", &self.engine.version, true, 64)?;
        check_text("engine.machine_type", &self.engine.machine_type, true, 64)?;
        check_text("engine.cpu_model", &self.engine.cpu_model, true, 64)?;
        if let Some(a) = &self.engine.accel_hint {
            check_text("engine.accel_hint", a, false, 32)?;
        }
        if self.memory_mib == 0 || self.memory_mib > MAX_TOTAL_SIZE >> 20 {
            return invalid(format!(
                "`memory_mib` = {} is out of range (1 to {})",
                self.memory_mib,
                MAX_TOTAL_SIZE >> 20
            ));
        }
        let has_parent = self.parent_tag.as_deref().is_some_and(|p| !p.is_empty())
            || self.parent_digest.is_some();
        if self.format_version < BRANCH_FORMAT_VERSION && has_parent {
            return invalid(
                "`parent_tag` is reserved for diff snapshots and must be empty in format version 1",
            );
        }
        if self.format_version >= BRANCH_FORMAT_VERSION {
            let tag = self.parent_tag.as_deref().unwrap_or("");
            check_text("parent_tag", tag, true, 256)?;
            match self.parent_digest.as_deref() {
                Some(d) if is_digest(d) => {}
                Some(d) => {
                    return invalid(format!(
                        "`parent_digest` must be sha256:<64 lowercase hex>, got {d:?}"
                    ));
                }
                None => return invalid("format version 2 needs `parent_digest`"),
            }
        }
        if self.labels.len() > 256 {
            return invalid("more than 256 labels");
        }
        for (k, v) in &self.labels {
            check_text("labels key", k, true, 128)?;
            check_text(&format!("labels.{k}"), v, false, 4096)?;
        }
        if self.files.len() > MAX_FILES {
            return invalid(format!("more than {MAX_FILES} files"));
        }
        let mut total: u64 = 0;
        for (name, f) in &self.files {
            if name == MANIFEST_NAME {
                return invalid("`manifest.toml` must not list itself in [files]");
            }
            if !valid_file_name(name) {
                return invalid(format!("bad file name {name:?}: {FILE_NAME_RULES}"));
            }
            if f.size > MAX_TOTAL_SIZE {
                return invalid(format!(
                    "file {name}: size {} is larger than the 1 TiB limit",
                    f.size
                ));
            }
            total = total.saturating_add(f.size);
            if f.sha256.len() != 64
                || !f
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return invalid(format!(
                    "file {name}: sha256 must be 64 lowercase hex digits, got {:?}",
                    f.sha256
                ));
            }
            if let Some(r) = &f.role {
                check_text(&format!("files.{name}.role"), r, false, 64)?;
            }
        }
        if total > MAX_TOTAL_SIZE {
            return invalid(format!(
                "files add up to {total} bytes, more than the 1 TiB limit"
            ));
        }
        Ok(())
    }

    /// Serialise (after validating) to the text stored as `manifest.toml`.
    pub fn to_toml(&self) -> Result<String, ManifestError> {
        self.validate()?;
        toml::to_string(self).map_err(|e| ManifestError::Invalid(e.to_string()))
    }

    /// The image's identity: `sha256:` of the list of its files (`NAME SIZE SHA256` lines in
    /// name order, after a `forkd-image/1` line). Only content counts, not the name, version,
    /// dates or labels: the same files installed under any tag have the same digest, which is
    /// how a branch finds its parent (docs/PACK-FORMAT.md section 6).
    pub fn digest(&self) -> String {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(b"forkd-image/1\n");
        for (name, f) in &self.files {
            h.update(format!("{name} {} {}\n", f.size, f.sha256).as_bytes());
        }
        format!("sha256:{}", hex::encode(h.finalize()))
    }

    /// Whether this image is a branch (it names a parent).
    pub fn is_branch(&self) -> bool {
        self.parent_digest.is_some()
    }

    /// Make this manifest a branch of `parent` (known locally as `parent_tag`).
    pub fn set_parent(&mut self, parent_tag: &str, parent: &Manifest) {
        self.format_version = BRANCH_FORMAT_VERSION;
        self.parent_tag = Some(parent_tag.to_string());
        self.parent_digest = Some(parent.digest());
    }

    /// Sum of the logical sizes of all listed files.
    pub fn total_size(&self) -> u64 {
        self.files.values().map(|f| f.size).sum()
    }

    /// A manifest with the current forkd version, `created_at` = now and no files yet.
    pub fn new(name: &str, version: &str, memory_mib: u64, engine: EngineInfo) -> Manifest {
        Manifest {
            format_version: PLAIN_FORMAT_VERSION,
            name: name.to_string(),
            version: version.to_string(),
            description: String::new(),
            base_image: String::new(),
            arch: std::env::consts::ARCH.to_string(),
            memory_mib,
            created_at: jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())
                .unwrap_or_else(|_| jiff::Timestamp::now()),
            forkd_version: crate::FORKD_VERSION.to_string(),
            parent_tag: None,
            parent_digest: None,
            engine,
            labels: BTreeMap::new(),
            files: BTreeMap::new(),
        }
    }
}
