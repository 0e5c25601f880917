//! The object store behind backups: one S3-protocol bucket, reached with
//! aws-sdk-s3 the same way against AWS, Garage, MinIO or a test server.
//!
//! Uploads are multipart, fed part by part from a bounded channel, so a
//! backup never sits whole in memory or on disk. Every part carries its
//! SHA-256 (the server rejects a part whose bytes do not match it); the
//! whole object's SHA-256 is computed on the way and returned for the
//! catalog, and a download is hashed again and compared. An upload that
//! fails or whose producer stops early is aborted, so no parts are left
//! behind; [`ObjectStore::abort_incomplete`] cleans up after a crash.

use std::time::Duration;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketVersioningStatus, ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ObjectLockEnabled,
    ObjectLockRetention, ObjectLockRetentionMode, ServerSideEncryption,
};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use cutover_shared::config::BackupStoreConfig;
use cutover_shared::release::hex;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::BackupError;

/// What a producer sends an upload.
pub enum Piece {
    /// The next part (at least the part size, except the last).
    Part(Vec<u8>),
    /// The stream is complete.
    End,
    /// The producer failed: abort.
    Failed(String),
}

/// A finished upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uploaded {
    pub key: String,
    /// The object's version (versioned buckets).
    pub version_id: Option<String>,
    pub size: u64,
    /// SHA-256 of the whole object, hex.
    pub sha256: String,
    pub parts: u32,
}

/// A bucket's default Object Lock retention.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockDefault {
    /// `GOVERNANCE` or `COMPLIANCE`.
    pub mode: ObjectLockRetentionMode,
    pub period: Duration,
}

/// See [`ObjectStore::head`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectHead {
    /// Object Lock: not deletable before then (Unix ms).
    pub retain_until_unix_ms: Option<i64>,
    /// `AES256` or `aws:kms`, when the store encrypts it.
    pub server_side_encryption: Option<String>,
}

/// One bucket and key prefix.
#[derive(Clone)]
pub struct ObjectStore {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    sse: Option<(ServerSideEncryption, Option<String>)>,
    part_size: usize,
}

fn store_err(what: &str, e: impl std::error::Error) -> BackupError {
    BackupError::Store(crate::aws::error_chain(what, &e))
}

impl ObjectStore {
    /// A client for `cfg`, with credentials from the usual AWS chain.
    pub async fn connect(cfg: &BackupStoreConfig) -> Result<ObjectStore, BackupError> {
        cfg.validate().map_err(|e| BackupError::Config(e.to_string()))?;
        let shared = crate::aws::sdk_config(&cfg.region, cfg.credentials_file.as_deref()).await;
        let mut b = aws_sdk_s3::config::Builder::from(&shared)
            // We send our own SHA-256 with every part; the SDK must not add
            // a CRC32 of its own, which a SHA-256 upload refuses.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            .timeout_config(TimeoutConfig::builder().connect_timeout(Duration::from_secs(5)).build());
        if let Some(endpoint) = &cfg.endpoint {
            b = b.endpoint_url(endpoint);
        }
        b = b.force_path_style(cfg.path_style.unwrap_or(cfg.endpoint.is_some()));
        let sse = match cfg.server_side_encryption.as_deref() {
            Some("AES256") => Some((ServerSideEncryption::Aes256, None)),
            Some("aws:kms") => Some((ServerSideEncryption::AwsKms, cfg.kms_key_id.clone())),
            _ => None,
        };
        Ok(ObjectStore {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            bucket: cfg.bucket.clone(),
            prefix: cfg.prefix.clone(),
            sse,
            part_size: cfg.part_size_mib as usize * 1024 * 1024,
        })
    }

    /// Bytes per part.
    pub fn part_size(&self) -> usize {
        self.part_size
    }

