//! Berth's servers as subcommands of the one binary: flags and environment layered over a
//! config file, logging set up, and a shutdown on Ctrl-C or SIGTERM.

use berth_control_plane::Config;
use berth_gateway::serve::ClientLimits;
use clap::{Args, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Log output format.
#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// TLS to etcd, for the control plane and the gateway alike.
#[derive(Args, Debug)]
pub struct EtcdTlsArgs {
    /// PEM CA that etcd's certificate chains to (needed for https:// etcd endpoints).
    #[arg(long, env = "BERTH_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// PEM certificate to present to etcd (for etcd's --client-cert-auth).
    #[arg(long, env = "BERTH_ETCD_CERT", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long, env = "BERTH_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
}

/// How the admin listener (/metrics, /healthz, /readyz) is protected, for both servers.
#[derive(Args, Debug)]
pub struct AdminArgs {
    /// Serve the admin listener over HTTPS with the server's --tls-cert and --tls-key.
    #[arg(long, env = "BERTH_ADMIN_TLS")]
    admin_tls: bool,
    /// File of tokens (one per line) that may read /metrics; with it, /metrics needs
    /// `Authorization: Bearer` with one of them, an admin token, or a read-only token.
    #[arg(long, env = "BERTH_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
}

/// Flags of `berth control-plane`. Each can also be set in the environment or the config file.
#[derive(Args, Debug)]
pub struct ControlPlaneArgs {
    /// YAML config file; flags and environment override it.
    #[arg(long, env = "BERTH_CONFIG")]
    config: Option<PathBuf>,
    /// etcd endpoints, comma-separated.
    #[arg(long, env = "BERTH_ETCD", value_delimiter = ',')]
    etcd: Option<Vec<String>>,
    /// gRPC listen address (default 127.0.0.1:7070).
    #[arg(long, env = "BERTH_LISTEN")]
    listen: Option<SocketAddr>,
    /// HTTP admin address for /metrics, /healthz, /readyz (default 127.0.0.1:7071).
    #[arg(long, env = "BERTH_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// The web dashboard's address (default 127.0.0.1:7072; HTTPS with --tls-cert).
    #[arg(long, env = "BERTH_DASHBOARD_LISTEN")]
    dashboard_listen: Option<SocketAddr>,
    /// Serve no dashboard.
    #[arg(long, env = "BERTH_NO_DASHBOARD", conflicts_with = "dashboard_listen")]
    no_dashboard: bool,
    /// File of admin tokens, one per line.
    #[arg(long, env = "BERTH_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// File of node-agent join tokens, one per line.
    #[arg(long, env = "BERTH_JOIN_TOKEN_FILE")]
    join_token_file: Option<PathBuf>,
    /// etcd key prefix (default /berth).
    #[arg(long, env = "BERTH_PREFIX")]
    prefix: Option<String>,
    /// Host volume paths must lie under this directory (default /var/lib/berth/volumes).
    #[arg(long, env = "BERTH_VOLUME_ROOT")]
    volume_root: Option<PathBuf>,
    /// PEM certificate to serve TLS with (plain text without it); `berth certs` makes one.
    #[arg(long, env = "BERTH_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "BERTH_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// PEM CA that node agents' client certificates must chain to.
    #[arg(long, env = "BERTH_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Refuse node agents without a client certificate signed by --tls-ca (mTLS).
    #[arg(long, env = "BERTH_REQUIRE_NODE_CERT")]
    require_node_cert: bool,
    #[command(flatten)]
    admin: AdminArgs,
    #[command(flatten)]
    etcd_tls: EtcdTlsArgs,
    /// Client connections the gRPC server holds at once (default 4096); one more is closed.
    #[arg(long, env = "BERTH_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Finished replay records kept per agent, oldest dropped first (default 10000).
    #[arg(long, env = "BERTH_FINISHED_PER_AGENT")]
    finished_per_agent: Option<u64>,
    /// Bytes of finished replay records kept per agent, e.g. 256M (default 256M).
    #[arg(long, env = "BERTH_FINISHED_PER_AGENT_BYTES", value_parser = berth_proto::quantity::parse_memory)]
    finished_per_agent_bytes: Option<u64>,
    /// Finished replay records kept in all (default 100000).
    #[arg(long, env = "BERTH_FINISHED_TOTAL")]
    finished_total: Option<u64>,
    /// Bytes of finished replay records kept in all, e.g. 1G (default 1G).
    #[arg(long, env = "BERTH_FINISHED_TOTAL_BYTES", value_parser = berth_proto::quantity::parse_memory)]
    finished_total_bytes: Option<u64>,
    /// History etcd keeps behind its current revision; the leader compacts the rest (default
    /// 5m; 0s leaves it to etcd's --auto-compaction-retention).
    #[arg(long, env = "BERTH_COMPACTION_RETENTION", value_parser = berth_proto::quantity::parse_duration)]
    compaction_retention: Option<std::time::Duration>,
    /// etcd's space quota (its --quota-backend-bytes), to warn as the database nears it
    /// (default 2G).
    #[arg(long, env = "BERTH_ETCD_QUOTA_BYTES", value_parser = berth_proto::quantity::parse_memory)]
    etcd_quota_bytes: Option<u64>,
    /// The autoscaler's stable window (default 60s; its panic window is a tenth of it).
    #[arg(long, env = "BERTH_AUTOSCALE_WINDOW", value_parser = berth_proto::quantity::parse_duration)]
    autoscale_window: Option<std::time::Duration>,
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, env = "BERTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

impl ControlPlaneArgs {
    fn into_config(self) -> anyhow::Result<(Config, LogFormat)> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(etcd) = self.etcd {
            config.etcd = etcd;
        }
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(admin) = self.admin_listen {
            config.admin_listen = admin;
        }
        if let Some(dashboard) = self.dashboard_listen {
            config.dashboard_listen = Some(dashboard);
        }
        if self.no_dashboard {
            config.dashboard_listen = None;
        }
        if self.token_file.is_some() {
            config.token_file = self.token_file;
        }
        if self.join_token_file.is_some() {
            config.join_token_file = self.join_token_file;
        }
        if let Some(prefix) = self.prefix {
            config.prefix = prefix;
        }
        if let Some(root) = self.volume_root {
            config.volume_root = root;
        }
        if let Some(max) = self.max_connections {
            config.max_connections = max;
        }
        for (flag, setting) in [
            (self.finished_per_agent, &mut config.finished_per_agent),
            (
                self.finished_per_agent_bytes,
                &mut config.finished_per_agent_bytes,
            ),
            (self.finished_total, &mut config.finished_total),
            (self.finished_total_bytes, &mut config.finished_total_bytes),
            (self.etcd_quota_bytes, &mut config.etcd_quota_bytes),
            (
                self.compaction_retention.map(|d| d.as_secs()),
                &mut config.compaction_retention_seconds,
            ),
            (
                self.autoscale_window.map(|d| d.as_secs()),
                &mut config.autoscale_window_seconds,
            ),
        ] {
            if let Some(value) = flag {
                *setting = value;
            }
        }
        for (flag, setting) in [
            (self.tls_cert, &mut config.tls_cert),
            (self.tls_key, &mut config.tls_key),
            (self.tls_ca, &mut config.tls_ca),
            (self.etcd_tls.etcd_ca, &mut config.etcd_ca),
            (self.etcd_tls.etcd_cert, &mut config.etcd_cert),
            (self.etcd_tls.etcd_key, &mut config.etcd_key),
            (self.admin.admin_token_file, &mut config.admin_token_file),
        ] {
            if flag.is_some() {
                *setting = flag;
            }
        }
        config.require_node_cert |= self.require_node_cert;
        config.admin_tls |= self.admin.admin_tls;
        Ok((config, self.log_format))
    }
}

/// Runs `berth control-plane` until Ctrl-C or SIGTERM.
pub async fn control_plane(args: ControlPlaneArgs) -> anyhow::Result<()> {
    let (config, log_format) = args.into_config()?;
    init_logging(log_format);
    berth_control_plane::run(config, shutdown_signal()).await?;
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file, `docker logs` or journald gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Flags of `berth node-agent`.
#[derive(Args, Debug)]
pub struct NodeAgentArgs {
    /// Control-plane gRPC addresses, comma-separated; tried in turn.
    #[arg(
        long,
        env = "BERTH_CONTROL_PLANE",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:7070"
    )]
    control_plane: Vec<String>,
    /// This node's name (a DNS label).
    #[arg(long, env = "BERTH_NODE_NAME")]
    name: String,
    /// File holding the join token (its first token is used).
    #[arg(long, env = "BERTH_JOIN_TOKEN_FILE")]
    join_token_file: PathBuf,
    /// Docker endpoint.
    #[arg(
        long,
        env = "BERTH_DOCKER",
        default_value = "unix:///var/run/docker.sock"
    )]
    docker: String,
    /// Host volume paths must lie under this directory.
    #[arg(
        long,
        env = "BERTH_VOLUME_ROOT",
        default_value = "/var/lib/berth/volumes"
    )]
    volume_root: PathBuf,
    /// Where the node agent keeps what must outlive it (restart counts).
    #[arg(
        long,
        env = "BERTH_STATE_DIR",
        default_value = "/var/lib/berth/node-agent"
    )]
    state_dir: PathBuf,
    /// Docker network the agents' containers join (created if missing).
    #[arg(long, env = "BERTH_NETWORK", default_value = "berth")]
    network: String,
    /// Node label K=V for node selectors (repeatable).
    #[arg(long = "label", value_parser = crate::commands::deploy::parse_key_value)]
    labels: Vec<(String, String)>,
    /// Extra label K=V on every container this node starts (repeatable).
    #[arg(long = "container-label", value_parser = crate::commands::deploy::parse_key_value)]
    container_labels: Vec<(String, String)>,
    /// Size at which a container's log file is rotated (Docker's json-file and local logging
    /// drivers), e.g. 10MiB; 0 leaves the containers' logs to the engine's own settings.
    #[arg(long, env = "BERTH_CONTAINER_LOG_MAX_SIZE", default_value = "10MiB", value_parser = berth_proto::quantity::parse_memory)]
    container_log_max_size: u64,
    /// Log files kept per container, the current one among them (at least 1).
    #[arg(long, env = "BERTH_CONTAINER_LOG_MAX_FILES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    container_log_max_files: u32,
    /// PEM CA to verify `https://` control planes with.
    #[arg(long, env = "BERTH_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate this node presents (mTLS); `berth certs` makes node.pem.
    #[arg(long, env = "BERTH_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "BERTH_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, env = "BERTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Runs `berth node-agent` until Ctrl-C or SIGTERM.
