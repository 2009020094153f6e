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
    /// Keep files that exist instead of refusing.
    #[arg(long)]
    pub keep: bool,
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
        let nodes = self.dir.join("nodes");
        (
            nodes.join(format!("{name}.pem")),
            nodes.join(format!("{name}-key.pem")),
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
        let key = std::fs::read_to_string(dir.join("ca-key.pem"))
            .with_context(|| format!("the CA's key beside {}", files.ca.display()))?;
        let ca_key = KeyPair::from_pem(&key)?;
        let ca = ca_params()?.self_signed(&ca_key)?;
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
    server_params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
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
    let (cert, key) = files.node(name);
    if cert.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(cert.parent().expect("nodes directory"))?;
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    params.distinguished_name = named(&format!("berth node {name}"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let node_key = KeyPair::generate()?;
    let node = params.signed_by(&node_key, ca, ca_key)?;
    crate::up::write_private(&key, &node_key.serialize_pem())?;
    std::fs::write(&cert, node.pem())?;
    Ok(())
}

/// Runs `berth certs`.
pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    let files = make(&args.dir, &args.hosts, &args.nodes, args.keep)?;
    println!("CA           {}", files.ca.display());
    println!(
        "server       {} (key {})",
        files.server_cert.display(),
        files.server_key.display()
    );
    for node in &args.nodes {
        let (cert, key) = files.node(node);
        println!("node {node:<7} {} (key {})", cert.display(), key.display());
    }
    Ok(())
}
