//! Connections to upstream endpoints: the connector (connect timeout, `TCP_NODELAY`, and
//! the per-service connection and pending-request limits of the circuit breaker) and the
//! pooled HTTP clients built on it (HTTP/1.1 keep-alive pools, HTTP/2 multiplexing).
//!
//! The pools are hyper's connection-level clients (`client::conn::http1`/`http2`) behind
//! a map per protocol: a request pops an idle HTTP/1.1 connection (or clones the endpoint's
//! HTTP/2 sender), and its response body hands the connection back when it ends. This
//! replaced hyper-util's general-purpose pooled client, whose per-request connector
//! service, boxing and checkout bookkeeping were a large share of the proxy's CPU.

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::tls::{Io as MaybeTls, TlsPeer};

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
    /// `h2` offers HTTP/2 in the TLS handshake (ALPN).
    pub async fn connect_endpoint(
        &self,
        addr: SocketAddr,
        meshed: bool,
        h2: bool,
    ) -> Result<(MaybeTls, Option<OwnedSemaphorePermit>), ConnectError> {
        let (stream, permit) = self.connect(addr).await?;
        let io = match (&self.inner.config.tls, meshed) {
            (Some(peer), true) => crate::tls::dial(peer, stream, h2).await?,
            _ => MaybeTls::Plain(stream),
        };
        Ok((io, permit))
    }

    /// The idle timeout of pooled connections.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.inner.config.idle_timeout
    }

    /// What a connection about to be dialled to a `meshed` endpoint is stamped with: the
    /// sidecar's credentials generation, read before the handshake (so an install racing
    /// it leaves the connection looking older, never newer). `None` when the connection
    /// can never carry the sidecar's certificate.
    fn stamp(&self, meshed: bool) -> Option<u64> {
        match &self.inner.config.tls {
            Some(peer) if meshed => Some(peer.mesh.generation()),
            _ => None,
        }
    }

    /// The stamp a connection dialled now would get, for comparing many with
    /// [`is_current`].
    fn generation(&self) -> Option<u64> {
        self.stamp(true)
    }
}

/// Whether a pooled connection stamped `stamp` may take new requests when the sidecar's
/// credentials generation is `now`. One dialled under older credentials (a certificate
/// since renewed or reissued by another CA, or none yet) is retired: it finishes what it
/// carries but takes nothing new, so that every new request presents the current
/// certificate. Without this, a connection opened with a certificate of a CA that is
/// being rotated out stayed pooled (it is reused every few milliseconds under load, so
/// never idles out) until the server dropped that CA and cut it under a request.
fn is_current(stamp: Option<u64>, now: Option<u64>) -> bool {
    stamp.is_none() || stamp == now
}

struct PendingGuard<'a>(&'a AtomicU32);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What one upstream connection shares with the pool: a count of its reads and writes,
/// and how many requests use it now, so that its task can close it once it has been idle
/// (no request and no traffic) for the idle timeout.
#[derive(Debug, Default)]
struct Activity {
    /// Reads and writes so far.
    io: Arc<AtomicU64>,
    /// Requests using the connection now.
    busy: AtomicUsize,
    /// The sidecar's credentials generation it was dialled under ([`Connector::stamp`]).
    tls: Option<u64>,
}

impl Activity {
    fn new(tls: Option<u64>) -> Arc<Activity> {
        Arc::new(Activity {
            tls,
            ..Activity::default()
        })
    }
}

/// Completes once the connection has had no request and no traffic for `idle`.
async fn idle_close(activity: &Activity, idle: Duration) {
    loop {
        crate::tcp::idle_watch(&activity.io, idle).await;
        if activity.busy.load(Ordering::Acquire) == 0 {
            return;
        }
        // A request is in flight on a silent connection (a slow answer): not idle.
    }
}

/// The connection type the pools speak HTTP over.
type Io = TokioIo<crate::tcp::Timed<MaybeTls>>;

/// An idle HTTP/1.1 connection in the pool.
#[derive(Debug)]
struct IdleH1 {
    sender: http1::SendRequest<Body>,
    activity: Arc<Activity>,
}

/// A live HTTP/2 connection, shared by every request to its endpoint.
#[derive(Debug, Clone)]
struct SharedH2 {
    sender: http2::SendRequest<Body>,
    activity: Arc<Activity>,
}

/// Most idle HTTP/1.1 connections kept per endpoint; more are closed when they come back.
const MAX_IDLE_PER_ENDPOINT: usize = 512;

#[derive(Debug, Default)]
struct Pools {
    h1: Mutex<HashMap<SocketAddr, Vec<IdleH1>>>,
    h2: Mutex<HashMap<SocketAddr, SharedH2>>,
    /// Held while an endpoint's HTTP/2 connection is being dialled.
    h2_dialing: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>, rustc_hash::FxBuildHasher>>,
    /// Idle connections of the lean HTTP/1.1 engine, which speaks HTTP on them itself.
    raw: Mutex<RawPool>,
    /// The lean HTTP/2 engine's connections (the `h2` crate's, without hyper), shared by
    /// every request to their endpoint: one, and another whenever all are at the stream
    /// limit the endpoint set. Looked up per request: FxHash, as [`RawPool`] says why.
    lean_h2: Mutex<HashMap<SocketAddr, Vec<LeanH2>, rustc_hash::FxBuildHasher>>,
}

