//! The sample app (`cutover sample-app`: `/` answers its version,
//! `/health` its health) declared under the local driver, as the demo, the
//! benchmarks and the tests run it.

use std::path::Path;

/// Local-driver settings that run `program sample-app` (the `cutover`
/// binary, or the bench binary) on fresh loopback addresses.
pub fn local(program: &Path) -> cutover_shared::app::LocalSpec {
    cutover_shared::app::LocalSpec {
        command: [
            program.display().to_string().as_str(),
            "sample-app",
            "--version",
            "{image}",
            "--listen",
            "{listen}",
        ]
        .map(String::from)
        .to_vec(),
        // Below the ephemeral range: a port `bind(0)` released can be
        // taken by another test's outgoing connection before the app binds
        // it (CI saw "router cannot listen ...: Address already in use").
        listen: crate::ports::stable_free_addr(),
        preview_listen: crate::ports::stable_free_addr(),
        drain_timeout_ms: 5000,
    }
}

/// App `name` running the sample app (`program sample-app`) under the
/// local driver in each `(region, cluster)`: an HTTP health probe, a light
/// load probe, no waves, a 1 s bake. Callers adjust the rest.
pub fn spec(name: &str, regions: &[(&str, &str)], program: &Path) -> cutover_shared::app::AppSpec {
    use cutover_shared::app::{AppCluster, AppSpec, DriverKind, LoadProbe, Probe};
    AppSpec {
        name: name.into(),
        clusters: regions
            .iter()
            .map(|(r, c)| AppCluster {
                region: r.to_string(),
                cluster: c.to_string(),
                driver: DriverKind::Local,
                local: Some(local(program)),
                kubernetes: None,
            })
            .collect(),
        health: vec![Probe::Http {
            path: "/health".into(),
            status: 200,
            body_contains: None,
        }],
        load: LoadProbe {
            requests: 20,
            rate_per_sec: 100,
            min_rps: 10.0,
            ..LoadProbe::default()
        },
        bake_secs: 1,
        ..Default::default()
    }
}
