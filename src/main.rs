//! The `sidemesh` command: one binary for every part of the mesh. Thin: parse flags, set up
//! logging and the runtime, hand over to the part's crate.

use clap::{Parser, Subcommand, ValueEnum};

mod up;

#[derive(Parser)]
#[command(
    name = "sidemesh",
    version,
    about = "A service mesh modelled on Rainbond's plugin system"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        env = "SIDEMESH_LOG_FORMAT",
        default_value = "human"
    )]
    log_format: LogFormat,
    /// Runtime worker threads (default: one per core).
    #[arg(long, global = true, env = "SIDEMESH_WORKER_THREADS")]
    worker_threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a sidecar config (JSON, as discover serves it) and print what is wrong.
    Check(CheckArgs),
    /// Run the sidecar: inbound and outbound proxying from the config at DISCOVER_URL.
    Proxy(Box<sidemesh_proxy::cli::Args>),
    /// Run a whole mesh locally from a state file: discover, demo backends behind inbound
    /// sidecars, and client sidecars; prints what to curl.
    Up(up::Args),
    /// A tiny HTTP server answering "hello from <name>", for demos and tests.
    DemoBackend(sidemesh_proxy::demo::Args),
    /// Watch Kubernetes, serve every meshed pod's config (discover) and run the injection
    /// webhook.
    Controller(ControllerArgs),
    /// Inject the sidecar and plugins into Kubernetes manifests offline (prints them).
    Inject(sidemesh_controller::cli::InjectArgs),
    /// Print the manifests that install sidemesh into a cluster.
    Install(sidemesh_controller::cli::InstallArgs),
    /// Copy this binary (the Job fallback's init container).
    #[command(hide = true)]
    CopySelf(sidemesh_controller::job::CopySelfArgs),
    /// Run an app command and leave a done file when it exits (the Job fallback).
    #[command(hide = true)]
    JobRun(sidemesh_controller::job::JobRunArgs),
    /// Run the proxy until every done file exists (the Job fallback).
    #[command(hide = true)]
    JobSidecar(sidemesh_controller::job::JobSidecarArgs),
    /// Wait until a URL answers 200 (the legacy sidecar's postStart hook).
    #[command(hide = true)]
    WaitReady(sidemesh_controller::cli::WaitReadyArgs),
    /// Serve sidecar configs (DISCOVER_URL) from a YAML state file and the TTL registry.
    Discover(sidemesh_discover::cli::Args),
    /// Run the DNS shim on its own: mesh names answered locally, the rest forwarded.
    Dns(Box<sidemesh_dns::cli::Args>),
}

/// `sidemesh controller`'s flags, with those of the discover it hosts in-process.
#[derive(clap::Args)]
struct ControllerArgs {
    #[command(flatten)]
    controller: sidemesh_controller::cli::Args,
    /// The hosted discover's long polls, connections, tokens (`--discover-tokens`, an alias
    /// of `--tokens`) and mesh CA, as for `sidemesh discover`.
    #[command(flatten)]
    discover: sidemesh_discover::cli::ServeArgs,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// The config file to check.
    file: std::path::PathBuf,
}

/// mimalloc rather than glibc's malloc: a proxied h2c request allocates and frees a few
/// dozen small blocks (h2's frames, header maps, stream slots), and the allocator's share
/// of its instructions went from ~3.6k to ~1.5k (see docs/proxy.md, "Performance").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // The servers only: `job-run` and `job-sidecar` start other programs (an app's command,
    // the proxy), which would inherit the raised limit (a proxy raises its own).
    if matches!(
        cli.command,
        Command::Proxy(_)
            | Command::Up(_)
            | Command::DemoBackend(_)
            | Command::Controller(_)
            | Command::Discover(_)
            | Command::Dns(_)
    ) {
        raise_open_files_limit();
    }
    let registry = prometheus::Registry::new();
    let runtime = runtime(cli.worker_threads)?;
    let _ = (&registry, &runtime);
    match cli.command {
        Command::Check(args) => check(&args),
        Command::Proxy(args) => {
            let sidecars = args
                .dns
                .map(|listen| {
                    dns_shim(
                        listen,
                        args.dns_resolv_conf.clone(),
                        args.dns_authoritative_zones.clone(),
                        registry.clone(),
                    )
                })
                .into_iter()
                .collect();
            runtime.block_on(sidemesh_proxy::cli::run_with(*args, registry, sidecars))
        }
        Command::Up(args) => runtime.block_on(up::run(args, registry)),
        Command::DemoBackend(args) => runtime.block_on(sidemesh_proxy::demo::run(args)),
        Command::Controller(args) => runtime.block_on(async {
            let opts = args.discover.options(None, &registry)?;
            let discover = sidemesh_discover::server::Discover::new(opts, &registry)?;
            let host = std::sync::Arc::new(DiscoverHost(discover, registry.clone()));
            sidemesh_controller::cli::run(args.controller, registry, host).await
        }),
        Command::Inject(args) => sidemesh_controller::cli::inject(args),
        Command::Install(args) => sidemesh_controller::cli::install(args),
        Command::CopySelf(args) => sidemesh_controller::job::copy_self(args),
        Command::JobRun(args) => {
            let code = runtime.block_on(sidemesh_controller::job::job_run(args))?;
            std::process::exit(code)
        }
        Command::JobSidecar(args) => {
            let code = runtime.block_on(sidemesh_controller::job::job_sidecar(args))?;
            std::process::exit(code)
        }
        Command::WaitReady(args) => runtime.block_on(sidemesh_controller::cli::wait_ready(args)),
        Command::Discover(args) => runtime.block_on(sidemesh_discover::cli::run(args, registry)),
        Command::Dns(args) => runtime.block_on(dns(*args, registry)),
    }
}

