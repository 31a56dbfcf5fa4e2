//! The data plane's derived state for one config version: every listener address with its
//! target (direction, protocol, routes, backends with their balancers, policies and pooled
//! clients). Built once per version off the hot path and swapped in whole behind one
//! `ArcSwap`; requests read it once. What must outlive a version (endpoint latency and
//! ejections, breaker counters, the retry budget, connection pools) lives in a [`Cache`]
//! keyed by service, port and endpoint, and is carried over while the key still exists.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use sidemesh_api::Snapshot;
use sidemesh_api::config::{
    BalancePolicy, HashOn, HeaderRewrite, HealthCheck, Limits, OutlierDetection, Protocol,
    RetryPolicy, Timeouts,
};
use sidemesh_api::snapshot::RouteMatcher;

use crate::balance::{Balancer, Endpoint, EndpointStats};
use crate::resilience::RetryBudget;
use crate::tls::{MeshTls, TlsPeer};
use crate::upstream::{Clients, ConnectorConfig};

/// Which way traffic flows through a listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Into the workload: `<inbound addr>:<port_outer>` to `127.0.0.1:<port>`.
    Inbound,
    /// Out of the workload: `<service address>:<port>` to the service's endpoints.
    Outbound,
}

impl Direction {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// What outlives a config version, keyed by what it belongs to.
#[derive(Debug, Default)]
pub struct Cache {
    endpoints: HashMap<(String, u16, SocketAddr), Arc<EndpointStats>>,
    services: HashMap<String, Arc<ServiceShared>>,
    /// The sidecar's mutual TLS state, which outbound connectors dial meshed endpoints with.
    tls: Option<Arc<MeshTls>>,
}

impl Cache {
    /// An empty cache whose outbound connectors use `tls` for meshed endpoints.
    pub fn with_tls(tls: Arc<MeshTls>) -> Cache {
        Cache {
            tls: Some(tls),
            ..Cache::default()
        }
    }
}

/// Per-service state shared across versions.
#[derive(Debug, Default)]
pub struct ServiceShared {
    /// Requests in flight (the `max_requests` breaker).
    pub active: AtomicU64,
    /// The retry budget.
    pub budget: RetryBudget,
    clients: std::sync::Mutex<Option<(ConnectorConfig, Clients)>>,
}

impl ServiceShared {
    /// The clients for `config`, reusing the pools when the config did not change.
    fn clients(&self, config: ConnectorConfig) -> Clients {
        let Ok(mut slot) = self.clients.lock() else {
            return Clients::new(config);
        };
        match &*slot {
            Some((c, clients)) if *c == config => clients.clone(),
            _ => {
                let clients = Clients::new(config.clone());
                *slot = Some((config, clients.clone()));
                clients
            }
        }
    }
}

/// A service's policies for one version.
#[derive(Debug)]
pub struct Service {
    /// The metrics label: `namespace/name`, or `inbound` for the workload's own ports.
    pub label: Arc<str>,
    /// `namespace/name`; for inbound ports the workload's own service (access logs).
    pub name: Arc<str>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// The retry policy (routes may override it).
    pub retry: RetryPolicy,
    /// Circuit-breaker limits.
    pub limits: Limits,
    /// Passive outlier detection.
    pub outlier: Option<OutlierDetection>,
    /// What consistent hashing hashes on.
    pub hash_on: Option<HashOn>,
    /// Active health checking.
    pub health_check: Option<HealthCheck>,
    /// State shared across versions.
    pub shared: Arc<ServiceShared>,
    /// The pooled clients.
    pub clients: Clients,
}

/// A set of endpoints with a balancer: a service port, or a label subset of it.
#[derive(Debug)]
pub struct Backend {
    /// The service the endpoints belong to.
    pub service: Arc<Service>,
    /// The balancer over the endpoints.
    pub balancer: Balancer,
    /// The protocol upstream.
    pub protocol: Protocol,
}

/// A compiled header rewrite.
#[derive(Clone, Debug, Default)]
pub struct Rewrite {
    /// Headers to set.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Headers to remove.
    pub remove: Vec<HeaderName>,
}

impl Rewrite {
    fn new(r: &HeaderRewrite) -> Rewrite {
        Rewrite {
            set: r
                .set
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        HeaderName::from_bytes(k.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect(),
            remove: r
                .remove
                .iter()
                .filter_map(|k| HeaderName::from_bytes(k.as_bytes()).ok())
                .collect(),
        }
    }

    /// Applies the rewrite to headers.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
    }

    fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

/// One route of a listener.
#[derive(Debug)]
pub struct RouteState {
    /// The route name (a metrics label).
    pub name: Arc<str>,
    /// Its conditions.
    pub matcher: RouteMatcher,
    /// Weighted backends (weight, backend); weights sum to `total_weight`.
    pub backends: Vec<(u32, Arc<Backend>)>,
    /// Sum of the backend weights.
    pub total_weight: u32,
    /// Request timeout override.
    pub timeout: Option<Duration>,
    /// Retry policy override.
    pub retry: Option<RetryPolicy>,
    /// Request header changes.
    pub request_headers: Option<Rewrite>,
    /// Response header changes.
    pub response_headers: Option<Rewrite>,
    /// Faults to inject.
    pub fault: Option<FaultState>,
}

/// A route's fault injection ([`sidemesh_api::config::Fault`]), shares in requests per
/// million.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultState {
    /// The delay, and the share of requests it holds.
    pub delay: Option<(Duration, u32)>,
    /// The status, and the share of requests answered with it.
    pub abort: Option<(http::StatusCode, u32)>,
}

impl FaultState {
    fn new(f: &sidemesh_api::config::Fault) -> Option<FaultState> {
        // A validated percentage (0..=100) in requests per million.
        let share = |percent: f64| (percent * 10_000.0).round() as u32;
        let state = FaultState {
            delay: f
                .delay
                .as_ref()
                .map(|d| (Duration::from_millis(d.ms), share(d.percent)))
                .filter(|(_, s)| *s > 0),
            abort: f
                .abort
                .as_ref()
                .and_then(|a| Some((http::StatusCode::from_u16(a.status).ok()?, share(a.percent))))
                .filter(|(_, s)| *s > 0),
        };
        (state.delay.is_some() || state.abort.is_some()).then_some(state)
    }

