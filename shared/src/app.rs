//! Apps: what `cutover apps apply -f app.toml` declares. Plain serde types,
//! validated here so that a bad definition is refused with the field named
//! before anything is stored or sent.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::domain::{ClusterRef, validate_name};

/// The two environments of an app in a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Blue,
    Green,
}

impl Color {
    pub fn other(self) -> Color {
        match self {
            Color::Blue => Color::Green,
            Color::Green => Color::Blue,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Color::Blue => "blue",
            Color::Green => "green",
        }
    }
    pub fn parse(s: &str) -> Option<Color> {
        match s {
            "blue" => Some(Color::Blue),
            "green" => Some(Color::Green),
            _ => None,
        }
    }
}

impl std::fmt::Display for Color {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which platform driver runs the app in a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// OS processes plus the agent's built-in HTTP router (the embedded default).
    Local,
    /// Deployments `<app>-blue` / `<app>-green` and Services `<app>` / `<app>-preview`.
    Kubernetes,
}

/// The `local` driver's settings for one cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSpec {
    /// Command line of one color's process; `{image}`, `{listen}` and
    /// `{color}` are substituted. Example: `["cutover", "sample-app",
    /// "--version", "{image}", "--listen", "{listen}"]`.
    pub command: Vec<String>,
    /// The stable service address (`host:port`) the router listens on.
    pub listen: String,
    /// The preview address (`host:port`) routing to the inactive color.
    pub preview_listen: String,
    /// How long requests in flight on the old color may take to finish after
    /// a switch, ms. Default 5000.
    #[serde(default = "default_drain_ms")]
    pub drain_timeout_ms: u64,
}

fn default_drain_ms() -> u64 {
    5000
}

/// The `kubernetes` driver's settings for one cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeSpec {
    pub namespace: String,
    /// A kubeconfig path; in-cluster configuration when absent.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// A rollout that makes no progress for this long fails the task. Default 600.
    #[serde(default = "default_progress_deadline")]
    pub progress_deadline_secs: u64,
    /// The container whose image a deploy sets. Default: the app name.
    #[serde(default)]
    pub container: Option<String>,
    /// A Gateway API `HTTPRoute` in the namespace whose backendRefs to the
    /// Services `<app>` and `<app>-preview` carry a canary's weights.
    /// Required by `strategy = "canary"`. Left out of the serialized form
    /// while unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_route: Option<String>,
}

fn default_progress_deadline() -> u64 {
    600
}

/// One cluster running the app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppCluster {
    pub region: String,
    pub cluster: String,
    pub driver: DriverKind,
    #[serde(default)]
    pub local: Option<LocalSpec>,
    #[serde(default)]
    pub kubernetes: Option<KubeSpec>,
}

impl AppCluster {
    pub fn cluster_ref(&self) -> ClusterRef {
        ClusterRef {
            region: self.region.clone(),
            cluster: self.cluster.clone(),
        }
    }
}

/// A health probe run against a color through its preview address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Probe {
    /// GET `path`; passes on `status` (default 200) and, if set, a body
    /// containing `body_contains`.
    Http {
        path: String,
        #[serde(default = "default_status")]
        status: u16,
        #[serde(default)]
        body_contains: Option<String>,
    },
    /// A TCP connect.
    Tcp,
    /// `grpc.health.v1.Health/Check` for `service` (empty: the server).
    Grpc {
        #[serde(default)]
        service: String,
    },
}

fn default_status() -> u16 {
    200
}

impl Probe {
    /// `GET path` expecting 200, any body.
    pub fn http(path: &str) -> Probe {
        Probe::Http {
            path: path.to_owned(),
            status: default_status(),
            body_contains: None,
        }
    }
}

/// The bounded load probe and its thresholds (defaults: the seed's
/// performance thresholds).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadProbe {
    /// Run it at all.
    pub enabled: bool,
    /// Path requested.
    pub path: String,
    /// Number of requests.
    pub requests: u32,
    /// Requests started per second.
    pub rate_per_sec: u32,
    pub max_avg_ms: f64,
    pub max_p95_ms: f64,
    pub max_p99_ms: f64,
    /// Fraction, 0..1.
    pub max_error_rate: f64,
    pub min_rps: f64,
}

