//! The shared test harness: a real etcd and real `berth` processes on free loopback ports,
//! each with its own temporary directory, all killed and removed when dropped, pass or fail.
#![forbid(unsafe_code)]

pub mod docker;
pub mod process;
pub mod replay;
pub mod stall;
pub mod wire;

use anyhow::{bail, Context};
use berth_proto::v1::agent_service_client::AgentServiceClient;
use process::Child;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// How long a server may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Time between readiness polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// The admin token every test control plane accepts.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// The join token every test control plane accepts.
pub const JOIN_TOKEN: &str = "test-join-token-0123456789";

/// The host volume root of test control planes and node agents: a directory under the
/// system's temporary directory, in which tests make their own temporary directories.
pub fn volume_root() -> PathBuf {
    let root = std::env::temp_dir().join("berth-test-volumes");
    std::fs::create_dir_all(&root).expect("create the test volume root");
    root
}

/// The `berth` binary under test: `BERTH_BIN`, or `berth` beside the test binary's directory.
pub fn berth_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("BERTH_BIN") {
        return bin.into();
    }
    // Tests run from target/<profile>/deps, benchmark binaries from target/<profile>.
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("berth"))
        .find(|bin| bin.exists());
    bin.unwrap_or_else(|| {
        panic!(
            "berth is missing beside {}: build it first (cargo build -p berth-cli) or set BERTH_BIN",
            exe.display()
        )
    })
}

/// What a server logs when its port was taken between `free_port` and its bind.
const ADDRESS_IN_USE: &str = "Address already in use";

/// A server the harness starts on ports picked by [`free_port`].
trait Server {
    /// What it is, for the log.
    const NAME: &'static str;
    /// Starts the process on its ports and waits until it is ready.
    async fn resume(&mut self) -> anyhow::Result<()>;
    /// Whether its failed start may be for a port taken, and is to be tried again.
    fn port_taken(&self) -> bool;
    /// Stops what the failed start left and picks fresh ports.
    fn renew_ports(&mut self);
}

