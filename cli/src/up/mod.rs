//! `berth up`: Berth on this host, all in one. Starts etcd (unless `--etcd` names one), a
//! control plane, a gateway and a node agent as child processes of this binary, writes the
//! CLI's config so that plain `berth ls` works, prints the addresses, and on Ctrl-C or SIGTERM
//! stops everything it started. Agents' containers keep running (as when a node agent
//! restarts) and are adopted by the next `berth up`, which also stops any part that a killed
//! `berth up` left running (`parts`). A part that exits once Berth is up is started again.

use crate::client::Client;
use crate::config::CliConfig;
use anyhow::{bail, Context};
use berth_proto::v1::{GetNodeRequest, NodeStatus};
use clap::Args;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod parts;
use parts::{Lock, Parts};

/// Flags of `berth up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// Where Berth keeps its data on this host: etcd's data, tokens, host volumes, logs
    /// (default: $XDG_DATA_HOME/berth, or ~/.local/share/berth).
    #[arg(long, env = "BERTH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// An etcd to use (comma-separated URLs) instead of starting one.
    #[arg(long)]
    etcd: Option<String>,
    /// Client address of the etcd that `berth up` starts.
    #[arg(long, default_value = "127.0.0.1:23790")]
    etcd_listen: SocketAddr,
    /// Peer address of the etcd that `berth up` starts (default: the client port + 10).
    #[arg(long)]
    etcd_peer_listen: Option<SocketAddr>,
    /// The control plane's gRPC address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// The control plane's admin address (/metrics, /readyz).
    #[arg(long, default_value = "127.0.0.1:7071")]
    admin_listen: SocketAddr,
    /// The gateway's address: agents are at /agents/{name}/...
    #[arg(long, default_value = "127.0.0.1:8080")]
    gateway_listen: SocketAddr,
    /// The web dashboard's address (HTTPS unless --insecure).
    #[arg(long, default_value = "127.0.0.1:7072")]
    dashboard_listen: SocketAddr,
    /// The gateway's admin address (/metrics, /readyz).
    #[arg(long, default_value = "127.0.0.1:8081")]
    gateway_admin_listen: SocketAddr,
    /// This node's name (default: the host name, as a DNS label).
    #[arg(long)]
    node_name: Option<String>,
    /// Docker endpoint.
    #[arg(long, default_value = "unix:///var/run/docker.sock")]
    docker: String,
    /// Docker network the agents' containers join.
    #[arg(long, default_value = "berth")]
    network: String,
    /// Plain text instead of TLS between the CLI, the control plane and the node agent
    /// (by default a private CA and certificates are made in the data directory at first
    /// start, and node agents must present theirs).
    #[arg(long)]
    insecure: bool,
}

/// The data directory: the flag, or the user's data directory.
fn data_dir(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = flag {
        return Ok(dir);
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("berth"));
    }
    let home = std::env::var_os("HOME").context("HOME is not set: pass --data-dir")?;
    Ok(PathBuf::from(home).join(".local/share/berth"))
}

/// The host name as a DNS label, or `local`.
fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let label: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let label = label.trim_matches('-').to_string();
    if label.is_empty() {
        "local".into()
    } else {
        label
    }
}

/// A file holding one token, made (readable by the owner only) with a random token if
/// missing; the token.
fn token_file(path: &Path) -> anyhow::Result<String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        if let Some(token) = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
        {
            return Ok(token.to_string());
        }
    }
    let token = format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    write_private(path, &format!("{token}\n"))?;
    Ok(token)
}

/// Writes `text` to `path`, readable and writable by the owner only.
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

/// Flags of a server (control plane, gateway) serving TLS with `certs`' server certificate, its
/// admin listener too: HTTPS, and /metrics for the admin or read-only tokens in `tokens`.
fn serve_tls(command: &mut Command, certs: &crate::certs::CertFiles, tokens: &Path) {
    command
        .arg("--tls-cert")
        .arg(&certs.server_cert)
        .arg("--tls-key")
        .arg(&certs.server_key)
        .arg("--admin-tls")
        .arg("--admin-token-file")
        .arg(tokens);
}

/// Whether `GET path` on `addr` answers 200; over TLS verified with the CA `ca` when given.
async fn http_ok(addr: SocketAddr, path: &str, ca: Option<&Path>) -> bool {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    async fn get<S: AsyncRead + AsyncWrite + Unpin>(
        mut stream: S,
        addr: SocketAddr,
        path: &str,
    ) -> bool {
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        if stream.write_all(request.as_bytes()).await.is_err() {
            return false;
        }
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.is_ok() && head.ends_with(b"200")
    }
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let Some(ca) = ca else {
        return get(tcp, addr, path).await;
    };
    let Ok(connector) = berth_admin::tls::connector(ca) else {
        return false;
    };
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    match connector.connect(name, tcp).await {
        Ok(stream) => get(stream, addr, path).await,
        Err(_) => false,
    }
}

