//! Reading and writing the hub's small JSON documents (forkd-hub.json, tags, catalogue).

use crate::error::{HubError, Result};
use crate::layout::{CATALOG_KEY, Catalog, HUB_INFO_KEY, HubInfo, LAYOUT};
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

pub fn parse_json<T: DeserializeOwned>(hub: &dyn Transport, what: &str, data: &[u8]) -> Result<T> {
    serde_json::from_slice(data).map_err(|e| HubError::BadDocument {
        what: what.into(),
        hub: hub.describe(),
        msg: format!("not valid JSON for this document: {e}"),
    })
}

/// Check forkd-hub.json. With `create`, an empty hub is initialised (push).
pub async fn check_layout(hub: &dyn Transport, create: bool) -> Result<()> {
    match hub.get(HUB_INFO_KEY).await {
        Ok(data) => {
            let info: HubInfo = parse_json(hub, HUB_INFO_KEY, &data)?;
            if info.layout > LAYOUT {
                return Err(HubError::LayoutTooNew {
                    hub: hub.describe(),
                    found: info.layout,
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

/// The catalogue; a hub without one has an empty catalogue.
pub async fn fetch_catalog(hub: &dyn Transport) -> Result<Catalog> {
    match hub.get(CATALOG_KEY).await {
        Ok(data) => {
            let c: Catalog = parse_json(hub, CATALOG_KEY, &data)?;
            if c.layout > LAYOUT {
                return Err(HubError::LayoutTooNew {
                    hub: hub.describe(),
                    found: c.layout,
                });
            }
            Ok(c)
        }
        Err(TransportError::NotFound { .. }) => Ok(Catalog {
            layout: LAYOUT,
            images: vec![],
        }),
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
