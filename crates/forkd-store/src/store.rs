//! The local store under `$FORKD_HOME` (layout in docs/ARCHITECTURE.md).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::fsutil::{
    IoContext, PathError, disk_usage, private_dir, sync_dir, unique_name, write_private,
};
use crate::home::{Home, NoHome, default_home};
use crate::lock::{FileLock, warn_waiting};
use crate::manifest::{MANIFEST_NAME, Manifest, ManifestError};
use crate::staging::Staging;
use crate::tag::Tag;

/// The newest store layout this forkd understands.
pub const LAYOUT_VERSION: i64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Io(#[from] PathError),
    #[error(
        "the store at {} uses layout {found}; this forkd understands up to {LAYOUT_VERSION} — upgrade forkd",
        path.display()
    )]
    LayoutTooNew { path: PathBuf, found: i64 },
    #[error("{} is not a valid forkd store file: {reason}", path.display())]
    BadLayout { path: PathBuf, reason: String },
    #[error("no image tagged `{0}` in the local store")]
    NotFound(Tag),
    #[error("an image tagged `{0}` already exists; pass --force to overwrite it")]
    Exists(Tag),
    #[error(
        "the local image `{tag}` came from {existing}, not from {owner}; pass --force to replace it (or --tag to pull it under another name)"
    )]
    OtherOwner {
        tag: Tag,
        /// `acme/tiny:1 from HUB`, or what else it is.
        existing: String,
        /// The owner of the image that would replace it.
        owner: String,
    },
    #[error("image `{tag}` has a bad manifest")]
    Manifest {
        tag: String,
        #[source]
        source: ManifestError,
    },
    #[error("cannot install: {0}")]
    Staging(String),
    #[error(
        "`{tag}` is the parent of {} branch(es) that cannot fork without it: {}",
        children.len(),
        children.join(", ")
    )]
    HasChildren {
        tag: Tag,
        /// The tags of the branches made from it (directly).
        children: Vec<String>,
    },
    #[error(transparent)]
    NoHome(#[from] NoHome),
}

/// Whether `commit` may replace an existing tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    /// An existing tag is an error that names `--force`.
    No,
    /// Replace the existing tag atomically.
    Yes,
}

/// One installed image.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub tag: Tag,
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Snapshot {
    /// Path of one file of the snapshot, e.g. `snapshot.path("memory.bin")`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// One file of an image checked against its manifest by [`Store::verify`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileCheck {
    pub name: String,
    /// Size and sha256 match the manifest.
    pub ok: bool,
    pub expected_size: u64,
    pub expected_sha256: String,
    /// What is on disk (`None` when it could not be read: see `error`).
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub error: Option<String>,
}

/// An installed image with its sizes, as listed by [`Store::list`].
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub tag: Tag,
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Sum of the files' logical sizes (what `ls -l` shows).
    pub apparent_size: u64,
    /// Bytes actually allocated on disk (holes excluded).
    pub disk_size: u64,
}

type WaitHook = Arc<dyn Fn(&Path) + Send + Sync>;

/// One directory of images/: its tag, and the image read from it or why it could not be.
type Scanned = (Tag, Result<Snapshot, StoreError>);

/// A handle on the local store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    home: Home,
    on_wait: WaitHook,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("home", &self.home.path())
            .finish()
    }
}

impl Store {
    /// Open (creating if needed) the store at `home`, and sweep stale staging leftovers. The
    /// home and its directories are 0700 whatever the umask; a home others could enter is made
    /// 0700 again (with a warning).
    pub fn open(home: &Path) -> Result<Store, StoreError> {
        private_dir(home)?;
        let store = Store {
            home: Home::new(home),
            on_wait: Arc::new(warn_waiting),
        };
        store.check_layout()?;
        let h = &store.home;
        for p in [h.images_dir(), h.tmp_dir(), h.locks_dir()] {
            private_dir(&p)?;
        }
        store.sweep_tmp();
        Ok(store)
    }

    /// Open the store at [`default_home`](crate::home::default_home).
    pub fn open_default() -> Result<Store, StoreError> {
        Store::open(&default_home()?)
    }

    /// Replace what happens when the store lock is busy (default: a `tracing::warn!`).
    pub fn with_lock_notice(mut self, f: impl Fn(&Path) + Send + Sync + 'static) -> Store {
        self.on_wait = Arc::new(f);
        self
    }

    /// The home directory and its layout.
    pub fn home(&self) -> &Home {
        &self.home
    }

    pub(crate) fn images_dir(&self) -> PathBuf {
        self.home.images_dir()
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.home.tmp_dir()
    }

    /// Take the store-wide exclusive lock (telling the user if we have to wait).
    pub(crate) fn lock(&self) -> Result<FileLock, StoreError> {
        let path = self.home.store_lock();
        Ok(FileLock::exclusive(&path, |p| (self.on_wait)(p))?)
    }

