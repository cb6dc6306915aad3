//! A multiplexing client for the guest agent: one connection, many concurrent operations.
//!
//! [`AgentClient`] is cheap to clone and safe to use from many threads. Each request gets an
//! id; one reader thread reads every response line and hands it to the caller waiting for
//! that id. Each waiter has a small bounded channel, so a caller that stops reading a stream
//! ([`ExecStream`]) stalls the reader (and, through the guest's blocked writes, the command)
//! instead of making the host buffer without bound. Consume streams promptly, or drop them.
//!
//! Lines from the agent are capped ([`MAX_FRAME`]): a longer line (a broken or hostile guest)
//! closes the connection with [`AgentError::Protocol`] without growing host memory.
//!
//! [`crate::agent::AgentConn`] (the engine's per-child connection) is a thin wrapper over this.

pub use crate::error::AgentError;
use crate::util::Interrupt;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use forkd_agent::{
    ErrorCode, Event, ExecReply, ExecRequest, FileEntry, Frame, HelloReply, IdentityReply,
    IdentityRequest, MAX_EXEC_OUTPUT, MAX_FILE_CHUNK, MAX_LINE, Op, PROTOCOL_VERSION, Reply,
    Request, Response, RunReply, RunRequest, WarmReply, WarmRequest, encode_line,
};
use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Longest line accepted from the agent: its own limit plus room for the envelope.
pub const MAX_FRAME: usize = MAX_LINE + 64 * 1024;

/// Line buffer capacity the reader keeps between lines.
const LINE_KEEP: usize = 256 * 1024;

/// Frames queued per streaming waiter before the reader thread waits for its consumer.
const STREAM_QUEUE: usize = 16;

/// How often a wait looks at the interrupt flag.
const INTERRUPT_POLL: Duration = Duration::from_millis(100);

/// How long a request line may take to write before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default wait for small requests.
const SHORT: Duration = Duration::from_secs(60);

/// Wait for one file piece (1 MiB through a slow virtio-serial link).
const PIECE: Duration = Duration::from_secs(120);

fn unexpected(r: &Reply) -> AgentError {
    let s = format!("{r:?}");
    AgentError::Protocol(format!(
        "unexpected reply {}",
        s.chars().take(200).collect::<String>()
    ))
}

/// Why a connection closed; later calls and waiters get the matching error.
#[derive(Debug, Clone)]
enum Closure {
    Closed,
    Protocol(String),
}

impl Closure {
    fn error(&self) -> AgentError {
        match self {
            Closure::Closed => AgentError::Closed,
            Closure::Protocol(m) => AgentError::Protocol(m.clone()),
        }
    }
}

type Delivery = Frame;

#[derive(Default)]
struct Table {
    waiters: HashMap<u64, SyncSender<Delivery>>,
    closed: Option<Closure>,
}

