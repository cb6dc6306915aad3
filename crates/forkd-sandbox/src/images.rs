//! Images named by hub reference: `OWNER/NAME[:VERSION]` becomes the local tag `NAME`, pulled
//! (verified and signed like `forkd pull`) when the store lacks it.

use crate::Manager;
use crate::error::{Result, SandboxError};
use forkd_hub::progress::Progress;
use forkd_hub::reference::Reference;
use forkd_store::{Store, Tag};
use std::sync::Arc;

/// Where to pull from and whom to trust.
#[derive(Debug, Clone, Default)]
pub struct PullConfig {
    /// Hub URL; default: the embedded hub in `$FORKD_HOME/hub`.
    pub hub: Option<String>,
    /// Extra trusted public keys (minisign key text).
    pub trust: Vec<String>,
    pub insecure: bool,
    /// Concurrent downloads (default 8).
    pub jobs: Option<usize>,
    /// Attempts per blob on transient errors (default 4).
    pub attempts: Option<u32>,
    /// How long a lazy read waits for its chunks (default
    /// [`forkd_hub::lazy::DEFAULT_READ_TIMEOUT`]).
    pub read_timeout: Option<std::time::Duration>,
    /// [`ensure`] pulls the whole image even where it could fork while downloading.
    pub no_lazy: bool,
}

/// The local tag for `image`: a plain tag as it is; a reference's `NAME`, pulled first if the
/// store does not have it. A manager that owns its children (a daemon) pulls lazily: this
/// returns once the image can be read, and [`Manager::image`] serves it from the lazy mount
/// until it is installed.
pub fn ensure(
    mgr: &Manager,
    image: &str,
    cfg: &PullConfig,
    progress: Option<Arc<dyn Progress>>,
) -> Result<String> {
    if !image.contains('/') {
        return Ok(image.to_string());
    }
    let (reference, tag) = parse(image, "image")?;
    let have =
        |mgr: &Manager| mgr.store().get(&tag).is_ok() || mgr.lazy_image(tag.as_str()).is_some();
    if have(mgr) {
        return Ok(tag.as_str().to_string());
    }
    if !mgr.owns_children() {
        pull(
            mgr.store(),
            &reference,
            tag.clone(),
            cfg,
            progress.as_deref(),
        )?;
        return Ok(tag.as_str().to_string());
    }
    let one = mgr.lazy_start_lock(tag.as_str());
    let _one = crate::sandbox::lock(&one);
    if have(mgr) {
        return Ok(tag.as_str().to_string());
    }
    let progress = progress.unwrap_or_else(|| Arc::new(forkd_hub::progress::Silent));
    let pull = start_lazy(mgr.store(), &reference, tag.clone(), cfg, progress)?;
    if pull.is_lazy() {
        mgr.serve_lazy(pull);
    }
    Ok(tag.as_str().to_string())
}

/// A hub reference and the local tag it installs as (its `NAME`); `field` names the request
/// field in the error.
pub fn parse(image: &str, field: &'static str) -> Result<(Reference, Tag)> {
    let bad = |e: &dyn std::fmt::Display| SandboxError::BadRequest {
        field,
        reason: e.to_string(),
    };
    let reference = Reference::parse(image).map_err(|e| bad(&e))?;
    let tag = Tag::parse(&reference.name).map_err(|e| bad(&e))?;
    Ok((reference, tag))
}

/// The hub and the options of a pull of `reference` as `tag`, as `forkd pull` would make them.
fn prepare(
    store: &Store,
    reference: &Reference,
    tag: Tag,
    cfg: &PullConfig,
) -> Result<(Arc<dyn forkd_hub::Transport>, forkd_hub::pull::PullOptions)> {
    let home = store.home();
    let err = |e: forkd_hub::HubError| pull_err(reference)(e);
    let mut trusted = forkd_hub::sign::trusted_keys(home).map_err(|e| err(e.into()))?;
    for k in &cfg.trust {
        // A key given with the request is trusted for the owner being pulled only.
        trusted.push(forkd_hub::sign::TrustedKey {
            key: forkd_hub::sign::parse_public_key(k).map_err(|e| err(e.into()))?,
            scope: forkd_hub::sign::Scope::Owner(reference.owner.clone()),
        });
    }
    let transport = forkd_hub::transport::open_or_default(
        home,
        cfg.hub.as_deref(),
        &forkd_hub::transport::HubOptions { token: None },
    )
    .map_err(|e| err(e.into()))?;
    let opts = forkd_hub::pull::PullOptions {
        tag,
        jobs: cfg.jobs.unwrap_or(8),
        trusted,
        insecure: cfg.insecure,
        force: false,
        skip_compat_check: false,
        attempts: cfg.attempts.unwrap_or(4),
        deadline: Some(forkd_hub::pull::DEFAULT_DEADLINE),
        check: forkd_engine::spec::check_staged,
    };
    Ok((transport, opts))
}

