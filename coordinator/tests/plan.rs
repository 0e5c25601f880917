//! Table and property tests of the orchestrator against `State` alone: no
//! Raft, no network. A model agent per cluster executes whatever the
//! orchestrator commits (the tasks as a leader would send them, with their
//! content attached), and the test injects what a real system does to a
//! running operation: re-applied apps, releases created mid-deploy, failed
//! steps, agents that crash after acting but before reporting, and
//! proposals committed twice by a new leader.

mod common;

use std::collections::BTreeMap;

use cutover_coordinator::orchestrator::{self, Inputs};
use cutover_coordinator::state::{AuditDraft, Command, State};
use cutover_shared::app::{AppClusterStatus, AppSpec, Color};
use cutover_shared::domain::{ClusterRef, Operation, OperationKind, TaskResult, TaskState};
use cutover_shared::operation::{FailoverSpec, MigrateSpec, OperationSpec, Strategy};
use cutover_shared::release::{Bundle, Release};
use cutover_shared::task::{self, FailoverAction, MigrateAction, TaskKind, TaskParams, TrafficAction};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

fn audit() -> AuditDraft {
    common::audit(1)
}

fn target(region: &str) -> ClusterRef {
    common::cluster(region)
}

fn spec(bake_secs: u64) -> AppSpec {
    common::app_spec("shop", &REGIONS, bake_secs)
}

fn bundle() -> Bundle {
    Bundle::parse(vec![
        ("1_add.up.sql".into(), b"create table t (x int);".to_vec()),
        ("1_add.down.sql".into(), b"drop table t;".to_vec()),
    ])
    .unwrap()
}

fn release(image: &str, b: &Bundle) -> Command {
    Command::CreateRelease {
        release: Release::new("shop", image, b, "operator/test", 1),
        bundle: b.clone(),
        audit: audit(),
    }
}

/// An operation as `ControlService` creates it.
fn operation(id: &str, kind: OperationKind, spec: OperationSpec) -> Operation {
    Operation {
        id: id.into(),
        kind,
        app: Some("shop".into()),
        targets: REGIONS.iter().map(|r| target(r)).collect(),
        spec,
        state: TaskState::Pending,
        created_by: "operator/test".into(),
        created_at_unix_ms: 1,
        updated_at_unix_ms: 1,
        tasks: vec![],
        summary: String::new(),
        control: Default::default(),
        spec_digest: None,
        bundle_digest: None,
    }
}

fn switch_to(to: BTreeMap<String, Color>) -> OperationSpec {
    OperationSpec {
        switch_to: to,
        ..OperationSpec::default()
    }
}

fn deploy_op(id: &str, image: &str, strategy: &str) -> Operation {
    let spec = OperationSpec {
        image: Some(image.into()),
        strategy: if strategy == "atomic" {
            Strategy::Atomic
        } else {
            Strategy::Waves
        },
        waves: REGIONS.iter().map(|r| vec![r.to_string()]).collect(),
        bake_secs: 10,
        ..OperationSpec::default()
    };
    operation(id, OperationKind::Deploy, spec)
}

/// What one cluster runs, as the model agent keeps it.
#[derive(Clone, Debug, Default)]
struct Cluster {
    active: Option<Color>,
    images: BTreeMap<Color, String>,
    /// Times traffic actually moved.
    flips: u32,
}

struct World {
    state: State,
    clusters: BTreeMap<String, Cluster>,
    now: i64,
    /// Crashes injected per task id (at most two each, so every task ends).
    crashes: BTreeMap<String, u32>,
}

impl World {
    fn new(with_release: bool) -> World {
        let mut w = World {
            state: State::default(),
            clusters: BTreeMap::new(),
            now: 10,
            crashes: BTreeMap::new(),
        };
        w.apply(Command::PutApp {
            spec: spec(10),
            audit: audit(),
        });
        if with_release {
            w.apply(release("shop:v2", &bundle()));
        }
        for r in REGIONS {
            let mut c = Cluster {
                active: Some(Color::Blue),
                ..Default::default()
            };
            c.images.insert(Color::Blue, "shop:v1".into());
            w.clusters.insert(target(r).to_string(), c);
            w.report(r);
        }
        // Where a failover's traffic driver runs: no app there.
        w.clusters.insert(target("global").to_string(), Cluster::default());
        w
    }

    fn apply(&mut self, cmd: Command) {
        let r = self.state.apply(cmd.clone());
        assert_eq!(r.error, None, "{cmd}");
    }

    fn report(&mut self, region: &str) {
        let c = &self.clusters[&target(region).to_string()];
        let status = AppClusterStatus {
            canary_weight: 0,
            active: c.active,
            colors: vec![],
            last_switch_unix_ms: None,
            maintenance: false,
        };
        self.apply(Command::AppStatusReported {
            from: target(region),
            app: "shop".into(),
            status,
        });
    }

    fn op(&self, id: &str) -> &Operation {
        &self.state.operations[id]
    }

    /// What the leader would commit next for `id`.
    fn next(&mut self, id: &str) -> Option<Command> {
        self.now += 1;
        let op = self.op(id);
        let (spec, bundle) = self.state.operation_inputs(op).expect("inputs");
        let inputs = Inputs::new(op, spec, bundle);
        let next = orchestrator::next_command(op, &inputs, self.now);
        // Whether there is a next step depends on the record alone, not on
        // the clock: the leader's scan skips an unchanged operation that
        // had none (`orchestrator::Quiet`), however much later it is.
        let an_hour_later = orchestrator::next_command(op, &inputs, self.now + 3_600_000);
        assert_eq!(
            next.is_some(),
            an_hour_later.is_some(),
            "the decision for {id} changed with the clock alone: {next:?} / {an_hour_later:?}"
        );
        next
    }

