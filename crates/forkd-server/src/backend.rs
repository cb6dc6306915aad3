//! The sandbox calls a short-lived front end (the CLI) makes, answered by the daemon when one
//! runs (so kept children always have an owner), else by the library directly on
//! `$FORKD_HOME/run/`. Both give the same answers in the same shapes.

use crate::api;
use crate::client::{Client, ClientError, q};
use base64::Engine as _;
use forkd_sandbox::{CommandRequest, CreateRequest, Manager, OutputEvent, SandboxError};
use hyper::Method;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::time::Duration;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

pub enum Backend {
    Daemon(Client),
    Local(Manager),
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Daemon(#[from] ClientError),
    #[error(transparent)]
    Local(#[from] SandboxError),
}

impl BackendError {
    pub fn hint(&self) -> Option<String> {
        match self {
            BackendError::Daemon(ClientError::Api { hint, .. }) => hint.clone(),
            BackendError::Daemon(ClientError::Connect { .. }) => {
                Some("is `forkd serve` running? (FORKD_URL points at it)".into())
            }
            BackendError::Local(e) => e.hint(),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, BackendError>;

/// How a command ended.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Exit {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub duration_ms: u64,
}

impl Backend {
    /// The daemon when one answers, else the library on the store's run directory.
    pub fn open(mgr: Manager, socket: &std::path::Path) -> Backend {
        match Client::discover(socket) {
            Some(c) => Backend::Daemon(c),
            None => Backend::Local(mgr),
        }
    }

    pub fn is_daemon(&self) -> bool {
        matches!(self, Backend::Daemon(_))
    }

    /// Every sandbox whose labels include `labels`.
    pub fn list(&self, labels: &[(String, String)]) -> Result<Vec<api::Sandbox>> {
        match self {
            Backend::Daemon(c) => {
                let mut path = "/v1/sandboxes".to_string();
                for (i, (k, v)) in labels.iter().enumerate() {
                    path.push(if i == 0 { '?' } else { '&' });
                    path.push_str(&format!("label={}", q(&format!("{k}={v}"))));
                }
                let v: Value = c.json(Method::GET, &path, None)?;
                Ok(
                    serde_json::from_value::<Vec<api::Sandbox>>(v["sandboxes"].clone())
                        .map_err(|e| ClientError::Decode(e.to_string()))?,
                )
            }
            Backend::Local(m) => {
                m.recover()?;
                Ok(m.infos(labels)
                    .into_iter()
                    .map(api::Sandbox::from)
                    .collect())
            }
        }
    }

    pub fn kill(&self, id: &str) -> Result<()> {
        match self {
            Backend::Daemon(c) => {
                c.send(Method::DELETE, &format!("/v1/sandboxes/{}", q(id)), None)?;
                Ok(())
            }
            Backend::Local(m) => Ok(m.kill(id)?),
        }
    }

    /// Fork `req.count` kept sandboxes; one result per child.
    pub fn create(
        &self,
        req: &CreateRequest,
    ) -> Result<Vec<std::result::Result<api::Sandbox, String>>> {
        match self {
            Backend::Daemon(c) => {
                let mut body = json!({
                    "image": req.image.clone().unwrap_or_else(|| req.tag.clone()),
                    "count": req.count, "env": req.env, "labels": req.labels,
                    "ttl_s": req.ttl.map(|t| t.as_secs()),
                });
                if let Some(n) = &req.network {
                    body["network"] = json!(n);
                }
                let v: Value = c.json(Method::POST, "/v1/sandboxes", Some(&body))?;
                let results = v["results"].as_array().cloned().unwrap_or_default();
                Ok(results
                    .into_iter()
                    .map(
                        |r| match serde_json::from_value::<api::Sandbox>(r["sandbox"].clone()) {
                            Ok(s) => Ok(s),
                            Err(_) => Err(r["error"]["message"]
                                .as_str()
                                .unwrap_or("failed")
                                .to_string()),
                        },
                    )
                    .collect())
            }
            Backend::Local(m) => {
                let out = m.create(req, None)?;
                Ok(out
                    .results
                    .into_iter()
                    .map(|r| r.map(|s| api::Sandbox::from(s.info())))
                    .collect())
            }
        }
    }

    /// Save the running sandbox `id` as the image `tag`, a branch (it runs on).
    pub fn snapshot(
        &self,
        id: &str,
        tag: &str,
        overwrite: forkd_store::Overwrite,
    ) -> Result<api::Branch> {
        match self {
            Backend::Daemon(c) => {
                let body = json!({ "tag": tag, "force": overwrite == forkd_store::Overwrite::Yes });
                let v: Value = c.json(
                    Method::POST,
                    &format!("/v1/sandboxes/{}/snapshot", q(id)),
                    Some(&body),
                )?;
                Ok(serde_json::from_value(v).map_err(|e| ClientError::Decode(e.to_string()))?)
            }
            Backend::Local(m) => Ok(m.snapshot(id, tag, overwrite)?.into()),
        }
    }

    /// Run a command, handing each output event to `on_event` as it comes.
    pub fn exec(
        &self,
        id: &str,
        req: &CommandRequest,
        on_event: &mut dyn FnMut(&OutputEvent),
    ) -> Result<Exit> {
        match self {
            Backend::Daemon(c) => {
                let body = json!({
                    "cmd": req.cmd, "argv": req.argv, "env": req.env, "cwd": req.cwd,
                    "stdin": req.stdin,
                    "stdin_data": req.stdin_data.as_ref().map(|d| B64.encode(d)),
                    "timeout_s": req.timeout.map(|t| t.as_secs_f64()),
                });
                let mut exit = None;
                let mut failure = None;
                c.ndjson(
                    Method::POST,
                    &format!("/v1/sandboxes/{}/commands", q(id)),
                    Some(&body),
                    &mut |v| {
                        let data = || {
                            B64.decode(v["data"].as_str().unwrap_or(""))
                                .unwrap_or_default()
                        };
                        match v["type"].as_str() {
                            Some("start") => on_event(&OutputEvent::Started {
                                pid: v["pid"].as_u64().unwrap_or(0) as u32,
                            }),
                            Some("stdout") => on_event(&OutputEvent::Stdout(data())),
                            Some("stderr") => on_event(&OutputEvent::Stderr(data())),
                            Some("exit") => exit = serde_json::from_value::<Exit>(v).ok(),
                            Some("error") => {
                                failure = Some(ClientError::Api {
                                    status: 500,
                                    code: v["error"]["code"].as_str().unwrap_or("internal").into(),
                                    message: v["error"]["message"].as_str().unwrap_or("").into(),
                                    hint: v["error"]["hint"].as_str().map(str::to_string),
                                })
                            }
                            _ => {}
                        }
                        true
                    },
                )?;
                if let Some(f) = failure {
                    return Err(f.into());
                }
                exit.ok_or_else(|| {
                    ClientError::Decode("the stream ended before the command's exit".into()).into()
                })
            }
            Backend::Local(m) => {
                let sb = m.get(id)?;
                let mut running = sb.exec_stream(req)?;
                loop {
                    match running.next(Duration::from_secs(1))? {
                        Some(OutputEvent::Exit(x)) => {
                            return Ok(Exit {
                                exit_code: x.exit_code,
                                signal: x.signal,
                                timed_out: x.timed_out,
                                duration_ms: x.duration_ms,
                            });
                        }
                        Some(ev) => on_event(&ev),
                        None => {}
                    }
                }
            }
        }
    }

    /// Copy `src` into the sandbox at `path`.
    pub fn upload(
        &self,
        id: &str,
        path: &str,
        mode: Option<u32>,
        mut src: Box<dyn Read + Send>,
    ) -> Result<u64> {
        match self {
            Backend::Daemon(c) => {
                let mut url = format!("/v1/sandboxes/{}/files?path={}", q(id), q(path));
                if let Some(m) = mode {
                    url.push_str(&format!("&mode={m:o}"));
                }
                let v = c.upload(&url, src)?;
                Ok(v["size"].as_u64().unwrap_or(0))
            }
            Backend::Local(m) => Ok(m.get(id)?.write_file(path, mode, &mut src)?),
        }
    }

    /// Copy the sandbox's file at `path` into `sink`.
    pub fn download(&self, id: &str, path: &str, sink: &mut dyn Write) -> Result<u64> {
        match self {
            Backend::Daemon(c) => Ok(c.download(
                &format!("/v1/sandboxes/{}/files?path={}", q(id), q(path)),
                sink,
            )?),
            Backend::Local(m) => {
                let sb = m.get(id)?;
                Ok(sb.read_file(path, &mut |b| sink.write_all(b))?)
            }
        }
    }
}
