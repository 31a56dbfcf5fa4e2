//! The lean HTTP/2 engine: HTTP/2 client connections (h2c, or h2 over mutual TLS) served
//! with the `h2` crate directly, without hyper's per-request machinery on either side.
//!
//! A connection's streams are futures polled by the connection's own task (no task per
//! stream). Per stream it picks route, backend and endpoint with the same functions as
//! the hyper engine ([`crate::http`]: `resolve`, `select`, `admit`, `plan`, `judge`,
//! `retry_pause`, `observe`). When the backend speaks HTTP/2 it opens a stream on the
//! endpoint's `h2` connection (`upstream::Clients::open_h2`) and relays frames both ways: DATA
//! under flow control (a chunk's window is given back to its sender only once the chunk
//! has been passed on, so a slow reader holds back a fast writer instead of filling
//! memory), then trailers; a reset on either side resets the other, so an upstream reset
//! mid-response reaches the client as a stream reset, never as a complete response. Other
//! backends (HTTP/1.1 upstreams, the app behind an inbound `mesh_h2` port) go through the
//! hyper engine's forwarding (`http::forward`), whose response is written back here.
//!
//! The server limits are the hyper engine's: header list size, concurrent streams, and the
//! `h2` crate's rapid-reset and error-reset limits (GOAWAY), keep-alive pings, the idle
//! timeout and graceful drain.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, Request, Response, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::Drain;
use crate::access::{Side, Tally};
use crate::http::{
    ConnCtx, Counted, Ended, Failure, GrpcEnd, InflightGuard, admit, h2_uri, inject_fault, judge,
    max_tries, no_endpoints, observe, overloaded, pass_identity, plan, prepare_h2_head, resolve,
    retry_pause, select, try_deadline, upstream_h2,
};
use crate::upstream::{Body, H2Hold, H2OpenError, H2Stream, PingHandoff, keepalive};

/// Which engine serves HTTP/2 client connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// Hyper on both sides, for everything.
    Hyper,
    /// The `h2` crate on both sides, streams polled by their connection's task.
    #[default]
    Lean,
}

/// Largest request body held so that it can be replayed on a retry (as the hyper engine).
const MAX_REPLAY_BODY: usize = 64 * 1024;

/// How many times one request is sent again, beyond its tries, because the upstream
/// connection it went to was closing and did not take it (see [`Attempt::Unprocessed`]).
const MAX_RESENDS: u32 = 4;

/// The server settings, built once: hyper's defaults for windows and buffers, and the
/// limits the hyper engine sets.
pub(crate) fn server_builder(limits: &crate::ProxyConfig) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(1024 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_send_buffer_size(400 * 1024)
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_concurrent_streams(limits.max_concurrent_streams)
        // Rapid reset and error-reset floods end in GOAWAY (h2's defaults, set here so they
        // cannot drift).
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(Some(1024));
    b
}

/// Serves one HTTP/2 client connection until it ends, or until drain asks it to finish.
pub(crate) async fn serve<S>(ctx: Arc<ConnCtx>, stream: S, drain: Drain)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(AtomicU64::new(0));
    let io = crate::tcp::Timed::new(stream, activity.clone());
    let handshake = ctx.shared.servers.lean_h2.handshake::<_, Bytes>(io);
    let timeout = ctx.shared.config.header_read_timeout;
    let mut conn = tokio::select! {
        r = tokio::time::timeout(timeout, handshake) => match r {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(peer = %ctx.peer, error = %e, "HTTP/2 handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(peer = %ctx.peer, "HTTP/2 handshake timed out");
                return;
            }
        },
        _ = drain.hard.cancelled() => return,
    };
    // The `PingPong` is handed to the keep-alive only once the connection idles.
    let pings = PingHandoff::default();
    let keepalive = keepalive(&pings, &activity, || true);
    tokio::pin!(keepalive);
    let idle_ms = ctx.target.service.timeouts.idle_ms;
    let idle = async {
        match idle_ms {
            0 => std::future::pending().await,
            ms => crate::tcp::idle_watch(&activity, Duration::from_millis(ms)).await,
        }
    };
    tokio::pin!(idle);
    let mut streams = FuturesUnordered::new();
    let mut closing = false;
    // Pinned once for the connection: a drain stage's future registers with its token on
    // its first poll only (see `Drain`), not once per turn of the loop.
    let soft = drain.soft.cancelled();
    let hard = drain.hard.cancelled();
    tokio::pin!(soft, hard);
    loop {
        tokio::select! {
            biased;
            // Every stream that can make progress, then the connection (which writes what
            // they queued and reads what came): one turn of the loop per new stream, not
            // one per finished stream.
            next = poll_fn(|cx| {
                while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
                pings.offer(|| conn.ping_pong());
                conn.poll_accept(cx)
            }) => match next {
                Some(Ok((req, respond))) => {
                    // Boxed: the set's task then holds a pointer, and the stream's future
                    // (~3 KiB in a release build) is copied once, into the box, instead of
                    // twice on its way into the set's task.
                    streams.push(Box::pin(serve_stream(ctx.clone(), req, respond)));
                }
                Some(Err(e)) => {
                    tracing::debug!(peer = %ctx.peer, error = %e, "HTTP/2 connection ended with an error");
                    break;
                }
                None => break,
            },
            _ = &mut soft, if !closing => {
                closing = true;
                conn.graceful_shutdown();
            }
            _ = &mut idle, if !closing => {
                closing = true;
                ctx.shared.metrics.timeouts.with_label_values(&[&*ctx.target.service.label, "idle"]).inc();
                conn.graceful_shutdown();
            }
            _ = &mut keepalive => {
                tracing::debug!(peer = %ctx.peer, "HTTP/2 client did not answer a ping");
                break;
            }
            _ = &mut hard => break,
        }
    }
}

