//! Docker for end-to-end tests: node agents as real processes, and a guard that removes every
//! container and network a test run made, pass or fail.

use crate::process::Child;
use crate::{berth_bin, eventually, free_port, volume_root, JOIN_TOKEN, READY_TIMEOUT};
use std::process::Command;
use std::time::Duration;
use tempfile::TempDir;

/// The example agent's image, built by `deploy/build-images.sh`.
pub const ECHO_IMAGE: &str = "berth/echo-agent:local";

/// A test run's Docker resources: a unique label and network, removed on drop.
pub struct DockerRun {
    /// Value of the `berth.test` label on every container of this run.
    pub id: String,
    /// The Docker network of this run.
    pub network: String,
}

impl DockerRun {
    /// A new run; fails clearly when Docker or the example image is missing.
    pub fn new() -> anyhow::Result<Self> {
        let image = Command::new("docker")
            .args(["image", "inspect", ECHO_IMAGE])
            .output()?;
        anyhow::ensure!(
            image.status.success(),
            "image {ECHO_IMAGE} is missing: run deploy/build-images.sh (is Docker running?)"
        );
        let id = format!("t{}-{}", std::process::id(), free_port());
        Ok(Self {
            network: format!("berth-test-{id}"),
            id,
        })
    }

    /// Ids of this run's containers, running or not, sorted.
    pub fn containers(&self) -> Vec<String> {
        containers_labelled(&format!("berth.test={}", self.id), true)
    }

    /// `docker inspect -f FORMAT ID`.
    pub fn inspect(&self, id: &str, format: &str) -> String {
        let out = Command::new("docker")
            .args(["inspect", "-f", format, id])
            .output()
            .expect("docker inspect");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// Full ids of the containers with `label` (`key=value`), sorted; stopped ones too with `all`.
pub fn containers_labelled(label: &str, all: bool) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("label={label}"),
        ])
        .args(all.then_some("-a"))
        .output()
        .expect("docker ps");
    let mut ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    ids.sort();
    ids
}

/// Removes (`docker rm -f`) every container with `label`, running or not; whether all went.
pub fn remove_labelled(label: &str) -> bool {
    let ids = containers_labelled(label, true);
    ids.is_empty()
        || Command::new("docker")
            .args(["rm", "-f"])
            .args(&ids)
            .output()
            .is_ok_and(|o| o.status.success())
}

impl Drop for DockerRun {
    fn drop(&mut self) {
        remove_labelled(&format!("berth.test={}", self.id));
        // By id: if node agents raced to create it, there may be several of this name.
        let ids = Command::new("docker")
            .args(["network", "ls", "-q", "--filter"])
            .arg(format!("name=^{}$", self.network))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for id in ids.lines() {
            let _ = Command::new("docker").args(["network", "rm", id]).output();
        }
    }
}

/// etcd, a control plane, and one node agent on this host's Docker engine: what an
/// end-to-end test of an agent's containers starts. Dropped node agent first, etcd last.
pub struct OneNode {
    /// The node agent.
    pub node: NodeAgent,
    /// The test's Docker network and containers.
    pub run: DockerRun,
    /// The control plane.
    pub cp: crate::ControlPlane,
    /// Its etcd.
    pub etcd: crate::Etcd,
}

impl OneNode {
    /// Starts them, the node named `{node}-{unique suffix}`.
    pub async fn start(node: &str) -> anyhow::Result<Self> {
        let etcd = crate::Etcd::start().await?;
        let cp = crate::ControlPlane::start(&etcd.url()).await?;
        let run = DockerRun::new()?;
        let node = NodeAgent::start(&cp.url(), &crate::unique_name(node), &run)?;
        Ok(Self {
            node,
            run,
            cp,
            etcd,
        })
    }
}

/// A real `berth node-agent` process.
pub struct NodeAgent {
    child: Option<Child>,
    dir: TempDir,
    control_plane: String,
    /// The node's name.
    pub name: String,
    network: String,
    run_id: String,
    extra: Vec<String>,
}

