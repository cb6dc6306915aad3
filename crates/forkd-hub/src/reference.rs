//! Hub image references: `OWNER/NAME[:VERSION]` or `OWNER/NAME@sha256:<64 hex>`.

use std::fmt;

/// What a reference points at: a mutable version tag, or a pinned manifest digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Version(String),
    Digest(String),
}

/// A parsed `OWNER/NAME[:VERSION|@sha256:HEX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub owner: String,
    pub name: String,
    pub target: Target,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct ReferenceError {
    pub input: String,
    pub reason: String,
}

pub const DEFAULT_VERSION: &str = "latest";

/// OWNER or NAME: `[a-z0-9][a-z0-9._-]{0,127}`.
pub fn is_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
}

/// VERSION: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`.
pub fn is_version(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
}

/// A digest string `sha256:<64 lowercase hex>`; returns the hex part.
pub fn digest_hex(s: &str) -> Option<&str> {
    let hex = s.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)))
    .then_some(hex)
}

impl Reference {
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let err = |reason: &str| ReferenceError {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let (path, target) = if let Some((path, digest)) = input.split_once('@') {
            if digest_hex(digest).is_none() {
                return Err(err(
                    "a pinned digest must be sha256: followed by 64 lowercase hex digits",
                ));
            }
            (path, Target::Digest(digest.to_string()))
        } else if let Some((path, version)) = input.split_once(':') {
            if !is_version(version) {
                return Err(err("VERSION must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}"));
            }
            (path, Target::Version(version.to_string()))
        } else {
            (input, Target::Version(DEFAULT_VERSION.to_string()))
        };
        let Some((owner, name)) = path.split_once('/') else {
            return Err(err("expected OWNER/NAME, e.g. acme/python-numpy"));
        };
        if !is_name(owner) || !is_name(name) {
            let lower = path.to_ascii_lowercase();
            if lower != path
                && let Some((o, n)) = lower.split_once('/')
                && is_name(o)
                && is_name(n)
            {
                let rest = &input[path.len()..];
                return Err(err(&format!(
                    "upper case is not allowed in OWNER or NAME; did you mean \"{lower}{rest}\"?"
                )));
            }
            return Err(err(
                "OWNER and NAME must match [a-z0-9][a-z0-9._-]* (no slashes, no upper case)",
            ));
        }
        if name == "." || name == ".." || owner == "." || owner == ".." {
            return Err(err("OWNER and NAME must not be . or .."));
        }
        Ok(Self {
            owner: owner.to_string(),
            name: name.to_string(),
            target,
        })
    }

    /// `OWNER/NAME`.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Version(v) => write!(f, "{}/{}:{v}", self.owner, self.name),
            Target::Digest(d) => write!(f, "{}/{}@{d}", self.owner, self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        let r = Reference::parse("acme/python-numpy").unwrap();
        assert_eq!(r.target, Target::Version("latest".into()));
        let r = Reference::parse("acme/py:3.12-v1").unwrap();
        assert_eq!(r.target, Target::Version("3.12-v1".into()));
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("acme/py@{d}")).unwrap();
        assert_eq!(r.target, Target::Digest(d));
        assert_eq!(r.repository(), "acme/py");
    }

    #[test]
    fn rejects_bad() {
        for bad in [
            "py",
            "Acme/py",
            "acme/../x",
            "acme/..",
            "a/b/c",
            "acme/py:",
            "acme/py:-x",
            "acme/py@sha256:abc",
            "/py",
            "acme/",
            "acme/py:a/b",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad} should be rejected");
        }
    }
}
