//! The filtering DNS server's message handling (parsing and building with
//! `simple-dns`; the decisions live in [`crate::policy`]).
//!
//! A name that no rule allows gets REFUSED rather than NXDOMAIN: the guest (and
//! a test) can tell "blocked by policy" apart from "does not exist".

use std::net::Ipv4Addr;

use simple_dns::rdata::{A, RData};
use simple_dns::{CLASS, Packet, PacketFlag, QTYPE, RCODE, ResourceRecord, TYPE};

/// TTL of every answer: short, since the policy (and the host's view) may change.
pub const ANSWER_TTL: u32 = 60;
/// Most addresses put in one answer (keeps replies well under 512 bytes).
pub const MAX_ANSWERS: usize = 16;

/// The record type asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryType {
    A,
    Aaaa,
    Other,
}

/// A parsed standard query with exactly one question.
#[derive(Debug, Clone)]
pub struct Query {
    pub id: u16,
    /// Lowercase name without trailing dot; None when it contains bytes no
    /// rule can match (so it is never resolved).
    pub name: Option<String>,
    /// Printable form for logs (escaped).
    pub display: String,
    pub qtype: QueryType,
}

/// What to do with a datagram sent to the DNS server.
#[derive(Debug)]
pub enum Parsed {
    Query(Query),
    /// Parseable but not a single standard query: answer with this reply.
    Reply(Vec<u8>),
    /// Garbage or a response: drop silently.
    Ignore,
}

fn name_of(packet: &Packet<'_>) -> (Option<String>, String) {
    let q = &packet.questions[0];
    let mut valid = true;
    let mut labels = Vec::new();
    for bytes in q.qname.as_bytes() {
        let label: Vec<u8> = bytes.iter().map(u8::to_ascii_lowercase).collect();
        if label.is_empty()
            || !label
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'_')
        {
            valid = false;
        }
        labels.push(String::from_utf8_lossy(&label).into_owned());
    }
    let joined = labels.join(".");
    let display = crate::sanitize(&joined);
    let valid = valid && !joined.is_empty() && joined.len() <= 253;
    (valid.then_some(joined), display)
}

/// Parses one datagram received on 10.0.2.3:53.
pub fn parse(data: &[u8]) -> Parsed {
    let Ok(packet) = Packet::parse(data) else {
        return Parsed::Ignore;
    };
    if packet.has_flags(PacketFlag::RESPONSE) {
        return Parsed::Ignore;
    }
    if packet.questions.len() != 1 || packet.opcode() != simple_dns::OPCODE::StandardQuery {
        let mut reply = Packet::new_reply(packet.id());
        *reply.rcode_mut() = if packet.questions.len() != 1 {
            RCODE::FormatError
        } else {
            RCODE::NotImplemented
        };
        return match reply.build_bytes_vec() {
            Ok(b) => Parsed::Reply(b),
            Err(_) => Parsed::Ignore,
        };
    }
    let (name, display) = name_of(&packet);
    let qtype = match packet.questions[0].qtype {
        QTYPE::TYPE(TYPE::A) => QueryType::A,
        QTYPE::TYPE(TYPE::AAAA) => QueryType::Aaaa,
        _ => QueryType::Other,
    };
    Parsed::Query(Query {
        id: packet.id(),
        name,
        display,
        qtype,
    })
}

/// Builds the reply to `query` (the original datagram, which [`parse`]
/// accepted): `rcode` and A records for `addrs`.
pub fn reply(query: &[u8], rcode: RCODE, addrs: &[Ipv4Addr]) -> Option<Vec<u8>> {
    let q = Packet::parse(query).ok()?;
    let question = q.questions.first()?.clone();
    let mut r = Packet::new_reply(q.id());
    if q.has_flags(PacketFlag::RECURSION_DESIRED) {
        r.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    r.set_flags(PacketFlag::RECURSION_AVAILABLE);
    *r.rcode_mut() = rcode;
    for ip in addrs.iter().take(MAX_ANSWERS) {
        r.answers.push(ResourceRecord::new(
            question.qname.clone(),
            CLASS::IN,
            ANSWER_TTL,
            RData::A(A {
                address: u32::from(*ip),
            }),
        ));
    }
    r.questions.push(question);
    r.build_bytes_vec_compressed().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::{Name, QCLASS, Question};

    fn query(name: &str, t: TYPE) -> Vec<u8> {
        let mut p = Packet::new_query(7);
        p.set_flags(PacketFlag::RECURSION_DESIRED);
        p.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(t),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        p.build_bytes_vec().unwrap()
    }

    #[test]
    fn parse_and_reply() {
        let q = query("WWW.Example.com", TYPE::A);
        let Parsed::Query(p) = parse(&q) else {
            panic!("not a query")
        };
        assert_eq!(p.name.as_deref(), Some("www.example.com"));
        assert_eq!(p.qtype, QueryType::A);
        let r = reply(&q, RCODE::NoError, &[Ipv4Addr::new(1, 2, 3, 4)]).unwrap();
        let r = Packet::parse(&r).unwrap();
        assert_eq!(r.id(), 7);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].ttl, ANSWER_TTL);
        assert!(matches!(r.answers[0].rdata, RData::A(A { address }) if address == 0x01020304));
    }

    #[test]
    fn garbage_is_ignored() {
        assert!(matches!(parse(&[]), Parsed::Ignore));
        assert!(matches!(parse(&[0xff; 11]), Parsed::Ignore));
        let mut q = query("a.b", TYPE::A);
        q.truncate(q.len() - 3);
        assert!(matches!(parse(&q), Parsed::Ignore));
        // A label of 0xC0 pointing to itself must not loop.
        let mut looped = query("a.b", TYPE::A);
        looped[12] = 0xc0;
        looped[13] = 12;
        let _ = parse(&looped);
        let weird = query("a\u{1}b.com", TYPE::A);
        if let Parsed::Query(p) = parse(&weird) {
            assert_eq!(p.name, None);
            assert!(!p.display.contains('\u{1}'));
        }
    }
}
