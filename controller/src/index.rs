//! The index: Kubernetes objects in, sidemesh's cluster-state model out, as one pure function.
//!
//! [`build`] turns the watched Services, EndpointSlices, Pods, Namespaces, Plugins and
//! MeshConfigs into a [`ClusterState`] for discover, the [`Lookups`] the webhook injects from,
//! and the problems found per sidemesh object (which become status conditions).
//!
//! - A Service's ports keep their number; the protocol comes from `appProtocol`, else the
//!   port-name convention (`http-*`, `http2-*`/`h2c-*`, `grpc-*`, `tcp-*`).
//! - Instances come from ready EndpointSlice endpoints. An endpoint whose pod is injected is
//!   `meshed`, and the port to dial is read back from the pod's `sidemesh.io/port-map`: a
//!   named `targetPort` already resolves to the proxy's port (the injector moved the name),
//!   a numeric one to the app port, which the map turns into its `port_outer`.
//! - A MeshConfig gives its workload's service its dependencies, `allow_clients` and plugins;
//!   an injected workload without a Kubernetes Service still gets an entry, so its sidecar's
//!   `DISCOVER_URL` answers.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sidemesh_api::config::{DnsSettings, Protocol, TlsMode};
use sidemesh_api::port::{AppPort, OuterPort, ServicePort};
use sidemesh_api::state::{
    self, ClusterState, Dependency, Instance, InstancePort, PluginAttachment, ServicePortSpec,
};

use crate::crd::{MeshConfig, Plugin, PluginKind};
use crate::inject::{self, Catalog};
use crate::webhook::Lookups;

/// A Pod as the controller keeps it: its metadata only (a metadata watch). An injected pod
/// is recognised by its `sidemesh.io/injected` annotation, which the injector always sets.
pub type PodMeta = kube::core::PartialObjectMeta<Pod>;

/// Everything the watches hold, as the reflector stores hand it out.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// Services.
    pub services: Vec<Arc<KubeService>>,
    /// EndpointSlices.
    pub slices: Vec<Arc<EndpointSlice>>,
    /// Pods (metadata only).
    pub pods: Vec<Arc<PodMeta>>,
    /// Namespaces.
    pub namespaces: Vec<Arc<Namespace>>,
    /// Plugins.
    pub plugins: Vec<Arc<Plugin>>,
    /// MeshConfigs.
    pub meshes: Vec<Arc<MeshConfig>>,
}

/// A sidemesh object, for problems and status.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKey {
    /// A Plugin, by name.
    Plugin(String),
    /// A MeshConfig, by namespace and name.
    MeshConfig(String, String),
}

/// What [`build`] produces.
#[derive(Clone, Debug, Default)]
pub struct Built {
    /// The cluster state for discover.
    pub state: ClusterState,
    /// What the webhook injects from.
    pub lookups: Lookups,
    /// Problems per sidemesh object; objects without problems map to an empty list.
    pub problems: BTreeMap<ObjectKey, Vec<String>>,
    /// The status each sidemesh object should carry.
    pub statuses: BTreeMap<ObjectKey, DesiredStatus>,
    /// What each valid MeshConfig gives its workload's service, by `(namespace, service)`.
    pub meshes: BTreeMap<(String, String), MeshPart>,
}

/// What the controller writes into a sidemesh object's status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DesiredStatus {
    /// Problems; empty means `Ready=True`.
    pub problems: Vec<String>,
    /// The generation these describe.
    pub generation: Option<i64>,
    /// Plugins only: the published versions' fingerprints (kept as they were while invalid).
    pub published_versions: BTreeMap<String, String>,
}

/// Settings of the index.
#[derive(Clone, Debug)]
pub struct IndexConfig {
    /// The cluster DNS domain.
    pub cluster_domain: String,
    /// The cluster DNS Service, as `namespace/name`, whose ClusterIP becomes the shims'
    /// upstream (the pod's resolv.conf points at the shim after injection).
    pub cluster_dns: (String, String),
    /// The discover Service, as (namespace, name), whose ClusterIP goes into `DISCOVER_URL`s.
    pub discover_service: (String, String),
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            cluster_domain: "cluster.local".to_owned(),
            cluster_dns: ("kube-system".to_owned(), "kube-dns".to_owned()),
            discover_service: ("sidemesh".to_owned(), "sidemesh-discover".to_owned()),
        }
    }
}

