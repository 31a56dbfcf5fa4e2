//! The lean HTTP/1.1 engine: the common case of HTTP/1.1 proxying done in the client
//! connection's own task, without hyper's per-request machinery on either side.
//!
//! Per request it parses the head once ([`codec`]), picks route, backend and endpoint with
//! the same functions as the hyper engine ([`crate::http`]: `select_route`, `admit`,
//! `plan`, `judge`, `retry_pause`), takes a plain HTTP/1.1 connection from the service's
//! pool (the one it used last first), writes the rewritten head and the body as it comes,
//! reads the response head, writes it back rewritten, and forwards the response body by
//! its framing. Bodies are forwarded in their own framing (chunked stays chunked, checked
//! strictly on the way); a response cut by the upstream is never completed towards the
//! client: its connection is closed instead.
//!
//! A request target in absolute form (`GET http://host/path`, as clients configured with
//! a proxy send) is taken too: routed by its authority, forwarded in origin form.
//!
//! At a request boundary, anything unusual (an upgrade, `Expect`, HTTP/1.0, a head it
//! cannot parse, an HTTP/2 upstream) goes to the hyper engine: the bytes read so far are
//! put back in front of the stream ([`Rewind`]) and [`crate::http::serve`] takes the
//! connection over for good.

pub(crate) mod codec;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt;
use sidemesh_api::config::Protocol;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Sleep;

use crate::Drain;
use crate::access::Side;
use crate::balance::{Endpoint, request_hash};
use crate::drain::Fired;
use crate::hostile::BodyFraming;
use crate::http::{
    ConnCtx, Ended, Failure, InflightGuard, admit, judge, max_tries, no_endpoints, observe,
    overloaded, plan, resolve, retry_pause, select_route, try_deadline,
};
use crate::state::{Backend, Direction, Target};
use crate::tls::Io;
use crate::upstream::{Body, Clients, ConnectError, RawConn};
use codec::{
    BodyState, Buf, Chunked, Parsed, RequestHead, ResponseFraming, ResponseHead, is_hop_by_hop,
    named_by_connection, put_decimal, put_header, put_line,
};

/// Largest request body held so that it can be replayed on a retry (as the hyper engine).
const MAX_REPLAY_BODY: usize = 64 * 1024;
/// Size of the read buffers to start with (allocated on the first read; most heads are
/// well under 1 KiB, and the buffers grow for longer ones and for bodies).
const BUF_START: usize = 4 * 1024;
/// Room for the heads written to start with (within the allocator's per-thread cache).
const OUT_START: usize = 1024;
/// Header lines of a head to make room for to start with.
const HEADERS_START: usize = 16;
/// Largest upstream response head, and the body-copy buffer size.
const MAX_UPSTREAM_BUF: usize = 1024 * 1024;

/// Which engine serves HTTP/1.1 client connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// Hyper on both sides, for everything.
    Hyper,
    /// The lean engine for the common case, hyper for the rest.
    #[default]
    Lean,
}

/// Serves one HTTP/1.1 client connection with the lean engine, handing it to the hyper
/// engine if a request needs it.
pub(crate) async fn serve(ctx: Arc<ConnCtx>, stream: Io, drain: Drain) {
    let mut conn = Lean {
        max_head: ctx.shared.config.max_header_bytes.max(8192),
        ctx,
        client: stream,
        buf: Buf::new(BUF_START),
        ubuf: Buf::new(BUF_START),
        out: Vec::with_capacity(OUT_START),
        head: RequestHead::with_capacity(HEADERS_START),
        rhead: ResponseHead::with_capacity(HEADERS_START),
        held: None,
        logged: None,
    };
    // `biased`: polled in this order, without drawing a random start per poll.
    let exit = tokio::select! {
        biased;
        _ = drain.hard.cancelled() => Exit::Close,
        e = conn.run(&drain) => e,
    };
    if let Some((c, clients)) = conn.held.take() {
        clients.release_raw(c);
    }
    if let Exit::Close = exit {
        // A FIN (or TLS close_notify) after the last response, not just a dropped socket.
        if !drain.hard.is_cancelled() {
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.client.shutdown()).await;
        }
        return;
    }
    if let Exit::Handoff(why) = exit {
        tracing::trace!(peer = %conn.ctx.peer, why, "HTTP/1.1 connection handed to hyper");
        let prefix = conn.buf.take();
        let io = Rewind {
            prefix,
            inner: conn.client,
        };
        // Boxed: hyper's connection future inline would make every lean connection's
        // future several times larger.
        Box::pin(crate::http::serve(conn.ctx, io, drain)).await;
    }
}

