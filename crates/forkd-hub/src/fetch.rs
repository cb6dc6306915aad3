//! The download pipeline. Files are written in place in `cache/partial/<image hex>/`; a journal
//! records every chunk that was verified and written, so a pull interrupted by a network cut,
//! Ctrl-C or kill -9 resumes with only the missing chunks, and each byte is written to disk
//! once. N chunks are in flight; each is verified against its digest, decompressed (at most its
//! `len`), checked for length and written at its offset (zero pages skipped). That verifies every
//! byte of a fresh pull. A resumed pull also runs a hasher thread that hashes every file in
//! offset order as chunks complete (resumed chunks are read back from the file), so its
//! whole-file sha256 check needs no second pass.

use crate::error::{HubError, Result};
use crate::layout::{self, Chunk, ImageManifest};
use crate::progress::Progress;
use crate::remote::{get_retry, transport_err};
use crate::transport::Transport;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How hard a fetch works: chunks in flight, and attempts per blob for transient errors.
pub struct Limits {
    pub jobs: usize,
    pub attempts: u32,
}

pub struct Fetched {
    pub downloaded: u64,
    pub resumed: u64,
}

const JOURNAL: &str = ".journal";

/// Chunk indices recorded as done. A torn last line (kill -9 mid-append) is ignored.
fn read_journal(path: &Path, image: &ImageManifest) -> HashSet<usize> {
    let digests: Vec<&str> = image
        .files
        .iter()
        .flat_map(|f| f.chunks.iter().map(|c| c.digest.as_str()))
        .collect();
    let Ok(text) = std::fs::read_to_string(path) else {
        return HashSet::new();
    };
    text.lines()
        .filter_map(|l| {
            let (i, d) = l.split_once(' ')?;
            let i: usize = i.parse().ok()?;
            (digests.get(i) == Some(&d)).then_some(i)
        })
        .collect()
}

