//! Options shared by every command, and the context built from them.

use anyhow::Context as _;
use forkd_store::{Home, Store};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Local store directory [default: $XDG_DATA_HOME/forkd, i.e. ~/.local/share/forkd]
    #[arg(long, global = true, env = "FORKD_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Hide progress bars and informational output
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// More log output (-v: debug, -vv: trace); RUST_LOG overrides
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// What every command gets: where the store is and how to talk to the user.
#[derive(Debug)]
pub struct Ctx {
    pub home: Option<PathBuf>,
    pub quiet: bool,
}

impl Ctx {
    pub fn new(args: GlobalArgs) -> Self {
        Self {
            home: args.home,
            quiet: args.quiet,
        }
    }

    /// Open the local store (`--home`, else `$FORKD_HOME`, else the XDG default), telling the
    /// user when another forkd holds its lock.
    pub fn store(&self) -> anyhow::Result<Store> {
        let store = match &self.home {
            Some(h) => Store::open(h),
            None => Store::open_default(),
        }
        .context("cannot open the local store")?;
        Ok(store.with_lock_notice(|p| {
            eprintln!(
                "waiting for lock on {} (held by another forkd process)...",
                p.display()
            )
        }))
    }

    /// The forkd home (`--home`, else `$FORKD_HOME`, else the XDG default), without opening
    /// the store in it.
    pub fn home_dir(&self) -> anyhow::Result<Home> {
        match &self.home {
            Some(h) => Ok(Home::new(h)),
            None => Ok(Home::from_env()?),
        }
    }

    /// Whether progress bars may be drawn: never with --quiet or when stderr is not a terminal.
    pub fn show_progress(&self) -> bool {
        use std::io::IsTerminal;
        !self.quiet && std::io::stderr().is_terminal()
    }
}
