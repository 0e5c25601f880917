//! The one place where protobuf types and domain types meet.

use crate::Error;
use crate::analysis;
use crate::app;
use crate::domain::{self, AgentState, TaskState};
use crate::proto;

impl From<domain::ClusterRef> for proto::ClusterRef {
    fn from(c: domain::ClusterRef) -> Self {
        proto::ClusterRef {
            region: c.region,
            cluster: c.cluster,
        }
    }
}

/// Validates a protobuf cluster reference.
pub fn cluster_from_proto(c: Option<proto::ClusterRef>, field: &str) -> Result<domain::ClusterRef, Error> {
    let c = c.ok_or_else(|| Error::InvalidArgument(format!("{field} is required")))?;
    domain::ClusterRef::new(&c.region, &c.cluster)
}

impl From<TaskState> for proto::TaskState {
    fn from(s: TaskState) -> Self {
        match s {
            TaskState::Pending => proto::TaskState::Pending,
            TaskState::Running => proto::TaskState::Running,
            TaskState::Succeeded => proto::TaskState::Succeeded,
            TaskState::Failed => proto::TaskState::Failed,
        }
    }
}

impl From<AgentState> for proto::AgentState {
    fn from(s: AgentState) -> Self {
        match s {
            AgentState::Up => proto::AgentState::Up,
            AgentState::Down => proto::AgentState::Down,
        }
    }
}

impl From<domain::TaskSpec> for proto::Task {
    fn from(t: domain::TaskSpec) -> Self {
        proto::Task {
            task_id: t.task_id,
            operation_id: t.operation_id,
            kind: t.kind,
            params: t.params.into_iter().collect(),
            target: Some(t.target.into()),
        }
    }
}

impl TryFrom<proto::Task> for domain::TaskSpec {
    type Error = Error;
    fn try_from(t: proto::Task) -> Result<Self, Error> {
        Ok(domain::TaskSpec {
            task_id: t.task_id,
            operation_id: t.operation_id,
            kind: t.kind,
            params: t.params.into_iter().collect(),
            target: cluster_from_proto(t.target, "target")?,
        })
    }
}

impl From<domain::TaskProgress> for proto::TaskProgress {
    fn from(p: domain::TaskProgress) -> Self {
        proto::TaskProgress {
            task_id: p.task_id,
            message: p.message,
            at_unix_ms: p.at_unix_ms,
        }
    }
}

impl From<proto::TaskProgress> for domain::TaskProgress {
    fn from(p: proto::TaskProgress) -> Self {
        domain::TaskProgress {
            task_id: p.task_id,
            message: p.message,
            at_unix_ms: p.at_unix_ms,
        }
    }
}

impl From<domain::TaskResult> for proto::TaskResult {
    fn from(r: domain::TaskResult) -> Self {
        proto::TaskResult {
            task_id: r.task_id,
            success: r.success,
            message: r.message,
            outputs: r.outputs.into_iter().collect(),
            replayed: r.replayed,
            finished_at_unix_ms: r.finished_at_unix_ms,
        }
    }
}

impl From<proto::TaskResult> for domain::TaskResult {
    fn from(r: proto::TaskResult) -> Self {
        domain::TaskResult {
            task_id: r.task_id,
            success: r.success,
            message: r.message,
            outputs: r.outputs.into_iter().collect(),
            replayed: r.replayed,
            finished_at_unix_ms: r.finished_at_unix_ms,
        }
    }
}

impl From<domain::TaskRecord> for proto::TaskStatus {
    fn from(t: domain::TaskRecord) -> Self {
        proto::TaskStatus {
            task: Some(t.spec.into()),
            state: proto::TaskState::from(t.state) as i32,
            progress: t.progress.into_iter().map(Into::into).collect(),
            result: t.result.map(Into::into),
            dispatch_count: t.dispatch_count,
            created_at_unix_ms: t.created_at_unix_ms,
        }
    }
}