    fn check_layout(&self) -> Result<(), StoreError> {
        let path = self.home.layout_file();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let tmp = self.home.path().join(unique_name(".store.toml.tmp-"));
                write_private(&tmp, format!("layout = {LAYOUT_VERSION}\n"))?;
                fs::File::open(&tmp)
                    .and_then(|f| f.sync_all())
                    .at("cannot sync", &tmp)?;
                fs::rename(&tmp, &path).at("cannot create", &path)?;
                sync_dir(self.home.path())?;
                return Ok(());
            }
            Err(e) => return Err(e).at("cannot read", &path)?,
        };
        let bad = |reason: String| StoreError::BadLayout {
            path: path.clone(),
            reason,
        };
        let table: toml::Table = toml::from_str(&text).map_err(|e| bad(e.message().to_string()))?;
        match table.get("layout") {
            Some(toml::Value::Integer(v)) if *v > LAYOUT_VERSION => {
                Err(StoreError::LayoutTooNew { path, found: *v })
            }
            Some(toml::Value::Integer(v)) if *v >= 1 => Ok(()),
            _ => Err(bad("expected `layout = 1`".into())),
        }
    }

    /// Remove leftovers in tmp/ whose owner is gone (their `.lock` file can be locked).
    fn sweep_tmp(&self) {
        let tmp = self.tmp_dir();
        let Ok(entries) = fs::read_dir(&tmp) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(".new-") {
                // A lock file being born; only a crash leaves one behind for long.
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > 60);
                if old {
                    let _ = fs::remove_file(&path);
                }
                continue;
            }
            if let Some(base) = name.strip_suffix(".lock") {
                // Lock files appear already locked (see FileLock::create_new), so one we can
                // lock belongs to a dead process; its directory, if any, is swept with it.
                if !tmp.join(base).exists()
                    && let Ok(Some(_l)) = FileLock::try_existing(&path)
                {
                    let _ = fs::remove_file(&path);
                }
                continue;
            }
            let lock_path = tmp.join(format!("{name}.lock"));
            let held = if lock_path.exists() {
                match FileLock::try_existing(&lock_path) {
                    Ok(Some(l)) => Some(l),
                    _ => continue, // a live process owns it
                }
            } else {
                None // owners create the lock before the entry, so no lock means no owner
            };
            tracing::debug!("removing stale {}", path.display());
            let r = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            if let Err(e) = r {
                tracing::warn!("cannot remove stale {}: {e}", path.display());
                continue;
            }
            if held.is_some() {
                let _ = fs::remove_file(&lock_path);
            }
        }
    }

    /// Every complete image in the store, sorted by tag. Anything else in images/ is ignored.
    pub fn list(&self) -> Result<Vec<ImageInfo>, StoreError> {
        let mut out = Vec::new();
        for (tag, snap) in self.scan()? {
            let snap = match snap {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("ignoring image `{tag}`: {e}");
                    continue;
                }
            };
            let (mut apparent, mut disk) = (0u64, 0u64);
            for name in snap
                .manifest
                .files
                .keys()
                .map(String::as_str)
                .chain([MANIFEST_NAME])
            {
                if let Ok(m) = fs::metadata(snap.path(name)) {
                    apparent += m.len();
                    disk += disk_usage(&m);
                }
            }
            out.push(ImageInfo {
                tag: snap.tag,
                dir: snap.dir,
                manifest: snap.manifest,
                apparent_size: apparent,
                disk_size: disk,
            });
        }
        Ok(out)
    }

    /// Every directory of images/ named like a tag, sorted by tag, with the image read from
    /// it or why it could not be. Anything else in images/ is ignored.
    fn scan(&self) -> Result<Vec<Scanned>, StoreError> {
        let dir = self.images_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).at("cannot read", &dir)? {
            let entry = entry.at("cannot read", &dir)?;
            let name = entry.file_name();
            let Some(tag) = name.to_str().and_then(|n| Tag::parse(n).ok()) else {
                tracing::debug!("ignoring {:?} in {}", name, dir.display());
                continue;
            };
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let snap = self.get(&tag);
            out.push((tag, snap));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The installed image `tag`.
    pub fn get(&self, tag: &Tag) -> Result<Snapshot, StoreError> {
        let dir = self.images_dir().join(tag.as_str());
        let mpath = dir.join(MANIFEST_NAME);
        let text = match fs::read_to_string(&mpath) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(tag.clone()));
            }
            Err(e) => return Err(e).at("cannot read", &mpath)?,
        };
        let manifest = Manifest::parse(&text).map_err(|source| StoreError::Manifest {
            tag: tag.to_string(),
            source,
        })?;
        Ok(Snapshot {
            tag: tag.clone(),
            dir,
            manifest,
        })
    }

    /// The installed image whose [`Manifest::digest`] is `digest` (the first by tag when the
    /// same content is installed under several tags), if any.
    pub fn find_by_digest(&self, digest: &str) -> Result<Option<Snapshot>, StoreError> {
        Ok(self
            .images()?
            .into_iter()
            .find(|s| s.manifest.digest() == digest))
    }

    /// The tags of the images that name `tag` as their parent (branches made from it).
    pub fn children_of(&self, tag: &Tag) -> Result<Vec<Tag>, StoreError> {
        let digest = self.get(tag)?.manifest.digest();
        let images = self.images()?;
        // Another tag with the same content would serve the branches as well.
        if images
            .iter()
            .any(|s| s.tag != *tag && s.manifest.digest() == digest)
        {
            return Ok(Vec::new());
        }
        Ok(images
            .into_iter()
            .filter(|s| s.manifest.parent_digest.as_deref() == Some(digest.as_str()))
            .map(|s| s.tag)
            .collect())
    }

    /// Every image that reads (see [`Store::scan`]), sorted by tag, without sizes.
    pub fn images(&self) -> Result<Vec<Snapshot>, StoreError> {
        Ok(self
            .scan()?
            .into_iter()
            .filter_map(|(_, s)| s.ok())
            .collect())
    }

    /// Where the image `tag` came from (`origin.json`), if it was pulled.
    pub fn origin(&self, tag: &Tag) -> Result<Option<crate::Origin>, StoreError> {
        let dir = self.images_dir().join(tag.as_str());
        crate::Origin::load(&dir).map_err(|reason| StoreError::BadLayout {
            path: dir.join(crate::origin::ORIGIN_NAME),
            reason,
        })
    }

    /// Re-hash every file of the image `tag` (holes read as zeros) and compare it with its
    /// manifest.
    pub fn verify(&self, tag: &Tag) -> Result<Vec<FileCheck>, StoreError> {
        let snap = self.get(tag)?;
        let mut out = Vec::new();
        for (name, entry) in &snap.manifest.files {
            let path = snap.path(name);
            let actual = crate::fsutil::open_nofollow(&path)
                .and_then(|f| crate::sparse::hash_file(&f))
                .map_err(|e| e.to_string());
            let (size, sha256, error) = match actual {
                Ok((size, sha)) => (Some(size), Some(sha), None),
                Err(e) => (None, None, Some(e)),
            };
            out.push(FileCheck {
                name: name.clone(),
                ok: size == Some(entry.size) && sha256.as_deref() == Some(entry.sha256.as_str()),
                expected_size: entry.size,
                expected_sha256: entry.sha256.clone(),
                size,
                sha256,
                error,
            });
        }
        Ok(out)
    }

    /// Remove the image `tag` (atomically: it disappears at once, then is deleted). An image
    /// that branches were made from is refused ([`StoreError::HasChildren`]): see
    /// [`Store::remove_even_parent`].
    pub fn remove(&self, tag: &Tag) -> Result<(), StoreError> {
        self.remove_inner(tag, false)
    }

    /// [`Store::remove`], also when branches need the image (they will not fork until it is
    /// installed again: `rmi --force`).
    pub fn remove_even_parent(&self, tag: &Tag) -> Result<(), StoreError> {
        self.remove_inner(tag, true)
    }

    fn remove_inner(&self, tag: &Tag, even_parent: bool) -> Result<(), StoreError> {
        let dir = self.images_dir().join(tag.as_str());
        let aside = {
            let _lock = self.lock()?;
            if !dir.join(MANIFEST_NAME).exists() {
                return Err(StoreError::NotFound(tag.clone()));
            }
            if !even_parent {
                let children = self.children_of(tag)?;
                if !children.is_empty() {
                    return Err(StoreError::HasChildren {
                        tag: tag.clone(),
                        children: children.iter().map(|t| t.to_string()).collect(),
                    });
                }
            }
            let aside = self.move_aside(&dir)?;
            sync_dir(&self.images_dir())?;
            aside
        };
        aside.delete();
        Ok(())
    }

    /// Rename `dir` into tmp/ under a fresh locked name; the caller holds the store lock.
    pub(crate) fn move_aside(&self, dir: &Path) -> Result<Aside, StoreError> {
        let name = unique_name("old-");
        let lock = FileLock::create_new(&self.tmp_dir().join(format!("{name}.lock")))?;
        let path = self.tmp_dir().join(&name);
        fs::rename(dir, &path).at("cannot move aside", dir)?;
        Ok(Aside { path, lock })
    }

    /// A new staging directory in tmp/ to write a snapshot into.
    pub fn stage(&self) -> Result<Staging, StoreError> {
        Staging::new(self.clone())
    }
}

/// A directory moved into tmp/ to be deleted; its lock keeps the sweeper off.
pub(crate) struct Aside {
    path: PathBuf,
    lock: FileLock,
}

impl Aside {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn delete(self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            tracing::warn!("cannot delete {}: {e}", self.path.display());
            return;
        }
        let _ = fs::remove_file(lock_path_of(&self.path));
        drop(self.lock);
    }
}

/// `tmp/<id>` -> `tmp/<id>.lock`
pub(crate) fn lock_path_of(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}
