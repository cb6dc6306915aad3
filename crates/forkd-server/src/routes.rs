//! The `/v1` routes: each handler checks its input, calls the sandbox library (on a blocking
//! thread: the library is synchronous), and shapes the answer. No logic of its own beyond that.

use crate::api::*;
use crate::state::{AppState, blocking};
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Path, Query, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use forkd_sandbox::{CommandRequest, CreateRequest, OutputEvent};
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

type S = State<Arc<AppState>>;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const NDJSON: &str = "application/x-ndjson";

/// A JSON body whose errors name the field that was wrong.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, St: Send + Sync> FromRequest<St> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &St) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            ApiError::new(
                e.status(),
                "too_large",
                format!("cannot read the body: {e}"),
            )
        })?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(de)
            .map(JsonBody)
            .map_err(|e| {
                let field = e.path().to_string();
                let inner = e.into_inner();
                if field == "." || field.is_empty() {
                    ApiError::bad_request(format!("malformed JSON body: {inner}"))
                } else {
                    ApiError::bad_request(format!("field `{field}`: {inner}"))
                }
            })
    }
}

fn secs(field: &'static str, v: Option<f64>) -> ApiResult<Option<Duration>> {
    match v {
        None => Ok(None),
        Some(s) if s.is_finite() && (0.0..=30.0 * 86400.0).contains(&s) => {
            Ok(Some(Duration::from_secs_f64(s)))
        }
        Some(s) => Err(ApiError::bad_request(format!(
            "field `{field}`: {s} is not a number of seconds between 0 and 30 days"
        ))),
    }
}

fn ndjson_line<T: serde::Serialize>(v: &T) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

/// A streamed NDJSON response fed by a channel.
fn ndjson_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<Bytes, std::convert::Infallible>(b), rx))
    });
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON))],
        Body::from_stream(stream),
    )
        .into_response()
}

/// How long a client may leave a stream unread before it counts as gone. A reader that
/// stalls must not stall the sandbox: the agent connection it shares with every other call
/// waits while this stream's queue is full.
const STALLED_CLIENT: Duration = Duration::from_secs(30);

/// Send from a blocking thread, giving up when the client has not taken anything for
/// [`STALLED_CLIENT`] (or is gone).
fn send_or_give_up<T>(tx: &mpsc::Sender<T>, item: T) -> bool {
    tokio::runtime::Handle::current()
        .block_on(tokio::time::timeout(STALLED_CLIENT, tx.send(item)))
        .is_ok_and(|r| r.is_ok())
}

fn wants_ndjson(h: &HeaderMap) -> bool {
    h.get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(NDJSON))
}

// --- health, metrics, openapi --------------------------------------------------------------

#[utoipa::path(get, path = "/v1/health", responses((status = 200, body = Health)))]
pub async fn health(State(st): S) -> axum::Json<Health> {
    let (running, paused) = st.mgr.counts();
    axum::Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        sandboxes: running + paused,
        uptime_s: st.started.elapsed().as_secs_f64(),
    })
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(st): S) -> Response {
    let (running, paused) = st.mgr.counts();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.render(running, paused),
    )
        .into_response()
}

pub async fn openapi() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(crate::openapi_doc())
}

// --- images ---------------------------------------------------------------------------------

#[utoipa::path(get, path = "/v1/images", responses((status = 200, body = ImageList)))]
pub async fn list_images(State(st): S) -> ApiResult<axum::Json<ImageList>> {
    let store = st.mgr.store().clone();
    let list = blocking(move || store.list().map_err(forkd_sandbox::SandboxError::from)).await?;
    Ok(axum::Json(ImageList {
        images: list
            .into_iter()
            .map(|i| Image {
                tag: i.tag.as_str().to_string(),
                name: i.manifest.name.clone(),
                version: i.manifest.version.clone(),
                memory_mib: i.manifest.memory_mib,
                size_bytes: i.apparent_size,
                disk_bytes: i.disk_size,
                created: i.manifest.created_at.to_string(),
            })
            .collect(),
    }))
}

/// Pull progress as NDJSON events, at most five a second per phase.
struct NdjsonProgress {
    tx: mpsc::Sender<Bytes>,
    state: std::sync::Mutex<(String, u64, u64, std::time::Instant)>,
}

