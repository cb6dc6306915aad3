//! The Snapshot Hub: a static, content-addressed layout of immutable blobs, small tag files and
//! a catalogue (docs/HUB-LAYOUT.md), reachable over `file://`, `http(s)://` and `s3://`.
//! Push chunks and compresses a local snapshot; pull is a pipeline that downloads, verifies,
//! decompresses, writes and hashes concurrently, resumes from a content-addressed cache, and
//! installs atomically through the local store.

pub mod address;
pub mod layout;
pub mod redact;
pub mod reference;
pub mod sign;
pub mod transport;

pub use reference::{Reference, Target};
pub use transport::{HubOptions, Transport, TransportError};

pub mod cache;
pub mod chunks;
pub mod chunkstore;
pub mod compat;
pub mod error;
pub mod fetch;
pub mod gc;
mod hasher;
pub mod lazy;
pub mod progress;
pub mod pull;
pub mod push;
pub mod remote;
pub mod resolve;

pub use error::HubError;
pub use progress::{Progress, Silent};
pub mod serve;
