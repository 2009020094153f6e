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
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).expect("the CA file") {
        roots
            .add(cert.expect("a PEM certificate"))
            .expect("a CA certificate");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let ip: std::net::SocketAddr = addr.parse().expect("an IP:port address");
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connect to the gateway");
    let name = rustls_pki_types::ServerName::IpAddress(ip.ip().into());
    let stream = connector.connect(name, tcp).await.expect("a TLS handshake");
    exchange(stream, addr, head, body).await
}

async fn exchange<S>(mut stream: S, addr: &str, head: &str, body: &[u8]) -> Raw
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request = format!(
        "{head}\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // A server may answer (413, say) and close before reading a large body: read anyway.
    let _ = stream.write_all(body).await;
    read_response(&mut stream).await
}

/// Reads a response until the server closes the connection (within 30 s).
pub async fn read_response<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Raw {
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .expect("response within 30s");
    if let Err(e) = read {
        assert!(!raw.is_empty(), "no response: {e}");
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Raw {
        status: head[9..12].parse().unwrap(),
        head,
        body,
    }
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
