//! `TokenReview`s for the hosted discover: who a pod's projected service-account token
//! belongs to, asked of the API server (`POST
//! /apis/authentication.k8s.io/v1/tokenreviews`, which the controller's ClusterRole
//! allows). Discover decides what that user may fetch (see `sidemesh_discover::review`).

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

/// The answer to one review.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reviewed {
    /// Valid for the audience asked about; the user's name
    /// (`system:serviceaccount:<ns>:<name>` for a service account).
    Authenticated(String),
    /// Not valid, with the API server's reason.
    Rejected(String),
}

/// Reviews tokens through the API server.
#[derive(Clone)]
pub struct TokenReviews {
    api: Api<TokenReview>,
}

impl std::fmt::Debug for TokenReviews {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviews").finish_non_exhaustive()
    }
}

impl TokenReviews {
    /// Reviews through `client`.
    pub fn new(client: kube::Client) -> TokenReviews {
        TokenReviews {
            api: Api::all(client),
        }
    }

    /// Asks who `token` belongs to, for `audience`. `Err` is a failure to ask; a token the
    /// API server does not accept is `Ok(Rejected)`. An authenticated answer counts only
    /// when the API server names `audience` among the token's audiences (an authenticator
    /// that ignores audiences names none, and a token made for the API server itself must
    /// not open discover).
    pub async fn review(&self, token: String, audience: &str) -> Result<Reviewed, String> {
        let ask = TokenReview {
            spec: TokenReviewSpec {
                token,
                audiences: Some(vec![audience.to_owned()]),
            },
            ..TokenReview::default()
        };
        let answer = self
            .api
            .create(&PostParams::default(), &ask)
            .await
            .map_err(|e| format!("TokenReview failed: {e}"))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Ok(Reviewed::Rejected(status.error.unwrap_or_default()));
        }
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.iter().any(|a| a == audience) {
            return Ok(Reviewed::Rejected(format!(
                "the token is not made for audience {audience}"
            )));
        }
        match status.user.and_then(|u| u.username) {
            Some(name) if !name.is_empty() => Ok(Reviewed::Authenticated(name)),
            _ => Ok(Reviewed::Rejected("the review names no user".to_owned())),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::combinators::BoxBody;
    use http_body_util::{BodyExt, Full};
    use serde_json::{Value, json};
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    type MockBody = BoxBody<Bytes, Infallible>;

    /// A mock API server answering TokenReviews as a real one does (the answers are the
    /// shape kube-apiserver 1.31 returns), and recording the requests.
    fn client(seen: Arc<Mutex<Vec<(String, Value)>>>) -> kube::Client {
        let (svc, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<MockBody>>();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let path = format!("{} {}", req.method(), req.uri().path());
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let asked: Value = serde_json::from_slice(&body).unwrap();
                seen.lock().unwrap().push((path, asked.clone()));
                let spec = asked["spec"].clone();
                let (code, answer) = match spec["token"].as_str().unwrap() {
                    "pod-token" => (
                        201,
                        json!({
                        "kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                        "metadata": {"creationTimestamp": null}, "spec": spec,
                        "status": {"authenticated": true,
                            "user": {"username": "system:serviceaccount:shop:web",
                                "uid": "6f1c0d9e-2b8a-4a53-9d43-0c5f1a2b3c4d",
                                "groups": ["system:serviceaccounts", "system:serviceaccounts:shop",
                                    "system:authenticated"],
                                "extra": {"authentication.kubernetes.io/pod-name": ["web-7d4b9c-x2x7q"],
                                    "authentication.kubernetes.io/pod-uid": ["0b1e6c7a-9f2d-4c1e-8a3b-5d6e7f809a1b"]}},
                            "audiences": ["sidemesh-discover"]}}),
                    ),
                    // A token for the API server's own audience: authenticated, but the
                    // intersection with the audience asked about is empty.
                    "api-token" => (
                        201,
                        json!({
                        "kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                        "metadata": {"creationTimestamp": null}, "spec": spec,
                        "status": {"authenticated": true,
                            "user": {"username": "system:serviceaccount:shop:web"},
                            "audiences": []}}),
                    ),
                    "forbidden" => (
                        403,
                        json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:sidemesh:sidemesh-controller\" cannot create resource \"tokenreviews\"",
                        "reason": "Forbidden", "details": {"group": "authentication.k8s.io", "kind": "tokenreviews"},
                        "code": 403}),
                    ),
                    _ => (
                        201,
                        json!({
                        "kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                        "metadata": {"creationTimestamp": null}, "spec": spec,
                        "status": {"user": {},
                            "error": "[invalid bearer token, service account token has expired]"}}),
                    ),
                };
                let mut resp = Response::new(BoxBody::new(Full::new(Bytes::from(
                    serde_json::to_vec(&answer).unwrap(),
                ))));
                *resp.status_mut() = http::StatusCode::from_u16(code).unwrap();
                resp.headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                send.send_response(resp);
            }
        });
        kube::Client::new(svc, "default")
    }

    #[tokio::test]
    async fn reviews_name_the_user_only_for_the_audience_asked_about() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let reviews = TokenReviews::new(client(seen.clone()));
        let aud = "sidemesh-discover";
        assert_eq!(
            reviews.review("pod-token".into(), aud).await,
            Ok(Reviewed::Authenticated(
                "system:serviceaccount:shop:web".into()
            ))
        );
        assert_eq!(
            reviews.review("api-token".into(), aud).await,
            Ok(Reviewed::Rejected(
                "the token is not made for audience sidemesh-discover".into()
            ))
        );
        assert_eq!(
            reviews.review("stale".into(), aud).await,
            Ok(Reviewed::Rejected(
                "[invalid bearer token, service account token has expired]".into()
            ))
        );
        // The API server refusing the review itself is a failure to ask, not a verdict.
        let e = reviews.review("forbidden".into(), aud).await.unwrap_err();
        assert!(e.contains("cannot create resource"), "{e}");
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen[0].0,
            "POST /apis/authentication.k8s.io/v1/tokenreviews"
        );
        assert_eq!(seen[0].1["spec"]["audiences"], json!(["sidemesh-discover"]));
        assert_eq!(seen[0].1["kind"], "TokenReview");
    }
}
