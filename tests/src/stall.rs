//! A network path that a test can stall: a TCP relay to one address that, while stalled,
//! forwards nothing either way and leaves new connections unanswered, as a link that drops
//! every packet does. Nothing is refused, reset or closed, so the peers see silence, not an
//! error: the fault that only timeouts and leases can detect.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The relay, on a thread of its own (so that a test blocking its own runtime does not stall
/// it); it stops, closing every connection through it, when dropped.
pub struct StallProxy {
    /// `127.0.0.1:PORT` to connect to instead of the target.
    pub addr: String,
    stalled: watch::Sender<bool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StallProxy {
    /// Relays connections on a free loopback port to `target` (`host:port`).
    pub fn start(target: &str) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?.to_string();
        let (stalled, flag) = watch::channel(false);
        let target = target.to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = TcpListener::from_std(listener) else {
                    return;
                };
                let mut connections = JoinSet::new();
                let accepting = async {
                    while let Ok((client, _)) = listener.accept().await {
                        let (target, stalled) = (target.clone(), flag.clone());
                        connections.spawn(relay(client, target, stalled));
                    }
                };
                tokio::select! {
                    _ = accepting => {}
                    _ = stopped => {}
                }
            });
        });
        Ok(Self {
            addr,
            stalled,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `http://` and the relay's address.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on nothing passes, in either direction, on any connection.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Lets everything held back pass again.
    pub fn heal(&self) {
        self.stalled.send_replace(false);
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn relay(client: TcpStream, target: String, mut stalled: watch::Receiver<bool>) {
    // A connection made during a stall is left waiting until it heals.
    if stalled.wait_for(|s| !*s).await.is_err() {
        return;
    }
    let Ok(server) = TcpStream::connect(&target).await else {
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let ((client_in, client_out), (server_in, server_out)) =
        (client.into_split(), server.into_split());
    let up = pump(client_in, server_out, stalled.clone());
    let down = pump(server_in, client_out, stalled);
    // Either side closing ends the relay of both.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Copies `from` to `to`, holding each piece read while the path is stalled until it heals.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if stalled.wait_for(|s| !*s).await.is_err() {
            return Ok(());
        }
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        if stalled.wait_for(|s| !*s).await.is_err() {
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
    }
}
