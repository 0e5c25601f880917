//! Fuzzing what parses outside input (issue: security hardening, finding 8):
//! release bundles, app definitions (TOML and protobuf), agent and
//! coordinator configs, and identities from certificates.
//!
//! Why proptest and not cargo-fuzz: the build machines have one stable
//! toolchain, and libFuzzer's instrumentation needs nightly flags. Each
//! target feeds both arbitrary bytes and mutations of a valid input (byte
//! edits, truncation, splices), which reach past the first syntax check.
//! The property is always the same: no panic, no hang, and what is accepted
//! survives a round trip unchanged.
//!
//! Cases per target: `CUTOVER_FUZZ_CASES` (default 512, what CI runs; the
//! note of the stop that added this lists longer runs). A failure is saved
//! under `proptest-regressions/` and replayed first on every later run, and
//! it becomes a named regression test below.

use cutover_shared::app::AppSpec;
use cutover_shared::certs::CertAuthority;
use cutover_shared::config::{AgentConfig, CoordinatorConfig};
use cutover_shared::identity::{Identity, Role};
use cutover_shared::proto as pb;
use cutover_shared::release::{Bundle, parse_file_name};
use proptest::prelude::*;
use prost::Message;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cutover_shared::fuzz_cases(),
        // Shrinking a failure found by a long run can take long; the saved
        // seed is what matters.
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    }
}

fn example(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Edits to apply to a valid input: (position, byte) overwrites and
/// insertions, then a truncation point.
#[derive(Debug, Clone)]
struct Mutation {
    edits: Vec<(usize, u8, bool)>,
    cut: Option<usize>,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        proptest::collection::vec((any::<usize>(), any::<u8>(), any::<bool>()), 0..8),
        proptest::option::weighted(0.2, any::<usize>()),
    )
        .prop_map(|(edits, cut)| Mutation { edits, cut })
}

fn mutate(seed: &[u8], m: &Mutation) -> Vec<u8> {
    let mut out = seed.to_vec();
    for &(pos, byte, insert) in &m.edits {
        let at = if out.is_empty() { 0 } else { pos % (out.len() + 1) };
        if insert || at == out.len() {
            out.insert(at, byte);
        } else {
            out[at] = byte;
        }
    }
    if let Some(cut) = m.cut {
        out.truncate(cut % (out.len() + 1));
    }
    out
}

/// Text targets also get mutations that keep the input printable, which
/// the TOML parser gets much further with than with random bytes.
fn printable_mutation() -> impl Strategy<Value = Mutation> {
    mutation().prop_map(|mut m| {
        for e in &mut m.edits {
            e.1 = b" \n\"'=[].,0123456789abcdefxyz_-/\\{}#"[e.1 as usize % 34];
        }
        m
    })
}

// ---- release bundles -------------------------------------------------

fn file_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,4}_[a-z_]{1,12}\\.(up\\.sql|down\\.sql|sql)",
        "(\\.\\./|/|[a-z]{0,3}/)?[0-9a-z_.\\-]{0,20}",
        any::<String>(),
    ]
}

fn bundle_files() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    proptest::collection::vec(
        (
            file_name(),
            prop_oneof![
                "(create|drop|alter) table [a-z]{1,8} \\(id int\\);".prop_map(String::into_bytes),
                proptest::collection::vec(any::<u8>(), 0..64),
            ],
        ),
        0..6,
    )
}

