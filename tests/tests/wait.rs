//! `--wait` (`berth deploy`, `apply`, `start`, `resume`, `restart`, `scale`) against a real
//! control plane and node agent: success once every replica is ready, and each reason it cannot
//! get there with its own exit code (ImageMissing 3, CrashLoop 4, Unschedulable 5,
//! RolloutHalted 6, timeout 7); of `stop` and `pause`, once every replica is stopped (paused).

use berth_proto::v1::ReplicaState;
use berth_tests::docker::{get_agent, OneNode, ECHO_IMAGE};
use berth_tests::{output_text as text, unique_name, ControlPlane};

/// busybox from Debian's busybox-static (`deploy/build-images.sh busybox`).
const BUSYBOX_IMAGE: &str = "berth/busybox:local";

/// A busybox agent running `script` under sh, as a manifest for `berth apply`.
fn busybox(name: &str, script: &str) -> String {
    format!(
        "name: {name}\nimage: {BUSYBOX_IMAGE}\nrestart: always\ncommand: [busybox, sh, -c, {script:?}]\n"
    )
}

#[tokio::test]
async fn wait_succeeds_once_available_and_names_each_reason_it_cannot_get_there() {
    let one = OneNode::start("wait").await.unwrap();
    let cp = &one.cp;
    let dir = tempfile::tempdir().unwrap();
    let apply = |manifest: &str, extra: &[&str]| {
        let file = dir.path().join(format!("{}.yaml", unique_name("m")));
        std::fs::write(&file, manifest).unwrap();
        let mut args = vec!["apply", "-f", file.to_str().unwrap(), "--wait"];
        args.extend_from_slice(extra);
        cp.cli(&args)
    };

    // Available: exit 0, with the progress on the way.
    let ok = unique_name("ok");
    let out = cp.deploy_echo(&ok, &["--replicas", "2", "--wait", "--timeout", "90s"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("2/2 ready (generation 1): available"),
        "{said}"
    );

    // ImageMissing: no registry, no such image.
    let out = cp.cli(&[
        "deploy",
        "-n",
        &unique_name("noimage"),
        "-i",
        "berth/no-such-image:never",
        "--wait",
        "--timeout",
        "90s",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("ImageMissing"), "{}", text(&out));

    // CrashLoop: a container that exits at once, every time.
    let out = apply(
        &busybox(&unique_name("crash"), "exit 1"),
        &["--timeout", "90s"],
    );
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("CrashLoop"), "{}", text(&out));

    // Unschedulable: no node has the label.
    let out = cp.deploy_echo(
        &unique_name("nofit"),
        &["--node-selector", "gpu=yes", "--wait", "--timeout", "90s"],
    );
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(text(&out).contains("Unschedulable"), "{}", text(&out));

    // RolloutHalted: an update whose new replica cannot start (its image is missing); the old
    // one keeps serving.
    let rolled = unique_name("roll");
    let echo = |image: &str| {
        format!("name: {rolled}\nimage: {image}\nhealth:\n  path: /health\n  interval: 1s\n")
    };
    let out = apply(&echo(ECHO_IMAGE), &["--timeout", "90s"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = apply(&echo("berth/no-such-image:never"), &["--timeout", "90s"]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert!(text(&out).contains("RolloutHalted"), "{}", text(&out));

    // Timeout: a health check that never passes within the time given.
    let out = cp.cli(&[
        "deploy",
        "-n",
        &unique_name("slow"),
        "-i",
        ECHO_IMAGE,
        "--health-endpoint",
        "/never-there",
        "--health-interval",
        "1s",
        "--wait",
        "--timeout",
        "2s",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(text(&out).contains("Timeout"), "{}", text(&out));
}

async fn read_agent(cp: &ControlPlane, name: &str) -> berth_proto::v1::Agent {
    get_agent(&cp.agents().await.unwrap(), name).await
}

/// Right after `--wait` returns: every replica the agent should have is of its current
/// generation and ready, and none of an older one is left.
async fn assert_available(cp: &ControlPlane, name: &str, replicas: usize, after: &str) {
    let agent = read_agent(cp, name).await;
    let generation = agent.meta.unwrap_or_default().generation;
    let status = agent.status.unwrap_or_default();
    let shown: Vec<_> = status
        .replicas
        .iter()
        .map(|r| (r.generation, r.ready))
        .collect();
    assert_eq!(
        shown,
        vec![(generation, true); replicas],
        "after {after}: every replica of generation {generation} ready"
    );
}

/// Right after `--wait` returns: the agent's replicas are in these states.
async fn assert_replicas(cp: &ControlPlane, name: &str, states: &[ReplicaState], after: &str) {
    let agent = read_agent(cp, name).await;
    let shown: Vec<i32> = agent
        .status
        .unwrap_or_default()
        .replicas
        .iter()
        .map(|r| r.state)
        .collect();
    let want: Vec<i32> = states.iter().map(|s| *s as i32).collect();
    assert_eq!(shown, want, "after {after}");
}

#[tokio::test]
async fn start_resume_restart_scale_stop_and_pause_wait_too() {
    let one = OneNode::start("wait").await.unwrap();
    let cp = &one.cp;
    let name = unique_name("verbs");
    let out = cp.deploy_echo(&name, &["--wait", "--timeout", "90s"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_available(cp, &name, 1, "deploy --wait").await;

    let stop = cp.cli(&["stop", &name]);
    assert!(stop.status.success(), "{}", text(&stop));
    for (args, replicas) in [
        (vec!["start", name.as_str()], 1),
        (vec!["scale", name.as_str(), "2"], 2),
        (vec!["restart", name.as_str()], 2),
    ] {
        let mut args = args.clone();
        args.extend(["--wait", "--timeout", "90s"]);
        let out = cp.cli(&args);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(": available"),
            "{}",
            text(&out)
        );
        assert_available(cp, &name, replicas, &args.join(" ")).await;
    }
    let pause = cp.cli(&["pause", &name, "--wait", "--timeout", "90s"]);
    assert!(pause.status.success(), "{}", text(&pause));
    assert!(text(&pause).contains(": paused"), "{}", text(&pause));
    assert_replicas(cp, &name, &[ReplicaState::Paused; 2], "pause --wait").await;
    let out = cp.cli(&["resume", &name, "--wait", "--timeout", "90s"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_available(cp, &name, 2, "resume --wait").await;
    // Stopping waits out each replica's stop grace: SIGTERM, then its process's end.
    let stop = cp.cli(&["stop", &name, "--wait", "--timeout", "90s"]);
    assert!(stop.status.success(), "{}", text(&stop));
    assert!(text(&stop).contains(": stopped"), "{}", text(&stop));
    assert_replicas(cp, &name, &[ReplicaState::Stopped; 2], "stop --wait").await;

    // A start that cannot get there ends with its reason's exit code, as a deploy does.
    let nofit = unique_name("nofit");
    let out = cp.deploy_echo(&nofit, &["--node-selector", "gpu=yes"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = cp.cli(&["stop", &nofit]);
    assert!(out.status.success(), "{}", text(&out));
    let out = cp.cli(&["start", &nofit, "--wait", "--timeout", "90s"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(text(&out).contains("Unschedulable"), "{}", text(&out));
    let out = cp.cli(&["scale", &name, "1", "--timeout", "1s"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--timeout needs --wait: {}",
        text(&out)
    );
}
