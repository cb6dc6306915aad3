//! forkd recipes: a declarative `recipe.toml`, and the builder that turns it into an ext4 root
//! filesystem image made from Debian packages (mmdebstrap), PyPI wheels and npm packages, with
//! the forkd guest agent, an init, the recipe's own files and a licence report.
//!
//! - [`recipe`]: the file format, validated as untrusted input.
//! - [`rootfs`]: the package tree (mmdebstrap + pip + npm), cached by a hash of what it holds.
//! - [`image`]: the tree plus agent, init and files, made into `rootfs.ext4`, also cached.
//! - [`licence`]: package → licences, from the filesystem itself.
//! - [`parent`]: the image booted, warmed and saved as a parent snapshot in the local store,
//!   smoke-checked in a forked child first.
//!
//! Building needs root (mmdebstrap in root mode, files owned by root in the image).

pub mod image;
pub mod licence;
pub mod parent;
pub mod recipe;
pub mod rootfs;
mod util;
mod validate;

use std::path::PathBuf;

pub use image::{BuiltImage, build_image};
pub use licence::{LicenceReport, PackageLicence};
pub use recipe::{LoadedRecipe, Recipe};

/// Everything that can go wrong reading a recipe or building its root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("recipe is not valid TOML: {0}")]
    Toml(String),
    #[error("recipe field `{field}`: {message}")]
    Invalid { field: String, message: String },
    #[error("recipe file is larger than {0} bytes")]
    TooLarge(u64),
    #[error("`{tool}` not found: install the Debian package `{package}`")]
    MissingTool { tool: String, package: String },
    #[error("building a root filesystem needs root (mmdebstrap runs in root mode); run as root")]
    NotRoot,
    #[error("{what} failed ({status}); last output:\n{tail}")]
    Command {
        what: String,
        status: String,
        tail: String,
    },
}

/// Where builds keep their caches, and what they put into every image.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Cache root: `trees/`, `images/`, `tmp/`, `logs/` live under it.
    pub cache_dir: PathBuf,
    /// Ignore cached trees and images and build again.
    pub rebuild: bool,
    /// The static forkd-agent binary installed as /usr/local/sbin/forkd-agent.
    pub agent: PathBuf,
}

/// What a build reports as it goes: a phase starts, a phase ends.
#[derive(Debug, Clone)]
pub enum Progress {
    Start(&'static str),
    Done {
        phase: &'static str,
        seconds: f64,
        note: String,
    },
}
