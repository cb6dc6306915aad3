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
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    TransportError::Connection {
        key: key.into(),
        msg,
    }
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
    async fn fetch(&self, key: &str, range: Option<Range<u64>>) -> TResult<Bytes> {
        let mut req = self.client.get(self.url(key));
        if let Some(r) = &range {
            req = req.header(header::RANGE, format!("bytes={}-{}", r.start, r.end - 1));
        }
        let resp = req.send().await.map_err(|e| req_err(key, e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(status_err(key, status));
        }
        if let Some(r) = &range
            && status != StatusCode::PARTIAL_CONTENT
        {
            // The server ignored Range: take the slice we asked for.
            let all = resp.bytes().await.map_err(|e| req_err(key, e))?;
            let end = (r.end as usize).min(all.len());
            return Ok(all.slice((r.start as usize).min(end)..end));
        }
        resp.bytes().await.map_err(|e| req_err(key, e))
    }
}

impl Transport for HttpTransport {
    fn describe(&self) -> String {
        redact_url(self.base.as_str())
    }

    fn get(&self, key: &str) -> BoxFuture<'_, TResult<Bytes>> {
        let key = key.to_string();
        async move { self.fetch(&key, None).await }.boxed()
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> BoxFuture<'_, TResult<Bytes>> {
        let key = key.to_string();
        async move { self.fetch(&key, Some(range)).await }.boxed()
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
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(status_err(&key, resp.status()))
            }
        }
        .boxed()
    }
}
