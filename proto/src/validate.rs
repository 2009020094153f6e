//! Validation of agent specs at the API (docs/security.md). Runs after defaults, so it
//! checks effective values. A refusal names the field; nothing reaches etcd or Docker.

use crate::time::std_duration;
use crate::v1::{AgentSpec, RestartPolicy};
use prost::Message;
use regex::Regex;
use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

/// Largest encoded spec accepted.
pub const MAX_SPEC_BYTES: usize = 256 * 1024;
/// Most replicas of one agent.
pub const MAX_REPLICAS: u32 = 100;
/// Largest CPU limit, in thousandths of a core.
pub const MAX_CPU_MILLIS: u32 = 256_000;
/// Smallest memory limit Docker accepts.
pub const MIN_MEMORY_BYTES: u64 = 6 * 1024 * 1024;
/// Largest memory limit.
pub const MAX_MEMORY_BYTES: u64 = 1024 * 1024 * 1024 * 1024;
/// Longest of the timing settings (intervals, timeouts, grace periods).
pub const MAX_TIMING: Duration = Duration::from_secs(3600);
/// Longest replay TTL.
pub const MAX_REPLAY_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Largest request body buffered for replay.
pub const MAX_REPLAY_BODY_BYTES: u64 = 16 * 1024 * 1024;
/// Most labels, node-selector entries or env variables.
pub const MAX_MAP_ENTRIES: usize = 256;

static DNS_LABEL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$").expect("valid regex"));
static ENV_KEY: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z_][A-Za-z0-9_]*$").expect("valid regex"));
static LABEL_PART: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$").expect("valid regex")
});
static VOLUME_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,254}$").expect("valid regex"));
/// The grammar of docker/distribution's `reference` package: `[domain[:port]/]path[:tag][@digest]`.
static IMAGE_REFERENCE: LazyLock<Regex> = LazyLock::new(|| {
    let domain_component = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])";
    let domain = format!(r"{domain_component}(?:\.{domain_component})*(?::[0-9]+)?");
    let path_component = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*";
    let tag = r"[\w][\w.-]{0,127}";
    let digest = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}";
    Regex::new(&format!(
        r"^(?:{domain}/)?{path_component}(?:/{path_component})*(?::{tag})?(?:@{digest})?$"
    ))
    .expect("valid regex")
});

/// A refused field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct FieldError {
    /// The field's path, e.g. `spec.volumes[0].source`.
    pub field: String,
    /// Why it was refused, and what is allowed.
    pub reason: String,
}

fn refuse<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError {
        field: field.into(),
        reason: reason.into(),
    })
}

/// Settings of the control plane that validation depends on.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Host volume paths must lie under this directory.
    pub volume_root: PathBuf,
}

/// Checks that `name` is a DNS label; `field` names it in the error.
pub fn dns_label(field: &str, name: &str) -> Result<(), FieldError> {
    if name.is_empty() {
        return refuse(field, "is required");
    }
    if !DNS_LABEL.is_match(name) {
        return refuse(
            field,
            format!("{name:?} is not a DNS label: use at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"),
        );
    }
    Ok(())
}

