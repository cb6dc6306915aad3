//! `forkd pull`: resolve and verify, check compatibility, then one pipeline that downloads N
//! chunks at once, verifies each blob, caches it, decompresses it and writes it at its offset
//! into sparse staging files, while a hasher thread computes every file's sha256 in offset order
//! as chunks complete. The tag appears only after every file's sha256 matched.

use crate::cache::Cache;
use crate::error::{HubError, Result};
use crate::layout::{self, Chunk};
use crate::progress::Progress;
use crate::reference::Reference;
use crate::remote::transport_err;
use crate::transport::{TResult, Transport};
use bytes::Bytes;
use forkd_store::{Overwrite, Store, Tag};
use futures::{StreamExt, TryStreamExt};
use minisign::PublicKey;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

pub struct PullOptions {
    pub tag: Tag,
    pub jobs: usize,
    pub trusted: Vec<PublicKey>,
    pub insecure: bool,
    pub skip_compat_check: bool,
    /// Attempts per blob for transient errors (connection drops, 5xx).
    pub attempts: u32,
}

#[derive(Debug, Clone)]
pub struct PullOutcome {
    pub digest: String,
    pub tag: Tag,
    pub up_to_date: bool,
    pub downloaded_bytes: u64,
    pub cached_bytes: u64,
    pub apparent_size: u64,
    pub unverified: Option<String>,
}

