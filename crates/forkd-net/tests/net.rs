//! End-to-end tests: `serve` in a thread, a smoltcp guest on the other end of
//! the link, real host sockets on 127.0.0.1. No QEMU, no outside network.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::time::{Duration, Instant};

use common::{Guest, Running, start};
use forkd_net::{Expose, NetConfig, NetError, Policy};
use simple_dns::rdata::RData;
use simple_dns::{CLASS, Name, Packet, QCLASS, QTYPE, Question, RCODE, TYPE};

const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const SECS: Duration = Duration::from_secs(5);

fn cfg(rules: &[&str], allow_all: bool) -> NetConfig {
    NetConfig {
        policy: Policy::from_rules(rules, allow_all).unwrap(),
        expose: vec![],
        rate_mbit: 0,
    }
}

fn stop(r: Running) {
    let Running { guest, server, .. } = r;
    drop(guest);
    server.join().unwrap().unwrap();
}

/// A host server that reads `expect` bytes, replies, then closes.
fn echo_server(reply: &'static [u8]) -> (u16, std::thread::JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(SECS)).unwrap();
        let mut got = vec![0u8; 4];
        s.read_exact(&mut got).unwrap();
        s.write_all(reply).unwrap();
        got
    });
    (port, t)
}

#[test]
fn allowed_host_port_is_spliced_both_ways() {
    let (port, server) = echo_server(b"pong from the host");
    let mut r = start(cfg(&[&format!("host:{port}")], false)).unwrap();
    let g = &mut r.guest;
    let h = g.connect(GW, port);
    g.wait_connect(h, SECS).unwrap();
    assert!(g.send_all(h, b"ping", SECS));
    let got = g.read_to_end(h, SECS);
    assert_eq!(got, b"pong from the host");
    assert_eq!(server.join().unwrap(), b"ping");
    // Guest closes its half too; the flow then ends cleanly.
    g.tcp(h).close();
    assert!(g.run_until(SECS, |g| matches!(
        g.tcp(h).state(),
        smoltcp::socket::tcp::State::Closed | smoltcp::socket::tcp::State::TimeWait
    )));
    stop(r);
}

#[test]
fn denied_destination_gets_fast_rst_and_host_sees_nothing() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let port = l.local_addr().unwrap().port();
    // A rule for a different port must not open this one.
    let mut r = start(cfg(
        &[&format!("host:{}", port.wrapping_add(1).max(1))],
        false,
    ))
    .unwrap();
    let g = &mut r.guest;
    let t = Instant::now();
    let h = g.connect(GW, port);
    assert_eq!(g.wait_connect(h, SECS), Err("closed".to_string()));
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "refusal took {:?}",
        t.elapsed()
    );
    assert!(
        l.accept().is_err(),
        "the host server must see no connection"
    );
    stop(r);
}

#[test]
fn host_refusing_connection_gives_rst() {
    // Allowed by policy, but nothing listens on the host: the guest must get
    // a refusal (replayed SYN with no listener), not a hang.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut r = start(cfg(&[&format!("host:{port}")], false)).unwrap();
    let g = &mut r.guest;
    let h = g.connect(GW, port);
    assert_eq!(g.wait_connect(h, SECS), Err("closed".to_string()));
    stop(r);
}

#[test]
fn metadata_address_refused_even_with_allow_all() {
    let mut r = start(cfg(&[], true)).unwrap();
    let g = &mut r.guest;
    let t = Instant::now();
    let h = g.connect(Ipv4Addr::new(169, 254, 169, 254), 80);
    assert_eq!(g.wait_connect(h, SECS), Err("closed".to_string()));
    assert!(t.elapsed() < Duration::from_secs(1));
    // And the host loopback is not opened by allow_all either.
    let h = g.connect(GW, 22);
    assert_eq!(g.wait_connect(h, SECS), Err("closed".to_string()));
    stop(r);
}

