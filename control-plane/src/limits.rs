//! Connection limits and deadlines of the control plane's listeners.
//!
//! Both ports are reachable before anyone has authenticated, so a client
//! that opens connections and then trickles (or sends nothing) must not be
//! able to hold them: every connection takes a permit from a global and a
//! per-IP budget, the TLS handshake and the HTTP request head have
//! deadlines, and permits are given back when the connection closes.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Deadlines and connection budgets of the gRPC and HTTP listeners.
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    /// An HTTP request head (and the TLS handshake on gRPC) must arrive
    /// within this time.
    pub header_timeout: Duration,
    /// An HTTP request body must arrive within this time.
    pub body_timeout: Duration,
    /// An HTTP connection is closed after this long, busy or not; the
    /// operator API is request/response, so nothing needs longer.
    pub http_connection_lifetime: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            http_connection_lifetime: Duration::from_secs(300),
            max_connections: 1024,
            max_connections_per_ip: 64,
        }
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Hands out connection permits within the global and per-IP budgets.
#[derive(Clone)]
pub struct ConnLimiter {
    counts: Arc<Mutex<Counts>>,
    max: usize,
    max_per_ip: usize,
}

/// Held for the life of one connection.
pub struct ConnPermit {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

impl ConnLimiter {
    pub fn new(limits: &ListenerLimits) -> Self {
        ConnLimiter {
            counts: Arc::default(),
            max: limits.max_connections.max(1),
            max_per_ip: limits.max_connections_per_ip.max(1),
        }
    }

    /// A permit, or `None` when either budget is spent.
    pub fn try_acquire(&self, ip: IpAddr) -> Option<ConnPermit> {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let of_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
        if c.total >= self.max || of_ip >= self.max_per_ip {
            return None;
        }
        c.total += 1;
        c.per_ip.insert(ip, of_ip + 1);
        Some(ConnPermit {
            counts: self.counts.clone(),
            ip,
        })
    }
}

/// A TCP connection that gives its permit back when dropped.
pub struct LimitedStream {
    inner: TcpStream,
    _permit: ConnPermit,
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for LimitedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepts connections within the limiter's budgets; connections over
/// budget are closed at once (logged at debug: a flood must not flood the
/// log too).
pub async fn accept(
    listener: &TcpListener,
    limiter: &ConnLimiter,
) -> io::Result<(LimitedStream, SocketAddr)> {
    loop {
        let (stream, peer) = listener.accept().await?;
        match limiter.try_acquire(peer.ip()) {
            Some(permit) => {
                // Without TCP_NODELAY a pushed snapshot waits on Nagle +
                // delayed ACK (~40 ms per hop on Linux).
                let _ = stream.set_nodelay(true);
                return Ok((
                    LimitedStream {
                        inner: stream,
                        _permit: permit,
                    },
                    peer,
                ));
            }
            None => tracing::debug!(%peer, "connection refused: connection limit reached"),
        }
    }
}

/// [`accept`] as the stream of connections tonic serves.
pub fn incoming(
    listener: TcpListener,
    limiter: ConnLimiter,
) -> impl Stream<Item = io::Result<LimitedStream>> + Send + 'static {
    futures::stream::unfold((listener, limiter), |(listener, limiter)| async move {
        let r = accept(&listener, &limiter).await.map(|(s, _)| s);
        if r.is_err() {
            // Out of descriptors, typically: do not spin on the error.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some((r, (listener, limiter)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_respect_both_budgets_and_come_back() {
        let limiter = ConnLimiter::new(&ListenerLimits {
            max_connections: 3,
            max_connections_per_ip: 2,
            ..ListenerLimits::default()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = limiter.try_acquire(a).unwrap();
        let _p2 = limiter.try_acquire(a).unwrap();
        assert!(limiter.try_acquire(a).is_none(), "per-IP budget");
        let _p3 = limiter.try_acquire(b).unwrap();
        assert!(limiter.try_acquire(b).is_none(), "global budget");
        drop(p1);
        assert!(limiter.try_acquire(a).is_some());
    }
}
