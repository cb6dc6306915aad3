//! `engine.json`: the machine a snapshot needs, and the QEMU command line that builds it.
//!
//! A snapshot restores only into a machine with the same devices in the same places. The
//! device layout is named (`forkd-pc-v2`, or the older `forkd-pc-v1` without a NIC) and fixed in
//! code below; `engine.json` records that
//! name plus the machine type, CPU model, RAM, vCPUs, kernel command line and file names. See
//! docs/ENGINE.md.

use crate::error::{EngineError, IoCtx, Result};
use crate::qemu::Accel;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const SPEC_FILE: &str = "engine.json";
pub const SPEC_FORMAT: u32 = 1;
/// The engine format of a branch (a snapshot of a running child, see [`SpecParent`]).
pub const BRANCH_SPEC_FORMAT: u32 = 2;
/// The layout new snapshots get: v1 plus a virtio NIC with no back end
/// ([`NIC_DEVICE`]). A child is given a back end only when it asks for a network, so the NIC
/// costs a child without one nothing but an idle PCI device.
pub const LAYOUT: &str = "forkd-pc-v2";
/// The first layout (no NIC). Its snapshots still fork; `--net` on them is refused with a
/// hint to rebuild.
pub const LAYOUT_V1: &str = "forkd-pc-v1";
/// Environment hook for tests: `FORKD_TEST_LAYOUT=forkd-pc-v1` makes `snapshot` build the old
/// layout (no NIC), as an earlier forkd did, so the refusal of `--net` on it can be tested.
pub const TEST_LAYOUT_ENV: &str = "FORKD_TEST_LAYOUT";
/// The NIC of layout v2. One fixed MAC: every child is alone on its own link, so identical
/// addresses never meet. `romfile=` keeps the PXE option ROM (a RAM block the migration
/// stream would carry) out of the machine.
pub const NIC_DEVICE: &str = "virtio-net-pci,id=nic0,addr=0x5,mac=52:54:00:12:34:56,romfile=";

pub const KERNEL_FILE: &str = "vmlinuz";
pub const INITRD_FILE: &str = "initrd.img";
pub const ROOTFS_FILE: &str = "rootfs.ext4";
pub const MEMORY_FILE: &str = "memory.bin";
pub const VMSTATE_FILE: &str = "vmstate";

/// Largest guest RAM a snapshot may declare: the store's ceiling for one file (1 TiB).
pub const MAX_MEM_MIB: u64 = forkd_store::manifest::MAX_TOTAL_SIZE >> 20;
/// Largest engine.json read (it is a few hundred bytes).
pub const MAX_SPEC_BYTES: u64 = 64 << 10;

/// A machine type or CPU model as QEMU lists them: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`. Nothing
/// else may reach `-machine`/`-cpu` (a `,` would add properties such as `,+vmx` or
/// `,memory-backend=`).
pub fn is_plain_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
}

