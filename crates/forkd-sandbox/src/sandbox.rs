//! One sandbox: a running child, its record on disk, its state machine and the one agent
//! connection every call on it shares.
//!
//! The record lives next to the VM's run state (`run/<id>/child.json` from the engine, plus
//! `run/<id>/sandbox.json` with what the API added: image, labels, env, expiry), so that a
//! daemon restarted after a crash can find every child again (see [`crate::Manager::recover`]).

use crate::command::{BackgroundCommand, CommandRequest};
use crate::error::{Result, SandboxError};
use forkd_agent::{FileEntry, RunReply, feature};
use forkd_engine::EngineError;
use forkd_engine::child::VmGuard;
use forkd_engine::mux::AgentClient;
use forkd_engine::run::KeptChild;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub const META: &str = "sandbox.json";

/// Background commands one sandbox may run at once.
pub const MAX_BACKGROUND: usize = 64;

/// Where a sandbox is in its life: `Running ⇄ Paused`, either `→ Stopped` (final).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    Running,
    Paused,
    Stopped,
}

impl SandboxState {
    fn can_go(self, to: SandboxState) -> bool {
        use SandboxState::*;
        matches!(
            (self, to),
            (Running, Paused) | (Paused, Running) | (Running | Paused, Stopped)
        )
    }
}

/// What the API knows of a sandbox beyond the engine's record; saved as `sandbox.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Meta {
    pub image: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub memory_mib: u64,
    /// Unix seconds.
    pub created_unix: u64,
    #[serde(default)]
    pub expires_unix: Option<u64>,
    #[serde(default)]
    pub restored_ms: Option<u64>,
    #[serde(default)]
    pub ready_ms: Option<u64>,
}

/// A sandbox as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxInfo {
    pub id: String,
    pub image: String,
    pub state: SandboxState,
    pub hostname: String,
    pub pid: u32,
    pub created_unix: u64,
    pub expires_unix: Option<u64>,
    pub labels: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    pub memory_mib: u64,
    pub restored_ms: Option<u64>,
    pub ready_ms: Option<u64>,
    /// The child has a network.
    pub net: bool,
    /// Guest ports reachable on the host's 127.0.0.1.
    pub ports: Vec<forkd_engine::net::PortMap>,
}

/// Who holds the QEMU process.
pub(crate) enum Vm {
    /// Forked by this process: the guard kills and reaps it, and removes the run directory.
    Owned(Box<VmGuard>),
    /// Found running after a restart (or left by `forkd fork --keep`): killed by pid.
    Adopted,
}

pub struct Sandbox {
    pub(crate) record: KeptChild,
    pub(crate) meta: Meta,
    state: Mutex<SandboxState>,
    vm: Mutex<Option<Vm>>,
    /// The connection, and the features its agent reported in `hello`.
    agent: Mutex<Option<(AgentClient, Vec<String>)>>,
    /// Held across a pause or resume: the QMP call and the state change are one step.
    control: Mutex<()>,
    /// Held while a connection to the agent is being made.
    connecting: Mutex<()>,
    commands: Mutex<BTreeMap<String, Arc<BackgroundCommand>>>,
    next_command: AtomicU64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long connecting to a running sandbox's agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one agent call may take when the caller gave no limit of its own.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

impl Sandbox {
    pub(crate) fn new(record: KeptChild, meta: Meta, vm: Vm, paused: bool) -> Sandbox {
        Sandbox {
            record,
            meta,
            state: Mutex::new(if paused {
                SandboxState::Paused
            } else {
                SandboxState::Running
            }),
            vm: Mutex::new(Some(vm)),
            agent: Mutex::new(None),
            control: Mutex::new(()),
            connecting: Mutex::new(()),
            commands: Mutex::new(BTreeMap::new()),
            next_command: AtomicU64::new(1),
        }
    }

    pub fn id(&self) -> &str {
        &self.record.id
    }