/// The protocol of a Service port: `appProtocol` first, then the port-name prefix.
pub fn port_protocol(app_protocol: Option<&str>, name: Option<&str>) -> Protocol {
    if let Some(p) = app_protocol {
        match p.to_ascii_lowercase().as_str() {
            "http" | "http1" | "http/1.1" => return Protocol::Http1,
            "http2" | "h2c" | "kubernetes.io/h2c" => return Protocol::Http2,
            "grpc" => return Protocol::Grpc,
            "tcp" | "mysql" | "redis" | "mongo" | "postgres" => return Protocol::Tcp,
            _ => {}
        }
    }
    let name = name.unwrap_or_default().to_ascii_lowercase();
    let prefix = name.split('-').next().unwrap_or_default();
    match prefix {
        "http" => Protocol::Http1,
        "http2" | "h2c" => Protocol::Http2,
        "grpc" => Protocol::Grpc,
        "tcp" => Protocol::Tcp,
        _ => Protocol::Auto,
    }
}

/// Builds the cluster state, the injection lookups and the per-object problems.
pub fn build(inputs: &Inputs, cfg: &IndexConfig) -> Built {
    let mut problems: BTreeMap<ObjectKey, Vec<String>> = BTreeMap::new();
    let mut statuses: BTreeMap<ObjectKey, DesiredStatus> = BTreeMap::new();

    // Plugins: validated; the invalid ones are left out (and reported).
    let mut catalog = Catalog::default();
    let mut plugins = Vec::new();
    for p in &inputs.plugins {
        let name = p.metadata.name.clone().unwrap_or_default();
        let published = p
            .status
            .as_ref()
            .map(|s| s.published_versions.clone())
            .unwrap_or_default();
        let errs = p.spec.validate(&published);
        statuses.insert(
            ObjectKey::Plugin(name.clone()),
            DesiredStatus {
                problems: errs.clone(),
                generation: p.metadata.generation,
                published_versions: if errs.is_empty() {
                    p.spec
                        .versions
                        .iter()
                        .map(|v| (v.name.clone(), v.fingerprint()))
                        .collect()
                } else {
                    published.clone()
                },
            },
        );
        if errs.is_empty() {
            catalog.plugins.insert(name.clone(), p.spec.clone());
            if let Some(v) = p.spec.version(None) {
                plugins.push(state::Plugin {
                    name: name.clone(),
                    kind: match p.spec.kind {
                        PluginKind::Sidecar => state::PluginKind::Sidecar,
                        PluginKind::Init => state::PluginKind::Init,
                        PluginKind::Netproxy => state::PluginKind::Netproxy,
                    },
                    image: Some(v.image.clone()),
                    variables: v.variables.clone(),
                });
            }
        }
        problems.insert(ObjectKey::Plugin(name), errs);
    }
    plugins.sort_by(|a, b| a.name.cmp(&b.name));

    // MeshConfigs: validated, then attached to their workload's service.
    let mut meshes = BTreeMap::new();
    let mut rejected = BTreeMap::new();
    for m in &inputs.meshes {
        let ns = m.metadata.namespace.clone().unwrap_or_default();
        let name = m.metadata.name.clone().unwrap_or_default();
        let key = ObjectKey::MeshConfig(ns.clone(), name.clone());
        let svc = m.spec.service_name(&name).to_owned();
        let mut errs = match m.spec.validate(&ns) {
            Ok(deps) => {
                let mut errs = Vec::new();
                for (i, a) in m.spec.plugins.iter().enumerate() {
                    match catalog.plugins.get(&a.name) {
                        None => errs.push(format!(
                            "spec.plugins[{i}]: no valid Plugin named {:?}",
                            a.name
                        )),
                        Some(p) if p.version(a.version.as_deref()).is_none() => errs.push(format!(
                            "spec.plugins[{i}]: plugin {:?} has no version {:?}",
                            a.name,
                            a.version.as_deref().unwrap_or("default")
                        )),
                        Some(_) => {}
                    }
                }
                if errs.is_empty() {
                    match meshes.entry((ns.clone(), svc.clone())) {
                        std::collections::btree_map::Entry::Occupied(_) => errs.push(format!(
                            "another MeshConfig in {ns} already configures service {svc}; keep one"
                        )),
                        std::collections::btree_map::Entry::Vacant(v) => {
                            v.insert((m.clone(), deps));
                        }
                    }
                }
                errs
            }
            Err(errs) => errs,
        };
        errs.dedup();
        if !errs.is_empty() && !meshes.contains_key(&(ns.clone(), svc.clone())) {
            rejected.insert((ns.clone(), svc.clone()), errs.join("; "));
        }
        statuses.insert(
            key.clone(),
            DesiredStatus {
                problems: errs.clone(),
                generation: m.metadata.generation,
                published_versions: BTreeMap::new(),
            },
        );
        problems.insert(key, errs);
    }
    catalog.rejected = rejected;
    catalog.meshes = meshes
        .iter()
        .map(|(k, (m, _))| (k.clone(), m.spec.clone()))
        .collect();

    // What each valid MeshConfig gives its workload's service.
    let mesh_parts: BTreeMap<(String, String), MeshPart> = meshes
        .iter()
        .map(|(k, (m, deps))| (k.clone(), MeshPart::new(m, deps, &catalog)))
        .collect();

    // Pods by namespace/name, for endpoint target refs.
    let pods = pods_by_key(&inputs.pods);
    let pod = |ns: &str, name: &str| pods.get(&(ns, name)).map(|p| Arc::clone(p));

    // Slices by the service they belong to.
    let mut slices: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in &inputs.slices {
        if let (Some(ns), Some(svc)) = (s.metadata.namespace.as_deref(), slice_service(s)) {
            slices.entry((ns, svc)).or_default().push(s);
        }
    }

    // Every service that gets an entry: Kubernetes Services, injected workloads (which get a
    // config even without a Service) and MeshConfig workloads.
    let mut kube: BTreeMap<(&str, &str), &KubeService> = BTreeMap::new();
    let mut upstreams = Vec::new();
    let mut discover_ip = None;
    for ks in &inputs.services {
        let (Some(ns), Some(name)) = (
            ks.metadata.namespace.as_deref(),
            ks.metadata.name.as_deref(),
        ) else {
            continue;
        };
        let Some(spec) = &ks.spec else { continue };
        if (ns, name)
            == (
                cfg.discover_service.0.as_str(),
                cfg.discover_service.1.as_str(),
            )
        {
            discover_ip = spec.cluster_ip.as_deref().and_then(|ip| ip.parse().ok());
        }
        if (ns, name) == (cfg.cluster_dns.0.as_str(), cfg.cluster_dns.1.as_str()) {
            if let Some(ip) = spec.cluster_ip.as_deref().filter(|ip| *ip != "None") {
                upstreams.push(format!("{ip}:53"));
            }
        }
        kube.insert((ns, name), ks);
    }
    let mut workloads: BTreeMap<(String, String), usize> = BTreeMap::new();
    for p in &inputs.pods {
        if let Some(key) = injected_workload(p) {
            *workloads.entry(key).or_default() += 1;
        }
    }
    let mut keys: std::collections::BTreeSet<(String, String)> = kube
        .keys()
        .map(|(ns, name)| ((*ns).to_owned(), (*name).to_owned()))
        .collect();
    keys.extend(workloads.keys().cloned());
    keys.extend(mesh_parts.keys().cloned());
    let mut services = Vec::with_capacity(keys.len());
    for (ns, name) in &keys {
        let key = (ns.as_str(), name.as_str());
        let entry = service_entry(
            ns,
            name,
            kube.get(&key).copied(),
            slices.get(&key).map(Vec::as_slice).unwrap_or_default(),
            &pod,
            workloads.contains_key(&(ns.clone(), name.clone())),
            mesh_parts.get(&(ns.clone(), name.clone())),
        );
        if let Some(service) = entry {
            services.push(service);
        }
    }

    let namespace_labels = inputs
        .namespaces
        .iter()
        .filter_map(|n| {
            Some((
                n.metadata.name.clone()?,
                n.metadata.labels.clone().unwrap_or_default(),
            ))
        })
        .collect();

    Built {
        state: ClusterState {
            dns: DnsSettings {
                cluster_domain: cfg.cluster_domain.clone(),
                upstreams,
                ..DnsSettings::default()
            },
            plugins,
            services,
        },
        lookups: Lookups {
            catalog,
            namespace_labels,
            discover_ip,
        },
        problems,
        statuses,
        meshes: mesh_parts,
    }
}

