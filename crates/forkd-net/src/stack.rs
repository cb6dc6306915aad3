//! The event loop: link I/O, the smoltcp interface, host sockets, DNS.
//!
//! Everything runs on one current-thread runtime. Host sockets and the link
//! are served by small tasks that talk to the loop through *bounded* channels,
//! so a slow side always pushes back on the fast one instead of growing a
//! buffer. The loop owns the interface and moves bytes between smoltcp sockets
//! and those channels, charging every byte to the child's token bucket.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use simple_dns::RCODE;
use smoltcp::iface::{
    Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet,
};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpListenEndpoint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::dns::{self, Parsed, QueryType};
use crate::frame::{self, FlowKey, Inspect};
use crate::policy::{HOST_LOOPBACK, is_special};
use crate::{
    DNS_ADDR, GATEWAY_ADDR, GATEWAY_MAC, GUEST_ADDR, HOST_NAME, MAX_FRAME, MAX_PENDING_DNS,
    MAX_TCP_FLOWS, NetConfig, NetError, PortMap, Ready,
};

/// Per-socket smoltcp buffers (each direction). 256 flows * 128 KiB bounds
/// the stack's memory at 32 MiB.
const TCP_BUF: usize = 64 * 1024;
/// Bytes moved per host read / per chunk handed to a host writer.
const CHUNK: usize = 16 * 1024;
/// Chunks queued between a host socket task and the loop, per direction.
const CHUNKS_QUEUED: usize = 4;
/// Frames queued towards QEMU before smoltcp is told the device is busy.
const TX_FRAMES: usize = 256;
/// Frames read ahead from QEMU.
const RX_FRAMES: usize = 64;
/// How long a host connect may take before the guest gets a RST.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on one DNS resolution on the host.
const DNS_TIMEOUT: Duration = Duration::from_secs(3);
/// A guest that ACKs nothing for this long loses the connection.
const TCP_TIMEOUT: Duration = Duration::from_secs(120);
/// After the guest has closed cleanly, how long a host writer may still take
/// to flush the last bytes.
const FLUSH_GRACE: Duration = Duration::from_secs(30);
/// Largest SYN frame held while its host connect runs (a full Ethernet frame).
const MAX_SYN_FRAME: usize = 1518;
/// Addresses remembered from DNS answers (oldest forgotten first).
const MAX_LEARNED: usize = 4096;
/// Ephemeral ports the gateway uses for inbound (expose) connections.
const INBOUND_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;

/// The smoltcp device: two queues that the loop fills from / drains to the link.
struct Device {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

struct RxTok(Vec<u8>);
struct TxTok<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl phy::Device for Device {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _ts: SmolInstant) -> Option<(RxTok, TxTok<'_>)> {
        let f = self.rx.pop_front()?;
        Some((RxTok(f), TxTok(&mut self.tx)))
    }

