//! Analysis: an app's metric checks (`[[analysis]]` in an app file), judged
//! from the service's own telemetry, like Argo Rollouts' AnalysisTemplates
//! and Flagger's metric checks. The agent of each region runs them (the data
//! stays in-region); this module holds the declared form, its validation,
//! the condition language and the report every measurement is recorded in.

use serde::{Deserialize, Serialize};

use crate::Error;

/// Where a check's value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MetricProvider {
    /// A PromQL query against the region's Prometheus (the agent's
    /// `prometheus_url`). The query must return one series or a scalar.
    Prometheus,
    /// Built in, no Prometheus needed: the percentage (0..100) of requests
    /// answered without a 5xx during each interval, from the color's own
    /// metrics endpoint (`http_requests_total{code}`).
    RequestSuccessRate,
    /// Built in: a latency percentile, in milliseconds, of the requests of
    /// each interval, from the color's own histogram
    /// (`http_request_duration_seconds`).
    RequestDuration,
    /// POSTs the rollout's context (JSON) to `url`; the value is 1 when it
    /// answers 2xx with `{"pass": true}`, else 0 (Flagger's webhooks).
    Webhook,
    /// Runs `command` on the agent, with `PREVIEW_URL` and the image in its
    /// environment (`k6 run`, a ZAP baseline scan); the value is its exit
    /// code. Only commands the agent's `[drivers] job_commands` allow run.
    Job,
}

impl MetricProvider {
    pub fn as_str(self) -> &'static str {
        match self {
            MetricProvider::Prometheus => "prometheus",
            MetricProvider::RequestSuccessRate => "request-success-rate",
            MetricProvider::RequestDuration => "request-duration",
            MetricProvider::Webhook => "webhook",
            MetricProvider::Job => "job",
        }
    }
}

/// When a check runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnalysisStage {
    /// With the health gates, against the new color's preview address
    /// before it takes traffic, while the load probe runs (so the built-in
    /// checks have requests to judge).
    Gates,
    /// During the bake after a switch, against the serving color under its
    /// real traffic (Argo's post-promotion analysis).
    #[default]
    Bake,
}

/// A comparison of a measured value: `result < 0.01`, `result >= 99`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Condition {
    pub op: CompareOp,
    pub threshold: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl CompareOp {
    fn as_str(self) -> &'static str {
        match self {
            CompareOp::Lt => "<",
            CompareOp::Le => "<=",
            CompareOp::Gt => ">",
            CompareOp::Ge => ">=",
            CompareOp::Eq => "==",
            CompareOp::Ne => "!=",
        }
    }
}

impl Condition {
    /// Whether `value` meets the condition. NaN never does.
    pub fn holds(&self, value: f64) -> bool {
        let t = self.threshold;
        match self.op {
            CompareOp::Lt => value < t,
            CompareOp::Le => value <= t,
            CompareOp::Gt => value > t,
            CompareOp::Ge => value >= t,
            CompareOp::Eq => value == t,
            CompareOp::Ne => value != t,
        }
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "result {} {}", self.op.as_str(), self.threshold)
    }
}

impl std::str::FromStr for Condition {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || format!("{s:?}: expected `result <op> <number>` with op one of < <= > >= == !=");
        let rest = s.trim().strip_prefix("result").ok_or_else(usage)?.trim_start();
        // Two-character operators first, so `<=` is not read as `<`.
        let (op, number) = [
            ("<=", CompareOp::Le),
            (">=", CompareOp::Ge),
            ("==", CompareOp::Eq),
            ("!=", CompareOp::Ne),
            ("<", CompareOp::Lt),
            (">", CompareOp::Gt),
        ]
        .into_iter()
        .find_map(|(text, op)| rest.strip_prefix(text).map(|n| (op, n)))
        .ok_or_else(usage)?;
        let threshold: f64 = number.trim().parse().map_err(|_| usage())?;
        if !threshold.is_finite() {
            return Err(usage());
        }
        Ok(Condition { op, threshold })
    }
}

