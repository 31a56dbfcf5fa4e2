//! Controller scale harness: a fake Kubernetes API server (plain HTTP on loopback, real
//! list/watch JSON) holding N Services with M endpoints each (every endpoint an injected pod,
//! every service a MeshConfig depending on the next three), the real `sidemesh controller`
//! pointed at it through a kubeconfig, and timed EndpointSlice changes: from the watch event
//! to the new endpoint in a dependent sidecar's config, read by long-polling discover.
//! Prints the initial sync time, change latencies and the controller's RSS as JSON.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// The sidemesh binary.
    #[arg(long, default_value = "target/release/sidemesh")]
    sidemesh: String,
    /// Namespaces.
    #[arg(long, default_value_t = 100)]
    namespaces: usize,
    /// Services per namespace.
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Endpoints (pods) per service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Timed EndpointSlice changes.
    #[arg(long, default_value_t = 20)]
    changes: usize,
}

type Tx = futures::channel::mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>;

#[derive(Default)]
struct Api {
    /// Pre-serialised list bodies by resource.
    lists: BTreeMap<String, Bytes>,
    /// Objects by name, for status PATCH answers.
    by_name: BTreeMap<String, Bytes>,
    watchers: Mutex<BTreeMap<String, Vec<Tx>>>,
}

fn ip(n: usize) -> String {
    format!("10.{}.{}.{}", 1 + n / 65536, (n / 256) % 256, n % 256)
}

fn build(args: &Args) -> (Api, Vec<Value>) {
    let mut namespaces = Vec::new();
    let mut services = vec![json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kube-dns", "namespace": "kube-system"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}})];
    let mut slices = Vec::new();
    let mut pods = Vec::new();
    let mut meshes = Vec::new();
    let mut by_name = BTreeMap::new();
    let mut n = 0usize;
    for i in 0..args.namespaces {
        let ns = format!("ns-{i}");
        namespaces.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"sidemesh.io/inject": "enabled"}}}));
        for j in 0..args.services {
            let svc = format!("svc-{j}");
            services.push(json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": svc, "namespace": ns},
                "spec": {"clusterIP": "10.97.0.1", "selector": {"app.kubernetes.io/name": svc},
                         "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}));
            let mut endpoints = Vec::new();
            for k in 0..args.endpoints {
                let pod = format!("{svc}-{k}");
                endpoints.push(json!({"addresses": [ip(n)], "conditions": {"ready": true},
                    "targetRef": {"kind": "Pod", "namespace": ns, "name": pod}, "zone": "z1"}));
                pods.push(json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": pod, "namespace": ns,
                        "labels": {"app.kubernetes.io/name": svc},
                        "annotations": {"sidemesh.io/injected": "0.1.0", "sidemesh.io/port-map": "{\"8080\":28080}"}},
                    "spec": {"containers": [{"name": "app", "image": "app:1"}]}}));
                n += 1;
            }
            slices.push(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{svc}-s"), "namespace": ns, "resourceVersion": "1",
                             "labels": {"kubernetes.io/service-name": svc}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 28080, "protocol": "TCP"}],
                "endpoints": endpoints}));
            let deps: Vec<Value> = (1..=3)
                .map(|d| json!({"service": format!("svc-{}", (j + d) % args.services)}))
                .collect();
            let mesh = json!({"apiVersion": "sidemesh.io/v1alpha1", "kind": "MeshConfig",
                "metadata": {"name": svc, "namespace": ns, "generation": 1},
                "spec": {"dependencies": deps}});
            by_name.insert(
                format!("{ns}/{svc}"),
                Bytes::from(serde_json::to_vec(&mesh).unwrap_or_default()),
            );
            meshes.push(mesh);
        }
    }
    let list = |items: &[Value]| {
        Bytes::from(
            serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "List",
                "metadata": {"resourceVersion": "1"}, "items": items}))
            .unwrap_or_default(),
        )
    };
    let mut lists = BTreeMap::new();
    lists.insert("namespaces".to_owned(), list(&namespaces));
    lists.insert("services".to_owned(), list(&services));
    lists.insert("endpointslices".to_owned(), list(&slices));
    lists.insert("pods".to_owned(), list(&pods));
    lists.insert("meshconfigs".to_owned(), list(&meshes));
    lists.insert("plugins".to_owned(), list(&[]));
    (
        Api {
            lists,
            by_name,
            watchers: Mutex::default(),
        },
        slices,
    )
}

