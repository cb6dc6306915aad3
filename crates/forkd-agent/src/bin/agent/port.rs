//! The virtio-serial port: find it by name, read request lines, survive host disconnects.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

/// How long to wait before reading again after EOF (host not connected).
const EOF_BACKOFF: Duration = Duration::from_millis(20);

pub struct Port {
    file: File,
    path: PathBuf,
    buf: Vec<u8>,
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
    pub fn open_forever() -> Port {
        let mut warned = false;
        loop {
            if let Some(path) = find() {
                match OpenOptions::new().read(true).write(true).open(&path) {
                    Ok(file) => {
                        eprintln!("forkd-agent: listening on {}", path.display());
                        return Port {
                            file,
                            path,
                            buf: Vec::new(),
                        };
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

    fn reopen(&mut self) {
        std::thread::sleep(EOF_BACKOFF);
        if let Ok(f) = OpenOptions::new().read(true).write(true).open(&self.path) {
            self.file = f;
        }
    }

    /// The next complete line (without the newline). A partial line cut off by a host
    /// disconnect is dropped: it belonged to a connection that is gone.
    pub fn read_line(&mut self) -> Vec<u8> {
        let mut chunk = [0u8; 64 * 1024];
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
                return line;
            }
            match self.file.read(&mut chunk) {
                Ok(0) => {
                    // Host not connected (e.g. a child just restored). Wait, then read again.
                    self.buf.clear();
                    std::thread::sleep(EOF_BACKOFF);
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    if self.buf.len() > forkd_agent::MAX_LINE + 1 && !self.buf.contains(&b'\n') {
                        // Oversized line: hand it up so it gets an error answer.
                        return std::mem::take(&mut self.buf);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.reopen(),
            }
        }
    }

    /// Write a response; if the host went away, the answer is lost (the host will ask again).
    pub fn write_line(&mut self, data: &[u8]) {
        if self.file.write_all(data).is_err() {
            self.reopen();
        }
    }
}
