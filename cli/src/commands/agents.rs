//! Agent commands: deploy, apply, ls, get, rm, the lifecycle verbs and scale.

use crate::client::Client;
use crate::output::{print_object, table, Format};
use berth_proto::v1::{
    Agent, AgentActionRequest, AgentSpec, BreakerState, ConditionStatus, CreateAgentRequest,
    DeleteAgentRequest, DesiredState, GetAgentRequest, ListAgentsRequest, ReplicaState,
    ScaleAgentRequest, UpdateAgentRequest,
};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::Code;

/// Creates an agent from a spec.
pub async fn create(client: &Client, spec: AgentSpec, format: Format) -> anyhow::Result<()> {
    let agent = client
        .agents()
        .create_agent(CreateAgentRequest {
            spec: Some(spec),
            desired_state: DesiredState::Running as i32,
        })
        .await
        .map_err(|s| client.explain(s))?
        .into_inner();
    match format {
        Format::Table => outln!("agent/{} created (generation 1)", name_of(&agent)),
        _ => print_object(format, &agent)?,
    }
    Ok(())
}

/// Creates each agent that does not exist and updates each that does.
pub async fn apply(client: &Client, specs: Vec<AgentSpec>, format: Format) -> anyhow::Result<()> {
    let mut api = client.agents();
    for spec in specs {
        let name = spec.name.clone();
        let current = api
            .get_agent(GetAgentRequest {
                name: name.clone(),
                ..Default::default()
            })
            .await;
        let (agent, verb) = match current {
            Err(status) if status.code() == Code::NotFound => {
                let request = CreateAgentRequest {
                    spec: Some(spec),
                    desired_state: DesiredState::Running as i32,
                };
                let agent = api
                    .create_agent(request)
                    .await
                    .map_err(|s| client.explain(s))?;
                (agent.into_inner(), "created")
            }
            Err(status) => return Err(client.explain(status)),
            Ok(current) => {
                let current = current.into_inner();
                let meta = current.meta.clone().unwrap_or_default();
                let request = UpdateAgentRequest {
                    spec: Some(spec),
                    resource_version: meta.resource_version,
                };
                let agent = api
                    .update_agent(request)
                    .await
                    .map_err(|s| client.explain(s))?
                    .into_inner();
                let changed = agent.meta.as_ref().map(|m| m.generation) != Some(meta.generation);
                (agent, if changed { "configured" } else { "unchanged" })
            }
        };
        match format {
            Format::Table => outln!("agent/{name} {verb} (generation {})", generation(&agent)),
            _ => print_object(format, &agent)?,
        }
    }
    Ok(())
}

/// Lists agents.
pub async fn list(client: &Client, format: Format) -> anyhow::Result<()> {
    let list = client
        .agents()
        .list_agents(ListAgentsRequest::default())
        .await
        .map_err(|s| client.explain(s))?
        .into_inner();
    if format != Format::Table {
        return print_object(format, &list);
    }
    let mut out = table(&["NAME", "IMAGE", "STATE", "READY", "GENERATION", "AGE"]);
    for agent in &list.agents {
        let spec = agent.spec.clone().unwrap_or_default();
        let status = agent.status.clone().unwrap_or_default();
        out.add_row(vec![
            spec.name.clone(),
            spec.image.clone(),
            desired_word(agent).to_string(),
            format!("{}/{}", status.ready_replicas, spec.replicas()),
            generation(agent).to_string(),
            age(agent.meta.as_ref().and_then(|m| m.create_time.as_ref())),
        ]);
    }
    outln!("{out}");
    Ok(())
}