    /// The model agent runs one task as the leader sends it (content
    /// attached). `crash` acts but reports nothing, as an agent killed
    /// between acting and recording would.
    fn run(&mut self, cluster: &ClusterRef, task_id: &str, fail: bool, crash: bool) {
        let spec = self
            .state
            .unfinished_tasks_for(cluster)
            .into_iter()
            .find(|t| t.task_id == task_id)
            .expect("the task is sent");
        let params = TaskParams::from_wire(&spec.kind, &spec.params).expect("typed params");
        // Injected failures hit forward steps; a compensation that fails
        // is a different story (the summary says NOT switched back).
        let fail = fail && !params.is_compensation();
        // The definition the task carries is the one the operation fixed.
        let attached = task::attached_spec(&spec.params).expect("attached spec matches its digest");
        let op = &self.state.operations[&spec.operation_id];
        assert_eq!(Some(task::spec_digest(&attached)), op.spec_digest, "task {task_id}");
        let c = self.clusters.get_mut(&cluster.to_string()).unwrap();
        let mut outputs = BTreeMap::new();
        let ok = !fail;
        match params {
            TaskParams::AppDeploy { image, .. } => {
                let color = c.active.map_or(Color::Blue, Color::other);
                if ok {
                    c.images.insert(color, image);
                }
                outputs = task::outputs::AppOutputs {
                    color: Some(color),
                    ..Default::default()
                }
                .to_wire();
            }
            TaskParams::AppSwitch { to, .. } => {
                let to = to.expect("every switch names its color");
                if ok && c.active != Some(to) {
                    c.active = Some(to);
                    c.flips += 1;
                }
            }
            TaskParams::DbMigrate(m) => {
                assert!(spec.params.contains_key("bundle"), "a migration carries its bundle");
                task::attached_bundle(&spec.params).expect("attached bundle matches its digest");
                if ok {
                    outputs = task::outputs::MigrateOutputs {
                        applied: Some(vec![1]),
                        from_version: Some(0),
                        to_version: Some(if m.action.as_str() == "up" { 1 } else { 0 }),
                        ..Default::default()
                    }
                    .to_wire();
                }
            }
            TaskParams::DbFailover(f) => {
                if ok {
                    outputs = task::outputs::FailoverOutputs {
                        lsn: Some(if f.action == FailoverAction::Fence { 100 } else { 200 }),
                        epoch: Some(f.epoch),
                        caught_up_ms: None,
                        method: (f.action == FailoverAction::Rejoin).then(|| "rewind".into()),
                    }
                    .to_wire();
                }
            }
            TaskParams::AppGates { .. }
            | TaskParams::AppBake { .. }
            | TaskParams::AppCanary { .. }
            | TaskParams::AppMaintenance { .. }
            | TaskParams::TrafficMove(_) => {}
            other => panic!("unexpected task {other:?}"),
        }
        if crash {
            return;
        }
        self.now += 1;
        self.apply(Command::TaskFinished {
            from: cluster.clone(),
            result: TaskResult {
                task_id: task_id.into(),
                success: ok,
                message: if ok { "ok".into() } else { "failed".into() },
                outputs,
                replayed: false,
                finished_at_unix_ms: self.now,
            },
            at_unix_ms: self.now,
        });
    }

    /// Drives operation `id` to its end. `chaos` decides, per event, whether
    /// a step fails, an agent crashes before reporting, a proposal is
    /// committed twice, or an app or release is changed under the operation.
    fn drive(&mut self, id: &str, mut chaos: impl FnMut(&mut World, Event) -> bool) {
        for _ in 0..500 {
            if self.op(id).state.is_finished() {
                return;
            }
            if let Some(cmd) = self.next(id) {
                self.apply(cmd.clone());
                if chaos(self, Event::Duplicate) {
                    // A new leader proposes the same decision again.
                    self.apply(cmd);
                }
                chaos(self, Event::Meddle);
                continue;
            }
            let pending: Vec<(ClusterRef, String)> = self
                .op(id)
                .tasks
                .iter()
                .filter(|t| !t.state.is_finished())
                .map(|t| (t.spec.target.clone(), t.spec.task_id.clone()))
                .collect();
            assert!(!pending.is_empty(), "operation {id} is stuck: {:?}", self.op(id));
            for (cluster, task_id) in pending {
                let fail = chaos(self, Event::Fail);
                let crash = chaos(self, Event::Crash) && {
                    let n = self.crashes.entry(task_id.clone()).or_default();
                    *n += 1;
                    *n <= 2
                };
                self.run(&cluster, &task_id, fail, crash);
            }
        }
        panic!("operation {id} did not finish: {:?}", self.op(id));
    }