/// Raises the soft limit on open descriptors to the hard one, as Go programs do at start:
/// a sidecar holds a listener per service used and two sockets per proxied connection, and
/// a soft limit of 1,024 (common under systemd and older container runtimes) would refuse
/// binds and connections long before the hard limit. Never lowers it; a failure is logged
/// and the process runs with what it has. Not for the commands that start other programs,
/// which would inherit it.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-files limit"),
            Err(error) => {
                tracing::warn!(%error, soft, hard, "cannot raise the open-files limit")
            }
        },
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot read the open-files limit"),
    }
}

/// The DNS shim run inside a sidecar (`sidemesh proxy --dns ADDR`): it answers the mesh
/// names of the sidecar's own config and forwards the rest to the resolvers of
/// /etc/resolv.conf (never to itself). Kept here because the proxy crate does not depend
/// on the DNS crate.
fn dns_shim(
    listen: std::net::SocketAddr,
    resolv_conf: std::path::PathBuf,
    authoritative_zones: Vec<String>,
    registry: prometheus::Registry,
) -> sidemesh_proxy::cli::Sidecar {
    Box::new(move |snapshots| {
        Box::pin(async move {
            let conf = match sidemesh_dns::ResolvConf::read(&resolv_conf) {
                Ok(conf) => conf,
                Err(e) => {
                    tracing::warn!(file = %resolv_conf.display(), error = %e, "dns shim: cannot read resolv.conf; only the config's upstreams are used");
                    sidemesh_dns::ResolvConf::default()
                }
            };
            let mut opts = sidemesh_dns::ShimOptions::from_resolv_conf(listen, &conf);
            opts.fallback_upstreams.retain(|u| *u != listen);
            opts.authoritative_zones = authoritative_zones;
            if opts.fallback_upstreams.is_empty() {
                tracing::warn!(file = %resolv_conf.display(), "dns shim: no fallback upstreams (resolv.conf lists none but the shim); names outside the mesh answer SERVFAIL unless the config names upstreams");
            }
            let shim = sidemesh_dns::Shim::start(opts, snapshots, &registry).await?;
            let addr = shim.udp_addr();
            // The shim serves while its handle lives: keep it for the life of the process.
            tokio::spawn(async move {
                let _shim = shim;
                std::future::pending::<()>().await
            });
            Ok(vec![("dns".to_owned(), addr.to_string())])
        })
    })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn runtime(worker_threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    // One worker: a current-thread runtime does the same work without cross-thread
    // wake-ups or work stealing.
    if worker_threads == Some(1) {
        return Ok(tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?);
    }
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all();
    if let Some(n) = worker_threads {
        anyhow::ensure!(n >= 1, "--worker-threads must be at least 1");
        b.worker_threads(n);
    }
    Ok(b.build()?)
}

fn check(args: &CheckArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.file.display()))?;
    match sidemesh_api::Snapshot::from_json(&bytes) {
        Ok(s) => {
            println!("{}: valid (version {})", args.file.display(), s.version());
            Ok(())
        }
        Err(sidemesh_api::ConfigError::Invalid(errors)) => {
            for e in &errors.0 {
                eprintln!("{}: {e}", args.file.display());
            }
            anyhow::bail!("{} problem(s) in {}", errors.0.len(), args.file.display())
        }
        Err(e) => anyhow::bail!("{}: {e}", args.file.display()),
    }
}

