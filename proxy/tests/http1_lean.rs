//! The HTTP/1.1 engines side by side on real sockets: each case runs against the lean
//! engine and the hyper engine, with a scripted upstream that answers by request path.
//! Cut responses are never completed, bodies keep their framing, interim and bodiless
//! responses are framed right, pipelined requests are answered in order, connections to
//! the upstream are reused, and absolute-form targets are routed by their authority and
//! forwarded in origin form.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use sidemesh_proxy::ProxyConfig;
use sidemesh_proxy::h1::Engine;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ENGINES: [Engine; 2] = [Engine::Lean, Engine::Hyper];

/// What the scripted upstream answers to a request for `path` (the request head and any
/// body are read first, by `Content-Length` or up to the chunked end).
fn script(path: &str, body: &[u8]) -> Vec<u8> {
    let r: &[u8] = match path {
        "/cut-length" => b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-part",
        "/cut-chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        "/until-close" => b"HTTP/1.1 200 OK\r\n\r\nall of this until the end",
        "/no-content" => b"HTTP/1.1 204 No Content\r\n\r\n",
        "/status-000" => b"HTTP/1.1 000 Zero\r\nContent-Length: 2\r\n\r\nok",
        "/not-modified" => b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
        "/interim" => b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\n\r\n3;e=1\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n",
        "/echo" => {
            let mut v = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
            v.extend_from_slice(body);
            return v;
        }
        _ => {
            let b = path.as_bytes();
            let mut v = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", b.len()).into_bytes();
            v.extend_from_slice(b);
            return v;
        }
    };
    r.to_vec()
}

/// An upstream that answers each request by [`script`], closing after the cut and
/// until-close answers; it counts the connections it accepts and keeps what it received.
struct Upstream {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    received: Arc<std::sync::Mutex<Vec<u8>>>,
}

async fn upstream(ip: Ipv4Addr) -> Upstream {
    let accepted = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (a, r) = (accepted.clone(), received.clone());
    let addr = raw_server(ip, move |mut s| {
        a.fetch_add(1, Ordering::SeqCst);
        let r = r.clone();
        async move {
            let mut buf = Vec::new();
            let mut tmp = [0u8; 4096];
            loop {
                // One request: head, then its body.
                let (path, body, used) = loop {
                    if let Some(x) = request_in(&buf) {
                        break x;
                    }
                    match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            buf.extend_from_slice(&tmp[..n]);
                            r.lock().unwrap().extend_from_slice(&tmp[..n]);
                        }
                    }
                };
                buf.drain(..used);
                let answer = script(&path, &body);
                if s.write_all(&answer).await.is_err() {
                    return;
                }
                if matches!(
                    path.as_str(),
                    "/cut-length" | "/cut-chunked" | "/until-close"
                ) {
                    return;
                }
            }
        }
    })
    .await;
    Upstream {
        addr,
        accepted,
        received,
    }
}

/// A complete request at the start of `buf`: its path, body and length.
fn request_in(buf: &[u8]) -> Option<(String, Vec<u8>, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
    let path = head.split(' ').nth(1)?.to_owned();
    if let Some(cl) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
    {
        let n: usize = cl.trim().parse().ok()?;
        let body = buf.get(end..end + n)?.to_vec();
        return Some((path, body, end + n));
    }
    if head.contains("transfer-encoding: chunked") {
        // The last chunk, then the trailer section up to its empty line.
        let rest = &buf[end..];
        let last = if rest.starts_with(b"0\r\n") {
            3
        } else {
            rest.windows(5).position(|w| w == b"\r\n0\r\n")? + 5
        };
        let stop = if rest[last..].starts_with(b"\r\n") {
            last + 2
        } else {
            last + rest[last..].windows(4).position(|w| w == b"\r\n\r\n")? + 4
        };
        return Some((path, rest[..stop].to_vec(), end + stop));
    }
    Some((path, Vec::new(), end))
}

async fn sidecar(engine: Engine) -> (Running, Upstream, Ipv4Addr) {
    sidecar_with(engine, json!({})).await
}

