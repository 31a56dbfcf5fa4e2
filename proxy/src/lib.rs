//! `sidemesh-proxy`: the sidecar data plane.
//!
//! A [`Proxy`] is driven by a `watch` channel of validated [`Snapshot`]s. For each new
//! version it derives the listener targets ([`state::State`]), stores them behind one
//! `ArcSwap`, binds the listeners that are new, and drains those that are gone; requests
//! and connections in flight finish on what they started with.
//!
//! - [`state`]: the derived, immutable state of one config version.
//! - [`balance`]: load-balancing policies over endpoints.
//! - [`http`]: HTTP/1.1, h2c and gRPC proxying with routing, retries and rewrites.
//! - [`h1`]: the lean HTTP/1.1 engine for the common case (hyper for the rest).
//! - [`http2`]: the lean HTTP/2 engine (the `h2` crate on both sides; hyper's forwarding
//!   for HTTP/1.1 upstreams).
//! - [`tcp`]: raw TCP proxying with half-close (plain TCP through buffers held only while
//!   bytes move, in `relay`).
//! - `accept`: accepting client connections, registered with the reactor only once they
//!   have to wait (plaintext HTTP/1.1).
//! - [`detect`]: protocol detection for `auto` ports.
//! - [`upstream`]: the connector and pooled clients, with breaker limits.
//! - [`tls`]: mutual TLS between sidecars, the sidecar's certificate, `allow_clients`.
//! - [`resilience`]: retry budget, backoff, outlier detection.
//! - [`health`]: active health checks.
//! - [`metrics`]: the `sidemesh_proxy_*` metrics.
//! - [`access`]: access logs, one line per HTTP request (off by default).
//! - [`register`]: universal mode, the instance's registration in discover's TTL registry.
//! - [`admin`]: the admin server (`/ready`, `/live`, `/metrics`).
//! - [`cli`]: the `sidemesh proxy` subcommand (and in-process sidecars for `sidemesh up`).
//! - [`demo`]: the demo backend of `sidemesh up`.
//! - [`fuzzing`]: entry points of the fuzz targets in `proxy/fuzz` (peer-input parsers).

mod accept;
pub mod access;
pub mod admin;
pub mod balance;
pub mod cli;
pub mod demo;
pub mod detect;
mod drain;
pub mod fuzzing;
pub mod h1;
pub mod health;
pub mod hostile;
pub mod http;
pub mod http2;
pub mod introspect;
pub mod metrics;
pub mod register;
mod relay;
pub mod resilience;
#[cfg(target_os = "linux")]
mod sockopt;
pub mod state;
pub mod tcp;
pub mod tls;
pub mod upstream;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use sidemesh_api::Snapshot;
use sidemesh_api::config::Protocol;
use tokio::net::TcpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::{LazyTcp, Listener};
use crate::detect::Detected;
pub(crate) use crate::drain::Drain;
use crate::http::{ConnCtx, ServerMode};
use crate::metrics::Metrics;
use crate::state::{Cache, Direction, State};
use crate::tls::{Accepted, Io, MeshTls};

/// Settings of the data plane that do not come from discover (they need a restart).
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// The address inbound listeners bind (the workload's address).
    pub inbound_address: IpAddr,
    /// The address the app listens on; inbound traffic goes to `<this>:<port>`. It is
    /// 127.0.0.1 in a pod; `sidemesh up` runs several apps on one host, each on its own
    /// loopback address.
    pub app_address: IpAddr,
    /// How long removed listeners and shutdown wait for connections to finish.
    pub drain_timeout: Duration,
    /// How long an `auto` port waits for the client's first bytes before treating the
    /// connection as raw TCP.
    pub detect_timeout: Duration,
    /// Time a client has to send a request's headers (slowloris guard).
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1 read buffer, HTTP/2 header list), in bytes.
    pub max_header_bytes: usize,
    /// Most headers in one HTTP/1 request.
    pub max_headers: usize,
    /// Most concurrent streams per HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// Most client connections open at once, over all listeners.
    pub max_connections: usize,
    /// Carry HTTP/1.1 requests to meshed endpoints over one multiplexed HTTP/2 connection
    /// (ALPN `h2` in the mutual TLS handshake); the inbound sidecar speaks HTTP/1.1 to the
    /// app again. Only between sidecars with mutual TLS. On by default: it measured faster
    /// than HTTP/1.1 keep-alive over mutual TLS (docs/benchmarks.md).
    pub mesh_h2: bool,
    /// The engine that serves HTTP/1.1 client connections.
    pub http1_engine: h1::Engine,
    /// The engine that serves HTTP/2 client connections.
    pub http2_engine: http2::Engine,
    /// Where access log lines go, if anywhere ([`access::AccessLog::start`]).
    pub access_log: Option<Arc<access::AccessLog>>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            inbound_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            app_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            drain_timeout: Duration::from_secs(15),
            detect_timeout: Duration::from_millis(300),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_concurrent_streams: 256,
            max_connections: 16_384,
            mesh_h2: true,
            http1_engine: h1::Engine::default(),
            http2_engine: http2::Engine::default(),
            access_log: None,
        }
    }
}

