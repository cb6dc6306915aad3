//! The local store: install, list, get, remove, overwrite, layout, sweeping, locking.

mod common;

use std::fs;

use common::{install, manifest_for, tree};
use forkd_store::{Overwrite, Store, StoreError, Tag};

fn tag(s: &str) -> Tag {
    Tag::parse(s).unwrap()
}

#[test]
fn install_list_get_remove() {
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    assert_eq!(
        fs::read_to_string(home.path().join("store.toml")).unwrap(),
        "layout = 1\n"
    );
    let snap = install(
        &store,
        "alpha",
        &[("memory.bin", b"mem"), ("vmstate", b"state!")],
    );
    assert_eq!(fs::read(snap.path("memory.bin")).unwrap(), b"mem");
    assert!(snap.path("manifest.toml").exists());
    install(&store, "beta", &[("vmstate", b"x")]);

    let list = store.list().unwrap();
    let tags: Vec<_> = list.iter().map(|i| i.tag.to_string()).collect();
    assert_eq!(tags, ["alpha", "beta"]);
    let manifest_len = fs::metadata(snap.path("manifest.toml")).unwrap().len();
    assert_eq!(list[0].apparent_size, 9 + manifest_len);
    assert!(list[0].disk_size > 0);

    let got = store.get(&tag("alpha")).unwrap();
    assert_eq!(got.manifest, snap.manifest);
    store.remove(&tag("alpha")).unwrap();
    assert!(matches!(
        store.get(&tag("alpha")),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.remove(&tag("alpha")),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.list().unwrap().len(), 1);
    // Nothing left behind in tmp/.
    assert_eq!(fs::read_dir(home.path().join("tmp")).unwrap().count(), 0);
}

#[test]
fn existing_tag_needs_force_and_force_replaces() {
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    install(&store, "img", &[("a", b"old")]);
    let before = tree(home.path());

    let st = store.stage().unwrap();
    fs::write(st.dir().join("b"), b"new").unwrap();
    let m = manifest_for("img", &[("b", b"new")]);
    let err = st.commit(&tag("img"), &m, Overwrite::No).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(
        tree(home.path()),
        before,
        "refused install changed the store"
    );

    let st = store.stage().unwrap();
    fs::write(st.dir().join("b"), b"new").unwrap();
    let snap = st.commit(&tag("img"), &m, Overwrite::Yes).unwrap();
    assert!(!snap.path("a").exists());
    assert_eq!(fs::read(snap.path("b")).unwrap(), b"new");
    assert_eq!(fs::read_dir(home.path().join("tmp")).unwrap().count(), 0);
}

#[test]
fn commit_checks_staged_files_against_manifest() {
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    let before = tree(home.path());
    for (files, listed, gist) in [
        (
            vec![("a", &b"1"[..])],
            vec![("a", &b"12"[..])],
            "bytes but the manifest says",
        ),
        (vec![], vec![("a", &b"1"[..])], "missing"),
        (
            vec![("a", &b"1"[..]), ("extra", &b"x"[..])],
            vec![("a", &b"1"[..])],
            "not listed",
        ),
    ] {
        let st = store.stage().unwrap();
        for (n, d) in &files {
            fs::write(st.dir().join(n), d).unwrap();
        }
        let err = st
            .commit(&tag("x"), &manifest_for("x", &listed), Overwrite::No)
            .unwrap_err();
        assert!(err.to_string().contains(gist), "{err}");
        assert_eq!(tree(home.path()), before);
    }
}

#[test]
fn dropped_staging_is_removed_and_stale_tmp_is_swept() {
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    let st = store.stage().unwrap();
    let dir = st.dir().to_path_buf();
    fs::write(dir.join("memory.bin"), b"partial").unwrap();
    // While the staging is alive, reopening the store must not sweep it.
    Store::open(home.path()).unwrap();
    assert!(dir.exists());
    drop(st);
    assert!(!dir.exists());

    // A crashed writer's leftovers: a dir with no live lock, and one whose lock file is free.
    fs::create_dir(home.path().join("tmp/stage-dead")).unwrap();
    fs::write(home.path().join("tmp/stage-dead/memory.bin"), b"junk").unwrap();
    fs::create_dir(home.path().join("tmp/stage-dead2")).unwrap();
    fs::write(home.path().join("tmp/stage-dead2.lock"), b"").unwrap();
    Store::open(home.path()).unwrap();
    assert_eq!(fs::read_dir(home.path().join("tmp")).unwrap().count(), 0);
}

#[test]
fn list_ignores_incomplete_and_foreign_entries() {
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    install(&store, "good", &[("a", b"1")]);
    fs::create_dir(home.path().join("images/no-manifest")).unwrap();
    fs::create_dir(home.path().join("images/.hidden")).unwrap();
    fs::create_dir(home.path().join("images/Bad Name")).unwrap();
    fs::write(home.path().join("images/afile"), b"").unwrap();
    let tags: Vec<_> = store
        .list()
        .unwrap()
        .into_iter()
        .map(|i| i.tag.to_string())
        .collect();
    assert_eq!(tags, ["good"]);
}

#[test]
fn newer_layout_is_refused() {
    let home = tempfile::tempdir().unwrap();
    fs::write(home.path().join("store.toml"), "layout = 2\n").unwrap();
    let err = Store::open(home.path()).unwrap_err();
    assert!(err.to_string().contains("uses layout 2"), "{err}");
    assert!(err.to_string().contains("upgrade forkd"), "{err}");
    fs::write(home.path().join("store.toml"), "nonsense").unwrap();
    assert!(Store::open(home.path()).is_err());
}

#[test]
fn waiting_writer_is_told_it_waits() {
    use std::sync::{Arc, Mutex};
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    // Hold the store lock from another file handle (flock locks are per open file).
    let held = fs::File::create(home.path().join("locks/store.lock")).unwrap();
    held.lock().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let store = store.with_lock_notice(move |p| seen2.lock().unwrap().push(p.to_path_buf()));
    let h = std::thread::spawn(move || install(&store, "waited", &[("a", b"1")]));
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!h.is_finished(), "install did not wait for the lock");
    assert_eq!(seen.lock().unwrap().len(), 1);
    held.unlock().unwrap();
    let snap = h.join().unwrap();
    assert_eq!(snap.tag.as_str(), "waited");
    assert!(seen.lock().unwrap()[0].ends_with("locks/store.lock"));
}
