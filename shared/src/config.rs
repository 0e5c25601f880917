//! One doc-commented configuration struct per process, read from TOML, with
//! explicit defaults and a few environment overrides (`CUTOVER_LOG_FORMAT`,
//! `CUTOVER_DATA_DIR`, the agent's `CUTOVER_PROMETHEUS_URL`). Unknown keys
//! are errors, so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::domain::ClusterRef;
use crate::telemetry::LogFormat;
use crate::tls::TlsFiles;

/// A coordinator node that is part of the initial cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// Raft node id, unique and non-zero.
    pub id: u64,
    /// `host:port` of the node's gRPC listener, as the other nodes reach it.
    pub address: String,
}

/// Raft timings and log bounds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Leader heartbeat to followers, ms. Default 50.
    pub heartbeat_interval_ms: u64,
    /// Lower bound of the randomized election timeout, ms. Default 300.
    ///
    /// As in Raft and etcd: a follower that has heard nothing from a
    /// leader (and granted no vote) for a timeout drawn from
    /// `election_timeout_min_ms..election_timeout_max_ms` stands for
    /// election, and a voter refuses other candidates for the minimum after
    /// hearing from its leader. So the two bound failover: 300..600 gives a
    /// new leader in about 0.3-0.65 s on loopback (BENCHMARKS.md,
    /// "failover"). Raise them on slow or distant networks, or where long
    /// pauses (a loaded machine) would otherwise start needless elections.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomized election timeout, ms. Default 600.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many new log entries. Default 10000:
    /// each snapshot copies and writes the whole state, and every 2,000
    /// entries (the default until 2026-12) cost a tenth of the throughput
    /// at 64 clients and 30% at 256 (`bench commit --snapshot-every`,
    /// BENCHMARKS.md). etcd's `--snapshot-count` is 100,000. Lower it to
    /// bound the log a restart replays; raise it for write-heavy clusters.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot, for slow followers. Default 500.
    pub keep_after_snapshot: u64,
    /// Raft's Pre-Vote: before raising its term to stand for election, a
    /// node asks whether a quorum would vote for it. A node that was cut
    /// off (a partition, a long pause) then rejoins without deposing a
    /// leader the others still follow, instead of forcing an election.
    /// Default true; false gives the classic election.
    pub pre_vote: bool,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            snapshot_every: 10_000,
            keep_after_snapshot: 500,
            pre_vote: true,
        }
    }
}

/// `cutover coordinator --config FILE`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// This node's Raft id; must appear in `initial_members` when bootstrapping.
    pub node_id: u64,
    /// Address the gRPC listener binds, e.g. `0.0.0.0:7001`.
    pub listen: String,
    /// Address other nodes and agents use to reach this node. Defaults to `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Where the Raft log, vote and snapshots live.
    pub data_dir: PathBuf,
    /// Address of the `/metrics`, `/healthz`, `/readyz` endpoint; none if unset.
    #[serde(default)]
    pub ops_listen: Option<String>,
    /// `human` (default) or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// This node's certificate, key and the CA it trusts.
    pub tls: TlsFiles,
    /// The voters a brand-new cluster starts with. The member with the
    /// smallest id initializes the cluster once; later starts ignore this.
    #[serde(default)]
    pub initial_members: Vec<Member>,
    /// Agent heartbeat interval the coordinator asks for, ms. An agent is
    /// marked down after 2.5 missed intervals. Default 1000.
    #[serde(default = "default_agent_heartbeat_ms")]
    pub agent_heartbeat_interval_ms: u64,
    #[serde(default)]
    pub raft: RaftConfig,
    /// How much finished history the replicated state keeps.
    #[serde(default)]
    pub retention: RetentionConfig,
}

/// How much finished history the replicated state keeps, so that it (and
/// every snapshot a new node installs) stays bounded however many
/// operations have run. The leader compacts once a minute; each bound is
/// applied by every node from the committed command, so all agree.
///
/// Nothing is lost: audit events leaving the state are appended to each
/// node's hash-chained `<data_dir>/audit.jsonl`, which `cutover audit
/// --since` reads. Operations leaving the state keep their audit events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Finished operations kept (the most recently finished). Default 500.
    /// The last traffic-moving operation of each app is always kept: a
    /// rollback reads it.
    pub operations: usize,
    /// Finished operations older than this are dropped, hours. Default 720
    /// (30 days).
    pub operation_max_age_hours: u64,
    /// Audit events kept in the replicated state (the newest). Default 5000.
    pub audit_events: usize,
    /// Audit events older than this leave the state, hours. Default 720.
    pub audit_max_age_hours: u64,
    /// Releases kept per app (the newest). Default 100. A release that a
    /// kept operation acts with, or whose image a cluster runs, is kept
    /// whatever its age; its migrations are stored once per content.
    /// Attestations go with their image's last release once they are older
    /// than `operation_max_age_hours`.
    pub releases: usize,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            operations: 500,
            operation_max_age_hours: 720,
            audit_events: 5000,
            audit_max_age_hours: 720,
            releases: 100,
        }
    }
}

