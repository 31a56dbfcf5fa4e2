//! Kubernetes service-account tokens as discover credentials: the injector mounts each
//! meshed pod a projected service-account token for the audience [`AUDIENCE`], the sidecar
//! sends it (`--discover-token-file`, read again as the kubelet rotates it), and discover
//! asks the API server who it belongs to (a `TokenReview`) before it serves a workload's
//! config, resources or certificate.
//!
//! The rule: a service account of namespace `ns` may act as any workload of `ns`. The
//! namespace is the boundary, as it is for the Secrets a pod of that namespace may mount;
//! a token file (`--tokens`) still applies, for narrower or cross-namespace grants: a token
//! the file lists is judged by the file, any other by the cluster.
//!
//! Answers are cached by the token's SHA-256 (accepted tokens for [`ACCEPTED_TTL`], refused
//! ones for [`REFUSED_TTL`]), so a sidecar's polls cost the API server one review a minute.
//! When the API server cannot be asked (or takes over [`REVIEW_TIMEOUT`]), the request gets
//! 503 and nothing is cached: the sidecar keeps its last good config and retries with
//! backoff. Only JWT-shaped tokens are sent for review, at most 16 at once, so made-up
//! tokens cannot turn discover into a load on the API server.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode, header};
use http_body_util::Full;
use prometheus::{IntCounterVec, Opts, Registry};

use crate::auth::{bearer, refusal, sha256};
use crate::render::SidecarKey;

/// The audience of the projected tokens discover accepts (a token made for the API server
/// or another service is refused).
pub const AUDIENCE: &str = "sidemesh-discover";
/// How long an accepted token's review is reused.
pub const ACCEPTED_TTL: Duration = Duration::from_secs(60);
/// How long a refused token's review is reused.
pub const REFUSED_TTL: Duration = Duration::from_secs(10);
/// Most reviews cached; past it, expired ones are dropped, and all if none had expired.
const CACHE_MAX: usize = 10_000;
/// Most reviews asked of the API server at once: a flood of made-up tokens costs the API
/// server this many requests in flight, not one per request.
const REVIEWS_IN_FLIGHT: usize = 16;
/// How long a request waits for its review (a slot and the answer) before it gets 503.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest token sent for review (service-account tokens are about 1 KiB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// What the API server said about a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reviewed {
    /// The token is valid for [`AUDIENCE`] and belongs to this user
    /// (`system:serviceaccount:<ns>:<name>` for a service account).
    Authenticated {
        /// The user name.
        username: String,
    },
    /// The token is not valid (expired, revoked, another audience, its pod gone).
    Rejected {
        /// The API server's reason, when it gave one.
        reason: String,
    },
}

/// Asks the cluster who a token belongs to (a `TokenReview` for [`AUDIENCE`]). `Err` is a
/// failure to ask (the API server unreachable or answering an error), not a refusal.
pub trait TokenReviewer: Send + Sync + 'static {
    /// Reviews `token`.
    fn review(
        &self,
        token: String,
    ) -> Pin<Box<dyn Future<Output = Result<Reviewed, String>> + Send>>;
}

/// The verdict kept for a token.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    /// A service account of this namespace, with its name.
    ServiceAccount { namespace: String, name: String },
    /// Authenticated, but not as a service account.
    OtherUser(String),
    /// Not a valid token.
    Rejected(String),
}

/// Whether `token` has the shape of a JWT (three non-empty base64url parts, as every
/// service-account token has): anything else is refused without asking the API server.
fn looks_like_jwt(token: &[u8]) -> bool {
    let b64url = |part: &[u8]| {
        !part.is_empty()
            && part
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
    };
    token.len() <= MAX_TOKEN_BYTES && {
        let parts: Vec<&[u8]> = token.split(|b| *b == b'.').collect();
        parts.len() == 3 && parts.iter().all(|p| b64url(p))
    }
}

/// The `system:serviceaccount:<ns>:<name>` form, as (namespace, name).
fn service_account(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains(':')).then_some((ns, name))
}

