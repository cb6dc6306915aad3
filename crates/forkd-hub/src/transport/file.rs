//! `file:///DIR`: a hub on a local (or mounted) filesystem. Writes go to a temp file in the
//! same directory and are renamed into place, so readers never see a partial object.

use super::{TResult, Transport, TransportError};
use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

pub struct FileTransport {
    root: PathBuf,
}

impl FileTransport {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }
}

fn io_err(key: &str, e: std::io::Error) -> TransportError {
    if e.kind() == std::io::ErrorKind::NotFound {
        TransportError::NotFound { key: key.into() }
    } else {
        TransportError::Io {
            key: key.into(),
            source: e,
        }
    }
}

fn blocking<T: Send + 'static>(
    key: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> BoxFuture<'static, TResult<T>> {
    let key = key.to_string();
    async move {
        match tokio::task::spawn_blocking(f).await {
            Ok(r) => r.map_err(|e| io_err(&key, e)),
            Err(e) => Err(TransportError::Other {
                key,
                msg: e.to_string(),
            }),
        }
    }
    .boxed()
}

/// Write `data` to `path` atomically: temp file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("object path has a parent");
    fs_err::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file().sync_data()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

impl Transport for FileTransport {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn get(&self, key: &str, max: u64) -> BoxFuture<'_, TResult<Bytes>> {
        let p = self.path(key);
        let k = key.to_string();
        async move {
            let read = blocking(&k, move || {
                let f = std::fs::File::open(p)?;
                let mut buf = Vec::new();
                // One byte more than allowed tells "too large" from "exactly max".
                f.take(max.saturating_add(1)).read_to_end(&mut buf)?;
                Ok(buf)
            });
            let buf = read.await?;
            if buf.len() as u64 > max {
                return Err(TransportError::TooLarge { key: k, max });
            }
            Ok(Bytes::from(buf))
        }
        .boxed()
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> BoxFuture<'_, TResult<Bytes>> {
        let p = self.path(key);
        blocking(key, move || {
            let mut f = std::fs::File::open(p)?;
            f.seek(SeekFrom::Start(range.start))?;
            let mut buf = Vec::new();
            f.take(range.end.saturating_sub(range.start))
                .read_to_end(&mut buf)?;
            Ok(Bytes::from(buf))
        })
    }

    fn exists(&self, key: &str) -> BoxFuture<'_, TResult<bool>> {
        let p = self.path(key);
        blocking(key, move || Ok(p.is_file()))
    }

    fn put(&self, key: &str, data: Bytes) -> BoxFuture<'_, TResult<()>> {
        let p = self.path(key);
        blocking(key, move || write_atomic(&p, &data))
    }
}