/// Validates a spec whose defaults have been applied.
pub fn spec(spec: &AgentSpec, limits: &Limits) -> Result<(), FieldError> {
    let size = spec.encoded_len();
    if size > MAX_SPEC_BYTES {
        return refuse(
            "spec",
            format!("is {size} bytes; the limit is {MAX_SPEC_BYTES}"),
        );
    }
    dns_label("spec.name", &spec.name)?;
    image(&spec.image)?;
    for (i, arg) in spec.command.iter().chain(&spec.args).enumerate() {
        if arg.contains('\0') {
            let field = if i < spec.command.len() {
                "spec.command"
            } else {
                "spec.args"
            };
            return refuse(field, "must not contain NUL bytes");
        }
    }
    env("spec.env", &spec.env)?;
    env("spec.secret_env", &spec.secret_env)?;
    if let Some(key) = spec.secret_env.keys().find(|k| spec.env.contains_key(*k)) {
        return refuse(
            format!("spec.secret_env[{key:?}]"),
            "is also in spec.env: a variable is either plain or secret",
        );
    }
    if spec.port == 0 || spec.port > 65535 {
        return refuse(
            "spec.port",
            format!("{} is not a TCP port (1-65535)", spec.port),
        );
    }
    volumes(spec, limits)?;
    resources(spec)?;
    let replicas = spec.replicas.unwrap_or_default();
    if replicas > MAX_REPLICAS {
        return refuse(
            "spec.replicas",
            format!("{replicas} is more than the limit of {MAX_REPLICAS}"),
        );
    }
    health(spec)?;
    if let Some(restart) = &spec.restart {
        if RestartPolicy::try_from(restart.policy).is_err() {
            return refuse(
                "spec.restart.policy",
                format!("unknown policy {}", restart.policy),
            );
        }
        duration(
            "spec.restart.max_backoff",
            restart.max_backoff.as_ref(),
            Duration::from_secs(1),
            MAX_TIMING,
        )?;
    }
    duration(
        "spec.stop_grace",
        spec.stop_grace.as_ref(),
        Duration::ZERO,
        MAX_TIMING,
    )?;
    duration(
        "spec.request_timeout",
        spec.request_timeout.as_ref(),
        Duration::from_millis(1),
        MAX_TIMING,
    )?;
    replay(spec)?;
    autoscale(spec)?;
    breaker(spec)?;
    labels("spec.labels", &spec.labels)?;
    labels("spec.node_selector", &spec.node_selector)?;
    gateway_token(&spec.gateway_token)?;
    Ok(())
}

fn image(image: &str) -> Result<(), FieldError> {
    if image.is_empty() {
        return refuse("spec.image", "is required");
    }
    if image.len() > 512 || !IMAGE_REFERENCE.is_match(image) {
        return refuse(
            "spec.image",
            format!("{image:?} is not a valid image reference (expected [registry/]name[:tag][@digest], name in lowercase)"),
        );
    }
    Ok(())
}

/// Checks `spec.env` or `spec.secret_env` (`field`). Refusals name the key, never the value.
fn env(field: &str, env: &HashMap<String, String>) -> Result<(), FieldError> {
    if env.len() > MAX_MAP_ENTRIES {
        return refuse(
            field,
            format!("has {} entries; the limit is {MAX_MAP_ENTRIES}", env.len()),
        );
    }
    for (key, value) in env {
        if !ENV_KEY.is_match(key) {
            return refuse(
                format!("{field}[{key:?}]"),
                "environment variable names match [A-Za-z_][A-Za-z0-9_]*",
            );
        }
        if value.contains('\0') {
            return refuse(
                format!("{field}[{key:?}]"),
                "values must not contain NUL bytes",
            );
        }
    }
    Ok(())
}

fn volumes(spec: &AgentSpec, limits: &Limits) -> Result<(), FieldError> {
    let mut targets = HashSet::new();
    for (i, volume) in spec.volumes.iter().enumerate() {
        let field = format!("spec.volumes[{i}]");
        if volume.source.starts_with('/') {
            host_path(
                &format!("{field}.source"),
                &volume.source,
                &limits.volume_root,
            )?;
        } else if !VOLUME_NAME.is_match(&volume.source) {
            return refuse(
                format!("{field}.source"),
                format!("{:?} is neither an absolute host path nor a volume name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)", volume.source),
            );
        }
        let target = Path::new(&volume.target);
        if !target.is_absolute() || target == Path::new("/") || has_dot_dot(target) {
            return refuse(
                format!("{field}.target"),
                format!("{:?} must be an absolute path inside the container, other than / and without '..'", volume.target),
            );
        }
        if !targets.insert(normalize(target)) {
            return refuse(
                format!("{field}.target"),
                format!("{:?} is mounted twice", volume.target),
            );
        }
    }
    Ok(())
}

fn host_path(field: &str, source: &str, root: &Path) -> Result<(), FieldError> {
    let path = Path::new(source);
    if has_dot_dot(path) {
        return refuse(field, format!("{source:?} must not contain '..'"));
    }
    if path
        .file_name()
        .is_some_and(|name| name.to_string_lossy().contains("docker.sock"))
    {
        return refuse(
            field,
            "mounting the Docker socket would give the agent control of the host",
        );
    }
    if normalize(path) == Path::new("/") {
        return refuse(field, "mounting the host's root directory is not allowed");
    }
    if !normalize(path).starts_with(root) {
        return refuse(
            field,
            format!("{source:?} is outside the volume root {}", root.display()),
        );
    }
    Ok(())
}

