//! The HTTP/2 engines side by side on real sockets: each case runs against the lean engine
//! and the hyper engine, with a scripted h2c upstream (the `h2` crate) that answers by
//! path, and an `h2` client. Streaming both ways with trailers, large bodies under flow
//! control, an upstream reset mid-response reaching the client as a reset, a client reset
//! reaching the upstream, retries with a replayed body, the request breaker, the request
//! timeout, and header routing and rewrites.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, Request, Response};
use serde_json::json;
use sidemesh_proxy::http2::Engine;
use support::*;
use tokio::net::{TcpListener, TcpStream};

const ENGINES: [Engine; 2] = [Engine::Lean, Engine::Hyper];

/// What the scripted upstream saw.
#[derive(Default)]
struct Seen {
    /// Streams accepted.
    streams: AtomicUsize,
    /// Streams the proxy reset while the upstream held them (`/hang`).
    resets: AtomicUsize,
    /// Streams of `/hang` waiting now.
    hanging: AtomicUsize,
}

/// A scripted h2c upstream allowing `max_streams` concurrent streams per connection.
async fn upstream(ip: Ipv4Addr, max_streams: u32) -> (SocketAddr, Arc<Seen>) {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = l.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::Builder::new()
                    .max_concurrent_streams(max_streams)
                    .handshake::<_, Bytes>(sock)
                    .await
                else {
                    return;
                };
                while let Some(Ok((req, respond))) = conn.accept().await {
                    let n = s.streams.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(answer(req, respond, s.clone(), n));
                }
            });
        }
    });
    (addr, seen)
}

/// Answers one stream by its path.
async fn answer(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    seen: Arc<Seen>,
    n: usize,
) {
    let path = req.uri().path().to_owned();
    let routed = req.headers().get("x-routed").cloned();
    let authority = req.uri().authority().map(|a| a.to_string());
    let host = req.headers().get("host").cloned();
    let mut body = req.into_body();
    let head = |status: u16| {
        let mut b = Response::builder()
            .status(status)
            .header("x-backend-secret", "s");
        if let Some(v) = &routed {
            b = b.header("echo-x-routed", v.clone());
        }
        if let Some(a) = &authority {
            b = b.header("echo-authority", a.as_str());
        }
        if let Some(h) = &host {
            b = b.header("echo-host", h.clone());
        }
        b.body(()).unwrap()
    };
    match path.as_str() {
        // Echoes each chunk as it comes, then trailers with the chunk count.
        "/echo" => {
            let mut send = respond.send_response(head(200), false).unwrap();
            let mut chunks = 0;
            while let Some(Ok(d)) = body.data().await {
                let _ = body.flow_control().release_capacity(d.len());
                chunks += 1;
                if send.send_data(d, false).is_err() {
                    return;
                }
            }
            let mut t = HeaderMap::new();
            t.insert("x-chunks", chunks.to_string().parse().unwrap());
            t.insert("grpc-status", "0".parse().unwrap());
            let _ = send.send_trailers(t);
        }
        // gRPC: `UNAVAILABLE` as a trailers-only answer on the upstream's first stream, then
        // a normal answer with `grpc-status: 0` in its trailers.
        // `NOT_FOUND` as a trailers-only answer.
        "/grpc-14-first" | "/grpc-5-only" if n == 0 || path == "/grpc-5-only" => {
            let code = if path == "/grpc-5-only" { "5" } else { "14" };
            let head = Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", code)
                .body(())
                .unwrap();
            let _ = respond.send_response(head, true);
        }
        "/grpc-14-first" | "/grpc-13" => {
            let mut send = respond.send_response(head(200), false).unwrap();
            let _ = send.send_data(Bytes::from_static(b"reply"), false);
            let code = if path == "/grpc-13" { "13" } else { "0" };
            let mut t = HeaderMap::new();
            t.insert("grpc-status", code.parse().unwrap());
            let _ = send.send_trailers(t);
        }
        // Part of a body, then a reset.
        "/reset-mid" => {
            let mut send = respond.send_response(head(200), false).unwrap();
            let _ = send.send_data(Bytes::from_static(b"partial"), false);
            tokio::time::sleep(Duration::from_millis(50)).await;
            send.send_reset(h2::Reason::INTERNAL_ERROR);
        }
        // 503 on the first stream of the upstream, then the request body back.
        "/flaky" => {
            let mut all = Vec::new();
            while let Some(Ok(d)) = body.data().await {
                let _ = body.flow_control().release_capacity(d.len());
                all.extend_from_slice(&d);
            }
            let status = if n == 0 { 503 } else { 200 };
            let mut send = respond.send_response(head(status), false).unwrap();
            let _ = send.send_data(Bytes::from(all), true);
        }
        // An answer after 300 ms.
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut send = respond.send_response(head(200), false).unwrap();
            let _ = send.send_data(Bytes::from_static(b"late"), true);
        }
        // No answer; counts the reset that ends the wait.
        "/hang" => {
            seen.hanging.fetch_add(1, Ordering::SeqCst);
            let _ = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
            seen.hanging.fetch_sub(1, Ordering::SeqCst);
            seen.resets.fetch_add(1, Ordering::SeqCst);
        }
        _ => {
            let mut send = respond.send_response(head(200), false).unwrap();
            let _ = send.send_data(Bytes::from_static(b"ok"), true);
        }
    }
}