/// How the lean engine leaves a connection.
enum Exit {
    /// Close it (done, failed, or a response that cannot be followed).
    Close,
    /// The hyper engine takes over from the request at the start of the buffer.
    Handoff(&'static str),
}

/// What one request came to for the connection.
enum Next {
    KeepAlive,
    Close,
    Handoff(&'static str),
}

/// Why forwarding a body stopped.
enum BodyError {
    /// The side bodies are read from failed, ended early, or broke the framing.
    Read,
    /// The side bodies are written to failed.
    Write,
}

/// How one try at an endpoint failed before a response head.
enum TryError {
    Connect(ConnectError),
    Reset,
    /// The per-try or request deadline passed.
    TimedOut,
    /// The client's request body failed: nothing can be answered.
    Client,
}

struct Lean {
    ctx: Arc<ConnCtx>,
    client: Io,
    /// Bytes read from the client.
    buf: Buf,
    /// Bytes read from the upstream.
    ubuf: Buf,
    /// Bytes to write (a head, with the body bytes that came with it).
    out: Vec<u8>,
    head: RequestHead,
    rhead: ResponseHead,
    max_head: usize,
    /// The upstream connection of the last request, used again when the balancer picks
    /// the same endpoint (connection affinity), with the clients it belongs to.
    held: Option<(RawConn, Clients)>,
    /// The access log line of the request being served (when access logs are on); let
    /// go of, and so written, when the request is done.
    logged: Option<Arc<crate::access::Line>>,
}

impl Lean {
    async fn run(&mut self, drain: &Drain) -> Exit {
        let mut first = true;
        // One timer for every deadline of the connection (idle, header read, request).
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer);
        // One wait for a drain for the whole connection, not one per request.
        let soft = drain.soft.cancelled();
        tokio::pin!(soft);
        loop {
            match self.read_head(first, soft.as_mut(), timer.as_mut()).await {
                Ok(()) => {}
                Err(exit) => return exit,
            }
            first = false;
            let next = self
                .request(drain.soft.is_cancelled(), timer.as_mut())
                .await;
            // The request is done: its line is written, unless hyper serves it (and
            // logs it itself).
            if let (Next::Handoff(_), Some(line)) = (&next, &self.logged) {
                line.discard();
            }
            self.logged = None;
            match next {
                Next::KeepAlive if !drain.soft.is_cancelled() => {}
                Next::KeepAlive | Next::Close => return Exit::Close,
                Next::Handoff(why) => return Exit::Handoff(why),
            }
        }
    }

