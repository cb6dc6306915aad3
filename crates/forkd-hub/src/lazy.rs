//! A lazy pull: the image's files are readable before they are downloaded. A read of a byte
//! range waits for the chunks that cover it, and asks for them first; the rest of the image
//! streams in behind, in the order the image suggests (its working set first, then offsets).
//!
//! Files are written in place in the pull's partial directory, exactly as an eager pull writes
//! them (`fetch`): the same journal, so a lazy pull that was cut resumes like any pull, and the
//! same end: every file's sha256 checked against the manifest before the image is installed.
//! What a reader sees never comes from anywhere but a chunk that matched its digest: a range
//! is served only after every chunk under it was verified, decompressed and written.
//!
//! The reader side is blocking ([`LazyImage::read_at`]): it is called from a FUSE worker
//! thread. The fetching side runs on the pull's tokio runtime ([`LazyImage::run`]).

use crate::cache::Partial;
use crate::chunks::ChunkStore;
use crate::error::{HubError, Result};
use crate::layout::{Chunk, ImageManifest};
use crate::progress::Progress;
use crate::transport::Transport;
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a read waits for its chunks by default before it fails: long enough for a
/// 4 MiB chunk on a very slow link with retries, short enough that a guest is not frozen
/// forever by a hub that stopped answering without closing the connection.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Workers that fetch only chunks a reader waits for, beside the background ones: a demanded
/// chunk must not queue behind a full pipeline of background downloads.
const DEMAND_WORKERS: usize = 4;

/// Why a read of a lazily pulled file failed. Every variant names the chunk.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LazyError {
    #[error("chunk {digest} of {file} at offset {offset} could not be fetched: {reason}")]
    Failed {
        digest: String,
        file: String,
        offset: u64,
        reason: String,
    },
    #[error("chunk {digest} of {file} at offset {offset} did not arrive within {after:?}")]
    Timeout {
        digest: String,
        file: String,
        offset: u64,
        after: Duration,
    },
    #[error("no file {0} in this image")]
    NoFile(usize),
    #[error("cannot read {file}: {source}")]
    Io {
        file: String,
        #[source]
        source: Arc<std::io::Error>,
    },
}

/// While readers are active (one waits for a chunk, or asked within this long, or the pull
/// started this recently), at most [`BACKGROUND_WHILE_DEMANDED`] background downloads run:
/// every background stream shares the link with the chunk a guest is blocked on. Measured with
/// bench/lazy.sh (python-numpy, 100 Mbit/s, 20 ms): a restore's reads come a few hundred ms
/// apart, so a short window let 8 background streams start between two of them, and each
/// demanded 4 MiB chunk then took 0.4-0.8 s instead of about 0.15 s.
const QUIET_AFTER_DEMAND: Duration = Duration::from_secs(2);
const BACKGROUND_WHILE_DEMANDED: usize = 1;

/// Most stored bytes a demand asks for, the demanded chunk included: it and the chunks right
/// after it in the same pack that are not here yet, about what the kernel's read-around of a
/// fault covers (128 KiB raw; compressed chunks make it 250-400 KiB raw). Measured with bench/lazy.sh (playwright-browser, whose faults are scattered): with
/// 1 MiB, 65 MB were demanded before the first answer, mostly neighbours nobody read, each
/// demand queued behind the others on the link; with 128 KiB, 26 MB. python-numpy did not
/// change (2.13 s).
const DEMAND_SPAN: u64 = 128 << 10;

