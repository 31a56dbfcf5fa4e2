//! HTTP proxying (HTTP/1.1, h2c, gRPC): the server side of a client connection, and per
//! request: route, breaker, balance, forward over a pooled client, retry, rewrite.
//!
//! Requests are framed by hyper on both sides: it rejects bad chunking, duplicate
//! `Content-Length`s and bad header bytes, and for `Content-Length` with
//! `Transfer-Encoding` it lets chunked win, drops the length and closes the connection after
//! answering (RFC 9112 §6.1), so nothing can hide behind the body; `hostile` goes further
//! and refuses such a request (and any other ambiguous framing) before it goes upstream. Hop-by-hop headers, with every header named
//! in `Connection`, are removed in both directions (RFC 9110 §7.6.1). A response body is streamed as it comes; if the upstream
//! fails mid-body, the error reaches hyper, which aborts the client's connection (or
//! stream), so a cut response is never presented as complete.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rand::Rng;
use sidemesh_api::config::{Protocol, RetryOn, RetryPolicy};

use crate::balance::{Endpoint, request_hash};
use crate::metrics::{Metrics, RequestMetrics};
use crate::resilience::{Outcome, backoff, record};
use crate::state::{Backend, Direction, RouteState, Target};
use crate::upstream::{Body, BoxError, ConnectError, InUse, SendError};
use crate::{Drain, Shared};

/// Largest request body buffered so that it can be replayed on a retry.
const MAX_REPLAY_BODY: usize = 64 * 1024;
/// Response header naming the circuit-breaker limit that refused a request.
pub const OVERLOADED: &str = "x-sidemesh-overloaded";
/// Response header saying why the sidecar (not the upstream) answered with an error.
pub const ERROR: &str = "x-sidemesh-error";

/// How the server side of a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ServerMode {
    Http1,
    Http2,
}

/// Per-connection context.
pub(crate) struct ConnCtx {
    pub shared: Arc<Shared>,
    pub listen: SocketAddr,
    pub peer: SocketAddr,
    /// The target at accept time: used if the listener disappears from the config while
    /// the connection still has requests to finish.
    pub target: Arc<Target>,
    /// The client's verified mesh identity (`namespace/service`), inbound over mutual TLS.
    pub client_id: Option<Arc<str>>,
    pub mode: ServerMode,
    /// The [`crate::state::State::generation`] the connection was accepted under.
    pub generation: u64,
}

impl ConnCtx {
    /// The access log line of `req`, which started at `start`, when access logs are on
    /// (nothing is copied otherwise).
    pub(crate) fn logged<B>(
        &self,
        req: &Request<B>,
        start: Instant,
    ) -> Option<Arc<crate::access::Line>> {
        let log = self.shared.config.access_log.as_ref()?;
        let request = crate::access::Request::of(req);
        Some(crate::access::Line::new(log, request, self.who(), start))
    }

    /// Where this connection's requests come in, for their access log lines.
    pub(crate) fn who(&self) -> crate::access::Who {
        crate::access::Who {
            direction: self.target.direction.as_str(),
            service: self.target.service.name.clone(),
            client: self.peer,
            client_id: self.client_id.clone(),
        }
    }
}

/// The HTTP server settings, built once (not per connection) and shared by every
/// connection: one builder per server mode.
pub(crate) struct ServerBuilders {
    h1: hyper_util::server::conn::auto::Builder<TokioExecutor>,
    h2: hyper_util::server::conn::auto::Builder<TokioExecutor>,
    /// The lean HTTP/2 engine's ([`crate::http2`]).
    pub(crate) lean_h2: h2::server::Builder,
}

impl ServerBuilders {
    /// The builders for the limits in `limits`.
    pub(crate) fn new(limits: &crate::ProxyConfig) -> ServerBuilders {
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_headers(limits.max_headers)
            .max_buf_size(limits.max_header_bytes.max(8192))
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(limits.max_header_bytes as u32)
            .max_concurrent_streams(limits.max_concurrent_streams)
            // Rapid reset and error-reset floods end in GOAWAY (h2 ≥ 0.4.2; these are h2's
            // defaults, set here so they cannot drift).
            .max_pending_accept_reset_streams(Some(20))
            .max_local_error_reset_streams(Some(1024))
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        ServerBuilders {
            h1: builder.clone().http1_only(),
            h2: builder.http2_only(),
            lean_h2: crate::http2::server_builder(limits),
        }
    }
}

