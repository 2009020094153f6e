//! `berth`: the client commands, and Berth's servers as subcommands.
#![forbid(unsafe_code)]

/// `print!` to standard output through [`output::write_out`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write_out(format!($($arg)*).as_bytes())
    };
}

/// `println!` to standard output through [`output::write_out`].
macro_rules! outln {
    () => {
        $crate::output::write_out(b"\n")
    };
    ($($arg:tt)*) => {
        $crate::output::write_out(format!("{}\n", format_args!($($arg)*)).as_bytes())
    };
}

mod certs;
mod client;
mod commands;
mod config;
mod output;
mod servers;
mod up;

/// mimalloc: the gateway allocates per request (headers, buffers), and glibc's malloc showed
/// up at about 6% of its CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use berth_proto::v1::ReplicaState;
use berth_proto::{manifest, quantity};
use clap::{Parser, Subcommand};
use client::Client;
use commands::agents::{self, Verb};
use commands::deploy::DeployArgs;
use output::Format;
use std::path::PathBuf;
use std::process::ExitCode;

/// The control plane's address when neither --addr, BERTH_ADDR nor the CLI config sets one.
const DEFAULT_ADDR: &str = "http://127.0.0.1:7070";

/// Berth runs AI agents in containers across hosts, keeps them alive, and loses no request.
#[derive(Parser, Debug)]
#[command(name = "berth", version, about)]
struct Cli {
    /// The control plane's gRPC address; several, comma-separated, are tried in turn
    /// (default: the CLI config's, which `berth up` writes, else http://127.0.0.1:7070).
    #[arg(long, global = true, env = "BERTH_ADDR")]
    addr: Option<String>,
    /// The API token (an admin token from the control plane's token file; default: the CLI
    /// config's).
    #[arg(long, global = true, env = "BERTH_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// PEM CA to verify `https://` control planes with (default: the CLI config's `ca`).
    #[arg(long, global = true, env = "BERTH_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create an agent from flags.
    Deploy(Box<DeployArgs>),
    /// Create or update the agents in a YAML manifest (`-` reads standard input).
    Apply {
        /// The manifest file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        wait: commands::wait::WaitArgs,
    },
    /// Write every agent as a manifest `berth apply -f` accepts (secrets `<redacted>` unless
    /// --include-secrets).
    Export(commands::export::ExportArgs),
    /// List agents.
    #[command(alias = "list")]
    Ls,
    /// Show an agent: spec, replicas and conditions.
    Get {
        /// The agent's name.
        name: String,
    },
    /// Delete agents.
    #[command(alias = "delete")]
    Rm {
        /// The agents' names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Start stopped agents.
    Start {
        #[arg(required = true)]
        names: Vec<String>,
        #[command(flatten)]
        wait: commands::wait::WaitArgs,
    },
    /// Stop agents (SIGTERM, then SIGKILL after the stop grace).
    Stop {
        #[arg(required = true)]
        names: Vec<String>,
        #[command(flatten)]
        wait: commands::wait::HaltWaitArgs,
    },
    /// Pause agents (freeze their processes).
    Pause {
        #[arg(required = true)]
        names: Vec<String>,
        #[command(flatten)]
        wait: commands::wait::HaltWaitArgs,
    },
    /// Resume paused agents.
    Resume {
        #[arg(required = true)]
        names: Vec<String>,
        #[command(flatten)]
        wait: commands::wait::WaitArgs,
    },
    /// Restart every replica of agents.
    Restart {
        #[arg(required = true)]
        names: Vec<String>,
        #[command(flatten)]
        wait: commands::wait::WaitArgs,
    },
    /// Set an agent's number of replicas.
    Scale {
        /// The agent's name.
        name: String,
        /// The new number of replicas.
        replicas: u32,
        #[command(flatten)]
        wait: commands::wait::WaitArgs,
    },
    /// Show events, oldest first.
    Events {
        /// Only this agent's events.
        name: Option<String>,
        /// Keep printing new events.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only events after this revision (from a previous event).
        #[arg(long, default_value_t = 0)]
        since: i64,
    },
    /// Print an agent's container output (stdout and stderr).
    Logs {
        /// The agent's name.
        name: String,
        /// Keep printing new output.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Start with the last N lines of each replica (0: all).
        #[arg(long, default_value_t = 0)]
        tail: u32,
        /// Only this replica, e.g. `hello-1`.
        #[arg(long)]
        replica: Option<String>,
    },
    /// List the nodes: status, capacity, what is placed on them (`--denied`: the deny list).
    Nodes {
        /// List the denied node names instead, with since when and why.
        #[arg(long)]
        denied: bool,
    },
    /// Deny a node name, for a lost node certificate or a compromised host: its node-agent
    /// stream is refused (certificate or token alike) and an open one ends within a second;
    /// its replicas are placed elsewhere.
    Deny {
        name: String,
        /// Why, for whoever reads the deny list later.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Take a node name off the deny list.
    Allow { name: String },
    /// Stop placing new replicas on nodes (what runs there stays).
    Cordon {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Cordon nodes and move their replicas elsewhere, each replacement ready before the old
    /// replica stops; waits until they are drained.
    Drain {
        #[arg(required = true)]
        names: Vec<String>,
        /// How long to wait for the replicas to move (e.g. 90s, 5m).
        #[arg(long, default_value = "5m", value_parser = quantity::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Let new replicas be placed on nodes again (also ends a drain).
    Uncordon {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// API tokens with scopes: `berth token create --scope admin|read-only|node`, `ls`, `revoke ID`.
    Token {
        #[command(subcommand)]
        action: commands::tokens::TokenAction,
    },
    /// The replay queue: `berth requests [NAME] [--state S] [--limit N] [--page-token T]`, or
    /// `show|retry|drop ID`.
    #[command(args_conflicts_with_subcommands = true)]
    Requests {
        #[command(subcommand)]
        action: Option<commands::requests::RequestAction>,
        /// Only this agent's requests.
        name: Option<String>,
        /// Only requests in this state.
        #[arg(long, value_enum)]
        state: Option<commands::requests::StateArg>,
        /// Most requests shown (a page; at most 1000).
        #[arg(long, default_value_t = commands::requests::DEFAULT_LIMIT)]
        limit: u32,
        /// Go on from where a previous page ended (the token it printed).
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Run the control plane.
    ControlPlane(Box<servers::ControlPlaneArgs>),
    /// Make a private CA and certificates for the servers and node agents (TLS and mTLS).
    Certs(certs::CertsArgs),
    /// Berth on this host, all in one: etcd (unless --etcd), a control plane, a gateway and
    /// a node agent; writes the CLI's config; Ctrl-C stops them.
    Up(Box<up::UpArgs>),
    /// Run a node agent: drives this host's Docker engine for the control plane.
    NodeAgent(Box<servers::NodeAgentArgs>),
    /// Run a gateway: HTTP at /agents/{name}/... to ready replicas.
    Gateway(Box<servers::GatewayArgs>),
    /// Print the shell completion script: `source <(berth completion bash)`, or put `berth
    /// completion zsh` in a file on $fpath as `_berth`, `berth completion fish` in
    /// ~/.config/fish/completions/berth.fish.
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // SIGPIPE stays ignored (Rust's default): a command's output piped into `head` ends
    // quietly through `output::write_out`, and a peer that hangs up is an error, not a death.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<commands::wait::WaitFailed>() {
                Some(failed) => ExitCode::from(failed.exit_code()),
                None => ExitCode::FAILURE,
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let format = cli.output;
    let command = match cli.command {
        Command::ControlPlane(args) => return servers::control_plane(*args).await,
        Command::NodeAgent(args) => return servers::node_agent(*args).await,
        Command::Gateway(args) => return servers::gateway(*args).await,
        Command::Up(args) => return up::up(*args).await,
        Command::Certs(args) => return certs::run(args),
        Command::Completion { shell } => {
            let mut script = Vec::new();
            completion(shell, &mut script);
            output::write_out(&script);
            return Ok(());
        }
        command => command,
    };
    // Parse local input before connecting, so that a bad flag or manifest fails fast.
    let specs = match &command {
        Command::Deploy(args) => {
            let spec = args
                .to_manifest()
                .into_spec()
                .map_err(|e| anyhow::anyhow!("invalid {}: {}", e.field, e.reason))?;
            Some(vec![spec])
        }
        Command::Apply { file, .. } => Some(read_manifest(file)?),
        _ => None,
    };
    let config = config::CliConfig::load(&config::CliConfig::path()?)?;
    let addr = cli
        .addr
        .or(config.address)
        .unwrap_or_else(|| DEFAULT_ADDR.to_string());
    let token = cli.api_token.or(config.token);
    let tls = servers::client_tls(cli.tls_ca.or(config.ca).as_deref(), None)?;
    let client = Client::connect(
        &addr,
        token.as_deref().filter(|t| !t.is_empty()),
        tls.as_ref(),
    )
    .await?;
    match command {
        Command::Deploy(args) => {
            let spec = specs.and_then(|mut s| s.pop()).expect("parsed above");
            let name = spec.name.clone();
            agents::create(&client, spec, format).await?;
            args.wait.each(&client, &[name]).await
        }
        Command::Apply { wait, .. } => {
            let specs = specs.expect("parsed above");
            let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
            agents::apply(&client, specs, format).await?;
            wait.each(&client, &names).await
        }
        Command::Export(args) => commands::export::run(&client, args).await,
        Command::Ls => agents::list(&client, format).await,
        Command::Get { name } => agents::get(&client, name, format).await,
        Command::Rm { names } => agents::remove(&client, names).await,
        Command::Start { names, wait } => {
            agents::lifecycle(&client, Verb::Start, &names, format).await?;
            wait.each(&client, &names).await
        }
        Command::Stop { names, wait } => {
            agents::lifecycle(&client, Verb::Stop, &names, format).await?;
            wait.each(&client, &names, ReplicaState::Stopped).await
        }
        Command::Pause { names, wait } => {
            agents::lifecycle(&client, Verb::Pause, &names, format).await?;
            wait.each(&client, &names, ReplicaState::Paused).await
        }
        Command::Resume { names, wait } => {
            agents::lifecycle(&client, Verb::Resume, &names, format).await?;
            wait.each(&client, &names).await
        }
        Command::Restart { names, wait } => {
            agents::lifecycle(&client, Verb::Restart, &names, format).await?;
            wait.each(&client, &names).await
        }
        Command::Scale {
            name,
            replicas,
            wait,
        } => {
            agents::scale(&client, name.clone(), replicas, format).await?;
            wait.each(&client, &[name]).await
        }
        Command::Events {
            name,
            follow,
            since,
        } => commands::events::watch(&client, name, since, follow, format).await,
        Command::Nodes { denied: false } => commands::nodes::list(&client, format).await,
        Command::Nodes { denied: true } => commands::nodes::list_denied(&client, format).await,
        Command::Deny { name, reason } => commands::nodes::deny(&client, name, reason).await,
        Command::Allow { name } => commands::nodes::allow(&client, name).await,
        Command::Cordon { names } => commands::nodes::cordon(&client, names, true).await,
        Command::Uncordon { names } => commands::nodes::cordon(&client, names, false).await,
        Command::Token { action } => commands::tokens::run(&client, action, format).await,
        Command::Drain { names, timeout } => commands::nodes::drain(&client, names, timeout).await,
        Command::Requests {
            action: Some(action),
            ..
        } => commands::requests::act(&client, action, format).await,
        Command::Requests {
            action: None,
            name,
            state,
            limit,
            page_token,
        } => {
            let page = commands::requests::Page { limit, page_token };
            commands::requests::list(&client, name, state, page, format).await
        }
        Command::Logs {
            name,
            follow,
            tail,
            replica,
        } => commands::logs::stream(&client, name, replica, follow, tail, format).await,
        Command::ControlPlane(_)
        | Command::NodeAgent(_)
        | Command::Gateway(_)
        | Command::Up(_)
        | Command::Certs(_)
        | Command::Completion { .. } => {
            unreachable!("handled above")
        }
    }
}

/// Writes the completion script of every command and flag for `shell`.
fn completion(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    use clap::CommandFactory;
    clap_complete::generate(shell, &mut Cli::command(), "berth", out);
}

fn read_manifest(file: &PathBuf) -> anyhow::Result<Vec<berth_proto::v1::AgentSpec>> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?
    };
    manifest::parse_all(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(shell: clap_complete::Shell) -> String {
        let mut out = Vec::new();
        completion(shell, &mut out);
        String::from_utf8(out).expect("a script is text")
    }

    #[test]
    fn completion_scripts_name_the_commands_and_their_flags() {
        use clap_complete::Shell;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = script(shell);
            for word in [
                "deploy",
                "requests",
                "replicas",
                "health-endpoint",
                "completion",
            ] {
                assert!(text.contains(word), "{shell}: no {word}");
            }
        }
        // Sourced in bash, it completes a command, then a flag of that command.
        let path = std::env::temp_dir().join(format!("berth-completion-{}", std::process::id()));
        std::fs::write(&path, script(Shell::Bash)).unwrap();
        let complete = format!(
            "source {}; \
             COMP_WORDS=(berth dep); COMP_CWORD=1; _berth berth dep berth; echo \"${{COMPREPLY[@]}}\"; \
             COMP_WORDS=(berth deploy --repl); COMP_CWORD=2; _berth berth --repl deploy; echo \"${{COMPREPLY[@]}}\"",
            path.display()
        );
        let completed = std::process::Command::new("bash")
            .arg("-c")
            .arg(complete)
            .output();
        let _ = std::fs::remove_file(&path);
        let completed = completed.expect("bash runs");
        let lines = String::from_utf8_lossy(&completed.stdout).into_owned();
        let lines: Vec<&str> = lines.lines().collect();
        assert!(completed.status.success(), "{completed:?}");
        assert_eq!(lines[0], "deploy", "{lines:?}");
        assert!(lines[1].split(' ').any(|w| w == "--replicas"), "{lines:?}");
    }
}
