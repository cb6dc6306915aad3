//! Local store commands: images, rmi, inspect, verify, pack, unpack, gc.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use forkd_store::pack::{self, PACK_SUFFIX, PackOptions, UnpackOptions};
use forkd_store::{ImageInfo, ImageName, Overwrite, Tag};
use indicatif::{ProgressBar, ProgressStyle};

use crate::ctx::Ctx;
use crate::report::{Hint, Lines, escape_controls, human_bytes};

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// List the images in the local store
    #[command(
        visible_alias = "ls",
        after_help = "Examples:\n  forkd images\n  forkd ls --json\n  forkd images list --json | jq '.[].tag'"
    )]
    Images {
        #[command(subcommand)]
        cmd: Option<ImagesCmd>,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Remove images from the local store
    #[command(
        after_help = "Examples:\n  forkd rmi python-numpy old-test\n  forkd rmi tiny:1\n  \
        forkd rmi --force tiny        # even while kept children of it run, or branches need it\n\n\
        An image that kept children (forkd ps) were forked from is not removed unless --force: \
        they keep running either way, but nothing could fork it again. Nor is the parent of \
        branches (forkd images shows them): with --force it goes, and its branches cannot fork \
        until it is installed again."
    )]
    Rmi {
        /// Images to remove: TAG or NAME:VERSION (as `forkd images` shows them)
        #[arg(required = true, value_name = "IMAGE")]
        tags: Vec<ImageName>,
        /// Remove it even though kept children forked from it are running, or branches made
        /// from it need it
        #[arg(long)]
        force: bool,
    },
    /// Show an image's manifest (what it is, how it was made, every file with size + sha256)
    #[command(
        after_help = "Examples:\n  forkd inspect python-numpy\n  forkd inspect python-numpy --json"
    )]
    Inspect {
        /// TAG or NAME:VERSION
        #[arg(value_name = "IMAGE")]
        tag: ImageName,
        /// Print JSON instead of TOML
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every file of a local image and compare it with its manifest
    #[command(
        long_about = "Re-hash every file of a local image (holes read as zeros) and compare its \
                      size and sha256 with the image's manifest. Exits 1 when any file differs \
                      or cannot be read.",
        after_help = "Examples:\n  forkd verify python-numpy\n  forkd verify python-numpy --json | jq '.files[] | select(.ok | not)'"
    )]
    Verify {
        /// TAG or NAME:VERSION
        #[arg(value_name = "IMAGE")]
        tag: ImageName,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Write an image to one portable file (.forkd-snapshot.tar.zst)
    #[command(
        long_about = "Write an image to one portable file: a zstd-compressed tar whose first entry is \
                      manifest.toml (format: docs/PACK-FORMAT.md). Holes and zero pages are not \
                      compressed, every file's sha256 is checked against the manifest while it is \
                      read, and the output appears only when complete.",
        after_help = "Examples:\n  forkd pack python-numpy                 # -> ./python-numpy.forkd-snapshot.tar.zst\n  forkd pack python-numpy -o /mnt/usb/py.forkd-snapshot.tar.zst --level 9\n  forkd pack python-numpy -o - | ssh host forkd unpack -"
    )]
    Pack {
        /// TAG or NAME:VERSION
        #[arg(value_name = "IMAGE")]
        tag: ImageName,
        /// Output file ("-" for stdout) [default: ./TAG.forkd-snapshot.tar.zst]
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// zstd compression level (1 = fastest, 19 = smallest)
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
        level: i32,
        /// zstd worker threads [default: one per CPU]
        #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
        threads: u32,
    },
    /// Remove downloaded chunks and partial downloads no installed image needs
    #[command(
        long_about = "Give back the disk the download cache holds for nothing: chunks in the local \
                      chunk store ($FORKD_HOME/cache/chunks) that no installed image lists, the \
                      remembered manifests of images that were removed, unfinished chunk writes, \
                      and partial downloads that no pull is working on. Installed images are never \
                      touched. A partial download is what lets an interrupted pull resume: after gc, \
                      that pull starts over (taking what it can from the chunk store).",
        after_help = "Examples:\n  forkd gc --dry-run        # what would go, and how much\n  forkd rmi python-numpy && forkd gc\n  forkd gc --json | jq .chunk_bytes_freed"
    )]
    Gc {
        /// Count what would be removed; remove nothing
        #[arg(long, short = 'n')]
        dry_run: bool,
        /// Print JSON instead of a sentence
        #[arg(long)]
        json: bool,
    },
    /// Install an image from a .forkd-snapshot.tar.zst file
    #[command(
        long_about = "Install an image from a .forkd-snapshot.tar.zst file. The pack is treated as \
                      untrusted: every entry, size and sha256 is checked against its manifest, and the \
                      image becomes visible only once everything is verified. On any error the store \
                      is left as it was.",
        after_help = "Examples:\n  forkd unpack python-numpy.forkd-snapshot.tar.zst\n  forkd unpack py.forkd-snapshot.tar.zst --tag py-test --force\n  curl -s https://example.org/p.forkd-snapshot.tar.zst | forkd unpack -"
    )]
    Unpack {
        /// The pack file ("-" for stdin)
        file: PathBuf,
        /// Install under this tag [default: the manifest's name]
        #[arg(long, value_name = "NEW")]
        tag: Option<Tag>,
        /// Replace an existing image with the same tag
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum ImagesCmd {
    /// List the images in the local store (the default)
    #[command(
        after_help = "Examples:\n  forkd images list\n  forkd images list --json | jq -r '.[].tag'"
    )]
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: Cmd, ctx: &Ctx) -> anyhow::Result<()> {
    match cmd {
        Cmd::Images { cmd, json } => {
            let json = json || matches!(cmd, Some(ImagesCmd::List { json: true }));
            images(ctx, json)
        }
        Cmd::Rmi { tags, force } => rmi(ctx, &tags, force),
        Cmd::Inspect { tag, json } => inspect(ctx, &tag, json),
        Cmd::Verify { tag, json } => verify(ctx, &tag, json),
        Cmd::Gc { dry_run, json } => gc(ctx, dry_run, json),
        Cmd::Pack {
            tag,
            output,
            level,
            threads,
        } => pack_cmd(ctx, &tag, output, level, threads),
        Cmd::Unpack { file, tag, force } => unpack_cmd(ctx, &file, tag, force),
    }
}

