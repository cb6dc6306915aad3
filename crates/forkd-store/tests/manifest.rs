//! Manifest parsing: validation of untrusted text.

mod common;

use forkd_store::Manifest;

fn valid() -> String {
    common::manifest_for("python-numpy", &[("memory.bin", b"abc"), ("vmstate", b"")])
        .to_toml()
        .unwrap()
}

#[test]
fn round_trips() {
    let text = valid();
    let m = Manifest::parse(&text).unwrap();
    assert_eq!(m.to_toml().unwrap(), text);
    assert!(text.starts_with("format_version = 1\n"), "{text}");
    assert!(text.contains("[files.\"memory.bin\"]"), "{text}");
    assert_eq!(m.engine.machine_type, "pc-i440fx-7.2");
}

#[test]
fn unknown_fields_in_same_version_are_ignored() {
    let text = valid().replace(
        "format_version = 1\n",
        "format_version = 1\nfuture_field = 3\n",
    );
    Manifest::parse(&text).unwrap();
}

fn err_of(text: &str) -> String {
    Manifest::parse(text).unwrap_err().to_string()
}

#[test]
fn rejects_bad_manifests() {
    let v = valid();
    let sha = common::sha256_hex(b"abc");
    let cases: Vec<(String, &str)> = vec![
        ("this is = = not toml".into(), "not valid TOML"),
        (
            v.replace("format_version = 1", "format_version = 3"),
            "format version 3; this forkd understands up to 2 — upgrade forkd",
        ),
        (
            v.replace("format_version = 1", "format_version = 0"),
            "format_version",
        ),
        (v.replace("format_version = 1\n", ""), "format_version"),
        (
            v.replace("format_version = 1", "format_version = \"1\""),
            "format_version",
        ),
        (v.replace(&sha, &sha.to_uppercase()), "64 lowercase hex"),
        (v.replace(&sha, "abcd"), "64 lowercase hex"),
        (v.replace("size = 3", "size = 1099511627777"), "1 TiB"),
        (v.replace("size = 3", "size = -1"), "invalid"),
        (
            v.replace("[files.\"memory.bin\"]", "[files.\"manifest.toml\"]"),
            "must not list itself",
        ),
        (
            v.replace("[files.\"memory.bin\"]", "[files.\"../etc/passwd\"]"),
            "bad file name",
        ),
        (
            v.replace("[files.\"memory.bin\"]", "[files.\"a/b\"]"),
            "bad file name",
        ),
        (
            v.replace("[files.\"memory.bin\"]", "[files.\".hidden\"]"),
            "bad file name",
        ),
        (
            v.replace("[files.\"memory.bin\"]", "[files.\"\"]"),
            "bad file name",
        ),
        (
            v.replace("name = \"python-numpy\"", "name = \"\""),
            "`name` must not be empty",
        ),
        (
            v.replace("memory_mib = 256", "memory_mib = 0"),
            "memory_mib",
        ),
        (
            v.replace(
                "format_version = 1\n",
                "format_version = 1\nparent_tag = \"base\"\n",
            ),
            "parent_tag",
        ),
        (
            v.replace(
                "format_version = 1\n",
                "format_version = 1\nname = \"dup\"\n",
            ),
            "not valid TOML",
        ),
        (v.replace("[engine]", "[engine_gone]"), "engine"),
        (
            v.replace("created_at = ", "created_at = \"yesterday\"\nx = "),
            "invalid",
        ),
    ];
    for (text, gist) in cases {
        let e = err_of(&text);
        assert!(e.contains(gist), "expected {gist:?} in {e:?} for\n{text}");
    }
    // Two files whose sizes add up to more than the cap.
    let big = v
        .replace("size = 3", "size = 1099511627776")
        .replace("size = 0", "size = 1");
    assert!(err_of(&big).contains("1 TiB"));
}

#[test]
fn created_at_may_be_a_toml_datetime() {
    let v = valid();
    let line = v.lines().find(|l| l.starts_with("created_at")).unwrap();
    let bare = line.replace('"', "");
    let m = Manifest::parse(&v.replace(line, &bare)).unwrap();
    assert_eq!(m, Manifest::parse(&v).unwrap());
    // A local datetime (no offset) is not a point in time: refused.
    let local = "created_at = 2026-01-01T00:00:00";
    assert!(Manifest::parse(&v.replace(line, local)).is_err());
}
