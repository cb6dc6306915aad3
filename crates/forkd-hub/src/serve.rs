//! `forkd hub serve`: an HTTP server over a hub directory, built to face the open internet.
//!
//! - Reads are anonymous (GET/HEAD, with single byte ranges). Every path is opened beneath the
//!   root one segment at a time with `O_NOFOLLOW`, so a symlink planted in the root is never
//!   followed.
//! - Writes (PUT) need the bearer token, go only to keys of the layout (docs/HUB-LAYOUT.md), are
//!   capped in size, and land atomically: the body streams into a temp file inside the root and
//!   is renamed into place after its check (a blob must hash to its path; tag files, the
//!   catalogue and forkd-hub.json must be valid documents). `--read-only` refuses every write.
//! - Each connection has a header/idle timeout and a stall timeout (a read or write that makes
//!   no progress), uploads have a minimum rate, and the number of connections is capped: a
//!   connection beyond the cap waits for a slot, which idle ones free within the header timeout.

use crate::layout::LayoutKey;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use rustix::fs::{Mode, OFlags};
use sha2::{Digest, Sha256};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Where the hub serves its resources up to, and how long it waits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, including the wait for the next request
    /// on a kept-alive connection (the idle timeout).
    pub header_timeout: Duration,
    /// A read or write of a connection that makes no progress for this long ends it.
    pub stall_timeout: Duration,
    /// An upload slower than this (bytes per second, averaged once `stall_timeout` has passed)
    /// is cut off with 408.
    pub min_upload_rate: u64,
    /// Largest blob a PUT may store (tag files and the catalogue have the layout's own caps).
    pub max_upload: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            min_upload_rate: 16 << 10,
            max_upload: DEFAULT_MAX_UPLOAD,
        }
    }
}

/// The default cap on one PUT: a chunk of at most 64 MiB compressed, or an image manifest.
pub const DEFAULT_MAX_UPLOAD: u64 = crate::layout::MAX_MANIFEST_BYTES + (1 << 20);

pub struct ServeOptions {
    pub root: PathBuf,
    /// The bearer token writes must present; `None` serves read-only (a mirror).
    pub token: Option<String>,
    pub limits: Limits,
}

struct Shared {
    root: OwnedFd,
    token: Option<String>,
    limits: Limits,
}

const UPLOADS: &str = ".uploads";

/// Serve `opts.root` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let root = rustix::fs::open(
        &opts.root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    if opts.token.is_some() {
        match rustix::fs::mkdirat(&root, UPLOADS, Mode::from_raw_mode(0o700)) {
            Err(e) if e != rustix::io::Errno::EXIST => return Err(e.into()),
            _ => {}
        }
        // Refuse a planted link: uploads must land inside the root.
        dir_beneath(&root, &[UPLOADS], false)?;
    }
    let limits = opts.limits.clone();
    let shared = Arc::new(Shared {
        root,
        token: opts.token,
        limits: opts.limits,
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let mut io = tokio_io_timeout::TimeoutStream::new(tcp);
        io.set_read_timeout(Some(limits.stall_timeout));
        io.set_write_timeout(Some(limits.stall_timeout));
        let io = hyper_util::rt::TokioIo::new(Box::pin(io));
        let shared = shared.clone();
        let mut stop = stop_rx.clone();
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let shared = shared.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(handle(&shared, req.map(Body::new)).await)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(io, svc);
            tokio::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::debug!("connection ended: {e}");
            }
            drop(permit);
        });
    }
    let _ = stop_tx.send(true);
    // Let requests in flight finish (bounded by the stall timeout of each connection).
    let all = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(limits.stall_timeout, slots.acquire_many(all)).await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// A request path made only of safe segments; `None` for anything that could escape the root.
fn safe_key(path: &str) -> Option<String> {
    let key = path.strip_prefix('/')?;
    let ok = !key.is_empty()
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && !seg.starts_with('.')
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    ok.then(|| key.to_string())
}

/// The directory `segs` beneath `root`, each segment opened with `O_NOFOLLOW` (a symlink is
/// `ELOOP`/`ENOTDIR`); with `create`, missing directories are made.
fn dir_beneath(root: &OwnedFd, segs: &[&str], create: bool) -> std::io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut dir = rustix::fs::openat(root, ".", flags, Mode::empty())?;
    for seg in segs {
        let next = match rustix::fs::openat(&dir, *seg, flags, Mode::empty()) {
            Err(rustix::io::Errno::NOENT) if create => {
                match rustix::fs::mkdirat(&dir, *seg, Mode::from_raw_mode(0o755)) {
                    Err(e) if e != rustix::io::Errno::EXIST => return Err(e.into()),
                    _ => {}
                }
                rustix::fs::openat(&dir, *seg, flags, Mode::empty())?
            }
            r => r?,
        };
        dir = next;
    }
    Ok(dir)
}