impl TryFrom<String> for Condition {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Condition> for String {
    fn from(c: Condition) -> String {
        c.to_string()
    }
}

impl Serialize for Condition {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// One metric check, repeated `count` times, one measurement at the end of
/// each `interval_secs`. The check fails once more than `failure_limit`
/// measurements missed the condition, or more than `inconclusive_limit`
/// gave no verdict (no data, or the query could not be run).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricCheck {
    /// Names the check in reports (`error-rate`).
    pub name: String,
    pub provider: MetricProvider,
    /// `prometheus`: the PromQL query. `{{app}}`, `{{region}}`,
    /// `{{cluster}}`, `{{color}}`, `{{image}}` and `{{interval}}` (as
    /// `10s`) are substituted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// `request-duration`: the percentile, 0 < p < 100. Default 95.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentile: Option<f64>,
    /// Built-in checks: the color's metrics path. Default `/metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_path: Option<String>,
    /// `webhook`: where the context is POSTed (`http://…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `job`: the command line; its first word must be allowed by the
    /// agent's `job_commands`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// `webhook` and `job`: the time limit of one attempt, seconds.
    /// Default 10 for a webhook, 300 for a job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// `webhook`: attempts after the first when it fails or times out.
    /// Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// What a good measurement satisfies: `result < 0.01`. Required,
    /// except by `webhook` (default `result == 1`) and `job` (default
    /// `result == 0`, exit code 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<Condition>,
    #[serde(default)]
    pub stage: AnalysisStage,
    /// Seconds between measurements. Default 10.
    #[serde(default = "default_interval")]
    pub interval_secs: u64,
    /// Measurements taken. Default 3.
    #[serde(default = "default_count")]
    pub count: u32,
    /// Failed measurements tolerated (Argo's `failureLimit`). Default 0.
    #[serde(default)]
    pub failure_limit: u32,
    /// Measurements without a verdict tolerated (no data, or the query
    /// failed). Default 0.
    #[serde(default)]
    pub inconclusive_limit: u32,
}

fn default_interval() -> u64 {
    10
}

fn default_count() -> u32 {
    3
}

/// The placeholders a query may use.
pub const PLACEHOLDERS: &[&str] = &["app", "region", "cluster", "color", "image", "interval"];

impl MetricCheck {
    /// A built-in success-rate check: at least `min_percent` of requests
    /// answered without a 5xx.
    pub fn success_rate(name: &str, min_percent: f64) -> MetricCheck {
        MetricCheck {
            name: name.into(),
            provider: MetricProvider::RequestSuccessRate,
            query: None,
            percentile: None,
            metrics_path: None,
            url: None,
            command: vec![],
            timeout_secs: None,
            retries: None,
            condition: Some(Condition {
                op: CompareOp::Ge,
                threshold: min_percent,
            }),
            stage: AnalysisStage::Bake,
            interval_secs: default_interval(),
            count: default_count(),
            failure_limit: 0,
            inconclusive_limit: 0,
        }
    }

    /// The longest this check can run.
    pub fn duration(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.interval_secs.saturating_mul(u64::from(self.count)))
    }

    /// The condition, or the provider's default.
    pub fn condition(&self) -> Condition {
        self.condition.unwrap_or(Condition {
            op: CompareOp::Eq,
            threshold: if self.provider == MetricProvider::Job { 0.0 } else { 1.0 },
        })
    }

    /// One attempt's time limit (`webhook`, `job`).
    pub fn timeout(&self) -> std::time::Duration {
        let default = if self.provider == MetricProvider::Job { 300 } else { 10 };
        std::time::Duration::from_secs(self.timeout_secs.unwrap_or(default))
    }

    /// The first measurement is taken at once (webhooks and jobs judge
    /// the color as it is) rather than after a first interval of traffic.
    pub fn measures_at_once(&self) -> bool {
        matches!(self.provider, MetricProvider::Webhook | MetricProvider::Job)
    }