/// The agent heartbeat interval when none is configured, ms.
pub const DEFAULT_AGENT_HEARTBEAT_MS: u64 = 1000;

fn default_agent_heartbeat_ms() -> u64 {
    DEFAULT_AGENT_HEARTBEAT_MS
}

impl CoordinatorConfig {
    pub fn advertise_addr(&self) -> &str {
        self.advertise.as_deref().unwrap_or(&self.listen)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), Error> {
        if self.node_id == 0 {
            return Err(Error::Config("node_id must be non-zero".into()));
        }
        let mut ids: Vec<u64> = self.initial_members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.initial_members.len() {
            return Err(Error::Config("initial_members lists one id twice".into()));
        }
        if !self.initial_members.is_empty() && !ids.contains(&self.node_id) {
            return Err(Error::Config(format!(
                "initial_members does not include this node ({})",
                self.node_id
            )));
        }
        // Two heartbeats per shortest timeout at least: openraft rounds a
        // heartbeat up to its next tick (a fifth of the interval), and one
        // late heartbeat must not start an election.
        if self.raft.heartbeat_interval_ms == 0
            || self.raft.election_timeout_min_ms < 2 * self.raft.heartbeat_interval_ms
            || self.raft.election_timeout_max_ms <= self.raft.election_timeout_min_ms
        {
            return Err(Error::Config(
                "raft timings need 0 < 2 x heartbeat_interval_ms <= election_timeout_min_ms < election_timeout_max_ms"
                    .into(),
            ));
        }
        if self.agent_heartbeat_interval_ms == 0 {
            return Err(Error::Config("agent_heartbeat_interval_ms must be positive".into()));
        }
        Ok(())
    }
}

/// `cutover agent --config FILE`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Coordinator addresses (`host:port`); any node will do: the agent
    /// starts at a random one and stays with it, and follows the redirect
    /// of a node cut off from the leader.
    pub coordinators: Vec<String>,
    /// Where the agent keeps its record of finished tasks.
    pub data_dir: PathBuf,
    /// TLS server name to expect from coordinators instead of the address host.
    #[serde(default)]
    pub server_name: Option<String>,
    #[serde(default)]
    pub ops_listen: Option<String>,
    #[serde(default)]
    pub log_format: LogFormat,
    /// This agent's certificate (which names its region and cluster), key and CA.
    pub tls: TlsFiles,
    /// Smallest reconnect delay, ms; doubles per failure, with equal jitter. Default 200.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Largest reconnect delay, ms. Default 5000.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// The apps' databases on this cluster, which `db.migrate` tasks
    /// migrate (`[[databases]]`; none by default).
    #[serde(default)]
    pub databases: Vec<DatabaseConfig>,
    /// What app definitions may make this agent run (`[drivers]`).
    #[serde(default)]
    pub drivers: DriverPolicy,
    /// Where this agent's backups go (`[backup]`); none by default.
    #[serde(default)]
    pub backup: Option<BackupStoreConfig>,
    /// How often the databases' replication role, WAL position and lag are
    /// read and reported (what `cutover dr status` shows and a failover
    /// plan weighs), ms. Default 5000.
    #[serde(default = "default_db_status_interval_ms")]
    pub db_status_interval_ms: u64,
    /// The lease, seconds: cut off from every coordinator leader this long,
    /// the agent fences its own PostgreSQL primaries (read-only), so a
    /// region that lost the coordinators stops taking writes before another
    /// region's standby may be promoted past it; it lifts the fence when a
    /// leader is back and no failover was decided meanwhile. Keep it well
    /// above a leader election and below the apps' `failover_after_secs`.
    /// 0 turns it off (an app with no standby gains nothing from it).
    /// Default 30.
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u64,
    /// The app traffic this agent moves between regions (`[traffic]`):
    /// a failover's hold and move-traffic steps run on an agent that has
    /// it (the target region's first). None by default: traffic is then
    /// left where each region's platform sends it.
    #[serde(default)]
    pub traffic: Option<TrafficConfig>,
    /// The region's Prometheus (`http://host:port`), which the apps'
    /// `prometheus` analysis checks query, so their data stays in-region.
    /// None by default: such a check then fails, saying so. Env
    /// `CUTOVER_PROMETHEUS_URL`.
    #[serde(default)]
    pub prometheus_url: Option<String>,
}

fn default_lease_secs() -> u64 {
    30
}

fn default_db_status_interval_ms() -> u64 {
    5000
}

/// Which traffic driver an agent runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrafficDriverKind {
    /// The built-in front door: an HTTP reverse proxy per app, in this
    /// agent's process, sending each app's requests to one region and able
    /// to hold new requests while a failover moves the primary.
    FrontDoor,
    /// Amazon Route 53 weighted records: one record set per region, the
    /// serving region weighted 100 and every other 0.
    Route53,
}

