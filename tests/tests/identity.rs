//! Identities bound to the system they belong to (issue: security
//! hardening, findings 1 to 3): Raft peers must be current members and
//! speak only for themselves, every identity is checked against the
//! configured trust domain, and clients accept only a coordinator as the
//! server.

use std::time::Duration;

use cutover_shared::certs::write_issued;
use cutover_shared::identity::{Identity, Role};
use cutover_shared::proto as pb;
use cutover_shared::proto::raft_service_client::RaftServiceClient;
use cutover_shared::tls::TlsFiles;
use cutover_tests::TestCluster;

const T: Duration = Duration::from_secs(15);

fn issue(c: &TestCluster, trust_domain: &str, role: Role, name: &str) -> TlsFiles {
    let who = Identity {
        role,
        name: name.into(),
    };
    let cert = c.pki.authority.issue_in(trust_domain, &who, &["localhost"]).unwrap();
    let mut files = write_issued(
        c.tmp.path(),
        &format!("{trust_domain}-{}", name.replace('/', "-")),
        &cert,
        &c.pki.ca,
    )
    .unwrap();
    // The client still expects this cluster's coordinators.
    files.trust_domain = c.pki.trust_domain.clone();
    files
}

fn propose(garbage: &[u8]) -> pb::ProposeRequest {
    pb::ProposeRequest {
        command: garbage.to_vec(),
    }
}

fn commit_index(c: &TestCluster, i: usize) -> u64 {
    c.node(i).consensus().status().commit_index
}

