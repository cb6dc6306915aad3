//! Children kept running after `forkd fork --keep`: one directory per child under
//! `$FORKD_HOME/run/<id>/` with `child.json`, its sockets, log and disk overlay.
//!
//! `run/` and every directory in it are 0700 and their files 0600, whatever the umask. What is
//! read back from them is untrusted: a record's own paths are never used (a child's directory
//! is always `run/<id>`, derived here), files are opened relative to a directory opened without
//! following symbolic links, and reads are capped.

use crate::agent::AgentConn;
use crate::error::{EngineError, IoCtx, Result};
use forkd_agent::{ExecReply, ExecRequest};
use rustix::fs::{Mode, OFlags};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const RECORD: &str = "child.json";

/// Names the process that made a run directory (`PID STARTTIME`), until a [`RECORD`] takes
/// over. A directory whose owner died before it was recorded (`kill -9` in the middle of a
/// fork) is found by [`sweep_orphans`]: its QEMU is killed and the directory removed.
pub const OWNER: &str = "owner";

/// The most a record or owner file may hold: they are a few hundred bytes.
const MAX_RECORD: u64 = 64 * 1024;

use forkd_store::process_start_time as start_time;

/// Create the run directory `dir` for this process: `run/` (its parent) is made 0700 if
/// needed, `dir` must not exist (nothing planted there is used) and is created 0700, and it is
/// marked as this process's ([`OWNER`]) so a sweep removes it if we die before it is recorded.
pub fn create_run_dir(dir: &Path) -> Result<()> {
    if let Some(parent) = dir.parent() {
        forkd_store::private_dir(parent)?;
    }
    std::fs::DirBuilder::new()
        .mode(forkd_store::DIR_MODE)
        .create(dir)
        .at("cannot create run directory", dir)?;
    write_owner(dir)
}

/// Whether `id` can name a directory in `run/` (one plain path component).
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 255 && !id.contains('/') && !id.starts_with('.')
}

/// Read `name` in `run_root/<id>/`, at most [`MAX_RECORD`] bytes: `<id>` is opened as a
/// directory without following a symbolic link, and `name` relative to it, also without
/// following one, and only if it is a regular file.
fn read_in(run_root: &Path, id: &str, name: &str) -> std::io::Result<Vec<u8>> {
    let ro = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let root = rustix::fs::open(run_root, ro | OFlags::DIRECTORY, Mode::empty())?;
    let dir = rustix::fs::openat(&root, id, ro | OFlags::DIRECTORY, Mode::empty())?;
    // NONBLOCK: a FIFO planted under the name must not hang the open.
    let fd = rustix::fs::openat(&dir, name, ro | OFlags::NONBLOCK, Mode::empty())?;
    let file = std::fs::File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    let mut buf = Vec::new();
    file.take(MAX_RECORD + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_RECORD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "larger than a record can be",
        ));
    }
    Ok(buf)
}

/// Mark `dir` as this process's.
pub fn write_owner(dir: &Path) -> Result<()> {
    let me = std::process::id();
    let text = format!("{me} {}\n", start_time(me).unwrap_or(0));
    Ok(forkd_store::write_private(&dir.join(OWNER), text)?)
}

/// Whether the process named in `run_root/<name>/owner` still runs. `None`: no owner file.
fn owner_alive(run_root: &Path, name: &str) -> Option<bool> {
    let text = read_in(run_root, name, OWNER).ok()?;
    let text = String::from_utf8(text).ok()?;
    let mut it = text.split_whitespace();
    let pid: u32 = it.next()?.parse().ok()?;
    let start: u64 = it.next()?.parse().ok()?;
    Some(start_time(pid) == Some(start))
}

/// QEMU processes whose command line names `dir` (its sockets and overlay live there).
fn qemus_in(dir: &Path) -> Vec<u32> {
    let needle = format!("{}/", dir.display());
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains("qemu-system") && cmd.contains(&needle)
        })
        .collect()
}

