//! Sandbox commands: `serve` (the daemon), and `ps`, `exec`, `kill`, `cp` on kept children —
//! through the daemon when one runs, else directly (forkd_server::backend decides).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use forkd_sandbox::{CommandRequest, Manager, ManagerOptions, OutputEvent, Ownership};
use forkd_server::backend::{Backend, BackendError};

use crate::ctx::Ctx;
use crate::report::{EscapingWriter, ExitWith, Hint, Lines, escape_controls, exit};

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// Run the daemon: a REST API (docs/API.md) that owns sandboxes
    #[command(after_help = "Examples:\n  \
        forkd serve                                    # unix socket $FORKD_HOME/forkd.sock (0600)\n  \
        forkd serve --listen 127.0.0.1:7070 --token-file ~/.forkd-token\n  \
        forkd serve --listen 0.0.0.0:7443 --token-file T --tls-cert cert.pem --tls-key key.pem\n  \
        curl --unix-socket ~/.local/share/forkd/forkd.sock http://x/v1/health")]
    Serve(ServeArgs),
    /// List kept children (sandboxes)
    #[command(
        visible_alias = "ls-sandboxes",
        after_help = "Examples:\n  forkd ps\n  forkd ps --label team=ml --json"
    )]
    Ps {
        /// Only those with this label (k=v); repeat for more
        #[arg(long, value_name = "K=V")]
        label: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a kept child: forkd exec ID -- CMD [ARGS...], or --sh 'SHELL TEXT'
    #[command(after_help = "Examples:\n  \
        forkd exec tiny-3f2a1c-0 -- uname -a\n  \
        forkd exec tiny-3f2a1c-0 --sh 'echo $HOME; ls /tmp | wc -l'   # like fork --exec\n  \
        forkd exec --env K=v --cwd /tmp ID -- sh -c 'echo $K; pwd'\n  \
        echo data | forkd exec -i ID -- wc -c\n\n\
        After -- comes a program and its arguments (no shell); --sh runs one shell string with \
        /bin/sh -c, as `fork --exec` does. The command's exit code becomes forkd's (124 when it \
        ran over --timeout); its output is streamed as it comes. On a terminal, control \
        characters in the output are shown escaped (\\x1b...); piped or redirected, the bytes \
        are passed through untouched. --raw passes them to a terminal too.")]
    Exec {
        id: String,
        /// The program and its arguments, after --
        #[arg(last = true, required_unless_present = "sh", conflicts_with = "sh")]
        cmd: Vec<String>,
        /// Run this shell command with /bin/sh -c (the form `fork --exec` takes)
        #[arg(long, value_name = "SHELL_TEXT")]
        sh: Option<String>,
        /// Write the output to a terminal as is, control characters included
        #[arg(long)]
        raw: bool,
        /// Kill the command after this many seconds
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
        /// Environment variable for the command (repeatable)
        #[arg(long, short = 'e', value_name = "K=V")]
        env: Vec<String>,
        /// Working directory in the guest
        #[arg(long, value_name = "DIR")]
        cwd: Option<String>,
        /// Pass this process's stdin to the command
        #[arg(long, short = 'i')]
        stdin: bool,
        /// Print one JSON object with the exit status and the output (not streamed)
        #[arg(long)]
        json: bool,
    },
    /// Stop kept children
    #[command(after_help = "Examples:\n  forkd kill tiny-3f2a1c-0\n  forkd kill --all")]
    Kill {
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Copy a file into or out of a kept child: forkd cp SRC DST, one side ID:/path
    #[command(after_help = "Examples:\n  \
        forkd cp ./input.bin tiny-3f2a1c-0:/tmp/input.bin\n  \
        forkd cp tiny-3f2a1c-0:/tmp/out.txt ./out.txt\n  \
        forkd cp ID:/etc/hostname -          # to stdout\n  \
        tar c dir | forkd cp - ID:/tmp/dir.tar\n\n\
        Files go whole or not at all: an upload lands under a temporary name and is renamed.")]
    Cp {
        src: String,
        dst: String,
        /// Mode of the file created in the child (octal) [default: 644, or the source's]
        #[arg(long)]
        mode: Option<String>,
    },
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Serve TCP instead of the unix socket (needs --token-file): PORT or :PORT (127.0.0.1),
    /// HOST:PORT, [IPv6]:PORT; port 0 picks a free one
    #[arg(long, value_name = "ADDR", requires = "token_file")]
    listen: Option<String>,
    /// File holding the bearer token TCP clients must send (not readable by others)
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Serve TLS on --listen with this PEM certificate chain
    #[arg(long, value_name = "PEM", requires_all = ["listen", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// The PEM private key for --tls-cert (not readable by others)
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Hub that image references (OWNER/NAME) are pulled from [default: $FORKD_HUB, else the embedded hub]
    #[arg(long, env = "FORKD_HUB")]
    hub: Option<String>,
    /// Accept unsigned images from the hub
    #[arg(long)]
    insecure: bool,
    /// Pull an image named by reference whole before its first sandbox starts (by default
    /// sandboxes start while it downloads: docs/ENGINE.md, "Lazy fork")
    #[arg(long)]
    no_lazy: bool,
    #[command(flatten)]
    vm: super::vm::VmArgs,
}

/// The library's manager for this store, for a front end that owns nothing.
pub(super) fn manager(
    ctx: &Ctx,
    ownership: Ownership,
    vm: Option<&super::vm::VmArgs>,
) -> anyhow::Result<Manager> {
    let store = ctx.store()?;
    Ok(Manager::new(ManagerOptions {
        run_root: store.home().run_dir(),
        store,
        qemu: vm.and_then(|v| v.qemu.clone()),
        accel: vm.map(|v| v.accel).unwrap_or_default(),
        ownership,
        ready_timeout: Duration::from_secs(120),
    }))
}

/// The daemon if one answers, else the library directly.
pub(super) fn backend(ctx: &Ctx) -> anyhow::Result<Backend> {
    backend_with(ctx, None)
}

/// [`backend`], with the QEMU and accelerator of `vm` for the library.
pub(super) fn backend_with(ctx: &Ctx, vm: Option<&super::vm::VmArgs>) -> anyhow::Result<Backend> {
    let store = ctx.store()?;
    let socket = store.home().socket();
    Ok(Backend::open(
        manager(ctx, Ownership::Visitor, vm)?,
        &socket,
    ))
}

pub(super) fn with_hint(e: BackendError) -> anyhow::Error {
    let hint = e.hint();
    let err = anyhow::Error::from(e);
    match hint {
        Some(h) => err.context(Hint(h)),
        None => err,
    }
}

fn parse_kv(what: &str, items: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("{what} {s:?} is not K=V"))
        })
        .collect()
}