impl From<domain::Operation> for proto::Operation {
    fn from(o: domain::Operation) -> Self {
        let kind = match o.kind {
            domain::OperationKind::Task => proto::OperationKind::Task,
            domain::OperationKind::Deploy => proto::OperationKind::Deploy,
            domain::OperationKind::Switch => proto::OperationKind::Switch,
            domain::OperationKind::Rollback => proto::OperationKind::Rollback,
            domain::OperationKind::HealthCheck => proto::OperationKind::HealthCheck,
            domain::OperationKind::Analysis => proto::OperationKind::Analysis,
            domain::OperationKind::Migrate => proto::OperationKind::Migrate,
            domain::OperationKind::Backup => proto::OperationKind::Backup,
            domain::OperationKind::Failover => proto::OperationKind::Failover,
            domain::OperationKind::Drill => proto::OperationKind::Drill,
        };
        proto::Operation {
            id: o.id,
            kind: kind as i32,
            state: proto::TaskState::from(o.state) as i32,
            created_by: o.created_by,
            created_at_unix_ms: o.created_at_unix_ms,
            updated_at_unix_ms: o.updated_at_unix_ms,
            tasks: o.tasks.into_iter().map(Into::into).collect(),
            summary: o.summary,
            app: o.app.unwrap_or_default(),
            targets: o.targets.into_iter().map(Into::into).collect(),
            params: o.spec.to_display().into_iter().collect(),
            paused: o.control.paused,
            promoted_gates: o.control.promoted,
            // Known only to the orchestrator; the control service fills it.
            awaiting_gate: 0,
            aborted_by: o.control.aborted_by.unwrap_or_default(),
        }
    }
}

impl From<domain::AgentRecord> for proto::Agent {
    fn from(a: domain::AgentRecord) -> Self {
        proto::Agent {
            cluster: Some(a.cluster.into()),
            state: proto::AgentState::from(a.state) as i32,
            since_unix_ms: a.since_unix_ms,
            agent_version: a.agent_version,
            task_kinds: a.task_kinds,
        }
    }
}

impl From<domain::Attestation> for proto::Attestation {
    fn from(a: domain::Attestation) -> Self {
        proto::Attestation {
            image: a.image,
            check: a.check,
            value: a.value,
            attested_by: a.attested_by,
            at_unix_ms: a.at_unix_ms,
        }
    }
}

impl From<domain::AuditEvent> for proto::AuditEvent {
    fn from(a: domain::AuditEvent) -> Self {
        proto::AuditEvent {
            sequence: a.sequence,
            at_unix_ms: a.at_unix_ms,
            actor: a.actor,
            action: a.action,
            parameters: a.parameters,
            outcome: a.outcome,
        }
    }
}

impl From<app::Color> for proto::Color {
    fn from(c: app::Color) -> Self {
        match c {
            app::Color::Blue => proto::Color::Blue,
            app::Color::Green => proto::Color::Green,
        }
    }
}

impl From<app::AppClusterStatus> for proto::AppClusterStatus {
    fn from(s: app::AppClusterStatus) -> Self {
        proto::AppClusterStatus {
            active: s.active.map_or(proto::Color::Unspecified, Into::into) as i32,
            colors: s
                .colors
                .into_iter()
                .map(|c| proto::ColorStatus {
                    color: proto::Color::from(c.color) as i32,
                    image: c.image,
                    replicas_ready: c.replicas_ready,
                    replicas_desired: c.replicas_desired,
                    healthy: c.healthy,
                })
                .collect(),
            last_switch_unix_ms: s.last_switch_unix_ms.unwrap_or(0),
            maintenance: s.maintenance,
            canary_weight: s.canary_weight,
        }
    }
}