    pub fn metrics_path(&self) -> &str {
        self.metrics_path.as_deref().unwrap_or("/metrics")
    }

    pub fn percentile(&self) -> f64 {
        self.percentile.unwrap_or(95.0)
    }

    /// Checks the check; `field` names it in errors (`analysis[0]`).
    pub fn validate(&self, field: &str) -> Result<(), Error> {
        let bad = |k: &str, why: String| Error::InvalidArgument(format!("{field}.{k}: {why}"));
        crate::domain::validate_name(&format!("{field}.name"), &self.name)?;
        if self.interval_secs == 0 || self.interval_secs > 3600 {
            return Err(bad("interval_secs", format!("{} must be 1..3600", self.interval_secs)));
        }
        if self.count == 0 || self.count > 1000 {
            return Err(bad("count", format!("{} must be 1..1000", self.count)));
        }
        let unused = |k: &str, set: bool| {
            if set {
                Err(bad(k, format!("not used by provider {:?}", self.provider.as_str())))
            } else {
                Ok(())
            }
        };
        let event_like = self.measures_at_once();
        unused("url", self.provider != MetricProvider::Webhook && self.url.is_some())?;
        unused(
            "command",
            self.provider != MetricProvider::Job && !self.command.is_empty(),
        )?;
        unused("timeout_secs", !event_like && self.timeout_secs.is_some())?;
        unused(
            "retries",
            self.provider != MetricProvider::Webhook && self.retries.is_some(),
        )?;
        if self.condition.is_none() && !event_like {
            return Err(bad(
                "condition",
                format!("required by provider {:?}", self.provider.as_str()),
            ));
        }
        if let Some(t) = self.timeout_secs
            && !(1..=3600).contains(&t)
        {
            return Err(bad("timeout_secs", format!("{t} must be 1..3600")));
        }
        if self.retries.is_some_and(|r| r > 10) {
            return Err(bad("retries", "at most 10".into()));
        }
        match self.provider {
            MetricProvider::Webhook => {
                let u = self
                    .url
                    .as_deref()
                    .ok_or_else(|| bad("url", "required by provider \"webhook\"".into()))?;
                let rest = u
                    .strip_prefix("http://")
                    .ok_or_else(|| bad("url", format!("{u:?} must be an http:// address")))?;
                if rest.is_empty() || rest.starts_with('/') || u.len() > 2048 || u.chars().any(char::is_whitespace) {
                    return Err(bad("url", format!("{u:?} is not an http://host[:port]/path address")));
                }
            }
            MetricProvider::Job => {
                let program = self.command.first().map(String::as_str).unwrap_or_default();
                if program.is_empty() {
                    return Err(bad("command", "required by provider \"job\"".into()));
                }
            }
            _ => {}
        }
        match self.provider {
            MetricProvider::Prometheus => {
                let q = self
                    .query
                    .as_deref()
                    .ok_or_else(|| bad("query", "required by provider \"prometheus\"".into()))?;
                if q.trim().is_empty() || q.len() > 8192 {
                    return Err(bad("query", "must be a PromQL query of 1..8192 bytes".into()));
                }
                check_placeholders(q).map_err(|why| bad("query", why))?;
            }
            other => {
                if self.query.is_some() {
                    return Err(bad("query", format!("not used by provider {:?}", other.as_str())));
                }
            }
        }
        if let Some(p) = self.percentile {
            if self.provider != MetricProvider::RequestDuration {
                return Err(bad("percentile", "only request-duration takes a percentile".into()));
            }
            if !(p > 0.0 && p < 100.0) {
                return Err(bad("percentile", format!("{p} must be between 0 and 100")));
            }
        }
        if let Some(p) = &self.metrics_path {
            if !matches!(
                self.provider,
                MetricProvider::RequestSuccessRate | MetricProvider::RequestDuration
            ) {
                return Err(bad("metrics_path", "only the built-in checks scrape the color".into()));
            }
            if !p.starts_with('/') {
                return Err(bad("metrics_path", "must start with '/'".into()));
            }
        }
        Ok(())
    }
}

