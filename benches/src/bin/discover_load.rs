//! `discover_load`: how fast discover gets a state change to every affected long-polling
//! sidecar, and what that costs it.
//!
//! It writes a state file with `--services` services and `--endpoints` instances in all,
//! starts the built `sidemesh discover` on 127.0.0.1, and opens `--clients` real
//! `sidemesh_api::Client`s, each polling its own sidecar's config. Every client service
//! depends on one shared "hot" service plus `--deps` others, so a change to the hot service
//! affects every client at once (the worst fan-out). Each round changes the hot service's
//! instances (by editing the state file, or by a registry PUT) and measures, per client, the
//! time from the change to the client holding a config with the new instance. It reports
//! p50/p99/max of those times, and discover's RSS (VmRSS, VmHWM) and CPU seconds from /proc.
//!
//! Everything stays on loopback; every wait is bounded. Run it through `benches/discover.sh`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Parser, ValueEnum};
use sidemesh_api::{Client, ClientConfig, Snapshot};
use sidemesh_bench::percentile;
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(about = "Load discover with long-polling clients and time state changes")]
struct Args {
    /// The sidemesh binary (a release build).
    #[arg(long, default_value = "target/release/sidemesh")]
    sidemesh: PathBuf,
    /// Services in the state.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Instances (endpoints) in the state, spread evenly over the services.
    #[arg(long, default_value_t = 100_000)]
    endpoints: usize,
    /// Concurrent long-polling clients, one per client service.
    #[arg(long, default_value_t = 2_000)]
    clients: usize,
    /// Dependencies of each client besides the hot service.
    #[arg(long, default_value_t = 4)]
    deps: usize,
    /// State changes to time.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// How each change is made.
    #[arg(long, value_enum, default_value_t = Mode::File)]
    mode: Mode,
    /// The clients' long-poll wait, in seconds.
    #[arg(long, default_value_t = 30)]
    wait: u64,
    /// Working directory for the state file, discover's data and log (default: a temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The most a round may take, in seconds.
    #[arg(long, default_value_t = 60)]
    round_timeout: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    /// Rewrite the state file (atomically, by rename); discover's watcher picks it up.
    File,
    /// PUT a new instance of the hot service into discover's TTL registry.
    Registry,
}

const NAMESPACE: &str = "bench";

fn service_name(i: usize) -> String {
    format!("s{i:05}")
}

/// A unique unicast address per instance: 10.0.0.1, 10.0.0.2, ...
fn instance_address(n: usize) -> Ipv4Addr {
    let n = u32::try_from(n + 1).unwrap_or(u32::MAX);
    Ipv4Addr::from(0x0A00_0000 | (n & 0x00FF_FFFF))
}

/// The address added to the hot service in round `round`.
fn marker_address(round: usize) -> Ipv4Addr {
    let r = u32::try_from(round).unwrap_or(0);
    Ipv4Addr::new(10, 250, (r >> 8) as u8, r as u8)
}

