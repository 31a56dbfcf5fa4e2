//! The `sidemesh proxy` subcommand: poll `DISCOVER_URL`, run the data plane and the admin
//! server, print the ready line, and on SIGTERM turn `/ready` to 503, stop accepting,
//! drain, and exit 0.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures::future::BoxFuture;
use sidemesh_api::Snapshot;
use sidemesh_api::client::{Client, ClientConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Readiness};
use crate::{Proxy, ProxyConfig};

/// The default of `--tcp-relay-memory-mib`.
pub const DEFAULT_TCP_RELAY_MEMORY_MIB: u64 = crate::relay::DEFAULT_MEMORY_MIB;

/// Flags of `sidemesh proxy`; each has a `SIDEMESH_*` environment equivalent.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// The URL this sidecar's config is served at (normally given as `DISCOVER_URL`).
    #[arg(long = "discover-url", env = "DISCOVER_URL")]
    pub discover_url: Option<String>,
    /// Admin address (`/ready`, `/live`, `/metrics`).
    #[arg(long, env = "SIDEMESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Run the DNS shim in-process on this address (e.g. `127.0.0.1:53`).
    #[arg(long, env = "SIDEMESH_DNS_ADDR")]
    pub dns: Option<SocketAddr>,
    /// The resolv.conf whose nameservers the DNS shim forwards to when the config names no
    /// upstreams (the pod's original resolvers; not the one that points at the shim).
    #[arg(
        long,
        env = "SIDEMESH_DNS_RESOLV_CONF",
        default_value = "/etc/resolv.conf"
    )]
    pub dns_resolv_conf: std::path::PathBuf,
    /// Zones the in-process DNS shim alone knows (e.g. `cluster.local` outside
    /// Kubernetes): other names in them get NXDOMAIN with an SOA instead of being forwarded.
    #[arg(
        long = "authoritative-zone",
        env = "SIDEMESH_DNS_AUTHORITATIVE_ZONES",
        value_delimiter = ','
    )]
    pub dns_authoritative_zones: Vec<String>,
    /// Directory for the last good config, so a restart serves while discover is down.
    #[arg(long, env = "SIDEMESH_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// How long shutdown and removed listeners wait for connections to finish
    /// (e.g. `15s`, `500ms`).
    #[arg(long, env = "SIDEMESH_DRAIN_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// The workload's address: inbound listeners bind `<this>:<port_outer>`.
    #[arg(long, env = "SIDEMESH_INBOUND_ADDRESS", default_value = "0.0.0.0")]
    pub inbound_address: IpAddr,
    /// The address the app listens on; inbound traffic goes to `<this>:<port>`.
    #[arg(long, env = "SIDEMESH_APP_ADDRESS", default_value = "127.0.0.1")]
    pub app_address: IpAddr,
    /// How long discover may hold a long poll (`0s` polls once a second).
    #[arg(long, env = "SIDEMESH_DISCOVER_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub discover_wait: Duration,
    /// `Authorization` header value sent to discover. Never logged.
    #[arg(long, env = "SIDEMESH_DISCOVER_AUTHORIZATION", hide_env_values = true)]
    pub discover_authorization: Option<String>,
    /// A file holding this sidecar's bearer token for discover, sent as
    /// `Authorization: Bearer <token>` on config polls and certificate requests; read again
    /// whenever the file changes (rotated tokens). Never logged.
    #[arg(
        long,
        env = "SIDEMESH_DISCOVER_TOKEN_FILE",
        conflicts_with = "discover_authorization"
    )]
    pub discover_token_file: Option<PathBuf>,
    /// Most client connections open at once.
    #[arg(long, env = "SIDEMESH_MAX_CONNECTIONS", default_value_t = 16_384)]
    pub max_connections: usize,
    /// Most memory, in MiB, that raw TCP relaying holds in full-size (256 KiB) buffers at
    /// once; past it, connections relay through 16 KiB buffers (more CPU per GB, bounded
    /// memory). 0 always uses the small buffers.
    #[arg(long, env = "SIDEMESH_TCP_RELAY_MEMORY_MIB", default_value_t = DEFAULT_TCP_RELAY_MEMORY_MIB)]
    pub tcp_relay_memory_mib: u64,
    /// Time a client has to send a request's headers (slowloris guard).
    #[arg(long, env = "SIDEMESH_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// How long an `auto` port waits for the client's first bytes before it treats the
    /// connection as raw TCP (server-speaks-first protocols).
    #[arg(long, env = "SIDEMESH_DETECT_TIMEOUT", default_value = "300ms", value_parser = parse_duration)]
    pub detect_timeout: Duration,
    /// Universal mode: register this workload instance in discover's TTL registry, renew
    /// it, and delete it on shutdown.
    #[arg(long, env = "SIDEMESH_REGISTER")]
    pub register: bool,
    /// Discover's base URL for `--register` (default: scheme and host of DISCOVER_URL).
    #[arg(long, env = "SIDEMESH_REGISTRY_URL")]
    pub registry_url: Option<String>,
    /// The instance name to register (default: the config's pod name, else one made from
    /// the address).
    #[arg(long, env = "SIDEMESH_INSTANCE_NAME")]
    pub instance_name: Option<String>,
    /// The address other sidecars dial (default: --inbound-address).
    #[arg(long, env = "SIDEMESH_REGISTER_ADDRESS")]
    pub register_address: Option<IpAddr>,
    /// TTL of the registration; it is renewed every third of it.
    #[arg(long, env = "SIDEMESH_REGISTER_TTL", default_value = "30s", value_parser = parse_duration)]
    pub register_ttl: Duration,
    /// Carry HTTP/1.1 requests to meshed endpoints over one multiplexed HTTP/2 connection
    /// per endpoint (ALPN `h2` on the mutual TLS hop): `true` (the default, measured faster
    /// than HTTP/1.1 keep-alive over mutual TLS; docs/benchmarks.md) or `false`.
    #[arg(long, env = "SIDEMESH_MESH_H2", default_value_t = true, action = clap::ArgAction::Set)]
    pub mesh_h2: bool,
    /// The engine for HTTP/1.1 client connections: `lean` (the default: the common case in
    /// the connection's own task, hyper for upgrades, `Expect` and the rest) or `hyper`.
    #[arg(long, env = "SIDEMESH_HTTP1_ENGINE", value_enum, default_value_t = crate::h1::Engine::Lean)]
    pub http1_engine: crate::h1::Engine,
    /// The engine for HTTP/2 client connections: `lean` (the default: the `h2` crate on
    /// both sides, streams polled by their connection's task) or `hyper`.
    #[arg(long, env = "SIDEMESH_HTTP2_ENGINE", value_enum, default_value_t = crate::http2::Engine::Lean)]
    pub http2_engine: crate::http2::Engine,
    /// Access logs, one line per HTTP request once its response head is sent: `json` or
    /// `text`. Off unless given.
    #[arg(long, env = "SIDEMESH_ACCESS_LOG", value_enum)]
    pub access_log: Option<crate::access::Format>,
    /// The file access log lines are appended to (created if missing); standard output
    /// when not given.
    #[arg(long, env = "SIDEMESH_ACCESS_LOG_PATH", requires = "access_log")]
    pub access_log_path: Option<PathBuf>,
}

