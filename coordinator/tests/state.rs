//! Table tests of `State::apply` alone: agent registrations racing the
//! reaper, and retention.

use cutover_coordinator::state::{AuditDraft, Command, State};
use cutover_shared::config::RetentionConfig;
use cutover_shared::domain::{AgentState, Attestation, ClusterRef, Operation, OperationKind, TaskState};
use cutover_shared::operation::OperationSpec;
use cutover_shared::release::{Bundle, Release};

fn cluster() -> ClusterRef {
    ClusterRef::new("us-east", "us-east-1").unwrap()
}

fn up(session: u64) -> Command {
    Command::AgentUp {
        cluster: cluster(),
        agent_version: "1".into(),
        task_kinds: vec!["noop".into()],
        at_unix_ms: 1,
        session,
        traffic_apps: vec![],
    }
}

fn down(session: u64) -> Command {
    Command::AgentDown {
        cluster: cluster(),
        at_unix_ms: 2,
        session,
    }
}

fn state_of(s: &State) -> AgentState {
    s.agents["us-east/us-east-1"].state
}

/// Problem 8: the reaper judged the old stream dead and proposed its down;
/// the agent reconnected and its `AgentUp` committed first. The stale down
/// must not mark the connected agent down (it used to, and deploys were then
/// refused with "agent not up" until the agent reconnected again).
#[test]
fn a_stale_agent_down_does_not_mark_a_reconnected_agent_down() {
    let mut s = State::default();
    s.apply(up(11));
    s.apply(up(22));
    s.apply(down(11));
    assert_eq!(
        state_of(&s),
        AgentState::Up,
        "a down for an old registration changed nothing"
    );
    s.apply(down(22));
    assert_eq!(
        state_of(&s),
        AgentState::Down,
        "a down for the current registration applies"
    );
    // Entries from logs written before sessions (0) apply as they did.
    s.apply(up(0));
    s.apply(down(0));
    assert_eq!(state_of(&s), AgentState::Down);
}

fn audit(at: i64) -> AuditDraft {
    AuditDraft {
        at_unix_ms: at,
        actor: "operator/test".into(),
        action: "Test".into(),
        parameters: "{}".into(),
        outcome: "ok".into(),
    }
}

fn finished(id: &str, kind: OperationKind, app: Option<&str>, at: i64) -> Command {
    Command::CreateOperation {
        operation: Operation {
            id: id.into(),
            kind,
            app: app.map(String::from),
            targets: vec![cluster()],
            spec: Default::default(),
            state: TaskState::Succeeded,
            created_by: "operator/test".into(),
            created_at_unix_ms: at,
            updated_at_unix_ms: at,
            tasks: vec![],
            summary: String::new(),
            control: Default::default(),
            spec_digest: None,
            bundle_digest: None,
        },
        audit: audit(at),
        fix_inputs: false,
    }
}

