//! Egress policy: which destinations a child may reach.
//!
//! Pure and synchronous so it can be unit-tested without any network.
//!
//! # Special (private / non-public) ranges
//!
//! Addresses in [`SPECIAL_RANGES`] (loopback, link-local incl. the cloud
//! metadata address, RFC 1918, CGNAT, multicast, reserved, broadcast) are never
//! reachable through `allow_all`, through a domain rule (that would allow DNS
//! rebinding: a public name answering with 10.0.0.1), or through a broad CIDR
//! rule such as `0.0.0.0/0`. They are reachable only through a rule that names
//! them *on purpose*: an exact address, `host`, or a CIDR that lies entirely
//! inside one special range (e.g. `10.1.0.0/16`). A CIDR that merely overlaps a
//! special range (e.g. `96.0.0.0/3` overlapping 100.64.0.0/10) opens only the
//! public part of itself; the operator has to write the private part out.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Printed in every parse error so the user sees the valid forms.
pub const ACCEPTED_FORMS: &str =
    "accepted: 1.2.3.4, 10.0.0.0/8, example.com, *.example.com, host, each with an optional :PORT";

/// The host's loopback, which the guest reaches as the gateway address.
pub const HOST_LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// Ranges that a general rule never opens (see the module docs).
pub const SPECIAL_RANGES: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(224, 0, 0, 0), 4),
    // 240/4 also contains 255.255.255.255.
    (Ipv4Addr::new(240, 0, 0, 0), 4),
];

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

fn cidr_contains(net: Ipv4Addr, prefix: u8, ip: Ipv4Addr) -> bool {
    (u32::from(ip) & mask(prefix)) == u32::from(net)
}

/// True when `ip` lies in one of [`SPECIAL_RANGES`].
pub fn is_special(ip: Ipv4Addr) -> bool {
    SPECIAL_RANGES
        .iter()
        .any(|&(net, p)| cidr_contains(net, p, ip))
}

/// True when the whole of `net/prefix` lies inside one special range.
fn cidr_inside_special(net: Ipv4Addr, prefix: u8) -> bool {
    SPECIAL_RANGES
        .iter()
        .any(|&(snet, sp)| prefix >= sp && cidr_contains(snet, sp, net))
}

/// What a rule matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// The keyword `host`: the host's loopback 127.0.0.1.
    Host,
    /// One IPv4 address.
    Ip(Ipv4Addr),
    /// An IPv4 network (host bits are zero; enforced by the parser).
    Cidr(Ipv4Addr, u8),
    /// An exact domain name (lowercase, no trailing dot).
    Domain(String),
    /// `*.suffix`: strict subdomains of `suffix`, not `suffix` itself.
    Wildcard(String),
}

/// One `--allow` entry: a target and an optional port (None = every port).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Rule {
    pub target: Target,
    pub port: Option<u16>,
}

/// Why an `--allow` entry was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("{input:?}: empty rule ({acc})", acc = ACCEPTED_FORMS)]
    Empty { input: String },
    #[error("{input:?}: IPv6 is not supported ({acc})", acc = ACCEPTED_FORMS)]
    Ipv6 { input: String },
    #[error("{input:?}: port must be a number 1-65535 ({acc})", acc = ACCEPTED_FORMS)]
    BadPort { input: String },
    #[error("{input:?}: prefix length must be 0-32 ({acc})", acc = ACCEPTED_FORMS)]
    BadPrefix { input: String },
    #[error("{input:?}: not a valid IPv4 address ({acc})", acc = ACCEPTED_FORMS)]
    BadAddress { input: String },
    #[error(
        "{input:?}: address has bits set outside the /{prefix} prefix, did you mean {suggest}/{prefix}? ({acc})",
        acc = ACCEPTED_FORMS
    )]
    HostBits {
        input: String,
        prefix: u8,
        suggest: Ipv4Addr,
    },
    #[error("{input:?}: invalid domain name: {reason} ({acc})", acc = ACCEPTED_FORMS)]
    BadDomain { input: String, reason: &'static str },
}

