//! The one place that waits for child processes.
//!
//! The agent is PID 1 in the VM (and a child subreaper elsewhere), so every orphan in the guest
//! becomes its child and must be reaped, or zombies pile up in long-lived children. A reaper
//! that calls `waitpid(-1)` would race with code that waits for its own children by pid, so
//! nothing else in the agent calls `wait`: processes are started with [`spawn`], which
//! registers the pid under the same lock the reaper takes to reap, and the reaper hands each
//! status to the [`Watch`] of that pid. Statuses of unregistered pids (orphans) are dropped.
//!
//! The reaper thread sleeps in `sigtimedwait` for SIGCHLD, which is blocked in every thread
//! (so it stays pending even for PID 1, where an unhandled SIGCHLD would be discarded), with a
//! slow fallback sweep in case a signal is ever lost.

use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// How often the reaper sweeps even without a SIGCHLD.
const FALLBACK_SWEEP: Duration = Duration::from_secs(5);

struct Reaper {
    /// Registered pids; `Some(raw wait status)` once reaped.
    watched: Mutex<HashMap<i32, Option<i32>>>,
    reaped: Condvar,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set before sigaddset reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Start the reaper. Call first thing in `main`, before any other thread exists: it blocks
/// SIGCHLD (for the reaper) and SIGIO (for the port's `sigtimedwait`) in the calling thread,
/// and threads started later inherit that mask. Children get an empty mask (std resets it).
pub fn init() {
    let set = signal_set(&[libc::SIGCHLD, libc::SIGIO]);
    // SAFETY: `set` is a valid initialised sigset_t; prctl and getpid take plain integers.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if libc::getpid() != 1 {
            // Not init: become a subreaper so orphans of our commands still come to us.
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
    }
    reaper();
}

fn reaper() -> &'static Reaper {
    REAPER.get_or_init(|| {
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(reap_forever)
            .expect("starting the reaper thread");
        Reaper {
            watched: Mutex::new(HashMap::new()),
            reaped: Condvar::new(),
        }
    })
}

fn lock() -> MutexGuard<'static, HashMap<i32, Option<i32>>> {
    reaper().watched.lock().unwrap_or_else(|p| p.into_inner())
}

fn reap_forever() {
    let set = signal_set(&[libc::SIGCHLD]);
    let ts = libc::timespec {
        tv_sec: FALLBACK_SWEEP.as_secs() as libc::time_t,
        tv_nsec: 0,
    };
    loop {
        sweep();
        // SAFETY: `set` and `ts` are initialised and outlive the call; null siginfo is allowed.
        unsafe {
            libc::sigtimedwait(&set, std::ptr::null_mut(), &ts);
        }
    }
}

/// Reap every exited child; hand statuses of registered pids to their watchers.
fn sweep() {
    let r = reaper();
    let mut watched = lock();
    let mut any = false;
    loop {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG writes only to `status`, a local we own.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            break; // 0: children remain but none exited; -1: no children (ECHILD) or EINTR
        }
        if let Some(slot) = watched.get_mut(&pid) {
            *slot = Some(status);
            any = true;
        }
    }
    drop(watched);
    if any {
        r.reaped.notify_all();
    }
}

/// A registered child: its exit status arrives from the reaper.
pub struct Watch {
    pid: i32,
    /// A pidfd for the child (readable once it exits), if the kernel has `pidfd_open`.
    pub pidfd: Option<OwnedFd>,
}

/// Spawn `cmd` and register its pid before the reaper can see it exit.
pub fn spawn(cmd: &mut Command) -> std::io::Result<(Child, Watch)> {
    let mut watched = lock();
    // While we hold the lock the reaper cannot reap, so std's own wait in a failed spawn
    // succeeds, and the pid cannot be reused before it is registered and its pidfd opened.
    let child = cmd.spawn()?;
    let pid = child.id() as i32;
    watched.insert(pid, None);
    // SAFETY: pidfd_open takes a pid and flags and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let pidfd = if fd >= 0 {
        // SAFETY: a successful pidfd_open returned a new descriptor that nothing else owns.
        Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    } else {
        None // kernel older than 5.3: the exec loop falls back to a short poll tick
    };
    Ok((child, Watch { pid, pidfd }))
}

impl Watch {
    /// The exit status, if the child has exited and been reaped.
    pub fn try_status(&self) -> Option<ExitStatus> {
        lock()
            .get(&self.pid)
            .copied()
            .flatten()
            .map(ExitStatus::from_raw)
    }

    /// Wait up to `max` for the exit status.
    pub fn wait_timeout(&self, max: Duration) -> Option<ExitStatus> {
        let r = reaper();
        let guard = lock();
        let (guard, _) = r
            .reaped
            .wait_timeout_while(guard, max, |w| w.get(&self.pid) == Some(&None))
            .unwrap_or_else(|p| p.into_inner());
        guard
            .get(&self.pid)
            .copied()
            .flatten()
            .map(ExitStatus::from_raw)
    }

    /// Wait for the exit status.
    pub fn wait(&self) -> ExitStatus {
        loop {
            if let Some(s) = self.wait_timeout(FALLBACK_SWEEP) {
                return s;
            }
        }
    }

    /// SIGKILL the child unless it has already been reaped (so a reused pid is never hit).
    pub fn kill(&self) {
        let watched = lock();
        if watched.get(&self.pid) == Some(&None) {
            // SAFETY: plain kill(2) on a pid that is still our unreaped child.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        lock().remove(&self.pid);
    }
}
