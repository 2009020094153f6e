//! The control plane's configuration: defaults, then a YAML file, then environment and flags
//! (the CLI layers the last two). Validated at start-up; errors name the setting.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Where the gRPC API listens by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// Where `/metrics` and `/healthz` listen by default.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7071";
/// Where the web dashboard listens by default.
pub const DEFAULT_DASHBOARD_LISTEN: &str = "127.0.0.1:7072";
/// The etcd endpoint used when none is configured.
pub const DEFAULT_ETCD: &str = "http://127.0.0.1:2379";
/// The etcd key prefix.
pub const DEFAULT_PREFIX: &str = "/berth";
/// Client connections the gRPC server holds at once by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Finished (delivered or dead) replay records kept per agent by default.
pub const DEFAULT_FINISHED_PER_AGENT: u64 = 10_000;
/// Bytes of finished replay records (bodies and answers) kept per agent by default.
pub const DEFAULT_FINISHED_PER_AGENT_BYTES: u64 = 256 << 20;
/// Finished replay records kept in all by default.
pub const DEFAULT_FINISHED_TOTAL: u64 = 100_000;
/// Bytes of finished replay records kept in all by default.
pub const DEFAULT_FINISHED_TOTAL_BYTES: u64 = 1 << 30;
/// History etcd keeps behind its current revision by default, in seconds (5 minutes).
pub const DEFAULT_COMPACTION_RETENTION_SECONDS: u64 = 300;
/// etcd's space quota by default (etcd's own default, `--quota-backend-bytes`).
pub const DEFAULT_ETCD_QUOTA_BYTES: u64 = 2 << 30;
/// The autoscaler's stable window by default, in seconds (its panic window is a tenth).
pub const DEFAULT_AUTOSCALE_WINDOW_SECONDS: u64 = 60;
/// The directory host volumes must lie under.
pub const DEFAULT_VOLUME_ROOT: &str = "/var/lib/berth/volumes";

/// Every setting of `berth control-plane`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// etcd endpoints.
    pub etcd: Vec<String>,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// HTTP admin listen address (`/metrics`, `/healthz`, `/readyz`).
    pub admin_listen: SocketAddr,
    /// The web dashboard's address (HTTPS with `tls_cert`, like the API); `None` turns it off.
    pub dashboard_listen: Option<SocketAddr>,
    /// Serve the admin listener over TLS with `tls_cert` and `tls_key`.
    pub admin_tls: bool,
    /// File of tokens (one per line) that may read `/metrics`; when set, `/metrics` also
    /// needs a token (from it, `token_file`, or an admin or read-only issued token).
    pub admin_token_file: Option<PathBuf>,
    /// File of admin tokens, one per line.
    pub token_file: Option<PathBuf>,
    /// File of node join tokens, one per line.
    pub join_token_file: Option<PathBuf>,
    /// etcd key prefix.
    pub prefix: String,
    /// Host volume paths in specs must lie under this directory.
    pub volume_root: PathBuf,
    /// PEM certificate (chain) the gRPC API serves TLS with; plain text when unset.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA that client certificates must chain to (node agents' mTLS).
    pub tls_ca: Option<PathBuf>,
    /// Node agents must present a client certificate signed by `tls_ca`.
    pub require_node_cert: bool,
    /// PEM CA that etcd's certificate chains to (for `https://` etcd endpoints).
    pub etcd_ca: Option<PathBuf>,
    /// PEM certificate presented to etcd (its client-certificate authentication).
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key of `etcd_cert`.
    pub etcd_key: Option<PathBuf>,
    /// Client connections the gRPC server holds at once; one more is closed at once.
    pub max_connections: usize,
    /// Finished replay records kept per agent (the oldest beyond it are dropped).
    pub finished_per_agent: u64,
    /// Bytes of finished replay records kept per agent.
    pub finished_per_agent_bytes: u64,
    /// Finished replay records kept in all.
    pub finished_total: u64,
    /// Bytes of finished replay records kept in all.
    pub finished_total_bytes: u64,
    /// History etcd keeps behind its current revision, in seconds; the leader compacts the
    /// rest. 0 leaves compaction to etcd (`--auto-compaction-retention`).
    pub compaction_retention_seconds: u64,
    /// etcd's space quota, for the warning as the database nears it.
    pub etcd_quota_bytes: u64,
    /// The autoscaler's stable window, in seconds (6-3600); its panic window is a tenth.
    pub autoscale_window_seconds: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            etcd: vec![DEFAULT_ETCD.into()],
            listen: DEFAULT_LISTEN.parse().expect("valid constant"),
            admin_listen: DEFAULT_ADMIN_LISTEN.parse().expect("valid constant"),
            dashboard_listen: Some(DEFAULT_DASHBOARD_LISTEN.parse().expect("valid constant")),
            admin_tls: false,
            admin_token_file: None,
            token_file: None,
            join_token_file: None,
            prefix: DEFAULT_PREFIX.into(),
            volume_root: DEFAULT_VOLUME_ROOT.into(),
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            require_node_cert: false,
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            finished_per_agent: DEFAULT_FINISHED_PER_AGENT,
            finished_per_agent_bytes: DEFAULT_FINISHED_PER_AGENT_BYTES,
            finished_total: DEFAULT_FINISHED_TOTAL,
            finished_total_bytes: DEFAULT_FINISHED_TOTAL_BYTES,
            compaction_retention_seconds: DEFAULT_COMPACTION_RETENTION_SECONDS,
            etcd_quota_bytes: DEFAULT_ETCD_QUOTA_BYTES,
            autoscale_window_seconds: DEFAULT_AUTOSCALE_WINDOW_SECONDS,
        }
    }
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid YAML for this config.
    #[error("config file {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_yaml::Error,
    },
    /// A setting has a bad value.
    #[error("setting {setting}: {reason}")]
    Invalid {
        setting: &'static str,
        reason: String,
    },
}

