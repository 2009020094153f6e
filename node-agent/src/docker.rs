//! The local Docker engine, through bollard: Berth's containers, found and changed by label.

use berth_proto::v1::Assignment;
use bollard::models::{ContainerCreateBody, HostConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, EventsOptions, InspectContainerOptions, ListContainersOptions,
    RemoveContainerOptions, StartContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use futures::Stream;
use std::collections::HashMap;
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

/// A Docker call that failed.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The image is not on this host and could not be pulled.
    #[error("image {image} not found on this node")]
    ImageMissing { image: String },
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

/// Berth's view of the engine for one node.
#[derive(Clone)]
pub struct Runtime {
    docker: Docker,
    node: String,
    network: String,
    extra_labels: HashMap<String, String>,
}

impl Runtime {
    /// Connects to `url` (`unix:///var/run/docker.sock`) for `node`, with containers on `network`.
    pub fn connect(
        url: &str,
        node: &str,
        network: &str,
        extra_labels: HashMap<String, String>,
    ) -> Result<Self, DockerError> {
        let docker = match url.strip_prefix("unix://") {
            Some(path) => Docker::connect_with_unix(path, 120, bollard::API_DEFAULT_VERSION)?,
            None => Docker::connect_with_http(url, 120, bollard::API_DEFAULT_VERSION)?,
        };
        Ok(Self {
            docker,
            node: node.to_string(),
            network: network.to_string(),
            extra_labels,
        })
    }

    /// Creates the network if it does not exist.
    pub async fn ensure_network(&self) -> Result<(), DockerError> {
        if self
            .docker
            .inspect_network(&self.network, None)
            .await
            .is_ok()
        {
            return Ok(());
        }
        let request = NetworkCreateRequest {
            name: self.network.clone(),
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(_) => Ok(()),
            // Another node agent on this engine made it first.
            Err(_)
                if self
                    .docker
                    .inspect_network(&self.network, None)
                    .await
                    .is_ok() =>
            {
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
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
            return Err(DockerError::ImageMissing { image: spec.image });
        }
        let mut labels = self.extra_labels.clone();
        labels.extend([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_AGENT.to_string(), spec.name.clone()),
            (LABEL_NODE.to_string(), self.node.clone()),
            (LABEL_REPLICA.to_string(), a.replica.clone()),
            (LABEL_GENERATION.to_string(), a.generation.to_string()),
        ]);
        for (k, v) in &spec.labels {
            labels.insert(format!("berth.label.{k}"), v.clone());
        }
        let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
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
            nano_cpus: (resources.cpu_millis > 0)
                .then_some(resources.cpu_millis as i64 * 1_000_000),
            network_mode: Some(self.network.clone()),
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
        let name = format!("berth-{}-{}", self.node, a.replica);
        // A leftover container of the same name (a crash between create and record) goes first.
        let _ = self.remove(&name).await;
        let options = CreateContainerOptions {
            name: Some(name),
            ..Default::default()
        };
        Ok(self.docker.create_container(Some(options), body).await?.id)
    }

    /// Starts a container.
    pub async fn start(&self, id: &str) -> Result<(), DockerError> {
        Ok(self
            .docker
            .start_container(id, None::<StartContainerOptions>)
            .await?)
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