impl NodeAgent {
    /// Starts a node agent for `run` against the control plane at `control_plane`.
    pub fn start(control_plane: &str, name: &str, run: &DockerRun) -> anyhow::Result<Self> {
        Self::start_with(control_plane, name, run, &[])
    }

    /// [`NodeAgent::start`] with `extra` flags of `berth node-agent` (e.g. `--tls-ca`).
    pub fn start_with(
        control_plane: &str,
        name: &str,
        run: &DockerRun,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("berth-node-").tempdir()?;
        std::fs::write(dir.path().join("join"), format!("{JOIN_TOKEN}\n"))?;
        let mut agent = Self {
            child: None,
            dir,
            control_plane: control_plane.to_string(),
            name: name.to_string(),
            network: run.network.clone(),
            run_id: run.id.clone(),
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        agent.resume()?;
        Ok(agent)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`) to the process.
    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(pid.to_string())
                .output();
        }
    }

    /// Kills the process (SIGKILL); its containers keep running.
    pub fn kill(&mut self) {
        self.child.take();
    }

    /// Starts the process again.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new(berth_bin());
        command
            .arg("node-agent")
            .args([
                "--control-plane",
                &self.control_plane,
                "--name",
                &self.name,
                "--network",
                &self.network,
            ])
            .arg("--join-token-file")
            .arg(self.dir.path().join("join"))
            .arg("--volume-root")
            .arg(volume_root())
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("--container-label")
            .arg(format!("berth.test={}", self.run_id))
            .args(&self.extra)
            .env("RUST_LOG", "info");
        self.child = Some(Child::spawn(
            command,
            &self.dir.path().join("node-agent.log"),
        )?);
        Ok(())
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("node-agent.log")).unwrap_or_default();
        format!("node-agent {} log:\n{log}", self.name)
    }
}

/// `METHOD path` to `address` with no body; the status code and body.
pub async fn http(address: &str, method: &str, path: &str) -> Option<(u16, String)> {
    http_body(address, method, path, "").await
}

/// `METHOD path` to `address` with `body`; the status code and body.
pub async fn http_body(
    address: &str,
    method: &str,
    path: &str,
    body: &str,
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let code = text.get(9..12)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((code, body))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
}

/// The agent's ready replicas, as its status counts them.
pub fn ready(agent: &berth_proto::v1::Agent) -> u32 {
    agent.status.as_ref().map_or(0, |s| s.ready_replicas)
}

/// The agent `name` as the API shows it now.
pub async fn get_agent(api: &crate::AgentClient, name: &str) -> berth_proto::v1::Agent {
    api.clone()
        .get_agent(berth_proto::v1::GetAgentRequest {
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Polls until `check` holds for the agent, within the ready timeout.
pub async fn wait_agent<F>(
    api: &crate::AgentClient,
    name: &str,
    what: &str,
    check: F,
) -> anyhow::Result<berth_proto::v1::Agent>
where
    F: Fn(&berth_proto::v1::Agent) -> bool,
{
    eventually(READY_TIMEOUT, what, || {
        let mut api = api.clone();
        let request = berth_proto::v1::GetAgentRequest {
            name: name.to_string(),
            ..Default::default()
        };
        let check = &check;
        async move {
            let agent = api.get_agent(request).await.ok()?.into_inner();
            check(&agent).then_some(agent)
        }
    })
    .await
}

/// A fresh host directory under the test volume root, and the `-v` value mounting it at the
/// example agent's `/data` (its state and request log live there).
pub fn data_volume() -> anyhow::Result<(TempDir, String)> {
    let dir = tempfile::tempdir_in(volume_root())?;
    let volume = format!("{}:/data", dir.path().display());
    Ok((dir, volume))
}

impl crate::ControlPlane {
    /// `berth deploy` of the example agent as `name`, health checked every second, with
    /// `extra` flags.
    pub fn deploy_echo(&self, name: &str, extra: &[&str]) -> std::process::Output {
        let mut args = vec![
            "deploy",
            "-n",
            name,
            "-i",
            ECHO_IMAGE,
            "--health-endpoint",
            "/health",
            "--health-interval",
            "1s",
        ];
        args.extend_from_slice(extra);
        self.cli(&args)
    }
}