pub fn run(cmd: Cmd, ctx: &Ctx) -> anyhow::Result<()> {
    match cmd {
        Cmd::Serve(a) => serve(ctx, a),
        Cmd::Ps { label, json } => {
            let labels = parse_kv("--label", &label)?;
            let list = backend(ctx)?.list(&labels).map_err(with_hint)?;
            if json {
                // `tag` and `running` for scripts written against earlier releases.
                let rows: Vec<serde_json::Value> = list
                    .iter()
                    .map(|s| {
                        let mut v = serde_json::to_value(s).unwrap_or_default();
                        v["tag"] = serde_json::Value::from(s.image.clone());
                        v["running"] = serde_json::Value::from(s.state != "stopped");
                        v
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            println!(
                "{:<24} {:<16} {:<8} {:<8} {:<24} HOSTNAME",
                "ID", "IMAGE", "PID", "STATE", "NET"
            );
            for s in list {
                let cell = |t: &str| escape_controls(t, Lines::Escape).into_owned();
                let net = if s.ports.is_empty() {
                    (if s.net { "on" } else { "-" }).to_string()
                } else {
                    s.ports
                        .iter()
                        .map(|p| format!("127.0.0.1:{}->{}", p.host, p.guest))
                        .collect::<Vec<_>>()
                        .join(",")
                };
                println!(
                    "{:<24} {:<16} {:<8} {:<8} {:<24} {}",
                    cell(&s.id),
                    cell(&s.image),
                    s.pid,
                    s.state,
                    net,
                    cell(&s.hostname)
                );
            }
            Ok(())
        }
        Cmd::Exec {
            id,
            cmd,
            sh,
            raw,
            timeout,
            env,
            cwd,
            stdin,
            json,
        } => {
            let stdin_data = if stdin {
                let mut buf = Vec::new();
                std::io::stdin()
                    .take(MAX_STDIN + 1)
                    .read_to_end(&mut buf)
                    .context("cannot read stdin")?;
                if buf.len() as u64 > MAX_STDIN {
                    return Err(anyhow::anyhow!("stdin is larger than 64 MiB")).context(Hint(
                        format!("copy big inputs with `forkd cp FILE {id}:/tmp/FILE`"),
                    ));
                }
                Some(buf)
            } else {
                None
            };
            let shell_hint = sh.is_none().then(|| looks_like_shell(&cmd)).flatten();
            let (argv, shell) = match sh {
                Some(s) => (None, Some(s)),
                None => (Some(cmd), None),
            };
            let req = CommandRequest {
                argv,
                cmd: shell,
                env: parse_kv("--env", &env)?.into_iter().collect(),
                cwd,
                stdin_data,
                timeout: Some(Duration::from_secs(timeout)),
                ..Default::default()
            };
            let b = backend(ctx)?;
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let mut stdout = guest_output(std::io::stdout(), raw);
            let mut stderr = guest_output(std::io::stderr(), raw);
            let exit = b
                .exec(&id, &req, &mut |ev| match ev {
                    OutputEvent::Stdout(d) if json => out.extend_from_slice(d),
                    OutputEvent::Stderr(d) if json => err.extend_from_slice(d),
                    OutputEvent::Stdout(d) => {
                        let _ = stdout.write_all(d);
                        let _ = stdout.flush();
                    }
                    OutputEvent::Stderr(d) => {
                        let _ = stderr.write_all(d);
                    }
                    _ => {}
                })
                .map_err(with_hint)
                .map_err(|e| match &shell_hint {
                    Some(h) => e.context(Hint(h.clone())),
                    None => e,
                })
                .with_context(|| format!("cannot run the command in {id}"))?;
            drop((stdout, stderr));
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "exit_code": exit.exit_code, "signal": exit.signal,
                        "timed_out": exit.timed_out, "duration_ms": exit.duration_ms,
                        "stdout": String::from_utf8_lossy(&out), "stderr": String::from_utf8_lossy(&err),
                    }))?
                );
            }
            match exit.exit_code {
                Some(0) => Ok(()),
                Some(c) => std::process::exit(c),
                None if exit.timed_out => Err(anyhow::Error::new(ExitWith {
                    code: exit::TIMED_OUT,
                    message: format!(
                        "the command timed out after {timeout} s and was killed (--timeout SECS)"
                    ),
                })),
                None => Err(anyhow::Error::new(ExitWith {
                    code: exit
                        .signal
                        .and_then(|s| u8::try_from(128 + s).ok())
                        .unwrap_or(exit::ERROR),
                    message: format!("the command was killed (signal {:?})", exit.signal),
                })),
            }
        }
        Cmd::Kill { id, all } => {
            let b = backend(ctx)?;
            let ids: Vec<String> = if all {
                b.list(&[])
                    .map_err(with_hint)?
                    .into_iter()
                    .map(|s| s.id)
                    .collect()
            } else {
                id.into_iter().collect()
            };
            for id in &ids {
                b.kill(id)
                    .map_err(with_hint)
                    .with_context(|| format!("cannot stop {id}"))?;
                if !ctx.quiet {
                    eprintln!("stopped {id}");
                }
            }
            Ok(())
        }
        Cmd::Cp { src, dst, mode } => cp(ctx, &src, &dst, mode.as_deref()),
    }
}

