//! `sidemesh discover`: serve sidecar configs from a YAML state file (watched) and the TTL
//! registry. Prints one ready line once listening; stops on SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sidemesh_api::config::TlsMode;

use crate::auth::Auth;
use crate::identity::{Authority, AuthorityConfig};

use crate::server::{Discover, Options};
use crate::statefile;

/// Flags of `sidemesh discover`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The YAML state file (watched; valid edits apply within a second). Without it,
    /// discover serves the TTL registry alone.
    #[arg(long, env = "SIDEMESH_DISCOVER_STATE")]
    pub state: Option<PathBuf>,
    /// Address to listen on (HTTP).
    #[arg(
        long,
        env = "SIDEMESH_DISCOVER_LISTEN",
        default_value = "127.0.0.1:7070"
    )]
    pub listen: SocketAddr,
    /// Directory for the registry, loopback addresses and config versions, so they survive
    /// restarts.
    #[arg(long, env = "SIDEMESH_DISCOVER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Long polls, connections, tokens and the mesh CA.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// The flags of a discover server, shared by `sidemesh discover` and `sidemesh controller`
/// (which hosts discover in-process): what [`Options`] is made of besides the data
/// directory.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// The longest long poll honoured, in seconds.
    #[arg(
        long,
        env = "SIDEMESH_DISCOVER_MAX_WAIT_SECONDS",
        default_value_t = 300
    )]
    pub max_wait_seconds: u64,
    /// Connections served at once.
    #[arg(
        long,
        env = "SIDEMESH_DISCOVER_MAX_CONNECTIONS",
        default_value_t = 20_000
    )]
    pub max_connections: usize,
    /// A token file (YAML or JSON; watched, valid edits apply within a second): the bearer
    /// tokens, by SHA-256, and the identities (`ns/svc`, `ns/*`, `*`) each may fetch configs
    /// and certificates for. Without it, anyone who can connect gets any workload's.
    #[arg(
        long,
        visible_alias = "discover-tokens",
        env = "SIDEMESH_DISCOVER_TOKENS"
    )]
    pub tokens: Option<PathBuf>,
    /// Mutual TLS between sidecars: the mesh CA and mode.
    #[command(flatten)]
    pub tls: TlsArgs,
}

impl ServeArgs {
    /// The server options these flags describe, with the data directory `data_dir` (where
    /// a generated CA is kept too).
    pub fn options(
        &self,
        data_dir: Option<&std::path::Path>,
        registry: &prometheus::Registry,
    ) -> anyhow::Result<Options> {
        Ok(Options {
            auth: load_auth(self.tokens.as_deref(), registry)?,
            data_dir: data_dir.map(Into::into),
            max_wait: Duration::from_secs(self.max_wait_seconds.max(1)),
            max_connections: self.max_connections.max(1),
            authority: self.tls.authority(data_dir, registry)?,
            ..Options::default()
        })
    }
}

/// The identity authority's flags, shared by `sidemesh discover` and `sidemesh controller`
/// (which hosts discover in-process).
#[derive(clap::Args, Debug, Clone)]
pub struct TlsArgs {
    /// The mesh CA certificate (PEM) that signs sidecar certificates. Without it (and
    /// `--ca-key`), a CA is generated in `--data-dir` and kept there across restarts.
    /// Watched (either way): a new certificate with its own key signs from then on, a
    /// pair that does not belong together keeps the last good CA (logged as an error).
    #[arg(long, env = "SIDEMESH_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The mesh CA's private key (PEM, PKCS#8).
    #[arg(long, env = "SIDEMESH_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust besides the signing CA, for CA rotation: the
    /// config's trust bundle carries them all. Watched; a bad edit keeps the last good
    /// list (logged as an error).
    #[arg(long, env = "SIDEMESH_CA_TRUST_EXTRA")]
    pub ca_trust_extra: Option<PathBuf>,
    /// How inbound sidecars treat plaintext clients: `disabled` (no TLS at all),
    /// `permissive` (mutual TLS from sidecars, plaintext from others) or `strict`.
    #[arg(long, env = "SIDEMESH_MESH_TLS", default_value = "permissive", value_parser = parse_tls_mode)]
    pub mesh_tls: TlsMode,
    /// The SPIFFE trust domain of sidecar identities.
    #[arg(long, env = "SIDEMESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Lifetime of sidecar certificates, in seconds (sidecars renew at two thirds).
    #[arg(long, env = "SIDEMESH_CERT_TTL_SECONDS", default_value_t = 86_400)]
    pub cert_ttl_seconds: u64,
}

