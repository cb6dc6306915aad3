//! Attacks by a hostile snapshot publisher (and a hub operator who moves its files around),
//! each one a test: signatures v2 (version in the signed subject), trusted keys scoped per
//! owner, provenance and owner-safe pulls, integrity end to end (push, fresh pull, `verify`),
//! engine.json as untrusted input, and a pull cache that follows no links.

mod hub_common;
use forkd_hub::layout;
use hub_common::*;
use std::path::{Path, PathBuf};

/// A publisher home with a key, and a consumer home with one unrelated image.
struct World {
    _p: tempfile::TempDir,
    _c: tempfile::TempDir,
    p: PathBuf,
    c: PathBuf,
    key: String,
}

impl World {
    fn new() -> World {
        let pd = tempfile::tempdir().unwrap();
        let cd = tempfile::tempdir().unwrap();
        let key = publisher(pd.path(), "snap", 4, 1);
        make_snapshot(cd.path(), "existing", 4, 99);
        World {
            p: pd.path().to_path_buf(),
            c: cd.path().to_path_buf(),
            _p: pd,
            _c: cd,
            key,
        }
    }
    fn hub(&self) -> String {
        format!("file://{}/hub", self.p.display())
    }
    fn root(&self) -> PathBuf {
        self.p.join("hub")
    }
    fn push(&self, tag: &str, reference: &str) {
        ok(&forkd(&self.p, &["push", tag, reference]));
    }
    fn pull(&self, args: &[&str]) -> std::process::Output {
        let hub = self.hub();
        let mut a = vec!["pull"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--hub", &hub]);
        forkd(&self.c, &a)
    }
    /// The pull fails saying `gist`, and the consumer's store is as it was.
    fn pull_refused(&self, args: &[&str], gist: &str) -> String {
        let before = store_state(&self.c);
        let err = fails_with(&self.pull(args), gist);
        assert_eq!(store_state(&self.c), before, "the store changed");
        assert_no_staging(&self.c);
        err
    }
}

fn tag_file(root: &Path, owner: &str, name: &str, version: &str) -> PathBuf {
    root.join(layout::version_tag_key(owner, name, version))
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// Overwrite `len` bytes at `offset` with noise (a corruption that keeps the size).
fn corrupt(p: &Path, offset: u64, len: usize) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(&noise(4242, len), offset).unwrap();
}

// ---- Signatures v2 ----------------------------------------------------------------------

/// A hub operator copies `1.json` over `2.json`: the signature is valid, but it was made for
/// version 1, so `pull acme/snap:2` refuses it (before: v1 was installed as "verified" v2).
#[test]
fn tag_file_copied_to_another_version_is_refused() {
    let w = World::new();
    w.push("snap", "acme/snap:1");
    make_snapshot(&w.p, "snap2", 4, 2);
    w.push("snap2", "acme/snap:2");
    let root = w.root();
    std::fs::copy(
        tag_file(&root, "acme", "snap", "1"),
        tag_file(&root, "acme", "snap", "2"),
    )
    .unwrap();
    let err = w.pull_refused(&["acme/snap:2", "--trust", &w.key], "signed for version 1");
    assert!(err.contains("found as version 2"), "{err}");
    // The untouched version still verifies, and the signed subject carries the version.
    ok(&w.pull(&["acme/snap:1", "--trust", &w.key]));
    let sig = read_json(&tag_file(&root, "acme", "snap", "1"))["signature"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        sig.contains("trusted comment: forkd-hub/2 image=acme/snap version=1 digest=sha256:"),
        "{sig}"
    );
    assert!(sig.contains(" time=20"), "{sig}");
}

/// A tag signed before v2 (subject without a version) still reads, with a warning.
#[test]
fn v1_signature_still_reads_with_a_warning() {
    let w = World::new();
    w.push("snap", "acme/snap:1");
    let tpath = tag_file(&w.root(), "acme", "snap", "1");
    let mut tag = read_json(&tpath);
    let digest = tag["digest"].as_str().unwrap().to_string();
    let body = std::fs::read(w.root().join(layout::blob_key(&digest))).unwrap();
    let sk = forkd_hub::sign::load_secret_key(&w.p.join("keys/forkd.key")).unwrap();
    let v1 = forkd_hub::sign::Subject {
        image: "acme/snap".into(),
        version: None,
        digest: digest.clone(),
        time: None,
    };
    tag["signature"] = forkd_hub::sign::sign(&sk, &body, &v1).unwrap().into();
    std::fs::write(&tpath, serde_json::to_vec(&tag).unwrap()).unwrap();
    let out = ok_err(&w.pull(&["acme/snap:1", "--trust", &w.key]));
    assert!(out.contains("v1 signature"), "{out}");
    assert_eq!(tag_hashes(&w.c, "snap"), tag_hashes(&w.p, "snap"));
}

// ---- Trusted keys scoped per owner ------------------------------------------------------

/// Mallory's key is trusted for mallory's images. She pushes `acme/snap` signed with it: the
/// pull refuses (before: any trusted key verified any owner's images).
#[test]
fn key_trusted_for_one_owner_does_not_verify_another() {
    let w = World::new();
    w.push("snap", "acme/snap:1");
    w.push("snap", "mallory/snap:1");
    let out = ok(&forkd(&w.c, &["key", "trust", "mallory", &w.key]));
    assert!(out.contains("for images of mallory"), "{out}");
    let list = ok(&forkd(&w.c, &["key", "list"]));
    assert!(list.contains("owner mallory"), "{list}");
    let err = w.pull_refused(&["acme/snap:1"], "not trusted for images of \"acme\"");
    assert!(err.contains("forkd key trust"), "{err}");
    // The same key verifies mallory's own image.
    ok(&w.pull(&["mallory/snap:1", "--tag", "msnap"]));
}

/// A bare key line in trusted-keys (from before scoping) still verifies, but never silently.
#[test]
fn unscoped_trusted_key_warns_with_the_migration_command() {
    let w = World::new();
    w.push("snap", "acme/snap:1");
    std::fs::write(w.c.join("trusted-keys"), format!("{}\n", w.key)).unwrap();
    let out = ok_err(&w.pull(&["acme/snap:1"]));
    assert!(out.contains("trusted for every owner"), "{out}");
    assert!(
        out.contains(&format!("forkd key trust acme {}", w.key)),
        "{out}"
    );
    let list = ok(&forkd(&w.c, &["key", "list"]));
    assert!(list.contains("ANY OWNER"), "{list}");
}

// ---- Provenance ---------------------------------------------------------------------------

/// `pull mallory/snap` must not replace the `snap` that came from acme without --force
/// (before: it was replaced silently); the pulled tag records where it came from.
#[test]
fn pull_from_another_owner_does_not_replace_a_local_tag() {
    let w = World::new();
    w.push("snap", "acme/snap:1");
    make_snapshot(&w.p, "evil", 4, 666);
    w.push("evil", "mallory/snap:1");
    ok(&w.pull(&["acme/snap:1", "--trust", &w.key]));
    let acme = tag_hashes(&w.c, "snap");
    let origin = read_json(&w.c.join("images/snap/origin.json"));
    assert_eq!(origin["owner"], "acme");
    assert_eq!(origin["reference"], "acme/snap:1");
    assert_eq!(origin["version"], "1");
    assert_eq!(origin["verified"], true);
    assert!(origin["hub"].as_str().unwrap().contains("hub"), "{origin}");
    assert!(origin["digest"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(origin["key_id"].as_str().unwrap().len(), 16);
    assert!(origin["signed_at"].as_str().is_some() && origin["pulled_at"].as_str().is_some());
    let inspect: serde_json::Value =
        serde_json::from_str(&ok(&forkd(&w.c, &["inspect", "snap", "--json"]))).unwrap();
    assert_eq!(inspect["origin"]["owner"], "acme");

    let err = w.pull_refused(
        &["mallory/snap:1", "--trust", &w.key],
        "came from acme/snap:1",
    );
    assert!(err.contains("--force"), "{err}");
    assert_eq!(tag_hashes(&w.c, "snap"), acme);
    // The same owner may update its own tag; --force replaces another owner's.
    make_snapshot(&w.p, "snap3", 4, 3);
    w.push("snap3", "acme/snap:2");
    ok(&w.pull(&["acme/snap:2", "--trust", &w.key]));
    ok(&w.pull(&["mallory/snap:1", "--trust", &w.key, "--force"]));
    assert_eq!(
        read_json(&w.c.join("images/snap/origin.json"))["owner"],
        "mallory"
    );
    assert_eq!(tag_hashes(&w.c, "snap"), tag_hashes(&w.p, "evil"));
}

/// An image made on this host is not replaced by a pull without --force either.
#[test]
fn pull_does_not_replace_a_locally_made_tag() {
    let w = World::new();
    w.push("snap", "acme/existing:1");
    let err = w.pull_refused(&["acme/existing:1", "--trust", &w.key], "was not pulled");
    assert!(err.contains("--force"), "{err}");
}

// ---- Integrity end to end -----------------------------------------------------------------

/// A memory.bin corrupted in the publisher's store is refused by push (before: pushed
/// fine); nothing becomes visible on the hub.
#[test]
fn push_refuses_a_corrupt_image() {
    let w = World::new();
    corrupt(&w.p.join("images/snap/memory.bin"), 8192, 4096);
    let err = fails_with(&forkd(&w.p, &["push", "snap", "acme/snap:1"]), "corrupt");
    assert!(err.contains("memory.bin"), "{err}");
    assert!(err.contains("forkd verify snap"), "{err}");
    assert!(!tag_file(&w.root(), "acme", "snap", "1").exists());
    let cat = w.root().join("catalog.json");
    assert!(!cat.exists() || !std::fs::read_to_string(&cat).unwrap().contains("acme/snap"));
}

/// A publisher signs an image manifest whose chunks decode to other bytes than the files its
/// manifest.toml describes: every chunk matches its own digest, only the whole-file sha256
/// can tell. A fresh pull refuses it and installs nothing (before: installed).
#[test]
fn fresh_pull_refuses_files_that_do_not_match_the_manifest() {
    let w = World::new();
    w.push("snap", "acme/snap:1");
    let root = w.root();
    let tpath = tag_file(&root, "acme", "snap", "1");
    let mut tag = read_json(&tpath);
    let digest = tag["digest"].as_str().unwrap().to_string();
    let mut im = manifest_json(&root.join(layout::blob_key(&digest)));
    // Replace the first chunk of memory.bin by other content of the same length.
    let file = im["files"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|f| f["name"] == "memory.bin")
        .unwrap();
    let chunk = &mut file["chunks"][0];
    let len = chunk["len"].as_u64().unwrap() as usize;
    let blob = zstd::bulk::compress(&noise(7, len), 3).unwrap();
    let bd = layout::sha256_digest(&blob);
    let bpath = root.join(layout::blob_key(&bd));
    std::fs::create_dir_all(bpath.parent().unwrap()).unwrap();
    std::fs::write(&bpath, &blob).unwrap();
    chunk["digest"] = bd.into();
    chunk["stored_size"] = (blob.len() as u64).into();
    // A blob of its own, not a place in a pack.
    let c = chunk.as_object_mut().unwrap();
    c.remove("pack");
    c.remove("pack_offset");
    let body = serde_json::to_vec_pretty(&im).unwrap();
    let md = layout::sha256_digest(&body);
    let mpath = root.join(layout::blob_key(&md));
    std::fs::create_dir_all(mpath.parent().unwrap()).unwrap();
    std::fs::write(&mpath, &body).unwrap();
    let sk = forkd_hub::sign::load_secret_key(&w.p.join("keys/forkd.key")).unwrap();
    let subject = forkd_hub::sign::Subject::new("acme/snap", "1", &md);
    tag["digest"] = md.clone().into();
    tag["signature"] = forkd_hub::sign::sign(&sk, &body, &subject).unwrap().into();
    std::fs::write(&tpath, serde_json::to_vec(&tag).unwrap()).unwrap();
    let err = w.pull_refused(&["acme/snap:1", "--trust", &w.key], "corrupt");
    assert!(err.contains("memory.bin after download"), "{err}");
    assert!(!w.c.join("images/snap").exists());
    let hex = md.strip_prefix("sha256:").unwrap();
    assert!(
        !w.c.join("cache/partial").join(hex).exists(),
        "the untrusted download was kept"
    );
}

/// `forkd verify TAG` re-hashes a local image: exit 0 when it matches, exit 1 naming the file
/// when it does not, with --json for scripts.
#[test]
fn verify_finds_a_corrupt_file() {
    let w = World::new();
    let out = ok(&forkd(&w.p, &["verify", "snap"]));
    assert!(out.contains("memory.bin") && out.contains("ok"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&ok(&forkd(&w.p, &["verify", "snap", "--json"]))).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["files"].as_array().unwrap().len(), 3);
    corrupt(&w.p.join("images/snap/memory.bin"), 0, 16);
    let o = forkd(&w.p, &["verify", "snap"]);
    assert_eq!(o.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("MISMATCH"), "{stdout}");
    fails_with(&o, "does not match its manifest: memory.bin");
    let o = forkd(&w.p, &["verify", "snap", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let bad: Vec<_> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["ok"] == false)
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(bad, ["memory.bin"]);
    fails_with(&forkd(&w.p, &["verify", "nope"]), "no image tagged `nope`");
}

// ---- engine.json is untrusted input ---------------------------------------------------------

/// A snapshot with an engine.json (text given) beside a `mem_mib`-MiB memory.bin, installed
/// in `home` as `tag` through the store's staging API, the manifest saying `mem_mib`.
fn engine_snapshot(home: &Path, tag: &str, mem_mib: u64, engine_json: &str) {
    use forkd_store::{EngineInfo, Manifest, Store};
    let store = Store::open(home).unwrap();
    let staging = store.stage().unwrap();
    let dir = staging.dir().to_path_buf();
    let mem = std::fs::File::create(dir.join("memory.bin")).unwrap();
    mem.set_len(mem_mib << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&mem, &noise(5, 8192), 4096).unwrap();
    std::fs::write(dir.join("vmstate"), b"QEVM\0\0\0\x03state").unwrap();
    std::fs::write(dir.join("rootfs.ext4"), noise(6, 65536)).unwrap();
    std::fs::write(dir.join("vmlinuz"), noise(8, 4096)).unwrap();
    std::fs::write(dir.join("engine.json"), engine_json).unwrap();
    let engine = EngineInfo {
        name: "qemu".into(),
        version: "7.2.0".into(),
        machine_type: "pc-i440fx-7.2".into(),
        cpu_model: "qemu64".into(),
        accel_hint: None,
    };
    let m = Manifest::new(tag, "1", mem_mib, engine);
    commit_files(
        staging,
        tag,
        m,
        &[
            "memory.bin",
            "vmstate",
            "rootfs.ext4",
            "vmlinuz",
            "engine.json",
        ],
    );
}

fn engine_json(mem_mib: u64, cpu: &str) -> String {
    serde_json::json!({
        "format": 1, "layout": "forkd-pc-v1", "qemu_version": "7.2.0",
        "machine": "pc-i440fx-7.2", "cpu": cpu, "mem_mib": mem_mib, "vcpus": 1,
        "accel": "tcg", "cmdline": "console=ttyS0", "kernel": "vmlinuz",
        "rootfs": "rootfs.ext4", "memory": "memory.bin", "vmstate": "vmstate"
    })
    .to_string()
}

/// engine.json says 20 GiB of RAM while the manifest (and memory.bin) say 8 MiB: a fork
/// would budget for the wrong size. Refused at pull, nothing installed (before: installed).
#[test]
fn engine_json_that_lies_about_memory_is_refused_at_pull() {
    let w = World::new();
    engine_snapshot(&w.p, "liar", 8, &engine_json(20480, "qemu64"));
    w.push("liar", "acme/liar:1");
    let err = w.pull_refused(
        &["acme/liar:1", "--trust", &w.key, "--skip-compat-check"],
        "bad engine.json",
    );
    assert!(
        err.contains("mem_mib = 20480 but the manifest says memory_mib = 8"),
        "{err}"
    );
    // A consistent one installs.
    engine_snapshot(&w.p, "honest", 8, &engine_json(8, "qemu64"));
    w.push("honest", "acme/honest:1");
    ok(&w.pull(&["acme/honest:1", "--trust", &w.key, "--skip-compat-check"]));
}

/// The same checks at unpack: a `,property=` CPU, a RAM size whose byte count overflows
/// u64 (2^44 MiB), and a mismatch with the manifest are all refused, the store unchanged.
#[test]
fn engine_json_is_checked_at_unpack() {
    let w = World::new();
    for (tag, mem, spec, gist) in [
        (
            "cpuprop",
            8,
            engine_json(8, "qemu64,+vmx"),
            "not a plain QEMU model name",
        ),
        (
            "overflow",
            8,
            engine_json(1 << 44, "qemu64"),
            "out of range",
        ),
        (
            "mismatch",
            8,
            engine_json(16, "qemu64"),
            "mem_mib = 16 but the manifest says memory_mib = 8",
        ),
    ] {
        engine_snapshot(&w.p, tag, mem, &spec);
        let pack = w.p.join(format!("{tag}.forkd-snapshot.tar.zst"));
        ok(&forkd(&w.p, &["pack", tag, "-o", pack.to_str().unwrap()]));
        let before = store_state(&w.c);
        let err = fails_with(&forkd(&w.c, &["unpack", pack.to_str().unwrap()]), gist);
        assert!(err.contains("engine.json"), "{err}");
        assert_eq!(store_state(&w.c), before, "{tag}: the store changed");
        assert_no_staging(&w.c);
    }
}

// ---- The pull cache follows no links --------------------------------------------------------

/// Links planted in `cache/partial/<image>/` (a file) and as `cache/partial/<image>` itself (a
/// directory) are removed, never followed: their targets are untouched and the pull installs
/// the right bytes (before: pull overwrote the link's target).
#[test]
fn links_planted_in_the_pull_cache_are_not_followed() {
    let w = World::new();
    w.push("snap", "acme/snap:1");
    w.push("snap", "acme/snap:2");
    let victim_dir = tempfile::tempdir().unwrap();
    let victim = victim_dir.path().join("precious");
    std::fs::write(&victim, b"do not touch").unwrap();
    let partial = w.c.join("cache/partial");
    std::fs::create_dir_all(&partial).unwrap();
    let digest = |v: &str| {
        read_json(&tag_file(&w.root(), "acme", "snap", v))["digest"]
            .as_str()
            .unwrap()
            .strip_prefix("sha256:")
            .unwrap()
            .to_string()
    };
    // A file link inside the image's download directory.
    let d1 = partial.join(digest("1"));
    std::fs::create_dir_all(&d1).unwrap();
    std::os::unix::fs::symlink(&victim, d1.join("memory.bin")).unwrap();
    std::os::unix::fs::symlink(&victim, d1.join(".journal")).unwrap();
    ok(&w.pull(&["acme/snap:1", "--trust", &w.key]));
    assert_eq!(std::fs::read(&victim).unwrap(), b"do not touch");
    assert_eq!(tag_hashes(&w.c, "snap"), tag_hashes(&w.p, "snap"));

    // The download directory itself a link to another directory (both versions are the same
    // image, so pull into a new tag after removing the first).
    ok(&forkd(&w.c, &["rmi", "snap"]));
    let target_dir = victim_dir.path().join("dir");
    std::fs::create_dir(&target_dir).unwrap();
    std::fs::write(target_dir.join("memory.bin"), b"mine").unwrap();
    let _ = std::fs::remove_dir_all(&d1);
    std::os::unix::fs::symlink(&target_dir, &d1).unwrap();
    ok(&w.pull(&["acme/snap:2", "--trust", &w.key]));
    assert_eq!(
        std::fs::read(target_dir.join("memory.bin")).unwrap(),
        b"mine"
    );
    assert_eq!(std::fs::read_dir(&target_dir).unwrap().count(), 1);
    assert_eq!(tag_hashes(&w.c, "snap"), tag_hashes(&w.p, "snap"));
}

/// stdout and stderr of a successful command, for checking warnings.
fn ok_err(out: &std::process::Output) -> String {
    let stdout = ok(out);
    format!("{stdout}{}", String::from_utf8_lossy(&out.stderr))
}
