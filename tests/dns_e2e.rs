//! End-to-end tests of `sidemesh dns`: the built binary on loopback, queried with `dig`
//! (package bind9-dnsutils, installed by scripts/test.sh), fed by a config file that the
//! test rewrites, forwarding to a tiny fake upstream on loopback.

// Test helpers (here and in tests/common) are test code; clippy.toml only covers #[test] fns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::Duration;

use common::{Sidemesh, eventually};

fn config(version: u64, services: &[(&str, &str, &str)]) -> String {
    let outbound: Vec<_> = services
        .iter()
        .map(|(name, ns, addr)| {
            serde_json::json!({
                "name": name, "namespace": ns,
                "dns_names": [name, format!("{name}.{ns}"), format!("{name}.{ns}.svc"),
                              format!("{name}.{ns}.svc.cluster.local")],
                "address": addr,
                "ports": [{"port": 8080}]
            })
        })
        .collect();
    serde_json::json!({
        "version": version,
        "identity": {"namespace": "web", "service": "front", "plugin": "sidemesh-proxy"},
        "outbound": outbound
    })
    .to_string()
}

/// Writes `text` to `path` atomically (write, then rename), as config tools do.
fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Runs dig against `server` and returns its stdout.
fn dig(server: &str, args: &[&str]) -> String {
    let (ip, port) = server.rsplit_once(':').unwrap();
    let out = Command::new("dig")
        .arg(format!("@{ip}"))
        .args(["-p", port, "+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("dig is installed (scripts/test.sh installs bind9-dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn short(server: &str, args: &[&str]) -> String {
    let mut a = vec!["+short"];
    a.extend_from_slice(args);
    dig(server, &a).trim().to_owned()
}

fn status(server: &str, args: &[&str]) -> String {
    let out = dig(server, args);
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("none")
        .to_owned()
}

/// A fake upstream that answers every A question with 192.0.2.7 (TTL 60) and counts
/// queries. Raw bytes on purpose: independent of the code under test.
fn fake_upstream() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, src)) = sock.recv_from(&mut buf) {
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Walk the question name to find where the question ends.
            let mut i = 12;
            while i < n && buf[i] != 0 {
                i += 1 + buf[i] as usize;
            }
            let end = i + 5;
            if n < 12 || end > n {
                continue;
            }
            let mut r = buf[..end].to_vec();
            r[2] |= 0x80; // QR
            r[3] = 0x80; // RA, NOERROR
            r[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]); // 1 answer, no others
            r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 7]);
            let _ = sock.send_to(&r, src);
        }
    });
    (addr, hits)
}

