//! Mutual TLS between sidecars, and `allow_clients` on the verified client identity.
//!
//! - **Identity.** The sidecar makes its own ECDSA P-256 key, sends a CSR for its SPIFFE ID
//!   (`spiffe://<trust domain>/ns/<ns>/svc/<svc>`) to the `csr_url` of its config, and gets
//!   a short-lived certificate from discover's CA ([`run_identity`]). It renews at two
//!   thirds of the lifetime and retries failures with jittered backoff (1 s doubling to
//!   60 s). The key never leaves the process.
//! - **Outbound.** A meshed endpoint is dialled with TLS 1.3 and the client certificate
//!   ([`dial`]); the server must present a certificate of the mesh CA whose SPIFFE ID is the
//!   service being called (the expected service travels as the SNI name `<svc>.<ns>`).
//! - **Inbound.** The first byte tells a TLS handshake (0x16) from plaintext ([`accept`]).
//!   TLS clients must present a mesh certificate; their SPIFFE ID becomes the connection's
//!   client identity `namespace/service`. Plaintext is accepted in `permissive` mode (with
//!   no identity) and closed in `strict` mode. The mode is per inbound port (its
//!   `tls_mode`, else the config's); a certificate is requested when any of them needs one.
//! - **Authorization.** `allow_clients` of the inbound port is checked on that identity:
//!   HTTP requests get a 403 saying who was refused and why, TCP connections are closed.
//!   The identity reaches the app in `x-sidemesh-client-id`, which is first removed from
//!   whatever the client sent, so it cannot be forged.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sidemesh_api::Snapshot;
use sidemesh_api::config::{InboundPort, TlsMode, TlsSettings, parse_spiffe_id, spiffe_id};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::upstream::Body;

/// The request header that carries the verified client identity (`namespace/service`)
/// to the app. Removed from incoming requests first.
pub const CLIENT_ID_HEADER: &str = "x-sidemesh-client-id";
/// The ALPN protocol ID of HTTP/2 over TLS (RFC 9113 §3.2).
const ALPN_H2: &[u8] = b"h2";
/// The first byte of a TLS record carrying a handshake (RFC 8446 §5.1).
const TLS_HANDSHAKE: u8 = 0x16;
/// Time a TLS handshake may take, either way.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest certificate answer read from discover.
const MAX_CERT_BYTES: usize = 64 * 1024;
/// Time one CSR round trip to discover may take.
const CSR_TIMEOUT: Duration = Duration::from_secs(15);
/// Backoff bounds between failed CSR round trips.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why credentials could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM or DER input is unusable.
    #[error("bad {0}")]
    Bad(String),
    /// rustls refused the configuration.
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The sidecar's certificate, key and trust bundle, as ready TLS configs.
pub struct Credentials {
    /// The trust domain of every identity.
    pub trust_domain: String,
    /// This sidecar's identity, `namespace/service`.
    pub identity: String,
    /// When the certificate expires.
    pub not_after: SystemTime,
    /// When it should be renewed: two thirds into its lifetime.
    pub renew_at: SystemTime,
    bundle_pem: String,
    client: Arc<rustls::ClientConfig>,
    /// The same, offering ALPN `h2`: HTTP/1.1 carried over one HTTP/2 connection.
    client_h2: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    /// Checks a client's chain against the trust bundle (also after the handshake: see
    /// [`PeerTrust`]).
    client_verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Builds TLS configs from the trust bundle, the certificate chain (PEM, leaf first)
    /// and the PKCS#8 key. The leaf must carry a SPIFFE ID of `trust_domain`.
    pub fn new(
        trust_domain: &str,
        bundle_pem: &str,
        chain_pem: &str,
        key_pkcs8_der: &[u8],
    ) -> Result<Credentials, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
            let c = c.map_err(|e| TlsError::Bad(format!("trust bundle PEM: {e}")))?;
            roots
                .add(c)
                .map_err(|e| TlsError::Bad(format!("trust bundle certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(TlsError::Bad("trust bundle: no certificate".into()));
        }
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Bad(format!("certificate PEM: {e}")))?;
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::Bad("certificate: none in the answer".into()))?;
        let identity = peer_identity(trust_domain, leaf)
            .ok_or_else(|| TlsError::Bad("certificate: no SPIFFE ID of the trust domain".into()))?;
        let (not_before, not_after) = validity(leaf)
            .ok_or_else(|| TlsError::Bad("certificate: unreadable validity".into()))?;
        let lifetime = not_after.duration_since(not_before).unwrap_or_default();
        let renew_at = not_before + lifetime * 2 / 3;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8_der.to_vec()));
        let roots = Arc::new(roots);
        let provider = provider();
        let verifier = Arc::new(SpiffeServerVerifier {
            roots: roots.clone(),
            trust_domain: trust_domain.to_owned(),
            algs: provider.signature_verification_algorithms,
        });
        let client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain.clone(), key.clone_key())?;
        let client_verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| TlsError::Bad(format!("client verifier: {e}")))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(client_verifier.clone())
            .with_single_cert(chain, key)?;
        // Chosen only when the client offers it (`--mesh-h2`); otherwise no ALPN at all.
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        let mut client_h2 = client.clone();
        client_h2.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Credentials {
            trust_domain: trust_domain.to_owned(),
            identity,
            not_after,
            renew_at,
            bundle_pem: bundle_pem.to_owned(),
            client: Arc::new(client),
            client_h2: Arc::new(client_h2),
            server: Arc::new(server),
            client_verifier,
        })
    }
}

