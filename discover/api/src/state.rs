//! The cluster-state model: the whole cluster as discover sees it, independent of where it
//! came from (the YAML state file, the Kubernetes controller, the TTL registry).
//!
//! A [`ClusterState`] lists services (ports, static instances, the services each one uses
//! with per-dependency routes and policies, `allow_clients`, attached plugins), plugin
//! definitions and DNS settings. Discover renders one [`crate::SidecarConfig`] per
//! `(namespace, service, plugin)` out of it, scoped to what that workload uses.
//!
//! The YAML state file *is* this model (every struct rejects unknown fields), documented
//! field by field in `docs/state-file.md`. The policy types (`Route`, `Balancer`,
//! `Timeouts`, ...) are the contract's own, so what a user writes here is what the sidecar
//! receives. [`ClusterState::check`] finds structural problems (names, duplicates, ports),
//! each with a field path such as `services[2].ports[0].port_outer`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::config::{
    Balancer, DnsSettings, HealthCheck, Limits, OutlierDetection, Protocol, RetryPolicy, Route,
    Timeouts, TlsMode,
};
use crate::name::{check_client, check_label, check_token};
use crate::port::{AppPort, OuterPort, ServicePort};
use crate::snapshot::{MAX_WEIGHT, ValidationError, ValidationErrors};

/// The name of the built-in network-proxy plugin. Every service has it, declared or not,
/// so `GET /v1/sidecars/{ns}/{svc}/sidemesh-proxy` always answers for a known service.
pub const BUILTIN_NETPROXY: &str = "sidemesh-proxy";

/// The whole cluster, as one value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterState {
    /// DNS settings handed to every sidecar (cluster domain, upstream resolvers, TTL).
    #[serde(default)]
    pub dns: DnsSettings,
    /// Plugin definitions that services attach by name.
    #[serde(default)]
    pub plugins: Vec<Plugin>,
    /// Every service of the cluster.
    #[serde(default)]
    pub services: Vec<Service>,
}

/// A service: a named set of instances serving the same ports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// The namespace (a DNS label).
    pub namespace: String,
    /// The service name (a DNS label), unique within its namespace.
    pub name: String,
    /// The ports the service serves.
    #[serde(default)]
    pub ports: Vec<ServicePortSpec>,
    /// Static instances. The TTL registry (and the controller) add more.
    #[serde(default)]
    pub instances: Vec<Instance>,
    /// The services this one calls (LAIN's `use_services`), with routes and policies per
    /// dependency. A workload's sidecar only learns about these.
    #[serde(default)]
    pub use_services: Vec<Dependency>,
    /// Clients allowed to call this service, as `namespace/service` or `namespace/*`.
    /// Absent means everyone; an empty list means no one (LAIN's `allow_clients`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_clients: Option<Vec<String>>,
    /// Timeouts of the inbound sidecar towards the app.
    #[serde(default)]
    pub inbound_timeouts: Timeouts,
    /// Limits on traffic into the app.
    #[serde(default)]
    pub inbound_limits: Limits,
    /// Plugins attached to this service, with this service's values of their variables.
    /// The built-in [`BUILTIN_NETPROXY`] is always attached; list it to give it variables.
    #[serde(default)]
    pub plugins: Vec<PluginAttachment>,
}

/// One port of a service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePortSpec {
    /// The port clients dial (on the service's loopback address, through their sidecar).
    pub port: ServicePort,
    /// The port the app listens on inside each instance (default: `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<AppPort>,
    /// The remapped port a meshed instance's sidecar listens on for this port; other
    /// sidecars dial `instance:port_outer`. Required when any instance is meshed and does
    /// not list its ports itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_outer: Option<OuterPort>,
    /// The protocol spoken on this port.
    #[serde(default)]
    pub protocol: Protocol,
    /// An optional name (a DNS label), e.g. `http`, as Kubernetes port names go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The TLS mode of the instances' sidecars on this port, overriding discover's
    /// `--mesh-tls` (becomes `inbound[].tls_mode` of the contract). Absent: discover's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_mode: Option<TlsMode>,
}

impl ServicePortSpec {
    /// The app's port inside an instance.
    pub fn app_port(&self) -> AppPort {
        self.target_port.unwrap_or(AppPort(self.port.get()))
    }
}

/// One instance (pod, process, VM) of a service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    /// The instance name (a pod name, a registry key), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The instance's IP address.
    pub address: IpAddr,
    /// Which port to dial on this instance for each service port. Empty means: for every
    /// service port, its `port_outer` when `meshed`, else its `target_port`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<InstancePort>,
    /// Whether a sidemesh sidecar fronts this instance.
    #[serde(default)]
    pub meshed: bool,
    /// The instance's zone, for zone-aware balancing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Labels (e.g. `version: v2`) that route backends select subsets by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Relative weight, 1..=10000 (default 100).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    100
}

