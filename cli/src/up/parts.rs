//! The processes `berth up` starts (its parts), the record it keeps of each in the data
//! directory, and the lock that lets one `berth up` at a time use that directory.
//!
//! A `berth up` that is killed (SIGKILL, OOM) cannot stop its parts: they keep running, holding
//! their ports, and a new `berth up` would fail to bind them. Each part's pid and start time
//! is recorded under `{data}/run/`; the next `berth up` on the same data directory, holding its
//! lock (so the one that started them is gone), stops those still running before it starts its
//! own. The agents' containers are not parts: they keep running and are adopted, as always.

use anyhow::{bail, Context};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long each part may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Time between readiness checks.
const POLL: Duration = Duration::from_millis(200);
/// How long a part may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// A part that exits once Berth is up is started again, unless it has exited this many times
/// within [`RESTART_WINDOW`]: then it crash-loops, and `berth up` stops with its log.
const MAX_RESTARTS: usize = 5;
/// See [`MAX_RESTARTS`].
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// Holds `{data}/up.lock` for this process's life: a second `berth up` on the same data
/// directory is refused. The kernel releases the lock when this process ends, however it ends.
pub struct Lock {
    _file: File,
}

impl Lock {
    /// Takes the lock of `data`, or says which `berth up` holds it.
    pub fn take(data: &Path) -> anyhow::Result<Self> {
        use std::io::{Read, Seek, Write};
        let path = data.join("up.lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        if let Err(e) = file.try_lock() {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            bail!(
                "berth up is already running with the data directory {} (pid {}): stop it \
                 first, or pass another --data-dir ({e})",
                data.display(),
                holder.trim()
            );
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        Ok(Self { _file: file })
    }
}

/// A process as the kernel knows it: its pid and its start time (in clock ticks since boot),
/// so that a pid reused by another process is not mistaken for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    pid: u32,
    started: u64,
}

impl Identity {
    /// The process `pid` if it is running (a zombie has ended).
    fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name, in parentheses, may hold spaces: the fields follow its last ')'.
        let fields: Vec<&str> = stat
            .get(stat.rfind(')')? + 1..)?
            .split_whitespace()
            .collect();
        // Field 3 of proc(5) is the state, field 22 the start time.
        if matches!(fields.first(), Some(&"Z" | &"X")) {
            return None;
        }
        Some(Self {
            pid,
            started: fields.get(19)?.parse().ok()?,
        })
    }

    fn running(&self) -> bool {
        Self::of(self.pid) == Some(*self)
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }

    /// SIGTERM, then SIGKILL after `STOP_TIMEOUT`; returns once it has ended.
    fn stop(&self) {
        self.signal("TERM");
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.running() {
            self.signal("KILL");
            while self.running() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Stops the parts that a `berth up` killed before it could stop them left running, latest
/// started first, as recorded in `run`; the caller holds the data directory's [`Lock`].
pub fn stop_leftovers(run: &Path) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(run) else {
        return Ok(());
    };
    let mut records: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pid"))
        .collect();
    records.sort();
    for record in records.iter().rev() {
        let text = std::fs::read_to_string(record).unwrap_or_default();
        let mut words = text.split_whitespace().map(str::parse::<u64>);
        if let (Some(Ok(pid)), Some(Ok(started))) = (words.next(), words.next()) {
            let left = Identity {
                pid: pid as u32,
                started,
            };
            if left.running() {
                // `{n}-{name}.pid`
                let stem = record.file_stem().unwrap_or_default().to_string_lossy();
                let name = stem.split_once('-').map_or(&*stem, |(_, name)| name);
                eprintln!(
                    "stopping {name} (pid {pid}), left running by a berth up that did not stop it"
                );
                left.stop();
            }
        }
        std::fs::remove_file(record).with_context(|| format!("remove {}", record.display()))?;
    }
    Ok(())
}

/// Starts `command`, its output appended to `log`, and records its identity in `record`.
fn launch(name: &str, command: &mut Command, log: &Path, record: &Path) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("start {name}"))?;
    // Not recorded (no /proc): a killed `berth up` leaves it for its user to stop.
    if let Some(id) = Identity::of(child.id()) {
        if let Err(e) = std::fs::write(record, format!("{} {}\n", id.pid, id.started)) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("record {name} in {}: {e}", record.display());
        }
    }
    Ok(child)
}

/// A started part: its name, its command, its process, its log, and its record under
/// `{data}/run/`.
pub struct Part {
    pub name: &'static str,
    command: Command,
    child: Child,
    log: PathBuf,
    record: PathBuf,
    /// When it was started again after exiting, within the last [`RESTART_WINDOW`].
    restarts: Vec<Instant>,
}

impl Part {
    /// Starts `command` as the `n`th part, its output appended to `{logs}/{name}.log`, and
    /// records it in `run`.
    fn spawn(
        n: usize,
        name: &'static str,
        mut command: Command,
        logs: &Path,
        run: &Path,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(run).with_context(|| format!("create {}", run.display()))?;
        let log = logs.join(format!("{name}.log"));
        let record = run.join(format!("{n}-{name}.pid"));
        let child = launch(name, &mut command, &log, &record)?;
        Ok(Self {
            name,
            command,
            child,
            log,
            record,
            restarts: Vec::new(),
        })
    }

