//! `berth export`: every agent as a manifest that `berth apply -f` turns back into the same
//! agents on a fresh cluster (specs compared field by field, the gateway token by its hash);
//! secret values only with `--include-secrets` and an admin token.

use berth_tests::{output_text as text, unique_name, ControlPlane, Etcd};
use std::io::Write;
use std::process::{Output, Stdio};

/// `berth apply -f -` with `manifest` on standard input.
fn apply_stdin(cp: &ControlPlane, manifest: &str) -> Output {
    let mut child = cp
        .cli_command(&["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(manifest.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// The agents' specs as JSON, by name.
fn specs(cp: &ControlPlane) -> serde_json::Value {
    let out = cp.cli(&["ls", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut by_name = serde_json::Map::new();
    for agent in listed["agents"].as_array().unwrap() {
        let spec = agent["spec"].clone();
        by_name.insert(spec["name"].as_str().unwrap().to_string(), spec);
    }
    serde_json::Value::Object(by_name)
}

#[tokio::test]
async fn an_export_applied_to_a_fresh_cluster_recreates_the_same_agents() {
    let (etcd, fresh_etcd) = (Etcd::start().await.unwrap(), Etcd::start().await.unwrap());
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let (first, second) = (unique_name("exp-a"), unique_name("exp-b"));
    let out = cp.cli(&[
        "deploy",
        "-n",
        &first,
        "-i",
        "example/echo:1",
        "-e",
        "MODE=fast",
        "--secret-env",
        "API_KEY=s3cret-value",
        "--token",
        "gateway-token-0123456789",
        "--replicas",
        "2",
        "-m",
        "512M",
        "-c",
        "500m",
        "--health-endpoint",
        "/health",
        "--health-interval",
        "5s",
        "-l",
        "team=ai",
        "--node-selector",
        "gpu=true",
        "--request-timeout",
        "45s",
        "--replay-concurrency",
        "2",
        "--restart",
        "on-failure",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let manifest = format!(
        "name: {second}\nimage: example/worker:2\ncommand: [run, --fast]\nvolumes: [\"cache:/cache:ro\"]\n\
         replay: {{maxBody: 2M, maxQueued: 50, ttl: 1h, maxAttempts: 4}}\n\
         breaker: {{consecutiveFailures: 7, basePenalty: 1s, maxPenalty: 1m}}\nstopGrace: 3s\n"
    );
    let out = apply_stdin(&cp, &manifest);
    assert!(out.status.success(), "{}", text(&out));

    // Without --include-secrets the values stay <redacted>, and a fresh cluster refuses them,
    // naming the key, having created nothing of that agent.
    let out = cp.cli(&["export"]);
    assert!(out.status.success(), "{}", text(&out));
    let redacted = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(redacted.contains("API_KEY: <redacted>"), "{redacted}");
    assert!(!redacted.contains("s3cret-value") && !redacted.contains("gateway-token-0123456789"));
    assert!(redacted.contains("tokenSha256:"), "{redacted}");
    let fresh = ControlPlane::start(&fresh_etcd.url()).await.unwrap();
    let out = apply_stdin(&fresh, &redacted);
    assert!(!out.status.success());
    assert!(text(&out).contains("API_KEY"), "{}", text(&out));

    // A read-only token may not read the secrets.
    let read_only = cp.create_token(&["--scope", "read-only"]);
    let out = cp
        .cli_command(&["export", "--include-secrets"])
        .env("BERTH_TOKEN", &read_only)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("admin token"), "{}", text(&out));

    // With them, into a file only its owner may read, and applied: the same agents.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agents.yaml");
    let out = cp.cli(&["export", "--include-secrets", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "readable by its owner only: {mode:o}");
    // `berth export | berth apply -f -`, the file standing in for the pipe.
    let out = apply_stdin(&fresh, &std::fs::read_to_string(&file).unwrap());
    assert!(out.status.success(), "{}", text(&out));
    let (before, after) = (specs(&cp), specs(&fresh));
    for name in [&first, &second] {
        assert_eq!(before[name.as_str()], after[name.as_str()], "agent {name}");
    }
    assert_eq!(after[first.as_str()]["secretEnv"]["API_KEY"], "<redacted>");
    // The secret itself came along, and the gateway token by its hash.
    let out = fresh.cli(&["export", "--include-secrets"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("API_KEY: s3cret-value"));
    assert_eq!(
        before[first.as_str()]["gatewayTokenSha256"],
        after[first.as_str()]["gatewayTokenSha256"]
    );
    assert!(before[first.as_str()]["gatewayTokenSha256"]
        .as_str()
        .is_some_and(|h| h.len() == 64));
}
