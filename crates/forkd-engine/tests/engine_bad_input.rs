//! Bad input, each its own test: every one gets a clear error and leaves the snapshot as it was.

mod common;
use common::*;
use forkd_engine::EngineError;
use forkd_engine::qemu::Qemu;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn fork_err(dir: &Path, n: usize) -> EngineError {
    let run = dir.join("run");
    match forkd_engine::fork::fork(dir, &qemu(), &fork_options(n, Some("true"), &run)) {
        Ok(r) => panic!("fork should have been refused, got {r:#?}"),
        Err(e) => e,
    }
}

/// A fake `qemu-system-x86_64`: a script that prints `version` and, for `-machine help`, a
/// machine list without the snapshot's machine type.
fn fake_qemu(name: &str, version: &str) -> PathBuf {
    let dir = scratch().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("qemu-system-x86_64");
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'QEMU emulator version {version}'; exit 0; fi\n\
             if [ \"$1\" = -machine ]; then echo 'Supported machines are:'; echo 'pc-i440fx-2.0  old'; exit 0; fi\n\
             exit 1\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn missing_snapshot_file_is_named() {
    let dir = copy_snapshot(&tiny_snapshot(), "missing");
    std::fs::remove_file(dir.join("vmstate")).unwrap();
    let e = fork_err(&dir, 1);
    assert!(
        matches!(e, EngineError::MissingFile(ref p) if p.ends_with("vmstate")),
        "{e}"
    );
    assert!(
        e.to_string().contains("vmstate") && e.to_string().contains("missing"),
        "{e}"
    );
}

#[test]
fn missing_engine_description_is_named() {
    let dir = copy_snapshot(&tiny_snapshot(), "missing-spec");
    std::fs::remove_file(dir.join("engine.json")).unwrap();
    let e = fork_err(&dir, 1);
    assert!(
        e.to_string().contains("engine.json") && e.to_string().contains("missing"),
        "{e}"
    );
}

#[test]
fn corrupt_engine_description_is_refused() {
    let dir = copy_snapshot(&tiny_snapshot(), "corrupt-spec");
    std::fs::write(dir.join("engine.json"), "{\"format\": 1, \"layout\": ").unwrap();
    let e = fork_err(&dir, 1);
    assert!(matches!(e, EngineError::Corrupt(_)), "{e}");
    assert!(
        e.to_string().contains("corrupt") && e.to_string().contains("engine.json"),
        "{e}"
    );
}

#[test]
fn corrupt_vmstate_header_is_refused_before_any_vm_starts() {
    let dir = copy_snapshot(&tiny_snapshot(), "corrupt-head");
    let p = dir.join("vmstate");
    let mut data = std::fs::read(&p).unwrap();
    data[..4].copy_from_slice(b"JUNK");
    std::fs::write(&p, &data).unwrap();
    let e = fork_err(&dir, 1);
    assert!(e.to_string().contains("not a QEMU migration stream"), "{e}");
}

#[test]
fn corrupt_vmstate_body_fails_every_child_with_qemus_reason() {
    let dir = copy_snapshot(&tiny_snapshot(), "corrupt-body");
    let p = dir.join("vmstate");
    let mut data = std::fs::read(&p).unwrap();
    // Keep the stream header, scramble the sections after it.
    for (i, b) in data.iter_mut().enumerate().skip(8) {
        *b ^= (i as u8).wrapping_mul(31) | 1;
    }
    std::fs::write(&p, &data).unwrap();
    let run = dir.join("run");
    let r = forkd_engine::fork::fork(&dir, &qemu(), &fork_options(2, Some("true"), &run))
        .expect("preflight passes; the children fail");
    assert_eq!(r.alive, 0, "{r:#?}");
    for c in &r.children {
        let err = c.error.as_deref().unwrap_or("");
        assert!(
            err.contains("QEMU") || err.contains("migration"),
            "child {}: {err}",
            c.index
        );
    }
    let left: Vec<_> = std::fs::read_dir(&run)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "failed children were not cleaned up: {left:?}"
    );
}

#[test]
fn memory_file_smaller_than_ram_is_refused_and_left_alone() {
    let dir = copy_snapshot(&tiny_snapshot(), "short-mem");
    let p = dir.join("memory.bin");
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(64 * 1024 * 1024).unwrap();
    drop(f);
    let before = sha256(&p);
    let e = fork_err(&dir, 1);
    assert!(matches!(e, EngineError::MemorySize { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("67108864") && msg.contains("192 MiB"), "{msg}");
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        64 * 1024 * 1024,
        "memory.bin was resized"
    );
    assert_eq!(sha256(&p), before);
}

#[test]
fn qemu_missing_names_the_package() {
    let e = Qemu::locate(Some(Path::new("/nonexistent/qemu-system-x86_64"))).unwrap_err();
    assert!(matches!(e, EngineError::QemuMissing(_)), "{e}");
    assert!(
        e.to_string().contains("apt-get install qemu-system-x86"),
        "{e}"
    );
}

#[test]
fn qemu_too_old_is_refused() {
    let fake = fake_qemu("old-qemu", "5.2.0 (Debian 1:5.2+dfsg-11)");
    let e = Qemu::locate(Some(&fake)).unwrap_err();
    assert!(matches!(e, EngineError::QemuTooOld { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("5.2.0") && msg.contains("7.2.0"), "{msg}");
}

#[test]
fn qemu_without_the_snapshots_machine_type_is_refused() {
    let fake = fake_qemu("odd-qemu", "9.9.0");
    let q = Qemu::locate(Some(&fake)).expect("new enough");
    let dir = tiny_snapshot();
    let e = forkd_engine::fork::fork(&dir, &q, &fork_options(1, None, &scratch().join("run-odd")))
        .unwrap_err();
    assert!(matches!(e, EngineError::MachineMismatch { .. }), "{e}");
    assert!(e.to_string().contains("pc-i440fx-7.2"), "{e}");
}

#[test]
fn too_many_children_are_refused_up_front_with_the_estimate() {
    let dir = tiny_snapshot();
    let run = scratch().join("run-too-many");
    let e =
        forkd_engine::fork::fork(&dir, &qemu(), &fork_options(1_000_000, None, &run)).unwrap_err();
    assert!(matches!(e, EngineError::Capacity(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("MiB each") && msg.contains("MemAvailable") && msg.contains("at most"),
        "{msg}"
    );
    assert!(
        !run.exists() || std::fs::read_dir(&run).unwrap().next().is_none(),
        "nothing started"
    );
}

#[test]
fn snapshot_from_a_newer_qemu_is_refused() {
    let dir = copy_snapshot(&tiny_snapshot(), "newer-qemu");
    let p = dir.join("engine.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    spec["qemu_version"] = "99.1.0".into();
    std::fs::write(&p, spec.to_string()).unwrap();
    let e = fork_err(&dir, 1);
    assert!(
        matches!(e, EngineError::QemuOlderThanSnapshot { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("99.1.0"), "{e}");
}