fn images(ctx: &Ctx, json: bool) -> anyhow::Result<()> {
    let store = ctx.store()?;
    let list = store.list().context("cannot list images")?;
    if json {
        let by_digest = local_digests(&list);
        let v: Vec<_> = list.iter().map(|i| image_json(i, &by_digest)).collect();
        return out(&format!("{}\n", serde_json::to_string_pretty(&v)?));
    }
    if list.is_empty() {
        eprintln!(
            "no images in {} (get one with `forkd pull OWNER/NAME` or `forkd unpack FILE`)",
            store.home().path().display()
        );
        return Ok(());
    }
    let by_digest = local_digests(&list);
    let rows: Vec<[String; 7]> = list
        .iter()
        .map(|i| {
            [
                i.tag.to_string(),
                // From the image's manifest, which may have come from a hub: escaped.
                escape_controls(
                    &format!("{}:{}", i.manifest.name, i.manifest.version),
                    Lines::Escape,
                )
                .into_owned(),
                human_bytes(i.manifest.memory_mib << 20),
                human_bytes(i.apparent_size),
                human_bytes(i.disk_size),
                i.manifest.created_at.strftime("%Y-%m-%d %H:%M").to_string(),
                escape_controls(&parent_cell(i, &by_digest), Lines::Escape).into_owned(),
            ]
        })
        .collect();
    let head = [
        "TAG",
        "NAME:VERSION",
        "MEMORY",
        "APPARENT SIZE",
        "ON-DISK SIZE",
        "CREATED",
        "PARENT",
    ];
    let mut w = head.map(str::len);
    for r in &rows {
        for (k, c) in r.iter().enumerate() {
            w[k] = w[k].max(c.len());
        }
    }
    let line = |c: [&str; 7]| {
        format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}  {:>w4$}  {:<w5$}  {}",
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            c[5],
            c[6],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3],
            w4 = w[4],
            w5 = w[5]
        )
    };
    let mut text = format!("{}\n", line(head));
    for r in &rows {
        text.push_str(line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5], &r[6]]).trim_end());
        text.push('\n');
    }
    out(&text)
}

