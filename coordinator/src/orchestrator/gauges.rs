//! Gauges of the replicated state, for alert rules (deploy/prometheus):
//! which agents are up, how long the oldest running operation of each app
//! and kind has run, how many operations wait at a manual gate, and when
//! each app last rolled back. Every node exports them from its own applied
//! state (the same on every node), labelled by node, so an alert takes the
//! `max` over nodes and a leader change leaves no stale series behind.
//! A series whose subject went away (an operation finished) is set to 0,
//! never left at its last value.

use std::collections::BTreeSet;

use cutover_shared::domain::{AgentState, OperationKind, TaskState};

use super::{Inputs, awaiting_gate, is_compensation};
use crate::state::State;

/// The label sets set last time, per gauge, to zero the ones now absent.
#[derive(Default)]
pub struct Exported {
    running: BTreeSet<(String, String)>,
    gated: BTreeSet<String>,
}

/// Sets the gauges from `s` at `now_ms`.
pub fn export(s: &State, node: &str, now_ms: i64, last: &mut Exported) {
    for a in s.agents.values() {
        let l = [
            ("node", node.to_owned()),
            ("region", a.cluster.region.clone()),
            ("cluster", a.cluster.cluster.clone()),
        ];
        metrics::gauge!("cutover_agent_up", &l).set(if a.state == AgentState::Up { 1.0 } else { 0.0 });
    }

    let mut running = std::collections::BTreeMap::<(String, String), i64>::new();
    let mut gated = std::collections::BTreeMap::<String, u32>::new();
    let mut rollbacks = std::collections::BTreeMap::<String, i64>::new();
    for op in s.operations.values() {
        let Some(app) = op.app.clone() else { continue };
        if !op.state.is_finished() {
            let key = (app.clone(), op.kind.as_str().to_owned());
            let started = running.entry(key).or_insert(op.created_at_unix_ms);
            *started = (*started).min(op.created_at_unix_ms);
            if let Some((spec, bundle)) = s.operation_inputs(op)
                && awaiting_gate(op, &Inputs::new(op, spec, bundle)).is_some()
            {
                *gated.entry(app).or_default() += 1;
            }
        } else if rolled_back(op) {
            let at = rollbacks.entry(app).or_insert(0);
            *at = (*at).max(op.updated_at_unix_ms);
        }
    }
    for key in last.running.iter().filter(|k| !running.contains_key(*k)) {
        metrics::gauge!("cutover_operation_oldest_running_seconds", &running_labels(node, key)).set(0.0);
    }
    for (key, started) in &running {
        let age = (now_ms - started).max(0) as f64 / 1000.0;
        metrics::gauge!("cutover_operation_oldest_running_seconds", &running_labels(node, key)).set(age);
    }
    for app in last.gated.iter().filter(|a| !gated.contains_key(*a)) {
        metrics::gauge!("cutover_operations_awaiting_gate", "node" => node.to_owned(), "app" => app.clone()).set(0.0);
    }
    for (app, n) in &gated {
        metrics::gauge!("cutover_operations_awaiting_gate", "node" => node.to_owned(), "app" => app.clone())
            .set(f64::from(*n));
    }
    for (app, at) in &rollbacks {
        metrics::gauge!("cutover_last_rollback_timestamp_seconds", "node" => node.to_owned(), "app" => app.clone())
            .set(*at as f64 / 1000.0);
    }
    last.running = running.into_keys().collect();
    last.gated = gated.into_keys().collect();
    drills(s, node);
}

/// Per app and region: when its last drill passed, and the RTO and RPO the
/// newest passing one measured. Drill reports are kept, so these series
/// never go stale; an app whose drills stop passing keeps an ageing
/// timestamp, which is what the drill-age alert watches.
fn drills(s: &State, node: &str) {
    for reports in s.drills.values() {
        let mut newest = std::collections::BTreeMap::new();
        for d in reports.iter().filter(|d| d.passed) {
            newest.insert(&d.cluster.region, d);
        }
        for (region, d) in newest {
            let l = [
                ("node", node.to_owned()),
                ("app", d.app.clone()),
                ("region", region.clone()),
            ];
            metrics::gauge!("cutover_dr_drill_last_success_timestamp_seconds", &l)
                .set(d.finished_at_unix_ms as f64 / 1000.0);
            if let Some(rto) = d.rto_ms {
                metrics::gauge!("cutover_dr_drill_rto_seconds", &l).set(rto as f64 / 1000.0);
            }
            if let Some(rpo) = d.rpo_ms {
                metrics::gauge!("cutover_dr_drill_rpo_seconds", &l).set(rpo as f64 / 1000.0);
            }
        }
    }
}

