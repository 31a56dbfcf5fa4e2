//! End-to-end test of discover's token check with the built binary: `sidemesh discover
//! --tokens FILE` and two `sidemesh proxy` processes for `shop/web` on loopback. The one
//! with web's token file gets its config and certificate and turns ready; the one holding
//! a token for another service is refused (403, counted) and stays not ready.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Sidemesh, eventually, http_get, metric, start_discover, wait_ready_with_certificate};

const WAIT: Duration = Duration::from_secs(20);

fn sha256_hex(s: &str) -> String {
    sidemesh_discover::auth::sha256_hex(s.as_bytes())
}

/// A sidecar for `shop/web` (which serves no ports, so two can run on one host).
fn proxy(discover: &str, token_file: &std::path::Path) -> Sidemesh {
    let url = format!("http://{discover}/v1/sidecars/shop/web/sidemesh-proxy");
    Sidemesh::start(
        &[
            "proxy",
            "--admin",
            "127.0.0.1:0",
            "--discover-wait",
            "0s",
            "--drain-timeout",
            "1s",
        ],
        &[
            ("DISCOVER_URL", url.as_str()),
            ("SIDEMESH_DISCOVER_TOKEN_FILE", token_file.to_str().unwrap()),
        ],
    )
}

#[test]
fn a_sidecar_with_its_token_gets_ready_and_one_with_another_services_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.yaml");
    std::fs::write(
        &state,
        "services:
  - {namespace: shop, name: web}
  - {namespace: shop, name: other}
",
    )
    .unwrap();
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!(
            "tokens:
  - {{name: web, sha256: {}, identities: [shop/web]}}
  - {{name: other, sha256: {}, identities: [shop/other]}}
",
            sha256_hex("web-token-1"),
            sha256_hex("other-token-2"),
        ),
    )
    .unwrap();
    let (web_token, other_token) = (dir.path().join("web.token"), dir.path().join("other.token"));
    std::fs::write(&web_token, "web-token-1\n").unwrap();
    std::fs::write(&other_token, "other-token-2\n").unwrap();
    let discover = start_discover(
        &state,
        &dir.path().join("data"),
        &[],
        &[("SIDEMESH_DISCOVER_TOKENS", tokens.to_str().unwrap())],
    );
    let d = discover.addr("listen");
    // Without a token, nobody reads web's config.
    let (status, body) = http_get(&d, "/v1/sidecars/shop/web/sidemesh-proxy");
    assert_eq!(status, 401, "{body}");
    assert!(
        body.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{body}"
    );

    let good = proxy(&d, &web_token);
    let admin = good.addr("admin");
    // The sidecar with web's token turns ready with a certificate.
    wait_ready_with_certificate(&admin, WAIT);

    let forbidden = "sidemesh_discover_auth_failures_total{reason=\"forbidden\"} ";
    let before = metric(&d, forbidden).unwrap();
    let bad = proxy(&d, &other_token);
    let bad_admin = bad.addr("admin");
    eventually(WAIT, || {
        (metric(&d, forbidden)? >= before + 2.0).then_some(())
    })
    .expect("discover refuses the sidecar holding other's token (403, counted)");
    // Refused twice or more, it still has no config: not ready.
    assert_eq!(http_get(&bad_admin, "/ready").0, 503);
    assert_eq!(http_get(&admin, "/ready").0, 200);
    // Tokens never reach discover's metrics.
    assert!(!http_get(&d, "/metrics").1.contains("token-"));
}
