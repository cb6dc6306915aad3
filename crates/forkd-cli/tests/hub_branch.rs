//! Branches on a hub, with no VM: a synthetic parent and synthetic branches of it (a valid
//! format 2 engine.json and a manifest whose parent_digest is the parent's content digest).
//! A push of a branch pushes only its own chunks and its missing parents; a pull of a branch
//! pulls its missing parents first, each verified; a hostile hub's chain (missing parent,
//! wrong parent, cycle) is refused with the store left as it was. Also `rmi` of a parent,
//! `pack`/`unpack` of a branch and `images` showing the chain.

mod hub_common;
use forkd_hub::layout;
use forkd_store::{EngineInfo, Manifest, Store, Tag};
use hub_common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MEM_MIB: u64 = 16;

/// Install in `home` a branch `tag` of the installed image `parent`: its own memory pages
/// (`memory.diff`, sparse, the machine's size, with the page bitmap `memory.pages`), a disk of
/// changes (`rootfs.qcow2`), device state and a format 2 engine.json naming the parent.
fn make_branch(home: &Path, tag: &str, parent: &str, seed: u64) -> Manifest {
    let store = Store::open(home).unwrap();
    let parent = store.get(&Tag::parse(parent).unwrap()).unwrap();
    let staging = store.stage().unwrap();
    let dir = staging.dir().to_path_buf();
    let size = MEM_MIB << 20;
    let pages = size / 4096;
    let mem = std::fs::File::create(dir.join("memory.diff")).unwrap();
    mem.set_len(size).unwrap();
    let mut bitmap = vec![0u8; (pages / 8) as usize];
    // A few dirty pages, at places that depend on the seed.
    for i in 0..24u64 {
        let page = (seed * 131 + i * 97) % pages;
        mem.write_all_at(&noise(seed * 1000 + i, 4096), page * 4096)
            .unwrap();
        bitmap[(page / 8) as usize] |= 1 << (page % 8);
    }
    drop(mem);
    std::fs::write(dir.join("memory.pages"), &bitmap).unwrap();
    std::fs::write(dir.join("rootfs.qcow2"), noise(seed + 7, 200_000)).unwrap();
    std::fs::write(dir.join("vmstate"), noise(seed + 8, 50_000)).unwrap();
    let engine_json = serde_json::json!({
        "format": 2, "layout": "forkd-pc-v1", "qemu_version": "7.2.0",
        "machine": "pc-i440fx-7.2", "cpu": "qemu64", "mem_mib": MEM_MIB, "vcpus": 1,
        "accel": "tcg", "cmdline": "console=ttyS0", "kernel": "vmlinuz",
        "rootfs": "rootfs.qcow2", "memory": "memory.diff", "vmstate": "vmstate",
        "parent": { "digest": parent.manifest.digest(), "pages": "memory.pages" }
    });
    std::fs::write(dir.join("engine.json"), engine_json.to_string()).unwrap();
    let engine = EngineInfo {
        name: "qemu".into(),
        version: "7.2.0".into(),
        machine_type: "pc-i440fx-7.2".into(),
        cpu_model: "qemu64".into(),
        accel_hint: None,
    };
    let mut m = Manifest::new(tag, "1", MEM_MIB, engine);
    let made_from = format!("{}:{}", parent.manifest.name, parent.manifest.version);
    m.set_parent(&made_from, &parent.manifest);
    commit_files(
        staging,
        tag,
        m,
        &[
            "memory.diff",
            "memory.pages",
            "rootfs.qcow2",
            "vmstate",
            "engine.json",
        ],
    )
}

fn manifest_of(home: &Path, tag: &str) -> Manifest {
    Store::open(home)
        .unwrap()
        .get(&Tag::parse(tag).unwrap())
        .unwrap()
        .manifest
}

