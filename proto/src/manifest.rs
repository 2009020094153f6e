//! Agent manifests: the YAML `berth apply -f` reads and the shape `berth deploy`'s flags fill.
//! Quantities and durations are written as people write them (`512M`, `500m`, `10s`).

use crate::quantity::{parse_cpu, parse_duration, parse_memory};
use crate::v1::{
    AgentSpec, AutoscaleSettings, BreakerSettings, HealthCheck, ReplaySettings, Resources,
    RestartPolicy, RestartSettings, VolumeMount,
};
use pbjson_types::Duration as PbDuration;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// One agent as written in a manifest.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Manifest {
    pub name: String,
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "HashMap::is_empty",
        serialize_with = "sorted"
    )]
    pub env: HashMap<String, String>,
    /// Environment variables whose values are secrets: kept apart, shown as `<redacted>`.
    #[serde(
        default,
        skip_serializing_if = "HashMap::is_empty",
        serialize_with = "sorted"
    )]
    pub secret_env: HashMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_max_backoff: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_grace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "HashMap::is_empty",
        serialize_with = "sorted"
    )]
    pub labels: HashMap<String, String>,
    #[serde(
        default,
        skip_serializing_if = "HashMap::is_empty",
        serialize_with = "sorted"
    )]
    pub node_selector: HashMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The gateway token by its SHA-256 (64 hex digits), as `berth export` writes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay: Option<Replay>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker: Option<Breaker>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<Autoscale>,
}

/// Autoscaling: `{min: 0, max: 10, targetConcurrency: 10, scaleToZeroAfter: 5m}`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Autoscale {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_concurrency: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_to_zero_after: Option<String>,
}

/// A volume: `SRC:DST[:ro]`, or its long form.
#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Volume {
    Short(String),
    Long {
        source: String,
        target: String,
        #[serde(
            default,
            rename = "readOnly",
            skip_serializing_if = "std::ops::Not::not"
        )]
        read_only: bool,
    },
}

/// The health check.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Health {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_period: Option<String>,
}

/// Replay settings.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Replay {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queued_bytes: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
}

/// Circuit breaker settings.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Breaker {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_penalty: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_penalty: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
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
        let autoscale = self
            .autoscale
            .map(|a| {
                // 0 would read as unset (and so as the default): refused instead.
                for (field, value) in [
                    ("autoscale.max", a.max),
                    ("autoscale.targetConcurrency", a.target_concurrency),
                ] {
                    if value == Some(0) {
                        return Err(field_err(field)("must be at least 1".into()));
                    }
                }
                Ok::<_, ManifestError>(AutoscaleSettings {
                    min: a.min,
                    max: a.max.unwrap_or_default(),
                    target_concurrency: a.target_concurrency.unwrap_or_default(),
                    scale_to_zero_after: duration(
                        "autoscale.scaleToZeroAfter",
                        &a.scale_to_zero_after,
                    )?,
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
            gateway_token_sha256: self.token_sha256.unwrap_or_default(),
            request_timeout: duration("requestTimeout", &self.request_timeout)?,
            autoscale,
        })
    }
}

impl Manifest {
    /// The manifest of a stored spec, as `berth export` writes it: `into_spec` makes the same
    /// spec of it. The gateway token goes by its hash; secret values as the spec holds them
    /// (`<redacted>` unless they were asked for).
    pub fn from_spec(spec: &AgentSpec) -> Self {
        let resources = spec.resources.unwrap_or_default();
        let restart = spec.restart.unwrap_or_default();
        Manifest {
            name: spec.name.clone(),
            image: spec.image.clone(),
            command: spec.command.clone(),
            args: spec.args.clone(),
            env: spec.env.clone(),
            secret_env: spec.secret_env.clone(),
            port: (spec.port != 0).then_some(spec.port),
            volumes: spec
                .volumes
                .iter()
                .map(|v| Volume::Long {
                    source: v.source.clone(),
                    target: v.target.clone(),
                    read_only: v.read_only,
                })
                .collect(),
            memory: bytes_text(resources.memory_bytes),
            cpu: (resources.cpu_millis != 0).then(|| format!("{}m", resources.cpu_millis)),
            replicas: spec.replicas,
            health: spec.health.as_ref().map(|h| Health {
                path: h.path.clone(),
                interval: duration_text(&h.interval),
                timeout: duration_text(&h.timeout),
                retries: (h.retries != 0).then_some(h.retries),
                start_period: duration_text(&h.start_period),
            }),
            restart: match RestartPolicy::try_from(restart.policy) {
                Ok(RestartPolicy::Always) => Some("always".into()),
                Ok(RestartPolicy::OnFailure) => Some("on-failure".into()),
                Ok(RestartPolicy::Never) => Some("never".into()),
                _ => None,
            },
            restart_max_backoff: duration_text(&restart.max_backoff),
            stop_grace: duration_text(&spec.stop_grace),
            request_timeout: duration_text(&spec.request_timeout),
            labels: spec.labels.clone(),
            node_selector: spec.node_selector.clone(),
            token: None,
            token_sha256: (!spec.gateway_token_sha256.is_empty())
                .then(|| spec.gateway_token_sha256.clone()),
            replay: spec.replay.as_ref().map(|r| Replay {
                disabled: r.disabled,
                max_body: bytes_text(r.max_body_bytes),
                max_queued: (r.max_queued != 0).then_some(r.max_queued),
                max_queued_bytes: bytes_text(r.max_queued_bytes),
                ttl: duration_text(&r.ttl),
                max_attempts: (r.max_attempts != 0).then_some(r.max_attempts),
                concurrency: (r.concurrency != 0).then_some(r.concurrency),
            }),
            breaker: spec.breaker.as_ref().map(|b| Breaker {
                consecutive_failures: (b.consecutive_failures != 0)
                    .then_some(b.consecutive_failures),
                base_penalty: duration_text(&b.base_penalty),
                max_penalty: duration_text(&b.max_penalty),
                probe_timeout: duration_text(&b.probe_timeout),
            }),
            autoscale: spec.autoscale.as_ref().map(|a| Autoscale {
                min: a.min,
                max: (a.max != 0).then_some(a.max),
                target_concurrency: (a.target_concurrency != 0).then_some(a.target_concurrency),
                scale_to_zero_after: duration_text(&a.scale_to_zero_after),
            }),
        }
    }
}

