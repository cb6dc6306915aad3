//! The download pipeline. Files are written in place in `cache/partial/<image hex>/`; a journal
//! records every chunk that was verified and written, so a pull interrupted by a network cut,
//! Ctrl-C or kill -9 resumes with only the missing chunks, and each byte is written to disk
//! once. N chunks are in flight; each is verified against its digest, decompressed (at most its
//! `len`), checked for length and written at its offset (zero pages skipped). A hasher thread
//! hashes every file in offset order as chunks complete (holes as zeros; a resumed pull's
//! chunks are read back from the file), so the whole-file sha256 of every pull, fresh or
//! resumed, is checked against the manifest without a second pass.

use crate::cache::Partial;
use crate::chunks::{self, ChunkStore};
use crate::error::{HubError, Result};
use crate::layout::{self, Chunk, ImageManifest};
use crate::progress::Progress;
use crate::transport::Transport;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How hard a fetch works: chunks in flight, and attempts per blob for transient errors.
pub struct Limits {
    pub jobs: usize,
    pub attempts: u32,
}

pub struct Fetched {
    pub downloaded: u64,
    pub resumed: u64,
    /// Stored bytes taken from the local chunk store instead of the hub.
    pub cached: u64,
}

pub(crate) const JOURNAL: &str = ".journal";

/// Chunk indices recorded as done. A torn last line (kill -9 mid-append) is ignored.
pub(crate) fn read_journal(journal: &std::fs::File, image: &ImageManifest) -> HashSet<usize> {
    use std::io::Read;
    let digests: Vec<&str> = image
        .files
        .iter()
        .flat_map(|f| f.chunks.iter().map(|c| c.digest.as_str()))
        .collect();
    // One line per chunk: "INDEX sha256:HEX\n".
    let cap = (digests.len() as u64 + 1) * 96;
    let mut text = String::new();
    if journal.take(cap).read_to_string(&mut text).is_err() {
        return HashSet::new();
    }
    text.lines()
        .filter_map(|l| {
            let (i, d) = l.split_once(' ')?;
            let i: usize = i.parse().ok()?;
            (digests.get(i) == Some(&d)).then_some(i)
        })
        .collect()
}

/// A downloaded blob as the raw bytes of chunk `c`: its sha256 must be the chunk's digest,
/// and it must be one zstd frame of exactly `len` bytes (decoded into at most `len`).
pub(crate) fn unpack_chunk(data: &[u8], c: &Chunk) -> Result<Vec<u8>> {
    let digest = &c.digest;
    let actual = layout::sha256_digest(data);
    if &actual != digest {
        return Err(HubError::Corrupt {
            what: format!("blob {}", layout::blob_key(digest)),
            expected: digest.clone(),
            actual,
        });
    }
    // One decompression context per thread: an image is some 20 000 chunks, and a context
    // made for each costs more than decompressing a small chunk.
    thread_local! {
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let raw = DCTX
        .with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(zstd::bulk::Decompressor::new()?);
            }
            d.as_mut()
                .expect("made above")
                .decompress(data, c.len as usize)
        })
        .map_err(|e| HubError::Corrupt {
            what: format!("blob {digest}"),
            expected: format!("a zstd frame of {} bytes", c.len),
            actual: e.to_string(),
        })?;
    if raw.len() as u64 != c.len {
        return Err(HubError::Corrupt {
            what: format!("blob {digest}"),
            expected: format!("{} bytes", c.len),
            actual: format!("{} bytes", raw.len()),
        });
    }
    Ok(raw)
}

/// A pull's partial directory, ready to write: its journal (opened for appending), the chunk
/// indices it records as done, and every file of the image opened and sized (sparse).
pub(crate) type OpenPartial = (std::fs::File, HashSet<usize>, Vec<Arc<std::fs::File>>);

pub(crate) fn open_partial(image: &ImageManifest, dir: &Partial) -> Result<OpenPartial> {
    let journal = dir.open_file(JOURNAL, true)?;
    let done = read_journal(&journal, image);
    let mut files = Vec::new();
    for f in &image.files {
        let file = dir.open_file(&f.name, false)?;
        file.set_len(f.size).map_err(HubError::io(format!(
            "cannot size {}",
            dir.path().join(&f.name).display()
        )))?;
        files.push(Arc::new(file));
    }
    Ok((journal, done, files))
}

/// Out of space: free what this pull took instead of keeping it for a resume.
pub(crate) fn free_if_out_of_space(e: &HubError, dir: &Partial) {
    if let HubError::Io { source, .. } = e
        && source.raw_os_error() == Some(28)
    {
        let _ = std::fs::remove_dir_all(dir.path());
    }
}

