//! `recipes/NAME/recipe.toml`: what a recipe declares, parsed and validated as untrusted input.
//!
//! Every field is checked before anything is built: names that reach a command line
//! (package names, pip and npm specs) are restricted to characters that cannot be read as an
//! option or a shell word, paths cannot leave the recipe directory or name `..`, and sizes are
//! bounded. Unknown fields are refused, so a typo is an error rather than a silent default.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::RecipeError;
use crate::validate::invalid;

/// The file name of a recipe inside its directory.
pub const RECIPE_FILE: &str = "recipe.toml";
/// Longest recipe file accepted (64 KiB).
pub const MAX_RECIPE_BYTES: u64 = 64 << 10;
/// The Debian mirror used when a recipe names none.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// The Debian security mirror used when a recipe names none.
pub const DEFAULT_SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";
/// Debian suites a recipe may name.
pub const SUITES: &[&str] = &["bookworm", "trixie"];
/// Built-in warm workers of the guest agent (see docs/AGENT-PROTOCOL.md).
pub const WARM_KINDS: &[&str] = &["sh", "python"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Becomes the default local tag: `[a-z0-9][a-z0-9-]{0,62}`.
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    /// `debian:SUITE`, e.g. `debian:bookworm`.
    pub base: String,
    /// Debian mirror URL (http or https); default [`DEFAULT_MIRROR`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
    /// Debian security mirror URL; default [`DEFAULT_SECURITY_MIRROR`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_mirror: Option<String>,
    #[serde(default)]
    pub packages: Packages,
    /// Files copied from the recipe directory into the root filesystem.
    #[serde(default)]
    pub files: Vec<FileSpec>,
    pub vm: Vm,
    pub warm: Warm,
    /// Checks run in a forked child (`[[smoke]]`, at least one).
    pub smoke: Vec<Smoke>,
    #[serde(default)]
    pub licence: LicenceNotes,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Packages {
    /// Debian packages installed by mmdebstrap (with their dependencies, no recommends).
    #[serde(default)]
    pub debian: Vec<String>,
    /// PyPI requirements (`name`, `name==1.2`, `name[extra]>=1`), binary wheels only.
    #[serde(default)]
    pub pip: Vec<String>,
    /// npm packages (`name`, `@scope/name@1.2.3`), installed under /opt/forkd/node.
    #[serde(default)]
    pub npm: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Relative to the recipe directory.
    pub src: String,
    /// Absolute path in the guest.
    pub dest: String,
    /// Permission bits (TOML allows `0o755`); default 0o644.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub memory_mib: u32,
    #[serde(default = "one")]
    pub vcpus: u32,
    /// Free space left in the ext4 image beyond its content, MiB (default 256).
    #[serde(default = "default_headroom")]
    pub disk_headroom_mib: u32,
}

fn one() -> u32 {
    1
}
fn default_headroom() -> u32 {
    256
}

/// The warm worker the parent starts before its snapshot: a built-in `kind`, or `argv` of a
/// program that speaks the agent's worker framing on stdin/stdout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Warm {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// Code run in the worker before the snapshot (e.g. `import numpy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preload: Option<String>,
}

/// A check run in a forked child: `run` goes to the warm worker, `exec` is a shell command.
/// The output must contain `expect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Smoke {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<String>,
    pub expect: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LicenceNotes {
    /// Free text carried into docs/LICENCES.md and the snapshot's labels.
    #[serde(default)]
    pub notes: String,
}

/// A recipe together with the directory its `files` are relative to.
#[derive(Debug, Clone)]
pub struct LoadedRecipe {
    pub recipe: Recipe,
    pub dir: PathBuf,
}

impl Recipe {
    /// Parse and validate recipe text.
    pub fn parse(text: &str) -> Result<Recipe, RecipeError> {
        if text.len() as u64 > MAX_RECIPE_BYTES {
            return Err(RecipeError::TooLarge(MAX_RECIPE_BYTES));
        }
        let r: Recipe =
            toml::from_str(text).map_err(|e| RecipeError::Toml(e.message().to_string()))?;
        r.validate()?;
        Ok(r)
    }

    /// The recipe as TOML text (normalised: defaults filled in, comments dropped).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// The Debian suite named by `base`.
    pub fn suite(&self) -> &str {
        self.base.split_once(':').map(|(_, s)| s).unwrap_or("")
    }

    pub fn mirror(&self) -> &str {
        self.mirror.as_deref().unwrap_or(DEFAULT_MIRROR)
    }

    pub fn security_mirror(&self) -> &str {
        self.security_mirror
            .as_deref()
            .unwrap_or(DEFAULT_SECURITY_MIRROR)
    }

    /// The apt sources of the build: the suite, its updates, and its security updates.
    pub fn sources(&self) -> Vec<String> {
        let (m, s) = (self.mirror(), self.suite());
        vec![
            format!("deb {m} {s} main"),
            format!("deb {m} {s}-updates main"),
            format!("deb {} {s}-security main", self.security_mirror()),
        ]
    }
}

impl LoadedRecipe {
    /// Load `DIR/recipe.toml` (or a path to the file itself) and check that its files exist.
    pub fn load(path: &Path) -> Result<LoadedRecipe, RecipeError> {
        let (dir, file) = if path.is_dir() {
            (path.to_path_buf(), path.join(RECIPE_FILE))
        } else {
            (
                path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                path.to_path_buf(),
            )
        };
        let io = |source| RecipeError::Io {
            path: file.clone(),
            err: source,
        };
        let meta = std::fs::metadata(&file).map_err(io)?;
        if meta.len() > MAX_RECIPE_BYTES {
            return Err(RecipeError::TooLarge(MAX_RECIPE_BYTES));
        }
        let text = std::fs::read_to_string(&file).map_err(io)?;
        let recipe = Recipe::parse(&text)?;
        for (i, f) in recipe.files.iter().enumerate() {
            let src = dir.join(&f.src);
            match std::fs::symlink_metadata(&src) {
                Ok(m) if m.is_file() => {}
                Ok(_) => {
                    return invalid(
                        &format!("files[{i}].src"),
                        format!("{} is not a regular file", src.display()),
                    );
                }
                Err(e) => {
                    return invalid(
                        &format!("files[{i}].src"),
                        format!("{}: {e}", src.display()),
                    );
                }
            }
        }
        Ok(LoadedRecipe { recipe, dir })
    }
}
