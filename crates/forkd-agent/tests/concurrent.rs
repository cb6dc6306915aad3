//! Many requests at once on one agent: out-of-order answers, streamed exec, signals, the
//! in-flight cap, feature and error-code reporting.

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::Agent;
use forkd_agent::{ErrorCode, Event, ExecRequest, Frame, Op, Reply, SignalRequest};
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn shell(s: &str) -> ExecRequest {
    ExecRequest {
        shell: Some(s.into()),
        timeout_ms: Some(30_000),
        ..Default::default()
    }
}

fn streamed(s: &str) -> Op {
    Op::Exec(ExecRequest {
        stream: true,
        ..shell(s)
    })
}

#[test]
fn a_slow_exec_does_not_block_a_hello() {
    let mut a = Agent::start();
    let t = Instant::now();
    let slow = a.send(Op::Exec(shell("sleep 1; echo slow")));
    let hello = a.send(Op::Hello);
    let first = a.recv();
    assert_eq!(first.id, hello, "{first:?}");
    assert!(
        t.elapsed() < Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    let Some(Reply::Hello(h)) = first.reply else {
        panic!("{first:?}")
    };
    for f in forkd_agent::feature::ALL {
        assert!(h.has(f), "{f} missing from {:?}", h.features);
    }
    let second = a.recv();
    assert_eq!(second.id, slow);
    let Some(Reply::Exec(x)) = second.reply else {
        panic!("{second:?}")
    };
    assert_eq!(x.stdout, "slow\n");
}

#[test]
fn concurrent_execs_get_their_own_answers() {
    let mut a = Agent::start();
    let mut want = HashMap::new();
    let t = Instant::now();
    for i in 0..24u32 {
        // Later requests finish first.
        let delay = f64::from(24 - i) * 0.02;
        let id = a.send(Op::Exec(shell(&format!(
            "sleep {delay}; echo out-{i}; echo err-{i} >&2"
        ))));
        want.insert(id, i);
    }
    let mut order = Vec::new();
    while !want.is_empty() {
        let r = a.recv();
        let i = want
            .remove(&r.id)
            .unwrap_or_else(|| panic!("unexpected {r:?}"));
        let Some(Reply::Exec(x)) = r.reply else {
            panic!("{r:?}")
        };
        assert_eq!(x.stdout, format!("out-{i}\n"));
        assert_eq!(x.stderr, format!("err-{i}\n"));
        order.push(i);
    }
    // Run in parallel (serially this takes 6 s) and answered out of order.
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_ne!(order, (0..24).collect::<Vec<_>>());
}

#[test]
fn requests_beyond_the_in_flight_cap_are_busy() {
    let mut a = Agent::start();
    let n = forkd_agent::MAX_IN_FLIGHT + 6;
    for _ in 0..n {
        a.send(Op::Exec(shell("sleep 1")));
    }
    let mut busy = 0;
    for _ in 0..n {
        let r = a.recv();
        if !r.ok {
            assert_eq!(r.code, Some(ErrorCode::Busy), "{r:?}");
            busy += 1;
        }
    }
    assert_eq!(busy, 6);
    // Once they finish, it serves again.
    assert!(matches!(a.call(Op::Hello), Ok(Reply::Hello(_))));
}

/// Collect a streamed exec: (started pid, stdout, stderr, final reply, largest chunk).
fn collect(a: &mut Agent, id: u64) -> (u32, Vec<u8>, Vec<u8>, forkd_agent::ExecReply, usize) {
    let (mut pid, mut out, mut err, mut biggest) = (0, Vec::new(), Vec::new(), 0);
    loop {
        let r = a.recv();
        assert_eq!(r.id, id);
        match r.into_frame() {
            Frame::Event(Event::Started { pid: p }) => {
                assert_eq!(pid, 0, "started twice");
                pid = p;
            }
            Frame::Event(Event::Stdout { data }) => {
                assert_ne!(pid, 0, "output before started");
                let d = B64.decode(data).unwrap();
                biggest = biggest.max(d.len());
                out.extend(d);
            }
            Frame::Event(Event::Stderr { data }) => {
                let d = B64.decode(data).unwrap();
                biggest = biggest.max(d.len());
                err.extend(d);
            }
            Frame::Done(Ok(Reply::Exec(x))) => return (pid, out, err, x, biggest),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn streamed_exec_output_is_exact_binary() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x");
    let mut a = Agent::start();
    let script = format!(
        "head -c 300000 /dev/urandom | tee {f}; printf '\\377\\000\\200' >&2; exit 3",
        f = file.display()
    );
    let id = a.send(streamed(&script));
    let (pid, out, err, x, biggest) = collect(&mut a, id);
    assert!(pid > 0);
    assert_eq!(out, std::fs::read(&file).unwrap());
    assert_eq!(out.len(), 300_000);
    assert_eq!(err, b"\xff\x00\x80");
    assert!(biggest <= forkd_agent::STREAM_CHUNK, "{biggest}");
    assert_eq!(x.exit_code, Some(3));
    assert!(x.stdout.is_empty() && x.stderr.is_empty(), "{x:?}");

    // All 256 byte values through binary stdin and back.
    let all: Vec<u8> = (0..=255u8).collect();
    let id = a.send(Op::Exec(ExecRequest {
        stream: true,
        stdin_b64: Some(B64.encode(&all)),
        ..shell("cat")
    }));
    let (_, out, _, x, _) = collect(&mut a, id);
    assert_eq!(out, all);
    assert_eq!(x.exit_code, Some(0));
    // Both kinds of stdin at once is a bad request.
    let e = a
        .call_code(Op::Exec(ExecRequest {
            stdin: Some("a".into()),
            stdin_b64: Some("YQ==".into()),
            ..shell("cat")
        }))
        .unwrap_err();
    assert_eq!(e.0, ErrorCode::BadRequest, "{e:?}");
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s[s.rfind(')').unwrap() + 1..].trim_start().starts_with('Z'))
        .unwrap_or(false)
}

#[test]
fn signal_reaches_the_whole_command_group() {
    let mut a = Agent::start();
    let id = a.send(streamed("sleep 30 & echo $!; sleep 30; echo never"));
    let started = a.recv();
    let Some(Event::Started { pid }) = started.event else {
        panic!("{started:?}")
    };
    let line = a.recv();
    let Some(Event::Stdout { data }) = line.event else {
        panic!("{line:?}")
    };
    let bg: u32 = String::from_utf8(B64.decode(data).unwrap())
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(bg));
    // A pid that is not a running exec's command is refused.
    let sig = a.send(Op::Signal(SignalRequest {
        pid: bg,
        signal: 15,
    }));
    let r = a.recv();
    assert_eq!((r.id, r.code), (sig, Some(ErrorCode::NotFound)), "{r:?}");
    let t = Instant::now();
    let sig = a.send(Op::Signal(SignalRequest { pid, signal: 15 }));
    let mut got_signal_reply = false;
    let x = loop {
        let r = a.recv();
        if r.id == sig {
            assert!(matches!(r.reply, Some(Reply::Signal)), "{r:?}");
            got_signal_reply = true;
            continue;
        }
        assert_eq!(r.id, id);
        match r.into_frame() {
            Frame::Done(Ok(Reply::Exec(x))) => break x,
            Frame::Event(e) => panic!("unexpected {e:?}"),
            other => panic!("{other:?}"),
        }
    };
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!((x.exit_code, x.signal), (None, Some(15)), "{x:?}");
    if !got_signal_reply {
        assert!(matches!(a.recv().reply, Some(Reply::Signal)));
    }
    let end = Instant::now() + Duration::from_secs(5);
    while alive(bg) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !alive(bg),
        "background process {bg} survived the group signal"
    );
    // Once the exec is over its pid is no longer signalable.
    let e = a
        .call_code(Op::Signal(SignalRequest { pid, signal: 9 }))
        .unwrap_err();
    assert_eq!(e.0, ErrorCode::NotFound);
}