fn query(name: &str, t: TYPE, id: u16) -> Vec<u8> {
    let mut p = Packet::new_query(id);
    p.questions.push(Question::new(
        Name::new_unchecked(name),
        QTYPE::TYPE(t),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    p.build_bytes_vec().unwrap()
}

fn answers(reply: &[u8]) -> (RCODE, Vec<Ipv4Addr>) {
    let p = Packet::parse(reply).unwrap();
    let ips = p
        .answers
        .iter()
        .filter_map(|a| match &a.rdata {
            RData::A(a) => Some(Ipv4Addr::from(a.address)),
            _ => None,
        })
        .collect();
    (p.rcode(), ips)
}

#[test]
fn dns_filtering() {
    // `localhost` is allowed by name, but resolves to 127.0.0.1: without an
    // explicit host rule the answer must be empty (rebinding protection).
    let mut r = start(cfg(&["localhost", "*.example.com"], false)).unwrap();
    let g = &mut r.guest;
    let u = g.udp(5353);
    let (rc, ips) = answers(&g.dns(u, &query("localhost", TYPE::A, 1)).unwrap());
    assert_eq!((rc, ips), (RCODE::NoError, vec![]));
    let (rc, ips) = answers(&g.dns(u, &query("blocked.test", TYPE::A, 2)).unwrap());
    assert_eq!((rc, ips), (RCODE::Refused, vec![]));
    // Wildcards don't cover the bare domain.
    let (rc, _) = answers(&g.dns(u, &query("example.com", TYPE::A, 3)).unwrap());
    assert_eq!(rc, RCODE::Refused);
    let (rc, ips) = answers(&g.dns(u, &query("host.forkd.internal", TYPE::A, 4)).unwrap());
    assert_eq!((rc, ips), (RCODE::NoError, vec![GW]));
    let (rc, ips) = answers(&g.dns(u, &query("localhost", TYPE::AAAA, 5)).unwrap());
    assert_eq!((rc, ips), (RCODE::NoError, vec![]));
    // Garbage to the DNS port is ignored and the server keeps answering.
    let bad = g.dns_no_reply(u, &[1, 2, 3]);
    assert!(bad.is_none());
    let (rc, _) = answers(&g.dns(u, &query("localhost", TYPE::A, 6)).unwrap());
    assert_eq!(rc, RCODE::NoError);
    stop(r);

    // With `host` allowed too, 127.0.0.1 is shown to the guest as the gateway.
    let mut r = start(cfg(&["localhost", "host"], false)).unwrap();
    let g = &mut r.guest;
    let u = g.udp(5353);
    let reply = g.dns(u, &query("LocalHost", TYPE::A, 7)).unwrap();
    let (rc, ips) = answers(&reply);
    assert_eq!((rc, ips), (RCODE::NoError, vec![GW]));
    assert_eq!(Packet::parse(&reply).unwrap().answers[0].ttl, 60);
    stop(r);
}

#[test]
fn expose_forwards_host_connections_to_the_guest() {
    let mut c = cfg(&[], false);
    c.expose = vec![Expose {
        guest: 8080,
        host: None,
    }];
    let mut r = start(c).unwrap();
    assert_eq!(r.ready.ports.len(), 1);
    assert_eq!(r.ready.ports[0].guest, 8080);
    let host_port = r.ready.ports[0].host;
    assert_ne!(host_port, 0);
    let g = &mut r.guest;
    let l = g.listen(8080);
    let client = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", host_port)).unwrap();
        s.set_read_timeout(Some(SECS)).unwrap();
        s.write_all(b"GET").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        out
    });
    g.wait_connect(l, SECS).unwrap();
    // The host half-closed after "GET": the guest sees data then FIN.
    let got = g.read_to_end(l, SECS);
    assert_eq!(got, b"GET");
    assert!(g.send_all(l, b"hello from the guest", SECS));
    g.tcp(l).close();
    g.run_until(Duration::from_millis(300), |_| false);
    assert_eq!(client.join().unwrap(), b"hello from the guest");

    // A connection to a guest port nobody listens on: the guest refuses
    // (RST) and the host socket gets closed.
    let mut c = cfg(&[], false);
    c.expose = vec![Expose {
        guest: 9999,
        host: Some(0),
    }];
    stop(r);
    let mut r = start(c).unwrap();
    let host_port = r.ready.ports[0].host;
    let client = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", host_port)).unwrap();
        s.set_read_timeout(Some(SECS)).unwrap();
        let mut out = Vec::new();
        // EOF or reset, but promptly and with no data.
        let _ = s.read_to_end(&mut out);
        out
    });
    let t = Instant::now();
    r.guest
        .run_until(Duration::from_secs(3), |_| client.is_finished());
    assert!(client.is_finished(), "host socket not closed");
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(client.join().unwrap().is_empty());
    stop(r);
}