/// The `namespace/service` of the SPIFFE ID in a certificate's URI SANs, when it has
/// exactly one URI SAN and that is an ID of `trust_domain`.
pub fn peer_identity(trust_domain: &str, cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, x) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let san = x.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let (uri, more) = (uris.next()?, uris.next());
    if more.is_some() {
        return None;
    }
    let (ns, svc) = parse_spiffe_id(trust_domain, uri)?;
    Some(format!("{ns}/{svc}"))
}

fn validity(cert: &CertificateDer<'_>) -> Option<(SystemTime, SystemTime)> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, x) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let at = |t: i64| UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(t).ok()?));
    Some((
        at(x.validity().not_before.timestamp())?,
        at(x.validity().not_after.timestamp())?,
    ))
}

/// Checks a server's chain against the trust bundle and its SPIFFE ID against the service
/// being called, named by the SNI `<service>.<namespace>` the dialler sets.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: String,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let expected = match server_name {
            ServerName::DnsName(d) => d
                .as_ref()
                .split_once('.')
                .map(|(svc, ns)| format!("{ns}/{svc}")),
            _ => None,
        };
        match (expected, peer_identity(&self.trust_domain, end_entity)) {
            (Some(want), Some(got)) if want == got => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The metrics of mutual TLS and authorization.
#[derive(Clone, Debug)]
pub struct TlsMetrics {
    /// `sidemesh_proxy_tls_handshake_failures_total{direction}`.
    pub handshake_failures: IntCounterVec,
    /// `sidemesh_proxy_tls_connections_total{direction}`: connections that completed a
    /// mutual TLS handshake.
    pub connections: IntCounterVec,
    /// `sidemesh_proxy_authz_denied_total{direction,service,reason}`.
    pub authz_denied: IntCounterVec,
    /// `sidemesh_proxy_tls_certificate_requests_total{result}`.
    pub certificate_requests: IntCounterVec,
    /// `sidemesh_proxy_tls_certificate_expiry_timestamp_seconds`.
    pub certificate_expiry: IntGauge,
}

impl TlsMetrics {
    fn new(registry: &Registry) -> prometheus::Result<TlsMetrics> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let m = TlsMetrics {
            handshake_failures: counter(
                "sidemesh_proxy_tls_handshake_failures_total",
                "TLS handshakes between sidecars that failed (bad or foreign certificate, wrong identity, timeout), by direction.",
                &["direction"],
            )?,
            connections: counter(
                "sidemesh_proxy_tls_connections_total",
                "Connections between sidecars that completed a mutual TLS handshake, by direction.",
                &["direction"],
            )?,
            authz_denied: counter(
                "sidemesh_proxy_authz_denied_total",
                "Requests or connections refused by the inbound policy, by direction, service and reason (not_allowed, no_identity, plaintext).",
                &["direction", "service", "reason"],
            )?,
            certificate_requests: counter(
                "sidemesh_proxy_tls_certificate_requests_total",
                "Certificate signing requests sent to discover, by result (issued, failed).",
                &["result"],
            )?,
            certificate_expiry: IntGauge::new(
                "sidemesh_proxy_tls_certificate_expiry_timestamp_seconds",
                "Unix time the sidecar's certificate expires (0 without one).",
            )?,
        };
        registry.register(Box::new(m.certificate_expiry.clone()))?;
        for d in ["inbound", "outbound"] {
            m.handshake_failures.with_label_values(&[d]);
            m.connections.with_label_values(&[d]);
        }
        for r in ["issued", "failed"] {
            m.certificate_requests.with_label_values(&[r]);
        }
        Ok(m)
    }
}

