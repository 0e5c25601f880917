//! Runs an app's metric checks ([`cutover_shared::analysis`]) in this
//! agent's region: PromQL queries against the region's Prometheus, and the
//! two built-in checks, which need no Prometheus: they scrape the color's
//! own metrics endpoint at the start and end of each interval and judge the
//! requests in between.
//!
//! Every measurement is recorded with its time and value, so a rolled-back
//! release shows the samples that failed it. Checks run side by side; the
//! first check that exceeds its failure or inconclusive limit stops the
//! others (Argo Rollouts fails an analysis run the same way).

use std::collections::BTreeMap;
use std::time::Duration;

use cutover_shared::analysis::{
    AnalysisReport, CheckReport, Measurement, MetricCheck, MetricProvider, Outcome, QueryContext, format_value,
};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use http_body_util::{BodyExt, Limited};
use hyper::Uri;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::gates::{HttpClient, http_client as client};

/// Time limit of one query or scrape.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Most of a query answer or metrics page that is read.
const MAX_BODY: usize = 4 << 20;

/// Where the checks of one run look.
#[derive(Clone, Debug)]
pub struct Target {
    /// `host:port` of the color under test (its preview address before a
    /// switch, the service address after): what the built-in checks scrape.
    pub address: String,
    /// The placeholders' values; `color` also selects the built-in
    /// checks' series when the app labels them by color.
    pub ctx: QueryContext,
    /// The region's Prometheus (`http://host:port`), from the agent config.
    pub prometheus: Option<String>,
}

fn now_unix_ms() -> u64 {
    u64::try_from(cutover_shared::domain::now_unix_ms()).unwrap_or(0)
}

/// Runs `checks` against `target` and reports every measurement. An empty
/// list passes at once.
pub async fn run(checks: &[MetricCheck], target: &Target, progress: &(dyn Fn(String) + Send + Sync)) -> AnalysisReport {
    let client = client();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut running: FuturesUnordered<_> = checks
        .iter()
        .map(|c| run_check(&client, c, target, stop_rx.clone(), progress))
        .collect();
    let mut reports = Vec::with_capacity(checks.len());
    while let Some(report) = running.next().await {
        if !report.passed {
            // The others stop at their next measurement and say why.
            let _ = stop_tx.send(true);
        }
        reports.push(report);
    }
    // Declared order, so reports read the same every time.
    reports.sort_by_key(|r| checks.iter().position(|c| c.name == r.name));
    AnalysisReport {
        passed: reports.iter().all(|r| r.passed),
        checks: reports,
    }
}

