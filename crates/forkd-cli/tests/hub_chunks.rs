//! One local chunk store (issue 12, part 3): a second image that shares content with a first
//! downloads only what the first did not bring; a damaged chunk in the store is fetched again;
//! packs are fetched by ranges; `forkd gc` removes what no installed image needs. Real hubs
//! (a file hub for pushes, an HTTP server for pulls), real ext4 images, real chunking.

mod hub_common;

use hub_common::faulty::{Faulty, Mode};
use hub_common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `variant`: `base`'s files with a sixteenth of memory.bin's data pages rewritten, 5000 new
/// bytes inserted near the start of rootfs.ext4 (every later byte shifts: fixed chunks would
/// share nothing after it), and a new vmstate.
fn make_variant(home: &Path, base: &str, variant: &str) {
    let store = forkd_store::Store::open(home).unwrap();
    let from = home.join("images").join(base);
    let staging = store.stage().unwrap();
    let dir = staging.dir().to_path_buf();
    std::fs::copy(from.join("memory.bin"), dir.join("memory.bin")).unwrap();
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("memory.bin"))
        .unwrap();
    let pages = mem.metadata().unwrap().len() / 4096;
    for p in (0..pages).step_by(256) {
        mem.write_all_at(&noise(99 + p, 4096), p * 4096).unwrap();
    }
    drop(mem);
    let mut rootfs = std::fs::read(from.join("rootfs.ext4")).unwrap();
    let tail = rootfs.split_off(300_000);
    rootfs.extend_from_slice(&noise(7, 5000));
    rootfs.extend_from_slice(&tail);
    std::fs::write(dir.join("rootfs.ext4"), rootfs).unwrap();
    std::fs::write(dir.join("vmstate"), noise(12345, 300_000)).unwrap();
    let base_m = store
        .get(&forkd_store::Tag::parse(base).unwrap())
        .unwrap()
        .manifest;
    let mut m = forkd_store::Manifest::new(variant, "1", base_m.memory_mib, base_m.engine.clone());
    m.description = "a variant".into();
    commit_files(
        staging,
        variant,
        m,
        &["memory.bin", "vmstate", "rootfs.ext4"],
    );
}

/// The image manifest a hub holds for OWNER/NAME:VERSION.
fn hub_manifest(root: &Path, owner: &str, name: &str, version: &str) -> serde_json::Value {
    let tag: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join(format!("tags/{owner}/{name}/{version}.json"))).unwrap(),
    )
    .unwrap();
    let d = tag["digest"].as_str().unwrap();
    let hex = &d["sha256:".len()..];
    manifest_json(&root.join(format!("blobs/sha256/{}/{hex}", &hex[..2])))
}

fn chunks_of(im: &serde_json::Value) -> Vec<serde_json::Value> {
    im["files"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| f["chunks"].as_array().unwrap().clone())
        .collect()
}

/// Where the local chunk store keeps `digest`: its segment's pack file, offset and length
/// (from the segments' index files).
fn store_chunk(home: &Path, digest: &str) -> Option<(std::path::PathBuf, u64, u64)> {
    let hex = &digest["sha256:".len()..];
    let dir = home.join("cache/chunks");
    for e in std::fs::read_dir(&dir).ok()? {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "idx") {
            continue;
        }
        for l in std::fs::read_to_string(&p).unwrap().lines() {
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() == 3 && f[0] == hex {
                return Some((
                    p.with_extension("pack"),
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                ));
            }
        }
    }
    None
}

struct World {
    _p: tempfile::TempDir,
    p: std::path::PathBuf,
    key: String,
    variant_push: serde_json::Value,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().to_path_buf();
        let key = publisher(&p, "base", 32, 5);
        make_variant(&p, "base", "variant");
        ok(&forkd(&p, &["push", "base", "acme/base:1"]));
        let variant_push = json(&ok(&forkd(
            &p,
            &["push", "variant", "acme/variant:1", "--json"],
        )));
        World {
            _p: dir,
            p,
            key,
            variant_push,
        }
    }
    fn root(&self) -> std::path::PathBuf {
        self.p.join("hub")
    }
}