fn running_labels(node: &str, (app, kind): &(String, String)) -> [(&'static str, String); 3] {
    [("node", node.to_owned()), ("app", app.clone()), ("kind", kind.clone())]
}

/// A finished rollback, or a deploy that moved traffic back after a
/// failure (a compensating switch ran).
fn rolled_back(op: &cutover_shared::domain::Operation) -> bool {
    match op.kind {
        OperationKind::Rollback => op.state == TaskState::Succeeded,
        OperationKind::Deploy => op
            .tasks
            .iter()
            .any(|t| t.spec.kind == super::SWITCH && is_compensation(t) && t.state == TaskState::Succeeded),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use cutover_shared::domain::{AgentRecord, ClusterRef, Operation};

    use super::*;

    fn agent(region: &str, state: AgentState) -> AgentRecord {
        AgentRecord {
            cluster: ClusterRef::new(region, &format!("{region}-1")).unwrap(),
            state,
            since_unix_ms: 0,
            agent_version: "test".into(),
            task_kinds: vec![],
            traffic_apps: vec![],
            session: 1,
            since_term: 0,
        }
    }

    fn operation(id: &str, kind: OperationKind, state: TaskState, created: i64, updated: i64) -> Operation {
        Operation {
            id: id.into(),
            kind,
            app: Some("gauges-shop".into()),
            targets: vec![],
            spec: Default::default(),
            state,
            created_by: "operator/test".into(),
            created_at_unix_ms: created,
            updated_at_unix_ms: updated,
            tasks: vec![],
            summary: String::new(),
            control: Default::default(),
            spec_digest: None,
            bundle_digest: None,
        }
    }

    /// The value of the one series of `name` whose line holds every label.
    fn value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .find(|l| labels.iter().all(|want| l.contains(want)))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn agents_running_operations_and_rollbacks_are_exported_and_reset() {
        let handle = cutover_shared::telemetry::metrics_handle();
        let mut s = State::default();
        s.agents
            .insert("us-east/us-east-1".into(), agent("us-east", AgentState::Up));
        s.agents
            .insert("eu-west/eu-west-1".into(), agent("eu-west", AgentState::Down));
        let now = 1_800_000_000_000;
        s.operations.insert(
            "op-run".into(),
            operation("op-run", OperationKind::Deploy, TaskState::Running, now - 100_000, now).into(),
        );
        s.operations.insert(
            "op-rb".into(),
            operation(
                "op-rb",
                OperationKind::Rollback,
                TaskState::Succeeded,
                now - 9_000,
                now - 5_000,
            )
            .into(),
        );
        let mut last = Exported::default();
        export(&s, "gauges-test", now, &mut last);
        let text = handle.render();
        let node = "node=\"gauges-test\"";
        assert_eq!(
            value(&text, "cutover_agent_up", &[node, "region=\"us-east\""]),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value(&text, "cutover_agent_up", &[node, "region=\"eu-west\""]),
            Some(0.0)
        );
        let running = [node, "app=\"gauges-shop\"", "kind=\"deploy\""];
        assert_eq!(
            value(&text, "cutover_operation_oldest_running_seconds", &running),
            Some(100.0)
        );
        assert_eq!(
            value(
                &text,
                "cutover_last_rollback_timestamp_seconds",
                &[node, "app=\"gauges-shop\""]
            ),
            Some((now - 5_000) as f64 / 1000.0)
        );

        // The deploy finishes: its series goes to 0 rather than stay at 100.
        std::sync::Arc::make_mut(s.operations.get_mut("op-run").unwrap()).state = TaskState::Succeeded;
        export(&s, "gauges-test", now + 1_000, &mut last);
        let text = handle.render();
        assert_eq!(
            value(&text, "cutover_operation_oldest_running_seconds", &running),
            Some(0.0)
        );
    }
}