async fn run_check(
    client: &HttpClient,
    check: &MetricCheck,
    target: &Target,
    mut stop: tokio::sync::watch::Receiver<bool>,
    progress: &(dyn Fn(String) + Send + Sync),
) -> CheckReport {
    let query = (check.provider == MetricProvider::Prometheus).then(|| {
        let ctx = QueryContext {
            interval_secs: check.interval_secs,
            ..target.ctx.clone()
        };
        ctx.render(check.query.as_deref().unwrap_or_default())
    });
    let mut report = CheckReport {
        name: check.name.clone(),
        provider: check.provider,
        condition: check.condition(),
        query: query.clone(),
        measurements: Vec::new(),
        failure_limit: check.failure_limit,
        inconclusive_limit: check.inconclusive_limit,
        passed: false,
        reason: String::new(),
    };
    let prometheus = match (check.provider, &target.prometheus) {
        (MetricProvider::Prometheus, None) => {
            report.reason = "this agent has no prometheus_url in its config to query".into();
            return report;
        }
        (_, p) => p.as_deref(),
    };
    let interval = Duration::from_secs(check.interval_secs);
    // The built-ins' previous scrape: each measurement is the difference.
    let mut baseline = match check.provider {
        MetricProvider::RequestSuccessRate | MetricProvider::RequestDuration => {
            scrape(client, &target.address, check.metrics_path()).await.ok()
        }
        _ => None,
    };
    for i in 1..=check.count {
        let wait = if i == 1 && check.measures_at_once() {
            Duration::ZERO
        } else {
            interval
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => {
                report.reason = format!("stopped after {} of {} measurements: another check failed", i - 1, check.count);
                return report;
            }
        }
        let at_unix_ms = now_unix_ms();
        let reading = match (check.provider, prometheus, &query) {
            (MetricProvider::Prometheus, Some(url), Some(q)) => query_prometheus(client, url, q).await.into(),
            (MetricProvider::Webhook, ..) => webhook(check, target).await,
            (MetricProvider::Job, ..) => job(check, target).await,
            _ => match scrape(client, &target.address, check.metrics_path()).await {
                Ok(now) => {
                    let v = match &baseline {
                        Some(before) => builtin(check, &target.ctx.color, before, &now),
                        None => Err("no earlier scrape to compare with".into()),
                    };
                    baseline = Some(now);
                    v.into()
                }
                Err(e) => {
                    baseline = None;
                    Reading::NoData(e)
                }
            },
        };
        let m = match reading {
            Reading::Value(v, detail) if v.is_finite() => Measurement {
                at_unix_ms,
                value: Some(v),
                outcome: if check.condition().holds(v) {
                    Outcome::Passed
                } else {
                    Outcome::Failed
                },
                detail,
            },
            Reading::Value(v, _) => Measurement {
                at_unix_ms,
                value: None,
                outcome: Outcome::Inconclusive,
                detail: format!("no data (the value is {v})"),
            },
            Reading::NoData(why) => Measurement {
                at_unix_ms,
                value: None,
                outcome: Outcome::Inconclusive,
                detail: why,
            },
            Reading::Broken(why) => Measurement {
                at_unix_ms,
                value: None,
                outcome: Outcome::Failed,
                detail: why,
            },
        };
        progress(format!(
            "analysis {} {}/{}: {} {}{}",
            check.name,
            i,
            check.count,
            m.value.map_or_else(|| "no data".to_owned(), format_value),
            match m.outcome {
                Outcome::Passed => "ok",
                Outcome::Failed => "FAILED",
                Outcome::Inconclusive => "inconclusive",
            },
            if m.detail.is_empty() {
                String::new()
            } else {
                format!(" ({})", m.detail)
            }
        ));
        report.measurements.push(m);
        let (failed, inconclusive) = (report.count(Outcome::Failed), report.count(Outcome::Inconclusive));
        if failed > check.failure_limit {
            report.reason = format!("{failed} failed > failure_limit {}", check.failure_limit);
            return report;
        }
        if inconclusive > check.inconclusive_limit {
            report.reason = format!(
                "{inconclusive} inconclusive > inconclusive_limit {}",
                check.inconclusive_limit
            );
            return report;
        }
    }
    report.passed = true;
    report
}

/// What one measurement read.
enum Reading {
    /// A value for the condition to judge, and what it was read from.
    Value(f64, String),
    /// No verdict: no data, or the source could not be read.
    NoData(String),
    /// A failure with no value (a job that timed out).
    Broken(String),
}

impl From<Result<(f64, String), String>> for Reading {
    fn from(r: Result<(f64, String), String>) -> Self {
        match r {
            Ok((v, d)) => Reading::Value(v, d),
            Err(e) => Reading::NoData(e),
        }
    }
}

