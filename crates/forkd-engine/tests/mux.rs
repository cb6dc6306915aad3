//! The multiplexing agent client against a real `forkd-agent --stdio` (built by
//! `cargo build -p forkd-agent`) and against fake agents on a socket pair.

use forkd_agent::{ErrorCode, ExecRequest, Op, Reply};
use forkd_engine::mux::{AgentClient, AgentError, ExecEvent};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Tests run one at a time: the memory test measures this process's RSS.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The agent binary: $FORKD_AGENT_BIN, else target/<profile>/forkd-agent next to this test.
fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FORKD_AGENT_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("forkd-agent");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p forkd-agent` first (or set FORKD_AGENT_BIN)",
        bin.display()
    );
    bin
}

/// A real agent on stdin/stdout and a client for it.
struct Real {
    child: Child,
    client: AgentClient,
}

impl Real {
    fn start() -> Real {
        let mut child = Command::new(agent_bin())
            .arg("--stdio")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let r = child.stdout.take().unwrap();
        let w = child.stdin.take().unwrap();
        let client = AgentClient::from_io(Box::new(r), Box::new(w)).unwrap();
        let h = client.hello().unwrap();
        assert!(
            h.has(forkd_agent::feature::CONCURRENT) && h.has(forkd_agent::feature::FILES),
            "{} is an old build ({:?}): run `cargo build -p forkd-agent`",
            agent_bin().display(),
            h.features
        );
        Real { child, client }
    }
}

impl Drop for Real {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn shell(s: &str) -> ExecRequest {
    ExecRequest {
        shell: Some(s.into()),
        timeout_ms: Some(30_000),
        ..Default::default()
    }
}

#[test]
fn concurrent_calls_from_8_threads_get_their_own_answers() {
    let _s = serial();
    let real = Real::start();
    let t = Instant::now();
    std::thread::scope(|scope| {
        for th in 0..8 {
            let c = real.client.clone();
            scope.spawn(move || {
                for i in 0..12 {
                    let token = format!("t{th}-i{i}");
                    let delay = (th * 7 + i * 3) % 10;
                    let x = c
                        .exec(shell(&format!("sleep 0.0{delay}; printf {token}")))
                        .unwrap();
                    assert_eq!(x.stdout, token);
                    let h = c.hello().unwrap();
                    assert_eq!(h.protocol, forkd_agent::PROTOCOL_VERSION);
                    let r = c.call(Op::FileStat { path: "/".into() }, Duration::from_secs(30));
                    assert!(matches!(r, Ok(Reply::FileStat { .. })), "{r:?}");
                }
            });
        }
    });
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert!(!real.client.is_closed());
}

#[test]
fn exec_stream_gives_exact_binary_output_and_signals_reach_it() {
    let _s = serial();
    let real = Real::start();
    let c = &real.client;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x");
    let mut s = c
        .exec_stream(shell(&format!(
            "head -c 1000000 /dev/urandom | tee {}; printf '\\000\\377' >&2",
            file.display()
        )))
        .unwrap();
    let (mut out, mut err, mut started) = (Vec::new(), Vec::new(), false);
    let exit = loop {
        match s.next(Duration::from_secs(30)) {
            Some(ExecEvent::Started { pid }) => {
                started = pid > 0;
                assert_eq!(s.pid(), Some(pid));
            }
            Some(ExecEvent::Stdout(d)) => out.extend(d),
            Some(ExecEvent::Stderr(d)) => err.extend(d),
            Some(ExecEvent::Exit(x)) => break x,
            Some(ExecEvent::Failed(e)) => panic!("{e}"),
            None => panic!("ended without an exit"),
        }
    };
    assert!(s.next(Duration::from_secs(1)).is_none());
    assert!(started);
    assert_eq!(exit.exit_code, Some(0));
    assert_eq!(out.len(), 1_000_000);
    assert_eq!(
        Sha256::digest(&out),
        Sha256::digest(std::fs::read(&file).unwrap())
    );
    assert_eq!(err, [0u8, 255]);

    // exec() with `stream` collects the events.
    let x = c
        .exec(ExecRequest {
            stream: true,
            ..shell("echo out; echo err >&2; exit 5")
        })
        .unwrap();
    assert_eq!(
        (x.exit_code, x.stdout.as_str(), x.stderr.as_str()),
        (Some(5), "out\n", "err\n")
    );

    // A signal to a running streamed command.
    let mut s = c.exec_stream(shell("sleep 30")).unwrap();
    let Some(ExecEvent::Started { pid }) = s.next(Duration::from_secs(10)) else {
        panic!("no start")
    };
    // Nothing else comes meanwhile: a timeout is not the end of the stream.
    assert!(matches!(
        s.next(Duration::from_millis(200)),
        Some(ExecEvent::Failed(AgentError::Timeout(_)))
    ));
    c.signal(pid, 15).unwrap();
    let Some(ExecEvent::Exit(x)) = s.next(Duration::from_secs(10)) else {
        panic!("no exit after the signal")
    };
    assert_eq!((x.exit_code, x.signal), (None, Some(15)));
    let e = c.signal(pid, 15).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
}

/// A reader that fails after `ok` bytes.
struct Failing {
    left: usize,
}

impl Read for Failing {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other("source broke"));
        }
        let n = buf.len().min(self.left);
        buf[..n].fill(7);
        self.left -= n;
        Ok(n)
    }
}

#[test]
fn files_round_trip_and_failed_uploads_leave_nothing() {
    let _s = serial();
    let real = Real::start();
    let c = &real.client;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_string_lossy().into_owned();
    c.mkdir(&format!("{d}/sub/deeper"), true).unwrap();
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 777u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let path = format!("{d}/sub/deeper/blob");
    let n = c
        .write_file(&path, Some(0o640), &mut std::io::Cursor::new(&data))
        .unwrap();
    assert_eq!(n, data.len() as u64);
    let mut back = Vec::new();
    let got = c
        .read_file(&path, &mut |piece| {
            back.extend_from_slice(piece);
            Ok(())
        })
        .unwrap();
    assert_eq!(got, data.len() as u64);
    assert_eq!(Sha256::digest(&back), Sha256::digest(&data));
    let st = c.stat(&path).unwrap();
    assert_eq!((st.size, st.mode), (data.len() as u64, 0o640));
    let l = c.list(&format!("{d}/sub/deeper")).unwrap();
    assert_eq!(l.entries.len(), 1);
    assert!(!l.truncated);

    // A source that fails half way: the upload is aborted, no file and no temp file.
    let broken = format!("{d}/broken");
    let e = c
        .write_file(
            &broken,
            None,
            &mut Failing {
                left: 1024 * 1024 + 5,
            },
        )
        .unwrap_err();
    assert!(matches!(e, AgentError::Io(_)), "{e}");
    let names: Vec<_> = c
        .list(&d)
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["sub"]);
    // Guest errors are typed.
    let e = c
        .write_file("relative/x", None, &mut &b"x"[..])
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
    let e = c
        .read_file(&format!("{d}/missing"), &mut |_| Ok(()))
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
    c.remove(&format!("{d}/sub"), true).unwrap();
    assert!(c.list(&d).unwrap().entries.is_empty());
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn a_hostile_giant_line_is_refused_without_growing_memory() {
    let _s = serial();
    let (host, mut guest) = UnixStream::pair().unwrap();
    let client = AgentClient::from_stream(host).unwrap();
    let before = rss_kib();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    // The guest sends one line of 1 GiB (or until the host hangs up).
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'a'; 1 << 20];
        let _ = guest.write_all(br#"{"v":1,"id":1,"ok":true,"reply":""#);
        let mut sent = 0u64;
        for _ in 0..1024 {
            if guest.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len() as u64;
        }
        sent
    });
    let p = peak.clone();
    let sampler = std::thread::spawn(move || {
        for _ in 0..200 {
            p.fetch_max(rss_kib(), std::sync::atomic::Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let e = client.call(Op::Hello, Duration::from_secs(60)).unwrap_err();
    assert!(matches!(e, AgentError::Protocol(_)), "{e}");
    assert!(client.is_closed());
    let e = client.hello().unwrap_err();
    assert!(matches!(e, AgentError::Protocol(_)), "{e}");
    let sent = writer.join().unwrap();
    sampler.join().unwrap();
    let peak = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .max(rss_kib());
    assert!(
        sent < 1 << 30,
        "the host read the whole line ({sent} bytes)"
    );
    assert!(
        peak < before + 64 * 1024,
        "RSS grew from {before} KiB to {peak} KiB"
    );
}

/// A fake agent that reads requests and answers none of them.
fn silent_agent(mut guest: UnixStream) -> std::thread::JoinHandle<Vec<u64>> {
    std::thread::spawn(move || {
        let mut ids = Vec::new();
        let mut r = BufReader::new(guest.try_clone().unwrap());
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let id = v["id"].as_u64().unwrap();
            ids.push(id);
            line.clear();
            // Frames nobody waits for are dropped: a stray answer and an event for another id.
            let _ = writeln!(
                guest,
                r#"{{"v":1,"id":{},"ok":true,"reply":{{"kind":"signal"}}}}"#,
                id + 1000
            );
            let _ = writeln!(
                guest,
                r#"{{"v":1,"id":{},"ok":true,"event":{{"kind":"started","pid":1}}}}"#,
                id + 2000
            );
            let _ = writeln!(guest, "garbage that is not json");
            if ids.len() == 4 {
                // Every waiter is now waiting: hang up.
                let _ = guest.shutdown(std::net::Shutdown::Both);
                break;
            }
        }
        ids
    })
}

#[test]
fn a_closed_connection_wakes_every_waiter() {
    let _s = serial();
    let (host, guest) = UnixStream::pair().unwrap();
    let client = AgentClient::from_stream(host).unwrap();
    let fake = silent_agent(guest);
    let t = Instant::now();
    let results: Vec<_> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let c = client.clone();
                scope.spawn(move || c.call(Op::Hello, Duration::from_secs(60)))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in results {
        assert!(matches!(r, Err(AgentError::Closed)), "{r:?}");
    }
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let ids = fake.join().unwrap();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 4, "ids not unique: {ids:?}");
    assert!(client.is_closed());
    assert!(matches!(client.hello(), Err(AgentError::Closed)));
}

#[test]
fn timeouts_and_interrupts_are_typed() {
    let _s = serial();
    let (host, guest) = UnixStream::pair().unwrap();
    let mut client = AgentClient::from_stream(host).unwrap();
    let fake = silent_agent(guest);
    let e = client
        .call(Op::Hello, Duration::from_millis(200))
        .unwrap_err();
    assert!(
        matches!(e, AgentError::Timeout(_)) && e.is_transient(),
        "{e}"
    );
    let intr = forkd_engine::Interrupt::never();
    client.set_interrupt(intr.clone());
    let setter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        intr.set();
    });
    let t = Instant::now();
    let e = client.call(Op::Hello, Duration::from_secs(60)).unwrap_err();
    assert!(matches!(e, AgentError::Interrupted), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5));
    setter.join().unwrap();
    client.close();
    assert!(client.is_closed());
    drop(client);
    let _ = fake.join();
}