const MAX_STDIN: u64 = 64 << 20;

/// Where a guest's output goes: a terminal sees control characters escaped (unless `raw`);
/// a pipe or a file gets the bytes as they are.
fn guest_output<W: Write + std::io::IsTerminal + 'static>(w: W, raw: bool) -> Box<dyn Write> {
    if !raw && w.is_terminal() {
        Box::new(EscapingWriter::new(w))
    } else {
        Box::new(w)
    }
}

/// `forkd exec ID -- 'echo $X'` runs a program called "echo $X". When the one word given looks
/// like shell text, the hint for a failure says how to run it through a shell.
fn looks_like_shell(argv: &[String]) -> Option<String> {
    let [one] = argv else { return None };
    let shelly = one.contains(char::is_whitespace)
        || one.contains(['$', ';', '|', '&', '<', '>', '`', '*', '(', '\'']);
    shelly.then(|| {
        format!(
            "{one:?} was taken as the name of one program; run shell text with \
             `forkd exec ID --sh {q}` (or `-- sh -c {q}`)",
            q = shell_quote(one)
        )
    })
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `forkd fork --keep` while a daemon runs: the daemon forks and owns the children; an
/// `--exec` command then runs in each through it.
pub(super) fn fork_kept(
    ctx: &Ctx,
    tag: &str,
    network: Option<forkd_sandbox::Network>,
    n: usize,
    exec: Option<&str>,
    exec_timeout: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let b = backend(ctx)?;
    let req = forkd_sandbox::CreateRequest {
        tag: tag.to_string(),
        count: n,
        network,
        ..Default::default()
    };
    let results = b
        .create(&req)
        .map_err(with_hint)
        .with_context(|| format!("cannot fork {tag}"))?;
    let mut rows = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let mut row = serde_json::json!({"index": i});
        match r {
            Ok(sb) => {
                row["id"] = sb.id.clone().into();
                row["hostname"] = sb.hostname.clone().into();
                row["ok"] = true.into();
                if let Some(cmd) = exec {
                    let (mut out, mut err) = (Vec::new(), Vec::new());
                    let req = CommandRequest {
                        cmd: Some(cmd.to_string()),
                        timeout: Some(exec_timeout),
                        ..Default::default()
                    };
                    let x = b.exec(&sb.id, &req, &mut |ev| match ev {
                        OutputEvent::Stdout(d) => out.extend_from_slice(d),
                        OutputEvent::Stderr(d) => err.extend_from_slice(d),
                        _ => {}
                    });
                    match x {
                        Ok(x) => {
                            if x.exit_code != Some(0) || x.timed_out {
                                row["ok"] = false.into();
                            }
                            row["timed_out"] = x.timed_out.into();
                            row["exec"] = serde_json::json!({
                                "exit_code": x.exit_code, "timed_out": x.timed_out,
                                "stdout": String::from_utf8_lossy(&out),
                                "stderr": String::from_utf8_lossy(&err),
                            })
                        }
                        Err(e) => {
                            row["ok"] = false.into();
                            row["error"] = e.to_string().into();
                        }
                    }
                }
                row["up"] = true.into();
            }
            Err(e) => {
                row["ok"] = false.into();
                row["up"] = false.into();
                row["error"] = e.clone().into();
            }
        }
        rows.push(row);
    }
    let alive = rows.iter().filter(|r| r["up"] == true).count();
    let succeeded = rows.iter().filter(|r| r["ok"] == true).count();
    let timed_out = rows.iter().filter(|r| r["timed_out"] == true).count();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "tag": tag, "requested": n, "alive": alive, "succeeded": succeeded, "children": rows,
                "kept": results.iter().filter_map(|r| r.as_ref().ok().map(|s| s.id.clone())).collect::<Vec<_>>(),
                "owner": "daemon",
            }))?
        );
    } else {
        for r in &rows {
            let status = match (r["up"] == true, r["timed_out"] == true, r["ok"] == true) {
                (false, _, _) => "FAILED",
                (true, true, _) => "TIMEOUT",
                (true, false, true) => "ok",
                (true, false, false) => "EXIT",
            };
            let text = r["exec"]["stdout"]
                .as_str()
                .or(r["error"].as_str())
                .unwrap_or("")
                .trim_end();
            println!(
                "{:<28} {:<7} {}",
                r["id"].as_str().unwrap_or("-"),
                status,
                escape_controls(text, Lines::Escape)
            );
        }
        println!("{alive}/{n} children alive; kept {alive} (owned by the daemon; forkd ps)");
    }
    super::engine::children_outcome(n, n - alive, timed_out, alive - succeeded)
}