    /// The full object key for `name` (under the configured prefix).
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Whether the bucket keeps versions (backups need it: an overwritten
    /// or deleted object stays recoverable). Asks GetBucketVersioning; a
    /// server whose answer the SDK cannot read (moto names the XML root
    /// differently) is asked by writing a probe object instead: a
    /// versioned bucket gives it a version id. The probe is deleted.
    pub async fn versioning_enabled(&self) -> Result<bool, BackupError> {
        let asked = self.client.get_bucket_versioning().bucket(&self.bucket).send().await;
        if let Ok(v) = asked {
            return Ok(v.status() == Some(&BucketVersioningStatus::Enabled));
        }
        // One probe per asker: agents sharing a bucket check at once.
        let probe = self.key(&format!(".cutover-versioning-probe-{}", uuid::Uuid::new_v4().simple()));
        let version = self.put(&probe, b"probe".to_vec()).await?;
        self.delete(&probe, version.as_deref()).await?;
        Ok(version.is_some())
    }

    /// Uploads what `pieces` delivers to `key`. Returns only after the
    /// object is complete; on any failure (the store's or the producer's)
    /// the multipart upload is aborted first.
    pub async fn upload(&self, key: &str, mut pieces: mpsc::Receiver<Piece>) -> Result<Uploaded, BackupError> {
        let mut create = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .checksum_algorithm(ChecksumAlgorithm::Sha256);
        if let Some((sse, kms)) = &self.sse {
            create = create
                .server_side_encryption(sse.clone())
                .set_ssekms_key_id(kms.clone());
        }
        let created = create
            .send()
            .await
            .map_err(|e| store_err(&format!("starting the upload of {key}"), e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| BackupError::Store(format!("the store gave no upload id for {key}")))?
            .to_owned();
        let result = self.upload_parts(key, &upload_id, &mut pieces).await;
        match result {
            Ok(done) => Ok(done),
            Err(e) => {
                // Close the channel first so the producer stops.
                pieces.close();
                if let Err(abort) = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .send()
                    .await
                {
                    tracing::warn!(key, "aborting the failed upload: {}", store_err("abort", abort));
                }
                metrics::counter!("cutover_backup_uploads_aborted_total").increment(1);
                Err(e)
            }
        }
    }

    async fn upload_parts(
        &self,
        key: &str,
        upload_id: &str,
        pieces: &mut mpsc::Receiver<Piece>,
    ) -> Result<Uploaded, BackupError> {
        let mut whole = Sha256::new();
        let mut size = 0u64;
        let mut parts = Vec::new();
        loop {
            let part = match pieces.recv().await {
                Some(Piece::Part(p)) => p,
                Some(Piece::End) => break,
                Some(Piece::Failed(why)) => return Err(BackupError::Source(why)),
                None => return Err(BackupError::Source("the backup stream stopped before its end".into())),
            };
            let number = parts.len() as i32 + 1;
            if number > 10_000 {
                return Err(BackupError::Store(format!(
                    "{key}: more than 10,000 parts; raise part_size_mib"
                )));
            }
            whole.update(&part);
            size += part.len() as u64;
            let sha = B64.encode(Sha256::digest(&part));
            let out = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .checksum_algorithm(ChecksumAlgorithm::Sha256)
                .checksum_sha256(&sha)
                .content_length(part.len() as i64)
                .body(ByteStream::from(part))
                .send()
                .await
                .map_err(|e| store_err(&format!("uploading part {number} of {key}"), e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_owned))
                    .checksum_sha256(sha)
                    .build(),
            );
        }
        if parts.is_empty() {
            return Err(BackupError::Source("the backup stream was empty".into()));
        }
        let n = parts.len() as u32;
        let done = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await
            .map_err(|e| store_err(&format!("completing the upload of {key}"), e))?;
        Ok(Uploaded {
            key: key.to_owned(),
            version_id: done.version_id().map(str::to_owned),
            size,
            sha256: hex(&whole.finalize()),
            parts: n,
        })
    }

    /// Streams an object (a version of it, if given) into `tx`, chunk by
    /// chunk; returns its size and SHA-256, or `None` if the receiver went
    /// away before the end (it stopped reading: its error is the verdict).
    pub async fn download(
        &self,
        key: &str,
        version: Option<&str>,
        tx: mpsc::Sender<Vec<u8>>,
    ) -> Result<Option<(u64, String)>, BackupError> {
        let mut out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version.map(str::to_owned))
            .send()
            .await
            .map_err(|e| store_err(&format!("downloading {key}"), e))?;
        let mut h = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = out
            .body
            .try_next()
            .await
            .map_err(|e| store_err(&format!("downloading {key}"), e))?
        {
            h.update(&chunk);
            size += chunk.len() as u64;
            if tx.send(chunk.to_vec()).await.is_err() {
                return Ok(None);
            }
        }
        Ok(Some((size, hex(&h.finalize()))))
    }