/// What the data plane shares between its tasks.
pub(crate) struct Shared {
    pub config: ProxyConfig,
    pub metrics: Metrics,
    pub state: ArcSwapOption<State>,
    /// The HTTP server settings, built once.
    pub servers: http::ServerBuilders,
    /// Mutual TLS: the sidecar's credentials and the TLS metrics.
    pub tls: Arc<MeshTls>,
    cache: Mutex<Cache>,
    conn_slots: Arc<Semaphore>,
}

/// The outcome of applying one config version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The version applied.
    pub version: u64,
    /// Listener addresses bound now.
    pub listening: Vec<SocketAddr>,
    /// Listener addresses that could not be bound (retried on the next version).
    pub failed: Vec<SocketAddr>,
}

/// A read-only view of a [`Proxy`]'s state in force ([`Proxy::view`]).
#[derive(Clone)]
pub struct StateView(Arc<Shared>);

impl StateView {
    /// The state in force, if a config was applied.
    pub fn state(&self) -> Option<Arc<State>> {
        self.0.state.load_full()
    }
}

impl std::fmt::Debug for StateView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateView").finish_non_exhaustive()
    }
}

/// The sidecar's data plane.
pub struct Proxy {
    shared: Arc<Shared>,
    applied: watch::Sender<Option<Applied>>,
}

struct ListenerHandle {
    drain: Drain,
    tracker: TaskTracker,
    direction: Direction,
    /// The listening socket, shared with its accept loop: its options change when its
    /// port's protocol changes (see [`set_client_first`]).
    listener: Arc<Listener>,
    /// Whether the socket is set up for clients that speak first.
    client_first: bool,
}

impl Proxy {
    /// Makes a data plane and registers its metrics.
    pub fn new(config: ProxyConfig, registry: &prometheus::Registry) -> prometheus::Result<Proxy> {
        let metrics = Metrics::new(registry)?;
        let tls = Arc::new(MeshTls::new(registry)?);
        let conn_slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
        Ok(Proxy {
            shared: Arc::new(Shared {
                servers: http::ServerBuilders::new(&config),
                config,
                metrics,
                state: ArcSwapOption::empty(),
                cache: Mutex::new(Cache::with_tls(tls.clone())),
                tls,
                conn_slots,
            }),
            applied: watch::Sender::new(None),
        })
    }

    /// The data plane's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The mutual TLS state: give it credentials with [`MeshTls::install`], or keep them
    /// current with [`tls::run_identity`].
    pub fn tls(&self) -> Arc<MeshTls> {
        self.shared.tls.clone()
    }

    /// A read-only view of the state in force, for the admin server's `/endpoints`.
    pub fn view(&self) -> StateView {
        StateView(self.shared.clone())
    }

    /// Follows what config versions were applied (for readiness and tests).
    pub fn applied(&self) -> watch::Receiver<Option<Applied>> {
        self.applied.subscribe()
    }

