//! Mutual TLS between two sidecars on real loopback sockets: certificates from a CSR
//! signer standing in for discover, HTTP and TCP over mTLS, `allow_clients` allowing one
//! client service and refusing another, permissive and strict modes, and renewal.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use sidemesh_proxy::ProxyConfig;
use sidemesh_proxy::http2::Engine;
use sidemesh_proxy::tls::MeshTls;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// A CA that signs whatever a CSR asks for, for `ttl`: discover's signer, minus its
/// identity check (tested in discover).
struct Signer {
    ca_pem: String,
    addr: SocketAddr,
    /// The CA it signs with (see [`Signer::adopt`]).
    issuer: Arc<std::sync::Mutex<Arc<rcgen::Issuer<'static, rcgen::KeyPair>>>>,
    _stop: CancellationToken,
}

impl Signer {
    /// Signs with `other`'s CA from now on, as discover does once a rotation's next CA
    /// takes over signing.
    fn adopt(&self, other: &Signer) {
        let next = other.issuer.lock().unwrap().clone();
        *self.issuer.lock().unwrap() = next;
    }
}

async fn signer(ttl: Duration) -> Signer {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_pem = p.self_signed(&key).unwrap().pem();
    let issuer = Arc::new(std::sync::Mutex::new(Arc::new(rcgen::Issuer::new(p, key))));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let signing = issuer.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                r = l.accept() => r.unwrap(),
                _ = s.cancelled() => return,
            };
            let signing = signing.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        // Per request: the client may keep its connection across an adopt.
                        let issuer = signing.lock().unwrap().clone();
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let csr = rcgen::CertificateSigningRequestParams::from_pem(
                                std::str::from_utf8(&body).unwrap(),
                            )
                            .unwrap();
                            let mut params = csr.params.clone();
                            let now = time::OffsetDateTime::now_utc();
                            params.not_before = now - time::Duration::seconds(1);
                            params.not_after = now + ttl;
                            let cert = params.signed_by(&csr.public_key, &issuer).unwrap();
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(
                                cert.pem(),
                            ))))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Signer {
        ca_pem,
        addr,
        issuer,
        _stop: stop,
    }
}

/// A sidecar run in-process whose identity task gets certificates from `signer`.
struct Sidecar {
    running: Running,
    tls: Arc<MeshTls>,
}

impl std::ops::Deref for Sidecar {
    type Target = Running;
    fn deref(&self) -> &Running {
        &self.running
    }
}

impl Sidecar {
    async fn start(signer: &Signer, service: &str, config: ProxyConfig, json: &Value) -> Sidecar {
        let url = format!(
            "http://{}/v1/sidecars/shop/{service}/sidemesh-proxy",
            signer.addr
        );
        let poster = sidemesh_api::Client::new(
            sidemesh_api::ClientConfig::new(url),
            &prometheus::Registry::new(),
        )
        .unwrap()
        .poster()
        .unwrap();
        let (running, tls, configs) = spawn(config);
        tokio::spawn(sidemesh_proxy::tls::run_identity(
            tls.clone(),
            poster,
            configs,
            running.shutdown.clone(),
        ));
        let sc = Sidecar { running, tls };
        sc.set(json).await;
        assert!(
            eventually(|| sc.tls.credentials().is_some()).await,
            "no certificate"
        );
        sc
    }
}

fn tls(signer: &Signer, mode: &str) -> Value {
    json!({"mode": mode, "trust_bundle_pem": signer.ca_pem, "csr_url": "sidemesh-proxy/certificate"})
}

/// The server side: `shop/api` in front of an app at `app`, inbound on `ip:port_outer`.
fn server_config(
    version: u64,
    signer: &Signer,
    app: SocketAddr,
    port_outer: u16,
    protocol: &str,
    mode: &str,
    allow: Option<Value>,
) -> Value {
    let mut port = json!({"port": app.port(), "port_outer": port_outer, "protocol": protocol});
    if let Some(a) = allow {
        port["allow_clients"] = a;
    }
    json!({
        "version": version,
        "identity": {"namespace": "shop", "service": "api", "plugin": "sidemesh-proxy"},
        "inbound": [port],
        "tls": tls(signer, mode),
    })
}

