//! The control plane and the gateway reach etcd over TLS, presenting a client certificate to
//! an etcd that requires one (`--client-cert-auth`), with certificates from `berth certs`; a
//! server given an https etcd without the CA is refused at start, naming the setting.

use berth_tests::docker::ECHO_IMAGE;
use berth_tests::wire::get;
use berth_tests::{berth_bin, unique_name, ControlPlane, Etcd, Gateway};
use std::process::Command;

#[tokio::test]
async fn servers_reach_etcd_over_tls_with_a_client_certificate() {
    let certs = tempfile::tempdir().unwrap();
    berth_tests::make_certs(certs.path(), &[]);
    let etcd = Etcd::start_tls(certs.path()).await.unwrap();
    assert!(etcd.url().starts_with("https://"));
    let file = |name: &str| certs.path().join(name).display().to_string();
    let (ca, cert, key) = (file("ca.pem"), file("server.pem"), file("server-key.pem"));
    let flags = ["--etcd-ca", &ca, "--etcd-cert", &cert, "--etcd-key", &key];

    // The control plane stores an agent through TLS to etcd.
    let cp = ControlPlane::start_with(&etcd.url(), &flags).await.unwrap();
    let name = unique_name("etcd-tls");
    let out = cp.cli(&["deploy", "-n", &name, "-i", ECHO_IMAGE]);
    assert!(out.status.success(), "{out:?}\n{}", cp.log());
    let mut client = etcd.client().await.unwrap();
    let stored = client
        .get(format!("/berth/agents/{name}"), None)
        .await
        .unwrap();
    assert_eq!(stored.kvs().len(), 1, "the agent is in etcd");

    // The gateway lists its routes through TLS to etcd (it is ready once it has), and keeps a
    // request the agent cannot take yet in etcd: 202, not 404.
    let gw = Gateway::start_with(&etcd.url(), "etcd-tls", &flags)
        .await
        .unwrap();
    let queued = get(&gw.addr, &format!("/agents/{name}/health")).await;
    assert_eq!(queued.status, 202, "{}\n{}", queued.head, gw.log());
    let location = queued.header("location").expect("a Location");
    let id = location.rsplit('/').next().unwrap();
    let kept = client
        .get(
            // Waiting requests are kept under queue/ (docs/architecture.md, "Key layout").
            format!("/berth/queue/{name}/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert!(
        kept.kvs()
            .iter()
            .any(|kv| String::from_utf8_lossy(kv.value()).contains(id)),
        "request {id} is kept in etcd"
    );

    // https etcd endpoints without the CA: refused at start, naming the setting.
    for server in ["control-plane", "gateway"] {
        let out = Command::new(berth_bin())
            .arg(server)
            .args(["--etcd", &etcd.url(), "--token-file", "/dev/null"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{server}: {stderr}");
        assert!(stderr.contains("etcd_ca"), "{server}: {stderr}");
    }
}
