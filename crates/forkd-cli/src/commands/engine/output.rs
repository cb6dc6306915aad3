//! How engine results are shown: the fork table and `forkd ps`.

use forkd_engine::fork::ForkReport;

pub(super) fn print_report(r: &ForkReport) {
    for c in &r.children {
        let status = match (c.ok, c.timed_out) {
            (true, true) => "TIMEOUT",
            (true, false) => "ok",
            (false, _) => "FAILED",
        };
        let mut line = format!("{:<20} {:<6}", c.hostname, status);
        if let Some(ms) = c.ready_ms {
            line.push_str(&format!(" ready {ms:>5} ms"));
        }
        if let Some(x) = &c.exec {
            let code = match (x.exit_code, x.timed_out) {
                (Some(c), _) => c.to_string(),
                (None, true) => "timed-out".into(),
                (None, false) => "killed".into(),
            };
            line.push_str(&format!(
                "  exit {code}  {}",
                x.stdout.trim_end().replace('\n', "\\n")
            ));
            if !x.stderr.is_empty() {
                line.push_str(&format!(
                    "  stderr: {}",
                    x.stderr.trim_end().replace('\n', "\\n")
                ));
            }
        }
        if let Some(x) = &c.run {
            line.push_str(&format!(
                "  run: {}",
                x.output.trim_end().replace('\n', "\\n")
            ));
        }
        if let Some(e) = &c.error {
            line.push_str(&format!("  error: {e}"));
        }
        println!("{line}");
    }
    let timed_out = r.children.iter().filter(|c| c.timed_out).count();
    println!(
        "{}/{} children alive ({}) in {:.2} s{}{}",
        r.alive,
        r.requested,
        r.accel,
        r.wall_ms as f64 / 1000.0,
        if timed_out > 0 {
            format!("; {timed_out} timed out")
        } else {
            String::new()
        },
        if r.kept.is_empty() {
            String::new()
        } else {
            format!("; kept {} (forkd ps)", r.kept.len())
        }
    );
}