impl From<app::AppSpec> for proto::App {
    fn from(a: app::AppSpec) -> Self {
        let d = app::LoadProbe::default();
        proto::App {
            name: a.name,
            clusters: a
                .clusters
                .into_iter()
                .map(|c| proto::AppCluster {
                    region: c.region,
                    cluster: c.cluster,
                    driver: match c.driver {
                        app::DriverKind::Local => proto::Driver::Local,
                        app::DriverKind::Kubernetes => proto::Driver::Kubernetes,
                    } as i32,
                    local: c.local.map(|l| proto::LocalDriverSpec {
                        command: l.command,
                        listen: l.listen,
                        preview_listen: l.preview_listen,
                        drain_timeout_ms: l.drain_timeout_ms,
                    }),
                    kubernetes: c.kubernetes.map(|k| proto::KubernetesDriverSpec {
                        namespace: k.namespace,
                        kubeconfig: k.kubeconfig.map(|p| p.display().to_string()).unwrap_or_default(),
                        progress_deadline_secs: k.progress_deadline_secs,
                        container: k.container.unwrap_or_default(),
                        http_route: k.http_route.unwrap_or_default(),
                    }),
                })
                .collect(),
            health: a
                .health
                .into_iter()
                .map(|p| proto::Probe {
                    probe: Some(match p {
                        app::Probe::Http {
                            path,
                            status,
                            body_contains,
                        } => proto::probe::Probe::Http(proto::HttpProbe {
                            path,
                            status: status.into(),
                            body_contains: body_contains.unwrap_or_default(),
                        }),
                        app::Probe::Tcp => proto::probe::Probe::Tcp(proto::TcpProbe {}),
                        app::Probe::Grpc { service } => proto::probe::Probe::Grpc(proto::GrpcProbe { service }),
                    }),
                })
                .collect(),
            load: Some(proto::LoadProbe {
                disabled: !a.load.enabled,
                path: if a.load.path == d.path {
                    String::new()
                } else {
                    a.load.path
                },
                requests: a.load.requests,
                rate_per_sec: a.load.rate_per_sec,
                max_avg_ms: a.load.max_avg_ms,
                max_p95_ms: a.load.max_p95_ms,
                max_p99_ms: a.load.max_p99_ms,
                max_error_rate: Some(a.load.max_error_rate),
                min_rps: Some(a.load.min_rps),
            }),
            scale_down_delay_secs: a.scale_down_delay_secs,
            waves: a.waves.into_iter().map(|regions| proto::Wave { regions }).collect(),
            bake_secs: Some(a.bake_secs),
            required_attestations: a.required_attestations.into_iter().collect(),
            migration_checks: a.migration_checks,
            dr: Some(proto::DrSettings {
                max_data_loss_secs: Some(a.dr.max_data_loss_secs),
                automatic: a.dr.automatic,
                failover_after_secs: Some(a.dr.failover_after_secs),
                cooldown_secs: Some(a.dr.cooldown_secs),
            }),
            analysis: a.analysis.into_iter().map(metric_check_to_proto).collect(),
            strategy: match a.strategy {
                app::TrafficStrategy::BlueGreen => proto::TrafficStrategy::BlueGreen,
                app::TrafficStrategy::Canary => proto::TrafficStrategy::Canary,
            } as i32,
            canary: a.canary.map(|c| proto::CanarySteps {
                weights: c.weights,
                pause_secs: c.pause_secs,
            }),
            unreachable: a.unreachable.map(|u| proto::UnreachablePolicy {
                action: match u.action {
                    app::UnreachableAction::Wait => proto::UnreachableAction::Wait,
                    app::UnreachableAction::Rollback => proto::UnreachableAction::Rollback,
                } as i32,
                after_secs: u.after_secs,
            }),
        }
    }
}

fn metric_check_to_proto(c: analysis::MetricCheck) -> proto::MetricCheck {
    proto::MetricCheck {
        name: c.name,
        provider: match c.provider {
            analysis::MetricProvider::Prometheus => proto::MetricProvider::Prometheus,
            analysis::MetricProvider::RequestSuccessRate => proto::MetricProvider::RequestSuccessRate,
            analysis::MetricProvider::RequestDuration => proto::MetricProvider::RequestDuration,
            analysis::MetricProvider::Webhook => proto::MetricProvider::Webhook,
            analysis::MetricProvider::Job => proto::MetricProvider::Job,
        } as i32,
        query: c.query.unwrap_or_default(),
        percentile: c.percentile,
        metrics_path: c.metrics_path.unwrap_or_default(),
        condition: c.condition.map(|c| c.to_string()).unwrap_or_default(),
        stage: match c.stage {
            analysis::AnalysisStage::Bake => proto::AnalysisStage::Bake,
            analysis::AnalysisStage::Gates => proto::AnalysisStage::Gates,
        } as i32,
        interval_secs: Some(c.interval_secs),
        count: Some(c.count),
        failure_limit: c.failure_limit,
        inconclusive_limit: c.inconclusive_limit,
        url: c.url.unwrap_or_default(),
        command: c.command,
        timeout_secs: c.timeout_secs,
        retries: c.retries,
    }
}

