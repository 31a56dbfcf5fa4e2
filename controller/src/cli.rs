//! The controller crate's command-line edge: `sidemesh inject`, `sidemesh install`,
//! `sidemesh wait-ready` and `sidemesh controller`. Flags parse here; the work is in the
//! library modules.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::inject::{Catalog, InjectConfig};
use crate::manifest;

/// Injection settings shared by the webhook and `sidemesh inject`.
#[derive(clap::Args, Clone, Debug)]
pub struct InjectSettings {
    /// The sidemesh image the proxy container runs (`sidemesh proxy`).
    #[arg(
        long,
        env = "SIDEMESH_PROXY_IMAGE",
        default_value = "ghcr.io/sidemesh/sidemesh:latest"
    )]
    pub proxy_image: String,
    /// The discover service's base URL that plugins' `DISCOVER_URL`s start with.
    #[arg(
        long,
        env = "SIDEMESH_DISCOVER_BASE",
        default_value = "http://sidemesh-discover.sidemesh.svc:8080"
    )]
    pub discover_base: String,
    /// Inject the proxy as a native sidecar (Kubernetes 1.29+). The controller detects this
    /// from the API server's version unless set.
    #[arg(long, env = "SIDEMESH_NATIVE_SIDECARS")]
    pub native_sidecars: Option<bool>,
    /// The proxy's admin port (`/ready`, `/metrics`).
    #[arg(long, env = "SIDEMESH_PROXY_ADMIN_PORT", default_value_t = 15021)]
    pub proxy_admin_port: u16,
    /// Proxy memory request and limit, in MiB.
    #[arg(long, env = "SIDEMESH_PROXY_MEMORY_MIB", default_value_t = 64)]
    pub proxy_memory_mib: u32,
    /// Proxy CPU request, in millicores.
    #[arg(long, env = "SIDEMESH_PROXY_CPU_MILLIS", default_value_t = 50)]
    pub proxy_cpu_millis: u32,
    /// The cluster's DNS domain.
    #[arg(long, env = "SIDEMESH_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Authenticate sidecars to discover with their pods' own service-account tokens: the
    /// injector mounts each pod a projected token for audience `sidemesh-discover` (instead
    /// of the optional `sidemesh-discover-token-<svc>` Secret), and the hosted discover
    /// checks it with a TokenReview: a service account may fetch the configs and
    /// certificates of its own namespace's workloads.
    #[arg(long, env = "SIDEMESH_DISCOVER_SERVICE_ACCOUNT_TOKENS")]
    pub discover_service_account_tokens: bool,
}

impl InjectSettings {
    /// The injection config, with `native` used when the flag was not given.
    pub fn config(&self, native: bool) -> InjectConfig {
        InjectConfig {
            proxy_image: self.proxy_image.clone(),
            proxy_memory_mib: self.proxy_memory_mib,
            proxy_cpu_millis: self.proxy_cpu_millis,
            discover_base: self.discover_base.clone(),
            native_sidecars: self.native_sidecars.unwrap_or(native),
            cluster_domain: self.cluster_domain.clone(),
            admin_port: self.proxy_admin_port,
            service_account_tokens: self.discover_service_account_tokens,
            ..InjectConfig::default()
        }
    }
}

/// `sidemesh inject`: inject manifests offline and print them.
#[derive(clap::Args, Debug)]
pub struct InjectArgs {
    /// The manifest file (multi-document YAML); `-` reads standard input.
    #[arg(short = 'f', long = "filename", env = "SIDEMESH_INJECT_FILE")]
    pub file: PathBuf,
    /// The namespace of objects that name none.
    #[arg(short, long, env = "SIDEMESH_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// YAML files with `Plugin` and `MeshConfig` objects to inject from (the manifest's own
    /// such documents are read too).
    #[arg(long, env = "SIDEMESH_CATALOG", value_delimiter = ',')]
    pub catalog: Vec<PathBuf>,
    /// Injection settings.
    #[command(flatten)]
    pub settings: InjectSettings,
}