#[test]
fn expose_of_taken_port_is_a_startup_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut c = cfg(&[], false);
    c.expose = vec![Expose {
        guest: 80,
        host: Some(port),
    }];
    match start(c) {
        Err(NetError::PortTaken { port: p, guest: 80 }) => assert_eq!(p, port),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("ready reported although the port is taken"),
    }
}

/// Time for the guest to push 2 MB to a host server at `rate_mbit`.
fn upload_time(rate_mbit: u32) -> Duration {
    const TOTAL: usize = 2 * 1024 * 1024;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut n = 0;
        let mut b = vec![0u8; 65536];
        while n < TOTAL {
            match s.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        n
    });
    let mut c = cfg(&[&format!("host:{port}")], false);
    c.rate_mbit = rate_mbit;
    let mut r = start(c).unwrap();
    let g = &mut r.guest;
    let h = g.connect(GW, port);
    g.wait_connect(h, SECS).unwrap();
    let t = Instant::now();
    let data = vec![0x5au8; TOTAL];
    assert!(g.send_all(h, &data, Duration::from_secs(15)));
    g.run_until(Duration::from_secs(15), |_| server.is_finished());
    let elapsed = t.elapsed();
    assert_eq!(server.join().unwrap(), TOTAL);
    stop(r);
    elapsed
}

#[test]
fn rate_limit_bounds_throughput() {
    // 8 Mbit/s = 1 MB/s: 2 MB minus the 50 ms burst takes about 2 s.
    let limited = upload_time(8);
    assert!(
        limited >= Duration::from_millis(1500),
        "2 MB at 8 Mbit/s took only {limited:?}"
    );
    // Contrast (generous bound): without a limit the same transfer is fast,
    // so the time above really comes from the limiter.
    let unlimited = upload_time(0);
    assert!(
        unlimited < Duration::from_millis(1500),
        "unlimited upload took {unlimited:?}"
    );
}

#[test]
fn link_eof_ends_serve_promptly() {
    let r = start(cfg(&[], false)).unwrap();
    let t = Instant::now();
    let Running { guest, server, .. } = r;
    drop(guest);
    while !server.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(2), "serve did not return");
        std::thread::sleep(Duration::from_millis(5));
    }
    server.join().unwrap().unwrap();
}

#[test]
fn malformed_frames_are_survived_and_oversize_closes_the_link() {
    let mut r = start(cfg(&[], false)).unwrap();
    let g = &mut r.guest;
    g.send_raw(&[]);
    g.send_raw(&[0xff; 3]);
    g.send_raw(&[0u8; 60]);
    let mut ipv4_junk = vec![0u8; 100];
    ipv4_junk[12] = 0x08;
    ipv4_junk[14] = 0x45;
    ipv4_junk[16] = 0xff; // total length far beyond the frame
    g.send_raw(&ipv4_junk);
    for i in 0..50u8 {
        let junk: Vec<u8> = (0..(i as usize * 7)).map(|k| (k as u8) ^ i).collect();
        g.send_raw(&junk);
    }
    // Still alive and answering.
    let u = g.udp(5353);
    let (rc, ips) = answers(&g.dns(u, &query("host.forkd.internal", TYPE::A, 9)).unwrap());
    assert_eq!((rc, ips), (RCODE::NoError, vec![GW]));
    // A length above 64 KiB: the link is refused and serve returns an error
    // (not a panic).
    g.link.write_all(&0x0010_0000u32.to_be_bytes()).unwrap();
    let Running { server, guest, .. } = r;
    let res = server.join().unwrap();
    drop(guest);
    assert!(matches!(
        res,
        Err(NetError::FrameTooLarge { len: 0x0010_0000 })
    ));
}