/// A metric check from the API; `field` names it in errors.
fn metric_check_from_proto(c: proto::MetricCheck, field: &str) -> Result<analysis::MetricCheck, Error> {
    let bad = |k: &str, why: String| Error::InvalidArgument(format!("{field}.{k}: {why}"));
    let provider = match proto::MetricProvider::try_from(c.provider) {
        Ok(proto::MetricProvider::Prometheus) => analysis::MetricProvider::Prometheus,
        Ok(proto::MetricProvider::RequestSuccessRate) => analysis::MetricProvider::RequestSuccessRate,
        Ok(proto::MetricProvider::RequestDuration) => analysis::MetricProvider::RequestDuration,
        Ok(proto::MetricProvider::Webhook) => analysis::MetricProvider::Webhook,
        Ok(proto::MetricProvider::Job) => analysis::MetricProvider::Job,
        _ => {
            return Err(bad(
                "provider",
                "unknown provider (expected prometheus, request-success-rate, request-duration, webhook or job)".into(),
            ));
        }
    };
    let stage = match proto::AnalysisStage::try_from(c.stage) {
        Ok(proto::AnalysisStage::Unspecified | proto::AnalysisStage::Bake) => analysis::AnalysisStage::Bake,
        Ok(proto::AnalysisStage::Gates) => analysis::AnalysisStage::Gates,
        Err(_) => return Err(bad("stage", "unknown stage (expected gates or bake)".into())),
    };
    Ok(analysis::MetricCheck {
        name: c.name,
        provider,
        query: (!c.query.is_empty()).then_some(c.query),
        percentile: c.percentile,
        metrics_path: (!c.metrics_path.is_empty()).then_some(c.metrics_path),
        condition: if c.condition.is_empty() {
            None
        } else {
            Some(c.condition.parse().map_err(|e: String| bad("condition", e))?)
        },
        url: (!c.url.is_empty()).then_some(c.url),
        command: c.command,
        timeout_secs: c.timeout_secs,
        retries: c.retries,
        stage,
        interval_secs: c.interval_secs.unwrap_or(10),
        count: c.count.unwrap_or(3),
        failure_limit: c.failure_limit,
        inconclusive_limit: c.inconclusive_limit,
    })
}

