//! A throwaway S3-protocol server for tests: moto's `moto_server` on a
//! loopback port, its own process, killed on drop.
//!
//! moto implements SigV4 requests, versioning, Object Lock and multipart
//! uploads; it does not verify the checksums clients send, so tests of
//! checksums compare what cutover recorded with what it downloads. It does
//! not apply a bucket's default retention to multipart uploads (AWS does),
//! which is why the agent locks an upload the store left unlocked. The program is
//! `moto_server` on `PATH` (scripts/setup installs it from PyPI), or
//! `CUTOVER_MOTO_SERVER`. A test that cannot start it fails: it never
//! silently skips.
//!
//! This file depends on nothing else in `cutover-tests`, so the agent's
//! tests include it with `#[path]`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A running moto S3 server owned by the test.
pub struct TestS3 {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestS3 {
    /// Starts a server on an ephemeral loopback port and waits until it
    /// answers.
    pub fn start() -> Result<TestS3> {
        let program = std::env::var("CUTOVER_MOTO_SERVER").unwrap_or_else(|_| "moto_server".to_owned());
        let dir = tempfile::Builder::new().prefix("cutover-s3-").tempdir()?;
        let log = dir.path().join("moto.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {program} (pip install 'moto[server]', or set CUTOVER_MOTO_SERVER)"))?;
        let mut s3 = TestS3 {
            child,
            port: 0,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&s3.log).unwrap_or_default();
            // werkzeug prints this once the socket is bound.
            if let Some(port) = text
                .lines()
                .find_map(|l| l.split("Running on http://127.0.0.1:").nth(1))
                .and_then(|rest| rest.trim().trim_end_matches('/').parse().ok())
            {
                s3.port = port;
                break;
            }
            if let Some(status) = s3.child.try_wait()? {
                bail!("{program} exited ({status}):\n{text}");
            }
            if Instant::now() > deadline {
                bail!("{program} did not start within 60 s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(s3)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One plain HTTP request; moto does not check signatures, so bucket
    /// set-up needs no SDK. Returns the status code and body.
    fn request(&self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        self.request_with(method, path, "", body)
    }

    /// [`Self::request`] with extra header lines (each ending `\r\n`).
    fn request_with(&self, method: &str, path: &str, headers: &str, body: &str) -> Result<(u16, String)> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        )?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        let status = reply
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("bad reply to {method} {path}: {reply}"))?;
        Ok((status, reply))
    }

    /// A Route 53 client for this server (moto checks no signature).
    // The agent's tests include this file and do not call it.
    #[allow(dead_code)]
    pub fn route53(&self) -> aws_sdk_route53::Client {
        use aws_sdk_route53::config::{BehaviorVersion, Credentials, Region};
        let conf = aws_sdk_route53::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("AKIDTEST", "test-secret", None, None, "test"))
            .endpoint_url(self.endpoint())
            .build();
        aws_sdk_route53::Client::from_conf(conf)
    }

    /// A Route 53 `GET` (moto routes by the signing scope, and checks no
    /// signature), answered with the body: the raw XML, which keeps what
    /// moto wraps in CDATA (record values), unlike the SDK's parser.
    // The agent's tests include this file and do not call it.
    #[allow(dead_code)]
    pub fn route53_get(&self, path: &str) -> Result<String> {
        let auth = "Authorization: AWS4-HMAC-SHA256 Credential=AKIDTEST/20260101/us-east-1/route53/aws4_request, \
                    SignedHeaders=host, Signature=0\r\n";
        let (status, reply) = self.request_with("GET", path, auth, "")?;
        if status != 200 {
            bail!("GET {path}: {reply}");
        }
        Ok(reply)
    }

    /// An agent's `[backup]` section for `bucket` on this server: the
    /// credentials (any: moto does not check them; `secret` is what tests
    /// search logs for) and the encryption key `key_hex` under id `k1`,
    /// written into `dir`.
    pub fn backup_config(
        &self,
        bucket: &str,
        prefix: &str,
        dir: &std::path::Path,
        key_hex: &str,
        secret: &str,
    ) -> Result<cutover_shared::config::BackupStoreConfig> {
        let store = Store {
            endpoint: self.endpoint(),
            region: "us-east-1",
            bucket,
            access_key: "AKIDTEST",
            secret,
        };
        store.config(prefix, dir, key_hex)
    }

    /// Creates a bucket with Object Lock (so versioned), whose default
    /// retention keeps new objects `days` days in COMPLIANCE mode: not even
    /// the bucket's owner can delete them sooner.
    // The agent's tests include this file and do not call it.
    #[allow(dead_code)]
    pub fn create_locked_bucket(&self, name: &str, days: u32) -> Result<()> {
        let (status, reply) = self.request_with(
            "PUT",
            &format!("/{name}"),
            "x-amz-bucket-object-lock-enabled: true\r\n",
            "",
        )?;
        if status != 200 {
            bail!("creating bucket {name}: {reply}");
        }
        let body = format!(
            "<ObjectLockConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <ObjectLockEnabled>Enabled</ObjectLockEnabled><Rule><DefaultRetention><Mode>COMPLIANCE</Mode>\
             <Days>{days}</Days></DefaultRetention></Rule></ObjectLockConfiguration>"
        );
        let (status, reply) = self.request("PUT", &format!("/{name}?object-lock"), &body)?;
        if status != 200 {
            bail!("setting Object Lock on {name}: {reply}");
        }
        Ok(())
    }

    /// Creates a bucket, with versioning on if asked.
    pub fn create_bucket(&self, name: &str, versioned: bool) -> Result<()> {
        let (status, reply) = self.request("PUT", &format!("/{name}"), "")?;
        if status != 200 {
            bail!("creating bucket {name}: {reply}");
        }
        if versioned {
            let body = "<VersioningConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
                        <Status>Enabled</Status></VersioningConfiguration>";
            let (status, reply) = self.request("PUT", &format!("/{name}?versioning"), body)?;
            if status != 200 {
                bail!("enabling versioning on {name}: {reply}");
            }
        }
        Ok(())
    }
}

/// A bucket on a test server and the key to it.
pub struct Store<'a> {
    pub endpoint: String,
    pub region: &'a str,
    pub bucket: &'a str,
    pub access_key: &'a str,
    pub secret: &'a str,
}

impl Store<'_> {
    /// An agent's `[backup]` section for the bucket: the key in a
    /// credentials file and encryption key `key_hex` under id `k1`, both
    /// written into `dir`, 5 MiB parts.
    pub fn config(
        &self,
        prefix: &str,
        dir: &std::path::Path,
        key_hex: &str,
    ) -> Result<cutover_shared::config::BackupStoreConfig> {
        std::fs::write(dir.join("k1.key"), key_hex)?;
        std::fs::write(
            dir.join("credentials"),
            format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                self.access_key, self.secret
            ),
        )?;
        Ok(cutover_shared::config::BackupStoreConfig {
            endpoint: Some(self.endpoint.clone()),
            bucket: self.bucket.into(),
            credentials_file: Some(dir.join("credentials")),
            prefix: prefix.into(),
            region: self.region.into(),
            path_style: None,
            server_side_encryption: None,
            kms_key_id: None,
            keys: vec![cutover_shared::config::BackupKeyFile {
                id: "k1".into(),
                file: dir.join("k1.key"),
            }],
            part_size_mib: 5,
        })
    }
}

impl Drop for TestS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