impl Default for LoadProbe {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "/".into(),
            requests: 300,
            rate_per_sec: 200,
            max_avg_ms: 2000.0,
            max_p95_ms: 5000.0,
            max_p99_ms: 10000.0,
            max_error_rate: 0.01,
            min_rps: 100.0,
        }
    }
}

/// An app as declared.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    pub name: String,
    pub clusters: Vec<AppCluster>,
    #[serde(default)]
    pub health: Vec<Probe>,
    #[serde(default)]
    pub load: LoadProbe,
    /// Seconds after a switch before the previous color is scaled down;
    /// absent: keep it running (rollback stays one switch).
    #[serde(default)]
    pub scale_down_delay_secs: Option<u64>,
    /// Regions in cutover order, grouped into waves. Default: one wave per
    /// region, in the order of `clusters`.
    #[serde(default)]
    pub waves: Vec<Vec<String>>,
    /// Seconds each wave is watched after its switch (health probes against
    /// the serving color) before the next wave starts. Default 10. A bake
    /// with `[[analysis]]` checks of stage bake lasts until they finish.
    #[serde(default = "default_bake_secs")]
    pub bake_secs: u64,
    /// Attestations a release image must carry before a cutover may start,
    /// check name → required value (e.g. `tests = "passed"`).
    #[serde(default)]
    pub required_attestations: std::collections::BTreeMap<String, String>,
    /// Post-migration checks: SQL queries that must each return one row
    /// holding `true` once a release's migrations ran (e.g. `select
    /// count(*) = 0 from orders where total is null`). A failing check
    /// undoes the migration run.
    #[serde(default)]
    pub migration_checks: Vec<String>,
    /// Disaster-recovery settings (`[dr]`). Left out of the serialized
    /// form while they are the defaults, so definitions written before
    /// they existed keep their digests.
    #[serde(default, skip_serializing_if = "crate::dr::DrSettings::is_default")]
    pub dr: crate::dr::DrSettings,
    /// Metric checks judged from the service's telemetry (`[[analysis]]`),
    /// with the gates or during the bake. Left out of the serialized form
    /// while empty, like `dr`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub analysis: Vec<crate::analysis::MetricCheck>,
    /// How a deploy moves traffic inside each cluster: `blue-green` (the
    /// default: all at once, after the gates) or `canary` (in the steps of
    /// `[canary]`). Across regions, the deploy's waves or atomic decision
    /// apply either way. Left out of the serialized form while the default.
    #[serde(default, skip_serializing_if = "TrafficStrategy::is_blue_green")]
    pub strategy: TrafficStrategy,
    /// A canary's steps (`[canary]`), with `strategy = "canary"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanarySteps>,
    /// What an operation does while a target's agent is unreachable
    /// (`[unreachable]`); unset: it waits for the agent, however long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable: Option<UnreachablePolicy>,
}

/// What an operation does while the agent of a cluster it acts on is
/// unreachable (its stream to the leader lost, so the leader marked it
/// down): Argo Rollouts' `progressDeadlineAbort`, for a region cut off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnreachablePolicy {
    /// `wait` (the default): the step waits for the agent and goes on when
    /// it is back. `rollback`: a step whose agent has been down for
    /// `after_secs` fails, and the operation rolls back as after any
    /// failed step (what the cut-off region must undo waits for it).
    #[serde(default)]
    pub action: UnreachableAction,
    /// Seconds the agent must have been down before `rollback` acts, 1 to
    /// 86400. Default 60.
    #[serde(default = "default_unreachable_after_secs")]
    pub after_secs: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnreachableAction {
    #[default]
    Wait,
    Rollback,
}

fn default_unreachable_after_secs() -> u64 {
    60
}

impl Default for UnreachablePolicy {
    fn default() -> Self {
        UnreachablePolicy {
            action: UnreachableAction::Wait,
            after_secs: default_unreachable_after_secs(),
        }
    }
}

