//! A recording view of a local image: the files as they are, and a log of what was read, in
//! order. `forkd build` forks its smoke-check child from such a mount, and the log becomes the
//! image's working set ([`forkd_store::workingset`]). The mount is fresh, so its page cache is
//! empty: every page the child touches is read through it once, in the order it was needed.

use crate::Source;
use forkd_store::workingset::{MAX_TOUCHES, Touch, WorkingSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

pub struct Recorder {
    files: Vec<(String, u64, File)>,
    log: Mutex<Vec<(usize, u64, u64)>>,
}

impl Recorder {
    /// Open `names` in `dir` (without following links) to serve them.
    pub fn open(dir: &Path, names: &[String]) -> std::io::Result<Recorder> {
        let mut files = Vec::new();
        for n in names {
            let f = forkd_store::open_nofollow(&dir.join(n))?;
            let len = f.metadata()?.len();
            files.push((n.clone(), len, f));
        }
        Ok(Recorder {
            files,
            log: Mutex::new(Vec::new()),
        })
    }

    /// What was read so far, first read first, each range once (at most
    /// [`MAX_TOUCHES`] of them).
    pub fn working_set(&self) -> WorkingSet {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = std::collections::HashSet::new();
        let touches = log
            .iter()
            .filter(|t| seen.insert(**t))
            .take(MAX_TOUCHES)
            .map(|&(f, offset, len)| Touch {
                file: self.files[f].0.clone(),
                offset,
                len,
            })
            .collect();
        WorkingSet {
            version: 1,
            touches,
        }
    }
}

impl Source for Recorder {
    fn files(&self) -> Vec<(String, u64)> {
        self.files.iter().map(|(n, l, _)| (n.clone(), *l)).collect()
    }

    fn read_at(&self, file: usize, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        let (name, size, f) = self.files.get(file).ok_or("no such file")?;
        let len = (len as u64).min(size.saturating_sub(offset));
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset)
            .map_err(|e| format!("cannot read {name}: {e}"))?;
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if log.len() < 4 * MAX_TOUCHES {
            log.push((file, offset, len));
        }
        Ok(buf)
    }
}