/// Pods by `(namespace, name)`, for endpoint target refs.
pub fn pods_by_key(pods: &[Arc<PodMeta>]) -> BTreeMap<(&str, &str), &Arc<PodMeta>> {
    pods.iter()
        .filter_map(|p| {
            Some((
                (
                    p.metadata.namespace.as_deref()?,
                    p.metadata.name.as_deref()?,
                ),
                p,
            ))
        })
        .collect()
}

/// The service an EndpointSlice belongs to (its `kubernetes.io/service-name` label).
pub fn slice_service(slice: &EndpointSlice) -> Option<&str> {
    slice
        .metadata
        .labels
        .as_ref()?
        .get("kubernetes.io/service-name")
        .map(String::as_str)
}

/// The pods an EndpointSlice's endpoints name, ready or not, as `(namespace, name)`.
pub fn slice_pods(slice: &EndpointSlice) -> Vec<(String, String)> {
    let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
    slice
        .endpoints
        .iter()
        .flatten()
        .filter_map(|ep| {
            let r = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))?;
            Some((
                r.namespace.as_deref().unwrap_or(ns).to_owned(),
                r.name.clone()?,
            ))
        })
        .collect()
}

/// The workload service an injected pod serves, as `(namespace, service)`.
pub fn injected_workload(pod: &PodMeta) -> Option<(String, String)> {
    let ns = pod.metadata.namespace.as_deref()?;
    let injected = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(inject::INJECTED));
    if !injected {
        return None;
    }
    let svc = inject::service_name(&pod.metadata).ok()?;
    Some((ns.to_owned(), svc))
}

