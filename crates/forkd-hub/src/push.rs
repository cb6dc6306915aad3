//! `forkd push`: cut each file of a local snapshot into content-defined chunks (FastCDC),
//! compress each data chunk as one zstd frame (several at once), pack the chunks the hub does
//! not hold yet into blobs of about 16 MiB and upload those, then the image manifest, then the
//! tag files, then the catalogue entry. Blobs always land before the tag that names them, so a
//! reader never sees a tag whose blobs are missing.
//!
//! What the hub holds is learnt from the image manifests it lists (section 5 of
//! docs/HUB-LAYOUT.md): a chunk one of them already places is named at its place, not stored
//! again. A hub that lies about them can only make pulls of this image fail their digest
//! checks, never give them other bytes.

use crate::error::ChainProblem;
use crate::error::{HubError, Result};
use crate::layout::{self, Chunk, Chunking, ImageManifest, ParentRef, TagFile};
use crate::progress::Progress;
use crate::reference::{Reference, Target};
use crate::remote::{DOCUMENT_ATTEMPTS, check_layout, fetch_catalog, get_retry, transport_err};
use crate::transport::{Transport, TransportError};
use bytes::Bytes;
use futures::StreamExt;
use minisign::SecretKey;
use std::sync::Arc;

pub struct PushOptions {
    pub jobs: usize,
    pub key: Option<SecretKey>,
    pub description: Option<String>,
    pub zstd_level: i32,
}

#[derive(Debug, Clone)]
pub struct PushOutcome {
    pub digest: String,
    pub stored_size: u64,
    pub uploaded_bytes: u64,
    pub reused_bytes: u64,
    pub signed: bool,
    /// For a branch: its parents, the root first, pushed or found on the hub before it.
    pub parents: Vec<PushedParent>,
}

/// A parent of a pushed branch.
#[derive(Debug, Clone)]
pub struct PushedParent {
    /// Its local tag.
    pub tag: String,
    /// `OWNER/NAME:VERSION` on the hub.
    pub reference: String,
    /// Its image manifest digest on the hub (the branch references it by this pin).
    pub digest: String,
    /// `false` when the hub already held it (nothing was uploaded for it).
    pub pushed: bool,
    pub uploaded_bytes: u64,
}

/// The longest chain of parents a push or a pull follows.
pub const MAX_CHAIN: usize = 16;

/// Most image manifests of the hub a push reads to learn which chunks the hub holds: every
/// version of the image being pushed first, then the newest of each other image of its OWNER.
const MAX_KNOWN_MANIFESTS: usize = 32;

/// Where a chunk already is on the hub: its pack and offset there, or a blob of its own.
type Place = (Option<String>, Option<u64>);

