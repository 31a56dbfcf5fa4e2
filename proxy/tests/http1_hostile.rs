//! Request framing attacks over raw TCP against a sidecar in front of an upstream that
//! records every byte it receives: ambiguous lengths are answered 400 with the connection
//! closed and nothing reaches the upstream; bad chunk sizes and bad header bytes never
//! yield a success.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use sidemesh_proxy::ProxyConfig;
use sidemesh_proxy::h1::Engine;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An upstream that records what it receives and answers each read with one small 200.
struct Recorder {
    addr: std::net::SocketAddr,
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl Recorder {
    fn received(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap()).into_owned()
    }
}

async fn recorder(ip: Ipv4Addr) -> Recorder {
    let bytes = Arc::new(Mutex::new(Vec::new()));
    let b = bytes.clone();
    let addr = raw_server(ip, move |mut s| {
        let b = b.clone();
        async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    return;
                }
                b.lock().unwrap().extend_from_slice(&buf[..n]);
                let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                if s.write_all(ok).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    Recorder { addr, bytes }
}

/// A sidecar with one HTTP/1.1 outbound service in front of a recorder, served by `engine`.
async fn setup(engine: Engine) -> (Running, Recorder, Ipv4Addr) {
    let ip = loopback();
    let up = recorder(ip).await;
    let svc = loopback();
    let cfg = outbound_config(1, svc, 80, "http1", &[up.addr], json!({}));
    let config = ProxyConfig {
        inbound_address: ip.into(),
        http1_engine: engine,
        ..ProxyConfig::default()
    };
    (start_with(config, &cfg).await, up, svc)
}

/// Every case runs against both HTTP/1.1 engines.
const ENGINES: [Engine; 2] = [Engine::Lean, Engine::Hyper];

/// Sends `bytes`; returns what came back and whether the sidecar closed the connection
/// (within 3 s).
async fn exchange(svc: Ipv4Addr, bytes: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect((svc, 80)).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let closed = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

fn statuses(resp: &str) -> Vec<u16> {
    resp.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| resp.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

#[tokio::test]
async fn ambiguous_lengths_get_400_and_a_close_and_never_reach_the_upstream() {
    for engine in ENGINES {
        let (_p, up, svc) = setup(engine).await;
        let smuggled = "GET /admin HTTP/1.1\r\nHost: x\r\n\r\n";
        let cases: Vec<(&str, String)> = vec![
            (
                "content-length then transfer-encoding",
                format!(
                    "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
                ),
            ),
            (
                "transfer-encoding then content-length",
                format!(
                    "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n{smuggled}"
                ),
            ),
            (
                "upper-case names, zero length",
                "POST / HTTP/1.1\r\nHost: x\r\nTRANSFER-ENCODING: chunked\r\nCONTENT-LENGTH: 0\r\n\r\n0\r\n\r\n".to_owned(),
            ),
            (
                "chunked not final",
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
                    .to_owned(),
            ),
            (
                "a coding before chunked",
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
                    .to_owned(),
            ),
            (
                "chunked twice",
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                    .to_owned(),
            ),
            (
                "transfer-encoding on HTTP/1.0",
                "POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_owned(),
            ),
            (
                "differing content lengths",
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc"
                    .to_owned(),
            ),
            (
                "differing content lengths in one line",
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 30\r\n\r\nabc".to_owned(),
            ),
            (
                "signed content length",
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc".to_owned(),
            ),
        ];
        for (name, bytes) in &cases {
            let (resp, closed) = exchange(svc, bytes.as_bytes()).await;
            assert_eq!(statuses(&resp), vec![400], "{engine:?} {name}: {resp}");
            assert!(closed, "{engine:?} {name}: connection left open");
        }
        assert_eq!(up.received(), "", "bytes reached the upstream");
    }
}

#[tokio::test]
async fn the_conflicting_request_is_refused_after_a_good_one_on_the_same_connection() {
    for engine in ENGINES {
        let (_p, up, svc) = setup(engine).await;
        let bytes = "POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
    POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
    GET /third HTTP/1.1\r\nHost: x\r\n\r\n";
        let (resp, closed) = exchange(svc, bytes.as_bytes()).await;
        assert_eq!(statuses(&resp), vec![200, 400], "{resp}");
        assert!(closed);
        let got = up.received();
        assert!(got.starts_with("POST /first HTTP/1.1\r\n"), "{got}");
        assert!(!got.contains("/second") && !got.contains("/third"), "{got}");
    }
}

#[tokio::test]
async fn a_body_that_looks_like_a_conflicting_request_is_just_a_body() {
    for engine in ENGINES {
        let (_p, up, svc) = setup(engine).await;
        let inner = "GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let bytes = format!(
            "POST /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{inner}",
            inner.len()
        );
        let (resp, _) = exchange(svc, bytes.as_bytes()).await;
        assert_eq!(statuses(&resp), vec![200], "{resp}");
        assert!(up.received().ends_with(inner), "{}", up.received());
    }
}

#[tokio::test]
async fn bad_chunks_and_bad_header_bytes_never_succeed() {
    for engine in ENGINES {
        let (_p, up, svc) = setup(engine).await;
        let chunked = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        let body_cases = [
            (
                "size overflows 64 bits",
                "1ffffffffffffffff\r\nhello\r\n0\r\n\r\n",
            ),
            ("negative size", "-5\r\nhello\r\n0\r\n\r\n"),
            ("data longer than its size", "3\r\nhello\r\n0\r\n\r\n"),
            ("no size at all", "\r\nhello\r\n0\r\n\r\n"),
        ];
        for (name, body) in body_cases {
            let (resp, closed) = exchange(svc, format!("{chunked}{body}").as_bytes()).await;
            assert!(
                statuses(&resp).iter().all(|s| *s >= 400),
                "{engine:?} {name}: {resp}"
            );
            assert!(closed, "{engine:?} {name}: connection left open");
        }
        let head_cases: [(&str, &[u8]); 5] = [
            (
                "NUL in a value",
                b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n",
            ),
            (
                "bare CR in a value",
                b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
            ),
            (
                "obs-fold",
                b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
            ),
            (
                "NUL in a name",
                b"GET / HTTP/1.1\r\nHost: x\r\nX\0A: a\r\n\r\n",
            ),
            (
                "CR LF inside the request line",
                b"GET /a\r\nb HTTP/1.1\r\nHost: x\r\n\r\n",
            ),
        ];
        let before = up.received().matches("GET ").count();
        for (name, bytes) in head_cases {
            let (resp, closed) = exchange(svc, bytes).await;
            assert!(
                statuses(&resp).iter().all(|s| *s >= 400),
                "{engine:?} {name}: {resp}"
            );
            assert!(closed, "{engine:?} {name}: connection left open");
        }
        assert_eq!(
            up.received().matches("GET ").count(),
            before,
            "{}",
            up.received()
        );
    }
}

#[tokio::test]
async fn bare_lf_line_ends_are_accepted_and_reframed_with_crlf() {
    for engine in ENGINES {
        // RFC 9112 §2.2: a recipient MAY accept a bare LF as a line terminator; what goes
        // upstream is re-serialised, so the upstream never sees one.
        let (_p, up, svc) = setup(engine).await;
        let (resp, _) = exchange(
            svc,
            b"GET /lf HTTP/1.1\nHost: x\nX-A: 1\nConnection: close\n\n",
        )
        .await;
        assert_eq!(statuses(&resp), vec![200], "{resp}");
        let got = up.received();
        assert!(got.starts_with("GET /lf HTTP/1.1\r\n"), "{got}");
        assert!(!got.replace("\r\n", "").contains('\n'), "{got:?}");
    }
}
