//! How many children may be *starting* at once.
//!
//! Under TCG a starting child is CPU-bound (QEMU start-up, loading the device state, and
//! translating every guest code path the resumed kernel runs), while a ready child is nearly
//! idle. Starting all N at once makes them thrash on the host's few cores, so each child holds
//! a slot only from launch until its agent is ready, never while it works: a slow `--exec`
//! does not hold others back. Measured on the 2-core TCG machine, 100 tiny children, quiet
//! host: no limit 9.7 s, 16 → 7.9 s, 8 → 7.3 s, 4 → 6.9 s (bench/RESULTS.md).

use std::sync::{Condvar, Mutex};

/// `FORKD_MAX_STARTING` if set (0 = no limit), else twice the host's cores.
pub fn max_starting() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    match std::env::var("FORKD_MAX_STARTING")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        Some(0) => usize::MAX,
        Some(n) => n,
        None => 2 * cores,
    }
}

/// A counting semaphore: at most `max` holders of a [`StartSlot`] at a time.
pub struct StartGate {
    used: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

/// Held by one starting child; dropping it lets the next one start.
pub struct StartSlot<'a>(&'a StartGate);

impl StartGate {
    pub fn new(max: usize) -> StartGate {
        StartGate {
            used: Mutex::new(0),
            freed: Condvar::new(),
            max: max.max(1),
        }
    }

    /// Wait for a free slot.
    pub fn enter(&self) -> StartSlot<'_> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used >= self.max {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += 1;
        StartSlot(self)
    }
}

impl Drop for StartSlot<'_> {
    fn drop(&mut self) {
        *self.0.used.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn never_more_than_max_holders() {
        let gate = StartGate::new(3);
        let now = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..12 {
                s.spawn(|| {
                    let _slot = gate.enter();
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    now.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        assert_eq!(peak.load(Ordering::SeqCst), 3);
    }
}
