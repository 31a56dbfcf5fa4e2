//! Raw TCP proxying: pick an endpoint (retrying connect failures on others), then copy
//! bytes both ways. End of stream in one direction is passed on as a half-close
//! (`shutdown(Write)`), so protocols that close their sending side first keep working.
//! A connection without traffic in either direction for the idle timeout is closed. Plain
//! TCP on both sides moves through `relay` (buffers held only while bytes move); this
//! generic copy loop carries TLS and upgraded HTTP connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Shared;
use crate::access::{AccessLog, Tcp, TcpEnd};
use crate::balance::hash_bytes;
use crate::resilience::{Outcome, record};
use crate::state::Target;
use crate::tls::Io;
use crate::upstream::ConnectError;

const BUF: usize = 64 * 1024;

/// The access log line of one connection (when access logs are on), written when it is
/// dropped: at the end of [`proxy`], or when shutdown cuts the connection.
struct Line<'a> {
    log: &'a AccessLog,
    started: SystemTime,
    start: Instant,
    direction: &'a str,
    service: &'a str,
    client: SocketAddr,
    client_id: Option<&'a str>,
    end: TcpEnd,
    upstream: Option<SocketAddr>,
    to_upstream: u64,
    to_client: u64,
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        self.log.record_tcp(&Tcp {
            started: self.started,
            direction: self.direction,
            service: self.service,
            end: self.end,
            duration: self.start.elapsed(),
            client: self.client,
            client_id: self.client_id,
            upstream: self.upstream,
            to_upstream: self.to_upstream,
            to_client: self.to_client,
        });
    }
}

/// Sets how the connection ended, for its access log line.
fn ended(line: &mut Option<Line<'_>>, end: TcpEnd) {
    if let Some(l) = line {
        l.end = end;
    }
}

/// Proxies one accepted TCP connection to `target`'s default backend; `client_id` is the
/// client's verified mesh identity (inbound, mutual TLS), for the access log.
pub(crate) async fn proxy(
    shared: &Shared,
    target: &Arc<Target>,
    client: Io,
    peer: SocketAddr,
    client_id: Option<&str>,
) {
    let backend = &target.default_backend;
    let service = &backend.service;
    let m = &shared.metrics;
    let dir = target.direction.as_str();
    let mut line = shared.config.access_log.as_deref().map(|log| Line {
        log,
        started: SystemTime::now(),
        start: Instant::now(),
        direction: dir,
        service: &target.service.name,
        client: peer,
        client_id,
        // Until it ends otherwise: a connection dropped mid-way is cut by shutdown.
        end: TcpEnd::Shutdown,
        upstream: None,
        to_upstream: 0,
        to_client: 0,
    });
    let hash = service
        .hash_on
        .is_some()
        .then(|| hash_bytes(peer.ip().to_string().as_bytes()));
    let attempts = 1 + service.retry.attempts.min(10);
    let mut avoid = None;
    let mut upstream = None;
    for attempt in 0..attempts {
        let Some(ep) = backend.balancer.pick(hash, avoid) else {
            tracing::warn!(service = %service.label, "no endpoints; closing TCP connection");
            ended(&mut line, TcpEnd::NoEndpoints);
            return;
        };
        match service
            .clients
            .connector
            .connect_endpoint(ep.addr, ep.meshed, false)
            .await
        {
            Ok(conn) => {
                record(
                    &ep,
                    Outcome::Success,
                    service.outlier.as_ref(),
                    backend.balancer.endpoints(),
                );
                upstream = Some((conn, ep));
                break;
            }
            Err(e) => {
                match &e {
                    ConnectError::Overloaded(why) => {
                        m.breaker_rejections
                            .with_label_values(&[&*service.label, why])
                            .inc();
                        tracing::debug!(service = %service.label, reason = why, "TCP connection refused by breaker");
                        ended(&mut line, TcpEnd::Overloaded);
                        return;
                    }
                    ConnectError::Timeout => {
                        m.timeouts
                            .with_label_values(&[&*service.label, "connect"])
                            .inc();
                    }
                    _ => {}
                }
                m.connect_failures
                    .with_label_values(&[&*service.label])
                    .inc();
                if record(
                    &ep,
                    Outcome::ConnectFailure,
                    service.outlier.as_ref(),
                    backend.balancer.endpoints(),
                ) {
                    m.ejections.with_label_values(&[&*service.label]).inc();
                }
                tracing::debug!(service = %service.label, endpoint = %ep.addr, attempt, error = %e, "TCP connect failed");
                avoid = Some(ep.addr);
            }
        }
    }
    let Some(((server, _slot), ep)) = upstream else {
        ended(&mut line, TcpEnd::ConnectFailed);
        return;
    };
    if let Some(l) = &mut line {
        l.upstream = Some(ep.addr);
    }
    ep.stats.inflight.fetch_add(1, Ordering::Relaxed);
    let idle =
        (service.timeouts.idle_ms > 0).then(|| Duration::from_millis(service.timeouts.idle_ms));
    let (up, down, timed_out) = relay(client, server, idle).await;
    ep.stats.inflight.fetch_sub(1, Ordering::Relaxed);
    if timed_out {
        m.timeouts
            .with_label_values(&[&*service.label, "idle"])
            .inc();
    }
    m.tcp_bytes
        .with_label_values(&[dir, &*service.label, "to_upstream"])
        .inc_by(up);
    m.tcp_bytes
        .with_label_values(&[dir, &*service.label, "to_client"])
        .inc_by(down);
    if let Some(l) = &mut line {
        l.end = if timed_out {
            TcpEnd::IdleTimeout
        } else {
            TcpEnd::Closed
        };
        (l.to_upstream, l.to_client) = (up, down);
    }
}

