//! `forkd hub serve`: an HTTP server over a hub directory. Reads are anonymous (GET/HEAD, with
//! single byte ranges); writes (PUT) need the bearer token and land atomically: the body streams
//! into a temp file inside the root and is renamed into place; a blob whose bytes do not hash
//! to its path is refused with 400.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

struct Shared {
    root: PathBuf,
    token: String,
}

/// Serve `root` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    root: PathBuf,
    token: String,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    fs_err::create_dir_all(root.join(".uploads"))?;
    let shared = Arc::new(Shared { root, token });
    let app = axum::Router::new().fallback(handle).with_state(shared);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
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

async fn handle(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let Some(key) = safe_key(req.uri().path()) else {
        return status(StatusCode::BAD_REQUEST, "bad path");
    };
    match *req.method() {
        Method::GET | Method::HEAD => {
            read(
                &s.root.join(&key),
                req.method() == Method::HEAD,
                req.headers(),
            )
            .await
        }
        Method::PUT => {
            let auth = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let Some(given) = auth.and_then(|a| a.strip_prefix("Bearer ")) else {
                let mut r = status(StatusCode::UNAUTHORIZED, "writes need a bearer token");
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return r;
            };
            if !same_secret(given.trim().as_bytes(), s.token.as_bytes()) {
                let mut r = status(StatusCode::UNAUTHORIZED, "wrong token");
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return r;
            }
            match write(&s.root, &key, req.into_body()).await {
                Ok(()) => status(StatusCode::CREATED, "stored"),
                Err((code, msg)) => status(code, &msg),
            }
        }
        _ => status(StatusCode::METHOD_NOT_ALLOWED, "GET, HEAD or PUT"),
    }
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n` → `[start, end)`; `Err` when unsatisfiable.
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
            (Ok(a), Ok(b)) if b >= a => Some((a, (b + 1).min(size))),
            _ => None,
        },
    }?;
    Some(if r.0 < r.1 { Ok(r) } else { Err(()) })
}

async fn read(path: &Path, head: bool, headers: &HeaderMap) -> Response {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(_) => return status(StatusCode::NOT_FOUND, "not found"),
    };
    let size = match file.metadata().await {
        Ok(m) if m.is_file() => m.len(),
        _ => return status(StatusCode::NOT_FOUND, "not found"),
    };
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

async fn write(root: &Path, key: &str, body: Body) -> Result<(), (StatusCode, String)> {
    let internal = |e: std::io::Error| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let expected = key
        .strip_prefix("blobs/sha256/")
        .map(|rest| match rest.split_once('/') {
            Some((pre, hex)) if hex.len() == 64 && hex.starts_with(pre) && pre.len() == 2 => {
                Ok(hex.to_string())
            }
            _ => Err((
                StatusCode::BAD_REQUEST,
                "blob paths are blobs/sha256/<2 hex>/<64 hex>".to_string(),
            )),
        })
        .transpose()?;
    let tmp = tempfile::Builder::new()
        .prefix("up-")
        .tempfile_in(root.join(".uploads"))
        .map_err(internal)?;
    let (std_file, tmp_path) = tmp.into_parts();
    let mut file = tokio::fs::File::from_std(std_file);
    let mut hasher = Sha256::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| (StatusCode::BAD_REQUEST, format!("upload interrupted: {e}")))?;
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(internal)?;
    }
    file.sync_data().await.map_err(internal)?;
    if let Some(hex_want) = expected {
        let got = hex::encode(hasher.finalize());
        if got != hex_want {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("body hashes to sha256:{got}, not to its path"),
            ));
        }
    }
    let dest = root.join(key);
    if let Some(dir) = dest.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(internal)?;
    }
    tmp_path.persist(&dest).map_err(|e| internal(e.error))?;
    Ok(())
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
        assert!(same_secret(b"abc", b"abc") && !same_secret(b"abc", b"abd"));
    }
}
