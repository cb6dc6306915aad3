//! The engine's snapshots in the local store: take a parent snapshot straight into a staging
//! directory of the store, describe it with a manifest, install it; and check, before forking
//! one, that an installed snapshot's manifest and `engine.json` agree.

use std::path::{Path, PathBuf};

use forkd_store::{
    EngineInfo, FileEntry, Manifest, Overwrite, Snapshot, Staging, Store, StoreError, Tag,
};

use crate::EngineError;
use crate::qemu::Qemu;
use crate::snapshot::{SnapshotOptions, SnapshotOutput};
use crate::spec::VmSpec;
use crate::util::Interrupt;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("snapshot failed; the store is unchanged")]
    Snapshot(#[source] EngineError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "snapshot {tag} is inconsistent: manifest says machine {manifest_machine} / cpu {manifest_cpu}, engine.json says {spec_machine} / {spec_cpu}"
    )]
    Inconsistent {
        tag: Tag,
        manifest_machine: String,
        manifest_cpu: String,
        spec_machine: String,
        spec_cpu: String,
    },
}

/// A parent snapshot taken into a staging directory of the store: not visible as a tag until
/// [`StagedSnapshot::commit`]; dropped uncommitted, it is deleted.
pub struct StagedSnapshot {
    staging: Staging,
    output: SnapshotOutput,
}

impl StagedSnapshot {
    /// The staging directory: the engine's files are there; a caller may add its own.
    pub fn dir(&self) -> &Path {
        self.staging.dir()
    }

    /// What the engine reported: the machine, its files, how long boot and save took.
    pub fn output(&self) -> &SnapshotOutput {
        &self.output
    }

    /// The manifest of this snapshot (see [`manifest_for`]).
    pub fn manifest(
        &self,
        name: &str,
        version: &str,
        extra: &[(&str, &str)],
    ) -> Result<Manifest, ImageError> {
        manifest_for(name, version, &self.output, self.dir(), extra)
    }

    /// Install it as `tag`.
    pub fn commit(
        self,
        tag: &Tag,
        manifest: &Manifest,
        overwrite: Overwrite,
    ) -> Result<Snapshot, ImageError> {
        Ok(self.staging.commit(tag, manifest, overwrite)?)
    }
}

/// Boot, warm and save a parent into a new staging directory of `store`; its sockets and logs
/// live under the store's `run/` while it runs.
pub fn take_into_store(
    store: &Store,
    tag: &Tag,
    opts: &SnapshotOptions,
    qemu: &Qemu,
    interrupt: &Interrupt,
) -> Result<StagedSnapshot, ImageError> {
    let staging = store.stage()?;
    let run_dir =
        store
            .home()
            .run_dir()
            .join(format!("parent-{}-{}", tag.as_str(), std::process::id()));
    let output = crate::snapshot::take(qemu, opts, staging.dir(), &run_dir, interrupt)
        .map_err(ImageError::Snapshot)?;
    Ok(StagedSnapshot { staging, output })
}

/// A snapshot installed by [`snapshot_into_store`], with what the engine reported.
#[derive(Debug, Clone)]
pub struct Stored {
    pub snapshot: Snapshot,
    pub output: SnapshotOutput,
}

/// Take a parent snapshot and install it as `tag` (version "1"): the store is unchanged unless
/// all of it succeeds.
pub fn snapshot_into_store(
    store: &Store,
    tag: &Tag,
    opts: &SnapshotOptions,
    qemu: &Qemu,
    overwrite: Overwrite,
    interrupt: &Interrupt,
) -> Result<Stored, ImageError> {
    check_tag_free(store, tag, overwrite)?;
    let staged = take_into_store(store, tag, opts, qemu, interrupt)?;
    let manifest = staged.manifest(tag.as_str(), "1", &[])?;
    let output = staged.output.clone();
    let snapshot = staged.commit(tag, &manifest, overwrite)?;
    Ok(Stored { snapshot, output })
}

/// The manifest of a snapshot in `dir`: the machine from `out`, and the size and sha256 of
/// every file the engine wrote plus the `extra` (file, role) pairs the caller wrote next to
/// them. Its description is "forkd parent snapshot"; a caller may replace it.
pub fn manifest_for(
    name: &str,
    version: &str,
    out: &SnapshotOutput,
    dir: &Path,
    extra: &[(&str, &str)],
) -> Result<Manifest, ImageError> {
    manifest_of(name, version, &out.spec, &out.files, dir, extra)
}

