//! End-to-end tests of mutual TLS with the built binary: `sidemesh discover` (strict mode,
//! CA generated in its data directory) and `sidemesh proxy` processes on loopback.
//! `shop/api` allows only `shop/web`: `shop/evil`'s call gets a 403 naming it, web's goes
//! through over mTLS, and plaintext to api's inbound port is closed unanswered. And the
//! mesh CA rotates, without a restart, under steady traffic that loses no request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// A state file in `dir`: `shop/api` (meshed, at `ip`, app port `port` behind
/// `port_outer` `outer`, allowing only `shop/web`) and the `clients` of it (in `shop`).
fn write_state(
    dir: &std::path::Path,
    ip: Ipv4Addr,
    port: u16,
    outer: u16,
    clients: &[&str],
) -> std::path::PathBuf {
    let mut state = format!(
        "services:
  - {{namespace: shop, name: api, ports: [{{port: {port}, port_outer: {outer}, protocol: http1}}],
     allow_clients: [shop/web], instances: [{{address: {ip}, meshed: true}}]}}
"
    );
    for c in clients {
        state.push_str(&format!(
            "  - {{namespace: shop, name: {c}, use_services: [{{service: api}}]}}\n"
        ));
    }
    let path = dir.join("state.yaml");
    std::fs::write(&path, state).unwrap();
    path
}

/// The demo backend `api-1` on `ip:port` (api's app).
fn app(ip: Ipv4Addr, port: u16) -> Sidemesh {
    Sidemesh::start(
        &[
            "demo-backend",
            "--listen",
            &format!("{ip}:{port}"),
            "--name",
            "api-1",
        ],
        &[],
    )
}

/// The config discover at `d` serves to `shop/web`'s sidecar.
fn web_config(d: &str) -> serde_json::Value {
    let config = http_get(d, "/v1/sidecars/shop/web/sidemesh-proxy");
    serde_json::from_str(config.split_once("\r\n\r\n").unwrap().1).unwrap()
}

