//! Attacker: a hostile guest (and the QEMU it may have compromised). Through the `forkd`
//! binary with real QEMU children under TCG: what a child's QEMU can reach and use.
//!
//! - its replies are read with a cap (a line with no newline does not grow forkd);
//! - it runs in its own cgroup (memory, pids, CPU), which goes with it;
//! - it runs under QEMU's seccomp sandbox and, when forkd is root, as an unprivileged user;
//! - it cannot write the snapshot's memory.bin or rootfs.

mod cli_common;
use cli_common::{build_tiny_mem_in, cmd_in, home, json, text};

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// Guest RAM of the test image (small: children are many and TCG is slow).
const MEM_MIB: u64 = 128;

/// `forkd ARGS` in this binary's store, with confinement as the host decides (never turned
/// off from the environment).
fn cmd(args: &[&str]) -> Command {
    let mut c = cmd_in(home());
    c.args(args)
        .env_remove("FORKD_CONFINE")
        .env_remove("FORKD_CGROUPS");
    c
}

fn forkd(args: &[&str]) -> Output {
    cmd(args).output().expect("running forkd")
}

fn ok(args: &[&str]) -> String {
    let o = forkd(args);
    assert!(o.status.success(), "forkd {args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The tiny snapshot, once for this test binary.
fn tiny() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| build_tiny_mem_in(home(), MEM_MIB));
}

/// Fork one kept child; returns its `ps --json` entry.
fn keep_one() -> serde_json::Value {
    let r = json(&ok(&[
        "fork", "--tag", "tiny", "-n", "1", "--keep", "--json",
    ]));
    let id = r["kept"][0].as_str().expect("one kept child").to_string();
    let ps = json(&ok(&["ps", "--json"]));
    ps.as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{id} not in ps: {ps:#}"))
}

fn pid_of(c: &serde_json::Value) -> u32 {
    c["pid"].as_u64().unwrap() as u32
}

/// This process's group in the v1 `controller` hierarchy, or the v2 one.
fn cgroup_base(controller: &str) -> PathBuf {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").is_file();
    let line = text
        .lines()
        .find(|l| {
            let ctrls = l.split(':').nth(1).unwrap_or("");
            if v2 {
                ctrls.is_empty()
            } else {
                ctrls.split(',').any(|c| c == controller)
            }
        })
        .unwrap();
    let rel = line.splitn(3, ':').nth(2).unwrap().trim_start_matches('/');
    let mount = if v2 {
        PathBuf::from("/sys/fs/cgroup")
    } else {
        Path::new("/sys/fs/cgroup").join(controller)
    };
    mount.join(rel)
}

fn v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").is_file()
}

/// The group directory of `pid` for `controller` (v1) or its v2 group.
fn group_of(pid: u32, controller: &str) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let line = text
        .lines()
        .find(|l| {
            let ctrls = l.split(':').nth(1).unwrap_or("");
            if v2() {
                ctrls.is_empty()
            } else {
                ctrls.split(',').any(|c| c == controller)
            }
        })
        .unwrap_or_else(|| panic!("no {controller} line in {text}"));
    let rel = line.splitn(3, ':').nth(2).unwrap().trim_start_matches('/');
    let mount = if v2() {
        PathBuf::from("/sys/fs/cgroup")
    } else {
        Path::new("/sys/fs/cgroup").join(controller)
    };
    mount.join(rel)
}

