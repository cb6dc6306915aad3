//! Staging directories: where a snapshot is written before it becomes visible as a tag.

use std::fs;
use std::path::{Path, PathBuf};

use crate::fsutil::{DIR_MODE, IoContext, make_private, sync_dir, unique_name, write_private};
use crate::lock::FileLock;
use crate::manifest::{MANIFEST_NAME, Manifest};
use crate::origin::{ORIGIN_NAME, Origin};
use crate::store::{Overwrite, Snapshot, Store, StoreError, lock_path_of};
use crate::tag::Tag;
use crate::workingset::WORKINGSET_NAME;
use std::os::unix::fs::DirBuilderExt;

/// A directory under `tmp/` owned by this process (its `.lock` is held). Write the snapshot's
/// files into [`Staging::dir`], then [`Staging::commit`]. Dropped uncommitted, it is deleted.
#[derive(Debug)]
pub struct Staging {
    store: Store,
    dir: PathBuf,
    lock: Option<FileLock>,
}

impl Staging {
    pub(crate) fn new(store: Store) -> Result<Staging, StoreError> {
        let name = unique_name("stage-");
        let dir = store.tmp_dir().join(&name);
        // The lock exists (and is held) before the directory, so the sweeper never takes a
        // directory that is being written.
        let lock = FileLock::create_new(&lock_path_of(&dir))?;
        fs::DirBuilder::new()
            .mode(DIR_MODE)
            .create(&dir)
            .at("cannot create staging directory", &dir)?;
        Ok(Staging {
            store,
            dir,
            lock: Some(lock),
        })
    }

    /// The directory to write the snapshot's files into (flat: no subdirectories).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Check that the directory holds exactly the files the manifest lists, with the listed
    /// sizes; write manifest.toml; make every file 0600 (whatever wrote it and whatever the
    /// umask); fsync everything; and atomically install it as `tag`.
    pub fn commit(
        self,
        tag: &Tag,
        manifest: &Manifest,
        overwrite: Overwrite,
    ) -> Result<Snapshot, StoreError> {
        self.install(tag, manifest, overwrite, None)
    }

    /// [`Staging::commit`] for a pulled image: `origin.json` is written beside it. With
    /// [`Overwrite::No`] an existing `tag` is replaced only when it was pulled from the same
    /// owner (a newer version of what was pulled before); anything else (another owner's image,
    /// an image made on this host) is [`StoreError::OtherOwner`]. [`Overwrite::Yes`] (`--force`)
    /// replaces it whatever it is. The check is made under the store lock.
    pub fn commit_pulled(
        self,
        tag: &Tag,
        manifest: &Manifest,
        origin: &Origin,
        overwrite: Overwrite,
    ) -> Result<Snapshot, StoreError> {
        self.install(tag, manifest, overwrite, Some(origin))
    }

    fn install(
        mut self,
        tag: &Tag,
        manifest: &Manifest,
        overwrite: Overwrite,
        origin: Option<&Origin>,
    ) -> Result<Snapshot, StoreError> {
        let text = manifest.to_toml().map_err(|source| StoreError::Manifest {
            tag: tag.to_string(),
            source,
        })?;
        self.check_contents(manifest)?;
        let mpath = self.dir.join(MANIFEST_NAME);
        write_private(&mpath, text)?;
        if let Some(origin) = origin {
            let opath = self.dir.join(ORIGIN_NAME);
            let body = serde_json::to_vec_pretty(origin).expect("serialisable");
            write_private(&opath, body)?;
        }
        for name in manifest
            .files
            .keys()
            .map(String::as_str)
            .chain([MANIFEST_NAME])
            .chain(origin.map(|_| ORIGIN_NAME))
            .chain(
                self.dir
                    .join(WORKINGSET_NAME)
                    .is_file()
                    .then_some(WORKINGSET_NAME),
            )
        {
            let p = self.dir.join(name);
            let f = fs::File::open(&p).at("cannot open", &p)?;
            make_private(&f, &p)?;
            f.sync_all().at("cannot sync", &p)?;
        }
        fs::set_permissions(
            &self.dir,
            std::os::unix::fs::PermissionsExt::from_mode(DIR_MODE),
        )
        .at("cannot chmod", &self.dir)?;
        sync_dir(&self.dir)?;

        let images = self.store.images_dir();
        let target = images.join(tag.as_str());
        let old = {
            let _lock = self.store.lock()?;
            let exists = fs::symlink_metadata(&target).is_ok();
            if let (true, Some(new), Overwrite::No) = (exists, origin, overwrite) {
                let existing = match Origin::load(&target) {
                    Ok(Some(o)) if o.owner == new.owner => None,
                    Ok(Some(o)) => Some(o.describe()),
                    Ok(None) => Some("this host (it was not pulled)".to_string()),
                    Err(e) => Some(format!("an unknown place ({e})")),
                };
                if let Some(existing) = existing {
                    return Err(StoreError::OtherOwner {
                        tag: tag.clone(),
                        existing,
                        owner: new.owner.clone(),
                    });
                }
            }
            let old = match fs::symlink_metadata(&target) {
                Ok(_) if overwrite == Overwrite::No && origin.is_none() => {
                    return Err(StoreError::Exists(tag.clone()));
                }
                Ok(_) => Some(self.store.move_aside(&target)?),
                Err(_) => None,
            };
            if let Err(e) = fs::rename(&self.dir, &target) {
                // Put the old image back so a failed overwrite loses nothing.
                if let Some(old) = &old {
                    let _ = fs::rename(old.path(), &target);
                }
                return Err(e).at("cannot install", &target)?;
            }
            sync_dir(&images)?;
            sync_dir(&self.store.tmp_dir())?;
            old
        };
        // Installed: the staging name is gone, release its lock and remove the lock file.
        let _ = fs::remove_file(lock_path_of(&self.dir));
        self.lock = None;
        if let Some(old) = old {
            old.delete();
        }
        tracing::debug!("installed image `{tag}` at {}", target.display());
        Ok(Snapshot {
            tag: tag.clone(),
            dir: target,
            manifest: manifest.clone(),
        })
    }

    fn check_contents(&self, manifest: &Manifest) -> Result<(), StoreError> {
        for (name, entry) in &manifest.files {
            let p = self.dir.join(name);
            let meta = fs::symlink_metadata(&p).map_err(|_| {
                StoreError::Staging(format!("{name} is listed in the manifest but missing"))
            })?;
            if !meta.is_file() {
                return Err(StoreError::Staging(format!("{name} is not a regular file")));
            }
            if meta.len() != entry.size {
                return Err(StoreError::Staging(format!(
                    "{name} is {} bytes but the manifest says {}",
                    meta.len(),
                    entry.size
                )));
            }
        }
        for e in fs::read_dir(&self.dir).at("cannot read", &self.dir)? {
            let e = e.at("cannot read", &self.dir)?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name != MANIFEST_NAME
                && name != ORIGIN_NAME
                && name != WORKINGSET_NAME
                && !manifest.files.contains_key(&name)
            {
                return Err(StoreError::Staging(format!(
                    "{name} is in the staging directory but not listed in the manifest"
                )));
            }
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.lock.is_some() {
            if let Err(e) = fs::remove_dir_all(&self.dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!("cannot remove {}: {e}", self.dir.display());
            }
            let _ = fs::remove_file(lock_path_of(&self.dir));
            self.lock = None;
        }
    }
}