/// [`check_image_dir`] in the shape of the store's unpack check (`UnpackOptions::check`).
pub fn check_staged(dir: &Path, manifest: &forkd_store::Manifest) -> Result<(), String> {
    check_image_dir(dir, manifest)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Check the `engine.json` of an image directory against the image's manifest, when the
/// manifest lists one (images made by other tools may not have it): what the store installs
/// is what a later `fork` will believe.
pub fn check_image_dir(dir: &Path, manifest: &forkd_store::Manifest) -> Result<Option<VmSpec>> {
    if !manifest.files.contains_key(SPEC_FILE) {
        return Ok(None);
    }
    let spec = VmSpec::load(dir)?;
    spec.check_against(manifest)?;
    Ok(Some(spec))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmSpec {
    pub format: u32,
    /// Device layout name: [`LAYOUT`] or [`LAYOUT_V1`].
    pub layout: String,
    /// QEMU version that took the snapshot.
    pub qemu_version: String,
    pub machine: String,
    pub cpu: String,
    pub mem_mib: u64,
    pub vcpus: u32,
    /// Accelerator the parent ran under (children may use another).
    pub accel: String,
    pub cmdline: String,
    pub kernel: String,
    #[serde(default)]
    pub initrd: Option<String>,
    pub rootfs: String,
    pub memory: String,
    pub vmstate: String,
    /// Whether the parent started a warm worker (children can `run` code in it).
    #[serde(default)]
    pub warm: bool,
    /// Set in a branch (format 2) only: the image it was made from. Then `memory` holds only
    /// the pages listed in `parent.pages`, `rootfs` is a qcow2 of the changes over the parent's
    /// disk, `vmstate` holds device state only, and `kernel` is the root image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<SpecParent>,
}

/// What a branch adds to `engine.json`: see docs/ENGINE.md, "Branches".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpecParent {
    /// The parent's manifest digest (`forkd_store::Manifest::digest`).
    pub digest: String,
    /// The page bitmap: bit `i` (byte `i / 8`, bit `i % 8`) set when guest page `i` (4 KiB)
    /// is the branch's own, in `memory`; the other pages are the parent's.
    pub pages: String,
}

impl VmSpec {
    /// Whether the layout has a NIC (a child can then be given a network).
    pub fn has_nic(&self) -> bool {
        self.layout != LAYOUT_V1
    }

    /// Guest RAM in bytes; an error when `mem_mib` is out of range (checked arithmetic).
    pub fn mem_bytes(&self) -> Result<u64> {
        if self.mem_mib == 0 || self.mem_mib > MAX_MEM_MIB {
            return Err(EngineError::Corrupt(format!(
                "engine.json: mem_mib = {} is out of range (1 to {MAX_MEM_MIB})",
                self.mem_mib
            )));
        }
        self.mem_mib
            .checked_mul(1 << 20)
            .ok_or_else(|| EngineError::Corrupt("engine.json: mem_mib overflows".into()))
    }

    /// Read and check `DIR/engine.json`.
    pub fn load(dir: &Path) -> Result<VmSpec> {
        use std::io::Read;
        let p = dir.join(SPEC_FILE);
        let file = match forkd_store::open_nofollow(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(EngineError::MissingFile(p));
            }
            Err(e) => return Err(e).at("cannot open", &p),
        };
        let mut text = String::new();
        file.take(MAX_SPEC_BYTES + 1)
            .read_to_string(&mut text)
            .at("cannot read", &p)?;
        if text.len() as u64 > MAX_SPEC_BYTES {
            return Err(EngineError::Corrupt(format!(
                "{}: larger than {MAX_SPEC_BYTES} bytes",
                p.display()
            )));
        }
        Self::parse(&text).map_err(|e| EngineError::Corrupt(format!("{}: {e}", p.display())))
    }

    /// Parse and check untrusted `engine.json` text; the error says which field is wrong.
    pub fn parse(text: &str) -> Result<VmSpec, String> {
        let spec: VmSpec = serde_json::from_str(text).map_err(|e| e.to_string())?;
        match (spec.format, &spec.parent) {
            (SPEC_FORMAT, None) => {}
            (BRANCH_SPEC_FORMAT, Some(p)) => {
                if !forkd_store::manifest::is_digest(&p.digest) {
                    return Err(format!(
                        "parent digest {:?} is not sha256:<64 hex>",
                        p.digest
                    ));
                }
                if !forkd_store::manifest::valid_file_name(&p.pages) || p.pages == SPEC_FILE {
                    return Err(format!("bad file name {:?}", p.pages));
                }
            }
            (SPEC_FORMAT | BRANCH_SPEC_FORMAT, _) => {
                return Err(format!(
                    "engine format {} {} a parent",
                    spec.format,
                    if spec.parent.is_some() {
                        "cannot have"
                    } else {
                        "needs"
                    }
                ));
            }
            (f, _) => {
                return Err(format!(
                    "engine format {f} is not supported (this forkd reads {SPEC_FORMAT} and {BRANCH_SPEC_FORMAT})"
                ));
            }
        }
        if spec.layout != LAYOUT && spec.layout != LAYOUT_V1 {
            return Err(format!(
                "device layout {:?} is unknown (this forkd knows {LAYOUT:?} and {LAYOUT_V1:?})",
                spec.layout
            ));
        }
        if spec.mem_mib == 0 || spec.mem_mib > MAX_MEM_MIB {
            return Err(format!(
                "mem_mib = {} is out of range (1 to {MAX_MEM_MIB})",
                spec.mem_mib
            ));
        }
        if spec.vcpus == 0 || spec.vcpus > 64 {
            return Err(format!("vcpus = {} is out of range (1 to 64)", spec.vcpus));
        }
        for (field, v) in [("machine", &spec.machine), ("cpu", &spec.cpu)] {
            if !is_plain_name(v) {
                return Err(format!(
                    "{field} {v:?} is not a plain QEMU model name ([A-Za-z0-9][A-Za-z0-9._-]*, no ',property=')"
                ));
            }
        }
        if !is_plain_name(&spec.qemu_version) || !matches!(spec.accel.as_str(), "kvm" | "tcg") {
            return Err(format!(
                "qemu_version {:?} or accel {:?} is not valid",
                spec.qemu_version, spec.accel
            ));
        }
        if spec.parent.is_some() && spec.initrd.is_some() {
            return Err("a branch has no initrd of its own".into());
        }
        for f in [&spec.kernel, &spec.rootfs, &spec.memory, &spec.vmstate]
            .into_iter()
            .chain(spec.initrd.as_ref())
        {
            if !forkd_store::manifest::valid_file_name(f) || f == SPEC_FILE {
                return Err(format!("bad file name {f:?}"));
            }
        }
        Ok(spec)
    }

    /// The spec must describe the machine the manifest names: the same RAM, machine type and
    /// CPU model, and every file it names listed, the memory file exactly `mem_mib` MiB.
    pub fn check_against(&self, m: &forkd_store::Manifest) -> Result<()> {
        let bad = |msg: String| Err(EngineError::Corrupt(format!("engine.json: {msg}")));
        if self.mem_mib != m.memory_mib {
            return bad(format!(
                "mem_mib = {} but the manifest says memory_mib = {}",
                self.mem_mib, m.memory_mib
            ));
        }
        if self.machine != m.engine.machine_type || self.cpu != m.engine.cpu_model {
            return bad(format!(
                "machine {} / cpu {} but the manifest says {} / {}",
                self.machine, self.cpu, m.engine.machine_type, m.engine.cpu_model
            ));
        }
        for f in self.own_files() {
            if !m.files.contains_key(f) {
                return bad(format!("it names {f}, which the manifest does not list"));
            }
        }
        let digest = self.parent.as_ref().map(|p| p.digest.as_str());
        if m.parent_digest.as_deref() != digest {
            return bad(format!(
                "its parent is {} but the manifest's is {}",
                digest.unwrap_or("none"),
                m.parent_digest.as_deref().unwrap_or("none")
            ));
        }
        let mem = m.files[&self.memory].size;
        if mem != self.mem_bytes()? {
            return bad(format!(
                "{} is {mem} bytes but the machine has {} MiB of RAM",
                self.memory, self.mem_mib
            ));
        }
        Ok(())
    }

    /// The files this image holds itself: a branch uses its root's kernel.
    pub fn own_files(&self) -> Vec<&String> {
        let mut v = vec![&self.rootfs, &self.memory, &self.vmstate];
        match &self.parent {
            Some(p) => v.push(&p.pages),
            None => v.push(&self.kernel),
        }
        v.extend(self.initrd.as_ref());
        v
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let p = dir.join(SPEC_FILE);
        let text =
            serde_json::to_string_pretty(self).map_err(|e| EngineError::Corrupt(e.to_string()))?;
        std::fs::write(&p, text + "\n").at("cannot write", &p)
    }
}

