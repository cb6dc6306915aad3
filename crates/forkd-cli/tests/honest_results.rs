//! Results that do not lie (issue 9, "Results lie"), with real tiny guests under TCG.
//!
//! Grouped by attacker:
//! - a hostile (or just failing) guest: its exit code, its timeouts and a full disk are
//!   reported as what they are, and fork's exit code says so;
//! - a hostile guest or hub writing to the user's terminal: control characters are escaped;
//! - two users (or scripts) forking at once: every child has its own name.

mod cli_common;

use cli_common::*;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

// ---- a failing guest: exit codes and `ok` ------------------------------------------------

#[test]
fn a_command_that_exits_non_zero_fails_the_fork_with_exit_code_3() {
    tiny();
    let o = forkd(&[
        "fork", "--tag", "tiny", "-n", "2", "--exec", "exit 3", "--json",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let r = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(r["alive"], 2, "{r:#}");
    assert_eq!(r["succeeded"], 0, "{r:#}");
    for c in r["children"].as_array().unwrap() {
        assert_eq!(c["up"], true, "{c:#}");
        assert_eq!(c["ok"], false, "{c:#}");
        assert_eq!(c["exec"]["exit_code"], 3, "{c:#}");
    }
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("2 exited non-zero"), "{err}");

    // The table says which, and a command that succeeds is still exit 0.
    let o = forkd(&["fork", "--tag", "tiny", "-n", "1", "--exec", "exit 7"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("EXIT") && out.contains("exit 7"), "{out}");
    let o = forkd(&["fork", "--tag", "tiny", "-n", "1", "--exec", "true"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn a_timed_out_child_is_not_ok_and_fails_the_fork() {
    tiny();
    let o = forkd(&[
        "fork",
        "--tag",
        "tiny",
        "-n",
        "1",
        "--exec",
        "sleep 30",
        "--exec-timeout",
        "1",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let r = json(&String::from_utf8_lossy(&o.stdout));
    let c = &r["children"][0];
    assert_eq!(c["timed_out"], true, "{c:#}");
    assert_eq!(c["ok"], false, "a timed-out child was reported ok: {c:#}");
}

#[test]
fn the_exit_codes_are_documented_in_help() {
    let o = forkd(&["--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("Exit codes:"), "{help}");
    for line in ["0    success", "2    usage", "3    fork:", "124  exec:"] {
        assert!(help.contains(line), "missing {line:?} in:\n{help}");
    }
    // A usage error really is 2, and an error 1.
    assert_eq!(forkd(&["fork", "--no-such-flag"]).status.code(), Some(2));
    let o = forkd(&["fork", "--tag", "no-such-image"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
}

// ---- a hostile guest or hub writing to the terminal ----------------------------------------

/// What a child prints to take over the terminal: clear the screen, home the cursor, a fake
/// success line, and a carriage return to overwrite what follows.
const TAKEOVER: &str = r"printf '\033[2J\033[Hall ok\r\233fake\n'; printf '\033]0;title\007' >&2";

#[test]
fn guest_output_in_the_fork_table_is_escaped() {
    tiny();
    let o = forkd(&["fork", "--tag", "tiny", "-n", "1", "--exec", TAKEOVER]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let raw = o.stdout.clone();
    assert!(
        !raw.iter().any(|&b| b == 0x1b || b == b'\r' || b == 0x07),
        "raw control bytes reached stdout: {:?}",
        String::from_utf8_lossy(&raw)
    );
    let out = String::from_utf8_lossy(&raw);
    assert!(out.contains(r"\x1b[2J\x1b[Hall ok\r"), "{out}");
    assert!(out.contains(r"\x1b]0;title\x07"), "stderr cell: {out}");
    // --json keeps the exact bytes (JSON-escaped).
    let o = forkd(&[
        "fork", "--tag", "tiny", "-n", "1", "--exec", TAKEOVER, "--json",
    ]);
    let r = json(&String::from_utf8_lossy(&o.stdout));
    assert!(
        r["children"][0]["exec"]["stdout"]
            .as_str()
            .unwrap()
            .starts_with("\x1b[2J\x1b[Hall ok\r"),
        "{r:#}"
    );
}

/// A pseudo-terminal: (the side we read, the side forkd writes to).
fn pty() -> (std::fs::File, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds into the two ints we pass; name, termios and winsize
    // may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just opened by openpty and are owned by nobody else.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            OwnedFd::from_raw_fd(slave),
        )
    }
}

/// Run forkd with stdout and stderr on a terminal; returns its exit code and what the
/// terminal received.
fn on_a_terminal(args: &[&str]) -> (Option<i32>, Vec<u8>) {
    let (mut master, slave) = pty();
    let mut child = cmd_in(home())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    // Read until the child is gone and the terminal drained (EIO once no writer is left).
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        out
    });
    let status = child.wait().unwrap();
    (status.code(), reader.join().unwrap())
}

#[test]
fn exec_output_is_escaped_on_a_terminal_and_raw_in_a_pipe() {
    tiny();
    let r = json(&ok(&[
        "fork", "--tag", "tiny", "-n", "1", "--keep", "--json",
    ]));
    let id = r["kept"][0].as_str().unwrap().to_string();
    let (code, seen) = on_a_terminal(&["exec", &id, "--sh", TAKEOVER]);
    let seen_text = String::from_utf8_lossy(&seen).into_owned();
    // Piped to a file, the bytes are the guest's own.
    let piped = forkd(&["exec", &id, "--sh", TAKEOVER]);
    let raw = forkd(&["exec", &id, "--raw", "--sh", "printf '\\033[0m'"]);
    kill_all_in(home());
    assert_eq!(code, Some(0), "{seen_text}");
    assert!(
        !seen.iter().any(|&b| b == 0x1b || b == 0x07),
        "raw control bytes reached the terminal: {seen_text:?}"
    );
    assert!(
        seen_text.contains(r"\x1b[2J\x1b[Hall ok\r"),
        "{seen_text:?}"
    );
    assert!(seen_text.contains(r"\x1b]0;title\x07"), "{seen_text:?}");
    assert!(
        piped.stdout.starts_with(b"\x1b[2J\x1b[Hall ok\r"),
        "{}",
        text(&piped)
    );
    assert_eq!(raw.stdout, b"\x1b[0m", "{}", text(&raw));
}

#[test]
fn catalogue_text_from_a_hub_is_escaped() {
    let home = new_home();
    let hub = home.path().join("evil-hub");
    std::fs::create_dir_all(&hub).unwrap();
    std::fs::write(hub.join("forkd-hub.json"), r#"{"layout":1}"#).unwrap();
    let catalog = serde_json::json!({
        "layout": 1,
        "images": [{
            "name": "acme/tiny",
            "description": "\u{1b}[2J\u{1b}[Hall ok\r",
            "versions": [{
                "version": "1",
                "digest": format!("sha256:{}", "a".repeat(64)),
                "size": 1,
                "created_at": "2026-01-01T00:00:00Z\u{1b}[31m",
            }],
        }],
    });
    std::fs::write(hub.join("catalog.json"), catalog.to_string()).unwrap();
    let url = format!("file://{}", hub.display());
    let o = forkd_in(home.path(), &["search", "--hub", &url]);
    let all = [o.stdout.as_slice(), o.stderr.as_slice()].concat();
    assert!(
        !all.iter().any(|&b| b == 0x1b || b == b'\r'),
        "raw control bytes from the catalogue reached the terminal: {}",
        text(&o)
    );
    if o.status.success() {
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains(r"\x1b[2J\x1b[Hall ok\r"), "{out}");
    }
}

// ---- two forks at once ---------------------------------------------------------------------

#[test]
fn concurrent_forks_name_their_children_apart() {
    tiny();
    let spawn = || {
        cmd_in(home())
            .args([
                "fork", "--tag", "tiny", "-n", "2", "--json", "--exec", "hostname",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let mut ids = std::collections::HashSet::new();
    let mut hosts = std::collections::HashSet::new();
    for c in [a, b] {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let r = json(&String::from_utf8_lossy(&o.stdout));
        for c in r["children"].as_array().unwrap() {
            let id = c["id"].as_str().unwrap().to_string();
            let host = c["exec"]["stdout"].as_str().unwrap().trim().to_string();
            assert_eq!(host, id, "a child's hostname is its id: {c:#}");
            assert_eq!(c["hostname"], id.as_str());
            ids.insert(id);
            hosts.insert(host);
        }
    }
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(hosts.len(), 4, "two children got the same name: {hosts:?}");
}

// ---- the host's disk fills up under a child ------------------------------------------------

/// A small tmpfs mounted over a store's run/ directory (where each child's disk overlay
/// lives), unmounted on drop.
struct SmallRunDir(std::path::PathBuf);

impl SmallRunDir {
    fn mount(home: &std::path::Path, size: &str) -> Option<SmallRunDir> {
        let run = home.join("run");
        std::fs::create_dir_all(&run).unwrap();
        let o = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("forkd-test-full")
            .arg(&run)
            .output()
            .unwrap();
        if !o.status.success() {
            eprintln!(
                "skipping: cannot mount a tmpfs (needs root): {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return None;
        }
        Some(SmallRunDir(run))
    }
}

impl Drop for SmallRunDir {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_host_disk_is_reported_as_disk_full() {
    // A store of its own: run/ is a 16 MiB tmpfs, and the child writes 40 MiB of random data
    // to its root disk, which lands in its qcow2 overlay in run/.
    let home = new_home();
    build_tiny_in(home.path());
    let Some(_run) = SmallRunDir::mount(home.path(), "16m") else {
        return;
    };
    let t = Instant::now();
    let o = forkd_in(
        home.path(),
        &[
            "fork",
            "--tag",
            "tiny",
            "-n",
            "1",
            "--exec",
            "dd if=/dev/urandom of=/fill bs=1M count=40 2>/dev/null; sync; echo wrote",
            "--exec-timeout",
            "100",
            "--json",
        ],
    );
    let took = t.elapsed();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let r = json(&String::from_utf8_lossy(&o.stdout));
    let c = &r["children"][0];
    let err = c["error"].as_str().unwrap_or("");
    assert!(
        err.contains("disk full"),
        "not reported as disk full: {c:#}"
    );
    assert!(!err.contains("timed out"), "{c:#}");
    assert_eq!(c["ok"], false);
    // Reported when it happened, not after the 100 s work timeout.
    assert!(took < Duration::from_secs(60), "took {took:?}");
    // And nothing is left in run/ but what the store keeps there.
    let left: Vec<_> = std::fs::read_dir(home.path().join("run"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("tiny-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
