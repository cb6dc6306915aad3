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
    /// Hub URL; default `$FORKD_HUB`, else the embedded hub in `$FORKD_HOME/hub`.
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
    let reference = Reference::parse(image).map_err(|e| SandboxError::BadRequest {
        field: "image",
        reason: e.to_string(),
    })?;
    let tag = Tag::parse(&reference.name).map_err(|e| SandboxError::BadRequest {
        field: "image",
        reason: e.to_string(),
    })?;
    if mgr.store().get(&tag).is_ok() {
        return Ok(tag.as_str().to_string());
    }
    pull(mgr, &reference, tag.clone(), cfg, progress)?;
    Ok(tag.as_str().to_string())
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
    let mut trusted = Vec::new();
    for k in &cfg.trust {
        trusted.push(
            forkd_hub::sign::parse_public_key(k)
                .map_err(|e| pull_err(reference)(forkd_hub::HubError::from(e)))?,
        );
    }
    trusted.extend(
        forkd_hub::sign::read_trusted_keys(&home.join("trusted-keys"))
            .map_err(|e| pull_err(reference)(forkd_hub::HubError::from(e)))?,
    );
    let own = home.join("keys").join(forkd_hub::sign::PUBLIC_KEY_FILE);
    if own.is_file() {
        trusted.push(
            forkd_hub::sign::parse_public_key(own.to_str().unwrap_or_default())
                .map_err(|e| pull_err(reference)(forkd_hub::HubError::from(e)))?,
        );
    }
    let url = cfg
        .hub
        .clone()
        .or_else(|| std::env::var("FORKD_HUB").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| format!("file://{}", home.join("hub").display()));
    let transport =
        forkd_hub::transport::open(&url, &forkd_hub::transport::HubOptions { token: None })
            .map_err(|e| pull_err(reference)(forkd_hub::HubError::from(e)))?;
    let opts = forkd_hub::pull::PullOptions {
        tag,
        jobs: 8,
        trusted,
        insecure: cfg.insecure,
        skip_compat_check: false,
        attempts: 4,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| SandboxError::Io {
            what: "cannot start a runtime for",
            path: "pull".into(),
            source,
        })?;
    let silent = forkd_hub::progress::Silent;
    let progress = progress.unwrap_or(&silent);
    rt.block_on(forkd_hub::pull::pull(
        transport, store, reference, &opts, progress,
    ))
    .map_err(pull_err(reference))
}

fn pull_err(reference: &Reference) -> impl FnOnce(forkd_hub::HubError) -> SandboxError + '_ {
    move |source| SandboxError::Pull {
        reference: reference.to_string(),
        source: Box::new(source),
    }
}