/// Discover's check of service-account tokens, with its cache and metric.
pub struct Review {
    reviewer: Arc<dyn TokenReviewer>,
    cache: Mutex<HashMap<[u8; 32], (Verdict, Instant)>>,
    in_flight: tokio::sync::Semaphore,
    /// `sidemesh_discover_token_reviews_total{result}`.
    results: IntCounterVec,
}

impl std::fmt::Debug for Review {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Review").finish_non_exhaustive()
    }
}

impl Review {
    /// A check that asks `reviewer`; registers its metric in `registry`.
    pub fn new(reviewer: Arc<dyn TokenReviewer>, registry: &Registry) -> anyhow::Result<Review> {
        let results = IntCounterVec::new(
            Opts::new(
                "sidemesh_discover_token_reviews_total",
                "Service-account token checks by result: accepted, refused (missing, invalid, \
                 another namespace) or error (the API server could not be asked); cached \
                 answers count too.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(results.clone()))?;
        for r in ["accepted", "refused", "error"] {
            results.with_label_values(&[r]);
        }
        Ok(Review {
            reviewer,
            cache: Mutex::new(HashMap::new()),
            in_flight: tokio::sync::Semaphore::new(REVIEWS_IN_FLIGHT),
            results,
        })
    }

    fn cached(&self, digest: &[u8; 32], now: Instant) -> Option<Verdict> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match cache.get(digest) {
            Some((v, until)) if *until > now => Some(v.clone()),
            _ => None,
        }
    }

    fn remember(&self, digest: [u8; 32], verdict: Verdict, now: Instant) {
        let ttl = match verdict {
            Verdict::ServiceAccount { .. } => ACCEPTED_TTL,
            _ => REFUSED_TTL,
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(digest, (verdict, now + ttl));
    }

    /// Checks a request for `key`; `None` lets it through, `Some` is the refusal to send
    /// (401 with `WWW-Authenticate: Bearer`, 403, or 503 when the cluster cannot be asked).
    pub async fn check(
        &self,
        headers: &HeaderMap,
        key: &SidecarKey,
    ) -> Option<Response<Full<Bytes>>> {
        let id = format!("{}/{}", key.namespace, key.service);
        let token = match headers.get(header::AUTHORIZATION) {
            None => {
                return Some(self.refuse(
                    StatusCode::UNAUTHORIZED,
                    r#"Bearer realm="sidemesh-discover""#,
                    format!(
                        "this discover requires the pod's service-account token for audience \
                         {AUDIENCE}: send Authorization: Bearer <token> for {id} (sidemesh \
                         proxy --discover-token-file, which the injector sets up)"
                    ),
                ));
            }
            Some(v) => match bearer(v) {
                Some(t) => t,
                None => {
                    return Some(self.refuse(
                        StatusCode::UNAUTHORIZED,
                        r#"Bearer realm="sidemesh-discover", error="invalid_request""#,
                        "the Authorization header must be \"Bearer <token>\" (one token, visible ASCII)"
                            .to_owned(),
                    ));
                }
            },
        };
        if !looks_like_jwt(token) {
            return Some(self.refuse(
                StatusCode::UNAUTHORIZED,
                r#"Bearer realm="sidemesh-discover", error="invalid_token""#,
                format!(
                    "this is not a service-account token (a JWT); send the pod's projected \
                     token for audience {AUDIENCE}"
                ),
            ));
        }
        let digest = sha256(token);
        let now = Instant::now();
        let verdict = match self.cached(&digest, now) {
            Some(v) => v,
            None => {
                // `looks_like_jwt` checked the token is ASCII.
                let token = String::from_utf8_lossy(token).into_owned();
                let asked = tokio::time::timeout(REVIEW_TIMEOUT, async {
                    let _slot = self
                        .in_flight
                        .acquire()
                        .await
                        .map_err(|_| "the review queue is closed".to_owned())?;
                    self.reviewer.review(token).await
                })
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {}s", REVIEW_TIMEOUT.as_secs())));
                let verdict = match asked {
                    Ok(Reviewed::Authenticated { username }) => match service_account(&username) {
                        Some((namespace, name)) => Verdict::ServiceAccount {
                            namespace: namespace.to_owned(),
                            name: name.to_owned(),
                        },
                        None => Verdict::OtherUser(username),
                    },
                    Ok(Reviewed::Rejected { reason }) => Verdict::Rejected(reason),
                    Err(error) => {
                        self.results.with_label_values(&["error"]).inc();
                        tracing::warn!(%error, namespace = %key.namespace, service = %key.service, "cannot review a discover token");
                        return Some(refusal(
                            StatusCode::SERVICE_UNAVAILABLE,
                            None,
                            format!(
                                "cannot check the token with the Kubernetes API now ({error}); try again"
                            ),
                        ));
                    }
                };
                self.remember(digest, verdict.clone(), now);
                verdict
            }
        };
        match verdict {
            Verdict::ServiceAccount { namespace, name } if namespace == key.namespace => {
                self.results.with_label_values(&["accepted"]).inc();
                tracing::debug!(namespace, service_account = name, service = %key.service, "token accepted");
                None
            }
            Verdict::ServiceAccount { namespace, name } => Some(self.refuse(
                StatusCode::FORBIDDEN,
                r#"Bearer realm="sidemesh-discover", error="insufficient_scope""#,
                format!(
                    "service account {namespace}/{name} may act only as workloads of namespace \
                     {namespace}, not {id}; list a token for {id} in the token file (--tokens) \
                     for a cross-namespace grant"
                ),
            )),
            Verdict::OtherUser(user) => Some(self.refuse(
                StatusCode::FORBIDDEN,
                r#"Bearer realm="sidemesh-discover", error="insufficient_scope""#,
                format!(
                    "{user:?} is not a service account; only service-account tokens may act as {id}"
                ),
            )),
            Verdict::Rejected(reason) => Some(self.refuse(
                StatusCode::UNAUTHORIZED,
                r#"Bearer realm="sidemesh-discover", error="invalid_token""#,
                format!(
                    "the Kubernetes API rejected this token{}; send a current service-account \
                     token made for audience {AUDIENCE}",
                    if reason.is_empty() {
                        String::new()
                    } else {
                        format!(" ({reason})")
                    }
                ),
            )),
        }
    }

    fn refuse(
        &self,
        status: StatusCode,
        challenge: &'static str,
        message: String,
    ) -> Response<Full<Bytes>> {
        self.results.with_label_values(&["refused"]).inc();
        tracing::info!(status = status.as_u16(), %message, "request refused by the service-account token check");
        refusal(status, Some(challenge), message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A cluster that knows three tokens, counts its reviews, and can be down.
    struct Fake {
        calls: AtomicUsize,
        down: std::sync::atomic::AtomicBool,
    }

    impl TokenReviewer for Fake {
        fn review(
            &self,
            token: String,
        ) -> Pin<Box<dyn Future<Output = Result<Reviewed, String>> + Send>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let down = self.down.load(Ordering::SeqCst);
            Box::pin(async move {
                if down {
                    return Err("connection refused".to_owned());
                }
                Ok(match token.as_str() {
                    SHOP_WEB => Reviewed::Authenticated {
                        username: "system:serviceaccount:shop:web".to_owned(),
                    },
                    ADMIN => Reviewed::Authenticated {
                        username: "kubernetes-admin".to_owned(),
                    },
                    _ => Reviewed::Rejected {
                        reason: "token has expired".to_owned(),
                    },
                })
            })
        }
    }

    const SHOP_WEB: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzaG9wOndlYiJ9.c2ln";
    const ADMIN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZG1pbiJ9.c2ln";
    const STALE: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJvbGQifQ.c2ln";

    fn setup() -> (Arc<Fake>, Review, Registry) {
        let fake = Arc::new(Fake {
            calls: AtomicUsize::new(0),
            down: false.into(),
        });
        let registry = Registry::new();
        let review = Review::new(fake.clone(), &registry).unwrap();
        (fake, review, registry)
    }

    fn key(ns: &str, svc: &str) -> SidecarKey {
        SidecarKey {
            namespace: ns.into(),
            service: svc.into(),
            plugin: "sidemesh-proxy".into(),
        }
    }

    fn with(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h
    }

    async fn status(review: &Review, headers: &HeaderMap, k: &SidecarKey) -> (u16, String) {
        match review.check(headers, k).await {
            None => (200, String::new()),
            Some(r) => {
                use http_body_util::BodyExt;
                let status = r.status().as_u16();
                let body = r.into_body().collect().await.unwrap().to_bytes();
                (status, String::from_utf8_lossy(&body).into_owned())
            }
        }
    }

    #[tokio::test]
    async fn a_service_account_acts_as_the_workloads_of_its_own_namespace_only() {
        let (fake, review, registry) = setup();
        assert_eq!(
            status(&review, &with(SHOP_WEB), &key("shop", "web"))
                .await
                .0,
            200
        );
        assert_eq!(
            status(&review, &with(SHOP_WEB), &key("shop", "db")).await.0,
            200
        );
        let (code, body) = status(&review, &with(SHOP_WEB), &key("bank", "ledger")).await;
        assert_eq!(code, 403);
        assert!(
            body.contains("shop/web may act only as workloads of namespace shop"),
            "{body}"
        );
        // One review for the three checks: the answer is cached.
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        // A user that is not a service account, a rejected token, none, a malformed one.
        assert_eq!(
            status(&review, &with(ADMIN), &key("shop", "web")).await.0,
            403
        );
        let (code, body) = status(&review, &with(STALE), &key("shop", "web")).await;
        assert_eq!(code, 401);
        assert!(
            body.contains("token has expired") && !body.contains(STALE),
            "{body}"
        );
        // Not a JWT: refused without a review.
        let calls = fake.calls.load(Ordering::SeqCst);
        let made_up = status(&review, &with("made-up"), &key("shop", "web")).await;
        assert_eq!(made_up.0, 401);
        assert_eq!(fake.calls.load(Ordering::SeqCst), calls);
        assert_eq!(
            status(&review, &HeaderMap::new(), &key("shop", "web"))
                .await
                .0,
            401
        );
        let mut basic = HeaderMap::new();
        basic.insert(header::AUTHORIZATION, "Basic eA==".parse().unwrap());
        assert_eq!(status(&review, &basic, &key("shop", "web")).await.0, 401);
        let mut text = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&registry.gather(), &mut text)
            .unwrap();
        assert!(
            text.contains(r#"sidemesh_discover_token_reviews_total{result="accepted"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"sidemesh_discover_token_reviews_total{result="refused"} 6"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_api_server_gives_503_and_is_not_cached() {
        let (fake, review, _registry) = setup();
        fake.down.store(true, Ordering::SeqCst);
        let (code, body) = status(&review, &with(SHOP_WEB), &key("shop", "web")).await;
        assert_eq!(code, 503);
        assert!(body.contains("try again"), "{body}");
        fake.down.store(false, Ordering::SeqCst);
        assert_eq!(
            status(&review, &with(SHOP_WEB), &key("shop", "web"))
                .await
                .0,
            200
        );
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn only_jwt_shaped_tokens_are_reviewed() {
        assert!(looks_like_jwt(SHOP_WEB.as_bytes()));
        for bad in ["a.b", "a.b.c.d", "a..c", "a.b.c=", "a b.c.d", ""] {
            assert!(!looks_like_jwt(bad.as_bytes()), "{bad:?}");
        }
        let long = format!("a.b.{}", "c".repeat(MAX_TOKEN_BYTES));
        assert!(!looks_like_jwt(long.as_bytes()));
    }

    #[test]
    fn service_account_names() {
        assert_eq!(
            service_account("system:serviceaccount:shop:web"),
            Some(("shop", "web"))
        );
        assert_eq!(service_account("system:serviceaccount:shop"), None);
        assert_eq!(service_account("system:serviceaccount::web"), None);
        assert_eq!(service_account("system:serviceaccount:shop:a:b"), None);
        assert_eq!(service_account("kubernetes-admin"), None);
    }

    #[test]
    fn the_cache_stays_bounded() {
        let (_fake, review, _registry) = setup();
        let now = Instant::now();
        for i in 0..CACHE_MAX + 10 {
            let d = sha256(i.to_string().as_bytes());
            review.remember(d, Verdict::Rejected(String::new()), now);
        }
        assert!(review.cache.lock().unwrap().len() <= CACHE_MAX);
    }
}
