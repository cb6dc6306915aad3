//! Licences of what a root filesystem ships, read from the filesystem itself:
//! Debian packages from `var/lib/dpkg/status` + `usr/share/doc/PKG/copyright`, PyPI wheels from
//! their `METADATA`, npm packages from their `package.json`.
//!
//! Debian copyright files in the machine-readable format (DEP-5, a `Format:` header) give
//! `License:` short names directly. Older free-form files are scanned for references to
//! `/usr/share/common-licenses/NAME` and a few well-known licence texts; those entries are
//! marked `detected` rather than `declared`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::RecipeError;
use crate::util::resolve_in_root;

/// Licences of one package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageLicence {
    /// "debian", "pip" or "npm".
    pub source: String,
    pub version: String,
    /// Short licence names or expressions, as the package states them, deduplicated.
    pub licences: Vec<String>,
    /// "declared" (machine-readable) or "detected" (found in free text) or "unknown".
    pub how: String,
}

/// Every package of a root filesystem with its licences: the content of `licences.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LicenceReport {
    pub packages: BTreeMap<String, PackageLicence>,
}

fn norm(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Licence names from a Debian copyright file. Returns (names, machine_readable).
pub fn parse_copyright(text: &str) -> (Vec<String>, bool) {
    let mut names = BTreeSet::new();
    let machine = text
        .lines()
        .next()
        .is_some_and(|l| l.starts_with("Format:"));
    if machine {
        for (i, para) in text.split("\n\n").enumerate() {
            let mut has_files = false;
            let mut licence = None;
            for line in para.lines() {
                if line.starts_with([' ', '\t']) {
                    continue;
                }
                if let Some((key, value)) = line.split_once(':') {
                    match key.trim() {
                        "Files" => has_files = true,
                        "License" => licence = Some(norm(value)),
                        _ => {}
                    }
                }
            }
            // Stand-alone licence paragraphs only repeat a name used by a Files paragraph.
            if let Some(l) = licence.filter(|l| !l.is_empty() && l.len() <= 200)
                && (has_files || i == 0)
            {
                names.insert(l);
            }
        }
        return (names.into_iter().collect(), true);
    }
    for (pos, _) in text.match_indices("/usr/share/common-licenses/") {
        let rest = &text[pos + "/usr/share/common-licenses/".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '+'))
            .collect();
        let name = name.trim_end_matches('.').to_string();
        if !name.is_empty() {
            names.insert(name);
        }
    }
    // Well-known licence texts, matched case-insensitively.
    let known = [
        (
            "redistribution and use in source and binary forms",
            "BSD-style",
        ),
        ("redistributions of source code must retain", "BSD-style"),
        ("permission is hereby granted, free of charge", "Expat"),
        (
            "permission to use, copy, modify, distribute, and sell",
            "X11-style",
        ),
        (
            "permission to use, copy, modify, and distribute this software",
            "HPND-style",
        ),
        (
            "hereby grant permission to use, copy, modify, distribute",
            "TCL-style",
        ),
        ("apache license", "Apache-2.0"),
        ("mozilla public license", "MPL-2.0"),
        ("python software foundation license", "PSF-2.0"),
        ("psf license agreement", "PSF-2.0"),
        ("gnu lesser general public license", "LGPL"),
        ("gnu library general public license", "LGPL"),
        ("gnu general public license", "GPL"),
        ("public domain", "public-domain"),
    ];
    let lower = text.to_lowercase();
    for (needle, name) in known {
        if lower.contains(needle) {
            names.insert(name.to_string());
        }
    }
    // A versioned name from common-licenses says more than the bare family name.
    for family in ["GPL", "LGPL"] {
        if names.iter().any(|n| n.starts_with(&format!("{family}-"))) {
            names.remove(family);
        }
    }
    (names.into_iter().collect(), false)
}

