//! Injection as pure functions over Kubernetes pod specs: what the webhook and
//! `sidemesh inject` do to a pod (or a workload's pod template).
//!
//! The rules, in the order they apply:
//! - opt-in by namespace label or pod annotation `sidemesh.io/inject: enabled`; the pod
//!   annotation `sidemesh.io/inject: disabled` opts out and always wins;
//! - a pod that carries `sidemesh.io/injected` (or a `sidemesh-proxy` container) is left as
//!   it is, so a second pass changes nothing;
//! - the network proxy goes in as a native sidecar (init container with
//!   `restartPolicy: Always` and a startup probe on `/ready`) when the cluster supports it
//!   (1.29+), else as the first regular container with a `postStart` hook that waits for
//!   `/ready` (the kubelet starts containers in order and holds the next one until the hook
//!   returns, so the app starts after the proxy is ready);
//! - `init` plugins become init containers in attach order, `sidecar` plugins containers;
//! - every plugin container gets the main container's environment, then its own variables
//!   (version defaults overridden by the workload's), then `DISCOVER_URL`;
//! - every app port is remapped to a `port_outer` that collides with nothing in the pod,
//!   derived only from the pod spec (so stable), recorded in `sidemesh.io/port-map`; a named
//!   port's name moves to the proxy's port so Services with a named `targetPort` reach the
//!   proxy, and probes that used the name get the number;
//! - DNS points at the shim (`dnsPolicy: None`, nameserver 127.0.0.1, the cluster search list,
//!   ndots); Prometheus scrape annotations are added unless the app has its own.
//!
//! Anything the injector cannot handle is an [`InjectError`] whose message says what to do;
//! the webhook turns it into a denial.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction,
    HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector, PodDNSConfig,
    PodDNSConfigOption, PodSpec, Probe, ProjectedVolumeSource, ResourceRequirements,
    SecretKeySelector, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sidemesh_api::name;
use sidemesh_api::port::{AppPort, OuterPort};

use crate::crd::{AttachedPlugin, MeshConfigSpec, PluginKind, PluginSpec, PluginVersion};

/// Pod annotation and namespace label that opt in (`enabled`) or out (`disabled`).
pub const INJECT: &str = "sidemesh.io/inject";
/// Annotation set on injected pods (value: the injector's version).
pub const INJECTED: &str = "sidemesh.io/injected";
/// Annotation with the port remapping, JSON `{"<app port>": <port_outer>}`.
pub const PORT_MAP: &str = "sidemesh.io/port-map";
/// Annotation with the proxy's port name for each remapped app port, JSON
/// `{"<app port>": "<name>"}`: the app port's own name (moved onto the proxy) or
/// `sm-<port_outer>`. The controller reads it to point numeric `targetPort`s at the proxy.
pub const PORT_NAMES: &str = "sidemesh.io/port-names";
/// Annotation naming the workload's service (its mesh identity).
pub const SERVICE: &str = "sidemesh.io/service";
/// The network proxy's container name, and its plugin name in `DISCOVER_URL`.
pub const PROXY: &str = "sidemesh-proxy";
/// The `DISCOVER_URL` environment variable every plugin container gets.
pub const DISCOVER_URL: &str = "DISCOVER_URL";
/// The environment variable that carries the `Authorization` value for discover (the
/// proxy's `--discover-authorization`), from the Secret [`token_secret`] when it exists.
pub const DISCOVER_AUTHORIZATION: &str = "SIDEMESH_DISCOVER_AUTHORIZATION";
/// The key of [`token_secret`] that holds `Bearer <token>`.
pub const TOKEN_SECRET_KEY: &str = "authorization";

/// The audience of the projected service-account tokens the injector mounts (discover's
/// `sidemesh_discover::review::AUDIENCE`).
pub const TOKEN_AUDIENCE: &str = "sidemesh-discover";
/// The projected volume that holds the pod's token for discover.
pub const TOKEN_VOLUME: &str = "sidemesh-discover-token";
/// Where [`TOKEN_VOLUME`] is mounted; the token is the file `token` in it.
pub const TOKEN_DIR: &str = "/var/run/secrets/sidemesh.io/discover";
/// The proxy's `--discover-token-file` variable.
pub const TOKEN_FILE_ENV: &str = "SIDEMESH_DISCOVER_TOKEN_FILE";
/// The projected token's lifetime; the kubelet renews it at 80 % of that.
const TOKEN_SECONDS: i64 = 3600;

/// The Secret, in the workload's namespace, whose key [`TOKEN_SECRET_KEY`] holds the
/// workload's `Authorization` value for discover (`Bearer <token>`, for a discover with a
/// token file). Optional: without it, the containers poll without a token.
pub fn token_secret(service: &str) -> String {
    format!("sidemesh-discover-token-{service}")
}

/// Cluster-wide injection settings.
#[derive(Clone, Debug)]
pub struct InjectConfig {
    /// The built-in network proxy image (runs `sidemesh proxy`).
    pub proxy_image: String,
    /// Proxy memory request and limit, in MiB (unless a `netproxy` plugin is attached).
    pub proxy_memory_mib: u32,
    /// Proxy CPU request, in millicores.
    pub proxy_cpu_millis: u32,
    /// The discover service's base URL, e.g. `http://sidemesh-discover.sidemesh.svc:8080`.
    pub discover_base: String,
    /// Whether the cluster runs native sidecars (Kubernetes 1.29+).
    pub native_sidecars: bool,
    /// The cluster domain, for the DNS search list.
    pub cluster_domain: String,
    /// The `ndots` resolver option.
    pub ndots: u8,
    /// The proxy's admin port (`/ready`, `/metrics`); no app port may use it.
    pub admin_port: u16,
    /// `port_outer` is the app port plus this, when free (else the next free port above it).
    pub outer_port_offset: u16,
    /// Give every container that polls discover the pod's own service-account token, made
    /// for the audience [`TOKEN_AUDIENCE`] (a projected volume the kubelet keeps fresh),
    /// instead of the optional Secret [`token_secret`]; the hosted discover then checks it
    /// with a `TokenReview` (`--discover-service-account-tokens`).
    pub service_account_tokens: bool,
}

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            proxy_image: "ghcr.io/sidemesh/sidemesh:latest".to_owned(),
            proxy_memory_mib: 64,
            proxy_cpu_millis: 50,
            discover_base: "http://sidemesh-discover.sidemesh.svc:8080".to_owned(),
            native_sidecars: true,
            cluster_domain: "cluster.local".to_owned(),
            ndots: 5,
            admin_port: 15021,
            outer_port_offset: 20000,
            service_account_tokens: false,
        }
    }
}

/// Whether a Kubernetes version (`major`, `minor` as the API reports them, e.g. `"1"`,
/// `"29+"`) runs native sidecars (on by default from 1.29).
pub fn supports_native_sidecars(major: &str, minor: &str) -> bool {
    let num = |s: &str| s.trim_end_matches('+').parse::<u32>().ok();
    match (num(major), num(minor)) {
        (Some(1), Some(m)) => m >= 29,
        (Some(ma), Some(_)) => ma > 1,
        _ => false,
    }
}