/// State shared by the clients and the reader thread.
#[derive(Default)]
struct Shared {
    table: Mutex<Table>,
    /// The socket, shut down on close (ends the reader thread and the peer's writes).
    socket: Option<UnixStream>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Mark the connection closed and wake every waiter (their senders are dropped).
    fn close(&self, why: Closure) {
        let waiters = {
            let mut t = lock(&self.table);
            if t.closed.is_none() {
                t.closed = Some(why);
            }
            std::mem::take(&mut t.waiters)
        };
        drop(waiters);
        if let Some(s) = &self.socket {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn closure(&self) -> Option<Closure> {
        lock(&self.table).closed.clone()
    }
}

struct Inner {
    shared: Arc<Shared>,
    writer: Mutex<Box<dyn Write + Send>>,
    next_id: AtomicU64,
}

impl Drop for Inner {
    /// The last client is gone: close the connection (ends the reader thread).
    fn drop(&mut self) {
        self.shared.close(Closure::Closed);
    }
}

/// A random first request id for a new connection. The agent may still answer a request of
/// an earlier connection (a timed-out `exec`, say) on this one; ids that differ between
/// connections keep such answers from matching a waiter.
fn first_id() -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    crate::util::fill_random(&mut b)?;
    // Below 2^53 (exact in any JSON reader) and far from overflow when incremented.
    Ok((u64::from_le_bytes(b) & ((1 << 53) - 1)).max(1))
}

/// The reader thread: dispatch frames by id until the connection ends.
fn read_frames(shared: Arc<Shared>, r: Box<dyn Read + Send>) {
    let mut r = BufReader::with_capacity(256 * 1024, r);
    let mut line = Vec::new();
    let why = loop {
        line.clear();
        match crate::util::read_line_capped(&mut r, &mut line, MAX_FRAME) {
            Ok(true) => {}
            Ok(false) => break Closure::Closed,
            Err(m) => {
                tracing::warn!("agent connection: {m}");
                break Closure::Protocol(m);
            }
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() {
            continue;
        }
        let resp: Response = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(
                    "agent: skipping an unreadable line ({e}): {:?}",
                    String::from_utf8_lossy(&line[..line.len().min(200)])
                );
                continue;
            }
        };
        let id = resp.id;
        let frame = resp.into_frame();
        let last = matches!(frame, Frame::Done(_));
        let tx = {
            let mut t = lock(&shared.table);
            if last {
                t.waiters.remove(&id)
            } else {
                t.waiters.get(&id).cloned()
            }
        };
        let Some(tx) = tx else {
            tracing::debug!("agent: dropping a frame for request {id}, which nobody awaits");
            continue;
        };
        // Blocks while the waiter's queue is full: backpressure.
        if tx.send(frame).is_err() {
            lock(&shared.table).waiters.remove(&id);
        }
        if line.capacity() > LINE_KEEP {
            // Do not hold on to a big line's buffer for the life of the connection.
            line = Vec::with_capacity(LINE_KEEP);
        }
    };
    shared.close(why);
}

/// One request in flight: its id and where its frames arrive. Dropping it stops delivery.
struct Pending {
    inner: Arc<Inner>,
    id: u64,
    rx: Receiver<Delivery>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        lock(&self.inner.shared.table).waiters.remove(&self.id);
    }
}

enum Wait {
    Frame(Frame),
    Timeout,
}