/// `sidemesh dns`. With `--state FILE` this renders the sidecar's config from a discover
/// state file here (re-rendered when the file changes), because the DNS crate does not
/// depend on the discover crate; the other sources are the DNS crate's own.
async fn dns(args: sidemesh_dns::cli::Args, registry: prometheus::Registry) -> anyhow::Result<()> {
    use sidemesh_discover::render::SidecarKey;
    use sidemesh_discover::store::{Persisted, Store};
    use std::sync::{Arc, Mutex};

    let Some(file) = args.state.clone() else {
        return sidemesh_dns::cli::run(args, registry).await;
    };
    let key = sidecar_key(args.identity.as_deref())?;
    let (state, hash) = sidemesh_discover::statefile::load(&file)?;
    let state = Arc::new(state);
    let store = Arc::new(Mutex::new(Store::new(Persisted::default(), now_ms())));
    let (tx, rx) = tokio::sync::watch::channel(None);
    let tx = Arc::new(tx);
    // Renders `key` from a new state; a sidecar missing from it keeps its last config.
    let publish = move |store: &Mutex<Store>,
                        key: &SidecarKey,
                        tx: &tokio::sync::watch::Sender<Option<sidemesh_api::Snapshot>>,
                        state: Arc<sidemesh_api::state::ClusterState>| {
        let mut store = store.lock().unwrap_or_else(|e| e.into_inner());
        store.set_source("state-file", state, now_ms());
        let rendered = store.sidecar(key).map(|s| {
            let mut config = s.config.clone();
            config.version = s.version;
            sidemesh_api::Snapshot::try_from(config)
        });
        match rendered {
            Some(Ok(snapshot)) => {
                tx.send_replace(Some(snapshot));
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "rendered config rejected, keeping the last good one")
            }
            None => {
                tracing::warn!(error = %store.missing(key), "no config for this sidecar in the state file, keeping the last one")
            }
        }
    };
    publish(&store, &key, &tx, state.clone());
    let (store2, key2, tx2) = (store.clone(), key.clone(), tx.clone());
    let _watch = sidemesh_discover::statefile::watch(
        file,
        hash,
        state,
        move |state| publish(&store2, &key2, &tx2, state),
        |e| tracing::warn!(error = %e, "state file rejected, keeping the last good one"),
    );
    sidemesh_dns::cli::serve(args, registry, rx).await
}

/// Parses `--identity namespace/service[/plugin]` (plugin: the built-in network proxy).
fn sidecar_key(identity: Option<&str>) -> anyhow::Result<sidemesh_discover::render::SidecarKey> {
    let identity = identity
        .ok_or_else(|| anyhow::anyhow!("--state needs --identity namespace/service[/plugin]"))?;
    let mut parts = identity.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(ns), Some(svc), plugin, None) if !ns.is_empty() && !svc.is_empty() => {
            Ok(sidemesh_discover::render::SidecarKey {
                namespace: ns.to_owned(),
                service: svc.to_owned(),
                plugin: plugin
                    .unwrap_or(sidemesh_api::state::BUILTIN_NETPROXY)
                    .to_owned(),
            })
        }
        _ => anyhow::bail!("--identity {identity:?}: expected namespace/service[/plugin]"),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The controller's in-process discover server: the controller crate does not depend on
/// `sidemesh-discover`, so the two meet here.
struct DiscoverHost(sidemesh_discover::server::Discover, prometheus::Registry);

/// Discover's token reviews, asked of the API server by the controller's client.
struct ClusterReviewer(sidemesh_controller::review::TokenReviews);

impl sidemesh_discover::review::TokenReviewer for ClusterReviewer {
    fn review(
        &self,
        token: String,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<sidemesh_discover::review::Reviewed, String>>
                + Send,
        >,
    > {
        use sidemesh_controller::review::Reviewed as Asked;
        use sidemesh_discover::review::{AUDIENCE, Reviewed};
        let reviews = self.0.clone();
        Box::pin(async move {
            Ok(match reviews.review(token, AUDIENCE).await? {
                Asked::Authenticated(username) => Reviewed::Authenticated { username },
                Asked::Rejected(reason) => Reviewed::Rejected { reason },
            })
        })
    }
}

impl sidemesh_controller::cli::DiscoverHost for DiscoverHost {
    fn serve(&self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        self.0.serve(listener).map(|_| ())
    }

    fn set_state(&self, state: sidemesh_api::state::ClusterState) {
        self.0.set_state("kubernetes", state);
    }

    fn apply(&self, upsert: Vec<sidemesh_api::state::Service>, remove: Vec<(String, String)>) {
        let delta = sidemesh_discover::store::ServiceDelta { upsert, remove };
        self.0.apply("kubernetes", delta);
    }

    fn review_tokens(
        &self,
        reviews: sidemesh_controller::review::TokenReviews,
    ) -> anyhow::Result<()> {
        let review = sidemesh_discover::review::Review::new(
            std::sync::Arc::new(ClusterReviewer(reviews)),
            &self.1,
        )?;
        self.0.review_tokens(std::sync::Arc::new(review));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn injected_tokens_are_made_for_the_audience_discover_checks() {
        assert_eq!(
            sidemesh_controller::inject::TOKEN_AUDIENCE,
            sidemesh_discover::review::AUDIENCE
        );
    }
}
