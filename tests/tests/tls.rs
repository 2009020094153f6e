//! TLS on the control plane's gRPC API with certificates from `berth certs`: the CLI over
//! https with the CA, a plain-text client and a client trusting another CA refused, node
//! agents required to present a client certificate (mTLS) that names their node, and a real
//! `berth node-agent` joining over mTLS with a certificate made later from the same CA.

use berth_proto::v1::{Node, NodeStatus};
use berth_tests::docker::DockerRun;
use berth_tests::{
    berth_bin, end_of, eventually, make_certs, open_node_session, open_node_stream, unique_name,
    ControlPlane, Etcd, JOIN_TOKEN,
};
use prost::Message;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A TLS channel to the control plane, presenting node `node`'s certificate from `certs`.
async fn node_channel(cp: &ControlPlane, certs: &Path, node: &str) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(certs.join("ca.pem")).unwrap(),
        ))
        .identity(Identity::from_pem(
            std::fs::read(certs.join(format!("nodes/{node}.pem"))).unwrap(),
            std::fs::read(certs.join(format!("nodes/{node}-key.pem"))).unwrap(),
        ));
    Channel::from_shared(cp.url())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Opens the node-agent stream over TLS (with `identity` as the client certificate, if any);
/// the first control message or the refusal.
async fn stream(
    cp: &ControlPlane,
    tls: ClientTlsConfig,
    node: &str,
) -> Result<berth_proto::v1::ControlMessage, tonic::Status> {
    let channel = Channel::from_shared(cp.url())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
    open_node_stream(channel, JOIN_TOKEN, node).await
}

#[tokio::test]
async fn the_api_speaks_tls_and_node_agents_present_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
    make_certs(&ours, &["n1"]);
    make_certs(&theirs, &["n1"]);
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start_tls(&etcd.url(), &ours, &["--require-node-cert"])
        .await
        .unwrap();

    // The CLI over https, verifying the server with the CA.
    let out = cp.cli(&["ls"]);
    assert!(out.status.success(), "{out:?}\n{}", cp.log());

    // A plain-text client is refused.
    let plain = cp
        .cli_command(&["ls"])
        .env("BERTH_ADDR", format!("http://{}", cp.addr))
        .output()
        .unwrap();
    assert!(!plain.status.success(), "plain text must not be served");
    let raw = Channel::from_shared(format!("http://{}", cp.addr))
        .unwrap()
        .connect()
        .await;
    let refused = match raw {
        Err(_) => true,
        Ok(channel) => tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "a plain-text gRPC call is refused");

    // A client that trusts another CA does not trust this server.
    let out = cp
        .cli_command(&["ls"])
        .env("BERTH_TLS_CA", theirs.join("ca.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    // https without a CA: the CLI says what to give it.
    let out = cp
        .cli_command(&["ls"])
        .env_remove("BERTH_TLS_CA")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--tls-ca"),
        "{out:?}"
    );

    // mTLS: the node-agent stream needs a client certificate from this CA.
    let ca = Certificate::from_pem(std::fs::read(ours.join("ca.pem")).unwrap());
    let identity = |certs: &Path| {
        Identity::from_pem(
            std::fs::read(certs.join("nodes/n1.pem")).unwrap(),
            std::fs::read(certs.join("nodes/n1-key.pem")).unwrap(),
        )
    };
    let without = stream(&cp, ClientTlsConfig::new().ca_certificate(ca.clone()), "n1")
        .await
        .unwrap_err();
    assert_eq!(without.code(), tonic::Code::Unauthenticated, "{without:?}");
    assert!(without.message().contains("client certificate"));
    let foreign = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .identity(identity(&theirs));
    assert!(
        stream(&cp, foreign, "n1").await.is_err(),
        "a certificate from another CA"
    );
    let with = ClientTlsConfig::new()
        .ca_certificate(ca)
        .identity(identity(&ours));
    stream(&cp, with.clone(), "n1")
        .await
        .expect("the stream opens with our node certificate");
    // A node certificate speaks for the node it names only.
    let other = stream(&cp, with, "n2").await.unwrap_err();
    assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other:?}");
    assert!(
        other.message().contains("does not name node n2"),
        "{other:?}"
    );

    // A real node agent joins over mTLS.
    let run = DockerRun::new().unwrap();
    let name = unique_name("tls");
    make_certs(&ours, &[&name]);
    let join = dir.path().join("join");
    std::fs::write(&join, format!("{JOIN_TOKEN}\n")).unwrap();
    let state = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
    let mut node = Command::new(berth_bin())
        .arg("node-agent")
        .args(["--control-plane", &cp.url(), "--name", &name])
        .arg("--join-token-file")
        .arg(&join)
        .arg("--tls-ca")
        .arg(ours.join("ca.pem"))
        .arg("--tls-cert")
        .arg(ours.join(format!("nodes/{name}.pem")))
        .arg("--tls-key")
        .arg(ours.join(format!("nodes/{name}-key.pem")))
        .arg("--state-dir")
        .arg(state.path())
        .arg("--volume-root")
        .arg(berth_tests::volume_root())
        .args(["--network", &run.network])
        .args(["--container-label", &format!("berth.test={}", run.id)])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let joined = eventually(
        Duration::from_secs(20),
        "the node agent joined over mTLS",
        || async {
            let mut kv = etcd.client().await.ok()?;
            let resp = kv.get(format!("/berth/nodes/{name}"), None).await.ok()?;
            let record = Node::decode(resp.kvs().first()?.value()).ok()?;
            (record.status == NodeStatus::Ready as i32).then_some(())
        },
    )
    .await;
    let _ = node.kill();
    let _ = node.wait();
    joined.unwrap_or_else(|e| {
        panic!(
            "{e}\n{}",
            std::fs::read_to_string(dir.path().join("node.log")).unwrap_or_default()
        )
    });
}