impl NdjsonProgress {
    fn new(tx: mpsc::Sender<Bytes>) -> NdjsonProgress {
        NdjsonProgress {
            tx,
            state: std::sync::Mutex::new((String::new(), 0, 0, std::time::Instant::now())),
        }
    }

    fn emit(&self, v: serde_json::Value) {
        // A client that went away does not stop the pull: the image still lands in the store.
        let _ = self.tx.try_send(ndjson_line(&v));
    }
}

impl forkd_hub::progress::Progress for NdjsonProgress {
    fn message(&self, msg: &str) {
        self.emit(serde_json::json!({"event": "message", "message": msg}));
    }
    fn start(&self, phase: &str, total_bytes: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *s = (phase.to_string(), total_bytes, 0, std::time::Instant::now());
        self.emit(serde_json::json!({"event": "progress", "phase": phase, "done": 0, "total": total_bytes}));
    }
    fn advance(&self, bytes: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.2 += bytes;
        if s.3.elapsed() >= Duration::from_millis(200) {
            s.3 = std::time::Instant::now();
            self.emit(
                serde_json::json!({"event": "progress", "phase": s.0, "done": s.2, "total": s.1}),
            );
        }
    }
    fn finish(&self) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.emit(
            serde_json::json!({"event": "progress", "phase": s.0, "done": s.2, "total": s.1}),
        );
    }
}

#[utoipa::path(post, path = "/v1/images/pull", request_body = PullRequest,
    responses((status = 200, description = "NDJSON: progress events, then done or error", content_type = "application/x-ndjson")))]
pub async fn pull_image(
    State(st): S,
    JsonBody(body): JsonBody<PullRequest>,
) -> ApiResult<Response> {
    let (reference, tag) = forkd_sandbox::images::parse(&body.reference, "ref")?;
    let cfg = forkd_sandbox::images::PullConfig {
        hub: body.hub.or_else(|| st.hub.url.clone()),
        trust: body.trust,
        insecure: body.insecure || st.hub.insecure,
        ..Default::default()
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mgr = st.mgr.clone();
    tokio::task::spawn_blocking(move || {
        let progress = NdjsonProgress::new(tx.clone());
        let line = match forkd_sandbox::images::pull(
            mgr.store(),
            &reference,
            tag,
            &cfg,
            Some(&progress),
        ) {
            Ok(out) => ndjson_line(&serde_json::json!({
                "event": "done",
                "image": {"tag": out.tag.as_str(), "digest": out.digest, "size_bytes": out.apparent_size,
                          "downloaded_bytes": out.downloaded_bytes, "up_to_date": out.up_to_date,
                          "verified": out.unverified.is_none()},
            })),
            Err(e) => ndjson_line(
                &serde_json::json!({"event": "error", "error": ApiError::from(e).detail}),
            ),
        };
        let _ = tx.blocking_send(line);
    });
    Ok(ndjson_response(rx))
}

// --- sandboxes ------------------------------------------------------------------------------

#[utoipa::path(post, path = "/v1/sandboxes", request_body = CreateSandboxes,
    responses((status = 200, body = CreateResult), (status = 404, body = ErrorBody),
              (status = 422, body = ErrorBody), (status = 400, body = ErrorBody)))]
pub async fn create_sandboxes(
    State(st): S,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CreateSandboxes>,
) -> ApiResult<Response> {
    let mut req = CreateRequest {
        tag: String::new(),
        count: body.count,
        env: body.env,
        ttl: body.ttl_s.map(Duration::from_secs),
        labels: body.labels,
        memory_mib: body.memory_mib,
        image: Some(body.image.clone()),
        network: body.network.clone(),
    };
    if !wants_ndjson(&headers) {
        req.tag = crate::state::resolve_image(&st, &body.image, None).await?;
        let out = create(&st, req, None).await?;
        return Ok(axum::Json(out).into_response());
    }
    // What can be refused up front is, with its own status, before the stream starts: a
    // local image that is not there, bad fields, more children than fit.
    if !body.image.contains('/') {
        let mgr = st.mgr.clone();
        let mut probe = req.clone();
        probe.tag = body.image.clone();
        blocking(move || mgr.admit(&probe).map(|_| ())).await?;
    }
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let st2 = st.clone();
    tokio::spawn(async move {
        let progress = Arc::new(NdjsonProgress::new(tx.clone()));
        let result = async {
            req.tag = crate::state::resolve_image(&st2, &body.image, Some(progress)).await?;
            let tx2 = tx.clone();
            let on_child: forkd_engine::fork::OnChild = Box::new(move |c| {
                let _ = tx2.blocking_send(ndjson_line(&serde_json::json!({
                    "event": "child", "index": c.index, "ok": c.ok, "ready_ms": c.ready_ms,
                    "error": c.error,
                })));
            });
            create(&st2, req, Some(on_child)).await
        }
        .await;
        let line = match result {
            Ok(out) => ndjson_line(&serde_json::json!({"event": "done", "result": out})),
            Err(e) => ndjson_line(&serde_json::json!({"event": "error", "error": e.detail})),
        };
        let _ = tx.send(line).await;
    });
    Ok(ndjson_response(rx))
}