fn get_metrics(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn dig_resolves_mesh_names_follows_config_and_forwards_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sidecar.json");
    write_config(&cfg, &config(1, &[("tomcat", "shop", "127.1.0.7")]));
    let (upstream, hits) = fake_upstream();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        format!(
            "search web.svc.cluster.local svc.cluster.local cluster.local\nnameserver {}\n",
            upstream.ip()
        ),
    )
    .unwrap();
    let mut sm = Sidemesh::start(
        &[
            "dns",
            "--listen",
            "127.0.0.1:0",
            "--config",
            cfg.to_str().unwrap(),
            "--resolv-conf",
            resolv.to_str().unwrap(),
            "--upstream",
            &upstream.to_string(),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let dns = sm.addr("listen");
    assert_eq!(sm.addr("udp"), sm.addr("tcp"));

    for name in [
        "tomcat",
        "TomCat.Shop",
        "tomcat.shop.svc",
        "tomcat.shop.svc.cluster.local.",
        "tomcat.web.svc.cluster.local",
    ] {
        assert_eq!(short(&dns, &[name]), "127.1.0.7", "{name} over UDP");
        assert_eq!(short(&dns, &["+tcp", name]), "127.1.0.7", "{name} over TCP");
    }
    assert_eq!(status(&dns, &["tomcat.shop", "AAAA"]), "NOERROR");
    assert_eq!(short(&dns, &["tomcat.shop", "AAAA"]), "");

    // Forwarded, then cached.
    assert_eq!(short(&dns, &["www.example.org"]), "192.0.2.7");
    assert_eq!(short(&dns, &["WWW.example.org"]), "192.0.2.7");
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);

    // A new config: mysql appears, tomcat goes (and is forwarded from then on).
    write_config(&cfg, &config(2, &[("mysql", "data", "127.1.0.9")]));
    let got = eventually(Duration::from_secs(10), || {
        (short(&dns, &["mysql.data"]) == "127.1.0.9").then_some(())
    });
    assert!(got.is_some(), "mysql resolves after the config change");
    assert_eq!(short(&dns, &["tomcat.shop"]), "192.0.2.7");

    // An invalid config is rejected; the last good one stays.
    write_config(&cfg, "{\"version\": 3, \"nonsense\": true}");
    let metrics_addr = sm.addr("metrics");
    let rejected = eventually(Duration::from_secs(10), || {
        get_metrics(&metrics_addr)
            .contains("sidemesh_dns_config_rejected_total{reason=\"invalid\"} 1")
            .then_some(())
    });
    assert!(
        rejected.is_some(),
        "the invalid config is seen and rejected"
    );
    assert_eq!(short(&dns, &["mysql.data"]), "127.1.0.9");

    let metrics = get_metrics(&metrics_addr);
    assert!(metrics.contains("sidemesh_dns_queries_total{outcome=\"local\",type=\"A\"}"));
    assert!(metrics.contains("sidemesh_dns_queries_total{outcome=\"cached\",type=\"A\"}"));
    assert!(metrics.contains("sidemesh_dns_upstream_duration_seconds_bucket"));
    assert!(metrics.contains("sidemesh_dns_cache_entries"));

    let status = sm
        .terminate(Duration::from_secs(10))
        .expect("exits on SIGTERM");
    assert!(status.success(), "{status:?}");
}

#[test]
fn refuses_to_start_without_a_valid_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.json");
    std::fs::write(&cfg, "{}").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sidemesh"))
        .args([
            "dns",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
        ])
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid config"));
}

/// A fake discover: answers the first request for the config with `200` and an ETag, and
/// later ones carrying `If-None-Match` with `304` after a short hold (a long poll), until
/// the test swaps in a new body.
fn fake_discover(body: std::sync::Arc<std::sync::Mutex<(u64, String)>>) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let body = body.clone();
            thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16_384 {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_lowercase();
                let (version, text) = body.lock().unwrap().clone();
                let etag = format!("\"{version}\"");
                let held = head
                    .lines()
                    .any(|l| l.starts_with("if-none-match:") && l.contains(&etag));
                let response = if held {
                    thread::sleep(Duration::from_millis(200));
                    format!(
                        "HTTP/1.1 304 Not Modified\r\netag: {etag}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    )
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\netag: {etag}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                        text.len()
                    )
                };
                let _ = s.write_all(response.as_bytes());
            });
        }
    });
    addr
}

#[test]
fn dig_resolves_names_from_discover_url() {
    let body = std::sync::Arc::new(std::sync::Mutex::new((
        1,
        config(1, &[("tomcat", "shop", "127.1.0.7")]),
    )));
    let discover = fake_discover(body.clone());
    let url = format!("http://{discover}/v1/sidecars/web/front");
    let sm = Sidemesh::start(
        &[
            "dns",
            "--listen",
            "127.0.0.1:0",
            "--discover-url",
            &url,
            "--upstream",
            "127.0.0.1:9",
        ],
        &[],
    );
    let dns = sm.addr("listen");
    let got = eventually(Duration::from_secs(10), || {
        (short(&dns, &["tomcat.shop"]) == "127.1.0.7").then_some(())
    });
    assert!(got.is_some(), "name from discover resolves");
    *body.lock().unwrap() = (2, config(2, &[("mysql", "data", "127.1.0.9")]));
    let got = eventually(Duration::from_secs(15), || {
        (short(&dns, &["mysql.data.svc.cluster.local"]) == "127.1.0.9").then_some(())
    });
    assert!(got.is_some(), "new name from discover resolves");
}

