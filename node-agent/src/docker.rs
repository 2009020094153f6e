//! The local Docker engine, through bollard: Berth's containers, found and changed by label.

use berth_proto::v1::{Assignment, LogStream};
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, EventsOptions, InspectContainerOptions,
    ListContainersOptions, ListNetworksOptions, LogsOptions, RemoveContainerOptions,
    StartContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use futures::Stream;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Labels Berth puts on its containers.
pub const LABEL_MANAGED: &str = "berth.managed";
/// The agent a container belongs to.
pub const LABEL_AGENT: &str = "berth.agent";
/// The node that runs it.
pub const LABEL_NODE: &str = "berth.node";
/// The replica it is.
pub const LABEL_REPLICA: &str = "berth.replica";
/// The agent generation it was created from.
pub const LABEL_GENERATION: &str = "berth.generation";
/// [`container_digest`] of the spec it was created from.
pub const LABEL_DIGEST: &str = "berth.digest";

pub use berth_proto::container_digest;

/// A Docker call that failed.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The image is not on this host and could not be pulled.
    #[error("image {image} not found on this node and not pulled: {reason}")]
    ImageMissing { image: String, reason: String },
    /// The image is being pulled; try again later.
    #[error("pulling image {image}")]
    ImagePulling { image: String },
    /// The assignment asks for something this node does not allow.
    #[error("{0}")]
    Refused(String),
    /// The container was created on a network that is gone (another node agent on this
    /// engine removed its duplicate); the network is settled again, and the container must
    /// be created again to join it.
    #[error("the container's network is gone: {0}")]
    NetworkGone(String),
    /// Anything else Docker said.
    #[error("docker: {0}")]
    Api(#[from] bollard::errors::Error),
}

/// What Berth knows of one of its containers.
#[derive(Clone, Debug, Default)]
pub struct ContainerInfo {
    /// Container id.
    pub id: String,
    /// The replica label.
    pub replica: String,
    /// The agent label.
    pub agent: String,
    /// The generation label.
    pub generation: i64,
    /// The digest label.
    pub digest: String,
    /// The process runs.
    pub running: bool,
    /// Frozen.
    pub paused: bool,
    /// Exit code of the last exit.
    pub exit_code: Option<i32>,
    /// The container's IP on the configured network.
    pub ip: String,
    /// Killed by the OOM killer.
    pub oom_killed: bool,
}

/// How the output of the containers a node starts is kept, as Kubernetes' kubelet and Nomad
/// do: a file rotated at `max_bytes`, `max_files` of them kept. Docker's own default keeps
/// every line forever, so an agent that logs fills its host's disk over weeks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRotation {
    /// Bytes of a log file before it is rotated.
    pub max_bytes: u64,
    /// Log files kept, the current one among them.
    pub max_files: u32,
}

impl LogRotation {
    /// Each container's log settings under the engine's logging driver `driver`: rotation
    /// for the drivers that write files on the host (`json-file`, Docker's default, and
    /// `local`); nothing for the others (journald, syslog, fluentd, ...), which keep and
    /// bound logs by their own settings.
    fn under(self, driver: &str) -> Option<HostConfigLogConfig> {
        matches!(driver, "json-file" | "local").then(|| HostConfigLogConfig {
            typ: Some(driver.to_string()),
            config: Some(HashMap::from([
                ("max-size".to_string(), self.max_bytes.to_string()),
                ("max-file".to_string(), self.max_files.to_string()),
            ])),
        })
    }
}

/// Berth's view of the engine for one node.
#[derive(Clone)]
pub struct Runtime {
    docker: Docker,
    node: String,
    network: String,
    /// The id of the network settled on by `ensure_network`, shared by every clone.
    network_id: Arc<Mutex<String>>,
    volume_root: PathBuf,
    extra_labels: HashMap<String, String>,
    /// The rotation asked for, and the log settings of each container once the engine's
    /// logging driver is known ([`Runtime::settle_logs`]).
    logs: Option<LogRotation>,
    log_config: Arc<Mutex<Option<HostConfigLogConfig>>>,
    /// Image pulls in flight or failed, by image; a failure is reported once, then retried.
    pulls: Arc<Mutex<HashMap<String, Pull>>>,
}

#[derive(Clone, Debug)]
enum Pull {
    Running,
    Failed(String),
}

/// Whether the Docker engine at `url` answers; its version if it does.
pub async fn engine_version(url: &str) -> Result<String, DockerError> {
    let docker = match url.strip_prefix("unix://") {
        Some(path) => Docker::connect_with_unix(path, 5, bollard::API_DEFAULT_VERSION)?,
        None => Docker::connect_with_http(url, 5, bollard::API_DEFAULT_VERSION)?,
    };
    let version = docker.version().await?;
    Ok(version.version.unwrap_or_default())
}

