//! The engine through the `forkd` binary, with real QEMU under TCG: build-tiny, fork, keep,
//! ps / exec / kill, doctor, and the CLI's errors.

mod cli_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn home() -> &'static Path {
    static H: OnceLock<tempfile::TempDir> = OnceLock::new();
    H.get_or_init(|| {
        let d = tempfile::Builder::new()
            .prefix("fkc")
            .tempdir_in("/tmp")
            .unwrap();
        cli_common::remove_at_exit(d.path());
        d
    })
    .path()
}

/// The guest assets CI keeps (scripts/setup-engine.sh fills them): `$FORKD_ASSETS`, else
/// /var/cache/forkd-ci/assets. Passed explicitly: forkd's own default is `$FORKD_HOME/assets`.
fn ci_assets() -> PathBuf {
    std::env::var_os("FORKD_ASSETS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/forkd-ci/assets"))
}

fn forkd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(args)
        .env("FORKD_HOME", home())
        .env("FORKD_ASSETS", ci_assets())
        .env("FORKD_ACCEL", "tcg")
        .output()
        .expect("running forkd")
}

fn ok(args: &[&str]) -> String {
    let o = forkd(args);
    assert!(
        o.status.success(),
        "forkd {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Build the tiny recipe's assets and snapshot them once for this test binary.
fn tiny() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        assert!(
            which("qemu-system-x86_64"),
            "these tests need QEMU: apt-get install qemu-system-x86 (or run scripts/setup-engine.sh)"
        );
        let out = Command::new(repo().join("recipes/tiny/build.sh"))
            .env("FORKD_ASSETS", ci_assets())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "recipes/tiny/build.sh failed (run scripts/setup-engine.sh):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let assets = String::from_utf8_lossy(&out.stdout).trim().to_string();
        ok(&["-q", "build-tiny", "--assets", &assets, "--mem-mib", "192"]);
    });
}

