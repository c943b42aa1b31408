//! JWT-shaped tokens: decoding for the mocks and for tests, the placeholder-signed access tokens
//! the mocks mint, client assertions signed the way azure_identity signs them, and unsigned
//! service-account tokens shaped like the fake API server's.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use serde_json::{Map, Value, json};

use super::tls::ClientCertificate;
use super::util::{guid, unix};

/// The signature part of every access token the mocks mint: they are not signed, and no podid
/// component verifies them (Entra's own tokens are opaque to their clients too).
pub const PLACEHOLDER_SIGNATURE: &[u8] = b"podid mock: not signed";

/// The audience of federated assertions (Entra's federated identity credentials default).
pub const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("a JWT has three dot-separated parts, this one has {0}")]
    Parts(usize),
    #[error("the {0} is not base64url")]
    Base64(&'static str),
    #[error("the {0} is not a JSON object")]
    Json(&'static str),
}

/// RSA signature algorithms Entra accepts on client assertions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlg {
    /// RSASSA-PKCS1-v1_5 with SHA-256 (what azure_identity 1.0 sends).
    Rs256,
    /// RSASSA-PSS with SHA-256 (what Entra's documentation recommends).
    Ps256,
}

impl JwtAlg {
    pub fn name(self) -> &'static str {
        match self {
            JwtAlg::Rs256 => "RS256",
            JwtAlg::Ps256 => "PS256",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "RS256" => Some(JwtAlg::Rs256),
            "PS256" => Some(JwtAlg::Ps256),
            _ => None,
        }
    }
}

/// base64url without padding, as JWT segments are written.
pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64 of either alphabet, padded or not (clients differ).
pub fn b64_any(s: &str) -> Option<Vec<u8>> {
    [URL_SAFE_NO_PAD, URL_SAFE, STANDARD, STANDARD_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(s).ok())
}

/// A token split into its parts; the signature is not checked here.
#[derive(Debug, Clone)]
pub struct Jwt {
    pub header: Map<String, Value>,
    pub claims: Map<String, Value>,
    /// `header.payload` as sent: what the signature covers.
    pub signing_input: String,
    pub signature: Vec<u8>,
}

fn json_object(bytes: &[u8], part: &'static str) -> Result<Map<String, Value>, JwtError> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(JwtError::Json(part)),
    }
}

impl Jwt {
    pub fn parse(token: &str) -> Result<Self, JwtError> {
        let parts: Vec<&str> = token.split('.').collect();
        let [header, claims, signature] = parts.as_slice() else {
            return Err(JwtError::Parts(parts.len()));
        };
        let decode = |s: &str, part| b64_any(s).ok_or(JwtError::Base64(part));
        Ok(Self {
            header: json_object(&decode(header, "header")?, "header")?,
            claims: json_object(&decode(claims, "payload")?, "payload")?,
            signing_input: format!("{header}.{claims}"),
            signature: decode(signature, "signature")?,
        })
    }

    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header.get(name).and_then(Value::as_str)
    }

    pub fn claim_str(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    /// A NumericDate claim; integral floats count, as JSON libraries write them either way.
    pub fn claim_time(&self, name: &str) -> Option<i64> {
        let v = self.claims.get(name)?;
        v.as_i64().or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && f.is_finite())
                .map(|f| f as i64)
        })
    }

    /// `aud` as a list: a string or an array of strings (RFC 7519 §4.1.3).
    pub fn audiences(&self) -> Vec<&str> {
        match self.claims.get("aud") {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }
}

/// The claims of a JWT-shaped token, without any check (tests read issued tokens with it).
pub fn decode_claims(token: &str) -> Option<Value> {
    Jwt::parse(token).ok().map(|t| Value::Object(t.claims))
}

pub fn decode_header(token: &str) -> Option<Value> {
    Jwt::parse(token).ok().map(|t| Value::Object(t.header))
}

/// `header.payload.placeholder`: a JWT-shaped token carrying the placeholder signature.
pub(crate) fn placeholder_signed(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes()),
        b64url(PLACEHOLDER_SIGNATURE)
    )
}

/// How a client assertion names its certificate in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thumbprint {
    /// `x5t`: SHA-1, standard base64 with padding (azure_identity 1.0's spelling).
    X5t,
    /// `x5t`: SHA-1, base64url without padding (RFC 7515's spelling).
    X5tUrl,
    /// `x5t#S256`: SHA-256, base64url without padding.
    X5tS256,
    /// No thumbprint at all.
    None,
}

/// A certificate client assertion: by default exactly what azure_identity's
/// `ClientCertificateCredential` sends (RS256, standard-base64 `x5t`, claims
/// `aud, exp, iss, jti, nbf, sub`, five minutes valid). Builder methods vary one thing each.
#[derive(Debug, Clone)]
pub struct ClientAssertion<'a> {
    certificate: &'a ClientCertificate,
    client_id: String,
    audience: String,
    alg: JwtAlg,
    thumbprint: Thumbprint,
    not_before: SystemTime,
    lifetime: Duration,
    issuer: Option<String>,
    subject: Option<String>,
}

