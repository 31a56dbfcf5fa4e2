//! The discover service: the [`Store`] behind a lock, long-poll wake-ups per sidecar,
//! persistence to the data directory, and the HTTP API (hyper 1, HTTP/1.1) as a thin
//! shell over them. Other parts host it in-process through [`Discover`]: the controller
//! feeds it from Kubernetes with [`Discover::set_state`] once, then per-service deltas with
//! [`Discover::apply`]; `sidemesh discover` feeds it from the
//! state file.
//!
//! Long polls: every sidecar that has waiting pollers has a `watch` channel carrying its
//! current version. A rebuild sends the new version only to the channels of sidecars whose
//! config bytes changed, so all pollers of those sidecars wake at once and nobody else does.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use sidemesh_api::name::check_label;
use sidemesh_api::state::ClusterState;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};

use crate::metrics::Metrics;
use crate::registry::{InstanceKey, PutOutcome, Registration, check_key};
use crate::render::SidecarKey;
use crate::store::{Changes, Persisted, ServiceDelta, Store};

/// Server limits and the data directory.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where the registry, the address table and config versions are kept; `None` keeps
    /// them in memory only (versions then still increase across restarts: they are
    /// based on the clock).
    pub data_dir: Option<PathBuf>,
    /// The longest `?wait=` honoured; longer waits are cut to this.
    pub max_wait: Duration,
    /// Connections served at once; more wait in the accept queue.
    pub max_connections: usize,
    /// The largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Time a client has to send its request headers.
    pub header_read_timeout: Duration,
    /// How often registrations are checked for expiry.
    pub expiry_interval: Duration,
    /// The identity authority: when set, every served config carries TLS settings and
    /// sidecars get certificates from it. `None` serves configs without TLS.
    pub authority: Option<Arc<crate::identity::Authority>>,
    /// The token check: when set, a workload's config, resources and certificate need a
    /// bearer token that covers it. `None` serves them to anyone who can connect.
    pub auth: Option<Arc<crate::auth::Auth>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            data_dir: None,
            max_wait: Duration::from_secs(300),
            max_connections: 20_000,
            max_body_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            expiry_interval: Duration::from_millis(200),
            authority: None,
            auth: None,
        }
    }
}

/// The largest header section accepted, in bytes.
const MAX_HEADER_BYTES: usize = 16 * 1024;
const REGISTRY_FILE: &str = "registry.json";
const STORE_FILE: &str = "store.json";

/// A discover service. Cheap to clone; every clone is the same service.
#[derive(Clone)]
pub struct Discover {
    shared: Arc<Shared>,
}

struct Shared {
    store: Mutex<Store>,
    watchers: Mutex<HashMap<SidecarKey, watch::Sender<u64>>>,
    metrics: Metrics,
    prometheus: prometheus::Registry,
    opts: Options,
    ready: AtomicBool,
    save: Notify,
    background: AtomicBool,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// The service-account token check, once [`Discover::review_tokens`] set it.
    review: arc_swap::ArcSwapOption<crate::review::Review>,
}

impl std::fmt::Debug for Discover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discover")
            .field("opts", &self.shared.opts)
            .finish_non_exhaustive()
    }
}