fn which(name: &str) -> bool {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .any(|d| Path::new(d).join(name).is_file())
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn fork_runs_the_command_in_every_child() {
    tiny();
    let r = json(&ok(&[
        "fork",
        "--tag",
        "tiny",
        "-n",
        "3",
        "--exec",
        "hostname; cat /run/forkd-warm",
        "--json",
    ]));
    assert_eq!(r["alive"], 3, "{r:#}");
    for c in r["children"].as_array().unwrap() {
        assert_eq!(c["exec"]["exit_code"], 0);
        assert_eq!(
            c["exec"]["stdout"].as_str().unwrap(),
            format!("{}\nwarm\n", c["id"].as_str().unwrap())
        );
    }
    let human = ok(&[
        "fork",
        "--tag",
        "tiny",
        "-n",
        "2",
        "--run",
        "echo $WARM_SINCE | wc -w",
    ]);
    assert!(human.contains("2/2 children alive"), "{human}");
    assert!(
        human.contains("run: 2"),
        "warm worker state from the parent: {human}"
    );
}

#[test]
fn kept_children_are_listed_reached_and_killed() {
    tiny();
    let out = ok(&["fork", "--tag", "tiny", "-n", "2", "--keep"]);
    assert!(out.contains("kept 2"), "{out}");
    let ps = json(&ok(&["ps", "--json"]));
    let kept: Vec<&serde_json::Value> = ps
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["tag"] == "tiny")
        .collect();
    assert_eq!(kept.len(), 2, "{ps:#}");
    for c in &kept {
        assert_eq!(c["running"], true);
        let id = c["id"].as_str().unwrap();
        let host = ok(&["exec", id, "--", "hostname"]);
        assert_eq!(host.trim(), c["hostname"].as_str().unwrap());
    }
    // A failing command's exit code comes back as forkd's.
    let id = kept[0]["id"].as_str().unwrap().to_string();
    let o = forkd(&["exec", &id, "--", "sh", "-c", "exit 7"]);
    assert_eq!(o.status.code(), Some(7));
    // The agent is PID 1: exec does not wait for a background process holding its output,
    // and orphans that exit are reaped (no zombies pile up in a kept child).
    let t = std::time::Instant::now();
    let out = ok(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "sleep 30 & sleep 0.2 & echo hi",
    ]);
    assert_eq!(out.trim(), "hi");
    assert!(t.elapsed().as_secs() < 20, "exec waited for `sleep 30 &`");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let z = ok(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "s=$(grep -h '^State:' /proc/[0-9]*/status); \
         echo \"$s\" | grep -c sleeping; echo \"$s\" | grep -c zombie; true",
    ]);
    let counts: Vec<&str> = z.split_whitespace().collect();
    assert!(
        counts.len() == 2 && counts[0] != "0",
        "process scan failed: {z}"
    );
    assert_eq!(counts[1], "0", "zombies in the kept child");
    // A command over `exec --timeout` is killed and reported as timed out; the child stays usable.
    let t = std::time::Instant::now();
    let o = forkd(&["exec", "--timeout", "1", &id, "--", "sleep", "10"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("timed out after 1 s"),
        "{err}"
    );
    assert!(
        t.elapsed().as_secs() < 8,
        "not killed at 1 s: {:?}",
        t.elapsed()
    );
    assert_eq!(ok(&["exec", &id, "--", "echo", "after"]).trim(), "after");
    let pids: Vec<u64> = kept.iter().map(|c| c["pid"].as_u64().unwrap()).collect();
    ok(&["kill", "--all"]);
    let ps = json(&ok(&["ps", "--json"]));
    assert!(ps.as_array().unwrap().is_empty(), "{ps:#}");
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}/cmdline")).exists() || {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                !String::from_utf8_lossy(&cmd).contains("qemu")
            },
            "QEMU {pid} still running"
        );
    }
    let o = forkd(&["exec", &id, "--", "true"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no running child"));
}

#[test]
fn a_command_over_the_exec_timeout_times_out_in_every_child() {
    tiny();
    let t = std::time::Instant::now();
    let o = forkd(&[
        "fork",
        "--tag",
        "tiny",
        "-n",
        "2",
        "--exec",
        "sleep 5; echo late",
        "--exec-timeout",
        "1",
        "--json",
    ]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    // Timed-out children are a failed fork (exit 3), and not `ok`.
    assert_eq!(
        o.status.code(),
        Some(3),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r = json(&text);
    assert_eq!(r["alive"], 2, "{r:#}");
    assert_eq!(r["succeeded"], 0, "{r:#}");
    let children = r["children"].as_array().unwrap();
    assert_eq!(children.len(), 2);
    for c in children {
        assert_eq!(c["timed_out"], true, "{c:#}");
        assert_eq!(c["ok"], false, "{c:#}");
        assert_eq!(c["exec"]["timed_out"], true, "{c:#}");
        assert!(c["exec"]["exit_code"].is_null(), "{c:#}");
        assert!(c["exec"]["duration_ms"].as_u64().unwrap() < 4_000, "{c:#}");
        assert!(!c["exec"]["stdout"].as_str().unwrap().contains("late"));
        // Cleaned up: no run directory and no QEMU left for this child.
        let id = c["id"].as_str().unwrap();
        assert!(!home().join("run").join(id).exists(), "{id} left behind");
        for p in std::fs::read_dir("/proc").unwrap().flatten() {
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&cmd).contains(id),
                "{id} still running"
            );
        }
    }
    assert!(t.elapsed().as_secs() < 60, "{:?}", t.elapsed());
    // The table says so too.
    let o = forkd(&[
        "fork",
        "--tag",
        "tiny",
        "-n",
        "1",
        "--exec",
        "sleep 5",
        "--exec-timeout",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(3));
    let human = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        human.contains("TIMEOUT") && human.contains("exit timed-out"),
        "{human}"
    );
    assert!(human.contains("1/1 children alive") && human.contains("1 timed out"));
}

#[test]
fn missing_qemu_is_an_error_that_names_the_package() {
    tiny();
    let o = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(["fork", "--tag", "tiny", "-n", "1"])
        .env("FORKD_HOME", home())
        .env("FORKD_QEMU", "/nonexistent/qemu-system-x86_64")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("apt-get install qemu-system-x86"), "{err}");
}

#[test]
fn unknown_tag_and_too_many_children_are_refused() {
    tiny();
    let o = forkd(&["fork", "--tag", "nope", "-n", "1"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no image nope in the local store"));
    let o = forkd(&["fork", "--tag", "tiny", "-n", "500000"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("MemAvailable") && err.contains("at most"),
        "{err}"
    );
}

#[test]
fn doctor_reports_qemu_and_the_accelerator() {
    let o = forkd(&["doctor", "--json"]);
    let checks = json(&String::from_utf8_lossy(&o.stdout));
    let qemu = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "qemu")
        .unwrap();
    assert_eq!(qemu["ok"], true, "{checks:#}");
    assert!(
        qemu["detail"]
            .as_str()
            .unwrap()
            .contains("qemu-system-x86_64")
    );
    assert!(
        checks
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "accelerator")
    );
}