/// A client side: `shop/<service>` calling `shop/api` at `svc:80` through the server's
/// inbound listener (a meshed endpoint).
fn client_config(
    signer: &Signer,
    service: &str,
    svc: Ipv4Addr,
    server: SocketAddr,
    protocol: &str,
) -> Value {
    json!({
        "version": 1,
        "identity": {"namespace": "shop", "service": service, "plugin": "sidemesh-proxy"},
        "outbound": [{"name": "api", "namespace": "shop", "address": svc.to_string(),
            "ports": [{"port": 80, "protocol": protocol, "endpoints": [
                {"address": server.ip().to_string(), "port": server.port(), "meshed": true}]}],
            "retry": {"attempts": 0}}],
        "tls": tls(signer, "permissive"),
    })
}

fn config_at(ip: Ipv4Addr, app: Ipv4Addr) -> ProxyConfig {
    ProxyConfig {
        inbound_address: ip.into(),
        app_address: app.into(),
        drain_timeout: Duration::from_secs(2),
        ..ProxyConfig::default()
    }
}

struct Mesh {
    signer: Signer,
    server: Sidecar,
    web: Sidecar,
    _evil: Sidecar,
    web_svc: Ipv4Addr,
    evil_svc: Ipv4Addr,
    inbound: SocketAddr,
}

async fn mesh(protocol: &str, app: SocketAddr, allow: Option<Value>) -> Mesh {
    let signer = signer(Duration::from_secs(3600)).await;
    let server_ip = loopback();
    let port_outer = free_port(server_ip);
    let inbound = SocketAddr::new(server_ip.into(), port_outer);
    let Some(app_ip) = (match app.ip() {
        std::net::IpAddr::V4(v4) => Some(v4),
        _ => None,
    }) else {
        unreachable!()
    };
    let server = Sidecar::start(
        &signer,
        "api",
        config_at(server_ip, app_ip),
        &server_config(1, &signer, app, port_outer, protocol, "permissive", allow),
    )
    .await;
    let (web_svc, evil_svc) = (loopback(), loopback());
    let web = Sidecar::start(
        &signer,
        "web",
        config_at(loopback(), app_ip),
        &client_config(&signer, "web", web_svc, inbound, protocol),
    )
    .await;
    let evil = Sidecar::start(
        &signer,
        "evil",
        config_at(loopback(), app_ip),
        &client_config(&signer, "evil", evil_svc, inbound, protocol),
    )
    .await;
    Mesh {
        signer,
        server,
        web,
        _evil: evil,
        web_svc,
        evil_svc,
        inbound,
    }
}

/// The client identity the app saw for a request through the sidecar listening on `svc`
/// that carried a forged one.
async fn identity_seen(
    c: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    svc: Ipv4Addr,
) -> String {
    let resp = c
        .request(
            hyper::Request::get(format!("http://{svc}/"))
                .header("x-sidemesh-client-id", "ops/admin")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.headers()["echo-x-sidemesh-client-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn http_over_mutual_tls_with_allow_clients() {
    let app_ip = loopback();
    let be = backend(app_ip, "api").await;
    let m = mesh("http1", be.addr, Some(json!(["shop/web"]))).await;
    let c = h1_client();

    // The allowed client gets through; the app sees its verified identity, not the
    // forged one its app tried to send.
    assert_eq!(identity_seen(&c, m.web_svc).await, "shop/web");
    assert!(
        m.server.counter(
            "sidemesh_proxy_tls_connections_total",
            &[("direction", "inbound")]
        ) >= 1
    );
    assert!(
        m.web.counter(
            "sidemesh_proxy_tls_connections_total",
            &[("direction", "outbound")]
        ) >= 1
    );

    // The same over HTTP/1.1 between the sidecars (no mesh_h2): the inbound sidecar's
    // lean HTTP/1.1 engine sets the identity and drops the forged one.
    let svc1 = loopback();
    let _web1 = Sidecar::start(
        &m.signer,
        "web",
        ProxyConfig {
            mesh_h2: false,
            ..config_at(loopback(), app_ip)
        },
        &client_config(&m.signer, "web", svc1, m.inbound, "http1"),
    )
    .await;
    assert_eq!(identity_seen(&c, svc1).await, "shop/web");

    // Another mesh service is refused with a 403 that says who and why.
    let (status, _, body) = get(&c, &format!("http://{}/", m.evil_svc), &[]).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("shop/evil") && body.contains("allow_clients"),
        "{body}"
    );
    // A plaintext client (no identity) is refused too while the list is present.
    let (status, _, body) = get(&c, &format!("http://{}/", m.inbound), &[]).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("no identity"), "{body}");
    let denied = |reason| {
        m.server.counter(
            "sidemesh_proxy_authz_denied_total",
            &[
                ("direction", "inbound"),
                ("service", "shop/api"),
                ("reason", reason),
            ],
        )
    };
    assert_eq!(denied("not_allowed"), 1);
    assert_eq!(denied("no_identity"), 1);
    // A handshake record followed by garbage: closed, counted, and nothing else breaks.
    let mut s = TcpStream::connect(m.inbound).await.unwrap();
    s.write_all(b"\x16\x03\x01\x00\x05hello-not-tls")
        .await
        .unwrap();
    assert!(
        closed_in_time(&mut s).await,
        "a bad handshake was not closed"
    );
    assert!(
        eventually(|| m.server.counter(
            "sidemesh_proxy_tls_handshake_failures_total",
            &[("direction", "inbound")]
        ) == 1)
        .await
    );
    assert_eq!(be.hits.load(std::sync::atomic::Ordering::Relaxed), 2);
}