/// The port to dial on one instance for one service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstancePort {
    /// The service port this entry is for.
    pub port: ServicePort,
    /// The port to dial on the instance (its sidecar's `port_outer` when meshed).
    pub target: u16,
}

/// One service that a service uses, with the policies its callers apply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dependency {
    /// The service used: `name` (same namespace) or `namespace/name`.
    pub service: String,
    /// HTTP routes, tried in order (the contract's [`Route`]). A route backend may name
    /// another service as `namespace/name` (a canary split); that service is then added to
    /// the caller's config too.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Load balancing.
    #[serde(default)]
    pub balancer: Balancer,
    /// Connect, request and idle timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// The retry policy.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Circuit-breaker limits.
    #[serde(default)]
    pub limits: Limits,
    /// Passive outlier detection; absent means off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Active health checking; absent means off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

impl Dependency {
    /// The `(namespace, name)` this dependency points at, `namespace` being the caller's.
    pub fn target<'a>(&'a self, namespace: &'a str) -> (&'a str, &'a str) {
        match self.service.split_once('/') {
            Some((ns, name)) => (ns, name),
            None => (namespace, self.service.as_str()),
        }
    }
}

/// What a plugin is (Rainbond's plugin kinds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginKind {
    /// A container beside the app for the pod's whole life.
    #[default]
    Sidecar,
    /// An init container that runs to completion before the app starts.
    Init,
    /// The network proxy that owns the pod's traffic (sidemesh's own sidecar).
    Netproxy,
}

/// A plugin definition.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plugin {
    /// The plugin name (a DNS label); it is the `{plugin}` segment of `DISCOVER_URL`.
    pub name: String,
    /// The kind.
    #[serde(default)]
    pub kind: PluginKind,
    /// The container image, for injection (not used by discover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Default variables; a service's attachment overrides them one by one. Never logged.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Variables may hold secrets: show their names only.
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("image", &self.image)
            .field("variables", &self.variables.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A plugin attached to a service.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginAttachment {
    /// The plugin's name, as defined in [`ClusterState::plugins`] (or [`BUILTIN_NETPROXY`]).
    pub name: String,
    /// This service's values of the plugin's variables. Never logged.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
}

impl fmt::Debug for PluginAttachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginAttachment")
            .field("name", &self.name)
            .field("variables", &self.variables.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ClusterState {
    /// The service `namespace/name`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
    }

    /// The plugin definition `name`.
    pub fn plugin(&self, name: &str) -> Option<&Plugin> {
        self.plugins.iter().find(|p| p.name == name)
    }

    /// Structural checks: names, duplicates, ports, references to plugins, weights. Route
    /// and policy values are checked by rendering (against the contract's validator).
    pub fn check(&self) -> Result<(), ValidationErrors> {
        let mut errs = Errors::default();
        let mut plugin_names = HashSet::new();
        for (i, p) in self.plugins.iter().enumerate() {
            let at = format!("plugins[{i}]");
            errs.check(&format!("{at}.name"), check_label(&p.name));
            if !plugin_names.insert(p.name.as_str()) {
                errs.push(
                    format!("{at}.name"),
                    format!("plugin {:?} is defined twice", p.name),
                );
            }
            if p.name == BUILTIN_NETPROXY && p.kind != PluginKind::Netproxy {
                errs.push(
                    format!("{at}.kind"),
                    format!(
                        "{BUILTIN_NETPROXY} is the built-in netproxy; its kind must be netproxy"
                    ),
                );
            }
            errs.variables(&format!("{at}.variables"), &p.variables);
        }
        let mut keys = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = format!("services[{i}]");
            errs.check(&format!("{at}.namespace"), check_label(&s.namespace));
            errs.check(&format!("{at}.name"), check_label(&s.name));
            if !keys.insert((s.namespace.as_str(), s.name.as_str())) {
                errs.push(
                    format!("{at}.name"),
                    format!("service {}/{} is defined twice", s.namespace, s.name),
                );
            }
            errs.service(&at, s, &plugin_names);
        }
        errs.finish()
    }
}

#[derive(Default)]
struct Errors(Vec<ValidationError>);

impl Errors {
    fn push(&mut self, path: String, message: String) {
        self.0.push(ValidationError { path, message });
    }