impl TrafficDriverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficDriverKind::FrontDoor => "front-door",
            TrafficDriverKind::Route53 => "route53",
        }
    }
}

/// `[traffic]`: how this agent moves apps' traffic between regions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficConfig {
    pub driver: TrafficDriverKind,
    /// Front door: the longest a new request is held while a failover
    /// moves the primary, ms; then it goes wherever traffic goes by then.
    /// Default 10000.
    #[serde(default = "default_max_hold_ms")]
    pub max_hold_ms: u64,
    /// Route 53: the hosted zone and how to reach the API.
    #[serde(default)]
    pub route53: Option<Route53Config>,
    /// Front door: how often each app's regions are probed, ms; a region
    /// is reported down after `probe_failures` failures in a row. Default
    /// 1000.
    #[serde(default = "default_probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// Default 2.
    #[serde(default = "default_probe_failures")]
    pub probe_failures: u32,
    /// The apps whose traffic this agent moves (`[[traffic.apps]]`).
    pub apps: Vec<TrafficApp>,
}

fn default_probe_interval_ms() -> u64 {
    1000
}

fn default_probe_failures() -> u32 {
    2
}

fn default_max_hold_ms() -> u64 {
    10_000
}

/// `[traffic.route53]`. Credentials come from the usual AWS chain or from
/// `credentials_file`, never from this file itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route53Config {
    pub hosted_zone_id: String,
    /// The API endpoint; absent: AWS's own.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The AWS region the client signs for. Default `us-east-1` (Route 53
    /// is global).
    #[serde(default = "default_route53_region")]
    pub region: String,
    /// An AWS credentials file (`[default]` profile) instead of the chain.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
}

fn default_route53_region() -> String {
    "us-east-1".into()
}

/// One app under a traffic driver (`[[traffic.apps]]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficApp {
    pub app: String,
    /// Region → where its traffic goes there: for the front door the
    /// region's address (`host:port`, the app's router there), for Route 53
    /// the record's value (a host name for CNAME, an address for A/AAAA).
    pub regions: BTreeMap<String, String>,
    /// The region that takes the traffic until a failover moves it.
    pub primary: String,
    /// Front door: where the app's requests come in (`host:port`).
    #[serde(default)]
    pub listen: Option<String>,
    /// Route 53: the record's name (`shop.example.com.`).
    #[serde(default)]
    pub record: Option<String>,
    /// Route 53: `CNAME`, `A` or `AAAA`. Default `CNAME`.
    #[serde(default = "default_record_type")]
    pub record_type: String,
    /// Route 53: the records' TTL, seconds. Default 60.
    #[serde(default = "default_record_ttl")]
    pub ttl: i64,
    /// Front door: the probes each region's address must pass, checked
    /// every `probe_interval_ms` from this agent (outside the regions).
    /// Automatic failover counts a region that failed them as down only
    /// together with its agent. Default: one TCP connect.
    #[serde(default = "default_region_probes")]
    pub health: Vec<crate::app::Probe>,
}

fn default_region_probes() -> Vec<crate::app::Probe> {
    vec![crate::app::Probe::Tcp]
}

fn default_record_type() -> String {
    "CNAME".into()
}

fn default_record_ttl() -> i64 {
    60
}

impl TrafficConfig {
    /// The entry for `app`.
    pub fn app(&self, app: &str) -> Option<&TrafficApp> {
        self.apps.iter().find(|a| a.app == app)
    }

