//! A server-wide bound on open connections (`--max-connections`): a listener takes a
//! permit before it accepts, and the accepted stream holds the permit until it closes.
//! Past the bound, new clients wait in the kernel's accept queue instead of each taking
//! a task, buffers and a file descriptor; the connections already open are unaffected.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::serve::Listener;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Permits shared by every listener of a server (HTTP and gRPC together).
#[derive(Clone, Debug)]
pub struct ConnectionLimit {
    permits: Option<Arc<Semaphore>>,
    max: Option<usize>,
}

impl ConnectionLimit {
    /// `None` or `Some(0)`: unbounded.
    pub fn new(max: Option<usize>) -> Self {
        let max = max
            .filter(|&m| m > 0)
            .map(|m| m.min(Semaphore::MAX_PERMITS));
        Self {
            permits: max.map(|m| Arc::new(Semaphore::new(m))),
            max,
        }
    }

    /// Connections open now (None when unbounded: nothing is counted).
    pub fn open(&self) -> Option<usize> {
        let (permits, max) = (self.permits.as_ref()?, self.max?);
        Some(max - permits.available_permits())
    }

    pub fn max(&self) -> Option<usize> {
        self.max
    }

    async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        let permits = self.permits.clone()?;
        // The semaphore is never closed, so acquiring only waits.
        permits.acquire_owned().await.ok()
    }
}

/// A connection that gives its permit back when dropped.
pub struct Limited<S> {
    inner: S,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<S> Limited<S> {
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
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

impl tonic::transport::server::Connected for Limited<tokio::net::TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// A listener that accepts only while a permit is free.
pub struct LimitedListener<L> {
    inner: L,
    limit: ConnectionLimit,
}

impl<L> LimitedListener<L> {
    pub fn new(inner: L, limit: ConnectionLimit) -> Self {
        Self { inner, limit }
    }
}

impl<L: Listener> Listener for LimitedListener<L>
where
    L::Io: Unpin,
{
    type Io = Limited<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = self.limit.acquire().await;
        let (inner, addr) = self.inner.accept().await;
        (
            Limited {
                inner,
                _permit: permit,
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn accepts_up_to_the_limit_then_waits_for_a_close() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr = tcp.local_addr().expect("its address");
        let limit = ConnectionLimit::new(Some(2));
        let mut listener = LimitedListener::new(tcp, limit.clone());
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let closed = Arc::new(AtomicBool::new(false));
        let server_closed = closed.clone();
        let server = tokio::spawn(async move {
            let mut open = Vec::new();
            let mut released = Some(released);
            for _ in 0..3 {
                let (mut io, _) = listener.accept().await;
                // Echo one byte so the client knows it was served.
                let mut b = [0u8; 1];
                io.read_exact(&mut b).await.expect("a byte");
                io.write_all(&b).await.expect("echo");
                open.push(io);
                if open.len() == 2 {
                    if let Some(r) = released.take() {
                        let _ = r.await;
                        // The flag is set before the close that frees the permit.
                        server_closed.store(true, Ordering::SeqCst);
                        open.remove(0);
                    }
                }
            }
            open.len()
        });
        async fn echo(mut s: tokio::net::TcpStream) -> tokio::net::TcpStream {
            s.write_all(b"x").await.expect("send");
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.expect("echo back");
            s
        }
        let _a = echo(tokio::net::TcpStream::connect(addr).await.expect("1")).await;
        let _b = echo(tokio::net::TcpStream::connect(addr).await.expect("2")).await;
        assert_eq!(limit.open(), Some(2));
        // The third connects (kernel backlog) but is not served while two are open.
        let third = tokio::spawn(echo(tokio::net::TcpStream::connect(addr).await.expect("3")));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!third.is_finished(), "served past the limit");
        release.send(()).expect("the server waits for the release");
        let _c = third.await.expect("the third is served after a close");
        assert!(closed.load(Ordering::SeqCst));
        assert_eq!(server.await.expect("server task"), 2);
        // Every permit is back once the server's connections are dropped.
        assert_eq!(limit.open(), Some(0));
    }

    #[test]
    fn unbounded_counts_nothing_and_zero_means_unbounded() {
        assert_eq!(ConnectionLimit::new(None).open(), None);
        assert_eq!(ConnectionLimit::new(Some(0)).max(), None);
        assert_eq!(ConnectionLimit::new(Some(5)).open(), Some(0));
    }
}
