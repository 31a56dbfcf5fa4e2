//! The identity authority: discover's CA, which signs the short-lived certificates that
//! sidecars use for mutual TLS between them.
//!
//! A sidecar makes its own key pair and sends a certificate signing request (PEM) to
//! `POST /v1/sidecars/{ns}/{svc}/{plugin}/certificate`, next to its config URL. The
//! authority signs only the identity of the config served at that URL: the CSR must ask
//! for exactly one name, the URI `spiffe://<trust domain>/ns/<ns>/svc/<svc>`, and the
//! certificate it gets carries that name alone, whatever else the CSR says (its subject,
//! key usages and validity are ignored). The private key never reaches discover.
//!
//! What authenticates the requester is what authenticates the config poll: nothing more
//! than reaching discover (and, where a deployment puts one in front, the `Authorization`
//! header). Whoever can read a sidecar's config can get that sidecar's identity; see
//! `docs/discover-http.md`.
//!
//! The CA is either given (`--ca-cert`, `--ca-key`, PEM) or generated once (ECDSA P-256,
//! ten years) and kept in the data directory as `ca.crt` and `ca.key`, so a restart keeps
//! the trust bundle that sidecars hold.
//!
//! **Rotation.** Extra CA certificates to keep trusting while the signing CA changes come
//! from `--ca-trust-extra FILE` (PEM): the trust bundle of every config is the signing CA
//! followed by them. The file is watched; an edit that is not a list of CA certificates is
//! refused with an error and the last good list stays. The signing CA's own files (given,
//! or kept in the data directory) are watched too: a new certificate and key that belong
//! together replace the signing CA without a restart, and a pair that does not (a
//! certificate that is not a CA, a key of another certificate, a half-written file) is
//! refused and the last good CA keeps signing. Any change of the bundle (a new signing CA,
//! an edit of the extra file) changes every config's version, so sidecars learn it at
//! their next poll and get a certificate of the signing CA; see [`Authority::salt`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use prometheus::{IntCounterVec, Opts, Registry};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sidemesh_api::config::{TlsMode, TlsSettings, spiffe_id};

/// The file the generated CA certificate is kept in, inside the data directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// The file the generated CA key is kept in (mode 0600), inside the data directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// The largest CSR accepted, in bytes.
pub const MAX_CSR_BYTES: usize = 16 * 1024;
/// Certificates are back-dated by this much, for clocks slightly behind discover's.
const BACKDATE: Duration = Duration::from_secs(60);
/// Lifetime of a generated CA.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);

/// How the authority is set up.
#[derive(Clone, Debug)]
pub struct AuthorityConfig {
    /// The SPIFFE trust domain (default `cluster.local`).
    pub trust_domain: String,
    /// The mode written into every config.
    pub mode: TlsMode,
    /// Lifetime of the certificates signed (default 24 h).
    pub cert_ttl: Duration,
    /// A PEM file of extra CA certificates to trust besides the signing CA (a CA being
    /// rotated out or in); watched while discover serves.
    pub extra_trust: Option<PathBuf>,
}

impl Default for AuthorityConfig {
    fn default() -> Self {
        AuthorityConfig {
            trust_domain: "cluster.local".to_owned(),
            mode: TlsMode::Permissive,
            cert_ttl: Duration::from_secs(86_400),
            extra_trust: None,
        }
    }
}

/// Why a CSR was not signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The body is not a PEM CSR, or its signature does not verify.
    #[error("not a valid certificate signing request: {0}")]
    BadCsr(String),
    /// The CSR asks for another identity than the config's, or for more than it.
    #[error("the CSR must ask for exactly the URI SAN {expected}, got [{got}]")]
    WrongIdentity {
        /// The identity of the config at that URL.
        expected: String,
        /// What the CSR asked for.
        got: String,
    },
    /// Signing failed (a bug or a broken CA key).
    #[error("cannot sign: {0}")]
    Internal(String),
}

