//! Helpers for the proxy's integration tests: backends on real loopback sockets, a proxy
//! run in-process from JSON configs, and HTTP clients. Every wait is bounded.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sidemesh_api::Snapshot;
use sidemesh_proxy::tls::MeshTls;
use sidemesh_proxy::{Applied, Proxy, ProxyConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(10);

/// A random loopback address other than 127.0.0.1, so parallel tests never collide.
pub fn loopback() -> Ipv4Addr {
    use rand::Rng;
    let mut r = rand::rng();
    Ipv4Addr::new(
        127,
        r.random_range(2..250),
        r.random_range(1..250),
        r.random_range(2..250),
    )
}

/// A port that was free a moment ago on `ip`.
pub fn free_port(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HTTP backend (HTTP/1.1 and h2c) that answers `name` and counts its requests.
pub struct Backend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    pub stop: CancellationToken,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub type Handler = Arc<
    dyn Fn(Request<Incoming>) -> futures::future::BoxFuture<'static, Response<Full<Bytes>>>
        + Send
        + Sync,
>;

/// A backend answering every request with its name in the body and `x-backend` header,
/// echoing request headers that start with `x-` as `echo-<name>`.
pub async fn backend(ip: Ipv4Addr, name: &str) -> Backend {
    let name = name.to_owned();
    backend_with(
        ip,
        Arc::new(move |req: Request<Incoming>| {
            let name = name.clone();
            Box::pin(async move {
                let mut b = Response::builder().header("x-backend", name.as_str());
                for (k, v) in req.headers() {
                    if k.as_str().starts_with("x-") {
                        b = b.header(format!("echo-{}", k.as_str()), v.clone());
                    }
                }
                b = b.header(
                    "echo-host",
                    req.headers()
                        .get("host")
                        .cloned()
                        .unwrap_or_else(|| http::HeaderValue::from_static("")),
                );
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let text = if body.is_empty() {
                    name.clone()
                } else {
                    format!("{name}:{}", String::from_utf8_lossy(&body))
                };
                b.body(Full::new(Bytes::from(text))).unwrap()
            })
        }),
    )
    .await
}

/// A backend with a custom handler.
pub async fn backend_with(ip: Ipv4Addr, handler: Handler) -> Backend {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let (h, s) = (hits.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                _ = s.cancelled() => return,
            };
            let (h, handler, s) = (h.clone(), handler.clone(), s.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    h.fetch_add(1, Ordering::Relaxed);
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let conn = b.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = s.cancelled() => {}
                }
            });
        }
    });
    Backend { addr, hits, stop }
}

/// A proxy running in-process, fed configs through a watch channel.
pub struct Running {
    pub config: watch::Sender<Option<Snapshot>>,
    pub applied: watch::Receiver<Option<Applied>>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    pub registry: prometheus::Registry,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Running {
    /// The sum of counter `name` over the series whose labels include all of `labels`.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.sum(name, labels, |m| m.get_counter().get_value()) as u64
    }

    /// The sum of gauge `name` over the series whose labels include all of `labels`.
    pub fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> i64 {
        self.sum(name, labels, |m| m.get_gauge().get_value()) as i64
    }

