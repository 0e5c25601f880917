//! The leader's DR watch driven through the state machine with an injected
//! clock: an automatic failover starts once the primary's agent has been
//! down for `failover_after_secs` and not before, only one per epoch and
//! cooldown, never past a standby lagging beyond `max_data_loss_secs`,
//! never while the standby still streams from the primary (only its agent
//! is gone), and never for an app that did not ask for it; a primary whose
//! agent is up but whose server it cannot reach fails over too, unfenced.

mod common;

use cutover_coordinator::orchestrator::dr_watch::{self, ClusterTime, Leadership};
use cutover_coordinator::state::{Command, State};
use cutover_shared::app::AppSpec;
use cutover_shared::config::DbDriver;
use cutover_shared::domain::{ClusterRef, TaskState};
use cutover_shared::dr::{DatabaseStatus, DbRole, RegionHealth};

use common::{audit, cluster};

const T0: i64 = common::JAN_1;

fn app(automatic: bool) -> AppSpec {
    let mut spec = common::app_spec("shop", &["us-east", "eu-west"], 0);
    spec.dr.automatic = automatic;
    spec.dr.failover_after_secs = 10;
    spec.dr.max_data_loss_secs = 5;
    spec.dr.cooldown_secs = 3600;
    spec
}

fn db(role: DbRole, lag_ms: Option<u64>) -> DatabaseStatus {
    DatabaseStatus {
        app: "shop".into(),
        driver: DbDriver::Postgres,
        configured_role: role,
        role: Some(role),
        follows: None,
        lsn: Some(1000),
        receive_lsn: None,
        lag_ms,
        error: None,
        observed_at_unix_ms: T0,
        fenced: false,
        // A standby that lost its primary's stream (its region agrees the
        // primary is gone).
        streaming: (role == DbRole::Standby).then_some(false),
        unreachable_since_unix_ms: None,
        unreachable_since_term: 0,
        observed_age_ms: 0,
        session: 0,
    }
}

/// A leader that took over at `since` (by its clock) a state whose
/// latest stamp is `T0` (the primary's agent marked down), in a cluster
/// that cannot tick (wall clocks only).
fn lead(since: i64) -> Leadership {
    Leadership {
        since_unix_ms: since,
        inherited_unix_ms: T0,
        term: 0,
        clock: ClusterTime::Unavailable,
    }
}

/// `region`'s agent (database, gates and maintenance tasks) registers at
/// `at` on `session`.
fn agent_up(s: &mut State, region: &str, at: i64, session: u64) {
    apply(
        s,
        Command::AgentUp {
            cluster: cluster(region),
            agent_version: "test".into(),
            task_kinds: vec!["db.failover".into(), "app.gates".into(), "app.maintenance".into()],
            at_unix_ms: at,
            session,
            traffic_apps: vec![],
        },
    );
}

/// `region`'s agent reports `d`.
fn report(s: &mut State, region: &str, d: DatabaseStatus) {
    apply(
        s,
        Command::DatabaseStatusReported {
            from: cluster(region),
            databases: vec![d],
        },
    );
}

fn apply(s: &mut State, cmd: Command) {
    let r = s.apply(cmd.clone());
    assert_eq!(r.error, None, "{cmd}");
}

/// Both agents up and reporting (the standby `lag_ms` behind), then
/// us-east's agent marked down at `T0`.
fn world(automatic: bool, lag_ms: u64) -> State {
    let mut s = State::default();
    for (i, r) in ["us-east", "eu-west"].iter().enumerate() {
        agent_up(&mut s, r, T0 - 60_000, i as u64 + 1);
    }
    apply(
        &mut s,
        Command::PutApp {
            spec: app(automatic),
            audit: audit(T0 - 60_000),
        },
    );
    report(&mut s, "us-east", db(DbRole::Primary, None));
    report(&mut s, "eu-west", db(DbRole::Standby, Some(lag_ms)));
    apply(
        &mut s,
        Command::AgentDown {
            cluster: cluster("us-east"),
            at_unix_ms: T0,
            session: 1,
        },
    );
    s
}