/// Relays a connection: through [`crate::relay`] when both sides are plain TCP, through
/// the generic copy loop ([`pipe`]) otherwise (TLS).
async fn relay(client: Io, server: Io, idle: Option<Duration>) -> (u64, u64, bool) {
    if let (Io::Plain(c), Io::Plain(s)) = (&client, &server) {
        return crate::relay::relay(c, s, idle).await;
    }
    pipe(client, server, idle).await
}

/// Copies `a -> b` and `b -> a` until both directions end, passing each end of stream on
/// as a half-close. Returns (bytes a->b, bytes b->a, whether the idle timeout ended it).
pub async fn pipe<A, B>(a: A, b: B, idle: Option<Duration>) -> (u64, u64, bool)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = AtomicU64::new(0);
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let ab_count = AtomicU64::new(0);
    let ba_count = AtomicU64::new(0);
    let copy = async {
        let ab = one_way(&mut ar, &mut bw, &ab_count, &activity);
        let ba = one_way(&mut br, &mut aw, &ba_count, &activity);
        let _ = tokio::join!(ab, ba);
    };
    let timed_out = match idle {
        None => {
            copy.await;
            false
        }
        Some(idle) => {
            tokio::select! {
                _ = copy => false,
                _ = idle_watch(&activity, idle) => true,
            }
        }
    };
    (
        ab_count.load(Ordering::Relaxed),
        ba_count.load(Ordering::Relaxed),
        timed_out,
    )
}

/// Completes once `activity` (a count of reads and writes) has not moved for `idle`.
///
/// Counting instead of time-stamping keeps a clock read off every read and write; the
/// count is sampled four times per `idle`, so a connection closes between `idle` and
/// 1.5 × `idle` after its latest activity.
pub(crate) async fn idle_watch(activity: &AtomicU64, idle: Duration) {
    let step = (idle / 4).max(Duration::from_millis(1));
    let mut seen = activity.load(Ordering::Relaxed);
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(step).await;
        let now = tokio::time::Instant::now();
        let count = activity.load(Ordering::Relaxed);
        if count != seen {
            seen = count;
            quiet_since = now;
        } else if now.duration_since(quiet_since) >= idle {
            return;
        }
    }
}

/// A stream that counts its reads and writes, for idle timeouts ([`idle_watch`]).
pub(crate) struct Timed<S> {
    inner: S,
    activity: Arc<AtomicU64>,
}

impl<S> Timed<S> {
    /// Wraps `inner`; every completed read or write bumps `activity`.
    pub(crate) fn new(inner: S, activity: Arc<AtomicU64>) -> Timed<S> {
        Timed { inner, activity }
    }

    fn touch(&self) {
        self.activity.fetch_add(1, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Timed<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if r.is_ready() {
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Timed<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if r.is_ready() {
            self.touch();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if r.is_ready() {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

async fn one_way<R, W>(
    r: &mut R,
    w: &mut W,
    count: &AtomicU64,
    activity: &AtomicU64,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    loop {
        let n = r.read(&mut buf).await?;
        activity.fetch_add(1, Ordering::Relaxed);
        if n == 0 {
            // Pass the end of stream on, but keep the other direction open.
            w.shutdown().await?;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pipe_passes_half_close_both_ways() {
        let (a_outer, a_inner) = tokio::io::duplex(1024);
        let (b_inner, b_outer) = tokio::io::duplex(1024);
        let task = tokio::spawn(pipe(a_inner, b_inner, Some(Duration::from_secs(5))));
        let (mut ar, mut aw) = tokio::io::split(a_outer);
        let (mut br, mut bw) = tokio::io::split(b_outer);
        aw.write_all(b"hello").await.unwrap();
        aw.shutdown().await.unwrap();
        let mut got = Vec::new();
        br.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        // The other direction still works after the half-close.
        bw.write_all(b"world!").await.unwrap();
        bw.shutdown().await.unwrap();
        let mut got = Vec::new();
        ar.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"world!");
        let (ab, ba, idle) = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((ab, ba, idle), (5, 6, false));
    }

    #[tokio::test(start_paused = true)]
    async fn pipe_closes_idle_connections() {
        let (_a_outer, a_inner) = tokio::io::duplex(1024);
        let (b_inner, _b_outer) = tokio::io::duplex(1024);
        let (_, _, idle) = pipe(a_inner, b_inner, Some(Duration::from_secs(3))).await;
        assert!(idle);
    }
}
