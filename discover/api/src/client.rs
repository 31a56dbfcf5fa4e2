//! The polling client of the `DISCOVER_URL` contract: the loop every sidecar and Rust
//! plugin runs to hold its current config.
//!
//! It long-polls the URL (`If-None-Match` with the held ETag plus `?wait=SECONDS`),
//! validates every config it receives as a whole, and publishes each new valid one as a
//! [`Snapshot`] on a `tokio::sync::watch`. It never publishes an invalid config, nor one
//! older than the one it holds. It keeps the last good config on disk (written atomically)
//! and starts from that copy, so a sidecar restarted while discover is down still serves.
//! Errors back off exponentially with full jitter (100 ms doubling up to 30 s) and the
//! backoff resets on the next success. It speaks HTTP/1.1, plain or over TLS (rustls, the
//! system's trust roots plus any given with [`Client::with_root_certificates_pem`]).
//!
//! The reference for the behaviour is `docs/discover-api.md`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{
    ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, ETAG, HeaderValue, IF_NONE_MATCH,
};
use hyper::{Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus::{Gauge, IntCounterVec, IntGauge, Opts, Registry};
use rand::Rng;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::credential::{Credential, TokenFile, TokenFileError};
use crate::snapshot::{ConfigError, Snapshot};

/// The largest config body accepted, in bytes, before and after gzip decoding.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024 * 1024;
/// The largest error body read from discover, in bytes (the rest is dropped).
const MAX_ERROR_BYTES: usize = 16 * 1024;
/// The name of the on-disk copy of the last good config, inside `state_dir`.
pub const STATE_FILE: &str = "sidecar-config.json";
/// The first backoff ceiling after an error.
const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The largest backoff ceiling.
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// At most one poll starts per this interval when nothing new arrives, so a server that
/// ignores `?wait=` (a plain Rainbond-style `DISCOVER_URL`) is polled, not hammered.
const MIN_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Time to open a TCP connection to discover.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How much longer than `wait` a long poll may take before the client gives up on it.
const REQUEST_SLACK: Duration = Duration::from_secs(15);
/// How many validation errors of one rejected config are logged (the rest are counted).
const MAX_LOGGED_ERRORS: usize = 20;

/// What the client polls and where it keeps its copy.
#[derive(Clone)]
pub struct ClientConfig {
    /// The `DISCOVER_URL`, opaque: the client only appends `wait=SECONDS` to its query.
    pub url: String,
    /// A directory where the last good config is kept (written atomically, as
    /// [`STATE_FILE`]); `None` keeps it in memory only.
    pub state_dir: Option<PathBuf>,
    /// How long discover may hold a long poll open, sent as `?wait=SECONDS` (whole seconds;
    /// default 30 s). Zero turns long polling off (plain polling, once a second).
    pub wait: Duration,
    /// Sent as the `Authorization` header when set. Never logged.
    pub authorization: Option<String>,
    /// A file holding a bearer token, sent as `Authorization: Bearer <token>` and read again
    /// whenever the file changes (see [`crate::credential::TokenFile`]); not together with
    /// `authorization`. Never logged.
    pub token_file: Option<PathBuf>,
    /// The prefix of the client's metric names, e.g. `sidemesh_proxy` gives
    /// `sidemesh_proxy_config_version`.
    pub metrics_prefix: String,
}

impl ClientConfig {
    /// A config for `url` with the defaults: no state directory, a 30 s wait, no
    /// `Authorization`, metrics prefixed `sidemesh_client`.
    pub fn new(url: impl Into<String>) -> ClientConfig {
        ClientConfig {
            url: url.into(),
            state_dir: None,
            wait: Duration::from_secs(30),
            authorization: None,
            token_file: None,
            metrics_prefix: "sidemesh_client".to_owned(),
        }
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL's query and user info and the Authorization value may be credentials.
        f.debug_struct("ClientConfig")
            .field("url", &redact(&self.url))
            .field("state_dir", &self.state_dir)
            .field("wait", &self.wait)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("token_file", &self.token_file)
            .field("metrics_prefix", &self.metrics_prefix)
            .finish()
    }
}

/// Why a [`Client`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is empty, does not parse, or lacks a scheme or host.
    #[error("DISCOVER_URL {url:?} is not usable: {reason}")]
    Url {
        /// The URL as given, without its query or user info (they may hold credentials).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS setup for an `https://` URL failed (no trust roots, bad PEM).
    #[error("cannot set up TLS for DISCOVER_URL: {0}")]
    Tls(String),
    /// The `Authorization` value cannot be an HTTP header value.
    #[error("the Authorization value holds characters not allowed in an HTTP header")]
    Authorization,
    /// The token file cannot be used.
    #[error(transparent)]
    TokenFile(#[from] TokenFileError),
    /// Both an `Authorization` value and a token file were given.
    #[error("give either an Authorization value or a token file, not both")]
    TwoCredentials,
    /// The metrics could not be registered (bad prefix, or registered twice).
    #[error("cannot register the client's metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The client's metrics.
#[derive(Clone)]
struct Metrics {
    /// `<prefix>_config_version`: the version of the config held.
    version: IntGauge,
    /// `<prefix>_discover_poll_errors_total{reason}`: polls that failed.
    poll_errors: IntCounterVec,
    /// `<prefix>_config_rejected_total{reason}`: configs received and not applied.
    rejected: IntCounterVec,
    /// `<prefix>_config_last_applied_timestamp_seconds`: when the held config was applied.
    last_applied: Gauge,
}

impl Metrics {
    fn new(prefix: &str, registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let version = IntGauge::new(
            format!("{prefix}_config_version"),
            "Version of the sidecar config held (0 before the first).",
        )?;
        let poll_errors = IntCounterVec::new(
            Opts::new(
                format!("{prefix}_discover_poll_errors_total"),
                "Polls of DISCOVER_URL that failed, by reason (connect, timeout, status, body).",
            ),
            &["reason"],
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                format!("{prefix}_config_rejected_total"),
                "Configs received and not applied, by reason (invalid, stale).",
            ),
            &["reason"],
        )?;
        let last_applied = Gauge::new(
            format!("{prefix}_config_last_applied_timestamp_seconds"),
            "Unix time the held config was applied (0 before the first).",
        )?;
        registry.register(Box::new(version.clone()))?;
        registry.register(Box::new(poll_errors.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(last_applied.clone()))?;
        // Make the label values visible at zero, so alerts can use rate() from the start.
        for reason in ["connect", "timeout", "status", "body"] {
            poll_errors.with_label_values(&[reason]);
        }
        for reason in ["invalid", "stale"] {
            rejected.with_label_values(&[reason]);
        }
        Ok(Metrics {
            version,
            poll_errors,
            rejected,
            last_applied,
        })
    }

    fn applied(&self, version: u64) {
        self.version.set(i64::try_from(version).unwrap_or(i64::MAX));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.last_applied.set(now);
    }
}

/// The polling client. Build it with [`Client::new`], start it with [`Client::spawn`].
pub struct Client {
    base: Uri,
    url: String,
    /// The URL as logged: without query or user info, which may hold credentials.
    log_url: String,
    state_dir: Option<PathBuf>,
    wait_seconds: u64,
    authorization: Credential,
    backoff_min: Duration,
    backoff_max: Duration,
    metrics: Metrics,
    http: HttpClient<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    /// The trust roots of `http`, kept for [`Client::poster`].
    roots: rustls::RootCertStore,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The Authorization value is a credential: never show it.
        f.debug_struct("Client")
            .field("url", &self.log_url)
            .field("state_dir", &self.state_dir)
            .field("wait_seconds", &self.wait_seconds)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Checks the URL and registers the metrics in `registry`. Does no I/O.
    pub fn new(cfg: ClientConfig, registry: &Registry) -> Result<Client, ClientError> {
        let base = parse_url(&cfg.url)?;
        let authorization = match (cfg.authorization.as_deref(), cfg.token_file.as_deref()) {
            (None, None) => Credential::None,
            (Some(a), None) => {
                let mut v = HeaderValue::from_str(a).map_err(|_| ClientError::Authorization)?;
                v.set_sensitive(true);
                Credential::Fixed(v)
            }
            (None, Some(path)) => Credential::File(Arc::new(TokenFile::open(path)?)),
            (Some(_), Some(_)) => return Err(ClientError::TwoCredentials),
        };
        // Trust roots are read only for https, where they are needed.
        let roots = if base.scheme_str() == Some("https") {
            native_roots()?
        } else {
            rustls::RootCertStore::empty()
        };
        let http = http_client(roots.clone())?;
        let metrics = Metrics::new(&cfg.metrics_prefix, registry)?;
        Ok(Client {
            base,
            log_url: redact(&cfg.url),
            url: cfg.url,
            state_dir: cfg.state_dir,
            wait_seconds: cfg.wait.as_secs(),
            authorization,
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
            metrics,
            http,
            roots,
        })
    }

    /// A [`Poster`] for URL references relative to `DISCOVER_URL` (the certificate
    /// signing request of mutual TLS): same trust roots, same `Authorization`.
    pub fn poster(&self) -> Result<Poster, ClientError> {
        Ok(Poster {
            base: self.base.clone(),
            authorization: self.authorization.clone(),
            http: http_client(self.roots.clone())?,
        })
    }

    /// Trusts the CA certificates in `pem` (PEM, one or more) for an `https://` URL, in
    /// addition to the system's roots: for a discover behind a private CA.
    pub fn with_root_certificates_pem(mut self, pem: &[u8]) -> Result<Client, ClientError> {
        let mut roots = native_roots()?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| ClientError::Tls(format!("bad PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| ClientError::Tls(format!("bad CA certificate: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(ClientError::Tls(
                "no certificate in the PEM data".to_owned(),
            ));
        }
        self.http = http_client(roots.clone())?;
        self.roots = roots;
        Ok(self)
    }

    /// Changes the backoff bounds (default 100 ms .. 30 s): after the n-th error in a row
    /// the client sleeps a uniformly random time in `0..=min(max, min * 2^(n-1))`.
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Client {
        self.backoff_min = min.max(Duration::from_millis(1));
        self.backoff_max = max.max(self.backoff_min);
        self
    }

    /// Loads the on-disk copy (if any, and valid) first, then polls forever.
    ///
    /// The disk copy is read before this returns, so the receiver already holds it when
    /// there is one. The task ends when every receiver is dropped (or when aborted).
    /// Must be called within a Tokio runtime.
    pub fn spawn(self) -> (watch::Receiver<Option<Snapshot>>, JoinHandle<()>) {
        let initial = self.state_dir.as_deref().and_then(load_state);
        if let Some(s) = &initial {
            self.metrics.applied(s.version());
            tracing::info!(
                version = s.version(),
                "starting from the disk copy of the config"
            );
        }
        let (tx, rx) = watch::channel(initial);
        let handle = tokio::spawn(self.run(tx));
        (rx, handle)
    }

    async fn run(self, tx: watch::Sender<Option<Snapshot>>) {
        let mut state = PollState {
            // Without a server ETag yet, the held version stands for it: the server's
            // ETag is the quoted version.
            etag: tx.borrow().as_ref().map(|s| format!("\"{}\"", s.version())),
            backoff: Backoff::new(self.backoff_min, self.backoff_max),
        };
        while !tx.is_closed() {
            let started = Instant::now();
            let outcome = tokio::select! {
                o = self.poll_once(&tx, &mut state.etag) => o,
                // Stop promptly, even in the middle of a long poll, once nobody listens.
                () = tx.closed() => return,
            };
            let next = match outcome {
                Outcome::Applied => {
                    state.backoff.reset();
                    continue;
                }
                Outcome::Unchanged => {
                    state.backoff.reset();
                    started + MIN_POLL_INTERVAL
                }
                // Paced like an error, so a server that keeps sending a bad config (and
                // ignores If-None-Match) is not hammered.
                Outcome::Rejected => Instant::now() + state.backoff.next_delay(&mut rand::rng()),
                Outcome::Failed(reason) => {
                    self.metrics
                        .poll_errors
                        .with_label_values(&[reason.label()])
                        .inc();
                    let delay = state.backoff.next_delay(&mut rand::rng());
                    tracing::debug!(delay_ms = delay.as_millis() as u64, "backing off");
                    Instant::now() + delay
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                // A backoff may be long (30 s): do not wait it out once nobody listens.
                () = tx.closed() => return,
            }
        }
    }

    /// One request: fetch, check, maybe publish. Updates `etag` to what the server holds.
    async fn poll_once(
        &self,
        tx: &watch::Sender<Option<Snapshot>>,
        etag: &mut Option<String>,
    ) -> Outcome {
        let long_poll = etag.is_some() && self.wait_seconds > 0;
        let uri = if long_poll {
            with_wait(&self.base, &self.url, self.wait_seconds)
        } else {
            self.base.clone()
        };
        let mut req = Request::get(uri)
            .header(ACCEPT, "application/json")
            .header(ACCEPT_ENCODING, "gzip");
        if let Some(tag) = etag.as_deref() {
            req = req.header(IF_NONE_MATCH, tag);
        }
        if let Some(auth) = self.authorization.header() {
            req = req.header(AUTHORIZATION, auth);
        }
        let req = match req.body(Empty::new()) {
            Ok(r) => r,
            Err(error) => {
                // Only the ETag can be odd here: forget it and ask afresh.
                tracing::warn!(%error, "cannot build the poll request; dropping the ETag");
                *etag = None;
                return Outcome::Failed(FailReason::Body);
            }
        };
        let limit = Duration::from_secs(self.wait_seconds) + REQUEST_SLACK;
        let resp = match tokio::time::timeout(limit, self.http.request(req)).await {
            Err(_) => {
                tracing::warn!(url = %self.log_url, timeout_s = limit.as_secs(), "discover did not answer in time");
                return Outcome::Failed(FailReason::Timeout);
            }
            Ok(Err(error)) => {
                tracing::warn!(url = %self.log_url, error = %error_chain(&error), "cannot reach discover");
                return Outcome::Failed(FailReason::Connect);
            }
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status();
        let new_etag = resp
            .headers()
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 256)
            .map(str::to_owned);
        let gzip = resp
            .headers()
            .get(CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        if status == StatusCode::NOT_MODIFIED {
            return Outcome::Unchanged;
        }
        if !status.is_success() {
            let body = read_capped(resp.into_body(), MAX_ERROR_BYTES, limit).await;
            let message = error_message(body.as_deref().unwrap_or_default(), gzip);
            tracing::warn!(url = %self.log_url, status = status.as_u16(), message = %message, "discover answered with an error");
            return Outcome::Failed(FailReason::Status);
        }
        let body = match read_capped(resp.into_body(), MAX_CONFIG_BYTES, limit).await {
            Ok(b) => b,
            Err(error) => {
                tracing::warn!(url = %self.log_url, %error, "cannot read the config body");
                return Outcome::Failed(FailReason::Body);
            }
        };
        let parsed = tokio::task::spawn_blocking(move || -> Result<_, BodyError> {
            let json = if gzip {
                gunzip_capped(&body, MAX_CONFIG_BYTES)?
            } else {
                body.to_vec()
            };
            let snapshot = Snapshot::from_json(&json);
            Ok((json, snapshot))
        })
        .await;
        let (json, parsed) = match parsed {
            Ok(Ok(p)) => p,
            Ok(Err(error)) => {
                tracing::warn!(url = %self.log_url, %error, "cannot decode the config body");
                return Outcome::Failed(FailReason::Body);
            }
            Err(error) => {
                tracing::warn!(%error, "config decoding task failed");
                return Outcome::Failed(FailReason::Body);
            }
        };
        let snapshot = match parsed {
            Ok(s) => s,
            Err(error) => {
                self.metrics.rejected.with_label_values(&["invalid"]).inc();
                log_rejected(&self.log_url, new_etag.as_deref(), &error);
                // Long-poll on the rejected ETag: the next answer is a change, not the
                // same bad config again.
                if new_etag.is_some() {
                    *etag = new_etag;
                }
                return Outcome::Rejected;
            }
        };
        *etag = Some(new_etag.unwrap_or_else(|| format!("\"{}\"", snapshot.version())));
        let held = tx.borrow().clone();
        if let Some(held) = held {
            let same_sidecar = {
                let (a, b) = (held.identity(), snapshot.identity());
                a.namespace == b.namespace && a.service == b.service && a.plugin == b.plugin
            };
            if same_sidecar && snapshot.version() < held.version() {
                self.metrics.rejected.with_label_values(&["stale"]).inc();
                tracing::warn!(
                    url = %self.log_url,
                    held = held.version(),
                    received = snapshot.version(),
                    "ignoring a config older than the one held"
                );
                return Outcome::Rejected;
            }
            if snapshot.version() == held.version() && snapshot.config() == held.config() {
                return Outcome::Unchanged;
            }
        }
        let version = snapshot.version();
        tx.send_replace(Some(snapshot));
        self.metrics.applied(version);
        tracing::info!(version, "applied a new config");
        if let Some(dir) = self.state_dir.clone() {
            let saved = tokio::task::spawn_blocking(move || save_state(&dir, &json)).await;
            match saved {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, "cannot keep the config on disk; it is applied in memory")
                }
                Err(error) => tracing::warn!(%error, "config saving task failed"),
            }
        }
        Outcome::Applied
    }
}

/// The result of one poll, for the loop's pacing.
#[derive(Debug)]
enum Outcome {
    /// A new config was published.
    Applied,
    /// `304`, or the same config again.
    Unchanged,
    /// A config arrived and was not applied (invalid, or older than the one held).
    Rejected,
    /// The poll failed.
    Failed(FailReason),
}

/// Why a poll failed: the `reason` label of the errors counter.
#[derive(Debug, Clone, Copy)]
enum FailReason {
    Connect,
    Timeout,
    Status,
    Body,
}

impl FailReason {
    fn label(self) -> &'static str {
        match self {
            FailReason::Connect => "connect",
            FailReason::Timeout => "timeout",
            FailReason::Status => "status",
            FailReason::Body => "body",
        }
    }
}

struct PollState {
    /// The ETag to send as `If-None-Match`: the last one the server gave.
    etag: Option<String>,
    backoff: Backoff,
}

/// Exponential backoff with full jitter: the n-th delay in a row is uniform in
/// `0..=min(max, min * 2^(n-1))`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    ceiling: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            ceiling: min,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.ceiling = self.min;
    }

    pub(crate) fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (ceiling * 2).min(self.max);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rng.random_range(0..=ms))
    }
}