/// [`sidecar`] with `extra` in the service's config (routes, say).
async fn sidecar_with(engine: Engine, extra: serde_json::Value) -> (Running, Upstream, Ipv4Addr) {
    let ip = loopback();
    let up = upstream(ip).await;
    let svc = loopback();
    let cfg = outbound_config(1, svc, 80, "http1", &[up.addr], extra);
    let p = start_with(
        ProxyConfig {
            inbound_address: ip.into(),
            http1_engine: engine,
            ..ProxyConfig::default()
        },
        &cfg,
    )
    .await;
    (p, up, svc)
}

/// Sends `bytes`, then reads until the sidecar closes or `quiet` passes without a byte;
/// returns what came back and whether the connection was closed.
async fn exchange(svc: Ipv4Addr, bytes: &[u8], quiet: Duration) -> (String, bool) {
    let mut s = TcpStream::connect((svc, 80)).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(quiet, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// The bodies of the `200` responses in `resp`, in order (each read up to the next).
fn bodies_of(resp: &str) -> Vec<&str> {
    resp.split("HTTP/1.1 200 OK")
        .skip(1)
        .map(|r| r.rsplit("\r\n\r\n").next().unwrap())
        .collect()
}

const QUIET: Duration = Duration::from_millis(500);

#[tokio::test]
async fn a_response_cut_by_the_upstream_is_never_completed() {
    for engine in ENGINES {
        let (_p, _up, svc) = sidecar(engine).await;
        let (resp, closed) =
            exchange(svc, b"GET /cut-length HTTP/1.1\r\nHost: x\r\n\r\n", QUIET).await;
        assert!(closed, "{engine:?}: {resp}");
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        assert!(body.len() < 100, "{engine:?}: {resp}");
        let (resp, closed) =
            exchange(svc, b"GET /cut-chunked HTTP/1.1\r\nHost: x\r\n\r\n", QUIET).await;
        assert!(closed, "{engine:?}: {resp}");
        assert!(
            !resp.ends_with("0\r\n\r\n"),
            "{engine:?}: the chunked end was made up: {resp:?}"
        );
    }
}

#[tokio::test]
async fn a_status_outside_100_to_999_is_a_bad_gateway_on_both_engines() {
    for engine in ENGINES {
        let (_p, _up, svc) = sidecar(engine).await;
        let (resp, _) = exchange(svc, b"GET /status-000 HTTP/1.1\r\nHost: x\r\n\r\n", QUIET).await;
        assert!(resp.starts_with("HTTP/1.1 502"), "{engine:?}: {resp}");
    }
}

#[tokio::test]
async fn bodiless_interim_and_until_close_responses_are_framed_right() {
    for engine in ENGINES {
        let (_p, _up, svc) = sidecar(engine).await;
        let (resp, closed) = exchange(
            svc,
            b"GET /no-content HTTP/1.1\r\nHost: x\r\n\r\nGET /not-modified HTTP/1.1\r\nHost: x\r\n\r\nHEAD /headed HTTP/1.1\r\nHost: x\r\n\r\nGET /interim HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n",
            QUIET,
        )
        .await;
        assert!(!closed, "{engine:?}: {resp}");
        let statuses: Vec<&str> = resp
            .match_indices("HTTP/1.1 ")
            .map(|(i, _)| &resp[i + 9..i + 12])
            .collect();
        assert_eq!(
            statuses,
            ["204", "304", "200", "200", "200"],
            "{engine:?}: {resp}"
        );
        // HEAD keeps the length of the body it did not get; nothing of a body follows.
        let headed = resp.split_once("content-length: 7\r\n").unwrap().1;
        let after = headed.split_once("\r\n\r\n").unwrap().1;
        assert!(after.starts_with("HTTP/1.1 200"), "{engine:?}: {resp}");
        assert!(
            resp.contains("\r\n\r\nok") && resp.ends_with("/after"),
            "{engine:?}: {resp}"
        );
        let (resp, closed) =
            exchange(svc, b"GET /until-close HTTP/1.1\r\nHost: x\r\n\r\n", QUIET).await;
        // The lean engine passes the body as it is and closes; hyper re-frames it chunked.
        match engine {
            Engine::Lean => {
                assert!(closed, "{engine:?}: {resp}");
                assert!(
                    resp.ends_with("\r\n\r\nall of this until the end"),
                    "{resp}"
                );
            }
            Engine::Hyper => {
                assert!(
                    resp.ends_with("all of this until the end\r\n0\r\n\r\n"),
                    "{resp}"
                )
            }
        }
    }
}

#[tokio::test]
async fn chunked_bodies_pass_with_extensions_and_trailers_and_hop_headers_go() {
    for engine in ENGINES {
        let (_p, up, svc) = sidecar(engine).await;
        let req = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: x-private\r\nX-Private: 1\r\nKeep-Alive: 5\r\n\r\n4;ext=1\r\nwiki\r\n0\r\nX-T: 1\r\n\r\nGET /chunked HTTP/1.1\r\nHost: x\r\n\r\n";
        let (resp, _) = exchange(svc, req, QUIET).await;
        let got = String::from_utf8_lossy(&up.received.lock().unwrap()).to_lowercase();
        assert!(
            !got.contains("x-private") && !got.contains("keep-alive: 5"),
            "{engine:?}: {got}"
        );
        assert!(
            got.contains("transfer-encoding: chunked"),
            "{engine:?}: {got}"
        );
        // The upstream saw the body's data (the lean engine forwards the chunks as they are,
        // hyper re-frames them).
        assert!(got.contains("wiki"), "{engine:?}: {got}");
        let lower = resp.to_lowercase();
        assert!(
            lower.contains("transfer-encoding: chunked"),
            "{engine:?}: {resp}"
        );
        assert!(!lower.contains("x-hop"), "{engine:?}: {resp}");
        assert!(resp.contains("abc\r\n0\r\n"), "{engine:?}: {resp}");
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_upstream_connection() {
    for engine in ENGINES {
        let (_p, up, svc) = sidecar(engine).await;
        let mut req = Vec::new();
        for i in 0..20 {
            req.extend_from_slice(format!("GET /n{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        }
        req.extend_from_slice(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
        let (resp, closed) = exchange(svc, &req, Duration::from_secs(3)).await;
        assert!(closed, "{engine:?}: Connection: close was not honoured");
        let bodies = bodies_of(&resp);
        let want: Vec<String> = (0..20)
            .map(|i| format!("/n{i}"))
            .chain(["hello".to_owned()])
            .collect();
        assert_eq!(bodies, want, "{engine:?}: {resp}");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 1, "{engine:?}");
    }
}

#[tokio::test]
async fn upgrades_expect_and_http10_still_work_through_the_hand_off() {
    for engine in ENGINES {
        let (_p, _up, svc) = sidecar(engine).await;
        // A plain request first, then one the lean engine hands over mid-connection.
        let (resp, _) = exchange(
            svc,
            b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nPOST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
            QUIET,
        )
        .await;
        assert!(resp.contains("\r\n\r\n/first"), "{engine:?}: {resp}");
        assert!(resp.ends_with("\r\n\r\nabc"), "{engine:?}: {resp}");
        let (resp, _) = exchange(svc, b"GET /old HTTP/1.0\r\nHost: x\r\n\r\n", QUIET).await;
        assert!(
            resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200"),
            "{engine:?}: {resp}"
        );
        assert!(resp.ends_with("/old"), "{engine:?}: {resp}");
    }
}

#[tokio::test]
async fn absolute_form_targets_are_routed_by_their_authority_and_sent_in_origin_form() {
    for engine in ENGINES {
        let routes = json!({"routes": [{"name": "api", "match": {"host": "api.shop"},
            "request_headers": {"set": {"x-routed": "api"}}}]});
        let (_p, up, svc) = sidecar_with(engine, routes).await;
        // The authority routes, not `Host`; then an origin-form request with the same
        // `Host` on the same connection is not routed; then a scheme in capitals.
        let (resp, closed) = exchange(
            svc,
            b"GET http://api.shop:80/abs?q=1 HTTP/1.1\r\nHost: other\r\n\r\n\
              GET /plain HTTP/1.1\r\nHost: other\r\n\r\n\
              GET HTTP://x.shop/caps HTTP/1.1\r\nHost: x.shop\r\nConnection: close\r\n\r\n",
            Duration::from_secs(3),
        )
        .await;
        assert!(closed, "{engine:?}: {resp}");
        let bodies = bodies_of(&resp);
        assert_eq!(
            bodies,
            ["/abs?q=1", "/plain", "/caps"],
            "{engine:?}: {resp}"
        );
        let got = String::from_utf8_lossy(&up.received.lock().unwrap()).to_lowercase();
        let heads: Vec<&str> = got.split("\r\n\r\n").filter(|h| !h.is_empty()).collect();
        assert_eq!(heads.len(), 3, "{engine:?}: {got}");
        assert!(
            heads[0].starts_with("get /abs?q=1 http/1.1\r\n"),
            "{engine:?}: {got}"
        );
        // The target's authority is the Host sent on (RFC 9112 §3.2.2), once.
        assert!(
            heads[0].contains("host: api.shop:80\r\n")
                && !heads[0].contains("host: other")
                && heads[0].contains("x-routed: api"),
            "{engine:?}: {got}"
        );
        assert_eq!(heads[0].matches("host:").count(), 1, "{engine:?}: {got}");
        assert!(heads[1].contains("host: other"), "{engine:?}: {got}");
        assert!(
            heads[1].starts_with("get /plain ") && !heads[1].contains("x-routed"),
            "{engine:?}: {got}"
        );
        assert!(
            heads[2].starts_with("get /caps ") && heads[2].contains("host: x.shop"),
            "{engine:?}: {got}"
        );
    }
}

/// The lean engine's aim: no allocation per request once the buffers are warm. The upstream
/// and the client here allocate nothing either, so everything counted is the sidecar's.
#[test]
fn steady_state_requests_do_not_allocate() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ok =
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nDate: Sun, 22 Nov 2026 00:00:00 GMT\r\n\r\nok";
    let (_p, mut client) = rt.block_on(async {
        let ip = loopback();
        // One response per read: the client sends one request at a time.
        let addr = raw_server(ip, move |mut s| async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(ok).await.is_err() {
                    return;
                }
            }
        })
        .await;
        let svc = loopback();
        let cfg = outbound_config(1, svc, 80, "http1", &[addr], json!({}));
        let config = ProxyConfig {
            inbound_address: ip.into(),
            http1_engine: Engine::Lean,
            ..ProxyConfig::default()
        };
        let p = start_with(config, &cfg).await;
        let c = TcpStream::connect((svc, 80)).await.unwrap();
        (p, c)
    });
    let mut buf = [0u8; 4096];
    let mut exchange = |req: &[u8], n: usize| {
        rt.block_on(async {
            for _ in 0..n {
                client.write_all(req).await.unwrap();
                let mut got = 0;
                while !buf[..got].ends_with(b"\r\n\r\nok") {
                    let r = tokio::time::timeout(WAIT, client.read(&mut buf[got..]))
                        .await
                        .unwrap()
                        .unwrap();
                    assert!(r > 0, "the sidecar closed the connection");
                    got += r;
                }
            }
        })
    };
    // Origin form, then absolute form (as a client configured with a proxy sends).
    for req in [
        &b"GET /n HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"GET http://x/n HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        exchange(req, 200);
        let info = allocation_counter::measure(|| exchange(req, 1000));
        let form = String::from_utf8_lossy(&req[4..10]);
        eprintln!(
            "lean engine, {form}...: {} allocations for 1000 requests",
            info.count_total
        );
        assert!(
            info.count_total < 20,
            "{form}...: {} allocations for 1000 requests",
            info.count_total
        );
    }
}
