//! Images named by hub reference: `OWNER/NAME[:VERSION]` becomes the local tag `NAME`, pulled
//! (verified and signed like `forkd pull`) when the store lacks it.

use crate::Manager;
use crate::error::{Result, SandboxError};
use forkd_hub::progress::Progress;
use forkd_hub::reference::Reference;
use forkd_store::Tag;

/// Where to pull from and whom to trust.
#[derive(Debug, Clone, Default)]
pub struct PullConfig {
    /// Hub URL; default: the embedded hub in `$FORKD_HOME/hub`.
    pub hub: Option<String>,
    /// Extra trusted public keys (minisign key text).
    pub trust: Vec<String>,
    pub insecure: bool,
}

/// The local tag for `image`: a plain tag as it is; a reference's `NAME`, pulled first if the
/// store does not have it.
pub fn ensure(
    mgr: &Manager,
    image: &str,
    cfg: &PullConfig,
    progress: Option<&dyn Progress>,
) -> Result<String> {
    if !image.contains('/') {
        return Ok(image.to_string());
    }
    let (reference, tag) = parse(image, "image")?;
    if mgr.store().get(&tag).is_ok() {
        return Ok(tag.as_str().to_string());
    }
    pull(mgr, &reference, tag.clone(), cfg, progress)?;
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

/// Pull `reference` into the store as `tag`.
pub fn pull(
    mgr: &Manager,
    reference: &Reference,
    tag: Tag,
    cfg: &PullConfig,
    progress: Option<&dyn Progress>,
) -> Result<forkd_hub::pull::PullOutcome> {
    let store = mgr.store();
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
        jobs: 8,
        trusted,
        insecure: cfg.insecure,
        force: false,
        skip_compat_check: false,
        attempts: 4,
        deadline: Some(forkd_hub::pull::DEFAULT_DEADLINE),
        check: forkd_engine::spec::check_staged,
    };
    let silent = forkd_hub::progress::Silent;
    let progress = progress.unwrap_or(&silent);
    // The hub's pipeline is async. Run it on a runtime of its own, on a thread of its own: the
    // caller may be a thread of another runtime (a daemon's blocking pool), where starting a
    // runtime is not allowed.
    std::thread::scope(|scope| {
        let job = std::thread::Builder::new()
            .name("pull".into())
            .spawn_scoped(scope, || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(|source| SandboxError::Io {
                        what: "cannot start a runtime for",
                        path: "pull".into(),
                        source,
                    })?;
                rt.block_on(forkd_hub::pull::pull(
                    transport, store, reference, &opts, progress,
                ))
                .map_err(pull_err(reference))
            })
            .map_err(|source| SandboxError::Io {
                what: "cannot start a thread for",
                path: "pull".into(),
                source,
            })?;
        job.join().unwrap_or_else(|_| {
            Err(SandboxError::Io {
                what: "the pull thread failed for",
                path: reference.to_string().into(),
                source: std::io::Error::other("panicked"),
            })
        })
    })
}

fn pull_err(reference: &Reference) -> impl FnOnce(forkd_hub::HubError) -> SandboxError + '_ {
    move |source| SandboxError::Pull {
        reference: reference.to_string(),
        source: Box::new(source),
    }
}
