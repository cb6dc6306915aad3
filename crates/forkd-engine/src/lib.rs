//! The QEMU fork engine.
//!
//! - [`qemu`]: find `qemu-system-x86_64`, check its version, pick the accelerator.
//! - [`spec`]: `engine.json`, the exact machine a snapshot needs, and the QEMU argv for it.
//! - [`qmp`]: a small synchronous QMP client.
//! - [`agent`]: the host side of the guest agent protocol (types in `forkd-agent`).
//! - [`mux`]: a multiplexing agent client (many concurrent requests on one connection).
//! - [`snapshot`]: boot a parent, warm it, save memory.bin + vmstate + rootfs.
//! - [`image`]: a snapshot taken into the local store, and the check that one is whole.
//! - [`fork`]: restore N copy-on-write children concurrently; [`child`] is one child's life.
//! - [`run`]: children kept running (`--keep`), tracked under `$FORKD_HOME/run/`.
//! - [`confine`]: how a child's QEMU is confined; [`cgroup`]: its cgroup.
//! - [`branch`]: a running child saved as an image of its changes; forking through chains.
//! - [`net`]: a child's network back end process (the policy lives in forkd-net).
//! - [`doctor`]: what this host has and lacks.

pub mod agent;
pub mod branch;
pub mod cgroup;
pub mod child;
pub mod confine;
pub mod doctor;
pub mod error;
pub mod fork;
mod gate;
mod guestmem;
pub mod image;
pub mod lazymem;
mod memory;
pub mod mux;
pub mod net;
pub mod qcow2;
pub mod qemu;
mod qmp;
mod reaper;
pub mod run;
pub mod snapshot;
pub mod spec;
mod util;

pub use error::Capacity;
pub use error::EngineError;
pub use memory::{mem_available_mib, per_child_estimate_mib};
pub use util::{Interrupt, sha256_file};