    /// Draws one request's faults: the delay to wait first, the status to answer with.
    pub fn draw(&self) -> (Option<Duration>, Option<http::StatusCode>) {
        fn hit(share: u32) -> bool {
            use rand::Rng;
            share >= 1_000_000 || rand::rng().random_range(0..1_000_000) < share
        }
        (
            self.delay.filter(|(_, s)| hit(*s)).map(|(d, _)| d),
            self.abort.filter(|(_, s)| hit(*s)).map(|(c, _)| c),
        )
    }
}

/// What a listener serves.
#[derive(Debug)]
pub struct Target {
    /// Inbound or outbound.
    pub direction: Direction,
    /// The protocol clients speak to the listener.
    pub protocol: Protocol,
    /// The service (its policies and pools).
    pub service: Arc<Service>,
    /// Routes, tried in order.
    pub routes: Vec<RouteState>,
    /// Where requests go when no route matches (and for raw TCP).
    pub default_backend: Arc<Backend>,
    /// Request metrics per route, and for unrouted requests last; resolved on first use.
    pub request_metrics: Vec<std::sync::OnceLock<crate::metrics::RequestMetrics>>,
    /// The accepted-connections counter of this listener; resolved on first use.
    pub connection_metrics: std::sync::OnceLock<prometheus::IntCounter>,
}

fn metric_slots(routes: usize) -> Vec<std::sync::OnceLock<crate::metrics::RequestMetrics>> {
    (0..=routes).map(|_| std::sync::OnceLock::new()).collect()
}

/// The derived state of one config version.
#[derive(Debug)]
pub struct State {
    /// The snapshot it was built from.
    pub snapshot: Snapshot,
    /// Every listener address with its target.
    pub listeners: HashMap<SocketAddr, Arc<Target>>,
    /// Which build this is, unique in the process: a connection accepted under this state
    /// knows its listener's target without looking it up again.
    pub generation: u64,
}

/// The generation of the next state built.
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn ms(v: u64) -> Option<Duration> {
    (v > 0).then(|| Duration::from_millis(v))
}

fn connector_config(t: &Timeouts, l: &Limits) -> ConnectorConfig {
    ConnectorConfig {
        connect_timeout: ms(t.connect_ms),
        max_connections: l.max_connections,
        max_pending: l.max_pending_requests,
        idle_timeout: ms(t.idle_ms),
        tls: None,
    }
}

impl State {
    /// Derives the state of `snapshot`. Inbound listeners bind on `inbound_address` and
    /// forward to `app_address` (normally 127.0.0.1). Entries of `cache` that the new
    /// version no longer has are dropped.
    pub fn build(
        snapshot: &Snapshot,
        inbound_address: IpAddr,
        app_address: IpAddr,
        cache: &mut Cache,
    ) -> State {
        let mut next = Cache {
            tls: cache.tls.clone(),
            ..Cache::default()
        };
        let own_zone = snapshot.identity().zone.clone();
        let own_name: Arc<str> = Arc::from(format!(
            "{}/{}",
            snapshot.identity().namespace,
            snapshot.identity().service
        ));
        let mut listeners = HashMap::new();

        for p in snapshot.inbound() {
            let key = format!("inbound:{}", p.port);
            let shared = cache.services.remove(&key).unwrap_or_default();
            next.services.insert(key.clone(), shared.clone());
            let clients = shared.clients(connector_config(&p.timeouts, &p.limits));
            let service = Arc::new(Service {
                label: Arc::from("inbound"),
                name: own_name.clone(),
                timeouts: p.timeouts.clone(),
                // The app is local: a retry cannot reach another instance.
                retry: RetryPolicy {
                    attempts: 0,
                    ..RetryPolicy::default()
                },
                limits: p.limits.clone(),
                outlier: None,
                hash_on: None,
                health_check: None,
                shared,
                clients,
            });
            let app = SocketAddr::new(app_address, p.port.get());
            let stats = endpoint_stats(cache, &mut next, &key, p.port.get(), app);
            let balancer = Balancer::new(
                BalancePolicy::RoundRobin,
                vec![Arc::new(Endpoint {
                    addr: app,
                    authority: crate::balance::authority_of(app),
                    weight: 100,
                    local: true,
                    meshed: false,
                    stats,
                })],
                false,
                0,
            );
            let backend = Arc::new(Backend {
                service: service.clone(),
                balancer,
                protocol: p.protocol,
            });
            listeners.insert(
                SocketAddr::new(inbound_address, p.port_outer.get()),
                Arc::new(Target {
                    direction: Direction::Inbound,
                    protocol: p.protocol,
                    service,
                    routes: Vec::new(),
                    default_backend: backend,
                    request_metrics: metric_slots(0),
                    connection_metrics: Default::default(),
                }),
            );
        }

        // Services first, so that routes can point at other services' backends.
        let mut services = Vec::with_capacity(snapshot.outbound().len());
        let trust_bundle: Arc<str> = snapshot
            .config()
            .tls
            .as_ref()
            .map_or("", |t| t.trust_bundle_pem.as_str())
            .into();
        for s in snapshot.outbound() {
            let key = format!("{}/{}", s.namespace, s.name);
            let shared = cache.services.remove(&key).unwrap_or_default();
            next.services.insert(key.clone(), shared.clone());
            // Meshed endpoints of the service must prove to be it (mutual TLS).
            let tls = cache.tls.clone().map(|mesh| TlsPeer {
                mesh,
                namespace: Arc::from(s.namespace.as_str()),
                service: Arc::from(s.name.as_str()),
                trust_bundle: trust_bundle.clone(),
            });
            let clients = shared.clients(ConnectorConfig {
                tls,
                ..connector_config(&s.timeouts, &s.limits)
            });
            let label: Arc<str> = Arc::from(key.as_str());
            services.push(Arc::new(Service {
                name: label.clone(),
                label,
                timeouts: s.timeouts.clone(),
                retry: s.retry.clone(),
                limits: s.limits.clone(),
                outlier: s.outlier_detection.clone(),
                hash_on: s.balancer.hash_on.clone(),
                health_check: s.health_check.clone(),
                shared,
                clients,
            }));
        }

        let backend_of = |svc_index: usize,
                          port: u16,
                          subset: &std::collections::BTreeMap<String, String>,
                          cache: &mut Cache,
                          next: &mut Cache|
         -> Option<Arc<Backend>> {
            let s = snapshot.outbound().get(svc_index)?;
            let service = services.get(svc_index)?.clone();
            // A backend in another service uses that service's port of the same number,
            // else its first port.
            let p = s
                .ports
                .iter()
                .find(|p| p.port.get() == port)
                .or_else(|| s.ports.first())?;
            let endpoints = p
                .endpoints
                .iter()
                .filter(|e| subset.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
                .map(|e| {
                    let addr = SocketAddr::new(e.address, e.port);
                    Arc::new(Endpoint {
                        addr,
                        authority: crate::balance::authority_of(addr),
                        weight: e.weight.max(1),
                        local: own_zone.is_some() && e.zone == own_zone,
                        meshed: e.meshed,
                        stats: endpoint_stats(cache, next, &service.label, p.port.get(), addr),
                    })
                })
                .collect();
            Some(Arc::new(Backend {
                service,
                balancer: Balancer::new(
                    s.balancer.policy,
                    endpoints,
                    s.balancer.zone_aware,
                    s.balancer.zone_min_healthy_percent,
                )
                .with_spill(s.balancer.spill_min_inflight(), s.balancer.spill_ratio()),
                protocol: p.protocol,
            }))
        };

        let no_subset = std::collections::BTreeMap::new();
        for (i, s) in snapshot.outbound().iter().enumerate() {
            let matchers = snapshot.route_matchers(i);
            for p in &s.ports {
                let port = p.port.get();
                let Some(default_backend) = backend_of(i, port, &no_subset, cache, &mut next)
                else {
                    continue;
                };
                let mut routes = Vec::new();
                for (r, matcher) in s.routes.iter().zip(matchers) {
                    let mut backends = Vec::new();
                    for b in &r.backends {
                        let target = match &b.service {
                            None => Some(i),
                            Some(key) => key
                                .split_once('/')
                                .and_then(|(ns, name)| snapshot.outbound_by_name(ns, name))
                                .map(|(j, _)| j),
                        };
                        if let Some(j) = target {
                            if let Some(be) = backend_of(j, port, &b.subset, cache, &mut next) {
                                backends.push((b.weight, be));
                            }
                        }
                    }
                    if backends.is_empty() {
                        backends.push((1, default_backend.clone()));
                    }
                    let total_weight = backends.iter().map(|(w, _)| *w).sum();
                    let request_headers = Rewrite::new(&r.request_headers);
                    let response_headers = Rewrite::new(&r.response_headers);
                    routes.push(RouteState {
                        name: Arc::from(r.name.as_str()),
                        matcher: matcher.clone(),
                        backends,
                        total_weight,
                        timeout: r.timeout_ms.map(Duration::from_millis),
                        retry: r.retry.clone(),
                        request_headers: (!request_headers.is_empty()).then_some(request_headers),
                        response_headers: (!response_headers.is_empty())
                            .then_some(response_headers),
                        fault: r.fault.as_ref().and_then(FaultState::new),
                    });
                }
                listeners.insert(
                    SocketAddr::new(IpAddr::V4(s.address), port),
                    Arc::new(Target {
                        direction: Direction::Outbound,
                        protocol: p.protocol,
                        service: default_backend.service.clone(),
                        request_metrics: metric_slots(routes.len()),
                        connection_metrics: Default::default(),
                        routes,
                        default_backend,
                    }),
                );
            }
        }
        *cache = next;
        State {
            snapshot: snapshot.clone(),
            listeners,
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }
}

fn endpoint_stats(
    cache: &mut Cache,
    next: &mut Cache,
    service: &str,
    port: u16,
    addr: SocketAddr,
) -> Arc<EndpointStats> {
    let key = (service.to_owned(), port, addr);
    if let Some(s) = next.endpoints.get(&key) {
        return s.clone();
    }
    let s = cache.endpoints.remove(&key).unwrap_or_default();
    next.endpoints.insert(key, s.clone());
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// A config with one inbound port and one outbound service, for tests here and in
    /// other modules.
    pub(crate) fn config_json(endpoints: &str) -> String {
        format!(
            r#"{{"version":1,"identity":{{"namespace":"shop","service":"web","plugin":"sidemesh-proxy","zone":"a"}},
            "inbound":[{{"port":8080,"port_outer":28080,"protocol":"http1"}}],
            "outbound":[{{"name":"cart","namespace":"shop","address":"127.1.0.7","ports":[{{"port":80,"protocol":"http1","endpoints":{endpoints}}}],
              "routes":[{{"name":"v2","match":{{"headers":[{{"name":"x-v","exact":"2"}}]}},"backends":[{{"subset":{{"version":"v2"}},"weight":1}}]}}]}}]}}"#
        )
    }

