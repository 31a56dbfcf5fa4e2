//! The mutating admission webhook: AdmissionReview v1 in, AdmissionReview v1 out with a
//! JSONPatch, over HTTPS.
//!
//! [`review`] is the whole decision as a function of the request body, the injection settings
//! and the current cluster lookups, so it is tested without sockets; [`serve`] puts it behind
//! rustls and hyper. Bodies are capped at [`MAX_BODY_BYTES`]; a body that is not an
//! AdmissionReview gets `400`, a request the injector cannot handle gets `allowed: false`
//! with a message that says what to do.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::inject::{self, Catalog, InjectConfig, Outcome};
use crate::install::WEBHOOK_PATH;

/// The largest AdmissionReview accepted, in bytes. The API server caps objects at about
/// 1.5 MiB in etcd; a review carries the object (and for updates the old one) plus framing.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// What injection looks up in the cluster, swapped as a whole when the watches change.
#[derive(Clone, Debug, Default)]
pub struct Lookups {
    /// Plugins and mesh configs.
    pub catalog: Catalog,
    /// Every namespace's labels (for the namespace opt-in).
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// The discover Service's ClusterIP. `DISCOVER_URL`s use it instead of the Service's DNS
    /// name: the injected pod's resolver is the shim inside the proxy, which cannot answer
    /// before the proxy has its first config from discover.
    pub discover_ip: Option<std::net::IpAddr>,
}

/// The webhook's metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    reviews: prometheus::IntCounterVec,
    duration: prometheus::Histogram,
}

impl Metrics {
    /// Registers the webhook's metrics.
    pub fn new(registry: &prometheus::Registry) -> prometheus::Result<Metrics> {
        let reviews = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "sidemesh_controller_admission_reviews_total",
                "Admission reviews answered, by result.",
            ),
            &["result"],
        )?;
        let duration = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "sidemesh_controller_admission_duration_seconds",
                "Time to answer one admission review.",
            )
            .buckets(vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5]),
        )?;
        registry.register(Box::new(reviews.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Metrics { reviews, duration })
    }
}

/// The result of one review: the HTTP status and the JSON body.
#[derive(Debug)]
pub struct Answer {
    /// `200` for any AdmissionReview answer (allowed or not), `400` for a malformed body.
    pub status: StatusCode,
    /// The JSON body.
    pub body: Vec<u8>,
    /// A bounded label for metrics: `injected`, `skipped`, `denied`, `malformed`.
    pub result: &'static str,
}

/// Answers one AdmissionReview body.
pub fn review(body: &[u8], cfg: &InjectConfig, lookups: &Lookups) -> Answer {
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return malformed(format!("not an AdmissionReview: {e}")),
    };
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(_) => return malformed("the AdmissionReview has no request".to_owned()),
    };
    let (resp, result) = decide(&req, cfg, lookups);
    let mut out = serde_json::to_value(resp.into_review()).unwrap_or_default();
    // The API server's Go types hold the patch as `[]byte`, which JSON carries as base64;
    // kube-core writes an array of numbers, so write the conventional form.
    if let Some(p) = out.pointer_mut("/response/patch") {
        if let Some(bytes) = p.as_array() {
            let raw: Vec<u8> = bytes
                .iter()
                .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect();
            *p = serde_json::Value::String(crate::install::base64(&raw));
        }
    }
    Answer {
        status: StatusCode::OK,
        body: serde_json::to_vec(&out).unwrap_or_default(),
        result,
    }
}

fn malformed(message: String) -> Answer {
    Answer {
        status: StatusCode::BAD_REQUEST,
        body: serde_json::to_vec(&serde_json::json!({ "error": message })).unwrap_or_default(),
        result: "malformed",
    }
}

