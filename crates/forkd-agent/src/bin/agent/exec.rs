//! `exec`: run a program with optional stdin, environment and timeout.

use forkd_agent::{ExecReply, ExecRequest};
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

pub fn run(req: &ExecRequest) -> Result<ExecReply, String> {
    let mut cmd = match (&req.argv, &req.shell) {
        (Some(argv), None) if !argv.is_empty() => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
        (None, Some(sh)) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(sh);
            c
        }
        _ => return Err("exec needs exactly one of `argv` (non-empty) or `shell`".into()),
    };
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", DEFAULT_PATH);
    }
    cmd.envs(&req.env);
    cmd.current_dir(req.cwd.as_deref().unwrap_or("/"));
    cmd.stdin(if req.stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("spawn failed: {e}"))?;
    if let (Some(data), Some(mut sin)) = (req.stdin.clone(), child.stdin.take()) {
        std::thread::spawn(move || {
            let _ = sin.write_all(data.as_bytes());
        });
    }
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    let timeout = Duration::from_millis(req.timeout_ms.unwrap_or(60_000));
    let mut nap = Duration::from_millis(1);
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if start.elapsed() >= timeout => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().map_err(|e| format!("wait failed: {e}"))?;
            }
            Ok(None) => {
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(10));
            }
            Err(e) => return Err(format!("wait failed: {e}")),
        }
    };
    let text = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
        h.and_then(|h| h.join().ok())
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    };
    Ok(ExecReply {
        exit_code: if timed_out { None } else { status.code() },
        signal: status.signal(),
        timed_out,
        stdout: text(out),
        stderr: text(err),
        duration_ms: start.elapsed().as_millis() as u64,
    })
}
