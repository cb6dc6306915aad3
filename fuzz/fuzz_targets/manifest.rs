//! Manifest::parse on arbitrary text: never panics; whatever it accepts re-serialises and
//! parses back to the same value.
#![no_main]

use forkd_store::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = Manifest::parse(text) {
        let again = m.to_toml().expect("a parsed manifest serialises");
        let back = Manifest::parse(&again).expect("a serialised manifest parses");
        assert_eq!(back, m);
    }
});
