//! Agents in etcd: the spec and metadata at `agents/{name}`, status apart at `status/{name}`.

use super::{decode, Store, StoreError};
use berth_proto::time::now;
use berth_proto::v1::{Agent, AgentSecrets, AgentStatus, AutoscaleStatus, Event};
use etcd_client::{
    Compare, CompareOp, GetOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};
use prost::Message;
use std::collections::HashMap;

/// Read-modify-write attempts of an unconditional update before it gives up with a conflict.
const MAX_CAS_ATTEMPTS: usize = 5;
const KIND: &str = "agent";

impl Store {
    /// Creates `agent` (generation 1) with its `secrets`, and records `event`, in one
    /// transaction.
    pub async fn create_agent(
        &self,
        mut agent: Agent,
        secrets: &AgentSecrets,
        event: Event,
    ) -> Result<Agent, StoreError> {
        let name = spec_name(&agent);
        let key = self.keys.agent(&name);
        let secrets_op = self.secrets_op(&name, secrets);
        let meta = agent.meta.get_or_insert_with(Default::default);
        meta.generation = 1;
        meta.create_time = Some(now());
        meta.update_time = meta.create_time;
        meta.resource_version.clear();
        agent.status = None;
        let txn = |event_op: TxnOp| {
            Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([
                    TxnOp::put(key.as_str(), agent.encode_to_vec(), None),
                    secrets_op.clone(),
                    event_op,
                ])
        };
        let resp = self.commit_with_event(&event, txn).await?;
        if !resp.succeeded() {
            return Err(StoreError::AlreadyExists { kind: KIND, name });
        }
        agent.meta.as_mut().expect("set above").resource_version = resp
            .header()
            .map(|h| h.revision().to_string())
            .unwrap_or_default();
        agent.status = Some(AgentStatus::default());
        Ok(agent)
    }

    /// Reads one agent with its status.
    pub async fn get_agent(&self, name: &str) -> Result<Agent, StoreError> {
        let txn = Txn::new().and_then([
            TxnOp::get(self.keys.agent(name), None),
            TxnOp::get(self.keys.status(name), None),
            TxnOp::get(self.keys.autoscale(name), None),
        ]);
        let resp = self
            .client()
            .txn(txn)
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut ranges = resp.op_responses().into_iter().filter_map(|op| match op {
            TxnOpResponse::Get(get) => Some(get),
            _ => None,
        });
        let (Some(agents), Some(statuses), Some(autoscale)) =
            (ranges.next(), ranges.next(), ranges.next())
        else {
            unreachable!("a transaction of three gets answers three gets")
        };
        let kv = agents.kvs().first().ok_or_else(|| StoreError::NotFound {
            kind: KIND,
            name: name.to_string(),
        })?;
        let mut agent = stored_agent(kv)?;
        let mut status: AgentStatus = match statuses.kvs().first() {
            Some(kv) => decode(kv.key(), kv.value())?,
            None => AgentStatus::default(),
        };
        status.autoscale = match autoscale.kvs().first() {
            Some(kv) => Some(decode(kv.key(), kv.value())?),
            None => None,
        };
        agent.status = Some(status);
        Ok(agent)
    }