    fn steps(&self, id: &str) -> Vec<String> {
        self.op(id)
            .tasks
            .iter()
            .map(|t| format!("{} {}", t.spec.kind, t.spec.target.region))
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Fail,
    Crash,
    Duplicate,
    Meddle,
}

/// Problem 3 of the typed-contract issue: a release created for the
/// deploying image after wave 1 used to make wave 2 switch to a color that
/// was never deployed and skip the migrations. Also: re-applying the app
/// mid-deploy (no bake) does not drop the remaining bakes.
#[test]
fn a_release_or_app_change_during_a_deploy_does_not_change_its_plan() {
    let mut w = World::new(false);
    w.apply(Command::CreateOperation {
        operation: deploy_op("op-a", "shop:v2", "waves"),
        audit: audit(),
        fix_inputs: true,
    });
    let digest = w
        .op("op-a")
        .spec_digest
        .clone()
        .expect("the definition is fixed at creation");
    assert_eq!(w.op("op-a").bundle_digest, None);
    let mut meddled = false;
    w.drive("op-a", |w, e| {
        let wave1_switched = w.op("op-a").tasks.iter().any(|t| t.spec.kind == "app.bake");
        if e == Event::Meddle && wave1_switched && !meddled {
            meddled = true;
            w.apply(release("shop:v2", &bundle()));
            w.apply(Command::PutApp {
                spec: spec(0),
                audit: audit(),
            });
        }
        false
    });
    assert!(meddled);
    let op = w.op("op-a");
    assert_eq!(op.state, TaskState::Succeeded, "{}", op.summary);
    let per_wave = |r: &str| {
        vec![
            format!("app.deploy {r}"),
            format!("app.gates {r}"),
            format!("app.switch {r}"),
            format!("app.bake {r}"),
        ]
    };
    let want: Vec<String> = REGIONS.iter().flat_map(|r| per_wave(r)).collect();
    assert_eq!(
        w.steps("op-a"),
        want,
        "no migrations and no dropped bakes after the changes"
    );
    for t in &op.tasks {
        assert_eq!(t.spec.params.get("spec_digest"), Some(&digest), "{}", t.spec.task_id);
        assert!(
            !t.spec.params.contains_key("spec"),
            "tasks store the digest, not the definition"
        );
    }
    for r in REGIONS {
        let c = &w.clusters[&target(r).to_string()];
        assert_eq!(c.active, Some(Color::Green), "{r}");
        assert_eq!(c.images[&Color::Green], "shop:v2");
        assert_eq!(c.flips, 1, "{r}");
    }
}

/// A release that exists at creation is the one used, carried by digest.
#[test]
fn a_deploy_with_a_release_migrates_first_and_stores_the_bundle_once() {
    let mut w = World::new(true);
    w.apply(Command::CreateOperation {
        operation: deploy_op("op-m", "shop:v2", "atomic"),
        audit: audit(),
        fix_inputs: true,
    });
    let b = bundle();
    assert_eq!(w.op("op-m").bundle_digest.as_deref(), Some(b.digest().as_str()));
    w.drive("op-m", |_, _| false);
    let op = w.op("op-m");
    assert_eq!(op.state, TaskState::Succeeded, "{}", op.summary);
    let kinds: Vec<String> = op.tasks.iter().map(|t| t.spec.kind.clone()).collect();
    let first_migrate = kinds.iter().position(|k| k == "db.migrate").unwrap();
    let first_switch = kinds.iter().position(|k| k == "app.switch").unwrap();
    assert!(first_migrate < first_switch, "{kinds:?}");
    for t in op.tasks.iter().filter(|t| t.spec.kind == "db.migrate") {
        assert!(!t.spec.params.contains_key("bundle"), "the log holds the digest only");
        assert_eq!(t.spec.params.get("bundle_digest"), Some(&b.digest()));
    }
}

/// Problem 4: a switch names its color, so an agent that switched, crashed
/// before reporting, and runs the task again does not flip traffic back.
#[test]
fn a_switch_rerun_after_a_crash_converges() {
    let mut w = World::new(false);
    // What ControlService.Switch records: each cluster's target color.
    let to: BTreeMap<String, Color> = REGIONS.iter().map(|r| (target(r).to_string(), Color::Green)).collect();
    for r in REGIONS {
        w.clusters
            .get_mut(&target(r).to_string())
            .unwrap()
            .images
            .insert(Color::Green, "shop:v0".into());
    }
    w.apply(Command::CreateOperation {
        operation: operation("op-s", OperationKind::Switch, switch_to(to)),
        audit: audit(),
        fix_inputs: true,
    });
    let mut crashed = 0;
    w.drive("op-s", |_, e| {
        // Every switch crashes once after acting; the re-sent task runs again.
        if e == Event::Crash && crashed < REGIONS.len() {
            crashed += 1;
            return true;
        }
        false
    });
    assert_eq!(crashed, REGIONS.len());
    assert_eq!(w.op("op-s").state, TaskState::Succeeded);
    for r in REGIONS {
        let c = &w.clusters[&target(r).to_string()];
        assert_eq!((c.active, c.flips), (Some(Color::Green), 1), "{r}");
    }
}

/// The property: for random operation specs and random interleavings of
/// failures, crashes before reporting, duplicated proposals (leader
/// changes), re-applied apps and new releases, the plan never changes after
/// creation, each switch takes effect once, and the operation ends
/// Succeeded with every region on the new color, or Failed with every
/// region back on the old one.
#[test]
fn random_interleavings_keep_the_plan_fixed_and_switch_once() {
    for seed in 0..300u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let with_release = rng.random_bool(0.3);
        let mut w = World::new(with_release);
        let strategy = if rng.random_bool(0.5) { "atomic" } else { "waves" };
        let id = format!("op-{seed}");
        w.apply(Command::CreateOperation {
            operation: deploy_op(&id, "shop:v2", strategy),
            audit: audit(),
            fix_inputs: true,
        });
        let fixed = w.op(&id).clone();
        let (p_fail, p_crash) = (rng.random_range(0.0..0.08), rng.random_range(0.0..0.3));
        w.drive(&id, |w, e| match e {
            Event::Fail => rng.random_bool(p_fail),
            Event::Crash => rng.random_bool(p_crash),
            Event::Duplicate => rng.random_bool(0.2),
            Event::Meddle => {
                if rng.random_bool(0.05) {
                    w.apply(Command::PutApp {
                        spec: spec(rng.random_range(0..3)),
                        audit: audit(),
                    });
                }
                if rng.random_bool(0.05) {
                    let v = rng.random_range(3..9);
                    w.apply(release(&format!("shop:v{v}"), &bundle()));
                    w.apply(release("shop:v2", &bundle()));
                }
                false
            }
        });
        let op = w.op(&id);
        // Fixed at creation: digests unchanged, and every step taken (the
        // compensations aside) is the plan computed from the creation
        // record and the results, never from later state.
        assert_eq!(op.spec_digest, fixed.spec_digest, "seed {seed}");
        assert_eq!(op.bundle_digest, fixed.bundle_digest, "seed {seed}");
        let mut replay = fixed.clone();
        let b = bundle();
        let bundle_then = with_release.then_some(&b);
        let inputs = Inputs::new(&fixed, &spec(10), bundle_then);
        for (i, t) in op.tasks.iter().enumerate() {
            let typed = TaskParams::from_wire(&t.spec.kind, &t.spec.params).unwrap();
            assert_eq!(typed.app().unwrap().spec_digest, inputs.app.spec_digest, "seed {seed}");
            if !typed.is_compensation() {
                let planned = &orchestrator::plan(&replay, &inputs)[i];
                assert_eq!(
                    (&planned.target, &planned.params),
                    (&t.spec.target, &typed),
                    "seed {seed} step {i}"
                );
            }
            replay.tasks.push(t.clone());
        }
        let has_migrations = op.tasks.iter().any(|t| t.spec.kind == TaskKind::DbMigrate.as_str());
        // Migrations only from the release in force at creation (a deploy
        // step can fail before they start).
        assert!(with_release || !has_migrations, "seed {seed}");
        assert!(
            has_migrations || !with_release || op.state == TaskState::Failed,
            "seed {seed}"
        );
        match op.state {
            TaskState::Succeeded => {
                for r in REGIONS {
                    let c = &w.clusters[&target(r).to_string()];
                    assert_eq!((c.active, c.flips), (Some(Color::Green), 1), "seed {seed} {r}");
                }
            }
            TaskState::Failed => {
                for r in REGIONS {
                    let c = &w.clusters[&target(r).to_string()];
                    assert_eq!(c.active, Some(Color::Blue), "seed {seed} {r}: {}", op.summary);
                    assert!(c.flips == 0 || c.flips == 2, "seed {seed} {r}: {} flips", c.flips);
                }
            }
            other => panic!("seed {seed}: ended {other:?}"),
        }
    }
}

