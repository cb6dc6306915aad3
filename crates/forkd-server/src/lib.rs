//! `forkd serve`: the REST API (docs/API.md) over the sandbox library, on a unix socket (mode
//! 0600) or on TCP with a bearer token; and [`client`], which the CLI uses to reach it.
//!
//! The daemon owns its sandboxes: they stop with it (SIGTERM/SIGINT), and after a crash the
//! next start adopts or removes whatever the last one left (`Manager::recover`).

pub mod api;
mod audit;
pub mod backend;
pub mod client;
mod metrics;
mod routes;
mod state;
pub mod tls;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use forkd_sandbox::Manager;
use state::AppState;
use std::future::IntoFuture as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use utoipa::OpenApi as _;

/// Where the daemon listens.
#[derive(Debug, Clone)]
pub enum Listen {
    /// A unix socket, created with mode 0600 (no token: only the owner can connect).
    Unix(PathBuf),
    /// TCP; every request but `GET /v1/health` needs the bearer token. With `tls` (a PEM
    /// certificate chain and key), TCP is TLS (rustls).
    Tcp {
        addr: String,
        token: String,
        tls: Option<(PathBuf, PathBuf)>,
    },
}

/// Where images named by hub reference come from.
#[derive(Debug, Clone, Default)]
pub struct HubConfig {
    pub url: Option<String>,
    pub insecure: bool,
    /// Pull an image named by reference whole before its sandboxes start (by default they
    /// start while it downloads).
    pub no_lazy: bool,
}

impl HubConfig {
    pub fn as_pull_config(&self) -> forkd_sandbox::images::PullConfig {
        forkd_sandbox::images::PullConfig {
            hub: self.url.clone(),
            trust: Vec::new(),
            insecure: self.insecure,
            no_lazy: self.no_lazy,
            ..Default::default()
        }
    }
}

pub type OnReady = Box<dyn FnOnce(&str) + Send>;

pub struct ServeOptions {
    pub manager: Manager,
    pub listen: Listen,
    pub log_dir: PathBuf,
    pub hub: HubConfig,
    /// Called once the daemon listens (the address it is reachable at).
    pub on_ready: Option<OnReady>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("another forkd daemon already owns this home (it holds {0})")]
    AlreadyRunning(PathBuf),
    #[error("cannot listen on {what}: {source}")]
    Listen {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the audit log in {dir}: {source}")]
    Audit {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("the server failed: {0}")]
    Serve(#[source] std::io::Error),
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "forkd",
        description = "Sandboxes forked copy-on-write from warmed VM snapshots (docs/API.md)"
    ),
    paths(
        routes::health,
        routes::metrics,
        routes::list_images,
        routes::create_sandboxes,
        routes::list_sandboxes,
        routes::get_sandbox,
        routes::delete_sandbox,
        routes::pause,
        routes::resume,
        routes::snapshot_sandbox,
        routes::run_command,
        routes::list_commands,
        routes::get_command,
        routes::wait_command,
        routes::command_output,
        routes::signal_command,
        routes::run_code,
        routes::put_file,
        routes::get_file,
        routes::list_files,
        routes::stat_file,
        routes::mkdir,
        routes::delete_file,
    ),
    components(schemas(api::ErrorBody, api::ErrorDetail))
)]
struct ApiDoc;

/// The OpenAPI document, generated from the handlers and wire types.
pub fn openapi_doc() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// Request bodies other than file uploads are JSON and small.
const JSON_LIMIT: usize = 64 << 20;