async fn answer(
    api: Arc<Api>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let full = |status: u16, b: Bytes| {
        let mut r = Response::new(BoxBody::new(Full::new(b)));
        *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
        r.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/json"),
        );
        r
    };
    if req.method() == http::Method::PATCH {
        // .../namespaces/{ns}/meshconfigs/{name}/status
        let parts: Vec<&str> = path.split('/').collect();
        let key = match parts.iter().position(|p| *p == "namespaces") {
            Some(i) if parts.len() > i + 3 => format!("{}/{}", parts[i + 1], parts[i + 3]),
            _ => String::new(),
        };
        let body = api
            .by_name
            .get(&key)
            .cloned()
            .unwrap_or_else(|| Bytes::from_static(b"{}"));
        return Ok(full(200, body));
    }
    let resource = path.rsplit('/').next().unwrap_or("").to_owned();
    let Some(list) = api.lists.get(&resource).cloned() else {
        return Ok(full(
            404,
            Bytes::from_static(b"{\"kind\":\"Status\",\"code\":404}"),
        ));
    };
    if query.contains("watch=true") {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        if let Ok(mut w) = api.watchers.lock() {
            w.entry(resource).or_default().push(tx);
        }
        return Ok(Response::new(BoxBody::new(StreamBody::new(rx))));
    }
    Ok(full(200, list))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One bounded GET to discover; returns (status, etag, body).
