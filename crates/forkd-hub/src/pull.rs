//! `forkd pull`: resolve and verify, check compatibility, then one pipeline that downloads N
//! chunks at once, verifies each blob against the image manifest, decompresses it and writes it
//! at its offset into sparse files (`fetch`). The tag appears only after every chunk was
//! verified (and, for a resumed pull, every file's sha256 matched).

use crate::cache::Cache;
use crate::error::{ChainProblem, HubError, Result};
use crate::progress::Progress;
use crate::push::MAX_CHAIN;
use crate::reference::Reference;
use crate::resolve::Resolved;
use crate::sign::TrustedKey;
use crate::transport::Transport;
use forkd_store::{Origin, Overwrite, Store, StoreError, Tag};
use std::collections::HashSet;
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
    /// For a branch: the parents this pull installed, the root first.
    pub parents: Vec<PulledParent>,
}

/// A parent installed by the pull of a branch.
#[derive(Debug, Clone)]
pub struct PulledParent {
    /// The digest-pinned reference it was pulled by (`OWNER/NAME@sha256:HEX`).
    pub reference: String,
    /// Its image manifest digest on the hub.
    pub digest: String,
    /// Its content digest ([`forkd_store::Manifest::digest`]), the branch's `parent_digest`.
    pub content_digest: String,
    pub tag: Tag,
    pub downloaded_bytes: u64,
    pub cached_bytes: u64,
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
    pull_maybe_lazy(hub, store, reference, opts, progress, None).await
}

/// What a lazy pull hands over once the image manifest is verified and its files can be read
/// ([`pull_lazy`]).
pub struct LazyReady {
    /// The files, readable while they download.
    pub image: Arc<crate::lazy::LazyImage>,
    /// The image's manifest.toml, parsed and verbatim.
    pub manifest: forkd_store::Manifest,
    pub manifest_toml: String,
    /// The image manifest digest.
    pub digest: String,
}

/// How a lazy pull serves reads.
pub struct LazyOptions {
    /// Told as soon as the files can be read. Dropped without a word when the pull needs no
    /// download (the tag is up to date, another local tag holds the same content) or cannot
    /// be lazy (a branch: its parents are pulled whole first): the caller then waits for the
    /// pull and uses the installed image.
    pub ready: tokio::sync::oneshot::Sender<LazyReady>,
    /// How long a read waits for its chunks ([`crate::lazy::DEFAULT_READ_TIMEOUT`]).
    pub read_timeout: std::time::Duration,
}

/// A pull whose files can be read before it ends: everything [`pull`] checks is checked before
/// `lazy.ready` is told, and the pull then ends exactly as [`pull`] does, with the image
/// installed. A read waits only for the chunks it needs, which are fetched first.
pub async fn pull_lazy(
    hub: Arc<dyn Transport>,
    store: &Store,
    reference: &Reference,
    opts: &PullOptions,
    progress: &dyn Progress,
    lazy: LazyOptions,
) -> Result<PullOutcome> {
    pull_maybe_lazy(hub, store, reference, opts, progress, Some(lazy)).await
}

