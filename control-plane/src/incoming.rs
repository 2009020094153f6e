//! The gRPC server's client connections, guarded: at most so many open at once (one more is
//! closed at once), and each must send its first bytes (the HTTP/2 preface or the start of a
//! TLS handshake) within a deadline, so that clients that connect and stay silent cannot pile
//! up. What a connection may do after that is bounded by HTTP/2 settings and keep-alive pings
//! (`server.rs`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bytes a new connection must send before [`FIRST_BYTES_TIMEOUT`]: the length of the HTTP/2
/// client preface (a TLS ClientHello is longer).
pub const FIRST_BYTES: usize = 24;
/// Time a new connection has to send its first [`FIRST_BYTES`] bytes.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// An accepted connection holding one of the server's connection permits.
pub struct Guarded {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    /// Bytes still owed before the deadline, and the deadline; `None` once they came.
    first: Option<(usize, Pin<Box<Sleep>>)>,
}

/// Accepted connections of `listener`, at most `max` open at once: beyond it a connection is
/// closed as soon as it is accepted (and counted in the log at debug level).
pub fn guarded(
    listener: TcpListener,
    max: usize,
) -> impl futures::Stream<Item = io::Result<Guarded>> {
    let permits = Arc::new(Semaphore::new(max));
    futures::stream::unfold((listener, permits), |(listener, permits)| async move {
        loop {
            let (io, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => return Some((Err(e), (listener, permits))),
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "connection refused: too many open");
                continue;
            };
            let _ = io.set_nodelay(true);
            let first = Some((
                FIRST_BYTES,
                Box::pin(tokio::time::sleep(FIRST_BYTES_TIMEOUT)),
            ));
            let guarded = Guarded {
                io,
                _permit: permit,
                first,
            };
            return Some((Ok(guarded), (listener, permits)));
        }
    })
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                if let Some((owed, _)) = &mut this.first {
                    *owed = owed.saturating_sub(read);
                    if *owed == 0 {
                        this.first = None;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = match &mut this.first {
                    Some((_, deadline)) => deadline.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no preface within {FIRST_BYTES_TIMEOUT:?}"),
                    )));
                }
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
