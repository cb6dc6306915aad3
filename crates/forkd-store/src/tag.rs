//! Local tag names: `[a-z0-9][a-z0-9._-]{0,127}`, never containing `..`.
//!
//! A tag becomes a directory name under `images/`, so it must never be able to name anything
//! else: no separators, no NUL, no `.`/`..`, no leading dot or dash.

use std::fmt;

/// What tag names may look like, for error messages.
pub const TAG_RULES: &str = "a tag is 1 to 128 characters of a-z, 0-9, '.', '_' and '-', starts \
                             with a letter or digit, and does not contain '..'";

/// A validated tag name.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Tag(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid tag {name:?}: {reason}; {TAG_RULES}{}", suggestion(.name))]
pub struct TagError {
    /// The rejected input (as given).
    pub name: String,
    /// Which rule it broke.
    pub reason: &'static str,
}

impl Tag {
    /// Validate `s` as a tag name.
    pub fn parse(s: &str) -> Result<Tag, TagError> {
        let err = |reason| TagError {
            name: s.to_string(),
            reason,
        };
        if s.is_empty() {
            return Err(err("it is empty"));
        }
        if s.len() > 128 {
            return Err(err("it is longer than 128 characters"));
        }
        if s.contains('/') || s.contains('\\') {
            return Err(err("it contains a path separator"));
        }
        if s.contains('\0') {
            return Err(err("it contains a NUL byte"));
        }
        if s.contains("..") {
            return Err(err("it contains '..'"));
        }
        if s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(err("upper case is not allowed"));
        }
        if s.contains(':') {
            return Err(err("it contains ':' (a local tag has no :VERSION)"));
        }
        let first = s.as_bytes()[0];
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return Err(err("it does not start with a lowercase letter or digit"));
        }
        let ok = s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
        if !ok {
            return Err(err("it contains a character that is not allowed"));
        }
        Ok(Tag(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What the user probably meant, for the error message: the lower-case spelling, or the tag
/// before a `:VERSION`.
fn suggestion(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    let base = lower.split(':').next().unwrap_or("");
    if base != name && Tag::parse(base).is_ok() {
        format!(" (did you mean {base:?}?)")
    } else {
        String::new()
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Tag {
    type Err = TagError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tag::parse(s)
    }
}

impl TryFrom<String> for Tag {
    type Error = TagError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Tag::parse(&s)
    }
}

impl From<Tag> for String {
    fn from(t: Tag) -> String {
        t.0
    }
}

impl AsRef<str> for Tag {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_good_tags() {
        for t in ["a", "python-numpy", "py3.11_x", "0abc", &"a".repeat(128)] {
            assert_eq!(Tag::parse(t).unwrap().as_str(), t);
        }
    }

    #[test]
    fn rejects_unsafe_tags() {
        for (t, gist) in [
            ("", "empty"),
            ("..", "'..'"),
            (".", "does not start"),
            ("a..b", "'..'"),
            ("../etc", "separator"),
            ("/abs", "separator"),
            ("a\\b", "separator"),
            ("a\0b", "NUL"),
            ("-x", "does not start"),
            (".hidden", "does not start"),
            ("Upper", "did you mean \"upper\"?"),
            ("a b", "not allowed"),
            ("a:b", "did you mean \"a\"?"),
            (&"a".repeat(129), "longer"),
        ] {
            let e = Tag::parse(t).unwrap_err();
            assert!(e.to_string().contains(gist), "{t:?}: {e}");
            assert!(e.to_string().contains("1 to 128 characters"));
        }
    }
}