/// The sidecar's mutual TLS state: the current credentials (none until the first
/// certificate, or when the config turns TLS off) and the metrics. Shared by the data
/// plane and the identity task.
#[derive(Debug)]
pub struct MeshTls {
    credentials: ArcSwapOption<Credentials>,
    /// Bumped by every [`MeshTls::install`]: inbound connections re-check their peer then,
    /// and pooled outbound ones dialled before it are retired.
    generation: AtomicU64,
    /// The metrics.
    pub metrics: TlsMetrics,
}

impl MeshTls {
    /// Registers the metrics; no credentials yet.
    pub fn new(registry: &Registry) -> prometheus::Result<MeshTls> {
        Ok(MeshTls {
            credentials: ArcSwapOption::empty(),
            generation: AtomicU64::new(0),
            metrics: TlsMetrics::new(registry)?,
        })
    }

    /// The current credentials.
    pub fn credentials(&self) -> Option<Arc<Credentials>> {
        self.credentials.load_full()
    }

    /// Bumped by every [`MeshTls::install`]: pooled outbound connections dialled under an
    /// older value take no new requests.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether the sidecar has credentials now (meshed hops are mutual TLS).
    pub fn is_on(&self) -> bool {
        self.credentials.load().is_some()
    }

    /// Installs credentials (or removes them, turning TLS off on the outbound side).
    pub fn install(&self, credentials: Option<Credentials>) {
        let expiry = credentials
            .as_ref()
            .and_then(|c| c.not_after.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.metrics.certificate_expiry.set(expiry);
        self.credentials.store(credentials.map(Arc::new));
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// An inbound TLS peer's certificate chain, checked again against the trust bundle after
/// the sidecar's credentials change: a CA dropped from the bundle (rotation, compromise)
/// stops being trusted on connections that are already open, not only on new ones.
pub struct PeerTrust {
    mesh: Arc<MeshTls>,
    chain: Vec<CertificateDer<'static>>,
    /// The credentials generation last checked against, and its verdict.
    checked: u64,
    trusted: bool,
}

impl PeerTrust {
    /// Whether the peer still verifies. One atomic load while the credentials are the same;
    /// a chain verification once after each change.
    fn still_trusted(&mut self) -> bool {
        let now = self.mesh.generation.load(Ordering::Acquire);
        if now != self.checked {
            self.checked = now;
            self.trusted = match (self.mesh.credentials(), self.chain.split_first()) {
                (Some(c), Some((leaf, intermediates))) => c
                    .client_verifier
                    .verify_client_cert(leaf, intermediates, UnixTime::now())
                    .is_ok(),
                _ => false,
            };
            if !self.trusted {
                tracing::info!(
                    "closing an inbound connection: its client certificate is no longer trusted"
                );
            }
        }
        self.trusted
    }
}

/// A connection that may be TLS, on either side of the sidecar.
pub enum Io {
    /// Plaintext.
    Plain(TcpStream),
    /// Plaintext from a client, registered with the reactor only once it has to wait.
    Accepted(crate::accept::LazyTcp),
    /// TLS to a meshed endpoint.
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// TLS from a meshed client; `prefix` holds bytes already read (protocol detection)
    /// that are read again first.
    Server {
        /// The TLS stream.
        stream: Box<tokio_rustls::server::TlsStream<TcpStream>>,
        /// Bytes read ahead, served before the stream's.
        prefix: Bytes,
        /// The client's chain, re-checked when the credentials change.
        trust: Box<PeerTrust>,
    },
}

impl std::fmt::Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Io::Plain(_) => "Io::Plain",
            Io::Accepted(_) => "Io::Accepted",
            Io::Client(_) => "Io::Client",
            Io::Server { .. } => "Io::Server",
        })
    }
}

