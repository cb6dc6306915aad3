//! Networking (issue 11) on real tiny guests, with real traffic on this machine's loopback:
//! servers the test runs on 127.0.0.1, children that reach them (or are refused), ports
//! exposed to the host, DNS through the filter, and every bad input the issue names.

mod cli_common;
use cli_common::*;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// An HTTP server on 127.0.0.1 that answers every request with `body` and counts connections.
struct HostServer {
    port: u16,
    hits: Arc<AtomicUsize>,
}

impl HostServer {
    fn start(body: &'static str) -> HostServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                h.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf);
                    let _ = write!(
                        s,
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        HostServer { port, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// One child of tiny with `net` flags running `script`; returns (stdout, stderr, exit code).
fn fork_net(home: &Path, net: &[&str], script: &str) -> (String, String, Option<i64>) {
    fork_net_tag(home, "tiny", net, script)
}

/// [`fork_net`] of the image `tag`.
fn fork_net_tag(
    home: &Path,
    tag: &str,
    net: &[&str],
    script: &str,
) -> (String, String, Option<i64>) {
    let mut args = vec!["fork", "--tag", tag, "--json", "--exec", script];
    args.extend_from_slice(net);
    let v = json(&ok_in(home, &args));
    let c = &v["children"][0];
    (
        c["exec"]["stdout"].as_str().unwrap_or("").to_string(),
        c["exec"]["stderr"].as_str().unwrap_or("").to_string(),
        c["exec"]["exit_code"].as_i64(),
    )
}

/// Fork one kept child with `net` flags; returns its entry in the fork report and a guard
/// that kills it (only it: the tests share one store and run at once).
fn keep_net(home: &Path, net: &[&str]) -> (serde_json::Value, KillOne) {
    let mut args = vec!["fork", "--tag", "tiny", "--keep", "--json"];
    args.extend_from_slice(net);
    let v = json(&ok_in(home, &args));
    let c = v["children"][0].clone();
    let guard = KillOne(home.to_path_buf(), c["id"].as_str().unwrap().to_string());
    (c, guard)
}

/// Kills one kept child when dropped, even when the test fails half way.
struct KillOne(std::path::PathBuf, String);

impl Drop for KillOne {
    fn drop(&mut self) {
        let _ = forkd_in(&self.0, &["-q", "kill", &self.1]);
    }
}

fn sh(home: &Path, id: &str, script: &str) -> String {
    ok_in(home, &["exec", id, "--sh", script])
}

#[test]
fn allowed_server_is_reached_and_others_are_refused() {
    tiny();
    let allowed = HostServer::start("allowed-body");
    let denied = HostServer::start("denied-body");
    let script = format!(
        "wget -O- http://10.0.2.2:{a}/ 2>/dev/null; echo; \
         wget -O- http://10.0.2.2:{d}/ 2>&1; echo denied-rc=$?",
        a = allowed.port,
        d = denied.port
    );
    let start = Instant::now();
    let (out, _, code) = fork_net(
        home(),
        &["--allow", &format!("host:{}", allowed.port)],
        &script,
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("allowed-body"), "{out}");
    assert!(!out.contains("denied-body"), "{out}");
    assert!(out.contains("denied-rc=1"), "{out}");
    assert!(
        out.contains("refused"),
        "a denied connect is refused at once: {out}"
    );
    assert_eq!(allowed.hits(), 1);
    assert_eq!(denied.hits(), 0, "the denied server saw a connection");
    // Refused, not dropped: no connect timeout was waited out.
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn without_net_a_child_has_no_network() {
    tiny();
    let server = HostServer::start("x");
    let script = format!(
        "ping -c1 -W1 10.0.2.2 2>&1; wget -O- -T 2 http://10.0.2.2:{}/ 2>&1; true",
        server.port
    );
    let v = json(&ok(&["fork", "--tag", "tiny", "--json", "--exec", &script]));
    let out = v["children"][0]["exec"]["stdout"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(out.contains("unreachable"), "{out}");
    assert_eq!(server.hits(), 0);
    assert!(v["children"][0].get("net").is_none(), "{v}");
}

#[test]
fn metadata_and_the_host_stay_closed_under_allow_all() {
    tiny();
    let server = HostServer::start("host-body");
    let script = format!(
        "wget -O- -T 3 http://169.254.169.254/latest/meta-data/ 2>&1; echo md-rc=$?; \
         wget -O- -T 3 http://10.0.2.2:{}/ 2>&1; echo host-rc=$?",
        server.port
    );
    let (out, _, _) = fork_net(home(), &["--allow-all"], &script);
    assert!(out.contains("md-rc=1"), "{out}");
    assert!(out.contains("host-rc=1"), "{out}");
    assert!(!out.contains("host-body"), "{out}");
    assert_eq!(server.hits(), 0);
}

#[test]
fn allow_all_is_loud() {
    tiny();
    let o = forkd_in(
        home(),
        &["fork", "--tag", "tiny", "--allow-all", "--exec", "true"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--allow-all"), "{err}");
}

#[test]
fn dns_answers_through_the_filter() {
    tiny();
    // `localhost` resolves on the host to 127.0.0.1: a private answer for a public rule (the
    // shape of DNS rebinding) is dropped...
    let (out, _, _) = fork_net(
        home(),
        &["--allow", "localhost"],
        "nslookup localhost 2>&1; nslookup example.com 2>&1; true",
    );
    let answer = out.split("Name:").nth(1).unwrap_or("");
    assert!(
        !answer.contains("Address"),
        "rebinding answer let through: {out}"
    );
    assert!(!out.contains("127.0.0.1"), "{out}");
    assert!(
        out.contains("REFUSED"),
        "a name no rule allows is refused: {out}"
    );
    // ...unless the host is allowed by address too: then it is the host's alias.
    let server = HostServer::start("by-name");
    let (out, _, _) = fork_net(
        home(),
        &[
            "--allow",
            "localhost",
            "--allow",
            &format!("host:{}", server.port),
        ],
        &format!(
            "nslookup localhost 2>&1; nslookup host.forkd.internal 2>&1; \
             wget -O- http://host.forkd.internal:{}/ 2>&1; true",
            server.port
        ),
    );
    assert!(out.contains("Address: 10.0.2.2"), "{out}");
    assert!(out.contains("by-name"), "{out}");
}

#[test]
fn an_exposed_port_serves_the_childs_server_and_siblings_cannot_reach_it() {
    tiny();
    let (a, _guard) = keep_net(home(), &["--expose", "8080"]);
    let id = a["id"].as_str().unwrap().to_string();
    let host_port = a["ports"][0]["host"].as_u64().unwrap() as u16;
    assert_eq!(a["ports"][0]["guest"], 8080, "{a}");
    sh(
        home(),
        &id,
        "mkdir -p /www && echo served-by-$(hostname) > /www/index.html && httpd -p 8080 -h /www",
    );
    let mut body = String::new();
    let mut s = TcpStream::connect(("127.0.0.1", host_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    s.read_to_string(&mut body).unwrap();
    assert!(body.contains(&format!("served-by-{id}")), "{body}");

    // `ps` reports the port, in the table and in --json.
    let ps = ok(&["ps"]);
    assert!(ps.contains(&format!("127.0.0.1:{host_port}->8080")), "{ps}");
    let psj = json(&ok(&["ps", "--json"]));
    let row = psj
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id.as_str())
        .unwrap();
    assert_eq!(row["ports"][0]["host"], host_port, "{row}");

    // A sibling with a network of its own cannot reach it: not through the host's port, and
    // not on the shared link address (each child is alone on its link).
    let (out, _, _) = fork_net(
        home(),
        &["--net"],
        &format!(
            "wget -O- -T 3 http://10.0.2.2:{host_port}/ 2>&1; echo via-host=$?; \
             ping -c1 -W1 10.0.2.16 2>&1; echo ping=$?"
        ),
    );
    assert!(out.contains("via-host=1"), "{out}");
    assert!(!out.contains("served-by"), "{out}");
    assert!(out.contains("ping=1"), "{out}");
}

#[test]
fn expose_of_a_taken_port_fails_clearly_and_starts_nothing() {
    tiny();
    let home = new_home();
    build_tiny_in(home.path());
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let o = forkd_in(
        home.path(),
        &[
            "fork",
            "--tag",
            "tiny",
            "--keep",
            "--expose",
            &format!("{port}:8080"),
        ],
    );
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&port.to_string()) && err.contains("in use"),
        "{err}"
    );
    let ps = json(&ok_in(home.path(), &["ps", "--json"]));
    assert_eq!(ps.as_array().unwrap().len(), 0, "{ps}");
    // A fixed host port serves one child only.
    let o = forkd_in(
        home.path(),
        &["fork", "--tag", "tiny", "-n", "2", "--expose", "18080:8080"],
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("one child"),
        "{}",
        text(&o)
    );
}

#[test]
fn allow_entries_that_do_not_parse_are_refused_before_any_child_starts() {
    tiny();
    for bad in [
        "10.0.0.0/33",
        "10.0.0.1/8",
        "1.2.3.4:0",
        "1.2.3.4:70000",
        "::1",
        "exa mple.com",
        "-bad-.com",
        "",
    ] {
        let start = Instant::now();
        let flag = format!("--allow={bad}");
        let o = forkd(&["fork", "--tag", "tiny", &flag, "--exec", "true"]);
        assert_eq!(o.status.code(), Some(1), "{bad:?}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("error:") && err.contains("hint:"),
            "{bad:?}: {err}"
        );
        assert!(
            err.contains(&format!("{bad:?}")),
            "{bad:?} not named: {err}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{bad:?}: a VM was started"
        );
    }
    for bad in ["0", "x", "1:2:3", "70000"] {
        let flag = format!("--expose={bad}");
        let o = forkd(&["fork", "--tag", "tiny", &flag, "--exec", "true"]);
        assert!(!o.status.success(), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("expose"),
            "{}",
            text(&o)
        );
    }
}

#[test]
fn net_on_a_snapshot_without_a_nic_says_how_to_rebuild() {
    let home = new_home();
    let assets = tiny_assets();
    let o = cmd_in(home.path())
        .env("FORKD_TEST_LAYOUT", "forkd-pc-v1")
        .args([
            "-q",
            "build-tiny",
            "--tag",
            "old",
            "--assets",
            assets.to_str().unwrap(),
            "--mem-mib",
            "192",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = forkd_in(
        home.path(),
        &["fork", "--tag", "old", "--net", "--exec", "true"],
    );
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("without a network card") && err.contains("rebuild"),
        "{err}"
    );
    // The old image still forks without a network.
    ok_in(home.path(), &["fork", "--tag", "old", "--exec", "true"]);
}

#[test]
fn the_guest_clock_is_within_half_a_second_at_ready() {
    tiny();
    let (c, _guard) = keep_net(home(), &["--net"]);
    let id = c["id"].as_str().unwrap();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let before = now();
    let out = sh(home(), id, "adjtimex | grep 'time\\.'");
    let after = now();
    let field = |name: &str| -> f64 {
        out.lines()
            .find(|l| l.contains(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or_else(|| panic!("no {name} in {out}"))
    };
    let guest = field("tv_sec") + field("tv_usec") / 1e6;
    assert!(
        guest > before - 0.5 && guest < after + 0.5,
        "guest clock {guest:.3} vs host {before:.3}..{after:.3}"
    );
}

#[test]
fn a_flooding_child_gets_only_its_own_bandwidth() {
    tiny();
    // The sink counts bytes and time; the child's rate is 4 Mbit/s (500 kB/s).
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_port = sink.local_addr().unwrap().port();
    let measured = std::thread::spawn(move || {
        let (mut s, _) = sink.accept().unwrap();
        let start = Instant::now();
        let mut n = 0usize;
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        (n, start.elapsed())
    });
    let service = HostServer::start("still-answering");
    let during = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        let t = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", service.port)).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        (body, t.elapsed())
    });
    let (out, _, _) = fork_net(
        home(),
        &["--allow", &format!("host:{sink_port}"), "--net-rate", "4"],
        &format!(
            "dd if=/dev/zero bs=64k count=32 2>/dev/null | nc 10.0.2.2 {sink_port}; echo sent"
        ),
    );
    assert!(out.contains("sent"), "{out}");
    let (bytes, took) = measured.join().unwrap();
    assert!(bytes >= 1 << 20, "only {bytes} bytes arrived");
    let rate = bytes as f64 / took.as_secs_f64();
    assert!(
        rate < 700_000.0,
        "{bytes} bytes in {took:?}: {rate:.0} B/s is over the 500 kB/s cap"
    );
    let (body, answer) = during.join().unwrap();
    assert!(body.contains("still-answering"));
    assert!(
        answer < Duration::from_secs(1),
        "the host's service took {answer:?} during the flood"
    );
}

#[test]
fn no_tcp_connection_of_the_source_survives_into_a_branchs_child() {
    tiny();
    // A host server that accepts and holds every connection.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    let allow = format!("host:{port}");
    let (a, _guard) = keep_net(home(), &["--allow", &allow]);
    let id = a["id"].as_str().unwrap().to_string();
    // 10.0.2.2:PORT as /proc/net/tcp writes it (little-endian address, hex port).
    let remote = format!("0202000A:{port:04X}");
    let held = sh(
        home(),
        &id,
        &format!(
            "setsid sh -c 'sleep 1000 | nc 10.0.2.2 {port} >/dev/null 2>&1' </dev/null >/dev/null 2>&1 & \
             sleep 1; cat /proc/net/tcp"
        ),
    );
    assert!(
        held.lines()
            .any(|l| l.contains(&remote) && l.split_whitespace().nth(3) == Some("01")),
        "the source holds no established connection: {held}"
    );
    ok(&["snapshot", "--from", &id, "--tag", "net-held"]);
    let (out, _, _) = fork_net_tag(
        home(),
        "net-held",
        &["--allow", &allow],
        "sleep 0.5; cat /proc/net/tcp; pidof nc || echo no-nc",
    );
    assert!(!out.contains(&remote), "the connection survived: {out}");
    assert!(out.contains("no-nc"), "its owner did not see it end: {out}");
    // Forked without a network, the branch's child has its inherited link taken down.
    let (out, _, _) = fork_net_tag(home(), "net-held", &[], "ping -c1 -W1 10.0.2.2 2>&1; true");
    assert!(out.contains("unreachable"), "{out}");
    // The source keeps its own connection.
    let still = sh(home(), &id, "cat /proc/net/tcp");
    assert!(still.contains(&remote), "{still}");
    ok(&["rmi", "net-held"]);
}
