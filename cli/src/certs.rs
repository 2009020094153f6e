//! `berth certs`: a private CA and the certificates Berth's servers and node agents use,
//! made with rcgen. Keys are written readable by the owner only.

use anyhow::Context;
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};

/// Flags of `berth certs`.
#[derive(Args, Debug)]
pub struct CertsArgs {
    /// Where to write ca.pem, ca-key.pem, server.pem, server-key.pem and, per node,
    /// nodes/NAME.pem and nodes/NAME-key.pem.
    #[arg(long)]
    pub dir: PathBuf,
    /// A name or IP address the servers are reached at (repeatable); localhost and 127.0.0.1
    /// are always included.
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// A node agent's name (repeatable): its client certificate names it, and the control
    /// plane accepts it for that node only. With a CA already in --dir, only these are made.
    #[arg(long = "node")]
    pub nodes: Vec<String>,
    /// A server certificate of its own for one service, `NAME=HOST[,HOST...]` (repeatable):
    /// services/NAME.pem and services/NAME-key.pem, for server authentication only, so that
    /// each service holds its own key and none can pass for a node. With a CA already in
    /// --dir, only these are made.
    #[arg(long = "service", value_parser = parse_service)]
    pub services: Vec<(String, Vec<String>)>,
    /// A client certificate of its own, e.g. for a service that talks to etcd (repeatable):
    /// clients/NAME.pem and clients/NAME-key.pem, for client authentication only, naming no
    /// host, so that it cannot pass for a node. With a CA already in --dir, only these are made.
    #[arg(long = "client")]
    pub clients: Vec<String>,
    /// Keep files that exist instead of refusing.
    #[arg(long)]
    pub keep: bool,
}

/// `NAME=HOST[,HOST...]` of `--service`.
fn parse_service(value: &str) -> Result<(String, Vec<String>), String> {
    let (name, hosts) = value
        .split_once('=')
        .ok_or_else(|| format!("--service {value}: expected NAME=HOST[,HOST...]"))?;
    berth_proto::validate::dns_label("--service", name).map_err(|e| e.to_string())?;
    let hosts: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(String::from)
        .collect();
    if hosts.is_empty() {
        return Err(format!("--service {value}: name at least one host"));
    }
    Ok((name.to_string(), hosts))
}

/// The files `berth certs` writes.
pub struct CertFiles {
    /// The CA certificate clients verify servers with.
    pub ca: PathBuf,
    /// The servers' certificate and key.
    pub server_cert: PathBuf,
    /// The servers' key.
    pub server_key: PathBuf,
    dir: PathBuf,
}

impl CertFiles {
    /// The files under `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            dir: dir.to_path_buf(),
        }
    }

    /// The client certificate and key of node `name` (for mTLS).
    pub fn node(&self, name: &str) -> (PathBuf, PathBuf) {
        self.leaf("nodes", name)
    }

    /// `KIND/NAME.pem` and `KIND/NAME-key.pem` under the directory.
    fn leaf(&self, kind: &str, name: &str) -> (PathBuf, PathBuf) {
        let dir = self.dir.join(kind);
        (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        )
    }
}

fn named(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "Berth");
    dn
}