fn decide(
    req: &AdmissionRequest<DynamicObject>,
    cfg: &InjectConfig,
    lookups: &Lookups,
) -> (AdmissionResponse, &'static str) {
    let resp = AdmissionResponse::from(req);
    if req.operation != Operation::Create || req.kind.kind != "Pod" || req.sub_resource.is_some() {
        return (resp, "skipped");
    }
    let Some(obj) = &req.object else {
        return (resp.deny("the request carries no pod"), "denied");
    };
    let original = match serde_json::to_value(obj) {
        Ok(v) => v,
        Err(e) => return (resp.deny(format!("cannot read the pod: {e}")), "denied"),
    };
    let mut pod: Pod = match serde_json::from_value(original) {
        Ok(p) => p,
        Err(e) => return (resp.deny(format!("not a valid pod: {e}")), "denied"),
    };
    let namespace = req
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_else(|| "default".to_owned());
    let empty = BTreeMap::new();
    let ns_labels = lookups.namespace_labels.get(&namespace).unwrap_or(&empty);
    if inject::opted_in(&pod.metadata, ns_labels).is_err() {
        return (resp, "skipped");
    }
    let typed_original = match serde_json::to_value(&pod) {
        Ok(v) => v,
        Err(e) => return (resp.deny(format!("cannot read the pod: {e}")), "denied"),
    };
    let is_job = is_job_pod(&pod);
    let cfg_by_ip;
    let cfg = match lookups.discover_ip {
        Some(ip) => {
            cfg_by_ip = InjectConfig {
                discover_base: with_host(&cfg.discover_base, ip),
                ..cfg.clone()
            };
            &cfg_by_ip
        }
        None => cfg,
    };
    let Some(spec) = pod.spec.as_mut() else {
        return (resp.deny("the pod has no spec"), "denied");
    };
    match inject::inject(
        &namespace,
        &mut pod.metadata,
        spec,
        is_job,
        cfg,
        &lookups.catalog,
    ) {
        Ok(Outcome::Skipped(_)) => (resp, "skipped"),
        Ok(Outcome::Injected { warnings, .. }) => {
            let mutated = match serde_json::to_value(&pod) {
                Ok(v) => v,
                Err(e) => return (resp.deny(format!("cannot write the pod: {e}")), "denied"),
            };
            // Diff against the pod as k8s-openapi reads it, not the raw request: fields this
            // version does not know (or nulls it drops) must not turn into `remove` ops.
            let patch = json_patch::diff(&typed_original, &mutated);
            match resp.with_patch(patch) {
                Ok(mut r) => {
                    if !warnings.is_empty() {
                        r.warnings = Some(warnings);
                    }
                    (r, "injected")
                }
                Err(e) => (
                    AdmissionResponse::from(req).deny(format!("cannot encode the patch: {e}")),
                    "denied",
                ),
            }
        }
        Err(e) => (
            resp.deny(format!("sidemesh cannot inject this pod: {e}")),
            "denied",
        ),
    }
}

/// `base` (`http://host[:port][/path]`) with its host replaced by `ip`.
fn with_host(base: &str, ip: std::net::IpAddr) -> String {
    let (scheme, rest) = base.split_once("://").unwrap_or(("http", base));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let port = authority.rsplit_once(':').map(|(_, p)| p);
    let host = match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    };
    match port {
        Some(p) => format!("{scheme}://{host}:{p}{path}"),
        None => format!("{scheme}://{host}{path}"),
    }
}

/// Whether a pod runs to completion: owned by a Job, or labelled by one.
fn is_job_pod(pod: &Pod) -> bool {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "Job")
        || pod.metadata.labels.as_ref().is_some_and(|l| {
            l.contains_key("batch.kubernetes.io/job-name") || l.contains_key("job-name")
        })
}

/// Everything the server needs, shared by connections.
#[derive(Debug)]
pub struct Webhook {
    /// Injection settings.
    pub config: InjectConfig,
    /// The current lookups.
    pub lookups: watch::Receiver<Arc<Lookups>>,
    /// False until the watches have synced: until then reviews get `503`, so the API server
    /// applies the webhook's failure policy instead of the webhook skipping pods it cannot
    /// yet tell are opted in.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// Metrics.
    pub metrics: Metrics,
}

/// Serves the webhook on `listener` with `tls` until the task is dropped. Each connection
/// is its own task; a failed handshake or connection only ends that connection.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, hook: Arc<Webhook>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "webhook accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let hook = hook.clone();
        tokio::spawn(async move {
            let handshake =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp));
            let tls = match handshake.await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let svc = hyper::service::service_fn(move |req| handle(req, hook.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "webhook connection ended with an error");
            }
        });
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    hook: Arc<Webhook>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != WEBHOOK_PATH {
        return Ok(plain(StatusCode::NOT_FOUND, "not found"));
    }
    if req.method() != Method::POST {
        return Ok(plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST an AdmissionReview",
        ));
    }
    if !hook.ready.load(std::sync::atomic::Ordering::SeqCst) {
        hook.metrics.reviews.with_label_values(&["not_ready"]).inc();
        return Ok(plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "sidemesh is still syncing with the cluster",
        ));
    }
    let started = Instant::now();
    let too_large = || {
        hook.metrics.reviews.with_label_values(&["too_large"]).inc();
        plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the AdmissionReview is larger than the webhook accepts",
        )
    };
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        return Ok(too_large());
    }
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return Ok(too_large());
            }
            return Ok(plain(StatusCode::BAD_REQUEST, "cannot read the body"));
        }
    };
    let lookups = hook.lookups.borrow().clone();
    let answer = review(&body, &hook.config, &lookups);
    hook.metrics
        .reviews
        .with_label_values(&[answer.result])
        .inc();
    hook.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    tracing::debug!(result = answer.result, "admission review answered");
    let mut resp = Response::new(Full::new(Bytes::from(answer.body)));
    *resp.status_mut() = answer.status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

