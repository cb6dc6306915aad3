//! Licence extraction on a small fixture root, and a real ext4 image built from a fixture package
//! tree (mkfs.ext4 and debugfs from e2fsprogs; no network, no mmdebstrap).
//!
//! The full Debian build of python-numpy is `real_python_numpy_rootfs` below: it needs root and
//! the Debian mirror, so it is ignored by default and run by scripts/build-recipes.sh.

use std::path::Path;
use std::process::Command;

use forkd_recipe::licence::{dpkg_installed, parse_copyright, scan};
use forkd_recipe::{BuildOptions, LoadedRecipe, Progress, build_image, rootfs};

const DEP5: &str = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
Upstream-Name: alpha\n\n\
Files: *\nCopyright: 2020 A\nLicense: GPL-2+\n\n\
Files: lib/*\nCopyright: 2021 B\nLicense:  BSD-3-clause\n Redistribution and use...\n\n\
License: GPL-2+\n On Debian systems see /usr/share/common-licenses/GPL-2.\n\n\
License: Unused-Standalone\n text\n";

const FREEFORM: &str = "This is beta.\n\nLicense: see /usr/share/common-licenses/LGPL-2.1.\n\
Permission is hereby granted, free of charge, to any person...\n";

const STATUS: &str = "Package: alpha\nStatus: install ok installed\nVersion: 1.0-1\n\n\
Package: beta\nStatus: install ok installed\nVersion: 2.0-3\n\n\
Package: gamma\nStatus: install ok installed\nVersion: 3\n\n\
Package: removed\nStatus: deinstall ok config-files\nVersion: 9\n";

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// A small root: dpkg status, copyright files (DEP-5, free-form, a symlinked doc dir), a wheel
/// and an npm package.
fn fixture_root(root: &Path) {
    write(root, "var/lib/dpkg/status", STATUS);
    write(root, "usr/share/doc/alpha/copyright", DEP5);
    write(root, "usr/share/doc/beta/copyright", FREEFORM);
    std::os::unix::fs::symlink("alpha", root.join("usr/share/doc/gamma")).unwrap();
    write(
        root,
        "usr/local/lib/python3.11/dist-packages/wheelie-1.2.dist-info/METADATA",
        "Metadata-Version: 2.1\nName: wheelie\nVersion: 1.2\nLicense-Expression: MIT\n\nbody\n",
    );
    write(
        root,
        "opt/forkd/node/node_modules/@scope/pkg/package.json",
        r#"{"name":"@scope/pkg","version":"0.1.0","license":"Apache-2.0"}"#,
    );
}

#[test]
fn dep5_copyright_gives_declared_names() {
    let (names, machine) = parse_copyright(DEP5);
    assert!(machine);
    assert_eq!(
        names,
        vec!["BSD-3-clause".to_string(), "GPL-2+".to_string()]
    );
}

#[test]
fn freeform_copyright_is_detected() {
    let (names, machine) = parse_copyright(FREEFORM);
    assert!(!machine);
    assert_eq!(names, vec!["Expat".to_string(), "LGPL-2.1".to_string()]);
}

#[test]
fn dpkg_status_lists_only_installed() {
    let pkgs = dpkg_installed(STATUS);
    assert_eq!(
        pkgs.keys().collect::<Vec<_>>(),
        vec!["alpha", "beta", "gamma"]
    );
    assert_eq!(pkgs["beta"], "2.0-3");
}

#[test]
fn scan_fixture_root() {
    let dir = tempfile::tempdir().unwrap();
    fixture_root(dir.path());
    let r = scan(dir.path()).unwrap();
    assert_eq!(r.packages.len(), 5, "{:?}", r.packages.keys());
    assert_eq!(r.packages["alpha"].how, "declared");
    assert_eq!(r.packages["beta"].how, "detected");
    // gamma's doc dir is a symlink to alpha's.
    assert_eq!(r.packages["gamma"].licences, r.packages["alpha"].licences);
    assert_eq!(r.packages["pip:wheelie"].licences, vec!["MIT".to_string()]);
    assert_eq!(
        r.packages["npm:@scope/pkg"].licences,
        vec!["Apache-2.0".to_string()]
    );
    let summary = r.summary();
    assert_eq!(summary["GPL-2+"], 2);
    // The report round-trips through its TOML form.
    let back = forkd_recipe::LicenceReport::parse(&r.to_toml()).unwrap();
    assert_eq!(back, r);
    assert!(
        r.summary_line(40).ends_with("; ..."),
        "{}",
        r.summary_line(40)
    );
    let md = r.markdown();
    assert!(md.contains("Packages: 3 Debian, 1 PyPI, 1 npm"), "{md}");
    assert!(md.contains("| GPL-2+ | 2 |"), "{md}");
    assert!(
        md.contains("| npm:@scope/pkg | 0.1.0 | Apache-2.0 |"),
        "{md}"
    );
}

#[test]
fn scan_without_dpkg_status_fails() {
    let dir = tempfile::tempdir().unwrap();
    let e = scan(dir.path()).unwrap_err();
    assert!(e.to_string().contains("var/lib/dpkg/status"), "{e}");
}

fn need(tool: &str, package: &str) {
    let ok = ["/usr/sbin", "/sbin", "/usr/bin"]
        .iter()
        .any(|d| Path::new(d).join(tool).is_file());
    assert!(ok, "{tool} not found: install the Debian package {package}");
}

fn debugfs_cat(image: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "debugfs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fixture package tree placed in the cache under the recipe's tree key: `build_image` then
/// does the real rest (hard-link copy, agent, init, files, licences, mkfs.ext4) without network.
#[test]
fn image_from_cached_tree_is_real_ext4_and_cached() {
    need("mkfs.ext4", "e2fsprogs");
    need("debugfs", "e2fsprogs");
    let work = tempfile::tempdir().unwrap();
    let rdir = work.path().join("recipe");
    std::fs::create_dir_all(&rdir).unwrap();
    let text = "name = \"fixture\"\nversion = \"1\"\nbase = \"debian:bookworm\"\n\
                [packages]\ndebian = [\"alpha\"]\n\
                [[files]]\nsrc = \"hello.txt\"\ndest = \"/etc/motd\"\n\
                [vm]\nmemory_mib = 128\ndisk_headroom_mib = 8\n\
                [warm]\nkind = \"sh\"\n[[smoke]]\nexec = \"cat /etc/motd\"\nexpect = \"hello\"\n";
    std::fs::write(rdir.join("recipe.toml"), text).unwrap();
    std::fs::write(rdir.join("hello.txt"), "hello from the recipe\n").unwrap();
    let lr = LoadedRecipe::load(&rdir).unwrap();

    let cache = work.path().join("cache");
    let tree = cache.join("trees").join(rootfs::tree_key(&lr.recipe));
    fixture_root(&tree.join("root"));
    write(&tree.join("root"), "etc/motd", "the tree's own motd\n");
    std::fs::write(tree.join(".complete"), "").unwrap();
    let agent = work.path().join("agent");
    std::fs::write(&agent, "#!/bin/sh\necho fake agent for the image test\n").unwrap();

    let opts = BuildOptions {
        cache_dir: cache.clone(),
        rebuild: false,
        agent,
    };
    let mut phases = Vec::new();
    let built = build_image(&lr, &opts, &mut |p| {
        if let Progress::Done { phase, .. } = p {
            phases.push(phase)
        }
    })
    .unwrap();
    assert!(!built.cached && built.tree.cached);
    assert!(phases.contains(&"ext4 image (mkfs.ext4 -d)"), "{phases:?}");
    assert_eq!(
        debugfs_cat(&built.image, "/etc/motd"),
        "hello from the recipe\n"
    );
    assert!(
        debugfs_cat(&built.image, "/sbin/forkd-init").contains("exec /usr/local/sbin/forkd-agent")
    );
    assert!(debugfs_cat(&built.image, "/usr/local/sbin/forkd-agent").contains("fake agent"));
    assert!(
        debugfs_cat(&built.image, "/usr/share/forkd/licences.toml").contains("[packages.alpha]")
    );
    assert_eq!(debugfs_cat(&built.image, "/etc/hostname"), "fixture\n");
    // The cached tree behind the hard links is untouched.
    let motd = std::fs::read_to_string(tree.join("root/etc/motd")).unwrap();
    assert_eq!(motd, "the tree's own motd\n");
    assert_eq!(built.licences.packages.len(), 5);

    // Same inputs: the image comes from the cache, byte for byte the same file.
    let again = build_image(&lr, &opts, &mut |_| {}).unwrap();
    assert!(again.cached);
    assert_eq!(again.image, built.image);
    // A changed recipe file makes a new image key.
    std::fs::write(rdir.join("hello.txt"), "changed\n").unwrap();
    let changed = build_image(&lr, &opts, &mut |_| {}).unwrap();
    assert_ne!(changed.key, built.key);
    assert_eq!(debugfs_cat(&changed.image, "/etc/motd"), "changed\n");
    // The cache keeps one image per recipe: the old one is gone, the tree is kept.
    assert!(!built.image.exists(), "old image not pruned");
    assert!(tree.join("root/etc/motd").is_file());
    // Nothing is left behind in the cache's staging area.
    let left: Vec<_> = std::fs::read_dir(cache.join("tmp")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn image_size_has_headroom() {
    let mib = forkd_recipe::image::image_size_mib(200 << 20, 10_000, 128);
    assert!(
        mib >= 200 + 128 && mib.is_multiple_of(4) && mib < 450,
        "{mib}"
    );
}

/// The real thing: mmdebstrap of python-numpy from the Debian mirror (as root), then the image.
#[test]
#[ignore = "needs root and the Debian mirror; run by scripts/build-recipes.sh"]
fn real_python_numpy_rootfs() {
    need("mmdebstrap", "mmdebstrap");
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes/python-numpy");
    let lr = LoadedRecipe::load(&recipe).unwrap();
    let cache =
        std::env::var_os("FORKD_BUILD_CACHE").expect("set FORKD_BUILD_CACHE to a cache directory");
    let agent = std::env::var_os("FORKD_AGENT").expect("set FORKD_AGENT to the forkd-agent binary");
    let opts = BuildOptions {
        cache_dir: cache.into(),
        rebuild: false,
        agent: agent.into(),
    };
    let built = build_image(&lr, &opts, &mut |_| {}).unwrap();
    let numpy = debugfs_cat(
        &built.image,
        "/usr/lib/python3/dist-packages/numpy/version.py",
    );
    assert!(numpy.contains("version"), "{numpy}");
    assert!(built.licences.packages.contains_key("python3-numpy"));
    assert!(built.licences.packages.contains_key("libc6"));
}