    /// Starts it again if it has exited; an error when it cannot be, or has exited more than
    /// [`MAX_RESTARTS`] times within [`RESTART_WINDOW`].
    fn restart_if_exited(&mut self) -> anyhow::Result<()> {
        let Some(status) = self.child.try_wait()? else {
            return Ok(());
        };
        self.restarts.retain(|t| t.elapsed() < RESTART_WINDOW);
        if self.restarts.len() >= MAX_RESTARTS {
            bail!(
                "{} exited ({status}), {} times within {RESTART_WINDOW:?}; the end of {}:\n{}",
                self.name,
                self.restarts.len() + 1,
                self.log.display(),
                self.tail()
            );
        }
        eprintln!("{} exited ({status}); starting it again", self.name);
        self.restarts.push(Instant::now());
        self.child = launch(self.name, &mut self.command, &self.log, &self.record)?;
        Ok(())
    }

    /// The last lines of its log.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// An error if it has exited.
    pub fn check(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); the end of {}:\n{}",
                self.name,
                self.log.display(),
                self.tail()
            );
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `STOP_TIMEOUT`; then its record goes.
    fn stop(&mut self) {
        // Not yet reaped, so its pid is still its own; then the same stop as a left-over's (a
        // child that has exited meanwhile is a zombie: not running).
        if matches!(self.child.try_wait(), Ok(None)) {
            match Identity::of(self.child.id()) {
                Some(id) => id.stop(),
                None => {
                    let _ = self.child.kill();
                }
            }
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.record);
    }
}

/// Everything started, stopped in reverse order when dropped.
pub struct Parts {
    started: Vec<Part>,
    logs: PathBuf,
    run: PathBuf,
}

impl Drop for Parts {
    fn drop(&mut self) {
        for part in self.started.iter_mut().rev() {
            eprintln!("stopping {}", part.name);
            part.stop();
        }
    }
}

impl Parts {
    /// None started yet; their logs go to `logs`, their records to `run`.
    pub fn new(logs: PathBuf, run: PathBuf) -> Self {
        Self {
            started: Vec::new(),
            logs,
            run,
        }
    }

    /// Starts `command` as the part `name`.
    pub fn start(&mut self, name: &'static str, command: Command) -> anyhow::Result<()> {
        let n = self.started.len();
        let part = Part::spawn(n, name, command, &self.logs, &self.run)?;
        self.started.push(part);
        Ok(())
    }

    /// An error if any part has exited (while Berth comes up).
    pub fn check(&mut self) -> anyhow::Result<()> {
        self.started.iter_mut().try_for_each(Part::check)
    }

    /// Starts again each part that has exited (once Berth is up), as a supervisor would; an
    /// error when one cannot be, or crash-loops.
    pub fn keep_running(&mut self) -> anyhow::Result<()> {
        self.started
            .iter_mut()
            .try_for_each(Part::restart_if_exited)
    }

    /// Polls `ready` until it holds, failing at once if a part exits.
    pub async fn wait_ready<F, Fut>(&mut self, what: &str, mut ready: F) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if ready().await {
                return Ok(());
            }
            self.check()?;
            if Instant::now() > deadline {
                let last = self.started.last().map(Part::tail).unwrap_or_default();
                bail!("{what} was not ready after {READY_TIMEOUT:?}; the end of its log:\n{last}");
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_known_by_its_pid_and_start_time() {
        let me = Identity::of(std::process::id()).expect("this process");
        assert!(me.running());
        let reused = Identity {
            started: me.started + 1,
            ..me
        };
        assert!(!reused.running(), "another process under the same pid");
    }

    #[test]
    fn a_part_that_exits_is_started_again_until_it_crash_loops() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let mut running = Part::spawn(0, "sleep", sleep(), dir.path(), &run).unwrap();
        running.restart_if_exited().unwrap();
        assert!(running.restarts.is_empty(), "a running part is left alone");
        running.stop();
        let mut part = Part::spawn(1, "true", Command::new("true"), dir.path(), &run).unwrap();
        for n in 1..=MAX_RESTARTS {
            let before = part.child.id();
            part.child.wait().unwrap();
            part.restart_if_exited().unwrap();
            assert_eq!(part.restarts.len(), n);
            assert_ne!(part.child.id(), before, "started again");
        }
        part.child.wait().unwrap();
        let looping = part.restart_if_exited().unwrap_err().to_string();
        assert!(looping.contains("6 times within 60s"), "{looping}");
    }

    fn sleep() -> Command {
        let mut command = Command::new("sleep");
        command.arg("600");
        command
    }

    #[test]
    fn leftovers_are_stopped_latest_first_and_their_records_removed() {
        let run = tempfile::tempdir().unwrap();
        let mut sleeper = sleep().spawn().unwrap();
        let id = Identity::of(sleeper.id()).unwrap();
        let record = run.path().join("0-sleep.pid");
        std::fs::write(&record, format!("{} {}\n", id.pid, id.started)).unwrap();
        // A record of a process long gone (its pid now someone else's, or no one's).
        std::fs::write(run.path().join("1-gone.pid"), "1 1\n").unwrap();
        stop_leftovers(run.path()).unwrap();
        assert!(
            sleeper.try_wait().unwrap().is_some(),
            "the left-over is stopped"
        );
        assert!(
            Identity::of(1).is_some(),
            "a pid whose start time differs is left alone"
        );
        assert_eq!(std::fs::read_dir(run.path()).unwrap().count(), 0);
    }
}