    fn transmit(&mut self, _ts: SmolInstant) -> Option<TxTok<'_>> {
        // A full queue makes smoltcp hold its segments (and retry later),
        // which is the back-pressure when QEMU is slow to read.
        (self.tx.len() < TX_FRAMES).then_some(TxTok(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

/// The child's byte budget, shared by both directions.
struct Bucket {
    /// Bytes per second; None = unlimited.
    rate: Option<f64>,
    tokens: f64,
    burst: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate_mbit: u32) -> Self {
        let rate = (rate_mbit > 0).then(|| f64::from(rate_mbit) * 125_000.0);
        // A 50 ms burst, but at least a few segments so slow rates still move.
        let burst = rate.map_or(0.0, |r| (r / 20.0).max(4.0 * 1460.0));
        Bucket {
            rate,
            tokens: burst,
            burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        if let Some(rate) = self.rate {
            let dt = now.duration_since(self.last).as_secs_f64();
            self.tokens = (self.tokens + dt * rate).min(self.burst);
        }
        self.last = now;
    }

    /// Grants up to `want` bytes. Grants nothing rather than a sliver, so the
    /// stack doesn't emit tiny segments while throttled.
    fn take(&mut self, want: usize) -> usize {
        if self.rate.is_none() {
            return want;
        }
        self.refill();
        let have = self.tokens.max(0.0) as usize;
        if have < want.min(1460) {
            return 0;
        }
        let n = want.min(have);
        self.tokens -= n as f64;
        n
    }

    fn refund(&mut self, n: usize) {
        if self.rate.is_some() {
            self.tokens = (self.tokens + n as f64).min(self.burst);
        }
    }

    /// When enough tokens for a full segment will be there.
    fn ready_in(&self) -> Duration {
        match self.rate {
            None => Duration::ZERO,
            Some(rate) => {
                let missing = (1460.0 - self.tokens).max(0.0);
                Duration::from_secs_f64(missing / rate) + Duration::from_millis(1)
            }
        }
    }
}

/// Refusals are logged one line each (they form the child's net log), but a
/// guest can trigger them in a loop: past this many lines per second they are
/// only counted, and the count is logged when the second is over.
const LOG_LINES_PER_SEC: u32 = 50;

struct LogBudget {
    window: Instant,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    fn new() -> Self {
        LogBudget {
            window: Instant::now(),
            used: 0,
            suppressed: 0,
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                info!(
                    suppressed = self.suppressed,
                    "refusal log lines suppressed (more than {LOG_LINES_PER_SEC}/s)"
                );
            }
            self.window = now;
            self.used = 0;
            self.suppressed = 0;
        }
        if self.used < LOG_LINES_PER_SEC {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// Addresses handed out in DNS answers for domain rules, with the ports those
/// rules allow (None = any). Bounded; the oldest entry goes first.
#[derive(Default)]
struct Learned {
    map: HashMap<Ipv4Addr, Vec<Option<u16>>>,
    order: VecDeque<Ipv4Addr>,
}

impl Learned {
    fn add(&mut self, ip: Ipv4Addr, ports: &[Option<u16>]) {
        let entry = match self.map.get_mut(&ip) {
            Some(e) => e,
            None => {
                if self.order.len() >= MAX_LEARNED
                    && let Some(old) = self.order.pop_front()
                {
                    self.map.remove(&old);
                }
                self.order.push_back(ip);
                self.map.entry(ip).or_default()
            }
        };
        for p in ports {
            if !entry.contains(p) && entry.len() < 16 {
                entry.push(*p);
            }
        }
    }

    fn allows(&self, ip: Ipv4Addr, port: u16) -> bool {
        self.map
            .get(&ip)
            .is_some_and(|ps| ps.iter().any(|p| p.is_none_or(|p| p == port)))
    }
}

enum LinkMsg {
    Frame(Vec<u8>),
    Eof,
    Error(NetError),
}

enum Event {
    Connected {
        key: FlowKey,
        result: io::Result<TcpStream>,
    },
    Inbound {
        guest: u16,
        stream: TcpStream,
    },
    Resolved {
        query: Vec<u8>,
        to: smoltcp::wire::IpEndpoint,
        name: String,
        ports: Vec<Option<u16>>,
        result: Result<Vec<Ipv4Addr>, RCODE>,
    },
}

/// One spliced TCP connection (outbound or inbound).
struct Flow {
    /// Outbound flows: the guest's 4-tuple, so retransmitted SYNs are recognised.
    key: Option<FlowKey>,
    /// Inbound flows: the gateway port in use.
    local_port: Option<u16>,
    from_host: Option<mpsc::Receiver<io::Result<Vec<u8>>>>,
    /// A host chunk partly written into the smoltcp socket.
    carry: Vec<u8>,
    carry_off: usize,
    to_host: Option<mpsc::Sender<Vec<u8>>>,
    reader: JoinHandle<()>,
    writer: Option<JoinHandle<()>>,
    established: bool,
    dst: SocketAddr,
}

impl Flow {
    fn start(stream: TcpStream, notify: &Arc<Notify>) -> Self {
        let dst = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        let (in_tx, in_rx) = mpsc::channel::<io::Result<Vec<u8>>>(CHUNKS_QUEUED);
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(CHUNKS_QUEUED);
        let n1 = notify.clone();
        let reader = tokio::spawn(async move {
            loop {
                // Wait for room first: while the loop isn't taking chunks we
                // stop reading, and the host's TCP window closes.
                let Ok(permit) = in_tx.reserve().await else {
                    return;
                };
                let mut buf = vec![0u8; CHUNK];
                match rd.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        buf.truncate(n);
                        permit.send(Ok(buf));
                    }
                    Err(e) => {
                        permit.send(Err(e));
                        break;
                    }
                }
                n1.notify_one();
            }
            drop(in_tx);
            n1.notify_one();
        });
        let n2 = notify.clone();
        let writer = tokio::spawn(async move {
            while let Some(buf) = out_rx.recv().await {
                if wr.write_all(&buf).await.is_err() {
                    // Dropping out_rx closes the channel: the loop sees that
                    // and resets the guest side.
                    drop(out_rx);
                    n2.notify_one();
                    return;
                }
                n2.notify_one();
            }
            // The guest sent FIN and everything is written: half-close.
            let _ = wr.shutdown().await;
        });
        Flow {
            key: None,
            local_port: None,
            from_host: Some(in_rx),
            carry: Vec::new(),
            carry_off: 0,
            to_host: Some(out_tx),
            reader,
            writer: Some(writer),
            established: false,
            dst,
        }
    }

    /// Ends the host side. After a clean guest close the writer may finish
    /// flushing (bounded); otherwise the host socket is closed at once.
    fn finish(mut self, clean: bool) {
        self.reader.abort();
        if let Some(w) = self.writer.take() {
            if clean && self.to_host.is_none() {
                let abort = w.abort_handle();
                tokio::spawn(async move {
                    tokio::time::sleep(FLUSH_GRACE).await;
                    abort.abort();
                });
            } else {
                w.abort();
            }
        }
    }
}

struct Stack {
    iface: Interface,
    dev: Device,
    sockets: SocketSet<'static>,
    flows: HashMap<SocketHandle, Flow>,
    /// Guest 4-tuples with a live smoltcp socket.
    keys: HashSet<FlowKey>,
    /// Outbound flows still in the handshake (their listener may revert).
    handshaking: HashSet<SocketHandle>,
    /// Allowed SYNs waiting for the host connect; the SYN frame is replayed
    /// into the interface once the outcome is known.
    pending: HashMap<FlowKey, Vec<u8>>,
    inbound_ports: HashSet<u16>,
    next_port: u16,
    dns: SocketHandle,
    dns_pending: usize,
    learned: Learned,
    logs: LogBudget,
    bucket: Bucket,
    throttled: bool,
    /// Round-robin start for [`Stack::pump_flows`].
    rr: usize,
    cfg: NetConfig,
    events: mpsc::Sender<Event>,
    notify: Arc<Notify>,
}

fn smol_now() -> SmolInstant {
    SmolInstant::now()
}

fn v4(addr: IpAddress) -> Ipv4Addr {
    match addr {
        IpAddress::Ipv4(a) => a,
    }
}

pub(crate) async fn run(
    cfg: NetConfig,
    link: std::os::unix::net::UnixStream,
    ready: impl FnOnce(&Ready),
) -> Result<(), NetError> {
    // Bind before reporting ready, so the reported ports are real and a
    // taken port is a startup error.
    let mut listeners = Vec::new();
    let mut ports = Vec::new();
    for e in &cfg.expose {
        let want = e.host.unwrap_or(0);
        let l = match tokio::net::TcpListener::bind((HOST_LOOPBACK, want)).await {
            Ok(l) => l,
            Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
                return Err(NetError::PortTaken {
                    guest: e.guest,
                    port: want,
                });
            }
            Err(source) => {
                return Err(NetError::Bind {
                    guest: e.guest,
                    port: want,
                    source,
                });
            }
        };
        let port = l.local_addr().map(|a| a.port()).unwrap_or(want);
        ports.push(PortMap {
            guest: e.guest,
            host: port,
        });
        listeners.push((e.guest, l));
    }

    link.set_nonblocking(true).map_err(NetError::Link)?;
    let link = tokio::net::UnixStream::from_std(link).map_err(NetError::Link)?;
    let (mut link_rd, mut link_wr) = link.into_split();

    ready(&Ready { ports });

    let notify = Arc::new(Notify::new());
    let (link_in_tx, mut link_in) = mpsc::channel::<LinkMsg>(RX_FRAMES);
    // A unix stream whose peer exits with unread data in its buffer reports
    // ECONNRESET rather than EOF; either way QEMU is gone, which is a normal end.
    let closed = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => LinkMsg::Eof,
        _ => LinkMsg::Error(NetError::Link(e)),
    };
    let reader = tokio::spawn(async move {
        let msg = loop {
            let mut hdr = [0u8; 4];
            if let Err(e) = link_rd.read_exact(&mut hdr).await {
                break closed(e);
            }
            let len = u32::from_be_bytes(hdr);
            if len as usize > MAX_FRAME {
                break LinkMsg::Error(NetError::FrameTooLarge { len });
            }
            let mut buf = vec![0u8; len as usize];
            if let Err(e) = link_rd.read_exact(&mut buf).await {
                break closed(e);
            }
            if link_in_tx.send(LinkMsg::Frame(buf)).await.is_err() {
                return;
            }
        };
        let _ = link_in_tx.send(msg).await;
    });
    let (link_out, mut link_out_rx) = mpsc::channel::<Vec<u8>>(TX_FRAMES);
    let wn = notify.clone();
    let writer = tokio::spawn(async move {
        while let Some(frame) = link_out_rx.recv().await {
            let mut buf = Vec::with_capacity(frame.len() + 4);
            buf.extend_from_slice(&(frame.len() as u32).to_be_bytes());
            buf.extend_from_slice(&frame);
            if link_wr.write_all(&buf).await.is_err() {
                break;
            }
            wn.notify_one();
        }
        // Dropping the receiver tells the loop the link is gone.
    });

    let (events, mut events_rx) = mpsc::channel::<Event>(MAX_TCP_FLOWS + MAX_PENDING_DNS);
    let mut acceptors = Vec::new();
    for (guest, l) in listeners {
        let ev = events.clone();
        acceptors.push(tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((stream, _)) => {
                        if ev.send(Event::Inbound { guest, stream }).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "accept failed on exposed port");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }

    let mut stack = Stack::new(cfg, events, notify.clone());
    let result = loop {
        let delay = stack.next_delay();
        tokio::select! {
            msg = link_in.recv() => match msg {
                Some(LinkMsg::Frame(f)) => {
                    stack.ingress(f);
                    // Take whatever else is already queued before polling.
                    let mut end = None;
                    for _ in 0..RX_FRAMES {
                        match link_in.try_recv() {
                            Ok(LinkMsg::Frame(f)) => stack.ingress(f),
                            Ok(LinkMsg::Eof) => {
                                end = Some(Ok(()));
                                break;
                            }
                            Ok(LinkMsg::Error(e)) => {
                                end = Some(Err(e));
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if let Some(r) = end {
                        break r;
                    }
                }
                Some(LinkMsg::Eof) | None => break Ok(()),
                Some(LinkMsg::Error(e)) => break Err(e),
            },
            ev = events_rx.recv() => {
                if let Some(ev) = ev {
                    stack.event(ev);
                }
            }
            _ = notify.notified() => {}
            _ = tokio::time::sleep(delay) => {}
        }
        stack.pump();
        // Hand smoltcp's frames to the link writer; whatever doesn't fit
        // waits in the device queue (the writer wakes us when it drains).
        while let Some(f) = stack.dev.tx.pop_front() {
            match link_out.try_send(f) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(f)) => {
                    stack.dev.tx.push_front(f);
                    break;
                }
                // QEMU closed its end while we were writing: same as EOF.
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    stack.shutdown();
                    return finish(Ok(()), reader, writer, acceptors);
                }
            }
        }
    };
    stack.shutdown();
    finish(result, reader, writer, acceptors)
}

fn finish(
    r: Result<(), NetError>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    acceptors: Vec<JoinHandle<()>>,
) -> Result<(), NetError> {
    reader.abort();
    writer.abort();
    for a in acceptors {
        a.abort();
    }
    r
}

impl Stack {
    fn new(cfg: NetConfig, events: mpsc::Sender<Event>, notify: Arc<Notify>) -> Self {
        let mut dev = Device {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
        };
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        config.random_seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x5eed)
            ^ u64::from(std::process::id());
        let mut iface = Interface::new(config, &mut dev, smol_now());
        iface.update_ip_addrs(|addrs| {
            for a in [GATEWAY_ADDR, DNS_ADDR] {
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(a), crate::GUEST_PREFIX));
            }
        });
        // any_ip accepts packets for any destination that routes via one of
        // our own addresses: the default route makes that "everything", so a
        // listener can be opened on whatever address the guest dialled.
        let _ = iface.routes_mut().add_default_ipv4_route(GATEWAY_ADDR);
        iface.set_any_ip(true);