    pub fn run_dir(&self) -> &Path {
        &self.record.run_dir
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    pub fn state(&self) -> SandboxState {
        *lock(&self.state)
    }

    pub fn info(&self) -> SandboxInfo {
        SandboxInfo {
            id: self.record.id.clone(),
            image: self.meta.image.clone(),
            state: self.state(),
            hostname: self.record.hostname.clone(),
            pid: self.record.pid,
            created_unix: self.meta.created_unix,
            expires_unix: self.meta.expires_unix,
            labels: self.meta.labels.clone(),
            env: self.meta.env.clone(),
            memory_mib: self.meta.memory_mib,
            restored_ms: self.meta.restored_ms,
            ready_ms: self.meta.ready_ms,
            net: self.record.net,
            ports: self.record.ports.clone(),
        }
    }

    /// Whether every label in `want` is set to the same value here.
    pub fn matches(&self, want: &[(String, String)]) -> bool {
        want.iter()
            .all(|(k, v)| self.meta.labels.get(k).is_some_and(|x| x == v))
    }

    pub fn expired(&self, now_unix: u64) -> bool {
        self.meta.expires_unix.is_some_and(|e| now_unix >= e)
    }

    fn transition(&self, to: SandboxState) -> Result<()> {
        let mut s = lock(&self.state);
        if *s == to {
            return Ok(());
        }
        if !s.can_go(to) {
            return Err(SandboxError::Stopped(self.id().to_string()));
        }
        tracing::debug!("sandbox {}: {:?} -> {to:?}", self.id(), *s);
        *s = to;
        Ok(())
    }

    /// Refuse work on a sandbox that is not running, with the reason.
    fn ensure_running(&self) -> Result<()> {
        match self.state() {
            SandboxState::Running => Ok(()),
            SandboxState::Paused => Err(SandboxError::Paused(self.id().to_string())),
            SandboxState::Stopped => Err(SandboxError::Stopped(self.id().to_string())),
        }
    }

    /// The agent connection, (re)connected when needed.
    pub(crate) fn agent(&self) -> Result<AgentClient> {
        Ok(self.connection()?.0)
    }

    fn connection(&self) -> Result<(AgentClient, Vec<String>)> {
        self.ensure_running()?;
        if let Some((c, f)) = lock(&self.agent).as_ref().filter(|(c, _)| !c.is_closed()) {
            return Ok((c.clone(), f.clone()));
        }
        if !self.record.running() {
            return Err(SandboxError::Stopped(self.id().to_string()));
        }
        // One connection attempt at a time (QEMU's socket takes one client: a second would
        // wait unanswered), under a lock of its own: a guest slow to answer `hello` must not
        // hold up `stop`, which takes only the `agent` lock.
        let _connecting = lock(&self.connecting);
        if let Some((c, f)) = lock(&self.agent).as_ref().filter(|(c, _)| !c.is_closed()) {
            return Ok((c.clone(), f.clone()));
        }
        // `wait_ready` asks `hello` again until it is answered: a request sent just after the
        // previous connection closed can be lost while the agent reopens its port.
        let (conn, hello) = forkd_engine::agent::AgentConn::wait_ready(
            &self.record.agent_sock(),
            CONNECT_TIMEOUT,
            &mut || self.record.running(),
        )?;
        let c = conn.into_client();
        let features = hello.features;
        let mut slot = lock(&self.agent);
        if self.state() == SandboxState::Stopped {
            c.close();
            return Err(SandboxError::Stopped(self.id().to_string()));
        }
        if let Some((other, f)) = slot.as_ref().filter(|(o, _)| !o.is_closed()) {
            // Another call connected meanwhile: use that one.
            c.close();
            return Ok((other.clone(), f.clone()));
        }
        *slot = Some((c.clone(), features.clone()));
        Ok((c, features))
    }

    /// The connection, if its agent has `feature` (an image made by an older forkd may not).
    fn agent_with(&self, feature: &'static str) -> Result<AgentClient> {
        let (c, features) = self.connection()?;
        if !features.iter().any(|f| f == feature) {
            return Err(SandboxError::OldAgent {
                image: self.meta.image.clone(),
                feature,
            });
        }
        Ok(c)
    }

    /// Stop the vCPUs; the sandbox keeps its memory and uses no CPU.
    pub fn pause(&self) -> Result<()> {
        let _one_at_a_time = lock(&self.control);
        self.ensure_running_or_paused()?;
        self.record.pause()?;
        self.transition(SandboxState::Paused)
    }

    pub fn resume(&self) -> Result<()> {
        let _one_at_a_time = lock(&self.control);
        self.ensure_running_or_paused()?;
        self.record.resume()?;
        self.transition(SandboxState::Running)
    }

    fn ensure_running_or_paused(&self) -> Result<()> {
        if self.state() == SandboxState::Stopped {
            return Err(SandboxError::Stopped(self.id().to_string()));
        }
        Ok(())
    }

    /// Stop the VM and remove its run directory. Idempotent.
    pub(crate) fn stop(&self) {
        let _ = self.transition(SandboxState::Stopped);
        if let Some((a, _)) = lock(&self.agent).take() {
            a.close();
        }
        for c in lock(&self.commands).values() {
            c.abandon();
        }
        match lock(&self.vm).take() {
            Some(Vm::Owned(guard)) => drop(guard), // kills, reaps, removes the run directory
            Some(Vm::Adopted) => {
                let root = self.record.run_dir.parent().unwrap_or(Path::new("/"));
                if let Err(e) = forkd_engine::run::kill(root, &self.record.id) {
                    tracing::warn!("cannot stop {}: {e}", self.record.id);
                }
            }
            None => {}
        }
    }

    /// Leave the VM running when this process goes (a front end that does not own it).
    pub(crate) fn release(&self) {
        if let Some(Vm::Owned(g)) = lock(&self.vm).take() {
            g.detach();
        }
    }

    // --- work ---------------------------------------------------------------------------

    /// The request the agent gets: the sandbox's env under the command's own.
    pub(crate) fn exec_request(&self, req: &CommandRequest) -> Result<forkd_agent::ExecRequest> {
        let mut x = req.to_exec()?;
        for (k, v) in &self.meta.env {
            x.env.entry(k.clone()).or_insert_with(|| v.clone());
        }
        Ok(x)
    }

    /// Start a command whose output is streamed to the caller.
    pub fn exec_stream(&self, req: &CommandRequest) -> Result<crate::command::Running> {
        let x = self.exec_request(req)?;
        let (agent, features) = self.connection()?;
        if x.stdin_b64.is_some() && !features.iter().any(|f| f == feature::EXEC_STREAM) {
            return Err(SandboxError::OldAgent {
                image: self.meta.image.clone(),
                feature: feature::EXEC_STREAM,
            });
        }
        let busy = self.busy()?;
        let stream = agent.exec_stream(x)?;
        Ok(crate::command::Running::new(agent, stream, Some(busy)))
    }

    /// The busy lock, shared: held by work in the guest, so that a snapshot refuses meanwhile.
    fn busy(&self) -> Result<forkd_store::FileLock> {
        let p = self.record.run_dir.join(forkd_engine::branch::BUSY_LOCK);
        forkd_store::FileLock::shared(&p).map_err(|e| SandboxError::Io {
            what: "cannot lock",
            path: e.path,
            source: e.source,
        })
    }

    /// Save this sandbox, running, as the image `tag`: a branch of the image it was forked
    /// from, holding only what changed (see `forkd_engine::branch`). The sandbox runs on.
    pub fn snapshot(
        &self,
        store: &forkd_store::Store,
        qemu: &forkd_engine::qemu::Qemu,
        tag: &forkd_store::Tag,
        overwrite: forkd_store::Overwrite,
    ) -> Result<forkd_engine::image::Branched> {
        use forkd_engine::image::ImageError;
        let _one_at_a_time = lock(&self.control); // no pause or resume meanwhile
        self.ensure_running()?;
        if lock(&self.commands).values().any(|c| c.status().running) {
            return Err(SandboxError::Busy(self.id().to_string()));
        }
        forkd_engine::image::branch_into_store(store, &self.record, tag, qemu, overwrite).map_err(
            |e| match e {
                ImageError::Snapshot(EngineError::ChildBusy(id)) => SandboxError::Busy(id),
                ImageError::Snapshot(EngineError::ChildPaused(id)) => SandboxError::Paused(id),
                ImageError::Snapshot(EngineError::NoSuchChild(id)) => SandboxError::Stopped(id),
                e => SandboxError::Image(Box::new(e)),
            },
        )
    }

    /// Start a command that keeps running whatever the caller does.
    pub fn start_background(&self, req: &CommandRequest) -> Result<Arc<BackgroundCommand>> {
        let running = lock(&self.commands)
            .values()
            .filter(|c| c.status().running)
            .count();
        if running >= MAX_BACKGROUND {
            return Err(SandboxError::BadRequest {
                field: "background",
                reason: format!(
                    "sandbox {} already runs {MAX_BACKGROUND} background commands",
                    self.id()
                ),
            });
        }
        // Ids go on from the highest this process has given, and the output files are made
        // before the command starts: a command never runs without a place for its output.
        let n = self.next_command.fetch_add(1, Ordering::Relaxed);
        let id = format!("c{n}-{}", std::process::id());
        let sinks = crate::command::Sinks::create(&self.record.run_dir, &id)?;
        let running = self.exec_stream(req)?;
        let cmd = BackgroundCommand::start(id.clone(), running, sinks)?;
        lock(&self.commands).insert(id, cmd.clone());
        Ok(cmd)
    }

    pub fn command(&self, id: &str) -> Result<Arc<BackgroundCommand>> {
        lock(&self.commands)
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxError::NoSuchCommand {
                sandbox: self.id().to_string(),
                command: id.to_string(),
            })
    }

