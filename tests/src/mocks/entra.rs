//! Mock Entra ID: the v2 token endpoint `POST /{tenant}/oauth2/v2.0/token` over HTTPS, for the
//! client-credentials grant with a client secret, a certificate assertion or a federated
//! assertion, validated as Entra validates them and answered in Entra's exact JSON shapes.
//!
//! Federated assertions are checked by their claims only (issuer, subject, audience, lifetime):
//! the podid fake API server issues unsigned service-account tokens, and no OIDC discovery
//! document exists here to fetch signing keys from. Certificate assertions are verified for real
//! (RS256 and PS256) against the app's registered certificates.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, HOST};
use hyper::{Method, Request, Response, StatusCode};
use ring::digest::{SHA256, digest};
use ring::signature::{RSA_PKCS1_2048_8192_SHA256, RSA_PSS_2048_8192_SHA256, UnparsedPublicKey};
use serde_json::{Value, json};

use super::fault::{Fault, FaultQueue, FaultTarget};
use super::jwt::{self, Jwt, JwtAlg, TOKEN_EXCHANGE_AUDIENCE};
use super::resources::{KnownResources, resource_of_scope};
use super::server::{self, Handler, Reply, Running, StartError};
use super::tls::{self, TestCa, TlsError, hex_upper};
use super::util::{
    aad_instant, aad_timestamp, guid, is_guid, json_bytes, now_unix, response, unix,
};

pub const DEFAULT_HOST: &str = "login.mock.test";
/// Entra's usual `expires_in` for app tokens.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3599);
/// Tolerance on assertion `nbf`/`exp`, as Entra allows for clock skew.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(300);
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const MAX_BODY: usize = 1 << 20;
const JSON: &str = "application/json; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum EntraError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("app {client_id}: the certificate is unusable: {reason}")]
    Certificate { client_id: String, reason: String },
    #[error("no app registration has client id {0}")]
    UnknownApp(String),
}

impl From<TlsError> for EntraError {
    fn from(e: TlsError) -> Self {
        EntraError::Start(StartError::Tls(e))
    }
}

/// A federated identity credential of an app: which external tokens it trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederatedCredential {
    pub issuer: String,
    pub subject: String,
    pub audiences: Vec<String>,
}

impl FederatedCredential {
    /// Trusts `issuer`/`subject` with the default audience `api://AzureADTokenExchange`.
    pub fn new(issuer: &str, subject: &str) -> Self {
        Self {
            issuer: issuer.to_string(),
            subject: subject.to_string(),
            audiences: vec![TOKEN_EXCHANGE_AUDIENCE.to_string()],
        }
    }

    /// A Kubernetes service account of a cluster whose tokens carry `issuer`.
    pub fn service_account(issuer: &str, namespace: &str, name: &str) -> Self {
        Self::new(issuer, &format!("system:serviceaccount:{namespace}:{name}"))
    }

    pub fn audience(mut self, audience: &str) -> Self {
        self.audiences = vec![audience.to_string()];
        self
    }
}

/// A tenant, by id, with optional domain names that also select it in the URL.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub domains: Vec<String>,
}

impl Tenant {
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_string(),
            domains: Vec::new(),
        }
    }

    pub fn domain(mut self, domain: &str) -> Self {
        self.domains.push(domain.to_string());
        self
    }
}

/// An app registration with its service principal, as a test describes it.
#[derive(Clone)]
pub struct App {
    tenant: String,
    client_id: String,
    object_id: String,
    secrets: Vec<(String, Option<SystemTime>)>,
    certificates: Vec<Vec<u8>>,
    federated: Vec<FederatedCredential>,
    token_lifetime: Option<Duration>,
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App")
            .field("tenant", &self.tenant)
            .field("client_id", &self.client_id)
            .field("object_id", &self.object_id)
            .field("secrets", &self.secrets.len())
            .field("certificates", &self.certificates.len())
            .field("federated", &self.federated)
            .finish()
    }
}

impl App {
    /// An app in `tenant` whose service principal gets a random object id.
    pub fn new(tenant: &str, client_id: &str) -> Self {
        Self {
            tenant: tenant.to_string(),
            client_id: client_id.to_string(),
            object_id: guid(),
            secrets: Vec::new(),
            certificates: Vec::new(),
            federated: Vec::new(),
            token_lifetime: None,
        }
    }

    pub fn object_id(mut self, object_id: &str) -> Self {
        self.object_id = object_id.to_string();
        self
    }

    pub fn secret(mut self, value: &str) -> Self {
        self.secrets.push((value.to_string(), None));
        self
    }

    pub fn secret_expiring(mut self, value: &str, expires_at: SystemTime) -> Self {
        self.secrets.push((value.to_string(), Some(expires_at)));
        self
    }

    /// A certificate credential, DER (the certificate's own validity is the key's validity).
    pub fn certificate(mut self, der: &[u8]) -> Self {
        self.certificates.push(der.to_vec());
        self
    }

    pub fn federated(mut self, credential: FederatedCredential) -> Self {
        self.federated.push(credential);
        self
    }

    /// `expires_in` of this app's tokens, instead of the server's.
    pub fn token_lifetime(mut self, lifetime: Duration) -> Self {
        self.token_lifetime = Some(lifetime);
        self
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    pub fn oid(&self) -> &str {
        &self.object_id
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }
}

/// Which credential a token request presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    Secret,
    /// An assertion whose issuer is the client itself.
    Certificate,
    /// An assertion from another issuer.
    Federated,
    Missing,
}