/// `ID:/path` → (ID, /path). Local paths never contain `:` before a `/` here.
fn remote(s: &str) -> Option<(&str, &str)> {
    let (id, path) = s.split_once(':')?;
    (!id.is_empty() && !id.contains('/') && path.starts_with('/')).then_some((id, path))
}

fn cp(ctx: &Ctx, src: &str, dst: &str, mode: Option<&str>) -> anyhow::Result<()> {
    let mode = mode
        .map(|m| u32::from_str_radix(m, 8).with_context(|| format!("--mode {m:?} is not octal")))
        .transpose()?;
    let b = backend(ctx)?;
    match (remote(src), remote(dst)) {
        (None, Some((id, path))) => {
            let (reader, mode): (Box<dyn Read + Send>, Option<u32>) = if src == "-" {
                (Box::new(std::io::stdin()), mode)
            } else {
                let f = std::fs::File::open(src).with_context(|| format!("cannot open {src}"))?;
                let meta = f.metadata()?;
                if meta.is_dir() {
                    return Err(anyhow::anyhow!("{src} is a directory")).context(Hint(format!(
                        "copy a tar: tar c {src} | forkd cp - {id}:{path}.tar"
                    )));
                }
                use std::os::unix::fs::PermissionsExt;
                (
                    Box::new(f),
                    mode.or(Some(meta.permissions().mode() & 0o777)),
                )
            };
            let n = b
                .upload(id, path, mode, reader)
                .map_err(with_hint)
                .with_context(|| format!("cannot copy {src} to {dst}"))?;
            if !ctx.quiet {
                eprintln!("copied {n} bytes to {dst}");
            }
            Ok(())
        }
        (Some((id, path)), None) => {
            let n = if dst == "-" {
                let mut out = std::io::stdout().lock();
                b.download(id, path, &mut out)
            } else {
                // Whole or nothing: write beside the target, rename when complete.
                let target = std::path::Path::new(dst);
                let dir = target
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."));
                let mut tmp = tempfile::NamedTempFile::new_in(dir)
                    .with_context(|| format!("cannot write in {}", dir.display()))?;
                let n = b.download(id, path, tmp.as_file_mut());
                if n.is_ok() {
                    tmp.persist(target)
                        .with_context(|| format!("cannot write {dst}"))?;
                }
                n
            }
            .map_err(with_hint)
            .with_context(|| format!("cannot copy {src} to {dst}"))?;
            if !ctx.quiet && dst != "-" {
                eprintln!("copied {n} bytes to {dst}");
            }
            Ok(())
        }
        (Some(_), Some(_)) => {
            bail!("copy between two children is not supported: go through a local file")
        }
        (None, None) => Err(anyhow::anyhow!("neither {src} nor {dst} names a child")).context(
            Hint("one side must be ID:/absolute/path (see forkd ps)".into()),
        ),
    }
}

