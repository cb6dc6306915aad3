//! The product's promise, end to end, with the real binary: a publisher snapshots the tiny
//! parent under QEMU (TCG), pushes it signed to `forkd hub serve` on loopback; a fresh store
//! pulls it (signature + every byte verified) and forks children that each run a command.
//!
//! Needs QEMU, busybox-static, cpio, e2fsprogs and the guest kernel: `bash scripts/setup-engine.sh`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

fn forkd(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_forkd"));
    c.env("FORKD_HOME", home)
        .env_remove("FORKD_HUB")
        .env_remove("FORKD_HUB_TOKEN")
        .env("FORKD_ACCEL", "tcg")
        .arg("--quiet");
    c
}

fn ok(out: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The guest assets CI keeps (scripts/setup-engine.sh fills them): `$FORKD_ASSETS`, else
/// /var/cache/forkd-ci/assets. Passed explicitly: forkd's own default is `$FORKD_HOME/assets`.
fn ci_assets() -> PathBuf {
    std::env::var_os("FORKD_ASSETS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/forkd-ci/assets"))
}

fn tiny_assets() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(repo.join("recipes/tiny/build.sh"))
        .env("FORKD_ASSETS", ci_assets())
        .output()
        .expect("cannot run recipes/tiny/build.sh");
    let dir = ok(
        out,
        "recipes/tiny/build.sh (run scripts/setup-engine.sh: it installs QEMU, busybox-static, cpio, e2fsprogs and fetches the kernel)",
    );
    PathBuf::from(dir.trim())
}

/// `forkd hub serve` on a free loopback port; killed on drop.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(home: &Path, root: &Path, token_file: &Path) -> Server {
    let mut child = forkd(home)
        .args(["hub", "serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(root)
        .arg("--token-file")
        .arg(token_file)
        .stdout(Stdio::piped())
        .spawn()
        .expect("cannot start forkd hub serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("hub serve printed no URL: {line:?}"))
        .to_string();
    Server { child, url }
}

#[test]
fn pull_from_a_hub_then_fork_children_that_answer() {
    let assets = tiny_assets();
    let tmp = tempfile::tempdir().unwrap();
    let publisher = tmp.path().join("publisher");
    let user = tmp.path().join("user");
    let token = tmp.path().join("token");
    std::fs::write(&token, "e2e-secret-token\n").unwrap();

    ok(
        forkd(&publisher)
            .args([
                "build-tiny",
                "--tag",
                "tiny",
                "--mem-mib",
                "192",
                "--assets",
            ])
            .arg(&assets)
            .output()
            .unwrap(),
        "forkd build-tiny",
    );
    ok(
        forkd(&publisher)
            .args(["key", "generate"])
            .output()
            .unwrap(),
        "forkd key generate",
    );
    let server = serve(&publisher, &tmp.path().join("hub"), &token);
    ok(
        forkd(&publisher)
            .args([
                "push",
                "tiny",
                "e2e/tiny:v1",
                "--hub",
                &server.url,
                "--token-file",
            ])
            .arg(&token)
            .output()
            .unwrap(),
        "forkd push",
    );

    // The user's store is empty and has no key of its own: trust the publisher's explicitly.
    let pubkey = publisher.join("keys/forkd.pub");
    ok(
        forkd(&user)
            .args([
                "pull",
                "e2e/tiny:v1",
                "--tag",
                "tiny",
                "--hub",
                &server.url,
                "--trust",
            ])
            .arg(&pubkey)
            .output()
            .unwrap(),
        "forkd pull",
    );
    for name in ["memory.bin", "vmstate"] {
        let a = std::fs::read(publisher.join("images/tiny").join(name)).unwrap();
        let b = std::fs::read(user.join("images/tiny").join(name)).unwrap();
        assert!(a == b, "{name} differs between publisher and puller");
    }

    let out = ok(
        forkd(&user)
            .args(["fork", "--tag", "tiny", "-n", "3", "--json", "--exec"])
            .arg("echo answer-$((6 * 7)) from $(hostname)")
            .output()
            .unwrap(),
        "forkd fork",
    );
    let report: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("fork --json printed no JSON ({e}):\n{out}"));
    let text = report.to_string();
    for c in report["children"].as_array().unwrap() {
        let id = c["id"].as_str().unwrap();
        assert!(
            text.contains(&format!("answer-42 from {id}")),
            "child {id} did not answer with its own hostname:\n{report:#}"
        );
    }
    // Nothing stays running after a fork without --keep.
    let ps = ok(
        forkd(&user).args(["ps", "--json"]).output().unwrap(),
        "forkd ps",
    );
    let kept: serde_json::Value = serde_json::from_str(&ps).unwrap();
    assert_eq!(
        kept.as_array().map(Vec::len),
        Some(0),
        "children left running: {ps}"
    );
}