/// Converts and validates an app from the API. Unset numbers take their
/// defaults; an unknown driver or probe is refused naming the field.
pub fn app_from_proto(a: proto::App) -> Result<app::AppSpec, Error> {
    let bad = |f: String, why: &str| Error::InvalidArgument(format!("{f}: {why}"));
    let mut clusters = Vec::new();
    for (i, c) in a.clusters.into_iter().enumerate() {
        let driver = match proto::Driver::try_from(c.driver) {
            Ok(proto::Driver::Local) => app::DriverKind::Local,
            Ok(proto::Driver::Kubernetes) => app::DriverKind::Kubernetes,
            _ => {
                return Err(bad(
                    format!("clusters[{i}].driver"),
                    "unknown driver (expected local or kubernetes)",
                ));
            }
        };
        clusters.push(app::AppCluster {
            region: c.region,
            cluster: c.cluster,
            driver,
            local: c.local.map(|l| app::LocalSpec {
                command: l.command,
                listen: l.listen,
                preview_listen: l.preview_listen,
                drain_timeout_ms: if l.drain_timeout_ms == 0 {
                    5000
                } else {
                    l.drain_timeout_ms
                },
            }),
            kubernetes: c.kubernetes.map(|k| app::KubeSpec {
                namespace: k.namespace,
                kubeconfig: (!k.kubeconfig.is_empty()).then(|| k.kubeconfig.into()),
                progress_deadline_secs: if k.progress_deadline_secs == 0 {
                    600
                } else {
                    k.progress_deadline_secs
                },
                container: (!k.container.is_empty()).then_some(k.container),
                http_route: (!k.http_route.is_empty()).then_some(k.http_route),
            }),
        });
    }
    let mut health = Vec::new();
    for (i, p) in a.health.into_iter().enumerate() {
        health.push(match p.probe {
            Some(proto::probe::Probe::Http(h)) => app::Probe::Http {
                path: h.path,
                status: if h.status == 0 {
                    200
                } else {
                    u16::try_from(h.status).map_err(|_| bad(format!("health[{i}].status"), "not an HTTP status"))?
                },
                body_contains: (!h.body_contains.is_empty()).then_some(h.body_contains),
            },
            Some(proto::probe::Probe::Tcp(_)) => app::Probe::Tcp,
            Some(proto::probe::Probe::Grpc(g)) => app::Probe::Grpc { service: g.service },
            None => {
                return Err(bad(
                    format!("health[{i}]"),
                    "unknown probe (expected http, tcp or grpc)",
                ));
            }
        });
    }
    let d = app::LoadProbe::default();
    let load = match a.load {
        None => d,
        Some(l) => {
            let or = |v: f64, dv: f64| if v == 0.0 { dv } else { v };
            app::LoadProbe {
                enabled: !l.disabled,
                path: if l.path.is_empty() { d.path } else { l.path },
                requests: if l.requests == 0 { d.requests } else { l.requests },
                rate_per_sec: if l.rate_per_sec == 0 {
                    d.rate_per_sec
                } else {
                    l.rate_per_sec
                },
                max_avg_ms: or(l.max_avg_ms, d.max_avg_ms),
                max_p95_ms: or(l.max_p95_ms, d.max_p95_ms),
                max_p99_ms: or(l.max_p99_ms, d.max_p99_ms),
                max_error_rate: l.max_error_rate.unwrap_or(d.max_error_rate),
                min_rps: l.min_rps.unwrap_or(d.min_rps),
            }
        }
    };
    let spec = app::AppSpec {
        name: a.name,
        clusters,
        health,
        load,
        scale_down_delay_secs: a.scale_down_delay_secs,
        waves: a.waves.into_iter().map(|w| w.regions).collect(),
        bake_secs: a.bake_secs.unwrap_or(10),
        required_attestations: a.required_attestations.into_iter().collect(),
        migration_checks: a.migration_checks,
        dr: a.dr.map_or_else(crate::dr::DrSettings::default, |d| {
            let def = crate::dr::DrSettings::default();
            crate::dr::DrSettings {
                max_data_loss_secs: d.max_data_loss_secs.unwrap_or(def.max_data_loss_secs),
                automatic: d.automatic,
                failover_after_secs: d.failover_after_secs.unwrap_or(def.failover_after_secs),
                cooldown_secs: d.cooldown_secs.unwrap_or(def.cooldown_secs),
            }
        }),
        analysis: a
            .analysis
            .into_iter()
            .enumerate()
            .map(|(i, c)| metric_check_from_proto(c, &format!("analysis[{i}]")))
            .collect::<Result<_, _>>()?,
        strategy: match proto::TrafficStrategy::try_from(a.strategy) {
            Ok(proto::TrafficStrategy::Unspecified | proto::TrafficStrategy::BlueGreen) => {
                app::TrafficStrategy::BlueGreen
            }
            Ok(proto::TrafficStrategy::Canary) => app::TrafficStrategy::Canary,
            Err(_) => {
                return Err(bad(
                    "strategy".into(),
                    "unknown strategy (expected blue-green or canary)",
                ));
            }
        },
        canary: a.canary.map(|c| app::CanarySteps {
            weights: c.weights,
            pause_secs: c.pause_secs,
        }),
        unreachable: a
            .unreachable
            .map(|u| -> Result<app::UnreachablePolicy, Error> {
                Ok(app::UnreachablePolicy {
                    action: match proto::UnreachableAction::try_from(u.action) {
                        Ok(proto::UnreachableAction::Unspecified | proto::UnreachableAction::Wait) => {
                            app::UnreachableAction::Wait
                        }
                        Ok(proto::UnreachableAction::Rollback) => app::UnreachableAction::Rollback,
                        Err(_) => {
                            return Err(bad(
                                "unreachable.action".into(),
                                "unknown action (expected wait or rollback)",
                            ));
                        }
                    },
                    after_secs: if u.after_secs == 0 {
                        app::UnreachablePolicy::default().after_secs
                    } else {
                        u.after_secs
                    },
                })
            })
            .transpose()?,
    };
    spec.validate()?;
    Ok(spec)
}

impl From<proto::AppClusterStatus> for app::AppClusterStatus {
    fn from(s: proto::AppClusterStatus) -> Self {
        let color = |c: i32| match proto::Color::try_from(c) {
            Ok(proto::Color::Blue) => Some(app::Color::Blue),
            Ok(proto::Color::Green) => Some(app::Color::Green),
            _ => None,
        };
        app::AppClusterStatus {
            active: color(s.active),
            colors: s
                .colors
                .into_iter()
                .filter_map(|c| {
                    Some(app::ColorStatus {
                        color: color(c.color)?,
                        image: c.image,
                        replicas_ready: c.replicas_ready,
                        replicas_desired: c.replicas_desired,
                        healthy: c.healthy,
                    })
                })
                .collect(),
            last_switch_unix_ms: (s.last_switch_unix_ms != 0).then_some(s.last_switch_unix_ms),
            maintenance: s.maintenance,
            canary_weight: s.canary_weight,
        }
    }
}