/// The plan of each operation kind, as a table: (kind, region, starts with
/// the previous step, promotion gate) per step.
#[test]
fn plans_by_kind_and_strategy() {
    let b = bundle();
    let s = spec(10);
    let row = |p: &orchestrator::Step| {
        format!(
            "{} {}{}{}",
            p.params.kind(),
            p.target.region,
            if p.with_previous { " +" } else { "" },
            if p.gate > 0 {
                format!(" gate{}", p.gate)
            } else {
                String::new()
            }
        )
    };
    let plan_of = |op: &Operation, bundle: Option<&Bundle>| -> Vec<String> {
        orchestrator::plan(op, &Inputs::new(op, &s, bundle))
            .iter()
            .map(row)
            .collect()
    };
    let waves = deploy_op("op-w", "shop:v2", "waves");
    let mut expect = vec![];
    for (i, r) in REGIONS.iter().enumerate() {
        expect.extend([
            format!("app.deploy {r}"),
            format!("app.gates {r}"),
            format!("app.switch {r} gate{}", i + 1),
            format!("app.bake {r}"),
        ]);
    }
    assert_eq!(plan_of(&waves, None), expect);
    let atomic = deploy_op("op-a", "shop:v2", "atomic");
    let mut expect: Vec<String> = REGIONS
        .iter()
        .flat_map(|r| [format!("app.deploy {r}"), format!("app.gates {r}")])
        .collect();
    expect.extend(
        [
            "app.switch us-east gate1",
            "app.switch eu-west +",
            "app.switch ap-south +",
        ]
        .map(String::from),
    );
    expect.extend(["app.bake us-east", "app.bake eu-west +", "app.bake ap-south +"].map(String::from));
    assert_eq!(plan_of(&atomic, None), expect);
    // With migrations: every region deploys, then all migrate together,
    // before any gate or switch.
    let with_release = plan_of(&waves, Some(&b));
    assert_eq!(
        with_release[..6],
        [
            "app.deploy us-east",
            "app.deploy eu-west",
            "app.deploy ap-south",
            "db.migrate us-east",
            "db.migrate eu-west +",
            "db.migrate ap-south +",
        ]
    );
    assert_eq!(
        with_release[6..9],
        ["app.gates us-east", "app.switch us-east gate1", "app.bake us-east"]
    );
    let to = BTreeMap::from([(target("us-east").to_string(), Color::Green)]);
    let mut switch = operation("op-s", OperationKind::Switch, switch_to(to));
    switch.targets = vec![target("us-east")];
    assert_eq!(plan_of(&switch, None), ["app.switch us-east"]);
    let p = orchestrator::plan(&switch, &Inputs::new(&switch, &s, None));
    assert!(matches!(
        p[0].params,
        TaskParams::AppSwitch {
            to: Some(Color::Green),
            compensate: false,
            ..
        }
    ));
    let check = operation("op-h", OperationKind::HealthCheck, OperationSpec::default());
    assert_eq!(plan_of(&check, None), REGIONS.map(|r| format!("app.gates {r}")));
    let migrate = operation(
        "op-m",
        OperationKind::Migrate,
        OperationSpec {
            image: Some("shop:v2".into()),
            migrate: Some(MigrateSpec {
                action: MigrateAction::Plan,
                target: None,
                dry_run: false,
            }),
            ..OperationSpec::default()
        },
    );
    assert_eq!(
        plan_of(&migrate, Some(&b)),
        ["db.migrate us-east", "db.migrate eu-west +", "db.migrate ap-south +"]
    );
}