/// Installed packages from a dpkg status file: name → version.
pub fn dpkg_installed(status: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for para in status.split("\n\n") {
        let (mut name, mut version, mut installed) = (None, String::new(), false);
        for line in para.lines() {
            if let Some(v) = line.strip_prefix("Package: ") {
                name = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("Version: ") {
                version = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("Status: ") {
                installed = v.trim().ends_with(" installed");
            }
        }
        if let (Some(n), true) = (name, installed) {
            out.insert(n, version);
        }
    }
    out
}

fn read_small(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > 4 << 20 {
        return None;
    }
    std::fs::read(path)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

fn entry(source: &str, version: String, licences: Vec<String>, how: &str) -> PackageLicence {
    let how = if licences.is_empty() { "unknown" } else { how };
    PackageLicence {
        source: source.into(),
        version,
        licences,
        how: how.into(),
    }
}

/// Collect the licences of everything installed in the root filesystem at `root`.
pub fn scan(root: &Path) -> Result<LicenceReport, RecipeError> {
    let status_path = root.join("var/lib/dpkg/status");
    let status = std::fs::read_to_string(&status_path).map_err(|source| RecipeError::Io {
        path: status_path,
        err: source,
    })?;
    let mut report = LicenceReport::default();
    for (pkg, version) in dpkg_installed(&status) {
        let file = resolve_in_root(
            root,
            &Path::new("usr/share/doc").join(&pkg).join("copyright"),
        );
        let (names, machine) = file
            .as_deref()
            .and_then(read_small)
            .map(|t| parse_copyright(&t))
            .unwrap_or_default();
        let how = if machine { "declared" } else { "detected" };
        report
            .packages
            .insert(pkg, entry("debian", version, names, how));
    }
    scan_pip(root, &mut report);
    scan_npm(&root.join("opt/forkd/node/node_modules"), &mut report);
    Ok(report)
}

fn scan_pip(root: &Path, report: &mut LicenceReport) {
    let Ok(libs) = std::fs::read_dir(root.join("usr/local/lib")) else {
        return;
    };
    for lib in libs.flatten() {
        let Ok(dists) = std::fs::read_dir(lib.path().join("dist-packages")) else {
            continue;
        };
        for d in dists.flatten() {
            let fname = d.file_name().to_string_lossy().into_owned();
            if !fname.ends_with(".dist-info") {
                continue;
            }
            let Some(meta) = read_small(&d.path().join("METADATA")) else {
                continue;
            };
            let (mut name, mut version, mut lic) = (String::new(), String::new(), BTreeSet::new());
            for line in meta.lines().take_while(|l| !l.is_empty()) {
                if let Some(v) = line.strip_prefix("Name: ") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("Version: ") {
                    version = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("License-Expression: ") {
                    lic.insert(norm(v));
                } else if let Some(v) = line.strip_prefix("License: ").filter(|v| v.len() < 100) {
                    lic.insert(norm(v));
                } else if let Some(v) = line.strip_prefix("Classifier: License :: ") {
                    lic.insert(norm(v.rsplit(" :: ").next().unwrap_or(v)));
                }
            }
            lic.retain(|l| !l.is_empty() && l != "UNKNOWN");
            if !name.is_empty() {
                report.packages.insert(
                    format!("pip:{name}"),
                    entry("pip", version, lic.into_iter().collect(), "declared"),
                );
            }
        }
    }
}

fn scan_npm(modules: &Path, report: &mut LicenceReport) {
    let Ok(entries) = std::fs::read_dir(modules) else {
        return;
    };
    let mut dirs = Vec::new();
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with('@') {
            if let Ok(scoped) = std::fs::read_dir(e.path()) {
                dirs.extend(scoped.flatten().map(|s| s.path()));
            }
        } else if !n.starts_with('.') {
            dirs.push(e.path());
        }
    }
    for dir in dirs {
        let Some(text) = read_small(&dir.join("package.json")) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let name = v["name"].as_str().unwrap_or_default().to_string();
        let version = v["version"].as_str().unwrap_or_default().to_string();
        let lic = match &v["license"] {
            serde_json::Value::String(s) => vec![norm(s)],
            serde_json::Value::Object(o) => o
                .get("type")
                .and_then(|t| t.as_str())
                .map(norm)
                .into_iter()
                .collect(),
            _ => Vec::new(),
        };
        if !name.is_empty() {
            report.packages.insert(
                format!("npm:{name}"),
                entry("npm", version, lic, "declared"),
            );
        }
    }
}

impl LicenceReport {
    pub fn to_toml(&self) -> String {
        let head = "# Licences of every package in this root filesystem, collected by forkd build\n\
                    # from Debian copyright files, wheel METADATA and npm package.json.\n\n";
        format!("{head}{}", toml::to_string(self).unwrap_or_default())
    }

    pub fn parse(text: &str) -> Result<LicenceReport, RecipeError> {
        toml::from_str(text).map_err(|e| RecipeError::Toml(e.message().to_string()))
    }

    /// Every distinct licence name, sorted, with how many packages use it.
    pub fn summary(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for p in self.packages.values() {
            if p.licences.is_empty() {
                *out.entry("unknown".to_string()).or_default() += 1;
            }
            for l in &p.licences {
                *out.entry(l.clone()).or_default() += 1;
            }
        }
        out
    }

    /// The summary as one line no longer than `max` bytes (for a manifest label).
    pub fn summary_line(&self, max: usize) -> String {
        let mut line = String::new();
        for (name, n) in self.summary() {
            let item = format!("{}{name} ({n})", if line.is_empty() { "" } else { "; " });
            if line.len() + item.len() + 5 > max {
                line.push_str("; ...");
                break;
            }
            line.push_str(&item);
        }
        line
    }
}

impl LicenceReport {
    /// A Markdown section for docs/LICENCES.md: counts, the licence table (names used by at
    /// least two packages), packages without a licence statement, then every package.
    pub fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let count = |src: &str| self.packages.values().filter(|p| p.source == src).count();
        let how = |h: &str| self.packages.values().filter(|p| p.how == h).count();
        let _ = writeln!(
            s,
            "Packages: {} Debian, {} PyPI, {} npm. Licence statements: {} machine-readable \
             (`declared`), {} found in free-text copyright files (`detected`), {} without one.\n",
            count("debian"),
            count("pip"),
            count("npm"),
            how("declared"),
            how("detected"),
            how("unknown")
        );
        let summary = self.summary();
        let once = summary.values().filter(|&&n| n < 2).count();
        s.push_str("| Licence | Packages |\n|---|---:|\n");
        let mut rows: Vec<_> = summary.iter().filter(|(_, n)| **n >= 2).collect();
        rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (name, n) in rows {
            let _ = writeln!(s, "| {} | {n} |", name.replace('|', "\\|"));
        }
        let _ = writeln!(s, "| *{once} other names, each used by one package* | |\n");
        let unknown: Vec<_> = self
            .packages
            .iter()
            .filter(|(_, p)| p.how == "unknown")
            .map(|(n, _)| n.as_str())
            .collect();
        if !unknown.is_empty() {
            let _ = writeln!(
                s,
                "No licence statement found (read their copyright files): {}\n",
                unknown.join(", ")
            );
        }
        s.push_str("<details><summary>Every package</summary>\n\n| Package | Version | Licences |\n|---|---|---|\n");
        for (name, p) in &self.packages {
            let _ = writeln!(
                s,
                "| {name} | {} | {} |",
                p.version,
                p.licences.join(", ").replace('|', "\\|")
            );
        }
        s.push_str("\n</details>\n");
        s
    }
}