/// Every file's sha256 (`hashes`, in the image's file order) must be the manifest's: chunks
/// that each match their digest could still describe other content. On a mismatch `dir` is
/// removed: what is there cannot be trusted, and the next pull starts over.
pub(crate) fn check_hashes(
    image: &ImageManifest,
    hashes: impl IntoIterator<Item = String>,
    dir: &Partial,
) -> Result<()> {
    for (f, actual) in image.files.iter().zip(hashes) {
        if actual != f.sha256 {
            let _ = std::fs::remove_dir_all(dir.path());
            return Err(HubError::Corrupt {
                what: format!("{} after download", f.name),
                expected: format!("sha256 {}", f.sha256),
                actual: format!("sha256 {actual}"),
            });
        }
    }
    Ok(())
}

/// Split chunks (flat indices into `chunks`, in the order given) into batches of neighbours:
/// each batch's chunks lie next to each other in one blob (see [`chunks::adjacent`]), so what
/// a batch downloads is one ranged GET.
pub(crate) fn batches(
    chunks: &[&Chunk],
    order: impl IntoIterator<Item = usize>,
) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut start = 0;
    for i in order {
        if let Some(b) = out.last_mut()
            && let Some(&last) = b.last()
            && last + 1 == i
            && chunks::adjacent(chunks[last], chunks[i], start)
        {
            b.push(i);
            continue;
        }
        start = chunks[i].location().1.start;
        out.push(vec![i]);
    }
    out
}

/// Verify, decompress and write the chunks of a batch (flat index, chunk) whose stored bytes
/// are `got` (from [`chunks::get_chunks`]); keep the downloaded ones in the chunk store, and
/// journal each. Returns each chunk's raw bytes. Blocking.
pub(crate) fn land(
    batch: &[(usize, Chunk)],
    got: Vec<(Bytes, bool)>,
    file: &std::fs::File,
    store: Option<&ChunkStore>,
    journal: &Mutex<std::fs::File>,
) -> Result<Vec<Bytes>> {
    let mut out = Vec::with_capacity(batch.len());
    // The batch's journal lines, written together once its chunks are: a line only ever
    // follows its chunk's bytes, and one write per batch instead of a few per chunk.
    let mut lines = String::new();
    let flush = |lines: &str| -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut j = journal.lock().unwrap_or_else(|p| p.into_inner());
        j.write_all(lines.as_bytes())
            .map_err(HubError::io("cannot write the download journal"))
    };
    for ((i, c), (data, cached)) in batch.iter().zip(got) {
        // On an error the lines of the chunks already written are kept if they can be (a
        // resumed pull then skips them); the error reported is the chunk's, not the journal's.
        let raw = match unpack_chunk(&data, c) {
            Ok(raw) => raw,
            Err(e) => {
                let _ = flush(&lines);
                return Err(e);
            }
        };
        if let Err(e) = forkd_store::sparse::write_sparse_at(file, &raw, c.offset) {
            let _ = flush(&lines);
            return Err(HubError::io("cannot write the pulled snapshot")(e));
        }
        if !cached && let Some(s) = store {
            s.put(&c.digest, &data);
        }
        lines.push_str(&format!("{i} {}\n", c.digest));
        out.push(Bytes::from(raw));
    }
    flush(&lines)?;
    Ok(out)
}

/// Start writing back the file range a batch of chunks covers ([`start_writeback`]).
fn start_batch_writeback(file: &std::fs::File, batch: &[(usize, Chunk)]) {
    if let (Some(lo), Some(hi)) = (
        batch.iter().map(|(_, c)| c.offset).min(),
        batch.iter().map(|(_, c)| c.offset + c.len).max(),
    ) {
        start_writeback(file, lo, hi - lo);
    }
}

/// Start writing `len` bytes of `file` at `offset` back to disk, without waiting for it. The
/// pull fsyncs every file before it installs the image; started as each batch lands, that
/// writeback overlaps the download and the hashing instead of all coming at the end (the
/// fsync of bench/pull.sh's 640 MiB took about 0.4 s of a 2.4 s pull). A hint only: an error
/// is ignored, and the fsync still decides.
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range only reads its arguments; the descriptor is open for the
    // duration of the call (borrowed from `file`).
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Every chunk of `image` with the file it belongs to, files in order and each by offset:
/// the flat numbering of the journal and of `working_set`.
pub(crate) fn flat_chunks(image: &ImageManifest) -> (Vec<usize>, Vec<&Chunk>) {
    image
        .files
        .iter()
        .enumerate()
        .flat_map(|(f, e)| e.chunks.iter().map(move |c| (f, c)))
        .unzip()
}