/// The chunks the hub already holds, by digest, from image manifests that this publisher put
/// there: images of the same OWNER whose tag verifies with the pushing key (any image of the
/// OWNER when the push is unsigned). A place is signed into the new image, so it is taken only
/// from images the signer already vouched for: another tenant of the hub could list common
/// chunks at places that do not hold them, and break every image that named those places.
async fn known_chunks(
    hub: &dyn Transport,
    reference: &Reference,
    key: Option<&SecretKey>,
) -> Result<std::collections::HashMap<String, Place>> {
    let catalog = fetch_catalog(hub).await?;
    let image = reference.repository();
    let prefix = format!("{}/", reference.owner);
    // (image, version) pairs, this image's versions newest first, then the others' newest.
    let mut wanted: Vec<(String, String)> = Vec::new();
    if let Some(own) = catalog.images.iter().find(|i| i.name == image) {
        let mut v = own.versions.clone();
        v.sort_by(|a, b| b.created_at.cmp(&a.created_at));
        wanted.extend(v.into_iter().map(|v| (image.clone(), v.version)));
    }
    for i in catalog
        .images
        .iter()
        .filter(|i| i.name != image && i.name.starts_with(&prefix))
    {
        if let Some(v) = i
            .versions
            .iter()
            .max_by(|a, b| a.created_at.cmp(&b.created_at))
        {
            wanted.push((i.name.clone(), v.version.clone()));
        }
    }
    wanted.truncate(MAX_KNOWN_MANIFESTS);
    let own_key = match key {
        Some(sk) => Some(crate::sign::TrustedKey {
            key: minisign::PublicKey::from_secret_key(sk)
                .map_err(|e| HubError::Invalid(format!("bad signing key: {e}")))?,
            scope: crate::sign::Scope::Own,
        }),
        None => None,
    };
    let mut known = std::collections::HashMap::new();
    for (name, version) in wanted {
        let Some((owner, short)) = name.split_once('/') else {
            continue;
        };
        let get = |k: String, max: u64| async move {
            match get_retry(hub, &k, max, DOCUMENT_ATTEMPTS, &crate::Silent).await {
                Ok(b) => Ok(Some(b)),
                Err(TransportError::NotFound { .. }) => Ok(None),
                Err(e) => Err(transport_err(hub, format!("cannot read {k}"))(e)),
            }
        };
        let tag_key = layout::version_tag_key(owner, short, &version);
        let Some(tag_body) = get(tag_key, layout::MAX_TAG_BYTES).await? else {
            continue;
        };
        let Ok(tag) = serde_json::from_slice::<TagFile>(&tag_body) else {
            continue;
        };
        if crate::reference::digest_hex(&tag.digest).is_none() {
            continue;
        }
        let Some(body) = get(layout::blob_key(&tag.digest), layout::MAX_MANIFEST_BYTES).await?
        else {
            continue;
        };
        if layout::sha256_digest(&body) != tag.digest {
            continue;
        }
        if let Some(own) = &own_key {
            let expected = crate::sign::Expected {
                image: &name,
                owner,
                version: Some(&version),
                digest: &tag.digest,
            };
            let own = [own.clone()];
            if crate::sign::verify(tag.signature.as_deref(), &body, &expected, &own).is_err() {
                continue;
            }
        }
        let Ok(im) = layout::decode_manifest(&body) else {
            continue;
        };
        for c in im.files.iter().flat_map(|f| &f.chunks) {
            let place_ok = match (&c.pack, c.pack_offset) {
                (None, None) => true,
                (Some(p), Some(at)) => {
                    crate::reference::digest_hex(p).is_some()
                        && at
                            .checked_add(c.stored_size)
                            .is_some_and(|end| end <= layout::MAX_PACK)
                }
                _ => false,
            };
            if place_ok && crate::reference::digest_hex(&c.digest).is_some() {
                known
                    .entry(c.digest.clone())
                    .or_insert((c.pack.clone(), c.pack_offset));
            }
        }
    }
    Ok(known)
}

/// A chunk cut from a file: (file index, offset, raw bytes).
type Cut = (usize, u64, Vec<u8>);
/// A file to cut: its name, its FastCDC (min, average, max) sizes, and the open file.
type ToCut = (String, (u32, u32, u32), std::fs::File);

/// Cut every file with FastCDC, in order, into `tx` (blocking; holes are read as zeros).
fn cut_files(files: Vec<ToCut>, tx: tokio::sync::mpsc::Sender<Result<Cut>>) {
    for (fi, (name, (min, avg, max), file)) in files.into_iter().enumerate() {
        let reader = std::io::BufReader::with_capacity(1 << 20, file);
        let cdc = fastcdc::v2020::StreamCDC::new(reader, min as usize, avg as usize, max as usize);
        for c in cdc {
            let item = c.map(|c| (fi, c.offset, c.data)).map_err(|e| HubError::Io {
                what: format!("cannot read {name}"),
                source: std::io::Error::other(e.to_string()),
            });
            let stop = item.is_err();
            if tx.blocking_send(item).is_err() || stop {
                return;
            }
        }
    }
}

/// One compressed chunk: raw bytes, and unless it is all zeros (a hole on the hub), its
/// digest and stored bytes.
type Encoded = (usize, u64, Bytes, Option<(String, Bytes)>);