fn manifest_of(
    name: &str,
    version: &str,
    spec: &VmSpec,
    files: &[(String, &'static str)],
    dir: &Path,
    extra: &[(&str, &str)],
) -> Result<Manifest, ImageError> {
    let mut m = Manifest::new(
        name,
        version,
        spec.mem_mib,
        EngineInfo {
            name: "qemu".into(),
            version: spec.qemu_version.clone(),
            machine_type: spec.machine.clone(),
            cpu_model: spec.cpu.clone(),
            accel_hint: Some(spec.accel.clone()),
        },
    );
    m.description = "forkd parent snapshot".into();
    let engine_files = files.iter().map(|(f, role)| (f.as_str(), *role));
    for (file, role) in engine_files.chain(extra.iter().copied()) {
        let path = dir.join(file);
        let f = std::fs::File::open(&path).map_err(|source| ImageError::Io {
            what: "cannot open",
            path: path.clone(),
            source,
        })?;
        let (size, sha256) =
            forkd_store::sparse::hash_file(&f).map_err(|source| ImageError::Io {
                what: "cannot hash",
                path,
                source,
            })?;
        m.files.insert(
            file.to_string(),
            FileEntry {
                size,
                sha256,
                role: Some(role.to_string()),
            },
        );
    }
    Ok(m)
}

/// A branch installed by [`branch_into_store`].
#[derive(Debug, Clone)]
pub struct Branched {
    pub snapshot: Snapshot,
    /// The image the child was forked from.
    pub parent: Tag,
    pub output: crate::branch::BranchOutput,
}

/// Save the running kept child `child` as the image `tag`, a branch of the image it was forked
/// from (version "1"). The child runs on. The store is unchanged unless all of it succeeds.
pub fn branch_into_store(
    store: &Store,
    child: &crate::run::KeptChild,
    tag: &Tag,
    qemu: &Qemu,
    overwrite: Overwrite,
) -> Result<Branched, ImageError> {
    check_tag_free(store, tag, overwrite)?;
    let gone = || {
        EngineError::Chain(format!(
            "the image {} that child {} was forked from is no longer installed as it was; \
             a branch records its parent, so it cannot be made",
            child.tag, child.id
        ))
    };
    let parent_tag = Tag::parse(&child.tag).map_err(|_| gone())?;
    let parent = match store.get(&parent_tag) {
        Ok(s) if s.dir == child.snapshot_dir => s,
        Ok(_) | Err(StoreError::NotFound(_)) => return Err(gone().into()),
        Err(e) => return Err(e.into()),
    };
    let spec = check_consistent(&parent)?;
    let layers = crate::branch::layers(store, &parent)?;
    let memory = layers
        .as_ref()
        .map_or_else(|| parent.dir.join(&spec.memory), |l| l.memory.clone());
    let staging = store.stage()?;
    let src = crate::branch::BranchSource {
        child,
        image: &parent,
        spec: &spec,
        memory: &memory,
    };
    let output =
        crate::branch::take(&src, &qemu.img_path(), staging.dir()).map_err(ImageError::Snapshot)?;
    let mut manifest = manifest_of(
        tag.as_str(),
        "1",
        &output.spec,
        &output.files,
        staging.dir(),
        &[],
    )?;
    manifest.set_parent(
        &format!("{}:{}", parent.tag, parent.manifest.version),
        &parent.manifest,
    );
    manifest.description = format!("forkd branch of {}, from child {}", parent.tag, child.id);
    manifest.base_image = parent.manifest.base_image.clone();
    manifest.labels = parent.manifest.labels.clone();
    let snapshot = staging.commit(tag, &manifest, overwrite)?;
    crate::branch::sweep_cache(store); // the memory of a branch this one replaced
    // Build its memory now, so that its first fork starts as fast as any.
    if let Err(e) = crate::branch::layers(store, &snapshot) {
        tracing::warn!("branch {tag} saved, but its memory could not be built yet: {e}");
    }
    Ok(Branched {
        snapshot,
        parent: parent.tag,
        output,
    })
}

/// The machine of an installed snapshot, once its manifest and `engine.json` agree on it.
pub fn check_consistent(snapshot: &Snapshot) -> Result<VmSpec, ImageError> {
    let spec = VmSpec::load(&snapshot.dir)?;
    let e = &snapshot.manifest.engine;
    if e.machine_type != spec.machine || e.cpu_model != spec.cpu {
        return Err(ImageError::Inconsistent {
            tag: snapshot.tag.clone(),
            manifest_machine: e.machine_type.clone(),
            manifest_cpu: e.cpu_model.clone(),
            spec_machine: spec.machine,
            spec_cpu: spec.cpu,
        });
    }
    spec.check_against(&snapshot.manifest)?;
    Ok(spec)
}

/// Refuse an existing `tag` (unless `overwrite`) before any VM boots: a parent is not
/// booted and warmed for nothing.
pub fn check_tag_free(store: &Store, tag: &Tag, overwrite: Overwrite) -> Result<(), ImageError> {
    if overwrite == Overwrite::No && store.get(tag).is_ok() {
        return Err(StoreError::Exists(tag.clone()).into());
    }
    Ok(())
}

/// The ids of the kept children (under `run/`, forked by the CLI or the daemon) that were
/// forked from the image `tag` and are still running, sorted.
pub fn running_children(store: &Store, tag: &Tag) -> Vec<String> {
    let dir = store.home().images_dir().join(tag.as_str());
    crate::run::list(&store.home().run_dir())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.running && (c.child.snapshot_dir == dir || c.child.tag == tag.as_str()))
        .map(|c| c.child.id)
        .collect()
}
