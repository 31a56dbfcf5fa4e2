//! The watch wiring through `kube::Client` over a `tower_test` mock API server that speaks
//! real Kubernetes list/watch JSON: the initial lists (readiness only after all synced),
//! watch events, and a 410 Gone restart that re-lists without ever publishing a half state.
//! Also checks the status conditions written to invalid sidemesh objects.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a failed unwrap is a failed test.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use sidemesh_api::state::ClusterState;
use sidemesh_controller::cli::{self, DiscoverHost, InjectSettings};

type MockBody = BoxBody<Bytes, Infallible>;
type Tx = futures::channel::mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>;

/// The resources the controller watches, by the last path segment of their list URL.
const RESOURCES: [&str; 6] = [
    "services",
    "endpointslices",
    "pods",
    "namespaces",
    "plugins",
    "meshconfigs",
];

#[derive(Default)]
struct Cluster {
    objects: BTreeMap<String, Vec<Value>>,
    watchers: BTreeMap<String, Vec<Tx>>,
    resource_version: u64,
    lists: BTreeMap<String, usize>,
    patches: Vec<(String, Value)>,
}

#[derive(Clone)]
struct FakeApi {
    cluster: Arc<Mutex<Cluster>>,
    /// Lists of `pods` wait until this is true (to test readiness before the sync).
    pods_gate: tokio::sync::watch::Sender<bool>,
}

fn resource_of(path: &str) -> Option<&'static str> {
    RESOURCES
        .iter()
        .copied()
        .find(|r| path.ends_with(&format!("/{r}")))
}

fn key(v: &Value) -> (String, String) {
    (
        v["metadata"]["namespace"].as_str().unwrap_or("").to_owned(),
        v["metadata"]["name"].as_str().unwrap_or("").to_owned(),
    )
}

impl FakeApi {
    fn new(fixture: &Value) -> FakeApi {
        let mut c = Cluster {
            resource_version: 100,
            ..Default::default()
        };
        for res in RESOURCES {
            c.objects
                .insert(res.to_owned(), fixture[res].as_array().unwrap().clone());
        }
        let (pods_gate, _) = tokio::sync::watch::channel(true);
        FakeApi {
            cluster: Arc::new(Mutex::new(c)),
            pods_gate,
        }
    }

