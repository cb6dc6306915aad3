//! The [`Manager`]: every sandbox of one `$FORKD_HOME`, created, found, expired and stopped
//! through it. A daemon holds one for its whole life ([`Ownership::Owner`]: its sandboxes stop
//! with it); a CLI command without a daemon opens one for a moment ([`Ownership::Visitor`]: it
//! drives children that outlive it, as `forkd fork --keep` left them).

use crate::error::{Result, SandboxError};
use crate::sandbox::lock;
use crate::sandbox::{Meta, Sandbox, SandboxInfo, Vm, load_meta, save_meta};
use forkd_engine::Interrupt;
use forkd_engine::child::{ChildReport, Work};
use forkd_engine::fork::{ForkOptions, ForkReport, OnChild};
use forkd_engine::qemu::{AccelChoice, Qemu};
use forkd_engine::run::KeptChild;
use forkd_store::{Store, Tag};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Whether the sandboxes stop when the manager goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// A daemon: it owns every sandbox; [`Manager::shutdown`] stops them all.
    Owner,
    /// A short-lived front end: sandboxes keep running after it exits.
    Visitor,
}

pub struct ManagerOptions {
    pub store: Store,
    /// `$FORKD_HOME/run`.
    pub run_root: PathBuf,
    pub qemu: Option<PathBuf>,
    pub accel: AccelChoice,
    pub ownership: Ownership,
    /// How long a child may take to answer after its restore.
    pub ready_timeout: Duration,
}

/// Most children one request may ask for.
pub const MAX_COUNT: usize = 1000;
/// Longest time to live a sandbox may be given: one year.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// A request for `count` sandboxes from one image.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateRequest {
    /// A local tag.
    pub tag: String,
    pub count: usize,
    pub env: BTreeMap<String, String>,
    pub ttl: Option<Duration>,
    pub labels: BTreeMap<String, String>,
    pub memory_mib: Option<u64>,
    /// The image name to show (the hub reference the tag came from, or the tag).
    pub image: Option<String>,
    /// Give each child a network (`None`: none at all).
    pub network: Option<crate::network::Network>,
}

/// One result per requested child, in order.
pub struct CreateOutcome {
    pub report: ForkReport,
    pub results: Vec<std::result::Result<Arc<Sandbox>, String>>,
}

struct Inner {
    store: Store,
    run_root: PathBuf,
    qemu_path: Option<PathBuf>,
    accel: AccelChoice,
    ownership: Ownership,
    ready_timeout: Duration,
    sandboxes: RwLock<BTreeMap<String, Arc<Sandbox>>>,
    /// Images being pulled lazily, by local tag: their files in a lazy mount until installed
    /// ([`crate::images::ensure`]).
    lazy: Mutex<BTreeMap<String, Served>>,
    /// One lock per tag, held while a lazy pull of it starts, so one image is started once
    /// (and a slow start of one image does not hold up another's).
    lazy_start: Mutex<BTreeMap<String, Arc<Mutex<()>>>>,
}

/// An image served from a lazy mount while it is pulled.
#[derive(Clone)]
struct Served {
    snapshot: forkd_store::Snapshot,
    /// Keeps the mount attached while a fork that resolved the image to it starts.
    pin: Option<Arc<forkd_lazyfs::Mount>>,
}

