//! One JSON line per request that changes something, in `$FORKD_HOME/log/audit.jsonl` and
//! in the log.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub struct Audit {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

#[derive(serde::Serialize)]
pub struct Entry<'a> {
    pub ts: String,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<&'a str>,
    pub duration_ms: u64,
    pub peer: &'a str,
}

impl Audit {
    pub fn open(dir: &Path) -> std::io::Result<Audit> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let path = dir.join("audit.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        Ok(Audit {
            path,
            file: Mutex::new(Some(file)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn record(&self, e: &Entry<'_>) {
        let Ok(mut line) = serde_json::to_vec(e) else {
            return;
        };
        line.push(b'\n');
        tracing::info!(target: "forkd::audit", "{}", String::from_utf8_lossy(&line).trim_end());
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(file) = f.as_mut()
            && let Err(err) = file.write_all(&line)
        {
            tracing::warn!("cannot write the audit log {}: {err}", self.path.display());
        }
    }
}
