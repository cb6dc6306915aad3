//! A resumed pull reuses files written by an earlier process, so it cannot rely on "holes are
//! zeros because this pull created the file": it recomputes every file's sha256. Tampering with
//! the partial download between the two attempts must be caught, and nothing installed.

mod hub_common;
use hub_common::faulty::{Faulty, Mode};
use hub_common::*;
use std::os::unix::fs::FileExt;

#[test]
fn tampered_partial_download_is_caught_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let key = publisher(home, "snap", 48, 31);
    ok(&forkd(home, &["push", "snap", "acme/snap:v1"]));
    let root = home.join("hub");
    let total: u64 = data_blobs(&root)
        .iter()
        .map(|b| std::fs::metadata(b).unwrap().len())
        .sum();
    let server = Faulty::start(&root, Mode::CutAfter(total / 2));
    let c = tempfile::tempdir().unwrap();
    make_snapshot(c.path(), "existing", 4, 99);
    let args = [
        "pull",
        "acme/snap:v1",
        "--hub",
        &server.url,
        "--trust",
        &key,
        "--jobs",
        "2",
    ];
    fails_with(&forkd(c.path(), &args), "cannot download blob");

    // Flip one byte in every MiB of every partial file: journaled chunks and holes are not
    // downloaded again, so some of these bytes survive into the resumed pull.
    let partial = c.path().join("cache/partial");
    let dirs: Vec<_> = std::fs::read_dir(&partial)
        .expect("the interrupted pull kept its partial download")
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let mut flipped = 0;
    for e in std::fs::read_dir(&dirs[0]).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() == ".journal" {
            continue;
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let len = f.metadata().unwrap().len();
        for off in (0..len).step_by(1 << 20) {
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, off).unwrap();
            f.write_all_at(&[b[0] ^ 0x5a], off).unwrap();
            flipped += 1;
        }
    }
    assert!(flipped > 10, "only {flipped} bytes flipped");

    server.set_mode(Mode::Normal);
    let before = store_state(c.path());
    let err = fails_with(&forkd(c.path(), &args), "after download");
    assert!(err.contains("sha256"), "{err}");
    assert_eq!(store_state(c.path()), before, "the store changed");
    assert!(!c.path().join("images/snap").exists(), "a tag appeared");
    assert_no_staging(c.path());
    assert!(
        !dirs[0].exists(),
        "a partial download that failed its hash must be dropped"
    );

    // The next pull starts over, and it is fresh: no whole-file hash, and the bytes are right.
    ok(&forkd(c.path(), &args));
    assert_eq!(tag_hashes(c.path(), "snap"), tag_hashes(home, "snap"));
}