/// Serves HTTP on one accepted connection until it ends, or until drain asks it to finish.
pub(crate) async fn serve<S>(ctx: Arc<ConnCtx>, stream: S, drain: Drain)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let builder = match ctx.mode {
        ServerMode::Http1 => &ctx.shared.servers.h1,
        ServerMode::Http2 => &ctx.shared.servers.h2,
    };
    let svc_ctx = ctx.clone();
    let scan = crate::hostile::Scan::for_http1(ctx.mode == ServerMode::Http1);
    let svc_scan = scan.clone();
    let svc = hyper::service::service_fn(move |req| {
        let ctx = svc_ctx.clone();
        let refused = crate::hostile::refuse(&req, svc_scan.as_deref());
        async move {
            Ok::<_, Infallible>(match refused {
                Some(r) => r,
                None => handle(ctx, req).await,
            })
        }
    });
    // Idle client connections are closed (gracefully: a request in flight finishes).
    let idle_ms = ctx.target.service.timeouts.idle_ms;
    let activity = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let io = crate::hostile::ScanIo::new(crate::tcp::Timed::new(stream, activity.clone()), scan);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let idle = async {
        match idle_ms {
            0 => std::future::pending().await,
            ms => crate::tcp::idle_watch(&activity, Duration::from_millis(ms)).await,
        }
    };
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(peer = %ctx.peer, error = %e, "HTTP connection ended with an error");
            }
            return;
        }
        _ = drain.soft.cancelled() => {}
        _ = idle => {
            ctx.shared.metrics.timeouts.with_label_values(&[&*ctx.target.service.label, "idle"]).inc();
        }
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = drain.hard.cancelled() => {}
    }
}

/// Handles one request: everything that can go wrong becomes a response here.
pub(crate) async fn handle<B>(ctx: Arc<ConnCtx>, mut req: Request<B>) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let start = Instant::now();
    let logged = ctx.logged(&req, start);
    let (target, authz) = resolve(&ctx);
    pass_identity(&target, req.headers_mut(), &authz);
    let denied = authz.err().map(|r| *r);
    let (index, backend) = select(&target, &req);
    let route = index.and_then(|i| target.routes.get(i));
    let resp = match denied {
        Some(r) => r,
        None => {
            let tally = crate::access::Tally::new(logged.as_ref(), crate::access::Side::Received);
            let req = req.map(|body| Counted::new(body, tally, None));
            forward(&ctx, route, &backend, req).await
        }
    };
    let status = resp.status().as_u16();
    let upstream = crate::access::Upstream::of(&resp);
    observe(
        &ctx,
        &target,
        index,
        status,
        start,
        logged.as_deref(),
        upstream,
    );
    let grpc = GrpcEnd::new(&target, index, resp.headers());
    if logged.is_none() && grpc.is_none() {
        return resp;
    }
    // The line is written, and a gRPC status counted, when the response body is done.
    let tally = crate::access::Tally::new(logged.as_ref(), crate::access::Side::Sent);
    resp.map(|body| Body::new(Counted::new(body, tally, grpc)))
}

/// The `grpc-status` of a header block (trailers, or the head of a trailers-only
/// response), if it has a valid one.
pub(crate) fn grpc_status(headers: &HeaderMap) -> Option<u8> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// Counts a gRPC response in `sidemesh_proxy_grpc_responses_total` once, when it ends:
/// by the status of its trailers ([`GrpcEnd::trailers`]), else by its head's (a
/// trailers-only response), else as `none` (it ended without one, or was cut). Boxed: a
/// stream's future holds an `Option` of it, one pointer wide when there is none.
pub(crate) struct GrpcEnd(Box<GrpcCount>);

struct GrpcCount {
    target: Arc<Target>,
    slot: usize,
    head: Option<u8>,
    counted: bool,
}

impl GrpcEnd {
    /// One for a response with `head`ers of `target`'s route `index`, when the listener is
    /// a `grpc` port.
    #[inline]
    pub(crate) fn new(
        target: &Arc<Target>,
        index: Option<usize>,
        head: &HeaderMap,
    ) -> Option<GrpcEnd> {
        (target.protocol == Protocol::Grpc).then(|| {
            GrpcEnd(Box::new(GrpcCount {
                target: target.clone(),
                slot: index.unwrap_or(target.routes.len()),
                head: grpc_status(head),
                counted: false,
            }))
        })
    }

    /// The response's trailers went to the client.
    pub(crate) fn trailers(&mut self, trailers: &HeaderMap) {
        self.count(grpc_status(trailers));
    }

    /// Counts the response with `code` (once; later calls do nothing).
    pub(crate) fn count(&mut self, code: Option<u8>) {
        let c = &mut *self.0;
        if std::mem::replace(&mut c.counted, true) {
            return;
        }
        // Resolved when the response head was counted ([`observe`]).
        let series = c.target.request_metrics.get(c.slot);
        if let Some(rm) = series.and_then(std::sync::OnceLock::get) {
            rm.grpc(code);
        }
    }
}

impl Drop for GrpcEnd {
    fn drop(&mut self) {
        self.count(self.0.head);
    }
}

pin_project_lite::pin_project! {
    /// A body whose data bytes are counted in its request's access log line (with access
    /// logs on), and whose trailers' `grpc-status` is counted (a response on a `grpc`
    /// port). The body holds its share of the line until it is dropped: done, or cut.
    pub(crate) struct Counted<B> {
        #[pin]
        inner: B,
        tally: crate::access::Tally,
        grpc: Option<GrpcEnd>,
    }
}