/// The working set is fetched by at most this many requests at once, of at most this many
/// stored bytes each. A demanded chunk queues behind whatever is already on its way over the
/// same link: 8 requests of 4 MiB put up to 32 MiB (2.7 s at 100 Mbit/s) ahead of it, 4 of
/// 256 KiB 1 MiB (84 ms), and four such requests still fill a 100 Mbit/s, 20 ms link. Measured
/// with bench/lazy.sh (three runs each, browser build C): the browser's first answer took
/// 17.5-23.6 s with 37-45% of the image fetched by then, against 22.7-25.4 s and 44-53% at
/// 8 x 4 MiB; two streams left the link idle (19.5 s, 32%), 128 KiB requests were slower
/// (28.7 s); python-numpy was unchanged (2.13-2.15 s). The limit: a link with a larger
/// bandwidth-delay product than 1 MiB (1 Gbit/s at 20 ms) is not filled by the working set;
/// the rest of the image goes at full width once readers are quiet.
const WORKING_SET_STREAMS: usize = 4;
const WORKING_SET_SPAN: u64 = 256 << 10;

enum Pick {
    /// Chunks to fetch together: neighbours in one blob, so one ranged GET.
    Batch(Vec<usize>, Kind),
    /// Nothing to start now (readers are waiting and the background must give way, the
    /// working set already has [`WORKING_SET_STREAMS`] requests out, or a demand worker has no
    /// demand).
    Wait,
    Done,
}

#[derive(Clone, Copy)]
enum Kind {
    Demand,
    Background,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Missing,
    Fetching,
    Present,
}

struct State {
    status: Vec<Status>,
    /// Chunks a reader waits for, oldest first.
    demanded: VecDeque<usize>,
    /// Background order: the working set first (when the image records one), then the rest
    /// by offset.
    order: Vec<usize>,
    cursor: usize,
    present: usize,
    demand_inflight: usize,
    bg_inflight: usize,
    last_demand: Option<Instant>,
    /// Set when the pull gave up: every read of a chunk that is not here fails with it.
    fatal: Option<(usize, String)>,
    /// Chunks a reader has read, and their stored bytes in all.
    touched: Vec<bool>,
    touched_bytes: u64,
}

