//! The polling client against a fake discover server on 127.0.0.1:0: long polls, version
//! ordering, rejection of invalid configs, backoff, gzip and the on-disk copy.
// Test helpers outside #[test] functions may unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sidemesh_api::client::STATE_FILE;
use sidemesh_api::{Client, ClientConfig, ClientError, Snapshot};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

/// What the fake answers with.
#[derive(Clone)]
enum Reply {
    Config { etag: String, body: Vec<u8> },
    Error { status: StatusCode, body: String },
}

/// One request the fake saw.
#[derive(Clone, Debug)]
struct Seen {
    path_and_query: String,
    if_none_match: Option<String>,
    authorization: Option<String>,
    accept_encoding: Option<String>,
}

#[derive(Default)]
struct Counts {
    ok: usize,
    not_modified: usize,
    gzipped: usize,
}

/// A fake discover: serves one sidecar's config with real long-poll semantics.
#[derive(Clone)]
struct Fake {
    reply: Arc<watch::Sender<Reply>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    counts: Arc<Mutex<Counts>>,
    gzip: Arc<Mutex<bool>>,
    addr: SocketAddr,
}

impl Fake {
    async fn start(reply: Reply) -> Fake {
        Fake::start_with(reply, None).await
    }

    /// With `tls`, the fake speaks HTTPS.
    async fn start_with(reply: Reply, tls: Option<tokio_rustls::TlsAcceptor>) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = Fake {
            reply: Arc::new(watch::channel(reply).0),
            seen: Arc::default(),
            counts: Arc::default(),
            gzip: Arc::default(),
            addr: listener.local_addr().unwrap(),
        };
        let f = fake.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let f = f.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let f = f.clone();
                        async move { Ok::<_, Infallible>(f.handle(req).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(tls) => {
                            // A failed handshake (an untrusting client) just ends it.
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                    }
                });
            }
        });
        fake
    }

    fn url(&self, query: &str) -> String {
        format!(
            "http://{}/v1/sidecars/shop/web/sidemesh-proxy{query}",
            self.addr
        )
    }

    fn set(&self, reply: Reply) {
        self.reply.send_replace(reply);
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let seen = Seen {
            path_and_query: req
                .uri()
                .path_and_query()
                .map(ToString::to_string)
                .unwrap_or_default(),
            if_none_match: header("if-none-match"),
            authorization: header("authorization"),
            accept_encoding: header("accept-encoding"),
        };
        self.seen.lock().unwrap().push(seen.clone());
        let wait = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .find_map(|kv| kv.strip_prefix("wait="))
            .and_then(|w| w.parse::<u64>().ok())
            .unwrap_or(0);
        let mut rx = self.reply.subscribe();
        let deadline = Instant::now() + Duration::from_secs(wait);
        loop {
            let reply = rx.borrow_and_update().clone();
            match reply {
                Reply::Error { status, body } => {
                    return Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body)))
                        .unwrap();
                }
                Reply::Config { etag, body } => {
                    if seen.if_none_match.as_deref() != Some(etag.as_str()) {
                        let gzip = *self.gzip.lock().unwrap()
                            && seen
                                .accept_encoding
                                .as_deref()
                                .is_some_and(|a| a.contains("gzip"));
                        let mut resp = Response::builder()
                            .header("etag", etag)
                            .header("content-type", "application/json");
                        let body = if gzip {
                            self.counts.lock().unwrap().gzipped += 1;
                            resp = resp.header("content-encoding", "gzip");
                            let mut enc = flate2::write::GzEncoder::new(
                                Vec::new(),
                                flate2::Compression::fast(),
                            );
                            enc.write_all(&body).unwrap();
                            enc.finish().unwrap()
                        } else {
                            body
                        };
                        self.counts.lock().unwrap().ok += 1;
                        return resp.body(Full::new(Bytes::from(body))).unwrap();
                    }
                }
            }
            // Unchanged: hold the poll until a change or the end of the wait.
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                self.counts.lock().unwrap().not_modified += 1;
                return Response::builder()
                    .status(StatusCode::NOT_MODIFIED)
                    .body(Full::default())
                    .unwrap();
            }
        }
    }
}

