//! The QEMU fork engine.