/// The idle connections of the lean HTTP/1.1 engine, per endpoint.
///
/// A client connection whose balancer alternates endpoints gives its upstream connection
/// back and takes another on every request, so this is on the request path: the map hashes
/// addresses with FxHash (the keys are endpoint addresses from the config, not chosen by a
/// peer, so SipHash's flood resistance buys nothing there and cost a hundred-odd
/// instructions per lookup), and idle time is counted in [`reap`] steps (`epoch`) rather
/// than read from the clock on every release and checkout.
#[derive(Debug, Default)]
struct RawPool {
    idle: HashMap<SocketAddr, Vec<RawConn>, rustc_hash::FxBuildHasher>,
    /// Whether a [`reap`] task watches this pool (one at most, only while it holds
    /// connections).
    reaping: bool,
    /// Steps of the reaper so far: a connection released at epoch `e` has been idle
    /// between `n - 1` and `n` steps at epoch `e + n`.
    epoch: u64,
}

/// Reaper steps per idle timeout.
const REAP_STEPS: u64 = 4;

/// Whether a connection released at epoch `released` has been idle for the idle timeout
/// at epoch `epoch`: more than [`REAP_STEPS`] steps, so between 1 and 1.25 × the timeout
/// (never without a timeout: no reaper counts then).
fn expired(epoch: u64, released: u64) -> bool {
    epoch.saturating_sub(released) > REAP_STEPS
}

/// Closes a pool's idle lean-engine connections once they have been idle for `idle` (or
/// their peer closed them), looking [`REAP_STEPS`] times per `idle`, so a connection
/// closes between `idle` and 1.25 × `idle` after its last use even if no request comes to
/// take it. Ends when the pool is empty (the next release starts another) or gone.
async fn reap(pools: std::sync::Weak<Pools>, idle: Duration) {
    let step = (idle / REAP_STEPS as u32).max(Duration::from_millis(1));
    loop {
        tokio::time::sleep(step).await;
        let Some(pools) = pools.upgrade() else {
            return;
        };
        let Ok(mut guard) = pools.raw.lock() else {
            return;
        };
        let raw = &mut *guard;
        raw.epoch += 1;
        let (epoch, idle_map) = (raw.epoch, &mut raw.idle);
        idle_map.retain(|_, list| {
            list.retain(|c| !expired(epoch, c.released) && c.open());
            !list.is_empty()
        });
        if raw.idle.is_empty() {
            raw.reaping = false;
            return;
        }
    }
}

/// A live HTTP/2 connection of the lean engine.
#[derive(Clone)]
struct LeanH2 {
    sender: h2::client::SendRequest<Bytes>,
    activity: Arc<Activity>,
    /// The endpoint's `SETTINGS_MAX_CONCURRENT_STREAMS`, as the connection last saw it.
    limit: Arc<AtomicUsize>,
}

impl LeanH2 {
    /// Whether the connection may take another stream without queueing it.
    fn has_room(&self) -> bool {
        self.activity.busy.load(Ordering::Acquire) < self.limit.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for LeanH2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeanH2").finish_non_exhaustive()
    }
}

/// A stream the lean HTTP/2 engine opened upstream: the response to wait for, the request
/// body's sending half, and the hold on the connection (it counts as busy, so it is not
/// closed as idle, until this is dropped).
pub(crate) struct H2Stream {
    pub(crate) response: h2::client::ResponseFuture,
    pub(crate) send: h2::SendStream<Bytes>,
    pub(crate) hold: H2Hold,
}

/// Marks an upstream HTTP/2 connection busy while held.
pub(crate) struct H2Hold(Arc<Activity>);

