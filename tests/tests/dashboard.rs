//! The web dashboard in a real browser: tests/python/dashboard.py drives Debian's chromium
//! through chromedriver (Selenium) against a control plane serving it over TLS, a node agent,
//! a gateway and the example agent. Screenshots of each page go to
//! `$CARGO_TARGET_TMPDIR/dashboard/`.

use berth_tests::docker::{DockerRun, NodeAgent, ECHO_IMAGE};
use berth_tests::{berth_bin, make_certs, unique_name, ControlPlane, Etcd, Gateway, ADMIN_TOKEN};
use std::path::Path;
use std::process::Command;

#[tokio::test]
async fn the_dashboard_shows_and_acts_live_in_a_browser_and_read_only_tokens_only_look() {
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: apt-get install chromium chromium-driver (bash .ci/run does)"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("tls");
    make_certs(&certs, &[]);
    let ca = certs.join("ca.pem");
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start_tls(&etcd.url(), &certs, &[])
        .await
        .unwrap();
    let run = DockerRun::new().unwrap();
    let ca_arg = ca.display().to_string();
    let node = NodeAgent::start_with(
        &cp.url(),
        &unique_name("dash"),
        &run,
        &["--tls-ca", &ca_arg],
    )
    .unwrap();
    let gateway = Gateway::start(&etcd.url()).await.unwrap();
    let read_only = cp.create_token(&["--scope", "read-only"]);

    let agent = unique_name("dash");
    let manifest = dir.path().join("agent.yaml");
    std::fs::write(
        &manifest,
        format!(
            "name: {agent}\nimage: {ECHO_IMAGE}\nhealth: {{path: /health, interval: 1s}}\n\
             secretEnv: {{API_KEY: s3cret}}\nrequestTimeout: 1s\nreplay: {{maxAttempts: 1}}\n"
        ),
    )
    .unwrap();
    let screenshots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    let python = std::env::var("BERTH_PYTHON").unwrap_or_else(|_| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../.venv/bin/python")
            .display()
            .to_string()
    });
    let out = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/dashboard.py"))
        .env("DASHBOARD_URL", format!("https://{}", cp.dashboard_addr))
        .env("GATEWAY", &gateway.addr)
        .env("AGENT", &agent)
        .env("MANIFEST", &manifest)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("READ_ONLY_TOKEN", &read_only)
        .env("SCREENSHOTS", &screenshots)
        .env("BERTH_BIN", berth_bin())
        .env("BERTH_ADDR", cp.url())
        .env("BERTH_TLS_CA", &ca)
        .env("BERTH_TOKEN", ADMIN_TOKEN)
        .env("BERTH_CLI_CONFIG", dir.path().join("cli.yaml"))
        // The browser's own temporary directories go with the test's.
        .env("TMPDIR", dir.path())
        .output()
        .expect("run python (set BERTH_PYTHON, or run ./scripts/test which makes .venv)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{said}\n{}\n{}\n{}",
        cp.log(),
        node.log(),
        gateway.log()
    );
    eprintln!("{said}");
    for page in [
        "login",
        "agents",
        "agent",
        "nodes",
        "queue",
        "request",
        "read-only",
    ] {
        let file = screenshots.join(format!("{page}.png"));
        assert!(file.exists(), "screenshot {} written", file.display());
    }
    eprintln!("screenshots in {}", screenshots.display());
}