impl Runtime {
    /// Connects to `url` (`unix:///var/run/docker.sock`) for `node`, with containers on `network`.
    /// Host paths of volumes must lie under `volume_root`. Containers' logs are rotated by
    /// `logs` (`None`: as the engine's own settings say).
    pub fn connect(
        url: &str,
        node: &str,
        network: &str,
        volume_root: &Path,
        extra_labels: HashMap<String, String>,
        logs: Option<LogRotation>,
    ) -> Result<Self, DockerError> {
        let docker = match url.strip_prefix("unix://") {
            Some(path) => Docker::connect_with_unix(path, 120, bollard::API_DEFAULT_VERSION)?,
            None => Docker::connect_with_http(url, 120, bollard::API_DEFAULT_VERSION)?,
        };
        Ok(Self {
            docker,
            node: node.to_string(),
            network: network.to_string(),
            network_id: Arc::default(),
            volume_root: volume_root.to_path_buf(),
            extra_labels,
            logs,
            log_config: Arc::default(),
            pulls: Arc::default(),
        })
    }

    /// Reads the engine's logging driver, for the log settings of the containers created
    /// from now on.
    pub async fn settle_logs(&self) -> Result<(), DockerError> {
        let driver = self.docker.info().await?.logging_driver.unwrap_or_default();
        let config = self.logs.and_then(|logs| logs.under(&driver));
        match (self.logs, &config) {
            (Some(logs), Some(_)) => {
                tracing::info!(driver = %driver, max_bytes = logs.max_bytes, max_files = logs.max_files, "containers' logs rotated")
            }
            (Some(_), None) => {
                tracing::info!(driver = %driver, "containers' logs kept by the engine's logging driver, which bounds them by its own settings")
            }
            (None, _) => {}
        }
        *self.log_config.lock().expect("log config lock") = config;
        Ok(())
    }

    /// Creates the network if it does not exist, and settles on one network of that name.
    /// Docker allows several networks of one name, and node agents that start together on
    /// one engine may each create one: all of them keep the oldest (a later duplicate can never
    /// become older, so every agent settles on the same one) and remove the others. Containers
    /// join it by id. Settled again whenever a container start finds its network gone.
    pub async fn ensure_network(&self) -> Result<(), DockerError> {
        if self.named().await?.is_empty() {
            let request = NetworkCreateRequest {
                name: self.network.clone(),
                ..Default::default()
            };
            if let Err(e) = self.docker.create_network(request).await {
                tracing::debug!(error = %e, "creating the network failed; another may have made it");
            }
        }
        let ids = self.named().await?;
        let Some(chosen) = ids.first().cloned() else {
            return Err(DockerError::Refused(format!(
                "network {} could not be created",
                self.network
            )));
        };
        for other in &ids[1..] {
            // Another agent's duplicate may be in use by its containers already; only an
            // unused one goes, and whoever made it removes it in its own pass.
            let _ = self.docker.remove_network(other).await;
        }
        *self.network_id.lock().expect("network lock") = chosen;
        Ok(())
    }

    /// Ids of the networks named exactly like ours, oldest first.
    async fn named(&self) -> Result<Vec<String>, DockerError> {
        let filters = HashMap::from([("name".to_string(), vec![self.network.clone()])]);
        let options = ListNetworksOptions {
            filters: Some(filters),
        };
        let mut named: Vec<(std::time::SystemTime, String)> = self
            .docker
            .list_networks(Some(options))
            .await?
            .into_iter()
            .filter(|n| n.name.as_deref() == Some(self.network.as_str()))
            .filter_map(|n| {
                // Docker's RFC 3339 trims trailing zeros, so compare times, not strings.
                let created = n
                    .created
                    .as_deref()
                    .and_then(|c| humantime::parse_rfc3339_weak(c).ok())
                    .unwrap_or(std::time::UNIX_EPOCH);
                Some((created, n.id?))
            })
            .collect();
        named.sort();
        Ok(named.into_iter().map(|(_, id)| id).collect())
    }

    /// CPUs and memory of the host.
    pub async fn capacity(&self) -> Result<(u32, u64), DockerError> {
        let info = self.docker.info().await?;
        Ok((
            info.ncpu.unwrap_or(1).max(1) as u32 * 1000,
            info.mem_total.unwrap_or(0).max(0) as u64,
        ))
    }