/// A runtime for the hub's async pipeline. It runs on a thread of its own: the caller may be a
/// thread of another runtime (a daemon's blocking pool), where starting a runtime is not
/// allowed.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| SandboxError::Io {
            what: "cannot start a runtime for",
            path: "pull".into(),
            source,
        })
}

fn thread_err(source: std::io::Error) -> SandboxError {
    SandboxError::Io {
        what: "cannot start a thread for",
        path: "pull".into(),
        source,
    }
}

fn panicked(reference: &Reference) -> SandboxError {
    SandboxError::Io {
        what: "the pull thread failed for",
        path: reference.to_string().into(),
        source: std::io::Error::other("panicked"),
    }
}

/// Pull `reference` into the store as `tag`.
pub fn pull(
    store: &Store,
    reference: &Reference,
    tag: Tag,
    cfg: &PullConfig,
    progress: Option<&dyn Progress>,
) -> Result<forkd_hub::pull::PullOutcome> {
    let (transport, opts) = prepare(store, reference, tag, cfg)?;
    let silent = forkd_hub::progress::Silent;
    let progress = progress.unwrap_or(&silent);
    std::thread::scope(|scope| {
        let job = std::thread::Builder::new()
            .name("pull".into())
            .spawn_scoped(scope, || {
                runtime()?
                    .block_on(forkd_hub::pull::pull(
                        transport, store, reference, &opts, progress,
                    ))
                    .map_err(pull_err(reference))
            })
            .map_err(thread_err)?;
        job.join().unwrap_or_else(|_| Err(panicked(reference)))
    })
}

/// An image being pulled while its children already run from it ([`start_lazy`]).
pub struct LazyPull {
    reference: Reference,
    snapshot: forkd_store::Snapshot,
    /// Shared with the sandboxes being forked from it ([`LazyPull::pin`]): the mount is
    /// detached when the last holder lets go, never under a fork that is opening its files.
    mount: Option<Arc<forkd_lazyfs::Mount>>,
    image: Option<Arc<forkd_hub::lazy::LazyImage>>,
    job: Option<std::thread::JoinHandle<Result<forkd_hub::pull::PullOutcome>>>,
    /// The outcome, when the pull already ended before anything was mounted.
    done: Option<forkd_hub::pull::PullOutcome>,
}

impl LazyPull {
    /// A pull that already ended with the image installed: nothing is served lazily.
    fn installed(
        store: &Store,
        reference: &Reference,
        out: forkd_hub::pull::PullOutcome,
    ) -> Result<LazyPull> {
        Ok(LazyPull {
            reference: reference.clone(),
            snapshot: store.get(&out.tag)?,
            mount: None,
            image: None,
            job: None,
            done: Some(out),
        })
    }

    /// The image to fork: its files in the lazy mount, or in the store when the pull needed no
    /// download (or could not be lazy, and already ended).
    pub fn snapshot(&self) -> &forkd_store::Snapshot {
        &self.snapshot
    }

    /// Whether children read the image through the lazy mount.
    pub fn is_lazy(&self) -> bool {
        self.mount.is_some()
    }

    /// A hold on the lazy mount: while it lives the mount stays attached, so a fork that
    /// resolved the image to the mount can open its files even if the pull ends meanwhile.
    pub fn pin(&self) -> Option<Arc<forkd_lazyfs::Mount>> {
        self.mount.clone()
    }

    /// Bytes downloaded so far, and the image's whole download size.
    pub fn downloaded(&self) -> (u64, u64) {
        match &self.image {
            Some(i) => (i.fetched(), i.image().stored_size()),
            None => (0, 0),
        }
    }

    /// The download, to measure it while it runs (`None` when nothing is downloaded lazily).
    pub fn meter(&self) -> Option<Arc<forkd_hub::lazy::LazyImage>> {
        self.image.clone()
    }

    /// Reads of the mount that failed, and the first reason (it names the chunk).
    pub fn read_errors(&self) -> Option<forkd_lazyfs::Errors> {
        self.mount
            .as_ref()
            .map(|m| m.errors())
            .filter(|e| e.count > 0)
    }

