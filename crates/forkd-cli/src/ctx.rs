//! Options shared by every command, and the context built from them.

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

    /// Whether progress bars may be drawn: never with --quiet or when stderr is not a terminal.
    #[allow(dead_code)]
    pub fn show_progress(&self) -> bool {
        use std::io::IsTerminal;
        !self.quiet && std::io::stderr().is_terminal()
    }
}