fn has_dot_dot(path: &Path) -> bool {
    path.components().any(|c| c == Component::ParentDir)
}

fn normalize(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| *c != Component::CurDir)
        .collect()
}

fn resources(spec: &AgentSpec) -> Result<(), FieldError> {
    let Some(resources) = &spec.resources else {
        return Ok(());
    };
    if resources.cpu_millis > MAX_CPU_MILLIS {
        return refuse(
            "spec.resources.cpu_millis",
            format!(
                "{} is more than the limit of {MAX_CPU_MILLIS} (256 cores)",
                resources.cpu_millis
            ),
        );
    }
    let memory = resources.memory_bytes;
    if memory != 0 && !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&memory) {
        return refuse(
            "spec.resources.memory_bytes",
            format!("{memory} is outside {MIN_MEMORY_BYTES}..={MAX_MEMORY_BYTES} (6 MiB to 1 TiB), or 0 for no limit"),
        );
    }
    Ok(())
}

fn health(spec: &AgentSpec) -> Result<(), FieldError> {
    let Some(health) = &spec.health else {
        return Ok(());
    };
    if !health.path.starts_with('/')
        || health
            .path
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return refuse(
            "spec.health.path",
            format!("{:?} must be a URL path starting with '/'", health.path),
        );
    }
    let interval = duration(
        "spec.health.interval",
        health.interval.as_ref(),
        Duration::from_millis(100),
        MAX_TIMING,
    )?;
    let timeout = duration(
        "spec.health.timeout",
        health.timeout.as_ref(),
        Duration::from_millis(1),
        MAX_TIMING,
    )?;
    if timeout > interval {
        return refuse(
            "spec.health.timeout",
            "must not be longer than spec.health.interval",
        );
    }
    if !(1..=100).contains(&health.retries) {
        return refuse(
            "spec.health.retries",
            format!("{} is outside 1..=100", health.retries),
        );
    }
    duration(
        "spec.health.start_period",
        health.start_period.as_ref(),
        Duration::ZERO,
        MAX_TIMING,
    )?;
    Ok(())
}

/// Most requests one replica may be meant to carry.
pub const MAX_TARGET_CONCURRENCY: u32 = 10_000;
/// Longest `scale_to_zero_after`.
pub const MAX_SCALE_TO_ZERO_AFTER: Duration = Duration::from_secs(24 * 3600);

fn autoscale(spec: &AgentSpec) -> Result<(), FieldError> {
    let Some(autoscale) = &spec.autoscale else {
        return Ok(());
    };
    let min = autoscale.fewest();
    if min > MAX_REPLICAS {
        return refuse(
            "spec.autoscale.min",
            format!("{min} is more than the limit of {MAX_REPLICAS}"),
        );
    }
    if !(1..=MAX_REPLICAS).contains(&autoscale.max) {
        return refuse(
            "spec.autoscale.max",
            format!("{} is outside 1..={MAX_REPLICAS}", autoscale.max),
        );
    }
    if min > autoscale.max {
        return refuse(
            "spec.autoscale.min",
            format!("{min} is more than spec.autoscale.max ({})", autoscale.max),
        );
    }
    if !(1..=MAX_TARGET_CONCURRENCY).contains(&autoscale.target_concurrency) {
        return refuse(
            "spec.autoscale.target_concurrency",
            format!(
                "{} is outside 1..={MAX_TARGET_CONCURRENCY}",
                autoscale.target_concurrency
            ),
        );
    }
    duration(
        "spec.autoscale.scale_to_zero_after",
        autoscale.scale_to_zero_after.as_ref(),
        Duration::from_secs(1),
        MAX_SCALE_TO_ZERO_AFTER,
    )?;
    if min == 0 && spec.replay.as_ref().is_some_and(|r| r.disabled) {
        return refuse(
            "spec.autoscale.min",
            "0 needs the replay queue, which keeps the requests that wake the agent, and spec.replay.disabled is set",
        );
    }
    Ok(())
}

