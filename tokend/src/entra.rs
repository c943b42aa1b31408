//! Tokens of types 1, 2 and 3 from Entra ID through `azure_identity` 1.0:
//! `ClientSecretCredential`, `ClientCertificateCredential` (the PKCS#12 of the Secret; the
//! crate's `client_certificate` feature, openssl) and `ClientAssertionCredential` (a pod-bound
//! service-account token). A fresh credential per upstream call: the crate caches per
//! instance and cannot bypass, and tokend's own cache sits above it.
//!
//! Every credential gets tokend's transport: one reqwest client (the system roots plus
//! `--ca-file`) wrapped in a [`Recorder`] that keeps the last answer's status, `Retry-After`
//! and error body, so failures are classified from what Entra said; and a [`BoundedRetry`]
//! (two retries within a few seconds, on 408 and 5xx and network errors; a 429 goes back to
//! the pod at once with its `Retry-After`).

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration as StdDuration;

use async_trait::async_trait;
use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::{Secret, SecretBytes, TokenCredential};
use azure_core::http::headers::RETRY_AFTER;
use azure_core::http::policies::{RetryHeaders, RetryPolicy};
use azure_core::http::{
    AsyncRawResponse, ClientMethodOptions, ClientOptions, HttpClient, Request, RetryOptions,
    StatusCode, Transport,
};
use azure_core::time::Duration;
use azure_identity::{
    ClientAssertion, ClientAssertionCredential, ClientAssertionCredentialOptions,
    ClientCertificateCredential, ClientCertificateCredentialOptions, ClientSecretCredential,
    ClientSecretCredentialOptions,
};
use bytes::Bytes;
use reqwest::Url;

use crate::cluster::ObjKey;
use crate::token::{Token, unix_now};
use crate::upstream::{UpstreamError, classify_entra};

/// Connect timeout to Entra ID.
const CONNECT_TIMEOUT: StdDuration = StdDuration::from_secs(5);
/// Timeout of one attempt.
const ATTEMPT_TIMEOUT: StdDuration = StdDuration::from_secs(10);
/// Retries after the first attempt.
const MAX_RETRIES: u32 = 2;
/// No retry starts once this much time has passed since the first attempt.
const RETRY_BUDGET: Duration = Duration::seconds(3);
/// Longest pause between attempts, `Retry-After` included.
const MAX_PAUSE: Duration = Duration::seconds(2);
/// Longest error body kept for classification.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// What proves the identity.
pub enum EntraCredential {
    /// Type 1: the client secret.
    Secret(String),
    /// Type 2: a PKCS#12 (DER) with an RSA key, from `secret`.
    Certificate {
        pkcs12: Vec<u8>,
        password: Option<String>,
        secret: ObjKey,
    },
    /// Type 3: the pod's service-account token.
    Assertion(String),
}

impl fmt::Debug for EntraCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Secret(_) => f.write_str("Secret(..)"),
            Self::Certificate { secret, .. } => write!(f, "Certificate(from Secret {secret})"),
            Self::Assertion(_) => f.write_str("Assertion(..)"),
        }
    }
}

/// The last answer (or failure) a credential's pipeline got.
#[derive(Debug, Clone)]
enum Recorded {
    Answer {
        status: u16,
        retry_after: Option<String>,
        /// Kept for error answers only: a success body holds the token.
        error_body: Bytes,
    },
    Transport(String),
}

/// The transport of one credential: reqwest, remembering the last answer.
#[derive(Debug)]
struct Recorder {
    http: reqwest::Client,
    last: Mutex<Option<Recorded>>,
}

impl Recorder {
    fn record(&self, recorded: Recorded) {
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(recorded);
    }