/// Errors reading or decoding a body.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("body read timed out")]
    Timeout,
    #[error("{0}")]
    Io(String),
}

/// Reads a whole body, failing beyond `cap` bytes or after `limit`.
async fn read_capped(
    body: hyper::body::Incoming,
    cap: usize,
    limit: Duration,
) -> Result<Bytes, BodyError> {
    let collect = Limited::new(body, cap).collect();
    match tokio::time::timeout(limit, collect).await {
        Err(_) => Err(BodyError::Timeout),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge(cap)),
        Ok(Err(e)) => Err(BodyError::Io(e.to_string())),
    }
}

/// Decodes gzip, failing when the output would exceed `cap` bytes (a gzip bomb).
fn gunzip_capped(data: &[u8], cap: usize) -> Result<Vec<u8>, BodyError> {
    let mut out = Vec::new();
    let mut decoder = flate2::read::GzDecoder::new(data).take(cap as u64 + 1);
    decoder
        .read_to_end(&mut out)
        .map_err(|e| BodyError::Io(format!("bad gzip data: {e}")))?;
    if out.len() > cap {
        return Err(BodyError::TooLarge(cap));
    }
    Ok(out)
}

/// The message of a JSON error body (`{"error": ...}` or `{"message": ...}`), or the body
/// itself, shortened and with control characters escaped so it is safe to log.
fn error_message(body: &[u8], gzip: bool) -> String {
    let decoded;
    let body = if gzip {
        match gunzip_capped(body, MAX_ERROR_BYTES) {
            Ok(d) => {
                decoded = d;
                &decoded[..]
            }
            Err(_) => body,
        }
    } else {
        body
    };
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) {
        for key in ["error", "message"] {
            match map.get(key) {
                Some(serde_json::Value::String(s)) => return shorten(s),
                Some(serde_json::Value::Object(inner)) => {
                    if let Some(serde_json::Value::String(s)) = inner.get("message") {
                        return shorten(s);
                    }
                }
                _ => {}
            }
        }
    }
    shorten(&String::from_utf8_lossy(body))
}