/// A running HTTP server.
#[derive(Debug)]
pub struct Serving {
    /// The bound address.
    pub addr: SocketAddr,
    /// The accept loop; abort it to stop serving.
    pub task: tokio::task::JoinHandle<()>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Discover {
    /// Creates the service, restoring the registry, addresses and versions from
    /// `opts.data_dir` (creating it if needed), and registers its metrics on `registry`.
    pub fn new(opts: Options, registry: &prometheus::Registry) -> anyhow::Result<Discover> {
        let mut saved = Persisted::default();
        if let Some(dir) = &opts.data_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("cannot create data dir {}: {e}", dir.display()))?;
            if let Some(p) = read_json::<Persisted>(&dir.join(STORE_FILE))? {
                saved = p;
            }
            if let Some(p) = read_json::<Persisted>(&dir.join(REGISTRY_FILE))? {
                saved.registry = p.registry;
            }
        }
        let mut store = Store::new(saved, now_ms());
        if let Some(a) = &opts.authority {
            // Before the first build: nothing is re-rendered, the hashes just include it.
            store.set_tls_salt(a.salt(), now_ms());
        }
        let metrics = Metrics::new(registry)?;
        metrics.registry_instances.set(store.registry_len() as i64);
        Ok(Discover {
            shared: Arc::new(Shared {
                store: Mutex::new(store),
                watchers: Mutex::new(HashMap::new()),
                metrics,
                prometheus: registry.clone(),
                opts,
                ready: AtomicBool::new(false),
                save: Notify::new(),
                background: AtomicBool::new(false),
                tasks: Mutex::new(Vec::new()),
                review: arc_swap::ArcSwapOption::empty(),
            }),
        })
    }

    /// From now on, a workload's config, resources and certificate need a Kubernetes
    /// service-account token of its namespace (see [`crate::review`]), or a token the
    /// token file lists when there is one.
    pub fn review_tokens(&self, review: Arc<crate::review::Review>) {
        self.shared.review.store(Some(review));
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Replaces the state of source `source` (e.g. `file`, `kubernetes`), re-renders, and
    /// wakes the pollers of every sidecar whose config changed. Marks the service ready.
    pub fn set_state(&self, source: &str, state: impl Into<Arc<ClusterState>>) {
        let state = state.into();
        self.mutate(|s, now| s.set_source(source, state, now));
        self.set_ready();
    }

    /// Applies a per-service change to source `source` (see [`Store::apply_delta`]):
    /// re-renders only the sidecars the changed services can affect and wakes only their
    /// pollers. Marks the service ready.
    pub fn apply(&self, source: &str, delta: ServiceDelta) {
        if !delta.is_empty() {
            self.mutate(|s, now| s.apply_delta(source, delta, now));
        }
        self.set_ready();
    }

    /// Removes source `source`.
    pub fn remove_state(&self, source: &str) {
        self.mutate(|s, now| s.remove_source(source, now));
    }

    /// Marks the service ready (`/readyz` 200, sidecar configs served). [`Discover::set_state`]
    /// does it; call it directly to serve the registry alone.
    pub fn set_ready(&self) {
        if !self.shared.ready.swap(true, Ordering::SeqCst) {
            // First readiness: make sure the registry alone is rendered.
            self.mutate(|s, now| s.rebuild(now));
        }
    }

    /// Whether the service is ready.
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::SeqCst)
    }

    /// The current config JSON and version of a sidecar.
    pub fn sidecar(&self, key: &SidecarKey) -> Option<Arc<crate::store::Sidecar>> {
        lock(&self.shared.store).sidecar(key)
    }

    fn mutate(&self, f: impl FnOnce(&mut Store, u64) -> Changes) {
        let started = Instant::now();
        let mut store = lock(&self.shared.store);
        let changes = f(&mut store, now_ms());
        self.after_change(&store, changes, started);
    }

    fn after_change(&self, store: &Store, changes: Changes, started: Instant) {
        let m = &self.shared.metrics;
        m.rebuild_seconds.observe(started.elapsed().as_secs_f64());
        m.configs_rendered.inc_by(changes.changed.len() as u64);
        m.sidecars.set(store.sidecar_count() as i64);
        m.registry_instances.set(store.registry_len() as i64);
        for (service, errors) in &changes.dropped {
            for e in errors {
                tracing::warn!(service = %service, problem = %e, "left out of the service's config");
            }
        }
        if !changes.changed.is_empty() || !changes.removed.is_empty() {
            let watchers = lock(&self.shared.watchers);
            for key in &changes.changed {
                if let (Some(tx), Some(s)) = (watchers.get(key), store.sidecar(key)) {
                    tx.send_replace(s.version);
                }
            }
            for key in &changes.removed {
                if let Some(tx) = watchers.get(key) {
                    tx.send_replace(0);
                }
            }
            self.shared.save.notify_one();
        }
    }

    /// Binds nothing: serves on `listener` until the returned task is aborted. Also starts
    /// (once) the registry expiry and the data-directory saver.
    pub fn serve(&self, listener: TcpListener) -> std::io::Result<Serving> {
        let addr = listener.local_addr()?;
        self.start_background();
        let d = self.clone();
        let permits = Arc::new(Semaphore::new(self.shared.opts.max_connections.max(1)));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (stream, peer) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let d = d.clone();
                let header_timeout = d.shared.opts.header_read_timeout;
                tokio::spawn(async move {
                    let _permit = permit;
                    let service = hyper::service::service_fn(move |req| {
                        let d = d.clone();
                        async move { Ok::<_, Infallible>(d.handle(req).await) }
                    });
                    let mut builder = hyper::server::conn::http1::Builder::new();
                    builder
                        .timer(TokioTimer::new())
                        .header_read_timeout(header_timeout)
                        .max_buf_size(MAX_HEADER_BYTES.max(8192))
                        .max_headers(64);
                    if let Err(e) = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                    }
                });
            }
        });
        Ok(Serving { addr, task })
    }

    fn start_background(&self) {
        if self.shared.background.swap(true, Ordering::SeqCst) {
            return;
        }
        // Registry expiry: an instance that misses its TTL leaves within one interval.
        let d = self.clone();
        let expiry = tokio::spawn(async move {
            let mut tick = tokio::time::interval(d.shared.opts.expiry_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Some(registry) = d.expire_now() {
                    d.save_registry(registry).await;
                }
            }
        });
        lock(&self.shared.tasks).push(expiry.abort_handle());
        // The token file: watched, valid edits apply.
        if let Some(auth) = &self.shared.opts.auth {
            lock(&self.shared.tasks).push(auth.watch().abort_handle());
        }
        // The extra trust file of CA rotation: watched, and a change re-versions every config.
        if let Some(file) = self
            .shared
            .opts
            .authority
            .as_ref()
            .and_then(|a| a.extra_trust_file())
        {
            let watcher = crate::auth::watch_file(file.to_owned(), {
                let d = self.clone();
                move || d.reload_extra_trust()
            });
            lock(&self.shared.tasks).push(watcher.abort_handle());
        }
        // The signing CA's files: watched, and a valid new CA signs from then on.
        if let Some((cert, key)) = self
            .shared
            .opts
            .authority
            .as_ref()
            .and_then(|a| a.ca_files())
        {
            for file in [cert, key] {
                let watcher = crate::auth::watch_file(file.to_owned(), {
                    let d = self.clone();
                    move || d.reload_ca()
                });
                lock(&self.shared.tasks).push(watcher.abort_handle());
            }
        }
        // Versions and addresses: saved after changes, coalesced.
        if let Some(dir) = self.shared.opts.data_dir.clone() {
            let d = self.clone();
            let saver = tokio::spawn(async move {
                loop {
                    d.shared.save.notified().await;
                    let mut p = lock(&d.shared.store).persisted();
                    p.registry = Default::default();
                    let path = dir.join(STORE_FILE);
                    let r = tokio::task::spawn_blocking(move || write_json(&path, &p)).await;
                    if let Ok(Err(e)) = r {
                        tracing::error!(error = %e, "cannot save discover state");
                    }
                    // At most a few saves a second, however many changes.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
            lock(&self.shared.tasks).push(saver.abort_handle());
        }
    }

    /// Reads the extra trust file of the identity authority again; when the trust bundle
    /// changed, every config gets a new version (its pollers are woken). A bad file keeps
    /// the last good bundle and is logged as an error.
    pub fn reload_extra_trust(&self) {
        self.reload_tls(
            "extra trusted CAs",
            &self.shared.metrics.trust_reloads,
            crate::identity::Authority::reload_extra_trust,
        );
    }

    /// Reads the signing CA's files again; when they hold a new valid CA, it signs every
    /// certificate from now on and every config gets a new version with it in the trust
    /// bundle (its pollers are woken). A bad or half-written pair keeps the last good CA
    /// and is logged as an error (a rotation that writes the certificate and then the key
    /// passes through such a state and completes with the second write).
    pub fn reload_ca(&self) {
        self.reload_tls(
            "signing CA",
            &self.shared.metrics.ca_reloads,
            crate::identity::Authority::reload_ca,
        );
    }

    /// One reload of the authority's files (`what`): a change re-versions every config, an
    /// error keeps what was loaded; both are counted in `counter` and logged.
    fn reload_tls(
        &self,
        what: &'static str,
        counter: &prometheus::IntCounterVec,
        reload: fn(&crate::identity::Authority) -> Result<bool, String>,
    ) {
        let Some(authority) = self.shared.opts.authority.clone() else {
            return;
        };
        match reload(&authority) {
            Ok(false) => {}
            Ok(true) => {
                counter.with_label_values(&["ok"]).inc();
                tracing::info!(what, "reloaded; every config gets the new trust bundle");
                self.mutate(|s, now| s.set_tls_salt(authority.salt(), now));
            }
            Err(e) => {
                counter.with_label_values(&["failed"]).inc();
                tracing::error!(what, error = %e, "rejected; the last good one stays in force");
            }
        }
    }

    /// Stops the background tasks (registry expiry, saving) and saves everything now. The
    /// caller aborts its [`Serving`] tasks.
    pub fn stop(&self) {
        for t in lock(&self.shared.tasks).drain(..) {
            t.abort();
        }
        self.save_now();
    }

    /// Saves versions, addresses and the registry to the data directory now (at shutdown).
    pub fn save_now(&self) {
        let Some(dir) = &self.shared.opts.data_dir else {
            return;
        };
        let mut p = lock(&self.shared.store).persisted();
        let registry = Persisted {
            registry: std::mem::take(&mut p.registry),
            ..Persisted::default()
        };
        for (file, value) in [(STORE_FILE, &p), (REGISTRY_FILE, &registry)] {
            if let Err(e) = write_json(&dir.join(file), value) {
                tracing::error!(file, error = %e, "cannot save discover state");
            }
        }
    }

    /// Expires registrations; returns the registry to save when some expired.
    fn expire_now(&self) -> Option<crate::registry::Saved> {
        let started = Instant::now();
        let mut store = lock(&self.shared.store);
        let before = store.registry_len();
        let changes = store.expire(now_ms())?;
        let expired = before.saturating_sub(store.registry_len());
        self.shared.metrics.registry_expired.inc_by(expired as u64);
        tracing::info!(expired, "registry: instances expired");
        self.after_change(&store, changes, started);
        Some(store.persisted().registry)
    }

    async fn save_registry(&self, registry: crate::registry::Saved) {
        let Some(dir) = self.shared.opts.data_dir.clone() else {
            return;
        };
        let p = Persisted {
            registry,
            ..Persisted::default()
        };
        let path = dir.join(REGISTRY_FILE);
        match tokio::task::spawn_blocking(move || write_json(&path, &p)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot save the registry"),
            Err(e) => tracing::error!(error = %e, "registry save task failed"),
        }
    }

    /// Answers one request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (route, resp) = self.route(req).await;
        self.shared
            .metrics
            .requests
            .with_label_values(&[route, resp.status().as_str()])
            .inc();
        resp
    }

    async fn route<B>(&self, req: Request<B>) -> (&'static str, Response<Full<Bytes>>)
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let get_only = |route: &'static str| (route, method_not_allowed("GET"));
        match segments.as_slice() {
            ["healthz"] if method == Method::GET => (
                "/healthz",
                json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
            ),
            ["healthz"] => get_only("/healthz"),
            ["readyz"] if method == Method::GET => ("/readyz", self.readyz()),
            ["readyz"] => get_only("/readyz"),
            ["metrics"] if method == Method::GET => ("/metrics", self.metrics_text()),
            ["metrics"] => get_only("/metrics"),
            ["v1", "services"] if method == Method::GET => ("/v1/services", self.services()),
            ["v1", "services"] => get_only("/v1/services"),
            ["v1", "sidecars", ns, svc, plugin, "certificate"] => {
                let route = "/v1/sidecars/{ns}/{svc}/{plugin}/certificate";
                if method != Method::POST {
                    return (route, method_not_allowed("POST"));
                }
                match sidecar_key(&[*ns, *svc, *plugin]) {
                    Ok(key) => match self.refused(&req, &key).await {
                        Some(r) => (route, r),
                        None => (route, self.post_certificate(req, key).await),
                    },
                    Err(e) => (route, e.into()),
                }
            }
            ["v1", "sidecars", rest @ ..] => {
                let route = "/v1/sidecars/{ns}/{svc}/{plugin}";
                if method != Method::GET {
                    return get_only(route);
                }
                match sidecar_key(rest) {
                    Ok(key) => match self.refused(&req, &key).await {
                        Some(r) => (route, r),
                        None => (route, self.get_sidecar(&req, key).await),
                    },
                    Err(e) => (route, e.into()),
                }
            }
            ["v1", "resources", rest @ ..] => {
                let route = "/v1/resources/{ns}/{svc}/{plugin}";
                if method != Method::GET {
                    return get_only(route);
                }
                match sidecar_key(rest) {
                    Ok(key) => match self.refused(&req, &key).await {
                        Some(r) => (route, r),
                        None => (route, self.get_resources(key)),
                    },
                    Err(e) => (route, e.into()),
                }
            }
            ["v1", "registry", rest @ ..] => {
                let route = "/v1/registry/{ns}/{svc}/{instance}";
                let key = match instance_key(rest) {
                    Ok(k) => k,
                    Err(e) => return (route, e.into()),
                };
                let resp = match method {
                    Method::PUT => self.registry_put(req, key).await,
                    Method::DELETE => self.registry_delete(key).await,
                    _ => method_not_allowed("PUT, DELETE"),
                };
                (route, resp)
            }
            _ => (
                "other",
                error(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no route {path}; routes: /v1/sidecars/{{ns}}/{{svc}}/{{plugin}}, \
                         /v1/resources/{{ns}}/{{svc}}/{{plugin}}, /v1/services, \
                         /v1/sidecars/{{ns}}/{{svc}}/{{plugin}}/certificate (POST), \
                         /v1/registry/{{ns}}/{{svc}}/{{instance}}, /healthz, /readyz, /metrics"
                    ),
                ),
            ),
        }
    }

    /// The token check of a workload's routes (see [`crate::auth`] and [`crate::review`]);
    /// `None` lets the request through. A token the file lists is judged by the file; any
    /// other, when service-account tokens are reviewed, by the cluster.
    async fn refused<B>(
        &self,
        req: &Request<B>,
        key: &SidecarKey,
    ) -> Option<Response<Full<Bytes>>> {
        let review = self.shared.review.load_full();
        if let Some(auth) = &self.shared.opts.auth {
            if review.is_none() || auth.lists(req.headers()) {
                return auth.check(req.headers(), key);
            }
        }
        review?.check(req.headers(), key).await
    }

    fn readyz(&self) -> Response<Full<Bytes>> {
        if self.is_ready() {
            json(StatusCode::OK, &serde_json::json!({"status": "ready"}))
        } else {
            not_ready()
        }
    }

    fn metrics_text(&self) -> Response<Full<Bytes>> {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        let enc = prometheus::TextEncoder::new();
        if let Err(e) = enc.encode(&self.shared.prometheus.gather(), &mut buf) {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode metrics: {e}"),
            );
        }
        let mut r = Response::new(Full::new(Bytes::from(buf)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        r
    }

    fn services(&self) -> Response<Full<Bytes>> {
        if !self.is_ready() {
            return not_ready();
        }
        let store = lock(&self.shared.store);
        json(
            StatusCode::OK,
            &serde_json::json!({ "services": store.services() }),
        )
    }

    async fn get_sidecar<B>(&self, req: &Request<B>, key: SidecarKey) -> Response<Full<Bytes>> {
        if !self.is_ready() {
            return not_ready();
        }
        let wait = match wait_param(req.uri().query(), self.shared.opts.max_wait) {
            Ok(w) => w,
            Err(e) => return e.into(),
        };
        let held = if_none_match(req);
        let gzip = accepts_gzip(req);
        // Subscribe before reading, so a change between the two is never missed.
        let mut sub = (wait > Duration::ZERO && held.is_some()).then(|| self.subscribe(&key));
        let Some(mut sidecar) = self.sidecar(&key) else {
            drop(sub);
            return self.missing(&key);
        };
        if let (Some(held_version), Some(sub)) = (held, sub.as_mut()) {
            if sidecar.version == held_version {
                let woke = tokio::time::timeout(wait, sub.changed_from(held_version)).await;
                if woke.is_ok() {
                    match self.sidecar(&key) {
                        Some(s) => sidecar = s,
                        None => return self.missing(&key),
                    }
                }
            }
        }
        drop(sub);
        let etag = format!("\"{}\"", sidecar.version);
        if held == Some(sidecar.version) {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            set_header(&mut r, header::ETAG, &etag);
            return r;
        }
        let body = match &self.shared.opts.authority {
            None if gzip => sidecar.gzip(),
            None => sidecar.json.clone(),
            Some(authority) => {
                // The TLS settings are the same for every version, so they are added as
                // the config is served rather than stored with it.
                let json = with_tls(&sidecar, &authority.settings(&key.plugin));
                if gzip { gzip_bytes(&json) } else { json }
            }
        };
        let mut r = Response::new(Full::new(body));
        set_header(&mut r, header::CONTENT_TYPE, "application/json");
        set_header(&mut r, header::ETAG, &etag);
        set_header(&mut r, header::VARY, "Accept-Encoding");
        set_header(&mut r, header::CACHE_CONTROL, "no-cache");
        if gzip {
            set_header(&mut r, header::CONTENT_ENCODING, "gzip");
        }
        r
    }

    /// Signs a sidecar's CSR for the identity of the config at the same path; see
    /// [`crate::identity`].
    async fn post_certificate<B>(&self, req: Request<B>, key: SidecarKey) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Some(authority) = self.shared.opts.authority.clone() else {
            return error(
                StatusCode::NOT_FOUND,
                "mutual TLS is disabled in this discover (no identity authority)".to_owned(),
            );
        };
        if !self.is_ready() {
            return not_ready();
        }
        // Only a workload that has a config here can get its identity.
        if self.sidecar(&key).is_none() {
            return self.missing(&key);
        }
        let body = match Limited::new(req.into_body(), crate::identity::MAX_CSR_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "a CSR is at most {} bytes of PEM",
                        crate::identity::MAX_CSR_BYTES
                    ),
                );
            }
        };
        let Ok(pem) = std::str::from_utf8(&body) else {
            return error(
                StatusCode::BAD_REQUEST,
                "the CSR must be PEM text".to_owned(),
            );
        };
        match authority.sign(&key.namespace, &key.service, pem, SystemTime::now()) {
            Ok(cert) => {
                let mut r = Response::new(Full::new(Bytes::from(cert)));
                set_header(&mut r, header::CONTENT_TYPE, "application/x-pem-file");
                set_header(&mut r, header::CACHE_CONTROL, "no-store");
                r
            }
            Err(e @ crate::identity::SignError::WrongIdentity { .. }) => {
                tracing::warn!(namespace = %key.namespace, service = %key.service, error = %e, "CSR refused");
                error(StatusCode::FORBIDDEN, e.to_string())
            }
            Err(e @ crate::identity::SignError::BadCsr(_)) => {
                error(StatusCode::BAD_REQUEST, e.to_string())
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot sign a CSR");
                error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }

    fn get_resources(&self, key: SidecarKey) -> Response<Full<Bytes>> {
        if !self.is_ready() {
            return not_ready();
        }
        match self.sidecar(&key) {
            Some(s) => {
                let mut r = json(StatusCode::OK, &crate::rainbond::resource_spec(&s.config));
                set_header(&mut r, header::ETAG, &format!("\"{}\"", s.version));
                r
            }
            None => self.missing(&key),
        }
    }

    fn missing(&self, key: &SidecarKey) -> Response<Full<Bytes>> {
        let e = lock(&self.shared.store).missing(key);
        error(StatusCode::NOT_FOUND, e.to_string())
    }

    fn subscribe(&self, key: &SidecarKey) -> Subscription {
        let mut watchers = lock(&self.shared.watchers);
        let rx = watchers
            .entry(key.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Subscription {
            discover: self.clone(),
            key: key.clone(),
            rx: Some(rx),
            waiting: false,
        }
    }

    fn unsubscribe(&self, key: &SidecarKey) {
        let mut watchers = lock(&self.shared.watchers);
        if watchers.get(key).is_some_and(|tx| tx.receiver_count() == 0) {
            watchers.remove(key);
        }
    }

    async fn registry_put<B>(&self, req: Request<B>, key: InstanceKey) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let max = self.shared.opts.max_body_bytes;
        let too_large = || {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body is larger than {max} bytes"),
            )
        };
        if let Some(len) = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if len > max as u64 {
                return too_large();
            }
        }
        let body = match Limited::new(req.into_body(), max).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return too_large();
            }
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {e}"),
                );
            }
        };
        let registration: Registration = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "body must be JSON like {{\"address\":\"10.0.0.5\",\"ports\":[{{\"port\":8080}}],\"ttl_seconds\":10}}: {e}"
                    ),
                );
            }
        };
        let ttl = registration.ttl_seconds;
        let (outcome, registry) = match self.put_now(key.clone(), registration) {
            Ok(x) => x,
            Err(resp) => return resp,
        };
        if outcome != PutOutcome::Renewed {
            tracing::info!(namespace = %key.0, service = %key.1, instance = %key.2, ?outcome, "registry: instance registered");
        }
        self.save_registry(registry).await;
        let status = if outcome == PutOutcome::Created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        let outcome = match outcome {
            PutOutcome::Created => "created",
            PutOutcome::Updated => "updated",
            PutOutcome::Renewed => "renewed",
        };
        json(
            status,
            &serde_json::json!({"result": outcome, "ttl_seconds": ttl}),
        )
    }

    #[allow(clippy::result_large_err)]
    fn put_now(
        &self,
        key: InstanceKey,
        registration: Registration,
    ) -> Result<(PutOutcome, crate::registry::Saved), Response<Full<Bytes>>> {
        let started = Instant::now();
        let mut store = lock(&self.shared.store);
        let (outcome, changes) =
            store
                .registry_put(key, registration, now_ms())
                .map_err(|errors| {
                    let message = errors
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ");
                    error(
                        StatusCode::BAD_REQUEST,
                        format!("invalid registration: {message}"),
                    )
                })?;
        self.after_change(&store, changes, started);
        Ok((outcome, store.persisted().registry))
    }

    fn delete_now(&self, key: &InstanceKey) -> Option<crate::registry::Saved> {
        let started = Instant::now();
        let mut store = lock(&self.shared.store);
        let changes = store.registry_delete(key, now_ms())?;
        self.after_change(&store, changes, started);
        Some(store.persisted().registry)
    }

    async fn registry_delete(&self, key: InstanceKey) -> Response<Full<Bytes>> {
        let Some(registry) = self.delete_now(&key) else {
            return error(
                StatusCode::NOT_FOUND,
                format!(
                    "instance {}/{}/{} is not registered (or has expired)",
                    key.0, key.1, key.2
                ),
            );
        };
        tracing::info!(namespace = %key.0, service = %key.1, instance = %key.2, "registry: instance left");
        self.save_registry(registry).await;
        json(StatusCode::OK, &serde_json::json!({"result": "deleted"}))
    }
}