#[test]
fn segment_of_unknown_flow_gets_rst() {
    use smoltcp::wire::*;
    let mut r = start(cfg(&[], true)).unwrap();
    let g = &mut r.guest;
    // Let the back end learn our MAC first (a DNS round trip does ARP).
    let u = g.udp(5353);
    g.dns(u, &query("host.forkd.internal", TYPE::A, 1)).unwrap();
    g.sniff = true;

    // A data segment of a connection the (forked) guest thinks exists.
    let dst = Ipv4Addr::new(93, 184, 216, 34);
    g.send_raw(&raw_tcp(
        41000,
        dst,
        443,
        TcpControl::Psh,
        1000,
        Some(2000),
        b"stale",
    ));
    let got_rst = g.run_until(SECS, |g| {
        g.sniffed.iter().any(|f| {
            let Ok(e) = EthernetFrame::new_checked(&f[..]) else {
                return false;
            };
            let Ok(p) = Ipv4Packet::new_checked(e.payload()) else {
                return false;
            };
            let Ok(t) = TcpPacket::new_checked(p.payload()) else {
                return false;
            };
            p.src_addr() == dst && t.rst() && t.dst_port() == 41000
        })
    });
    assert!(got_rst, "no RST for a segment of an unknown flow");
    stop(r);
}

impl Guest {
    fn dns_no_reply(&mut self, h: smoltcp::iface::SocketHandle, q: &[u8]) -> Option<Vec<u8>> {
        self.sockets
            .get_mut::<smoltcp::socket::udp::Socket>(h)
            .send_slice(
                q,
                smoltcp::wire::IpEndpoint::new(smoltcp::wire::IpAddress::v4(10, 0, 2, 3), 53),
            )
            .unwrap();
        let mut out = None;
        self.run_until(Duration::from_millis(300), |g| {
            if let Ok((d, _)) = g.sockets.get_mut::<smoltcp::socket::udp::Socket>(h).recv() {
                out = Some(d.to_vec());
                true
            } else {
                false
            }
        });
        out
    }
}

#[test]
fn config_json_shape() {
    let c: NetConfig = serde_json::from_str(
        r#"{"policy":{"rules":["host:8000","*.example.com:443"],"allow_all":false},
            "expose":[{"guest":8080,"host":18080},{"guest":22}],"rate_mbit":50}"#,
    )
    .unwrap();
    assert_eq!(c.expose[1].host, None);
    assert_eq!(c.rate_mbit, 50);
    let d: NetConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(d.rate_mbit, 100);
    assert_eq!(
        serde_json::to_value(forkd_agent::NetSetup::standard()).unwrap(),
        serde_json::json!({"addr":"10.0.2.15","prefix":24,"gateway":"10.0.2.2","dns":"10.0.2.3"})
    );
}

#[test]
fn rate_limit_applies_host_to_guest_too() {
    const TOTAL: usize = 2 * 1024 * 1024;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&vec![0xa5u8; TOTAL]).unwrap();
    });
    let mut c = cfg(&[&format!("host:{port}")], false);
    c.rate_mbit = 8;
    let mut r = start(c).unwrap();
    let g = &mut r.guest;
    let h = g.connect(GW, port);
    g.wait_connect(h, SECS).unwrap();
    let t = Instant::now();
    let got = g.read_to_end(h, Duration::from_secs(15));
    let elapsed = t.elapsed();
    assert_eq!(got.len(), TOTAL);
    assert!(
        elapsed >= Duration::from_millis(1500),
        "2 MB at 8 Mbit/s took only {elapsed:?}"
    );
    server.join().unwrap();
    stop(r);
}

