//! A throwaway PostgreSQL server for tests: `initdb` into a temporary
//! directory, `postgres` on a free loopback port (and a unix socket in the
//! same directory), stopped and removed on drop.
//!
//! The server binaries are taken from the newest `/usr/lib/postgresql/*/bin`
//! (Debian's layout), or from `CUTOVER_PG_BIN` if set. PostgreSQL refuses to
//! run as root, so under root (CI) the server runs as the `postgres` system
//! user through `runuser`, in a directory handed to that user.
//!
//! Local (unix socket) connections are trusted, which the harness itself
//! uses; TCP connections need the user's password (SCRAM), so a connection
//! string from [`TestPostgres::create_database`] carries a real secret that
//! the code under test has to pass on to libpq tools, and that tests can
//! look for in errors and reports.
//!
//! A test that cannot start PostgreSQL fails: it never silently skips.
//!
//! `cutover demo` starts its disaster-recovery chapter's primary, standby
//! and scratch servers with it too.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

/// The superuser `initdb` creates.
pub const SUPERUSER: &str = "cutover";

/// A running PostgreSQL server owned by the test.
pub struct TestPostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    password: String,
    /// `Some((uid, gid))` of the `postgres` user when we run as root.
    run_as: Option<(u32, u32)>,
}

impl TestPostgres {
    /// Initializes and starts a server; fails with the reason (and the
    /// server log) when it cannot.
    pub fn start() -> Result<TestPostgres> {
        let bin = find_bin_dir()?;
        let run_as = if is_root() { Some(postgres_user()?) } else { None };
        let dir = tempfile::Builder::new().prefix("cutover-pg-").tempdir()?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .with_context(|| format!("handing {} to the postgres user", dir.path().display()))?;
        }
        let password = unique_password();
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, format!("{password}\n"))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid))?;
        }
        let mut pg = TestPostgres {
            bin,
            dir,
            port: 0,
            password,
            run_as,
        };
        let data = pg.data_dir();
        pg.run(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                SUPERUSER,
                "--pwfile",
                path_str(&pwfile)?,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
        )?;
        let _ = std::fs::remove_file(&pwfile);
        pg.start_on_free_port()?;
        Ok(pg)
    }

    /// Starts the initialized server on a free port and waits until it is
    /// ready. The port is found by binding and releasing it, so another
    /// process may take it first: try a few.
    fn start_on_free_port(&mut self) -> Result<()> {
        let mut last = None;
        for _ in 0..3 {
            let port = free_port()?;
            match self.start_on(port) {
                Ok(()) => {
                    self.port = port;
                    return self.wait_ready(Duration::from_secs(30));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("postgres did not start")))
    }

    /// Starts a streaming standby of this server: `pg_basebackup -R` (the
    /// standby's `primary_conninfo` points at this server's unix socket)
    /// into a directory of its own, started on its own port. It has the same
    /// superuser and password; it is stopped and removed on drop.
    pub fn start_standby(&self) -> Result<TestPostgres> {
        let dir = tempfile::Builder::new().prefix("cutover-pg-standby-").tempdir()?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .with_context(|| format!("handing {} to the postgres user", dir.path().display()))?;
        }
        let mut standby = TestPostgres {
            bin: self.bin.clone(),
            dir,
            port: 0,
            password: self.password.clone(),
            run_as: self.run_as,
        };
        let port = self.port.to_string();
        standby.run(
            "pg_basebackup",
            &[
                "-h",
                path_str(self.dir.path())?,
                "-p",
                &port,
                "-U",
                SUPERUSER,
                "-D",
                path_str(&standby.data_dir())?,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
        )?;
        standby.start_on_free_port()?;
        Ok(standby)
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`), as a lost
    /// machine would: no checkpoint, no goodbye to its standbys.
    pub fn stop_immediately(&self) -> Result<()> {
        self.run(
            "pg_ctl",
            &["-D", path_str(&self.data_dir())?, "-m", "immediate", "-w", "stop"],
        )
    }

    /// This server's current WAL write position (`pg_current_wal_lsn`), as
    /// PostgreSQL prints it.
    pub fn current_lsn(&self) -> Result<String> {
        self.psql("postgres", "SELECT pg_current_wal_lsn()")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The directory of the server's unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The loopback TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's password (the secret in every URL handed out).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The server's binary directory (`pg_dump`, `psql`, ...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// The server's options: its port and socket directory, and
    /// `wal_log_hints` and `wal_keep_size` so that `pg_rewind` can rewind a
    /// superseded primary (it reads the WAL since the last common checkpoint).
    fn options(&self, port: u16) -> Result<String> {
        Ok(format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50 -c log_connections=on -c log_disconnections=on -c wal_log_hints=on -c wal_keep_size=128MB",
            path_str(self.dir.path())?
        ))
    }

    /// How an agent on this host stops and starts this server
    /// (`[databases.server]`): `pg_ctl` with this server's options, through
    /// `runuser` when the tests run as root, as the harness itself does.
    pub fn server_control(&self) -> Result<cutover_shared::config::ServerControl> {
        let argv = |args: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = Vec::new();
            if self.run_as.is_some() {
                v.extend(["runuser", "-u", "postgres", "--"].map(String::from));
            }
            v.push(self.bin.join("pg_ctl").display().to_string());
            v.extend(args.iter().map(|a| a.to_string()));
            v
        };
        let data = self.data_dir();
        let data = path_str(&data)?;
        let log = self.log_file();
        let opts = self.options(self.port)?;
        Ok(cutover_shared::config::ServerControl {
            data_directory: self.data_dir(),
            stop: argv(&["-D", data, "-m", "fast", "-w", "-t", "60", "stop"]),
            start: argv(&[
                "-D",
                data,
                "-l",
                path_str(&log)?,
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ]),
            run_as: self.run_as.map(|_| "postgres".to_owned()),
        })
    }

    fn start_on(&self, port: u16) -> Result<()> {
        let opts = self.options(port)?;
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.data_dir())?,
                "-l",
                path_str(&self.log_file())?,
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .map_err(|e| {
            let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
            e.context(format!("postgres server log:\n{log}"))
        })?;
        Ok(())
    }

    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let port = self.port.to_string();
            let ready = self.output("pg_isready", &["-h", "127.0.0.1", "-p", &port, "-t", "2"])?;
            if ready.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "postgres not ready after {timeout:?}: {}",
                    String::from_utf8_lossy(&ready.stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs SQL as the superuser over the unix socket (trusted) on `db`.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let port = self.port.to_string();
        let out = self.output(
            "psql",
            &[
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                path_str(self.dir.path())?,
                "-p",
                &port,
                "-U",
                SUPERUSER,
                "-d",
                db,
                "-c",
                sql,
            ],
        )?;
        if !out.status.success() {
            bail!("psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Creates a database and returns its URL: the superuser with its
    /// password, over loopback TCP.
    pub fn create_database(&self, name: &str) -> Result<String> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            bail!("database name {name:?}: use lowercase letters, digits and _");
        }
        self.psql("postgres", &format!("CREATE DATABASE {name}"))?;
        Ok(self.url(name))
    }

    /// The URL of database `name` (which need not exist).
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{}@127.0.0.1:{}/{name}",
            self.password, self.port
        )
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        let mut cmd = if self.run_as.is_some() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        // Whatever the test's environment says about PostgreSQL is not ours.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("PG") {
                cmd.env_remove(k);
            }
        }
        cmd.current_dir(self.dir.path()).stdin(Stdio::null());
        cmd
    }

    fn output(&self, tool: &str, args: &[&str]) -> Result<Output> {
        self.command(tool)
            .args(args)
            .output()
            .with_context(|| format!("running {}", self.bin.join(tool).display()))
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<()> {
        let out = self.output(tool, args)?;
        if !out.status.success() {
            bail!(
                "{tool} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        // A failed test shows what the server said.
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
            eprintln!("--- postgres server log ---\n{log}--- end of postgres server log ---");
        }
        if self.port != 0
            && let Ok(data) = path_str(&self.data_dir())
        {
            let _ = self
                .command("pg_ctl")
                .args(["-D", data, "-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // The temporary directory removes itself.
    }
}

/// The newest `/usr/lib/postgresql/<major>/bin` with `initdb`, or
/// `CUTOVER_PG_BIN`.
fn find_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CUTOVER_PG_BIN") {
        let dir = PathBuf::from(dir);
        if !dir.join("initdb").exists() {
            bail!("CUTOVER_PG_BIN={} has no initdb", dir.display());
        }
        return Ok(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "no PostgreSQL server binaries: /usr/lib/postgresql/*/bin/initdb not found \
             (install the `postgresql` package, or set CUTOVER_PG_BIN)"
        ),
    }
}

/// Whether this process runs as root, read off `/proc/self` (no libc).
fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// The uid and gid of the `postgres` system user.
fn postgres_user() -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output()?;
        if !out.status.success() {
            bail!(
                "running as root, PostgreSQL needs an unprivileged user to run as, and there is no \
                 `postgres` user (the `postgresql` package creates it): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().with_context(|| format!("{} is not UTF-8", p.display()))
}

/// A free loopback port below the ephemeral range (see `stable_free_addr`).
fn free_port() -> Result<u16> {
    let addr: std::net::SocketAddr = super::ports::stable_free_addr().parse()?;
    Ok(addr.port())
}

/// A password no test could produce by accident.
fn unique_password() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("Pw{:x}x{}Secret", nanos, std::process::id())
}
