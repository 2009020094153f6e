//! The CLI's config file: the control plane's address and a token, written by `berth up` so
//! that plain `berth ls` works. Flags and the environment (`BERTH_ADDR`, `BERTH_TOKEN`) win
//! over it. Its path: `$BERTH_CLI_CONFIG`, else `$XDG_CONFIG_HOME/berth/config.yaml`, else
//! `~/.config/berth/config.yaml`.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What the config file holds.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliConfig {
    /// The control plane's gRPC address(es), comma-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The API token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// PEM file of the CA that `https://` control planes are verified with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<std::path::PathBuf>,
}

impl CliConfig {
    /// Where the config file is.
    pub fn path() -> anyhow::Result<PathBuf> {
        if let Some(path) = std::env::var_os("BERTH_CLI_CONFIG").filter(|v| !v.is_empty()) {
            return Ok(path.into());
        }
        if let Some(xdg) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
            return Ok(PathBuf::from(xdg).join("berth/config.yaml"));
        }
        let home = std::env::var_os("HOME").context("HOME is not set: set BERTH_CLI_CONFIG")?;
        Ok(PathBuf::from(home).join(".config/berth/config.yaml"))
    }

    /// Reads the config file; none at all is an empty config, a broken one an error naming it.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        serde_yaml::from_str(&text).with_context(|| {
            format!(
                "{} is not a Berth CLI config (address: URL, token: TOKEN)",
                path.display()
            )
        })
    }

    /// Writes the config file, readable by the owner only (it holds a token).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_yaml::to_string(self)?;
        crate::up::write_private(path, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_and_names_a_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/config.yaml");
        assert_eq!(CliConfig::load(&path).unwrap(), CliConfig::default());
        let config = CliConfig {
            address: Some("http://127.0.0.1:7070".into()),
            token: Some("t".repeat(32)),
            ca: None,
        };
        config.save(&path).unwrap();
        assert_eq!(CliConfig::load(&path).unwrap(), config);
        std::fs::write(&path, "adress: x\n").unwrap();
        let error = format!("{:#}", CliConfig::load(&path).unwrap_err());
        assert!(
            error.contains("config.yaml") && error.contains("adress"),
            "{error}"
        );
    }
}