impl<B: http_body::Body> Counted<B> {
    pub(crate) fn new(inner: B, tally: crate::access::Tally, grpc: Option<GrpcEnd>) -> Counted<B> {
        if inner.is_end_stream() {
            tally.end();
        }
        Counted { inner, tally, grpc }
    }
}

impl<B: http_body::Body> http_body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.tally.add(bytes::Buf::remaining(data));
                }
                if let (Some(trailers), Some(g)) = (frame.trailers_ref(), this.grpc.as_mut()) {
                    g.trailers(trailers);
                }
                // Servers stop polling a body that says it has ended.
                if frame.is_trailers() || this.inner.is_end_stream() {
                    this.tally.end();
                }
            }
            Poll::Ready(None) => this.tally.end(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The listener's target in the current config, and for inbound listeners the
/// `allow_clients` verdict on the verified identity ([`crate::tls::authorize`]): `Err` is
/// the response for a refused client, `Ok` the identity to pass on to the app (always
/// `Ok(None)` outbound).
pub(crate) fn resolve(ctx: &ConnCtx) -> (Arc<Target>, crate::tls::Verdict<'_>) {
    // Requests read the current config, so endpoint and policy changes apply to new
    // requests on open connections; a listener that was removed finishes on its old one.
    // Under the config the connection was accepted with, its target is the one it has.
    let state = ctx.shared.state.load();
    let target = match state.as_ref() {
        Some(s) if s.generation == ctx.generation => ctx.target.clone(),
        Some(s) => s
            .listeners
            .get(&ctx.listen)
            .cloned()
            .unwrap_or_else(|| ctx.target.clone()),
        None => ctx.target.clone(),
    };
    let authz = match (target.direction, state.as_ref()) {
        (Direction::Inbound, Some(s)) => crate::tls::authorize(
            &ctx.shared.tls,
            &s.snapshot,
            ctx.listen.port(),
            ctx.client_id.as_deref(),
        ),
        _ => Ok(None),
    };
    (target, authz)
}

/// Inbound, puts the client's verified identity (from [`resolve`]) in the request's
/// [`crate::tls::CLIENT_ID_HEADER`] for the app, and removes one the client sent itself:
/// a forged identity never reaches the app.
pub(crate) fn pass_identity(
    target: &Target,
    headers: &mut HeaderMap,
    authz: &crate::tls::Verdict<'_>,
) {
    if target.direction != Direction::Inbound {
        return;
    }
    headers.remove(crate::tls::CLIENT_ID_HEADER);
    if let Ok(Some(id)) = authz {
        if let Ok(v) = HeaderValue::from_str(id) {
            headers.insert(crate::tls::CLIENT_ID_HEADER, v);
        }
    }
}

/// Counts a request in its route's series (resolved once, on first use, not per request).
pub(crate) fn observe(
    ctx: &ConnCtx,
    target: &Target,
    index: Option<usize>,
    status: u16,
    start: Instant,
    logged: Option<&crate::access::Line>,
    upstream: Option<SocketAddr>,
) {
    // One clock read for the histogram and the log line.
    let elapsed = start.elapsed();
    if let Some(line) = logged {
        line.head(crate::access::Head {
            service: target.service.name.clone(),
            route: index
                .and_then(|i| target.routes.get(i))
                .map(|r| r.name.clone()),
            status,
            response: elapsed,
            upstream,
        });
    }
    let slot = index.unwrap_or(target.routes.len());
    if let Some(cell) = target.request_metrics.get(slot) {
        let rm = cell.get_or_init(|| {
            RequestMetrics::new(
                &ctx.shared.metrics,
                target.direction.as_str(),
                &target.service.label,
                index
                    .and_then(|i| target.routes.get(i))
                    .map(|r| &*r.name)
                    .unwrap_or("default"),
            )
        });
        rm.observe(status, elapsed);
    }
}

/// Picks the first matching route (its index) and one of its weighted backends.
pub(crate) fn select<B>(target: &Target, req: &Request<B>) -> (Option<usize>, Arc<Backend>) {
    if target.routes.is_empty() {
        return (None, target.default_backend.clone());
    }
    let host = req.uri().host().or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    let headers = req.headers();
    select_route(
        target,
        req.method().as_str(),
        host,
        req.uri().path(),
        |name| headers.get(name).and_then(|v| v.to_str().ok()),
    )
}

/// Picks the first route that matches the request's method, host (port stripped here),
/// path and headers (`header` looks up a first value by lower-case name), and one of its
/// weighted backends; the default backend when none matches.
pub(crate) fn select_route<'a>(
    target: &Target,
    method: &str,
    host: Option<&str>,
    path: &str,
    header: impl Fn(&str) -> Option<&'a str>,
) -> (Option<usize>, Arc<Backend>) {
    let host = host.map(strip_port);
    let found = target
        .routes
        .iter()
        .position(|r| r.matcher.matches(method, host, path, &header));
    let Some((index, route)) = found.and_then(|i| Some((i, target.routes.get(i)?))) else {
        return (None, target.default_backend.clone());
    };
    let backend = match route.backends.as_slice() {
        [(_, only)] => only.clone(),
        many => {
            let mut r = rand::rng().random_range(0..route.total_weight.max(1));
            let mut chosen = target.default_backend.clone();
            for (w, b) in many {
                if r < *w {
                    chosen = b.clone();
                    break;
                }
                r -= w;
            }
            chosen
        }
    };
    (Some(index), backend)
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map(|(h, _)| &h[1..]).unwrap_or(host);
    }
    host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
}

