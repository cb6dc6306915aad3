//! The VM half of a build: boot the recipe's image with the engine, warm it, save the parent
//! into the local store with the recipe's metadata and licences, after the recipe's smoke
//! checks passed in a child forked from it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forkd_engine::EngineError;
use forkd_engine::Interrupt;
use forkd_engine::child::Work;
use forkd_engine::fork::ForkOptions;
use forkd_engine::image::{ImageError, StagedSnapshot};
use forkd_engine::qemu::{AccelChoice, Qemu};
use forkd_engine::snapshot::SnapshotOptions;
use forkd_store::{Home, Manifest, Overwrite, Snapshot, Store, StoreError, Tag};

use crate::image::{INIT_PATH, LICENCES_FILE};
use crate::{BuiltImage, LicenceReport, LoadedRecipe, Progress, RecipeError};

/// The recipe file as it was built, stored in the snapshot next to the licences.
pub const RECIPE_COPY: &str = "recipe.toml";

#[derive(Debug, thiserror::Error)]
pub enum ParentError {
    #[error("guest boot file {} not found", .0.display())]
    BootFile(PathBuf),
    #[error(transparent)]
    Image(Box<ImageError>),
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("smoke[{index}]: cannot fork {tag}")]
    SmokeFork {
        index: usize,
        tag: Tag,
        #[source]
        source: EngineError,
    },
    #[error("the fork reported no child")]
    NoChild,
    #[error(
        "smoke[{index}] failed in a forked child of {tag}: expected {expect:?} in the output{}\n--- output ---\n{output}",
        error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
    )]
    SmokeFailed {
        index: usize,
        tag: Tag,
        expect: String,
        error: Option<String>,
        output: String,
    },
    #[error("saving {tag}")]
    Save {
        tag: Tag,
        #[source]
        source: Box<ImageError>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{tag} has no {LICENCES_FILE}")]
    NoLicences {
        tag: Tag,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Recipe(#[from] RecipeError),
}

impl From<ImageError> for ParentError {
    fn from(e: ImageError) -> Self {
        ParentError::Image(Box::new(e))
    }
}

/// How to make the parent of a recipe.
#[derive(Debug, Clone)]
pub struct ParentOptions {
    /// The tag it is installed as (replacing an older one).
    pub tag: Tag,
    /// The guest kernel and the initramfs that mounts the image as / and starts the agent.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub accel: AccelChoice,
    /// Run the recipe's `[[smoke]]` checks in a forked child before installing.
    pub smoke: bool,
}

/// What recipes/tiny/build.sh makes (vmlinuz, initrd.img, rootfs.ext4): `tiny/` in the assets
/// directory of `home`.
pub fn tiny_assets(home: &Home) -> PathBuf {
    home.assets_dir().join("tiny")
}

/// The guest kernel and initramfs: the ones given, else the tiny recipe's (see
/// [`tiny_assets`]), whose initramfs loads the virtio modules and mounts the image as /.
pub fn boot_files(
    home: &Home,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
) -> Result<(PathBuf, PathBuf), ParentError> {
    let tiny = tiny_assets(home);
    let kernel = kernel.unwrap_or_else(|| tiny.join("vmlinuz"));
    let initrd = initrd.unwrap_or_else(|| tiny.join("initrd.img"));
    for f in [&kernel, &initrd] {
        if !f.is_file() {
            return Err(ParentError::BootFile(f.clone()));
        }
    }
    Ok((kernel, initrd))
}

/// Boot, warm and save the parent of `lr` (whose image is `built`) into `store`; with
/// `opts.smoke` its smoke checks run first in a child forked from the staged snapshot, so a
/// parent that fails them never becomes visible.
pub fn build_parent(
    lr: &LoadedRecipe,
    built: &BuiltImage,
    store: &Store,
    qemu: &Qemu,
    opts: &ParentOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Snapshot, ParentError> {
    let r = &lr.recipe;
    let tag = &opts.tag;
    let snapshot = SnapshotOptions {
        kernel: opts.kernel.clone(),
        initrd: Some(opts.initrd.clone()),
        rootfs: built.image.clone(),
        mem_mib: u64::from(r.vm.memory_mib),
        vcpus: r.vm.vcpus,
        cmdline: None,
        warmup: Some(format!("{INIT_PATH} --setup")),
        warm: Some(forkd_agent::WarmRequest {
            kind: r.warm.kind.clone(),
            argv: r.warm.argv.clone(),
            preload: r.warm.preload.clone(),
        }),
        accel: opts.accel,
        boot_timeout: Duration::from_secs(600),
    };
    let interrupt = Interrupt::install();
    const PHASE: &str = "parent VM: boot, warm up, snapshot";
    let t = Instant::now();
    progress(Progress::Start(PHASE));
    let staged = forkd_engine::image::take_into_store(store, tag, &snapshot, qemu, &interrupt)?;
    let out = staged.output();
    let preload = out.warmup_output.clone().unwrap_or_default();
    progress(Progress::Done {
        phase: PHASE,
        seconds: t.elapsed().as_secs_f64(),
        note: format!(
            "up in {:.1} s, saved in {} ms, warm-up said: {}",
            out.boot_ms as f64 / 1000.0,
            out.save_ms,
            preload.trim().lines().last().unwrap_or("")
        ),
    });
    std::fs::copy(&built.licences_path, staged.dir().join(LICENCES_FILE)).map_err(|source| {
        ParentError::Io {
            what: "copying the licence report into the snapshot",
            source,
        }
    })?;
    let recipe_copy = format!(
        "# The recipe this snapshot was built from.\n{}",
        r.to_toml()
    );
    std::fs::write(staged.dir().join(RECIPE_COPY), recipe_copy).map_err(|source| {
        ParentError::Io {
            what: "writing recipe.toml",
            source,
        }
    })?;
    let manifest = manifest_for(lr, built, &staged)?;
    if opts.smoke {
        let recorder = Recording::start(store, staged.dir(), &manifest);
        let dir = recorder
            .as_ref()
            .map(|r| r.mount.dir().to_path_buf())
            .unwrap_or_else(|| staged.dir().to_path_buf());
        smoke(lr, &dir, tag, opts.accel, store, qemu, progress)?;
        if let Some(r) = recorder {
            let ws = r.recorder.working_set();
            drop(r.mount);
            // A hint only: an image without one still forks (lazily by offset order).
            if let Err(e) = ws.save(staged.dir()) {
                tracing::warn!("cannot keep the working set: {e}");
            }
        }
    }
    staged
        .commit(tag, &manifest, Overwrite::Yes)
        .map_err(|source| ParentError::Save {
            tag: tag.clone(),
            source: Box::new(source),
        })
}

/// The engine's manifest plus the recipe's: description, base, labels, licences and recipe.
fn manifest_for(
    lr: &LoadedRecipe,
    built: &BuiltImage,
    staged: &StagedSnapshot,
) -> Result<Manifest, ParentError> {
    let r = &lr.recipe;
    let extra = [(LICENCES_FILE, "licences"), (RECIPE_COPY, "recipe")];
    let mut m = staged.manifest(&r.name, &r.version, &extra)?;
    m.description = r.description.clone();
    m.base_image = format!("{} (mmdebstrap minbase, {})", r.base, r.mirror());
    let labels = [
        ("recipe", r.name.clone()),
        ("recipe.version", r.version.clone()),
        ("recipe.tree_key", built.tree.key.clone()),
        ("recipe.image_key", built.key.clone()),
        ("licences", built.licences.summary_line(4000)),
        ("licences.file", LICENCES_FILE.to_string()),
        (
            "licences.packages",
            built.licences.packages.len().to_string(),
        ),
        ("licences.notes", r.licence.notes.clone()),
        ("warm", warm_label(lr)),
    ];
    for (k, v) in labels {
        if !v.is_empty() {
            m.labels.insert(k.to_string(), v);
        }
    }
    Ok(m)
}

fn warm_label(lr: &LoadedRecipe) -> String {
    let w = &lr.recipe.warm;
    match (&w.kind, &w.argv) {
        (Some(k), _) => format!("kind={k}"),
        (_, Some(argv)) => format!("argv={}", argv.join(" ")),
        _ => String::new(),
    }
}

/// The smoke checks' children read the snapshot through a recording mount: what they touch,
/// in order, becomes the image's working set (`workingset.json`), which `forkd push` publishes
/// so that a lazy fork fetches it first. Without FUSE (not root, no /dev/fuse) the checks run
/// from the staged files and no working set is recorded.
struct Recording {
    recorder: std::sync::Arc<forkd_lazyfs::record::Recorder>,
    mount: forkd_lazyfs::Mount,
}

impl Recording {
    fn start(store: &Store, dir: &Path, manifest: &Manifest) -> Option<Recording> {
        let names: Vec<String> = manifest.files.keys().cloned().collect();
        let made = forkd_lazyfs::record::Recorder::open(dir, &names)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                let r = std::sync::Arc::new(r);
                let text = manifest.to_toml().map_err(|e| e.to_string())?;
                let root = forkd_lazyfs::mounts_dir(store.home());
                let mount = forkd_lazyfs::mount_in(&root, "record", r.clone(), &text)
                    .map_err(|e| e.to_string())?;
                Ok(Recording { recorder: r, mount })
            });
        made.inspect_err(|e| tracing::warn!("no working set is recorded for this image: {e}"))
            .ok()
    }
}

/// Run every `[[smoke]]` check of the recipe in a child forked from the snapshot in `dir`.
fn smoke(
    lr: &LoadedRecipe,
    dir: &Path,
    tag: &Tag,
    accel: AccelChoice,
    store: &Store,
    qemu: &Qemu,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), ParentError> {
    const PHASE: &str = "smoke check in a forked child";
    for (index, check) in lr.recipe.smoke.iter().enumerate() {
        let t = Instant::now();
        progress(Progress::Start(PHASE));
        let work = Work {
            exec: check.exec.as_ref().map(|s| forkd_agent::ExecRequest {
                shell: Some(s.clone()),
                timeout_ms: Some(600_000),
                ..Default::default()
            }),
            run_code: check.run.clone(),
            ..Default::default()
        };
        let opts = ForkOptions {
            n: 1,
            tag: tag.as_str().to_string(),
            accel,
            work,
            keep: false,
            run_root: store.home().run_dir(),
            ready_timeout: Duration::from_secs(300),
            interrupt: Interrupt::install(),
            on_child: None,
            layers: None,
            net: None,
        };
        let report = forkd_engine::fork::fork(dir, qemu, &opts).map_err(|source| {
            ParentError::SmokeFork {
                index,
                tag: tag.clone(),
                source,
            }
        })?;
        let child = report.children.first().ok_or(ParentError::NoChild)?;
        let output = match (&child.exec, &child.run) {
            (Some(e), _) => format!("{}{}", e.stdout, e.stderr),
            (_, Some(r)) => r.output.clone(),
            _ => String::new(),
        };
        if !child.ok || !output.contains(&check.expect) {
            return Err(ParentError::SmokeFailed {
                index,
                tag: tag.clone(),
                expect: check.expect.clone(),
                error: child.error.clone(),
                output: output.trim_end().to_string(),
            });
        }
        progress(Progress::Done {
            phase: PHASE,
            seconds: t.elapsed().as_secs_f64(),
            note: format!(
                "smoke[{index}] ok: {}",
                output.trim().lines().last().unwrap_or("")
            ),
        });
    }
    Ok(())
}

/// The licence report of a snapshot in `store` made by `forkd build`, and a Markdown heading
/// for it (name, version, description, base, licence notes).
pub fn stored_licences(store: &Store, tag: &Tag) -> Result<(LicenceReport, String), ParentError> {
    let snap = store.get(tag)?;
    let text = std::fs::read_to_string(snap.path(LICENCES_FILE)).map_err(|source| {
        ParentError::NoLicences {
            tag: tag.clone(),
            source,
        }
    })?;
    let report = LicenceReport::parse(&text)?;
    let m = &snap.manifest;
    let notes = m.labels.get("licences.notes").cloned().unwrap_or_default();
    let title = format!(
        "## {} {}\n\n{}\n\nBase: {}. Debian sources: main, -updates and -security.\n\n{}",
        m.name, m.version, m.description, m.base_image, notes
    );
    Ok((report, title))
}
