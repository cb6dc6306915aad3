//! How engine results are shown: the fork table.

use crate::report::{Lines, escape_controls};
use forkd_engine::fork::ForkReport;

/// One cell of guest text: one line, controls escaped (always, terminal or not: the table is
/// for people; `--json` has the exact bytes).
fn cell(text: &str) -> String {
    escape_controls(text.trim_end(), Lines::Escape).into_owned()
}

pub(super) fn print_report(r: &ForkReport) {
    for c in &r.children {
        let status = match (c.up, c.timed_out, c.ok) {
            (false, _, _) => "FAILED",
            (true, true, _) => "TIMEOUT",
            (true, false, true) => "ok",
            (true, false, false) => "EXIT",
        };
        // The id is what `forkd exec`, `kill`, `cp` and `ps` take (and the child's hostname).
        let mut line = format!("{:<24} {:<7}", c.id, status);
        if let Some(ms) = c.ready_ms {
            line.push_str(&format!(" ready {ms:>5} ms"));
        }
        for p in &c.ports {
            line.push_str(&format!("  127.0.0.1:{}->{}", p.host, p.guest));
        }
        if let Some(x) = &c.exec {
            let code = match (x.exit_code, x.timed_out) {
                (Some(c), _) => c.to_string(),
                (None, true) => "timed-out".into(),
                (None, false) => "killed".into(),
            };
            line.push_str(&format!("  exit {code}  {}", cell(&x.stdout)));
            if !x.stderr.is_empty() {
                line.push_str(&format!("  stderr: {}", cell(&x.stderr)));
            }
        }
        if let Some(x) = &c.run {
            line.push_str(&format!("  run: {}", cell(&x.output)));
        }
        if let Some(e) = &c.error {
            line.push_str(&format!("  error: {}", cell(e)));
        }
        println!("{line}");
    }
    let timed_out = r.children.iter().filter(|c| c.timed_out).count();
    let exited = r
        .children
        .iter()
        .filter(|c| c.up && !c.timed_out && !c.ok)
        .count();
    println!(
        "{}/{} children alive ({}) in {:.2} s{}{}{}",
        r.alive,
        r.requested,
        r.accel,
        r.wall_ms as f64 / 1000.0,
        if timed_out > 0 {
            format!("; {timed_out} timed out")
        } else {
            String::new()
        },
        if exited > 0 {
            format!("; {exited} exited non-zero")
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
