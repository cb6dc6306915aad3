//! The store commands as a user runs them: images, inspect, rmi, pack/unpack errors, locking.

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use forkd_store::{EngineInfo, FileEntry, Manifest, Overwrite, Store, Tag};
use sha2::{Digest, Sha256};

fn forkd(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_forkd"))
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Install `tag` with a 64 MiB sparse memory.bin holding 1 MiB of data.
fn install(home: &Path, tag: &str) {
    let store = Store::open(home).unwrap();
    let st = store.stage().unwrap();
    let f = fs::File::create(st.dir().join("memory.bin")).unwrap();
    f.set_len(64 << 20).unwrap();
    let data = vec![7u8; 1 << 20];
    std::os::unix::fs::FileExt::write_all_at(&f, &data, 8 << 20).unwrap();
    fs::write(st.dir().join("vmstate"), b"state").unwrap();
    let mut m = Manifest::new(
        tag,
        "2.1",
        64,
        EngineInfo {
            name: "qemu".into(),
            version: "7.2.0".into(),
            machine_type: "pc-i440fx-7.2".into(),
            cpu_model: "qemu64".into(),
            accel_hint: None,
        },
    );
    let mut full = vec![0u8; 64 << 20];
    full[8 << 20..9 << 20].copy_from_slice(&data);
    for (n, d) in [("memory.bin", &full[..]), ("vmstate", &b"state"[..])] {
        m.files.insert(
            n.into(),
            FileEntry {
                size: d.len() as u64,
                sha256: hex::encode(Sha256::digest(d)),
                role: None,
            },
        );
    }
    st.commit(&Tag::parse(tag).unwrap(), &m, Overwrite::No)
        .unwrap();
}

#[test]
fn images_list_shows_apparent_and_on_disk_size() {
    let home = tempfile::tempdir().unwrap();
    install(home.path(), "demo");
    let (out, _) = text(&forkd(home.path(), &["images"]));
    assert!(
        out.contains("APPARENT SIZE") && out.contains("ON-DISK SIZE"),
        "{out}"
    );
    assert!(
        out.contains("demo") && out.contains("demo:2.1") && out.contains("64.0 MiB"),
        "{out}"
    );
    let (out, _) = text(&forkd(home.path(), &["images", "list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let img = &v[0];
    assert_eq!(img["tag"], "demo");
    let apparent = img["apparent_size"].as_u64().unwrap();
    let disk = img["disk_size"].as_u64().unwrap();
    assert!(apparent > 64 << 20, "{apparent}");
    assert!(disk < 4 << 20, "on-disk size {disk} should reflect holes");
}

#[test]
fn inspect_rmi_and_missing_tags() {
    let home = tempfile::tempdir().unwrap();
    install(home.path(), "demo");
    let o = forkd(home.path(), &["inspect", "demo"]);
    let (out, _) = text(&o);
    assert!(
        out.contains("format_version = 1") && out.contains("[files.\"memory.bin\"]"),
        "{out}"
    );
    let (out, _) = text(&forkd(home.path(), &["inspect", "demo", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["engine"]["machine_type"], "pc-i440fx-7.2");

    let o = forkd(home.path(), &["rmi", "demo"]);
    assert!(o.status.success());
    let o = forkd(home.path(), &["rmi", "demo"]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("no image tagged `demo`"), "{err}");
    let o = forkd(home.path(), &["pack", "demo"]);
    let (_, err) = text(&o);
    assert!(
        err.contains("no image tagged `demo`") && err.contains("hint:"),
        "{err}"
    );
}

#[test]
fn unsafe_tag_on_the_command_line_is_refused() {
    let home = tempfile::tempdir().unwrap();
    install(home.path(), "demo");
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("d.forkd-snapshot.tar.zst");
    assert!(
        forkd(home.path(), &["pack", "demo", "-o", file.to_str().unwrap()])
            .status
            .success()
    );
    let before = tree(home.path());
    for bad in ["../evil", "/abs", "a/b", "..", ".x", "Caps"] {
        let o = forkd(
            home.path(),
            &["unpack", file.to_str().unwrap(), "--tag", bad],
        );
        let (_, err) = text(&o);
        assert!(!o.status.success());
        assert!(
            err.contains("invalid tag") && err.contains("1 to 128 characters"),
            "{bad}: {err}"
        );
        assert_eq!(tree(home.path()), before);
    }
    // Same tag without --force: refused, naming --force; with --force: replaced.
    let o = forkd(home.path(), &["unpack", file.to_str().unwrap()]);
    assert!(text(&o).1.contains("--force"));
    assert_eq!(tree(home.path()), before);
    assert!(
        forkd(home.path(), &["unpack", file.to_str().unwrap(), "--force"])
            .status
            .success()
    );
    assert!(
        forkd(
            home.path(),
            &["unpack", file.to_str().unwrap(), "--tag", "copy"]
        )
        .status
        .success()
    );
}

#[test]
fn waiting_for_the_store_lock_is_announced() {
    let home = tempfile::tempdir().unwrap();
    install(home.path(), "demo");
    let lock = fs::File::create(home.path().join("locks/store.lock")).unwrap();
    lock.lock().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .arg("--home")
        .arg(home.path())
        .args(["rmi", "demo"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert!(
        child.try_wait().unwrap().is_none(),
        "rmi did not wait for the lock"
    );
    lock.unlock().unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("waiting for lock on") && err.contains("held by another forkd process"),
        "{err}"
    );
    assert!(Store::open(home.path()).unwrap().list().unwrap().is_empty());
}

fn tree(root: &Path) -> Vec<(String, u64, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if p.is_dir() {
                out.push((rel, 0, "dir".into()));
                stack.push(p);
            } else {
                let d = fs::read(&p).unwrap();
                out.push((rel, d.len() as u64, hex::encode(Sha256::digest(&d))));
            }
        }
    }
    out.sort();
    out
}

/// kill -9 at many moments during `forkd unpack`: the tag is either absent or complete, and
/// the next open sweeps what the killed process left in tmp/.
#[test]
fn kill_during_unpack_never_leaves_a_half_tag() {
    let src = tempfile::tempdir().unwrap();
    {
        let store = Store::open(src.path()).unwrap();
        let st = store.stage().unwrap();
        let mut data = vec![0u8; 96 << 20];
        let mut x = 0x1234_5678_9abc_def0u64;
        for c in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        fs::write(st.dir().join("memory.bin"), &data).unwrap();
        let mut m = Manifest::new(
            "big",
            "1",
            96,
            EngineInfo {
                name: "qemu".into(),
                version: "7.2.0".into(),
                machine_type: "pc-i440fx-7.2".into(),
                cpu_model: "qemu64".into(),
                accel_hint: None,
            },
        );
        m.files.insert(
            "memory.bin".into(),
            FileEntry {
                size: data.len() as u64,
                sha256: hex::encode(Sha256::digest(&data)),
                role: None,
            },
        );
        st.commit(&Tag::parse("big").unwrap(), &m, Overwrite::No)
            .unwrap();
    }
    let file = src.path().join("big.forkd-snapshot.tar.zst");
    assert!(
        forkd(
            src.path(),
            &["pack", "big", "-o", file.to_str().unwrap(), "--level", "1"]
        )
        .status
        .success()
    );
    let mut saw_partial_work = false;
    for delay_ms in [0u64, 5, 20, 50, 100, 200, 400, 800] {
        let home = tempfile::tempdir().unwrap();
        Store::open(home.path()).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_forkd"))
            .arg("--home")
            .arg(home.path())
            .args(["unpack", file.to_str().unwrap()])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let images: Vec<_> = fs::read_dir(home.path().join("images")).unwrap().collect();
        if fs::read_dir(home.path().join("tmp")).unwrap().count() > 0 {
            saw_partial_work = true;
        }
        let store = Store::open(home.path()).unwrap();
        // A kill between a lock file's creation and its rename into place leaves an empty
        // `.new-*` file; the sweeper leaves those for 60 s (the owner may still be alive).
        let left: Vec<String> = fs::read_dir(home.path().join("tmp"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(".new-"))
            .collect();
        assert!(left.is_empty(), "stale staging not swept: {left:?}");
        match images.len() {
            0 => assert!(store.list().unwrap().is_empty()),
            1 => {
                let snap = store.get(&Tag::parse("big").unwrap()).unwrap();
                let data = fs::read(snap.path("memory.bin")).unwrap();
                assert_eq!(
                    hex::encode(Sha256::digest(&data)),
                    snap.manifest.files["memory.bin"].sha256,
                    "a visible tag is incomplete (killed after {delay_ms} ms)"
                );
            }
            n => panic!("{n} entries in images/"),
        }
    }
    assert!(
        saw_partial_work,
        "no kill landed mid-unpack; the test proves nothing"
    );
}