/// An error the sidecar answers itself.
pub(crate) fn error(status: StatusCode, why: &'static str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(format!("sidemesh: {why}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(ERROR, HeaderValue::from_static(why));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Injects the route's faults into a request about to go on: waits out a delay that
/// applies, and gives the answer of an abort that does (`x-sidemesh-error: fault-abort`).
/// Call it only for a route with faults, and boxed: it is a test feature, off the common
/// path, and its timer would otherwise make every request's future larger.
pub(crate) async fn inject_fault(
    m: &Metrics,
    label: &str,
    fault: &crate::state::FaultState,
) -> Option<Response<Body>> {
    let (delay, abort) = fault.draw();
    if let Some(d) = delay {
        m.faults.with_label_values(&[label, "delay"]).inc();
        tokio::time::sleep(d).await;
    }
    let status = abort?;
    m.faults.with_label_values(&[label, "abort"]).inc();
    Some(error(status, "fault-abort"))
}

/// The `503` for a request a circuit-breaker limit refused, naming the limit.
pub(crate) fn overloaded(why: &'static str) -> Response<Body> {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "overloaded");
    r.headers_mut()
        .insert(OVERLOADED, HeaderValue::from_static(why));
    r
}

fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Decrements the service's active-request count when the request is done (its response
/// body included).
pub(crate) struct ActiveGuard {
    backend: Arc<Backend>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.backend
            .service
            .shared
            .active
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// Decrements an endpoint's in-flight count when the response body is done.
pub(crate) struct InflightGuard(pub(crate) Arc<Endpoint>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.stats.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that holds guards until it is finished or dropped. Its upstream
/// HTTP/1.1 connection goes back to the pool only if the body was read to its end.
struct GuardedBody {
    inner: Incoming,
    conn: Option<InUse>,
    done: bool,
    _guards: (Option<ActiveGuard>, InflightGuard),
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        if self.done || self.inner.is_end_stream() {
            if let Some(c) = self.conn.take() {
                c.release();
            }
        }
    }
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(|e| Box::new(e) as BoxError);
        if let Poll::Ready(None) = r {
            self.done = true;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body, replayable when it is small and known.
enum ReqBody<B> {
    Replay(Bytes),
    Stream(Option<B>),
}

impl<B> ReqBody<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    fn take(&mut self) -> Option<Body> {
        match self {
            ReqBody::Replay(b) if b.is_empty() => Some(empty()),
            ReqBody::Replay(b) => Some(full(b.clone())),
            // A body already at its end (a bodiless h2 request) is sent as `Empty`, which
            // boxes without allocating.
            ReqBody::Stream(s) => s.take().map(|b| {
                if b.is_end_stream() {
                    empty()
                } else {
                    b.map_err(Into::into).boxed_unsync()
                }
            }),
        }
    }
}

/// How one try ended.
enum Try {
    Response(Response<Incoming>, InUse),
    ConnectFailed(ConnectError),
    Refused,
    Reset(hyper::Error),
    TimedOut,
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers and those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages (every HTTP/2 one) carry none of them: one pass over the few names
    // present is cheaper than a dozen hashed removals.
    if !keep_upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if keep_upgrade && name == header::UPGRADE {
            continue;
        }
        headers.remove(&name);
    }
    for name in HOP_BY_HOP {
        if keep_upgrade && (name == "upgrade" || name == "connection") {
            continue;
        }
        headers.remove(name);
    }
    // `te: trailers` is end to end in HTTP/2 and gRPC needs it; any other TE is hop-by-hop.
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), in lower case: never forwarded by either engine.
/// `te` is handled apart (`te: trailers` is end to end).
pub(crate) const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "trailer",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Whether `name` is one that [`strip_hop_by_hop`] may remove or rewrite without being
/// named in `Connection`: `te` or one of [`HOP_BY_HOP`]. Those with a constant in the
/// `http` crate compare as constants (no text compare; every header of every HTTP/2
/// message passes here), the other two by their text.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    const STANDARD: [HeaderName; 7] = [
        header::TE,
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TRAILER,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ];
    STANDARD.contains(name) || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

/// Whether requests to a backend go upstream over HTTP/2: when its port says so, or (on
/// auto ports) when the client spoke HTTP/2; gRPC needs it.
pub(crate) fn upstream_h2(protocol: Protocol, mode: ServerMode) -> bool {
    match protocol {
        Protocol::Http2 | Protocol::Grpc => true,
        Protocol::Http1 => false,
        Protocol::Auto | Protocol::Tcp => mode == ServerMode::Http2,
    }
}

/// The request body for the tries: a body can be replayed on a retry only if we hold all
/// of it, so small, known bodies are buffered when retries are on; everything else is
/// streamed (and gets no retry). `Err` is the answer to a body that failed while buffered.
async fn request_body<B>(
    body: B,
    policy: &RetryPolicy,
    upgrade: bool,
) -> Result<ReqBody<B>, Response<Body>>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    if policy.attempts == 0 || upgrade {
        return Ok(ReqBody::Stream(Some(body)));
    }
    if body.is_end_stream() {
        return Ok(ReqBody::Replay(Bytes::new()));
    }
    match body.size_hint().exact() {
        Some(n) if n as usize <= MAX_REPLAY_BODY => {
            match Limited::new(body, MAX_REPLAY_BODY).collect().await {
                Ok(c) => Ok(ReqBody::Replay(c.to_bytes())),
                Err(_) => Err(error(StatusCode::BAD_REQUEST, "bad-request-body")),
            }
        }
        _ => Ok(ReqBody::Stream(Some(body))),
    }
}