#[test]
fn an_automatic_failover_waits_for_failover_after_and_runs_once() {
    let mut s = world(true, 200);
    assert!(
        dr_watch::due(&s, T0 + 9_999, &lead(T0)).is_empty(),
        "before failover_after_secs"
    );
    let due = dr_watch::due(&s, T0 + 10_000, &lead(T0));
    assert_eq!(due.len(), 1, "{due:?}");
    let Command::CreateOperation { operation, audit, .. } = due[0].clone() else {
        panic!("{:?}", due[0]);
    };
    assert_eq!(operation.created_by, dr_watch::AUTO_ACTOR);
    assert_eq!(audit.action, "AutomaticFailover");
    let f = operation.spec.failover.as_deref().unwrap();
    assert_eq!((f.epoch, f.fence, f.force), (1, false, true));
    assert_eq!(
        (f.from.clone(), f.to.clone()),
        (Some(cluster("us-east")), cluster("eu-west"))
    );
    assert_eq!(operation.targets, [cluster("eu-west")]);
    // Two leaders propose the same decision: the second is refused.
    apply(&mut s, due[0].clone());
    assert!(s.apply(due[0].clone()).error.is_some());
    // While it runs, and after it ended, within the cooldown: nothing more.
    assert!(dr_watch::due(&s, T0 + 11_000, &lead(T0)).is_empty());
    apply(
        &mut s,
        Command::FinishOperation {
            operation_id: operation.id.clone(),
            state: TaskState::Succeeded,
            summary: "ok".into(),
            at_unix_ms: T0 + 12_000,
        },
    );
    assert_eq!(s.dr_epochs["shop"].primary, Some(cluster("eu-west")));
    assert!(dr_watch::due(&s, T0 + 60_000, &lead(T0)).is_empty());
}

/// The loss was stamped by the leader of the time, by its clock. A leader
/// that took over since, with a clock 8 s ahead of that one's, reads the
/// loss as 8 s older than it is: counted from the stamp alone, it would
/// fail over 2 s after it took over, not after the app's 10 s. It counts
/// from its takeover instead.
#[test]
fn a_new_leader_counts_failover_after_from_its_takeover() {
    let s = world(true, 200);
    let took_over = T0 + 8_000;
    assert!(
        dr_watch::due(&s, T0 + 10_000, &lead(took_over)).is_empty(),
        "failed over 2 s after taking over"
    );
    assert!(dr_watch::due(&s, took_over + 9_999, &lead(took_over)).is_empty());
    assert_eq!(dr_watch::due(&s, took_over + 10_000, &lead(took_over)).len(), 1);
    // What the leader reads off the state at takeover: the down mark.
    assert_eq!(
        Leadership::taking_over(&s, 0, took_over),
        Leadership {
            clock: ClusterTime::Pending,
            ..lead(took_over)
        }
    );
}

/// The loss was stamped in term 2 by a leader whose clock ran an hour
/// ahead of the one that takes over in term 3: counted from that stamp,
/// the new leader would wait an hour past `failover_after_secs` (and with
/// the skew the other way, fail over at once, as the test above). A stamp
/// of an earlier term counts from the takeover.
#[test]
fn a_loss_stamped_by_an_earlier_leader_counts_from_the_takeover_whatever_its_clock() {
    let mut s = world(true, 200);
    let hour = 3_600_000;
    // world() marked it down in term 0: up again, then down in term 2.
    assert_eq!(s.agents["us-east/main"].since_term, 0);
    agent_up(&mut s, "us-east", T0 - 1_000, 5);
    s.apply_in(
        2,
        Command::AgentDown {
            cluster: cluster("us-east"),
            at_unix_ms: T0 + hour,
            session: 5,
        },
    );
    assert_eq!(s.agents["us-east/main"].since_term, 2);
    let took_over = T0 + 1_000;
    let next = Leadership {
        term: 3,
        ..lead(took_over)
    };
    assert!(dr_watch::due(&s, took_over + 9_999, &next).is_empty());
    assert_eq!(
        dr_watch::due(&s, took_over + 10_000, &next).len(),
        1,
        "waited past failover_after for a loss another clock dated an hour ahead"
    );
    // The leader that stamped it (term 2) counts from its stamp.
    let same = Leadership { term: 2, ..lead(T0) };
    assert!(dr_watch::due(&s, T0 + hour + 9_999, &same).is_empty());
    assert_eq!(dr_watch::due(&s, T0 + hour + 10_000, &same).len(), 1);
}

