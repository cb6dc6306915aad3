//! `forkd build` end to end on a small real VM: a busybox package tree (placed in the build cache
//! so no network is needed) becomes an ext4 image, boots under QEMU with the engine's kernel and
//! initramfs (recipes/tiny/build.sh, run by scripts/setup-engine.sh), is warmed, passes its smoke
//! checks in forked children and lands in the store with its licences. A recipe whose smoke check
//! fails leaves the store exactly as it was.

use std::path::{Path, PathBuf};
use std::process::Command;

use forkd_recipe::{LoadedRecipe, rootfs};

/// The guest assets CI keeps (scripts/setup-engine.sh fills them): `$FORKD_ASSETS`, else
/// /var/cache/forkd-ci/assets. Passed explicitly: forkd's own default is `$FORKD_HOME/assets`.
fn ci_assets() -> PathBuf {
    std::env::var_os("FORKD_ASSETS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/forkd-ci/assets"))
}

/// The engine's kernel and initramfs, made by recipes/tiny/build.sh.
fn assets() -> PathBuf {
    ci_assets().join("tiny")
}

fn need_file(p: &Path, how: &str) {
    assert!(p.is_file(), "{} not found: {how}", p.display());
}

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// A root filesystem of static busybox, with a dpkg status and copyright file for it.
fn busybox_tree(root: &Path) {
    let bb = Path::new("/bin/busybox");
    need_file(bb, "install the Debian package busybox-static");
    for d in [
        "bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp", "root", "usr/bin",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(bb, root.join("bin/busybox")).unwrap();
    let list = Command::new(bb).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    write(root, "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n");
    write(
        root,
        "var/lib/dpkg/status",
        "Package: busybox-static\nStatus: install ok installed\nVersion: 1:1.35.0-4\n",
    );
    write(
        root,
        "usr/share/doc/busybox-static/copyright",
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n\
         Files: *\nCopyright: Erik Andersen and others\nLicense: GPL-2\n",
    );
}

fn recipe(dir: &Path, name: &str, expect: &str) {
    let text = format!(
        "name = \"{name}\"\nversion = \"1\"\ndescription = \"busybox fixture\"\n\
         base = \"debian:bookworm\"\n[packages]\ndebian = [\"busybox-static\"]\n\
         [[files]]\nsrc = \"motd\"\ndest = \"/etc/motd\"\n\
         [vm]\nmemory_mib = 128\ndisk_headroom_mib = 8\n\
         [warm]\nkind = \"sh\"\npreload = \"WARMED=yes-$(cat /etc/motd)\"\n\
         [[smoke]]\nrun = \"echo $WARMED\"\nexpect = \"{expect}\"\n\
         [[smoke]]\nexec = \"hostname; grep -q ' /tmp tmpfs ' /proc/mounts && cat /etc/motd\"\nexpect = \"motd-text\"\n"
    );
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("recipe.toml"), text).unwrap();
    std::fs::write(dir.join("motd"), "motd-text\n").unwrap();
    // The tree the recipe asks for, already in the cache.
    let lr = LoadedRecipe::load(dir).unwrap();
    let tree = dir
        .join("../cache/trees")
        .join(rootfs::tree_key(&lr.recipe));
    if !tree.join(".complete").is_file() {
        busybox_tree(&tree.join("root"));
        std::fs::write(tree.join(".complete"), "").unwrap();
    }
}

fn forkd(home: &Path, work: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(args)
        .env("FORKD_HOME", home)
        .env("FORKD_ASSETS", ci_assets())
        .env("FORKD_BUILD_CACHE", work.join("cache"))
        .env("FORKD_AGENT", work.join("agent"))
        .output()
        .unwrap()
}

fn tree_listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let m = e.metadata().unwrap();
            out.push(format!(
                "{} {}",
                e.path().display(),
                if m.is_dir() { 0 } else { m.len() }
            ));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn build_boots_warms_smokes_and_stores_and_a_failed_smoke_changes_nothing() {
    need_file(
        &assets().join("vmlinuz"),
        "run scripts/setup-engine.sh (recipes/tiny/build.sh)",
    );
    need_file(
        &assets().join("initrd.img"),
        "run scripts/setup-engine.sh (recipes/tiny/build.sh)",
    );
    assert!(
        ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
            .iter()
            .any(|p| Path::new(p).is_file()),
        "mkfs.ext4 not found: install the Debian package e2fsprogs"
    );
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    // The initramfs brings its own agent; the image's copy only has to exist.
    std::fs::write(work.path().join("agent"), "#!/bin/sh\nexit 1\n").unwrap();

    let good = work.path().join("good");
    recipe(&good, "bb-good", "yes-motd-text");
    let out = forkd(
        &home,
        work.path(),
        &["build", good.to_str().unwrap(), "--json"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "build failed:\n{err}");
    assert!(
        err.contains("smoke[0] ok") && err.contains("smoke[1] ok"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tag"], "bb-good");
    let snap = home.join("images/bb-good");
    let manifest = std::fs::read_to_string(snap.join("manifest.toml")).unwrap();
    assert!(manifest.contains("[files.\"licences.toml\"]"), "{manifest}");
    assert!(manifest.contains("licences = \"GPL-2 (1)\""), "{manifest}");
    assert!(manifest.contains("recipe = \"bb-good\""), "{manifest}");
    let lic = std::fs::read_to_string(snap.join("licences.toml")).unwrap();
    assert!(lic.contains("[packages.busybox-static]"), "{lic}");

    // The smoke child's reads were recorded (the working set), and a push publishes them as
    // chunk indices in the image manifest.
    let ws: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("workingset.json")).unwrap()).unwrap();
    let touches = ws["touches"].as_array().unwrap();
    for f in ["memory.bin", "vmstate"] {
        assert!(
            touches.iter().any(|t| t["file"] == f),
            "the working set has no read of {f}: {ws}"
        );
    }
    let out = forkd(
        &home,
        work.path(),
        &["push", "bb-good", "acme/bb-good", "--unsigned"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tag: serde_json::Value = serde_json::from_slice(
        &std::fs::read(home.join("hub/tags/acme/bb-good/latest.json")).unwrap(),
    )
    .unwrap();
    let hex = tag["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    let body = std::fs::read(home.join(format!("hub/blobs/sha256/{}/{hex}", &hex[..2]))).unwrap();
    let im = serde_json::to_value(forkd_hub::layout::decode_manifest(&body).unwrap()).unwrap();
    let set = im["working_set"]
        .as_array()
        .expect("working_set in the image manifest");
    let chunks: usize = im["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["chunks"].as_array().unwrap().len())
        .sum();
    assert!(
        !set.is_empty() && set.len() <= chunks,
        "{set:?} of {chunks}"
    );

    // A failing smoke check: error, and the store byte-for-byte as before.
    let before = tree_listing(&home);
    let bad = work.path().join("bad");
    recipe(&bad, "bb-bad", "not-what-it-says");
    let out = forkd(&home, work.path(), &["build", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a failing smoke check must fail the build"
    );
    assert!(
        err.contains("smoke[0] failed") && err.contains("yes-motd-text"),
        "{err}"
    );
    assert_eq!(
        tree_listing(&home),
        before,
        "the store changed after a failed build"
    );
}
