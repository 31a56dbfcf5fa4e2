//! Access logs: one line per HTTP request and per raw TCP connection, in JSON or as text,
//! written by a thread of their own so that a slow disk or a full pipe never holds up a
//! request. Lines are formatted on the data plane and handed over through a bounded queue;
//! when the queue is full the line is dropped and counted
//! (`sidemesh_proxy_access_log_dropped_total`), as Envoy's and Linkerd's access logs do
//! rather than block traffic.
//!
//! Off unless `--access-log json|text` is given. A request's line ([`Line`]) is written
//! when the exchange ends: both bodies done or cut. It has the time to the response head
//! (what the latency histogram records) and to the end, and the body bytes each way. A
//! TCP connection's line is written when it ends, with the bytes moved each way and how
//! it ended ([`TcpEnd`]).

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use prometheus::{IntCounter, Registry};

/// Lines waiting for the writer at most; more are dropped.
const QUEUE: usize = 16 * 1024;

/// The format of access log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// One line of space-separated fields, values from the request quoted.
    Text,
}

/// Where access logs go and how they look (`--access-log`, `--access-log-path`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The line format.
    pub format: Format,
    /// The file lines are appended to; `None`: standard output.
    pub path: Option<PathBuf>,
}

/// What one request looked like, taken from its head when access logs are on (and only
/// then: nothing is copied otherwise).
#[derive(Debug)]
pub struct Request {
    /// When it started (wall clock).
    pub started: SystemTime,
    /// The method.
    pub method: Box<str>,
    /// The authority (`:authority`, else `Host`).
    pub authority: Box<str>,
    /// The path and query.
    pub path: Box<str>,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    /// `x-request-id`, when the client sent one.
    pub request_id: Option<Box<str>>,
    /// `user-agent`, when the client sent one.
    pub user_agent: Option<Box<str>>,
}

impl Request {
    /// A request from the bytes of its head (not UTF-8: replaced, the log shows that).
    pub(crate) fn new(
        method: &[u8],
        authority: Option<&[u8]>,
        path: &[u8],
        protocol: &'static str,
        request_id: Option<&[u8]>,
        user_agent: Option<&[u8]>,
    ) -> Request {
        let text = |b: &[u8]| -> Box<str> { String::from_utf8_lossy(b).into() };
        Request {
            started: SystemTime::now(),
            method: text(method),
            authority: authority.map(text).unwrap_or_default(),
            path: text(path),
            protocol,
            request_id: request_id.map(text),
            user_agent: user_agent.map(text),
        }
    }

    /// The request of an `http` head.
    pub(crate) fn of<B>(req: &http::Request<B>) -> Request {
        let h = req.headers();
        let header = |name: &str| h.get(name).map(|v| v.as_bytes());
        let authority = match req.uri().authority() {
            Some(a) => Some(a.as_str().as_bytes()),
            None => header("host"),
        };
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let protocol = match req.version() {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        };
        Request::new(
            req.method().as_str().as_bytes(),
            authority,
            path.as_bytes(),
            protocol,
            header("x-request-id"),
            header("user-agent"),
        )
    }
}

/// The rest of a line: what the proxy made of the request.
#[derive(Debug)]
pub struct Outcome<'a> {
    /// `inbound` or `outbound`.
    pub direction: &'a str,
    /// The service, `namespace/name`: the one called (outbound) or the workload's own
    /// (inbound).
    pub service: &'a str,
    /// The route's name, or `default`; `None` when the request ended before a response
    /// head (unknown).
    pub route: Option<&'a str>,
    /// The status sent to the client; 0 when the client went away before any (Envoy's
    /// convention).
    pub status: u16,
    /// Time from the request's start to the end of the exchange (both bodies done or cut).
    pub duration: Duration,
    /// Time from the request's start to its response head, if one was sent.
    pub response: Option<Duration>,
    /// The client's address.
    pub client: SocketAddr,
    /// The client's verified mesh identity (inbound, mutual TLS).
    pub client_id: Option<&'a str>,
    /// The endpoint whose answer the client got (none for the sidecar's own answers).
    pub upstream: Option<SocketAddr>,
    /// Request body bytes taken from the client (chunk framing not counted).
    pub received: u64,
    /// Response body bytes sent to the client (chunk framing not counted).
    pub sent: u64,
    /// Whether the response body reached its end (false: cut, by either side).
    pub complete: bool,
}