fn read_input(path: &PathBuf) -> anyhow::Result<String> {
    let mut text = String::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
    } else {
        text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
    }
    Ok(text)
}

/// Runs `sidemesh inject`: the injected manifests go to stdout, one line per workload to
/// stderr. Any workload that cannot be injected fails the command and prints nothing.
pub fn inject(args: InjectArgs) -> anyhow::Result<()> {
    let text = read_input(&args.file)?;
    let mut catalog = Catalog::default();
    for path in &args.catalog {
        let c = read_input(path)?;
        manifest::catalog_from_yaml(&c, &args.namespace, &mut catalog)
            .with_context(|| format!("in {}", path.display()))?;
    }
    manifest::catalog_from_yaml(&text, &args.namespace, &mut catalog)?;
    let cfg = args.settings.config(true);
    match manifest::inject_yaml(&text, &args.namespace, &cfg, &catalog) {
        Ok((out, reports)) => {
            for r in &reports {
                eprintln!("{}", manifest::describe(r));
            }
            std::io::stdout().write_all(out.as_bytes())?;
            Ok(())
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            anyhow::bail!("{} object(s) could not be injected", errors.len())
        }
    }
}

/// `sidemesh wait-ready`: wait until a URL answers 200 (the legacy sidecar's `postStart`
/// hook, which holds the app container until the proxy is ready).
#[derive(clap::Args, Debug)]
pub struct WaitReadyArgs {
    /// The URL to poll, `http://host:port/path`.
    #[arg(long, env = "SIDEMESH_WAIT_URL")]
    pub url: String,
    /// Give up after this many seconds.
    #[arg(long, env = "SIDEMESH_WAIT_TIMEOUT_SECONDS", default_value_t = 120)]
    pub timeout_seconds: u64,
}