/// Validates an ASCII domain name (already lowercased, no trailing dot).
fn check_domain(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if name.len() > 253 {
        return Err("longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label (two dots in a row, or a leading dot)");
        }
        if label.len() > 63 {
            return Err("a label is longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err("labels may contain only a-z, 0-9 and '-' ('*' only as a leading '*.')");
        }
        // RFC 952/1123 host names: a hyphen joins, it never starts or ends a label.
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label starts or ends with '-'");
        }
    }
    Ok(())
}

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let input = raw.to_string();
        let s = raw.trim().to_ascii_lowercase();
        if s.is_empty() {
            return Err(RuleError::Empty { input });
        }
        // Two or more colons or a bracket can only be IPv6 (an IPv4 rule has at
        // most the one colon before the port).
        if s.starts_with('[') || s.matches(':').count() >= 2 {
            return Err(RuleError::Ipv6 { input });
        }
        let (host, port) = match s.split_once(':') {
            Some((h, p)) => {
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 5 {
                    return Err(RuleError::BadPort { input });
                }
                match p.parse::<u32>() {
                    Ok(n) if (1..=65535).contains(&n) => (h, Some(n as u16)),
                    _ => return Err(RuleError::BadPort { input }),
                }
            }
            None => (s.as_str(), None),
        };
        if host.is_empty() {
            return Err(RuleError::Empty { input });
        }
        let target = if host == "host" {
            Target::Host
        } else if let Some((addr, prefix)) = host.split_once('/') {
            let addr: Ipv4Addr = addr.parse().map_err(|_| RuleError::BadAddress {
                input: input.clone(),
            })?;
            let prefix: u8 = match prefix.parse::<u8>() {
                Ok(p) if p <= 32 && prefix.bytes().all(|b| b.is_ascii_digit()) => p,
                _ => return Err(RuleError::BadPrefix { input }),
            };
            let masked = Ipv4Addr::from(u32::from(addr) & mask(prefix));
            if masked != addr {
                return Err(RuleError::HostBits {
                    input,
                    prefix,
                    suggest: masked,
                });
            }
            Target::Cidr(addr, prefix)
        } else if let Ok(ip) = host.parse::<Ipv4Addr>() {
            Target::Ip(ip)
        } else if host
            .rsplit('.')
            .next()
            .is_some_and(|last| !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
        {
            // A name whose last label is numeric is never a valid domain (no
            // numeric TLDs), so this was meant as an address: say so.
            return Err(RuleError::BadAddress { input });
        } else {
            let host = host.strip_suffix('.').unwrap_or(host);
            let (wild, name) = match host.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, host),
            };
            check_domain(name).map_err(|reason| RuleError::BadDomain {
                input: input.clone(),
                reason,
            })?;
            if wild {
                Target::Wildcard(name.to_string())
            } else {
                Target::Domain(name.to_string())
            }
        };
        Ok(Rule { target, port })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Host => f.write_str("host")?,
            Target::Ip(ip) => write!(f, "{ip}")?,
            Target::Cidr(net, p) => write!(f, "{net}/{p}")?,
            Target::Domain(d) => f.write_str(d)?,
            Target::Wildcard(d) => write!(f, "*.{d}")?,
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

impl TryFrom<String> for Rule {
    type Error = RuleError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Rule> for String {
    fn from(r: Rule) -> String {
        r.to_string()
    }
}

impl Rule {
    fn port_ok(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }

    /// Whether this address rule covers `ip` at all, and whether it may open a
    /// special address (see the module docs).
    fn covers_ip(&self, ip: Ipv4Addr) -> bool {
        match self.target {
            Target::Host => ip == HOST_LOOPBACK,
            Target::Ip(a) => a == ip,
            Target::Cidr(net, p) => {
                cidr_contains(net, p, ip) && (!is_special(ip) || cidr_inside_special(net, p))
            }
            Target::Domain(_) | Target::Wildcard(_) => false,
        }
    }

