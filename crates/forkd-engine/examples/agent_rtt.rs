//! The agent's own round trip, for bench/api.sh: `agent_rtt SOCK N` runs `true` N times over
//! one direct connection to a kept child's agent socket and prints `{"p50_ms": …}`.

use forkd_agent::ExecRequest;
use forkd_engine::mux::AgentClient;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(sock), Some(n)) = (
        args.get(1),
        args.get(2).and_then(|n| n.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: agent_rtt AGENT_SOCK N");
        std::process::exit(2);
    };
    let c = AgentClient::connect(std::path::Path::new(sock)).unwrap_or_else(|e| {
        eprintln!("cannot connect to {sock}: {e}");
        std::process::exit(1)
    });
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = c
            .exec(ExecRequest {
                argv: Some(vec!["true".into()]),
                ..Default::default()
            })
            .unwrap_or_else(|e| {
                eprintln!("exec failed: {e}");
                std::process::exit(1)
            });
        assert_eq!(r.exit_code, Some(0));
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    println!("{{\"p50_ms\": {:.3}, \"n\": {n}}}", ms[n / 2]);
}
