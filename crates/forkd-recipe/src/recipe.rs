//! `recipes/NAME/recipe.toml`: what a recipe declares, parsed and validated as untrusted input.
//!
//! Every field is checked before anything is built: names that reach a command line
//! (package names, pip and npm specs) are restricted to characters that cannot be read as an
//! option or a shell word, paths cannot leave the recipe directory or name `..`, and sizes are
//! bounded. Unknown fields are refused, so a typo is an error rather than a silent default.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::RecipeError;

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

fn invalid<T>(field: &str, msg: impl Into<String>) -> Result<T, RecipeError> {
    Err(RecipeError::Invalid {
        field: field.to_string(),
        message: msg.into(),
    })
}

fn check_text(field: &str, v: &str, required: bool, max: usize) -> Result<(), RecipeError> {
    if required && v.trim().is_empty() {
        return invalid(field, "must not be empty");
    }
    if v.len() > max {
        return invalid(field, format!("is longer than {max} bytes"));
    }
    if v.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return invalid(field, "contains control characters");
    }
    Ok(())
}

/// `[a-z0-9]` first, then `allowed` bytes; never empty, never longer than `max`.
fn simple_name(v: &str, max: usize, allowed: impl Fn(u8) -> bool) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| allowed(c))
}

fn is_debian_package(v: &str) -> bool {
    // Debian policy 5.6.1: lower case letters, digits, '+', '-', '.'; at least two characters.
    v.len() >= 2
        && simple_name(v, 100, |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'+' | b'-' | b'.')
        })
}

fn is_pip_spec(v: &str) -> bool {
    let name_end = v.find(['[', '=', '<', '>', '~', '!']).unwrap_or(v.len());
    let (name, rest) = v.split_at(name_end);
    let name_ok = !name.is_empty()
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    let rest_ok = rest
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"[],.=<>~!*+_-".contains(&c));
    name_ok && rest_ok && v.len() <= 200
}

fn is_npm_spec(v: &str) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 214
        && (b[0] == b'@' || b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"@/._~^-".contains(&c))
}

fn is_http_url(v: &str) -> bool {
    (v.starts_with("http://") || v.starts_with("https://"))
        && v.len() <= 512
        && v.len() > "https://".len()
        && !v
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ',')
}

/// A relative path of plain components (no `..`, no root, not empty).
fn relative_plain(v: &str) -> bool {
    !v.is_empty()
        && Path::new(v)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        && !v.contains('\0')
}