/// A client for one agent connection. Clones share the connection.
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
    interrupt: Option<Interrupt>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl AgentClient {
    /// Connect to an agent socket (QEMU's chardev for the VM's `forkd.agent` port).
    pub fn connect(sock: &Path) -> Result<AgentClient, AgentError> {
        AgentClient::from_stream(UnixStream::connect(sock)?)
    }

    /// A client on a connected socket; closing the client shuts the socket down.
    pub fn from_stream(s: UnixStream) -> Result<AgentClient, AgentError> {
        s.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let r = s.try_clone()?;
        let w = s.try_clone()?;
        AgentClient::start(Box::new(r), Box::new(w), Some(s))
    }

    /// A client over any pair of byte streams (e.g. `forkd-agent --stdio`'s stdout and stdin).
    /// The reader thread runs until `r` reaches EOF or fails.
    pub fn from_io(
        r: Box<dyn Read + Send>,
        w: Box<dyn Write + Send>,
    ) -> Result<AgentClient, AgentError> {
        AgentClient::start(r, w, None)
    }

    fn start(
        r: Box<dyn Read + Send>,
        w: Box<dyn Write + Send>,
        socket: Option<UnixStream>,
    ) -> Result<AgentClient, AgentError> {
        let shared = Arc::new(Shared {
            table: Mutex::default(),
            socket,
        });
        let inner = Arc::new(Inner {
            shared: shared.clone(),
            writer: Mutex::new(w),
            next_id: AtomicU64::new(first_id()?),
        });
        std::thread::Builder::new()
            .name("agent-mux".into())
            .spawn(move || read_frames(shared, r))?;
        Ok(AgentClient {
            inner,
            interrupt: None,
        })
    }

    /// Make this client's waits give up with [`AgentError::Interrupted`] once `interrupt`
    /// is set (clones made afterwards inherit it; earlier clones do not).
    pub fn set_interrupt(&mut self, interrupt: Interrupt) {
        self.interrupt = Some(interrupt);
    }

    /// Whether the connection has closed (every call now fails).
    pub fn is_closed(&self) -> bool {
        self.inner.shared.closure().is_some()
    }

    /// Close the connection now: every waiter gets [`AgentError::Closed`]. (With
    /// [`AgentClient::from_io`], the writer is closed; the reader thread ends at the peer's EOF.)
    pub fn close(&self) {
        self.inner.shared.close(Closure::Closed);
        *lock(&self.inner.writer) = Box::new(std::io::sink());
    }

    /// Register a waiter and send the request.
    fn send(&self, op: Op, queue: usize) -> Result<Pending, AgentError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = sync_channel(queue);
        {
            let mut t = lock(&self.inner.shared.table);
            if let Some(c) = &t.closed {
                return Err(c.error());
            }
            t.waiters.insert(id, tx);
        }
        let pending = Pending {
            inner: self.inner.clone(),
            id,
            rx,
        };
        let line = encode_line(&Request {
            v: PROTOCOL_VERSION,
            id,
            op,
        });
        let mut w = lock(&self.inner.writer);
        if let Some(c) = self.inner.shared.closure() {
            return Err(c.error());
        }
        if let Err(e) = w.write_all(&line).and_then(|_| w.flush()) {
            // Part of the line may have gone out: the stream is unusable from here on.
            drop(w);
            self.inner.shared.close(Closure::Closed);
            return Err(AgentError::Io(e));
        }
        Ok(pending)
    }

    /// Wait up to `max` for the next frame of `p`.
    fn wait(&self, p: &Pending, max: Duration) -> Result<Wait, AgentError> {
        let deadline = Instant::now() + max;
        loop {
            if self.interrupt.as_ref().is_some_and(Interrupt::is_set) {
                return Err(AgentError::Interrupted);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let slice = match &self.interrupt {
                Some(_) => left.min(INTERRUPT_POLL),
                None => left,
            };
            match p.rx.recv_timeout(slice) {
                Ok(f) => return Ok(Wait::Frame(f)),
                Err(RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                    return Ok(Wait::Timeout);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self
                        .inner
                        .shared
                        .closure()
                        .unwrap_or(Closure::Closed)
                        .error());
                }
            }
        }
    }

    /// Send one request and wait up to `timeout` for its final answer (events, if any, are
    /// skipped). Safe to call from many threads at once.
    pub fn call(&self, op: Op, timeout: Duration) -> Result<Reply, AgentError> {
        let p = self.send(op, 1)?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.wait(&p, left)? {
                Wait::Timeout => return Err(AgentError::Timeout(timeout)),
                Wait::Frame(Frame::Event(_)) => continue,
                Wait::Frame(Frame::Done(r)) => return r.map_err(AgentError::from),
            }
        }
    }

    pub fn hello(&self) -> Result<HelloReply, AgentError> {
        match self.call(Op::Hello, SHORT)? {
            Reply::Hello(h) => Ok(h),
            r => Err(unexpected(&r)),
        }
    }

    /// Start a command whose output arrives as events (`stream` is set on `req`).
    pub fn exec_stream(&self, mut req: ExecRequest) -> Result<ExecStream, AgentError> {
        req.stream = true;
        let pending = self.send(Op::Exec(req), STREAM_QUEUE)?;
        Ok(ExecStream {
            client: self.clone(),
            pending: Some(pending),
            pid: None,
        })
    }

    /// Run a command and wait for it (its `timeout_ms` plus 10 s). With `req.stream` set, the
    /// output is collected from events (binary-safe on the wire; converted to text here, up to
    /// [`MAX_EXEC_OUTPUT`] bytes per stream).
    pub fn exec(&self, req: ExecRequest) -> Result<ExecReply, AgentError> {
        let limit = Duration::from_millis(req.timeout_ms.unwrap_or(60_000)) + SHORT / 6;
        if !req.stream {
            return match self.call(Op::Exec(req), limit)? {
                Reply::Exec(x) => Ok(x),
                r => Err(unexpected(&r)),
            };
        }
        let mut s = self.exec_stream(req)?;
        let deadline = Instant::now() + limit;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut truncated = false;
        let mut keep = |buf: &mut Vec<u8>, data: Vec<u8>| {
            let room = MAX_EXEC_OUTPUT.saturating_sub(buf.len());
            truncated |= data.len() > room;
            buf.extend_from_slice(&data[..data.len().min(room)]);
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AgentError::Timeout(limit));
            }
            match s.next(left) {
                None => return Err(AgentError::Protocol("exec stream ended early".into())),
                Some(ExecEvent::Started { .. }) => {}
                Some(ExecEvent::Stdout(d)) => keep(&mut out, d),
                Some(ExecEvent::Stderr(d)) => keep(&mut err, d),
                Some(ExecEvent::Exit(mut x)) => {
                    x.stdout = String::from_utf8_lossy(&out).into_owned();
                    x.stderr = String::from_utf8_lossy(&err).into_owned();
                    x.truncated |= truncated;
                    return Ok(x);
                }
                Some(ExecEvent::Failed(AgentError::Timeout(_))) => {
                    return Err(AgentError::Timeout(limit));
                }
                Some(ExecEvent::Failed(e)) => return Err(e),
            }
        }
    }

    /// A shell command line (`/bin/sh -c`), killed after `timeout`.
    pub fn shell(&self, cmd: &str, timeout: Duration) -> Result<ExecReply, AgentError> {
        self.exec(ExecRequest {
            shell: Some(cmd.to_string()),
            timeout_ms: Some(timeout.as_millis() as u64),
            ..Default::default()
        })
    }

    /// Send `signal` to the process group of a running exec's command (`pid` from
    /// [`ExecEvent::Started`]).
    pub fn signal(&self, pid: u32, signal: i32) -> Result<(), AgentError> {
        match self.call(
            Op::Signal(forkd_agent::SignalRequest { pid, signal }),
            SHORT,
        )? {
            Reply::Signal => Ok(()),
            r => Err(unexpected(&r)),
        }
    }

    pub fn identity(&self, req: IdentityRequest) -> Result<IdentityReply, AgentError> {
        match self.call(Op::Identity(req), Duration::from_secs(120))? {
            Reply::Identity(x) => Ok(x),
            r => Err(unexpected(&r)),
        }
    }

    pub fn warm(&self, req: WarmRequest) -> Result<WarmReply, AgentError> {
        match self.call(Op::Warm(req), Duration::from_secs(900))? {
            Reply::Warm(x) => Ok(x),
            r => Err(unexpected(&r)),
        }
    }

    /// Run code in the warm worker. The agent gives up after `timeout` (error code
    /// `timeout`); the host waits 10 s longer.
    pub fn run(&self, code: &str, timeout: Duration) -> Result<RunReply, AgentError> {
        let req = RunRequest {
            code: code.to_string(),
            timeout_ms: Some(timeout.as_millis() as u64),
        };
        match self.call(Op::Run(req), timeout + SHORT / 6)? {
            Reply::Run(x) => Ok(x),
            r => Err(unexpected(&r)),
        }
    }

    /// Upload `src` to `path` (absolute) in pieces of [`MAX_FILE_CHUNK`] bytes, through a
    /// temporary file that is renamed over `path` at the end. On any error (including one
    /// reading `src`) the upload is aborted and nothing changes at `path`. Returns the size.
    pub fn write_file(
        &self,
        path: &str,
        mode: Option<u32>,
        src: &mut dyn Read,
    ) -> Result<u64, AgentError> {
        let open = Op::FileOpenWrite {
            path: path.to_string(),
            mode,
        };
        let handle = match self.call(open, SHORT)? {
            Reply::FileHandle { handle } => handle,
            r => return Err(unexpected(&r)),
        };
        match self.upload(handle, src) {
            Ok(size) => Ok(size),
            Err(e) => {
                let abort = Op::FileCloseWrite {
                    handle,
                    commit: false,
                };
                if let Err(a) = self.call(abort, SHORT) {
                    tracing::debug!("agent: aborting upload {handle}: {a}");
                }
                Err(e)
            }
        }
    }

    fn upload(&self, handle: u64, src: &mut dyn Read) -> Result<u64, AgentError> {
        let mut buf = vec![0u8; MAX_FILE_CHUNK];
        loop {
            let mut n = 0;
            while n < buf.len() {
                match src.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(AgentError::Io(e)),
                }
            }
            if n == 0 {
                break;
            }
            let data = B64.encode(&buf[..n]);
            match self.call(Op::FileWrite { handle, data }, PIECE)? {
                Reply::FileWritten { .. } => {}
                r => return Err(unexpected(&r)),
            }
            if n < buf.len() {
                break;
            }
        }
        match self.call(
            Op::FileCloseWrite {
                handle,
                commit: true,
            },
            PIECE,
        )? {
            Reply::FileClosed { size, .. } => Ok(size),
            r => Err(unexpected(&r)),
        }
    }

    /// Download `path` (absolute), handing each piece to `sink`. Returns the bytes read.
    pub fn read_file(
        &self,
        path: &str,
        sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<u64, AgentError> {
        let mut offset = 0u64;
        loop {
            let op = Op::FileRead {
                path: path.to_string(),
                offset,
                len: MAX_FILE_CHUNK as u64,
            };
            let (data, eof) = match self.call(op, PIECE)? {
                Reply::FileData { data, eof, .. } => (data, eof),
                r => return Err(unexpected(&r)),
            };
            let bytes = B64
                .decode(data)
                .map_err(|e| AgentError::Protocol(format!("file_data is not base64: {e}")))?;
            if bytes.len() > MAX_FILE_CHUNK {
                return Err(AgentError::Protocol(format!(
                    "file_data of {} bytes (asked for at most {MAX_FILE_CHUNK})",
                    bytes.len()
                )));
            }
            sink(&bytes)?;
            offset += bytes.len() as u64;
            if eof || bytes.is_empty() {
                return Ok(offset);
            }
        }
    }

    /// The entries of directory `path` (symlinks not followed).
    pub fn list(&self, path: &str) -> Result<Listing, AgentError> {
        match self.call(
            Op::FileList {
                path: path.to_string(),
            },
            PIECE,
        )? {
            Reply::FileList { entries, truncated } => Ok(Listing { entries, truncated }),
            r => Err(unexpected(&r)),
        }
    }

    /// Metadata of `path` (symlinks not followed).
    pub fn stat(&self, path: &str) -> Result<FileEntry, AgentError> {
        match self.call(
            Op::FileStat {
                path: path.to_string(),
            },
            SHORT,
        )? {
            Reply::FileStat { entry } => Ok(entry),
            r => Err(unexpected(&r)),
        }
    }

    pub fn mkdir(&self, path: &str, parents: bool) -> Result<(), AgentError> {
        self.done(Op::Mkdir {
            path: path.to_string(),
            parents,
        })
    }

    pub fn remove(&self, path: &str, recursive: bool) -> Result<(), AgentError> {
        self.done(Op::Remove {
            path: path.to_string(),
            recursive,
        })
    }

    fn done(&self, op: Op) -> Result<(), AgentError> {
        match self.call(op, PIECE)? {
            Reply::Done => Ok(()),
            r => Err(unexpected(&r)),
        }
    }
}

