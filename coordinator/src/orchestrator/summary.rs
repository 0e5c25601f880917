//! What an ended operation says about itself: its summary line.

use cutover_shared::domain::{ClusterRef, Operation, TaskRecord, TaskState};
use cutover_shared::release::Bundle;
use cutover_shared::task::TaskKind;
use cutover_shared::task::outputs::{FailoverOutputs, TrafficOutputs};

use super::{CANARY, Inputs, MIGRATE, TRAFFIC, compensate, is_compensation};

/// Why a failed or aborted operation ended, and what was put back.
pub(super) fn failure(op: &Operation, failure: Option<&TaskRecord>, inputs: &Inputs<'_>) -> String {
    let reversible = inputs.bundle.is_some_and(Bundle::reversible);
    let migrated = compensate::migrated(op);
    let mut summary = match (failure, &op.control.aborted_by) {
        (Some(failed), _) => {
            let why = failed.result.as_ref().map_or("no result", |r| r.message.as_str());
            let why: String = why
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            format!("{} in {} failed: {why}", failed.spec.kind, failed.spec.target)
        }
        (None, Some(who)) => format!("aborted by {who}"),
        (None, None) => unreachable!("checked above"),
    };
    let back: Vec<String> = op
        .tasks
        .iter()
        .filter(|t| is_compensation(t))
        .map(|t| {
            let ok = t.state == TaskState::Succeeded;
            match (t.spec.kind.as_str(), ok) {
                (MIGRATE, true) => format!(
                    "{} schema reverted to version {}",
                    t.spec.target,
                    match cutover_shared::task::TaskParams::from_wire(&t.spec.kind, &t.spec.params) {
                        Ok(cutover_shared::task::TaskParams::DbMigrate(m)) => m.target.unwrap_or(0),
                        _ => 0,
                    }
                ),
                (MIGRATE, false) => format!("{} schema NOT reverted", t.spec.target),
                (CANARY, true) => format!("{} canary weight back to 0", t.spec.target),
                (CANARY, false) => format!("{} canary weight NOT back to 0", t.spec.target),
                (TRAFFIC, true) => format!("held requests released by {}", t.spec.target),
                (TRAFFIC, false) => format!("held requests NOT released by {}", t.spec.target),
                (_, true) => format!("{} switched back", t.spec.target),
                (_, false) => format!("{} NOT switched back", t.spec.target),
            }
        })
        .collect();
    if !reversible {
        for t in &migrated {
            let at = t
                .result
                .as_ref()
                .and_then(|r| cutover_shared::task::outputs::MigrateOutputs::from_wire(&r.outputs).to_version);
            summary.push_str(&format!(
                "; {} schema left at version {} (the release's migrations are not all reversible)",
                t.spec.target,
                at.map_or("?".to_owned(), |v| v.to_string())
            ));
        }
    }
    if !back.is_empty() {
        summary.push_str(&format!("; rolled back: {}", back.join(", ")));
    }
    if let Some(f) = &op.spec.failover
        && compensate::promotion_attempted(op)
    {
        summary.push_str(&format!(
            "; the promotion in {} was attempted, so nothing was undone: {} stays fenced at epoch {} \
             (check {} with `cutover dr status`, then fail over again)",
            f.to,
            f.from
                .as_ref()
                .map_or_else(|| "the old primary".to_owned(), ToString::to_string),
            f.epoch,
            f.to
        ));
    }
    summary
}