/// A sidecar on `engine` with one h2c outbound service (`extra` merged into it) in front
/// of `endpoints`; its address.
async fn sidecar(
    engine: Engine,
    endpoints: &[SocketAddr],
    extra: serde_json::Value,
) -> (Running, Ipv4Addr) {
    let ip = loopback();
    let svc = loopback();
    let cfg = outbound_config(1, svc, 80, "http2", endpoints, extra);
    (start_h2(ip, &cfg, engine).await, svc)
}

/// An h2c client connection to the sidecar at `svc`.
async fn client(svc: Ipv4Addr) -> h2::client::SendRequest<Bytes> {
    client_and_end(svc).await.0
}

/// An h2c client connection to the sidecar at `svc`, and the task that ends with it.
async fn client_and_end(
    svc: Ipv4Addr,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let s = TcpStream::connect((svc, 80)).await.unwrap();
    let (send, conn) = h2::client::handshake(s).await.unwrap();
    let end = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, end)
}

fn request(method: &str, svc: Ipv4Addr, path: &str) -> Request<()> {
    Request::builder()
        .method(method)
        .uri(format!("http://{svc}{path}"))
        .body(())
        .unwrap()
}

/// Reads a body to its end: the bytes and the trailers, or the error that cut it.
async fn read_all(mut body: RecvStream) -> Result<(Vec<u8>, Option<HeaderMap>), h2::Error> {
    let mut all = Vec::new();
    while let Some(d) = body.data().await {
        let d = d?;
        let _ = body.flow_control().release_capacity(d.len());
        all.extend_from_slice(&d);
    }
    Ok((all, body.trailers().await?))
}

/// A GET or a POST of `data`: the status, headers, and the body to its end.
async fn call(
    c: &mut h2::client::SendRequest<Bytes>,
    req: Request<()>,
    data: Option<Bytes>,
) -> (
    Response<()>,
    Result<(Vec<u8>, Option<HeaderMap>), h2::Error>,
) {
    let go = async {
        let mut c = c.clone().ready().await.unwrap();
        let (resp, mut send) = c.send_request(req, data.is_none()).unwrap();
        if let Some(d) = data {
            send.send_data(d, true).unwrap();
        }
        let resp = resp.await.unwrap();
        let (parts, body) = resp.into_parts();
        (Response::from_parts(parts, ()), read_all(body).await)
    };
    tokio::time::timeout(WAIT, go)
        .await
        .expect("answer in time")
}