/// The plugins and mesh configs injection reads.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    /// `Plugin` objects by name.
    pub plugins: BTreeMap<String, PluginSpec>,
    /// `MeshConfig` specs by (namespace, service).
    pub meshes: BTreeMap<(String, String), MeshConfigSpec>,
    /// Invalid `MeshConfig`s by (namespace, service), with their problems: their pods are
    /// denied rather than injected without what the config asks for.
    pub rejected: BTreeMap<(String, String), String>,
}

/// Why a pod was left alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Neither the namespace nor the pod opted in.
    NotOptedIn,
    /// The pod says `sidemesh.io/inject: disabled`.
    OptedOut,
    /// The pod is injected already.
    AlreadyInjected,
}

/// What injection did.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The pod spec was changed.
    Injected {
        /// The port remapping, in app-port order.
        port_map: Vec<(AppPort, OuterPort)>,
        /// Things the user should know (returned as admission warnings).
        warnings: Vec<String>,
    },
    /// Nothing was changed.
    Skipped(Skip),
}

/// Why a pod cannot be injected. Each message says what to do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    /// The pod has no containers.
    #[error("the pod has no containers")]
    NoContainers,
    /// No service name could be found for the pod.
    #[error(
        "cannot tell which service this pod is: set the annotation sidemesh.io/service or the label app.kubernetes.io/name"
    )]
    NoServiceName,
    /// The service name is not a DNS label.
    #[error(
        "service name {name:?}: {reason}; set the annotation sidemesh.io/service to a DNS label"
    )]
    BadServiceName {
        /// The name found.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Host-network pods share the node's ports and cannot be remapped.
    #[error(
        "hostNetwork pods cannot be meshed; set the annotation sidemesh.io/inject: disabled on this pod"
    )]
    HostNetwork,
    /// An attached plugin does not exist.
    #[error("plugin {0:?} is attached in the MeshConfig but no Plugin object has that name")]
    UnknownPlugin(String),
    /// An attached plugin's version does not exist.
    #[error("plugin {plugin:?} has no version {version:?}; pick one of its spec.versions")]
    UnknownVersion {
        /// The plugin.
        plugin: String,
        /// The version asked for (`default` when none was).
        version: String,
    },
    /// The workload's MeshConfig is invalid.
    #[error("the MeshConfig for this workload is invalid: {0}")]
    InvalidMeshConfig(String),
    /// Two containers would get the same name.
    #[error("container name {0:?} is used by the pod and by a plugin; rename the container")]
    NameClash(String),
    /// The app uses the proxy's admin port.
    #[error(
        "the app uses port {0}, which the sidemesh proxy needs for its admin endpoint; move the app or opt the pod out"
    )]
    AdminPortTaken(u16),
    /// No free port was left for remapping.
    #[error("no free port is left to remap app port {0}")]
    PortsExhausted(u16),
}

/// Whether the pod wants injection: the pod annotation wins, then the namespace label.
pub fn opted_in(
    meta: &ObjectMeta,
    namespace_labels: &BTreeMap<String, String>,
) -> Result<(), Skip> {
    match meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(INJECT))
        .map(String::as_str)
    {
        Some("disabled") => return Err(Skip::OptedOut),
        Some("enabled") => return Ok(()),
        _ => {}
    }
    match namespace_labels.get(INJECT).map(String::as_str) {
        Some("enabled") => Ok(()),
        _ => Err(Skip::NotOptedIn),
    }
}

/// The workload's service name: annotation `sidemesh.io/service`, else the labels
/// `app.kubernetes.io/name` or `app`.
pub fn service_name(meta: &ObjectMeta) -> Result<String, InjectError> {
    let found = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(SERVICE))
        .or_else(|| {
            let l = meta.labels.as_ref()?;
            l.get("app.kubernetes.io/name").or_else(|| l.get("app"))
        })
        .ok_or(InjectError::NoServiceName)?;
    name::check_label(found).map_err(|reason| InjectError::BadServiceName {
        name: found.clone(),
        reason,
    })?;
    Ok(found.clone())
}

/// Whether a pod (template) is injected already.
pub fn is_injected(meta: &ObjectMeta, spec: &PodSpec) -> bool {
    meta.annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(INJECTED))
        || spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == PROXY)
}