fn shorten(s: &str) -> String {
    let s: String = s.chars().take(1024).collect();
    s.escape_debug().to_string()
}

fn log_rejected(url: &str, etag: Option<&str>, error: &ConfigError) {
    match error {
        ConfigError::Invalid(errors) => {
            let shown: Vec<String> = errors
                .0
                .iter()
                .take(MAX_LOGGED_ERRORS)
                .map(ToString::to_string)
                .collect();
            tracing::warn!(
                url,
                etag,
                errors = errors.0.len(),
                first = %shown.join("; "),
                "rejected an invalid config; keeping the last good one"
            );
        }
        ConfigError::Parse(e) => {
            tracing::warn!(url, etag, error = %e, "rejected a config that does not parse; keeping the last good one");
        }
    }
}

/// An error with its sources, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// The URL without what may be a credential: the query becomes `?<redacted>` and user
/// info `<redacted>@`. For logs and error messages.
pub(crate) fn redact(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, _)) => (b, "?<redacted>"),
        None => (url, ""),
    };
    let (scheme, rest) = match base.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, base),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("<redacted>@{host}"),
        None => authority.to_owned(),
    };
    let scheme = scheme.map(|s| format!("{s}://")).unwrap_or_default();
    format!("{scheme}{authority}{path}{query}")
}

