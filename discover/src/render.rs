//! Rendering: a [`ClusterState`] (with registry instances already merged in) plus the
//! loopback [`AddressTable`] becomes one sidecar's [`SidecarConfig`], scoped to what that
//! workload uses: its own inbound ports and the services it depends on, never the whole
//! cluster.
//!
//! Rendering is pure and total: a rendered config always passes
//! [`Snapshot::try_from`]. A dependency whose policies the contract rejects (a bad route
//! regex, say) is dropped from the config and reported in [`Rendered::dropped`], so one
//! bad dependency never takes a workload's other dependencies down with it; the state file
//! loader turns those reports into errors before a bad file is ever applied.

use std::collections::{BTreeSet, HashMap};

use sidemesh_api::config::{
    DnsSettings, Endpoint, Identity, InboundPort, OutboundPort, OutboundService, PluginSettings,
    TlsMode,
};
use sidemesh_api::state::{BUILTIN_NETPROXY, ClusterState, Dependency, Service};
use sidemesh_api::{SidecarConfig, Snapshot, ValidationError};

use crate::addresses::AddressTable;

/// A sidecar: `(namespace, service, plugin)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SidecarKey {
    /// The workload's namespace.
    pub namespace: String,
    /// The workload's service.
    pub service: String,
    /// The plugin the config is for.
    pub plugin: String,
}

impl std::fmt::Display for SidecarKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.service, self.plugin)
    }
}

/// Why a sidecar has no config.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// No such service.
    #[error("unknown service {namespace}/{service}: it is in no state source")]
    UnknownService {
        /// The namespace asked for.
        namespace: String,
        /// The service asked for.
        service: String,
    },
    /// The service exists but does not have that plugin attached.
    #[error("service {namespace}/{service} has no plugin {plugin:?} attached (it has: {attached})")]
    UnknownPlugin {
        /// The namespace asked for.
        namespace: String,
        /// The service asked for.
        service: String,
        /// The plugin asked for.
        plugin: String,
        /// The plugins it does have, comma-separated.
        attached: String,
    },
    /// Even with every dependency dropped the config is invalid: the service's own
    /// definition is broken (only possible for a state that skipped [`ClusterState::check`]).
    #[error("service {key} cannot be rendered: {message}")]
    Invalid {
        /// The sidecar.
        key: String,
        /// The contract's complaint.
        message: String,
    },
}

/// A rendered config and what had to be left out of it.
#[derive(Clone, Debug)]
pub struct Rendered {
    /// The config, with version 0 (the store assigns versions).
    pub config: SidecarConfig,
    /// Problems that made parts of the state be left out, with paths relative to the
    /// service (`use_services[1].routes[0].match.path.regex: ...`).
    pub dropped: Vec<ValidationError>,
}

/// An index over a cluster state, built once per state change so that rendering every
/// sidecar is linear, not quadratic, in the number of services.
#[derive(Debug)]
pub struct Cluster<'a> {
    state: &'a ClusterState,
    by_key: HashMap<(&'a str, &'a str), &'a Service>,
}

impl<'a> Cluster<'a> {
    /// Indexes `state`. When a service appears twice, the first one wins.
    pub fn new(state: &'a ClusterState) -> Cluster<'a> {
        let mut by_key = HashMap::with_capacity(state.services.len());
        for s in &state.services {
            by_key
                .entry((s.namespace.as_str(), s.name.as_str()))
                .or_insert(s);
        }
        Cluster { state, by_key }
    }

    /// The indexed state.
    pub fn state(&self) -> &'a ClusterState {
        self.state
    }

