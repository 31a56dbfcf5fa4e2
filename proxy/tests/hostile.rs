//! Hostile input and reload under load, on real sockets: smuggling attempts, bad bytes,
//! header limits, slowloris, the connection limit; and 100 config changes under steady
//! load with zero failed requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use sidemesh_proxy::ProxyConfig;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes and returns what comes back until the peer closes or 3 s pass.
async fn raw(addr: (std::net::Ipv4Addr, u16), bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status(resp: &str) -> Option<u16> {
    resp.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

async fn proxy_to(name: &str, config: ProxyConfig) -> (Running, Backend, std::net::Ipv4Addr) {
    let ip = loopback();
    let be = backend(ip, name).await;
    let svc = loopback();
    let cfg = outbound_config(1, svc, 80, "http1", &[be.addr], json!({}));
    let p = start_with(
        ProxyConfig {
            inbound_address: ip.into(),
            ..config
        },
        &cfg,
    )
    .await;
    (p, be, svc)
}

#[tokio::test]
async fn smuggling_and_bad_bytes_are_rejected_before_the_upstream() {
    let (_p, be, svc) = proxy_to("a", ProxyConfig::default()).await;
    let cases: &[(&str, &[u8])] = &[
        (
            "two content lengths",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc",
        ),
        (
            "bad header byte",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n",
        ),
        (
            "space before colon",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Bad : 1\r\n\r\n",
        ),
        (
            "bare LF in request line",
            b"GET /\x0a HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
    ];
    for (name, bytes) in cases {
        let resp = raw((svc, 80), bytes).await;
        let s = status(&resp);
        assert!(s.is_none() || s.is_some_and(|s| s >= 400), "{name}: {resp}");
    }
    assert_eq!(
        be.hits.load(Ordering::Relaxed),
        0,
        "nothing reached the upstream"
    );
}

#[tokio::test]
async fn bad_chunking_never_yields_a_success() {
    let (_p, _be, svc) = proxy_to("a", ProxyConfig::default()).await;
    let resp = raw(
        (svc, 80),
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(!resp.starts_with("HTTP/1.1 2"), "{resp}");
}

#[tokio::test]
async fn header_size_and_count_limits() {
    let cfg = ProxyConfig {
        max_header_bytes: 16 * 1024,
        max_headers: 50,
        ..ProxyConfig::default()
    };
    let (_p, be, svc) = proxy_to("a", cfg).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let resp = raw((svc, 80), big.as_bytes()).await;
    assert!(resp.is_empty() || status(&resp) == Some(431), "{resp}");
    let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 0..80 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let resp = raw((svc, 80), many.as_bytes()).await;
    assert!(resp.is_empty() || status(&resp) == Some(431), "{resp}");
    assert_eq!(be.hits.load(Ordering::Relaxed), 0);
    // A normal request still works.
    let ok = raw(
        (svc, 80),
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&ok), Some(200), "{ok}");
}

#[tokio::test]
async fn slowloris_headers_time_out() {
    let cfg = ProxyConfig {
        header_read_timeout: Duration::from_millis(300),
        ..ProxyConfig::default()
    };
    let (_p, _be, svc) = proxy_to("a", cfg).await;
    let mut s = TcpStream::connect((svc, 80)).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // Trickle one header byte at a time, never finishing.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 512];
        loop {
            if s.write_all(b"X").await.is_err() {
                return;
            }
            match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => {} // a 408 answer, then the close
                Err(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "slow client was not cut off");
}

#[tokio::test]
async fn connection_limit_closes_extra_connections() {
    let cfg = ProxyConfig {
        max_connections: 2,
        ..ProxyConfig::default()
    };
    let (p, _be, svc) = proxy_to("a", cfg).await;
    // Two clients that have started their requests (a client that has sent nothing is
    // not accepted yet: TCP_DEFER_ACCEPT; see the test below).
    let mut c1 = TcpStream::connect((svc, 80)).await.unwrap();
    c1.write_all(b"GET").await.unwrap();
    let mut c2 = TcpStream::connect((svc, 80)).await.unwrap();
    c2.write_all(b"GET").await.unwrap();
    assert!(eventually(|| open_connections(&p) == 2).await);
    let resp = raw((svc, 80), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(resp.is_empty(), "third connection was served: {resp}");
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&p.registry.gather())
        .unwrap();
    assert!(
        text.contains("sidemesh_proxy_connection_limit_rejections_total 1"),
        "{text}"
    );
}

/// The outbound client connections open now, from the metrics.
fn open_connections(p: &Running) -> i64 {
    p.gauge(
        "sidemesh_proxy_tcp_connections_open",
        &[("direction", "outbound")],
    )
}

/// A client that connects and sends nothing waits in the kernel (HTTP listeners defer
/// accepting until the request comes) for about a second, is then accepted anyway, holds
/// a slot of the connection limit, and is cut off by the header-read timeout.
#[tokio::test]
async fn silent_clients_are_accepted_then_limited_and_timed_out() {
    let cfg = ProxyConfig {
        max_connections: 1,
        header_read_timeout: Duration::from_secs(1),
        ..ProxyConfig::default()
    };
    let (p, _be, svc) = proxy_to("a", cfg).await;
    let t0 = std::time::Instant::now();
    let mut silent = TcpStream::connect((svc, 80)).await.unwrap();
    assert!(
        eventually(|| open_connections(&p) == 1).await,
        "the silent client was never accepted"
    );
    // While it holds the only slot, another client is turned away.
    let resp = raw((svc, 80), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(resp.is_empty(), "second connection was served: {resp}");
    // Then the header-read timeout closes it.
    let mut buf = [0u8; 512];
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // a 408 answer, then the close
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the silent client was not cut off");
    assert!(t0.elapsed() >= Duration::from_secs(1), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn hundred_config_changes_under_load_fail_no_request() {
    let ip = loopback();
    let a = backend(ip, "a").await;
    let b = backend(ip, "b").await;
    let svc = loopback();
    let sets = [vec![a.addr], vec![b.addr], vec![a.addr, b.addr]];
    let policies = ["round_robin", "peak_ewma", "least_request", "random"];
    let cfg = |v: u64| {
        outbound_config(
            v,
            svc,
            80,
            "http1",
            &sets[v as usize % sets.len()],
            json!({"balancer": {"policy": policies[v as usize % policies.len()]}}),
        )
    };
    let p = start(ip, &cfg(1)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        // Half the workers keep connections alive, half open a new one per request.
        let client = if w % 2 == 0 {
            h1_client()
        } else {
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build_http()
        };
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let req = hyper::Request::get(format!("http://{svc}/"))
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                match tokio::time::timeout(WAIT, client.request(req)).await {
                    Ok(Ok(r)) if r.status() == 200 => {
                        use http_body_util::BodyExt;
                        match r.into_body().collect().await {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for v in 2..=101 {
        p.set(&cfg(v)).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 200, "too little load to mean anything: {ok}");
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
}
