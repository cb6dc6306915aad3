//! Bad input for the hub, each its own test: the error's gist and an unchanged local store.

mod hub_common;
use forkd_hub::layout;
use hub_common::faulty::{Faulty, Mode};
use hub_common::*;
use std::path::{Path, PathBuf};

/// A consumer home that already holds one image, so "unchanged" is a real comparison.
fn consumer() -> tempfile::TempDir {
    let c = tempfile::tempdir().unwrap();
    make_snapshot(c.path(), "existing", 4, 99);
    c
}

fn pull_fails(c: &Path, args: &[&str], gist: &str) -> String {
    let before = store_state(c);
    let err = fails_with(&forkd(c, args), gist);
    assert_eq!(store_state(c), before, "the store changed");
    assert!(!c.join("images/snap").exists(), "a tag appeared");
    assert_no_staging(c);
    err
}

#[test]
fn unknown_name_is_404() {
    let p = Published::new(8, 10);
    let c = consumer();
    let err = pull_fails(
        c.path(),
        &["pull", "acme/nope", "--hub", &p.url(), "--trust", &p.key],
        "was not found",
    );
    assert!(
        err.contains("acme/nope:latest") && err.contains("forkd search --hub"),
        "{err}"
    );
}

#[test]
fn unknown_version_is_404_over_http() {
    let p = Published::new(8, 11);
    let server = HubServer::start(&p.root, "tok");
    let c = consumer();
    pull_fails(
        c.path(),
        &[
            "pull",
            "acme/snap:v9",
            "--hub",
            &server.url,
            "--trust",
            &p.key,
        ],
        "acme/snap:v9 was not found",
    );
}

#[test]
fn push_with_wrong_token_is_401_and_without_token_is_refused() {
    let p = Published::new(8, 12);
    let root = tempfile::tempdir().unwrap();
    let server = HubServer::start(root.path(), "right-token");
    let out = forkd_env(
        &p.home,
        &["push", "snap", "acme/x", "--hub", &server.url],
        &[("FORKD_HUB_TOKEN", "wrong-token")],
    );
    let err = fails_with(&out, "401 Unauthorized");
    assert!(
        !err.contains("wrong-token") && !err.contains("right-token"),
        "token leaked: {err}"
    );
    fails_with(
        &forkd(&p.home, &["push", "snap", "acme/x", "--hub", &server.url]),
        "need its token",
    );
    assert!(!root.path().join("tags").exists(), "nothing was written");
    // The server itself refuses an unauthenticated PUT with 401.
    let code = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "--data-binary",
            "x",
        ])
        .arg(format!("{}catalog.json", server.url))
        .output()
        .expect("curl is missing: install the curl package");
    assert_eq!(String::from_utf8_lossy(&code.stdout), "401");
}

#[test]
fn forbidden_is_403() {
    let p = Published::new(8, 13);
    let server = Faulty::start(&p.root, Mode::Status(403));
    let c = consumer();
    pull_fails(
        c.path(),
        &[
            "pull",
            "acme/snap:v1",
            "--hub",
            &server.url,
            "--trust",
            &p.key,
        ],
        "403 Forbidden",
    );
}

#[test]
fn connection_dropped_mid_blob() {
    let p = Published::new(8, 14);
    let server = Faulty::start(&p.root, Mode::CutBlobs);
    let c = consumer();
    let err = pull_fails(
        c.path(),
        &[
            "pull",
            "acme/snap:v1",
            "--hub",
            &server.url,
            "--trust",
            &p.key,
        ],
        "cannot download blob",
    );
    assert!(err.contains("connection failed"), "{err}");
}

#[test]
fn wrong_bytes_are_a_digest_mismatch() {
    let p = Published::new(8, 15);
    let server = Faulty::start(&p.root, Mode::WrongBytes);
    let c = consumer();
    pull_fails(
        c.path(),
        &[
            "pull",
            "acme/snap:v1",
            "--hub",
            &server.url,
            "--trust",
            &p.key,
        ],
        "is corrupt: expected sha256:",
    );
}