    pub fn commands(&self) -> Vec<Arc<BackgroundCommand>> {
        lock(&self.commands).values().cloned().collect()
    }

    /// Send a signal to a command's process group.
    pub fn signal(&self, pid: u32, signal: i32) -> Result<()> {
        Ok(self.agent_with(feature::SIGNAL)?.signal(pid, signal)?)
    }

    /// Code for the warm worker.
    pub fn run_code(&self, code: &str, timeout: Option<Duration>) -> Result<RunReply> {
        let t = timeout.unwrap_or(CALL_TIMEOUT);
        let _busy = self.busy()?;
        Ok(self.agent()?.run(code, t)?)
    }

    /// Write `src` to `path` in the guest, in bounded pieces; the file appears whole or not
    /// at all.
    pub fn write_file(&self, path: &str, mode: Option<u32>, src: &mut dyn Read) -> Result<u64> {
        check_path(path)?;
        Ok(self
            .agent_with(feature::FILES)?
            .write_file(path, mode, src)?)
    }

    /// Stream the file at `path` to `sink`, piece by piece.
    pub fn read_file(
        &self,
        path: &str,
        sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<u64> {
        check_path(path)?;
        Ok(self.agent_with(feature::FILES)?.read_file(path, sink)?)
    }

    pub fn list_files(&self, path: &str) -> Result<forkd_engine::mux::Listing> {
        check_path(path)?;
        Ok(self.agent_with(feature::FILES)?.list(path)?)
    }

    pub fn stat(&self, path: &str) -> Result<FileEntry> {
        check_path(path)?;
        Ok(self.agent_with(feature::FILES)?.stat(path)?)
    }

    pub fn mkdir(&self, path: &str, parents: bool) -> Result<()> {
        check_path(path)?;
        Ok(self.agent_with(feature::FILES)?.mkdir(path, parents)?)
    }

    pub fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        check_path(path)?;
        Ok(self.agent_with(feature::FILES)?.remove(path, recursive)?)
    }
}

/// Guest paths are absolute; the guest checks the rest (it owns its file system).
fn check_path(path: &str) -> Result<()> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(SandboxError::BadRequest {
            field: "path",
            reason: format!("{path:?} is not an absolute guest path"),
        });
    }
    Ok(())
}

pub(crate) fn save_meta(run_dir: &Path, meta: &Meta) -> Result<()> {
    let p = run_dir.join(META);
    let tmp: PathBuf = run_dir.join(".sandbox.json.tmp");
    let text = serde_json::to_vec_pretty(meta).unwrap_or_default();
    forkd_store::write_private(&tmp, text)
        .map_err(|e| e.source)
        .and_then(|()| std::fs::rename(&tmp, &p))
        .map_err(|source| SandboxError::Io {
            what: "cannot write",
            path: p,
            source,
        })
}

/// The saved meta of a sandbox, if any (a child kept by `forkd fork --keep` has none).
pub(crate) fn load_meta(run_dir: &Path) -> Option<Meta> {
    let p = run_dir.join(META);
    let f = std::fs::File::open(p).ok()?;
    // Our own file, but capped all the same: a record is a few hundred bytes.
    let mut text = Vec::new();
    f.take(1 << 20).read_to_end(&mut text).ok()?;
    serde_json::from_slice(&text).ok()
}
