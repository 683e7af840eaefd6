//! TLS on the client and peer ports (rustls, ring), with etcd's settings: a certificate and
//! key, a trusted CA and client certificates required of whoever connects, self-signed
//! certificates made at start (`--auto-tls`), a common name peers must have, cipher suites and
//! protocol versions.
//!
//! Certificates are read again when their files change (checked at most once a second, at a
//! handshake): a certificate rotated on disk is used for the next connection, without a
//! restart. A file that does not load keeps the last good configuration, with an error logged.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;

/// How often, at most, the files are looked at for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(1);
/// A handshake that takes longer is abandoned.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One port's TLS settings, as etcd's flags give them (`--cert-file` ..., or `--peer-*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub trusted_ca_file: Option<PathBuf>,
    /// Require a certificate signed by the trusted CA of whoever connects.
    pub client_cert_auth: bool,
    /// Make a self-signed certificate when none is given (written under the data dir).
    pub auto_tls: bool,
    /// Peers only: the common name a peer's certificate must have.
    pub allowed_cn: Option<String>,
    /// IANA or Go names (`TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256`); empty: rustls' defaults.
    pub cipher_suites: Vec<String>,
    /// `TLS1.2` or `TLS1.3` (etcd's names); `None`: both.
    pub min_version: Option<String>,
    pub max_version: Option<String>,
}

impl TlsOptions {
    /// Are there settings at all (a certificate, or auto TLS)?
    pub fn is_set(&self) -> bool {
        self.cert_file.is_some() || self.auto_tls
    }

