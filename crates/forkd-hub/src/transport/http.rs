//! `http(s)://HOST/PREFIX`: anonymous GET/HEAD/Range reads (a CDN, a static web server, a
//! bucket's website endpoint, `forkd hub serve`); PUT with a bearer token to `forkd hub serve`.
//! Host names under `.localhost` resolve to 127.0.0.1 without DNS, so a virtual-hosted endpoint
//! such as `http://hub.web.garage.localhost:3902/` works on loopback.

use super::{OpenError, TResult, Transport, TransportError};
use crate::redact::redact_url;
use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use reqwest::{StatusCode, header};
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::time::Duration;

pub struct HttpTransport {
    base: url::Url,
    client: reqwest::Client,
    token: Option<String>,
}

impl HttpTransport {
    pub fn new(mut base: url::Url, token: Option<String>) -> Result<Self, OpenError> {
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            // Shorter than `forkd hub serve`'s idle timeout (10 s): a pooled connection is
            // never picked just as the server closes it.
            .pool_idle_timeout(Duration::from_secs(5))
            .user_agent(concat!("forkd/", env!("CARGO_PKG_VERSION")));
        if let Some(host) = base.host_str() {
            let local = host == "localhost" || host.ends_with(".localhost");
            if local {
                b = b.resolve(host, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
            }
            if local || host == "127.0.0.1" || host == "[::1]" {
                b = b.no_proxy();
            }
        }
        let client = b.build().map_err(|e| OpenError::Invalid {
            url: redact_url(base.as_str()),
            msg: e.to_string(),
        })?;
        Ok(Self {
            base,
            client,
            token,
        })
    }

    fn url(&self, key: &str) -> url::Url {
        self.base.join(key).expect("layout keys are relative paths")
    }
}

fn req_err(key: &str, e: reqwest::Error) -> TransportError {
    // reqwest's Display may include the URL; it never holds our token (sent as a header).
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut tls = false;
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        tls |= is_tls(s);
        src = s.source();
    }
    if tls {
        return TransportError::Tls {
            key: key.into(),
            msg,
        };
    }
    TransportError::Connection {
        key: key.into(),
        msg,
    }
}

/// Whether `e` is a rustls error. tokio-rustls and reqwest wrap it in (nested) io::Errors,
/// whose source() skips the wrapped error, so unwrap them by hand.
fn is_tls(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut e = e;
    for _ in 0..8 {
        if e.is::<rustls::Error>() {
            return true;
        }
        match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => e = inner,
            None => return false,
        }
    }
    false
}

/// What to do with a body longer than the cap.
#[derive(Clone, Copy, PartialEq)]
enum Over {
    /// Refuse it: [`TransportError::TooLarge`].
    Refuse,
    /// Keep the first `max` bytes and drop the connection (a server that ignored Range).
    Truncate,
}

/// Read a response body, never holding more than `max` bytes: a declared Content-Length above
/// `max` is refused before any byte is read, and the stream is cut as soon as it goes over.
/// The first `skip` bytes are read and dropped (a server that ignored Range sends them).
async fn read_capped(
    key: &str,
    mut resp: reqwest::Response,
    skip: u64,
    max: u64,
    over: Over,
) -> TResult<Bytes> {
    let too_large = || TransportError::TooLarge {
        key: key.into(),
        max,
    };
    if over == Over::Refuse && resp.content_length().is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let hint = resp
        .content_length()
        .unwrap_or(0)
        .saturating_sub(skip)
        .min(max)
        .min(64 << 20);
    let mut buf = bytes::BytesMut::with_capacity(hint as usize);
    let mut skip = skip;
    while let Some(mut chunk) = resp.chunk().await.map_err(|e| req_err(key, e))? {
        if skip > 0 {
            let n = skip.min(chunk.len() as u64);
            skip -= n;
            chunk = chunk.slice(n as usize..);
            if chunk.is_empty() {
                continue;
            }
        }
        let room = max - buf.len() as u64;
        if chunk.len() as u64 > room {
            if over == Over::Refuse {
                return Err(too_large());
            }
            buf.extend_from_slice(&chunk[..room as usize]);
            break;
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

fn status_err(key: &str, status: StatusCode) -> TransportError {
    let key = key.to_string();
    match status {
        StatusCode::NOT_FOUND => TransportError::NotFound { key },
        StatusCode::UNAUTHORIZED => TransportError::Unauthorized { key },
        StatusCode::FORBIDDEN => TransportError::Forbidden { key },
        s => TransportError::Status {
            key,
            status: s.as_u16(),
        },
    }
}

impl HttpTransport {
    async fn fetch(&self, key: &str, range: Option<Range<u64>>, max: u64) -> TResult<Bytes> {
        let mut req = self.client.get(self.url(key));
        let mut max = max;
        if let Some(r) = &range {
            if r.end <= r.start {
                return Ok(Bytes::new());
            }
            req = req.header(header::RANGE, format!("bytes={}-{}", r.start, r.end - 1));
            max = max.min(r.end - r.start);
        }
        let resp = req.send().await.map_err(|e| req_err(key, e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(status_err(key, status));
        }
        if let Some(r) = &range
            && status != StatusCode::PARTIAL_CONTENT
        {
            // The server ignored Range: drop what comes before the range, keep the range, and
            // stop reading at its end (memory stays at the range's length).
            return read_capped(key, resp, r.start, r.end - r.start, Over::Truncate).await;
        }
        read_capped(key, resp, 0, max, Over::Refuse).await
    }
}

impl Transport for HttpTransport {
    fn describe(&self) -> String {
        redact_url(self.base.as_str())
    }

    fn get(&self, key: &str, max: u64) -> BoxFuture<'_, TResult<Bytes>> {
        let key = key.to_string();
        async move { self.fetch(&key, None, max).await }.boxed()
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> BoxFuture<'_, TResult<Bytes>> {
        let key = key.to_string();
        async move { self.fetch(&key, Some(range), u64::MAX).await }.boxed()
    }

    fn exists(&self, key: &str) -> BoxFuture<'_, TResult<bool>> {
        let key = key.to_string();
        async move {
            let resp = self
                .client
                .head(self.url(&key))
                .send()
                .await
                .map_err(|e| req_err(&key, e))?;
            match resp.status() {
                s if s.is_success() => Ok(true),
                StatusCode::NOT_FOUND => Ok(false),
                s => Err(status_err(&key, s)),
            }
        }
        .boxed()
    }

    fn put(&self, key: &str, data: Bytes) -> BoxFuture<'_, TResult<()>> {
        let key = key.to_string();
        async move {
            let Some(token) = &self.token else {
                return Err(TransportError::ReadOnly {
                    scheme: self.base.scheme().into(),
                    hint: "writes over http(s) go to `forkd hub serve` and need its token: set FORKD_HUB_TOKEN or --token-file (or push to s3:// or file://)".into(),
                });
            };
            let resp = self
                .client
                .put(self.url(&key))
                .bearer_auth(token)
                .body(data)
                .send()
                .await
                .map_err(|e| req_err(&key, e))?;
            match resp.status() {
                s if s.is_success() => Ok(()),
                StatusCode::METHOD_NOT_ALLOWED => Err(TransportError::ReadOnly {
                    scheme: self.base.scheme().into(),
                    hint: "the server refuses writes (a `forkd hub serve --read-only` mirror?)"
                        .into(),
                }),
                s => Err(status_err(&key, s)),
            }
        }
        .boxed()
    }
}
