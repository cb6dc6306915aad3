//! The options every command that starts VMs takes.

use forkd_engine::qemu::AccelChoice;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct VmArgs {
    /// Accelerator: kvm, tcg, or auto (kvm when the CPU has vmx/svm and /dev/kvm opens)
    #[arg(long, default_value = "auto", env = "FORKD_ACCEL")]
    pub accel: AccelChoice,
    /// QEMU binary [default: $FORKD_QEMU, else qemu-system-x86_64 on PATH]
    #[arg(long, value_name = "FILE")]
    pub qemu: Option<PathBuf>,
}