    /// Lists every agent with its status, sorted by name, and the store revision of the list.
    pub async fn list_agents(&self) -> Result<(Vec<Agent>, i64), StoreError> {
        let by_key = || {
            GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Key, SortOrder::Ascend)
        };
        let txn = Txn::new().and_then([
            TxnOp::get(self.keys.agents(), Some(by_key())),
            TxnOp::get(self.keys.statuses(), Some(by_key())),
            TxnOp::get(self.keys.autoscales(), Some(by_key())),
        ]);
        let resp = self
            .client()
            .txn(txn)
            .await
            .map_err(|e| self.unavailable(e))?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        let mut ranges = resp.op_responses().into_iter().filter_map(|op| match op {
            TxnOpResponse::Get(get) => Some(get),
            _ => None,
        });
        let (Some(agents), Some(statuses), Some(autoscales)) =
            (ranges.next(), ranges.next(), ranges.next())
        else {
            unreachable!("a transaction of three gets answers three gets")
        };
        let mut autoscales: HashMap<String, AutoscaleStatus> = by_name(autoscales.kvs())?;
        let mut statuses: HashMap<String, AgentStatus> = by_name(statuses.kvs())?;
        let agents = agents
            .kvs()
            .iter()
            .map(|kv| {
                let mut agent = stored_agent(kv)?;
                let name = spec_name(&agent);
                let mut status = statuses.remove(&name).unwrap_or_default();
                status.autoscale = autoscales.remove(&name);
                agent.status = Some(status);
                Ok(agent)
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok((agents, revision))
    }

    /// Read-modify-write of an agent. `change` edits the agent and returns the event to record,
    /// `None` when nothing changed (then nothing is written), or an error that aborts the
    /// update. A change bumps `generation`.
    ///
    /// With `expected` set, the write applies only at that resource version (one attempt);
    /// without it, a lost compare-and-swap is retried on the fresh value.
    pub async fn update_agent<F, E>(
        &self,
        name: &str,
        expected: Option<&str>,
        mut change: F,
    ) -> Result<Agent, E>
    where
        F: FnMut(&mut Agent) -> Result<Option<Event>, E>,
        E: From<StoreError>,
    {
        self.update_agent_with(name, expected, false, |agent, _| change(agent))
            .await
    }

    /// [`Store::update_agent`] that may also replace the agent's secrets: `change` gets them
    /// too, and what it leaves there is written in the same transaction.
    pub async fn update_agent_and_secrets<F, E>(
        &self,
        name: &str,
        expected: Option<&str>,
        mut change: F,
    ) -> Result<Agent, E>
    where
        F: FnMut(&mut Agent, &mut AgentSecrets) -> Result<Option<Event>, E>,
        E: From<StoreError>,
    {
        self.update_agent_with(name, expected, true, |agent, secrets| {
            change(agent, secrets.expect("read when asked for"))
        })
        .await
    }

    /// The update loop; the secrets are read, handed to `change` and written back only when
    /// `with_secrets` (a run-state change or a scale neither reads nor rewrites them).
    async fn update_agent_with<F, E>(
        &self,
        name: &str,
        expected: Option<&str>,
        with_secrets: bool,
        mut change: F,
    ) -> Result<Agent, E>
    where
        F: FnMut(&mut Agent, Option<&mut AgentSecrets>) -> Result<Option<Event>, E>,
        E: From<StoreError>,
    {
        let key = self.keys.agent(name);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let mut secrets = match with_secrets {
                true => Some(self.agent_secrets(name).await?),
                false => None,
            };
            let current = self.get_agent(name).await?;
            let current_version = resource_version(&current).to_string();
            if let Some(expected) = expected {
                if expected != current_version {
                    return Err(conflict(name, current_version).into());
                }
            }
            let mut agent = current.clone();
            let Some(event) = change(&mut agent, secrets.as_mut())? else {
                return Ok(current);
            };
            let secrets_op = secrets.as_ref().map(|s| self.secrets_op(name, s));
            let status = agent.status.take();
            let meta = agent.meta.get_or_insert_with(Default::default);
            meta.generation += 1;
            meta.update_time = Some(now());
            meta.resource_version.clear();
            let mod_revision: i64 = current_version.parse().unwrap_or_default();
            let txn = |event_op: TxnOp| {
                Txn::new()
                    .when([Compare::mod_revision(
                        key.as_str(),
                        CompareOp::Equal,
                        mod_revision,
                    )])
                    .and_then(
                        [TxnOp::put(key.as_str(), agent.encode_to_vec(), None)]
                            .into_iter()
                            .chain(secrets_op.clone())
                            .chain([event_op])
                            .collect::<Vec<_>>(),
                    )
            };
            let resp = self.commit_with_event(&event, txn).await?;
            if resp.succeeded() {
                agent.status = status;
                agent.meta.as_mut().expect("set above").resource_version = resp
                    .header()
                    .map(|h| h.revision().to_string())
                    .unwrap_or_default();
                return Ok(agent);
            }
            if expected.is_some() {
                return Err(conflict(name, "newer".into()).into());
            }
        }
        Err(conflict(name, "newer".into()).into())
    }