impl Config {
    /// What the leader's housekeeping keeps to.
    pub fn housekeeping(&self) -> crate::housekeeping::Settings {
        crate::housekeeping::Settings {
            retention: berth_store::Retention {
                per_agent_count: self.finished_per_agent,
                per_agent_bytes: self.finished_per_agent_bytes,
                total_count: self.finished_total,
                total_bytes: self.finished_total_bytes,
            },
            compaction_retention: std::time::Duration::from_secs(self.compaction_retention_seconds),
            quota_bytes: self.etcd_quota_bytes,
        }
    }

    /// How the admin listener serves.
    pub fn admin(&self) -> berth_admin::AdminConfig {
        berth_admin::AdminConfig {
            listen: self.admin_listen,
            tls: match (self.admin_tls, &self.tls_cert, &self.tls_key) {
                (true, Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
                _ => None,
            },
            token_file: self.admin_token_file.clone(),
        }
    }

    /// The TLS files for etcd.
    pub fn etcd_tls(&self) -> berth_store::EtcdTls {
        berth_store::EtcdTls {
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
        }
    }

    /// Defaults overlaid with the YAML file at `path`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Checks every setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |setting, reason: &str| {
            Err(ConfigError::Invalid {
                setting,
                reason: reason.into(),
            })
        };
        if self.etcd.is_empty() {
            return invalid(
                "etcd",
                "at least one endpoint is needed, e.g. http://127.0.0.1:2379",
            );
        }
        for endpoint in &self.etcd {
            if endpoint.trim().is_empty() || endpoint.contains(char::is_whitespace) {
                return invalid(
                    "etcd",
                    &format!("{endpoint:?} is not an endpoint like http://host:2379"),
                );
            }
        }
        if let Err((setting, reason)) = self.etcd_tls().check(&self.etcd) {
            return invalid(setting, &reason);
        }
        if self.max_connections == 0 {
            return invalid("max_connections", "must be at least 1");
        }
        if !(2..=3600).contains(&self.autoscale_window_seconds) {
            return invalid(
                "autoscale_window_seconds",
                &format!("{} is outside 2..=3600", self.autoscale_window_seconds),
            );
        }
        for (setting, value) in [
            ("finished_per_agent", self.finished_per_agent),
            ("finished_per_agent_bytes", self.finished_per_agent_bytes),
            ("finished_total", self.finished_total),
            ("finished_total_bytes", self.finished_total_bytes),
            ("etcd_quota_bytes", self.etcd_quota_bytes),
        ] {
            if value == 0 {
                return invalid(setting, "must be at least 1");
            }
        }
        if self.token_file.is_none() {
            return invalid(
                "token_file",
                "is required: a file with one admin token per line",
            );
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return invalid("tls_cert", "and tls_key go together: give both or neither");
        }
        if self.admin_tls && self.tls_cert.is_none() {
            return invalid(
                "admin_tls",
                "needs tls_cert and tls_key: the admin listener serves the same certificate",
            );
        }
        if self.require_node_cert && (self.tls_ca.is_none() || self.tls_cert.is_none()) {
            return invalid(
                "require_node_cert",
                "needs tls_cert, tls_key and tls_ca (the CA node certificates chain to)",
            );
        }
        if !self.prefix.starts_with('/') || self.prefix.len() < 2 {
            return invalid(
                "prefix",
                "must start with '/' and name a directory, e.g. /berth",
            );
        }
        if !self.volume_root.is_absolute() {
            return invalid("volume_root", "must be an absolute path");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overlays_defaults_and_unknown_settings_are_named() {
        let dir = std::env::temp_dir().join(format!("berth-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cp.yaml");
        std::fs::write(
            &file,
            "listen: 0.0.0.0:9000\ntoken_file: /etc/berth/tokens\n",
        )
        .unwrap();
        let config = Config::from_file(&file).unwrap();
        assert_eq!(config.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(config.etcd, vec![DEFAULT_ETCD.to_string()]);
        config.validate().unwrap();
        std::fs::write(&file, "lisen: 0.0.0.0:9000\n").unwrap();
        let err = Config::from_file(&file).unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_token_file_is_named() {
        let err = Config::default().validate().unwrap_err().to_string();
        assert!(err.contains("token_file"), "{err}");
    }
}
