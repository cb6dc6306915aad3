//! One cgroup per child: a memory limit, a pids limit and a CPU weight, on cgroup v2 or v1.
//!
//! A [`Cgroup`] is made before its child's QEMU starts; [`Cgroup::prepare_join`] opens the
//! `cgroup.procs` files so the forked QEMU process can move itself in before `exec` (so every
//! page it ever touches is charged here). The child's [`crate::child::VmGuard`] owns it and
//! removes it once QEMU has been reaped.
//!
//! Where the groups go: under forkd's own cgroup (from `/proc/self/cgroup`), so a forkd that
//! runs in a limited group cannot give its children more than it has. cgroup v2 is used when
//! `/sys/fs/cgroup` is a v2 hierarchy with the `memory` and `pids` controllers; otherwise the
//! v1 controllers `memory`, `pids` and `cpu` mounted under `/sys/fs/cgroup/<controller>`
//! (hybrid hosts mount an empty v2 `unified` hierarchy beside them, which is ignored).
//! Where neither can be written (not root, no delegation), [`probe`] says why, forks run
//! without limits, and `forkd doctor` reports it. `FORKD_CGROUPS=0` turns them off.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";
/// Prefix of every group forkd makes (nothing else is ever removed).
pub const PREFIX: &str = "forkd-";
/// Environment switch: `FORKD_CGROUPS=0` runs children without cgroups.
pub const ENV: &str = "FORKD_CGROUPS";

/// QEMU's own memory on top of guest RAM that a child's limit allows: its binary, heap,
/// TCG translation cache, device state and the page cache it reads (measured on a tiny
/// child: peak usage 60-70 MiB over guest RAM under TCG; see bench/RESULTS.md), with room.
pub const QEMU_LIMIT_OVERHEAD_MIB: u64 = 128;
/// Most tasks (QEMU threads) one child may have: QEMU uses about 10 with one vCPU.
pub const PIDS_MAX: u64 = 256;
/// cgroup v1 `cpu.shares` (default 1024) and the v2 `cpu.weight` (default 100) a child gets:
/// the default, so one child weighs as much as any other process group on the host.
const CPU_SHARES_V1: u64 = 1024;
const CPU_WEIGHT_V2: u64 = 100;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroups are turned off ({ENV}=0)")]
    Disabled,
    #[error("no usable cgroup hierarchy: {0}")]
    Unsupported(String),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Which cgroup interface, and where forkd's groups are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v2: the directory under which child groups are made.
    V2(PathBuf),
    /// cgroup v1: the parent directory in each of the memory, pids and cpu hierarchies.
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: PathBuf,
    },
}

impl Hierarchy {
    pub fn version(&self) -> u8 {
        match self {
            Hierarchy::V2(_) => 2,
            Hierarchy::V1 { .. } => 1,
        }
    }
}

/// The limits of one child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
}

impl Limits {
    /// Guest RAM plus QEMU's own overhead; `None` when the arithmetic overflows.
    pub fn for_guest(mem_mib: u64) -> Option<Limits> {
        let mib = mem_mib.checked_add(QEMU_LIMIT_OVERHEAD_MIB)?;
        Some(Limits {
            memory_bytes: mib.checked_mul(1024 * 1024)?,
            pids: PIDS_MAX,
        })
    }

    pub fn memory_mib(&self) -> u64 {
        self.memory_bytes / (1024 * 1024)
    }
}

/// This process's own group in a hierarchy, from /proc/self/cgroup: the v2 line (`0::/x`)
/// or the v1 line naming `controller`.
fn own_group(proc_cgroup: &str, controller: Option<&str>) -> Option<String> {
    proc_cgroup.lines().find_map(|l| {
        let mut it = l.splitn(3, ':');
        let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
        let hit = match controller {
            None => ctrls.is_empty(),
            Some(c) => ctrls.split(',').any(|x| x == c),
        };
        hit.then(|| path.trim_start_matches('/').to_string())
    })
}

/// A directory under `base` named by `rel` from /proc/self/cgroup, refusing `..`.
fn under(base: &Path, rel: &str) -> Option<PathBuf> {
    let mut p = base.to_path_buf();
    for part in rel.split('/').filter(|s| !s.is_empty()) {
        if part == ".." || part == "." {
            return None;
        }
        p.push(part);
    }
    Some(p)
}