fn serve(ctx: &Ctx, a: ServeArgs) -> anyhow::Result<()> {
    crate::ignore_sigpipe();
    let store = ctx.store()?;
    let listen = match (&a.listen, &a.token_file) {
        (Some(addr), Some(f)) => forkd_server::Listen::Tcp {
            addr: forkd_hub::address::listen_addr(addr)
                .map_err(|e| {
                    let hint = e.hint();
                    anyhow::Error::from(e).context(Hint(hint.into()))
                })?
                .to_string(),
            token: read_private_token(f)?,
            tls: match (&a.tls_cert, &a.tls_key) {
                (Some(c), Some(k)) => {
                    check_private(k)?;
                    Some((c.clone(), k.clone()))
                }
                _ => None,
            },
        },
        _ => forkd_server::Listen::Unix(store.home().socket()),
    };
    let mgr = manager(ctx, Ownership::Owner, Some(&a.vm))?;
    let quiet = ctx.quiet;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(forkd_server::serve(forkd_server::ServeOptions {
        manager: mgr,
        listen,
        log_dir: store.home().log_dir(),
        hub: forkd_server::HubConfig {
            url: a.hub,
            insecure: a.insecure,
            no_lazy: a.no_lazy,
        },
        on_ready: Some(Box::new(move |at| {
            if !quiet {
                eprintln!("forkd serve: listening on {at}");
            }
        })),
    }))
    .map_err(anyhow::Error::from)
    .context("forkd serve stopped")
}

/// A secret file (token, TLS key) must not be readable by other users.
fn check_private(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(anyhow::anyhow!(
            "{} is readable by other users",
            path.display()
        ))
        .context(Hint(format!("chmod 600 {}", path.display())));
    }
    Ok(())
}

/// A token file must exist, hold a non-empty line, and not be readable by other users.
fn read_private_token(path: &std::path::Path) -> anyhow::Result<String> {
    check_private(path)?;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(4096)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let t = text.trim().to_string();
    if t.is_empty() {
        bail!("the token file {} is empty", path.display());
    }
    Ok(t)
}
