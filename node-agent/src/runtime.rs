//! The container runtime the supervisor drives: the local Docker engine in production
//! ([`crate::docker::Runtime`]), an in-memory one in unit tests ([`memory`]), so that the
//! supervisor's restart, health and adoption logic is tested on tokio's paused clock.

use crate::docker::{ContainerInfo, DockerError};
use berth_proto::v1::Assignment;
use futures::stream::BoxStream;
use std::future::Future;
use std::time::Duration;

/// What the supervisor needs of a container engine.
pub trait ContainerRuntime: Clone + Send + Sync + 'static {
    /// Every container of this node, running or not.
    fn list(&self) -> impl Future<Output = Result<Vec<ContainerInfo>, DockerError>> + Send;
    /// The current state of one container.
    fn inspect(&self, id: &str) -> impl Future<Output = Result<ContainerInfo, DockerError>> + Send;
    /// Creates (not starts) the container of an assignment; its id.
    fn create(&self, a: &Assignment) -> impl Future<Output = Result<String, DockerError>> + Send;
    /// Starts a container.
    fn start(&self, id: &str) -> impl Future<Output = Result<(), DockerError>> + Send;
    /// SIGTERM, then SIGKILL after `grace`.
    fn stop(
        &self,
        id: &str,
        grace: Duration,
    ) -> impl Future<Output = Result<(), DockerError>> + Send;
    /// Freezes a container.
    fn pause(&self, id: &str) -> impl Future<Output = Result<(), DockerError>> + Send;
    /// Thaws a container.
    fn unpause(&self, id: &str) -> impl Future<Output = Result<(), DockerError>> + Send;
    /// Removes a container, killing it if needed.
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), DockerError>> + Send;
    /// The ids of this node's containers as they die.
    fn deaths(&self) -> BoxStream<'static, Result<String, DockerError>>;
    /// One health probe of `path` at `address`, straight to the container.
    fn probe(
        &self,
        address: &str,
        path: &str,
        timeout: Duration,
    ) -> impl Future<Output = bool> + Send;
}

impl ContainerRuntime for crate::docker::Runtime {
    async fn list(&self) -> Result<Vec<ContainerInfo>, DockerError> {
        crate::docker::Runtime::list(self).await
    }
    async fn inspect(&self, id: &str) -> Result<ContainerInfo, DockerError> {
        crate::docker::Runtime::inspect(self, id).await
    }
    async fn create(&self, a: &Assignment) -> Result<String, DockerError> {
        crate::docker::Runtime::create(self, a).await
    }
    async fn start(&self, id: &str) -> Result<(), DockerError> {
        crate::docker::Runtime::start(self, id).await
    }
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
        crate::docker::Runtime::stop(self, id, grace).await
    }
    async fn pause(&self, id: &str) -> Result<(), DockerError> {
        crate::docker::Runtime::pause(self, id).await
    }
    async fn unpause(&self, id: &str) -> Result<(), DockerError> {
        crate::docker::Runtime::unpause(self, id).await
    }
    async fn remove(&self, id: &str) -> Result<(), DockerError> {
        crate::docker::Runtime::remove(self, id).await
    }
    fn deaths(&self) -> BoxStream<'static, Result<String, DockerError>> {
        use futures::StreamExt;
        crate::docker::Runtime::deaths(self).boxed()
    }
    async fn probe(&self, address: &str, path: &str, timeout: Duration) -> bool {
        crate::probe::get(address, path, timeout).await
    }
}

/// An in-memory runtime for unit tests: containers are records, a crash is a call, and health
/// is a flag per container.
#[cfg(test)]
pub mod memory {
    use super::*;
    use std::collections::{BTreeMap, HashSet};
    use std::sync::{Arc, Mutex};
    use tokio::sync::broadcast;

    #[derive(Default)]
    struct State {
        containers: BTreeMap<String, ContainerInfo>,
        unhealthy: HashSet<String>,
        created: u32,
        starts: u32,
        /// How long each start takes, as on a busy Docker engine.
        start_time: Duration,
        /// How long a process takes to end on SIGTERM (at most the grace, then SIGKILL).
        stop_time: Duration,
    }

    /// See the module's doc.
    #[derive(Clone)]
    pub struct MemoryRuntime {
        state: Arc<Mutex<State>>,
        deaths: broadcast::Sender<String>,
    }

    impl Default for MemoryRuntime {
        fn default() -> Self {
            Self {
                state: Arc::default(),
                deaths: broadcast::channel(64).0,
            }
        }
    }

    impl MemoryRuntime {
        /// Adds a container as if it had been left by an earlier run of the node agent.
        pub fn existing(&self, info: ContainerInfo) {
            let mut state = self.state.lock().unwrap();
            state.containers.insert(info.id.clone(), info);
        }

