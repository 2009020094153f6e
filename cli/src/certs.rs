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
    /// Where to write ca.pem, ca-key.pem, server.pem, server-key.pem, node.pem, node-key.pem.
    #[arg(long)]
    pub dir: PathBuf,
    /// A name or IP address the servers are reached at (repeatable); localhost and 127.0.0.1
    /// are always included.
    #[arg(long = "host")]
    pub hosts: Vec<String>,
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
    /// The node agents' client certificate (for mTLS).
    pub node_cert: PathBuf,
    /// The node agents' key.
    pub node_key: PathBuf,
}

impl CertFiles {
    /// The files under `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            node_cert: dir.join("node.pem"),
            node_key: dir.join("node-key.pem"),
        }
    }
}

fn named(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "Berth");
    dn
}

/// Makes a CA and a server and a node certificate signed by it, under `dir`; with `keep`,
/// existing files are left as they are (`berth up` at each start).
pub fn make(dir: &Path, hosts: &[String], keep: bool) -> anyhow::Result<CertFiles> {
    let files = CertFiles::in_dir(dir);
    if files.ca.exists() {
        if keep {
            return Ok(files);
        }
        anyhow::bail!(
            "{} exists: remove the directory's certificates first, or pass --keep",
            files.ca.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = named("Berth private CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;

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
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate()?;
    let server = server_params.signed_by(&server_key, &ca, &ca_key)?;

    let mut node_params = CertificateParams::new(Vec::<String>::new())?;
    node_params.distinguished_name = named("berth node agent");
    node_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let node_key = KeyPair::generate()?;
    let node = node_params.signed_by(&node_key, &ca, &ca_key)?;

    let private = |path: &Path, text: &str| crate::up::write_private(path, text);
    private(&dir.join("ca-key.pem"), &ca_key.serialize_pem())?;
    private(&files.server_key, &server_key.serialize_pem())?;
    private(&files.node_key, &node_key.serialize_pem())?;
    std::fs::write(&files.ca, ca.pem())?;
    std::fs::write(&files.server_cert, server.pem())?;
    std::fs::write(&files.node_cert, node.pem())?;
    Ok(files)
}

/// Runs `berth certs`.
pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    let files = make(&args.dir, &args.hosts, args.keep)?;
    println!("CA           {}", files.ca.display());
    println!(
        "server       {} (key {})",
        files.server_cert.display(),
        files.server_key.display()
    );
    println!(
        "node agents  {} (key {})",
        files.node_cert.display(),
        files.node_key.display()
    );
    Ok(())
}
