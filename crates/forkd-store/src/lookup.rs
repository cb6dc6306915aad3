//! Naming a local image the way `forkd images` shows it: by its TAG, or by the NAME:VERSION
//! of its manifest (`tiny` or `tiny:1`). Every command that takes an existing image takes both.

use crate::store::{Snapshot, Store, StoreError};
use crate::tag::{Tag, TagError};
use std::fmt;

/// A local image as the user names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageName {
    /// A local tag (the TAG column of `forkd images`).
    Tag(Tag),
    /// NAME:VERSION from the image's manifest (the NAME:VERSION column).
    Versioned { name: Tag, version: String },
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error(transparent)]
    Tag(#[from] TagError),
    #[error(
        "invalid image name {0:?}: VERSION after ':' must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-'"
    )]
    Version(String),
    #[error("no image {name}:{version} in the local store{}", have_suffix(.have))]
    NoVersion {
        name: String,
        version: String,
        /// NAME:VERSION of the images that have this NAME.
        have: Vec<String>,
    },
    #[error("{name}:{version} names more than one local image (tags {}); use a tag", .tags.join(", "))]
    Ambiguous {
        name: String,
        version: String,
        tags: Vec<String>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn have_suffix(have: &[String]) -> String {
    if have.is_empty() {
        String::new()
    } else {
        format!(" (it has {})", have.join(", "))
    }
}

impl ImageName {
    /// `TAG` or `NAME:VERSION`.
    pub fn parse(s: &str) -> Result<ImageName, LookupError> {
        match s.split_once(':') {
            None => Ok(ImageName::Tag(Tag::parse(s)?)),
            Some((name, version)) => {
                let ok = !version.is_empty()
                    && version.len() <= 128
                    && version
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                if !ok {
                    return Err(LookupError::Version(s.to_string()));
                }
                Ok(ImageName::Versioned {
                    name: Tag::parse(name)?,
                    version: version.to_string(),
                })
            }
        }
    }
}

impl std::str::FromStr for ImageName {
    type Err = LookupError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageName::parse(s)
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageName::Tag(t) => write!(f, "{t}"),
            ImageName::Versioned { name, version } => write!(f, "{name}:{version}"),
        }
    }
}

impl Store {
    /// The installed image `name` names. For NAME:VERSION, the image tagged NAME wins when its
    /// manifest has that version; otherwise exactly one image's manifest must match.
    pub fn find(&self, name: &ImageName) -> Result<Snapshot, LookupError> {
        let (name, version) = match name {
            ImageName::Tag(t) => return Ok(self.get(t)?),
            ImageName::Versioned { name, version } => (name, version),
        };
        if let Ok(s) = self.get(name)
            && s.manifest.name == name.as_str()
            && s.manifest.version == *version
        {
            return Ok(s);
        }
        let list = self.list()?;
        let same_name: Vec<_> = list
            .iter()
            .filter(|i| i.manifest.name == name.as_str())
            .collect();
        let hits: Vec<_> = same_name
            .iter()
            .filter(|i| i.manifest.version == *version)
            .collect();
        match hits.as_slice() {
            [one] => Ok(self.get(&one.tag)?),
            [] => Err(LookupError::NoVersion {
                name: name.to_string(),
                version: version.clone(),
                have: same_name
                    .iter()
                    .map(|i| format!("{}:{} (tag {})", i.manifest.name, i.manifest.version, i.tag))
                    .collect(),
            }),
            many => Err(LookupError::Ambiguous {
                name: name.to_string(),
                version: version.clone(),
                tags: many.iter().map(|i| i.tag.to_string()).collect(),
            }),
        }
    }
}
