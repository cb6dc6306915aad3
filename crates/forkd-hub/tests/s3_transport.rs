//! The s3:// transport against a real Garage: a multipart upload of a large blob, ranged and
//! whole reads, exists, and a 404. Needs `scripts/garage-start.sh ENV_FILE` and
//! `FORKD_TEST_S3_ENV=ENV_FILE`; fails (never skips) without them.

use bytes::Bytes;
use forkd_hub::transport::{self, HubOptions, TransportError};

#[test]
fn s3_multipart_put_and_ranged_reads() {
    let path = std::env::var("FORKD_TEST_S3_ENV").expect(
        "FORKD_TEST_S3_ENV is not set: run `scripts/garage-start.sh /tmp/garage.env` and set \
         FORKD_TEST_S3_ENV=/tmp/garage.env (scripts/test.sh does both)",
    );
    let text = std::fs::read_to_string(&path).expect("cannot read FORKD_TEST_S3_ENV");
    let mut bucket = String::new();
    for (k, v) in text.lines().filter_map(|l| l.split_once('=')) {
        if k.starts_with("AWS_") {
            // SAFETY: this test is the only code in its process and runs before any thread
            // (the runtime below) is started, so nothing reads the environment concurrently.
            unsafe { std::env::set_var(k, v) };
        }
        if k == "FORKD_TEST_S3_BUCKET" {
            bucket = v.to_string();
        }
    }
    assert!(!bucket.is_empty(), "{path} lacks FORKD_TEST_S3_BUCKET");
    let url = format!("s3://{bucket}/mp-{}", std::process::id());
    let hub = transport::open(&url, &HubOptions::default()).unwrap();
    assert_eq!(hub.describe(), url);

    let size = transport::s3_multipart_threshold() + (3 << 20) + 17;
    let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        assert!(!hub.exists("big").await.unwrap());
        hub.put("big", Bytes::from(data.clone())).await.unwrap();
        assert!(hub.exists("big").await.unwrap());
        let all = hub.get("big", size as u64).await.unwrap();
        assert_eq!(all.len(), size);
        assert!(all[..] == data[..], "multipart object differs");
        let part = hub.get_range("big", 5..1_000_005).await.unwrap();
        assert!(part[..] == data[5..1_000_005]);
        // One byte less than the object: refused, not truncated.
        match hub.get("big", size as u64 - 1).await {
            Err(TransportError::TooLarge { .. }) => {}
            other => panic!("expected TooLarge, got {:?}", other.map(|b| b.len())),
        }
        match hub.get("missing", 1 << 20).await {
            Err(TransportError::NotFound { .. }) => {}
            other => panic!("expected NotFound, got {other:?}"),
        }
    });
}
