//! Friendly parsing of the addresses users type: `--listen` for the servers (`forkd hub
//! serve`, `forkd serve`) and `--hub` without a scheme. One parser for every command.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("cannot listen on {input:?}: {reason}")]
    Listen { input: String, reason: String },
}

impl AddressError {
    /// What to type instead.
    pub fn hint(&self) -> &'static str {
        "use PORT or :PORT (127.0.0.1), HOST:PORT, or [IPv6]:PORT, e.g. 8080, :0, \
         0.0.0.0:8080 (all interfaces), [::1]:8080"
    }
}

/// A listen address: `PORT` and `:PORT` mean `127.0.0.1:PORT` (loopback only: exposing a
/// server is a choice to spell out, e.g. `0.0.0.0:PORT`); `HOST:PORT` and `[IPv6]:PORT` as
/// usual, with a host name resolved to its first address. Port 0 picks a free port.
pub fn listen_addr(input: &str) -> Result<SocketAddr, AddressError> {
    let err = |reason: &str| AddressError::Listen {
        input: input.to_string(),
        reason: reason.to_string(),
    };
    let s = input.trim();
    let bare = s.strip_prefix(':').unwrap_or(s);
    if !bare.is_empty() && bare.bytes().all(|b| b.is_ascii_digit()) {
        let port: u16 = bare
            .parse()
            .map_err(|_| err("the port must be between 0 and 65535"))?;
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if s.contains("://") {
        return Err(err("a listen address has no scheme"));
    }
    if s.parse::<IpAddr>().is_ok() {
        return Err(err("the port is missing"));
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(err("the port is missing"));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(err("expected HOST:PORT with a port between 0 and 65535"));
    }
    if host == "localhost" {
        let port = port.parse::<u16>().expect("checked above");
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    match s.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| err("the host name has no address")),
        Err(e) => Err(err(&format!("cannot resolve the host name: {e}"))),
    }
}

/// A hub given as `HOST:PORT[/PREFIX]` (no scheme) is `http://HOST:PORT[/PREFIX]`, the way
/// `forkd hub serve` prints itself; anything else is returned unchanged.
pub fn hub_url(input: &str) -> std::borrow::Cow<'_, str> {
    if input.contains("://") || input.starts_with('/') {
        return input.into();
    }
    let authority = input.split('/').next().unwrap_or_default();
    let has_port = authority.rsplit_once(':').is_some_and(|(h, p)| {
        !h.is_empty() && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())
    });
    if has_port {
        format!("http://{input}").into()
    } else {
        input.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_forms() {
        let lo = |p| SocketAddr::from((Ipv4Addr::LOCALHOST, p));
        assert_eq!(listen_addr("8080"), Ok(lo(8080)));
        assert_eq!(listen_addr(":0"), Ok(lo(0)));
        assert_eq!(listen_addr("localhost:7"), Ok(lo(7)));
        assert_eq!(listen_addr("0.0.0.0:80").unwrap().to_string(), "0.0.0.0:80");
        assert_eq!(listen_addr("[::1]:80").unwrap().to_string(), "[::1]:80");
        for bad in [
            "",
            "99999",
            ":x",
            "127.0.0.1",
            "http://x:1",
            "host:",
            "a:b:c",
        ] {
            assert!(listen_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hub_forms() {
        assert_eq!(hub_url("127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(hub_url("hub.example:80/p"), "http://hub.example:80/p");
        assert_eq!(hub_url("https://x/"), "https://x/");
        assert_eq!(hub_url("/srv/hub"), "/srv/hub");
        assert_eq!(hub_url("s3://b/p"), "s3://b/p");
        assert_eq!(hub_url("nonsense"), "nonsense");
    }
}
