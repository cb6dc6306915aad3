//! From a package tree to `rootfs.ext4`: add the guest agent, the init, the recipe's files and a
//! licence report, then `mkfs.ext4 -d`. The finished image is cached under
//! `CACHE/images/KEY/` (KEY hashes the tree key and every added byte), so an unchanged recipe
//! rebuilds instantly.
//!
//! The tree is copied with hard links (`cp -al`), and every added file replaces its path by a
//! new inode, so the cached tree is never changed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::licence::{self, LicenceReport};
use crate::rootfs::{self, Tree};
use crate::util::{
    io_err, need_tool, run_logged, sha256_file, sha256_hex, tree_usage, write_in_root,
};
use crate::{BuildOptions, LoadedRecipe, Progress, RecipeError};

/// Bump when the way images are made changes.
const IMAGE_FORMAT: u32 = 3;
/// Where the agent is installed in the guest.
pub const AGENT_PATH: &str = "/usr/local/sbin/forkd-agent";
/// The guest init: mounts the kernel filesystems, then becomes the agent.
pub const INIT_PATH: &str = "/sbin/forkd-init";
/// The licence report inside the guest and next to the image.
pub const LICENCES_GUEST_PATH: &str = "/usr/share/forkd/licences.toml";
pub const LICENCES_FILE: &str = "licences.toml";
pub const IMAGE_FILE: &str = "rootfs.ext4";

/// forkd's warm worker programs, installed into every image under /usr/lib/forkd/workers/.
/// Recipes name them in `warm.argv`; they speak the agent's worker framing.
pub const WORKERS: &[(&str, &str)] = &[
    (
        "/usr/lib/forkd/workers/node-worker.js",
        include_str!("../workers/node-worker.js"),
    ),
    (
        "/usr/lib/forkd/workers/cdp-page.js",
        include_str!("../workers/cdp-page.js"),
    ),
    (
        "/usr/lib/forkd/workers/jupyter-worker.py",
        include_str!("../workers/jupyter-worker.py"),
    ),
];

/// The init installed as [`INIT_PATH`]. It runs as PID 1 in the Debian root (after the engine's
/// initramfs has mounted it), or under any init that hands over to it.
pub const INIT_SCRIPT: &str = r#"#!/bin/sh
# forkd-init: sets up a forkd recipe guest (kernel filesystems, /tmp, hostname, loopback) and
# then becomes the forkd guest agent, which serves the host on the virtio-serial port
# `forkd.agent`. With --setup it only does the set-up and returns: that is how `forkd build`
# runs it as the parent's warm-up when the engine's initramfs has already started the agent.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 NODE_PATH=/opt/forkd/node/node_modules
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mountpoint -q /dev/pts || mount -t devpts devpts /dev/pts
mountpoint -q /dev/shm || mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mountpoint -q /tmp || mount -t tmpfs -o mode=1777 tmpfs /tmp
mountpoint -q /run || mount -t tmpfs -o mode=0755 tmpfs /run
[ -r /etc/hostname ] && hostname "$(cat /etc/hostname)" 2>/dev/null
command -v ip >/dev/null 2>&1 && ip link set lo up 2>/dev/null
[ "$1" = "--setup" ] && exit 0
exec /usr/local/sbin/forkd-agent
"#;

/// No forkd-agent binary where one was looked for.
#[derive(Debug, thiserror::Error)]
pub enum AgentNotFound {
    #[error("agent binary {} not found", .0.display())]
    Given(PathBuf),
    #[error("no forkd-agent binary next to {}", .0.display())]
    NextTo(PathBuf),
}

/// The static forkd-agent binary to install in the guest: `given`, else the static build
/// (scripts/setup-engine.sh makes it) or one next to the `forkd` binary at `forkd_exe`.
pub fn find_agent(given: Option<PathBuf>, forkd_exe: &Path) -> Result<PathBuf, AgentNotFound> {
    if let Some(p) = given {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(AgentNotFound::Given(p))
        };
    }
    let dir = forkd_exe.parent().unwrap_or(Path::new("."));
    let candidates = [
        dir.join("../x86_64-unknown-linux-gnu/release/forkd-agent"),
        dir.join("forkd-agent"),
    ];
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| AgentNotFound::NextTo(forkd_exe.to_path_buf()))
}