/// Rewrites a request head for upstream (hop-by-hop headers out, `Host` from the
/// authority, the route's header rewrite in) and returns its path and query. A request
/// that names an authority (an absolute-form target, or HTTP/2's `:authority`) gets it as
/// its `Host`, in place of one the client sent (RFC 9112 §3.2.2, RFC 9113 §8.3.1): the
/// upstream sees the host the request was routed by.
pub(crate) fn prepare_head(
    parts: &mut http::request::Parts,
    route: Option<&RouteState>,
    upgrade: bool,
) -> http::uri::PathAndQuery {
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if let Some(a) = parts.uri.authority() {
        if let Ok(v) = HeaderValue::from_str(a.as_str()) {
            parts.headers.insert(header::HOST, v);
        }
    }
    rewrite_head(parts, route)
}

/// [`prepare_head`] for a request sent upstream over HTTP/2, which carries its authority
/// as `:authority` (`client_authority`) and no `Host`: none is made from the authority
/// (its caller removes one the client sent).
pub(crate) fn prepare_h2_head(
    parts: &mut http::request::Parts,
    route: Option<&RouteState>,
) -> http::uri::PathAndQuery {
    strip_hop_by_hop(&mut parts.headers, false);
    rewrite_head(parts, route)
}

/// The route's header rewrite, then the request's path and query.
fn rewrite_head(
    parts: &mut http::request::Parts,
    route: Option<&RouteState>,
) -> http::uri::PathAndQuery {
    if let Some(rw) = route.and_then(|r| r.request_headers.as_ref()) {
        rw.apply(&mut parts.headers);
    }
    parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
}

/// The `:authority` of a request sent upstream over HTTP/2: the client's (its request
/// target's authority, i.e. an HTTP/2 client's `:authority`, else its `Host`), so the
/// upstream sees the name the client asked for, as behind Envoy or Linkerd (RFC 9113
/// §8.3.1). `None` when the client gave none (or an invalid one); the endpoint's address
/// stands in then. HTTP/2 carries it in the pseudo-header only: callers drop `Host` from
/// the headers they send, as a server may reject one that differs from `:authority`.
pub(crate) fn client_authority(parts: &http::request::Parts) -> Option<http::uri::Authority> {
    parts.uri.authority().cloned().or_else(|| {
        parts
            .headers
            .get(header::HOST)
            .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
    })
}

/// The absolute URI an HTTP/2 upstream request needs for its pseudo-headers. Assembled
/// from its parts (the scheme a constant), not through `Uri::builder`, which parses the
/// scheme from text on every request.
pub(crate) fn h2_uri(
    authority: http::uri::Authority,
    path_and_query: &http::uri::PathAndQuery,
) -> Option<Uri> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(path_and_query.clone());
    Uri::from_parts(parts).ok()
}