/// TCG translation cache size in MiB. Children run little code, and every page of the cache
/// they touch is private memory (PSS); the parent boots a whole kernel and gets more.
/// `FORKD_TCG_TB_MIB` overrides the children's size.
pub fn tcg_tb_mib(parent: bool) -> u32 {
    if parent {
        return 64;
    }
    std::env::var("FORKD_TCG_TB_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

/// Parent (booting, writes its disk and shares its RAM file) or child (restoring, private RAM,
/// throwaway disk overlay).
#[derive(Debug, Clone)]
pub enum Role {
    Parent { console: PathBuf },
    Child,
}

/// Everything needed to build one QEMU command line.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    pub spec: &'a VmSpec,
    /// Directory holding kernel, initrd, rootfs, memory.bin, vmstate.
    pub dir: &'a Path,
    pub accel: Accel,
    pub qmp_sock: &'a Path,
    pub agent_sock: &'a Path,
    pub role: Role,
    /// Override of the memory file (tests break one child with it).
    pub memory_override: Option<PathBuf>,
    /// Kernel file to pass instead of the snapshot's (children get a small stub: see
    /// [`write_stub_kernel`]).
    pub kernel_override: Option<PathBuf>,
    /// How a child's QEMU is confined (`None`: not at all; parents are never confined).
    pub confine: Option<&'a crate::confine::Confine>,
    /// A branch's chain, resolved in the store (`None` for an image without a parent).
    pub layers: Option<&'a crate::branch::Layers>,
    /// The child's network link: a descriptor QEMU inherits (a connected stream socket to its
    /// network back end, see forkd-net). Only for a layout with a NIC.
    pub net_fd: Option<std::os::fd::RawFd>,
}

/// Children never run the boot path, but QEMU only creates the same option-ROM RAM block
/// (linuxboot) when given `-kernel`, and it reads the whole kernel into its own memory. A stub
/// holding just the bzImage boot header and setup sectors keeps the machine identical and
/// saves each child the kernel's size in private memory. The initrd is left out for the same
/// reason (it only lives in fw_cfg, which the restored guest never reads again).
pub fn write_stub_kernel(kernel: &Path, out: &Path) -> Result<()> {
    use std::io::Read;
    let mut head = vec![0u8; 64 * 1024];
    let mut f = std::fs::File::open(kernel).at("cannot open", kernel)?;
    let mut n = 0;
    while n < head.len() {
        let r = f.read(&mut head[n..]).at("cannot read", kernel)?;
        if r == 0 {
            break;
        }
        n += r;
    }
    head.truncate(n);
    let is_bzimage = n > 0x206 && &head[0x202..0x206] == b"HdrS";
    let len = if is_bzimage {
        let sects = match head[0x1f1] {
            0 => 4,
            s => s as usize,
        };
        ((sects + 1) * 512 + 4096).min(n)
    } else {
        // Not a bzImage (e.g. an ELF kernel): use it whole.
        return std::fs::copy(kernel, out)
            .map(|_| ())
            .at("cannot copy", kernel);
    };
    Ok(forkd_store::write_private(out, &head[..len])?)
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// QEMU option values separate with commas; a literal comma is doubled.
fn opt(p: &Path) -> String {
    s(p).replace(',', ",,")
}

impl Launch<'_> {
    pub fn args(&self) -> Vec<String> {
        let spec = self.spec;
        let parent = matches!(self.role, Role::Parent { .. });
        let mem = self
            .memory_override
            .clone()
            .or_else(|| self.layers.map(|l| l.memory.clone()))
            .unwrap_or_else(|| self.dir.join(&spec.memory));
        let accel = match self.accel {
            Accel::Kvm => "kvm".to_string(),
            // A small translation cache: children run little code, and its pages count as PSS.
            Accel::Tcg => format!("tcg,tb-size={}", tcg_tb_mib(parent)),
        };
        let mut a: Vec<String> = vec![
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-machine".into(),
            format!("{},memory-backend=mem,smm=off,vmport=off", spec.machine),
            "-accel".into(),
            accel,
            "-cpu".into(),
            spec.cpu.clone(),
            "-smp".into(),
            spec.vcpus.to_string(),
            "-m".into(),
            format!("{}M", spec.mem_mib),
            "-object".into(),
            format!(
                "memory-backend-file,id=mem,size={}M,mem-path={},{}",
                spec.mem_mib,
                opt(&mem),
                if parent {
                    "share=on"
                } else if self.confine.is_some_and(|c| c.readonly_memory) {
                    // QEMU 8.2+: opened read-only, mapped private and writable.
                    "share=off,readonly=on,rom=off"
                } else {
                    "share=off"
                }
            ),
            "-kernel".into(),
            s(&self
                .kernel_override
                .clone()
                .or_else(|| self.layers.map(|l| l.kernel.clone()))
                .unwrap_or_else(|| self.dir.join(&spec.kernel))),
            "-append".into(),
            spec.cmdline.clone(),
        ];
        if let (true, Some(initrd)) = (parent, &spec.initrd) {
            a.extend(["-initrd".into(), s(&self.dir.join(initrd))]);
        }
        match &self.role {
            Role::Parent { console } => {
                a.extend(["-serial".into(), format!("file:{}", s(console))])
            }
            Role::Child => a.extend(["-serial".into(), "null".into()]),
        }
        let rootfs = opt(&self.dir.join(&spec.rootfs));
        let drive = if let Some(l) = self.layers.filter(|_| !parent) {
            // The branch's qcow2 on top, then each parent's, down to the root's raw disk. The
            // chain is given here in full, so no backing file name in a qcow2 header (untrusted
            // input) is ever opened.
            let mut d = format!("if=none,id=root,file={rootfs},format=qcow2");
            let mut prefix = String::new();
            for (i, disk) in l.disks.iter().rev().enumerate() {
                prefix.push_str("backing.");
                let driver = if i + 1 == l.disks.len() {
                    "raw"
                } else {
                    "qcow2"
                };
                d.push_str(&format!(
                    ",{prefix}driver={driver},{prefix}file.filename={}",
                    opt(disk)
                ));
            }
            d + ",cache=unsafe,snapshot=on"
        } else if parent {
            format!("if=none,id=root,file={rootfs},format=raw,cache=writeback,discard=ignore")
        } else {
            // A private, throwaway qcow2 overlay (in $TMPDIR) over the read-only base.
            format!("if=none,id=root,file={rootfs},format=raw,cache=unsafe,snapshot=on")
        };
        a.extend([
            "-drive".into(),
            drive,
            "-device".into(),
            "virtio-serial-pci,id=vser0,addr=0x3".into(),
            "-device".into(),
            "virtio-blk-pci,drive=root,addr=0x4".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                opt(self.agent_sock)
            ),
            "-device".into(),
            format!(
                "virtserialport,bus=vser0.0,chardev=agent,name={}",
                forkd_agent::PORT_NAME
            ),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", opt(self.qmp_sock)),
        ]);
        if spec.has_nic() {
            match self.net_fd.filter(|_| !parent) {
                Some(fd) => a.extend([
                    "-netdev".into(),
                    format!("stream,id=n0,addr.type=fd,addr.str={fd}"),
                    "-device".into(),
                    format!("{NIC_DEVICE},netdev=n0"),
                ]),
                None => a.extend(["-device".into(), NIC_DEVICE.into()]),
            }
        }
        if !parent {
            a.extend(["-incoming".into(), "defer".into()]);
            if spec.parent.is_some() {
                // A branch's vmstate is device state only (QMP xen-save-devices-state), which
                // has no configuration section.
                a.extend(["-global".into(), "migration.send-configuration=off".into()]);
            }
            if let Some(c) = self.confine {
                a.extend(c.args());
            }
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mem_mib: u64, cpu: &str) -> String {
        serde_json::json!({
            "format": 1, "layout": LAYOUT, "qemu_version": "7.2.0", "machine": "pc-i440fx-7.2",
            "cpu": cpu, "mem_mib": mem_mib, "vcpus": 1, "accel": "tcg", "cmdline": "",
            "kernel": "vmlinuz", "rootfs": "rootfs.ext4", "memory": "memory.bin",
            "vmstate": "vmstate"
        })
        .to_string()
    }

    #[test]
    fn untrusted_spec_fields_are_bounded() {
        assert_eq!(
            VmSpec::parse(&spec(256, "qemu64"))
                .unwrap()
                .mem_bytes()
                .unwrap(),
            256 << 20
        );
        assert!(
            VmSpec::parse(&spec(1 << 44, "qemu64"))
                .unwrap_err()
                .contains("out of range")
        );
        for cpu in ["qemu64,+vmx", "qemu64,pmu=on", "", "-help", "a b"] {
            assert!(VmSpec::parse(&spec(256, cpu)).is_err(), "{cpu:?}");
        }
        // A spec built in code is checked too: no overflow for 2^44 MiB.
        let mut s = VmSpec::parse(&spec(256, "qemu64")).unwrap();
        s.mem_mib = 1 << 44;
        assert!(s.mem_bytes().is_err());
        s.mem_mib = u64::MAX;
        assert!(s.mem_bytes().is_err());
    }
}