/// Shows one agent.
pub async fn get(client: &Client, name: String, format: Format) -> anyhow::Result<()> {
    let agent = client
        .agents()
        .get_agent(GetAgentRequest {
            name,
            ..Default::default()
        })
        .await
        .map_err(|s| client.explain(s))?
        .into_inner();
    if format != Format::Table {
        return print_object(format, &agent);
    }
    let spec = agent.spec.clone().unwrap_or_default();
    let meta = agent.meta.clone().unwrap_or_default();
    let status = agent.status.clone().unwrap_or_default();
    outln!("Name:        {}", spec.name);
    outln!("Image:       {}", spec.image);
    outln!("State:       {}", desired_word(&agent));
    outln!(
        "Replicas:    {} ready of {}",
        status.ready_replicas,
        spec.replicas()
    );
    outln!(
        "Generation:  {} (observed {})",
        meta.generation,
        status.observed_generation
    );
    if let Some(autoscale) = &spec.autoscale {
        let after = autoscale
            .scale_to_zero_after
            .as_ref()
            .and_then(berth_proto::time::std_duration)
            .unwrap_or_default();
        outln!(
            "Autoscale:   {}-{} replicas, target concurrency {}{}",
            autoscale.fewest(),
            autoscale.max,
            autoscale.target_concurrency,
            if autoscale.fewest() == 0 {
                format!(", to zero after {}", humantime::format_duration(after))
            } else {
                String::new()
            }
        );
        if let Some(view) = &status.autoscale {
            outln!(
                "Autoscaler:  {} desired{}: {}",
                view.desired_replicas,
                if view.panic { " (panic)" } else { "" },
                view.reason
            );
            if let Some(since) = &view.idle_since {
                let at = UNIX_EPOCH + Duration::from_secs(since.seconds.max(0) as u64);
                outln!(
                    "Idle:        for {} (since {})",
                    age(Some(since)),
                    humantime::format_rfc3339_seconds(at)
                );
            }
        }
    }
    outln!("Port:        {}", spec.port);
    if let Some((queued, dead)) = queue_depth(client, &spec.name).await {
        outln!("Requests:    {queued} queued for replay, {dead} dead-lettered");
    }
    if let Some(health) = &spec.health {
        outln!("Health:      GET {}", health.path);
    }
    // Secret values never reach the CLI: the control plane sends `<redacted>`.
    let mut env: Vec<_> = spec.env.iter().chain(&spec.secret_env).collect();
    env.sort();
    for (i, (key, value)) in env.iter().enumerate() {
        outln!(
            "{}{key}={value}",
            if i == 0 {
                "Env:         "
            } else {
                "             "
            }
        );
    }
    if !spec.gateway_token_sha256.is_empty() {
        outln!("Gateway:     token required");
    }
    outln!("Age:         {}", age(meta.create_time.as_ref()));
    if !status.replicas.is_empty() {
        let mut replicas = table(&[
            "REPLICA",
            "NODE",
            "CONTAINER",
            "STATE",
            "READY",
            "RESTARTS",
            "LAST EXIT",
            "ADDRESS",
            "BREAKER",
        ]);
        for r in &status.replicas {
            replicas.add_row(vec![
                r.replica.clone(),
                r.node.clone(),
                r.container_id.chars().take(12).collect(),
                replica_word(r.state),
                r.ready.to_string(),
                r.restarts.to_string(),
                match (r.last_exit_code, r.oom_killed) {
                    (Some(c), true) => format!("{c} (OOMKilled)"),
                    (None, true) => "OOMKilled".into(),
                    (Some(c), false) => c.to_string(),
                    (None, false) => String::new(),
                },
                r.address.clone(),
                breaker_word(r.breaker).to_string(),
            ]);
        }
        outln!("\n{replicas}");
        // Why a replica is as it is (stopping, restarting, failed), one line each.
        for r in status.replicas.iter().filter(|r| !r.message.is_empty()) {
            outln!(" {}: {}", r.replica, r.message);
        }
    }
    if !status.conditions.is_empty() {
        let mut conditions = table(&["CONDITION", "STATUS", "REASON", "MESSAGE"]);
        for c in &status.conditions {
            let word = match ConditionStatus::try_from(c.status) {
                Ok(ConditionStatus::True) => "True",
                Ok(ConditionStatus::False) => "False",
                _ => "Unknown",
            };
            conditions.add_row(vec![
                c.r#type.clone(),
                word.into(),
                c.reason.clone(),
                c.message.clone(),
            ]);
        }
        outln!("\n{conditions}");
    }
    Ok(())
}

/// Deletes agents.
pub async fn remove(client: &Client, names: Vec<String>) -> anyhow::Result<()> {
    let mut api = client.agents();
    for name in names {
        api.delete_agent(DeleteAgentRequest {
            name: name.clone(),
            resource_version: String::new(),
        })
        .await
        .map_err(|s| client.explain(s))?;
        outln!("agent/{name} deleted");
    }
    Ok(())
}

/// A lifecycle verb.
#[derive(Clone, Copy, Debug)]
pub enum Verb {
    Start,
    Stop,
    Pause,
    Resume,
    Restart,
}