fn pull(home: &Path, url: &str, key: &str, reference: &str) -> serde_json::Value {
    json(&ok(&forkd(
        home,
        &["pull", reference, "--hub", url, "--trust", key, "--json"],
    )))
}

#[test]
fn push_chunks_by_content_and_stores_only_what_the_hub_lacks() {
    let w = World::new();
    let im = hub_manifest(&w.root(), "acme", "variant", "1");
    assert_eq!(im["chunking"]["algorithm"], "fastcdc", "{}", im["chunking"]);
    let chunks = chunks_of(&im);
    // Content-defined: chunks are of many sizes, none past the maximum, and every one lives in
    // a pack at an offset.
    let lens: std::collections::BTreeSet<u64> =
        chunks.iter().map(|c| c["len"].as_u64().unwrap()).collect();
    assert!(lens.len() > 10, "chunk sizes look fixed: {lens:?}");
    assert!(lens.iter().all(|&l| l <= 256 << 10), "{lens:?}");
    // A disk is cut at 64 KiB on average (the image's `chunking`); guest memory and the small
    // files at 32 KiB, which each file records, and no chunk of them is past 128 KiB.
    assert_eq!(im["chunking"]["size"], 65536, "{}", im["chunking"]);
    for f in im["files"].as_array().unwrap() {
        let name = f["name"].as_str().unwrap();
        let max = f["chunks"].as_array().unwrap().iter();
        let max = max.map(|c| c["len"].as_u64().unwrap()).max().unwrap_or(0);
        if name == "rootfs.ext4" {
            assert!(f.get("chunking").is_none(), "{name}: {}", f["chunking"]);
        } else {
            assert_eq!(f["chunking"]["algorithm"], "fastcdc", "{name}");
            assert_eq!(f["chunking"]["size"], 32768, "{name}: {}", f["chunking"]);
            assert!(max <= 128 << 10, "{name} has a chunk of {max} bytes");
        }
    }
    assert!(
        chunks
            .iter()
            .all(|c| c["pack"].is_string() && c["pack_offset"].is_u64())
    );
    // The variant shares most of its chunks with the base on the hub: the push stored only
    // its own.
    let uploaded = w.variant_push["uploaded_bytes"].as_u64().unwrap();
    let reused = w.variant_push["reused_bytes"].as_u64().unwrap();
    assert!(
        reused > 2 * uploaded,
        "the variant's push stored {uploaded} bytes and named only {reused} already on the hub"
    );
}

#[test]
fn a_second_image_downloads_only_what_the_first_did_not_bring() {
    let w = World::new();
    let server = Faulty::start(&w.root(), Mode::Normal);
    let c = tempfile::tempdir().unwrap();
    let base = pull(c.path(), &server.url, &w.key, "acme/base:1");
    // Packs are fetched by ranges: a few requests, not one per chunk.
    let base_chunks = chunks_of(&hub_manifest(&w.root(), "acme", "base", "1")).len() as u64;
    let requests = server
        .blob_requests
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        requests * 10 < base_chunks,
        "{requests} requests for {base_chunks} chunks: chunks were not fetched as ranges of packs"
    );
    assert!(base["downloaded_bytes"].as_u64().unwrap() > 0);

    let before = server.bytes();
    let v = pull(c.path(), &server.url, &w.key, "acme/variant:1");
    let im = hub_manifest(&w.root(), "acme", "variant", "1");
    let size: u64 = {
        let mut seen = std::collections::HashSet::new();
        chunks_of(&im)
            .iter()
            .filter(|c| seen.insert(c["digest"].as_str().unwrap().to_string()))
            .map(|c| c["stored_size"].as_u64().unwrap())
            .sum()
    };
    let downloaded = v["downloaded_bytes"].as_u64().unwrap();
    assert_eq!(downloaded, server.bytes() - before, "{v}");
    assert!(
        downloaded * 3 < size,
        "the variant downloaded {downloaded} of its {size} bytes after the base: {v}"
    );
    assert!(v["cached_bytes"].as_u64().unwrap() * 2 > size, "{v}");
    assert_eq!(tag_hashes(c.path(), "variant"), tag_hashes(&w.p, "variant"));
    assert_eq!(tag_hashes(c.path(), "base"), tag_hashes(&w.p, "base"));
}