fn config_json(version: u64) -> Vec<u8> {
    serde_json::json!({
        "version": version,
        "identity": {"namespace": "shop", "service": "web", "plugin": "sidemesh-proxy"},
        "inbound": [{"port": 8080, "port_outer": 28080}],
        "outbound": [{
            "name": "tomcat", "namespace": "shop", "address": "127.1.0.7",
            "dns_names": ["tomcat", "tomcat.shop"],
            "ports": [{"port": 8080, "endpoints": [{"address": "10.0.0.5", "port": 28080}]}]
        }],
        "plugin": {"variables": {"TOKEN": "s3cret"}}
    })
    .to_string()
    .into_bytes()
}

fn config(version: u64) -> Reply {
    Reply::Config {
        etag: format!("\"{version}\""),
        body: config_json(version),
    }
}

/// A config that parses but breaks a rule (the address is not loopback).
fn invalid(version: u64) -> Reply {
    let body = String::from_utf8(config_json(version))
        .unwrap()
        .replace("127.1.0.7", "10.9.9.9")
        .into_bytes();
    Reply::Config {
        etag: format!("\"{version}\""),
        body,
    }
}

fn client_config(url: String) -> ClientConfig {
    ClientConfig {
        url,
        state_dir: None,
        wait: Duration::from_secs(2),
        authorization: None,
        token_file: None,
        metrics_prefix: "test".to_owned(),
    }
}

fn start(cfg: ClientConfig) -> (watch::Receiver<Option<Snapshot>>, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let client = Client::new(cfg, &registry)
        .unwrap()
        .with_backoff(Duration::from_millis(20), Duration::from_millis(200));
    let (rx, _task) = client.spawn();
    (rx, registry)
}

/// Waits (at most 5 s) until the client holds `version`.
async fn holds(rx: &mut watch::Receiver<Option<Snapshot>>, version: u64) {
    timeout(
        Duration::from_secs(5),
        rx.wait_for(|s| s.as_ref().is_some_and(|s| s.version() == version)),
    )
    .await
    .unwrap_or_else(|_| panic!("client never held version {version}"))
    .unwrap();
}

/// Polls `f` every 10 ms for at most 5 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of a metric (with `reason` label when given) in `registry`.
fn metric(registry: &prometheus::Registry, name: &str, reason: Option<&str>) -> f64 {
    for family in registry.gather() {
        if family.name() != name {
            continue;
        }
        let counter = family.get_field_type() == prometheus::proto::MetricType::COUNTER;
        for m in family.get_metric() {
            let label_ok = match reason {
                None => true,
                Some(r) => m
                    .get_label()
                    .iter()
                    .any(|l| l.name() == "reason" && l.value() == r),
            };
            if label_ok {
                if counter {
                    return m.get_counter().get_value();
                }
                return m.get_gauge().get_value();
            }
        }
    }
    panic!("no metric {name} {reason:?}");
}

async fn connect_errors_reach(registry: &prometheus::Registry, n: f64) {
    eventually("connect errors", || {
        metric(registry, "test_discover_poll_errors_total", Some("connect")) >= n
    })
    .await;
}

fn version_on_disk(dir: &std::path::Path) -> u64 {
    let bytes = std::fs::read(dir.join(STATE_FILE)).unwrap();
    Snapshot::from_json(&bytes).unwrap().version()
}

#[tokio::test]
async fn long_poll_200_then_304_then_change_wakes_it() {
    let fake = Fake::start(config(1)).await;
    let mut cfg = client_config(fake.url("?token=t"));
    cfg.authorization = Some("Bearer abc".to_owned());
    let (mut rx, registry) = start(cfg);
    holds(&mut rx, 1).await;
    assert_eq!(metric(&registry, "test_config_version", None), 1.0);
    assert!(
        metric(
            &registry,
            "test_config_last_applied_timestamp_seconds",
            None
        ) > 1.0e9
    );
    // The wait (2 s) runs out once: a 304.
    eventually("a 304", || fake.counts.lock().unwrap().not_modified >= 1).await;
    let seen = fake.seen();
    assert_eq!(
        seen[0].path_and_query,
        "/v1/sidecars/shop/web/sidemesh-proxy?token=t"
    );
    assert_eq!(seen[0].if_none_match, None);
    assert_eq!(
        seen[1].path_and_query,
        "/v1/sidecars/shop/web/sidemesh-proxy?token=t&wait=2"
    );
    assert_eq!(seen[1].if_none_match.as_deref(), Some("\"1\""));
    for s in &seen {
        assert_eq!(s.authorization.as_deref(), Some("Bearer abc"));
        assert_eq!(s.accept_encoding.as_deref(), Some("gzip"));
    }
    // A change reaches the client while its poll is held, well before the wait runs out.
    let polls_before = fake.seen().len();
    let changed = Instant::now();
    fake.set(config(2));
    holds(&mut rx, 2).await;
    assert!(
        changed.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        changed.elapsed()
    );
    assert!(fake.seen().len() <= polls_before + 1);
    assert_eq!(metric(&registry, "test_config_version", None), 2.0);
    assert_eq!(
        metric(&registry, "test_discover_poll_errors_total", Some("status")),
        0.0
    );
}

