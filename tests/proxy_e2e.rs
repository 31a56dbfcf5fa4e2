//! End-to-end tests of `sidemesh proxy`: the built binary, a fake discover serving a config
//! over HTTP, real backends, and plain HTTP/1.1 clients, all on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{Sidemesh, eventually};

const WAIT: Duration = Duration::from_secs(15);

/// A random loopback address other than 127.0.0.1, so parallel tests never collide.
fn loopback() -> Ipv4Addr {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        ^ std::process::id().rotate_left(7);
    let b = n.to_le_bytes();
    Ipv4Addr::new(127, 2 + b[0] % 240, 1 + b[1] % 250, 2 + b[2] % 250)
}

/// A fake discover: answers every GET with the current config (and its version as ETag).
struct FakeDiscover {
    addr: SocketAddr,
    config: Arc<Mutex<String>>,
}

fn fake_discover(config: String) -> FakeDiscover {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let config = Arc::new(Mutex::new(config));
    let c = config.clone();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let c = c.clone();
            thread::spawn(move || {
                let _ = read_head(&mut s);
                let body = c.lock().unwrap().clone();
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nETag: \"{}\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    v["version"],
                    body.len(),
                    body
                );
                let _ = s.write_all(resp.as_bytes());
            });
        }
    });
    FakeDiscover { addr, config }
}

fn read_head(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            return head;
        }
        head.push_str(&line);
    }
}

/// A backend answering `name`, holding each answer until `gate` allows it (when given).
fn backend(ip: Ipv4Addr, name: &'static str, delay: Duration) -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let h = h.clone();
            thread::spawn(move || {
                let _ = read_head(&mut s);
                h.fetch_add(1, Ordering::Relaxed);
                thread::sleep(delay);
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
                    name.len()
                );
                let _ = s.write_all(resp.as_bytes());
            });
        }
    });
    (addr, hits)
}

