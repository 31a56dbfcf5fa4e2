//! The `sidemesh dns` subcommand: the shim as a process of its own.
//!
//! Names come from one source: `--config FILE` (a sidecar config as JSON, re-read when it
//! changes), `--discover-url URL` (polled), or `--state FILE` (a discover state file,
//! rendered by the `sidemesh` binary, which hands the result to [`serve`]). Fallback
//! upstreams are `--upstream` addresses, else the `nameserver` lines of `--resolv-conf`
//! (default `/etc/resolv.conf`). Prints one ready line once listening, and stops on
//! SIGTERM or Ctrl-C.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use sidemesh_api::Snapshot;
use sidemesh_api::client::{Client, ClientConfig};
use sidemesh_api::snapshot::parse_upstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::{Network, ResolvConf, Shim, ShimOptions};

/// How often `--config FILE` is checked for changes.
const CONFIG_POLL: Duration = Duration::from_millis(500);
/// Largest config file read (a sidecar config is far smaller).
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Flags of `sidemesh dns`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// UDP and TCP listen address (port 0 picks a free port).
    #[arg(long, env = "SIDEMESH_DNS_LISTEN", default_value = "127.0.0.1:53")]
    pub listen: SocketAddr,
    /// A sidecar config (JSON, as discover serves it), re-read when it changes.
    #[arg(long, env = "SIDEMESH_DNS_CONFIG", conflicts_with_all = ["discover_url", "state"])]
    pub config: Option<PathBuf>,
    /// The sidecar's DISCOVER_URL, polled for its config.
    #[arg(long, env = "SIDEMESH_DISCOVER_URL", conflicts_with = "state")]
    pub discover_url: Option<String>,
    /// A discover state file; the sidecar config is rendered from it for `--identity`.
    #[arg(long, env = "SIDEMESH_DNS_STATE")]
    pub state: Option<PathBuf>,
    /// With `--state`: whose config to render, as `namespace/service[/plugin]` (plugin:
    /// the built-in network proxy).
    #[arg(long, env = "SIDEMESH_DNS_IDENTITY", requires = "state")]
    pub identity: Option<String>,
    /// Directory for the last good config from `--discover-url` (restart without discover).
    #[arg(long, env = "SIDEMESH_DNS_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Fallback upstream resolvers (`ip` or `ip:port`), used when the config names none.
    #[arg(
        long = "upstream",
        env = "SIDEMESH_DNS_UPSTREAMS",
        value_delimiter = ','
    )]
    pub upstreams: Vec<String>,
    /// The pod's original resolv.conf: fallback upstreams (unless `--upstream`) and the
    /// search list (unless `--search`). Default `/etc/resolv.conf` when no `--upstream`.
    #[arg(long, env = "SIDEMESH_DNS_RESOLV_CONF")]
    pub resolv_conf: Option<PathBuf>,
    /// The pod's search domains (e.g. `web.svc.cluster.local`).
    #[arg(long = "search", env = "SIDEMESH_DNS_SEARCH", value_delimiter = ',')]
    pub search: Vec<String>,
    /// Networks (`10.0.0.0/8` or an address) allowed to query besides loopback.
    #[arg(
        long = "allow-client",
        env = "SIDEMESH_DNS_ALLOW_CLIENTS",
        value_delimiter = ','
    )]
    pub allow_clients: Vec<Network>,
    /// Zones only the shim knows (e.g. `cluster.local` outside Kubernetes): other names in
    /// them get NXDOMAIN with an SOA instead of being forwarded.
    #[arg(
        long = "authoritative-zone",
        env = "SIDEMESH_DNS_AUTHORITATIVE_ZONES",
        value_delimiter = ','
    )]
    pub authoritative_zones: Vec<String>,
    /// Time for one upstream exchange before trying the next upstream, in milliseconds.
    #[arg(long, env = "SIDEMESH_DNS_UPSTREAM_TIMEOUT_MS", default_value_t = 1000)]
    pub upstream_timeout_ms: u64,
    /// Most answers kept in the forwarding cache (0 turns it off).
    #[arg(long, env = "SIDEMESH_DNS_CACHE_SIZE", default_value_t = 10_000)]
    pub cache_size: usize,
    /// Tasks receiving on the UDP socket.
    #[arg(long, env = "SIDEMESH_DNS_UDP_WORKERS", default_value_t = 1)]
    pub udp_workers: usize,
    /// Where to serve Prometheus metrics (`GET /metrics`); off when absent.
    #[arg(long, env = "SIDEMESH_DNS_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

impl Args {
    /// The shim options these flags describe (reads `--resolv-conf` if needed).
    pub fn options(&self) -> anyhow::Result<ShimOptions> {
        let mut fallback = Vec::new();
        for u in &self.upstreams {
            fallback.push(parse_upstream(u).with_context(|| {
                format!("--upstream {u:?}: must be \"ip\" or \"ip:port\" (\"[v6]:port\")")
            })?);
        }
        let conf = match &self.resolv_conf {
            Some(p) => ResolvConf::read(p)
                .with_context(|| format!("cannot read --resolv-conf {}", p.display()))?,
            None if fallback.is_empty() => {
                ResolvConf::read(Path::new("/etc/resolv.conf")).unwrap_or_default()
            }
            None => ResolvConf::default(),
        };
        if fallback.is_empty() {
            fallback = conf.nameservers.clone();
        }
        let search = if self.search.is_empty() {
            conf.search.clone()
        } else {
            self.search.clone()
        };
        Ok(ShimOptions {
            listen: self.listen,
            fallback_upstreams: fallback,
            search,
            allow_clients: self.allow_clients.clone(),
            upstream_timeout: Duration::from_millis(self.upstream_timeout_ms.max(1)),
            cache_size: self.cache_size,
            udp_workers: self.udp_workers.max(1),
            authoritative_zones: self.authoritative_zones.clone(),
            ..ShimOptions::default()
        })
    }
}

