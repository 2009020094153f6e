//! TLS on the control plane's gRPC API with certificates from `berth certs`: the CLI over
//! https with the CA, a plain-text client and a client trusting another CA refused, node
//! agents required to present a client certificate (mTLS) that names their node, and a real
//! `berth node-agent` joining over mTLS with a certificate made later from the same CA.

use berth_proto::v1::{Node, NodeStatus};
use berth_tests::docker::DockerRun;
use berth_tests::{
    berth_bin, eventually, open_node_stream, unique_name, ControlPlane, Etcd, JOIN_TOKEN,
};
use prost::Message;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// `berth certs --dir DIR --node NODE...`: the CA and server certificate at first, node
/// certificates from the existing CA after.
fn certs(dir: &Path, nodes: &[&str]) {
    let mut command = Command::new(berth_bin());
    command.args(["certs", "--dir"]).arg(dir);
    for node in nodes {
        command.args(["--node", node]);
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "{out:?}");
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
    certs(&ours, &["n1"]);
    certs(&theirs, &["n1"]);
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
    certs(&ours, &[&name]);
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