fn encode((fi, offset, raw): Cut, level: i32) -> Result<Encoded> {
    if forkd_store::sparse::is_zero(&raw) {
        return Ok((fi, offset, Bytes::from(raw), None));
    }
    // One compression context per thread and level: a context made for each of an image's
    // some 20 000 chunks costs more than compressing a small one.
    thread_local! {
        static CCTX: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { std::cell::RefCell::new(None) };
    }
    let stored = CCTX
        .with(|c| {
            let mut c = c.borrow_mut();
            if c.as_ref().is_none_or(|(l, _)| *l != level) {
                *c = Some((level, zstd::bulk::Compressor::new(level)?));
            }
            c.as_mut().expect("made above").1.compress(&raw)
        })
        .map_err(HubError::io("cannot compress a chunk"))?;
    Ok((
        fi,
        offset,
        Bytes::from(raw),
        Some((layout::sha256_digest(&stored), Bytes::from(stored))),
    ))
}

/// Upload one sealed pack unless the hub has it; returns the bytes uploaded.
async fn upload_pack(hub: Arc<dyn Transport>, digest: String, data: Bytes) -> Result<u64> {
    let key = layout::blob_key(&digest);
    let what = || format!("cannot upload {key}");
    if hub
        .exists(&key)
        .await
        .map_err(transport_err(hub.as_ref(), what()))?
    {
        return Ok(0);
    }
    let n = data.len() as u64;
    hub.put(&key, data)
        .await
        .map_err(transport_err(hub.as_ref(), what()))?;
    Ok(n)
}

/// Push `snapshot` as `reference`. A branch's parents (found in `store` by their content
/// digest) are pushed first under the same OWNER, each as NAME:VERSION of its own manifest,
/// unless the hub already holds them; the branch's image manifest then names its parent's
/// digest pin.
pub async fn push(
    hub: Arc<dyn Transport>,
    store: &forkd_store::Store,
    snapshot: &forkd_store::Snapshot,
    reference: &Reference,
    opts: &PushOptions,
    progress: &dyn Progress,
) -> Result<PushOutcome> {
    if !matches!(reference.target, Target::Version(_)) {
        return Err(HubError::Invalid(
            "push needs OWNER/NAME[:VERSION], not a digest".into(),
        ));
    }
    check_layout(hub.as_ref(), true).await?;
    // The local chain, nearest parent first.
    let mut chain: Vec<forkd_store::Snapshot> = Vec::new();
    let mut seen = std::collections::HashSet::from([snapshot.manifest.digest()]);
    let mut cur = snapshot.clone();
    while let Some(d) = cur.manifest.parent_digest.clone() {
        if chain.len() >= MAX_CHAIN {
            return Err(HubError::Chain {
                reference: format!("`{}`", snapshot.tag),
                problem: ChainProblem::TooDeep { max: MAX_CHAIN },
            });
        }
        if !seen.insert(d.clone()) {
            return Err(HubError::Chain {
                reference: format!("`{}`", snapshot.tag),
                problem: ChainProblem::Cycle { at: d },
            });
        }
        let Some(p) = store.find_by_digest(&d)? else {
            return Err(HubError::ParentNotLocal {
                tag: cur.tag.to_string(),
                parent_tag: cur.manifest.parent_tag.clone().unwrap_or_default(),
                digest: d,
            });
        };
        chain.push(p.clone());
        cur = p;
    }
    let mut parents = Vec::new();
    let mut parent: Option<ParentRef> = None;
    for p in chain.iter().rev() {
        let (r, pushed) =
            ensure_parent(&hub, p, &reference.owner, parent.take(), opts, progress).await?;
        parents.push(pushed);
        parent = Some(r);
    }
    let mut out = push_one(hub, snapshot, reference, parent, opts, progress).await?;
    out.parents = parents;
    Ok(out)
}

/// What a hub tag holds, compared with a local image about to be pushed there.
enum Held {
    Absent,
    /// The same content, as this push would publish it: its tag file and digest.
    Same {
        digest: String,
        tag_body: Bytes,
    },
    /// The same content, but not as this push would publish it (another parent reference, or
    /// not signed by this key): pushing again replaces it with an equivalent image.
    Stale,
    Other,
}