/// Serves one stream: everything that can go wrong becomes a response (or a reset) here.
async fn serve_stream(
    ctx: Arc<ConnCtx>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let start = Instant::now();
    if let Some(r) = crate::hostile::refuse(&req, None) {
        let unlogged = |_, _, _: &HeaderMap| (Tally::new(None, Side::Sent), None);
        return send_body_response(r, respond, unlogged).await;
    }
    let logged = ctx.logged(&req, start);
    let (mut parts, body) = req.into_parts();
    let (target, authz) = resolve(&ctx);
    pass_identity(&target, &mut parts.headers, &authz);
    let denied = authz.err().map(|r| *r);
    let head_only = Request::from_parts(parts, ());
    let (index, backend) = select(&target, &head_only);
    let route = index.and_then(|i| target.routes.get(i));
    // At the response head: counted; the response body's tally for the access log, and
    // on a `grpc` port what counts its `grpc-status` at its end.
    let seen = |status: u16, upstream: Option<std::net::SocketAddr>, head: &HeaderMap| {
        observe(
            &ctx,
            &target,
            index,
            status,
            start,
            logged.as_deref(),
            upstream,
        );
        let grpc = GrpcEnd::new(&target, index, head);
        (Tally::new(logged.as_ref(), Side::Sent), grpc)
    };
    let received = Tally::new(logged.as_ref(), Side::Received);
    if let Some(r) = denied {
        return send_body_response(r, respond, seen).await;
    }
    if !upstream_h2(backend.protocol, ctx.mode) {
        // An HTTP/1.1 upstream: the hyper engine's forwarding, over the same decisions.
        let (parts, ()) = head_only.into_parts();
        let body = H2Body {
            length: content_length(&parts.headers),
            recv: body,
            data_done: false,
        };
        let req = Request::from_parts(parts, Counted::new(body, received, None));
        // Boxed: hyper's forwarding is a large future, and a rare path here.
        let resp = Box::pin(crate::http::forward(&ctx, route, &backend, req)).await;
        return send_body_response(resp, respond, seen).await;
    }
    // Forwarding to an HTTP/2 backend, with retries, and relaying the response: written
    // out here rather than in an `async fn` of its own, whose future the stream's future
    // built and moved into its own state on every request (~55 instructions per request,
    // and the stream's future is smaller without it).
    let (mut parts, ()) = head_only.into_parts();
    let backend = &backend;
    let m = &ctx.shared.metrics;
    let service = &backend.service;
    if let Some(f) = route.and_then(|r| r.fault.as_ref()) {
        if let Some(r) = Box::pin(inject_fault(m, &ctx.target.service.label, f)).await {
            return send_body_response(r, respond, seen).await;
        }
    }
    let active_guard = match admit(m, backend) {
        Ok(g) => g,
        Err(why) => return send_body_response(overloaded(why), respond, seen).await,
    };
    let (policy, deadline) = plan(route, service);
    let body = match replay_body(body, policy.attempts > 0, &parts.headers).await {
        Ok(b) => b,
        Err(()) => {
            // The client reset or broke its request body: nobody to answer.
            respond.send_reset(Reason::CANCEL);
            return;
        }
    };
    let (replay, mut stream_body) = match body {
        ReqBody::Replay(b) => {
            received.add(b.len());
            (Some(b), None)
        }
        ReqBody::Stream(s) => (None, Some(s)),
    };
    let max_tries = max_tries(policy, replay.is_some());
    let grpc_backend = backend.protocol == sidemesh_api::config::Protocol::Grpc;
    let path_and_query = prepare_h2_head(&mut parts, route);
    let head = HashHead {
        headers: &parts.headers,
        authority: parts.uri.authority(),
    };
    let hash = crate::balance::request_hash(service.hash_on.as_ref(), &head, ctx.peer);
    // The client's authority goes on as `:authority` (`client_authority`), without `Host`.
    let authority = crate::http::client_authority(&parts);
    parts.headers.remove(http::header::HOST);
    // Requests that could be retried feed the retry budget (as on the hyper path, where a
    // bodiless request is replayable only when retries are on).
    if replay.is_some() && policy.attempts > 0 {
        service.shared.budget.deposit();
    }
    let mut avoid = None;
    let mut tries = 0;
    let mut resends = 0;
    let mut kept: Vec<(http::HeaderName, http::HeaderValue)> = Vec::new();
    let mut pump = None;
    let (hold, resp, inflight) = loop {
        tries += 1;
        let Some(ep) = backend.balancer.pick(hash, avoid) else {
            return send_body_response(no_endpoints(), respond, seen).await;
        };
        let Some(uri) = authority
            .as_ref()
            .or(ep.authority.as_ref())
            .and_then(|a| h2_uri(a.clone(), &path_and_query))
        else {
            let r = crate::http::error(http::StatusCode::BAD_REQUEST, "bad-path");
            return send_body_response(r, respond, seen).await;
        };
        let mut up = Request::new(());
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        *up.version_mut() = Version::HTTP_2;
        // The last possible try takes the headers; earlier ones copy them for a retry. It
        // keeps a copy as a list (cheaper to make than a copy of the map) in case the
        // upstream does not take it and it is sent again.
        *up.headers_mut() = if tries < max_tries {
            parts.headers.clone()
        } else {
            kept = parts
                .headers
                .iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            std::mem::take(&mut parts.headers)
        };
        let end_of_stream = match (&replay, &stream_body) {
            (Some(b), _) => b.is_empty(),
            (None, Some(s)) => s.is_end_stream(),
            (None, None) => true,
        };

        let try_deadline = try_deadline(policy, deadline);
        ep.stats
            .inflight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let inflight = InflightGuard(ep.clone());
        let sent = Instant::now();
        // Held here, not in the try's future: that future is moved into its `Deadline` and
        // the select, and a copy of the head in it would make each move larger.
        let mut head = Some(up);
        // A client that resets its stream while the response is awaited cancels the try.
        // Biased: the try first, so that its last poll (the response head is in) does not
        // also take h2's lock to look for a reset and store the waker again.
        let outcome = tokio::select! {
            biased;
            o = Deadline::new(
                try_deadline,
                attempt(
                    &service.clients,
                    &ep,
                    &mut head,
                    end_of_stream,
                    (replay.as_ref(), &mut stream_body, &received),
                    &mut pump,
                ),
            ) => o,
            _ = poll_fn(|cx| respond.poll_reset(cx)) => return,
        };
        if let Attempt::Unprocessed(e) = &outcome {
            // Not a try: the upstream never saw it. Sent again, on another connection.
            if resends < MAX_RESENDS {
                tracing::debug!(service = &*service.label, error = %e, "upstream connection closing: request sent again");
                resends += 1;
                if tries >= max_tries {
                    // The last try took the headers: they come back from its copy.
                    parts.headers = std::mem::take(&mut kept).into_iter().collect();
                }
                tries -= 1;
                continue;
            }
        }
        let ended = match &outcome {
            Attempt::Response(_, r) => Ended::response(r.status(), r.headers(), grpc_backend),
            Attempt::ConnectFailed(e) => Ended::ConnectFailed(e),
            Attempt::Failed(e) if e.reason() == Some(Reason::REFUSED_STREAM) => Ended::Refused,
            Attempt::Failed(e) | Attempt::Unprocessed(e) => {
                tracing::debug!(service = &*service.label, error = %e, "upstream request failed");
                Ended::Reset
            }
            Attempt::TimedOut => Ended::TimedOut,
        };
        let retriable = match judge(m, backend, &ep, policy, deadline, ended, sent) {
            Ok(r) => r,
            Err(why) => return send_body_response(overloaded(why), respond, seen).await,
        };
        if let Some(pause) = retry_pause(m, service, policy, retriable, tries, max_tries, deadline)
        {
            drop(inflight);
            avoid = Some(ep.addr);
            tokio::time::sleep(pause).await;
            continue;
        }
        let failure = match outcome {
            Attempt::Response(hold, resp) => break (hold, resp, inflight),
            Attempt::ConnectFailed(_) => Failure::Connect,
            Attempt::Failed(e) if e.reason() == Some(Reason::REFUSED_STREAM) => Failure::Refused,
            Attempt::Failed(_) | Attempt::Unprocessed(_) => Failure::Reset,
            Attempt::TimedOut => Failure::TimedOut,
        };
        return send_body_response(failure.response(), respond, seen).await;
    };

    let (mut rparts, rbody) = resp.into_parts();
    crate::http::strip_hop_by_hop(&mut rparts.headers, false);
    add_date(&mut rparts.headers);
    if let Some(rw) = route.and_then(|r| r.response_headers.as_ref()) {
        rw.apply(&mut rparts.headers);
    }
    let (sent, grpc) = seen(
        rparts.status.as_u16(),
        Some(inflight.0.addr),
        &rparts.headers,
    );
    let end = rbody.is_end_stream();
    let send = match respond.send_response(Response::from_parts(rparts, ()), end) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(peer = %ctx.peer, error = %e, "response head not sent");
            return;
        }
    };
    // Held until the response is done: the service's request slot, the endpoint's
    // in-flight count and the upstream connection's busy mark.
    let _held = (active_guard, inflight, hold);
    if end {
        sent.end();
    } else {
        // A request body still streaming keeps going while the response flows.
        beside(&mut pump, relay(rbody, send, sent, grpc)).await;
    }
}