    fn localhost() -> IpAddr {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    }

    #[test]
    fn builds_listeners_and_keeps_stats_across_versions() {
        let eps = r#"[{"address":"10.0.0.1","port":28080,"zone":"a","labels":{"version":"v1"}},
                      {"address":"10.0.0.2","port":28080,"zone":"b","labels":{"version":"v2"}}]"#;
        let snap = Snapshot::from_json(config_json(eps).as_bytes()).unwrap();
        let mut cache = Cache::default();
        let inbound_ip: IpAddr = "127.0.0.9".parse().unwrap();
        let s1 = State::build(&snap, inbound_ip, localhost(), &mut cache);
        assert_eq!(s1.listeners.len(), 2);
        let inbound = &s1.listeners[&"127.0.0.9:28080".parse().unwrap()];
        assert_eq!(inbound.direction, Direction::Inbound);
        assert_eq!(
            inbound.default_backend.balancer.endpoints()[0].addr,
            "127.0.0.1:8080".parse().unwrap()
        );
        let out = &s1.listeners[&"127.1.0.7:80".parse().unwrap()];
        assert_eq!(out.default_backend.balancer.endpoints().len(), 2);
        assert!(out.default_backend.balancer.endpoints()[0].local);
        assert!(!out.default_backend.balancer.endpoints()[1].local);
        assert_eq!(out.routes.len(), 1);
        let v2 = &out.routes[0].backends[0].1;
        assert_eq!(v2.balancer.endpoints().len(), 1);
        assert_eq!(
            v2.balancer.endpoints()[0].addr,
            "10.0.0.2:28080".parse().unwrap()
        );
        // The same endpoint shares its stats between backends and across versions.
        let a = &out.default_backend.balancer.endpoints()[1].stats;
        assert!(Arc::ptr_eq(a, &v2.balancer.endpoints()[0].stats));
        let s2 = State::build(&snap, inbound_ip, localhost(), &mut cache);
        let out2 = &s2.listeners[&"127.1.0.7:80".parse().unwrap()];
        assert!(Arc::ptr_eq(
            a,
            &out2.default_backend.balancer.endpoints()[1].stats
        ));
        // Pools are reused when the limits did not change.
        assert!(Arc::ptr_eq(&out.service.shared, &out2.service.shared));
    }
}