/// Every blob of a hub, with its size.
fn blobs(root: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(root.join("blobs/sha256")) else {
        return out;
    };
    for a in rd {
        for b in std::fs::read_dir(a.unwrap().path()).unwrap() {
            let p = b.unwrap().path();
            let hex = p.file_name().unwrap().to_str().unwrap().to_string();
            out.insert(
                format!("sha256:{hex}"),
                std::fs::metadata(&p).unwrap().len(),
            );
        }
    }
    out
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

/// The image manifest a tag file of the hub at `root` points at, and its digest.
fn image_manifest(
    root: &Path,
    owner: &str,
    name: &str,
    version: &str,
) -> (String, serde_json::Value) {
    let tag = read_json(&root.join(layout::version_tag_key(owner, name, version)));
    let digest = tag["digest"].as_str().unwrap().to_string();
    let im = hub_common::manifest_json(&root.join(layout::blob_key(&digest)));
    (digest, im)
}

fn chunk_digests(im: &serde_json::Value) -> BTreeSet<String> {
    im["files"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| f["chunks"].as_array().unwrap())
        .map(|c| c["digest"].as_str().unwrap().to_string())
        .collect()
}

/// Each chunk's digest and the blob that holds it (its pack, or itself).
fn chunk_places(im: &serde_json::Value) -> BTreeMap<String, String> {
    im["files"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| f["chunks"].as_array().unwrap())
        .map(|c| {
            let d = c["digest"].as_str().unwrap().to_string();
            let blob = c["pack"].as_str().map_or(d.clone(), str::to_string);
            (d, blob)
        })
        .collect()
}

/// A publisher with a key, the image `tiny` and its branch `tiny-b`; a fresh consumer.
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
        let key = publisher(pd.path(), "tiny", MEM_MIB, 1);
        make_branch(pd.path(), "tiny-b", "tiny", 2);
        World {
            p: pd.path().to_path_buf(),
            c: cd.path().to_path_buf(),
            _p: pd,
            _c: cd,
            key,
        }
    }
    fn root(&self) -> PathBuf {
        self.p.join("hub")
    }
    fn hub(&self) -> String {
        format!("file://{}/hub", self.p.display())
    }
    fn push(&self, tag: &str, reference: &str) -> serde_json::Value {
        let out = ok(&forkd(&self.p, &["push", tag, reference, "--json"]));
        serde_json::from_str(out.trim()).unwrap()
    }
    fn pull(&self, reference: &str, extra: &[&str]) -> std::process::Output {
        let hub = self.hub();
        let mut a = vec!["pull", reference, "--hub", &hub, "--trust", &self.key];
        a.extend_from_slice(extra);
        forkd(&self.c, &a)
    }
    /// The pull fails saying `gist`, and the consumer's store is as it was.
    fn pull_refused(&self, reference: &str, gist: &str) -> String {
        let before = store_state(&self.c);
        let err = fails_with(&self.pull(reference, &[]), gist);
        assert_eq!(store_state(&self.c), before, "the store changed");
        assert_no_staging(&self.c);
        err
    }
    /// Re-sign the tag file `owner/name:version` (and its digest pin) for a new image
    /// manifest `im`, written as a blob, with the publisher's key: a hostile but validly
    /// signed hub.
    fn publish_manifest(
        &self,
        owner: &str,
        name: &str,
        version: &str,
        im: &serde_json::Value,
    ) -> String {
        let root = self.root();
        let body = serde_json::to_vec_pretty(im).unwrap();
        let digest = layout::sha256_digest(&body);
        let bpath = root.join(layout::blob_key(&digest));
        std::fs::create_dir_all(bpath.parent().unwrap()).unwrap();
        std::fs::write(&bpath, &body).unwrap();
        let sk = forkd_hub::sign::load_secret_key(&self.p.join("keys/forkd.key")).unwrap();
        let image = format!("{owner}/{name}");
        let subject = forkd_hub::sign::Subject::new(&image, version, &digest);
        let tag = serde_json::json!({
            "layout": 1, "image": image, "digest": digest, "size": 1,
            "signature": forkd_hub::sign::sign(&sk, &body, &subject).unwrap(),
        });
        for key in [
            layout::version_tag_key(owner, name, version),
            layout::digest_tag_key(owner, name, &digest),
        ] {
            let p = root.join(key);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, serde_json::to_vec(&tag).unwrap()).unwrap();
        }
        digest
    }
}