impl<'a> ClientAssertion<'a> {
    /// `audience` is the token endpoint URL the client posts to.
    pub fn new(certificate: &'a ClientCertificate, client_id: &str, audience: &str) -> Self {
        Self {
            certificate,
            client_id: client_id.to_string(),
            audience: audience.to_string(),
            alg: JwtAlg::Rs256,
            thumbprint: Thumbprint::X5t,
            not_before: SystemTime::now(),
            lifetime: Duration::from_secs(300),
            issuer: None,
            subject: None,
        }
    }

    pub fn alg(mut self, alg: JwtAlg) -> Self {
        self.alg = alg;
        self
    }

    pub fn thumbprint(mut self, thumbprint: Thumbprint) -> Self {
        self.thumbprint = thumbprint;
        self
    }

    /// `nbf`; `exp` is `nbf + lifetime`.
    pub fn not_before(mut self, at: SystemTime) -> Self {
        self.not_before = at;
        self
    }

    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// `iss` other than the client id.
    pub fn issuer(mut self, issuer: &str) -> Self {
        self.issuer = Some(issuer.to_string());
        self
    }

    /// `sub` other than the client id.
    pub fn subject(mut self, subject: &str) -> Self {
        self.subject = Some(subject.to_string());
        self
    }

    /// Signs with the certificate's own key.
    pub fn sign(&self) -> String {
        self.sign_with(self.certificate)
    }

    /// Names this certificate in the header but signs with `signer`'s key (a forgery).
    pub fn sign_with(&self, signer: &ClientCertificate) -> String {
        let mut header = Map::new();
        header.insert("alg".into(), json!(self.alg.name()));
        header.insert("typ".into(), json!("JWT"));
        match self.thumbprint {
            Thumbprint::X5t => {
                header.insert(
                    "x5t".into(),
                    json!(STANDARD.encode(self.certificate.sha1_thumbprint())),
                );
            }
            Thumbprint::X5tUrl => {
                header.insert(
                    "x5t".into(),
                    json!(b64url(&self.certificate.sha1_thumbprint())),
                );
            }
            Thumbprint::X5tS256 => {
                header.insert(
                    "x5t#S256".into(),
                    json!(b64url(&self.certificate.sha256_thumbprint())),
                );
            }
            Thumbprint::None => {}
        }
        let nbf = unix(self.not_before);
        let exp = unix(self.not_before + self.lifetime);
        let claims = json!({
            "aud": self.audience,
            "exp": exp,
            "iss": self.issuer.as_deref().unwrap_or(&self.client_id),
            "jti": guid(),
            "nbf": nbf,
            "sub": self.subject.as_deref().unwrap_or(&self.client_id),
        });
        let signing_input = format!(
            "{}.{}",
            b64url(Value::Object(header).to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let signature = signer.sign(self.alg, signing_input.as_bytes());
        format!("{signing_input}.{}", b64url(&signature))
    }
}

/// An unsigned projected service-account token with the fake API server's claim layout
/// (`aud` an array, `kubernetes.io` with namespace and service account), for federated tests
/// that need lifetimes the API server would refuse.
pub fn service_account_token(
    issuer: &str,
    namespace: &str,
    service_account: &str,
    audiences: &[&str],
    issued_at: SystemTime,
    lifetime: Duration,
) -> String {
    let iat = unix(issued_at);
    let claims = json!({
        "aud": audiences,
        "exp": unix(issued_at + lifetime),
        "iat": iat,
        "iss": issuer,
        "jti": guid(),
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": service_account, "uid": guid()},
        },
        "nbf": iat,
        "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
    });
    let header = json!({"alg": "RS256", "kid": "podid-mock", "typ": "JWT"});
    format!(
        "{}.{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes()),
        b64url(b"unsigned")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_every_part_and_rejects_bad_shapes() {
        let token = placeholder_signed(&json!({"alg": "RS256"}), &json!({"aud": ["a", "b"]}));
        let jwt = Jwt::parse(&token).unwrap();
        assert_eq!(jwt.header_str("alg"), Some("RS256"));
        assert_eq!(jwt.audiences(), vec!["a", "b"]);
        assert_eq!(jwt.signature, PLACEHOLDER_SIGNATURE);
        assert_eq!(Jwt::parse("a.b").unwrap_err(), JwtError::Parts(2));
        assert_eq!(
            Jwt::parse("!.e30.e30").unwrap_err(),
            JwtError::Base64("header")
        );
        assert_eq!(
            Jwt::parse("WzFd.e30.e30").unwrap_err(),
            JwtError::Json("header")
        );
    }

    #[test]
    fn base64_of_either_alphabet_decodes() {
        assert_eq!(b64_any("-_8").unwrap(), vec![0xfb, 0xff]);
        assert_eq!(b64_any("+/8=").unwrap(), vec![0xfb, 0xff]);
    }

    #[test]
    fn service_account_tokens_look_like_the_api_servers() {
        let t = service_account_token(
            "https://issuer",
            "ns",
            "sa",
            &[TOKEN_EXCHANGE_AUDIENCE],
            SystemTime::now(),
            Duration::from_secs(600),
        );
        let claims = decode_claims(&t).unwrap();
        assert_eq!(claims["sub"], "system:serviceaccount:ns:sa");
        assert_eq!(claims["aud"][0], TOKEN_EXCHANGE_AUDIENCE);
        assert_eq!(
            claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
            600
        );
    }
}