fn canary_spec() -> AppSpec {
    AppSpec {
        strategy: cutover_shared::app::TrafficStrategy::Canary,
        canary: Some(cutover_shared::app::CanarySteps {
            weights: vec![5, 25, 100],
            pause_secs: 30,
        }),
        ..spec(10)
    }
}

/// Canary is the in-region step: with waves, each region's weights move
/// before its switch and bake; atomic moves every region's weight
/// together, step by step, then flips them all. With manual promotion a
/// gate is in front of every step and the switch, numbered in plan order.
/// A step names the deployed color, its weight and its pause.
#[test]
fn a_canary_moves_weights_before_each_switch_in_waves_and_atomically() {
    let s = canary_spec();
    let row = |p: &orchestrator::Step| {
        let what = match &p.params {
            TaskParams::AppCanary { weight, .. } => format!("canary {weight}"),
            other => other.kind().to_string(),
        };
        format!(
            "{what} {}{}{}",
            p.target.region,
            if p.with_previous { " +" } else { "" },
            if p.gate > 0 {
                format!(" gate{}", p.gate)
            } else {
                String::new()
            }
        )
    };
    let plan_of = |op: &Operation| -> Vec<String> {
        orchestrator::plan(op, &Inputs::new(op, &s, None))
            .iter()
            .map(row)
            .collect()
    };
    let waves = deploy_op("op-w", "shop:v2", "waves");
    let first: Vec<String> = plan_of(&waves).into_iter().take(7).collect();
    assert_eq!(
        first,
        [
            "app.deploy us-east",
            "app.gates us-east",
            "canary 5 us-east gate1",
            "canary 25 us-east gate2",
            "app.switch us-east gate3",
            "app.bake us-east",
            "app.deploy eu-west",
        ]
    );
    assert!(plan_of(&waves).contains(&"canary 5 eu-west gate4".to_owned()));
    let atomic = plan_of(&deploy_op("op-a", "shop:v2", "atomic"));
    assert_eq!(
        atomic[6..12],
        [
            "canary 5 us-east gate1",
            "canary 5 eu-west +",
            "canary 5 ap-south +",
            "canary 25 us-east gate2",
            "canary 25 eu-west +",
            "canary 25 ap-south +",
        ]
    );
    assert_eq!(atomic[12], "app.switch us-east gate3");
    // Driven to its end, each step names the color the deploy reported.
    let mut w = World::new(false);
    w.apply(Command::PutApp {
        spec: canary_spec(),
        audit: audit(),
    });
    w.apply(Command::CreateOperation {
        operation: deploy_op("op-c", "shop:v2", "waves"),
        audit: audit(),
        fix_inputs: true,
    });
    w.drive("op-c", |_, _| false);
    let op = w.op("op-c");
    assert_eq!(op.state, TaskState::Succeeded, "{}", op.summary);
    for t in op.tasks.iter().filter(|t| t.spec.kind == "app.canary") {
        let p = TaskParams::from_wire(&t.spec.kind, &t.spec.params).unwrap();
        assert!(
            matches!(
                p,
                TaskParams::AppCanary {
                    color: Some(Color::Green),
                    pause_secs: 30,
                    compensate: false,
                    ..
                }
            ),
            "{p:?}"
        );
    }
}

/// A canary step that fails in the second wave: the first wave's switch
/// is undone, and the failing cluster's weight goes back to 0 (the agent
/// does so itself; the compensation makes sure), once, and nothing
/// later in that region runs.
#[test]
fn a_failed_canary_step_sets_its_weight_back_to_0_and_undoes_earlier_waves() {
    let mut w = World::new(false);
    w.apply(Command::PutApp {
        spec: canary_spec(),
        audit: audit(),
    });
    w.apply(Command::CreateOperation {
        operation: deploy_op("op-f", "shop:v2", "waves"),
        audit: audit(),
        fix_inputs: true,
    });
    w.drive("op-f", |w, e| {
        e == Event::Fail
            && w.op("op-f").tasks.last().is_some_and(|t| {
                t.spec.target.region == "eu-west"
                    && t.spec.kind == "app.canary"
                    && t.spec.params.get("weight").map(String::as_str) == Some("25")
            })
    });
    let op = w.op("op-f");
    assert_eq!(op.state, TaskState::Failed, "{}", op.summary);
    let tail: Vec<String> = op
        .tasks
        .iter()
        .skip_while(|t| t.state != TaskState::Failed)
        .map(|t| {
            let p = TaskParams::from_wire(&t.spec.kind, &t.spec.params).unwrap();
            match p {
                TaskParams::AppCanary { weight, compensate, .. } => {
                    format!(
                        "canary {weight} {}{}",
                        t.spec.target.region,
                        if compensate { " undo" } else { "" }
                    )
                }
                TaskParams::AppSwitch { to, compensate, .. } => format!(
                    "switch {:?} {}{}",
                    to.unwrap(),
                    t.spec.target.region,
                    if compensate { " undo" } else { "" }
                ),
                other => format!("{} {}", other.kind(), t.spec.target.region),
            }
        })
        .collect();
    assert_eq!(
        tail,
        ["canary 25 eu-west", "switch Blue us-east undo", "canary 0 eu-west undo"],
        "{}",
        op.summary
    );
    assert_eq!(w.clusters[&target("us-east").to_string()].active, Some(Color::Blue));
}

