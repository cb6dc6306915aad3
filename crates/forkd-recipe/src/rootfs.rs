//! The package tree of a recipe: Debian packages by mmdebstrap, then PyPI wheels and npm
//! packages, all from the network. It is slow (a minute or more), so the finished tree is cached
//! under `CACHE/trees/KEY/root`, where KEY hashes everything that went into it. A tree appears in
//! the cache only when complete (built in `CACHE/tmp/`, then renamed).
//!
//! Documentation, man pages and translations are never unpacked (dpkg path filters), except the
//! `copyright` files, which the licence report reads.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::Serialize;

use crate::util::{io_err, need_tool, run_logged, sha256_hex};
use crate::{BuildOptions, Progress, Recipe, RecipeError};

/// Bump when the way trees are made changes, so old cache entries are not reused.
const TREE_FORMAT: u32 = 2;

/// Where npm packages go in the guest.
pub const NODE_PREFIX: &str = "/opt/forkd/node";

/// dpkg filters: keep the image small, keep the licences.
const DPKG_FILTERS: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/linda/*",
];

#[derive(Serialize)]
struct TreeKey<'a> {
    format: u32,
    sources: Vec<String>,
    debian: Vec<&'a str>,
    pip: &'a [String],
    npm: &'a [String],
}

/// The cache key of a recipe's package tree (hex sha256, first 24 characters).
pub fn tree_key(r: &Recipe) -> String {
    let mut debian: Vec<&str> = r.packages.debian.iter().map(String::as_str).collect();
    debian.sort_unstable();
    let key = TreeKey {
        format: TREE_FORMAT,
        sources: r.sources(),
        debian,
        pip: &r.packages.pip,
        npm: &r.packages.npm,
    };
    let json = serde_json::to_vec(&key).unwrap_or_default();
    sha256_hex(&json)[..24].to_string()
}

/// A finished package tree.
#[derive(Debug, Clone)]
pub struct Tree {
    pub key: String,
    /// The root directory of the tree.
    pub root: PathBuf,
    /// Whether it came from the cache.
    pub cached: bool,
}

/// Make (or find in the cache) the package tree of `r`.
pub fn ensure_tree(
    r: &Recipe,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Tree, RecipeError> {
    let key = tree_key(r);
    let dir = opts.cache_dir.join("trees").join(&key);
    let root = dir.join("root");
    if !opts.rebuild && dir.join(".complete").is_file() {
        return Ok(Tree {
            key,
            root,
            cached: true,
        });
    }
    if !crate::util::is_root() {
        return Err(RecipeError::NotRoot);
    }
    need_tool("mmdebstrap", "mmdebstrap")?;
    let (tmp, log) = crate::util::fresh_work_dir(&opts.cache_dir, "tree", &key)?;
    let result = build_tree(r, &tmp, &log, progress);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::write(
        tmp.join("recipe.json"),
        serde_json::to_vec_pretty(r).unwrap_or_default(),
    )
    .map_err(io_err(&tmp))?;
    std::fs::write(tmp.join(".complete"), key.as_bytes()).map_err(io_err(&tmp))?;
    crate::util::install_dir(&tmp, &dir, &opts.cache_dir, &key)?;
    Ok(Tree {
        key,
        root,
        cached: false,
    })
}

fn build_tree(
    r: &Recipe,
    tmp: &Path,
    log: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), RecipeError> {
    let root = tmp.join("root");
    let t = Instant::now();
    progress(Progress::Start("debian packages (mmdebstrap)"));
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg("--mode=root")
        .arg("--variant=minbase")
        .arg("--format=directory");
    cmd.arg(format!("--include={}", r.packages.debian.join(",")));
    cmd.arg("--aptopt=APT::Install-Recommends \"false\"");
    for f in DPKG_FILTERS {
        cmd.arg(format!("--dpkgopt={f}"));
    }
    cmd.arg(r.suite()).arg(&root).args(r.sources());
    run_logged("mmdebstrap", &mut cmd, log)?;
    progress(Progress::Done {
        phase: "debian packages (mmdebstrap)",
        seconds: t.elapsed().as_secs_f64(),
        note: format!("{} packages requested", r.packages.debian.len()),
    });
    if !r.packages.pip.is_empty() {
        let t = Instant::now();
        progress(Progress::Start("pip packages"));
        install_pip(r, &root, log)?;
        progress(Progress::Done {
            phase: "pip packages",
            seconds: t.elapsed().as_secs_f64(),
            note: r.packages.pip.join(" "),
        });
    }
    if !r.packages.npm.is_empty() {
        let t = Instant::now();
        progress(Progress::Start("npm packages"));
        install_npm(r, &root, log)?;
        progress(Progress::Done {
            phase: "npm packages",
            seconds: t.elapsed().as_secs_f64(),
            note: r.packages.npm.join(" "),
        });
    }
    for junk in [
        "var/cache/apt/pkgcache.bin",
        "var/cache/apt/srcpkgcache.bin",
        "var/log/apt/term.log",
    ] {
        let _ = std::fs::remove_file(root.join(junk));
    }
    Ok(())
}

/// The guest's Python version ("3.11"), read from its `usr/bin/python3` symlink.
fn guest_python(root: &Path) -> Result<String, RecipeError> {
    let link = root.join("usr/bin/python3");
    let target = std::fs::read_link(&link).map_err(|_| RecipeError::Invalid {
        field: "packages.pip".into(),
        message: "pip packages need Python in the guest: add `python3` to packages.debian".into(),
    })?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(name.trim_start_matches("python").to_string())
}

/// Wheels for the guest's Python, installed with the host's pip into the guest's
/// /usr/local/lib/pythonX.Y/dist-packages (binary wheels only: nothing is compiled).
fn install_pip(r: &Recipe, root: &Path, log: &Path) -> Result<(), RecipeError> {
    let py = guest_python(root)?;
    need_tool("pip3", "python3-pip")?;
    let target = root.join(format!("usr/local/lib/python{py}/dist-packages"));
    std::fs::create_dir_all(&target).map_err(io_err(&target))?;
    let mut cmd = Command::new("pip3");
    cmd.args([
        "install",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--no-compile",
    ])
    .args([
        "--only-binary=:all:",
        "--platform",
        "manylinux2014_x86_64",
        "--implementation",
        "cp",
    ])
    .arg("--python-version")
    .arg(&py)
    .arg("--target")
    .arg(&target)
    .arg("--")
    .args(&r.packages.pip);
    run_logged("pip install", &mut cmd, log)
}

/// npm packages installed with the host's npm under the guest's /opt/forkd/node.
fn install_npm(r: &Recipe, root: &Path, log: &Path) -> Result<(), RecipeError> {
    need_tool("npm", "npm")?;
    let prefix = root.join(NODE_PREFIX.trim_start_matches('/'));
    std::fs::create_dir_all(&prefix).map_err(io_err(&prefix))?;
    let mut cmd = Command::new("npm");
    cmd.args([
        "install",
        "--omit=dev",
        "--no-audit",
        "--no-fund",
        "--no-package-lock",
        "--ignore-scripts",
    ])
    .arg("--prefix")
    .arg(&prefix)
    .arg("--")
    .args(&r.packages.npm);
    run_logged("npm install", &mut cmd, log)?;
    let _ = std::fs::remove_file(prefix.join("package.json"));
    Ok(())
}