/// POSTs the rollout's context to the check's URL, retrying a failure or
/// a timeout; 1 when an answer is a 2xx with `{"pass": true}`, else 0.
async fn webhook(check: &MetricCheck, target: &Target) -> Reading {
    use http_body_util::Full;
    let url = check.url.clone().unwrap_or_default();
    let Ok(uri) = url.parse::<Uri>() else {
        return Reading::Broken(format!("bad url {url:?}"));
    };
    let body = serde_json::json!({
        "check": check.name,
        "app": target.ctx.app,
        "region": target.ctx.region,
        "cluster": target.ctx.cluster,
        "color": target.ctx.color,
        "image": target.ctx.image,
        "address": target.address,
        "preview_url": format!("http://{}", target.address),
    })
    .to_string();
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(check.timeout()));
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let attempts = 1 + check.retries.unwrap_or(2);
    let mut why = String::new();
    for attempt in 1..=attempts {
        let req = hyper::Request::post(uri.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.clone())));
        let Ok(req) = req else {
            return Reading::Broken(format!("bad url {url:?}"));
        };
        let call = async {
            let resp = client.request(req).await.map_err(|e| format!("{url}: {e}"))?;
            let status = resp.status();
            let answer = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("{url}: reading the answer: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, answer))
        };
        match tokio::time::timeout(check.timeout(), call).await {
            Err(_) => why = format!("no answer within {} s", check.timeout().as_secs()),
            Ok(Err(e)) => why = e,
            Ok(Ok((status, _))) if !status.is_success() => why = format!("status {}", status.as_u16()),
            Ok(Ok((status, answer))) => {
                let verdict = serde_json::from_slice::<serde_json::Value>(&answer)
                    .ok()
                    .and_then(|v| v.get("pass").and_then(serde_json::Value::as_bool));
                return match verdict {
                    Some(true) => Reading::Value(1.0, format!("status {}, pass", status.as_u16())),
                    Some(false) => Reading::Value(0.0, format!("status {}, pass: false", status.as_u16())),
                    None => Reading::Value(0.0, format!("status {} without {{\"pass\": true}}", status.as_u16())),
                };
            }
        }
        if attempt < attempts {
            tracing::info!(check = %check.name, attempt, "webhook failed ({why}); retrying");
        }
    }
    Reading::Value(0.0, format!("{why} ({attempts} attempts)"))
}

/// Most of a job's output kept in the task result.
const JOB_OUTPUT_TAIL: usize = 2000;

/// Runs the check's command (already checked against the agent's
/// `job_commands`) with the preview address and the release in its
/// environment; its exit code and the tail of its output.
async fn job(check: &MetricCheck, target: &Target) -> Reading {
    let Some((program, args)) = check.command.split_first() else {
        return Reading::Broken("no command".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env("PREVIEW_URL", format!("http://{}", target.address))
        .env("CUTOVER_APP", &target.ctx.app)
        .env("CUTOVER_REGION", &target.ctx.region)
        .env("CUTOVER_CLUSTER", &target.ctx.cluster)
        .env("CUTOVER_COLOR", &target.ctx.color)
        .env("CUTOVER_IMAGE", &target.ctx.image)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(check.timeout(), cmd.output()).await {
        Err(_) => {
            return Reading::Broken(format!(
                "{program} did not finish within {} s; killed",
                check.timeout().as_secs()
            ));
        }
        Ok(Err(e)) => return Reading::Broken(format!("cannot run {program}: {e}")),
        Ok(Ok(out)) => out,
    };
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let text = text.trim();
    let cut = text.len().saturating_sub(JOB_OUTPUT_TAIL);
    let start = (cut..=text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    let tail = &text[start..];
    match out.status.code() {
        Some(code) => Reading::Value(f64::from(code), format!("exit {code}: {tail}")),
        None => Reading::Broken(format!("{program} was killed by a signal: {tail}")),
    }
}

async fn get(client: &HttpClient, url: &str) -> Result<(u16, Bytes), String> {
    let uri: Uri = url.parse().map_err(|e| format!("bad address {url:?}: {e}"))?;
    let fetch = async {
        let resp = client.get(uri).await.map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("{url}: reading the answer: {e}"))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(FETCH_TIMEOUT, fetch)
        .await
        .map_err(|_| format!("{url}: no answer within {} s", FETCH_TIMEOUT.as_secs()))?
}

/// An instant query; the value of its one series or scalar. No series
/// (or NaN) is "no data"; several series are refused, since which one the
/// condition should judge is unknowable: aggregate them in the query.
async fn query_prometheus(client: &HttpClient, base: &str, query: &str) -> Result<(f64, String), String> {
    let url = format!(
        "{}/api/v1/query?{}",
        base.trim_end_matches('/'),
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("query", query)
            .finish()
    );
    let (status, body) = get(client, &url).await?;
    let answer: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("Prometheus answered {status} with no JSON: {e}"))?;
    if answer["status"] != "success" {
        return Err(format!(
            "Prometheus refused the query ({status}): {}",
            answer["error"].as_str().unwrap_or("no reason given")
        ));
    }
    let data = &answer["data"];
    let sample = match data["resultType"].as_str() {
        Some("scalar") => data["result"].clone(),
        Some("vector") => {
            let series = data["result"].as_array().cloned().unwrap_or_default();
            match series.len() {
                0 => return Err("no data (the query returned no series)".into()),
                1 => series[0]["value"].clone(),
                n => {
                    return Err(format!(
                        "the query returned {n} series; aggregate it to one (with sum or max)"
                    ));
                }
            }
        }
        other => return Err(format!("the query returned a {other:?}, not a vector or scalar")),
    };
    let value = sample[1]
        .as_str()
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| format!("unreadable sample {sample}"))?;
    Ok((value, String::new()))
}

/// One sample of the exposition format: name, labels, value.
#[derive(Clone, Debug, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

async fn scrape(client: &HttpClient, address: &str, path: &str) -> Result<Vec<Sample>, String> {
    let (status, body) = get(client, &format!("http://{address}{path}")).await?;
    if status != 200 {
        return Err(format!("metrics endpoint {path} answered {status}"));
    }
    Ok(parse_exposition(&String::from_utf8_lossy(&body)))
}

/// Parses Prometheus' text exposition format far enough for the built-in
/// checks: sample lines with optional labels; comments, timestamps and
/// unreadable lines are skipped. (Hand-written rather than a crate: the
/// maintained parsers bring regex and chrono for two metric families.)
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = match line.find('{') {
            Some(open) => {
                let Some(close) = line.rfind('}') else { continue };
                (&line[..open], parse_labels(&line[open + 1..close]), &line[close + 1..])
            }
            None => match line.split_once(char::is_whitespace) {
                Some((n, r)) => (n, BTreeMap::new(), r),
                None => continue,
            },
        };
        let Some(value) = rest.split_whitespace().next().and_then(parse_float) else {
            continue;
        };
        out.push(Sample {
            name: name.trim().to_owned(),
            labels,
            value,
        });
    }
    out
}

