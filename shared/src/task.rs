//! The task contract between the coordinator and its agents: which kinds of
//! task exist, and one typed parameter set per kind, plus the outputs the
//! coordinator reads back. The orchestrator builds tasks only through
//! [`TaskParams`] and the agent decodes them only through it, so a misspelled
//! key or a missing field is a compile error on one side and a clear task
//! failure, never a silent default, on the other.
//!
//! On the wire (`agent.proto`'s `TaskSpec.params`) and in the replicated log
//! a task's parameters stay a string map: that keeps the public API stable
//! and lets logs written by earlier versions load. [`TaskParams::to_wire`]
//! and [`TaskParams::from_wire`] are the only code that knows the keys.
//!
//! Large, shared inputs travel by content address: an app task names the app
//! definition it acts with by [`spec_digest`], a migration names its bundle
//! by [`crate::release::Bundle::digest`]. The coordinator stores each once
//! and attaches the content (`spec`, `bundle`) only when it sends a task to
//! its agent ([`WireParams::hydrate`]); the agent checks the content against
//! the digest before using it.

use std::collections::BTreeMap;
use std::fmt;

use sha2::{Digest, Sha256};

use crate::app::{AppSpec, Color};
use crate::backup::{BackupAction, BackupObject};
use crate::release::Bundle;

/// A task's parameters as they travel: a string map.
pub type WireParams = BTreeMap<String, String>;

/// Why a task's parameters could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    #[error("unknown task kind {0:?}")]
    UnknownKind(String),
    #[error("task parameter {0:?} is missing")]
    Missing(&'static str),
    #[error("task parameter {key:?} is invalid: {why}")]
    Invalid { key: &'static str, why: String },
    #[error("task content {what} does not match its digest {digest}")]
    DigestMismatch { what: &'static str, digest: String },
}

/// Every kind of task an agent can be asked to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskKind {
    /// Diagnostic: does nothing.
    Noop,
    /// Diagnostic: answers with its message, after an optional delay.
    Echo,
    /// Write an image to a color of an app and wait until it is ready.
    AppDeploy,
    /// Run an app's health probes and load probe against a color.
    AppGates,
    /// Point an app's stable address at a named color.
    AppSwitch,
    /// Watch the serving color for a while after a switch.
    AppBake,
    /// One canary step: send a percent of the cluster's traffic to the new
    /// (still inactive) color and judge it under that traffic, or take the
    /// percent back to 0.
    AppCanary,
    /// Run an app's metric checks now against the serving color
    /// (`cutover analysis run`).
    AppAnalysis,
    /// Put an app in or out of maintenance: while on, it takes no traffic
    /// (so makes no writes), in either color.
    AppMaintenance,
    /// Show, plan, apply or revert an app's database migrations.
    DbMigrate,
    /// Back up an app's database to the object store, or validate or
    /// restore a backup.
    DbBackup,
    /// Disaster recovery on an app's database: fence it (read-only, its
    /// sessions ended), lift a fence, or promote a standby; each stamped
    /// with the app's primary epoch.
    DbFailover,
    /// A failover rehearsal in this region: clone the app's database into
    /// a scratch database, start the release as a scratch color that takes
    /// no traffic, run the gates against it, measure, tear it all down.
    DrDrill,
    /// Move an app's traffic between regions with the agent's traffic
    /// driver (the built-in front door, Route 53), or hold and release its
    /// new requests around a failover; stamped with the app's primary epoch.
    TrafficMove,
}

impl TaskKind {
    /// Every kind, for listings and exhaustive tests.
    pub const ALL: [TaskKind; 14] = [
        TaskKind::Noop,
        TaskKind::Echo,
        TaskKind::AppDeploy,
        TaskKind::AppGates,
        TaskKind::AppSwitch,
        TaskKind::AppBake,
        TaskKind::AppCanary,
        TaskKind::AppAnalysis,
        TaskKind::AppMaintenance,
        TaskKind::DbMigrate,
        TaskKind::DbBackup,
        TaskKind::DbFailover,
        TaskKind::DrDrill,
        TaskKind::TrafficMove,
    ];

    /// The kind's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Noop => "noop",
            TaskKind::Echo => "echo",
            TaskKind::AppDeploy => "app.deploy",
            TaskKind::AppGates => "app.gates",
            TaskKind::AppSwitch => "app.switch",
            TaskKind::AppBake => "app.bake",
            TaskKind::AppCanary => "app.canary",
            TaskKind::AppAnalysis => "app.analysis",
            TaskKind::AppMaintenance => "app.maintenance",
            TaskKind::DbMigrate => "db.migrate",
            TaskKind::DbBackup => "db.backup",
            TaskKind::DbFailover => "db.failover",
            TaskKind::DrDrill => "dr.drill",
            TaskKind::TrafficMove => "traffic.move",
        }
    }

    pub fn parse(s: &str) -> Option<TaskKind> {
        TaskKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Kinds an operator may run ad hoc (`RunTask`): they change nothing
    /// and need no lock, gate or release. Later read-only probes join them.
    pub fn is_diagnostic(self) -> bool {
        matches!(self, TaskKind::Noop | TaskKind::Echo)
    }

    /// The verb that does this kind's job, for refusals of ad-hoc runs:
    /// app and database tasks only run inside the operations that gate and
    /// lock them.
    pub fn verb(self) -> &'static str {
        match self {
            TaskKind::Noop | TaskKind::Echo => "cutover task run",
            TaskKind::AppDeploy | TaskKind::AppGates | TaskKind::AppBake | TaskKind::AppCanary => "cutover deploy",
            TaskKind::AppSwitch => "cutover switch (or cutover rollback)",
            TaskKind::AppAnalysis => "cutover analysis run",
            TaskKind::DbMigrate => "cutover migrate",
            TaskKind::DbBackup | TaskKind::AppMaintenance => "cutover backup",
            TaskKind::DbFailover | TaskKind::TrafficMove => "cutover dr failover",
            TaskKind::DrDrill => "cutover dr drill",
        }
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The content address of an app definition: SHA-256 over its canonical
/// JSON (struct fields in declaration order, maps sorted).
pub fn spec_digest(spec: &AppSpec) -> String {
    let json = serde_json::to_vec(spec).unwrap_or_default();
    let d = Sha256::digest(&json);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The app a task acts on and the definition (by digest) it acts with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppRef {
    pub app: String,
    /// [`spec_digest`] of the definition in force when the operation was
    /// created. Empty only for tasks from logs written before digests.
    pub spec_digest: String,
}

/// `echo`'s parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EchoParams {
    pub message: String,
    pub delay_ms: u64,
    pub fail: bool,
}

/// What a migration task does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrateAction {
    Status,
    Plan,
    Up,
    Down,
}

