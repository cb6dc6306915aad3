//! Looks at each guest frame before smoltcp does, so that the policy decides
//! what the (deliberately promiscuous, `any_ip`) interface gets to see.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::wire::{
    ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, IpAddress, IpProtocol,
    Ipv4Packet, TcpPacket, UdpPacket,
};

use crate::{DNS_ADDR, GATEWAY_ADDR, GATEWAY_MAC};

/// A guest TCP connection: guest endpoint and the destination it asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FlowKey {
    pub guest: SocketAddrV4,
    pub dst: SocketAddrV4,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Inspect {
    /// Hand to the interface as is.
    Pass,
    /// Not for us (IPv6, other UDP, ICMP to the world, fragments, garbage).
    Drop,
    /// A connection request (SYN without ACK).
    Syn(FlowKey),
    /// Any other TCP segment.
    Tcp(FlowKey),
}

fn ours(ip: Ipv4Addr) -> bool {
    ip == GATEWAY_ADDR || ip == DNS_ADDR
}

/// Classifies one frame. Only SYNs have their checksums verified here (they
/// trigger host connects); everything else is left to smoltcp.
pub(crate) fn inspect(frame: &[u8]) -> Inspect {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Inspect::Drop;
    };
    match eth.ethertype() {
        EthernetProtocol::Arp => {
            // With any_ip smoltcp would answer ARP for every address, including
            // the guest's own (breaking its duplicate-address probe), so only
            // our two addresses get through.
            let Ok(arp) = ArpPacket::new_checked(eth.payload()) else {
                return Inspect::Drop;
            };
            match ArpRepr::parse(&arp) {
                Ok(ArpRepr::EthernetIpv4 {
                    target_protocol_addr,
                    ..
                }) if ours(target_protocol_addr) => Inspect::Pass,
                _ => Inspect::Drop,
            }
        }
        // smoltcp would drop IP frames for another MAC anyway, but only after
        // the policy had acted on them (a host connect for a dropped SYN).
        EthernetProtocol::Ipv4 if eth.dst_addr() == EthernetAddress(GATEWAY_MAC) => {
            inspect_ipv4(eth.payload())
        }
        _ => Inspect::Drop,
    }
}

fn inspect_ipv4(data: &[u8]) -> Inspect {
    let Ok(ip) = Ipv4Packet::new_checked(data) else {
        return Inspect::Drop;
    };
    // smoltcp is built without reassembly; fragments would only be dropped
    // later, and a partial TCP header must not drive the policy.
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Inspect::Drop;
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    match ip.next_header() {
        IpProtocol::Tcp => {
            let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
                return Inspect::Drop;
            };
            let key = FlowKey {
                guest: SocketAddrV4::new(src, tcp.src_port()),
                dst: SocketAddrV4::new(dst, tcp.dst_port()),
            };
            if tcp.syn() && !tcp.ack() && !tcp.rst() {
                // A SYN makes us dial out, so it must be one smoltcp will
                // accept too (it verifies the same checksums).
                if !ip.verify_checksum()
                    || !tcp.verify_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst))
                {
                    return Inspect::Drop;
                }
                Inspect::Syn(key)
            } else {
                Inspect::Tcp(key)
            }
        }
        IpProtocol::Udp => {
            let Ok(udp) = UdpPacket::new_checked(ip.payload()) else {
                return Inspect::Drop;
            };
            if dst == DNS_ADDR && udp.dst_port() == 53 {
                Inspect::Pass
            } else {
                Inspect::Drop
            }
        }
        // smoltcp answers echo requests to its own addresses; to any other
        // address it would fake a reply, so those are dropped.
        IpProtocol::Icmp if ours(dst) => Inspect::Pass,
        _ => Inspect::Drop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_never_panics() {
        assert_eq!(inspect(&[]), Inspect::Drop);
        assert_eq!(inspect(&[0u8; 13]), Inspect::Drop);
        let mut f = vec![0u8; 14 + 20];
        f[12] = 0x08; // IPv4 with a zero header
        assert_eq!(inspect(&f), Inspect::Drop);
        f[14] = 0x4f; // IHL 15 > length
        assert_eq!(inspect(&f), Inspect::Drop);
        f[12] = 0x86;
        f[13] = 0xdd; // IPv6
        assert_eq!(inspect(&f), Inspect::Drop);
        for len in 0..80 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = inspect(&junk);
        }
    }
}