/// The request body for the tries: replayable when retries are on and it is small and
/// known; else streamed (one try).
enum ReqBody {
    Replay(Bytes),
    Stream(RecvStream),
}

/// A request's headers as `hash_on` reads them: `host` is the client's `:authority` when
/// it sent no `Host`, as in the head that `prepare_head` makes for HTTP/1.1 upstreams
/// (here no `Host` is made: the authority goes on as `:authority`).
struct HashHead<'h> {
    headers: &'h HeaderMap,
    authority: Option<&'h http::uri::Authority>,
}

impl crate::balance::RequestHeaders for HashHead<'_> {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        let authority = match self.authority {
            Some(a) if name == "host" && !self.headers.contains_key(http::header::HOST) => {
                Some(a.as_str().as_bytes())
            }
            _ => None,
        };
        let sent = self.headers.get_all(name).iter().map(|v| v.as_bytes());
        sent.chain(authority)
    }
}

/// How one try ended.
enum Attempt {
    /// A response head (the upstream stream stays open for its body while `hold` is).
    Response(H2Hold, Response<RecvStream>),
    ConnectFailed(crate::upstream::ConnectError),
    /// The stream or the connection failed before a response head.
    Failed(h2::Error),
    /// The upstream did not take the request, which can be sent again whatever the retry
    /// policy: its connection was found closed when the stream was to be opened, or it
    /// sent GOAWAY naming an earlier stream as the last it processes (RFC 9113 §6.8)
    /// before any of a streamed body was taken.
    Unprocessed(h2::Error),
    TimedOut,
}