fn replay(spec: &AgentSpec) -> Result<(), FieldError> {
    let Some(replay) = &spec.replay else {
        return Ok(());
    };
    if replay.max_body_bytes > MAX_REPLAY_BODY_BYTES {
        return refuse(
            "spec.replay.max_body_bytes",
            format!(
                "{} is more than the limit of {MAX_REPLAY_BODY_BYTES}",
                replay.max_body_bytes
            ),
        );
    }
    duration(
        "spec.replay.ttl",
        replay.ttl.as_ref(),
        Duration::from_secs(1),
        MAX_REPLAY_TTL,
    )?;
    if !(1..=1000).contains(&replay.max_attempts) {
        return refuse(
            "spec.replay.max_attempts",
            format!("{} is outside 1..=1000", replay.max_attempts),
        );
    }
    if !(1..=64).contains(&replay.concurrency) {
        return refuse(
            "spec.replay.concurrency",
            format!("{} is outside 1..=64", replay.concurrency),
        );
    }
    Ok(())
}

fn breaker(spec: &AgentSpec) -> Result<(), FieldError> {
    let Some(breaker) = &spec.breaker else {
        return Ok(());
    };
    if !(1..=1000).contains(&breaker.consecutive_failures) {
        return refuse(
            "spec.breaker.consecutive_failures",
            format!("{} is outside 1..=1000", breaker.consecutive_failures),
        );
    }
    let base = duration(
        "spec.breaker.base_penalty",
        breaker.base_penalty.as_ref(),
        Duration::from_millis(1),
        MAX_TIMING,
    )?;
    let max = duration(
        "spec.breaker.max_penalty",
        breaker.max_penalty.as_ref(),
        Duration::from_millis(1),
        MAX_TIMING,
    )?;
    if base > max {
        return refuse(
            "spec.breaker.base_penalty",
            "must not be longer than spec.breaker.max_penalty",
        );
    }
    duration(
        "spec.breaker.probe_timeout",
        breaker.probe_timeout.as_ref(),
        Duration::from_millis(1),
        MAX_TIMING,
    )?;
    Ok(())
}

fn labels(field: &str, labels: &HashMap<String, String>) -> Result<(), FieldError> {
    if labels.len() > MAX_MAP_ENTRIES {
        return refuse(
            field,
            format!(
                "has {} entries; the limit is {MAX_MAP_ENTRIES}",
                labels.len()
            ),
        );
    }
    for (key, value) in labels {
        let name = key.rsplit_once('/').map_or(key.as_str(), |(_, name)| name);
        if key.len() > 253 || !LABEL_PART.is_match(name) {
            return refuse(
                format!("{field}[{key:?}]"),
                "keys are [prefix/]name, name at most 63 of [A-Za-z0-9_.-]",
            );
        }
        if !value.is_empty() && !LABEL_PART.is_match(value) {
            return refuse(
                format!("{field}[{key:?}]"),
                "values are at most 63 of [A-Za-z0-9_.-], starting and ending alphanumeric",
            );
        }
    }
    Ok(())
}

fn gateway_token(token: &str) -> Result<(), FieldError> {
    if token.is_empty() {
        return Ok(());
    }
    if !(16..=256).contains(&token.len()) || !token.chars().all(|c| c.is_ascii_graphic()) {
        return refuse(
            "spec.gateway_token",
            "must be 16 to 256 printable ASCII characters without spaces",
        );
    }
    Ok(())
}

/// Checks that a duration is set, well formed and within `min..=max`.
fn duration(
    field: &str,
    value: Option<&pbjson_types::Duration>,
    min: Duration,
    max: Duration,
) -> Result<Duration, FieldError> {
    let Some(value) = value else {
        return refuse(field, "is required");
    };
    let Some(d) = std_duration(value) else {
        return refuse(field, "must be a non-negative duration");
    };
    if d < min || d > max {
        return refuse(
            field,
            format!(
                "{} is outside {}..={}",
                humantime::format_duration(d),
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        );
    }
    Ok(d)
}

#[cfg(test)]
mod tests;
