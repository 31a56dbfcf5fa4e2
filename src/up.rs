//! `sidemesh up STATE_FILE`: the whole mesh on one machine, in one process, without root.
//!
//! It serves discover from the state file, and for every service with instances runs, per
//! instance, a demo backend on the instance's own loopback address (as a pod has its own
//! IP) behind its own inbound sidecar; for every service without instances that uses
//! others, it runs a client sidecar whose outbound listeners are what to curl. Each sidecar
//! has its own metrics registry and admin address. Sidecars talk mutual TLS to each other
//! (permissive mode, a CA made for the run) unless `--mesh-tls disabled`; `up` is ready
//! once every sidecar holds its certificate. Discover's configs and certificates need a
//! bearer token: `up` makes one per service for the run, writes discover's token file and
//! each sidecar's token in its state directory, and gives each sidecar its own. Stops
//! (draining) on SIGTERM or SIGINT.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use sidemesh_discover::{Discover, Options, statefile};
use sidemesh_proxy::cli::{self as sidecar, Running, ready_line};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Flags of `sidemesh up`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The YAML state file (for example `examples/quickstart.yaml`).
    pub file: PathBuf,
    /// Where discover listens.
    #[arg(
        long,
        env = "SIDEMESH_UP_DISCOVER_LISTEN",
        default_value = "127.0.0.1:0"
    )]
    pub discover_listen: SocketAddr,
    /// The loopback address of client workloads (services without instances): their
    /// sidecars' inbound listeners bind it.
    #[arg(long, env = "SIDEMESH_UP_CLIENT_ADDRESS", default_value = "127.0.0.10")]
    pub client_address: IpAddr,
    /// Run the DNS shim for the (first) client sidecar on this address, answering the
    /// mesh names it uses (e.g. `127.0.0.1:5353`; port 53 needs root).
    #[arg(long, env = "SIDEMESH_UP_DNS")]
    pub dns: Option<SocketAddr>,
    /// Zones the client's DNS shim (`--dns`) alone knows (e.g. `cluster.local`): other
    /// names in them get NXDOMAIN with an SOA instead of being forwarded.
    #[arg(
        long = "authoritative-zone",
        env = "SIDEMESH_DNS_AUTHORITATIVE_ZONES",
        value_delimiter = ','
    )]
    pub authoritative_zones: Vec<String>,
    /// How long shutdown waits for connections to finish.
    #[arg(long, env = "SIDEMESH_DRAIN_TIMEOUT", default_value = "5s", value_parser = sidecar::parse_duration)]
    pub drain_timeout: Duration,
    /// Mutual TLS between the sidecars (permissive by default, with a CA made for the run).
    #[command(flatten)]
    pub tls: sidemesh_discover::cli::TlsArgs,
    /// Where `up` keeps its files: discover's token file (`tokens.yaml`) and each sidecar's
    /// token (`tokens/<namespace>.<service>.token`). Default: a temporary directory removed
    /// at exit.
    #[arg(long, env = "SIDEMESH_UP_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Access logs of every sidecar on standard output, one line per HTTP request: `json`
    /// or `text`. Off unless given.
    #[arg(long, env = "SIDEMESH_UP_ACCESS_LOG", value_enum)]
    pub access_log: Option<sidemesh_proxy::access::Format>,
}