/// The automatic failover of `world`, started at T0 + 10 s and succeeded
/// at T0 + 12 s: eu-west is primary.
fn failed_over_to_eu_west(s: &mut State) {
    let due = dr_watch::due(s, T0 + 10_000, &lead(T0));
    let Command::CreateOperation { operation, .. } = due[0].clone() else {
        panic!("{due:?}");
    };
    apply(s, due[0].clone());
    apply(
        s,
        Command::FinishOperation {
            operation_id: operation.id,
            state: TaskState::Succeeded,
            summary: "ok".into(),
            at_unix_ms: T0 + 12_000,
        },
    );
}

/// The last failover's time was stamped by the leader that started it. A
/// leader that took over since with a clock an hour ahead of that one's
/// reads a failover of a minute ago as past the app's one-hour cooldown:
/// when the new primary's region is lost in turn, it must still wait out
/// the cooldown, not fail back at once (a flapping pair of regions).
#[test]
fn a_new_leader_with_a_clock_ahead_still_waits_out_the_cooldown() {
    let mut s = world(true, 200);
    failed_over_to_eu_west(&mut s);
    eu_west_lost(&mut s);
    let hour = 3_600_000;
    // The same leader: not within the cooldown, and then back.
    let same = Leadership {
        since_unix_ms: T0,
        ..lead(T0)
    };
    assert!(dr_watch::due(&s, T0 + 40_000, &same).is_empty(), "within the cooldown");
    let back = dr_watch::due(&s, T0 + 10_000 + hour, &same);
    assert_eq!(back.len(), 1, "{back:?}");
    // A leader whose clock is an hour ahead, taking over 1 s after the loss
    // (real time): by its clock the failover was an hour and 21 s ago.
    let took_over = T0 + 31_000 + hour;
    let ahead = Leadership {
        clock: ClusterTime::Unavailable,
        ..Leadership::taking_over(&s, 0, took_over)
    };
    assert_eq!(ahead.inherited_unix_ms, T0 + 30_000);
    assert!(
        dr_watch::due(&s, took_over + 10_000, &ahead).is_empty(),
        "failed back 41 s after the last failover"
    );
    // It waits the whole cooldown, counted as if the failover had been
    // stamped when the loss was (the most the skew can be).
    assert!(dr_watch::due(&s, T0 + 10_000 + hour + ahead.ahead_ms() - 1, &ahead).is_empty());
    assert_eq!(
        dr_watch::due(&s, T0 + 10_000 + hour + ahead.ahead_ms(), &ahead).len(),
        1
    );
}