/// How a deploy moves an app's traffic inside a cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrafficStrategy {
    /// All at once, after the gates: one switch.
    #[default]
    BlueGreen,
    /// In steps of weight: at each, the new color takes that percent of
    /// the cluster's traffic, and the bake's probes and analysis judge it
    /// under that traffic before the next; the switch is the last step.
    Canary,
}

impl TrafficStrategy {
    fn is_blue_green(&self) -> bool {
        *self == TrafficStrategy::BlueGreen
    }
}

/// A canary's steps (`[canary]`), Flagger's `stepWeights` and Argo
/// Rollouts' `setWeight` steps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanarySteps {
    /// Percent of a cluster's traffic the new color takes at each step,
    /// strictly ascending, each 1 to 100. The switch (100) ends every
    /// canary, listed or not.
    pub weights: Vec<u32>,
    /// Seconds each step holds its weight at least; a step whose analysis
    /// takes longer lasts until it finishes. Default 0: as long as the
    /// analysis.
    #[serde(default)]
    pub pause_secs: u64,
}

fn default_bake_secs() -> u64 {
    10
}

fn bad(field: &str, why: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{field}: {why}"))
}

/// Every optional setting at the default an app file gets when it leaves
/// the setting out (bake 10 s, no probes, blue-green). Not a valid
/// definition alone: `name` and `clusters` must be set, e.g.
/// `AppSpec { name, clusters, ..Default::default() }`.
impl Default for AppSpec {
    fn default() -> Self {
        Self {
            name: String::new(),
            clusters: vec![],
            health: vec![],
            load: LoadProbe::default(),
            scale_down_delay_secs: None,
            waves: vec![],
            bake_secs: default_bake_secs(),
            required_attestations: Default::default(),
            migration_checks: vec![],
            dr: Default::default(),
            analysis: vec![],
            strategy: Default::default(),
            canary: None,
            unreachable: None,
        }
    }
}

impl AppSpec {
    /// The definition as an app file (TOML) that `cutover apps apply -f`
    /// takes back unchanged. Unset optional fields are left out: TOML has no
    /// null.
    pub fn to_toml(&self) -> Result<String, Error> {
        fn strip_nulls(v: &mut serde_json::Value) {
            match v {
                serde_json::Value::Object(m) => {
                    m.retain(|_, v| !v.is_null());
                    m.values_mut().for_each(strip_nulls);
                }
                serde_json::Value::Array(a) => a.iter_mut().for_each(strip_nulls),
                _ => {}
            }
        }
        let mut v = serde_json::to_value(self).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        strip_nulls(&mut v);
        toml::to_string_pretty(&v).map_err(|e| Error::InvalidArgument(format!("app {} as TOML: {e}", self.name)))
    }

    /// Checks everything that does not need the cluster's state.
    /// The weights a canary sets before its switch (empty for blue-green).
    pub fn canary_weights(&self) -> Vec<u32> {
        match (&self.strategy, &self.canary) {
            (TrafficStrategy::Canary, Some(c)) => c.weights.iter().copied().filter(|w| *w < 100).collect(),
            _ => vec![],
        }
    }