    /// A certificate given or made: with `--auto-tls` and no `--cert-file`, a self-signed one
    /// for `hosts` in `dir` (made once, kept across restarts, as etcd's fixtures).
    pub fn resolve_auto(mut self, dir: &Path, hosts: &[String]) -> Result<TlsOptions, String> {
        if self.cert_file.is_some() || !self.auto_tls {
            return Ok(self);
        }
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        if !cert.exists() || !key.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let mut names: Vec<String> = hosts.to_vec();
            if names.is_empty() {
                names.push("localhost".into());
            }
            let made = rcgen::generate_simple_self_signed(names)
                .map_err(|e| format!("cannot make a self-signed certificate: {e}"))?;
            write_private(&key, made.signing_key.serialize_pem().as_bytes())?;
            write_private(&cert, made.cert.pem().as_bytes())?;
            tracing::info!(cert = %cert.display(), "made a self-signed certificate (auto TLS)");
        }
        self.cert_file = Some(cert);
        self.key_file = Some(key);
        Ok(self)
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write as _;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// What identifies a file's content without reading it: its modification time and length.
type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(files: &[&Option<PathBuf>]) -> Stamp {
    files
        .iter()
        .map(|f| {
            let meta = std::fs::metadata(f.as_ref()?).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        })
        .collect()
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate in {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("cannot read a private key from {}: {e}", path.display()))
}

fn read_roots(path: &Path) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("bad CA certificate in {}: {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

/// The ring provider with only the TLS 1.2 suites `names` lists (all when empty). As with Go's
/// (etcd's), the TLS 1.3 suites are not chosen: all are kept.
fn provider(names: &[String]) -> Result<Arc<CryptoProvider>, String> {
    // ring, not aws-lc (whose build needs cmake and a C toolchain); rustls marks its default
    // provider deprecated for lacking post-quantum key exchange.
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    if !names.is_empty() {
        let name_of = |s: &rustls::SupportedCipherSuite| format!("{:?}", s.suite());
        let mut chosen: Vec<rustls::SupportedCipherSuite> = provider
            .cipher_suites
            .iter()
            .filter(|s| name_of(s).starts_with("TLS13_"))
            .copied()
            .collect();
        for name in names {
            let wanted = name.trim().to_ascii_uppercase();
            let tls13 = format!("TLS13_{}", wanted.trim_start_matches("TLS_"));
            let Some(suite) = provider
                .cipher_suites
                .iter()
                .find(|s| name_of(s) == wanted || name_of(s) == tls13)
                .copied()
            else {
                let known: Vec<String> = provider.cipher_suites.iter().map(name_of).collect();
                return Err(format!(
                    "unsupported cipher suite {name:?} (supported: {})",
                    known.join(", ")
                ));
            };
            if !chosen.contains(&suite) {
                chosen.push(suite);
            }
        }
        provider.cipher_suites = chosen;
    }
    Ok(Arc::new(provider))
}

/// The protocol versions between `min` and `max` (etcd's `TLS1.2`, `TLS1.3`).
fn versions(
    min: &Option<String>,
    max: &Option<String>,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, String> {
    let rank = |v: &Option<String>, default: u8| -> Result<u8, String> {
        match v.as_deref().map(str::trim) {
            None | Some("") => Ok(default),
            Some("TLS1.2") => Ok(2),
            Some("TLS1.3") => Ok(3),
            Some(other @ ("TLS1.0" | "TLS1.1")) => Err(format!(
                "TLS version {other} is not supported (quorumkv speaks TLS1.2 and TLS1.3)"
            )),
            Some(other) => Err(format!(
                "unknown TLS version {other:?} (expected TLS1.2 or TLS1.3)"
            )),
        }
    };
    let (low, high) = (rank(min, 2)?, rank(max, 3)?);
    if low > high {
        return Err("--tls-min-version is above --tls-max-version".into());
    }
    let mut out = Vec::new();
    if low <= 2 {
        out.push(&rustls::version::TLS12);
    }
    if high >= 3 {
        out.push(&rustls::version::TLS13);
    }
    Ok(out)
}

/// Does `url` name a TLS endpoint (`https://`)?
pub fn is_https(url: &str) -> bool {
    url.trim()
        .get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
}

/// The common name of a DER certificate's subject.
pub fn common_name(cert: &[u8]) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// A few warnings per interval, then a count of those left out: remote input cannot flood the
/// log.
pub struct RateLimitedLog {
    window: Mutex<(Instant, u64)>,
    suppressed: AtomicU64,
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        RateLimitedLog {
            window: Mutex::new((Instant::now(), 0)),
            suppressed: AtomicU64::new(0),
        }
    }
}

impl RateLimitedLog {
    const PER_WINDOW: u64 = 10;
    const WINDOW: Duration = Duration::from_secs(10);

    /// Whether to log this one; `Some(n)`: log it, and say that `n` were left out before.
    pub fn allow(&self) -> Option<u64> {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if window.0.elapsed() >= Self::WINDOW {
            *window = (Instant::now(), 0);
        }
        if window.1 >= Self::PER_WINDOW {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        window.1 += 1;
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// A configuration built from files, built again when they change.
struct Reloading<C> {
    current: RwLock<(Arc<C>, Stamp)>,
    checked: Mutex<Instant>,
}

impl<C> Reloading<C> {
    fn new(
        options: &TlsOptions,
        build: impl FnOnce() -> Result<Arc<C>, String>,
    ) -> Result<Self, String> {
        let stamped = stamp(&[
            &options.cert_file,
            &options.key_file,
            &options.trusted_ca_file,
        ]);
        Ok(Reloading {
            current: RwLock::new((build()?, stamped)),
            checked: Mutex::new(Instant::now()),
        })
    }

    /// The configuration: built again by `build` first if one of `options`' files changed
    /// (looked at, at most once per `RELOAD_CHECK`). `what` names it in the log.
    fn get(
        &self,
        options: &TlsOptions,
        what: &str,
        build: impl FnOnce() -> Result<Arc<C>, String>,
    ) -> Arc<C> {
        let due = {
            let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
            let due = checked.elapsed() >= RELOAD_CHECK;
            if due {
                *checked = Instant::now();
            }
            due
        };
        if due {
            let now = stamp(&[
                &options.cert_file,
                &options.key_file,
                &options.trusted_ca_file,
            ]);
            if self.current.read().unwrap_or_else(|p| p.into_inner()).1 != now {
                match build() {
                    Ok(config) => {
                        tracing::info!(port = what, "TLS certificate files changed: reloaded");
                        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (config, now);
                    }
                    Err(e) => {
                        tracing::error!(port = what, error = %e, "TLS certificate files changed but do not load; keeping the previous ones");
                        self.current.write().unwrap_or_else(|p| p.into_inner()).1 = now;
                    }
                }
            }
        }
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }
}

/// The accepting side of one port, re-read when its files change.
pub struct ServerTls {
    options: TlsOptions,
    alpn: Vec<Vec<u8>>,
    config: Reloading<ServerConfig>,
    rejections: RateLimitedLog,
    what: &'static str,
}

impl ServerTls {
    /// `what`: "client" or "peer", for the log. `alpn`: the protocols offered (HTTP/2 and 1.1 on
    /// the client port).
    pub fn new(
        options: TlsOptions,
        alpn: &[&[u8]],
        what: &'static str,
    ) -> Result<Arc<ServerTls>, String> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let config = Reloading::new(&options, || build_server(&options, &alpn))?;
        Ok(Arc::new(ServerTls {
            options,
            alpn,
            config,
            rejections: RateLimitedLog::default(),
            what,
        }))
    }

    pub fn options(&self) -> &TlsOptions {
        &self.options
    }

    /// The configuration for the next handshake: rebuilt first if a file changed.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.get(&self.options, self.what, || {
            build_server(&self.options, &self.alpn)
        })
    }

    /// The TLS handshake on an accepted connection, and the common name of the certificate
    /// the other side showed (if any). A refusal is logged (rate-limited) with its reason.
    pub async fn accept(
        &self,
        stream: TcpStream,
    ) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, Option<String>)> {
        let from = stream.peer_addr().ok();
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config());
        let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
        let refused = |reason: String| {
            if let Some(left_out) = self.rejections.allow() {
                tracing::warn!(
                    port = self.what,
                    remote = ?from,
                    reason,
                    earlier_refusals_not_logged = left_out,
                    "rejected a TLS connection"
                );
            }
        };
        let stream = match result {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                refused(e.to_string());
                return None;
            }
            Err(_) => {
                refused("handshake timed out".into());
                return None;
            }
        };
        let cn = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| common_name(cert));
        if let Some(allowed) = &self.options.allowed_cn {
            if cn.as_deref() != Some(allowed.as_str()) {
                refused(format!(
                    "certificate common name {cn:?} is not the allowed {allowed:?}"
                ));
                return None;
            }
        }
        Some((stream, cn))
    }
}