    /// Whether this domain rule matches a (lowercase) query name.
    fn matches_name(&self, name: &str) -> bool {
        match &self.target {
            Target::Domain(d) => name == d,
            Target::Wildcard(d) => name
                .strip_suffix(d.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            _ => false,
        }
    }
}

/// The whole egress policy of one child.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Allow every *public* destination (never the special ranges).
    #[serde(default)]
    pub allow_all: bool,
}

impl Policy {
    /// Parses a list of `--allow` entries.
    pub fn from_rules<S: AsRef<str>>(rules: &[S], allow_all: bool) -> Result<Self, RuleError> {
        let rules = rules
            .iter()
            .map(|r| r.as_ref().parse())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy { rules, allow_all })
    }

    /// May the child open a TCP connection to the host-side address `ip:port`?
    /// (Addresses learnt through DNS are checked separately by the caller.)
    pub fn allows_addr(&self, ip: Ipv4Addr, port: u16) -> bool {
        if self
            .rules
            .iter()
            .any(|r| r.covers_ip(ip) && r.port_ok(port))
        {
            return true;
        }
        self.allow_all && !is_special(ip)
    }

    /// Whether some address rule (any port) explicitly covers `ip`; used to
    /// decide whether a special address may appear in a DNS answer.
    pub fn explicitly_covers(&self, ip: Ipv4Addr) -> bool {
        self.rules.iter().any(|r| r.covers_ip(ip))
    }

    /// If the guest may resolve `name`, the ports its answers unlock (None in
    /// the list = any port). `None` when no rule allows the name.
    pub fn name_ports(&self, name: &str) -> Option<Vec<Option<u16>>> {
        let mut ports: Vec<Option<u16>> = self
            .rules
            .iter()
            .filter(|r| r.matches_name(name))
            .map(|r| r.port)
            .collect();
        if ports.is_empty() {
            // allow_all lets any name resolve; its public answers are then
            // reachable anyway, so nothing extra is unlocked.
            return self.allow_all.then(Vec::new);
        }
        ports.dedup();
        Some(ports)
    }