    /// The service `namespace/name`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&'a Service> {
        self.by_key.get(&(namespace, name)).copied()
    }

    /// Every sidecar that has a config: each service with the built-in netproxy plugin and
    /// each plugin attached to it.
    pub fn sidecars(&self) -> impl Iterator<Item = SidecarKey> + '_ {
        self.by_key.values().flat_map(|s| {
            plugin_names(s).into_iter().map(move |p| SidecarKey {
                namespace: s.namespace.clone(),
                service: s.name.clone(),
                plugin: p.to_owned(),
            })
        })
    }

    /// The sidecars of one service: the built-in netproxy and each attached plugin.
    pub fn sidecars_of<'s>(&self, s: &'s Service) -> impl Iterator<Item = SidecarKey> + 's {
        plugin_names(s).into_iter().map(move |p| SidecarKey {
            namespace: s.namespace.clone(),
            service: s.name.clone(),
            plugin: p.to_owned(),
        })
    }

    /// Renders the config of `key`.
    pub fn render(
        &self,
        key: &SidecarKey,
        addresses: &AddressTable,
    ) -> Result<Rendered, RenderError> {
        let svc = self.service(&key.namespace, &key.service).ok_or_else(|| {
            RenderError::UnknownService {
                namespace: key.namespace.clone(),
                service: key.service.clone(),
            }
        })?;
        let plugins = plugin_names(svc);
        if !plugins.contains(key.plugin.as_str()) {
            return Err(RenderError::UnknownPlugin {
                namespace: key.namespace.clone(),
                service: key.service.clone(),
                plugin: key.plugin.clone(),
                attached: plugins.into_iter().collect::<Vec<_>>().join(", "),
            });
        }
        let mut dropped = Vec::new();
        let dns = self.state.dns.clone();
        // Each outbound service with where it came from, for error paths.
        let mut outbound: Vec<(String, OutboundService)> = Vec::new();
        let mut seen = BTreeSet::new();
        for (j, dep) in svc.use_services.iter().enumerate() {
            let (ns, name) = dep.target(&svc.namespace);
            if !seen.insert((ns.to_owned(), name.to_owned())) {
                continue;
            }
            let origin = format!("use_services[{j}]");
            match self.outbound(svc, ns, name, Some(dep), addresses, &dns) {
                Ok(o) => outbound.push((origin, o)),
                Err(message) => dropped.push(ValidationError {
                    path: format!("{origin}.service"),
                    message,
                }),
            }
        }
        // Services that routes split traffic to (a canary on another service) come along,
        // with default policies, even when they are not listed in use_services.
        let mut extra = Vec::new();
        for (origin, o) in &outbound {
            for (r, route) in o.routes.iter().enumerate() {
                for (b, backend) in route.backends.iter().enumerate() {
                    let Some(target) = &backend.service else {
                        continue;
                    };
                    let Some((ns, name)) = target.split_once('/') else {
                        continue; // the contract validator reports the malformed name
                    };
                    if seen.insert((ns.to_owned(), name.to_owned())) {
                        let at = format!("{origin}.routes[{r}].backends[{b}].service");
                        extra.push((at, ns.to_owned(), name.to_owned()));
                    }
                }
            }
        }
        for (at, ns, name) in extra {
            match self.outbound(svc, &ns, &name, None, addresses, &dns) {
                Ok(o) => outbound.push((at, o)),
                Err(message) => dropped.push(ValidationError { path: at, message }),
            }
        }

        let inbound: Vec<InboundPort> = svc
            .ports
            .iter()
            .filter_map(|p| {
                Some(InboundPort {
                    port: p.app_port(),
                    port_outer: p.port_outer?,
                    service_port: Some(p.port),
                    protocol: p.protocol,
                    allow_clients: svc.allow_clients.clone(),
                    timeouts: svc.inbound_timeouts.clone(),
                    limits: svc.inbound_limits.clone(),
                    tls_mode: p.tls_mode,
                })
            })
            .collect();
        let mut variables = self
            .state
            .plugin(&key.plugin)
            .map(|p| p.variables.clone())
            .unwrap_or_default();
        if let Some(a) = svc.plugins.iter().find(|a| a.name == key.plugin) {
            variables.extend(a.variables.clone());
        }
        let mut config = SidecarConfig {
            version: 0,
            identity: Identity {
                namespace: svc.namespace.clone(),
                service: svc.name.clone(),
                plugin: key.plugin.clone(),
                pod: None,
                zone: None,
            },
            inbound,
            outbound: Vec::new(),
            dns,
            plugin: PluginSettings { variables },
            // Discover's identity authority adds the TLS settings when it serves the config.
            tls: None,
        };
        finish(key, &mut config, outbound, &mut dropped)?;
        Ok(Rendered { config, dropped })
    }

    /// One dependency as the caller sees it, or why it cannot be used.
    fn outbound(
        &self,
        caller: &Service,
        ns: &str,
        name: &str,
        dep: Option<&Dependency>,
        addresses: &AddressTable,
        dns: &DnsSettings,
    ) -> Result<OutboundService, String> {
        let target = self
            .service(ns, name)
            .ok_or_else(|| format!("unknown service {ns}/{name}: it is in no state source"))?;
        if target.ports.is_empty() {
            return Err(format!("service {ns}/{name} has no ports"));
        }
        let address = addresses
            .get(ns, name)
            .ok_or_else(|| format!("service {ns}/{name} has no loopback address yet"))?;
        let mut dns_names = Vec::with_capacity(4);
        // The bare name resolves only inside the caller's namespace, as with Kubernetes
        // search paths; so two namespaces' `db` never collide in one config.
        if ns == caller.namespace {
            dns_names.push(name.to_owned());
        }
        dns_names.push(format!("{name}.{ns}"));
        dns_names.push(format!("{name}.{ns}.svc"));
        let domain = dns.cluster_domain.trim_end_matches('.');
        if !domain.is_empty() {
            dns_names.push(format!("{name}.{ns}.svc.{domain}"));
        }
        let ports = target
            .ports
            .iter()
            .map(|p| OutboundPort {
                port: p.port,
                protocol: p.protocol,
                endpoints: target
                    .instances
                    .iter()
                    .filter_map(|inst| {
                        let port = match inst.ports.iter().find(|ip| ip.port == p.port) {
                            Some(ip) => ip.target,
                            None if !inst.ports.is_empty() => return None,
                            None if inst.meshed => p.port_outer?.get(),
                            None => p.app_port().get(),
                        };
                        Some(Endpoint {
                            address: inst.address,
                            port,
                            weight: inst.weight,
                            zone: inst.zone.clone(),
                            // A port whose sidecars take no TLS must be dialled in
                            // plaintext: to its callers the hop is not upgradable.
                            meshed: inst.meshed && p.tls_mode != Some(TlsMode::Disabled),
                            labels: inst.labels.clone(),
                        })
                    })
                    .collect(),
            })
            .collect();
        let d = dep.cloned().unwrap_or_else(|| Dependency {
            service: format!("{ns}/{name}"),
            routes: Vec::new(),
            balancer: Default::default(),
            timeouts: Default::default(),
            retry: Default::default(),
            limits: Default::default(),
            outlier_detection: None,
            health_check: None,
        });
        Ok(OutboundService {
            name: name.to_owned(),
            namespace: ns.to_owned(),
            dns_names,
            address,
            // The IPv4-mapped form: an app that asks AAAA and dials it from a dual-stack
            // socket reaches the same outbound listener over IPv4 (RFC 4291 §2.5.5.2).
            address_v6: Some(address.to_ipv6_mapped()),
            ports,
            routes: d.routes,
            balancer: d.balancer,
            timeouts: d.timeouts,
            retry: d.retry,
            limits: d.limits,
            outlier_detection: d.outlier_detection,
            health_check: d.health_check,
        })
    }
}