impl Io {
    /// The plain TCP stream, if this is not TLS.
    pub fn as_plain(&self) -> Option<&TcpStream> {
        match self {
            Io::Plain(s) => Some(s),
            _ => None,
        }
    }

    /// Declares that the caller now writes the connection's last bytes, all of them at
    /// once, and shuts it down right after: on a plaintext accepted connection they and
    /// the FIN then leave in one segment (see `LazyTcp::last_before_shutdown`).
    pub fn last_before_shutdown(&mut self) {
        if let Io::Accepted(s) = self {
            s.last_before_shutdown();
        }
    }

    /// Whether the TLS handshake chose HTTP/2 (ALPN `h2`): the peer sidecar carries its
    /// requests over one multiplexed HTTP/2 connection, whatever the port's protocol.
    pub fn alpn_h2(&self) -> bool {
        match self {
            Io::Plain(_) | Io::Accepted(_) => false,
            Io::Client(s) => s.get_ref().1.alpn_protocol() == Some(ALPN_H2),
            Io::Server { stream, .. } => stream.get_ref().1.alpn_protocol() == Some(ALPN_H2),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Accepted(s) => Pin::new(s).poll_read(cx, buf),
            Io::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Server {
                stream,
                prefix,
                trust,
            } => {
                if !trust.still_trusted() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "the client's certificate is no longer trusted",
                    )));
                }
                if !prefix.is_empty() {
                    let n = prefix.len().min(buf.remaining());
                    buf.put_slice(&prefix[..n]);
                    prefix.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Pin::new(stream.as_mut()).poll_read(cx, buf)
            }
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Accepted(s) => Pin::new(s).poll_write(cx, buf),
            Io::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Server { stream, .. } => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Accepted(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Client(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Io::Server { stream, .. } => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Accepted(s) => s.is_write_vectored(),
            Io::Client(s) => s.is_write_vectored(),
            Io::Server { stream, .. } => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Accepted(s) => Pin::new(s).poll_flush(cx),
            Io::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Server { stream, .. } => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Accepted(s) => Pin::new(s).poll_shutdown(cx),
            Io::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Server { stream, .. } => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The service a meshed endpoint must prove to be, and the TLS state to dial it with.
#[derive(Clone)]
pub struct TlsPeer {
    /// The sidecar's TLS state.
    pub mesh: Arc<MeshTls>,
    /// The namespace of the service dialled.
    pub namespace: Arc<str>,
    /// The service dialled.
    pub service: Arc<str>,
    /// The config's trust bundle. Part of equality, so a new bundle gives the service new
    /// connection pools: connections made under the old trust are not reused (a CA
    /// dropped from the bundle stops being trusted at once, not at the idle timeout).
    pub trust_bundle: Arc<str>,
}

impl std::fmt::Debug for TlsPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsPeer({}/{})", self.namespace, self.service)
    }
}

impl PartialEq for TlsPeer {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.mesh, &other.mesh)
            && self.namespace == other.namespace
            && self.service == other.service
            && self.trust_bundle == other.trust_bundle
    }
}

impl Eq for TlsPeer {}

impl std::hash::Hash for TlsPeer {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.namespace.hash(state);
        self.service.hash(state);
    }
}

/// Upgrades a connection to a meshed endpoint to mutual TLS when the sidecar has
/// credentials (TLS on); without them it stays plaintext, which permissive peers accept.
/// `h2` offers ALPN `h2` (HTTP/2 over the hop).
pub async fn dial(peer: &TlsPeer, stream: TcpStream, h2: bool) -> io::Result<Io> {
    let Some(creds) = peer.mesh.credentials() else {
        return Ok(Io::Plain(stream));
    };
    let name = ServerName::try_from(format!("{}.{}", peer.service, peer.namespace))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let config = if h2 { &creds.client_h2 } else { &creds.client };
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let m = &peer.mesh.metrics;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, stream)).await {
        Ok(Ok(s)) => {
            m.connections.with_label_values(&["outbound"]).inc();
            Ok(Io::Client(Box::new(s)))
        }
        Ok(Err(e)) => {
            m.handshake_failures.with_label_values(&["outbound"]).inc();
            tracing::debug!(service = %format!("{}/{}", peer.namespace, peer.service), error = %e, "TLS handshake to a meshed endpoint failed");
            Err(e)
        }
        Err(_) => {
            m.handshake_failures.with_label_values(&["outbound"]).inc();
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            ))
        }
    }
}