/// Runs `sidemesh dns` with names from `--config` or `--discover-url`. (`--state` needs
/// the discover crate, so the `sidemesh` binary renders it and calls [`serve`].)
pub async fn run(args: Args, registry: prometheus::Registry) -> anyhow::Result<()> {
    let snapshots = if let Some(path) = &args.config {
        watch_config_file(path.clone(), &registry).await?
    } else if let Some(url) = &args.discover_url {
        let mut cfg = ClientConfig::new(url.clone());
        cfg.state_dir = args.state_dir.clone();
        cfg.metrics_prefix = "sidemesh_dns".to_owned();
        // Polls in its own task; until the first config (or the disk copy) arrives the
        // table is empty and every name is forwarded.
        let (rx, _poller) = Client::new(cfg, &registry)?.spawn();
        rx
    } else if args.state.is_some() {
        anyhow::bail!("--state is handled by the sidemesh binary, not by sidemesh_dns::cli::run")
    } else {
        anyhow::bail!("give one of --config FILE, --discover-url URL or --state FILE")
    };
    serve(args, registry, snapshots).await
}

/// Runs the shim fed by `snapshots` until SIGTERM or Ctrl-C; prints the ready line.
pub async fn serve(
    args: Args,
    registry: prometheus::Registry,
    snapshots: watch::Receiver<Option<Snapshot>>,
) -> anyhow::Result<()> {
    let opts = args.options()?;
    if opts.fallback_upstreams.is_empty() {
        tracing::warn!(
            "no fallback upstream: names outside the mesh get SERVFAIL unless the config names upstreams"
        );
    }
    let shim = Shim::start(opts, snapshots, &registry).await?;
    let mut ready = serde_json::json!({
        "ready": "dns",
        "listen": shim.udp_addr().to_string(),
        "udp": shim.udp_addr().to_string(),
        "tcp": shim.tcp_addr().to_string(),
    });
    let metrics_task = match args.metrics_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            ready["metrics"] = serde_json::Value::String(listener.local_addr()?.to_string());
            Some(tokio::spawn(serve_metrics(listener, registry.clone())))
        }
        None => None,
    };
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{ready}")?;
        out.flush()?;
    }
    sidemesh_api::shutdown::signal().await;
    tracing::info!("DNS shim stopping");
    if let Some(t) = metrics_task {
        t.abort();
    }
    shim.shutdown().await;
    Ok(())
}

/// Reads `path` now (it must hold a valid config) and then every [`CONFIG_POLL`]; a new
/// valid config is published, an invalid one is reported and the last good one stays.
/// Rejected contents are counted in `sidemesh_dns_config_rejected_total{reason="invalid"}`.
pub async fn watch_config_file(
    path: PathBuf,
    registry: &prometheus::Registry,
) -> anyhow::Result<watch::Receiver<Option<Snapshot>>> {
    // Same name and label as the DISCOVER_URL client's counter with the `sidemesh_dns`
    // prefix, so dashboards work with either source.
    let rejected_vec = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "sidemesh_dns_config_rejected_total",
            "Configs received and not applied (the last good config stays).",
        ),
        &["reason"],
    )?;
    registry.register(Box::new(rejected_vec.clone()))?;
    let rejected = rejected_vec.with_label_values(&["invalid"]);
    let bytes = read_capped(&path).await?;
    let first = Snapshot::from_json(&bytes)
        .with_context(|| format!("invalid config in {}", path.display()))?;
    let (tx, rx) = watch::channel(Some(first));
    tokio::spawn(async move {
        let mut last = bytes;
        let mut interval = tokio::time::interval(CONFIG_POLL);
        loop {
            interval.tick().await;
            if tx.is_closed() {
                return;
            }
            let bytes = match read_capped(&path).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "config not readable, keeping the last good one");
                    continue;
                }
            };
            if bytes == last {
                continue;
            }
            match Snapshot::from_json(&bytes) {
                Ok(s) => {
                    tracing::info!(path = %path.display(), version = s.version(), "config changed");
                    tx.send_replace(Some(s));
                    last = bytes;
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "config rejected, keeping the last good one");
                    rejected.inc();
                    last = bytes;
                }
            }
        }
    });
    Ok(rx)
}

async fn read_capped(path: &Path) -> anyhow::Result<Vec<u8>> {
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .await
        .with_context(|| format!("cannot read {}", path.display()))?;
    anyhow::ensure!(
        bytes.len() as u64 <= MAX_CONFIG_BYTES,
        "{} is larger than {MAX_CONFIG_BYTES} bytes",
        path.display()
    );
    Ok(bytes)
}

/// A minimal HTTP/1.1 endpoint answering every request with the registry's text format:
/// enough for Prometheus and curl, with the request head capped at 8 KiB.
async fn serve_metrics(listener: TcpListener, registry: prometheus::Registry) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            let read = async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(buf.get(..n).unwrap_or_default());
                }
                Ok::<_, std::io::Error>(())
            };
            if !matches!(
                tokio::time::timeout(Duration::from_secs(5), read).await,
                Ok(Ok(()))
            ) {
                return;
            }
            let mut body = Vec::new();
            let encoder = prometheus::TextEncoder::new();
            if prometheus::Encoder::encode(&encoder, &registry.gather(), &mut body).is_err() {
                return;
            }
            let header = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                prometheus::Encoder::format_type(&encoder),
                body.len()
            );
            let _ = stream.write_all(header.as_bytes()).await;
            let _ = stream.write_all(&body).await;
            let _ = stream.shutdown().await;
        });
    }
}
