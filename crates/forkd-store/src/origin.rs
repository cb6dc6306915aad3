//! `images/<tag>/origin.json`: where a pulled image came from (provenance). Written by the hub's
//! pull with the image; absent for images made or unpacked on this host.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The name of the provenance file inside an image directory.
pub const ORIGIN_NAME: &str = "origin.json";
/// Largest origin.json read.
const MAX_ORIGIN_BYTES: u64 = 64 << 10;

/// Where a pulled image came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The hub, as shown to the user (credentials redacted).
    pub hub: String,
    /// The reference as pulled: `OWNER/NAME:VERSION` or `OWNER/NAME@sha256:HEX`.
    pub reference: String,
    pub owner: String,
    pub name: String,
    /// The version the signature names (v2 signatures), else the one pulled, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Digest of the hub's image manifest.
    pub digest: String,
    /// Whether the signature verified (false: pulled with --insecure).
    pub verified: bool,
    /// The id of the key that signed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// When the publisher signed it (v2 signatures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_at: Option<String>,
    pub pulled_at: jiff::Timestamp,
}

impl Origin {
    /// Read `dir/origin.json`: `Ok(None)` when there is none; an error when it is not valid.
    pub fn load(dir: &Path) -> Result<Option<Origin>, String> {
        let path = dir.join(ORIGIN_NAME);
        let file = match crate::fsutil::open_nofollow(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let mut text = String::new();
        file.take(MAX_ORIGIN_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if text.len() as u64 > MAX_ORIGIN_BYTES {
            return Err(format!("{}: too large", path.display()));
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// `acme/tiny:2 from HUB`, for messages.
    pub fn describe(&self) -> String {
        format!("{} from {}", self.reference, self.hub)
    }
}