/// The system's trust roots (`SSL_CERT_FILE` / `SSL_CERT_DIR` honoured). Unreadable
/// certificates are skipped, with a log line when none could be read.
fn native_roots() -> Result<rustls::RootCertStore, ClientError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 && !found.errors.is_empty() {
        let first = found
            .errors
            .first()
            .map(ToString::to_string)
            .unwrap_or_default();
        tracing::warn!(error = %first, "cannot read the system's trust roots");
    }
    Ok(roots)
}

/// The HTTP client: plain `http://`, or `https://` with rustls (ring) over `roots`.
fn http_client<B>(
    roots: rustls::RootCertStore,
) -> Result<HttpClient<HttpsConnector<HttpConnector>, B>, ClientError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ClientError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut tcp = HttpConnector::new();
    tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
    tcp.set_nodelay(true);
    // The https layer handles the scheme; the TCP connector must accept both.
    tcp.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    Ok(HttpClient::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1)
        .build(connector))
}

/// Checks a `DISCOVER_URL`: `http[s]://host[:port]/path[?query]`.
/// Sends `POST`s to URL references resolved against `DISCOVER_URL` (RFC 3986 §5.2), with
/// the client's trust roots and `Authorization`. Cheap to clone.
#[derive(Clone)]
pub struct Poster {
    base: Uri,
    authorization: Credential,
    http: HttpClient<HttpsConnector<HttpConnector>, http_body_util::Full<Bytes>>,
}

