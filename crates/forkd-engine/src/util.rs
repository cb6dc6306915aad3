//! Small helpers: hashing, random bytes, tail of a log, shell quoting, interrupt flag.

use crate::error::{IoCtx, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// sha256 of a file's logical content, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).at("cannot open", path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).at("cannot read", path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// `n` bytes from the host's kernel RNG (`getrandom(2)`). These seed every child's RNG and
/// name sessions, so a failure is an error: zeros would give every child the same "entropy".
pub fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    fill_random(&mut v).map_err(|source| crate::error::EngineError::Io {
        what: "cannot read random bytes from",
        path: "getrandom(2)".into(),
        source,
    })?;
    Ok(v)
}

/// Fill `buf` from the kernel RNG, or fail.
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match rustix::rand::getrandom(&mut buf[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(k) => filled += k,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The last `lines` lines of a text file (empty if unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Quote a path for `sh -c` (used in QEMU's `exec:` migration URIs).
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A flag set by SIGINT/SIGTERM, so long operations can stop and clean up.
#[derive(Clone)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// Register SIGINT, SIGTERM and SIGHUP (a closed terminal or ssh session) to set the flag
    /// instead of killing the process, so its VMs are stopped and their directories removed.
    pub fn install() -> Interrupt {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ] {
            // A second signal, while the first is still being handled, exits at once (130).
            let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone());
            if let Err(e) = signal_hook::flag::register(sig, flag.clone()) {
                tracing::warn!("cannot handle signal {sig}: {e}");
            }
        }
        Interrupt(flag)
    }
    /// A flag nobody sets (for library callers that handle signals themselves).
    pub fn never() -> Interrupt {
        Interrupt(Arc::new(AtomicBool::new(false)))
    }
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed)
    }
}

/// Stop QEMU processes started from now on from using transparent huge pages. QEMU asks for
/// huge pages on its TCG code buffer (MADV_HUGEPAGE), so touching a few KiB of it costs 2 MiB
/// per page in every child. The setting is inherited across fork and exec.
pub fn disable_thp_for_children() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and only changes a flag of
    // this process; it touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::debug!("PR_SET_THP_DISABLE: {}", std::io::Error::last_os_error());
    }
}

/// Read one line (without its newline) into `out`, refusing lines over `max` bytes.
/// `Ok(false)` at EOF (a partial last line is dropped).
pub(crate) fn read_line_capped(
    r: &mut impl std::io::BufRead,
    out: &mut Vec<u8>,
    max: usize,
) -> Result<bool, String> {
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("receive: {e}")),
        };
        if buf.is_empty() {
            return Ok(false);
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if out.len() + take > max {
            return Err(format!(
                "the other side sent a line longer than {max} bytes"
            ));
        }
        out.extend_from_slice(&buf[..take]);
        r.consume(take + usize::from(done));
        if done {
            return Ok(true);
        }
    }
}

/// Set up what a VM's process (QEMU, or its network back end) gets between fork and exec: a
/// umask of 0177, so the sockets and files it makes (QMP, agent, serial, a parent's
/// memory.bin) are 0600 whatever forkd's umask; and, when `tied`, `PR_SET_PDEATHSIG(SIGKILL)`,
/// so it dies with the thread that spawned it.
pub(crate) fn private_and_tied(cmd: &mut std::process::Command, tied: bool) {
    use rustix::process::{Signal, getpid, getppid, set_parent_process_death_signal, umask};
    use std::os::unix::process::CommandExt;
    let spawner = getpid();
    // SAFETY: the closure runs in the forked child before exec. It only makes system calls
    // that are async-signal-safe (umask, prctl, getppid) and allocates nothing: the io::Error
    // values it may return are an OS error code or a bare kind.
    unsafe {
        cmd.pre_exec(move || {
            umask(rustix::fs::Mode::from_raw_mode(0o177));
            if tied {
                set_parent_process_death_signal(Some(Signal::KILL))?;
                // If forkd died before the prctl, no signal will come: give up now.
                if getppid() != Some(spawner) {
                    return Err(std::io::ErrorKind::BrokenPipe.into());
                }
            }
            Ok(())
        });
    }
}
