//! Output formats: tables for people; JSON and YAML in protobuf's canonical JSON mapping, the
//! shape every other client of the API sees.

use clap::ValueEnum;
use comfy_table::presets::NOTHING;
use comfy_table::{Cell, Table};
use serde::Serialize;

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
        Format::Json | Format::Table => println!("{}", serde_json::to_string_pretty(value)?),
        Format::Yaml => print!("{}", serde_yaml::to_string(&serde_json::to_value(value)?)?),
    }
    Ok(())
}

/// Prints one item of a stream: a JSON line, or a YAML document.
pub fn print_stream_item<T: Serialize>(format: Format, value: &T) -> anyhow::Result<()> {
    match format {
        Format::Json | Format::Table => println!("{}", serde_json::to_string(value)?),
        Format::Yaml => print!(
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