/// A successful failover's report: RTO (the decision to the new primary
/// verified) and the data-loss window, with each step.
fn failover(op: &Operation, f: &cutover_shared::operation::FailoverSpec) -> String {
    let rejoined = |from: Option<&ClusterRef>| {
        let method = op
            .tasks
            .iter()
            .filter(|t| Some(&t.spec.target) == from && t.spec.kind == TaskKind::DbFailover.as_str())
            .filter_map(|t| t.result.as_ref())
            .filter_map(|r| FailoverOutputs::from_wire(&r.outputs).method)
            .next_back();
        format!(
            "{} rejoined as a standby of {} ({})",
            from.map_or_else(|| "?".to_owned(), ToString::to_string),
            f.to,
            match method.as_deref() {
                Some("rewind") => "pg_rewind",
                Some("base-backup") => "a fresh base backup",
                _ => "?",
            }
        )
    };
    if f.rejoin_only {
        return rejoined(f.from.as_ref());
    }
    if f.fence_only {
        return format!(
            "fenced {}, a primary left over from before epoch {} (whose primary is {})",
            f.from.as_ref().map_or_else(|| "?".to_owned(), ToString::to_string),
            f.epoch,
            f.to
        );
    }
    // Recovered once the new primary is verified: a rejoin of the old
    // one afterwards is not part of the outage.
    let ended = op
        .tasks
        .iter()
        .filter(|t| t.spec.target == f.to || Some(&t.spec.target) == f.traffic.as_ref())
        .filter_map(|t| t.result.as_ref().map(|r| r.finished_at_unix_ms))
        .max()
        .unwrap_or(op.created_at_unix_ms);
    let rto_ms = u64::try_from(ended.saturating_sub(op.created_at_unix_ms)).unwrap_or(0);
    let promoted = op
        .tasks
        .iter()
        .filter(|t| t.spec.target == f.to && t.spec.kind == cutover_shared::task::TaskKind::DbFailover.as_str())
        .filter_map(|t| t.result.as_ref())
        .map(|r| FailoverOutputs::from_wire(&r.outputs))
        .next_back();
    let loss = if f.fence {
        "nothing (the old primary was fenced and the standby replayed its last write)".to_owned()
    } else {
        let bytes = f.wal_behind_bytes.filter(|b| *b > 0).map_or_else(String::new, |b| {
            format!(", at least {b} bytes of WAL the standby never replayed")
        });
        match f.data_loss_window_ms {
            Some(w) => format!(
                "the writes of at most the last {}{bytes} (the old primary could not be fenced)",
                cutover_shared::dr::human_ms(w)
            ),
            None => format!("unknown{bytes} (the old primary could not be fenced)"),
        }
    };
    let rejoin = if f.rejoin {
        format!("; {}", rejoined(f.from.as_ref()))
    } else {
        String::new()
    };
    let traffic = op
        .tasks
        .iter()
        .filter(|t| t.spec.kind == TRAFFIC && t.state == TaskState::Succeeded)
        .filter_map(|t| t.result.as_ref())
        .map(|r| TrafficOutputs::from_wire(&r.outputs))
        .next_back()
        .map_or_else(String::new, |o| {
            let held = match (o.released, o.held_max_ms) {
                (Some(n), Some(ms)) if n > 0 => format!(", {n} held requests released, longest wait {ms} ms"),
                _ => String::new(),
            };
            format!(
                "; traffic sent to {} ({}{held})",
                o.region.as_deref().unwrap_or("?"),
                o.driver.as_deref().unwrap_or("?")
            )
        });
    format!(
        "failed over {} to {} at epoch {} in {} (RTO); data lost: {loss}; new primary at {}{traffic}{rejoin}",
        f.from
            .as_ref()
            .map_or_else(|| "(no reported primary)".to_owned(), ToString::to_string),
        f.to,
        f.epoch,
        cutover_shared::dr::human_ms(rto_ms),
        promoted
            .and_then(|p| p.lsn)
            .map_or_else(|| "?".to_owned(), cutover_shared::dr::format_lsn)
    )
}

/// The steps' results of a successful operation, or the failed steps of a
/// health check.
pub(super) fn finished(op: &Operation) -> (TaskState, String) {
    let failed: Vec<String> = op
        .tasks
        .iter()
        .filter(|t| t.state == TaskState::Failed)
        .map(|t| format!("{} in {} failed", t.spec.kind, t.spec.target))
        .collect();
    if !failed.is_empty() {
        return (TaskState::Failed, failed.join("; "));
    }
    if let Some(f) = &op.spec.failover {
        return (TaskState::Succeeded, failover(op, f));
    }
    let summary = op
        .tasks
        .iter()
        .filter_map(|t| {
            t.result
                .as_ref()
                .map(|r| format!("{} {}: {}", t.spec.kind, t.spec.target, r.message))
        })
        .collect::<Vec<_>>()
        .join("; ");
    (TaskState::Succeeded, summary)
}
