//! The raw wire types of one sidecar's config, exactly as discover serves them as JSON.
//!
//! These are plain serde structs with `deny_unknown_fields`: a field this version does not
//! know is an error, not silently ignored. They are never used on the hot path; turn them
//! into a [`crate::Snapshot`] with [`crate::Snapshot::try_from`] (or
//! [`crate::Snapshot::from_json`]), which validates the whole config and indexes it.
//!
//! Units are in field names (`_ms`, `_seconds`, `_percent`) or doc comments.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::port::{AppPort, OuterPort, ServicePort};

/// One sidecar's whole config: what one workload serves and what it uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    /// The config version. Strictly increasing for one sidecar across changes (and across
    /// discover restarts); it is also the HTTP `ETag`. A client never applies a version
    /// lower than the one it holds.
    pub version: u64,
    /// Who this sidecar is.
    pub identity: Identity,
    /// The ports the workload serves, each remapped to a `port_outer` the sidecar listens on.
    #[serde(default)]
    pub inbound: Vec<InboundPort>,
    /// The services the workload depends on, each with its own loopback address.
    #[serde(default)]
    pub outbound: Vec<OutboundService>,
    /// DNS shim settings.
    #[serde(default)]
    pub dns: DnsSettings,
    /// The variables of the plugin this config is for. Never logged.
    #[serde(default)]
    pub plugin: PluginSettings,
    /// Mutual TLS between sidecars. Absent means no TLS at all (plaintext hops, no client
    /// identity), as with a discover that predates this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSettings>,
}

/// Mutual TLS between sidecars: how strict the inbound side is, what to trust, and where
/// the sidecar gets its own certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// How the inbound listeners treat clients without TLS (default `permissive`).
    #[serde(default)]
    pub mode: TlsMode,
    /// The SPIFFE trust domain: identities are
    /// `spiffe://<trust_domain>/ns/<namespace>/svc/<service>` (default `cluster.local`).
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// The CA certificates (PEM, one or more) that sign sidecar certificates. Peers whose
    /// chain does not end in one of them are refused.
    pub trust_bundle_pem: String,
    /// Where the sidecar sends its certificate signing request (`POST`, PEM body): a URL
    /// reference resolved against `DISCOVER_URL` as RFC 3986 §5.2 says (so
    /// `sidemesh-proxy/certificate` next to `.../sidemesh-proxy`). The query of
    /// `DISCOVER_URL` is not carried over; the `Authorization` header is.
    pub csr_url: String,
}

/// How an inbound listener treats clients (Istio's `PeerAuthentication` names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// No TLS: plaintext in and out, no client identity (so `allow_clients` lists refuse
    /// every client).
    Disabled,
    /// Mutual TLS from meshed clients, plaintext from the others (which have no identity).
    #[default]
    Permissive,
    /// Mutual TLS only: plaintext connections are closed.
    Strict,
}

impl TlsMode {
    /// The wire name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disabled => "disabled",
            TlsMode::Permissive => "permissive",
            TlsMode::Strict => "strict",
        }
    }
}

fn default_trust_domain() -> String {
    "cluster.local".to_owned()
}

/// The SPIFFE ID of a workload's service: `spiffe://<trust domain>/ns/<namespace>/svc/<service>`.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/svc/{service}")
}

/// The `namespace/service` of a SPIFFE ID of `trust_domain` made by [`spiffe_id`], or
/// `None` when it is not one (another trust domain, another shape, bad names).
pub fn parse_spiffe_id<'a>(trust_domain: &str, id: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = id.strip_prefix("spiffe://")?.strip_prefix(trust_domain)?;
    let rest = rest.strip_prefix("/ns/")?;
    let (ns, rest) = rest.split_once('/')?;
    let svc = rest.strip_prefix("svc/")?;
    let ok = |s: &str| crate::name::check_label(s).is_ok();
    (ok(ns) && ok(svc)).then_some((ns, svc))
}

/// Who a sidecar is. `namespace/service` is also the client identity that `allow_clients`
/// lists name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// The workload's namespace (a DNS label).
    pub namespace: String,
    /// The workload's service name (a DNS label).
    pub service: String,
    /// The plugin this config is for (a DNS label), e.g. `sidemesh-proxy`.
    pub plugin: String,
    /// The pod (or instance) name, when the config is for one pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The zone the workload runs in; zone-aware balancing prefers endpoints in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// The application protocol spoken on a port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Detect HTTP/1.1 or HTTP/2 by peeking at the first bytes, else raw TCP. A protocol
    /// where the server speaks first is treated as TCP after a short peek timeout.
    #[default]
    Auto,
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 (h2c with prior knowledge between plain peers).
    Http2,
    /// gRPC: HTTP/2 with trailers.
    Grpc,
    /// Raw TCP, bytes in both directions.
    Tcp,
}

