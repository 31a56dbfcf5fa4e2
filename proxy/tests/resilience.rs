//! Resilience on real sockets: retries and their budget, breaker limits, timeouts,
//! passive outlier ejection and return, active health checks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use serde_json::json;
use support::*;

/// A backend answering `status` (and its name), after `delay`.
async fn fixed(
    ip: std::net::Ipv4Addr,
    name: &'static str,
    status: u16,
    delay: Duration,
) -> Backend {
    backend_with(
        ip,
        Arc::new(move |_req| {
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Response::builder()
                    .status(status)
                    .header("x-backend", name)
                    .body(Full::new(Bytes::from(name)))
                    .unwrap()
            })
        }),
    )
    .await
}

/// A backend named `name` that answers 200 while `ok` holds and 503 otherwise; with
/// `only_path`, only that path fails (the rest always answers 200).
async fn switchable(
    ip: std::net::Ipv4Addr,
    name: &'static str,
    ok: Arc<AtomicBool>,
    only_path: Option<&'static str>,
) -> Backend {
    backend_with(
        ip,
        Arc::new(move |req| {
            let fine =
                ok.load(Ordering::Relaxed) || only_path.is_some_and(|p| req.uri().path() != p);
            Box::pin(async move {
                Response::builder()
                    .status(if fine { 200 } else { 503 })
                    .header("x-backend", name)
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            })
        }),
    )
    .await
}

fn dead_addr(ip: std::net::Ipv4Addr) -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind((ip, 0)).unwrap();
    l.local_addr().unwrap()
}

fn metric(p: &Running, needle: &str) -> f64 {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&p.registry.gather())
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn connect_failures_are_retried_on_another_endpoint() {
    let ip = loopback();
    let good = backend(ip, "good").await;
    let dead = dead_addr(ip);
    let svc = loopback();
    let cfg = outbound_config(
        1,
        svc,
        80,
        "http1",
        &[dead, good.addr],
        json!({"balancer": {"policy": "round_robin"}}),
    );
    let p = start(ip, &cfg).await;
    let c = h1_client();
    for _ in 0..20 {
        let (status, who, _) = get(&c, &format!("http://{svc}/"), &[]).await;
        assert_eq!((status, who.as_str()), (200, "good"));
    }
    assert!(metric(&p, "sidemesh_proxy_retries_total") >= 5.0);
}

#[tokio::test]
async fn retries_of_5xx_stay_within_the_budget() {
    let ip = loopback();
    let bad = fixed(ip, "bad", 503, Duration::ZERO).await;
    let svc = loopback();
    let cfg = outbound_config(
        1,
        svc,
        80,
        "http1",
        &[bad.addr],
        json!({"retry": {"attempts": 3, "retry_on": ["gateway_error"], "backoff_base_ms": 0,
                         "budget_percent": 20, "min_retries_per_second": 0}}),
    );
    let p = start(ip, &cfg).await;
    let c = h1_client();
    let n = 100;
    for _ in 0..n {
        let (status, who, _) = get(&c, &format!("http://{svc}/"), &[]).await;
        // The upstream's own 503 is passed on when retries give up.
        assert_eq!((status, who.as_str()), (503, "bad"));
    }
    let hits = bad.hits.load(Ordering::Relaxed);
    // Without a budget this would be 400; the budget allows 20 % extra.
    assert!(
        (n + 1..=n + 21).contains(&hits),
        "upstream saw {hits} tries"
    );
    assert!(metric(&p, "sidemesh_proxy_retry_budget_exhausted_total") > 0.0);
}

