//! What an operation was asked to do, fixed when it is created.
//!
//! The control service builds an [`OperationSpec`] from the request and the
//! state at that moment (the colors a switch moves to, the migrations a
//! rollback reverts); the state machine stores it with the operation, and
//! the orchestrator's plan is a pure function of it. Nothing applied later
//! (an app re-applied, a release created) changes it.
//!
//! Operations committed before this type existed stored the same facts as
//! a string map (`params`); [`OperationSpec::from_legacy`] reads those, and
//! [`Operation`](crate::domain::Operation) deserialises either form.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::app::Color;
use crate::backup::{BackupAction, BackupObject, BackupTrigger};
use crate::domain::ClusterRef;
use crate::task::MigrateAction;

/// How a deploy moves traffic across regions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Region by region, in the app's waves; a failure stops the rest.
    #[default]
    Waves,
    /// Every region deploys and passes its gates before any switches.
    Atomic,
}

/// Who lets a deploy switch traffic once its gates pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Promotion {
    /// The orchestrator switches as soon as the gates pass.
    #[default]
    Automatic,
    /// Each switch waits for `cutover promote`.
    Manual,
}

/// A migrate operation's request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateSpec {
    pub action: MigrateAction,
    /// The version to migrate to (`down` needs one; 0 reverts all).
    pub target: Option<i64>,
    /// Plan and report, change nothing.
    pub dry_run: bool,
}

/// A backup operation's request. For validate and restore, the catalog
/// entry's object and row counts are copied in at creation, so the plan
/// reads nothing else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSpec {
    pub action: BackupAction,
    /// Validate and restore: the backup acted on.
    #[serde(default)]
    pub backup_id: Option<String>,
    #[serde(default)]
    pub object: Option<BackupObject>,
    #[serde(default)]
    pub table_rows: BTreeMap<String, i64>,
    /// Create: why it was taken.
    #[serde(default)]
    pub trigger: BackupTrigger,
    /// Create: validate each new backup by restore once it is taken.
    #[serde(default)]
    pub validate: bool,
    /// Delete: backup id → object, decided at creation (retention).
    #[serde(default)]
    pub delete: BTreeMap<String, BackupObject>,
}

impl BackupSpec {
    /// `action` with nothing else set.
    pub fn new(action: BackupAction) -> BackupSpec {
        BackupSpec {
            action,
            backup_id: None,
            object: None,
            table_rows: BTreeMap::new(),
            trigger: BackupTrigger::Manual,
            validate: false,
            delete: BTreeMap::new(),
        }
    }
}

/// What an operation does, fixed at creation. Fields that do not apply to
/// the operation's kind keep their defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationSpec {
    /// Deploy and migrate: the image (release) acted on.
    #[serde(default)]
    pub image: Option<String>,
    /// Deploy: how regions are sequenced.
    #[serde(default)]
    pub strategy: Strategy,
    /// Deploy: regions grouped into waves, in order (empty: one wave).
    #[serde(default)]
    pub waves: Vec<Vec<String>>,
    /// Deploy: seconds the new color bakes before its gates run.
    #[serde(default)]
    pub bake_secs: u64,
    /// Deploy: deploy and verify, but leave traffic where it is.
    #[serde(default)]
    pub no_switch: bool,
    /// Deploy: who releases each switch.
    #[serde(default)]
    pub promotion: Promotion,
    /// Switch and rollback: `region/cluster` → the color traffic moves to,
    /// resolved when the operation was created, so a re-run converges.
    #[serde(default)]
    pub switch_to: BTreeMap<String, Color>,
    /// Rollback: the release whose migrations are reverted.
    #[serde(default)]
    pub release_image: Option<String>,
    /// Rollback: `region/cluster` → the version its database goes back to.
    #[serde(default)]
    pub migrate_down: BTreeMap<String, i64>,
    /// Migrate: what to do.
    #[serde(default)]
    pub migrate: Option<MigrateSpec>,
    /// Backup: what to do (boxed: most operations have none).
    #[serde(default)]
    pub backup: Option<Box<BackupSpec>>,
    /// Failover: from where to where, under which epoch.
    #[serde(default)]
    pub failover: Option<Box<FailoverSpec>>,
    /// Drill: the target has no standby, so the validated backup restored
    /// into the scratch database instead of a copy of the target's own.
    #[serde(default)]
    pub restore: Option<Box<RestoreSource>>,
}

