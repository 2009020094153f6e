//! What the benchmarks share: a kept-alive HTTP/1.1 client connection, and writing a
//! benchmark's section of BENCHMARKS.md.
#![forbid(unsafe_code)]

use berth_tests::docker::{http, DockerRun, ECHO_IMAGE};
use berth_tests::eventually;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// A new request for `agent`'s queue, as a gateway stores one (`POST /slow` with `body`), with a
/// positional id: what the benchmarks write through `Store::enqueue_request` without a gateway.
pub fn queued_request(agent: String, body: Vec<u8>) -> berth_proto::v1::Request {
    berth_proto::v1::Request {
        id: berth_proto::request::positional_id(&agent, berth_store::requests::new_seq()),
        agent,
        state: berth_proto::v1::RequestState::Queued as i32,
        method: "POST".into(),
        path: "/slow".into(),
        body,
        ..Default::default()
    }
}

/// The CPU time (user and system) process `pid` has used so far, from /proc.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').ok_or_else(|| anyhow::anyhow!("bad stat"))? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10)) // USER_HZ is 100 on Linux
}

/// One kept-alive HTTP/1.1 connection.
pub struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl Conn {
    /// Connects to `addr`.
    pub async fn open(addr: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Self {
            sender,
            host: addr.to_string(),
        })
    }

    /// `GET path`; the status, once the body is read.
    pub async fn get(&mut self, path: &str) -> anyhow::Result<u16> {
        self.send(http::Method::GET, path, Bytes::new()).await
    }

    /// `POST path` with `body`; the status, once the response body is read.
    pub async fn post(&mut self, path: &str, body: Bytes) -> anyhow::Result<u16> {
        self.send(http::Method::POST, path, body).await
    }

    async fn send(&mut self, method: http::Method, path: &str, body: Bytes) -> anyhow::Result<u16> {
        Ok(self.request(method, path, &[], body).await?.0)
    }

    /// `method path` with `headers` and `body`; the status and the response body.
    pub async fn request(
        &mut self,
        method: http::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> anyhow::Result<(u16, Bytes)> {
        self.sender.ready().await?;
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.host);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = self
            .sender
            .send_request(request.body(Full::new(body))?)
            .await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// Replaces the section `name` of BENCHMARKS.md (between `<!-- name:start -->` and
/// `<!-- name:end -->`) with `report`, stamped with the time and the command that measured it;
/// a missing section is appended under `heading`.
pub fn write_report(name: &str, heading: &str, report: &str) -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
    let (start, end) = (
        format!("<!-- {name}:start -->"),
        format!("<!-- {name}:end -->"),
    );
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let section = format!(
        "{start}\n_Measured {} with `{}`._\n\n{report}{end}",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        this_command()
    );
    let text = match (text.find(&start), text.find(&end)) {
        (Some(a), Some(b)) => format!("{}{section}{}", &text[..a], &text[b + end.len()..]),
        _ => format!("{text}\n## {heading}\n\n{section}\n"),
    };
    std::fs::write(&path, text)?;
    println!("written to {}", path.display());
    Ok(())
}

/// How this benchmark was started, as it is run from the repository: its binary under
/// `target/release/`, then its arguments (`target/release/replay --soak`).
fn this_command() -> String {
    let mut args = std::env::args();
    let binary = args.next().unwrap_or_default();
    let name = Path::new(&binary)
        .file_name()
        .map_or_else(|| binary.clone(), |n| n.to_string_lossy().into_owned());
    std::iter::once(format!("target/release/{name}"))
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `runs` times [`docker_run_to_healthy`], once the node agent of `run` has made its network.
pub async fn docker_run_reference(run: &DockerRun, runs: usize) -> anyhow::Result<Vec<Duration>> {
    eventually(Duration::from_secs(60), "the node agent's network", || {
        let made = Command::new("docker")
            .args(["network", "inspect", &run.network])
            .output()
            .is_ok_and(|o| o.status.success());
        async move { made.then_some(()) }
    })
    .await?;
    let mut times = Vec::new();
    for _ in 0..runs {
        times.push(docker_run_to_healthy(run).await?);
    }
    Ok(times)
}

/// `docker run -d` of the example image on `run`'s network until its `/health` answers: the
/// reference for starting a replica (what no orchestrator can beat on this machine).
pub async fn docker_run_to_healthy(run: &DockerRun) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let out = Command::new("docker")
        .args(["run", "-d", "--network", &run.network, "--label"])
        .arg(format!("berth.test={}", run.id))
        .arg(ECHO_IMAGE)
        .output()?;
    anyhow::ensure!(out.status.success(), "docker run: {out:?}");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let ip = run.inspect(
        &id,
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
    );
    let address = format!("{ip}:8080");
    eventually(Duration::from_secs(60), "the reference container", || {
        let address = address.clone();
        async move {
            http(&address, "GET", "/health")
                .await
                .filter(|(c, _)| *c == 200)
        }
    })
    .await?;
    let elapsed = started.elapsed();
    Command::new("docker").args(["rm", "-f", &id]).output()?;
    Ok(elapsed)
}