async fn pull_maybe_lazy(
    hub: Arc<dyn Transport>,
    store: &Store,
    reference: &Reference,
    opts: &PullOptions,
    progress: &dyn Progress,
    lazy: Option<LazyOptions>,
) -> Result<PullOutcome> {
    let work = pull_unbounded(hub, store, reference, opts, progress, lazy);
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
    lazy: Option<LazyOptions>,
) -> Result<PullOutcome> {
    if !opts.skip_compat_check {
        // Ask QEMU while the hub answers: `compat` below needs its lists.
        crate::compat::prefetch();
    }
    let r = crate::resolve::resolve(hub.as_ref(), reference, &opts.trusted, opts.insecure).await?;
    warn_unverified(&r, reference, progress);
    let origin = origin_of(hub.as_ref(), reference, &r, None);
    // Refuse early (before any download) to replace another owner's tag; the store checks
    // again under its lock when it installs.
    if !opts.force {
        check_owner(store, &opts.tag, &origin)?;
    }
    if !opts.skip_compat_check {
        compat(&r, reference)?;
    }
    // A branch: every parent it needs, resolved and verified before anything is installed.
    let chain = resolve_chain(hub.as_ref(), store, reference, &r, opts, progress).await?;
    if let Some(d) = &r.manifest.parent_digest
        && matches!(store.get(&opts.tag), Ok(s) if &s.manifest.digest() == d)
    {
        return Err(HubError::Chain {
            reference: reference.to_string(),
            problem: ChainProblem::ReplacesParent {
                tag: opts.tag.to_string(),
            },
        });
    }
    if !opts.skip_compat_check {
        for (pref, pr, _) in &chain {
            compat(pr, pref)?;
        }
    }
    let mut parents = Vec::new();
    for (pref, pr, version) in chain.iter().rev() {
        let content = pr.manifest.digest();
        if store.find_by_digest(&content)?.is_some() {
            continue; // installed meanwhile
        }
        let tag = parent_tag(store, pref, &content, &opts.tag)?;
        progress.message(&format!("pulling the parent {pref} as `{tag}`"));
        let porigin = origin_of(hub.as_ref(), pref, pr, Some(version));
        let out = install(
            hub.clone(),
            store,
            pref,
            pr,
            &tag,
            &porigin,
            Overwrite::No,
            opts,
            progress,
            None,
        )
        .await?;
        let installed = store.get(&tag)?.manifest.digest();
        if installed != content {
            return Err(HubError::Chain {
                reference: reference.to_string(),
                problem: ChainProblem::DigestMismatch {
                    parent: pref.to_string(),
                    expected: content,
                    actual: installed,
                },
            });
        }
        parents.push(PulledParent {
            reference: pref.to_string(),
            digest: pr.digest.clone(),
            content_digest: content,
            tag,
            downloaded_bytes: out.downloaded_bytes,
            cached_bytes: out.cached_bytes,
            unverified: pr.unverified.clone(),
        });
    }
    if let Some(d) = &r.manifest.parent_digest
        && store.find_by_digest(d)?.is_none()
    {
        return Err(HubError::Chain {
            reference: reference.to_string(),
            problem: ChainProblem::NoParent {
                parent_tag: r.manifest.parent_tag.clone().unwrap_or_default(),
                digest: d.clone(),
            },
        });
    }
    let overwrite = if opts.force {
        Overwrite::Yes
    } else {
        Overwrite::No
    };
    // A branch's parents were pulled whole above; the branch itself can be lazy, but the
    // engine forks a branch only from installed layers, so it is pulled whole too.
    let lazy = lazy.filter(|_| r.manifest.parent_digest.is_none());
    let mut outcome = install(
        hub, store, reference, &r, &opts.tag, &origin, overwrite, opts, progress, lazy,
    )
    .await?;
    outcome.parents = parents;
    Ok(outcome)
}

fn warn_unverified(r: &Resolved, reference: &Reference, progress: &dyn Progress) {
    if let Some(why) = &r.unverified {
        progress.message(&format!(
            "warning: accepting {reference} without a valid signature (--insecure): {why}"
        ));
    }
    for w in r.verified.iter().flat_map(|v| &v.warnings) {
        progress.message(&format!("warning: {w}"));
    }
}

fn compat(r: &Resolved, reference: &Reference) -> Result<()> {
    crate::compat::check(&r.manifest).map_err(|reason| HubError::Incompatible {
        reference: reference.to_string(),
        reason,
    })
}

/// Where an image pulled as `reference` came from.
fn origin_of(
    hub: &dyn Transport,
    reference: &Reference,
    r: &Resolved,
    version: Option<&str>,
) -> Origin {
    Origin {
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
                crate::reference::Target::Digest(_) => version.map(str::to_string),
            }),
        digest: r.digest.clone(),
        verified: r.verified.is_some(),
        key_id: r.verified.as_ref().map(|v| v.key_id.clone()),
        signed_at: r.verified.as_ref().and_then(|v| v.subject.time.clone()),
        pulled_at: jiff::Timestamp::now(),
    }
}

