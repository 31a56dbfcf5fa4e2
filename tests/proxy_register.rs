//! End-to-end test of universal mode: `sidemesh discover` with a state file that defines the
//! services but no instances; a backend instance's `sidemesh proxy --register` announces
//! itself in the TTL registry, a client sidecar then reaches it, and on SIGTERM the
//! registration is deleted so the client no longer sees the instance. The service maps its
//! port (service port ≠ app port ≠ `port_outer`), so a registration that announced the app
//! port instead of the service port would leave the client with no endpoint.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use common::{Sidemesh, eventually, free_port};

const WAIT: Duration = Duration::from_secs(20);

fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    Some((status, out.split_once("\r\n\r\n")?.1.to_owned()))
}

#[test]
fn registered_instance_is_reachable_and_leaves_on_sigterm() {
    let n = std::process::id();
    let (a, b) = (2 + (n % 240) as u8, 2 + ((n >> 8) % 240) as u8);
    let instance = Ipv4Addr::new(127, a, b, 21);
    let client = Ipv4Addr::new(127, a, b, 22);
    // The service maps its port: clients dial `port`, the app listens on `app`, and the
    // instance's sidecar on `outer`. The registration must name the service port.
    let (port, app, outer) = (free_port(client), free_port(instance), free_port(instance));
    let yaml = format!(
        "services:\n\
         - namespace: demo\n  name: web\n  ports: [{{port: 8000, port_outer: 18000, protocol: http1}}]\n  use_services: [{{service: backend}}]\n\
         - namespace: demo\n  name: backend\n  ports: [{{port: {port}, target_port: {app}, port_outer: {outer}, protocol: http1}}]\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state.yaml");
    std::fs::write(&file, yaml).unwrap();

    let discover = Sidemesh::start(
        &[
            "discover",
            "--state",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let base = format!("http://{}", discover.addr("listen"));
    let _app = Sidemesh::start(
        &[
            "demo-backend",
            "--listen",
            &format!("{instance}:{app}"),
            "--name",
            "inst-a",
        ],
        &[],
    );
    let backend_url = format!("{base}/v1/sidecars/demo/backend/sidemesh-proxy");
    let mut backend_sidecar = Sidemesh::start(
        &[
            "proxy",
            "--admin",
            "127.0.0.1:0",
            "--discover-wait",
            "1s",
            "--inbound-address",
            &instance.to_string(),
            "--app-address",
            &instance.to_string(),
            "--register",
            "--instance-name",
            "inst-a",
            "--register-ttl",
            "5s",
            "--drain-timeout",
            "2s",
        ],
        &[("DISCOVER_URL", backend_url.as_str())],
    );
    let web_url = format!("{base}/v1/sidecars/demo/web/sidemesh-proxy");
    let _client_sidecar = Sidemesh::start(
        &[
            "proxy",
            "--admin",
            "127.0.0.1:0",
            "--discover-wait",
            "1s",
            "--inbound-address",
            &client.to_string(),
        ],
        &[("DISCOVER_URL", web_url.as_str())],
    );
    let disc = discover.addr("listen");
    let (_, config) = http_get(&disc, "/v1/sidecars/demo/web/sidemesh-proxy").unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let svc = config["outbound"][0]["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let target = format!("{svc}:{port}");

    // The client's config lists the instance at its sidecar's port under the service port.
    let endpoint = eventually(WAIT, || {
        let (_, c) = http_get(&disc, "/v1/sidecars/demo/web/sidemesh-proxy")?;
        let c: serde_json::Value = serde_json::from_str(&c).ok()?;
        let p = c["outbound"][0]["ports"]
            .as_array()?
            .iter()
            .find(|p| p["port"] == port)?
            .clone();
        p["endpoints"].as_array()?.first().cloned()
    })
    .expect("the registered instance appears under the service port");
    assert_eq!(endpoint["address"], instance.to_string(), "{endpoint}");
    assert_eq!(endpoint["port"], outer, "{endpoint}");
    assert_eq!(endpoint["meshed"], true, "{endpoint}");

    let reached = eventually(WAIT, || {
        http_get(&target, "/").filter(|(s, body)| *s == 200 && body.contains("inst-a"))
    });
    assert!(
        reached.is_some(),
        "client never reached the registered instance"
    );

    let exit = backend_sidecar
        .terminate(WAIT)
        .expect("backend sidecar exits");
    assert!(exit.success(), "{exit:?}");
    let gone = eventually(WAIT, || http_get(&target, "/").filter(|(s, _)| *s == 503));
    assert!(gone.is_some(), "deregistered instance still served");
}