/// A directory listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Listing {
    pub entries: Vec<FileEntry>,
    /// The directory has more entries than the agent returns at once.
    pub truncated: bool,
}

/// What a streamed exec reports.
#[derive(Debug)]
pub enum ExecEvent {
    /// The command runs as `pid` (also its process group, for [`AgentClient::signal`]).
    Started {
        pid: u32,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The command finished (stdout/stderr of the reply are empty). The last event.
    Exit(ExecReply),
    /// The exec failed. The last event, except for [`AgentError::Timeout`]: that only says
    /// nothing came within the wait given to [`ExecStream::next`].
    Failed(AgentError),
}

/// The events of one streamed exec, in order. Dropping it stops delivery (the command keeps
/// running in the guest unless signalled).
pub struct ExecStream {
    client: AgentClient,
    pending: Option<Pending>,
    pid: Option<u32>,
}

impl ExecStream {
    /// The next event, waiting up to `timeout`; `None` after the last one.
    pub fn next(&mut self, timeout: Duration) -> Option<ExecEvent> {
        let p = self.pending.as_ref()?;
        let ev = match self.client.wait(p, timeout) {
            Ok(Wait::Timeout) => return Some(ExecEvent::Failed(AgentError::Timeout(timeout))),
            Ok(Wait::Frame(Frame::Event(Event::Started { pid }))) => {
                self.pid = Some(pid);
                return Some(ExecEvent::Started { pid });
            }
            Ok(Wait::Frame(Frame::Event(Event::Stdout { data }))) => match B64.decode(data) {
                Ok(d) => return Some(ExecEvent::Stdout(d)),
                Err(e) => ExecEvent::Failed(AgentError::Protocol(format!("stdout event: {e}"))),
            },
            Ok(Wait::Frame(Frame::Event(Event::Stderr { data }))) => match B64.decode(data) {
                Ok(d) => return Some(ExecEvent::Stderr(d)),
                Err(e) => ExecEvent::Failed(AgentError::Protocol(format!("stderr event: {e}"))),
            },
            Ok(Wait::Frame(Frame::Done(Ok(Reply::Exec(x))))) => ExecEvent::Exit(x),
            Ok(Wait::Frame(Frame::Done(Ok(r)))) => ExecEvent::Failed(unexpected(&r)),
            Ok(Wait::Frame(Frame::Done(Err(e)))) => ExecEvent::Failed(e.into()),
            Err(e) => ExecEvent::Failed(e),
        };
        self.pending = None; // terminal
        Some(ev)
    }

