//! Networking (issue 11), the issue's own test: `pip install` in a child, from a local package
//! index that the test serves on the host, works when `--allow host:PORT` names it and fails,
//! without the guest reaching the index, when it does not.
//!
//! The guest is a real Debian bookworm with `python3-pip`, built from
//! tests/fixtures/pip-recipe by `forkd build` (needs `mmdebstrap` and Debian's mirror). The
//! build is slow, so it is made once into a publisher store under `$FORKD_CACHE/pip-publisher`
//! (default /var/cache/forkd-ci/pip-publisher) and reused by later runs; each run packs it and
//! unpacks it into its own fresh store, as bench/branch.sh does. A cached snapshot made by an
//! older forkd without a NIC (layout `forkd-pc-v1`) is rebuilt.
//!
//! The package is a real pure-Python wheel made by the test and served by
//! `python3 -m http.server` on the host's 127.0.0.1, which the guest reaches as 10.0.2.2.

mod cli_common;
use cli_common::*;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};

/// The layout of snapshots with a NIC (crates/forkd-engine/src/spec.rs, `LAYOUT`).
const NIC_LAYOUT: &str = "forkd-pc-v2";
const TAG: &str = "pip";
const GREETING: &str = "hello-from-the-host-index";

/// Where CI keeps what is slow to make: `$FORKD_CACHE`, else /var/cache/forkd-ci.
fn forkd_cache() -> PathBuf {
    std::env::var_os("FORKD_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/forkd-ci"))
}

