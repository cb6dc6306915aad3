//! The guest agent protocol.
