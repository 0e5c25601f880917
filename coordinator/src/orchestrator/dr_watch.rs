//! The leader's watch over primaries: automatic failover, and primaries a
//! failover superseded.
//!
//! Automatic failover (an app's `dr.automatic`): once the primary has been
//! lost for `dr.failover_after_secs` (its cluster's agent down, or its
//! agent up but reporting its server unreachable), the standby's region
//! agrees (its WAL receiver does not stream: it cannot reach the primary's
//! server either; a standby still streaming means only the agent is gone),
//! the front door agrees when the app has one (its traffic agent is up and
//! the region fails the probes of its `[[traffic.apps]]` entry: a region
//! still answering them is serving, only its agent is gone),
//! no failover of the app ran within `dr.cooldown_secs`, and the failover
//! plan has no blocker other than the old region being unreachable (so
//! the standby's lag is within `max_data_loss`), the leader starts the
//! failover the plan calls for. An unreachable server cannot be fenced, so
//! it is superseded by the epoch instead (and fenced as a stray primary if
//! it comes back). The failover is started
//! (actor `cutover/dr-auto`; its id derived from the app and the epoch, so
//! two leaders propose one decision). With the agents' lease shorter than
//! `failover_after_secs`, the lost region's primary fenced itself before.
//!
//! A forced failover cannot fence the old primary (its region is gone).
//! When that region comes back, its agent reports the database as a
//! writable primary although the app's epoch names another cluster. `due`
//! answers with an operation that fences it (`fence_only`: its app in
//! maintenance, its server read-only), under the current epoch, so it
//! stays fenced until an operator rejoins it. Like the backup schedules,
//! a pure function of the replicated state and a clock reading.

use cutover_shared::domain::{AgentState, Operation, OperationKind};
use cutover_shared::dr::DbRole;
use cutover_shared::operation::{FailoverSpec, OperationSpec};

use crate::state::{AuditDraft, Command, State};

/// This node's term as leader, by its own clock: what it needs to read
/// times other leaders stamped into the state without trusting that their
/// clocks agreed with its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leadership {
    /// When it took over.
    pub since_unix_ms: i64,
    /// The latest time stamped into the state when it took over
    /// ([`State::latest_stamp_unix_ms`]), by whichever leader stamped it.
    pub inherited_unix_ms: i64,
    /// The Raft term it leads in: a time stamped in this term is its own
    /// clock's.
    pub term: u64,
    /// The cluster clock as this leader reads it now.
    pub clock: ClusterTime,
}

/// The cluster clock ([`crate::cluster_clock`]) as the leader reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterTime {
    /// Its reading now.
    Now(i64),
    /// Not yet: this leader's first tick (or the tick that pins a new
    /// epoch) has not been applied; it is proposed within a second.
    Pending,
    /// The cluster cannot tick: a member runs a release without the clock
    /// (a rolling upgrade). Wall clocks are read as [`Leadership::local`].
    Unavailable,
}

impl Leadership {
    /// The leader of `term` that took over at `since_unix_ms` (its clock)
    /// the state `s`. Its cluster clock reading starts
    /// [`ClusterTime::Pending`].
    pub fn taking_over(s: &State, term: u64, since_unix_ms: i64) -> Self {
        Leadership {
            since_unix_ms,
            inherited_unix_ms: s.latest_stamp_unix_ms(),
            term,
            clock: ClusterTime::Pending,
        }
    }

    /// When a wait that began at `stamped_unix_ms`, stamped by the leader
    /// of term `stamped_in`, counts from on this leader's clock: the stamp
    /// itself when this leader made it, else its takeover (the stamp was
    /// made before it: an earlier term's entries were all proposed before
    /// this term's election), so another leader's clock, ahead or behind,
    /// neither shortens nor lengthens the wait past one takeover.
    pub fn counts_from(&self, stamped_unix_ms: i64, stamped_in: u64) -> i64 {
        if stamped_in == self.term {
            stamped_unix_ms.max(self.since_unix_ms)
        } else {
            self.since_unix_ms
        }
    }

    /// At most how far this leader's clock runs ahead of the clock that
    /// stamped the state it took over (0 when behind). The inherited stamp
    /// was made before the takeover, so takeover minus stamp is the skew
    /// plus the real time between them: it errs toward waiting, by about
    /// an election's length.
    pub fn ahead_ms(&self) -> i64 {
        self.since_unix_ms.saturating_sub(self.inherited_unix_ms).max(0)
    }

