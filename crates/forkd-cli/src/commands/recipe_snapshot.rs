//! The VM half of `forkd build`: boot the recipe's image with the engine, warm it, save the
//! parent into the store with the recipe's metadata and licences, then run the recipe's smoke
//! checks in a forked child.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use forkd_engine::Interrupt;
use forkd_engine::child::Work;
use forkd_engine::fork::ForkOptions;
use forkd_engine::qemu::{AccelChoice, Qemu};
use forkd_engine::snapshot::{SnapshotOptions, SnapshotOutput};
use forkd_recipe::image::{INIT_PATH, LICENCES_FILE};
use forkd_recipe::{BuiltImage, LoadedRecipe, Progress};
use forkd_store::manifest::{EngineInfo, FileEntry, Manifest};
use forkd_store::{Overwrite, Tag};

use crate::ctx::Ctx;
use crate::report::Hint;

/// The recipe file as it was built, stored in the snapshot next to the licences.
const RECIPE_COPY: &str = "recipe.toml";

pub struct SnapshotArgs {
    pub tag: Option<String>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub accel: AccelChoice,
}

/// The engine's guest kernel and initramfs (recipes/tiny/build.sh makes them): the initramfs
/// loads the virtio modules, mounts the image as / and starts the agent.
fn boot_files(a: &SnapshotArgs) -> anyhow::Result<(PathBuf, PathBuf)> {
    let assets = std::env::var_os("FORKD_ASSETS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/forkd-ci/assets"))
        .join("tiny");
    let kernel = a.kernel.clone().unwrap_or_else(|| assets.join("vmlinuz"));
    let initrd = a
        .initrd
        .clone()
        .unwrap_or_else(|| assets.join("initrd.img"));
    for f in [&kernel, &initrd] {
        if !f.is_file() {
            return Err(anyhow::anyhow!("guest boot file {} not found", f.display())).context(
                Hint("build the kernel and initramfs with recipes/tiny/build.sh, or pass --kernel/--initrd".into()),
            );
        }
    }
    Ok((kernel, initrd))
}

/// Boot, warm and save the parent of `lr` into the store; returns its tag.
pub fn snapshot(
    lr: &LoadedRecipe,
    built: &BuiltImage,
    a: &SnapshotArgs,
    run_smoke: bool,
    ctx: &Ctx,
    progress: &mut dyn FnMut(Progress),
) -> anyhow::Result<Tag> {
    let r = &lr.recipe;
    let tag = Tag::parse(a.tag.as_deref().unwrap_or(&r.name))?;
    let (kernel, initrd) = boot_files(a)?;
    let qemu = Qemu::locate(None).context(Hint("run `forkd doctor`".into()))?;
    let store = ctx.store()?;
    let staging = store.stage()?;
    let interrupt = Interrupt::install();
    let run_dir =
        store
            .home()
            .join("run")
            .join(format!("build-{}-{}", tag.as_str(), std::process::id()));
    let opts = SnapshotOptions {
        kernel,
        initrd: Some(initrd),
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
        accel: a.accel,
        boot_timeout: Duration::from_secs(600),
    };
    let t = Instant::now();
    progress(Progress::Start("parent VM: boot, warm up, snapshot"));
    let out = forkd_engine::snapshot::take(&qemu, &opts, staging.dir(), &run_dir, &interrupt)
        .context("snapshot failed; the store is unchanged")?;
    let preload = out.warmup_output.clone().unwrap_or_default();
    progress(Progress::Done {
        phase: "parent VM: boot, warm up, snapshot",
        seconds: t.elapsed().as_secs_f64(),
        note: format!(
            "up in {:.1} s, saved in {} ms, warm-up said: {}",
            out.boot_ms as f64 / 1000.0,
            out.save_ms,
            preload.trim().lines().last().unwrap_or("")
        ),
    });
    std::fs::copy(&built.licences_path, staging.dir().join(LICENCES_FILE))
        .context("copying the licence report into the snapshot")?;
    std::fs::write(staging.dir().join(RECIPE_COPY), toml_of(lr)?).context("writing recipe.toml")?;
    let manifest = manifest_for(lr, built, &out, staging.dir())?;
    // Smoke checks fork children from the staged snapshot: a snapshot that fails them never
    // becomes visible in the store (the staging directory is deleted on the way out).
    if run_smoke {
        let run_root = store.home().join("run");
        smoke(lr, staging.dir(), &tag, a.accel, &run_root, &qemu, progress)?;
    }
    staging
        .commit(&tag, &manifest, Overwrite::Yes)
        .with_context(|| format!("saving {tag}"))?;
    Ok(tag)
}