/// What a valid MeshConfig gives its workload's service.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshPart {
    allow_clients: Option<Vec<String>>,
    use_services: Vec<Dependency>,
    plugins: Vec<PluginAttachment>,
}

impl MeshPart {
    fn new(m: &MeshConfig, deps: &[crate::crd::DependencyPolicy], catalog: &Catalog) -> MeshPart {
        MeshPart {
            allow_clients: m.spec.allow_clients.clone(),
            use_services: deps
                .iter()
                .map(|d| Dependency {
                    service: format!("{}/{}", d.namespace, d.name),
                    routes: d.routes.clone(),
                    balancer: d.balancer.clone().unwrap_or_default(),
                    timeouts: d.timeouts.clone().unwrap_or_default(),
                    retry: d.retry.clone().unwrap_or_default(),
                    limits: d.limits.clone().unwrap_or_default(),
                    outlier_detection: d.outlier_detection.clone(),
                    health_check: d.health_check.clone(),
                })
                .collect(),
            plugins: m
                .spec
                .plugins
                .iter()
                .filter_map(|a| {
                    let p = catalog.plugins.get(&a.name)?;
                    let v = p.version(a.version.as_deref())?;
                    let mut variables = v.variables.clone();
                    variables.extend(a.variables.clone());
                    Some(PluginAttachment {
                        name: a.name.clone(),
                        variables,
                    })
                })
                .collect(),
        }
    }
}

/// One service's entry in the cluster state, from its Kubernetes Service (if any), that
/// Service's EndpointSlices, the pods they point at (through `pod`), whether injected pods
/// serve it, and its MeshConfig's part; `None` when nothing makes it exist. Both [`build`]
/// and the live index ([`crate::live`]) use it, so they agree.
pub fn service_entry(
    ns: &str,
    name: &str,
    kube: Option<&KubeService>,
    slices: &[&EndpointSlice],
    pod: &dyn Fn(&str, &str) -> Option<Arc<PodMeta>>,
    injected: bool,
    mesh: Option<&MeshPart>,
) -> Option<state::Service> {
    let spec = kube
        .and_then(|k| k.spec.as_ref())
        .filter(|s| s.type_.as_deref() != Some("ExternalName"));
    let mut entry = match spec {
        Some(spec) => {
            let tls_modes = kube
                .and_then(|k| k.metadata.annotations.as_ref())
                .and_then(|a| a.get(PORT_TLS_MODE))
                .map(|v| port_tls_modes(v))
                .unwrap_or_default();
            let mut ports = Vec::new();
            for p in spec.ports.iter().flatten() {
                if p.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                    continue;
                }
                let Ok(port) = u16::try_from(p.port) else {
                    continue;
                };
                let target_port = match &p.target_port {
                    Some(IntOrString::Int(n)) => u16::try_from(*n).ok().map(AppPort),
                    _ => None,
                };
                ports.push(ServicePortSpec {
                    port: ServicePort(port),
                    target_port,
                    port_outer: None,
                    protocol: port_protocol(p.app_protocol.as_deref(), p.name.as_deref()),
                    name: p.name.clone(),
                    // By name first: it survives renumbering.
                    tls_mode: p
                        .name
                        .as_deref()
                        .and_then(|n| tls_modes.get(n))
                        .or_else(|| tls_modes.get(&port.to_string()))
                        .copied(),
                });
            }
            let (instances, remaps) =
                instances(spec.ports.as_deref().unwrap_or_default(), slices, pod);
            // The workload's own sidecar listens on port_outer and forwards to the app port;
            // all pods of one template share the mapping (it is a function of the pod spec).
            for p in &mut ports {
                if let Some((app, outer)) = remaps.get(&p.port) {
                    p.target_port = Some(*app);
                    p.port_outer = Some(*outer);
                }
            }
            empty_service(ns, name, ports, instances)
        }
        None if injected || mesh.is_some() => empty_service(ns, name, Vec::new(), Vec::new()),
        None => return None,
    };
    if let Some(m) = mesh {
        entry.allow_clients = m.allow_clients.clone();
        entry.use_services = m.use_services.clone();
        entry.plugins = m.plugins.clone();
    }
    Some(entry)
}