    /// A stamped time on this leader's clock: one stamped before it took
    /// over moves later by [`Self::ahead_ms`], its own stamps stay. Never
    /// earlier than `t`, so a wait counted from it is never shorter than
    /// one counted from `t`. When `t` and the state's latest stamp came
    /// from the same clock, time elapsed since `local(t)` never exceeds the
    /// real time since `t`. Not a bound in general: with stamps from two
    /// earlier leaders whose clocks disagree (the latest from one ahead),
    /// `ahead_ms` underestimates the skew to the other's stamps, and a
    /// lease lapse makes this node take over again with its own stamps
    /// latest (`ahead_ms` near 0). The cluster clock is the sound reading;
    /// this one serves only while it is [`ClusterTime::Unavailable`].
    pub fn local(&self, stamped_unix_ms: i64) -> i64 {
        if stamped_unix_ms < self.since_unix_ms {
            stamped_unix_ms.saturating_add(self.ahead_ms())
        } else {
            stamped_unix_ms
        }
    }
}

/// Who stray primaries are fenced by.
pub const FENCE_ACTOR: &str = "cutover/dr-fence";
/// Who automatic failovers are started by.
pub const AUTO_ACTOR: &str = "cutover/dr-auto";

/// The automatic failovers the state calls for now. Both the loss and the
/// last failover (for the cooldown) were stamped by some earlier leader,
/// by its clock; a leader whose clock runs ahead of that one's would see
/// an outage of seconds as one of hours and fail over at once, or a
/// failover of a minute ago as one past the cooldown and fail over again.
/// The loss counts from its stamp when this leader made it (in its term),
/// else from this leader's takeover ([`Leadership::counts_from`]): sound
/// whatever the clocks, and a new leader waits at most one
/// `failover_after_secs` longer, however far its clock is behind. The cooldown is read on the cluster
/// clock, which never counts more time than has passed (see
/// [`crate::cluster_clock`]); only while a member cannot tick (a rolling
/// upgrade) through [`Leadership::local`], which is not a bound when
/// several clocks stamped the state. A database's
/// `unreachable_since_unix_ms` is leader-stamped (reports are stamped on
/// arrival, never with the agent's clock).
fn automatic(s: &State, now: i64, lead: &Leadership) -> Vec<Command> {
    let mut out = Vec::new();
    for spec in s.apps.values().filter(|a| a.dr.automatic) {
        let views = crate::dr::cluster_views(s, spec);
        let Some(primary) = cutover_shared::dr::primaries(&views).first().map(|p| p.cluster.clone()) else {
            continue;
        };
        let Some(agent) = s.agents.get(&primary.to_string()) else {
            continue;
        };
        let unreachable_since = views
            .iter()
            .find(|v| v.cluster == primary)
            .and_then(|v| v.database.as_ref())
            .and_then(|d| d.unreachable_since_unix_ms.map(|at| (at, d.unreachable_since_term)));
        let lost_since = match (agent.state, unreachable_since) {
            (AgentState::Down, _) => lead.counts_from(agent.since_unix_ms, agent.since_term),
            (_, Some((since, term))) => lead.counts_from(since, term),
            _ => continue,
        };
        // The other regions' view of the app: a traffic agent that is up
        // and whose probes still reach the region sees it serving; only
        // its agent is gone.
        let probed = s
            .region_health
            .get(&spec.name)
            .and_then(|m| m.get(&primary.region))
            .filter(|v| s.agents.get(&v.by).is_some_and(|a| a.state == AgentState::Up));
        if agent.state == AgentState::Down && probed.is_some_and(|v| v.healthy) {
            continue;
        }
        let down_for = now.saturating_sub(lost_since);
        let after_ms = i64::try_from(spec.dr.failover_after_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        if down_for < after_ms {
            continue;
        }
        if cooling_down(s, &spec.name, spec.dr.cooldown_secs, now, lead) {
            continue;
        }
        let Ok(plan) = crate::dr::plan(s, spec, None, now) else {
            continue;
        };
        // The old region being unreachable is why this runs; anything
        // else (a lagging standby, a running operation) waits for people.
        if !crate::dr::standing_blockers(&plan, true, false).is_empty()
            || !matches!(plan.source, Some(cutover_shared::dr::DataSource::Standby { .. }))
        {
            continue;
        }
        // The other region's view: a standby whose WAL receiver still
        // streams reaches the primary's server, so the primary lives.
        let streaming = plan.to.as_ref().and_then(|to| {
            views
                .iter()
                .find(|v| &v.cluster == to)
                .and_then(|v| v.database.as_ref())
                .and_then(|d| d.streaming)
        });
        if streaming == Some(true) {
            continue;
        }
        let Some(mut failover) = crate::dr::failover_spec(s, spec, &plan, true, false) else {
            continue;
        };
        if agent.state != AgentState::Down {
            // Its agent is up but cannot reach the server: nothing to fence.
            failover.fence = false;
        }
        let mut targets = vec![failover.to.clone()];
        if failover.fence
            && let Some(f) = &failover.from
        {
            targets.push(f.clone());
        }
        let id = super::schedule::derived_id(&format!("dr-auto/{}/{}", spec.name, failover.epoch));
        if s.operations.contains_key(&id) {
            continue;
        }
        let parameters = serde_json::json!({
            "app": spec.name, "from": primary.to_string(), "to": failover.to.to_string(),
            "epoch": failover.epoch, "lost_ms": down_for,
            "agent_up": agent.state != AgentState::Down,
            "data_loss_window_ms": failover.data_loss_window_ms,
            "region_probes": probed.map(|v| serde_json::json!({
                "by": v.by, "healthy": v.healthy, "detail": v.detail, "since_unix_ms": v.since_unix_ms,
            })),
        })
        .to_string();
        out.push(Command::CreateOperation {
            audit: AuditDraft {
                at_unix_ms: now,
                actor: AUTO_ACTOR.into(),
                action: "AutomaticFailover".into(),
                parameters,
                outcome: "ok".into(),
            },
            operation: new_operation(id, &spec.name, targets, failover, AUTO_ACTOR, now),
            fix_inputs: true,
        });
    }
    out
}

/// Whether `app`'s last failover ran within `cooldown_secs`.
fn cooling_down(s: &State, app: &str, cooldown_secs: u64, now: i64, lead: &Leadership) -> bool {
    let Some(e) = s.dr_epochs.get(app) else {
        return false;
    };
    let cooldown_ms = i64::try_from(cooldown_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    if cooldown_ms == 0 {
        return false;
    }
    match lead.clock {
        ClusterTime::Now(clock) => s
            .clock
            .epoch(app, e.epoch)
            .is_none_or(|at| clock.saturating_sub(at) < cooldown_ms),
        ClusterTime::Pending => true,
        ClusterTime::Unavailable => now.saturating_sub(lead.local(e.at_unix_ms)) < cooldown_ms,
    }
}

fn new_operation(
    id: String,
    app: &str,
    targets: Vec<cutover_shared::domain::ClusterRef>,
    failover: FailoverSpec,
    by: &str,
    now: i64,
) -> Operation {
    let spec = OperationSpec {
        failover: Some(Box::new(failover)),
        ..OperationSpec::default()
    };
    Operation::new_app(id, OperationKind::Failover, app, targets, spec, by, now)
}

/// A fence that failed is tried again after this.
const RETRY_MS: i64 = 60_000;

/// The automatic failovers and fence operations the state calls for now,
/// on leader `lead`.
pub fn due(s: &State, now: i64, lead: &Leadership) -> Vec<Command> {
    let mut out = automatic(s, now, lead);
    for (app, epoch) in &s.dr_epochs {
        let Some(primary) = &epoch.primary else { continue };
        let Some(dbs) = s.db_status.get(app) else { continue };
        for (key, d) in dbs {
            if key == &primary.to_string() || d.role != Some(DbRole::Primary) || d.fenced {
                continue;
            }
            let Some(agent) = s.agents.get(key) else { continue };
            if agent.state != AgentState::Up || !agent.task_kinds.iter().any(|k| k == "db.failover") {
                continue;
            }
            // Only what the agent observed since it came back: the report
            // it made before its region was lost still says "primary",
            // and a fence started on that would run against a server that
            // may not even be up (and hold the app against a rejoin). The
            // report's session says which registration's stream carried it
            // (its time and the agent's return may be two leaders' clocks);
            // a report no session stamped (0, from a release before
            // sessions were stamped) says nothing about which.
            if d.session == 0 || d.session != agent.session {
                continue;
            }
            let Some(cluster) = key
                .split_once('/')
                .and_then(|(r, c)| cutover_shared::domain::ClusterRef::new(r, c).ok())
            else {
                continue;
            };
            if s.running_operation(app, &cluster).is_some() {
                continue;
            }
            let id = super::schedule::derived_id(&format!("dr-fence/{app}/{key}/{}/{}", epoch.epoch, now / RETRY_MS));
            if s.operations.contains_key(&id) {
                continue;
            }
            let fence = FailoverSpec {
                from: Some(cluster.clone()),
                to: primary.clone(),
                epoch: epoch.epoch,
                fence: true,
                verify_color: None,
                data_loss_window_ms: None,
                wal_behind_bytes: None,
                force: false,
                accept_data_loss: false,
                fence_only: true,
                rejoin: false,
                rejoin_only: false,
                traffic: None,
                deploy_image: None,
                restore: None,
            };
            let operation = new_operation(id, app, vec![cluster.clone()], fence, FENCE_ACTOR, now);
            out.push(Command::CreateOperation {
                audit: AuditDraft {
                    at_unix_ms: now,
                    actor: FENCE_ACTOR.into(),
                    action: "FenceStrayPrimary".into(),
                    parameters: serde_json::json!({
                        "app": app, "cluster": key, "epoch": epoch.epoch, "primary": primary.to_string(),
                    })
                    .to_string(),
                    outcome: "ok".into(),
                },
                operation,
                fix_inputs: true,
            });
        }
    }
    out
}