impl Protocol {
    /// Whether requests on this port are HTTP (and so can be routed).
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http1 | Protocol::Http2 | Protocol::Grpc)
    }

    /// The wire name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Auto => "auto",
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A port the workload serves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundPort {
    /// The app's own port; the sidecar forwards to `127.0.0.1:<port>`.
    pub port: AppPort,
    /// The remapped port the sidecar listens on; other sidecars dial `pod_ip:<port_outer>`.
    pub port_outer: OuterPort,
    /// The service port clients use for this app port (it differs from `port` when the
    /// service maps ports). Absent: the same number as `port`. The sidecar announces it
    /// when it registers itself (`--register`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_port: Option<ServicePort>,
    /// The protocol on this port.
    #[serde(default)]
    pub protocol: Protocol,
    /// Clients allowed to call this port, as `namespace/service` (or `namespace/*`).
    /// Absent means everyone; an empty list means no one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_clients: Option<Vec<String>>,
    /// Timeouts towards the app.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Limits on traffic into the app on this port.
    #[serde(default)]
    pub limits: Limits,
    /// This port's TLS mode, overriding `tls.mode` of the config (Istio's port-level
    /// `PeerAuthentication`). Absent: the config's mode. Without `tls` settings no
    /// certificate exists, so `strict` then refuses every client (fail closed) and
    /// `permissive` takes plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_mode: Option<TlsMode>,
}

/// A service the workload depends on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundService {
    /// The service name (a DNS label).
    pub name: String,
    /// The service's namespace (a DNS label).
    pub namespace: String,
    /// Every DNS name the shim answers with `address` for this service, lower case and
    /// without a trailing dot, e.g. `tomcat`, `tomcat.shop`, `tomcat.shop.svc`,
    /// `tomcat.shop.svc.cluster.local`.
    #[serde(default)]
    pub dns_names: Vec<String>,
    /// The loopback address (in 127.0.0.0/8, never 127.0.0.1) the sidecar listens on for
    /// this service; stable while the service exists.
    pub address: Ipv4Addr,
    /// An IPv6 address the DNS shim answers `AAAA` queries for this service's names with.
    /// Absent (the default): `AAAA` gets no records. The sidecar does not listen on it:
    /// set it only where it reaches the sidecar (e.g. `::ffff:<address>`, which a
    /// dual-stack client socket dials over IPv4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_v6: Option<Ipv6Addr>,
    /// The service's ports, each with its endpoints.
    pub ports: Vec<OutboundPort>,
    /// HTTP routes, tried in order; the first match wins. Without routes (or when none
    /// matches) requests go to all the service's endpoints.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// How requests are spread over endpoints.
    #[serde(default)]
    pub balancer: Balancer,
    /// Connect, request and idle timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// The retry policy (routes may override it).
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Circuit-breaker limits, per sidecar, for this service.
    #[serde(default)]
    pub limits: Limits,
    /// Passive outlier detection; absent means off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Active health checking; absent means off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

/// One port of a dependency service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundPort {
    /// The service port the app dials (the sidecar listens on `address:port`).
    pub port: ServicePort,
    /// The protocol on this port.
    #[serde(default)]
    pub protocol: Protocol,
    /// Where the service's instances are, for this port.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

/// One instance of a service, for one service port.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// The instance's IP address.
    pub address: IpAddr,
    /// The port to dial: the instance sidecar's `port_outer` when `meshed`, else the
    /// app's own port.
    pub port: u16,
    /// Relative weight, 1..=10000 (default 100).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The instance's zone, for zone-aware balancing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Whether a sidemesh sidecar fronts this instance (so the hop can be upgraded).
    #[serde(default)]
    pub meshed: bool,
    /// Labels (e.g. `version: v2`) that route backends select subsets by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn default_weight() -> u32 {
    100
}

/// An HTTP route of a dependency service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The route's name (a DNS label), used as a metrics label.
    pub name: String,
    /// What requests this route takes; every given condition must hold.
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    /// Where matched requests go, split by weight. Empty means all endpoints.
    #[serde(default)]
    pub backends: Vec<RouteBackend>,
    /// The request timeout for this route, in milliseconds (overrides the service's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// The retry policy for this route (overrides the service's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Headers added to or removed from the request.
    #[serde(default)]
    pub request_headers: HeaderRewrite,
    /// Headers added to or removed from the response.
    #[serde(default)]
    pub response_headers: HeaderRewrite,
    /// Faults injected into this route's requests, to test how callers cope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