/// Injects a pod (or pod template) of `namespace` in place. The opt-in check is the
/// caller's ([`opted_in`]); this honours opt-out and already-injected pods. `is_job` says
/// the pod runs to completion (owned by a Job).
pub fn inject(
    namespace: &str,
    meta: &mut ObjectMeta,
    spec: &mut PodSpec,
    is_job: bool,
    cfg: &InjectConfig,
    catalog: &Catalog,
) -> Result<Outcome, InjectError> {
    if meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(INJECT))
        .map(String::as_str)
        == Some("disabled")
    {
        return Ok(Outcome::Skipped(Skip::OptedOut));
    }
    if is_injected(meta, spec) {
        return Ok(Outcome::Skipped(Skip::AlreadyInjected));
    }
    if spec.containers.is_empty() {
        return Err(InjectError::NoContainers);
    }
    if spec.host_network == Some(true) {
        return Err(InjectError::HostNetwork);
    }
    let service = service_name(meta)?;
    let key = (namespace.to_owned(), service.clone());
    if let Some(problems) = catalog.rejected.get(&key) {
        return Err(InjectError::InvalidMeshConfig(problems.clone()));
    }
    let mesh = catalog.meshes.get(&key);
    if let Some(m) = mesh {
        m.validate(namespace)
            .map_err(|e| InjectError::InvalidMeshConfig(e.join("; ")))?;
    }
    let attached = resolve_plugins(mesh.map(|m| m.plugins.as_slice()).unwrap_or(&[]), catalog)?;
    let mut warnings = Vec::new();

    // Compute everything before changing anything, so an error leaves the pod untouched.
    let port_map = remap_ports(spec, cfg)?;
    let shared_env = main_container(meta, spec).map(|c| (c.env.clone(), c.env_from.clone()));
    let (shared_env, shared_env_from) = shared_env.unwrap_or_default();
    let discover = |plugin: &str| {
        format!(
            "{}/v1/sidecars/{namespace}/{service}/{plugin}",
            cfg.discover_base.trim_end_matches('/')
        )
    };
    let plugin_env = |own: &BTreeMap<String, String>, plugin: &str| {
        let mut env: Vec<EnvVar> = shared_env.clone().unwrap_or_default();
        for (k, v) in own {
            set_env(&mut env, k, v);
        }
        set_env(&mut env, DISCOVER_URL, &discover(plugin));
        env.retain(|e| e.name != DISCOVER_AUTHORIZATION && e.name != TOKEN_FILE_ENV);
        if cfg.service_account_tokens {
            // The pod's projected token (the proxy reads it again as the kubelet renews it).
            set_env(&mut env, TOKEN_FILE_ENV, &format!("{TOKEN_DIR}/token"));
            return env;
        }
        // The workload's discover token, when its Secret exists (`optional`: a pod without
        // one still starts, and polls without a token).
        env.push(EnvVar {
            name: DISCOVER_AUTHORIZATION.to_owned(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: token_secret(&service),
                    key: TOKEN_SECRET_KEY.to_owned(),
                    optional: Some(true),
                }),
                ..Default::default()
            }),
        });
        env
    };
    let existing: BTreeSet<&str> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .map(|c| c.name.as_str())
        .collect();
    let mut new_names = BTreeSet::new();
    for (p, _, _) in &attached {
        let n = container_name(&p.name);
        if existing.contains(n.as_str()) || !new_names.insert(n.clone()) {
            return Err(InjectError::NameClash(n));
        }
    }
    if existing.contains(PROXY) {
        return Err(InjectError::NameClash(PROXY.to_owned()));
    }

    // The network proxy: a `netproxy` plugin replaces the built-in image.
    let netproxy = attached.iter().find(|(_, k, _)| *k == PluginKind::Netproxy);
    let mut proxy_env = plugin_env(
        &netproxy
            .map(|(a, _, v)| variables(v, a))
            .unwrap_or_default(),
        PROXY,
    );
    for (k, path) in [
        ("SIDEMESH_POD_NAME", "metadata.name"),
        ("SIDEMESH_POD_NAMESPACE", "metadata.namespace"),
        ("SIDEMESH_POD_IP", "status.podIP"),
    ] {
        proxy_env.retain(|e| e.name != k);
        proxy_env.push(EnvVar {
            name: k.to_owned(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path.to_owned(),
                    api_version: None,
                }),
                ..Default::default()
            }),
        });
    }
    // The proxy's own flags (see docs/proxy.md): admin on the pod IP for the kubelet's
    // probes, the DNS shim where resolv.conf now points, and the last good config kept on an
    // emptyDir so a restarted proxy serves while discover is unreachable.
    set_env(
        &mut proxy_env,
        "SIDEMESH_ADMIN_ADDR",
        &format!("0.0.0.0:{}", cfg.admin_port),
    );
    set_env(&mut proxy_env, "SIDEMESH_DNS_ADDR", "127.0.0.1:53");
    set_env(&mut proxy_env, "SIDEMESH_STATE_DIR", STATE_DIR);
    let mut proxy_ports = vec![ContainerPort {
        name: Some("sm-admin".to_owned()),
        container_port: i32::from(cfg.admin_port),
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    }];
    // The volumes added below must not clash with the pod's (checked before the first change).
    let job_wrap = !cfg.native_sidecars && is_job && netproxy.is_none();
    let has_volume = |name: &str| spec.volumes.iter().flatten().any(|v| v.name == name);
    if job_wrap && has_volume(JOB_VOLUME) {
        return Err(InjectError::NameClash(JOB_VOLUME.to_owned()));
    }
    if cfg.service_account_tokens && has_volume(TOKEN_VOLUME) {
        return Err(InjectError::NameClash(TOKEN_VOLUME.to_owned()));
    }
    let moved = move_port_names(spec, &port_map);
    let mut port_names = BTreeMap::new();
    for (app, outer) in &port_map {
        let name = moved
            .get(app)
            .cloned()
            .unwrap_or_else(|| format!("sm-{}", outer.get()));
        port_names.insert(app.get().to_string(), name.clone());
        proxy_ports.push(ContainerPort {
            name: Some(name),
            container_port: i32::from(outer.get()),
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        });
    }
    let ready = Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/ready".to_owned()),
            port: IntOrString::Int(i32::from(cfg.admin_port)),
            ..Default::default()
        }),
        period_seconds: Some(2),
        failure_threshold: Some(3),
        ..Default::default()
    };
    let (image, mem, cpu, command, args) = match netproxy {
        Some((_, _, v)) => (
            v.image.clone(),
            v.memory_mib,
            v.cpu_millis,
            v.command.clone(),
            v.args.clone(),
        ),
        None => (
            cfg.proxy_image.clone(),
            cfg.proxy_memory_mib,
            Some(cfg.proxy_cpu_millis),
            Vec::new(),
            vec!["proxy".to_owned()],
        ),
    };
    let mut proxy = Container {
        name: PROXY.to_owned(),
        image: Some(image),
        command: non_empty(command),
        args: non_empty(args),
        env: Some(proxy_env),
        env_from: shared_env_from.clone(),
        ports: Some(proxy_ports),
        readiness_probe: Some(ready.clone()),
        resources: Some(resources(mem, cpu)),
        volume_mounts: Some(vec![VolumeMount {
            name: STATE_VOLUME.to_owned(),
            mount_path: STATE_DIR.to_owned(),
            ..Default::default()
        }]),
        // Port 53 for the DNS shim, whatever the runtime's unprivileged-port setting.
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_BIND_SERVICE".to_owned()]),
                drop: Some(vec!["ALL".to_owned()]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    if cfg.native_sidecars {
        proxy.restart_policy = Some("Always".to_owned());
        proxy.startup_probe = Some(Probe {
            period_seconds: Some(1),
            failure_threshold: Some(120),
            ..ready
        });
    } else {
        proxy.lifecycle = Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "/sidemesh".to_owned(),
                        "wait-ready".to_owned(),
                        "--url".to_owned(),
                        format!("http://127.0.0.1:{}/ready", cfg.admin_port),
                        "--timeout-seconds".to_owned(),
                        "120".to_owned(),
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if !cfg.native_sidecars && is_job && netproxy.is_some() {
        warnings.push("this cluster has no native sidecars (Kubernetes < 1.29) and a netproxy plugin replaces the sidemesh proxy: its container keeps the Job's pod running after the app exits".to_owned());
    }
    let token_mount = || VolumeMount {
        name: TOKEN_VOLUME.to_owned(),
        mount_path: TOKEN_DIR.to_owned(),
        read_only: Some(true),
        ..Default::default()
    };
    if cfg.service_account_tokens {
        proxy
            .volume_mounts
            .get_or_insert_with(Vec::new)
            .push(token_mount());
    }

    // Plugin containers.
    let mut inits = Vec::new();
    let mut sidecars = Vec::new();
    for (a, kind, v) in &attached {
        if *kind == PluginKind::Netproxy {
            continue;
        }
        let c = Container {
            name: container_name(&a.name),
            image: Some(v.image.clone()),
            command: non_empty(v.command.clone()),
            args: non_empty(v.args.clone()),
            env: Some(plugin_env(&variables(v, a), &a.name)),
            env_from: shared_env_from.clone(),
            resources: Some(resources(v.memory_mib, v.cpu_millis)),
            volume_mounts: cfg.service_account_tokens.then(|| vec![token_mount()]),
            ..Default::default()
        };
        match kind {
            PluginKind::Init => inits.push(c),
            // Native sidecars where the cluster has them: they stop with the app, so they do
            // not keep a Job's pod alive either.
            _ if cfg.native_sidecars => sidecars.push(Container {
                restart_policy: Some("Always".to_owned()),
                ..c
            }),
            _ => sidecars.push(c),
        }
    }

    // Apply.
    if job_wrap {
        let wrapped = wrap_job(spec, &mut proxy, &mut inits, cfg);
        if wrapped.is_empty() {
            warnings.push("this cluster has no native sidecars (Kubernetes < 1.29) and no app container sets `command`, so none can be wrapped: the sidemesh proxy keeps this Job's pod running after the app exits; set `command` (see docs/controller.md)".to_owned());
        }
        if !wrapped.is_empty() {
            for c in &spec.containers {
                if c.command.is_none() && c.name != PROXY && !c.name.starts_with("plugin-") {
                    warnings.push(format!(
                        "container {:?} sets no `command`, so the Job does not wait for it",
                        c.name
                    ));
                }
            }
        }
    }
    if cfg.service_account_tokens {
        spec.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: TOKEN_VOLUME.to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.to_owned()),
                        expiration_seconds: Some(TOKEN_SECONDS),
                        path: "token".to_owned(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: STATE_VOLUME.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".to_owned()),
            size_limit: Some(Quantity("16Mi".to_owned())),
            ..Default::default()
        }),
        ..Default::default()
    });
    // Ours first (the proxy, the init plugins in order, then native sidecar plugins, so the
    // init plugins have run before those start), then the pod's own init containers.
    let init_containers = spec.init_containers.get_or_insert_with(Vec::new);
    let mut new_inits = Vec::new();
    if cfg.native_sidecars {
        new_inits.push(proxy.clone());
    }
    new_inits.extend(inits);
    if cfg.native_sidecars {
        new_inits.append(&mut sidecars);
    }
    new_inits.append(init_containers);
    *init_containers = new_inits;
    if init_containers.is_empty() {
        spec.init_containers = None;
    }
    if !cfg.native_sidecars {
        spec.containers.insert(0, proxy);
        spec.containers.extend(sidecars);
    }

    let searches = [
        format!("{namespace}.svc.{}", cfg.cluster_domain),
        format!("svc.{}", cfg.cluster_domain),
        cfg.cluster_domain.clone(),
    ];
    let dns = spec.dns_config.get_or_insert_with(PodDNSConfig::default);
    let mut all: Vec<String> = searches.to_vec();
    for s in dns.searches.take().unwrap_or_default() {
        if !all.contains(&s) {
            all.push(s);
        }
    }
    dns.searches = Some(all);
    dns.nameservers = Some(vec!["127.0.0.1".to_owned()]);
    let mut options: Vec<PodDNSConfigOption> = dns
        .options
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter(|o| o.name.as_deref() != Some("ndots"))
        .collect();
    options.insert(
        0,
        PodDNSConfigOption {
            name: Some("ndots".to_owned()),
            value: Some(cfg.ndots.to_string()),
        },
    );
    dns.options = Some(options);
    spec.dns_policy = Some("None".to_owned());

    let ann = meta.annotations.get_or_insert_with(BTreeMap::new);
    ann.insert(INJECTED.to_owned(), env!("CARGO_PKG_VERSION").to_owned());
    ann.insert(PORT_MAP.to_owned(), port_map_annotation(&port_map));
    ann.insert(
        PORT_NAMES.to_owned(),
        serde_json::to_string(&port_names).unwrap_or_default(),
    );
    if !ann.contains_key("prometheus.io/scrape") {
        ann.insert("prometheus.io/scrape".to_owned(), "true".to_owned());
        ann.insert("prometheus.io/port".to_owned(), cfg.admin_port.to_string());
        ann.insert("prometheus.io/path".to_owned(), "/metrics".to_owned());
    }
    Ok(Outcome::Injected { port_map, warnings })
}

