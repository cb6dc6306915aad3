//! Transports: how bytes move to and from a hub. Pull and push only see [`Transport`].

mod file;
mod http;
mod s3;

pub use file::FileTransport;
pub use http::HttpTransport;
pub use s3::S3Transport;

/// Blobs larger than this go to S3 as multipart uploads.
pub fn s3_multipart_threshold() -> usize {
    s3::MULTIPART_THRESHOLD
}

use crate::redact::redact_url;
use bytes::Bytes;
use forkd_store::Home;
use futures::future::BoxFuture;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("not found on the hub: {key}")]
    NotFound { key: String },
    #[error(
        "{key}: 401 Unauthorized (the hub wants credentials: set FORKD_HUB_TOKEN or --token-file for `forkd hub serve`, AWS_* for s3://)"
    )]
    Unauthorized { key: String },
    #[error("{key}: 403 Forbidden (the credentials are not allowed to do this)")]
    Forbidden { key: String },
    #[error("{key}: HTTP {status}")]
    Status { key: String, status: u16 },
    #[error("{key}: connection failed: {msg}")]
    Connection { key: String, msg: String },
    #[error("{key}: {source}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: {msg}")]
    Other { key: String, msg: String },
    #[error("this hub is read-only over {scheme}: {hint}")]
    ReadOnly { scheme: String, hint: String },
    /// The object is larger than the reader was prepared to take: a hostile or broken hub.
    #[error("{key}: the hub sent more than the {max} bytes expected; refusing the rest")]
    TooLarge { key: String, max: u64 },
    /// The TLS handshake failed (often: an https:// URL for a plain-http server).
    #[error("{key}: TLS handshake failed: {msg}")]
    Tls { key: String, msg: String },
}

impl TransportError {
    /// Worth retrying: dropped connections, timeouts, 5xx, 429.
    pub fn is_transient(&self) -> bool {
        match self {
            TransportError::Connection { .. } => true,
            TransportError::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

pub type TResult<T> = Result<T, TransportError>;

/// Object access over one hub root. Keys are relative `/`-separated paths of the layout.
pub trait Transport: Send + Sync {
    /// The hub URL with secrets removed, for messages.
    fn describe(&self) -> String;
    /// The whole object, streamed and refused with [`TransportError::TooLarge`] as soon as it
    /// exceeds `max` bytes (an untrusted hub must not choose how much memory a read takes).
    fn get(&self, key: &str, max: u64) -> BoxFuture<'_, TResult<Bytes>>;
    fn get_range(&self, key: &str, range: Range<u64>) -> BoxFuture<'_, TResult<Bytes>>;
    fn exists(&self, key: &str) -> BoxFuture<'_, TResult<bool>>;
    fn put(&self, key: &str, data: Bytes) -> BoxFuture<'_, TResult<()>>;
}

/// Options for opening a hub.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Bearer token for writes to `forkd hub serve`.
    pub token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid hub URL {url}: {msg}")]
    Invalid { url: String, msg: String },
    #[error(
        "unsupported hub URL scheme {scheme:?} in {url}; supported: file:///DIR, http://HOST/PREFIX, https://HOST/PREFIX, s3://BUCKET/PREFIX"
    )]
    Scheme { scheme: String, url: String },
    #[error("cannot set up the S3 client for {url}: {msg}")]
    S3 { url: String, msg: String },
    #[error("cannot read the token file {}", path.display())]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the token file {} is empty", .0.display())]
    EmptyToken(PathBuf),
}

/// The bearer token in `path` (surrounding white space removed; an empty file is an error).
pub fn read_token(path: &Path) -> Result<String, OpenError> {
    let t = std::fs::read_to_string(path).map_err(|source| OpenError::TokenFile {
        path: path.to_path_buf(),
        source,
    })?;
    let t = t.trim();
    if t.is_empty() {
        return Err(OpenError::EmptyToken(path.to_path_buf()));
    }
    Ok(t.to_string())
}

/// The hub a store uses when none is named: the embedded one, `file://$FORKD_HOME/hub`.
pub fn default_url(home: &Home) -> String {
    format!("file://{}", home.hub_dir().display())
}

/// Open the hub at `url`, else the embedded hub of `home`.
pub fn open_or_default(
    home: &Home,
    url: Option<&str>,
    opts: &HubOptions,
) -> Result<Arc<dyn Transport>, OpenError> {
    match url {
        Some(u) => open(u, opts),
        None => open(&default_url(home), opts),
    }
}

/// Open a hub by URL. A bare absolute path is accepted as `file://`.
pub fn open(url: &str, opts: &HubOptions) -> Result<Arc<dyn Transport>, OpenError> {
    let url = &*crate::address::hub_url(url);
    let shown = redact_url(url);
    if url.starts_with('/') {
        return Ok(Arc::new(FileTransport::new(PathBuf::from(url))));
    }
    let parsed = url::Url::parse(url).map_err(|e| OpenError::Invalid {
        url: shown.clone(),
        msg: format!(
            "{e}; expected file:///DIR, http(s)://HOST[:PORT]/PREFIX, s3://BUCKET/PREFIX or HOST:PORT (plain http)"
        ),
    })?;
    match parsed.scheme() {
        "file" => {
            let path = parsed.to_file_path().map_err(|()| OpenError::Invalid {
                url: shown.clone(),
                msg: "a file:// URL needs an absolute local path, e.g. file:///srv/hub".into(),
            })?;
            Ok(Arc::new(FileTransport::new(path)))
        }
        "http" | "https" => Ok(Arc::new(HttpTransport::new(parsed, opts.token.clone())?)),
        "s3" => Ok(Arc::new(S3Transport::new(&parsed)?)),
        other => Err(OpenError::Scheme {
            scheme: other.to_string(),
            url: shown,
        }),
    }
}