    /// The command's pid, once [`ExecEvent::Started`] has been seen.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Signal the command's process group (needs the `Started` event first).
    pub fn signal(&self, signal: i32) -> Result<(), AgentError> {
        let pid = self.pid.ok_or_else(|| AgentError::Guest {
            code: ErrorCode::NotFound,
            message: "the command has not started yet".into(),
        })?;
        self.client.signal(pid, signal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::read_line_capped;

    #[test]
    fn client_is_clone_send_sync() {
        fn check<T: Clone + Send + Sync + 'static>() {}
        check::<AgentClient>();
        fn send<T: Send + 'static>() {}
        send::<ExecStream>();
        send::<AgentError>();
    }

    #[test]
    fn lines_are_capped_and_split() {
        let data = b"one\r\ntwo\nthree-is-too-long\nx".to_vec();
        let mut r = BufReader::with_capacity(4, &data[..]);
        let mut line = Vec::new();
        assert_eq!(read_line_capped(&mut r, &mut line, 8), Ok(true));
        assert_eq!(line, b"one\r");
        line.clear();
        assert_eq!(read_line_capped(&mut r, &mut line, 8), Ok(true));
        assert_eq!(line, b"two");
        line.clear();
        assert!(read_line_capped(&mut r, &mut line, 8).is_err());
        assert!(line.len() <= 8);
        // A partial last line is dropped at EOF.
        let mut r = BufReader::new(&b"partial"[..]);
        line.clear();
        assert_eq!(read_line_capped(&mut r, &mut line, 100), Ok(false));
    }

    #[test]
    fn transient_errors() {
        assert!(AgentError::Timeout(Duration::from_secs(1)).is_transient());
        assert!(AgentError::Closed.is_transient());
        let busy = AgentError::Guest {
            code: ErrorCode::Busy,
            message: "busy".into(),
        };
        assert!(busy.is_transient());
        assert_eq!(busy.code(), Some(ErrorCode::Busy));
        let nf = AgentError::Guest {
            code: ErrorCode::NotFound,
            message: "x".into(),
        };
        assert!(!nf.is_transient());
        assert!(!AgentError::Protocol("x".into()).is_transient());
    }
}