fn sidecar_key(rest: &[&str]) -> Result<SidecarKey, ApiError> {
    let [ns, svc, plugin] = rest else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "expected /v1/sidecars/{{namespace}}/{{service}}/{{plugin}} (3 names without '/'), got {} segment(s)",
                rest.len()
            ),
        ));
    };
    for (what, v) in [("namespace", ns), ("service", svc), ("plugin", plugin)] {
        if let Err(e) = check_label(v) {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("{what} in path {e}"),
            ));
        }
    }
    Ok(SidecarKey {
        namespace: (*ns).to_owned(),
        service: (*svc).to_owned(),
        plugin: (*plugin).to_owned(),
    })
}

fn instance_key(rest: &[&str]) -> Result<InstanceKey, ApiError> {
    let [ns, svc, inst] = rest else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "expected /v1/registry/{{namespace}}/{{service}}/{{instance}} (3 names without '/'), got {} segment(s)",
                rest.len()
            ),
        ));
    };
    check_key(ns, svc, inst).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("{} in path {}", e.path, e.message),
        )
    })?;
    Ok(((*ns).to_owned(), (*svc).to_owned(), (*inst).to_owned()))
}

/// `?wait=SECONDS`: absent or 0 means answer now.
fn wait_param(query: Option<&str>, max: Duration) -> Result<Duration, ApiError> {
    let Some(q) = query else {
        return Ok(Duration::ZERO);
    };
    let mut wait = Duration::ZERO;
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "wait" {
            let secs: f64 = v
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                .ok_or_else(|| {
                    ApiError(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "wait must be a number of seconds (0..={}), got {v:?}",
                            max.as_secs()
                        ),
                    )
                })?;
            wait = Duration::from_secs_f64(secs.min(max.as_secs_f64()));
        }
    }
    Ok(wait)
}

