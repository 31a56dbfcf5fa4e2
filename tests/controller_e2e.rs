//! End-to-end: the built `sidemesh controller` against a fake Kubernetes API server (plain
//! HTTP on 127.0.0.1:0, real list/watch JSON, reached through a kubeconfig). Checks the
//! ready line, readiness after the initial sync, that the in-process discover serves a
//! meshed workload's sidecar config built from the cluster, and that a watch event reaches
//! that config.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a failed unwrap is a failed test.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Sidemesh, eventually};
use serde_json::{Value, json};

const CLUSTER: &str = include_str!("../controller/testdata/cluster.json");

/// A fake API server: answers lists from the fixture, holds watches open, and can push
/// watch events to them.
#[derive(Clone, Default)]
struct FakeApi {
    objects: Arc<Mutex<BTreeMap<String, Vec<Value>>>>,
    watches: Arc<Mutex<Vec<(String, TcpStream)>>>,
}

impl FakeApi {
    fn start() -> (FakeApi, String) {
        let fixture: Value = serde_json::from_str(CLUSTER).unwrap();
        let api = FakeApi::default();
        // The fixture is keyed by resource, as the list URLs end.
        let all: BTreeMap<String, Vec<Value>> = serde_json::from_value(fixture).unwrap();
        *api.objects.lock().unwrap() = all;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let a = api.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let a = a.clone();
                std::thread::spawn(move || a.serve(conn));
            }
        });
        (api, url)
    }

    fn serve(&self, mut conn: TcpStream) {
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
            let method = line.split_whitespace().next().unwrap_or("").to_owned();
            let mut length = 0usize;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 {
                    return;
                }
                if h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            let resource = path.rsplit('/').next().unwrap_or("").to_owned();
            if method == "POST" && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
                respond(&mut conn, 201, &token_review(&body));
                continue;
            }
            if method == "PATCH" {
                // Status writes: answer with the object patched.
                let name = path.trim_end_matches("/status").rsplit('/').next().unwrap();
                let obj = self
                    .objects
                    .lock()
                    .unwrap()
                    .values()
                    .flatten()
                    .find(|o| o["metadata"]["name"] == name)
                    .cloned()
                    .unwrap_or(Value::Null);
                respond(&mut conn, 200, &obj);
                continue;
            }
            let known = self.objects.lock().unwrap().contains_key(&resource);
            if !known {
                respond(&mut conn, 404, &json!({"kind": "Status", "code": 404}));
                continue;
            }
            if query.contains("watch=true") {
                conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
                self.watches.lock().unwrap().push((resource, conn));
                return;
            }
            let items = self.objects.lock().unwrap()[&resource].clone();
            respond(
                &mut conn,
                200,
                &json!({"apiVersion": "v1", "kind": "List",
                "metadata": {"resourceVersion": "100"}, "items": items}),
            );
        }
    }

    fn push(&self, resource: &str, kind: &str, obj: Value) {
        let line = format!("{}\n", json!({"type": kind, "object": obj}));
        for (r, conn) in self.watches.lock().unwrap().iter_mut() {
            if r == resource {
                let _ = write!(conn, "{:x}\r\n{line}\r\n", line.len());
            }
        }
    }
}

/// A service-account token (a JWT in shape) the fake API server knows as shop/web.
const SHOP_WEB_SA: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6c2hvcDp3ZWIifQ.c2lnbmF0dXJl";

/// The API server's answer to a TokenReview: [`SHOP_WEB_SA`] is the service account
/// shop/web, valid for any audience asked about; any other token is invalid.
fn token_review(body: &[u8]) -> Value {
    let asked: Value = serde_json::from_slice(body).unwrap();
    let spec = asked["spec"].clone();
    let status = if spec["token"] == SHOP_WEB_SA {
        json!({"authenticated": true,
               "user": {"username": "system:serviceaccount:shop:web",
                        "groups": ["system:serviceaccounts", "system:serviceaccounts:shop",
                                   "system:authenticated"]},
               "audiences": spec["audiences"]})
    } else {
        json!({"user": {}, "error": "[invalid bearer token, token lookup failed]"})
    };
    json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
           "metadata": {"creationTimestamp": null}, "spec": spec, "status": status})
}