impl Drop for H2Hold {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why the lean HTTP/2 engine could not open a stream upstream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum H2OpenError {
    /// No connection to the endpoint could be made.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The connection refused the stream.
    #[error("upstream HTTP/2 stream not opened: {0}")]
    H2(#[from] h2::Error),
}

/// How often an HTTP/2 connection without traffic is pinged, and how long the pong may take
/// before the connection is closed as dead (the hyper engine's settings too).
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Completes when a ping on an HTTP/2 connection goes unanswered for
/// [`KEEPALIVE_TIMEOUT`]: pings are sent after [`KEEPALIVE_INTERVAL`] without traffic (on
/// `io`), and only while `wanted` says so. The connection's `PingPong` comes through
/// `pings` (see [`PingHandoff`]); never completes when the connection has none to give.
pub(crate) async fn keepalive(pings: &PingHandoff, io: &AtomicU64, wanted: impl Fn() -> bool) {
    keepalive_every(pings, io, wanted, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT).await
}

async fn keepalive_every(
    pings: &PingHandoff,
    io: &AtomicU64,
    wanted: impl Fn() -> bool,
    interval: Duration,
    timeout: Duration,
) {
    let mut pp = None;
    loop {
        crate::tcp::idle_watch(io, interval).await;
        if !wanted() {
            continue;
        }
        if pp.is_none() {
            pp = poll_fn(|cx| pings.poll_take(cx)).await;
        }
        let Some(pp) = pp.as_mut() else {
            return std::future::pending().await;
        };
        match tokio::time::timeout(timeout, pp.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
    }
}

/// Passes an HTTP/2 connection's `PingPong` to its [`keepalive`] when that first needs it,
/// i.e. once the connection has gone [`KEEPALIVE_INTERVAL`] without traffic. h2 hands the
/// `PingPong` out once, and from then on registers the connection task's waker for it on
/// every poll of the connection (~0.1k instructions a poll, two polls per proxied h2c
/// request on each side): a connection that is never idle that long never pays for it.
///
/// The connection's owner calls [`PingHandoff::offer`] where it polls the connection (the
/// only place that can borrow it); [`keepalive`], polled by the same task, asks and wakes
/// the task so that the next poll of the connection hands it over.
#[derive(Default)]
pub(crate) struct PingHandoff {
    asked: AtomicBool,
    /// `Some(None)`: the connection had no `PingPong` to give.
    given: Mutex<Option<Option<h2::PingPong>>>,
}

impl PingHandoff {
    /// Gives the connection's `PingPong` (`take`) if [`keepalive`] asked for it.
    pub(crate) fn offer(&self, take: impl FnOnce() -> Option<h2::PingPong>) {
        if self.asked.load(Ordering::Relaxed) {
            self.asked.store(false, Ordering::Relaxed);
            if let Ok(mut given) = self.given.lock() {
                *given = Some(take());
            }
        }
    }

    /// The connection's `PingPong` once given (`None`: it has none); until then asks for it
    /// and wakes the task, whose next poll of the connection gives it.
    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Option<h2::PingPong>> {
        match self.given.lock() {
            Ok(mut given) => {
                if let Some(pp) = given.take() {
                    return Poll::Ready(pp);
                }
            }
            Err(_) => return Poll::Ready(None),
        }
        self.asked.store(true, Ordering::Relaxed);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// An HTTP/1.1 connection that the lean engine ([`crate::h1`]) speaks on directly: no
/// task of its own, its breaker slot held as long as it is open.
pub(crate) struct RawConn {
    /// The stream (mutual TLS to meshed endpoints when the sidecar has a certificate).
    pub(crate) io: MaybeTls,
    /// The endpoint.
    pub(crate) addr: SocketAddr,
    _slot: Option<OwnedSemaphorePermit>,
    /// The pool's [`RawPool::epoch`] when it was last released to it.
    released: u64,
    /// The credentials generation it was dialled under ([`Connector::stamp`]).
    tls: Option<u64>,
}

impl std::fmt::Debug for RawConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawConn").field("addr", &self.addr).finish()
    }
}

impl RawConn {
    /// Whether a pooled connection may carry another request: (in plaintext, where it
    /// can be checked without blocking) not closed by the peer nor holding stray bytes.
    fn open(&self) -> bool {
        match &self.io {
            MaybeTls::Plain(s) => {
                let mut probe = [0u8; 1];
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            _ => true,
        }
    }
}

/// Why a request could not be sent upstream.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection to the endpoint could be made.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The connection failed while the request was sent or the response read.
    #[error("upstream request failed: {0}")]
    Http(#[from] hyper::Error),
}

/// A request's hold on its upstream connection, kept until the response body is done.
/// An HTTP/1.1 connection whose response ended cleanly goes back to the pool through
/// [`InUse::release`]; dropped without that, it is closed (a half-read response must
/// never be followed by another request on the same connection).
#[derive(Debug)]
pub struct InUse {
    activity: Arc<Activity>,
    h1: Option<(http1::SendRequest<Body>, SocketAddr, Arc<Pools>)>,
}

impl InUse {
    /// Gives an HTTP/1.1 connection back to the pool for the next request.
    pub fn release(mut self) {
        let Some((sender, addr, pools)) = self.h1.take() else {
            return;
        };
        if sender.is_closed() {
            return;
        }
        let Ok(mut h1) = pools.h1.lock() else {
            return;
        };
        let idle = h1.entry(addr).or_default();
        if idle.len() < MAX_IDLE_PER_ENDPOINT {
            idle.push(IdleH1 {
                sender,
                activity: self.activity.clone(),
            });
        }
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.activity.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The pooled HTTP clients of one service: HTTP/1.1 keep-alive pools and one multiplexed
/// HTTP/2 (h2c prior knowledge) connection per endpoint, both dialled through the
/// service's [`Connector`]. Cheap to clone; clones share the pools.
#[derive(Clone, Debug)]
pub struct Clients {
    /// The connector (also used for raw TCP).
    pub connector: Connector,
    pools: Arc<Pools>,
    h1: Arc<http1::Builder>,
    h2: Arc<http2::Builder<TokioExecutor>>,
    lean_h2: Arc<h2::client::Builder>,
}

impl Clients {
    /// Builds the clients over a connector with `config`.
    pub fn new(config: ConnectorConfig) -> Clients {
        let connector = Connector::new(config);
        let mut h1 = http1::Builder::new();
        h1.max_buf_size(1024 * 1024);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_while_idle(false);
        // hyper's client defaults, so that both engines have the same windows and buffers.
        let mut lean_h2 = h2::client::Builder::new();
        lean_h2
            .enable_push(false)
            // At most this many streams before the endpoint's SETTINGS say how many.
            .initial_max_send_streams(100)
            .initial_window_size(2 * 1024 * 1024)
            .initial_connection_window_size(5 * 1024 * 1024)
            .max_header_list_size(16 * 1024)
            .max_send_buffer_size(1024 * 1024)
            .max_local_error_reset_streams(Some(1024));
        Clients {
            connector,
            pools: Arc::new(Pools::default()),
            h1: Arc::new(h1),
            h2: Arc::new(h2),
            lean_h2: Arc::new(lean_h2),
        }
    }

    /// Sends `req` to the endpoint `addr` over HTTP/2 (`h2`) or HTTP/1.1, on a pooled
    /// connection when one is free, else on a new one. A request that a reused connection
    /// could not even start (it was closed meanwhile) is sent again on another. The URI
    /// must be in origin form for HTTP/1.1 and absolute for HTTP/2. A `meshed` endpoint
    /// is dialled with mutual TLS when the sidecar has a certificate.
    pub async fn send(
        &self,
        addr: SocketAddr,
        meshed: bool,
        h2: bool,
        mut req: Request<Body>,
    ) -> Result<(Response<Incoming>, InUse), SendError> {
        loop {
            let (mut conn, fresh) = if h2 {
                self.checkout_h2(addr, meshed).await?
            } else {
                match self.idle_h1(addr) {
                    Some(c) => (c, false),
                    None => (self.dial(addr, meshed, false).await?, true),
                }
            };
            conn.activity.busy.fetch_add(1, Ordering::AcqRel);
            let sent = match &mut conn.sender {
                Sender::H1(s) => {
                    if !fresh && s.ready().await.is_err() {
                        conn.activity.busy.fetch_sub(1, Ordering::AcqRel);
                        continue;
                    }
                    s.try_send_request(req).await
                }
                Sender::H2(s) => s.try_send_request(req).await,
            };
            let in_use = InUse {
                activity: conn.activity,
                h1: match conn.sender {
                    Sender::H1(s) => Some((s, addr, self.pools.clone())),
                    Sender::H2(_) => None,
                },
            };
            match sent {
                Ok(resp) => return Ok((resp, in_use)),
                Err(mut e) => match e.take_message() {
                    // Never written: a reused connection had gone away; try another.
                    Some(r) if !fresh => {
                        if h2 {
                            self.forget_h2(addr);
                        }
                        req = r;
                    }
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }

    /// Opens a stream for `head` on the endpoint's HTTP/2 connection of the lean engine,
    /// dialled if there is none (one request dials while the others wait); `end_of_stream`
    /// when the request has no body. A reused connection found gone at the ready check is
    /// replaced; one that goes between the check and the stream's opening fails the open
    /// with its GOAWAY or I/O error (the head is gone then: the caller sends it again).
    /// `head`'s URI must be absolute.
    pub(crate) async fn open_h2(
        &self,
        addr: SocketAddr,
        meshed: bool,
        head: Request<()>,
        end_of_stream: bool,
    ) -> Result<H2Stream, H2OpenError> {
        let mut head = Some(head);
        if let Some(opened) = self.open_pooled_h2(addr, &mut head, end_of_stream) {
            return opened.map_err(H2OpenError::H2);
        }
        loop {
            let (conn, fresh) = match self.idle_lean_h2(addr) {
                Some(c) => (c, false),
                // Boxed: dialling (TLS included) is a large future, and rare.
                None => Box::pin(self.dial_or_wait_lean_h2(addr, meshed)).await?,
            };
            conn.activity.busy.fetch_add(1, Ordering::AcqRel);
            let hold = H2Hold(conn.activity.clone());
            let mut sender = match conn.sender.ready().await {
                Ok(s) => s,
                Err(e) if fresh => return Err(e.into()),
                Err(_) => {
                    self.forget_lean_h2(addr, &conn.activity);
                    continue;
                }
            };
            let Some(head) = head.take() else {
                return Err(H2OpenError::H2(h2::Reason::INTERNAL_ERROR.into()));
            };
            let (response, send) = match sender.send_request(head, end_of_stream) {
                Ok(opened) => opened,
                Err(e) => {
                    // Closed or going away since the ready check: not to be picked again.
                    if e.is_go_away() || e.is_io() {
                        self.forget_lean_h2(addr, &conn.activity);
                    }
                    return Err(e.into());
                }
            };
            return Ok(H2Stream {
                response,
                send,
                hold,
            });
        }
    }

    /// The common case of [`Clients::open_h2`]: a pooled connection to `addr` with room that
    /// can open a stream at once opens it, under the pool's lock and on the pooled sender
    /// itself (no per-request clone of the sender, whose clone and drop each take the
    /// connection's lock). `None`, with `head` left in place, when there is no such
    /// connection; a connection found closing by the stream's opening is taken out of the
    /// pool.
    pub(crate) fn open_pooled_h2(
        &self,
        addr: SocketAddr,
        head: &mut Option<Request<()>>,
        end_of_stream: bool,
    ) -> Option<Result<H2Stream, h2::Error>> {
        let mut pools = self.pools.lean_h2.lock().ok()?;
        let list = pools.get_mut(&addr)?;
        let now = self.connector.generation();
        let i = list
            .iter()
            .position(|c| c.has_room() && is_current(c.activity.tls, now))?;
        let c = list.get_mut(i)?;
        // Not ready now (closed, or a stream of its own still waiting to open): the slow
        // path waits with the task's waker, or replaces the connection.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if !matches!(c.sender.poll_ready(&mut cx), Poll::Ready(Ok(()))) {
            return None;
        }
        let head = head.take()?;
        c.activity.busy.fetch_add(1, Ordering::AcqRel);
        let hold = H2Hold(c.activity.clone());
        Some(match c.sender.send_request(head, end_of_stream) {
            Ok((response, send)) => Ok(H2Stream {
                response,
                send,
                hold,
            }),
            Err(e) => {
                if e.is_go_away() || e.is_io() {
                    list.remove(i);
                    if list.is_empty() {
                        pools.remove(&addr);
                    }
                }
                Err(e)
            }
        })
    }

    /// A connection to `addr` made by another request meanwhile (`false`), else a new one
    /// (`true`): one request dials while the others wait for it.
    async fn dial_or_wait_lean_h2(
        &self,
        addr: SocketAddr,
        meshed: bool,
    ) -> Result<(LeanH2, bool), H2OpenError> {
        let gate = self.dial_gate(addr);
        let _dialing = gate.lock().await;
        match self.idle_lean_h2(addr) {
            Some(c) => Ok((c, false)),
            None => Ok((self.dial_lean_h2(addr, meshed).await?, true)),
        }
    }

    /// A connection to `addr` with room for another stream. Connections retired by a
    /// change of credentials ([`is_current`]) leave the pool here: each closes once its
    /// streams are done and no handle to it is left.
    fn idle_lean_h2(&self, addr: SocketAddr) -> Option<LeanH2> {
        let mut pools = self.pools.lean_h2.lock().ok()?;
        let list = pools.get_mut(&addr)?;
        let now = self.connector.generation();
        list.retain(|c| is_current(c.activity.tls, now));
        let found = list.iter().find(|c| c.has_room()).cloned();
        if list.is_empty() {
            pools.remove(&addr);
        }
        found
    }

    /// Takes a connection that failed out of the pool.
    fn forget_lean_h2(&self, addr: SocketAddr, activity: &Arc<Activity>) {
        forget_lean_h2(&self.pools, addr, activity);
    }

    /// The lock held while a connection to `addr` is dialled.
    fn dial_gate(&self, addr: SocketAddr) -> Arc<tokio::sync::Mutex<()>> {
        match self.pools.h2_dialing.lock() {
            Ok(mut gates) => gates.entry(addr).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Dials `addr` for the lean HTTP/2 engine and starts the connection's task, which
    /// ends it when it fails, idles out or stops answering pings, and then takes it out of
    /// the pool.
    async fn dial_lean_h2(&self, addr: SocketAddr, meshed: bool) -> Result<LeanH2, H2OpenError> {
        let stamp = self.connector.stamp(meshed);
        let (stream, slot) = self.connector.connect_endpoint(addr, meshed, true).await?;
        let activity = Activity::new(stamp);
        let io = crate::tcp::Timed::new(stream, activity.io.clone());
        let (sender, mut conn) = self
            .lean_h2
            .handshake(io)
            .await
            .map_err(|e| ConnectError::Io(io::Error::other(e)))?;
        let limit = Arc::new(AtomicUsize::new(conn.max_concurrent_send_streams()));
        let seen_limit = limit.clone();
        let idle = self.connector.idle_timeout();
        let watch = activity.clone();
        let pools = Arc::downgrade(&self.pools);
        let pings = PingHandoff::default();
        tokio::spawn(async move {
            let _slot = slot;
            let idle_out = async {
                match idle {
                    None => std::future::pending().await,
                    Some(t) => idle_close(&watch, t).await,
                }
            };
            let busy = || watch.busy.load(Ordering::Acquire) > 0;
            // The connection, noting the endpoint's stream limit as its SETTINGS come.
            let run = poll_fn(|cx| {
                pings.offer(|| conn.ping_pong());
                let r = Pin::new(&mut conn).poll(cx);
                seen_limit.store(conn.max_concurrent_send_streams(), Ordering::Relaxed);
                r
            });
            tokio::select! {
                r = run => {
                    if let Err(e) = r {
                        tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
                    }
                }
                _ = idle_out => {}
                _ = keepalive(&pings, &watch.io, busy) => {
                    tracing::debug!(%addr, "upstream HTTP/2 connection did not answer a ping");
                }
            }
            if let Some(pools) = pools.upgrade() {
                forget_lean_h2(&pools, addr, &watch);
            }
        });
        let c = LeanH2 {
            sender,
            activity,
            limit,
        };
        if let Ok(mut pools) = self.pools.lean_h2.lock() {
            pools.entry(addr).or_default().push(c.clone());
        }
        Ok(c)
    }

    /// An idle connection to `addr` for the lean HTTP/1.1 engine, else a new one (dialled
    /// through the connector, with its limits); `true` when it is new.
    pub(crate) async fn checkout_raw(
        &self,
        addr: SocketAddr,
        meshed: bool,
    ) -> Result<(RawConn, bool), ConnectError> {
        if let Ok(mut guard) = self.pools.raw.lock() {
            let pool = &mut *guard;
            if let Some(list) = pool.idle.get_mut(&addr) {
                let now = self.connector.generation();
                while let Some(c) = list.pop() {
                    if !expired(pool.epoch, c.released) && is_current(c.tls, now) && c.open() {
                        return Ok((c, false));
                    }
                }
            }
        }
        let tls = self.connector.stamp(meshed);
        // Boxed: the dial (a TLS handshake, maybe) inline would make every lean connection's
        // future larger, and that is copied whole several times per connection.
        let dial = Box::pin(self.connector.connect_endpoint(addr, meshed, false));
        let (io, slot) = dial.await?;
        Ok((
            RawConn {
                io,
                addr,
                _slot: slot,
                released: 0,
                tls,
            },
            true,
        ))
    }

    /// Whether `other` shares these clients' pools (the same service's clients).
    pub(crate) fn same_pools(&self, other: &Clients) -> bool {
        Arc::ptr_eq(&self.pools, &other.pools)
    }

    /// Whether `conn`, one of these clients' connections, may carry another request:
    /// not retired by a change of the sidecar's credentials ([`is_current`]).
    pub(crate) fn is_current(&self, conn: &RawConn) -> bool {
        is_current(conn.tls, self.connector.generation())
    }

    /// Gives a connection whose last response ended cleanly back to the pool, where
    /// [`reap`] closes it once idle for the idle timeout.
    pub(crate) fn release_raw(&self, mut conn: RawConn) {
        if !self.is_current(&conn) {
            return;
        }
        let idle = self.connector.idle_timeout();
        let Ok(mut pools) = self.pools.raw.lock() else {
            return;
        };
        conn.released = pools.epoch;
        let list = pools.idle.entry(conn.addr).or_default();
        if list.len() >= MAX_IDLE_PER_ENDPOINT {
            return;
        }
        list.push(conn);
        if let Some(t) = idle.filter(|_| !pools.reaping) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                pools.reaping = true;
                rt.spawn(reap(Arc::downgrade(&self.pools), t));
            }
        }
    }

    fn idle_h1(&self, addr: SocketAddr) -> Option<Checkout> {
        let mut pools = self.pools.h1.lock().ok()?;
        let idle = pools.get_mut(&addr)?;
        let now = self.connector.generation();
        while let Some(c) = idle.pop() {
            if !c.sender.is_closed() && is_current(c.activity.tls, now) {
                return Some(Checkout {
                    sender: Sender::H1(c.sender),
                    activity: c.activity,
                });
            }
        }
        None
    }

    /// The endpoint's HTTP/2 connection, dialled if there is none. One request dials while
    /// the others wait for it: without that, a burst of concurrent requests to a new
    /// endpoint opened a connection each (hundreds, and tens of MiB of buffers).
    async fn checkout_h2(
        &self,
        addr: SocketAddr,
        meshed: bool,
    ) -> Result<(Checkout, bool), ConnectError> {
        if let Some(c) = self.idle_h2(addr) {
            return Ok((c, false));
        }
        let gate = self.dial_gate(addr);
        let _dialing = gate.lock().await;
        if let Some(c) = self.idle_h2(addr) {
            return Ok((c, false));
        }
        Ok((self.dial(addr, meshed, true).await?, true))
    }

    fn idle_h2(&self, addr: SocketAddr) -> Option<Checkout> {
        let pools = self.pools.h2.lock().ok()?;
        let now = self.connector.generation();
        // A retired one is replaced in the pool by the next dial.
        let c = pools
            .get(&addr)
            .filter(|c| !c.sender.is_closed() && is_current(c.activity.tls, now))?;
        Some(Checkout {
            sender: Sender::H2(c.sender.clone()),
            activity: c.activity.clone(),
        })
    }

    fn forget_h2(&self, addr: SocketAddr) {
        if let Ok(mut pools) = self.pools.h2.lock() {
            if pools.get(&addr).is_some_and(|c| c.sender.is_closed()) {
                pools.remove(&addr);
            }
        }
    }

    /// Opens a new connection to `addr` (through the connector, the one place that dials
    /// endpoints) and starts its task, which ends it once idle for the idle timeout.
    async fn dial(
        &self,
        addr: SocketAddr,
        meshed: bool,
        h2: bool,
    ) -> Result<Checkout, ConnectError> {
        let stamp = self.connector.stamp(meshed);
        let (stream, slot) = self.connector.connect_endpoint(addr, meshed, h2).await?;
        let activity = Activity::new(stamp);
        let io: Io = TokioIo::new(crate::tcp::Timed::new(stream, activity.io.clone()));
        let idle = self.connector.idle_timeout();
        let watch = activity.clone();
        // Runs a connection until it ends or idles out; the breaker slot is held as long.
        let run = move |conn: Pin<Box<dyn Future<Output = ()> + Send>>| {
            tokio::spawn(async move {
                let _slot = slot;
                match idle {
                    None => conn.await,
                    Some(t) => tokio::select! {
                        _ = conn => {}
                        _ = idle_close(&watch, t) => {}
                    },
                }
            });
        };
        // A failed handshake is a failed connect: nothing was sent.
        let handshake_failed = |e: hyper::Error| ConnectError::Io(io::Error::other(e));
        if h2 {
            let (sender, conn) = self.h2.handshake(io).await.map_err(handshake_failed)?;
            run(Box::pin(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
                }
            }));
            let shared = SharedH2 {
                sender: sender.clone(),
                activity: activity.clone(),
            };
            if let Ok(mut pools) = self.pools.h2.lock() {
                pools.insert(addr, shared);
            }
            Ok(Checkout {
                sender: Sender::H2(sender),
                activity,
            })
        } else {
            let (sender, conn) = self.h1.handshake(io).await.map_err(handshake_failed)?;
            run(Box::pin(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(%addr, error = %e, "upstream HTTP/1.1 connection ended");
                }
            }));
            Ok(Checkout {
                sender: Sender::H1(sender),
                activity,
            })
        }
    }
}

/// Takes the lean engine's connection with `activity` out of the pool of `addr`.
fn forget_lean_h2(pools: &Pools, addr: SocketAddr, activity: &Arc<Activity>) {
    if let Ok(mut map) = pools.lean_h2.lock() {
        if let Some(list) = map.get_mut(&addr) {
            list.retain(|c| !Arc::ptr_eq(&c.activity, activity));
            if list.is_empty() {
                map.remove(&addr);
            }
        }
    }
}

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

/// A connection picked for one request.
struct Checkout {
    sender: Sender,
    activity: Arc<Activity>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves one HTTP/2 connection as both engines' connection loops do (the `PingPong`
    /// offered where the connection is polled, keep-alive beside it) against a client that
    /// answers pings or not: whether keep-alive gave up on the client within `within`, and
    /// whether it had taken the connection's `PingPong` by then.
    async fn keepalive_gives_up(client_answers: bool, within: Duration) -> (bool, bool) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client = tokio::spawn(async move {
            let (_send, conn) = h2::client::handshake(a).await.unwrap();
            if client_answers {
                let _ = conn.await;
            } else {
                // Held, never polled: no PONG comes back.
                let _conn = conn;
                std::future::pending::<()>().await;
            }
        });
        let mut conn = h2::server::handshake(b).await.unwrap();
        let pings = PingHandoff::default();
        let quiet = AtomicU64::new(0);
        let run = poll_fn(|cx| {
            pings.offer(|| conn.ping_pong());
            conn.poll_accept(cx).map(|_| ())
        });
        let alive = keepalive_every(
            &pings,
            &quiet,
            || true,
            Duration::from_millis(40),
            Duration::from_millis(150),
        );
        let gave_up = tokio::time::timeout(within, async {
            tokio::select! {
                () = run => panic!("the connection ended"),
                () = alive => true,
            }
        })
        .await
        .unwrap_or(false);
        client.abort();
        (gave_up, conn.ping_pong().is_none())
    }

    #[tokio::test]
    async fn keepalive_pings_an_idle_connection_and_gives_up_without_a_pong() {
        // Pinged after ~40-60 ms of quiet, given up 150 ms later.
        assert_eq!(
            keepalive_gives_up(false, Duration::from_secs(5)).await,
            (true, true)
        );
    }

    #[tokio::test]
    async fn keepalive_keeps_a_connection_that_answers_its_pings() {
        // A dozen or so pings in 800 ms, each answered.
        assert_eq!(
            keepalive_gives_up(true, Duration::from_millis(800)).await,
            (false, true)
        );
    }

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
    async fn idle_raw_connections_close_without_the_pool_being_touched() {
        use tokio::io::AsyncReadExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let idle = Duration::from_millis(200);
        let c = clients_idle(idle);
        let (conn, fresh) = c.checkout_raw(addr, false).await.unwrap();
        assert!(fresh);
        let (mut server, _) = l.accept().await.unwrap();
        let released = std::time::Instant::now();
        c.release_raw(conn);
        // Nothing touches the pool again: the upstream still sees the close.
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), server.read(&mut b))
            .await
            .expect("closed in time")
            .unwrap();
        assert_eq!(n, 0);
        let took = released.elapsed();
        assert!(took >= idle, "closed after {took:?}");
        // With the pool empty, its reaper has ended.
        let pools = &c.pools;
        assert!(pools.raw.lock().unwrap().idle.is_empty());
        tokio::time::timeout(Duration::from_secs(5), async {
            while pools.raw.lock().unwrap().reaping {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("reaper ended");
    }

    #[tokio::test]
    async fn pooled_raw_connections_are_reused_until_idle_too_long() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = clients_idle(Duration::from_secs(3600));
        let (conn, fresh) = c.checkout_raw(addr, false).await.unwrap();
        assert!(fresh);
        let _server = l.accept().await.unwrap();
        c.release_raw(conn);
        // Four reaper steps later it is still good; after a fifth it has idled too long.
        c.pools.raw.lock().unwrap().epoch += REAP_STEPS;
        let (conn, fresh) = c.checkout_raw(addr, false).await.unwrap();
        assert!(!fresh);
        c.release_raw(conn);
        c.pools.raw.lock().unwrap().epoch += REAP_STEPS + 1;
        let (_conn, fresh) = c.checkout_raw(addr, false).await.unwrap();
        assert!(fresh, "an expired connection was handed out");
    }

    #[test]
    fn address_hashes_differ() {
        use std::hash::BuildHasher;
        let h = rustc_hash::FxBuildHasher;
        let mut seen = std::collections::HashSet::new();
        for ip in 0..40u8 {
            for port in [80u16, 443, 8080, 8081, 9000] {
                let a = SocketAddr::from(([127, 0, 1, ip], port));
                assert!(seen.insert(h.hash_one(a)), "{a}");
            }
        }
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        assert!(seen.insert(h.hash_one(v6)));
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

    /// How the test server speaks.
    #[derive(Clone, Copy)]
    enum Serve {
        /// HTTP/1.1 with keep-alive.
        KeepAlive,
        /// HTTP/1.1, closing every connection after its first response.
        Close,
        /// h2c.
        H2,
    }

    /// A server on 127.0.0.1:0 that answers "ok" and counts the connections it accepts.
    async fn counting_server(how: Serve) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    });
                    let io = TokioIo::new(s);
                    let _ = match how {
                        Serve::H2 => {
                            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, svc)
                                .await
                        }
                        _ => {
                            hyper::server::conn::http1::Builder::new()
                                .keep_alive(matches!(how, Serve::KeepAlive))
                                .serve_connection(io, svc)
                                .await
                        }
                    };
                });
            }
        });
        (addr, accepted)
    }

    fn clients() -> Clients {
        clients_idle(Duration::from_secs(30))
    }

    /// Clients without limits whose pooled connections close after `idle`.
    fn clients_idle(idle: Duration) -> Clients {
        Clients::new(ConnectorConfig {
            connect_timeout: Some(Duration::from_secs(2)),
            max_connections: 0,
            max_pending: 0,
            idle_timeout: Some(idle),
            tls: None,
        })
    }

    /// Sends one GET and reads the body to its end, then releases the connection.
    async fn get(c: &Clients, addr: SocketAddr) -> Bytes {
        use http_body_util::BodyExt;
        let mut req = Request::new(
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        *req.uri_mut() = http::Uri::from_static("/");
        req.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("test"));
        let (resp, in_use) =
            tokio::time::timeout(Duration::from_secs(5), c.send(addr, false, false, req))
                .await
                .unwrap()
                .unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        in_use.release();
        body
    }

    #[tokio::test]
    async fn http1_connections_are_reused() {
        let (addr, accepted) = counting_server(Serve::KeepAlive).await;
        let c = clients();
        for _ in 0..5 {
            assert_eq!(get(&c, addr).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn closed_pooled_connection_is_replaced() {
        let (addr, accepted) = counting_server(Serve::Close).await;
        let c = clients();
        for _ in 0..3 {
            assert_eq!(get(&c, addr).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn concurrent_http2_requests_share_one_new_connection() {
        let (addr, accepted) = counting_server(Serve::H2).await;
        let c = clients();
        let uri: http::Uri = format!("http://{addr}/").parse().unwrap();
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (c, uri) = (c.clone(), uri.clone());
            tasks.push(tokio::spawn(async move {
                use http_body_util::BodyExt;
                let mut req = Request::new(
                    http_body_util::Empty::new()
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                );
                *req.uri_mut() = uri;
                let (resp, _in_use) = c.send(addr, false, true, req).await.unwrap();
                resp.into_body().collect().await.unwrap().to_bytes()
            }));
        }
        for t in tasks {
            let body = tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(body, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }
}