/// The parents `r` needs that the store lacks, nearest first: each followed by its digest pin
/// (`parent` of the image manifest), resolved and signature-checked like any image, its
/// content digest checked against the `parent_digest` of the image that names it. The chain
/// stops at the first parent the store already holds. Cycles and chains longer than
/// [`MAX_CHAIN`] are refused.
async fn resolve_chain(
    hub: &dyn Transport,
    store: &Store,
    reference: &Reference,
    r: &Resolved,
    opts: &PullOptions,
    progress: &dyn Progress,
) -> Result<Vec<(Reference, Resolved, String)>> {
    let chain_err = |problem| HubError::Chain {
        reference: reference.to_string(),
        problem,
    };
    let mut out: Vec<(Reference, Resolved, String)> = Vec::new();
    let mut seen_hub = HashSet::from([r.digest.clone()]);
    let mut seen_content = HashSet::from([r.manifest.digest()]);
    loop {
        let (manifest, image) = match out.last() {
            Some((_, p, _)) => (&p.manifest, &p.image),
            None => (&r.manifest, &r.image),
        };
        let Some(want) = manifest.parent_digest.clone() else {
            break;
        };
        let parent_tag = manifest.parent_tag.clone().unwrap_or_default();
        if seen_content.contains(&want) {
            return Err(chain_err(ChainProblem::Cycle { at: want }));
        }
        if store.find_by_digest(&want)?.is_some() {
            break;
        }
        if out.len() >= MAX_CHAIN {
            return Err(chain_err(ChainProblem::TooDeep { max: MAX_CHAIN }));
        }
        let Some(pref) = image.parent.clone() else {
            return Err(chain_err(ChainProblem::NoParent {
                parent_tag,
                digest: want,
            }));
        };
        let bad = |msg: String| HubError::BadDocument {
            what: format!("the image manifest of {reference}'s chain"),
            hub: hub.describe(),
            msg,
        };
        let parent_ref = pref.reference().map_err(bad)?;
        if !seen_hub.insert(pref.digest.clone()) {
            return Err(chain_err(ChainProblem::Cycle { at: pref.digest }));
        }
        let pr = match crate::resolve::resolve(hub, &parent_ref, &opts.trusted, opts.insecure).await
        {
            Err(HubError::NotFound { .. }) => {
                return Err(chain_err(ChainProblem::ParentNotOnHub {
                    parent: parent_ref.to_string(),
                    parent_tag,
                    digest: want,
                }));
            }
            r => r?,
        };
        warn_unverified(&pr, &parent_ref, progress);
        let actual = pr.manifest.digest();
        if actual != want {
            return Err(chain_err(ChainProblem::DigestMismatch {
                parent: parent_ref.to_string(),
                expected: want,
                actual,
            }));
        }
        seen_content.insert(actual);
        out.push((parent_ref, pr, pref.version));
    }
    Ok(out)
}

/// The local tag for a parent pulled as `pref`: its NAME, or `NAME-<12 hex of its content
/// digest>` when NAME holds another image (a parent never replaces a local tag).
fn parent_tag(store: &Store, pref: &Reference, content: &str, avoid: &Tag) -> Result<Tag> {
    let free = |t: &Tag| t != avoid && matches!(store.get(t), Err(StoreError::NotFound(_)));
    let base = Tag::parse(&pref.name).map_err(|e| HubError::Invalid(e.to_string()))?;
    if free(&base) {
        return Ok(base);
    }
    let hex12 = &content["sha256:".len()..][..12];
    let keep = pref.name.len().min(128 - 13);
    let alt = Tag::parse(&format!("{}-{hex12}", &pref.name[..keep]))
        .map_err(|e| HubError::Invalid(e.to_string()))?;
    if free(&alt) {
        return Ok(alt);
    }
    Err(HubError::Invalid(format!(
        "cannot install the parent {pref}: the local tags `{base}` and `{alt}` hold other images \
         (a parent never replaces a local tag); remove or rename one and pull again"
    )))
}