fn parse_tls_mode(s: &str) -> Result<TlsMode, String> {
    match s {
        "disabled" => Ok(TlsMode::Disabled),
        "permissive" => Ok(TlsMode::Permissive),
        "strict" => Ok(TlsMode::Strict),
        _ => Err(format!(
            "expected disabled, permissive or strict, got {s:?}"
        )),
    }
}

impl TlsArgs {
    /// The identity authority these flags describe; `None` when mutual TLS is disabled.
    pub fn authority(
        &self,
        data_dir: Option<&std::path::Path>,
        registry: &prometheus::Registry,
    ) -> anyhow::Result<Option<Arc<Authority>>> {
        if self.mesh_tls == TlsMode::Disabled {
            return Ok(None);
        }
        sidemesh_api::name::check_dns_name(&self.trust_domain)
            .map_err(|e| anyhow::anyhow!("--trust-domain {e}"))?;
        if self.cert_ttl_seconds < 60 {
            anyhow::bail!("--cert-ttl-seconds must be at least 60");
        }
        let config = AuthorityConfig {
            trust_domain: self.trust_domain.clone(),
            mode: self.mesh_tls,
            cert_ttl: Duration::from_secs(self.cert_ttl_seconds),
            extra_trust: self.ca_trust_extra.clone(),
        };
        Ok(Some(Arc::new(Authority::load(
            config,
            self.ca_cert.as_deref(),
            self.ca_key.as_deref(),
            data_dir,
            registry,
        )?)))
    }
}

/// The token check of a token file (`--tokens`, the controller's `--discover-tokens`), for
/// [`Options::auth`]; the server watches the file once it serves.
pub fn load_auth(
    file: Option<&std::path::Path>,
    registry: &prometheus::Registry,
) -> anyhow::Result<Option<Arc<Auth>>> {
    let Some(file) = file else {
        return Ok(None);
    };
    let auth = Arc::new(
        Auth::load(file, registry).map_err(|e| anyhow::anyhow!("token file rejected: {e}"))?,
    );
    tracing::info!(file = %file.display(), tokens = auth.tokens().len(), "token file loaded: configs and certificates need a bearer token");
    Ok(Some(auth))
}

/// Runs discover until SIGINT or SIGTERM.
pub async fn run(args: Args, registry: prometheus::Registry) -> anyhow::Result<()> {
    let opts = args.serve.options(args.data_dir.as_deref(), &registry)?;
    let discover = Discover::new(opts, &registry)?;
    let _watcher = match &args.state {
        Some(file) => {
            let (state, hash) = match statefile::load(file) {
                Ok(x) => x,
                Err(e) => {
                    discover
                        .metrics()
                        .state_reloads
                        .with_label_values(&["failed"])
                        .inc();
                    anyhow::bail!("state file rejected: {e}");
                }
            };
            tracing::info!(file = %file.display(), services = state.services.len(), "state file loaded");
            discover
                .metrics()
                .state_reloads
                .with_label_values(&["ok"])
                .inc();
            let state = std::sync::Arc::new(state);
            discover.set_state("file", state.clone());
            let ok = discover.clone();
            let bad = discover.clone();
            let f = file.clone();
            Some(AbortOnDrop(statefile::watch(
                file.clone(),
                hash,
                state,
                move |state| {
                    tracing::info!(file = %f.display(), services = state.services.len(), "state file reloaded");
                    ok.metrics().state_reloads.with_label_values(&["ok"]).inc();
                    ok.set_state("file", state);
                },
                move |e| {
                    tracing::error!(error = %e, "state file edit rejected; keeping the last good state");
                    bad.metrics()
                        .state_reloads
                        .with_label_values(&["failed"])
                        .inc();
                },
            )))
        }
        None => {
            discover.set_ready();
            None
        }
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let serving = discover.serve(listener)?;
    // Watch for the stop signal before announcing readiness (see shutdown::signal).
    let stop = sidemesh_api::shutdown::signal();
    println!(
        "{}",
        serde_json::json!({"ready": "discover", "listen": serving.addr.to_string()})
    );
    tracing::info!(listen = %serving.addr, "discover serving");
    stop.await;
    tracing::info!("discover stopping");
    serving.task.abort();
    discover.stop();
    Ok(())
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