/// Faults injected into a route's requests by the calling sidecar (as Istio's `fault`): a
/// delay before the request goes on, an answer with an error status instead of sending it,
/// or both, each for a share of the requests.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Hold requests this long before sending them on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Answer requests with this status instead of sending them on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// A delay fault.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    /// The delay, in milliseconds (1..=3600000).
    pub ms: u64,
    /// The share of requests delayed, 0..=100 (fractions allowed, e.g. 0.5).
    pub percent: f64,
}

/// An abort fault.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    /// The status answered (200..=599).
    pub status: u16,
    /// The share of requests answered so, 0..=100 (fractions allowed).
    pub percent: f64,
}

/// Conditions on a request. All that are given must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// The request's host or `:authority`, without port, compared case-insensitively.
    /// `*.example.com` matches any subdomain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The request path (without query).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Header conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// Allowed methods (upper case); empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

/// A path condition: exactly one of the three.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum PathMatch {
    /// The path equals this.
    Exact(String),
    /// The path starts with this, on a segment boundary (`/api` matches `/api/x`, not `/apix`).
    Prefix(String),
    /// The whole path matches this regular expression (Rust `regex` syntax).
    Regex(String),
}

/// A header condition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// The header name (case-insensitive).
    pub name: String,
    /// How the value must look.
    #[serde(flatten)]
    pub value: HeaderValueMatch,
}

/// How a header value must look: exactly one of these.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderValueMatch {
    /// The value equals this.
    Exact(String),
    /// The whole value matches this regular expression.
    Regex(String),
    /// The header is present (`true`) or absent (`false`).
    Present(bool),
}

/// A weighted destination of a route.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteBackend {
    /// Another outbound service of this config, as `namespace/name`; absent means the
    /// service the route belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Only the endpoints whose labels include all of these.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subset: BTreeMap<String, String>,
    /// Share of traffic, 0..=10000 (basis points of the route's total).
    pub weight: u32,
}

/// Header changes applied by a route.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderRewrite {
    /// Headers set (replacing any present value).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Header names removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// The load-balancing policy of a service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balancer {
    /// The algorithm.
    #[serde(default)]
    pub policy: BalancePolicy,
    /// What `ring_hash` and `maglev` hash on; required for them, refused for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
    /// Prefer endpoints in the sidecar's own zone; spill over when fewer than
    /// `zone_min_healthy_percent` of them are healthy.
    #[serde(default = "default_true")]
    pub zone_aware: bool,
    /// Below this share of healthy own-zone endpoints, traffic spills to other zones (0..=100).
    #[serde(default = "default_zone_min_healthy")]
    pub zone_min_healthy_percent: u8,
    /// Spill-over on overload: the own zone counts as overloaded only while its healthy
    /// endpoints average at least this many requests (or TCP connections) in flight,
    /// 1..=100000. Absent: [`Balancer::DEFAULT_ZONE_SPILL_MIN_INFLIGHT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_spill_min_inflight: Option<u32>,
    /// ... and carry, per unit of weight, more than this many times the in-flight load of
    /// the other zones' healthy endpoints, 1..=100. Absent:
    /// [`Balancer::DEFAULT_ZONE_SPILL_RATIO`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_spill_ratio: Option<u32>,
}

impl Balancer {
    /// The default of `zone_spill_min_inflight`: light load stays in the own zone, as
    /// crossing zones costs latency and money.
    pub const DEFAULT_ZONE_SPILL_MIN_INFLIGHT: u32 = 8;
    /// The default of `zone_spill_ratio`.
    pub const DEFAULT_ZONE_SPILL_RATIO: u32 = 2;

    /// `zone_spill_min_inflight`, or its default.
    pub fn spill_min_inflight(&self) -> u32 {
        self.zone_spill_min_inflight
            .unwrap_or(Self::DEFAULT_ZONE_SPILL_MIN_INFLIGHT)
    }

    /// `zone_spill_ratio`, or its default.
    pub fn spill_ratio(&self) -> u32 {
        self.zone_spill_ratio
            .unwrap_or(Self::DEFAULT_ZONE_SPILL_RATIO)
    }
}

fn default_true() -> bool {
    true
}

