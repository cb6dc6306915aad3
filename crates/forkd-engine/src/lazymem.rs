//! Children whose memory file is served lazily (a FUSE mount: `forkd fork --tag OWNER/NAME`
//! and the recording mount of `forkd build`) must fault it in page by page, not 4 MiB at a
//! time.
//!
//! Why: QEMU marks all guest RAM `MADV_HUGEPAGE` (physmem.c, unconditionally). For a file
//! mapping so marked, the kernel answers a page fault by reading the aligned 4 MiB around it
//! (twice the huge page size), whatever the file system's read-ahead. Measured on python-numpy
//! (bench/lazy.sh, the recording of `forkd build`): the child's reads of memory.bin were 110 reads
//! of 1 MiB in aligned groups of four, 111 MiB in all, for 35 MiB of pages the child actually
//! mapped. Every byte of those windows has to come over the link before the guest goes on.
//! `PR_SET_THP_DISABLE` does not stop it (the `madvise` still marks the mapping), and neither does
//! the FUSE read-ahead setting. So such a QEMU gets a seccomp filter, beside its own `-sandbox`,
//! under which `madvise(…, MADV_HUGEPAGE)` does nothing and reports success; faults then read
//! what the mount's read-ahead says. Children of installed images keep huge pages.

use std::path::Path;

/// `MADV_HUGEPAGE` (asm-generic/mman-common.h).
const MADV_HUGEPAGE: u64 = 14;
/// `FUSE_SUPER_MAGIC` (linux/magic.h).
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Whether `path` is on a FUSE file system (a lazy or recording mount).
pub fn on_fuse(path: &Path) -> bool {
    // `f_type` is a C long: i64 here, narrower on other targets.
    #[allow(clippy::unnecessary_cast)]
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type as i64 == FUSE_SUPER_MAGIC)
}

/// The filter: `madvise` with advice `MADV_HUGEPAGE` returns 0 without doing anything; every
/// other system call is left to QEMU's own filter.
pub fn no_hugepage_filter() -> Result<seccompiler::BpfProgram, seccompiler::BackendError> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };
    let rule = SeccompRule::new(vec![SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        MADV_HUGEPAGE,
    )?])?;
    #[cfg(target_arch = "x86_64")]
    let arch = seccompiler::TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    let arch = seccompiler::TargetArch::aarch64;
    let filter = SeccompFilter::new(
        [(libc::SYS_madvise, vec![rule])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(0),
        arch,
    )?;
    filter.try_into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private anonymous mapping of 4 MiB, advised `advice`; its address.
    fn advised(advice: i32) -> (usize, i32) {
        let len = 4 << 20;
        // SAFETY: an anonymous private mapping; it is left mapped for the test's reading.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        // SAFETY: `p` is the mapping just made.
        let rc = unsafe { libc::madvise(p, len, advice) };
        (p as usize, rc)
    }

    /// The `VmFlags` line of the mapping at `addr` in /proc/PID/smaps.
    fn vm_flags(pid: i32, addr: usize) -> String {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
        let start = format!("{addr:x}-");
        let at = smaps.find(&start).expect("the mapping is listed");
        smaps[at..]
            .lines()
            .find(|l| l.starts_with("VmFlags:"))
            .unwrap()
            .to_string()
    }

    #[test]
    fn the_filter_turns_madvise_hugepage_into_a_no_op() {
        // Without the filter, the advice marks the mapping ("hg"): the check below can fail.
        let (mine, rc) = advised(libc::MADV_HUGEPAGE);
        assert_eq!(rc, 0);
        assert!(vm_flags(std::process::id() as i32, mine).contains(" hg"));

        let prog = no_hugepage_filter().unwrap();
        let (mut up, mut down) = ([0i32; 2], [0i32; 2]);
        // SAFETY: two pipes, closed when the test process ends.
        unsafe {
            assert_eq!(libc::pipe(up.as_mut_ptr()), 0);
            assert_eq!(libc::pipe(down.as_mut_ptr()), 0);
        }
        // SAFETY: the forked child makes only system calls (no allocation) and ends with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let ok = seccompiler::apply_filter(&prog).is_ok();
            let (addr, rc) = advised(libc::MADV_HUGEPAGE);
            let msg: [u64; 2] = [addr as u64, u64::from(ok && rc == 0)];
            let mut byte = 0u8;
            // SAFETY: writing a local array and reading one byte, on the pipes made above.
            unsafe {
                libc::write(up[1], msg.as_ptr().cast(), 16);
                libc::read(down[0], (&raw mut byte).cast(), 1);
                libc::_exit(0);
            }
        }
        let mut msg = [0u64; 2];
        // SAFETY: reading into a local array from the pipe made above.
        let n = unsafe { libc::read(up[0], msg.as_mut_ptr().cast(), 16) };
        assert_eq!(n, 16);
        let flags = vm_flags(pid, msg[0] as usize);
        // SAFETY: let the child end, and reap it.
        unsafe {
            libc::write(down[1], b"x".as_ptr().cast(), 1);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        assert_eq!(
            msg[1], 1,
            "the filter did not apply, or madvise did not report success"
        );
        assert!(
            !flags.contains(" hg"),
            "the mapping was still marked: {flags}"
        );
        assert!(!on_fuse(Path::new("/")));
    }
}
