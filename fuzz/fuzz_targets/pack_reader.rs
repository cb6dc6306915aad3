//! The pack reader on arbitrary input, into a real store in a temp dir. Never panics; a
//! rejected input leaves no image and no leftovers in tmp/.
//!
//! First byte 0: the rest is an uncompressed tar, compressed here (so the fuzzer explores the
//! tar and manifest checks rather than zstd). Otherwise the rest is the .zst stream itself.
#![no_main]

use std::sync::OnceLock;

use forkd_store::pack::{NoProgress, UnpackOptions, unpack_from_reader};
use forkd_store::{Overwrite, Store, Tag};
use libfuzzer_sys::fuzz_target;

struct Env {
    _dir: tempfile::TempDir,
    store: Store,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        Env { _dir: dir, store }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let zst;
    let input: &[u8] = if mode == 0 {
        zst = zstd::encode_all(rest, 1).unwrap();
        &zst
    } else {
        rest
    };
    let env = env();
    let opts = UnpackOptions {
        tag: Some(Tag::parse("fuzz").unwrap()),
        overwrite: Overwrite::Yes,
        // Keep each run small: a legitimately declared 1 TiB sparse file is valid but slow.
        max_total_size: 64 << 20,
    };
    let result = unpack_from_reader(&env.store, input, &opts, &NoProgress);
    let tmp = std::fs::read_dir(env.store.home().tmp_dir()).unwrap().count();
    assert_eq!(tmp, 0, "leftovers in tmp/ after {:?}", result.as_ref().err());
    if result.is_ok() {
        env.store.remove(&Tag::parse("fuzz").unwrap()).unwrap();
    }
    assert!(env.store.list().unwrap().is_empty());
});
