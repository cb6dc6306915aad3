//! Finding QEMU, checking its version, and choosing the accelerator.

use crate::error::{EngineError, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The oldest QEMU forkd drives: the pinned machine type below first appeared in 7.2.
pub const MIN_VERSION: (u32, u32, u32) = (7, 2, 0);
/// Pinned, versioned machine type: snapshots restore on this and every later QEMU.
pub const MACHINE_TYPE: &str = "pc-i440fx-7.2";
/// Named CPU model (not `host`/`max`), so vCPU state is portable between hosts.
pub const CPU_MODEL: &str = "qemu64";
/// Environment variable naming the QEMU binary to use.
pub const QEMU_ENV: &str = "FORKD_QEMU";

#[derive(Debug, Clone)]
pub struct Qemu {
    pub bin: PathBuf,
    pub version: (u32, u32, u32),
    /// `-machine help`, once asked (shared by clones): [`Qemu::machines`].
    machines: std::sync::Arc<std::sync::OnceLock<String>>,
}

impl Qemu {
    /// `qemu-img` next to this QEMU, else the one on PATH.
    pub fn img_path(&self) -> std::path::PathBuf {
        let sibling = self.bin.with_file_name("qemu-img");
        if sibling.is_file() {
            sibling
        } else {
            std::path::PathBuf::from("qemu-img")
        }
    }

    pub fn version_string(&self) -> String {
        let (a, b, c) = self.version;
        format!("{a}.{b}.{c}")
    }

    /// Find and check QEMU: `explicit`, else `$FORKD_QEMU`, else `qemu-system-x86_64` on PATH.
    pub fn locate(explicit: Option<&Path>) -> Result<Qemu> {
        let bin = match explicit {
            Some(p) => p.to_path_buf(),
            None => match std::env::var_os(QEMU_ENV) {
                Some(p) if !p.is_empty() => PathBuf::from(p),
                _ => which("qemu-system-x86_64")
                    .ok_or_else(|| EngineError::QemuMissing("qemu-system-x86_64 (PATH)".into()))?,
            },
        };
        if !bin.is_file() {
            return Err(EngineError::QemuMissing(bin));
        }
        let out = Command::new(&bin)
            .arg("--version")
            .output()
            .map_err(|_| EngineError::QemuMissing(bin.clone()))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let version = parse_version(&text).ok_or_else(|| EngineError::QemuVersion {
            path: bin.clone(),
            output: text.lines().next().unwrap_or("").to_string(),
        })?;
        if version < MIN_VERSION {
            let (a, b, c) = version;
            let (x, y, z) = MIN_VERSION;
            return Err(EngineError::QemuTooOld {
                path: bin,
                found: format!("{a}.{b}.{c}"),
                need: format!("{x}.{y}.{z}"),
            });
        }
        Ok(Qemu {
            bin,
            version,
            machines: Default::default(),
        })
    }

    /// What `-machine help` lists. QEMU is asked once per `Qemu` (a QEMU start, about 100 ms
    /// under TCG) and the answer is shared by its clones, so a caller that will need it can ask
    /// early, on another thread, with a clone.
    pub fn machines(&self) -> Result<&str> {
        if let Some(t) = self.machines.get() {
            return Ok(t);
        }
        let out = Command::new(&self.bin)
            .args(["-machine", "help"])
            .output()
            .map_err(|_| EngineError::QemuMissing(self.bin.clone()))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(self.machines.get_or_init(|| text))
    }

    /// Whether this QEMU knows `machine` (e.g. a snapshot's pinned machine type).
    pub fn has_machine(&self, machine: &str) -> Result<bool> {
        let text = self.machines()?;
        Ok(text
            .lines()
            .any(|l| l.split_whitespace().next() == Some(machine)))
    }
}

/// "QEMU emulator version 7.2.22 (Debian ...)" → (7, 2, 22).
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let rest = text.split("version").nth(1)?.trim_start();
    let word = rest
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?;
    let mut it = word.split('.').map(|p| p.parse::<u32>().ok());
    let a = it.next()??;
    let b = it.next().flatten().unwrap_or(0);
    let c = it.next().flatten().unwrap_or(0);
    Some((a, b, c))
}

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            _ => Err(format!("accelerator must be kvm, tcg or auto, not {s:?}")),
        }
    }
}

/// What will actually run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Hardware virtualisation usable: the CPU has vmx/svm and /dev/kvm opens read-write.
/// (A paravirtual KVM such as PVM has /dev/kvm but no vmx/svm, and cannot boot normal guests.)
pub fn kvm_status() -> std::result::Result<(), String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw {
        return Err("the CPU shows no vmx/svm flag (no hardware virtualisation)".into());
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm: {e}"))
}

pub fn resolve_accel(choice: AccelChoice) -> Result<Accel> {
    match choice {
        AccelChoice::Tcg => Ok(Accel::Tcg),
        AccelChoice::Kvm => kvm_status().map(|_| Accel::Kvm).map_err(EngineError::NoKvm),
        AccelChoice::Auto => Ok(if kvm_status().is_ok() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn versions() {
        assert_eq!(
            parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)\n"),
            Some((7, 2, 22))
        );
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2\n"),
            Some((10, 0, 2))
        );
        assert_eq!(
            parse_version("QEMU emulator version 6.2\n"),
            Some((6, 2, 0))
        );
        assert_eq!(parse_version("nonsense"), None);
    }
    #[test]
    fn accel_parse() {
        assert_eq!("kvm".parse::<AccelChoice>().unwrap(), AccelChoice::Kvm);
        assert!("xen".parse::<AccelChoice>().is_err());
    }
}
