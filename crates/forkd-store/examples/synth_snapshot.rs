//! Install the synthetic benchmark snapshot into a store (used by bench/pack.sh):
//! a sparse 1 GiB memory.bin with ~3% random pages (seeded), a 256 MiB ext4 made by
//! `mkfs.ext4 -d` from a directory of generated files, and a 320 KiB state file.
//! Prints the bytes of non-zero data in memory.bin.
//!
//! Usage: synth_snapshot STORE_DIR TAG [SEED]

use std::path::Path;

use forkd_store::synth::{Synth, install};
use forkd_store::{Store, Tag};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: synth_snapshot STORE_DIR TAG [SEED]");
        std::process::exit(2);
    }
    let spec = Synth {
        seed: args
            .get(3)
            .map_or(0x5eed, |s| s.parse().expect("SEED is a number")),
        ..Synth::default()
    };
    let store = Store::open(Path::new(&args[1])).expect("cannot open the store");
    let tag = Tag::parse(&args[2]).expect("bad tag");
    let (_, pages) = install(&store, &tag, &spec).unwrap_or_else(|e| panic!("{e}"));
    println!("{}", pages * 4096);
}
