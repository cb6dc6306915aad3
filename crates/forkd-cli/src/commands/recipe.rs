//! `forkd build` and `forkd recipe ...`: turn a declarative recipe into a root filesystem image
//! and a warmed parent snapshot in the local store.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use forkd_engine::qemu::Qemu;
use forkd_recipe::image::AgentNotFound;
use forkd_recipe::parent::{ParentError, ParentOptions};
use forkd_recipe::{BuildOptions, BuiltImage, LoadedRecipe, Progress};
use forkd_store::Tag;

use crate::ctx::Ctx;
use crate::report::Hint;

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// Build a recipe: its root filesystem image, then a warmed parent snapshot in the store
    #[command(after_help = "Examples:\n  \
        forkd build recipes/python-numpy                 # rootfs + warmed parent, tag python-numpy\n  \
        forkd build recipes/nodejs --tag node-test --no-smoke\n  \
        forkd build recipes/python-numpy --rootfs-only   # just the root filesystem image")]
    Build(BuildArgs),
    /// Recipe tools: check a recipe, show the licences of a built image
    #[command(
        subcommand,
        after_help = "Examples:\n  forkd recipe check recipes/python-numpy\n  forkd recipe licences --tag python-numpy"
    )]
    Recipe(RecipeCmd),
}

#[derive(clap::Subcommand, Debug)]
pub enum RecipeCmd {
    /// Parse and validate a recipe without building anything
    #[command(
        after_help = "Examples:\n  forkd recipe check recipes/python-numpy\n  forkd recipe check recipes/nodejs/recipe.toml --json"
    )]
    Check {
        /// Recipe directory (holding recipe.toml) or the recipe file
        recipe: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Collect the licences of a root filesystem directory (Debian copyright files, wheels, npm)
    #[command(
        after_help = "Examples:\n  forkd recipe licences --tag python-numpy\n  forkd recipe licences /path/to/rootfs --markdown\n  forkd recipe licences --tag nodejs --json"
    )]
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
        (None, Some(tag)) => {
            let tag = Tag::parse(tag)?;
            forkd_recipe::parent::stored_licences(&ctx.store()?, &tag).map_err(with_hint)?
        }
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

fn find_agent(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the forkd binary")?;
    forkd_recipe::image::find_agent(given, &exe).map_err(|e| match e {
        AgentNotFound::NextTo(_) => anyhow::Error::from(e).context(Hint(
            "build it with `cargo build -p forkd-agent`, or pass --agent FILE".into(),
        )),
        e => e.into(),
    })
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
    let cache_dir = match &args.cache_dir {
        Some(d) => d.clone(),
        None => ctx.home_dir()?.build_cache_dir(),
    };
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
        tag = Some(parent(&lr, &built, &args, ctx, &mut progress)?);
    }
    report(
        &lr,
        &built,
        tag.as_ref(),
        &args,
        started.elapsed().as_secs_f64(),
    )
}

/// Boot, warm and save the parent of `lr` into the store; returns its tag.
fn parent(
    lr: &LoadedRecipe,
    built: &BuiltImage,
    args: &BuildArgs,
    ctx: &Ctx,
    progress: &mut dyn FnMut(Progress),
) -> anyhow::Result<Tag> {
    let tag = Tag::parse(args.tag.as_deref().unwrap_or(&lr.recipe.name))?;
    let (kernel, initrd) = forkd_recipe::parent::boot_files(
        &ctx.home_dir()?,
        args.kernel.clone(),
        args.initrd.clone(),
    )
    .map_err(with_hint)?;
    let qemu = Qemu::locate(None).context(Hint("run `forkd doctor`".into()))?;
    let opts = ParentOptions {
        tag,
        kernel,
        initrd,
        accel: args.accel,
        smoke: !args.no_smoke,
    };
    let snap = forkd_recipe::parent::build_parent(lr, built, &ctx.store()?, &qemu, &opts, progress)
        .map_err(with_hint)?;
    Ok(snap.tag)
}

/// What to do about a failed parent build, where the error says.
fn with_hint(e: ParentError) -> anyhow::Error {
    let hint = match &e {
        ParentError::BootFile(_) => Some(
            "build the kernel and initramfs with recipes/tiny/build.sh, or pass --kernel/--initrd",
        ),
        ParentError::NoLicences { .. } => {
            Some("only snapshots made by `forkd build` carry licences")
        }
        _ => None,
    };
    let err = anyhow::Error::from(e);
    match hint {
        Some(h) => err.context(Hint(h.into())),
        None => err,
    }
}

fn report(
    lr: &LoadedRecipe,
    b: &BuiltImage,
    tag: Option<&Tag>,
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