/// What the inbound side made of a new connection.
pub enum Accepted {
    /// Go on with this stream and client identity (`None`: plaintext, no identity).
    Go(Io, Option<Arc<str>>),
    /// Close it (failed handshake, or plaintext in strict mode); already counted.
    Refused,
}

/// Peels TLS off an inbound connection when the client starts a handshake. `peek_wait` is
/// how long to wait for the client's first byte before treating it as plaintext (server-
/// first protocols send nothing).
pub async fn accept(
    mesh: &Arc<MeshTls>,
    mode: TlsMode,
    own_service: &str,
    stream: TcpStream,
    peek_wait: Duration,
) -> Accepted {
    if mode == TlsMode::Disabled {
        return Accepted::Go(Io::Plain(stream), None);
    }
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(peek_wait, stream.peek(&mut first)).await;
    let is_tls = matches!(peeked, Ok(Ok(1))) && first[0] == TLS_HANDSHAKE;
    // Read before the credentials: a change between the two is re-checked at the first read.
    let generation = mesh.generation.load(Ordering::Acquire);
    let creds = mesh.credentials();
    match (is_tls, creds) {
        (true, Some(creds)) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(creds.server.clone());
            let m = &mesh.metrics;
            let done = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
            let s = match done {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    m.handshake_failures.with_label_values(&["inbound"]).inc();
                    tracing::debug!(error = %e, "inbound TLS handshake failed");
                    return Accepted::Refused;
                }
                Err(_) => {
                    m.handshake_failures.with_label_values(&["inbound"]).inc();
                    return Accepted::Refused;
                }
            };
            let id = s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| peer_identity(&creds.trust_domain, c));
            let Some(id) = id else {
                // Signed by the mesh CA yet without a mesh identity: not one of ours.
                m.handshake_failures.with_label_values(&["inbound"]).inc();
                return Accepted::Refused;
            };
            m.connections.with_label_values(&["inbound"]).inc();
            let trust = Box::new(PeerTrust {
                mesh: mesh.clone(),
                chain: s
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                    .unwrap_or_default(),
                checked: generation,
                trusted: true,
            });
            Accepted::Go(
                Io::Server {
                    stream: Box::new(s),
                    prefix: Bytes::new(),
                    trust,
                },
                Some(Arc::from(id)),
            )
        }
        // A handshake without credentials to answer it with (the first certificate has
        // not arrived yet): the client will retry.
        (true, None) => {
            mesh.metrics
                .handshake_failures
                .with_label_values(&["inbound"])
                .inc();
            Accepted::Refused
        }
        (false, _) if mode == TlsMode::Strict => {
            mesh.metrics
                .authz_denied
                .with_label_values(&["inbound", own_service, "plaintext"])
                .inc();
            tracing::debug!("plaintext connection refused (strict mutual TLS)");
            Accepted::Refused
        }
        (false, _) => Accepted::Go(Io::Plain(stream), None),
    }
}

/// Reads from a TLS server stream until `classify` decides (or `timeout` passes, or
/// 64 bytes are in), keeping what was read to be read again. `None` from the classifier
/// means "more bytes needed".
pub async fn detect_in<T>(
    io: &mut Io,
    timeout: Duration,
    classify: impl Fn(&[u8]) -> Option<T>,
) -> Option<T> {
    let Io::Server { stream, prefix, .. } = io else {
        return None;
    };
    let mut buf = BytesMut::from(&prefix[..]);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut found = None;
    while buf.len() < 64 {
        let mut chunk = [0u8; 64];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
        found = classify(&buf);
        if found.is_some() {
            break;
        }
    }
    *prefix = buf.freeze();
    found
}