    /// Maps one resolved address to what the guest may see: special addresses
    /// are dropped unless an address rule names them, and an allowed host
    /// loopback becomes the gateway address (the guest's path to the host).
    pub fn filter_answer(&self, ip: Ipv4Addr, gateway: Ipv4Addr) -> Option<Ipv4Addr> {
        if !is_special(ip) {
            return Some(ip);
        }
        if !self.explicitly_covers(ip) {
            return None;
        }
        if ip == HOST_LOOPBACK {
            return Some(gateway);
        }
        if ip.is_loopback() {
            // Only 127.0.0.1 is reachable via the gateway; other loopback
            // addresses would connect somewhere the answer didn't say.
            return None;
        }
        Some(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> RuleError {
        s.parse::<Rule>().unwrap_err()
    }

    #[test]
    fn parses_all_forms() {
        let cases = [
            ("1.2.3.4", Target::Ip(Ipv4Addr::new(1, 2, 3, 4)), None),
            (
                "1.2.3.4:443",
                Target::Ip(Ipv4Addr::new(1, 2, 3, 4)),
                Some(443),
            ),
            (
                "10.0.0.0/8",
                Target::Cidr(Ipv4Addr::new(10, 0, 0, 0), 8),
                None,
            ),
            (
                "0.0.0.0/0:80",
                Target::Cidr(Ipv4Addr::UNSPECIFIED, 0),
                Some(80),
            ),
            ("host", Target::Host, None),
            ("HOST:8000", Target::Host, Some(8000)),
            ("Example.COM", Target::Domain("example.com".into()), None),
            (
                "example.com.:80",
                Target::Domain("example.com".into()),
                Some(80),
            ),
            (
                "*.example.com",
                Target::Wildcard("example.com".into()),
                None,
            ),
            ("localhost", Target::Domain("localhost".into()), None),
            ("a-1.b2:65535", Target::Domain("a-1.b2".into()), Some(65535)),
        ];
        for (s, target, port) in cases {
            let r: Rule = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(r, Rule { target, port }, "{s}");
            // Display round-trips.
            assert_eq!(r.to_string().parse::<Rule>().unwrap(), r);
        }
    }

    #[test]
    fn error_forms() {
        assert!(matches!(err(""), RuleError::Empty { .. }));
        assert!(matches!(err("   "), RuleError::Empty { .. }));
        assert!(matches!(err(":80"), RuleError::Empty { .. }));
        assert!(matches!(err("::1"), RuleError::Ipv6 { .. }));
        assert!(matches!(err("[::1]:80"), RuleError::Ipv6 { .. }));
        assert!(matches!(err("2001:db8::/32"), RuleError::Ipv6 { .. }));
        assert!(matches!(err("1.2.3.4:0"), RuleError::BadPort { .. }));
        assert!(matches!(err("1.2.3.4:65536"), RuleError::BadPort { .. }));
        assert!(matches!(err("1.2.3.4:999999"), RuleError::BadPort { .. }));
        assert!(matches!(err("1.2.3.4:"), RuleError::BadPort { .. }));
        assert!(matches!(err("1.2.3.4:http"), RuleError::BadPort { .. }));
        assert!(matches!(err("1.2.3.4:-1"), RuleError::BadPort { .. }));
        assert!(matches!(err("10.0.0.0/33"), RuleError::BadPrefix { .. }));
        assert!(matches!(err("10.0.0.0/"), RuleError::BadPrefix { .. }));
        assert!(matches!(err("10.0.0.0/+8"), RuleError::BadPrefix { .. }));
        assert!(matches!(err("10.0.0.256/8"), RuleError::BadAddress { .. }));
        assert!(matches!(err("example.com/8"), RuleError::BadAddress { .. }));
        assert!(matches!(err("300.1.1.1"), RuleError::BadAddress { .. }));
        assert!(matches!(err("1.2.3"), RuleError::BadAddress { .. }));
        assert!(matches!(
            err("10.0.0.1/8"),
            RuleError::HostBits { prefix: 8, .. }
        ));
        assert!(matches!(err("exa mple.com"), RuleError::BadDomain { .. }));
        assert!(matches!(err("ex_ample.com"), RuleError::BadDomain { .. }));
        assert!(matches!(err("a..b"), RuleError::BadDomain { .. }));
        assert!(matches!(err(".example.com"), RuleError::BadDomain { .. }));
        assert!(matches!(err("*"), RuleError::BadDomain { .. }));
        assert!(matches!(err("*."), RuleError::BadDomain { .. }));
        assert!(matches!(err("foo.*.com"), RuleError::BadDomain { .. }));
        assert!(matches!(err("**.com"), RuleError::BadDomain { .. }));
        assert!(matches!(err("bücher.de"), RuleError::BadDomain { .. }));
        assert!(matches!(err("-bad-.com"), RuleError::BadDomain { .. }));
        assert!(matches!(err("bad-.com"), RuleError::BadDomain { .. }));
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(matches!(err(&long_label), RuleError::BadDomain { .. }));
        let long_name = format!("{}com", "abcdefghi.".repeat(26));
        assert!(long_name.len() > 253);
        assert!(matches!(err(&long_name), RuleError::BadDomain { .. }));
    }

    #[test]
    fn error_message_says_what_and_which_forms() {
        let msg = err("10.0.0.0/33").to_string();
        assert_eq!(
            msg,
            "\"10.0.0.0/33\": prefix length must be 0-32 (accepted: 1.2.3.4, 10.0.0.0/8, \
             example.com, *.example.com, host, each with an optional :PORT)"
        );
        assert!(err("::1").to_string().contains("IPv6 is not supported"));
        assert!(err("10.0.0.1/8").to_string().contains("10.0.0.0/8"));
    }

    #[test]
    fn special_ranges_need_explicit_rules() {
        let meta = Ipv4Addr::new(169, 254, 169, 254);
        let open = Policy {
            rules: vec!["0.0.0.0/0".parse().unwrap(), "example.com".parse().unwrap()],
            allow_all: true,
        };
        assert!(!open.allows_addr(meta, 80));
        assert!(!open.allows_addr(Ipv4Addr::LOCALHOST, 80));
        assert!(!open.allows_addr(Ipv4Addr::new(10, 1, 2, 3), 80));
        assert!(!open.allows_addr(Ipv4Addr::new(100, 64, 0, 1), 80));
        assert!(!open.allows_addr(Ipv4Addr::new(172, 31, 0, 1), 80));
        assert!(!open.allows_addr(Ipv4Addr::new(192, 168, 1, 1), 80));
        assert!(!open.allows_addr(Ipv4Addr::new(224, 0, 0, 1), 80));
        assert!(!open.allows_addr(Ipv4Addr::BROADCAST, 80));
        assert!(!open.allows_addr(Ipv4Addr::UNSPECIFIED, 80));
        assert!(open.allows_addr(Ipv4Addr::new(1, 1, 1, 1), 80));
        assert!(open.allows_addr(Ipv4Addr::new(172, 32, 0, 1), 80));

        let p =
            Policy::from_rules(&["host:8000", "10.1.0.0/16", "169.254.169.254:80"], false).unwrap();
        assert!(p.allows_addr(Ipv4Addr::LOCALHOST, 8000));
        assert!(!p.allows_addr(Ipv4Addr::LOCALHOST, 8001));
        assert!(p.allows_addr(Ipv4Addr::new(10, 1, 9, 9), 22));
        assert!(!p.allows_addr(Ipv4Addr::new(10, 2, 0, 1), 22));
        assert!(p.allows_addr(meta, 80));
        assert!(!p.allows_addr(meta, 81));
        assert!(!p.allows_addr(Ipv4Addr::new(1, 1, 1, 1), 80));

        // A CIDR overlapping a special range only opens its public part.
        let p = Policy::from_rules(&["96.0.0.0/3"], false).unwrap();
        assert!(p.allows_addr(Ipv4Addr::new(99, 1, 1, 1), 1));
        assert!(!p.allows_addr(Ipv4Addr::new(100, 64, 0, 1), 1));
    }

    #[test]
    fn names_and_answers() {
        let p = Policy::from_rules(&["example.com:443", "*.corp.net", "localhost"], false).unwrap();
        assert_eq!(p.name_ports("example.com"), Some(vec![Some(443)]));
        assert_eq!(p.name_ports("www.example.com"), None);
        assert_eq!(p.name_ports("a.b.corp.net"), Some(vec![None]));
        assert_eq!(p.name_ports("corp.net"), None);
        assert_eq!(p.name_ports("xcorp.net"), None);
        assert_eq!(p.name_ports("other.org"), None);
        let gw = Ipv4Addr::new(10, 0, 2, 2);
        assert_eq!(p.filter_answer(Ipv4Addr::LOCALHOST, gw), None);
        assert_eq!(
            p.filter_answer(Ipv4Addr::new(10, 0, 0, 1), gw),
            None,
            "rebinding to a private address"
        );
        assert_eq!(
            p.filter_answer(Ipv4Addr::new(8, 8, 8, 8), gw),
            Some(Ipv4Addr::new(8, 8, 8, 8))
        );
        let p = Policy::from_rules(&["localhost", "host"], false).unwrap();
        assert_eq!(p.filter_answer(Ipv4Addr::LOCALHOST, gw), Some(gw));
        assert_eq!(p.filter_answer(Ipv4Addr::new(127, 0, 0, 53), gw), None);
        let all = Policy {
            rules: vec![],
            allow_all: true,
        };
        assert_eq!(all.name_ports("anything.org"), Some(vec![]));
    }

    #[test]
    fn serde_uses_rule_strings() {
        let p = Policy::from_rules(&["host:8000", "*.example.com", "10.0.0.0/8:22"], true).unwrap();
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(
            j,
            r#"{"rules":["host:8000","*.example.com","10.0.0.0/8:22"],"allow_all":true}"#
        );
        assert_eq!(serde_json::from_str::<Policy>(&j).unwrap(), p);
        assert!(serde_json::from_str::<Policy>(r#"{"rules":["10.0.0.0/33"]}"#).is_err());
        assert_eq!(
            serde_json::from_str::<Policy>("{}").unwrap(),
            Policy::default()
        );
    }
}
