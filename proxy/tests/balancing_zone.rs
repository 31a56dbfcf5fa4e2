//! Zone-aware balancing: the own zone takes light load, the excess spills to other zones
//! while the own zone is overloaded (over real sockets), and a pick allocates nothing
//! (counted by `allocation-counter`, which replaces this test binary's allocator).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::json;
use sidemesh_api::config::BalancePolicy;
use sidemesh_proxy::balance::{Balancer, Endpoint, EndpointStats};
use support::*;

#[test]
fn zone_aware_picks_allocate_nothing() {
    let endpoints: Vec<Arc<Endpoint>> = (0..6)
        .map(|i| {
            Arc::new(Endpoint {
                addr: format!("10.0.0.{}:80", i + 1).parse().unwrap(),
                authority: None,
                weight: 100,
                local: i < 3,
                meshed: false,
                stats: Arc::new(EndpointStats::default()),
            })
        })
        .collect();
    // One own-zone endpoint ejected, the own zone overloaded: every branch of the filter.
    endpoints[0]
        .stats
        .ejected_until_ms
        .store(u64::MAX, Ordering::Relaxed);
    for e in &endpoints[..3] {
        e.stats.inflight.store(50, Ordering::Relaxed);
    }
    for policy in [
        BalancePolicy::RoundRobin,
        BalancePolicy::Random,
        BalancePolicy::LeastRequest,
        BalancePolicy::PeakEwma,
        BalancePolicy::RingHash,
        BalancePolicy::Maglev,
    ] {
        for min_healthy in [0, 70] {
            let b = Balancer::new(policy, endpoints.clone(), true, min_healthy);
            let avoid = Some(endpoints[4].addr);
            // Warm up lazily initialised state (the clock origin, the thread's RNG).
            drop(b.pick(Some(1), avoid));
            let mut picked = 0;
            let info = allocation_counter::measure(|| {
                for k in 0..1000u64 {
                    picked +=
                        usize::from(b.pick(Some(k.wrapping_mul(0x9e37_79b9)), avoid).is_some());
                }
            });
            assert_eq!(picked, 1000);
            assert_eq!(info.count_total, 0, "{policy:?} allocated while picking");
        }
    }
}

#[tokio::test]
async fn overload_spills_to_the_other_zone_and_light_load_stays_home() {
    let ip = loopback();
    // The own zone's only endpoint is slow (every request takes 300 ms); the other zone's
    // answers at once.
    let slow = backend_with(
        ip,
        Arc::new(|_req| {
            Box::pin(async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                hyper::Response::builder()
                    .header("x-backend", "home")
                    .body(Full::new(Bytes::from_static(b"home")))
                    .unwrap()
            })
        }),
    )
    .await;
    let fast = backend(ip, "away").await;
    let svc = loopback();
    let cfg = json!({
        "version": 1,
        "identity": {"namespace": "shop", "service": "web", "plugin": "sidemesh-proxy", "zone": "a"},
        "outbound": [{
            "name": "cart", "namespace": "shop", "address": svc.to_string(),
            "balancer": {"policy": "least_request"},
            "ports": [{"port": 80, "protocol": "http1", "endpoints": [
                {"address": slow.addr.ip().to_string(), "port": slow.addr.port(), "zone": "a"},
                {"address": fast.addr.ip().to_string(), "port": fast.addr.port(), "zone": "b"},
            ]}],
        }],
    });
    let _p = start(ip, &cfg).await;
    let client = h1_client();
    let url = format!("http://{svc}/");

    // Light load, one request at a time: all of it stays in the own zone.
    let seen = tally(&client, &url, 10).await;
    assert_eq!(seen.get("home"), Some(&10), "{seen:?}");

    // 40 at once: the own zone takes its floor (8 in flight), then keeps at most twice the
    // other zone's load; in a burst where nothing finishes that is 8 + 2/3 of the rest
    // (seen: 27 home, 13 away); more go away when the other zone answers in between.
    let burst: Vec<_> = (0..40)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { get(&client, &url, &[]).await })
        })
        .collect();
    let mut home = 0;
    for r in burst {
        let (status, backend, _) = r.await.unwrap();
        assert_eq!(status, 200);
        home += usize::from(backend == "home");
    }
    assert!((8..=32).contains(&home), "{home} of 40 stayed home");

    // Once the burst is over, traffic is back home.
    let seen = tally(&client, &url, 5).await;
    assert_eq!(seen.get("home"), Some(&5), "{seen:?}");
}