/// What a failover was decided to do, fixed at creation: the plan reads
/// nothing else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverSpec {
    /// The primary being replaced (`None`: none had reported).
    pub from: Option<ClusterRef>,
    pub to: ClusterRef,
    /// The primary epoch this failover commits (the app's last + 1).
    pub epoch: u64,
    /// Fence the old primary first: its agent is up. A forced failover
    /// past a lost region supersedes it by the epoch alone.
    pub fence: bool,
    /// The color serving in `to` at creation, whose gates verify the new
    /// primary (`None`: nothing deployed there yet; no gates run).
    pub verify_color: Option<Color>,
    /// The data-loss window the plan reported at creation, ms.
    pub data_loss_window_ms: Option<u64>,
    /// WAL the standby was known not to have replayed at creation.
    #[serde(default)]
    pub wal_behind_bytes: Option<u64>,
    pub force: bool,
    pub accept_data_loss: bool,
    /// Only fence `from`, a primary left over from before the current
    /// epoch (its region came back after a forced failover): no new epoch,
    /// no promotion.
    #[serde(default)]
    pub fence_only: bool,
    /// After the promotion, rebuild `from` as a standby of `to` (a planned
    /// failover that leaves both regions replicating: `dr failback`).
    #[serde(default)]
    pub rejoin: bool,
    /// Only rebuild `from`, a primary the current epoch superseded, as a
    /// standby of `to` (the epoch's primary): no new epoch, no promotion.
    #[serde(default)]
    pub rejoin_only: bool,
    /// The agent whose traffic driver holds the app's new requests while
    /// the primary moves and then sends them to `to` (`None`: no agent
    /// manages the app's traffic; it stays where each platform sends it).
    #[serde(default)]
    pub traffic: Option<ClusterRef>,
    /// Repoint: the release to deploy in `to`, where nothing served at
    /// creation (the one the old primary's region served), before traffic
    /// moves there.
    #[serde(default)]
    pub deploy_image: Option<String>,
    /// `to` has no standby: the validated backup restored onto its
    /// database (fenced until the failover claims it) in place of a
    /// promotion.
    #[serde(default)]
    pub restore: Option<RestoreSource>,
}

/// The backup a failover without a standby restores, as the catalog had
/// it when the failover was decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreSource {
    pub backup_id: String,
    pub object: BackupObject,
    /// Rows per table when it was taken: the restored copy must match.
    #[serde(default)]
    pub table_rows: BTreeMap<String, i64>,
    pub taken_at_unix_ms: i64,
}

impl FailoverSpec {
    /// Fencing a stray primary and rejoining one act for the app's
    /// current epoch; every other failover commits the next one.
    pub fn keeps_epoch(&self) -> bool {
        self.fence_only || self.rejoin_only
    }
}

impl OperationSpec {
    /// Reads the string map operations stored before this type existed.
    /// Values that do not parse keep their defaults, as the plan then did.
    pub fn from_legacy(params: &BTreeMap<String, String>) -> OperationSpec {
        let get = |k: &str| params.get(k).map(String::as_str);
        let json_map = |k: &str| -> BTreeMap<String, String> {
            get(k).and_then(|j| serde_json::from_str(j).ok()).unwrap_or_default()
        };
        OperationSpec {
            image: get("image").map(str::to_owned),
            strategy: if get("strategy") == Some("atomic") {
                Strategy::Atomic
            } else {
                Strategy::Waves
            },
            waves: get("waves")
                .and_then(|w| serde_json::from_str(w).ok())
                .unwrap_or_default(),
            bake_secs: get("bake_secs").and_then(|b| b.parse().ok()).unwrap_or(0),
            no_switch: get("no_switch") == Some("true"),
            promotion: if get("promotion") == Some("manual") {
                Promotion::Manual
            } else {
                Promotion::Automatic
            },
            switch_to: json_map("switch_to")
                .into_iter()
                .filter_map(|(k, v)| Some((k, Color::parse(&v)?)))
                .collect(),
            release_image: get("release_image").map(str::to_owned),
            migrate_down: get("migrate_down")
                .and_then(|d| serde_json::from_str(d).ok())
                .unwrap_or_default(),
            migrate: get("action").and_then(MigrateAction::parse).map(|action| MigrateSpec {
                action,
                target: get("target").and_then(|t| t.parse().ok()),
                dry_run: get("dry_run") == Some("true"),
            }),
            backup: None,
            failover: None,
            restore: None,
        }
    }

