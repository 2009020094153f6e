//! The admin listeners (`/metrics`, `/healthz`, `/readyz`) of the control plane and the
//! gateway with `--admin-tls --admin-token-file`: HTTPS only, the probes open, and `/metrics`
//! readable with a token from the file, an admin token or a read-only token, and not with no
//! token, a wrong one, a node token, or a read-only token once revoked.

use berth_tests::wire::get_with_token;
use berth_tests::{berth_bin, eventually, make_certs, ControlPlane, Etcd, Gateway, ADMIN_TOKEN};
use std::path::Path;
use std::time::Duration;

const METRICS_TOKEN: &str = "metrics-scraper-token-0123456789";

/// The status of `GET path` with `token` over HTTPS (`None`: no connection or no answer).
async fn status(addr: &str, ca: &Path, path: &str, token: Option<&str>) -> Option<u16> {
    get_with_token(addr, Some(ca), path, token)
        .await
        .map(|r| r.status)
}

#[tokio::test]
async fn admin_listeners_serve_https_and_metrics_need_a_reader_token() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("tls");
    make_certs(&certs, &[]);
    let ca = certs.join("ca.pem");
    let readers = dir.path().join("metrics-tokens");
    std::fs::write(&readers, format!("# Prometheus\n{METRICS_TOKEN}\n")).unwrap();
    let readers = readers.display().to_string();

    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start_tls(
        &etcd.url(),
        &certs,
        &["--admin-tls", "--admin-token-file", &readers],
    )
    .await
    .unwrap();
    let gateway = Gateway::start_tls(
        &etcd.url(),
        "admin-gw",
        &certs,
        &["--admin-token-file", &readers],
    )
    .await
    .unwrap();
    let read_only = cp.create_token(&["--scope", "read-only"]);
    let node = cp.create_token(&["--scope", "node", "--node", "n1"]);

    for (server, addr) in [
        ("control plane", &cp.admin_addr),
        ("gateway", &gateway.admin_addr),
    ] {
        // HTTPS only: a plain-text request gets no HTTP answer.
        let plain = get_with_token(addr, None, "/healthz", None).await;
        assert!(
            plain.is_none_or(|r| r.status != 200),
            "{server}: plain HTTP must not be served"
        );
        // The probes need no token.
        assert_eq!(
            status(addr, &ca, "/healthz", None).await,
            Some(200),
            "{server}"
        );
        assert_eq!(
            status(addr, &ca, "/readyz", None).await,
            Some(200),
            "{server}"
        );
        // /metrics: refused without a reader's token, naming the scheme.
        let refused = get_with_token(addr, Some(&ca), "/metrics", None)
            .await
            .unwrap();
        assert_eq!(refused.status, 401, "{server}");
        assert_eq!(
            refused.header("www-authenticate").as_deref(),
            Some("Bearer")
        );
        for wrong in ["not-a-token-0123456789", &node] {
            assert_eq!(
                status(addr, &ca, "/metrics", Some(wrong)).await,
                Some(401),
                "{server}: {wrong}"
            );
        }
        for reader in [METRICS_TOKEN, ADMIN_TOKEN] {
            let page = get_with_token(addr, Some(&ca), "/metrics", Some(reader))
                .await
                .unwrap();
            assert_eq!(page.status, 200, "{server}");
            assert!(
                String::from_utf8_lossy(&page.body).ends_with("# EOF\n"),
                "{server}: an OpenMetrics page"
            );
        }
        // A read-only token made through TokenService, once the server's mirror has it.
        eventually(
            Duration::from_secs(5),
            "the read-only token accepted",
            || async {
                (status(addr, &ca, "/metrics", Some(&read_only)).await == Some(200)).then_some(())
            },
        )
        .await
        .unwrap();
    }

    // Revoked, it reads no more, on either server.
    let id = read_only.split_once('.').unwrap().0;
    let out = cp.cli(&["token", "revoke", id]);
    assert!(out.status.success(), "{out:?}");
    for addr in [&cp.admin_addr, &gateway.admin_addr] {
        eventually(
            Duration::from_secs(5),
            "the revoked token refused",
            || async {
                (status(addr, &ca, "/metrics", Some(&read_only)).await == Some(401)).then_some(())
            },
        )
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn admin_tls_without_a_certificate_is_refused_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{ADMIN_TOKEN}\n")).unwrap();
    for server in ["control-plane", "gateway"] {
        let out = std::process::Command::new(berth_bin())
            .arg(server)
            .args([
                "--etcd",
                "http://127.0.0.1:1",
                "--admin-tls",
                "--token-file",
            ])
            .arg(&tokens)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{server}: {text}");
        assert!(
            text.contains("admin_tls") && text.contains("tls_cert"),
            "{server}: {text}"
        );
    }
}