#[tokio::test]
async fn bodies_stream_both_ways_with_trailers() {
    for engine in ENGINES {
        let (up, _) = upstream(loopback(), 100).await;
        let (_p, svc) = sidecar(engine, &[up], json!({})).await;
        let c = client(svc).await;
        let talk = async {
            let mut c = c.ready().await.unwrap();
            let (resp, mut send) = c
                .send_request(request("POST", svc, "/echo"), false)
                .unwrap();
            // Each chunk comes back before the next is sent: streaming, not buffering.
            send.send_data(Bytes::from_static(b"ping-0"), false)
                .unwrap();
            let mut body = resp.await.unwrap().into_body();
            for i in 0..5 {
                let got = body.data().await.unwrap().unwrap();
                let _ = body.flow_control().release_capacity(got.len());
                assert_eq!(got, format!("ping-{i}"), "{engine:?}");
                let last = i == 4;
                let next = if last {
                    Bytes::new()
                } else {
                    Bytes::from(format!("ping-{}", i + 1))
                };
                send.send_data(next, last).unwrap();
            }
            read_all(body).await.unwrap()
        };
        let (rest, trailers) = tokio::time::timeout(WAIT, talk).await.expect("in time");
        assert!(rest.is_empty(), "{engine:?}");
        let trailers = trailers.expect("trailers");
        // Five chunks and the empty last one.
        assert_eq!(trailers["x-chunks"], "6", "{engine:?}");
        assert_eq!(trailers["grpc-status"], "0", "{engine:?}");
    }
}

/// On a `grpc` port: a trailers-only `UNAVAILABLE` is retried (`retry_on:
/// [grpc_unavailable]`), and each response the client gets is counted by its
/// `grpc-status`, `none` for one cut short.
#[tokio::test]
async fn grpc_statuses_are_counted_and_a_trailers_only_unavailable_is_retried() {
    for engine in ENGINES {
        let (up, seen) = upstream(loopback(), 100).await;
        let svc = loopback();
        let retry = json!({"retry": {"attempts": 1, "retry_on": ["grpc_unavailable"]}});
        let cfg = outbound_config(1, svc, 80, "grpc", &[up], retry);
        let p = start_h2(loopback(), &cfg, engine).await;
        let mut c = client(svc).await;
        let (resp, body) = call(&mut c, request("POST", svc, "/grpc-14-first"), None).await;
        assert_eq!(resp.status(), 200, "{engine:?}");
        let (data, trailers) = body.unwrap();
        assert_eq!(data, b"reply", "{engine:?}");
        assert_eq!(trailers.unwrap()["grpc-status"], "0", "{engine:?}");
        assert_eq!(
            seen.streams.load(Ordering::SeqCst),
            2,
            "{engine:?}: one retry"
        );
        let (_, body) = call(&mut c, request("POST", svc, "/grpc-13"), None).await;
        assert_eq!(body.unwrap().1.unwrap()["grpc-status"], "13", "{engine:?}");
        let (resp, _) = call(&mut c, request("POST", svc, "/grpc-5-only"), None).await;
        assert_eq!(resp.headers()["grpc-status"], "5", "{engine:?}");
        let (_, body) = call(&mut c, request("POST", svc, "/reset-mid"), None).await;
        assert!(body.is_err(), "{engine:?}");

        let count = |code: &str| {
            p.counter(
                "sidemesh_proxy_grpc_responses_total",
                &[("service", "shop/cart"), ("grpc_status", code)],
            )
        };
        let counted = eventually(|| count("none") == 1).await;
        assert!(
            counted,
            "{engine:?}: the cut response is counted when it ends"
        );
        assert_eq!(
            [
                count("0"),
                count("5"),
                count("13"),
                count("14"),
                count("none")
            ],
            [1, 1, 1, 0, 1],
            "{engine:?}: the retried try never reached the client"
        );
        assert_eq!(
            p.counter("sidemesh_proxy_retries_total", &[]),
            1,
            "{engine:?}"
        );
    }
}