    /// Reads until a complete request head is at the start of the buffer; while none has
    /// started, `soft` (the drain) ends the connection.
    async fn read_head(
        &mut self,
        first: bool,
        mut soft: Pin<&mut Fired<'_>>,
        mut timer: Pin<&mut Sleep>,
    ) -> Result<(), Exit> {
        let max_headers = self.ctx.shared.config.max_headers;
        let header_read_timeout = self.ctx.shared.config.header_read_timeout;
        let idle = match self.ctx.target.service.timeouts.idle_ms {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        };
        // Slowloris: a head has `header_read_timeout` from its first byte (from the start
        // for a new connection); waiting for one is bounded by the idle timeout.
        let mut head_deadline = first.then(|| tokio::time::Instant::now() + header_read_timeout);
        loop {
            if !self.buf.is_empty() {
                match self.head.parse(self.buf.bytes(), max_headers) {
                    Parsed::Complete => return Ok(()),
                    Parsed::Partial if self.buf.len() >= self.max_head => {
                        return Err(Exit::Handoff("head-too-large"));
                    }
                    Parsed::Partial => {}
                    Parsed::Decline(why) => return Err(Exit::Handoff(why)),
                    Parsed::Refuse(why) => {
                        // Not counted as a request, as on the hyper engine.
                        let _ = self.answer(crate::hostile::refusal(why), true).await;
                        return Err(Exit::Close);
                    }
                }
                head_deadline
                    .get_or_insert_with(|| tokio::time::Instant::now() + header_read_timeout);
            }
            let waiting = self.buf.is_empty();
            let wake = match (head_deadline, idle) {
                (Some(d), _) => Some(d),
                (None, Some(t)) => Some(tokio::time::Instant::now() + t),
                (None, None) => None,
            };
            let timer = async {
                match wake {
                    Some(d) => until(timer.as_mut(), d).await,
                    None => std::future::pending().await,
                }
            };
            let read = tokio::select! {
                biased;
                r = self.buf.fill(&mut self.client, self.max_head) => Some(r),
                _ = timer => None,
                _ = soft.as_mut(), if waiting => return Err(Exit::Close),
            };
            match read {
                Some(Ok(0) | Err(_)) => return Err(Exit::Close),
                Some(Ok(_)) => {}
                None => {
                    if head_deadline.is_none() {
                        let m = &self.ctx.shared.metrics;
                        m.timeouts
                            .with_label_values(&[&*self.ctx.target.service.label, "idle"])
                            .inc();
                    }
                    return Err(Exit::Close);
                }
            }
        }
    }

