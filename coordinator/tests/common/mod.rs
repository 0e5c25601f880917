//! What the coordinator's state-machine tests share: a fixed clock origin,
//! an operator's audit draft, clusters named `<region>/main`, and an app
//! spec on the local driver, and the seeded simulations' arguments. Each
//! test binary uses a part of it.
#![allow(dead_code)]

use cutover_coordinator::state::AuditDraft;
use cutover_shared::app::{AppCluster, AppSpec, DriverKind, LocalSpec};
use cutover_shared::domain::ClusterRef;

pub const HOUR: i64 = 3_600_000;
pub const DAY: i64 = 24 * HOUR;
/// 2026-01-01 00:00 UTC: where the tests' injected clocks start.
pub const JAN_1: i64 = 1_767_225_600_000;

/// What an operator's request records, at `at`.
pub fn audit(at: i64) -> AuditDraft {
    AuditDraft {
        at_unix_ms: at,
        actor: "operator/test".into(),
        action: "test".into(),
        parameters: String::new(),
        outcome: "ok".into(),
    }
}

/// The cluster `main` of `region`.
pub fn cluster(region: &str) -> ClusterRef {
    ClusterRef::new(region, "main").unwrap()
}

/// App `name` in `<region>/main` of each of `regions`, on the local
/// driver, baking `bake_secs` after each switch; everything else default.
pub fn app_spec(name: &str, regions: &[&str], bake_secs: u64) -> AppSpec {
    AppSpec {
        name: name.into(),
        clusters: regions
            .iter()
            .map(|r| AppCluster {
                region: r.to_string(),
                cluster: "main".into(),
                driver: DriverKind::Local,
                local: Some(LocalSpec {
                    command: vec![name.into(), "{listen}".into()],
                    listen: "127.0.0.1:1".into(),
                    preview_listen: "127.0.0.1:2".into(),
                    drain_timeout_ms: 1000,
                }),
                kubernetes: None,
            })
            .collect(),
        bake_secs,
        ..Default::default()
    }
}

/// The seeds a seeded simulation runs, from its arguments: `--seed S`
/// (that seed alone, verbose), `--seeds N` (0..N), or 0..`default`.
pub fn seeds_from_args(default: u64) -> (Vec<u64>, bool) {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse::<u64>().unwrap_or_else(|_| panic!("{name} takes a number")))
    };
    match (arg("--seed"), arg("--seeds")) {
        (Some(s), _) => (vec![s], true),
        (None, Some(n)) => ((0..n).collect(), false),
        (None, None) => ((0..default).collect(), false),
    }
}