/// Write to stdout; a closed pipe (`forkd images | head`) is not an error.
fn out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r.context("cannot write to stdout")?),
    }
}

/// Content digest -> the first local tag holding it.
fn local_digests(list: &[ImageInfo]) -> std::collections::HashMap<String, Tag> {
    let mut m = std::collections::HashMap::new();
    for i in list {
        m.entry(i.manifest.digest())
            .or_insert_with(|| i.tag.clone());
    }
    m
}

/// A branch's parent as `forkd images` shows it: `← TAG` when it is installed, else what it
/// was (`NAME:VERSION`) and that it is missing; empty for an image without a parent.
fn parent_cell(i: &ImageInfo, local: &std::collections::HashMap<String, Tag>) -> String {
    let Some(d) = &i.manifest.parent_digest else {
        return String::new();
    };
    let made_from = i.manifest.parent_tag.as_deref().unwrap_or("?");
    match local.get(d) {
        Some(t) if t.as_str() == made_from => format!("\u{2190} {t}"),
        Some(t) => format!("\u{2190} {t} ({made_from})"),
        None => format!("\u{2190} {made_from} (MISSING: not installed)"),
    }
}

fn image_json(i: &ImageInfo, local: &std::collections::HashMap<String, Tag>) -> serde_json::Value {
    let parent = i.manifest.parent_digest.as_ref().map(|d| {
        serde_json::json!({
            "tag": i.manifest.parent_tag,
            "digest": d,
            "local_tag": local.get(d).map(|t| t.as_str()),
        })
    });
    serde_json::json!({
        "parent": parent,
        "digest": i.manifest.digest(),
        "tag": i.tag.as_str(),
        "name": i.manifest.name,
        "version": i.manifest.version,
        "memory_mib": i.manifest.memory_mib,
        "apparent_size": i.apparent_size,
        "disk_size": i.disk_size,
        "created_at": i.manifest.created_at.to_string(),
        "engine": {
            "name": i.manifest.engine.name,
            "version": i.manifest.engine.version,
            "machine_type": i.manifest.engine.machine_type,
            "cpu_model": i.manifest.engine.cpu_model,
        },
        "dir": i.dir,
    })
}

fn rmi(ctx: &Ctx, names: &[ImageName], force: bool) -> anyhow::Result<()> {
    let store = ctx.store()?;
    let mut failed = None;
    for name in names {
        let t = match store.find(name) {
            Ok(snap) => snap.tag,
            Err(e) => {
                crate::report::print_error(
                    &anyhow::Error::new(e).context(format!("cannot remove {name}")),
                );
                failed = Some(name.to_string());
                continue;
            }
        };
        let users = forkd_engine::image::running_children(&store, &t);
        if !users.is_empty() && !force {
            crate::report::print_error(
                &anyhow::anyhow!(
                    "{} kept child(ren) forked from `{t}` are running: {}",
                    users.len(),
                    users.join(", ")
                )
                .context(format!("cannot remove {t}"))
                .context(Hint(format!(
                    "stop them first (forkd kill ID, or forkd kill --all), or remove it anyway \
                     with `forkd rmi --force {t}`"
                ))),
            );
            failed = Some(t.to_string());
            continue;
        }
        let t = &t;
        let removed = if force {
            store.remove_even_parent(t)
        } else {
            store.remove(t)
        };
        match removed {
            Ok(()) => {
                forkd_engine::branch::sweep_cache(&store);
                if !ctx.quiet {
                    println!("removed {t}");
                }
            }
            Err(e) => {
                let hint = match &e {
                    forkd_store::StoreError::HasChildren { children, .. } => Some(format!(
                        "remove the branches first (`forkd rmi {}`), or remove it anyway with \
                         `forkd rmi --force {t}`: then {} cannot fork until `{t}` is installed \
                         again (pulled or unpacked)",
                        children.join(" "),
                        children.join(", ")
                    )),
                    _ => None,
                };
                let mut err = anyhow::Error::new(e).context(format!("cannot remove {t}"));
                if let Some(h) = hint {
                    err = err.context(Hint(h));
                }
                crate::report::print_error(&err);
                failed = Some(t.to_string());
            }
        }
    }
    match failed {
        Some(t) => Err(anyhow::anyhow!(
            "not every image was removed (last failure: {t})"
        ))
        .context(Hint("`forkd images` lists the local tags".into())),
        None => Ok(()),
    }
}

