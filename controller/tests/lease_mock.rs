//! Leader election through `kube::Client` over a `tower_test` mock API server that keeps one
//! Lease the way the API server does (404 until created, 409 on a stale `resourceVersion`):
//! acquiring, renewing, following a live holder, taking over an expired lease, and losing a
//! race.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a failed unwrap is a failed test.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};
use sidemesh_controller::lease::{Elector, LeaseConfig};

type MockBody = BoxBody<Bytes, Infallible>;

const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/sidemesh/leases";

#[derive(Default)]
struct Leases {
    lease: Option<Value>,
    version: u64,
    /// Requests seen, as `METHOD path`.
    seen: Vec<String>,
    /// Make the next write lose a race (another replica wrote first).
    bump_before_write: bool,
}

fn respond(status: u16, v: &Value) -> Response<MockBody> {
    let mut resp = Response::new(BoxBody::new(Full::new(Bytes::from(
        serde_json::to_vec(v).unwrap(),
    ))));
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "reason": reason, "code": code, "message": reason})
}

async fn answer(state: &Mutex<Leases>, req: Request<kube::client::Body>) -> Response<MockBody> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut s = state.lock().unwrap();
    s.seen.push(format!("{method} {path}"));
    if s.bump_before_write && method != Method::GET {
        s.bump_before_write = false;
        s.version += 1;
    }
    let named = format!("{PATH}/sidemesh-controller");
    match (method, path.as_str()) {
        (Method::GET, p) if p == named => match &s.lease {
            Some(l) => respond(200, l),
            None => respond(404, &status(404, "NotFound")),
        },
        (Method::POST, PATH) => {
            if s.lease.is_some() {
                return respond(409, &status(409, "AlreadyExists"));
            }
            let mut l: Value = serde_json::from_slice(&body).unwrap();
            s.version += 1;
            l["metadata"]["resourceVersion"] = s.version.to_string().into();
            s.lease = Some(l.clone());
            respond(201, &l)
        }
        (Method::PUT, p) if p == named => {
            let mut l: Value = serde_json::from_slice(&body).unwrap();
            if l["metadata"]["resourceVersion"] != s.version.to_string().as_str() {
                return respond(409, &status(409, "Conflict"));
            }
            s.version += 1;
            l["metadata"]["resourceVersion"] = s.version.to_string().into();
            s.lease = Some(l.clone());
            respond(200, &l)
        }
        _ => respond(404, &status(404, "NotFound")),
    }
}

fn client(state: Arc<Mutex<Leases>>) -> kube::Client {
    let (svc, mut handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<MockBody>>();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            send.send_response(answer(&state, req).await);
        }
    });
    kube::Client::new(svc, "default")
}

fn holder(state: &Mutex<Leases>) -> String {
    state.lock().unwrap().lease.as_ref().unwrap()["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn acquire_renew_follow_take_over_and_lose() {
    let state = Arc::new(Mutex::new(Leases::default()));
    let a = Elector::new(
        client(state.clone()),
        LeaseConfig::new("sidemesh", "sidemesh-controller", "pod-a"),
    );
    let b = Elector::new(
        client(state.clone()),
        LeaseConfig::new("sidemesh", "sidemesh-controller", "pod-b"),
    );
    let t0: Timestamp = "2026-11-22T03:00:00Z".parse().unwrap();
    let later = |s: i64| t0.checked_add(SignedDuration::from_secs(s)).unwrap();

    // Acquire: no lease yet, so a creates it.
    assert!(a.try_once(t0).await.unwrap());
    assert_eq!(holder(&state), "pod-a");
    assert!(
        state
            .lock()
            .unwrap()
            .seen
            .iter()
            .any(|r| r == &format!("POST {PATH}"))
    );

    // b follows the live holder, and writes nothing.
    let writes = state.lock().unwrap().version;
    assert!(!b.try_once(later(5)).await.unwrap());
    assert_eq!(state.lock().unwrap().version, writes);

    // a renews.
    assert!(a.try_once(later(6)).await.unwrap());
    let lease = state.lock().unwrap().lease.clone().unwrap();
    let renewed: Timestamp = lease["spec"]["renewTime"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(renewed, later(6));
    assert_eq!(lease["spec"]["leaseTransitions"], 0);

    // a stops renewing; 15 s after its last renewal b takes over.
    assert!(!b.try_once(later(20)).await.unwrap());
    assert!(b.try_once(later(22)).await.unwrap());
    assert_eq!(holder(&state), "pod-b");
    let lease = state.lock().unwrap().lease.clone().unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1);

    // a has lost it: it follows now.
    assert!(!a.try_once(later(23)).await.unwrap());

    // A race: the lease expired, but another replica writes between a's read and a's
    // write; the API server refuses the stale write and a does not lead.
    state.lock().unwrap().bump_before_write = true;
    assert!(!a.try_once(later(60)).await.unwrap());
    assert_eq!(holder(&state), "pod-b");
}

#[tokio::test]
async fn run_publishes_leadership() {
    let state = Arc::new(Mutex::new(Leases::default()));
    let mut cfg = LeaseConfig::new("sidemesh", "sidemesh-controller", "pod-a");
    cfg.retry_period = std::time::Duration::from_millis(20);
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(Elector::new(client(state.clone()), cfg).run(tx));
    tokio::time::timeout(std::time::Duration::from_secs(10), rx.wait_for(|l| *l))
        .await
        .expect("leading within 10 s")
        .unwrap();
    // Another replica takes the lease over (as if ours had expired): we step down.
    {
        let mut s = state.lock().unwrap();
        s.version += 1;
        let version = s.version.to_string();
        let lease = s.lease.as_mut().unwrap();
        lease["metadata"]["resourceVersion"] = version.into();
        lease["spec"]["holderIdentity"] = "pod-b".into();
        lease["spec"]["renewTime"] = Timestamp::now().to_string().into();
    }
    tokio::time::timeout(std::time::Duration::from_secs(10), rx.wait_for(|l| !*l))
        .await
        .expect("stepped down within 10 s")
        .unwrap();
    task.abort();
}