#[test]
fn compaction_keeps_the_newest_and_each_apps_last_traffic_move_and_moves_audit_out() {
    let mut s = State::default();
    let day = 86_400_000i64;
    // An app's last cutover, long ago, then 10 recent ad-hoc operations.
    s.apps.insert(
        "shop".into(),
        serde_json::from_str(r#"{"name":"shop","clusters":[]}"#).unwrap(),
    );
    assert_eq!(
        s.apply(finished("op-deploy", OperationKind::Deploy, Some("shop"), 1))
            .error,
        None
    );
    for i in 0..10 {
        s.apply(finished(
            &format!("op-{i:02}"),
            OperationKind::Task,
            None,
            100 * day + i,
        ));
    }
    let policy = RetentionConfig {
        operations: 3,
        operation_max_age_hours: 24 * 30,
        audit_events: 4,
        audit_max_age_hours: 24 * 30,
        releases: 100,
    };
    let now = 100 * day + 100;
    assert!(s.needs_compaction(&policy, now));
    s.apply(Command::Compact {
        retention: policy.clone(),
        at_unix_ms: now,
    });
    let kept: Vec<&String> = s.operations.keys().collect();
    assert_eq!(
        kept,
        ["op-07", "op-08", "op-09", "op-deploy"],
        "newest 3, and shop's last deploy"
    );
    // Audit: the newest 4 stay, the 7 older ones are handed to the node.
    assert_eq!(s.audit.iter().map(|e| e.sequence).collect::<Vec<_>>(), [8, 9, 10, 11]);
    let pruned = s.take_pruned_audit();
    assert_eq!(
        pruned.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );
    assert!(s.take_pruned_audit().is_empty());
    assert!(!s.needs_compaction(&policy, now));
    // Numbering continues after compaction, even from an empty list.
    s.apply(Command::Compact {
        retention: RetentionConfig {
            audit_events: 0,
            ..policy.clone()
        },
        at_unix_ms: now,
    });
    assert!(s.audit.is_empty());
    s.apply(Command::Audit(audit(now)));
    assert_eq!(s.audit[0].sequence, 12);
    // Age: 31 days later only the app's last traffic move is left.
    s.apply(Command::Compact {
        retention: policy,
        at_unix_ms: now + 31 * day,
    });
    assert_eq!(s.operations.keys().collect::<Vec<_>>(), ["op-deploy"]);
}

/// A busy cluster appends an audit event per write; the leader compacts
/// ahead of its minute once the state holds retention's events plus
/// `AUDIT_SLACK` (or twice retention's, if more), so a snapshot never
/// carries a minute of a busy cluster's audit.
#[test]
fn an_audit_backlog_past_the_slack_asks_for_compaction_at_once() {
    use cutover_coordinator::state::AUDIT_SLACK;
    let mut s = State::default();
    let policy = RetentionConfig {
        audit_events: 4,
        ..RetentionConfig::default()
    };
    for _ in 0..4 + AUDIT_SLACK - 1 {
        s.apply(Command::Audit(audit(1)));
    }
    assert!(!s.audit_backlog(&policy));
    s.apply(Command::Audit(audit(1)));
    assert!(s.audit_backlog(&policy));
    s.apply(Command::Compact {
        retention: policy.clone(),
        at_unix_ms: 2,
    });
    assert_eq!(s.audit.len(), 4);
    assert!(!s.audit_backlog(&policy));
    // Retention larger than the slack: up to twice it.
    let big = RetentionConfig {
        audit_events: AUDIT_SLACK + 1,
        ..policy
    };
    let mut s = State::default();
    for _ in 0..2 * (AUDIT_SLACK + 1) - 1 {
        s.apply(Command::Audit(audit(1)));
    }
    assert!(!s.audit_backlog(&big));
    s.apply(Command::Audit(audit(1)));
    assert!(s.audit_backlog(&big));
}

/// Releases (and their 1 MiB bundles) and attestations are bounded too: an
/// app keeps its newest releases, plus any a kept operation acts with or a
/// cluster runs; bundles and attestations go with the last release that
/// needs them.
#[test]
fn compaction_keeps_the_newest_releases_and_those_in_use() {
    let mut s = State::default();
    let day = 86_400_000i64;
    s.apply(Command::PutApp {
        spec: serde_json::from_str(r#"{"name":"shop","clusters":[]}"#).unwrap(),
        audit: audit(1),
    });
    for v in 1..=6i64 {
        let sql = format!("create table t{v} (x int);");
        let bundle = Bundle::parse(vec![(format!("{v}_t.up.sql"), sql.into_bytes())]).unwrap();
        let image = format!("shop:v{v}");
        let release = Release::new("shop", &image, &bundle, "operator/test", v * day);
        let r = s.apply(Command::CreateRelease {
            release,
            bundle,
            audit: audit(v * day),
        });
        assert_eq!(r.error, None);
        s.apply(Command::Attest {
            attestations: vec![Attestation {
                image: image.clone(),
                check: "tests".into(),
                value: "passed".into(),
                attested_by: "ci/test".into(),
                at_unix_ms: v * day,
            }],
            audit: audit(v * day),
        });
    }
    // v1 is what a kept deploy acted with.
    let mut deploy = finished("op-deploy", OperationKind::Deploy, Some("shop"), 1);
    if let Command::CreateOperation { operation, .. } = &mut deploy {
        operation.spec = OperationSpec {
            image: Some("shop:v1".into()),
            ..OperationSpec::default()
        };
    }
    s.apply(deploy);
    assert_eq!(s.bundles.len(), 6);

    let policy = RetentionConfig {
        releases: 2,
        ..RetentionConfig::default()
    };
    let now = 100 * day;
    assert!(s.needs_compaction(&policy, now), "6 releases exceed 2");
    s.apply(Command::Compact {
        retention: policy.clone(),
        at_unix_ms: now,
    });
    let kept: Vec<&String> = s.releases["shop"].keys().collect();
    assert_eq!(kept, ["shop:v1", "shop:v5", "shop:v6"], "newest 2, and the one in use");
    assert_eq!(s.bundles.len(), 3, "one bundle per kept release");
    let attested: Vec<&String> = s.attestations.keys().collect();
    assert_eq!(attested, ["shop:v1", "shop:v5", "shop:v6"]);
    assert!(!s.needs_compaction(&policy, now), "nothing left to compact");
}

fn with_state(cmd: Command, state: TaskState, tasks: Vec<cutover_shared::domain::TaskRecord>) -> Command {
    let Command::CreateOperation {
        mut operation,
        audit,
        fix_inputs,
    } = cmd
    else {
        unreachable!("finished() builds a CreateOperation")
    };
    operation.state = state;
    operation.tasks = tasks;
    Command::CreateOperation {
        operation,
        audit,
        fix_inputs,
    }
}

fn running_ids(s: &State) -> Vec<String> {
    s.running_operations().map(|o| o.id.clone()).collect()
}

/// The orchestrator and the hub look only at running operations, through
/// an index the state keeps beside them: it must hold every unfinished
/// operation whichever way operations finish (the orchestrator's
/// `FinishOperation`, an ad-hoc task's last result, compaction), and a
/// state decoded from a snapshot, which has no index, must still list them.
#[test]
fn running_operations_follow_every_way_an_operation_finishes() {
    let mut s = State::default();
    let task = cutover_shared::domain::TaskRecord {
        spec: cutover_shared::domain::TaskSpec {
            task_id: "t-1".into(),
            operation_id: "op-task".into(),
            kind: "noop".into(),
            params: Default::default(),
            target: cluster(),
        },
        created_at_unix_ms: 1,
        state: TaskState::Pending,
        progress: vec![],
        result: None,
        dispatch_count: 0,
    };
    s.apply(with_state(
        finished("op-deploy", OperationKind::Deploy, None, 1),
        TaskState::Running,
        vec![],
    ));
    s.apply(with_state(
        finished("op-task", OperationKind::Task, None, 2),
        TaskState::Pending,
        vec![task],
    ));
    s.apply(finished("op-done", OperationKind::Task, None, 3));
    assert_eq!(running_ids(&s), ["op-deploy", "op-task"]);

    // A snapshot's state has no index: the scan stands in, and the first
    // command applied builds it.
    let mut decoded: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(decoded, s, "the index is derived, not part of the state's data");
    assert_eq!(running_ids(&decoded), ["op-deploy", "op-task"]);
    decoded.apply(with_state(
        finished("op-later", OperationKind::Deploy, None, 4),
        TaskState::Running,
        vec![],
    ));
    assert_eq!(running_ids(&decoded), ["op-deploy", "op-later", "op-task"]);

    s.apply(Command::FinishOperation {
        operation_id: "op-deploy".into(),
        state: TaskState::Succeeded,
        summary: "done".into(),
        at_unix_ms: 5,
    });
    assert_eq!(running_ids(&s), ["op-task"]);
    assert_eq!(
        s.apply(Command::TaskFinished {
            from: cluster(),
            result: cutover_shared::domain::TaskResult::finished("t-1", true, "ok".into(), Default::default()),
            at_unix_ms: 6,
        })
        .error,
        None
    );
    assert_eq!(s.operations["op-task"].state, TaskState::Succeeded);
    assert!(running_ids(&s).is_empty(), "an ad-hoc task's last result ends it");
    assert_eq!(s.running_operation("shop", &cluster()), None);
}

/// A report forwarded from the follower holding the agent's session is
/// re-dated on the leader's clock: an agent's registration and down are
/// the times the leader compares with its own. Other commands keep theirs.
#[test]
fn a_forwarded_agent_report_is_dated_by_the_leader() {
    let mut c = up(7);
    c.stamp_arrival(1_000);
    assert!(matches!(c, Command::AgentUp { at_unix_ms: 1_000, .. }), "{c:?}");
    let mut c = down(7);
    c.stamp_arrival(2_000);
    assert!(matches!(c, Command::AgentDown { at_unix_ms: 2_000, .. }), "{c:?}");
    let mut c = Command::Compact {
        retention: RetentionConfig::default(),
        at_unix_ms: 5,
    };
    c.stamp_arrival(3_000);
    assert!(matches!(c, Command::Compact { at_unix_ms: 5, .. }), "{c:?}");
}