#[tokio::test]
async fn a_denied_node_is_refused_and_its_open_stream_ends_within_a_second() {
    use std::time::Instant;
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("tls");
    let (lost, kept) = (unique_name("lost"), unique_name("kept"));
    make_certs(&certs_dir, &[&lost, &kept]);
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start_tls(&etcd.url(), &certs_dir, &["--require-node-cert"])
        .await
        .unwrap();
    let mut lost_session = open_node_session(
        node_channel(&cp, &certs_dir, &lost).await,
        JOIN_TOKEN,
        &lost,
    )
    .await
    .expect("the node connects before it is denied");
    let mut kept_session = open_node_session(
        node_channel(&cp, &certs_dir, &kept).await,
        JOIN_TOKEN,
        &kept,
    )
    .await
    .expect("another node connects");
    let record = |name: String| {
        let etcd = &etcd;
        async move {
            let mut kv = etcd.client().await.unwrap();
            let resp = kv.get(format!("/berth/nodes/{name}"), None).await.unwrap();
            !resp.kvs().is_empty()
        }
    };
    assert!(record(lost.clone()).await, "the node's record is written");

    // Denied while connected: its stream ends with why, within a second, and its record goes.
    let out = cp.cli(&["deny", &lost, "--reason", "laptop stolen"]);
    assert!(out.status.success(), "{out:?}");
    let denied_at = Instant::now();
    let ended = end_of(&mut lost_session.inbound).await;
    let took = denied_at.elapsed();
    eprintln!("the denied node's stream ended {took:?} after the deny: {ended:?}");
    let ended = ended.expect("ended with a status");
    assert_eq!(ended.code(), tonic::Code::PermissionDenied, "{ended:?}");
    assert!(ended.message().contains("laptop stolen"), "{ended:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(!record(lost.clone()).await, "its record is gone");

    // Refused when it comes back, with its certificate, whatever the token.
    let again = open_node_stream(
        node_channel(&cp, &certs_dir, &lost).await,
        JOIN_TOKEN,
        &lost,
    )
    .await
    .unwrap_err();
    assert_eq!(again.code(), tonic::Code::PermissionDenied, "{again:?}");
    assert!(again.message().contains("is denied"), "{again:?}");

    // The other node is untouched: its stream is still open.
    let still_open =
        tokio::time::timeout(Duration::from_millis(300), kept_session.inbound.message()).await;
    assert!(
        still_open.is_err(),
        "the other node's stream goes on: {still_open:?}"
    );

    // The deny list names it, with why; a read-only token may read it.
    let out = cp.cli(&["nodes", "--denied"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && listed.contains(&lost) && listed.contains("laptop stolen"),
        "{listed}"
    );
    // Bad input is named.
    let out = cp.cli(&["deny", "Not_A_Name"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("name"),
        "{out:?}"
    );
    let out = cp.cli(&["deny", &lost, "--reason", &"x".repeat(300)]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("reason"),
        "{out:?}"
    );

    // Allowed again, it connects.
    let out = cp.cli(&["allow", &lost]);
    assert!(out.status.success(), "{out:?}");
    open_node_stream(
        node_channel(&cp, &certs_dir, &lost).await,
        JOIN_TOKEN,
        &lost,
    )
    .await
    .expect("the node connects once allowed");
    let out = cp.cli(&["allow", &lost]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not denied"),
        "{out:?}"
    );
    drop(kept_session);
}