    /// Aborts every unfinished multipart upload under `prefix` (the
    /// remains of a crash mid-upload). Returns how many.
    pub async fn abort_incomplete(&self, prefix: &str) -> Result<usize, BackupError> {
        let mut n = 0;
        let mut key_marker: Option<String> = None;
        let mut id_marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
                .map_err(|e| store_err("listing unfinished uploads", e))?;
            for u in page.uploads() {
                if let (Some(key), Some(id)) = (u.key(), u.upload_id()) {
                    self.client
                        .abort_multipart_upload()
                        .bucket(&self.bucket)
                        .key(key)
                        .upload_id(id)
                        .send()
                        .await
                        .map_err(|e| store_err(&format!("aborting the upload of {key}"), e))?;
                    n += 1;
                }
            }
            if page.is_truncated() != Some(true) {
                return Ok(n);
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            id_marker = page.next_upload_id_marker().map(str::to_owned);
        }
    }

    /// The unfinished multipart uploads under `prefix` (keys).
    pub async fn incomplete(&self, prefix: &str) -> Result<Vec<String>, BackupError> {
        let page = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(prefix)
            .send()
            .await
            .map_err(|e| store_err("listing unfinished uploads", e))?;
        Ok(page
            .uploads()
            .iter()
            .filter_map(|u| u.key().map(str::to_owned))
            .collect())
    }

    /// Writes `bytes` as a new version of `key` (tests use it to damage an
    /// object the way a faulty store would).
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<Option<String>, BackupError> {
        let sha = B64.encode(Sha256::digest(&bytes));
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .checksum_sha256(sha)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| store_err(&format!("writing {key}"), e))?;
        Ok(out.version_id().map(str::to_owned))
    }

    /// Deletes one version of `key` (the whole key when `version` is
    /// `None`). A version already gone counts as deleted. A store under
    /// Object Lock refuses, and the error says so.
    pub async fn delete(&self, key: &str, version: Option<&str>) -> Result<(), BackupError> {
        let r = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version.map(str::to_owned))
            .send()
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) => {
                let code = e.as_service_error().and_then(|s| {
                    use aws_sdk_s3::error::ProvideErrorMetadata;
                    s.code().map(str::to_owned)
                });
                if matches!(code.as_deref(), Some("NoSuchKey" | "NoSuchVersion")) {
                    return Ok(());
                }
                Err(store_err(&format!("deleting {key}"), e))
            }
        }
    }

    /// The bucket's default Object Lock retention, if it has Object Lock
    /// with one. A bucket without Object Lock is `None`, not an error.
    pub async fn lock_default(&self) -> Result<Option<LockDefault>, BackupError> {
        let out = match self
            .client
            .get_object_lock_configuration()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                use aws_sdk_s3::error::ProvideErrorMetadata;
                let code = e.as_service_error().and_then(|s| s.code().map(str::to_owned));
                if code.as_deref() == Some("ObjectLockConfigurationNotFoundError") {
                    return Ok(None);
                }
                return Err(store_err("reading the bucket's Object Lock configuration", e));
            }
        };
        let Some(cfg) = out.object_lock_configuration() else {
            return Ok(None);
        };
        if cfg.object_lock_enabled() != Some(&ObjectLockEnabled::Enabled) {
            return Ok(None);
        }
        let Some(d) = cfg.rule().and_then(|r| r.default_retention()) else {
            return Ok(None);
        };
        let days = i64::from(d.days().unwrap_or(0)) + 365 * i64::from(d.years().unwrap_or(0));
        Ok(match (d.mode(), u64::try_from(days)) {
            (Some(mode), Ok(days)) if days > 0 => Some(LockDefault {
                mode: mode.clone(),
                period: Duration::from_secs(days * 86_400),
            }),
            _ => None,
        })
    }

    /// Puts a stored version under Object Lock `mode` until `until_ms`.
    pub async fn retain(
        &self,
        key: &str,
        version: Option<&str>,
        mode: ObjectLockRetentionMode,
        until_ms: i64,
    ) -> Result<(), BackupError> {
        let retention = ObjectLockRetention::builder()
            .mode(mode)
            .retain_until_date(aws_sdk_s3::primitives::DateTime::from_millis(until_ms))
            .build();
        self.client
            .put_object_retention()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version.map(str::to_owned))
            .retention(retention)
            .send()
            .await
            .map_err(|e| store_err(&format!("locking {key}"), e))?;
        Ok(())
    }

    /// What the store says of a stored version: its Object Lock
    /// retention and its server-side encryption.
    pub async fn head(&self, key: &str, version: Option<&str>) -> Result<ObjectHead, BackupError> {
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version.map(str::to_owned))
            .send()
            .await
            .map_err(|e| store_err(&format!("reading {key}"), e))?;
        Ok(ObjectHead {
            retain_until_unix_ms: head.object_lock_retain_until_date().and_then(|d| d.to_millis().ok()),
            server_side_encryption: head.server_side_encryption().map(|s| s.as_str().to_owned()),
        })
    }
}