/// Why a client may not call an inbound port, if it may not.
pub fn refusal(port: &InboundPort, client: Option<&str>) -> Option<&'static str> {
    if Snapshot::client_allowed(port, client) {
        None
    } else if client.is_none() {
        Some("no_identity")
    } else {
        Some("not_allowed")
    }
}

/// What [`authorize`] decides: the identity to pass on to the app, or the response for a
/// refused client.
pub(crate) type Verdict<'c> = Result<Option<&'c str>, Box<Response<Body>>>;

/// The inbound HTTP policy of one request: `allow_clients` on the verified identity.
/// `Err` is the 403 to answer when the client is refused; `Ok` is the identity to pass on
/// to the app in [`CLIENT_ID_HEADER`] (none without one, or when `port_outer` is not an
/// inbound port of the config). Whatever the verdict, the caller removes a forged
/// [`CLIENT_ID_HEADER`] from the request.
pub(crate) fn authorize<'c>(
    mesh: &MeshTls,
    snapshot: &Snapshot,
    port_outer: u16,
    client: Option<&'c str>,
) -> Verdict<'c> {
    let Some(port) = snapshot.inbound_by_outer(sidemesh_api::OuterPort(port_outer)) else {
        return Ok(None);
    };
    let Some(reason) = refusal(port, client) else {
        // Only what a header value can carry (RFC 9110 §5.5); mesh identities always can.
        return Ok(client.filter(|c| HeaderValue::from_str(c).is_ok()));
    };
    let own = snapshot.identity();
    let own = format!("{}/{}", own.namespace, own.service);
    mesh.metrics
        .authz_denied
        .with_label_values(&["inbound", &own, reason])
        .inc();
    let who = client.unwrap_or("(no identity: plaintext)");
    let body = serde_json::json!({
        "error": "forbidden",
        "client": who,
        "reason": match reason {
            "no_identity" => format!("{own} port {} only takes mutual TLS clients listed in allow_clients", port.port),
            _ => format!("{who} is not in allow_clients of {own} port {}", port.port),
        },
    });
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = StatusCode::FORBIDDEN;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(crate::http::ERROR, HeaderValue::from_static("forbidden"));
    Err(Box::new(r))
}

