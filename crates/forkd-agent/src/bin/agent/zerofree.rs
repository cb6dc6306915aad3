//! Zero the guest's free memory before the parent is saved.
//!
//! A page the kernel freed keeps whatever it last held: the unpacked initramfs, boot-time page
//! cache, a warm-up's temporary objects. The snapshot saves guest RAM whole, so those stale
//! bytes were pushed, downloaded and (lazily) fetched like live ones, and two builds of one
//! recipe differ in them. Here the agent takes the free memory itself, which makes the kernel
//! hand it out zeroed, and gives it back: the pages are free and zero, and zero pages are holes
//! on the hub. It leaves `margin` free, so the kernel never reclaims page cache the warm-up
//! loaded (or kills anything) to satisfy it.

use crate::Failure;
use std::io::Read;

/// Memory is taken this much at a time, checking for reclaim in between.
const STEP: usize = 4 << 20;
/// Least memory left free: well above the kernel's reclaim watermarks on small guests.
const MIN_MARGIN: u64 = 16 << 20;
/// Longest /proc file read.
const MAX_PROC: u64 = 64 << 10;

fn read_proc(path: &str) -> std::io::Result<String> {
    let mut s = String::new();
    std::fs::File::open(path)?
        .take(MAX_PROC)
        .read_to_string(&mut s)?;
    Ok(s)
}

/// `MemFree` from /proc/meminfo, in bytes.
fn mem_free() -> Result<u64, Failure> {
    let text =
        read_proc("/proc/meminfo").map_err(|e| Failure::io("cannot read /proc/meminfo", &e))?;
    parse_mem_free(&text).ok_or_else(|| Failure::bad("/proc/meminfo has no MemFree line"))
}

fn parse_mem_free(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemFree:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Memory to leave free: four times `vm.min_free_kbytes` (the kernel starts reclaiming a
/// little above it), and at least [`MIN_MARGIN`].
fn margin() -> u64 {
    let min_free = read_proc("/proc/sys/vm/min_free_kbytes")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .saturating_mul(1024);
    min_free.saturating_mul(4).max(MIN_MARGIN)
}

/// A private anonymous mapping, unmapped when dropped.
struct Taken(*mut libc::c_void);

impl Drop for Taken {
    fn drop(&mut self) {
        // SAFETY: self.0 is a mapping of STEP bytes made by `take` and not unmapped elsewhere.
        unsafe {
            libc::munmap(self.0, STEP);
        }
    }
}

/// Map and populate STEP bytes: the kernel zeroes every page it hands out.
fn take() -> Option<Taken> {
    // SAFETY: a new anonymous mapping at an address the kernel picks; no existing memory is
    // touched. MAP_POPULATE faults every page in (zero-filled) before mmap returns.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            STEP,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(Taken(p))
}

/// Counters in /proc/vmstat that move when the kernel reclaims memory or kills for it.
fn reclaim_count() -> u64 {
    let Ok(text) = read_proc("/proc/vmstat") else {
        return 0;
    };
    reclaim_in(&text)
}

fn reclaim_in(vmstat: &str) -> u64 {
    vmstat
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| {
            k.starts_with("pgscan_") || k.starts_with("allocstall") || *k == "oom_kill"
        })
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .fold(0u64, u64::saturating_add)
}

/// Take free memory down to the margin, then give it back. Returns the bytes zeroed.
///
/// The budget is `MemFree` less the margin, read once: part of `MemFree` is the zones'
/// reserves, which an allocation cannot have, and taking past them makes the kernel reclaim
/// page cache, which raises `MemFree` again. As a second guard it stops as soon as the kernel
/// starts reclaiming (a populate that fails is not reported by mmap, so nothing else would).
pub fn run() -> Result<u64, Failure> {
    let budget = mem_free()?.saturating_sub(margin());
    let reclaimed = reclaim_count();
    let mut held = Vec::new();
    while ((held.len() + 1) * STEP) as u64 <= budget {
        match take() {
            Some(t) => held.push(t),
            None => break,
        }
        if reclaim_count() != reclaimed {
            break;
        }
    }
    Ok((held.len() * STEP) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_free_is_read_in_bytes() {
        let m = "MemTotal:         223620 kB\nMemFree:          147896 kB\nMemAvailable: 1 kB\n";
        assert_eq!(parse_mem_free(m), Some(147_896 * 1024));
        assert_eq!(parse_mem_free("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_mem_free("MemFree: lots kB\n"), None);
    }

    #[test]
    fn reclaim_counters_are_summed() {
        let v = "nr_free_pages 100\npgscan_kswapd 3\npgscan_direct 4\nallocstall_normal 1\n\
                 oom_kill 2\npgsteal_kswapd 50\n";
        assert_eq!(reclaim_in(v), 10);
        assert_eq!(reclaim_in(""), 0);
    }

    #[test]
    fn a_mapping_is_zero_and_the_margin_is_at_least_the_minimum() {
        let t = take().expect("4 MiB");
        // SAFETY: `t` maps STEP readable bytes for as long as it lives.
        let bytes = unsafe { std::slice::from_raw_parts(t.0 as *const u8, STEP) };
        assert!(bytes.iter().all(|b| *b == 0));
        assert!(margin() >= MIN_MARGIN);
    }
}