/// A failover from us-east to eu-west under `epoch`, as `Failover` creates
/// it when us-east's agent is up.
fn failover_op(id: &str, epoch: u64) -> Operation {
    let mut op = operation(
        id,
        OperationKind::Failover,
        OperationSpec {
            failover: Some(Box::new(FailoverSpec {
                from: Some(target("us-east")),
                to: target("eu-west"),
                epoch,
                fence: true,
                verify_color: Some(Color::Blue),
                data_loss_window_ms: Some(0),
                wal_behind_bytes: None,
                force: false,
                accept_data_loss: false,
                fence_only: false,
                rejoin: false,
                rejoin_only: false,
                traffic: None,
                deploy_image: None,
                restore: None,
            })),
            ..OperationSpec::default()
        },
    );
    op.targets = vec![target("eu-west"), target("us-east")];
    op
}

fn failover_params(w: &World, id: &str) -> Vec<(String, FailoverAction, Option<u64>, bool)> {
    w.op(id)
        .tasks
        .iter()
        .filter_map(|t| match TaskParams::from_wire(&t.spec.kind, &t.spec.params) {
            Ok(TaskParams::DbFailover(f)) => {
                Some((t.spec.target.region.clone(), f.action, f.wait_for_lsn, f.compensate))
            }
            _ => None,
        })
        .collect()
}

/// The fence comes first and the promotion waits for the position the
/// fence reported; the epoch is committed with the decision, once: a
/// second failover decided on the same epoch is refused. Decisions
/// committed twice (a new leader) change nothing.
#[test]
fn a_failover_fences_then_promotes_at_the_fence_position_under_one_epoch() {
    let mut w = World::new(false);
    w.apply(Command::CreateOperation {
        operation: failover_op("op-f", 1),
        audit: audit(),
        fix_inputs: true,
    });
    assert_eq!(w.state.dr_epochs["shop"].epoch, 1);
    assert_eq!(w.state.dr_epochs["shop"].primary, None);
    w.drive("op-f", |_, e| e == Event::Duplicate);
    assert_eq!(w.op("op-f").state, TaskState::Succeeded, "{}", w.op("op-f").summary);
    assert_eq!(
        w.steps("op-f"),
        [
            "app.maintenance us-east",
            "db.failover us-east",
            "db.failover eu-west",
            "app.gates eu-west"
        ]
    );
    assert_eq!(
        failover_params(&w, "op-f"),
        [
            ("us-east".into(), FailoverAction::Fence, None, false),
            ("eu-west".into(), FailoverAction::Promote, Some(100), false),
        ]
    );
    assert_eq!(w.state.dr_epochs["shop"].primary, Some(target("eu-west")));
    assert!(
        w.op("op-f").summary.contains("data lost: nothing"),
        "{}",
        w.op("op-f").summary
    );
}

/// Fails the failover's step that runs `action` (operation `op-f`).
fn fail_on(action: FailoverAction) -> impl Fn(&mut World, Event) -> bool {
    move |w: &mut World, e: Event| {
        e == Event::Fail
            && w.op("op-f").tasks.iter().any(|t| {
                !t.state.is_finished()
                    && matches!(
                        TaskParams::from_wire(&t.spec.kind, &t.spec.params),
                        Ok(TaskParams::DbFailover(f)) if f.action == action
                    )
            })
    }
}

/// A failover that failed before it promoted anything lifts the fence and
/// ends the maintenance; one whose promotion was sent undoes nothing (two
/// writable primaries are worse), and says so.
#[test]
fn a_failed_failover_is_undone_only_before_the_promotion() {
    let mut w = World::new(false);
    w.apply(Command::CreateOperation {
        operation: failover_op("op-f", 1),
        audit: audit(),
        fix_inputs: true,
    });
    w.drive("op-f", fail_on(FailoverAction::Fence));
    assert_eq!(w.op("op-f").state, TaskState::Failed);
    assert_eq!(
        w.steps("op-f"),
        [
            "app.maintenance us-east",
            "db.failover us-east",
            "db.failover us-east",
            "app.maintenance us-east"
        ]
    );
    assert_eq!(
        failover_params(&w, "op-f"),
        [
            ("us-east".into(), FailoverAction::Fence, None, false),
            ("us-east".into(), FailoverAction::Unfence, None, true),
        ]
    );
    // The epoch moved on (the next failover takes 2); no new primary.
    assert_eq!(w.state.dr_epochs["shop"].epoch, 1);
    assert_eq!(w.state.dr_epochs["shop"].primary, None);

    let mut w = World::new(false);
    w.apply(Command::CreateOperation {
        operation: failover_op("op-f", 1),
        audit: audit(),
        fix_inputs: true,
    });
    w.drive("op-f", fail_on(FailoverAction::Promote));
    assert_eq!(w.op("op-f").state, TaskState::Failed);
    assert_eq!(
        w.steps("op-f"),
        ["app.maintenance us-east", "db.failover us-east", "db.failover eu-west"]
    );
    assert!(
        w.op("op-f").summary.contains("stays fenced at epoch 1"),
        "{}",
        w.op("op-f").summary
    );
}