/// Install the resolved image `r` (pulled as `reference`) as `tag`: nothing to do when the tag
/// already holds it, a copy when another local tag has the same content, else a download.
#[allow(clippy::too_many_arguments)]
async fn install(
    hub: Arc<dyn Transport>,
    store: &Store,
    reference: &Reference,
    r: &Resolved,
    tag: &Tag,
    origin: &Origin,
    overwrite: Overwrite,
    opts: &PullOptions,
    progress: &dyn Progress,
    lazy: Option<LazyOptions>,
) -> Result<PullOutcome> {
    let t0 = std::time::Instant::now();
    let mut outcome = PullOutcome {
        digest: r.digest.clone(),
        tag: tag.clone(),
        up_to_date: false,
        downloaded_bytes: 0,
        cached_bytes: 0,
        apparent_size: r.image.apparent_size(),
        unverified: r.unverified.clone(),
        parents: Vec::new(),
    };
    let up_to_date = |store: &Store| {
        matches!(store.get(tag), Ok(s) if s.manifest == r.manifest)
            && matches!(store.origin(tag), Ok(Some(o)) if o.owner == origin.owner && o.digest == origin.digest)
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
        .find(|i| i.manifest == r.manifest && i.tag != *tag)
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
        keep_working_set(&r.image, staging.dir());
        tokio::task::block_in_place(|| staging.commit_pulled(tag, &r.manifest, origin, overwrite))?;
        outcome.cached_bytes = r.image.stored_size();
        return Ok(outcome);
    }

    let partial = cache.partial(&r.digest)?;
    // The local chunk store: chunks other images brought are taken from there. Without it
    // (it cannot be opened), everything is downloaded.
    let chunks = match crate::chunks::ChunkStore::open(store.home()) {
        _ if std::env::var_os("FORKD_CHUNK_STORE").is_some_and(|v| v == "0") => None,
        Ok(s) => Some(Arc::new(s)),
        Err(e) => {
            tracing::warn!("not using the local chunk store: {e}");
            None
        }
    };
    let limits = crate::fetch::Limits {
        jobs: opts.jobs,
        attempts: opts.attempts,
    };
    let fetched = match lazy {
        None => {
            crate::fetch::fetch(hub, &r.image, &partial, chunks.as_ref(), &limits, progress).await?
        }
        Some(lazy) => {
            let image = Arc::new(crate::lazy::LazyImage::open(
                &r.image,
                &partial,
                &r.image.working_set(),
                lazy.read_timeout,
                chunks.clone(),
            )?);
            let _ = lazy.ready.send(LazyReady {
                image: image.clone(),
                manifest: r.manifest.clone(),
                manifest_toml: r.image.manifest_toml.clone(),
                digest: r.digest.clone(),
            });
            // Readers must not wait out their timeout on a pull that is gone: dropped by the
            // deadline, cancelled, or failed, it fails their reads at once (after a success
            // every chunk is here, and this changes nothing).
            struct AbandonOnDrop(Arc<crate::lazy::LazyImage>);
            impl Drop for AbandonOnDrop {
                fn drop(&mut self) {
                    self.0.abandon("the pull ended");
                }
            }
            let _readers = AbandonOnDrop(image.clone());
            match image
                .run(hub, limits.jobs, limits.attempts, &partial, progress)
                .await
            {
                Ok(fetched) => fetched,
                Err(e) => {
                    image.abandon(&e.to_string());
                    return Err(e);
                }
            }
        }
    };
    outcome.downloaded_bytes = fetched.downloaded;
    outcome.cached_bytes = fetched.resumed + fetched.cached;
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
    keep_working_set(&r.image, staging.dir());
    // Remembered before the image appears, so that `forkd gc` never sees an installed image
    // whose chunks it does not know.
    if let Some(c) = &chunks
        && let Err(e) = c.remember(&r.digest, &r.body)
    {
        tracing::warn!("the chunk store will not keep this image's chunks: {e}");
    }
    tokio::task::block_in_place(|| staging.commit_pulled(tag, &r.manifest, origin, overwrite))?;
    partial.remove();
    tracing::debug!("installed in {:?}", t0.elapsed());
    drop(lock);
    Ok(outcome)
}

/// The image's working set, kept beside it (`workingset.json`) so that pushing it again
/// publishes it. A hint: failing to write it loses nothing else.
fn keep_working_set(image: &crate::layout::ImageManifest, dir: &std::path::Path) {
    if let Some(ws) = image.working_set_touches()
        && let Err(e) = ws.save(dir)
    {
        tracing::warn!("cannot keep the image's working set: {e}");
    }
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
