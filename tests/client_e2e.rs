//! The polling client (`sidemesh_api::client`) against the real `sidemesh discover`: first
//! fetch, a state-file edit reaching it through a long poll, a restart from its disk copy
//! while discover is down, and a clear failure on an unknown sidecar.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::Sidemesh;
use sidemesh_api::client::STATE_FILE;
use sidemesh_api::{Client, ClientConfig, Snapshot};
use tokio::sync::watch;

fn state(backend_instances: &[&str]) -> String {
    let instances: Vec<String> = backend_instances
        .iter()
        .map(|a| format!("{{address: {a}, meshed: true}}"))
        .collect();
    format!(
        "services:
  - namespace: demo
    name: web
    ports: [{{port: 8000, port_outer: 18000, protocol: http1}}]
    use_services: [{{service: backend}}]
  - namespace: demo
    name: backend
    ports: [{{port: 8080, port_outer: 18080, protocol: http1}}]
    instances: [{}]
",
        instances.join(", ")
    )
}

fn client(
    url: String,
    state_dir: &std::path::Path,
) -> (watch::Receiver<Option<Snapshot>>, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let cfg = ClientConfig {
        url,
        state_dir: Some(state_dir.to_owned()),
        wait: Duration::from_secs(20),
        authorization: None,
        token_file: None,
        metrics_prefix: "sidemesh_test".to_owned(),
    };
    let (rx, _task) = Client::new(cfg, &registry)
        .unwrap()
        .with_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .spawn();
    (rx, registry)
}

fn backend_addresses(s: &Snapshot) -> Vec<String> {
    let (_, svc) = s
        .outbound_by_name("demo", "backend")
        .expect("backend is a dependency");
    let mut v: Vec<String> = svc.ports[0]
        .endpoints
        .iter()
        .map(|e| e.address.to_string())
        .collect();
    v.sort();
    v
}

async fn wait_for(
    rx: &mut watch::Receiver<Option<Snapshot>>,
    what: &str,
    f: impl FnMut(&Option<Snapshot>) -> bool,
) -> Snapshot {
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(f))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap()
        .clone()
        .unwrap()
}

fn counter(registry: &prometheus::Registry, name: &str, reason: &str) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric())
        .find(|m| m.get_label().iter().any(|l| l.value() == reason))
        .map(|m| m.get_counter().get_value())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_follows_discover_and_restarts_from_its_disk_copy() {
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("state.yaml");
    std::fs::write(&state_file, state(&["127.0.0.11"])).unwrap();
    let data = dir.path().join("data");
    let sidecar_dir = dir.path().join("sidecar");
    let mut discover = Sidemesh::start(
        &[
            "discover",
            "--state",
            state_file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[],
    );
    let url = format!(
        "http://{}/v1/sidecars/demo/web/sidemesh-proxy",
        discover.addr("listen")
    );

    let (mut rx, _registry) = client(url.clone(), &sidecar_dir);
    let first = wait_for(&mut rx, "the first config", Option::is_some).await;
    assert_eq!(first.identity().service, "web");
    assert_eq!(backend_addresses(&first), ["127.0.0.11"]);

    // An edit of the state file reaches the client through its long poll.
    let tmp = dir.path().join("state.yaml.tmp");
    std::fs::write(&tmp, state(&["127.0.0.11", "127.0.0.12"])).unwrap();
    std::fs::rename(&tmp, &state_file).unwrap();
    let second = wait_for(&mut rx, "the edit", |s| {
        s.as_ref().is_some_and(|s| backend_addresses(s).len() == 2)
    })
    .await;
    assert!(second.version() > first.version());
    // The disk copy follows (written right after publishing).
    let on_disk = common::eventually(Duration::from_secs(5), || {
        let bytes = std::fs::read(sidecar_dir.join(STATE_FILE)).ok()?;
        let s = Snapshot::from_json(&bytes).ok()?;
        (s.version() == second.version()).then_some(s)
    });
    assert!(
        on_disk.is_some(),
        "the disk copy never reached the new version"
    );

    // Discover goes away; a restarted sidecar starts from its disk copy.
    discover.terminate(Duration::from_secs(10));
    drop(discover);
    let (rx, registry) = client(url, &sidecar_dir);
    let held = rx.borrow().clone().expect("the disk copy is held at once");
    assert_eq!(held.version(), second.version());
    assert_eq!(backend_addresses(&held), ["127.0.0.11", "127.0.0.12"]);
    let failed = common::eventually(Duration::from_secs(5), || {
        (counter(
            &registry,
            "sidemesh_test_discover_poll_errors_total",
            "connect",
        ) >= 1.0)
            .then_some(())
    });
    assert!(failed.is_some(), "no connect error was counted");
    assert_eq!(rx.borrow().as_ref().unwrap().version(), second.version());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_sidecar_is_an_error_not_a_config() {
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("state.yaml");
    std::fs::write(&state_file, state(&["127.0.0.11"])).unwrap();
    let discover = Sidemesh::start(
        &[
            "discover",
            "--state",
            state_file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let url = format!(
        "http://{}/v1/sidecars/demo/nope/sidemesh-proxy",
        discover.addr("listen")
    );
    let (rx, registry) = client(url, &dir.path().join("sidecar"));
    let failed = common::eventually(Duration::from_secs(5), || {
        (counter(
            &registry,
            "sidemesh_test_discover_poll_errors_total",
            "status",
        ) >= 2.0)
            .then_some(())
    });
    assert!(failed.is_some(), "the 404s were not counted as errors");
    assert!(rx.borrow().is_none());
}
