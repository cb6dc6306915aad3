//! Small helpers: running tools with their output kept in a log, hashing, paths inside a root.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::RecipeError;

pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RecipeError + '_ {
    move |source| RecipeError::Io {
        path: path.to_path_buf(),
        err: source,
    }
}

/// A fresh, empty work directory `CACHE/tmp/KIND-KEY-PID` and its log file
/// `CACHE/logs/KIND-KEY.log` (an old log is removed), for one build step.
pub fn fresh_work_dir(
    cache_dir: &Path,
    kind: &str,
    key: &str,
) -> Result<(PathBuf, PathBuf), RecipeError> {
    let tmp = cache_dir
        .join("tmp")
        .join(format!("{kind}-{key}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let log = cache_dir.join("logs").join(format!("{kind}-{key}.log"));
    let _ = std::fs::remove_file(&log);
    Ok((tmp, log))
}

/// Move a finished work directory `tmp` into its cache slot `dir` with one rename; an old
/// `dir` (a `--rebuild`) is first moved aside into `CACHE/tmp` and deleted after.
pub fn install_dir(tmp: &Path, dir: &Path, cache_dir: &Path, key: &str) -> Result<(), RecipeError> {
    if dir.exists() {
        let old = cache_dir
            .join("tmp")
            .join(format!("old-{key}-{}", std::process::id()));
        std::fs::rename(dir, &old).map_err(io_err(dir))?;
        let _ = std::fs::remove_dir_all(&old);
    }
    std::fs::create_dir_all(dir.parent().unwrap_or(cache_dir)).map_err(io_err(dir))?;
    std::fs::rename(tmp, dir).map_err(io_err(dir))
}

/// Find `tool` on PATH (plus the sbin directories, which a non-login root shell may lack).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

pub fn need_tool(tool: &str, package: &str) -> Result<PathBuf, RecipeError> {
    which(tool).ok_or_else(|| RecipeError::MissingTool {
        tool: tool.into(),
        package: package.into(),
    })
}

/// Run `cmd` with stdout and stderr appended to `log`; on failure, the error carries the log's tail.
pub fn run_logged(what: &str, cmd: &mut Command, log: &Path) -> Result<(), RecipeError> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err(log))?;
    let file2 = file.try_clone().map_err(io_err(log))?;
    tracing::debug!(?cmd, log = %log.display(), "running {what}");
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(file2)
        .status()
        .map_err(|source| RecipeError::Io {
            path: PathBuf::from(cmd.get_program()),
            err: source,
        })?;
    if status.success() {
        return Ok(());
    }
    Err(RecipeError::Command {
        what: what.to_string(),
        status: status.to_string(),
        tail: format!("{}\n(full log: {})", tail(log, 3000), log.display()),
    })
}

fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim_end().to_string()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub fn sha256_file(path: &Path) -> Result<String, RecipeError> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io_err(path))?;
    Ok(hex::encode(h.finalize()))
}

/// Resolve `rel` inside `root` the way the guest would, following symlinks, never leaving `root`.
pub fn resolve_in_root(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut cur = PathBuf::new();
    let mut todo: Vec<PathBuf> = rel
        .components()
        .rev()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut hops = 0;
    while let Some(part) = todo.pop() {
        match part.to_string_lossy().as_ref() {
            "/" | "." => continue,
            ".." => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        let next = cur.join(&part);
        match std::fs::read_link(root.join(&next)) {
            Ok(target) => {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                if target.is_absolute() {
                    cur = PathBuf::new();
                }
                todo.extend(
                    target
                        .components()
                        .rev()
                        .map(|c| PathBuf::from(c.as_os_str())),
                );
            }
            Err(_) => cur = next,
        }
    }
    Some(root.join(cur))
}

/// Write a new file at guest path `dest` inside `root`. An existing file is unlinked first, so a
/// hard-linked cache behind `root` is never modified.
pub fn write_in_root(root: &Path, dest: &str, data: &[u8], mode: u32) -> Result<(), RecipeError> {
    use std::os::unix::fs::PermissionsExt;
    let rel = Path::new(dest.trim_start_matches('/'));
    let parent_rel = rel.parent().unwrap_or(Path::new(""));
    let parent = resolve_in_root(root, parent_rel).ok_or_else(|| RecipeError::Invalid {
        field: "files".into(),
        message: format!("{dest}: too many symlinks in its parent directories"),
    })?;
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let name = rel.file_name().ok_or_else(|| RecipeError::Invalid {
        field: "files".into(),
        message: format!("{dest}: no file name"),
    })?;
    let path = parent.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => {
            return Err(RecipeError::Invalid {
                field: "files".into(),
                message: format!("{dest} is a directory in the root filesystem"),
            });
        }
        Ok(_) => std::fs::remove_file(&path).map_err(io_err(&path))?,
        Err(_) => {}
    }
    std::fs::write(&path, data).map_err(io_err(&path))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err(&path))?;
    Ok(())
}

/// Disk space the tree at `root` takes (allocated blocks, hard links counted once) and its
/// number of inodes.
pub fn tree_usage(root: &Path) -> Result<(u64, u64), RecipeError> {
    let mut seen = HashSet::new();
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let m = e.metadata().map_err(io_err(&e.path()))?;
            if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            inodes += 1;
            bytes += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
