//! How a child's QEMU is confined: QEMU's seccomp sandbox, an unprivileged user, a cgroup
//! (see [`crate::cgroup`]) and a read-only view of the snapshot's files.
//!
//! A child runs guest code the snapshot's publisher chose, and TCG is not a security
//! boundary in QEMU's own policy: treat a child's QEMU as compromised. It then holds
//! - the seccomp filter `-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,
//!   resourcecontrol=deny`: no exec, no fork, no setuid, no scheduler or affinity changes
//!   (so the vmstate is handed over as an open fd, not as an `exec:cat` command); with
//!   `-runas` the same without `elevateprivileges=deny` (see [`SANDBOX_RUNAS`]);
//! - when forkd runs as root, the uid of [`QEMU_USER`] (`-runas`, made by
//!   scripts/setup-engine.sh), else `nobody` (and `forkd doctor` warns): every file it opens
//!   after start-up is checked against that user;
//! - its own cgroup: guest RAM plus QEMU's overhead, [`crate::cgroup::PIDS_MAX`] tasks;
//! - the base rootfs opened read-only (`snapshot=on` puts the writes in a private overlay),
//!   and on QEMU 8.2 and newer memory.bin opened read-only too (`readonly=on,rom=off`: a
//!   private writable mapping of a read-only file). QEMU 7.2 has no `rom=off`: there its
//!   memory.bin descriptor is read-write, and only the private mapping keeps guest writes
//!   out of the file (docs/SECURITY.md).
//!
//! `FORKD_CONFINE=0` turns all of it off (for benchmarks: bench/confine.sh).

use crate::qemu::Qemu;
use std::ffi::CString;

/// The dedicated system user child QEMUs run as when forkd is root.
pub const QEMU_USER: &str = "forkd-qemu";
/// The fallback user when [`QEMU_USER`] does not exist.
pub const FALLBACK_USER: &str = "nobody";
/// Environment switch: `FORKD_CONFINE=0` runs children unconfined.
pub const ENV: &str = "FORKD_CONFINE";
/// The seccomp policy children run under when they keep forkd's user.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// The policy with `-runas`: QEMU installs its filter before it drops to the user, so
/// `elevateprivileges=deny` kills it at its own setgid(2) (measured on 7.2: SIGSYS, syscall
/// 106). Once every uid and gid is the unprivileged user's, and with exec denied
/// (`spawn=deny` also sets no_new_privs), there is no privilege left to elevate to.
pub const SANDBOX_RUNAS: &str = "on,obsolete=deny,spawn=deny,resourcecontrol=deny";
/// First QEMU with `memory-backend-file,...,rom=off`.
pub const ROM_OFF_VERSION: (u32, u32, u32) = (8, 2, 0);

/// What confinement a fork's children get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confine {
    /// QEMU's seccomp sandbox.
    pub sandbox: bool,
    /// `-runas USER` (set when forkd runs as root).
    pub runas: Option<String>,
    /// One cgroup per child.
    pub cgroups: bool,
    /// memory.bin opened read-only (`readonly=on,rom=off`, QEMU 8.2+).
    pub readonly_memory: bool,
}

impl Confine {
    /// No confinement at all (`FORKD_CONFINE=0`).
    pub fn none() -> Confine {
        Confine {
            sandbox: false,
            runas: None,
            cgroups: false,
            readonly_memory: false,
        }
    }

    /// Everything this host and this QEMU allow, unless `FORKD_CONFINE=0`.
    pub fn for_host(qemu: &Qemu) -> Confine {
        if std::env::var(ENV).is_ok_and(|v| v == "0") {
            return Confine::none();
        }
        let root = rustix::process::geteuid().is_root();
        Confine {
            sandbox: true,
            runas: root.then(|| qemu_user().0.to_string()),
            cgroups: crate::cgroup::host().is_ok(),
            readonly_memory: qemu.version >= ROM_OFF_VERSION,
        }
    }

    /// The QEMU options for this confinement (besides the memory backend's).
    pub fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if self.sandbox {
            let policy = if self.runas.is_some() {
                SANDBOX_RUNAS
            } else {
                SANDBOX
            };
            a.extend(["-sandbox".to_string(), policy.to_string()]);
        }
        if let Some(u) = &self.runas {
            a.extend(["-runas".to_string(), u.clone()]);
        }
        a
    }
}

/// Whether a user of this name exists (in the passwd database, through NSS).
pub fn user_exists(name: &str) -> bool {
    user_ids(name).is_some()
}

/// The uid and primary gid of a user, through NSS.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let c = CString::new(name).ok()?;
    let mut pw = std::mem::MaybeUninit::<libc::passwd>::uninit();
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r writes only into `pw` and `buf` (whose length it is given) and sets
    // `out` to `pw` or null; nothing is read from them here.
    let rc = unsafe {
        libc::getpwnam_r(
            c.as_ptr(),
            pw.as_mut_ptr(),
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 || out.is_null() {
        return None;
    }
    // SAFETY: getpwnam_r succeeded and `out` points at `pw`, which it filled in.
    let pw = unsafe { pw.assume_init() };
    Some((pw.pw_uid, pw.pw_gid))
}

/// The user child QEMUs run as under root, and whether it is the dedicated one.
pub fn qemu_user() -> (&'static str, bool) {
    static U: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *U.get_or_init(|| user_exists(QEMU_USER)) {
        (QEMU_USER, true)
    } else {
        (FALLBACK_USER, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args() {
        let c = Confine {
            sandbox: true,
            runas: Some("nobody".into()),
            cgroups: false,
            readonly_memory: false,
        };
        assert_eq!(
            c.args(),
            ["-sandbox", SANDBOX_RUNAS, "-runas", "nobody"].map(String::from)
        );
        let c = Confine { runas: None, ..c };
        assert_eq!(c.args(), ["-sandbox", SANDBOX].map(String::from));
        assert!(Confine::none().args().is_empty());
    }

    #[test]
    fn users() {
        assert!(user_exists("root"));
        assert!(!user_exists("no-such-user-forkd-test"));
        assert!(!user_exists("a\0b"));
    }
}
