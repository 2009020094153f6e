//! `berth.v1.AgentService` over the store.

use super::{to_status, ApiError};
use crate::nodes::sessions::{LogTarget, Sessions};
use berth_proto::defaults;
use berth_proto::time::now;
use berth_proto::v1::agent_service_server::AgentService;
use berth_proto::v1::{
    Agent, AgentActionRequest, AgentMeta, AgentSecrets, AgentSpec, CreateAgentRequest,
    DeleteAgentRequest, DeleteAgentResponse, DesiredState, Event, EventSeverity, GetAgentRequest,
    ListAgentsRequest, ListAgentsResponse, LogChunk, ScaleAgentRequest, StreamLogsRequest,
    UpdateAgentRequest, WatchEventsRequest,
};
use berth_proto::validate::{self, FieldError, Limits};
use berth_store::{EventFilter, Store};
use futures::Stream;
use sha2::{Digest, Sha256};
use std::pin::Pin;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

type ApiResult<T> = Result<Response<T>, Status>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Serves `AgentService`.
#[derive(Clone)]
pub struct AgentApi {
    store: Store,
    limits: Limits,
    sessions: Sessions,
}

impl AgentApi {
    /// An API over `store`, validating specs against `limits`, reaching nodes for logs through
    /// `sessions`.
    pub fn new(store: Store, limits: Limits, sessions: Sessions) -> Self {
        Self {
            store,
            limits,
            sessions,
        }
    }

    /// Fills each replica's breaker state from what gateways published. Best effort: the
    /// agent is worth showing without them.
    async fn add_breaker_states(&self, agent: &mut Agent) {
        let Some(name) = agent.spec.as_ref().map(|s| s.name.clone()) else {
            return;
        };
        let states = match self.store.breaker_states(&name).await {
            Ok(states) => states,
            Err(e) => {
                tracing::warn!(agent = %name, error = %e, "cannot read breaker states");
                return;
            }
        };
        for replica in agent.status.iter_mut().flat_map(|s| s.replicas.iter_mut()) {
            if let Some(state) = states.get(&replica.replica) {
                replica.breaker = *state as i32;
            }
        }
    }

