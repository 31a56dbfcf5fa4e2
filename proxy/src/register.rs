//! Universal mode (`sidemesh proxy --register`): outside Kubernetes, the sidecar announces
//! its own workload instance in discover's TTL registry (`PUT
//! /v1/registry/{namespace}/{service}/{instance}`), renews it well before the TTL runs out,
//! re-announces at once when its inbound ports change, and deletes it on shutdown before
//! draining, so clients stop picking it while its last requests finish.
//!
//! What is registered comes from the sidecar's own config: the identity names the service,
//! and every inbound port is announced as `{port: service port, target: port_outer}` with
//! `meshed: true`. That is what discover's registry expects and what a Consul or Linkerd
//! user would: `port` is the port clients of the service use (what they dial on the
//! service's address, and what routes key on), `target` the port other sidecars dial on
//! this instance (its inbound listener), and the app port stays private to the instance
//! (the inbound listener forwards to it). The service port comes from the inbound port's
//! `service_port`; a config without it (older discover) announces the app port, which is
//! right whenever the service does not map ports.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus::IntCounterVec;
use sidemesh_api::Snapshot;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Largest answer body read from discover.
const MAX_ANSWER: usize = 16 * 1024;
/// Time one registry call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// What to register and where.
#[derive(Clone, Debug)]
pub struct RegisterConfig {
    /// Discover's base URL (`http://host:port`), without a path.
    pub base_url: String,
    /// The instance name; `None` uses the config's `identity.pod`, else one made from the
    /// address.
    pub instance: Option<String>,
    /// The address other sidecars dial.
    pub address: IpAddr,
    /// The registration's TTL; renewed every third of it.
    pub ttl: Duration,
}

/// The base URL (`scheme://authority`) of a `DISCOVER_URL`.
pub fn base_of(discover_url: &str) -> Option<String> {
    let uri: http::Uri = discover_url.parse().ok()?;
    Some(format!("{}://{}", uri.scheme_str()?, uri.authority()?))
}

fn instance_name(cfg: &RegisterConfig, snap: &Snapshot) -> String {
    cfg.instance
        .clone()
        .or_else(|| snap.identity().pod.clone())
        .unwrap_or_else(|| {
            let a = cfg.address.to_string().replace(['.', ':'], "-");
            format!("{}-{a}", snap.identity().service)
        })
}

fn body(cfg: &RegisterConfig, snap: &Snapshot) -> serde_json::Value {
    let ports: Vec<_> = snap
        .inbound()
        .iter()
        .map(|p| {
            serde_json::json!({
                "port": p.service_port.map_or(p.port.get(), |s| s.get()),
                "target": p.port_outer.get(),
                "protocol": p.protocol.as_str(),
            })
        })
        .collect();
    let mut b = serde_json::json!({
        "address": cfg.address.to_string(),
        "ports": ports,
        "ttl_seconds": cfg.ttl.as_secs().max(1),
        "meshed": true,
    });
    if let Some(zone) = &snap.identity().zone {
        b["zone"] = serde_json::Value::from(zone.as_str());
    }
    b
}

/// Keeps the registration alive until `stop` fires, then deletes it.
pub async fn run(
    cfg: RegisterConfig,
    mut snapshots: watch::Receiver<Option<Snapshot>>,
    stop: CancellationToken,
    results: IntCounterVec,
) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let renew = (cfg.ttl / 3).max(Duration::from_millis(200));
    let mut registered: Option<String> = None;
    loop {
        let snap = snapshots.borrow_and_update().clone();
        let mut wait = renew;
        if let Some(snap) = snap.filter(|s| !s.inbound().is_empty()) {
            let id = snap.identity();
            let path = format!(
                "/v1/registry/{}/{}/{}",
                id.namespace,
                id.service,
                instance_name(&cfg, &snap)
            );
            if registered.as_ref().is_some_and(|p| *p != path) {
                if let Some(old) = registered.take() {
                    call(&client, &cfg, Method::DELETE, &old, None, &results).await;
                }
            }
            let b = body(&cfg, &snap).to_string();
            if call(&client, &cfg, Method::PUT, &path, Some(b), &results).await {
                registered = Some(path);
            } else {
                // Retry soon: the registration may be about to expire.
                wait = Duration::from_secs(1).min(renew);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
            r = snapshots.changed() => {
                if r.is_err() {
                    stop.cancelled().await;
                    break;
                }
            }
        }
    }
    if let Some(path) = registered {
        call(&client, &cfg, Method::DELETE, &path, None, &results).await;
    }
}

