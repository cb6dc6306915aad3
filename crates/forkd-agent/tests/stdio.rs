//! The agent binary speaking its protocol on stdin/stdout (`--stdio`), on the host.

mod common;

use common::Agent;
use forkd_agent::{Op, PROTOCOL_VERSION, Reply};
use std::process::Command;

#[test]
fn exec_with_stdin_env_and_timeout() {
    let mut a = Agent::start();
    let r = a.call(Op::Exec(forkd_agent::ExecRequest {
        shell: Some("read x; echo \"$x-$FOO\"; echo oops >&2; exit 4".into()),
        stdin: Some("hello\n".into()),
        env: [("FOO".to_string(), "bar".to_string())].into(),
        ..Default::default()
    }));
    let Ok(Reply::Exec(x)) = r else {
        panic!("{r:?}")
    };
    assert_eq!(
        (x.exit_code, x.stdout.as_str(), x.stderr.as_str()),
        (Some(4), "hello-bar\n", "oops\n")
    );
    let r = a.call(Op::Exec(forkd_agent::ExecRequest {
        argv: Some(vec!["sleep".into(), "5".into()]),
        timeout_ms: Some(200),
        ..Default::default()
    }));
    let Ok(Reply::Exec(x)) = r else {
        panic!("{r:?}")
    };
    assert!(
        x.timed_out && x.exit_code.is_none() && x.duration_ms < 3000,
        "{x:?}"
    );
    let e = a
        .call(Op::Exec(forkd_agent::ExecRequest::default()))
        .unwrap_err();
    assert!(e.contains("exactly one of"), "{e}");
}

#[test]
fn bad_requests_get_errors_and_the_agent_keeps_serving() {
    let mut a = Agent::start();
    let r = a.raw("this is not json");
    assert!(!r.ok && r.error.unwrap().contains("bad request"));
    let r = a.raw(r#"{"v":99,"id":5,"op":"hello"}"#);
    assert_eq!(r.id, 5);
    assert!(r.error.unwrap().contains("protocol version 99"));
    let Ok(Reply::Hello(h)) = a.call(Op::Hello) else {
        panic!()
    };
    assert_eq!(h.protocol, PROTOCOL_VERSION);
    assert!(!h.warm);
}

#[test]
fn python_warm_worker_keeps_state_between_runs() {
    assert!(
        Command::new("python3")
            .arg("-c")
            .arg("pass")
            .status()
            .map(|s| s.success())
            .unwrap_or(false),
        "this test needs python3 (apt-get install python3-minimal)"
    );
    let mut a = Agent::start();
    let r = a.call(Op::Warm(forkd_agent::WarmRequest {
        kind: Some("python".into()),
        argv: None,
        preload: Some("import json\nstate = [1]\nprint('loaded')".into()),
    }));
    let Ok(Reply::Warm(w)) = r else {
        panic!("{r:?}")
    };
    assert_eq!(w.preload_output, "loaded\n");
    let run = |a: &mut Agent, code: &str| match a.call(Op::Run(forkd_agent::RunRequest {
        code: code.into(),
        timeout_ms: Some(10_000),
    })) {
        Ok(Reply::Run(r)) => r.output,
        other => panic!("{other:?}"),
    };
    assert_eq!(run(&mut a, "state.append(2)"), "");
    assert_eq!(run(&mut a, "json.dumps(state)"), "'[1, 2]'\n");
    assert!(run(&mut a, "1/0").contains("ZeroDivisionError"));
    let Ok(Reply::Hello(h)) = a.call(Op::Hello) else {
        panic!()
    };
    assert!(h.warm);
}

#[test]
fn run_without_a_worker_is_an_error() {
    let mut a = Agent::start();
    let e = a
        .call(Op::Run(forkd_agent::RunRequest {
            code: "1".into(),
            timeout_ms: None,
        }))
        .unwrap_err();
    assert!(e.contains("no warm worker"), "{e}");
}
