//! Shared helpers for the CLI tests that boot real tiny guests: a store per test binary (or a
//! private one), the real `forkd` binary, and the tiny parent built once.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub const FORKD: &str = env!("CARGO_BIN_EXE_forkd");

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Remove `dir` (and what is in it) when the test binary exits. A `TempDir` held in a
/// `static` is never dropped, so a per-binary store would otherwise stay in /tmp after every
/// run (hundreds of MiB each: CI filled the disk with them).
pub fn remove_at_exit(dir: &Path) {
    static DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    static REGISTER: std::sync::Once = std::sync::Once::new();
    extern "C" fn cleanup() {
        let dirs = std::mem::take(&mut *DIRS.lock().unwrap_or_else(|p| p.into_inner()));
        for d in dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    DIRS.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(dir.to_path_buf());
    // SAFETY: `cleanup` is a plain function that stays valid for the life of the process.
    REGISTER.call_once(|| unsafe {
        libc::atexit(cleanup);
    });
}

/// This test binary's store (removed when the binary exits).
pub fn home() -> &'static Path {
    static H: OnceLock<tempfile::TempDir> = OnceLock::new();
    H.get_or_init(|| {
        let d = new_home();
        remove_at_exit(d.path());
        d
    })
    .path()
}

/// A fresh, empty store directory under /tmp (short paths: sockets live in it).
pub fn new_home() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fkh")
        .tempdir_in("/tmp")
        .unwrap()
}

/// The guest assets CI keeps: `$FORKD_ASSETS`, else /var/cache/forkd-ci/assets.
pub fn ci_assets() -> PathBuf {
    std::env::var_os("FORKD_ASSETS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/forkd-ci/assets"))
}

/// `forkd` with `home` as its store, TCG, and the CI assets; no hub from the environment.
pub fn cmd_in(home: &Path) -> Command {
    let mut c = Command::new(FORKD);
    c.env("FORKD_HOME", home)
        .env("FORKD_ASSETS", ci_assets())
        .env("FORKD_ACCEL", "tcg")
        .env_remove("FORKD_HUB")
        .env_remove("FORKD_HUB_TOKEN");
    c
}

pub fn forkd_in(home: &Path, args: &[&str]) -> Output {
    cmd_in(home).args(args).output().expect("running forkd")
}

pub fn forkd(args: &[&str]) -> Output {
    forkd_in(home(), args)
}

pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn ok_in(home: &Path, args: &[&str]) -> String {
    let o = forkd_in(home, args);
    assert!(o.status.success(), "forkd {args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn ok(args: &[&str]) -> String {
    ok_in(home(), args)
}

pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The tiny recipe's assets (built once by recipes/tiny/build.sh into the CI assets).
pub fn tiny_assets() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new(repo().join("recipes/tiny/build.sh"))
            .env("FORKD_ASSETS", ci_assets())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "recipes/tiny/build.sh failed (run scripts/setup-engine.sh):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

/// Snapshot the tiny parent as `tiny` in `home`.
pub fn build_tiny_in(home: &Path) {
    build_tiny_mem_in(home, 192);
}

/// Snapshot the tiny parent as `tiny` in `home`, with `mem_mib` MiB of guest RAM.
pub fn build_tiny_mem_in(home: &Path, mem_mib: u64) {
    let assets = tiny_assets();
    ok_in(
        home,
        &[
            "-q",
            "build-tiny",
            "--assets",
            assets.to_str().unwrap(),
            "--mem-mib",
            &mem_mib.to_string(),
        ],
    );
}

/// The tiny parent in this binary's store, once.
pub fn tiny() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| build_tiny_in(home()));
}

/// Kill every kept child of `home` (cleanup at the end of a test).
pub fn kill_all_in(home: &Path) {
    let _ = forkd_in(home, &["-q", "kill", "--all"]);
}

/// Kills every kept child of a store when dropped: a test that fails half way leaves no VM.
pub struct KillAll(pub PathBuf);

impl Drop for KillAll {
    fn drop(&mut self) {
        kill_all_in(&self.0);
    }
}