#[tokio::test]
async fn a_rotated_token_file_is_sent_from_the_next_poll_on() {
    let fake = Fake::start(config(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "first-token\n").unwrap();
    let mut cfg = client_config(fake.url(""));
    cfg.token_file = Some(token.clone());
    let (mut rx, _registry) = start(cfg);
    holds(&mut rx, 1).await;
    // Rotated the way the kubelet and agents do it: a new file renamed over the old.
    let next = dir.path().join("token.new");
    std::fs::write(&next, "second-token").unwrap();
    std::fs::rename(&next, &token).unwrap();
    fake.set(config(2));
    holds(&mut rx, 2).await;
    let last = |fake: &Fake| fake.seen().last().and_then(|s| s.authorization.clone());
    eventually("a poll with the new token", || {
        last(&fake).as_deref() == Some("Bearer second-token")
    })
    .await;
    // A broken rewrite keeps the last good token.
    std::fs::write(&next, "").unwrap();
    std::fs::rename(&next, &token).unwrap();
    fake.set(config(3));
    holds(&mut rx, 3).await;
    let polls = fake.seen().len();
    eventually("one more poll", || fake.seen().len() > polls).await;
    assert_eq!(last(&fake).as_deref(), Some("Bearer second-token"));
    let seen = fake.seen();
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer first-token"));
}

#[tokio::test]
async fn gzip_bodies_are_decoded() {
    let fake = Fake::start(config(3)).await;
    *fake.gzip.lock().unwrap() = true;
    let (mut rx, _registry) = start(client_config(fake.url("")));
    holds(&mut rx, 3).await;
    assert_eq!(fake.counts.lock().unwrap().gzipped, 1);
    fake.set(config(4));
    holds(&mut rx, 4).await;
    assert_eq!(fake.counts.lock().unwrap().gzipped, 2);
}

#[tokio::test]
async fn a_version_going_backwards_is_ignored() {
    let fake = Fake::start(config(5)).await;
    let (mut rx, registry) = start(client_config(fake.url("")));
    holds(&mut rx, 5).await;
    fake.set(config(3));
    // The client took version 3 and went back to waiting on its ETag.
    eventually("a poll on ETag 3", || {
        fake.seen()
            .iter()
            .any(|s| s.if_none_match.as_deref() == Some("\"3\""))
    })
    .await;
    assert_eq!(rx.borrow().as_ref().unwrap().version(), 5);
    assert_eq!(
        metric(&registry, "test_config_rejected_total", Some("stale")),
        1.0
    );
    assert_eq!(metric(&registry, "test_config_version", None), 5.0);
    fake.set(config(6));
    holds(&mut rx, 6).await;
}

#[tokio::test]
async fn an_invalid_config_is_rejected_and_the_last_good_one_kept() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start(config(1)).await;
    let mut cfg = client_config(fake.url(""));
    cfg.state_dir = Some(dir.path().to_owned());
    let (mut rx, registry) = start(cfg);
    holds(&mut rx, 1).await;
    eventually("the disk copy", || dir.path().join(STATE_FILE).exists()).await;
    assert_eq!(version_on_disk(dir.path()), 1);

    fake.set(invalid(2));
    eventually("the rejection", || {
        metric(&registry, "test_config_rejected_total", Some("invalid")) == 1.0
    })
    .await;
    assert_eq!(rx.borrow().as_ref().unwrap().version(), 1);
    assert_eq!(version_on_disk(dir.path()), 1);
    // It long-polls on the rejected ETag rather than fetching the bad config again.
    eventually("a poll on ETag 2", || {
        fake.seen()
            .iter()
            .any(|s| s.if_none_match.as_deref() == Some("\"2\""))
    })
    .await;
    assert_eq!(
        metric(&registry, "test_config_rejected_total", Some("invalid")),
        1.0
    );

    // Not even JSON: rejected too.
    fake.set(Reply::Config {
        etag: "\"3\"".to_owned(),
        body: b"{\"version\": 3, oops".to_vec(),
    });
    eventually("the second rejection", || {
        metric(&registry, "test_config_rejected_total", Some("invalid")) == 2.0
    })
    .await;
    assert_eq!(rx.borrow().as_ref().unwrap().version(), 1);

    fake.set(config(4));
    holds(&mut rx, 4).await;
    eventually("the new disk copy", || version_on_disk(dir.path()) == 4).await;
}

