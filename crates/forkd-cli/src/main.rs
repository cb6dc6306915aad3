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