/// The first start of `server`: a port that was free when picked can be taken before the
/// server binds it (by another test's server, or as the local port of an outgoing
/// connection), so a start that fails so is tried again on fresh ports, up to three times.
async fn first_start<S: Server>(server: &mut S) -> anyhow::Result<()> {
    let mut attempt = 1;
    loop {
        match server.resume().await {
            Ok(()) => return Ok(()),
            Err(error) if attempt < 3 && server.port_taken() => {
                eprintln!(
                    "{} did not start (attempt {attempt}), trying fresh ports: {error:#}",
                    S::NAME
                );
                server.renew_ports();
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

impl Server for Etcd {
    const NAME: &'static str = "etcd";
    async fn resume(&mut self) -> anyhow::Result<()> {
        Etcd::resume(self).await
    }
    /// etcd's failures to bind are not told apart from its other failures to start.
    fn port_taken(&self) -> bool {
        true
    }
    fn renew_ports(&mut self) {
        self.stop();
        std::fs::remove_dir_all(self.data_dir()).ok();
        self.client_port = free_port();
        self.peer_port = free_port();
    }
}

impl Server for ControlPlane {
    const NAME: &'static str = "the control plane";
    async fn resume(&mut self) -> anyhow::Result<()> {
        ControlPlane::resume(self).await
    }
    fn port_taken(&self) -> bool {
        self.log().contains(ADDRESS_IN_USE)
    }
    fn renew_ports(&mut self) {
        self.kill();
        self.addr = format!("127.0.0.1:{}", free_port());
        self.admin_addr = format!("127.0.0.1:{}", free_port());
        self.dashboard_addr = format!("127.0.0.1:{}", free_port());
    }
}

impl Server for Gateway {
    const NAME: &'static str = "the gateway";
    async fn resume(&mut self) -> anyhow::Result<()> {
        Gateway::resume(self).await
    }
    fn port_taken(&self) -> bool {
        self.log().contains(ADDRESS_IN_USE)
    }
    fn renew_ports(&mut self) {
        self.kill();
        self.addr = format!("127.0.0.1:{}", free_port());
        self.admin_addr = format!("127.0.0.1:{}", free_port());
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// `berth certs --dir DIR --node NODE...`: the CA and server certificate at first, node
/// certificates from the existing CA after.
pub fn make_certs(dir: &Path, nodes: &[&str]) {
    let mut command = Command::new(berth_bin());
    command.args(["certs", "--dir"]).arg(dir);
    for node in nodes {
        command.args(["--node", node]);
    }
    let out = command.output().expect("run berth certs");
    assert!(out.status.success(), "berth certs: {out:?}");
}

/// A finished command's standard output and error, as text.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A real etcd with a temporary data directory.
pub struct Etcd {
    child: Option<Child>,
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    /// With TLS: the directory `berth certs` wrote (etcd serves server.pem and asks clients
    /// for a certificate from ca.pem).
    tls: Option<PathBuf>,
}

impl Etcd {
    /// Starts etcd (the `etcd` binary from PATH) and waits until it answers. A port that was
    /// free when picked can be taken before etcd binds it (by another test's server, or as the
    /// local port of an outgoing connection), so a first start that fails is tried again on
    /// fresh ports.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(None).await
    }

    /// Starts etcd serving TLS with the certificates `berth certs` wrote in `certs`, requiring
    /// client certificates from its CA (`--client-cert-auth`).
    pub async fn start_tls(certs: &Path) -> anyhow::Result<Self> {
        Self::start_with(Some(certs.to_path_buf())).await
    }

    async fn start_with(tls: Option<PathBuf>) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("berth-etcd-").tempdir()?;
        let mut etcd = Self {
            child: None,
            dir,
            client_port: free_port(),
            peer_port: free_port(),
            tls,
        };
        first_start(&mut etcd).await?;
        Ok(etcd)
    }

    /// The client URL.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// With TLS, client options trusting the CA and presenting the server certificate.
    fn with_tls(
        &self,
        options: etcd_client::ConnectOptions,
    ) -> anyhow::Result<etcd_client::ConnectOptions> {
        let Some(certs) = &self.tls else {
            return Ok(options);
        };
        let read = |name: &str| std::fs::read(certs.join(name));
        Ok(options.with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read("ca.pem")?))
                .identity(etcd_client::Identity::from_pem(
                    read("server.pem")?,
                    read("server-key.pem")?,
                )),
        ))
    }

    /// Its data directory (etcd's `--data-dir`, under its name `test`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Its peer URL (`--initial-advertise-peer-urls`).
    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// etcd's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to etcd.
    pub fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            child.signal(signal);
        }
    }

    /// Kills etcd (SIGKILL), keeping its data.
    pub fn stop(&mut self) {
        self.child.take();
    }

    /// Starts etcd again on the same ports and data, and waits until it answers.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let url = self.url();
        let peer = self.peer_url();
        let mut command = Command::new("etcd");
        command
            .arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"));
        if let Some(certs) = &self.tls {
            command
                .arg(format!(
                    "--cert-file={}",
                    certs.join("server.pem").display()
                ))
                .arg(format!(
                    "--key-file={}",
                    certs.join("server-key.pem").display()
                ))
                .arg(format!(
                    "--trusted-ca-file={}",
                    certs.join("ca.pem").display()
                ))
                .arg("--client-cert-auth");
        }
        let log = self.dir.path().join("etcd.log");
        let child = Child::spawn(command, &log)
            .context("start etcd (install Debian's etcd-server package)")?;
        self.child = Some(child);
        let options = self.with_tls(
            etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(1))
                .with_timeout(Duration::from_secs(2)),
        )?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(mut client) =
                etcd_client::Client::connect([url.clone()], Some(options.clone())).await
            {
                if client.status().await.is_ok() {
                    // The etcd that answers may be another test's, on a port ours could not
                    // bind (picked free, taken since): ours is the member with our peer URL.
                    let ours = client.member_list().await.is_ok_and(|list| {
                        list.members().iter().any(|m| m.peer_urls().contains(&peer))
                    });
                    if ours {
                        return Ok(());
                    }
                    self.stop();
                    bail!("another etcd answers on {url}: its port was taken");
                }
            }
            let exited = !self.child.as_mut().is_some_and(Child::is_running);
            if exited || Instant::now() > deadline {
                let what = if exited {
                    "exited"
                } else {
                    "did not answer in time"
                };
                let logged = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = logged.lines().rev().take(5).collect();
                self.stop();
                bail!(
                    "etcd on {url} {what}; the end of its log:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// A client of this etcd.
    pub async fn client(&self) -> anyhow::Result<etcd_client::Client> {
        let options = match self.tls {
            Some(_) => Some(self.with_tls(etcd_client::ConnectOptions::new())?),
            None => None,
        };
        Ok(etcd_client::Client::connect([self.url()], options).await?)
    }
}

/// A gRPC client of the agent service that sends a token.
pub type AgentClient = AgentServiceClient<InterceptedService<Channel, TokenInterceptor>>;

/// Adds `authorization: Bearer <token>` when a token is set.
#[derive(Clone)]
pub struct TokenInterceptor(Option<String>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            let value: MetadataValue<_> = format!("Bearer {token}").parse().expect("ascii token");
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// A real `berth control-plane` process.
pub struct ControlPlane {
    child: Option<Child>,
    dir: TempDir,
    etcd_url: String,
    /// gRPC address, `127.0.0.1:PORT`.
    pub addr: String,
    /// Admin HTTP address, `127.0.0.1:PORT`.
    pub admin_addr: String,
    /// The web dashboard's address, `127.0.0.1:PORT`.
    pub dashboard_addr: String,
    /// With TLS: the directory `berth certs` wrote (the CA clients verify the server with).
    tls: Option<PathBuf>,
    /// Extra flags of `berth control-plane`.
    extra: Vec<String>,
}

impl ControlPlane {
    /// Starts a control plane serving TLS with the certificates `berth certs` wrote in
    /// `certs` (server.pem, server-key.pem; ca.pem for client certificates), plus `extra` flags.
    pub async fn start_tls(etcd_url: &str, certs: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let mut cp = Self::prepare(etcd_url)?;
        cp.tls = Some(certs.to_path_buf());
        cp.extra = [
            "--tls-cert",
            &certs.join("server.pem").display().to_string(),
            "--tls-key",
            &certs.join("server-key.pem").display().to_string(),
            "--tls-ca",
            &certs.join("ca.pem").display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(extra.iter().map(|s| s.to_string()))
        .collect();
        first_start(&mut cp).await?;
        Ok(cp)
    }

    /// Client TLS settings trusting this control plane's CA (`None` without TLS).
    pub fn client_tls(&self) -> Option<tonic::transport::ClientTlsConfig> {
        let ca = std::fs::read(self.tls.as_ref()?.join("ca.pem")).ok()?;
        Some(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
        )
    }

    /// Starts a control plane over `etcd_url` and waits until its health check serves.
    pub async fn start(etcd_url: &str) -> anyhow::Result<Self> {
        Self::start_with(etcd_url, &[]).await
    }

    /// Starts a control plane over `etcd_url` with `extra` flags of `berth control-plane`.
    pub async fn start_with(etcd_url: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let mut cp = Self::prepare(etcd_url)?;
        cp.extra = extra.iter().map(|s| s.to_string()).collect();
        first_start(&mut cp).await?;
        Ok(cp)
    }

    fn prepare(etcd_url: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("berth-cp-").tempdir()?;
        std::fs::write(
            dir.path().join("tokens"),
            format!("# admin\n{ADMIN_TOKEN}\n"),
        )?;
        std::fs::write(dir.path().join("join"), format!("{JOIN_TOKEN}\n"))?;
        Ok(Self {
            child: None,
            dir,
            etcd_url: etcd_url.to_string(),
            addr: format!("127.0.0.1:{}", free_port()),
            admin_addr: format!("127.0.0.1:{}", free_port()),
            dashboard_addr: format!("127.0.0.1:{}", free_port()),
            tls: None,
            extra: Vec::new(),
        })
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            child.signal(signal);
        }
    }

    /// Kills the process (SIGKILL).
    pub fn kill(&mut self) {
        self.child.take();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(Child::is_running)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process again on the same addresses and waits until it serves.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new(berth_bin());
        command
            .arg("control-plane")
            .arg("--etcd")
            .arg(&self.etcd_url)
            .arg("--listen")
            .arg(&self.addr)
            .arg("--admin-listen")
            .arg(&self.admin_addr)
            .arg("--dashboard-listen")
            .arg(&self.dashboard_addr)
            .arg("--token-file")
            .arg(self.dir.path().join("tokens"))
            .arg("--join-token-file")
            .arg(self.dir.path().join("join"))
            .arg("--volume-root")
            .arg(volume_root())
            .args(&self.extra)
            .env("RUST_LOG", "info");
        self.child = Some(Child::spawn(
            command,
            &self.dir.path().join("control-plane.log"),
        )?);
        let url = self.url();
        let tls = self.client_tls();
        eventually(READY_TIMEOUT, "the control plane to serve", || {
            let (url, tls) = (url.clone(), tls.clone());
            async move {
                let mut endpoint = Channel::from_shared(url).ok()?;
                if let Some(tls) = tls {
                    endpoint = endpoint.tls_config(tls).ok()?;
                }
                let channel = endpoint.connect().await.ok()?;
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                let request = tonic_health::pb::HealthCheckRequest::default();
                health.check(request).await.ok()
            }
        })
        .await
        .with_context(|| self.log())?;
        Ok(())
    }

    /// URL of the gRPC API: `https://` with TLS, else `http://`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// `berth token create ARGS...` with the admin token: the new token, printed once.
    pub fn create_token(&self, args: &[&str]) -> String {
        let mut all = vec!["token", "create"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "berth token create: {}",
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// An agent client with the admin token.
    pub async fn agents(&self) -> anyhow::Result<AgentClient> {
        self.agents_with(Some(ADMIN_TOKEN)).await
    }

    /// An agent client with `token` (or none).
    pub async fn agents_with(&self, token: Option<&str>) -> anyhow::Result<AgentClient> {
        let channel = Channel::from_shared(self.url())?.connect().await?;
        Ok(AgentServiceClient::with_interceptor(
            channel,
            TokenInterceptor(token.map(str::to_string)),
        ))
    }

    /// Runs the `berth` CLI against this control plane with the admin token.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command(args).output().expect("run berth")
    }

    /// The `berth` CLI command against this control plane with the admin token, not started.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(berth_bin());
        command
            .args(args)
            .env("BERTH_ADDR", self.url())
            .env("BERTH_TOKEN", ADMIN_TOKEN)
            // Not the user's own CLI config (which `berth up` writes).
            .env("BERTH_CLI_CONFIG", self.dir.path().join("cli-config.yaml"));
        if let Some(certs) = &self.tls {
            command.env("BERTH_TLS_CA", certs.join("ca.pem"));
        }
        command
    }

    /// The process's log so far, for failure messages.
    pub fn log(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("control-plane.log")).unwrap_or_default();
        format!("control-plane log:\n{log}")
    }
}

/// A unique agent name for this test run, so tests can share a cluster.
pub fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

/// A real `berth gateway` process.
pub struct Gateway {
    child: Option<Child>,
    dir: TempDir,
    etcd_url: String,
    name: String,
    extra: Vec<String>,
    /// HTTP address, `127.0.0.1:PORT`.
    pub addr: String,
    /// Admin address, `127.0.0.1:PORT`.
    pub admin_addr: String,
    /// With an HTTPS admin listener: the CA its certificate chains to.
    pub admin_ca: Option<PathBuf>,
}

impl Gateway {
    /// Starts a gateway over `etcd_url` and waits until it has listed its routes.
    pub async fn start(etcd_url: &str) -> anyhow::Result<Self> {
        Self::start_named(etcd_url, "test-gateway").await
    }

    /// Starts a gateway named `name` (names tell gateways' claims and breakers apart).
    pub async fn start_named(etcd_url: &str, name: &str) -> anyhow::Result<Self> {
        Self::start_with(etcd_url, name, &[]).await
    }

    /// Starts a gateway named `name` with `extra` flags of `berth gateway`.
    pub async fn start_with(etcd_url: &str, name: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let mut gateway = Self {
            child: None,
            dir: tempfile::Builder::new().prefix("berth-gw-").tempdir()?,
            etcd_url: etcd_url.to_string(),
            name: name.to_string(),
            extra: extra.iter().map(|a| a.to_string()).collect(),
            addr: format!("127.0.0.1:{}", free_port()),
            admin_addr: format!("127.0.0.1:{}", free_port()),
            admin_ca: None,
        };
        first_start(&mut gateway).await?;
        Ok(gateway)
    }

    /// Starts a gateway serving HTTPS, its admin listener included (`--admin-tls`), with the
    /// certificates `berth certs` wrote in `certs`, plus `extra` flags.
    pub async fn start_tls(
        etcd_url: &str,
        name: &str,
        certs: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let (cert, key) = (certs.join("server.pem"), certs.join("server-key.pem"));
        let mut flags = vec![
            "--tls-cert".to_string(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
            "--admin-tls".into(),
        ];
        flags.extend(extra.iter().map(|a| a.to_string()));
        let mut gateway = Self {
            child: None,
            dir: tempfile::Builder::new().prefix("berth-gw-").tempdir()?,
            etcd_url: etcd_url.to_string(),
            name: name.to_string(),
            extra: flags,
            addr: format!("127.0.0.1:{}", free_port()),
            admin_addr: format!("127.0.0.1:{}", free_port()),
            admin_ca: Some(certs.join("ca.pem")),
        };
        first_start(&mut gateway).await?;
        Ok(gateway)
    }

    /// Kills the process (SIGKILL).
    pub fn kill(&mut self) {
        self.child.take();
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            child.signal(signal);
        }
    }

    /// Stops the process with SIGTERM and waits up to `within` for it to exit; whether it
    /// exited successfully.
    pub async fn terminate(&mut self, within: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        child.signal("TERM");
        child.exited(within).await.is_some_and(|s| s.success())
    }

    /// Starts the process again on the same addresses and waits until it is ready.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let tokens = self.dir.path().join("tokens");
        std::fs::write(&tokens, format!("{ADMIN_TOKEN}\n"))?;
        let mut command = Command::new(berth_bin());
        command
            .arg("gateway")
            .arg("--token-file")
            .arg(&tokens)
            .args(["--etcd", &self.etcd_url, "--listen", &self.addr])
            .args(["--admin-listen", &self.admin_addr, "--name", &self.name])
            .args(&self.extra)
            .env("RUST_LOG", "info");
        self.child = Some(Child::spawn(command, &self.dir.path().join("gateway.log"))?);
        let (ready, ca) = (self.admin_addr.clone(), self.admin_ca.clone());
        eventually(READY_TIMEOUT, "the gateway to be ready", || {
            let (ready, ca) = (ready.clone(), ca.clone());
            async move {
                let response = wire::get_with_token(&ready, ca.as_deref(), "/readyz", None).await?;
                (response.status == 200).then_some(())
            }
        })
        .await
        .with_context(|| self.log())?;
        Ok(())
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default();
        format!("gateway {} log:\n{log}", self.name)
    }
}