pin_project_lite::pin_project! {
    /// A try until its deadline (if any): [`Attempt::TimedOut`] once it has passed. A
    /// plain struct rather than an `async fn`, which would hold the try's future twice.
    /// The timer is held in place (pinned with the try), not boxed: most requests have a
    /// deadline (the default request timeout), and the box was an allocation each.
    struct Deadline<F> {
        #[pin]
        fut: F,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
    }
}

impl<F> Deadline<F> {
    fn new(deadline: Option<tokio::time::Instant>, fut: F) -> Deadline<F> {
        Deadline {
            fut,
            sleep: deadline.map(tokio::time::sleep_until),
        }
    }
}

impl<F: Future<Output = Attempt>> Future for Deadline<F> {
    type Output = Attempt;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Attempt> {
        let this = self.project();
        if let Poll::Ready(a) = this.fut.poll(cx) {
            return Poll::Ready(a);
        }
        match this.sleep.as_pin_mut().map(|s| s.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Attempt::TimedOut),
            _ => Poll::Pending,
        }
    }
}

/// A streamed request body being relayed upstream (boxed: only streamed bodies have one).
type Pump = Pin<Box<dyn Future<Output = ()> + Send>>;

pin_project_lite::pin_project! {
    /// Polls a request body's relay (until it is done) while waiting for `fut`.
    struct Beside<'a, F> {
        #[pin]
        fut: F,
        pump: &'a mut Option<Pump>,
    }
}