/// Sends the request upstream over hyper's clients, with retries, and builds the response.
pub(crate) async fn forward<B>(
    ctx: &ConnCtx,
    route: Option<&RouteState>,
    backend: &Arc<Backend>,
    mut req: Request<B>,
) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let m = &ctx.shared.metrics;
    let service = &backend.service;
    let label = &*service.label;
    if let Some(f) = route.and_then(|r| r.fault.as_ref()) {
        if let Some(r) = Box::pin(inject_fault(m, &ctx.target.service.label, f)).await {
            return r;
        }
    }
    let active_guard = match admit(m, backend) {
        Ok(g) => g,
        Err(why) => return overloaded(why),
    };

    let upgrade = is_upgrade(&req);
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let (policy, deadline) = plan(route, service);

    let mut body = match request_body(body, policy, upgrade).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let replayable = matches!(body, ReqBody::Replay(_));
    let max_tries = max_tries(policy, replayable);

    let path_and_query = prepare_head(&mut parts, route, upgrade);

    // The upstream protocol: h2 when the port says so, or (on auto ports) when the client
    // spoke h2; gRPC needs it.
    let use_h2 = upstream_h2(backend.protocol, ctx.mode) && !upgrade;
    let grpc = backend.protocol == Protocol::Grpc;
    let clients = &service.clients;

    let hash = request_hash(service.hash_on.as_ref(), &parts.headers, ctx.peer);
    if replayable {
        service.shared.budget.deposit();
    }
    let mut avoid = None;
    let mut tries = 0;
    let result = loop {
        tries += 1;
        let Some(ep) = backend.balancer.pick(hash, avoid) else {
            return no_endpoints();
        };
        let Some(body) = body.take() else {
            return error(StatusCode::BAD_GATEWAY, "body-consumed");
        };
        // Between sidecars with mutual TLS, HTTP/1.1 may ride one HTTP/2 connection
        // (`mesh_h2`); `:authority` carries the Host, which the inbound side restores.
        let over_h2 =
            !use_h2 && !upgrade && ep.meshed && ctx.shared.config.mesh_h2 && ctx.shared.tls.is_on();
        let use_h2 = use_h2 || over_h2;
        // HTTP/1.1 upstreams get the origin form (RFC 9112 §3.2.1); HTTP/2 needs the
        // scheme and authority for its pseudo-headers.
        let uri = if use_h2 {
            let Some(authority) = client_authority(&parts).or_else(|| ep.authority.clone()) else {
                return error(StatusCode::BAD_REQUEST, "bad-path");
            };
            match h2_uri(authority, &path_and_query) {
                Some(u) => u,
                None => return error(StatusCode::BAD_REQUEST, "bad-path"),
            }
        } else {
            Uri::from(path_and_query.clone())
        };
        let mut up = Request::new(body);
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        *up.version_mut() = if use_h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        // The last possible try takes the headers; earlier ones copy them for a retry.
        *up.headers_mut() = if tries < max_tries {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        if use_h2 {
            up.headers_mut().remove(header::HOST);
        }

        let try_deadline = try_deadline(policy, deadline);
        ep.stats.inflight.fetch_add(1, Ordering::Relaxed);
        let inflight = InflightGuard(ep.clone());
        let sent = Instant::now();
        let fut = clients.send(ep.addr, ep.meshed, use_h2, up);
        let outcome = match try_deadline {
            None => classify(fut.await),
            Some(d) => match tokio::time::timeout_at(d, fut).await {
                Ok(r) => classify(r),
                Err(_) => Try::TimedOut,
            },
        };
        let ended = match &outcome {
            Try::Response(r, _) => Ended::response(r.status(), r.headers(), grpc),
            Try::ConnectFailed(e) => Ended::ConnectFailed(e),
            Try::Refused => Ended::Refused,
            Try::Reset(e) => {
                tracing::debug!(service = label, error = %e, "upstream request failed");
                Ended::Reset
            }
            Try::TimedOut => Ended::TimedOut,
        };
        let retriable = match judge(m, backend, &ep, policy, deadline, ended, sent) {
            Ok(r) => r,
            Err(why) => return overloaded(why),
        };
        if let Some(pause) = retry_pause(m, service, policy, retriable, tries, max_tries, deadline)
        {
            drop(inflight);
            avoid = Some(ep.addr);
            tokio::time::sleep(pause).await;
            continue;
        }
        break (outcome, inflight);
    };

    let (outcome, inflight) = result;
    let (resp, conn) = match outcome {
        Try::Response(r, c) => (r, c),
        Try::ConnectFailed(_) => return Failure::Connect.response(),
        Try::Refused => return Failure::Refused.response(),
        Try::Reset(_) => return Failure::Reset.response(),
        Try::TimedOut => return Failure::TimedOut.response(),
    };

    let (mut rparts, rbody) = resp.into_parts();
    let switching = rparts.status == StatusCode::SWITCHING_PROTOCOLS;
    if switching {
        let Some(down) = downstream_upgrade else {
            return error(StatusCode::BAD_GATEWAY, "unexpected-upgrade");
        };
        let mut upstream_resp = Response::from_parts(rparts.clone(), rbody);
        let up = hyper::upgrade::on(&mut upstream_resp);
        let peer = ctx.peer;
        tokio::spawn(async move {
            let _keep = (active_guard, inflight, conn);
            match tokio::try_join!(down, up) {
                Ok((d, u)) => {
                    let _ = crate::tcp::pipe(TokioIo::new(d), TokioIo::new(u), None).await;
                }
                Err(e) => tracing::debug!(%peer, error = %e, "upgrade failed"),
            }
        });
        strip_hop_by_hop(&mut rparts.headers, true);
        return Response::from_parts(rparts, empty());
    }
    strip_hop_by_hop(&mut rparts.headers, false);
    if let Some(rw) = route.and_then(|r| r.response_headers.as_ref()) {
        rw.apply(&mut rparts.headers);
    }
    if ctx.shared.config.access_log.is_some() {
        rparts
            .extensions
            .insert(crate::access::Upstream(inflight.0.addr));
    }
    let body = GuardedBody {
        inner: rbody,
        conn: Some(conn),
        done: false,
        _guards: (Some(active_guard), inflight),
    };
    Response::from_parts(rparts, body.boxed_unsync())
}

