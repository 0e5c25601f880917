//! The embedded object store of `cutover dev` and `cutover demo`: an
//! S3-protocol server (s3s over a directory, s3s-fs) on loopback, with
//! SigV4 credentials of its own, so the agents back up through exactly the
//! aws-sdk-s3 code path they use against AWS, Garage or MinIO, and nothing
//! needs installing. It keeps no versions and has no Object Lock: the
//! agents warn about the first, which is what a real bucket without
//! versioning deserves.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cutover_shared::config::{BackupKeyFile, BackupStoreConfig};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The bucket the development agents back up to.
pub const BUCKET: &str = "backups";

/// A running development object store.
pub struct DevStore {
    /// Where objects live: `<root>/<bucket>/<key>`.
    pub root: PathBuf,
    /// The agents' `[backup]` section.
    pub config: BackupStoreConfig,
    server: JoinHandle<()>,
}

impl DevStore {
    /// Serves `dir/objects` on an ephemeral loopback port, with a random
    /// access key and secret written (0600) to `dir/credentials` and one
    /// encryption key to `dir/backup-key-dev-1`.
    pub async fn start(dir: &Path) -> Result<DevStore> {
        let root = dir.join("objects");
        std::fs::create_dir_all(root.join(BUCKET)).with_context(|| format!("creating {}", root.display()))?;
        let access = format!("DEV{}", uuid::Uuid::new_v4().simple()).to_uppercase();
        let secret = uuid::Uuid::new_v4().simple().to_string();
        let credentials = dir.join("credentials");
        cutover_shared::certs::write_file(
            &credentials,
            &format!("[default]\naws_access_key_id = {access}\naws_secret_access_key = {secret}\n"),
            true,
        )?;
        let key_file = dir.join("backup-key-dev-1");
        if !key_file.exists() {
            let key = cutover_agent::backup::seal::BackupKey::generate("dev-1")?;
            cutover_shared::certs::write_file(&key_file, &key.to_hex(), true)?;
        }
        let fs =
            s3s_fs::FileSystem::new(&root).map_err(|e| anyhow::anyhow!("object store at {}: {e:?}", root.display()))?;
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(access, secret));
        let service = b.build();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Ok(DevStore {
            root,
            config: BackupStoreConfig {
                endpoint: Some(format!("http://{addr}")),
                bucket: BUCKET.into(),
                credentials_file: Some(credentials),
                prefix: String::new(),
                region: "us-east-1".into(),
                path_style: Some(true),
                server_side_encryption: None,
                kms_key_id: None,
                keys: vec![BackupKeyFile {
                    id: "dev-1".into(),
                    file: key_file,
                }],
                part_size_mib: 5,
            },
            server,
        })
    }

    /// The file an object is stored in.
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.root.join(BUCKET).join(key)
    }
}

impl Drop for DevStore {
    fn drop(&mut self) {
        self.server.abort();
    }
}