/// Find where this host lets forkd make child groups, and check it can write there.
pub fn probe() -> Result<Hierarchy, CgroupError> {
    if std::env::var(ENV).is_ok_and(|v| v == "0") {
        return Err(CgroupError::Disabled);
    }
    let root = Path::new(ROOT);
    let self_cg = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(io("read", Path::new("/proc/self/cgroup")))?;
    let h = match std::fs::read_to_string(root.join("cgroup.controllers")) {
        Ok(ctrls) => {
            let have = |c: &str| ctrls.split_whitespace().any(|x| x == c);
            if !(have("memory") && have("pids")) {
                return Err(CgroupError::Unsupported(format!(
                    "the cgroup v2 hierarchy at {ROOT} lacks the memory or pids controller"
                )));
            }
            let rel = own_group(&self_cg, None).unwrap_or_default();
            let dir = under(root, &rel).ok_or_else(|| {
                CgroupError::Unsupported(format!("odd cgroup path {rel:?} in /proc/self/cgroup"))
            })?;
            Hierarchy::V2(dir)
        }
        Err(_) => {
            let mut dirs = Vec::new();
            for c in ["memory", "pids", "cpu"] {
                let mount = root.join(c);
                if !mount.join("cgroup.procs").is_file() {
                    return Err(CgroupError::Unsupported(format!(
                        "no cgroup v2 hierarchy at {ROOT} and no v1 {c} controller at {}",
                        mount.display()
                    )));
                }
                let rel = own_group(&self_cg, Some(c)).unwrap_or_default();
                dirs.push(under(&mount, &rel).ok_or_else(|| {
                    CgroupError::Unsupported(format!("odd cgroup path {rel:?} for {c}"))
                })?);
            }
            let cpu = dirs.pop().expect("three");
            let pids = dirs.pop().expect("three");
            let memory = dirs.pop().expect("three");
            Hierarchy::V1 { memory, pids, cpu }
        }
    };
    // Can we make a group here? (Not root, or no delegation: no.)
    let test = Cgroup::create(
        &h,
        &format!("probe-{}", std::process::id()),
        Limits {
            memory_bytes: 64 << 20,
            pids: 8,
        },
    )?;
    drop(test);
    Ok(h)
}

/// The probe, done once per process.
pub fn host() -> Result<&'static Hierarchy, &'static CgroupError> {
    static H: std::sync::OnceLock<Result<Hierarchy, CgroupError>> = std::sync::OnceLock::new();
    H.get_or_init(probe).as_ref()
}

/// One child's group (one directory per hierarchy, all named `forkd-<name>`), removed on
/// drop once its tasks are gone.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    limits: Limits,
    keep: bool,
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let p = dir.join(file);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(io("write", &p))
}

impl Cgroup {
    /// Make the group `forkd-<name>` with `limits`.
    pub fn create(h: &Hierarchy, name: &str, limits: Limits) -> Result<Cgroup, CgroupError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(CgroupError::Unsupported(format!("bad group name {name:?}")));
        }
        let leaf = format!("{PREFIX}{name}");
        let mut cg = Cgroup {
            dirs: Vec::new(),
            limits,
            keep: false,
        };
        let mkdir = |cg: &mut Cgroup, parent: &Path| -> Result<PathBuf, CgroupError> {
            let d = parent.join(&leaf);
            std::fs::create_dir(&d).map_err(io("create", &d))?;
            cg.dirs.push(d.clone());
            Ok(d)
        };
        match h {
            Hierarchy::V2(parent) => {
                // Children of `parent` get the controllers (fails where not delegated).
                write(parent, "cgroup.subtree_control", "+memory +pids +cpu")
                    .or_else(|_| write(parent, "cgroup.subtree_control", "+memory +pids"))?;
                let d = mkdir(&mut cg, parent)?;
                write(&d, "memory.max", &limits.memory_bytes.to_string())?;
                let _ = write(&d, "memory.swap.max", "0");
                write(&d, "pids.max", &limits.pids.to_string())?;
                let _ = write(&d, "cpu.weight", &CPU_WEIGHT_V2.to_string());
            }
            Hierarchy::V1 { memory, pids, cpu } => {
                let d = mkdir(&mut cg, memory)?;
                write(
                    &d,
                    "memory.limit_in_bytes",
                    &limits.memory_bytes.to_string(),
                )?;
                // Without swap accounting this file is absent; the limit above still holds.
                if d.join("memory.memsw.limit_in_bytes").exists() {
                    let _ = write(
                        &d,
                        "memory.memsw.limit_in_bytes",
                        &limits.memory_bytes.to_string(),
                    );
                }
                let d = mkdir(&mut cg, pids)?;
                write(&d, "pids.max", &limits.pids.to_string())?;
                let d = mkdir(&mut cg, cpu)?;
                write(&d, "cpu.shares", &CPU_SHARES_V1.to_string())?;
            }
        }
        Ok(cg)
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The group's directories (one for v2, one per controller for v1).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Open each `cgroup.procs` for a process about to start: see [`Join::enter`].
    pub fn prepare_join(&self) -> Result<Join, CgroupError> {
        let files = self
            .dirs
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map_err(io("open", &p))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Join { files })
    }

    /// Leave the group in place (the child is kept running); [`remove_dirs`] removes it later.
    pub fn detach(mut self) -> Vec<PathBuf> {
        self.keep = true;
        std::mem::take(&mut self.dirs)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if !self.keep {
            remove_dirs(&self.dirs);
        }
    }
}