#[test]
fn dig_resolves_names_rendered_from_a_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.yaml");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/quickstart.yaml");
    std::fs::copy(example, &state).unwrap();
    let sm = Sidemesh::start(
        &[
            "dns",
            "--listen",
            "127.0.0.1:0",
            "--state",
            state.to_str().unwrap(),
            "--identity",
            "demo/web",
            "--upstream",
            "127.0.0.1:9",
        ],
        &[],
    );
    let dns = sm.addr("listen");
    // `web` depends on `backend`: its names answer with backend's loopback address.
    let addr = short(&dns, &["backend.demo.svc.cluster.local"]);
    assert!(addr.starts_with("127."), "got {addr:?}");
    assert_eq!(short(&dns, &["backend.demo"]), addr);
    assert_eq!(short(&dns, &["+tcp", "BACKEND.demo.svc"]), addr);
    // AAAA: the IPv4-mapped form of the same address, which a dual-stack socket dials
    // over IPv4 to the same sidecar listener.
    assert_eq!(
        short(&dns, &["backend.demo", "AAAA"]),
        format!("::ffff:{addr}")
    );
}

#[test]
fn dig_sees_aaaa_and_negative_answers_with_an_soa_in_an_authoritative_zone() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sidecar.json");
    let mut c: serde_json::Value = serde_json::from_str(&config(
        3,
        &[("tomcat", "shop", "127.1.0.7"), ("db", "data", "127.1.0.8")],
    ))
    .unwrap();
    c["outbound"][0]["address_v6"] = serde_json::json!("::ffff:127.1.0.7");
    c["dns"] = serde_json::json!({"ttl_seconds": 9});
    write_config(&cfg, &c.to_string());
    let (upstream, hits) = fake_upstream();
    let sm = Sidemesh::start(
        &[
            "dns",
            "--listen",
            "127.0.0.1:0",
            "--config",
            cfg.to_str().unwrap(),
            "--upstream",
            &upstream.to_string(),
            "--authoritative-zone",
            "cluster.local",
        ],
        &[],
    );
    let dns = sm.addr("listen");

    // AAAA where the service has an IPv6 address, over UDP and TCP.
    assert_eq!(short(&dns, &["tomcat.shop", "AAAA"]), "::ffff:127.1.0.7");
    assert_eq!(short(&dns, &["+tcp", "tomcat", "AAAA"]), "::ffff:127.1.0.7");
    // NODATA for the other: an SOA in the authority section, TTL and MINIMUM 9 s.
    let out = dig(&dns, &["db.data", "AAAA"]);
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(out.contains("ANSWER: 0, AUTHORITY: 1"), "{out}");
    let soa = |out: &str| {
        out.lines()
            .find(|l| l.contains("\tSOA\t"))
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let db = soa(&out);
    assert_eq!(
        (
            db[0].as_str(),
            db[1].as_str(),
            db.last().map(String::as_str)
        ),
        ("db.data.", "9", Some("9")),
        "{out}"
    );
    // In the authoritative zone: NXDOMAIN with the zone's SOA for a name that does not
    // exist, NODATA for an empty non-terminal; neither goes upstream.
    let out = dig(&dns, &["nosuch.shop.svc.cluster.local"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    assert_eq!(
        soa(&out).first().map(String::as_str),
        Some("cluster.local."),
        "{out}"
    );
    assert!(out.contains("flags: qr aa"), "{out}");
    assert_eq!(status(&dns, &["shop.svc.cluster.local"]), "NOERROR");
    assert_eq!(
        short(&dns, &["cluster.local", "SOA"]).split(' ').next(),
        Some("cluster.local.")
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    // Outside it, names are still forwarded.
    assert_eq!(short(&dns, &["www.example.org"]), "192.0.2.7");
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}
