//! Shared set-up for the engine tests: real QEMU under TCG, the tiny recipe, one parent
//! snapshot per test binary. Missing tools fail loudly, naming what to install.
#![allow(dead_code)]

use forkd_engine::Interrupt;
use forkd_engine::child::Work;
use forkd_engine::fork::ForkOptions;
use forkd_engine::qemu::{AccelChoice, Qemu};
use forkd_engine::snapshot::SnapshotOptions;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn qemu() -> Qemu {
    Qemu::locate(None).unwrap_or_else(|e| {
        panic!("engine tests need QEMU: {e}\n  fix: apt-get install qemu-system-x86 (or run scripts/setup-engine.sh)")
    })
}

/// The guest assets CI keeps (scripts/setup-engine.sh fills them): `$FORKD_ASSETS`, else
/// /var/cache/forkd-ci/assets. Passed explicitly: forkd's own default is `$FORKD_HOME/assets`.
pub fn ci_assets() -> PathBuf {
    std::env::var_os("FORKD_ASSETS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/forkd-ci/assets"))
}

/// The tiny recipe's assets (vmlinuz, initrd.img, rootfs.ext4), built by recipes/tiny/build.sh.
pub fn tiny_assets() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = std::process::Command::new(repo().join("recipes/tiny/build.sh"))
            .env("FORKD_ASSETS", ci_assets())
            .output()
            .expect("running recipes/tiny/build.sh");
        assert!(
            out.status.success(),
            "recipes/tiny/build.sh failed (run scripts/setup-engine.sh: it installs busybox-static, \
             cpio, e2fsprogs and fetches the kernel):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

pub fn tiny_options() -> SnapshotOptions {
    let a = tiny_assets();
    SnapshotOptions {
        kernel: a.join("vmlinuz"),
        initrd: Some(a.join("initrd.img")),
        rootfs: a.join("rootfs.ext4"),
        mem_mib: 192,
        vcpus: 1,
        cmdline: None,
        warmup: Some("echo warmed > /run/forkd-warm".into()),
        warm: Some(forkd_agent::WarmRequest {
            kind: Some("sh".into()),
            argv: None,
            preload: Some("GREETING=from-the-parent".into()),
        }),
        accel: AccelChoice::Tcg,
        boot_timeout: Duration::from_secs(180),
    }
}

/// Remove `dir` when the test binary exits: a `TempDir` in a `static` is never dropped, and
/// each run left its scratch directory (about 900 MiB) in /tmp.
fn remove_at_exit(dir: PathBuf) {
    static DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    extern "C" fn cleanup() {
        for d in std::mem::take(&mut *DIRS.lock().unwrap_or_else(|p| p.into_inner())) {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    DIRS.lock().unwrap_or_else(|p| p.into_inner()).push(dir);
    // SAFETY: `cleanup` is a plain function valid for the life of the process; registered
    // once (scratch() is initialised once).
    unsafe {
        libc::atexit(cleanup);
    }
}

/// A scratch directory that lives as long as the test binary (short path: sockets).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::Builder::new()
            .prefix("fke")
            .tempdir_in("/tmp")
            .expect("tempdir");
        remove_at_exit(d.path().to_path_buf());
        d
    })
    .path()
}

/// One snapshot of the tiny parent per test binary, in a plain directory.
pub fn tiny_snapshot() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let q = qemu();
        let out = scratch().join("snap");
        std::fs::create_dir_all(&out).unwrap();
        forkd_engine::snapshot::take(
            &q,
            &tiny_options(),
            &out,
            &scratch().join("parent"),
            &Interrupt::never(),
        )
        .unwrap_or_else(|e| panic!("snapshot of the tiny parent failed: {e}"));
        out
    })
    .clone()
}

/// Copy a snapshot directory (to damage the copy).
pub fn copy_snapshot(src: &Path, name: &str) -> PathBuf {
    let dst = scratch().join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let st = std::process::Command::new("cp")
            .args(["--sparse=always", "--reflink=auto"])
            .arg(e.path())
            .arg(dst.join(e.file_name()))
            .status()
            .unwrap();
        assert!(st.success());
    }
    dst
}

pub fn fork_options(n: usize, shell: Option<&str>, run_root: &Path) -> ForkOptions {
    ForkOptions {
        n,
        tag: "tiny".into(),
        accel: AccelChoice::Tcg,
        work: Work {
            exec: shell.map(|s| forkd_agent::ExecRequest {
                shell: Some(s.into()),
                ..Default::default()
            }),
            run_code: None,
            ..Default::default()
        },
        keep: false,
        run_root: run_root.to_path_buf(),
        ready_timeout: Duration::from_secs(120),
        interrupt: Interrupt::never(),
        on_child: None,
        layers: None,
        net: None,
    }
}

pub fn sha256(p: &Path) -> String {
    forkd_engine::sha256_file(p).unwrap()
}
