//! Reading and writing the hub's small JSON documents (forkd-hub.json, tags, catalogue).

use crate::error::{HubError, Result};
use crate::layout::{
    CATALOG_KEY, Catalog, HUB_INFO_KEY, HubInfo, LAYOUT, MAX_CATALOG_BYTES, MAX_HUB_INFO_BYTES,
};
use crate::transport::{Transport, TransportError};
use bytes::Bytes;
use serde::de::DeserializeOwned;

pub fn transport_err(
    hub: &dyn Transport,
    what: impl Into<String>,
) -> impl FnOnce(TransportError) -> HubError {
    let what = what.into();
    let hub = hub.describe();
    move |source| HubError::Transport { what, hub, source }
}

/// Attempts for the small documents (forkd-hub.json, tags, manifests, catalogue).
pub const DOCUMENT_ATTEMPTS: u32 = 4;

/// `hub.get(key, max)`, retried with backoff on transient errors (dropped or cut connections,
/// timeouts, 5xx, 429): a link that was cut a moment ago must not fail the next request for
/// good. Each attempt opens what the transport needs afresh; a body is never resumed.
pub async fn get_retry(
    hub: &dyn Transport,
    key: &str,
    max: u64,
    attempts: u32,
    progress: &dyn crate::progress::Progress,
) -> Result<Bytes, TransportError> {
    retry(key, attempts, progress, || hub.get(key, max)).await
}

/// [`get_retry`] for a byte range of a blob.
pub async fn get_range_retry(
    hub: &dyn Transport,
    key: &str,
    range: std::ops::Range<u64>,
    attempts: u32,
    progress: &dyn crate::progress::Progress,
) -> Result<Bytes, TransportError> {
    retry(key, attempts, progress, || {
        hub.get_range(key, range.clone())
    })
    .await
}

/// Run `get` until it succeeds, fails for good, or `attempts` transient failures, waiting
/// 250 ms, 500 ms, ... (at most 5 s) between them.
async fn retry<F: std::future::Future<Output = Result<Bytes, TransportError>>>(
    key: &str,
    attempts: u32,
    progress: &dyn crate::progress::Progress,
    get: impl Fn() -> F,
) -> Result<Bytes, TransportError> {
    let mut delay = std::time::Duration::from_millis(250);
    let mut n = 1;
    loop {
        match get().await {
            Err(e) if e.is_transient() && n < attempts => {
                progress.message(&format!("retrying {key} in {delay:?} ({e})"));
                tracing::debug!("attempt {n} for {key} failed: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
                n += 1;
            }
            r => return r,
        }
    }
}

pub fn parse_json<T: DeserializeOwned>(hub: &dyn Transport, what: &str, data: &[u8]) -> Result<T> {
    serde_json::from_slice(data).map_err(|e| HubError::BadDocument {
        what: what.into(),
        hub: hub.describe(),
        msg: format!("not valid JSON for this document: {e}"),
    })
}

/// Check forkd-hub.json. With `create`, an empty hub is initialised (push).
pub async fn check_layout(hub: &dyn Transport, create: bool) -> Result<()> {
    match get_retry(
        hub,
        HUB_INFO_KEY,
        MAX_HUB_INFO_BYTES,
        DOCUMENT_ATTEMPTS,
        &crate::Silent,
    )
    .await
    {
        Ok(data) => {
            let info: HubInfo = parse_json(hub, HUB_INFO_KEY, &data)?;
            if info.layout > LAYOUT {
                return Err(HubError::LayoutTooNew {
                    hub: hub.describe(),
                    found: info.layout,
                    knows: LAYOUT,
                });
            }
            Ok(())
        }
        Err(TransportError::NotFound { .. }) if create => {
            let body = serde_json::to_vec(&HubInfo { layout: LAYOUT }).expect("serialisable");
            hub.put(HUB_INFO_KEY, Bytes::from(body))
                .await
                .map_err(transport_err(hub, "cannot initialise the hub"))
        }
        Err(TransportError::NotFound { .. }) => Err(HubError::NotAHub {
            hub: hub.describe(),
        }),
        Err(e) => Err(transport_err(hub, "cannot read forkd-hub.json")(e)),
    }
}

/// The catalogue; a hub without one has an empty catalogue. Bad entries are left out (and
/// logged); [`fetch_catalog_checked`] returns them to the caller.
pub async fn fetch_catalog(hub: &dyn Transport) -> Result<Catalog> {
    let (catalog, skipped) = fetch_catalog_checked(hub).await?;
    for why in skipped {
        tracing::warn!("{CATALOG_KEY} on {}: skipped {why}", hub.describe());
    }
    Ok(catalog)
}

/// The catalogue, and a description of each entry that was skipped because it is malformed.
/// A catalogue that is not a catalogue at all is an error.
pub async fn fetch_catalog_checked(hub: &dyn Transport) -> Result<(Catalog, Vec<String>)> {
    match get_retry(
        hub,
        CATALOG_KEY,
        MAX_CATALOG_BYTES,
        DOCUMENT_ATTEMPTS,
        &crate::Silent,
    )
    .await
    {
        Ok(data) => {
            let (c, skipped) =
                Catalog::parse_checked(&data).map_err(|msg| HubError::BadDocument {
                    what: CATALOG_KEY.into(),
                    hub: hub.describe(),
                    msg,
                })?;
            if c.layout > LAYOUT {
                return Err(HubError::LayoutTooNew {
                    hub: hub.describe(),
                    found: c.layout,
                    knows: LAYOUT,
                });
            }
            Ok((c, skipped))
        }
        Err(TransportError::NotFound { .. }) => Ok((
            Catalog {
                layout: LAYOUT,
                images: vec![],
            },
            vec![],
        )),
        Err(e) => Err(transport_err(hub, "cannot read the catalogue")(e)),
    }
}

/// Images whose name or description contains `text` (case-insensitive).
pub fn search(catalog: &Catalog, text: Option<&str>) -> Vec<crate::layout::CatalogImage> {
    let needle = text.map(str::to_lowercase);
    catalog
        .images
        .iter()
        .filter(|i| match &needle {
            None => true,
            Some(n) => {
                i.name.to_lowercase().contains(n) || i.description.to_lowercase().contains(n)
            }
        })
        .cloned()
        .collect()
}