fn beside<F: Future>(pump: &mut Option<Pump>, fut: F) -> Beside<'_, F> {
    Beside { fut, pump }
}

impl<F: Future> Future for Beside<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if let Some(p) = this.pump.as_mut() {
            if p.as_mut().poll(cx).is_ready() {
                **this.pump = None;
            }
        }
        this.fut.poll(cx)
    }
}

/// One try: opens the upstream stream with `head` (taken from it once it is sent), sends
/// the body (all of a replayable one; a streamed one goes into `pump`, relayed from now
/// on) and waits for the response head.
async fn attempt(
    clients: &crate::upstream::Clients,
    ep: &crate::balance::Endpoint,
    head: &mut Option<Request<()>>,
    end_of_stream: bool,
    body: (Option<&Bytes>, &mut Option<RecvStream>, &Tally),
    pump: &mut Option<Pump>,
) -> Attempt {
    // The common case, a pooled connection that takes the stream at once, without a
    // future; the rest (waiting for a connection, dialling) boxed: inline, its future
    // (with a copy of the head) would make every stream's future larger.
    let opened = match clients.open_pooled_h2(ep.addr, head, end_of_stream) {
        Some(opened) => opened.map_err(H2OpenError::H2),
        None => match head.take() {
            Some(up) => Box::pin(clients.open_h2(ep.addr, ep.meshed, up, end_of_stream)).await,
            None => Err(H2OpenError::H2(Reason::INTERNAL_ERROR.into())),
        },
    };
    let H2Stream {
        mut response,
        mut send,
        hold,
    } = match opened {
        Ok(s) => s,
        Err(H2OpenError::Connect(e)) => return Attempt::ConnectFailed(e),
        // The connection had failed or was going away: nothing was sent.
        Err(H2OpenError::H2(e)) if e.is_go_away() || e.is_io() => {
            return Attempt::Unprocessed(e);
        }
        Err(H2OpenError::H2(e)) => return Attempt::Failed(e),
    };
    match body {
        _ if end_of_stream => {}
        (Some(b), _, _) => {
            // At most MAX_REPLAY_BODY: buffered by h2 until the window opens.
            if let Err(e) = send.send_data(b.clone(), true) {
                return Attempt::Failed(e);
            }
        }
        (None, stream, received) => {
            if let Some(from) = stream.take() {
                *pump = Some(Box::pin(relay(from, send, received.clone(), None)));
            }
        }
    }
    // Whether the request can be sent again as it was: no streamed body went to the pump.
    let whole = pump.is_none();
    match beside(pump, poll_fn(|cx| Pin::new(&mut response).poll(cx))).await {
        Ok(r) => Attempt::Response(hold, r),
        // Only a GOAWAY below the stream's id fails it with the peer's GOAWAY.
        Err(e) if whole && e.is_go_away() && e.is_remote() => Attempt::Unprocessed(e),
        Err(e) => Attempt::Failed(e),
    }
}

