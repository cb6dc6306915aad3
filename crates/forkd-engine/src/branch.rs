//! Branches: a running child saved as a new image that holds only what changed since the image
//! it was forked from, and the chain of images a branch is forked through.
//!
//! A child maps its image's memory privately, so the pages it wrote are exactly its anonymous
//! pages in that mapping (`/proc/PID/pagemap`: present and not file-backed, or swapped). The
//! save is:
//!
//! 1. QMP `stop`; read those pages from `/proc/PID/mem`; save the device state alone
//!    (`xen-save-devices-state`, into a descriptor we pass); copy the disk overlay (QEMU
//!    flushed it on `stop`); `cont`. Only this is the source's pause.
//! 2. Then, with the source running again: drop the pages equal to the parent's, write the
//!    others into a sparse `memory.diff` with a page bitmap, and clear the overlay's backing
//!    file name (the chain is always given on the command line, never read from a header).
//!
//! Forking a branch maps one memory file: the root's memory with each link's pages applied,
//! built once per branch in `cache/memory/` ([`materialise`]). Its disk is a qcow2 chain down
//! to the root's raw ext4 ([`Layers::disks`]). See docs/ENGINE.md, "Branches".

use crate::error::{EngineError, IoCtx, Result};
use crate::qmp::Qmp;
use crate::run::KeptChild;
use crate::spec::{BRANCH_SPEC_FORMAT, SpecParent, VmSpec};
use forkd_store::{Snapshot, Store};
use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const DIFF_FILE: &str = "memory.diff";
pub const PAGES_FILE: &str = "memory.pages";
pub const DISK_FILE: &str = "rootfs.qcow2";
pub const STATE_FILE: &str = "vmstate";
pub use crate::guestmem::PAGE;
/// Longest chain forked through (a hostile manifest cannot make the walk endless).
pub const MAX_DEPTH: usize = 16;
pub use crate::run::BUSY_LOCK;

/// What a branch is forked through, resolved in the local store.
#[derive(Debug, Clone)]
pub struct Layers {
    /// The memory file children map: the root's memory with every link's pages applied.
    pub memory: PathBuf,
    /// The root image's kernel (children get a stub built from it).
    pub kernel: PathBuf,
    /// The disks under the branch's own `rootfs.qcow2`: the root's raw ext4 first, then each
    /// link's qcow2 in order.
    pub disks: Vec<PathBuf>,
    /// How many images lie under this one (1 for a branch of a plain image).
    pub depth: usize,
}

/// `snap` and its ancestors: `snap` first, its root (an image without a parent) last.
pub fn lineage(store: &Store, snap: &Snapshot) -> Result<Vec<Snapshot>> {
    let installed = store.images()?;
    let mut chain = vec![snap.clone()];
    let mut seen = HashSet::from([snap.manifest.digest()]);
    loop {
        let last = chain.last().expect("never empty");
        let Some(digest) = last.manifest.parent_digest.clone() else {
            return Ok(chain);
        };
        if chain.len() > MAX_DEPTH {
            return Err(EngineError::Chain(format!(
                "{} is more than {MAX_DEPTH} branches deep",
                snap.tag
            )));
        }
        if !seen.insert(digest.clone()) {
            return Err(EngineError::Chain(format!(
                "the parents of {} form a cycle at {digest} (a hostile or corrupt manifest)",
                snap.tag
            )));
        }
        match installed.iter().find(|s| s.manifest.digest() == digest) {
            Some(p) => chain.push(p.clone()),
            None => {
                return Err(EngineError::ParentMissing {
                    image: last.tag.to_string(),
                    parent: last.manifest.parent_tag.clone().unwrap_or_default(),
                    digest,
                });
            }
        }
    }
}