/// Whether `OWNER/NAME:VERSION` on the hub holds `snap`'s content (with `parent`).
async fn held(
    hub: &dyn Transport,
    owner: &str,
    name: &str,
    version: &str,
    snap: &forkd_store::Snapshot,
    parent: Option<&ParentRef>,
    key: Option<&SecretKey>,
) -> Result<Held> {
    let key_path = layout::version_tag_key(owner, name, version);
    let what = || format!("cannot read {key_path}");
    let body = match get_retry(
        hub,
        &key_path,
        layout::MAX_TAG_BYTES,
        DOCUMENT_ATTEMPTS,
        &crate::Silent,
    )
    .await
    {
        Ok(b) => b,
        Err(TransportError::NotFound { .. }) => return Ok(Held::Absent),
        Err(e) => return Err(transport_err(hub, what())(e)),
    };
    let Ok(tag) = serde_json::from_slice::<TagFile>(&body) else {
        return Ok(Held::Other);
    };
    if crate::reference::digest_hex(&tag.digest).is_none() {
        return Ok(Held::Other);
    }
    let mbody = match get_retry(
        hub,
        &layout::blob_key(&tag.digest),
        layout::MAX_MANIFEST_BYTES,
        DOCUMENT_ATTEMPTS,
        &crate::Silent,
    )
    .await
    {
        Ok(b) => b,
        Err(TransportError::NotFound { .. }) => return Ok(Held::Other),
        Err(e) => return Err(transport_err(hub, what())(e)),
    };
    if layout::sha256_digest(&mbody) != tag.digest {
        return Ok(Held::Other);
    }
    let Ok(im) = layout::decode_manifest(&mbody) else {
        return Ok(Held::Other);
    };
    let Ok(m) = forkd_store::Manifest::parse(&im.manifest_toml) else {
        return Ok(Held::Other);
    };
    if m.digest() != snap.manifest.digest() {
        return Ok(Held::Other);
    }
    if im.parent.as_ref() != parent || m.parent_digest != snap.manifest.parent_digest {
        return Ok(Held::Stale);
    }
    if let Some(sk) = key {
        let own = crate::sign::TrustedKey {
            key: minisign::PublicKey::from_secret_key(sk)
                .map_err(|e| HubError::Invalid(format!("bad signing key: {e}")))?,
            scope: crate::sign::Scope::Own,
        };
        let image = format!("{owner}/{name}");
        let expected = crate::sign::Expected {
            image: &image,
            owner,
            version: Some(version),
            digest: &tag.digest,
        };
        if crate::sign::verify(tag.signature.as_deref(), &mbody, &expected, &[own]).is_err() {
            return Ok(Held::Stale);
        }
    }
    Ok(Held::Same {
        digest: tag.digest,
        tag_body: body,
    })
}

/// Make sure the hub holds the parent `snap` under OWNER (NAME:VERSION of its manifest, or
/// VERSION-<12 hex of its content digest> when that tag holds another image) with its digest
/// pin; push it when it does not.
async fn ensure_parent(
    hub: &Arc<dyn Transport>,
    snap: &forkd_store::Snapshot,
    owner: &str,
    parent: Option<ParentRef>,
    opts: &PushOptions,
    progress: &dyn Progress,
) -> Result<(ParentRef, PushedParent)> {
    use crate::reference::{is_name, is_version};
    let m = &snap.manifest;
    let name = if is_name(&m.name) {
        m.name.clone()
    } else {
        snap.tag.to_string()
    };
    let content = m.digest();
    // `sha256:` then 64 hex digits: the first 12 name the content briefly.
    let hex12 = &content["sha256:".len()..][..12];
    let mut versions = Vec::new();
    if is_version(&m.version) {
        versions.push(m.version.clone());
        let v = format!("{}-{hex12}", m.version);
        if is_version(&v) {
            versions.push(v);
        }
    }
    if versions.len() < 2 {
        versions.push(format!("c-{hex12}"));
    }
    let image = format!("{owner}/{name}");
    for version in &versions {
        let reference = Reference {
            owner: owner.to_string(),
            name: name.clone(),
            target: Target::Version(version.clone()),
        };
        match held(
            hub.as_ref(),
            owner,
            &name,
            version,
            snap,
            parent.as_ref(),
            opts.key.as_ref(),
        )
        .await?
        {
            Held::Same { digest, tag_body } => {
                let pin = layout::digest_tag_key(owner, &name, &digest);
                let present = hub
                    .exists(&pin)
                    .await
                    .map_err(transport_err(hub.as_ref(), format!("cannot read {pin}")))?;
                if !present {
                    hub.put(&pin, tag_body).await.map_err(transport_err(
                        hub.as_ref(),
                        format!("cannot write the tag file {pin}"),
                    ))?;
                }
                progress.message(&format!(
                    "the parent `{}` is already on the hub as {reference}",
                    snap.tag
                ));
                let r = ParentRef {
                    image: image.clone(),
                    version: version.clone(),
                    digest: digest.clone(),
                };
                let p = PushedParent {
                    tag: snap.tag.to_string(),
                    reference: reference.to_string(),
                    digest,
                    pushed: false,
                    uploaded_bytes: 0,
                };
                return Ok((r, p));
            }
            Held::Absent | Held::Stale => {
                progress.message(&format!("pushing the parent `{}` as {reference}", snap.tag));
                let out = push_one(hub.clone(), snap, &reference, parent, opts, progress).await?;
                let r = ParentRef {
                    image: image.clone(),
                    version: version.clone(),
                    digest: out.digest.clone(),
                };
                let p = PushedParent {
                    tag: snap.tag.to_string(),
                    reference: reference.to_string(),
                    digest: out.digest,
                    pushed: true,
                    uploaded_bytes: out.uploaded_bytes,
                };
                return Ok((r, p));
            }
            Held::Other => progress.message(&format!(
                "{reference} on the hub is another image; not replacing it with the parent `{}`",
                snap.tag
            )),
        }
    }
    Err(HubError::Invalid(format!(
        "cannot push the parent `{}`: {image}:{} on the hub hold other images; push it yourself \
         under another version (`forkd push {} {image}:NEW`) and push the branch again",
        snap.tag,
        versions.join(" and :"),
        snap.tag
    )))
}