#[tokio::test]
async fn errors_back_off_and_recover() {
    let fake = Fake::start(Reply::Error {
        status: StatusCode::SERVICE_UNAVAILABLE,
        body: r#"{"error":"discover is loading its state"}"#.to_owned(),
    })
    .await;
    let (mut rx, registry) = start(client_config(fake.url("")));
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Read the error count before the request count: a try may be in flight between the
    // two reads (seen by the fake, not yet counted by the client), never the other way.
    let errors = metric(&registry, "test_discover_poll_errors_total", Some("status"));
    let tries = fake.seen().len();
    // Backoff 20 ms doubling to 200 ms with full jitter: a handful of tries in a second,
    // not a tight loop.
    assert!((2..=40).contains(&tries), "{tries} tries in 1 s");
    assert!(
        errors == tries as f64 || errors + 1.0 == tries as f64,
        "{errors} errors counted for {tries} tries"
    );
    assert!(rx.borrow().is_none());
    fake.set(config(1));
    holds(&mut rx, 1).await;
}

#[tokio::test]
async fn connect_errors_are_counted() {
    // A port that nothing listens on.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (rx, registry) = start(client_config(format!("http://{addr}/v1/sidecars/a/b/c")));
    connect_errors_reach(&registry, 2.0).await;
    assert!(rx.borrow().is_none());
}

#[tokio::test]
async fn restarts_from_the_disk_copy_when_discover_is_down() {
    let dir = tempfile::tempdir().unwrap();
    {
        let fake = Fake::start(config(4)).await;
        let mut cfg = client_config(fake.url(""));
        cfg.state_dir = Some(dir.path().to_owned());
        let registry = prometheus::Registry::new();
        let (mut rx, task) = Client::new(cfg, &registry).unwrap().spawn();
        holds(&mut rx, 4).await;
        eventually("the disk copy", || dir.path().join(STATE_FILE).exists()).await;
        task.abort();
    }
    // Discover is unreachable now.
    let down = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = client_config(format!("http://{down}/v1/sidecars/shop/web/sidemesh-proxy"));
    cfg.state_dir = Some(dir.path().to_owned());
    let (rx, registry) = start(cfg);
    // Held at once, before any poll.
    let held = rx
        .borrow()
        .clone()
        .expect("the disk copy is published at spawn");
    assert_eq!(held.version(), 4);
    assert_eq!(
        held.resolve("tomcat.shop").unwrap().to_string(),
        "127.1.0.7"
    );
    assert_eq!(metric(&registry, "test_config_version", None), 4.0);
    eventually("connect errors", || {
        metric(
            &registry,
            "test_discover_poll_errors_total",
            Some("connect"),
        ) >= 1.0
    })
    .await;
    assert_eq!(rx.borrow().as_ref().unwrap().version(), 4);

    // Discover back with the same version: the first poll is already a long poll on it.
    let fake = Fake::start(config(4)).await;
    let mut cfg = client_config(fake.url(""));
    cfg.state_dir = Some(dir.path().to_owned());
    let (mut rx, _registry) = start(cfg);
    eventually("a poll", || !fake.seen().is_empty()).await;
    assert_eq!(fake.seen()[0].if_none_match.as_deref(), Some("\"4\""));
    assert_eq!(fake.counts.lock().unwrap().ok, 0);
    fake.set(config(5));
    holds(&mut rx, 5).await;
}

/// A `MakeWriter` that keeps log output in memory.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_corrupted_disk_copy_is_ignored_with_a_log_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(STATE_FILE), b"{\"version\": 9, \"identi").unwrap();
    let fake = Fake::start(config(1)).await;
    let mut cfg = client_config(fake.url(""));
    cfg.state_dir = Some(dir.path().to_owned());

    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let rx = tracing::subscriber::with_default(subscriber, || start(cfg).0);
    assert!(rx.borrow().is_none());
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("the disk copy of the config is corrupt or invalid; ignoring it")
            && text.contains(STATE_FILE),
        "{text}"
    );
    // A corrupt copy is not an ETag either: the first poll fetches.
    let mut rx = rx;
    holds(&mut rx, 1).await;
    assert_eq!(fake.seen()[0].if_none_match, None);
    eventually("the repaired disk copy", || {
        std::fs::read(dir.path().join(STATE_FILE))
            .ok()
            .and_then(|b| Snapshot::from_json(&b).ok())
            .is_some_and(|s| s.version() == 1)
    })
    .await;
}