/// With an agent that moves the app's traffic, a failover holds new
/// requests before the fence and moves traffic right after the promotion.
/// One that fails before promoting puts the old primary back and releases
/// the held requests last; one that fails at the promotion releases them
/// too (they then go where traffic still goes).
#[test]
fn a_failover_holds_traffic_first_and_a_failed_one_releases_it_last() {
    let traffic_actions = |w: &World| -> Vec<(TrafficAction, Option<String>, bool)> {
        w.op("op-f")
            .tasks
            .iter()
            .filter_map(|t| match TaskParams::from_wire(&t.spec.kind, &t.spec.params) {
                Ok(TaskParams::TrafficMove(p)) => Some((p.action, p.region, p.compensate)),
                _ => None,
            })
            .collect()
    };
    let start = |w: &mut World| {
        let mut op = failover_op("op-f", 1);
        op.spec.failover.as_mut().unwrap().traffic = Some(target("global"));
        w.apply(Command::CreateOperation {
            operation: op,
            audit: audit(),
            fix_inputs: true,
        });
    };

    let mut w = World::new(false);
    start(&mut w);
    w.drive("op-f", |_, e| e == Event::Duplicate);
    assert_eq!(w.op("op-f").state, TaskState::Succeeded, "{}", w.op("op-f").summary);
    assert_eq!(
        w.steps("op-f"),
        [
            "traffic.move global",
            "app.maintenance us-east",
            "db.failover us-east",
            "db.failover eu-west",
            "traffic.move global",
            "app.gates eu-west"
        ]
    );
    assert_eq!(
        traffic_actions(&w),
        [
            (TrafficAction::Hold, Some("eu-west".into()), false),
            (TrafficAction::Move, Some("eu-west".into()), false)
        ]
    );

    let mut w = World::new(false);
    start(&mut w);
    w.drive("op-f", fail_on(FailoverAction::Fence));
    assert_eq!(w.op("op-f").state, TaskState::Failed);
    assert_eq!(
        w.steps("op-f"),
        [
            "traffic.move global",
            "app.maintenance us-east",
            "db.failover us-east",
            "db.failover us-east",
            "app.maintenance us-east",
            "traffic.move global"
        ]
    );
    assert_eq!(
        traffic_actions(&w),
        [
            (TrafficAction::Hold, Some("eu-west".into()), false),
            (TrafficAction::Release, None, true)
        ]
    );

    let mut w = World::new(false);
    start(&mut w);
    w.drive("op-f", fail_on(FailoverAction::Promote));
    assert_eq!(w.op("op-f").state, TaskState::Failed);
    assert_eq!(
        traffic_actions(&w),
        [
            (TrafficAction::Hold, Some("eu-west".into()), false),
            (TrafficAction::Release, None, true)
        ]
    );
}

/// Where nothing served in the new primary's region, the failover deploys
/// the release the old region served, gates it and switches to it, all
/// before traffic moves there.
#[test]
fn a_failover_into_a_region_serving_nothing_deploys_the_release_there_first() {
    let mut w = World::new(false);
    let mut op = failover_op("op-f", 1);
    {
        let f = op.spec.failover.as_mut().unwrap();
        f.verify_color = None;
        f.deploy_image = Some("shop:v1".into());
        f.traffic = Some(target("global"));
    }
    w.apply(Command::CreateOperation {
        operation: op,
        audit: audit(),
        fix_inputs: true,
    });
    w.drive("op-f", |_, e| e == Event::Duplicate);
    assert_eq!(w.op("op-f").state, TaskState::Succeeded, "{}", w.op("op-f").summary);
    assert_eq!(
        w.steps("op-f"),
        [
            "traffic.move global",
            "app.maintenance us-east",
            "db.failover us-east",
            "db.failover eu-west",
            "app.deploy eu-west",
            "app.gates eu-west",
            "app.switch eu-west",
            "traffic.move global"
        ]
    );
    // The gates and the switch name the color the deploy wrote.
    let deployed = w.op("op-f").tasks[4]
        .result
        .as_ref()
        .map(|r| r.outputs.get("color").cloned());
    let switched = w.op("op-f").tasks[6].spec.params.get("to").cloned();
    assert!(switched.is_some());
    assert_eq!(deployed, Some(switched));
}