impl From<crate::release::Release> for proto::Release {
    fn from(r: crate::release::Release) -> Self {
        proto::Release {
            app: r.app,
            image: r.image,
            digest: r.digest,
            files: r
                .files
                .into_iter()
                .map(|f| proto::ReleaseFile {
                    name: f.name,
                    bytes: f.bytes,
                    sha256: f.sha256,
                })
                .collect(),
            newest_version: r.newest_version.unwrap_or(0),
            reversible: r.reversible,
            created_by: r.created_by,
            created_at_unix_ms: r.created_at_unix_ms,
        }
    }
}

impl From<crate::backup::BackupEntry> for proto::Backup {
    fn from(b: crate::backup::BackupEntry) -> Self {
        proto::Backup {
            trigger: b.trigger.as_str().to_owned(),
            id: b.id,
            app: b.app,
            region: b.cluster.region,
            cluster: b.cluster.cluster,
            database: b.database,
            engine: b.engine,
            object_key: b.object.key,
            version_id: b.object.version_id.unwrap_or_default(),
            size_bytes: b.object.size,
            sha256: b.object.sha256,
            key_id: b.object.key_id,
            dump_bytes: b.object.dump_bytes,
            migration_version: b.migration_version,
            table_rows: b.table_rows.into_iter().collect(),
            started_at_unix_ms: b.started_at_unix_ms,
            finished_at_unix_ms: b.finished_at_unix_ms,
            requested_by: b.requested_by,
            operation_id: b.operation_id,
            retain_until_unix_ms: b.object.retain_until_unix_ms.unwrap_or(0),
            validations: b
                .validations
                .into_iter()
                .map(|v| proto::BackupValidation {
                    operation_id: v.operation_id,
                    at_unix_ms: v.at_unix_ms,
                    passed: v.passed,
                    verdict: v.verdict,
                    message: v.message,
                    duration_ms: v.duration_ms,
                })
                .collect(),
        }
    }
}

impl From<crate::dr::DbRole> for proto::DatabaseRole {
    fn from(r: crate::dr::DbRole) -> Self {
        match r {
            crate::dr::DbRole::Primary => proto::DatabaseRole::Primary,
            crate::dr::DbRole::Standby => proto::DatabaseRole::Standby,
        }
    }
}

fn db_role(r: i32) -> Option<crate::dr::DbRole> {
    match proto::DatabaseRole::try_from(r) {
        Ok(proto::DatabaseRole::Primary) => Some(crate::dr::DbRole::Primary),
        Ok(proto::DatabaseRole::Standby) => Some(crate::dr::DbRole::Standby),
        _ => None,
    }
}

impl From<crate::dr::DatabaseStatus> for proto::DatabaseStatus {
    fn from(d: crate::dr::DatabaseStatus) -> Self {
        proto::DatabaseStatus {
            app: d.app,
            driver: d.driver.as_str().into(),
            configured_role: proto::DatabaseRole::from(d.configured_role) as i32,
            role: d.role.map_or(proto::DatabaseRole::Unspecified, Into::into) as i32,
            follows: d.follows.unwrap_or_default(),
            lsn: d.lsn,
            receive_lsn: d.receive_lsn,
            lag_ms: d.lag_ms,
            error: d.error.unwrap_or_default(),
            observed_at_unix_ms: d.observed_at_unix_ms,
            fenced: d.fenced,
            streaming: d.streaming,
            unreachable_since_unix_ms: d.unreachable_since_unix_ms.unwrap_or(0),
            observed_age_ms: d.observed_age_ms,
        }
    }
}

/// A region-health report's regions, refused as a whole when one names no
/// valid region or there are too many; details are bounded.
pub fn region_health_from_proto(r: &[proto::RegionHealth]) -> Result<Vec<crate::dr::RegionHealth>, Error> {
    if r.len() > crate::dr::MAX_REPORTED_REGIONS {
        return Err(Error::InvalidArgument(format!(
            "{} regions, more than {}",
            r.len(),
            crate::dr::MAX_REPORTED_REGIONS
        )));
    }
    r.iter()
        .map(|h| {
            domain::validate_name("region", &h.region)?;
            Ok(crate::dr::RegionHealth {
                region: h.region.clone(),
                healthy: h.healthy,
                detail: (!h.healthy && !h.detail.is_empty()).then(|| bounded(&h.detail, 512)),
            })
        })
        .collect()
}

