//! Lazy fork (`forkd fork --tag OWNER/NAME --hub URL` on a store that lacks NAME): children of
//! a real tiny image start under QEMU while the image downloads from a real HTTP hub, through
//! a real FUSE mount; the image ends installed exactly as a pull leaves it. And what must go
//! wrong well: wrong bytes, a hub that disappears, a mount that dies, two forks at once.
//!
//! Needs QEMU, the guest kernel (`bash scripts/setup-engine.sh`) and /dev/fuse (root).

mod cli_common;
mod hub_common;

use cli_common::{build_tiny_in, cmd_in, json, new_home, text};
use hub_common::faulty::{Faulty, Mode};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The tiny image, pushed signed as `acme/tiny` to a file hub, once per test binary.
struct Hub {
    _dir: tempfile::TempDir,
    root: PathBuf,
    key: String,
    /// The installed files' sha256 in the publisher's store.
    hashes: std::collections::BTreeMap<String, String>,
}

fn hub() -> &'static Hub {
    static H: OnceLock<Hub> = OnceLock::new();
    H.get_or_init(|| {
        assert!(
            Path::new("/dev/fuse").exists(),
            "lazy fork needs /dev/fuse (the fuse kernel module: modprobe fuse)"
        );
        let dir = new_home();
        cli_common::remove_at_exit(dir.path());
        let home = dir.path().to_path_buf();
        build_tiny_in(&home);
        let o = cmd_in(&home)
            .args(["-q", "key", "generate"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let key = std::fs::read_to_string(home.join("keys/forkd.pub"))
            .unwrap()
            .lines()
            .nth(1)
            .unwrap()
            .to_string();
        let root = home.join("hub");
        let o = cmd_in(&home)
            .args(["-q", "push", "tiny", "acme/tiny"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let hashes = hub_common::tag_hashes(&home, "tiny");
        Hub {
            _dir: dir,
            root,
            key,
            hashes,
        }
    })
}

fn lazy_fork(home: &Path, url: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let h = hub();
    let mut c = cmd_in(home);
    c.args([
        "-q",
        "fork",
        "--tag",
        "acme/tiny",
        "--hub",
        url,
        "--trust",
        &h.key,
        "--json",
    ])
    .args(extra)
    .env("FORKD_HUB_ATTEMPTS", "1");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// Lazy mounts of this store still mounted (from /proc/self/mountinfo).
fn mounts_of(home: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let prefix = home.join("cache/lazy").display().to_string();
    info.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|p| p.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

fn assert_clean(home: &Path) {
    assert!(
        mounts_of(home).is_empty(),
        "mounts left: {:?}",
        mounts_of(home)
    );
    let left: Vec<_> = std::fs::read_dir(home.join("cache/lazy"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "mount points left: {left:?}");
}

#[test]
fn lazy_fork_runs_children_then_installs_the_image_as_a_pull_would() {
    let h = hub();
    let home = new_home();
    // Slow blobs: the download takes seconds, so children run while it is not done.
    let server = Faulty::start(&h.root, Mode::Slow(300));
    let out = lazy_fork(
        home.path(),
        &server.url,
        &["-n", "2", "--exec", "echo lazy-$(hostname)"],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let v = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(v["succeeded"], 2, "{v}");
    for c in v["children"].as_array().unwrap() {
        assert!(
            c["exec"]["stdout"]
                .as_str()
                .unwrap_or_default()
                .contains("lazy-"),
            "{c}"
        );
    }
    let pull = &v["pull"];
    assert_eq!(pull["lazy"], true, "{v}");
    assert_eq!(pull["installed"], "tiny", "{v}");
    let total = pull["image_bytes"].as_u64().unwrap();
    // Reads waited for chunks that were not there yet: the children ran before the image did.
    let demanded = pull["demanded_bytes"].as_u64().unwrap();
    assert!(
        demanded > 0 && demanded < total,
        "no read waited for a chunk ({demanded} of {total} bytes demanded): the fork was not lazy"
    );
    assert!(pull["first_child_ms"].as_u64().is_some(), "{v}");
    // What the reads cost is reported: they read part of the image, and waited for it.
    for reads in [&pull["reads"], &pull["reads_at_first_child"]] {
        let read = reads["read_bytes"].as_u64().unwrap_or(0);
        assert!(read > 0 && read <= total, "{v}");
        let waited = reads["waited_for_requested_ms"].as_u64().unwrap_or(0)
            + reads["waited_for_in_flight_ms"].as_u64().unwrap_or(0);
        assert!(waited > 0, "no read waited behind a slow hub: {v}");
    }
    // Every byte was served about once: a chunk the image lists twice can be fetched twice
    // when two reads want it at the same moment, and a ranged GET may span a chunk that is
    // already here (at most 64 KiB): a few percent, never a second copy of the image.
    let downloaded = pull["downloaded_bytes"].as_u64().unwrap();
    assert!(downloaded >= total, "{v}");
    assert!(
        server.bytes() <= total * 21 / 20,
        "{} > {total}",
        server.bytes()
    );
    // Installed exactly as a pull leaves it: the publisher's files, and a pull is a no-op.
    assert_eq!(hub_common::tag_hashes(home.path(), "tiny"), h.hashes);
    assert_clean(home.path());
    let o = cmd_in(home.path())
        .args(["pull", "acme/tiny", "--hub", &server.url, "--trust", &h.key])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("up to date"),
        "{}",
        text(&o)
    );
    // And the next fork uses the store.
    let o = cmd_in(home.path())
        .args([
            "-q",
            "fork",
            "--tag",
            "acme/tiny",
            "--exec",
            "true",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(json(&String::from_utf8_lossy(&o.stdout))["pull"].is_null());
}

#[test]
fn wrong_bytes_from_the_hub_are_refused_before_any_guest_sees_them() {
    let h = hub();
    let home = new_home();
    let server = Faulty::start(&h.root, Mode::WrongBytes);
    let t = Instant::now();
    let out = lazy_fork(home.path(), &server.url, &["--exec", "echo ran"], &[]);
    assert!(!out.status.success(), "{}", text(&out));
    let all = text(&out);
    assert!(
        all.contains("sha256:") && all.to_lowercase().contains("blob"),
        "the error names no chunk:\n{all}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("\"ran"),
        "a child ran from corrupt bytes:\n{all}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(120),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        cmd_in(home.path())
            .args(["inspect", "tiny"])
            .output()
            .map(|o| !o.status.success())
            .unwrap(),
        "a corrupt image was installed"
    );
    assert_clean(home.path());
}

#[test]
fn the_hub_disappearing_fails_children_cleanly_and_a_later_pull_completes() {
    let h = hub();
    let home = new_home();
    // Serve a little, then cut every blob: the hub is gone mid-fork.
    let server = Faulty::start(&h.root, Mode::CutAfter(256 << 10));
    let t = Instant::now();
    let out = lazy_fork(
        home.path(),
        &server.url,
        &["-n", "2", "--exec", "true"],
        &[],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        t.elapsed() < Duration::from_secs(150),
        "took {:?}",
        t.elapsed()
    );
    let all = text(&out);
    assert!(all.contains("sha256:"), "the error names no chunk:\n{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&stdout) {
        assert!(v["pull"]["error"].is_string(), "{v}");
    }
    assert_clean(home.path());
    // The hub is back: a pull resumes what was verified and completes.
    server.set_mode(Mode::Normal);
    let o = cmd_in(home.path())
        .args([
            "pull",
            "acme/tiny",
            "--hub",
            &server.url,
            "--trust",
            &h.key,
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let v = json(&String::from_utf8_lossy(&o.stdout));
    assert!(
        v["cached_bytes"].as_u64().unwrap() > 0,
        "nothing resumed: {v}"
    );
    assert_eq!(hub_common::tag_hashes(home.path(), "tiny"), h.hashes);
}

#[test]
fn two_lazy_forks_of_one_image_download_it_once() {
    let h = hub();
    let home = new_home();
    let server = Faulty::start(&h.root, Mode::Slow(50));
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| lazy_fork(home.path(), &server.url, &["--exec", "true"], &[]));
        let b = s.spawn(|| lazy_fork(home.path(), &server.url, &["--exec", "true"], &[]));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(a.status.success(), "{}", text(&a));
    assert!(b.status.success(), "{}", text(&b));
    let total: u64 = [&a, &b]
        .iter()
        .filter_map(|o| json(&String::from_utf8_lossy(&o.stdout))["pull"]["image_bytes"].as_u64())
        .max()
        .unwrap();
    // One download: a second would double it (see the first test for the few percent).
    assert!(
        server.bytes() <= total * 21 / 20,
        "{} bytes served for an image of {total}",
        server.bytes()
    );
    assert_eq!(hub_common::tag_hashes(home.path(), "tiny"), h.hashes);
    assert_clean(home.path());
}

#[test]
fn a_mount_that_dies_fails_its_children_and_is_cleaned_up() {
    let h = hub();
    let home = new_home();
    let server = Faulty::start(&h.root, Mode::Slow(300));
    let child = cmd_in(home.path())
        .args([
            "-q",
            "fork",
            "--tag",
            "acme/tiny",
            "--hub",
            &server.url,
            "--trust",
            &h.key,
            "--json",
            "-n",
            "2",
            "--exec",
            "true",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the mount, then abort its FUSE connection from outside (what a crash of the
    // server side looks like to the kernel).
    let t = Instant::now();
    let mnt = loop {
        if let Some(m) = mounts_of(home.path()).pop() {
            break m;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no lazy mount appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let dev = std::os::linux::fs::MetadataExt::st_dev(&std::fs::metadata(&mnt).unwrap());
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let abort = format!("/sys/fs/fuse/connections/{minor}/abort");
    if !Path::new("/sys/fs/fuse/connections")
        .join(minor.to_string())
        .exists()
    {
        let _ = std::process::Command::new("mount")
            .args(["-t", "fusectl", "none", "/sys/fs/fuse/connections"])
            .status();
    }
    std::fs::write(&abort, "1").unwrap_or_else(|e| panic!("cannot write {abort}: {e}"));
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    // Either the fork stopped before any child (its first read failed), or children failed.
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&String::from_utf8_lossy(&out.stdout))
    {
        assert!(
            v["succeeded"].as_u64().unwrap() < 2,
            "children ran through a dead mount: {v}"
        );
    }
    assert!(
        t.elapsed() < Duration::from_secs(180),
        "took {:?}",
        t.elapsed()
    );
    assert_clean(home.path());
}

#[test]
fn a_full_disk_fails_the_fork_cleanly_and_leaves_the_store_as_it_was() {
    let h = hub();
    // A store on a 24 MiB tmpfs: the image's data does not fit.
    let dir = new_home();
    let home = dir.path().join("small");
    std::fs::create_dir(&home).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m,mode=0700", "forkd-test-full"])
        .arg(&home)
        .status()
        .expect("mount(8)");
    assert!(
        st.success(),
        "cannot mount a tmpfs (the lazy tests run as root)"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _u = Unmount(home.clone());
    let server = Faulty::start(&h.root, Mode::Normal);
    let t = Instant::now();
    let out = lazy_fork(&home, &server.url, &["--exec", "true"], &[]);
    assert!(!out.status.success(), "{}", text(&out));
    let all = text(&out);
    assert!(
        all.contains("No space left"),
        "the error does not say why:\n{all}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(120),
        "took {:?}",
        t.elapsed()
    );
    // Nothing installed, the partial download freed, no mount left.
    assert!(!home.join("images/tiny").exists(), "{all}");
    let partial: Vec<_> = std::fs::read_dir(home.join("cache/partial"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(partial.is_empty(), "partial downloads left: {partial:?}");
    assert_clean(&home);
}

/// The `VmFlags` of the memory.bin mapping of the first running QEMU whose memory file is
/// under `under`, waiting for one to appear (None if none did within `wait`).
fn memory_vm_flags(under: &Path, wait: Duration) -> Option<String> {
    let deadline = Instant::now() + wait;
    let under = under.display().to_string();
    while Instant::now() < deadline {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(smaps) = std::fs::read_to_string(e.path().join("smaps")) else {
                continue;
            };
            let mut lines = smaps.lines();
            while let Some(l) = lines.next() {
                if l.contains(&under) && l.ends_with("memory.bin") {
                    let flags = lines.by_ref().find(|l| l.starts_with("VmFlags:"));
                    if let Some(f) = flags {
                        return Some(f.to_string());
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn a_lazily_served_child_faults_its_memory_in_without_huge_page_read_around() {
    let h = hub();
    let server = Faulty::start(&h.root, Mode::Normal);
    let home = new_home();
    // A lazy child: QEMU's madvise(MADV_HUGEPAGE) on guest RAM must not have marked the mapping.
    let (flags, out) = std::thread::scope(|s| {
        let fork = s.spawn(|| {
            lazy_fork(
                home.path(),
                &server.url,
                &["-n", "1", "--exec", "sleep 4"],
                &[],
            )
        });
        let flags = memory_vm_flags(&home.path().join("cache/lazy"), Duration::from_secs(60));
        (flags, fork.join().unwrap())
    });
    assert!(out.status.success(), "{}", text(&out));
    let flags = flags.expect("no lazily served QEMU was seen");
    assert!(
        !flags.contains(" hg"),
        "the lazy child's memory is huge-page advised: {flags}"
    );
    // A child of the installed image keeps huge pages (so the check above can fail).
    let (flags, out) = std::thread::scope(|s| {
        let fork = s.spawn(|| {
            cmd_in(home.path())
                .args([
                    "-q", "fork", "--tag", "tiny", "-n", "1", "--exec", "sleep 4",
                ])
                .output()
                .unwrap()
        });
        let flags = memory_vm_flags(&home.path().join("images"), Duration::from_secs(60));
        (flags, fork.join().unwrap())
    });
    assert!(out.status.success(), "{}", text(&out));
    let flags = flags.expect("no QEMU of the installed image was seen");
    assert!(
        flags.contains(" hg"),
        "an installed image's child lost huge pages: {flags}"
    );
    assert_clean(home.path());
}