#[test]
fn gateway_and_dns_answer_ping_others_do_not() {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::*;
    let mut r = start(cfg(&[], true)).unwrap();
    let g = &mut r.guest;
    let u = g.udp(5353);
    g.dns(u, &query("host.forkd.internal", TYPE::A, 1)).unwrap();
    g.sniff = true;
    for (i, dst) in [GW, Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(1, 1, 1, 1)]
        .into_iter()
        .enumerate()
    {
        let icmp = Icmpv4Repr::EchoRequest {
            ident: 7,
            seq_no: i as u16,
            data: b"forkd",
        };
        let ip = Ipv4Repr {
            src_addr: Ipv4Addr::new(10, 0, 2, 15),
            dst_addr: dst,
            next_header: IpProtocol::Icmp,
            payload_len: icmp.buffer_len(),
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(common::GUEST_MAC),
            dst_addr: EthernetAddress(forkd_net::GATEWAY_MAC),
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + ip.payload_len];
        let mut f = EthernetFrame::new_unchecked(&mut buf);
        eth.emit(&mut f);
        let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p, &ChecksumCapabilities::default());
        let mut m = Icmpv4Packet::new_unchecked(p.payload_mut());
        icmp.emit(&mut m, &ChecksumCapabilities::default());
        g.send_raw(&buf);
    }
    g.run_until(Duration::from_millis(500), |_| false);
    let mut from: Vec<Ipv4Addr> = g
        .sniffed
        .iter()
        .filter_map(|f| {
            let e = EthernetFrame::new_checked(&f[..]).ok()?;
            let p = Ipv4Packet::new_checked(e.payload()).ok()?;
            let m = Icmpv4Packet::new_checked(p.payload()).ok()?;
            (m.msg_type() == Icmpv4Message::EchoReply).then(|| p.src_addr())
        })
        .collect();
    from.sort();
    assert_eq!(from, vec![GW, Ipv4Addr::new(10, 0, 2, 3)]);
    stop(r);
}

#[test]
fn guest_half_close_reaches_the_host() {
    // The host reads to EOF (the guest's FIN), and only then answers.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(SECS)).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(format!("got {} bytes", got.len()).as_bytes())
            .unwrap();
        got
    });
    let mut r = start(cfg(&["127.0.0.1"], false)).unwrap();
    let g = &mut r.guest;
    let h = g.connect(GW, port);
    g.wait_connect(h, SECS).unwrap();
    let body = vec![7u8; 100_000];
    assert!(g.send_all(h, &body, SECS));
    g.tcp(h).close();
    let reply = g.read_to_end(h, SECS);
    assert_eq!(reply, b"got 100000 bytes");
    assert_eq!(server.join().unwrap(), body);
    stop(r);
}

#[test]
fn tcp_flows_are_capped() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    // Accept and hold every connection until the test ends.
    let holder = std::thread::spawn(move || {
        l.set_nonblocking(true).unwrap();
        let mut held = Vec::new();
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end && held.len() < forkd_net::MAX_TCP_FLOWS {
            match l.accept() {
                Ok((s, _)) => held.push(s),
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        held.len()
    });
    let mut r = start(cfg(&[&format!("host:{port}")], false)).unwrap();
    let g = &mut r.guest;
    let hs: Vec<_> = (0..forkd_net::MAX_TCP_FLOWS + 1)
        .map(|_| g.connect(GW, port))
        .collect();
    let settled = |g: &mut Guest| {
        hs.iter().all(|h| {
            matches!(
                g.tcp(*h).state(),
                smoltcp::socket::tcp::State::Established | smoltcp::socket::tcp::State::Closed
            )
        })
    };
    assert!(g.run_until(SECS, settled));
    let refused = hs
        .iter()
        .filter(|h| g.tcp(**h).state() == smoltcp::socket::tcp::State::Closed)
        .count();
    assert_eq!(refused, 1, "exactly the connection over the cap is refused");
    assert_eq!(holder.join().unwrap(), forkd_net::MAX_TCP_FLOWS);
    stop(r);
}

#[test]
fn arp_answered_only_for_gateway_and_dns() {
    use smoltcp::wire::*;
    let mut r = start(cfg(&[], true)).unwrap();
    let g = &mut r.guest;
    g.sniff = true;
    // Including the guest's own address (a duplicate-address probe must get
    // no answer) and an arbitrary neighbour.
    for target in [
        GW,
        Ipv4Addr::new(10, 0, 2, 3),
        Ipv4Addr::new(10, 0, 2, 15),
        Ipv4Addr::new(10, 0, 2, 99),
    ] {
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(common::GUEST_MAC),
            source_protocol_addr: Ipv4Addr::new(10, 0, 2, 15),
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: target,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(common::GUEST_MAC),
            dst_addr: EthernetAddress::BROADCAST,
            ethertype: EthernetProtocol::Arp,
        };
        let mut buf = vec![0u8; eth.buffer_len() + arp.buffer_len()];
        let mut f = EthernetFrame::new_unchecked(&mut buf);
        eth.emit(&mut f);
        arp.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
        g.send_raw(&buf);
    }
    g.run_until(Duration::from_millis(300), |_| false);
    let mut answered: Vec<Ipv4Addr> = g
        .sniffed
        .iter()
        .filter_map(|f| {
            let e = EthernetFrame::new_checked(&f[..]).ok()?;
            let a = ArpRepr::parse(&ArpPacket::new_checked(e.payload()).ok()?).ok()?;
            match a {
                ArpRepr::EthernetIpv4 {
                    operation: ArpOperation::Reply,
                    source_protocol_addr,
                    source_hardware_addr,
                    ..
                } => {
                    assert_eq!(
                        source_hardware_addr,
                        EthernetAddress(forkd_net::GATEWAY_MAC)
                    );
                    Some(source_protocol_addr)
                }
                _ => None,
            }
        })
        .collect();
    answered.sort();
    assert_eq!(answered, vec![GW, Ipv4Addr::new(10, 0, 2, 3)]);
    stop(r);
}