    fn last(&self) -> Option<Recorded> {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What went wrong, from the last answer; `error` (azure_identity's) only when there
    /// was none to read.
    fn classify(&self, error: &azure_core::Error) -> UpstreamError {
        match self.last() {
            Some(Recorded::Answer {
                status,
                retry_after,
                error_body,
            }) if status >= 400 => classify_entra(status, &error_body, retry_after.as_deref()),
            Some(Recorded::Answer { status, .. }) => UpstreamError::unavailable(format!(
                "Entra ID answered HTTP {status} with a body azure_identity could not read: {error}"
            )),
            Some(Recorded::Transport(message)) => {
                UpstreamError::unavailable(format!("no answer from Entra ID: {message}"))
            }
            None => UpstreamError::unavailable(format!("azure_identity: {error}")),
        }
    }
}

#[async_trait]
impl HttpClient for Recorder {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let response = match HttpClient::execute_request(&self.http, request).await {
            Ok(response) => response,
            Err(e) => {
                self.record(Recorded::Transport(e.to_string()));
                return Err(e);
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get_optional_str(&RETRY_AFTER)
            .map(str::to_owned);
        if status.is_success() {
            self.record(Recorded::Answer {
                status: u16::from(status),
                retry_after,
                error_body: Bytes::new(),
            });
            return Ok(response);
        }
        let (status, headers, body) = response.deconstruct();
        let bytes = match body.collect().await {
            Ok(bytes) => bytes,
            Err(e) => {
                self.record(Recorded::Transport(e.to_string()));
                return Err(e);
            }
        };
        self.record(Recorded::Answer {
            status: u16::from(status),
            retry_after,
            error_body: bytes.slice(..bytes.len().min(MAX_ERROR_BODY)),
        });
        Ok(AsyncRawResponse::from_bytes(status, headers, bytes))
    }
}

/// Two retries within [`RETRY_BUDGET`] on 408, 5xx and network errors; 429 is not retried
/// (the pod gets Entra's `Retry-After`), and no pause is longer than [`MAX_PAUSE`].
#[derive(Debug)]
pub struct BoundedRetry {
    headers: RetryHeaders,
}

impl Default for BoundedRetry {
    fn default() -> Self {
        Self {
            headers: RetryHeaders {
                retry_headers: vec![RETRY_AFTER],
            },
        }
    }
}

const RETRIED: &[StatusCode] = &[
    StatusCode::RequestTimeout,
    StatusCode::InternalServerError,
    StatusCode::BadGateway,
    StatusCode::ServiceUnavailable,
    StatusCode::GatewayTimeout,
];

#[async_trait]
impl RetryPolicy for BoundedRetry {
    fn is_expired(&self, since_start: Duration, retries: u32) -> bool {
        retries >= MAX_RETRIES || since_start >= RETRY_BUDGET
    }

    fn retry_headers(&self) -> Option<&RetryHeaders> {
        Some(&self.headers)
    }

    fn retry_status_codes(&self) -> &[StatusCode] {
        RETRIED
    }

    fn sleep_duration(&self, retry: u32) -> Duration {
        Duration::milliseconds(250) * 2i32.saturating_pow(retry.saturating_sub(1)).min(8)
    }

    async fn wait(&self, retry: u32, retry_after: Option<Duration>) {
        let pause = retry_after
            .map_or(self.sleep_duration(retry), |asked| {
                asked.max(self.sleep_duration(retry))
            })
            .min(MAX_PAUSE);
        tokio::time::sleep(pause.try_into().unwrap_or(StdDuration::ZERO)).await;
    }
}

/// A client assertion known in advance: the pod's service-account token.
struct FixedAssertion(String);

impl fmt::Debug for FixedAssertion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FixedAssertion(..)")
    }
}

#[async_trait]
impl ClientAssertion for FixedAssertion {
    async fn secret(
        &self,
        _options: Option<ClientMethodOptions<'_>>,
    ) -> azure_core::Result<String> {
        Ok(self.0.clone())
    }
}

/// Entra ID, for every identity.
#[derive(Debug, Clone)]
pub struct Entra {
    http: reqwest::Client,
}

impl Entra {
    /// `extra_roots`: CA certificates trusted beside the system roots (`--ca-file`).
    pub fn new(extra_roots: Vec<reqwest::Certificate>) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(ATTEMPT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .tls_certs_merge(extra_roots)
            .build()?;
        Ok(Self { http })
    }

