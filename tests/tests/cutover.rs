//! Multi-region cutovers through real coordinators and agents with the local
//! driver: waves with a bake between them, atomic cutovers, automatic
//! rollback of every region already switched, attestations, and wave plans
//! refused before anything starts.

use std::time::Duration;

use cutover_shared::app::{AppSpec, LoadProbe};
use cutover_shared::domain::TaskState;
use cutover_shared::proto as pb;
use cutover_tests::{TestCluster, sample_app_spec, serving};

const T: Duration = Duration::from_secs(90);
const REGIONS: &[(&str, &str)] = &[
    ("us-east", "us-east-1"),
    ("eu-west", "eu-west-1"),
    ("ap-south", "ap-south-1"),
];

fn app() -> AppSpec {
    AppSpec {
        load: LoadProbe {
            requests: 40,
            rate_per_sec: 100,
            min_rps: 20.0,
            ..LoadProbe::default()
        },
        waves: vec![vec!["us-east".into()], vec!["eu-west".into(), "ap-south".into()]],
        required_attestations: [("tests".to_string(), "passed".to_string())].into(),
        ..sample_app_spec("shop", REGIONS)
    }
}

async fn setup() -> (TestCluster, usize, AppSpec) {
    let mut c = TestCluster::builder().nodes(3).regions(REGIONS).start().await.unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    c.start_agents(leader, T).await.unwrap();
    let spec = app();
    let mut op = c.operator(leader);
    op.apply_app(pb::ApplyAppRequest {
        app: Some(spec.clone().into()),
    })
    .await
    .unwrap();
    for image in [
        "sample:v1",
        "sample:v2",
        "sample:v3",
        "sample:v4-unhealthy-in-eu-west",
        "sample:v5-unhealthy-in-ap-south",
    ] {
        op.create_attestation(pb::CreateAttestationRequest {
            image: image.into(),
            checks: [("tests".to_string(), "passed".to_string())].into(),
        })
        .await
        .unwrap();
    }
    (c, leader, spec)
}

async fn deploy(
    c: &TestCluster,
    leader: usize,
    image: &str,
    strategy: pb::Strategy,
) -> cutover_shared::domain::Operation {
    let req = pb::DeployRequest {
        app: "shop".into(),
        image: image.into(),
        strategy: strategy as i32,
        ..Default::default()
    };
    c.deploy_and_wait(leader, req, T).await.unwrap()
}

