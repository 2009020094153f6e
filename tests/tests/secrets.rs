//! Secret environment variables on real Docker: the container gets the value; no output of
//! the CLI, no log of Berth's own processes and no agent, status or event key in etcd holds
//! it; `<redacted>` keeps the stored value on update, and a new value rolls out.

use berth_proto::v1::Agent;
use berth_tests::docker::{http, wait_agent, DockerRun, NodeAgent, ECHO_IMAGE};
use berth_tests::{unique_name, ControlPlane, Etcd, Gateway};
use std::time::Duration;

fn ready_addresses(agent: &Agent, generation: i64) -> Vec<String> {
    agent
        .status
        .iter()
        .flat_map(|s| &s.replicas)
        .filter(|r| r.ready && r.generation == generation)
        .map(|r| r.address.clone())
        .collect()
}

#[tokio::test]
async fn a_secret_reaches_the_container_and_nothing_else() {
    let run = DockerRun::new().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let node = NodeAgent::start(&cp.url(), &unique_name("node"), &run).unwrap();
    let gw = Gateway::start(&etcd.url()).await.unwrap();
    let api = cp.agents().await.unwrap();
    let name = unique_name("secret");
    let secret = format!("s3cret-{}", unique_name("v"));
    let out = cp.deploy_echo(
        &name,
        &[
            "--secret-env",
            &format!("API_KEY={secret}"),
            "-e",
            "PLAIN=1",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let agent = wait_agent(&api, &name, "ready", |a| ready_addresses(a, 1).len() == 1)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
    let address = ready_addresses(&agent, 1)[0].clone();
    let (code, given) = http(&address, "GET", "/env/API_KEY").await.unwrap();
    assert_eq!(
        (code, given.as_str()),
        (200, secret.as_str()),
        "the container has it"
    );

    // Everything that shows the agent shows `<redacted>`; nothing holds the value.
    let mut seen = Vec::new();
    for args in [
        vec!["get", name.as_str()],
        vec!["get", name.as_str(), "-o", "json"],
        vec!["get", name.as_str(), "-o", "yaml"],
        vec!["ls", "-o", "json"],
        vec!["events", name.as_str()],
        vec!["logs", name.as_str(), "--tail", "200"],
    ] {
        let out = cp.cli(&args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        seen.push((format!("berth {}", args.join(" ")), format!("{out:?}")));
    }
    assert!(seen[0].1.contains("API_KEY=<redacted>"), "{}", seen[0].1);
    seen.push(("control-plane log".into(), cp.log()));
    seen.push(("node-agent log".into(), node.log()));
    seen.push(("gateway log".into(), gw.log()));
    let mut kv = etcd.client().await.unwrap();
    for prefix in ["/berth/agents/", "/berth/status/", "/berth/events/"] {
        let resp = kv
            .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .unwrap();
        for kv in resp.kvs() {
            seen.push((
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
            ));
        }
    }
    for (what, text) in &seen {
        assert!(!text.contains(&secret), "the secret appears in {what}");
    }
    eprintln!(
        "secret absent from {} outputs, logs and etcd keys",
        seen.len()
    );

    // `<redacted>` on update keeps the value: nothing changes. A new value rolls out.
    let dir = tempfile::tempdir().unwrap();
    let manifest = |value: &str| {
        let path = dir.path().join(format!("{}.yaml", unique_name("m")));
        let text = format!(
            "name: {name}\nimage: {ECHO_IMAGE}\nenv: {{PLAIN: '1'}}\nsecretEnv: {{API_KEY: '{value}'}}\nhealth: {{path: /health, interval: 1s}}\n"
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    let out = cp.cli(&["apply", "-f", manifest("<redacted>").to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("unchanged"),
        "{out:?}"
    );
    let rotated = format!("r0tated-{}", unique_name("v"));
    let out = cp.cli(&["apply", "-f", manifest(&rotated).to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let agent = wait_agent(&api, &name, "the new secret rolled out", |a| {
        let generation = a.meta.as_ref().map_or(0, |m| m.generation);
        generation == 2 && ready_addresses(a, 2).len() == 1
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
    let address = ready_addresses(&agent, 2)[0].clone();
    let given = tokio::time::timeout(
        Duration::from_secs(10),
        http(&address, "GET", "/env/API_KEY"),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(given, (200, rotated.clone()));
    assert!(!cp.log().contains(&rotated) && !node.log().contains(&rotated));
    // A secret named like a plain variable is refused, naming the field and not the value.
    let out = cp.deploy_echo(
        &unique_name("both"),
        &["-e", "K=1", "--secret-env", "K=hidden-value"],
    );
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("spec.secret_env[\"K\"]") && !said.contains("hidden-value"),
        "{said}"
    );
}
