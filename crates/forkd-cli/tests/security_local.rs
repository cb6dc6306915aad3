//! Attacks from this host (issue 9, "Local user to root", "Symlinks are followed", "Orphans"),
//! through the `forkd` binary with real QEMU under TCG. Grouped by attacker:
//!
//! - another local user (`nobody`): the store and the run directories are private whatever the
//!   umask, so they cannot read guest RAM or drive a child's QMP or agent socket;
//! - whoever can plant files in `run/`: `kill` removes only `run/<id>` and follows no link;
//! - the end of forkd itself (`kill -9`, SIGHUP of a closed session): no QEMU outlives it, and
//!   what it left is swept.

mod cli_common;
use cli_common::{cmd_in, text, tiny_assets};

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

const NOBODY: u32 = 65534;

/// One VM-heavy test at a time: the machine has few cores, and timings below are in seconds.
fn serial() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|p| p.into_inner())
}

/// A directory others can enter (0755, in /tmp), holding a FORKD_HOME that forkd creates:
/// so only forkd's own modes stand between `nobody` and the store.
struct Place {
    _tmp: tempfile::TempDir,
    home: PathBuf,
}

impl Place {
    fn new() -> Place {
        let tmp = tempfile::Builder::new()
            .prefix("fsl")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::set_permissions(tmp.path(), PermissionsExt::from_mode(0o755)).unwrap();
        let home = tmp.path().join("home");
        Place { _tmp: tmp, home }
    }
}

/// `forkd ARGS` in `home`, run with umask `mask`.
fn forkd_cmd(home: &Path, mask: u32, args: &[&str]) -> Command {
    let mut c = cmd_in(home);
    c.args(args);
    // SAFETY: umask(2) is async-signal-safe and allocates nothing.
    unsafe {
        c.pre_exec(move || {
            libc::umask(mask as libc::mode_t);
            Ok(())
        });
    }
    c
}

fn forkd(home: &Path, mask: u32, args: &[&str]) -> Output {
    forkd_cmd(home, mask, args).output().expect("running forkd")
}

fn ok(home: &Path, mask: u32, args: &[&str]) -> String {
    let o = forkd(home, mask, args);
    assert!(o.status.success(), "forkd {args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn build_tiny(home: &Path, mask: u32) {
    let assets = tiny_assets();
    let assets = assets.to_str().unwrap();
    ok(
        home,
        mask,
        &["-q", "build-tiny", "--assets", assets, "--mem-mib", "128"],
    );
}

/// A home with the tiny snapshot, shared by the tests that only need one to fork from.
fn shared() -> &'static Path {
    static P: OnceLock<Place> = OnceLock::new();
    &P.get_or_init(|| {
        let p = Place::new();
        cli_common::remove_at_exit(p._tmp.path());
        build_tiny(&p.home, 0o022);
        p
    })
    .home
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

/// Run `attempt` as user `nobody` (in a child forked for it, between fork and exec): `Ok` if
/// the attempt succeeded, else the error it met.
fn as_nobody(
    attempt: impl Fn() -> std::io::Result<()> + Send + Sync + 'static,
) -> std::io::Result<()> {
    let mut c = Command::new("/bin/true");
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: runs in the forked child; setgroups/setgid/setuid and the attempts below
    // (open, socket, connect on prepared buffers) are async-signal-safe system calls.
    unsafe {
        c.pre_exec(move || {
            let none: [libc::gid_t; 0] = [];
            if libc::setgroups(0, none.as_ptr()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::other("cannot become nobody"));
            }
            attempt()
        });
    }
    c.status().map(|_| ())
}

/// Whether `nobody` can open `path` for reading.
fn nobody_reads(path: &Path) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    as_nobody(move || {
        // SAFETY: open(2) on a NUL-terminated path made before the fork.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })
}

/// Whether `nobody` can connect to the unix socket at `path`.
fn nobody_connects(path: &Path) -> std::io::Result<()> {
    // SAFETY: sockaddr_un is plain data; all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    as_nobody(move || {
        // SAFETY: socket(2) and connect(2) with an address built before the fork.
        unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    })
}

