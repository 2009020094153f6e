//! The docker-compose cluster of `deploy/docker-compose.yml` (3 etcd members, 2 control planes,
//! a gateway, 3 node agents; images built locally by `deploy/build-images.sh`), driven as an
//! operator would: the CLI against both control planes, traffic through the gateway, a node
//! lost (its node-agent service stopped and its containers killed), an etcd member stopped,
//! the agent stopped and started (its requests kept meanwhile, then replayed).
//! Every request must end answered, directly or by replay. Torn down on exit, pass or fail.

use berth_tests::wire::send_tls;
use berth_tests::{berth_bin, eventually, free_port, unique_name, ADMIN_TOKEN};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The compose tool: `docker-compose` (1.29) if installed, else `docker compose` (v2).
fn compose_command() -> Command {
    let v1 = Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if v1 {
        Command::new("docker-compose")
    } else {
        let mut command = Command::new("docker");
        command.arg("compose");
        command
    }
}

/// One compose project; its services, volumes, network and the agents' containers (labelled
/// `berth.cluster=<project>`) are removed when dropped.
struct Cluster {
    project: String,
    secrets: TempDir,
    cp_ports: [u16; 2],
    dashboard_port: u16,
    gateway: String,
}

impl Cluster {
    fn file() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/docker-compose.yml")
    }

    fn compose(&self, args: &[&str]) -> Output {
        let mut command = compose_command();
        command
            .arg("-f")
            .arg(Self::file())
            .args(["-p", &self.project])
            .args(args)
            .env("BERTH_CLUSTER", &self.project)
            .env("BERTH_NETWORK", &self.project)
            .env("BERTH_SECRETS_DIR", self.secrets.path())
            .env("BERTH_CP1_PORT", self.cp_ports[0].to_string())
            .env("BERTH_CP2_PORT", self.cp_ports[1].to_string())
            .env("BERTH_DASHBOARD_PORT", self.dashboard_port.to_string())
            .env(
                "BERTH_GATEWAY_PORT",
                self.gateway.rsplit(':').next().unwrap(),
            );
        command.output().expect("run the compose tool")
    }

    fn up() -> Self {
        let project = unique_name("berth-ci");
        let secrets = tempfile::tempdir().unwrap();
        // The operator's admin token is the tests' own; the rest is made as a user makes it:
        // the CA, each service's certificates and tokens, one certificate per node.
        std::fs::create_dir_all(secrets.path().join("operator")).unwrap();
        std::fs::write(
            secrets.path().join("operator/tokens"),
            format!("{ADMIN_TOKEN}\n"),
        )
        .unwrap();
        let out = Command::new(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cluster-secrets.sh"),
        )
        .env("BERTH_BIN", berth_bin())
        .env("BERTH_SECRETS_DIR", secrets.path())
        .env("BERTH_CLUSTER", &project)
        .output()
        .unwrap();
        assert!(out.status.success(), "deploy/cluster-secrets.sh: {out:?}");
        let cluster = Self {
            project,
            secrets,
            cp_ports: [free_port(), free_port()],
            dashboard_port: free_port(),
            gateway: format!("127.0.0.1:{}", free_port()),
        };
        let out = cluster.compose(&["up", "-d"]);
        assert!(
            out.status.success(),
            "compose up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster
    }

    /// The cluster's CA certificate.
    fn ca(&self) -> PathBuf {
        self.secrets.path().join("operator/ca.pem")
    }

    /// A request through the gateway, over HTTPS.
    async fn send(&self, head: &str, body: &[u8]) -> berth_tests::wire::Raw {
        send_tls(&self.gateway, &self.ca(), head, body).await
    }

    fn node(&self, i: usize) -> String {
        format!("{}-node-{i}", self.project)
    }

    /// The CLI against both control planes.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(berth_bin())
            .args(args)
            .env(
                "BERTH_ADDR",
                format!(
                    "https://127.0.0.1:{},https://127.0.0.1:{}",
                    self.cp_ports[0], self.cp_ports[1]
                ),
            )
            .env("BERTH_TLS_CA", self.ca())
            .env("BERTH_TOKEN", ADMIN_TOKEN)
            .env("BERTH_CLI_CONFIG", self.secrets.path().join("cli.yaml"))
            .output()
            .expect("run berth")
    }

    fn json(&self, args: &[&str]) -> Option<serde_json::Value> {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        let out = self.cli(&args);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// Ready replicas of `agent`, each with its node.
    fn ready(&self, agent: &str) -> Vec<(String, String)> {
        let Some(agent) = self.json(&["get", agent]) else {
            return Vec::new();
        };
        agent["status"]["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["ready"] == true)
            .map(|r| {
                (
                    r["replica"].as_str().unwrap_or_default().to_string(),
                    r["node"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// The files `service`'s container can read under /run/berth, as it sees them, and the
    /// host paths mounted into it.
    fn readable(&self, service: &str) -> (BTreeSet<String>, Vec<String>) {
        let out = self.compose(&["ps", "-q", service]);
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(!id.is_empty(), "{service} has a container: {out:?}");
        let listed = Command::new("sh")
            .arg("-c")
            .arg(format!("docker cp {id}:/run/berth - | tar -t"))
            .output()
            .unwrap();
        assert!(listed.status.success(), "{service}: {listed:?}");
        let files = String::from_utf8_lossy(&listed.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("berth/"))
            .filter(|f| !f.is_empty())
            .map(String::from)
            .collect();
        let mounts = Command::new("docker")
            .args(["inspect", "-f", "{{range .Mounts}}{{.Source}} {{end}}", &id])
            .output()
            .unwrap();
        let mounts = String::from_utf8_lossy(&mounts.stdout)
            .split_whitespace()
            .map(String::from)
            .collect();
        (files, mounts)
    }

    /// The services' logs, and what each control plane answers on its own.
    fn logs(&self) -> String {
        let out = self.compose(&["logs", "--no-color", "--tail", "300"]);
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        for port in self.cp_ports {
            for args in [&["get", "echo"][..], &["nodes"][..]] {
                let out = Command::new("timeout")
                    .arg("10")
                    .arg(berth_bin())
                    .args(args)
                    .env("BERTH_ADDR", format!("https://127.0.0.1:{port}"))
                    .env("BERTH_TLS_CA", self.ca())
                    .env("BERTH_TOKEN", ADMIN_TOKEN)
                    .env("BERTH_CLI_CONFIG", self.secrets.path().join("cli.yaml"))
                    .output()
                    .expect("run berth");
                text.push_str(&format!(
                    "\n$ berth {} (control plane on :{port}): {}\n{}{}",
                    args.join(" "),
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        text
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // BERTH_KEEP_CLUSTER=1 keeps a failed run's cluster to look at (the servers read
        // their tokens at start; the token directory itself goes).
        if std::env::var_os("BERTH_KEEP_CLUSTER").is_some() && std::thread::panicking() {
            eprintln!("kept for inspection: compose project {}", self.project);
            return;
        }
        // The node agents first, so that none starts a container after the sweep below.
        let _ = self.compose(&["stop", "-t", "2"]);
        berth_tests::docker::remove_labelled(&format!("berth.cluster={}", self.project));
        let _ = self.compose(&["down", "-v", "--remove-orphans", "-t", "5"]);
    }
}

/// Least secrets per host: each container sees only its own directory of secrets, holding
/// what that service uses; the CA key, the admin token and other services' keys are in none.
fn each_service_reads_only_its_own_secrets(cluster: &Cluster) {
    let set = |files: &[&str]| files.iter().map(|f| f.to_string()).collect::<BTreeSet<_>>();
    let server = [
        "ca.pem",
        "server.pem",
        "server-key.pem",
        "etcd-client.pem",
        "etcd-client-key.pem",
        "metrics",
        "tokens",
    ];
    let mut expected = vec![
        (
            "control-plane-1",
            "control-plane",
            set(&[&server[..], &["join"]].concat()),
        ),
        (
            "control-plane-2",
            "control-plane",
            set(&[&server[..], &["join"]].concat()),
        ),
        ("gateway", "gateway", set(&server)),
    ];
    for etcd in ["etcd1", "etcd2", "etcd3"] {
        expected.push((etcd, "etcd", set(&["ca.pem", "etcd.pem", "etcd-key.pem"])));
    }
    for (service, dir) in [
        ("node-1", "node-1"),
        ("node-2", "node-2"),
        ("node-3", "node-3"),
    ] {
        expected.push((
            service,
            dir,
            set(&["ca.pem", "node.pem", "node-key.pem", "join"]),
        ));
    }
    let secrets = cluster.secrets.path();
    for (service, dir, files) in expected {
        let (readable, mounts) = cluster.readable(service);
        eprintln!("{service} reads /run/berth: {readable:?}");
        assert_eq!(readable, files, "{service}");
        // The one secrets mount is its own directory (besides etcd's data and Docker's socket).
        let own = secrets.join(dir).display().to_string();
        for mount in mounts
            .iter()
            .filter(|m| m.starts_with(&*secrets.display().to_string()))
        {
            assert_eq!(mount, &own, "{service} mounts {mount}");
        }
    }
    // Tokens are not shared between roles: the gateway's admin token is not the control
    // plane's, and each node's join token is its own.
    let read = |path: &str| std::fs::read_to_string(secrets.join(path)).unwrap();
    assert_ne!(
        read("gateway/tokens").trim(),
        read("control-plane/tokens").trim()
    );
    let joins: BTreeSet<String> = (1..=3).map(|n| read(&format!("node-{n}/join"))).collect();
    assert_eq!(joins.len(), 3, "one join token per node");
    assert_eq!(
        read("control-plane/join")
            .lines()
            .filter(|l| !l.is_empty())
            .count(),
        3,
        "the control planes admit each node's token"
    );
}

/// What the traffic saw.
#[derive(Default, Debug)]
struct Tally {
    sent: usize,
    direct: usize,
    queued: Vec<String>,
    errors: Vec<String>,
}

#[tokio::test]
async fn the_compose_cluster_survives_a_lost_node_and_a_stopped_etcd_member() {
    let started = Instant::now();
    let cluster = Cluster::up();
    eventually(Duration::from_secs(90), "3 nodes ready", || {
        let nodes = cluster.json(&["nodes"]);
        async move {
            let ready = nodes?["nodes"]
                .as_array()?
                .iter()
                .filter(|n| n["status"] == "NODE_STATUS_READY")
                .count();
            (ready == 3).then_some(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    eprintln!("cluster up, 3 nodes ready: {:.1?}", started.elapsed());
    each_service_reads_only_its_own_secrets(&cluster);
    // The dashboard is served over the control plane's TLS.
    let dashboard = format!("127.0.0.1:{}", cluster.dashboard_port);
    let login = send_tls(&dashboard, &cluster.ca(), "GET /login HTTP/1.1", b"").await;
    assert_eq!(login.status, 200, "the dashboard's sign-in page");

    let name = "echo";
    let manifest = cluster.secrets.path().join("echo.yaml");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/echo-agent/berth.yaml"),
    )
    .unwrap()
    .replace("replicas: 2", "replicas: 3")
        // A request in flight to a host that vanishes gets no reset: it waits for this.
        + "requestTimeout: 5s\n";
    std::fs::write(&manifest, text).unwrap();
    let out = cluster.cli(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    eventually(Duration::from_secs(60), "3 replicas on 3 nodes", || {
        let ready = cluster.ready(name);
        async move {
            let mut nodes: Vec<&String> = ready.iter().map(|(_, n)| n).collect();
            nodes.sort();
            nodes.dedup();
            (ready.len() == 3 && nodes.len() == 3).then_some(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    eventually(
        Duration::from_secs(30),
        "the gateway routes to it",
        || async {
            let r = cluster
                .send(
                    &format!("POST /agents/{name}/echo HTTP/1.1\r\nX-Berth-Replay: off"),
                    b"probe",
                )
                .await;
            (r.status == 200).then_some(())
        },
    )
    .await
    .unwrap();

    // Steady traffic through the gateway for the rest of the test. Each request carries an
    // Idempotency-Key, so one cut off by a killed container is safe to queue and replay.
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (tally, stop, gateway) = (tally.clone(), stop.clone(), cluster.gateway.clone());
        let ca = cluster.ca();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut i = 0;
            let mut inflight = tokio::task::JoinSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                i += 1;
                let (tally, gateway, ca) = (tally.clone(), gateway.clone(), ca.clone());
                inflight.spawn(async move {
                    let key = format!("cluster-{i}");
                    let head =
                        format!("POST /agents/{name}/echo HTTP/1.1\r\nIdempotency-Key: {key}");
                    let r = send_tls(&gateway, &ca, &head, key.as_bytes()).await;
                    let mut t = tally.lock().unwrap();
                    t.sent += 1;
                    match r.status {
                        200 => t.direct += 1,
                        202 => t
                            .queued
                            .push(r.json()["request_id"].as_str().unwrap().into()),
                        other => t.errors.push(format!("{other} {}", r.json())),
                    }
                });
            }
            while inflight.join_next().await.is_some() {}
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await; // traffic before the faults

    // A node lost: its node-agent service stopped and its agents' containers killed.
    let lost = cluster.node(3);
    let cut = Instant::now();
    let out = cluster.compose(&["stop", "-t", "1", "node-3"]);
    assert!(out.status.success(), "{out:?}");
    let label = format!("berth.node={lost}");
    let ids = berth_tests::docker::containers_labelled(&label, false);
    assert_eq!(ids.len(), 1, "one replica ran on {lost}");
    assert!(berth_tests::docker::remove_labelled(&label));
    eventually(
        Duration::from_secs(60),
        "3 ready, none on the lost node",
        || {
            let ready = cluster.ready(name);
            let lost = lost.clone();
            async move { (ready.len() == 3 && ready.iter().all(|(_, n)| *n != lost)).then_some(()) }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    eprintln!(
        "node lost → its replica replaced and ready: {:.1?}",
        cut.elapsed()
    );

    // An etcd member stopped: Berth keeps working (quorum is 2 of 3).
    let out = cluster.compose(&["stop", "-t", "1", "etcd3"]);
    assert!(out.status.success(), "{out:?}");
    let stopped = Instant::now();
    // Calls that land on the stopped member fail until the servers drop it from their
    // etcd clients (they check each member every second); then they succeed.
    eventually(
        Duration::from_secs(15),
        "the API answers with etcd3 stopped",
        || {
            let out = cluster.cli(&["scale", name, "4"]);
            async move { out.status.success().then_some(()) }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    eprintln!(
        "etcd member stopped → API writes succeed: {:.1?}",
        stopped.elapsed()
    );
    let scaled = Instant::now();
    eventually(
        Duration::from_secs(60),
        "4 ready with etcd3 stopped",
        || {
            let ready = cluster.ready(name).len();
            async move { (ready == 4).then_some(()) }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    eprintln!(
        "with one etcd member stopped, scaled to 4 ready: {:.1?}",
        scaled.elapsed()
    );

    // The agent stopped for a while: what arrives meanwhile is kept and replayed.
    let out = cluster.cli(&["stop", name]);
    assert!(out.status.success(), "{out:?}");
    eventually(
        Duration::from_secs(30),
        "requests queued while stopped",
        || {
            let queued = tally.lock().unwrap().queued.len();
            async move { (queued >= 20).then_some(()) }
        },
    )
    .await
    .unwrap_or_else(|e| {
        let t = tally.lock().unwrap();
        let shown = cluster.cli(&["get", name]);
        panic!(
            "{e}: sent {} direct {} queued {} errors {:?}\n{}\n{}",
            t.sent,
            t.direct,
            t.queued.len(),
            &t.errors[..t.errors.len().min(3)],
            String::from_utf8_lossy(&shown.stdout),
            cluster.logs()
        )
    });
    let out = cluster.cli(&["start", name]);
    assert!(out.status.success(), "{out:?}");
    eventually(Duration::from_secs(60), "4 ready again", || {
        let ready = cluster.ready(name).len();
        async move { (ready == 4).then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    tokio::time::sleep(Duration::from_secs(2)).await; // traffic after the faults
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.await.unwrap();

    // Every 202 ends delivered.
    let queued = tally.lock().unwrap().queued.clone();
    let undelivered = |ids: Vec<String>, gateway: String, ca: PathBuf| async move {
        let mut left = Vec::new();
        for id in ids {
            let r = send_tls(&gateway, &ca, &format!("GET /requests/{id} HTTP/1.1"), b"").await;
            if r.status != 200 || r.json()["status"] != "delivered" {
                left.push(id);
            }
        }
        left
    };
    let replayed = eventually(
        Duration::from_secs(60),
        "every queued request delivered",
        || {
            let (queued, gateway, ca) = (queued.clone(), cluster.gateway.clone(), cluster.ca());
            async move {
                undelivered(queued.clone(), gateway, ca)
                    .await
                    .is_empty()
                    .then_some(queued.len())
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let t = tally.lock().unwrap();
    let lost = t.sent - t.direct - replayed - t.errors.len();
    eprintln!(
        "cluster: sent {} / answered directly {} / replayed {} / errors {} / lost {lost}; whole test {:.1?}",
        t.sent,
        t.direct,
        replayed,
        t.errors.len(),
        started.elapsed()
    );
    assert!(t.errors.is_empty(), "client-visible errors: {:?}", t.errors);
    assert_eq!(lost, 0);
    assert!(t.sent > 500, "traffic ran throughout: {}", t.sent);
    assert!(
        replayed >= 20,
        "requests kept while the agent was stopped were replayed"
    );
}