/// The Service annotation that sets the TLS mode of the sidecars' inbound listeners per
/// port: `<port name or number>=<disabled|permissive|strict>`, comma-separated, e.g.
/// `http=strict,9090=permissive`. Ports not named keep discover's mode.
pub const PORT_TLS_MODE: &str = "sidemesh.io/port-tls-mode";

/// The per-port TLS modes of a [`PORT_TLS_MODE`] value, keyed by port name or number.
/// Malformed items are left out (with a warning): the port keeps discover's mode.
pub fn port_tls_modes(value: &str) -> BTreeMap<String, TlsMode> {
    let mut out = BTreeMap::new();
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let parsed = item.split_once('=').and_then(|(port, mode)| {
            let mode = match mode.trim() {
                "disabled" => TlsMode::Disabled,
                "permissive" => TlsMode::Permissive,
                "strict" => TlsMode::Strict,
                _ => return None,
            };
            let port = port.trim();
            (!port.is_empty()).then(|| (port.to_owned(), mode))
        });
        match parsed {
            Some((port, mode)) => {
                out.insert(port, mode);
            }
            None => tracing::warn!(
                annotation = PORT_TLS_MODE,
                item,
                "ignored: expected <port name or number>=<disabled|permissive|strict>"
            ),
        }
    }
    out
}

fn empty_service(
    ns: &str,
    name: &str,
    ports: Vec<ServicePortSpec>,
    instances: Vec<Instance>,
) -> state::Service {
    state::Service {
        namespace: ns.to_owned(),
        name: name.to_owned(),
        ports,
        instances,
        use_services: Vec::new(),
        allow_clients: None,
        inbound_timeouts: Default::default(),
        inbound_limits: Default::default(),
        plugins: Vec::new(),
    }
}