/// Push one image (a plain image, or a branch whose parent is `parent` on the hub).
async fn push_one(
    hub: Arc<dyn Transport>,
    snapshot: &forkd_store::Snapshot,
    reference: &Reference,
    parent: Option<ParentRef>,
    opts: &PushOptions,
    progress: &dyn Progress,
) -> Result<PushOutcome> {
    let Target::Version(version) = &reference.target else {
        return Err(HubError::Invalid(
            "push needs OWNER/NAME[:VERSION], not a digest".into(),
        ));
    };
    if snapshot.manifest.is_branch() != parent.is_some() {
        return Err(HubError::Invalid(format!(
            "`{}`: a branch is pushed with its parent, and only a branch",
            snapshot.tag
        )));
    }
    let hub_ref: &dyn Transport = hub.as_ref();
    check_layout(hub_ref, true).await?;
    let mpath = snapshot.dir.join("manifest.toml");
    let manifest_toml =
        fs_err::read_to_string(&mpath).map_err(HubError::io("cannot read the local manifest"))?;

    let mut open_files = Vec::new();
    for (name, entry) in snapshot.manifest.files.iter() {
        let path = snapshot.path(name);
        let file = forkd_store::open_nofollow(&path)
            .map_err(HubError::io(format!("cannot open {}", path.display())))?;
        let size = file
            .metadata()
            .map_err(HubError::io(format!("cannot open {}", path.display())))?
            .len();
        if size != entry.size {
            return Err(HubError::Corrupt {
                what: format!("{} of the local image `{}`", name, snapshot.tag),
                expected: format!("{} bytes (its manifest)", entry.size),
                actual: format!("{size} bytes"),
            });
        }
        open_files.push((name.clone(), layout::cdc_sizes(entry.role.as_deref()), file));
    }
    let known = known_chunks(hub_ref, reference, opts.key.as_ref()).await?;
    progress.start("pushing", snapshot.manifest.total_size());
    // Each file's sha256 is computed from the very bytes that are compressed and uploaded (in
    // offset order, on a thread of its own, holes as zeros), and checked against the manifest
    // before the manifest and the tag are written: a corrupt image never becomes visible.
    let sizes: Vec<u64> = snapshot.manifest.files.values().map(|f| f.size).collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<(usize, u64, Bytes)>(opts.jobs.max(1) * 8);
    let hasher = std::thread::spawn(move || crate::hasher::run(sizes, rx));
    let (ctx, mut crx) = tokio::sync::mpsc::channel::<Result<Cut>>(opts.jobs.max(1) * 4);
    let cutter = tokio::task::spawn_blocking(move || cut_files(open_files, ctx));
    let level = opts.zstd_level;
    let mut encoded = Box::pin(
        futures::stream::poll_fn(move |cx| crx.poll_recv(cx))
            .map(|cut| async move {
                let cut = cut?;
                tokio::task::spawn_blocking(move || encode(cut, level))
                    .await
                    .map_err(|e| HubError::Invalid(format!("compression task failed: {e}")))?
            })
            .buffered(opts.jobs.max(1)),
    );
    // Each file's chunks; a chunk in a pack not sealed yet names it by its index in `packs`.
    let nfiles = snapshot.manifest.files.len();
    let mut chunks: Vec<Vec<(Chunk, Option<usize>)>> = vec![Vec::new(); nfiles];
    let mut this_push: std::collections::HashMap<String, (usize, u64)> = Default::default();
    let mut pack: Vec<u8> = Vec::new();
    let mut packs: Vec<String> = Vec::new();
    let mut uploads = tokio::task::JoinSet::new();
    let (mut uploaded_bytes, mut reused_bytes) = (0u64, 0u64);
    let seal = |pack: &mut Vec<u8>,
                packs: &mut Vec<String>,
                uploads: &mut tokio::task::JoinSet<Result<u64>>| {
        let data = Bytes::from(std::mem::take(pack));
        let digest = layout::sha256_digest(&data);
        packs.push(digest.clone());
        uploads.spawn(upload_pack(hub.clone(), digest, data));
    };
    let result: Result<()> = async {
        while let Some(item) = encoded.next().await {
            let (fi, offset, raw, enc) = item?;
            let len = raw.len() as u64;
            progress.advance(len);
            let Some((digest, data)) = enc else {
                continue;
            };
            tx.send((fi, offset, raw))
                .await
                .map_err(|_| HubError::Invalid("hasher stopped".into()))?;
            let stored_size = data.len() as u64;
            let mut chunk = Chunk {
                offset,
                len,
                digest: digest.clone(),
                stored_size,
                pack: None,
                pack_offset: None,
            };
            let sealed_as = if let Some((p, at)) = known.get(&digest) {
                reused_bytes += stored_size;
                (chunk.pack, chunk.pack_offset) = (p.clone(), *at);
                None
            } else if let Some(&(p, at)) = this_push.get(&digest) {
                chunk.pack_offset = Some(at);
                Some(p)
            } else {
                let p = packs.len();
                let at = pack.len() as u64;
                pack.extend_from_slice(&data);
                this_push.insert(digest, (p, at));
                chunk.pack_offset = Some(at);
                if pack.len() as u64 >= layout::PACK_TARGET {
                    seal(&mut pack, &mut packs, &mut uploads);
                }
                Some(p)
            };
            chunks[fi].push((chunk, sealed_as));
            // At most a few packs in the air: each is 16 MiB of memory.
            while uploads.len() >= opts.jobs.clamp(1, 4) {
                if let Some(r) = uploads.join_next().await {
                    uploaded_bytes += r.map_err(|e| HubError::Invalid(e.to_string()))??;
                }
            }
        }
        if !pack.is_empty() {
            seal(&mut pack, &mut packs, &mut uploads);
        }
        while let Some(r) = uploads.join_next().await {
            uploaded_bytes += r.map_err(|e| HubError::Invalid(e.to_string()))??;
        }
        Ok(())
    }
    .await;
    drop(tx);
    // The cutter may be blocked on a full channel (an upload failed and nothing reads it):
    // dropping its receiver lets it stop.
    drop(encoded);
    let _ = cutter.await;
    let hashes = hasher
        .join()
        .map_err(|_| HubError::Invalid("hasher thread panicked".into()))?;
    progress.finish();
    result?;
    for ((name, entry), actual) in snapshot.manifest.files.iter().zip(hashes) {
        if actual != entry.sha256 {
            return Err(HubError::Corrupt {
                what: format!(
                    "{name} of the local image `{}` (`forkd verify {}` checks every file; nothing was published)",
                    snapshot.tag, snapshot.tag
                ),
                expected: format!("sha256 {} (its manifest)", entry.sha256),
                actual: format!("sha256 {actual}"),
            });
        }
    }

    let files: Vec<layout::FileEntry> = snapshot
        .manifest
        .files
        .iter()
        .zip(chunks)
        .map(|((name, e), cs)| layout::FileEntry {
            name: name.clone(),
            size: e.size,
            sha256: e.sha256.clone(),
            chunking: Some(Chunking::fastcdc_of(layout::cdc_sizes(e.role.as_deref())))
                .filter(|c| *c != Chunking::fastcdc()),
            chunks: cs
                .into_iter()
                .map(|(mut c, p)| {
                    if let Some(p) = p {
                        c.pack = Some(packs[p].clone());
                    }
                    c
                })
                .collect(),
        })
        .collect();
    let mut manifest = ImageManifest {
        layout: layout::LAYOUT,
        media_type: layout::MEDIA_TYPE.into(),
        chunking: Chunking::fastcdc(),
        compression: "zstd".into(),
        manifest_toml,
        files,
        parent,
        working_set: None,
    };
    // The working set recorded when the image was built (`forkd build`), as chunk indices.
    match forkd_store::workingset::WorkingSet::load(&snapshot.dir) {
        Ok(Some(ws)) => {
            let set = manifest.working_set_of(&ws);
            manifest.working_set = (!set.is_empty()).then_some(set);
        }
        Ok(None) => {}
        Err(e) => progress.message(&format!("warning: ignoring the working set: {e}")),
    }
    // Compact and compressed: the manifest of an image of some thousands of chunks is read
    // before any child of a lazy fork starts (python-numpy's: 1.4 MB of JSON, 0.3 MB stored).
    let body = layout::encode_manifest(&manifest);
    let digest = layout::sha256_digest(&body);
    let key = layout::blob_key(&digest);
    hub.put(&key, Bytes::from(body.clone()))
        .await
        .map_err(transport_err(hub_ref, "cannot upload the image manifest"))?;

    let image = reference.repository();
    let signature = match &opts.key {
        Some(sk) => Some(crate::sign::sign(
            sk,
            &body,
            &crate::sign::Subject::new(&image, version, &digest),
        )?),
        None => None,
    };
    let stored_size = manifest.stored_size();
    let tag = TagFile {
        layout: layout::TAG_LAYOUT,
        image: image.clone(),
        digest: digest.clone(),
        size: stored_size,
        signature,
    };
    let tag_body = Bytes::from(serde_json::to_vec_pretty(&tag).expect("serialisable"));
    for key in [
        layout::digest_tag_key(&reference.owner, &reference.name, &digest),
        layout::version_tag_key(&reference.owner, &reference.name, version),
    ] {
        hub.put(&key, tag_body.clone())
            .await
            .map_err(transport_err(
                hub_ref,
                format!("cannot write the tag file {key}"),
            ))?;
    }

    // Catalogue: read-modify-write (last writer wins when two pushes race; see HUB-LAYOUT.md).
    let mut catalog = fetch_catalog(hub_ref).await?;
    let description = opts
        .description
        .clone()
        .unwrap_or_else(|| snapshot.manifest.description.clone());
    let idx = match catalog.images.iter().position(|i| i.name == image) {
        Some(i) => i,
        None => {
            catalog.images.push(layout::CatalogImage {
                name: image.clone(),
                description: String::new(),
                versions: vec![],
            });
            catalog.images.len() - 1
        }
    };
    let entry = &mut catalog.images[idx];
    if !description.is_empty() {
        entry.description = description;
    }
    entry.versions.retain(|v| &v.version != version);
    entry.versions.push(layout::CatalogVersion {
        version: version.clone(),
        digest: digest.clone(),
        size: stored_size,
        disk_size: Some(snapshot.manifest.total_size()),
        created_at: jiff::Timestamp::now().to_string(),
    });
    catalog.images.sort_by(|a, b| a.name.cmp(&b.name));
    catalog.layout = layout::LAYOUT;
    let cat_body = Bytes::from(serde_json::to_vec_pretty(&catalog).expect("serialisable"));
    hub.put(layout::CATALOG_KEY, cat_body)
        .await
        .map_err(transport_err(hub_ref, "cannot update the catalogue"))?;

    Ok(PushOutcome {
        digest,
        stored_size,
        uploaded_bytes,
        reused_bytes,
        signed: tag.signature.is_some(),
        parents: Vec::new(),
    })
}