impl MigrateAction {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrateAction::Status => "status",
            MigrateAction::Plan => "plan",
            MigrateAction::Up => "up",
            MigrateAction::Down => "down",
        }
    }
    pub fn parse(s: &str) -> Option<MigrateAction> {
        [
            MigrateAction::Status,
            MigrateAction::Plan,
            MigrateAction::Up,
            MigrateAction::Down,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
    }
}

/// `db.migrate`'s parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrateParams {
    pub app: AppRef,
    pub action: MigrateAction,
    /// The release whose migrations these are.
    pub image: String,
    /// [`Bundle::digest`] of the release's migrations (empty for tasks from
    /// logs that carried the bundle inline).
    pub bundle_digest: String,
    /// `up` to / `down` to this version.
    pub target: Option<i64>,
    pub dry_run: bool,
    /// Undoes an earlier step of the same operation after a failure.
    pub compensate: bool,
}

/// What a `db.failover` task does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailoverAction {
    /// Make the database refuse writes (`default_transaction_read_only`,
    /// every other session of it ended) and report its final WAL position.
    Fence,
    /// Lift a fence (a failover that failed before it promoted anything).
    Unfence,
    /// Promote a standby, once it replayed up to `wait_for_lsn`, and wait
    /// until it accepts writes.
    Promote,
    /// Rebuild a superseded primary as a standby of `source` (the epoch's
    /// primary): stop the server, `pg_rewind` it (or take a fresh base
    /// backup), start it streaming.
    Rejoin,
}

impl FailoverAction {
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverAction::Fence => "fence",
            FailoverAction::Unfence => "unfence",
            FailoverAction::Promote => "promote",
            FailoverAction::Rejoin => "rejoin",
        }
    }

    pub fn parse(s: &str) -> Option<FailoverAction> {
        [
            FailoverAction::Fence,
            FailoverAction::Unfence,
            FailoverAction::Promote,
            FailoverAction::Rejoin,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
    }
}

/// `db.failover`'s parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverParams {
    pub app: AppRef,
    pub action: FailoverAction,
    /// The app's primary epoch this task acts for. An agent that has seen a
    /// newer one refuses the task.
    pub epoch: u64,
    /// Promote: the fenced primary's final position, which the standby
    /// must have replayed first (`None`: the old primary was not fenced).
    pub wait_for_lsn: Option<u64>,
    /// Rejoin: the cluster whose primary to follow.
    pub source: Option<crate::domain::ClusterRef>,
    /// Undoes an earlier step of the same operation after a failure.
    pub compensate: bool,
}

/// What a `traffic.move` task does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficAction {
    /// Hold the app's new requests (the front door keeps them waiting, for
    /// at most its `max_hold_ms`) while its primary moves.
    Hold,
    /// Send the app's traffic to `region`, releasing what was held there.
    Move,
    /// Release held requests to wherever traffic goes now (a failover that
    /// ended before it moved anything).
    Release,
}

impl TrafficAction {
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficAction::Hold => "hold",
            TrafficAction::Move => "move",
            TrafficAction::Release => "release",
        }
    }

    pub fn parse(s: &str) -> Option<TrafficAction> {
        [TrafficAction::Hold, TrafficAction::Move, TrafficAction::Release]
            .into_iter()
            .find(|a| a.as_str() == s)
    }
}

/// `traffic.move`'s parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficParams {
    pub app: AppRef,
    pub action: TrafficAction,
    /// Move: the region that takes the traffic.
    pub region: Option<String>,
    /// The app's primary epoch this move acts for: a driver that has moved
    /// traffic for a newer epoch refuses it, so a stale leader cannot send
    /// traffic back to a fenced region.
    pub epoch: u64,
    /// Undoes an earlier step of the same operation after a failure.
    pub compensate: bool,
}

/// `db.backup`'s parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupParams {
    pub app: AppRef,
    pub action: BackupAction,
    /// The backup's id (create: the id it gets).
    pub backup_id: String,
    /// Validate and restore: the object to read, from the catalog.
    pub object: Option<BackupObject>,
    /// Validate: rows per table recorded when the backup was taken.
    pub table_rows: BTreeMap<String, i64>,
    /// Delete: backup id → the object to delete.
    pub delete: BTreeMap<String, BackupObject>,
}

/// One typed parameter set per [`TaskKind`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskParams {
    Noop,
    Echo(EchoParams),
    AppDeploy {
        app: AppRef,
        image: String,
    },
    AppGates {
        app: AppRef,
        /// The color under test; `None`: the inactive one (health checks).
        color: Option<Color>,
    },
    AppSwitch {
        app: AppRef,
        /// The color that must serve afterwards. Always named by the
        /// coordinator, so a re-run converges instead of flipping back.
        /// `None` only in tasks from logs written before colors were named.
        to: Option<Color>,
        compensate: bool,
    },
    AppBake {
        app: AppRef,
        seconds: u64,
    },
    AppCanary {
        app: AppRef,
        /// The new color, taking `weight` percent; named by the
        /// coordinator once the deploy step reported it.
        color: Option<Color>,
        /// Percent of new requests to `color`, 0 to 99 (100 is a switch).
        weight: u32,
        /// Seconds the step holds its weight at least.
        pause_secs: u64,
        /// Takes the weight back to 0 after a failure (no judging).
        compensate: bool,
    },
    AppAnalysis {
        app: AppRef,
    },
    AppMaintenance {
        app: AppRef,
        /// On: stop taking traffic; off: take it again.
        on: bool,
        /// Ends a maintenance that a failed operation began.
        compensate: bool,
    },
    DbMigrate(MigrateParams),
    DbBackup(BackupParams),
    DbFailover(FailoverParams),
    DrDrill {
        app: AppRef,
        /// The release the scratch color runs.
        image: String,
        /// The target has no standby: the validated backup restored into
        /// the scratch database (`None`: a copy of the target's own).
        restore: Option<crate::operation::RestoreSource>,
    },
    TrafficMove(TrafficParams),
}

fn get<'a>(p: &'a WireParams, key: &'static str) -> Result<&'a str, TaskError> {
    p.get(key).map(String::as_str).ok_or(TaskError::Missing(key))
}

fn flag(p: &WireParams, key: &str) -> bool {
    p.get(key).is_some_and(|v| v == "true")
}