/// The CA that signs: its key and certificate.
struct Signing {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

/// Discover's CA. Never prints its key.
pub struct Authority {
    config: AuthorityConfig,
    signing: ArcSwap<Signing>,
    /// The files the signing CA was read from (certificate, key), watched for rotation;
    /// `None` for a CA that lives in memory only.
    ca_files: Option<(PathBuf, PathBuf)>,
    /// Held while the CA files are reloaded: the certificate's and the key's watchers
    /// both reload, and two reloads at once would both see the change.
    reloading: std::sync::Mutex<()>,
    /// The extra trusted CA certificates (PEM, checked), from `config.extra_trust`.
    extra_pem: ArcSwap<String>,
    issued: IntCounterVec,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Loads the CA from `ca_cert` and `ca_key` (PEM files, both or neither), or else from
    /// `data_dir` (generating and saving it there on first use), or else generates one in
    /// memory (a warning: sidecars must then restart with discover). Registers
    /// `sidemesh_discover_certificates_total{result}`.
    pub fn load(
        config: AuthorityConfig,
        ca_cert: Option<&Path>,
        ca_key: Option<&Path>,
        data_dir: Option<&Path>,
        registry: &Registry,
    ) -> anyhow::Result<Authority> {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))
        };
        let mut ca_files = None;
        let (ca_pem, key_pem) = match (ca_cert, ca_key, data_dir) {
            (Some(c), Some(k), _) => {
                ca_files = Some((c.to_owned(), k.to_owned()));
                (read(c)?, read(k)?)
            }
            (Some(_), None, _) | (None, Some(_), _) => {
                anyhow::bail!("--ca-cert and --ca-key go together: give both or neither")
            }
            (None, None, Some(dir)) => {
                let (c, k) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
                let pair = if c.exists() || k.exists() {
                    (read(&c)?, read(&k)?)
                } else {
                    let (cert, key) = generate_ca(&config.trust_domain)?;
                    std::fs::create_dir_all(dir)?;
                    write_private(&k, &key)?;
                    std::fs::write(&c, &cert)?;
                    tracing::info!(cert = %c.display(), "generated a mesh CA in the data directory");
                    (cert, key)
                };
                ca_files = Some((c, k));
                pair
            }
            (None, None, None) => {
                tracing::warn!(
                    "no --ca-cert/--ca-key and no --data-dir: the mesh CA lives in memory only; \
                     sidecars must restart when discover does"
                );
                generate_ca(&config.trust_domain)?
            }
        };
        let signing = signing(&ca_pem, &key_pem).map_err(|e| anyhow::anyhow!("{e}"))?;
        let issued = IntCounterVec::new(
            Opts::new(
                "sidemesh_discover_certificates_total",
                "Certificate signing requests answered, by result (issued, refused).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(issued.clone()))?;
        for r in ["issued", "refused"] {
            issued.with_label_values(&[r]);
        }
        let extra = match &config.extra_trust {
            Some(file) => read_extra_trust(file).map_err(|e| anyhow::anyhow!("{e}"))?,
            None => String::new(),
        };
        Ok(Authority {
            config,
            signing: ArcSwap::from_pointee(signing),
            ca_files,
            reloading: std::sync::Mutex::new(()),
            extra_pem: ArcSwap::from_pointee(extra),
            issued,
        })
    }

    /// The signing CA's certificate (PEM).
    pub fn ca_pem(&self) -> String {
        self.signing.load().ca_pem.clone()
    }

    /// The files the signing CA comes from (certificate, key), if it has files.
    pub fn ca_files(&self) -> Option<(&Path, &Path)> {
        self.ca_files
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()))
    }

    /// Reads the signing CA's files again. When they hold another CA whose key belongs to
    /// its certificate, that CA signs from now on and `Ok(true)` says so; `Ok(false)` when
    /// nothing changed; on error (unreadable, not a CA, a key of another certificate: also
    /// the state between writing one file and the other) the last good CA stays.
    pub fn reload_ca(&self) -> Result<bool, String> {
        let Some((cert_file, key_file)) = &self.ca_files else {
            return Ok(false);
        };
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let (ca_pem, key_pem) = (read(cert_file)?, read(key_file)?);
        if ca_pem == self.signing.load().ca_pem {
            return Ok(false);
        }
        let next = signing(&ca_pem, &key_pem)
            .map_err(|e| format!("{} and {}: {e}", cert_file.display(), key_file.display()))?;
        self.signing.store(Arc::new(next));
        Ok(true)
    }

    /// The trust bundle (PEM): the signing CA, then the extra trusted CAs.
    pub fn trust_bundle_pem(&self) -> String {
        let extra = self.extra_pem.load();
        let mut bundle = self.signing.load().ca_pem.trim_end().to_owned();
        bundle.push('\n');
        if !extra.is_empty() {
            bundle.push_str(&extra);
        }
        bundle
    }

    /// The extra trust file, if any.
    pub fn extra_trust_file(&self) -> Option<&Path> {
        self.config.extra_trust.as_deref()
    }

    /// Reads the extra trust file again. On success the bundle includes what it holds now
    /// and `Ok(true)` says whether that changed anything; on error the last good list stays.
    pub fn reload_extra_trust(&self) -> Result<bool, String> {
        let Some(file) = &self.config.extra_trust else {
            return Ok(false);
        };
        let extra = read_extra_trust(file)?;
        if **self.extra_pem.load() == extra {
            return Ok(false);
        }
        self.extra_pem.store(Arc::new(extra));
        Ok(true)
    }

    /// A fingerprint of everything the served TLS settings carry but the config's own
    /// content (mode, trust domain, trust bundle). The store mixes it into each config's
    /// content hash, so a change of it gives every config a new version: pollers holding
    /// the old version are woken, and a restart with a new CA is not answered `304`.
    pub fn salt(&self) -> u64 {
        let s = format!(
            "{}\n{}\n{}",
            self.config.mode.as_str(),
            self.config.trust_domain,
            self.trust_bundle_pem()
        );
        crate::addresses::fnv1a(s.as_bytes())
    }

    /// The TLS settings of the config of `plugin`'s sidecar, served at
    /// `.../{plugin}`: the CSR goes to `{plugin}/certificate` next to it.
    pub fn settings(&self, plugin: &str) -> TlsSettings {
        TlsSettings {
            mode: self.config.mode,
            trust_domain: self.config.trust_domain.clone(),
            trust_bundle_pem: self.trust_bundle_pem(),
            csr_url: format!("{plugin}/certificate"),
        }
    }

    /// Signs `csr_pem` for `namespace/service` if it asks for exactly that identity;
    /// returns the certificate (PEM), valid from now (minus a minute) for the TTL.
    pub fn sign(
        &self,
        namespace: &str,
        service: &str,
        csr_pem: &str,
        now: SystemTime,
    ) -> Result<String, SignError> {
        let r = self.sign_inner(namespace, service, csr_pem, now);
        let result = if r.is_ok() { "issued" } else { "refused" };
        self.issued.with_label_values(&[result]).inc();
        r
    }

    fn sign_inner(
        &self,
        namespace: &str,
        service: &str,
        csr_pem: &str,
        now: SystemTime,
    ) -> Result<String, SignError> {
        let expected = spiffe_id(&self.config.trust_domain, namespace, service);
        // Parsing verifies the CSR's self-signature: the requester holds the key.
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| SignError::BadCsr(e.to_string()))?;
        let sans = &csr.params.subject_alt_names;
        let only_ours = matches!(sans.as_slice(), [SanType::URI(u)] if u.as_str() == expected);
        if !only_ours {
            return Err(SignError::WrongIdentity {
                expected,
                got: sans.iter().map(describe_san).collect::<Vec<_>>().join(", "),
            });
        }
        let uri = expected
            .clone()
            .try_into()
            .map_err(|e: rcgen::Error| SignError::Internal(e.to_string()))?;
        // A fresh set of parameters: nothing of the CSR but its key and checked name.
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri)];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{namespace}/{service}"));
        params.distinguished_name = dn;
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + self.config.cert_ttl).into();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&rand_serial()));
        let cert = params
            .signed_by(&csr.public_key, &self.signing.load().issuer)
            .map_err(|e| SignError::Internal(e.to_string()))?;
        tracing::info!(
            namespace,
            service,
            ttl_s = self.config.cert_ttl.as_secs(),
            "certificate issued"
        );
        Ok(cert.pem())
    }
}