/// How the mock answered one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntraOutcome {
    Issued {
        expires_in: u64,
    },
    Rejected {
        status: u16,
        error: String,
        code: Option<u32>,
    },
    /// A forced status or raw answer from the fault queue.
    Injected {
        status: u16,
    },
    /// The connection was reset by the fault queue.
    Reset,
}

/// One request as the log keeps it: never a secret, an assertion or a token.
#[derive(Debug, Clone)]
pub struct EntraRequest {
    pub at: SystemTime,
    pub method: String,
    pub path: String,
    /// The tenant segment of the token URL, as sent.
    pub tenant: Option<String>,
    pub client_id: Option<String>,
    pub credential: CredentialKind,
    pub scope: Option<String>,
    /// Set when an injected delay preceded the answer.
    pub delayed: Option<Duration>,
    pub outcome: EntraOutcome,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntraStats {
    /// Every HTTP request, any route.
    pub requests: u64,
    pub issued: u64,
    /// Answered with an error by validation (or 404/405 routing).
    pub rejected: u64,
    /// Answered from the fault queue (statuses, raw answers and resets).
    pub injected: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    issued: AtomicU64,
    rejected: AtomicU64,
    injected: AtomicU64,
}

struct StoredSecret {
    sha256: Vec<u8>,
    expires_at: Option<i64>,
}

struct StoredCertificate {
    sha1: Vec<u8>,
    sha256: Vec<u8>,
    /// PKCS#1 RSAPublicKey, what ring verifies with.
    public_key: Vec<u8>,
    not_before: i64,
    not_after: i64,
}

impl StoredCertificate {
    fn parse(client_id: &str, der: &[u8]) -> Result<Self, EntraError> {
        let bad = |reason: String| EntraError::Certificate {
            client_id: client_id.to_string(),
            reason,
        };
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad(e.to_string()))?;
        let spki = cert.public_key();
        if spki.algorithm.algorithm != x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION {
            return Err(bad("Entra certificate credentials are RSA keys".into()));
        }
        Ok(Self {
            sha1: tls::sha1_thumbprint(der),
            sha256: tls::sha256_thumbprint(der),
            public_key: spki.subject_public_key.data.to_vec(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    fn key_window(&self) -> String {
        format!(
            "Found key 'Start={}, End={}'",
            aad_instant(self.not_before),
            aad_instant(self.not_after)
        )
    }
}

fn secret_digest(value: &str) -> Vec<u8> {
    digest(&SHA256, value.as_bytes()).as_ref().to_vec()
}

struct AppRecord {
    tenant: String,
    client_id: String,
    object_id: String,
    secrets: Vec<StoredSecret>,
    certificates: Vec<StoredCertificate>,
    federated: Vec<FederatedCredential>,
    token_lifetime: Option<Duration>,
}

impl AppRecord {
    fn from_app(app: &App) -> Result<Self, EntraError> {
        Ok(Self {
            tenant: app.tenant.clone(),
            client_id: app.client_id.clone(),
            object_id: app.object_id.clone(),
            secrets: app
                .secrets
                .iter()
                .map(|(value, expires)| StoredSecret {
                    sha256: secret_digest(value),
                    expires_at: expires.map(unix),
                })
                .collect(),
            certificates: app
                .certificates
                .iter()
                .map(|der| StoredCertificate::parse(&app.client_id, der))
                .collect::<Result<_, _>>()?,
            federated: app.federated.clone(),
            token_lifetime: app.token_lifetime,
        })
    }
}

struct Registry {
    tenants: Vec<Tenant>,
    apps: Vec<AppRecord>,
    resources: KnownResources,
    token_lifetime: Duration,
    clock_skew: Duration,
}

impl Registry {
    fn tenant(&self, segment: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|t| {
            t.id.eq_ignore_ascii_case(segment)
                || t.domains.iter().any(|d| d.eq_ignore_ascii_case(segment))
        })
    }

    fn app(&self, client_id: &str) -> Option<&AppRecord> {
        self.apps
            .iter()
            .find(|a| a.client_id.eq_ignore_ascii_case(client_id))
    }

    fn app_mut(&mut self, client_id: &str) -> Result<&mut AppRecord, EntraError> {
        self.apps
            .iter_mut()
            .find(|a| a.client_id.eq_ignore_ascii_case(client_id))
            .ok_or_else(|| EntraError::UnknownApp(client_id.to_string()))
    }

    fn ensure_tenant(&mut self, id: &str) {
        if !self.tenants.iter().any(|t| t.id.eq_ignore_ascii_case(id)) {
            self.tenants.push(Tenant::new(id));
        }
    }

    fn register(&mut self, record: AppRecord) {
        self.ensure_tenant(&record.tenant);
        self.apps
            .retain(|a| !a.client_id.eq_ignore_ascii_case(&record.client_id));
        self.apps.push(record);
    }
}

/// An Entra error: status, OAuth error, AADSTS code and message.
#[derive(Debug)]
struct AadError {
    status: u16,
    error: &'static str,
    code: u32,
    message: String,
}

impl AadError {
    fn new(status: u16, error: &'static str, code: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            error,
            code,
            message: message.into(),
        }
    }

    fn missing(parameter: &str) -> Self {
        Self::new(
            400,
            "invalid_request",
            900144,
            format!("The request body must contain the following parameter: '{parameter}'."),
        )
    }

    fn invalid_client(code: u32, message: impl Into<String>) -> Self {
        Self::new(401, "invalid_client", code, message)
    }

    /// The body Entra sends for a status forced by fault injection.
    fn injected(status: u16) -> Self {
        match status {
            429 => Self::new(
                429,
                "temporarily_unavailable",
                90055,
                "There are too many incoming requests. Please try again later.",
            ),
            503 => Self::new(
                503,
                "temporarily_unavailable",
                90033,
                "A transient error has occurred. Please try again.",
            ),
            500..=599 => Self::new(
                status,
                "server_error",
                50000,
                "There was an error issuing a token or an issue with our sign-in service.",
            ),
            _ => Self::new(
                status,
                "invalid_request",
                90100,
                "The request could not be processed.",
            ),
        }
    }

    /// Entra's error document: the description ends in `\r\n`-separated trace lines.
    fn body(&self, correlation_id: &str, host: &str) -> Value {
        let timestamp = aad_timestamp(now_unix());
        let trace_id = guid();
        json!({
            "error": self.error,
            "error_description": format!(
                "AADSTS{}: {}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {timestamp}",
                self.code, self.message
            ),
            "error_codes": [self.code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": format!("https://{host}/error?code={}", self.code),
        })
    }

    fn response(
        &self,
        correlation_id: &str,
        host: &str,
        retry_after: Option<u64>,
    ) -> Response<Full<Bytes>> {
        let body = self.body(correlation_id, host);
        let mut headers = no_cache_headers(body["trace_id"].as_str().unwrap_or_default());
        if let Some(seconds) = retry_after {
            headers.push(("retry-after", seconds.to_string()));
        }
        response(
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST),
            JSON,
            &headers,
            json_bytes(&body),
        )
    }

    fn outcome(&self) -> EntraOutcome {
        EntraOutcome::Rejected {
            status: self.status,
            error: self.error.to_string(),
            code: Some(self.code),
        }
    }
}

fn no_cache_headers(request_id: &str) -> Vec<(&'static str, String)> {
    vec![
        ("cache-control", "no-store, no-cache".to_string()),
        ("pragma", "no-cache".to_string()),
        ("x-ms-request-id", request_id.to_string()),
    ]
}

/// The form fields of a token request (and RFC 6749 Basic client authentication).
#[derive(Default)]
struct TokenForm {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    client_assertion: Option<String>,
    client_assertion_type: Option<String>,
    scope: Option<String>,
}

impl TokenForm {
    fn parse(body: &[u8], basic: Option<(String, String)>) -> Self {
        let mut form = TokenForm::default();
        for (key, value) in form_urlencoded::parse(body) {
            let slot = match key.as_ref() {
                "grant_type" => &mut form.grant_type,
                "client_id" => &mut form.client_id,
                "client_secret" => &mut form.client_secret,
                "client_assertion" => &mut form.client_assertion,
                "client_assertion_type" => &mut form.client_assertion_type,
                "scope" => &mut form.scope,
                _ => continue,
            };
            // the first occurrence wins
            if slot.is_none() {
                *slot = Some(value.into_owned());
            }
        }
        if let Some((id, secret)) = basic {
            form.client_id.get_or_insert(id);
            form.client_secret.get_or_insert(secret);
        }
        form
    }

