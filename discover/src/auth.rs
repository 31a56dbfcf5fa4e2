//! Who may fetch a sidecar's config and certificate: bearer tokens from a token file
//! (`sidemesh discover --tokens FILE`), each allowed to act as some identities
//! (`namespace/service`, `namespace/*`, or `*` for an operator).
//!
//! This module owns the token file's format and validation ([`Tokens`]), the check of a
//! request's `Authorization: Bearer` header against it (RFC 6750), the live reload of the
//! file ([`Auth::watch`]), and `sidemesh_discover_auth_failures_total`. The server calls
//! [`Auth::check`] at the top of the routes that serve one workload's config or identity.
//!
//! The file names tokens by their SHA-256 (hex), so it holds no secret; a plain `token:` is
//! accepted too, for tests and small setups. Presented tokens are hashed and compared with
//! every entry in constant time; tokens are never logged, only the entries' `name`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use prometheus::{IntCounterVec, Opts, Registry};
use sidemesh_api::name::check_label;
use subtle::ConstantTimeEq;

use crate::render::SidecarKey;

/// The largest token file read, in bytes.
pub const MAX_TOKEN_FILE_BYTES: u64 = 1024 * 1024;
/// How often the token file is checked for changes.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// The token file as written (YAML or JSON).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    tokens: Vec<RawToken>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    /// A label for logs (which token was used); never the token itself.
    #[serde(default)]
    name: Option<String>,
    /// The SHA-256 of the token, 64 hex digits.
    #[serde(default)]
    sha256: Option<String>,
    /// The token itself (the file then holds a secret).
    #[serde(default)]
    token: Option<String>,
    /// What the token may act as.
    identities: Vec<String>,
}

/// One identity pattern a token may act as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `*`: every workload (an operator).
    Any,
    /// `namespace/*`: every service of a namespace.
    Namespace(String),
    /// `namespace/service`: one service (any of its plugins).
    Service(String, String),
}

impl Scope {
    /// Parses `*`, `ns/*` or `ns/svc` (names are DNS labels).
    pub fn parse(s: &str) -> Result<Scope, String> {
        if s == "*" {
            return Ok(Scope::Any);
        }
        let Some((ns, svc)) = s.split_once('/') else {
            return Err(format!(
                "identity {s:?} must be \"namespace/service\", \"namespace/*\" or \"*\""
            ));
        };
        check_label(ns).map_err(|e| format!("identity {s:?}: namespace {e}"))?;
        if svc == "*" {
            return Ok(Scope::Namespace(ns.to_owned()));
        }
        check_label(svc).map_err(|e| format!("identity {s:?}: service {e}"))?;
        Ok(Scope::Service(ns.to_owned(), svc.to_owned()))
    }

    /// Whether this pattern covers the workload `namespace/service`.
    pub fn covers(&self, namespace: &str, service: &str) -> bool {
        match self {
            Scope::Any => true,
            Scope::Namespace(ns) => ns == namespace,
            Scope::Service(ns, svc) => ns == namespace && svc == service,
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Any => f.write_str("*"),
            Scope::Namespace(ns) => write!(f, "{ns}/*"),
            Scope::Service(ns, svc) => write!(f, "{ns}/{svc}"),
        }
    }
}

struct Entry {
    name: String,
    digest: [u8; 32],
    scopes: Vec<Scope>,
}

/// A validated token file: token digests and what each may act as.
pub struct Tokens {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Digests are not secrets, but there is no reason to print them either.
        f.debug_struct("Tokens")
            .field("entries", &self.entries.len())
            .finish()
    }
}