fn inspect(ctx: &Ctx, tag: &ImageName, json: bool) -> anyhow::Result<()> {
    let store = ctx.store()?;
    let snap = store
        .find(tag)
        .context(Hint("`forkd images` lists the local tags".into()))
        .with_context(|| format!("cannot inspect {tag}"))?;
    let origin = store.origin(&snap.tag)?;
    if json {
        let mut v = serde_json::to_value(&snap.manifest)?;
        v["dir"] = serde_json::json!(snap.dir);
        if let Some(o) = origin {
            v["origin"] = serde_json::to_value(o)?;
        }
        out(&format!("{}\n", serde_json::to_string_pretty(&v)?))
    } else {
        let mut text = snap.manifest.to_toml()?;
        if let Some(o) = origin {
            // A TOML comment, so the output still parses as the manifest.
            text.push_str(&format!(
                "\n# pulled {} from {} ({}), {}, at {}\n",
                o.reference,
                o.hub,
                o.digest,
                match &o.key_id {
                    Some(k) => format!("signature verified (key {k})"),
                    None => "NOT VERIFIED (--insecure)".into(),
                },
                o.pulled_at
            ));
        }
        out(&text)
    }
}

fn gc(ctx: &Ctx, dry_run: bool, json: bool) -> anyhow::Result<()> {
    let store = ctx.store()?;
    let r =
        forkd_hub::gc::collect(&store, dry_run).context("cannot collect the cache's garbage")?;
    if json {
        return out(&format!("{}\n", serde_json::to_string_pretty(&r)?));
    }
    if !ctx.quiet {
        let verb = if dry_run { "would remove" } else { "removed" };
        eprintln!(
            "{verb} {} chunk(s), {} manifest(s) and {} partial download(s): {} freed; {} chunk(s), {}, kept for installed images",
            r.chunks_removed,
            r.manifests_removed,
            r.partials_removed,
            human_bytes(r.bytes_freed()),
            r.chunks_kept,
            human_bytes(r.chunk_bytes_kept),
        );
    }
    Ok(())
}

fn verify(ctx: &Ctx, tag: &ImageName, json: bool) -> anyhow::Result<()> {
    let store = ctx.store()?;
    let files = store
        .find(tag)
        .map_err(anyhow::Error::new)
        .and_then(|snap| Ok(store.verify(&snap.tag)?))
        .context(Hint("`forkd images` lists the local tags".into()))
        .with_context(|| format!("cannot verify {tag}"))?;
    let bad: Vec<&str> = files
        .iter()
        .filter(|f| !f.ok)
        .map(|f| f.name.as_str())
        .collect();
    if json {
        let v = serde_json::json!({ "tag": tag.to_string(), "ok": bad.is_empty(), "files": files });
        out(&format!("{}\n", serde_json::to_string_pretty(&v)?))?;
    } else {
        let mut text = String::new();
        for f in &files {
            let what = match (&f.error, f.ok) {
                (Some(e), _) => format!("UNREADABLE  {e}"),
                (None, true) => format!("ok          sha256 {}", f.expected_sha256),
                (None, false) => format!(
                    "MISMATCH    {} bytes, sha256 {} (manifest: {} bytes, sha256 {})",
                    f.size.unwrap_or(0),
                    f.sha256.as_deref().unwrap_or("?"),
                    f.expected_size,
                    f.expected_sha256
                ),
            };
            text.push_str(&format!("{:<16} {what}\n", f.name));
        }
        out(&text)?;
    }
    if bad.is_empty() {
        if !ctx.quiet && !json {
            eprintln!("{tag}: all {} files match its manifest", files.len());
        }
        Ok(())
    } else {
        Err(anyhow::anyhow!(
            "{tag} does not match its manifest: {}",
            bad.join(", ")
        ))
        .context(Hint(format!(
            "the image is damaged: remove it with `forkd rmi {tag}` and pull or build it again"
        )))
    }
}