fn kept_ids(home: &Path) -> Vec<String> {
    let out = ok(home, 0o022, &["ps", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect()
}

/// Every directory and file forkd keeps under `home` is private; `nobody` can neither read
/// guest RAM nor connect to a kept child's QMP or agent socket.
fn private_whatever_the_umask(mask: u32) {
    let _one = serial();
    let place = Place::new();
    let home = &place.home;
    build_tiny(home, mask);
    ok(home, mask, &["-q", "fork", "--tag", "tiny", "--keep"]);
    let ids = kept_ids(home);
    assert_eq!(ids.len(), 1, "{ids:?}");
    let run = home.join("run").join(&ids[0]);

    let result = std::panic::catch_unwind(|| {
        assert_eq!(mode(home), 0o700, "FORKD_HOME");
        for d in ["images", "images/tiny", "run", "tmp", "locks"] {
            assert_eq!(mode(&home.join(d)), 0o700, "{d}/");
        }
        assert_eq!(mode(&run), 0o700, "run/<id>/");
        for f in std::fs::read_dir(home.join("images/tiny")).unwrap() {
            let p = f.unwrap().path();
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
        for f in ["store.toml", "locks/store.lock"] {
            assert_eq!(mode(&home.join(f)), 0o600, "{f}");
        }
        for f in std::fs::read_dir(&run).unwrap() {
            let p = f.unwrap().path();
            assert_eq!(mode(&p) & 0o077, 0, "{} is open to others", p.display());
        }
        for s in ["qmp.sock", "agent.sock"] {
            assert_eq!(mode(&run.join(s)), 0o600, "{s}");
        }

        let mem = home.join("images/tiny/memory.bin");
        let e = nobody_reads(&mem).expect_err("nobody read memory.bin (guest RAM)");
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        for s in ["qmp.sock", "agent.sock"] {
            let e = nobody_connects(&run.join(s))
                .expect_err(&format!("nobody connected to the kept child's {s}"));
            assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{s}: {e}");
        }
    });
    let _ = forkd(home, 0o022, &["kill", "--all"]);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

mod other_local_user {
    use super::*;

    #[test]
    fn umask_000_gives_nobody_nothing() {
        private_whatever_the_umask(0o000);
    }

    #[test]
    fn umask_022_gives_nobody_nothing() {
        private_whatever_the_umask(0o022);
    }

    /// A home that an earlier forkd (or the user) left open to others is closed again.
    #[test]
    fn an_open_home_is_made_private() {
        let place = Place::new();
        std::fs::create_dir(&place.home).unwrap();
        std::fs::set_permissions(&place.home, PermissionsExt::from_mode(0o777)).unwrap();
        let o = forkd(&place.home, 0o000, &["images", "list"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(mode(&place.home), 0o700);
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("made it 700"),
            "no warning: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Plant a record in `run/<name>` (a directory, or a link to `target` when `link`).
fn plant(run: &Path, name: &str, record_dir: &Path, target: Option<&Path>) {
    std::fs::create_dir_all(run).unwrap();
    let rec = serde_json::json!({
        "id": name, "tag": "tiny", "hostname": "x", "pid": 1,
        "snapshot_dir": "/nonexistent", "run_dir": record_dir, "started_unix": 0,
    });
    match target {
        Some(t) => {
            std::fs::write(t.join("child.json"), rec.to_string()).unwrap();
            std::os::unix::fs::symlink(t, run.join(name)).unwrap();
        }
        None => {
            std::fs::create_dir(run.join(name)).unwrap();
            std::fs::write(run.join(name).join("child.json"), rec.to_string()).unwrap();
        }
    }
}

fn victim(place: &Place, name: &str) -> PathBuf {
    let v = place.home.parent().unwrap().join(name);
    std::fs::create_dir_all(&v).unwrap();
    std::fs::write(v.join("precious"), "keep me").unwrap();
    v
}

mod planted_run_dirs {
    use super::*;

    /// `kill` deletes `run/<id>`, never the `run_dir` a record names.
    #[test]
    fn kill_removes_only_run_id() {
        let place = Place::new();
        let run = place.home.join("run");
        let v = victim(&place, "victim");
        plant(&run, "evil", &v, None);
        let o = forkd(&place.home, 0o022, &["kill", "evil"]);
        assert!(v.join("precious").is_file(), "kill removed {}", v.display());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(!run.join("evil").exists(), "run/evil was not removed");
    }

    /// A link at `run/<id>` is not followed: neither `kill ID` nor `kill --all` reads or
    /// removes what it points to.
    #[test]
    fn kill_does_not_follow_a_linked_run_dir() {
        let place = Place::new();
        let run = place.home.join("run");
        let v = victim(&place, "victim2");
        plant(&run, "link", &v, Some(&v));
        let o = forkd(&place.home, 0o022, &["kill", "link"]);
        assert!(v.join("precious").is_file(), "kill followed run/link");
        assert!(!o.status.success(), "kill of a linked run dir succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("no running child link"), "{err}");
        let _ = forkd(&place.home, 0o022, &["kill", "--all"]);
        assert!(v.join("precious").is_file(), "kill --all followed run/link");
        let ps = ok(&place.home, 0o022, &["ps", "--json"]);
        assert!(!ps.contains("link"), "ps lists a linked run dir: {ps}");
    }
}

/// QEMU processes whose command line names `needle`.
fn qemus_naming(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains("qemu-system") && cmd.contains(needle)
        })
        .collect()
}

/// The QEMUs whose parent is `pid`, with the run directory each names.
fn qemu_children(pid: u32, run: &Path) -> Vec<(u32, PathBuf)> {
    let prefix = format!("{}/", run.display());
    qemus_naming(&prefix)
        .into_iter()
        .filter(|q| {
            let stat = std::fs::read_to_string(format!("/proc/{q}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
            ppid == Some(pid)
        })
        .filter_map(|q| {
            // The child's own directory is the one its QMP socket is in (the kernel comes
            // from the fork's shared stub directory).
            let cmd = std::fs::read(format!("/proc/{q}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).into_owned();
            let end = cmd.find("/qmp.sock")?;
            let start = cmd[..end].rfind(&prefix)? + prefix.len();
            Some((q, run.join(&cmd[start..end])))
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; it has stopped running.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next());
            state != Some("Z")
        })
        .unwrap_or(false)
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Start `forkd fork -n 3 ARGS --exec 'sleep 30'` and wait until its 3 QEMUs run (and a
/// little more, so the commands are running in the guests).
fn fork_three(home: &Path, extra: &[&str]) -> (std::process::Child, Vec<(u32, PathBuf)>) {
    let mut args = vec![
        "-q", "fork", "--tag", "tiny", "-n", "3", "--exec", "sleep 30",
    ];
    args.extend_from_slice(extra);
    let mut child = forkd_cmd(home, 0o022, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let run = home.join("run");
    let pid = child.id();
    let mut qemus = Vec::new();
    let up = wait_until(Duration::from_secs(90), || {
        qemus = qemu_children(pid, &run);
        qemus.len() == 3
    });
    if !up {
        let _ = child.kill();
        panic!("forkd fork did not start 3 QEMUs: {qemus:?}");
    }
    std::thread::sleep(Duration::from_secs(3));
    (child, qemus)
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of a process this test started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, sig) }, 0);
}

/// After forkd ended, its QEMUs stop within seconds; then its run directories go (at once, or
/// at the next `forkd ps`).
fn assert_nothing_left(home: &Path, qemus: &[(u32, PathBuf)], what: &str) {
    let gone = wait_until(Duration::from_secs(5), || {
        qemus.iter().all(|(p, _)| !alive(*p))
    });
    let left: Vec<u32> = qemus.iter().map(|q| q.0).filter(|p| alive(*p)).collect();
    for p in &left {
        signal(*p, libc::SIGKILL); // don't leave them to the next test
    }
    assert!(gone, "QEMUs {left:?} survived {what} of forkd fork");
    ok(home, 0o022, &["ps"]);
    for (_, d) in qemus {
        assert!(
            !d.exists(),
            "{} survived {what} and a forkd ps",
            d.display()
        );
    }
}

mod end_of_forkd {
    use super::*;

    #[test]
    fn kill_9_of_fork_leaves_no_qemu() {
        let home = shared();
        let _one = serial();
        let (mut child, qemus) = fork_three(home, &[]);
        signal(child.id(), libc::SIGKILL);
        let _ = child.wait();
        assert_nothing_left(home, &qemus, "kill -9");
    }

    #[test]
    fn sighup_of_fork_leaves_no_qemu_and_no_run_dir() {
        let home = shared();
        let _one = serial();
        let (mut child, qemus) = fork_three(home, &[]);
        signal(child.id(), libc::SIGHUP);
        let exited = wait_until(Duration::from_secs(20), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = child.kill();
        }
        assert!(exited, "forkd fork did not stop on SIGHUP");
        // Stopped by itself: the directories are gone without a sweep.
        for (_, d) in &qemus {
            assert!(!d.exists(), "{} survived SIGHUP", d.display());
        }
        assert_nothing_left(home, &qemus, "SIGHUP");
    }

    /// `fork --keep` killed mid-fork: its children were never handed over (no record), so the
    /// next `forkd ps` kills them and removes their directories.
    #[test]
    fn kill_9_of_fork_keep_is_swept() {
        let home = shared();
        let _one = serial();
        let (mut child, qemus) = fork_three(home, &["--keep"]);
        signal(child.id(), libc::SIGKILL);
        let _ = child.wait();
        ok(home, 0o022, &["ps"]);
        assert_nothing_left(home, &qemus, "kill -9 (--keep)");
    }

    /// Kept children are not tied to the forkd that made them: they run on after it exits,
    /// though they were started from its worker threads.
    #[test]
    fn kept_children_outlive_the_cli() {
        let home = shared();
        let _one = serial();
        ok(
            home,
            0o022,
            &["-q", "fork", "--tag", "tiny", "-n", "2", "--keep"],
        );
        let out = ok(home, 0o022, &["ps", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let kept: Vec<(String, u32)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["id"].as_str().unwrap().to_string(),
                    c["pid"].as_u64().unwrap() as u32,
                )
            })
            .collect();
        assert_eq!(kept.len(), 2, "{out}");
        std::thread::sleep(Duration::from_secs(1));
        let result = std::panic::catch_unwind(|| {
            for (id, pid) in &kept {
                assert!(alive(*pid), "kept child {id} died with the CLI");
                let o = ok(home, 0o022, &["exec", id, "--", "echo", "still-here"]);
                assert!(o.contains("still-here"), "{o}");
            }
        });
        ok(home, 0o022, &["kill", "--all"]);
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
        for (_, pid) in &kept {
            assert!(wait_until(Duration::from_secs(5), || !alive(*pid)));
        }
    }

    /// Children that are not kept come up and finish normally, though each is tied to the
    /// worker thread that started it.
    #[test]
    fn tied_children_finish_their_work() {
        let home = shared();
        let _one = serial();
        let out = ok(
            home,
            0o022,
            &[
                "fork",
                "--tag",
                "tiny",
                "-n",
                "3",
                "--exec",
                "echo tied-ok",
                "--json",
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["alive"], 3, "{out}");
        for c in v["children"].as_array().unwrap() {
            assert_eq!(
                c["exec"]["stdout"].as_str().unwrap().trim(),
                "tied-ok",
                "{c}"
            );
        }
    }
}