/// The version in `If-None-Match` (`"123"`, `W/"123"` or `123`); `None` when absent or
/// not one of ours.
fn if_none_match<B>(req: &Request<B>) -> Option<u64> {
    let v = req.headers().get(header::IF_NONE_MATCH)?.to_str().ok()?;
    let v = v.trim();
    let v = v.strip_prefix("W/").unwrap_or(v);
    v.trim_matches('"').parse().ok()
}

fn accepts_gzip<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            // RFC 9110 section 12.5.3: q=0 means "not acceptable".
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            coding.eq_ignore_ascii_case("gzip") && !refused
        })
}

/// The served JSON with `tls` added as its last field: spliced in before the closing
/// brace (a copy, not a re-serialization), else the config serialized afresh.
fn with_tls(sidecar: &crate::store::Sidecar, tls: &sidemesh_api::config::TlsSettings) -> Bytes {
    let json = &sidecar.json;
    let tls_json = serde_json::to_vec(tls).unwrap_or_default();
    if sidecar.config.tls.is_none() && json.len() > 2 && json.ends_with(b"}") {
        let mut out = Vec::with_capacity(json.len() + tls_json.len() + 8);
        out.extend_from_slice(&json[..json.len() - 1]);
        out.extend_from_slice(b",\"tls\":");
        out.extend_from_slice(&tls_json);
        out.push(b'}');
        return Bytes::from(out);
    }
    let mut config = sidecar.config.clone();
    config.tls = Some(tls.clone());
    Bytes::from(serde_json::to_vec(&config).unwrap_or_default())
}

