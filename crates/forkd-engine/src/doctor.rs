//! `forkd doctor`: what this host has for running VMs, and what to install.

use crate::qemu::{self, Qemu};
use forkd_store::Home;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn check(name: &str, ok: bool, detail: String, fix: Option<&str>) -> Check {
    Check {
        name: name.into(),
        ok,
        detail,
        fix: if ok { None } else { fix.map(String::from) },
    }
}

/// Run every check for the store at `home`: its disk space, and the guest kernel in its
/// assets directory.
pub fn run(home: &Home) -> Vec<Check> {
    let assets = home.assets_dir();
    let mut out = Vec::new();
    match Qemu::locate(None) {
        Ok(q) => {
            let has = q.has_machine(qemu::MACHINE_TYPE).unwrap_or(false);
            out.push(check(
                "qemu",
                true,
                format!("{} {}", q.bin.display(), q.version_string()),
                None,
            ));
            out.push(check(
                "machine type",
                has,
                format!(
                    "{} {}",
                    qemu::MACHINE_TYPE,
                    if has { "available" } else { "missing" }
                ),
                Some("install QEMU 7.2 or newer: apt-get install qemu-system-x86"),
            ));
        }
        Err(e) => out.push(check(
            "qemu",
            false,
            e.to_string(),
            Some("apt-get install qemu-system-x86"),
        )),
    }
    match qemu::kvm_status() {
        Ok(()) => out.push(check("accelerator", true, "kvm (hardware virtualisation)".into(), None)),
        Err(why) => out.push(Check {
            name: "accelerator".into(),
            ok: true,
            detail: format!("tcg (software emulation; much slower): {why}"),
            fix: Some("for KVM, run on bare metal or a VM with nested virtualisation, and make /dev/kvm accessible".into()),
        }),
    }
    out.push(check(
        "assets",
        assets.is_dir(),
        assets.display().to_string(),
        Some("scripts/setup-engine.sh fills it (set FORKD_ASSETS to use another directory)"),
    ));
    let kernel = assets.join("kernel/vmlinuz");
    out.push(check(
        "guest kernel",
        kernel.is_file(),
        kernel.display().to_string(),
        Some("scripts/fetch-kernel.sh (downloads Debian's cloud kernel into the cache)"),
    ));
    for (tool, pkg) in [
        ("busybox", "busybox-static"),
        ("cpio", "cpio"),
        ("mkfs.ext4", "e2fsprogs"),
    ] {
        let found = qemu::which(tool).or_else(|| {
            let p = Path::new("/sbin").join(tool);
            p.is_file().then_some(p)
        });
        out.push(check(
            tool,
            found.is_some(),
            found
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "not found".into()),
            Some(&format!(
                "apt-get install {pkg} (needed to build the tiny recipe)"
            )),
        ));
    }
    let home = home.path();
    let probe = if home.exists() {
        home
    } else {
        home.parent().unwrap_or(Path::new("/"))
    };
    match rustix::fs::statvfs(probe) {
        Ok(st) => {
            let free_gib = st.f_bavail * st.f_frsize / (1 << 30);
            out.push(check(
                "disk space",
                free_gib >= 2,
                format!("{free_gib} GiB free at {}", probe.display()),
                Some("free some space: a snapshot needs its guest RAM size plus its rootfs"),
            ));
        }
        Err(e) => out.push(check(
            "disk space",
            false,
            format!("{}: {e}", probe.display()),
            None,
        )),
    }
    out.extend(confinement());
    out.push(network());
    let avail = crate::memory::mem_available_mib().unwrap_or(0);
    out.push(check(
        "memory",
        avail >= 1024,
        format!("{avail} MiB available"),
        Some("free host memory"),
    ));
    out
}

/// How children get a network (`--net`): said here because it is a choice, and why.
fn network() -> Check {
    let root = rustix::process::geteuid().is_root();
    check(
        "network",
        true,
        format!(
            "user-mode, one back end process per child (forkd-net: its own TCP/IP stack, \
             default-deny egress, DNS answer filter, no root needed{}); chosen over tap devices \
             in per-child netns with nftables because it works without root, every child is \
             alone on its own link, the host's loopback services can be allowed port by port, \
             and a child without --net pays nothing",
            if root {
                format!(", running as {}", crate::confine::qemu_user().0)
            } else {
                String::new()
            }
        ),
        None,
    )
}

/// Whether children can be confined here: cgroups, and the user QEMU drops to under root.
fn confinement() -> Vec<Check> {
    use crate::cgroup::{CgroupError, Hierarchy};
    let mut out = Vec::new();
    match crate::cgroup::host() {
        Ok(h) => {
            let at = match h {
                Hierarchy::V2(d) => d.display().to_string(),
                Hierarchy::V1 { memory, .. } => memory.display().to_string(),
            };
            out.push(check(
                "cgroups",
                true,
                format!(
                    "v{}: each child gets a memory, pids and CPU limit (under {at})",
                    h.version()
                ),
                None,
            ));
        }
        Err(e) => {
            let fix = match e {
                CgroupError::Disabled => "unset FORKD_CGROUPS to limit children again",
                _ => {
                    "run forkd as root, or delegate a cgroup v2 subtree with the memory and pids controllers to its user (systemd: Delegate=yes)"
                }
            };
            out.push(Check {
                name: "cgroups".into(),
                ok: true, // forks still work, without per-child limits
                detail: format!("children run without memory/pids limits: {e}"),
                fix: Some(fix.into()),
            });
        }
    }
    if rustix::process::geteuid().is_root() {
        let (user, dedicated) = crate::confine::qemu_user();
        out.push(Check {
            name: "qemu user".into(),
            ok: true,
            detail: if dedicated {
                format!("child QEMUs run as {user} (forkd runs as root)")
            } else {
                format!(
                    "child QEMUs run as {user}: there is no {} user, and {user}'s files \
                     (if any) are reachable from a compromised QEMU",
                    crate::confine::QEMU_USER
                )
            },
            fix: (!dedicated).then(|| {
                format!(
                    "useradd --system --no-create-home --shell /usr/sbin/nologin {} \
                     (scripts/setup-engine.sh does this)",
                    crate::confine::QEMU_USER
                )
            }),
        });
    }
    out
}
