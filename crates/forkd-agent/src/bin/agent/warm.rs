//! The warm worker: a long-lived child process (a shell, or Python with modules imported) that
//! the parent starts before the snapshot, so every fork runs code in an already-warm process.
//!
//! Worker protocol on the worker's stdin/stdout: each message is a decimal byte count, a
//! newline, then that many bytes. The agent sends code; the worker answers with its output.

use crate::{Failure, Res};
use forkd_agent::{ErrorCode, RunReply, RunRequest, WarmReply, WarmRequest};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

/// Built-in POSIX sh worker: state (variables, functions, cwd) persists between runs.
const SH_WORKER: &str = r#"while IFS= read -r n; do
  code=$(head -c "$n")
  eval "$code" >/tmp/.forkd-worker.out 2>&1 </dev/null
  printf '%s\n' "$(wc -c </tmp/.forkd-worker.out)"
  cat /tmp/.forkd-worker.out
done"#;

/// Built-in Python worker: one shared globals dict; expressions print their repr.
const PY_WORKER: &str = r#"import sys, io, contextlib, traceback
g = {"__name__": "__forkd__"}
i, o = sys.stdin.buffer, sys.stdout.buffer
while True:
    line = i.readline()
    if not line:
        break
    code = i.read(int(line)).decode("utf-8", "replace")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            try:
                c = compile(code, "<forkd>", "eval")
            except SyntaxError:
                exec(compile(code, "<forkd>", "exec"), g)
            else:
                r = eval(c, g)
                if r is not None:
                    print(repr(r))
        except BaseException:
            traceback.print_exc()
    data = buf.getvalue().encode()
    o.write(b"%d\n" % len(data) + data)
    o.flush()
"#;

pub struct Worker {
    pid: u32,
    /// Its exit status comes from the reaper (nothing else in the agent calls `wait`).
    watch: crate::reaper::Watch,
    stdin: ChildStdin,
    frames: Receiver<Vec<u8>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.watch.kill();
        self.watch.wait();
    }
}

fn spawn(req: &WarmRequest) -> Res<Worker> {
    let mut cmd = match (req.kind.as_deref(), &req.argv) {
        (Some("sh"), None) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(SH_WORKER);
            c
        }
        (Some("python"), None) => {
            let mut c = Command::new("python3");
            c.arg("-u").arg("-c").arg(PY_WORKER);
            c
        }
        (None, Some(argv)) if !argv.is_empty() => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
        _ => {
            return Err(Failure::bad(
                "warm needs `kind` (\"sh\" or \"python\") or a non-empty `argv`",
            ));
        }
    };
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", crate::exec::DEFAULT_PATH);
    }
    cmd.current_dir("/");
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let (mut child, watch) =
        crate::reaper::spawn(&mut cmd).map_err(|e| Failure::io("starting worker", &e))?;
    let stdin = child
        .stdin
        .take()
        .ok_or_else(|| Failure::from("worker has no stdin"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Failure::from("worker has no stdout"))?;
    let (tx, frames) = channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        loop {
            let mut header = String::new();
            if r.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let Ok(n) = header.trim().parse::<usize>() else {
                return;
            };
            let mut body = vec![0u8; n];
            if r.read_exact(&mut body).is_err() || tx.send(body).is_err() {
                return;
            }
        }
    });
    Ok(Worker {
        pid: child.id(),
        watch,
        stdin,
        frames,
    })
}

fn send(w: &mut Worker, code: &str, timeout: Duration) -> Res<String> {
    let mut msg = format!("{}\n", code.len()).into_bytes();
    msg.extend_from_slice(code.as_bytes());
    w.stdin
        .write_all(&msg)
        .and_then(|_| w.stdin.flush())
        .map_err(|e| Failure::io("worker gone", &e))?;
    match w.frames.recv_timeout(timeout) {
        Ok(body) => Ok(String::from_utf8_lossy(&body).into_owned()),
        Err(RecvTimeoutError::Timeout) => Err(Failure::new(
            ErrorCode::Timeout,
            format!("worker did not answer within {timeout:?}"),
        )),
        Err(RecvTimeoutError::Disconnected) => Err("worker exited".into()),
    }
}

pub fn start(req: &WarmRequest, slot: &mut Option<Worker>) -> Res<WarmReply> {
    *slot = None; // stop any previous worker first
    let mut w = spawn(req)?;
    let preload_output = match &req.preload {
        Some(code) => send(&mut w, code, Duration::from_secs(600))?,
        None => String::new(),
    };
    let pid = w.pid;
    *slot = Some(w);
    Ok(WarmReply {
        pid,
        preload_output,
    })
}

pub fn run(req: &RunRequest, slot: &mut Option<Worker>) -> Res<RunReply> {
    let w = slot.as_mut().ok_or_else(|| {
        Failure::new(
            ErrorCode::NotFound,
            "no warm worker: send a `warm` request first",
        )
    })?;
    let start = Instant::now();
    let timeout = Duration::from_millis(req.timeout_ms.unwrap_or(60_000));
    match send(w, &req.code, timeout) {
        Ok(output) => Ok(RunReply {
            output,
            duration_ms: start.elapsed().as_millis() as u64,
        }),
        Err(e) => {
            *slot = None; // a stuck or dead worker is not reusable
            Err(e)
        }
    }
}