/// The layers of `snap`, or `None` for an image without a parent. Checks every link (its
/// manifest and engine.json agree, all links describe the same machine, each qcow2 is a plain
/// one) and builds the memory file once ([`materialise`]).
pub fn layers(store: &Store, snap: &Snapshot) -> Result<Option<Layers>> {
    if !snap.manifest.is_branch() {
        return Ok(None);
    }
    let chain = lineage(store, snap)?;
    let mut specs = Vec::with_capacity(chain.len());
    for link in &chain {
        let spec = crate::image::check_consistent(link).map_err(|e| match e {
            crate::image::ImageError::Engine(e) => e,
            e => EngineError::Corrupt(e.to_string()),
        })?;
        specs.push(spec);
    }
    let top = &specs[0];
    for (link, spec) in chain.iter().zip(&specs).skip(1) {
        if spec.mem_mib != top.mem_mib
            || spec.machine != top.machine
            || spec.cpu != top.cpu
            || spec.vcpus != top.vcpus
        {
            return Err(EngineError::Chain(format!(
                "{} and its parent {} describe different machines",
                snap.tag, link.tag
            )));
        }
    }
    for (link, spec) in chain.iter().zip(&specs) {
        if spec.parent.is_some() {
            crate::qcow2::check_plain(&link.dir.join(&spec.rootfs))?;
        }
    }
    let (root, root_spec) = (chain.last().expect("root"), specs.last().expect("root"));
    let disks = chain
        .iter()
        .zip(&specs)
        .skip(1)
        .rev()
        .map(|(l, s)| l.dir.join(&s.rootfs))
        .collect();
    let memory = materialise(store, &chain, &specs)?;
    Ok(Some(Layers {
        memory,
        kernel: root.dir.join(&root_spec.kernel),
        disks,
        depth: chain.len() - 1,
    }))
}

/// Where the memory of the branch with manifest digest `digest` is built.
fn cache_path(store: &Store, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    store
        .home()
        .cache_dir()
        .join("memory")
        .join(hex)
        .join("memory.bin")
}

