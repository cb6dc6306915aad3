//! The agent reaps orphans (it is PID 1 in the VM; on a host it makes itself a child
//! subreaper, so the orphans of its commands are reparented to it the same way) without
//! stealing the exit status of the commands it runs, and `exec` does not wait for background
//! processes that inherited the command's output.

mod common;

use common::{Agent, sh};
use std::time::{Duration, Instant};

/// (state, ppid) of a process from /proc/<pid>/stat, or None if it no longer exists.
fn stat(pid: u32) -> Option<(char, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (in parentheses) may contain spaces: parse after the last ')'.
    let mut rest = s[s.rfind(')')? + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Zombie children of `parent`, found by scanning /proc.
fn zombies_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| stat(pid) == Some(('Z', parent)))
        .collect()
}

/// Poll until `cond` holds or `max` passes; returns whether it held.
fn eventually(max: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + max;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

#[test]
fn background_process_neither_delays_exec_nor_leaves_a_zombie() {
    let mut a = Agent::start();
    let agent = a.child.id();

    let x = sh(&mut a, "sleep 0.2 & echo hi");
    assert_eq!((x.exit_code, x.stdout.as_str()), (Some(0), "hi\n"), "{x:?}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(zombies_of(agent), Vec::<u32>::new(), "zombies left behind");

    // A longer-lived orphan holding stdout open: exec returns long before it exits, the
    // orphan is reparented to the agent, and once it exits it is reaped (gone from /proc).
    let x = sh(&mut a, "sleep 3 & echo $!");
    assert_eq!(x.exit_code, Some(0), "{x:?}");
    assert!(
        x.duration_ms < 2000,
        "exec waited for its background process: {x:?}"
    );
    let orphan: u32 = x
        .stdout
        .trim()
        .parse()
        .expect("pid of the background sleep");
    assert_eq!(
        stat(orphan).map(|s| s.1),
        Some(agent),
        "the orphan was not reparented to the agent (PR_SET_CHILD_SUBREAPER)"
    );
    assert!(
        eventually(Duration::from_secs(10), || stat(orphan).is_none()),
        "orphan {orphan} not reaped: {:?}",
        stat(orphan)
    );
    assert_eq!(zombies_of(agent), Vec::<u32>::new());

    // The agent blocks SIGCHLD for its reaper; its commands must not inherit that mask.
    let x = sh(&mut a, "grep SigBlk /proc/self/status");
    assert_eq!(x.stdout.trim(), "SigBlk:\t0000000000000000", "{x:?}");

    // The command's own output written just before it exits is all there.
    let x = sh(&mut a, "sleep 2 & seq 1 20000");
    assert_eq!(x.stdout.lines().count(), 20000, "output cut short");
    assert_eq!(x.stdout.lines().last(), Some("20000"));
}

#[test]
fn exit_codes_stay_right_under_a_stream_of_orphans() {
    let mut a = Agent::start();
    let agent = a.child.id();
    // A generator that keeps producing short-lived orphans (double fork: the subshell exits at
    // once, so each `sh -c 'exit 9'` is reparented to the agent) while we run commands.
    let x = sh(
        &mut a,
        "(i=0; while [ $i -lt 300 ]; do (sh -c 'exit 9' &); i=$((i+1)); sleep 0.005; done) \
         >/dev/null 2>&1 & echo started",
    );
    assert_eq!((x.exit_code, x.stdout.as_str()), (Some(0), "started\n"));
    for k in 0..40 {
        let code = (k * 37) % 256;
        let x = sh(&mut a, &format!("echo {k}; exit {code}"));
        assert_eq!(
            (x.exit_code, x.stdout.trim(), x.timed_out),
            (Some(code), k.to_string().as_str(), false),
            "{x:?}"
        );
    }
    let x = sh(&mut a, "kill -9 $$");
    assert_eq!((x.exit_code, x.signal), (None, Some(9)), "{x:?}");
    // Once the generator is done, every orphan it made has been reaped.
    assert!(
        eventually(Duration::from_secs(30), || zombies_of(agent).is_empty()
            && !std::fs::read_to_string(format!(
                "/proc/{agent}/task/{agent}/children"
            ))
            .unwrap_or_default()
            .split_whitespace()
            .any(|_| true)),
        "zombies of the agent: {:?}",
        zombies_of(agent)
    );
}