/// The scripted upstream sends no `Date`: the sidecar adds one (RFC 9110 §6.6.1), on its
/// own answers too.
#[tokio::test]
async fn a_response_without_a_date_gets_one() {
    for engine in ENGINES {
        let (up, _) = upstream(loopback(), 100).await;
        let (p, svc) = sidecar(engine, &[up], json!({})).await;
        let mut c = client(svc).await;
        let (resp, body) = call(&mut c, request("GET", svc, "/"), None).await;
        assert_eq!(body.unwrap().0, b"ok", "{engine:?}");
        let date = resp
            .headers()
            .get("date")
            .expect("a date")
            .to_str()
            .unwrap();
        let when = httpdate::parse_http_date(date).unwrap();
        let off = when
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_else(|e| e.duration());
        assert!(off < Duration::from_secs(5), "{engine:?}: {date}");
        // No endpoint: the sidecar's own 503.
        p.set(&outbound_config(2, svc, 80, "http2", &[], json!({})))
            .await;
        let (resp, _) = call(&mut c, request("GET", svc, "/"), None).await;
        assert_eq!(resp.status(), 503, "{engine:?}");
        assert!(resp.headers().contains_key("date"), "{engine:?}");
    }
}

#[tokio::test]
async fn large_bodies_cross_under_flow_control() {
    for engine in ENGINES {
        let (up, _) = upstream(loopback(), 100).await;
        let (_p, svc) = sidecar(engine, &[up], json!({"retry": {"attempts": 0}})).await;
        let mut c = client(svc).await;
        // Larger than every window on the way (64 KiB client, 1-5 MiB proxy).
        let data: Vec<u8> = (0..6 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let (resp, body) = call(
            &mut c,
            request("POST", svc, "/echo"),
            Some(Bytes::from(data.clone())),
        )
        .await;
        assert_eq!(resp.status(), 200, "{engine:?}");
        let (got, _) = body.unwrap();
        assert_eq!(got.len(), data.len(), "{engine:?}");
        assert!(got == data, "{engine:?}: body changed on the way");
    }
}

#[tokio::test]
async fn upstream_reset_mid_response_reaches_the_client_as_a_reset() {
    for engine in ENGINES {
        let (up, _) = upstream(loopback(), 100).await;
        let (_p, svc) = sidecar(engine, &[up], json!({})).await;
        let mut c = client(svc).await;
        let (resp, body) = call(&mut c, request("GET", svc, "/reset-mid"), None).await;
        assert_eq!(resp.status(), 200, "{engine:?}");
        let e = body.expect_err("a cut body must end in a reset");
        assert!(e.is_reset(), "{engine:?}: {e}");
        // The connection still serves other streams.
        let (resp, body) = call(&mut c, request("GET", svc, "/"), None).await;
        assert_eq!(
            (resp.status(), body.unwrap().0),
            (200.try_into().unwrap(), b"ok".to_vec())
        );
    }
}

#[tokio::test]
async fn a_client_reset_reaches_the_upstream() {
    for engine in ENGINES {
        let (up, seen) = upstream(loopback(), 100).await;
        let (_p, svc) = sidecar(engine, &[up], json!({})).await;
        let c = client(svc).await;
        let mut c = c.ready().await.unwrap();
        let (_resp, mut send) = c.send_request(request("GET", svc, "/hang"), true).unwrap();
        assert!(
            eventually(|| seen.hanging.load(Ordering::SeqCst) == 1).await,
            "{engine:?}"
        );
        send.send_reset(h2::Reason::CANCEL);
        assert!(
            eventually(|| seen.resets.load(Ordering::SeqCst) == 1).await,
            "{engine:?}: upstream stream left open"
        );
    }
}

#[tokio::test]
async fn a_5xx_is_retried_with_the_body_replayed() {
    for engine in ENGINES {
        let (up, seen) = upstream(loopback(), 100).await;
        let retry = json!({"retry": {"attempts": 2, "retry_on": ["5xx"], "backoff_base_ms": 0}});
        let (_p, svc) = sidecar(engine, &[up], retry).await;
        let mut c = client(svc).await;
        let mut req = request("POST", svc, "/flaky");
        req.headers_mut()
            .insert("content-length", "7".parse().unwrap());
        let (resp, body) = call(&mut c, req, Some(Bytes::from_static(b"payload"))).await;
        assert_eq!(resp.status(), 200, "{engine:?}");
        assert_eq!(body.unwrap().0, b"payload", "{engine:?}");
        assert_eq!(seen.streams.load(Ordering::SeqCst), 2, "{engine:?}");
    }
}

#[tokio::test]
async fn the_request_breaker_and_the_request_timeout_answer_in_time() {
    for engine in ENGINES {
        let (up, seen) = upstream(loopback(), 100).await;
        let extra = json!({"limits": {"max_requests": 1}, "timeouts": {"request_ms": 300},
                           "retry": {"attempts": 0}});
        let (_p, svc) = sidecar(engine, &[up], extra).await;
        let mut c = client(svc).await;
        let mut held = c.clone();
        let hang = tokio::spawn(async move {
            call(&mut held, request("GET", svc, "/hang"), None)
                .await
                .0
                .status()
        });
        assert!(
            eventually(|| seen.hanging.load(Ordering::SeqCst) == 1).await,
            "{engine:?}"
        );
        let (resp, _) = call(&mut c, request("GET", svc, "/"), None).await;
        assert_eq!(resp.status(), 503, "{engine:?}");
        assert_eq!(
            resp.headers()["x-sidemesh-overloaded"],
            "max_requests",
            "{engine:?}"
        );
        let status = tokio::time::timeout(WAIT, hang).await.unwrap().unwrap();
        assert_eq!(status, 504, "{engine:?}");
        // The timed-out stream was reset upstream, and the slot is free again.
        assert!(
            eventually(|| seen.resets.load(Ordering::SeqCst) == 1).await,
            "{engine:?}"
        );
        let (resp, _) = call(&mut c, request("GET", svc, "/"), None).await;
        assert_eq!(resp.status(), 200, "{engine:?}");
    }
}

#[tokio::test]
async fn routes_match_headers_and_rewrite_both_ways() {
    for engine in ENGINES {
        let (up, _) = upstream(loopback(), 100).await;
        let (other, _) = upstream(loopback(), 100).await;
        let routes = json!({"routes": [
            {"name": "beta", "match": {"headers": [{"name": "x-beta", "exact": "1"}], "methods": ["GET"]},
             "backends": [{"subset": {}, "weight": 1}],
             "request_headers": {"set": {"x-routed": "beta"}},
             "response_headers": {"set": {"x-route": "beta"}, "remove": ["x-backend-secret"]}}]});
        let (p, svc) = sidecar(engine, &[up, other], routes).await;
        let mut c = client(svc).await;
        let mut req = request("GET", svc, "/");
        req.headers_mut().insert("x-beta", "1".parse().unwrap());
        let (resp, _) = call(&mut c, req, None).await;
        assert_eq!(resp.headers()["echo-x-routed"], "beta", "{engine:?}");
        assert_eq!(resp.headers()["x-route"], "beta", "{engine:?}");
        assert!(
            !resp.headers().contains_key("x-backend-secret"),
            "{engine:?}"
        );
        // Not matched: no rewrite.
        let (resp, _) = call(&mut c, request("GET", svc, "/"), None).await;
        assert!(!resp.headers().contains_key("x-route"), "{engine:?}");
        assert!(
            resp.headers().contains_key("x-backend-secret"),
            "{engine:?}"
        );
        // Each counted in its route's series.
        for route in ["beta", "default"] {
            let labels = [
                ("route", route),
                ("status_class", "2xx"),
                ("direction", "outbound"),
            ];
            let n = p.counter("sidemesh_proxy_requests_total", &labels);
            assert_eq!(n, 1, "{engine:?} {route}");
        }
    }
}

#[tokio::test]
async fn the_client_authority_reaches_the_upstream_as_authority_without_host() {
    for engine in ENGINES {
        let (up, _) = upstream(loopback(), 100).await;
        let (_p, svc) = sidecar(engine, &[up], json!({})).await;
        let mut c = client(svc).await;
        let req = Request::builder()
            .uri("http://api.example:8081/")
            .body(())
            .unwrap();
        let (resp, _) = call(&mut c, req, None).await;
        assert_eq!(resp.status(), 200, "{engine:?}");
        assert_eq!(
            resp.headers()["echo-authority"],
            "api.example:8081",
            "{engine:?}"
        );
        assert!(!resp.headers().contains_key("echo-host"), "{engine:?}");
    }
}

#[tokio::test]
async fn a_full_upstream_connection_does_not_hold_other_requests() {
    // The endpoint allows two streams per connection and two are held: the lean engine
    // opens another connection for the next request rather than queueing it behind them.
    let (up, seen) = upstream(loopback(), 2).await;
    let (_p, svc) = sidecar(Engine::Lean, &[up], json!({})).await;
    let c = client(svc).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = c.clone().ready().await.unwrap();
        held.push(c.send_request(request("GET", svc, "/hang"), true).unwrap());
        assert!(eventually(|| seen.hanging.load(Ordering::SeqCst) == held.len()).await);
    }
    let mut c2 = c.clone();
    let (resp, body) = call(&mut c2, request("GET", svc, "/"), None).await;
    assert_eq!(
        (resp.status().as_u16(), body.unwrap().0),
        (200, b"ok".to_vec())
    );
}

