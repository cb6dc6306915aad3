//! The virtio-serial port: find it by name, read request lines, survive host disconnects.
//!
//! One thread reads ([`PortReader`]) while request threads write ([`PortWriter`], under the
//! agent's writer lock); both use the port's current descriptor, which a failed read or write
//! replaces by reopening the device.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long to wait before reading again after EOF (host not connected), when no SIGIO
/// (host connected / data arrived) comes first.
const EOF_BACKOFF: Duration = Duration::from_millis(5000);
/// Pause before reopening after a read error.
const ERR_BACKOFF: Duration = Duration::from_millis(20);

/// Ask the kernel to raise SIGIO on this port when the host connects or data arrives
/// (virtio_console signals both), and block SIGIO so it is only collected by `sigtimedwait`.
/// An idle agent then sleeps instead of polling: with a hundred idle children under TCG,
/// polling every few milliseconds would eat the host's CPUs.
fn arm_sigio(file: &File) {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: plain fcntl/sigprocmask calls on a descriptor we own and on a sigset_t we
    // initialise with sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGIO);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::fcntl(fd, libc::F_SETOWN, libc::getpid());
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_ASYNC);
    }
}

/// Sleep until SIGIO arrives or `max` passes.
fn wait_sigio(max: Duration) {
    let ts = libc::timespec {
        tv_sec: max.as_secs() as libc::time_t,
        tv_nsec: max.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` is initialised by sigemptyset/sigaddset; `ts` outlives the call; a null
    // siginfo pointer is allowed.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGIO);
        libc::sigtimedwait(&set, std::ptr::null_mut(), &ts);
    }
}

/// The open port; reader and writer share it.
pub struct Port {
    path: PathBuf,
    file: Mutex<Arc<File>>,
}

/// What the reader saw.
pub enum Incoming {
    /// One complete request line (without the newline).
    Line(Vec<u8>),
    /// EOF: no host is connected (it went away, or a restored child has none yet).
    Disconnected,
}

/// Find the port's device node: the udev symlink if present, else scan sysfs for the name.
fn find() -> Option<PathBuf> {
    let link = PathBuf::from(format!("/dev/virtio-ports/{}", forkd_agent::PORT_NAME));
    if link.exists() {
        return Some(link);
    }
    for entry in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == forkd_agent::PORT_NAME {
            let dev = PathBuf::from("/dev").join(entry.file_name());
            if dev.exists() {
                return Some(dev);
            }
        }
    }
    None
}

impl Port {
    /// Open the port, waiting (forever) until it appears.
    pub fn open_forever() -> Arc<Port> {
        let mut warned = false;
        loop {
            if let Some(path) = find() {
                match OpenOptions::new().read(true).write(true).open(&path) {
                    Ok(file) => {
                        arm_sigio(&file);
                        eprintln!("forkd-agent: listening on {}", path.display());
                        return Arc::new(Port {
                            path,
                            file: Mutex::new(Arc::new(file)),
                        });
                    }
                    Err(e) if !warned => {
                        eprintln!("forkd-agent: open {}: {e}", path.display());
                        warned = true;
                    }
                    Err(_) => {}
                }
            } else if !warned {
                eprintln!("forkd-agent: waiting for port {}", forkd_agent::PORT_NAME);
                warned = true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn current(&self) -> Arc<File> {
        crate::lock(&self.file).clone()
    }

    /// Reopen the device after `failed` returned an error, unless another thread already did.
    fn reopen(&self, failed: &Arc<File>) {
        std::thread::sleep(ERR_BACKOFF);
        let mut cur = crate::lock(&self.file);
        if !Arc::ptr_eq(&cur, failed) {
            return;
        }
        if let Ok(f) = OpenOptions::new().read(true).write(true).open(&self.path) {
            arm_sigio(&f);
            *cur = Arc::new(f);
        }
    }

    pub fn reader(self: &Arc<Port>) -> PortReader {
        PortReader {
            port: self.clone(),
            buf: Vec::new(),
            idle: false,
        }
    }

    pub fn writer(self: &Arc<Port>) -> PortWriter {
        PortWriter { port: self.clone() }
    }
}

pub struct PortReader {
    port: Arc<Port>,
    buf: Vec<u8>,
    /// The last read saw EOF: wait for the host before reading again.
    idle: bool,
}

impl PortReader {
    /// The next complete line (without the newline), or [`Incoming::Disconnected`] on EOF
    /// (after waiting a while for the host to come back). A partial line cut off by a host
    /// disconnect is dropped: it belonged to a connection that is gone.
    pub fn read_line(&mut self) -> Incoming {
        if std::mem::take(&mut self.idle) {
            wait_sigio(EOF_BACKOFF);
        }
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.is_empty() {
                    continue;
                }
                return Incoming::Line(line);
            }
            let file = self.port.current();
            match (&*file).read(&mut chunk) {
                Ok(0) => {
                    // Host not connected (e.g. a child just restored): report it at once,
                    // then wait (on the next call) and read again.
                    self.buf.clear();
                    self.idle = true;
                    return Incoming::Disconnected;
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    if self.buf.len() > forkd_agent::MAX_LINE + 1 && !self.buf.contains(&b'\n') {
                        // Oversized line: hand it up so it gets an error answer.
                        return Incoming::Line(std::mem::take(&mut self.buf));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.port.reopen(&file),
            }
        }
    }
}

/// Writes go to the port's current descriptor; a failed write reopens it (the answer is lost:
/// the host that asked is gone).
pub struct PortWriter {
    port: Arc<Port>,
}

impl Write for PortWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let file = self.port.current();
        let r = (&*file).write(data);
        if r.is_err() {
            self.port.reopen(&file);
        }
        r
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
