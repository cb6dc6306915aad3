//! An image's working set: the byte ranges of its files that a freshly forked child read, in the
//! order it read them. `forkd build` records it while the recipe's smoke check runs in a child
//! (through a recording view of the image, `forkd-lazyfs`), and keeps it beside the image as
//! `workingset.json`. `forkd push` turns it into the image manifest's `working_set` (chunk
//! indices, docs/HUB-LAYOUT.md), and a lazy fork fetches those chunks before the rest.
//!
//! It is a hint, never trusted for content: a bad record only changes the order of a download.
//! It is still read capped and without following a link.

use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::Path;

pub const WORKINGSET_NAME: &str = "workingset.json";
/// Most ranges kept: a restore and a smoke check touch a few thousand 128 KiB ranges.
pub const MAX_TOUCHES: usize = 1 << 16;
const MAX_BYTES: u64 = 8 << 20;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingSet {
    pub version: u32,
    /// What the child read, first read first.
    pub touches: Vec<Touch>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Touch {
    pub file: String,
    pub offset: u64,
    pub len: u64,
}

impl WorkingSet {
    /// Read `dir/workingset.json`: `Ok(None)` when there is none; an error when it is not a
    /// valid record.
    pub fn load(dir: &Path) -> Result<Option<WorkingSet>, String> {
        let path = dir.join(WORKINGSET_NAME);
        let file = match crate::fsutil::open_nofollow(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let mut text = String::new();
        file.take(MAX_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if text.len() as u64 > MAX_BYTES {
            return Err(format!("{}: larger than {MAX_BYTES} bytes", path.display()));
        }
        let ws: WorkingSet =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if ws.version != 1 || ws.touches.len() > MAX_TOUCHES {
            return Err(format!(
                "{}: version {} with {} ranges (this forkd reads version 1, at most {MAX_TOUCHES})",
                path.display(),
                ws.version,
                ws.touches.len()
            ));
        }
        Ok(Some(ws))
    }

    /// Write it as `dir/workingset.json` (private to this user).
    pub fn save(&self, dir: &Path) -> Result<(), crate::PathError> {
        let body = serde_json::to_vec(self).expect("serialisable");
        crate::fsutil::write_private(&dir.join(WORKINGSET_NAME), body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(WorkingSet::load(d.path()).unwrap(), None);
        let ws = WorkingSet {
            version: 1,
            touches: vec![Touch {
                file: "memory.bin".into(),
                offset: 4096,
                len: 131072,
            }],
        };
        ws.save(d.path()).unwrap();
        assert_eq!(WorkingSet::load(d.path()).unwrap(), Some(ws));
        std::fs::write(
            d.path().join(WORKINGSET_NAME),
            r#"{"version":2,"touches":[]}"#,
        )
        .unwrap();
        assert!(
            WorkingSet::load(d.path())
                .unwrap_err()
                .contains("version 2")
        );
        std::fs::write(d.path().join(WORKINGSET_NAME), "not json").unwrap();
        assert!(WorkingSet::load(d.path()).is_err());
        // A link is not followed.
        std::fs::remove_file(d.path().join(WORKINGSET_NAME)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join(WORKINGSET_NAME)).unwrap();
        assert!(WorkingSet::load(d.path()).is_err());
    }
}
