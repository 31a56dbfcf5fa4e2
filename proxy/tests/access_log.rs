//! Access logs: every engine writes one line per request, with what the client asked and
//! what it got, to the file given.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sidemesh_proxy::ProxyConfig;
use sidemesh_proxy::access::{AccessLog, Format, Settings};
use support::*;

/// A sidecar on `config` with JSON access logs to a file in a new directory.
async fn with_log(config: ProxyConfig, json: &Value) -> WithLog {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let settings = Settings {
        format: Format::Json,
        path: Some(path.clone()),
    };
    let log = AccessLog::start(&settings, &prometheus::Registry::new()).unwrap();
    let config = ProxyConfig {
        access_log: Some(Arc::new(log)),
        ..config
    };
    WithLog {
        r: start_with(config, json).await,
        path,
        _dir: dir,
    }
}

/// What [`with_log`] started: the sidecar, and its log file (removed with it).
struct WithLog {
    r: Running,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// An outbound HTTP/1.1 service `shop/cart` at `svc1` (with `extra`, e.g. routes) and an
/// h2c one, `shop/cart2` at `svc2`, both in front of `be`.
fn two_services(
    svc1: std::net::Ipv4Addr,
    svc2: std::net::Ipv4Addr,
    be: std::net::SocketAddr,
    extra: Value,
) -> Value {
    let mut config = outbound_config(1, svc1, 80, "http1", &[be], extra);
    let mut second = outbound_config(1, svc2, 80, "http2", &[be], json!({}))["outbound"][0].clone();
    second["name"] = json!("cart2");
    config["outbound"].as_array_mut().unwrap().push(second);
    config
}

/// The JSON lines in `path` once there are `n` of them (within the wait).
async fn lines(path: &std::path::Path, n: usize) -> Vec<Value> {
    let mut seen = Vec::new();
    eventually(|| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        seen = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        seen.len() >= n
    })
    .await;
    seen
}

/// A sidecar with JSON access logs to a file, HTTP/1.1 and HTTP/2 client connections served
/// by the engines given, one outbound HTTP/1.1 service, one h2c service, and an inbound
/// HTTP/1.1 port in front of the same backend (as the app).
async fn logged(h1: sidemesh_proxy::h1::Engine, h2: sidemesh_proxy::http2::Engine) -> Logged {
    let ip = loopback();
    let be = backend(ip, "api").await;
    let (svc1, svc2) = (loopback(), loopback());
    let mut config = two_services(svc1, svc2, be.addr, json!({}));
    let outer = free_port(ip);
    config["inbound"] = json!([{"port": be.addr.port(), "port_outer": outer, "protocol": "http1"}]);
    let WithLog { r, path, _dir: dir } = with_log(
        ProxyConfig {
            inbound_address: ip.into(),
            app_address: ip.into(),
            drain_timeout: Duration::from_secs(5),
            http1_engine: h1,
            http2_engine: h2,
            ..ProxyConfig::default()
        },
        &config,
    )
    .await;
    Logged {
        be,
        r,
        path,
        _dir: dir,
        svc1,
        svc2,
        inbound: std::net::SocketAddr::new(ip.into(), outer),
    }
}

/// What [`logged`] started.
struct Logged {
    be: Backend,
    r: Running,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
    svc1: std::net::Ipv4Addr,
    svc2: std::net::Ipv4Addr,
    inbound: std::net::SocketAddr,
}

