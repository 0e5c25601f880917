//! Disaster recovery's view of the replicated state, shared by the control
//! API (`PlanFailover`, `Failover`) and the leader's watch (automatic
//! failover, stray primaries): what `cutover_shared::dr::plan` reads, and
//! the failover a plan turns into. Pure functions of the state and a clock
//! reading, so an operator's failover and an automatic one decide alike.

use cutover_shared::app::AppSpec;
use cutover_shared::backup::BackupEntry;
use cutover_shared::domain::{AgentState, ClusterRef};
use cutover_shared::dr::{self, ClusterView, DataSource, FailoverPlan, PlanError, PlanInput};
use cutover_shared::operation::{FailoverSpec, RestoreSource};
use cutover_shared::task::TaskKind;

use crate::state::State;

/// Each cluster of `app` with its agent's state and database, in the app's
/// order.
pub fn cluster_views(s: &State, app: &AppSpec) -> Vec<ClusterView> {
    let dbs = s.db_status.get(&app.name);
    app.clusters
        .iter()
        .map(|c| {
            let cluster = c.cluster_ref();
            let key = cluster.to_string();
            let agent = s.agents.get(&key);
            let database = dbs.and_then(|d| d.get(&key)).cloned();
            // A lost agent's region was last seen in its last database
            // report (it is marked down only heartbeats later); a server
            // its agent cannot reach, at the first report that said so.
            let lost_at_unix_ms = match agent {
                Some(a) if a.state == AgentState::Down => Some(
                    database
                        .as_ref()
                        .map(|d| d.unreachable_since_unix_ms.unwrap_or(d.observed_at_unix_ms))
                        .map_or(a.since_unix_ms, |seen| seen.min(a.since_unix_ms)),
                ),
                _ => database.as_ref().and_then(|d| d.unreachable_since_unix_ms),
            };
            ClusterView {
                agent_up: agent.is_some_and(|a| a.state == AgentState::Up),
                database,
                lost_at_unix_ms,
                cluster,
            }
        })
        .collect()
}

/// The app's backups, any cluster.
pub fn app_backups<'a>(s: &'a State, app: &str) -> Vec<&'a BackupEntry> {
    s.backups.values().filter(|b| b.app == app).collect()
}

/// The image serving in `target` (its active color's), else the one
/// serving in the app's primary cluster, else in any cluster: what a drill
/// starts as its scratch color.
pub fn serving_image(s: &State, app: &AppSpec, target: &ClusterRef) -> Option<String> {
    let statuses = s.app_status.get(&app.name)?;
    let serving = |c: &ClusterRef| {
        let st = statuses.get(&c.to_string())?;
        let active = st.active?;
        st.colors
            .iter()
            .find(|x| x.color == active && !x.image.is_empty())
            .map(|x| x.image.clone())
    };
    let views = cluster_views(s, app);
    let primary = dr::primaries(&views).first().map(|p| p.cluster.clone());
    serving(target)
        .or_else(|| primary.as_ref().and_then(serving))
        .or_else(|| app.clusters.iter().find_map(|c| serving(&c.cluster_ref())))
}

/// The unfinished operation on any cluster of `app`, if there is one.
pub fn running_on(s: &State, app: &AppSpec) -> Option<String> {
    app.clusters
        .iter()
        .find_map(|c| s.running_operation(&app.name, &c.cluster_ref()).map(str::to_owned))
}

/// The failover runbook for `app` now.
pub fn plan(s: &State, app: &AppSpec, to: Option<&str>, now: i64) -> Result<FailoverPlan, PlanError> {
    dr::plan(&PlanInput {
        app,
        clusters: cluster_views(s, app),
        backups: app_backups(s, &app.name),
        running_operation: running_on(s, app),
        to,
        now_unix_ms: now,
        drills: s.drills.get(&app.name).map_or(&[], Vec::as_slice),
    })
}