fn number<T: std::str::FromStr>(p: &WireParams, key: &'static str) -> Result<Option<T>, TaskError>
where
    T::Err: fmt::Display,
{
    p.get(key)
        .map(|v| {
            v.parse::<T>().map_err(|e| TaskError::Invalid {
                key,
                why: format!("{v:?}: {e}"),
            })
        })
        .transpose()
}

fn json<T: serde::de::DeserializeOwned>(p: &WireParams, key: &'static str) -> Result<Option<T>, TaskError> {
    p.get(key)
        .map(|v| {
            serde_json::from_str(v).map_err(|e| TaskError::Invalid {
                key,
                why: e.to_string(),
            })
        })
        .transpose()
}

fn color(p: &WireParams, key: &'static str) -> Result<Option<Color>, TaskError> {
    match p.get(key).map(String::as_str) {
        None | Some("inactive") => Ok(None),
        Some(c) => Color::parse(c).map(Some).ok_or_else(|| TaskError::Invalid {
            key,
            why: format!("unknown color {c:?}"),
        }),
    }
}

fn app_ref(p: &WireParams) -> Result<AppRef, TaskError> {
    Ok(AppRef {
        app: get(p, "app")?.to_owned(),
        spec_digest: p.get("spec_digest").cloned().unwrap_or_default(),
    })
}

impl TaskParams {
    pub fn kind(&self) -> TaskKind {
        match self {
            TaskParams::Noop => TaskKind::Noop,
            TaskParams::Echo(_) => TaskKind::Echo,
            TaskParams::AppDeploy { .. } => TaskKind::AppDeploy,
            TaskParams::AppGates { .. } => TaskKind::AppGates,
            TaskParams::AppSwitch { .. } => TaskKind::AppSwitch,
            TaskParams::AppBake { .. } => TaskKind::AppBake,
            TaskParams::AppCanary { .. } => TaskKind::AppCanary,
            TaskParams::AppAnalysis { .. } => TaskKind::AppAnalysis,
            TaskParams::AppMaintenance { .. } => TaskKind::AppMaintenance,
            TaskParams::DbMigrate(_) => TaskKind::DbMigrate,
            TaskParams::DbBackup(_) => TaskKind::DbBackup,
            TaskParams::DbFailover(_) => TaskKind::DbFailover,
            TaskParams::DrDrill { .. } => TaskKind::DrDrill,
            TaskParams::TrafficMove(_) => TaskKind::TrafficMove,
        }
    }

    /// The app an app or database task acts on.
    pub fn app(&self) -> Option<&AppRef> {
        match self {
            TaskParams::Noop | TaskParams::Echo(_) => None,
            TaskParams::AppDeploy { app, .. }
            | TaskParams::AppGates { app, .. }
            | TaskParams::AppSwitch { app, .. }
            | TaskParams::AppBake { app, .. }
            | TaskParams::AppCanary { app, .. }
            | TaskParams::AppAnalysis { app }
            | TaskParams::AppMaintenance { app, .. }
            | TaskParams::DrDrill { app, .. } => Some(app),
            TaskParams::DbMigrate(m) => Some(&m.app),
            TaskParams::DbBackup(b) => Some(&b.app),
            TaskParams::DbFailover(f) => Some(&f.app),
            TaskParams::TrafficMove(t) => Some(&t.app),
        }
    }

    /// True for a step that undoes an earlier one after a failure.
    pub fn is_compensation(&self) -> bool {
        match self {
            TaskParams::AppSwitch { compensate, .. }
            | TaskParams::AppMaintenance { compensate, .. }
            | TaskParams::AppCanary { compensate, .. } => *compensate,
            TaskParams::DbMigrate(m) => m.compensate,
            TaskParams::DbFailover(f) => f.compensate,
            TaskParams::TrafficMove(t) => t.compensate,
            _ => false,
        }
    }

    /// The wire form: the kind's name and the string map.
    pub fn to_wire(&self) -> (String, WireParams) {
        let mut p = WireParams::new();
        let mut put = |k: &str, v: String| {
            p.insert(k.to_owned(), v);
        };
        if let Some(a) = self.app() {
            put("app", a.app.clone());
            if !a.spec_digest.is_empty() {
                put("spec_digest", a.spec_digest.clone());
            }
        }
        match self {
            TaskParams::Noop => {}
            TaskParams::Echo(e) => {
                put("message", e.message.clone());
                if e.delay_ms > 0 {
                    put("delay_ms", e.delay_ms.to_string());
                }
                if e.fail {
                    put("fail", "true".into());
                }
            }
            TaskParams::AppDeploy { image, .. } => put("image", image.clone()),
            TaskParams::DrDrill { image, restore, .. } => {
                put("image", image.clone());
                if let Some(r) = restore {
                    put("restore", serde_json::to_string(r).unwrap_or_default());
                }
            }
            TaskParams::AppGates { color, .. } => {
                put("color", color.map_or_else(|| "inactive".into(), |c| c.to_string()));
            }
            TaskParams::AppSwitch { to, compensate, .. } => {
                put("to", to.map_or_else(|| "inactive".into(), |c| c.to_string()));
                if *compensate {
                    put("compensate", "true".into());
                }
            }
            TaskParams::AppBake { seconds, .. } => put("seconds", seconds.to_string()),
            TaskParams::AppCanary {
                color,
                weight,
                pause_secs,
                compensate,
                ..
            } => {
                if let Some(c) = color {
                    put("color", c.to_string());
                }
                put("weight", weight.to_string());
                if *pause_secs > 0 {
                    put("pause_secs", pause_secs.to_string());
                }
                if *compensate {
                    put("compensate", "true".into());
                }
            }
            TaskParams::AppAnalysis { .. } => {}
            TaskParams::AppMaintenance { on, compensate, .. } => {
                put("on", on.to_string());
                if *compensate {
                    put("compensate", "true".into());
                }
            }
            TaskParams::DbMigrate(m) => {
                put("action", m.action.as_str().into());
                put("image", m.image.clone());
                if !m.bundle_digest.is_empty() {
                    put("bundle_digest", m.bundle_digest.clone());
                }
                if let Some(t) = m.target {
                    put("target", t.to_string());
                }
                if m.dry_run {
                    put("dry_run", "true".into());
                }
                if m.compensate {
                    put("compensate", "true".into());
                }
            }
            TaskParams::DbBackup(b) => {
                put("action", b.action.as_str().into());
                put("backup_id", b.backup_id.clone());
                if let Some(o) = &b.object {
                    put("object", serde_json::to_string(o).unwrap_or_default());
                }
                if !b.table_rows.is_empty() {
                    put("table_rows", serde_json::to_string(&b.table_rows).unwrap_or_default());
                }
                if !b.delete.is_empty() {
                    put("delete", serde_json::to_string(&b.delete).unwrap_or_default());
                }
            }
            TaskParams::DbFailover(f) => {
                put("action", f.action.as_str().into());
                put("epoch", f.epoch.to_string());
                if let Some(l) = f.wait_for_lsn {
                    put("wait_for_lsn", l.to_string());
                }
                if let Some(s) = &f.source {
                    put("source", s.to_string());
                }
                if f.compensate {
                    put("compensate", "true".into());
                }
            }
            TaskParams::TrafficMove(t) => {
                put("action", t.action.as_str().into());
                put("epoch", t.epoch.to_string());
                if let Some(r) = &t.region {
                    put("region", r.clone());
                }
                if t.compensate {
                    put("compensate", "true".into());
                }
            }
        }
        (self.kind().as_str().to_owned(), p)
    }

    /// Decodes a task's kind and parameters. Unknown keys are ignored (the
    /// attached content, `spec` and `bundle`, among them).
    pub fn from_wire(kind: &str, p: &WireParams) -> Result<TaskParams, TaskError> {
        let kind = TaskKind::parse(kind).ok_or_else(|| TaskError::UnknownKind(kind.to_owned()))?;
        Ok(match kind {
            TaskKind::Noop => TaskParams::Noop,
            TaskKind::Echo => TaskParams::Echo(EchoParams {
                message: p.get("message").cloned().unwrap_or_default(),
                delay_ms: number(p, "delay_ms")?.unwrap_or(0),
                fail: flag(p, "fail"),
            }),
            TaskKind::AppDeploy => TaskParams::AppDeploy {
                app: app_ref(p)?,
                image: get(p, "image")?.to_owned(),
            },
            TaskKind::AppGates => TaskParams::AppGates {
                app: app_ref(p)?,
                color: color(p, "color")?,
            },
            TaskKind::AppSwitch => TaskParams::AppSwitch {
                app: app_ref(p)?,
                to: color(p, "to")?,
                compensate: flag(p, "compensate"),
            },
            TaskKind::AppBake => TaskParams::AppBake {
                app: app_ref(p)?,
                seconds: number(p, "seconds")?.unwrap_or(0),
            },
            TaskKind::AppCanary => TaskParams::AppCanary {
                app: app_ref(p)?,
                color: color(p, "color")?,
                weight: match number::<u32>(p, "weight")? {
                    Some(w) if w < 100 => w,
                    other => {
                        return Err(TaskError::Invalid {
                            key: "weight",
                            why: format!("{other:?}: a canary step's weight is 0 to 99"),
                        });
                    }
                },
                pause_secs: number(p, "pause_secs")?.unwrap_or(0),
                compensate: flag(p, "compensate"),
            },
            TaskKind::AppAnalysis => TaskParams::AppAnalysis { app: app_ref(p)? },
            TaskKind::AppMaintenance => TaskParams::AppMaintenance {
                app: app_ref(p)?,
                on: match get(p, "on")? {
                    "true" => true,
                    "false" => false,
                    other => {
                        return Err(TaskError::Invalid {
                            key: "on",
                            why: format!("{other:?} is not true or false"),
                        });
                    }
                },
                compensate: flag(p, "compensate"),
            },
            TaskKind::DbMigrate => {
                let action = p.get("action").map_or("status", String::as_str);
                TaskParams::DbMigrate(MigrateParams {
                    app: app_ref(p)?,
                    action: MigrateAction::parse(action).ok_or_else(|| TaskError::Invalid {
                        key: "action",
                        why: format!("{action:?} is not status, plan, up or down"),
                    })?,
                    image: p.get("image").cloned().unwrap_or_default(),
                    bundle_digest: p.get("bundle_digest").cloned().unwrap_or_default(),
                    target: number(p, "target")?,
                    dry_run: flag(p, "dry_run"),
                    compensate: flag(p, "compensate"),
                })
            }
            TaskKind::DbBackup => {
                let action = get(p, "action")?;
                TaskParams::DbBackup(BackupParams {
                    app: app_ref(p)?,
                    action: BackupAction::parse(action).ok_or_else(|| TaskError::Invalid {
                        key: "action",
                        why: format!("{action:?} is not create, validate, restore, restore-primary or delete"),
                    })?,
                    backup_id: get(p, "backup_id")?.to_owned(),
                    object: json(p, "object")?,
                    table_rows: json(p, "table_rows")?.unwrap_or_default(),
                    delete: json(p, "delete")?.unwrap_or_default(),
                })
            }
            TaskKind::DbFailover => {
                let action = get(p, "action")?;
                TaskParams::DbFailover(FailoverParams {
                    app: app_ref(p)?,
                    action: FailoverAction::parse(action).ok_or_else(|| TaskError::Invalid {
                        key: "action",
                        why: format!("{action:?} is not fence, unfence, promote or rejoin"),
                    })?,
                    epoch: number(p, "epoch")?.ok_or(TaskError::Missing("epoch"))?,
                    wait_for_lsn: number(p, "wait_for_lsn")?,
                    source: p
                        .get("source")
                        .map(|s| {
                            s.split_once('/')
                                .and_then(|(r, c)| crate::domain::ClusterRef::new(r, c).ok())
                                .ok_or_else(|| TaskError::Invalid {
                                    key: "source",
                                    why: format!("{s:?} is not region/cluster"),
                                })
                        })
                        .transpose()?,
                    compensate: flag(p, "compensate"),
                })
            }
            TaskKind::DrDrill => TaskParams::DrDrill {
                app: app_ref(p)?,
                image: get(p, "image")?.to_owned(),
                restore: p
                    .get("restore")
                    .map(|r| serde_json::from_str(r))
                    .transpose()
                    .map_err(|e| TaskError::Invalid {
                        key: "restore",
                        why: e.to_string(),
                    })?,
            },
            TaskKind::TrafficMove => {
                let action = get(p, "action")?;
                let action = TrafficAction::parse(action).ok_or_else(|| TaskError::Invalid {
                    key: "action",
                    why: format!("{action:?} is not hold, move or release"),
                })?;
                let region = p.get("region").cloned();
                if action == TrafficAction::Move && region.is_none() {
                    return Err(TaskError::Missing("region"));
                }
                TaskParams::TrafficMove(TrafficParams {
                    app: app_ref(p)?,
                    action,
                    region,
                    epoch: number(p, "epoch")?.ok_or(TaskError::Missing("epoch"))?,
                    compensate: flag(p, "compensate"),
                })
            }
        })
    }
}

/// Attaches the content a stored task names by digest, just before it is
/// sent: `spec` (the app definition, JSON) and `bundle` (the migrations,
/// JSON). `lookup_spec` and `lookup_bundle` resolve digests; content that is
/// already inline (tasks from older logs) is left alone.
pub fn hydrate(
    params: &mut WireParams,
    lookup_spec: impl Fn(&str) -> Option<String>,
    lookup_bundle: impl Fn(&str) -> Option<String>,
) {
    if !params.contains_key("spec")
        && let Some(json) = params.get("spec_digest").and_then(|d| lookup_spec(d))
    {
        params.insert("spec".into(), json);
    }
    if !params.contains_key("bundle")
        && let Some(json) = params.get("bundle_digest").and_then(|d| lookup_bundle(d))
    {
        params.insert("bundle".into(), json);
    }
}

/// The app definition attached to a task, checked against the digest the
/// task names.
pub fn attached_spec(params: &WireParams) -> Result<AppSpec, TaskError> {
    let json = get(params, "spec")?;
    let spec: AppSpec = serde_json::from_str(json).map_err(|e| TaskError::Invalid {
        key: "spec",
        why: e.to_string(),
    })?;
    if let Some(want) = params.get("spec_digest")
        && spec_digest(&spec) != *want
    {
        return Err(TaskError::DigestMismatch {
            what: "spec",
            digest: want.clone(),
        });
    }
    Ok(spec)
}

/// The migrations attached to a task, checked against the digest the task
/// names.
pub fn attached_bundle(params: &WireParams) -> Result<Bundle, TaskError> {
    let json = get(params, "bundle")?;
    let bundle: Bundle = serde_json::from_str(json).map_err(|e| TaskError::Invalid {
        key: "bundle",
        why: e.to_string(),
    })?;
    if let Some(want) = params.get("bundle_digest")
        && bundle.digest() != *want
    {
        return Err(TaskError::DigestMismatch {
            what: "bundle",
            digest: want.clone(),
        });
    }
    Ok(bundle)
}

/// Output keys the coordinator reads back from results.
/// The app a stored task names. Tolerant where `TaskParams::from_wire` is
/// strict: the state machine applies tasks from older logs exactly as it
/// did when they were written.
pub fn app_of(params: &WireParams) -> Option<&str> {
    params.get("app").map(String::as_str)
}

pub mod outputs {
    //! What tasks report back (`TaskResult.outputs`), one typed struct per
    //! task family. On the wire they are string maps, which the CLI shows
    //! as they are; `to_wire` and `from_wire` here are the only code that
    //! knows their keys.

    use std::collections::BTreeMap;

    use super::WireParams;
    use crate::app::{AppClusterStatus, Color};
    use crate::backup::BackupObject;

    fn versions(list: &str) -> Vec<i64> {
        list.split(',').filter_map(|v| v.trim().parse().ok()).collect()
    }

    fn join(list: &[i64]) -> String {
        list.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
    }

    /// What the app tasks (`app.deploy`, `app.gates`, `app.switch`,
    /// `app.bake`) report.
    #[derive(Clone, Debug, Default, PartialEq)]
    pub struct AppOutputs {
        /// `app.deploy`: the color the image was written to.
        pub color: Option<Color>,
        /// The driver's view of the app after the task.
        pub status: Option<AppClusterStatus>,
        /// `app.gates`: the gate report (JSON, for people and tools).
        pub report: Option<String>,
        /// `app.gates`, `app.bake`: the analysis run, every measurement
        /// with its time and value (JSON of `analysis::AnalysisReport`).
        pub analysis: Option<String>,
        /// A failed driver call's diagnostics (Kubernetes Events, logs).
        pub diagnostics: Vec<String>,
    }

    impl AppOutputs {
        pub fn to_wire(&self) -> WireParams {
            let mut m = WireParams::new();
            if let Some(c) = self.color {
                m.insert("color".into(), c.to_string());
            }
            if let Some(s) = &self.status {
                m.insert("status".into(), serde_json::to_string(s).unwrap_or_default());
            }
            if let Some(r) = &self.report {
                m.insert("report".into(), r.clone());
            }
            if let Some(a) = &self.analysis {
                m.insert("analysis".into(), a.clone());
            }
            if !self.diagnostics.is_empty() {
                m.insert("diagnostics".into(), self.diagnostics.join("\n"));
            }
            m
        }

        pub fn from_wire(m: &WireParams) -> Self {
            AppOutputs {
                color: m.get("color").and_then(|c| Color::parse(c)),
                status: m.get("status").and_then(|s| serde_json::from_str(s).ok()),
                report: m.get("report").cloned(),
                analysis: m.get("analysis").cloned(),
                diagnostics: m
                    .get("diagnostics")
                    .map(|d| d.lines().map(str::to_owned).collect())
                    .unwrap_or_default(),
            }
        }
    }

    /// A pre-migration backup.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct BackupOutput {
        pub path: String,
        pub bytes: u64,
        pub sha256: String,
    }

    /// A pre-migration backup the agent also uploaded to its object store,
    /// which the catalog records beside the scheduled ones.
    #[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    pub struct StoredBackup {
        pub id: String,
        pub object: BackupObject,
        pub database: String,
        pub engine: String,
        pub migration_version: i64,
        #[serde(default)]
        pub table_rows: BTreeMap<String, i64>,
        pub started_at_unix_ms: i64,
    }

    /// What `db.migrate` reports. Which fields are set depends on the
    /// action: status sets the version lists, plan the plan, up and down
    /// the outcome, what was applied, the versions and the backup.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct MigrateOutputs {
        /// Why nothing ran (a replica).
        pub skipped: Option<String>,
        pub applied_version: Option<i64>,
        pub pending: Option<Vec<i64>>,
        pub drift: Option<Vec<i64>>,
        pub dirty: Option<Vec<i64>>,
        pub unknown: Option<Vec<i64>>,
        pub plan: Option<String>,
        pub outcome: Option<String>,
        /// The versions applied or reverted (empty when it failed).
        pub applied: Option<Vec<i64>>,
        pub from_version: Option<i64>,
        pub to_version: Option<i64>,
        pub backup: Option<BackupOutput>,
        /// The same backup, uploaded to the agent's object store.
        pub stored: Option<StoredBackup>,
    }

    impl MigrateOutputs {
        pub fn to_wire(&self) -> WireParams {
            let mut m = WireParams::new();
            let mut put = |k: &str, v: String| {
                m.insert(k.to_owned(), v);
            };
            if let Some(s) = &self.skipped {
                put("skipped", s.clone());
            }
            if let Some(v) = self.applied_version {
                put("applied_version", v.to_string());
            }
            for (k, list) in [
                ("pending", &self.pending),
                ("drift", &self.drift),
                ("dirty", &self.dirty),
                ("unknown", &self.unknown),
                ("applied", &self.applied),
            ] {
                if let Some(list) = list {
                    put(k, join(list));
                }
            }
            if let Some(p) = &self.plan {
                put("plan", p.clone());
            }
            if let Some(o) = &self.outcome {
                put("outcome", o.clone());
            }
            if let Some(v) = self.from_version {
                put("from_version", v.to_string());
            }
            if let Some(v) = self.to_version {
                put("to_version", v.to_string());
            }
            if let Some(b) = &self.backup {
                put("backup_path", b.path.clone());
                put("backup_bytes", b.bytes.to_string());
                put("backup_sha256", b.sha256.clone());
            }
            if let Some(s) = self.stored.as_ref().and_then(|s| serde_json::to_string(s).ok()) {
                put("stored_backup", s);
            }
            m
        }

        pub fn from_wire(m: &WireParams) -> Self {
            let num = |k: &str| m.get(k).and_then(|v| v.parse().ok());
            let list = |k: &str| m.get(k).map(|v| versions(v));
            MigrateOutputs {
                skipped: m.get("skipped").cloned(),
                applied_version: num("applied_version"),
                pending: list("pending"),
                drift: list("drift"),
                dirty: list("dirty"),
                unknown: list("unknown"),
                plan: m.get("plan").cloned(),
                outcome: m.get("outcome").cloned(),
                applied: list("applied"),
                from_version: num("from_version"),
                to_version: num("to_version"),
                backup: m.get("backup_path").map(|path| BackupOutput {
                    path: path.clone(),
                    bytes: num("backup_bytes").map_or(0, |b: i64| b.max(0) as u64),
                    sha256: m.get("backup_sha256").cloned().unwrap_or_default(),
                }),
                stored: m.get("stored_backup").and_then(|s| serde_json::from_str(s).ok()),
            }
        }

        /// True when it applied or reverted anything.
        pub fn migrated_anything(&self) -> bool {
            self.applied.as_ref().is_some_and(|a| !a.is_empty())
        }
    }

    /// What `db.backup` reports. Create sets the object and the facts the
    /// catalog records; validate the verdict; restore the scratch database.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct BackupOutputs {
        pub object: Option<BackupObject>,
        /// The database's name on its server.
        pub database: Option<String>,
        pub engine: Option<String>,
        pub migration_version: Option<i64>,
        pub table_rows: Option<BTreeMap<String, i64>>,
        pub started_at_unix_ms: Option<i64>,
        pub duration_ms: Option<u64>,
        /// Validate: `passed` or what failed (see [`crate::backup::Validation`]).
        pub verdict: Option<String>,
        /// Restore: the scratch database the backup was restored into.
        pub scratch: Option<String>,
        /// Restore onto the primary: the database that now holds the data
        /// the restore replaced (kept for the operator to drop).
        pub replaced: Option<String>,
        /// Delete: the backups whose objects are gone.
        pub deleted: Option<Vec<String>>,
        /// Delete: the backups the store would not delete, and why (Object Lock).
        pub kept: Option<BTreeMap<String, String>>,
    }

    impl BackupOutputs {
        pub fn to_wire(&self) -> WireParams {
            let mut m = WireParams::new();
            let mut put = |k: &str, v: Option<String>| {
                if let Some(v) = v {
                    m.insert(k.to_owned(), v);
                }
            };
            put(
                "object",
                self.object.as_ref().and_then(|o| serde_json::to_string(o).ok()),
            );
            put("database", self.database.clone());
            put("engine", self.engine.clone());
            put("migration_version", self.migration_version.map(|v| v.to_string()));
            put(
                "table_rows",
                self.table_rows.as_ref().and_then(|t| serde_json::to_string(t).ok()),
            );
            put("started_at_unix_ms", self.started_at_unix_ms.map(|v| v.to_string()));
            put("duration_ms", self.duration_ms.map(|v| v.to_string()));
            put("verdict", self.verdict.clone());
            put("scratch", self.scratch.clone());
            put("replaced", self.replaced.clone());
            put(
                "deleted",
                self.deleted.as_ref().and_then(|d| serde_json::to_string(d).ok()),
            );
            put("kept", self.kept.as_ref().and_then(|k| serde_json::to_string(k).ok()));
            m
        }

        pub fn from_wire(m: &WireParams) -> Self {
            let num = |k: &str| m.get(k).and_then(|v| v.parse().ok());
            BackupOutputs {
                object: m.get("object").and_then(|o| serde_json::from_str(o).ok()),
                database: m.get("database").cloned(),
                engine: m.get("engine").cloned(),
                migration_version: num("migration_version"),
                table_rows: m.get("table_rows").and_then(|t| serde_json::from_str(t).ok()),
                started_at_unix_ms: num("started_at_unix_ms"),
                duration_ms: m.get("duration_ms").and_then(|v| v.parse().ok()),
                verdict: m.get("verdict").cloned(),
                scratch: m.get("scratch").cloned(),
                replaced: m.get("replaced").cloned(),
                deleted: m.get("deleted").and_then(|d| serde_json::from_str(d).ok()),
                kept: m.get("kept").and_then(|k| serde_json::from_str(k).ok()),
            }
        }
    }

    /// `traffic.move`'s outputs.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct TrafficOutputs {
        /// `front-door` or `route53`.
        pub driver: Option<String>,
        /// Where the app's traffic goes afterwards.
        pub region: Option<String>,
        /// Move and release: the held requests let through.
        pub released: Option<u64>,
        /// Move and release: the longest any of them waited, ms.
        pub held_max_ms: Option<u64>,
    }

    impl TrafficOutputs {
        pub fn to_wire(&self) -> WireParams {
            let mut m = WireParams::new();
            if let Some(d) = &self.driver {
                m.insert("driver".into(), d.clone());
            }
            if let Some(r) = &self.region {
                m.insert("region".into(), r.clone());
            }
            if let Some(n) = self.released {
                m.insert("released".into(), n.to_string());
            }
            if let Some(n) = self.held_max_ms {
                m.insert("held_max_ms".into(), n.to_string());
            }
            m
        }

        pub fn from_wire(m: &WireParams) -> Self {
            TrafficOutputs {
                driver: m.get("driver").cloned(),
                region: m.get("region").cloned(),
                released: m.get("released").and_then(|v| v.parse().ok()),
                held_max_ms: m.get("held_max_ms").and_then(|v| v.parse().ok()),
            }
        }
    }

    /// What `db.failover` reports: the database's WAL position when the
    /// task ended (a fence: the last write it will ever take; a promotion:
    /// the new primary's first), and the epoch it acted for.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct FailoverOutputs {
        pub lsn: Option<u64>,
        pub epoch: Option<u64>,
        /// Promote: how long the standby took to replay up to the fence, ms.
        pub caught_up_ms: Option<u64>,
        /// Rejoin: `rewind` (pg_rewind) or `base-backup`.
        pub method: Option<String>,
    }

    impl FailoverOutputs {
        pub fn to_wire(&self) -> WireParams {
            let mut m = WireParams::new();
            if let Some(l) = self.lsn {
                m.insert("lsn".into(), crate::dr::format_lsn(l));
            }
            if let Some(e) = self.epoch {
                m.insert("epoch".into(), e.to_string());
            }
            if let Some(c) = self.caught_up_ms {
                m.insert("caught_up_ms".into(), c.to_string());
            }
            if let Some(x) = &self.method {
                m.insert("method".into(), x.clone());
            }
            m
        }

        pub fn from_wire(m: &WireParams) -> Self {
            FailoverOutputs {
                lsn: m.get("lsn").and_then(|l| crate::dr::parse_lsn(l)),
                epoch: m.get("epoch").and_then(|v| v.parse().ok()),
                caught_up_ms: m.get("caught_up_ms").and_then(|v| v.parse().ok()),
                method: m.get("method").cloned(),
            }
        }
    }

    /// What a `dr.drill` reports: how it went, phase by phase.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct DrillOutputs {
        /// `passed`, or the phase that failed (`clone`, `checks`, `serve`,
        /// `gates`, `error`).
        pub verdict: String,
        /// `standby`.
        pub source: String,
        /// From the task's start to a serving copy whose gates passed.
        pub rto_ms: Option<u64>,
        /// How old the newest data in the copy was when it was taken.
        pub rpo_ms: Option<u64>,
        /// Phase → ms: `clone`, `checks`, `serve`, `gates`, `teardown`.
        pub phase_ms: BTreeMap<String, u64>,
    }

    impl DrillOutputs {
        pub fn to_wire(&self) -> WireParams {
            let mut m = WireParams::new();
            m.insert("verdict".into(), self.verdict.clone());
            if !self.source.is_empty() {
                m.insert("source".into(), self.source.clone());
            }
            if let Some(v) = self.rto_ms {
                m.insert("rto_ms".into(), v.to_string());
            }
            if let Some(v) = self.rpo_ms {
                m.insert("rpo_ms".into(), v.to_string());
            }
            for (phase, ms) in &self.phase_ms {
                m.insert(format!("{phase}_ms"), ms.to_string());
            }
            m
        }

        pub fn from_wire(m: &WireParams) -> Self {
            let mut out = DrillOutputs {
                verdict: m.get("verdict").cloned().unwrap_or_default(),
                source: m.get("source").cloned().unwrap_or_default(),
                rto_ms: m.get("rto_ms").and_then(|v| v.parse().ok()),
                rpo_ms: m.get("rpo_ms").and_then(|v| v.parse().ok()),
                phase_ms: BTreeMap::new(),
            };
            for (k, v) in m {
                if let (Some(phase), Ok(ms)) = (k.strip_suffix("_ms"), v.parse())
                    && DRILL_PHASES.contains(&phase)
                {
                    out.phase_ms.insert(phase.to_owned(), ms);
                }
            }
            out
        }
    }

    /// A drill's phases, in order.
    pub const DRILL_PHASES: [&str; 5] = ["clone", "checks", "serve", "gates", "teardown"];

    /// The color an `app.deploy` result reports.
    pub fn deployed_color(out: &WireParams) -> Option<Color> {
        AppOutputs::from_wire(out).color
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_round_trip_through_the_wire() {
        use outputs::{AppOutputs, BackupOutput, MigrateOutputs};
        let app = AppOutputs {
            color: Some(crate::app::Color::Green),
            status: Some(crate::app::AppClusterStatus {
                canary_weight: 0,
                active: Some(crate::app::Color::Blue),
                colors: vec![],
                last_switch_unix_ms: Some(7),
                maintenance: true,
            }),
            report: Some("{}".into()),
            analysis: Some("{\"passed\":true,\"checks\":[]}".into()),
            diagnostics: vec!["event one".into(), "event two".into()],
        };
        assert_eq!(AppOutputs::from_wire(&app.to_wire()), app);
        let up = MigrateOutputs {
            outcome: Some("applied".into()),
            applied: Some(vec![3, 4]),
            from_version: Some(2),
            to_version: Some(4),
            backup: Some(BackupOutput {
                path: "/b/shop.dump".into(),
                bytes: 42,
                sha256: "ab".repeat(32),
            }),
            stored: Some(outputs::StoredBackup {
                id: "shop-1".into(),
                engine: "SQLite 3.45".into(),
                migration_version: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        let wire = up.to_wire();
        // The wire form is what agents sent before the types (CLI and
        // older coordinators read it).
        assert_eq!(wire["applied"], "3,4");
        assert_eq!(wire["backup_bytes"], "42");
        assert_eq!(MigrateOutputs::from_wire(&wire), up);
        assert!(up.migrated_anything());
        let status = MigrateOutputs {
            applied_version: Some(4),
            pending: Some(vec![]),
            drift: Some(vec![2]),
            dirty: Some(vec![]),
            unknown: Some(vec![]),
            ..Default::default()
        };
        assert_eq!(status.to_wire()["pending"], "");
        assert_eq!(MigrateOutputs::from_wire(&status.to_wire()), status);
        assert!(!status.migrated_anything());
        let backup = outputs::BackupOutputs {
            object: Some(crate::backup::BackupObject {
                key: "k".into(),
                size: 3,
                ..Default::default()
            }),
            database: Some("shop".into()),
            engine: Some("PostgreSQL 16.4".into()),
            migration_version: Some(4),
            table_rows: Some(BTreeMap::from([("public.t".to_owned(), 2)])),
            started_at_unix_ms: Some(1),
            duration_ms: Some(5),
            verdict: Some("passed".into()),
            scratch: Some("shop_restore_x".into()),
            replaced: Some("shop_before_restore_x".into()),
            deleted: Some(vec!["a".into()]),
            kept: Some(BTreeMap::from([("b".to_owned(), "locked".to_owned())])),
        };
        assert_eq!(outputs::BackupOutputs::from_wire(&backup.to_wire()), backup);
        let drill = outputs::DrillOutputs {
            verdict: "passed".into(),
            source: "standby".into(),
            rto_ms: Some(3100),
            rpo_ms: Some(0),
            phase_ms: outputs::DRILL_PHASES.iter().map(|p| (p.to_string(), 7)).collect(),
        };
        assert_eq!(outputs::DrillOutputs::from_wire(&drill.to_wire()), drill);
    }

    fn app() -> AppRef {
        AppRef {
            app: "shop".into(),
            spec_digest: "ab".repeat(32),
        }
    }

    #[test]
    fn every_kind_round_trips_through_the_wire() {
        let cases = vec![
            TaskParams::Noop,
            TaskParams::Echo(EchoParams {
                message: "hi".into(),
                delay_ms: 5,
                fail: true,
            }),
            TaskParams::AppDeploy {
                app: app(),
                image: "shop:v2".into(),
            },
            TaskParams::AppGates {
                app: app(),
                color: Some(Color::Green),
            },
            TaskParams::AppGates {
                app: app(),
                color: None,
            },
            TaskParams::AppSwitch {
                app: app(),
                to: Some(Color::Blue),
                compensate: true,
            },
            TaskParams::AppBake {
                app: app(),
                seconds: 10,
            },
            TaskParams::AppAnalysis { app: app() },
            TaskParams::AppCanary {
                app: app(),
                color: Some(Color::Green),
                weight: 25,
                pause_secs: 30,
                compensate: false,
            },
            TaskParams::AppCanary {
                app: app(),
                color: Some(Color::Blue),
                weight: 0,
                pause_secs: 0,
                compensate: true,
            },
            TaskParams::AppMaintenance {
                app: app(),
                on: true,
                compensate: false,
            },
            TaskParams::AppMaintenance {
                app: app(),
                on: false,
                compensate: true,
            },
            TaskParams::DbMigrate(MigrateParams {
                app: app(),
                action: MigrateAction::Down,
                image: "shop:v2".into(),
                bundle_digest: "cd".repeat(32),
                target: Some(3),
                dry_run: true,
                compensate: true,
            }),
            TaskParams::DbBackup(BackupParams {
                app: app(),
                action: BackupAction::Validate,
                backup_id: "shop-20261129-030005-us-east-us-east-1-3fa2c1".into(),
                object: Some(BackupObject {
                    key: "b/us-east/us-east-1/shop/x.cbk".into(),
                    version_id: Some("v1".into()),
                    size: 10,
                    sha256: "ab".repeat(32),
                    parts: 2,
                    key_id: "k1".into(),
                    dump_bytes: 30,
                    retain_until_unix_ms: Some(9),
                }),
                table_rows: BTreeMap::from([("public.orders".to_owned(), 3)]),
                delete: BTreeMap::from([("x".to_owned(), BackupObject::default())]),
            }),
            TaskParams::DbFailover(FailoverParams {
                app: app(),
                action: FailoverAction::Promote,
                epoch: 7,
                wait_for_lsn: Some(0x16_B374_D848),
                source: None,
                compensate: false,
            }),
            TaskParams::DbFailover(FailoverParams {
                app: app(),
                action: FailoverAction::Unfence,
                epoch: 2,
                wait_for_lsn: None,
                source: None,
                compensate: true,
            }),
            TaskParams::DbFailover(FailoverParams {
                app: app(),
                action: FailoverAction::Rejoin,
                epoch: 3,
                wait_for_lsn: None,
                source: Some(crate::domain::ClusterRef::new("eu-west", "c1").unwrap()),
                compensate: false,
            }),
            TaskParams::DrDrill {
                app: app(),
                image: "shop:v2".into(),
                restore: None,
            },
            TaskParams::DrDrill {
                app: app(),
                image: "shop:v2".into(),
                restore: Some(crate::operation::RestoreSource {
                    backup_id: "shop-1".into(),
                    object: crate::backup::BackupObject {
                        key: "cutover/us-east/c1/shop/shop-1.cbk".into(),
                        size: 42,
                        ..Default::default()
                    },
                    table_rows: [("public.seq".to_owned(), 1000)].into(),
                    taken_at_unix_ms: 1_767_225_600_000,
                }),
            },
            TaskParams::TrafficMove(TrafficParams {
                app: app(),
                action: TrafficAction::Move,
                region: Some("eu-west".into()),
                epoch: 4,
                compensate: false,
            }),
            TaskParams::TrafficMove(TrafficParams {
                app: app(),
                action: TrafficAction::Release,
                region: None,
                epoch: 4,
                compensate: true,
            }),
        ];
        let mut kinds = std::collections::BTreeSet::new();
        for c in cases {
            let (kind, wire) = c.to_wire();
            kinds.insert(c.kind());
            assert_eq!(TaskParams::from_wire(&kind, &wire).unwrap(), c, "{kind} {wire:?}");
        }
        assert_eq!(kinds.len(), TaskKind::ALL.len(), "a kind has no round-trip case");
    }

    #[test]
    fn bad_wire_params_are_named() {
        let p = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(
            TaskParams::from_wire("app.deploy", &p(&[("app", "x")])),
            Err(TaskError::Missing("image"))
        );
        let e = TaskParams::from_wire("app.switch", &p(&[("app", "x"), ("to", "purple")])).unwrap_err();
        assert!(e.to_string().contains("purple"), "{e}");
        let e = TaskParams::from_wire("echo", &p(&[("delay_ms", "soon")])).unwrap_err();
        assert!(e.to_string().contains("delay_ms"), "{e}");
        assert_eq!(
            TaskParams::from_wire("app.teleport", &p(&[])),
            Err(TaskError::UnknownKind("app.teleport".into()))
        );
    }

    #[test]
    fn only_noop_and_echo_are_diagnostic() {
        let diag: Vec<TaskKind> = TaskKind::ALL.into_iter().filter(|k| k.is_diagnostic()).collect();
        assert_eq!(diag, vec![TaskKind::Noop, TaskKind::Echo]);
        for k in TaskKind::ALL {
            assert_eq!(TaskKind::parse(k.as_str()), Some(k));
        }
    }
}