/// Cheap to clone; every clone sees the same sandboxes.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Manager {
    pub fn new(opts: ManagerOptions) -> Manager {
        Manager {
            inner: Arc::new(Inner {
                store: opts.store,
                run_root: opts.run_root,
                qemu_path: opts.qemu,
                accel: opts.accel,
                ownership: opts.ownership,
                ready_timeout: opts.ready_timeout,
                sandboxes: RwLock::new(BTreeMap::new()),
                lazy: Mutex::new(BTreeMap::new()),
                lazy_start: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn run_root(&self) -> &Path {
        &self.inner.run_root
    }

    fn table(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Sandbox>>> {
        self.inner
            .sandboxes
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn table_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Sandbox>>> {
        self.inner
            .sandboxes
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Find every child left under `run/` (by a crashed daemon, or by `forkd fork --keep`):
    /// adopt those still running, and remove the records of those that are not. Returns the
    /// ids adopted and the ids cleaned up. Directories without a record (a fork in progress
    /// in another process) are left alone.
    pub fn recover(&self) -> Result<(Vec<String>, Vec<String>)> {
        let mut adopted = Vec::new();
        let mut removed: Vec<String> = forkd_engine::run::sweep_orphans(&self.inner.run_root)
            .into_iter()
            .map(|d| d.display().to_string())
            .collect();
        for st in forkd_engine::run::list(&self.inner.run_root)? {
            let id = st.child.id.clone();
            if self.table().contains_key(&id) {
                continue;
            }
            if !st.running {
                match forkd_engine::run::kill(&self.inner.run_root, &id) {
                    Ok(()) => removed.push(id),
                    Err(e) => tracing::warn!("cannot clean up {id}: {e}"),
                }
                continue;
            }
            self.adopt_running(st.child);
            adopted.push(id);
        }
        Ok((adopted, removed))
    }

    /// Whether this manager's children live as long as it does (a daemon), so that it can
    /// serve them an image through a lazy mount.
    pub fn owns_children(&self) -> bool {
        self.inner.ownership == Ownership::Owner
    }

    /// The image `tag` while it is being pulled lazily: its files in the lazy mount.
    pub fn lazy_image(&self, tag: &str) -> Option<forkd_store::Snapshot> {
        lock(&self.inner.lazy).get(tag).map(|s| s.snapshot.clone())
    }

    /// The lock to hold while a lazy pull of `tag` is started (one start per image).
    pub(crate) fn lazy_start_lock(&self, tag: &str) -> Arc<Mutex<()>> {
        lock(&self.inner.lazy_start)
            .entry(tag.to_string())
            .or_default()
            .clone()
    }

    /// Serve `pull`'s image to new sandboxes until it is installed. A thread waits for the
    /// pull; the mount is then detached, and the children already running keep reading
    /// through it until they exit (this process serves it).
    pub(crate) fn serve_lazy(&self, pull: crate::images::LazyPull) {
        let tag = pull.snapshot().tag.as_str().to_string();
        // In the table before the thread can end (it removes the entry when it does); out of
        // it again if the thread cannot start (the pull is then dropped, and abandoned).
        let served = Served {
            snapshot: pull.snapshot().clone(),
            pin: pull.pin(),
        };
        lock(&self.inner.lazy).insert(tag.clone(), served);
        let inner = Arc::downgrade(&self.inner);
        let gone = tag.clone();
        let spawned = std::thread::Builder::new()
            .name("lazy-pull-wait".into())
            .spawn(move || {
                match pull.finish() {
                    Ok(out) => tracing::info!("lazily pulled image `{}` is installed", out.tag),
                    Err(e) => tracing::warn!("the lazy pull of `{tag}` failed: {e}"),
                }
                if let Some(inner) = inner.upgrade() {
                    // Dropped after the lock: it may be the mount's last holder, and
                    // unmounting must not hold up every lookup.
                    let served = lock(&inner.lazy).remove(&tag);
                    drop(served);
                }
            });
        if let Err(e) = spawned {
            let served = lock(&self.inner.lazy).remove(&gone);
            drop(served);
            tracing::warn!("cannot start the thread that waits for a lazy pull: {e}");
        }
    }

    /// Look up the image for a tag (its manifest gives the machine's memory).
    pub fn image(&self, tag: &str) -> Result<forkd_store::Snapshot> {
        Ok(self.resolve(tag)?.snapshot)
    }

    /// [`Manager::image`], with a hold on its lazy mount when it is served from one.
    fn resolve(&self, tag: &str) -> Result<Served> {
        let t = Tag::parse(tag).map_err(|e| SandboxError::BadRequest {
            field: "image",
            reason: e.to_string(),
        })?;
        match self.inner.store.get(&t) {
            Ok(snapshot) => Ok(Served {
                snapshot,
                pin: None,
            }),
            Err(forkd_store::StoreError::NotFound(_)) => lock(&self.inner.lazy)
                .get(tag)
                .cloned()
                .ok_or_else(|| SandboxError::NoSuchImage(tag.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// Check `req` as [`Manager::create`] does before it starts a child: the fields, the image,
    /// its engine files, and whether `count` children fit on this host. Returns the image.
    pub fn admit(&self, req: &CreateRequest) -> Result<forkd_store::Snapshot> {
        Ok(self.admit_served(req)?.snapshot)
    }

    fn admit_served(&self, req: &CreateRequest) -> Result<Served> {
        if req.count == 0 || req.count > MAX_COUNT {
            return Err(SandboxError::BadRequest {
                field: "count",
                reason: format!("must be 1…{MAX_COUNT}, not {}", req.count),
            });
        }
        for (k, v) in &req.labels {
            if k.is_empty() || k.len() > 128 || v.len() > 1024 || k.contains('=') {
                return Err(SandboxError::BadRequest {
                    field: "labels",
                    reason: format!(
                        "label {k:?} must be 1…128 bytes without '=', its value at most 1024"
                    ),
                });
            }
        }
        if let Some(t) = req.ttl
            && (t.is_zero() || t > MAX_TTL)
        {
            return Err(SandboxError::BadRequest {
                field: "ttl_s",
                reason: format!(
                    "must be 1…{} seconds, not {}",
                    MAX_TTL.as_secs(),
                    t.as_secs()
                ),
            });
        }
        let served = self.resolve(&req.tag)?;
        let snap = &served.snapshot;
        let mem = snap.manifest.memory_mib;
        if let Some(m) = req.memory_mib
            && m != mem
        {
            return Err(SandboxError::BadRequest {
                field: "memory_mib",
                reason: format!(
                    "image {} has {mem} MiB of RAM, and a restored machine keeps its parent's RAM; \
                     omit memory_mib or pass {mem}",
                    req.tag
                ),
            });
        }
        forkd_engine::image::check_consistent(snap)
            .map_err(|e| SandboxError::Image(Box::new(e)))?;
        if let Some(n) = &req.network {
            let fixed = crate::network::fixed_ports(&n.config()?);
            forkd_engine::net::check_fixed_ports(&fixed, req.count)?;
        }
        forkd_engine::fork::admit(&snap.dir, req.count)?;
        Ok(served)
    }

    /// Fork `req.count` sandboxes. Admission (capacity) is checked before any child starts;
    /// after that each child succeeds or fails on its own. `on_child` sees each child as it
    /// comes up.
    pub fn create(&self, req: &CreateRequest, on_child: Option<OnChild>) -> Result<CreateOutcome> {
        // `pin` holds the lazy mount (if the image is served from one) until the children
        // have opened its files: the pull may end, and detach it, while they start.
        let Served {
            snapshot: snap,
            pin,
        } = self.admit_served(req)?;
        let mem = snap.manifest.memory_mib;
        let qemu = Qemu::locate(self.inner.qemu_path.as_deref())?;
        let opts = ForkOptions {
            n: req.count,
            tag: snap.tag.as_str().to_string(),
            accel: self.inner.accel,
            work: Work::default(),
            keep: true,
            run_root: self.inner.run_root.clone(),
            ready_timeout: self.inner.ready_timeout,
            interrupt: Interrupt::never(),
            on_child,
            layers: forkd_engine::branch::layers(&self.inner.store, &snap)
                .map_err(|e| SandboxError::Image(Box::new(e.into())))?,
            net: match &req.network {
                Some(n) => {
                    let program =
                        crate::network::netd_program().map_err(|source| SandboxError::Io {
                            what: "cannot find the forkd binary to serve networks",
                            path: PathBuf::from("/proc/self/exe"),
                            source,
                        })?;
                    Some(n.plan(&program)?)
                }
                None => None,
            },
        };
        // A child of a lazily pulled image is recorded with the image's place in the store:
        // the mount goes away, and the installed image has the same bytes (what `forkd rm`
        // checks for running children, and where a branch finds its parent's files), and with
        // the identity of the memory file it maps, which a branch looks for. Both are taken
        // before the fork, while `pin` keeps the mount attached.
        let (record_dir, memory_file) = match &pin {
            Some(_) => {
                let spec = forkd_engine::spec::VmSpec::load(&snap.dir)
                    .map_err(|e| SandboxError::Image(Box::new(e.into())))?;
                let mem_path = snap.dir.join(&spec.memory);
                let m = std::fs::metadata(&mem_path).map_err(|source| SandboxError::Io {
                    what: "cannot read the lazily pulled memory file",
                    path: mem_path,
                    source,
                })?;
                use std::os::unix::fs::MetadataExt;
                (
                    self.inner.store.home().images_dir().join(&req.tag),
                    Some([m.dev(), m.ino()]),
                )
            }
            None => (snap.dir.clone(), None),
        };
        let (report, guards) = forkd_engine::fork::fork_owned(&snap.dir, &qemu, &opts)?;
        drop(pin);
        let created = now_unix();
        let mut results = Vec::with_capacity(report.children.len());
        for (child, guard) in report.children.iter().zip(guards) {
            let Some(guard) = guard else {
                results.push(Err(child
                    .error
                    .clone()
                    .unwrap_or_else(|| "the child did not come up".into())));
                continue;
            };
            let meta = Meta {
                image: req.image.clone().unwrap_or_else(|| req.tag.clone()),
                labels: req.labels.clone(),
                env: req.env.clone(),
                memory_mib: mem,
                created_unix: created,
                expires_unix: req.ttl.map(|t| created.saturating_add(t.as_secs().max(1))),
                restored_ms: child.restored_ms,
                ready_ms: child.ready_ms,
            };
            match self.adopt_new(child, &opts.tag, &record_dir, memory_file, guard, meta) {
                Ok(sb) => results.push(Ok(sb)),
                Err(e) => results.push(Err(e.to_string())),
            }
        }
        Ok(CreateOutcome { report, results })
    }

    /// Record a freshly forked child on disk, then take it into the table. If the record
    /// cannot be written the guard is dropped, which stops the VM: nothing runs unrecorded.
    fn adopt_new(
        &self,
        child: &ChildReport,
        tag: &str,
        snapshot_dir: &Path,
        memory_file: Option<[u64; 2]>,
        guard: forkd_engine::child::VmGuard,
        meta: Meta,
    ) -> Result<Arc<Sandbox>> {
        let mut rec = KeptChild::new(child, tag, snapshot_dir, &guard);
        rec.memory_file = memory_file;
        save_meta(&guard.run_dir, &meta)?;
        rec.save()?;
        let vm = match self.inner.ownership {
            Ownership::Owner => Vm::Owned(Box::new(guard)),
            Ownership::Visitor => {
                guard.detach();
                Vm::Adopted
            }
        };
        let sb = Arc::new(Sandbox::new(rec, meta, vm, false));
        self.table_mut().insert(sb.id().to_string(), sb.clone());
        Ok(sb)
    }

    /// Save the running sandbox `id` as the image `tag` (see [`Sandbox::snapshot`]).
    pub fn snapshot(
        &self,
        id: &str,
        tag: &str,
        overwrite: forkd_store::Overwrite,
    ) -> Result<forkd_engine::image::Branched> {
        let tag = Tag::parse(tag).map_err(|e| SandboxError::BadRequest {
            field: "tag",
            reason: e.to_string(),
        })?;
        let sb = self.get(id)?;
        let qemu = Qemu::locate(self.inner.qemu_path.as_deref())?;
        sb.snapshot(&self.inner.store, &qemu, &tag, overwrite)
    }

    /// Every sandbox whose labels include all of `labels`, sorted by id.
    pub fn list(&self, labels: &[(String, String)]) -> Vec<Arc<Sandbox>> {
        self.table()
            .values()
            .filter(|s| s.matches(labels))
            .cloned()
            .collect()
    }

    pub fn infos(&self, labels: &[(String, String)]) -> Vec<SandboxInfo> {
        self.list(labels).iter().map(|s| s.info()).collect()
    }

    /// Take a running child found on disk into the table, with what its `sandbox.json` says
    /// (a child kept by `forkd fork --keep` has none: its tag and start time stand in).
    fn adopt_running(&self, rec: KeptChild) -> Arc<Sandbox> {
        let meta = load_meta(&rec.run_dir).unwrap_or_else(|| Meta {
            image: rec.tag.clone(),
            created_unix: rec.started_unix,
            ..Meta::default()
        });
        let paused = rec.paused().unwrap_or(false);
        let id = rec.id.clone();
        let sb = Arc::new(Sandbox::new(rec, meta, Vm::Adopted, paused));
        self.table_mut().insert(id, sb.clone());
        sb
    }

    /// A sandbox by id. A visitor also finds children recorded on disk by another process.
    pub fn get(&self, id: &str) -> Result<Arc<Sandbox>> {
        if let Some(s) = self.table().get(id) {
            return Ok(s.clone());
        }
        if self.inner.ownership == Ownership::Visitor {
            let rec = forkd_engine::run::find(&self.inner.run_root, id)?;
            if !rec.running() {
                return Err(SandboxError::Stopped(id.to_string()));
            }
            return Ok(self.adopt_running(rec));
        }
        Err(SandboxError::NoSuchSandbox(id.to_string()))
    }

    /// Stop a sandbox: its VM, sockets, overlay and records are gone afterwards.
    pub fn kill(&self, id: &str) -> Result<()> {
        let sb = match self.get(id) {
            Ok(sb) => sb,
            // A visitor asked to kill a child whose VM already exited: clean up its record.
            Err(SandboxError::Stopped(_)) => {
                forkd_engine::run::kill(&self.inner.run_root, id)?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        self.table_mut().remove(id);
        sb.stop();
        Ok(())
    }

    pub fn pause(&self, id: &str) -> Result<Arc<Sandbox>> {
        let sb = self.get(id)?;
        sb.pause()?;
        Ok(sb)
    }

    pub fn resume(&self, id: &str) -> Result<Arc<Sandbox>> {
        let sb = self.get(id)?;
        sb.resume()?;
        Ok(sb)
    }

    /// Stop every sandbox whose time is up, and forget those whose VM exited by itself.
    /// Returns the ids stopped. A daemon calls this every second.
    pub fn reap(&self) -> Vec<String> {
        let now = now_unix();
        let doomed: Vec<Arc<Sandbox>> = self
            .table()
            .values()
            .filter(|s| s.expired(now) || !s.record.running())
            .cloned()
            .collect();
        let mut ids = Vec::new();
        for sb in doomed {
            tracing::info!(
                "sandbox {}: {}",
                sb.id(),
                if sb.expired(now) {
                    "its ttl ran out; stopping it"
                } else {
                    "its VM exited; cleaning up"
                }
            );
            self.table_mut().remove(sb.id());
            sb.stop();
            ids.push(sb.id().to_string());
        }
        ids
    }

    /// Stop every sandbox (an owner shutting down). A visitor leaves them running.
    pub fn shutdown(&self) {
        let all: Vec<Arc<Sandbox>> = std::mem::take(&mut *self.table_mut())
            .into_values()
            .collect();
        for sb in all {
            match self.inner.ownership {
                Ownership::Owner => sb.stop(),
                Ownership::Visitor => sb.release(),
            }
        }
    }

    /// How many sandboxes are running and paused.
    pub fn counts(&self) -> (usize, usize) {
        let t = self.table();
        let paused = t
            .values()
            .filter(|s| s.state() == crate::SandboxState::Paused)
            .count();
        (t.len() - paused, paused)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A visitor's sandboxes outlive it; an owner's are stopped by `shutdown` (or, if the
        // owner forgot, by their guards right here).
        if self.ownership == Ownership::Visitor {
            let t = std::mem::take(&mut *self.sandboxes.write().unwrap_or_else(|p| p.into_inner()));
            for sb in t.into_values() {
                sb.release();
            }
        }
    }
}
