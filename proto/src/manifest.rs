//! Agent manifests: the YAML `berth apply -f` reads and the shape `berth deploy`'s flags fill.
//! Quantities and durations are written as people write them (`512M`, `500m`, `10s`).

use crate::quantity::{parse_cpu, parse_duration, parse_memory};
use crate::v1::{
    AgentSpec, BreakerSettings, HealthCheck, ReplaySettings, Resources, RestartPolicy,
    RestartSettings, VolumeMount,
};
use pbjson_types::Duration as PbDuration;
use serde::Deserialize;
use std::collections::HashMap;

/// One agent as written in a manifest.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Manifest {
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: HashMap<String, String>,
    /// Environment variables whose values are secrets: kept apart, shown as `<redacted>`.
    #[serde(default)]
    pub secret_env: HashMap<String, String>,
    pub port: Option<u32>,
    #[serde(default)]
    pub volumes: Vec<Volume>,
    pub memory: Option<String>,
    pub cpu: Option<String>,
    pub replicas: Option<u32>,
    pub health: Option<Health>,
    pub restart: Option<String>,
    pub restart_max_backoff: Option<String>,
    pub stop_grace: Option<String>,
    pub request_timeout: Option<String>,
    #[serde(default)]
    pub labels: HashMap<String, String>,
    #[serde(default)]
    pub node_selector: HashMap<String, String>,
    pub token: Option<String>,
    pub replay: Option<Replay>,
    pub breaker: Option<Breaker>,
}

/// A volume: `SRC:DST[:ro]`, or its long form.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Volume {
    Short(String),
    Long {
        source: String,
        target: String,
        #[serde(default, rename = "readOnly")]
        read_only: bool,
    },
}

/// The health check.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Health {
    pub path: String,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub retries: Option<u32>,
    pub start_period: Option<String>,
}

/// Replay settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Replay {
    #[serde(default)]
    pub disabled: bool,
    pub max_body: Option<String>,
    pub max_queued: Option<u32>,
    pub max_queued_bytes: Option<String>,
    pub ttl: Option<String>,
    pub max_attempts: Option<u32>,
    pub concurrency: Option<u32>,
}

/// Circuit breaker settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Breaker {
    pub consecutive_failures: Option<u32>,
    pub base_penalty: Option<String>,
    pub max_penalty: Option<String>,
    pub probe_timeout: Option<String>,
}

/// A manifest field with a bad value.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ManifestError {
    pub field: String,
    pub reason: String,
}

fn field_err(field: &str) -> impl Fn(String) -> ManifestError + '_ {
    move |reason| ManifestError {
        field: field.to_string(),
        reason,
    }
}

fn duration(field: &str, text: &Option<String>) -> Result<Option<PbDuration>, ManifestError> {
    text.as_deref()
        .map(|t| {
            let d = parse_duration(t).map_err(field_err(field))?;
            Ok(PbDuration {
                seconds: d.as_secs() as i64,
                nanos: d.subsec_nanos() as i32,
            })
        })
        .transpose()
}

fn size(field: &str, text: &Option<String>) -> Result<u64, ManifestError> {
    text.as_deref()
        .map(|t| parse_memory(t).map_err(field_err(field)))
        .transpose()
        .map(Option::unwrap_or_default)
}

/// Parses `SRC:DST[:ro|:rw]`.
pub fn parse_volume(text: &str) -> Result<VolumeMount, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let (source, target, read_only) = match parts.as_slice() {
        [source, target] => (source, target, false),
        [source, target, "ro"] => (source, target, true),
        [source, target, "rw"] => (source, target, false),
        _ => return Err(format!("{text:?} is not SRC:DST[:ro]")),
    };
    Ok(VolumeMount {
        source: source.to_string(),
        target: target.to_string(),
        read_only,
    })
}

/// Parses a restart policy word.
pub fn parse_restart(text: &str) -> Result<RestartPolicy, String> {
    match text {
        "always" => Ok(RestartPolicy::Always),
        "on-failure" => Ok(RestartPolicy::OnFailure),
        "never" | "no" => Ok(RestartPolicy::Never),
        _ => Err(format!("{text:?} is not one of always, on-failure, never")),
    }
}