/// A finished root filesystem image.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The cache key of the image.
    pub key: String,
    pub tree: Tree,
    /// `CACHE/images/KEY/rootfs.ext4`
    pub image: PathBuf,
    /// `CACHE/images/KEY/licences.toml`
    pub licences_path: PathBuf,
    pub licences: LicenceReport,
    /// Whether the image came from the cache.
    pub cached: bool,
}

/// Build (or find in the cache) the root filesystem image of a recipe.
pub fn build_image(
    lr: &LoadedRecipe,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<BuiltImage, RecipeError> {
    let r = &lr.recipe;
    let t = Instant::now();
    progress(Progress::Start("package tree"));
    let tree = rootfs::ensure_tree(r, opts, progress)?;
    progress(Progress::Done {
        phase: "package tree",
        seconds: t.elapsed().as_secs_f64(),
        note: if tree.cached {
            format!("cached ({})", tree.key)
        } else {
            format!("built ({})", tree.key)
        },
    });

    if !opts.agent.is_file() {
        return Err(RecipeError::Io {
            path: opts.agent.clone(),
            err: std::io::Error::new(std::io::ErrorKind::NotFound, "forkd-agent binary not found"),
        });
    }
    let mut parts = vec![
        format!("format={IMAGE_FORMAT}"),
        format!("tree={}", tree.key),
    ];
    parts.push(format!("agent={}", sha256_file(&opts.agent)?));
    parts.push(format!("init={}", sha256_hex(INIT_SCRIPT.as_bytes())));
    parts.push(format!("hostname={}", r.name));
    for (dest, text) in WORKERS {
        parts.push(format!("worker={dest}:{}", sha256_hex(text.as_bytes())));
    }
    parts.push(format!("headroom={}", r.vm.disk_headroom_mib));
    for f in &r.files {
        let sum = sha256_file(&lr.dir.join(&f.src))?;
        parts.push(format!(
            "file={}:{:o}:{sum}",
            f.dest,
            f.mode.unwrap_or(0o644)
        ));
    }
    let key = sha256_hex(parts.join("\n").as_bytes())[..24].to_string();
    let dir = opts.cache_dir.join("images").join(&key);
    let image = dir.join(IMAGE_FILE);
    let licences_path = dir.join(LICENCES_FILE);
    if !opts.rebuild && dir.join(".complete").is_file() {
        let text = std::fs::read_to_string(&licences_path).map_err(io_err(&licences_path))?;
        let licences = LicenceReport::parse(&text)?;
        return Ok(BuiltImage {
            key,
            tree,
            image,
            licences_path,
            licences,
            cached: true,
        });
    }
    need_tool("mkfs.ext4", "e2fsprogs")?;
    let (tmp, log) = crate::util::fresh_work_dir(&opts.cache_dir, "image", &key)?;
    let made = assemble(lr, opts, &tree, &tmp, &log, progress);
    let licences = match made {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    std::fs::write(tmp.join("recipe.name"), r.name.as_bytes()).map_err(io_err(&tmp))?;
    std::fs::write(tmp.join(".complete"), key.as_bytes()).map_err(io_err(&tmp))?;
    crate::util::install_dir(&tmp, &dir, &opts.cache_dir, &key)?;
    prune(&opts.cache_dir, &r.name, &key, &tree.key);
    Ok(BuiltImage {
        key,
        tree,
        image,
        licences_path,
        licences,
        cached: false,
    })
}

/// Drop the older images and package trees of the recipe `name` (those with other keys): the
/// cache keeps one of each per recipe.
fn prune(cache: &Path, name: &str, image_key: &str, tree_key: &str) {
    for (sub, keep, marker) in [
        ("images", image_key, "recipe.name"),
        ("trees", tree_key, "recipe.json"),
    ] {
        let Ok(entries) = std::fs::read_dir(cache.join(sub)) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy() == keep {
                continue;
            }
            let owner = std::fs::read_to_string(e.path().join(marker)).unwrap_or_default();
            let same = if marker == "recipe.json" {
                serde_json::from_str::<serde_json::Value>(&owner)
                    .is_ok_and(|v| v["name"].as_str() == Some(name))
            } else {
                owner == name
            };
            if same {
                tracing::info!("pruning old build cache entry {}", e.path().display());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn assemble(
    lr: &LoadedRecipe,
    opts: &BuildOptions,
    tree: &Tree,
    tmp: &Path,
    log: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<LicenceReport, RecipeError> {
    let r = &lr.recipe;
    let root = tmp.join("root");
    let t = Instant::now();
    progress(Progress::Start("agent, init and recipe files"));
    run_logged(
        "cp -al",
        Command::new("cp").arg("-al").arg(&tree.root).arg(&root),
        log,
    )?;
    let agent = std::fs::read(&opts.agent).map_err(io_err(&opts.agent))?;
    write_in_root(&root, AGENT_PATH, &agent, 0o755)?;
    write_in_root(&root, INIT_PATH, INIT_SCRIPT.as_bytes(), 0o755)?;
    for (dest, text) in WORKERS {
        write_in_root(&root, dest, text.as_bytes(), 0o755)?;
    }
    write_in_root(
        &root,
        "/etc/hostname",
        format!("{}\n", r.name).as_bytes(),
        0o644,
    )?;
    let hosts = format!(
        "127.0.0.1\tlocalhost\n127.0.1.1\t{}\n::1\tlocalhost ip6-localhost\n",
        r.name
    );
    write_in_root(&root, "/etc/hosts", hosts.as_bytes(), 0o644)?;
    for f in &r.files {
        let src = lr.dir.join(&f.src);
        let data = std::fs::read(&src).map_err(io_err(&src))?;
        write_in_root(&root, &f.dest, &data, f.mode.unwrap_or(0o644))?;
    }
    let recipe_toml = toml::to_string(r).unwrap_or_default();
    write_in_root(
        &root,
        "/usr/share/forkd/recipe.toml",
        recipe_toml.as_bytes(),
        0o644,
    )?;
    progress(Progress::Done {
        phase: "agent, init and recipe files",
        seconds: t.elapsed().as_secs_f64(),
        note: format!("{} recipe files", r.files.len()),
    });

    let t = Instant::now();
    progress(Progress::Start("licences"));
    let report = licence::scan(&root)?;
    let text = report.to_toml();
    write_in_root(&root, LICENCES_GUEST_PATH, text.as_bytes(), 0o644)?;
    std::fs::write(tmp.join(LICENCES_FILE), &text).map_err(io_err(tmp))?;
    progress(Progress::Done {
        phase: "licences",
        seconds: t.elapsed().as_secs_f64(),
        note: format!(
            "{} packages, {} distinct licences",
            report.packages.len(),
            report.summary().len()
        ),
    });

    let t = Instant::now();
    progress(Progress::Start("ext4 image (mkfs.ext4 -d)"));
    let (bytes, inodes) = tree_usage(&root)?;
    let size_mib = image_size_mib(bytes, inodes, r.vm.disk_headroom_mib);
    let img = tmp.join(IMAGE_FILE);
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args([
        "-q",
        "-F",
        "-L",
        "forkd-root",
        "-m",
        "0",
        "-i",
        "8192",
        "-E",
        "lazy_itable_init=1",
    ])
    .arg("-d")
    .arg(&root)
    .arg(&img)
    .arg(format!("{size_mib}M"));
    run_logged("mkfs.ext4", &mut mkfs, log)?;
    std::fs::remove_dir_all(&root).map_err(io_err(&root))?;
    progress(Progress::Done {
        phase: "ext4 image (mkfs.ext4 -d)",
        seconds: t.elapsed().as_secs_f64(),
        note: format!("{size_mib} MiB ({} MiB of files)", bytes >> 20),
    });
    Ok(report)
}

/// Image size: the content plus ext4 overhead (10 %, 256 bytes per inode, journal) plus the
/// recipe's headroom, rounded up to 4 MiB.
pub fn image_size_mib(content_bytes: u64, inodes: u64, headroom_mib: u32) -> u64 {
    let content = content_bytes + content_bytes / 10 + inodes * 2 * 256;
    let mib = content.div_ceil(1 << 20) + 64 + u64::from(headroom_mib);
    mib.div_ceil(4) * 4
}