pub async fn fetch(
    hub: Arc<dyn Transport>,
    image: &ImageManifest,
    dir: &Partial,
    store: Option<&Arc<ChunkStore>>,
    opts: &Limits,
    progress: &dyn Progress,
) -> Result<Fetched> {
    let (journal, done, files) = open_partial(image, dir)?;
    let (file_of, chunks) = flat_chunks(image);
    let total: u64 = chunks.iter().map(|c| c.stored_size).sum();
    let resumed: u64 = done.iter().map(|&i| chunks[i].stored_size).sum();
    if resumed > 0 {
        progress.message(&format!(
            "resuming: {} of {} bytes are already here",
            resumed, total
        ));
    }
    // A batch never spans two files (the hasher takes each file's bytes in order).
    let work: Vec<Vec<usize>> = batches(&chunks, 0..chunks.len())
        .into_iter()
        .flat_map(|b| {
            let mut parts: Vec<Vec<usize>> = Vec::new();
            for i in b {
                match parts.last_mut() {
                    Some(p) if file_of[p[0]] == file_of[i] => p.push(i),
                    _ => parts.push(vec![i]),
                }
            }
            parts
        })
        .collect();

    // Every downloaded blob is checked against its digest in the (verified) image manifest,
    // and zstd decodes it into exactly `len` bytes. The whole-file sha256 is computed as well
    // (in offset order, on its own thread, holes hashed as zeros): it checks that the chunks
    // add up to the files manifest.toml describes (a publisher could list chunks of other
    // content), and a resumed pull's bytes that predate this process.
    let sizes: Vec<u64> = image.files.iter().map(|f| f.size).collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<(usize, u64, Bytes)>(opts.jobs.max(1) * 8);
    let hasher = std::thread::spawn(move || crate::hasher::run(sizes, rx));

    progress.start("pulling", total);
    let downloaded = AtomicU64::new(0);
    let journal = Arc::new(Mutex::new(journal));
    let (done, chunks, downloaded) = (&done, &chunks, &downloaded);
    let result: Result<()> = futures::stream::iter(work)
        .map(|ids| {
            let hub = hub.clone();
            let fi = file_of[ids[0]];
            let file = files[fi].clone();
            let journal = journal.clone();
            let store = store.cloned();
            async move {
                let want: Vec<(usize, Chunk)> = ids
                    .iter()
                    .filter(|i| !done.contains(i))
                    .map(|&i| (i, chunks[i].clone()))
                    .collect();
                let batch: Vec<&Chunk> = want.iter().map(|(_, c)| c).collect();
                let (got, n) = chunks::get_chunks(
                    hub.as_ref(),
                    store.as_ref(),
                    &batch,
                    opts.attempts,
                    progress,
                )
                .await?;
                downloaded.fetch_add(n, Ordering::Relaxed);
                progress.advance(ids.iter().map(|&i| chunks[i].stored_size).sum());
                let all: Vec<(usize, Chunk)> =
                    ids.iter().map(|&i| (i, chunks[i].clone())).collect();
                let done: Vec<bool> = ids.iter().map(|i| done.contains(i)).collect();
                tokio::task::spawn_blocking(move || -> Result<Vec<(usize, u64, Bytes)>> {
                    let mut landed =
                        land(&want, got, &file, store.as_deref(), &journal)?.into_iter();
                    // Not in `land`: a lazy pull's readers wait for it to return.
                    start_batch_writeback(&file, &want);
                    let mut out = Vec::with_capacity(all.len());
                    for ((_, c), resumed) in all.iter().zip(done) {
                        let raw = if resumed {
                            let mut buf = vec![0u8; c.len as usize];
                            file.read_exact_at(&mut buf, c.offset)
                                .map_err(HubError::io("cannot read back a resumed chunk"))?;
                            Bytes::from(buf)
                        } else {
                            landed.next().expect("landed in order")
                        };
                        out.push((fi, c.offset, raw));
                    }
                    Ok(out)
                })
                .await
                .map_err(|e| HubError::Invalid(e.to_string()))?
            }
        })
        .buffered(opts.jobs.max(1))
        .try_for_each(|raws| {
            let tx = tx.clone();
            async move {
                for r in raws {
                    tx.send(r)
                        .await
                        .map_err(|_| HubError::Invalid("hasher stopped".into()))?;
                }
                Ok(())
            }
        })
        .await;
    drop(tx);
    let hashes = hasher
        .join()
        .map_err(|_| HubError::Invalid("hasher thread panicked".into()))?;
    progress.finish();
    if let Err(e) = result {
        drop(files);
        free_if_out_of_space(&e, dir);
        return Err(e);
    }
    check_hashes(image, hashes, dir)?;
    Ok(Fetched {
        downloaded: downloaded.load(Ordering::Relaxed),
        resumed,
        cached: store.map_or(0, |s| s.hits()),
    })
}