/// Runs `sidemesh wait-ready`.
pub async fn wait_ready(args: WaitReadyArgs) -> anyhow::Result<()> {
    let rest = args
        .url
        .strip_prefix("http://")
        .context("--url must start with http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_seconds);
    loop {
        if http_ok(authority, path).await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("{} not ready after {} s", args.url, args.timeout_seconds);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One bounded `GET`; true on a 200 status line.
async fn http_ok(authority: &str, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(authority).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        // The status line is all we need; read at most 64 bytes of it.
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.ok()?;
        let line = std::str::from_utf8(&buf[..n]).ok()?;
        Some(line.starts_with("HTTP/1.1 200") || line.starts_with("HTTP/1.0 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(true))
    )
}

/// `sidemesh install`: print the install manifests.
#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// The sidemesh image for the controller and the proxies.
    #[arg(long, env = "SIDEMESH_IMAGE", default_value_t = crate::install::default_image())]
    pub image: String,
    /// Let cert-manager issue the webhook certificate instead of generating one now (the
    /// output then holds no private key; `deploy/sidemesh.yaml` is this form).
    #[arg(long, env = "SIDEMESH_CERT_MANAGER")]
    pub cert_manager: bool,
    /// Where the controller's mesh CA (which signs sidecar certificates) comes from:
    /// `per-replica` (each replica makes one at start), `secret` (mount the Secret
    /// `sidemesh-mesh-ca` you create, with `ca.crt` and `ca.key`), or `generate` (make one
    /// now and print it as that Secret).
    #[arg(long, env = "SIDEMESH_INSTALL_MESH_CA", default_value = "per-replica", value_parser = ["per-replica", "secret", "generate"])]
    pub mesh_ca: String,
}

/// Runs `sidemesh install`.
pub fn install(args: InstallArgs) -> anyhow::Result<()> {
    use crate::install;
    let mesh_ca = match args.mesh_ca.as_str() {
        "secret" => install::MeshCa::Secret,
        "generate" => install::generate_mesh_ca()?,
        _ => install::MeshCa::PerReplica,
    };
    let opts = install::InstallOptions {
        image: args.image,
        cert_manager: args.cert_manager,
        mesh_ca,
    };
    let certs = if opts.cert_manager {
        None
    } else {
        Some(install::generate_certs(&install::webhook_dns_names())?)
    };
    let yaml = install::to_yaml(&install::manifests(&opts, certs.as_ref()));
    std::io::stdout().write_all(yaml.as_bytes())?;
    Ok(())
}

/// `sidemesh controller`: watch Kubernetes, serve discover from it, run the webhook.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address of the admission webhook (HTTPS).
    #[arg(long, env = "SIDEMESH_WEBHOOK_LISTEN", default_value = "0.0.0.0:9443")]
    pub webhook_listen: std::net::SocketAddr,
    /// Address of the discover API (HTTP) that sidecars poll.
    #[arg(long, env = "SIDEMESH_DISCOVER_LISTEN", default_value = "0.0.0.0:8080")]
    pub discover_listen: std::net::SocketAddr,
    /// Address of `/ready`, `/live` and `/metrics` (HTTP).
    #[arg(long, env = "SIDEMESH_ADMIN_LISTEN", default_value = "0.0.0.0:9990")]
    pub admin_listen: std::net::SocketAddr,
    /// The webhook's certificate chain (PEM); re-read when it changes.
    #[arg(long, env = "SIDEMESH_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// The webhook's private key (PEM); re-read when it changes.
    #[arg(long, env = "SIDEMESH_TLS_KEY")]
    pub tls_key: PathBuf,
    /// How often the certificate files are checked for changes, in seconds.
    #[arg(long, env = "SIDEMESH_TLS_RELOAD_SECONDS", default_value_t = 5)]
    pub tls_reload_seconds: u64,
    /// Changes within this many milliseconds are indexed together.
    #[arg(long, env = "SIDEMESH_INDEX_DEBOUNCE_MS", default_value_t = 50)]
    pub index_debounce_ms: u64,
    /// Elect one leader among the replicas (a `coordination.k8s.io` Lease) for the writes
    /// (status conditions); every replica serves discover and the webhook either way.
    #[arg(long, env = "SIDEMESH_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// The Lease replicas elect the leader with, as `namespace/name`.
    #[arg(
        long,
        env = "SIDEMESH_LEASE",
        default_value = "sidemesh/sidemesh-controller"
    )]
    pub lease: String,
    /// This replica's identity in the Lease (the pod name; default: host name and pid).
    #[arg(long, env = "SIDEMESH_POD_NAME")]
    pub pod_name: Option<String>,
    /// The cluster DNS Service (`namespace/name`); its ClusterIP is the DNS shims' upstream.
    #[arg(
        long,
        env = "SIDEMESH_CLUSTER_DNS",
        default_value = "kube-system/kube-dns"
    )]
    pub cluster_dns: String,
    /// Injection settings.
    #[command(flatten)]
    pub settings: InjectSettings,
}

/// Where the controller's cluster state goes: the discover server hosted in the same
/// process. `src/main.rs` implements it over `sidemesh-discover` (this crate does not
/// depend on it).
pub trait DiscoverHost: Send + Sync + 'static {
    /// Starts serving the discover API on `listener`, in the background.
    fn serve(&self, listener: tokio::net::TcpListener) -> std::io::Result<()>;
    /// Replaces the cluster state discover serves (and marks discover ready).
    fn set_state(&self, state: sidemesh_api::state::ClusterState);
    /// Replaces some services of the state discover serves (`upsert`, whole) and removes
    /// others (`remove`, as `(namespace, name)`); discover re-renders only what they affect.
    fn apply(&self, upsert: Vec<sidemesh_api::state::Service>, remove: Vec<(String, String)>);
    /// From now on, checks the bearer tokens of workload requests with `reviews`
    /// (`--discover-service-account-tokens`).
    fn review_tokens(&self, reviews: crate::review::TokenReviews) -> anyhow::Result<()>;
}

