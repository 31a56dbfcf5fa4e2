//! Validation of a whole [`SidecarConfig`] into an immutable, indexed [`Snapshot`].
//!
//! A config is checked as a whole before anything uses it. Every problem found is reported,
//! each with the field path and what to fix (`outbound[3].routes[0].backends[1].weight:
//! must be within 0..=10000, got 20000`), so one round trip fixes them all. A snapshot
//! that exists is valid: consumers never re-check it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use regex::Regex;

use crate::config::*;
use crate::name::{check_client, check_dns_name, check_label, check_token};
use crate::port::{OuterPort, ServicePort};

/// Regexes in routes are compiled with this size limit, so a config cannot make the
/// sidecar build a huge automaton.
const REGEX_SIZE_LIMIT: usize = 64 * 1024;
/// The largest timeout accepted anywhere, in milliseconds (one day).
const MAX_TIMEOUT_MS: u64 = 86_400_000;
/// Longest injected delay: an hour.
const MAX_FAULT_DELAY_MS: u64 = 3_600_000;
/// The largest weight of an endpoint or a route backend.
pub const MAX_WEIGHT: u32 = 10_000;

/// One problem in a config: where, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationError {
    /// The field path, e.g. `outbound[3].routes[0].weight`.
    pub path: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Everything wrong with a config (never empty).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Why raw bytes did not become a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The bytes are not JSON of the config's shape (this includes unknown fields).
    #[error("config is not valid JSON of the expected shape: {0}")]
    Parse(#[from] serde_json::Error),
    /// The config parsed but breaks a rule.
    #[error("config is invalid: {0}")]
    Invalid(#[from] ValidationErrors),
}

/// A validated, indexed, immutable sidecar config. Cheap to share (`Arc` inside).
#[derive(Clone, Debug)]
pub struct Snapshot {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: SidecarConfig,
    outbound_by_key: HashMap<(String, String), usize>,
    outbound_by_address: HashMap<Ipv4Addr, usize>,
    dns: HashMap<String, Ipv4Addr>,
    inbound_by_outer: HashMap<OuterPort, usize>,
    routes: Vec<Vec<RouteMatcher>>,
}

impl Snapshot {
    /// Parses and validates a config from JSON bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Snapshot, ConfigError> {
        let raw: SidecarConfig = serde_json::from_slice(bytes)?;
        Ok(Snapshot::try_from(raw)?)
    }

    /// The config's version.
    pub fn version(&self) -> u64 {
        self.inner.config.version
    }

    /// The whole validated config.
    pub fn config(&self) -> &SidecarConfig {
        &self.inner.config
    }

    /// The config as JSON (what discover served, re-encoded).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain data structs with string keys cannot fail.
        serde_json::to_vec(&self.inner.config).unwrap_or_default()
    }

    /// Who this sidecar is.
    pub fn identity(&self) -> &Identity {
        &self.inner.config.identity
    }

    /// The inbound ports.
    pub fn inbound(&self) -> &[InboundPort] {
        &self.inner.config.inbound
    }

    /// The inbound port whose sidecar listener is `port_outer`.
    pub fn inbound_by_outer(&self, port_outer: OuterPort) -> Option<&InboundPort> {
        let i = *self.inner.inbound_by_outer.get(&port_outer)?;
        self.inner.config.inbound.get(i)
    }

    /// The dependency services.
    pub fn outbound(&self) -> &[OutboundService] {
        &self.inner.config.outbound
    }

    /// The dependency `namespace/name`, with its index in [`Snapshot::outbound`].
    pub fn outbound_by_name(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<(usize, &OutboundService)> {
        let i = *self
            .inner
            .outbound_by_key
            .get(&(namespace.to_owned(), name.to_owned()))?;
        Some((i, self.inner.config.outbound.get(i)?))
    }

    /// The dependency whose loopback address is `address`, with its index.
    pub fn outbound_by_address(&self, address: Ipv4Addr) -> Option<(usize, &OutboundService)> {
        let i = *self.inner.outbound_by_address.get(&address)?;
        Some((i, self.inner.config.outbound.get(i)?))
    }

    /// The compiled matchers of the routes of outbound service `index`, in route order.
    pub fn route_matchers(&self, index: usize) -> &[RouteMatcher] {
        self.inner
            .routes
            .get(index)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The loopback address of a mesh DNS name (lower case, no trailing dot).
    pub fn resolve(&self, name: &str) -> Option<Ipv4Addr> {
        self.inner.dns.get(name).copied()
    }

    /// Every mesh DNS name with its address.
    pub fn dns_names(&self) -> impl Iterator<Item = (&str, Ipv4Addr)> {
        self.inner.dns.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// DNS shim settings.
    pub fn dns(&self) -> &DnsSettings {
        &self.inner.config.dns
    }

    /// The TLS mode of inbound port `port`: its own `tls_mode`, else the config's
    /// `tls.mode`, else (no `tls` settings) `disabled`.
    pub fn inbound_tls_mode(&self, port: &InboundPort) -> TlsMode {
        port.tls_mode.unwrap_or_else(|| {
            self.inner
                .config
                .tls
                .as_ref()
                .map_or(TlsMode::Disabled, |t| t.mode)
        })
    }

    /// The TLS mode of the inbound listener on `port_outer` (`disabled` for a port that is
    /// not inbound).
    pub fn tls_mode_by_outer(&self, port_outer: OuterPort) -> TlsMode {
        self.inbound_by_outer(port_outer)
            .map_or(TlsMode::Disabled, |p| self.inbound_tls_mode(p))
    }

    /// Whether this sidecar needs a certificate: `tls` is present and its mode, or the
    /// mode of one of the inbound ports, is not `disabled`.
    pub fn wants_tls(&self) -> bool {
        self.inner
            .config
            .tls
            .as_ref()
            .is_some_and(|t| needs_credentials(t, &self.inner.config.inbound))
    }

    /// Whether `client` (`namespace/service`) may call inbound port `port`.
    pub fn client_allowed(port: &InboundPort, client: Option<&str>) -> bool {
        match &port.allow_clients {
            None => true,
            Some(list) => {
                let Some(client) = client else { return false };
                let ns = client.split_once('/').map(|(ns, _)| ns);
                list.iter().any(|allowed| {
                    allowed == client
                        || allowed
                            .strip_suffix("/*")
                            .is_some_and(|allowed_ns| Some(allowed_ns) == ns)
                })
            }
        }
    }
}

impl TryFrom<SidecarConfig> for Snapshot {
    type Error = ValidationErrors;

    fn try_from(config: SidecarConfig) -> Result<Snapshot, ValidationErrors> {
        let mut v = Validator::default();
        let routes = v.config(&config);
        if !v.errors.is_empty() {
            return Err(ValidationErrors(v.errors));
        }
        let mut outbound_by_key = HashMap::new();
        let mut outbound_by_address = HashMap::new();
        let mut dns = HashMap::new();
        for (i, svc) in config.outbound.iter().enumerate() {
            outbound_by_key.insert((svc.namespace.clone(), svc.name.clone()), i);
            outbound_by_address.insert(svc.address, i);
            for name in &svc.dns_names {
                dns.insert(name.clone(), svc.address);
            }
        }
        let inbound_by_outer = config
            .inbound
            .iter()
            .enumerate()
            .map(|(i, p)| (p.port_outer, i))
            .collect();
        Ok(Snapshot {
            inner: Arc::new(Inner {
                config,
                outbound_by_key,
                outbound_by_address,
                dns,
                inbound_by_outer,
                routes,
            }),
        })
    }
}

/// A route's compiled conditions.
#[derive(Clone, Debug)]
pub struct RouteMatcher {
    host: Option<HostMatcher>,
    path: Option<PathMatcher>,
    headers: Vec<(String, ValueMatcher)>,
    methods: Vec<String>,
}

#[derive(Clone, Debug)]
enum HostMatcher {
    Exact(String),
    /// `*.example.com`, stored as `.example.com`.
    Suffix(String),
}

#[derive(Clone, Debug)]
enum PathMatcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Clone, Debug)]
enum ValueMatcher {
    Exact(String),
    Regex(Regex),
    Present(bool),
}

