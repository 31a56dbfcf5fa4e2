//! Integration tests of the discover HTTP API on real sockets (127.0.0.1:0): long polls,
//! 304s, gzip, every 4xx, the TTL registry, and restart persistence.

// Test helpers outside #[test] functions panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use sidemesh_api::state::ClusterState;
use sidemesh_discover::{Discover, Options};

const STATE: &str = "
services:
  - namespace: demo
    name: web
    ports: [{port: 8000, port_outer: 18000}]
    use_services: [{service: api}]
  - namespace: demo
    name: api
    ports: [{port: 80, port_outer: 18080}]
    instances: [{address: 10.0.0.1, meshed: true}]
  - namespace: demo
    name: lone
    ports: [{port: 81}]
";

fn state(yaml: &str) -> ClusterState {
    serde_norway::from_str(yaml).unwrap()
}

struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    fn etag(&self) -> String {
        self.headers["etag"].to_str().unwrap().to_owned()
    }
}

/// One request on a fresh connection, bounded by a 30 s timeout.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    tokio::time::timeout(Duration::from_secs(30), async {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::copy_from_slice(body))).unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    })
    .await
    .expect("request timed out")
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, &[], b"").await
}

async fn start(
    opts: Options,
    yaml: Option<&str>,
) -> (Discover, SocketAddr, sidemesh_discover::Serving) {
    let registry = prometheus::Registry::new();
    let d = Discover::new(opts, &registry).unwrap();
    if let Some(y) = yaml {
        d.set_state("file", state(y));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let serving = d.serve(listener).unwrap();
    (d, serving.addr, serving)
}

/// Polls `f` every 20 ms until it holds, for at most `within`.
async fn eventually(within: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not met within {within:?}");
}

fn gauge(d: &Discover) -> i64 {
    d.metrics().long_polls_waiting.get()
}

#[tokio::test]
async fn long_poll_wakes_all_pollers_of_changed_sidecars_and_only_those() {
    let (d, addr, _) = start(Options::default(), Some(STATE)).await;
    let web = get(addr, "/v1/sidecars/demo/web/sidemesh-proxy").await;
    assert_eq!(web.status, 200);
    let lone = get(addr, "/v1/sidecars/demo/lone/sidemesh-proxy").await;
    let (web_tag, lone_tag) = (web.etag(), lone.etag());
    let mut web_polls = Vec::new();
    for _ in 0..3 {
        let tag = web_tag.clone();
        web_polls.push(tokio::spawn(async move {
            let r = request(
                addr,
                "GET",
                "/v1/sidecars/demo/web/sidemesh-proxy?wait=20",
                &[("if-none-match", &tag)],
                b"",
            )
            .await;
            (r, Instant::now())
        }));
    }
    let mut lone_polls = Vec::new();
    for _ in 0..2 {
        let tag = lone_tag.clone();
        lone_polls.push(tokio::spawn(async move {
            request(
                addr,
                "GET",
                "/v1/sidecars/demo/lone/sidemesh-proxy?wait=20",
                &[("if-none-match", &tag)],
                b"",
            )
            .await
        }));
    }
    eventually(Duration::from_secs(5), async || gauge(&d) == 5).await;
    // api gets a new instance: web's config changes, lone's does not.
    let changed_at = Instant::now();
    d.set_state("file", state(&STATE.replace("10.0.0.1", "10.0.0.2")));
    for p in web_polls {
        let (r, at) = p.await.unwrap();
        assert_eq!(r.status, 200);
        assert_ne!(r.etag(), web_tag);
        assert!(
            at.duration_since(changed_at) < Duration::from_secs(1),
            "woke late"
        );
        let v = r.json();
        assert_eq!(
            v["outbound"][0]["ports"][0]["endpoints"][0]["address"],
            "10.0.0.2"
        );
        assert!(v["version"].as_u64().unwrap() > web_tag.trim_matches('"').parse::<u64>().unwrap());
    }
    // The lone pollers are still waiting.
    eventually(Duration::from_secs(5), async || gauge(&d) == 2).await;
    assert!(lone_polls.iter().all(|p| !p.is_finished()));
    for p in lone_polls {
        p.abort();
    }
}

#[tokio::test]
async fn long_poll_times_out_with_304_and_conditional_get_without_wait() {
    let (_d, addr, _) = start(Options::default(), Some(STATE)).await;
    let r = get(addr, "/v1/sidecars/demo/web/sidemesh-proxy").await;
    let tag = r.etag();
    let started = Instant::now();
    let r = request(
        addr,
        "GET",
        "/v1/sidecars/demo/web/sidemesh-proxy?wait=1",
        &[("if-none-match", &tag)],
        b"",
    )
    .await;
    assert_eq!(r.status, 304);
    assert_eq!(r.etag(), tag);
    assert!(r.body.is_empty());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // No wait: an immediate 304; a stale tag: an immediate 200.
    let r = request(
        addr,
        "GET",
        "/v1/sidecars/demo/web/sidemesh-proxy",
        &[("if-none-match", &tag)],
        b"",
    )
    .await;
    assert_eq!(r.status, 304);
    let r = request(
        addr,
        "GET",
        "/v1/sidecars/demo/web/sidemesh-proxy?wait=30",
        &[("if-none-match", "\"1\"")],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn gzip_when_accepted() {
    let (_d, addr, _) = start(Options::default(), Some(STATE)).await;
    let plain = get(addr, "/v1/sidecars/demo/web/sidemesh-proxy").await;
    assert!(plain.headers.get("content-encoding").is_none());
    let r = request(
        addr,
        "GET",
        "/v1/sidecars/demo/web/sidemesh-proxy",
        &[("accept-encoding", "br, gzip;q=0.8")],
        b"",
    )
    .await;
    assert_eq!(r.headers["content-encoding"], "gzip");
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&r.body[..]), &mut out).unwrap();
    assert_eq!(out, plain.body);
    let r = request(
        addr,
        "GET",
        "/v1/sidecars/demo/web/sidemesh-proxy",
        &[("accept-encoding", "gzip;q=0")],
        b"",
    )
    .await;
    assert!(r.headers.get("content-encoding").is_none());
}

#[tokio::test]
async fn errors_are_json_with_the_right_status() {
    let opts = Options {
        max_body_bytes: 1024,
        ..Options::default()
    };
    let (_d, addr, _) = start(opts, Some(STATE)).await;
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "GET",
            "/v1/sidecars/demo/web/sidemesh-proxy?wait=soon",
            vec![],
            400,
            "wait must be a number",
        ),
        (
            "GET",
            "/v1/sidecars/demo/web/sidemesh-proxy?wait=-1",
            vec![],
            400,
            "wait must be a number",
        ),
        (
            "GET",
            "/v1/sidecars/demo/we%2Fb/sidemesh-proxy",
            vec![],
            400,
            "service in path",
        ),
        (
            "GET",
            "/v1/sidecars/demo/../web/sidemesh-proxy",
            vec![],
            400,
            "4 segment",
        ),
        (
            "GET",
            "/v1/sidecars/demo/w%01b/x",
            vec![],
            400,
            "service in path",
        ),
        (
            "GET",
            "/v1/sidecars/demo/ghost/sidemesh-proxy",
            vec![],
            404,
            "unknown service demo/ghost",
        ),
        (
            "GET",
            "/v1/sidecars/demo/web/nope",
            vec![],
            404,
            "has no plugin \"nope\"",
        ),
        (
            "GET",
            "/v1/resources/demo/ghost/sidemesh-proxy",
            vec![],
            404,
            "unknown service",
        ),
        ("GET", "/nowhere", vec![], 404, "no route /nowhere"),
        (
            "POST",
            "/v1/sidecars/demo/web/sidemesh-proxy",
            vec![],
            405,
            "use GET",
        ),
        (
            "GET",
            "/v1/registry/demo/web/i1",
            vec![],
            405,
            "use PUT, DELETE",
        ),
        (
            "PUT",
            "/v1/registry/demo/web/i1",
            vec![b'x'; 4096],
            413,
            "larger than 1024 bytes",
        ),
        (
            "PUT",
            "/v1/registry/demo/web/i1",
            b"{not json".to_vec(),
            400,
            "body must be JSON",
        ),
        (
            "PUT",
            "/v1/registry/demo/web/i1",
            br#"{"address":"10.0.0.1","ports":[{"port":80}],"ttl_seconds":5,"extra":1}"#.to_vec(),
            400,
            "unknown field `extra`",
        ),
        (
            "PUT",
            "/v1/registry/demo/web/i1",
            br#"{"address":"10.0.0.1","ports":[],"ttl_seconds":0}"#.to_vec(),
            400,
            "ttl_seconds: must be within",
        ),
        (
            "PUT",
            "/v1/registry/demo/Web/i1",
            br#"{"address":"10.0.0.1","ports":[{"port":80}],"ttl_seconds":5}"#.to_vec(),
            400,
            "service in path",
        ),
        (
            "DELETE",
            "/v1/registry/demo/web/never",
            vec![],
            404,
            "is not registered",
        ),
    ];
    for (method, path, body, status, needle) in cases {
        let r = request(addr, method, path, &[], &body).await;
        assert_eq!(r.status, status, "{method} {path}: {:?}", r.body);
        assert_eq!(r.headers["content-type"], "application/json", "{path}");
        let msg = r.json()["error"].as_str().unwrap().to_owned();
        assert!(
            msg.contains(needle),
            "{method} {path}: {msg:?} lacks {needle:?}"
        );
        if status == 405 {
            assert!(r.headers.contains_key("allow"), "{path}");
        }
    }
    // Nothing was registered by the bad requests, and the server still answers.
    assert_eq!(get(addr, "/healthz").await.status, 200);
}

