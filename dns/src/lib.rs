//! `sidemesh-dns`: the DNS shim.
//!
//! It answers the mesh's service names with each service's loopback address from the
//! sidecar's config (so the app dials the sidecar), and forwards, caches and coalesces
//! everything else to the pod's real resolvers. Built on `hickory-proto` for parsing and
//! encoding, over its own tokio UDP and TCP sockets: that keeps the hot path (a local name)
//! free of task spawns and gives direct control of what the issue asks for — dropping
//! QR=1 packets, EDNS sizes, TC, per-outcome metrics, coalescing.
//!
//! - [`table`]: the local names, rebuilt when the config version changes.
//! - [`handler`]: the request path (local answers, cache, protocol rules).
//! - [`forward`]: upstream exchanges with anti-spoofing checks, TCP retry and failover.
//! - [`cache`]: the bounded TTL cache (positive and negative answers).
//! - [`server`]: the UDP and TCP listeners.
//! - [`resolv`]: reading the pod's original resolv.conf.
//! - [`metrics`]: `sidemesh_dns_*` metrics.
//! - [`cli`]: the `sidemesh dns` subcommand.
//!
//! Use in-process with [`Shim::start`]; see `docs/dns.md`.

pub mod cache;
pub mod cli;
pub mod forward;
#[doc(hidden)]
pub mod fuzzing;
pub mod handler;
pub mod metrics;
pub mod resolv;
pub mod server;
pub mod table;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use sidemesh_api::Snapshot;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

pub use handler::Network;
pub use resolv::ResolvConf;

use handler::{Handler, HandlerSettings};
use metrics::Metrics;
use table::NameTable;

/// How the shim listens and where it forwards.
#[derive(Clone, Debug)]
pub struct ShimOptions {
    /// UDP and TCP listen address (same port for both; port 0 picks one).
    /// Default `127.0.0.1:53`: loopback only.
    pub listen: SocketAddr,
    /// Upstreams used when the config names none: the pod's original resolvers.
    pub fallback_upstreams: Vec<SocketAddr>,
    /// The pod's search list; names built from it answer like the bare names.
    pub search: Vec<String>,
    /// Networks allowed to query besides loopback (default none: a resolver only for
    /// the pod itself).
    pub allow_clients: Vec<Network>,
    /// Time for one upstream exchange before failing over to the next (default 1 s).
    pub upstream_timeout: Duration,
    /// Most answers kept in the forwarding cache (default 10000; 0 turns caching off).
    pub cache_size: usize,
    /// Most upstream-bound UDP queries in progress at once (default 1024).
    pub max_inflight: usize,
    /// Most TCP connections open at once (default 256).
    pub max_tcp_connections: usize,
    /// Tasks receiving on the UDP socket (default 1).
    pub udp_workers: usize,
    /// Zones only the shim knows (e.g. `cluster.local` outside Kubernetes): a name in one
    /// that is not a mesh name gets NXDOMAIN with the zone's SOA instead of being
    /// forwarded (default none: in Kubernetes the cluster DNS knows unmeshed services).
    pub authoritative_zones: Vec<String>,
}

impl Default for ShimOptions {
    fn default() -> Self {
        ShimOptions {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 53)),
            fallback_upstreams: Vec::new(),
            search: Vec::new(),
            allow_clients: Vec::new(),
            upstream_timeout: Duration::from_secs(1),
            cache_size: 10_000,
            max_inflight: 1024,
            max_tcp_connections: 256,
            udp_workers: 1,
            authoritative_zones: Vec::new(),
        }
    }
}

impl ShimOptions {
    /// Options listening on `listen` with the resolvers and search list of a resolv.conf.
    pub fn from_resolv_conf(listen: SocketAddr, conf: &ResolvConf) -> ShimOptions {
        ShimOptions {
            listen,
            fallback_upstreams: conf.nameservers.clone(),
            search: conf.search.clone(),
            ..ShimOptions::default()
        }
    }
}

/// Why the shim could not start.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The metrics could not be registered (e.g. a second shim in one registry).
    #[error("cannot register the DNS metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The DNS shim.
#[derive(Debug)]
pub struct Shim;

impl Shim {
    /// Binds the listeners and starts serving. Local names follow `snapshots`: the name
    /// table is rebuilt whenever the config version changes (`None`: no config yet, so
    /// everything is forwarded to the fallback upstreams).
    pub async fn start(
        opts: ShimOptions,
        snapshots: watch::Receiver<Option<Snapshot>>,
        registry: &prometheus::Registry,
    ) -> Result<ShimHandle, ShimError> {
        let metrics = Metrics::new(registry)?;
        let (udp, tcp) = server::bind(opts.listen)
            .await
            .map_err(|source| ShimError::Bind {
                addr: opts.listen,
                source,
            })?;
        let addr = udp.local_addr().map_err(|source| ShimError::Bind {
            addr: opts.listen,
            source,
        })?;
        let mut snapshots = snapshots;
        let first = snapshots.borrow_and_update().clone();
        let table = NameTable::build(first.as_ref(), &opts.search);
        metrics.table_updates.inc();
        let handler = Arc::new(Handler::new(
            table,
            HandlerSettings {
                fallback_upstreams: opts.fallback_upstreams.clone(),
                own_addrs: vec![addr],
                allow_clients: opts.allow_clients.clone(),
                upstream_timeout: opts.upstream_timeout,
                cache_size: opts.cache_size,
                authoritative: opts
                    .authoritative_zones
                    .iter()
                    .map(|z| z.trim_end_matches('.').to_ascii_lowercase())
                    .collect(),
            },
            metrics,
        ));
        let mut tasks = JoinSet::new();
        let udp = Arc::new(udp);
        let inflight = Arc::new(Semaphore::new(opts.max_inflight.max(1)));
        for _ in 0..opts.udp_workers.max(1) {
            tasks.spawn(server::udp_loop(
                udp.clone(),
                handler.clone(),
                inflight.clone(),
            ));
        }
        tasks.spawn(server::tcp_loop(
            tcp,
            handler.clone(),
            opts.max_tcp_connections.max(1),
        ));
        tasks.spawn(follow(snapshots, handler.clone(), opts.search.clone()));
        tracing::info!(udp = %addr, tcp = %addr, names = handler.table().len(), "DNS shim listening");
        Ok(ShimHandle { addr, tasks })
    }
}

/// Rebuilds the name table when the config version changes; keeps the last table when
/// the config source goes away.
async fn follow(
    mut snapshots: watch::Receiver<Option<Snapshot>>,
    handler: Arc<Handler>,
    search: Vec<String>,
) {
    while snapshots.changed().await.is_ok() {
        let snapshot = snapshots.borrow_and_update().clone();
        let version = snapshot.as_ref().map(Snapshot::version);
        if version == handler.table().version {
            continue;
        }
        let table = NameTable::build(snapshot.as_ref(), &search);
        tracing::info!(version = ?version, names = table.len(), "DNS names updated");
        handler.set_table(table);
    }
}

/// A running shim. Dropping it (or [`ShimHandle::shutdown`]) stops it.
#[derive(Debug)]
pub struct ShimHandle {
    addr: SocketAddr,
    tasks: JoinSet<()>,
}

impl ShimHandle {
    /// The bound UDP address.
    pub fn udp_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound TCP address (same as UDP).
    pub fn tcp_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops every listener and task, and waits for them to end.
    pub async fn shutdown(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Waits until a listener task ends (they only end when aborted or if one panics).
    pub async fn wait(&mut self) {
        let _ = self.tasks.join_next().await;
    }
}