#[test]
fn truncated_blob_is_refused() {
    let p = Published::new(8, 16);
    let blob = &data_blobs(&p.root)[0];
    let len = std::fs::metadata(blob).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(blob)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let c = consumer();
    pull_fails(
        c.path(),
        &["pull", "acme/snap:v1", "--hub", &p.url(), "--trust", &p.key],
        "is corrupt",
    );
}

/// Re-point the tag at an edited manifest (stored at its own, correct digest): the signature,
/// made over the original manifest, no longer verifies.
#[test]
fn tampered_tag_and_manifest_fail_the_signature() {
    let p = Published::new(8, 17);
    let tag_path = p.root.join(layout::version_tag_key("acme", "snap", "v1"));
    let mut tag: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&tag_path).unwrap()).unwrap();
    let mblob = p
        .root
        .join(layout::blob_key(tag["digest"].as_str().unwrap()));
    let text = manifest_json(&mblob).to_string();
    let evil = text.replacen("synthetic test snapshot", "evil test snapshot!!", 1);
    assert_ne!(evil, text);
    let evil_digest = layout::sha256_digest(evil.as_bytes());
    let evil_path = p.root.join(layout::blob_key(&evil_digest));
    std::fs::create_dir_all(evil_path.parent().unwrap()).unwrap();
    std::fs::write(&evil_path, &evil).unwrap();
    tag["digest"] = evil_digest.into();
    std::fs::write(&tag_path, serde_json::to_vec(&tag).unwrap()).unwrap();
    let c = consumer();
    let err = pull_fails(
        c.path(),
        &["pull", "acme/snap:v1", "--hub", &p.url(), "--trust", &p.key],
        "signature check failed",
    );
    assert!(err.contains("--insecure"), "{err}");
}

/// A manifest blob edited in place no longer matches the digest the tag names.
#[test]
fn tampered_manifest_blob_is_corrupt() {
    let p = Published::new(8, 18);
    let tag: serde_json::Value = serde_json::from_slice(
        &std::fs::read(p.root.join(layout::version_tag_key("acme", "snap", "v1"))).unwrap(),
    )
    .unwrap();
    let mblob = p
        .root
        .join(layout::blob_key(tag["digest"].as_str().unwrap()));
    let text = manifest_json(&mblob).to_string();
    let evil = text.replacen("\"size\":", "\"size\":1", 1);
    assert_ne!(evil, text);
    std::fs::write(&mblob, evil).unwrap();
    let c = consumer();
    pull_fails(
        c.path(),
        &["pull", "acme/snap:v1", "--hub", &p.url(), "--trust", &p.key],
        "image manifest",
    );
}

#[test]
fn catalogue_not_json() {
    let p = Published::new(8, 19);
    std::fs::write(p.root.join("catalog.json"), b"{ this is not json").unwrap();
    let c = consumer();
    fails_with(
        &forkd(c.path(), &["search", "--hub", &p.url()]),
        "catalog.json on",
    );
    fails_with(
        &forkd(c.path(), &["search", "--hub", &p.url()]),
        "is not valid",
    );
}

#[test]
fn full_disk_installs_nothing() {
    let p = Published::new(32, 20);
    let mnt = tempfile::tempdir().unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3M", "tmpfs"])
        .arg(mnt.path())
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mounting a 3 MiB tmpfs failed: this test needs root (mount -t tmpfs)"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.path().to_path_buf());
    let home = mnt.path().join("home");
    let err = pull_fails(
        &home,
        &["pull", "acme/snap:v1", "--hub", &p.url(), "--trust", &p.key],
        "No space left on device",
    );
    assert!(err.contains("cannot"), "{err}");
    assert!(
        !home.join("cache/partial").exists()
            || std::fs::read_dir(home.join("cache/partial"))
                .unwrap()
                .next()
                .is_none(),
        "a full disk keeps no partial download"
    );
}