/// Finding 1: a coordinator certificate that is not a member (another
/// environment's node 9 from the same CA) cannot call any Raft RPC, and a
/// removed node is refused at once; a member gets past the check.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_current_members_may_call_raft() {
    let c = TestCluster::builder().nodes(3).start().await.unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    let addr = &c.configs[leader].listen;
    // The new leader's own entries (its first, blank, and its term's first
    // cluster-clock tick) must be committed before counting.
    let deadline = std::time::Instant::now() + T;
    loop {
        let st = c.node(leader).consensus().status();
        let ticked = c
            .node(leader)
            .consensus()
            .read(|s| !s.clock.wants_tick(st.term, s.dr_epochs.iter()));
        if st.commit_index > 0 && st.commit_index == st.last_log_index && ticked {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the leader never committed its entry"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = commit_index(&c, leader);

    let outsider = issue(&c, "cutover", Role::Coordinator, "9");
    let mut raft = RaftServiceClient::new(outsider.channel(addr, None).unwrap());
    let err = raft.propose(propose(b"x")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("not a member"), "{}", err.message());
    let err = raft
        .append_entries(pb::AppendEntriesRequest { payload: vec![1] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let err = raft.vote(pb::VoteRequest { payload: vec![1] }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    // A name that is not a node id is no member either.
    let named = issue(&c, "cutover", Role::Coordinator, "staging-1");
    let err = RaftServiceClient::new(named.channel(addr, None).unwrap())
        .propose(propose(b"x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    // A member passes the membership check (and then fails to decode).
    let member = (leader + 1) % 3;
    let mut raft = RaftServiceClient::new(c.pki.coordinators[member].1.channel(addr, None).unwrap());
    let err = raft.propose(propose(b"x")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert_eq!(commit_index(&c, leader), before, "nothing was committed");

    // Remove that member: its certificate stops working at once.
    let removed = c.pki.coordinators[member].0;
    c.operator(leader)
        .remove_node(pb::RemoveNodeRequest { node_id: removed })
        .await
        .unwrap();
    let err = raft.propose(propose(b"x")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("not a member"), "{}", err.message());
    c.shutdown().await;
}

/// Finding 2: the trust domain is configuration, checked on every identity.
/// A staging operator certificate signed by the production CA is refused,
/// and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_trust_domain_under_the_same_ca_is_refused() {
    let c = TestCluster::builder()
        .nodes(1)
        .trust_domain("prod")
        .start()
        .await
        .unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    let addr = &c.configs[leader].listen;
    let attest = || pb::CreateAttestationRequest {
        image: "img:1".into(),
        checks: [("tests".into(), "passed".into())].into(),
    };

    let staging = issue(&c, "staging", Role::Operator, "alice");
    let mut client = pb::control_service_client::ControlServiceClient::new(staging.channel(addr, None).unwrap());
    let err = client.create_attestation(attest()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    assert!(
        err.message()
            .contains("trust domain \"staging\" is not this system's \"prod\""),
        "{}",
        err.message()
    );
    assert!(c.node(leader).consensus().read(|s| s.attestations.is_empty()));

    // The same CA's certificate in the configured domain works.
    let prod = issue(&c, "prod", Role::Operator, "bob");
    pb::control_service_client::ControlServiceClient::new(prod.channel(addr, None).unwrap())
        .create_attestation(attest())
        .await
        .expect("a prod operator is accepted");

    // A staging coordinator is not a peer either.
    let peer = issue(&c, "staging", Role::Coordinator, "1");
    let err = RaftServiceClient::new(peer.channel(addr, None).unwrap())
        .propose(propose(b"x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    c.shutdown().await;
}

/// Finding 3: a client accepts only a coordinator of its trust domain as
/// the server. A server presenting an agent's certificate from the same CA,
/// with a matching host name, is refused during the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_refuse_a_server_that_is_not_a_coordinator() {
    let c = TestCluster::builder().nodes(1).start().await.unwrap();
    let leader = c.wait_leader(T).await.unwrap();

    // An impostor: the coordinator's own server code, but started with an
    // agent's certificate (which names localhost too).
    let agent = issue(&c, "cutover", Role::Agent, "us-east/c1");
    let mut impostor_cfg = c.configs[leader].clone();
    impostor_cfg.tls.cert = agent.cert.clone();
    impostor_cfg.tls.key = agent.key.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let impostor_addr = format!("localhost:{}", listener.local_addr().unwrap().port());
    let acceptor = cutover_shared::listener::MtlsAcceptor::new(&impostor_cfg.tls).unwrap();
    let (health, _) = {
        let (reporter, service) = tonic_health::server::health_reporter();
        (service, reporter)
    };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(acceptor.incoming(listener)),
    );

    let err =
        pb::control_service_client::ControlServiceClient::new(c.pki.operator.channel(&impostor_addr, None).unwrap())
            .list_apps(pb::ListAppsRequest {})
            .await
            .unwrap_err();
    let chain = format!("{err:?}");
    assert!(chain.contains("not a coordinator"), "{chain}");

    // The real coordinator, same client files, works.
    c.operator(leader).list_apps(pb::ListAppsRequest {}).await.unwrap();
    server.abort();
    c.shutdown().await;
}

/// A server on `listener` the way coordinators serve (the mutual-TLS
/// listener and the access guard), with health checking only, and the given
/// connection lifetimes.
fn serve_health(
    tls: &TlsFiles,
    listener: tokio::net::TcpListener,
    unverified: Duration,
    max_age: Duration,
) -> tokio::task::JoinHandle<()> {
    let acceptor = cutover_shared::listener::MtlsAcceptor::new(tls)
        .unwrap()
        .with_lifetimes(unverified, max_age);
    let (_, health) = tonic_health::server::health_reporter();
    let policy: cutover_shared::grpc::Policy = std::sync::Arc::new(|_: &str| None);
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .layer(cutover_shared::grpc::GuardLayer::new(policy, "cutover"))
            .add_service(health)
            .serve_with_incoming(acceptor.incoming(listener))
            .await;
    })
}

fn health_request() -> tonic_health::pb::HealthCheckRequest {
    tonic_health::pb::HealthCheckRequest { service: String::new() }
}

/// Finding 4 (connection lifetime): a certificate is not only checked at
/// the handshake. A long-lived connection ends when its certificate
/// expires, so the expired identity stops working on it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_identity_stops_working_when_its_certificate_expires() {
    let c = TestCluster::builder().nodes(1).start().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("localhost:{}", listener.local_addr().unwrap().port());
    let server = serve_health(
        &c.pki.coordinators[0].1,
        listener,
        Duration::from_secs(10),
        Duration::from_secs(3600),
    );
    let op = Identity {
        role: Role::Operator,
        name: "short".into(),
    };
    // Valid for the next 3 seconds.
    let cert = c
        .pki
        .authority
        .issue_window(&op, &[], Duration::from_secs(3600), 3)
        .unwrap();
    let files = write_issued(c.tmp.path(), "short-lived", &cert, &c.pki.ca).unwrap();
    let expires = std::time::Instant::now() + Duration::from_secs(3);
    let mut health = tonic_health::pb::health_client::HealthClient::new(files.channel(&addr, None).unwrap());
    health.check(health_request()).await.expect("valid while it is");
    // Keep using the same channel (one HTTP/2 connection) until refused.
    let deadline = expires + Duration::from_secs(10);
    let err = loop {
        match health.check(health_request()).await {
            Ok(_) => {
                assert!(std::time::Instant::now() < deadline, "still accepted well after expiry");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) if e.code() == tonic::Code::Unauthenticated => break e,
            // The connection was closed under the call: the next one
            // reconnects and is judged again.
            Err(_) => continue,
        }
    };
    assert!(
        std::time::Instant::now() + Duration::from_millis(1100) >= expires,
        "refused before expiry"
    );
    assert!(err.message().contains("expired"), "{}", err.message());
    server.abort();
    c.shutdown().await;
}

/// Finding 7 (resources held by clients): a connection without a verified
/// certificate is closed after a short lifetime instead of being kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unauthenticated_connection_is_closed_after_its_lifetime() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = TestCluster::builder().nodes(1).start().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = serve_health(
        &c.pki.coordinators[0].1,
        listener,
        Duration::from_millis(500),
        Duration::from_secs(3600),
    );
    // A plaintext HTTP/2 client that says hello and then idles.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle plaintext connection was kept open");
    server.abort();
    c.shutdown().await;
}

/// Finding 4 (revocation): with `tls.crl` configured, a CRL that names an
/// operator's certificate takes effect without a restart. The revoked
/// operator is refused on the connection it already has open and on new
/// ones; every other identity keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_operator_is_refused_once_the_crl_names_it() {
    use cutover_shared::certs::write_file;
    let crl_dir = tempfile::tempdir().unwrap();
    let crl = crl_dir.path().join("revoked.crl");
    let in_config = crl.clone();
    let mut c = TestCluster::builder()
        .nodes(1)
        .configure(move |cfg| cfg.tls.crl = Some(in_config.clone()))
        .prepare()
        .await
        .unwrap();
    write_file(&crl, &c.pki.authority.crl(1, &[]).unwrap(), false).unwrap();
    c.start_node(0).await.unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    let addr = c.configs[leader].listen.clone();

    let mallory = Identity {
        role: Role::Operator,
        name: "mallory".into(),
    };
    let cert = c.pki.authority.issue(&mallory, &[]).unwrap();
    let files = write_issued(c.tmp.path(), "mallory", &cert, &c.pki.ca).unwrap();
    let status = || pb::GetClusterStatusRequest {};
    let mut open = pb::control_service_client::ControlServiceClient::new(files.channel(&addr, None).unwrap());
    open.get_cluster_status(status())
        .await
        .expect("accepted before revocation");

    write_file(&crl, &c.pki.authority.crl(2, &[&cert.serial]).unwrap(), false).unwrap();
    // The same channel, whose connection was opened before the CRL.
    let deadline = std::time::Instant::now() + cutover_shared::material::RELOAD_INTERVAL * 3;
    let err = loop {
        match open.get_cluster_status(status()).await {
            Ok(_) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "still accepted after the CRL named it"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) if e.code() == tonic::Code::Unauthenticated => break e,
            Err(e) => panic!("expected UNAUTHENTICATED, got {e:?}"),
        }
    };
    assert!(err.message().contains("Revoked"), "{err:?}");
    let err = pb::control_service_client::ControlServiceClient::new(files.channel(&addr, None).unwrap())
        .get_cluster_status(status())
        .await
        .expect_err("a new connection with a revoked certificate");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("Revoked"), "{err:?}");
    // The operator and viewer from the same CA are not affected.
    c.operator(leader).get_cluster_status(status()).await.unwrap();
    c.client(&c.pki.viewer, leader)
        .unwrap()
        .get_cluster_status(status())
        .await
        .unwrap();
    c.shutdown().await;
}