#[tokio::test]
async fn an_idle_connection_is_closed() {
    for engine in ENGINES {
        let (up, _) = upstream(loopback(), 100).await;
        let (_p, svc) = sidecar(engine, &[up], json!({"timeouts": {"idle_ms": 200}})).await;
        let (mut c, end) = client_and_end(svc).await;
        let (resp, _) = call(&mut c, request("GET", svc, "/"), None).await;
        assert_eq!(resp.status(), 200, "{engine:?}");
        let t0 = std::time::Instant::now();
        tokio::time::timeout(WAIT, end)
            .await
            .unwrap_or_else(|_| panic!("{engine:?}: idle connection left open"))
            .unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(150),
            "{engine:?}: closed too early"
        );
    }
}

#[tokio::test]
async fn drain_lets_a_stream_in_flight_finish() {
    for engine in ENGINES {
        let (up, _) = upstream(loopback(), 100).await;
        let (p, svc) = sidecar(engine, &[up], json!({})).await;
        let (c, end) = client_and_end(svc).await;
        let mut held = c.clone();
        let slow =
            tokio::spawn(async move { call(&mut held, request("GET", svc, "/slow"), None).await });
        // Once the stream is on its way, the sidecar is asked to stop.
        tokio::time::sleep(Duration::from_millis(100)).await;
        p.shutdown.cancel();
        let (resp, body) = tokio::time::timeout(WAIT, slow).await.unwrap().unwrap();
        assert_eq!(resp.status(), 200, "{engine:?}");
        assert_eq!(body.unwrap().0, b"late", "{engine:?}");
        // Then the connection ends (GOAWAY, then close), and no new stream is served.
        tokio::time::timeout(WAIT, end)
            .await
            .unwrap_or_else(|_| panic!("{engine:?}: drained connection left open"))
            .unwrap();
        let refused = async {
            c.clone()
                .ready()
                .await
                .ok()?
                .send_request(request("GET", svc, "/"), true)
                .ok()
        };
        assert!(
            refused.await.is_none(),
            "{engine:?}: a stream opened after the drain"
        );
    }
}