/// Reports pack/unpack progress (logical bytes) as an indicatif bar.
struct Bar(Option<ProgressBar>);

impl Bar {
    fn new(ctx: &Ctx, verb: &str) -> Bar {
        Bar(ctx.show_progress().then(|| {
            let b = ProgressBar::new(0).with_prefix(verb.to_string());
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>9} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b
        }))
    }
    fn done(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

impl pack::Progress for Bar {
    fn start(&self, total: u64) {
        if let Some(b) = &self.0 {
            b.set_length(total);
        }
    }
    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.0 {
            b.inc(bytes);
        }
    }
}

fn pack_cmd(
    ctx: &Ctx,
    name: &ImageName,
    output: Option<PathBuf>,
    level: i32,
    threads: u32,
) -> anyhow::Result<()> {
    let store = ctx.store()?;
    let snap = store
        .find(name)
        .context(Hint("`forkd images` lists the local tags".into()))
        .with_context(|| format!("cannot pack {name}"))?;
    let tag = &snap.tag;
    if snap.manifest.is_branch() {
        let parent = snap.manifest.parent_tag.as_deref().unwrap_or("its parent");
        return Err(anyhow::anyhow!(
            "`{tag}` is a branch of {parent}: a pack holds one whole image, and a branch holds \
             only its changes"
        ))
        .context(Hint(format!(
            "push the chain to a hub instead (`forkd push {tag} OWNER/NAME` pushes its parents \
             too), or pack the parent (`forkd pack {parent}`)"
        )))
        .with_context(|| format!("cannot pack {tag}"));
    }
    let out = output.unwrap_or_else(|| PathBuf::from(format!("{tag}{PACK_SUFFIX}")));
    let opts = PackOptions {
        level,
        workers: threads,
        ..Default::default()
    };
    let bar = Bar::new(ctx, "packing");
    let t0 = Instant::now();
    let stats = if out == Path::new("-") {
        let stdout = std::io::stdout().lock();
        pack::pack_to_writer(&snap, stdout, &opts, &bar).map(|(s, _)| s)
    } else {
        pack::pack(&snap, &out, &opts, &bar)
    };
    bar.done();
    let stats = stats.with_context(|| format!("cannot pack {tag}"))?;
    if !ctx.quiet && out != Path::new("-") {
        eprintln!(
            "packed {tag} -> {} ({} logical, {} of data, {} packed) in {:.1}s",
            out.display(),
            human_bytes(stats.logical_bytes),
            human_bytes(stats.data_bytes),
            human_bytes(stats.packed_bytes),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn unpack_cmd(ctx: &Ctx, file: &Path, tag: Option<Tag>, force: bool) -> anyhow::Result<()> {
    let store = ctx.store()?;
    let opts = UnpackOptions {
        tag,
        overwrite: if force { Overwrite::Yes } else { Overwrite::No },
        check: Some(forkd_engine::spec::check_staged),
        ..Default::default()
    };
    let bar = Bar::new(ctx, "unpacking");
    let t0 = Instant::now();
    let r = if file == Path::new("-") {
        pack::unpack_from_reader(&store, std::io::stdin().lock(), &opts, &bar)
    } else {
        pack::unpack(&store, file, &opts, &bar)
    };
    bar.done();
    let snap = r
        .map_err(|e| {
            let hint = match &e {
                pack::PackError::MissingParent { parent_tag, .. } => Some(format!(
                    "install the parent ({parent_tag}) first: `forkd pull` it from the hub the \
                     branch came from, or unpack its pack; then unpack this again"
                )),
                _ => None,
            };
            let err = anyhow::Error::new(e);
            match hint {
                Some(h) => err.context(Hint(h)),
                None => err,
            }
        })
        .with_context(|| format!("cannot unpack {}", file.display()))?;
    if !ctx.quiet {
        eprintln!(
            "unpacked {} as {} ({}) in {:.1}s",
            file.display(),
            snap.tag,
            human_bytes(snap.manifest.total_size()),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