/// Relays a stream's DATA and trailers to `to` under flow control until its end, counting
/// the DATA in `tally` (and a response's `grpc-status` in `grpc`). When `from` fails, `to`
/// is reset; when `to`'s peer resets it, `from` is dropped (and so reset too, by h2).
async fn relay(
    mut from: RecvStream,
    mut to: SendStream<Bytes>,
    tally: Tally,
    mut grpc: Option<GrpcEnd>,
) {
    loop {
        let next = tokio::select! {
            // The data first: a chunk that is there is relayed without also taking h2's
            // lock to look for a reset.
            biased;
            d = from.data() => d,
            r = poll_fn(|cx| to.poll_reset(cx)) => {
                tracing::trace!(reason = ?r.ok(), "relay: the receiver reset the stream");
                return;
            }
        };
        match next {
            Some(Ok(chunk)) => {
                let n = chunk.len();
                let eos = from.is_end_stream();
                if send_all(&mut to, chunk, eos).await.is_err() {
                    return;
                }
                tally.add(n);
                let _ = from.flow_control().release_capacity(n);
                if eos {
                    return tally.end();
                }
            }
            Some(Err(e)) => return to.send_reset(reset_reason(&e)),
            None => break,
        }
    }
    match from.trailers().await {
        Ok(Some(t)) => {
            let status = grpc.as_mut().map(|g| (g, crate::http::grpc_status(&t)));
            if to.send_trailers(t).is_ok() {
                tally.end();
                if let Some((g, code)) = status {
                    g.count(code);
                }
            }
        }
        Ok(None) => {
            if to.send_data(Bytes::new(), true).is_ok() {
                tally.end();
            }
        }
        Err(e) => to.send_reset(reset_reason(&e)),
    }
}

/// The reset to pass on for a failed source: its own reason, except that a source cut
/// with `NO_ERROR` before its end is an internal error for the receiver.
fn reset_reason(e: &h2::Error) -> Reason {
    match e.reason() {
        Some(r) if r != Reason::NO_ERROR => r,
        _ => Reason::INTERNAL_ERROR,
    }
}

/// Largest last chunk of a body handed to h2 without waiting for window first.
const MAX_UNRESERVED_LAST: usize = 16 * 1024;

/// Sends `chunk` as the window allows (`eos` on its last piece).
///
/// The last chunk of a body, when small, is handed to h2 whole at once (h2 asks for its
/// window itself and sends it as the window opens): at most that one chunk per stream
/// waits in memory, and the stream sends nothing after it, so a slow reader still holds
/// back its writer. Saves the separate reservation for the common one-chunk response.
async fn send_all(to: &mut SendStream<Bytes>, mut chunk: Bytes, eos: bool) -> Result<(), ()> {
    if chunk.is_empty() {
        return if eos {
            to.send_data(chunk, true).map_err(|_| ())
        } else {
            Ok(())
        };
    }
    if eos && chunk.len() <= MAX_UNRESERVED_LAST {
        return to.send_data(chunk, true).map_err(|_| ());
    }
    while !chunk.is_empty() {
        to.reserve_capacity(chunk.len());
        let mut cap = to.capacity();
        while cap == 0 {
            cap = match poll_fn(|cx| to.poll_capacity(cx)).await {
                Some(Ok(c)) => c,
                _ => return Err(()),
            };
        }
        let piece = chunk.split_to(cap.min(chunk.len()));
        to.send_data(piece, eos && chunk.is_empty())
            .map_err(|_| ())?;
    }
    Ok(())
}

/// Reads a request body into memory when it may be replayed: retries are on, and its
/// `Content-Length` says it fits in [`MAX_REPLAY_BODY`]. `Err` when the client broke it.
async fn replay_body(
    mut body: RecvStream,
    retries: bool,
    headers: &HeaderMap,
) -> Result<ReqBody, ()> {
    if body.is_end_stream() {
        return Ok(ReqBody::Replay(Bytes::new()));
    }
    let fits = content_length(headers).is_some_and(|n| n <= MAX_REPLAY_BODY as u64);
    if !retries || !fits {
        return Ok(ReqBody::Stream(body));
    }
    let mut all = bytes::BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|_| ())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if all.len() + chunk.len() > MAX_REPLAY_BODY {
            return Err(());
        }
        all.extend_from_slice(&chunk);
    }
    Ok(ReqBody::Replay(all.freeze()))
}

/// Adds a `Date` to a response that has none: a proxy that forwards a response without
/// one adds it (RFC 9110 §6.6.1), as hyper's server does on the other engines.
fn add_date(headers: &mut HeaderMap) {
    // A scan of the few names of a response head costs a fraction of a hashed lookup.
    if !headers.keys().any(|name| name == http::header::DATE) {
        headers.insert(http::header::DATE, crate::h1::codec::date());
    }
}

/// A message's `Content-Length`, when it has exactly one valid one.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let v = values.next()?;
    if values.next().is_some() {
        return None;
    }
    v.to_str().ok()?.trim().parse().ok()
}

