//! Command groups. Each area file exposes `Cmd` (clap subcommands) and `run(cmd, ctx)`.

mod engine;
mod hub;
mod hub_progress;
mod netd;
mod recipe;
mod sandbox;
mod store;
mod vm;

use crate::ctx::Ctx;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Print the forkd version and the store it uses
    #[command(after_help = "Examples:\n  forkd version\n  forkd --home /srv/forkd version")]
    Version,
    #[command(flatten)]
    Store(store::Cmd),
    #[command(flatten)]
    Recipe(recipe::Cmd),
    #[command(flatten)]
    Hub(hub::Cmd),
    #[command(flatten)]
    Engine(engine::Cmd),
    #[command(flatten)]
    Sandbox(sandbox::Cmd),
    /// One child's network back end (started by forkd itself)
    #[command(name = "__netd", hide = true)]
    Netd {
        #[arg(long)]
        config: String,
        /// Drop to this uid (and --gid) before reading anything from the guest
        #[arg(long, requires = "gid")]
        uid: Option<u32>,
        #[arg(long, requires = "uid")]
        gid: Option<u32>,
    },
}

impl Command {
    /// The network back end logs what it refuses (its child's net.log), so it logs at info.
    pub fn is_netd(&self) -> bool {
        matches!(self, Command::Netd { .. })
    }
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
        Command::Store(c) => store::run(c, ctx),
        Command::Recipe(c) => recipe::run(c, ctx),
        Command::Hub(c) => hub::run(c, ctx),
        Command::Engine(c) => engine::run(c, ctx),
        Command::Sandbox(c) => sandbox::run(c, ctx),
        Command::Netd { config, uid, gid } => netd::run(&config, uid.zip(gid)),
    }
}