    fn sum(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl Fn(&prometheus::proto::Metric) -> f64,
    ) -> f64 {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| {
                labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
            .map(value)
            .sum()
    }

    /// Sends a config and waits until its version is applied.
    pub async fn set(&self, json: &serde_json::Value) -> Applied {
        let snap = Snapshot::from_json(json.to_string().as_bytes()).expect("valid config");
        let version = snap.version();
        self.config.send_replace(Some(snap));
        let mut rx = self.applied.clone();
        tokio::time::timeout(
            WAIT,
            rx.wait_for(|a| a.as_ref().is_some_and(|a| a.version == version)),
        )
        .await
        .expect("config applied in time")
        .unwrap()
        .clone()
        .unwrap()
    }
}

/// Starts a proxy (inbound listeners on `inbound`) and applies `json`.
pub async fn start(inbound: Ipv4Addr, json: &serde_json::Value) -> Running {
    start_with(
        ProxyConfig {
            inbound_address: inbound.into(),
            drain_timeout: Duration::from_secs(5),
            ..ProxyConfig::default()
        },
        json,
    )
    .await
}

/// Starts a proxy like [`start`] whose HTTP/2 client connections are served by `engine`.
pub async fn start_h2(
    inbound: Ipv4Addr,
    json: &serde_json::Value,
    engine: sidemesh_proxy::http2::Engine,
) -> Running {
    start_with(
        ProxyConfig {
            inbound_address: inbound.into(),
            drain_timeout: Duration::from_secs(5),
            http2_engine: engine,
            ..ProxyConfig::default()
        },
        json,
    )
    .await
}

pub async fn start_with(config: ProxyConfig, json: &serde_json::Value) -> Running {
    let (r, _, _) = spawn(config);
    r.set(json).await;
    r
}

/// Starts a proxy without a config yet: the handle, its TLS state, and the config channel
/// the proxy reads (for the identity task of mutual TLS tests).
pub fn spawn(config: ProxyConfig) -> (Running, Arc<MeshTls>, watch::Receiver<Option<Snapshot>>) {
    let registry = prometheus::Registry::new();
    let proxy = Proxy::new(config, &registry).unwrap();
    let tls = proxy.tls();
    let (tx, rx) = watch::channel(None);
    let applied = proxy.applied();
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    let configs = rx.clone();
    let task = tokio::spawn(async move { proxy.run(rx, s).await });
    let r = Running {
        config: tx,
        applied,
        shutdown,
        task,
        registry,
    };
    (r, tls, configs)
}

/// Reads from `s` until the peer closes the connection (or it fails); whether that
/// happened within [`WAIT`].
pub async fn closed_in_time(s: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// A sidecar config with one outbound service.
pub fn outbound_config(
    version: u64,
    address: Ipv4Addr,
    port: u16,
    protocol: &str,
    endpoints: &[SocketAddr],
    extra: serde_json::Value,
) -> serde_json::Value {
    let eps: Vec<_> = endpoints
        .iter()
        .map(|e| serde_json::json!({"address": e.ip().to_string(), "port": e.port()}))
        .collect();
    let mut svc = serde_json::json!({
        "name": "cart", "namespace": "shop", "address": address.to_string(),
        "ports": [{"port": port, "protocol": protocol, "endpoints": eps}],
    });
    if let (Some(s), Some(x)) = (svc.as_object_mut(), extra.as_object()) {
        for (k, v) in x {
            s.insert(k.clone(), v.clone());
        }
    }
    serde_json::json!({
        "version": version,
        "identity": {"namespace": "shop", "service": "web", "plugin": "sidemesh-proxy"},
        "outbound": [svc],
    })
}

pub fn h1_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// GETs `url` with headers; returns (status, x-backend header, body).
pub async fn get(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        WAIT,
        client.request(b.body(Full::new(Bytes::new())).unwrap()),
    )
    .await
    .expect("response in time")
    .expect("response");
    let status = resp.status().as_u16();
    let backend = resp
        .headers()
        .get("x-backend")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    (status, backend, String::from_utf8_lossy(&body).into_owned())
}

/// Polls `f` every 20 ms until it is true, for at most `WAIT`.
pub async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A raw TCP server on `ip` that runs `f` on every accepted connection.
pub async fn raw_server<F, Fut>(ip: Ipv4Addr, f: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(f(s));
        }
    });
    addr
}

/// Sends `n` GETs to `url` and counts the answering backends.
pub async fn tally(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    n: usize,
) -> std::collections::HashMap<String, usize> {
    let mut seen = std::collections::HashMap::new();
    for _ in 0..n {
        *seen.entry(get(client, url, &[]).await.1).or_default() += 1;
    }
    seen
}