fn parse_float(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

/// `a="x",b="y\"z"` → {a: x, b: y"z}.
fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let name = name.trim().trim_start_matches(',').trim().to_owned();
        if name.is_empty() || chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(o) => value.push(o),
                    None => break,
                },
                '"' => break,
                o => value.push(o),
            }
        }
        labels.insert(name, value);
    }
    labels
}

/// The series of the color under test: all of them when the app does not
/// label its series by color.
fn of_color<'a>(samples: &'a [Sample], name: &'a str, color: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
    samples
        .iter()
        .filter(move |s| s.name == name && s.labels.get("color").is_none_or(|c| c == color))
}

/// Increase of a counter between two scrapes; a counter that went down
/// was reset (the process restarted), so its new value is the increase.
fn increase(before: f64, after: f64) -> f64 {
    if after >= before { after - before } else { after }
}

/// Increase of each series of `name` between the scrapes.
fn increases(before: &[Sample], after: &[Sample], name: &str, color: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let earlier: BTreeMap<_, f64> = of_color(before, name, color)
        .map(|s| (s.labels.clone(), s.value))
        .collect();
    of_color(after, name, color)
        .map(|s| {
            let d = increase(earlier.get(&s.labels).copied().unwrap_or(0.0), s.value);
            (s.labels.clone(), d)
        })
        .collect()
}