fn gzip_bytes(data: &[u8]) -> Bytes {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(data);
    Bytes::from(enc.finish().unwrap_or_default())
}

fn set_header(r: &mut Response<Full<Bytes>>, name: header::HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(name, v);
    }
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    set_header(&mut r, header::CONTENT_TYPE, "application/json");
    r
}

/// A long poller's wake-up channel. Dropping it (also when the client goes away mid-wait
/// and hyper drops the request) fixes the waiting gauge and frees the sidecar's channel
/// when it was the last poller.
struct Subscription {
    discover: Discover,
    key: SidecarKey,
    rx: Option<watch::Receiver<u64>>,
    waiting: bool,
}

impl Subscription {
    /// Waits until the sidecar's version is other than `held` (or its channel closes).
    async fn changed_from(&mut self, held: u64) {
        let Some(rx) = self.rx.as_mut() else { return };
        self.waiting = true;
        self.discover.shared.metrics.long_polls_waiting.inc();
        loop {
            if rx.changed().await.is_err() || *rx.borrow_and_update() != held {
                return;
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.waiting {
            self.discover.shared.metrics.long_polls_waiting.dec();
        }
        self.rx = None;
        self.discover.unsubscribe(&self.key);
    }
}

/// A request rejected before any work: a status and a message for the client.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl From<ApiError> for Response<Full<Bytes>> {
    fn from(e: ApiError) -> Self {
        error(e.0, e.1)
    }
}

/// A JSON error: `{"error": "..."}`.
fn error(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message }))
}

fn not_ready() -> Response<Full<Bytes>> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "discover is not ready: the cluster state has not been loaded yet; retry shortly"
            .to_owned(),
    )
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed here; use {allow}"),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                // A damaged file must not keep discover down: start without it, loudly.
                tracing::error!(file = %path.display(), error = %e, "ignoring unreadable data file");
                Ok(None)
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

/// Writes JSON atomically: a temp file in the same directory, fsync, then rename.
fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    use std::io::Write;
    let bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}
