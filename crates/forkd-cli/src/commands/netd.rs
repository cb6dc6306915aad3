//! `forkd __netd`: one child's network back end (hidden; the engine starts it, see
//! forkd_engine::net). All of the work is forkd-net's; this only wires the process up: the
//! configuration from argv, the link to QEMU on descriptor 3, one answer line on stdout.

use std::io::Write;
use std::os::fd::FromRawFd;

fn answer(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn fail(kind: &str, port: Option<u16>, message: String) -> anyhow::Result<()> {
    answer(serde_json::json!({"error": {"kind": kind, "port": port, "message": message}}));
    Err(anyhow::anyhow!(message))
}

/// Become `uid`:`gid` with no supplementary groups, for good (root cannot be regained).
fn drop_to(uid: u32, gid: u32) -> std::io::Result<()> {
    // SAFETY: plain credential system calls on this single-threaded process (no runtime has
    // started yet); setgroups gets a null list of length 0.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(uid) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

pub fn run(config: &str, user: Option<(u32, u32)>) -> anyhow::Result<()> {
    if let Some((uid, gid)) = user
        && let Err(e) = drop_to(uid, gid)
    {
        return fail("io", None, format!("cannot become uid {uid}: {e}"));
    }
    let cfg: forkd_net::NetConfig = match serde_json::from_str(config) {
        Ok(c) => c,
        Err(e) => return fail("config", None, format!("bad network configuration: {e}")),
    };
    let link_fd = forkd_engine::net::LINK_FD;
    // Descriptor 3 must be a stream socket: anything else was not given by the engine.
    let is_socket = rustix::fs::fstat(
        // SAFETY: borrowing a descriptor number for one fstat call; if 3 is not open, fstat
        // fails with EBADF and nothing else happens.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(link_fd) },
    )
    .is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Socket
    });
    if !is_socket {
        return fail(
            "config",
            None,
            "descriptor 3 is not the link to QEMU (this command is started by forkd itself)".into(),
        );
    }
    // SAFETY: descriptor 3 is open and a socket (checked above), and nothing else in this
    // process owns it.
    let link = unsafe { std::os::unix::net::UnixStream::from_raw_fd(link_fd) };
    let mut answered = false;
    let result = forkd_net::serve(cfg, link, |ready| {
        answered = true;
        answer(serde_json::json!(ready));
    });
    match result {
        Ok(()) => Ok(()),
        Err(e) if answered => Err(e.into()),
        Err(forkd_net::NetError::PortTaken { port, .. }) => fail(
            "port_taken",
            Some(port),
            format!("host port {port} is already in use"),
        ),
        Err(e) => fail("io", None, e.to_string()),
    }
}
