//! Can this host run a snapshot? Checked before any large download.

use forkd_store::Manifest;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What the local QEMU lists: (`-machine help`, `-cpu help`).
type Lists = (String, String);

/// The QEMU that `check` asked, when, and its answers: kept for [`KEEP`] once it answered (an
/// error is not kept), since QEMU may be installed or upgraded while a daemon runs. Held while
/// QEMU is asked, so that a `check` during a [`prefetch`] waits for it instead of asking again.
static LISTS: Mutex<Option<(String, Instant, Lists)>> = Mutex::new(None);
/// How long an answer is used: long enough to join a pull's [`prefetch`] with its `check`.
const KEEP: Duration = Duration::from_secs(60);

/// Start asking the local QEMU for its machine types and CPU models, on a thread of its own, so
/// that [`check`] finds them ready: a pull calls this before it reads the hub. Each answer is
/// a QEMU start (about 100 ms here under TCG), which a lazy fork's first child waited for.
pub fn prefetch() {
    std::thread::spawn(|| drop(lists()));
}

/// The QEMU `check` asks (`$FORKD_QEMU`, else `qemu-system-<arch>`) and its lists, both asked
/// at once.
fn lists() -> (String, Result<Lists, String>) {
    let host = std::env::consts::ARCH;
    let qemu = std::env::var("FORKD_QEMU").unwrap_or_else(|_| format!("qemu-system-{host}"));
    let mut kept = LISTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((q, at, l)) = kept.as_ref()
        && *q == qemu
        && at.elapsed() < KEEP
    {
        return (qemu, Ok(l.clone()));
    }
    let lists = ask(&qemu);
    if let Ok(l) = &lists {
        *kept = Some((qemu.clone(), Instant::now(), l.clone()));
    }
    (qemu, lists)
}

fn ask(qemu: &str) -> Result<Lists, String> {
    let start = |what: &str| {
        Command::new(qemu)
            .args([what, "help"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "QEMU is not installed ({qemu}: {e}); install it with `apt-get install qemu-system-x86` (Debian/Ubuntu), then pull again"
                )
            })
    };
    let machine = start("-machine")?;
    let cpu = match start("-cpu") {
        Ok(c) => c,
        Err(e) => {
            // Not left a zombie: reaped before the error goes up.
            let _ = machine.wait_with_output();
            return Err(e);
        }
    };
    // Both waited for before either is judged, so neither is left a zombie.
    let outputs = [machine.wait_with_output(), cpu.wait_with_output()];
    let mut out = Vec::new();
    for (what, o) in ["-machine", "-cpu"].into_iter().zip(outputs) {
        let o = o.map_err(|e| format!("`{qemu} {what} help` failed: {e}"))?;
        if !o.status.success() {
            return Err(format!("`{qemu} {what} help` failed: {}", o.status));
        }
        out.push(String::from_utf8_lossy(&o.stdout).into_owned());
    }
    let cpus = out.pop().expect("two lists");
    Ok((out.pop().expect("two lists"), cpus))
}

/// `Err(reason)` when the snapshot cannot run here.
pub fn check(m: &Manifest) -> Result<(), String> {
    let host = std::env::consts::ARCH;
    if m.arch != host {
        return Err(format!(
            "the snapshot is for {} and this host is {host}",
            m.arch
        ));
    }
    if m.engine.name != "qemu" {
        return Err(format!(
            "the snapshot needs engine {:?}; this forkd runs snapshots with qemu",
            m.engine.name
        ));
    }
    let (qemu, lists) = lists();
    let (machines, cpus) = lists?;
    let known = machines
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .any(|name| name == m.engine.machine_type);
    if !known {
        return Err(format!(
            "the local QEMU ({qemu}) has no machine type {:?}, which the snapshot was taken with; install a QEMU that has it (a newer QEMU keeps older versioned machine types)",
            m.engine.machine_type
        ));
    }
    let known = cpus
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.next()?;
            w.next()
        })
        .any(|name| name == m.engine.cpu_model);
    if !known {
        return Err(format!(
            "the local QEMU ({qemu}) has no CPU model {:?}, which the snapshot was taken with",
            m.engine.cpu_model
        ));
    }
    Ok(())
}