/// The state file as JSON (one service per line), which discover parses on its fast path.
fn state_json(a: &Args, hot_extra: &[Ipv4Addr]) -> String {
    let hot = a.services - 1;
    let per = a.endpoints / a.services;
    let mut extra = a.endpoints % a.services;
    let mut next_instance = 0;
    let mut out = String::with_capacity(a.endpoints * 60 + a.services * 200);
    out.push_str("{\"services\": [\n");
    // A fixed LCG, so every run generates the same dependency graph.
    let mut seed: u64 = 0x5eed;
    for i in 0..a.services {
        let mut count = per;
        if extra > 0 {
            count += 1;
            extra -= 1;
        }
        let mut instances: Vec<String> = (0..count)
            .map(|j| {
                let addr = instance_address(next_instance + j);
                let zone = if j % 2 == 0 { "zone-a" } else { "zone-b" };
                format!(r#"{{"address":"{addr}","meshed":true,"zone":"{zone}"}}"#)
            })
            .collect();
        next_instance += count;
        if i == hot {
            instances.extend(
                hot_extra
                    .iter()
                    .map(|addr| format!(r#"{{"address":"{addr}","meshed":true}}"#)),
            );
        }
        let mut uses = Vec::new();
        if i < a.clients {
            uses.push(format!(r#"{{"service":"{}"}}"#, service_name(hot)));
            let mut picked = Vec::new();
            while picked.len() < a.deps.min(a.services.saturating_sub(2)) {
                seed = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let d = ((seed >> 33) as usize) % a.services;
                if d != i && d != hot && !picked.contains(&d) {
                    picked.push(d);
                }
            }
            uses.extend(
                picked
                    .iter()
                    .map(|d| format!(r#"{{"service":"{}"}}"#, service_name(*d))),
            );
        }
        if i > 0 {
            out.push_str(",\n");
        }
        out.push_str(&format!(
            r#"  {{"namespace":"{NAMESPACE}","name":"{}","ports":[{{"port":8080,"port_outer":18080,"protocol":"http1"}}],"instances":[{}],"use_services":[{}]}}"#,
            service_name(i),
            instances.join(","),
            uses.join(",")
        ));
    }
    out.push_str("\n]}\n");
    out
}

/// Writes `text` to `path` atomically (temp file + rename), so discover never reads half.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The running discover, killed on drop.
struct Discover {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Discover {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_discover(a: &Args, state: &Path, work: &Path) -> anyhow::Result<(Discover, Duration)> {
    let log = std::fs::File::create(work.join("discover.log"))?;
    let started = Instant::now();
    let mut child = Command::new(&a.sidemesh)
        .arg("discover")
        .arg("--state")
        .arg(state)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(work.join("data"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", a.sidemesh.display()))?;
    let stdout = child.stdout.take().context("discover's stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = started + Duration::from_secs(300);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "discover printed no ready line within 300 s; see {}",
                work.join("discover.log").display()
            );
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v.get("ready").is_some() {
            let addr = v["listen"]
                .as_str()
                .context("ready line without listen")?
                .parse()?;
            return Ok((Discover { child, addr }, started.elapsed()));
        }
    }
}

/// One plain HTTP/1.1 request on a fresh connection; returns the status and the body (at
/// most 16 MiB).
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.take(16 << 20).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A gauge or counter value from discover's /metrics.
fn discover_metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = http(addr, "GET", "/metrics", "").ok()?;
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Memory and CPU of a process, from /proc.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    rss_mib: f64,
    hwm_mib: f64,
    cpu_seconds: f64,
}

fn usage(pid: u32, ticks_per_second: f64) -> anyhow::Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    Ok(Usage {
        rss_mib: kib("VmRSS:") / 1024.0,
        hwm_mib: kib("VmHWM:") / 1024.0,
        cpu_seconds: ticks / ticks_per_second,
    })
}

fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Whether a snapshot holds `marker` among the hot service's endpoints.
fn has_marker(s: &Snapshot, hot: &str, marker: Ipv4Addr) -> bool {
    s.outbound_by_name(NAMESPACE, hot).is_some_and(|(_, svc)| {
        svc.ports
            .iter()
            .any(|p| p.endpoints.iter().any(|e| e.address == marker))
    })
}

fn summary(label: &str, mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    let p = |q| percentile(&ms, q).unwrap_or(f64::NAN);
    format!(
        "{label}: n={} p50={:.1} ms p99={:.1} ms max={:.1} ms",
        ms.len(),
        p(50.0),
        p(99.0),
        p(100.0)
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    ensure!(a.services >= 2, "--services must be at least 2");
    ensure!(
        a.clients < a.services,
        "--clients must be below --services (the last service is the hot one)"
    );
    ensure!(
        a.endpoints >= a.services,
        "--endpoints must be at least --services"
    );
    let need = (a.clients as u64) * 2 + 256;
    match open_files_limit() {
        Some(n) if n < need => bail!(
            "the open-files limit is {n}, below the {need} this run needs (a socket per client on each side); run `ulimit -n 65536` first (benches/discover.sh does)"
        ),
        _ => {}
    }
    let tmp;
    let work = match &a.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_owned()
        }
    };
    let state = work.join("state.json");
    let hot = service_name(a.services - 1);
    let mut extra: Vec<Ipv4Addr> = Vec::new();
    let t = Instant::now();
    write_atomically(&state, &state_json(&a, &extra))?;
    let state_bytes = std::fs::metadata(&state)?.len();
    println!(
        "state: {} services, {} endpoints, {} clients x (1 hot + {} deps), {:.1} MiB, generated in {:.1} s",
        a.services,
        a.endpoints,
        a.clients,
        a.deps,
        state_bytes as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );

    let (discover, boot) = start_discover(&a, &state, &work)?;
    let pid = discover.child.id();
    let tps = ticks_per_second();
    let u = usage(pid, tps)?;
    println!(
        "discover: ready in {:.2} s on {}; RSS {:.0} MiB, HWM {:.0} MiB, CPU {:.2} s",
        boot.as_secs_f64(),
        discover.addr,
        u.rss_mib,
        u.hwm_mib,
        u.cpu_seconds
    );

    // The clients, as sidecars run them.
    let t = Instant::now();
    let mut receivers: Vec<watch::Receiver<Option<Snapshot>>> = Vec::with_capacity(a.clients);
    let mut tasks = Vec::with_capacity(a.clients);
    for i in 0..a.clients {
        let cfg = ClientConfig {
            url: format!(
                "http://{}/v1/sidecars/{NAMESPACE}/{}/sidemesh-proxy",
                discover.addr,
                service_name(i)
            ),
            state_dir: None,
            wait: Duration::from_secs(a.wait),
            authorization: None,
            token_file: None,
            metrics_prefix: "bench".to_owned(),
        };
        let (rx, task) = Client::new(cfg, &prometheus::Registry::new())?.spawn();
        receivers.push(rx);
        tasks.push(task);
    }
    let all_hold = async {
        for rx in &mut receivers {
            let _ = rx.wait_for(Option::is_some).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(a.round_timeout), all_hold)
        .await
        .context("not every client got its first config in time")?;
    println!(
        "clients: {} hold their first config after {:.2} s",
        a.clients,
        t.elapsed().as_secs_f64()
    );
    let before_rounds = usage(pid, tps)?;
    let me = std::process::id();
    let clients_before = usage(me, tps)?;
    let rebuild = |addr| {
        (
            discover_metric(addr, "sidemesh_discover_rebuild_duration_seconds_sum").unwrap_or(0.0),
            discover_metric(addr, "sidemesh_discover_rebuild_duration_seconds_count")
                .unwrap_or(0.0),
        )
    };
    let rebuilds_before = rebuild(discover.addr);

    let mut all = Vec::new();
    for round in 1..=a.rounds {
        // Wait (bounded) until every client is parked in a long poll.
        let parked = Instant::now();
        loop {
            let waiting = discover_metric(discover.addr, "sidemesh_discover_long_polls_waiting")
                .unwrap_or(0.0);
            if waiting >= a.clients as f64 {
                break;
            }
            ensure!(
                parked.elapsed() < Duration::from_secs(a.round_timeout),
                "only {waiting} of {} clients are long-polling",
                a.clients
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let marker = marker_address(round);
        let mut waiters = Vec::with_capacity(a.clients);
        match a.mode {
            Mode::File => {
                extra.push(marker);
                let text = state_json(&a, &extra);
                let tmp = state.with_extension("json.tmp");
                std::fs::write(&tmp, text)?;
                // The change happens at the rename: time from there.
                spawn_waiters(&receivers, &hot, marker, &mut waiters);
                let t0 = Instant::now();
                std::fs::rename(&tmp, &state)?;
                collect(&a, round, t0, waiters, &mut all).await?;
            }
            Mode::Registry => {
                let body = format!(
                    r#"{{"address":"{marker}","ports":[{{"port":8080,"target":18080}}],"ttl_seconds":3600,"meshed":true}}"#
                );
                let path = format!("/v1/registry/{NAMESPACE}/{hot}/round-{round}");
                spawn_waiters(&receivers, &hot, marker, &mut waiters);
                let t0 = Instant::now();
                let addr = discover.addr;
                let (status, reply) =
                    tokio::task::spawn_blocking(move || http(addr, "PUT", &path, &body)).await??;
                ensure!(
                    (200..300).contains(&status),
                    "registry PUT answered {status}: {reply}"
                );
                collect(&a, round, t0, waiters, &mut all).await?;
            }
        }
        let u = usage(pid, tps)?;
        println!(
            "  discover after round {round}: RSS {:.0} MiB, HWM {:.0} MiB, CPU {:.2} s",
            u.rss_mib, u.hwm_mib, u.cpu_seconds
        );
    }
    let after = usage(pid, tps)?;
    let rebuilds_after = rebuild(discover.addr);
    let clients_after = usage(me, tps)?;
    println!(
        "clients (this process): CPU {:.2} s during the rounds, RSS {:.0} MiB",
        clients_after.cpu_seconds - clients_before.cpu_seconds,
        clients_after.rss_mib
    );
    let rebuilds = rebuilds_after.1 - rebuilds_before.1;
    if rebuilds > 0.0 {
        // Where the time goes: discover's own rebuild (render every sidecar) per change.
        println!(
            "discover: {rebuilds} rebuilds during the rounds, {:.0} ms each on average",
            (rebuilds_after.0 - rebuilds_before.0) / rebuilds * 1000.0
        );
    }
    println!("{}", summary("all rounds", all.clone()));
    println!(
        "discover: RSS {:.0} MiB, HWM {:.0} MiB; CPU {:.2} s in all, {:.2} s during the {} rounds",
        after.rss_mib,
        after.hwm_mib,
        after.cpu_seconds,
        after.cpu_seconds - before_rounds.cpu_seconds,
        a.rounds
    );
    let mut sorted = all;
    sorted.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "mode": format!("{:?}", a.mode).to_lowercase(),
            "services": a.services, "endpoints": a.endpoints, "clients": a.clients,
            "rounds": a.rounds,
            "p50_ms": percentile(&sorted, 50.0), "p99_ms": percentile(&sorted, 99.0),
            "max_ms": percentile(&sorted, 100.0),
            "rss_mib": after.rss_mib, "hwm_mib": after.hwm_mib,
            "cpu_seconds": after.cpu_seconds,
            "cpu_seconds_rounds": after.cpu_seconds - before_rounds.cpu_seconds,
        })
    );
    for t in tasks {
        t.abort();
    }
    drop(discover);
    Ok(())
}

/// One task per client, each ending when that client holds the round's marker.
fn spawn_waiters(
    receivers: &[watch::Receiver<Option<Snapshot>>],
    hot: &str,
    marker: Ipv4Addr,
    waiters: &mut Vec<tokio::task::JoinHandle<Instant>>,
) {
    for rx in receivers {
        let mut rx = rx.clone();
        let hot = hot.to_owned();
        waiters.push(tokio::spawn(async move {
            let _ = rx
                .wait_for(|s| s.as_ref().is_some_and(|s| has_marker(s, &hot, marker)))
                .await;
            Instant::now()
        }));
    }
}

/// Waits (bounded) for every waiter and records each one's delay after `t0`, in ms.
async fn collect(
    a: &Args,
    round: usize,
    t0: Instant,
    waiters: Vec<tokio::task::JoinHandle<Instant>>,
    all: &mut Vec<f64>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.round_timeout);
    let mut ms = Vec::with_capacity(waiters.len());
    let mut missed = 0;
    for w in waiters {
        match tokio::time::timeout_at(deadline, w).await {
            Ok(Ok(at)) => ms.push(at.saturating_duration_since(t0).as_secs_f64() * 1000.0),
            _ => missed += 1,
        }
    }
    println!("{}", summary(&format!("round {round}"), ms.clone()));
    ensure!(
        missed == 0,
        "round {round}: {missed} clients did not get the change within {} s",
        a.round_timeout
    );
    all.extend(ms);
    Ok(())
}
