//! `forkd push`: cut each file of a local snapshot into fixed-size chunks, compress each data
//! chunk as one zstd frame (several at once), upload only the blobs the hub lacks, then the
//! image manifest, then the tag files, then the catalogue entry. Blobs always land before the
//! tag that names them, so a reader never sees a tag whose blobs are missing.

use crate::error::{HubError, Result};
use crate::layout::{self, CHUNK_SIZE, Chunk, Chunking, ImageManifest, TagFile};
use crate::progress::Progress;
use crate::reference::{Reference, Target};
use crate::remote::{check_layout, fetch_catalog, transport_err};
use crate::transport::Transport;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use minisign::SecretKey;
use std::os::unix::fs::FileExt;
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
}

struct Job {
    file: Arc<std::fs::File>,
    /// Index of the file in the manifest's order (for the whole-file hash).
    file_idx: usize,
    name: String,
    offset: u64,
    len: u64,
}

/// What one chunk became: its raw bytes (for the whole-file hash) and, unless it is all
/// zeros (a hole in the hub), its compressed blob.
type Encoded = (Bytes, Option<(String, Bytes)>);

/// A chunk pushed: its file's name and, unless it is a hole, the chunk and the bytes uploaded.
type Uploaded = (String, Option<(Chunk, u64)>);

/// Read + compress one chunk.
fn encode(job: &Job, level: i32) -> Result<Encoded> {
    let mut buf = vec![0u8; job.len as usize];
    job.file
        .read_exact_at(&mut buf, job.offset)
        .map_err(HubError::io(format!(
            "cannot read {} at offset {}",
            job.name, job.offset
        )))?;
    if forkd_store::sparse::is_zero(&buf) {
        return Ok((Bytes::new(), None));
    }
    let stored = zstd::bulk::compress(&buf, level)
        .map_err(HubError::io(format!("cannot compress {}", job.name)))?;
    Ok((
        Bytes::from(buf),
        Some((layout::sha256_digest(&stored), Bytes::from(stored))),
    ))
}

pub async fn push(
    hub: Arc<dyn Transport>,
    snapshot: &forkd_store::Snapshot,
    reference: &Reference,
    opts: &PushOptions,
    progress: &dyn Progress,
) -> Result<PushOutcome> {
    let Target::Version(version) = &reference.target else {
        return Err(HubError::Invalid(
            "push needs OWNER/NAME[:VERSION], not a digest".into(),
        ));
    };
    let hub_ref: &dyn Transport = hub.as_ref();
    check_layout(hub_ref, true).await?;
    let mpath = snapshot.dir.join("manifest.toml");
    let manifest_toml =
        fs_err::read_to_string(&mpath).map_err(HubError::io("cannot read the local manifest"))?;

    let mut jobs = Vec::new();
    for (file_idx, (name, entry)) in snapshot.manifest.files.iter().enumerate() {
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
        let file = Arc::new(file);
        let mut offset = 0;
        while offset < entry.size {
            let len = CHUNK_SIZE.min(entry.size - offset);
            jobs.push(Job {
                file: file.clone(),
                file_idx,
                name: name.clone(),
                offset,
                len,
            });
            offset += len;
        }
    }
    progress.start("pushing", snapshot.manifest.total_size());
    // Each file's sha256 is computed from the very bytes that are compressed and uploaded (in
    // offset order, on a thread of its own, holes as zeros), and checked against the manifest
    // before the manifest and the tag are written: a corrupt image never becomes visible.
    let sizes: Vec<u64> = snapshot.manifest.files.values().map(|f| f.size).collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<(usize, u64, Bytes)>(opts.jobs.max(1) * 2);
    let hasher = std::thread::spawn(move || crate::hasher::run(sizes, rx));
    let level = opts.zstd_level;
    let results: Result<Vec<Uploaded>> = futures::stream::iter(jobs)
        .map(|job| {
            let hub = hub.clone();
            async move {
                let name = job.name.clone();
                let (file_idx, offset, len) = (job.file_idx, job.offset, job.len);
                let (raw, enc) = tokio::task::spawn_blocking(move || encode(&job, level))
                    .await
                    .map_err(|e| HubError::Invalid(format!("compression task failed: {e}")))??;
                progress.advance(len);
                let raw = (file_idx, offset, raw);
                let Some((digest, data)) = enc else {
                    return Ok((name, None, raw));
                };
                let key = layout::blob_key(&digest);
                let what = || format!("cannot upload {key}");
                let present = hub
                    .exists(&key)
                    .await
                    .map_err(transport_err(hub.as_ref(), what()))?;
                let stored_size = data.len() as u64;
                let uploaded = if present {
                    0
                } else {
                    hub.put(&key, data)
                        .await
                        .map_err(transport_err(hub.as_ref(), what()))?;
                    stored_size
                };
                let chunk = Chunk {
                    offset,
                    len,
                    digest,
                    stored_size,
                };
                Ok::<_, HubError>((name, Some((chunk, uploaded)), raw))
            }
        })
        .buffered(opts.jobs.max(1))
        .and_then(|(name, chunk, raw)| {
            let tx = tx.clone();
            async move {
                if !raw.2.is_empty() {
                    tx.send(raw)
                        .await
                        .map_err(|_| HubError::Invalid("hasher stopped".into()))?;
                }
                Ok((name, chunk))
            }
        })
        .try_collect()
        .await;
    drop(tx);
    let hashes = hasher
        .join()
        .map_err(|_| HubError::Invalid("hasher thread panicked".into()))?;
    progress.finish();
    let results = results?;
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

    let mut files: Vec<layout::FileEntry> = snapshot
        .manifest
        .files
        .iter()
        .map(|(name, e)| layout::FileEntry {
            name: name.clone(),
            size: e.size,
            sha256: e.sha256.clone(),
            chunks: vec![],
        })
        .collect();
    let (mut uploaded_bytes, mut reused_bytes) = (0, 0);
    for (name, r) in results {
        if let Some((chunk, up)) = r {
            if up > 0 {
                uploaded_bytes += up
            } else {
                reused_bytes += chunk.stored_size
            }
            files
                .iter_mut()
                .find(|f| f.name == name)
                .expect("listed file")
                .chunks
                .push(chunk);
        }
    }
    let manifest = ImageManifest {
        layout: layout::LAYOUT,
        media_type: layout::MEDIA_TYPE.into(),
        chunking: Chunking {
            algorithm: "fixed".into(),
            size: CHUNK_SIZE,
        },
        compression: "zstd".into(),
        manifest_toml,
        files,
    };
    let body = serde_json::to_vec_pretty(&manifest).expect("serialisable");
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
        layout: layout::LAYOUT,
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
    })
}