#[tokio::test]
async fn the_task_ends_when_every_receiver_is_gone() {
    let fake = Fake::start(config(1)).await;
    let registry = prometheus::Registry::new();
    let (mut rx, task) = Client::new(client_config(fake.url("")), &registry)
        .unwrap()
        .spawn();
    holds(&mut rx, 1).await;
    // Now in a long poll; dropping the receiver ends it at once.
    drop(rx);
    timeout(Duration::from_secs(2), task)
        .await
        .expect("the task ended")
        .unwrap();
}

#[tokio::test]
async fn the_task_ends_during_a_backoff_when_every_receiver_is_gone() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let registry = prometheus::Registry::new();
    // A long backoff: the task must not sit it out.
    let (rx, task) = Client::new(client_config(format!("http://{addr}/x")), &registry)
        .unwrap()
        .with_backoff(Duration::from_secs(60), Duration::from_secs(60))
        .spawn();
    connect_errors_reach(&registry, 1.0).await;
    drop(rx);
    timeout(Duration::from_secs(2), task)
        .await
        .expect("the task ended")
        .unwrap();
}

#[test]
fn bad_urls_and_duplicate_metrics_are_clear_errors() {
    let registry = prometheus::Registry::new();
    let err = |url: &str| {
        Client::new(client_config(url.to_owned()), &registry)
            .unwrap_err()
            .to_string()
    };
    assert!(err("").contains("is empty"), "{}", err(""));
    assert!(err("discover:8080/x").contains("is not usable"));
    assert!(err("ftp://discover/x?token=abc").contains("is not http or https"));
    assert!(!err("ftp://discover/x?token=abc").contains("abc"));
    let mut cfg = client_config("http://127.0.0.1:1/x".to_owned());
    cfg.authorization = Some("Bearer \n".to_owned());
    assert!(matches!(
        Client::new(cfg, &registry),
        Err(ClientError::Authorization)
    ));
    Client::new(client_config("http://127.0.0.1:1/x".to_owned()), &registry).unwrap();
    assert!(matches!(
        Client::new(client_config("http://127.0.0.1:1/x".to_owned()), &registry),
        Err(ClientError::Metrics(_))
    ));
}

/// A certificate for 127.0.0.1, self-signed: (TLS acceptor, the certificate as PEM).
fn self_signed() -> (tokio_rustls::TlsAcceptor, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
        ck.cert.pem(),
    )
}

#[tokio::test]
async fn https_with_a_trusted_ca_and_not_without() {
    let (acceptor, pem) = self_signed();
    let fake = Fake::start_with(config(8), Some(acceptor)).await;
    let url = format!("https://{}/v1/sidecars/shop/web/sidemesh-proxy", fake.addr);

    // Not trusted: every poll fails its handshake, nothing is published.
    let (untrusting, registry) = start(client_config(url.clone()));
    connect_errors_reach(&registry, 2.0).await;
    assert!(untrusting.borrow().is_none());
    assert!(
        fake.seen().is_empty(),
        "no request may pass an untrusted handshake"
    );

    // Trusted: the long poll works as over plain HTTP.
    let registry = prometheus::Registry::new();
    let (mut rx, _task) = Client::new(client_config(url), &registry)
        .unwrap()
        .with_root_certificates_pem(pem.as_bytes())
        .unwrap()
        .spawn();
    holds(&mut rx, 8).await;
    fake.set(config(9));
    holds(&mut rx, 9).await;
    assert_eq!(fake.seen()[1].if_none_match.as_deref(), Some("\"8\""));
}

#[test]
fn bad_ca_pem_is_a_clear_error() {
    let registry = prometheus::Registry::new();
    let client = Client::new(client_config("https://127.0.0.1:1/x".to_owned()), &registry).unwrap();
    let e = client
        .with_root_certificates_pem(b"not a certificate")
        .unwrap_err();
    assert!(e.to_string().contains("no certificate"), "{e}");
}