/// The CA's parameters: the same each time, so that the CA can be made again from its key to
/// sign more certificates (the issuer's name and key are what a signature refers to).
fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = named("Berth private CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// Makes a CA, a server certificate and a certificate for each of `nodes` under `dir`. With a
/// CA there already: with `keep`, or when only node certificates are asked for, the CA is used
/// to make the node certificates that do not exist yet; otherwise it is an error.
pub fn make(
    dir: &Path,
    hosts: &[String],
    nodes: &[String],
    keep: bool,
) -> anyhow::Result<CertFiles> {
    let files = CertFiles::in_dir(dir);
    for node in nodes {
        berth_proto::validate::dns_label("--node", node)?;
    }
    if files.ca.exists() {
        if !keep && nodes.is_empty() {
            anyhow::bail!(
                "{} exists: remove the directory's certificates first, pass --keep, or pass --node to add node certificates",
                files.ca.display()
            );
        }
        let (ca, ca_key) = load_ca(&files)?;
        for node in nodes {
            node_cert(&files, node, &ca, &ca_key)?;
        }
        return Ok(files);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let ca_key = KeyPair::generate()?;
    let ca = ca_params()?.self_signed(&ca_key)?;
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
    names.extend(hosts.iter().cloned());
    names.dedup();
    let mut server_params = CertificateParams::new(Vec::<String>::new())?;
    server_params.distinguished_name = named("berth server");
    server_params.subject_alt_names = sans(&names)?;
    // Client auth too: the servers present this certificate to etcd when etcd asks for
    // client certificates (`--etcd-cert`).
    server_params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let server_key = KeyPair::generate()?;
    let server = server_params.signed_by(&server_key, &ca, &ca_key)?;

    crate::up::write_private(&dir.join("ca-key.pem"), &ca_key.serialize_pem())?;
    crate::up::write_private(&files.server_key, &server_key.serialize_pem())?;
    std::fs::write(&files.ca, ca.pem())?;
    std::fs::write(&files.server_cert, server.pem())?;
    for node in nodes {
        node_cert(&files, node, &ca, &ca_key)?;
    }
    Ok(files)
}

/// Node `name`'s client certificate, naming it (a DNS name in its subject alternative names,
/// which the control plane checks against the name the node agent says hello with). Left as
/// it is when it exists.
fn node_cert(
    files: &CertFiles,
    name: &str,
    ca: &rcgen::Certificate,
    ca_key: &KeyPair,
) -> anyhow::Result<()> {
    let leaf = Leaf {
        subject: format!("berth node {name}"),
        hosts: vec![name.to_string()],
        usage: ExtendedKeyUsagePurpose::ClientAuth,
    };
    leaf.write(files.node(name), ca, ca_key)
}

/// A certificate signed by the CA for one purpose.
struct Leaf {
    subject: String,
    hosts: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
}

impl Leaf {
    /// Writes the certificate and its key (private), unless the certificate exists.
    fn write(
        self,
        (cert, key): (PathBuf, PathBuf),
        ca: &rcgen::Certificate,
        ca_key: &KeyPair,
    ) -> anyhow::Result<()> {
        if cert.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(cert.parent().expect("a directory"))?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = sans(&self.hosts)?;
        params.distinguished_name = named(&self.subject);
        params.extended_key_usages = vec![self.usage];
        let leaf_key = KeyPair::generate()?;
        let leaf = params.signed_by(&leaf_key, ca, ca_key)?;
        crate::up::write_private(&key, &leaf_key.serialize_pem())?;
        std::fs::write(&cert, leaf.pem())?;
        Ok(())
    }
}

/// Subject alternative names: IP addresses as such, the rest as DNS names.
fn sans(hosts: &[String]) -> anyhow::Result<Vec<SanType>> {
    Ok(hosts
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?)
}

/// The CA under `files`, made again from its key to sign with.
fn load_ca(files: &CertFiles) -> anyhow::Result<(rcgen::Certificate, KeyPair)> {
    let key = std::fs::read_to_string(files.dir.join("ca-key.pem"))
        .with_context(|| format!("the CA's key beside {}", files.ca.display()))?;
    let ca_key = KeyPair::from_pem(&key)?;
    let ca = ca_params()?.self_signed(&ca_key)?;
    Ok((ca, ca_key))
}

/// Runs `berth certs`.
pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    for client in &args.clients {
        berth_proto::validate::dns_label("--client", client)?;
    }
    let only_leaves = !args.services.is_empty() || !args.clients.is_empty();
    let files = make(
        &args.dir,
        &args.hosts,
        &args.nodes,
        args.keep || only_leaves,
    )?;
    if only_leaves {
        let (ca, ca_key) = load_ca(&files)?;
        for (name, hosts) in &args.services {
            let leaf = Leaf {
                subject: format!("berth service {name}"),
                hosts: hosts.clone(),
                usage: ExtendedKeyUsagePurpose::ServerAuth,
            };
            leaf.write(files.leaf("services", name), &ca, &ca_key)?;
        }
        for name in &args.clients {
            let leaf = Leaf {
                subject: format!("berth client {name}"),
                hosts: Vec::new(),
                usage: ExtendedKeyUsagePurpose::ClientAuth,
            };
            leaf.write(files.leaf("clients", name), &ca, &ca_key)?;
        }
    }
    outln!("CA           {}", files.ca.display());
    outln!(
        "server       {} (key {})",
        files.server_cert.display(),
        files.server_key.display()
    );
    for node in &args.nodes {
        let (cert, key) = files.node(node);
        outln!("node {node:<7} {} (key {})", cert.display(), key.display());
    }
    for (name, _) in &args.services {
        let (cert, key) = files.leaf("services", name);
        outln!("service {name} {} (key {})", cert.display(), key.display());
    }
    for name in &args.clients {
        let (cert, key) = files.leaf("clients", name);
        outln!("client {name} {} (key {})", cert.display(), key.display());
    }
    Ok(())
}