    pub fn validate(&self) -> Result<(), Error> {
        let bad = |why: String| Err(Error::Config(format!("traffic: {why}")));
        if !(100..=600_000).contains(&self.max_hold_ms) {
            return bad("max_hold_ms: between 100 and 600000".into());
        }
        if !(100..=600_000).contains(&self.probe_interval_ms) {
            return bad("probe_interval_ms: between 100 and 600000".into());
        }
        if !(1..=100).contains(&self.probe_failures) {
            return bad("probe_failures: between 1 and 100".into());
        }
        match (&self.route53, self.driver) {
            (None, TrafficDriverKind::Route53) => {
                return bad("driver route53 needs [traffic.route53] hosted_zone_id".into());
            }
            (Some(r), _) if r.hosted_zone_id.trim().is_empty() => {
                return bad("route53.hosted_zone_id is empty".into());
            }
            _ => {}
        }
        for (i, a) in self.apps.iter().enumerate() {
            crate::domain::validate_name("traffic.apps.app", &a.app).map_err(|e| Error::Config(e.to_string()))?;
            if self.apps[..i].iter().any(|b| b.app == a.app) {
                return bad(format!("app {} is listed twice", a.app));
            }
            if !a.regions.contains_key(&a.primary) {
                return bad(format!(
                    "app {}: primary {:?} is not one of its regions",
                    a.app, a.primary
                ));
            }
            match self.driver {
                TrafficDriverKind::FrontDoor => {
                    let Some(listen) = &a.listen else {
                        return bad(format!("app {}: the front door needs listen", a.app));
                    };
                    if listen.parse::<std::net::SocketAddr>().is_err() {
                        return bad(format!("app {}: listen {listen:?} is not ip:port", a.app));
                    }
                    if self.apps[..i].iter().any(|b| b.listen == a.listen) {
                        return bad(format!("app {}: listen {listen} is another app's", a.app));
                    }
                    for (r, addr) in &a.regions {
                        if addr.parse::<std::net::SocketAddr>().is_err() {
                            return bad(format!("app {}: region {r}: {addr:?} is not ip:port", a.app));
                        }
                    }
                }
                TrafficDriverKind::Route53 => {
                    if a.record.is_none() {
                        return bad(format!("app {}: Route 53 needs record", a.app));
                    }
                    if !["CNAME", "A", "AAAA"].contains(&a.record_type.as_str()) {
                        return bad(format!("app {}: record_type is CNAME, A or AAAA", a.app));
                    }
                    if !(0..=2_147_483_647).contains(&a.ttl) {
                        return bad(format!("app {}: ttl is 0..=2147483647 seconds", a.app));
                    }
                    let family = |v: &str| v.parse::<std::net::IpAddr>().ok().map(|ip| ip.is_ipv4());
                    for (r, v) in &a.regions {
                        let fits = match a.record_type.as_str() {
                            "A" => family(v) == Some(true),
                            "AAAA" => family(v) == Some(false),
                            _ => family(v).is_none() && !v.is_empty(),
                        };
                        if !fits {
                            return bad(format!(
                                "app {}: region {r}: {v:?} is not a value for a {} record",
                                a.app, a.record_type
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// One S3-protocol bucket (AWS S3, Garage, MinIO, Ceph) for this agent's
/// backups. Credentials come from the usual AWS chain (the `AWS_*`
/// environment variables, the shared config and credentials files, web
/// identity, the instance or task role) or from `credentials_file`, never
/// from this file itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupStoreConfig {
    /// The endpoint URL; absent: AWS S3 in `region`.
    #[serde(default)]
    pub endpoint: Option<String>,
    pub bucket: String,
    /// An AWS credentials file (`[default]` with `aws_access_key_id` and
    /// `aws_secret_access_key`), e.g. a mounted secret, used instead of
    /// the usual chain. Absent (the default): the usual chain.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// Prepended to every object key (e.g. `backups/`). Default empty.
    #[serde(default)]
    pub prefix: String,
    /// The bucket's region. Default `us-east-1`.
    #[serde(default = "default_s3_region")]
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`), which most servers
    /// other than AWS need. Default: on when `endpoint` is set.
    #[serde(default)]
    pub path_style: Option<bool>,
    /// Server-side encryption requested on top of cutover's own: `AES256`
    /// (SSE-S3) or `aws:kms` (SSE-KMS, with `kms_key_id`). Default: none.
    #[serde(default)]
    pub server_side_encryption: Option<String>,
    #[serde(default)]
    pub kms_key_id: Option<String>,
    /// Client-side encryption keys, each a file of 64 hexadecimal
    /// characters (`openssl rand -hex 32`) under an id. The first seals new
    /// backups; every one listed opens the backups its id names, so keys
    /// rotate by adding a new first entry.
    pub keys: Vec<BackupKeyFile>,
    /// Bytes per uploaded part, in MiB (5 to 5120). Default 8. Memory is
    /// about three parts, whatever the database size.
    #[serde(default = "default_part_size_mib")]
    pub part_size_mib: u32,
}

/// A backup encryption key file and its id (recorded in every backup it seals).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupKeyFile {
    pub id: String,
    pub file: PathBuf,
}

fn default_s3_region() -> String {
    "us-east-1".to_owned()
}

fn default_part_size_mib() -> u32 {
    8
}

impl BackupStoreConfig {
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |why: String| Err(Error::Config(format!("backup: {why}")));
        if self.bucket.len() < 3 || self.bucket.len() > 63 {
            return bad(format!(
                "bucket {} must be 3 to 63 characters",
                crate::domain::quote(&self.bucket)
            ));
        }
        if self.keys.is_empty() {
            return bad("no keys: backups are always encrypted ([[backup.keys]] id, file)".into());
        }
        if !(5..=5120).contains(&self.part_size_mib) {
            return bad(format!("part_size_mib {} is outside 5 to 5120", self.part_size_mib));
        }
        match self.server_side_encryption.as_deref() {
            None | Some("AES256") | Some("aws:kms") => {}
            Some(other) => {
                return bad(format!(
                    "server_side_encryption {} is neither AES256 nor aws:kms",
                    crate::domain::quote(other)
                ));
            }
        }
        Ok(())
    }
}

/// What app definitions may make an agent run. App definitions come from
/// any operator; this, from the agent's own config, bounds them: a
/// definition outside it fails its deploy before anything starts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriverPolicy {
    /// Programs the local driver may start, matched against a command's
    /// first word: an exact name or path (`cutover`, `/usr/bin/python3`), or
    /// a directory prefix ending in `/` (`/opt/apps/`). Default: none, so
    /// the local driver starts nothing until the agent's config lists it.
    pub local_commands: Vec<String>,
    /// The kubeconfig the kubernetes driver uses. An app definition may
    /// name this file or none. Absent (the default): only the in-cluster
    /// service account, and a definition naming any kubeconfig is refused.
    pub kubeconfig: Option<PathBuf>,
    /// Programs an app's `job` analysis checks may run (a k6 or ZAP scan
    /// against the preview), matched like `local_commands`. Default: none.
    pub job_commands: Vec<String>,
}

impl DriverPolicy {
    /// May the local driver start `program` (a command's first word)?
    pub fn allows_program(&self, program: &str) -> bool {
        allowed_by(&self.local_commands, program)
    }

    /// May a `job` analysis check run `program`?
    pub fn allows_job(&self, program: &str) -> bool {
        allowed_by(&self.job_commands, program)
    }
}

/// `program` is an exact entry of `list`, or lies under one of its
/// directory entries (ending in `/`); never with a `..` segment.
fn allowed_by(list: &[String], program: &str) -> bool {
    if program.is_empty() || program.split('/').any(|segment| segment == "..") {
        return false;
    }
    list.iter().any(|allowed| {
        if allowed.ends_with('/') {
            program.starts_with(allowed.as_str())
        } else {
            program == allowed
        }
    })
}

/// A database engine the agent migrates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DbDriver {
    Postgres,
    Sqlite,
}

impl DbDriver {
    pub fn as_str(self) -> &'static str {
        match self {
            DbDriver::Postgres => "postgres",
            DbDriver::Sqlite => "sqlite",
        }
    }
}

impl std::fmt::Display for DbDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The default wait for a lock (the migration lock, and any table lock a
/// migration needs), ms.
pub const DEFAULT_LOCK_TIMEOUT_MS: u64 = 5_000;
/// The default limit on one statement, ms (15 minutes).
pub const DEFAULT_STATEMENT_TIMEOUT_MS: u64 = 15 * 60 * 1000;

fn default_lock_timeout_ms() -> u64 {
    DEFAULT_LOCK_TIMEOUT_MS
}
fn default_statement_timeout_ms() -> u64 {
    DEFAULT_STATEMENT_TIMEOUT_MS
}

/// One `[[databases]]` entry of the agent's config: an app's database on
/// this cluster. The connection string is a secret: it is read from a file
/// or an environment variable, never written in the config itself, and
/// never logged.
///
/// ```toml
/// [[databases]]
/// app = "sample"
/// driver = "postgres"          # or "sqlite"
/// url_file = "/run/secrets/sample-db-url"   # or: url_env = "SAMPLE_DATABASE_URL"
/// role = "primary"           # or "standby", with follows = "us-east/prod-1"
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The app whose migrations run against this database.
    pub app: String,
    /// `postgres` or `sqlite`.
    pub driver: DbDriver,
    /// A file holding the connection string (`postgres://user:pass@host/db`,
    /// `sqlite:///var/lib/app/app.db`). Exactly one of `url_file` and
    /// `url_env` must be set.
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// An environment variable holding the connection string.
    #[serde(default)]
    pub url_env: Option<String>,
    /// `primary` (writable; the default) or `standby` (a streaming replica,
    /// read-only). Migrations, rollbacks and restores run only against a
    /// primary; a standby answers status and plan, and is what a failover
    /// promotes.
    #[serde(default)]
    pub role: Option<crate::dr::DbRole>,
    /// The older spelling of `role`: `true` is `primary`, `false` is
    /// `standby`. Refused when it contradicts `role`.
    #[serde(default)]
    pub primary: Option<bool>,
    /// For a standby: the `region/cluster` whose primary it replicates from
    /// (what `cutover dr status` shows and a failover plan checks).
    #[serde(default)]
    pub follows: Option<String>,
    /// Longest wait for a lock: the migration lock, and on PostgreSQL the
    /// session's `lock_timeout`, so a migration's DDL never queues behind
    /// (and in front of) the app's traffic for long. Default 5000.
    #[serde(default = "default_lock_timeout_ms")]
    pub lock_timeout_ms: u64,
    /// PostgreSQL `statement_timeout` for the migration session, ms.
    /// SQLite has no equivalent. Default 900000 (15 minutes).
    #[serde(default = "default_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    /// Where pre-migration backups are written. Default
    /// `<data_dir>/db-backups/<app>`.
    #[serde(default)]
    pub backup_dir: Option<PathBuf>,
    /// Directory of `pg_dump`, `pg_restore` and `psql`. Default: the
    /// server's major version under `/usr/lib/postgresql/*/bin`, the newest
    /// there, or `PATH`.
    #[serde(default)]
    pub pg_bin_dir: Option<PathBuf>,
    /// A file holding the connection string of a writable server in this
    /// cluster where `cutover dr drill` puts its scratch copy of the
    /// database (it creates and drops a database there; the URL's user
    /// needs CREATEDB). A standby needs it for drills; a primary's drills
    /// default to its own server. At most one of `scratch_url_file` and
    /// `scratch_url_env`.
    #[serde(default)]
    pub scratch_url_file: Option<PathBuf>,
    /// An environment variable holding that connection string.
    #[serde(default)]
    pub scratch_url_env: Option<String>,
    /// How this agent controls the PostgreSQL server itself, which `cutover
    /// dr rejoin` needs to rebuild a superseded primary as a standby. The
    /// agent must run on the database's host. Absent: rejoin is refused.
    #[serde(default)]
    pub server: Option<ServerControl>,
    /// `region/cluster` → a file holding a connection string to that
    /// cluster's server for a user with the REPLICATION attribute: what a
    /// rejoined standby copies (`pg_rewind`, `pg_basebackup`) and streams
    /// from.
    #[serde(default)]
    pub replication_sources: std::collections::BTreeMap<String, PathBuf>,
}

/// How the agent stops and starts a PostgreSQL server on its own host
/// (`[databases.server]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerControl {
    /// The server's data directory.
    pub data_directory: PathBuf,
    /// Stops the server (waiting until it is down), e.g. `["systemctl",
    /// "stop", "postgresql@16-main"]` or `["pg_ctlcluster", "16", "main",
    /// "stop"]`.
    pub stop: Vec<String>,
    /// Starts it (waiting until it accepts connections).
    pub start: Vec<String>,
    /// The OS user `pg_rewind` and `pg_basebackup` run as when the agent
    /// runs as root (they must write the data directory as its owner),
    /// through `runuser`. Absent: as the agent's own user.
    #[serde(default)]
    pub run_as: Option<String>,
}

impl DatabaseConfig {
    /// An entry for `app` whose connection string is in `url_file`, with
    /// every other setting at its default (a primary).
    pub fn with_url_file(app: &str, driver: DbDriver, url_file: PathBuf) -> DatabaseConfig {
        DatabaseConfig {
            app: app.to_owned(),
            driver,
            url_file: Some(url_file),
            url_env: None,
            role: None,
            primary: None,
            follows: None,
            lock_timeout_ms: DEFAULT_LOCK_TIMEOUT_MS,
            statement_timeout_ms: DEFAULT_STATEMENT_TIMEOUT_MS,
            backup_dir: None,
            pg_bin_dir: None,
            scratch_url_file: None,
            scratch_url_env: None,
            server: None,
            replication_sources: Default::default(),
        }
    }

    /// The configured role: `role`, else `primary`, else primary.
    pub fn role(&self) -> crate::dr::DbRole {
        use crate::dr::DbRole;
        match (self.role, self.primary) {
            (Some(r), _) => r,
            (None, Some(false)) => DbRole::Standby,
            (None, _) => DbRole::Primary,
        }
    }

    /// Whether migrations, rollbacks and restores may run against it.
    pub fn is_primary(&self) -> bool {
        self.role() == crate::dr::DbRole::Primary
    }

    /// Checks what serde cannot, naming the field.
    pub fn validate(&self) -> Result<(), Error> {
        crate::domain::validate_name("databases.app", &self.app).map_err(|e| Error::Config(e.to_string()))?;
        let bad = |what: &str| Err(Error::Config(format!("databases[{}]: {what}", self.app)));
        match (&self.url_file, &self.url_env) {
            (Some(_), Some(_)) => return bad("set one of url_file and url_env, not both"),
            (None, None) => return bad("url_file or url_env is required"),
            _ => {}
        }
        if self.scratch_url_file.is_some() && self.scratch_url_env.is_some() {
            return bad("set one of scratch_url_file and scratch_url_env, not both");
        }
        if let Some(s) = &self.server
            && (s.stop.is_empty() || s.start.is_empty())
        {
            return bad("server.stop and server.start must each name a command");
        }
        for k in self.replication_sources.keys() {
            let ok = k.split_once('/').is_some_and(|(r, c)| ClusterRef::new(r, c).is_ok());
            if !ok {
                return bad(&format!("replication_sources key {k:?}: expected region/cluster"));
            }
        }
        if let (Some(role), Some(primary)) = (self.role, self.primary)
            && (role == crate::dr::DbRole::Primary) != primary
        {
            return bad(&format!(
                "role = \"{role}\" contradicts primary = {primary}; set only role"
            ));
        }
        if let Some(f) = &self.follows {
            if self.role() != crate::dr::DbRole::Standby {
                return bad("follows is for a standby (role = \"standby\")");
            }
            let ok = f.split_once('/').is_some_and(|(r, c)| ClusterRef::new(r, c).is_ok());
            if !ok {
                return bad(&format!("follows = {f:?}: expected region/cluster"));
            }
        }
        if self.lock_timeout_ms == 0 {
            return bad("lock_timeout_ms must be positive");
        }
        if self.statement_timeout_ms == 0 {
            return bad("statement_timeout_ms must be positive");
        }
        Ok(())
    }
}

fn default_reconnect_min_ms() -> u64 {
    200
}
fn default_reconnect_max_ms() -> u64 {
    5000
}

impl AgentConfig {
    pub fn validate(&self) -> Result<(), Error> {
        if self.coordinators.is_empty() {
            return Err(Error::Config("coordinators must list at least one address".into()));
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            return Err(Error::Config("need 0 < reconnect_min_ms <= reconnect_max_ms".into()));
        }
        if let Some(u) = &self.prometheus_url
            && !(u.starts_with("http://") && u.len() > "http://".len())
        {
            return Err(Error::Config(format!(
                "prometheus_url: {u:?} must be an http://host:port address"
            )));
        }
        if !(100..=600_000).contains(&self.db_status_interval_ms) {
            return Err(Error::Config("db_status_interval_ms: between 100 and 600000".into()));
        }
        for d in &self.databases {
            d.validate()?;
        }
        if let Some(d) = self
            .databases
            .iter()
            .enumerate()
            .find(|(i, d)| self.databases[..*i].iter().any(|e| e.app == d.app))
        {
            return Err(Error::Config(format!("databases: app {} is listed twice", d.1.app)));
        }
        if let Some(b) = &self.backup {
            b.validate()?;
        }
        if let Some(t) = &self.traffic {
            t.validate()?;
        }
        Ok(())
    }
}

/// Reads a TOML config file and applies environment overrides.
pub fn load<T: DeserializeOwned + EnvOverride>(path: &Path) -> Result<T, Error> {
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
    let mut cfg: T = toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    cfg.apply_env();
    Ok(cfg)
}

/// Environment variables that override file settings.
pub trait EnvOverride {
    fn apply_env(&mut self);
}

fn env_log_format() -> Option<LogFormat> {
    match std::env::var("CUTOVER_LOG_FORMAT").ok()?.as_str() {
        "json" => Some(LogFormat::Json),
        "human" => Some(LogFormat::Human),
        _ => None,
    }
}

impl EnvOverride for CoordinatorConfig {
    fn apply_env(&mut self) {
        if let Some(f) = env_log_format() {
            self.log_format = f;
        }
        if let Ok(d) = std::env::var("CUTOVER_DATA_DIR") {
            self.data_dir = d.into();
        }
    }
}

impl EnvOverride for AgentConfig {
    fn apply_env(&mut self) {
        if let Some(f) = env_log_format() {
            self.log_format = f;
        }
        if let Ok(d) = std::env::var("CUTOVER_DATA_DIR") {
            self.data_dir = d.into();
        }
        if let Ok(u) = std::env::var("CUTOVER_PROMETHEUS_URL") {
            self.prometheus_url = (!u.is_empty()).then_some(u);
        }
    }
}

/// Writes a config as TOML (used by `cutover dev` and tests).
pub fn to_toml<T: Serialize>(cfg: &T) -> Result<String, Error> {
    toml::to_string_pretty(cfg).map_err(|e| Error::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/examples")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn database(extra: &str) -> Result<(), Error> {
        let text = format!("app = \"shop\"\ndriver = \"postgres\"\nurl_env = \"X\"\n{extra}");
        let d: DatabaseConfig = toml::from_str(&text).map_err(|e| Error::Config(e.to_string()))?;
        d.validate()
    }

    /// `role` and its older spelling `primary` agree or are refused;
    /// `follows` is a standby's, and names a region/cluster.
    #[test]
    fn database_roles_validate_naming_the_field() {
        database("role = \"standby\"\nfollows = \"us-east/c1\"").unwrap();
        database("primary = false\nfollows = \"us-east/c1\"").unwrap();
        database("role = \"primary\"\nprimary = true").unwrap();
        let e = database("role = \"standby\"\nprimary = true").unwrap_err().to_string();
        assert!(e.contains("contradicts"), "{e}");
        let e = database("follows = \"us-east/c1\"").unwrap_err().to_string();
        assert!(e.contains("follows is for a standby"), "{e}");
        let e = database("role = \"standby\"\nfollows = \"../etc\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected region/cluster"), "{e}");
        assert!(database("role = \"leader\"").is_err());
    }

    /// The documented examples stay valid configs with the defaults they show.
    #[test]
    fn the_example_configs_parse_and_validate() {
        let agent: AgentConfig = toml::from_str(&example("agent-us-east.toml")).unwrap();
        agent.validate().unwrap();
        assert_eq!(agent.databases.len(), 1);
        let db = &agent.databases[0];
        assert_eq!((db.driver, db.is_primary()), (DbDriver::Sqlite, true));
        assert_eq!(db.lock_timeout_ms, DEFAULT_LOCK_TIMEOUT_MS);
        assert_eq!(db.statement_timeout_ms, DEFAULT_STATEMENT_TIMEOUT_MS);
        let coordinator: CoordinatorConfig = toml::from_str(&example("coordinator-1.toml")).unwrap();
        assert_eq!(coordinator.raft, RaftConfig::default());
        assert_eq!(coordinator.retention, RetentionConfig::default());
    }

    /// Raft timings a follower could not keep: a timeout shorter than two
    /// heartbeats (one late heartbeat would start an election) or an empty
    /// range are refused, naming the rule.
    #[test]
    fn raft_timings_need_two_heartbeats_per_timeout() {
        let base: CoordinatorConfig = toml::from_str(&example("coordinator-1.toml")).unwrap();
        base.validate().unwrap();
        for (hb, min, max, ok) in [
            (50, 100, 101, true),
            (50, 99, 300, false),
            (0, 150, 300, false),
            (50, 300, 300, false),
        ] {
            let mut c = base.clone();
            c.raft.heartbeat_interval_ms = hb;
            c.raft.election_timeout_min_ms = min;
            c.raft.election_timeout_max_ms = max;
            match c.validate() {
                Ok(()) => assert!(ok, "{hb}/{min}/{max} accepted"),
                Err(e) => {
                    assert!(!ok, "{hb}/{min}/{max}: {e}");
                    assert!(e.to_string().contains("2 x heartbeat_interval_ms"), "{e}");
                }
            }
        }
    }

    /// The edge example's front door parses with its defaults; what a
    /// traffic driver cannot work with is refused, naming the field.
    #[test]
    fn traffic_configs_validate_naming_the_field() {
        let agent: AgentConfig = toml::from_str(&example("agent-edge.toml")).unwrap();
        agent.validate().unwrap();
        let t = agent.traffic.clone().unwrap();
        assert_eq!((t.driver, t.max_hold_ms), (TrafficDriverKind::FrontDoor, 10_000));
        assert_eq!(t.app("sample").unwrap().regions.len(), 2);
        let refused = |f: &dyn Fn(&mut TrafficConfig)| {
            let mut a = agent.clone();
            f(a.traffic.as_mut().unwrap());
            a.validate().unwrap_err().to_string()
        };
        let e = refused(&|t| t.apps[0].primary = "ap-south".into());
        assert!(e.contains("primary \"ap-south\" is not one of its regions"), "{e}");
        let e = refused(&|t| {
            t.apps[0].regions.insert("ap-south".into(), "../etc".into());
        });
        assert!(e.contains("region ap-south: \"../etc\" is not ip:port"), "{e}");
        let e = refused(&|t| t.apps[0].listen = None);
        assert!(e.contains("the front door needs listen"), "{e}");
        let e = refused(&|t| t.driver = TrafficDriverKind::Route53);
        assert!(e.contains("needs [traffic.route53]"), "{e}");
        let e = refused(&|t| t.apps.push(t.apps[0].clone()));
        assert!(e.contains("app sample is listed twice"), "{e}");
        let e = refused(&|t| t.max_hold_ms = 0);
        assert!(e.contains("max_hold_ms"), "{e}");
        let e = refused(&|t| t.apps[0].listen = Some("localhost:80".into()));
        assert!(e.contains("listen \"localhost:80\" is not ip:port"), "{e}");
        let e = refused(&|t| {
            let mut other = t.apps[0].clone();
            other.app = "cart".into();
            t.apps.push(other);
        });
        assert!(e.contains("is another app's"), "{e}");
        let route53 = |t: &mut TrafficConfig| {
            t.driver = TrafficDriverKind::Route53;
            t.route53 = Some(Route53Config {
                hosted_zone_id: "Z1".into(),
                endpoint: None,
                region: "us-east-1".into(),
                credentials_file: None,
            });
            t.apps[0].record = Some("sample.example.com.".into());
            t.apps[0].regions = [
                ("us-east".into(), "10.0.0.1".into()),
                ("eu-west".into(), "10.0.1.1".into()),
            ]
            .into();
            t.apps[0].record_type = "A".into();
        };
        let mut ok = agent.clone();
        route53(ok.traffic.as_mut().unwrap());
        ok.validate().unwrap();
        let e = refused(&|t| {
            route53(t);
            t.apps[0].record_type = "AAAA".into();
        });
        assert!(e.contains("is not a value for a AAAA record"), "{e}");
        let e = refused(&|t| {
            route53(t);
            t.route53.as_mut().unwrap().hosted_zone_id = " ".into();
        });
        assert!(e.contains("hosted_zone_id is empty"), "{e}");
    }

    #[test]
    fn a_database_needs_exactly_one_url_source() {
        let mut agent: AgentConfig = toml::from_str(&example("agent-us-east.toml")).unwrap();
        agent.databases[0].url_env = Some("X".into());
        let e = agent.validate().unwrap_err().to_string();
        assert!(e.contains("databases[sample]: set one of url_file and url_env"), "{e}");
        agent.databases[0].url_file = None;
        agent.databases.push(agent.databases[0].clone());
        let e = agent.validate().unwrap_err().to_string();
        assert!(e.contains("app sample is listed twice"), "{e}");
    }
}