#[test]
fn a_damaged_chunk_in_the_store_is_fetched_again() {
    let w = World::new();
    let server = Faulty::start(&w.root(), Mode::Normal);
    let c = tempfile::tempdir().unwrap();
    pull(c.path(), &server.url, &w.key, "acme/base:1");
    // Damage (same length, other bytes) the largest stored chunk the variant shares.
    let im = hub_manifest(&w.root(), "acme", "variant", "1");
    let shared = chunks_of(&im)
        .into_iter()
        .filter(|ch| store_chunk(c.path(), ch["digest"].as_str().unwrap()).is_some())
        .max_by_key(|ch| ch["stored_size"].as_u64().unwrap())
        .expect("the variant shares chunks with the base");
    let digest = shared["digest"].as_str().unwrap();
    let (pack, off, len) = store_chunk(c.path(), digest).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
    f.write_all_at(&noise(3, len as usize), off).unwrap();
    let before = server.bytes();
    let v = pull(c.path(), &server.url, &w.key, "acme/variant:1");
    assert_eq!(
        tag_hashes(c.path(), "variant"),
        tag_hashes(&w.p, "variant"),
        "{v}"
    );
    assert!(
        server.bytes() - before >= len,
        "the damaged chunk was not fetched again: {v}"
    );

    // A link planted in place of a segment is not followed either.
    let victim = c.path().join("victim");
    std::fs::write(&victim, b"not a chunk").unwrap();
    std::fs::remove_file(&pack).unwrap();
    std::os::unix::fs::symlink(&victim, &pack).unwrap();
    ok(&forkd(c.path(), &["rmi", "variant"]));
    pull(c.path(), &server.url, &w.key, "acme/variant:1");
    assert_eq!(tag_hashes(c.path(), "variant"), tag_hashes(&w.p, "variant"));
    assert_eq!(std::fs::read(&victim).unwrap(), b"not a chunk");
}

#[test]
fn gc_removes_what_no_installed_image_needs() {
    let w = World::new();
    let server = Faulty::start(&w.root(), Mode::Normal);
    let c = tempfile::tempdir().unwrap();
    pull(c.path(), &server.url, &w.key, "acme/base:1");
    pull(c.path(), &server.url, &w.key, "acme/variant:1");
    let gc = |args: &[&str]| json(&ok(&forkd(c.path(), &[&["gc", "--json"], args].concat())));
    let r = gc(&[]);
    assert_eq!(r["chunks_removed"], 0, "both images need every chunk: {r}");
    assert!(r["chunks_kept"].as_u64().unwrap() > 0, "{r}");

    // An abandoned partial download goes; one a pull holds (its lock) stays.
    let hex_a = "a".repeat(64);
    let hex_b = "b".repeat(64);
    for h in [&hex_a, &hex_b] {
        let d = c.path().join("cache/partial").join(h);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("memory.bin"), noise(1, 1 << 20)).unwrap();
    }
    std::fs::create_dir_all(c.path().join("cache/locks")).unwrap();
    let held = forkd_store::FileLock::exclusive(
        &c.path().join(format!("cache/locks/{hex_b}.lock")),
        |_| {},
    )
    .unwrap();

    ok(&forkd(c.path(), &["rmi", "base"]));
    let base_only: Vec<String> = {
        let v: std::collections::HashSet<String> =
            chunks_of(&hub_manifest(&w.root(), "acme", "variant", "1"))
                .iter()
                .map(|ch| ch["digest"].as_str().unwrap().to_string())
                .collect();
        chunks_of(&hub_manifest(&w.root(), "acme", "base", "1"))
            .iter()
            .map(|ch| ch["digest"].as_str().unwrap().to_string())
            .filter(|d| !v.contains(d))
            .collect()
    };
    assert!(!base_only.is_empty());
    let dry = gc(&["--dry-run"]);
    assert!(dry["chunks_removed"].as_u64().unwrap() > 0, "{dry}");
    assert!(
        base_only.iter().all(|d| store_chunk(c.path(), d).is_some()),
        "a dry run removed chunks"
    );
    let r = gc(&[]);
    assert_eq!(r["chunks_removed"], dry["chunks_removed"], "{r} {dry}");
    assert_eq!(r["manifests_removed"], 1, "{r}");
    assert_eq!(r["partials_removed"], 1, "{r}");
    assert!(r["chunk_bytes_freed"].as_u64().unwrap() > 0, "{r}");
    assert!(base_only.iter().all(|d| store_chunk(c.path(), d).is_none()));
    assert!(!c.path().join("cache/partial").join(&hex_a).exists());
    assert!(
        c.path().join("cache/partial").join(&hex_b).exists(),
        "a held partial was removed"
    );
    drop(held);
    // What the variant needs stayed: pulling it again (after rmi) downloads nothing.
    ok(&forkd(c.path(), &["rmi", "variant"]));
    let before = server.bytes();
    let v = pull(c.path(), &server.url, &w.key, "acme/variant:1");
    assert_eq!(server.bytes(), before, "{v}");
    assert_eq!(tag_hashes(c.path(), "variant"), tag_hashes(&w.p, "variant"));
    // Images not pulled (built, unpacked) are never touched, and gc twice removes nothing.
    let again = gc(&[]);
    assert_eq!(again["chunks_removed"], 0, "{again}");
}

