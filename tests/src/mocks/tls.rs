//! Certificates for the mocks and their clients: a test CA with HTTPS server certificates signed
//! by it (ECDSA P-256, rcgen on ring), and RSA client certificates as Entra app credentials (a
//! self-signed X.509, its PKCS#8 key, and the PKCS#12 bundle azure_identity reads).

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use ring::digest::{SHA1_FOR_LEGACY_USE_ONLY, SHA256, digest};
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RSA_PSS_SHA256, RsaKeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

use super::jwt::JwtAlg;
use super::util::unix;

/// Bits of the RSA client keys: the smallest Entra accepts.
const RSA_BITS: u32 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating the key or certificate of {subject}: {source}")]
    Generate {
        subject: String,
        source: rcgen::Error,
    },
    #[error("OpenSSL failed while {what}: {source}")]
    OpenSsl {
        what: &'static str,
        source: openssl::error::ErrorStack,
    },
    #[error("building the TLS server configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not an X.509 certificate in PEM or DER: {0}")]
    Certificate(String),
}

fn openssl_error(what: &'static str) -> impl FnOnce(openssl::error::ErrorStack) -> TlsError {
    move |source| TlsError::OpenSsl { what, source }
}

/// `-----BEGIN <label>-----`, 64 base64 characters a line.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The DER of a certificate given as PEM (first `CERTIFICATE` block) or DER.
pub fn certificate_der(bytes: &[u8]) -> Result<Vec<u8>, TlsError> {
    let der = if bytes.starts_with(b"-----") || bytes.iter().take(64).all(u8::is_ascii) {
        let (_, pem) = x509_parser::pem::parse_x509_pem(bytes)
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        pem.contents
    } else {
        bytes.to_vec()
    };
    x509_parser::parse_x509_certificate(&der).map_err(|e| TlsError::Certificate(e.to_string()))?;
    Ok(der)
}

/// SHA-1 of a certificate's DER: what `x5t` carries.
pub fn sha1_thumbprint(cert_der: &[u8]) -> Vec<u8> {
    digest(&SHA1_FOR_LEGACY_USE_ONLY, cert_der)
        .as_ref()
        .to_vec()
}

/// SHA-256 of a certificate's DER: what `x5t#S256` carries.
pub fn sha256_thumbprint(cert_der: &[u8]) -> Vec<u8> {
    digest(&SHA256, cert_der).as_ref().to_vec()
}

fn generate_error(subject: &str) -> impl FnOnce(rcgen::Error) -> TlsError + '_ {
    move |source| TlsError::Generate {
        subject: subject.to_string(),
        source,
    }
}

fn validity(params: &mut CertificateParams, not_before: SystemTime, not_after: SystemTime) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(unix(not_before).max(0).unsigned_abs());
    params.not_after = epoch + Duration::from_secs(unix(not_after).max(0).unsigned_abs());
}

fn common_name(subject: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, subject);
    dn
}

/// A certificate authority that exists only for one test run. Clients trust its PEM.
pub struct TestCa {
    subject: String,
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
}

impl fmt::Debug for TestCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCa")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl TestCa {
    /// A new CA `podid test CA`, valid from a day ago for ten years.
    pub fn generate() -> Result<Self, TlsError> {
        Self::generate_named("podid test CA")
    }

    pub fn generate_named(subject: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate().map_err(generate_error(subject))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(subject);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        validity(
            &mut params,
            now - Duration::from_secs(86_400),
            now + Duration::from_secs(10 * 365 * 86_400),
        );
        let cert = params.self_signed(&key).map_err(generate_error(subject))?;
        Ok(Self {
            subject: subject.to_string(),
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// Writes the CA certificate as PEM (what `--ca-file` and `tls_certs_only` take).
    pub fn write_pem(&self, path: &Path) -> Result<(), TlsError> {
        std::fs::write(path, &self.pem).map_err(|source| TlsError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// A rustls client configuration (ring provider) that trusts this CA only: what a reqwest
    /// client built with `tls_backend_preconfigured` or a hyper-rustls connector takes.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth())
    }

    /// A server certificate for these DNS names and IP addresses, signed by this CA.
    pub fn server_certificate(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
    ) -> Result<ServerCertificate, TlsError> {
        let subject = dns_names.first().map_or("localhost", String::as_str);
        let key = KeyPair::generate().map_err(generate_error(subject))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(subject);
        params.subject_alt_names = dns_names
            .iter()
            .map(|n| {
                n.clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(generate_error(subject))
            })
            .collect::<Result<_, _>>()?;
        params
            .subject_alt_names
            .extend(ips.iter().copied().map(SanType::IpAddress));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        validity(
            &mut params,
            now - Duration::from_secs(3600),
            now + Duration::from_secs(365 * 86_400),
        );
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate_error(subject))?;
        Ok(ServerCertificate {
            cert_der: cert.der().clone(),
            key_der: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }
}

/// A leaf certificate and key for an HTTPS server.
pub struct ServerCertificate {
    cert_der: CertificateDer<'static>,
    key_der: PrivatePkcs8KeyDer<'static>,
}

impl fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCertificate").finish_non_exhaustive()
    }
}

impl ServerCertificate {
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.cert_der)
    }

    /// A TLS acceptor on the ring provider offering HTTP/1.1 only (the mocks speak no h2).
    pub(crate) fn acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert_der.clone()],
                PrivateKeyDer::Pkcs8(self.key_der.clone_key()),
            )?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// An RSA certificate an app registration can hold as a credential, with its private key.
