//! forkd-agent: the guest side of forkd. Runs inside the VM (often as PID 1 after the initramfs
//! hands over), listens on the virtio-serial port `forkd.agent`, and answers newline-delimited
//! JSON requests (see docs/AGENT-PROTOCOL.md).
//!
//! It must survive being snapshotted and restored into many children: when the host side of the
//! port is not connected, reads return EOF; the agent then waits and reads again, forever.
//!
//! One reader thread reads request lines; each request is handled on its own thread (at most
//! [`MAX_IN_FLIGHT`]), and responses are written whole, one line at a time, under one lock, so
//! they may come out of order (the host correlates them by `id`).

mod exec;
mod files;
mod identity;
mod net;
mod port;
mod reaper;
mod tcpreset;
mod warm;
mod zerofree;

use forkd_agent::{
    ErrorCode, Event, HelloReply, MAX_IN_FLIGHT, MAX_LINE, Op, PROTOCOL_VERSION, Reply, Request,
    Response, encode_line,
};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Why a request failed: a code for the host to act on and a message for people.
#[derive(Debug)]
pub struct Failure {
    pub code: ErrorCode,
    pub msg: String,
}

impl Failure {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Failure {
        Failure {
            code,
            msg: msg.into(),
        }
    }
    /// An I/O error, coded by its errno, with what was being done.
    pub fn io(what: impl std::fmt::Display, e: &std::io::Error) -> Failure {
        Failure::new(ErrorCode::from_io(e), format!("{what}: {e}"))
    }
    pub fn bad(msg: impl Into<String>) -> Failure {
        Failure::new(ErrorCode::BadRequest, msg)
    }
}

impl From<String> for Failure {
    fn from(msg: String) -> Failure {
        Failure::new(ErrorCode::Other, msg)
    }
}

impl From<&str> for Failure {
    fn from(msg: &str) -> Failure {
        Failure::new(ErrorCode::Other, msg)
    }
}

pub type Res<T> = Result<T, Failure>;

/// Lock a mutex, ignoring poisoning (a panicked handler must not wedge the agent).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where responses go: one line at a time, under one lock.
struct Out {
    w: Mutex<Box<dyn Write + Send>>,
    /// Bumped when the host disconnects; answers to an earlier connection's requests are
    /// dropped instead of reaching the next host.
    generation: AtomicU64,
}

impl Out {
    /// Write one response line for a request of connection `generation`. False when that
    /// connection is gone (or the write failed): the caller should stop producing output.
    fn send(&self, generation: u64, resp: &Response) -> bool {
        let mut line = encode_line(resp);
        if line.len() > MAX_LINE {
            line = encode_line(&Response::err_code(
                resp.id,
                ErrorCode::Other,
                format!(
                    "response of {} bytes exceeds the {MAX_LINE}-byte line limit",
                    line.len()
                ),
            ));
        }
        let mut w = lock(&self.w);
        if self.generation.load(Ordering::SeqCst) != generation {
            return false;
        }
        w.write_all(&line).and_then(|_| w.flush()).is_ok()
    }
}

/// Everything the agent shares between requests.
pub struct Agent {
    instance: Mutex<Option<String>>,
    /// `warm` and `run` take this lock, so they run one at a time.
    worker: Mutex<Option<warm::Worker>>,
    /// Whether a worker runs (readable without waiting for a `run` in progress).
    warm: AtomicBool,
    pub uploads: files::Uploads,
    pub running: exec::Running,
    out: Out,
    in_flight: Mutex<usize>,
    idle: Condvar,
}

impl Agent {
    fn new(w: Box<dyn Write + Send>) -> Arc<Agent> {
        Arc::new(Agent {
            instance: Mutex::new(None),
            worker: Mutex::new(None),
            warm: AtomicBool::new(false),
            uploads: files::Uploads::default(),
            running: exec::Running::default(),
            out: Out {
                w: Mutex::new(w),
                generation: AtomicU64::new(0),
            },
            in_flight: Mutex::new(0),
            idle: Condvar::new(),
        })
    }

    fn generation(&self) -> u64 {
        self.out.generation.load(Ordering::SeqCst)
    }

    /// The host went away: answers still being produced are dropped, uploads are aborted.
    fn disconnected(&self) {
        // Not under the writer lock: a write blocked on the gone host must not stall the reader.
        self.out.generation.fetch_add(1, Ordering::SeqCst);
        self.uploads.abort_all();
    }

    fn wait_idle(&self) {
        let mut n = lock(&self.in_flight);
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Read one request line and start handling it (on its own thread).
    fn dispatch(self: &Arc<Agent>, line: &[u8]) {
        let generation = self.generation();
        let req = match parse(line) {
            Ok(r) => r,
            Err(resp) => {
                self.out.send(generation, &resp);
                return;
            }
        };
        let id = req.id;
        {
            let mut n = lock(&self.in_flight);
            if *n >= MAX_IN_FLIGHT {
                drop(n);
                self.out.send(
                    generation,
                    &Response::err_code(
                        id,
                        ErrorCode::Busy,
                        format!("{MAX_IN_FLIGHT} requests in flight; try again"),
                    ),
                );
                return;
            }
            *n += 1;
        }
        let agent = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("req-{id}"))
            .spawn(move || {
                let resp = agent.handle(req, generation);
                agent.out.send(generation, &resp);
                let mut n = lock(&agent.in_flight);
                *n -= 1;
                agent.idle.notify_all();
            });
        if let Err(e) = spawned {
            let mut n = lock(&self.in_flight);
            *n -= 1;
            drop(n);
            self.out.send(
                generation,
                &Response::err_code(id, ErrorCode::Busy, format!("cannot start a thread: {e}")),
            );
        }
    }

