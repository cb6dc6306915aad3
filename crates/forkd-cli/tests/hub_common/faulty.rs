//! A tiny HTTP/1.1 server over a real hub directory that misbehaves on purpose: it can cut data
//! blobs halfway, corrupt them, refuse with a status, or stop serving after N bytes. It counts
//! the data-blob bytes it sends.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Normal,
    /// Send the headers of every data blob, half of its body, then close the connection.
    CutBlobs,
    /// Serve normally until this many data-blob bytes went out, then cut every data blob.
    CutAfter(u64),
    /// Flip one byte in the middle of every data blob.
    WrongBytes,
    /// Answer every request with this status.
    Status(u16),
    /// Wait this many milliseconds before sending each data blob.
    Slow(u64),
}

pub struct Faulty {
    pub url: String,
    pub mode: Arc<Mutex<Mode>>,
    pub blob_bytes: Arc<AtomicU64>,
    /// GET requests for data blobs (whole or a range).
    pub blob_requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Faulty {
    pub fn start(root: &Path, mode: Mode) -> Faulty {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let mode = Arc::new(Mutex::new(mode));
        let blob_bytes = Arc::new(AtomicU64::new(0));
        let blob_requests = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (root, m, b, r, s) = (
            root.to_path_buf(),
            mode.clone(),
            blob_bytes.clone(),
            blob_requests.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (root, m, b, r) = (root.clone(), m.clone(), b.clone(), r.clone());
                std::thread::spawn(move || {
                    let _ = handle(conn, &root, &m, &b, &r);
                });
            }
        });
        Faulty {
            url,
            mode,
            blob_bytes,
            blob_requests,
            stop,
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn bytes(&self) -> u64 {
        self.blob_bytes.load(Ordering::SeqCst)
    }
}

impl Drop for Faulty {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.url.trim_start_matches("http://").trim_end_matches('/'));
    }
}

fn handle(
    mut conn: TcpStream,
    root: &Path,
    mode: &Mutex<Mode>,
    counter: &AtomicU64,
    requests: &AtomicU64,
) -> std::io::Result<()> {
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&req).into_owned();
    let mut first = text.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (
        first.next().unwrap_or_default(),
        first.next().unwrap_or("/"),
    );
    let mode = *mode.lock().unwrap();
    if let Mode::Status(code) = mode {
        let body = format!("status {code}\n");
        write!(
            conn,
            "HTTP/1.1 {code} Test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    }
    let rel = path.trim_start_matches('/');
    let file: PathBuf = root.join(rel);
    let data = match (rel.contains(".."), std::fs::read(&file)) {
        (false, Ok(d)) => d,
        _ => {
            write!(
                conn,
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            return Ok(());
        }
    };
    // Image manifests (plain JSON, or the zstd frame of it that forkd pushes) are documents;
    // every other blob (packs of chunks, chunks of their own) is data.
    let is_data_blob = rel.starts_with("blobs/") && !super::is_manifest(&data);
    // One byte range, `bytes=A-B` (what forkd asks for packs of chunks): 206 with the slice.
    let range = text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        let (a, b) = v.trim().strip_prefix("bytes=")?.split_once('-')?;
        let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
        (k.eq_ignore_ascii_case("range") && a <= b && b < data.len()).then_some((a, b))
    });
    let data = match range {
        Some((a, b)) => {
            write!(
                conn,
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/{}\r\nConnection: close\r\n\r\n",
                b + 1 - a,
                data.len()
            )?;
            data[a..=b].to_vec()
        }
        None => {
            write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                data.len()
            )?;
            data
        }
    };
    if method == "HEAD" {
        return Ok(());
    }
    if is_data_blob {
        requests.fetch_add(1, Ordering::SeqCst);
    }
    if !is_data_blob {
        return conn.write_all(&data);
    }
    let cut = match mode {
        Mode::CutBlobs => true,
        Mode::CutAfter(n) => counter.load(Ordering::SeqCst) >= n,
        _ => false,
    };
    if cut {
        let half = &data[..data.len() / 2];
        counter.fetch_add(half.len() as u64, Ordering::SeqCst);
        conn.write_all(half)?;
        conn.flush()?;
        let _ = conn.shutdown(std::net::Shutdown::Both);
        return Ok(());
    }
    if let Mode::Slow(ms) = mode {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    let mut data = data;
    if mode == Mode::WrongBytes {
        let mid = data.len() / 2;
        data[mid] ^= 0xff;
    }
    counter.fetch_add(data.len() as u64, Ordering::SeqCst);
    conn.write_all(&data)
}