/// The signing CA of a certificate and key (PEM): the certificate must be one CA
/// certificate and the key its own.
fn signing(ca_pem: &str, key_pem: &str) -> Result<Signing, String> {
    use x509_parser::pem::Pem;
    let key = KeyPair::from_pem(key_pem).map_err(|e| format!("bad CA key: {e}"))?;
    let mut pems = Pem::iter_from_buffer(ca_pem.as_bytes());
    let pem = match (pems.next(), pems.next()) {
        (Some(Ok(pem)), None) if pem.label == "CERTIFICATE" => pem,
        (None, _) => return Err("bad CA certificate: no PEM certificate".to_owned()),
        (Some(Err(e)), _) => return Err(format!("bad CA certificate: {e}")),
        _ => return Err("bad CA certificate: expected exactly one PEM CERTIFICATE".to_owned()),
    };
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("bad CA certificate: {e}"))?;
    if !cert.is_ca() {
        return Err(format!(
            "the certificate ({}) is not a CA certificate",
            cert.subject()
        ));
    }
    if *cert.public_key().subject_public_key.data != *key.public_key_raw() {
        return Err(format!(
            "the key is not the key of the CA certificate ({})",
            cert.subject()
        ));
    }
    let issuer =
        Issuer::from_ca_cert_pem(ca_pem, key).map_err(|e| format!("bad CA certificate: {e}"))?;
    Ok(Signing {
        issuer,
        ca_pem: ca_pem.to_owned(),
    })
}

