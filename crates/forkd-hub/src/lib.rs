//! The Snapshot Hub.