/// The failover `plan` calls for, under the app's next epoch: the old
/// primary is fenced when its agent is up; the new one is verified with
/// the gates of the color serving there. `None` when the plan has no
/// target.
pub fn failover_spec(
    s: &State,
    app: &AppSpec,
    plan: &FailoverPlan,
    force: bool,
    accept_data_loss: bool,
) -> Option<FailoverSpec> {
    let to = plan.to.clone()?;
    let fence = plan
        .from
        .as_ref()
        .is_some_and(|f| s.agents.get(&f.to_string()).is_some_and(|a| a.state == AgentState::Up));
    let statuses = s.app_status.get(&app.name);
    let verify_color = statuses.and_then(|st| st.get(&to.to_string())).and_then(|st| st.active);
    // Nothing serves in `to`: deploy what the old primary's region served
    // (else any region), so traffic has somewhere to go.
    let serving = |c: &ClusterRef| {
        let st = statuses?.get(&c.to_string())?;
        let active = st.active?;
        st.colors.iter().find(|x| x.color == active).map(|x| x.image.clone())
    };
    let deploy_image = verify_color.is_none().then(|| {
        plan.from
            .as_ref()
            .and_then(serving)
            .or_else(|| app.clusters.iter().find_map(|c| serving(&c.cluster_ref())))
    });
    Some(FailoverSpec {
        from: plan.from.clone(),
        epoch: s.dr_epochs.get(&app.name).map_or(0, |e| e.epoch) + 1,
        fence,
        verify_color,
        deploy_image: deploy_image.flatten(),
        restore: match &plan.source {
            Some(DataSource::Backup { id, .. }) => s.backups.get(id).map(restore_source),
            _ => None,
        },
        data_loss_window_ms: plan.data_loss_window_ms,
        wal_behind_bytes: plan.wal_behind_bytes,
        force,
        accept_data_loss,
        fence_only: false,
        rejoin: false,
        rejoin_only: false,
        traffic: traffic_agent(s, &app.name, &to, plan.from.as_ref()),
        to,
    })
}

/// The agent that moves `app`'s traffic: `to`'s own when it manages the
/// app's traffic (it survives the region being left), else the first
/// other one that is up outside `from`'s region, else `from`'s region's.
pub fn traffic_agent(s: &State, app: &str, to: &ClusterRef, from: Option<&ClusterRef>) -> Option<ClusterRef> {
    let moves = |a: &cutover_shared::domain::AgentRecord| {
        a.state == AgentState::Up
            && a.traffic_apps.iter().any(|x| x == app)
            && a.task_kinds.iter().any(|k| k == TaskKind::TrafficMove.as_str())
    };
    if s.agents.get(&to.to_string()).is_some_and(moves) {
        return Some(to.clone());
    }
    let left = |a: &&cutover_shared::domain::AgentRecord| from.is_some_and(|f| f.region == a.cluster.region);
    s.agents
        .values()
        .filter(|a| moves(a))
        .min_by_key(|a| left(a))
        .map(|a| a.cluster.clone())
}

/// The blockers of `plan` that `force` and `accept_data_loss` do not
/// override, each with the flag that would, if any.
pub fn standing_blockers(plan: &FailoverPlan, force: bool, accept_data_loss: bool) -> Vec<String> {
    plan.blockers
        .iter()
        .filter(|b| match b.overridden_by {
            Some("--force") => !force,
            Some("--accept-data-loss") => !accept_data_loss,
            _ => true,
        })
        .map(|b| match b.overridden_by {
            Some(flag) => format!("{} (override: {flag})", b.reason),
            None => b.reason.clone(),
        })
        .collect()
}

/// A catalog entry as what a failover or a drill restores.
fn restore_source(b: &BackupEntry) -> RestoreSource {
    RestoreSource {
        backup_id: b.id.clone(),
        object: b.object.clone(),
        table_rows: b.table_rows.clone(),
        taken_at_unix_ms: b.started_at_unix_ms,
    }
}

/// What a drill into `target` copies into its scratch database: `None`
/// for the target's own database (a standby, or the primary); the newest
/// validated backup for a cold standby (configured as a standby, its
/// server not replicating and fenced until a failover claims it), whose
/// own data is not the app's. Refused for a cold standby when there is no
/// validated backup.
pub fn drill_restore(s: &State, app: &AppSpec, target: &ClusterRef) -> Result<Option<RestoreSource>, String> {
    let cold = s
        .db_status
        .get(&app.name)
        .and_then(|d| d.get(&target.to_string()))
        .is_some_and(|d| d.configured_role == dr::DbRole::Standby && d.role == Some(dr::DbRole::Primary) && d.fenced);
    if !cold {
        return Ok(None);
    }
    let newest = cutover_shared::backup::newest_validated(app_backups(s, &app.name));
    newest.map(|b| Some(restore_source(b))).ok_or_else(|| {
        format!(
            "{target} has no standby of {} (its database is a cold standby) and {} has no validated backup to drill with",
            app.name, app.name
        )
    })
}
