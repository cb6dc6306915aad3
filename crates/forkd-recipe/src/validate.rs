//! The rules of `recipe.toml`, checked before anything is built: names that reach a command
//! line cannot be read as options or shell words, paths cannot leave the recipe directory or
//! name `..`, and every size is bounded.

use std::path::{Component, Path};

use crate::RecipeError;
use crate::recipe::{Recipe, SUITES, WARM_KINDS};

pub(crate) fn invalid<T>(field: &str, msg: impl Into<String>) -> Result<T, RecipeError> {
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
