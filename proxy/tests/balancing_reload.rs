//! Integration tests on real sockets: each balancing policy's distribution through the
//! proxy, and hot reload (endpoint changes, removed listeners draining, bind failures).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use serde_json::json;
use support::*;
use tokio::net::TcpStream;

async fn three_backends(ip: std::net::Ipv4Addr) -> Vec<Backend> {
    vec![
        backend(ip, "a").await,
        backend(ip, "b").await,
        backend(ip, "c").await,
    ]
}

#[tokio::test]
async fn every_policy_spreads_load_through_the_proxy() {
    let ip = loopback();
    let bes = three_backends(ip).await;
    let addrs: Vec<_> = bes.iter().map(|b| b.addr).collect();
    for policy in ["round_robin", "random", "least_request", "peak_ewma"] {
        let svc = loopback();
        let cfg = outbound_config(
            1,
            svc,
            80,
            "http1",
            &addrs,
            json!({"balancer": {"policy": policy}}),
        );
        let _p = start(ip, &cfg).await;
        let c = h1_client();
        let n = 300;
        let seen = tally(&c, &format!("http://{svc}/"), n).await;
        assert_eq!(seen.len(), 3, "{policy}: {seen:?}");
        if matches!(policy, "round_robin" | "random") {
            for (k, v) in &seen {
                assert!(*v >= n / 6, "{policy}: {k} got {v} of {n}: {seen:?}");
            }
        }
    }
}

#[tokio::test]
async fn hashing_policies_are_sticky_on_header_cookie_and_source_ip() {
    let ip = loopback();
    let bes = three_backends(ip).await;
    let addrs: Vec<_> = bes.iter().map(|b| b.addr).collect();
    let cases = [
        ("ring_hash", json!({"header": "x-user"}), "x-user"),
        ("maglev", json!({"cookie": "session"}), "cookie"),
    ];
    for (policy, hash_on, header) in cases {
        let svc = loopback();
        let cfg = outbound_config(
            1,
            svc,
            80,
            "http1",
            &addrs,
            json!({"balancer": {"policy": policy, "hash_on": hash_on}}),
        );
        let _p = start(ip, &cfg).await;
        let c = h1_client();
        let mut owners: HashMap<String, usize> = HashMap::new();
        for user in 0..60 {
            let value = if header == "cookie" {
                format!("session=u{user}")
            } else {
                format!("u{user}")
            };
            let first = get(&c, &format!("http://{svc}/"), &[(header, &value)])
                .await
                .1;
            for _ in 0..3 {
                let again = get(&c, &format!("http://{svc}/"), &[(header, &value)])
                    .await
                    .1;
                assert_eq!(again, first, "{policy}: key {value} moved");
            }
            *owners.entry(first).or_default() += 1;
        }
        assert_eq!(owners.len(), 3, "{policy}: keys should spread: {owners:?}");
    }
    // Source IP: one client address always lands on the same endpoint.
    let svc = loopback();
    let cfg = outbound_config(
        1,
        svc,
        80,
        "http1",
        &addrs,
        json!({"balancer": {"policy": "maglev", "hash_on": "source_ip"}}),
    );
    let _p = start(ip, &cfg).await;
    let c = h1_client();
    let first = get(&c, &format!("http://{svc}/"), &[]).await.1;
    for _ in 0..20 {
        assert_eq!(get(&c, &format!("http://{svc}/"), &[]).await.1, first);
    }
}

#[tokio::test]
async fn endpoint_weights_shape_the_split() {
    let ip = loopback();
    let a = backend(ip, "a").await;
    let b = backend(ip, "b").await;
    let svc = loopback();
    let mut cfg = outbound_config(
        1,
        svc,
        80,
        "http1",
        &[a.addr, b.addr],
        json!({"balancer": {"policy": "round_robin"}}),
    );
    cfg["outbound"][0]["ports"][0]["endpoints"][0]["weight"] = json!(300);
    let _p = start(ip, &cfg).await;
    let c = h1_client();
    let seen = tally(&c, &format!("http://{svc}/"), 40).await;
    assert_eq!(seen.get("a"), Some(&30), "{seen:?}");
    assert_eq!(seen.get("b"), Some(&10), "{seen:?}");
}

#[tokio::test]
async fn zone_aware_keeps_traffic_in_the_own_zone() {
    let ip = loopback();
    let near = backend(ip, "near").await;
    let far = backend(ip, "far").await;
    let svc = loopback();
    let mut cfg = outbound_config(
        1,
        svc,
        80,
        "http1",
        &[near.addr, far.addr],
        json!({"balancer": {"policy": "random"}}),
    );
    cfg["identity"]["zone"] = json!("z1");
    cfg["outbound"][0]["ports"][0]["endpoints"][0]["zone"] = json!("z1");
    cfg["outbound"][0]["ports"][0]["endpoints"][1]["zone"] = json!("z2");
    let _p = start(ip, &cfg).await;
    let c = h1_client();
    for _ in 0..50 {
        assert_eq!(get(&c, &format!("http://{svc}/"), &[]).await.1, "near");
    }
}