/// Refuses `{{name}}` placeholders that are not in [`PLACEHOLDERS`] and
/// unclosed braces, so a typo fails at `apps apply`, not mid-rollout.
fn check_placeholders(q: &str) -> Result<(), String> {
    let mut rest = q;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or("an unclosed {{")?;
        let name = after[..end].trim();
        if !PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "unknown placeholder {{{{{name}}}}} (known: {})",
                PLACEHOLDERS.join(", ")
            ));
        }
        rest = &after[end + 2..];
    }
    Ok(())
}

/// What a query's placeholders stand for in one run.
#[derive(Clone, Debug, Default)]
pub struct QueryContext {
    pub app: String,
    pub region: String,
    pub cluster: String,
    pub color: String,
    pub image: String,
    pub interval_secs: u64,
}

impl QueryContext {
    /// `query` with its placeholders substituted.
    pub fn render(&self, query: &str) -> String {
        let interval = format!("{}s", self.interval_secs);
        let mut out = query.to_owned();
        for (name, value) in [
            ("app", self.app.as_str()),
            ("region", &self.region),
            ("cluster", &self.cluster),
            ("color", &self.color),
            ("image", &self.image),
            ("interval", &interval),
        ] {
            out = out.replace(&format!("{{{{{name}}}}}", name = name), value);
            out = out.replace(&format!("{{{{ {name} }}}}", name = name), value);
        }
        out
    }
}

/// One measurement's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Passed,
    Failed,
    /// No data, or the value could not be had (the query failed).
    Inconclusive,
}

/// One measurement, as recorded in the task result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// When it was taken, Unix ms.
    pub at_unix_ms: u64,
    /// Absent when inconclusive.
    pub value: Option<f64>,
    pub outcome: Outcome,
    /// Why it is inconclusive, or what was measured (`291 of 300 requests`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// One check's run: every measurement and the verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    pub name: String,
    pub provider: MetricProvider,
    pub condition: Condition,
    /// The query as run, placeholders substituted (prometheus checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    pub measurements: Vec<Measurement>,
    pub failure_limit: u32,
    pub inconclusive_limit: u32,
    pub passed: bool,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl CheckReport {
    pub fn count(&self, outcome: Outcome) -> u32 {
        self.measurements.iter().filter(|m| m.outcome == outcome).count() as u32
    }

    /// `FAIL error-rate (result < 0.01): 0.031 0.029 ✗ — 2 failed > limit 0`:
    /// one line for task messages, `operations get` and `watch`.
    pub fn line(&self) -> String {
        let values: Vec<String> = self
            .measurements
            .iter()
            .map(|m| match (m.value, m.outcome) {
                (Some(v), Outcome::Passed) => format_value(v),
                (Some(v), _) => format!("{}!", format_value(v)),
                (None, Outcome::Failed) => "failed!".into(),
                (None, _) => "no-data".into(),
            })
            .collect();
        let mut line = format!(
            "{} {} [{}] ({}): {}",
            if self.passed { "pass" } else { "FAIL" },
            self.name,
            self.provider.as_str(),
            self.condition,
            if values.is_empty() {
                "no measurements".to_owned()
            } else {
                values.join(" ")
            }
        );
        if !self.reason.is_empty() {
            line.push_str(" — ");
            line.push_str(&self.reason);
        }
        line
    }
}

/// A value for people: up to four significant decimals, no trailing zeros.
pub fn format_value(v: f64) -> String {
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" { "0".into() } else { s.into() }
}

/// Every check of one stage of one task.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AnalysisReport {
    pub passed: bool,
    pub checks: Vec<CheckReport>,
}