    /// Applies defaults, checks the spec and replaces a gateway token by its hash.
    /// `current_token_hash` is the stored hash on update (a spec read back may carry it).
    fn prepare_spec(
        &self,
        spec: Option<AgentSpec>,
        current_token_hash: Option<&str>,
    ) -> Result<AgentSpec, ApiError> {
        let mut spec = spec.ok_or_else(|| FieldError {
            field: "spec".into(),
            reason: "is required".into(),
        })?;
        defaults::apply(&mut spec);
        validate::spec(&spec, &self.limits)?;
        if !spec.gateway_token.is_empty() {
            spec.gateway_token_sha256 = hex_sha256(spec.gateway_token.as_bytes());
            spec.gateway_token.clear();
        } else if !spec.gateway_token_sha256.is_empty()
            && Some(spec.gateway_token_sha256.as_str()) != current_token_hash
        {
            let hash = &spec.gateway_token_sha256;
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(FieldError {
                    field: "spec.gateway_token_sha256".into(),
                    reason: "must be 64 hex digits, the SHA-256 of the token (or set \
                             spec.gateway_token instead)"
                        .into(),
                }
                .into());
            }
            spec.gateway_token_sha256 = hash.to_ascii_lowercase();
        }
        Ok(spec)
    }

    /// Takes the secret values out of `spec` (each shown as `<redacted>` from then on): the
    /// secrets to store. A value of `<redacted>` keeps the one in `stored`.
    fn split_secrets(
        mut spec: AgentSpec,
        stored: &AgentSecrets,
    ) -> Result<(AgentSpec, AgentSecrets), ApiError> {
        let mut secrets = AgentSecrets::default();
        for (key, value) in spec.secret_env.iter_mut() {
            let kept = if value == berth_proto::REDACTED {
                stored.env.get(key).cloned().ok_or_else(|| FieldError {
                    field: format!("spec.secret_env[{key:?}]"),
                    reason: format!(
                        "is {} but no value is stored: give the value",
                        berth_proto::REDACTED
                    ),
                })?
            } else {
                value.clone()
            };
            *value = berth_proto::REDACTED.to_string();
            secrets.env.insert(key.clone(), kept);
        }
        Ok((spec, secrets))
    }

    /// Changes an agent's desired state; `None` from `next` means no change.
    async fn transition(
        &self,
        name: &str,
        reason: &'static str,
        next: impl Fn(DesiredState) -> Result<Option<DesiredState>, ApiError>,
    ) -> Result<Agent, ApiError> {
        validate::dns_label("name", name)?;
        self.store
            .update_agent(name, None, |agent| {
                let meta = agent.meta.get_or_insert_with(AgentMeta::default);
                let current =
                    DesiredState::try_from(meta.desired_state).unwrap_or(DesiredState::Running);
                let Some(state) = next(current)? else {
                    return Ok(None);
                };
                meta.desired_state = state as i32;
                Ok(Some(event(
                    name,
                    reason,
                    format!("desired state set to {}", state_word(state)),
                )))
            })
            .await
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn create_agent(&self, request: Request<CreateAgentRequest>) -> ApiResult<Agent> {
        let request = request.into_inner();
        let spec = self.prepare_spec(request.spec, None).map_err(to_status)?;
        let (spec, secrets) =
            Self::split_secrets(spec, &AgentSecrets::default()).map_err(to_status)?;
        let desired = match DesiredState::try_from(request.desired_state) {
            Ok(DesiredState::Unspecified) => DesiredState::Running,
            Ok(state) => state,
            Err(_) => return Err(invalid("desired_state", "unknown state")),
        };
        let name = spec.name.clone();
        let message = format!(
            "agent created from image {} with {} replica(s)",
            spec.image,
            spec.replicas()
        );
        let agent = Agent {
            spec: Some(spec),
            meta: Some(AgentMeta {
                desired_state: desired as i32,
                ..Default::default()
            }),
            status: None,
        };
        let created = self
            .store
            .create_agent(agent, &secrets, event(&name, "AgentCreated", message))
            .await
            .map_err(|e| to_status(e.into()))?;
        tracing::info!(agent = %name, "agent created");
        Ok(Response::new(created))
    }

    async fn get_agent(&self, request: Request<GetAgentRequest>) -> ApiResult<Agent> {
        let admin = matches!(
            request.extensions().get::<crate::auth::Principal>(),
            Some(crate::auth::Principal::Admin)
        );
        let GetAgentRequest {
            name,
            include_secrets,
        } = request.into_inner();
        validate::dns_label("name", &name).map_err(|e| to_status(e.into()))?;
        if include_secrets && !admin {
            return Err(Status::permission_denied(
                "include_secrets needs an admin token",
            ));
        }
        let mut agent = self
            .store
            .get_agent(&name)
            .await
            .map_err(|e| to_status(e.into()))?;
        if include_secrets {
            let secrets = self
                .store
                .agent_secrets(&name)
                .await
                .map_err(|e| to_status(e.into()))?;
            if let Some(spec) = agent.spec.as_mut() {
                spec.secret_env = secrets.env;
            }
        }
        self.add_breaker_states(&mut agent).await;
        Ok(Response::new(agent))
    }

    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> ApiResult<ListAgentsResponse> {
        let selector = request.into_inner().label_selector;
        let (mut agents, revision) = self
            .store
            .list_agents()
            .await
            .map_err(|e| to_status(e.into()))?;
        agents.retain(|agent| {
            let labels = agent.spec.as_ref().map(|s| &s.labels);
            selector
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        });
        Ok(Response::new(ListAgentsResponse { agents, revision }))
    }

    async fn update_agent(&self, request: Request<UpdateAgentRequest>) -> ApiResult<Agent> {
        let request = request.into_inner();
        let name = request
            .spec
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        validate::dns_label("spec.name", &name).map_err(|e| to_status(e.into()))?;
        let expected = Some(request.resource_version.as_str()).filter(|v| !v.is_empty());
        let spec = request.spec;
        let updated = self
            .store
            .update_agent_and_secrets(&name, expected, |agent, secrets| {
                let current = agent.spec.clone().unwrap_or_default();
                let hash = Some(current.gateway_token_sha256.as_str());
                let mut input = spec.clone();
                if let Some(input) = input.as_mut().filter(|s| s.autoscale.is_some()) {
                    if current.autoscale.is_some() {
                        // The autoscaler owns the count: an update keeps it (within the new
                        // bounds), as a re-applied manifest must not undo its work.
                        input.replicas = current.replicas;
                    }
                }
                let new = self.prepare_spec(input, hash)?;
                let (new, new_secrets) = Self::split_secrets(new, secrets)?;
                if new == current && new_secrets == *secrets {
                    return Ok(None);
                }
                *secrets = new_secrets;
                let message = format!(
                    "spec updated: image {}, {} replica(s)",
                    new.image,
                    new.replicas()
                );
                agent.spec = Some(new);
                Ok(Some(event(&name, "AgentUpdated", message)))
            })
            .await
            .map_err(to_status)?;
        Ok(Response::new(updated))
    }

    async fn delete_agent(
        &self,
        request: Request<DeleteAgentRequest>,
    ) -> ApiResult<DeleteAgentResponse> {
        let request = request.into_inner();
        validate::dns_label("name", &request.name).map_err(|e| to_status(e.into()))?;
        let expected = Some(request.resource_version.as_str()).filter(|v| !v.is_empty());
        self.store
            .delete_agent(
                &request.name,
                expected,
                event(&request.name, "AgentDeleted", "agent deleted".into()),
            )
            .await
            .map_err(|e| to_status(e.into()))?;
        tracing::info!(agent = %request.name, "agent deleted");
        Ok(Response::new(DeleteAgentResponse {}))
    }

    async fn start_agent(&self, request: Request<AgentActionRequest>) -> ApiResult<Agent> {
        let name = request.into_inner().name;
        self.transition(&name, "AgentStarted", |current| {
            Ok((current != DesiredState::Running).then_some(DesiredState::Running))
        })
        .await
        .map(Response::new)
        .map_err(to_status)
    }

    async fn stop_agent(&self, request: Request<AgentActionRequest>) -> ApiResult<Agent> {
        let name = request.into_inner().name;
        self.transition(&name, "AgentStopped", |current| {
            Ok((current != DesiredState::Stopped).then_some(DesiredState::Stopped))
        })
        .await
        .map(Response::new)
        .map_err(to_status)
    }

    async fn pause_agent(&self, request: Request<AgentActionRequest>) -> ApiResult<Agent> {
        let name = request.into_inner().name;
        self.transition(&name, "AgentPaused", |current| match current {
            DesiredState::Stopped => Err(ApiError::FailedPrecondition(format!(
                "agent {name} is stopped, so it cannot be paused: start it first (berth start {name})"
            ))),
            DesiredState::Paused => Ok(None),
            _ => Ok(Some(DesiredState::Paused)),
        })
        .await
        .map(Response::new)
        .map_err(to_status)
    }

    async fn resume_agent(&self, request: Request<AgentActionRequest>) -> ApiResult<Agent> {
        let name = request.into_inner().name;
        self.transition(&name, "AgentResumed", |current| match current {
            DesiredState::Stopped => Err(ApiError::FailedPrecondition(format!(
                "agent {name} is stopped, not paused: use berth start {name}"
            ))),
            DesiredState::Paused => Ok(Some(DesiredState::Running)),
            _ => Ok(None),
        })
        .await
        .map(Response::new)
        .map_err(to_status)
    }

    async fn restart_agent(&self, request: Request<AgentActionRequest>) -> ApiResult<Agent> {
        let name = request.into_inner().name;
        validate::dns_label("name", &name).map_err(|e| to_status(e.into()))?;
        self.store
            .update_agent(&name, None, |agent| {
                agent
                    .meta
                    .get_or_insert_with(AgentMeta::default)
                    .restart_time = Some(now());
                Ok::<_, ApiError>(Some(event(
                    &name,
                    "AgentRestartRequested",
                    "restart of every replica requested".into(),
                )))
            })
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn scale_agent(&self, request: Request<ScaleAgentRequest>) -> ApiResult<Agent> {
        let ScaleAgentRequest { name, replicas } = request.into_inner();
        validate::dns_label("name", &name).map_err(|e| to_status(e.into()))?;
        if replicas > validate::MAX_REPLICAS {
            return Err(invalid(
                "replicas",
                &format!(
                    "{replicas} is more than the limit of {}",
                    validate::MAX_REPLICAS
                ),
            ));
        }
        self.store
            .update_agent(&name, None, |agent| {
                let spec = agent.spec.get_or_insert_with(AgentSpec::default);
                if let Some(autoscale) = &spec.autoscale {
                    return Err(ApiError::FailedPrecondition(format!(
                        "agent {name} is autoscaled between {} and {} replicas: change its \
                         bounds instead (berth deploy --min-replicas/--max-replicas)",
                        autoscale.fewest(),
                        autoscale.max
                    )));
                }
                let before = spec.replicas();
                if before == replicas {
                    return Ok::<_, ApiError>(None);
                }
                spec.replicas = Some(replicas);
                Ok(Some(event(
                    &name,
                    "AgentScaled",
                    format!("scaled from {before} to {replicas} replica(s)"),
                )))
            })
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    type WatchEventsStream = BoxStream<Event>;

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> ApiResult<Self::WatchEventsStream> {
        let request = request.into_inner();
        let agent = Some(request.agent).filter(|a| !a.is_empty());
        if let Some(agent) = &agent {
            validate::dns_label("agent", agent).map_err(|e| to_status(e.into()))?;
        }
        if request.since_revision < 0 {
            return Err(invalid("since_revision", "must not be negative"));
        }
        let events = self.store.watch_events(
            EventFilter { agent },
            request.since_revision,
            request.follow,
        );
        let stream = ReceiverStream::new(events).map(|item| item.map_err(|e| to_status(e.into())));
        Ok(Response::new(Box::pin(stream)))
    }

    type StreamLogsStream = BoxStream<LogChunk>;

    async fn stream_logs(
        &self,
        request: Request<StreamLogsRequest>,
    ) -> ApiResult<Self::StreamLogsStream> {
        let request = request.into_inner();
        let name = request.name;
        validate::dns_label("name", &name).map_err(|e| to_status(e.into()))?;
        if !request.replica.is_empty() {
            validate::dns_label("replica", &request.replica).map_err(|e| to_status(e.into()))?;
        }
        self.store
            .get_agent(&name)
            .await
            .map_err(|e| to_status(e.into()))?;
        let (placements, _) = self
            .store
            .list_placements(None)
            .await
            .map_err(|e| to_status(e.into()))?;
        let mut targets: Vec<LogTarget> = placements
            .into_iter()
            .filter(|p| p.assignment.spec.as_ref().is_some_and(|s| s.name == name))
            .filter(|p| request.replica.is_empty() || p.assignment.replica == request.replica)
            .map(|p| LogTarget {
                node: p.node,
                replica: p.assignment.replica,
            })
            .collect();
        targets.sort_by(|a, b| a.replica.cmp(&b.replica));
        if targets.is_empty() {
            return Err(to_status(ApiError::FailedPrecondition(
                if request.replica.is_empty() {
                    format!("agent {name} has no replica placed on a node, so there are no logs")
                } else {
                    format!("agent {name} has no replica {}", request.replica)
                },
            )));
        }
        let (reachable, unreachable): (Vec<_>, Vec<_>) = targets
            .into_iter()
            .partition(|t| self.sessions.connected(&t.node));
        if reachable.is_empty() {
            let nodes: Vec<_> = unreachable.iter().map(|t| t.node.as_str()).collect();
            return Err(Status::unavailable(format!(
                "the node(s) running agent {name} ({}) are not connected to this control plane",
                nodes.join(", ")
            )));
        }
        for t in &unreachable {
            tracing::info!(agent = %name, replica = %t.replica, node = %t.node, "no logs: node not connected");
        }
        let logs = self
            .sessions
            .open_logs(&reachable, request.follow, request.tail);
        Ok(Response::new(Box::pin(logs)))
    }
}

fn event(agent: &str, reason: &str, message: String) -> Event {
    Event {
        agent: agent.to_string(),
        reason: reason.to_string(),
        message,
        severity: EventSeverity::Normal as i32,
        time: Some(now()),
        ..Default::default()
    }
}

fn invalid(field: &str, reason: &str) -> Status {
    to_status(
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
        .into(),
    )
}

fn state_word(state: DesiredState) -> &'static str {
    match state {
        DesiredState::Running | DesiredState::Unspecified => "running",
        DesiredState::Stopped => "stopped",
        DesiredState::Paused => "paused",
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