/// The proxy's state volume (its last good config).
pub const STATE_VOLUME: &str = "sidemesh-state";
const STATE_DIR: &str = "/var/run/sidemesh-state";

/// The shared volume of the Job fallback (see [`crate::job`]).
pub const JOB_VOLUME: &str = "sidemesh-job";
const JOB_DIR: &str = "/var/run/sidemesh-job";

/// The Job fallback for clusters without native sidecars: app containers with a `command`
/// run under `sidemesh job-run`, the proxy under `sidemesh job-sidecar`, which stops it once
/// every wrapped container is done. Returns the wrapped containers' names. `inits` gets the
/// init container that copies the binary into the shared volume, first.
fn wrap_job(
    spec: &mut PodSpec,
    proxy: &mut Container,
    inits: &mut Vec<Container>,
    cfg: &InjectConfig,
) -> Vec<String> {
    let bin = format!("{JOB_DIR}/sidemesh");
    let mount = VolumeMount {
        name: JOB_VOLUME.to_owned(),
        mount_path: JOB_DIR.to_owned(),
        ..Default::default()
    };
    let mut wrapped = Vec::new();
    for c in spec.containers.iter_mut() {
        let Some(command) = c.command.take() else {
            continue;
        };
        let done = format!("{JOB_DIR}/{}.done", c.name);
        let mut cmd = vec![
            bin.clone(),
            "job-run".to_owned(),
            "--done-file".to_owned(),
            done,
        ];
        cmd.push("--".to_owned());
        cmd.extend(command);
        c.command = Some(cmd);
        c.volume_mounts
            .get_or_insert_with(Vec::new)
            .push(mount.clone());
        wrapped.push(c.name.clone());
    }
    if wrapped.is_empty() {
        return wrapped;
    }
    let mut cmd = vec!["/sidemesh".to_owned(), "job-sidecar".to_owned()];
    for name in &wrapped {
        cmd.push("--done-file".to_owned());
        cmd.push(format!("{JOB_DIR}/{name}.done"));
    }
    cmd.push("--".to_owned());
    cmd.push("/sidemesh".to_owned());
    proxy.command = Some(cmd);
    proxy
        .volume_mounts
        .get_or_insert_with(Vec::new)
        .push(mount.clone());
    inits.insert(
        0,
        Container {
            name: "sidemesh-job-init".to_owned(),
            image: Some(cfg.proxy_image.clone()),
            command: Some(vec![
                "/sidemesh".to_owned(),
                "copy-self".to_owned(),
                "--to".to_owned(),
                bin,
            ]),
            volume_mounts: Some(vec![mount]),
            resources: Some(resources(32, Some(10))),
            ..Default::default()
        },
    );
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: JOB_VOLUME.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".to_owned()),
            size_limit: Some(Quantity("128Mi".to_owned())),
            ..Default::default()
        }),
        ..Default::default()
    });
    wrapped
}

/// The `sidemesh.io/port-map` annotation value for a remapping.
pub fn port_map_annotation(map: &[(AppPort, OuterPort)]) -> String {
    let m: BTreeMap<String, u16> = map
        .iter()
        .map(|(a, o)| (a.get().to_string(), o.get()))
        .collect();
    serde_json::to_string(&m).unwrap_or_default()
}

/// Reads a `sidemesh.io/port-map` annotation back (the controller does, for endpoint data).
/// `None` when it is absent or malformed.
pub fn parse_port_map(meta: &ObjectMeta) -> Option<BTreeMap<AppPort, OuterPort>> {
    let raw = meta.annotations.as_ref()?.get(PORT_MAP)?;
    let m: BTreeMap<String, u16> = serde_json::from_str(raw).ok()?;
    m.into_iter()
        .map(|(k, v)| Some((AppPort(k.parse().ok()?), OuterPort(v))))
        .collect()
}