/// Remove the run directories (and kill their QEMUs) that no record names and whose owner
/// process is gone: what a crashed `forkd fork` or daemon left mid-fork. Directories of a
/// live owner (a fork in progress elsewhere) and those without an owner file are left alone.
/// Returns the directories removed.
pub fn sweep_orphans(run_root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(run_root) else {
        return out;
    };
    for e in rd.flatten() {
        let dir = e.path();
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        // file_type does not follow a symbolic link: a link is never a run directory.
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let recorded = std::fs::symlink_metadata(dir.join(RECORD)).is_ok();
        if !is_dir || recorded || owner_alive(run_root, &name) != Some(false) {
            continue;
        }
        for pid in qemus_in(&dir) {
            tracing::info!(
                "killing QEMU {pid} left in {} by a dead owner",
                dir.display()
            );
            // SAFETY: kill(2) on a pid whose command line names this directory's QEMU.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        if let Some(name) = dir.file_name().and_then(|n| n.to_str()) {
            crate::cgroup::remove_named(name);
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => out.push(dir),
            Err(err) => tracing::warn!("cannot remove {}: {err}", dir.display()),
        }
    }
    out
}

/// The run-directory lock an agent call holds shared and a snapshot takes exclusively.
pub const BUSY_LOCK: &str = "busy.lock";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeptChild {
    pub id: String,
    pub tag: String,
    pub hostname: String,
    pub pid: u32,
    pub snapshot_dir: PathBuf,
    pub run_dir: PathBuf,
    pub started_unix: u64,
    /// The child's cgroup directories, removed by [`kill`] (none on hosts without cgroups).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cgroups: Vec<PathBuf>,
    /// Guest ports reachable on the host (`--expose`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<crate::net::PortMap>,
    /// The child has a network (`--net`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub net: bool,
    /// The memory file this child maps, when it is not its image's own: a child forked while
    /// its image was pulled lazily maps the lazy mount's copy (the same bytes, verified, once
    /// the image is installed). `[device, inode]`; a branch looks for this mapping too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_file: Option<[u64; 2]>,
}

/// A kept child as `forkd ps` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ChildStatus {
    #[serde(flatten)]
    pub child: KeptChild,
    pub running: bool,
}