/// Remove the memory [`materialise`] built for branches that are no longer installed (after
/// `rmi`, or a branch replaced by `--force`). Built memory of installed branches stays.
pub fn sweep_cache(store: &Store) {
    let root = store.home().cache_dir().join("memory");
    let Ok(entries) = std::fs::read_dir(&root) else {
        return;
    };
    let installed: HashSet<String> = store
        .images()
        .unwrap_or_default()
        .iter()
        .map(|i| i.manifest.digest())
        .collect();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !installed.contains(&format!("sha256:{name}")) {
            // A directory we made (no link is followed by remove_dir_all).
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The full memory of `chain[0]`: its parent's (built the same way, or the root's memory.bin)
/// with its own pages applied. Built once, under a lock, into a temporary file that is renamed
/// into place: a crash leaves no half file.
fn materialise(store: &Store, chain: &[Snapshot], specs: &[VmSpec]) -> Result<PathBuf> {
    let (snap, spec) = (&chain[0], &specs[0]);
    let Some(parent) = &spec.parent else {
        return Ok(snap.dir.join(&spec.memory));
    };
    let out = cache_path(store, &snap.manifest.digest());
    let dir = out.parent().expect("cache path has a parent").to_path_buf();
    if out.is_file() {
        return Ok(out);
    }
    let base = materialise(store, &chain[1..], &specs[1..])?;
    forkd_store::private_dir(dir.parent().expect("memory/"))?;
    forkd_store::private_dir(&dir)?;
    let _lock = forkd_store::FileLock::exclusive(&dir.join(".lock"), |_| {
        tracing::info!(
            "waiting for another forkd to build the memory of {}",
            snap.tag
        )
    })?;
    if out.is_file() {
        return Ok(out);
    }
    let start = Instant::now();
    let tmp = dir.join(".memory.bin.tmp");
    let _ = std::fs::remove_file(&tmp);
    crate::snapshot::copy_sparse(&base, &tmp)?;
    let bytes = spec.mem_bytes()?;
    let pages = read_bitmap(&snap.dir.join(&parent.pages), bytes / PAGE)?;
    let diff = forkd_store::open_nofollow(&snap.dir.join(&spec.memory))
        .at("cannot open", snap.dir.join(&spec.memory))?;
    let dst = forkd_store::private_options()
        .write(true)
        .open(&tmp)
        .at("cannot open", &tmp)?;
    let mut buf = vec![0u8; 256 * PAGE as usize];
    for (first, count) in runs(&pages) {
        let mut done = 0;
        while done < count {
            let n = (count - done).min(256);
            let off = (first + done) * PAGE;
            let b = &mut buf[..(n * PAGE) as usize];
            diff.read_exact_at(b, off).at("cannot read", &snap.dir)?;
            dst.write_all_at(b, off).at("cannot write", &tmp)?;
            done += n;
        }
    }
    dst.sync_all().at("cannot sync", &tmp)?;
    std::fs::rename(&tmp, &out).at("cannot install", &out)?;
    tracing::info!(
        "built the memory of {} in {} ms",
        snap.tag,
        start.elapsed().as_millis()
    );
    Ok(out)
}

/// A page bitmap: exactly `ceil(pages / 8)` bytes, no bit set past `pages`.
fn read_bitmap(path: &Path, pages: u64) -> Result<Vec<bool>> {
    let want = pages.div_ceil(8);
    let f = forkd_store::open_nofollow(path).at("cannot open", path)?;
    let mut bytes = Vec::new();
    f.take(want + 1)
        .read_to_end(&mut bytes)
        .at("cannot read", path)?;
    if bytes.len() as u64 != want {
        return Err(EngineError::Corrupt(format!(
            "{}: {} bytes, but the machine's {pages} pages need {want}",
            path.display(),
            bytes.len()
        )));
    }
    let bits: Vec<bool> = (0..want * 8)
        .map(|i| bytes[(i / 8) as usize] & (1 << (i % 8)) != 0)
        .collect();
    if bits[pages as usize..].iter().any(|b| *b) {
        return Err(EngineError::Corrupt(format!(
            "{}: names pages past the end of memory",
            path.display()
        )));
    }
    Ok(bits[..pages as usize].to_vec())
}

fn write_bitmap(path: &Path, pages: u64, set: &[u64]) -> Result<()> {
    let mut bytes = vec![0u8; pages.div_ceil(8) as usize];
    for &p in set {
        bytes[(p / 8) as usize] |= 1 << (p % 8);
    }
    Ok(forkd_store::write_private(path, bytes)?)
}

/// Runs of set bits: (first index, length).
fn runs(bits: &[bool]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
        let i = i as u64;
        match out.last_mut() {
            Some((first, n)) if *first + *n == i => *n += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

/// The child to branch and what it was forked from.
pub struct BranchSource<'a> {
    pub child: &'a KeptChild,
    /// The image the child was forked from, and its engine.json.
    pub image: &'a Snapshot,
    pub spec: &'a VmSpec,
    /// The memory file the child maps (its image's memory.bin, or a branch's built memory).
    pub memory: &'a Path,
}

/// What a branch snapshot measured and wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BranchOutput {
    #[serde(skip)]
    pub spec: VmSpec,
    /// (file name, role) of every file written, engine.json included.
    #[serde(skip)]
    pub files: Vec<(String, &'static str)>,
    /// How long the source child's vCPUs were stopped.
    pub pause_ms: u64,
    /// Pages the child had written (private in its mapping).
    pub dirty_pages: u64,
    /// Of those, the pages that differ from the parent's: what the branch stores.
    pub own_pages: u64,
    /// Bytes of the disk changes (the qcow2).
    pub disk_bytes: u64,
    pub total_ms: u64,
}

/// Save the running child `src.child` into `out` (an empty staging directory). The child is
/// paused only while its state is read, and runs on afterwards, whatever happens.
pub fn take(src: &BranchSource<'_>, qemu_img: &Path, out: &Path) -> Result<BranchOutput> {
    let start = Instant::now();
    let child = src.child;
    if !child.running() {
        return Err(EngineError::NoSuchChild(child.id.clone()));
    }
    // An exec in flight would be cut in half in every grandchild; another snapshot would race.
    let busy = child.run_dir.join(BUSY_LOCK);
    let Some(_busy) = forkd_store::FileLock::try_exclusive(&busy)? else {
        return Err(EngineError::ChildBusy(child.id.clone()));
    };
    let mut qmp = Qmp::connect(&child.qmp_sock(), Duration::from_secs(5), &mut || {
        child.running()
    })?;
    match qmp.status()?.as_str() {
        "running" => {}
        "paused" => return Err(EngineError::ChildPaused(child.id.clone())),
        other => {
            return Err(EngineError::Qmp(format!(
                "child {} is {other}, not running",
                child.id
            )));
        }
    }
    let bytes = src.spec.mem_bytes()?;
    let npages = bytes / PAGE;
    let base = std::fs::metadata(src.memory).at("cannot read", src.memory)?;
    let map = match (
        crate::guestmem::find_mapping(child.pid, &base, bytes),
        child.memory_file,
    ) {
        (Ok(m), _) => m,
        // Forked while its image was pulled lazily: it maps the lazy mount's copy. Its bytes
        // are the installed image's (src.memory, which the comparison below reads).
        (Err(_), Some(id)) => crate::guestmem::find_mapping_of(child.pid, id, bytes)?,
        (Err(e), None) => return Err(e),
    };
    let state_path = out.join(STATE_FILE);
    let state = create_new(&state_path)?;
    let disk_src = overlay_of(child.pid, &child.run_dir)?;
    let disk_path = out.join(DISK_FILE);

    // The pause: nothing in here may wait on the guest.
    let paused = Instant::now();
    qmp.execute("stop", None)?;
    let saved = (|| -> Result<(Vec<u64>, Vec<u8>)> {
        let dirty = map.dirty_pages(npages)?;
        let data = map.read_pages(&dirty)?;
        save_devices(&mut qmp, &state)?;
        copy_file(&disk_src, &disk_path)?;
        Ok((dirty, data))
    })();
    let resumed = qmp.execute("cont", None);
    let pause_ms = paused.elapsed().as_millis() as u64;
    let (dirty, data) = saved?;
    resumed?;
    drop(qmp);
    state.sync_all().at("cannot sync", &state_path)?;

    // Keep the pages that differ from the parent's.
    let parent_mem = File::open(src.memory).at("cannot open", src.memory)?;
    let diff_path = out.join(DIFF_FILE);
    let diff = create_new(&diff_path)?;
    diff.set_len(bytes).at("cannot size", &diff_path)?;
    let mut own = Vec::new();
    let mut theirs = vec![0u8; PAGE as usize];
    for (i, &p) in dirty.iter().enumerate() {
        let mine = &data[i * PAGE as usize..(i + 1) * PAGE as usize];
        parent_mem
            .read_exact_at(&mut theirs, p * PAGE)
            .at("cannot read", src.memory)?;
        if mine == theirs.as_slice() {
            continue;
        }
        own.push(p);
        if mine.iter().any(|b| *b != 0) {
            diff.write_all_at(mine, p * PAGE)
                .at("cannot write", &diff_path)?;
        }
    }
    diff.sync_all().at("cannot sync", &diff_path)?;
    write_bitmap(&out.join(PAGES_FILE), npages, &own)?;
    crate::qcow2::drop_backing(qemu_img, &disk_path)?;
    crate::qcow2::check_plain(&disk_path)?;
    let disk_bytes = std::fs::metadata(&disk_path)
        .at("cannot read", &disk_path)?
        .len();

    let mut spec = src.spec.clone();
    spec.format = BRANCH_SPEC_FORMAT;
    spec.rootfs = DISK_FILE.into();
    spec.memory = DIFF_FILE.into();
    spec.vmstate = STATE_FILE.into();
    spec.initrd = None;
    spec.parent = Some(SpecParent {
        digest: src.image.manifest.digest(),
        pages: PAGES_FILE.into(),
    });
    spec.save(out)?;
    Ok(BranchOutput {
        spec,
        files: vec![
            (DIFF_FILE.into(), "memory"),
            (PAGES_FILE.into(), "memory-pages"),
            (DISK_FILE.into(), "rootfs"),
            (STATE_FILE.into(), "vmstate"),
            (crate::spec::SPEC_FILE.into(), "engine"),
        ],
        pause_ms,
        dirty_pages: dirty.len() as u64,
        own_pages: own.len() as u64,
        disk_bytes,
        total_ms: start.elapsed().as_millis() as u64,
    })
}

/// The child's disk overlay: the temporary qcow2 QEMU made for `snapshot=on` in the child's
/// run directory (`vl.XXXXXX`) and unlinked at once. It is reached through QEMU's own open
/// descriptor (`/proc/PID/fd/N`), taken only when that descriptor is a regular file that was
/// created directly in the run directory.
fn overlay_of(pid: u32, run_dir: &Path) -> Result<PathBuf> {
    let fds = PathBuf::from(format!("/proc/{pid}/fd"));
    let want = format!("{}/vl.", run_dir.display());
    for entry in std::fs::read_dir(&fds).at("cannot read", &fds)?.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        let name = t.trim_end_matches(" (deleted)");
        if name.starts_with(&want)
            && !name[want.len()..].contains('/')
            && std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file())
        {
            return Ok(entry.path());
        }
    }
    Err(EngineError::Qmp(format!(
        "QEMU (pid {pid}) has no disk overlay open in {}",
        run_dir.display()
    )))
}