    /// Proxies the request whose head is at the start of the buffer.
    async fn request(&mut self, closing: bool, mut timer: Pin<&mut Sleep>) -> Next {
        let start = Instant::now();
        let ctx = self.ctx.clone();
        let inbound = self.ctx.target.direction == Direction::Inbound;
        let (target, authz) = resolve(&ctx);
        let (client_id, denied) = match authz {
            Ok(id) => (id, None),
            Err(resp) => (None, Some(*resp)),
        };
        let buf = self.buf.bytes();
        let head = &self.head;
        if let Some(log) = &ctx.shared.config.access_log {
            let request = crate::access::Request::new(
                head.method.get(buf),
                head.host(buf).map(str::as_bytes),
                head.target.get(buf),
                "HTTP/1.1",
                head.header(buf, "x-request-id").map(str::as_bytes),
                head.header(buf, "user-agent").map(str::as_bytes),
            );
            self.logged = Some(crate::access::Line::new(log, request, ctx.who(), start));
        }
        let (index, backend) = if target.routes.is_empty() {
            (None, target.default_backend.clone())
        } else {
            let method = std::str::from_utf8(head.method.get(buf)).unwrap_or("");
            let full_target = std::str::from_utf8(head.target.get(buf)).unwrap_or("/");
            let path = full_target.split_once('?').map_or(full_target, |(p, _)| p);
            select_route(&target, method, head.host(buf), path, |name| {
                head.header(buf, name)
            })
        };
        if let Some(why) = self.needs_hyper(&backend) {
            return Next::Handoff(why);
        }
        let has_body = head.framing != BodyFraming::None;
        let head_request = head.method.get(buf) == b"HEAD";
        let route = index.and_then(|i| target.routes.get(i));
        if let Some(resp) = denied {
            return self
                .answer_early(resp, has_body, &target, index, start)
                .await;
        }
        let m = &ctx.shared.metrics;
        if let Some(f) = route.and_then(|r| r.fault.as_ref()) {
            let label = &ctx.target.service.label;
            if let Some(resp) = Box::pin(crate::http::inject_fault(m, label, f)).await {
                return self
                    .answer_early(resp, has_body, &target, index, start)
                    .await;
            }
        }
        let _active = match admit(m, &backend) {
            Ok(g) => g,
            Err(why) => {
                return self
                    .answer_early(overloaded(why), has_body, &target, index, start)
                    .await;
            }
        };
        let service = &backend.service;
        let (policy, deadline) = plan(route, service);

        // A small known body is read whole when retries are on, so that it can be replayed.
        if let BodyFraming::Length(n) = self.head.framing {
            let want = self.head.len as u64 + n;
            if policy.attempts > 0 && n as usize <= MAX_REPLAY_BODY {
                while (self.buf.len() as u64) < want {
                    let cap = self.max_head + MAX_REPLAY_BODY;
                    match self.buf.fill(&mut self.client, cap).await {
                        Ok(0) | Err(_) => return Next::Close,
                        Ok(_) => {}
                    }
                }
            }
        }
        let buf = self.buf.bytes();
        let head = &self.head;
        let replayable = match head.framing {
            BodyFraming::None => true,
            BodyFraming::Length(n) => buf.len() as u64 >= head.len as u64 + n,
            BodyFraming::Chunked => false,
        };
        let hash = request_hash(
            service.hash_on.as_ref(),
            &codec::HeadView { buf, head },
            self.ctx.peer,
        );
        write_request_head(
            &mut self.out,
            buf,
            head,
            route.and_then(|r| r.request_headers.as_ref()),
            inbound,
            client_id.map(str::as_bytes),
        );
        let head_len = head.len;
        self.buf.consume(head_len);
        let mut body = match self.head.framing {
            BodyFraming::None => None,
            BodyFraming::Length(n) => Some(BodyState::Length(n)),
            BodyFraming::Chunked => Some(BodyState::Chunked(Chunked::default())),
        };
        // The body bytes that came with the head go out with it, in one write.
        let mut body_done = match &mut body {
            None => true,
            Some(b) => match gather(b, &mut self.buf, &mut self.out, MAX_REPLAY_BODY) {
                Ok((done, n)) => {
                    self.count(Side::Received, n);
                    done
                }
                Err(()) => {
                    let resp = crate::hostile::refusal("bad-chunked-body");
                    let _ = self.answer(resp, true).await;
                    observe(
                        &self.ctx,
                        &target,
                        index,
                        400,
                        start,
                        self.logged.as_deref(),
                        None,
                    );
                    return Next::Close;
                }
            },
        };

        // Only a request whose whole body went into `out` with its head can be sent again.
        let whole = body_done && replayable;
        if whole && policy.attempts > 0 {
            service.shared.budget.deposit();
        }
        let max_tries = max_tries(policy, whole);
        let mut avoid = None;
        let mut tries = 0;
        let outcome = loop {
            tries += 1;
            let Some(ep) = backend.balancer.pick(hash, avoid) else {
                break Err((Failure::Connect, Some(no_endpoints())));
            };
            let try_deadline = try_deadline(policy, deadline);
            ep.stats.inflight.fetch_add(1, Ordering::Relaxed);
            let inflight = InflightGuard(ep.clone());
            let sent = Instant::now();
            let attempt = self.attempt(&backend, &ep, &mut body, &mut body_done, head_request);
            let r = match try_deadline {
                None => attempt.await,
                Some(d) => tokio::select! {
                    biased;
                    r = attempt => r,
                    _ = until(timer.as_mut(), d) => Err(TryError::TimedOut),
                },
            };
            let (ended, failure) = match &r {
                Ok(_) => (Ended::Status(status_of(self.rhead.status)), None),
                Err(TryError::Client) => return Next::Close,
                Err(TryError::TimedOut) => (Ended::TimedOut, Some(Failure::TimedOut)),
                Err(TryError::Connect(e)) => (Ended::ConnectFailed(e), Some(Failure::Connect)),
                Err(TryError::Reset) => (Ended::Reset, Some(Failure::Reset)),
            };
            let retriable = match judge(m, &backend, &ep, policy, deadline, ended, sent) {
                Ok(r) => r,
                Err(why) => break Err((Failure::Connect, Some(overloaded(why)))),
            };
            let retry = retriable && whole;
            if let Some(pause) = retry_pause(m, service, policy, retry, tries, max_tries, deadline)
            {
                drop(inflight);
                avoid = Some(ep.addr);
                tokio::time::sleep(pause).await;
                continue;
            }
            match (r, failure) {
                (Ok(framing), _) => break Ok((framing, inflight)),
                (Err(_), Some(f)) => break Err((f, None)),
                (Err(_), None) => break Err((Failure::Reset, None)),
            }
        };
        let (framing, inflight) = match outcome {
            Ok(x) => x,
            Err((failure, resp)) => {
                let resp = resp.unwrap_or_else(|| failure.response());
                return self
                    .answer_after(resp, body_done, &target, index, start)
                    .await;
            }
        };

        // The response head, rewritten, with the body bytes that came with it.
        let close = self.head.close || closing;
        let ubytes = self.ubuf.bytes();
        write_response_head(
            &mut self.out,
            ubytes,
            &self.rhead,
            framing,
            route.and_then(|r| r.response_headers.as_ref()),
            close,
        );
        let rhead_len = self.rhead.len;
        self.ubuf.consume(rhead_len);
        let status = self.rhead.status;
        observe(
            &self.ctx,
            &target,
            index,
            status,
            start,
            self.logged.as_deref(),
            Some(inflight.0.addr),
        );
        let mut rbody = match framing {
            ResponseFraming::None => None,
            ResponseFraming::Length(n) => Some(BodyState::Length(n)),
            ResponseFraming::Chunked => Some(BodyState::Chunked(Chunked::default())),
            ResponseFraming::Close => Some(BodyState::Close),
        };
        let Some((mut up, clients)) = self.held.take() else {
            return Next::Close;
        };
        if (close || framing == ResponseFraming::Close) && whole_body_read(&rbody, &self.ubuf) {
            self.client.last_before_shutdown();
        }
        let mut sent = 0;
        let result = match &mut rbody {
            None => self
                .client
                .write_all(&self.out)
                .await
                .map_err(|_| BodyError::Write),
            Some(state) => {
                forward_body(
                    state,
                    &mut up.io,
                    &mut self.ubuf,
                    &mut self.client,
                    &mut self.out,
                    &mut sent,
                )
                .await
            }
        };
        self.out.clear();
        self.count(Side::Sent, sent);
        match result {
            Ok(()) => {
                if let Some(line) = &self.logged {
                    line.completed();
                }
            }
            // A cut response is never completed: the client's connection closes.
            Err(_) => return Next::Close,
        }
        if !self.rhead.close && self.ubuf.is_empty() {
            self.held = Some((up, clients));
        }
        if close || framing == ResponseFraming::Close {
            Next::Close
        } else {
            Next::KeepAlive
        }
    }