fn toml_of(lr: &LoadedRecipe) -> anyhow::Result<String> {
    Ok(format!(
        "# The recipe this snapshot was built from.\n{}",
        lr.recipe.to_toml()
    ))
}

fn manifest_for(
    lr: &LoadedRecipe,
    built: &BuiltImage,
    out: &SnapshotOutput,
    dir: &Path,
) -> anyhow::Result<Manifest> {
    let r = &lr.recipe;
    let engine = EngineInfo {
        name: "qemu".into(),
        version: out.spec.qemu_version.clone(),
        machine_type: out.spec.machine.clone(),
        cpu_model: out.spec.cpu.clone(),
        accel_hint: Some(out.spec.accel.clone()),
    };
    let mut m = Manifest::new(&r.name, &r.version, out.spec.mem_mib, engine);
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
    let mut files: Vec<(String, &str)> = out
        .files
        .iter()
        .map(|(f, role)| (f.clone(), *role))
        .collect();
    files.push((LICENCES_FILE.to_string(), "licences"));
    files.push((RECIPE_COPY.to_string(), "recipe"));
    for (file, role) in files {
        let p = dir.join(&file);
        let f = std::fs::File::open(&p).with_context(|| format!("cannot open {}", p.display()))?;
        let (size, sha256) = forkd_store::sparse::hash_file(&f)
            .with_context(|| format!("cannot hash {}", p.display()))?;
        m.files.insert(
            file,
            FileEntry {
                size,
                sha256,
                role: Some(role.to_string()),
            },
        );
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

/// Run every `[[smoke]]` check of the recipe in a child forked from the snapshot in `dir`.
fn smoke(
    lr: &LoadedRecipe,
    dir: &Path,
    tag: &Tag,
    accel: AccelChoice,
    run_root: &Path,
    qemu: &Qemu,
    progress: &mut dyn FnMut(Progress),
) -> anyhow::Result<()> {
    for (i, check) in lr.recipe.smoke.iter().enumerate() {
        let t = Instant::now();
        progress(Progress::Start("smoke check in a forked child"));
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
            run_root: run_root.to_path_buf(),
            ready_timeout: Duration::from_secs(300),
            interrupt: Interrupt::install(),
            on_child: None,
        };
        let report = forkd_engine::fork::fork(dir, qemu, &opts)
            .with_context(|| format!("smoke[{i}]: cannot fork {tag}"))?;
        let child = report
            .children
            .first()
            .context("the fork reported no child")?;
        let output = match (&child.exec, &child.run) {
            (Some(e), _) => format!("{}{}", e.stdout, e.stderr),
            (_, Some(r)) => r.output.clone(),
            _ => String::new(),
        };
        if !child.ok || !output.contains(&check.expect) {
            bail!(
                "smoke[{i}] failed in a forked child of {tag}: expected {:?} in the output{}\n--- output ---\n{}",
                check.expect,
                child
                    .error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default(),
                output.trim_end()
            );
        }
        progress(Progress::Done {
            phase: "smoke check in a forked child",
            seconds: t.elapsed().as_secs_f64(),
            note: format!(
                "smoke[{i}] ok: {}",
                output.trim().lines().last().unwrap_or("")
            ),
        });
    }
    Ok(())
}

/// The licence report and a Markdown heading (name, version, base, notes) of a stored snapshot
/// built by `forkd build`.
pub fn stored_licences(
    tag: &str,
    ctx: &Ctx,
) -> anyhow::Result<(forkd_recipe::LicenceReport, String)> {
    let tag = Tag::parse(tag)?;
    let snap = ctx.store()?.get(&tag)?;
    let text = std::fs::read_to_string(snap.path(LICENCES_FILE))
        .with_context(|| format!("{tag} has no {LICENCES_FILE}"))
        .context(Hint(
            "only snapshots made by `forkd build` carry licences".into(),
        ))?;
    let report = forkd_recipe::LicenceReport::parse(&text)?;
    let m = &snap.manifest;
    let notes = m.labels.get("licences.notes").cloned().unwrap_or_default();
    let title = format!(
        "## {} {}\n\n{}\n\nBase: {}. Debian sources: main, -updates and -security.\n\n{}",
        m.name, m.version, m.description, m.base_image, notes
    );
    Ok((report, title))
}
