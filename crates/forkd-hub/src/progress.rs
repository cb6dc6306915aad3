//! How pull and push report progress. The CLI implements [`Progress`] with bars; the library
//! never draws anything itself.

pub trait Progress: Send + Sync {
    /// A line of information for the user (waiting for a lock, skipping cached data, ...).
    fn message(&self, msg: &str);
    /// A byte-counted phase begins.
    fn start(&self, phase: &str, total_bytes: u64);
    fn advance(&self, bytes: u64);
    fn finish(&self);
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn message(&self, _: &str) {}
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}