impl RouteMatcher {
    /// Whether a request matches. `host` is the host without port; `header` looks up the
    /// first value of a header by lower-case name.
    pub fn matches<'a>(
        &self,
        method: &str,
        host: Option<&str>,
        path: &str,
        header: impl Fn(&str) -> Option<&'a str>,
    ) -> bool {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == method) {
            return false;
        }
        if let Some(want) = &self.host {
            let Some(host) = host else { return false };
            let host = host.to_ascii_lowercase();
            let ok = match want {
                HostMatcher::Exact(h) => *h == host,
                HostMatcher::Suffix(s) => host.ends_with(s.as_str()) && host.len() > s.len(),
            };
            if !ok {
                return false;
            }
        }
        if let Some(want) = &self.path {
            let ok = match want {
                PathMatcher::Exact(p) => path == p,
                PathMatcher::Prefix(p) => {
                    p == "/"
                        || path == p
                        || (path.starts_with(p.as_str())
                            && (p.ends_with('/') || path.as_bytes().get(p.len()) == Some(&b'/')))
                }
                PathMatcher::Regex(r) => r.is_match(path),
            };
            if !ok {
                return false;
            }
        }
        self.headers.iter().all(|(name, want)| {
            let value = header(name);
            match want {
                ValueMatcher::Exact(v) => value == Some(v.as_str()),
                ValueMatcher::Regex(r) => value.is_some_and(|v| r.is_match(v)),
                ValueMatcher::Present(p) => value.is_some() == *p,
            }
        })
    }
}

#[derive(Default)]
struct Validator {
    errors: Vec<ValidationError>,
}

impl Validator {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ValidationError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn check(&mut self, path: &str, r: Result<(), String>) {
        if let Err(m) = r {
            self.err(path, m);
        }
    }

    fn range<T: PartialOrd + fmt::Display>(&mut self, path: &str, v: T, lo: T, hi: T) {
        if v < lo || v > hi {
            self.err(path, format!("must be within {lo}..={hi}, got {v}"));
        }
    }

    /// A share in percent: a finite number within 0..=100.
    fn percent(&mut self, path: &str, v: f64) {
        if !(v.is_finite() && (0.0..=100.0).contains(&v)) {
            self.err(
                path,
                format!("must be a percentage within 0..=100, got {v}"),
            );
        }
    }

    fn config(&mut self, c: &SidecarConfig) -> Vec<Vec<RouteMatcher>> {
        self.check("identity.namespace", check_label(&c.identity.namespace));
        self.check("identity.service", check_label(&c.identity.service));
        self.check("identity.plugin", check_label(&c.identity.plugin));
        if let Some(pod) = &c.identity.pod {
            self.check("identity.pod", check_dns_name(pod));
        }
        if let Some(zone) = &c.identity.zone {
            self.check("identity.zone", check_token(zone));
        }
        self.inbound(&c.inbound);
        let routes = self.outbound(&c.outbound);
        self.dns(&c.dns);
        if let Some(tls) = &c.tls {
            self.tls(tls, &c.inbound);
        }
        for name in c.plugin.variables.keys() {
            let ok = !name.is_empty()
                && name.len() <= 256
                && !name.starts_with(|ch: char| ch.is_ascii_digit())
                && name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
            if !ok {
                self.err(
                    format!("plugin.variables[{name:?}]"),
                    "must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
                );
            }
        }
        for (name, value) in &c.plugin.variables {
            // Never echo the value: it may be a secret.
            if value.contains('\0') {
                self.err(
                    format!("plugin.variables[{name:?}]"),
                    "value must not contain NUL",
                );
            }
        }
        routes
    }