async fn create(
    st: &Arc<AppState>,
    req: CreateRequest,
    on_child: Option<forkd_engine::fork::OnChild>,
) -> ApiResult<CreateResult> {
    let mgr = st.mgr.clone();
    let image = req.image.clone().unwrap_or_default();
    let out = blocking(move || mgr.create(&req, on_child)).await?;
    for c in &out.report.children {
        if let Some(ms) = c.ready_ms {
            st.metrics.fork_seconds.observe(ms as f64 / 1000.0);
        }
    }
    let results: Vec<ChildResult> = out
        .results
        .into_iter()
        .enumerate()
        .map(|(index, r)| match r {
            Ok(sb) => ChildResult {
                index,
                sandbox: Some(sb.info().into()),
                error: None,
            },
            Err(message) => ChildResult {
                index,
                sandbox: None,
                error: Some(*ApiError::internal(message).detail),
            },
        })
        .collect();
    Ok(CreateResult {
        image,
        requested: out.report.requested,
        created: results.iter().filter(|r| r.sandbox.is_some()).count(),
        wall_ms: out.report.wall_ms,
        results,
    })
}

/// `label=k=v` pairs from the raw query (repeatable, so not a plain `Query`).
fn labels(q: Option<String>) -> ApiResult<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (k, v) in url::form_urlencoded::parse(q.unwrap_or_default().as_bytes()) {
        if k != "label" {
            continue;
        }
        let Some((a, b)) = v.split_once('=') else {
            return Err(ApiError::bad_request(format!(
                "query `label`: {v:?} is not k=v"
            )));
        };
        out.push((a.to_string(), b.to_string()));
    }
    Ok(out)
}

#[utoipa::path(get, path = "/v1/sandboxes", params(LabelQuery), responses((status = 200, body = SandboxList)))]
pub async fn list_sandboxes(
    State(st): S,
    RawQuery(q): RawQuery,
) -> ApiResult<axum::Json<SandboxList>> {
    let want = labels(q)?;
    Ok(axum::Json(SandboxList {
        sandboxes: st.mgr.infos(&want).into_iter().map(Sandbox::from).collect(),
    }))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}", responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody)))]