/// The plugin names a service has configs for: the built-in netproxy and its attachments.
fn plugin_names(s: &Service) -> BTreeSet<&str> {
    let mut names: BTreeSet<&str> = s.plugins.iter().map(|a| a.name.as_str()).collect();
    names.insert(BUILTIN_NETPROXY);
    names
}

/// Puts `outbound` into `config`, dropping the dependencies the contract rejects until it
/// accepts the config. Bounded: each round drops at least one dependency, or ends.
fn finish(
    key: &SidecarKey,
    config: &mut SidecarConfig,
    mut outbound: Vec<(String, OutboundService)>,
    dropped: &mut Vec<ValidationError>,
) -> Result<(), RenderError> {
    loop {
        config.outbound = outbound.iter().map(|(_, o)| o.clone()).collect();
        let errors = match Snapshot::try_from(config.clone()) {
            Ok(_) => return Ok(()),
            Err(e) => e.0,
        };
        let mut bad = BTreeSet::new();
        let mut other = Vec::new();
        for e in errors {
            match outbound_index(&e.path) {
                Some((i, rest)) if i < outbound.len() => {
                    bad.insert(i);
                    dropped.push(ValidationError {
                        path: format!("{}{rest}", outbound[i].0),
                        message: e.message,
                    });
                }
                _ => other.push(e),
            }
        }
        if bad.is_empty() {
            // Not a dependency's fault: the service itself (or the DNS settings) is bad.
            let message = other
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            return Err(RenderError::Invalid {
                key: key.to_string(),
                message,
            });
        }
        let mut i = 0;
        outbound.retain(|_| {
            let keep = !bad.contains(&i);
            i += 1;
            keep
        });
    }
}