/// Which way body bytes went ([`Line::add`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// From the client (the request body).
    Received,
    /// To the client (the response body).
    Sent,
}

/// What a request's line adds once its response head is out ([`Line::head`]); the rest is
/// the line's [`Who`].
#[derive(Debug)]
pub(crate) struct Head {
    /// The service of the config that served it (the one of [`Who`] unless a reload
    /// changed it).
    pub service: Arc<str>,
    /// The route's name; `None`: `default`.
    pub route: Option<Arc<str>>,
    pub status: u16,
    /// Time from the request's start to its response head.
    pub response: Duration,
    pub upstream: Option<SocketAddr>,
}

/// Where a request came in, known before any response ([`Line::new`]): what its line
/// says when the client goes away before a response head.
#[derive(Debug)]
pub(crate) struct Who {
    pub direction: &'static str,
    pub service: Arc<str>,
    pub client: SocketAddr,
    pub client_id: Option<Arc<str>>,
}

/// One request's line in the making, shared (an `Arc`) by what serves the request: its
/// engine and the bodies it relays. The line is written when the last of them lets go of
/// it: once both bodies are done or cut, with the bytes each way and the time to that
/// moment. A request whose client went away before any response head is logged with
/// status 0 and no route, as Envoy does.
#[derive(Debug)]
pub struct Line {
    log: Arc<AccessLog>,
    request: Request,
    who: Who,
    start: Instant,
    head: OnceLock<Head>,
    received: AtomicU64,
    sent: AtomicU64,
    complete: AtomicBool,
    discarded: AtomicBool,
}

impl Line {
    /// A line for `request` from `who`, which started at `start` (the instant the response
    /// time is measured from too), to be written to `log`.
    pub(crate) fn new(
        log: &Arc<AccessLog>,
        request: Request,
        who: Who,
        start: Instant,
    ) -> Arc<Line> {
        Arc::new(Line {
            log: log.clone(),
            request,
            who,
            start,
            head: OnceLock::new(),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            complete: AtomicBool::new(false),
            discarded: AtomicBool::new(false),
        })
    }

    /// The line will not be written: another engine serves (and logs) the request.
    pub(crate) fn discard(&self) {
        self.discarded.store(true, Ordering::Relaxed);
    }

    /// Records the response head (the first one given counts).
    pub(crate) fn head(&self, head: Head) {
        let _ = self.head.set(head);
    }

    /// Counts body bytes.
    pub(crate) fn add(&self, side: Side, n: u64) {
        let counter = match side {
            Side::Received => &self.received,
            Side::Sent => &self.sent,
        };
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Marks the response as sent to its end (for one without a body: its head).
    pub(crate) fn completed(&self) {
        self.complete.store(true, Ordering::Relaxed);
    }
}

/// What counts one body's bytes in its request's line: nothing when access logs are off.
/// For the response body, its end marks the response complete. One pointer wide (boxed
/// when there is a line): a stream's future holds several, and is moved whole.
#[derive(Clone, Debug)]
pub(crate) struct Tally(Option<Box<(Arc<Line>, Side)>>);

impl Tally {
    /// Counts on `line` (if any) as `side`.
    pub(crate) fn new(line: Option<&Arc<Line>>, side: Side) -> Tally {
        Tally(line.map(|l| Box::new((l.clone(), side))))
    }

    /// Counts `n` body bytes.
    pub(crate) fn add(&self, n: usize) {
        if let Some(t) = &self.0 {
            t.0.add(t.1, n as u64);
        }
    }