pub async fn get_sandbox(State(st): S, Path(id): Path<String>) -> ApiResult<axum::Json<Sandbox>> {
    let mgr = st.mgr.clone();
    let sb = blocking(move || mgr.get(&id)).await?;
    Ok(axum::Json(sb.info().into()))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}", responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_sandbox(State(st): S, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let mgr = st.mgr.clone();
    blocking(move || mgr.kill(&id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", responses((status = 200, body = Sandbox)))]
pub async fn pause(State(st): S, Path(id): Path<String>) -> ApiResult<axum::Json<Sandbox>> {
    let mgr = st.mgr.clone();
    let sb = blocking(move || mgr.pause(&id)).await?;
    Ok(axum::Json(sb.info().into()))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", responses((status = 200, body = Sandbox)))]
pub async fn resume(State(st): S, Path(id): Path<String>) -> ApiResult<axum::Json<Sandbox>> {
    let mgr = st.mgr.clone();
    let sb = blocking(move || mgr.resume(&id)).await?;
    Ok(axum::Json(sb.info().into()))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/snapshot", request_body = SnapshotRequest,
    responses((status = 201, body = Branch), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "paused, busy, stopped, or the tag exists")))]
pub async fn snapshot_sandbox(
    State(st): S,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<SnapshotRequest>,
) -> ApiResult<(StatusCode, axum::Json<Branch>)> {
    let mgr = st.mgr.clone();
    let overwrite = if body.force {
        forkd_store::Overwrite::Yes
    } else {
        forkd_store::Overwrite::No
    };
    let b = blocking(move || mgr.snapshot(&id, &body.tag, overwrite)).await?;
    Ok((StatusCode::CREATED, axum::Json(b.into())))
}

// --- commands -------------------------------------------------------------------------------

fn command_request(b: CommandBody) -> ApiResult<CommandRequest> {
    let stdin_data =
        match b.stdin_data {
            Some(s) => Some(B64.decode(s.as_bytes()).map_err(|e| {
                ApiError::bad_request(format!("field `stdin_data`: not base64: {e}"))
            })?),
            None => None,
        };
    Ok(CommandRequest {
        cmd: b.cmd,
        argv: b.argv,
        env: b.env,
        cwd: b.cwd,
        stdin: b.stdin,
        stdin_data,
        timeout: secs("timeout_s", b.timeout_s)?,
        background: b.background,
    })
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/commands", request_body = CommandBody,
    responses((status = 200, description = "NDJSON events: start, stdout, stderr, exit | error", content_type = "application/x-ndjson"),
              (status = 201, body = CommandStarted), (status = 409, body = ErrorBody)))]
pub async fn run_command(
    State(st): S,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<CommandBody>,
) -> ApiResult<Response> {
    let req = command_request(body)?;
    let mgr = st.mgr.clone();
    if req.background {
        let cmd = blocking(move || {
            let sb = mgr.get(&id)?;
            sb.start_background(&req)
        })
        .await?;
        st.metrics.exec_total.inc();
        return Ok((
            StatusCode::CREATED,
            axum::Json(CommandStarted {
                command_id: cmd.id().to_string(),
                pid: cmd.pid(),
            }),
        )
            .into_response());
    }
    let mut running = blocking(move || {
        let sb = mgr.get(&id)?;
        sb.exec_stream(&req)
    })
    .await?;
    st.metrics.exec_total.inc();
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let st2 = st.clone();
    tokio::task::spawn_blocking(move || {
        // Dropping `running` before its exit kills the command: a client that went away
        // leaves nothing behind.
        loop {
            let line = match running.next(Duration::from_millis(500)) {
                Ok(Some(OutputEvent::Started { pid })) => {
                    ndjson_line(&serde_json::json!({"type": "start", "pid": pid}))
                }
                Ok(Some(OutputEvent::Stdout(b))) => {
                    ndjson_line(&serde_json::json!({"type": "stdout", "data": B64.encode(b)}))
                }
                Ok(Some(OutputEvent::Stderr(b))) => {
                    ndjson_line(&serde_json::json!({"type": "stderr", "data": B64.encode(b)}))
                }
                Ok(Some(OutputEvent::Exit(x))) => {
                    st2.metrics
                        .exec_seconds
                        .observe(x.duration_ms as f64 / 1000.0);
                    ndjson_line(&serde_json::json!({
                        "type": "exit", "exit_code": x.exit_code, "signal": x.signal,
                        "timed_out": x.timed_out, "duration_ms": x.duration_ms,
                    }))
                }
                Ok(None) => {
                    if tx.is_closed() {
                        break;
                    }
                    continue;
                }
                Err(e) => ndjson_line(&serde_json::json!({
                    "type": "error", "error": ApiError::from(e).detail,
                })),
            };
            if !send_or_give_up(&tx, line) || running.finished() {
                break;
            }
        }
    });
    Ok(ndjson_response(rx))
}