// By hand, not derived: an absent `balancer` must mean the same as `balancer: {}`.
impl Default for Balancer {
    fn default() -> Self {
        Balancer {
            policy: BalancePolicy::default(),
            hash_on: None,
            zone_aware: default_true(),
            zone_min_healthy_percent: default_zone_min_healthy(),
            zone_spill_min_inflight: None,
            zone_spill_ratio: None,
        }
    }
}

fn default_zone_min_healthy() -> u8 {
    70
}

/// Load-balancing algorithms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancePolicy {
    /// Weighted round robin.
    RoundRobin,
    /// Weighted random.
    Random,
    /// Power of two choices on in-flight requests.
    LeastRequest,
    /// Power of two choices on peak-EWMA latency times load (the default).
    #[default]
    PeakEwma,
    /// Consistent hashing on a ring (Ketama-style).
    RingHash,
    /// Maglev consistent hashing.
    Maglev,
}

/// The request property that consistent hashing uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum HashOn {
    /// The value of this request header.
    Header(String),
    /// The value of this cookie.
    Cookie(String),
    /// The client's IP address.
    SourceIp,
}

/// Timeouts, in milliseconds. Zero means no timeout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Time to establish a connection to an endpoint (default 1000).
    #[serde(default = "default_connect_ms")]
    pub connect_ms: u64,
    /// Time from a request's start to its response headers, retries included (default 15000).
    #[serde(default = "default_request_ms")]
    pub request_ms: u64,
    /// Time a connection may stay without traffic before it is closed (default 300000).
    #[serde(default = "default_idle_ms")]
    pub idle_ms: u64,
}

fn default_connect_ms() -> u64 {
    1_000
}
fn default_request_ms() -> u64 {
    15_000
}
fn default_idle_ms() -> u64 {
    300_000
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_ms: default_connect_ms(),
            request_ms: default_request_ms(),
            idle_ms: default_idle_ms(),
        }
    }
}

/// When and how failed requests are retried.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first try, 0..=10 (default 2). Zero turns retries off.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Failures that are retried (default: connect failures and refused streams).
    #[serde(default = "default_retry_on")]
    pub retry_on: Vec<RetryOn>,
    /// Timeout of one try, in milliseconds; 0 means only the request timeout applies.
    #[serde(default)]
    pub per_try_timeout_ms: u64,
    /// First backoff between tries, in milliseconds (default 25), doubled each retry with
    /// full jitter.
    #[serde(default = "default_backoff_base_ms")]
    pub backoff_base_ms: u64,
    /// Backoff cap, in milliseconds (default 250).
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Retries may add at most this share of the original requests, 0..=100 (default 20).
    #[serde(default = "default_budget_percent")]
    pub budget_percent: u32,
    /// ... plus this many retries per second regardless of load (default 10).
    #[serde(default = "default_min_retries_per_second")]
    pub min_retries_per_second: u32,
}

fn default_attempts() -> u32 {
    2
}
fn default_retry_on() -> Vec<RetryOn> {
    vec![RetryOn::ConnectFailure, RetryOn::RefusedStream]
}
fn default_backoff_base_ms() -> u64 {
    25
}
fn default_backoff_max_ms() -> u64 {
    250
}
fn default_budget_percent() -> u32 {
    20
}
fn default_min_retries_per_second() -> u32 {
    10
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: default_attempts(),
            retry_on: default_retry_on(),
            per_try_timeout_ms: 0,
            backoff_base_ms: default_backoff_base_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            budget_percent: default_budget_percent(),
            min_retries_per_second: default_min_retries_per_second(),
        }
    }
}

/// Retriable failure classes. Only requests whose body is known and replayable are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    /// The connection to the endpoint could not be made.
    ConnectFailure,
    /// The HTTP/2 stream was refused before processing (`REFUSED_STREAM`).
    RefusedStream,
    /// The connection was reset before any response byte.
    Reset,
    /// 502, 503 or 504.
    GatewayError,
    /// Any 5xx.
    #[serde(rename = "5xx")]
    ServerError,
    /// The per-try timeout fired.
    PerTryTimeout,
    /// gRPC (on `grpc` ports): a response whose head carries `grpc-status` 1, `CANCELLED`
    /// (a trailers-only response, before any of its body reached the client).
    GrpcCancelled,
    /// gRPC: `grpc-status` 4, `DEADLINE_EXCEEDED`, in the response head.
    GrpcDeadlineExceeded,
    /// gRPC: `grpc-status` 8, `RESOURCE_EXHAUSTED`, in the response head.
    GrpcResourceExhausted,
    /// gRPC: `grpc-status` 13, `INTERNAL`, in the response head.
    GrpcInternal,
    /// gRPC: `grpc-status` 14, `UNAVAILABLE`, in the response head.
    GrpcUnavailable,
}