    fn handle(&self, req: Request, generation: u64) -> Response {
        let id = req.id;
        let emit = |ev: Event| self.out.send(generation, &Response::event(id, ev));
        let result: Res<Reply> = match req.op {
            Op::Hello => Ok(Reply::Hello(self.hello())),
            Op::Exec(x) => exec::run(&x, &self.running, &emit).map(Reply::Exec),
            Op::Identity(x) => {
                if let Some(i) = &x.instance {
                    *lock(&self.instance) = Some(i.clone());
                }
                identity::apply(&x)
                    .map(Reply::Identity)
                    .map_err(Failure::from)
            }
            Op::Warm(x) => {
                let mut w = lock(&self.worker);
                let r = warm::start(&x, &mut w);
                self.warm.store(w.is_some(), Ordering::SeqCst);
                r.map(Reply::Warm)
            }
            Op::Run(x) => {
                let mut w = lock(&self.worker);
                let r = warm::run(&x, &mut w);
                self.warm.store(w.is_some(), Ordering::SeqCst);
                r.map(Reply::Run)
            }
            Op::Signal(x) => self.running.signal(x.pid, x.signal).map(|()| Reply::Signal),
            Op::FileOpenWrite { path, mode } => self
                .uploads
                .open(&path, mode)
                .map(|handle| Reply::FileHandle { handle }),
            Op::FileWrite { handle, data } => self
                .uploads
                .write(handle, &data)
                .map(|size| Reply::FileWritten { size }),
            Op::FileCloseWrite { handle, commit } => self
                .uploads
                .close(handle, commit)
                .map(|(path, size)| Reply::FileClosed { path, size }),
            Op::FileRead { path, offset, len } => files::read(&path, offset, len),
            Op::FileList { path } => files::list(&path),
            Op::FileStat { path } => files::stat(&path).map(|entry| Reply::FileStat { entry }),
            Op::Mkdir { path, parents } => files::mkdir(&path, parents).map(|()| Reply::Done),
            Op::Remove { path, recursive } => files::remove(&path, recursive).map(|()| Reply::Done),
            Op::ZeroFree => zerofree::run().map(|zeroed| Reply::ZeroFree { zeroed }),
        };
        match result {
            Ok(reply) => Response::ok(id, reply),
            Err(f) => Response::err_code(id, f.code, f.msg),
        }
    }

    fn hello(&self) -> HelloReply {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let uptime_s = read("/proc/uptime")
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0);
        HelloReply {
            agent_version: forkd_agent::AGENT_VERSION.to_string(),
            protocol: PROTOCOL_VERSION,
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            hostname: read("/proc/sys/kernel/hostname"),
            uptime_s,
            instance: lock(&self.instance).clone(),
            warm: self.warm.load(Ordering::SeqCst),
            features: forkd_agent::feature::ALL
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--version") {
        println!(
            "forkd-agent {} (protocol {PROTOCOL_VERSION})",
            forkd_agent::AGENT_VERSION
        );
        return;
    }
    // Before any other thread starts: reap every child (we may be PID 1), see reaper.rs.
    reaper::init();
    // `forkd-agent --stdio` serves one session on stdin/stdout (for testing on a host).
    if args.get(1).map(String::as_str) == Some("--stdio") {
        let agent = Agent::new(Box::new(std::io::stdout()));
        let stdin = std::io::stdin();
        let mut line = Vec::new();
        loop {
            line.clear();
            match std::io::BufRead::read_until(&mut stdin.lock(), b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            while matches!(line.last(), Some(b'\n' | b'\r')) {
                line.pop();
            }
            if !line.is_empty() {
                agent.dispatch(&line);
            }
        }
        // The host closed its end: abort uploads, finish what is running, then exit.
        agent.uploads.abort_all();
        agent.wait_idle();
        return;
    }
    eprintln!(
        "forkd-agent {} starting (pid {})",
        forkd_agent::AGENT_VERSION,
        std::process::id()
    );
    net::prepare();
    let port = port::Port::open_forever();
    let agent = Agent::new(Box::new(port.writer()));
    let mut reader = port.reader();
    loop {
        match reader.read_line() {
            port::Incoming::Line(line) => agent.dispatch(&line),
            port::Incoming::Disconnected => agent.disconnected(),
        }
    }
}

/// Parse one request line, or the error response for it.
fn parse(line: &[u8]) -> Result<Request, Box<Response>> {
    if line.len() > MAX_LINE {
        return Err(Box::new(Response::err_code(
            0,
            ErrorCode::BadRequest,
            format!("request longer than {MAX_LINE} bytes"),
        )));
    }
    let req: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            // Try to recover the id so the host can correlate the error.
            let v = serde_json::from_slice::<serde_json::Value>(line).ok();
            let id = v
                .as_ref()
                .and_then(|v| v.get("id").and_then(|i| i.as_u64()))
                .unwrap_or(0);
            // An op this agent does not know (a newer host) is `unsupported`, not malformed.
            let op = v
                .as_ref()
                .and_then(|v| v.get("op").and_then(|o| o.as_str()));
            let code = match op {
                Some(op) if !forkd_agent::OPS.contains(&op) => ErrorCode::Unsupported,
                _ => ErrorCode::BadRequest,
            };
            return Err(Box::new(Response::err_code(
                id,
                code,
                format!("bad request: {e}"),
            )));
        }
    };
    if req.v != PROTOCOL_VERSION {
        return Err(Box::new(Response::err_code(
            req.id,
            ErrorCode::Unsupported,
            format!(
                "protocol version {} not supported (agent speaks {PROTOCOL_VERSION})",
                req.v
            ),
        )));
    }
    Ok(req)
}
