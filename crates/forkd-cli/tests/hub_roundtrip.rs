//! Push to a real hub, pull into a fresh FORKD_HOME, and compare bytes: the embedded file://
//! hub and `forkd hub serve` on 127.0.0.1.

mod hub_common;
use hub_common::*;
use std::process::Command;

#[test]
fn embedded_file_hub_roundtrip() {
    let publisher_home = tempfile::tempdir().unwrap();
    let p = publisher_home.path();
    let key = publisher(p, "snap", 16, 1);
    let out = ok(&forkd(
        p,
        &[
            "push",
            "snap",
            "acme/snap:v1",
            "--description",
            "a test image",
        ],
    ));
    assert!(out.contains("pushed `snap` as acme/snap:v1"), "{out}");
    assert!(
        p.join("hub/forkd-hub.json").is_file(),
        "default hub is $FORKD_HOME/hub"
    );

    let consumer = tempfile::tempdir().unwrap();
    let c = consumer.path();
    let hub = format!("file://{}/hub", p.display());
    let out = ok(&forkd(
        c,
        &[
            "pull",
            "acme/snap:v1",
            "--hub",
            &hub,
            "--trust",
            &key,
            "--json",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["tag"], "snap");
    assert_eq!(v["verified"], true);
    assert_eq!(tag_hashes(c, "snap"), tag_hashes(p, "snap"));

    // Holes stay holes: memory.bin (16 MiB, 1/16 of pages filled) takes far less than 16 MiB.
    let blocks = std::os::unix::fs::MetadataExt::blocks(
        &std::fs::metadata(c.join("images/snap/memory.bin")).unwrap(),
    );
    assert!(
        blocks * 512 < 4 << 20,
        "memory.bin is not sparse: {} bytes on disk",
        blocks * 512
    );

    // Pulling again is a no-op; a digest pin resolves to the same image under another tag.
    let again = ok(&forkd(
        c,
        &["pull", "acme/snap:v1", "--hub", &hub, "--trust", &key],
    ));
    assert!(again.contains("up to date"), "{again}");
    let digest = v["digest"].as_str().unwrap().to_string();
    let pinned = format!("acme/snap@{digest}");
    let out = ok(&forkd(
        c,
        &[
            "pull", &pinned, "--tag", "pinned", "--hub", &hub, "--trust", &key, "--json",
        ],
    ));
    let v2: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        v2["downloaded_bytes"], 0,
        "everything came from the cache: {out}"
    );
    assert_eq!(tag_hashes(c, "pinned"), tag_hashes(p, "snap"));

    // The catalogue lists it.
    let found = ok(&forkd(c, &["search", "snap", "--hub", &hub, "--json"]));
    let list: serde_json::Value = serde_json::from_str(&found).unwrap();
    assert_eq!(list[0]["name"], "acme/snap");
    assert_eq!(list[0]["description"], "a test image");
    assert_eq!(list[0]["versions"][0]["version"], "v1");
    let text = ok(&forkd(c, &["search", "--hub", &hub]));
    assert!(text.contains("acme/snap") && text.contains(":v1"), "{text}");
}

#[test]
fn hub_serve_roundtrip_and_ranges() {
    let publisher_home = tempfile::tempdir().unwrap();
    let p = publisher_home.path();
    let key = publisher(p, "snap", 16, 2);
    let root = tempfile::tempdir().unwrap();
    let server = HubServer::start(root.path(), "s3cret-token");
    let tf = server.token_file.to_str().unwrap();
    let out = ok(&forkd(
        p,
        &[
            "push",
            "snap",
            "team/snap",
            "--hub",
            &server.url,
            "--token-file",
            tf,
        ],
    ));
    assert!(!out.contains("s3cret-token"));
    assert!(root.path().join("tags/team/snap/latest.json").is_file());

    let consumer = tempfile::tempdir().unwrap();
    let c = consumer.path();
    ok(&forkd(
        c,
        &["pull", "team/snap", "--hub", &server.url, "--trust", &key],
    ));
    assert_eq!(tag_hashes(c, "snap"), tag_hashes(p, "snap"));

    // Anonymous Range reads: 206 with Content-Range and Accept-Ranges.
    let url = format!("{}forkd-hub.json", server.url);
    let head = Command::new("curl")
        .args(["-s", "-D", "-", "-o", "/dev/null", "-r", "0-4", &url])
        .output()
        .expect("curl is missing: install the curl package");
    let h = String::from_utf8_lossy(&head.stdout).to_lowercase();
    assert!(h.starts_with("http/1.1 206"), "{h}");
    assert!(
        h.contains("content-range: bytes 0-4/") && h.contains("accept-ranges: bytes"),
        "{h}"
    );
}