fn steps(op: &cutover_shared::domain::Operation) -> Vec<String> {
    op.tasks
        .iter()
        .map(|t| format!("{} {} {:?}", t.spec.kind, t.spec.target.region, t.state))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waves_then_atomic_then_a_wave_two_failure_rolls_back_wave_one() {
    let (c, leader, spec) = setup().await;
    let addrs: Vec<String> = spec
        .clusters
        .iter()
        .map(|c| c.local.as_ref().unwrap().listen.clone())
        .collect();

    let op = deploy(&c, leader, "sample:v1", pb::Strategy::Waves).await;
    assert_eq!(op.state, TaskState::Succeeded, "{:?} {}", steps(&op), op.summary);
    let op = deploy(&c, leader, "sample:v2", pb::Strategy::Waves).await;
    assert_eq!(op.state, TaskState::Succeeded, "{:?} {}", steps(&op), op.summary);
    // Wave 1 (us-east) is switched and baked before wave 2 starts.
    let kinds: Vec<String> = op
        .tasks
        .iter()
        .map(|t| format!("{} {}", t.spec.kind, t.spec.target.region))
        .collect();
    assert_eq!(
        kinds,
        [
            "app.deploy us-east",
            "app.gates us-east",
            "app.switch us-east",
            "app.bake us-east",
            "app.deploy eu-west",
            "app.gates eu-west",
            "app.deploy ap-south",
            "app.gates ap-south",
            "app.switch eu-west",
            "app.switch ap-south",
            "app.bake eu-west",
            "app.bake ap-south",
        ]
    );
    for a in &addrs {
        assert_eq!(serving(a).await, "version sample:v2");
    }

    // Atomic: every region prepares, then all switch.
    let op = deploy(&c, leader, "sample:v3", pb::Strategy::Atomic).await;
    assert_eq!(op.state, TaskState::Succeeded, "{:?} {}", steps(&op), op.summary);
    let first_switch = op.tasks.iter().position(|t| t.spec.kind == "app.switch").unwrap();
    assert!(
        op.tasks[..first_switch]
            .iter()
            .filter(|t| t.spec.kind == "app.gates")
            .count()
            == 3
    );
    for a in &addrs {
        assert_eq!(serving(a).await, "version sample:v3");
    }

    // v4 fails its gates in eu-west (wave 2): us-east, already switched, is
    // switched back; nothing moved in wave 2.
    let op = deploy(&c, leader, "sample:v4-unhealthy-in-eu-west", pb::Strategy::Waves).await;
    assert_eq!(op.state, TaskState::Failed, "{:?}", steps(&op));
    assert!(op.summary.contains("app.gates in eu-west"), "{}", op.summary);
    assert!(op.summary.contains("us-east/us-east-1 switched back"), "{}", op.summary);
    for a in &addrs {
        assert_eq!(serving(a).await, "version sample:v3", "every region back on v3");
    }

    // Atomic: a region failing its gates moves no traffic anywhere.
    let op = deploy(&c, leader, "sample:v5-unhealthy-in-ap-south", pb::Strategy::Atomic).await;
    assert_eq!(op.state, TaskState::Failed, "{:?}", steps(&op));
    assert!(op.tasks.iter().all(|t| t.spec.kind != "app.switch"), "{:?}", steps(&op));
    for a in &addrs {
        assert_eq!(serving(a).await, "version sample:v3");
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_cutovers_are_refused_before_anything_starts() {
    let (c, leader, _) = setup().await;
    let mut op = c.operator(leader);
    let req = |image: &str, waves: &[&[&str]]| pb::DeployRequest {
        app: "shop".into(),
        image: image.into(),
        region: String::new(),
        no_switch: false,
        waves: waves
            .iter()
            .map(|w| pb::Wave {
                regions: w.iter().map(|r| r.to_string()).collect(),
            })
            .collect(),
        strategy: 0,
        ..Default::default()
    };
    let cases: Vec<(pb::DeployRequest, tonic::Code, &str)> = vec![
        (req("sample:v9", &[]), tonic::Code::FailedPrecondition, "tests=passed"),
        (
            req("sample:v1", &[&["us-east"], &["mars"]]),
            tonic::Code::InvalidArgument,
            "unknown region \"mars\"",
        ),
        (
            req("sample:v1", &[&["us-east", "eu-west"], &["eu-west", "ap-south"]]),
            tonic::Code::InvalidArgument,
            "listed twice",
        ),
        (
            req("sample:v1", &[&["us-east"], &["eu-west"]]),
            tonic::Code::InvalidArgument,
            "leaves out region(s) ap-south",
        ),
    ];
    for (r, code, says) in cases {
        let e = op.deploy(r).await.unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(e.message().contains(says), "{:?} does not say {says:?}", e.message());
    }
    let mut unknown = req("sample:v1", &[]);
    unknown.app = "nope".into();
    assert_eq!(op.deploy(unknown).await.unwrap_err().code(), tonic::Code::NotFound);
    assert!(
        c.node(leader).consensus().read(|s| s.operations.is_empty()),
        "nothing started"
    );
    c.shutdown().await;
}

/// The operation as the API shows it (with the gate it waits at).
async fn get_op(c: &TestCluster, leader: usize, id: &str) -> pb::Operation {
    c.api_operation(leader, id).await.unwrap()
}

async fn wait_gate(c: &TestCluster, leader: usize, id: &str, gate: u32) -> pb::Operation {
    c.wait_gate(leader, id, gate, T).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manual_promotion_pause_resume_and_abort() {
    let (c, leader, spec) = setup().await;
    let addrs: Vec<String> = spec
        .clusters
        .iter()
        .map(|c| c.local.as_ref().unwrap().listen.clone())
        .collect();
    let op = deploy(&c, leader, "sample:v1", pb::Strategy::Waves).await;
    assert_eq!(op.state, TaskState::Succeeded, "{}", op.summary);
    let mut o = c.operator(leader);
    let start = |image: &str| pb::DeployRequest {
        app: "shop".into(),
        image: image.into(),
        manual_promotion: true,
        ..Default::default()
    };

    // v2 waits at gate 1, before any traffic moves.
    let id = o.deploy(start("sample:v2")).await.unwrap().into_inner().operation_id;
    let op = wait_gate(&c, leader, &id, 1).await;
    assert!(op.tasks.iter().all(|t| t.task.as_ref().unwrap().kind != "app.switch"));
    for a in &addrs {
        assert_eq!(serving(a).await, "version sample:v1");
    }
    // Promoting passes the gate it waits at; wave 1 switches and bakes.
    let r = o
        .promote_operation(pb::PromoteOperationRequest {
            operation_id: id.clone(),
            gate: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.operation.unwrap().promoted_gates, [1]);
    wait_gate(&c, leader, &id, 2).await;
    assert_eq!(serving(&addrs[0]).await, "version sample:v2");
    assert_eq!(serving(&addrs[1]).await, "version sample:v1");

    // Paused, a promotion is recorded but nothing starts.
    o.pause_operation(pb::PauseOperationRequest {
        operation_id: id.clone(),
    })
    .await
    .unwrap();
    let r = o
        .promote_operation(pb::PromoteOperationRequest {
            operation_id: id.clone(),
            gate: 2,
        })
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    assert!(r.paused);
    let tasks = r.tasks.len();
    // Watch for a second: a paused operation must not start a step.
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    while tokio::time::Instant::now() < until {
        let op = get_op(&c, leader, &id).await;
        assert_eq!(op.tasks.len(), tasks, "a step started while paused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        o.pause_operation(pb::PauseOperationRequest {
            operation_id: id.clone()
        })
        .await
        .unwrap_err()
        .code(),
        tonic::Code::FailedPrecondition
    );
    o.resume_operation(pb::ResumeOperationRequest {
        operation_id: id.clone(),
    })
    .await
    .unwrap();
    c.wait_state(leader, T, "v2 to finish", |s| s.operations[&id].state.is_finished())
        .await
        .unwrap();
    assert_eq!(get_op(&c, leader, &id).await.state, pb::TaskState::Succeeded as i32);
    for a in &addrs {
        assert_eq!(serving(a).await, "version sample:v2");
    }

    // Steering a finished operation, or one without gates, is refused.
    let e = o
        .promote_operation(pb::PromoteOperationRequest {
            operation_id: id.clone(),
            gate: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("already finished"), "{}", e.message());

    // v3: wave 1 switched, then aborted: us-east goes back to v2.
    let id = o.deploy(start("sample:v3")).await.unwrap().into_inner().operation_id;
    wait_gate(&c, leader, &id, 1).await;
    let e = o
        .promote_operation(pb::PromoteOperationRequest {
            operation_id: id.clone(),
            gate: 3,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("has 2 promotion gate(s)"), "{}", e.message());
    o.promote_operation(pb::PromoteOperationRequest {
        operation_id: id.clone(),
        gate: 1,
    })
    .await
    .unwrap();
    wait_gate(&c, leader, &id, 2).await;
    assert_eq!(serving(&addrs[0]).await, "version sample:v3");
    o.abort_operation(pb::AbortOperationRequest {
        operation_id: id.clone(),
    })
    .await
    .unwrap();
    c.wait_state(leader, T, "v3 to be aborted", |s| s.operations[&id].state.is_finished())
        .await
        .unwrap();
    let op = get_op(&c, leader, &id).await;
    assert_eq!(op.state, pb::TaskState::Failed as i32);
    assert!(op.summary.starts_with("aborted by operator/"), "{}", op.summary);
    assert!(op.summary.contains("us-east/us-east-1 switched back"), "{}", op.summary);
    for a in &addrs {
        assert_eq!(serving(a).await, "version sample:v2", "every region back on v2");
    }

    // Every steering call is in the audit trail with who made it.
    let events = o
        .list_audit_events(pb::ListAuditEventsRequest {
            limit: 100,
            since_unix_ms: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    for action in [
        "PromoteOperation",
        "PauseOperation",
        "ResumeOperation",
        "AbortOperation",
    ] {
        assert!(
            events
                .iter()
                .any(|e| e.action == action && e.actor.starts_with("operator/") && e.outcome == "ok"),
            "{action} not audited: {events:?}"
        );
    }
    assert!(
        events
            .iter()
            .any(|e| e.action == "PauseOperation" && e.outcome.starts_with("refused")),
        "a refused pause is audited too"
    );
    c.shutdown().await;
}