async fn echo_server(ip: Ipv4Addr) -> SocketAddr {
    raw_server(ip, |mut s: TcpStream| async move {
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    })
    .await
}

/// Writes `msg` and reads until the echo is complete, the peer closes, or 5 s pass.
async fn echo(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return Vec::new();
    };
    let _ = s.write_all(msg).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.len() < msg.len() {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    got
}

#[tokio::test]
async fn tcp_over_mutual_tls_with_allow_clients() {
    let app_ip = loopback();
    let app = echo_server(app_ip).await;
    let m = mesh("tcp", app, Some(json!(["shop/*"]))).await;
    assert_eq!(
        echo(SocketAddr::new(m.web_svc.into(), 80), b"hello mesh").await,
        b"hello mesh"
    );
    assert!(
        m.server.counter(
            "sidemesh_proxy_tls_connections_total",
            &[("direction", "inbound")]
        ) >= 1
    );
    // shop/* allows shop/evil as well; a tighter list closes its connection.
    m.server
        .set(&server_config(
            2,
            &m.signer,
            app,
            m.inbound.port(),
            "tcp",
            "permissive",
            Some(json!(["shop/web"])),
        ))
        .await;
    assert_eq!(
        echo(SocketAddr::new(m.evil_svc.into(), 80), b"let me in").await,
        b""
    );
    assert_eq!(
        echo(SocketAddr::new(m.web_svc.into(), 80), b"still ok").await,
        b"still ok"
    );
    assert_eq!(
        m.server.counter(
            "sidemesh_proxy_authz_denied_total",
            &[("reason", "not_allowed")]
        ),
        1
    );
}