pub async fn fetch(
    hub: Arc<dyn Transport>,
    image: &ImageManifest,
    dir: &Path,
    opts: &Limits,
    progress: &dyn Progress,
) -> Result<Fetched> {
    fs_err::create_dir_all(dir).map_err(HubError::io("cannot create the download directory"))?;
    let journal_path = dir.join(JOURNAL);
    let done = read_journal(&journal_path, image);
    let journal = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&journal_path)
        .map_err(HubError::io(format!(
            "cannot open {}",
            journal_path.display()
        )))?;
    let journal = Arc::new(Mutex::new(journal));
    // A fresh pull (nothing from an earlier attempt) creates every file here, so whatever no
    // chunk covers is zeros by construction; a resumed one may find anything in them.
    let mut fresh = done.is_empty();
    let mut files = Vec::new();
    for f in &image.files {
        let path = dir.join(&f.name);
        fresh &= !path.try_exists().unwrap_or(true);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(HubError::io(format!("cannot create {}", path.display())))?;
        file.set_len(f.size)
            .map_err(HubError::io(format!("cannot size {}", path.display())))?;
        files.push(Arc::new(file));
    }

    struct Work {
        idx: usize,
        file_idx: usize,
        chunk: Chunk,
    }
    let work: Vec<Work> = image
        .files
        .iter()
        .enumerate()
        .flat_map(|(i, f)| f.chunks.iter().map(move |c| (i, c.clone())))
        .enumerate()
        .map(|(idx, (file_idx, chunk))| Work {
            idx,
            file_idx,
            chunk,
        })
        .collect();
    let total: u64 = work.iter().map(|w| w.chunk.stored_size).sum();
    let resumed: u64 = work
        .iter()
        .filter(|w| done.contains(&w.idx))
        .map(|w| w.chunk.stored_size)
        .sum();
    if resumed > 0 {
        progress.message(&format!(
            "resuming: {} of {} bytes are already here",
            resumed, total
        ));
    }

    // Every downloaded blob is checked against its digest in the (verified) image manifest,
    // and zstd decodes it into exactly `len` bytes, so on a fresh pull each byte of each file
    // is already verified: present bytes by their chunk, holes by construction. Only a resumed
    // pull, whose files predate this process, recomputes the whole-file sha256 (in offset
    // order, on its own thread, holes hashed as zeros).
    let hasher = (!fresh).then(|| {
        let sizes: Vec<u64> = image.files.iter().map(|f| f.size).collect();
        let (tx, rx) = tokio::sync::mpsc::channel::<(usize, u64, Bytes)>(opts.jobs.max(1) * 2);
        (
            tx,
            std::thread::spawn(move || crate::hasher::run(sizes, rx)),
        )
    });
    let (tx, hasher) = match hasher {
        Some((tx, h)) => (Some(tx), Some(h)),
        None => (None, None),
    };
    tracing::debug!(
        fresh,
        "whole-file hash {}",
        if fresh { "skipped" } else { "on" }
    );

    progress.start("pulling", total);
    let downloaded = AtomicU64::new(0);
    let done = &done;
    let result: Result<()> = futures::stream::iter(work)
        .map(|w| {
            let hub = hub.clone();
            let file = files[w.file_idx].clone();
            let journal = journal.clone();
            let downloaded = &downloaded;
            let keep_raw = tx.is_some();
            async move {
                let c = w.chunk;
                if done.contains(&w.idx) {
                    progress.advance(c.stored_size);
                    let raw = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; c.len as usize];
                        file.read_exact_at(&mut buf, c.offset)
                            .map(|()| (w.file_idx, c.offset, Bytes::from(buf)))
                    })
                    .await
                    .map_err(|e| HubError::Invalid(e.to_string()))?
                    .map_err(HubError::io("cannot read back a resumed chunk"))?;
                    return Ok(raw);
                }
                let key = layout::blob_key(&c.digest);
                let data = get_retry(hub.as_ref(), &key, c.stored_size, opts.attempts, progress)
                    .await
                    .map_err(transport_err(
                        hub.as_ref(),
                        format!("cannot download blob {}", c.digest),
                    ))?;
                downloaded.fetch_add(data.len() as u64, Ordering::Relaxed);
                progress.advance(c.stored_size);
                let raw = tokio::task::spawn_blocking(move || -> Result<Bytes> {
                    let digest = &c.digest;
                    let actual = layout::sha256_digest(&data);
                    if &actual != digest {
                        return Err(HubError::Corrupt {
                            what: format!("blob {key}"),
                            expected: digest.clone(),
                            actual,
                        });
                    }
                    let raw = zstd::bulk::decompress(&data, c.len as usize).map_err(|e| {
                        HubError::Corrupt {
                            what: format!("blob {digest}"),
                            expected: format!("a zstd frame of {} bytes", c.len),
                            actual: e.to_string(),
                        }
                    })?;
                    if raw.len() as u64 != c.len {
                        return Err(HubError::Corrupt {
                            what: format!("blob {digest}"),
                            expected: format!("{} bytes", c.len),
                            actual: format!("{} bytes", raw.len()),
                        });
                    }
                    forkd_store::sparse::write_sparse_at(&file, &raw, c.offset)
                        .map_err(HubError::io("cannot write the pulled snapshot"))?;
                    let mut j = journal.lock().expect("journal lock");
                    writeln!(j, "{} {digest}", w.idx)
                        .map_err(HubError::io("cannot write the download journal"))?;
                    Ok(if keep_raw {
                        Bytes::from(raw)
                    } else {
                        Bytes::new()
                    })
                })
                .await
                .map_err(|e| HubError::Invalid(e.to_string()))??;
                Ok::<_, HubError>((w.file_idx, c.offset, raw))
            }
        })
        .buffered(opts.jobs.max(1))
        .try_for_each(|item| {
            let tx = tx.clone();
            async move {
                match tx {
                    Some(tx) => tx
                        .send(item)
                        .await
                        .map_err(|_| HubError::Invalid("hasher stopped".into())),
                    None => Ok(()),
                }
            }
        })
        .await;
    drop(tx);
    let hashes = match hasher {
        Some(h) => Some(
            h.join()
                .map_err(|_| HubError::Invalid("hasher thread panicked".into()))?,
        ),
        None => None,
    };
    progress.finish();
    if let Err(e) = result {
        // Out of space: free what this pull took instead of keeping it for a resume.
        if let HubError::Io { source, .. } = &e
            && source.raw_os_error() == Some(28)
        {
            drop(files);
            let _ = std::fs::remove_dir_all(dir);
        }
        return Err(e);
    }

    for (f, actual) in image.files.iter().zip(hashes.into_iter().flatten()) {
        if actual != f.sha256 {
            // Start over next time: what is here cannot be trusted.
            let _ = std::fs::remove_dir_all(dir);
            return Err(HubError::Corrupt {
                what: format!("{} after download", f.name),
                expected: format!("sha256 {}", f.sha256),
                actual: format!("sha256 {actual}"),
            });
        }
    }
    Ok(Fetched {
        downloaded: downloaded.into_inner(),
        resumed,
    })
}
