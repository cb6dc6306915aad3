//! Command groups. Each area file exposes `Cmd` (clap subcommands) and `run(cmd, ctx)`.

use crate::ctx::Ctx;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Print the forkd version and the store it uses
    Version,
}

pub fn run(cmd: Command, ctx: &Ctx) -> anyhow::Result<()> {
    match cmd {
        Command::Version => {
            println!("forkd {}", env!("CARGO_PKG_VERSION"));
            if let Some(home) = &ctx.home {
                println!("store: {}", home.display());
            }
            Ok(())
        }
    }
}
