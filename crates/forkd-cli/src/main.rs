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
                  Quick start:\n  forkd pull OWNER/python-numpy\n  forkd fork --tag python-numpy -n 100 --exec 'python3 -c \"print(1)\"'",
    propagate_version = true
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
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            report::print_error(&err);
            ExitCode::FAILURE
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