impl KeptChild {
    /// The record of a child that came up, whose QEMU `guard` owns.
    pub fn new(
        report: &crate::child::ChildReport,
        tag: &str,
        snapshot_dir: &Path,
        guard: &crate::child::VmGuard,
    ) -> KeptChild {
        KeptChild {
            id: report.id.clone(),
            tag: tag.to_string(),
            hostname: report.hostname.clone(),
            pid: guard.pid().unwrap_or(0),
            snapshot_dir: snapshot_dir.to_path_buf(),
            run_dir: guard.run_dir.clone(),
            cgroups: guard.cgroup_dirs(),
            ports: report.ports.clone(),
            net: report.net,
            memory_file: None,
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    pub fn qmp_sock(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }

    /// Stop the child's vCPUs (QMP `stop`): it keeps its memory but uses no CPU.
    pub fn pause(&self) -> Result<()> {
        self.qmp("stop")
    }

    /// Let a paused child run again (QMP `cont`).
    pub fn resume(&self) -> Result<()> {
        self.qmp("cont")
    }

    /// Whether the child's vCPUs are stopped (QMP `query-status`).
    pub fn paused(&self) -> Result<bool> {
        let mut q =
            crate::qmp::Qmp::connect(&self.qmp_sock(), Duration::from_secs(5), &mut || {
                self.running()
            })?;
        Ok(q.status()? == "paused")
    }

    fn qmp(&self, command: &str) -> Result<()> {
        let mut q =
            crate::qmp::Qmp::connect(&self.qmp_sock(), Duration::from_secs(5), &mut || {
                self.running()
            })?;
        q.execute(command, None)?;
        Ok(())
    }

    pub fn save(&self) -> Result<()> {
        let p = self.run_dir.join(RECORD);
        let text =
            serde_json::to_string_pretty(self).map_err(|e| EngineError::Corrupt(e.to_string()))?;
        let tmp = self.run_dir.join(".child.json.tmp");
        forkd_store::write_private(&tmp, text)?;
        std::fs::rename(&tmp, &p).at("cannot write", &p)
    }

    /// Read the record of `run_root/<id>`. Its `run_dir` is `run_root/<id>` whatever the file
    /// says, and a record naming another id is refused.
    fn load(run_root: &Path, id: &str) -> Result<KeptChild> {
        if !valid_id(id) {
            return Err(EngineError::NoSuchChild(id.to_string()));
        }
        let text =
            read_in(run_root, id, RECORD).map_err(|_| EngineError::NoSuchChild(id.to_string()))?;
        let p = run_root.join(id).join(RECORD);
        let mut child: KeptChild = serde_json::from_slice(&text)
            .map_err(|e| EngineError::Corrupt(format!("{}: {e}", p.display())))?;
        if child.id != id {
            return Err(EngineError::Corrupt(format!(
                "{}: names the child {:?}",
                p.display(),
                child.id
            )));
        }
        child.run_dir = run_root.join(id);
        Ok(child)
    }

    pub fn agent_sock(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }

    /// Whether the recorded pid is still this child's QEMU (not a recycled pid).
    pub fn running(&self) -> bool {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        let needle = self.run_dir.join("qmp.sock");
        let needle = needle.to_string_lossy();
        String::from_utf8_lossy(&cmdline).contains(needle.as_ref())
    }
}

/// Every kept child (running or not), sorted by id.
pub fn list(run_root: &Path) -> Result<Vec<ChildStatus>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(run_root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).at("cannot read", run_root),
    };
    for entry in rd.flatten() {
        let Some(id) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let Ok(child) = KeptChild::load(run_root, &id) else {
            continue;
        };
        let running = child.running();
        out.push(ChildStatus { child, running });
    }
    out.sort_by(|a, b| a.child.id.cmp(&b.child.id));
    Ok(out)
}

/// The kept child `id`: its record in `run_root/<id>/` (a symbolic link there is not followed).
pub fn find(run_root: &Path, id: &str) -> Result<KeptChild> {
    KeptChild::load(run_root, id)
}

/// Stop a kept child and remove its run directory: `run_root/<id>`, derived here, never a path
/// the record names. A symbolic link at `run_root/<id>` is not followed (no such child).
pub fn kill(run_root: &Path, id: &str) -> Result<()> {
    let child = find(run_root, id)?;
    if child.running() {
        // SAFETY: kill(2) with a pid we verified (via /proc/PID/cmdline) is this child's QEMU.
        unsafe { libc::kill(child.pid as libc::pid_t, libc::SIGKILL) };
        for _ in 0..200 {
            if !child.running() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // Only groups named forkd-* under /sys/fs/cgroup are removed, and only when empty.
    crate::cgroup::remove_dirs(&child.cgroups);
    // remove_dir_all removes a symbolic link, not what it points to, and does not follow the
    // links it meets inside.
    let dir = run_root.join(id);
    std::fs::remove_dir_all(&dir).at("cannot remove", &dir)
}

/// Run a command in a kept child through its agent.
pub fn exec(run_root: &Path, id: &str, req: ExecRequest) -> Result<ExecReply> {
    let child = find(run_root, id)?;
    if !child.running() {
        return Err(EngineError::Agent(format!(
            "child {id} is not running (forkd kill {id} to clean up)"
        )));
    }
    // Held while the command runs: a snapshot of the child waits for no one, it refuses.
    let _busy = forkd_store::FileLock::shared(&child.run_dir.join(BUSY_LOCK))?;
    let (mut conn, _) =
        AgentConn::wait_ready(&child.agent_sock(), Duration::from_secs(30), &mut || {
            child.running()
        })?;
    conn.exec(req)
}