/// Why a token file was rejected: `Display` is the log line, `file:line: what`.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct TokensError {
    /// The file.
    pub file: String,
    /// The 1-based line of the problem (0 when unknown).
    pub line: usize,
    /// What is wrong and what to write instead.
    pub message: String,
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization` header.
    Missing,
    /// An `Authorization` header that is not `Bearer <token>`.
    Malformed,
    /// A bearer token the file does not list.
    Unknown,
    /// A known token that may not act as this workload.
    Forbidden {
        /// The entry's name.
        name: String,
        /// What it may act as.
        scopes: Vec<Scope>,
    },
}

impl Denied {
    /// The bounded `reason` label of `sidemesh_discover_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::Missing => "missing",
            Denied::Malformed => "malformed",
            Denied::Unknown => "unknown",
            Denied::Forbidden { .. } => "forbidden",
        }
    }
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A new random bearer token: 32 bytes from the OS-seeded generator, as 64 hex digits.
pub fn generate_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `data` as 64 lower-case hex digits (what the token file holds).
pub fn sha256_hex(data: &[u8]) -> String {
    sha256(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// The 1-based line of the first occurrence of `needle` in `text` (0 when absent), to
/// point at the value a check rejected.
fn line_of(text: &str, needle: &str) -> usize {
    text.find(needle)
        .map(|at| text[..at].matches('\n').count() + 1)
        .unwrap_or(0)
}

impl Tokens {
    /// Parses and validates a token file's text (YAML; JSON is YAML too). `file` names it
    /// in errors.
    pub fn parse(file: &str, text: &str) -> Result<Tokens, TokensError> {
        let err = |line: usize, message: String| TokensError {
            file: file.to_owned(),
            line,
            message,
        };
        let raw: RawFile = serde_norway::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line()).unwrap_or(0);
            err(line, format!("{e} (expected: tokens: [{{name, sha256 or token, identities: [\"ns/svc\", \"ns/*\", \"*\"]}}])"))
        })?;
        let mut entries: Vec<Entry> = Vec::with_capacity(raw.tokens.len());
        for (i, t) in raw.tokens.into_iter().enumerate() {
            let name = t.name.clone().unwrap_or_else(|| format!("tokens[{i}]"));
            let digest = match (&t.sha256, &t.token) {
                (Some(hex), None) => parse_hex32(hex.trim()).ok_or_else(|| {
                    err(
                        line_of(text, hex),
                        format!(
                            "{name}: sha256 must be 64 hex digits (e.g. from `printf %s TOKEN | sha256sum`)"
                        ),
                    )
                })?,
                (None, Some(token)) => {
                    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                        // Do not echo the token: the error goes to the log.
                        return Err(err(
                            0,
                            format!("{name}: token must be non-empty visible ASCII"),
                        ));
                    }
                    sha256(token.as_bytes())
                }
                _ => {
                    return Err(err(
                        t.name.as_deref().map(|n| line_of(text, n)).unwrap_or(0),
                        format!("{name}: give exactly one of sha256 (preferred) or token"),
                    ));
                }
            };
            if t.identities.is_empty() {
                return Err(err(
                    t.name.as_deref().map(|n| line_of(text, n)).unwrap_or(0),
                    format!("{name}: identities is empty; list \"ns/svc\", \"ns/*\" or \"*\""),
                ));
            }
            let scopes = t
                .identities
                .iter()
                .map(|s| Scope::parse(s).map_err(|e| err(line_of(text, s), format!("{name}: {e}"))))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(other) = entries.iter().find(|e| e.digest == digest) {
                return Err(err(
                    t.name.as_deref().map(|n| line_of(text, n)).unwrap_or(0),
                    format!("{name}: the same token as {}; list it once", other.name),
                ));
            }
            entries.push(Entry {
                name,
                digest,
                scopes,
            });
        }
        Ok(Tokens { entries })
    }

    /// Reads and parses a token file (at most [`MAX_TOKEN_FILE_BYTES`]).
    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        let file = path.display().to_string();
        let text = read_capped(path).map_err(|message| TokensError {
            file: file.clone(),
            line: 0,
            message,
        })?;
        Tokens::parse(&file, &text)
    }

    /// Number of tokens listed.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the file lists no token (then every request is refused).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Checks a request's headers: may its bearer token act as `namespace/service`?
    /// Answers the name of the entry that allowed it.
    pub fn check(
        &self,
        headers: &HeaderMap,
        namespace: &str,
        service: &str,
    ) -> Result<&str, Denied> {
        let value = headers.get(header::AUTHORIZATION).ok_or(Denied::Missing)?;
        let token = bearer(value).ok_or(Denied::Malformed)?;
        let presented = sha256(token);
        // Look at every entry, whatever matches, so the time taken does not tell which.
        let mut found: Option<&Entry> = None;
        for e in &self.entries {
            if bool::from(e.digest.ct_eq(&presented)) {
                found = Some(e);
            }
        }
        let entry = found.ok_or(Denied::Unknown)?;
        if entry.scopes.iter().any(|s| s.covers(namespace, service)) {
            Ok(&entry.name)
        } else {
            Err(Denied::Forbidden {
                name: entry.name.clone(),
                scopes: entry.scopes.clone(),
            })
        }
    }
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive, RFC 9110
/// §11.1; the token is one `token68`, RFC 6750 §2.1).
pub(crate) fn bearer(value: &HeaderValue) -> Option<&[u8]> {
    let v = value.as_bytes();
    let (scheme, rest) = v.split_at(v.iter().position(|&b| b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty() && token.iter().all(|b| b.is_ascii_graphic())).then_some(token)
}

fn read_capped(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut text = String::new();
    f.take(MAX_TOKEN_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read (must be UTF-8): {e}"))?;
    if text.len() as u64 > MAX_TOKEN_FILE_BYTES {
        return Err(format!(
            "larger than {MAX_TOKEN_FILE_BYTES} bytes; is this the token file?"
        ));
    }
    Ok(text)
}

/// The token file in force, reloaded when it changes, and the failure counter.
pub struct Auth {
    path: PathBuf,
    tokens: ArcSwap<Tokens>,
    failures: IntCounterVec,
    reloads: IntCounterVec,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("path", &self.path)
            .field("tokens", &self.tokens.load().len())
            .finish()
    }
}

impl Auth {
    /// Loads the token file (an error names file:line) and registers the metrics.
    pub fn load(path: &Path, registry: &Registry) -> anyhow::Result<Auth> {
        let tokens = Tokens::load(path)?;
        Auth::new(path, tokens, registry)
    }

    /// An `Auth` over already parsed tokens; `path` is what [`Auth::watch`] re-reads.
    pub fn new(path: &Path, tokens: Tokens, registry: &Registry) -> anyhow::Result<Auth> {
        let failures = IntCounterVec::new(
            Opts::new(
                "sidemesh_discover_auth_failures_total",
                "Requests refused for want of a bearer token that covers the workload, by reason.",
            ),
            &["reason"],
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "sidemesh_discover_token_reloads_total",
                "Token file reloads by result.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        // Pre-create the label sets, so they read 0 rather than absent.
        for r in ["missing", "malformed", "unknown", "forbidden"] {
            failures.with_label_values(&[r]);
        }
        for r in ["ok", "failed"] {
            reloads.with_label_values(&[r]);
        }
        Ok(Auth {
            path: path.to_owned(),
            tokens: ArcSwap::from_pointee(tokens),
            failures,
            reloads,
        })
    }

    /// The tokens in force.
    pub fn tokens(&self) -> Arc<Tokens> {
        self.tokens.load_full()
    }

    /// Checks a request for `key`; `None` lets it through, `Some` is the refusal to send
    /// (401 with `WWW-Authenticate: Bearer`, or 403), already counted and logged.
    pub fn check(&self, headers: &HeaderMap, key: &SidecarKey) -> Option<Response<Full<Bytes>>> {
        let tokens = self.tokens.load();
        let denied = match tokens.check(headers, &key.namespace, &key.service) {
            Ok(name) => {
                tracing::debug!(token = name, namespace = %key.namespace, service = %key.service, "token accepted");
                return None;
            }
            Err(d) => d,
        };
        self.failures.with_label_values(&[denied.reason()]).inc();
        tracing::info!(
            namespace = %key.namespace,
            service = %key.service,
            reason = denied.reason(),
            "request refused by the token check"
        );
        let id = format!("{}/{}", key.namespace, key.service);
        let (status, challenge, message) = match &denied {
            Denied::Missing => (
                StatusCode::UNAUTHORIZED,
                r#"Bearer realm="sidemesh-discover""#,
                format!(
                    "this discover requires a bearer token: send Authorization: Bearer <token> for {id} (sidemesh proxy --discover-token-file FILE)"
                ),
            ),
            Denied::Malformed => (
                StatusCode::UNAUTHORIZED,
                r#"Bearer realm="sidemesh-discover", error="invalid_request""#,
                "the Authorization header must be \"Bearer <token>\" (one token, visible ASCII)"
                    .to_owned(),
            ),
            Denied::Unknown => (
                StatusCode::UNAUTHORIZED,
                r#"Bearer realm="sidemesh-discover", error="invalid_token""#,
                "this bearer token is not in discover's token file; check the token, or add its sha256 to the file given to --tokens".to_owned(),
            ),
            Denied::Forbidden { name, scopes } => (
                StatusCode::FORBIDDEN,
                r#"Bearer realm="sidemesh-discover", error="insufficient_scope""#,
                format!(
                    "token {name:?} may act as {} but not {id}; use {id}'s own token or add {id} to its identities",
                    scopes
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        };
        Some(refusal(status, Some(challenge), message))
    }

    /// Whether the request's bearer token is one the file lists (whatever it may act as).
    pub fn lists(&self, headers: &HeaderMap) -> bool {
        !matches!(
            self.tokens.load().check(headers, "", ""),
            Err(Denied::Missing | Denied::Malformed | Denied::Unknown)
        )
    }

    /// Re-reads the file now if it parses; otherwise logs `file:line: what` and keeps the
    /// tokens in force. Answers whether the file was applied.
    pub fn reload(&self) -> bool {
        match Tokens::load(&self.path) {
            Ok(t) => {
                tracing::info!(file = %self.path.display(), tokens = t.len(), "token file reloaded");
                self.tokens.store(Arc::new(t));
                self.reloads.with_label_values(&["ok"]).inc();
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "token file edit rejected; keeping the last good tokens");
                self.reloads.with_label_values(&["failed"]).inc();
                false
            }
        }
    }

    /// Watches the file: a change (modification time or size) is applied within about
    /// half a second, through [`Auth::reload`]. Runs until the task is aborted.
    pub fn watch(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let auth = self.clone();
        watch_file(self.path.clone(), move || {
            auth.reload();
        })
    }
}

/// A refusal: `{"error": message}` with `status`, and the `WWW-Authenticate` challenge.
pub(crate) fn refusal(
    status: StatusCode,
    challenge: Option<&'static str>,
    message: String,
) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(c) = challenge {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
    }
    r
}

/// Polls `path` every 250 ms and calls `reload` (on a blocking thread) once the file's
/// modification time or length changed and it exists again. A missing file (mid-replace,
/// or removed) calls nothing: what was loaded stays in force until it is back.
pub(crate) fn watch_file(
    path: PathBuf,
    reload: impl Fn() + Clone + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = stamp(&path);
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = stamp(&path);
            if now == last {
                continue;
            }
            // Let a writer finish before reading (at most one more interval).
            tokio::time::sleep(POLL_INTERVAL / 5).await;
            last = stamp(&path);
            if last.is_none() {
                continue;
            }
            let _ = tokio::task::spawn_blocking(reload.clone()).await;
        }
    })
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    fn file() -> String {
        format!(
            "tokens:\n  - name: web\n    sha256: {}\n    identities: [shop/web]\n  - name: shop-ops\n    token: ops-secret\n    identities: [\"shop/*\"]\n  - name: root\n    sha256: \"{}\"\n    identities: [\"*\"]\n",
            sha256_hex(b"web-secret"),
            sha256_hex(b"root-secret").to_uppercase(),
        )
    }

    #[test]
    fn sha256_matches_the_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn tokens_cover_their_identities_only() {
        let t = Tokens::parse("t.yaml", &file()).unwrap();
        assert_eq!(t.len(), 3);
        let web = headers("Bearer web-secret");
        assert_eq!(t.check(&web, "shop", "web"), Ok("web"));
        assert!(matches!(
            t.check(&web, "shop", "db"),
            Err(Denied::Forbidden { ref name, .. }) if name == "web"
        ));
        let ops = headers("bearer ops-secret");
        assert_eq!(t.check(&ops, "shop", "db"), Ok("shop-ops"));
        assert!(t.check(&ops, "bank", "db").is_err());
        let root = headers("BEARER   root-secret ");
        assert_eq!(t.check(&root, "bank", "db"), Ok("root"));
    }

    #[test]
    fn missing_malformed_and_unknown_tokens_are_told_apart() {
        let t = Tokens::parse("t.yaml", &file()).unwrap();
        assert_eq!(
            t.check(&HeaderMap::new(), "shop", "web"),
            Err(Denied::Missing)
        );
        for bad in [
            "Basic d2ViOnNlY3JldA==",
            "Bearer",
            "Bearer ",
            "web-secret",
            "Bearer a b",
        ] {
            assert_eq!(
                t.check(&headers(bad), "shop", "web"),
                Err(Denied::Malformed),
                "{bad:?}"
            );
        }
        assert_eq!(
            t.check(&headers("Bearer web-secretx"), "shop", "web"),
            Err(Denied::Unknown)
        );
    }

    #[test]
    fn json_files_parse_too() {
        let json = format!(
            r#"{{"tokens": [{{"sha256": "{}", "identities": ["a/b"]}}]}}"#,
            sha256_hex(b"t")
        );
        let t = Tokens::parse("t.json", &json).unwrap();
        assert_eq!(t.check(&headers("Bearer t"), "a", "b"), Ok("tokens[0]"));
    }

    #[test]
    fn bad_files_are_rejected_with_file_and_line() {
        let cases = [
            (
                "tokens:\n  - name: x\n    sha256: abc\n    identities: [a/b]\n",
                3,
                "64 hex",
            ),
            (
                "tokens:\n  - name: x\n    token: t\n    identities: [a/b]\n    extra: 1\n",
                5,
                "unknown field",
            ),
            (
                "tokens:\n  - name: x\n    token: t\n    identities: [a/b, \"Bad/x\"]\n",
                4,
                "namespace",
            ),
            (
                "tokens:\n  - name: x\n    token: t\n    identities: [web]\n",
                4,
                "namespace/service",
            ),
            (
                "tokens:\n  - name: x\n    identities: [a/b]\n",
                2,
                "exactly one of",
            ),
            (
                "tokens:\n  - name: x\n    token: t\n    identities: []\n",
                2,
                "identities is empty",
            ),
            (
                "tokens:\n  - name: x\n    token: t\n    identities: [a/b]\n  - name: y\n    token: t\n    identities: [a/c]\n",
                5,
                "same token as x",
            ),
        ];
        for (text, line, what) in cases {
            let e = Tokens::parse("tokens.yaml", text).err().unwrap();
            assert_eq!(e.line, line, "{text}: {e}");
            let shown = e.to_string();
            assert!(
                shown.starts_with(&format!("tokens.yaml:{line}: ")),
                "{shown}"
            );
            assert!(shown.contains(what), "{shown}");
        }
        // A bad plain token is not echoed into the log.
        let e = Tokens::parse("t", "tokens: [{token: \"s e\", identities: [a/b]}]")
            .err()
            .unwrap();
        assert!(!e.to_string().contains("s e"), "{e}");
    }

    #[test]
    fn refusals_are_json_with_a_bearer_challenge_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        std::fs::write(&path, file()).unwrap();
        let registry = Registry::new();
        let auth = Auth::load(&path, &registry).unwrap();
        let key = SidecarKey {
            namespace: "shop".into(),
            service: "db".into(),
            plugin: "sidemesh-proxy".into(),
        };
        let r = auth.check(&HeaderMap::new(), &key).unwrap();
        assert_eq!(r.status(), 401);
        assert!(
            r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
        let r = auth.check(&headers("Bearer web-secret"), &key).unwrap();
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()["content-type"], "application/json");
        assert!(auth.check(&headers("Bearer ops-secret"), &key).is_none());
        assert_eq!(auth.failures.with_label_values(&["missing"]).get(), 1);
        assert_eq!(auth.failures.with_label_values(&["forbidden"]).get(), 1);
        assert_eq!(auth.failures.with_label_values(&["unknown"]).get(), 0);
    }
}
