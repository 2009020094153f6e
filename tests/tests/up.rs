//! `berth up` as a newcomer runs it: everything on this host from one command, the plain CLI
//! working from the config it writes, an agent reached through its gateway, and Ctrl-C
//! (SIGTERM here) stopping all of it; and the messages when etcd or Docker is missing.

use berth_tests::docker::ECHO_IMAGE;
use berth_tests::wire::{get_with_token, send_tls, try_send_tls, Raw};
use berth_tests::{berth_bin, eventually, free_port, unique_name};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The flags and files of one `berth up`: it can be started again on the same ports and data.
struct Launch {
    data: tempfile::TempDir,
    config: std::path::PathBuf,
    node: String,
    network: String,
    flags: Vec<String>,
}

impl Launch {
    /// Fresh ports, a fresh data directory.
    fn new() -> Self {
        let data = tempfile::Builder::new()
            .prefix("berth-up-")
            .tempdir()
            .unwrap();
        let config = data.path().join("cli.yaml");
        let node = unique_name("up");
        let network = unique_name("berth-up");
        let mut flags = vec!["up".to_string(), "--data-dir".into()];
        flags.push(data.path().join("data").display().to_string());
        for flag in [
            "--etcd-listen",
            "--etcd-peer-listen",
            "--listen",
            "--admin-listen",
            "--dashboard-listen",
            "--gateway-listen",
            "--gateway-admin-listen",
        ] {
            flags.push(flag.into());
            flags.push(format!("127.0.0.1:{}", free_port()));
        }
        flags.extend(["--node-name".into(), node.clone()]);
        flags.extend(["--network".into(), network.clone()]);
        Self {
            data,
            config,
            node,
            network,
            flags,
        }
    }

    /// The address `flag` was given.
    fn addr(&self, flag: &str) -> String {
        let at = self.flags.iter().position(|f| f == flag).unwrap();
        self.flags[at + 1].clone()
    }

    fn command(&self) -> Command {
        let mut command = Command::new(berth_bin());
        command
            .args(&self.flags)
            .env("BERTH_CLI_CONFIG", &self.config)
            .stdin(Stdio::null());
        command
    }

    /// Starts it (its `n`th start: output in `up-{n}.out` and `.err`) and waits until it is
    /// up: what it printed, or `Err` with what it said if it exited.
    async fn start(&self, n: usize) -> (Child, Result<String, String>) {
        let log = self.data.path().join(format!("up-{n}.out"));
        let errors = self.data.path().join(format!("up-{n}.err"));
        let mut child = self
            .command()
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(&errors).unwrap())
            .spawn()
            .unwrap();
        let printed = eventually(Duration::from_secs(90), "berth up to be up", || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let exited = matches!(child.try_wait(), Ok(Some(_)));
            async move {
                match (text.contains("Berth is up"), exited) {
                    (true, _) => Some(Some(text)),
                    (false, true) => Some(None),
                    (false, false) => None,
                }
            }
        })
        .await
        .unwrap();
        let said = std::fs::read_to_string(&errors).unwrap_or_default();
        (child, printed.ok_or(said))
    }
}

/// A running `berth up`: on drop, SIGTERM and a wait (so that it stops what it started), then
/// whatever is left (its processes by data directory, its node's containers, its network).
struct Up {
    child: Child,
    launch: Launch,
}

impl Up {
    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..300 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.terminate().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let data = self.launch.data.path().display().to_string();
        let _ = Command::new("pkill").args(["-KILL", "-f", &data]).status();
        berth_tests::docker::remove_labelled(&format!("berth.node={}", self.launch.node));
        let _ = Command::new("docker")
            .args(["network", "rm", &self.launch.network])
            .output();
    }
}

