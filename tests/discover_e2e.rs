//! End-to-end tests of `sidemesh discover`: the built binary on 127.0.0.1:0, driven over
//! real HTTP. The quickstart as a newcomer runs it, state file edits (valid and invalid),
//! and the registry across a restart.

// Test helpers outside #[test] functions panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Sidemesh, eventually};

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request with `Connection: close`, bounded by a 30 s socket timeout.
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response has a header section");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

fn get(addr: &str, path: &str) -> Reply {
    http(addr, "GET", path, &[], b"")
}

fn repo_file(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(rel)
        .display()
        .to_string()
}

fn endpoints(config: &serde_json::Value) -> Vec<String> {
    config["outbound"][0]["ports"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{}:{}", e["address"].as_str().unwrap(), e["port"]))
        .collect()
}

fn metric(addr: &str, line_prefix: &str) -> Option<f64> {
    let text = String::from_utf8(get(addr, "/metrics").body).unwrap();
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn quickstart_config_over_http() {
    let quickstart = repo_file("examples/quickstart.yaml");
    let mut d = Sidemesh::start(
        &[
            "discover",
            "--state",
            &quickstart,
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert_eq!(d.ready["ready"], "discover");
    let addr = d.addr("listen");
    let r = get(&addr, "/v1/sidecars/demo/web/sidemesh-proxy");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    // What discover serves is a valid contract config.
    let snapshot = sidemesh_api::Snapshot::from_json(&r.body).unwrap();
    assert_eq!(
        r.header("etag").unwrap(),
        format!("\"{}\"", snapshot.version())
    );
    let config = r.json();
    assert_eq!(endpoints(&config), ["127.0.0.11:18080", "127.0.0.12:18080"]);
    let backend = snapshot.resolve("backend.demo.svc.cluster.local").unwrap();
    assert_eq!(snapshot.resolve("backend"), Some(backend));
    assert_ne!(backend, std::net::Ipv4Addr::LOCALHOST);
    // The plugin's config carries its variables (service value over plugin default).
    let plugin = get(&addr, "/v1/sidecars/demo/web/access-log").json();
    assert_eq!(plugin["plugin"]["variables"]["FORMAT"], "text");
    assert_eq!(get(&addr, "/readyz").status, 200);
    assert!(metric(&addr, "sidemesh_discover_sidecars").unwrap() >= 3.0);
    let status = d
        .terminate(Duration::from_secs(10))
        .expect("exits on SIGTERM");
    assert!(status.success(), "{status:?}");
}

#[test]
fn state_file_edits_apply_within_a_second_and_bad_edits_keep_the_last_good_state() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state.yaml");
    let original = std::fs::read_to_string(repo_file("examples/quickstart.yaml")).unwrap();
    std::fs::write(&file, &original).unwrap();
    let d = Sidemesh::start(
        &[
            "discover",
            "--state",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let addr = d.addr("listen");
    let path = "/v1/sidecars/demo/web/sidemesh-proxy";
    let first = get(&addr, path);
    let tag = first.header("etag").unwrap().to_owned();

    // A long poll in flight sees the edit.
    let poll = {
        let addr = addr.clone();
        let tag = tag.clone();
        std::thread::spawn(move || {
            http(
                &addr,
                "GET",
                &format!("{path}?wait=20"),
                &[("If-None-Match", &tag)],
                b"",
            )
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let edited_at = Instant::now();
    std::fs::write(&file, original.replace("127.0.0.12", "127.0.0.13")).unwrap();
    let r = poll.join().unwrap();
    let took = edited_at.elapsed();
    assert_eq!(r.status, 200);
    assert!(took < Duration::from_secs(1), "edit applied after {took:?}");
    assert_eq!(
        endpoints(&r.json()),
        ["127.0.0.11:18080", "127.0.0.13:18080"]
    );
    let good_tag = r.header("etag").unwrap().to_owned();
    assert_ne!(good_tag, tag);

    // An invalid edit: rejected, counted, the last good state stays.
    let failed_before = metric(
        &addr,
        "sidemesh_discover_state_reloads_total{result=\"failed\"}",
    )
    .unwrap();
    std::fs::write(
        &file,
        original.replace(
            "    name: backend\n",
            "    name: backend\n    colour: blue\n",
        ),
    )
    .unwrap();
    eventually(Duration::from_secs(3), || {
        let now = metric(
            &addr,
            "sidemesh_discover_state_reloads_total{result=\"failed\"}",
        )?;
        (now > failed_before).then_some(())
    })
    .expect("the bad edit is counted");
    let r = get(&addr, path);
    assert_eq!(r.header("etag"), Some(good_tag.as_str()));
    assert_eq!(
        endpoints(&r.json()),
        ["127.0.0.11:18080", "127.0.0.13:18080"]
    );

    // Fixing the file applies again.
    std::fs::write(&file, original.replace("127.0.0.12", "127.0.0.14")).unwrap();
    eventually(Duration::from_secs(2), || {
        (endpoints(&get(&addr, path).json())[1] == "127.0.0.14:18080").then_some(())
    })
    .expect("the fixed file applies");
}

#[test]
fn invalid_state_file_at_start_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, "services:\n  - namespace: demo\n    nme: web\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sidemesh"))
        .args([
            "discover",
            "--state",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.yaml:3:"), "{stderr}");
    assert!(stderr.contains("nme"), "{stderr}");
}

#[test]
fn registrations_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let quickstart = repo_file("examples/quickstart.yaml");
    let args = [
        "discover",
        "--state",
        &quickstart,
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let mut d = Sidemesh::start(&args, &[]);
    let addr = d.addr("listen");
    let body =
        br#"{"address":"127.0.0.15","ports":[{"port":8080}],"ttl_seconds":120,"meshed":true}"#;
    let r = http(
        &addr,
        "PUT",
        "/v1/registry/demo/backend/backend-3",
        &[],
        body,
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let before = get(&addr, "/v1/sidecars/demo/web/sidemesh-proxy").json();
    assert_eq!(endpoints(&before).len(), 3);
    assert!(d.terminate(Duration::from_secs(10)).is_some());

    let d2 = Sidemesh::start(&args, &[]);
    let addr2 = d2.addr("listen");
    let after = get(&addr2, "/v1/sidecars/demo/web/sidemesh-proxy").json();
    assert_eq!(endpoints(&after), endpoints(&before));
    assert_eq!(
        after["version"], before["version"],
        "unchanged content keeps its version"
    );
    assert_eq!(
        after["outbound"][0]["address"],
        before["outbound"][0]["address"]
    );
}