/// One HTTP/1.1 GET; returns (status, body).
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(WAIT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn config(version: u64, svc: Ipv4Addr, endpoints: &[SocketAddr]) -> String {
    let eps: Vec<_> = endpoints
        .iter()
        .map(|e| serde_json::json!({"address": e.ip().to_string(), "port": e.port()}))
        .collect();
    serde_json::json!({
        "version": version,
        "identity": {"namespace": "shop", "service": "web", "plugin": "sidemesh-proxy"},
        "outbound": [{"name": "cart", "namespace": "shop", "address": svc.to_string(),
                      "ports": [{"port": 80, "protocol": "http1", "endpoints": eps}]}]
    })
    .to_string()
}

fn start_proxy(discover: &FakeDiscover, extra: &[&str]) -> Sidemesh {
    let url = format!(
        "http://{}/v1/sidecars/shop/web/sidemesh-proxy",
        discover.addr
    );
    let mut args = vec!["proxy", "--admin", "127.0.0.1:0", "--discover-wait", "0s"];
    args.extend_from_slice(extra);
    Sidemesh::start(&args, &[("DISCOVER_URL", url.as_str())])
}

/// Waits until the admin server at `admin` answers `/ready` with 200.
fn wait_ready(admin: &str) {
    let ready = eventually(WAIT, || {
        http_get(admin, "/ready").ok().filter(|(s, _)| *s == 200)
    });
    assert!(ready.is_some(), "/ready never turned 200");
}

#[test]
fn missing_or_malformed_discover_url_is_a_clear_error() {
    for url in [None, Some("not a url"), Some("")] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sidemesh"));
        cmd.args(["proxy", "--admin", "127.0.0.1:0"])
            .env_remove("DISCOVER_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(u) = url {
            cmd.env("DISCOVER_URL", u);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "{url:?} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("DISCOVER_URL"), "{url:?}: {err}");
    }
}

#[test]
fn proxies_reports_ready_metrics_and_follows_config_changes() {
    let ip = loopback();
    let (a, _) = backend(ip, "alpha", Duration::ZERO);
    let (b, _) = backend(ip, "beta", Duration::ZERO);
    let svc = loopback();
    let discover = fake_discover(config(1, svc, &[a]));
    let p = start_proxy(&discover, &[]);
    let admin = p.addr("admin");
    let ready = eventually(WAIT, || {
        http_get(&admin, "/ready").ok().filter(|(s, _)| *s == 200)
    });
    assert!(ready.is_some(), "/ready never turned 200");
    assert_eq!(http_get(&admin, "/live").unwrap().0, 200);
    let (status, body) = http_get(&format!("{svc}:80"), "/").unwrap();
    assert_eq!((status, body.as_str()), (200, "alpha"));
    // The default policy (peak EWMA) measured the answer's latency.
    let (_, endpoints) = http_get(&admin, "/endpoints").unwrap();
    let v: serde_json::Value = serde_json::from_str(&endpoints).unwrap();
    let ep = &v["listeners"][0]["backends"][0]["endpoints"][0];
    assert_eq!(ep["address"], a.to_string(), "{endpoints}");
    assert!(ep["latency_ewma_ms"].as_f64().unwrap() > 0.0, "{endpoints}");

    *discover.config.lock().unwrap() = config(2, svc, &[b]);
    let switched = eventually(WAIT, || {
        http_get(&format!("{svc}:80"), "/")
            .ok()
            .filter(|(_, body)| body == "beta")
    });
    assert!(switched.is_some(), "config change not applied");

    let (_, metrics) = http_get(&admin, "/metrics").unwrap();
    assert!(metrics.contains("sidemesh_proxy_requests_total{direction=\"outbound\",route=\"default\",service=\"shop/cart\",status_class=\"2xx\"}"), "{metrics}");
    assert!(
        metrics.contains("sidemesh_proxy_dataplane_config_version 2"),
        "{metrics}"
    );
}

#[test]
fn sigterm_turns_ready_503_drains_in_flight_and_exits_0() {
    let ip = loopback();
    let (slow, hits) = backend(ip, "slow", Duration::from_millis(1500));
    let svc = loopback();
    let discover = fake_discover(config(1, svc, &[slow]));
    let mut p = start_proxy(&discover, &["--drain-timeout", "10s"]);
    let admin = p.addr("admin");
    wait_ready(&admin);
    let target = format!("{svc}:80");
    let inflight = thread::spawn(move || http_get(&target, "/"));
    assert!(eventually(WAIT, || (hits.load(Ordering::Relaxed) == 1).then_some(())).is_some());
    let _ = Command::new("kill")
        .args(["-TERM", &p.pid().to_string()])
        .status();
    // While draining: not ready, and the listener no longer accepts.
    let not_ready = eventually(WAIT, || {
        http_get(&admin, "/ready").ok().filter(|(s, _)| *s == 503)
    });
    assert!(not_ready.is_some(), "/ready did not turn 503 on SIGTERM");
    let (status, body) = inflight.join().unwrap().unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "slow"),
        "in-flight request must finish"
    );
    let exit = p.terminate(WAIT).expect("exited after drain");
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn metrics_pass_promtool_check() {
    let ip = loopback();
    let (a, _) = backend(ip, "alpha", Duration::ZERO);
    let svc = loopback();
    let discover = fake_discover(config(1, svc, &[a]));
    let p = start_proxy(&discover, &[]);
    let admin = p.addr("admin");
    wait_ready(&admin);
    for _ in 0..5 {
        assert_eq!(http_get(&format!("{svc}:80"), "/").unwrap().0, 200);
    }
    let (status, metrics) = http_get(&admin, "/metrics").unwrap();
    assert_eq!(status, 200);
    for name in [
        "sidemesh_proxy_requests_total",
        "sidemesh_proxy_request_duration_seconds_bucket",
        "sidemesh_proxy_tcp_connections_total",
        "sidemesh_proxy_healthy_endpoints",
        "sidemesh_proxy_config_version",
        "sidemesh_proxy_discover_poll_errors_total",
    ] {
        assert!(metrics.contains(name), "missing {name}:\n{metrics}");
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/test.sh installs the Debian package prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn config_and_endpoints_show_the_running_config_and_live_endpoint_state() {
    let ip = loopback();
    let (alive, _) = backend(ip, "alpha", Duration::ZERO);
    // A port nothing listens on: connects to it fail.
    let dead = TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap();
    let svc = loopback();
    let mut cfg: serde_json::Value = serde_json::from_str(&config(7, svc, &[alive, dead])).unwrap();
    cfg["outbound"][0]["balancer"] = serde_json::json!({"policy": "round_robin"});
    cfg["outbound"][0]["outlier_detection"] = serde_json::json!({
        "consecutive_5xx": 0, "consecutive_connect_failures": 1, "base_ejection_ms": 60000
    });
    cfg["plugin"] = serde_json::json!({"variables": {"API_KEY": "s3cret-value"}});
    let discover = fake_discover(cfg.to_string());
    let p = start_proxy(&discover, &[]);
    let admin = p.addr("admin");
    wait_ready(&admin);
    // Round robin reaches the dead endpoint within two requests; one failed connect
    // ejects it.
    for _ in 0..4 {
        let _ = http_get(&format!("{svc}:80"), "/");
    }

    let (status, body) = http_get(&admin, "/endpoints").unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["version"], 7, "{body}");
    let listener = v["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["address"] == format!("{svc}:80"))
        .unwrap_or_else(|| panic!("no listener {svc}:80 in {body}"));
    assert_eq!(listener["direction"], "outbound");
    assert_eq!(listener["service"], "shop/cart");
    assert_eq!(listener["protocol"], "http1");
    let backends = listener["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 1, "{body}");
    assert_eq!(backends[0]["policy"], "round_robin");
    assert_eq!(backends[0]["used_by"], serde_json::json!(["default"]));
    assert_eq!(backends[0]["healthy"], 1, "{body}");
    let ep = |addr: SocketAddr| {
        backends[0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == addr.to_string())
            .cloned()
            .unwrap_or_else(|| panic!("no endpoint {addr} in {body}"))
    };
    let (up, down) = (ep(alive), ep(dead));
    assert_eq!(up["healthy"], true, "{body}");
    assert_eq!(up["in_flight"], 0, "{body}");
    // Round robin measures no latency.
    assert_eq!(up["latency_ewma_ms"], serde_json::Value::Null, "{body}");
    assert_eq!(down["healthy"], false, "{body}");
    assert_eq!(down["ejections"], 1, "{body}");
    let left = down["ejected_for_ms"].as_u64().unwrap();
    assert!(left > 0 && left <= 60_000, "{body}");

    let (status, body) = http_get(&admin, "/config").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        !body.contains("s3cret-value"),
        "a plugin variable leaked: {body}"
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["applied"]["version"], 7, "{body}");
    assert_eq!(
        v["applied"]["listening"],
        serde_json::json!([format!("{svc}:80")]),
        "{body}"
    );
    assert_eq!(v["config"]["version"], 7);
    assert_eq!(v["config"]["outbound"][0]["name"], "cart");
    assert_eq!(v["config"]["plugin"]["variables"]["API_KEY"], "(redacted)");
    assert_eq!(
        v["certificate"],
        serde_json::Value::Null,
        "no TLS in this config"
    );
}

#[test]
fn dns_shim_runs_in_process_and_answers_service_names() {
    let ip = loopback();
    let (a, _) = backend(ip, "alpha", Duration::ZERO);
    let svc = loopback();
    let mut cfg: serde_json::Value = serde_json::from_str(&config(1, svc, &[a])).unwrap();
    cfg["outbound"][0]["dns_names"] = serde_json::json!(["cart", "cart.shop"]);
    let discover = fake_discover(cfg.to_string());
    // The pod's original resolv.conf: its search list makes `cart.shop.corp.example` a form
    // of `cart.shop`, so the shim must have read this file, not /etc/resolv.conf.
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "search corp.example\nnameserver 127.0.0.1\n").unwrap();
    let p = start_proxy(
        &discover,
        &[
            "--dns",
            "127.0.0.1:0",
            "--dns-resolv-conf",
            resolv.to_str().unwrap(),
            "--authoritative-zone",
            "mesh.test",
        ],
    );
    let dns: SocketAddr = p.addr("dns").parse().unwrap();
    for name in ["cart.shop", "cart.shop.corp.example"] {
        let answer = eventually(WAIT, || {
            let out = Command::new("dig")
                .args([
                    "+short",
                    "+time=2",
                    "+tries=1",
                    "-p",
                    &dns.port().to_string(),
                    "@127.0.0.1",
                    name,
                ])
                .output()
                .expect("dig is installed (scripts/test.sh installs bind9-dnsutils)");
            let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            (text == svc.to_string()).then_some(text)
        });
        assert!(answer.is_some(), "{name} did not resolve to {svc}");
    }
    // A name of the authoritative zone the mesh does not know: NXDOMAIN from the shim
    // itself (the only resolver in resolv.conf is the shim's own address, so a forwarded
    // query would fail with SERVFAIL).
    let out = Command::new("dig")
        .args([
            "+time=2",
            "+tries=1",
            "-p",
            &dns.port().to_string(),
            "@127.0.0.1",
            "nothere.mesh.test",
        ])
        .output()
        .expect("dig is installed");
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    assert!(out.contains(" aa"), "not authoritative: {out}");
}

/// `--access-log text`: the built binary writes one line per request on standard output
/// after its ready line, with what curl asked (quoted) and what it got.
#[test]
fn access_log_lines_follow_the_ready_line_on_stdout() {
    let ip = loopback();
    let (a, _) = backend(ip, "alpha", Duration::ZERO);
    let svc = loopback();
    let discover = fake_discover(config(1, svc, &[a]));
    let p = start_proxy(&discover, &["--access-log", "text"]);
    let admin = p.addr("admin");
    let ready = eventually(WAIT, || {
        http_get(&admin, "/ready").ok().filter(|(s, _)| *s == 200)
    });
    assert!(ready.is_some(), "/ready never turned 200");
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "10",
            "-H",
            "x-request-id: e2e-1",
            "-A",
            "curl-e2e \"quoted\"",
            &format!("http://{svc}:80/path?q=1"),
        ])
        .output()
        .expect("curl is installed (scripts/test.sh installs it)");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "alpha");
    let line = p
        .stdout
        .recv_timeout(WAIT)
        .expect("an access log line on stdout");
    for part in [
        " outbound shop/cart default \"GET /path?q=1 HTTP/1.1\" 200 ",
        &format!("authority=\"{svc}\""),
        "request_id=\"e2e-1\"",
        "user_agent=\"curl-e2e \\\"quoted\\\"\"",
        "client_id=-",
        &format!("upstream={a}"),
    ] {
        assert!(line.contains(part), "{part:?} not in {line:?}");
    }
    // A flag value that is not a format is refused before anything starts, naming the flag.
    let out = Command::new(env!("CARGO_BIN_EXE_sidemesh"))
        .args(["proxy", "--access-log", "xml"])
        .env("DISCOVER_URL", "http://127.0.0.1:1/v1/sidecars/a/b/c")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--access-log"), "{err}");
}