    fn inbound(&mut self, ports: &[InboundPort]) {
        let app_ports: HashSet<u16> = ports.iter().map(|p| p.port.get()).collect();
        let mut seen_app = HashSet::new();
        let mut seen_outer = HashSet::new();
        for (i, p) in ports.iter().enumerate() {
            let at = format!("inbound[{i}]");
            if p.port.get() == 0 {
                self.err(format!("{at}.port"), "must be within 1..=65535, got 0");
            } else if !seen_app.insert(p.port) {
                self.err(
                    format!("{at}.port"),
                    format!("port {} is listed twice", p.port),
                );
            }
            if p.service_port.is_some_and(|s| s.get() == 0) {
                self.err(
                    format!("{at}.service_port"),
                    "must be within 1..=65535, got 0",
                );
            }
            if p.port_outer.get() == 0 {
                self.err(
                    format!("{at}.port_outer"),
                    "must be within 1..=65535, got 0",
                );
            } else if !seen_outer.insert(p.port_outer) {
                self.err(
                    format!("{at}.port_outer"),
                    format!(
                        "port_outer {} is used by another inbound port",
                        p.port_outer
                    ),
                );
            } else if app_ports.contains(&p.port_outer.get()) {
                self.err(
                    format!("{at}.port_outer"),
                    format!("port_outer {} collides with an app port", p.port_outer),
                );
            }
            if let Some(list) = &p.allow_clients {
                for (j, client) in list.iter().enumerate() {
                    self.check(&format!("{at}.allow_clients[{j}]"), check_client(client));
                }
            }
            self.timeouts(&format!("{at}.timeouts"), &p.timeouts);
        }
    }