async fn get(
    addr: SocketAddr,
    path: &str,
    etag: Option<&str>,
) -> anyhow::Result<(u16, Option<String>, String)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "discover");
    if let Some(e) = etag {
        req = req.header("if-none-match", e);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::new()))?)
        .await?;
    let status = resp.status().as_u16();
    let etag = resp
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, etag, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let (api, mut slices) = build(&args);
    let api = Arc::new(api);
    eprintln!(
        "generated {} services, {} endpoints in {:?}",
        slices.len(),
        slices.len() * args.endpoints,
        started.elapsed()
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api_addr = listener.local_addr()?;
    let a = api.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let a = a.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| answer(a.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });

    let dir =
        std::env::temp_dir().join(format!("sidemesh-controller-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: f\n  cluster:\n    server: http://{api_addr}\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: c\n  context:\n    cluster: f\n    user: u\ncurrent-context: c\n"
        ),
    )?;
    // The webhook needs a certificate; `sidemesh install` prints one in its Secret.
    let install = Command::new(&args.sidemesh)
        .arg("install")
        .output()
        .context("run sidemesh install")?;
    let text = String::from_utf8_lossy(&install.stdout);
    // The Secret's `tls.crt` (not `ca.crt`) and `tls.key`.
    let pem = |marker: &str| -> Option<String> {
        let from = text.find("tls.crt:")?;
        let start = text[from..].find(&format!("-----BEGIN {marker}-----"))? + from;
        let end = text[start..].find(&format!("-----END {marker}-----"))? + start;
        let block = &text[start..end + format!("-----END {marker}-----").len()];
        Some(block.lines().map(str::trim).collect::<Vec<_>>().join("\n") + "\n")
    };
    std::fs::write(
        dir.join("tls.crt"),
        pem("CERTIFICATE").context("no certificate")?,
    )?;
    std::fs::write(dir.join("tls.key"), pem("PRIVATE KEY").context("no key")?)?;

    let spawned = Instant::now();
    let mut child = Command::new(&args.sidemesh)
        .args([
            "controller",
            "--webhook-listen",
            "127.0.0.1:0",
            "--discover-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--native-sidecars",
            "true",
        ])
        .arg("--tls-cert")
        .arg(dir.join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.join("tls.key"))
        // One replica, and the fake API server has no Lease API.
        .arg("--leader-elect")
        .arg("false")
        .env("KUBECONFIG", &kubeconfig)
        .env("KUBERNETES_SERVICE_HOST", "")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("spawn sidemesh controller")?;
    let pid = child.id();
    let result = async {
        let stdout = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let ready: Value = serde_json::from_str(&line).context("ready line")?;
        let discover: SocketAddr = ready["discover"]
            .as_str()
            .context("discover addr")?
            .parse()?;
        let admin: SocketAddr = ready["admin"].as_str().context("admin addr")?.parse()?;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Ok((200, _, _)) = get(admin, "/ready", None).await {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "not ready within 600 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let sync = spawned.elapsed();
        // Wait for discover to serve the first sidecar too.
        let first = "/v1/sidecars/ns-0/svc-0/sidemesh-proxy";
        loop {
            if let Ok((200, _, _)) = get(discover, first, None).await {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "discover not serving within 600 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let served = spawned.elapsed();
        let rss_synced = rss_kib(pid);
        let mut latencies = Vec::new();
        for c in 0..args.changes {
            // Change service j in namespace i; svc-(j-1) depends on it.
            let i = (c * 7) % args.namespaces;
            let j = (c * 13 + 5) % args.services;
            let dependent = format!(
                "/v1/sidecars/ns-{i}/svc-{}/sidemesh-proxy",
                (j + args.services - 1) % args.services
            );
            let (_, etag, _) = get(discover, &dependent, None).await?;
            let idx = i * args.services + j;
            let new_ip = format!("10.250.{}.{}", c / 256, c % 256);
            let slice = &mut slices[idx];
            if let Some(eps) = slice["endpoints"].as_array_mut() {
                eps.push(json!({"addresses": [new_ip], "conditions": {"ready": true}}));
            }
            slice["metadata"]["resourceVersion"] = json!((c + 2).to_string());
            let event = format!("{}\n", json!({"type": "MODIFIED", "object": slice}));
            let t0 = Instant::now();
            if let Ok(w) = api.watchers.lock() {
                for tx in w.get("endpointslices").into_iter().flatten() {
                    let _ = tx.unbounded_send(Ok(Frame::data(Bytes::from(event.clone()))));
                }
            }
            let mut etag = etag;
            loop {
                let path = format!("{dependent}?wait=10");
                let (status, e, body) = get(discover, &path, etag.as_deref()).await?;
                if status == 200 && body.contains(&new_ip) {
                    break;
                }
                if e.is_some() {
                    etag = e;
                }
                anyhow::ensure!(
                    t0.elapsed() < Duration::from_secs(60),
                    "change {c} not seen in 60 s"
                );
            }
            latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        let rss_after = rss_kib(pid);
        // Where the time goes: the controller's index builds and discover's re-renders.
        let (_, _, metrics) = get(admin, "/metrics", None).await?;
        let timing: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                !l.starts_with('#') && (l.contains("_seconds_sum") || l.contains("_seconds_count"))
            })
            .collect();
        eprintln!("{}", timing.join("\n"));
        latencies.sort_by(f64::total_cmp);
        let endpoints = slices.len() * args.endpoints;
        println!(
            "{}",
            json!({
                "services": slices.len(),
                "endpoints": endpoints,
                "initial_sync_seconds": sync.as_secs_f64(),
                "first_config_served_seconds": served.as_secs_f64(),
                "change_to_config_ms": {
                    "p50": sidemesh_bench::percentile(&latencies, 50.0),
                    "p90": sidemesh_bench::percentile(&latencies, 90.0),
                    "max": latencies.last(),
                    "samples": latencies.len(),
                },
                "controller_rss_mib": {
                    "after_sync": rss_synced.map(|k| k / 1024),
                    "after_changes": rss_after.map(|k| k / 1024),
                },
            })
        );
        anyhow::Ok(())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