/// The cooldown on the cluster clock, which leaders' wall clocks do not
/// move. Leader A (term 2) ticks when it takes over and pins the
/// failover's epoch 2 s after it; eu-west is lost in turn. Leader B (term
/// 5) takes over with a wall clock an hour ahead of A's (by which the
/// failover was an hour ago): it waits the cooldown out on the cluster
/// clock, and not at all before its own tick has been applied.
#[test]
fn the_cooldown_is_counted_on_the_cluster_clock_whatever_the_leaders_wall_clocks() {
    let mut s = world(true, 200);
    apply(&mut s, tick(2, 0, &[]));
    failed_over_to_eu_west(&mut s);
    let epoch = s.dr_epochs["shop"].epoch;
    assert_eq!(s.clock.epoch("shop", epoch), None, "not pinned before a tick");
    // A tick whose reading was taken before the epoch was applied (it does
    // not name it) leaves it to the next.
    apply(&mut s, tick(2, 11_000, &[]));
    assert_eq!(
        s.clock.epoch("shop", epoch),
        None,
        "pinned by a reading taken before it"
    );
    apply(&mut s, tick(2, 12_000, &[("shop", epoch)]));
    assert_eq!(s.clock.epoch("shop", epoch), Some(12_000));
    eu_west_lost(&mut s);
    let hour = 3_600_000;
    let on = |s: &State, term: u64, since: i64, led_ms: u64| Leadership {
        since_unix_ms: since,
        clock: s.clock.now(term, led_ms).map_or(ClusterTime::Pending, ClusterTime::Now),
        ..lead(T0)
    };
    // A, 40 s in: within the cooldown; an hour after the pin, not.
    assert!(dr_watch::due(&s, T0 + 40_000, &on(&s, 2, T0, 40_000)).is_empty());
    assert_eq!(dr_watch::due(&s, T0 + 40_000, &on(&s, 2, T0, 12_000 + hour)).len(), 1);
    // B took over 1 s after the loss (real time); its wall clock reads
    // `now(led)` after leading for `led` ms.
    let since = T0 + 31_000 + hour as i64;
    let now = |led_ms: u64| since + led_ms as i64;
    assert_eq!(on(&s, 5, since, 60_000).clock, ClusterTime::Pending);
    assert!(
        dr_watch::due(&s, now(60_000), &on(&s, 5, since, 60_000)).is_empty(),
        "failed back before its first tick"
    );
    apply(&mut s, tick(5, 500, &[("shop", epoch)]));
    // The election between A's last tick and B's takeover is not counted:
    // 12 s of A's and B's own count since the failover's pin.
    assert_eq!(on(&s, 5, since, 600).clock, ClusterTime::Now(12_600));
    assert!(
        dr_watch::due(&s, now(60_000), &on(&s, 5, since, 60_000)).is_empty(),
        "failed back a minute after taking over with a clock an hour ahead"
    );
    assert!(dr_watch::due(&s, now(hour - 1), &on(&s, 5, since, hour - 1)).is_empty());
    assert_eq!(dr_watch::due(&s, now(hour), &on(&s, 5, since, hour)).len(), 1);
    // A tick proposed in term 4 but committed in a term-5 entry (its
    // leader deposed in between) does not move the clock.
    let before = s.clock.clone();
    assert_eq!(s.apply_in(5, tick(4, 90_000, &[("shop", epoch)])).error, None);
    assert_eq!(s.clock, before);
}

/// A tick of the leader of `term` that had led `led_ms` and applied the
/// failover epochs `pins`.
fn tick(term: u64, led_ms: u64, pins: &[(&str, u64)]) -> Command {
    Command::Tick {
        term,
        led_ms,
        pins: pins.iter().map(|&(app, e)| (app.to_string(), e)).collect(),
    }
}

/// After [`failed_over_to_eu_west`]: us-east comes back as eu-west's
/// standby; then eu-west's agent is lost, at T0 + 30 s.
fn eu_west_lost(s: &mut State) {
    agent_up(s, "us-east", T0 + 20_000, 3);
    for (region, role, lag) in [
        ("us-east", DbRole::Standby, Some(200)),
        ("eu-west", DbRole::Primary, None),
    ] {
        let mut d = db(role, lag);
        d.observed_at_unix_ms = T0 + 29_000;
        report(s, region, d);
    }
    apply(
        s,
        Command::AgentDown {
            cluster: cluster("eu-west"),
            at_unix_ms: T0 + 30_000,
            session: 2,
        },
    );
}

#[test]
fn no_automatic_failover_past_a_lagging_standby_or_for_an_app_that_did_not_ask() {
    let s = world(true, 6_000);
    assert!(
        dr_watch::due(&s, T0 + 60_000, &lead(T0)).is_empty(),
        "the lag is over max_data_loss"
    );
    let s = world(false, 0);
    assert!(dr_watch::due(&s, T0 + 60_000, &lead(T0)).is_empty(), "automatic is off");
}