impl std::fmt::Debug for Poster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poster").finish_non_exhaustive()
    }
}

/// Why a [`Poster::post`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    /// The reference cannot be resolved against `DISCOVER_URL`.
    #[error("cannot resolve {0:?} against DISCOVER_URL")]
    Reference(String),
    /// Discover could not be reached, or did not answer in time.
    #[error("cannot reach discover: {0}")]
    Connect(String),
    /// Discover answered with an error status.
    #[error("discover answered {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The error message of the body.
        message: String,
    },
    /// The answer's body could not be read (too large, cut, too slow).
    #[error("cannot read discover's answer: {0}")]
    Body(String),
}

impl Poster {
    /// `POST`s `body` to `reference` and returns the 2xx answer's body (at most `cap` bytes),
    /// all within `timeout`.
    pub async fn post(
        &self,
        reference: &str,
        content_type: &'static str,
        body: Bytes,
        cap: usize,
        timeout: Duration,
    ) -> Result<Bytes, PostError> {
        let uri = resolve_reference(&self.base, reference)
            .ok_or_else(|| PostError::Reference(reference.to_owned()))?;
        let mut req = Request::post(uri)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .header(ACCEPT, "application/json, application/x-pem-file");
        if let Some(auth) = self.authorization.header() {
            req = req.header(AUTHORIZATION, auth);
        }
        let req = req
            .body(http_body_util::Full::new(body))
            .map_err(|e| PostError::Reference(e.to_string()))?;
        let resp = match tokio::time::timeout(timeout, self.http.request(req)).await {
            Err(_) => return Err(PostError::Connect("timed out".to_owned())),
            Ok(Err(e)) => return Err(PostError::Connect(error_chain(&e))),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if !status.is_success() {
            let body = read_capped(resp.into_body(), MAX_ERROR_BYTES, timeout).await;
            return Err(PostError::Status {
                status: status.as_u16(),
                message: error_message(body.as_deref().unwrap_or_default(), false),
            });
        }
        read_capped(resp.into_body(), cap, timeout)
            .await
            .map_err(|e| PostError::Body(e.to_string()))
    }
}

/// Resolves a URL reference without scheme or authority against `base` (RFC 3986 §5.2):
/// an absolute path replaces the path, a relative one replaces the last segment. `..`
/// segments are refused rather than merged.
pub fn resolve_reference(base: &Uri, reference: &str) -> Option<Uri> {
    if reference.is_empty()
        || reference.starts_with("//")
        || reference.contains("://")
        || reference.split(['/', '?']).any(|s| s == "..")
    {
        return None;
    }
    let path = if reference.starts_with('/') {
        reference.to_owned()
    } else {
        let dir = base
            .path()
            .rsplit_once('/')
            .map(|(dir, _)| dir)
            .unwrap_or("");
        format!("{dir}/{reference}")
    };
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(path.parse().ok()?);
    Uri::from_parts(parts).ok()
}

fn parse_url(url: &str) -> Result<Uri, ClientError> {
    let bad = |reason: &str| ClientError::Url {
        url: redact(url),
        reason: reason.to_owned(),
    };
    if url.trim().is_empty() {
        return Err(bad(
            "it is empty; set DISCOVER_URL to discover's sidecar URL",
        ));
    }
    if url.contains('#') {
        return Err(bad("it must not hold a fragment ('#')"));
    }
    let uri: Uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => return Err(bad(&format!("scheme {other:?} is not http or https"))),
        None => return Err(bad("it has no scheme; expected http://host:port/path")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("it has no host"));
    }
    Ok(uri)
}

