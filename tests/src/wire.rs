//! Raw HTTP/1.1 over TCP for tests that must control every byte: repeated headers, binary
//! bodies, hop-by-hop headers, and reading a stream as it arrives.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response read off the wire.
pub struct Raw {
    /// The status code.
    pub status: u16,
    /// Status line and headers.
    pub head: String,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Raw {
    /// The body as JSON (panics if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// A header value, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// Sends `head` (request line and headers, without the blank line) and `body` on a new
/// connection, and reads the whole response.
pub async fn send(addr: &str, head: &str, body: &[u8]) -> Raw {
    let stream = TcpStream::connect(addr)
        .await
        .expect("connect to the gateway");
    exchange(stream, addr, head, body).await
}

/// [`send`] over TLS, verifying the server (at an IP address) with the PEM CA in `ca`.
pub async fn send_tls(addr: &str, ca: &std::path::Path, head: &str, body: &[u8]) -> Raw {
    let stream = connect_tls(addr, ca).await.expect("a TLS connection");
    exchange(stream, addr, head, body).await
}

/// [`send_tls`], or `None` when no connection is taken or it breaks before a whole response
/// head (a server restarting, say).
pub async fn try_send_tls(
    addr: &str,
    ca: &std::path::Path,
    head: &str,
    body: &[u8],
) -> Option<Raw> {
    let stream = connect_tls(addr, ca).await.ok()?;
    try_exchange(stream, addr, head, body).await
}

/// A TLS connection to `addr` (an IP address and port), verified with the PEM CA in `ca`.
pub async fn connect_tls(
    addr: &str,
    ca: &std::path::Path,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = berth_admin::tls::connector(ca).map_err(std::io::Error::other)?;
    let ip: std::net::SocketAddr = addr.parse().map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::IpAddress(ip.ip().into());
    connector.connect(name, tcp).await
}

/// `GET path` with `Authorization: Bearer token` over TLS verified with the CA `ca`, or over
/// plain HTTP without one; `None` when no connection could be made.
pub async fn get_with_token(
    addr: &str,
    ca: Option<&std::path::Path>,
    path: &str,
    token: Option<&str>,
) -> Option<Raw> {
    let mut head = format!("GET {path} HTTP/1.1");
    if let Some(token) = token {
        head.push_str(&format!("\r\nAuthorization: Bearer {token}"));
    }
    match ca {
        Some(ca) => {
            let stream = connect_tls(addr, ca).await.ok()?;
            try_exchange(stream, addr, &head, b"").await
        }
        None => {
            let stream = TcpStream::connect(addr).await.ok()?;
            try_exchange(stream, addr, &head, b"").await
        }
    }
}

/// `head` with `body` in chunks of `chunk` bytes (`Transfer-Encoding: chunked`, no
/// `Content-Length`), as a client streaming a body of a length it does not know sends it.
pub async fn send_chunked(addr: &str, head: &str, body: &[u8], chunk: usize) -> Raw {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the gateway");
    let mut request = format!(
        "{head}\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for piece in body.chunks(chunk) {
        request.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        request.extend_from_slice(piece);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let _ = stream.write_all(&request).await;
    read_response(&mut stream).await
}

async fn exchange<S>(stream: S, addr: &str, head: &str, body: &[u8]) -> Raw
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    try_exchange(stream, addr, head, body)
        .await
        .expect("a complete response")
}

/// [`exchange`], or `None` when the connection breaks before a whole response head.
async fn try_exchange<S>(mut stream: S, addr: &str, head: &str, body: &[u8]) -> Option<Raw>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request = format!(
        "{head}\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    // A server may answer (413, say) and close before reading a large body: read anyway.
    let _ = stream.write_all(body).await;
    try_read_response(&mut stream).await
}

/// Reads a response until the server closes the connection (within 30 s).
pub async fn read_response<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Raw {
    try_read_response(stream)
        .await
        .expect("a complete response head within 30s")
}

async fn try_read_response<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Option<Raw> {
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .ok()?;
    if read.is_err() && raw.is_empty() {
        return None;
    }
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Some(Raw {
        status: head.get(9..12)?.parse().ok()?,
        head,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(std::str::from_utf8(&data[..end]).unwrap().trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[end + 2 + size + 2..];
    }
}

/// `GET path` on a new connection.
pub async fn get(addr: &str, path: &str) -> Raw {
    send(addr, &format!("GET {path} HTTP/1.1"), b"").await
}

/// Polls `GET path` through the gateway at `addr` until the agent answers 200. The probes opt
/// out of replay: a gateway that has yet to learn of the replica answers 503 instead of
/// queueing a probe, which would then show in the agent's queue and its request log.
pub async fn wait_routed(addr: &str, path: &str) -> anyhow::Result<()> {
    crate::eventually(
        Duration::from_secs(20),
        &format!("the gateway at {addr} to route GET {path} to the agent"),
        || async {
            let head = format!("GET {path} HTTP/1.1\r\nX-Berth-Replay: off");
            (send(addr, &head, b"").await.status == 200).then_some(())
        },
    )
    .await
}
