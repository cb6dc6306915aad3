//! Host memory: what is available, and what N children are expected to cost.

use crate::error::{Capacity, EngineError, Result};
use crate::spec::VmSpec;

/// QEMU's own cost per child (binary, heap, TCG code cache, device state), in MiB, measured
/// with smaps on a tiny child (see bench/RESULTS.md).
pub const QEMU_OVERHEAD_MIB: u64 = 24;

/// `MemAvailable` from /proc/meminfo, in MiB.
pub fn mem_available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

/// Expected PSS of one child: QEMU's own overhead plus the guest pages it will dirty (a
/// child writes a small part of its RAM; we budget one eighth) — deliberately pessimistic.
pub fn per_child_estimate_mib(spec: &VmSpec) -> u64 {
    QEMU_OVERHEAD_MIB + spec.mem_mib.div_ceil(8)
}

/// Refuse `n` children up front when their estimate exceeds 90 % of MemAvailable.
pub fn check_capacity(spec: &VmSpec, n: usize) -> Result<u64> {
    let per = per_child_estimate_mib(spec);
    let need = per.saturating_mul(n as u64);
    let avail = mem_available_mib().unwrap_or(u64::MAX / 2);
    let budget = avail / 10 * 9;
    // One child may grow to its cgroup limit (guest RAM plus QEMU): it must fit on its own.
    let limit = crate::cgroup::Limits::for_guest(spec.mem_mib).map_or(u64::MAX, |l| l.memory_mib());
    if limit > budget {
        return Err(EngineError::Capacity(Box::new(Capacity {
            n,
            per_child_mib: limit,
            qemu_mib: crate::cgroup::QEMU_LIMIT_OVERHEAD_MIB,
            guest_mib: spec.mem_mib,
            need_mib: limit.saturating_mul(n as u64),
            available_mib: avail,
            max_children: 0,
        })));
    }
    if need > budget {
        return Err(EngineError::Capacity(Box::new(Capacity {
            n,
            per_child_mib: per,
            qemu_mib: QEMU_OVERHEAD_MIB,
            guest_mib: spec.mem_mib,
            need_mib: need,
            available_mib: avail,
            max_children: budget / per.max(1),
        })));
    }
    Ok(need)
}