/// A built-in check's value over the interval between two scrapes.
fn builtin(check: &MetricCheck, color: &str, before: &[Sample], after: &[Sample]) -> Result<(f64, String), String> {
    match check.provider {
        MetricProvider::RequestSuccessRate => {
            let deltas = increases(before, after, "http_requests_total", color);
            if deltas.is_empty() {
                return Err("the color exports no http_requests_total".into());
            }
            let total: f64 = deltas.iter().map(|(_, d)| d).sum();
            let errors: f64 = deltas
                .iter()
                .filter(|(l, _)| l.get("code").is_some_and(|c| c.starts_with('5')))
                .map(|(_, d)| d)
                .sum();
            if total == 0.0 {
                return Err("no data (no requests in the interval)".into());
            }
            Ok((
                100.0 * (total - errors) / total,
                format!("{} of {} requests answered without a 5xx", total - errors, total),
            ))
        }
        MetricProvider::RequestDuration => {
            let deltas = increases(before, after, "http_request_duration_seconds_bucket", color);
            if deltas.is_empty() {
                return Err("the color exports no http_request_duration_seconds histogram".into());
            }
            // Sum the buckets of every status code by bound.
            let mut by_bound: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
            for (labels, d) in &deltas {
                let Some(le) = labels.get("le").and_then(|l| parse_float(l)) else {
                    continue;
                };
                by_bound.entry(le.to_bits()).or_insert((le, 0.0)).1 += d;
            }
            let mut buckets: Vec<(f64, f64)> = by_bound.into_values().collect();
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let total = buckets.last().map_or(0.0, |b| b.1);
            if total == 0.0 {
                return Err("no data (no requests in the interval)".into());
            }
            let p = check.percentile();
            let secs = histogram_quantile(p / 100.0, &buckets);
            Ok((secs * 1000.0, format!("p{} of {} requests", format_value(p), total)))
        }
        _ => Err("not a built-in check".into()),
    }
}