    /// The spec as display parameters (the API's `Operation.params` and
    /// the audit trail): only what differs from the defaults.
    pub fn to_display(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_owned(), v);
        };
        if let Some(i) = &self.image {
            put("image", i.clone());
        }
        if self.strategy == Strategy::Atomic {
            put("strategy", "atomic".into());
        }
        if !self.waves.is_empty() {
            put("waves", serde_json::to_string(&self.waves).unwrap_or_default());
        }
        if self.bake_secs > 0 {
            put("bake_secs", self.bake_secs.to_string());
        }
        if self.no_switch {
            put("no_switch", "true".into());
        }
        if self.promotion == Promotion::Manual {
            put("promotion", "manual".into());
        }
        if !self.switch_to.is_empty() {
            put("switch_to", serde_json::to_string(&self.switch_to).unwrap_or_default());
        }
        if let Some(i) = &self.release_image {
            put("release_image", i.clone());
        }
        if !self.migrate_down.is_empty() {
            put(
                "migrate_down",
                serde_json::to_string(&self.migrate_down).unwrap_or_default(),
            );
        }
        if let Some(mg) = &self.migrate {
            put("action", mg.action.as_str().into());
            if let Some(t) = mg.target {
                put("target", t.to_string());
            }
            if mg.dry_run {
                put("dry_run", "true".into());
            }
        }
        if let Some(f) = &self.failover {
            if let Some(from) = &f.from {
                put("from", from.to_string());
            }
            put("to", f.to.to_string());
            put("epoch", f.epoch.to_string());
            if let Some(w) = f.data_loss_window_ms {
                put("data_loss_window_ms", w.to_string());
            }
            if f.force {
                put("force", "true".into());
            }
            if f.accept_data_loss {
                put("accept_data_loss", "true".into());
            }
            if f.fence_only {
                put("fence_only", "true".into());
            }
            if f.rejoin {
                put("rejoin", "true".into());
            }
            if f.rejoin_only {
                put("rejoin_only", "true".into());
            }
        }
        if let Some(b) = &self.backup {
            put("backup_action", b.action.as_str().into());
            if let Some(id) = &b.backup_id {
                put("backup_id", id.clone());
            }
            if b.action == BackupAction::Create {
                put("trigger", b.trigger.as_str().into());
                if let BackupTrigger::Schedule { slot_unix_ms } = b.trigger {
                    put("slot_unix_ms", slot_unix_ms.to_string());
                }
                if b.validate {
                    put("validate", "true".into());
                }
            }
            if !b.delete.is_empty() {
                put("delete", b.delete.keys().cloned().collect::<Vec<_>>().join(","));
            }
        }
        m
    }
}

/// How an operation's spec is stored: typed now, a string map in logs
/// written before. Deserialising tries the typed form first; a legacy map
/// (string values, which the typed form refuses) falls through to it.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum StoredSpec {
    Typed(OperationSpec),
    Legacy(BTreeMap<String, String>),
}

impl From<StoredSpec> for OperationSpec {
    fn from(s: StoredSpec) -> Self {
        match s {
            StoredSpec::Typed(t) => t,
            StoredSpec::Legacy(m) => OperationSpec::from_legacy(&m),
        }
    }
}

/// `serde(deserialize_with)` for [`Operation::spec`](crate::domain::Operation).
pub(crate) fn deserialize_stored<'de, D: serde::Deserializer<'de>>(d: D) -> Result<OperationSpec, D::Error> {
    StoredSpec::deserialize(d).map(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_params_read_as_the_same_spec() {
        let legacy = BTreeMap::from([
            ("image".to_owned(), "app:v2".to_owned()),
            ("strategy".to_owned(), "atomic".to_owned()),
            ("waves".to_owned(), r#"[["us-east"],["eu-west"]]"#.to_owned()),
            ("bake_secs".to_owned(), "30".to_owned()),
            ("promotion".to_owned(), "manual".to_owned()),
        ]);
        let spec = OperationSpec::from_legacy(&legacy);
        assert_eq!(spec.image.as_deref(), Some("app:v2"));
        assert_eq!(spec.strategy, Strategy::Atomic);
        assert_eq!(spec.waves, vec![vec!["us-east".to_owned()], vec!["eu-west".to_owned()]]);
        assert_eq!(spec.bake_secs, 30);
        assert_eq!(spec.promotion, Promotion::Manual);
        assert_eq!(spec.to_display(), legacy, "display form is the legacy form");

        // Stored either way, it reads back the same.
        let typed: OperationSpec = deserialize_stored(serde_json::to_value(&spec).unwrap()).unwrap();
        let old: OperationSpec = deserialize_stored(serde_json::to_value(&legacy).unwrap()).unwrap();
        assert_eq!(typed, spec);
        assert_eq!(old, spec);
    }

    #[test]
    fn a_legacy_map_of_only_an_image_reads_the_same_either_way() {
        // `{"image": "x"}` is valid in both forms and means the same.
        let one = serde_json::json!({ "image": "app:v1" });
        let spec: OperationSpec = deserialize_stored(one).unwrap();
        assert_eq!(spec.image.as_deref(), Some("app:v1"));
        assert_eq!(spec.migrate, None);
    }
}