/// The URL with `wait=SECONDS` appended to its query.
fn with_wait(base: &Uri, url: &str, seconds: u64) -> Uri {
    let sep = if base.query().is_some() { '&' } else { '?' };
    // Appending a plain `name=digits` pair to a URL that parsed keeps it valid; should it
    // ever not, poll without the wait rather than fail.
    format!("{url}{sep}wait={seconds}")
        .parse()
        .unwrap_or_else(|_| base.clone())
}

/// Reads and validates the disk copy; `None` (with a log line) when absent or bad.
fn load_state(dir: &Path) -> Option<Snapshot> {
    let path = dir.join(STATE_FILE);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot read the disk copy of the config; ignoring it");
            return None;
        }
    };
    let mut bytes = Vec::new();
    if let Err(error) = file
        .take(MAX_CONFIG_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
    {
        tracing::warn!(path = %path.display(), %error, "cannot read the disk copy of the config; ignoring it");
        return None;
    }
    if bytes.len() > MAX_CONFIG_BYTES {
        tracing::warn!(path = %path.display(), max_bytes = MAX_CONFIG_BYTES, "the disk copy of the config is too large; ignoring it");
        return None;
    }
    match Snapshot::from_json(&bytes) {
        Ok(s) => Some(s),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "the disk copy of the config is corrupt or invalid; ignoring it");
            None
        }
    }
}