/// `s`, cut to at most `max` bytes on a character boundary.
fn bounded(s: &str, max: usize) -> String {
    let mut cut = s.len().min(max);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s[..cut].to_owned()
}

/// A database status from an agent's report; refused (naming the field)
/// when it names no valid app, driver or role, so nothing malformed reaches
/// the log.
pub fn database_status_from_proto(d: proto::DatabaseStatus) -> Result<crate::dr::DatabaseStatus, Error> {
    domain::validate_name("app", &d.app)?;
    let driver = match d.driver.as_str() {
        "postgres" => crate::config::DbDriver::Postgres,
        "sqlite" => crate::config::DbDriver::Sqlite,
        other => return Err(Error::InvalidArgument(format!("driver: unknown {other:?}"))),
    };
    let configured_role =
        db_role(d.configured_role).ok_or_else(|| Error::InvalidArgument("configured_role: unset".into()))?;
    let follows = (!d.follows.is_empty()).then_some(d.follows);
    if let Some(f) = &follows {
        let ok = f
            .split_once('/')
            .is_some_and(|(r, c)| domain::ClusterRef::new(r, c).is_ok());
        if !ok {
            return Err(Error::InvalidArgument(format!("follows: {f:?} is not region/cluster")));
        }
    }
    if d.observed_age_ms > crate::dr::MAX_OBSERVED_AGE_MS {
        return Err(Error::InvalidArgument(format!(
            "observed_age_ms: {} is more than {} (an hour)",
            d.observed_age_ms,
            crate::dr::MAX_OBSERVED_AGE_MS
        )));
    }
    // An error message is the agent's own text; bound it like any report.
    let error = bounded(&d.error, 1024);
    Ok(crate::dr::DatabaseStatus {
        app: d.app,
        driver,
        configured_role,
        role: db_role(d.role),
        follows,
        lsn: d.lsn,
        receive_lsn: d.receive_lsn,
        lag_ms: d.lag_ms,
        error: (!error.is_empty()).then_some(error),
        observed_at_unix_ms: d.observed_at_unix_ms,
        fenced: d.fenced,
        streaming: d.streaming,
        unreachable_since_unix_ms: None,
        unreachable_since_term: 0,
        observed_age_ms: d.observed_age_ms,
        session: 0,
    })
}

impl From<crate::dr::DrillReport> for proto::DrillReport {
    fn from(d: crate::dr::DrillReport) -> Self {
        proto::DrillReport {
            operation_id: d.operation_id,
            app: d.app,
            region: d.cluster.region,
            cluster: d.cluster.cluster,
            passed: d.passed,
            verdict: d.verdict,
            message: d.message,
            source: d.source,
            started_at_unix_ms: d.started_at_unix_ms,
            finished_at_unix_ms: d.finished_at_unix_ms,
            rto_ms: d.rto_ms,
            rpo_ms: d.rpo_ms,
            phase_ms: d.phase_ms.into_iter().collect(),
            image: d.image,
            requested_by: d.requested_by,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent's database report: what it may claim is bounded, and a
    /// refused entry says why.
    #[test]
    fn a_database_report_keeps_its_observation_age_and_refuses_an_absurd_one() {
        let report = |observed_age_ms| proto::DatabaseStatus {
            app: "shop".into(),
            driver: "postgres".into(),
            configured_role: proto::DatabaseRole::Standby as i32,
            lag_ms: Some(250),
            observed_age_ms,
            ..Default::default()
        };
        let d = database_status_from_proto(report(1_500)).unwrap();
        assert_eq!((d.observed_age_ms, d.lag_ms), (1_500, Some(250)));
        assert_eq!(proto::DatabaseStatus::from(d).observed_age_ms, 1_500);
        assert!(database_status_from_proto(report(crate::dr::MAX_OBSERVED_AGE_MS)).is_ok());
        let e = database_status_from_proto(report(crate::dr::MAX_OBSERVED_AGE_MS + 1)).unwrap_err();
        assert!(e.to_string().contains("observed_age_ms"), "{e}");
    }
}
