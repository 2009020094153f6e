//! `berth export`: every agent as a manifest that `berth apply -f` accepts, one YAML document
//! each, sorted by name. Secret values are `<redacted>` unless asked for (admin tokens only);
//! a gateway token goes by its hash, which `berth apply` restores as it is.

use crate::client::Client;
use berth_proto::manifest::Manifest;
use berth_proto::v1::{GetAgentRequest, ListAgentsRequest};
use std::path::PathBuf;

/// Flags of `berth export`.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Write to this file (readable by the owner only) instead of standard output.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Write secret values instead of `<redacted>` (needs an admin token).
    #[arg(long)]
    pub include_secrets: bool,
}

/// Runs `berth export`.
pub async fn run(client: &Client, args: ExportArgs) -> anyhow::Result<()> {
    let mut api = client.agents();
    let listed = api
        .list_agents(ListAgentsRequest::default())
        .await
        .map_err(|s| client.explain(s))?
        .into_inner();
    let mut specs = Vec::new();
    for agent in listed.agents {
        let Some(mut spec) = agent.spec else { continue };
        if args.include_secrets && !spec.secret_env.is_empty() {
            let full = api
                .get_agent(GetAgentRequest {
                    name: spec.name.clone(),
                    include_secrets: true,
                })
                .await
                .map_err(|s| client.explain(s))?
                .into_inner();
            spec = full.spec.unwrap_or(spec);
        }
        specs.push(spec);
    }
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    let mut text = format!(
        "# berth export: {} agent(s); `berth apply -f` recreates them.\n",
        specs.len()
    );
    for spec in &specs {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(&Manifest::from_spec(spec))?);
    }
    match &args.file {
        Some(path) => {
            crate::up::write_private(path, &text)?;
            eprintln!("{} agent(s) written to {}", specs.len(), path.display());
        }
        None => out!("{text}"),
    }
    Ok(())
}
