//! Backup schedules and retention, driven through the state machine with
//! an injected clock (no sleeping): 100 days of a daily schedule, every
//! decision the leader would propose applied in order, the agent's results
//! simulated. What the catalog keeps at the end is exactly what the policy
//! says; each slot ran once; every deletion is audited.

mod common;

use std::collections::BTreeSet;

use cutover_coordinator::orchestrator::{self, Inputs, schedule};
use cutover_coordinator::state::{Command, State};
use cutover_shared::app::AppSpec;
use cutover_shared::backup::{BackupAction, BackupObject, BackupSchedule, BackupTrigger, RetentionPolicy, Validation};
use cutover_shared::domain::{ClusterRef, OperationKind, TaskResult, TaskState};
use cutover_shared::task::{TaskKind, TaskParams, outputs::BackupOutputs};

use common::{DAY, HOUR, JAN_1, audit};

fn cluster() -> ClusterRef {
    common::cluster("us-east")
}

fn app() -> AppSpec {
    common::app_spec("shop", &["us-east"], 0)
}

fn apply(state: &mut State, cmd: Command) -> Option<String> {
    state.apply(cmd).error
}

/// What the agent would answer to `params` at `now`.
fn agent_result(task_id: &str, params: &TaskParams, now: i64) -> TaskResult {
    let TaskParams::DbBackup(p) = params else {
        panic!("not a backup task: {params:?}")
    };
    let out = match p.action {
        BackupAction::Create => BackupOutputs {
            object: Some(BackupObject {
                key: format!("us-east/main/shop/{}.cbk", p.backup_id),
                version_id: Some(format!("v-{now}")),
                size: 100,
                sha256: "ab".repeat(32),
                parts: 1,
                key_id: "k1".into(),
                dump_bytes: 300,
                retain_until_unix_ms: None,
            }),
            database: Some("shop".into()),
            engine: Some("PostgreSQL 16.4".into()),
            migration_version: Some(0),
            table_rows: Some(Default::default()),
            started_at_unix_ms: Some(now),
            duration_ms: Some(1),
            ..Default::default()
        },
        BackupAction::Delete => BackupOutputs {
            deleted: Some(p.delete.keys().cloned().collect()),
            kept: Some(Default::default()),
            ..Default::default()
        },
        BackupAction::Validate => BackupOutputs {
            verdict: Some("passed".into()),
            duration_ms: Some(1),
            ..Default::default()
        },
        other => panic!("unexpected {other:?}"),
    };
    TaskResult {
        task_id: task_id.into(),
        success: true,
        message: "ok".into(),
        outputs: out.to_wire(),
        replayed: false,
        finished_at_unix_ms: now,
    }
}

/// Runs every unfinished operation to its end at `now`: the leader's
/// next steps, the agent's results.
fn run_operations(state: &mut State, now: i64) {
    loop {
        let mut progressed = false;
        let ids: Vec<String> = state
            .operations
            .values()
            .filter(|o| !o.state.is_finished())
            .map(|o| o.id.clone())
            .collect();
        for id in ids {
            let op = state.operations[&id].clone();
            for t in op.tasks.iter().filter(|t| !t.state.is_finished()) {
                let params = TaskParams::from_wire(&t.spec.kind, &t.spec.params).unwrap();
                let r = agent_result(&t.spec.task_id, &params, now);
                assert_eq!(
                    apply(
                        state,
                        Command::TaskFinished {
                            from: cluster(),
                            result: r,
                            at_unix_ms: now
                        }
                    ),
                    None
                );
                progressed = true;
            }
            let op = state.operations[&id].clone();
            let (spec, bundle) = state
                .operation_inputs(&op)
                .map(|(s, b)| (s.clone(), b.cloned()))
                .unwrap();
            let inputs = Inputs::new(&op, &spec, bundle.as_ref());
            if let Some(cmd) = orchestrator::next_command(&op, &inputs, now) {
                assert_eq!(apply(state, cmd), None);
                progressed = true;
            }
        }
        if !progressed {
            return;
        }
    }
}