    fn credential_kind(&self) -> CredentialKind {
        if self.client_secret.is_some() {
            return CredentialKind::Secret;
        }
        let Some(assertion) = &self.client_assertion else {
            return CredentialKind::Missing;
        };
        let own = Jwt::parse(assertion)
            .ok()
            .zip(self.client_id.as_deref())
            .is_some_and(|(jwt, id)| jwt.claim_str("iss") == Some(id));
        if own {
            CredentialKind::Certificate
        } else {
            CredentialKind::Federated
        }
    }
}

fn basic_credentials(req: &Request<Incoming>) -> Option<(String, String)> {
    let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    let unescape = |s: &str| {
        form_urlencoded::parse(format!("v={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Some((unescape(id), unescape(secret)))
}

/// A token being issued.
struct Issued {
    access_token: String,
    expires_in: u64,
}

struct EntraState {
    host: String,
    port: u16,
    registry: Mutex<Registry>,
    faults: Mutex<FaultQueue>,
    log: Mutex<Vec<EntraRequest>>,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // a panicking test thread must not take the mock down with it
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl EntraState {
    /// The authority as configured: `login.mock.test[:port]`.
    fn authority(&self) -> String {
        if self.port == 443 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn record(&self, entry: EntraRequest) {
        let counter = match entry.outcome {
            EntraOutcome::Issued { .. } => &self.counters.issued,
            EntraOutcome::Rejected { .. } => &self.counters.rejected,
            EntraOutcome::Injected { .. } | EntraOutcome::Reset => &self.counters.injected,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        lock(&self.log).push(entry);
    }

    fn token(
        &self,
        tenant_segment: &str,
        form: &TokenForm,
        host_header: Option<&str>,
    ) -> Result<Issued, AadError> {
        let registry = lock(&self.registry);
        let tenant = registry.tenant(tenant_segment).ok_or_else(|| {
            AadError::new(
                400,
                "invalid_request",
                90002,
                format!(
                    "Tenant '{tenant_segment}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant."
                ),
            )
        })?;
        let grant_type = form
            .grant_type
            .as_deref()
            .ok_or_else(|| AadError::missing("grant_type"))?;
        if grant_type != "client_credentials" {
            return Err(AadError::new(
                400,
                "unsupported_grant_type",
                70003,
                format!("The app requested an unsupported grant type '{grant_type}'."),
            ));
        }
        let client_id = form
            .client_id
            .as_deref()
            .ok_or_else(|| AadError::missing("client_id"))?;
        let scope = form
            .scope
            .as_deref()
            .ok_or_else(|| AadError::missing("scope"))?;
        let app = registry
            .app(client_id)
            .filter(|a| a.tenant.eq_ignore_ascii_case(&tenant.id))
            .ok_or_else(|| {
                AadError::new(
                    400,
                    "unauthorized_client",
                    700016,
                    format!(
                        "Application with identifier '{client_id}' was not found in the directory '{tenant_segment}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."
                    ),
                )
            })?;
        let resource = single_resource(scope)?;
        let now = now_unix();
        let acr = match (&form.client_secret, &form.client_assertion) {
            (Some(secret), _) => {
                check_secret(app, secret, now)?;
                "1"
            }
            (None, Some(assertion)) => {
                match form.client_assertion_type.as_deref() {
                    None => return Err(AadError::missing("client_assertion_type")),
                    Some(ASSERTION_TYPE) => {}
                    Some(other) => {
                        return Err(AadError::new(
                            400,
                            "invalid_request",
                            70002,
                            format!(
                                "Error validating credentials. The client_assertion_type '{other}' is not supported."
                            ),
                        ));
                    }
                }
                let jwt = Jwt::parse(assertion).map_err(|_| {
                    AadError::new(
                        400,
                        "invalid_request",
                        50027,
                        "JWT token is invalid or malformed.",
                    )
                })?;
                let skew = i64::try_from(registry.clock_skew.as_secs()).unwrap_or(i64::MAX);
                if jwt.claim_str("iss") == Some(client_id) {
                    let audiences = self.token_urls(tenant_segment, host_header);
                    check_certificate_assertion(app, &jwt, &audiences, now, skew)?;
                } else {
                    check_federated_assertion(app, &jwt, now, skew)?;
                }
                "2"
            }
            (None, None) => {
                return Err(AadError::invalid_client(
                    7000216,
                    "'client_assertion', 'client_secret' or 'request' is required for the 'client_credentials' grant type.",
                ));
            }
        };
        if !registry.resources.contains(resource) {
            return Err(AadError::new(
                400,
                "invalid_resource",
                500011,
                format!(
                    "The resource principal named {resource} was not found in the tenant named {tenant_segment}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant."
                ),
            ));
        }
        let lifetime = app.token_lifetime.unwrap_or(registry.token_lifetime);
        let expires_in = lifetime.as_secs();
        let issuer = format!("https://sts.windows.net/{}/", tenant.id);
        let claims = json!({
            "aud": resource,
            "iss": issuer,
            "iat": now,
            "nbf": now,
            "exp": now + i64::try_from(expires_in).unwrap_or(i64::MAX / 2),
            "appid": app.client_id,
            "appidacr": acr,
            "azp": app.client_id,
            "azpacr": acr,
            "idp": issuer,
            "idtyp": "app",
            "oid": app.object_id,
            "sub": app.object_id,
            "tid": tenant.id,
            "uti": jwt::b64url(guid().as_bytes()).get(..22).unwrap_or_default(),
            "ver": "1.0",
        });
        let header = json!({"alg": "RS256", "typ": "JWT"});
        Ok(Issued {
            access_token: jwt::placeholder_signed(&header, &claims),
            expires_in,
        })
    }

    /// The token URLs a certificate assertion may name as `aud`: as the client addressed the
    /// server (its Host header) and as configured, v2 and v1 paths.
    fn token_urls(&self, tenant_segment: &str, host_header: Option<&str>) -> Vec<String> {
        let mut hosts = vec![self.authority()];
        hosts.extend(host_header.map(str::to_string));
        hosts
            .iter()
            .flat_map(|h| {
                [
                    format!("https://{h}/{tenant_segment}/oauth2/v2.0/token"),
                    format!("https://{h}/{tenant_segment}/oauth2/token"),
                ]
            })
            .collect()
    }
}

fn single_resource(scope: &str) -> Result<&str, AadError> {
    let scopes: Vec<&str> = scope.split(' ').filter(|s| !s.is_empty()).collect();
    if scopes.is_empty() {
        return Err(AadError::missing("scope"));
    }
    if let Some(bad) = scopes.iter().find(|s| resource_of_scope(s).is_none()) {
        return Err(AadError::new(
            400,
            "invalid_scope",
            1002012,
            format!(
                "The provided value for scope {bad} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
            ),
        ));
    }
    match scopes.as_slice() {
        [one] => Ok(resource_of_scope(one).expect("checked above")),
        _ => Err(AadError::new(
            400,
            "invalid_scope",
            70011,
            format!(
                "The provided value for the input parameter 'scope' is not valid. The scope {} is not valid.",
                scopes.join(" ")
            ),
        )),
    }
}

fn check_secret(app: &AppRecord, secret: &str, now: i64) -> Result<(), AadError> {
    let wanted = secret_digest(secret);
    let Some(stored) = app.secrets.iter().find(|s| s.sha256 == wanted) else {
        return Err(AadError::invalid_client(
            7000215,
            format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{}'.",
                app.client_id
            ),
        ));
    };
    if stored.expires_at.is_some_and(|t| t <= now) {
        return Err(AadError::invalid_client(
            7000222,
            format!(
                "The provided client secret keys for app '{}' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds.",
                app.client_id
            ),
        ));
    }
    Ok(())
}

/// `exp` (required) and `nbf` (optional) against now, with skew.
fn check_lifetime(jwt: &Jwt, now: i64, skew: i64) -> Result<(), AadError> {
    let exp = jwt.claim_time("exp").ok_or_else(|| {
        AadError::new(
            400,
            "invalid_request",
            50027,
            "JWT token is invalid or malformed.",
        )
    })?;
    let nbf = jwt.claim_time("nbf");
    if exp + skew <= now || nbf.is_some_and(|n| n - skew > now) {
        return Err(AadError::new(
            400,
            "invalid_grant",
            700024,
            format!(
                "Client assertion is not within its valid time range. Current time: {}, assertion valid from {}, expiry time of assertion {}. Review the documentation at https://docs.microsoft.com/en-us/azure/active-directory/develop/active-directory-certificate-credentials .",
                aad_instant(now),
                nbf.map_or_else(|| "(none)".to_string(), aad_instant),
                aad_instant(exp)
            ),
        ));
    }
    Ok(())
}

fn check_certificate_assertion(
    app: &AppRecord,
    jwt: &Jwt,
    token_urls: &[String],
    now: i64,
    skew: i64,
) -> Result<(), AadError> {
    let client_id = &app.client_id;
    if jwt.claim_str("sub") != Some(client_id.as_str()) {
        return Err(AadError::invalid_client(
            700021,
            "Client assertion application identifier doesn't match 'client_id' parameter. Review the documentation at https://docs.microsoft.com/en-us/azure/active-directory/develop/active-directory-certificate-credentials .",
        ));
    }
    let presented = presented_thumbprint(jwt);
    let presented_hex = presented
        .as_ref()
        .map_or_else(String::new, |(_, bytes)| hex_upper(bytes));
    let not_found = || {
        AadError::invalid_client(
            700027,
            format!(
                "Client assertion failed signature validation. [Reason - The key was not found., Thumbprint of key used by client: '{presented_hex}', Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id '{client_id}'.]"
            ),
        )
    };
    let (kind, bytes) = presented.as_ref().ok_or_else(not_found)?;
    let cert = app
        .certificates
        .iter()
        .find(|c| match kind {
            ThumbprintKind::Sha1 => &c.sha1 == bytes,
            ThumbprintKind::Sha256 => &c.sha256 == bytes,
        })
        .ok_or_else(not_found)?;
    if now > cert.not_after || now < cert.not_before {
        return Err(AadError::invalid_client(
            700027,
            format!(
                "Client assertion failed signature validation. [Reason - The key used is expired., Thumbprint of key used by client: '{presented_hex}', {}]",
                cert.key_window()
            ),
        ));
    }
    let alg = jwt.header_str("alg").unwrap_or_default();
    let Some(alg) = JwtAlg::from_name(alg) else {
        return Err(AadError::invalid_client(
            700027,
            format!(
                "Client assertion failed signature validation. [Reason - The signing algorithm '{alg}' is not supported., Thumbprint of key used by client: '{presented_hex}']"
            ),
        ));
    };
    let verifier = match alg {
        JwtAlg::Rs256 => &RSA_PKCS1_2048_8192_SHA256,
        JwtAlg::Ps256 => &RSA_PSS_2048_8192_SHA256,
    };
    UnparsedPublicKey::new(verifier, &cert.public_key)
        .verify(jwt.signing_input.as_bytes(), &jwt.signature)
        .map_err(|_| {
            AadError::invalid_client(
                700027,
                format!(
                    "Client assertion contains an invalid signature. [Reason - The provided signature value did not match the expected signature value., Thumbprint of key used by client: '{presented_hex}', {}]",
                    cert.key_window()
                ),
            )
        })?;
    let audiences = jwt.audiences();
    if !audiences
        .iter()
        .any(|a| token_urls.iter().any(|u| u.eq_ignore_ascii_case(a)))
    {
        return Err(AadError::invalid_client(
            50013,
            format!(
                "Assertion audience claim does not match the required value. The audience in the assertion was '{}' and the expected audience is '{}' or one of the Application Uris of this application with App ID '{client_id}'({client_id}).",
                audiences.join(","),
                token_urls.first().map_or("", String::as_str)
            ),
        ));
    }
    check_lifetime(jwt, now, skew)
}

#[derive(Debug, Clone, Copy)]
enum ThumbprintKind {
    Sha1,
    Sha256,
}

/// `x5t#S256`, else `x5t` (any base64 spelling), else a hex SHA-1 `kid` (MSAL's spelling).
fn presented_thumbprint(jwt: &Jwt) -> Option<(ThumbprintKind, Vec<u8>)> {
    if let Some(bytes) = jwt.header_str("x5t#S256").and_then(jwt::b64_any) {
        return Some((ThumbprintKind::Sha256, bytes));
    }
    if let Some(bytes) = jwt.header_str("x5t").and_then(jwt::b64_any) {
        return Some((ThumbprintKind::Sha1, bytes));
    }
    let kid = jwt.header_str("kid")?;
    let bytes = (0..kid.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(kid.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    (bytes.len() == 20).then_some((ThumbprintKind::Sha1, bytes))
}

fn check_federated_assertion(
    app: &AppRecord,
    jwt: &Jwt,
    now: i64,
    skew: i64,
) -> Result<(), AadError> {
    check_lifetime(jwt, now, skew)?;
    let issuer = jwt.claim_str("iss").unwrap_or_default();
    let subject = jwt.claim_str("sub").unwrap_or_default();
    let audiences = jwt.audiences();
    let candidates: Vec<&FederatedCredential> = app
        .federated
        .iter()
        .filter(|f| f.issuer == issuer && f.subject == subject)
        .collect();
    if candidates.is_empty() {
        return Err(AadError::new(
            400,
            "invalid_grant",
            70021,
            format!(
                "No matching federated identity record found for presented assertion. Assertion Issuer: '{issuer}'. Assertion Subject: '{subject}'. Assertion Audience: '{}'. https://docs.microsoft.com/en-us/azure/active-directory/develop/workload-identity-federation",
                audiences.join(",")
            ),
        ));
    }
    let audience_matches = candidates
        .iter()
        .any(|f| f.audiences.iter().any(|a| audiences.contains(&a.as_str())));
    if !audience_matches {
        return Err(AadError::new(
            400,
            "invalid_grant",
            700212,
            format!(
                "No matching federated identity record found for presented assertion audience '{}'. Please note that the matching is done using a case-sensitive comparison. Check your federated identity credential Subject, Audience and Issuer against the presented assertion. https://learn.microsoft.com/entra/workload-id/workload-identity-federation",
                audiences.join(",")
            ),
        ));
    }
    Ok(())
}

fn not_found() -> Response<Full<Bytes>> {
    response(
        StatusCode::NOT_FOUND,
        JSON,
        &[],
        json_bytes(
            &json!({"error": "not_found", "error_description": "The requested resource was not found."}),
        ),
    )
}

impl Handler for EntraState {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Reply {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut entry = EntraRequest {
            at: SystemTime::now(),
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            tenant: None,
            client_id: None,
            credential: CredentialKind::Missing,
            scope: None,
            delayed: None,
            outcome: EntraOutcome::Rejected {
                status: 404,
                error: "not_found".into(),
                code: None,
            },
        };
        let segments: Vec<&str> = entry.path.trim_start_matches('/').split('/').collect();
        let tenant = match segments.as_slice() {
            [tenant, "oauth2", "v2.0", "token"] if !tenant.is_empty() => tenant.to_string(),
            _ => {
                self.record(entry);
                return Reply::Response(not_found());
            }
        };
        entry.tenant = Some(tenant.clone());
        let correlation_id = req
            .headers()
            .get("client-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| is_guid(v))
            .map_or_else(guid, str::to_string);
        let error_host = self.authority();
        if req.method() != Method::POST {
            let err = AadError::new(
                405,
                "invalid_request",
                900561,
                format!(
                    "The endpoint only accepts POST, OPTIONS requests. Received a {} request.",
                    req.method()
                ),
            );
            entry.outcome = err.outcome();
            self.record(entry);
            return Reply::Response(err.response(&correlation_id, &error_host, None));
        }
        let host_header = req
            .headers()
            .get(HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let basic = basic_credentials(&req);
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => {
                let err = AadError::new(
                    400,
                    "invalid_request",
                    90014,
                    "The request body could not be read or is too large.",
                );
                entry.outcome = err.outcome();
                self.record(entry);
                return Reply::Response(err.response(&correlation_id, &error_host, None));
            }
        };
        let form = TokenForm::parse(&body, basic);
        entry.client_id = form.client_id.clone();
        entry.credential = form.credential_kind();
        entry.scope = form.scope.clone();

        let fault = lock(&self.faults).take(form.client_id.as_deref(), true);
        match fault {
            None => {}
            Some(Fault::Delay(delay)) => {
                tokio::time::sleep(delay).await;
                entry.delayed = Some(delay);
            }
            Some(Fault::Reset) => {
                entry.outcome = EntraOutcome::Reset;
                self.record(entry);
                return Reply::Reset;
            }
            Some(Fault::Status {
                status,
                retry_after,
            }) => {
                entry.outcome = EntraOutcome::Injected { status };
                self.record(entry);
                let err = AadError::injected(status);
                return Reply::Response(err.response(&correlation_id, &error_host, retry_after));
            }
            Some(Fault::Raw {
                status,
                content_type,
                body,
            }) => {
                entry.outcome = EntraOutcome::Injected { status };
                self.record(entry);
                return Reply::Response(response(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    &content_type,
                    &[],
                    body,
                ));
            }
        }

        match self.token(&tenant, &form, host_header.as_deref()) {
            Ok(issued) => {
                entry.outcome = EntraOutcome::Issued {
                    expires_in: issued.expires_in,
                };
                self.record(entry);
                let body = json!({
                    "token_type": "Bearer",
                    "expires_in": issued.expires_in,
                    "ext_expires_in": issued.expires_in,
                    "access_token": issued.access_token,
                });
                Reply::Response(response(
                    StatusCode::OK,
                    JSON,
                    &no_cache_headers(&guid()),
                    json_bytes(&body),
                ))
            }
            Err(err) => {
                entry.outcome = err.outcome();
                self.record(entry);
                Reply::Response(err.response(&correlation_id, &error_host, None))
            }
        }
    }
}

/// How to build an [`EntraMock`]; `EntraMock::start()` uses the defaults.
#[derive(Debug)]
pub struct EntraMockBuilder {
    host: String,
    ca: Option<Arc<TestCa>>,
    token_lifetime: Duration,
    clock_skew: Duration,
    resources: KnownResources,
    tenants: Vec<Tenant>,
    apps: Vec<App>,
}

impl Default for EntraMockBuilder {
    fn default() -> Self {
        Self {
            host: DEFAULT_HOST.to_string(),
            ca: None,
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
            clock_skew: DEFAULT_CLOCK_SKEW,
            resources: KnownResources::default(),
            tenants: Vec::new(),
            apps: Vec::new(),
        }
    }
}

impl EntraMockBuilder {
    /// The authority host name in the server certificate and in assertion audiences.
    pub fn host(mut self, host: &str) -> Self {
        self.host = host.to_string();
        self
    }

    /// Signs the server certificate with this CA instead of a new one (one CA for all mocks).
    pub fn ca(mut self, ca: Arc<TestCa>) -> Self {
        self.ca = Some(ca);
        self
    }

    pub fn token_lifetime(mut self, lifetime: Duration) -> Self {
        self.token_lifetime = lifetime;
        self
    }

    pub fn clock_skew(mut self, skew: Duration) -> Self {
        self.clock_skew = skew;
        self
    }

    pub fn resources(mut self, resources: KnownResources) -> Self {
        self.resources = resources;
        self
    }

    pub fn allow_resource(mut self, resource: &str) -> Self {
        self.resources.allow(resource);
        self
    }

    pub fn tenant(mut self, tenant: Tenant) -> Self {
        self.tenants.push(tenant);
        self
    }

    pub fn app(mut self, app: App) -> Self {
        self.apps.push(app);
        self
    }

    /// Serves on 127.0.0.1 and a free port.
    pub async fn start(self) -> Result<EntraMock, EntraError> {
        let listener = server::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        self.start_on(listener).await
    }

    /// Serves on a socket the caller bound (in any network namespace), on the current runtime.
    pub async fn start_on(self, listener: std::net::TcpListener) -> Result<EntraMock, EntraError> {
        let addr = listener.local_addr().map_err(StartError::Listener)?;
        let ca = match self.ca {
            Some(ca) => ca,
            None => Arc::new(TestCa::generate()?),
        };
        let mut ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
        if !addr.ip().is_unspecified() && !ips.contains(&addr.ip()) {
            ips.push(addr.ip());
        }
        let certificate =
            ca.server_certificate(&[self.host.clone(), "localhost".to_string()], &ips)?;
        let mut registry = Registry {
            tenants: self.tenants,
            apps: Vec::new(),
            resources: self.resources,
            token_lifetime: self.token_lifetime,
            clock_skew: self.clock_skew,
        };
        for app in &self.apps {
            registry.register(AppRecord::from_app(app)?);
        }
        let state = Arc::new(EntraState {
            host: self.host,
            port: addr.port(),
            registry: Mutex::new(registry),
            faults: Mutex::default(),
            log: Mutex::default(),
            counters: Counters::default(),
        });
        let server = Running::spawn(listener, Some(certificate.acceptor()?), Arc::clone(&state))?;
        Ok(EntraMock { server, state, ca })
    }
}

/// A running mock Entra ID. Dropping it stops it.
pub struct EntraMock {
    server: Running,
    state: Arc<EntraState>,
    ca: Arc<TestCa>,
}

impl fmt::Debug for EntraMock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntraMock")
            .field("addr", &self.server.addr())
            .field("host", &self.state.host)
            .finish_non_exhaustive()
    }
}

impl EntraMock {
    pub fn builder() -> EntraMockBuilder {
        EntraMockBuilder::default()
    }

    /// A mock with no apps yet on 127.0.0.1.
    pub async fn start() -> Result<Self, EntraError> {
        EntraMockBuilder::default().start().await
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn host(&self) -> &str {
        &self.state.host
    }

    /// `https://login.mock.test:<port>`: the `authority_host` clients are configured with.
    pub fn authority_host(&self) -> String {
        format!("https://{}", self.state.authority())
    }

    /// The v2 token endpoint of a tenant, as clients build it (and put in assertion `aud`).
    pub fn token_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.authority_host())
    }

    pub fn ca(&self) -> &Arc<TestCa> {
        &self.ca
    }

    pub fn ca_pem(&self) -> &str {
        self.ca.pem()
    }

    pub fn write_ca_pem(&self, path: &Path) -> Result<(), TlsError> {
        self.ca.write_pem(path)
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        lock(&self.state.registry)
    }

    /// Adds an app registration, replacing one with the same client id.
    pub fn register(&self, app: App) -> Result<(), EntraError> {
        let record = AppRecord::from_app(&app)?;
        self.registry().register(record);
        Ok(())
    }

    pub fn unregister(&self, client_id: &str) -> bool {
        let mut registry = self.registry();
        let before = registry.apps.len();
        registry
            .apps
            .retain(|a| !a.client_id.eq_ignore_ascii_case(client_id));
        registry.apps.len() != before
    }

    pub fn add_tenant(&self, tenant: Tenant) {
        self.registry().tenants.push(tenant);
    }

    /// Adds a secret (rotation: the old one stays valid until revoked or expired).
    pub fn add_secret(&self, client_id: &str, value: &str) -> Result<(), EntraError> {
        self.push_secret(client_id, value, None)
    }

    pub fn add_secret_expiring(
        &self,
        client_id: &str,
        value: &str,
        expires_at: SystemTime,
    ) -> Result<(), EntraError> {
        self.push_secret(client_id, value, Some(expires_at))
    }

    fn push_secret(
        &self,
        client_id: &str,
        value: &str,
        expires_at: Option<SystemTime>,
    ) -> Result<(), EntraError> {
        self.registry()
            .app_mut(client_id)?
            .secrets
            .push(StoredSecret {
                sha256: secret_digest(value),
                expires_at: expires_at.map(unix),
            });
        Ok(())
    }

    /// Deletes a secret: it then fails as a wrong one (AADSTS7000215).
    pub fn revoke_secret(&self, client_id: &str, value: &str) -> bool {
        let wanted = secret_digest(value);
        let mut registry = self.registry();
        let Ok(app) = registry.app_mut(client_id) else {
            return false;
        };
        let before = app.secrets.len();
        app.secrets.retain(|s| s.sha256 != wanted);
        app.secrets.len() != before
    }

    /// Lets a secret expire now: it then fails as expired (AADSTS7000222).
    pub fn expire_secret(&self, client_id: &str, value: &str) -> bool {
        let wanted = secret_digest(value);
        let mut registry = self.registry();
        let Ok(app) = registry.app_mut(client_id) else {
            return false;
        };
        let mut found = false;
        for secret in app.secrets.iter_mut().filter(|s| s.sha256 == wanted) {
            secret.expires_at = Some(now_unix() - 1);
            found = true;
        }
        found
    }

    pub fn add_certificate(&self, client_id: &str, der: &[u8]) -> Result<(), EntraError> {
        let cert = StoredCertificate::parse(client_id, der)?;
        self.registry().app_mut(client_id)?.certificates.push(cert);
        Ok(())
    }

    pub fn remove_certificate(&self, client_id: &str, der: &[u8]) -> bool {
        let sha1 = tls::sha1_thumbprint(der);
        let mut registry = self.registry();
        let Ok(app) = registry.app_mut(client_id) else {
            return false;
        };
        let before = app.certificates.len();
        app.certificates.retain(|c| c.sha1 != sha1);
        app.certificates.len() != before
    }

    pub fn add_federated(
        &self,
        client_id: &str,
        credential: FederatedCredential,
    ) -> Result<(), EntraError> {
        self.registry()
            .app_mut(client_id)?
            .federated
            .push(credential);
        Ok(())
    }

    pub fn remove_federated(&self, client_id: &str, issuer: &str, subject: &str) -> bool {
        let mut registry = self.registry();
        let Ok(app) = registry.app_mut(client_id) else {
            return false;
        };
        let before = app.federated.len();
        app.federated
            .retain(|f| !(f.issuer == issuer && f.subject == subject));
        app.federated.len() != before
    }

    /// `expires_in` of tokens for apps without their own lifetime, from now on.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.registry().token_lifetime = lifetime;
    }

    pub fn allow_resource(&self, resource: &str) {
        self.registry().resources.allow(resource);
    }

    /// The next `times` matching token requests get `fault`.
    pub fn inject(&self, target: FaultTarget, fault: Fault, times: usize) {
        lock(&self.state.faults).push(target, fault, times);
    }

    pub fn clear_faults(&self) {
        lock(&self.state.faults).clear();
    }

    pub fn pending_faults(&self) -> usize {
        lock(&self.state.faults).pending()
    }

    /// Every request so far, oldest first.
    pub fn log(&self) -> Vec<EntraRequest> {
        lock(&self.state.log).clone()
    }

    pub fn clear_log(&self) {
        lock(&self.state.log).clear();
    }

    /// Token requests so far that named this client id.
    pub fn requests_for(&self, client_id: &str) -> Vec<EntraRequest> {
        lock(&self.state.log)
            .iter()
            .filter(|r| {
                r.client_id
                    .as_deref()
                    .is_some_and(|c| c.eq_ignore_ascii_case(client_id))
            })
            .cloned()
            .collect()
    }

    pub fn stats(&self) -> EntraStats {
        let c = &self.state.counters;
        EntraStats {
            requests: c.requests.load(Ordering::Relaxed),
            issued: c.issued.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            injected: c.injected.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting, ends open connections and waits for the server task.
    pub async fn shutdown(mut self) {
        self.server.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_have_entras_shape() {
        let body = AadError::invalid_client(7000215, "Invalid client secret provided.")
            .body("11111111-2222-4333-8444-555555555555", "login.mock.test");
        let keys: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "error",
                "error_description",
                "error_codes",
                "timestamp",
                "trace_id",
                "correlation_id",
                "error_uri"
            ]
        );
        let description = body["error_description"].as_str().unwrap();
        assert!(
            description.starts_with("AADSTS7000215: Invalid client secret provided.\r\nTrace ID: ")
        );
        assert!(
            description.contains(
                "\r\nCorrelation ID: 11111111-2222-4333-8444-555555555555\r\nTimestamp: "
            )
        );
        assert_eq!(body["error_codes"], json!([7000215]));
    }

    #[test]
    fn one_resource_per_request() {
        assert_eq!(
            single_resource("https://management.azure.com//.default").unwrap(),
            "https://management.azure.com/"
        );
        assert_eq!(
            single_resource("https://vault.azure.net/x")
                .unwrap_err()
                .code,
            1002012
        );
        assert_eq!(
            single_resource(
                "https://vault.azure.net/.default https://graph.microsoft.com/.default"
            )
            .unwrap_err()
            .code,
            70011
        );
        assert_eq!(single_resource("  ").unwrap_err().code, 900144);
    }

    #[test]
    fn form_takes_first_values_and_basic_credentials() {
        let form = TokenForm::parse(
            b"client_id=a&client_id=b&scope=x%2F.default+y&grant_type=client_credentials",
            Some(("ignored".into(), "s3cret".into())),
        );
        assert_eq!(form.client_id.as_deref(), Some("a"));
        assert_eq!(form.scope.as_deref(), Some("x/.default y"));
        assert_eq!(form.client_secret.as_deref(), Some("s3cret"));
        assert_eq!(form.credential_kind(), CredentialKind::Secret);
    }

    #[test]
    fn kid_in_hex_names_a_sha1_thumbprint() {
        let token = format!(
            "{}.e30.AA",
            jwt::b64url(
                json!({"alg": "RS256", "kid": "00".repeat(20)})
                    .to_string()
                    .as_bytes()
            )
        );
        let parsed = Jwt::parse(&token).unwrap();
        let (kind, bytes) = presented_thumbprint(&parsed).unwrap();
        assert!(matches!(kind, ThumbprintKind::Sha1));
        assert_eq!(bytes, vec![0; 20]);
    }
}