    /// Why this request must go to the hyper engine, if it must.
    fn needs_hyper(&self, backend: &Backend) -> Option<&'static str> {
        if matches!(backend.protocol, Protocol::Http2 | Protocol::Grpc) {
            return Some("h2-upstream");
        }
        let shared = &self.ctx.shared;
        if shared.config.mesh_h2 && shared.tls.is_on() && backend.balancer.any_meshed() {
            return Some("mesh-h2");
        }
        None
    }

    /// One try: the request head and body to the endpoint, and its response head (1xx
    /// heads skipped) in `self.rhead`; the connection is left in `self.held`.
    async fn attempt(
        &mut self,
        backend: &Backend,
        ep: &Endpoint,
        body: &mut Option<BodyState>,
        body_done: &mut bool,
        head_request: bool,
    ) -> Result<ResponseFraming, TryError> {
        let clients = &backend.service.clients;
        let (addr, meshed) = (ep.addr, ep.meshed);
        // `out` holds the whole request (head and body) when the body was complete before
        // this try: then it can be sent again on a new connection.
        let whole = *body_done;
        // The held connection serves again if it is to this endpoint and of this service's
        // pool (its breaker slot counts against that service), and not retired by new
        // credentials.
        let (mut conn, mut fresh, mut owner) = match self.held.take() {
            Some((c, cl)) if c.addr == addr && cl.same_pools(clients) && cl.is_current(&c) => {
                (c, false, Some(cl))
            }
            other => {
                if let Some((c, cl)) = other {
                    cl.release_raw(c);
                }
                let (c, fresh) = clients
                    .checkout_raw(addr, meshed)
                    .await
                    .map_err(TryError::Connect)?;
                (c, fresh, None)
            }
        };
        self.ubuf.consume(self.ubuf.len());
        loop {
            let sent = conn.io.write_all(&self.out).await;
            if sent.is_ok() && !*body_done {
                if let Some(state) = body.as_mut() {
                    let mut scratch = std::mem::take(&mut self.out);
                    scratch.clear();
                    let mut received = 0;
                    let r = forward_body(
                        state,
                        &mut self.client,
                        &mut self.buf,
                        &mut conn.io,
                        &mut scratch,
                        &mut received,
                    )
                    .await;
                    self.out = scratch;
                    self.count(Side::Received, received);
                    match r {
                        Ok(()) => *body_done = true,
                        Err(BodyError::Read) => return Err(TryError::Client),
                        Err(BodyError::Write) => return Err(TryError::Reset),
                    }
                }
            }
            let got = match sent {
                Ok(()) => self.read_response_head(&mut conn.io, head_request).await,
                Err(_) => Err(0),
            };
            match got {
                Ok(f) => {
                    let owner = owner.take().unwrap_or_else(|| clients.clone());
                    self.held = Some((conn, owner));
                    return Ok(f);
                }
                // A reused connection that the upstream had closed before our request got
                // there: the request went nowhere; send it again on a new connection.
                Err(0) if !fresh && whole => {
                    let (c, _) = clients
                        .checkout_raw(addr, meshed)
                        .await
                        .map_err(TryError::Connect)?;
                    conn = c;
                    fresh = true;
                }
                Err(_) => return Err(TryError::Reset),
            }
        }
    }

