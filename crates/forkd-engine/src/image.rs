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
    let mut m = Manifest::new(
        name,
        version,
        out.spec.mem_mib,
        EngineInfo {
            name: "qemu".into(),
            version: out.spec.qemu_version.clone(),
            machine_type: out.spec.machine.clone(),
            cpu_model: out.spec.cpu.clone(),
            accel_hint: Some(out.spec.accel.clone()),
        },
    );
    m.description = "forkd parent snapshot".into();
    let engine_files = out.files.iter().map(|(f, role)| (f.as_str(), *role));
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