    fn client(&self) -> kube::Client {
        let (svc, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<MockBody>>();
        let api = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let api = api.clone();
                tokio::spawn(async move {
                    let resp = api.answer(req).await;
                    send.send_response(resp);
                });
            }
        });
        kube::Client::new(svc, "default")
    }

    async fn answer(&self, req: Request<kube::client::Body>) -> Response<MockBody> {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        if req.method() == http::Method::PATCH {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let patch: Value = serde_json::from_slice(&body).unwrap();
            let mut c = self.cluster.lock().unwrap();
            c.patches.push((path.clone(), patch));
            // Answer with the object (any stored one with that name will do for the client).
            let name = path
                .trim_end_matches("/status")
                .rsplit('/')
                .next()
                .unwrap()
                .to_owned();
            let obj = c
                .objects
                .values()
                .flatten()
                .find(|o| o["metadata"]["name"] == name.as_str())
                .cloned()
                .unwrap_or(Value::Null);
            return json_response(200, &obj);
        }
        let Some(resource) = resource_of(&path) else {
            return json_response(
                404,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}),
            );
        };
        if query.contains("watch=true") {
            let (tx, rx) = futures::channel::mpsc::unbounded();
            self.cluster
                .lock()
                .unwrap()
                .watchers
                .entry(resource.to_owned())
                .or_default()
                .push(tx);
            let mut resp = Response::new(BoxBody::new(StreamBody::new(rx)));
            *resp.status_mut() = http::StatusCode::OK;
            return resp;
        }
        if resource == "pods" {
            let mut gate = self.pods_gate.subscribe();
            let _ = gate.wait_for(|open| *open).await;
        }
        let mut c = self.cluster.lock().unwrap();
        *c.lists.entry(resource.to_owned()).or_default() += 1;
        let list = json!({
            "apiVersion": "v1", "kind": "List",
            "metadata": {"resourceVersion": c.resource_version.to_string()},
            "items": c.objects[resource],
        });
        json_response(200, &list)
    }

    /// Changes an object and tells the watchers (`ADDED` or `MODIFIED`).
    fn apply(&self, resource: &str, mut obj: Value) {
        let mut c = self.cluster.lock().unwrap();
        c.resource_version += 1;
        obj["metadata"]["resourceVersion"] = c.resource_version.to_string().into();
        let objs = c.objects.get_mut(resource).unwrap();
        let kind = match objs.iter().position(|o| key(o) == key(&obj)) {
            Some(i) => {
                objs[i] = obj.clone();
                "MODIFIED"
            }
            None => {
                objs.push(obj.clone());
                "ADDED"
            }
        };
        let line = format!("{}\n", json!({"type": kind, "object": obj}));
        for tx in c.watchers.get(resource).into_iter().flatten() {
            let _ = tx.unbounded_send(Ok(Frame::data(Bytes::from(line.clone()))));
        }
    }

    /// Replaces a resource's objects without telling anyone (events lost), then ends every
    /// watch of it with `410 Gone`, as the API server does when the resourceVersion expired.
    fn replace_then_gone(&self, resource: &str, objs: Vec<Value>) {
        let mut c = self.cluster.lock().unwrap();
        c.resource_version += 10;
        c.objects.insert(resource.to_owned(), objs);
        let gone = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version: 100 (110)", "reason": "Expired", "code": 410}});
        let line = format!("{gone}\n");
        for tx in c.watchers.remove(resource).unwrap_or_default() {
            let _ = tx.unbounded_send(Ok(Frame::data(Bytes::from(line.clone()))));
        }
    }
}

fn json_response(status: u16, v: &Value) -> Response<MockBody> {
    let mut resp = Response::new(BoxBody::new(Full::new(Bytes::from(
        serde_json::to_vec(v).unwrap(),
    ))));
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp
}

/// Records every state the controller publishes.
#[derive(Default)]
struct Recorder {
    states: Mutex<Vec<ClusterState>>,
}

impl DiscoverHost for Recorder {
    fn serve(&self, _listener: tokio::net::TcpListener) -> std::io::Result<()> {
        Ok(())
    }
    fn review_tokens(
        &self,
        _reviews: sidemesh_controller::review::TokenReviews,
    ) -> anyhow::Result<()> {
        panic!("these tests run without --discover-service-account-tokens")
    }
    fn set_state(&self, state: ClusterState) {
        self.states.lock().unwrap().push(state);
    }
    /// Records the last state with the delta applied, as discover would serve it.
    fn apply(&self, upsert: Vec<sidemesh_api::state::Service>, remove: Vec<(String, String)>) {
        let mut states = self.states.lock().unwrap();
        let mut next = states
            .last()
            .cloned()
            .expect("a delta before any full state");
        next.services.retain(|s| {
            !remove
                .iter()
                .any(|(ns, n)| (&s.namespace, &s.name) == (ns, n))
        });
        for svc in upsert {
            match next
                .services
                .iter_mut()
                .find(|s| (&s.namespace, &s.name) == (&svc.namespace, &svc.name))
            {
                Some(s) => *s = svc,
                None => next.services.push(svc),
            }
        }
        states.push(next);
    }
}