/// Splits `outbound[3].routes[0]...` into `(3, ".routes[0]...")`.
fn outbound_index(path: &str) -> Option<(usize, &str)> {
    let rest = path.strip_prefix("outbound[")?;
    let end = rest.find(']')?;
    let i = rest[..end].parse().ok()?;
    Some((i, &rest[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidemesh_api::state::Instance;

    fn state(yaml: &str) -> ClusterState {
        serde_norway::from_str(yaml).unwrap()
    }

    fn key(ns: &str, svc: &str, plugin: &str) -> SidecarKey {
        SidecarKey {
            namespace: ns.into(),
            service: svc.into(),
            plugin: plugin.into(),
        }
    }

    fn table(s: &ClusterState) -> AddressTable {
        let mut t = AddressTable::default();
        t.sync(
            s.services
                .iter()
                .map(|s| (s.namespace.as_str(), s.name.as_str())),
        );
        t
    }

    const DEMO: &str = r#"
services:
  - namespace: demo
    name: web
    ports: [{port: 80, target_port: 8000, port_outer: 18000, protocol: http1}]
    allow_clients: ["demo/*"]
    use_services:
      - service: backend
        routes:
          - name: canary
            backends: [{weight: 9000}, {service: demo/backend-v2, weight: 1000}]
      - service: other/db
    plugins: [{name: logger, variables: {LEVEL: debug}}]
  - namespace: demo
    name: backend
    ports: [{port: 8080, port_outer: 18080, protocol: http1}]
    instances:
      - {address: 127.0.0.11, meshed: true}
      - {address: 127.0.0.12, meshed: true, zone: a}
  - namespace: demo
    name: backend-v2
    ports: [{port: 8080}]
    instances: [{address: 127.0.0.13, labels: {version: v2}}]
  - namespace: other
    name: db
    ports: [{port: 5432, protocol: tcp}]
    instances: [{address: 10.0.0.5, ports: [{port: 5432, target: 6432}]}]
  - namespace: other
    name: unused
    ports: [{port: 1}]
plugins:
  - {name: logger, kind: sidecar, variables: {LEVEL: info, FORMAT: json}}
"#;

    /// The proxy config of `demo/<service>` from a state that must be valid.
    fn checked_render(s: &ClusterState, service: &str) -> Rendered {
        s.check().unwrap();
        Cluster::new(s)
            .render(&key("demo", service, "sidemesh-proxy"), &table(s))
            .unwrap()
    }

    #[test]
    fn port_tls_mode_of_the_state_reaches_the_inbound_port() {
        let s = state(
            r#"
services:
  - namespace: demo
    name: web
    ports:
      - {port: 80, target_port: 8000, port_outer: 18000, tls_mode: disabled}
      - {port: 81, target_port: 8001, port_outer: 18001, tls_mode: strict}
      - {port: 82, target_port: 8002, port_outer: 18002}
    instances: [{address: 10.0.0.1, meshed: true}]
  - namespace: demo
    name: client
    use_services: [{service: web}]
"#,
        );
        let r = checked_render(&s, "web");
        let modes: Vec<_> = r.config.inbound.iter().map(|p| p.tls_mode).collect();
        assert_eq!(
            modes,
            [Some(TlsMode::Disabled), Some(TlsMode::Strict), None]
        );
        // Callers dial a port whose sidecars take no TLS in plaintext (not `meshed`), still
        // at its port_outer; the other ports of the same instance stay meshed.
        let r = checked_render(&s, "client");
        let eps: Vec<_> = r.config.outbound[0]
            .ports
            .iter()
            .map(|p| (p.endpoints[0].port, p.endpoints[0].meshed))
            .collect();
        assert_eq!(eps, [(18000, false), (18001, true), (18002, true)]);
        let bad: Result<ClusterState, _> = serde_norway::from_str(
            "services: [{namespace: demo, name: web, ports: [{port: 80, tls_mode: loose}]}]",
        );
        assert!(bad.is_err(), "an unknown mode is refused");
    }

    #[test]
    fn renders_only_what_the_workload_uses() {
        let s = state(DEMO);
        s.check().unwrap();
        let c = Cluster::new(&s);
        let t = table(&s);
        let r = c.render(&key("demo", "web", "sidemesh-proxy"), &t).unwrap();
        assert!(r.dropped.is_empty(), "{:?}", r.dropped);
        let cfg = &r.config;
        assert_eq!(cfg.inbound.len(), 1);
        assert_eq!(cfg.inbound[0].port.get(), 8000);
        assert_eq!(cfg.inbound[0].port_outer.get(), 18000);
        assert_eq!(cfg.inbound[0].service_port.map(|p| p.get()), Some(80));
        assert_eq!(
            cfg.inbound[0].allow_clients.as_deref(),
            Some(&["demo/*".to_owned()][..])
        );
        let names: Vec<String> = cfg
            .outbound
            .iter()
            .map(|o| format!("{}/{}", o.namespace, o.name))
            .collect();
        assert_eq!(names, ["demo/backend", "other/db", "demo/backend-v2"]);
        let backend = &cfg.outbound[0];
        assert_eq!(
            backend.address_v6,
            Some(backend.address.to_ipv6_mapped()),
            "AAAA answers the IPv4-mapped address"
        );
        assert_eq!(
            backend.dns_names,
            [
                "backend",
                "backend.demo",
                "backend.demo.svc",
                "backend.demo.svc.cluster.local"
            ]
        );
        let eps = &backend.ports[0].endpoints;
        assert_eq!(eps.len(), 2);
        assert!(eps.iter().all(|e| e.port == 18080 && e.meshed));
        // Other namespace: no bare name; explicit instance port wins.
        let db = &cfg.outbound[1];
        assert_eq!(db.dns_names[0], "db.other");
        assert_eq!(db.ports[0].endpoints[0].port, 6432);
        // Unmeshed instances are dialled on the app port.
        assert_eq!(cfg.outbound[2].ports[0].endpoints[0].port, 8080);
        assert!(cfg.plugin.variables.is_empty());
        Snapshot::try_from(cfg.clone()).unwrap();
    }

    #[test]
    fn plugin_variables_merge_and_unknown_plugins_are_404() {
        let s = state(DEMO);
        let c = Cluster::new(&s);
        let t = table(&s);
        let r = c.render(&key("demo", "web", "logger"), &t).unwrap();
        let v = &r.config.plugin.variables;
        assert_eq!(v["LEVEL"], "debug");
        assert_eq!(v["FORMAT"], "json");
        let e = c.render(&key("demo", "web", "nope"), &t).unwrap_err();
        assert!(e.to_string().contains("logger, sidemesh-proxy"), "{e}");
        let e = c.render(&key("demo", "ghost", "logger"), &t).unwrap_err();
        assert!(matches!(e, RenderError::UnknownService { .. }));
        let mut keys: Vec<String> = c.sidecars().map(|k| k.to_string()).collect();
        keys.sort();
        assert_eq!(keys.len(), 6);
        assert!(keys.contains(&"demo/web/logger".to_owned()));
    }

    #[test]
    fn a_bad_dependency_is_dropped_and_reported() {
        let mut s = state(DEMO);
        s.services[0].use_services[0].routes[0].matches.path =
            Some(sidemesh_api::config::PathMatch::Regex("(".into()));
        let ghost = Dependency {
            service: "ghost".into(),
            ..s.services[0].use_services[1].clone()
        };
        s.services[0].use_services.push(ghost);
        let c = Cluster::new(&s);
        let t = table(&s);
        let r = c.render(&key("demo", "web", "sidemesh-proxy"), &t).unwrap();
        let names: Vec<&str> = r.config.outbound.iter().map(|o| o.name.as_str()).collect();
        // backend is dropped (bad regex); the other dependencies stay.
        assert!(!names.contains(&"backend"), "{names:?}");
        assert!(names.contains(&"db"));
        let dropped: Vec<String> = r.dropped.iter().map(|e| e.to_string()).collect();
        assert!(
            dropped
                .iter()
                .any(|e| e.starts_with("use_services[0].routes[0].match.path.regex")),
            "{dropped:?}"
        );
        assert!(
            dropped
                .iter()
                .any(|e| e.starts_with("use_services[2].service: unknown service demo/ghost")),
            "{dropped:?}"
        );
        Snapshot::try_from(r.config).unwrap();
    }

    #[test]
    fn every_sidecar_of_a_random_state_renders_valid() {
        // A deterministic pseudo-random state with shared ports, cross-namespace
        // dependencies, meshed and unmeshed instances, and missing targets.
        let mut seed = 0x9e37_79b9_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut s = ClusterState::default();
        for i in 0..60 {
            let ns = format!("ns{}", next(3));
            let port = 80 + next(3) as u16;
            let meshed = next(2) == 0;
            let mut svc: Service = serde_json::from_value(serde_json::json!({
                "namespace": ns, "name": format!("s{i}"),
                "ports": [{"port": port, "port_outer": 20000 + port}],
            }))
            .unwrap();
            for k in 0..next(4) {
                svc.instances.push(Instance {
                    name: None,
                    address: format!("10.0.{i}.{}", k + 1).parse().unwrap(),
                    ports: vec![],
                    meshed,
                    zone: None,
                    labels: Default::default(),
                    weight: 100,
                });
            }
            for _ in 0..next(5) {
                let dep = format!("ns{}/s{}", next(3), next(70));
                if svc.use_services.iter().any(|d| d.service == dep) {
                    continue;
                }
                svc.use_services
                    .push(serde_json::from_value(serde_json::json!({"service": dep})).unwrap());
            }
            s.services.push(svc);
        }
        let c = Cluster::new(&s);
        let t = table(&s);
        let keys: Vec<SidecarKey> = c.sidecars().collect();
        assert_eq!(keys.len(), 60);
        for k in keys {
            let r = c.render(&k, &t).unwrap();
            Snapshot::try_from(r.config).unwrap();
        }
    }
}