/// Keeps the sidecar's certificate current for as long as `stop` is not cancelled:
/// requests one when the config turns TLS on (or changes identity or trust bundle),
/// renews at two thirds of its lifetime, retries failures with backoff, and drops the
/// credentials when the config turns TLS off.
pub async fn run_identity(
    mesh: Arc<MeshTls>,
    poster: sidemesh_api::Poster,
    mut snapshots: watch::Receiver<Option<Snapshot>>,
    stop: CancellationToken,
) {
    let mut failures: u32 = 0;
    loop {
        let wanted = snapshots.borrow_and_update().as_ref().and_then(wanted);
        let next = match wanted {
            None => {
                if mesh.credentials().is_some() {
                    tracing::info!("mutual TLS turned off by the config");
                    mesh.install(None);
                }
                None
            }
            Some((settings, identity)) => {
                let current = mesh.credentials();
                let fresh = current.as_ref().is_some_and(|c| {
                    c.identity == identity
                        && c.trust_domain == settings.trust_domain
                        && c.bundle_pem == settings.trust_bundle_pem
                        && SystemTime::now() < c.renew_at
                });
                if fresh {
                    current.map(|c| c.renew_at)
                } else {
                    match request(&poster, &settings, &identity).await {
                        Ok(c) => {
                            failures = 0;
                            mesh.metrics
                                .certificate_requests
                                .with_label_values(&["issued"])
                                .inc();
                            tracing::info!(identity = %c.identity, valid_s = c.not_after.duration_since(SystemTime::now()).unwrap_or_default().as_secs(), "certificate installed");
                            let renew = c.renew_at;
                            mesh.install(Some(c));
                            Some(renew)
                        }
                        Err(e) => {
                            failures = failures.saturating_add(1);
                            mesh.metrics
                                .certificate_requests
                                .with_label_values(&["failed"])
                                .inc();
                            let delay = retry_delay(failures);
                            tracing::warn!(error = %e, retry_ms = delay.as_millis() as u64, "cannot get a certificate from discover");
                            Some(SystemTime::now() + delay)
                        }
                    }
                }
            }
        };
        let sleep = async {
            match next {
                None => std::future::pending().await,
                Some(at) => {
                    let d = at.duration_since(SystemTime::now()).unwrap_or_default();
                    tokio::time::sleep(d).await
                }
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            r = snapshots.changed() => if r.is_err() { return },
            _ = sleep => {}
        }
    }
}

/// The TLS settings and identity (`namespace/service`) a config asks for, if TLS is on
/// (for the whole config or for one inbound port).
fn wanted(s: &Snapshot) -> Option<(TlsSettings, String)> {
    if !s.wants_tls() {
        return None;
    }
    let t = s.config().tls.as_ref()?;
    let id = s.identity();
    Some((t.clone(), format!("{}/{}", id.namespace, id.service)))
}

fn retry_delay(failures: u32) -> Duration {
    use rand::Rng;
    let ceiling = RETRY_MIN
        .saturating_mul(1 << failures.saturating_sub(1).min(10))
        .min(RETRY_MAX);
    // Full jitter, but never below the floor, so a broken discover is not hammered.
    let ms = rand::rng().random_range(RETRY_MIN.as_millis()..=ceiling.as_millis());
    Duration::from_millis(ms as u64)
}

/// One CSR round trip: a new key, a CSR for the config's SPIFFE ID, the signed answer.
async fn request(
    poster: &sidemesh_api::Poster,
    settings: &TlsSettings,
    identity: &str,
) -> Result<Credentials, String> {
    let (ns, svc) = identity.split_once('/').ok_or("bad identity")?;
    let id = spiffe_id(&settings.trust_domain, ns, svc);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("key generation: {e}"))?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        id.try_into().map_err(|e: rcgen::Error| e.to_string())?,
    )];
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, identity);
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| format!("CSR: {e}"))?;
    let answer = poster
        .post(
            &settings.csr_url,
            "application/pkcs10",
            Bytes::from(csr),
            MAX_CERT_BYTES,
            CSR_TIMEOUT,
        )
        .await
        .map_err(|e| e.to_string())?;
    let chain = std::str::from_utf8(&answer).map_err(|_| "certificate is not PEM text")?;
    let creds = Credentials::new(
        &settings.trust_domain,
        &settings.trust_bundle_pem,
        chain,
        key.serialized_der(),
    )
    .map_err(|e| e.to_string())?;
    if creds.identity != identity {
        return Err(format!(
            "discover signed {} instead of {identity}",
            creds.identity
        ));
    }
    Ok(creds)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A test CA that signs sidecar certificates the way discover does.
    pub(crate) struct Ca {
        pub pem: String,
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    }

    impl Ca {
        pub(crate) fn new() -> Ca {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut p = rcgen::CertificateParams::default();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
            let pem = p.self_signed(&key).unwrap().pem();
            Ca {
                pem,
                issuer: rcgen::Issuer::new(p, key),
            }
        }

        /// A certificate for `ns/svc`, valid from `from` to `to` (seconds from now).
        pub(crate) fn issue(&self, ns: &str, svc: &str, from: i64, to: i64) -> Credentials {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut p = rcgen::CertificateParams::default();
            let id = spiffe_id("cluster.local", ns, svc);
            p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
            let now = time::OffsetDateTime::now_utc();
            p.not_before = now + time::Duration::seconds(from);
            p.not_after = now + time::Duration::seconds(to);
            p.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = p.signed_by(&key, &self.issuer).unwrap();
            Credentials::new(
                "cluster.local",
                &self.pem,
                &cert.pem(),
                key.serialized_der(),
            )
            .unwrap()
        }
    }

    /// Runs a handshake between `client` (dialling `expect`) and `server` over a real
    /// socket; returns the identity the server saw, or None when either side refused.
    async fn handshake(
        client: Credentials,
        server: Credentials,
        expect: (&str, &str),
    ) -> Option<Option<Arc<str>>> {
        let registry = Registry::new();
        let (cm, sm) = (
            Arc::new(MeshTls::new(&registry).unwrap()),
            Arc::new(MeshTls::new(&Registry::new()).unwrap()),
        );
        cm.install(Some(client));
        sm.install(Some(server));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let sm2 = sm.clone();
        let srv = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            match accept(&sm2, TlsMode::Strict, "shop/api", s, Duration::from_secs(5)).await {
                Accepted::Go(mut io, id) => {
                    let mut b = [0u8; 4];
                    io.read_exact(&mut b).await.ok()?;
                    Some(id)
                }
                Accepted::Refused => None,
            }
        });
        let peer = TlsPeer {
            mesh: cm.clone(),
            namespace: Arc::from(expect.0),
            service: Arc::from(expect.1),
            trust_bundle: Arc::from(""),
        };
        let stream = TcpStream::connect(addr).await.unwrap();
        let dialled = dial(&peer, stream, false).await;
        if let Ok(mut io) = dialled {
            let _ = io.write_all(b"ping").await;
            let _ = io.flush().await;
        }
        tokio::time::timeout(Duration::from_secs(10), srv)
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn mutual_tls_carries_the_client_identity() {
        let ca = Ca::new();
        let seen = handshake(
            ca.issue("shop", "web", -60, 3600),
            ca.issue("shop", "api", -60, 3600),
            ("shop", "api"),
        )
        .await;
        assert_eq!(seen.flatten().as_deref(), Some("shop/web"));
    }

    #[tokio::test]
    async fn foreign_ca_expired_and_wrong_identity_are_refused() {
        let ca = Ca::new();
        let other = Ca::new();
        // The server's certificate is from another CA: the client refuses it.
        let seen = handshake(
            ca.issue("shop", "web", -60, 3600),
            other.issue("shop", "api", -60, 3600),
            ("shop", "api"),
        )
        .await;
        assert_eq!(seen, None);
        // The client's certificate is from another CA: the server refuses it.
        let seen = handshake(
            other.issue("shop", "web", -60, 3600),
            ca.issue("shop", "api", -60, 3600),
            ("shop", "api"),
        )
        .await;
        assert_eq!(seen, None);
        // The client's certificate has expired.
        let seen = handshake(
            ca.issue("shop", "web", -7200, -3600),
            ca.issue("shop", "api", -60, 3600),
            ("shop", "api"),
        )
        .await;
        assert_eq!(seen, None);
        // The server is a valid mesh member, but not the service being called.
        let seen = handshake(
            ca.issue("shop", "web", -60, 3600),
            ca.issue("shop", "api", -60, 3600),
            ("shop", "payments"),
        )
        .await;
        assert_eq!(seen, None);
    }

    #[test]
    fn renewal_is_at_two_thirds_of_the_lifetime() {
        let ca = Ca::new();
        let c = ca.issue("shop", "web", 0, 3000);
        let life = c.not_after.duration_since(SystemTime::now()).unwrap();
        let renew = c.renew_at.duration_since(SystemTime::now()).unwrap();
        assert!(life.as_secs() >= 2990, "{life:?}");
        assert!((1990..=2001).contains(&renew.as_secs()), "{renew:?}");
        assert_eq!(c.identity, "shop/web");
    }

    #[test]
    fn allow_clients_reasons() {
        let port: InboundPort = serde_json::from_value(serde_json::json!({
            "port": 8080, "port_outer": 18080, "allow_clients": ["shop/web", "ops/*"]
        }))
        .unwrap();
        assert_eq!(refusal(&port, Some("shop/web")), None);
        assert_eq!(refusal(&port, Some("ops/anything")), None);
        assert_eq!(refusal(&port, Some("shop/evil")), Some("not_allowed"));
        assert_eq!(refusal(&port, None), Some("no_identity"));
        let open: InboundPort =
            serde_json::from_value(serde_json::json!({"port": 8080, "port_outer": 18080})).unwrap();
        assert_eq!(refusal(&open, None), None);
        let closed: InboundPort = serde_json::from_value(
            serde_json::json!({"port": 8080, "port_outer": 18080, "allow_clients": []}),
        )
        .unwrap();
        assert_eq!(refusal(&closed, Some("shop/web")), Some("not_allowed"));
    }

    #[test]
    fn retry_delays_grow_and_stay_bounded() {
        for n in 1..40 {
            let d = retry_delay(n);
            assert!(d >= RETRY_MIN && d <= RETRY_MAX, "{n}: {d:?}");
        }
    }
}
