//! `forkd-net`: a per-child user-mode network back end for a QEMU guest.
//!
//! One process per child VM. QEMU hands it a connected `SOCK_STREAM` unix
//! socket carrying Ethernet frames, each prefixed by a 4-byte big-endian
//! length (`-netdev stream,addr.type=fd` / `-netdev socket,fd=N`). A smoltcp
//! stack plays the gateway; guest TCP connections are terminated here and
//! re-made from the host if the [`policy::Policy`] allows them. This process is
//! the child's only path to the network, and the guest is hostile: every
//! buffer and table is capped, and malformed frames are dropped, never trusted.
//!
//! # Guest view
//!
//! Guest 10.0.2.15/24, gateway 10.0.2.2 (also the host's loopback:
//! 10.0.2.2:P is dialled on the host as 127.0.0.1:P), DNS 10.0.2.3 (UDP only).
//! The stack answers ARP and ping for .2 and .3 only. Every TCP SYN is
//! checked against the policy: allowed ones are connected on the host first,
//! and only then does the guest get its SYN-ACK (a host refusal or a 10 s
//! timeout becomes a RST); denied ones get a RST at once. Other UDP and
//! ICMP, IPv6, and IPv4 fragments are dropped.
//!
//! # Config JSON ([`NetConfig`])
//!
//! ```json
//! {
//!   "policy": { "rules": ["host:8000", "*.example.com:443", "10.1.0.0/16"], "allow_all": false },
//!   "expose": [ { "guest": 8080, "host": 18080 }, { "guest": 22 } ],
//!   "rate_mbit": 100
//! }
//! ```
//!
//! Every field is optional (`rate_mbit` defaults to 100; 0 = unlimited; an
//! `expose` without `host` or with 0 gets an ephemeral port). [`Ready`] is
//! `{"ports":[{"guest":8080,"host":18080},{"guest":22,"host":40123}]}`.
//!
//! # DNS
//!
//! A query for a name no rule allows is answered REFUSED (not NXDOMAIN, so it
//! is distinguishable from a name that does not exist). Allowed names are
//! resolved per query with the host's resolver (3 s cap), answers filtered
//! by [`Policy::filter_answer`], TTL 60. AAAA and other types get an empty
//! NOERROR. `host.forkd.internal` always answers 10.0.2.2.
//!
//! # Rate limit
//!
//! One token bucket per child covers TCP payload in both directions (DNS and
//! handshake overhead are not counted). When it is empty the loop stops
//! moving bytes: smoltcp's receive window closes towards the guest and the
//! host socket is no longer read, so nothing is dropped.

pub mod dns;
mod frame;
pub mod policy;
mod stack;

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

pub use policy::{Policy, Rule, RuleError};

/// The guest's address (a /24 with the gateway).
pub const GUEST_ADDR: Ipv4Addr = forkd_agent::guest_net::ADDR;
/// Prefix length of the guest network.
pub const GUEST_PREFIX: u8 = forkd_agent::guest_net::PREFIX;
/// The gateway; it also stands for the host's loopback (10.0.2.2:P -> 127.0.0.1:P).
pub const GATEWAY_ADDR: Ipv4Addr = forkd_agent::guest_net::GATEWAY;
/// The filtering DNS server.
pub const DNS_ADDR: Ipv4Addr = forkd_agent::guest_net::DNS;
/// MAC address of the stack (gateway and DNS server).
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];
/// Name that always resolves to the gateway, whatever the policy (connecting
/// to it still needs a `host` rule).
pub const HOST_NAME: &str = "host.forkd.internal";
/// Largest frame accepted on the link (QEMU's own limit for stream netdevs).
pub const MAX_FRAME: usize = 65536;
/// Most concurrent guest TCP flows (outbound and inbound together).
pub const MAX_TCP_FLOWS: usize = 256;
/// Most DNS queries being resolved at once; more are dropped (the guest retries).
pub const MAX_PENDING_DNS: usize = 64;

/// One inbound port: host 127.0.0.1:`host` forwards to guest 10.0.2.15:`guest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expose {
    pub guest: u16,
    /// None or 0: an ephemeral port, reported in [`Ready`].
    #[serde(default)]
    pub host: Option<u16>,
}

fn default_rate() -> u32 {
    100
}

/// Configuration of one child's network (passed as JSON by the CLI).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub expose: Vec<Expose>,
    /// Token-bucket rate shared by both directions, in Mbit/s; 0 = unlimited.
    #[serde(default = "default_rate")]
    pub rate_mbit: u32,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            policy: Policy::default(),
            expose: Vec::new(),
            rate_mbit: default_rate(),
        }
    }
}

/// One bound inbound port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMap {
    pub guest: u16,
    pub host: u16,
}

/// Reported once every expose listener is bound, before any traffic flows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub ports: Vec<PortMap>,
}

/// Errors of [`serve`].
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot expose guest port {guest}: host port 127.0.0.1:{port} is already in use")]
    PortTaken { guest: u16, port: u16 },
    #[error("cannot expose guest port {guest} on host port 127.0.0.1:{port}: {source}")]
    Bind {
        guest: u16,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the network runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("link to QEMU failed: {0}")]
    Link(#[source] std::io::Error),
    #[error("link to QEMU sent a frame of {len} bytes (limit {MAX_FRAME}); closing it")]
    FrameTooLarge { len: u32 },
}

/// Runs the back end for one child until the link reaches EOF.
///
/// Binds every [`Expose`] listener first (a taken port is
/// [`NetError::PortTaken`], returned before `ready` is called), then calls
/// `ready`, then serves the link on a single-threaded runtime so one child can
/// never use more than one core. Returns `Ok(())` when QEMU closes the link.
pub fn serve(
    cfg: NetConfig,
    link: std::os::unix::net::UnixStream,
    ready: impl FnOnce(&Ready),
) -> Result<(), NetError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // Host DNS lookups (getaddrinfo) run on blocking threads; a few are
        // plenty, and queued lookups still obey the per-query timeout.
        .max_blocking_threads(4)
        .thread_name("forkd-net")
        .build()
        .map_err(NetError::Runtime)?;
    let result = rt.block_on(stack::run(cfg, link, ready));
    // A getaddrinfo stuck on a dead resolver must not delay the exit.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    result
}

/// Makes a guest-supplied string safe for a log line: non-printable and
/// non-ASCII characters are escaped, and the length is capped.
pub fn sanitize(s: &str) -> String {
    let mut out: String = s.chars().take(256).flat_map(char::escape_default).collect();
    if s.chars().count() > 256 {
        out.push_str("...");
    }
    out
}