impl Manifest {
    /// The API spec this manifest describes; unset fields are left for the server's defaults.
    pub fn into_spec(self) -> Result<AgentSpec, ManifestError> {
        let volumes = self
            .volumes
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Volume::Short(text) => parse_volume(&text).map_err(|reason| ManifestError {
                    field: format!("volumes[{i}]"),
                    reason,
                }),
                Volume::Long {
                    source,
                    target,
                    read_only,
                } => Ok(VolumeMount {
                    source,
                    target,
                    read_only,
                }),
            })
            .collect::<Result<_, _>>()?;
        let resources = Resources {
            cpu_millis: self
                .cpu
                .as_deref()
                .map(|c| parse_cpu(c).map_err(field_err("cpu")))
                .transpose()?
                .unwrap_or_default(),
            memory_bytes: size("memory", &self.memory)?,
        };
        let health = self
            .health
            .map(|h| {
                Ok::<_, ManifestError>(HealthCheck {
                    path: h.path,
                    interval: duration("health.interval", &h.interval)?,
                    timeout: duration("health.timeout", &h.timeout)?,
                    retries: h.retries.unwrap_or_default(),
                    start_period: duration("health.startPeriod", &h.start_period)?,
                })
            })
            .transpose()?;
        let restart = RestartSettings {
            policy: self
                .restart
                .as_deref()
                .map(|r| parse_restart(r).map_err(field_err("restart")))
                .transpose()?
                .unwrap_or(RestartPolicy::Unspecified) as i32,
            max_backoff: duration("restartMaxBackoff", &self.restart_max_backoff)?,
        };
        let replay = self
            .replay
            .map(|r| {
                Ok::<_, ManifestError>(ReplaySettings {
                    disabled: r.disabled,
                    max_body_bytes: size("replay.maxBody", &r.max_body)?,
                    max_queued: r.max_queued.unwrap_or_default(),
                    max_queued_bytes: size("replay.maxQueuedBytes", &r.max_queued_bytes)?,
                    ttl: duration("replay.ttl", &r.ttl)?,
                    max_attempts: r.max_attempts.unwrap_or_default(),
                    concurrency: r.concurrency.unwrap_or_default(),
                })
            })
            .transpose()?;
        let breaker = self
            .breaker
            .map(|b| {
                Ok::<_, ManifestError>(BreakerSettings {
                    consecutive_failures: b.consecutive_failures.unwrap_or_default(),
                    base_penalty: duration("breaker.basePenalty", &b.base_penalty)?,
                    max_penalty: duration("breaker.maxPenalty", &b.max_penalty)?,
                    probe_timeout: duration("breaker.probeTimeout", &b.probe_timeout)?,
                })
            })
            .transpose()?;
        Ok(AgentSpec {
            name: self.name,
            image: self.image,
            command: self.command,
            args: self.args,
            env: self.env,
            secret_env: self.secret_env,
            port: self.port.unwrap_or_default(),
            volumes,
            resources: Some(resources),
            replicas: self.replicas,
            health,
            restart: Some(restart),
            stop_grace: duration("stopGrace", &self.stop_grace)?,
            replay,
            breaker,
            labels: self.labels,
            node_selector: self.node_selector,
            gateway_token: self.token.unwrap_or_default(),
            gateway_token_sha256: String::new(),
            request_timeout: duration("requestTimeout", &self.request_timeout)?,
        })
    }
}

/// Parses every YAML document in `text` into a spec. Nothing is applied unless all parse.
pub fn parse_all(text: &str) -> Result<Vec<AgentSpec>, String> {
    let mut specs = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(document)
            .map_err(|e| format!("document {}: not valid YAML: {e}", i + 1))?;
        if value.is_null() {
            continue;
        }
        let manifest: Manifest = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." {
                format!("document {}: {inner}", i + 1)
            } else {
                format!("document {}: field {path}: {inner}", i + 1)
            }
        })?;
        let name = manifest.name.clone();
        let spec = manifest
            .into_spec()
            .map_err(|e| format!("document {} (agent {name}): field {e}", i + 1))?;
        specs.push(spec);
    }
    if specs.is_empty() {
        return Err("no agent in the manifest".into());
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_several_documents_with_human_quantities() {
        let specs = parse_all(
            "name: a\nimage: echo:1\nmemory: 512M\ncpu: 500m\nvolumes: [\"/v/a:/data:ro\"]\n\
             health: {path: /health, interval: 5s}\n---\nname: b\nimage: echo:2\nreplicas: 0\n",
        )
        .unwrap();
        assert_eq!(specs.len(), 2);
        let a = &specs[0];
        assert_eq!(a.resources.as_ref().unwrap().memory_bytes, 512 << 20);
        assert_eq!(a.resources.as_ref().unwrap().cpu_millis, 500);
        assert!(a.volumes[0].read_only);
        assert_eq!(
            a.health
                .as_ref()
                .unwrap()
                .interval
                .as_ref()
                .unwrap()
                .seconds,
            5
        );
        assert_eq!(specs[1].replicas, Some(0));
    }

    #[test]
    fn errors_name_the_field() {
        let err = parse_all("name: a\nimage: e\nhealth: {path: /h, interval: soon}\n").unwrap_err();
        assert!(err.contains("health.interval"), "{err}");
        let err = parse_all("name: a\nimage: e\nreplicaz: 2\n").unwrap_err();
        assert!(err.contains("replicaz"), "{err}");
        let err = parse_all("name: a\nimage: e\nreplicas: many\n").unwrap_err();
        assert!(err.contains("replicas"), "{err}");
    }

    #[test]
    fn settings_that_would_loosen_isolation_are_refused() {
        // Berth has no such settings: a manifest asking for them is refused by name, not
        // silently ignored.
        for field in [
            "privileged: true",
            "capAdd: [SYS_ADMIN]",
            "networkMode: host",
            "pid: host",
            "devices: [/dev/sda]",
            "user: root",
        ] {
            let err = parse_all(&format!("name: a\nimage: e\n{field}\n")).unwrap_err();
            let key = field.split(':').next().unwrap();
            assert!(
                err.contains(&format!("unknown field `{key}`")),
                "{field}: {err}"
            );
        }
    }
}
