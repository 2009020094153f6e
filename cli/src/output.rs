//! Output formats: tables for people; JSON and YAML in protobuf's canonical JSON mapping, the
//! shape every other client of the API sees.

use clap::ValueEnum;
use comfy_table::presets::NOTHING;
use comfy_table::{Cell, Table};
use serde::Serialize;
use std::io::Write;

/// Writes to standard output (the `out!` and `outln!` macros). A reader that went away, as in
/// `berth ls | head -1`, ends the command at once with success, as a Unix tool ends; any other
/// failure to write ends it with an error. SIGPIPE stays ignored (Rust's default): a
/// connection the control plane resets is then an error the command reports, not a silent
/// death by signal (tokio writes sockets with `writev`, which would raise it).
pub fn write_out(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

/// `-o table|json|yaml`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable columns.
    #[default]
    Table,
    /// Canonical protobuf JSON.
    Json,
    /// The same object as YAML.
    Yaml,
}

/// Prints `value` as JSON or YAML (callers handle `Table`).
pub fn print_object<T: Serialize>(format: Format, value: &T) -> anyhow::Result<()> {
    match format {
        Format::Json | Format::Table => outln!("{}", serde_json::to_string_pretty(value)?),
        Format::Yaml => out!("{}", serde_yaml::to_string(&serde_json::to_value(value)?)?),
    }
    Ok(())
}

/// Prints one item of a stream: a JSON line, or a YAML document.
pub fn print_stream_item<T: Serialize>(format: Format, value: &T) -> anyhow::Result<()> {
    match format {
        Format::Json | Format::Table => outln!("{}", serde_json::to_string(value)?),
        Format::Yaml => out!(
            "---\n{}",
            serde_yaml::to_string(&serde_json::to_value(value)?)?
        ),
    }
    Ok(())
}

/// A borderless table with a header row, like `docker ps`.
pub fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(NOTHING);
    table.set_header(header.iter().map(Cell::new));
    table
}
