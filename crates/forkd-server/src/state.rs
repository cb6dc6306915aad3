//! What every handler shares, and the bridge from async handlers to the synchronous library.

use crate::api::{ApiError, ApiResult};
use crate::audit::Audit;
use crate::metrics::Metrics;
use forkd_sandbox::{Manager, SandboxError};
use std::sync::Arc;
use std::time::Instant;

pub struct AppState {
    pub mgr: Manager,
    pub metrics: Metrics,
    pub audit: Audit,
    /// Required as `Authorization: Bearer …` when set (TCP).
    pub token: Option<String>,
    pub started: Instant,
    pub hub: crate::HubConfig,
}

/// Run a library call on a blocking thread (the library waits on VMs and sockets).
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SandboxError> + Send + 'static,
) -> ApiResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::internal(format!("worker thread failed: {e}"))),
    }
}

/// The local tag for an `image` field: a tag as it is, or a hub reference `OWNER/NAME[:VERSION]`
/// whose image is pulled first when the store lacks it.
pub async fn resolve_image(
    st: &Arc<AppState>,
    image: &str,
    progress: Option<Arc<dyn forkd_hub::progress::Progress>>,
) -> ApiResult<String> {
    if !image.contains('/') {
        return Ok(image.to_string());
    }
    let mgr = st.mgr.clone();
    let hub = st.hub.clone();
    let image = image.to_string();
    blocking(move || forkd_sandbox::images::ensure(&mgr, &image, &hub.as_pull_config(), progress))
        .await
}
