//! File ops: uploads in pieces through a temporary file, reads at offsets, listings, stat,
//! mkdir/remove, error codes (including ENOSPC on a full filesystem).

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::Agent;
use forkd_agent::{ErrorCode, FileKind, MAX_FILE_CHUNK, Op, Reply};
use std::path::Path;

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn pseudo_random(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn open(a: &mut Agent, path: &str, mode: Option<u32>) -> u64 {
    match a.call_code(Op::FileOpenWrite {
        path: path.into(),
        mode,
    }) {
        Ok(Reply::FileHandle { handle }) => handle,
        other => panic!("{other:?}"),
    }
}

fn write(a: &mut Agent, handle: u64, data: &[u8]) -> Result<Reply, (ErrorCode, String)> {
    a.call_code(Op::FileWrite {
        handle,
        data: B64.encode(data),
    })
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn upload_and_download_a_multi_mib_binary_file() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("blob.bin");
    std::fs::write(&target, b"old content").unwrap();
    let data = pseudo_random(5 * MAX_FILE_CHUNK + 12_345);
    let mut a = Agent::start();
    let h = open(&mut a, &s(&target), Some(0o600));
    // Nothing replaces the target before the commit.
    assert_eq!(std::fs::read(&target).unwrap(), b"old content");
    let mut total = 0u64;
    for piece in data.chunks(MAX_FILE_CHUNK) {
        total += piece.len() as u64;
        assert_eq!(
            write(&mut a, h, piece),
            Ok(Reply::FileWritten { size: total })
        );
    }
    let r = a.call_code(Op::FileCloseWrite {
        handle: h,
        commit: true,
    });
    assert_eq!(
        r,
        Ok(Reply::FileClosed {
            path: s(&target),
            size: data.len() as u64
        })
    );
    assert_eq!(std::fs::read(&target).unwrap(), data);
    assert_eq!(names(dir.path()), ["blob.bin"], "a temporary file was left");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&target).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o600);

    // Read it back in pieces.
    let mut back = Vec::new();
    loop {
        let r = a.call_code(Op::FileRead {
            path: s(&target),
            offset: back.len() as u64,
            len: MAX_FILE_CHUNK as u64,
        });
        let Ok(Reply::FileData { data: d, eof, size }) = r else {
            panic!("{r:?}")
        };
        assert_eq!(size, data.len() as u64);
        back.extend(B64.decode(d).unwrap());
        if eof {
            break;
        }
    }
    assert_eq!(back, data);
    // Reads past the end are empty and at eof; over-long reads are refused.
    let r = a.call_code(Op::FileRead {
        path: s(&target),
        offset: data.len() as u64 + 10,
        len: 10,
    });
    assert!(
        matches!(r, Ok(Reply::FileData { ref data, eof: true, .. }) if data.is_empty()),
        "{r:?}"
    );
    let e = a
        .call_code(Op::FileRead {
            path: s(&target),
            offset: 0,
            len: MAX_FILE_CHUNK as u64 + 1,
        })
        .unwrap_err();
    assert_eq!(e.0, ErrorCode::BadRequest);
}

#[test]
fn aborted_and_disconnected_uploads_leave_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let target = s(&dir.path().join("f"));
    let mut a = Agent::start();
    let h = open(&mut a, &target, None);
    write(&mut a, h, b"partial").unwrap();
    assert_eq!(names(dir.path()).len(), 1);
    let r = a.call_code(Op::FileCloseWrite {
        handle: h,
        commit: false,
    });
    assert!(matches!(r, Ok(Reply::FileClosed { size: 7, .. })), "{r:?}");
    assert!(names(dir.path()).is_empty());
    // The handle is gone.
    let e = write(&mut a, h, b"more").unwrap_err();
    assert_eq!(e.0, ErrorCode::NotFound);
    // Too big a piece is refused.
    let h = open(&mut a, &target, None);
    let e = write(&mut a, h, &vec![0u8; MAX_FILE_CHUNK + 1]).unwrap_err();
    assert_eq!(e.0, ErrorCode::BadRequest, "{e:?}");
    let e = a
        .call_code(Op::FileWrite {
            handle: h,
            data: "not base64!".into(),
        })
        .unwrap_err();
    assert_eq!(e.0, ErrorCode::BadRequest, "{e:?}");
    // The host goes away with the upload open: it is aborted.
    write(&mut a, h, b"partial").unwrap();
    assert_eq!(names(dir.path()).len(), 1);
    drop(a.child.stdin.take());
    let status = a.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
}