/// Applies a lifecycle verb to agents.
pub async fn lifecycle(
    client: &Client,
    verb: Verb,
    names: &[String],
    format: Format,
) -> anyhow::Result<()> {
    let mut api = client.agents();
    for name in names {
        let request = AgentActionRequest { name: name.clone() };
        let result = match verb {
            Verb::Start => api.start_agent(request).await,
            Verb::Stop => api.stop_agent(request).await,
            Verb::Pause => api.pause_agent(request).await,
            Verb::Resume => api.resume_agent(request).await,
            Verb::Restart => api.restart_agent(request).await,
        };
        let agent = result.map_err(|s| client.explain(s))?.into_inner();
        let done = match verb {
            Verb::Start => "started",
            Verb::Stop => "stopped",
            Verb::Pause => "paused",
            Verb::Resume => "resumed",
            Verb::Restart => "restarting",
        };
        match format {
            Format::Table => outln!("agent/{name} {done} (generation {})", generation(&agent)),
            _ => print_object(format, &agent)?,
        }
    }
    Ok(())
}

/// Sets an agent's replica count.
pub async fn scale(
    client: &Client,
    name: String,
    replicas: u32,
    format: Format,
) -> anyhow::Result<()> {
    let agent = client
        .agents()
        .scale_agent(ScaleAgentRequest {
            name: name.clone(),
            replicas,
        })
        .await
        .map_err(|s| client.explain(s))?
        .into_inner();
    match format {
        Format::Table => outln!(
            "agent/{name} scaled to {replicas} (generation {})",
            generation(&agent)
        ),
        _ => print_object(format, &agent)?,
    }
    Ok(())
}

fn name_of(agent: &Agent) -> &str {
    agent
        .spec
        .as_ref()
        .map(|s| s.name.as_str())
        .unwrap_or_default()
}

fn generation(agent: &Agent) -> i64 {
    agent
        .meta
        .as_ref()
        .map(|m| m.generation)
        .unwrap_or_default()
}

fn desired_word(agent: &Agent) -> &'static str {
    let state = agent
        .meta
        .as_ref()
        .map(|m| m.desired_state)
        .unwrap_or_default();
    let idle = agent
        .spec
        .as_ref()
        .is_some_and(|s| s.autoscale.is_some() && s.replicas == Some(0));
    match DesiredState::try_from(state) {
        Ok(DesiredState::Stopped) => "stopped",
        Ok(DesiredState::Paused) => "paused",
        _ if idle => "idle",
        _ => "running",
    }
}

fn replica_word(state: i32) -> String {
    let name = ReplicaState::try_from(state)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN");
    name.trim_start_matches("REPLICA_STATE_").to_lowercase()
}

/// Time since `time`, in the largest whole unit (`42s`, `5m`, `3h`, `2d`).
pub fn age(time: Option<&pbjson_types::Timestamp>) -> String {
    let Some(time) = time else { return "-".into() };
    let then = UNIX_EPOCH + Duration::new(time.seconds.max(0) as u64, time.nanos.max(0) as u32);
    let secs = SystemTime::now()
        .duration_since(then)
        .unwrap_or_default()
        .as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

/// A breaker state as `berth get` shows it; `-` until a gateway has sent to the replica.
fn breaker_word(state: i32) -> &'static str {
    match BreakerState::try_from(state) {
        Ok(BreakerState::Closed) => "closed",
        Ok(BreakerState::Open) => "open",
        Ok(BreakerState::HalfOpen) => "half-open",
        _ => "-",
    }
}

/// How many of the agent's requests wait for replay and how many were dead-lettered; `None`
/// when the control plane cannot tell (an older one without `RequestService`).
async fn queue_depth(client: &Client, agent: &str) -> Option<(usize, usize)> {
    let requests = client.requests();
    let count = |state: berth_proto::v1::RequestState| {
        let request = berth_proto::v1::ListRequestsRequest {
            agent: agent.to_string(),
            state: state as i32,
            limit: 1000,
            page_token: String::new(),
        };
        let mut requests = requests.clone();
        async move {
            let listed = requests.list_requests(request).await.ok()?.into_inner();
            Some(listed.requests.len())
        }
    };
    let queued = count(berth_proto::v1::RequestState::Queued).await?
        + count(berth_proto::v1::RequestState::Delivering).await?;
    let dead = count(berth_proto::v1::RequestState::Dead).await?;
    Some((queued, dead))
}