fn args(dir: &std::path::Path) -> cli::Args {
    let certs = sidemesh_controller::install::generate_certs(&["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("tls.crt"), certs.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), certs.key_pem).unwrap();
    cli::Args {
        webhook_listen: "127.0.0.1:0".parse().unwrap(),
        discover_listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        tls_cert: dir.join("tls.crt"),
        tls_key: dir.join("tls.key"),
        tls_reload_seconds: 60,
        index_debounce_ms: 10,
        // Elected over the Lease API in tests/lease_mock.rs; this fake API has no leases.
        leader_elect: false,
        lease: "sidemesh/sidemesh-controller".into(),
        pod_name: None,
        cluster_dns: "kube-system/kube-dns".into(),
        settings: InjectSettings {
            proxy_image: "sidemesh:test".into(),
            discover_base: "http://discover".into(),
            native_sidecars: Some(true),
            proxy_admin_port: 15021,
            proxy_memory_mib: 64,
            proxy_cpu_millis: 50,
            cluster_domain: "cluster.local".into(),
            discover_service_account_tokens: false,
        },
    }
}

/// Polls `f` every 10 ms until it is true; fails after 20 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn fixture() -> Value {
    serde_json::from_str(include_str!("../testdata/cluster.json")).unwrap()
}

#[tokio::test]
async fn lists_then_events_then_410_gone_without_half_states() {
    let fixture = fixture();
    let api = FakeApi::new(&fixture);
    api.pods_gate.send_replace(false);
    let dir = tempfile::tempdir().unwrap();
    let recorder = Arc::new(Recorder::default());
    let registry = prometheus::Registry::new();
    let running = cli::start(args(dir.path()), &registry, api.client(), recorder.clone())
        .await
        .unwrap();
    let line: Value = serde_json::from_str(&running.ready_line()).unwrap();
    assert_eq!(line["ready"], "controller");

    // Every list but the pods' is served: nothing is published, the controller is not ready.
    eventually("five lists", || {
        api.cluster.lock().unwrap().lists.len() == 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(recorder.states.lock().unwrap().is_empty());
    assert!(!running.ready.load(std::sync::atomic::Ordering::SeqCst));
    let admin = format!("http://{}/ready", running.admin);
    assert_eq!(get_status(&admin).await, 503);

    // The pods list arrives: one complete state, and ready.
    api.pods_gate.send_replace(true);
    eventually("first state", || {
        !recorder.states.lock().unwrap().is_empty()
    })
    .await;
    eventually("ready", || {
        running.ready.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    assert_eq!(get_status(&admin).await, 200);
    let first = recorder.states.lock().unwrap()[0].clone();
    let web = first.service("shop", "web").unwrap();
    assert_eq!(web.instances.len(), 1);
    assert!(first.service("shop", "report").is_some());
    let services = first.services.len();

    // A watch event: the old web pod becomes ready again.
    let mut slice = fixture["endpointslices"][0].clone();
    slice["endpoints"][1]["conditions"]["ready"] = true.into();
    api.apply("endpointslices", slice);
    eventually("two web instances", || {
        let s = recorder.states.lock().unwrap();
        s.last()
            .unwrap()
            .service("shop", "web")
            .unwrap()
            .instances
            .len()
            == 2
    })
    .await;

    // 410 Gone after events were lost: the slices are re-listed and the new list wins.
    let published_before = recorder.states.lock().unwrap().len();
    let mut slice = fixture["endpointslices"][0].clone();
    slice["endpoints"][0]["addresses"] = json!(["10.244.7.7"]);
    let mysql = fixture["endpointslices"][1].clone();
    api.replace_then_gone("endpointslices", vec![slice, mysql]);
    eventually("re-listed slices", || {
        let s = recorder.states.lock().unwrap();
        let web = s.last().unwrap().service("shop", "web").unwrap().clone();
        web.instances.len() == 1 && web.instances[0].address.to_string() == "10.244.7.7"
    })
    .await;
    assert!(api.cluster.lock().unwrap().lists["endpointslices"] >= 2);
    // No state was ever half: every one has every service, each with its instances.
    for s in recorder.states.lock().unwrap().iter() {
        assert_eq!(s.services.len(), services);
        assert!(!s.service("shop", "web").unwrap().instances.is_empty());
        assert_eq!(s.service("shop", "mysql").unwrap().instances.len(), 1);
    }
    assert!(recorder.states.lock().unwrap().len() > published_before);
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        text.contains("sidemesh_controller_watch_errors_total{resource=\"endpointslices\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn invalid_objects_get_status_conditions_that_say_what_to_fix() {
    let api = FakeApi::new(&fixture());
    let dir = tempfile::tempdir().unwrap();
    let recorder = Arc::new(Recorder::default());
    let registry = prometheus::Registry::new();
    let _running = cli::start(args(dir.path()), &registry, api.client(), recorder.clone())
        .await
        .unwrap();
    eventually("four status patches", || {
        api.cluster.lock().unwrap().patches.len() >= 4
    })
    .await;
    let patches = api.cluster.lock().unwrap().patches.clone();
    let find = |suffix: &str| {
        patches
            .iter()
            .find(|(p, _)| p.ends_with(suffix))
            .unwrap_or_else(|| panic!("no patch of {suffix} in {patches:?}"))
            .1["status"]
            .clone()
    };
    let broken = find("/plugins/broken/status");
    assert_eq!(broken["conditions"][0]["status"], "False");
    assert!(
        broken["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("publish at least one version")
    );
    let report = find("/namespaces/shop/meshconfigs/report/status");
    assert!(
        report["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("no valid Plugin named \"broken\"")
    );
    let shipper = find("/plugins/log-shipper/status");
    assert_eq!(shipper["conditions"][0]["status"], "True");
    assert!(shipper["publishedVersions"]["v1"].is_string());
    let web = find("/namespaces/shop/meshconfigs/web/status");
    assert_eq!(web["conditions"][0]["status"], "True");
    assert_eq!(web["observedGeneration"], 2);
}

async fn get_status(url: &str) -> u16 {
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let tcp = tokio::net::TcpStream::connect(authority).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", authority)
        .body(Full::new(Bytes::new()))
        .unwrap();
    sender.send_request(req).await.unwrap().status().as_u16()
}

#[tokio::test]
async fn opted_in_numeric_target_ports_are_patched_to_the_proxy_names() {
    let mut fixture = fixture();
    for svc in fixture["services"].as_array_mut().unwrap() {
        if svc["metadata"]["name"] == "web" {
            svc["metadata"]["annotations"] = json!({"sidemesh.io/rewrite-target-ports": "enabled"});
        }
    }
    for pod in fixture["pods"].as_array_mut().unwrap() {
        if pod["metadata"]["name"] == "web-7c9f8d6b5-x2x9q" {
            pod["metadata"]["annotations"]["sidemesh.io/port-names"] =
                r#"{"8080":"http","9000":"sm-29000","8081":"sm-28081"}"#.into();
        }
    }
    let api = FakeApi::new(&fixture);
    let dir = tempfile::tempdir().unwrap();
    let recorder = Arc::new(Recorder::default());
    let registry = prometheus::Registry::new();
    let _running = cli::start(args(dir.path()), &registry, api.client(), recorder.clone())
        .await
        .unwrap();
    let path = "/api/v1/namespaces/shop/services/web";
    eventually("a patch of the web Service", || {
        api.cluster
            .lock()
            .unwrap()
            .patches
            .iter()
            .any(|(p, _)| p == path)
    })
    .await;
    let patches = api.cluster.lock().unwrap().patches.clone();
    let (_, patch) = patches.iter().find(|(p, _)| p == path).unwrap();
    let ports = patch["spec"]["ports"].as_array().unwrap();
    assert!(
        ports.iter().any(|p| p["targetPort"] == "sm-29000"),
        "{patch}"
    );
    assert_eq!(
        patch["metadata"]["annotations"]["sidemesh.io/original-target-ports"],
        r#"{"8081":8081,"9000":9000}"#
    );
    // No other Service opted in.
    assert!(
        patches
            .iter()
            .all(|(p, _)| !p.contains("/services/") || p == path)
    );
}
