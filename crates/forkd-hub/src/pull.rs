//! `forkd pull`: resolve and verify, check compatibility, then one pipeline that downloads N
//! chunks at once, verifies each blob against the image manifest, decompresses it and writes it
//! at its offset into sparse files (`fetch`). The tag appears only after every chunk was
//! verified (and, for a resumed pull, every file's sha256 matched).

use crate::cache::Cache;
use crate::error::{HubError, Result};
use crate::progress::Progress;
use crate::reference::Reference;
use crate::transport::Transport;
use forkd_store::{Overwrite, Store, Tag};
use minisign::PublicKey;
use std::sync::Arc;

/// How long a pull may take in all unless told otherwise: long enough for tens of GiB on a slow
/// link, short enough that a hub trickling bytes cannot hold a pull (and its lock) forever.
pub const DEFAULT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3600);

pub struct PullOptions {
    pub tag: Tag,
    pub jobs: usize,
    pub trusted: Vec<PublicKey>,
    pub insecure: bool,
    pub skip_compat_check: bool,
    /// Attempts per blob for transient errors (connection drops, 5xx).
    pub attempts: u32,
    /// The whole pull (resolve, download, install) gives up after this long; `None`: never.
    pub deadline: Option<std::time::Duration>,
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

/// [`pull_unbounded`] within `opts.deadline`. A pull stopped by the deadline keeps what it
/// verified in the cache (the next pull resumes) and leaves the store as it was.
pub async fn pull(
    hub: Arc<dyn Transport>,
    store: &Store,
    reference: &Reference,
    opts: &PullOptions,
    progress: &dyn Progress,
) -> Result<PullOutcome> {
    let work = pull_unbounded(hub, store, reference, opts, progress);
    match opts.deadline {
        None => work.await,
        Some(after) => tokio::time::timeout(after, work)
            .await
            .map_err(|_| HubError::Deadline { after })?,
    }
}

async fn pull_unbounded(
    hub: Arc<dyn Transport>,
    store: &Store,
    reference: &Reference,
    opts: &PullOptions,
    progress: &dyn Progress,
) -> Result<PullOutcome> {
    let t0 = std::time::Instant::now();
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

    // Another local tag holds this very image: copy it (sparse) instead of downloading.
    if let Some(src) = store
        .list()?
        .into_iter()
        .find(|i| i.manifest == r.manifest && i.tag != opts.tag)
    {
        progress.message(&format!(
            "copying from the local image `{}` (same content)",
            src.tag
        ));
        let staging = store.stage()?;
        for (name, entry) in &r.manifest.files {
            let from = src.dir.join(name);
            let to = staging.dir().join(name);
            let copy = || -> std::io::Result<String> {
                let dst = std::fs::File::create(&to)?;
                Ok(forkd_store::sparse::copy_sparse(&std::fs::File::open(&from)?, dst)?.1)
            };
            let sha = copy().map_err(HubError::io(format!("cannot copy {}", from.display())))?;
            if sha != entry.sha256 {
                return Err(HubError::Corrupt {
                    what: from.display().to_string(),
                    expected: entry.sha256.clone(),
                    actual: sha,
                });
            }
        }
        let tag = opts.tag.clone();
        tokio::task::block_in_place(|| staging.commit(&tag, &r.manifest, Overwrite::Yes))?;
        outcome.cached_bytes = r.image.stored_size();
        return Ok(outcome);
    }

    let partial = cache.partial_dir(&r.digest);
    let limits = crate::fetch::Limits {
        jobs: opts.jobs,
        attempts: opts.attempts,
    };
    let fetched = crate::fetch::fetch(hub, &r.image, &partial, &limits, progress).await?;
    outcome.downloaded_bytes = fetched.downloaded;
    outcome.cached_bytes = fetched.resumed;
    tracing::debug!("fetched and verified in {:?}", t0.elapsed());

    // Move the verified files into a staging directory (same filesystem) and install.
    let staging = store.stage()?;
    for f in &r.image.files {
        let (from, to) = (partial.join(&f.name), staging.dir().join(&f.name));
        std::fs::rename(&from, &to).map_err(HubError::io(format!(
            "cannot move {} into the store",
            from.display()
        )))?;
    }
    let tag = opts.tag.clone();
    tokio::task::block_in_place(|| staging.commit(&tag, &r.manifest, Overwrite::Yes))?;
    let _ = std::fs::remove_dir_all(&partial);
    tracing::debug!("installed in {:?}", t0.elapsed());
    drop(lock);
    Ok(outcome)
}
