//! `berth logs`: a container's output, read from Docker by the node agent and relayed by the
//! control plane.

use crate::client::Client;
use crate::output::{print_stream_item, Format};
use berth_proto::v1::{LogStream, StreamLogsRequest};
use futures::StreamExt;
use std::collections::HashMap;
use std::io::Write;

/// Prints the output of an agent's replicas (or one of them), then, with `follow`, new output
/// until interrupted. With several replicas each line starts with `[replica] `.
pub async fn stream(
    client: &Client,
    name: String,
    replica: Option<String>,
    follow: bool,
    tail: u32,
    format: Format,
) -> anyhow::Result<()> {
    let prefix = replica.is_none();
    let request = StreamLogsRequest {
        name,
        replica: replica.unwrap_or_default(),
        follow,
        tail,
    };
    let mut chunks = client
        .agents()
        .stream_logs(request)
        .await
        .map_err(|s| client.explain(s))?
        .into_inner();
    let mut lines = Prefixer::default();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|s| client.explain(s))?;
        if format != Format::Table {
            print_stream_item(format, &chunk)?;
            continue;
        }
        let text = if prefix {
            lines.prefix(&chunk.replica, &chunk.data)
        } else {
            chunk.data
        };
        let written = if chunk.stream == LogStream::Stderr as i32 {
            std::io::stderr().write_all(&text)
        } else {
            std::io::stdout().write_all(&text)
        };
        // A closed pipe (`berth logs x | head`) ends the command quietly.
        if written.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Puts `[replica] ` at the start of every line, remembering per replica whether its last
/// chunk ended mid-line.
#[derive(Default)]
struct Prefixer {
    mid_line: HashMap<String, bool>,
}

impl Prefixer {
    fn prefix(&mut self, replica: &str, data: &[u8]) -> Vec<u8> {
        let tag = format!("[{replica}] ");
        let mid_line = self.mid_line.entry(replica.to_string()).or_default();
        let mut out = Vec::with_capacity(data.len() + tag.len());
        for &byte in data {
            if !*mid_line {
                out.extend_from_slice(tag.as_bytes());
                *mid_line = true;
            }
            out.push(byte);
            if byte == b'\n' {
                *mid_line = false;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Prefixer;

    #[test]
    fn prefixes_every_line_across_chunks() {
        let mut p = Prefixer::default();
        let mut out = p.prefix("a-0", b"one\ntw");
        out.extend(p.prefix("a-1", b"x\n"));
        out.extend(p.prefix("a-0", b"o\nthree\n"));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[a-0] one\n[a-0] tw[a-1] x\no\n[a-0] three\n"
        );
    }
}
