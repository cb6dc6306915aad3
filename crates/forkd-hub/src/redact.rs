//! Keep credentials out of every message: strip userinfo and secret-looking query values.

/// Query parameter names whose values are secrets (presigned URLs, tokens).
const SECRET_PARAMS: &[&str] = &[
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "signature",
    "token",
    "access_token",
    "sig",
    "key",
    "secret",
    "password",
];

/// `https://user:pw@host/p?token=x&a=1` → `https://***@host/p?token=***&a=1`.
/// Unparseable input is returned with anything between `//` and `@` masked.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let had_user = !u.username().is_empty() || u.password().is_some();
            if had_user {
                let _ = u.set_username("");
                let _ = u.set_password(None);
            }
            let pairs: Vec<(String, String)> = u
                .query_pairs()
                .map(|(k, v)| {
                    let secret = SECRET_PARAMS.iter().any(|s| k.eq_ignore_ascii_case(s));
                    (
                        k.into_owned(),
                        if secret { "***".into() } else { v.into_owned() },
                    )
                })
                .collect();
            if !pairs.is_empty() {
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            let s = u.to_string();
            if had_user {
                s.replacen("://", "://***@", 1)
            } else {
                s
            }
        }
        Err(_) => match (url.find("://"), url.rfind('@')) {
            (Some(i), Some(j)) if j > i => format!("{}***{}", &url[..i + 3], &url[j..]),
            _ => url.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn strips_secrets() {
        let r = redact_url("https://bob:hunter2@hub.example/p?X-Amz-Signature=abc&x=1");
        assert!(
            !r.contains("hunter2") && !r.contains("bob") && !r.contains("abc"),
            "{r}"
        );
        assert!(r.contains("x=1") && r.contains("hub.example/p"), "{r}");
        assert_eq!(redact_url("s3://bucket/prefix"), "s3://bucket/prefix");
        assert!(!redact_url("ht!tp://u:secret@x").contains("secret"));
    }
}