fn read_u64(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn forkd_groups() -> Vec<PathBuf> {
    let ctrl = if v2() { "" } else { "memory" };
    let base = cgroup_base(ctrl);
    std::fs::read_dir(&base)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.is_dir()
                        && p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("forkd-tiny-"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The descriptors `pid` has open on `file`, with their `flags:` from fdinfo (octal).
fn fd_flags(pid: u32, file: &Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if target != file {
            continue;
        }
        let n = e.file_name().to_string_lossy().into_owned();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{n}")).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
            .unwrap();
        out.push((n, flags));
    }
    out
}

fn status_field(pid: u32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in status"))
        .trim()
        .to_string()
}

/// Run `sh -c script` as `uid:gid`; whether it succeeded.
fn as_user(uid: u32, gid: u32, script: &str) -> bool {
    Command::new("sh")
        .args(["-c", script])
        .uid(uid)
        .gid(gid)
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

// ---- replies are capped ------------------------------------------------------------------

/// A fake child whose agent answers with one endless line: `forkd exec` must give up at the
/// protocol's line limit, not buffer the line (it reached 3.1 GB RSS on a 3 GiB line).
#[test]
#[allow(clippy::zombie_processes)] // reaped with wait4, which also gives its peak RSS
fn an_endless_agent_reply_does_not_grow_forkd() {
    let run = home().join("run");
    let id = "fake-endless-0";
    let dir = run.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    // The fake QEMU: its command line names the run directory's qmp.sock (which is how forkd
    // tells a child's process), and it serves agent.sock with 512 MiB and no newline.
    let script = r#"
import socket, sys, os
d = os.path.dirname(sys.argv[1])
s = socket.socket(socket.AF_UNIX); s.bind(d + "/agent.sock"); s.listen(4)
chunk = b"x" * (1 << 20)
while True:
    c, _ = s.accept()
    try:
        for _ in range(512):
            c.sendall(chunk)
    except OSError:
        pass
    c.close()
"#;
    let mut fake = Command::new("python3")
        .args(["-c", script])
        .arg(dir.join("qmp.sock"))
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if dir.join("agent.sock").exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let rec = serde_json::json!({
        "id": id, "tag": "fake", "hostname": "fake-0", "pid": fake.id(),
        "snapshot_dir": "/nonexistent", "run_dir": dir, "started_unix": 0
    });
    std::fs::write(dir.join("child.json"), rec.to_string()).unwrap();

    let child = cmd(&["exec", id, "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child's pid, with valid out-pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid);
    let _ = fake.kill();
    let _ = fake.wait();
    std::fs::remove_dir_all(&dir).unwrap();
    let max_rss_mib = usage.ru_maxrss as u64 / 1024;
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) != 0,
        "exec against an endless reply must fail"
    );
    // The line cap is 16 MiB plus an envelope; without a cap forkd held all 512 MiB.
    assert!(
        max_rss_mib < 128,
        "forkd exec grew to {max_rss_mib} MiB on an endless agent line"
    );
}

// ---- cgroups -------------------------------------------------------------------------------

#[test]
fn a_child_runs_in_its_own_cgroup_with_limits() {
    if !is_root() {
        eprintln!("skipped: cgroups need root here");
        return;
    }
    tiny();
    let c = keep_one();
    let id = c["id"].as_str().unwrap().to_string();
    let pid = pid_of(&c);
    let want_mem = (MEM_MIB + 128) << 20;
    let mem = group_of(pid, "memory");
    assert_eq!(
        mem.file_name().unwrap().to_string_lossy(),
        format!("forkd-{id}"),
        "QEMU {pid} is not in its own group"
    );
    let pids = group_of(pid, "pids");
    assert!(pids.ends_with(format!("forkd-{id}")));
    assert_eq!(read_u64(&pids.join("pids.max")), 256);
    if v2() {
        assert_eq!(read_u64(&mem.join("memory.max")), want_mem);
        assert_eq!(read_u64(&mem.join("cpu.weight")), 100);
    } else {
        assert_eq!(read_u64(&mem.join("memory.limit_in_bytes")), want_mem);
        let cpu = group_of(pid, "cpu");
        assert!(cpu.ends_with(format!("forkd-{id}")));
        assert_eq!(read_u64(&cpu.join("cpu.shares")), 1024);
    }
    // QEMU's threads count against the pids limit.
    assert!(read_u64(&pids.join("pids.current")) >= 2);

    // A guest that fills more than its RAM cannot push QEMU past the limit: the guest's own
    // kernel runs out first, and QEMU's usage stays under the group's limit.
    let fill = format!(
        "mkdir -p /mnt/fill && mount -t tmpfs -o size={}m none /mnt/fill && \
         dd if=/dev/zero of=/mnt/fill/x bs=1M count={} 2>&1; true",
        MEM_MIB * 2,
        MEM_MIB * 2
    );
    let o = forkd(&["exec", "--timeout", "120", &id, "--", "sh", "-c", &fill]);
    let peak = if v2() {
        let p = mem.join("memory.peak");
        if p.exists() {
            read_u64(&p)
        } else {
            read_u64(&mem.join("memory.current"))
        }
    } else {
        read_u64(&mem.join("memory.max_usage_in_bytes"))
    };
    eprintln!(
        "child group peak {} MiB, limit {} MiB",
        peak >> 20,
        want_mem >> 20
    );
    assert!(
        peak >= (MEM_MIB / 2) << 20,
        "the guest's writes were not charged to the child's group (peak {} MiB; exec: {})",
        peak >> 20,
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(peak <= want_mem, "peak {} MiB over the limit", peak >> 20);
    ok(&["kill", &id]);
    assert!(!mem.exists(), "{} left after kill", mem.display());
    assert!(!pids.exists(), "{} left after kill", pids.display());
}

#[test]
fn cgroups_are_gone_after_a_fork() {
    if !is_root() {
        eprintln!("skipped: cgroups need root here");
        return;
    }
    tiny();
    let before = forkd_groups();
    let r = json(&ok(&[
        "fork",
        "--tag",
        "tiny",
        "-n",
        "2",
        "--exec",
        "cat /proc/self/cgroup >/dev/null; echo in",
        "--json",
    ]));
    assert_eq!(r["alive"], 2, "{r:#}");
    let after: Vec<PathBuf> = forkd_groups()
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert!(after.is_empty(), "groups left behind: {after:?}");
}

// ---- sandbox, user, read-only base --------------------------------------------------------

#[test]
fn a_childs_qemu_is_sandboxed_unprivileged_and_cannot_write_the_image() {
    tiny();
    let c = keep_one();
    let id = c["id"].as_str().unwrap().to_string();
    let pid = pid_of(&c);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("-sandbox on,obsolete=deny"), "{cmdline}");
    assert!(
        cmdline.contains("spawn=deny,resourcecontrol=deny"),
        "{cmdline}"
    );
    assert!(!cmdline.contains("exec:"), "{cmdline}");
    assert_eq!(status_field(pid, "Seccomp:"), "2", "no seccomp filter");
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");

    let image = home().join("images/tiny");
    let memory = image.join("memory.bin");
    let rootfs = image.join("rootfs.ext4");
    let mem_fds = fd_flags(pid, &memory);
    let root_fds = fd_flags(pid, &rootfs);
    assert!(!mem_fds.is_empty() && !root_fds.is_empty(), "{cmdline}");
    for (fd, flags) in &root_fds {
        assert_eq!(
            flags & libc::O_ACCMODE as u32,
            libc::O_RDONLY as u32,
            "rootfs open for writing on fd {fd} (flags {flags:o})"
        );
    }
    let readonly_memory = cmdline.contains("readonly=on,rom=off");
    if readonly_memory {
        for (fd, flags) in &mem_fds {
            assert_eq!(
                flags & libc::O_ACCMODE as u32,
                libc::O_RDONLY as u32,
                "memory.bin open for writing on fd {fd} (flags {flags:o})"
            );
        }
    } else {
        // QEMU 7.2 has no `rom=off`: it must open memory.bin read-write to map it privately
        // (documented in docs/SECURITY.md); the mapping itself is private.
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let m = maps
            .lines()
            .find(|l| l.ends_with(memory.to_str().unwrap()))
            .expect("memory.bin mapped");
        assert!(m.split_whitespace().nth(1).unwrap().ends_with('p'), "{m}");
        eprintln!("note: this QEMU opens memory.bin read-write (no rom=off before 8.2)");
    }

    if is_root() {
        let uid: u32 = status_field(pid, "Uid:")
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let gid: u32 = status_field(pid, "Gid:")
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_ne!(uid, 0, "QEMU runs as root");
        for s in status_field(pid, "Uid:").split_whitespace() {
            assert_eq!(s, uid.to_string(), "a uid of QEMU is still root");
        }
        // As QEMU's user, the base image cannot be written: not by path, and not through
        // QEMU's own descriptors.
        for f in [&memory, &rootfs] {
            let q = f.display();
            assert!(
                !as_user(uid, gid, &format!("printf x >> '{q}'")),
                "QEMU's user {uid} can write {q}"
            );
        }
        for (fd, _) in mem_fds.iter().chain(&root_fds) {
            assert!(
                !as_user(uid, gid, &format!("printf x >> /proc/{pid}/fd/{fd}")),
                "QEMU's user {uid} can write through /proc/{pid}/fd/{fd}"
            );
        }
        let before = std::fs::metadata(&memory).unwrap().len();
        assert_eq!(before, MEM_MIB << 20);
    }
    // The child still works under all of this.
    assert_eq!(ok(&["exec", &id, "--", "echo", "up"]).trim(), "up");
    ok(&["kill", &id]);
}

/// `FORKD_CONFINE=0` (for benchmarks) runs children as before: no sandbox, no cgroup.
#[test]
fn confinement_can_be_turned_off() {
    tiny();
    let o = cmd(&["fork", "--tag", "tiny", "-n", "1", "--keep", "--json"])
        .env("FORKD_CONFINE", "0")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = json(&String::from_utf8_lossy(&o.stdout));
    let id = r["kept"][0].as_str().unwrap().to_string();
    let pid = r["children"][0]["pid"].as_u64().unwrap() as u32;
    assert_eq!(status_field(pid, "Seccomp:"), "0");
    if is_root() {
        assert!(!group_of(pid, "memory").ends_with(format!("forkd-{id}")));
    }
    ok(&["kill", &id]);
}

/// `doctor` says whether children get cgroups and which user their QEMU runs as.
#[test]
fn doctor_reports_confinement() {
    let r = json(&ok(&["doctor", "--json"]));
    let checks = r
        .as_array()
        .or_else(|| r["checks"].as_array())
        .cloned()
        .unwrap_or_default();
    let find = |n: &str| checks.iter().find(|c| c["name"] == n).cloned();
    let cg = find("cgroups").unwrap_or_else(|| panic!("no cgroups check: {r:#}"));
    if is_root() {
        assert!(
            cg["detail"].as_str().unwrap().contains("memory, pids"),
            "{cg:#}"
        );
        let user = find("qemu user").unwrap_or_else(|| panic!("no qemu user check: {r:#}"));
        assert!(
            user["detail"]
                .as_str()
                .unwrap()
                .contains("child QEMUs run as")
        );
    }
    let off = cmd(&["doctor", "--json"])
        .env("FORKD_CGROUPS", "0")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&off.stdout);
    assert!(text.contains("without memory/pids limits"), "{text}");
}
