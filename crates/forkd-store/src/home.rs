//! The `$FORKD_HOME` layout: the one place that names every directory and file forkd keeps
//! there (docs/ARCHITECTURE.md, "Local store layout"). Everything else asks a [`Home`].

use std::path::{Path, PathBuf};

/// None of the variables that name the home is set.
#[derive(Debug, thiserror::Error)]
#[error("cannot find the store: set FORKD_HOME, XDG_DATA_HOME or HOME")]
pub struct NoHome;

/// `$FORKD_HOME`, else `$XDG_DATA_HOME/forkd`, else `~/.local/share/forkd`.
pub fn default_home() -> Result<PathBuf, NoHome> {
    if let Some(h) = env_path("FORKD_HOME") {
        return Ok(h);
    }
    if let Some(x) = env_path("XDG_DATA_HOME") {
        return Ok(x.join("forkd"));
    }
    if let Some(h) = env_path("HOME") {
        return Ok(h.join(".local/share/forkd"));
    }
    Err(NoHome)
}

/// A variable of the environment that is set and not empty.
fn env_path(key: &str) -> Option<PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The forkd home directory and what lives in it. Naming a path creates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    pub fn new(root: impl Into<PathBuf>) -> Home {
        Home { root: root.into() }
    }

    /// The home at [`default_home`].
    pub fn from_env() -> Result<Home, NoHome> {
        default_home().map(Home::new)
    }

    /// The home directory itself.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// `store.toml`: the layout version of the store.
    pub fn layout_file(&self) -> PathBuf {
        self.root.join("store.toml")
    }

    /// `images/<tag>/`: installed snapshots.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// `tmp/`: staging directories and things being deleted, each with its `.lock`.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// `locks/`: the store lock.
    pub fn locks_dir(&self) -> PathBuf {
        self.root.join("locks")
    }

    /// `locks/store.lock`: held while a tag is installed or removed.
    pub fn store_lock(&self) -> PathBuf {
        self.locks_dir().join("store.lock")
    }

    /// `locks/daemon.lock`: held by the one `forkd serve` that owns this home's sandboxes.
    pub fn daemon_lock(&self) -> PathBuf {
        self.locks_dir().join("daemon.lock")
    }

    /// `run/`: running parents and the children kept with `fork --keep`.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// `keys/`: this host's signing key pair (`forkd key generate`).
    pub fn keys_dir(&self) -> PathBuf {
        self.root.join("keys")
    }

    /// `hub/`: the embedded default hub (`file://$FORKD_HOME/hub`).
    pub fn hub_dir(&self) -> PathBuf {
        self.root.join("hub")
    }

    /// `cache/`: downloads of pulls not yet installed, and their per-image locks.
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// `build-cache/`: the recipe builder's package trees and images (`forkd build`).
    pub fn build_cache_dir(&self) -> PathBuf {
        self.root.join("build-cache")
    }

    /// `trusted-keys`: public keys whose signatures `forkd pull` accepts, one per line.
    pub fn trusted_keys(&self) -> PathBuf {
        self.root.join("trusted-keys")
    }

    /// Guest kernel and initramfs: `$FORKD_ASSETS` if set, else `$FORKD_HOME/assets`.
    pub fn assets_dir(&self) -> PathBuf {
        env_path("FORKD_ASSETS").unwrap_or_else(|| self.root.join("assets"))
    }

    /// `forkd.sock`: where the daemon listens.
    pub fn socket(&self) -> PathBuf {
        self.root.join("forkd.sock")
    }

    /// `log/`: the daemon's logs.
    pub fn log_dir(&self) -> PathBuf {
        self.root.join("log")
    }
}

impl AsRef<Path> for Home {
    fn as_ref(&self) -> &Path {
        &self.root
    }
}