/// The example agent's answer to `body`, through the gateway at `addr` over HTTPS (CA `ca`),
/// within 30 s.
async fn through_gateway(addr: &str, ca: &std::path::Path, body: &'static [u8]) -> Raw {
    eventually(
        Duration::from_secs(30),
        "an answer through the gateway",
        || async move {
            let r = try_send_tls(addr, ca, "POST /agents/echo/echo HTTP/1.1", body).await?;
            (r.status == 200).then_some(r)
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn berth_up_runs_everything_and_the_plain_cli_works() {
    // A port picked free can be taken before `berth up` binds it (by another test's server,
    // or as the local port of an outgoing connection): a start that fails so is tried again
    // on fresh ports, up to three times.
    let mut attempt = 1;
    let (mut up, printed) = loop {
        let launch = Launch::new();
        let (child, started) = launch.start(1).await;
        let up = Up { child, launch };
        match started {
            Ok(printed) => break (up, printed),
            Err(said) if attempt < 3 && said.contains("Address already in use") => {
                eprintln!("berth up did not start (attempt {attempt}), trying fresh ports: {said}");
                attempt += 1;
            }
            Err(said) => panic!("berth up exited: {said}"),
        }
    };
    let config = up.launch.config.clone();
    let port = |flag: &str| up.launch.addr(flag).rsplit(':').next().unwrap().to_string();
    let (cp, dashboard) = (port("--listen"), port("--dashboard-listen"));
    let (gateway, gateway_admin) = (port("--gateway-listen"), port("--gateway-admin-listen"));
    // TLS by default: the control plane at https, its CA in the CLI's config.
    assert!(
        printed.contains(&format!("https://127.0.0.1:{cp} (TLS")),
        "{printed}"
    );
    let written = std::fs::read_to_string(&config).expect("the CLI's config is written");
    assert!(
        written.contains("ca:") && written.contains("https://"),
        "{written}"
    );

    // The plain CLI: no address, no token, only the config `berth up` wrote.
    let cli = |args: &[&str]| {
        Command::new(berth_bin())
            .args(args)
            .env_remove("BERTH_ADDR")
            .env_remove("BERTH_TOKEN")
            .env("BERTH_CLI_CONFIG", &config)
            .output()
            .unwrap()
    };
    let out = cli(&[
        "deploy",
        "-n",
        "echo",
        "-i",
        ECHO_IMAGE,
        "--health-endpoint",
        "/health",
        "--health-interval",
        "1s",
    ]);
    assert!(out.status.success(), "{out:?}");
    eventually(Duration::from_secs(60), "the agent ready", || {
        let out = cli(&["get", "echo", "-o", "json"]);
        async move {
            let agent: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (agent["status"]["readyReplicas"] == 1).then_some(())
        }
    })
    .await
    .unwrap();
    // The gateway serves HTTPS with a certificate from the same CA, and no plain HTTP.
    let addr = format!("127.0.0.1:{gateway}");
    let ca = up.launch.data.path().join("data/tls/ca.pem");
    let answer = through_gateway(&addr, &ca, b"hello").await;
    assert_eq!(answer.json()["body"], "hello");
    let forwarded = answer.json()["headers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h[0] == "x-forwarded-for" && h[1] == "127.0.0.1");
    assert!(
        forwarded,
        "the client's address reaches the agent over TLS too"
    );
    let plain = berth_tests::docker::http(&addr, "GET", "/agents/echo/health").await;
    assert!(plain.is_none(), "a plain HTTP answer: {plain:?}");
    // Its admin listener too is HTTPS, and /metrics takes the admin token, not none.
    let admin = format!("127.0.0.1:{gateway_admin}");
    let admin_token = std::fs::read_to_string(up.launch.data.path().join("data/tokens")).unwrap();
    let metrics = |token| get_with_token(&admin, Some(&ca), "/metrics", token);
    assert_eq!(metrics(None).await.map(|r| r.status), Some(401));
    assert_eq!(
        metrics(Some(admin_token.trim())).await.map(|r| r.status),
        Some(200)
    );
    assert!(
        printed.contains(&format!("admin https://{admin}")),
        "{printed}"
    );
    // The dashboard, over the same TLS: its address printed, its sign-in page served.
    let dashboard = format!("127.0.0.1:{dashboard}");
    assert!(
        printed.contains(&format!("dashboard      https://{dashboard}/")),
        "{printed}"
    );
    let login = send_tls(&dashboard, &ca, "GET /login HTTP/1.1", b"").await;
    assert_eq!(login.status, 200);

    // Killed (SIGKILL), `berth up` cannot stop its parts: they keep serving, on its ports.
    up.child.kill().unwrap();
    up.child.wait().unwrap();
    through_gateway(&addr, &ca, b"again").await;
    // The next `berth up` on the same data directory stops them, comes up on the same ports,
    // and adopts the agent's container.
    let (child, started) = up.launch.start(2).await;
    up.child = child;
    started.unwrap_or_else(|said| panic!("berth up after one was killed: {said}"));
    let said = std::fs::read_to_string(up.launch.data.path().join("up-2.err")).unwrap();
    for part in ["etcd", "control-plane", "gateway", "node-agent"] {
        assert!(
            said.contains(&format!("stopping {part} (pid")) && said.contains("left running"),
            "{part}: {said}"
        );
    }
    through_gateway(&addr, &ca, b"again").await;
    // One `berth up` per data directory: another is refused, and stops nothing.
    let another = up.launch.command().output().unwrap();
    let refused = String::from_utf8_lossy(&another.stderr);
    assert!(
        !another.status.success() && refused.contains("already running"),
        "{refused}"
    );
    through_gateway(&addr, &ca, b"again").await;
    // A part that dies is started again, as a supervisor would: the gateway, killed.
    let record = up.launch.data.path().join("data/run/2-gateway.pid");
    let text = std::fs::read_to_string(&record).unwrap();
    let gateway_pid = text.split_whitespace().next().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-KILL", &gateway_pid])
        .status()
        .unwrap()
        .success());
    through_gateway(&addr, &ca, b"again").await;
    let said = std::fs::read_to_string(up.launch.data.path().join("up-2.err")).unwrap();
    assert!(
        said.contains("gateway exited") && said.contains("starting it again"),
        "{said}"
    );
    assert!(matches!(up.child.try_wait(), Ok(None)), "berth up runs on");

    // Ctrl-C (SIGTERM): it stops everything it started, and exits cleanly.
    let status = up.terminate().expect("berth up exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    let data = up.launch.data.path().display().to_string();
    let left = Command::new("pgrep").args(["-f", &data]).output().unwrap();
    assert!(
        left.stdout.is_empty(),
        "processes left: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "the gateway is gone"
    );
}

#[tokio::test]
async fn berth_up_says_how_to_get_etcd_or_docker_when_missing() {
    let data = tempfile::tempdir().unwrap();
    let up = |extra: &[&str], path: &str| {
        Command::new(berth_bin())
            .arg("up")
            .arg("--data-dir")
            .arg(data.path())
            .args(extra)
            .env("PATH", path)
            .env("BERTH_CLI_CONFIG", data.path().join("cli.yaml"))
            .output()
            .unwrap()
    };
    let empty = tempfile::tempdir().unwrap();
    let out = up(&[], &empty.path().display().to_string());
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("etcd is not on PATH") && said.contains("apt-get install etcd-server"),
        "{said}"
    );
    let out = up(
        &["--docker", "unix:///nonexistent/docker.sock"],
        &std::env::var("PATH").unwrap(),
    );
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("Docker is not reachable") && said.contains("systemctl start docker"),
        "{said}"
    );
    assert!(
        !data.path().join("cli.yaml").exists(),
        "nothing written on failure"
    );
}