#[test]
fn unknown_ops_are_unsupported_and_errors_carry_codes() {
    let mut a = Agent::start();
    let r = a.raw(r#"{"v":1,"id":4,"op":"teleport"}"#);
    assert_eq!((r.id, r.code), (4, Some(ErrorCode::Unsupported)), "{r:?}");
    let r = a.raw(r#"{"v":1,"id":5,"op":"exec","shell":7}"#);
    assert_eq!((r.id, r.code), (5, Some(ErrorCode::BadRequest)), "{r:?}");
    let e = a
        .call_code(Op::Exec(ExecRequest {
            argv: Some(vec!["/no/such/program".into()]),
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(e.0, ErrorCode::NotFound, "{e:?}");
    let e = a
        .call_code(Op::Run(forkd_agent::RunRequest {
            code: "1".into(),
            timeout_ms: None,
        }))
        .unwrap_err();
    assert_eq!(e.0, ErrorCode::NotFound, "{e:?}");
}

#[test]
fn a_stream_whose_host_is_gone_kills_its_command() {
    use std::io::{BufRead, BufReader, Write};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_forkd-agent"))
        .arg("--stdio")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let req = forkd_agent::Request {
        v: forkd_agent::PROTOCOL_VERSION,
        id: 1,
        op: streamed("yes"),
    };
    stdin.write_all(&forkd_agent::encode_line(&req)).unwrap();
    stdin.flush().unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let r: forkd_agent::Response = serde_json::from_str(&line).unwrap();
    let Some(Event::Started { pid }) = r.event else {
        panic!("{r:?}")
    };
    // The host stops reading: the agent's writes block (bounded memory), `yes` keeps running.
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(pid));
    let rss = |p: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{p}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    let before = rss(child.id());
    std::thread::sleep(Duration::from_millis(500));
    assert!(rss(child.id()) < before + 8 * 1024, "agent memory grows");
    // The host goes away: the agent's next write fails and it kills the command's group.
    drop(out);
    let end = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(pid), "`yes` survived its host");
    drop(stdin);
    let _ = child.wait();
}