async fn etcd_answers(url: &str) -> bool {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(2));
    match etcd_client::Client::connect([url], Some(options)).await {
        Ok(mut client) => client.status().await.is_ok(),
        Err(_) => false,
    }
}

/// Whether `program` is on PATH.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Runs `berth up` until Ctrl-C or SIGTERM.
pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let data = data_dir(args.data_dir)?;
    let logs = data.join("logs");
    for dir in [
        &data,
        &logs,
        &data.join("volumes"),
        &data.join("node-agent"),
    ] {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    // One `berth up` per data directory; the parts of one that was killed are stopped first.
    let _lock = Lock::take(&data)?;
    let run = data.join("run");
    parts::stop_leftovers(&run)?;
    // Refuse early, saying what to do, when Docker or etcd is missing.
    let docker_version = berth_node_agent::docker::engine_version(&args.docker)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "Docker is not reachable at {}: {e}. Install Docker Engine \
                 (https://docs.docker.com/engine/install/) or start it (sudo systemctl start \
                 docker), and make sure this user may use it (the docker group), or pass \
                 --docker.",
                args.docker
            )
        })?;
    if args.etcd.is_none() && !on_path("etcd") {
        bail!(
            "etcd is not on PATH. Install it (Debian/Ubuntu: sudo apt-get install etcd-server; \
             then `sudo systemctl disable --now etcd` if you do not want Debian's own etcd \
             service), or pass --etcd URL of a running etcd."
        );
    }
    let exe = std::env::current_exe().context("find the berth binary")?;
    let admin_token = token_file(&data.join("tokens"))?;
    token_file(&data.join("join"))?;
    let mut parts = Parts::new(logs.clone(), run);

    let etcd_url = match &args.etcd {
        Some(url) => url.clone(),
        None => {
            let url = format!("http://{}", args.etcd_listen);
            let peer = args.etcd_peer_listen.unwrap_or_else(|| {
                let mut peer = args.etcd_listen;
                peer.set_port(peer.port().saturating_add(10));
                peer
            });
            let peer = format!("http://{peer}");
            let mut command = Command::new("etcd");
            command
                .arg("--name=berth-up")
                .arg(format!("--data-dir={}", data.join("etcd").display()))
                .arg(format!("--listen-client-urls={url}"))
                .arg(format!("--advertise-client-urls={url}"))
                .arg(format!("--listen-peer-urls={peer}"))
                .arg(format!("--initial-advertise-peer-urls={peer}"))
                .arg(format!("--initial-cluster=berth-up={peer}"));
            parts.start("etcd", command)?;
            let probe = url.clone();
            parts.wait_ready("etcd", || etcd_answers(&probe)).await?;
            url
        }
    };
    let first_etcd = etcd_url.split(',').next().unwrap_or_default().to_string();
    if args.etcd.is_some() && !etcd_answers(&first_etcd).await {
        bail!("the etcd at {etcd_url} does not answer: start it, or leave out --etcd");
    }

    // TLS by default: a private CA and certificates, made once and kept in the data directory.
    let node = args.node_name.clone().unwrap_or_else(default_node_name);
    let certs = if args.insecure {
        None
    } else {
        let mut hosts = vec![args.listen.ip().to_string()];
        hosts.retain(|h| h != "0.0.0.0" && h != "::");
        Some(crate::certs::make(
            &data.join("tls"),
            &hosts,
            std::slice::from_ref(&node),
            true,
        )?)
    };
    let mut command = Command::new(&exe);
    command
        .arg("control-plane")
        .args(["--etcd", &etcd_url])
        .args(["--listen", &args.listen.to_string()])
        .args(["--admin-listen", &args.admin_listen.to_string()])
        .args(["--dashboard-listen", &args.dashboard_listen.to_string()])
        .arg("--token-file")
        .arg(data.join("tokens"))
        .arg("--join-token-file")
        .arg(data.join("join"))
        .arg("--volume-root")
        .arg(data.join("volumes"));
    if let Some(certs) = &certs {
        serve_tls(&mut command, certs, &data.join("tokens"));
        command
            .arg("--tls-ca")
            .arg(&certs.ca)
            .arg("--require-node-cert");
    }
    let ca = certs.as_ref().map(|c| c.ca.as_path());
    parts.start("control-plane", command)?;
    parts
        .wait_ready("the control plane", || {
            http_ok(args.admin_listen, "/readyz", ca)
        })
        .await?;

    let mut command = Command::new(&exe);
    command
        .arg("gateway")
        .args(["--etcd", &etcd_url])
        .args(["--listen", &args.gateway_listen.to_string()])
        .args(["--admin-listen", &args.gateway_admin_listen.to_string()])
        .arg("--token-file")
        .arg(data.join("tokens"));
    if let Some(certs) = &certs {
        serve_tls(&mut command, certs, &data.join("tokens"));
    }
    parts.start("gateway", command)?;
    parts
        .wait_ready("the gateway", || {
            http_ok(args.gateway_admin_listen, "/readyz", ca)
        })
        .await?;

    let scheme = if certs.is_some() { "https" } else { "http" };
    let address = format!("{scheme}://{}", args.listen);
    let mut command = Command::new(&exe);
    command
        .arg("node-agent")
        .args(["--control-plane", &address])
        .args(["--name", &node])
        .arg("--join-token-file")
        .arg(data.join("join"))
        .args(["--docker", &args.docker])
        .arg("--volume-root")
        .arg(data.join("volumes"))
        .arg("--state-dir")
        .arg(data.join("node-agent"))
        .args(["--network", &args.network]);
    if let Some(certs) = &certs {
        let (cert, key) = certs.node(&node);
        command
            .arg("--tls-ca")
            .arg(&certs.ca)
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key);
    }
    parts.start("node-agent", command)?;
    let tls = crate::servers::client_tls(certs.as_ref().map(|c| c.ca.as_path()), None)?;
    let client = Client::connect(&address, Some(&admin_token), tls.as_ref()).await?;
    parts
        .wait_ready("the node agent", || {
            let mut nodes = client.nodes();
            let name = node.clone();
            async move {
                nodes
                    .get_node(GetNodeRequest { name })
                    .await
                    .is_ok_and(|n| n.into_inner().status == NodeStatus::Ready as i32)
            }
        })
        .await?;

    let config_path = CliConfig::path()?;
    CliConfig {
        address: Some(address.clone()),
        token: Some(admin_token),
        ca: certs.as_ref().map(|c| c.ca.clone()),
    }
    .save(&config_path)?;

    println!("Berth is up.");
    let security = match &certs {
        Some(c) => format!("TLS, CA {}", c.ca.display()),
        None => "plain text: --insecure".into(),
    };
    let admin = |listen: SocketAddr| match &certs {
        Some(_) => format!("admin https://{listen}, /metrics with a read-only or admin token"),
        None => format!("admin http://{listen}"),
    };
    println!(
        "  control plane  {address} ({security}; {})",
        admin(args.admin_listen)
    );
    println!(
        "  gateway        {scheme}://{}/agents/NAME/... ({})",
        args.gateway_listen,
        admin(args.gateway_admin_listen)
    );
    println!(
        "  dashboard      {scheme}://{}/ (sign in with the admin token: {})",
        args.dashboard_listen,
        data.join("tokens").display()
    );
    println!(
        "  node           {node} (Docker {docker_version} at {})",
        args.docker
    );
    println!("  etcd           {etcd_url}");
    println!("  data and logs  {} ({})", data.display(), logs.display());
    println!(
        "  CLI config     {} (address and admin token: plain `berth ls` works)",
        config_path.display()
    );
    println!("Try:");
    println!(
        "  berth deploy -n echo -i berth/echo-agent:local --health-endpoint /health --health-interval 1s"
    );
    let cacert = certs
        .as_ref()
        .map(|c| format!("--cacert {} ", c.ca.display()))
        .unwrap_or_default();
    println!(
        "  curl {cacert}-X POST {scheme}://{}/agents/echo/echo -d hello",
        args.gateway_listen
    );
    println!("Ctrl-C stops Berth (the agents' containers keep running and are adopted next time).");

    // Run until a signal; a part that exits is started again, unless it crash-loops (then
    // stop the rest and say why).
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                parts.keep_running()?;
            }
        }
    }
    eprintln!("stopping Berth");
    drop(parts);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_dir_follows_the_flag_then_xdg_then_home() {
        assert_eq!(data_dir(Some("/x".into())).unwrap(), PathBuf::from("/x"));
        let node = default_node_name();
        assert!(!node.is_empty() && node.len() <= 63);
        assert!(node
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
    }

    #[test]
    fn a_token_file_is_made_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let first = token_file(&path).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(token_file(&path).unwrap(), first, "kept across runs");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