async fn fetch_retry(
    hub: &dyn Transport,
    key: &str,
    attempts: u32,
    progress: &dyn Progress,
) -> TResult<Bytes> {
    let mut delay = Duration::from_millis(200);
    let mut n = 1;
    loop {
        match hub.get(key).await {
            Err(e) if e.is_transient() && n < attempts => {
                progress.message(&format!("retrying {key} in {delay:?} ({e})"));
                tracing::debug!("attempt {n} for {key} failed: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                n += 1;
            }
            r => return r,
        }
    }
}

pub async fn pull(
    hub: Arc<dyn Transport>,
    store: &Store,
    reference: &Reference,
    opts: &PullOptions,
    progress: &dyn Progress,
) -> Result<PullOutcome> {
    let r = crate::resolve::resolve(hub.as_ref(), reference, &opts.trusted, opts.insecure).await?;
    if let Some(why) = &r.unverified {
        progress.message(&format!(
            "warning: accepting {reference} without a valid signature (--insecure): {why}"
        ));
    }
    if !opts.skip_compat_check {
        crate::compat::check(&r.manifest).map_err(|reason| HubError::Incompatible {
            reference: reference.to_string(),
            reason,
        })?;
    }
    let mut outcome = PullOutcome {
        digest: r.digest.clone(),
        tag: opts.tag.clone(),
        up_to_date: false,
        downloaded_bytes: 0,
        cached_bytes: 0,
        apparent_size: r.image.apparent_size(),
        unverified: r.unverified.clone(),
    };
    let up_to_date =
        |store: &Store| matches!(store.get(&opts.tag), Ok(s) if s.manifest == r.manifest);
    if up_to_date(store) {
        outcome.up_to_date = true;
        return Ok(outcome);
    }

    let cache = Cache::new(store.home());
    let lock_digest = r.digest.clone();
    let cache2 = cache.clone();
    let (tx_wait, mut rx_wait) = tokio::sync::oneshot::channel::<()>();
    let lock_task = tokio::task::spawn_blocking(move || {
        cache2.lock(&lock_digest, move || {
            let _ = tx_wait.send(());
        })
    });
    tokio::pin!(lock_task);
    let lock = tokio::select! {
        l = &mut lock_task => l,
        Ok(()) = &mut rx_wait => {
            progress.message(&format!("waiting for another pull of {} to finish...", r.digest));
            lock_task.await
        }
    }
    .map_err(|e| HubError::Invalid(format!("lock task failed: {e}")))??;
    if up_to_date(store) {
        outcome.up_to_date = true;
        return Ok(outcome);
    }

    let staging = store.stage()?;
    let mut files = Vec::new();
    for f in &r.image.files {
        let path = staging.dir().join(&f.name);
        let file = std::fs::File::create(&path)
            .map_err(HubError::io(format!("cannot create {}", path.display())))?;
        file.set_len(f.size)
            .map_err(HubError::io(format!("cannot size {}", path.display())))?;
        files.push(Arc::new(file));
    }

    struct Work {
        file_idx: usize,
        chunk: Chunk,
    }
    let work: Vec<Work> = r
        .image
        .files
        .iter()
        .enumerate()
        .flat_map(|(i, f)| {
            f.chunks.iter().map(move |c| Work {
                file_idx: i,
                chunk: c.clone(),
            })
        })
        .collect();
    let total: u64 = work.iter().map(|w| w.chunk.stored_size).sum();

    let sizes: Vec<u64> = r.image.files.iter().map(|f| f.size).collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<(usize, u64, Bytes)>(opts.jobs.max(1) * 2);
    let hasher = std::thread::spawn(move || crate::hasher::run(sizes, rx));

    progress.start("pulling", total);
    let downloaded = std::sync::atomic::AtomicU64::new(0);
    let cached = std::sync::atomic::AtomicU64::new(0);
    let result: Result<()> = futures::stream::iter(work)
        .map(|w| {
            let hub = hub.clone();
            let cache = cache.clone();
            let file = files[w.file_idx].clone();
            let (downloaded, cached) = (&downloaded, &cached);
            async move {
                let c = w.chunk;
                let digest = c.digest.clone();
                let cache_hit = {
                    let (cache, d) = (cache.clone(), digest.clone());
                    tokio::task::spawn_blocking(move || cache.get(&d))
                        .await
                        .map_err(|e| HubError::Invalid(e.to_string()))?
                };
                let (data, fresh) = match cache_hit {
                    Some(d) => {
                        cached.fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
                        (d, false)
                    }
                    None => {
                        let key = layout::blob_key(&digest);
                        let d = fetch_retry(hub.as_ref(), &key, opts.attempts, progress)
                            .await
                            .map_err(transport_err(
                                hub.as_ref(),
                                format!("cannot download blob {digest}"),
                            ))?;
                        downloaded.fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
                        (d, true)
                    }
                };
                progress.advance(c.stored_size);
                let raw = tokio::task::spawn_blocking(move || -> Result<Bytes> {
                    if fresh {
                        let actual = layout::sha256_digest(&data);
                        if actual != digest {
                            return Err(HubError::Corrupt {
                                what: format!("blob {}", layout::blob_key(&digest)),
                                expected: digest,
                                actual,
                            });
                        }
                        cache.put(&digest, &data)?;
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
                    write_sparse(&file, &raw, c.offset)
                        .map_err(HubError::io("cannot write the pulled snapshot"))?;
                    Ok(Bytes::from(raw))
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
                tx.send(item)
                    .await
                    .map_err(|_| HubError::Invalid("hasher stopped".into()))
            }
        })
        .await;
    drop(tx);
    let hashes = hasher
        .join()
        .map_err(|_| HubError::Invalid("hasher thread panicked".into()))?;
    progress.finish();
    result?;
    outcome.downloaded_bytes = downloaded.into_inner();
    outcome.cached_bytes = cached.into_inner();

    for (f, actual) in r.image.files.iter().zip(hashes) {
        if actual != f.sha256 {
            return Err(HubError::Corrupt {
                what: format!("{} after download", f.name),
                expected: format!("sha256 {}", f.sha256),
                actual: format!("sha256 {actual}"),
            });
        }
    }
    drop(files);
    let tag = opts.tag.clone();
    tokio::task::block_in_place(|| staging.commit(&tag, &r.manifest, Overwrite::Yes))?;
    drop(lock);
    Ok(outcome)
}

/// Write `data` at `offset`, leaving all-zero 4 KiB pages as holes (the file was sized with
/// set_len, so skipped pages read as zeros and take no disk).
fn write_sparse(file: &std::fs::File, data: &[u8], offset: u64) -> std::io::Result<()> {
    const PAGE: usize = 4096;
    let mut run: Option<usize> = None;
    let mut i = 0;
    while i < data.len() {
        let end = (i + PAGE).min(data.len());
        let zero = crate::push::is_zero(&data[i..end]);
        match (zero, run) {
            (false, None) => run = Some(i),
            (true, Some(s)) => {
                file.write_all_at(&data[s..i], offset + s as u64)?;
                run = None;
            }
            _ => {}
        }
        i = end;
    }
    if let Some(s) = run {
        file.write_all_at(&data[s..], offset + s as u64)?;
    }
    Ok(())
}