fn build_server(options: &TlsOptions, alpn: &[Vec<u8>]) -> Result<Arc<ServerConfig>, String> {
    let cert_file = options
        .cert_file
        .as_ref()
        .ok_or("a certificate (--cert-file) is needed")?;
    let key_file = options
        .key_file
        .as_ref()
        .ok_or("a key (--key-file) is needed with --cert-file")?;
    let provider = provider(&options.cipher_suites)?;
    let versions = versions(&options.min_version, &options.max_version)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| format!("TLS settings: {e}"))?;
    let builder = match &options.trusted_ca_file {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(read_roots(ca)?, provider);
            let verifier = if options.client_cert_auth {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| format!("client certificate verifier: {e}"))?,
            )
        }
        None if options.client_cert_auth => {
            return Err("client certificate authentication needs a trusted CA file".into())
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(read_certs(cert_file)?, read_key(key_file)?)
        .map_err(|e| format!("certificate {}: {e}", cert_file.display()))?;
    config.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(config))
}

/// A gRPC channel to `endpoint` over TLS made with `tls` (each connection's handshake checks
/// the certificate against the endpoint's host).
pub async fn connect_channel(
    endpoint: tonic::transport::Endpoint,
    tls: Arc<ClientTls>,
) -> Result<tonic::transport::Channel, String> {
    let connector = tower::service_fn(move |uri: tonic::codegen::http::Uri| {
        let tls = tls.clone();
        async move {
            let host = uri.host().unwrap_or("localhost").to_string();
            let port = uri.port_u16().unwrap_or(443);
            let stream = tls.connect(&format!("{host}:{port}")).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| e.to_string())
}

/// The dialing side (to peers, or to the leader's client port), re-read when its files change.
pub struct ClientTls {
    options: TlsOptions,
    /// Trust any certificate (auto TLS: self-signed, as etcd's `InsecureSkipVerify`).
    insecure: bool,
    alpn: Vec<Vec<u8>>,
    config: Reloading<ClientConfig>,
}

impl ClientTls {
    pub fn new(options: TlsOptions, alpn: &[&[u8]]) -> Result<Arc<ClientTls>, String> {
        let insecure = options.auto_tls && options.trusted_ca_file.is_none();
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let config = Reloading::new(&options, || build_client(&options, insecure, &alpn))?;
        Ok(Arc::new(ClientTls {
            options,
            insecure,
            alpn,
            config,
        }))
    }

    fn config(&self) -> Arc<ClientConfig> {
        self.config.get(&self.options, "dialing", || {
            build_client(&self.options, self.insecure, &self.alpn)
        })
    }

    /// Connects to `address` (`host:port`) and makes the TLS handshake, checking the
    /// certificate against `host` (unless insecure).
    pub async fn connect(
        &self,
        address: &str,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let host = address
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .unwrap_or(address);
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let stream = TcpStream::connect(address).await?;
        let _ = stream.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(self.config());
        tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, stream))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })?
    }
}