/// An h2c upstream written frame by frame, as a server that closes its connections after one
/// stream does: it answers the first stream of each connection (200, no body), and answers
/// a later stream with GOAWAY naming the first as the last it processed (so the later one
/// was not processed, and the client may send it again elsewhere), then reads until the
/// client closes. Keeps the header block of each connection's first stream.
async fn one_stream_upstream(ip: Ipv4Addr) -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let firsts = Arc::new(Mutex::new(Vec::new()));
    let seen = firsts.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(goaway_after_one(s, seen.clone()));
        }
    });
    (addr, firsts)
}

/// The server's side of an h2c connection written by hand: reads the client's preface and
/// sends empty SETTINGS.
async fn h2_server_start(s: &mut TcpStream) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut preface = [0u8; 24];
    s.read_exact(&mut preface).await?;
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await
}

/// The next frame from the client: type, stream id, payload. A SETTINGS frame (not an
/// ACK) is acknowledged on the way.
async fn next_frame(s: &mut TcpStream) -> std::io::Result<(u8, u32, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let (kind, flags) = (head[3], head[4]);
    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await?;
    if kind == 4 && flags & 1 == 0 {
        s.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await?;
    }
    Ok((kind, id, payload))
}

/// One connection of [`one_stream_upstream`], until the client closes it.
async fn goaway_after_one(
    mut s: TcpStream,
    firsts: Arc<Mutex<Vec<Vec<u8>>>>,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    h2_server_start(&mut s).await?;
    let mut first = None;
    loop {
        let (kind, id, payload) = next_frame(&mut s).await?;
        match kind {
            // HEADERS of the first stream: `:status: 200` (HPACK static entry 8),
            // END_STREAM | END_HEADERS.
            1 if first.is_none() => {
                first = Some(id);
                firsts.lock().unwrap().push(payload);
                let mut f = vec![0, 0, 1, 1, 5];
                f.extend_from_slice(&id.to_be_bytes());
                f.push(0x88);
                s.write_all(&f).await?;
            }
            // A later stream: GOAWAY(last = the first, NO_ERROR).
            1 => {
                let mut f = vec![0, 0, 8, 7, 0, 0, 0, 0, 0];
                f.extend_from_slice(&first.unwrap_or(0).to_be_bytes());
                f.extend_from_slice(&0u32.to_be_bytes());
                s.write_all(&f).await?;
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_stream_refused_by_goaway_is_sent_again_on_a_new_connection() {
    // No retries: a request that the upstream's GOAWAY says it never processed is sent
    // again all the same (on a new connection), as it never reached the upstream.
    let (up, firsts) = one_stream_upstream(loopback()).await;
    let (_p, svc) = sidecar(Engine::Lean, &[up], json!({"retry": {"attempts": 0}})).await;
    let mut c = client(svc).await;
    for i in 0..3 {
        let (resp, body) = call(&mut c, request("GET", svc, "/"), None).await;
        assert_eq!(resp.status(), 200, "request {i}");
        assert!(body.unwrap().0.is_empty());
    }
    // The second and the third request were each refused on the connection of the one
    // before, and each was sent again on a new connection, whole: each connection's first
    // header block (a fresh HPACK table each time) is the same.
    let firsts = firsts.lock().unwrap();
    assert_eq!(firsts.len(), 3);
    assert!(firsts.iter().all(|b| *b == firsts[0]), "{firsts:?}");
}

/// An h2c upstream that takes each connection's first stream, then fails the connection
/// with GOAWAY(last = that stream, INTERNAL_ERROR) and closes it unanswered; counts the
/// streams it took.
async fn failing_upstream(ip: Ipv4Addr) -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::AsyncWriteExt;
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let taken = Arc::new(AtomicUsize::new(0));
    let count = taken.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                h2_server_start(&mut s).await?;
                loop {
                    // HEADERS: GOAWAY(last = this stream, INTERNAL_ERROR), then close.
                    let (kind, id, _) = next_frame(&mut s).await?;
                    if kind == 1 {
                        count.fetch_add(1, Ordering::SeqCst);
                        let mut f = vec![0, 0, 8, 7, 0, 0, 0, 0, 0];
                        f.extend_from_slice(&id.to_be_bytes());
                        f.extend_from_slice(&2u32.to_be_bytes());
                        s.write_all(&f).await?;
                        return s.shutdown().await;
                    }
                }
            });
        }
    });
    (addr, taken)
}

#[tokio::test]
async fn a_stream_the_upstream_took_is_not_sent_again_after_a_goaway_with_an_error() {
    // The GOAWAY names the stream as processed, and the connection closes before it is
    // answered: h2 fails the stream as the connection's end (only streams above the last
    // id get the peer's GOAWAY), so without retries it must not be sent again.
    let (up, taken) = failing_upstream(loopback()).await;
    let (_p, svc) = sidecar(Engine::Lean, &[up], json!({"retry": {"attempts": 0}})).await;
    let mut c = client(svc).await;
    let (resp, _) = call(&mut c, request("POST", svc, "/"), None).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(
        taken.load(Ordering::SeqCst),
        1,
        "sent again after it was taken"
    );
}