    fn outbound(&mut self, services: &[OutboundService]) -> Vec<Vec<RouteMatcher>> {
        let mut keys = HashSet::new();
        let mut addresses = HashMap::new();
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, s) in services.iter().enumerate() {
            keys.insert(format!("{}/{}", s.namespace, s.name));
            let at = format!("outbound[{i}]");
            self.check(&format!("{at}.name"), check_label(&s.name));
            self.check(&format!("{at}.namespace"), check_label(&s.namespace));
            let octets = s.address.octets();
            if octets[0] != 127
                || s.address == Ipv4Addr::LOCALHOST
                || octets[3] == 0
                || octets[3] == 255
            {
                self.err(
                    format!("{at}.address"),
                    format!(
                        "must be a loopback address in 127.0.0.0/8 other than 127.0.0.1, \
                         not ending in .0 or .255, got {}",
                        s.address
                    ),
                );
            } else if let Some(j) = addresses.insert(s.address, i) {
                self.err(
                    format!("{at}.address"),
                    format!("{} is already the address of outbound[{j}]", s.address),
                );
            }
            if let Some(v6) = s.address_v6 {
                if v6.is_unspecified() || v6.is_multicast() {
                    self.err(
                        format!("{at}.address_v6"),
                        format!("must be a unicast address, got {v6}"),
                    );
                }
            }
            for (j, n) in s.dns_names.iter().enumerate() {
                let path = format!("{at}.dns_names[{j}]");
                self.check(&path, check_dns_name(n));
                if let Some(k) = names.insert(n, i) {
                    if k != i {
                        self.err(&path, format!("{n:?} is already a name of outbound[{k}]"));
                    }
                }
            }
            if s.ports.is_empty() {
                self.err(format!("{at}.ports"), "must list at least one port");
            }
            let mut seen_ports = HashSet::new();
            for (j, p) in s.ports.iter().enumerate() {
                self.port(&format!("{at}.ports[{j}]"), p, &mut seen_ports);
            }
            self.balancer(&format!("{at}.balancer"), &s.balancer);
            self.timeouts(&format!("{at}.timeouts"), &s.timeouts);
            self.retry(&format!("{at}.retry"), &s.retry);
            if let Some(o) = &s.outlier_detection {
                self.outlier(&format!("{at}.outlier_detection"), o);
            }
            if let Some(h) = &s.health_check {
                self.health_check(&format!("{at}.health_check"), h);
            }
        }
        let mut compiled = Vec::with_capacity(services.len());
        for (i, s) in services.iter().enumerate() {
            let mut route_names = HashSet::new();
            let mut out = Vec::with_capacity(s.routes.len());
            for (j, r) in s.routes.iter().enumerate() {
                let at = format!("outbound[{i}].routes[{j}]");
                self.check(&format!("{at}.name"), check_label(&r.name));
                if !route_names.insert(r.name.as_str()) {
                    self.err(
                        format!("{at}.name"),
                        format!("route {:?} is defined twice", r.name),
                    );
                }
                if let Some(m) = self.route(&at, r, &keys) {
                    out.push(m);
                }
            }
            compiled.push(out);
        }
        compiled
    }

    fn port(&mut self, at: &str, p: &OutboundPort, seen: &mut HashSet<ServicePort>) {
        if p.port.get() == 0 {
            self.err(format!("{at}.port"), "must be within 1..=65535, got 0");
        } else if !seen.insert(p.port) {
            self.err(
                format!("{at}.port"),
                format!("port {} is listed twice", p.port),
            );
        }
        for (k, e) in p.endpoints.iter().enumerate() {
            let at = format!("{at}.endpoints[{k}]");
            if e.address.is_unspecified() || e.address.is_multicast() {
                self.err(
                    format!("{at}.address"),
                    format!("must be a unicast address, got {}", e.address),
                );
            }
            if e.port == 0 {
                self.err(format!("{at}.port"), "must be within 1..=65535, got 0");
            }
            self.range(&format!("{at}.weight"), e.weight, 1, MAX_WEIGHT);
            if let Some(z) = &e.zone {
                self.check(&format!("{at}.zone"), check_token(z));
            }
            for (key, value) in &e.labels {
                self.check(&format!("{at}.labels"), check_token(key));
                self.check(&format!("{at}.labels[{key:?}]"), check_token(value));
            }
        }
    }

    fn route(&mut self, at: &str, r: &Route, services: &HashSet<String>) -> Option<RouteMatcher> {
        let before = self.errors.len();
        let m = &r.matches;
        let host = m.host.as_ref().and_then(|h| {
            let lower = h.to_ascii_lowercase();
            let (suffix, rest) = match lower.strip_prefix("*.") {
                Some(rest) => (true, rest.to_owned()),
                None => (false, lower.clone()),
            };
            match check_dns_name(&rest) {
                Ok(()) if suffix => Some(HostMatcher::Suffix(format!(".{rest}"))),
                Ok(()) => Some(HostMatcher::Exact(rest)),
                Err(e) => {
                    self.err(format!("{at}.match.host"), e);
                    None
                }
            }
        });
        let path = match &m.path {
            None => None,
            Some(PathMatch::Exact(p)) | Some(PathMatch::Prefix(p)) if !p.starts_with('/') => {
                self.err(
                    format!("{at}.match.path"),
                    format!("must start with '/', got {p:?}"),
                );
                None
            }
            Some(PathMatch::Exact(p)) => Some(PathMatcher::Exact(p.clone())),
            Some(PathMatch::Prefix(p)) => Some(PathMatcher::Prefix(p.clone())),
            Some(PathMatch::Regex(re)) => self
                .regex(&format!("{at}.match.path.regex"), re)
                .map(PathMatcher::Regex),
        };
        let mut headers = Vec::new();
        for (k, h) in m.headers.iter().enumerate() {
            let hp = format!("{at}.match.headers[{k}]");
            self.check(&format!("{hp}.name"), check_header_name(&h.name));
            let value = match &h.value {
                HeaderValueMatch::Exact(v) => Some(ValueMatcher::Exact(v.clone())),
                HeaderValueMatch::Present(p) => Some(ValueMatcher::Present(*p)),
                HeaderValueMatch::Regex(re) => self
                    .regex(&format!("{hp}.regex"), re)
                    .map(ValueMatcher::Regex),
            };
            if let Some(v) = value {
                headers.push((h.name.to_ascii_lowercase(), v));
            }
        }
        for (k, method) in m.methods.iter().enumerate() {
            let ok = !method.is_empty()
                && method.len() <= 32
                && method.chars().all(|c| c.is_ascii_uppercase());
            if !ok {
                self.err(
                    format!("{at}.match.methods[{k}]"),
                    format!("must be an upper-case HTTP method such as GET, got {method:?}"),
                );
            }
        }
        let mut total = 0u64;
        for (k, b) in r.backends.iter().enumerate() {
            let bp = format!("{at}.backends[{k}]");
            self.range(&format!("{bp}.weight"), b.weight, 0, MAX_WEIGHT);
            total += u64::from(b.weight);
            if let Some(svc) = &b.service {
                if !services.contains(svc) {
                    self.err(
                        format!("{bp}.service"),
                        format!("{svc:?} is not an outbound service of this config (want \"namespace/name\")"),
                    );
                }
            }
            for (key, value) in &b.subset {
                self.check(&format!("{bp}.subset"), check_token(key));
                self.check(&format!("{bp}.subset[{key:?}]"), check_token(value));
            }
        }
        if !r.backends.is_empty() && total == 0 {
            self.err(format!("{at}.backends"), "weights must not all be 0");
        }
        if let Some(t) = r.timeout_ms {
            self.range(&format!("{at}.timeout_ms"), t, 0, MAX_TIMEOUT_MS);
        }
        if let Some(retry) = &r.retry {
            self.retry(&format!("{at}.retry"), retry);
        }
        self.rewrite(&format!("{at}.request_headers"), &r.request_headers);
        self.rewrite(&format!("{at}.response_headers"), &r.response_headers);
        if let Some(f) = &r.fault {
            if let Some(d) = &f.delay {
                self.range(&format!("{at}.fault.delay.ms"), d.ms, 1, MAX_FAULT_DELAY_MS);
                self.percent(&format!("{at}.fault.delay.percent"), d.percent);
            }
            if let Some(a) = &f.abort {
                self.range(&format!("{at}.fault.abort.status"), a.status, 200, 599);
                self.percent(&format!("{at}.fault.abort.percent"), a.percent);
            }
        }
        if self.errors.len() != before {
            return None;
        }
        Some(RouteMatcher {
            host,
            path,
            headers,
            methods: m.methods.clone(),
        })
    }

    fn regex(&mut self, at: &str, re: &str) -> Option<Regex> {
        // Anchor: the whole path or value must match, as in Envoy's safe_regex.
        match regex::RegexBuilder::new(&format!("^(?:{re})$"))
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
        {
            Ok(r) => Some(r),
            Err(e) => {
                let first = e.to_string().lines().last().unwrap_or_default().to_owned();
                self.err(at, format!("is not a valid regular expression: {first}"));
                None
            }
        }
    }

    fn rewrite(&mut self, at: &str, r: &HeaderRewrite) {
        for (name, value) in &r.set {
            self.check(&format!("{at}.set"), check_header_name(name));
            if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                self.err(
                    format!("{at}.set[{name:?}]"),
                    "value must not contain CR, LF or NUL",
                );
            }
        }
        for (k, name) in r.remove.iter().enumerate() {
            self.check(&format!("{at}.remove[{k}]"), check_header_name(name));
        }
    }

    fn balancer(&mut self, at: &str, b: &Balancer) {
        let hashing = matches!(b.policy, BalancePolicy::RingHash | BalancePolicy::Maglev);
        match (&b.hash_on, hashing) {
            (None, true) => self.err(
                format!("{at}.hash_on"),
                "is required for ring_hash and maglev (header, cookie or source_ip)",
            ),
            (Some(_), false) => self.err(
                format!("{at}.hash_on"),
                "is only used by ring_hash and maglev; remove it or change the policy",
            ),
            (Some(HashOn::Header(h)), true) => {
                self.check(&format!("{at}.hash_on.header"), check_header_name(h))
            }
            (Some(HashOn::Cookie(c)), true)
                if c.is_empty()
                    || !c
                        .chars()
                        .all(|ch| ch.is_ascii_graphic() && !";,=".contains(ch)) =>
            {
                self.err(format!("{at}.hash_on.cookie"), "must be a cookie name");
            }
            _ => {}
        }
        self.range(
            &format!("{at}.zone_min_healthy_percent"),
            b.zone_min_healthy_percent,
            0,
            100,
        );
        if let Some(n) = b.zone_spill_min_inflight {
            self.range(&format!("{at}.zone_spill_min_inflight"), n, 1, 100_000);
        }
        if let Some(r) = b.zone_spill_ratio {
            self.range(&format!("{at}.zone_spill_ratio"), r, 1, 100);
        }
    }

    fn timeouts(&mut self, at: &str, t: &Timeouts) {
        self.range(&format!("{at}.connect_ms"), t.connect_ms, 0, MAX_TIMEOUT_MS);
        self.range(&format!("{at}.request_ms"), t.request_ms, 0, MAX_TIMEOUT_MS);
        self.range(&format!("{at}.idle_ms"), t.idle_ms, 0, MAX_TIMEOUT_MS);
    }

    fn retry(&mut self, at: &str, r: &RetryPolicy) {
        self.range(&format!("{at}.attempts"), r.attempts, 0, 10);
        self.range(
            &format!("{at}.per_try_timeout_ms"),
            r.per_try_timeout_ms,
            0,
            MAX_TIMEOUT_MS,
        );
        self.range(
            &format!("{at}.backoff_base_ms"),
            r.backoff_base_ms,
            0,
            60_000,
        );
        self.range(
            &format!("{at}.backoff_max_ms"),
            r.backoff_max_ms,
            r.backoff_base_ms,
            60_000,
        );
        self.range(&format!("{at}.budget_percent"), r.budget_percent, 0, 100);
        self.range(
            &format!("{at}.min_retries_per_second"),
            r.min_retries_per_second,
            0,
            100_000,
        );
    }

    fn outlier(&mut self, at: &str, o: &OutlierDetection) {
        self.range(
            &format!("{at}.base_ejection_ms"),
            o.base_ejection_ms,
            1,
            MAX_TIMEOUT_MS,
        );
        self.range(
            &format!("{at}.max_ejection_ms"),
            o.max_ejection_ms,
            o.base_ejection_ms,
            MAX_TIMEOUT_MS,
        );
        self.range(
            &format!("{at}.max_ejection_percent"),
            o.max_ejection_percent,
            0,
            100,
        );
    }

    fn health_check(&mut self, at: &str, h: &HealthCheck) {
        if let Some(p) = &h.http_path {
            if !p.starts_with('/') || p.bytes().any(|b| b <= b' ' || b == 0x7f) {
                self.err(
                    format!("{at}.http_path"),
                    "must start with '/' and hold no spaces or control characters",
                );
            }
        }
        self.range(
            &format!("{at}.interval_ms"),
            h.interval_ms,
            100,
            MAX_TIMEOUT_MS,
        );
        self.range(&format!("{at}.timeout_ms"), h.timeout_ms, 1, MAX_TIMEOUT_MS);
        self.range(
            &format!("{at}.healthy_threshold"),
            h.healthy_threshold,
            1,
            100,
        );
        self.range(
            &format!("{at}.unhealthy_threshold"),
            h.unhealthy_threshold,
            1,
            100,
        );
    }

    fn tls(&mut self, t: &TlsSettings, inbound: &[InboundPort]) {
        self.check("tls.trust_domain", check_dns_name(&t.trust_domain));
        if !needs_credentials(t, inbound) {
            return;
        }
        if !t.trust_bundle_pem.contains("-----BEGIN CERTIFICATE-----") {
            self.err(
                "tls.trust_bundle_pem",
                "must hold at least one PEM certificate (-----BEGIN CERTIFICATE-----)",
            );
        }
        let u = &t.csr_url;
        let bad = u.is_empty()
            || u.len() > 2048
            || u.starts_with("//")
            || u.contains("://")
            || u.split(['/', '?']).any(|seg| seg == "..")
            || u.bytes().any(|b| !b.is_ascii_graphic());
        if bad {
            self.err(
                "tls.csr_url",
                format!(
                    "must be a relative URL reference without scheme, host or '..' \
                     (e.g. \"sidemesh-proxy/certificate\"), got {u:?}"
                ),
            );
        }
    }

    fn dns(&mut self, d: &DnsSettings) {
        self.check("dns.cluster_domain", check_dns_name(&d.cluster_domain));
        for (i, u) in d.upstreams.iter().enumerate() {
            if parse_upstream(u).is_none() {
                self.err(
                    format!("dns.upstreams[{i}]"),
                    format!("must be \"ip\" or \"ip:port\" (\"[v6]:port\" for IPv6), got {u:?}"),
                );
            }
        }
        self.range("dns.ttl_seconds", d.ttl_seconds, 0, 86_400);
    }
}

