//! Restart counts that outlive the node agent: a small file in the state directory, one
//! `container-id count` line per container, rewritten atomically (temp file, then rename) on
//! every restart. Without it a node-agent upgrade would reset every replica's count to 0.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// File name in the state directory.
pub const FILE: &str = "restarts";

/// Restart counts by container id.
#[derive(Debug, Default)]
pub struct RestartCounts {
    path: Option<PathBuf>,
    counts: HashMap<String, u32>,
}

impl RestartCounts {
    /// Reads the counts kept in `dir` (none yet is fine), creating `dir` if needed.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let counts = text
            .lines()
            .filter_map(|line| {
                let (id, count) = line.split_once(' ')?;
                Some((id.to_string(), count.trim().parse().ok()?))
            })
            .collect();
        Ok(Self {
            path: Some(path),
            counts,
        })
    }

    /// The count of `container`.
    pub fn get(&self, container: &str) -> u32 {
        self.counts.get(container).copied().unwrap_or_default()
    }

    /// Sets the count of `container` and saves.
    pub fn set(&mut self, container: &str, count: u32) {
        self.counts.insert(container.to_string(), count);
        self.save();
    }

    /// Forgets every container not in `live` and saves.
    pub fn retain(&mut self, live: &[&str]) {
        let before = self.counts.len();
        self.counts.retain(|id, _| live.contains(&id.as_str()));
        if self.counts.len() != before {
            self.save();
        }
    }

    fn save(&self) {
        let Some(path) = &self.path else { return };
        let mut text: Vec<String> = self
            .counts
            .iter()
            .map(|(id, n)| format!("{id} {n}\n"))
            .collect();
        text.sort();
        let tmp = path.with_extension("tmp");
        let written =
            std::fs::write(&tmp, text.concat()).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            // Counting goes on in memory; only a node-agent restart would lose it.
            tracing::warn!(path = %path.display(), error = %e, "cannot save restart counts");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RestartCounts;

    #[test]
    fn counts_survive_a_reopen_and_forget_gone_containers() {
        let dir = tempfile::tempdir().unwrap();
        let mut counts = RestartCounts::open(dir.path()).unwrap();
        counts.set("aaa", 2);
        counts.set("bbb", 5);
        let mut reopened = RestartCounts::open(dir.path()).unwrap();
        assert_eq!((reopened.get("aaa"), reopened.get("bbb")), (2, 5));
        reopened.retain(&["bbb"]);
        let again = RestartCounts::open(dir.path()).unwrap();
        assert_eq!((again.get("aaa"), again.get("bbb")), (0, 5));
    }
}