impl RetryOn {
    /// The gRPC status code this condition retries, if it is a gRPC one.
    pub fn grpc_code(self) -> Option<u8> {
        match self {
            RetryOn::GrpcCancelled => Some(1),
            RetryOn::GrpcDeadlineExceeded => Some(4),
            RetryOn::GrpcResourceExhausted => Some(8),
            RetryOn::GrpcInternal => Some(13),
            RetryOn::GrpcUnavailable => Some(14),
            _ => None,
        }
    }
}

/// Circuit-breaker limits. Zero means unlimited.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Open connections to the service's endpoints.
    #[serde(default)]
    pub max_connections: u32,
    /// Requests waiting for a connection.
    #[serde(default)]
    pub max_pending_requests: u32,
    /// Requests in flight.
    #[serde(default)]
    pub max_requests: u32,
}

/// Passive outlier detection: endpoints that fail in a row are ejected for a while.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx responses that eject an endpoint (default 5; 0 turns this check off).
    #[serde(default = "default_consecutive")]
    pub consecutive_5xx: u32,
    /// Consecutive connect failures that eject an endpoint (default 5; 0 turns this off).
    #[serde(default = "default_consecutive")]
    pub consecutive_connect_failures: u32,
    /// First ejection time, in milliseconds (default 30000); multiplied by the number of
    /// times the endpoint was ejected in a row.
    #[serde(default = "default_base_ejection_ms")]
    pub base_ejection_ms: u64,
    /// Ejection time cap, in milliseconds (default 300000).
    #[serde(default = "default_max_ejection_ms")]
    pub max_ejection_ms: u64,
    /// At most this share of a backend's endpoints is ejected at once, 0..=100 (default 50).
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u8,
}

fn default_consecutive() -> u32 {
    5
}
fn default_base_ejection_ms() -> u64 {
    30_000
}
fn default_max_ejection_ms() -> u64 {
    300_000
}
fn default_max_ejection_percent() -> u8 {
    50
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: default_consecutive(),
            consecutive_connect_failures: default_consecutive(),
            base_ejection_ms: default_base_ejection_ms(),
            max_ejection_ms: default_max_ejection_ms(),
            max_ejection_percent: default_max_ejection_percent(),
        }
    }
}

/// Active health checking of each endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// `GET` this path and expect a 2xx; absent means a TCP connect check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_path: Option<String>,
    /// Time between checks, in milliseconds (default 5000).
    #[serde(default = "default_hc_interval_ms")]
    pub interval_ms: u64,
    /// Time one check may take, in milliseconds (default 1000).
    #[serde(default = "default_hc_timeout_ms")]
    pub timeout_ms: u64,
    /// Checks in a row that mark an endpoint healthy (default 1).
    #[serde(default = "default_one")]
    pub healthy_threshold: u32,
    /// Checks in a row that mark an endpoint unhealthy (default 3).
    #[serde(default = "default_three")]
    pub unhealthy_threshold: u32,
}

fn default_hc_interval_ms() -> u64 {
    5_000
}
fn default_hc_timeout_ms() -> u64 {
    1_000
}
fn default_one() -> u32 {
    1
}
fn default_three() -> u32 {
    3
}

/// DNS shim settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSettings {
    /// The cluster domain (default `cluster.local`).
    #[serde(default = "default_cluster_domain")]
    pub cluster_domain: String,
    /// Upstream resolvers as `ip:port` (or `ip`, port 53); empty means the pod's own.
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// TTL of local answers, in seconds (default 5).
    #[serde(default = "default_dns_ttl")]
    pub ttl_seconds: u32,
}

fn default_cluster_domain() -> String {
    "cluster.local".to_owned()
}
fn default_dns_ttl() -> u32 {
    5
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            cluster_domain: default_cluster_domain(),
            upstreams: Vec::new(),
            ttl_seconds: default_dns_ttl(),
        }
    }
}

/// The plugin this config is for, and its variables.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSettings {
    /// Plugin variables: the plugin's own, private to its container. Never logged.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
}

impl fmt::Debug for PluginSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Variables may hold secrets: show their names only.
        f.debug_struct("PluginSettings")
            .field("variables", &self.variables.keys().collect::<Vec<_>>())
            .finish()
    }
}