fn check_bundle(files: Vec<(String, Vec<u8>)>) {
    let names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    if let Ok(bundle) = Bundle::parse(files) {
        // Whatever is accepted is a migration file by name, and parses
        // again to the same bundle with the same digest.
        for n in &names {
            parse_file_name(n).expect("an accepted bundle has only migration names");
            assert!(!n.contains('/') && !n.contains(".."), "accepted a path: {n:?}");
        }
        let again = Bundle::parse(
            bundle
                .files()
                .into_iter()
                .map(|(n, sql)| (n, sql.into_bytes()))
                .collect(),
        )
        .expect("a bundle's own files parse");
        assert_eq!(again, bundle);
        assert_eq!(again.digest(), bundle.digest());
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn bundle_parser(files in bundle_files()) {
        check_bundle(files);
    }

    #[test]
    fn bundle_file_names(name in any::<String>()) {
        if let Ok(parsed) = parse_file_name(&name) {
            prop_assert!(!name.contains('/') && !name.contains('\\') && !name.contains(".."), "{name:?} -> {parsed:?}");
        }
    }
}

// ---- app definitions -------------------------------------------------

fn check_app_toml(text: &str) {
    let Ok(spec) = toml::from_str::<AppSpec>(text) else {
        return;
    };
    if spec.validate().is_err() {
        return;
    }
    let out = spec.to_toml().expect("a valid app serializes");
    let back: AppSpec = toml::from_str(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
    assert_eq!(back, spec);
    // And through the API's protobuf form.
    let wire = pb::App::from(spec.clone());
    let from_wire = cutover_shared::convert::app_from_proto(wire).expect("a valid app converts back");
    assert_eq!(from_wire, spec);
}

fn check_app_proto(bytes: &[u8]) {
    let Ok(app) = pb::App::decode(bytes) else { return };
    let Ok(spec) = cutover_shared::convert::app_from_proto(app) else {
        return;
    };
    // What the API accepts is valid, serializes as TOML and comes back.
    spec.validate().expect("app_from_proto validates");
    let wire = pb::App::from(spec.clone());
    assert_eq!(cutover_shared::convert::app_from_proto(wire).unwrap(), spec);
    check_app_toml(&spec.to_toml().unwrap());
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn app_toml_arbitrary(text in any::<String>()) {
        check_app_toml(&text);
    }

    #[test]
    fn app_toml_mutated(m in printable_mutation()) {
        let seed = example("app-sample.toml");
        check_app_toml(&String::from_utf8_lossy(&mutate(seed.as_bytes(), &m)));
    }

    #[test]
    fn app_proto_arbitrary(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_app_proto(&bytes);
    }

    #[test]
    fn app_proto_mutated(m in mutation()) {
        let spec: AppSpec = toml::from_str(&example("app-sample.toml")).unwrap();
        let seed = pb::App::from(spec).encode_to_vec();
        check_app_proto(&mutate(&seed, &m));
    }
}

// ---- process configs -------------------------------------------------

fn check_configs(text: &str) {
    if let Ok(cfg) = toml::from_str::<AgentConfig>(text) {
        let _ = cfg.validate();
    }
    if let Ok(cfg) = toml::from_str::<CoordinatorConfig>(text) {
        let _ = cfg.validate();
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn configs_arbitrary(text in any::<String>()) {
        check_configs(&text);
    }

    #[test]
    fn configs_mutated(which in 0usize..2, m in printable_mutation()) {
        let seed = example(["agent-us-east.toml", "coordinator-1.toml"][which]);
        check_configs(&String::from_utf8_lossy(&mutate(seed.as_bytes(), &m)));
    }
}

// ---- identities from certificates ------------------------------------

fn sample_certificate() -> Vec<u8> {
    use std::sync::OnceLock;
    static DER: OnceLock<Vec<u8>> = OnceLock::new();
    DER.get_or_init(|| {
        let ca = CertAuthority::generate("fuzz CA").unwrap();
        let who = Identity {
            role: Role::Agent,
            name: "us-east/us-east-1".into(),
        };
        let issued = ca.issue(&who, &["localhost"]).unwrap();
        let der = rustls_pki_der(&issued.cert_pem);
        assert_eq!(Identity::from_certificate_der(&der, "cutover").unwrap(), who);
        der
    })
    .clone()
}

fn rustls_pki_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

fn check_uri(uri: &str) {
    if let Ok(id) = Identity::from_spiffe_uri(uri, "cutover") {
        assert_eq!(id.spiffe_uri("cutover"), uri, "an accepted URI is canonical");
        assert!(!id.name.contains(".."), "{uri:?}");
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn identity_from_arbitrary_der(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let _ = Identity::from_certificate_der(&bytes, "cutover");
    }

    #[test]
    fn identity_from_mutated_certificate(m in mutation()) {
        let der = mutate(&sample_certificate(), &m);
        if let Ok(id) = Identity::from_certificate_der(&der, "cutover") {
            // A mutated certificate that still parses names a well-formed
            // identity (the signature is the TLS layer's business).
            check_uri(&id.spiffe_uri("cutover"));
        }
    }

    #[test]
    fn identity_from_uri(uri in prop_oneof![
        any::<String>(),
        "spiffe://(cutover|CUTOVER|cut over|)/(coordinator|agent|operator|viewer|root)/[a-z0-9./\\-%]{0,40}",
    ]) {
        check_uri(&uri);
    }
}
