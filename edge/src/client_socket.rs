//! The client's TCP socket as the edge hands it to Pingora.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pingora::protocols::l4::virt::{VirtualSockOpt, VirtualSocket};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Writes smaller than this are gathered until a flush; Pingora's own
/// write buffer is as large (one TCP segment).
const GATHER: usize = 1460;

/// A client's TCP socket with a write buffer that exists only while it
/// holds bytes.
///
/// Pingora's HTTP/1 session writes a response's head and body separately
/// and flushes after; gathered, they leave in one `write` and one segment.
/// Pingora's stream would keep a segment-sized buffer for the connection's
/// whole life, idle or streaming; this one is freed at every flush, for an
/// allocation per flush (about 200 instructions, under 1 % of a stream).
///
/// A chunked SSE event reaches it as three writes (size line, data, CRLF):
/// Pingora's virtual-socket wrapper does not pass vectored writes on, so
/// each comes through its own layers, about 1k instructions an event more
/// than Pingora's buffered stream took.
#[derive(Debug)]
pub struct ClientSocket {
    tcp: TcpStream,
    gathered: Vec<u8>,
    /// How much of `gathered` the socket has taken.
    sent: usize,
}

impl ClientSocket {
    pub fn new(tcp: TcpStream) -> Self {
        ClientSocket {
            tcp,
            gathered: Vec::new(),
            sent: 0,
        }
    }

    fn poll_send_gathered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.gathered.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.gathered[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.gathered = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for ClientSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.gathered.len() + buf.len() > GATHER {
            ready!(this.poll_send_gathered(cx))?;
        }
        if buf.len() >= GATHER {
            return Pin::new(&mut this.tcp).poll_write(cx, buf);
        }
        if this.gathered.capacity() == 0 {
            this.gathered.reserve_exact(GATHER);
        }
        this.gathered.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_gathered(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_gathered(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

impl VirtualSocket for ClientSocket {
    fn set_socket_option(&self, option: VirtualSockOpt) -> io::Result<()> {
        match option {
            VirtualSockOpt::NoDelay => self.tcp.set_nodelay(true),
            // Not asked for on client connections.
            _ => Err(io::ErrorKind::Unsupported.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (ClientSocket, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (ClientSocket::new(accepted.unwrap().0), client.unwrap())
    }

    #[tokio::test]
    async fn small_writes_leave_together_at_the_flush_and_the_buffer_goes() {
        let (mut socket, mut peer) = pair().await;
        socket.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        socket.write_all(b"{\"ok\":true}").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(
            peer.try_read(&mut buf).is_err(),
            "nothing is sent before the flush"
        );
        assert!(socket.gathered.capacity() > 0);
        socket.flush().await.unwrap();
        assert_eq!(
            socket.gathered.capacity(),
            0,
            "a flushed socket holds no buffer"
        );
        let n = peer.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"HTTP/1.1 200 OK\r\n\r\n{\"ok\":true}");
    }

    #[tokio::test]
    async fn a_large_write_goes_after_what_was_gathered() {
        let (mut socket, mut peer) = pair().await;
        let large = vec![b'x'; 3 * GATHER];
        socket.write_all(b"head;").await.unwrap();
        socket.write_all(&large).await.unwrap();
        socket.write_all(b";tail").await.unwrap();
        socket.shutdown().await.unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        let mut want = b"head;".to_vec();
        want.extend_from_slice(&large);
        want.extend_from_slice(b";tail");
        assert_eq!(got, want);
    }
}
