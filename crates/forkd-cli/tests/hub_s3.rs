//! Push to and pull from a real S3-compatible server (Garage), and pull anonymously over its
//! website endpoint. Needs a running Garage: `scripts/garage-start.sh ENV_FILE` and
//! `FORKD_TEST_S3_ENV=ENV_FILE` (what .ci/run does). Without it these tests fail, never skip.

mod hub_common;
use hub_common::*;
use std::collections::HashMap;

fn s3_env() -> HashMap<String, String> {
    let path = std::env::var("FORKD_TEST_S3_ENV").unwrap_or_else(|_| {
        panic!(
            "FORKD_TEST_S3_ENV is not set: run `scripts/garage-start.sh /tmp/garage.env` first and \
             set FORKD_TEST_S3_ENV=/tmp/garage.env (scripts/test.sh does both)"
        )
    });
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("cannot read FORKD_TEST_S3_ENV={path}: {e}; run scripts/garage-start.sh {path}")
    });
    let env: HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
        "FORKD_TEST_S3_BUCKET",
    ] {
        assert!(
            env.contains_key(k),
            "{path} lacks {k}; re-run scripts/garage-start.sh"
        );
    }
    env
}

fn run(
    home: &std::path::Path,
    args: &[&str],
    env: &HashMap<String, String>,
) -> std::process::Output {
    let pairs: Vec<(&str, &str)> = env
        .iter()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    forkd_env(home, args, &pairs)
}

fn unique_prefix(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("t-{tag}-{}-{nanos}", std::process::id())
}

#[test]
fn garage_s3_push_pull_and_anonymous_website_pull() {
    let env = s3_env();
    let bucket = &env["FORKD_TEST_S3_BUCKET"];
    let prefix = unique_prefix("rt");
    let hub = format!("s3://{bucket}/{prefix}");

    let publisher_home = tempfile::tempdir().unwrap();
    let p = publisher_home.path();
    let key = publisher(p, "snap", 24, 3);
    let out = ok(&run(
        p,
        &["push", "snap", "garage/snap:1.0", "--hub", &hub],
        &env,
    ));
    assert!(
        !out.contains(&env["AWS_SECRET_ACCESS_KEY"]),
        "secret leaked: {out}"
    );

    // Signed reads over the S3 API.
    let c1 = tempfile::tempdir().unwrap();
    ok(&run(
        c1.path(),
        &["pull", "garage/snap:1.0", "--hub", &hub, "--trust", &key],
        &env,
    ));
    assert_eq!(tag_hashes(c1.path(), "snap"), tag_hashes(p, "snap"));

    // Anonymous reads over the website endpoint (a CDN's shape): no AWS variables at all.
    let web = format!("{}{prefix}/", env["FORKD_TEST_S3_WEB"]);
    let c2 = tempfile::tempdir().unwrap();
    ok(&forkd(
        c2.path(),
        &["pull", "garage/snap:1.0", "--hub", &web, "--trust", &key],
    ));
    assert_eq!(tag_hashes(c2.path(), "snap"), tag_hashes(p, "snap"));
    let found = ok(&forkd(c2.path(), &["search", "--hub", &web, "--json"]));
    assert!(found.contains("garage/snap"), "{found}");
}

#[test]
fn garage_s3_api_anonymous_read_is_403() {
    let env = s3_env();
    let bucket = &env["FORKD_TEST_S3_BUCKET"];
    let prefix = unique_prefix("anon");
    let p = tempfile::tempdir().unwrap();
    make_snapshot(p.path(), "snap", 8, 4);
    ok(&run(
        p.path(),
        &[
            "push",
            "snap",
            "garage/anon",
            "--hub",
            &format!("s3://{bucket}/{prefix}"),
            "--unsigned",
        ],
        &env,
    ));

    let api = format!("{}{bucket}/{prefix}/", env["FORKD_TEST_S3_API"]);
    let c = tempfile::tempdir().unwrap();
    let before = store_state(c.path());
    let err = fails_with(
        &forkd(
            c.path(),
            &["pull", "garage/anon", "--hub", &api, "--insecure"],
        ),
        "403 Forbidden",
    );
    assert!(!err.contains(&env["AWS_SECRET_ACCESS_KEY"]));
    assert_eq!(store_state(c.path()), before);
}

#[test]
fn garage_s3_wrong_secret_is_refused() {
    let mut env = s3_env();
    env.insert("AWS_SECRET_ACCESS_KEY".into(), "0".repeat(64));
    let bucket = env["FORKD_TEST_S3_BUCKET"].clone();
    let p = tempfile::tempdir().unwrap();
    make_snapshot(p.path(), "snap", 8, 5);
    let hub = format!("s3://{bucket}/{}", unique_prefix("bad"));
    let err = fails_with(
        &run(
            p.path(),
            &["push", "snap", "garage/bad", "--hub", &hub, "--unsigned"],
            &env,
        ),
        "cannot push",
    );
    assert!(!err.contains(&"0".repeat(64)), "secret leaked: {err}");
}