    /// Reads a response head into `self.rhead`, skipping interim (1xx) heads. `Err(n)`:
    /// the connection failed after `n` response bytes.
    async fn read_response_head<S: AsyncRead + Unpin>(
        &mut self,
        io: &mut S,
        head_request: bool,
    ) -> Result<ResponseFraming, usize> {
        let mut seen = 0;
        loop {
            if !self.ubuf.is_empty() {
                match self.rhead.parse(self.ubuf.bytes(), head_request) {
                    Ok(Some(_)) if self.rhead.status == 101 => return Err(seen.max(1)),
                    Ok(Some(_)) if (100..200).contains(&self.rhead.status) => {
                        let n = self.rhead.len;
                        self.ubuf.consume(n);
                        continue;
                    }
                    Ok(Some(f)) => return Ok(f),
                    Ok(None) => {}
                    Err(_) => return Err(seen.max(1)),
                }
            }
            match self.ubuf.fill(io, MAX_UPSTREAM_BUF).await {
                Ok(0) | Err(_) => return Err(seen),
                Ok(n) => seen += n,
            }
        }
    }

    /// Answers a request before anything went upstream (its head still in the buffer);
    /// the connection stays open only if the request had no body to skip.
    async fn answer_early(
        &mut self,
        resp: Response<Body>,
        has_body: bool,
        target: &Target,
        index: Option<usize>,
        start: Instant,
    ) -> Next {
        if !has_body {
            self.buf.consume(self.head.len);
        }
        self.answer_after(resp, !has_body, target, index, start)
            .await
    }

    /// Answers a request with the sidecar's own response; the connection stays open only
    /// if the request's body was read to its end.
    async fn answer_after(
        &mut self,
        resp: Response<Body>,
        body_read: bool,
        target: &Target,
        index: Option<usize>,
        start: Instant,
    ) -> Next {
        let close = !body_read || self.head.close;
        let status = resp.status().as_u16();
        let written = self.answer(resp, close).await;
        if let (Some(line), Ok(n)) = (&self.logged, &written) {
            line.add(Side::Sent, *n as u64);
            line.completed();
        }
        observe(
            &self.ctx,
            target,
            index,
            status,
            start,
            self.logged.as_deref(),
            None,
        );
        if close || written.is_err() {
            Next::Close
        } else {
            Next::KeepAlive
        }
    }

