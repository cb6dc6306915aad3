//! Reset the TCP connections a forked child inherited.
//!
//! A child restored from a parent (or from a branch of a running child) holds every socket the
//! parent had, ESTABLISHED and all. Its peers never heard of this copy, and its new network back
//! end knows none of them: such a connection can only hang, or worse, be answered by a peer that
//! took the segment for the parent's. So when a child takes its identity the agent destroys
//! every TCP socket that is not on loopback, through the kernel's sock_diag `SOCK_DESTROY`
//! (CONFIG_INET_DIAG_DESTROY, set in Debian's kernels; modules inet_diag and tcp_diag, loaded by
//! the initramfs). Their owners see ECONNABORTED at once. Loopback connections are the guest's
//! own business and stay.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NETLINK_SOCK_DIAG: i32 = 4;
/// `struct nlmsghdr`.
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_sockid`: ports, two 16-byte addresses, interface, cookie.
const SOCKID: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, sockid.
const REQ: usize = 8 + SOCKID;
/// `struct inet_diag_msg` starts with family, state, timer, retrans, then the sockid.
const MSG_MIN: usize = 4 + SOCKID;
/// TCP states that hold a connection to a peer (not LISTEN, CLOSE or TIME_WAIT, which has no
/// socket left to destroy): ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT,
/// LAST_ACK, CLOSING.
const STATES: u32 =
    (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 11);
/// Most sockets looked at (a guest can open many; this bounds the agent's work).
const MAX_SOCKETS: usize = 65536;

fn message(kind: u16, flags: u16, seq: u32, states: u32, sockid: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDR + REQ);
    m.extend_from_slice(&((NLMSG_HDR + REQ) as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(sockid);
    m.resize(NLMSG_HDR + REQ, 0);
    m
}

fn send(sock: &OwnedFd, msg: &[u8]) -> Result<(), String> {
    // SAFETY: `msg` is a live buffer of the given length; send(2) only reads it.
    let n = unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(format!(
            "sock_diag send: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn recv(sock: &OwnedFd, buf: &mut [u8]) -> Result<usize, String> {
    // SAFETY: `buf` is a live, writable buffer of the given length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(format!(
            "sock_diag recv: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(n as usize)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Whether a sockid's local or remote address is in 127.0.0.0/8 (the first byte of an IPv4
/// address in network order is its first octet).
fn on_loopback(sockid: &[u8]) -> bool {
    sockid[4] == 127 || sockid[20] == 127
}

/// The sockids of every TCP/IPv4 connection that is not on loopback.
fn connections(sock: &OwnedFd) -> Result<Vec<Vec<u8>>, String> {
    send(
        sock,
        &message(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            1,
            STATES,
            &[0; SOCKID],
        ),
    )?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    let mut seen = 0usize;
    loop {
        let n = recv(sock, &mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        let mut at = 0;
        while at + NLMSG_HDR <= n {
            let len = u32_at(&buf, at) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < NLMSG_HDR || at + len > n {
                return Err("sock_diag: a malformed reply".into());
            }
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let err = if len >= NLMSG_HDR + 4 {
                        u32_at(&buf, at + NLMSG_HDR) as i32
                    } else {
                        0
                    };
                    return Err(format!(
                        "sock_diag dump: {}",
                        std::io::Error::from_raw_os_error(-err)
                    ));
                }
                SOCK_DIAG_BY_FAMILY if len >= NLMSG_HDR + MSG_MIN => {
                    seen += 1;
                    let sockid = &buf[at + NLMSG_HDR + 4..at + NLMSG_HDR + 4 + SOCKID];
                    if !on_loopback(sockid) && seen <= MAX_SOCKETS {
                        out.push(sockid.to_vec());
                    }
                }
                _ => {}
            }
            at += (len + 3) & !3;
        }
    }
}

/// Destroy every inherited TCP/IPv4 connection that is not on loopback; returns how many.
pub fn reset_inherited() -> Result<usize, String> {
    // SAFETY: plain socket(2); the descriptor is owned by `sock` from here on.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(format!(
            "sock_diag socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let found = connections(&sock)?;
    let mut reset = 0;
    let mut buf = vec![0u8; 4096];
    for (i, id) in found.iter().enumerate() {
        send(
            &sock,
            &message(
                SOCK_DESTROY,
                NLM_F_REQUEST | NLM_F_ACK,
                2 + i as u32,
                STATES,
                id,
            ),
        )?;
        let n = recv(&sock, &mut buf)?;
        // The ack is an NLMSG_ERROR whose error is 0; ENOENT means it closed meanwhile.
        if n >= NLMSG_HDR + 4 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
            match u32_at(&buf, NLMSG_HDR) as i32 {
                0 => reset += 1,
                e if -e == libc::ENOENT => {}
                e => {
                    return Err(format!(
                        "SOCK_DESTROY: {}",
                        std::io::Error::from_raw_os_error(-e)
                    ));
                }
            }
        }
    }
    Ok(reset)
}