#[test]
fn a_push_whose_upload_fails_ends_with_the_error_and_does_not_hang() {
    // A hub that serves its documents but takes no upload (every PUT is answered 404): the
    // first pack fails while the chunker still has most of the image to cut.
    let p = Published::new(8, 41);
    make_snapshot(&p.home, "snap2", 2048, 42);
    let server = Faulty::start(&p.root, Mode::Normal);
    let t = std::time::Instant::now();
    let mut child = std::process::Command::new(FORKD)
        .args(["push", "snap2", "acme/other:1", "--hub", &server.url])
        .env("FORKD_HOME", &p.home)
        .env("FORKD_HUB_TOKEN", "some-token")
        .env("FORKD_HUB_ATTEMPTS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the push hung after its upload failed");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("cannot upload"), "{err}");
    assert!(!p.root.join("tags/acme/other").exists());
}

/// `push --level` stores smaller chunks, and a pull of them installs the same files; a level
/// outside zstd's 1..=19 is refused before anything is read.
#[test]
fn push_at_a_higher_level_stores_less_and_pulls_the_same_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let key = publisher(p, "base", 32, 5);
    let fast = json(&ok(&forkd(p, &["push", "base", "acme/fast:1", "--json"])));
    let small = json(&ok(&forkd(
        p,
        &["push", "base", "acme/small:1", "--level", "19", "--json"],
    )));
    let size = |v: &serde_json::Value| v["stored_size"].as_u64().unwrap();
    assert!(
        size(&small) < size(&fast),
        "level 19 stored {} bytes, level 3 {}",
        size(&small),
        size(&fast)
    );
    let server = Faulty::start(&p.join("hub"), Mode::Normal);
    let c = tempfile::tempdir().unwrap();
    pull(c.path(), &server.url, &key, "acme/small:1");
    assert_eq!(tag_hashes(c.path(), "small"), tag_hashes(p, "base"));

    for bad in ["0", "20", "max"] {
        let out = forkd(p, &["push", "base", "acme/refused:1", "--level", bad]);
        assert_eq!(out.status.code(), Some(2), "--level {bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--level"), "--level {bad}: {err}");
    }
    fn names(dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            out.push(e.file_name().to_string_lossy().into_owned());
            if e.file_type().unwrap().is_dir() {
                names(&e.path(), out);
            }
        }
    }
    let mut all = Vec::new();
    names(&p.join("hub"), &mut all);
    assert!(all.iter().any(|n| n.contains("small")), "{all:?}");
    assert!(
        all.iter().all(|n| !n.contains("refused")),
        "a refused push left {all:?} on the hub"
    );
}