    /// Writes a response the sidecar makes itself (errors, refusals). Boxed: it is off the
    /// common path, and its future inline would make every connection's future larger
    /// (and that is copied whole several times per connection).
    /// Answers the body's length once written.
    fn answer(
        &mut self,
        resp: Response<Body>,
        close: bool,
    ) -> Pin<Box<dyn Future<Output = io::Result<usize>> + Send + '_>> {
        Box::pin(self.answer_inline(resp, close))
    }

    async fn answer_inline(&mut self, resp: Response<Body>, close: bool) -> io::Result<usize> {
        let (parts, mut body) = resp.into_parts();
        // The sidecar's own bodies are small and in memory; still read at most 64 KiB.
        let mut bytes = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                if bytes.len() + data.len() > 64 * 1024 {
                    break;
                }
                bytes.extend_from_slice(&data);
            }
        }
        let body = bytes;
        self.out.clear();
        self.out.extend_from_slice(b"HTTP/1.1 ");
        put_decimal(&mut self.out, u64::from(parts.status.as_u16()));
        self.out.push(b' ');
        self.out
            .extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
        self.out.extend_from_slice(b"\r\n");
        for (name, value) in &parts.headers {
            if name == http::header::CONNECTION || name == http::header::CONTENT_LENGTH {
                continue;
            }
            put_header(&mut self.out, name.as_str().as_bytes(), value.as_bytes());
        }
        if close {
            put_header(&mut self.out, b"connection", b"close");
        }
        codec::put_date(&mut self.out);
        self.out.extend_from_slice(b"content-length: ");
        put_decimal(&mut self.out, body.len() as u64);
        self.out.extend_from_slice(b"\r\n\r\n");
        self.out.extend_from_slice(&body);
        if close {
            self.client.last_before_shutdown();
        }
        let r = self.client.write_all(&self.out).await;
        self.out.clear();
        r.map(|()| body.len())
    }

    /// Counts body bytes in the request's access log line, if it has one.
    fn count(&self, side: Side, n: u64) {
        if let Some(line) = &self.logged {
            line.add(side, n);
        }
    }
}

/// Completes at `deadline` on the connection's one timer. A later deadline than the armed
/// one waits for that to fire and re-arms then, so a steady stream of requests, whose
/// deadlines only move forward, re-arms the timer about once per timeout instead of
/// registering a timer per request.
async fn until(mut timer: Pin<&mut Sleep>, deadline: tokio::time::Instant) {
    loop {
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().await;
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        timer.as_mut().reset(deadline);
    }
}

fn status_of(code: u16) -> http::StatusCode {
    http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::BAD_GATEWAY)
}

/// Whether the response body (`None`: none) has been read whole into `buf`, so that the
/// response goes to the client in one write.
fn whole_body_read(body: &Option<BodyState>, buf: &Buf) -> bool {
    match body {
        None => true,
        Some(BodyState::Length(n)) => buf.bytes().len() as u64 >= *n,
        Some(_) => false,
    }
}

/// Moves the body bytes at the start of `buf` into `out` (at most about `limit` bytes);
/// `Ok((true, _))` when the body is complete, with the payload bytes moved (chunk framing
/// not counted). `Err` when a chunked body breaks its framing.
fn gather(
    state: &mut BodyState,
    buf: &mut Buf,
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<(bool, u64), ()> {
    let avail = buf.bytes();
    let avail = &avail[..avail.len().min(limit)];
    let (n, done) = state.step(avail).map_err(|_| ())?;
    out.extend_from_slice(&avail[..n]);
    buf.consume(n);
    Ok((done, state.payload(n)))
}

/// Forwards a body from `src` (bytes already read are in `buf`) to `dst`, starting with
/// what `out` holds (a head, possibly), until the body's framing ends it. `out` is left
/// empty. `moved` counts the payload bytes written (chunk framing not counted).
async fn forward_body<R, W>(
    state: &mut BodyState,
    src: &mut R,
    buf: &mut Buf,
    dst: &mut W,
    out: &mut Vec<u8>,
    moved: &mut u64,
) -> Result<(), BodyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let (done, n) = gather(state, buf, out, MAX_UPSTREAM_BUF).map_err(|()| BodyError::Read)?;
        if !out.is_empty() {
            dst.write_all(out).await.map_err(|_| BodyError::Write)?;
            out.clear();
        }
        *moved += n;
        if done {
            return Ok(());
        }
        match buf.fill(src, MAX_UPSTREAM_BUF).await {
            Ok(0) if matches!(state, BodyState::Close) => return Ok(()),
            Ok(0) | Err(_) => return Err(BodyError::Read),
            Ok(_) => {}
        }
    }
}

