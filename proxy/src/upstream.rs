//! Connections to upstream endpoints: the connector (connect timeout, `TCP_NODELAY`, and
//! the per-service connection and pending-request limits of the circuit breaker) and the
//! pooled HTTP clients built on it (HTTP/1.1 keep-alive pools, HTTP/2 multiplexing).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::tls::{Io, TlsPeer};

/// Errors a body may carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type every proxied message uses.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Why a connection to an endpoint was not made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A circuit-breaker limit refused it (`max_connections` or `max_pending_requests`).
    #[error("circuit breaker: {0}")]
    Overloaded(&'static str),
    /// The connect timeout ran out.
    #[error("connect timed out")]
    Timeout,
    /// The URI has no `ip:port` authority.
    #[error("upstream URI has no ip:port authority")]
    BadAddress,
    /// The socket failed.
    #[error("connect failed: {0}")]
    Io(#[from] io::Error),
}

/// Connection limits and timeout of one service's connector.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnectorConfig {
    /// Connect timeout; `None` means none.
    pub connect_timeout: Option<Duration>,
    /// Open connections allowed (0: unlimited).
    pub max_connections: u32,
    /// Callers allowed to wait for a connection slot (0: unlimited).
    pub max_pending: u32,
    /// Idle time after which a pooled connection is closed.
    pub idle_timeout: Option<Duration>,
    /// The service that meshed endpoints must prove to be over mutual TLS; `None` dials
    /// everything in plaintext.
    pub tls: Option<TlsPeer>,
}

/// Makes connections to endpoints under one service's limits. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Connector {
    inner: Arc<ConnectorInner>,
}

#[derive(Debug)]
struct ConnectorInner {
    config: ConnectorConfig,
    slots: Option<Arc<Semaphore>>,
    pending: AtomicU32,
}

impl Connector {
    /// A connector with these limits.
    pub fn new(config: ConnectorConfig) -> Connector {
        let slots = (config.max_connections > 0)
            .then(|| Arc::new(Semaphore::new(config.max_connections as usize)));
        Connector {
            inner: Arc::new(ConnectorInner {
                config,
                slots,
                pending: AtomicU32::new(0),
            }),
        }
    }

    /// Connects to `addr`, waiting for a connection slot if the limit is reached (unless
    /// too many already wait). The returned slot must be held as long as the connection.
    pub async fn connect(
        &self,
        addr: SocketAddr,
    ) -> Result<(TcpStream, Option<OwnedSemaphorePermit>), ConnectError> {
        let c = &self.inner.config;
        let permit = match &self.inner.slots {
            None => None,
            Some(slots) => match slots.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let waiting = self.inner.pending.fetch_add(1, Ordering::AcqRel);
                    let _undo = PendingGuard(&self.inner.pending);
                    if c.max_pending > 0 && waiting >= c.max_pending {
                        return Err(ConnectError::Overloaded("max_pending_requests"));
                    }
                    // Waiting for a slot is bounded by the connect timeout too.
                    let wait = slots.clone().acquire_owned();
                    let p = match c.connect_timeout {
                        None => wait.await.ok(),
                        Some(t) => tokio::time::timeout(t, wait)
                            .await
                            .ok()
                            .and_then(Result::ok),
                    };
                    Some(p.ok_or(ConnectError::Overloaded("max_connections"))?)
                }
            },
        };
        let connect = TcpStream::connect(addr);
        let stream = match c.connect_timeout {
            None => connect.await?,
            Some(t) => tokio::time::timeout(t, connect)
                .await
                .map_err(|_| ConnectError::Timeout)??,
        };
        // Small requests and responses must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        Ok((stream, permit))
    }

    /// Connects to `addr` like [`Connector::connect`], then, for a meshed endpoint, speaks
    /// mutual TLS when the sidecar has a certificate. A failed handshake is a connect
    /// failure.
    pub async fn connect_endpoint(
        &self,
        addr: SocketAddr,
        meshed: bool,
    ) -> Result<(Io, Option<OwnedSemaphorePermit>), ConnectError> {
        let (stream, permit) = self.connect(addr).await?;
        let io = match (&self.inner.config.tls, meshed) {
            (Some(peer), true) => crate::tls::dial(peer, stream).await?,
            _ => Io::Plain(stream),
        };
        Ok((io, permit))
    }

    /// The idle timeout of pooled connections.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.inner.config.idle_timeout
    }
}

struct PendingGuard<'a>(&'a AtomicU32);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection made by [`Connector`], holding its circuit-breaker slot.
#[derive(Debug)]
pub struct Conn {
    io: TokioIo<Io>,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

impl tower::Service<Uri> for Connector {
    type Response = Conn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or(ConnectError::BadAddress)?;
            // The request URI says `https` for meshed endpoints.
            let meshed = uri.scheme_str() == Some("https");
            let (io, slot) = this.connect_endpoint(addr, meshed).await?;
            Ok(Conn {
                io: TokioIo::new(io),
                _slot: slot,
            })
        })
    }
}

/// The pooled HTTP clients of one service.
#[derive(Clone, Debug)]
pub struct Clients {
    /// The connector (also used for raw TCP).
    pub connector: Connector,
    /// HTTP/1.1 with keep-alive pools.
    pub h1: Client<Connector, Body>,
    /// HTTP/2 (h2c prior knowledge), one multiplexed connection per endpoint.
    pub h2: Client<Connector, Body>,
}

impl Clients {
    /// Builds the clients over a connector with `config`.
    pub fn new(config: ConnectorConfig) -> Clients {
        let connector = Connector::new(config);
        let idle = connector.idle_timeout();
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(idle);
        let h1 = b.build(connector.clone());
        b.http2_only(true)
            .http2_keep_alive_interval(Some(Duration::from_secs(30)))
            .http2_keep_alive_while_idle(false);
        let h2 = b.build(connector.clone());
        Clients { connector, h1, h2 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connection_limit_and_pending_limit() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = Connector::new(ConnectorConfig {
            connect_timeout: Some(Duration::from_millis(300)),
            max_connections: 1,
            max_pending: 1,
            idle_timeout: None,
            tls: None,
        });
        let first = c.connect(addr).await.unwrap();
        // The second waits for the slot; the third finds the waiting room full.
        let c2 = c.clone();
        let waiter = tokio::spawn(async move { c2.connect(addr).await.map(|_| ()) });
        tokio::time::timeout(Duration::from_secs(5), async {
            while c.inner.pending.load(Ordering::Acquire) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        let third = c.connect(addr).await;
        assert!(matches!(
            third,
            Err(ConnectError::Overloaded("max_pending_requests"))
        ));
        drop(first);
        waiter.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn refused_connect_is_io_error() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let c = Connector::new(ConnectorConfig {
            connect_timeout: Some(Duration::from_secs(1)),
            max_connections: 0,
            max_pending: 0,
            idle_timeout: None,
            tls: None,
        });
        assert!(matches!(c.connect(addr).await, Err(ConnectError::Io(_))));
    }
}