/// QMP `xen-save-devices-state` into `file`: every device's state and no RAM, written by
/// QEMU to the descriptor we hand it (a sandboxed QEMU opens nothing itself).
fn save_devices(qmp: &mut Qmp, file: &File) -> Result<()> {
    use std::os::fd::AsFd;
    const FDSET: u64 = 61;
    qmp.execute_passing(
        "add-fd",
        Some(serde_json::json!({ "fdset-id": FDSET })),
        Some(file.as_fd()),
    )?;
    let saved = qmp.execute(
        "xen-save-devices-state",
        Some(serde_json::json!({ "filename": format!("/dev/fdset/{FDSET}"), "live": false })),
    );
    let _ = qmp.execute("remove-fd", Some(serde_json::json!({ "fdset-id": FDSET })));
    saved.map(|_| ())
}

/// A new private file at `path` (never an existing one, nor through a link).
fn create_new(path: &Path) -> Result<File> {
    forkd_store::private_options()
        .write(true)
        .create_new(true)
        .open(path)
        .at("cannot create", path)
}

/// Copy `src` (QEMU's descriptor of the overlay, see [`overlay_of`]) to a new private file.
fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    let mut from = File::open(src).at("cannot open", src)?;
    let mut to = create_new(dst)?;
    std::io::copy(&mut from, &mut to).at("cannot copy", src)?;
    to.flush().at("cannot write", dst)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_round_trip_and_refuse_bad_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pages");
        write_bitmap(&p, 20, &[0, 1, 2, 9, 19]).unwrap();
        let bits = read_bitmap(&p, 20).unwrap();
        assert_eq!(runs(&bits), vec![(0, 3), (9, 1), (19, 1)]);
        assert!(read_bitmap(&p, 30).is_err(), "too short for 30 pages");
        std::fs::write(&p, [0u8, 0, 0b1000_0000]).unwrap();
        assert!(read_bitmap(&p, 20).is_err(), "bit 23 is past 20 pages");
        assert_eq!(
            crate::guestmem::page_runs(&[1, 2, 3, 7, 8]),
            vec![(1, 3), (7, 2)]
        );
    }
}
