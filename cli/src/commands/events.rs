//! `berth events`: what happened, optionally following new events.

use crate::client::Client;
use crate::output::{print_stream_item, Format};
use berth_proto::v1::{EventSeverity, WatchEventsRequest};
use futures::StreamExt;

/// Prints retained events after `since`, then new ones with `follow`.
pub async fn watch(
    client: &Client,
    agent: Option<String>,
    since: i64,
    follow: bool,
    format: Format,
) -> anyhow::Result<()> {
    let request = WatchEventsRequest {
        agent: agent.unwrap_or_default(),
        since_revision: since,
        follow,
    };
    let mut stream = client
        .agents()
        .watch_events(request)
        .await
        .map_err(|s| client.explain(s))?
        .into_inner();
    if format == Format::Table {
        outln!(
            "{:<10} {:<24} {:<16} {:<8} {:<24} MESSAGE",
            "REVISION",
            "TIME",
            "AGENT",
            "TYPE",
            "REASON"
        );
    }
    while let Some(event) = stream.next().await {
        let event = event.map_err(|s| client.explain(s))?;
        if format != Format::Table {
            print_stream_item(format, &event)?;
            continue;
        }
        let time = event
            .time
            .as_ref()
            .map(|t| {
                let at =
                    std::time::UNIX_EPOCH + std::time::Duration::new(t.seconds.max(0) as u64, 0);
                humantime::format_rfc3339_seconds(at).to_string()
            })
            .unwrap_or_default();
        let kind = match EventSeverity::try_from(event.severity) {
            Ok(EventSeverity::Warning) => "Warning",
            _ => "Normal",
        };
        outln!(
            "{:<10} {:<24} {:<16} {:<8} {:<24} {}",
            event.revision,
            time,
            event.agent,
            kind,
            event.reason,
            event.message
        );
    }
    Ok(())
}
