//! A throwaway Garage (<https://garagehq.deuxfleurs.fr>) for tests: a
//! production S3-protocol object store, one node on loopback ports, its own
//! process with its data in a temporary directory, killed on drop.
//!
//! Garage starts as a single-node cluster with one access key and one
//! bucket (`--single-node --default-bucket`). It keeps no object versions
//! and has no Object Lock; it does check the SHA-256 of each part. The
//! program is `CUTOVER_GARAGE`, else `garage` on `PATH`, else
//! `~/.cache/cutover-garage/bin/garage`, where `scripts/setup` installs it
//! (`cargo install garage`). A test that cannot start it fails: it never
//! skips.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::stable_free_addr;

/// A running single-node Garage owned by the test.
pub struct TestGarage {
    child: Child,
    s3: String,
    access_key: String,
    secret_key: String,
    bucket: String,
    _dir: tempfile::TempDir,
}

/// Where the Garage program is.
pub fn program() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("CUTOVER_GARAGE") {
        return Ok(p.into());
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("garage"))
        .find(|p| p.is_file());
    let cached = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/cutover-garage/bin/garage"));
    on_path
        .or(cached.filter(|p| p.is_file()))
        .context("no garage program: run scripts/setup (cargo install garage), or set CUTOVER_GARAGE")
}

impl TestGarage {
    /// Starts Garage with bucket `bucket` and waits until its S3 API
    /// listens.
    pub fn start(bucket: &str) -> Result<TestGarage> {
        let program = program()?;
        let dir = tempfile::Builder::new().prefix("cutover-garage-").tempdir()?;
        let (s3, rpc) = (stable_free_addr(), stable_free_addr());
        // Garage's formats: a key id of GK and 24 hex digits, 32-byte hex secrets.
        let hex32 = || format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        let (secret, rpc_secret) = (hex32(), hex32());
        let access_key = format!("GK{}", &hex32()[..24]);
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = {meta:?}\ndata_dir = {data:?}\ndb_engine = \"sqlite\"\nreplication_factor = 1\n\
                 rpc_bind_addr = \"{rpc}\"\nrpc_public_addr = \"{rpc}\"\nrpc_secret = \"{rpc_secret}\"\n\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"{s3}\"\nroot_domain = \".s3.garage.localhost\"\n",
                meta = dir.path().join("meta"),
                data = dir.path().join("data"),
            ),
        )?;
        let log = dir.path().join("garage.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&program)
            .arg("-c")
            .arg(&config)
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &access_key)
            .env("GARAGE_DEFAULT_SECRET_KEY", &secret)
            .env("GARAGE_DEFAULT_BUCKET", bucket)
            .env("RUST_LOG", "garage=info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let mut g = TestGarage {
            child,
            s3,
            access_key,
            secret_key: secret,
            bucket: bucket.to_owned(),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("S3 API server listening on") {
                return Ok(g);
            }
            if let Some(status) = g.child.try_wait()? {
                bail!("{} exited ({status}):\n{text}", program.display());
            }
            if Instant::now() > deadline {
                bail!("{} did not start within 60 s:\n{text}", program.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.s3)
    }

    /// The access key's id.
    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    /// The secret of the access key (tests search logs for it).
    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// An agent's `[backup]` section for the bucket, with the access key in
    /// a credentials file and encryption key `key_hex` under id `k1`, both
    /// written into `dir`.
    pub fn backup_config(
        &self,
        prefix: &str,
        dir: &std::path::Path,
        key_hex: &str,
    ) -> Result<cutover_shared::config::BackupStoreConfig> {
        crate::s3::Store {
            endpoint: self.endpoint(),
            region: "garage",
            bucket: &self.bucket,
            access_key: &self.access_key,
            secret: &self.secret_key,
        }
        .config(prefix, dir, key_hex)
    }
}

impl Drop for TestGarage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