fn router(st: Arc<AppState>) -> Router {
    let files = Router::new()
        .route(
            "/v1/sandboxes/{id}/files",
            get(routes::get_file)
                .put(routes::put_file)
                .delete(routes::delete_file),
        )
        .layer(DefaultBodyLimit::disable());
    Router::new()
        .route("/v1/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .route("/v1/openapi.json", get(routes::openapi))
        .route("/v1/images", get(routes::list_images))
        .route("/v1/images/pull", post(routes::pull_image))
        .route(
            "/v1/sandboxes",
            post(routes::create_sandboxes).get(routes::list_sandboxes),
        )
        .route(
            "/v1/sandboxes/{id}",
            get(routes::get_sandbox).delete(routes::delete_sandbox),
        )
        .route("/v1/sandboxes/{id}/pause", post(routes::pause))
        .route("/v1/sandboxes/{id}/resume", post(routes::resume))
        .route(
            "/v1/sandboxes/{id}/snapshot",
            post(routes::snapshot_sandbox),
        )
        .route(
            "/v1/sandboxes/{id}/commands",
            post(routes::run_command).get(routes::list_commands),
        )
        .route(
            "/v1/sandboxes/{id}/commands/{cid}",
            get(routes::get_command),
        )
        .route(
            "/v1/sandboxes/{id}/commands/{cid}/wait",
            post(routes::wait_command),
        )
        .route(
            "/v1/sandboxes/{id}/commands/{cid}/output",
            get(routes::command_output),
        )
        .route(
            "/v1/sandboxes/{id}/commands/{cid}/signal",
            post(routes::signal_command),
        )
        .route("/v1/sandboxes/{id}/run", post(routes::run_code))
        .route("/v1/sandboxes/{id}/files/list", get(routes::list_files))
        .route("/v1/sandboxes/{id}/files/stat", get(routes::stat_file))
        .route("/v1/sandboxes/{id}/files/mkdir", post(routes::mkdir))
        .layer(DefaultBodyLimit::max(JSON_LIMIT))
        .merge(files)
        .fallback(|| async {
            api::ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
                .hint("the API is under /v1 (docs/API.md; GET /v1/openapi.json)")
        })
        // The outer layer runs first: refused requests (401) are counted and audited too.
        .layer(axum::middleware::from_fn_with_state(st.clone(), auth))
        .layer(axum::middleware::from_fn_with_state(st.clone(), observe))
        .with_state(st)
}

/// Bearer-token check for TCP. Constant-time comparison, so the token cannot be guessed
/// byte by byte from response times.
async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(token) = &st.token else {
        return next.run(req).await;
    };
    if req.uri().path() == "/v1/health" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        let mut r = api::ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            if given.is_empty() {
                "this daemon needs a bearer token"
            } else {
                "wrong bearer token"
            },
        )
        .hint("send Authorization: Bearer <the token in the daemon's --token-file> (SDK: Client(url, token=…); CLI: FORKD_TOKEN)")
        .into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Count every request, and write an audit line for those that change something.
async fn observe(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let ext = req.extensions();
    let peer = ext
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.to_string())
        .or_else(|| {
            ext.get::<axum::extract::ConnectInfo<tls::TlsPeer>>()
                .map(|c| c.0.0.to_string())
        })
        .unwrap_or_else(|| "unix".into());
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    st.metrics
        .http_requests
        .get_or_create(&metrics::HttpLabel {
            method: method.to_string(),
            status,
        })
        .inc();
    if !matches!(method.as_str(), "GET" | "HEAD" | "OPTIONS") {
        let sandbox = path
            .strip_prefix("/v1/sandboxes/")
            .and_then(|r| r.split('/').next());
        st.audit.record(&audit::Entry {
            ts: jiff::Timestamp::now().to_string(),
            method: method.as_str(),
            path: &path,
            status,
            sandbox,
            duration_ms: t0.elapsed().as_millis() as u64,
            peer: &peer,
        });
    }
    resp
}

