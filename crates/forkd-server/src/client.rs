//! A small synchronous client of the daemon's API, for the CLI: when a daemon runs, `forkd fork
//! --keep`, `ps`, `exec`, `kill` and `cp` go through it, so kept children always have an owner.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
enum Target {
    Unix(PathBuf),
    Tcp { authority: String },
}

pub struct Client {
    target: Target,
    token: Option<String>,
    rt: tokio::runtime::Runtime,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the forkd daemon at {at}: {source}")]
    Connect {
        at: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon connection failed: {0}")]
    Http(String),
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
        hint: Option<String>,
    },
    #[error("the daemon sent something unexpected: {0}")]
    Decode(String),
}

type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

/// One answer: its status and body stream.
pub struct Answer {
    pub status: StatusCode,
    body: hyper::body::Incoming,
}

impl Client {
    fn new(target: Target, token: Option<String>) -> std::io::Result<Client> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Client { target, token, rt })
    }

    /// The daemon serving this home, if one answers: `FORKD_URL` (+ `FORKD_TOKEN`) when set,
    /// else the socket `$FORKD_HOME/forkd.sock`.
    pub fn discover(socket: &Path) -> Option<Client> {
        if let Some(url) = std::env::var("FORKD_URL").ok().filter(|u| !u.is_empty()) {
            let authority = url
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string();
            let token = std::env::var("FORKD_TOKEN").ok().filter(|t| !t.is_empty());
            return Client::new(Target::Tcp { authority }, token).ok();
        }
        // A socket file alone proves nothing (a crashed daemon leaves it): it must answer.
        std::os::unix::net::UnixStream::connect(socket).ok()?;
        Client::new(Target::Unix(socket.to_path_buf()), None).ok()
    }

    fn describe(&self) -> String {
        match &self.target {
            Target::Unix(p) => p.display().to_string(),
            Target::Tcp { authority } => format!("http://{authority}"),
        }
    }

    async fn send_async(&self, req: Request<BoxBody>) -> Result<Answer, ClientError> {
        let connect_err = |source| ClientError::Connect {
            at: self.describe(),
            source,
        };
        let resp = match &self.target {
            Target::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(connect_err)?;
                exchange(s, req).await?
            }
            Target::Tcp { authority } => {
                let s = tokio::net::TcpStream::connect(authority.as_str())
                    .await
                    .map_err(connect_err)?;
                exchange(s, req).await?
            }
        };
        Ok(Answer {
            status: resp.status(),
            body: resp.into_body(),
        })
    }

    fn request(&self, method: Method, path: &str, body: BoxBody, ctype: &str) -> Request<BoxBody> {
        let host = match &self.target {
            Target::Unix(_) => "localhost".to_string(),
            Target::Tcp { authority } => authority.clone(),
        };
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", host)
            .header("content-type", ctype);
        if let Some(t) = &self.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(body).expect("a request built from valid parts")
    }

    fn json_body(v: Option<&Value>) -> BoxBody {
        let bytes = v
            .map(|v| Bytes::from(serde_json::to_vec(v).unwrap_or_default()))
            .unwrap_or_default();
        Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync()
    }

    /// Send a JSON request; a non-2xx answer becomes [`ClientError::Api`].
    pub fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, ClientError> {
        let req = self.request(method, path, Self::json_body(body), "application/json");
        self.rt.block_on(async {
            let a = self.send_async(req).await?;
            check(a).await
        })
    }

    /// A JSON request and its JSON answer.
    pub fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, ClientError> {
        let a = self.send(method, path, body)?;
        let bytes = self.collect(a)?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    fn collect(&self, a: Answer) -> Result<Bytes, ClientError> {
        self.rt.block_on(async {
            a.body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .map_err(|e| ClientError::Http(e.to_string()))
        })
    }

    /// An NDJSON answer, one parsed line at a time, as lines arrive. `on_line` returns
    /// whether to go on reading; `false` drops the connection (the daemon then stops a
    /// foreground command).
    pub fn ndjson(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        on_line: &mut dyn FnMut(Value) -> bool,
    ) -> Result<(), ClientError> {
        let a = self.send(method, path, body)?;
        self.rt.block_on(async {
            let mut body = a.body;
            let mut buf: Vec<u8> = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| ClientError::Http(e.to_string()))?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let v: Value = serde_json::from_slice(&line)
                        .map_err(|e| ClientError::Decode(e.to_string()))?;
                    if !on_line(v) {
                        return Ok(());
                    }
                }
            }
            Ok(())
        })
    }

    /// Upload `src` as a raw body, streamed in 1 MiB pieces.
    pub fn upload(&self, path: &str, mut src: Box<dyn Read + Send>) -> Result<Value, ClientError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                match src.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx
                            .blocking_send(Ok(Frame::data(Bytes::copy_from_slice(&buf[..n]))))
                            .is_err()
                        {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        break;
                    }
                }
            }
        });
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
        let body = StreamBody::new(stream).boxed_unsync();
        let req = self.request(Method::PUT, path, body, "application/octet-stream");
        let a = self.rt.block_on(async {
            let a = self.send_async(req).await?;
            check(a).await
        })?;
        let bytes = self.collect(a)?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Download a raw body into `sink`; returns the byte count.
    pub fn download(&self, path: &str, sink: &mut dyn Write) -> Result<u64, ClientError> {
        let a = self.send(Method::GET, path, None)?;
        self.rt.block_on(async {
            let mut body = a.body;
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| ClientError::Http(e.to_string()))?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                sink.write_all(&data)
                    .map_err(|e| ClientError::Http(format!("cannot write: {e}")))?;
                n += data.len() as u64;
            }
            Ok(n)
        })
    }
}

/// One request on a fresh HTTP/1.1 connection over `io`.
async fn exchange<S>(
    io: S,
    req: Request<BoxBody>,
) -> Result<hyper::Response<hyper::body::Incoming>, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http = |e: hyper::Error| ClientError::Http(e.to_string());
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(http)?;
    tokio::spawn(conn);
    tx.send_request(req).await.map_err(http)
}

/// Turn an error status into [`ClientError::Api`] with the daemon's own message and hint.
async fn check(a: Answer) -> Result<Answer, ClientError> {
    if a.status.is_success() {
        return Ok(a);
    }
    let status = a.status.as_u16();
    let bytes = a
        .body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let e = &v["error"];
    Err(ClientError::Api {
        status,
        code: e["code"].as_str().unwrap_or("unknown").to_string(),
        message: e["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes))),
        hint: e["hint"].as_str().map(str::to_string),
    })
}

/// Percent-encode a query value.
pub fn q(v: &str) -> String {
    url::form_urlencoded::byte_serialize(v.as_bytes()).collect()
}
