//! `berth token create|ls|revoke`: API tokens with scopes.

use crate::client::Client;
use crate::output::{print_object, table, Format};
use berth_proto::v1::{CreateTokenRequest, ListTokensRequest, RevokeTokenRequest, TokenScope};
use clap::{Subcommand, ValueEnum};

/// What a new token may do.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ScopeArg {
    /// Everything.
    Admin,
    /// Get, list, watch and logs only.
    ReadOnly,
    /// The node-agent stream only, as the node given with --node.
    Node,
}

impl From<ScopeArg> for TokenScope {
    fn from(scope: ScopeArg) -> Self {
        match scope {
            ScopeArg::Admin => TokenScope::Admin,
            ScopeArg::ReadOnly => TokenScope::ReadOnly,
            ScopeArg::Node => TokenScope::Node,
        }
    }
}

/// `berth token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Create a token and print it (once: only its hash is kept).
    Create {
        /// What it may do.
        #[arg(long, value_enum)]
        scope: ScopeArg,
        /// For node tokens: the node name it may connect as.
        #[arg(long, required_if_eq("scope", "node"))]
        node: Option<String>,
        /// Who or what uses it.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List the tokens (never their secrets).
    Ls,
    /// Revoke a token: refused from then on.
    Revoke {
        /// The token's id (`bt_...`).
        id: String,
    },
}

fn scope_word(scope: i32) -> &'static str {
    match TokenScope::try_from(scope) {
        Ok(TokenScope::Admin) => "admin",
        Ok(TokenScope::ReadOnly) => "read-only",
        Ok(TokenScope::Node) => "node",
        _ => "-",
    }
}

/// Runs a token command.
pub async fn run(client: &Client, action: TokenAction, format: Format) -> anyhow::Result<()> {
    let mut tokens = client.tokens();
    match action {
        TokenAction::Create {
            scope,
            node,
            description,
        } => {
            let created = tokens
                .create_token(CreateTokenRequest {
                    scope: TokenScope::from(scope) as i32,
                    node: node.unwrap_or_default(),
                    description,
                })
                .await
                .map_err(|s| client.explain(s))?
                .into_inner();
            if format != Format::Table {
                return print_object(format, &created);
            }
            let token = created.token.unwrap_or_default();
            eprintln!(
                "token/{} created ({}); it is shown once, keep it now:",
                token.id,
                scope_word(token.scope)
            );
            outln!("{}", created.secret);
        }
        TokenAction::Ls => {
            let listed = tokens
                .list_tokens(ListTokensRequest {})
                .await
                .map_err(|s| client.explain(s))?
                .into_inner();
            if format != Format::Table {
                return print_object(format, &listed);
            }
            let mut out = table(&["ID", "SCOPE", "NODE", "CREATED", "DESCRIPTION"]);
            for t in &listed.tokens {
                let created = t
                    .create_time
                    .as_ref()
                    .map(|c| {
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH
                                + std::time::Duration::new(c.seconds.max(0) as u64, 0),
                        )
                        .to_string()
                    })
                    .unwrap_or_else(|| "-".into());
                out.add_row(vec![
                    t.id.clone(),
                    scope_word(t.scope).to_string(),
                    if t.node.is_empty() {
                        "-".into()
                    } else {
                        t.node.clone()
                    },
                    created,
                    t.description.clone(),
                ]);
            }
            outln!("{out}");
        }
        TokenAction::Revoke { id } => {
            let revoked = tokens
                .revoke_token(RevokeTokenRequest { id })
                .await
                .map_err(|s| client.explain(s))?
                .into_inner();
            outln!("token/{} revoked", revoked.id);
        }
    }
    Ok(())
}
