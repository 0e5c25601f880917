//! Drill schedules, driven through the state machine with an injected
//! clock (no sleeping): two weeks of a daily schedule, every decision the
//! leader would propose applied twice (as two leaders would), the agent's
//! results simulated. Each slot drills exactly once, with the release
//! serving in the target; a slot whose target agent is down waits and runs
//! late, not never; the reports are kept, newest last.

mod common;

use cutover_coordinator::orchestrator::{self, Inputs, schedule};
use cutover_coordinator::state::{Command, State};
use cutover_shared::app::{AppClusterStatus, AppSpec, Color, ColorStatus};
use cutover_shared::domain::{OperationKind, TaskResult};
use cutover_shared::dr::DrillSchedule;
use cutover_shared::task::outputs::DrillOutputs;
use cutover_shared::task::{TaskKind, TaskParams};

use common::{DAY, HOUR, JAN_1, audit, cluster};

fn app() -> AppSpec {
    common::app_spec("shop", &["us-east", "eu-west"], 0)
}

fn apply(state: &mut State, cmd: Command) -> Option<String> {
    state.apply(cmd).error
}

fn agent(state: &mut State, region: &str, up: bool, at: i64) {
    let cmd = if up {
        Command::AgentUp {
            cluster: cluster(region),
            agent_version: "test".into(),
            task_kinds: vec![TaskKind::DrDrill.as_str().into()],
            at_unix_ms: at,
            session: at as u64,
            traffic_apps: vec![],
        }
    } else {
        Command::AgentDown {
            cluster: cluster(region),
            at_unix_ms: at,
            session: state.agents[&cluster(region).to_string()].session,
        }
    };
    assert_eq!(apply(state, cmd), None);
}

/// Runs every unfinished drill to its end at `now`, each passing.
fn run_drills(state: &mut State, now: i64) {
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
                assert!(matches!(params, TaskParams::DrDrill { ref image, .. } if image == "shop:v1"));
                let out = DrillOutputs {
                    verdict: "passed".into(),
                    source: "standby".into(),
                    rto_ms: Some(1500),
                    rpo_ms: Some(0),
                    phase_ms: Default::default(),
                };
                let result = TaskResult {
                    task_id: t.spec.task_id.clone(),
                    success: true,
                    message: "ok".into(),
                    outputs: out.to_wire(),
                    replayed: false,
                    finished_at_unix_ms: now,
                };
                let from = t.spec.target.clone();
                assert_eq!(
                    apply(
                        state,
                        Command::TaskFinished {
                            from,
                            result,
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
            if let Some(cmd) = orchestrator::next_command(&op, &Inputs::new(&op, &spec, bundle.as_ref()), now) {
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
fn each_daily_slot_drills_once_with_the_serving_release_and_a_down_target_runs_late() {
    let mut state = State::default();
    apply(
        &mut state,
        Command::PutApp {
            spec: app(),
            audit: audit(JAN_1),
        },
    );
    for region in ["us-east", "eu-west"] {
        agent(&mut state, region, true, JAN_1);
        let status = AppClusterStatus {
            canary_weight: 0,
            active: Some(Color::Blue),
            colors: vec![ColorStatus {
                color: Color::Blue,
                image: "shop:v1".into(),
                replicas_ready: 1,
                replicas_desired: 1,
                healthy: true,
            }],
            last_switch_unix_ms: None,
            maintenance: false,
        };
        assert_eq!(
            apply(
                &mut state,
                Command::AppStatusReported {
                    from: cluster(region),
                    app: "shop".into(),
                    status,
                }
            ),
            None
        );
    }
    let schedule = DrillSchedule {
        app: "shop".into(),
        region: Some("eu-west".into()),
        cron: "0 4 * * *".into(),
        updated_by: "operator/test".into(),
        updated_at_unix_ms: JAN_1,
        last_slot_unix_ms: JAN_1,
    };
    assert_eq!(
        apply(
            &mut state,
            Command::PutDrillSchedule {
                schedule,
                audit: audit(JAN_1)
            }
        ),
        None
    );

    // Day 5: eu-west's agent is down from 03:00 to 07:00 over the 04:00
    // slot.
    let (down, up) = (JAN_1 + 4 * DAY + 3 * HOUR, JAN_1 + 4 * DAY + 7 * HOUR);
    let end = JAN_1 + 14 * DAY;
    let mut now = JAN_1;
    while now < end {
        if now == down {
            agent(&mut state, "eu-west", false, now);
        }
        if now == up {
            agent(&mut state, "eu-west", true, now);
        }
        let commands = schedule::due(&state, now);
        if (down..up).contains(&now) {
            assert!(commands.is_empty(), "a drill proposed into a down agent: {commands:?}");
        }
        for cmd in commands.iter().cloned().chain(commands.iter().cloned()) {
            let _ = apply(&mut state, cmd);
        }
        run_drills(&mut state, now);
        now += HOUR;
    }

    let drills: Vec<_> = state
        .operations
        .values()
        .filter(|o| o.kind == OperationKind::Drill)
        .collect();
    assert_eq!(drills.len(), 14, "one drill per daily slot");
    assert!(drills.iter().all(|o| o.targets == [cluster("eu-west")]));
    assert!(drills.iter().all(|o| o.created_by == schedule::DRILL_ACTOR));
    let reports = &state.drills["shop"];
    assert_eq!(reports.len(), 14);
    assert!(
        reports
            .iter()
            .all(|r| r.passed && r.rto_ms == Some(1500) && r.image == "shop:v1")
    );
    assert!(
        reports
            .windows(2)
            .all(|w| w[0].finished_at_unix_ms < w[1].finished_at_unix_ms)
    );
    // Day 5's drill ran when the agent came back, not at 04:00.
    assert!(
        reports.iter().any(|r| r.finished_at_unix_ms == up),
        "{:?}",
        reports.iter().map(|r| r.finished_at_unix_ms).collect::<Vec<_>>()
    );
    assert_eq!(
        state.drill_schedules["shop"].last_slot_unix_ms,
        JAN_1 + 13 * DAY + 4 * HOUR
    );

    // Removing the schedule keeps the reports; a stale slot is refused.
    assert_eq!(
        apply(
            &mut state,
            Command::DeleteDrillSchedule {
                app: "shop".into(),
                audit: audit(end)
            }
        ),
        None
    );
    assert!(schedule::due(&state, end + 5 * HOUR).is_empty());
    assert_eq!(state.drills["shop"].len(), 14);
}
