//! The last word of a forkd that dies: the QEMUs it was driving die too, however forkd ends.
//!
//! Why not only `PR_SET_PDEATHSIG`: the kernel clears a process's parent-death signal when its
//! user id changes, and a confined QEMU changes it itself (`-runas`, see `confine.rs`) after it
//! has opened its files as root. So a `kill -9` or an OOM kill of `forkd fork` would leave every
//! confined child running. The signal is still set (it covers unconfined children even if this
//! reaper could not start), but this is what holds when QEMU runs as another user.
//!
//! How: one small watcher process per forkd process (`/bin/sh`, in its own process group so a
//! Ctrl-C meant for forkd does not reach it), reading `+PID` / `-PID` lines on a pipe whose only
//! writer is forkd. When forkd ends, by any means, the kernel closes the pipe; the watcher reads
//! end-of-file and SIGKILLs the pids still tied. forkd unties a pid *before* it reaps that QEMU,
//! so the pid cannot have been reused by another process while it is listed.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// POSIX sh, builtins only in the loop. Ignores SIGINT/SIGHUP (the terminal's), not SIGTERM.
const WATCHER: &str = r#"trap '' INT HUP
pids=
while read -r op; do
  case $op in
    +*) pids="$pids ${op#+}" ;;
    -*) n=; for p in $pids; do [ "$p" = "${op#-}" ] || n="$n $p"; done; pids=$n ;;
  esac
done
[ -n "$pids" ] && kill -9 $pids 2>/dev/null
exit 0
"#;

static WATCHER_IN: OnceLock<Option<Mutex<ChildStdin>>> = OnceLock::new();

fn watcher() -> Option<&'static Mutex<ChildStdin>> {
    WATCHER_IN
        .get_or_init(|| {
            let started = Command::new("/bin/sh")
                .args(["-c", WATCHER])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn();
            match started {
                // The watcher is never waited for: it ends when this process does, and its
                // zombie, if any, is reaped by init.
                Ok(mut child) => child.stdin.take().map(Mutex::new),
                Err(e) => {
                    tracing::warn!(
                        "cannot start the watcher that stops children if forkd dies: {e}; \
                         a killed forkd may leave confined QEMUs running until the next sweep"
                    );
                    None
                }
            }
        })
        .as_ref()
}

fn send(line: &str) {
    if let Some(w) = watcher() {
        let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = w.write_all(line.as_bytes()) {
            tracing::warn!("the child watcher is gone: {e}");
        }
    }
}

/// Kill `pid` if this process ends before [`untie`] is called for it.
pub(crate) fn tie(pid: u32) {
    send(&format!("+{pid}\n"));
}

/// Forget `pid`: call before reaping it, or when it is handed over to live on.
pub(crate) fn untie(pid: u32) {
    send(&format!("-{pid}\n"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn alive(pid: u32) -> bool {
        // Zombies count as dead: the sleeper is our child and is not reaped here.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
    }

    /// The watcher script itself: a tied pid is killed at end-of-file, an untied one is not.
    #[test]
    fn the_watcher_kills_what_is_tied_when_its_writer_goes() {
        let mut tied = Command::new("sleep").arg("30").spawn().unwrap();
        let mut untied = Command::new("sleep").arg("30").spawn().unwrap();
        let mut w = Command::new("/bin/sh")
            .args(["-c", WATCHER])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = w.stdin.take().unwrap();
        write!(
            input,
            "+{}\n+{}\n-{}\n",
            tied.id(),
            untied.id(),
            untied.id()
        )
        .unwrap();
        drop(input); // as when forkd dies
        w.wait().unwrap();
        let start = Instant::now();
        while alive(tied.id()) && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(tied.id()), "a tied process survived its owner");
        assert!(alive(untied.id()), "an untied process was killed");
        let _ = untied.kill();
        let _ = untied.wait();
        let _ = tied.wait();
    }
}