#[test]
fn unknown_hub_scheme() {
    let c = consumer();
    let err = pull_fails(
        c.path(),
        &["pull", "acme/snap", "--hub", "ftp://user:pw@example/hub"],
        "unsupported hub URL scheme",
    );
    assert!(err.contains("s3://") && !err.contains(":pw@"), "{err}");
}

#[test]
fn unsigned_image_is_refused_without_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    make_snapshot(p, "snap", 8, 21);
    ok(&forkd(p, &["push", "snap", "acme/snap:v1", "--unsigned"]));
    let hub = format!("file://{}/hub", p.display());
    let c = consumer();
    let err = pull_fails(
        c.path(),
        &["pull", "acme/snap:v1", "--hub", &hub],
        "signature check failed",
    );
    assert!(err.contains("not signed"), "{err}");
    let out = ok(&forkd(
        c.path(),
        &["pull", "acme/snap:v1", "--hub", &hub, "--insecure"],
    ));
    assert!(out.contains("NOT VERIFIED"), "{out}");
    assert_eq!(tag_hashes(c.path(), "snap"), tag_hashes(p, "snap"));
}

#[test]
fn image_signed_by_an_untrusted_key_is_refused() {
    let p = Published::new(8, 22);
    let other = tempfile::tempdir().unwrap();
    ok(&forkd(other.path(), &["key", "generate"]));
    let other_key = std::fs::read_to_string(other.path().join("keys/forkd.pub")).unwrap();
    let other_key = other_key.lines().nth(1).unwrap();
    let c = consumer();
    pull_fails(
        c.path(),
        &[
            "pull",
            "acme/snap:v1",
            "--hub",
            &p.url(),
            "--trust",
            other_key,
        ],
        "no trusted public key",
    );
}

#[test]
fn newer_hub_layout_is_refused() {
    let p = Published::new(8, 23);
    std::fs::write(p.root.join("forkd-hub.json"), br#"{"layout": 2}"#).unwrap();
    let c = consumer();
    pull_fails(
        c.path(),
        &["pull", "acme/snap:v1", "--hub", &p.url(), "--trust", &p.key],
        "upgrade forkd",
    );
}

#[test]
fn incompatible_snapshot_is_refused_before_download() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    make_snapshot_with(home, "snap", 8, 24, "pc-i440fx-99.9");
    ok(&forkd(
        home,
        &["push", "snap", "acme/snap:v1", "--unsigned"],
    ));
    let hub = format!("file://{}/hub", home.display());
    let c = consumer();
    let err = pull_fails(
        c.path(),
        &["pull", "acme/snap:v1", "--hub", &hub, "--insecure"],
        "cannot run",
    );
    assert!(err.contains("pc-i440fx-99.9"), "{err}");
    assert!(
        !c.path().join("cache/partial").exists(),
        "downloaded before the check"
    );
    let missing = forkd_env(
        c.path(),
        &["pull", "acme/snap:v1", "--hub", &hub, "--insecure"],
        &[("FORKD_QEMU", "/nonexistent/qemu")],
    );
    fails_with(&missing, "QEMU is not installed");
}

#[test]
fn interrupted_pull_resumes_from_the_cache() {
    let p = Published::new(48, 25);
    let total: u64 = data_blobs(&p.root)
        .iter()
        .map(|b| std::fs::metadata(b).unwrap().len())
        .sum();
    let server = Faulty::start(&p.root, Mode::CutAfter(total / 2));
    let c = consumer();
    let args = [
        "pull",
        "acme/snap:v1",
        "--hub",
        &server.url,
        "--trust",
        &p.key,
        "--jobs",
        "2",
        "--json",
    ];
    pull_fails(c.path(), &args, "cannot download blob");
    let first = server.bytes();
    assert!(
        first >= total / 2,
        "the cut came too early: {first} of {total}"
    );
    server.set_mode(Mode::Normal);
    server
        .blob_bytes
        .store(0, std::sync::atomic::Ordering::SeqCst);
    let out = ok(&forkd(c.path(), &args));
    let second = server.bytes();
    assert!(
        second < total * 3 / 4,
        "resumed pull fetched {second} of {total} bytes again"
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["cached_bytes"].as_u64().unwrap() >= total / 4, "{out}");
    assert_eq!(tag_hashes(c.path(), "snap"), tag_hashes(&p.home, "snap"));
}