/// Discover's token check for the run: one random token per service that gets a sidecar,
/// allowed to act as that service alone. Writes `tokens.yaml` (SHA-256 digests only) and
/// the tokens themselves (mode 0600) under `dir`; returns the token file of each
/// `namespace/service`.
fn write_tokens(
    dir: &Path,
    services: &[&sidemesh_api::state::Service],
) -> anyhow::Result<(PathBuf, BTreeMap<String, PathBuf>)> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let token_dir = dir.join("tokens");
    std::fs::create_dir_all(&token_dir)
        .with_context(|| format!("cannot create {}", token_dir.display()))?;
    let mut yaml = String::from("tokens:\n");
    let mut files = BTreeMap::new();
    for svc in services {
        let id = format!("{}/{}", svc.namespace, svc.name);
        if files.contains_key(&id) {
            continue;
        }
        let token = sidemesh_discover::auth::generate_token();
        let file = token_dir.join(format!("{}.{}.token", svc.namespace, svc.name));
        // Made afresh for each run: an old token left from another run is replaced.
        let _ = std::fs::remove_file(&file);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .with_context(|| format!("cannot write {}", file.display()))?;
        f.write_all(token.as_bytes())?;
        yaml.push_str(&format!(
            "  - name: {id}\n    sha256: {}\n    identities: [\"{id}\"]\n",
            sidemesh_discover::auth::sha256_hex(token.as_bytes())
        ));
        files.insert(id, file);
    }
    let tokens = dir.join("tokens.yaml");
    std::fs::write(&tokens, yaml).with_context(|| format!("cannot write {}", tokens.display()))?;
    Ok((tokens, files))
}

fn sidecar_args(
    url: String,
    inbound: IpAddr,
    app: IpAddr,
    drain: Duration,
    token_file: Option<PathBuf>,
    access_log: Option<sidemesh_proxy::access::Format>,
) -> sidecar::Args {
    sidecar::Args {
        discover_url: Some(url),
        admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        dns: None,
        dns_resolv_conf: "/etc/resolv.conf".into(),
        dns_authoritative_zones: Vec::new(),
        state_dir: None,
        drain_timeout: drain,
        inbound_address: inbound,
        app_address: app,
        discover_wait: Duration::from_secs(30),
        discover_authorization: None,
        discover_token_file: token_file,
        max_connections: 16_384,
        tcp_relay_memory_mib: sidemesh_proxy::cli::DEFAULT_TCP_RELAY_MEMORY_MIB,
        header_read_timeout: Duration::from_secs(10),
        detect_timeout: Duration::from_millis(300),
        register: false,
        registry_url: None,
        instance_name: None,
        register_address: None,
        register_ttl: Duration::from_secs(30),
        mesh_h2: true,
        http1_engine: sidemesh_proxy::h1::Engine::default(),
        http2_engine: sidemesh_proxy::http2::Engine::default(),
        access_log,
        access_log_path: None,
    }
}