/// Writes a response with a body of the proxy's own body type (an error the sidecar
/// answers itself, or the hyper engine's response): head, DATA under flow control,
/// trailers; a body that fails resets the stream. `seen` gets the status once the head
/// is sent.
///
/// Boxed: a stream's future would otherwise hold room for this one at each of its call
/// sites' awaits, and every stream's future is allocated and moved whole, whereas these
/// answers are the rare paths.
fn send_body_response<'a>(
    resp: Response<Body>,
    respond: SendResponse<Bytes>,
    seen: impl FnOnce(u16, Option<std::net::SocketAddr>, &HeaderMap) -> (Tally, Option<GrpcEnd>) + 'a,
) -> Pin<Box<impl Future<Output = ()> + 'a>> {
    Box::pin(write_body_response(resp, respond, seen))
}

async fn write_body_response(
    resp: Response<Body>,
    mut respond: SendResponse<Bytes>,
    seen: impl FnOnce(u16, Option<std::net::SocketAddr>, &HeaderMap) -> (Tally, Option<GrpcEnd>),
) {
    let upstream = crate::access::Upstream::of(&resp);
    let (mut parts, body) = resp.into_parts();
    add_date(&mut parts.headers);
    let (tally, grpc) = seen(parts.status.as_u16(), upstream, &parts.headers);
    let end = body.is_end_stream();
    let Ok(mut to) = respond.send_response(Response::from_parts(parts, ()), end) else {
        return;
    };
    // Counts the DATA in the access log line (its end, or an empty body, completes it) and
    // the trailers' `grpc-status`.
    let mut body = Counted::new(body, tally, grpc);
    if end {
        return;
    }
    loop {
        let frame = tokio::select! {
            f = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)) => f,
            _ = poll_fn(|cx| to.poll_reset(cx)) => return,
        };
        match frame {
            None => {
                let _ = to.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "response body failed: stream reset");
                to.send_reset(Reason::INTERNAL_ERROR);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let eos = body.is_end_stream();
                    if send_all(&mut to, data, eos).await.is_err() || eos {
                        return;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = to.send_trailers(trailers);
                    }
                    return;
                }
            },
        }
    }
}

/// A client's request body as an `http_body::Body`, for the hyper engine's forwarding:
/// each chunk's window is given back as it is taken.
pub(crate) struct H2Body {
    recv: RecvStream,
    length: Option<u64>,
    data_done: bool,
}

impl http_body::Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match self.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(b))) => {
                    let _ = self.recv.flow_control().release_capacity(b.len());
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => self.data_done = true,
            }
        }
        match self.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(t))) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, R>(_: fn(A, B, C) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[test]
    fn hashing_on_host_reads_the_authority_when_no_host_was_sent() {
        use crate::balance::RequestHeaders;
        let authority = http::uri::Authority::from_static("api.example:8080");
        let mut headers = HeaderMap::new();
        headers.insert("x-user", http::HeaderValue::from_static("ann"));
        let head = HashHead {
            headers: &headers,
            authority: Some(&authority),
        };
        let host: Vec<&[u8]> = head.values("host").collect();
        assert_eq!(host, [b"api.example:8080".as_slice()]);
        let user: Vec<&[u8]> = head.values("x-user").collect();
        assert_eq!(user, [b"ann".as_slice()]);
        assert_eq!(head.values("x-none").count(), 0);

        headers.insert(http::header::HOST, http::HeaderValue::from_static("sent"));
        let head = HashHead {
            headers: &headers,
            authority: Some(&authority),
        };
        let host: Vec<&[u8]> = head.values("host").collect();
        assert_eq!(host, [b"sent".as_slice()]);
        let none = HashHead {
            headers: &HeaderMap::new(),
            authority: None,
        };
        assert_eq!(none.values("host").count(), 0);
    }

    /// Every stream's future is moved into the connection's set and allocated: it must stay
    /// small (the rare, large parts — dialling, waiting for a connection, hyper's
    /// forwarding — are boxed). It was 7.7 KiB before those were boxed, then 3.7–3.9 KiB,
    /// 3,864 bytes since the stream opens on a pooled connection without a future, and
    /// 3,472 since the forwarding to an HTTP/2 backend is no future of its own (debug
    /// build).
    #[test]
    fn a_stream_future_stays_small() {
        let size = future_size(serve_stream);
        assert!(size <= 4096, "a stream's future takes {size} bytes");
    }
}