#[test]
fn two_concurrent_pulls_download_once() {
    let p = Published::new(48, 26);
    let total: u64 = data_blobs(&p.root)
        .iter()
        .map(|b| std::fs::metadata(b).unwrap().len())
        .sum();
    let server = Faulty::start(&p.root, Mode::Normal);
    let c = tempfile::tempdir().unwrap();
    let spawn = || {
        std::process::Command::new(FORKD)
            .args([
                "pull",
                "acme/snap:v1",
                "--hub",
                &server.url,
                "--trust",
                &p.key,
            ])
            .env("FORKD_HOME", c.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    ok(&a);
    ok(&b);
    assert_eq!(
        server.bytes(),
        total,
        "the image's blobs were downloaded more than once"
    );
    assert_eq!(tag_hashes(c.path(), "snap"), tag_hashes(&p.home, "snap"));
}

#[test]
fn pull_killed_with_sigkill_resumes() {
    let p = Published::new(48, 27);
    let total: u64 = data_blobs(&p.root)
        .iter()
        .map(|b| std::fs::metadata(b).unwrap().len())
        .sum();
    let server = Faulty::start(&p.root, Mode::Slow(150));
    let c = consumer();
    let before = store_state(c.path());
    let mut child = std::process::Command::new(FORKD)
        .args([
            "pull",
            "acme/snap:v1",
            "--hub",
            &server.url,
            "--trust",
            &p.key,
            "--jobs",
            "2",
        ])
        .env("FORKD_HOME", c.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Bytes of the chunks the pull verified and kept in the local chunk store (listed in a
    // segment's index: a chunk is listed there before the journal records it, so the store
    // counts every chunk a resumed pull will not download again).
    let cached = || -> u64 {
        let Ok(rd) = std::fs::read_dir(c.path().join("cache/chunks")) else {
            return 0;
        };
        rd.map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "idx"))
            .flat_map(|p| {
                std::fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    .filter_map(|l| l.split(' ').nth(2)?.parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while cached() < total / 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pull made no progress"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the pull ended before it was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let cached_at_kill = cached();
    assert_eq!(
        store_state(c.path()),
        before,
        "a killed pull changed the store"
    );
    assert!(!c.path().join("images/snap").exists());

    // Let the server finish the responses the killed client had asked for before counting anew.
    std::thread::sleep(std::time::Duration::from_millis(600));
    server.set_mode(Mode::Normal);
    server
        .blob_bytes
        .store(0, std::sync::atomic::Ordering::SeqCst);
    let out = ok(&forkd(
        c.path(),
        &[
            "pull",
            "acme/snap:v1",
            "--hub",
            &server.url,
            "--trust",
            &p.key,
            "--json",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["cached_bytes"].as_u64().unwrap(), cached_at_kill, "{out}");
    assert_eq!(
        v["downloaded_bytes"].as_u64().unwrap(),
        server.bytes(),
        "{out}"
    );
    let second = server.bytes();
    assert!(cached_at_kill > 0);
    assert!(
        second + cached_at_kill <= total,
        "after kill -9: fetched {second} again although {cached_at_kill} of {total} were cached"
    );
    assert_eq!(tag_hashes(c.path(), "snap"), tag_hashes(&p.home, "snap"));
    assert_no_staging(c.path());
}
