//! Data-plane integration tests on real loopback sockets: each protocol inbound and
//! outbound, routing, rewrites, and that a cut response is never presented as complete.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use serde_json::json;
use sidemesh_proxy::http2::Engine;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn http1_outbound_balances_round_robin() {
    let ip = loopback();
    let a = backend(ip, "a").await;
    let b = backend(ip, "b").await;
    let svc = loopback();
    let cfg = outbound_config(
        1,
        svc,
        8080,
        "http1",
        &[a.addr, b.addr],
        json!({"balancer": {"policy": "round_robin"}}),
    );
    let _p = start(ip, &cfg).await;
    let c = h1_client();
    let mut seen = HashMap::new();
    for _ in 0..20 {
        let (status, who, _) = get(&c, &format!("http://{svc}:8080/x"), &[]).await;
        assert_eq!(status, 200);
        *seen.entry(who).or_insert(0) += 1;
    }
    assert_eq!(seen.get("a"), Some(&10), "{seen:?}");
    assert_eq!(seen.get("b"), Some(&10), "{seen:?}");
}

#[tokio::test]
async fn http1_keeps_host_and_posts_bodies() {
    let ip = loopback();
    let a = backend(ip, "a").await;
    let svc = loopback();
    let cfg = outbound_config(1, svc, 80, "http1", &[a.addr], json!({}));
    let _p = start(ip, &cfg).await;
    let c = h1_client();
    let req = Request::post(format!("http://{svc}/echo"))
        .header("host", "cart.shop")
        .header("expect", "100-continue")
        .body(Full::new(Bytes::from("payload")))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.headers()["echo-host"], "cart.shop");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"a:payload");
}

async fn h2c_outbound_multiplexes_and_passes_trailers_on(engine: Engine) {
    let ip = loopback();
    let be = backend_with(
        ip,
        std::sync::Arc::new(|req: Request<hyper::body::Incoming>| {
            Box::pin(async move {
                assert_eq!(req.version(), http::Version::HTTP_2);
                // A gRPC-style answer: status in trailers is what clients check.
                let _ = req.into_body().collect().await;
                Response::builder()
                    .header("content-type", "application/grpc")
                    .header("x-backend", "g")
                    .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
                    .unwrap()
            })
        }),
    )
    .await;
    let svc = loopback();
    let cfg = outbound_config(1, svc, 50051, "grpc", &[be.addr], json!({}));
    let _p = start_h2(ip, &cfg, engine).await;
    let c = h2_client();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            get(
                &c,
                &format!("http://{svc}:50051/pkg.Svc/Call"),
                &[("te", "trailers")],
            )
            .await
        }));
    }
    for t in tasks {
        let (status, who, _) = t.await.unwrap();
        assert_eq!((status, who.as_str()), (200, "g"));
    }
}

async fn grpc_trailers_reach_the_client_on(engine: Engine) {
    let ip = loopback();
    // A raw h2 server that sends trailers, to check they cross the proxy.
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let mut conn = h2::server::handshake(s).await.unwrap();
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            drop(req);
            let resp = http::Response::builder()
                .header("content-type", "application/grpc")
                .body(())
                .unwrap();
            let mut send = respond.send_response(resp, false).unwrap();
            send.send_data(Bytes::from_static(b"\0\0\0\0\0"), false)
                .unwrap();
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", "0".parse().unwrap());
            send.send_trailers(t).unwrap();
        }
    });
    let svc = loopback();
    let cfg = outbound_config(1, svc, 50051, "grpc", &[addr], json!({}));
    let _p = start_h2(ip, &cfg, engine).await;
    let c = h2_client();
    let req = Request::post(format!("http://{svc}:50051/pkg.Svc/Call"))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, c.request(req))
        .await
        .unwrap()
        .unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
}