    /// Every container of this node, running or not.
    pub async fn list(&self) -> Result<Vec<ContainerInfo>, DockerError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_NODE}={}", self.node),
            ],
        )]);
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let mut out = Vec::new();
        for summary in self.docker.list_containers(Some(options)).await? {
            if let Some(id) = summary.id {
                out.push(self.inspect(&id).await?);
            }
        }
        Ok(out)
    }

    /// The current state of one container.
    pub async fn inspect(&self, id: &str) -> Result<ContainerInfo, DockerError> {
        let c = self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await?;
        let labels = c
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        let state = c.state.unwrap_or_default();
        let ip = c
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|mut n| n.remove(&self.network))
            .and_then(|n| n.ip_address)
            .unwrap_or_default();
        Ok(ContainerInfo {
            id: c.id.unwrap_or_default(),
            replica: labels.get(LABEL_REPLICA).cloned().unwrap_or_default(),
            agent: labels.get(LABEL_AGENT).cloned().unwrap_or_default(),
            generation: labels
                .get(LABEL_GENERATION)
                .and_then(|g| g.parse().ok())
                .unwrap_or_default(),
            digest: labels.get(LABEL_DIGEST).cloned().unwrap_or_default(),
            running: state.running.unwrap_or(false),
            paused: state.paused.unwrap_or(false),
            exit_code: state.exit_code.map(|c| c as i32),
            ip,
            oom_killed: state.oom_killed.unwrap_or(false),
        })
    }

    /// Creates (not starts) the container of an assignment.
    pub async fn create(&self, a: &Assignment) -> Result<String, DockerError> {
        let spec = a.spec.clone().unwrap_or_default();
        if self.docker.inspect_image(&spec.image).await.is_err() {
            return Err(self.pull(&spec.image));
        }
        for v in &spec.volumes {
            // The control plane checks this too; the node is where a host path is opened.
            self.check_host_path(&v.source)?;
        }
        let mut labels = self.extra_labels.clone();
        labels.extend([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_AGENT.to_string(), spec.name.clone()),
            (LABEL_NODE.to_string(), self.node.clone()),
            (LABEL_REPLICA.to_string(), a.replica.clone()),
            (LABEL_GENERATION.to_string(), a.generation.to_string()),
            (LABEL_DIGEST.to_string(), container_digest(&spec)),
        ]);
        for (k, v) in &spec.labels {
            labels.insert(format!("berth.label.{k}"), v.clone());
        }
        let mut env: Vec<String> = spec
            .env
            .iter()
            .chain(&spec.secret_env)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        env.push(format!("PORT={}", spec.port));
        env.sort();
        let resources = spec.resources.unwrap_or_default();
        let binds = spec
            .volumes
            .iter()
            .map(|v| {
                format!(
                    "{}:{}{}",
                    v.source,
                    v.target,
                    if v.read_only { ":ro" } else { "" }
                )
            })
            .collect();
        let host_config = HostConfig {
            binds: Some(binds),
            memory: (resources.memory_bytes > 0).then_some(resources.memory_bytes as i64),
            // No swap beyond the limit: a replica that outgrows its memory is OOM-killed (and
            // reported as such), as under Kubernetes, rather than slowed down by swapping.
            memory_swap: (resources.memory_bytes > 0).then_some(resources.memory_bytes as i64),
            nano_cpus: (resources.cpu_millis > 0)
                .then_some(resources.cpu_millis as i64 * 1_000_000),
            network_mode: Some(self.network_mode()),
            log_config: self.log_config.lock().expect("log config lock").clone(),
            ..Default::default()
        };
        let stop_timeout = spec.stop_grace.map(|d| d.seconds).unwrap_or(10);
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            entrypoint: (!spec.command.is_empty()).then(|| spec.command.clone()),
            cmd: (!spec.args.is_empty()).then(|| spec.args.clone()),
            env: Some(env),
            labels: Some(labels),
            host_config: Some(host_config),
            stop_timeout: Some(stop_timeout),
            ..Default::default()
        };
        let name = self.container_name(&a.replica);
        // A leftover container of the same name (a crash between create and record) goes first.
        let _ = self.remove(&name).await;
        let options = CreateContainerOptions {
            name: Some(name),
            ..Default::default()
        };
        Ok(self.docker.create_container(Some(options), body).await?.id)
    }

    /// Starts pulling a missing image in the background (a slow registry must not hold up the
    /// other replicas), and tells where the pull stands.
    fn pull(&self, image: &str) -> DockerError {
        let mut pulls = self.pulls.lock().expect("pulls lock");
        match pulls.get(image).cloned() {
            Some(Pull::Running) => DockerError::ImagePulling {
                image: image.to_string(),
            },
            Some(Pull::Failed(reason)) => {
                // Reported once; the next attempt pulls again.
                pulls.remove(image);
                DockerError::ImageMissing {
                    image: image.to_string(),
                    reason,
                }
            }
            None => {
                pulls.insert(image.to_string(), Pull::Running);
                let (docker, pulls, pulled_image) =
                    (self.docker.clone(), self.pulls.clone(), image.to_string());
                tokio::spawn(async move {
                    let image = pulled_image;
                    use futures::TryStreamExt;
                    let options = CreateImageOptions {
                        from_image: Some(image.clone()),
                        ..Default::default()
                    };
                    let pulled = docker
                        .create_image(Some(options), None, None)
                        .try_collect::<Vec<_>>()
                        .await;
                    let mut pulls = pulls.lock().expect("pulls lock");
                    match pulled {
                        Ok(_) => {
                            tracing::info!(image = %image, "image pulled");
                            pulls.remove(&image);
                        }
                        Err(e) => {
                            tracing::warn!(image = %image, error = %e, "image pull failed");
                            pulls.insert(image, Pull::Failed(e.to_string()));
                        }
                    }
                });
                DockerError::ImagePulling {
                    image: image.to_string(),
                }
            }
        }
    }

    /// The name of a replica's container on this node.
    pub fn container_name(&self, replica: &str) -> String {
        format!("berth-{}-{}", self.node, replica)
    }

    /// A replica's output: the last `tail` lines (all when 0), then, with `follow`, what it
    /// writes next. A replica that has no container yet ends the stream with an error.
    pub fn logs(
        &self,
        replica: &str,
        follow: bool,
        tail: u32,
    ) -> impl Stream<Item = Result<(LogStream, bytes::Bytes), DockerError>> + use<> {
        let options = LogsOptions {
            follow,
            stdout: true,
            stderr: true,
            tail: if tail == 0 {
                "all".to_string()
            } else {
                tail.to_string()
            },
            ..Default::default()
        };
        use futures::StreamExt;
        self.docker
            .logs(&self.container_name(replica), Some(options))
            .filter_map(|item| async move {
                match item {
                    Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                        Some(Ok((LogStream::Stdout, message)))
                    }
                    Ok(LogOutput::StdErr { message }) => Some(Ok((LogStream::Stderr, message))),
                    Ok(LogOutput::StdIn { .. }) => None,
                    Err(e) => Some(Err(e.into())),
                }
            })
    }

    /// Starts a container, after checking its host paths again: Docker resolves a bind's
    /// source at every start, and a container may have swapped a directory it can write (in
    /// one of its volumes) for a symbolic link out of the volume root since it was created.
    /// A start that finds the container's network gone settles the network again and says
    /// [`DockerError::NetworkGone`]: the container is to be created again.
    pub async fn start(&self, id: &str) -> Result<(), DockerError> {
        let info = self.docker.inspect_container(id, None).await?;
        let binds = info.host_config.and_then(|h| h.binds).unwrap_or_default();
        for bind in &binds {
            self.check_host_path(bind.split(':').next().unwrap_or_default())?;
        }
        match self
            .docker
            .start_container(id, None::<StartContainerOptions>)
            .await
        {
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                message,
            }) if message.contains("network") => {
                self.ensure_network().await?;
                Err(DockerError::NetworkGone(message))
            }
            started => Ok(started?),
        }
    }

    /// What a new container joins: the settled network by id, or by name before it is settled.
    fn network_mode(&self) -> String {
        let id = self.network_id.lock().expect("network lock");
        if id.is_empty() {
            self.network.clone()
        } else {
            id.clone()
        }
    }

    /// A volume's host path must lie under the volume root, also with every symbolic link on
    /// it resolved; named volumes (no leading `/`) are Docker's.
    fn check_host_path(&self, source: &str) -> Result<(), DockerError> {
        if !source.starts_with('/') {
            return Ok(());
        }
        if !under(&self.volume_root, Path::new(source)) {
            return Err(DockerError::Refused(format!(
                "volume {source} is outside this node's volume root {}",
                self.volume_root.display()
            )));
        }
        if !resolves_under(&self.volume_root, Path::new(source)) {
            return Err(DockerError::Refused(format!(
                "volume {source} leads outside this node's volume root {} through a symbolic link",
                self.volume_root.display()
            )));
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
        let options = StopContainerOptions {
            t: Some(grace.as_secs() as i32),
            ..Default::default()
        };
        match self.docker.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            // 304: already stopped.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Freezes a container.
    pub async fn pause(&self, id: &str) -> Result<(), DockerError> {
        Ok(self.docker.pause_container(id).await?)
    }

    /// Thaws a container.
    pub async fn unpause(&self, id: &str) -> Result<(), DockerError> {
        Ok(self.docker.unpause_container(id).await?)
    }

    /// Removes a container, killing it if needed.
    pub async fn remove(&self, id: &str) -> Result<(), DockerError> {
        let options = RemoveContainerOptions {
            force: true,
            v: false,
            ..Default::default()
        };
        Ok(self.docker.remove_container(id, Some(options)).await?)
    }

    /// Container `die` events of this node's containers, as container ids.
    pub fn deaths(&self) -> impl Stream<Item = Result<String, DockerError>> + use<> {
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("event".to_string(), vec!["die".to_string()]),
            (
                "label".to_string(),
                vec![format!("{LABEL_NODE}={}", self.node)],
            ),
        ]);
        let options = EventsOptions {
            filters: Some(filters),
            ..Default::default()
        };
        use futures::StreamExt;
        self.docker.events(Some(options)).map(|e| {
            e.map(|m| m.actor.and_then(|a| a.id).unwrap_or_default())
                .map_err(DockerError::from)
        })
    }
}

