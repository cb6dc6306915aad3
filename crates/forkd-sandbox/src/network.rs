//! A child's network as a request states it, and the back end plan made from it.
//!
//! One type for every front end: the CLI's `--net`/`--allow`/`--allow-all`/`--expose`, the
//! API's `network` object and the SDK's `network=` all become a [`Network`], and
//! [`Network::plan`] turns it into the engine's [`NetPlan`]: the `forkd __netd` back end with
//! a parsed policy (forkd-net), and the guest side the agent configures.

use forkd_engine::net::NetPlan;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The hidden command of the `forkd` binary that runs one child's network back end.
pub const NETD_COMMAND: &str = "__netd";

/// Most `allow` rules and `expose` ports one request may carry.
pub const MAX_RULES: usize = 256;
pub const MAX_EXPOSE: usize = 32;

/// A guest port to reach from the host: `8080` (a free host port is picked per child) or
/// `"18080:8080"` (host port 18080; one child only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ExposeSpec {
    /// Any JSON integer, so that an out-of-range one is refused by [`ExposeSpec::parse`] with
    /// a message naming it, not by the deserializer with a generic one.
    Port(i64),
    Text(String),
}

/// A child's network. With none, a child has no network at all (its NIC has no back end).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Egress allowlist, each `HOST|DOMAIN|CIDR[:PORT]` (`host` is the host's loopback,
    /// `*.example.com` its subdomains). Everything else is denied.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Allow every public address. Private ranges, the host and 169.254.0.0/16 (cloud
    /// metadata) still need an explicit `allow`.
    #[serde(default)]
    pub allow_all: bool,
    /// Guest ports reachable on the host's 127.0.0.1.
    #[serde(default)]
    pub expose: Vec<ExposeSpec>,
    /// Bandwidth of each child, both directions together, in Mbit/s (default 100; 0: none).
    #[serde(default)]
    pub rate_mbit: Option<u32>,
}

/// Why a [`Network`] was refused; every variant names the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("allow: {0}")]
    Rule(#[from] forkd_net::RuleError),
    #[error(
        "expose {input:?}: {reason} (accepted: GUEST_PORT, or HOST_PORT:GUEST_PORT, ports 1-65535)"
    )]
    Expose { input: String, reason: &'static str },
    #[error("{field}: at most {max} entries")]
    TooMany { field: &'static str, max: usize },
}

impl NetworkError {
    /// The request field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            NetworkError::Rule(_) => "network.allow",
            NetworkError::Expose { .. } => "network.expose",
            NetworkError::TooMany { field, .. } => field,
        }
    }
}

fn port(s: &str) -> Option<u16> {
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

impl ExposeSpec {
    /// Parse into the back end's form.
    pub fn parse(&self) -> Result<forkd_net::Expose, NetworkError> {
        let bad = |input: String, reason| NetworkError::Expose { input, reason };
        match self {
            ExposeSpec::Port(p) => match u16::try_from(*p).ok().filter(|p| *p != 0) {
                Some(guest) => Ok(forkd_net::Expose { guest, host: None }),
                None => Err(bad(p.to_string(), "not a port number")),
            },
            ExposeSpec::Text(t) => match t.split_once(':') {
                None => port(t)
                    .map(|guest| forkd_net::Expose { guest, host: None })
                    .ok_or_else(|| bad(t.clone(), "not a port number")),
                Some((h, g)) => match (port(h), port(g)) {
                    (Some(host), Some(guest)) => Ok(forkd_net::Expose {
                        guest,
                        host: Some(host),
                    }),
                    _ => Err(bad(t.clone(), "not two port numbers")),
                },
            },
        }
    }
}

impl Network {
    /// Check every field and build the back end's configuration.
    pub fn config(&self) -> Result<forkd_net::NetConfig, NetworkError> {
        if self.allow.len() > MAX_RULES {
            return Err(NetworkError::TooMany {
                field: "network.allow",
                max: MAX_RULES,
            });
        }
        if self.expose.len() > MAX_EXPOSE {
            return Err(NetworkError::TooMany {
                field: "network.expose",
                max: MAX_EXPOSE,
            });
        }
        let policy = forkd_net::Policy::from_rules(&self.allow, self.allow_all)?;
        let expose = self
            .expose
            .iter()
            .map(ExposeSpec::parse)
            .collect::<Result<Vec<_>, _>>()?;
        let mut cfg = forkd_net::NetConfig {
            policy,
            expose,
            ..Default::default()
        };
        if let Some(r) = self.rate_mbit {
            cfg.rate_mbit = r;
        }
        Ok(cfg)
    }

    /// The engine's plan: run `program __netd --config JSON` per child.
    pub fn plan(&self, program: &Path) -> Result<NetPlan, NetworkError> {
        let cfg = self.config()?;
        if cfg.policy.allow_all {
            tracing::warn!(
                "network: --allow-all: children may reach any public address (private ranges, \
                 the host and 169.254.0.0/16 stay closed unless allowed by address)"
            );
        }
        let fixed_ports = fixed_ports(&cfg);
        let json = serde_json::to_string(&cfg).expect("a NetConfig serialises");
        Ok(NetPlan {
            program: program.to_path_buf(),
            args: vec![NETD_COMMAND.into(), "--config".into(), json],
            guest: forkd_agent::NetSetup::standard(),
            fixed_ports,
        })
    }
}

/// The host ports a configuration asks for by number (`HOST:GUEST`).
pub fn fixed_ports(cfg: &forkd_net::NetConfig) -> Vec<u16> {
    cfg.expose.iter().filter_map(|e| e.host).collect()
}

/// The program that serves children's networks: this very binary (`forkd`, or `forkd serve`).
pub fn netd_program() -> std::io::Result<std::path::PathBuf> {
    std::env::current_exe()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expose_forms() {
        let e = |s: &str| ExposeSpec::Text(s.into()).parse();
        assert_eq!(e("8080").unwrap().guest, 8080);
        assert_eq!(e("18080:80").unwrap().host, Some(18080));
        for bad in ["", "0", "x", "70000", "1:", ":80", "1:2:3", "-5"] {
            assert!(
                matches!(e(bad), Err(NetworkError::Expose { .. })),
                "{bad:?}"
            );
        }
        for bad in [0, -1, 70000] {
            let e = ExposeSpec::Port(bad).parse().unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        let v: Network = serde_json::from_str(r#"{"expose": [70000]}"#).unwrap();
        assert!(v.config().unwrap_err().to_string().contains("70000"));
    }

    #[test]
    fn bad_rule_names_its_field() {
        let n = Network {
            allow: vec!["10.0.0.0/33".into()],
            ..Default::default()
        };
        let e = n.config().unwrap_err();
        assert_eq!(e.field(), "network.allow");
        assert!(e.to_string().contains("10.0.0.0/33"), "{e}");
    }

    #[test]
    fn plan_carries_the_policy() {
        let n = Network {
            allow: vec!["host:8000".into(), "example.com".into()],
            expose: vec![ExposeSpec::Port(80), ExposeSpec::Text("18080:8080".into())],
            ..Default::default()
        };
        let p = n.plan(Path::new("/bin/forkd")).unwrap();
        assert_eq!(p.args[0], NETD_COMMAND);
        let back: forkd_net::NetConfig = serde_json::from_str(&p.args[2]).unwrap();
        assert_eq!(back, n.config().unwrap());
        assert_eq!(p.fixed_ports, vec![18080]);
        assert_eq!(p.guest.gateway, "10.0.2.2");
    }
}