    /// Stop the download early: reads of chunks that are not here fail at once, and
    /// [`LazyPull::finish`] returns soon (what was verified is kept for the next pull).
    pub fn abandon(&self, why: &str) {
        if let Some(i) = &self.image {
            i.abandon(why);
        }
    }

    /// Wait for the pull to end (the image is then installed, as a pull leaves it), and
    /// unmount.
    pub fn finish(mut self) -> Result<forkd_hub::pull::PullOutcome> {
        let out = match (self.job.take(), self.done.take()) {
            (Some(job), _) => job
                .join()
                .unwrap_or_else(|_| Err(panicked(&self.reference))),
            (None, Some(done)) => Ok(done),
            (None, None) => Err(panicked(&self.reference)),
        };
        drop(self.mount.take());
        out
    }
}

impl Drop for LazyPull {
    fn drop(&mut self) {
        // Not finished: the pull goes on only as long as its caller; stop serving reads.
        self.abandon("the fork that pulled it ended");
    }
}

/// Start pulling `reference` as `tag`, and return as soon as its files can be read: the
/// image manifest is verified (signature, trust, compatibility) exactly as for `forkd pull`,
/// then the image is mounted (FUSE) and reads fetch their chunks first while the rest
/// streams. [`LazyPull::finish`] waits for the image to be installed.
///
/// When the pull needs no download, or the image is a branch (its layers must be installed),
/// this waits for the whole pull and returns the installed image.
pub fn start_lazy(
    store: &Store,
    reference: &Reference,
    tag: Tag,
    cfg: &PullConfig,
    progress: Arc<dyn Progress>,
) -> Result<LazyPull> {
    let (transport, opts) = prepare(store, reference, tag.clone(), cfg)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let reporter = progress.clone();
    let lazy = forkd_hub::pull::LazyOptions {
        ready: tx,
        read_timeout: cfg
            .read_timeout
            .unwrap_or(forkd_hub::lazy::DEFAULT_READ_TIMEOUT),
    };
    let job = {
        let store = store.clone();
        let reference = reference.clone();
        std::thread::Builder::new()
            .name("lazy-pull".into())
            .spawn(move || {
                runtime()?
                    .block_on(forkd_hub::pull::pull_lazy(
                        transport,
                        &store,
                        &reference,
                        &opts,
                        progress.as_ref(),
                        lazy,
                    ))
                    .map_err(pull_err(&reference))
            })
            .map_err(thread_err)?
    };
    let Ok(ready) = rx.blocking_recv() else {
        // No lazy read: the pull ended (or failed) without a download to share.
        let out = job.join().unwrap_or_else(|_| Err(panicked(reference)))?;
        return LazyPull::installed(store, reference, out);
    };
    // From here on, a failure drops `pull`, which abandons the download's readers.
    let mut pull = LazyPull {
        reference: reference.clone(),
        snapshot: forkd_store::Snapshot {
            tag,
            dir: Default::default(),
            manifest: ready.manifest,
        },
        mount: None,
        image: Some(ready.image.clone()),
        job: Some(job),
        done: None,
    };
    let hex = ready.digest.trim_start_matches("sha256:");
    let mounted = forkd_lazyfs::mount_in(
        &forkd_lazyfs::mounts_dir(store.home()),
        &hex[..12.min(hex.len())],
        ready.image,
        &ready.manifest_toml,
    );
    let mount = match mounted {
        Ok(m) => m,
        Err(e) => {
            // No FUSE here (not root, no /dev/fuse): pull the whole image, as before lazy
            // forks existed. The lazy download stops at once (what it verified is kept) and
            // the pull resumes it.
            reporter.message(&format!(
                "warning: cannot fork while downloading ({e}); pulling the whole image first"
            ));
            let tag = pull.snapshot.tag.clone();
            pull.abandon("no lazy mount");
            let stopped = pull.job.take().map(|j| j.join());
            let out = match stopped {
                Some(Ok(Ok(out))) => out,
                _ => self::pull(store, reference, tag, cfg, Some(reporter.as_ref()))?,
            };
            return LazyPull::installed(store, reference, out);
        }
    };
    pull.snapshot.dir = mount.dir().to_path_buf();
    pull.mount = Some(Arc::new(mount));
    Ok(pull)
}

fn pull_err(reference: &Reference) -> impl FnOnce(forkd_hub::HubError) -> SandboxError + '_ {
    move |source| SandboxError::Pull {
        reference: reference.to_string(),
        source: Box::new(source),
    }
}
