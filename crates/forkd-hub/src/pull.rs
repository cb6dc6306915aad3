//! `forkd pull`: resolve and verify, check compatibility, then one pipeline that downloads N
//! chunks at once, verifies each blob against the image manifest, decompresses it and writes it
//! at its offset into sparse files (`fetch`). The tag appears only after every chunk was
//! verified (and, for a resumed pull, every file's sha256 matched).

use crate::cache::Cache;
use crate::error::{HubError, Result};
use crate::progress::Progress;
use crate::reference::Reference;
use crate::sign::TrustedKey;
use crate::transport::Transport;
use forkd_store::{Origin, Overwrite, Store, Tag};
use std::sync::Arc;

/// How long a pull may take in all unless told otherwise: long enough for tens of GiB on a slow
/// link, short enough that a hub trickling bytes cannot hold a pull (and its lock) forever.
pub const DEFAULT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3600);

pub struct PullOptions {
    pub tag: Tag,
    pub jobs: usize,
    pub trusted: Vec<TrustedKey>,
    pub insecure: bool,
    /// Replace a local tag that came from another owner, or was made on this host.
    pub force: bool,
    pub skip_compat_check: bool,
    /// Attempts per blob for transient errors (connection drops, 5xx).
    pub attempts: u32,
    /// The whole pull (resolve, download, install) gives up after this long; `None`: never.
    pub deadline: Option<std::time::Duration>,
    /// The engine's check of the image's `engine.json` (untrusted input) against its manifest,
    /// made in staging before anything is installed (`forkd_engine::spec::check_staged`). The
    /// hub does not know the engine's format; the caller hands in its check, as for unpack.
    pub check: forkd_store::pack::ImageCheck,
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
    for w in r.verified.iter().flat_map(|v| &v.warnings) {
        progress.message(&format!("warning: {w}"));
    }
    let origin = Origin {
        hub: hub.describe(),
        reference: reference.to_string(),
        owner: reference.owner.clone(),
        name: reference.name.clone(),
        version: r
            .verified
            .as_ref()
            .and_then(|v| v.subject.version.clone())
            .or(match &reference.target {
                crate::reference::Target::Version(v) => Some(v.clone()),
                crate::reference::Target::Digest(_) => None,
            }),
        digest: r.digest.clone(),
        verified: r.verified.is_some(),
        key_id: r.verified.as_ref().map(|v| v.key_id.clone()),
        signed_at: r.verified.as_ref().and_then(|v| v.subject.time.clone()),
        pulled_at: jiff::Timestamp::now(),
    };
    let overwrite = if opts.force {
        Overwrite::Yes
    } else {
        Overwrite::No
    };
    // Refuse early (before any download) to replace another owner's tag; the store checks
    // again under its lock when it installs.
    if !opts.force {
        check_owner(store, &opts.tag, &origin)?;
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
    let up_to_date = |store: &Store| {
        matches!(store.get(&opts.tag), Ok(s) if s.manifest == r.manifest)
            && matches!(store.origin(&opts.tag), Ok(Some(o)) if o.owner == origin.owner && o.digest == origin.digest)
    };
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
        check_engine(opts.check, staging.dir(), &r.manifest, reference)?;
        let tag = opts.tag.clone();
        tokio::task::block_in_place(|| {
            staging.commit_pulled(&tag, &r.manifest, &origin, overwrite)
        })?;
        outcome.cached_bytes = r.image.stored_size();
        return Ok(outcome);
    }

    let partial = cache.partial(&r.digest)?;
    let limits = crate::fetch::Limits {
        jobs: opts.jobs,
        attempts: opts.attempts,
    };
    let fetched = crate::fetch::fetch(hub, &r.image, &partial, &limits, progress).await?;
    outcome.downloaded_bytes = fetched.downloaded;
    outcome.cached_bytes = fetched.resumed;
    tracing::debug!("fetched and verified in {:?}", t0.elapsed());

    if let Err(e) = check_engine(opts.check, partial.path(), &r.manifest, reference) {
        partial.remove();
        return Err(e);
    }
    // Move the verified files into a staging directory (same filesystem) and install.
    let staging = store.stage()?;
    for f in &r.image.files {
        partial.move_out(&f.name, &staging.dir().join(&f.name))?;
    }
    let tag = opts.tag.clone();
    tokio::task::block_in_place(|| staging.commit_pulled(&tag, &r.manifest, &origin, overwrite))?;
    partial.remove();
    tracing::debug!("installed in {:?}", t0.elapsed());
    drop(lock);
    Ok(outcome)
}

/// A pull may replace a local tag only when that tag was pulled from the same owner.
fn check_owner(store: &Store, tag: &Tag, new: &Origin) -> Result<()> {
    if store.get(tag).is_err() {
        return Ok(());
    }
    let existing = match store.origin(tag) {
        Ok(Some(o)) if o.owner == new.owner => return Ok(()),
        Ok(Some(o)) => o.describe(),
        Ok(None) => "this host (it was not pulled)".to_string(),
        Err(e) => format!("an unknown place ({e})"),
    };
    Err(forkd_store::StoreError::OtherOwner {
        tag: tag.clone(),
        existing,
        owner: new.owner.clone(),
    }
    .into())
}

/// The snapshot's `engine.json` (untrusted input) must describe the machine its manifest
/// names; checked in the staging directory, before the image is installed.
fn check_engine(
    check: forkd_store::pack::ImageCheck,
    dir: &std::path::Path,
    m: &forkd_store::Manifest,
    reference: &Reference,
) -> Result<()> {
    check(dir, m).map_err(|reason| HubError::BadEngine {
        reference: reference.to_string(),
        reason,
    })?;
    Ok(())
}