/// Self-signed, as `New-SelfSignedCertificate` or `openssl req -x509` make them for Entra.
pub struct ClientCertificate {
    subject: String,
    cert_der: Vec<u8>,
    key_pkcs8: Vec<u8>,
}

impl fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("subject", &self.subject)
            .field(
                "sha1",
                &hex_upper(&sha1_thumbprint(&self.cert_der)).to_string(),
            )
            .finish_non_exhaustive()
    }
}

/// Upper-case hex, as Entra prints thumbprints.
pub fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

impl ClientCertificate {
    /// A 2048-bit RSA certificate `CN=<subject>`, valid from an hour ago for a year.
    pub fn generate(subject: &str) -> Result<Self, TlsError> {
        let now = SystemTime::now();
        Self::generate_valid(
            subject,
            now - Duration::from_secs(3600),
            now + Duration::from_secs(365 * 86_400),
        )
    }

    /// The same with an explicit validity (a past `not_after` makes an expired credential).
    pub fn generate_valid(
        subject: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Self, TlsError> {
        // ring cannot generate RSA keys; OpenSSL is linked anyway for azure_identity's PKCS#12
        let rsa = openssl::rsa::Rsa::generate(RSA_BITS).map_err(openssl_error("generating RSA"))?;
        let pkey = openssl::pkey::PKey::from_rsa(rsa).map_err(openssl_error("wrapping RSA"))?;
        let key_pkcs8 = pkey
            .private_key_to_pkcs8()
            .map_err(openssl_error("encoding PKCS#8"))?;
        let key = KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(key_pkcs8.as_slice()),
            &rcgen::PKCS_RSA_SHA256,
        )
        .map_err(generate_error(subject))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(subject);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params, not_before, not_after);
        let cert = params.self_signed(&key).map_err(generate_error(subject))?;
        Ok(Self {
            subject: subject.to_string(),
            cert_der: cert.der().to_vec(),
            key_pkcs8,
        })
    }

    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// What to register with the mock (`App::certificate`).
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.cert_der)
    }

    pub fn key_pkcs8_der(&self) -> &[u8] {
        &self.key_pkcs8
    }

    pub fn key_pem(&self) -> String {
        pem_encode("PRIVATE KEY", &self.key_pkcs8)
    }

    /// The key and certificate as PKCS#12 DER, what `ClientCertificateCredential::new` and an
    /// aad-pod-identity type-2 Secret hold (`""` for no password).
    pub fn pkcs12(&self, password: &str) -> Result<Vec<u8>, TlsError> {
        let pkey = openssl::pkey::PKey::private_key_from_pkcs8(&self.key_pkcs8)
            .map_err(openssl_error("reading PKCS#8"))?;
        let cert = openssl::x509::X509::from_der(&self.cert_der)
            .map_err(openssl_error("reading X.509"))?;
        openssl::pkcs12::Pkcs12::builder()
            .name(&self.subject)
            .pkey(&pkey)
            .cert(&cert)
            .build2(password)
            .and_then(|p12| p12.to_der())
            .map_err(openssl_error("building PKCS#12"))
    }

    pub fn sha1_thumbprint(&self) -> Vec<u8> {
        sha1_thumbprint(&self.cert_der)
    }

    pub fn sha256_thumbprint(&self) -> Vec<u8> {
        sha256_thumbprint(&self.cert_der)
    }

    /// Signs `message` (a JWT's `header.payload`) with this certificate's key.
    pub fn sign(&self, alg: JwtAlg, message: &[u8]) -> Vec<u8> {
        let key = RsaKeyPair::from_pkcs8(&self.key_pkcs8).expect("the key was generated as RSA");
        let mut signature = vec![0; key.public().modulus_len()];
        let padding: &'static dyn ring::signature::RsaEncoding = match alg {
            JwtAlg::Rs256 => &RSA_PKCS1_SHA256,
            JwtAlg::Ps256 => &RSA_PSS_SHA256,
        };
        key.sign(padding, &SystemRandom::new(), message, &mut signature)
            .expect("RSA signing with a valid key succeeds");
        signature
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips_through_certificate_der() {
        let ca = TestCa::generate().unwrap();
        assert!(ca.pem().starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert_eq!(certificate_der(ca.pem().as_bytes()).unwrap(), ca.der());
        assert_eq!(certificate_der(ca.der()).unwrap(), ca.der());
        assert!(certificate_der(b"nonsense").is_err());
    }

    #[test]
    fn thumbprints_have_their_digest_sizes() {
        let ca = TestCa::generate().unwrap();
        assert_eq!(sha1_thumbprint(ca.der()).len(), 20);
        assert_eq!(sha256_thumbprint(ca.der()).len(), 32);
        assert_eq!(hex_upper(&[0xab, 0x01]), "AB01");
    }
}
