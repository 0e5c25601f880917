//! deploy/kubernetes and the Dockerfile: every overlay renders with
//! `kubectl kustomize`, validates offline against Kubernetes' own schemas
//! (`kubernetes-validate --strict`, which rejects unknown fields) and its
//! cert-manager and Prometheus Operator objects against those projects'
//! CRD schemas (`tests/k8s-crds.mjs`, with the schemas compiled into the
//! @kubernetes-models npm packages: types, required fields and enums; the
//! CRDs allow unknown fields, so the fields cutover relies on are also
//! checked one by one below), and holds what the manifests
//! promise: three coordinators, one vote lost at a time, non-root pods with
//! read-only root filesystems and no capabilities, probes on the ops
//! endpoints, an agent that writes only Deployments and Services, and
//! certificates whose URI SANs are the identities the configs name. The
//! Dockerfile passes hadolint.
//!
//! kubectl, kubernetes-validate and hadolint come from scripts/setup (the
//! latter two from PyPI into ~/.cache/cutover-pytools), the models from npm
//! into ~/.cache/cutover-k8s-models; a missing tool fails the test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cutover_shared::config::{AgentConfig, CoordinatorConfig};
use cutover_shared::identity::{Identity, Role};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where scripts/setup installs the Python tools.
fn pytools() -> PathBuf {
    std::env::var_os("CUTOVER_PYTOOLS").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/cutover-pytools"),
        PathBuf::from,
    )
}

fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .env("PYTHONPATH", pytools())
        .current_dir(root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{} ({e}): scripts/setup installs it", program.display()));
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn render(overlay: &str) -> String {
    let (ok, yaml) = run(
        Path::new("kubectl"),
        &["kustomize", &format!("deploy/kubernetes/overlays/{overlay}")],
        None,
    );
    assert!(ok, "kubectl kustomize {overlay}:\n{yaml}");
    yaml
}

/// `kubernetes-validate --strict` on `yaml`: (passed, report).
fn validate(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, yaml).unwrap();
    let (ok, report) = run(
        &pytools().join("bin/kubernetes-validate"),
        &["--strict", "--quiet", "--no-warn", file.to_str().unwrap()],
        None,
    );
    (ok && !report.contains("ERROR"), report)
}

/// The rendered objects, as JSON (PyYAML from the same tools).
fn objects(yaml: &str) -> Vec<Value> {
    let (ok, json) = run(
        Path::new("python3"),
        &[
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ],
        Some(yaml),
    );
    assert!(ok, "{json}");
    serde_json::from_str(&json).unwrap()
}

/// `tests/k8s-crds.mjs` on `objs`: (passed, report).
fn validate_custom_resources(objs: &[Value]) -> (bool, String) {
    let models = std::env::var_os("CUTOVER_K8S_MODELS").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/cutover-k8s-models"),
        PathBuf::from,
    );
    run(
        Path::new("node"),
        &["tests/k8s-crds.mjs", models.to_str().unwrap()],
        Some(&serde_json::to_string(objs).unwrap()),
    )
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The ConfigMap kustomize generated from `name` (it appends a hash).
fn config_map<'a>(objs: &'a [Value], name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"].as_str().unwrap().starts_with(name))
        .unwrap_or_else(|| panic!("no ConfigMap {name}"))
}

fn uris(cert: &Value) -> Vec<String> {
    cert["spec"]["uris"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect()
}

/// Every pod template: non-root, read-only root filesystem, no
/// capabilities, no privilege escalation.
fn assert_hardened(kind: &str, name: &str, o: &Value) {
    let pod = &o["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{kind} {name}");
    for c in pod["containers"].as_array().unwrap() {
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{kind} {name}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{kind} {name}");
        assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]), "{kind} {name}");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{kind} {name}");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{kind} {name}");
    }
}