/// A raw guest TCP segment (guest MAC/IP to the gateway MAC).
fn raw_tcp(
    src_port: u16,
    dst: Ipv4Addr,
    dst_port: u16,
    control: smoltcp::wire::TcpControl,
    seq: i32,
    ack: Option<i32>,
    payload: &[u8],
) -> Vec<u8> {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::*;
    let tcp = TcpRepr {
        src_port,
        dst_port,
        control,
        seq_number: TcpSeqNumber(seq),
        ack_number: ack.map(TcpSeqNumber),
        window_len: 1024,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let ip = Ipv4Repr {
        src_addr: Ipv4Addr::new(10, 0, 2, 15),
        dst_addr: dst,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.header_len() + payload.len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(common::GUEST_MAC),
        dst_addr: EthernetAddress(forkd_net::GATEWAY_MAC),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + ip.payload_len];
    let mut f = EthernetFrame::new_unchecked(&mut buf);
    eth.emit(&mut f);
    let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
    ip.emit(&mut p, &ChecksumCapabilities::default());
    let mut t = TcpPacket::new_unchecked(p.payload_mut());
    tcp.emit(
        &mut t,
        &IpAddress::Ipv4(ip.src_addr),
        &IpAddress::Ipv4(dst),
        &ChecksumCapabilities::default(),
    );
    buf
}

#[test]
fn reset_during_handshake_does_not_leak_the_host_socket_to_another_flow() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let mut got = Vec::new();
        for _ in 0..2 {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(SECS)).unwrap();
            let mut b = Vec::new();
            // Ok = the back end closed it (EOF); Err = still open at timeout.
            let closed = s.read_to_end(&mut b).is_ok();
            got.push((b, closed));
        }
        got
    });
    let mut r = start(cfg(&[&format!("host:{port}")], false)).unwrap();
    let g = &mut r.guest;
    let u = g.udp(5353);
    g.dns(u, &query("host.forkd.internal", TYPE::A, 1)).unwrap();
    // A bare SYN from a port the guest stack has no socket for: the back end
    // connects on the host, answers SYN-ACK, and the guest stack replies RST,
    // so the back end's listener falls back to Listen.
    g.send_raw(&raw_tcp(
        41000,
        GW,
        port,
        smoltcp::wire::TcpControl::Syn,
        1000,
        None,
        &[],
    ));
    g.run_until(Duration::from_millis(300), |_| false);
    // A real connection to the same endpoint must get its own host socket.
    let h = g.connect(GW, port);
    g.wait_connect(h, SECS).unwrap();
    assert!(g.send_all(h, b"hello", SECS));
    g.tcp(h).close();
    g.run_until(Duration::from_millis(300), |_| false);
    let got = server.join().unwrap();
    // The reset attempt's host socket was closed, not kept around for (or
    // handed to) the next connection.
    assert_eq!(got, vec![(b"".to_vec(), true), (b"hello".to_vec(), true)]);
    stop(r);
}