        /// Each container start takes `time` from now on.
        pub fn slow_starts(&self, time: Duration) {
            self.state.lock().unwrap().start_time = time;
        }

        /// Each process takes `time` to end on SIGTERM from now on, as one that finishes its
        /// requests in flight first (or ignores SIGTERM until killed at the end of the grace).
        pub fn slow_stops(&self, time: Duration) {
            self.state.lock().unwrap().stop_time = time;
        }

        /// The container exits with `code`, as a crash.
        pub fn crash(&self, id: &str, code: i32) {
            let mut state = self.state.lock().unwrap();
            let c = state.containers.get_mut(id).expect("a container");
            c.running = false;
            c.exit_code = Some(code);
            let _ = self.deaths.send(id.to_string());
        }

        /// Whether probes of container `id` pass.
        pub fn set_healthy(&self, id: &str, healthy: bool) {
            let mut state = self.state.lock().unwrap();
            if healthy {
                state.unhealthy.remove(id);
            } else {
                state.unhealthy.insert(id.to_string());
            }
        }

        /// The ids of the containers there are, running or not, sorted.
        pub fn ids(&self) -> Vec<String> {
            self.state
                .lock()
                .unwrap()
                .containers
                .keys()
                .cloned()
                .collect()
        }

        /// Containers created and starts made so far.
        pub fn counts(&self) -> (u32, u32) {
            let state = self.state.lock().unwrap();
            (state.created, state.starts)
        }

        fn with<T>(
            &self,
            id: &str,
            f: impl FnOnce(&mut ContainerInfo) -> T,
        ) -> Result<T, DockerError> {
            let mut state = self.state.lock().unwrap();
            state
                .containers
                .get_mut(id)
                .map(f)
                .ok_or_else(|| DockerError::Refused(format!("no container {id}")))
        }
    }

    impl ContainerRuntime for MemoryRuntime {
        async fn list(&self) -> Result<Vec<ContainerInfo>, DockerError> {
            Ok(self
                .state
                .lock()
                .unwrap()
                .containers
                .values()
                .cloned()
                .collect())
        }
        async fn inspect(&self, id: &str) -> Result<ContainerInfo, DockerError> {
            self.with(id, |c| c.clone())
        }
        async fn create(&self, a: &Assignment) -> Result<String, DockerError> {
            let mut state = self.state.lock().unwrap();
            state.created += 1;
            let n = state.created;
            let spec = a.spec.clone().unwrap_or_default();
            let id = format!("c{n}");
            state.containers.insert(
                id.clone(),
                ContainerInfo {
                    id: id.clone(),
                    replica: a.replica.clone(),
                    agent: spec.name.clone(),
                    generation: a.generation,
                    digest: crate::docker::container_digest(&spec),
                    ip: format!("10.0.0.{n}"),
                    ..Default::default()
                },
            );
            Ok(id)
        }
        async fn start(&self, id: &str) -> Result<(), DockerError> {
            let time = self.state.lock().unwrap().start_time;
            tokio::time::sleep(time).await;
            self.state.lock().unwrap().starts += 1;
            self.with(id, |c| {
                c.running = true;
                c.exit_code = None;
            })
        }
        async fn stop(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
            let time = self.state.lock().unwrap().stop_time;
            if self.with(id, |c| c.running)? {
                tokio::time::sleep(time.min(grace)).await;
            }
            let was_running = self.with(id, |c| std::mem::replace(&mut c.running, false))?;
            if was_running {
                let _ = self.deaths.send(id.to_string());
            }
            Ok(())
        }
        async fn pause(&self, id: &str) -> Result<(), DockerError> {
            self.with(id, |c| c.paused = true)
        }
        async fn unpause(&self, id: &str) -> Result<(), DockerError> {
            self.with(id, |c| c.paused = false)
        }
        async fn remove(&self, id: &str) -> Result<(), DockerError> {
            self.state.lock().unwrap().containers.remove(id);
            Ok(())
        }
        fn deaths(&self) -> BoxStream<'static, Result<String, DockerError>> {
            use futures::StreamExt;
            tokio_stream::wrappers::BroadcastStream::new(self.deaths.subscribe())
                .filter_map(|id| async move { id.ok().map(Ok) })
                .boxed()
        }
        async fn probe(&self, address: &str, _path: &str, _timeout: Duration) -> bool {
            let state = self.state.lock().unwrap();
            let id = state
                .containers
                .values()
                .find(|c| address.starts_with(&format!("{}:", c.ip)))
                .map(|c| c.id.clone());
            id.is_some_and(|id| !state.unhealthy.contains(&id) && state.containers[&id].running)
        }
    }
}
