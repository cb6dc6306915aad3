//! `forkd build` and `forkd recipe ...`: turn a declarative recipe into a root filesystem image
//! and a warmed parent snapshot in the local store.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use forkd_recipe::{BuildOptions, BuiltImage, LoadedRecipe, Progress};

use crate::ctx::Ctx;
use crate::report::Hint;

#[path = "recipe_snapshot.rs"]
mod recipe_snapshot;

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// Build a recipe: its root filesystem image, then a warmed parent snapshot in the store
    Build(BuildArgs),
    /// Recipe tools: check a recipe, show the licences of a built image
    #[command(subcommand)]
    Recipe(RecipeCmd),
}

#[derive(clap::Subcommand, Debug)]
pub enum RecipeCmd {
    /// Parse and validate a recipe without building anything
    Check {
        /// Recipe directory (holding recipe.toml) or the recipe file
        recipe: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Collect the licences of a root filesystem directory (Debian copyright files, wheels, npm)
    Licences {
        /// A root filesystem directory (e.g. a cached package tree)
        #[arg(required_unless_present = "tag")]
        root: Option<PathBuf>,
        /// Read the licences.toml of a snapshot in the local store instead
        #[arg(long, conflicts_with = "root")]
        tag: Option<String>,
        #[arg(long)]
        json: bool,
        /// Print a Markdown section (as in docs/LICENCES.md)
        #[arg(long, conflicts_with = "json")]
        markdown: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// Recipe directory (holding recipe.toml) or the recipe file
    recipe: PathBuf,
    /// Local tag for the snapshot [default: the recipe's name]
    #[arg(long)]
    tag: Option<String>,
    /// Build the package tree and image again, ignoring the build cache
    #[arg(long)]
    rebuild: bool,
    /// Build cache [default: $FORKD_HOME/build-cache]
    #[arg(long, env = "FORKD_BUILD_CACHE", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// The static forkd-agent binary to install in the guest [default: next to `forkd`]
    #[arg(long, env = "FORKD_AGENT", value_name = "FILE")]
    agent: Option<PathBuf>,
    /// Stop after the root filesystem image (no VM, no snapshot)
    #[arg(long)]
    rootfs_only: bool,
    /// Skip the smoke checks in a forked child after the snapshot
    #[arg(long)]
    no_smoke: bool,
    /// Guest kernel [default: $FORKD_ASSETS/tiny/vmlinuz, from recipes/tiny/build.sh]
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Guest initramfs that mounts /dev/vda and starts the agent [default: $FORKD_ASSETS/tiny/initrd.img]
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Accelerator: kvm, tcg, or auto
    #[arg(long, default_value = "auto", env = "FORKD_ACCEL")]
    accel: forkd_engine::qemu::AccelChoice,
    /// Print the result as JSON on stdout
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: Cmd, ctx: &Ctx) -> anyhow::Result<()> {
    match cmd {
        Cmd::Build(args) => build(args, ctx),
        Cmd::Recipe(RecipeCmd::Check { recipe, json }) => check(&recipe, json),
        Cmd::Recipe(RecipeCmd::Licences {
            root,
            tag,
            json,
            markdown,
        }) => licences(root.as_deref(), tag.as_deref(), json, markdown, ctx),
    }
}

fn load(path: &Path) -> anyhow::Result<LoadedRecipe> {
    LoadedRecipe::load(path)
        .with_context(|| format!("reading recipe {}", path.display()))
        .context(Hint(
            "docs/RECIPES.md describes every field of recipe.toml".into(),
        ))
}

fn check(path: &Path, json: bool) -> anyhow::Result<()> {
    let lr = load(path)?;
    let r = &lr.recipe;
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        println!("{} {}: {}", r.name, r.version, r.description);
        println!("  base: {} ({})", r.base, r.mirror());
        println!("  debian packages: {}", r.packages.debian.join(" "));
        if !r.packages.pip.is_empty() {
            println!("  pip: {}", r.packages.pip.join(" "));
        }
        if !r.packages.npm.is_empty() {
            println!("  npm: {}", r.packages.npm.join(" "));
        }
        println!("  vm: {} MiB, {} vCPU", r.vm.memory_mib, r.vm.vcpus);
        println!("  tree key: {}", forkd_recipe::rootfs::tree_key(r));
    }
    Ok(())
}

fn licences(
    root: Option<&Path>,
    tag: Option<&str>,
    json: bool,
    markdown: bool,
    ctx: &Ctx,
) -> anyhow::Result<()> {
    let (report, title) = match (root, tag) {
        (Some(root), _) => {
            let r = forkd_recipe::licence::scan(root)
                .with_context(|| format!("collecting licences under {}", root.display()))?;
            (r, root.display().to_string())
        }
        (None, Some(tag)) => recipe_snapshot::stored_licences(tag, ctx)?,
        (None, None) => anyhow::bail!("give a root directory or --tag"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if markdown {
        println!("{title}\n\n{}", report.markdown());
    } else {
        for (name, n) in report.summary() {
            println!("{n:5}  {name}");
        }
        println!("{} packages", report.packages.len());
    }
    Ok(())
}

fn default_home() -> Option<PathBuf> {
    std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .map(|d| d.join("forkd"))
}

fn find_agent(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        anyhow::ensure!(p.is_file(), "agent binary {} not found", p.display());
        return Ok(p);
    }
    // Prefer the static build (scripts/setup-engine.sh makes it), then one next to `forkd`.
    let exe = std::env::current_exe().context("locating the forkd binary")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidates = [
        dir.join("../x86_64-unknown-linux-gnu/release/forkd-agent"),
        dir.join("forkd-agent"),
    ];
    if let Some(found) = candidates.into_iter().find(|p| p.is_file()) {
        return Ok(found);
    }
    Err(anyhow::anyhow!(
        "no forkd-agent binary next to {}",
        exe.display()
    ))
    .context(Hint(
        "build it with `cargo build -p forkd-agent`, or pass --agent FILE".into(),
    ))
}

fn progress_printer(quiet: bool) -> impl FnMut(Progress) {
    move |p| {
        if quiet {
            return;
        }
        match p {
            Progress::Start(phase) => eprintln!("==> {phase}"),
            Progress::Done {
                phase,
                seconds,
                note,
            } => {
                eprintln!("    {phase}: {seconds:.1} s  {note}")
            }
        }
    }
}

fn build(args: BuildArgs, ctx: &Ctx) -> anyhow::Result<()> {
    let started = Instant::now();
    let lr = load(&args.recipe)?;
    let home = ctx
        .home
        .clone()
        .or_else(default_home)
        .context("no FORKD_HOME and no HOME")?;
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| home.join("build-cache"));
    let opts = BuildOptions {
        cache_dir,
        rebuild: args.rebuild,
        agent: find_agent(args.agent.clone())?,
    };
    let mut progress = progress_printer(ctx.quiet);
    let built = forkd_recipe::build_image(&lr, &opts, &mut progress)
        .with_context(|| format!("building the root filesystem of {}", lr.recipe.name))?;
    let mut tag = None;
    if !args.rootfs_only {
        let t = recipe_snapshot::snapshot(
            &lr,
            &built,
            &args.snapshot_args(),
            !args.no_smoke,
            ctx,
            &mut progress,
        )?;
        tag = Some(t);
    }
    report(
        &lr,
        &built,
        tag.as_ref(),
        &args,
        started.elapsed().as_secs_f64(),
    )
}

impl BuildArgs {
    fn snapshot_args(&self) -> recipe_snapshot::SnapshotArgs {
        recipe_snapshot::SnapshotArgs {
            tag: self.tag.clone(),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            accel: self.accel,
        }
    }
}

fn report(
    lr: &LoadedRecipe,
    b: &BuiltImage,
    tag: Option<&forkd_store::Tag>,
    args: &BuildArgs,
    secs: f64,
) -> anyhow::Result<()> {
    let size = std::fs::metadata(&b.image).map(|m| m.len()).unwrap_or(0);
    if args.json {
        let v = serde_json::json!({
            "recipe": lr.recipe.name,
            "version": lr.recipe.version,
            "image": b.image,
            "image_bytes": size,
            "image_key": b.key,
            "tree_key": b.tree.key,
            "cached": b.cached,
            "licences_file": b.licences_path,
            "licences": b.licences.summary(),
            "tag": tag.map(|t| t.as_str()),
            "seconds": secs,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("recipe {} {}", lr.recipe.name, lr.recipe.version);
        println!(
            "  rootfs:   {} ({} MiB{})",
            b.image.display(),
            size >> 20,
            if b.cached { ", cached" } else { "" }
        );
        println!(
            "  licences: {} ({} packages)",
            b.licences_path.display(),
            b.licences.packages.len()
        );
        if let Some(t) = tag {
            println!("  snapshot: {t} (forkd fork --tag {t} -n 10)");
        }
        println!("  total:    {secs:.1} s");
    }
    Ok(())
}