#[tokio::test]
async fn every_engine_writes_a_line_per_request() {
    use sidemesh_proxy::h1::Engine as H1;
    use sidemesh_proxy::http2::Engine as H2;
    for (h1, h2) in [(H1::Lean, H2::Lean), (H1::Hyper, H2::Hyper)] {
        let Logged {
            path,
            svc1,
            svc2,
            inbound,
            be,
            ..
        } = &logged(h1, h2).await;
        let be_addr = be.addr;
        let headers = [("user-agent", "probe/1"), ("x-request-id", "r-42")];
        let (status, _, _) = get(&h1_client(), &format!("http://{svc1}/a?b=1"), &headers).await;
        assert_eq!(status, 200);
        let (status, _, _) = get(&h2_client(), &format!("http://{svc2}/h2"), &[]).await;
        assert_eq!(status, 200);
        let (status, _, _) = get(&h1_client(), &format!("http://{inbound}/in"), &[]).await;
        assert_eq!(status, 200);
        let got = lines(path, 3).await;
        assert_eq!(got.len(), 3, "{h1:?}/{h2:?}: {got:?}");
        let (one, two, three) = (&got[0], &got[1], &got[2]);
        assert_eq!(one["direction"], "outbound");
        assert_eq!(one["service"], "shop/cart");
        assert_eq!(one["route"], "default");
        assert_eq!(one["method"], "GET");
        assert_eq!(one["path"], "/a?b=1");
        assert_eq!(one["authority"], svc1.to_string());
        assert_eq!(one["protocol"], "HTTP/1.1");
        assert_eq!(one["status"], 200);
        assert_eq!(one["user_agent"], "probe/1");
        assert_eq!(one["request_id"], "r-42");
        // The backend answers its name: 3 body bytes, all sent; no request body.
        let (to_end, to_head) = (
            one["duration_ms"].as_f64().unwrap(),
            one["response_ms"].as_f64().unwrap(),
        );
        assert!(to_end >= to_head && to_head > 0.0, "{one}");
        assert_eq!(
            (&one["bytes_received"], &one["bytes_sent"], &one["complete"]),
            (&json!(0), &json!(3), &json!(true)),
            "{h1:?}: {one}"
        );
        assert_eq!(
            (&two["bytes_sent"], &two["complete"]),
            (&json!(3), &json!(true)),
            "{h2:?}: {two}"
        );
        assert!(one["client"].as_str().unwrap().starts_with("127."));
        assert!(one["client_id"].is_null());
        assert_eq!(one["upstream"], be_addr.to_string(), "{h1:?}");
        assert!(one["start_time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(two["service"], "shop/cart2", "{h1:?}/{h2:?}");
        assert_eq!(two["protocol"], "HTTP/2");
        assert_eq!(two["path"], "/h2");
        assert_eq!(two["status"], 200);
        assert!(two["request_id"].is_null());
        assert_eq!(two["upstream"], be_addr.to_string(), "{h2:?}");
        // Inbound: the workload's own service, not the metrics label `inbound`.
        assert_eq!(three["direction"], "inbound");
        assert_eq!(three["service"], "shop/web");
        assert_eq!(three["path"], "/in");
        assert_eq!(three["upstream"], be_addr.to_string());
    }
}

/// Body bytes are counted each way, as payload (chunk framing not counted), on every
/// engine: a request body sent with a length and chunked, over HTTP/1.1 and HTTP/2.
#[tokio::test]
async fn lines_count_the_body_bytes_each_way() {
    use sidemesh_proxy::h1::Engine as H1;
    use sidemesh_proxy::http2::Engine as H2;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for (h1, h2) in [(H1::Lean, H2::Lean), (H1::Hyper, H2::Hyper)] {
        let Logged {
            path, svc1, svc2, ..
        } = &logged(h1, h2).await;
        // Sized: the backend answers `api:` and the body.
        let (status, body) = post(&h1_client(), &format!("http://{svc1}/sized"), "hello").await;
        assert_eq!((status, body.as_str()), (200, "api:hello"));
        // Chunked, by hand: two chunks of 4 and 6 bytes.
        let mut c = tokio::net::TcpStream::connect((*svc1, 80)).await.unwrap();
        c.write_all(
            b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
              Connection: close\r\n\r\n4\r\nabcd\r\n6\r\nefghij\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, c.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.ends_with("api:abcdefghij"), "{answer}");
        let (status, body) = post(&h2_client(), &format!("http://{svc2}/h2"), "hey").await;
        assert_eq!((status, body.as_str()), (200, "api:hey"));
        // Larger than a replayable body: streamed upstream as it comes.
        let big = "x".repeat(100 * 1024);
        let (status, body) = post(&h2_client(), &format!("http://{svc2}/big"), big).await;
        assert_eq!((status, body.len()), (200, 4 + 100 * 1024));

        let got = lines(path, 4).await;
        let counts: Vec<_> = got
            .iter()
            .map(|l| {
                (
                    l["path"].as_str().unwrap().to_owned(),
                    l["bytes_received"].as_u64().unwrap(),
                    l["bytes_sent"].as_u64().unwrap(),
                    l["complete"].as_bool().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            counts,
            [
                ("/sized".to_owned(), 5, 9, true),
                ("/chunked".to_owned(), 10, 14, true),
                ("/h2".to_owned(), 3, 7, true),
                ("/big".to_owned(), 100 * 1024, 4 + 100 * 1024, true),
            ],
            "{h1:?}/{h2:?}"
        );
    }
}

/// A request the lean HTTP/1.1 engine hands to hyper (its route leads to an HTTP/2
/// backend) gets one line, not one from each engine.
#[tokio::test]
async fn a_request_handed_to_hyper_is_logged_once() {
    let ip = loopback();
    let be = backend(ip, "api").await;
    let (svc1, svc2) = (loopback(), loopback());
    let route = json!({"routes": [{
        "name": "to-h2",
        "match": {"path": {"prefix": "/h2"}},
        "backends": [{"service": "shop/cart2", "weight": 1}],
    }]});
    let config = two_services(svc1, svc2, be.addr, route);
    let WithLog { path, .. } = &with_log(ProxyConfig::default(), &config).await;
    let (status, _, body) = get(&h1_client(), &format!("http://{svc1}/h2/x"), &[]).await;
    assert_eq!((status, body.as_str()), (200, "api"));
    let (status, _, _) = get(&h1_client(), &format!("http://{svc1}/after"), &[]).await;
    assert_eq!(status, 200);
    let got = lines(path, 2).await;
    let paths: Vec<_> = got.iter().map(|l| l["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["/h2/x", "/after"], "{got:?}");
    assert_eq!(
        (&got[0]["route"], &got[0]["status"]),
        (&json!("to-h2"), &json!(200))
    );
}

/// A response the upstream cuts short is logged as incomplete, with the bytes that got
/// through.
#[tokio::test]
async fn a_cut_response_is_logged_as_incomplete() {
    use sidemesh_proxy::h1::Engine as H1;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for h1 in [H1::Lean, H1::Hyper] {
        let ip = loopback();
        // Promises 100 bytes, sends 10, closes.
        let cut = raw_server(ip, |mut s| async move {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                .await;
        })
        .await;
        let svc = loopback();
        let config = ProxyConfig {
            http1_engine: h1,
            ..ProxyConfig::default()
        };
        let cfg = outbound_config(1, svc, 80, "http1", &[cut], json!({}));
        let WithLog { path, .. } = &with_log(config, &cfg).await;
        let mut c = tokio::net::TcpStream::connect((svc, 80)).await.unwrap();
        c.write_all(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut answer)).await;
        let got = lines(path, 1).await;
        assert_eq!(got.len(), 1, "{h1:?}: {got:?}");
        assert_eq!(got[0]["status"], 200, "{h1:?}");
        assert_eq!(got[0]["complete"], false, "{h1:?}: {}", got[0]);
        assert_eq!(got[0]["bytes_sent"], 10, "{h1:?}: {}", got[0]);
    }
}

/// An HTTP/2 client that resets its stream before the answer is logged with status 0, as
/// Envoy logs a downstream disconnect: the slow requests a client gave up on show up.
#[tokio::test]
async fn a_request_its_client_gave_up_on_is_logged_with_status_0() {
    use sidemesh_proxy::http2::Engine as H2;
    for h2 in [H2::Lean, H2::Hyper] {
        let ip = loopback();
        let slow = backend_with(
            ip,
            Arc::new(|_req| {
                Box::pin(async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from("late")))
                })
            }),
        )
        .await;
        let svc = loopback();
        let config = ProxyConfig {
            http2_engine: h2,
            ..ProxyConfig::default()
        };
        let cfg = outbound_config(1, svc, 80, "http2", &[slow.addr], json!({}));
        let WithLog { path, .. } = &with_log(config, &cfg).await;
        let s = tokio::net::TcpStream::connect((svc, 80)).await.unwrap();
        let (c, conn) = h2::client::handshake(s).await.unwrap();
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::get(format!("http://{svc}/slow"))
            .body(())
            .unwrap();
        let (_resp, mut stream) = c.ready().await.unwrap().send_request(req, true).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        stream.send_reset(h2::Reason::CANCEL);
        let got = lines(path, 1).await;
        assert_eq!(got.len(), 1, "{h2:?}: {got:?}");
        let one = &got[0];
        assert_eq!(
            (
                &one["status"],
                &one["route"],
                &one["response_ms"],
                &one["complete"]
            ),
            (&json!(0), &json!(null), &json!(null), &json!(false)),
            "{h2:?}: {one}"
        );
        assert_eq!(
            (&one["path"], &one["service"]),
            (&json!("/slow"), &json!("shop/cart"))
        );
        assert!(
            one["duration_ms"].as_f64().unwrap() >= 150.0,
            "{h2:?}: {one}"
        );
        conn.abort();
    }
}

/// POSTs `body` to `url`; returns (status, body).
async fn post(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    url: &str,
    body: impl Into<bytes::Bytes>,
) -> (u16, String) {
    use http_body_util::BodyExt;
    let req = hyper::Request::post(url)
        .body(http_body_util::Full::new(body.into()))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, client.request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A request the sidecar answers itself (no endpoint) is logged with that status.
#[tokio::test]
async fn a_request_the_sidecar_answers_itself_is_logged_with_its_status() {
    let Logged { r, path, svc1, .. } = &logged(Default::default(), Default::default()).await;
    r.set(&outbound_config(2, *svc1, 80, "http1", &[], json!({})))
        .await;
    let (status, _, _) = get(&h1_client(), &format!("http://{svc1}/none"), &[]).await;
    assert_eq!(status, 503);
    let got = lines(path, 1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["status"], 503);
    assert_eq!(got[0]["path"], "/none");
    assert!(got[0]["upstream"].is_null(), "{got:?}");
}

/// A raw TCP connection gets one line when it ends: the bytes each way, the endpoint, and
/// how it ended; one the sidecar cannot place is logged too.
#[tokio::test]
async fn a_tcp_connection_is_logged_when_it_ends() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ip = loopback();
    let echo = raw_server(ip, |mut s| async move {
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = s.read(&mut buf).await {
            if s.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    })
    .await;
    let svc = loopback();
    let cfg = outbound_config(1, svc, 9000, "tcp", &[echo], json!({}));
    let WithLog { r, path, .. } = &with_log(ProxyConfig::default(), &cfg).await;
    let mut c = tokio::net::TcpStream::connect((svc, 9000)).await.unwrap();
    c.write_all(b"hello, echo").await.unwrap();
    let mut back = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let got = lines(path, 1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let one = &got[0];
    assert_eq!(one["protocol"], "TCP");
    assert_eq!(one["direction"], "outbound");
    assert_eq!(one["service"], "shop/cart");
    assert_eq!(one["end"], "closed");
    assert_eq!(one["upstream"], echo.to_string());
    assert_eq!(one["bytes_to_upstream"], 11);
    assert_eq!(one["bytes_to_client"], 11);
    assert!(one["client"].as_str().unwrap().starts_with("127."));

    // No endpoint: the sidecar closes the connection, and says why.
    r.set(&outbound_config(2, svc, 9000, "tcp", &[], json!({})))
        .await;
    let mut c = tokio::net::TcpStream::connect((svc, 9000)).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await;
    let got = lines(path, 2).await;
    assert_eq!(got[1]["end"], "no_endpoints", "{got:?}");
    assert!(got[1]["upstream"].is_null());
}