async fn call(
    client: &Client<HttpConnector, Full<Bytes>>,
    cfg: &RegisterConfig,
    method: Method,
    path: &str,
    body: Option<String>,
    results: &IntCounterVec,
) -> bool {
    let op = if method == Method::PUT {
        "put"
    } else {
        "delete"
    };
    let req = Request::builder()
        .method(method)
        .uri(format!("{}{path}", cfg.base_url))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())));
    let Ok(req) = req else {
        results.with_label_values(&[op, "error"]).inc();
        return false;
    };
    let outcome = tokio::time::timeout(CALL_TIMEOUT, async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let text = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map(|c| String::from_utf8_lossy(&c.to_bytes()).into_owned())
            .unwrap_or_default();
        Ok::<_, String>((status, text))
    })
    .await;
    match outcome {
        Ok(Ok((status, _)))
            if status.is_success() || (op == "delete" && status == StatusCode::NOT_FOUND) =>
        {
            results.with_label_values(&[op, "ok"]).inc();
            tracing::debug!(op, path, "registry call done");
            true
        }
        Ok(Ok((status, text))) => {
            results.with_label_values(&[op, "rejected"]).inc();
            tracing::warn!(op, path, %status, answer = %text.trim(), "registry refused the call");
            false
        }
        Ok(Err(e)) => {
            results.with_label_values(&[op, "error"]).inc();
            tracing::warn!(op, path, error = %e, "registry unreachable");
            false
        }
        Err(_) => {
            results.with_label_values(&[op, "error"]).inc();
            tracing::warn!(op, path, "registry call timed out");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_and_body() {
        assert_eq!(
            base_of("http://disc:7070/v1/sidecars/a/b/c?x=1").as_deref(),
            Some("http://disc:7070")
        );
        assert_eq!(base_of("nope"), None);
        let snap = Snapshot::from_json(
            br#"{"version":1,"identity":{"namespace":"demo","service":"backend","plugin":"sidemesh-proxy","zone":"z"},
                 "inbound":[{"port":8080,"port_outer":18080,"protocol":"http1"}]}"#,
        )
        .unwrap();
        let cfg = RegisterConfig {
            base_url: "http://d".into(),
            instance: None,
            address: "10.1.2.3".parse().unwrap(),
            ttl: Duration::from_secs(30),
        };
        assert_eq!(instance_name(&cfg, &snap), "backend-10-1-2-3");
        let b = body(&cfg, &snap);
        assert_eq!(b["ports"][0]["port"], 8080);
        assert_eq!(b["ports"][0]["target"], 18080);
        assert_eq!(b["meshed"], true);
        assert_eq!(b["zone"], "z");
        assert_eq!(b["ttl_seconds"], 30);
        // A service that maps its port 80 to the app's 8080: the service port is announced.
        let mapped = Snapshot::from_json(
            br#"{"version":1,"identity":{"namespace":"demo","service":"backend","plugin":"sidemesh-proxy"},
                 "inbound":[{"port":8080,"port_outer":18080,"service_port":80,"protocol":"http1"}]}"#,
        )
        .unwrap();
        let b = body(&cfg, &mapped);
        assert_eq!(
            (&b["ports"][0]["port"], &b["ports"][0]["target"]),
            (&80.into(), &18080.into())
        );
    }
}