fn plain(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&serde_json::json!({ "error": message })).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    const REVIEW: &str = include_str!("../testdata/admission-review.json");

    fn lookups(ns_enabled: bool) -> Lookups {
        let mut l = Lookups::default();
        if ns_enabled {
            l.namespace_labels.insert(
                "shop".into(),
                BTreeMap::from([(inject::INJECT.to_owned(), "enabled".to_owned())]),
            );
        }
        l
    }

    fn response(a: &Answer) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        v["response"].clone()
    }

    /// Applies the answer's JSONPatch to the request's pod.
    fn patched(a: &Answer) -> Pod {
        let r = response(a);
        assert_eq!(r["patchType"], "JSONPatch", "{r}");
        let raw = general_purpose_decode(r["patch"].as_str().unwrap());
        let patch: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
        let review: serde_json::Value = serde_json::from_str(REVIEW).unwrap();
        let mut pod = review["request"]["object"].clone();
        json_patch::patch(&mut pod, &patch).unwrap();
        serde_json::from_value(pod).unwrap()
    }

    fn general_purpose_decode(s: &str) -> Vec<u8> {
        // Tests only: a small standard base64 decoder.
        let table = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            _ => 63,
        };
        let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').map(table).collect();
        let mut out = Vec::new();
        for chunk in bytes.chunks(4) {
            let mut n = 0u32;
            for (i, &b) in chunk.iter().enumerate() {
                n |= u32::from(b) << (18 - 6 * i);
            }
            for i in 0..chunk.len().saturating_sub(1) {
                out.push((n >> (16 - 8 * i)) as u8);
            }
        }
        out
    }

    #[test]
    fn namespace_opt_in_gets_a_patch_that_injects() {
        let a = review(REVIEW.as_bytes(), &InjectConfig::default(), &lookups(true));
        assert_eq!((a.status, a.result), (StatusCode::OK, "injected"));
        let r = response(&a);
        assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(r["allowed"], true);
        let pod = patched(&a);
        let spec = pod.spec.unwrap();
        assert_eq!(spec.init_containers.unwrap()[0].name, inject::PROXY);
        assert_eq!(spec.dns_policy.as_deref(), Some("None"));
        assert_eq!(
            pod.metadata.annotations.unwrap()[inject::PORT_MAP],
            r#"{"8080":28080}"#
        );
    }

    #[test]
    fn fields_unknown_to_us_are_not_patched_away() {
        let mut v: serde_json::Value = serde_json::from_str(REVIEW).unwrap();
        v["request"]["object"]["spec"]["someFutureField"] = serde_json::json!({"x": 1});
        v["request"]["object"]["metadata"]["creationTimestamp"] = serde_json::Value::Null;
        let a = review(
            &serde_json::to_vec(&v).unwrap(),
            &InjectConfig::default(),
            &lookups(true),
        );
        assert_eq!(a.result, "injected");
        let r = response(&a);
        let raw = general_purpose_decode(r["patch"].as_str().unwrap());
        let patch: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        for op in patch.as_array().unwrap() {
            let path = op["path"].as_str().unwrap();
            // The only removal: the port name that moved to the proxy.
            if op["op"] == "remove" {
                assert_eq!(path, "/spec/containers/0/ports/0/name");
            }
            assert!(
                !path.contains("someFutureField") && !path.contains("creationTimestamp"),
                "{op}"
            );
        }
    }

    #[test]
    fn discover_url_uses_the_service_ip_when_known() {
        let mut l = lookups(true);
        l.discover_ip = Some("10.96.5.5".parse().unwrap());
        let a = review(REVIEW.as_bytes(), &InjectConfig::default(), &l);
        let pod = patched(&a);
        let proxy = &pod.spec.unwrap().init_containers.unwrap()[0];
        let url = proxy
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "DISCOVER_URL")
            .unwrap();
        assert_eq!(
            url.value.as_deref(),
            Some("http://10.96.5.5:8080/v1/sidecars/shop/web/sidemesh-proxy")
        );
        assert_eq!(
            with_host("https://d.x/p", "::1".parse().unwrap()),
            "https://[::1]/p"
        );
    }

    #[test]
    fn not_opted_in_is_allowed_unchanged() {
        let a = review(REVIEW.as_bytes(), &InjectConfig::default(), &lookups(false));
        assert_eq!(a.result, "skipped");
        let r = response(&a);
        assert_eq!(r["allowed"], true);
        assert!(r.get("patch").is_none());
    }

    #[test]
    fn job_pods_are_recognised() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"labels": {"batch.kubernetes.io/job-name": "migrate"}}}))
        .unwrap();
        assert!(is_job_pod(&pod));
        pod.metadata.labels = None;
        assert!(!is_job_pod(&pod));
    }

    #[test]
    fn malformed_bodies_are_bad_requests() {
        for body in [
            &b"{"[..],
            b"[]",
            br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}"#,
        ] {
            let a = review(body, &InjectConfig::default(), &lookups(true));
            assert_eq!(
                (a.status, a.result),
                (StatusCode::BAD_REQUEST, "malformed"),
                "{body:?}"
            );
        }
    }

    #[test]
    fn non_create_and_other_kinds_pass() {
        let mut v: serde_json::Value = serde_json::from_str(REVIEW).unwrap();
        v["request"]["operation"] = "UPDATE".into();
        v["request"]["oldObject"] = v["request"]["object"].clone();
        let a = review(
            &serde_json::to_vec(&v).unwrap(),
            &InjectConfig::default(),
            &lookups(true),
        );
        assert_eq!(a.result, "skipped");
    }
}
