//! forkd's library API for sandboxes: children forked from an image and then *owned* — kept
//! running, driven (commands, code, files), paused, expired and stopped — by one
//! [`Manager`]. The CLI and the daemon (`forkd serve`) are two front ends over these calls.
//!
//! - [`manager`]: create (fork), find, list, pause/resume, kill, expire, adopt after a crash.
//! - [`sandbox`]: one sandbox: its record, its state machine, its agent connection.
//! - [`network`]: a child's network as requested, and the back end plan made from it.
//! - [`command`]: commands, streamed in the foreground or kept in the background.
//! - [`error`]: [`SandboxError`] and the [`ErrorKind`] front ends map to statuses.

pub mod command;
pub mod error;
pub mod images;
pub mod manager;
pub mod network;
pub mod sandbox;

pub use command::{BackgroundCommand, CommandRequest, CommandStatus, Output, OutputEvent};
pub use error::{ErrorKind, SandboxError};
pub use manager::{CreateOutcome, CreateRequest, Manager, ManagerOptions, Ownership};
pub use network::{ExposeSpec, Network, NetworkError};
pub use sandbox::{Sandbox, SandboxInfo, SandboxState};
