//! Fetching chunks by ranges of the hub's packs, and from the local chunk store
//! ([`crate::chunkstore`]) when it holds them.

pub use crate::chunkstore::{ChunkStore, GcCount};
use crate::error::{HubError, Result};
use crate::layout::Chunk;
use crate::progress::Progress;
use crate::transport::Transport;
use bytes::Bytes;
use std::sync::Arc;

/// Chunks of one pack whose stored bytes lie at most this far apart are fetched in one ranged
/// GET, the gap downloaded and dropped: a round trip (20 ms on the link bench/lazy.sh models)
/// costs more than 64 KiB at 100 Mbit/s (5 ms).
pub const MAX_GAP: u64 = 64 << 10;
/// Largest span one ranged GET asks for: big enough that a pull is a few hundred requests,
/// small enough that 8 of them in flight keep the link busy and a retry repeats little.
pub const MAX_SPAN: u64 = 4 << 20;

/// One ranged GET: consecutive chunks of a batch stored next to each other in one blob.
struct Span {
    key: String,
    start: u64,
    end: u64,
    /// (position in the batch, offset of its bytes from `start`, stored size)
    members: Vec<(usize, u64, u64)>,
}

/// Whether chunk `b` can join a ranged GET that ends with chunk `a` and began at `start`:
/// the same blob, after `a` and close to it, and the whole span not too long.
pub fn adjacent(a: &Chunk, b: &Chunk, start: u64) -> bool {
    let (ka, ra) = a.location();
    let (kb, rb) = b.location();
    ka == kb && rb.start >= ra.end && rb.start - ra.end <= MAX_GAP && rb.end - start <= MAX_SPAN
}

/// The stored bytes of each chunk of `batch`, in order, each checked against its digest
/// later by [`crate::fetch::unpack_chunk`]: from the local store when it has them, else from
/// the hub, chunks that lie next to each other in one blob in one ranged GET. The second
/// value is the number of bytes downloaded.
pub(crate) async fn get_chunks(
    hub: &dyn Transport,
    store: Option<&Arc<ChunkStore>>,
    batch: &[&Chunk],
    attempts: u32,
    progress: &dyn Progress,
) -> Result<(Vec<(Bytes, bool)>, u64)> {
    let mut out: Vec<Option<(Bytes, bool)>> = match store {
        // Reading and hashing what the store holds is file I/O: not on a runtime thread,
        // which the downloads of every other batch share.
        Some(s) => {
            let (s, wanted) = (
                s.clone(),
                batch.iter().map(|&c| c.clone()).collect::<Vec<_>>(),
            );
            tokio::task::spawn_blocking(move || {
                wanted.iter().map(|c| s.get(c).map(|d| (d, true))).collect()
            })
            .await
            .map_err(|e| HubError::Invalid(format!("the chunk store lookup failed: {e}")))?
        }
        None => vec![None; batch.len()],
    };
    let mut spans: Vec<Span> = Vec::new();
    for (i, c) in batch.iter().enumerate() {
        if out[i].is_some() {
            continue;
        }
        let (key, r) = c.location();
        match spans.last_mut() {
            Some(s)
                if s.key == key
                    && r.start >= s.end
                    && r.start - s.end <= MAX_GAP
                    && r.end - s.start <= MAX_SPAN =>
            {
                s.members.push((i, r.start - s.start, c.stored_size));
                s.end = r.end;
            }
            _ => spans.push(Span {
                key,
                start: r.start,
                end: r.end,
                members: vec![(i, 0, c.stored_size)],
            }),
        }
    }
    let mut downloaded = 0;
    let got = futures::future::try_join_all(spans.iter().map(|s| async move {
        let data = crate::remote::get_range_retry(hub, &s.key, s.start..s.end, attempts, progress)
            .await
            .map_err(crate::remote::transport_err(
                hub,
                format!(
                    "cannot download blob {} (bytes {}..{})",
                    s.key, s.start, s.end
                ),
            ))?;
        if data.len() as u64 != s.end - s.start {
            return Err(HubError::Corrupt {
                what: format!("{} bytes {}..{}", s.key, s.start, s.end),
                expected: format!("{} bytes", s.end - s.start),
                actual: format!("{} bytes", data.len()),
            });
        }
        Ok::<_, HubError>(data)
    }))
    .await?;
    for (s, data) in spans.iter().zip(got) {
        downloaded += data.len() as u64;
        for &(i, at, len) in &s.members {
            out[i] = Some((data.slice(at as usize..(at + len) as usize), false));
        }
    }
    Ok((
        out.into_iter()
            .map(|o| o.expect("every chunk got"))
            .collect(),
        downloaded,
    ))
}