    /// A token of `client_id` in `tenant` for `scope`, from `authority`. `identity` names
    /// the AzureIdentity in errors.
    pub async fn token(
        &self,
        identity: &ObjKey,
        credential: EntraCredential,
        tenant: &str,
        client_id: &str,
        authority: &Url,
        scope: &str,
    ) -> Result<Token, UpstreamError> {
        let recorder = Arc::new(Recorder {
            http: self.http.clone(),
            last: Mutex::new(None),
        });
        let mut cloud = CustomConfiguration::default();
        cloud.authority_host = authority.as_str().trim_end_matches('/').to_owned();
        let client_options = ClientOptions {
            transport: Some(Transport::new(Arc::clone(&recorder) as Arc<dyn HttpClient>)),
            retry: RetryOptions::custom(Arc::new(BoundedRetry::default())),
            cloud: Some(Arc::new(CloudConfiguration::Custom(cloud))),
            ..Default::default()
        };
        let unusable = |what: String| {
            move |e: azure_core::Error| {
                UpstreamError::forbidden(format!("AzureIdentity {identity}: {what}: {e}"))
            }
        };
        let credential: Arc<dyn TokenCredential> = match credential {
            EntraCredential::Secret(secret) => ClientSecretCredential::new(
                tenant,
                client_id.to_owned(),
                Secret::new(secret),
                Some(ClientSecretCredentialOptions { client_options }),
            )
            .map_err(unusable("cannot build the client secret credential".into()))?,
            EntraCredential::Certificate {
                pkcs12,
                password,
                secret,
            } => ClientCertificateCredential::new(
                tenant.to_owned(),
                client_id.to_owned(),
                SecretBytes::new(pkcs12),
                Some(ClientCertificateCredentialOptions {
                    client_options,
                    password: password.map(Secret::new),
                }),
            )
            .map_err(unusable(format!(
                "the certificate of Secret {secret} is not a usable PKCS#12 with an RSA key"
            )))?,
            EntraCredential::Assertion(assertion) => ClientAssertionCredential::new(
                tenant.to_owned(),
                client_id.to_owned(),
                FixedAssertion(assertion),
                Some(ClientAssertionCredentialOptions { client_options }),
            )
            .map_err(unusable(
                "cannot build the client assertion credential".into(),
            ))?,
        };
        let fetched_at = unix_now();
        match credential.get_token(&[scope], None).await {
            Ok(access) => Ok(Token::new(
                access.token.secret().to_owned(),
                access.expires_on.unix_timestamp(),
                fetched_at,
            )
            .with_claimed_expiry()
            .with_client_id(Some(client_id.to_owned()))),
            Err(e) => Err(recorder.classify(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_few_short_and_never_on_429() {
        let policy = BoundedRetry::default();
        assert!(!policy.is_expired(Duration::ZERO, 0));
        assert!(!policy.is_expired(Duration::seconds(1), 1));
        assert!(policy.is_expired(Duration::ZERO, 2));
        assert!(policy.is_expired(Duration::seconds(3), 0));
        assert!(
            !policy
                .retry_status_codes()
                .contains(&StatusCode::TooManyRequests)
        );
        assert!(
            policy
                .retry_status_codes()
                .contains(&StatusCode::ServiceUnavailable)
        );
        assert_eq!(policy.sleep_duration(1), Duration::milliseconds(250));
        assert_eq!(policy.sleep_duration(2), Duration::milliseconds(500));
    }

    #[test]
    fn credentials_never_show_their_secrets() {
        let shown = format!(
            "{:?} {:?} {:?}",
            EntraCredential::Secret("s3cret".into()),
            EntraCredential::Certificate {
                pkcs12: b"p12-bytes".to_vec(),
                password: Some("pw".into()),
                secret: ObjKey::new("ns", "cert"),
            },
            EntraCredential::Assertion("eyJassertion".into())
        );
        for secret in ["s3cret", "p12-bytes", "pw", "eyJassertion"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("ns/cert"));
        assert!(!format!("{:?}", FixedAssertion("eyJx".into())).contains("eyJx"));
    }
}
