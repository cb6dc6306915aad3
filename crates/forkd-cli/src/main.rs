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
    report::init_tracing(cli.global.verbose, cli.global.quiet);
    let ctx = ctx::Ctx::new(cli.global);
    match commands::run(cli.command, &ctx) {
        Ok(()) => ExitCode::from(report::exit::OK),
        Err(err) => {
            report::print_error(&err);
            ExitCode::from(report::exit_code(&err))
        }
    }
}

/// Rust ignores SIGPIPE, so `forkd images list | head -1` would panic on the closed pipe.
/// A command-line tool should die quietly instead, like every other Unix filter.
fn restore_sigpipe() {
    // SAFETY: called first thing in main, before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE and no Rust code relies on SIGPIPE being ignored here.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