/// Reads and checks an extra trust file: PEM certificates, each a CA (none when empty).
/// Returns the text, or what is wrong.
fn read_extra_trust(file: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read --ca-trust-extra {}: {e}", file.display()))?;
    check_extra_trust(&text).map_err(|e| format!("--ca-trust-extra {}: {e}", file.display()))
}

/// Checks the text of an extra trust file; see [`read_extra_trust`]. The text is kept as
/// it is (text between PEM blocks is ignored by every reader).
fn check_extra_trust(text: &str) -> Result<String, String> {
    use x509_parser::pem::Pem;
    // An empty file trusts nothing extra: the last step of a rotation.
    if text.trim().is_empty() {
        return Ok(String::new());
    }
    let mut count = 0;
    for (i, pem) in Pem::iter_from_buffer(text.as_bytes()).enumerate() {
        let pem = pem.map_err(|e| format!("PEM block {}: {e}", i + 1))?;
        if pem.label != "CERTIFICATE" {
            return Err(format!(
                "PEM block {} is a {}, expected a CERTIFICATE",
                i + 1,
                pem.label
            ));
        }
        let cert = pem
            .parse_x509()
            .map_err(|e| format!("certificate {}: {e}", i + 1))?;
        if !cert.is_ca() {
            return Err(format!(
                "certificate {} ({}) is not a CA certificate",
                i + 1,
                cert.subject()
            ));
        }
        count += 1;
    }
    if count == 0 {
        return Err("holds no PEM certificate".to_owned());
    }
    Ok(format!("{}\n", text.trim()))
}

fn describe_san(s: &SanType) -> String {
    match s {
        SanType::URI(u) => format!("URI:{}", u.as_str()),
        SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        SanType::Rfc822Name(m) => format!("email:{}", m.as_str()),
        other => format!("{other:?}"),
    }
}

fn rand_serial() -> [u8; 16] {
    let mut b: [u8; 16] = rand::random();
    // Positive and non-zero, as RFC 5280 §4.1.2.2 wants.
    b[0] = (b[0] & 0x7f) | 0x01;
    b
}