/// `(soft, hard)` of "Max open files" in a `/proc/PID/limits` text.
fn open_files_limits(limits: &str) -> Option<(String, String)> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
}

/// The binary raises its soft open-files limit to the hard one at start (a sidecar holds a
/// listener per service it uses and two sockets per proxied connection): started under
/// `ulimit -Sn 256`, the running process reports a soft limit equal to its hard one.
#[test]
fn the_soft_open_files_limit_is_raised_to_the_hard_one() {
    let own = std::fs::read_to_string("/proc/self/limits").unwrap();
    let (_, hard) = open_files_limits(&own).unwrap();
    if hard.parse::<u64>().is_ok_and(|h| h <= 256) {
        return; // Nothing above 256 to raise to in this environment.
    }
    let state = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/quickstart.yaml");
    let child = Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -Sn 256 && exec "$0" discover --state "$1" --listen 127.0.0.1:0"#)
        .arg(env!("CARGO_BIN_EXE_sidemesh"))
        .arg(state)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Reap(child);
    // The ready line: the shell has run `ulimit` and become the sidecar's process, which is
    // past its start.
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let ready = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(ready.contains("\"ready\""), "{ready}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.0.id())).unwrap();
    let (soft, hard_now) = open_files_limits(&limits).unwrap();
    assert_eq!(
        (soft.as_str(), hard_now.as_str()),
        (hard.as_str(), hard.as_str())
    );
}
