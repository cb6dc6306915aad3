//! The forkd guest agent protocol (shared by the agent binary and the host engine).
//!
//! Wire format (version [`PROTOCOL_VERSION`]): newline-delimited JSON. Every request is one line
//! holding a JSON object [`Request`]; the agent answers each with one line holding a
//! [`Response`] carrying the same `id`. See docs/AGENT-PROTOCOL.md.

pub mod proto;

pub use proto::*;