async fn sandbox(st: &Arc<AppState>, id: String) -> ApiResult<Arc<forkd_sandbox::Sandbox>> {
    let mgr = st.mgr.clone();
    blocking(move || mgr.get(&id)).await
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/commands", responses((status = 200, body = CommandList)))]
pub async fn list_commands(
    State(st): S,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<CommandList>> {
    let sb = sandbox(&st, id).await?;
    Ok(axum::Json(CommandList {
        commands: sb.commands().iter().map(|c| c.status()).collect(),
    }))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/commands/{cid}", responses((status = 200, body = CommandStatus)))]
pub async fn get_command(
    State(st): S,
    Path((id, cid)): Path<(String, String)>,
) -> ApiResult<axum::Json<CommandStatus>> {
    let sb = sandbox(&st, id).await?;
    Ok(axum::Json(sb.command(&cid)?.status()))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/commands/{cid}/wait", params(WaitQuery),
    responses((status = 200, body = CommandStatus), (status = 504, body = ErrorBody)))]
pub async fn wait_command(
    State(st): S,
    Path((id, cid)): Path<(String, String)>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<axum::Json<CommandStatus>> {
    let t = secs("timeout_s", q.timeout_s)?.unwrap_or(Duration::from_secs(30));
    let sb = sandbox(&st, id).await?;
    let cmd = sb.command(&cid)?;
    let status = blocking(move || cmd.wait(t)).await?;
    Ok(axum::Json(status))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/commands/{cid}/output", responses((status = 200, body = CommandOutput)))]
pub async fn command_output(
    State(st): S,
    Path((id, cid)): Path<(String, String)>,
) -> ApiResult<axum::Json<CommandOutput>> {
    let sb = sandbox(&st, id).await?;
    let cmd = sb.command(&cid)?;
    let o = blocking(move || Ok(cmd.output())).await?;
    Ok(axum::Json(CommandOutput {
        stdout: B64.encode(&o.stdout),
        stderr: B64.encode(&o.stderr),
        stdout_dropped: o.stdout_dropped,
        stderr_dropped: o.stderr_dropped,
        running: o.running,
    }))
}

/// A signal by number or by name (`TERM`, `SIGTERM`).
fn signal_number(v: &serde_json::Value) -> ApiResult<i32> {
    const NAMES: &[(&str, i32)] = &[
        ("HUP", libc::SIGHUP),
        ("INT", libc::SIGINT),
        ("QUIT", libc::SIGQUIT),
        ("KILL", libc::SIGKILL),
        ("USR1", libc::SIGUSR1),
        ("USR2", libc::SIGUSR2),
        ("TERM", libc::SIGTERM),
        ("CONT", libc::SIGCONT),
        ("STOP", libc::SIGSTOP),
    ];
    let n = match v {
        serde_json::Value::Number(n) => n.as_i64().and_then(|n| i32::try_from(n).ok()),
        serde_json::Value::String(s) => {
            let s = s.trim_start_matches("SIG");
            NAMES.iter().find(|(k, _)| *k == s).map(|(_, n)| *n)
        }
        _ => None,
    };
    match n {
        Some(n) if (1..=64).contains(&n) => Ok(n),
        _ => Err(ApiError::bad_request(format!(
            "field `signal`: {v} is not a signal (a number 1…64, or TERM, KILL, INT, HUP, …)"
        ))),
    }
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/commands/{cid}/signal", request_body = SignalBody, responses((status = 204)))]
pub async fn signal_command(
    State(st): S,
    Path((id, cid)): Path<(String, String)>,
    JsonBody(body): JsonBody<SignalBody>,
) -> ApiResult<StatusCode> {
    let sig = signal_number(&body.signal)?;
    let sb = sandbox(&st, id).await?;
    let cmd = sb.command(&cid)?;
    let pid = cmd.pid().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("command {cid} has no process yet"),
        )
    })?;
    blocking(move || sb.signal(pid, sig)).await?;
    Ok(StatusCode::NO_CONTENT)
}

// --- code -----------------------------------------------------------------------------------

#[utoipa::path(post, path = "/v1/sandboxes/{id}/run", request_body = RunBody, responses((status = 200, body = RunResult)))]
pub async fn run_code(
    State(st): S,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RunBody>,
) -> ApiResult<axum::Json<RunResult>> {
    let t = secs("timeout_s", body.timeout_s)?;
    let sb = sandbox(&st, id).await?;
    let r = blocking(move || sb.run_code(&body.code, t)).await?;
    Ok(axum::Json(RunResult {
        output: r.output,
        duration_ms: r.duration_ms,
    }))
}

// --- files ----------------------------------------------------------------------------------

fn file_mode(q: &PathQuery) -> ApiResult<Option<u32>> {
    q.mode
        .as_deref()
        .map(|m| {
            u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| {
                    ApiError::bad_request(format!("query `mode`: {m:?} is not an octal file mode"))
                })
        })
        .transpose()
}

#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", params(PathQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = Written), (status = 502, body = ErrorBody)))]
pub async fn put_file(
    State(st): S,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
    body: Body,
) -> ApiResult<axum::Json<Written>> {
    use futures::TryStreamExt as _;
    let mode = file_mode(&q)?;
    let sb = sandbox(&st, id).await?;
    let stream = body
        .into_data_stream()
        .map_err(|e| std::io::Error::other(e.to_string()));
    let reader = tokio_util::io::StreamReader::new(stream);
    let mut sync = tokio_util::io::SyncIoBridge::new(reader);
    let path = q.path.clone();
    let size = blocking(move || {
        let written = sb.write_file(&path, mode, &mut sync);
        if written.is_err() {
            // Read on what the client is still sending (up to a cap) before answering: an
            // answer sent mid-body closes the connection under a client that is still
            // writing, and it then sees a reset instead of this error (a full guest disk
            // was reported as "error writing a body to connection").
            use std::io::Read as _;
            let _ = std::io::copy(
                &mut (&mut sync).take(DRAIN_AFTER_ERROR),
                &mut std::io::sink(),
            );
        }
        written
    })
    .await?;
    Ok(axum::Json(Written { path: q.path, size }))
}

/// Most bytes of a failed upload read and dropped so that its client gets the error: more
/// than the uploads tests and SDKs send in one piece, little next to what a sandbox's disk
/// holds. A client still sending past it sees the connection close.
const DRAIN_AFTER_ERROR: u64 = 64 << 20;

#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", params(PathQuery),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = ErrorBody)))]
pub async fn get_file(
    State(st): S,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Response> {
    let sb = sandbox(&st, id).await?;
    // Errors that can be known up front (no such file, a directory) get a proper status;
    // the stream itself starts only for a readable file.
    let (sb, entry) = {
        let p = q.path.clone();
        blocking(move || sb.stat(&p).map(|e| (sb, e))).await?
    };
    if entry.kind == forkd_agent::FileKind::Dir {
        return Err(forkd_sandbox::SandboxError::Guest {
            code: forkd_agent::ErrorCode::IsADirectory,
            message: format!("{} is a directory (list it: GET …/files/list)", q.path),
        }
        .into());
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    tokio::task::spawn_blocking(move || {
        let mut sink = |b: &[u8]| {
            if send_or_give_up(&tx, Ok(Bytes::copy_from_slice(b))) {
                Ok(())
            } else {
                Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            }
        };
        if let Err(e) = sb.read_file(&q.path, &mut sink) {
            // Cut the body: the client sees a failed transfer, not a short file.
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response())
}

fn entry(e: forkd_agent::FileEntry) -> FileEntry {
    FileEntry {
        name: e.name,
        path: e.path,
        kind: serde_json::to_value(e.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        size: e.size,
        mode: e.mode,
        mtime: e.mtime,
    }
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/list", params(PathQuery), responses((status = 200, body = FileList)))]
pub async fn list_files(
    State(st): S,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<axum::Json<FileList>> {
    let sb = sandbox(&st, id).await?;
    let list = blocking(move || sb.list_files(&q.path)).await?;
    Ok(axum::Json(FileList {
        entries: list.entries.into_iter().map(entry).collect(),
        truncated: list.truncated,
    }))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/stat", params(PathQuery), responses((status = 200, body = FileEntry)))]
pub async fn stat_file(
    State(st): S,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<axum::Json<FileEntry>> {
    let sb = sandbox(&st, id).await?;
    let e = blocking(move || sb.stat(&q.path)).await?;
    Ok(axum::Json(entry(e)))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/files/mkdir", params(PathQuery), responses((status = 204)))]
pub async fn mkdir(
    State(st): S,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<StatusCode> {
    let sb = sandbox(&st, id).await?;
    blocking(move || sb.mkdir(&q.path, q.parents)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}/files", params(PathQuery), responses((status = 204)))]
pub async fn delete_file(
    State(st): S,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<StatusCode> {
    let sb = sandbox(&st, id).await?;
    blocking(move || sb.remove(&q.path, q.recursive)).await?;
    Ok(StatusCode::NO_CONTENT)
}
