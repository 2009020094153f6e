//! `berth deploy`: the flags users of docker and Agentainer know, turned into a manifest.

use crate::manifest::{parse_restart, parse_volume, Autoscale, Health, Manifest, Replay, Volume};
use clap::Args;
use std::collections::HashMap;

/// Flags of `berth deploy`.
#[derive(Args, Clone, Debug)]
pub struct DeployArgs {
    /// The agent's name (a DNS label).
    #[arg(short = 'n', long)]
    pub name: String,
    /// The container image.
    #[arg(short = 'i', long)]
    pub image: String,
    /// Environment variable K=V (repeatable).
    #[arg(short = 'e', long = "env", value_name = "K=V", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    /// A secret environment variable K=V (repeatable): given to the containers, stored apart
    /// from the spec, shown as <redacted>.
    #[arg(long = "secret-env", value_name = "K=V", value_parser = parse_secret_key_value)]
    pub secret_env: Vec<(String, String)>,
    /// Volume SRC:DST[:ro]; SRC is a host path under the volume root or a volume name (repeatable).
    #[arg(short = 'v', long = "volume", value_name = "SRC:DST[:ro]", value_parser = check_volume)]
    pub volumes: Vec<String>,
    /// Memory limit, e.g. 512M or 2G.
    #[arg(short = 'm', long)]
    pub memory: Option<String>,
    /// CPU limit, e.g. 0.5, 2 or 500m.
    #[arg(short = 'c', long)]
    pub cpu: Option<String>,
    /// Port the agent listens on in the container (default 8080).
    #[arg(long)]
    pub port: Option<u32>,
    /// Number of replicas (default 1).
    #[arg(long)]
    pub replicas: Option<u32>,
    /// Autoscale: fewest replicas (0 scales to zero when unused; default 1).
    #[arg(long, conflicts_with = "replicas")]
    pub min_replicas: Option<u32>,
    /// Autoscale: most replicas (default 10).
    #[arg(long, conflicts_with = "replicas", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_replicas: Option<u32>,
    /// Autoscale: requests in flight or queued per replica (default 10).
    #[arg(long, conflicts_with = "replicas", value_parser = clap::value_parser!(u32).range(1..))]
    pub target_concurrency: Option<u32>,
    /// Autoscale: time without requests before a --min-replicas 0 agent goes idle (default 5m).
    #[arg(long, conflicts_with = "replicas")]
    pub scale_to_zero_after: Option<String>,
    /// Path of the HTTP health check, e.g. /health.
    #[arg(long)]
    pub health_endpoint: Option<String>,
    /// Time between health checks (default 10s).
    #[arg(long, requires = "health_endpoint")]
    pub health_interval: Option<String>,
    /// Time a health check may take (default 2s).
    #[arg(long, requires = "health_endpoint")]
    pub health_timeout: Option<String>,
    /// Failed checks in a row that restart a replica (default 3).
    #[arg(long, requires = "health_endpoint")]
    pub health_retries: Option<u32>,
    /// Grace period after start before failed checks count (default 0s).
    #[arg(long, requires = "health_endpoint")]
    pub health_start_period: Option<String>,
    /// Restart on every exit (the same as --restart always, the default).
    #[arg(long, conflicts_with = "restart")]
    pub auto_restart: bool,
    /// Restart policy: always, on-failure or never.
    #[arg(long, value_parser = check_restart)]
    pub restart: Option<String>,
    /// Require this key at the gateway (`Authorization: Bearer <token>`).
    #[arg(long)]
    pub token: Option<String>,
    /// Label K=V (repeatable).
    #[arg(short = 'l', long = "label", value_name = "K=V", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,
    /// Place only on nodes with label K=V (repeatable).
    #[arg(long = "node-selector", value_name = "K=V", value_parser = parse_key_value)]
    pub node_selector: Vec<(String, String)>,
    /// Time between SIGTERM and SIGKILL on stop (default 10s).
    #[arg(long)]
    pub stop_grace: Option<String>,
    /// Time the gateway waits for a response (default 30s).
    #[arg(long)]
    pub request_timeout: Option<String>,
    /// Requests replayed at once from the agent's queue, oldest started first (default 4;
    /// 1 delivers strictly in order).
    #[arg(long)]
    pub replay_concurrency: Option<u32>,
    /// Most requests kept in the agent's replay queue (default 10000); one more gets 503.
    #[arg(long)]
    pub replay_max_queued: Option<u32>,
    /// Largest request body kept for replay, e.g. 4MiB (default 1MiB, at most 16MiB); a larger
    /// one that would need queueing gets 413.
    #[arg(long)]
    pub replay_max_body: Option<String>,
    /// Override the image's entrypoint (repeatable, one word each).
    #[arg(long = "command")]
    pub command: Vec<String>,
    /// Arguments for the entrypoint (after --).
    #[arg(last = true)]
    pub args: Vec<String>,
    #[command(flatten)]
    pub wait: super::wait::WaitArgs,
}

impl DeployArgs {
    /// The manifest these flags describe.
    pub fn to_manifest(&self) -> Manifest {
        let this = self.clone();
        let restart = if this.auto_restart {
            Some("always".to_string())
        } else {
            this.restart
        };
        let health = this.health_endpoint.map(|path| Health {
            path,
            interval: this.health_interval,
            timeout: this.health_timeout,
            retries: this.health_retries,
            start_period: this.health_start_period,
        });
        let autoscale = (this.min_replicas.is_some()
            || this.max_replicas.is_some()
            || this.target_concurrency.is_some()
            || this.scale_to_zero_after.is_some())
        .then_some(Autoscale {
            min: this.min_replicas,
            max: this.max_replicas,
            target_concurrency: this.target_concurrency,
            scale_to_zero_after: this.scale_to_zero_after,
        });
        Manifest {
            name: this.name,
            image: this.image,
            command: this.command,
            args: this.args,
            env: this.env.into_iter().collect(),
            secret_env: this.secret_env.into_iter().collect(),
            port: this.port,
            volumes: this.volumes.into_iter().map(Volume::Short).collect(),
            memory: this.memory,
            cpu: this.cpu,
            replicas: this.replicas,
            health,
            restart,
            stop_grace: this.stop_grace,
            request_timeout: this.request_timeout,
            labels: this.labels.into_iter().collect::<HashMap<_, _>>(),
            node_selector: this.node_selector.into_iter().collect(),
            token: this.token,
            replay: (this.replay_concurrency.is_some()
                || this.replay_max_queued.is_some()
                || this.replay_max_body.is_some())
            .then(|| Replay {
                concurrency: this.replay_concurrency,
                max_queued: this.replay_max_queued,
                max_body: this.replay_max_body,
                ..Default::default()
            }),
            autoscale,
            ..Default::default()
        }
    }
}

/// Parses `K=V`.
pub fn parse_key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is not K=V"))
}

/// Parses a secret `K=V`; an error never repeats the text (it may be the secret).
fn parse_secret_key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| "is not K=V (the text is not shown: it may be a secret)".to_string())
}

fn check_volume(text: &str) -> Result<String, String> {
    parse_volume(text).map(|_| text.to_string())
}

fn check_restart(text: &str) -> Result<String, String> {
    parse_restart(text).map(|_| text.to_string())
}