/// Serve until SIGTERM or SIGINT; then stop every sandbox and return.
pub async fn serve(opts: ServeOptions) -> Result<(), ServeError> {
    let mgr = opts.manager;
    // One daemon per home, whatever it listens on: two would adopt (and stop) each other's
    // sandboxes.
    let lock_path = mgr.store().home().daemon_lock();
    let _lock = match forkd_store::FileLock::try_exclusive(&lock_path) {
        Ok(Some(l)) => l,
        Ok(None) => return Err(ServeError::AlreadyRunning(lock_path)),
        Err(e) => {
            return Err(ServeError::Listen {
                what: lock_path.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            });
        }
    };
    let (adopted, removed) = {
        let m = mgr.clone();
        tokio::task::spawn_blocking(move || m.recover())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    };
    if !adopted.is_empty() || !removed.is_empty() {
        tracing::info!(
            "found {} running children left by an earlier daemon (adopted) and cleaned up {}",
            adopted.len(),
            removed.len()
        );
    }
    let audit = audit::Audit::open(&opts.log_dir).map_err(|source| ServeError::Audit {
        dir: opts.log_dir.clone(),
        source,
    })?;
    tracing::info!("audit log: {}", audit.path().display());
    let token = match &opts.listen {
        Listen::Tcp { token, .. } => Some(token.clone()),
        Listen::Unix(_) => None,
    };
    let st = Arc::new(AppState {
        mgr: mgr.clone(),
        metrics: metrics::Metrics::new(),
        audit,
        token,
        started: Instant::now(),
        hub: opts.hub,
    });
    let app = router(st);

    // The reaper: ttl expiry, and children whose VM exited by itself.
    let reaper = {
        let m = mgr.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let m = m.clone();
                let _ = tokio::task::spawn_blocking(move || m.reap()).await;
            }
        })
    };

    let (stopped_tx, stopped_rx) = tokio::sync::watch::channel(false);
    let shutdown = {
        let m = mgr.clone();
        async move {
            wait_for_signal().await;
            tracing::info!("stopping every sandbox");
            let _ = tokio::task::spawn_blocking(move || m.shutdown()).await;
            let _ = stopped_tx.send(true);
        }
    };
    // Connections still open after the sandboxes stopped (a client that never reads its
    // stream) get this long, then the daemon exits anyway.
    let deadline = async move {
        let mut rx = stopped_rx;
        let _ = rx.wait_for(|s| *s).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
    };

    let result = match &opts.listen {
        Listen::Unix(path) => {
            let listener = bind_unix(path)?;
            if let Some(f) = opts.on_ready {
                f(&path.display().to_string());
            }
            let r = with_deadline(
                deadline,
                axum::serve(listener, app.into_make_service())
                    .with_graceful_shutdown(shutdown)
                    .into_future(),
            )
            .await;
            let _ = std::fs::remove_file(path);
            r
        }
        Listen::Tcp { addr, tls, .. } => {
            let acceptor = tls
                .as_ref()
                .map(|(cert, key)| tls::acceptor(cert, key))
                .transpose()?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen {
                    what: addr.clone(),
                    source,
                })?;
            let local = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| addr.clone());
            match acceptor {
                Some(acceptor) => {
                    let listener = tls::TlsListener::new(listener, acceptor).map_err(|source| {
                        ServeError::Listen {
                            what: addr.clone(),
                            source,
                        }
                    })?;
                    if let Some(f) = opts.on_ready {
                        f(&format!("https://{local}"));
                    }
                    with_deadline(
                        deadline,
                        axum::serve(
                            listener,
                            app.into_make_service_with_connect_info::<tls::TlsPeer>(),
                        )
                        .with_graceful_shutdown(shutdown)
                        .into_future(),
                    )
                    .await
                }
                None => {
                    if let Some(f) = opts.on_ready {
                        f(&format!("http://{local}"));
                    }
                    with_deadline(
                        deadline,
                        axum::serve(
                            listener,
                            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
                        )
                        .with_graceful_shutdown(shutdown)
                        .into_future(),
                    )
                    .await
                }
            }
        }
    };
    reaper.abort();
    // Whatever path got us here, no sandbox outlives the daemon.
    let _ = tokio::task::spawn_blocking(move || mgr.shutdown()).await;
    result.map_err(ServeError::Serve)
}

/// Serve until `serve` ends, or `deadline` passes (connections that outlive a shutdown).
async fn with_deadline(
    deadline: impl std::future::Future<Output = ()>,
    serve: impl std::future::Future<Output = std::io::Result<()>>,
) -> std::io::Result<()> {
    tokio::select! {
        r = serve => r,
        () = deadline => {
            tracing::warn!("connections still open 10 s after the sandboxes stopped; exiting");
            Ok(())
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Bind the unix socket with mode 0600 from the start (made in a private directory, so there
/// is no moment where another user could connect). A socket file left by a dead daemon is replaced;
/// one that answers means a daemon is running.
fn bind_unix(path: &std::path::Path) -> Result<tokio::net::UnixListener, ServeError> {
    let err = |source| ServeError::Listen {
        what: path.display().to_string(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket; remove it",
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::Listen {
                what: path.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "something else answers on this socket",
                ),
            });
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    // The umask is the process's, shared by every thread: changing it here would give a
    // directory made meanwhile by another thread no search bit. So bind inside a fresh 0700
    // directory, make the socket 0600, and only then rename it into place.
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let scratch = dir.join(format!(".s{}", std::process::id())); // no longer than forkd.sock
    let _ = std::fs::remove_dir_all(&scratch); // one a crashed daemon of this pid left
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&scratch)
        .map_err(err)?;
    let tmp = scratch.join("s");
    let bound = std::os::unix::net::UnixListener::bind(&tmp).and_then(|l| {
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok(l)
    });
    let _ = std::fs::remove_dir_all(&scratch);
    let l = bound.map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    tokio::net::UnixListener::from_std(l).map_err(err)
}
