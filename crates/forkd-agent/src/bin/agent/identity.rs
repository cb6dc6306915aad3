//! `identity`: hostname, RNG reseed and clock step for a freshly forked child.
//!
//! Children of one parent start with the same kernel RNG state and the parent's clock, so each
//! child must be given host entropy (and the CRNG forced to reseed from it) and the time.

use forkd_agent::{IdentityReply, IdentityRequest};
use std::os::fd::AsRawFd;

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: u64 = 0x4008_5203;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)`.
const RNDRESEEDCRNG: u64 = 0x5207;

fn decode_hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err("seed_hex has odd length".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| "seed_hex is not hex".to_string())
        })
        .collect()
}

fn set_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("hostname must be 1-64 bytes".into());
    }
    // SAFETY: the pointer and length describe a live byte slice for the duration of the call.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc != 0 {
        return Err(format!("sethostname: {}", std::io::Error::last_os_error()));
    }
    // Best effort: keep /etc/hostname consistent where the root filesystem is writable.
    if std::path::Path::new("/etc/hostname").exists() {
        let _ = std::fs::write("/etc/hostname", format!("{name}\n"));
    }
    Ok(())
}

fn add_entropy(seed: &[u8]) -> Result<(), String> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("open /dev/urandom: {e}"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u8> = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    info.resize(8 + seed.len().div_ceil(4) * 4, 0);
    // SAFETY: `info` is a valid rand_pool_info (header + buf_size bytes) that outlives the call;
    // the kernel only reads from it.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if rc != 0 {
        // Without CAP_SYS_ADMIN, fall back to mixing the bytes in (uncredited).
        use std::io::Write;
        (&f).write_all(seed)
            .map_err(|e| format!("write /dev/urandom: {e}"))?;
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let _ = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) };
    Ok(())
}

fn step_clock(target_ns: u64) -> Result<i64, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    let ts = libc::timespec {
        tv_sec: (target_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (target_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec that lives for the duration of the call.
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    if rc != 0 {
        return Err(format!(
            "clock_settime: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(((target_ns as i128 - now) / 1_000_000) as i64)
}

pub fn apply(req: &IdentityRequest) -> Result<IdentityReply, String> {
    let mut reply = IdentityReply::default();
    if let Some(ns) = req.time_unix_ns {
        reply.clock_step_ms = step_clock(ns)?;
    }
    if let Some(seed) = &req.seed_hex {
        let bytes = decode_hex(seed)?;
        add_entropy(&bytes)?;
        reply.seeded_bytes = bytes.len();
    }
    if let Some(h) = &req.hostname {
        set_hostname(h)?;
    }
    // Before the link comes up: nothing of the parent's may talk on the child's network.
    reply.tcp_reset = match crate::tcpreset::reset_inherited() {
        Ok(n) => Some(n),
        Err(e) => {
            eprintln!("forkd-agent: cannot reset inherited TCP connections: {e}");
            None
        }
    };
    // Without a network the NIC stays as the parent left it: unplugged, so nothing is routed
    // through it (a branch of a child that had one is unplugged by the host).
    if let Some(net) = &req.net {
        reply.net_iface = Some(crate::net::apply(net)?);
    }
    reply.hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok(reply)
}
