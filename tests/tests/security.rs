//! Mutual TLS and roles: who is refused, with what status, and that a
//! refused call changes nothing. Also: health and reflection on the port.

use std::time::Duration;

use cutover_shared::certs::{CertAuthority, write_issued};
use cutover_shared::identity::{Identity, Role};
use cutover_shared::proto as pb;
use cutover_shared::proto::control_service_client::ControlServiceClient;
use cutover_shared::tls::TlsFiles;
use cutover_tests::TestCluster;
use tokio_stream::StreamExt;

const T: Duration = Duration::from_secs(15);

fn attest_req() -> pb::CreateAttestationRequest {
    pb::CreateAttestationRequest {
        image: "img:1".into(),
        checks: [("tests".into(), "passed".into())].into(),
    }
}

/// Refused callers get UNAUTHENTICATED with the reason, never an answer.
fn assert_unauthenticated(err: &tonic::Status, what: &str, reason: &str) {
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{what}: {err}");
    assert!(
        err.message().contains(reason),
        "{what}: {:?} does not say {reason:?}",
        err.message()
    );
}

fn audit_len(c: &TestCluster, i: usize) -> usize {
    c.node(i).consensus().read(|s| s.audit.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plaintext_unknown_ca_and_expired_callers_are_refused() {
    let c = TestCluster::builder().nodes(3).start().await.unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    let addr = c.configs[leader].listen.clone();

    // Plaintext HTTP/2 against the TLS port.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let err = ControlServiceClient::new(plain)
        .get_cluster_status(pb::GetClusterStatusRequest {})
        .await
        .unwrap_err();
    assert_unauthenticated(&err, "plaintext", "requires mutual TLS");

    // A certificate from another CA, naming a perfectly good operator.
    let dir = c.tmp.path().join("rogue");
    std::fs::create_dir_all(&dir).unwrap();
    let rogue_ca = CertAuthority::generate("rogue CA").unwrap();
    let op = Identity {
        role: Role::Operator,
        name: "mallory".into(),
    };
    let rogue = write_issued(&dir, "rogue", &rogue_ca.issue(&op, &[]).unwrap(), &c.pki.ca).unwrap();
    let err = c
        .client(&rogue, leader)
        .unwrap()
        .create_attestation(attest_req())
        .await
        .unwrap_err();
    assert_unauthenticated(&err, "unknown CA", "UnknownIssuer");

    assert_eq!(audit_len(&c, leader), 0, "nothing was recorded");
    assert!(
        c.node(leader).consensus().read(|s| s.attestations.is_empty()),
        "nothing changed"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_certificate_is_refused() {
    // A second CA that the nodes also trust, so that we hold its key and can
    // issue both a valid and an expired operator certificate from it.
    let ca = std::sync::Arc::new(CertAuthority::generate("second CA").unwrap());
    let ca_pem = ca.cert_pem().to_owned();
    let c = TestCluster::builder()
        .nodes(1)
        .configure(move |cfg| {
            let bundle = cfg.data_dir.with_extension("ca-bundle.pem");
            let mut pem = std::fs::read_to_string(&cfg.tls.ca).unwrap();
            pem.push_str(&ca_pem);
            std::fs::create_dir_all(bundle.parent().unwrap()).unwrap();
            std::fs::write(&bundle, pem).unwrap();
            cfg.tls.ca = bundle;
        })
        .start()
        .await
        .unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    let dir = c.tmp.path().join("second");
    std::fs::create_dir_all(&dir).unwrap();
    let op = Identity {
        role: Role::Operator,
        name: "ci".into(),
    };
    let valid = write_issued(&dir, "valid", &ca.issue(&op, &[]).unwrap(), &c.pki.ca).unwrap();
    c.client(&valid, leader)
        .unwrap()
        .create_attestation(attest_req())
        .await
        .expect("a valid certificate from the second CA works");
    let expired: TlsFiles = write_issued(
        &dir,
        "expired",
        &ca.issue_window(&op, &[], Duration::from_secs(7200), -3600).unwrap(),
        &c.pki.ca,
    )
    .unwrap();
    let before = audit_len(&c, leader);
    let err = c
        .client(&expired, leader)
        .unwrap()
        .create_attestation(attest_req())
        .await
        .unwrap_err();
    assert_unauthenticated(&err, "expired", "xpired");
    assert_eq!(audit_len(&c, leader), before, "the expired caller changed nothing");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_roles_are_refused_and_change_nothing() {
    let c = TestCluster::builder()
        .nodes(3)
        .regions(&[("us-east", "us-east-1"), ("eu-west", "eu-west-1")])
        .start()
        .await
        .unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    let before = audit_len(&c, leader);

    // A viewer reads but cannot write.
    let mut viewer = c.client(&c.pki.viewer, leader).unwrap();
    viewer.get_cluster_status(pb::GetClusterStatusRequest {}).await.unwrap();
    viewer.list_agents(pb::ListAgentsRequest::default()).await.unwrap();
    let err = viewer.create_attestation(attest_req()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("viewer/viewer") && err.message().contains("operator"),
        "{}",
        err.message()
    );
    let err = viewer
        .remove_node(pb::RemoveNodeRequest { node_id: 1 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // An agent certificate cannot use the control API's writes.
    let agent_files = c.pki.agents[0].2.clone();
    let err = c
        .client(&agent_files, leader)
        .unwrap()
        .create_attestation(attest_req())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // An operator cannot speak Raft to a coordinator.
    let ch = c.pki.operator.channel(&c.configs[leader].listen, None).unwrap();
    let err = pb::raft_service_client::RaftServiceClient::new(ch)
        .vote(pb::VoteRequest {
            payload: b"{}".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    assert_eq!(
        audit_len(&c, leader),
        before,
        "refused calls left no trace in the state"
    );
    assert!(c.node(leader).consensus().read(|s| s.attestations.is_empty()));
    assert_eq!(c.node(leader).consensus().status().members.len(), 3);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_cannot_act_as_another_cluster() {
    let c = TestCluster::builder()
        .nodes(1)
        .regions(&[("us-east", "us-east-1"), ("eu-west", "eu-west-1")])
        .start()
        .await
        .unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    let us_east = c.pki.agents[0].2.clone();
    let ch = us_east.channel(&c.configs[leader].listen, None).unwrap();
    let mut client = pb::agent_service_client::AgentServiceClient::new(ch);
    let register = pb::ConnectRequest {
        message: Some(pb::connect_request::Message::Register(pb::Register {
            cluster: Some(pb::ClusterRef {
                region: "eu-west".into(),
                cluster: "eu-west-1".into(),
            }),
            agent_version: "evil".into(),
            task_kinds: vec!["echo".into()],
            traffic_apps: vec![],
        })),
    };
    let err = client.connect(tokio_stream::iter(vec![register])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("us-east/us-east-1"), "{}", err.message());
    assert!(
        c.node(leader).consensus().read(|s| s.agents.is_empty()),
        "no agent was registered"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_with_clear_errors() {
    let c = TestCluster::builder()
        .nodes(1)
        .regions(&[("us-east", "us-east-1")])
        .start()
        .await
        .unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    let mut op = c.operator(leader);
    let task = |region: &str, cluster: &str| pb::RunTaskRequest {
        target: Some(pb::ClusterRef {
            region: region.into(),
            cluster: cluster.into(),
        }),
        kind: "echo".into(),
        params: Default::default(),
    };
    let err = op.run_task(task("../x", "c1")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("region"), "{}", err.message());
    let err = op.run_task(task("mars", "c1")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = op
        .get_status(pb::GetStatusRequest {
            app: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    // A 1 MiB bad value is refused as INVALID_ARGUMENT, quoting only a
    // prefix: the whole value in the status would exceed the metadata limit
    // and reach the client as RESOURCE_EXHAUSTED instead.
    let huge = "x/".repeat(512 * 1024);
    let err = op
        .get_operation(pb::GetOperationRequest {
            operation_id: huge.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{}", err.message());
    assert!(err.message().len() < 300, "{} bytes", err.message().len());
    assert!(err.message().contains("(1048576 bytes)"), "{}", err.message());
    let mut big_param = task("us-east", "us-east-1");
    big_param.params.insert(huge, "v".into());
    let err = op.run_task(big_param).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{}", err.message());
    assert!(err.message().len() < 300, "{} bytes", err.message().len());
    let err = op
        .get_operation(pb::GetOperationRequest {
            operation_id: "../../etc".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // An oversize message is refused by the server before any handler runs.
    let huge = pb::CreateAttestationRequest {
        image: "x".repeat(8 * 1024 * 1024),
        checks: Default::default(),
    };
    let err = op.create_attestation(huge).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    assert!(err.message().contains("too large"), "{}", err.message());
    assert!(
        c.node(leader)
            .consensus()
            .read(|s| s.operations.is_empty() && s.attestations.is_empty())
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_and_both_reflection_versions_answer() {
    let c = TestCluster::builder().nodes(1).start().await.unwrap();
    let leader = c.wait_leader(T).await.unwrap();
    let ch = c.pki.viewer.channel(&c.configs[leader].listen, None).unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(ch.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "cutover.v1.ControlService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1 as r1;
    use tonic_reflection::pb::v1alpha as r1a;
    let req = r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = r1::server_reflection_client::ServerReflectionClient::new(ch.clone())
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    let Some(r1::server_reflection_response::MessageResponse::ListServicesResponse(list)) = resp.message_response
    else {
        panic!("unexpected reflection reply")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in [
        "cutover.v1.ControlService",
        "cutover.v1.AgentService",
        "cutover.v1.RaftService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&s.to_string()), "{s} missing from {names:?}");
    }
    let req = r1a::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r1a::server_reflection_request::MessageRequest::FileContainingSymbol(
            "cutover.v1.ControlService".into(),
        )),
    };
    let mut stream = r1a::server_reflection_client::ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    assert!(matches!(
        resp.message_response,
        Some(r1a::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()
    ));
    c.shutdown().await;
}
