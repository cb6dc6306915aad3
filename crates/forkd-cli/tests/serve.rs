//! `forkd serve` with real QEMU children (tiny, TCG): the REST API end to end, each bad input of
//! docs/API.md, and the daemon's life (SIGTERM stops every child; after `kill -9` a restart
//! adopts what is left).

mod cli_common;

use base64::Engine as _;
use forkd_server::client::{Client, ClientError};
use hyper::Method;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn which(p: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(p).is_file()))
        .unwrap_or(false)
}

fn forkd(home: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(args)
        .env("FORKD_HOME", home)
        .env("FORKD_ACCEL", "tcg")
        .env_remove("FORKD_URL")
        .output()
        .expect("running forkd")
}

/// A fresh home holding the tiny image.
fn home_with_tiny(prefix: &str) -> tempfile::TempDir {
    assert!(
        which("qemu-system-x86_64"),
        "these tests need QEMU: apt-get install qemu-system-x86 (or run scripts/setup-engine.sh)"
    );
    static ASSETS: OnceLock<String> = OnceLock::new();
    let assets = ASSETS.get_or_init(|| {
        let assets = std::env::var_os("FORKD_ASSETS")
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "/var/cache/forkd-ci/assets".into());
        let out = Command::new(repo().join("recipes/tiny/build.sh"))
            .env("FORKD_ASSETS", assets)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "recipes/tiny/build.sh failed (run scripts/setup-engine.sh):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    });
    let home = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap();
    let o = forkd(
        home.path(),
        &["-q", "build-tiny", "--assets", assets, "--mem-mib", "192"],
    );
    assert!(
        o.status.success(),
        "build-tiny failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    home
}

struct Daemon {
    child: Child,
    home: PathBuf,
}

impl Daemon {
    fn start(home: &Path, extra: &[&str]) -> Daemon {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(home.join("serve.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_forkd"));
        cmd.arg("serve")
            .args(extra)
            .env("FORKD_HOME", home)
            .env("FORKD_ACCEL", "tcg")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours;
        // it makes the daemon get SIGTERM (and stop its children) when the thread that spawned
        // it exits, so no daemon outlives the test process.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("starting forkd serve");
        let d = Daemon {
            child,
            home: home.to_path_buf(),
        };
        if extra.is_empty() {
            let t = Instant::now();
            while std::os::unix::net::UnixStream::connect(d.socket()).is_err() {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "the daemon did not listen"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        d
    }

    fn socket(&self) -> PathBuf {
        self.home.join("forkd.sock")
    }

    fn client(&self) -> Client {
        Client::discover(&self.socket()).expect("the daemon answers")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&mut self, sig: i32) {
        // SAFETY: kill(2) on the pid of a child process we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                t.elapsed() < within,
                "the daemon did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGTERM);
            let _ = self.wait(Duration::from_secs(30));
        }
    }
}

/// A TCP port nothing listens on right now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Wait until something accepts on `addr`.
fn wait_tcp(addr: &str) {
    let t = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "nothing listens on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon most tests share (one home, tiny image).
fn shared() -> &'static (tempfile::TempDir, std::sync::Mutex<Daemon>) {
    static D: OnceLock<(tempfile::TempDir, std::sync::Mutex<Daemon>)> = OnceLock::new();
    D.get_or_init(|| {
        let home = home_with_tiny("fsv");
        cli_common::remove_at_exit(home.path());
        // Spawned from a thread that lives as long as the process: the daemon's parent-death
        // signal then fires when the test process exits, not when this test's thread ends.
        let (tx, rx) = std::sync::mpsc::channel();
        let p = home.path().to_path_buf();
        std::thread::spawn(move || {
            tx.send(Daemon::start(&p, &[])).unwrap();
            loop {
                std::thread::park();
            }
        });
        let d = rx.recv().unwrap();
        (home, std::sync::Mutex::new(d))
    })
}

fn client() -> Client {
    shared()
        .1
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .client()
}

fn create(c: &Client, body: Value) -> Value {
    c.json(Method::POST, "/v1/sandboxes", Some(&body))
        .expect("create sandboxes")
}

fn one(c: &Client) -> String {
    let r = create(c, json!({"image": "tiny"}));
    r["results"][0]["sandbox"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no sandbox: {r:#}"))
        .to_string()
}

struct Ran {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Value,
    events: Vec<Value>,
}

fn run(c: &Client, id: &str, body: Value) -> Ran {
    let mut r = Ran {
        stdout: Vec::new(),
        stderr: Vec::new(),
        exit: Value::Null,
        events: Vec::new(),
    };
    c.ndjson(
        Method::POST,
        &format!("/v1/sandboxes/{id}/commands"),
        Some(&body),
        &mut |v| {
            let data = || B64.decode(v["data"].as_str().unwrap_or("")).unwrap();
            match v["type"].as_str() {
                Some("stdout") => r.stdout.extend(data()),
                Some("stderr") => r.stderr.extend(data()),
                Some("exit") | Some("error") => r.exit = v.clone(),
                _ => {}
            }
            r.events.push(v);
            true
        },
    )
    .expect("command stream");
    r
}

fn api_err(e: ClientError) -> (u16, String, String, Option<String>) {
    match e {
        ClientError::Api {
            status,
            code,
            message,
            hint,
        } => (status, code, message, hint),
        other => panic!("expected an API error, got {other}"),
    }
}

fn qemu_pids_in(home: &Path) -> Vec<u32> {
    let needle = home.join("run").to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu-system") && cmd.contains(&needle) {
            out.push(pid);
        }
    }
    out
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn commands_stream_exit_codes_stdout_and_stderr_with_env_and_cwd() {
    let c = client();
    let r = create(
        &c,
        json!({"image": "tiny", "count": 2, "env": {"K": "v", "W": "sandbox"}, "labels": {"t": "cmd"}}),
    );
    assert_eq!(r["created"], 2, "{r:#}");
    let id = r["results"][0]["sandbox"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let ran = run(
        &c,
        &id,
        json!({"cmd": "echo hi; echo oops >&2; echo $K $W; pwd; exit 3", "env": {"W": "command"}, "cwd": "/tmp"}),
    );
    assert_eq!(ran.exit["type"], "exit", "{:?}", ran.events);
    assert_eq!(ran.exit["exit_code"], 3);
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout),
        "hi\nv command\n/tmp\n"
    );
    assert_eq!(String::from_utf8_lossy(&ran.stderr), "oops\n");
    assert_eq!(ran.events[0]["type"], "start", "{:?}", ran.events);
    // Binary output and stdin come back byte for byte.
    let input: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let ran = run(
        &c,
        &id,
        json!({"argv": ["cat"], "stdin_data": B64.encode(&input)}),
    );
    assert_eq!(ran.exit["exit_code"], 0);
    assert!(ran.stdout == input, "binary stdin/stdout differ");
    // Labels select.
    let l: Value = c
        .json(Method::GET, "/v1/sandboxes?label=t%3Dcmd", None)
        .unwrap();
    assert_eq!(l["sandboxes"].as_array().unwrap().len(), 2, "{l:#}");
    for r in r["results"].as_array().unwrap() {
        let id = r["sandbox"]["id"].as_str().unwrap();
        c.send(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
            .unwrap();
    }
    let (status, ..) = api_err(
        c.json::<Value>(Method::GET, &format!("/v1/sandboxes/{id}"), None)
            .unwrap_err(),
    );
    assert_eq!(status, 404);
}

#[test]
fn files_go_in_and_out_intact_and_a_full_disk_is_a_clear_error() {
    let c = client();
    let id = one(&c);
    let other = one(&c);
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let v = c
        .upload(
            &format!("/v1/sandboxes/{id}/files?path=%2Ftmp%2Fin.bin"),
            Box::new(std::io::Cursor::new(data.clone())),
        )
        .unwrap();
    assert_eq!(v["size"], data.len() as u64);
    let mut back = Vec::new();
    c.download(
        &format!("/v1/sandboxes/{id}/files?path=%2Ftmp%2Fin.bin"),
        &mut back,
    )
    .unwrap();
    assert!(back == data, "the file came back different");
    let list: Value = c
        .json(
            Method::GET,
            &format!("/v1/sandboxes/{id}/files/list?path=%2Ftmp"),
            None,
        )
        .unwrap();
    assert!(
        list["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "in.bin" && e["size"] == data.len() as u64),
        "{list:#}"
    );
    // A disk smaller than the upload: the guest's ENOSPC comes back, no half file is left.
    let ran = run(
        &c,
        &id,
        json!({"cmd": "mkdir -p /small && mount -t tmpfs -o size=1m tmpfs /small && echo ok"}),
    );
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout),
        "ok\n",
        "{:?}",
        ran.events
    );
    // 16 MiB: far more than the socket buffers hold, so the daemon must read on past the
    // error for the client to get it (and not a reset while it is still sending).
    let big: Vec<u8> = data.iter().copied().cycle().take(16 << 20).collect();
    let e = c
        .upload(
            &format!("/v1/sandboxes/{id}/files?path=%2Fsmall%2Fbig.bin"),
            Box::new(std::io::Cursor::new(big)),
        )
        .unwrap_err();
    let (status, code, msg, hint) = api_err(e);
    assert_eq!((status, code.as_str()), (502, "guest"), "{msg}");
    assert!(hint.unwrap_or_default().contains("disk is full"), "{msg}");
    let ran = run(&c, &id, json!({"cmd": "ls -A /small | wc -l"}));
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout).trim(),
        "0",
        "a temp file was left"
    );
    // The other child is unaffected.
    let ran = run(&c, &other, json!({"cmd": "echo fine"}));
    assert_eq!(String::from_utf8_lossy(&ran.stdout), "fine\n");
    for s in [&id, &other] {
        c.send(Method::DELETE, &format!("/v1/sandboxes/{s}"), None)
            .unwrap();
    }
}

#[test]
fn bad_input_gets_its_own_status_and_says_what_was_wrong() {
    let c = client();
    // Unknown image: 404 with a hint.
    let (status, code, msg, hint) = api_err(
        c.json::<Value>(
            Method::POST,
            "/v1/sandboxes",
            Some(&json!({"image": "nope"})),
        )
        .unwrap_err(),
    );
    assert_eq!((status, code.as_str()), (404, "not_found"), "{msg}");
    assert!(hint.unwrap_or_default().contains("forkd pull"), "{msg}");
    // Malformed JSON names the field.
    let (status, _, msg, _) = api_err(
        c.json::<Value>(
            Method::POST,
            "/v1/sandboxes",
            Some(&json!({"image": "tiny", "count": "ten"})),
        )
        .unwrap_err(),
    );
    assert_eq!(status, 400);
    assert!(msg.contains("count"), "{msg}");
    let (status, _, msg, _) = api_err(
        c.json::<Value>(
            Method::POST,
            "/v1/sandboxes",
            Some(&json!({"imag": "tiny"})),
        )
        .unwrap_err(),
    );
    assert_eq!(status, 400);
    assert!(msg.contains("imag"), "{msg}");
    // More than the host holds: the arithmetic, and no child starts.
    let home = shared().0.path();
    let before = qemu_pids_in(home).len();
    let (status, code, msg, _) = api_err(
        c.json::<Value>(
            Method::POST,
            "/v1/sandboxes",
            Some(&json!({"image": "tiny", "count": 1000})),
        )
        .unwrap_err(),
    );
    assert_eq!((status, code.as_str()), (422, "capacity"), "{msg}");
    assert!(msg.contains("MiB each") && msg.contains("at most"), "{msg}");
    assert!(qemu_pids_in(home).len() <= before, "a child started");
    // A bad command request.
    let id = one(&c);
    let (status, _, msg, _) = api_err(
        c.json::<Value>(
            Method::POST,
            &format!("/v1/sandboxes/{id}/commands"),
            Some(&json!({"cmd": "true", "argv": ["true"]})),
        )
        .unwrap_err(),
    );
    assert_eq!(status, 400, "{msg}");
    let (status, ..) = api_err(
        c.json::<Value>(Method::GET, "/v1/sandboxes/no-such-id", None)
            .unwrap_err(),
    );
    assert_eq!(status, 404);
    c.send(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .unwrap();
}

#[test]
fn a_flood_of_output_is_streamed_with_bounded_daemon_memory() {
    let c = client();
    let id = one(&c);
    let pid = shared().1.lock().unwrap().pid();
    let before = vm_hwm_kib(pid);
    let mut total = 0u64;
    let mut exit = Value::Null;
    c.ndjson(
        Method::POST,
        &format!("/v1/sandboxes/{id}/commands"),
        Some(&json!({"cmd": "yes | head -c 50000000", "timeout_s": 600})),
        &mut |v| {
            match v["type"].as_str() {
                Some("stdout") => {
                    total += B64.decode(v["data"].as_str().unwrap()).unwrap().len() as u64
                }
                Some("exit") => exit = v,
                _ => {}
            }
            true
        },
    )
    .unwrap();
    assert_eq!(exit["exit_code"], 0, "{exit}");
    assert_eq!(total, 50_000_000);
    let after = vm_hwm_kib(pid);
    assert!(
        after < 64 * 1024 || after.saturating_sub(before) < 32 * 1024,
        "the daemon's peak RSS grew from {before} KiB to {after} KiB"
    );
    c.send(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .unwrap();
}

#[test]
fn a_client_that_goes_away_kills_a_foreground_command_but_not_a_background_one() {
    let c = client();
    let id = one(&c);
    // Foreground: read the first output, then drop the connection: the command is killed.
    c.ndjson(
        Method::POST,
        &format!("/v1/sandboxes/{id}/commands"),
        Some(&json!({"cmd": "echo started; exec sleep 300"})),
        &mut |v| v["type"] != "stdout",
    )
    .unwrap();
    let count =
        "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' ' | grep -o 'sleep 30[0]' | wc -l";
    let t = Instant::now();
    loop {
        let ran = run(&c, &id, json!({ "cmd": count }));
        if String::from_utf8_lossy(&ran.stdout).trim() == "0" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the foreground command outlived its client"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Background: keeps running whatever the client does.
    let started: Value = c
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/commands"),
            Some(&json!({"cmd": "echo bg; sleep 2; echo done", "background": true})),
        )
        .unwrap();
    let cid = started["command_id"].as_str().unwrap();
    let st: Value = c
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/commands/{cid}/wait?timeout_s=60"),
            None,
        )
        .unwrap();
    assert_eq!(st["exit_code"], 0, "{st:#}");
    let out: Value = c
        .json(
            Method::GET,
            &format!("/v1/sandboxes/{id}/commands/{cid}/output"),
            None,
        )
        .unwrap();
    assert_eq!(
        B64.decode(out["stdout"].as_str().unwrap()).unwrap(),
        b"bg\ndone\n"
    );
    // A signalled background command reports the signal.
    let started: Value = c
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/commands"),
            Some(&json!({"cmd": "sleep 300", "background": true})),
        )
        .unwrap();
    let cid = started["command_id"].as_str().unwrap();
    c.send(
        Method::POST,
        &format!("/v1/sandboxes/{id}/commands/{cid}/signal"),
        Some(&json!({"signal": "TERM"})),
    )
    .unwrap();
    let st: Value = c
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/commands/{cid}/wait?timeout_s=30"),
            None,
        )
        .unwrap();
    assert_eq!(st["signal"], 15, "{st:#}");
    c.send(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .unwrap();
}

#[test]
fn concurrent_requests_to_one_child_do_not_cross() {
    let c = client();
    let id = one(&c);
    std::thread::scope(|s| {
        for k in 0..8 {
            let id = &id;
            s.spawn(move || {
                let c = client();
                for round in 0..3 {
                    let tag = format!("t{k}-{round}");
                    let ran = run(
                        &c,
                        id,
                        json!({"cmd": format!("for i in 1 2 3 4 5; do echo {tag}; done")}),
                    );
                    let want = format!("{tag}\n").repeat(5);
                    assert_eq!(String::from_utf8_lossy(&ran.stdout), want);
                }
            });
        }
    });
    c.send(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .unwrap();
}

#[test]
fn pause_stops_the_cpu_and_resume_brings_it_back() {
    let c = client();
    let id = one(&c);
    let sb: Value = c
        .json(Method::POST, &format!("/v1/sandboxes/{id}/pause"), None)
        .unwrap();
    assert_eq!(sb["state"], "paused");
    let pid = sb["pid"].as_u64().unwrap();
    let ticks = || -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let t0 = ticks();
    std::thread::sleep(Duration::from_secs(3));
    let used = ticks() - t0;
    // 3 s at 100 ticks/s; a running TCG child idles at a few percent, a paused one at ~0.
    assert!(used <= 3, "a paused child used {used} ticks in 3 s");
    let (status, code, ..) = api_err(
        c.json::<Value>(
            Method::POST,
            &format!("/v1/sandboxes/{id}/commands"),
            Some(&json!({"cmd": "true"})),
        )
        .unwrap_err(),
    );
    assert_eq!((status, code.as_str()), (409, "conflict"));
    let sb: Value = c
        .json(Method::POST, &format!("/v1/sandboxes/{id}/resume"), None)
        .unwrap();
    assert_eq!(sb["state"], "running");
    let ran = run(&c, &id, json!({"cmd": "echo back"}));
    assert_eq!(String::from_utf8_lossy(&ran.stdout), "back\n");
    c.send(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .unwrap();
}

#[test]
fn health_metrics_openapi_and_audit() {
    let c = client();
    let h: Value = c.json(Method::GET, "/v1/health", None).unwrap();
    assert_eq!(h["status"], "ok");
    let doc: Value = c.json(Method::GET, "/v1/openapi.json", None).unwrap();
    for p in [
        "/v1/sandboxes",
        "/v1/sandboxes/{id}/commands",
        "/v1/sandboxes/{id}/files",
        "/v1/sandboxes/{id}/run",
    ] {
        assert!(doc["paths"][p].is_object(), "openapi lacks {p}");
    }
    let id = one(&c);
    let mut m = Vec::new();
    c.download("/metrics", &mut m).unwrap();
    let m = String::from_utf8_lossy(&m);
    for k in [
        "forkd_sandboxes{state=\"running\"}",
        "forkd_fork_seconds_bucket",
        "forkd_host_memory_used_bytes",
    ] {
        assert!(m.contains(k), "metrics lack {k}:\n{m}");
    }
    c.send(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .unwrap();
    let audit = std::fs::read_to_string(shared().0.path().join("log/audit.jsonl")).unwrap();
    assert!(
        audit.lines().any(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["method"] == "DELETE" && v["sandbox"] == id.as_str() && v["status"] == 204
        }),
        "no audit line for DELETE {id}:\n{audit}"
    );
}

#[test]
fn ttl_expiry_kills_the_sandbox() {
    let c = client();
    let r = create(&c, json!({"image": "tiny", "ttl_s": 2}));
    let id = r["results"][0]["sandbox"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let pid = r["results"][0]["sandbox"]["pid"].as_u64().unwrap();
    let t = Instant::now();
    loop {
        let gone = c
            .json::<Value>(Method::GET, &format!("/v1/sandboxes/{id}"), None)
            .is_err();
        if gone && !Path::new(&format!("/proc/{pid}")).exists() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "ttl did not expire");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn tcp_needs_the_token() {
    let home = shared().0.path();
    let token = home.join("tcp-token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // A second daemon on the same home is refused on the socket, but TCP is its own listener:
    // use a home of its own so the two do not adopt each other's children.
    let own = tempfile::Builder::new()
        .prefix("ftcp")
        .tempdir_in("/tmp")
        .unwrap();
    let _d = Daemon::start(
        own.path(),
        &["--listen", &addr, "--token-file", token.to_str().unwrap()],
    );
    wait_tcp(&addr);
    let get = |tok: Option<&str>| {
        // SAFETY-free env juggling: each Client reads FORKD_URL/FORKD_TOKEN once, here.
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}"]);
        if let Some(t) = tok {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        let o = cmd
            .arg(format!("http://{addr}/v1/sandboxes"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(get(None), "401");
    assert_eq!(get(Some("wrong")), "401");
    assert_eq!(get(Some("s3cret-token")), "200");
}

/// `forkd exec` with env, cwd and stdin, and `forkd cp` both ways, in a kept child of `home`
/// (through the daemon when one runs there, else directly).
pub fn cli_exec_and_cp(home: &Path, id: &str) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(["exec", "-e", "K=v1", "--cwd", "/tmp", "-i", id, "--"])
        .args(["sh", "-c", "echo $K; pwd; wc -c"])
        .env("FORKD_HOME", home)
        .env_remove("FORKD_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&[7u8; 1234]).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["v1", "/tmp", "1234"]
    );
    let o = forkd(home, &["exec", id, "--", "sh", "-c", "exit 5"]);
    assert_eq!(o.status.code(), Some(5));
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let remote = format!("{id}:/tmp/cp.bin");
    let o = forkd(home, &["cp", src.to_str().unwrap(), &remote]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let back = dir.path().join("back.bin");
    let o = forkd(home, &["cp", &remote, back.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "cp round trip differs"
    );
    // A missing file is an error that says so, and leaves no local file behind.
    let missing = dir.path().join("missing.bin");
    let o = forkd(
        home,
        &[
            "cp",
            &format!("{id}:/no/such/file"),
            missing.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success());
    assert!(!missing.exists());
    let o = forkd(home, &["cp", src.to_str().unwrap(), back.to_str().unwrap()]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("ID:/"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn the_cli_without_a_daemon_execs_and_copies_directly() {
    let home = home_with_tiny("fnod");
    let o = forkd(
        home.path(),
        &["fork", "--tag", "tiny", "-n", "1", "--keep", "--json"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = r["kept"][0].as_str().unwrap().to_string();
    cli_exec_and_cp(home.path(), &id);
    let o = forkd(home.path(), &["kill", "--all"]);
    assert!(o.status.success());
    assert!(qemu_pids_in(home.path()).is_empty());
}

#[test]
fn sigterm_stops_every_child_and_a_restart_after_kill_9_adopts_them() {
    let home = home_with_tiny("flife");
    let mut d = Daemon::start(home.path(), &[]);
    let c = d.client();
    let r = create(
        &c,
        json!({"image": "tiny", "count": 2, "labels": {"k": "v"}}),
    );
    assert_eq!(r["created"], 2, "{r:#}");
    let ids: Vec<String> = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["sandbox"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(qemu_pids_in(home.path()).len(), 2);
    // kill -9: the children survive; the next daemon adopts them with their labels.
    d.signal(libc::SIGKILL);
    d.wait(Duration::from_secs(10));
    assert_eq!(qemu_pids_in(home.path()).len(), 2);
    let mut d2 = Daemon::start(home.path(), &[]);
    let c = d2.client();
    let l: Value = c
        .json(Method::GET, "/v1/sandboxes?label=k%3Dv", None)
        .unwrap();
    let mut got: Vec<String> = l["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    assert_eq!(got, ids);
    let ran = run(&c, &ids[0], json!({"cmd": "echo adopted"}));
    assert_eq!(String::from_utf8_lossy(&ran.stdout), "adopted\n");
    // The CLI goes through the daemon (which holds the agent connections).
    let o = forkd(home.path(), &["ps", "--json"]);
    let ps: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ps.as_array().unwrap().len(), 2, "{ps:#}");
    cli_exec_and_cp(home.path(), &ids[0]);
    // SIGTERM: every child stops, the socket goes, exit 0.
    d2.signal(libc::SIGTERM);
    let st = d2.wait(Duration::from_secs(30));
    assert!(st.success(), "{st:?}");
    assert!(
        qemu_pids_in(home.path()).is_empty(),
        "children outlived the daemon"
    );
    assert!(!d2.socket().exists());
    let runs: Vec<_> = std::fs::read_dir(home.path().join("run"))
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(runs.is_empty(), "run directories left: {runs:?}");
}

#[test]
fn tls_on_tcp_serves_https_with_the_token() {
    assert!(
        which("openssl") && which("curl"),
        "this test needs openssl and curl: apt-get install openssl curl"
    );
    let dir = tempfile::Builder::new()
        .prefix("ftls")
        .tempdir_in("/tmp")
        .unwrap();
    let (cert, key, token) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("token"),
    );
    let o = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-days", "1", "-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(&token, "tls-token\n").unwrap();
    for f in [&key, &token] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _d = Daemon::start(
        dir.path(),
        &[
            "--listen",
            &addr,
            "--token-file",
            token.to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    wait_tcp(&addr);
    let curl = |scheme: &str, tok: Option<&str>| {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&cert)
            .args(["--resolve", &format!("localhost:{port}:127.0.0.1")]);
        if let Some(t) = tok {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        let o = cmd
            .arg(format!("{scheme}://localhost:{port}/v1/sandboxes"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(curl("https", Some("tls-token")), "200");
    assert_eq!(curl("https", None), "401");
    // Plain HTTP on the TLS port gets no answer.
    assert_eq!(curl("http", Some("tls-token")), "000");
    // A key others can read is refused before anything listens.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = forkd(
        dir.path(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            token.to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("chmod 600"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn children_of_a_fork_killed_mid_way_are_swept_by_the_next_forkd() {
    let home = home_with_tiny("fswp");
    let mut fork = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(["fork", "--tag", "tiny", "-n", "3", "--exec", "sleep 120"])
        .env("FORKD_HOME", home.path())
        .env("FORKD_ACCEL", "tcg")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while qemu_pids_in(home.path()).len() < 3 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the children did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // kill -9: nothing in forkd runs to stop its children. Its reaper (a watcher process that
    // sees forkd's end) kills the QEMUs it knew of; one caught between its spawn and being
    // registered would outlive it.
    fork.kill().unwrap();
    fork.wait().unwrap();
    // The next forkd that looks at the run directory finds whatever is left: its owner is dead.
    let o = forkd(home.path(), &["ps", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = Instant::now();
    while !qemu_pids_in(home.path()).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "orphaned QEMUs were not killed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let left: Vec<_> = std::fs::read_dir(home.path().join("run"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "run directories left: {left:?}");
}
