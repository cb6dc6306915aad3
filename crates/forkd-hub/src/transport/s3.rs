//! `s3://BUCKET/PREFIX`: S3-compatible storage (AWS S3, R2, Garage, MinIO) through
//! `object_store`. Credentials and region come from the standard `AWS_*` variables, the endpoint
//! from `AWS_ENDPOINT_URL`; plain-http endpoints (a local Garage) are allowed. Blobs larger than
//! [`MULTIPART_THRESHOLD`] upload in parts.

use super::{OpenError, TResult, Transport, TransportError};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use std::ops::Range;

pub const MULTIPART_THRESHOLD: usize = 16 << 20;
const PART_SIZE: usize = 8 << 20;

pub struct S3Transport {
    store: AmazonS3,
    bucket: String,
    prefix: String,
}

impl S3Transport {
    pub fn new(url: &url::Url) -> Result<Self, OpenError> {
        let shown = crate::redact::redact_url(url.as_str());
        let bucket = url.host_str().unwrap_or_default().to_string();
        if bucket.is_empty() {
            return Err(OpenError::Invalid {
                url: shown,
                msg: "expected s3://BUCKET/PREFIX".into(),
            });
        }
        let prefix = url.path().trim_matches('/').to_string();
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&bucket);
        let endpoint = std::env::var("AWS_ENDPOINT_URL_S3")
            .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
            .ok();
        if let Some(ep) = &endpoint {
            b = b.with_endpoint(ep);
            if ep.starts_with("http://") {
                b = b.with_allow_http(true);
            }
        }
        if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            b = b.with_region("us-east-1");
        }
        let store = b.build().map_err(|e| OpenError::S3 {
            url: shown,
            msg: e.to_string(),
        })?;
        Ok(Self {
            store,
            bucket,
            prefix,
        })
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.prefix))
        }
    }
}

fn map_err(key: &str, e: object_store::Error) -> TransportError {
    let key = key.to_string();
    match e {
        object_store::Error::NotFound { .. } => TransportError::NotFound { key },
        object_store::Error::PermissionDenied { .. } => TransportError::Forbidden { key },
        object_store::Error::Unauthenticated { .. } => TransportError::Unauthorized { key },
        other => TransportError::Other {
            key,
            msg: other.to_string(),
        },
    }
}

impl Transport for S3Transport {
    fn describe(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn get(&self, key: &str, max: u64) -> BoxFuture<'_, TResult<Bytes>> {
        let key = key.to_string();
        async move {
            let r = self
                .store
                .get(&self.path(&key))
                .await
                .map_err(|e| map_err(&key, e))?;
            let too_large = || TransportError::TooLarge {
                key: key.clone(),
                max,
            };
            if r.meta.size > max {
                return Err(too_large());
            }
            let mut stream = r.into_stream();
            let mut buf = bytes::BytesMut::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| map_err(&key, e))?;
                if buf.len() as u64 + chunk.len() as u64 > max {
                    return Err(too_large());
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(buf.freeze())
        }
        .boxed()
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> BoxFuture<'_, TResult<Bytes>> {
        let key = key.to_string();
        async move {
            self.store
                .get_range(&self.path(&key), range)
                .await
                .map_err(|e| map_err(&key, e))
        }
        .boxed()
    }

    fn exists(&self, key: &str) -> BoxFuture<'_, TResult<bool>> {
        let key = key.to_string();
        async move {
            match self.store.head(&self.path(&key)).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(map_err(&key, e)),
            }
        }
        .boxed()
    }

    fn put(&self, key: &str, data: Bytes) -> BoxFuture<'_, TResult<()>> {
        let key = key.to_string();
        async move {
            let path = self.path(&key);
            if data.len() <= MULTIPART_THRESHOLD {
                self.store
                    .put(&path, PutPayload::from(data))
                    .await
                    .map_err(|e| map_err(&key, e))?;
                return Ok(());
            }
            let upload = self
                .store
                .put_multipart(&path)
                .await
                .map_err(|e| map_err(&key, e))?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            w.put(data);
            w.finish().await.map_err(|e| map_err(&key, e))?;
            Ok(())
        }
        .boxed()
    }
}