/// The recipe builder's cache: `$FORKD_BUILD_CACHE`, else `$FORKD_CACHE/rootfs`.
fn build_cache() -> PathBuf {
    std::env::var_os("FORKD_BUILD_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| forkd_cache().join("rootfs"))
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pip-recipe")
}

/// The `layout` in the engine.json of `tag` in the store `home`, if it has that tag.
fn layout_of(home: &Path, tag: &str) -> Option<String> {
    let text = std::fs::read_to_string(home.join("images").join(tag).join("engine.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["layout"].as_str().map(str::to_string)
}

/// The recipe `tag` in the store `home` was built from, if it has that tag.
fn recipe_of(home: &Path, tag: &str) -> Option<forkd_recipe::Recipe> {
    let text = std::fs::read_to_string(home.join("images").join(tag).join("recipe.toml")).ok()?;
    forkd_recipe::Recipe::parse(&text).ok()
}

/// The pip snapshot, in the publisher store: built once, and again when it has no NIC (made by
/// an older forkd), was built from another version of the fixture recipe, or holds another
/// initramfs (guest agent) than the one the tests run. Returns the store
/// and its lock, held until the caller has packed the snapshot.
fn publisher() -> (PathBuf, std::fs::File) {
    let assets = tiny_assets();
    let cache = forkd_cache();
    let home = cache.join("pip-publisher");
    std::fs::create_dir_all(&home).unwrap();
    // One builder at a time; the others wait and then find the image made.
    let lock = std::fs::File::create(cache.join("pip-publisher.lock")).unwrap();
    lock.lock().unwrap();
    let layout = layout_of(&home, TAG);
    let wanted = forkd_recipe::LoadedRecipe::load(&fixture()).unwrap().recipe;
    let same_recipe = recipe_of(&home, TAG).as_ref() == Some(&wanted);
    // The snapshot carries the initramfs, and with it the guest agent: one made with another
    // agent would test that agent, not this one.
    let same_agent = std::fs::read(home.join("images").join(TAG).join("initrd.img")).ok()
        == std::fs::read(assets.join("initrd.img")).ok();
    if layout.as_deref() != Some(NIC_LAYOUT) || !same_recipe || !same_agent {
        let has_mmdebstrap = Command::new("mmdebstrap")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            has_mmdebstrap,
            "mmdebstrap not found: this test builds a Debian guest with pip \
             (`apt-get install mmdebstrap`, as scripts/test.sh does)"
        );
        eprintln!(
            "net_pip: building {TAG} into {} (cached: layout {layout:?}, same recipe \
             {same_recipe}, same agent {same_agent}; need {NIC_LAYOUT}); the first build takes \
             minutes",
            home.display()
        );
        // A build that passes replaces an existing tag atomically.
        ok_in(
            &home,
            &[
                "build",
                fixture().to_str().unwrap(),
                "--tag",
                TAG,
                "--cache-dir",
                build_cache().to_str().unwrap(),
                "--kernel",
                assets.join("vmlinuz").to_str().unwrap(),
                "--initrd",
                assets.join("initrd.img").to_str().unwrap(),
            ],
        );
        assert_eq!(
            layout_of(&home, TAG).as_deref(),
            Some(NIC_LAYOUT),
            "the rebuilt {TAG} has no NIC"
        );
    }
    (home, lock)
}

/// A fresh store holding the pip snapshot (packed from the publisher, unpacked here), shared
/// by the tests that run at the same time and deleted after the last of them: it is hundreds
/// of MiB, too much to leave in /tmp as a static store would.
struct PipStore(tempfile::TempDir);

fn pip_store() -> Arc<PipStore> {
    static SHARED: Mutex<Weak<PipStore>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = shared.upgrade() {
        return s;
    }
    let home = new_home();
    let (publisher, lock) = publisher();
    let work = tempfile::tempdir_in("/tmp").unwrap();
    let pack = work.path().join("pip.forkd-snapshot.tar.zst");
    let pack = pack.to_str().unwrap();
    ok_in(&publisher, &["-q", "pack", TAG, "-o", pack]);
    drop(lock);
    ok_in(home.path(), &["-q", "unpack", pack]);
    assert_eq!(layout_of(home.path(), TAG).as_deref(), Some(NIC_LAYOUT));
    let s = Arc::new(PipStore(home));
    *shared = Arc::downgrade(&s);
    s
}

/// Writes a real pure-Python wheel, `forkd_hello-1.0-py3-none-any.whl`, into `dir`: the module
/// and a `.dist-info` with METADATA, WHEEL and a RECORD of sha256 hashes and sizes.
fn write_wheel(dir: &Path) {
    const SCRIPT: &str = r#"
import base64, hashlib, sys, zipfile
out, greeting = sys.argv[1], sys.argv[2]
di = "forkd_hello-1.0.dist-info"
files = {
    "forkd_hello/__init__.py": "GREETING = %r\n" % greeting,
    di + "/METADATA": "Metadata-Version: 2.1\nName: forkd-hello\nVersion: 1.0\n"
        "Summary: forkd's networking test package\n",
    di + "/WHEEL": "Wheel-Version: 1.0\nGenerator: forkd-test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
}
def digest(b):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b"=").decode()
record = "".join("%s,%s,%d\n" % (p, digest(c.encode()), len(c.encode())) for p, c in files.items())
files[di + "/RECORD"] = record + di + "/RECORD,,\n"
with zipfile.ZipFile(out + "/forkd_hello-1.0-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as z:
    for p, c in files.items():
        z.writestr(p, c)
"#;
    let o = Command::new("python3")
        .args(["-c", SCRIPT, dir.to_str().unwrap(), GREETING])
        .output()
        .expect("running python3");
    assert!(
        o.status.success(),
        "making the wheel failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `python3 -m http.server` on the host's 127.0.0.1, serving a directory with the wheel; its
/// request log goes to a file. Killed when dropped.
struct Index {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Index {
    fn start() -> Index {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let root = dir.path().join("simple");
        std::fs::create_dir(&root).unwrap();
        write_wheel(&root);
        let log = dir.path().join("http.log");
        // Port 0: the server picks a free port and says which on its first line.
        let mut child = Command::new("python3")
            .args([
                "-u",
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(&root)
            .arg("0")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("running python3 -m http.server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
        let port = line
            .split_whitespace()
            .skip_while(|w| *w != "port")
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("http.server did not say its port: {line:?}")
            });
        Index {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    /// The server's request log so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pip install (then an import of what it installed) a child runs against `port`.
/// `--trusted-host`: pip ignores plain-http links to any host but localhost without it.
fn pip_script(port: u16) -> String {
    format!(
        "pip install --break-system-packages --no-index --no-cache-dir \
         --trusted-host 10.0.2.2 --find-links http://10.0.2.2:{port}/ forkd-hello 2>&1 && \
         python3 -c 'import forkd_hello; print(forkd_hello.GREETING)'"
    )
}

/// One child of the pip snapshot with `net` flags running `script`, pip's generous timeout:
/// (forkd's exit code, the child's stdout, its exit code).
fn fork_pip(net: &[&str], script: &str) -> (Option<i32>, String, Option<i64>) {
    let store = pip_store();
    let home = store.0.path();
    let mut args = vec![
        "fork",
        "--tag",
        TAG,
        "--json",
        "--exec-timeout",
        "300",
        "--exec",
        script,
    ];
    args.extend_from_slice(net);
    let o = forkd_in(home, &args);
    let v = json(&String::from_utf8_lossy(&o.stdout));
    let c = &v["children"][0];
    assert_eq!(c["up"], true, "{}", text(&o));
    (
        o.status.code(),
        format!(
            "{}{}",
            c["exec"]["stdout"].as_str().unwrap_or(""),
            c["exec"]["stderr"].as_str().unwrap_or("")
        ),
        c["exec"]["exit_code"].as_i64(),
    )
}

#[test]
fn pip_install_from_a_local_package_index_served_on_the_host_works_when_allowed() {
    let index = Index::start();
    let (status, out, code) = fork_pip(
        &["--allow", &format!("host:{}", index.port)],
        &pip_script(index.port),
    );
    eprintln!("net_pip: pip with --allow:\n{out}");
    assert_eq!(code, Some(0), "{out}\n--- index log\n{}", index.log());
    assert_eq!(status, Some(0), "{out}");
    assert!(
        out.contains("Successfully installed forkd-hello-1.0"),
        "{out}"
    );
    assert!(out.contains(GREETING), "{out}");
    let log = index.log();
    assert!(
        log.contains("GET /forkd_hello-1.0-py3-none-any.whl"),
        "the wheel came from the host's index: {log}"
    );
}

#[test]
fn pip_install_from_the_host_fails_when_the_port_is_not_allowed() {
    let index = Index::start();
    let (status, out, code) = fork_pip(&["--net"], &pip_script(index.port));
    eprintln!("net_pip: pip without --allow:\n{out}");
    assert!(matches!(code, Some(c) if c != 0), "pip must fail: {out}");
    assert_eq!(status, Some(3), "a failed command fails the fork: {out}");
    assert!(!out.contains(GREETING), "{out}");
    // pip tried, and the connection was refused (the filter's reset), not ignored or timed out.
    assert!(out.contains("Connection refused"), "{out}");
    assert!(
        out.contains("No matching distribution found for forkd-hello"),
        "{out}"
    );
    let log = index.log();
    assert!(
        !log.contains("GET") && !log.contains("HEAD"),
        "the index saw a request from a child that may not reach it: {log}"
    );
}