#[test]
fn a_hundred_days_of_daily_backups_keep_exactly_what_the_policy_says() {
    let mut state = State::default();
    apply(
        &mut state,
        Command::PutApp {
            spec: app(),
            audit: audit(JAN_1),
        },
    );
    apply(
        &mut state,
        Command::AgentUp {
            cluster: cluster(),
            agent_version: "test".into(),
            task_kinds: vec![TaskKind::DbBackup.as_str().into()],
            at_unix_ms: JAN_1,
            session: 1,
            traffic_apps: vec![],
        },
    );
    let policy = RetentionPolicy::parse("daily=7,weekly=4,monthly=3").unwrap();
    assert_eq!(
        apply(
            &mut state,
            Command::PutBackupSchedule {
                schedule: BackupSchedule {
                    app: "shop".into(),
                    region: None,
                    cron: "0 3 * * *".into(),
                    retention: policy,
                    validate: false,
                    updated_by: "operator/test".into(),
                    updated_at_unix_ms: JAN_1,
                    last_slot_unix_ms: JAN_1,
                },
                audit: audit(JAN_1),
            }
        ),
        None
    );
    // 2026-04-10 (day 100) 04:00, hour by hour.
    let end = JAN_1 + 99 * DAY + 4 * HOUR;
    let mut now = JAN_1;
    while now <= end {
        let commands = schedule::due(&state, now);
        // A leader that proposes its decision twice (it lost an answer,
        // or a new leader decided the same): the second changes nothing.
        for cmd in commands.iter().cloned().chain(commands.iter().cloned()) {
            let _ = apply(&mut state, cmd);
        }
        run_operations(&mut state, now);
        if now == JAN_1 + 14 * DAY + 4 * HOUR {
            // Jan 15's backup passed a validation: kept whatever the policy.
            let b = state
                .backups
                .values_mut()
                .find(|b| b.finished_at_unix_ms == JAN_1 + 14 * DAY + 3 * HOUR)
                .expect("Jan 15's backup");
            b.validations.push(Validation {
                operation_id: "op-v".into(),
                at_unix_ms: now,
                passed: true,
                verdict: "passed".into(),
                message: String::new(),
                duration_ms: 1,
            });
        }
        now += HOUR;
    }

    // Exactly one backup per daily slot, each from its own operation.
    let creates: Vec<i64> = state
        .operations
        .values()
        .filter(|o| o.kind == OperationKind::Backup)
        .filter_map(|o| match &o.spec.backup.as_ref()?.trigger {
            BackupTrigger::Schedule { slot_unix_ms } => Some(*slot_unix_ms),
            _ => None,
        })
        .collect();
    assert_eq!(creates.len(), 100, "one operation per slot");
    assert_eq!(creates.iter().collect::<BTreeSet<_>>().len(), 100, "no slot twice");
    assert!(
        state.operations.values().all(|o| o.state == TaskState::Succeeded),
        "every operation ended"
    );

    // Kept: the last 7 days (Apr 4-10); the newest of the last 4 ISO
    // weeks (Apr 10, Apr 5, Mar 29, Mar 22); of the last 3 months (Apr 10,
    // Mar 31, Feb 28); and Jan 15, the newest validated.
    let day_of = |month_start: i64, d: i64| month_start + (d - 1) * DAY + 3 * HOUR;
    let (feb, mar, apr) = (JAN_1 + 31 * DAY, JAN_1 + 59 * DAY, JAN_1 + 90 * DAY);
    let mut want: BTreeSet<i64> = (4..=10).map(|d| day_of(apr, d)).collect();
    want.extend([
        day_of(mar, 29),
        day_of(mar, 22),
        day_of(mar, 31),
        day_of(feb, 28),
        day_of(JAN_1, 15),
    ]);
    let kept: BTreeSet<i64> = state.backups.values().map(|b| b.finished_at_unix_ms).collect();
    let show = |s: &BTreeSet<i64>| s.iter().map(|t| (t - JAN_1) / DAY + 1).collect::<Vec<_>>();
    assert_eq!(show(&kept), show(&want), "days (1 = Jan 1) kept");

    // Each of the 88 deletions is audited, by the retention actor.
    let deletions: Vec<_> = state
        .audit
        .iter()
        .filter(|e| e.action == "DeleteBackup" && e.outcome == "deleted")
        .collect();
    assert_eq!(deletions.len(), 100 - want.len());
    assert!(deletions.iter().all(|e| e.actor == schedule::RETENTION_ACTOR));
}

#[test]
fn a_slot_waits_while_the_app_is_busy_and_then_runs_once() {
    let mut state = State::default();
    apply(
        &mut state,
        Command::PutApp {
            spec: app(),
            audit: audit(JAN_1),
        },
    );
    apply(
        &mut state,
        Command::PutBackupSchedule {
            schedule: BackupSchedule {
                app: "shop".into(),
                region: None,
                cron: "0 3 * * *".into(),
                retention: RetentionPolicy::default(),
                validate: true,
                updated_by: "operator/test".into(),
                updated_at_unix_ms: JAN_1,
                last_slot_unix_ms: JAN_1,
            },
            audit: audit(JAN_1),
        },
    );
    // A deploy runs over the slot.
    let deploy = cutover_shared::domain::Operation {
        id: "op-deploy".into(),
        kind: OperationKind::Deploy,
        app: Some("shop".into()),
        targets: vec![cluster()],
        spec: Default::default(),
        state: TaskState::Running,
        created_by: "operator/test".into(),
        created_at_unix_ms: JAN_1,
        updated_at_unix_ms: JAN_1,
        tasks: vec![],
        summary: String::new(),
        control: Default::default(),
        spec_digest: None,
        bundle_digest: None,
    };
    apply(
        &mut state,
        Command::CreateOperation {
            operation: deploy,
            audit: audit(JAN_1),
            fix_inputs: true,
        },
    );
    let slot = JAN_1 + 3 * HOUR;
    assert!(
        schedule::due(&state, slot + 1).is_empty(),
        "the slot waits for the deploy"
    );
    apply(
        &mut state,
        Command::FinishOperation {
            operation_id: "op-deploy".into(),
            state: TaskState::Succeeded,
            summary: String::new(),
            at_unix_ms: slot + 5,
        },
    );
    let due = schedule::due(&state, slot + 10);
    assert_eq!(due.len(), 1, "{due:?}");
    let Command::StartScheduledBackup { slot_unix_ms, .. } = &due[0] else {
        panic!("{due:?}")
    };
    assert_eq!(*slot_unix_ms, slot, "late, not missed");
    assert_eq!(apply(&mut state, due[0].clone()), None);
    let again = apply(&mut state, due[0].clone());
    assert!(again.is_some(), "the same slot applied twice");
    assert_eq!(state.backup_schedules["shop"].last_slot_unix_ms, slot);
    // With --validate the plan validates each new backup after taking it.
    run_operations(&mut state, slot + 20);
    let op = state
        .operations
        .values()
        .find(|o| o.kind == OperationKind::Backup)
        .unwrap();
    let kinds: Vec<String> = op
        .tasks
        .iter()
        .map(|t| match TaskParams::from_wire(&t.spec.kind, &t.spec.params).unwrap() {
            TaskParams::DbBackup(p) => p.action.as_str().to_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(kinds, ["create", "validate"]);
}