/// Something run beside the data plane (the DNS shim): given the config channel, it starts
/// and returns fields for the ready line (name, address).
pub type Sidecar = Box<
    dyn FnOnce(
            watch::Receiver<Option<Snapshot>>,
        ) -> BoxFuture<'static, anyhow::Result<Vec<(String, String)>>>
        + Send,
>;

/// Parses `250ms`, `15s`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 250ms, 15s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

/// A sidecar running in this process.
pub struct Running {
    /// The bound admin address.
    pub admin: SocketAddr,
    /// The configs the sidecar receives.
    pub snapshots: watch::Receiver<Option<Snapshot>>,
    /// What the data plane has applied.
    pub applied: watch::Receiver<Option<crate::Applied>>,
    /// The sidecar's mutual TLS state (its certificate, once it has one).
    pub tls: Arc<crate::tls::MeshTls>,
    draining: Arc<AtomicBool>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    register: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl Running {
    /// Turns `/ready` to 503, stops accepting, drains (at most the drain timeout), stops.
    pub async fn stop(self) {
        self.draining.store(true, Ordering::Release);
        // Leave the registry first, so clients stop picking this instance while it drains.
        if let Some((stop, task)) = self.register {
            stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Completes when the sidecar has stopped (after [`Running::stop`] or a failure).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

/// Starts a sidecar: the discover client, the data plane and the admin server. Its
/// metrics go to `registry`, which its admin server serves.
pub async fn start(args: &Args, registry: prometheus::Registry) -> anyhow::Result<Running> {
    crate::relay::set_memory_limit_mib(args.tcp_relay_memory_mib);
    let url = args
        .discover_url
        .clone()
        .filter(|u| !u.trim().is_empty())
        .context("DISCOVER_URL is not set: give the URL of this sidecar's config (for example http://discover:7070/v1/sidecars/shop/web/sidemesh-proxy) in the DISCOVER_URL environment variable or --discover-url")?;
    let client = Client::new(
        ClientConfig {
            url: url.clone(),
            state_dir: args.state_dir.clone(),
            wait: args.discover_wait,
            authorization: args.discover_authorization.clone(),
            token_file: args.discover_token_file.clone(),
            metrics_prefix: "sidemesh_proxy".into(),
        },
        &registry,
    )
    .context("cannot start the discover client")?;
    // The certificate signing request goes next to DISCOVER_URL, with the same TLS roots
    // and Authorization.
    let poster = client
        .poster()
        .context("cannot set up the certificate client")?;
    let access_log = match args.access_log {
        None => None,
        Some(format) => {
            let settings = crate::access::Settings {
                format,
                path: args.access_log_path.clone(),
            };
            Some(Arc::new(crate::access::AccessLog::start(
                &settings, &registry,
            )?))
        }
    };
    let proxy = Proxy::new(
        ProxyConfig {
            inbound_address: args.inbound_address,
            app_address: args.app_address,
            drain_timeout: args.drain_timeout,
            detect_timeout: args.detect_timeout,
            header_read_timeout: args.header_read_timeout,
            max_connections: args.max_connections,
            mesh_h2: args.mesh_h2,
            http1_engine: args.http1_engine,
            http2_engine: args.http2_engine,
            access_log,
            ..ProxyConfig::default()
        },
        &registry,
    )
    .context("cannot register the proxy's metrics")?;
    let register = match args.register {
        false => None,
        true => {
            let base_url = match &args.registry_url {
                Some(u) => u.trim_end_matches('/').to_owned(),
                None => crate::register::base_of(&url).context(
                    "cannot derive the registry URL from DISCOVER_URL; give --registry-url",
                )?,
            };
            let address = args.register_address.unwrap_or(args.inbound_address);
            anyhow::ensure!(
                !address.is_unspecified(),
                "--register needs the address other sidecars dial: give --register-address or a specific --inbound-address"
            );
            Some(crate::register::RegisterConfig {
                base_url,
                instance: args.instance_name.clone(),
                address,
                ttl: args.register_ttl,
            })
        }
    };
    let admin_listener = tokio::net::TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("cannot bind the admin address {}", args.admin))?;
    let admin = admin_listener.local_addr()?;
    let (snapshots, poller) = client.spawn();
    let tls = proxy.tls();
    let identity = tokio::spawn(crate::tls::run_identity(
        proxy.tls(),
        poster,
        snapshots.clone(),
        CancellationToken::new(),
    ));
    let register = register.map(|cfg| {
        let stop = CancellationToken::new();
        let task = tokio::spawn(crate::register::run(
            cfg,
            snapshots.clone(),
            stop.clone(),
            proxy.metrics().registrations.clone(),
        ));
        (stop, task)
    });
    let draining = Arc::new(AtomicBool::new(false));
    let applied = proxy.applied();
    let readiness = Readiness {
        applied: applied.clone(),
        draining: draining.clone(),
        tls: Some((tls.clone(), snapshots.clone())),
        state: Some(proxy.view()),
    };
    let stop_admin = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        registry,
        readiness,
        stop_admin.clone(),
    ));
    let shutdown = CancellationToken::new();
    let (rx, stop) = (snapshots.clone(), shutdown.clone());
    let task = tokio::spawn(async move {
        proxy.run(rx, stop).await;
        poller.abort();
        identity.abort();
        stop_admin.cancel();
        let _ = admin_task.await;
    });
    Ok(Running {
        admin,
        snapshots,
        applied,
        tls,
        draining,
        shutdown,
        task,
        register,
    })
}

/// Runs `sidemesh proxy`.
pub async fn run(args: Args, registry: prometheus::Registry) -> anyhow::Result<()> {
    run_with(args, registry, Vec::new()).await
}

/// Runs `sidemesh proxy` with extra in-process parts (the DNS shim).
pub async fn run_with(
    args: Args,
    registry: prometheus::Registry,
    sidecars: Vec<Sidecar>,
) -> anyhow::Result<()> {
    let mut running = start(&args, registry).await?;
    let mut fields = vec![("admin".to_owned(), running.admin.to_string())];
    for start in sidecars {
        fields.extend(start(running.snapshots.clone()).await?);
    }
    // Watch for the stop signal before announcing readiness (see shutdown::signal).
    let stop = sidemesh_api::shutdown::signal();
    println!("{}", ready_line("proxy", &fields));
    tracing::info!(admin = %running.admin, "sidecar started; waiting for config");
    tokio::select! {
        _ = stop => {
            tracing::info!("shutdown signal: /ready now 503, draining");
            running.stop().await;
        }
        _ = running.wait() => {}
    }
    tracing::info!("drained; exiting");
    Ok(())
}

/// The one JSON ready line: `{"ready":"<component>", "<name>":"<addr>", ...}`.
pub fn ready_line(component: &str, fields: &[(String, String)]) -> String {
    let mut out = format!("{{\"ready\":{}", serde_json::Value::from(component));
    for (k, v) in fields {
        out.push(',');
        out.push_str(&serde_json::Value::from(k.as_str()).to_string());
        out.push(':');
        out.push_str(&serde_json::Value::from(v.as_str()).to_string());
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5h").is_err());
    }

    #[test]
    fn ready_line_is_json() {
        let l = ready_line("proxy", &[("admin".into(), "127.0.0.1:1".into())]);
        assert_eq!(l, r#"{"ready":"proxy","admin":"127.0.0.1:1"}"#);
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["proxy"];
        argv.extend_from_slice(extra);
        <Cli as clap::Parser>::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn the_relay_memory_flag_defaults_to_64_mib() {
        assert_eq!(args(&[]).tcp_relay_memory_mib, 64);
        let a = args(&["--tcp-relay-memory-mib", "0"]);
        assert_eq!(a.tcp_relay_memory_mib, 0);
    }

    #[tokio::test]
    async fn an_unusable_token_file_stops_the_start_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "two words\n").unwrap();
        let path = file.to_str().unwrap();
        let url = "http://127.0.0.1:9/v1/sidecars/shop/web/sidemesh-proxy";
        let a = args(&["--discover-url", url, "--discover-token-file", path]);
        let e = match start(&a, prometheus::Registry::new()).await {
            Ok(_) => panic!("started with an unusable token file"),
            Err(e) => format!("{e:#}"),
        };
        // It names the file and says what to fix, without echoing the file.
        assert!(
            e.contains(path) && e.contains("one token") && !e.contains("two"),
            "{e}"
        );
        // Both credentials at once is a usage error.
        assert!(
            <Cli as clap::Parser>::try_parse_from([
                "proxy",
                "--discover-token-file",
                path,
                "--discover-authorization",
                "x"
            ])
            .is_err()
        );
    }
}