/// Runs `sidemesh up` until SIGTERM or SIGINT.
pub async fn run(args: Args, registry: prometheus::Registry) -> anyhow::Result<()> {
    let (state, _) =
        statefile::load(&args.file).map_err(|e| anyhow::anyhow!("state file rejected: {e}"))?;
    // The state directory: given, or a temporary one removed when `up` returns.
    let mut temp = None;
    let state_dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => temp
            .insert(tempfile::Builder::new().prefix("sidemesh-up-").tempdir()?)
            .path()
            .to_owned(),
    };
    let meshed: Vec<_> = state
        .services
        .iter()
        .filter(|s| !s.instances.is_empty() || !s.use_services.is_empty())
        .collect();
    let (token_file, tokens) = write_tokens(&state_dir, &meshed)?;
    let opts = Options {
        authority: args.tls.authority(None, &registry)?,
        auth: sidemesh_discover::cli::load_auth(Some(&token_file), &registry)?,
        ..Options::default()
    };
    let tls_on = opts.authority.is_some();
    let discover = Discover::new(opts, &registry)?;
    discover.set_state("file", state.clone());
    let listener = TcpListener::bind(args.discover_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.discover_listen))?;
    let serving = discover.serve(listener)?;
    let base = format!("http://{}", serving.addr);

    let stop_demos = CancellationToken::new();
    let mut sidecars: Vec<(String, Running)> = Vec::new();
    let mut clients: Vec<usize> = Vec::new();
    for svc in &state.services {
        let url = format!(
            "{base}/v1/sidecars/{}/{}/sidemesh-proxy",
            svc.namespace, svc.name
        );
        if svc.instances.is_empty() {
            if svc.use_services.is_empty() {
                continue;
            }
            let a = sidecar_args(
                url,
                args.client_address,
                args.client_address,
                args.drain_timeout,
                tokens
                    .get(&format!("{}/{}", svc.namespace, svc.name))
                    .cloned(),
                args.access_log,
            );
            let r = sidecar::start(&a, prometheus::Registry::new()).await?;
            clients.push(sidecars.len());
            sidecars.push((format!("{}.{}", svc.name, svc.namespace), r));
            continue;
        }
        for (i, inst) in svc.instances.iter().enumerate() {
            let name = inst
                .name
                .clone()
                .unwrap_or_else(|| format!("{}-{}", svc.name, i + 1));
            for p in &svc.ports {
                let app_port = p.target_port.map(|t| t.get()).unwrap_or(p.port.get());
                let at = SocketAddr::new(inst.address, app_port);
                let l = TcpListener::bind(at)
                    .await
                    .with_context(|| format!("cannot start demo backend {name} on {at}"))?;
                tokio::spawn(sidemesh_proxy::demo::serve(
                    l,
                    name.clone(),
                    stop_demos.clone(),
                ));
            }
            let a = sidecar_args(
                url.clone(),
                inst.address,
                inst.address,
                args.drain_timeout,
                tokens
                    .get(&format!("{}/{}", svc.namespace, svc.name))
                    .cloned(),
                args.access_log,
            );
            let r = sidecar::start(&a, prometheus::Registry::new()).await?;
            sidecars.push((name, r));
        }
    }

    // Ready when every sidecar has applied its first config.
    for (name, r) in &mut sidecars {
        let mut applied = r.applied.clone();
        tokio::time::timeout(Duration::from_secs(30), applied.wait_for(|a| a.is_some()))
            .await
            .with_context(|| format!("sidecar {name} got no config from discover in 30 s"))??;
    }
    // With mutual TLS, also when every sidecar holds its certificate: before that, a
    // client would call in plaintext, without the identity `allow_clients` checks.
    if tls_on {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for (name, r) in &sidecars {
            while r.tls.credentials().is_none() {
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "sidecar {name} got no certificate from discover in 30 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    let mut fields = vec![("discover".to_owned(), serving.addr.to_string())];
    let mut lines = Vec::new();
    for (name, r) in &sidecars {
        lines.push(format!(
            "  sidecar {name:<24} admin http://{}/metrics",
            r.admin
        ));
    }
    for (k, &i) in clients.iter().enumerate() {
        let (name, r) = &sidecars[i];
        fields.push((format!("{name}.admin"), r.admin.to_string()));
        if let (0, Some(listen)) = (k, args.dns) {
            let registry = prometheus::Registry::new();
            let started = crate::dns_shim(
                listen,
                "/etc/resolv.conf".into(),
                args.authoritative_zones.clone(),
                registry,
            )(r.snapshots.clone())
            .await?;
            for (_, addr) in started {
                lines.push(format!(
                    "  dig @{} -p {} <service name>   # {name}'s DNS shim",
                    listen.ip(),
                    addr.rsplit(':').next().unwrap_or("53")
                ));
                fields.push(("dns".to_owned(), addr));
            }
        }
        let snapshot = r.snapshots.borrow().clone();
        for svc in snapshot.iter().flat_map(|s| s.outbound().to_vec()) {
            for p in &svc.ports {
                let url = format!("http://{}:{}/", svc.address, p.port);
                lines.push(format!(
                    "  curl {url:<28} # {}.{} as {name} calls it",
                    svc.name, svc.namespace
                ));
                if !fields.iter().any(|(k, _)| k == "curl") {
                    fields.push(("curl".to_owned(), url));
                }
            }
        }
    }
    eprintln!(
        "sidemesh up: {} sidecar(s) running; try:\n{}",
        sidecars.len(),
        lines.join("\n")
    );
    // Watch for the stop signal before announcing readiness (see shutdown::signal).
    let stop = sidemesh_api::shutdown::signal();
    println!("{}", ready_line("up", &fields));

    stop.await;
    tracing::info!("stopping: draining sidecars");
    let stopping: Vec<_> = sidecars
        .into_iter()
        .map(|(_, r)| tokio::spawn(r.stop()))
        .collect();
    for s in stopping {
        let _ = s.await;
    }
    stop_demos.cancel();
    serving.task.abort();
    discover.stop();
    Ok(())
}