/// Detection took 25 s (a slow heartbeat, as with Patroni's timings): by
/// then the standby's lag, the age of the last transaction it replayed,
/// has grown by the clock alone. What counts is its lag when the primary
/// was last seen, 200 ms, so the failover starts.
#[test]
fn a_lag_that_grew_after_the_primary_was_lost_does_not_block_the_failover() {
    let mut s = world(true, 200);
    let mut primary = db(DbRole::Primary, None);
    primary.observed_at_unix_ms = T0 - 25_000;
    report(&mut s, "us-east", primary);
    // Replayed its last transaction 200 ms before the primary's last
    // report; observed 40 s later.
    let mut standby = db(DbRole::Standby, Some(40_200));
    standby.observed_at_unix_ms = T0 + 15_000;
    report(&mut s, "eu-west", standby);
    let due = dr_watch::due(&s, T0 + 15_000, &lead(T0));
    assert_eq!(due.len(), 1, "the grown lag blocked the failover: {due:?}");
    let Command::CreateOperation { operation, .. } = &due[0] else {
        panic!("{:?}", due[0]);
    };
    assert_eq!(
        operation.spec.failover.as_deref().unwrap().data_loss_window_ms,
        Some(200)
    );
}

/// The primary's agent is down, but the standby still streams from the
/// primary's server: the primary lives, so nothing fails over.
#[test]
fn no_automatic_failover_while_the_standby_still_streams_from_the_primary() {
    let mut s = world(true, 0);
    let mut standby = db(DbRole::Standby, Some(0));
    standby.streaming = Some(true);
    report(&mut s, "eu-west", standby);
    assert!(dr_watch::due(&s, T0 + 60_000, &lead(T0)).is_empty());
}

/// The primary's agent is up but reports its server unreachable; once that
/// lasted `failover_after_secs` and the standby's region cannot reach it
/// either, the app fails over, superseding (not fencing) the old primary.
#[test]
fn a_primary_server_unreachable_from_both_regions_fails_over_unfenced() {
    let mut s = world(true, 0);
    agent_up(&mut s, "us-east", T0, 3);
    for at in [T0, T0 + 5_000, T0 + 9_000] {
        let mut primary = db(DbRole::Primary, None);
        primary.role = None;
        primary.lsn = None;
        primary.error = Some("connection refused".into());
        primary.observed_at_unix_ms = at;
        report(&mut s, "us-east", primary);
    }
    let d = &s.db_status["shop"]["us-east/main"];
    assert_eq!(d.unreachable_since_unix_ms, Some(T0), "since the first of the run");
    assert!(
        dr_watch::due(&s, T0 + 9_999, &lead(T0)).is_empty(),
        "before failover_after_secs"
    );
    let due = dr_watch::due(&s, T0 + 10_000, &lead(T0));
    assert_eq!(due.len(), 1, "{due:?}");
    let Command::CreateOperation { operation, .. } = &due[0] else {
        panic!("{:?}", due[0]);
    };
    let f = operation.spec.failover.as_ref().unwrap();
    assert_eq!((f.to.clone(), f.fence), (cluster("eu-west"), false));
    assert_eq!(operation.targets, vec![cluster("eu-west")]);
    // A report that reaches the server again ends the run.
    report(&mut s, "us-east", db(DbRole::Primary, None));
    assert_eq!(s.db_status["shop"]["us-east/main"].unreachable_since_unix_ms, None);
    assert!(dr_watch::due(&s, T0 + 20_000, &lead(T0)).is_empty());
}

/// `world`, with a front-door agent in `global/edge` moving shop's traffic
/// and reporting us-east `healthy` (down since `T0` when not).
fn world_behind_a_front_door(healthy: bool) -> State {
    let mut s = world(true, 200);
    let edge = ClusterRef::new("global", "edge").unwrap();
    apply(
        &mut s,
        Command::AgentUp {
            cluster: edge.clone(),
            agent_version: "test".into(),
            task_kinds: vec!["traffic.move".into()],
            at_unix_ms: T0 - 60_000,
            session: 9,
            traffic_apps: vec!["shop".into()],
        },
    );
    apply(
        &mut s,
        Command::RegionHealthReported {
            from: edge,
            app: "shop".into(),
            regions: vec![
                RegionHealth {
                    region: "us-east".into(),
                    healthy,
                    detail: (!healthy).then(|| "tcp: connection refused".into()),
                },
                RegionHealth {
                    region: "eu-west".into(),
                    healthy: true,
                    detail: None,
                },
            ],
            at_unix_ms: T0,
        },
    );
    s
}

