//! `forkd`: fork many VMs copy-on-write from one warmed parent snapshot, and move snapshots
//! between hosts through the Snapshot Hub.
//!
//! This binary is thin: it parses arguments, calls into the crates, and reports. Each group of
//! commands lives in `commands/<area>.rs` and exposes a clap `Cmd` enum plus `run`.

mod commands;
mod ctx;
mod report;

use clap::Parser;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "forkd",
    version,
    about = "Fork many VMs copy-on-write from one warmed parent snapshot",
    long_about = "Fork many VMs copy-on-write from one warmed parent snapshot, and move \
                  snapshots between hosts through the Snapshot Hub.\n\n\
                  Quick start (after scripts/quickstart.sh, or recipes/tiny/build.sh):\n  \
                  forkd build-tiny\n  \
                  forkd fork --tag tiny -n 10 --exec 'echo hello from $(hostname)'\n\n\
                  Share it through a hub:\n  \
                  forkd key generate && forkd push tiny acme/tiny\n  \
                  forkd pull acme/tiny --hub http://HOST:8080 --trust forkd.pub   # on another host\n\n\
                  Examples:\n  forkd --help\n  forkd fork --help\n  forkd -q images",
    propagate_version = true,
    after_long_help = report::EXIT_CODES_HELP
)]
struct Cli {
    #[command(flatten)]
    global: ctx::GlobalArgs,
    #[command(subcommand)]
    command: commands::Command,
}

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = Cli::parse();
    let verbose = if cli.command.is_netd() {
        cli.global.verbose.max(1)
    } else {
        cli.global.verbose
    };
    report::init_tracing(verbose, cli.global.quiet);
    let ctx = ctx::Ctx::new(cli.global);
    match commands::run(cli.command, &ctx) {
        Ok(()) => ExitCode::from(report::exit::OK),
        Err(err) => {
            report::print_error(&err);
            ExitCode::from(report::exit_code(&err))
        }
    }
}

/// A server (`forkd hub serve`, `forkd serve`) ignores SIGPIPE altogether: a client that goes
/// away mid-response must cost that one connection, never the process. (Before this, a pull
/// cut mid-transfer could kill `forkd hub serve` by SIGPIPE from a vectored socket write, and
/// every later request through the same address failed.)
pub fn ignore_sigpipe() {
    // SAFETY: SIG_IGN is a valid disposition; nothing in forkd relies on dying of SIGPIPE in a
    // server, and std's writes then see EPIPE as an ordinary error.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// Rust ignores SIGPIPE, so `forkd images list | head -1` would panic on the closed pipe. A
/// command-line tool should die quietly instead, like every other Unix filter. But a socket
/// whose peer went away raises SIGPIPE too (a TLS alert written to a plain-http server that
/// already closed), and that must be an error the command reports, not a silent death. So the
/// handler dies of SIGPIPE only when stdout is a pipe whose reader is gone; otherwise it
/// returns and the write fails with EPIPE.
fn restore_sigpipe() {
    extern "C" fn on_sigpipe(_: libc::c_int) {
        let mut out = libc::pollfd {
            fd: libc::STDOUT_FILENO,
            events: 0,
            revents: 0,
        };
        // SAFETY: poll, signal and raise are async-signal-safe; `out` is a valid pollfd that
        // lives for the call. A zero timeout never blocks.
        unsafe {
            if libc::poll(&mut out, 1, 0) == 1 && out.revents & libc::POLLERR != 0 {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
        }
    }
    // SAFETY: called first thing in main, before any other thread exists; the handler only
    // makes async-signal-safe calls and touches no Rust state.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigpipe as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGPIPE, &sa, std::ptr::null_mut());
    }
}