/// Counts a request against its service's `max_requests` breaker: the guard gives the
/// slot back when dropped; a full breaker is the limit's name, answered with
/// [`overloaded`].
pub(crate) fn admit(m: &Metrics, backend: &Arc<Backend>) -> Result<ActiveGuard, &'static str> {
    let service = &backend.service;
    let active = service.shared.active.fetch_add(1, Ordering::AcqRel);
    let guard = ActiveGuard {
        backend: backend.clone(),
    };
    if service.limits.max_requests > 0 && active >= u64::from(service.limits.max_requests) {
        m.breaker_rejections
            .with_label_values(&[&*service.label, "max_requests"])
            .inc();
        return Err("max_requests");
    }
    Ok(guard)
}

/// The retry policy of a request (the route's, else the service's) and its overall
/// deadline (the route's timeout, else the service's request timeout).
pub(crate) fn plan<'a>(
    route: Option<&'a RouteState>,
    service: &'a crate::state::Service,
) -> (&'a RetryPolicy, Option<tokio::time::Instant>) {
    let policy = route
        .and_then(|r| r.retry.as_ref())
        .unwrap_or(&service.retry);
    let timeout = route.and_then(|r| r.timeout).or_else(|| {
        (service.timeouts.request_ms > 0)
            .then(|| Duration::from_millis(service.timeouts.request_ms))
    });
    (policy, timeout.map(|t| tokio::time::Instant::now() + t))
}

/// The deadline of one try: the per-try timeout, bounded by the request's deadline.
pub(crate) fn try_deadline(
    policy: &RetryPolicy,
    deadline: Option<tokio::time::Instant>,
) -> Option<tokio::time::Instant> {
    let per_try = (policy.per_try_timeout_ms > 0)
        .then(|| tokio::time::Instant::now() + Duration::from_millis(policy.per_try_timeout_ms));
    match (per_try, deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// How one try at an endpoint ended, as both HTTP/1.1 engines see it.
pub(crate) enum Ended<'a> {
    /// A response head with this status.
    Status(StatusCode),
    /// No connection (a breaker limit, a timeout, a refused socket).
    ConnectFailed(&'a ConnectError),
    /// HTTP/2 `REFUSED_STREAM`: the upstream did not process it.
    Refused,
    /// The connection failed while the request was sent or the response head read.
    Reset,
    /// The per-try or request deadline passed first.
    TimedOut,
    /// gRPC: a trailers-only response (HTTP 200) whose head carries this non-zero
    /// `grpc-status`.
    Grpc(u8),
}

impl Ended<'_> {
    /// How a response head ended a try. On a `grpc` backend (`grpc`), an error status in
    /// the head of a trailers-only answer is judged by its `grpc-status`.
    pub(crate) fn response(status: StatusCode, headers: &HeaderMap, grpc: bool) -> Ended<'static> {
        if grpc && status == StatusCode::OK {
            if let Some(code) = grpc_status(headers).filter(|&c| c != 0) {
                return Ended::Grpc(code);
            }
        }
        Ended::Status(status)
    }
}

/// Records how a try ended (EWMA latency, outlier detection, metrics) and says whether
/// the retry policy allows another try; `Err` names a breaker limit of the connector, to
/// answer at once with [`overloaded`].
pub(crate) fn judge(
    m: &Metrics,
    backend: &Backend,
    ep: &Endpoint,
    policy: &RetryPolicy,
    deadline: Option<tokio::time::Instant>,
    ended: Ended<'_>,
    sent: Instant,
) -> Result<bool, &'static str> {
    let service = &backend.service;
    let label = &*service.label;
    let outlier = service.outlier.as_ref();
    let peers = backend.balancer.endpoints();
    let retry_on = |why: RetryOn| policy.retry_on.contains(&why);
    Ok(match ended {
        Ended::Status(s) => {
            // The latency sample (a clock read, a lock and an `exp`) only feeds peak EWMA.
            if backend.balancer.uses_latency() {
                ep.stats.observe_since(sent);
            }
            let o = if s.is_server_error() {
                Outcome::ServerError
            } else {
                Outcome::Success
            };
            if record(ep, o, outlier, peers) {
                m.ejections.with_label_values(&[label]).inc();
            }
            s.is_server_error()
                && (retry_on(RetryOn::ServerError)
                    || (retry_on(RetryOn::GatewayError) && matches!(s.as_u16(), 502..=504)))
        }
        Ended::ConnectFailed(ConnectError::Overloaded(why)) => {
            m.breaker_rejections.with_label_values(&[label, why]).inc();
            return Err(why);
        }
        Ended::ConnectFailed(e) => {
            m.connect_failures.with_label_values(&[label]).inc();
            if matches!(e, ConnectError::Timeout) {
                m.timeouts.with_label_values(&[label, "connect"]).inc();
            }
            if record(ep, Outcome::ConnectFailure, outlier, peers) {
                m.ejections.with_label_values(&[label]).inc();
            }
            retry_on(RetryOn::ConnectFailure)
        }
        Ended::Grpc(code) => {
            if backend.balancer.uses_latency() {
                ep.stats.observe_since(sent);
            }
            // The codes gRPC maps from 500, 503 and 504 (UNKNOWN, DEADLINE_EXCEEDED,
            // INTERNAL, UNAVAILABLE, DATA_LOSS) count against the endpoint as a 5xx
            // would; the others are the call's own outcome.
            let o = if matches!(code, 2 | 4 | 13 | 14 | 15) {
                Outcome::ServerError
            } else {
                Outcome::Success
            };
            if record(ep, o, outlier, peers) {
                m.ejections.with_label_values(&[label]).inc();
            }
            policy.retry_on.iter().any(|r| r.grpc_code() == Some(code))
        }
        Ended::Refused => retry_on(RetryOn::RefusedStream),
        Ended::Reset => retry_on(RetryOn::Reset),
        Ended::TimedOut => {
            let total = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
            m.timeouts
                .with_label_values(&[label, if total { "request" } else { "per_try" }])
                .inc();
            !total && retry_on(RetryOn::PerTryTimeout)
        }
    })
}