/// This replica's Lease identity when no pod name is given: host name and process id.
fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "sidemesh-controller".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Runs the controller with the API server from the usual kubeconfig or in-cluster config,
/// until SIGINT or SIGTERM.
pub async fn run(
    args: Args,
    registry: prometheus::Registry,
    discover: std::sync::Arc<dyn DiscoverHost>,
) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (kubeconfig or in-cluster config)")?;
    let running = start(args, &registry, client, discover).await?;
    // Watch for the stop signal before announcing readiness (see shutdown::signal).
    let stop = sidemesh_api::shutdown::signal();
    println!("{}", running.ready_line());
    stop.await;
    tracing::info!("controller stopping");
    drop(running);
    Ok(())
}

/// A running controller; everything stops when it is dropped.
#[derive(Debug)]
pub struct Running {
    /// The webhook's bound address.
    pub webhook: std::net::SocketAddr,
    /// The discover API's bound address.
    pub discover: std::net::SocketAddr,
    /// The admin server's bound address.
    pub admin: std::net::SocketAddr,
    /// True once the first complete index is published.
    pub ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// The JSON ready line.
    pub fn ready_line(&self) -> String {
        serde_json::json!({
            "ready": "controller",
            "webhook": self.webhook.to_string(),
            "discover": self.discover.to_string(),
            "admin": self.admin.to_string(),
        })
        .to_string()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts every part of the controller against `client`: the watches and index, the status
/// writer, the webhook, the admin server, and discover through `discover`.
pub async fn start(
    args: Args,
    registry: &prometheus::Registry,
    client: kube::Client,
    discover: std::sync::Arc<dyn DiscoverHost>,
) -> anyhow::Result<Running> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use crate::{index, watch, webhook};

    let native = match args.settings.native_sidecars {
        Some(n) => n,
        None => match client.apiserver_version().await {
            Ok(v) => crate::inject::supports_native_sidecars(&v.major, &v.minor),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the API server version; injecting legacy sidecars");
                false
            }
        },
    };
    let inject_cfg = args.settings.config(native);
    if inject_cfg.service_account_tokens {
        // Before discover serves: no request may slip through unchecked.
        discover.review_tokens(crate::review::TokenReviews::new(client.clone()))?;
    }
    let (dns_ns, dns_name) = args
        .cluster_dns
        .split_once('/')
        .context("--cluster-dns must be namespace/name")?;
    let index_cfg = index::IndexConfig {
        cluster_domain: inject_cfg.cluster_domain.clone(),
        cluster_dns: (dns_ns.to_owned(), dns_name.to_owned()),
        ..index::IndexConfig::default()
    };

