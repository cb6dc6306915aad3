//! Resolving a reference to a verified image manifest: tag file → manifest blob (digest
//! checked) → signature → structural validation against the snapshot's manifest.toml.

use crate::error::{HubError, Result};
use crate::layout::{self, ImageManifest, TagFile};
use crate::reference::{Reference, Target, digest_hex};
use crate::remote::{DOCUMENT_ATTEMPTS, check_layout, get_retry, parse_json, transport_err};
use crate::sign::{Expected, TrustedKey, Verified};
use crate::transport::{Transport, TransportError};
use forkd_store::Manifest;

/// Largest raw chunk a client accepts (bounds memory per request).
pub const MAX_CHUNK: u64 = 64 << 20;

pub struct Resolved {
    pub digest: String,
    /// The image manifest blob as read (its sha256 is `digest`).
    pub body: bytes::Bytes,
    pub image: ImageManifest,
    pub manifest: Manifest,
    /// `None` when verified; the reason when accepted unsigned/unverified with --insecure.
    pub unverified: Option<String>,
    /// The signature that verified: key id, signed subject, warnings for the user.
    pub verified: Option<Verified>,
}

pub async fn resolve(
    hub: &dyn Transport,
    reference: &Reference,
    trusted: &[TrustedKey],
    insecure: bool,
) -> Result<Resolved> {
    let key = layout::tag_key(reference);
    let not_found = |hub: &dyn Transport| HubError::NotFound {
        reference: reference.to_string(),
        hub: hub.describe(),
    };
    // forkd-hub.json and the tag file at once (one round trip, not two); the layout is judged
    // first, so a hub of a newer layout says so whatever its tag file holds.
    let (layout_ok, tag_body) = tokio::join!(
        check_layout(hub, false),
        get_retry(
            hub,
            &key,
            layout::MAX_TAG_BYTES,
            DOCUMENT_ATTEMPTS,
            &crate::Silent,
        )
    );
    layout_ok?;
    let tag: TagFile = match tag_body {
        Ok(d) => parse_json(hub, &key, &d)?,
        Err(TransportError::NotFound { .. }) => return Err(not_found(hub)),
        Err(e) => {
            return Err(transport_err(
                hub,
                format!("cannot read the tag file {key}"),
            )(e));
        }
    };
    if tag.layout > layout::TAG_LAYOUT {
        return Err(HubError::LayoutTooNew {
            hub: hub.describe(),
            found: tag.layout,
            knows: layout::TAG_LAYOUT,
        });
    }
    let bad = |msg: String| HubError::BadDocument {
        what: key.clone(),
        hub: hub.describe(),
        msg,
    };
    if digest_hex(&tag.digest).is_none() {
        return Err(bad(format!(
            "digest {:?} is not sha256:<64 hex>",
            tag.digest
        )));
    }
    if tag.image != reference.repository() {
        return Err(bad(format!("it names image {:?}", tag.image)));
    }
    if let Target::Digest(d) = &reference.target
        && d != &tag.digest
    {
        return Err(bad(format!("it points at {}", tag.digest)));
    }
    let mkey = layout::blob_key(&tag.digest);
    let body = get_retry(
        hub,
        &mkey,
        layout::MAX_MANIFEST_BYTES,
        DOCUMENT_ATTEMPTS,
        &crate::Silent,
    )
    .await
    .map_err(transport_err(
        hub,
        format!("cannot read the image manifest {}", tag.digest),
    ))?;
    let actual = layout::sha256_digest(&body);
    if actual != tag.digest {
        return Err(HubError::Corrupt {
            what: format!("image manifest {mkey}"),
            expected: tag.digest,
            actual,
        });
    }
    let image_name = reference.repository();
    let expected = Expected {
        image: &image_name,
        owner: &reference.owner,
        version: match &reference.target {
            Target::Version(v) => Some(v.as_str()),
            Target::Digest(_) => None,
        },
        digest: &tag.digest,
    };
    let (verified, unverified) =
        match crate::sign::verify(tag.signature.as_deref(), &body, &expected, trusted) {
            Ok(v) => (Some(v), None),
            Err(e) if insecure => (None, Some(e.to_string())),
            Err(source) => {
                return Err(HubError::Signature {
                    reference: reference.to_string(),
                    source,
                });
            }
        };
    let image: ImageManifest =
        layout::decode_manifest(&body).map_err(|msg| HubError::BadDocument {
            what: mkey.clone(),
            hub: hub.describe(),
            msg,
        })?;
    let manifest = validate(&image).map_err(|msg| HubError::BadDocument {
        what: format!("image manifest {}", tag.digest),
        hub: hub.describe(),
        msg,
    })?;
    Ok(Resolved {
        digest: tag.digest,
        body: body.clone(),
        image,
        manifest,
        unverified,
        verified,
    })
}

/// Structural checks on untrusted input; returns the parsed snapshot manifest.
fn validate(im: &ImageManifest) -> Result<Manifest, String> {
    if im.layout > layout::LAYOUT {
        return Err(format!(
            "layout {} is newer than this forkd ({}); upgrade forkd",
            im.layout,
            layout::LAYOUT
        ));
    }
    let unknown = im.unknown_chunking();
    if unknown.is_some() || im.compression != "zstd" {
        return Err(format!(
            "unknown chunking {:?} or compression {:?}; upgrade forkd",
            unknown.unwrap_or(&im.chunking.algorithm),
            im.compression
        ));
    }
    let m = Manifest::parse(&im.manifest_toml).map_err(|e| e.to_string())?;
    if m.files.len() != im.files.len() {
        return Err("file list differs from manifest.toml".into());
    }
    let mut seen = std::collections::HashSet::new();
    for f in &im.files {
        if !seen.insert(f.name.as_str()) {
            return Err(format!("{} is listed twice", f.name));
        }
        let Some(e) = m.files.get(&f.name) else {
            return Err(format!("{} is not in manifest.toml", f.name));
        };
        if e.size != f.size || e.sha256 != f.sha256 {
            return Err(format!("{}: size/sha256 differ from manifest.toml", f.name));
        }
        let mut end = 0;
        for c in &f.chunks {
            if c.offset < end
                || c.len == 0
                || c.len > MAX_CHUNK
                || c.offset.checked_add(c.len).is_none_or(|e| e > f.size)
            {
                return Err(format!(
                    "{}: chunk at {} is out of order or out of bounds",
                    f.name, c.offset
                ));
            }
            let bad_pack = match (&c.pack, c.pack_offset) {
                (None, None) => false,
                (Some(p), Some(at)) => {
                    digest_hex(p).is_none()
                        || at
                            .checked_add(c.stored_size)
                            .is_none_or(|end| end > layout::MAX_PACK)
                }
                _ => true,
            };
            if digest_hex(&c.digest).is_none() || c.stored_size > MAX_CHUNK + (1 << 20) || bad_pack
            {
                return Err(format!(
                    "{}: chunk at {} has a bad digest or size",
                    f.name, c.offset
                ));
            }
            end = c.offset + c.len;
        }
    }
    Ok(m)
}