/// Whether a retriable try is tried again (tries and time left, and the retry budget
/// grants it), and the backoff to wait first.
pub(crate) fn retry_pause(
    m: &Metrics,
    service: &crate::state::Service,
    policy: &RetryPolicy,
    retriable: bool,
    tries: u32,
    max_tries: u32,
    deadline: Option<tokio::time::Instant>,
) -> Option<Duration> {
    // The clock only when a retry is otherwise allowed (most tries are not retriable).
    if !retriable
        || tries >= max_tries
        || deadline.is_some_and(|d| tokio::time::Instant::now() >= d)
    {
        return None;
    }
    let label = &*service.label;
    if !service
        .shared
        .budget
        .withdraw(policy.budget_percent, policy.min_retries_per_second)
    {
        m.retries_budget_exhausted.with_label_values(&[label]).inc();
        return None;
    }
    m.retries.with_label_values(&[label]).inc();
    Some(backoff(
        tries,
        Duration::from_millis(policy.backoff_base_ms),
        Duration::from_millis(policy.backoff_max_ms),
    ))
}

/// How many tries a request gets: retries only when its body can be replayed.
pub(crate) fn max_tries(policy: &RetryPolicy, replayable: bool) -> u32 {
    if replayable {
        1 + policy.attempts.min(10)
    } else {
        1
    }
}

/// Why the last try failed without a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    Connect,
    Refused,
    Reset,
    TimedOut,
}

impl Failure {
    /// The sidecar's answer for it.
    pub(crate) fn response(self) -> Response<Body> {
        match self {
            Failure::Connect => error(StatusCode::SERVICE_UNAVAILABLE, "upstream-connect-failure"),
            Failure::Refused => error(StatusCode::SERVICE_UNAVAILABLE, "upstream-refused-stream"),
            Failure::Reset => error(StatusCode::BAD_GATEWAY, "upstream-reset"),
            Failure::TimedOut => error(StatusCode::GATEWAY_TIMEOUT, "upstream-timeout"),
        }
    }
}

/// The answer when the balancer has no endpoint to offer.
pub(crate) fn no_endpoints() -> Response<Body> {
    error(StatusCode::SERVICE_UNAVAILABLE, "no-endpoints")
}

fn classify(r: Result<(Response<Incoming>, InUse), SendError>) -> Try {
    match r {
        Ok((r, c)) => Try::Response(r, c),
        Err(SendError::Connect(e)) => Try::ConnectFailed(e),
        Err(SendError::Http(e)) => {
            let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = src {
                if let Some(h2e) = s.downcast_ref::<h2::Error>() {
                    if h2e.reason() == Some(h2::Reason::REFUSED_STREAM) {
                        return Try::Refused;
                    }
                }
                src = s.source();
            }
            Try::Reset(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_end_to_end_ones_stay() {
        // Nothing hop-by-hop: the map is left as it is (the fast path).
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);

        // Named in Connection, a fixed hop-by-hop name, and TE other than trailers go.
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-kept, close"),
        );
        h.insert("keep-alive", HeaderValue::from_static("5"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::HOST));

        // TE: trailers is end to end.
        h.insert(header::TE, HeaderValue::from_static("trailers, gzip"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
    }

    #[test]
    fn is_hop_by_hop_names_exactly_te_and_the_hop_by_hop_list() {
        for name in HOP_BY_HOP.iter().chain(&["te"]) {
            let name = HeaderName::from_static(name);
            assert!(is_hop_by_hop(&name), "{name}");
        }
        for name in [
            "host",
            "content-length",
            "x-instance",
            "keep-alivex",
            "trailers",
        ] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn an_h2_uri_is_absolute_with_the_authority_and_path_given() {
        let authority = http::uri::Authority::from_static("api.example:8080");
        let path = http::uri::PathAndQuery::from_static("/a/b?c=1");
        let uri = h2_uri(authority, &path).unwrap();
        assert_eq!(uri.to_string(), "http://api.example:8080/a/b?c=1");
        assert_eq!(uri.scheme(), Some(&http::uri::Scheme::HTTP));
    }
}