#[test]
fn relative_paths_are_refused() {
    let mut a = Agent::start();
    let ops = [
        Op::FileOpenWrite {
            path: "tmp/x".into(),
            mode: None,
        },
        Op::FileRead {
            path: "x".into(),
            offset: 0,
            len: 1,
        },
        Op::FileList { path: ".".into() },
        Op::FileStat { path: "x".into() },
        Op::Mkdir {
            path: "x".into(),
            parents: true,
        },
        Op::Remove {
            path: "x".into(),
            recursive: true,
        },
    ];
    for op in ops {
        let e = a.call_code(op.clone()).unwrap_err();
        assert_eq!(e.0, ErrorCode::BadRequest, "{op:?}: {e:?}");
    }
}

#[test]
fn list_stat_mkdir_remove() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut a = Agent::start();
    let sub = d.join("a/b/c");
    assert_eq!(
        a.call_code(Op::Mkdir {
            path: s(&sub),
            parents: true
        }),
        Ok(Reply::Done)
    );
    assert!(sub.is_dir());
    let e = a
        .call_code(Op::Mkdir {
            path: s(&sub),
            parents: false,
        })
        .unwrap_err();
    assert_eq!(e.0, ErrorCode::Exists);
    std::fs::write(d.join("file"), b"12345").unwrap();
    std::os::unix::fs::symlink("/nonexistent", d.join("link")).unwrap();
    let r = a.call_code(Op::FileList { path: s(d) });
    let Ok(Reply::FileList { entries, truncated }) = r else {
        panic!("{r:?}")
    };
    assert!(!truncated);
    let kinds: Vec<(&str, FileKind)> = entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    assert_eq!(
        kinds,
        [
            ("a", FileKind::Dir),
            ("file", FileKind::File),
            ("link", FileKind::Symlink)
        ]
    );
    let f = &entries[1];
    assert_eq!((f.size, f.path.as_str()), (5, s(&d.join("file")).as_str()));
    assert!(f.mtime > 1_600_000_000);
    // stat does not follow the symlink (its target does not even exist).
    let r = a.call_code(Op::FileStat {
        path: s(&d.join("link")),
    });
    assert!(
        matches!(&r, Ok(Reply::FileStat { entry }) if entry.kind == FileKind::Symlink),
        "{r:?}"
    );
    let codes = [
        (
            Op::FileStat {
                path: s(&d.join("missing")),
            },
            ErrorCode::NotFound,
        ),
        (
            Op::FileStat {
                path: s(&d.join("file/below")),
            },
            ErrorCode::NotADirectory,
        ),
        (
            Op::FileRead {
                path: s(d),
                offset: 0,
                len: 1,
            },
            ErrorCode::IsADirectory,
        ),
        (
            Op::FileOpenWrite {
                path: s(&d.join("a")),
                mode: None,
            },
            ErrorCode::IsADirectory,
        ),
        (
            Op::FileOpenWrite {
                path: s(&d.join("nodir/x")),
                mode: None,
            },
            ErrorCode::NotFound,
        ),
        (
            Op::FileList {
                path: s(&d.join("file")),
            },
            ErrorCode::NotADirectory,
        ),
        (
            Op::Remove {
                path: s(&d.join("a")),
                recursive: false,
            },
            ErrorCode::Io,
        ),
    ];
    for (op, code) in codes {
        let e = a.call_code(op.clone()).unwrap_err();
        assert_eq!(e.0, code, "{op:?}: {e:?}");
    }
    for p in ["a", "file", "link"] {
        assert_eq!(
            a.call_code(Op::Remove {
                path: s(&d.join(p)),
                recursive: true
            }),
            Ok(Reply::Done)
        );
    }
    assert!(names(d).is_empty());
    let e = a
        .call_code(Op::Remove {
            path: s(&d.join("a")),
            recursive: true,
        })
        .unwrap_err();
    assert_eq!(e.0, ErrorCode::NotFound);
}

/// A small tmpfs, mounted for the test (needs root and a working `mount`).
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn a_full_filesystem_is_no_space() {
    // The errno mapping itself is unit-tested in forkd_agent::proto (ENOSPC -> no_space).
    assert_eq!(ErrorCode::from_errno(libc::ENOSPC), ErrorCode::NoSpace);
    let Some(fs) = Tmpfs::mount("1m") else {
        eprintln!("skipping the tmpfs part: not root or mount failed");
        return;
    };
    let target = s(&fs.0.path().join("big"));
    let mut a = Agent::start();
    let h = open(&mut a, &target, None);
    let piece = pseudo_random(MAX_FILE_CHUNK);
    let mut err = None;
    for _ in 0..3 {
        if let Err(e) = write(&mut a, h, &piece) {
            err = Some(e);
            break;
        }
    }
    let e = err.expect("a 1 MiB tmpfs took 3 MiB");
    assert_eq!(e.0, ErrorCode::NoSpace, "{e:?}");
    a.call_code(Op::FileCloseWrite {
        handle: h,
        commit: false,
    })
    .unwrap();
    assert!(names(fs.0.path()).is_empty());
}