/// The request head for the upstream: origin form, HTTP/1.1, hop-by-hop headers and those
/// named in `Connection` removed, the route's rewrite applied, the verified client identity
/// set on inbound (a forged one removed), and the body's framing stated once.
fn write_request_head(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &RequestHead,
    rewrite: Option<&crate::state::Rewrite>,
    inbound: bool,
    client_id: Option<&[u8]>,
) {
    out.clear();
    out.extend_from_slice(head.method.get(buf));
    out.push(b' ');
    out.extend_from_slice(head.target.get(buf));
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // An absolute-form target's authority is the request's host: a proxy sends it as the
    // `Host`, not the client's (RFC 9112 §3.2.2), so the upstream sees the host the
    // request was routed by.
    if let Some(a) = head.authority {
        put_header(out, b"host", a.get(buf));
    }
    let mut te_trailers = false;
    for (n, v) in &head.headers {
        let (name, value) = (n.get(buf), v.get(buf));
        if name.eq_ignore_ascii_case(b"te") {
            te_trailers |= codec::has_token(value, b"trailers");
            continue;
        }
        if (head.authority.is_some() && name.eq_ignore_ascii_case(b"host"))
            || is_hop_by_hop(name)
            || name.eq_ignore_ascii_case(b"content-length")
            || (inbound && name.eq_ignore_ascii_case(crate::tls::CLIENT_ID_HEADER.as_bytes()))
            || (head.connection && named_by_connection(buf, &head.headers, name))
            || rewrite.is_some_and(|r| rewritten(r, name))
        {
            continue;
        }
        put_line(out, buf, *n, *v);
    }
    if te_trailers {
        put_header(out, b"te", b"trailers");
    }
    if let Some(r) = rewrite {
        for (name, value) in &r.set {
            put_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if let Some(id) = client_id {
        put_header(out, crate::tls::CLIENT_ID_HEADER.as_bytes(), id);
    }
    match head.framing {
        BodyFraming::None => {}
        BodyFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            put_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        BodyFraming::Chunked => put_header(out, b"transfer-encoding", b"chunked"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Whether a rewrite removes or sets (replaces) header `name`.
fn rewritten(r: &crate::state::Rewrite, name: &[u8]) -> bool {
    r.remove
        .iter()
        .any(|n| n.as_str().as_bytes().eq_ignore_ascii_case(name))
        || r.set
            .iter()
            .any(|(n, _)| n.as_str().as_bytes().eq_ignore_ascii_case(name))
}

/// The response head for the client: hop-by-hop headers out, the route's rewrite in, the
/// body's framing stated once, `Connection: close` when the client connection ends after it.
fn write_response_head(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &ResponseHead,
    framing: ResponseFraming,
    rewrite: Option<&crate::state::Rewrite>,
    close: bool,
) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    put_decimal(out, u64::from(head.status));
    out.push(b' ');
    out.extend_from_slice(
        status_of(head.status)
            .canonical_reason()
            .unwrap_or("")
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    let keep_length = matches!(framing, ResponseFraming::None | ResponseFraming::Length(_));
    let mut dated = false;
    for (n, v) in &head.headers {
        let name = n.get(buf);
        dated |= name.eq_ignore_ascii_case(b"date");
        if is_hop_by_hop(name)
            || name.eq_ignore_ascii_case(b"te")
            || (name.eq_ignore_ascii_case(b"content-length") && !keep_length)
            || (head.connection && named_by_connection(buf, &head.headers, name))
            || rewrite.is_some_and(|r| rewritten(r, name))
        {
            continue;
        }
        put_line(out, buf, *n, *v);
    }
    if let Some(r) = rewrite {
        for (name, value) in &r.set {
            put_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if !dated {
        codec::put_date(out);
    }
    match framing {
        ResponseFraming::Chunked => put_header(out, b"transfer-encoding", b"chunked"),
        ResponseFraming::Close => put_header(out, b"connection", b"close"),
        _ => {}
    }
    if close && framing != ResponseFraming::Close {
        put_header(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
}

/// A stream that yields `prefix` before the bytes of `inner`: the bytes the lean engine
/// read before it handed the connection to the hyper engine.
pub(crate) struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let part = self.prefix.split_to(n);
            buf.put_slice(&part);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
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
