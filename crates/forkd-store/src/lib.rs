//! Snapshot manifest, local store and pack format.
