//! Can this host run a snapshot? Checked before any large download.

use forkd_store::Manifest;
use std::process::Command;

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
    let qemu = std::env::var("FORKD_QEMU").unwrap_or_else(|_| format!("qemu-system-{host}"));
    let list = |what: &str| -> Result<String, String> {
        let out = Command::new(&qemu).args([what, "help"]).output().map_err(|e| {
            format!(
                "QEMU is not installed ({qemu}: {e}); install it with `apt-get install qemu-system-x86` (Debian/Ubuntu), then pull again"
            )
        })?;
        if !out.status.success() {
            return Err(format!("`{qemu} {what} help` failed: {}", out.status));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let machines = list("-machine")?;
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
    let cpus = list("-cpu")?;
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