        let mut sockets = SocketSet::new(Vec::new());
        let mut udp = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 32 * 1024]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 32 * 1024]),
        );
        let _ = udp.bind(IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(DNS_ADDR)),
            port: 53,
        });
        let dns = sockets.add(udp);
        let bucket = Bucket::new(cfg.rate_mbit);
        Stack {
            iface,
            dev,
            sockets,
            flows: HashMap::new(),
            keys: HashSet::new(),
            handshaking: HashSet::new(),
            pending: HashMap::new(),
            inbound_ports: HashSet::new(),
            next_port: *INBOUND_PORTS.start(),
            dns,
            dns_pending: 0,
            learned: Learned::default(),
            logs: LogBudget::new(),
            bucket,
            throttled: false,
            rr: 0,
            cfg,
            events,
            notify,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let mut d = self
            .iface
            .poll_delay(smol_now(), &self.sockets)
            .map_or(Duration::from_secs(3600), |d| {
                Duration::from_micros(d.total_micros())
            });
        if self.throttled {
            d = d.min(self.bucket.ready_in());
        }
        if self.dev.tx.len() >= TX_FRAMES {
            // smoltcp wants to send but the link is backed up: it reports
            // "poll now" until QEMU reads. The link writer wakes us when it
            // makes progress, so don't spin meanwhile.
            d = d.max(Duration::from_millis(50));
        }
        d
    }

    /// Runs the interface: every queued guest frame, then egress until
    /// smoltcp has nothing more to send right now (it emits at most one
    /// segment per socket per call, so one call per wake-up would cap a bulk
    /// transfer at a few segments per loop iteration).
    fn poll(&mut self) {
        let now = smol_now();
        // Ingress one frame at a time: a RST makes a listener in SynReceived
        // fall back to Listen, where it would accept the *next* SYN to that
        // endpoint from any guest port, still spliced to the old host socket.
        // Such listeners are removed before another frame is processed.
        while self
            .iface
            .poll_ingress_single(now, &mut self.dev, &mut self.sockets)
            != PollIngressSingleResult::None
        {
            self.reap_reverted();
        }
        for _ in 0..TX_FRAMES {
            let r = self
                .iface
                .poll_egress(now, &mut self.dev, &mut self.sockets);
            if r == PollResult::None || self.dev.tx.len() >= TX_FRAMES {
                break;
            }
        }
    }

    /// Drops outbound flows whose socket went back to Listen (guest reset
    /// the connection during the handshake); see [`Stack::poll`].
    fn reap_reverted(&mut self) {
        if self.handshaking.is_empty() {
            return;
        }
        let reverted: Vec<SocketHandle> = self
            .handshaking
            .iter()
            .copied()
            .filter(|h| self.sockets.get::<tcp::Socket>(*h).state() == tcp::State::Listen)
            .collect();
        for h in reverted {
            self.remove_flow(h, false);
        }
    }

    fn remove_flow(&mut self, h: SocketHandle, clean: bool) {
        self.handshaking.remove(&h);
        self.sockets.remove(h);
        if let Some(flow) = self.flows.remove(&h) {
            if let Some(k) = flow.key {
                self.keys.remove(&k);
            }
            if let Some(p) = flow.local_port {
                self.inbound_ports.remove(&p);
            }
            if !flow.established {
                debug!(peer = %flow.dst, "guest never completed the connection");
            }
            flow.finish(clean);
        }
    }

    /// The host address a guest destination stands for, or None when it may
    /// never be dialled (our DNS address, the guest itself).
    fn host_addr(dst: Ipv4Addr) -> Option<Ipv4Addr> {
        if dst == GATEWAY_ADDR {
            Some(HOST_LOOPBACK)
        } else if dst == DNS_ADDR || dst == GUEST_ADDR {
            None
        } else {
            Some(dst)
        }
    }

    fn allowed(&self, host: Ipv4Addr, port: u16) -> bool {
        self.cfg.policy.allows_addr(host, port)
            || (!is_special(host) && self.learned.allows(host, port))
    }

    fn ingress(&mut self, f: Vec<u8>) {
        match frame::inspect(&f) {
            Inspect::Pass => self.dev.rx.push_back(f),
            Inspect::Drop => {}
            Inspect::Tcp(key) => {
                // Segments for a flow whose host connect is still running are
                // dropped (the guest retransmits). Unknown flows go to smoltcp,
                // which answers with RST: that is how a forked child's stale
                // parent connections die.
                if !self.pending.contains_key(&key) {
                    self.dev.rx.push_back(f);
                }
            }
            Inspect::Syn(key) => self.syn(key, f),
        }
    }

    fn syn(&mut self, key: FlowKey, f: Vec<u8>) {
        if f.len() > MAX_SYN_FRAME {
            // SYNs are held while the host connects; a jumbo one (TCP Fast
            // Open data or padding) would let 256 pending flows pin 16 MiB.
            return;
        }
        if self.keys.contains(&key) {
            // Retransmitted SYN of a flow smoltcp already owns.
            self.dev.rx.push_back(f);
            return;
        }
        if self.pending.contains_key(&key) {
            return;
        }
        let dst = *key.dst.ip();
        let port = key.dst.port();
        let host = Self::host_addr(dst).filter(|h| self.allowed(*h, port));
        let Some(host) = host else {
            if self.logs.allow() {
                info!(dst = %key.dst, "connection refused by policy");
            }
            // No listener: smoltcp answers the SYN with RST.
            self.dev.rx.push_back(f);
            return;
        };
        if self.flows.len() + self.pending.len() >= MAX_TCP_FLOWS {
            if self.logs.allow() {
                info!(dst = %key.dst, limit = MAX_TCP_FLOWS, "connection refused: too many connections");
            }
            self.dev.rx.push_back(f);
            return;
        }
        debug!(dst = %key.dst, host = %host, "connecting");
        self.pending.insert(key, f);
        let events = self.events.clone();
        let target = SocketAddrV4::new(host, port);
        tokio::spawn(async move {
            let result =
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
                    Ok(r) => r,
                    Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
                };
            let _ = events.send(Event::Connected { key, result }).await;
        });
    }

    fn new_tcp_socket() -> tcp::Socket<'static> {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUF]),
            tcp::SocketBuffer::new(vec![0; TCP_BUF]),
        );
        s.set_timeout(Some(smoltcp::time::Duration::from_secs(
            TCP_TIMEOUT.as_secs(),
        )));
        s
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Connected { key, result } => {
                let Some(syn) = self.pending.remove(&key) else {
                    return;
                };
                match result {
                    Ok(stream) => self.open_outbound(key, stream, syn),
                    Err(e) => {
                        if self.logs.allow() {
                            info!(dst = %key.dst, error = %e, "connection refused by host");
                        }
                        // Replayed with no listener: the guest gets RST.
                        self.dev.rx.push_back(syn);
                    }
                }
            }
            Event::Inbound { guest, stream } => self.open_inbound(guest, stream),
            Event::Resolved {
                query,
                to,
                name,
                ports,
                result,
            } => {
                self.dns_pending = self.dns_pending.saturating_sub(1);
                let reply = match result {
                    Ok(addrs) => {
                        let mut shown: Vec<Ipv4Addr> = Vec::new();
                        for ip in addrs {
                            match self.cfg.policy.filter_answer(ip, GATEWAY_ADDR) {
                                Some(a) if !shown.contains(&a) => shown.push(a),
                                Some(_) => {}
                                None => {
                                    if self.logs.allow() {
                                        info!(name = %name, addr = %ip, "dns answer dropped: private address not allowed");
                                    }
                                }
                            }
                        }
                        shown.truncate(dns::MAX_ANSWERS);
                        for a in &shown {
                            if !is_special(*a) && !ports.is_empty() {
                                self.learned.add(*a, &ports);
                            }
                        }
                        dns::reply(&query, RCODE::NoError, &shown)
                    }
                    Err(rcode) => dns::reply(&query, rcode, &[]),
                };
                self.dns_send(reply, to);
            }
        }
    }

    fn open_outbound(&mut self, key: FlowKey, stream: TcpStream, syn: Vec<u8>) {
        let mut sock = Self::new_tcp_socket();
        if sock
            .listen(IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(*key.dst.ip())),
                port: key.dst.port(),
            })
            .is_err()
        {
            self.dev.rx.push_back(syn);
            return;
        }
        let handle = self.sockets.add(sock);
        // Feed exactly this SYN now, so this listener (and no other listener
        // on the same endpoint) becomes this 4-tuple's socket.
        self.dev.rx.push_back(syn);
        self.poll();
        let s = self.sockets.get_mut::<tcp::Socket>(handle);
        let took = s.state() == tcp::State::SynReceived
            && s.remote_endpoint()
                .is_some_and(|r| v4(r.addr) == *key.guest.ip() && r.port == key.guest.port());
        if !took {
            // E.g. a bad checksum made smoltcp drop the SYN: don't leave a
            // listener around that some other SYN could claim.
            self.sockets.remove(handle);
            return;
        }
        let mut flow = Flow::start(stream, &self.notify);
        flow.key = Some(key);
        self.keys.insert(key);
        self.handshaking.insert(handle);
        self.flows.insert(handle, flow);
    }

    fn open_inbound(&mut self, guest: u16, stream: TcpStream) {
        if self.flows.len() + self.pending.len() >= MAX_TCP_FLOWS {
            if self.logs.allow() {
                info!(
                    guest_port = guest,
                    "inbound connection dropped: too many connections"
                );
            }
            return;
        }
        let Some(port) = self.alloc_port() else {
            return;
        };
        let mut sock = Self::new_tcp_socket();
        if let Err(e) = sock.connect(
            self.iface.context(),
            (IpAddress::Ipv4(GUEST_ADDR), guest),
            (IpAddress::Ipv4(GATEWAY_ADDR), port),
        ) {
            warn!(error = %e, "cannot start inbound connection");
            return;
        }
        let handle = self.sockets.add(sock);
        let mut flow = Flow::start(stream, &self.notify);
        debug!(guest_port = guest, peer = %flow.dst, "inbound connection");
        flow.local_port = Some(port);
        self.inbound_ports.insert(port);
        self.flows.insert(handle, flow);
    }

    fn alloc_port(&mut self) -> Option<u16> {
        let span = usize::from(INBOUND_PORTS.end() - INBOUND_PORTS.start()) + 1;
        for _ in 0..span {
            let p = self.next_port;
            self.next_port = if p == *INBOUND_PORTS.end() {
                *INBOUND_PORTS.start()
            } else {
                p + 1
            };
            if !self.inbound_ports.contains(&p) {
                return Some(p);
            }
        }
        None
    }

    /// Polls the interface and moves bytes until nothing more moves.
    fn pump(&mut self) {
        self.throttled = false;
        for _ in 0..8 {
            self.poll();
            let moved = self.pump_flows() | self.pump_dns();
            if !moved && self.dev.rx.is_empty() {
                break;
            }
        }
        self.poll();
    }

    fn pump_flows(&mut self) -> bool {
        let mut moved = false;
        let mut dead = Vec::new();
        let mut handles: Vec<SocketHandle> = self.flows.keys().copied().collect();
        // Start with a different flow each time: when the bucket is nearly
        // empty the first flow visited gets the tokens, and a fixed order
        // would let one bulk transfer starve the others.
        if !handles.is_empty() {
            let k = self.rr % handles.len();
            handles.rotate_left(k);
            self.rr = self.rr.wrapping_add(1);
        }
        for h in handles {
            let Some(flow) = self.flows.get_mut(&h) else {
                continue;
            };
            let sock = self.sockets.get_mut::<tcp::Socket>(h);
            use tcp::State::*;
            match sock.state() {
                Closed => {
                    // Reset, aborted, or a clean LastAck finish; with no
                    // handshake this is the guest refusing an inbound
                    // connection, and dropping the flow closes the host socket.
                    dead.push((h, flow.established));
                    continue;
                }
                Listen | SynSent | SynReceived => continue,
                _ => {
                    if !flow.established {
                        flow.established = true;
                        self.handshaking.remove(&h);
                    }
                }
            }

            // Host -> guest.
            loop {
                if flow.carry_off >= flow.carry.len() {
                    let Some(rx) = flow.from_host.as_mut() else {
                        break;
                    };
                    match rx.try_recv() {
                        Ok(Ok(buf)) => {
                            flow.carry = buf;
                            flow.carry_off = 0;
                        }
                        Ok(Err(e)) => {
                            debug!(peer = %flow.dst, error = %e, "host connection failed; resetting guest side");
                            sock.abort();
                            flow.from_host = None;
                            moved = true;
                            break;
                        }
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            // Host EOF: pass the half-close on.
                            flow.from_host = None;
                            sock.close();
                            moved = true;
                            break;
                        }
                    }
                }
                if !sock.can_send() {
                    break;
                }
                let rest = flow.carry.len() - flow.carry_off;
                let room = sock.send_capacity() - sock.send_queue();
                let grant = self.bucket.take(rest.min(room));
                if grant == 0 {
                    self.throttled = true;
                    break;
                }
                let n = sock
                    .send_slice(&flow.carry[flow.carry_off..flow.carry_off + grant])
                    .unwrap_or(0);
                self.bucket.refund(grant - n);
                flow.carry_off += n;
                if n == 0 {
                    break;
                }
                moved = true;
            }

            // Guest -> host.
            if let Some(tx) = flow.to_host.as_ref() {
                if tx.is_closed() {
                    // The host writer failed (peer reset): reset the guest.
                    sock.abort();
                    flow.to_host = None;
                    moved = true;
                    continue;
                }
                while sock.can_recv() {
                    let Ok(permit) = tx.try_reserve() else {
                        break;
                    };
                    let want = sock.recv_queue().min(CHUNK);
                    let grant = self.bucket.take(want);
                    if grant == 0 {
                        self.throttled = true;
                        break;
                    }
                    let mut buf = vec![0u8; grant];
                    let n = sock.recv_slice(&mut buf).unwrap_or(0);
                    self.bucket.refund(grant - n);
                    buf.truncate(n);
                    if n == 0 {
                        break;
                    }
                    permit.send(buf);
                    moved = true;
                }
                if !sock.may_recv() && !sock.can_recv() {
                    // Guest FIN, all bytes handed over: the writer flushes
                    // and then shuts down the host socket's write side.
                    flow.to_host = None;
                    moved = true;
                }
            }
            // TimeWait: both sides closed. Only once the guest's last bytes
            // went to the writer (data and FIN can arrive in one poll).
            if sock.state() == TimeWait && flow.to_host.is_none() {
                dead.push((h, true));
            }
        }
        for (h, clean) in dead {
            self.remove_flow(h, clean);
            moved = true;
        }
        moved
    }

    fn dns_send(&mut self, reply: Option<Vec<u8>>, to: smoltcp::wire::IpEndpoint) {
        let Some(reply) = reply else {
            return;
        };
        let udp = self.sockets.get_mut::<udp::Socket>(self.dns);
        if udp.send_slice(&reply, to).is_err() {
            debug!("dns reply dropped: send buffer full");
        }
    }

    fn pump_dns(&mut self) -> bool {
        let mut moved = false;
        // Bounded per pump so a query flood can't starve the rest.
        for _ in 0..64 {
            let udp = self.sockets.get_mut::<udp::Socket>(self.dns);
            let (data, meta) = match udp.recv() {
                Ok((d, m)) => (d.to_vec(), m),
                Err(_) => break,
            };
            moved = true;
            let to = meta.endpoint;
            let q = match dns::parse(&data) {
                Parsed::Ignore => continue,
                Parsed::Reply(r) => {
                    self.dns_send(Some(r), to);
                    continue;
                }
                Parsed::Query(q) => q,
            };
            let Some(name) = q.name.clone() else {
                if self.logs.allow() {
                    info!(name = %q.display, "dns query refused: invalid name");
                }
                self.dns_send(dns::reply(&data, RCODE::Refused, &[]), to);
                continue;
            };
            if name == HOST_NAME {
                let addrs: &[Ipv4Addr] = if q.qtype == QueryType::A {
                    &[GATEWAY_ADDR]
                } else {
                    &[]
                };
                self.dns_send(dns::reply(&data, RCODE::NoError, addrs), to);
                continue;
            }
            let Some(ports) = self.cfg.policy.name_ports(&name) else {
                if self.logs.allow() {
                    info!(name = %q.display, "dns query refused by policy");
                }
                self.dns_send(dns::reply(&data, RCODE::Refused, &[]), to);
                continue;
            };
            if q.qtype != QueryType::A {
                // IPv6 is not offered; an empty answer makes resolvers fall
                // back to A quickly.
                self.dns_send(dns::reply(&data, RCODE::NoError, &[]), to);
                continue;
            }
            if self.dns_pending >= MAX_PENDING_DNS {
                debug!(name = %q.display, "dns query dropped: too many pending");
                continue;
            }
            self.dns_pending += 1;
            let events = self.events.clone();
            let display = q.display.clone();
            tokio::spawn(async move {
                let result =
                    match tokio::time::timeout(DNS_TIMEOUT, tokio::net::lookup_host((name, 0)))
                        .await
                    {
                        Ok(Ok(addrs)) => Ok(addrs
                            .filter_map(|a| match a {
                                SocketAddr::V4(a) => Some(*a.ip()),
                                SocketAddr::V6(_) => None,
                            })
                            .take(64)
                            .collect()),
                        Ok(Err(_)) => Err(RCODE::NameError),
                        Err(_) => Err(RCODE::ServerFailure),
                    };
                let _ = events
                    .send(Event::Resolved {
                        query: data,
                        to,
                        name: display,
                        ports,
                        result,
                    })
                    .await;
            });
        }
        moved
    }

    /// Closes every host connection (the link is gone).
    fn shutdown(&mut self) {
        for (_, flow) in self.flows.drain() {
            flow.finish(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learned_addresses_keep_their_ports_and_are_bounded() {
        let mut l = Learned::default();
        let a = Ipv4Addr::new(93, 184, 216, 34);
        l.add(a, &[Some(443)]);
        assert!(l.allows(a, 443));
        assert!(!l.allows(a, 80));
        l.add(a, &[None]);
        assert!(l.allows(a, 80));
        for i in 0..MAX_LEARNED as u32 {
            l.add(Ipv4Addr::from(0x0100_0000 + i), &[None]);
        }
        assert_eq!(l.map.len(), MAX_LEARNED);
        assert!(!l.allows(a, 443), "oldest entry evicted");
    }

    #[test]
    fn bucket_grants_burst_then_throttles() {
        let mut b = Bucket::new(8);
        let burst = b.take(10_000_000);
        assert!((50_000..=50_001).contains(&burst), "{burst}");
        assert_eq!(b.take(1460), 0);
        assert!(b.ready_in() > Duration::ZERO);
        b.refund(1460);
        assert_eq!(b.take(1460), 1460);
        let mut unlimited = Bucket::new(0);
        assert_eq!(unlimited.take(usize::MAX), usize::MAX);
    }
}
