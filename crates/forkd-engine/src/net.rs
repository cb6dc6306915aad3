//! A child's network back end: one process per child, linked to its QEMU by a socket pair.
//!
//! The engine does not know the network's policy. It starts the program a front end names
//! ([`NetPlan`]: the `forkd` binary's hidden `__netd` command, which runs forkd-net's user-mode
//! stack), hands it one end of a connected stream socket as descriptor 3 and QEMU the other
//! (`-netdev stream,addr.type=fd`). The back end answers one line on stdout: the host ports it
//! bound (`{"ports":[...]}`) or why it could not start (`{"error":{...}}`).
//!
//! Why a process and not a thread of forkd: a kept child (`fork --keep`, `forkd serve`)
//! outlives the forkd that made it, and its network must live exactly as long as it. The back
//! end stops at EOF on its end of the pair, which comes when QEMU exits, whoever kills it; so
//! nothing outlives its child, and a back end that dies takes only its own child's network.

use crate::error::{EngineError, IoCtx, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How to start a child's network back end.
#[derive(Debug, Clone)]
pub struct NetPlan {
    /// The program (the `forkd` binary).
    pub program: PathBuf,
    /// Its arguments, config included (`__netd --config JSON`).
    pub args: Vec<String>,
    /// What the guest's agent is told to configure.
    pub guest: forkd_agent::NetSetup,
    /// Host ports the plan asks for by number (`--expose HOST:GUEST`), checked before any
    /// child starts: a fixed port serves one child only, and a taken one fails the fork early.
    pub fixed_ports: Vec<u16>,
}

/// Refuse fixed host ports (`--expose HOST:GUEST`) that cannot work for `n` children: more
/// than one child, or a port that is taken now. (The back end binds it for real later; this
/// only makes the common failure clear and early.)
pub fn check_fixed_ports(fixed_ports: &[u16], n: usize) -> Result<()> {
    let Some(&first) = fixed_ports.first() else {
        return Ok(());
    };
    if n > 1 {
        return Err(EngineError::FixedPortShared { port: first, n });
    }
    for &port in fixed_ports {
        if std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port)).is_err() {
            return Err(EngineError::PortTaken { port });
        }
    }
    Ok(())
}

/// A guest port reachable on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMap {
    /// The port inside the child.
    pub guest: u16,
    /// The port on the host's loopback (127.0.0.1) that reaches it.
    pub host: u16,
}

/// Why a back end could not start, as it reported it.
#[derive(Debug, Clone, Deserialize)]
struct StartError {
    /// Machine-readable kind: `port_taken`, `config`, `io`.
    kind: String,
    #[serde(default)]
    port: Option<u16>,
    message: String,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Answer {
    Ready { ports: Vec<PortMap> },
    Failed { error: StartError },
}

/// How long a back end may take to bind its ports and answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest answer line read.
const MAX_ANSWER: u64 = 64 << 10;
/// The back end's end of the socket pair, as it sees it.
pub const LINK_FD: i32 = 3;

/// A running back end. Killed and reaped on drop unless [`NetLink::detach`]ed.
#[derive(Debug)]
pub struct NetLink {
    process: Option<Child>,
    pub ports: Vec<PortMap>,
    tied: bool,
}

/// Start the back end for a child whose run directory is `run_dir`. Returns the link and
/// QEMU's end of the pair (pass it to QEMU with [`crate::child::VmGuard::pass_fd`]).
/// `user`: uid and gid to run as (when forkd is root); `tied`: die with the calling thread.
pub fn start(
    plan: &NetPlan,
    run_dir: &Path,
    user: Option<(u32, u32)>,
    tied: bool,
) -> Result<(NetLink, std::fs::File)> {
    let (qemu_end, ours) = std::os::unix::net::UnixStream::pair()
        .at("cannot make a socket pair for the network of", run_dir)?;
    let log_path = run_dir.join("net.log");
    let log = forkd_store::private_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&log_path)
        .at("cannot create", &log_path)?;
    let mut cmd = Command::new(&plan.program);
    crate::util::private_and_tied(&mut cmd, tied);
    cmd.args(&plan.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0);
    if let Some((uid, gid)) = user {
        // The stack parses every frame a hostile guest sends: it gets no privilege to lose.
        // It drops to the user itself once started: dropping before exec would need the user
        // to be able to execute forkd's binary where it lies (not so in a 0700 directory).
        cmd.args(["--uid", &uid.to_string(), "--gid", &gid.to_string()]);
    }
    let link: OwnedFd = ours.into();
    let raw = link.as_raw_fd();
    // SAFETY: between fork and exec the hook only calls dup2(2) and fcntl(2), which are
    // async-signal-safe, on `raw`, which `link` keeps open until spawn() returns.
    unsafe {
        cmd.pre_exec(move || {
            if raw == LINK_FD {
                if libc::fcntl(raw, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, LINK_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .at("cannot start the network back end", &plan.program)?;
    drop(link);
    if tied {
        crate::reaper::tie(child.id());
    }
    let mut link = NetLink {
        process: None,
        ports: Vec::new(),
        tied,
    };
    let stdout = child.stdout.take();
    link.process = Some(child);
    let answer = read_answer(stdout);
    let ports = match answer {
        Ok(Answer::Ready { ports }) => ports,
        Ok(Answer::Failed { error }) => {
            return Err(match (error.kind.as_str(), error.port) {
                ("port_taken", Some(port)) => EngineError::PortTaken { port },
                _ => EngineError::Net(error.message),
            });
        }
        Err(why) => {
            let log = crate::util::tail(&log_path, 6);
            return Err(EngineError::Net(format!(
                "the network back end did not start: {why}{}",
                if log.trim().is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", log.trim().replace('\n', " | "))
                }
            )));
        }
    };
    link.ports = ports;
    let qemu_end: OwnedFd = qemu_end.into();
    Ok((link, std::fs::File::from(qemu_end)))
}

/// Read the back end's one answer line, within [`START_TIMEOUT`].
fn read_answer(stdout: Option<std::process::ChildStdout>) -> std::result::Result<Answer, String> {
    let Some(out) = stdout else {
        return Err("no stdout".into());
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("net-answer".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut line = String::new();
            let r = BufReader::new(out.take(MAX_ANSWER)).read_line(&mut line);
            let _ = tx.send(r.map(|_| line));
        })
        .map_err(|e| e.to_string())?;
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(Ok(line)) if line.trim().is_empty() => Err("it exited without answering".into()),
        Ok(Ok(line)) => serde_json::from_str(line.trim())
            .map_err(|e| format!("its answer is not understood ({e})")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {START_TIMEOUT:?}")),
    }
}

impl NetLink {
    /// Leave the back end running (a kept child): it stops by itself when QEMU exits.
    pub fn detach(mut self) {
        if let Some(p) = self.process.take()
            && self.tied
        {
            crate::reaper::untie(p.id());
        }
    }
}

impl Drop for NetLink {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.kill();
            if self.tied {
                crate::reaper::untie(p.id());
            }
            let _ = p.wait();
        }
    }
}