    /// Runs until `shutdown` fires: applies every snapshot the channel delivers, then
    /// drains all listeners (at most the drain timeout) and returns.
    pub async fn run(
        &self,
        mut snapshots: watch::Receiver<Option<Snapshot>>,
        shutdown: CancellationToken,
    ) {
        let mut listeners: HashMap<SocketAddr, ListenerHandle> = HashMap::new();
        let mut current: Option<u64> = None;
        let mut open = true;
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(5),
            Duration::from_secs(5),
        );
        let mut checks = CancellationToken::new();
        loop {
            let snap = snapshots.borrow_and_update().clone();
            if let Some(snap) = snap {
                if current != Some(snap.version()) {
                    self.apply(&snap, &mut listeners);
                    current = Some(snap.version());
                    checks.cancel();
                    checks = CancellationToken::new();
                    if let Some(state) = self.shared.state.load_full() {
                        health::spawn(&state, &checks);
                    }
                }
            }
            tokio::select! {
                r = snapshots.changed(), if open => {
                    if r.is_err() {
                        // The config source ended: keep serving the last config.
                        open = false;
                    }
                }
                _ = tick.tick() => {
                    self.update_health_gauges();
                    // Listeners that could not be bound are retried, so a port freed
                    // later is picked up without a new config.
                    let retry = self.applied.borrow().as_ref().is_some_and(|a| !a.failed.is_empty());
                    if retry {
                        if let Some(state) = self.shared.state.load_full() {
                            self.bind_missing(&state, &mut listeners);
                        }
                    }
                }
                _ = shutdown.cancelled() => break,
            }
        }
        checks.cancel();
        let started = Instant::now();
        let drains: Vec<_> = listeners
            .drain()
            .map(|(addr, h)| drain(addr, h, self.shared.config.drain_timeout))
            .collect();
        futures::future::join_all(drains).await;
        self.shared
            .metrics
            .drain_duration
            .observe(started.elapsed().as_secs_f64());
    }

    fn apply(&self, snap: &Snapshot, listeners: &mut HashMap<SocketAddr, ListenerHandle>) {
        let m = &self.shared.metrics;
        let state = {
            let mut cache = match self.shared.cache.lock() {
                Ok(c) => c,
                Err(poisoned) => poisoned.into_inner(),
            };
            Arc::new(State::build(
                snap,
                self.shared.config.inbound_address,
                self.shared.config.app_address,
                &mut cache,
            ))
        };
        self.shared.state.store(Some(state.clone()));

        let gone: Vec<SocketAddr> = listeners
            .keys()
            .filter(|a| !state.listeners.contains_key(a))
            .copied()
            .collect();
        for addr in gone {
            if let Some(h) = listeners.remove(&addr) {
                tracing::info!(%addr, "listener removed; draining");
                let timeout = self.shared.config.drain_timeout;
                let hist = m.drain_duration.clone();
                tokio::spawn(async move {
                    let t0 = Instant::now();
                    drain(addr, h, timeout).await;
                    hist.observe(t0.elapsed().as_secs_f64());
                });
            }
        }
        m.config_version.set(snap.version() as i64);
        m.config_applies.inc();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        m.config_applied.set(now);
        self.bind_missing(&state, listeners);
        self.update_health_gauges();
    }

    /// Binds every listener of the current state that is not bound yet (new ones, and
    /// those that failed before), then publishes what is bound.
    fn bind_missing(&self, state: &State, listeners: &mut HashMap<SocketAddr, ListenerHandle>) {
        let m = &self.shared.metrics;
        let mut failed = Vec::new();
        for (addr, target) in &state.listeners {
            let client_first = matches!(
                target.protocol,
                Protocol::Http1 | Protocol::Http2 | Protocol::Grpc
            );
            if let Some(h) = listeners.get_mut(addr) {
                // Kept across a change of its port's protocol: a deferred accept left on
                // a port whose server now speaks first would hold every client a second.
                if h.client_first != client_first {
                    set_client_first(&*h.listener, *addr, client_first);
                    h.client_first = client_first;
                }
                continue;
            }
            match bind(*addr, client_first) {
                Ok(l) => {
                    let listener = Arc::new(l);
                    let h = ListenerHandle {
                        drain: Drain::default(),
                        tracker: TaskTracker::new(),
                        direction: target.direction,
                        listener: listener.clone(),
                        client_first,
                    };
                    tokio::spawn(accept_loop(
                        self.shared.clone(),
                        listener,
                        *addr,
                        h.drain.clone(),
                        h.tracker.clone(),
                    ));
                    tracing::info!(%addr, direction = target.direction.as_str(), protocol = %target.protocol, "listening");
                    listeners.insert(*addr, h);
                }
                Err(e) => {
                    m.bind_failures
                        .with_label_values(&[target.direction.as_str()])
                        .inc();
                    tracing::error!(%addr, error = %e, "cannot bind listener; the rest of the config applies");
                    failed.push(*addr);
                }
            }
        }
        for d in [Direction::Inbound, Direction::Outbound] {
            let n = listeners.values().filter(|h| h.direction == d).count();
            m.listeners.with_label_values(&[d.as_str()]).set(n as i64);
        }
        let version = state.snapshot.version();
        tracing::info!(
            version,
            listeners = listeners.len(),
            failed = failed.len(),
            "config applied"
        );
        let mut listening: Vec<SocketAddr> = listeners.keys().copied().collect();
        listening.sort();
        failed.sort();
        self.applied.send_replace(Some(Applied {
            version,
            listening,
            failed,
        }));
    }

    fn update_health_gauges(&self) {
        let Some(state) = self.shared.state.load_full() else {
            return;
        };
        for (addr, t) in &state.listeners {
            if t.direction == Direction::Outbound {
                self.shared
                    .metrics
                    .healthy_endpoints
                    .with_label_values(&[&*t.service.label, &addr.port().to_string()])
                    .set(t.default_backend.balancer.healthy_count() as i64);
            }
        }
    }
}

