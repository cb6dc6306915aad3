//! Done-when round trip: a synthetic snapshot (sparse 1 GiB memory.bin with scattered random
//! pages, a 256 MiB ext4 made by mkfs.ext4 from a directory of files, a state file) goes through
//! the real `forkd pack` and `forkd unpack` into another FORKD_HOME with identical bytes, and
//! the unpacked memory.bin stays sparse.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use forkd_store::sparse::hash_file;
use forkd_store::synth::{self, Synth};
use forkd_store::{Overwrite, Store, Tag};

fn forkd(home: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_forkd"))
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn synthetic_snapshot_round_trip() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();

    let store_a = Store::open(a.path()).unwrap();
    let st = store_a.stage().unwrap();
    let data_pages = synth::write_files(st.dir(), &Synth::default()).unwrap();
    let m = synth::manifest_for_dir(st.dir(), "synthetic", 1024).unwrap();
    let tag = Tag::parse("synthetic").unwrap();
    st.commit(&tag, &m, Overwrite::No).unwrap();

    let file = out.path().join("synthetic.forkd-snapshot.tar.zst");
    let o = forkd(
        a.path(),
        &["pack", "synthetic", "-o", file.to_str().unwrap()],
    );
    assert!(
        o.status.success(),
        "pack failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let packed = fs::metadata(&file).unwrap().len();
    assert!(packed < 200 << 20, "pack is {packed} bytes");

    let o = forkd(b.path(), &["unpack", file.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "unpack failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    let snap = Store::open(b.path()).unwrap().get(&tag).unwrap();
    assert_eq!(snap.manifest.files, m.files);
    for (name, e) in &m.files {
        // Hash the unpacked bytes independently of the unpacker's own check.
        let (size, digest) = hash_file(&File::open(snap.path(name)).unwrap()).unwrap();
        assert_eq!(size, e.size, "{name} size");
        assert_eq!(digest, e.sha256, "{name} sha256");
    }
    let data = data_pages * 4096;
    let on_disk = fs::metadata(snap.path("memory.bin")).unwrap().blocks() * 512;
    assert!(
        on_disk <= data + data / 10 && on_disk >= data - data / 10,
        "unpacked memory.bin takes {on_disk} bytes on disk for {data} bytes of non-zero data"
    );
}