    let cert = crate::tls::ReloadingCert::load(&args.tls_cert, &args.tls_key)?;
    let tls = cert.server_config()?;
    let webhook_listener = tokio::net::TcpListener::bind(args.webhook_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.webhook_listen))?;
    let discover_listener = tokio::net::TcpListener::bind(args.discover_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.discover_listen))?;
    let admin_listener = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.admin_listen))?;
    let (webhook_addr, discover_addr, admin_addr) = (
        webhook_listener.local_addr()?,
        discover_listener.local_addr()?,
        admin_listener.local_addr()?,
    );

    let mut tasks = Vec::new();
    let changed = Arc::new(watch::Changes::default());
    let watch_metrics = watch::Metrics::new(registry)?;
    let (stores, watch_tasks) = watch::start(&client, changed.clone(), &watch_metrics);
    tasks.extend(watch_tasks);

    let (lookups_tx, lookups_rx) =
        tokio::sync::watch::channel(Arc::new(webhook::Lookups::default()));
    let (built_tx, mut built_rx) =
        tokio::sync::watch::channel(Arc::new(std::collections::BTreeMap::<
            index::ObjectKey,
            index::DesiredStatus,
        >::new()));
    let ready = Arc::new(AtomicBool::new(false));
    let host = discover.clone();
    tasks.push(tokio::spawn(watch::run_index(
        stores.clone(),
        changed,
        index_cfg,
        Duration::from_millis(args.index_debounce_ms),
        watch_metrics,
        ready.clone(),
        move |update| match update {
            crate::live::Update::Full(built) => {
                // Moved apart, not cloned: at 10k services a deep copy costs more than the
                // build.
                let index::Built {
                    state,
                    lookups,
                    statuses,
                    ..
                } = *built;
                host.set_state(state);
                lookups_tx.send_replace(Arc::new(lookups));
                built_tx.send_replace(Arc::new(statuses));
            }
            crate::live::Update::Delta { upsert, remove } => host.apply(upsert, remove),
        },
    )));

    // Leadership: only the leader writes. Without election this replica always leads.
    let (leading_tx, mut leading_rx) = tokio::sync::watch::channel(!args.leader_elect);
    let leading_rx_for_patches = leading_rx.clone();
    if args.leader_elect {
        let (ns, name) = args
            .lease
            .split_once('/')
            .context("--lease must be namespace/name")?;
        let identity = args.pod_name.clone().unwrap_or_else(default_identity);
        let cfg = crate::lease::LeaseConfig::new(ns, name, &identity);
        let elector = crate::lease::Elector::new(client.clone(), cfg);
        tasks.push(tokio::spawn(elector.run(leading_tx)));
    } else {
        tasks.push(tokio::spawn(async move {
            let _leading = leading_tx; // kept, so the writer's channel stays open
            std::future::pending::<()>().await
        }));
    }

    // Status writer: only changed statuses, only while leading, retried on the next change
    // after a failure. A new leader forgets what it wrote before: another may have since.
    let status_client = client.clone();
    tasks.push(tokio::spawn(async move {
        let mut tracker = watch::StatusTracker::default();
        loop {
            if *leading_rx.borrow_and_update() {
                let statuses = built_rx.borrow_and_update().clone();
                for (key, status) in tracker.changed(&statuses) {
                    if !*leading_rx.borrow() {
                        break;
                    }
                    match watch::write_status(&status_client, &key, &status).await {
                        Ok(()) => tracker.written(key, status),
                        Err(e) => tracing::warn!(object = ?key, error = %e, "status not written"),
                    }
                }
            } else {
                tracker = watch::StatusTracker::default();
            }
            tokio::select! {
                r = built_rx.changed() => if r.is_err() { return },
                r = leading_rx.changed() => if r.is_err() { return },
            }
        }
    }));

    // Numeric targetPorts of opted-in Services, pointed at the proxies (leader only). A
    // pass reads the stores (once synced) every few seconds; a failed patch (409 after a
    // concurrent edit, say) is retried on the next pass.
    let patch_client = client.clone();
    let mut patch_leading = leading_rx_for_patches;
    let patch_stores = stores;
    let patch_ready = ready.clone();
    tasks.push(tokio::spawn(async move {
        // Not `Stores::synced`: a store's readiness wakes one waiter only (the index loop).
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                r = patch_leading.changed() => if r.is_err() { return },
            }
            if !*patch_leading.borrow_and_update() || !patch_ready.load(Ordering::SeqCst) {
                continue;
            }
            for (ns, name, patch) in crate::targetport::plan(&patch_stores.inputs()) {
                if let Err(e) = watch::patch_service(&patch_client, &ns, &name, &patch).await {
                    tracing::warn!(namespace = %ns, service = %name, error = %e, "targetPort patch not applied");
                } else {
                    tracing::info!(namespace = %ns, service = %name, "targetPorts pointed at the proxies (or restored)");
                }
            }
        }
    }));

    let hook = Arc::new(webhook::Webhook {
        config: inject_cfg,
        lookups: lookups_rx,
        ready: ready.clone(),
        metrics: webhook::Metrics::new(registry)?,
    });
    tasks.push(tokio::spawn(webhook::serve(webhook_listener, tls, hook)));
    tasks.push(tokio::spawn(
        cert.watch(Duration::from_secs(args.tls_reload_seconds.max(1))),
    ));
    tasks.push(tokio::spawn(crate::admin::serve(
        admin_listener,
        ready.clone(),
        registry.clone(),
    )));
    discover.serve(discover_listener)?;
    tracing::info!(webhook = %webhook_addr, discover = %discover_addr, admin = %admin_addr, native_sidecars = native, "controller serving");
    Ok(Running {
        webhook: webhook_addr,
        discover: discover_addr,
        admin: admin_addr,
        ready,
        tasks,
    })
}