    /// The body reached its end.
    pub(crate) fn end(&self) {
        if let Some(t) = &self.0 {
            if t.1 == Side::Sent {
                t.0.completed();
            }
        }
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if *self.discarded.get_mut() {
            return;
        }
        let (received, sent) = (*self.received.get_mut(), *self.sent.get_mut());
        let duration = self.start.elapsed();
        let who = &self.who;
        // Without a head, the client went away before a response.
        let head = self.head.get();
        let outcome = Outcome {
            direction: who.direction,
            service: head.map_or(&who.service, |h| &h.service),
            route: head.map(|h| h.route.as_deref().unwrap_or("default")),
            status: head.map_or(0, |h| h.status),
            duration,
            response: head.map(|h| h.response),
            client: who.client,
            client_id: who.client_id.as_deref(),
            upstream: head.and_then(|h| h.upstream),
            received,
            sent,
            complete: head.is_some() && *self.complete.get_mut(),
        };
        self.log.record(&self.request, &outcome);
    }
}

/// The endpoint that answered, carried in a response's extensions from the hyper
/// engine's forwarding to where the line is written (set only when access logs are on).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Upstream(pub(crate) SocketAddr);

impl Upstream {
    /// The endpoint a response came from, if it says.
    pub(crate) fn of<B>(resp: &http::Response<B>) -> Option<SocketAddr> {
        resp.extensions().get::<Upstream>().map(|u| u.0)
    }
}

/// How a raw TCP connection ended, as its line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpEnd {
    /// Both sides finished (or one closed): the usual end.
    Closed,
    /// No bytes either way for the idle timeout.
    IdleTimeout,
    /// The backend had no endpoint to pick.
    NoEndpoints,
    /// Every connect attempt failed.
    ConnectFailed,
    /// A circuit-breaker limit refused it.
    Overloaded,
    /// `allow_clients` refused the client (inbound).
    Refused,
    /// Cut by the sidecar's shutdown (the drain timeout ran out).
    Shutdown,
}

impl TcpEnd {
    /// The word in the line.
    pub fn as_str(self) -> &'static str {
        match self {
            TcpEnd::Closed => "closed",
            TcpEnd::IdleTimeout => "idle_timeout",
            TcpEnd::NoEndpoints => "no_endpoints",
            TcpEnd::ConnectFailed => "connect_failed",
            TcpEnd::Overloaded => "overloaded",
            TcpEnd::Refused => "refused",
            TcpEnd::Shutdown => "shutdown",
        }
    }
}

/// One raw TCP connection, for its line.
#[derive(Debug)]
pub struct Tcp<'a> {
    /// When it was accepted (wall clock).
    pub started: SystemTime,
    /// `inbound` or `outbound`.
    pub direction: &'a str,
    /// The service, `namespace/name`: the one called (outbound) or the workload's own
    /// (inbound).
    pub service: &'a str,
    /// How it ended.
    pub end: TcpEnd,
    /// Time from accept to end.
    pub duration: Duration,
    /// The client's address.
    pub client: SocketAddr,
    /// The client's verified mesh identity (inbound, mutual TLS).
    pub client_id: Option<&'a str>,
    /// The endpoint it was relayed to (none when no connect succeeded).
    pub upstream: Option<SocketAddr>,
    /// Bytes from the client to the upstream.
    pub to_upstream: u64,
    /// Bytes from the upstream to the client.
    pub to_client: u64,
}

/// The access log: a queue to the writer thread.
pub struct AccessLog {
    format: Format,
    queue: SyncSender<String>,
    dropped: IntCounter,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl AccessLog {
    /// Opens the destination (a file is created if missing, and appended to) and starts
    /// the writer thread. An error names the file and why it cannot be written.
    pub fn start(settings: &Settings, registry: &Registry) -> anyhow::Result<AccessLog> {
        let out: Box<dyn Write + Send> = match &settings.path {
            None => Box::new(io::stdout()),
            Some(p) => Box::new(open(p)?),
        };
        let dropped = IntCounter::new(
            "sidemesh_proxy_access_log_dropped_total",
            "Access log lines dropped because the writer fell behind (queue full).",
        )?;
        registry.register(Box::new(dropped.clone()))?;
        let (queue, lines) = sync_channel(QUEUE);
        let name = settings
            .path
            .as_ref()
            .map_or_else(|| "standard output".to_owned(), |p| p.display().to_string());
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(lines, out, &name))?;
        Ok(AccessLog {
            format: settings.format,
            queue,
            dropped,
        })
    }