async fn drain(addr: SocketAddr, h: ListenerHandle, timeout: Duration) {
    // The handle's share of the socket goes first, so it closes as soon as the accept
    // loop lets go of it: new clients are refused at once, and the address can be bound
    // again.
    drop(h.listener);
    h.drain.soft.cancel();
    h.tracker.close();
    if tokio::time::timeout(timeout, h.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(%addr, "drain timeout; closing remaining connections");
    }
    h.drain.hard.cancel();
}

/// Binds a listener. Accepted sockets inherit TCP_NODELAY from it, and, for a listener
/// whose clients speak first (`client_first`: HTTP/1.1, HTTP/2, gRPC), delayed ACKs.
///
/// A fresh TCP connection starts in quick-ACK mode: the kernel acknowledges the client's
/// request at once with a segment of its own, although the answer follows within
/// microseconds and would carry the ACK. Clearing TCP_QUICKACK on the listening socket
/// (after `listen`, which resets it; the accepted sockets copy it) lets the answer carry
/// it: one segment fewer per connection, which the *client's* side pays for (on loopback
/// the ACK is built, sent and taken in by the core that sent the request). HAProxy does
/// the same on its HTTP listeners (`option tcp-smart-accept`, on by default). The cost is
/// for a client that sends its request in pieces while Nagle holds back the next piece
/// until the previous one is acknowledged: its first wait is one delayed-ACK timeout (the
/// kernel then leaves that mode for the connection). Raw TCP and `auto` listeners, where
/// such clients are likelier, keep quick ACKs. A listener kept across a config change of
/// its port's protocol is set up again ([`set_client_first`]).
///
/// Client-first listeners also set TCP_DEFER_ACCEPT (`DEFER_ACCEPT_SECS`): the kernel
/// makes a connection acceptable when its client's first bytes arrive, not on the
/// handshake's last ACK. The listener then wakes once per connection with the request
/// already there, instead of accepting, finding nothing to read, registering the socket
/// and being woken again; the sidecar and the client's core both spend less per
/// connection. A client that connects and sends nothing waits in the kernel (a request
/// socket, no descriptor, bounded by the listen backlog) for about a second, and is then
/// accepted anyway, after which the header-read timeout and the connection limit apply
/// as before. HAProxy's `defer-accept` bind option and nginx's `deferred` are the same.
/// Never on raw TCP or `auto` listeners: a server-first protocol (SMTP, MySQL) would wait
/// that second for a greeting its client never gets.
fn bind(addr: SocketAddr, client_first: bool) -> std::io::Result<Listener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(1024)?.into_std()?;
    if client_first {
        set_client_first(&listener, addr, true);
    }
    Listener::new(listener)
}