async fn echo_server(ip: std::net::Ipv4Addr) -> std::net::SocketAddr {
    raw_server(ip, |mut s| async move {
        let mut buf = Vec::new();
        // Read until the client half-closes, then answer and close.
        let _ = s.read_to_end(&mut buf).await;
        let _ = s.write_all(b"echo:").await;
        let _ = s.write_all(&buf).await;
        let _ = s.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn tcp_outbound_passes_half_close() {
    let ip = loopback();
    let echo = echo_server(ip).await;
    let svc = loopback();
    let cfg = outbound_config(1, svc, 6379, "tcp", &[echo], json!({}));
    let _p = start(ip, &cfg).await;
    let mut s = TcpStream::connect((svc, 6379)).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"echo:hello");
}

#[tokio::test]
async fn auto_detects_http1_h2_and_tcp_including_server_first() {
    let ip = loopback();
    let a = backend(ip, "a").await;
    let svc = loopback();
    let cfg = outbound_config(1, svc, 9000, "auto", &[a.addr], json!({}));
    let _p = start(ip, &cfg).await;
    assert_eq!(
        get(&h1_client(), &format!("http://{svc}:9000/"), &[])
            .await
            .1,
        "a"
    );
    assert_eq!(
        get(&h2_client(), &format!("http://{svc}:9000/"), &[])
            .await
            .1,
        "a"
    );

    // A server that speaks first (a banner): the client sends nothing and still gets it.
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let banner = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"220 ready\r\n").await.unwrap();
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.unwrap();
        s.write_all(&buf[..n]).await.unwrap();
    });
    let svc2 = loopback();
    let cfg = outbound_config(2, svc2, 25, "auto", &[banner], json!({}));
    let p2 = start(ip, &cfg).await;
    let mut s = TcpStream::connect((svc2, 25)).await.unwrap();
    expect(&mut s, b"220 ready\r\n").await;
    s.write_all(b"QUIT").await.unwrap();
    expect(&mut s, b"QUIT").await;
    drop(p2);
}

/// A listener kept across a change of its port's protocol, from HTTP (whose clients speak
/// first: accepts deferred until the request arrives) to raw TCP, is set up again: a
/// client of a server-first protocol is accepted at once and gets the banner, instead of
/// waiting in the kernel for the deferred accept's timeout (a second or more).
#[tokio::test]
async fn a_port_turned_from_http_to_tcp_serves_server_first_clients_at_once() {
    let ip = loopback();
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let banner = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(b"220 ready\r\n").await;
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        }
    });
    let svc = loopback();
    let p = start(
        ip,
        &outbound_config(1, svc, 25, "http1", &[banner], json!({})),
    )
    .await;
    p.set(&outbound_config(2, svc, 25, "tcp", &[banner], json!({})))
        .await;
    let started = std::time::Instant::now();
    let mut s = TcpStream::connect((svc, 25)).await.unwrap();
    expect(&mut s, b"220 ready\r\n").await;
    // A deferred accept holds a silent client until the kernel's first SYN-ACK
    // retransmission (1 s); taken at once, it is milliseconds.
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_millis(700),
        "took {took:?}"
    );
}

#[tokio::test]
async fn inbound_forwards_port_outer_to_the_app_port() {
    // The app listens on 127.0.0.1:<port>; the sidecar on <inbound ip>:<port_outer>.
    let app = backend(std::net::Ipv4Addr::LOCALHOST, "app").await;
    let ip = loopback();
    let outer = free_port(ip);
    let cfg = json!({
        "version": 1,
        "identity": {"namespace": "shop", "service": "cart", "plugin": "sidemesh-proxy"},
        "inbound": [{"port": app.addr.port(), "port_outer": outer, "protocol": "http1"}],
    });
    let _p = start(ip, &cfg).await;
    let (status, who, _) = get(&h1_client(), &format!("http://{ip}:{outer}/"), &[]).await;
    assert_eq!((status, who.as_str()), (200, "app"));
}