fn check_overlay(overlay: &str, agent_identity: &str, anti_affinity: &str) {
    let yaml = render(overlay);
    let (ok, report) = validate(&yaml);
    assert!(ok, "{overlay} does not validate:\n{report}");
    let objs = objects(&yaml);
    let (ok, report) = validate_custom_resources(&objs);
    assert!(ok, "{overlay}'s custom resources do not validate:\n{report}");
    for kind in [
        "Issuer cutover-ca",
        "Certificate cutover-agent",
        "ServiceMonitor cutover-coordinator",
    ] {
        assert!(
            report.contains(&format!(" {kind}\n")),
            "{kind} was not checked:\n{report}"
        );
    }

    let sts = find(&objs, "StatefulSet", "cutover-coordinator");
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(sts["spec"]["serviceName"], "cutover-coordinator-peers");
    assert!(
        sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][anti_affinity].is_array(),
        "{overlay}: coordinators want {anti_affinity} anti-affinity"
    );
    assert_hardened("StatefulSet", "cutover-coordinator", sts);
    let peers = find(&objs, "Service", "cutover-coordinator-peers");
    assert_eq!(peers["spec"]["clusterIP"], "None");
    let pdb = find(&objs, "PodDisruptionBudget", "cutover-coordinator");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    let agent = find(&objs, "Deployment", "cutover-agent");
    assert_eq!(agent["spec"]["replicas"], 1);
    assert_eq!(
        agent["spec"]["strategy"]["type"], "Recreate",
        "never two agents of one cluster"
    );
    assert_hardened("Deployment", "cutover-agent", agent);

    // The agent writes Deployments and Services only; the rest it reads.
    let role = find(&objs, "Role", "cutover-agent");
    for rule in role["rules"].as_array().unwrap() {
        let verbs: Vec<&str> = rule["verbs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let writes = verbs.iter().any(|v| !["get", "list", "watch"].contains(v));
        for r in rule["resources"].as_array().unwrap() {
            let r = r.as_str().unwrap();
            assert!(
                !writes || ["deployments", "deployments/scale", "services"].contains(&r),
                "the agent may write {r}: {rule}"
            );
            assert!(!verbs.contains(&"delete") && !verbs.contains(&"*"), "{rule}");
        }
    }
    let binding = find(&objs, "RoleBinding", "cutover-agent");
    assert_eq!(binding["subjects"][0]["name"], "cutover-agent");

    for kind in ["NetworkPolicy"] {
        for name in ["cutover-coordinator", "cutover-agent"] {
            find(&objs, kind, name);
        }
    }
    let sm = find(&objs, "ServiceMonitor", "cutover-coordinator");
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");

    // Each coordinator's config names its node id, its own certificate,
    // and the certificate's URI SAN names that node.
    let cm = config_map(&objs, "cutover-coordinator-config");
    for i in 0..3 {
        let text = cm["data"][format!("cutover-coordinator-{i}.toml")].as_str().unwrap();
        let cfg: CoordinatorConfig = toml::from_str(text).unwrap();
        assert_eq!(cfg.node_id, i + 1);
        assert_eq!(cfg.initial_members.len(), 3);
        let secret = format!("cutover-coordinator-{i}");
        assert!(cfg.tls.cert.starts_with(format!("/etc/cutover/tls/{secret}")), "{text}");
        let cert = find(&objs, "Certificate", &secret);
        assert_eq!(cert["spec"]["secretName"], secret.as_str());
        let id = Identity::from_spiffe_uri(&uris(cert)[0], &cfg.tls.trust_domain).unwrap();
        assert_eq!((id.role, id.name), (Role::Coordinator, (i + 1).to_string()));
        assert_eq!(cert["spec"]["issuerRef"]["name"], "cutover-ca");
    }
    let cm = config_map(&objs, "cutover-agent-config");
    let cfg: AgentConfig = toml::from_str(cm["data"]["agent.toml"].as_str().unwrap()).unwrap();
    cfg.validate().unwrap();
    let cert = find(&objs, "Certificate", "cutover-agent");
    let id = Identity::from_spiffe_uri(&uris(cert)[0], &cfg.tls.trust_domain).unwrap();
    assert_eq!(id.role, Role::Agent);
    assert_eq!(id.name, agent_identity);
}

#[test]
fn the_dev_overlay_renders_validates_and_holds_its_promises() {
    check_overlay("dev", "dev/kind", "preferredDuringSchedulingIgnoredDuringExecution");
}

#[test]
fn the_production_overlay_renders_validates_and_holds_its_promises() {
    check_overlay(
        "production",
        "us-east/us-east-1",
        "requiredDuringSchedulingIgnoredDuringExecution",
    );
}

/// The validator is not a rubber stamp: an unknown field fails it.
#[test]
fn the_schema_check_refuses_an_unknown_field() {
    let yaml = render("production").replace("readOnlyRootFilesystem", "readOnlyRootFileSystem");
    let (ok, report) = validate(&yaml);
    assert!(!ok, "a misspelled field passed:\n{report}");
    assert!(report.contains("readOnlyRootFileSystem"), "{report}");
}

/// Nor is the custom-resource check: a Certificate whose URI SANs are a
/// string rather than a list, and a ServiceMonitor endpoint with a scheme
/// Prometheus does not know, fail it, each named.
#[test]
fn the_custom_resource_check_refuses_wrong_types_and_values() {
    let mut objs = objects(&render("production"));
    for o in &mut objs {
        if o["kind"] == "Certificate" && o["metadata"]["name"] == "cutover-agent" {
            o["spec"]["uris"] = Value::String("spiffe://cutover/agent/us-east/us-east-1".into());
        }
        if o["kind"] == "ServiceMonitor" {
            o["spec"]["endpoints"][0]["scheme"] = Value::String("gopher".into());
        }
    }
    let (ok, report) = validate_custom_resources(&objs);
    assert!(!ok, "wrong types passed:\n{report}");
    assert!(
        report.contains("FAIL Certificate cutover-agent") && report.contains("uris"),
        "{report}"
    );
    assert!(report.contains("FAIL ServiceMonitor cutover-coordinator"), "{report}");
}

#[test]
fn the_dockerfile_passes_hadolint_and_runs_as_non_root() {
    let (ok, report) = run(&pytools().join("bin/hadolint"), &["Dockerfile"], None);
    assert!(ok, "hadolint:\n{report}");
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let user = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(!user.starts_with("root") && !user.starts_with('0'), "runs as {user}");
}