/// Writes the config to `dir/STATE_FILE` atomically: a temp file in the same directory,
/// flushed to disk, then renamed over the old copy (and the directory synced), so a crash
/// leaves either the old copy or the new one, never half of one.
fn save_state(dir: &Path, json: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".sidecar-config.")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(json)?;
    tmp.as_file().sync_all()?;
    tmp.persist(dir.join(STATE_FILE)).map_err(|e| e.error)?;
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_resolve_next_to_the_config_url() {
        let base: Uri = "http://127.0.0.1:7070/v1/sidecars/shop/web/sidemesh-proxy?token=x"
            .parse()
            .unwrap();
        let r = |s: &str| resolve_reference(&base, s).map(|u| u.to_string());
        assert_eq!(
            r("sidemesh-proxy/certificate").as_deref(),
            Some("http://127.0.0.1:7070/v1/sidecars/shop/web/sidemesh-proxy/certificate")
        );
        assert_eq!(r("/v1/x").as_deref(), Some("http://127.0.0.1:7070/v1/x"));
        for bad in ["", "//evil/x", "http://evil/x", "../other/sidemesh-proxy"] {
            assert_eq!(r(bad), None, "{bad}");
        }
    }
    use rand::SeedableRng;

    #[test]
    fn urls_are_checked() {
        assert!(parse_url("http://127.0.0.1:8080/v1/sidecars/a/b/c").is_ok());
        assert!(parse_url("https://discover.example:8443/v1/sidecars/a/b/c").is_ok());
        for bad in [
            "",
            "  ",
            "127.0.0.1:80/x",
            "ftp://h/x",
            "http:///x",
            "http://h/x#f",
        ] {
            assert!(
                matches!(parse_url(bad), Err(ClientError::Url { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn credentials_stay_out_of_logs() {
        assert_eq!(
            redact("http://u:pw@h:1/v1/x?token=abc"),
            "http://<redacted>@h:1/v1/x?<redacted>"
        );
        assert_eq!(redact("http://h/v1/x"), "http://h/v1/x");
        assert_eq!(redact("h:80"), "h:80");
        let mut cfg = ClientConfig::new("http://h/x?token=abc");
        cfg.authorization = Some("Bearer s3cret".into());
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("abc") && !shown.contains("s3cret"),
            "{shown}"
        );
        let e = parse_url("ftp://h/x?token=abc").unwrap_err().to_string();
        assert!(!e.contains("abc"), "{e}");
    }

    #[test]
    fn wait_is_appended_to_the_query() {
        let u = "http://h:1/v1/sidecars/a/b/c";
        assert_eq!(
            with_wait(&parse_url(u).unwrap(), u, 30).to_string(),
            "http://h:1/v1/sidecars/a/b/c?wait=30"
        );
        let u = "http://h:1/x?token=abc";
        assert_eq!(
            with_wait(&parse_url(u).unwrap(), u, 5).to_string(),
            "http://h:1/x?token=abc&wait=5"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let ceilings = [100, 200, 400, 800, 1000, 1000];
        for want in ceilings {
            for _ in 0..50 {
                // The ceiling only moves on the first draw; probe it with a clone.
                let mut probe = b.clone();
                assert!(probe.next_delay(&mut rng) <= Duration::from_millis(want));
            }
            assert_eq!(b.ceiling, Duration::from_millis(want));
            b.next_delay(&mut rng);
        }
        b.reset();
        assert_eq!(b.ceiling, Duration::from_millis(100));
        // Full jitter spreads delays over the whole range, not just near the ceiling.
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        let draws: Vec<Duration> = (0..200).map(|_| b.next_delay(&mut rng)).collect();
        assert!(draws.iter().any(|d| *d < Duration::from_secs(3)));
        assert!(draws.iter().any(|d| *d > Duration::from_secs(7)));
    }

    #[test]
    fn gzip_is_capped() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![b'a'; 100_000]).unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(gunzip_capped(&gz, 100_000).unwrap().len(), 100_000);
        assert!(matches!(
            gunzip_capped(&gz, 99_999),
            Err(BodyError::TooLarge(99_999))
        ));
        assert!(gunzip_capped(b"not gzip", 10).is_err());
    }

    #[test]
    fn error_messages_are_extracted_and_escaped() {
        assert_eq!(
            error_message(br#"{"error":"unknown service shop/x"}"#, false),
            "unknown service shop/x"
        );
        assert_eq!(
            error_message(br#"{"error":{"message":"nope","status":404}}"#, false),
            "nope"
        );
        assert_eq!(
            error_message(b"bad\nthing\x1b", false),
            "bad\\nthing\\u{1b}"
        );
        assert_eq!(error_message(&vec![b'x'; 5000], false).len(), 1024);
    }

    #[test]
    fn state_is_saved_atomically_and_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        assert!(load_state(&nested).is_none());
        let json = br#"{"version":3,"identity":{"namespace":"shop","service":"web","plugin":"p"}}"#;
        save_state(&nested, json).unwrap();
        assert_eq!(load_state(&nested).unwrap().version(), 3);
        // Only the state file is left behind: no temp files.
        let names: Vec<_> = std::fs::read_dir(&nested)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
        std::fs::write(nested.join(STATE_FILE), b"{\"version\": 4, trunc").unwrap();
        assert!(load_state(&nested).is_none());
    }
}