/// Reads a `sidemesh.io/port-names` annotation back: app port to the proxy's port name.
/// `None` when it is absent or malformed.
pub fn parse_port_names(meta: &ObjectMeta) -> Option<BTreeMap<u16, String>> {
    let raw = meta.annotations.as_ref()?.get(PORT_NAMES)?;
    let m: BTreeMap<String, String> = serde_json::from_str(raw).ok()?;
    m.into_iter()
        .map(|(k, v)| Some((k.parse().ok()?, v)))
        .collect()
}

type Attached<'a> = (&'a AttachedPlugin, PluginKind, &'a PluginVersion);

fn resolve_plugins<'a>(
    list: &'a [AttachedPlugin],
    catalog: &'a Catalog,
) -> Result<Vec<Attached<'a>>, InjectError> {
    list.iter()
        .map(|a| {
            let p = catalog
                .plugins
                .get(&a.name)
                .ok_or_else(|| InjectError::UnknownPlugin(a.name.clone()))?;
            let v = p
                .version(a.version.as_deref())
                .ok_or_else(|| InjectError::UnknownVersion {
                    plugin: a.name.clone(),
                    version: a.version.clone().unwrap_or_else(|| "default".to_owned()),
                })?;
            Ok((a, p.kind, v))
        })
        .collect()
}

fn variables(v: &PluginVersion, a: &AttachedPlugin) -> BTreeMap<String, String> {
    let mut vars = v.variables.clone();
    vars.extend(a.variables.clone());
    vars
}

fn container_name(plugin: &str) -> String {
    format!("plugin-{plugin}")
}

/// The main container: the one `kubectl.kubernetes.io/default-container` names, else the
/// first.
fn main_container<'a>(meta: &ObjectMeta, spec: &'a PodSpec) -> Option<&'a Container> {
    let named = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get("kubectl.kubernetes.io/default-container"));
    named
        .and_then(|n| spec.containers.iter().find(|c| &c.name == n))
        .or_else(|| spec.containers.first())
}

fn set_env(env: &mut Vec<EnvVar>, name: &str, value: &str) {
    env.retain(|e| e.name != name);
    env.push(EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        value_from: None,
    });
}

fn non_empty(v: Vec<String>) -> Option<Vec<String>> {
    if v.is_empty() { None } else { Some(v) }
}

fn resources(memory_mib: u32, cpu_millis: Option<u32>) -> ResourceRequirements {
    let mem = Quantity(format!("{memory_mib}Mi"));
    let mut requests = BTreeMap::from([("memory".to_owned(), mem.clone())]);
    if let Some(c) = cpu_millis {
        requests.insert("cpu".to_owned(), Quantity(format!("{c}m")));
    }
    ResourceRequirements {
        requests: Some(requests),
        limits: Some(BTreeMap::from([("memory".to_owned(), mem)])),
        ..Default::default()
    }
}

/// Picks a `port_outer` for every TCP port the app containers declare, in container and
/// port order: the app port plus the offset when that is free, else the next free port above
/// the offset. Only the pod spec is read, so the same spec always gets the same map.
fn remap_ports(
    spec: &PodSpec,
    cfg: &InjectConfig,
) -> Result<Vec<(AppPort, OuterPort)>, InjectError> {
    let mut used: BTreeSet<u16> = BTreeSet::from([cfg.admin_port]);
    let mut app_ports = Vec::new();
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for p in c.ports.iter().flatten() {
            let Ok(port) = u16::try_from(p.container_port) else {
                continue;
            };
            used.insert(port);
            if let Some(h) = p.host_port.and_then(|h| u16::try_from(h).ok()) {
                used.insert(h);
            }
            let tcp = p.protocol.as_deref().unwrap_or("TCP") == "TCP";
            let is_app = spec.containers.iter().any(|x| std::ptr::eq(x, c));
            if tcp && is_app && !app_ports.contains(&port) {
                if port == cfg.admin_port {
                    return Err(InjectError::AdminPortTaken(port));
                }
                app_ports.push(port);
            }
        }
    }
    let offset = cfg.outer_port_offset.max(1024);
    let mut map = Vec::new();
    for port in app_ports {
        let first = port.checked_add(offset).unwrap_or(offset);
        let mut candidate = first;
        let mut tries = 0u32;
        while used.contains(&candidate) {
            tries += 1;
            if tries > u32::from(u16::MAX) {
                return Err(InjectError::PortsExhausted(port));
            }
            candidate = if candidate == u16::MAX {
                offset
            } else {
                candidate + 1
            };
        }
        used.insert(candidate);
        map.push((AppPort(port), OuterPort(candidate)));
    }
    Ok(map)
}