impl AnalysisReport {
    pub fn lines(&self) -> Vec<String> {
        self.checks.iter().map(CheckReport::line).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_parse_print_and_judge() {
        let c: Condition = "result < 0.01".parse().unwrap();
        assert_eq!(c.to_string(), "result < 0.01");
        assert!(c.holds(0.009) && !c.holds(0.01) && !c.holds(f64::NAN));
        let c: Condition = " result>=99.5".parse().unwrap();
        assert_eq!((c.op, c.threshold), (CompareOp::Ge, 99.5));
        assert!(c.holds(99.5) && !c.holds(99.4));
        for bad in ["", "x < 1", "result ~ 1", "result < ", "result < NaN", "result <= inf"] {
            let e = bad.parse::<Condition>().unwrap_err();
            assert!(e.contains("expected `result <op> <number>`"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn checks_are_validated_with_the_field_named() {
        let mut c = MetricCheck::success_rate("success", 99.0);
        c.validate("analysis[0]").unwrap();
        c.query = Some("up".into());
        let e = c.validate("analysis[0]").unwrap_err().to_string();
        assert!(e.contains("analysis[0].query: not used by provider"), "{e}");
        let mut p = MetricCheck {
            provider: MetricProvider::Prometheus,
            query: Some("sum(rate(x{app=\"{{app}}\",colour=\"{{colour}}\"}[1m]))".into()),
            ..MetricCheck::success_rate("error-rate", 1.0)
        };
        let e = p.validate("analysis[1]").unwrap_err().to_string();
        assert!(e.contains("analysis[1].query: unknown placeholder {{colour}}"), "{e}");
        p.query = Some("x{color=\"{{ color }}\"}[{{interval}}]".into());
        p.validate("analysis[1]").unwrap();
        p.query = None;
        let e = p.validate("analysis[1]").unwrap_err().to_string();
        assert!(e.contains("analysis[1].query: required"), "{e}");
        let d = MetricCheck {
            provider: MetricProvider::RequestDuration,
            percentile: Some(100.0),
            ..MetricCheck::success_rate("p95", 1.0)
        };
        let e = d.validate("analysis[2]").unwrap_err().to_string();
        assert!(e.contains("analysis[2].percentile"), "{e}");
        let z = MetricCheck {
            count: 0,
            ..MetricCheck::success_rate("s", 1.0)
        };
        assert!(z.validate("a").unwrap_err().to_string().contains("a.count"));
    }

    #[test]
    fn queries_are_rendered() {
        let ctx = QueryContext {
            app: "shop".into(),
            region: "us-east".into(),
            cluster: "us-east-1".into(),
            color: "green".into(),
            image: "shop:v2".into(),
            interval_secs: 10,
        };
        assert_eq!(
            ctx.render("rate(x{app=\"{{app}}\",color=\"{{ color }}\",region=\"{{region}}\"}[{{interval}}])"),
            "rate(x{app=\"shop\",color=\"green\",region=\"us-east\"}[10s])"
        );
    }

    /// The seed's rules, as shipped for users to paste, are valid checks.
    #[test]
    fn the_seed_rules_example_is_valid() {
        #[derive(Deserialize)]
        struct File {
            analysis: Vec<MetricCheck>,
        }
        let f: File = toml::from_str(include_str!("../../deploy/examples/analysis-prometheus.toml")).unwrap();
        assert_eq!(f.analysis.len(), 2);
        for (i, c) in f.analysis.iter().enumerate() {
            c.validate(&format!("analysis[{i}]")).unwrap();
            assert_eq!((c.provider, c.stage), (MetricProvider::Prometheus, AnalysisStage::Bake));
        }
    }

    #[test]
    fn a_toml_check_reads_with_defaults() {
        let c: MetricCheck = toml::from_str(
            r#"
            name = "error-rate"
            provider = "prometheus"
            query = "sum(rate(http_requests_total{code=~\"5..\"}[1m]))"
            condition = "result < 0.01"
            "#,
        )
        .unwrap();
        assert_eq!(
            (c.stage, c.interval_secs, c.count, c.failure_limit),
            (AnalysisStage::Bake, 10, 3, 0)
        );
        let back: MetricCheck = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