/// Prometheus' `histogram_quantile` over cumulative `(upper bound, count)`
/// buckets sorted by bound, the last being +Inf: linear interpolation
/// inside the bucket the rank falls in; the highest finite bound when it
/// falls in +Inf.
fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return f64::NAN;
    };
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return lower.0;
            }
            let in_bucket = count - lower.1;
            if in_bucket == 0.0 {
                return bound;
            }
            return lower.0 + (bound - lower.0) * (rank - lower.1) / in_bucket;
        }
        lower = (bound, count);
    }
    lower.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample_app::TestApp;
    use cutover_shared::analysis::{CompareOp, Condition};

    fn target(address: String, prometheus: Option<String>) -> Target {
        Target {
            address,
            ctx: QueryContext {
                app: "shop".into(),
                color: "unknown".into(),
                ..Default::default()
            },
            prometheus,
        }
    }

    /// `n` requests to `/` while the check measures.
    fn drive(addr: std::net::SocketAddr, n: usize) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let c = client();
            for _ in 0..n {
                let uri: Uri = format!("http://{addr}/").parse().unwrap();
                let resp = c.get(uri).await.unwrap();
                resp.into_body().collect().await.unwrap();
            }
        })
    }

    fn check(provider: MetricProvider, condition: &str) -> MetricCheck {
        MetricCheck {
            name: "c".into(),
            provider,
            condition: Some(condition.parse().unwrap()),
            interval_secs: 1,
            count: 2,
            ..MetricCheck::success_rate("c", 0.0)
        }
    }

    #[test]
    fn exposition_lines_and_quantiles() {
        let s = parse_exposition(
            "# TYPE x counter\nx{a=\"1\",b=\"q\\\"z\"} 3\ny 4.5 1700000000\nbroken\nz{le=\"+Inf\"} +Inf\n",
        );
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(s[0].labels.get("b").map(String::as_str), Some("q\"z"));
        assert_eq!((s[1].name.as_str(), s[1].value), ("y", 4.5));
        let b = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (f64::INFINITY, 100.0)];
        assert!((histogram_quantile(0.5, &b) - 0.1).abs() < 1e-9);
        assert!((histogram_quantile(0.95, &b) - 0.75).abs() < 1e-9);
        let over = [(0.1, 0.0), (f64::INFINITY, 10.0)];
        assert_eq!(histogram_quantile(0.9, &over), 0.1);
    }

    #[tokio::test]
    async fn success_rate_of_a_release_with_3_percent_errors_fails() {
        let app = TestApp::start("v2-errors-3").await;
        let load = drive(app.addr, 400);
        let c = check(MetricProvider::RequestSuccessRate, "result >= 99");
        let r = run(std::slice::from_ref(&c), &target(app.addr.to_string(), None), &|_| {}).await;
        load.abort();
        assert!(!r.passed, "{r:?}");
        let m = &r.checks[0].measurements[0];
        assert_eq!(m.outcome, Outcome::Failed, "{r:?}");
        let v = m.value.unwrap();
        assert!((96.0..98.5).contains(&v), "{v} {r:?}");
        assert!(r.checks[0].reason.contains("1 failed > failure_limit 0"), "{r:?}");
        assert!(
            r.lines()[0].starts_with("FAIL c [request-success-rate] (result >= 99): 9"),
            "{:?}",
            r.lines()
        );
    }

    #[tokio::test]
    async fn a_healthy_release_passes_success_rate_and_duration() {
        let app = TestApp::start("v1").await;
        let load = drive(app.addr, 100_000);
        let checks = [
            check(MetricProvider::RequestSuccessRate, "result >= 99"),
            MetricCheck {
                name: "p95".into(),
                percentile: Some(95.0),
                ..check(MetricProvider::RequestDuration, "result < 500")
            },
        ];
        let r = run(&checks, &target(app.addr.to_string(), None), &|_| {}).await;
        load.abort();
        assert!(r.passed, "{r:?}");
        assert_eq!(r.checks[0].measurements[0].value, Some(100.0));
        assert_eq!(r.checks[1].measurements.len(), 2);
        assert!(r.checks[1].measurements[0].detail.starts_with("p95 of "), "{r:?}");
    }

    #[tokio::test]
    async fn no_traffic_is_inconclusive_with_its_own_limit() {
        let app = TestApp::start("v1").await;
        let mut c = check(MetricProvider::RequestSuccessRate, "result >= 99");
        let r = run(std::slice::from_ref(&c), &target(app.addr.to_string(), None), &|_| {}).await;
        assert!(!r.passed);
        assert_eq!(r.checks[0].measurements[0].outcome, Outcome::Inconclusive);
        assert!(
            r.checks[0].reason.contains("1 inconclusive > inconclusive_limit 0"),
            "{r:?}"
        );
        c.inconclusive_limit = 2;
        let r = run(std::slice::from_ref(&c), &target(app.addr.to_string(), None), &|_| {}).await;
        assert!(r.passed, "{r:?}");
        assert_eq!(r.checks[0].count(Outcome::Inconclusive), 2);
    }

    /// A webhook receiver answering each POST with `answers[i]` (status,
    /// body), the last one repeated, after `delay`; counts the calls and
    /// keeps the last body.
    async fn receiver(
        answers: Vec<(u16, &'static str)>,
        delay: Duration,
    ) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use axum::routing::post;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let app = axum::Router::new().route(
            "/hook",
            post(move |body: String| {
                let (seen, answers) = (s.clone(), answers.clone());
                async move {
                    let n = {
                        let mut seen = seen.lock().unwrap();
                        seen.push(body);
                        seen.len()
                    };
                    tokio::time::sleep(delay).await;
                    let (status, text) = answers[(n - 1).min(answers.len() - 1)];
                    (axum::http::StatusCode::from_u16(status).unwrap(), text)
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        (url, seen)
    }

    fn hook(url: &str, timeout_secs: u64) -> MetricCheck {
        MetricCheck {
            url: Some(url.into()),
            timeout_secs: Some(timeout_secs),
            retries: Some(2),
            condition: None,
            count: 1,
            ..check(MetricProvider::Webhook, "result == 1")
        }
    }

    #[tokio::test]
    async fn webhooks_pass_on_2xx_with_pass_true_and_retry_failures() {
        let t = target("127.0.0.1:9".into(), None);
        // Passes, with the rollout's context in the body.
        let (url, seen) = receiver(vec![(200, r#"{"pass": true}"#)], Duration::ZERO).await;
        let r = run(&[hook(&url, 5)], &t, &|_| {}).await;
        assert!(r.passed, "{r:?}");
        assert_eq!(r.checks[0].measurements[0].value, Some(1.0));
        let body: serde_json::Value = serde_json::from_str(&seen.lock().unwrap()[0]).unwrap();
        assert_eq!(
            (body["app"].as_str(), body["preview_url"].as_str()),
            (Some("shop"), Some("http://127.0.0.1:9"))
        );
        // 500 every time: three attempts, then a failed measurement.
        let (url, seen) = receiver(vec![(500, "broken")], Duration::ZERO).await;
        let r = run(&[hook(&url, 5)], &t, &|_| {}).await;
        assert!(!r.passed);
        assert_eq!(seen.lock().unwrap().len(), 3);
        assert_eq!(r.checks[0].measurements[0].detail, "status 500 (3 attempts)");
        // A 500, then a pass: the retry passes.
        let (url, seen) = receiver(vec![(500, ""), (200, r#"{"pass":true}"#)], Duration::ZERO).await;
        assert!(run(&[hook(&url, 5)], &t, &|_| {}).await.passed);
        assert_eq!(seen.lock().unwrap().len(), 2);
        // Too slow every time: timed out, three attempts.
        let (url, seen) = receiver(vec![(200, r#"{"pass": true}"#)], Duration::from_secs(3)).await;
        let r = run(&[hook(&url, 1)], &t, &|_| {}).await;
        assert!(!r.passed);
        assert_eq!(r.checks[0].measurements[0].detail, "no answer within 1 s (3 attempts)");
        assert_eq!(seen.lock().unwrap().len(), 3);
        // A 2xx that does not say pass fails.
        let (url, _) = receiver(vec![(200, r#"{"pass": false}"#)], Duration::ZERO).await;
        let r = run(&[hook(&url, 5)], &t, &|_| {}).await;
        assert_eq!(r.checks[0].measurements[0].value, Some(0.0));
        assert!(!r.passed);
    }

    #[tokio::test]
    async fn jobs_pass_on_exit_0_with_their_output_recorded() {
        let app = TestApp::start("v1").await;
        let t = Target {
            ctx: QueryContext {
                app: "shop".into(),
                image: "shop:v2".into(),
                ..Default::default()
            },
            ..target(app.addr.to_string(), None)
        };
        let job = |script: &str| MetricCheck {
            command: vec!["sh".into(), "-c".into(), script.into()],
            condition: None,
            count: 1,
            ..check(MetricProvider::Job, "result == 0")
        };
        let r = run(&[job("echo scanning $PREVIEW_URL for $CUTOVER_IMAGE")], &t, &|_| {}).await;
        assert!(r.passed, "{r:?}");
        assert_eq!(
            r.checks[0].measurements[0].detail,
            format!("exit 0: scanning http://{} for shop:v2", app.addr)
        );
        let r = run(&[job("echo 2 alerts >&2; exit 3")], &t, &|_| {}).await;
        assert!(!r.passed);
        assert_eq!(r.checks[0].measurements[0].value, Some(3.0));
        assert_eq!(r.checks[0].measurements[0].detail, "exit 3: 2 alerts");
        let slow = MetricCheck {
            timeout_secs: Some(1),
            ..job("sleep 30")
        };
        let r = run(&[slow], &t, &|_| {}).await;
        assert_eq!(r.checks[0].measurements[0].outcome, Outcome::Failed);
        assert_eq!(
            r.checks[0].measurements[0].detail,
            "sh did not finish within 1 s; killed"
        );
    }

    #[tokio::test]
    async fn a_prometheus_check_without_a_prometheus_fails_at_once() {
        let c = MetricCheck {
            query: Some("up".into()),
            ..check(MetricProvider::Prometheus, "result == 1")
        };
        let r = run(&[c], &target("127.0.0.1:1".into(), None), &|_| {}).await;
        assert!(!r.passed && r.checks[0].measurements.is_empty());
        assert!(r.checks[0].reason.contains("no prometheus_url"), "{r:?}");
        assert_eq!(
            Condition {
                op: CompareOp::Lt,
                threshold: 1.0
            }
            .to_string(),
            "result < 1"
        );
    }
}
