//! The key layout in etcd (docs/architecture.md, "Key layout in etcd"). Every key Berth writes is built here.

/// Key builder bound to one prefix (default `/berth`).
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix`; a trailing `/` is ignored.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// `{prefix}/agents/{name}`: the spec and metadata.
    pub fn agent(&self, name: &str) -> String {
        format!("{}/agents/{name}", self.prefix)
    }

    /// `{prefix}/secrets/{name}`: an agent's secret values, apart from its spec.
    pub fn secrets(&self, name: &str) -> String {
        format!("{}/secrets/{name}", self.prefix)
    }

    /// `{prefix}/secrets/`: every agent's secrets.
    pub fn all_secrets(&self) -> String {
        format!("{}/secrets/", self.prefix)
    }

    /// `{prefix}/tokens/{id}`: an API token's record and hash.
    pub fn token(&self, id: &str) -> String {
        format!("{}/tokens/{id}", self.prefix)
    }

    /// `{prefix}/tokens/`: every API token.
    pub fn tokens(&self) -> String {
        format!("{}/tokens/", self.prefix)
    }

    /// `{prefix}/agents/`: every agent.
    pub fn agents(&self) -> String {
        format!("{}/agents/", self.prefix)
    }

    /// `{prefix}/status/{name}`: observed status, apart from the spec.
    pub fn status(&self, name: &str) -> String {
        format!("{}/status/{name}", self.prefix)
    }

    /// `{prefix}/status/`: every status.
    pub fn statuses(&self) -> String {
        format!("{}/status/", self.prefix)
    }

    /// `{prefix}/events/{id}`: one event; ids sort by time.
    pub fn event(&self, id: &str) -> String {
        format!("{}/events/{id}", self.prefix)
    }

    /// `{prefix}/events/`: every retained event.
    pub fn events(&self) -> String {
        format!("{}/events/", self.prefix)
    }

    /// `{prefix}/nodes/{node}`: a node record, attached to the node's session lease.
    pub fn node(&self, node: &str) -> String {
        format!("{}/nodes/{node}", self.prefix)
    }

    /// `{prefix}/nodes/`: every live node.
    pub fn nodes(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    /// `{prefix}/assignments/{node}/{agent}/{replica}`: one placement.
    pub fn assignment(&self, node: &str, agent: &str, replica: &str) -> String {
        format!("{}/assignments/{node}/{agent}/{replica}", self.prefix)
    }

    /// `{prefix}/assignments/{node}/`: what one node should run.
    pub fn node_assignments(&self, node: &str) -> String {
        format!("{}/assignments/{node}/", self.prefix)
    }

    /// `{prefix}/assignments/`: every placement.
    pub fn assignments(&self) -> String {
        format!("{}/assignments/", self.prefix)
    }

    /// `{prefix}/breakers/{agent}/{replica}/{gateway}`: one gateway's breaker state for a
    /// replica, attached to that gateway's lease.
    pub fn breaker(&self, agent: &str, replica: &str, gateway: &str) -> String {
        format!("{}/breakers/{agent}/{replica}/{gateway}", self.prefix)
    }

    /// `{prefix}/breakers/{agent}/`: every gateway's breaker states for an agent.
    pub fn agent_breakers(&self, agent: &str) -> String {
        format!("{}/breakers/{agent}/", self.prefix)
    }

    /// `{prefix}/requests/{agent}/{seq}`: a queued (or finished) request; `seq` is 20 digits,
    /// so keys sort in arrival order.
    pub fn request(&self, agent: &str, seq: u64) -> String {
        format!("{}/requests/{agent}/{seq:020}", self.prefix)
    }

    /// `{prefix}/requests/`: every agent's queue.
    pub fn requests(&self) -> String {
        format!("{}/requests/", self.prefix)
    }

    /// `{prefix}/requests/{agent}/`: one agent's queue.
    pub fn agent_requests(&self, agent: &str) -> String {
        format!("{}/requests/{agent}/", self.prefix)
    }

    /// `{prefix}/request-bodies/{agent}/{seq}`: a request's body, kept apart from its record.
    pub fn request_body(&self, agent: &str, seq: u64) -> String {
        format!("{}/request-bodies/{agent}/{seq:020}", self.prefix)
    }

    /// `{prefix}/request-answers/{agent}/{seq}`: the agent's stored answer to a request.
    pub fn request_answer(&self, agent: &str, seq: u64) -> String {
        format!("{}/request-answers/{agent}/{seq:020}", self.prefix)
    }

    /// `{prefix}/queue/{agent}/{seq}`: there while a request waits (queued or delivering);
    /// holds its body size.
    pub fn queued(&self, agent: &str, seq: u64) -> String {
        format!("{}/queue/{agent}/{seq:020}", self.prefix)
    }

    /// `{prefix}/queue/`: every waiting request, what replayers list and watch.
    pub fn queue(&self) -> String {
        format!("{}/queue/", self.prefix)
    }

    /// `{prefix}/finished/{agent}/{seq}`: there once a request is delivered or dead; holds
    /// the bytes of its body and answer, for retention.
    pub fn finished(&self, agent: &str, seq: u64) -> String {
        format!("{}/finished/{agent}/{seq:020}", self.prefix)
    }

    /// `{prefix}/finished/`: every finished request.
    pub fn all_finished(&self) -> String {
        format!("{}/finished/", self.prefix)
    }

    /// `{prefix}/dead/{agent}/{seq}`: there while a request is dead-lettered (under its
    /// record's lease), so that dead letters are listed without reading every finished record.
    pub fn dead(&self, agent: &str, seq: u64) -> String {
        format!("{}/dead/{agent}/{seq:020}", self.prefix)
    }

    /// `{prefix}/dead/`: every dead-lettered request.
    pub fn all_dead(&self) -> String {
        format!("{}/dead/", self.prefix)
    }

    /// `{prefix}/request-ids/{id}`: the request key of a request id.
    pub fn request_id(&self, id: &str) -> String {
        format!("{}/request-ids/{id}", self.prefix)
    }

    /// `{prefix}/claims/{agent}/{seq}`: the gateway delivering a request, under its lease.
    pub fn claim(&self, agent: &str, seq: u64) -> String {
        format!("{}/claims/{agent}/{seq:020}", self.prefix)
    }

    /// `{prefix}/claims/`: every claim.
    pub fn claims(&self) -> String {
        format!("{}/claims/", self.prefix)
    }

    /// `{prefix}/replayers/{agent}`: the gateway that replays an agent's queue, under its
    /// claim lease.
    pub fn replayer(&self, agent: &str) -> String {
        format!("{}/replayers/{agent}", self.prefix)
    }

    /// `{prefix}/replayers/`: every agent's replaying gateway.
    pub fn replayers(&self) -> String {
        format!("{}/replayers/", self.prefix)
    }

    /// `{prefix}/gateways/{gateway}`: a gateway whose replayer runs, under its claim lease, so
    /// that the gateways share the agents' replay evenly.
    pub fn gateway(&self, gateway: &str) -> String {
        format!("{}/gateways/{gateway}", self.prefix)
    }

    /// `{prefix}/gateways/`: every gateway whose replayer runs.
    pub fn gateways(&self) -> String {
        format!("{}/gateways/", self.prefix)
    }

    /// `{prefix}/idempotency/{agent}/{key_sha256}`: the request an `Idempotency-Key` belongs to.
    pub fn idempotency(&self, agent: &str, key_sha256: &str) -> String {
        format!("{}/idempotency/{agent}/{key_sha256}", self.prefix)
    }

    /// `{prefix}/cordons/{node}`: present while the node is cordoned (kept apart from the node
    /// record, which its heartbeats rewrite).
    pub fn cordon(&self, node: &str) -> String {
        format!("{}/cordons/{node}", self.prefix)
    }

    /// `{prefix}/cordons/`: every cordoned node.
    pub fn cordons(&self) -> String {
        format!("{}/cordons/", self.prefix)
    }

    /// `{prefix}/denied-nodes/{node}`: present while the node name is denied.
    pub fn denied_node(&self, node: &str) -> String {
        format!("{}/denied-nodes/{node}", self.prefix)
    }

    /// `{prefix}/denied-nodes/`: the deny list.
    pub fn denied_nodes(&self) -> String {
        format!("{}/denied-nodes/", self.prefix)
    }

    /// `{prefix}/load/{agent}/{gateway}`: one gateway's load of an autoscaled agent, under
    /// that gateway's lease.
    pub fn load(&self, agent: &str, gateway: &str) -> String {
        format!("{}/load/{agent}/{gateway}", self.prefix)
    }

    /// `{prefix}/load/`: every gateway's load reports.
    pub fn loads(&self) -> String {
        format!("{}/load/", self.prefix)
    }

    /// `{prefix}/autoscale/{agent}`: the autoscaler's status of an agent.
    pub fn autoscale(&self, agent: &str) -> String {
        format!("{}/autoscale/{agent}", self.prefix)
    }

    /// `{prefix}/autoscale/`: every agent's autoscaler status.
    pub fn autoscales(&self) -> String {
        format!("{}/autoscale/", self.prefix)
    }

    /// `{prefix}/migrations/{name}`: there once the change of the stored layout `name` has
    /// been applied to what an earlier version stored.
    pub fn migration(&self, name: &str) -> String {
        format!("{}/migrations/{name}", self.prefix)
    }

    /// `{prefix}/leader`: the control plane that runs the scheduler, under its lease.
    pub fn leader(&self) -> String {
        format!("{}/leader", self.prefix)
    }

    /// The name at the end of a key under one of the prefixes above.
    pub fn last_segment(key: &[u8]) -> String {
        let key = String::from_utf8_lossy(key);
        key.rsplit('/').next().unwrap_or_default().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_design() {
        let keys = Keys::new("/berth/");
        assert_eq!(keys.agent("hello"), "/berth/agents/hello");
        assert_eq!(keys.status("hello"), "/berth/status/hello");
        assert!(keys.agent("hello").starts_with(&keys.agents()));
        assert_eq!(Keys::last_segment(b"/berth/agents/hello"), "hello");
    }
}
