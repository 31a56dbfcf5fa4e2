//! End-to-end test of mutual TLS with the built binary: `sidemesh discover` (strict mode,
//! CA generated in its data directory) and three `sidemesh proxy` processes on loopback.
//! `shop/api` allows only `shop/web`: `shop/evil`'s call gets a 403 naming it, web's goes
//! through over mTLS, and plaintext to api's inbound port is closed unanswered.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::{
    Sidemesh, eventually, free_port, metric, start_discover, wait_ready_with_certificate,
};

const WAIT: Duration = Duration::from_secs(20);

fn loopback(salt: u32) -> Ipv4Addr {
    let n = std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(salt * 7919);
    let b = n.to_le_bytes();
    Ipv4Addr::new(127, 2 + b[0] % 240, 1 + b[1] % 250, 2 + b[2] % 250)
}

/// One HTTP/1.1 GET; the whole answer (empty when the peer closed without one).
fn http_get(addr: &str, path: &str) -> String {
    common::http_get(addr, path).1
}

/// Waits until every sidecar answers `/ready` 200 and holds a certificate.
fn wait_ready(sidecars: &[&Sidemesh]) {
    for p in sidecars {
        wait_ready_with_certificate(&p.addr("admin"), WAIT);
    }
}

fn proxy(discover: &str, service: &str, ip: Ipv4Addr) -> Sidemesh {
    let url = format!("http://{discover}/v1/sidecars/shop/{service}/sidemesh-proxy");
    Sidemesh::start(
        &[
            "proxy",
            "--admin",
            "127.0.0.1:0",
            "--inbound-address",
            &ip.to_string(),
            "--app-address",
            &ip.to_string(),
            "--drain-timeout",
            "1s",
        ],
        &[("DISCOVER_URL", url.as_str())],
    )
}

#[test]
fn strict_mutual_tls_and_allow_clients_through_the_built_binary() {
    let (api_ip, web_ip, evil_ip) = (loopback(1), loopback(2), loopback(3));
    let (app_port, outer) = (free_port(api_ip), free_port(api_ip));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.yaml");
    std::fs::write(
        &state,
        format!(
            "services:
  - {{namespace: shop, name: api, ports: [{{port: {app_port}, port_outer: {outer}, protocol: http1}}],
     allow_clients: [shop/web], instances: [{{address: {api_ip}, meshed: true}}]}}
  - {{namespace: shop, name: web, use_services: [{{service: api}}]}}
  - {{namespace: shop, name: evil, use_services: [{{service: api}}]}}
"
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let discover = start_discover(&state, &data, &["--mesh-tls", "strict"], &[]);
    let d = discover.addr("listen");
    assert!(data.join("ca.crt").exists() && data.join("ca.key").exists());
    let _app = Sidemesh::start(
        &[
            "demo-backend",
            "--listen",
            &format!("{api_ip}:{app_port}"),
            "--name",
            "api-1",
        ],
        &[],
    );
    let api = proxy(&d, "api", api_ip);
    // web and evil both listen on the address discover gave `api` (in a pod each has its
    // own loopback); on one host they take turns: evil first.
    let mut evil = proxy(&d, "evil", evil_ip);
    wait_ready(&[&api, &evil]);
    let config = http_get(&d, "/v1/sidecars/shop/web/sidemesh-proxy");
    let json: serde_json::Value =
        serde_json::from_str(config.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(json["tls"]["mode"], "strict");
    let svc = format!(
        "{}:{app_port}",
        json["outbound"][0]["address"].as_str().unwrap()
    );
    let refused = http_get(&svc, "/");
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.contains("shop/evil"), "{refused}");
    assert!(evil.terminate(WAIT).is_some_and(|s| s.success()));

    let web = proxy(&d, "web", web_ip);
    wait_ready(&[&web]);
    let ok = eventually(WAIT, || {
        let r = http_get(&svc, "/");
        r.starts_with("HTTP/1.1 200").then_some(r)
    })
    .expect("web gets through");
    assert!(ok.contains("api-1"), "{ok}");
    let admin = api.addr("admin");
    let inbound_tls = metric(
        &admin,
        "sidemesh_proxy_tls_connections_total{direction=\"inbound\"} ",
    );
    assert!(inbound_tls.unwrap_or(0.0) >= 1.0);
    // Plaintext straight to api's inbound port: strict mode closes it unanswered.
    let plain = http_get(&format!("{api_ip}:{outer}"), "/");
    assert_eq!(plain, "", "strict mode answered plaintext");
    let denied = metric(
        &admin,
        "sidemesh_proxy_authz_denied_total{direction=\"inbound\",reason=\"plaintext\",service=\"shop/api\"} ",
    );
    assert_eq!(denied, Some(1.0));
    let refused = metric(
        &admin,
        "sidemesh_proxy_authz_denied_total{direction=\"inbound\",reason=\"not_allowed\",service=\"shop/api\"} ",
    );
    assert_eq!(refused, Some(1.0));
    drop(web);
}
