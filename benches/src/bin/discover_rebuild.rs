//! Micro-benchmark of discover's store: how long rendering every sidecar takes for a large
//! cluster, and how long one change takes to re-render. No network: the pure core only.
//!
//! `cargo run --release -p sidemesh-bench --bin discover_rebuild -- --services 10000 --endpoints 100000`

use std::time::Instant;

use clap::Parser;
use sidemesh_api::state::ClusterState;
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
        let c = store.set_source("bench", state, 1 + g as u64);
        println!(
            "change {g}: {} sidecars changed, rebuild {:.1} ms",
            c.changed.len(),
            t.elapsed().as_secs_f64() * 1e3
        );
    }
}