/// Whether TLS settings `t` with these inbound ports need a certificate: the config's mode
/// or a port's own mode is not `disabled`.
fn needs_credentials(t: &TlsSettings, inbound: &[InboundPort]) -> bool {
    t.mode != TlsMode::Disabled
        || inbound
            .iter()
            .any(|p| p.tls_mode.is_some_and(|m| m != TlsMode::Disabled))
}

/// Parses an upstream resolver as `ip`, `ip:port` or `[v6]:port` (port 53 by default).
pub fn parse_upstream(s: &str) -> Option<SocketAddr> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return (sa.port() != 0).then_some(sa);
    }
    s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
}

/// Checks an HTTP header name (an RFC 9110 token), lower or mixed case.
fn check_header_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "must be an HTTP header name (RFC 9110 token), got {s:?}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn tls_settings_default_and_validate() {
        let mut c = base();
        c["tls"] = json!({"trust_bundle_pem": PEM, "csr_url": "sidemesh-proxy/certificate"});
        let s = Snapshot::from_json(c.to_string().as_bytes()).unwrap();
        let tls = s.config().tls.as_ref().unwrap();
        assert_eq!(tls.mode, TlsMode::Permissive);
        assert_eq!(tls.trust_domain, "cluster.local");
        // Absent means no TLS, as before the field existed.
        let s = Snapshot::from_json(base().to_string().as_bytes()).unwrap();
        assert!(s.config().tls.is_none());

        c["tls"] = json!({"mode": "strict", "trust_domain": "Bad Domain",
                          "trust_bundle_pem": "nope", "csr_url": "http://evil/x"});
        let err = Snapshot::from_json(c.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        for want in ["tls.trust_domain", "tls.trust_bundle_pem", "tls.csr_url"] {
            assert!(err.contains(want), "{want} missing in {err}");
        }
        c["tls"] = json!({"trust_bundle_pem": PEM, "csr_url": "../../other/certificate"});
        assert!(Snapshot::from_json(c.to_string().as_bytes()).is_err());
        // Disabled needs neither a bundle nor a CSR URL that works.
        c["tls"] = json!({"mode": "disabled", "trust_bundle_pem": "", "csr_url": ""});
        assert!(Snapshot::from_json(c.to_string().as_bytes()).is_ok());
        c["tls"] = json!({"mode": "sometimes", "trust_bundle_pem": PEM, "csr_url": "x"});
        assert!(Snapshot::from_json(c.to_string().as_bytes()).is_err());
    }

    #[test]
    fn tls_mode_per_inbound_port_overrides_the_configs() {
        let mut c = base();
        c["inbound"] = json!([
            {"port": 8080, "port_outer": 28080, "tls_mode": "strict"},
            {"port": 9090, "port_outer": 29090},
        ]);
        c["tls"] =
            json!({"mode": "permissive", "trust_bundle_pem": PEM, "csr_url": "x/certificate"});
        let s = parse(c.clone()).unwrap();
        assert_eq!(s.tls_mode_by_outer(OuterPort(28080)), TlsMode::Strict);
        assert_eq!(s.tls_mode_by_outer(OuterPort(29090)), TlsMode::Permissive);
        assert_eq!(s.tls_mode_by_outer(OuterPort(1)), TlsMode::Disabled);
        assert!(s.wants_tls());
        // The round trip keeps the field; an absent one stays absent.
        let back: serde_json::Value = serde_json::from_slice(&s.to_json()).unwrap();
        assert_eq!(back["inbound"][0]["tls_mode"], "strict");
        assert!(back["inbound"][1].get("tls_mode").is_none());

        // A config that disables TLS but makes one port strict still needs a certificate,
        // so the bundle and the CSR URL are checked.
        c["tls"] = json!({"mode": "disabled", "trust_bundle_pem": "", "csr_url": ""});
        let err = parse(c.clone()).unwrap_err().to_string();
        assert!(
            err.contains("tls.trust_bundle_pem") && err.contains("tls.csr_url"),
            "{err}"
        );
        c["tls"] = json!({"mode": "disabled", "trust_bundle_pem": PEM, "csr_url": "x/certificate"});
        let s = parse(c.clone()).unwrap();
        assert!(s.wants_tls());
        assert_eq!(s.tls_mode_by_outer(OuterPort(29090)), TlsMode::Disabled);
        // Only `disabled` overrides: no certificate needed.
        c["inbound"][0]["tls_mode"] = json!("disabled");
        assert!(!parse(c.clone()).unwrap().wants_tls());

        // Without `tls` a strict port fails closed and nothing wants a certificate.
        c["inbound"][0]["tls_mode"] = json!("strict");
        c.as_object_mut().unwrap().remove("tls");
        let s = parse(c.clone()).unwrap();
        assert_eq!(s.tls_mode_by_outer(OuterPort(28080)), TlsMode::Strict);
        assert!(!s.wants_tls());
        c["inbound"][0]["tls_mode"] = json!("sometimes");
        assert!(matches!(parse(c), Err(ConfigError::Parse(_))));
    }

    #[test]
    fn zone_spill_thresholds_are_optional_with_defaults_and_validated() {
        let mut c = base();
        let s = parse(c.clone()).unwrap();
        let b = &s.outbound()[0].balancer;
        assert_eq!((b.spill_min_inflight(), b.spill_ratio()), (8, 2));
        let back: serde_json::Value = serde_json::from_slice(&s.to_json()).unwrap();
        assert!(
            back["outbound"][0]["balancer"]
                .get("zone_spill_ratio")
                .is_none()
        );
        c["outbound"][0]["balancer"]["zone_spill_min_inflight"] = json!(32);
        c["outbound"][0]["balancer"]["zone_spill_ratio"] = json!(4);
        let s = parse(c.clone()).unwrap();
        let b = &s.outbound()[0].balancer;
        assert_eq!((b.spill_min_inflight(), b.spill_ratio()), (32, 4));
        c["outbound"][0]["balancer"]["zone_spill_min_inflight"] = json!(0);
        c["outbound"][0]["balancer"]["zone_spill_ratio"] = json!(101);
        let err = parse(c.clone()).unwrap_err().to_string();
        assert!(
            err.contains(
                "outbound[0].balancer.zone_spill_min_inflight: must be within 1..=100000, got 0"
            ) && err
                .contains("outbound[0].balancer.zone_spill_ratio: must be within 1..=100, got 101"),
            "{err}"
        );
        c["outbound"][0]["balancer"]["zone_spill_ratio"] = json!(-1);
        assert!(matches!(parse(c), Err(ConfigError::Parse(_))));
    }

    #[test]
    fn spiffe_ids_round_trip_and_refuse_others() {
        let id = spiffe_id("cluster.local", "shop", "web");
        assert_eq!(id, "spiffe://cluster.local/ns/shop/svc/web");
        assert_eq!(parse_spiffe_id("cluster.local", &id), Some(("shop", "web")));
        for bad in [
            "spiffe://other.domain/ns/shop/svc/web",
            "spiffe://cluster.local.evil/ns/shop/svc/web",
            "spiffe://cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/shop/svc/web/extra",
            "spiffe://cluster.local/ns/Shop/svc/web",
            "https://cluster.local/ns/shop/svc/web",
        ] {
            assert_eq!(parse_spiffe_id("cluster.local", bad), None, "{bad}");
        }
    }

    fn base() -> serde_json::Value {
        json!({
            "version": 7,
            "identity": {"namespace": "shop", "service": "web", "plugin": "sidemesh-proxy"},
            "inbound": [{"port": 8080, "port_outer": 28080, "protocol": "http1",
                         "allow_clients": ["shop/gateway", "ops/*"]}],
            "outbound": [{
                "name": "tomcat", "namespace": "shop",
                "dns_names": ["tomcat", "tomcat.shop", "tomcat.shop.svc", "tomcat.shop.svc.cluster.local"],
                "address": "127.1.0.7",
                "ports": [{"port": 8080, "protocol": "http1", "endpoints": [
                    {"address": "10.0.0.5", "port": 28080, "meshed": true, "zone": "a", "labels": {"version": "v1"}},
                    {"address": "10.0.0.6", "port": 8080, "weight": 50}
                ]}],
                "routes": [{
                    "name": "api",
                    "match": {"path": {"prefix": "/api"}, "headers": [{"name": "x-canary", "exact": "1"}], "methods": ["GET"]},
                    "backends": [{"subset": {"version": "v1"}, "weight": 9000}, {"weight": 1000}]
                }],
                "balancer": {"policy": "ring_hash", "hash_on": {"header": "x-user"}},
                "outlier_detection": {}
            }],
            "dns": {"upstreams": ["10.0.0.10", "10.0.0.11:5353"]},
            "plugin": {"variables": {"SECRET": "hunter2"}}
        })
    }

    fn parse(v: serde_json::Value) -> Result<Snapshot, ConfigError> {
        Snapshot::from_json(v.to_string().as_bytes())
    }

    fn errors(v: serde_json::Value) -> Vec<String> {
        match parse(v) {
            Err(ConfigError::Invalid(e)) => e.0.iter().map(ToString::to_string).collect(),
            Err(e) => vec![format!("parse: {e}")],
            Ok(_) => vec![],
        }
    }

    #[test]
    fn valid_config_is_indexed() {
        let s = parse(base()).unwrap();
        assert_eq!(s.version(), 7);
        assert_eq!(
            s.resolve("tomcat.shop.svc.cluster.local"),
            Some(Ipv4Addr::new(127, 1, 0, 7))
        );
        assert_eq!(s.resolve("other"), None);
        let (i, svc) = s.outbound_by_address(Ipv4Addr::new(127, 1, 0, 7)).unwrap();
        assert_eq!((i, svc.name.as_str()), (0, "tomcat"));
        assert!(s.outbound_by_name("shop", "tomcat").is_some());
        assert_eq!(
            s.inbound_by_outer(OuterPort(28080)).unwrap().port.get(),
            8080
        );
        assert_eq!(s.config().outbound[0].ports[0].endpoints[0].weight, 100);
    }

    #[test]
    fn route_matching() {
        let s = parse(base()).unwrap();
        let m = &s.route_matchers(0)[0];
        let canary = |n: &str| (n == "x-canary").then_some("1");
        assert!(m.matches("GET", Some("tomcat"), "/api/users", canary));
        assert!(m.matches("GET", None, "/api", canary));
        assert!(!m.matches("GET", None, "/apix", canary));
        assert!(!m.matches("POST", None, "/api", canary));
        assert!(!m.matches("GET", None, "/api", |_| None));
    }

    #[test]
    fn allow_clients() {
        let s = parse(base()).unwrap();
        let p = &s.inbound()[0];
        assert!(Snapshot::client_allowed(p, Some("shop/gateway")));
        assert!(Snapshot::client_allowed(p, Some("ops/anything")));
        assert!(!Snapshot::client_allowed(p, Some("shop/other")));
        assert!(!Snapshot::client_allowed(p, None));
    }

    #[test]
    fn inbound_service_port_is_optional_and_checked() {
        let s = parse(base()).unwrap();
        assert_eq!(s.inbound()[0].service_port, None);
        let mut v = base();
        v["inbound"][0]["service_port"] = json!(80);
        assert_eq!(
            parse(v.clone()).unwrap().inbound()[0]
                .service_port
                .map(|p| p.get()),
            Some(80)
        );
        v["inbound"][0]["service_port"] = json!(0);
        let e = errors(v);
        assert!(
            e.iter()
                .any(|x| x.starts_with("inbound[0].service_port: must be within")),
            "{e:?}"
        );
    }

    #[test]
    fn outbound_address_v6_is_optional_and_unicast() {
        let mut v = base();
        assert_eq!(parse(v.clone()).unwrap().outbound()[0].address_v6, None);
        v["outbound"][0]["address_v6"] = json!("::ffff:127.1.0.7");
        let s = parse(v.clone()).unwrap();
        assert_eq!(
            s.outbound()[0].address_v6,
            Some("::ffff:127.1.0.7".parse().unwrap())
        );
        for bad in ["::", "ff02::1"] {
            v["outbound"][0]["address_v6"] = json!(bad);
            let e = errors(v.clone());
            assert!(
                e.iter()
                    .any(|x| x.starts_with("outbound[0].address_v6: must be a unicast")),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let mut v = base();
        v["outbound"][0]["bogus"] = json!(1);
        let e = errors(v);
        assert!(e[0].contains("unknown field `bogus`"), "{e:?}");
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = base();
        v["outbound"][0]["routes"][0]["backends"][0]["weight"] = json!(20000);
        v["outbound"][0]["address"] = json!("10.0.0.1");
        v["inbound"][0]["port_outer"] = json!(8080);
        v["outbound"][0]["routes"][0]["match"]["path"] = json!({"regex": "("});
        v["dns"]["upstreams"][0] = json!("nope");
        let e = errors(v);
        let want = [
            "outbound[0].routes[0].backends[0].weight: must be within 0..=10000, got 20000",
            "outbound[0].address: must be a loopback address",
            "inbound[0].port_outer: port_outer 8080 collides with an app port",
            "outbound[0].routes[0].match.path.regex: is not a valid regular expression",
            "dns.upstreams[0]: must be",
        ];
        for w in want {
            assert!(
                e.iter().any(|x| x.starts_with(w)),
                "missing {w:?} in {e:#?}"
            );
        }
    }

    #[test]
    fn route_faults_are_checked() {
        let mut v = base();
        v["outbound"][0]["routes"][0]["fault"] = json!({
            "delay": {"ms": 100, "percent": 12.5},
            "abort": {"status": 503, "percent": 100},
        });
        let s = parse(v.clone()).unwrap();
        let f = s.outbound()[0].routes[0].fault.clone().unwrap();
        assert_eq!(f.delay.map(|d| (d.ms, d.percent)), Some((100, 12.5)));
        v["outbound"][0]["routes"][0]["fault"] = json!({
            "delay": {"ms": 0, "percent": 101},
            "abort": {"status": 99, "percent": -1},
        });
        let e = errors(v);
        for w in [
            "outbound[0].routes[0].fault.delay.ms: must be within 1..=3600000, got 0",
            "outbound[0].routes[0].fault.delay.percent: must be a percentage within 0..=100, got 101",
            "outbound[0].routes[0].fault.abort.status: must be within 200..=599, got 99",
            "outbound[0].routes[0].fault.abort.percent: must be a percentage within 0..=100, got -1",
        ] {
            assert!(e.iter().any(|x| x == w), "missing {w:?} in {e:#?}");
        }
    }

    #[test]
    fn duplicates_and_references() {
        let mut v = base();
        let svc = v["outbound"][0].clone();
        v["outbound"].as_array_mut().unwrap().push(svc);
        v["outbound"][0]["routes"][0]["backends"][1]["service"] = json!("shop/missing");
        let e = errors(v);
        assert!(
            e.iter()
                .any(|x| x.starts_with("outbound[1].address: 127.1.0.7 is already")),
            "{e:#?}"
        );
        assert!(
            e.iter().any(|x| x.starts_with("outbound[1].dns_names[0]")),
            "{e:#?}"
        );
        assert!(
            e.iter()
                .any(|x| x.starts_with("outbound[0].routes[0].backends[1].service")),
            "{e:#?}"
        );
    }

    #[test]
    fn hash_policy_needs_hash_on() {
        let mut v = base();
        v["outbound"][0]["balancer"] = json!({"policy": "maglev"});
        assert!(errors(v)[0].starts_with("outbound[0].balancer.hash_on: is required"));
    }

    #[test]
    fn secrets_stay_out_of_errors_and_debug() {
        let mut v = base();
        v["plugin"]["variables"]["BAD NAME"] = json!("hunter2");
        let e = errors(v).join("\n");
        assert!(e.contains("plugin.variables[\"BAD NAME\"]"));
        assert!(!e.contains("hunter2"));
        let s = parse(base()).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn names_with_slashes_and_control_characters_are_rejected() {
        let mut v = base();
        v["identity"]["service"] = json!("../etc");
        v["outbound"][0]["name"] = json!("a\u{7}b");
        let e = errors(v);
        assert!(
            e.iter().any(|x| x.starts_with("identity.service")),
            "{e:#?}"
        );
        assert!(
            e.iter()
                .any(|x| x.starts_with("outbound[0].name") && x.contains("U+0007")),
            "{e:#?}"
        );
    }

    #[test]
    fn json_round_trip() {
        let s = parse(base()).unwrap();
        let again = Snapshot::from_json(&s.to_json()).unwrap();
        assert_eq!(again.config(), s.config());
    }
}