/// A plaintext request to `url` gets no answer: the strict listener closes the connection.
async fn assert_plaintext_refused(
    c: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    url: &str,
) {
    let r = tokio::time::timeout(
        WAIT,
        c.request(
            hyper::Request::get(url)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert!(
        r.is_err(),
        "strict mode answered plaintext at {url}: {:?}",
        r.map(|r| r.status())
    );
}

#[tokio::test]
async fn permissive_accepts_plaintext_and_strict_refuses_it() {
    let app_ip = loopback();
    let be = backend(app_ip, "api").await;
    let m = mesh("http1", be.addr, None).await;
    let c = h1_client();
    let plain = format!("http://{}/", m.inbound);
    let (status, _, _) = get(&c, &plain, &[]).await;
    assert_eq!(status, 200);
    m.server
        .set(&server_config(
            2,
            &m.signer,
            be.addr,
            m.inbound.port(),
            "http1",
            "strict",
            None,
        ))
        .await;
    // A fresh client: a pooled plaintext connection would be an old one.
    let fresh = h1_client();
    assert_plaintext_refused(&fresh, &plain).await;
    assert_eq!(
        m.server.counter(
            "sidemesh_proxy_authz_denied_total",
            &[("reason", "plaintext")]
        ),
        1
    );
    // Sidecars still get through over mutual TLS.
    let (status, _, _) = get(&fresh, &format!("http://{}/", m.evil_svc), &[]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn tls_mode_per_port_strict_port_refuses_plaintext_permissive_port_takes_it() {
    // Three ports of one sidecar: strict, permissive, and disabled.
    let app_ip = loopback();
    let (strict_app, open_app, plain_app) = (
        backend(app_ip, "api").await,
        backend(app_ip, "api").await,
        backend(app_ip, "api").await,
    );
    let signer = signer(Duration::from_secs(3600)).await;
    let server_ip = loopback();
    let strict = SocketAddr::new(server_ip.into(), free_port(server_ip));
    let open = SocketAddr::new(server_ip.into(), free_port(server_ip));
    let plain = SocketAddr::new(server_ip.into(), free_port(server_ip));
    // The config turns TLS off; the ports' own modes override it (and still get the
    // sidecar a certificate: `Sidecar::start` waits for one).
    let server = Sidecar::start(
        &signer,
        "api",
        config_at(server_ip, app_ip),
        &json!({
            "version": 1,
            "identity": {"namespace": "shop", "service": "api", "plugin": "sidemesh-proxy"},
            "inbound": [
                {"port": strict_app.addr.port(), "port_outer": strict.port(), "protocol": "http1",
                 "tls_mode": "strict"},
                {"port": open_app.addr.port(), "port_outer": open.port(), "protocol": "http1",
                 "tls_mode": "permissive"},
                {"port": plain_app.addr.port(), "port_outer": plain.port(), "protocol": "http1",
                 "tls_mode": "disabled"},
            ],
            "tls": tls(&signer, "disabled"),
        }),
    )
    .await;
    let c = h1_client();
    let (status, _, _) = get(&c, &format!("http://{open}/"), &[]).await;
    assert_eq!(status, 200, "the permissive port refused plaintext");
    assert_plaintext_refused(&h1_client(), &format!("http://{strict}/")).await;
    assert_eq!(
        server.counter(
            "sidemesh_proxy_authz_denied_total",
            &[("reason", "plaintext")]
        ),
        1
    );
    // A sidecar gets through the strict port over mutual TLS, and through the disabled
    // port in plaintext (discover renders that port's endpoints as not meshed).
    let (svc, svc_plain) = (loopback(), loopback());
    let mut web_json = client_config(&signer, "web", svc, strict, "http1");
    web_json["outbound"].as_array_mut().unwrap().push(json!(
        {"name": "api-plain", "namespace": "shop", "address": svc_plain.to_string(),
         "ports": [{"port": 80, "protocol": "http1", "endpoints": [
            {"address": plain.ip().to_string(), "port": plain.port(), "meshed": false}]}],
         "retry": {"attempts": 0}}
    ));
    let _web = Sidecar::start(&signer, "web", config_at(loopback(), app_ip), &web_json).await;
    let (status, _, _) = get(&c, &format!("http://{svc}/"), &[]).await;
    assert_eq!(status, 200);
    let (status, _, _) = get(&c, &format!("http://{svc_plain}/"), &[]).await;
    assert_eq!(
        status, 200,
        "the disabled port refused a plaintext sidecar hop"
    );
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(strict_app.hits.load(Relaxed), 1);
    assert_eq!(open_app.hits.load(Relaxed), 1);
    assert_eq!(plain_app.hits.load(Relaxed), 1);
}

/// Two sidecars during a CA rotation: `api` (server) and `web` (its client), one with a
/// certificate of the old CA and one of the new, both trusting both; `web` has called `api`
/// once over mutual TLS (its connection stays pooled).
struct Rotation {
    /// The HTTP client of the first request (its connection to `web` stays pooled).
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    old: Signer,
    new: Signer,
    be: Backend,
    server: Sidecar,
    web: Sidecar,
    server_json: Value,
    web_json: Value,
    url: String,
}

/// `with_bundle(config, version, bundle)`: `config` at `version` trusting `bundle`.
fn with_bundle(mut config: Value, version: u64, bundle: &str) -> Value {
    config["version"] = json!(version);
    config["tls"]["trust_bundle_pem"] = json!(bundle);
    config
}

impl Rotation {
    /// Starts the pair: the server's certificate from the new CA when `server_new`, else
    /// from the old one (and the client's from the other).
    async fn start(server_new: bool) -> Rotation {
        Rotation::start_with(server_new, Duration::from_secs(3600), true).await
    }

    /// [`Rotation::start`] with the old CA's certificates valid for `old_ttl` (renewed
    /// two thirds of the way), and `web` carrying HTTP/1.1 over HTTP/2 (`mesh_h2`) or not.
    async fn start_with(server_new: bool, old_ttl: Duration, mesh_h2: bool) -> Rotation {
        let app_ip = loopback();
        let be = backend(app_ip, "api").await;
        let (old, new) = (
            signer(old_ttl).await,
            signer(Duration::from_secs(3600)).await,
        );
        let (server_ca, web_ca) = if server_new {
            (&new, &old)
        } else {
            (&old, &new)
        };
        let overlap = format!("{}{}", new.ca_pem, old.ca_pem);
        let server_ip = loopback();
        let port_outer = free_port(server_ip);
        let inbound = SocketAddr::new(server_ip.into(), port_outer);
        let server_json = server_config(1, server_ca, be.addr, port_outer, "http1", "strict", None);
        let server = Sidecar::start(
            server_ca,
            "api",
            config_at(server_ip, app_ip),
            &with_bundle(server_json.clone(), 1, &overlap),
        )
        .await;
        let svc = loopback();
        let web_json = client_config(web_ca, "web", svc, inbound, "http1");
        let web = Sidecar::start(
            web_ca,
            "web",
            ProxyConfig {
                mesh_h2,
                ..config_at(loopback(), app_ip)
            },
            &with_bundle(web_json.clone(), 1, &overlap),
        )
        .await;
        let url = format!("http://{svc}/");
        let client = h1_client();
        let (status, _, body) = get(&client, &url, &[]).await;
        assert_eq!(status, 200, "old and new CA during the overlap: {body}");
        Rotation {
            client,
            old,
            new,
            be,
            server,
            web,
            server_json,
            web_json,
            url,
        }
    }

    /// Certificates issued to `s` so far.
    fn issued(s: &Sidecar) -> u64 {
        s.counter(
            "sidemesh_proxy_tls_certificate_requests_total",
            &[("result", "issued")],
        )
    }
}

/// CA rotation: a sidecar whose certificate comes from the old CA and one whose
/// certificate comes from the new CA talk while both trust both CAs, and stop being able
/// to once the old CA leaves the trust bundle (each picks the new bundle up from its next
/// config, without a restart, and asks for a certificate again).
#[tokio::test]
async fn old_and_new_ca_talk_during_the_overlap_and_not_after() {
    let r = Rotation::start(false).await;
    let (server, web) = (&r.server, &r.web);
    // The old CA is dropped from both bundles.
    let before = (Rotation::issued(server), Rotation::issued(web));
    server
        .set(&with_bundle(r.server_json.clone(), 2, &r.new.ca_pem))
        .await;
    web.set(&with_bundle(r.web_json.clone(), 2, &r.new.ca_pem))
        .await;
    assert!(
        eventually(|| Rotation::issued(server) > before.0 && Rotation::issued(web) > before.1)
            .await,
        "the new trust bundle did not make the sidecars ask for certificates again"
    );
    let failures = |s: &Sidecar, dir| {
        s.counter(
            "sidemesh_proxy_tls_handshake_failures_total",
            &[("direction", dir)],
        )
    };
    let (status, _, body) = get(&h1_client(), &r.url, &[]).await;
    assert!(status >= 500, "old CA still trusted: {status} {body}");
    assert!(failures(web, "outbound") + failures(server, "inbound") >= 1);
    assert_eq!(r.be.hits.load(std::sync::atomic::Ordering::Relaxed), 1);
    drop(r.old);
}

/// A connection that is already open does not outlive the CA it was trusted by: the
/// server drops the old CA (the client, with an old-CA certificate, has not applied
/// anything and still holds its pooled connection) and the next request on it fails.
#[tokio::test]
async fn an_open_connection_from_a_dropped_ca_is_closed() {
    let r = Rotation::start(true).await;
    let before = Rotation::issued(&r.server);
    r.server
        .set(&with_bundle(r.server_json.clone(), 2, &r.new.ca_pem))
        .await;
    assert!(eventually(|| Rotation::issued(&r.server) > before).await);
    let (status, _, body) = get(&h1_client(), &r.url, &[]).await;
    assert!(status >= 500, "a dropped CA still trusted: {status} {body}");
    assert_eq!(r.be.hits.load(std::sync::atomic::Ordering::Relaxed), 1);
    // The client still trusts the server: only the server's side cut it.
    assert_eq!(Rotation::issued(&r.web), 1);
    drop(r.old);
}

/// The other half of a rotation: the client's certificate is reissued by the next CA while
/// its pooled connection (opened with the old-CA certificate, and reused) is still there.
/// That connection takes no new request after the reissue, so the server dropping the old
/// CA afterwards cuts nothing in use: the next request rides a new connection and succeeds.
/// Both hops: HTTP/1.1 over one HTTP/2 connection (`mesh_h2`), and HTTP/1.1 as it is
/// (there a bodiless request cut that way was already sent again on a new connection, so
/// only the `mesh_h2` case failed before connections were retired).
#[tokio::test]
async fn a_reissued_certificate_retires_the_pooled_connections_of_the_old_one() {
    let (over_h2, plain_h1) = tokio::join!(reissue_retires(true), reissue_retires(false));
    assert_eq!(over_h2, 200, "mesh_h2");
    assert_eq!(plain_h1, 200, "HTTP/1.1 between the sidecars");
}

/// The status of a request after the reissue and the old CA's removal (see above).
async fn reissue_retires(mesh_h2: bool) -> u16 {
    let r = Rotation::start_with(true, Duration::from_secs(3), mesh_h2).await;
    let handshakes = || {
        r.server.counter(
            "sidemesh_proxy_tls_connections_total",
            &[("direction", "inbound")],
        )
    };
    let opened = handshakes();
    // `web` renews every two seconds; from now on from the new CA. Two renewals: the first
    // may have been signed before the switch.
    r.old.adopt(&r.new);
    let before = Rotation::issued(&r.web);
    assert!(
        eventually(|| Rotation::issued(&r.web) >= before + 2).await,
        "web was not issued a certificate of the new CA"
    );
    let before = Rotation::issued(&r.server);
    r.server
        .set(&with_bundle(r.server_json.clone(), 2, &r.new.ca_pem))
        .await;
    assert!(eventually(|| Rotation::issued(&r.server) > before).await);
    // The client connection to `web` is the one of the first request (pooled by the
    // client): `web` must not keep the upstream connection it held for it either.
    let (status, _, body) = get(&r.client, &r.url, &[]).await;
    if status != 200 {
        eprintln!("mesh_h2 {mesh_h2}: a request rode a connection of the old certificate: {body}");
        return status;
    }
    assert!(handshakes() > opened, "no new connection after the reissue");
    assert_eq!(r.be.hits.load(std::sync::atomic::Ordering::Relaxed), 2);
    status
}

#[tokio::test]
async fn certificates_are_renewed_before_they_expire() {
    // Three-second certificates: renewed at two seconds, again and again.
    let signer = signer(Duration::from_secs(3)).await;
    let ip = loopback();
    let sc = Sidecar::start(
        &signer,
        "api",
        config_at(ip, ip),
        &json!({"version": 1, "identity": {"namespace": "shop", "service": "api", "plugin": "sidemesh-proxy"},
                "tls": tls(&signer, "permissive")}),
    )
    .await;
    let first = sc.tls.credentials().unwrap().not_after;
    assert!(
        eventually(|| sc.tls.credentials().is_some_and(|c| c.not_after > first)).await,
        "not renewed"
    );
    assert!(
        sc.counter(
            "sidemesh_proxy_tls_certificate_requests_total",
            &[("result", "issued")]
        ) >= 2
    );
    // Turning TLS off drops the certificate.
    sc.set(&json!({"version": 2, "identity": {"namespace": "shop", "service": "api", "plugin": "sidemesh-proxy"}}))
        .await;
    assert!(eventually(|| sc.tls.credentials().is_none()).await);
}

/// HTTP/1.1 from a client sidecar with `mesh_h2` to an app behind an inbound sidecar whose
/// HTTP/2 engine is `engine`: the app gets HTTP/1.1 with the client's Host, and every request
/// rides one mutual TLS connection.
async fn mesh_h2_hop(signer: &Signer, app_ip: Ipv4Addr, app: SocketAddr, engine: Engine) {
    let server_ip = loopback();
    let port_outer = free_port(server_ip);
    let inbound = SocketAddr::new(server_ip.into(), port_outer);
    let _server = Sidecar::start(
        signer,
        "api",
        ProxyConfig {
            http2_engine: engine,
            ..config_at(server_ip, app_ip)
        },
        &server_config(1, signer, app, port_outer, "http1", "permissive", None),
    )
    .await;
    let svc = loopback();
    let web = Sidecar::start(
        signer,
        "web",
        ProxyConfig {
            mesh_h2: true,
            ..config_at(loopback(), app_ip)
        },
        &client_config(signer, "web", svc, inbound, "http1"),
    )
    .await;
    let c = h1_client();
    let url = format!("http://{svc}/");
    let (status, _, body) = get(&c, &url, &[("host", "api.shop")]).await;
    assert_eq!(status, 200, "{engine:?}");
    // The app got HTTP/1.1 with the client's Host, after an HTTP/2 hop.
    assert_eq!(body, "HTTP/1.1 api.shop", "{engine:?}");
    let many: Vec<_> = (0..20)
        .map(|_| {
            let (c, url) = (h1_client(), url.clone());
            tokio::spawn(async move { get(&c, &url, &[]).await.0 })
        })
        .collect();
    for r in many {
        assert_eq!(r.await.unwrap(), 200, "{engine:?}");
    }
    // Twenty-one requests, most of them concurrent, over one mutual TLS connection.
    assert_eq!(
        web.counter(
            "sidemesh_proxy_tls_connections_total",
            &[("direction", "outbound")]
        ),
        1,
        "{engine:?}"
    );
}

#[tokio::test]
async fn http1_rides_one_http2_connection_between_sidecars_with_mesh_h2() {
    let app_ip = loopback();
    // The app answers with the HTTP version and Host it was given.
    let be = backend_with(
        app_ip,
        Arc::new(|req: hyper::Request<hyper::body::Incoming>| {
            Box::pin(async move {
                let host = req
                    .headers()
                    .get("host")
                    .map(|h| h.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                hyper::Response::new(Full::new(Bytes::from(format!(
                    "{:?} {host}",
                    req.version()
                ))))
            })
        }),
    )
    .await;
    let signer = signer(Duration::from_secs(3600)).await;
    // The inbound sidecar serves the HTTP/2 hop with either HTTP/2 engine.
    for engine in [Engine::Lean, Engine::Hyper] {
        mesh_h2_hop(&signer, app_ip, be.addr, engine).await;
    }
    // With the switch off, the hop is HTTP/1.1 keep-alive: one connection per request in
    // flight.
    let server_ip = loopback();
    let port_outer = free_port(server_ip);
    let inbound = SocketAddr::new(server_ip.into(), port_outer);
    let _server = Sidecar::start(
        &signer,
        "api",
        config_at(server_ip, app_ip),
        &server_config(1, &signer, be.addr, port_outer, "http1", "permissive", None),
    )
    .await;
    let svc1 = loopback();
    let web1 = Sidecar::start(
        &signer,
        "web",
        ProxyConfig {
            mesh_h2: false,
            ..config_at(loopback(), app_ip)
        },
        &client_config(&signer, "web", svc1, inbound, "http1"),
    )
    .await;
    let url1 = format!("http://{svc1}/");
    let many: Vec<_> = (0..20)
        .map(|_| {
            let (c, url) = (h1_client(), url1.clone());
            tokio::spawn(async move { get(&c, &url, &[]).await })
        })
        .collect();
    for r in many {
        let (status, _, body) = r.await.unwrap();
        assert_eq!((status, body.starts_with("HTTP/1.1")), (200, true));
    }
    assert!(
        web1.counter(
            "sidemesh_proxy_tls_connections_total",
            &[("direction", "outbound")]
        ) > 1
    );
}