    fn check_canary(&self) -> Result<(), Error> {
        let steps = match (self.strategy, &self.canary) {
            (TrafficStrategy::BlueGreen, None) => return Ok(()),
            (TrafficStrategy::BlueGreen, Some(_)) => {
                return Err(bad(
                    "canary",
                    "set, but strategy is blue-green (set strategy = \"canary\")",
                ));
            }
            (TrafficStrategy::Canary, None) => {
                return Err(bad("canary.weights", "required by strategy \"canary\""));
            }
            (TrafficStrategy::Canary, Some(c)) => c,
        };
        if steps.weights.is_empty() || steps.weights.len() > 20 {
            return Err(bad("canary.weights", "list 1 to 20 steps, e.g. [5, 25, 50, 100]"));
        }
        let mut last = 0;
        for w in &steps.weights {
            if !(1..=100).contains(w) || *w <= last {
                return Err(bad(
                    "canary.weights",
                    format!(
                        "{:?}: each step is a percent from 1 to 100, above the one before",
                        steps.weights
                    ),
                ));
            }
            last = *w;
        }
        if steps.pause_secs > 24 * 3600 {
            return Err(bad("canary.pause_secs", "at most a day (86400)"));
        }
        for (i, c) in self.clusters.iter().enumerate() {
            if c.driver == DriverKind::Kubernetes && c.kubernetes.as_ref().is_some_and(|k| k.http_route.is_none()) {
                return Err(bad(
                    &format!("clusters[{i}].kubernetes.http_route"),
                    "required by strategy \"canary\": the HTTPRoute whose backend weights split the traffic",
                ));
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), Error> {
        validate_name("name", &self.name)?;
        if let Some(u) = &self.unreachable
            && !(1..=86_400).contains(&u.after_secs)
        {
            return Err(bad("unreachable.after_secs", "must be 1 to 86400"));
        }
        if self.clusters.is_empty() {
            return Err(bad("clusters", "at least one cluster is required"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, c) in self.clusters.iter().enumerate() {
            let f = |k: &str| format!("clusters[{i}].{k}");
            validate_name(&f("region"), &c.region)?;
            validate_name(&f("cluster"), &c.cluster)?;
            if !seen.insert((c.region.clone(), c.cluster.clone())) {
                return Err(bad(&f("cluster"), format!("{}/{} listed twice", c.region, c.cluster)));
            }
            match c.driver {
                DriverKind::Local => {
                    let l = c
                        .local
                        .as_ref()
                        .ok_or_else(|| bad(&f("local"), "required by driver \"local\""))?;
                    if l.command.is_empty() {
                        return Err(bad(&f("local.command"), "must not be empty"));
                    }
                    for (k, a) in [("local.listen", &l.listen), ("local.preview_listen", &l.preview_listen)] {
                        a.parse::<std::net::SocketAddr>()
                            .map_err(|e| bad(&f(k), format!("{a:?}: {e}")))?;
                    }
                    if l.listen == l.preview_listen {
                        return Err(bad(&f("local.preview_listen"), "must differ from listen"));
                    }
                }
                DriverKind::Kubernetes => {
                    let k = c
                        .kubernetes
                        .as_ref()
                        .ok_or_else(|| bad(&f("kubernetes"), "required by driver \"kubernetes\""))?;
                    validate_name(&f("kubernetes.namespace"), &k.namespace)?;
                    if let Some(r) = &k.http_route {
                        validate_name(&f("kubernetes.http_route"), r)?;
                    }
                    if k.progress_deadline_secs == 0 {
                        return Err(bad(&f("kubernetes.progress_deadline_secs"), "must be positive"));
                    }
                }
            }
        }
        for (i, p) in self.health.iter().enumerate() {
            if let Probe::Http { path, status, .. } = p {
                if !path.starts_with('/') {
                    return Err(bad(&format!("health[{i}].path"), "must start with '/'"));
                }
                if !(100..=599).contains(status) {
                    return Err(bad(
                        &format!("health[{i}].status"),
                        format!("{status} is not an HTTP status"),
                    ));
                }
            }
        }
        if !self.waves.is_empty() {
            self.check_waves(&self.waves, "waves")?;
        }
        for (check, value) in &self.required_attestations {
            validate_name("required_attestations", check)?;
            if value.is_empty() {
                return Err(bad(
                    &format!("required_attestations.{check}"),
                    "value must not be empty",
                ));
            }
        }
        self.dr.validate()?;
        self.check_canary()?;
        let mut names = std::collections::HashSet::new();
        for (i, check) in self.analysis.iter().enumerate() {
            check.validate(&format!("analysis[{i}]"))?;
            if !names.insert(check.name.as_str()) {
                return Err(bad(
                    &format!("analysis[{i}].name"),
                    format!("{:?} used twice", check.name),
                ));
            }
        }
        for (i, check) in self.migration_checks.iter().enumerate() {
            if check.trim().is_empty() || check.len() > 4096 {
                return Err(bad(
                    &format!("migration_checks[{i}]"),
                    "must be a query of 1..4096 bytes",
                ));
            }
        }
        let l = &self.load;
        let positive = |k: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(bad(&format!("load.{k}"), format!("{v} must be a positive number")))
            }
        };
        positive("max_avg_ms", l.max_avg_ms)?;
        positive("max_p95_ms", l.max_p95_ms)?;
        positive("max_p99_ms", l.max_p99_ms)?;
        if !(l.max_avg_ms <= l.max_p95_ms && l.max_p95_ms <= l.max_p99_ms) {
            return Err(bad(
                "load",
                "thresholds must satisfy max_avg_ms <= max_p95_ms <= max_p99_ms",
            ));
        }
        if !(0.0..=1.0).contains(&l.max_error_rate) || l.max_error_rate.is_nan() {
            return Err(bad(
                "load.max_error_rate",
                format!("{} is not a fraction between 0 and 1", l.max_error_rate),
            ));
        }
        if l.min_rps < 0.0 || !l.min_rps.is_finite() {
            return Err(bad("load.min_rps", format!("{} must be zero or more", l.min_rps)));
        }
        if l.enabled && (l.requests == 0 || l.rate_per_sec == 0) {
            return Err(bad("load", "requests and rate_per_sec must be positive"));
        }
        if l.enabled && (l.rate_per_sec as f64) < l.min_rps {
            return Err(bad(
                "load.min_rps",
                format!("{} can never be reached at rate_per_sec {}", l.min_rps, l.rate_per_sec),
            ));
        }
        if !l.path.starts_with('/') {
            return Err(bad("load.path", "must start with '/'"));
        }
        Ok(())
    }

    /// The app's regions, in the order of `clusters`, each once.
    pub fn regions(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for c in &self.clusters {
            if !out.contains(&c.region) {
                out.push(c.region.clone());
            }
        }
        out
    }

    /// Checks a wave plan against the app's regions: every region exactly
    /// once, none unknown, no empty wave. `what` names the plan in errors.
    pub fn check_waves(&self, waves: &[Vec<String>], what: &str) -> Result<(), Error> {
        let regions = self.regions();
        let mut seen = std::collections::HashSet::new();
        for (i, wave) in waves.iter().enumerate() {
            if wave.is_empty() {
                return Err(bad(&format!("{what}[{i}]"), "empty wave"));
            }
            for r in wave {
                if !regions.contains(r) {
                    return Err(bad(
                        what,
                        format!(
                            "unknown region {r:?} (app {} runs in {})",
                            self.name,
                            regions.join(", ")
                        ),
                    ));
                }
                if !seen.insert(r.clone()) {
                    return Err(bad(what, format!("region {r:?} listed twice")));
                }
            }
        }
        let missing: Vec<&String> = regions.iter().filter(|r| !seen.contains(*r)).collect();
        if !missing.is_empty() {
            let m: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
            return Err(bad(
                what,
                format!("leaves out region(s) {} of app {}", m.join(", "), self.name),
            ));
        }
        Ok(())
    }

    /// The waves to use: the app's, or one wave per region.
    pub fn effective_waves(&self) -> Vec<Vec<String>> {
        if self.waves.is_empty() {
            self.regions().into_iter().map(|r| vec![r]).collect()
        } else {
            self.waves.clone()
        }
    }

    pub fn cluster(&self, c: &ClusterRef) -> Option<&AppCluster> {
        self.clusters
            .iter()
            .find(|x| x.region == c.region && x.cluster == c.cluster)
    }
}

/// One color of an app in one cluster, as its agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColorStatus {
    pub color: Color,
    /// Image running (empty if the color was never deployed).
    pub image: String,
    pub replicas_ready: u32,
    pub replicas_desired: u32,
    pub healthy: bool,
}

/// The app in one cluster, as its agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppClusterStatus {
    /// The color taking traffic (None before the first deploy).
    pub active: Option<Color>,
    pub colors: Vec<ColorStatus>,
    pub last_switch_unix_ms: Option<i64>,
    /// In maintenance: taking no traffic in either color (while a restore
    /// replaces its database).
    #[serde(default)]
    pub maintenance: bool,
    /// Percent of new requests a canary sends to the inactive color; 0:
    /// none (left out of the serialized form then).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub canary_weight: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Validates an image reference (`[registry/]name[:tag][@digest]` for
/// Kubernetes; the local driver substitutes it into a command).
pub fn validate_image_ref(image: &str) -> Result<(), Error> {
    let fail = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "image {}: {why}",
            crate::domain::quote(image)
        )))
    };
    if image.is_empty() {
        return fail("must not be empty");
    }
    if image.len() > 512 {
        return fail("longer than 512 characters");
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return fail("contains whitespace or control characters");
    }
    let (name, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest {
        let Some((alg, hex)) = d.split_once(':') else {
            return fail("digest must be <algorithm>:<hex>");
        };
        if alg.is_empty() || hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return fail("digest must be <algorithm>:<hex>");
        }
    }
    // A tag follows the last ':' after the last '/'.
    let last = name.rsplit('/').next().unwrap_or(name);
    let (repo_last, tag) = match last.split_once(':') {
        Some((r, t)) => (r, Some(t)),
        None => (last, None),
    };
    if let Some(t) = tag
        && (t.is_empty()
            || t.len() > 128
            || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            || t.starts_with(['.', '-']))
    {
        return fail("tag must be 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'");
    }
    let path = name[..name.len() - last.len()].strip_suffix('/').unwrap_or("");
    let comps: Vec<&str> = if path.is_empty() {
        vec![]
    } else {
        path.split('/').collect()
    };
    for (i, comp) in comps.into_iter().chain([repo_last]).enumerate() {
        let registry =
            i == 0 && path.contains('/') && (comp.contains('.') || comp.contains(':') || comp == "localhost");
        let ok = if registry {
            comp.starts_with(|c: char| c.is_ascii_alphanumeric())
                && comp.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b))
        } else {
            !comp.is_empty()
                && comp
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && comp.starts_with(|c: char| c.is_ascii_alphanumeric())
        };
        if !ok {
            return fail("repository path must be lowercase [a-z0-9._-] components");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        for ok in [
            "nginx",
            "nginx:1.25",
            "registry.example:5000/team/app:v2",
            "app@sha256:0123456789abcdef0123456789abcdef",
            "v1",
            "localhost/app:v1.2-rc",
        ] {
            validate_image_ref(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "UPPER/app",
            "app:",
            "app: v1",
            "app:-x",
            "app@sha256:zz",
            "../x",
            "a//b",
        ] {
            assert!(validate_image_ref(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// `cutover apps get` prints TOML (it used to fail with "unsupported
    /// unit type" on the unset optional fields), and that TOML applies back
    /// to the same definition.
    #[test]
    fn app_files_round_trip_through_to_toml() {
        let text = include_str!("../../deploy/examples/app-sample.toml");
        let mut spec: AppSpec = toml::from_str(text).unwrap();
        spec.validate().unwrap();
        // Every kind of unset optional field at once.
        spec.scale_down_delay_secs = None;
        if let Some(Probe::Http { body_contains, .. }) = spec.health.first_mut() {
            *body_contains = None;
        }
        let out = spec.to_toml().unwrap();
        let back: AppSpec = toml::from_str(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
        assert_eq!(back, spec, "{out}");
        // With the optional fields set too.
        spec.scale_down_delay_secs = Some(30);
        let back: AppSpec = toml::from_str(&spec.to_toml().unwrap()).unwrap();
        assert_eq!(back, spec);
    }

    /// The example's commented canary section applies as written, round
    /// trips, and keeps blue-green definitions' digests (left out while
    /// unset); bad steps are refused naming the field.
    #[test]
    fn unreachable_policy_parses_validates_and_round_trips() {
        let text = include_str!("../../deploy/examples/app-sample.toml");
        let default: AppSpec = toml::from_str(text).unwrap();
        assert_eq!(default.unreachable, None);
        assert!(!default.to_toml().unwrap().contains("unreachable"));
        let uncommented = text
            .replace("# [unreachable]", "[unreachable]")
            .replace("# action = \"rollback\"", "action = \"rollback\"")
            .replace("# after_secs = 120", "after_secs = 120");
        let rollback: AppSpec = toml::from_str(&uncommented).unwrap();
        rollback.validate().unwrap();
        let policy = UnreachablePolicy {
            action: UnreachableAction::Rollback,
            after_secs: 120,
        };
        assert_eq!(rollback.unreachable, Some(policy));
        let back: AppSpec = toml::from_str(&rollback.to_toml().unwrap()).unwrap();
        assert_eq!(back, rollback);
        let proto: crate::proto::App = rollback.clone().into();
        assert_eq!(crate::convert::app_from_proto(proto).unwrap(), rollback);
        // after_secs defaults to 60; 0 and more than a day are refused.
        let only_action: AppSpec = toml::from_str(&uncommented.replace("after_secs = 120", "")).unwrap();
        assert_eq!(only_action.unreachable.unwrap().after_secs, 60);
        for bad in [0, 86_401] {
            let spec = AppSpec {
                unreachable: Some(UnreachablePolicy {
                    after_secs: bad,
                    ..policy
                }),
                ..rollback.clone()
            };
            let e = spec.validate().unwrap_err().to_string();
            assert!(e.contains("unreachable.after_secs"), "{bad}: {e}");
        }
        let unknown = uncommented.replace("action = \"rollback\"", "action = \"retry\"");
        assert!(toml::from_str::<AppSpec>(&unknown).is_err());
    }

    #[test]
    fn canary_steps_validate_and_round_trip() {
        let text = include_str!("../../deploy/examples/app-sample.toml");
        let blue_green: AppSpec = toml::from_str(text).unwrap();
        assert!(!blue_green.to_toml().unwrap().contains("canary"));
        assert!(blue_green.canary_weights().is_empty());
        let uncommented = text
            .replace("# strategy = \"canary\"", "strategy = \"canary\"")
            .replace("# [canary]", "[canary]")
            .replace("# weights = [5, 25, 50, 100]", "weights = [5, 25, 50, 100]")
            .replace("# pause_secs = 30", "pause_secs = 30");
        let canary: AppSpec = toml::from_str(&uncommented).unwrap();
        canary.validate().unwrap();
        assert_eq!(canary.strategy, TrafficStrategy::Canary);
        assert_eq!(canary.canary_weights(), [5, 25, 50]);
        let back: AppSpec = toml::from_str(&canary.to_toml().unwrap()).unwrap();
        assert_eq!(back, canary);
        let refused = |weights: Vec<u32>, strategy: TrafficStrategy| {
            let spec = AppSpec {
                strategy,
                canary: Some(CanarySteps { weights, pause_secs: 0 }),
                ..canary.clone()
            };
            spec.validate().unwrap_err().to_string()
        };
        for bad in [vec![], vec![25, 5], vec![5, 5], vec![0, 50], vec![50, 101]] {
            let e = refused(bad.clone(), TrafficStrategy::Canary);
            assert!(e.contains("canary.weights"), "{bad:?}: {e}");
        }
        assert!(refused(vec![5], TrafficStrategy::BlueGreen).contains("strategy is blue-green"));
        let missing = AppSpec {
            canary: None,
            unreachable: None,
            ..canary.clone()
        };
        assert!(
            missing
                .validate()
                .unwrap_err()
                .to_string()
                .contains("required by strategy")
        );
        // On Kubernetes the split needs an HTTPRoute.
        let mut kube = canary.clone();
        kube.clusters[0].driver = DriverKind::Kubernetes;
        kube.clusters[0].local = None;
        kube.clusters[0].kubernetes = Some(KubeSpec {
            namespace: "shop".into(),
            kubeconfig: None,
            progress_deadline_secs: 600,
            container: None,
            http_route: None,
        });
        let e = kube.validate().unwrap_err().to_string();
        assert!(e.contains("clusters[0].kubernetes.http_route"), "{e}");
        kube.clusters[0].kubernetes.as_mut().unwrap().http_route = Some("shop".into());
        kube.validate().unwrap();
    }
}