/// An absolute guest path of plain components, not `/` itself.
fn absolute_plain(v: &str) -> bool {
    let p = Path::new(v);
    v.starts_with('/')
        && v.len() <= 1024
        && p.components().skip(1).count() > 0
        && p.components()
            .skip(1)
            .all(|c| matches!(c, Component::Normal(_)))
        && !v.contains('\0')
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

    /// Check every rule; parse calls this.
    pub fn validate(&self) -> Result<(), RecipeError> {
        if !simple_name(&self.name, 63, |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'
        }) {
            return invalid(
                "name",
                format!(
                    "{:?}: use 1 to 63 of a-z, 0-9 and '-', starting with a letter or digit",
                    self.name
                ),
            );
        }
        check_text("version", &self.version, true, 64)?;
        if !self
            .version
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._+-".contains(&c))
        {
            return invalid(
                "version",
                format!("{:?}: use A-Z, a-z, 0-9, '.', '_', '+', '-'", self.version),
            );
        }
        check_text("description", &self.description, false, 1024)?;
        match self.base.split_once(':') {
            Some(("debian", suite)) if SUITES.contains(&suite) => {}
            Some(("debian", suite)) => {
                return invalid(
                    "base",
                    format!(
                        "unknown Debian suite {suite:?} (known: {})",
                        SUITES.join(", ")
                    ),
                );
            }
            _ => {
                return invalid(
                    "base",
                    format!(
                        "{:?}: expected \"debian:SUITE\", e.g. \"debian:bookworm\"",
                        self.base
                    ),
                );
            }
        }
        if let Some(m) = &self.mirror
            && !is_http_url(m)
        {
            return invalid("mirror", format!("{m:?} is not an http:// or https:// URL"));
        }
        if let Some(m) = &self.security_mirror
            && !is_http_url(m)
        {
            return invalid(
                "security_mirror",
                format!("{m:?} is not an http:// or https:// URL"),
            );
        }
        self.validate_packages()?;
        self.validate_files()?;
        let vm = &self.vm;
        if !(64..=65536).contains(&vm.memory_mib) {
            return invalid(
                "vm.memory_mib",
                format!("{} is out of range (64 to 65536)", vm.memory_mib),
            );
        }
        if !(1..=64).contains(&vm.vcpus) {
            return invalid(
                "vm.vcpus",
                format!("{} is out of range (1 to 64)", vm.vcpus),
            );
        }
        if vm.disk_headroom_mib > 65536 {
            return invalid(
                "vm.disk_headroom_mib",
                format!("{} is larger than 65536", vm.disk_headroom_mib),
            );
        }
        self.validate_warm()?;
        self.validate_smoke()?;
        check_text("licence.notes", &self.licence.notes, false, 4096)?;
        Ok(())
    }

    fn validate_packages(&self) -> Result<(), RecipeError> {
        let p = &self.packages;
        if p.debian.is_empty() {
            return invalid("packages.debian", "list at least one package");
        }
        for (field, list, max) in [
            ("packages.debian", &p.debian, 1000),
            ("packages.pip", &p.pip, 200),
            ("packages.npm", &p.npm, 200),
        ] {
            if list.len() > max {
                return invalid(field, format!("more than {max} entries"));
            }
            for (i, v) in list.iter().enumerate() {
                if list[..i].contains(v) {
                    return invalid(field, format!("{v:?} is listed twice"));
                }
            }
        }
        if let Some(bad) = p.debian.iter().find(|v| !is_debian_package(v)) {
            return invalid(
                "packages.debian",
                format!("{bad:?} is not a Debian package name (a-z, 0-9, '+', '-', '.')"),
            );
        }
        if let Some(bad) = p.pip.iter().find(|v| !is_pip_spec(v)) {
            return invalid(
                "packages.pip",
                format!("{bad:?} is not a plain requirement like \"name==1.2\""),
            );
        }
        if let Some(bad) = p.npm.iter().find(|v| !is_npm_spec(v)) {
            return invalid(
                "packages.npm",
                format!("{bad:?} is not an npm package spec like \"name@1.2.3\""),
            );
        }
        Ok(())
    }

    fn validate_files(&self) -> Result<(), RecipeError> {
        if self.files.len() > 256 {
            return invalid("files", "more than 256 entries");
        }
        for (i, f) in self.files.iter().enumerate() {
            if !relative_plain(&f.src) {
                return invalid(
                    &format!("files[{i}].src"),
                    format!(
                        "{:?} must be a relative path inside the recipe directory, without '..'",
                        f.src
                    ),
                );
            }
            if !absolute_plain(&f.dest) {
                return invalid(
                    &format!("files[{i}].dest"),
                    format!("{:?} must be an absolute guest path without '..'", f.dest),
                );
            }
            if self.files[..i].iter().any(|o| o.dest == f.dest) {
                return invalid(
                    &format!("files[{i}].dest"),
                    format!("{:?} is a destination twice", f.dest),
                );
            }
            if f.mode.is_some_and(|m| m > 0o7777) {
                return invalid(&format!("files[{i}].mode"), "is larger than 0o7777");
            }
        }
        Ok(())
    }

    fn validate_smoke(&self) -> Result<(), RecipeError> {
        if self.smoke.is_empty() || self.smoke.len() > 16 {
            return invalid("smoke", "give 1 to 16 [[smoke]] checks");
        }
        for (i, s) in self.smoke.iter().enumerate() {
            match (&s.run, &s.exec) {
                (Some(code), None) => check_text(&format!("smoke[{i}].run"), code, true, 16 << 10)?,
                (None, Some(cmd)) => check_text(&format!("smoke[{i}].exec"), cmd, true, 16 << 10)?,
                _ => {
                    return invalid(
                        &format!("smoke[{i}]"),
                        "give exactly one of `run` (warm worker code) and `exec` (shell command)",
                    );
                }
            }
            check_text(&format!("smoke[{i}].expect"), &s.expect, true, 4096)?;
        }
        Ok(())
    }

    fn validate_warm(&self) -> Result<(), RecipeError> {
        let w = &self.warm;
        match (&w.kind, &w.argv) {
            (Some(k), None) if WARM_KINDS.contains(&k.as_str()) => {}
            (Some(k), None) => {
                return invalid(
                    "warm.kind",
                    format!(
                        "{k:?} is not a built-in worker (known: {})",
                        WARM_KINDS.join(", ")
                    ),
                );
            }
            (None, Some(argv)) => {
                if argv.is_empty() || argv.len() > 64 {
                    return invalid("warm.argv", "give 1 to 64 words");
                }
                if !absolute_plain(&argv[0]) {
                    return invalid(
                        "warm.argv",
                        format!("{:?}: the program must be an absolute guest path", argv[0]),
                    );
                }
                for a in argv {
                    check_text("warm.argv", a, false, 4096)?;
                }
            }
            _ => return invalid("warm", "give exactly one of `kind` and `argv`"),
        }
        if let Some(p) = &w.preload {
            check_text("warm.preload", p, false, 16 << 10)?;
        }
        Ok(())
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