/// A map written with its keys in order, so that an export is the same each time.
fn sorted<S: serde::Serializer>(map: &HashMap<String, String>, s: S) -> Result<S::Ok, S::Error> {
    map.iter()
        .collect::<std::collections::BTreeMap<_, _>>()
        .serialize(s)
}

/// A byte count as people write it (`512M`), exactly; `None` for 0 (unset).
fn bytes_text(bytes: u64) -> Option<String> {
    let unit = [(40, "T"), (30, "G"), (20, "M"), (10, "K")]
        .into_iter()
        .find(|(shift, _)| bytes >= 1 << shift && bytes.is_multiple_of(1 << shift));
    match (bytes, unit) {
        (0, _) => None,
        (_, Some((shift, suffix))) => Some(format!("{}{suffix}", bytes >> shift)),
        (_, None) => Some(bytes.to_string()),
    }
}

/// A duration as people write it (`1m 30s`, `250ms`); `None` when unset.
fn duration_text(duration: &Option<PbDuration>) -> Option<String> {
    duration.as_ref().map(|d| {
        let d = std::time::Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32);
        if d.is_zero() {
            "0s".to_string()
        } else {
            humantime::format_duration(d).to_string()
        }
    })
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
    fn an_exported_spec_reads_back_as_the_same_spec() {
        let text = "name: full\nimage: echo:1\ncommand: [run]\nargs: [--fast]\nenv: {A: \"1\"}\n\
             secretEnv: {KEY: s3cret}\nport: 9000\nvolumes: [\"/v/a:/data:ro\", \"cache:/cache\"]\n\
             memory: 1536M\ncpu: 250m\nreplicas: 3\n\
             health: {path: /health, interval: 1m30s, timeout: 250ms, retries: 5, startPeriod: 2s}\n\
             restart: on-failure\nrestartMaxBackoff: 30s\nstopGrace: 3s\nrequestTimeout: 45s\n\
             labels: {team: ai}\nnodeSelector: {gpu: \"true\"}\n\
             replay: {maxBody: 2M, maxQueued: 50, maxQueuedBytes: 1G, ttl: 1h, maxAttempts: 4, concurrency: 2}\n\
             breaker: {consecutiveFailures: 7, basePenalty: 1s, maxPenalty: 1m, probeTimeout: 5s}\n\
             autoscale: {min: 0, max: 8, targetConcurrency: 4, scaleToZeroAfter: 5m}\n";
        let mut spec = parse_all(text).unwrap().remove(0);
        spec.gateway_token_sha256 = "ab".repeat(32);
        let exported = serde_yaml::to_string(&Manifest::from_spec(&spec)).unwrap();
        let again = parse_all(&exported).unwrap().remove(0);
        assert_eq!(again, spec, "{exported}");
        assert!(
            exported.contains("memory: 1536M") && exported.contains("cpu: 250m"),
            "{exported}"
        );
        assert!(
            !exported.contains("token:"),
            "the token itself is never known: {exported}"
        );
    }

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
        let err =
            parse_all("name: a\nimage: e\nautoscale: {scaleToZeroAfter: later}\n").unwrap_err();
        assert!(err.contains("autoscale.scaleToZeroAfter"), "{err}");
        let err = parse_all("name: a\nimage: e\nautoscale: {targetConcurrency: 0}\n").unwrap_err();
        assert!(
            err.contains("autoscale.targetConcurrency: must be at least 1"),
            "{err}"
        );
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