/// Behind a front door, the front door's probes are the other regions'
/// view of the app: while they still pass in us-east, its app serves and
/// only its agent is gone, so nothing fails over; once they fail, the
/// failover starts and its audit names what the probes saw. A report
/// from an agent that does not move the app's traffic is refused.
#[test]
fn a_region_the_front_door_still_reaches_does_not_fail_over() {
    let s = world_behind_a_front_door(true);
    assert!(
        dr_watch::due(&s, T0 + 60_000, &lead(T0)).is_empty(),
        "the front door still reaches us-east"
    );

    let mut s = world_behind_a_front_door(false);
    let due = dr_watch::due(&s, T0 + 10_000, &lead(T0));
    assert_eq!(due.len(), 1, "{due:?}");
    let Command::CreateOperation { audit, .. } = &due[0] else {
        panic!("{:?}", due[0]);
    };
    assert!(audit.parameters.contains("connection refused"), "{}", audit.parameters);

    // The view of a traffic agent that is itself down does not count: the
    // standby's view alone decides, as without a front door.
    let mut stale = world_behind_a_front_door(true);
    apply(
        &mut stale,
        Command::AgentDown {
            cluster: ClusterRef::new("global", "edge").unwrap(),
            at_unix_ms: T0,
            session: 9,
        },
    );
    assert_eq!(dr_watch::due(&stale, T0 + 10_000, &lead(T0)).len(), 1);

    let r = s.apply(Command::RegionHealthReported {
        from: cluster("eu-west"),
        app: "shop".into(),
        regions: vec![],
        at_unix_ms: T0,
    });
    assert!(r.error.is_some_and(|e| e.contains("does not move")));
}

/// A region's `since` is when its state last changed, not the latest
/// report.
#[test]
fn a_region_stays_down_since_the_report_that_changed_it() {
    let mut s = world_behind_a_front_door(false);
    let edge = ClusterRef::new("global", "edge").unwrap();
    let report = |healthy: bool, at: i64| Command::RegionHealthReported {
        from: edge.clone(),
        app: "shop".into(),
        regions: vec![RegionHealth {
            region: "us-east".into(),
            healthy,
            detail: None,
        }],
        at_unix_ms: at,
    };
    apply(&mut s, report(false, T0 + 5_000));
    assert_eq!(s.region_health["shop"]["us-east"].since_unix_ms, T0);
    apply(&mut s, report(true, T0 + 7_000));
    let v = &s.region_health["shop"]["us-east"];
    assert_eq!((v.healthy, v.since_unix_ms), (true, T0 + 7_000));
}

/// After a forced failover, us-east's agent comes back. The report it made
/// before its region was lost (a writable primary) fences nothing, even
/// dated after the agent's return by a leader whose clock ran ahead of the
/// one that marked it up; the first one it makes after coming back (on its
/// new session), if it still says so, does.
#[test]
fn a_stray_primary_is_fenced_on_what_its_agent_reports_after_coming_back() {
    let mut s = world(true, 200);
    failed_over_to_eu_west(&mut s);
    let mut stale = db(DbRole::Primary, None);
    stale.observed_at_unix_ms = T0 + 25_000;
    stale.session = 1;
    report(&mut s, "us-east", stale);
    apply(
        &mut s,
        Command::AgentUp {
            cluster: cluster("us-east"),
            agent_version: "test".into(),
            task_kinds: vec!["db.failover".into(), "app.maintenance".into()],
            at_unix_ms: T0 + 20_000,
            session: 7,
            traffic_apps: vec![],
        },
    );
    let fences = |s: &State, now: i64| {
        dr_watch::due(s, now, &lead(T0))
            .into_iter()
            .filter(|c| matches!(c, Command::CreateOperation { operation, .. } if operation.created_by == dr_watch::FENCE_ACTOR))
            .count()
    };
    assert_eq!(fences(&s, T0 + 20_500), 0, "fenced on a report from before the loss");
    let mut back = db(DbRole::Primary, None);
    back.observed_at_unix_ms = T0 + 21_000;
    back.session = 7;
    report(&mut s, "us-east", back);
    assert_eq!(fences(&s, T0 + 21_500), 1);
}