pub async fn node_agent(args: NodeAgentArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let text = std::fs::read_to_string(&args.join_token_file)
        .map_err(|e| anyhow::anyhow!("join token file {}: {e}", args.join_token_file.display()))?;
    let join_token = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "join token file {} holds no token",
                args.join_token_file.display()
            )
        })?
        .to_string();
    let config = berth_node_agent::Config {
        control_planes: args.control_plane,
        name: args.name,
        join_token,
        docker: args.docker,
        volume_root: args.volume_root,
        state_dir: args.state_dir,
        network: args.network,
        labels: args.labels.into_iter().collect(),
        container_labels: args.container_labels.into_iter().collect(),
        tls: client_tls(
            args.tls_ca.as_deref(),
            args.tls_cert.as_deref().zip(args.tls_key.as_deref()),
        )?,
        container_logs: (args.container_log_max_size > 0).then_some(
            berth_node_agent::docker::LogRotation {
                max_bytes: args.container_log_max_size,
                max_files: args.container_log_max_files,
            },
        ),
    };
    berth_node_agent::run(config, shutdown_signal()).await?;
    Ok(())
}

/// Flags of `berth gateway`.
#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "BERTH_ETCD",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd: Vec<String>,
    /// etcd key prefix.
    #[arg(long, env = "BERTH_PREFIX", default_value = "/berth")]
    prefix: String,
    /// HTTP address clients reach agents at (`/agents/{name}/...`).
    #[arg(long, env = "BERTH_GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// HTTP admin address for /metrics, /healthz, /readyz.
    #[arg(
        long,
        env = "BERTH_GATEWAY_ADMIN_LISTEN",
        default_value = "127.0.0.1:8081"
    )]
    admin_listen: SocketAddr,
    /// Requests in flight per agent; beyond it requests are refused at once with 503.
    #[arg(long, env = "BERTH_GATEWAY_MAX_CONCURRENCY", default_value_t = berth_gateway::MAX_CONCURRENCY)]
    max_concurrency: usize,
    /// This gateway's name in the breaker states it publishes (default: host name and pid).
    #[arg(long, env = "BERTH_GATEWAY_NAME")]
    name: Option<String>,
    /// Serving threads, each with its own event loop and upstream connections (0: one per CPU).
    #[arg(long, env = "BERTH_GATEWAY_WORKERS", default_value_t = 0)]
    workers: usize,
    /// File of admin tokens, one per line: they may read any agent's stored requests.
    #[arg(long, env = "BERTH_GATEWAY_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM certificate to serve HTTPS with (plain HTTP without it); `berth certs` makes one.
    #[arg(long, env = "BERTH_GATEWAY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "BERTH_GATEWAY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[command(flatten)]
    admin: AdminArgs,
    #[command(flatten)]
    etcd_tls: EtcdTlsArgs,
    /// Time a client has to finish the TLS handshake, and then to send each request's headers;
    /// a slower one is cut off (slowloris).
    #[arg(long, env = "BERTH_GATEWAY_HEADER_TIMEOUT", default_value = "30s", value_parser = crate::quantity::parse_duration)]
    header_timeout: std::time::Duration,
    /// Time a client has to send a body the gateway reads whole (one it may retry or queue);
    /// a slower one gets 408.
    #[arg(long, env = "BERTH_GATEWAY_BODY_TIMEOUT", default_value = "60s", value_parser = crate::quantity::parse_duration)]
    body_timeout: std::time::Duration,
    /// Bytes of request header fields (names and values); more gets 431.
    #[arg(long, env = "BERTH_GATEWAY_MAX_HEADER_BYTES", default_value_t = ClientLimits::default().max_header_bytes)]
    max_header_bytes: usize,
    /// Open client connections; one more is answered 503 and closed.
    #[arg(long, env = "BERTH_GATEWAY_MAX_CONNECTIONS", default_value_t = ClientLimits::default().max_connections)]
    max_connections: usize,
    /// Time an agent's answer may go without a byte (a stream between events, say) before the
    /// gateway cuts it; 0 never does.
    #[arg(long, env = "BERTH_GATEWAY_STREAM_IDLE_TIMEOUT", default_value = "5m", value_parser = crate::quantity::parse_duration)]
    stream_idle_timeout: std::time::Duration,
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, env = "BERTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Runs `berth gateway` until Ctrl-C or SIGTERM.
pub async fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let name = args.name.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "gateway".into());
        format!("{host}-{}", std::process::id())
    });
    let config = berth_gateway::GatewayConfig {
        etcd: args.etcd,
        prefix: args.prefix,
        listen: args.listen,
        admin_listen: args.admin_listen,
        admin_tls: args.admin.admin_tls,
        admin_token_file: args.admin.admin_token_file,
        max_concurrency: args.max_concurrency,
        name,
        workers: args.workers,
        token_file: args.token_file,
        tls: args.tls_cert.zip(args.tls_key),
        limits: ClientLimits {
            header_timeout: args.header_timeout,
            body_timeout: args.body_timeout,
            max_header_bytes: args.max_header_bytes,
            max_connections: args.max_connections,
        },
        stream_idle_timeout: Some(args.stream_idle_timeout).filter(|t| !t.is_zero()),
        etcd_tls: berth_store::EtcdTls {
            ca: args.etcd_tls.etcd_ca,
            cert: args.etcd_tls.etcd_cert,
            key: args.etcd_tls.etcd_key,
        },
    };
    berth_gateway::run(config, shutdown_signal()).await?;
    Ok(())
}

/// TLS settings for `https://` connections to control planes: the CA to verify them with and,
/// for mTLS, a client certificate and key. `None` without a CA.
pub fn client_tls(
    ca: Option<&std::path::Path>,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))
    };
    let Some(ca) = ca else {
        anyhow::ensure!(identity.is_none(), "--tls-cert needs --tls-ca");
        return Ok(None);
    };
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            read("--tls-cert", cert)?,
            read("--tls-key", key)?,
        ));
    }
    Ok(Some(tls))
}