/// Sets up a listening socket for clients that speak first (delayed ACKs, deferred
/// accepts; see [`bind`]) or not (quick ACKs, accepts on the handshake). Optimisations
/// only: a listener serves without them, so a failure is logged, not returned.
fn set_client_first(listener: &impl std::os::fd::AsFd, addr: SocketAddr, client_first: bool) {
    #[cfg(target_os = "linux")]
    {
        if let Err(e) = socket2::SockRef::from(listener).set_tcp_quickack(!client_first) {
            tracing::debug!(%addr, error = %e, "cannot set TCP_QUICKACK on the listener");
        }
        let defer = if client_first { DEFER_ACCEPT_SECS } else { 0 };
        if let Err(e) = sockopt::set_defer_accept(listener, defer) {
            tracing::debug!(%addr, error = %e, "cannot set TCP_DEFER_ACCEPT on the listener");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (listener, addr, client_first);
}

/// How long a client-first listener's kernel holds a connection whose client has sent
/// nothing before it is accepted anyway (TCP_DEFER_ACCEPT; see `bind`).
#[cfg(target_os = "linux")]
const DEFER_ACCEPT_SECS: u32 = 1;

async fn accept_loop(
    shared: Arc<Shared>,
    listener: Arc<Listener>,
    addr: SocketAddr,
    drain: Drain,
    tracker: TaskTracker,
) {
    // One wait for the whole loop, not one registered and dropped per connection.
    let stop = drain.soft.cancelled();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.as_mut() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(slot) = shared.conn_slots.clone().try_acquire_owned() else {
                    shared.metrics.connection_limit_rejections.inc();
                    continue;
                };
                tracker.spawn(connection(
                    shared.clone(),
                    addr,
                    stream,
                    peer,
                    drain.clone(),
                    slot,
                ));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%addr, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // Dropping the listener closes it: no new connections.
}

/// An accepted connection registered with the reactor; `None` (logged) if that failed.
fn registered(stream: LazyTcp, peer: SocketAddr) -> Option<tokio::net::TcpStream> {
    stream
        .into_registered()
        .map_err(|e| tracing::debug!(%peer, error = %e, "cannot register an accepted connection"))
        .ok()
}

/// Serves one accepted connection. Its future is moved and copied whole several times on
/// the way into its task (and the task's stage is rewritten whole when it ends), so what
/// only some connections need (the TLS handshake, detection, raw TCP, hyper) is boxed,
/// which keeps the lean HTTP/1.1 path's future small.
async fn connection(
    shared: Arc<Shared>,
    listen: SocketAddr,
    stream: LazyTcp,
    peer: SocketAddr,
    drain: Drain,
    _slot: OwnedSemaphorePermit,
) {
    let Some((target, snapshot, generation)) = shared.state.load().as_ref().and_then(|s| {
        Some((
            s.listeners.get(&listen).cloned()?,
            s.snapshot.clone(),
            s.generation,
        ))
    }) else {
        return;
    };
    // No TCP_NODELAY call here: accepted sockets inherit it from the listener (see
    // `bind`), which saves a syscall per connection.
    let dir = target.direction.as_str();
    let m = &shared.metrics;
    // Series resolved once per listener and direction, not per connection.
    target
        .connection_metrics
        .get_or_init(|| {
            m.tcp_connections
                .with_label_values(&[dir, &*target.service.label])
        })
        .inc();
    let open = &m.tcp_open_by_direction[usize::from(target.direction == Direction::Outbound)];
    open.inc();
    // Inbound: peel mutual TLS off (the client's verified identity comes with it).
    let inbound = target.direction == Direction::Inbound;
    let (mut stream, client_id) = if inbound {
        let Some(stream) = registered(stream, peer) else {
            open.dec();
            return;
        };
        let own = snapshot.identity();
        let own = format!("{}/{}", own.namespace, own.service);
        let mode = snapshot.tls_mode_by_outer(sidemesh_api::OuterPort(listen.port()));
        let accept = Box::pin(tls::accept(
            &shared.tls,
            mode,
            &own,
            stream,
            shared.config.detect_timeout,
        ));
        let accepted = tokio::select! {
            a = accept => a,
            _ = drain.hard.cancelled() => Accepted::Refused,
        };
        match accepted {
            Accepted::Go(io, id) => (io, id),
            Accepted::Refused => {
                open.dec();
                return;
            }
        }
    } else if target.protocol == Protocol::Http1 {
        // Plaintext HTTP/1.1 is served on the socket as accepted (registered with the
        // reactor only if it has to wait); the other paths take a registered stream.
        (Io::Accepted(stream), None)
    } else {
        let Some(stream) = registered(stream, peer) else {
            open.dec();
            return;
        };
        (Io::Plain(stream), None)
    };
    let mode = match target.protocol {
        // The peer sidecar carries HTTP/1.1 over HTTP/2 (`mesh_h2`); the app still gets
        // HTTP/1.1 from the inbound side.
        Protocol::Http1 | Protocol::Auto if stream.alpn_h2() => Detected::Http2,
        Protocol::Http1 => Detected::Http1,
        Protocol::Http2 | Protocol::Grpc => Detected::Http2,
        Protocol::Tcp => Detected::Tcp,
        Protocol::Auto => {
            let timeout = shared.config.detect_timeout;
            let detect = Box::pin(async {
                match &mut stream {
                    Io::Plain(s) => detect::detect(s, timeout).await,
                    tls => tls::detect_in(tls, timeout, detect::classify)
                        .await
                        .unwrap_or(Detected::Tcp),
                }
            });
            tokio::select! {
                d = detect => d,
                _ = drain.hard.cancelled() => Detected::Tcp,
            }
        }
    };
    match mode {
        Detected::Tcp => {
            // `allow_clients` on raw TCP: a refused client's connection is closed.
            let port = snapshot.inbound_by_outer(sidemesh_api::OuterPort(listen.port()));
            if let Some(reason) = port
                .filter(|_| inbound)
                .and_then(|p| tls::refusal(p, client_id.as_deref()))
            {
                let own = snapshot.identity();
                shared
                    .tls
                    .metrics
                    .authz_denied
                    .with_label_values(&[
                        "inbound",
                        &format!("{}/{}", own.namespace, own.service),
                        reason,
                    ])
                    .inc();
                tracing::debug!(%peer, client = client_id.as_deref().unwrap_or("-"), reason, "TCP connection refused by allow_clients");
                if let Some(log) = &shared.config.access_log {
                    log.record_tcp(&access::Tcp {
                        started: std::time::SystemTime::now(),
                        direction: target.direction.as_str(),
                        service: &target.service.name,
                        end: access::TcpEnd::Refused,
                        duration: Duration::ZERO,
                        client: peer,
                        client_id: client_id.as_deref(),
                        upstream: None,
                        to_upstream: 0,
                        to_client: 0,
                    });
                }
                open.dec();
                return;
            }
            tokio::select! {
                _ = Box::pin(tcp::proxy(&shared, &target, stream, peer, client_id.as_deref())) => {}
                _ = drain.hard.cancelled() => {}
            }
        }
        Detected::Http1 | Detected::Http2 => {
            let ctx = Arc::new(ConnCtx {
                shared: shared.clone(),
                listen,
                peer,
                target,
                client_id,
                generation,
                mode: if mode == Detected::Http2 {
                    ServerMode::Http2
                } else {
                    ServerMode::Http1
                },
            });
            if ctx.mode == ServerMode::Http1 && shared.config.http1_engine == h1::Engine::Lean {
                Box::pin(h1::serve(ctx, stream, drain)).await;
            } else if ctx.mode == ServerMode::Http2
                && shared.config.http2_engine == http2::Engine::Lean
            {
                Box::pin(http2::serve(ctx, stream, drain)).await;
            } else {
                Box::pin(http::serve(ctx, stream, drain)).await;
            }
        }
    }
    open.dec();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener from `bind` and one connection accepted on it (with its client, which
    /// must stay open while the socket is looked at).
    async fn accept_one(client_first: bool) -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = bind("127.0.0.1:0".parse().unwrap(), client_first).unwrap();
        let addr = l.local_addr().unwrap();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        // A client-first listener accepts a connection once its client has said something.
        tokio::io::AsyncWriteExt::write_all(&mut client, b"x")
            .await
            .unwrap();
        let (server, _) = tokio::time::timeout(Duration::from_secs(5), l.accept())
            .await
            .unwrap()
            .unwrap();
        (server.into_registered().unwrap(), client)
    }

    /// `connection` relies on this instead of setting TCP_NODELAY on every accepted socket.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let (server, _client) = accept_one(false).await;
        assert!(server.nodelay().unwrap());
    }

    /// Sockets accepted on a client-first listener start with delayed ACKs (the answer
    /// carries the ACK of the request); the others keep the kernel's quick ACKs.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn client_first_listeners_delay_the_first_ack() {
        for client_first in [true, false] {
            let (server, _client) = accept_one(client_first).await;
            let quick = socket2::SockRef::from(&server).tcp_quickack().unwrap();
            assert_eq!(quick, !client_first, "client_first {client_first}");
        }
    }
}