/// A failover with `rejoin` (what `dr failback` asks) rebuilds the old
/// primary as a standby of the new one after the new one is verified, and
/// lets its app take traffic again; a standalone rejoin acts for the
/// current epoch, needs it to exist, and commits no new one.
#[test]
fn a_failback_rejoins_the_old_primary_after_the_new_one_is_verified() {
    let mut w = World::new(false);
    let mut op = failover_op("op-f", 1);
    op.spec.failover.as_mut().unwrap().rejoin = true;
    w.apply(Command::CreateOperation {
        operation: op,
        audit: audit(),
        fix_inputs: true,
    });
    w.drive("op-f", |_, _| false);
    let summary = w.op("op-f").summary.clone();
    assert_eq!(w.op("op-f").state, TaskState::Succeeded, "{summary}");
    assert_eq!(
        w.steps("op-f"),
        [
            "app.maintenance us-east",
            "db.failover us-east",
            "db.failover eu-west",
            "app.gates eu-west",
            "db.failover us-east",
            "app.maintenance us-east"
        ]
    );
    let rejoin = w
        .op("op-f")
        .tasks
        .iter()
        .filter_map(|t| match TaskParams::from_wire(&t.spec.kind, &t.spec.params) {
            Ok(TaskParams::DbFailover(f)) if f.action == FailoverAction::Rejoin => Some(f),
            _ => None,
        })
        .next()
        .expect("a rejoin step");
    assert_eq!((rejoin.epoch, rejoin.source), (1, Some(target("eu-west"))));
    assert!(
        summary.contains("us-east/main rejoined as a standby of eu-west/main (pg_rewind)"),
        "{summary}"
    );
    assert_eq!(w.state.dr_epochs["shop"].primary, Some(target("eu-west")));

    // Rejoining on its own: same epoch, primary unchanged.
    let mut op = failover_op("op-r", 1);
    {
        let f = op.spec.failover.as_mut().unwrap();
        f.rejoin_only = true;
        f.fence = false;
    }
    op.targets = vec![target("us-east")];
    w.apply(Command::CreateOperation {
        operation: op,
        audit: audit(),
        fix_inputs: true,
    });
    w.drive("op-r", |_, _| false);
    assert_eq!(w.op("op-r").state, TaskState::Succeeded, "{}", w.op("op-r").summary);
    assert_eq!(w.steps("op-r"), ["db.failover us-east", "app.maintenance us-east"]);
    assert_eq!(w.state.dr_epochs["shop"].epoch, 1);
    assert_eq!(w.state.dr_epochs["shop"].primary, Some(target("eu-west")));

    // A rejoin decided on a stale epoch is refused.
    let mut op = failover_op("op-stale", 0);
    op.spec.failover.as_mut().unwrap().rejoin_only = true;
    op.targets = vec![target("us-east")];
    let refused = w.state.apply(Command::CreateOperation {
        operation: op,
        audit: audit(),
        fix_inputs: true,
    });
    assert!(refused.error.is_some_and(|e| e.contains("stale")));
}

/// The `[unreachable]` policy, as the leader applies it before each
/// decision: only `rollback` gives a step up, only once its agent has been
/// down `after_secs` (counted from the later of its going down and the
/// step's start), and the failure is that cluster's result for that task.
#[test]
fn an_unreachable_agent_fails_its_step_only_under_rollback_and_in_its_time() {
    use cutover_shared::app::{UnreachableAction, UnreachablePolicy};
    use cutover_shared::domain::{AgentRecord, AgentState, TaskRecord, TaskSpec};

    let mut op = deploy_op("op-u", "shop:v2", "waves");
    op.state = TaskState::Running;
    op.tasks.push(TaskRecord {
        spec: TaskSpec {
            task_id: "op-u-0".into(),
            operation_id: "op-u".into(),
            kind: "app.deploy".into(),
            params: BTreeMap::new(),
            target: target("eu-west"),
        },
        created_at_unix_ms: 50_000,
        state: TaskState::Running,
        progress: vec![],
        result: None,
        dispatch_count: 1,
    });
    let agent = |state, since| {
        let record = AgentRecord {
            cluster: target("eu-west"),
            state,
            since_unix_ms: since,
            agent_version: "test".into(),
            task_kinds: vec![],
            traffic_apps: vec![],
            session: 1,
            since_term: 0,
        };
        cutover_coordinator::state::Map::from_iter([(target("eu-west").to_string(), record)])
    };
    let rollback = UnreachablePolicy {
        action: UnreachableAction::Rollback,
        after_secs: 30,
    };
    let wait = UnreachablePolicy {
        action: UnreachableAction::Wait,
        after_secs: 30,
    };
    let down_early = agent(AgentState::Down, 10_000);
    let give_up = |op: &Operation,
                   p: Option<&UnreachablePolicy>,
                   a: &cutover_coordinator::state::Map<String, AgentRecord>,
                   now: i64| { orchestrator::give_up_unreachable(op, p, a, now, 0) };
    // Waiting counts from the step's start (50 s) here, the later of the two.
    assert!(give_up(&op, Some(&rollback), &down_early, 79_999).is_none());
    let Some(Command::TaskFinished { from, result, .. }) = give_up(&op, Some(&rollback), &down_early, 80_000) else {
        panic!("the step was not given up");
    };
    assert_eq!(from, target("eu-west"));
    assert_eq!(result.task_id, "op-u-0");
    assert!(!result.success);
    assert!(result.message.contains("unreachable for 30 s"), "{}", result.message);
    // From the agent's going down, when that came later.
    let down_late = agent(AgentState::Down, 70_000);
    assert!(give_up(&op, Some(&rollback), &down_late, 99_999).is_none());
    assert!(give_up(&op, Some(&rollback), &down_late, 100_000).is_some());
    // A leader that took over at 90 s (its clock) waits its 30 s from then,
    // whatever the state's timestamps say: its clock may be ahead of
    // theirs.
    let late_leader = |now| orchestrator::give_up_unreachable(&op, Some(&rollback), &down_early, now, 90_000);
    assert!(late_leader(119_999).is_none());
    assert!(late_leader(120_000).is_some());
    // Up, waiting, or no policy: nothing.
    assert!(give_up(&op, Some(&rollback), &agent(AgentState::Up, 10_000), 1_000_000).is_none());
    assert!(give_up(&op, Some(&wait), &down_early, 1_000_000).is_none());
    assert!(give_up(&op, None, &down_early, 1_000_000).is_none());
    // An operation already failing is rolling back: nothing more to give up.
    let mut failing = op.clone();
    failing.tasks[0].state = TaskState::Failed;
    failing.tasks.push(TaskRecord {
        state: TaskState::Running,
        ..op.tasks[0].clone()
    });
    assert!(give_up(&failing, Some(&rollback), &down_early, 1_000_000).is_none());
}