    /// Deletes an agent and its status, recording `event`, optionally only at `expected` version.
    pub async fn delete_agent(
        &self,
        name: &str,
        expected: Option<&str>,
        event: Event,
    ) -> Result<(), StoreError> {
        let key = self.keys.agent(name);
        let compare = match expected {
            Some(version) => {
                let revision = version
                    .parse()
                    .map_err(|_| conflict(name, "unknown".into()))?;
                Compare::mod_revision(key.as_str(), CompareOp::Equal, revision)
            }
            None => Compare::create_revision(key.as_str(), CompareOp::Greater, 0),
        };
        let status_key = self.keys.status(name);
        let secrets_key = self.keys.secrets(name);
        let autoscale_key = self.keys.autoscale(name);
        let txn = |event_op: TxnOp| {
            Txn::new().when([compare.clone()]).and_then([
                TxnOp::delete(key.as_str(), None),
                TxnOp::delete(status_key.as_str(), None),
                TxnOp::delete(secrets_key.as_str(), None),
                TxnOp::delete(autoscale_key.as_str(), None),
                event_op,
            ])
        };
        let resp = self.commit_with_event(&event, txn).await?;
        if resp.succeeded() {
            return Ok(());
        }
        match self.get_agent(name).await {
            Ok(current) => Err(conflict(name, resource_version(&current).to_string())),
            Err(e) => Err(e),
        }
    }
}

impl Store {
    /// An agent's secrets (none stored: empty).
    pub async fn agent_secrets(&self, name: &str) -> Result<AgentSecrets, StoreError> {
        let resp = self
            .client()
            .get(self.keys.secrets(name), None)
            .await
            .map_err(|e| self.unavailable(e))?;
        match resp.kvs().first() {
            Some(kv) => decode(kv.key(), kv.value()),
            None => Ok(AgentSecrets::default()),
        }
    }

    /// Every agent's secrets, by agent name.
    pub async fn all_agent_secrets(&self) -> Result<HashMap<String, AgentSecrets>, StoreError> {
        let resp = self
            .client()
            .get(
                self.keys.all_secrets(),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| self.unavailable(e))?;
        resp.kvs()
            .iter()
            .map(|kv| {
                Ok((
                    super::Keys::last_segment(kv.key()),
                    decode(kv.key(), kv.value())?,
                ))
            })
            .collect()
    }

    /// Writes `secrets` of `name`, or removes the key when there are none.
    fn secrets_op(&self, name: &str, secrets: &AgentSecrets) -> TxnOp {
        let key = self.keys.secrets(name);
        if secrets.env.is_empty() {
            TxnOp::delete(key, None)
        } else {
            TxnOp::put(key, secrets.encode_to_vec(), None)
        }
    }
}

/// Values under a prefix, decoded, by the name their keys end with.
fn by_name<T: Message + Default>(
    kvs: &[etcd_client::KeyValue],
) -> Result<HashMap<String, T>, StoreError> {
    kvs.iter()
        .map(|kv| {
            Ok((
                super::Keys::last_segment(kv.key()),
                decode(kv.key(), kv.value())?,
            ))
        })
        .collect()
}

fn stored_agent(kv: &etcd_client::KeyValue) -> Result<Agent, StoreError> {
    let mut agent: Agent = decode(kv.key(), kv.value())?;
    agent
        .meta
        .get_or_insert_with(Default::default)
        .resource_version = kv.mod_revision().to_string();
    Ok(agent)
}

fn spec_name(agent: &Agent) -> String {
    agent
        .spec
        .as_ref()
        .map(|s| s.name.clone())
        .unwrap_or_default()
}

fn resource_version(agent: &Agent) -> &str {
    agent
        .meta
        .as_ref()
        .map(|m| m.resource_version.as_str())
        .unwrap_or_default()
}

fn conflict(name: &str, current: String) -> StoreError {
    StoreError::Conflict {
        kind: KIND,
        name: name.to_string(),
        current,
    }
}