/// Whether `path` lies under `root`, with no `..` to climb out.
fn under(root: &Path, path: &Path) -> bool {
    path.starts_with(root) && !path.components().any(|c| c == Component::ParentDir)
}

/// Whether `path`, with every symbolic link on it resolved, stays under `root` (also
/// resolved). A path that does not exist yet is judged by its deepest existing ancestor, which
/// is what Docker would create it in.
fn resolves_under(root: &Path, path: &Path) -> bool {
    let Ok(root) = std::fs::canonicalize(root) else {
        return false;
    };
    let mut probe = path.to_path_buf();
    loop {
        if let Ok(real) = std::fs::canonicalize(&probe) {
            return real.starts_with(&root);
        }
        if !probe.pop() {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{container_digest, resolves_under, under, LogRotation};
    use berth_proto::v1::AgentSpec;
    use std::path::Path;

    #[test]
    fn logs_are_rotated_under_the_drivers_that_write_files_and_left_to_the_others() {
        let logs = LogRotation {
            max_bytes: 10 << 20,
            max_files: 5,
        };
        for driver in ["json-file", "local"] {
            let config = logs.under(driver).expect(driver);
            assert_eq!(config.typ.as_deref(), Some(driver));
            let options = config.config.unwrap();
            assert_eq!(options["max-size"], "10485760");
            assert_eq!(options["max-file"], "5");
        }
        for driver in ["journald", "syslog", "fluentd", "none", ""] {
            assert_eq!(logs.under(driver), None, "{driver}");
        }
    }

    #[test]
    fn a_symbolic_link_out_of_the_volume_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("volumes");
        std::fs::create_dir_all(root.join("agent")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("escape")).unwrap();
        std::os::unix::fs::symlink(root.join("agent"), root.join("alias")).unwrap();
        assert!(resolves_under(&root, &root.join("agent")));
        assert!(resolves_under(&root, &root.join("agent/not-yet")));
        assert!(
            resolves_under(&root, &root.join("alias")),
            "a link that stays inside"
        );
        assert!(!resolves_under(&root, &root.join("escape")));
        assert!(!resolves_under(&root, &root.join("escape/passwd")));
        assert!(!resolves_under(&root, &root.join("escape/not-yet")));
    }

    #[test]
    fn the_digest_follows_the_container_not_the_run_state() {
        let spec = AgentSpec {
            name: "a".into(),
            image: "x:1".into(),
            env: [("A", "1"), ("B", "2"), ("C", "3")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let same = AgentSpec {
            replicas: Some(5),
            health: Some(Default::default()),
            ..spec.clone()
        };
        assert_eq!(container_digest(&spec), container_digest(&same));
        let other = AgentSpec {
            image: "x:2".into(),
            ..spec.clone()
        };
        assert_ne!(container_digest(&spec), container_digest(&other));
    }

    #[test]
    fn volume_paths_must_stay_under_the_root() {
        let root = Path::new("/var/lib/berth/volumes");
        assert!(under(root, Path::new("/var/lib/berth/volumes/a/data")));
        assert!(!under(root, Path::new("/var/lib/berth/volumes/../../etc")));
        assert!(!under(root, Path::new("/var/lib/berth/volumes-other")));
        assert!(!under(root, Path::new("/etc")));
    }
}
