//! The `berth` CLI and a Python client generated from `proto/`, against a live control plane.

use berth_proto::v1::{Request, RequestState};
use berth_tests::{unique_name, ControlPlane, Etcd};
use std::process::{Command, Output};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn cli_deploys_gets_and_applies() {
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();

    let out = cp.cli(&[
        "deploy",
        "-n",
        "hello",
        "-i",
        "example/echo:1",
        "--replicas",
        "2",
        "-e",
        "A=1",
        "-m",
        "512M",
        "-c",
        "500m",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("agent/hello created"),
        "{}",
        stdout(&out)
    );

    let out = cp.cli(&["get", "hello", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let agent: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        agent["meta"]["generation"], "1",
        "int64 is a string in canonical JSON"
    );
    assert_eq!(agent["meta"]["desiredState"], "DESIRED_STATE_RUNNING");
    assert_eq!(agent["spec"]["replicas"], 2);
    assert_eq!(agent["spec"]["env"]["A"], "1");
    assert_eq!(
        agent["spec"]["resources"]["memoryBytes"],
        (512u64 << 20).to_string()
    );
    assert_eq!(agent["spec"]["resources"]["cpuMillis"], 500);
    assert_eq!(agent["spec"]["stopGrace"], "10s");

    let out = cp.cli(&["get", "hello", "-o", "yaml"]);
    assert!(stdout(&out).contains("generation: '1'"), "{}", stdout(&out));
    let out = cp.cli(&["ls"]);
    assert!(
        stdout(&out).contains("hello") && stdout(&out).contains("0/2"),
        "{}",
        stdout(&out)
    );

    let out = cp.cli(&["deploy", "-n", "Bad_Name", "-i", "example/echo:1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("spec.name"), "{}", stderr(&out));

    let out = cp.cli(&["deploy", "-n", "hello", "-i", "example/echo:1"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already exists") && stderr(&out).contains("berth apply"),
        "{}",
        stderr(&out)
    );

    let out = cp.cli(&[
        "deploy",
        "-n",
        "x",
        "-i",
        "example/echo:1",
        "--memory",
        "lots",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("memory"), "{}", stderr(&out));

    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("agents.yaml");
    let two = "name: one\nimage: example/echo:1\nhealth: {path: /health, interval: 5s}\n---\nname: two\nimage: example/echo:1\nreplicas: 3\n";
    std::fs::write(&manifest, two).unwrap();
    let path = manifest.to_str().unwrap();
    let out = cp.cli(&["apply", "-f", path]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "agent/one created (generation 1)\nagent/two created (generation 1)\n"
    );
    let out = cp.cli(&["apply", "-f", path]);
    assert_eq!(
        stdout(&out),
        "agent/one unchanged (generation 1)\nagent/two unchanged (generation 1)\n"
    );
    std::fs::write(&manifest, two.replace("replicas: 3", "replicas: 4")).unwrap();
    let out = cp.cli(&["apply", "-f", path]);
    assert_eq!(
        stdout(&out),
        "agent/one unchanged (generation 1)\nagent/two configured (generation 2)\n"
    );

    std::fs::write(
        &manifest,
        "name: three\nimage: example/echo:1\nhealth: {path: /h, interval: soon}\n",
    )
    .unwrap();
    let out = cp.cli(&["apply", "-f", path]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("health.interval"), "{}", stderr(&out));
    let out = cp.cli(&["get", "three"]);
    assert!(
        !out.status.success() && stderr(&out).contains("not found"),
        "{}",
        stderr(&out)
    );

    for (verb, word) in [
        ("stop", "stopped"),
        ("start", "started"),
        ("pause", "paused"),
        ("resume", "resumed"),
        ("restart", "restarting"),
    ] {
        let out = cp.cli(&[verb, "hello"]);
        assert!(out.status.success(), "{verb}: {}", stderr(&out));
        assert!(stdout(&out).contains(word), "{verb}: {}", stdout(&out));
    }
    let out = cp.cli(&["scale", "hello", "3"]);
    assert!(stdout(&out).contains("scaled to 3"), "{}", stdout(&out));
    let out = cp.cli(&["events", "hello", "-o", "json"]);
    let reasons: Vec<String> = stdout(&out)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["reason"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        reasons,
        [
            "AgentCreated",
            "AgentStopped",
            "AgentStarted",
            "AgentPaused",
            "AgentResumed",
            "AgentRestartRequested",
            "AgentScaled"
        ]
    );
    let out = cp.cli(&["rm", "hello"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cp.cli(&["get", "hello"]);
    assert!(!out.status.success());
}

#[tokio::test]
async fn cli_errors_say_what_to_do() {
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let bin = berth_tests::berth_bin();
    // Not the user's own CLI config (which `berth up` writes): none at all.
    let dir = tempfile::tempdir().unwrap();
    let no_config = dir.path().join("none.yaml");

    let out = Command::new(&bin)
        .args(["ls"])
        .env("BERTH_ADDR", cp.url())
        .env_remove("BERTH_TOKEN")
        .env("BERTH_CLI_CONFIG", &no_config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("BERTH_TOKEN"), "{}", stderr(&out));

    let closed = format!("http://127.0.0.1:{}", berth_tests::free_port());
    let out = Command::new(&bin)
        .args(["ls"])
        .env("BERTH_ADDR", &closed)
        .env("BERTH_TOKEN", "x")
        .env("BERTH_CLI_CONFIG", &no_config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("cannot reach the control plane at {closed}")),
        "{}",
        stderr(&out)
    );

    let out = cp.cli(&["get", "nobody"]);
    assert!(
        stderr(&out).contains("agent nobody not found"),
        "{}",
        stderr(&out)
    );
}

/// Queues `small` requests of 100 bytes for `agent`, and one of 3 MiB (kept in pieces) whose
/// id it returns, as a gateway would have stored them.
/// Stores `small` requests of 100 bytes for `agent` in `state`, then one of 3 MiB (kept in
/// pieces); the large one's id.
async fn fill_queue(etcd: &Etcd, agent: &str, small: usize, state: RequestState) -> String {
    let store = berth_store::Store::connect(&[etcd.url()], "/berth", &Default::default())
        .await
        .unwrap();
    let ttl = std::time::Duration::from_secs(600);
    let request = |id: String, body: Vec<u8>| Request {
        id,
        agent: agent.into(),
        state: state as i32,
        method: "POST".into(),
        path: "/echo".into(),
        body,
        ..Default::default()
    };
    let ids: Vec<usize> = (0..small).collect();
    for chunk in ids.chunks(64) {
        let writes = chunk.iter().map(|i| {
            let (store, mut r) = (&store, request(format!("{agent}-{i}"), vec![b'x'; 100]));
            async move { store.enqueue_request(&mut r, ttl).await.unwrap() }
        });
        futures::future::join_all(writes).await;
    }
    let mut large = request(format!("{agent}-large"), vec![b'y'; 3 << 20]);
    store.enqueue_request(&mut large, ttl).await.unwrap();
    large.id
}

/// The ids `berth requests AGENT --state STATE` lists, every page followed.
fn listed(cp: &ControlPlane, agent: &str, state: &str) -> Vec<String> {
    let (ids, _) =
        berth_tests::replay::list_request_ids(cp, &[agent, "--state", state], 1000).unwrap();
    ids
}

#[tokio::test]
async fn thousands_of_dead_letters_are_retried_or_dropped_at_once_in_order() {
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    // More than two pages of ListRequests (1,000 each), a body in pieces among them.
    let (redriven, purged) = (unique_name("redrive"), unique_name("purge"));
    fill_queue(&etcd, &redriven, 2500, RequestState::Dead).await;
    fill_queue(&etcd, &purged, 1200, RequestState::Dead).await;
    let dead = listed(&cp, &redriven, "dead");
    assert_eq!(dead.len(), 2501);

    let out = cp.cli(&["requests", "retry", "--all-dead", &redriven]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains(&format!(
            "2501 dead-lettered requests of agent/{redriven} queued again"
        )),
        "{}",
        stdout(&out)
    );
    assert!(listed(&cp, &redriven, "dead").is_empty());
    assert_eq!(
        listed(&cp, &redriven, "queued"),
        dead,
        "every one queued again, in its place"
    );
    // The other agent's dead letters are its own: untouched, then dropped.
    assert_eq!(listed(&cp, &purged, "dead").len(), 1201);
    let out = cp.cli(&["requests", "drop", "--all-dead", &purged]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains(&format!(
            "1201 dead-lettered requests of agent/{purged} dropped"
        )),
        "{}",
        stdout(&out)
    );
    let (left, _) = berth_tests::replay::list_request_ids(&cp, &[&purged], 1000).unwrap();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(listed(&cp, &redriven, "queued").len(), 2501);
}

#[tokio::test]
async fn python_client_and_reflection() {
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let queue_agent = unique_name("pyq");
    let large_id = fill_queue(&etcd, &queue_agent, 2500, RequestState::Queued).await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let python = std::env::var("BERTH_PYTHON").unwrap_or_else(|_| {
        let venv = root.join(".venv/bin/python");
        if venv.exists() {
            venv.display().to_string()
        } else {
            "python3".into()
        }
    });
    let out = Command::new(&python)
        .arg(root.join("tests/python/check_clients.py"))
        .args([
            "--addr",
            &cp.addr,
            "--token",
            berth_tests::ADMIN_TOKEN,
            "--name",
            &unique_name("py"),
            "--queue-agent",
            &queue_agent,
            "--queued",
            "2501",
            "--large-id",
            &large_id,
        ])
        .arg("--proto-dir")
        .arg(root.join("proto"))
        .output()
        .expect("run python (set BERTH_PYTHON, or run ./scripts/test which makes .venv)");
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("reflection: berth.v1.NodeAgentService"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains(&format!(
            "requests: 2501 of {queue_agent} in 3 pages; {large_id}: {} bytes, the first {} shown",
            3 << 20,
            1 << 20
        )),
        "{}",
        stdout(&out)
    );

    // The CLI pages through the same queue, each page's last line the command for the next.
    let mut args: Vec<String> = [
        "requests",
        &queue_agent,
        "--state",
        "queued",
        "--limit",
        "1000",
    ]
    .map(String::from)
    .to_vec();
    let (mut listed, mut pages) = (std::collections::HashSet::new(), 0);
    loop {
        let out = cp.cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "{}", stderr(&out));
        pages += 1;
        let shown = stdout(&out);
        listed.extend(
            shown
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|id| id.starts_with(&format!("{queue_agent}-")))
                .map(String::from),
        );
        match shown.lines().find_map(|l| l.strip_prefix("more: berth ")) {
            Some(next) => {
                assert!(next.contains("--state queued --limit 1000"), "{next}");
                args = next.split_whitespace().map(String::from).collect();
            }
            None => break,
        }
    }
    assert_eq!((listed.len(), pages), (2501, 3));
}

#[test]
fn output_piped_into_a_reader_that_stops_early_ends_quietly() {
    use std::io::BufRead;
    // As `berth completion bash | head -1`: the reader takes a line and closes the pipe while
    // the CLI still writes (the script is larger than a pipe's buffer).
    let mut child = Command::new(berth_tests::berth_bin())
        .args(["completion", "bash"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(!first.is_empty());
    let out = child.wait_with_output().unwrap();
    let said = stderr(&out);
    assert!(!said.contains("panicked"), "{said}");
    // Ended by its own check of the write, with success; not by SIGPIPE, which stays ignored
    // so that a socket the control plane resets is an error the command can report.
    assert!(out.status.success(), "{:?}: {said}", out.status);
}

#[tokio::test]
async fn a_control_plane_that_resets_the_connection_is_reported_not_a_silent_exit() {
    // Every connection reset (RST) as soon as the CLI's first bytes arrive, as when the control
    // plane is killed mid-call.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let resets = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let _ = stream.read(&mut [0; 16]).await;
            stream.set_zero_linger().unwrap();
        }
    });
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..3 {
        let out = tokio::process::Command::new(berth_tests::berth_bin())
            .args(["--addr", &format!("http://{addr}"), "ls"])
            .env("BERTH_CLI_CONFIG", dir.path().join("none.yaml"))
            .output()
            .await
            .unwrap();
        let said = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{:?}: {said}", out.status);
        assert!(
            said.contains(&format!(
                "the control plane at http://{addr} is unavailable: the connection failed"
            )),
            "{said}"
        );
    }
    resets.abort();
}