#[tokio::test]
async fn max_requests_breaker_answers_503_with_reason() {
    let ip = loopback();
    let slow = fixed(ip, "slow", 200, Duration::from_millis(800)).await;
    let svc = loopback();
    let cfg = outbound_config(
        1,
        svc,
        80,
        "http1",
        &[slow.addr],
        json!({"limits": {"max_requests": 1}}),
    );
    let _p = start(ip, &cfg).await;
    let c = h1_client();
    let url = format!("http://{svc}/");
    let first = tokio::spawn({
        let (c, url) = (c.clone(), url.clone());
        async move { get(&c, &url, &[]).await }
    });
    assert!(eventually(|| slow.hits.load(Ordering::Relaxed) == 1).await);
    let req = hyper::Request::get(&url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-sidemesh-overloaded"], "max_requests");
    assert_eq!(first.await.unwrap().0, 200);
}

#[tokio::test]
async fn max_connections_with_no_waiting_room_answers_503() {
    let ip = loopback();
    let slow = fixed(ip, "slow", 200, Duration::from_millis(800)).await;
    let svc = loopback();
    let cfg = outbound_config(
        1,
        svc,
        80,
        "http1",
        &[slow.addr],
        json!({"limits": {"max_connections": 1, "max_pending_requests": 1}}),
    );
    let _p = start(ip, &cfg).await;
    let url = format!("http://{svc}/");
    // Three at once: one holds the connection, one waits, the third is refused.
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = h1_client();
            let req = hyper::Request::get(&url)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let r = c.request(req).await.unwrap();
            (
                r.status().as_u16(),
                r.headers()
                    .get("x-sidemesh-overloaded")
                    .map(|v| v.to_str().unwrap().to_owned()),
            )
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    results.sort();
    assert_eq!(results[0].0, 200, "{results:?}");
    assert!(
        results.contains(&(503, Some("max_pending_requests".into()))),
        "{results:?}"
    );
}

#[tokio::test]
async fn request_timeout_answers_504_in_time() {
    let ip = loopback();
    let slow = fixed(ip, "slow", 200, Duration::from_secs(3)).await;
    let svc = loopback();
    let cfg = outbound_config(
        1,
        svc,
        80,
        "http1",
        &[slow.addr],
        json!({"timeouts": {"request_ms": 200}}),
    );
    let p = start(ip, &cfg).await;
    let t0 = Instant::now();
    let (status, _, body) = get(&h1_client(), &format!("http://{svc}/"), &[]).await;
    assert_eq!(status, 504, "{body}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(
        metric(&p, "sidemesh_proxy_timeouts_total{kind=\"request\""),
        1.0
    );
}

#[tokio::test]
async fn per_try_timeout_retries_on_the_other_endpoint() {
    let ip = loopback();
    let slow = fixed(ip, "slow", 200, Duration::from_secs(3)).await;
    let fast = fixed(ip, "fast", 200, Duration::ZERO).await;
    let svc = loopback();
    let cfg = outbound_config(
        1,
        svc,
        80,
        "http1",
        &[slow.addr, fast.addr],
        json!({"balancer": {"policy": "round_robin"},
               "retry": {"attempts": 1, "retry_on": ["per_try_timeout"], "per_try_timeout_ms": 150}}),
    );
    let _p = start(ip, &cfg).await;
    let c = h1_client();
    for _ in 0..4 {
        let (status, who, _) = get(&c, &format!("http://{svc}/"), &[]).await;
        assert_eq!((status, who.as_str()), (200, "fast"));
    }
}

#[tokio::test]
async fn consecutive_5xx_eject_an_endpoint_until_its_time_is_up() {
    let ip = loopback();
    let ok = Arc::new(AtomicBool::new(false));
    let flaky = switchable(ip, "flaky", ok.clone(), None).await;
    let good = backend(ip, "good").await;
    let svc = loopback();
    let cfg = outbound_config(
        1,
        svc,
        80,
        "http1",
        &[flaky.addr, good.addr],
        json!({"balancer": {"policy": "round_robin"}, "retry": {"attempts": 0},
               "outlier_detection": {"consecutive_5xx": 3, "base_ejection_ms": 600,
                                     "max_ejection_percent": 50}}),
    );
    let p = start(ip, &cfg).await;
    let c = h1_client();
    let url = format!("http://{svc}/");
    for _ in 0..6 {
        get(&c, &url, &[]).await;
    }
    let ejected_at = flaky.hits.load(Ordering::Relaxed);
    assert_eq!(ejected_at, 3, "three 5xx in a row eject");
    assert_eq!(metric(&p, "sidemesh_proxy_outlier_ejections_total"), 1.0);
    for _ in 0..10 {
        assert_eq!(get(&c, &url, &[]).await.1, "good");
    }
    ok.store(true, Ordering::Relaxed);
    // After the ejection time the endpoint takes traffic again.
    let back = async {
        loop {
            if get(&c, &url, &[]).await.1 == "flaky" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(WAIT, back)
        .await
        .expect("endpoint returned");
}

#[tokio::test]
async fn active_http_health_checks_take_endpoints_out_and_back() {
    let ip = loopback();
    let healthy = Arc::new(AtomicBool::new(false));
    let checked = switchable(ip, "checked", healthy.clone(), Some("/healthz")).await;
    let other = backend(ip, "other").await;
    let svc = loopback();
    let cfg = outbound_config(
        1,
        svc,
        80,
        "http1",
        &[checked.addr, other.addr],
        json!({"balancer": {"policy": "round_robin"},
               "health_check": {"http_path": "/healthz", "interval_ms": 100, "timeout_ms": 500,
                                "unhealthy_threshold": 1, "healthy_threshold": 1}}),
    );
    let _p = start(ip, &cfg).await;
    let c = h1_client();
    let url = format!("http://{svc}/");
    // Once the check has failed, every request goes to the other endpoint.
    let out = async {
        loop {
            let seen = tally(&c, &url, 4).await;
            if seen.get("other") == Some(&4) {
                return;
            }
        }
    };
    tokio::time::timeout(WAIT, out)
        .await
        .expect("failing endpoint taken out");
    healthy.store(true, Ordering::Relaxed);
    let back = async {
        loop {
            if tally(&c, &url, 4).await.contains_key("checked") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, back)
        .await
        .expect("endpoint back after passing checks");
}

#[tokio::test]
async fn idle_client_connections_are_closed_http_and_tcp() {
    use tokio::io::AsyncWriteExt;
    let ip = loopback();
    let a = backend(ip, "a").await;
    for proto in ["http1", "tcp"] {
        let svc = loopback();
        let cfg = outbound_config(
            1,
            svc,
            80,
            proto,
            &[a.addr],
            json!({"timeouts": {"idle_ms": 200}}),
        );
        let _p = start(ip, &cfg).await;
        let mut s = tokio::net::TcpStream::connect((svc, 80)).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let t0 = Instant::now();
        // Read the response, then wait for the proxy to close the idle connection.
        assert!(
            closed_in_time(&mut s).await,
            "{proto}: idle connection not closed"
        );
        assert!(t0.elapsed() < Duration::from_secs(5), "{proto}");
    }
}

/// Route faults (Istio's `fault`): an abort answers its status without reaching the
/// upstream, a delay holds the request first, and a share applies to about that share of
/// requests; on both HTTP/1.1 engines and both HTTP/2 engines.
#[tokio::test]
async fn route_faults_abort_and_delay_their_share_of_requests() {
    use sidemesh_proxy::h1::Engine as H1;
    use sidemesh_proxy::http2::Engine as H2;
    for (protocol, h1, h2) in [
        ("http1", H1::Lean, H2::Lean),
        ("http1", H1::Hyper, H2::Lean),
        ("http2", H1::Lean, H2::Lean),
        ("http2", H1::Lean, H2::Hyper),
    ] {
        let ip = loopback();
        let be = fixed(ip, "a", 200, Duration::ZERO).await;
        let svc = loopback();
        let routes = json!({"routes": [
            {"name": "abort", "match": {"path": {"prefix": "/abort"}},
             "fault": {"abort": {"status": 418, "percent": 100}}},
            {"name": "slow", "match": {"path": {"prefix": "/slow"}},
             "fault": {"delay": {"ms": 300, "percent": 100}}},
            {"name": "half", "match": {"path": {"prefix": "/half"}},
             "fault": {"abort": {"status": 503, "percent": 50}}},
        ]});
        let cfg = outbound_config(1, svc, 80, protocol, &[be.addr], routes);
        let p = start_with(
            sidemesh_proxy::ProxyConfig {
                http1_engine: h1,
                http2_engine: h2,
                ..sidemesh_proxy::ProxyConfig::default()
            },
            &cfg,
        )
        .await;
        let client = if protocol == "http2" {
            h2_client()
        } else {
            h1_client()
        };
        let case = format!("{protocol} {h1:?} {h2:?}");

        let (status, _, body) = get(&client, &format!("http://{svc}/abort"), &[]).await;
        assert_eq!(
            (status, body.as_str()),
            (418, "sidemesh: fault-abort\n"),
            "{case}"
        );
        assert_eq!(
            be.hits.load(Ordering::SeqCst),
            0,
            "{case}: the abort never went upstream"
        );

        let t = Instant::now();
        let (status, backend, _) = get(&client, &format!("http://{svc}/slow"), &[]).await;
        assert_eq!((status, backend.as_str()), (200, "a"), "{case}");
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{case}: {:?}",
            t.elapsed()
        );

        let mut aborted = 0;
        for _ in 0..200 {
            let (status, _, _) = get(&client, &format!("http://{svc}/half"), &[]).await;
            assert!(status == 200 || status == 503, "{case}: {status}");
            aborted += usize::from(status == 503);
        }
        // Binomial(200, 0.5): outside 60..=140 with a probability below 1e-8.
        assert!(
            (60..=140).contains(&aborted),
            "{case}: {aborted} of 200 aborted"
        );
        let count = |kind| p.counter("sidemesh_proxy_faults_injected_total", &[("kind", kind)]);
        assert_eq!(count("abort"), 1 + aborted as u64, "{case}");
        assert_eq!(count("delay"), 1, "{case}");
    }
}