/// The regular file `key` beneath `root`, opened without following any symlink.
fn open_beneath(root: &OwnedFd, key: &str) -> std::io::Result<std::fs::File> {
    let segs: Vec<&str> = key.split('/').collect();
    let (name, dirs) = segs.split_last().expect("a key has a segment");
    let dir = dir_beneath(root, dirs, false)?;
    let fd = rustix::fs::openat(
        &dir,
        *name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )?;
    let file = std::fs::File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(std::io::ErrorKind::NotFound.into());
    }
    Ok(file)
}

/// Constant-time comparison (no early exit on the first differing byte).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let (ha, hb) = (Sha256::digest(a), Sha256::digest(b));
    ha.iter()
        .zip(hb.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn status(code: StatusCode, msg: &str) -> Response {
    (code, format!("{msg}\n")).into_response()
}

fn unauthorized(msg: &str) -> Response {
    let mut r = status(StatusCode::UNAUTHORIZED, msg);
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

async fn handle(s: &Arc<Shared>, req: Request<Body>) -> Response {
    let Some(key) = safe_key(req.uri().path()) else {
        return status(StatusCode::BAD_REQUEST, "bad path");
    };
    match *req.method() {
        Method::GET | Method::HEAD => {
            read(s.clone(), key, req.method() == Method::HEAD, req.headers()).await
        }
        Method::PUT => {
            let Some(token) = &s.token else {
                let mut r = status(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "this hub is read-only (a mirror): writes are refused",
                );
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
                return r;
            };
            let auth = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let Some(given) = auth.and_then(|a| a.strip_prefix("Bearer ")) else {
                return unauthorized("writes need a bearer token");
            };
            if !same_secret(given.trim().as_bytes(), token.as_bytes()) {
                return unauthorized("wrong token");
            }
            let Some(lk) = LayoutKey::parse(&key) else {
                return status(
                    StatusCode::BAD_REQUEST,
                    "not a key of the hub layout (docs/HUB-LAYOUT.md): writes go to \
                     forkd-hub.json, catalog.json, blobs/sha256/<2 hex>/<64 hex> or tags/OWNER/NAME/...",
                );
            };
            let max = lk.max_size(s.limits.max_upload);
            let declared = req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > max) {
                return too_large(max);
            }
            match write(s.clone(), key, lk, max, req.into_body()).await {
                Ok(()) => status(StatusCode::CREATED, "stored"),
                Err((code, msg)) => status(code, &msg),
            }
        }
        _ => status(StatusCode::METHOD_NOT_ALLOWED, "GET, HEAD or PUT"),
    }
}

fn too_large(max: u64) -> Response {
    status(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("larger than the {max} bytes allowed at this key"),
    )
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n` → `[start, end)`; `Err` when unsatisfiable. A last
/// position at or past the end is clamped to the end (RFC 9110, 14.1.2).
fn parse_range(v: &str, size: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = v.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None; // multiple ranges: serve the whole object
    }
    let (a, b) = spec.split_once('-')?;
    let r = match (a.trim(), b.trim()) {
        ("", n) => n
            .parse::<u64>()
            .ok()
            .map(|n| (size.saturating_sub(n), size)),
        (a, "") => a.parse::<u64>().ok().map(|a| (a, size)),
        (a, b) => match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(a), Ok(b)) if b >= a => Some((a, b.saturating_add(1).min(size))),
            _ => None,
        },
    }?;
    Some(if r.0 < r.1 { Ok(r) } else { Err(()) })
}

async fn read(s: Arc<Shared>, key: String, head: bool, headers: &HeaderMap) -> Response {
    let opened = tokio::task::spawn_blocking(move || {
        let f = open_beneath(&s.root, &key)?;
        let size = f.metadata()?.len();
        Ok::<_, std::io::Error>((f, size))
    })
    .await;
    let (file, size) = match opened {
        Ok(Ok(x)) => x,
        _ => return status(StatusCode::NOT_FOUND, "not found"),
    };
    let mut file = tokio::fs::File::from_std(file);
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_range(v, size));
    let (code, start, end) = match range {
        None => (StatusCode::OK, 0, size),
        Some(Ok((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
        Some(Err(())) => {
            let mut r = status(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
            );
            return r;
        }
    };
    let mut builder = Response::builder()
        .status(code)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if code == StatusCode::PARTIAL_CONTENT {
        builder = builder.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    if head {
        return builder.body(Body::empty()).expect("valid response");
    }
    if start > 0 && file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return status(StatusCode::INTERNAL_SERVER_ERROR, "seek failed");
    }
    let stream = tokio_read_stream(file.take(end - start));
    builder
        .body(Body::from_stream(stream))
        .expect("valid response")
}

fn tokio_read_stream<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    r: R,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send {
    futures::stream::unfold(r, |mut r| async move {
        let mut buf = bytes::BytesMut::with_capacity(256 << 10);
        match r.read_buf(&mut buf).await {
            Ok(0) => None,
            Ok(_) => Some((Ok(buf.freeze()), r)),
            Err(e) => Some((Err(e), r)),
        }
    })
}

async fn write(
    s: Arc<Shared>,
    key: String,
    lk: LayoutKey,
    max: u64,
    body: Body,
) -> Result<(), (StatusCode, String)> {
    let internal = |e: std::io::Error| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let root = s.clone();
    let (tmp_name, std_file) = tokio::task::spawn_blocking(move || {
        let uploads = dir_beneath(&root.root, &[UPLOADS], false)?;
        for _ in 0..16 {
            let name = format!("up-{:016x}", rand_u64());
            match rustix::fs::openat(
                &uploads,
                name.as_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o644),
            ) {
                Ok(fd) => return Ok((name, std::fs::File::from(fd))),
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(std::io::Error::other("no free upload name"))
    })
    .await
    .map_err(|e| internal(std::io::Error::other(e)))?
    .map_err(internal)?;
    // Whatever happens below, the temp file does not outlive this request.
    let cleanup = Cleanup {
        shared: s.clone(),
        name: tmp_name.clone(),
        armed: true,
    };
    let mut file = tokio::fs::File::from_std(std_file);
    let is_blob = matches!(lk, LayoutKey::Blob(_));
    let mut doc = Vec::new();
    let mut hasher = Sha256::new();
    let mut stream = body.into_data_stream();
    let started = Instant::now();
    let mut got: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| (StatusCode::BAD_REQUEST, format!("upload interrupted: {e}")))?;
        got += chunk.len() as u64;
        if got > max {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("larger than the {max} bytes allowed at this key"),
            ));
        }
        let secs = started.elapsed().as_secs_f64();
        if secs > s.limits.stall_timeout.as_secs_f64()
            && (got as f64) < s.limits.min_upload_rate as f64 * secs
        {
            return Err((
                StatusCode::REQUEST_TIMEOUT,
                format!("upload slower than {} bytes/s", s.limits.min_upload_rate),
            ));
        }
        if is_blob {
            hasher.update(&chunk);
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                .await
                .map_err(internal)?;
        } else {
            doc.extend_from_slice(&chunk);
        }
    }
    match &lk {
        LayoutKey::Blob(hex_want) => {
            let got = hex::encode(hasher.finalize());
            if &got != hex_want {
                return Err((
                    StatusCode::BAD_REQUEST,
                    format!("body hashes to sha256:{got}, not to its path"),
                ));
            }
        }
        other => {
            other.validate(&doc).map_err(|msg| {
                (
                    StatusCode::BAD_REQUEST,
                    format!("{key} is not a valid document: {msg}"),
                )
            })?;
            tokio::io::AsyncWriteExt::write_all(&mut file, &doc)
                .await
                .map_err(internal)?;
        }
    }
    file.sync_data().await.map_err(internal)?;
    drop(file);
    tokio::task::spawn_blocking(move || {
        let segs: Vec<&str> = key.split('/').collect();
        let (name, dirs) = segs.split_last().expect("a key has a segment");
        let dir = dir_beneath(&s.root, dirs, true)?;
        let uploads = dir_beneath(&s.root, &[UPLOADS], false)?;
        rustix::fs::renameat(&uploads, tmp_name.as_str(), &dir, *name)?;
        Ok::<_, std::io::Error>(())
    })
    .await
    .map_err(|e| internal(std::io::Error::other(e)))?
    .map_err(internal)?;
    let mut cleanup = cleanup;
    cleanup.armed = false;
    Ok(())
}

/// Removes an upload's temp file unless it was renamed into place.
struct Cleanup {
    shared: Arc<Shared>,
    name: String,
    armed: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.armed
            && let Ok(uploads) = dir_beneath(&self.shared.root, &[UPLOADS], false)
        {
            let _ =
                rustix::fs::unlinkat(&uploads, self.name.as_str(), rustix::fs::AtFlags::empty());
        }
    }
}

/// A temp-file name suffix; uniqueness is checked by `O_EXCL`, so this need not be secret.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_ranges() {
        assert_eq!(
            safe_key("/blobs/sha256/ab/x").as_deref(),
            Some("blobs/sha256/ab/x")
        );
        for bad in [
            "/",
            "/../etc/passwd",
            "/a/../b",
            "/a//b",
            "/.uploads/x",
            "/a/b%2f",
            "relative",
        ] {
            assert!(safe_key(bad).is_none(), "{bad}");
        }
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 10))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 100))));
        assert_eq!(parse_range("bytes=-10", 100), Some(Ok((90, 100))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(
            parse_range("bytes=0-18446744073709551615", 100),
            Some(Ok((0, 100)))
        );
        assert_eq!(
            parse_range("bytes=18446744073709551615-18446744073709551615", 100),
            Some(Err(()))
        );
        assert!(same_secret(b"abc", b"abc") && !same_secret(b"abc", b"abd"));
    }
}