/// A new self-signed CA (ECDSA P-256): (certificate PEM, key PEM).
fn generate_ca(trust_domain: &str) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "sidemesh");
    dn.push(
        DnType::CommonName,
        format!("sidemesh mesh CA ({trust_domain})"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + CA_LIFETIME).into();
    params.serial_number = Some(SerialNumber::from_slice(&rand_serial()));
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write_private(path: &Path, data: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

    fn authority(dir: Option<&Path>) -> Authority {
        Authority::load(
            AuthorityConfig::default(),
            None,
            None,
            dir,
            &Registry::new(),
        )
        .unwrap()
    }

    fn csr(sans: Vec<SanType>) -> (String, KeyPair) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        (p.serialize_request(&key).unwrap().pem().unwrap(), key)
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.to_owned().try_into().unwrap())
    }

    #[test]
    fn signs_only_the_configs_identity() {
        let a = authority(None);
        let (pem, key) = csr(vec![uri("spiffe://cluster.local/ns/shop/svc/web")]);
        let cert = a.sign("shop", "web", &pem, SystemTime::now()).unwrap();
        let der = rustls_pki_types_der(&cert);
        let (_, x) = X509Certificate::from_der(&der).unwrap();
        // The sidecar's own public key, one URI SAN, client and server auth, not a CA.
        assert_eq!(
            &*x.public_key().subject_public_key.data,
            key.public_key_raw()
        );
        let mut sans = Vec::new();
        for ext in x.extensions() {
            if let ParsedExtension::SubjectAlternativeName(s) = ext.parsed_extension() {
                for n in &s.general_names {
                    sans.push(format!("{n:?}"));
                    assert!(
                        matches!(n, GeneralName::URI(u) if *u == "spiffe://cluster.local/ns/shop/svc/web")
                    );
                }
            }
        }
        assert_eq!(sans.len(), 1);
        assert!(!x.is_ca());
        let lifetime = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
        assert_eq!(lifetime, 86_400 + 60);

        // Another service's identity, an extra name, a DNS name, no name: all refused.
        for sans in [
            vec![uri("spiffe://cluster.local/ns/shop/svc/payments")],
            vec![
                uri("spiffe://cluster.local/ns/shop/svc/web"),
                uri("spiffe://cluster.local/ns/shop/svc/payments"),
            ],
            vec![SanType::DnsName("web.shop".try_into().unwrap())],
            vec![],
        ] {
            let (pem, _) = csr(sans);
            let e = a.sign("shop", "web", &pem, SystemTime::now()).unwrap_err();
            assert!(matches!(e, SignError::WrongIdentity { .. }), "{e}");
        }
        assert!(matches!(
            a.sign("shop", "web", "garbage", SystemTime::now()),
            Err(SignError::BadCsr(_))
        ));
        assert_eq!(a.issued.with_label_values(&["issued"]).get(), 1);
        assert_eq!(a.issued.with_label_values(&["refused"]).get(), 5);
    }

    #[test]
    fn generated_ca_is_kept_in_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let first = authority(Some(dir.path())).ca_pem().to_owned();
        let again = authority(Some(dir.path())).ca_pem().to_owned();
        assert_eq!(first, again);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0);
        let s = authority(Some(dir.path())).settings("sidemesh-proxy");
        assert_eq!(s.csr_url, "sidemesh-proxy/certificate");
        assert_eq!(s.trust_bundle_pem, first);
    }

    #[test]
    fn a_given_ca_signs_and_is_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = generate_ca("example.org").unwrap();
        let (c, k) = (dir.path().join("ca.pem"), dir.path().join("ca-key.pem"));
        std::fs::write(&c, &cert).unwrap();
        std::fs::write(&k, &key).unwrap();
        let config = AuthorityConfig {
            trust_domain: "example.org".into(),
            ..AuthorityConfig::default()
        };
        let a = Authority::load(config, Some(&c), Some(&k), None, &Registry::new()).unwrap();
        assert_eq!(a.ca_pem(), cert);
        assert_eq!(a.settings("p").trust_domain, "example.org");
        let (pem, _) = csr(vec![uri("spiffe://example.org/ns/shop/svc/web")]);
        assert!(a.sign("shop", "web", &pem, SystemTime::now()).is_ok());
        // The default trust domain's ID is foreign here.
        let (pem, _) = csr(vec![uri("spiffe://cluster.local/ns/shop/svc/web")]);
        assert!(a.sign("shop", "web", &pem, SystemTime::now()).is_err());
    }

    #[test]
    fn a_new_ca_in_the_files_signs_and_a_bad_pair_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("ca.pem"), dir.path().join("ca-key.pem"));
        let (old_cert, old_key) = generate_ca("cluster.local").unwrap();
        std::fs::write(&c, &old_cert).unwrap();
        std::fs::write(&k, &old_key).unwrap();
        let a = Authority::load(
            AuthorityConfig::default(),
            Some(&c),
            Some(&k),
            None,
            &Registry::new(),
        )
        .unwrap();
        assert_eq!(a.ca_files(), Some((c.as_path(), k.as_path())));
        assert_eq!(a.reload_ca(), Ok(false), "unchanged files");
        let old_salt = a.salt();
        let issuer_of = |cert: &str| {
            let der = rustls_pki_types_der(cert);
            let (_, x) = X509Certificate::from_der(&der).unwrap();
            x.issuer().to_string()
        };
        let (pem, _) = csr(vec![uri("spiffe://cluster.local/ns/shop/svc/web")]);
        let subject_of = |ca: &str| {
            let der = rustls_pki_types_der(ca);
            let (_, x) = X509Certificate::from_der(&der).unwrap();
            x.subject().to_string()
        };
        let signed = a.sign("shop", "web", &pem, SystemTime::now()).unwrap();
        assert_eq!(issuer_of(&signed), subject_of(&old_cert));

        // Half a rotation (the new certificate, the old key), a leaf, garbage: refused with
        // what is wrong, and the old CA keeps signing.
        let (new_cert, new_key) = generate_ca("next.cluster.local").unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["x.example".into()])
            .unwrap()
            .self_signed(&leaf_key)
            .unwrap()
            .pem();
        for (cert, key, want) in [
            (new_cert.as_str(), old_key.clone(), "not the key of the CA"),
            (
                leaf.as_str(),
                leaf_key.serialize_pem(),
                "not a CA certificate",
            ),
            ("garbage", new_key.clone(), "no PEM certificate"),
            (new_cert.as_str(), "garbage".to_owned(), "bad CA key"),
        ] {
            std::fs::write(&c, cert).unwrap();
            std::fs::write(&k, &key).unwrap();
            let e = a.reload_ca().unwrap_err();
            assert!(e.contains(want) && e.contains("ca.pem"), "{e}");
            assert_eq!(a.ca_pem(), old_cert);
            assert_eq!(a.salt(), old_salt);
        }
        let signed = a.sign("shop", "web", &pem, SystemTime::now()).unwrap();
        assert_eq!(issuer_of(&signed), subject_of(&old_cert));

        // The whole new pair: it signs, and the bundle (so the salt) changes.
        std::fs::write(&c, &new_cert).unwrap();
        std::fs::write(&k, &new_key).unwrap();
        assert_eq!(a.reload_ca(), Ok(true));
        assert_eq!(a.ca_pem(), new_cert);
        assert_ne!(a.salt(), old_salt);
        assert!(a.trust_bundle_pem().starts_with(new_cert.trim_end()));
        let signed = a.sign("shop", "web", &pem, SystemTime::now()).unwrap();
        assert_eq!(issuer_of(&signed), subject_of(&new_cert));
        assert_ne!(subject_of(&new_cert), subject_of(&old_cert));

        // A CA of memory only has no files to reload.
        assert_eq!(authority(None).reload_ca(), Ok(false));
        assert!(authority(None).ca_files().is_none());
    }

    #[test]
    fn extra_trust_joins_the_bundle_and_a_bad_edit_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let (old_ca, old_key) = generate_ca("cluster.local").unwrap();
        let extra = dir.path().join("extra.pem");
        std::fs::write(&extra, &old_ca).unwrap();
        let config = AuthorityConfig {
            extra_trust: Some(extra.clone()),
            ..AuthorityConfig::default()
        };
        let a = Authority::load(config.clone(), None, None, None, &Registry::new()).unwrap();
        let bundle = a.settings("p").trust_bundle_pem;
        assert!(
            bundle.starts_with(a.ca_pem().trim_end()),
            "signing CA first"
        );
        assert!(bundle.contains(old_ca.trim()), "extra CA in the bundle");
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
        let with_old = a.salt();
        assert_eq!(a.reload_extra_trust(), Ok(false), "unchanged file");

        // Bad edits: an error that says what is wrong, and the last good bundle stays.
        let leaf = {
            let key = KeyPair::generate().unwrap();
            CertificateParams::new(vec!["x.example".into()])
                .unwrap()
                .self_signed(&key)
                .unwrap()
                .pem()
        };
        for (bad, want) in [
            ("garbage", "no PEM certificate"),
            (old_key.as_str(), "expected a CERTIFICATE"),
            (leaf.as_str(), "not a CA certificate"),
        ] {
            std::fs::write(&extra, bad).unwrap();
            let e = a.reload_extra_trust().unwrap_err();
            assert!(e.contains(want) && e.contains("extra.pem"), "{e}");
            assert_eq!(a.settings("p").trust_bundle_pem, bundle);
        }
        // At start a bad file is an error.
        assert!(Authority::load(config, None, None, None, &Registry::new()).is_err());

        // Emptied: the old CA is dropped, the salt (so every config's version) changes.
        std::fs::write(&extra, "").unwrap();
        assert_eq!(a.reload_extra_trust(), Ok(true));
        assert_eq!(a.settings("p").trust_bundle_pem.trim(), a.ca_pem().trim());
        assert_ne!(a.salt(), with_old);
    }

    #[test]
    fn given_ca_files_must_come_in_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("c.pem");
        let e = Authority::load(
            AuthorityConfig::default(),
            Some(&c),
            None,
            None,
            &Registry::new(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("go together"));
    }

    fn rustls_pki_types_der(pem: &str) -> Vec<u8> {
        let p = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1;
        p.contents
    }
}