    fn check(&mut self, path: &str, r: Result<(), String>) {
        if let Err(m) = r {
            self.push(path.to_owned(), m);
        }
    }

    fn finish(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(self.0))
        }
    }

    fn variables(&mut self, at: &str, vars: &BTreeMap<String, String>) {
        for name in vars.keys() {
            let ok = !name.is_empty()
                && name.len() <= 256
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                self.push(
                    format!("{at}[{name:?}]"),
                    "must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)".to_owned(),
                );
            }
        }
        for (name, value) in vars {
            // Never echo the value: it may be a secret.
            if value.contains('\0') {
                self.push(
                    format!("{at}[{name:?}]"),
                    "value must not contain NUL".to_owned(),
                );
            }
        }
    }

    fn service(&mut self, at: &str, s: &Service, plugins: &HashSet<&str>) {
        let mut ports = HashSet::new();
        let mut app_ports = HashSet::new();
        let mut outer_ports = HashSet::new();
        for (j, p) in s.ports.iter().enumerate() {
            let pat = format!("{at}.ports[{j}]");
            if p.port.get() == 0 {
                self.push(
                    format!("{pat}.port"),
                    "must be within 1..=65535, got 0".into(),
                );
            } else if !ports.insert(p.port) {
                self.push(
                    format!("{pat}.port"),
                    format!("port {} is listed twice", p.port),
                );
            }
            if p.app_port().get() == 0 {
                self.push(
                    format!("{pat}.target_port"),
                    "must be within 1..=65535, got 0".into(),
                );
            } else if !app_ports.insert(p.app_port().get()) {
                self.push(
                    format!("{pat}.target_port"),
                    format!("app port {} is used by another port", p.app_port()),
                );
            }
            if let Some(name) = &p.name {
                self.check(&format!("{pat}.name"), check_label(name));
            }
        }
        for (j, p) in s.ports.iter().enumerate() {
            let Some(outer) = p.port_outer else { continue };
            let pat = format!("{at}.ports[{j}].port_outer");
            if outer.get() == 0 {
                self.push(pat, "must be within 1..=65535, got 0".into());
            } else if app_ports.contains(&outer.get()) {
                self.push(
                    pat,
                    format!("port_outer {outer} collides with an app port of this service"),
                );
            } else if !outer_ports.insert(outer) {
                self.push(pat, format!("port_outer {outer} is used by another port"));
            }
        }
        for (j, inst) in s.instances.iter().enumerate() {
            let iat = format!("{at}.instances[{j}]");
            if let Some(name) = &inst.name {
                self.check(&format!("{iat}.name"), check_token(name));
            }
            if inst.address.is_unspecified() || inst.address.is_multicast() {
                self.push(
                    format!("{iat}.address"),
                    format!("must be a unicast address, got {}", inst.address),
                );
            }
            if inst.weight == 0 || inst.weight > MAX_WEIGHT {
                self.push(
                    format!("{iat}.weight"),
                    format!("must be within 1..={MAX_WEIGHT}, got {}", inst.weight),
                );
            }
            if let Some(z) = &inst.zone {
                self.check(&format!("{iat}.zone"), check_token(z));
            }
            for (k, v) in &inst.labels {
                self.check(&format!("{iat}.labels"), check_token(k));
                self.check(&format!("{iat}.labels[{k:?}]"), check_token(v));
            }
            for (k, ip) in inst.ports.iter().enumerate() {
                if !ports.contains(&ip.port) {
                    self.push(
                        format!("{iat}.ports[{k}].port"),
                        format!("{} is not a port of this service", ip.port),
                    );
                }
                if ip.target == 0 {
                    self.push(
                        format!("{iat}.ports[{k}].target"),
                        "must be within 1..=65535, got 0".into(),
                    );
                }
            }
            if inst.meshed && inst.ports.is_empty() {
                for (k, p) in s.ports.iter().enumerate() {
                    if p.port_outer.is_none() {
                        self.push(
                            format!("{at}.ports[{k}].port_outer"),
                            format!(
                                "is required: instances[{j}] is meshed and does not list its ports"
                            ),
                        );
                    }
                }
            }
        }
        let mut deps = HashSet::new();
        for (j, d) in s.use_services.iter().enumerate() {
            let dat = format!("{at}.use_services[{j}].service");
            let (ns, name) = d.target(&s.namespace);
            let ok = check_label(ns).and_then(|()| check_label(name));
            if let Err(e) = ok {
                self.push(
                    dat,
                    format!("must be \"name\" or \"namespace/name\" of DNS labels: {e}"),
                );
            } else if !deps.insert((ns, name)) {
                self.push(dat, format!("{ns}/{name} is listed twice"));
            } else if ns == s.namespace && name == s.name {
                self.push(dat, "a service cannot use itself".into());
            }
        }
        if let Some(list) = &s.allow_clients {
            for (j, c) in list.iter().enumerate() {
                self.check(&format!("{at}.allow_clients[{j}]"), check_client(c));
            }
        }
        let mut attached = HashSet::new();
        for (j, a) in s.plugins.iter().enumerate() {
            let pat = format!("{at}.plugins[{j}]");
            if !plugins.contains(a.name.as_str()) && a.name != BUILTIN_NETPROXY {
                self.push(
                    format!("{pat}.name"),
                    format!("plugin {:?} is not defined under plugins", a.name),
                );
            }
            if !attached.insert(a.name.as_str()) {
                self.push(
                    format!("{pat}.name"),
                    format!("plugin {:?} is attached twice", a.name),
                );
            }
            self.variables(&format!("{pat}.variables"), &a.variables);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(v: serde_json::Value) -> ClusterState {
        serde_json::from_value(v).unwrap()
    }

    fn paths(s: &ClusterState) -> Vec<String> {
        match s.check() {
            Ok(()) => vec![],
            Err(e) => e.0.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn minimal_state_defaults() {
        let s = state(serde_json::json!({
            "services": [{"namespace": "demo", "name": "web",
                          "ports": [{"port": 80, "target_port": 8080}]}]
        }));
        assert_eq!(s.dns.cluster_domain, "cluster.local");
        assert_eq!(s.services[0].ports[0].app_port(), AppPort(8080));
        assert!(s.services[0].allow_clients.is_none());
        assert!(s.check().is_ok());
        assert!(s.service("demo", "web").is_some());
        // An absent policy means the same as an empty one.
        let absent: Dependency =
            serde_json::from_value(serde_json::json!({"service": "x"})).unwrap();
        let empty: Dependency = serde_json::from_value(
            serde_json::json!({"service": "x", "balancer": {}, "timeouts": {}, "retry": {}}),
        )
        .unwrap();
        assert_eq!(absent, empty);
        assert!(s.service("demo", "nope").is_none());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let r: Result<ClusterState, _> = serde_json::from_value(serde_json::json!({
            "services": [{"namespace": "demo", "name": "web", "prots": []}]
        }));
        assert!(r.unwrap_err().to_string().contains("prots"));
    }

    #[test]
    fn check_names_every_problem() {
        let s = state(serde_json::json!({
            "plugins": [{"name": "Bad", "variables": {"1X": "secret-value"}}],
            "services": [
                {"namespace": "demo", "name": "web",
                 "ports": [{"port": 8080}, {"port": 8080, "target_port": 9090, "port_outer": 9090}],
                 "instances": [{"address": "10.0.0.1", "meshed": true, "weight": 0}],
                 "use_services": [{"service": "web"}, {"service": "a/b/c"}],
                 "allow_clients": ["nobody"],
                 "plugins": [{"name": "ghost"}]},
                {"namespace": "demo", "name": "web"}
            ]
        }));
        let p = paths(&s);
        let want = [
            "plugins[0].name",
            "plugins[0].variables[\"1X\"]",
            "services[0].ports[1].port: port 8080 is listed twice",
            "services[0].ports[1].port_outer: port_outer 9090 collides",
            "services[0].ports[0].port_outer: is required",
            "services[0].instances[0].weight",
            "services[0].use_services[0].service: a service cannot use itself",
            "services[0].use_services[1].service",
            "services[0].allow_clients[0]",
            "services[0].plugins[0].name: plugin \"ghost\" is not defined",
            "services[1].name: service demo/web is defined twice",
        ];
        for w in want {
            assert!(
                p.iter().any(|e| e.starts_with(w)),
                "missing {w:?} in {p:#?}"
            );
        }
        assert!(!p.iter().any(|e| e.contains("secret-value")));
        assert!(!format!("{s:?}").contains("secret-value"));
    }

    #[test]
    fn dependency_targets() {
        let d = Dependency {
            service: "backend".into(),
            routes: vec![],
            balancer: Balancer::default(),
            timeouts: Timeouts::default(),
            retry: RetryPolicy::default(),
            limits: Limits::default(),
            outlier_detection: None,
            health_check: None,
        };
        assert_eq!(d.target("demo"), ("demo", "backend"));
        let d = Dependency {
            service: "other/db".into(),
            ..d
        };
        assert_eq!(d.target("demo"), ("other", "db"));
    }
}