/// The ready endpoints of a service's slices, each with the port to dial per service port,
/// and per service port the (app port, port_outer) of its meshed pods (the smallest, should
/// pods disagree during a rollout).
fn instances(
    service_ports: &[k8s_openapi::api::core::v1::ServicePort],
    slices: &[&EndpointSlice],
    pods: &dyn Fn(&str, &str) -> Option<Arc<PodMeta>>,
) -> (Vec<Instance>, BTreeMap<ServicePort, (AppPort, OuterPort)>) {
    let mut out: BTreeMap<IpAddr, Instance> = BTreeMap::new();
    let mut remaps: BTreeMap<ServicePort, (AppPort, OuterPort)> = BTreeMap::new();
    // In name order, whatever order the caller found them in: the first slice naming an
    // address wins, so the result must not depend on store order.
    let mut slices = slices.to_vec();
    slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
        for ep in slice.endpoints.iter().flatten() {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            let pod = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    let pns = r.namespace.as_deref().unwrap_or(ns);
                    pods(pns, r.name.as_deref()?)
                });
            let port_map = pod
                .as_ref()
                .and_then(|p| inject::parse_port_map(&p.metadata));
            let meshed = port_map.is_some();
            let mut ports = Vec::new();
            for sp in service_ports {
                let Ok(port) = u16::try_from(sp.port) else {
                    continue;
                };
                // The slice port with the Service port's name carries the resolved number.
                let resolved = slice
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref().unwrap_or("") == sp.name.as_deref().unwrap_or(""))
                    .and_then(|p| p.port)
                    .and_then(|p| u16::try_from(p).ok());
                let Some(resolved) = resolved else { continue };
                let target = match &port_map {
                    Some(map) => {
                        // A numeric targetPort resolves to the app port; a named one to the
                        // proxy's port already (the injector moved the name).
                        let pair = match map.get(&AppPort(resolved)) {
                            Some(outer) => Some((AppPort(resolved), *outer)),
                            None => map
                                .iter()
                                .find(|(_, o)| o.get() == resolved)
                                .map(|(a, o)| (*a, *o)),
                        };
                        if let Some(pair) = pair {
                            let e = remaps.entry(ServicePort(port)).or_insert(pair);
                            *e = (*e).min(pair);
                        }
                        pair.map(|(_, o)| o.get()).unwrap_or(resolved)
                    }
                    None => resolved,
                };
                ports.push(InstancePort {
                    port: ServicePort(port),
                    target,
                });
            }
            for addr in &ep.addresses {
                let Ok(ip) = addr.parse::<IpAddr>() else {
                    continue;
                };
                out.entry(ip).or_insert_with(|| Instance {
                    name: pod.as_ref().and_then(|p| p.metadata.name.clone()),
                    address: ip,
                    ports: ports.clone(),
                    meshed,
                    zone: ep.zone.clone(),
                    labels: pod
                        .as_ref()
                        .and_then(|p| p.metadata.labels.clone())
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|(k, _)| k != "pod-template-hash")
                        .collect(),
                    weight: 100,
                });
            }
        }
    }
    (out.into_values().collect(), remaps)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The test cluster, as real API objects (`testdata/cluster.json`).
    pub(crate) fn inputs() -> Inputs {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../testdata/cluster.json")).unwrap();
        fn list<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Vec<Arc<T>> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| Arc::new(serde_json::from_value(x.clone()).unwrap()))
                .collect()
        }
        Inputs {
            services: list(&v["services"]),
            slices: list(&v["endpointslices"]),
            pods: list(&v["pods"]),
            namespaces: list(&v["namespaces"]),
            plugins: list(&v["plugins"]),
            meshes: list(&v["meshconfigs"]),
        }
    }

    #[test]
    fn protocols_from_app_protocol_then_port_name() {
        assert_eq!(
            port_protocol(Some("kubernetes.io/h2c"), Some("tcp-x")),
            Protocol::Http2
        );
        assert_eq!(port_protocol(Some("HTTP"), None), Protocol::Http1);
        assert_eq!(port_protocol(None, Some("http-web")), Protocol::Http1);
        assert_eq!(port_protocol(None, Some("http")), Protocol::Http1);
        assert_eq!(port_protocol(None, Some("grpc-api")), Protocol::Grpc);
        assert_eq!(port_protocol(None, Some("h2c-x")), Protocol::Http2);
        assert_eq!(port_protocol(None, Some("tcp-mysql")), Protocol::Tcp);
        assert_eq!(port_protocol(None, Some("web")), Protocol::Auto);
        assert_eq!(
            port_protocol(Some("unknown.example/x"), Some("grpc")),
            Protocol::Grpc
        );
    }

    #[test]
    fn services_ports_and_meshed_instances() {
        let b = build(&inputs(), &IndexConfig::default());
        let web = b.state.service("shop", "web").unwrap();
        let ports: Vec<_> = web
            .ports
            .iter()
            .map(|p| (p.port.get(), p.protocol))
            .collect();
        assert_eq!(
            ports,
            [
                (80, Protocol::Http1),
                (9000, Protocol::Grpc),
                (8081, Protocol::Http2)
            ],
            "UDP ports are left out"
        );
        assert_eq!(web.instances.len(), 1, "not-ready endpoints are left out");
        let i = &web.instances[0];
        assert!(i.meshed);
        assert_eq!(i.zone.as_deref(), Some("eu-west-1a"));
        assert_eq!(i.labels.get("version").map(String::as_str), Some("v2"));
        assert!(!i.labels.contains_key("pod-template-hash"));
        let targets: Vec<_> = i.ports.iter().map(|p| (p.port.get(), p.target)).collect();
        // Named targetPort resolved to the proxy's port already; numeric ones are mapped.
        assert_eq!(targets, [(80, 28080), (9000, 29000), (8081, 28081)]);
        // The workload's own inbound: app port and port_outer per service port.
        let remap: Vec<_> = web
            .ports
            .iter()
            .map(|p| {
                (
                    p.port.get(),
                    p.app_port().get(),
                    p.port_outer.unwrap().get(),
                )
            })
            .collect();
        assert_eq!(
            remap,
            [(80, 8080, 28080), (9000, 9000, 29000), (8081, 8081, 28081)]
        );
        let mysql = b.state.service("shop", "mysql").unwrap();
        assert!(!mysql.instances[0].meshed);
        assert_eq!(mysql.instances[0].ports[0].target, 3306);
        assert!(b.state.service("shop", "legacy-db").is_none());
    }

    #[test]
    fn port_tls_mode_annotation_sets_the_ports_mode_by_name_or_number() {
        let mut inputs = inputs();
        let mut web = (*inputs.services[0]).clone();
        web.metadata.annotations = Some(BTreeMap::from([(
            PORT_TLS_MODE.to_owned(),
            "http=strict, 9000=disabled,admin=sometimes,=strict".to_owned(),
        )]));
        inputs.services[0] = Arc::new(web);
        let b = build(&inputs, &IndexConfig::default());
        let web = b.state.service("shop", "web").unwrap();
        let modes: Vec<_> = web
            .ports
            .iter()
            .map(|p| (p.port.get(), p.tls_mode))
            .collect();
        // The malformed items are left out: that port keeps discover's mode.
        assert_eq!(
            modes,
            [
                (80, Some(TlsMode::Strict)),
                (9000, Some(TlsMode::Disabled)),
                (8081, None)
            ]
        );
        // Without the annotation no port overrides anything.
        let b = build(&super::tests::inputs(), &IndexConfig::default());
        let web = b.state.service("shop", "web").unwrap();
        assert!(web.ports.iter().all(|p| p.tls_mode.is_none()));
        // The state the controller hands discover keeps it (discover renders it into
        // `inbound[].tls_mode`; see discover's render tests).
        assert_eq!(
            port_tls_modes("8080=permissive").get("8080"),
            Some(&TlsMode::Permissive)
        );
    }

    #[test]
    fn mesh_configs_plugins_and_dns() {
        let b = build(&inputs(), &IndexConfig::default());
        let web = b.state.service("shop", "web").unwrap();
        assert_eq!(web.use_services[0].service, "shop/mysql");
        assert_eq!(web.use_services[0].retry.attempts, 3);
        assert_eq!(
            web.allow_clients.as_deref(),
            Some(&["shop/*".to_owned()][..])
        );
        assert_eq!(web.plugins[0].variables["SINK_URL"], "http://logs.ops");
        assert_eq!(b.state.plugins.len(), 1, "the invalid plugin is left out");
        assert_eq!(b.state.dns.upstreams, ["10.96.0.10:53"]);
        assert_eq!(b.lookups.discover_ip, Some("10.96.5.5".parse().unwrap()));
        // The injected report pod has no Service but gets an entry; its MeshConfig names a
        // broken plugin, so it is not applied and says why.
        let report = b.state.service("shop", "report").unwrap();
        assert!(report.use_services.is_empty());
        let p = &b.problems[&ObjectKey::MeshConfig("shop".into(), "report".into())];
        assert!(p[0].contains("no valid Plugin named \"broken\""), "{p:?}");
        assert!(
            b.problems[&ObjectKey::Plugin("broken".into())][0].contains("spec.versions is empty")
        );
        assert!(b.problems[&ObjectKey::MeshConfig("shop".into(), "web".into())].is_empty());
        assert_eq!(
            b.lookups.namespace_labels["shop"]["sidemesh.io/inject"],
            "enabled"
        );
        assert!(
            b.lookups
                .catalog
                .meshes
                .contains_key(&("shop".to_owned(), "web".to_owned()))
        );
        let rejected = &b.lookups.catalog.rejected[&("shop".to_owned(), "report".to_owned())];
        assert!(rejected.contains("broken"), "{rejected}");
        b.state.check().unwrap();
    }

    #[test]
    fn build_is_deterministic_whatever_the_input_order() {
        let a = inputs();
        let mut r = a.clone();
        r.services.reverse();
        r.slices.reverse();
        r.pods.reverse();
        r.meshes.reverse();
        r.plugins.reverse();
        assert_eq!(
            build(&a, &IndexConfig::default()).state,
            build(&r, &IndexConfig::default()).state
        );
    }
}