/// An open node-agent stream, as a node agent holds it.
pub struct NodeSession {
    /// What the node sends; dropping it ends the node's side.
    pub outbound: tokio::sync::mpsc::Sender<berth_proto::v1::NodeMessage>,
    /// What the control plane sends.
    pub inbound: tonic::Streaming<berth_proto::v1::ControlMessage>,
    /// The first control message.
    pub first: berth_proto::v1::ControlMessage,
}

/// Opens the node-agent stream on `channel` with `token`, says hello as `node`, and waits for
/// the first control message; the status the control plane refused the stream with, if it did.
pub async fn open_node_session(
    channel: Channel,
    token: &str,
    node: &str,
) -> Result<NodeSession, tonic::Status> {
    use berth_proto::v1::node_agent_service_client::NodeAgentServiceClient;
    use berth_proto::v1::{node_message, Hello, NodeMessage};
    let value: MetadataValue<_> = format!("Bearer {token}").parse().expect("ascii token");
    let mut client =
        NodeAgentServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", value.clone());
            Ok(r)
        });
    let (outbound, rx) = tokio::sync::mpsc::channel(4);
    let hello = NodeMessage {
        kind: Some(node_message::Kind::Hello(Hello {
            node: node.into(),
            ..Default::default()
        })),
    };
    outbound
        .send(hello)
        .await
        .expect("the stream's queue is open");
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut inbound = client.connect(stream).await?.into_inner();
    let first = inbound.message().await?.expect("a first control message");
    Ok(NodeSession {
        outbound,
        inbound,
        first,
    })
}

/// Opens the node-agent stream on `channel` with `token`, says hello as `node`, and returns the
/// first control message, or the status the control plane refused the stream with.
pub async fn open_node_stream(
    channel: Channel,
    token: &str,
    node: &str,
) -> Result<berth_proto::v1::ControlMessage, tonic::Status> {
    Ok(open_node_session(channel, token, node).await?.first)
}

/// Reads `stream` to its end (within 10 s): the status it ended with, `None` if it ended well.
pub async fn end_of<T>(stream: &mut tonic::Streaming<T>) -> Option<tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await
    .expect("the stream ended")
}