    /// Queues the line of one request; never waits.
    pub fn record(&self, req: &Request, outcome: &Outcome<'_>) {
        self.queue(match self.format {
            Format::Json => json_line(req, outcome),
            Format::Text => text_line(req, outcome),
        });
    }

    /// Queues the line of one TCP connection; never waits.
    pub fn record_tcp(&self, conn: &Tcp<'_>) {
        self.queue(match self.format {
            Format::Json => tcp_json_line(conn),
            Format::Text => tcp_text_line(conn),
        });
    }

    fn queue(&self, line: String) {
        // Full (the writer is behind) or gone: dropped, counted, never waited for.
        if self.queue.try_send(line).is_err() {
            self.dropped.inc();
        }
    }
}

fn open(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| {
            anyhow::anyhow!(
                "--access-log-path {}: cannot open it for appending: {e}",
                path.display()
            )
        })
}

/// The writer thread: writes lines as they come, flushing whenever the queue is empty.
/// Ends when the access log is dropped. A write error is logged once and the lines go on
/// being taken (and lost) so that the queue never fills because of it.
fn write_lines(lines: Receiver<String>, out: Box<dyn Write + Send>, name: &str) {
    let mut out = io::BufWriter::with_capacity(64 * 1024, out);
    let mut failed = false;
    while let Ok(first) = lines.recv() {
        let mut r = out.write_all(first.as_bytes());
        while let (Ok(()), Ok(more)) = (&r, lines.try_recv()) {
            r = out.write_all(more.as_bytes());
        }
        let r = r.and_then(|()| out.flush());
        match (r, failed) {
            (Err(e), false) => {
                failed = true;
                tracing::warn!(to = %name, error = %e, "cannot write the access log; lines are lost until it can");
            }
            (Ok(()), true) => {
                failed = false;
                tracing::info!(to = %name, "writing the access log again");
            }
            _ => {}
        }
    }
}

/// The fields of a JSON line, in order.
#[derive(serde::Serialize)]
struct JsonLine<'a> {
    start_time: &'a str,
    direction: &'a str,
    service: &'a str,
    route: Option<&'a str>,
    method: &'a str,
    authority: &'a str,
    path: &'a str,
    protocol: &'a str,
    status: u16,
    duration_ms: f64,
    response_ms: Option<f64>,
    bytes_received: u64,
    bytes_sent: u64,
    complete: bool,
    client: SocketAddr,
    client_id: Option<&'a str>,
    upstream: Option<SocketAddr>,
    request_id: Option<&'a str>,
    user_agent: Option<&'a str>,
}

fn json_line(req: &Request, o: &Outcome<'_>) -> String {
    let start = rfc3339_millis(req.started);
    let line = JsonLine {
        start_time: &start,
        direction: o.direction,
        service: o.service,
        route: o.route,
        method: &req.method,
        authority: &req.authority,
        path: &req.path,
        protocol: req.protocol,
        status: o.status,
        duration_ms: millis(o.duration),
        response_ms: o.response.map(millis),
        bytes_received: o.received,
        bytes_sent: o.sent,
        complete: o.complete,
        client: o.client,
        client_id: o.client_id,
        upstream: o.upstream,
        request_id: req.request_id.as_deref(),
        user_agent: req.user_agent.as_deref(),
    };
    // Serializing borrowed strings and numbers cannot fail.
    let mut s = serde_json::to_string(&line).unwrap_or_default();
    s.push('\n');
    s
}