#[tokio::test]
async fn reload_switches_endpoints_for_new_requests() {
    let ip = loopback();
    let a = backend(ip, "a").await;
    let b = backend(ip, "b").await;
    let svc = loopback();
    let p = start(
        ip,
        &outbound_config(1, svc, 80, "http1", &[a.addr], json!({})),
    )
    .await;
    let c = h1_client();
    assert_eq!(get(&c, &format!("http://{svc}/"), &[]).await.1, "a");
    p.set(&outbound_config(2, svc, 80, "http1", &[b.addr], json!({})))
        .await;
    // Same client, same keep-alive connection to the sidecar: the next request sees v2.
    for _ in 0..10 {
        assert_eq!(get(&c, &format!("http://{svc}/"), &[]).await.1, "b");
    }
}

#[tokio::test]
async fn removed_listener_stops_accepting_and_in_flight_finishes() {
    let ip = loopback();
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let slow = backend_with(
        ip,
        Arc::new(move |_req| {
            let g = g.clone();
            Box::pin(async move {
                g.notified().await;
                Response::builder()
                    .header("x-backend", "slow")
                    .body(Full::new(Bytes::from("done")))
                    .unwrap()
            })
        }),
    )
    .await;
    let svc = loopback();
    let p = start(
        ip,
        &outbound_config(1, svc, 80, "http1", &[slow.addr], json!({})),
    )
    .await;
    let c = h1_client();
    let url = format!("http://{svc}/");
    let inflight = tokio::spawn({
        let c = c.clone();
        async move { get(&c, &url, &[]).await }
    });
    assert!(eventually(|| slow.hits.load(std::sync::atomic::Ordering::Relaxed) == 1).await);
    // Version 2 has no services at all: the listener must go.
    let applied = p
        .set(&json!({"version": 2, "identity": {"namespace": "shop", "service": "web", "plugin": "sidemesh-proxy"}}))
        .await;
    assert!(applied.listening.is_empty());
    let mut refused = false;
    for _ in 0..100 {
        if TcpStream::connect((svc, 80)).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "removed listener still accepts");
    gate.notify_one();
    let (status, who, body) = tokio::time::timeout(WAIT, inflight).await.unwrap().unwrap();
    assert_eq!((status, who.as_str(), body.as_str()), (200, "slow", "done"));
}

#[tokio::test]
async fn a_listener_that_cannot_bind_is_reported_and_the_rest_applies() {
    let ip = loopback();
    let a = backend(ip, "a").await;
    let taken = loopback();
    let blocker = std::net::TcpListener::bind((taken, 0)).unwrap();
    let taken_port = blocker.local_addr().unwrap().port();
    let ok = loopback();
    let cfg = json!({
        "version": 1,
        "identity": {"namespace": "shop", "service": "web", "plugin": "sidemesh-proxy"},
        "outbound": [
            {"name": "busy", "namespace": "shop", "address": taken.to_string(),
             "ports": [{"port": taken_port, "protocol": "http1", "endpoints": [{"address": ip.to_string(), "port": a.addr.port()}]}]},
            {"name": "fine", "namespace": "shop", "address": ok.to_string(),
             "ports": [{"port": 80, "protocol": "http1", "endpoints": [{"address": ip.to_string(), "port": a.addr.port()}]}]}
        ]
    });
    let p = start(ip, &cfg).await;
    let applied = p.applied.borrow().clone().unwrap();
    assert_eq!(
        applied.failed,
        vec![std::net::SocketAddr::from((taken, taken_port))]
    );
    assert_eq!(
        get(&h1_client(), &format!("http://{ok}/"), &[]).await.1,
        "a"
    );
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&p.registry.gather())
        .unwrap();
    assert!(
        text.contains("sidemesh_proxy_listener_bind_failures_total{direction=\"outbound\"} "),
        "{text}"
    );
    drop(blocker);
}

#[tokio::test]
async fn websocket_style_upgrade_is_tunnelled() {
    let ip = loopback();
    // An upstream that accepts an upgrade and echoes bytes on the upgraded connection.
    let up = backend_with(
        ip,
        Arc::new(|mut req: Request<hyper::body::Incoming>| {
            Box::pin(async move {
                let on = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let Ok(u) = on.await else { return };
                    let mut io = hyper_util::rt::TokioIo::new(u);
                    let mut buf = [0u8; 64];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                Response::builder()
                    .status(101)
                    .header("connection", "upgrade")
                    .header("upgrade", "websocket")
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            })
        }),
    )
    .await;
    let svc = loopback();
    let _p = start(
        ip,
        &outbound_config(1, svc, 80, "http1", &[up.addr], json!({})),
    )
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect((svc, 80)).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(WAIT, s.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping");
}