fn build_client(
    options: &TlsOptions,
    insecure: bool,
    alpn: &[Vec<u8>],
) -> Result<Arc<ClientConfig>, String> {
    let provider = provider(&options.cipher_suites)?;
    let versions = versions(&options.min_version, &options.max_version)?;
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| format!("TLS settings: {e}"))?;
    let builder = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
    } else {
        let roots = match &options.trusted_ca_file {
            Some(ca) => read_roots(ca)?,
            None => return Err("a trusted CA file is needed to check the other side".into()),
        };
        builder.with_root_certificates(roots)
    };
    let mut config = match (&options.cert_file, &options.key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .map_err(|e| format!("certificate {}: {e}", cert.display()))?,
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(config))
}

/// Trusts any certificate: for auto TLS, whose certificates are self-signed.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_suites_take_etcds_names() {
        assert_eq!(versions(&None, &None).expect("both").len(), 2);
        let only13 = versions(&Some("TLS1.3".into()), &None).expect("1.3");
        assert_eq!(only13.len(), 1);
        assert!(versions(&Some("TLS1.0".into()), &None)
            .expect_err("no 1.0")
            .contains("not supported"));
        assert!(versions(&Some("TLS1.3".into()), &Some("TLS1.2".into())).is_err());
        let all = provider(&[]).expect("all").cipher_suites.len();
        let chosen = provider(&["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".into()]).expect("suite");
        // The one TLS 1.2 suite named, and TLS 1.3's three.
        assert_eq!(chosen.cipher_suites.len(), 4, "of {all}");
        assert!(provider(&["TLS_AES_128_GCM_SHA256".into()]).is_ok());
        assert!(provider(&["TLS_RSA_WITH_RC4_128_SHA".into()])
            .expect_err("no RC4")
            .contains("unsupported cipher suite"));
    }

    #[test]
    fn https_urls_are_told_by_their_scheme() {
        assert!(is_https("https://127.0.0.1:2380"));
        assert!(is_https(" HTTPS://a:1"));
        assert!(!is_https("http://127.0.0.1:2380"));
        assert!(!is_https("https"));
    }

    #[test]
    fn the_common_name_is_read_from_a_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(common_name(cert.der()).as_deref(), Some("alice"));
    }

    #[test]
    fn the_rate_limited_log_lets_a_few_through_then_counts() {
        let log = RateLimitedLog::default();
        let allowed = (0..100).filter(|_| log.allow().is_some()).count();
        assert_eq!(allowed as u64, RateLimitedLog::PER_WINDOW);
    }
}