#[test]
fn push_of_a_branch_uploads_only_its_own_chunks_when_the_parent_is_on_the_hub() {
    let w = World::new();
    let root = w.root();
    let parent = w.push("tiny", "acme/tiny:1");
    assert_eq!(parent["parents"].as_array().unwrap().len(), 0);
    let before = blobs(&root);
    let parent_tag_file = std::fs::read(root.join("tags/acme/tiny/1.json")).unwrap();

    let out = w.push("tiny-b", "acme/tiny-b");
    let parents = out["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 1, "{out}");
    assert_eq!(parents[0]["tag"], "tiny");
    assert_eq!(parents[0]["reference"], "acme/tiny:1");
    assert_eq!(
        parents[0]["pushed"], false,
        "the parent was already there: {out}"
    );
    assert_eq!(parents[0]["digest"], parent["digest"]);
    assert_eq!(
        std::fs::read(root.join("tags/acme/tiny/1.json")).unwrap(),
        parent_tag_file,
        "the parent's tag was rewritten"
    );

    // The new blobs are the packs of exactly the branch's own chunks (and its image
    // manifest), and what was uploaded is exactly their bytes.
    let after = blobs(&root);
    let new: BTreeSet<String> = after
        .keys()
        .filter(|k| !before.contains_key(*k))
        .cloned()
        .collect();
    let (bdigest, bim) = image_manifest(&root, "acme", "tiny-b", "latest");
    let (_, pim) = image_manifest(&root, "acme", "tiny", "1");
    let own: BTreeSet<String> = chunk_digests(&bim)
        .difference(&chunk_digests(&pim))
        .cloned()
        .collect();
    assert!(!own.is_empty());
    let places = chunk_places(&bim);
    let in_new: BTreeSet<String> = places
        .iter()
        .filter(|(_, blob)| new.contains(*blob))
        .map(|(d, _)| d.clone())
        .collect();
    assert_eq!(in_new, own, "chunks stored anew besides the branch's own");
    assert!(
        places.values().all(|b| after.contains_key(b)),
        "a chunk names a blob the hub lacks"
    );
    let packs: BTreeSet<String> = new.iter().filter(|d| **d != bdigest).cloned().collect();
    assert!(packs.iter().all(|p| places.values().any(|b| b == p)));
    let own_bytes: u64 = packs.iter().map(|d| after[d]).sum();
    assert_eq!(out["uploaded_bytes"].as_u64().unwrap(), own_bytes, "{out}");
    let parent_bytes: u64 = chunk_places(&pim)
        .values()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|d| after[d])
        .sum();
    assert!(
        own_bytes * 4 < parent_bytes,
        "the branch ({own_bytes} bytes) should cost far less than its parent ({parent_bytes})"
    );

    // The branch names its parent by its digest pin, which exists.
    assert_eq!(bim["parent"]["image"], "acme/tiny");
    assert_eq!(bim["parent"]["version"], "1");
    assert_eq!(bim["parent"]["digest"], parent["digest"]);
    let pin = layout::digest_tag_key("acme", "tiny", parent["digest"].as_str().unwrap());
    assert!(root.join(pin).is_file());
    // A plain image has no `parent` field at all (older readers see nothing new).
    assert!(pim.get("parent").is_none(), "{pim}");
}