/// `2026-12-05T14:49:23.123Z outbound shop/api default "GET /path HTTP/1.1" 200 1.234ms
/// response=1.100ms received=0 sent=512 complete=true authority="api" client=127.0.0.1:5555
/// client_id=- upstream=10.0.0.7:8080 request_id=- user_agent="curl/8"`:
/// what came from the request is quoted and escaped, so a line is always one line.
fn text_line(req: &Request, o: &Outcome<'_>) -> String {
    let mut s = String::with_capacity(192);
    let _ = write!(
        s,
        "{} {} {} {} \"",
        rfc3339_millis(req.started),
        o.direction,
        o.service,
        o.route.unwrap_or("-")
    );
    escape(&mut s, &req.method);
    s.push(' ');
    escape(&mut s, &req.path);
    let _ = write!(
        s,
        " {}\" {} {:.3}ms response=",
        req.protocol,
        o.status,
        millis(o.duration),
    );
    match o.response {
        Some(r) => {
            let _ = write!(s, "{:.3}ms", millis(r));
        }
        None => s.push('-'),
    }
    let _ = write!(
        s,
        " received={} sent={} complete={} authority=\"",
        o.received, o.sent, o.complete
    );
    escape(&mut s, &req.authority);
    let _ = write!(
        s,
        "\" client={} client_id={}",
        o.client,
        o.client_id.unwrap_or("-")
    );
    match o.upstream {
        Some(u) => {
            let _ = write!(s, " upstream={u}");
        }
        None => s.push_str(" upstream=-"),
    }
    for (name, value) in [
        ("request_id", &req.request_id),
        ("user_agent", &req.user_agent),
    ] {
        let _ = write!(s, " {name}=");
        match value {
            None => s.push('-'),
            Some(v) => {
                s.push('"');
                escape(&mut s, v);
                s.push('"');
            }
        }
    }
    s.push('\n');
    s
}

/// The fields of a TCP connection's JSON line, in order.
#[derive(serde::Serialize)]
struct TcpJsonLine<'a> {
    start_time: &'a str,
    direction: &'a str,
    service: &'a str,
    protocol: &'static str,
    end: &'static str,
    duration_ms: f64,
    client: SocketAddr,
    client_id: Option<&'a str>,
    upstream: Option<SocketAddr>,
    bytes_to_upstream: u64,
    bytes_to_client: u64,
}

fn tcp_json_line(c: &Tcp<'_>) -> String {
    let start = rfc3339_millis(c.started);
    let line = TcpJsonLine {
        start_time: &start,
        direction: c.direction,
        service: c.service,
        protocol: "TCP",
        end: c.end.as_str(),
        duration_ms: millis(c.duration),
        client: c.client,
        client_id: c.client_id,
        upstream: c.upstream,
        bytes_to_upstream: c.to_upstream,
        bytes_to_client: c.to_client,
    };
    // Serializing borrowed strings and numbers cannot fail.
    let mut s = serde_json::to_string(&line).unwrap_or_default();
    s.push('\n');
    s
}

/// `2026-12-05T14:49:23.123Z outbound shop/db TCP closed 812.004ms client=127.0.0.1:5555
/// client_id=- upstream=10.0.0.9:5432 to_upstream=1024 to_client=52311`.
fn tcp_text_line(c: &Tcp<'_>) -> String {
    let upstream = c.upstream.map_or_else(|| "-".to_owned(), |u| u.to_string());
    format!(
        "{} {} {} TCP {} {:.3}ms client={} client_id={} upstream={upstream} to_upstream={} to_client={}\n",
        rfc3339_millis(c.started),
        c.direction,
        c.service,
        c.end.as_str(),
        millis(c.duration),
        c.client,
        c.client_id.unwrap_or("-"),
        c.to_upstream,
        c.to_client
    )
}

/// Appends `v` with `"` and `\` escaped and anything outside printable ASCII as `\xNN`.
fn escape(s: &mut String, v: &str) {
    for b in v.bytes() {
        match b {
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(b as char),
            _ => {
                let _ = write!(s, "\\x{b:02x}");
            }
        }
    }
}

