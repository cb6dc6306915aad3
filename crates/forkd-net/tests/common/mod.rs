//! A fake guest: a second smoltcp interface (10.0.2.15/24, gateway 10.0.2.2)
//! driven over the other end of the link, with the same 4-byte length framing
//! QEMU uses.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use forkd_net::{NetConfig, NetError, Ready};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint};

pub const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x15];

pub struct Dev {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: VecDeque<Vec<u8>>,
}

pub struct RxTok(Vec<u8>);
pub struct TxTok<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0; len];
        let r = f(&mut b);
        self.0.push_back(b);
        r
    }
}

impl phy::Device for Dev {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;
    fn receive(&mut self, _: SmolInstant) -> Option<(RxTok, TxTok<'_>)> {
        let f = self.rx.pop_front()?;
        Some((RxTok(f), TxTok(&mut self.tx)))
    }
    fn transmit(&mut self, _: SmolInstant) -> Option<TxTok<'_>> {
        Some(TxTok(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

pub struct Guest {
    pub link: UnixStream,
    pub iface: Interface,
    pub dev: Dev,
    pub sockets: SocketSet<'static>,
    rbuf: Vec<u8>,
    next_port: u16,
    /// Every frame received from the back end, when `sniff` is on.
    pub sniffed: Vec<Vec<u8>>,
    pub sniff: bool,
}

pub struct Running {
    pub guest: Guest,
    pub ready: Ready,
    pub server: JoinHandle<Result<(), NetError>>,
}

/// Starts `serve` in a thread; returns once it reported ready.
pub fn start(cfg: NetConfig) -> Result<Running, NetError> {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let (tx, rx) = mpsc::channel();
    let server = std::thread::spawn(move || {
        forkd_net::serve(cfg, theirs, move |r| {
            tx.send(r.clone()).unwrap();
        })
    });
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(ready) => Ok(Running {
            guest: Guest::new(ours),
            ready,
            server,
        }),
        Err(_) => Err(server
            .join()
            .unwrap()
            .expect_err("serve ended without ready")),
    }
}

pub fn elapsed_ms(t: Instant) -> u128 {
    t.elapsed().as_millis()
}

impl Guest {
    pub fn new(link: UnixStream) -> Self {
        link.set_read_timeout(Some(Duration::from_millis(1)))
            .unwrap();
        let mut dev = Dev {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
        };
        let mut cfg = Config::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC)));
        cfg.random_seed = 42;
        let mut iface = Interface::new(cfg, &mut dev, SmolInstant::now());
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::v4(10, 0, 2, 15), 24))
                .unwrap();
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Addr::new(10, 0, 2, 2))
            .unwrap();
        Guest {
            link,
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            rbuf: Vec::new(),
            next_port: 40000,
            sniffed: Vec::new(),
            sniff: false,
        }
    }

    /// Writes one raw frame (with the length prefix) to the back end.
    pub fn send_raw(&mut self, frame: &[u8]) {
        let mut b = (frame.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(frame);
        self.link.write_all(&b).unwrap();
    }

    /// One round: read what arrived, poll the stack, write what it produced.
    pub fn step(&mut self) {
        let mut buf = [0u8; 65536];
        loop {
            match self.link.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    self.rbuf.extend_from_slice(&buf[..n]);
                    if n < buf.len() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        while self.rbuf.len() >= 4 {
            let len = u32::from_be_bytes(self.rbuf[..4].try_into().unwrap()) as usize;
            if self.rbuf.len() < 4 + len {
                break;
            }
            let f: Vec<u8> = self.rbuf[4..4 + len].to_vec();
            self.rbuf.drain(..4 + len);
            if self.sniff {
                self.sniffed.push(f.clone());
            }
            self.dev.rx.push_back(f);
        }
        // One segment per socket per poll: loop until smoltcp is done.
        for _ in 0..512 {
            if self
                .iface
                .poll(SmolInstant::now(), &mut self.dev, &mut self.sockets)
                == smoltcp::iface::PollResult::None
            {
                break;
            }
        }
        while let Some(f) = self.dev.tx.pop_front() {
            self.send_raw(&f);
        }
    }

    /// Steps until `cond` holds; false on timeout.
    pub fn run_until(
        &mut self,
        timeout: Duration,
        mut cond: impl FnMut(&mut Guest) -> bool,
    ) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            self.step();
            if cond(self) {
                return true;
            }
        }
        false
    }

    pub fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    fn new_tcp() -> tcp::Socket<'static> {
        tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
        )
    }

    pub fn connect(&mut self, ip: Ipv4Addr, port: u16) -> SocketHandle {
        let mut s = Self::new_tcp();
        self.next_port += 1;
        s.connect(
            self.iface.context(),
            IpEndpoint::new(IpAddress::Ipv4(ip), port),
            self.next_port,
        )
        .unwrap();
        self.sockets.add(s)
    }

    pub fn listen(&mut self, port: u16) -> SocketHandle {
        let mut s = Self::new_tcp();
        s.listen(port).unwrap();
        self.sockets.add(s)
    }

    /// Waits until the handshake completed (Ok) or the socket closed (Err).
    pub fn wait_connect(&mut self, h: SocketHandle, timeout: Duration) -> Result<(), String> {
        let mut out = Err("timeout".to_string());
        self.run_until(timeout, |g| match g.tcp(h).state() {
            tcp::State::Listen | tcp::State::SynSent | tcp::State::SynReceived => false,
            tcp::State::Closed => {
                out = Err("closed".to_string());
                true
            }
            // Past the handshake (the peer may already have sent FIN).
            _ => {
                out = Ok(());
                true
            }
        });
        out
    }

    /// Sends all of `data` on `h`.
    pub fn send_all(&mut self, h: SocketHandle, data: &[u8], timeout: Duration) -> bool {
        let mut off = 0;
        self.run_until(timeout, |g| {
            let s = g.tcp(h);
            if s.can_send() && off < data.len() {
                off += s.send_slice(&data[off..]).unwrap();
            }
            off == data.len() || !s.is_open()
        }) && off == data.len()
    }

    /// Reads until the peer closes (FIN) or `timeout`.
    pub fn read_to_end(&mut self, h: SocketHandle, timeout: Duration) -> Vec<u8> {
        let mut out = Vec::new();
        self.run_until(timeout, |g| {
            let s = g.tcp(h);
            while s.can_recv() {
                let mut b = [0u8; 4096];
                let n = s.recv_slice(&mut b).unwrap();
                out.extend_from_slice(&b[..n]);
            }
            !s.may_recv()
                && s.state() != tcp::State::SynSent
                && s.state() != tcp::State::SynReceived
        });
        out
    }

    pub fn udp(&mut self, port: u16) -> SocketHandle {
        let mut s = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 8192]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 8192]),
        );
        s.bind(port).unwrap();
        self.sockets.add(s)
    }

    /// Sends one DNS query to 10.0.2.3:53 and returns the reply datagram.
    pub fn dns(&mut self, h: SocketHandle, query: &[u8]) -> Option<Vec<u8>> {
        self.sockets
            .get_mut::<udp::Socket>(h)
            .send_slice(query, IpEndpoint::new(IpAddress::v4(10, 0, 2, 3), 53))
            .unwrap();
        let mut out = None;
        self.run_until(Duration::from_secs(5), |g| {
            if let Ok((d, _)) = g.sockets.get_mut::<udp::Socket>(h).recv() {
                out = Some(d.to_vec());
                true
            } else {
                false
            }
        });
        out
    }
}