#[test]
fn push_of_a_branch_pushes_its_missing_parents_first() {
    let w = World::new();
    let root = w.root();
    let out = w.push("tiny-b", "acme/tiny-b:v1");
    let parents = out["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 1, "{out}");
    assert_eq!(parents[0]["pushed"], true);
    assert_eq!(parents[0]["reference"], "acme/tiny:1");
    assert!(parents[0]["uploaded_bytes"].as_u64().unwrap() > 0);
    let (pdigest, _) = image_manifest(&root, "acme", "tiny", "1");
    assert_eq!(parents[0]["digest"], pdigest.as_str());
    assert!(
        root.join(layout::digest_tag_key("acme", "tiny", &pdigest))
            .is_file()
    );
    let (_, bim) = image_manifest(&root, "acme", "tiny-b", "v1");
    assert_eq!(bim["parent"]["digest"], pdigest.as_str());
    let catalog = read_json(&root.join("catalog.json"));
    let names: Vec<&str> = catalog["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme/tiny", "acme/tiny-b"]);

    // A branch of the branch: both parents are on the hub by content. `tiny` is reused
    // as it is; `tiny-b` (pushed as :v1, looked up as :1, its manifest's version) is pushed
    // again as acme/tiny-b:1 without a single chunk uploaded.
    make_branch(&w.p, "tiny-c", "tiny-b", 3);
    let before = blobs(&root);
    let out = w.push("tiny-c", "acme/tiny-c");
    let parents = out["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 2, "{out}");
    assert_eq!(parents[0]["tag"], "tiny");
    assert_eq!(parents[0]["pushed"], false);
    assert_eq!(parents[1]["tag"], "tiny-b");
    assert_eq!(parents[1]["reference"], "acme/tiny-b:1");
    assert_eq!(parents[1]["uploaded_bytes"], 0, "{out}");
    let (_, bim1) = image_manifest(&root, "acme", "tiny-b", "1");
    assert_eq!(bim1["parent"]["digest"], pdigest.as_str());
    let (_, cim) = image_manifest(&root, "acme", "tiny-c", "latest");
    assert_eq!(cim["parent"]["image"], "acme/tiny-b");
    let new = blobs(&root).len() - before.len();
    let own = chunk_digests(&cim)
        .difference(&chunk_digests(&bim1))
        .count();
    // tiny-c's own chunks, its image manifest and tiny-b:1's image manifest.
    assert!(new <= own + 2, "{new} new blobs for {own} own chunks");

    // Pushing it again finds everything on the hub.
    let again = w.push("tiny-c", "acme/tiny-c");
    assert_eq!(again["uploaded_bytes"], 0, "{again}");
    assert!(
        again["parents"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["pushed"] == false),
        "{again}"
    );
}

#[test]
fn pull_of_a_branch_pulls_its_parents_first_each_verified() {
    let w = World::new();
    make_branch(&w.p, "tiny-c", "tiny-b", 3);
    w.push("tiny-c", "acme/tiny-c");
    let out = ok(&w.pull("acme/tiny-c", &["--json"]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["tag"], "tiny-c");
    assert_eq!(v["verified"], true);
    let parents = v["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 2, "{v}");
    assert_eq!(parents[0]["tag"], "tiny", "the root first: {v}");
    assert_eq!(parents[1]["tag"], "tiny-b");
    assert!(parents.iter().all(|p| p["verified"] == true), "{v}");
    assert!(
        parents[0]["reference"]
            .as_str()
            .unwrap()
            .starts_with("acme/tiny@sha256:"),
        "{v}"
    );
    for tag in ["tiny", "tiny-b", "tiny-c"] {
        assert_eq!(tag_hashes(&w.c, tag), tag_hashes(&w.p, tag), "{tag}");
        ok(&forkd(&w.c, &["verify", tag]));
    }
    // Each link's parent is the installed parent, by content.
    let (a, b, c) = (
        manifest_of(&w.c, "tiny"),
        manifest_of(&w.c, "tiny-b"),
        manifest_of(&w.c, "tiny-c"),
    );
    assert_eq!(b.parent_digest.as_deref(), Some(a.digest().as_str()));
    assert_eq!(c.parent_digest.as_deref(), Some(b.digest().as_str()));
    assert_eq!(parents[0]["content_digest"], a.digest().as_str());
    // Provenance of a parent: pulled from acme, verified.
    let origin = read_json(&w.c.join("images/tiny/origin.json"));
    assert_eq!(origin["owner"], "acme");
    assert_eq!(origin["verified"], true);
    assert_eq!(origin["version"], "1");

    // `images` shows the chain.
    let text = ok(&forkd(&w.c, &["images"]));
    let line = text.lines().find(|l| l.starts_with("tiny-c ")).unwrap();
    assert!(line.contains("\u{2190} tiny-b"), "{text}");
    assert!(text.lines().next().unwrap().contains("PARENT"), "{text}");
    let list: serde_json::Value =
        serde_json::from_str(&ok(&forkd(&w.c, &["images", "--json"]))).unwrap();
    let entry = |t: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|i| i["tag"] == t)
            .unwrap()
            .clone()
    };
    assert_eq!(entry("tiny")["parent"], serde_json::Value::Null);
    assert_eq!(entry("tiny-b")["parent"]["tag"], "tiny:1");
    assert_eq!(entry("tiny-b")["parent"]["digest"], a.digest().as_str());
    assert_eq!(entry("tiny-b")["parent"]["local_tag"], "tiny");

    // Again: up to date, no parent pulled. A consumer that has the parent under another tag
    // pulls only the branch.
    let again: serde_json::Value =
        serde_json::from_str(ok(&w.pull("acme/tiny-c", &["--json"])).trim()).unwrap();
    assert_eq!(again["up_to_date"], true);
    assert_eq!(again["parents"].as_array().unwrap().len(), 0);
    let other = tempfile::tempdir().unwrap();
    let hub = w.hub();
    ok(&forkd(
        other.path(),
        &[
            "pull",
            "acme/tiny:1",
            "--tag",
            "base",
            "--hub",
            &hub,
            "--trust",
            &w.key,
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(
        ok(&forkd(
            other.path(),
            // pushed as tiny-c's parent: NAME:VERSION of its manifest
            &[
                "pull",
                "acme/tiny-b:1",
                "--hub",
                &hub,
                "--trust",
                &w.key,
                "--json",
            ],
        ))
        .trim(),
    )
    .unwrap();
    assert_eq!(v["parents"].as_array().unwrap().len(), 0, "{v}");
    assert!(!other.path().join("images/tiny").exists());
}

#[test]
fn a_parent_never_replaces_a_local_tag() {
    let w = World::new();
    w.push("tiny-b", "acme/tiny-b");
    // The consumer already has another image tagged `tiny`.
    make_snapshot(&w.c, "tiny", 4, 77);
    let mine = tag_hashes(&w.c, "tiny");
    let v: serde_json::Value =
        serde_json::from_str(ok(&w.pull("acme/tiny-b", &["--json"])).trim()).unwrap();
    let ptag = v["parents"][0]["tag"].as_str().unwrap().to_string();
    let content = manifest_of(&w.p, "tiny").digest();
    assert_eq!(ptag, format!("tiny-{}", &content[7..19]), "{v}");
    assert_eq!(
        tag_hashes(&w.c, "tiny"),
        mine,
        "the local tiny was replaced"
    );
    assert_eq!(tag_hashes(&w.c, &ptag), tag_hashes(&w.p, "tiny"));
}

#[test]
fn a_parent_missing_locally_and_on_the_hub_is_a_clear_error() {
    let w = World::new();
    w.push("tiny-b", "acme/tiny-b");
    // The hub loses every tag of the parent (its blobs stay: only the pin can find them).
    std::fs::remove_dir_all(w.root().join("tags/acme/tiny")).unwrap();
    make_snapshot(&w.c, "existing", 4, 99);
    let err = w.pull_refused("acme/tiny-b", "neither in the local store nor on the hub");
    assert!(err.contains("tiny:1"), "{err}");
    assert!(err.contains("hint:"), "{err}");

    // A push of a branch whose parent is not installed is refused, with a hint.
    ok(&forkd(&w.p, &["rmi", "--force", "tiny"]));
    let err = fails_with(
        &forkd(&w.p, &["push", "tiny-b", "acme/tiny-b:2"]),
        "which is not in the local store",
    );
    assert!(err.contains("hint:"), "{err}");
    assert!(!w.root().join("tags/acme/tiny-b/2.json").exists());
}

#[test]
fn a_parent_whose_digest_does_not_match_is_refused() {
    let w = World::new();
    make_snapshot(&w.p, "other", MEM_MIB, 5);
    w.push("other", "acme/other:1");
    w.push("tiny-b", "acme/tiny-b");
    // The hostile hub points the branch's parent at another (validly signed) image.
    let (odigest, _) = image_manifest(&w.root(), "acme", "other", "1");
    let (_, mut bim) = image_manifest(&w.root(), "acme", "tiny-b", "latest");
    bim["parent"] = serde_json::json!({"image": "acme/other", "version": "1", "digest": odigest});
    w.publish_manifest("acme", "tiny-b", "latest", &bim);
    make_snapshot(&w.c, "existing", 4, 99);
    let err = w.pull_refused("acme/tiny-b", "parent digest mismatch");
    assert!(err.contains("acme/other@"), "{err}");
    assert!(!w.c.join("images/other").exists());
}

#[test]
fn a_cycle_in_the_chain_is_refused() {
    let w = World::new();
    w.push("tiny-b", "acme/tiny-b");
    let root = w.root();
    // A hostile parent: tiny's files, but its manifest.toml says it is a branch of itself,
    // and its image manifest names the real tiny as its parent.
    let (pdigest, mut pim) = image_manifest(&root, "acme", "tiny", "1");
    let mut m = Manifest::parse(pim["manifest_toml"].as_str().unwrap()).unwrap();
    let own = m.clone();
    m.set_parent("tiny:1", &own);
    pim["manifest_toml"] = m.to_toml().unwrap().into();
    pim["parent"] = serde_json::json!({"image": "acme/tiny", "version": "1", "digest": pdigest});
    let looped = w.publish_manifest("acme", "tiny", "2", &pim);
    let (_, mut bim) = image_manifest(&root, "acme", "tiny-b", "latest");
    bim["parent"] = serde_json::json!({"image": "acme/tiny", "version": "2", "digest": looped});
    w.publish_manifest("acme", "tiny-b", "latest", &bim);
    let err = w.pull_refused("acme/tiny-b", "a cycle");
    assert!(err.contains("loops back"), "{err}");
    assert!(!w.c.join("images").join("tiny").exists());
}

#[test]
fn rmi_of_a_parent_is_refused_and_force_removes_it() {
    let w = World::new();
    let o = forkd(&w.p, &["rmi", "tiny"]);
    let err = fails_with(
        &o,
        "`tiny` is the parent of 1 branch(es) that cannot fork without it: tiny-b",
    );
    assert!(
        err.contains("hint:") && err.contains("rmi --force tiny"),
        "{err}"
    );
    assert!(w.p.join("images/tiny/manifest.toml").is_file());
    let text = ok(&forkd(&w.p, &["images"]));
    assert!(text.contains("\u{2190} tiny"), "{text}");
    // The branch itself goes without --force.
    make_branch(&w.p, "tiny-x", "tiny", 9);
    ok(&forkd(&w.p, &["rmi", "tiny-x"]));
    ok(&forkd(&w.p, &["rmi", "--force", "tiny"]));
    assert!(!w.p.join("images/tiny").exists());
    let text = ok(&forkd(&w.p, &["images"]));
    assert!(text.contains("tiny:1 (MISSING"), "{text}");
}

#[test]
fn pack_of_a_branch_is_refused_and_unpack_needs_the_parent() {
    let w = World::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b.forkd-snapshot.tar.zst");
    let o = forkd(&w.p, &["pack", "tiny-b", "-o", out.to_str().unwrap()]);
    let err = fails_with(&o, "is a branch of tiny:1");
    assert!(
        err.contains("hint:") && err.contains("forkd push tiny-b"),
        "{err}"
    );
    assert!(err.contains("forkd pack tiny:1"), "{err}");
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "a temp file was left"
    );
    // The parent packs as always.
    ok(&forkd(&w.p, &["pack", "tiny", "-o", out.to_str().unwrap()]));

    // A pack of a branch made by other means (tar + zstd, as docs/PACK-FORMAT.md shows) is
    // refused where its parent is not installed, and installed where it is.
    let img = w.p.join("images/tiny-b");
    let branch_pack = dir.path().join("tiny-b.forkd-snapshot.tar.zst");
    let script = format!(
        "tar --format=gnu --sparse -C {} -cf - manifest.toml engine.json memory.diff memory.pages rootfs.qcow2 vmstate | zstd -q -3 -o {}",
        img.display(),
        branch_pack.display()
    );
    let st = std::process::Command::new("sh")
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(st.success());
    make_snapshot(&w.c, "existing", 4, 99);
    let before = store_state(&w.c);
    let err = fails_with(
        &forkd(&w.c, &["unpack", branch_pack.to_str().unwrap()]),
        "not in the local store",
    );
    assert!(err.contains("hint:") && err.contains("tiny:1"), "{err}");
    assert_eq!(store_state(&w.c), before);
    assert_no_staging(&w.c);
    ok(&forkd(&w.c, &["unpack", out.to_str().unwrap()]));
    ok(&forkd(&w.c, &["unpack", branch_pack.to_str().unwrap()]));
    assert_eq!(tag_hashes(&w.c, "tiny-b"), tag_hashes(&w.p, "tiny-b"));
}

/// A parent signed by a key trusted for another owner only is refused: each link is checked
/// with the trust rules of its own OWNER (here a hostile hub moved the parent to `evil/`,
/// same key, same content).
#[test]
fn each_parent_is_checked_with_its_own_owners_trust() {
    let w = World::new();
    w.push("tiny-b", "acme/tiny-b");
    let root = w.root();
    let (_, pim) = image_manifest(&root, "acme", "tiny", "1");
    let moved = w.publish_manifest("evil", "tiny", "1", &pim);
    let (_, mut bim) = image_manifest(&root, "acme", "tiny-b", "latest");
    bim["parent"] = serde_json::json!({"image": "evil/tiny", "version": "1", "digest": moved});
    w.publish_manifest("acme", "tiny-b", "latest", &bim);
    let err = w.pull_refused("acme/tiny-b", "signature check failed for evil/tiny@");
    assert!(!w.c.join("images/tiny").exists(), "{err}");
}

/// Over `forkd hub serve`: a parent already on the hub without its digest pin (e.g. the pin
/// was lost) gets the pin written by the push of its branch, through the server's checks, and
/// the chain pulls from the server.
#[test]
fn chain_through_hub_serve() {
    let w = World::new();
    let root = tempfile::tempdir().unwrap();
    let server = HubServer::start(root.path(), "tok3n");
    let tf = server.token_file.to_str().unwrap();
    let push = |tag: &str, reference: &str| -> serde_json::Value {
        let out = ok(&forkd(
            &w.p,
            &[
                "push",
                tag,
                reference,
                "--hub",
                &server.url,
                "--token-file",
                tf,
                "--json",
            ],
        ));
        serde_json::from_str(out.trim()).unwrap()
    };
    let parent = push("tiny", "acme/tiny:1");
    let pin = root.path().join(layout::digest_tag_key(
        "acme",
        "tiny",
        parent["digest"].as_str().unwrap(),
    ));
    std::fs::remove_file(&pin).unwrap();
    let out = push("tiny-b", "acme/tiny-b");
    assert_eq!(out["parents"][0]["pushed"], false, "{out}");
    assert!(pin.is_file(), "the pin was not written again");
    let v: serde_json::Value = serde_json::from_str(
        ok(&forkd(
            &w.c,
            &[
                "pull",
                "acme/tiny-b",
                "--hub",
                &server.url,
                "--trust",
                &w.key,
                "--json",
            ],
        ))
        .trim(),
    )
    .unwrap();
    assert_eq!(v["parents"][0]["tag"], "tiny", "{v}");
    assert_eq!(tag_hashes(&w.c, "tiny-b"), tag_hashes(&w.p, "tiny-b"));
    assert_eq!(tag_hashes(&w.c, "tiny"), tag_hashes(&w.p, "tiny"));
}

#[test]
fn a_chain_deeper_than_16_is_refused_before_anything_starts() {
    let w = World::new();
    let mut parent = "tiny-b".to_string();
    for i in 0..17 {
        let tag = format!("deep{i}");
        make_branch(&w.p, &tag, &parent, 100 + i);
        parent = tag;
    }
    let o = forkd(&w.p, &["fork", "--tag", &parent, "-n", "1"]);
    fails_with(&o, "more than 16 branches deep");
    assert!(
        std::fs::read_dir(w.p.join("run"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "a child was started"
    );
}
