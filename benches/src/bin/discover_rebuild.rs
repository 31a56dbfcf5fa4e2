//! Micro-benchmark of discover's store: how long rendering every sidecar takes for a large
//! cluster, how long one change takes to re-render, and how long a state file of that size
//! takes to parse and validate (in full, and after an edit). No network: the pure core only.
//!
//! `cargo run --release -p sidemesh-bench --bin discover_rebuild -- --services 10000 --endpoints 100000`

use std::time::Instant;

use clap::Parser;
use sidemesh_api::state::ClusterState;
use sidemesh_discover::statefile;
use sidemesh_discover::store::Store;

#[derive(Parser)]
struct Args {
    /// Services in the cluster.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Endpoints (static instances) over all services.
    #[arg(long, default_value_t = 100_000)]
    endpoints: usize,
    /// Dependencies per service.
    #[arg(long, default_value_t = 3)]
    deps: usize,
    /// Changes to time.
    #[arg(long, default_value_t = 5)]
    changes: usize,
}

/// A cluster of `services` services in 10 namespaces, each using `deps` others, with the
/// endpoints spread evenly.
fn cluster(a: &Args, generation: usize) -> ClusterState {
    let per = (a.endpoints / a.services.max(1)).max(1);
    let mut services = Vec::with_capacity(a.services);
    for i in 0..a.services {
        let deps: Vec<serde_json::Value> = (1..=a.deps)
            .map(|k| {
                let j = (i + k * 7919) % a.services;
                serde_json::json!({"service": format!("ns{}/svc{j}", j % 10)})
            })
            .collect();
        let instances: Vec<serde_json::Value> = (0..per)
            .map(|e| {
                // The first service's first endpoint moves with each generation.
                let last = if i == 0 && e == 0 {
                    generation % 250
                } else {
                    e % 250
                };
                serde_json::json!({
                    "address": format!("10.{}.{}.{}", i / 250 % 250, i % 250, last + 1),
                    "meshed": true
                })
            })
            .collect();
        services.push(serde_json::json!({
            "namespace": format!("ns{}", i % 10),
            "name": format!("svc{i}"),
            "ports": [{"port": 8080, "port_outer": 18080, "protocol": "http1"}],
            "use_services": deps,
            "instances": instances,
        }));
    }
    serde_json::from_value(serde_json::json!({ "services": services })).unwrap_or_default()
}

fn main() {
    let a = Args::parse();
    let state = cluster(&a, 0);
    let yaml = serde_norway::to_string(&state).unwrap_or_default();
    let json = serde_json::to_string(&state).unwrap_or_default();
    let t = Instant::now();
    let ok = statefile::parse(std::path::Path::new("bench.json"), &json).is_ok();
    println!(
        "state file (JSON): {} KiB parsed and fully validated in {:.1} ms ({})",
        json.len() / 1024,
        t.elapsed().as_secs_f64() * 1e3,
        if ok { "valid" } else { "INVALID" }
    );
    let file = std::path::Path::new("bench.yaml");
    let t = Instant::now();
    let parsed = statefile::parse(file, &yaml);
    println!(
        "state file: {} KiB parsed and fully validated in {:.1} ms ({})",
        yaml.len() / 1024,
        t.elapsed().as_secs_f64() * 1e3,
        if parsed.is_ok() { "valid" } else { "INVALID" }
    );
    if let Ok(previous) = &parsed {
        let edited = serde_norway::to_string(&cluster(&a, 1)).unwrap_or_default();
        let t = Instant::now();
        let ok = statefile::parse_after(file, &edited, Some(previous)).is_ok();
        println!(
            "state file edit: parsed and validated incrementally in {:.1} ms ({})",
            t.elapsed().as_secs_f64() * 1e3,
            if ok { "valid" } else { "INVALID" }
        );
    }
    let mut store = Store::default();
    let t = Instant::now();
    let c = store.set_source("bench", state, 1);
    println!(
        "initial: {} sidecars rendered in {:.1} ms",
        c.changed.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    for g in 1..=a.changes {
        let state = cluster(&a, g);
        let t = Instant::now();
        let cpu = cpu_ms();
        let c = store.set_source("bench", state, 1 + g as u64);
        println!(
            "change {g}: {} sidecars changed, rebuild {:.1} ms wall, {} ms CPU",
            c.changed.len(),
            t.elapsed().as_secs_f64() * 1e3,
            cpu_ms().saturating_sub(cpu)
        );
    }
}

/// This process's user + system CPU time in milliseconds (10 ms resolution), from
/// /proc/self/stat; 0 where unavailable. Wall time alone misleads on a loaded machine.
fn cpu_ms() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<u64>() * 10
}