/// Moves the names of remapped app ports onto the proxy (returned by app port), and gives
/// probes and hooks that referred to a moved name its number instead.
fn move_port_names(spec: &mut PodSpec, map: &[(AppPort, OuterPort)]) -> BTreeMap<AppPort, String> {
    let mut moved = BTreeMap::new();
    for c in &mut spec.containers {
        let mut by_name = BTreeMap::new();
        for p in c.ports.iter_mut().flatten() {
            let Ok(port) = u16::try_from(p.container_port) else {
                continue;
            };
            if !map.iter().any(|(a, _)| a.get() == port) {
                continue;
            }
            if let Some(n) = p.name.take() {
                by_name.insert(n.clone(), p.container_port);
                moved.entry(AppPort(port)).or_insert(n);
            }
        }
        if by_name.is_empty() {
            continue;
        }
        let fix = |port: &mut IntOrString| {
            if let IntOrString::String(n) = port {
                if let Some(num) = by_name.get(n) {
                    *port = IntOrString::Int(*num);
                }
            }
        };
        // Probes and lifecycle hooks both name ports in an httpGet or a tcpSocket.
        let mut actions = Vec::new();
        for probe in [
            c.liveness_probe.as_mut(),
            c.readiness_probe.as_mut(),
            c.startup_probe.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            actions.push((probe.http_get.as_mut(), probe.tcp_socket.as_mut()));
        }
        if let Some(l) = c.lifecycle.as_mut() {
            for h in [l.post_start.as_mut(), l.pre_stop.as_mut()]
                .into_iter()
                .flatten()
            {
                actions.push((h.http_get.as_mut(), h.tcp_socket.as_mut()));
            }
        }
        for (http, tcp) in actions {
            if let Some(h) = http {
                fix(&mut h.port);
            }
            if let Some(t) = tcp {
                fix(&mut t.port);
            }
        }
    }
    moved
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    fn pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop",
                         "labels": {"app.kubernetes.io/name": "web"},
                         "annotations": {"sidemesh.io/inject": "enabled"}},
            "spec": {
                "containers": [
                    {"name": "app", "image": "web:1",
                     "env": [{"name": "DB_HOST", "value": "mysql"},
                             {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "t"}}}],
                     "ports": [{"name": "http", "containerPort": 8080},
                               {"containerPort": 9090},
                               {"containerPort": 5353, "protocol": "UDP"}],
                     "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}}},
                    {"name": "helper", "image": "helper:1",
                     "ports": [{"containerPort": 28080}]}
                ]
            }
        }))
        .unwrap()
    }

    fn catalog() -> Catalog {
        let plugins = serde_json::from_value::<BTreeMap<String, PluginSpec>>(serde_json::json!({
            "code-pull": {"kind": "init", "versions": [
                {"name": "v1", "image": "code-pull:1", "memoryMib": 32,
                 "variables": {"REPO": "https://git.example/web.git", "BRANCH": "main"}}]},
            "log-shipper": {"kind": "sidecar", "versions": [
                {"name": "v1", "image": "ship:1", "memoryMib": 48, "cpuMillis": 20,
                 "variables": {"SINK": "http://logs"}}]},
            "warmup": {"kind": "init", "versions": [
                {"name": "v3", "image": "warm:3", "memoryMib": 16}]}
        }))
        .unwrap();
        let mesh: MeshConfigSpec = serde_json::from_value(serde_json::json!({
            "plugins": [
                {"name": "code-pull", "variables": {"BRANCH": "release"}},
                {"name": "log-shipper"},
                {"name": "warmup"}
            ]
        }))
        .unwrap();
        Catalog {
            plugins,
            meshes: BTreeMap::from([(("shop".to_owned(), "web".to_owned()), mesh)]),
            rejected: BTreeMap::new(),
        }
    }

    fn init_names(spec: &PodSpec) -> Vec<&str> {
        spec.init_containers
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect()
    }

    fn run(p: &mut Pod, cfg: &InjectConfig, cat: &Catalog) -> Result<Outcome, InjectError> {
        let spec = p.spec.as_mut().unwrap();
        inject("shop", &mut p.metadata, spec, false, cfg, cat)
    }

    fn env_of(c: &Container) -> BTreeMap<String, String> {
        c.env
            .iter()
            .flatten()
            .map(|e| {
                (
                    e.name.clone(),
                    e.value.clone().unwrap_or_else(|| "<from>".into()),
                )
            })
            .collect()
    }

    #[test]
    fn native_sidecar_first_then_init_plugins_in_order() {
        let mut p = pod();
        let out = run(&mut p, &InjectConfig::default(), &catalog()).unwrap();
        assert!(matches!(out, Outcome::Injected { .. }));
        let spec = p.spec.unwrap();
        let inits = init_names(&spec);
        assert_eq!(
            inits,
            [
                "sidemesh-proxy",
                "plugin-code-pull",
                "plugin-warmup",
                "plugin-log-shipper"
            ]
        );
        let all = spec.init_containers.as_ref().unwrap();
        assert_eq!(all[0].restart_policy.as_deref(), Some("Always"));
        assert!(all[0].startup_probe.is_some() && all[0].lifecycle.is_none());
        assert_eq!(
            all[1].restart_policy, None,
            "init plugins run to completion"
        );
        assert_eq!(
            all[3].restart_policy.as_deref(),
            Some("Always"),
            "a native sidecar"
        );
        let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["app", "helper"]);
    }

    #[test]
    fn legacy_cluster_gets_first_container_with_post_start_wait() {
        let mut p = pod();
        let cfg = InjectConfig {
            native_sidecars: false,
            ..Default::default()
        };
        run(&mut p, &cfg, &catalog()).unwrap();
        let spec = p.spec.unwrap();
        assert_eq!(spec.containers[0].name, PROXY);
        let hook = spec.containers[0]
            .lifecycle
            .as_ref()
            .unwrap()
            .post_start
            .as_ref()
            .unwrap();
        let cmd = hook.exec.as_ref().unwrap().command.as_ref().unwrap();
        assert!(
            cmd.contains(&"http://127.0.0.1:15021/ready".to_owned()),
            "{cmd:?}"
        );
        assert!(spec.containers[0].restart_policy.is_none());
        let inits = init_names(&spec);
        assert_eq!(inits, ["plugin-code-pull", "plugin-warmup"]);
        let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, [PROXY, "app", "helper", "plugin-log-shipper"]);
    }

    #[test]
    fn job_on_legacy_cluster_without_command_warns() {
        let mut p = pod();
        let cfg = InjectConfig {
            native_sidecars: false,
            ..Default::default()
        };
        let spec = p.spec.as_mut().unwrap();
        let out = inject("shop", &mut p.metadata, spec, true, &cfg, &catalog()).unwrap();
        let Outcome::Injected { warnings, .. } = out else {
            panic!()
        };
        assert!(warnings[0].contains("set `command`"), "{warnings:?}");
        assert_eq!(
            p.spec.unwrap().volumes.unwrap().len(),
            1,
            "only the state volume"
        );
    }

    #[test]
    fn job_on_legacy_cluster_is_wrapped_so_it_finishes() {
        let mut p = pod();
        let cfg = InjectConfig {
            native_sidecars: false,
            ..Default::default()
        };
        let spec = p.spec.as_mut().unwrap();
        spec.containers[0].command = Some(vec!["/web".into(), "migrate".into()]);
        let out = inject("shop", &mut p.metadata, spec, true, &cfg, &catalog()).unwrap();
        let Outcome::Injected { warnings, .. } = out else {
            panic!()
        };
        assert_eq!(
            warnings,
            ["container \"helper\" sets no `command`, so the Job does not wait for it"]
        );
        let spec = p.spec.unwrap();
        let app = spec.containers.iter().find(|c| c.name == "app").unwrap();
        assert_eq!(
            app.command.as_deref().unwrap(),
            [
                "/var/run/sidemesh-job/sidemesh",
                "job-run",
                "--done-file",
                "/var/run/sidemesh-job/app.done",
                "--",
                "/web",
                "migrate"
            ]
        );
        let proxy = &spec.containers[0];
        assert_eq!(
            proxy.command.as_deref().unwrap(),
            [
                "/sidemesh",
                "job-sidecar",
                "--done-file",
                "/var/run/sidemesh-job/app.done",
                "--",
                "/sidemesh"
            ]
        );
        assert_eq!(proxy.args.as_deref().unwrap(), ["proxy"]);
        assert_eq!(
            init_names(&spec),
            ["sidemesh-job-init", "plugin-code-pull", "plugin-warmup"]
        );
        let volumes: Vec<_> = spec.volumes.unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(volumes, [JOB_VOLUME, STATE_VOLUME]);
        // A Job that has a volume of that name already is refused, untouched.
        let mut p = pod();
        let spec = p.spec.as_mut().unwrap();
        spec.containers[0].command = Some(vec!["/web".into()]);
        spec.volumes = Some(vec![Volume {
            name: JOB_VOLUME.into(),
            ..Default::default()
        }]);
        let before = p.clone();
        let spec = p.spec.as_mut().unwrap();
        let out = inject("shop", &mut p.metadata, spec, true, &cfg, &catalog());
        assert!(matches!(out, Err(InjectError::NameClash(n)) if n == JOB_VOLUME));
        assert_eq!(p, before);
        // Native sidecars need none of this.
        let mut p = pod();
        let spec = p.spec.as_mut().unwrap();
        spec.containers[0].command = Some(vec!["/web".into()]);
        inject(
            "shop",
            &mut p.metadata,
            spec,
            true,
            &InjectConfig::default(),
            &catalog(),
        )
        .unwrap();
        assert_eq!(
            p.spec.unwrap().containers[0].command.as_deref().unwrap(),
            ["/web"]
        );
    }

    #[test]
    fn service_account_tokens_replace_the_secret_for_every_container_that_polls() {
        let cfg = InjectConfig {
            service_account_tokens: true,
            ..InjectConfig::default()
        };
        let mut p = pod();
        // An app that sets the token variables itself: its values must not reach plugins.
        let app = &mut p.spec.as_mut().unwrap().containers[0];
        app.env.as_mut().unwrap().push(EnvVar {
            name: TOKEN_FILE_ENV.into(),
            value: Some("/elsewhere".into()),
            value_from: None,
        });
        run(&mut p, &cfg, &catalog()).unwrap();
        let spec = p.spec.unwrap();
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == TOKEN_VOLUME)
            .unwrap();
        let source = &volume.projected.as_ref().unwrap().sources.as_ref().unwrap()[0];
        let token = source.service_account_token.as_ref().unwrap();
        assert_eq!(token.audience.as_deref(), Some(TOKEN_AUDIENCE));
        assert_eq!(token.path, "token");
        assert_eq!(token.expiration_seconds, Some(3600));
        let ours: Vec<&Container> = spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .filter(|c| c.name == PROXY || c.name.starts_with("plugin-"))
            .collect();
        assert_eq!(ours.len(), 4);
        for c in ours {
            let env = env_of(c);
            assert_eq!(
                env[TOKEN_FILE_ENV],
                format!("{TOKEN_DIR}/token"),
                "{}",
                c.name
            );
            assert!(!env.contains_key(DISCOVER_AUTHORIZATION), "{}", c.name);
            let mount = c
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == TOKEN_VOLUME)
                .unwrap();
            assert_eq!(
                (mount.mount_path.as_str(), mount.read_only),
                (TOKEN_DIR, Some(true))
            );
        }
        // The app keeps its own variables and gets no token.
        let app = spec.containers.iter().find(|c| c.name == "app").unwrap();
        assert_eq!(env_of(app)[TOKEN_FILE_ENV], "/elsewhere");
        assert!(
            app.volume_mounts
                .iter()
                .flatten()
                .all(|m| m.name != TOKEN_VOLUME)
        );

        // A pod that already has a volume of that name is refused, untouched.
        let mut p = pod();
        p.spec.as_mut().unwrap().volumes = Some(vec![Volume {
            name: TOKEN_VOLUME.into(),
            ..Default::default()
        }]);
        let before = p.clone();
        assert!(matches!(
            run(&mut p, &cfg, &catalog()),
            Err(InjectError::NameClash(n)) if n == TOKEN_VOLUME
        ));
        assert_eq!(p, before);
    }

    #[test]
    fn env_is_shared_and_variables_stay_private() {
        let mut p = pod();
        run(&mut p, &InjectConfig::default(), &catalog()).unwrap();
        let spec = p.spec.unwrap();
        let all: Vec<&Container> = spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .collect();
        let find = |n: &str| all.iter().find(|c| c.name == n).unwrap();
        let pull = env_of(find("plugin-code-pull"));
        assert_eq!(pull["DB_HOST"], "mysql");
        assert_eq!(pull["TOKEN"], "<from>");
        assert_eq!(
            pull["BRANCH"], "release",
            "workload variable overrides the default"
        );
        assert_eq!(pull["REPO"], "https://git.example/web.git");
        assert_eq!(
            pull["DISCOVER_URL"],
            "http://sidemesh-discover.sidemesh.svc:8080/v1/sidecars/shop/web/code-pull"
        );
        let ship = env_of(find("plugin-log-shipper"));
        assert_eq!(ship["DB_HOST"], "mysql");
        assert_eq!(ship["SINK"], "http://logs");
        assert!(!ship.contains_key("REPO") && !ship.contains_key("BRANCH"));
        let proxy = env_of(find(PROXY));
        assert!(proxy["DISCOVER_URL"].ends_with("/shop/web/sidemesh-proxy"));
        assert!(!proxy.contains_key("SINK") && !proxy.contains_key("REPO"));
        let app = env_of(find("app"));
        assert!(!app.contains_key("DISCOVER_URL") && !app.contains_key("SINK"));
        // Every container that polls discover gets the workload's token, from its optional
        // Secret; the app does not.
        for c in [
            find(PROXY),
            find("plugin-code-pull"),
            find("plugin-log-shipper"),
        ] {
            let e = c
                .env
                .iter()
                .flatten()
                .find(|e| e.name == DISCOVER_AUTHORIZATION)
                .unwrap_or_else(|| panic!("{} has no token", c.name));
            let r = e
                .value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap();
            assert_eq!(
                (r.name.as_str(), r.key.as_str(), r.optional),
                ("sidemesh-discover-token-web", TOKEN_SECRET_KEY, Some(true))
            );
        }
        assert!(!app.contains_key(DISCOVER_AUTHORIZATION));
        let res = find("plugin-log-shipper").resources.clone().unwrap();
        assert_eq!(res.limits.unwrap()["memory"].0, "48Mi");
        assert_eq!(res.requests.unwrap()["cpu"].0, "20m");
    }

    #[test]
    fn ports_remap_without_collisions_and_names_move_to_the_proxy() {
        let mut p = pod();
        let out = run(&mut p, &InjectConfig::default(), &catalog()).unwrap();
        let Outcome::Injected { port_map, .. } = out else {
            panic!()
        };
        // 8080 + 20000 = 28080 is taken by the helper container: the next free port is used.
        // 28080 itself is an app port of the helper and is remapped too (offset wraps up).
        assert_eq!(
            port_map,
            [
                (AppPort(8080), OuterPort(28081)),
                (AppPort(9090), OuterPort(29090)),
                (AppPort(28080), OuterPort(48080)),
            ]
        );
        let ann = p.metadata.annotations.as_ref().unwrap();
        assert_eq!(
            ann[PORT_MAP],
            r#"{"28080":48080,"8080":28081,"9090":29090}"#
        );
        assert_eq!(
            parse_port_map(&p.metadata).unwrap()[&AppPort(8080)],
            OuterPort(28081)
        );
        // The proxy's port names by app port, for numeric targetPort rewrites.
        let names = parse_port_names(&p.metadata).unwrap();
        assert_eq!(names[&8080], "http");
        assert_eq!(names[&9090], "sm-29090");
        assert_eq!(names[&28080], "sm-48080");
        let spec = p.spec.unwrap();
        let proxy = &spec.init_containers.as_ref().unwrap()[0];
        let ports: Vec<_> = proxy
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap(), p.container_port))
            .collect();
        assert_eq!(
            ports,
            [
                ("sm-admin".into(), 15021),
                ("http".into(), 28081),
                ("sm-29090".into(), 29090),
                ("sm-48080".into(), 48080)
            ]
        );
        let app = &spec.containers[0];
        assert_eq!(app.ports.as_ref().unwrap()[0].name, None);
        let probe = app
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(probe.port, IntOrString::Int(8080));
        let all: Vec<i32> = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .flat_map(|c| c.ports.iter().flatten().map(|p| p.container_port))
            .collect();
        let uniq: BTreeSet<_> = all.iter().collect();
        assert_eq!(uniq.len(), all.len(), "ports collide: {all:?}");
    }

    #[test]
    fn remap_is_stable_for_the_same_spec() {
        let (mut a, mut b) = (pod(), pod());
        a.metadata.name = Some("web-2".into());
        run(&mut a, &InjectConfig::default(), &catalog()).unwrap();
        run(&mut b, &InjectConfig::default(), &catalog()).unwrap();
        assert_eq!(a.spec, b.spec);
        assert_eq!(a.metadata.annotations, b.metadata.annotations);
    }

    #[test]
    fn dns_points_at_the_shim_and_scrape_annotations_are_set() {
        let mut p = pod();
        run(&mut p, &InjectConfig::default(), &catalog()).unwrap();
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.dns_policy.as_deref(), Some("None"));
        let dns = spec.dns_config.as_ref().unwrap();
        assert_eq!(dns.nameservers.as_deref().unwrap(), ["127.0.0.1"]);
        assert_eq!(
            dns.searches.as_deref().unwrap(),
            [
                "shop.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        assert_eq!(dns.options.as_ref().unwrap()[0].value.as_deref(), Some("5"));
        let ann = p.metadata.annotations.unwrap();
        assert_eq!(ann["prometheus.io/scrape"], "true");
        assert_eq!(ann["prometheus.io/port"], "15021");
    }

    #[test]
    fn app_scrape_annotations_are_kept() {
        let mut p = pod();
        let ann = p.metadata.annotations.as_mut().unwrap();
        ann.insert("prometheus.io/scrape".into(), "true".into());
        ann.insert("prometheus.io/port".into(), "9090".into());
        run(&mut p, &InjectConfig::default(), &catalog()).unwrap();
        assert_eq!(
            p.metadata.annotations.unwrap()["prometheus.io/port"],
            "9090"
        );
    }

    #[test]
    fn second_pass_changes_nothing() {
        let mut p = pod();
        run(&mut p, &InjectConfig::default(), &catalog()).unwrap();
        let once = p.clone();
        let out = run(&mut p, &InjectConfig::default(), &catalog()).unwrap();
        assert_eq!(out, Outcome::Skipped(Skip::AlreadyInjected));
        assert_eq!(p, once);
    }

    #[test]
    fn opt_in_and_opt_out() {
        let mut p = pod();
        let ns_on = BTreeMap::from([(INJECT.to_owned(), "enabled".to_owned())]);
        assert_eq!(opted_in(&p.metadata, &BTreeMap::new()), Ok(()));
        p.metadata.annotations.as_mut().unwrap().remove(INJECT);
        assert_eq!(
            opted_in(&p.metadata, &BTreeMap::new()),
            Err(Skip::NotOptedIn)
        );
        assert_eq!(opted_in(&p.metadata, &ns_on), Ok(()));
        p.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(INJECT.into(), "disabled".into());
        assert_eq!(opted_in(&p.metadata, &ns_on), Err(Skip::OptedOut));
        let before = p.clone();
        assert_eq!(
            run(&mut p, &InjectConfig::default(), &catalog()),
            Ok(Outcome::Skipped(Skip::OptedOut))
        );
        assert_eq!(p, before);
    }

    type Mutation = Box<dyn Fn(&mut Pod, &mut Catalog)>;

    #[test]
    fn errors_leave_the_pod_untouched() {
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|p, _| p.spec.as_mut().unwrap().host_network = Some(true)),
                "hostNetwork",
            ),
            (
                Box::new(|p, _| {
                    p.metadata.labels = None;
                }),
                "sidemesh.io/service",
            ),
            (
                Box::new(|p, _| {
                    p.metadata
                        .annotations
                        .as_mut()
                        .unwrap()
                        .insert(SERVICE.into(), "Web_1".into());
                }),
                "DNS label",
            ),
            (
                Box::new(|_, c| {
                    c.plugins.remove("warmup");
                }),
                "no Plugin object",
            ),
            (
                Box::new(|p, _| {
                    p.spec.as_mut().unwrap().containers[1].name = "plugin-warmup".into()
                }),
                "rename the container",
            ),
            (
                Box::new(|p, _| {
                    p.spec.as_mut().unwrap().containers[0]
                        .ports
                        .as_mut()
                        .unwrap()[1]
                        .container_port = 15021
                }),
                "admin endpoint",
            ),
            (
                Box::new(|_, c| {
                    c.meshes.values_mut().next().unwrap().allow_clients =
                        Some(vec!["bad client".into()]);
                }),
                "MeshConfig",
            ),
        ];
        for (mutate, want) in cases {
            let (mut p, mut cat) = (pod(), catalog());
            mutate(&mut p, &mut cat);
            let before = p.clone();
            let err = run(&mut p, &InjectConfig::default(), &cat).unwrap_err();
            assert!(err.to_string().contains(want), "{err} lacks {want:?}");
            assert_eq!(p, before);
        }
    }

    #[test]
    fn rejected_mesh_config_denies_its_pods() {
        let mut cat = catalog();
        cat.rejected.insert(
            ("shop".into(), "web".into()),
            "spec.plugins[0]: no valid Plugin named \"x\"".into(),
        );
        let err = run(&mut pod(), &InjectConfig::default(), &cat).unwrap_err();
        assert!(
            err.to_string()
                .contains("MeshConfig for this workload is invalid: spec.plugins[0]"),
            "{err}"
        );
    }

    #[test]
    fn netproxy_plugin_replaces_the_builtin_proxy() {
        let mut cat = catalog();
        cat.plugins.insert(
            "my-proxy".into(),
            serde_json::from_value(serde_json::json!({"kind": "netproxy", "versions": [
                {"name": "v1", "image": "myproxy:1", "memoryMib": 128,
                 "variables": {"MODE": "fast"}}]}))
            .unwrap(),
        );
        cat.meshes.values_mut().next().unwrap().plugins = vec![AttachedPlugin {
            name: "my-proxy".into(),
            version: None,
            variables: BTreeMap::new(),
        }];
        let mut p = pod();
        run(&mut p, &InjectConfig::default(), &cat).unwrap();
        let spec = p.spec.unwrap();
        let proxy = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(proxy.image.as_deref(), Some("myproxy:1"));
        assert_eq!(env_of(proxy)["MODE"], "fast");
        assert_eq!(spec.init_containers.as_ref().unwrap().len(), 1);
    }

    #[test]
    fn versions_with_native_sidecars() {
        assert!(supports_native_sidecars("1", "29"));
        assert!(supports_native_sidecars("1", "31+"));
        assert!(!supports_native_sidecars("1", "28"));
        assert!(!supports_native_sidecars("x", "y"));
        assert!(supports_native_sidecars("2", "0"));
    }
}
