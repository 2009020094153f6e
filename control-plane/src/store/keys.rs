//! The key layout in etcd (DESIGN.md, "Key layout"). Every key Berth writes is built here.

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