#[test]
fn strict_mutual_tls_and_allow_clients_through_the_built_binary() {
    let (api_ip, web_ip, evil_ip) = (loopback(1), loopback(2), loopback(3));
    let (app_port, outer) = (free_port(api_ip), free_port(api_ip));
    let dir = tempfile::tempdir().unwrap();
    let state = write_state(dir.path(), api_ip, app_port, outer, &["web", "evil"]);
    let data = dir.path().join("data");
    let discover = start_discover(&state, &data, &["--mesh-tls", "strict"], &[]);
    let d = discover.addr("listen");
    assert!(data.join("ca.crt").exists() && data.join("ca.key").exists());
    let _app = app(api_ip, app_port);
    let api = proxy(&d, "api", api_ip);
    // web and evil both listen on the address discover gave `api` (in a pod each has its
    // own loopback); on one host they take turns: evil first.
    let mut evil = proxy(&d, "evil", evil_ip);
    wait_ready(&[&api, &evil]);
    let json = web_config(&d);
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

/// The number of certificates the sidecar at `admin` has installed.
fn certificates_issued(admin: &str) -> f64 {
    metric(
        admin,
        "sidemesh_proxy_tls_certificate_requests_total{result=\"issued\"} ",
    )
    .unwrap_or(0.0)
}

/// Waits until every sidecar installed a certificate after `before` (its count then).
fn wait_new_certificates(sidecars: &[(&str, f64)], step: &str) {
    for (admin, before) in sidecars {
        eventually(WAIT, || {
            (certificates_issued(admin) > *before).then_some(())
        })
        .unwrap_or_else(|| panic!("{step}: the sidecar at {admin} got no new certificate"));
    }
}

/// The mesh CA rotates while web calls api without a pause, as docs/discover-http.md
/// describes, with nothing restarted: (1) the next CA joins the trust bundle beside the
/// old one (`--ca-trust-extra`), (2) the data directory's `ca.crt`/`ca.key` are replaced
/// by the next CA, which signs from then on, (3) the old CA leaves the bundle, so a
/// certificate of the old CA is refused from then on. Each step ends when both sidecars
/// installed the certificate that comes with the new bundle. No request fails, and after
/// step 3 the sidecars still reach each other: they hold certificates of the next CA.
#[test]
fn the_mesh_ca_rotates_without_a_restart_or_a_failed_request() {
    let (api_ip, web_ip) = (loopback(11), loopback(12));
    let (app_port, outer) = (free_port(api_ip), free_port(api_ip));
    let dir = tempfile::tempdir().unwrap();
    let state = write_state(dir.path(), api_ip, app_port, outer, &["web"]);
    // The next CA: the one a throwaway discover generates in its own data directory.
    let next = dir.path().join("next");
    drop(start_discover(
        &state,
        &next,
        &["--mesh-tls", "strict"],
        &[],
    ));
    let read = |p: std::path::PathBuf| std::fs::read_to_string(&p).unwrap();
    let (next_crt, next_key) = (read(next.join("ca.crt")), read(next.join("ca.key")));

    let data = dir.path().join("data");
    let extra = dir.path().join("extra.pem");
    std::fs::write(&extra, "").unwrap();
    let discover = start_discover(
        &state,
        &data,
        &[
            "--mesh-tls",
            "strict",
            "--ca-trust-extra",
            extra.to_str().unwrap(),
        ],
        &[],
    );
    let d = discover.addr("listen");
    let old_crt = read(data.join("ca.crt"));
    assert_ne!(old_crt, next_crt);
    let _app = app(api_ip, app_port);
    let api = proxy(&d, "api", api_ip);
    let web = proxy(&d, "web", web_ip);
    wait_ready(&[&api, &web]);
    let json = web_config(&d);
    let svc = format!(
        "{}:{app_port}",
        json["outbound"][0]["address"].as_str().unwrap()
    );
    eventually(WAIT, || {
        http_get(&svc, "/")
            .starts_with("HTTP/1.1 200")
            .then_some(())
    })
    .expect("web reaches api over mutual TLS");

    // Steady traffic through both sidecars for the whole rotation (stopped when the test
    // ends, however it ends).
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_load = StopOnDrop(stop.clone());
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = std::thread::spawn({
        let (stop, ok, failed, svc) = (stop.clone(), ok.clone(), failed.clone(), svc.clone());
        move || {
            let mut first_failure = None;
            while !stop.load(Ordering::Relaxed) {
                let r = http_get(&svc, "/");
                if r.starts_with("HTTP/1.1 200") && r.contains("api-1") {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_failure.get_or_insert(r);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            first_failure
        }
    });
    let admins = [api.addr("admin"), web.addr("admin")];
    let counts = || {
        admins
            .iter()
            .map(|a| (a.as_str(), certificates_issued(a)))
            .collect::<Vec<_>>()
    };

    // (1) Trust both: the old CA and the next one.
    let before = counts();
    std::fs::write(&extra, format!("{old_crt}{next_crt}")).unwrap();
    wait_new_certificates(&before, "trust both");
    // (2) Sign with the next CA: its files replace the data directory's.
    let before = counts();
    std::fs::write(data.join("ca.crt"), &next_crt).unwrap();
    std::fs::write(data.join("ca.key"), &next_key).unwrap();
    wait_new_certificates(&before, "sign with the next CA");
    let bundle = http_get(&d, "/v1/sidecars/shop/api/sidemesh-proxy");
    assert!(
        bundle.contains(&next_crt.trim().replace('\n', "\\n")),
        "the next CA signs: {bundle}"
    );
    // (3) Drop the old CA.
    let before = counts();
    std::fs::write(&extra, "").unwrap();
    wait_new_certificates(&before, "drop the old CA");
    // Traffic keeps flowing on the next CA alone.
    let after = ok.load(Ordering::Relaxed);
    eventually(WAIT, || {
        (ok.load(Ordering::Relaxed) >= after + 20).then_some(())
    })
    .expect("requests keep succeeding after the old CA is gone");
    stop.store(true, Ordering::Relaxed);
    let first_failure = load.join().unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "{} requests succeeded; the first failure: {first_failure:?}",
        ok.load(Ordering::Relaxed)
    );
    assert_eq!(
        metric(&d, "sidemesh_discover_ca_reloads_total{result=\"ok\"} "),
        Some(1.0)
    );
    let bundle = http_get(&d, "/v1/sidecars/shop/web/sidemesh-proxy");
    assert!(
        !bundle.contains(&old_crt.trim().replace('\n', "\\n")),
        "old CA still trusted"
    );
}