/// One image being pulled lazily. Shared by the fetch workers and every reader.
pub struct LazyImage {
    image: ImageManifest,
    /// Every listed chunk, as (file index, chunk), files in order and each by offset.
    chunks: Vec<(usize, Chunk)>,
    /// Index of each file's first chunk in `chunks` (and one past the last).
    first: Vec<usize>,
    files: Vec<Arc<File>>,
    journal: Mutex<File>,
    state: Mutex<State>,
    arrived: Condvar,
    wake: tokio::sync::Notify,
    downloaded: AtomicU64,
    /// Stored bytes of the chunks fetched because a reader waited for them.
    demanded_bytes: AtomicU64,
    /// How long readers waited, in microseconds: for chunks they asked for, and for chunks
    /// that were already asked for by another read or on their way (a background download a
    /// reader caught up with).
    waited_asking_us: AtomicU64,
    waited_behind_us: AtomicU64,
    /// How many entries at the front of the background order are the image's working set.
    working_set: usize,
    /// Whether each chunk is in the working set (a working-set batch takes only those).
    in_working_set: Vec<bool>,
    store: Option<Arc<ChunkStore>>,
    resumed: u64,
    read_timeout: Duration,
    opened: Instant,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LazyImage {
    /// Prepare the files of `image` in `dir` (sized, sparse) and take over what an earlier
    /// pull of it already verified (its journal). `first` lists chunk indices (into the
    /// image's chunks, files in order) to fetch before the rest; unknown ones are ignored.
    pub fn open(
        image: &ImageManifest,
        dir: &Partial,
        first: &[usize],
        read_timeout: Duration,
        store: Option<Arc<ChunkStore>>,
    ) -> Result<LazyImage> {
        let (journal, done, files) = crate::fetch::open_partial(image, dir)?;
        let starts = image.chunk_starts();
        let chunks: Vec<(usize, Chunk)> = image
            .files
            .iter()
            .enumerate()
            .flat_map(|(i, f)| f.chunks.iter().map(move |c| (i, c.clone())))
            .collect();
        let status: Vec<Status> = (0..chunks.len())
            .map(|i| {
                if done.contains(&i) {
                    Status::Present
                } else {
                    Status::Missing
                }
            })
            .collect();
        // After the working set: the small files whole (a restore reads the vmstate, the kernel
        // and engine.json before anything else, each in one piece), then the large ones by
        // offset. Measured on python-numpy (bench/lazy.sh): by file order, the vmstate and the
        // kernel were each a blocking wait of 0.5-1 s behind memory.bin's background stream.
        let mut by_size: Vec<usize> = (0..image.files.len()).collect();
        by_size.sort_by_key(|&f| image.files[f].size);
        let rest = by_size
            .into_iter()
            .flat_map(|f| starts[f]..starts[f + 1])
            .collect::<Vec<_>>();
        let mut seen = vec![false; chunks.len()];
        let mut order = Vec::with_capacity(chunks.len());
        let mut working_set = 0;
        for (k, i) in first.iter().copied().chain(rest).enumerate() {
            if i < chunks.len() && !seen[i] {
                seen[i] = true;
                order.push(i);
                if k < first.len() {
                    // Counted once each: a repeated index must not keep the background in
                    // its working-set mode longer than the working set lasts.
                    working_set += 1;
                }
            }
        }
        let resumed = done.iter().map(|&i| chunks[i].1.stored_size).sum();
        let mut in_working_set = vec![false; chunks.len()];
        for &i in &order[..working_set] {
            in_working_set[i] = true;
        }
        Ok(LazyImage {
            image: image.clone(),
            first: starts,
            files,
            journal: Mutex::new(journal),
            state: Mutex::new(State {
                present: done.len(),
                status,
                demanded: VecDeque::new(),
                order,
                cursor: 0,
                fatal: None,
                demand_inflight: 0,
                bg_inflight: 0,
                last_demand: None,
                touched: vec![false; chunks.len()],
                touched_bytes: 0,
            }),
            chunks,
            arrived: Condvar::new(),
            wake: tokio::sync::Notify::new(),
            downloaded: AtomicU64::new(0),
            demanded_bytes: AtomicU64::new(0),
            waited_asking_us: AtomicU64::new(0),
            waited_behind_us: AtomicU64::new(0),
            working_set,
            in_working_set,
            store,
            resumed,
            read_timeout,
            opened: Instant::now(),
        })
    }

    pub fn image(&self) -> &ImageManifest {
        &self.image
    }

    /// Bytes downloaded so far (stored, compressed sizes).
    pub fn downloaded(&self) -> u64 {
        self.downloaded.load(Ordering::Relaxed)
    }

    /// Bytes here so far: downloaded, plus what an interrupted pull had verified.
    pub fn fetched(&self) -> u64 {
        self.downloaded() + self.resumed
    }

    /// Bytes downloaded because a reader waited for them.
    pub fn demanded(&self) -> u64 {
        self.demanded_bytes.load(Ordering::Relaxed)
    }

    /// How long readers have waited so far, failed reads included: (for chunks they asked for,
    /// for chunks another read had asked for or that were being downloaded when they came).
    /// Summed over readers, so it can exceed the wall clock.
    pub fn waited(&self) -> (Duration, Duration) {
        let us = |a: &AtomicU64| Duration::from_micros(a.load(Ordering::Relaxed));
        (us(&self.waited_asking_us), us(&self.waited_behind_us))
    }

    /// Stored bytes of the distinct chunks readers have read so far.
    pub fn touched(&self) -> u64 {
        lock(&self.state).touched_bytes
    }

    /// Bytes that were already verified here by an earlier, interrupted pull.
    pub fn resumed(&self) -> u64 {
        self.resumed
    }

    /// The chunks (flat indices) of file `file` that overlap `[offset, offset + len)`.
    fn covering(&self, file: usize, offset: u64, len: u64) -> std::ops::Range<usize> {
        let r = self.image.files[file].covering(offset, len);
        self.first[file] + r.start..self.first[file] + r.end
    }

    fn describe(&self, i: usize) -> (String, String, u64) {
        let (f, c) = &self.chunks[i];
        (
            c.digest.clone(),
            self.image.files[*f].name.clone(),
            c.offset,
        )
    }

    /// Wait until every chunk under `[offset, offset + len)` of file `file` is here, asking
    /// for the missing ones first.
    pub fn ensure(&self, file: usize, offset: u64, len: u64) -> Result<(), LazyError> {
        if file >= self.files.len() {
            return Err(LazyError::NoFile(file));
        }
        let range = self.covering(file, offset, len);
        let deadline = Instant::now() + self.read_timeout;
        let mut st = lock(&self.state);
        let mut asked = false;
        for i in range.clone() {
            if !st.touched[i] {
                st.touched[i] = true;
                st.touched_bytes += self.chunks[i].1.stored_size;
            }
            if st.status[i] == Status::Missing && !st.demanded.contains(&i) {
                st.demanded.push_back(i);
                asked = true;
            }
        }
        if asked {
            self.wake.notify_waiters();
        }
        let t0 = Instant::now();
        let mut waited = false;
        let result = loop {
            let Some(missing) = range.clone().find(|&i| st.status[i] != Status::Present) else {
                break Ok(());
            };
            waited = true;
            if let Some((at, why)) = &st.fatal {
                let (digest, file, offset) = self.describe(missing);
                let reason = if *at == missing {
                    why.clone()
                } else {
                    format!("the pull stopped: {why}")
                };
                break Err(LazyError::Failed {
                    digest,
                    file,
                    offset,
                    reason,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                let (digest, file, offset) = self.describe(missing);
                break Err(LazyError::Timeout {
                    digest,
                    file,
                    offset,
                    after: self.read_timeout,
                });
            }
            st = self
                .arrived
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        drop(st);
        if waited {
            // Failed and timed-out reads count too: they are the longest waits.
            let took = t0.elapsed();
            let sum = if asked {
                &self.waited_asking_us
            } else {
                &self.waited_behind_us
            };
            sum.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
            tracing::debug!(
                "read of {} at {offset}+{len} waited {took:?} for chunks {range:?} ({}, {})",
                self.image.files[file].name,
                if asked {
                    "asked"
                } else {
                    "already asked or on its way"
                },
                if result.is_ok() { "here" } else { "failed" }
            );
        }
        result
    }

    /// Read up to `len` bytes of file `file` at `offset`, once the chunks under them are here
    /// (holes read as zeros). Short only at the end of the file.
    pub fn read_at(&self, file: usize, offset: u64, len: usize) -> Result<Vec<u8>, LazyError> {
        let Some(entry) = self.image.files.get(file) else {
            return Err(LazyError::NoFile(file));
        };
        let len = (len as u64).min(entry.size.saturating_sub(offset));
        self.ensure(file, offset, len)?;
        let mut buf = vec![0u8; len as usize];
        self.files[file]
            .read_exact_at(&mut buf, offset)
            .map_err(|e| LazyError::Io {
                file: entry.name.clone(),
                source: Arc::new(e),
            })?;
        Ok(buf)
    }

    /// Mark chunk `i` and the missing chunks right after it that lie next to it in the same
    /// blob (at most `span` stored bytes in all, and only those `take` allows) as fetching.
    fn claim(
        &self,
        st: &mut State,
        i: usize,
        span: u64,
        take: impl Fn(usize) -> bool,
    ) -> Vec<usize> {
        st.status[i] = Status::Fetching;
        let mut batch = vec![i];
        let start = self.chunks[i].1.location().1.start;
        let mut last = i;
        while last + 1 < self.chunks.len()
            && st.status[last + 1] == Status::Missing
            && self.chunks[last + 1].0 == self.chunks[i].0
            && take(last + 1)
            && crate::chunks::adjacent(&self.chunks[last].1, &self.chunks[last + 1].1, start)
            && self.chunks[last + 1].1.location().1.end - start <= span
        {
            last += 1;
            st.status[last] = Status::Fetching;
            batch.push(last);
        }
        batch
    }

    /// The next chunks to fetch: a demanded one, else (unless `demand_only`) the next in the
    /// background order, unless readers are waiting (see [`Pick::Wait`]); each with the
    /// neighbours that come in the same ranged GET.
    fn pick(&self, demand_only: bool) -> Pick {
        let mut st = lock(&self.state);
        if st.fatal.is_some() {
            return Pick::Done;
        }
        while let Some(i) = st.demanded.pop_front() {
            if st.status[i] == Status::Missing {
                let batch = self.claim(&mut st, i, DEMAND_SPAN, |_| true);
                st.demand_inflight += 1;
                st.last_demand = Some(Instant::now());
                return Pick::Batch(batch, Kind::Demand);
            }
        }
        if demand_only {
            return if st.present == self.chunks.len() {
                Pick::Done
            } else {
                Pick::Wait
            };
        }
        // The working set is fetched beside readers (they are about to need it), by a few
        // short requests (see WORKING_SET_STREAMS).
        let in_working_set = st.cursor < self.working_set;
        // Readers are active: one waits, or one asked recently (or the pull just started and
        // the first reads are on their way).
        let busy = st.demand_inflight > 0
            || st.last_demand.unwrap_or(self.opened).elapsed() < QUIET_AFTER_DEMAND;
        if !in_working_set && busy && st.bg_inflight >= BACKGROUND_WHILE_DEMANDED {
            return Pick::Wait;
        }
        if in_working_set && st.bg_inflight >= WORKING_SET_STREAMS {
            return Pick::Wait;
        }
        while st.cursor < st.order.len() {
            let i = st.order[st.cursor];
            let ws = self.in_working_set[i];
            // The working set may end here (its last chunks came by demand): past it, the
            // rule for readers holds again.
            if !ws && busy && st.bg_inflight >= BACKGROUND_WHILE_DEMANDED {
                return Pick::Wait;
            }
            st.cursor += 1;
            if st.status[i] == Status::Missing {
                let span = if ws {
                    WORKING_SET_SPAN
                } else {
                    crate::chunks::MAX_SPAN
                };
                let batch = self.claim(&mut st, i, span, |j| !ws || self.in_working_set[j]);
                st.bg_inflight += 1;
                return Pick::Batch(batch, Kind::Background);
            }
        }
        Pick::Done
    }

    /// Stop the pull: chunk `at` (if it is one) could not be fetched, for `why`. The first
    /// reason stays; every waiting and future read of a chunk that is not here fails with it.
    fn stop(&self, at: usize, why: String) {
        let mut st = lock(&self.state);
        if let Some(s) = st.status.get_mut(at) {
            *s = Status::Missing;
        }
        if st.fatal.is_none() {
            st.fatal = Some((at, why));
        }
        drop(st);
        self.arrived.notify_all();
        self.wake.notify_waiters();
    }

    async fn fetch_batch(
        self: &Arc<Self>,
        ids: &[usize],
        hub: &dyn Transport,
        attempts: u32,
        progress: &dyn Progress,
    ) -> Result<u64> {
        let batch: Vec<(usize, Chunk)> =
            ids.iter().map(|&i| (i, self.chunks[i].1.clone())).collect();
        let refs: Vec<&Chunk> = batch.iter().map(|(_, c)| c).collect();
        let (got, n) =
            crate::chunks::get_chunks(hub, self.store.as_ref(), &refs, attempts, progress).await?;
        self.downloaded.fetch_add(n, Ordering::Relaxed);
        let stored: u64 = refs.iter().map(|c| c.stored_size).sum();
        progress.advance(stored);
        let me = self.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let file = &me.files[me.chunks[batch[0].0].0];
            crate::fetch::land(&batch, got, file, me.store.as_deref(), &me.journal)?;
            Ok(())
        })
        .await
        .map_err(|e| HubError::Invalid(e.to_string()))??;
        let mut st = lock(&self.state);
        for &i in ids {
            st.status[i] = Status::Present;
        }
        st.present += ids.len();
        drop(st);
        self.arrived.notify_all();
        self.wake.notify_waiters();
        Ok(n)
    }

    async fn worker(
        self: Arc<Self>,
        hub: Arc<dyn Transport>,
        attempts: u32,
        demand_only: bool,
        progress: &dyn Progress,
    ) -> Result<()> {
        loop {
            // Registered before looking, so a demand made in between is not missed.
            let woken = self.wake.notified();
            match self.pick(demand_only) {
                Pick::Batch(ids, kind) => {
                    let r = self
                        .fetch_batch(&ids, hub.as_ref(), attempts, progress)
                        .await;
                    let mut st = lock(&self.state);
                    match kind {
                        Kind::Demand => {
                            st.demand_inflight -= 1;
                            if let Ok(n) = r {
                                self.demanded_bytes.fetch_add(n, Ordering::Relaxed);
                            }
                        }
                        Kind::Background => st.bg_inflight -= 1,
                    }
                    if r.is_err() {
                        // The others of the batch are missing again; the first names the error.
                        for &i in &ids[1..] {
                            st.status[i] = Status::Missing;
                        }
                    }
                    drop(st);
                    if let Err(e) = r {
                        self.stop(ids[0], e.to_string());
                        return Err(e);
                    }
                }
                Pick::Done => return Ok(()),
                // A background worker held back while readers wait looks again soon: the
                // demand may be over without anything arriving to wake it.
                Pick::Wait if demand_only => woken.await,
                Pick::Wait => {
                    let _ = tokio::time::timeout(Duration::from_millis(100), woken).await;
                }
            }
        }
    }

    /// Fetch every chunk that is not here yet (demanded ones first), then check every file's
    /// sha256 against the manifest. On error, readers waiting for a chunk that is not here
    /// are failed with it; what was verified stays in the journal for the next pull, unless
    /// a whole file did not match (then `dir` is removed).
    pub async fn run(
        self: &Arc<Self>,
        hub: Arc<dyn Transport>,
        jobs: usize,
        attempts: u32,
        dir: &Partial,
        progress: &dyn Progress,
    ) -> Result<crate::fetch::Fetched> {
        let total = self.image.stored_size();
        progress.start("pulling", total);
        progress.advance(self.resumed);
        let background =
            (0..jobs.max(1)).map(|_| self.clone().worker(hub.clone(), attempts, false, progress));
        let demand =
            (0..DEMAND_WORKERS).map(|_| self.clone().worker(hub.clone(), attempts, true, progress));
        let results = futures::future::join_all(background.chain(demand)).await;
        progress.finish();
        if let Some(e) = results.into_iter().find_map(|r| r.err()) {
            // Readers hold their descriptors: they see only verified chunks, and fail on the
            // rest.
            crate::fetch::free_if_out_of_space(&e, dir);
            return Err(e);
        }
        if let Some((_, why)) = lock(&self.state).fatal.clone() {
            // Abandoned, not failed: the files are incomplete, and the journal keeps what was
            // verified for the next pull.
            return Err(HubError::Abandoned(why));
        }
        // Every chunk was verified on arrival; the whole files are checked too, read back
        // (their chunks arrived out of order, so they could not be hashed as they came).
        let me = self.clone();
        let hashes = match tokio::task::spawn_blocking(move || me.hash_files())
            .await
            .map_err(|e| HubError::Invalid(e.to_string()))?
        {
            Ok(h) => h,
            Err(e) => {
                // What cannot be read back cannot be trusted either: start over next time.
                let _ = std::fs::remove_dir_all(dir.path());
                return Err(e);
            }
        };
        crate::fetch::check_hashes(&self.image, hashes, dir)?;
        Ok(crate::fetch::Fetched {
            downloaded: self.downloaded(),
            resumed: self.resumed,
            cached: self.store.as_ref().map_or(0, |s| s.hits()),
        })
    }

    fn hash_files(&self) -> Result<Vec<String>> {
        self.image
            .files
            .iter()
            .zip(&self.files)
            .map(|(f, file)| {
                forkd_store::sparse::hash_file(file)
                    .map(|(_, h)| h)
                    .map_err(HubError::io(format!("cannot hash {}", f.name)))
            })
            .collect()
    }

    /// Fail every waiting and future read of a chunk that is not here (the pull was
    /// abandoned).
    pub fn abandon(&self, why: &str) {
        self.stop(usize::MAX, why.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout;

    fn manifest(chunks: &[(u64, u64)], size: u64) -> ImageManifest {
        ImageManifest {
            layout: 1,
            media_type: layout::MEDIA_TYPE.into(),
            chunking: layout::Chunking::fastcdc(),
            compression: "zstd".into(),
            manifest_toml: String::new(),
            files: vec![layout::FileEntry {
                name: "memory.bin".into(),
                size,
                sha256: String::new(),
                chunking: None,
                chunks: chunks
                    .iter()
                    .map(|&(offset, len)| Chunk {
                        offset,
                        len,
                        digest: format!("sha256:{offset}"),
                        stored_size: 1,
                        pack: None,
                        pack_offset: None,
                    })
                    .collect(),
            }],
            parent: None,
            working_set: None,
        }
    }

    #[test]
    fn covering_finds_the_chunks_under_a_range() {
        let home = tempfile::tempdir().unwrap();
        let home = forkd_store::Home::new(home.path());
        let dir = crate::cache::Cache::new(&home)
            .partial("sha256:00")
            .unwrap();
        // Chunks at 0..4, 8..12, 12..16; 4..8 is a hole.
        let m = manifest(&[(0, 4), (8, 4), (12, 4)], 16);
        let img = LazyImage::open(&m, &dir, &[2], Duration::from_secs(1), None).unwrap();
        assert_eq!(img.covering(0, 0, 1), 0..1);
        assert_eq!(img.covering(0, 3, 2), 0..1, "3..5 ends in the hole");
        assert_eq!(img.covering(0, 4, 4), 1..1, "the hole alone needs no chunk");
        assert_eq!(img.covering(0, 7, 6), 1..3);
        assert_eq!(img.covering(0, 0, 16), 0..3);
        assert_eq!(img.covering(0, 16, 4), 3..3);
        // The working set goes first.
        assert_eq!(lock(&img.state).order, vec![2, 0, 1]);
        // A read of the hole needs nothing; a read of a chunk times out naming it.
        assert_eq!(img.read_at(0, 4, 4).unwrap(), vec![0; 4]);
        match img.read_at(0, 8, 1) {
            Err(LazyError::Timeout { digest, offset, .. }) => {
                assert_eq!(digest, "sha256:8");
                assert_eq!(offset, 8);
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        img.abandon("gone");
        match img.read_at(0, 0, 1) {
            Err(LazyError::Failed { reason, .. }) => assert!(reason.contains("gone"), "{reason}"),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn a_working_set_becomes_chunk_indices_in_first_touch_order() {
        use forkd_store::workingset::{Touch, WorkingSet};
        let mut m = manifest(&[(0, 4), (8, 4), (12, 4)], 16);
        let t = |file: &str, offset, len| Touch {
            file: file.into(),
            offset,
            len,
        };
        let ws = WorkingSet {
            version: 1,
            touches: vec![
                t("memory.bin", 9, 1),
                t("rootfs.ext4", 0, 4),
                t("memory.bin", 4, 4),
                t("memory.bin", 0, 16),
            ],
        };
        assert_eq!(m.working_set_of(&ws), vec![1, 0, 2]);
        // What a hub says is only a hint: indices past the chunks are dropped.
        m.working_set = Some(vec![2, 7, 0, u32::MAX]);
        assert_eq!(m.working_set(), vec![2, 0]);
        // Kept beside a pulled image as ranges, it maps back to the same chunks.
        let kept = m.working_set_touches().unwrap();
        assert_eq!(m.working_set_of(&kept), vec![2, 0]);
    }
}