fn respond(conn: &mut TcpStream, status: u16, body: &Value) {
    let body = serde_json::to_vec(body).unwrap();
    let _ = write!(
        conn,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(&body);
}

/// A bounded plain-HTTP GET; returns the status and body.
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// Starts the built controller against the fake API server at `url`, with files in `dir`
/// and `extra` flags.
fn start_controller(dir: &std::path::Path, url: &str, extra: &[&str]) -> Sidemesh {
    start_controller_env(dir, url, extra, &[])
}

/// [`start_controller`] with more environment variables.
fn start_controller_env(
    dir: &std::path::Path,
    url: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Sidemesh {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\nusers:\n- name: u\n  user:\n    token: test\ncontexts:\n- name: c\n  context:\n    cluster: fake\n    user: u\ncurrent-context: c\n"
    )).unwrap();
    let certs = sidemesh_controller::install::generate_certs(&["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("tls.crt"), certs.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), certs.key_pem).unwrap();
    let crt = dir.join("tls.crt");
    let key = dir.join("tls.key");
    let mut args = vec![
        "controller",
        "--webhook-listen",
        "127.0.0.1:0",
        "--discover-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--tls-cert",
        crt.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--native-sidecars",
        "true",
    ];
    args.extend_from_slice(extra);
    let mut vars = vec![
        ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ("KUBERNETES_SERVICE_HOST", ""),
    ];
    vars.extend_from_slice(env);
    Sidemesh::start(&args, &vars)
}

/// A bounded GET to discover with an optional bearer token; returns the status.
fn get_with(discover: &str, path: &str, token: Option<&str>) -> Option<u16> {
    let mut s = TcpStream::connect(discover).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

/// With service-account tokens on (the environment variable the installed manifests set),
/// the hosted discover asks the API server (a TokenReview) who a bearer token belongs to:
/// a service account gets its own namespace's workloads only, an invalid token 401; a token
/// the token file lists is judged by the file, for grants across namespaces.
#[test]
fn controller_discover_reviews_service_account_tokens() {
    let (_api, url) = FakeApi::start();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        "tokens:\n  - {name: ops, token: ops-secret, identities: [\"*\"]}\n",
    )
    .unwrap();
    let controller = start_controller_env(
        dir.path(),
        &url,
        &["--discover-tokens", tokens.to_str().unwrap()],
        &[("SIDEMESH_DISCOVER_SERVICE_ACCOUNT_TOKENS", "true")],
    );
    let discover = controller.addr("discover");
    let web = "/v1/sidecars/shop/web/sidemesh-proxy";
    eventually(Duration::from_secs(20), || {
        (get_with(&discover, web, Some(SHOP_WEB_SA))? == 200).then_some(())
    })
    .expect("discover serves shop/web to the service account shop/web");
    // Another workload of the namespace: allowed; another namespace: not.
    let mysql = "/v1/sidecars/shop/mysql/sidemesh-proxy";
    assert_eq!(get_with(&discover, mysql, Some(SHOP_WEB_SA)), Some(200));
    let other = "/v1/sidecars/bank/ledger/sidemesh-proxy";
    assert_eq!(get_with(&discover, other, Some(SHOP_WEB_SA)), Some(403));
    let unknown = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJub2JvZHkifQ.c2lnbmF0dXJl";
    assert_eq!(get_with(&discover, web, Some(unknown)), Some(401));
    assert_eq!(get_with(&discover, web, None), Some(401));
    // The file's token reaches across namespaces without a review.
    assert_eq!(get_with(&discover, mysql, Some("ops-secret")), Some(200));
    let (_, metrics) = get(&discover, "/metrics").unwrap();
    // Refused: another namespace, an invalid token, none (the waits above were accepted
    // once discover had the service, or 404 before).
    for line in [
        r#"sidemesh_discover_token_reviews_total{result="refused"} 3"#,
        r#"sidemesh_discover_token_reviews_total{result="error"} 0"#,
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
    assert!(!metrics.contains(r#"sidemesh_discover_token_reviews_total{result="accepted"} 0"#));
}

/// With `--discover-tokens`, the hosted discover serves a workload's config only to a
/// bearer token that covers it: 401 without one, 403 for another workload's.
#[test]
fn controller_discover_tokens_guard_configs() {
    let (_api, url) = FakeApi::start();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        "tokens:\n  - {name: web, token: web-secret, identities: [shop/web]}\n",
    )
    .unwrap();
    let controller = start_controller(
        dir.path(),
        &url,
        &["--discover-tokens", tokens.to_str().unwrap()],
    );
    let discover = controller.addr("discover");
    let get_with = |path: &str, token: Option<&str>| get_with(&discover, path, token);
    let web = "/v1/sidecars/shop/web/sidemesh-proxy";
    eventually(Duration::from_secs(20), || {
        (get_with(web, Some("web-secret"))? == 200).then_some(())
    })
    .expect("discover serves shop/web to its token");
    assert_eq!(get_with(web, None), Some(401));
    assert_eq!(get_with(web, Some("wrong")), Some(401));
    assert_eq!(
        get_with("/v1/sidecars/shop/mysql/sidemesh-proxy", Some("web-secret")),
        Some(403)
    );
}

#[test]
fn controller_serves_discover_from_the_cluster() {
    let (api, url) = FakeApi::start();
    let dir = tempfile::tempdir().unwrap();
    let controller = start_controller(dir.path(), &url, &[]);
    assert_eq!(controller.ready["ready"], "controller");
    let admin = controller.addr("admin");
    let discover = controller.addr("discover");
    controller.addr("webhook");

    eventually(Duration::from_secs(20), || {
        (get(&admin, "/ready")?.0 == 200).then_some(())
    })
    .expect("controller ready after the initial sync");
    let config = eventually(Duration::from_secs(20), || {
        let (status, body) = get(&discover, "/v1/sidecars/shop/web/sidemesh-proxy")?;
        (status == 200).then(|| serde_json::from_str::<Value>(&body).unwrap())
    })
    .expect("discover serves shop/web");
    let inbound: Vec<(u64, u64)> = config["inbound"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["port"].as_u64().unwrap(),
                p["port_outer"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(!inbound.is_empty(), "{config}");
    let mysql = config["outbound"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "mysql")
        .unwrap_or_else(|| panic!("{config}"));
    assert_eq!(mysql["ports"][0]["endpoints"][0]["address"], "10.244.3.3");
    assert_eq!(
        config["plugin"]["variables"].as_object().map(|m| m.len()),
        Some(0)
    );
    let shipper = get(&discover, "/v1/sidecars/shop/web/log-shipper").unwrap();
    assert_eq!(shipper.0, 200, "{}", shipper.1);
    assert!(shipper.1.contains("http://logs.ops"));

    // A new mysql endpoint, pushed as a watch event, reaches web's config.
    let fixture: Value = serde_json::from_str(CLUSTER).unwrap();
    let mut slice = fixture["endpointslices"][1].clone();
    slice["endpoints"]
        .as_array_mut()
        .unwrap()
        .push(json!({"addresses": ["10.244.3.4"], "conditions": {"ready": true}}));
    slice["metadata"]["resourceVersion"] = "101".into();
    api.push("endpointslices", "MODIFIED", slice);
    eventually(Duration::from_secs(20), || {
        let (_, body) = get(&discover, "/v1/sidecars/shop/web/sidemesh-proxy")?;
        body.contains("10.244.3.4").then_some(())
    })
    .expect("the new endpoint reaches the config");
}