#[tokio::test]
async fn routes_match_headers_and_paths_split_by_weight_and_rewrite() {
    let ip = loopback();
    let v1 = backend(ip, "v1").await;
    let v2 = backend(ip, "v2").await;
    let svc = loopback();
    let cfg = json!({
        "version": 1,
        "identity": {"namespace": "shop", "service": "web", "plugin": "sidemesh-proxy"},
        "outbound": [{
            "name": "cart", "namespace": "shop", "address": svc.to_string(),
            "ports": [{"port": 80, "protocol": "http1", "endpoints": [
                {"address": ip.to_string(), "port": v1.addr.port(), "labels": {"version": "v1"}},
                {"address": ip.to_string(), "port": v2.addr.port(), "labels": {"version": "v2"}}]}],
            "routes": [
                {"name": "beta", "match": {"headers": [{"name": "x-beta", "exact": "1"}]},
                 "backends": [{"subset": {"version": "v2"}, "weight": 1}],
                 "request_headers": {"set": {"x-routed": "beta"}},
                 "response_headers": {"set": {"x-route": "beta"}, "remove": ["x-backend-secret"]}},
                {"name": "api", "match": {"path": {"prefix": "/api"}, "methods": ["GET"]},
                 "backends": [{"subset": {"version": "v1"}, "weight": 9000},
                              {"subset": {"version": "v2"}, "weight": 1000}]},
                {"name": "old", "match": {"path": {"regex": "/old/[0-9]+"}},
                 "backends": [{"subset": {"version": "v1"}, "weight": 1}]}
            ]
        }]
    });
    let _p = start(ip, &cfg).await;
    let c = h1_client();
    for _ in 0..10 {
        let mut b = Request::get(format!("http://{svc}/anything"));
        b = b.header("x-beta", "1");
        let resp = c
            .request(b.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-backend"], "v2");
        assert_eq!(resp.headers()["echo-x-routed"], "beta");
        assert_eq!(resp.headers()["x-route"], "beta");
    }
    let mut counts = HashMap::new();
    let n = 400;
    for _ in 0..n {
        let (_, who, _) = get(&c, &format!("http://{svc}/api/items"), &[]).await;
        *counts.entry(who).or_insert(0) += 1;
    }
    let v2_share = *counts.get("v2").unwrap_or(&0) as f64 / n as f64;
    assert!((0.03..0.2).contains(&v2_share), "{counts:?}");
    for _ in 0..10 {
        assert_eq!(get(&c, &format!("http://{svc}/old/42"), &[]).await.1, "v1");
    }
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped() {
    let ip = loopback();
    let a = backend(ip, "a").await;
    let svc = loopback();
    let cfg = outbound_config(1, svc, 80, "http1", &[a.addr], json!({}));
    let _p = start(ip, &cfg).await;
    let mut s = TcpStream::connect((svc, 80)).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: x-secret, keep-alive\r\nx-secret: 1\r\nx-kept: 2\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("echo-x-kept: 2"), "{text}");
    assert!(!text.contains("echo-x-secret"), "{text}");
}

#[tokio::test]
async fn cut_response_is_not_presented_as_complete() {
    let ip = loopback();
    // An upstream that promises 1000 bytes, sends 10, and closes.
    let addr = raw_server(ip, |mut s| async move {
        let mut buf = [0u8; 2048];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            .await;
        let _ = s.shutdown().await;
    })
    .await;
    let svc = loopback();
    let cfg = outbound_config(1, svc, 80, "http1", &[addr], json!({}));
    let _p = start(ip, &cfg).await;
    let req = Request::get(format!("http://{svc}/"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, h1_client().request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .unwrap();
    assert!(body.is_err(), "a cut body must end in an error");
}

#[tokio::test]
async fn unreachable_endpoint_answers_503_and_no_endpoints_503() {
    let ip = loopback();
    let dead = {
        let l = std::net::TcpListener::bind((ip, 0)).unwrap();
        l.local_addr().unwrap()
    };
    let svc = loopback();
    let cfg = outbound_config(
        1,
        svc,
        80,
        "http1",
        &[dead],
        json!({"retry": {"attempts": 0}}),
    );
    let p = start(ip, &cfg).await;
    let c = h1_client();
    let (status, _, body) = get(&c, &format!("http://{svc}/"), &[]).await;
    assert_eq!(status, 503, "{body}");
    p.set(&outbound_config(2, svc, 80, "http1", &[], json!({})))
        .await;
    let (status, _, body) = get(&c, &format!("http://{svc}/"), &[]).await;
    assert_eq!(status, 503);
    assert!(body.contains("no-endpoints"), "{body}");
}

#[tokio::test]
async fn h2c_outbound_multiplexes_and_passes_trailers() {
    for engine in [Engine::Lean, Engine::Hyper] {
        h2c_outbound_multiplexes_and_passes_trailers_on(engine).await;
    }
}

#[tokio::test]
async fn grpc_trailers_reach_the_client() {
    for engine in [Engine::Lean, Engine::Hyper] {
        grpc_trailers_reach_the_client_on(engine).await;
    }
}

/// Reads exactly `want.len()` bytes from `s` (within the wait) and checks they are `want`.
async fn expect(s: &mut TcpStream, want: &[u8]) {
    let mut buf = vec![0u8; want.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf, want);
}
