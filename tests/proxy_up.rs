//! End-to-end test of `sidemesh up`: the quickstart state (with its instance addresses moved
//! to fresh loopback addresses so parallel runs never collide) served by the built binary;
//! requests through the client sidecar reach both backend instances, and the client
//! sidecar's `/metrics` counts them, and shows the sidecar hops were mutual TLS; discover
//! refuses a request without a token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::Sidemesh;

fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn up_quickstart_answers_from_both_instances() {
    let n = std::process::id();
    let octet = |k: u32| 2 + ((n >> (k * 8)) % 240) as u8;
    let (a, b, c) = (octet(0), octet(1), octet(2));
    let inst1 = format!("127.{a}.{b}.11");
    let inst2 = format!("127.{a}.{b}.12");
    let client = format!("127.{a}.{c}.10");
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/quickstart.yaml"
    ))
    .unwrap()
    .replace("127.0.0.11", &inst1)
    .replace("127.0.0.12", &inst2);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("quickstart.yaml");
    std::fs::write(&file, yaml).unwrap();

    let up = Sidemesh::start(
        &[
            "up",
            file.to_str().unwrap(),
            "--client-address",
            &client,
            "--drain-timeout",
            "1s",
            "--dns",
            "127.0.0.1:0",
            "--authoritative-zone",
            "cluster.local",
            "--access-log",
            "json",
        ],
        &[],
    );
    let url = up.addr("curl");
    let hostport = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let resp = http_get(&hostport, "/");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        let body = resp.split_once("\r\n\r\n").unwrap().1.trim().to_owned();
        seen.insert(body);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec!["hello from backend-1", "hello from backend-2"]
    );
    // `--access-log json`: every request shows as the client sidecar's outbound line and a
    // backend sidecar's inbound line (with the caller's verified identity), after the
    // ready line on stdout.
    let mut lines = Vec::new();
    while lines.len() < 40 {
        match up.stdout.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(l) => lines.push(serde_json::from_str::<serde_json::Value>(&l).unwrap()),
            Err(_) => break,
        }
    }
    let count = |direction: &str| {
        lines
            .iter()
            .filter(|l| l["direction"] == direction && l["service"] == "demo/backend")
            .filter(|l| l["status"] == 200 && l["path"] == "/")
            .count()
    };
    assert_eq!((count("outbound"), count("inbound")), (20, 20), "{lines:?}");
    assert!(
        lines
            .iter()
            .filter(|l| l["direction"] == "inbound")
            .all(|l| l["client_id"] == "demo/web"),
        "{lines:?}"
    );
    // The client's DNS shim answers the dependency's names with the same address.
    let dns_port = up.addr("dns").rsplit(':').next().unwrap().to_owned();
    let out = std::process::Command::new("dig")
        .args([
            "+short",
            "+time=2",
            "+tries=1",
            "-p",
            &dns_port,
            "@127.0.0.1",
            "backend.demo",
        ])
        .output()
        .expect("dig is installed (scripts/test.sh installs bind9-dnsutils)");
    let ip = hostport.split(':').next().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), ip);
    // Other names of the authoritative zone: NXDOMAIN from the shim itself.
    let out = std::process::Command::new("dig")
        .args([
            "+time=2",
            "+tries=1",
            "-p",
            &dns_port,
            "@127.0.0.1",
            "nothere.demo.svc.cluster.local",
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("status: NXDOMAIN") && out.contains(" aa"),
        "{out}"
    );
    let metrics = http_get(&up.addr("web.demo.admin"), "/metrics");
    assert!(
        metrics.contains(
            "sidemesh_proxy_requests_total{direction=\"outbound\",route=\"default\",service=\"demo/backend\",status_class=\"2xx\"} 20"
        ),
        "{metrics}"
    );
    // The sidecar hop was mutual TLS (backend only allows demo/web, which plaintext
    // could not prove): the client sidecar dialled both instances with TLS.
    let tls = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("sidemesh_proxy_tls_connections_total{direction=\"outbound\"} ")
        })
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(tls >= 2, "{metrics}");
    assert!(
        !metrics.contains("sidemesh_proxy_tls_handshake_failures_total{direction=\"outbound\"} 1"),
        "{metrics}"
    );
    // Discover wants a bearer token: the sidecars have theirs, a request without one is
    // refused, for configs and certificates alike.
    let discover = up.addr("discover");
    for (method, path) in [
        ("GET", "/v1/sidecars/demo/web/sidemesh-proxy"),
        ("POST", "/v1/sidecars/demo/web/sidemesh-proxy/certificate"),
    ] {
        let mut s = TcpStream::connect(&discover).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 401"), "{method} {path}: {resp}");
    }
}