/// Remove groups forkd made (each must end in a `forkd-` directory under /sys/fs/cgroup;
/// anything else is left alone). rmdir only removes an empty group, so a group whose process
/// is still exiting is retried for a moment.
pub fn remove_dirs(dirs: &[PathBuf]) {
    for d in dirs {
        let ours = d.starts_with(ROOT)
            && d.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(PREFIX))
            && !d.components().any(|c| c == std::path::Component::ParentDir);
        if !ours {
            tracing::warn!("not removing {}: not a forkd cgroup", d.display());
            continue;
        }
        for i in 0..100 {
            match std::fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if i == 99 => tracing::warn!("cannot remove cgroup {}: {e}", d.display()),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
    }
}

/// Remove the groups of child `name` left by a process that died before it could (a crashed
/// fork: see [`crate::run::sweep_orphans`]). Nothing happens on hosts without cgroups.
pub fn remove_named(name: &str) {
    let Ok(h) = host() else {
        return;
    };
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return;
    }
    let leaf = format!("{PREFIX}{name}");
    let dirs: Vec<PathBuf> = match h {
        Hierarchy::V2(p) => vec![p.join(&leaf)],
        Hierarchy::V1 { memory, pids, cpu } => [memory, pids, cpu]
            .into_iter()
            .map(|p| p.join(&leaf))
            .filter(|d| d.exists())
            .collect(),
    };
    remove_dirs(&dirs);
}

/// Open `cgroup.procs` files, for the child side of a fork.
#[derive(Debug)]
pub struct Join {
    files: Vec<File>,
}

impl Join {
    /// The raw fds, for [`enter_raw`] in a `pre_exec` hook.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.files.iter().map(|f| f.as_raw_fd()).collect()
    }
}

/// Move the calling process into the groups whose `cgroup.procs` fds are given: writing "0"
/// means "me". Only calls write(2), so it is safe between fork and exec.
pub fn enter_raw(fds: &[RawFd]) -> std::io::Result<()> {
    for &fd in fds {
        // SAFETY: write(2) on an fd the caller keeps open, from a valid 1-byte buffer.
        let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        if n != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_groups() {
        let text =
            "9:name=systemd:/\n8:pids:/a\n4:memory:/process_api/x\n1:cpu,cpuacct:/c\n0::/u\n";
        assert_eq!(own_group(text, Some("memory")).unwrap(), "process_api/x");
        assert_eq!(own_group(text, Some("cpu")).unwrap(), "c");
        assert_eq!(own_group(text, Some("pids")).unwrap(), "a");
        assert_eq!(own_group(text, None).unwrap(), "u");
        assert_eq!(own_group(text, Some("blkio")), None);
    }

    #[test]
    fn no_escape() {
        assert_eq!(under(Path::new("/r"), "a/b").unwrap(), Path::new("/r/a/b"));
        assert!(under(Path::new("/r"), "a/../b").is_none());
    }

    #[test]
    fn limits() {
        let l = Limits::for_guest(64).unwrap();
        assert_eq!(l.memory_mib(), 64 + QEMU_LIMIT_OVERHEAD_MIB);
        assert!(Limits::for_guest(u64::MAX).is_none());
        assert!(Limits::for_guest(1 << 44).is_none());
    }

    #[test]
    fn foreign_dirs_are_not_removed() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("forkd-x");
        std::fs::create_dir(&victim).unwrap();
        remove_dirs(std::slice::from_ref(&victim)); // not under /sys/fs/cgroup
        assert!(victim.is_dir());
    }
}
