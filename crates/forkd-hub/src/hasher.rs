//! Whole-file sha256 computed while the pull runs: chunks arrive in offset order (the pipeline
//! yields them in order, N in flight), holes between them are hashed as zeros.

use bytes::Bytes;
use sha2::{Digest, Sha256};

static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

fn zeros(h: &mut Sha256, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64);
        h.update(&ZEROS[..k as usize]);
        n -= k;
    }
}

/// Receives `(file index, offset, raw bytes)` in order; returns each file's sha256 hex.
pub fn run(
    sizes: Vec<u64>,
    mut rx: tokio::sync::mpsc::Receiver<(usize, u64, Bytes)>,
) -> Vec<String> {
    let mut out = Vec::with_capacity(sizes.len());
    let mut cur = 0usize;
    let mut pos = 0u64;
    let mut h = Sha256::new();
    let finish_until =
        |target: usize, cur: &mut usize, pos: &mut u64, h: &mut Sha256, out: &mut Vec<String>| {
            while *cur < target {
                zeros(h, sizes[*cur] - *pos);
                out.push(hex::encode(std::mem::take(h).finalize()));
                *cur += 1;
                *pos = 0;
            }
        };
    while let Some((idx, offset, data)) = rx.blocking_recv() {
        finish_until(idx, &mut cur, &mut pos, &mut h, &mut out);
        zeros(&mut h, offset - pos);
        h.update(&data);
        pos = offset + data.len() as u64;
    }
    finish_until(sizes.len(), &mut cur, &mut pos, &mut h, &mut out);
    out
}