/// Milliseconds, to the microsecond.
fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// `t` in RFC 3339, UTC, to the millisecond.
fn rfc3339_millis(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let when = time::OffsetDateTime::UNIX_EPOCH + d;
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        when.year(),
        u8::from(when.month()),
        when.day(),
        when.hour(),
        when.minute(),
        when.second(),
        when.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Instant;

    fn request() -> Request {
        Request {
            started: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_946_163_123),
            method: "GET".into(),
            authority: "api.shop".into(),
            path: "/a?\"b\"\n".into(),
            protocol: "HTTP/1.1",
            request_id: Some("r-1".into()),
            user_agent: None,
        }
    }

    fn outcome() -> Outcome<'static> {
        Outcome {
            direction: "outbound",
            service: "shop/api",
            route: Some("default"),
            status: 503,
            duration: Duration::from_micros(1_234),
            response: Some(Duration::from_micros(1_100)),
            client: "127.0.0.1:5555".parse().unwrap(),
            client_id: Some("shop/web"),
            upstream: Some("10.0.0.7:8080".parse().unwrap()),
            received: 12,
            sent: 512,
            complete: true,
        }
    }

    #[test]
    fn a_tcp_line_names_its_end_and_the_bytes_each_way() {
        let conn = Tcp {
            started: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_946_163_123),
            direction: "outbound",
            service: "shop/db",
            end: TcpEnd::IdleTimeout,
            duration: Duration::from_micros(812_004),
            client: "127.0.0.1:5555".parse().unwrap(),
            client_id: None,
            upstream: Some("10.0.0.9:5432".parse().unwrap()),
            to_upstream: 1024,
            to_client: 52_311,
        };
        let v: serde_json::Value = serde_json::from_str(&tcp_json_line(&conn)).unwrap();
        assert_eq!(v["protocol"], "TCP");
        assert_eq!(v["end"], "idle_timeout");
        assert_eq!(v["duration_ms"], 812.004);
        assert_eq!(v["upstream"], "10.0.0.9:5432");
        assert_eq!(
            (
                v["bytes_to_upstream"].as_u64(),
                v["bytes_to_client"].as_u64()
            ),
            (Some(1024), Some(52_311))
        );
        assert!(v["client_id"].is_null());
        assert_eq!(
            tcp_text_line(&conn),
            "2025-12-05T14:49:23.123Z outbound shop/db TCP idle_timeout 812.004ms \
             client=127.0.0.1:5555 client_id=- upstream=10.0.0.9:5432 to_upstream=1024 \
             to_client=52311\n"
        );
    }

    #[test]
    fn a_json_line_is_one_object_with_every_field() {
        let line = json_line(&request(), &outcome());
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["start_time"], "2025-12-05T14:49:23.123Z");
        assert_eq!(v["path"], "/a?\"b\"\n");
        assert_eq!(v["status"], 503);
        assert_eq!(v["duration_ms"], 1.234);
        assert_eq!(v["response_ms"], 1.1);
        assert_eq!(v["bytes_received"], 12);
        assert_eq!(v["bytes_sent"], 512);
        assert_eq!(v["complete"], true);
        assert_eq!(v["client"], "127.0.0.1:5555");
        assert_eq!(v["client_id"], "shop/web");
        assert_eq!(v["upstream"], "10.0.0.7:8080");
        assert_eq!(v["request_id"], "r-1");
        assert!(v["user_agent"].is_null());
        assert_eq!(v["protocol"], "HTTP/1.1");
    }

    #[test]
    fn a_text_line_quotes_and_escapes_what_the_client_sent() {
        let line = text_line(&request(), &outcome());
        assert_eq!(
            line,
            "2025-12-05T14:49:23.123Z outbound shop/api default \"GET /a?\\\"b\\\"\\x0a HTTP/1.1\" \
             503 1.234ms response=1.100ms received=12 sent=512 complete=true \
             authority=\"api.shop\" client=127.0.0.1:5555 client_id=shop/web \
             upstream=10.0.0.7:8080 request_id=\"r-1\" user_agent=-\n"
        );
    }

    #[test]
    fn lines_reach_the_file_and_a_full_queue_drops_instead_of_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let registry = Registry::new();
        let settings = Settings {
            format: Format::Json,
            path: Some(path.clone()),
        };
        let log = AccessLog::start(&settings, &registry).unwrap();
        for _ in 0..3 {
            log.record(&request(), &outcome());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let lines = loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 3 || Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(lines.lines().count(), 3, "{lines}");
        assert_eq!(log.dropped.get(), 0);

        // A writer that takes nothing: once its queue is full, records are dropped (and
        // counted) at once rather than waited for.
        let (queue, _stuck) = sync_channel(2);
        let stuck = AccessLog {
            format: Format::Text,
            queue,
            dropped: IntCounter::new("d", "d").unwrap(),
        };
        for _ in 0..5 {
            stuck.record(&request(), &outcome());
        }
        assert_eq!(stuck.dropped.get(), 3);
    }

    #[test]
    fn a_line_is_written_when_its_last_holder_lets_go_and_only_after_a_head() {
        let (queue, lines) = sync_channel(8);
        let log = Arc::new(AccessLog {
            format: Format::Json,
            queue,
            dropped: IntCounter::new("d", "d").unwrap(),
        });
        let who = || Who {
            direction: "outbound",
            service: "shop/api".into(),
            client: "127.0.0.1:4444".parse().unwrap(),
            client_id: None,
        };
        // The client went away before any response head: status 0, no route.
        let line = Line::new(&log, request(), who(), Instant::now());
        Tally::new(Some(&line), Side::Received).add(3);
        drop(line);
        let v: serde_json::Value = serde_json::from_str(&lines.try_recv().unwrap()).unwrap();
        assert_eq!(
            (&v["status"], &v["route"], &v["response_ms"], &v["complete"]),
            (&json!(0), &json!(null), &json!(null), &json!(false))
        );
        assert_eq!(
            (&v["service"], &v["bytes_received"]),
            (&json!("shop/api"), &json!(3))
        );
        // Served by another engine: nothing.
        let line = Line::new(&log, request(), who(), Instant::now());
        line.discard();
        drop(line);
        assert!(lines.try_recv().is_err());

        let line = Line::new(&log, request(), who(), Instant::now());
        let body = Tally::new(Some(&line), Side::Sent);
        let upload = Tally::new(Some(&line), Side::Received);
        line.head(Head {
            service: "shop/web".into(),
            route: Some("api".into()),
            status: 200,
            response: Duration::from_millis(2),
            upstream: None,
        });
        upload.add(7);
        body.add(40);
        body.add(2);
        drop((line, upload));
        assert!(
            lines.try_recv().is_err(),
            "the response body still holds it"
        );
        body.end();
        drop(body);
        let v: serde_json::Value = serde_json::from_str(&lines.try_recv().unwrap()).unwrap();
        assert_eq!(v["route"], "api");
        assert_eq!(v["bytes_received"], 7);
        assert_eq!(v["bytes_sent"], 42);
        assert_eq!(v["complete"], true);
        assert_eq!(v["response_ms"], 2.0);
        // Received-side ends never complete a response.
        let line = Line::new(&log, request(), who(), Instant::now());
        line.head(Head {
            service: "shop/web".into(),
            route: None,
            status: 502,
            response: Duration::ZERO,
            upstream: None,
        });
        Tally::new(Some(&line), Side::Received).end();
        drop(line);
        let v: serde_json::Value = serde_json::from_str(&lines.try_recv().unwrap()).unwrap();
        assert_eq!(
            (v["route"].as_str(), v["complete"].as_bool()),
            (Some("default"), Some(false))
        );
    }

    #[test]
    fn a_path_that_cannot_be_opened_is_an_error_naming_it() {
        let settings = Settings {
            format: Format::Text,
            path: Some("/nonexistent-dir/access.log".into()),
        };
        let e = AccessLog::start(&settings, &Registry::new()).unwrap_err();
        assert!(e.to_string().contains("/nonexistent-dir/access.log"), "{e}");
    }
}