#[tokio::test]
async fn not_ready_until_state_is_set() {
    let (d, addr, _) = start(Options::default(), None).await;
    for path in [
        "/readyz",
        "/v1/sidecars/demo/web/sidemesh-proxy",
        "/v1/services",
    ] {
        let r = get(addr, path).await;
        assert_eq!(r.status, 503, "{path}");
        assert!(r.json()["error"].as_str().unwrap().contains("not ready"));
    }
    assert_eq!(get(addr, "/healthz").await.status, 200);
    d.set_state("file", state(STATE));
    assert_eq!(get(addr, "/readyz").await.status, 200);
    let services = get(addr, "/v1/services").await.json();
    assert_eq!(services["services"].as_array().unwrap().len(), 3);
    let metrics = String::from_utf8(get(addr, "/metrics").await.body.to_vec()).unwrap();
    assert!(
        metrics.contains("sidemesh_discover_requests_total{code=\"503\",route=\"/readyz\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("sidemesh_discover_sidecars 3"));
}

#[tokio::test]
async fn registry_instances_expire_within_ttl_plus_one_second_and_wake_pollers() {
    let (d, addr, _) = start(Options::default(), Some(STATE)).await;
    let body = br#"{"address":"10.9.0.1","ports":[{"port":80}],"ttl_seconds":1,"meshed":true,"zone":"z1"}"#;
    let r = request(addr, "PUT", "/v1/registry/demo/api/i1", &[], body).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let registered_at = Instant::now();
    let web = get(addr, "/v1/sidecars/demo/web/sidemesh-proxy").await;
    let eps = web.json()["outbound"][0]["ports"][0]["endpoints"].clone();
    assert_eq!(eps.as_array().unwrap().len(), 2, "{eps}");
    assert!(
        eps.as_array()
            .unwrap()
            .iter()
            .any(|e| e["address"] == "10.9.0.1" && e["port"] == 18080 && e["zone"] == "z1")
    );
    let tag = web.etag();
    let r = request(
        addr,
        "GET",
        "/v1/sidecars/demo/web/sidemesh-proxy?wait=10",
        &[("if-none-match", &tag)],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    let gone_after = registered_at.elapsed();
    assert!(
        gone_after < Duration::from_secs(2),
        "expired after {gone_after:?}"
    );
    assert_eq!(
        r.json()["outbound"][0]["ports"][0]["endpoints"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(d.metrics().registry_expired.get(), 1);
    // Renewals keep an instance; DELETE removes it at once.
    let body = br#"{"address":"10.9.0.2","ports":[{"port":80}],"ttl_seconds":1}"#;
    assert_eq!(
        request(addr, "PUT", "/v1/registry/demo/api/i2", &[], body)
            .await
            .status,
        201
    );
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r = request(addr, "PUT", "/v1/registry/demo/api/i2", &[], body).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["result"], "renewed");
    }
    assert_eq!(d.metrics().registry_instances.get(), 1);
    assert_eq!(
        request(addr, "DELETE", "/v1/registry/demo/api/i2", &[], b"")
            .await
            .status,
        200
    );
    assert_eq!(d.metrics().registry_instances.get(), 0);
}

#[tokio::test]
async fn registry_only_services_get_configs() {
    let (d, addr, _) = start(Options::default(), None).await;
    d.set_ready();
    let body =
        br#"{"address":"10.9.0.1","ports":[{"port":9000,"protocol":"grpc"}],"ttl_seconds":30}"#;
    assert_eq!(
        request(addr, "PUT", "/v1/registry/ops/metrics/a", &[], body)
            .await
            .status,
        201
    );
    let r = get(addr, "/v1/services").await.json();
    assert_eq!(r["services"][0]["name"], "metrics");
    assert_eq!(r["services"][0]["instances"], 1);
    assert_eq!(
        get(addr, "/v1/sidecars/ops/metrics/sidemesh-proxy")
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn restart_keeps_registrations_addresses_and_versions() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        data_dir: Some(dir.path().to_owned()),
        ..Options::default()
    };
    let (d, addr, serving) = start(opts.clone(), Some(STATE)).await;
    let body = br#"{"address":"10.9.0.1","ports":[{"port":80}],"ttl_seconds":60}"#;
    assert_eq!(
        request(addr, "PUT", "/v1/registry/demo/api/keep", &[], body)
            .await
            .status,
        201
    );
    let short = br#"{"address":"10.9.0.3","ports":[{"port":80}],"ttl_seconds":1}"#;
    assert_eq!(
        request(addr, "PUT", "/v1/registry/demo/api/brief", &[], short)
            .await
            .status,
        201
    );
    let before = get(addr, "/v1/sidecars/demo/web/sidemesh-proxy")
        .await
        .json();
    serving.task.abort();
    d.stop();
    drop(d);
    tokio::time::sleep(Duration::from_millis(1100)).await; // let "brief" expire while down
    let (d2, addr2, serving2) = start(opts, Some(STATE)).await;
    let after = get(addr2, "/v1/sidecars/demo/web/sidemesh-proxy")
        .await
        .json();
    let eps: Vec<String> = after["outbound"][0]["ports"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["address"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(eps, ["10.0.0.1", "10.9.0.1"], "restored minus expired");
    assert_eq!(
        after["outbound"][0]["address"],
        before["outbound"][0]["address"]
    );
    // Content changed (the brief instance is gone), so the version is higher.
    assert!(after["version"].as_u64() > before["version"].as_u64());
    // And an unchanged config keeps its version across a restart.
    let lone = get(addr2, "/v1/sidecars/demo/lone/sidemesh-proxy")
        .await
        .etag();
    serving2.task.abort();
    d2.stop();
    drop(d2);
    let dir_opts = Options {
        data_dir: Some(dir.path().to_owned()),
        ..Options::default()
    };
    let (_d3, addr3, _) = start(dir_opts, Some(STATE)).await;
    assert_eq!(
        get(addr3, "/v1/sidecars/demo/lone/sidemesh-proxy")
            .await
            .etag(),
        lone
    );
}

#[tokio::test]
async fn rainbond_resources_shape() {
    let (_d, addr, _) = start(Options::default(), Some(STATE)).await;
    let r = get(addr, "/v1/resources/demo/web/sidemesh-proxy").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["base_ports"][0]["listen_port"], 18000);
    assert_eq!(v["base_services"][0]["depend_service_alias"], "api");
    assert_eq!(
        v["base_services"][0]["options"]["endpoints"],
        "10.0.0.1:18080"
    );
    assert!(v["base_normal"]["options"].is_object());
}

#[tokio::test]
async fn a_poller_that_hangs_up_is_no_longer_counted() {
    let (d, addr, _s) = start(Options::default(), Some(STATE)).await;
    let tag = get(addr, "/v1/sidecars/demo/lone/sidemesh-proxy")
        .await
        .etag();
    let poll = tokio::spawn(async move {
        request(
            addr,
            "GET",
            "/v1/sidecars/demo/lone/sidemesh-proxy?wait=60",
            &[("if-none-match", &tag)],
            b"",
        )
        .await
    });
    eventually(Duration::from_secs(5), async || gauge(&d) == 1).await;
    poll.abort(); // drops the client connection
    eventually(Duration::from_secs(5), async || gauge(&d) == 0).await;
}

#[tokio::test]
async fn oversized_headers_are_refused_and_slow_clients_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let opts = Options {
        header_read_timeout: Duration::from_millis(300),
        ..Options::default()
    };
    let (_d, addr, _s) = start(opts, Some(STATE)).await;
    // 20 KiB of headers: over the 16 KiB limit.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let big = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    s.write_all(big.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply))
        .await
        .expect("answered in time")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    // A client that never finishes its headers is disconnected after the timeout.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    // Closed (cleanly or by reset) well before the 5 s bound: the read ends.
    let _closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("closed in time");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
}

fn csr_for(uri: &str) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(uri.to_owned().try_into().unwrap())];
    p.serialize_request(&key).unwrap().pem().unwrap()
}

/// An identity authority whose CA is generated in `dir`.
fn authority_in(dir: &std::path::Path) -> sidemesh_discover::identity::Authority {
    sidemesh_discover::identity::Authority::load(
        Default::default(),
        None,
        None,
        Some(dir),
        &prometheus::Registry::new(),
    )
    .unwrap()
}

#[tokio::test]
async fn configs_carry_tls_settings_and_csrs_are_signed_for_their_own_identity_only() {
    let dir = tempfile::tempdir().unwrap();
    let authority = authority_in(dir.path());
    let ca = authority.ca_pem().to_owned();
    let opts = Options {
        authority: Some(std::sync::Arc::new(authority)),
        ..Options::default()
    };
    let (_d, addr, _s) = start(opts, Some(STATE)).await;
    let web = get(addr, "/v1/sidecars/demo/web/sidemesh-proxy").await;
    assert_eq!(web.status, 200);
    let tls = &web.json()["tls"];
    assert_eq!(tls["mode"], "permissive");
    assert_eq!(tls["csr_url"], "sidemesh-proxy/certificate");
    assert_eq!(tls["trust_bundle_pem"], ca.as_str());
    // The served config is still a valid config, gzip or not.
    let gz = request(
        addr,
        "GET",
        "/v1/sidecars/demo/web/sidemesh-proxy",
        &[("accept-encoding", "gzip")],
        b"",
    )
    .await;
    assert_eq!(gz.headers["content-encoding"], "gzip");
    sidemesh_api::Snapshot::from_json(&web.body).unwrap();

    let path = "/v1/sidecars/demo/web/sidemesh-proxy/certificate";
    let ok = request(
        addr,
        "POST",
        path,
        &[],
        csr_for("spiffe://cluster.local/ns/demo/svc/web").as_bytes(),
    )
    .await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert!(ok.body.starts_with(b"-----BEGIN CERTIFICATE-----"));
    // Asking for another service's identity at web's URL is refused.
    let foreign = request(
        addr,
        "POST",
        path,
        &[],
        csr_for("spiffe://cluster.local/ns/demo/svc/api").as_bytes(),
    )
    .await;
    assert_eq!(foreign.status, 403);
    assert!(
        foreign.json()["error"]
            .as_str()
            .unwrap()
            .contains("ns/demo/svc/web")
    );
    let garbage = request(addr, "POST", path, &[], b"not a csr").await;
    assert_eq!(garbage.status, 400);
    let unknown = request(
        addr,
        "POST",
        "/v1/sidecars/demo/nobody/sidemesh-proxy/certificate",
        &[],
        csr_for("spiffe://cluster.local/ns/demo/svc/nobody").as_bytes(),
    )
    .await;
    assert_eq!(unknown.status, 404);
    let big = request(addr, "POST", path, &[], &vec![b'a'; 64 * 1024]).await;
    assert_eq!(big.status, 413);
    assert_eq!(get(addr, path).await.status, 405);
}

/// CA rotation: the extra trusted CAs join every config's trust bundle; an edit of the
/// file wakes the pollers with a new version, a bad edit keeps the last good bundle, and a
/// restart with another signing CA (same data directory) is not answered `304`.
#[tokio::test]
async fn extra_trusted_cas_reach_every_config_and_a_change_of_them_a_new_version() {
    use sidemesh_discover::identity::{Authority, AuthorityConfig};
    let dir = tempfile::tempdir().unwrap();
    let (old_dir, new_dir, data) = (
        dir.path().join("old"),
        dir.path().join("new"),
        dir.path().join("data"),
    );
    let old_ca = authority_in(&old_dir).ca_pem().to_owned();
    let extra = dir.path().join("extra.pem");
    std::fs::write(&extra, &old_ca).unwrap();
    let authority = |ca_dir: &std::path::Path| {
        let config = AuthorityConfig {
            extra_trust: Some(extra.clone()),
            ..AuthorityConfig::default()
        };
        Authority::load(
            config,
            None,
            None,
            Some(ca_dir),
            &prometheus::Registry::new(),
        )
        .unwrap()
    };
    let a = authority(&new_dir);
    let new_ca = a.ca_pem().to_owned();
    let opts = Options {
        authority: Some(std::sync::Arc::new(a)),
        data_dir: Some(data.clone()),
        ..Options::default()
    };
    let (d, addr, serving) = start(opts, Some(STATE)).await;
    let path = "/v1/sidecars/demo/web/sidemesh-proxy";
    let first = get(addr, path).await;
    let bundle = first.json()["tls"]["trust_bundle_pem"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        bundle.contains(new_ca.trim()) && bundle.contains(old_ca.trim()),
        "{bundle}"
    );
    sidemesh_api::Snapshot::from_json(&first.body).unwrap();

    // A bad edit: refused, counted, the bundle and version stay.
    std::fs::write(&extra, "not a certificate").unwrap();
    let failed = || {
        d.metrics()
            .trust_reloads
            .with_label_values(&["failed"])
            .get()
    };
    eventually(Duration::from_secs(10), async || failed() == 1).await;
    let same = get(addr, path).await;
    assert_eq!(same.etag(), first.etag());
    assert_eq!(same.json()["tls"]["trust_bundle_pem"], bundle.as_str());

    // Dropping the old CA wakes a long poll with a new version carrying the new bundle.
    let etag = first.etag();
    let poll = tokio::spawn(async move {
        request(
            addr,
            "GET",
            &format!("{path}?wait=20"),
            &[("if-none-match", &etag)],
            b"",
        )
        .await
    });
    eventually(Duration::from_secs(5), async || gauge(&d) >= 1).await;
    std::fs::write(&extra, "").unwrap();
    let woke = poll.await.unwrap();
    assert_eq!(woke.status, 200);
    assert_ne!(woke.etag(), first.etag());
    let bundle = woke.json()["tls"]["trust_bundle_pem"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!bundle.contains(old_ca.trim()) && bundle.contains(new_ca.trim()));
    let dropped = woke.etag();
    serving.task.abort();
    d.stop();
    drop(d);

    // Restarted on the same data with the old CA signing: a new version, not a 304.
    let opts = Options {
        authority: Some(std::sync::Arc::new(authority(&old_dir))),
        data_dir: Some(data),
        ..Options::default()
    };
    let (_d, addr, _s) = start(opts, Some(STATE)).await;
    let again = request(addr, "GET", path, &[("if-none-match", &dropped)], b"").await;
    assert_eq!(again.status, 200);
    assert!(
        again.json()["tls"]["trust_bundle_pem"]
            .as_str()
            .unwrap()
            .starts_with(old_ca.trim())
    );
}

/// With a token file, a workload's config, resources and certificate need a bearer token
/// that covers it (401 without or with an unknown one, 403 for another workload's), the
/// open routes stay open, and an edit of the file applies while a bad edit is ignored.
#[tokio::test]
async fn tokens_guard_configs_resources_and_certificates_and_reload() {
    use sidemesh_discover::auth::{Auth, sha256_hex};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.yaml");
    let write = |web_identities: &str| {
        let text = format!(
            "tokens:\n  - name: web\n    sha256: {}\n    identities: [{web_identities}]\n  - name: ops\n    sha256: {}\n    identities: [\"*\"]\n",
            sha256_hex(b"web-token"),
            sha256_hex(b"ops-token"),
        );
        // Write then rename, as config management does, so no half file is read.
        let tmp = dir.path().join("tokens.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write("demo/web");
    let registry = prometheus::Registry::new();
    let auth = std::sync::Arc::new(Auth::load(&file, &registry).unwrap());
    let authority = authority_in(dir.path());
    let opts = Options {
        authority: Some(std::sync::Arc::new(authority)),
        auth: Some(auth.clone()),
        ..Options::default()
    };
    let (_d, addr, _s) = start(opts, Some(STATE)).await;
    let web_config = "/v1/sidecars/demo/web/sidemesh-proxy";
    let web = [("authorization", "Bearer web-token")];
    let api_config = "/v1/sidecars/demo/api/sidemesh-proxy";

    let none = get(addr, web_config).await;
    assert_eq!(none.status, 401);
    assert!(
        none.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    assert!(none.json()["error"].as_str().unwrap().contains("Bearer"));
    let wrong = request(
        addr,
        "GET",
        web_config,
        &[("authorization", "Bearer nope")],
        b"",
    )
    .await;
    assert_eq!(wrong.status, 401);
    assert!(
        wrong.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );

    let ok = request(addr, "GET", web_config, &web, b"").await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    let resources = "/v1/resources/demo/web/sidemesh-proxy";
    assert_eq!(get(addr, resources).await.status, 401);
    assert_eq!(request(addr, "GET", resources, &web, b"").await.status, 200);

    // web's token does not open api's config, nor its certificate.
    let api = request(addr, "GET", api_config, &web, b"").await;
    assert_eq!(api.status, 403);
    let msg = api.json()["error"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("demo/web") && msg.contains("demo/api"),
        "{msg}"
    );
    let api_csr = csr_for("spiffe://cluster.local/ns/demo/svc/api");
    let api_cert = "/v1/sidecars/demo/api/sidemesh-proxy/certificate";
    let refused = request(addr, "POST", api_cert, &web, api_csr.as_bytes()).await;
    assert_eq!(refused.status, 403);
    let no_token = request(addr, "POST", api_cert, &[], api_csr.as_bytes()).await;
    assert_eq!(no_token.status, 401);
    // Unknown workloads are refused before they are looked up: no probing without a token.
    assert_eq!(
        get(addr, "/v1/sidecars/demo/ghost/sidemesh-proxy")
            .await
            .status,
        401
    );

    let web_csr = csr_for("spiffe://cluster.local/ns/demo/svc/web");
    let cert = request(
        addr,
        "POST",
        "/v1/sidecars/demo/web/sidemesh-proxy/certificate",
        &web,
        web_csr.as_bytes(),
    )
    .await;
    assert_eq!(cert.status, 200, "{:?}", cert.body);
    assert!(cert.body.starts_with(b"-----BEGIN CERTIFICATE-----"));
    // The operator's token covers everything.
    let ops = [("authorization", "Bearer ops-token")];
    let as_ops = request(addr, "GET", api_config, &ops, b"").await;
    assert_eq!(as_ops.status, 200);

    // Open routes need no token.
    for open in ["/v1/services", "/healthz", "/readyz", "/metrics"] {
        assert_eq!(get(addr, open).await.status, 200, "{open}");
    }
    // (The test's Discover has its own registry; the token metrics are on `registry`.)
    let text = || {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    };
    let metrics = text();
    assert!(
        metrics.contains("sidemesh_discover_auth_failures_total{reason=\"forbidden\"} 2"),
        "{metrics}"
    );
    assert!(!metrics.contains("web-token"));

    // Widen web's token to the whole namespace: api's config opens within a second or so.
    write("\"demo/*\"");
    eventually(Duration::from_secs(5), async || {
        request(addr, "GET", api_config, &web, b"").await.status == 200
    })
    .await;
    // A broken edit keeps the last good tokens.
    std::fs::write(
        &file,
        "tokens: [{sha256: nothex, identities: [demo/web]}]\n",
    )
    .unwrap();
    eventually(Duration::from_secs(5), async || {
        text().contains("sidemesh_discover_token_reloads_total{result=\"failed\"} 1")
    })
    .await;
    let still = request(addr, "GET", api_config, &web, b"").await;
    assert_eq!(still.status, 200);
}
