//! Getting tokens upstream, by AzureIdentity type (DESIGN.md "tokend upstream credentials"):
//! type 0 from the node's IMDS ([`crate::node_imds`]), types 1, 2 and 3 from Entra ID through
//! `azure_identity` ([`crate::entra`]) with a client secret, a PKCS#12 certificate or a
//! pod-bound service-account token. Every call holds one of the node's `--upstream-inflight`
//! permits.
//!
//! [`UpstreamError`] is what went wrong, classified from what upstream *answered* (status and
//! body), never from `azure_identity`'s error kind, which loses the status when Entra's
//! description holds `\r\n` (reference/imds.md §3.5). [`crate::imds`] maps it to HTTP.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{Api, PostParams};
use podid_api::crd::IdentityKind;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use reqwest::Url;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

use crate::cluster::{IdentityRecord, ObjKey, PodInfo};
use crate::entra::{Entra, EntraCredential};
use crate::imds::{MetadataRequest, Relayed, Selector, TokenRequest as PodTokenRequest};
use crate::node_imds::{ImdsAnswer, NodeImds};
use crate::token::{Token, unix_now};

/// How long a call may wait for one of the node's upstream permits.
pub const PERMIT_WAIT: Duration = Duration::from_secs(10);
/// Bound on each Kubernetes call made for a token (Secret read, TokenRequest).
const KUBE_TIMEOUT: Duration = Duration::from_secs(10);
/// The audience of a federated service-account token.
pub const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";
/// Lifetime asked for a federated service-account token: the API server's minimum.
const ASSERTION_SECONDS: i64 = 600;
/// The api-version tokend uses towards the node's IMDS.
pub const IMDS_API_VERSION: &str = "2018-02-01";
/// Keys of a type-2 Secret, as aad-pod-identity read them.
const CERTIFICATE_KEY: &str = "certificate";
const PASSWORD_KEY: &str = "password";

/// Why no token came from upstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The resource is unknown to Entra ID (`invalid_resource`, `invalid_scope`,
    /// AADSTS500011, AADSTS70011): 400.
    #[error("invalid resource: {description}")]
    InvalidResource { description: String },
    /// The identity's credentials were refused, or the identity is misconfigured (no tenant,
    /// Secret missing, unusable certificate): 403.
    #[error("forbidden: {description}")]
    Forbidden { description: String },
    /// Upstream throttled: 429 with its `Retry-After`.
    #[error("throttled for {retry_after}s: {description}")]
    Throttled {
        retry_after: u64,
        description: String,
    },
    /// Every upstream permit of the node stayed in use: 429.
    #[error("every upstream permit of the node stayed in use for {}s", PERMIT_WAIT.as_secs())]
    Busy,
    /// 5xx, timeout, network, or an answer tokend cannot read: 500. `detail` is for the log.
    #[error("upstream unavailable: {detail}")]
    Unavailable { detail: String },
}

impl UpstreamError {
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::Unavailable {
            detail: detail.into(),
        }
    }

    pub fn forbidden(description: impl Into<String>) -> Self {
        Self::Forbidden {
            description: description.into(),
        }
    }

    /// A bounded name for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidResource { .. } => "invalid_resource",
            Self::Forbidden { .. } => "forbidden",
            Self::Throttled { .. } => "throttled",
            Self::Busy => "busy",
            Self::Unavailable { .. } => "unavailable",
        }
    }

    /// What the log says about it (descriptions and details carry no secret).
    pub fn detail(&self) -> &str {
        match self {
            Self::InvalidResource { description }
            | Self::Forbidden { description }
            | Self::Throttled { description, .. } => description,
            Self::Busy => "every upstream permit of the node is in use",
            Self::Unavailable { detail } => detail,
        }
    }
}

/// `Retry-After` when a throttling answer has none (or an unreadable one).
const DEFAULT_RETRY_AFTER: u64 = 5;

/// `Retry-After` as whole seconds (an HTTP date is not worth parsing here: the default).
pub fn retry_after_secs(value: Option<&str>) -> u64 {
    value
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(DEFAULT_RETRY_AFTER)
        .max(1)
}

/// An OAuth error body (Entra ID's, and IMDS's which has the same two first fields).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ErrorBody {
    error: String,
    error_description: String,
    error_codes: Vec<i64>,
}

fn error_body(body: &[u8]) -> Option<ErrorBody> {
    serde_json::from_slice(body).ok()
}

fn has_code(body: &ErrorBody, code: i64) -> bool {
    body.error_codes.contains(&code)
        || body
            .error_description
            .starts_with(&format!("AADSTS{code}:"))
}

fn is_resource_error(body: &ErrorBody) -> bool {
    matches!(body.error.as_str(), "invalid_scope" | "invalid_resource")
        || has_code(body, 500_011)
        || has_code(body, 70_011)
}

/// Classifies an Entra ID error answer (reference/imds.md (a).11).
pub fn classify_entra(status: u16, body: &[u8], retry_after: Option<&str>) -> UpstreamError {
    let parsed = error_body(body);
    let description = || {
        parsed
            .as_ref()
            .map(|b| b.error_description.clone())
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| format!("Entra ID answered HTTP {status}"))
    };
    if status == 429 {
        return UpstreamError::Throttled {
            retry_after: retry_after_secs(retry_after),
            description: description(),
        };
    }
    if status == 408 || status >= 500 {
        return UpstreamError::unavailable(format!(
            "Entra ID answered HTTP {status}: {}",
            description()
        ));
    }
    match &parsed {
        Some(b) if is_resource_error(b) => UpstreamError::InvalidResource {
            description: description(),
        },
        Some(b)
            if matches!(
                b.error.as_str(),
                "invalid_client" | "unauthorized_client" | "invalid_grant"
            ) =>
        {
            UpstreamError::forbidden(description())
        }
        // Another 4xx (an unknown tenant, a malformed request): the identity as configured
        // cannot get tokens, and retrying will not change that.
        _ if (400..500).contains(&status) => UpstreamError::forbidden(description()),
        _ => UpstreamError::unavailable(format!("Entra ID answered HTTP {status}")),
    }
}

/// Classifies an error answer of the node's IMDS for a pod's type-0 identity.
pub fn classify_imds(status: u16, body: &[u8], retry_after: Option<&str>) -> UpstreamError {
    let parsed = error_body(body);
    let description = || {
        parsed
            .as_ref()
            .map(|b| b.error_description.clone())
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| format!("the node's IMDS answered HTTP {status}"))
    };
    match status {
        429 => UpstreamError::Throttled {
            retry_after: retry_after_secs(retry_after),
            description: description(),
        },
        400 if parsed.as_ref().is_some_and(is_resource_error) => UpstreamError::InvalidResource {
            description: description(),
        },
        // The identity is not attached to this node's VM (or scale set).
        400 if parsed.as_ref().is_some_and(|b| {
            b.error_description
                .to_ascii_lowercase()
                .contains("identity not found")
        }) =>
        {
            UpstreamError::forbidden(
                "The managed identity is not assigned to this node's virtual machine or scale set",
            )
        }
        400 | 401 | 403 => UpstreamError::forbidden(description()),
        _ => UpstreamError::unavailable(format!(
            "the node's IMDS answered HTTP {status}: {}",
            description()
        )),
    }
}

/// A managed-identity token answer of IMDS: strings (numbers accepted too).
#[derive(Debug, Deserialize)]
struct ImdsToken {
    access_token: String,
    expires_on: StringOrNumber,
    #[serde(default)]
    not_before: Option<StringOrNumber>,
    #[serde(default)]
    client_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StringOrNumber {
    String(String),
    Number(i64),
}

impl StringOrNumber {
    fn seconds(&self) -> Option<i64> {
        match self {
            Self::String(s) => s.trim().parse().ok(),
            Self::Number(n) => Some(*n),
        }
    }
}

/// Reads IMDS's token answer; `fetched_at` stands in for a missing `not_before`.
pub fn parse_imds_token(body: &[u8], fetched_at: i64) -> Result<Token, UpstreamError> {
    let bad = |why: &str| {
        UpstreamError::unavailable(format!(
            "the node's IMDS sent a token answer tokend cannot read: {why}"
        ))
    };
    let answer: ImdsToken = serde_json::from_slice(body).map_err(|e| bad(&e.to_string()))?;
    if answer.access_token.is_empty() {
        return Err(bad("empty access_token"));
    }
    let expires_on = answer
        .expires_on
        .seconds()
        .ok_or_else(|| bad("expires_on is not unix seconds"))?;
    let not_before = answer
        .not_before
        .as_ref()
        .and_then(StringOrNumber::seconds)
        .unwrap_or(fetched_at);
    Ok(Token::new(answer.access_token, expires_on, not_before).with_client_id(answer.client_id))
}

/// The value of a type-1 Secret: aad-pod-identity took the first value of its data, whatever
/// the key; Go map order is random, so here "first" is the first key in sorted order.
pub fn client_secret_of(data: &BTreeMap<String, ByteString>) -> Option<String> {
    data.values()
        .next()
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    r#type: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    r#type: &'static str,
    reason: &'static str,
}

/// The upstream metrics.
#[derive(Debug, Clone, Default)]
pub struct UpstreamMetrics {
    calls: Family<CallLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
}

const KINDS: [&str; 6] = ["0", "1", "2", "3", "node", "instance"];

impl UpstreamMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "upstream_calls",
            "Calls to Entra ID or the node's IMDS, by AzureIdentity type (node: exception pods; instance: the instance metadata proxy)",
            metrics.calls.clone(),
        );
        registry.register(
            "upstream_errors",
            "Failed upstream calls, by AzureIdentity type and reason",
            metrics.errors.clone(),
        );
        for kind in KINDS {
            metrics
                .calls
                .get_or_create(&CallLabels { r#type: kind })
                .inc_by(0);
        }
        metrics
    }

    fn call(&self, kind: &'static str) {
        self.calls.get_or_create(&CallLabels { r#type: kind }).inc();
    }

    fn error(&self, kind: &'static str, error: &UpstreamError) {
        self.errors
            .get_or_create(&ErrorLabels {
                r#type: kind,
                reason: error.reason(),
            })
            .inc();
    }
}

/// The Entra ID credential kinds (types 1, 2 and 3).
#[derive(Debug, Clone, Copy)]
enum EntraKind {
    Secret,
    Certificate,
    Federated,
}

fn kind_label(kind: Option<IdentityKind>) -> &'static str {
    match kind {
        Some(IdentityKind::UserAssignedMsi) => "0",
        Some(IdentityKind::ServicePrincipal) => "1",
        Some(IdentityKind::ServicePrincipalCertificate) => "2",
        Some(IdentityKind::Federated) => "3",
        None => "unknown",
    }
}

/// Everything upstream: Entra ID, the node's IMDS, and the Kubernetes API for Secrets and
/// service-account tokens.
pub struct Upstream {
    entra: Entra,
    imds: NodeImds,
    kube: kube::Client,
    authority: Url,
    permits: Arc<Semaphore>,
    metrics: UpstreamMetrics,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("entra", &self.entra)
            .field("imds", &self.imds)
            .field("authority", &self.authority)
            .field("permits", &self.permits.available_permits())
            .finish_non_exhaustive()
    }
}

impl Upstream {
    pub fn new(
        entra: Entra,
        imds: NodeImds,
        kube: kube::Client,
        authority: Url,
        inflight: usize,
        metrics: UpstreamMetrics,
    ) -> Self {
        Self {
            entra,
            imds,
            kube,
            authority,
            permits: Arc::new(Semaphore::new(inflight)),
            metrics,
        }
    }

    async fn permit(&self) -> Result<OwnedSemaphorePermit, UpstreamError> {
        match tokio::time::timeout(PERMIT_WAIT, Arc::clone(&self.permits).acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) | Err(_) => Err(UpstreamError::Busy),
        }
    }

    /// A token of `identity` for `resource`, for `pod` (type 3 binds its assertion to it);
    /// `forced` asks the node's IMDS to bypass its own cache too.
    pub async fn token(
        &self,
        identity: &IdentityRecord,
        pod: &PodInfo,
        resource: &str,
        forced: bool,
    ) -> Result<Token, UpstreamError> {
        let kind = kind_label(identity.kind());
        let _permit = self.permit().await?;
        self.metrics.call(kind);
        let result = self.fetch(identity, pod, resource, forced).await;
        if let Err(e) = &result {
            self.metrics.error(kind, e);
            warn!(
                identity = %identity.key,
                identity_type = kind,
                pod = %format!("{}/{}", pod.namespace, pod.name),
                reason = e.reason(),
                detail = e.detail(),
                "no token from upstream"
            );
        }
        result
    }

    async fn fetch(
        &self,
        identity: &IdentityRecord,
        pod: &PodInfo,
        resource: &str,
        forced: bool,
    ) -> Result<Token, UpstreamError> {
        let spec = &identity.identity.spec;
        let name = &identity.key;
        let Some(kind) = identity.kind() else {
            return Err(UpstreamError::forbidden(format!(
                "AzureIdentity {name} has type {}, which podid does not support",
                spec.type_
            )));
        };
        let entra_kind = match kind {
            IdentityKind::UserAssignedMsi => {
                let selector = match (&spec.client_id, &spec.resource_id) {
                    (Some(client_id), _) if !client_id.is_empty() => {
                        Selector::ClientId(client_id.clone())
                    }
                    (_, Some(resource_id)) if !resource_id.trim().is_empty() => {
                        Selector::ResourceId(resource_id.clone())
                    }
                    _ => {
                        return Err(UpstreamError::forbidden(format!(
                            "AzureIdentity {name} has neither clientID nor resourceID"
                        )));
                    }
                };
                return self.managed_identity(&selector, resource, forced).await;
            }
            IdentityKind::ServicePrincipal => EntraKind::Secret,
            IdentityKind::ServicePrincipalCertificate => EntraKind::Certificate,
            IdentityKind::Federated => EntraKind::Federated,
        };
        let client_id = spec
            .client_id
            .clone()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                UpstreamError::forbidden(format!("AzureIdentity {name} has no clientID"))
            })?;
        let tenant = spec
            .tenant_id
            .clone()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                UpstreamError::forbidden(format!("AzureIdentity {name} has no tenantID"))
            })?;
        let authority = match spec.ad_endpoint.as_deref().filter(|e| !e.trim().is_empty()) {
            Some(endpoint) => allowed_authority(endpoint, &self.authority).map_err(|why| {
                UpstreamError::forbidden(format!(
                    "AzureIdentity {name}: adEndpoint {endpoint:?} {why}"
                ))
            })?,
            None => self.authority.clone(),
        };
        let credential = match entra_kind {
            EntraKind::Secret => {
                let (secret_name, data) = self.secret(identity).await?;
                let secret = client_secret_of(&data).ok_or_else(|| {
                    UpstreamError::forbidden(format!(
                        "AzureIdentity {name}: Secret {secret_name} holds no UTF-8 value"
                    ))
                })?;
                EntraCredential::Secret(secret)
            }
            EntraKind::Certificate => {
                let (secret_name, data) = self.secret(identity).await?;
                let pkcs12 = data.get(CERTIFICATE_KEY).map(|v| v.0.clone()).ok_or_else(|| {
                    UpstreamError::forbidden(format!(
                        "AzureIdentity {name}: Secret {secret_name} has no key {CERTIFICATE_KEY:?}"
                    ))
                })?;
                let password = match data.get(PASSWORD_KEY) {
                    Some(v) => Some(String::from_utf8(v.0.clone()).map_err(|_| {
                        UpstreamError::forbidden(format!(
                            "AzureIdentity {name}: the {PASSWORD_KEY:?} of Secret {secret_name} is not UTF-8"
                        ))
                    })?),
                    None => None,
                };
                EntraCredential::Certificate {
                    pkcs12,
                    password,
                    secret: secret_name,
                }
            }
            EntraKind::Federated => EntraCredential::Assertion(self.assertion(pod).await?),
        };
        let scope = format!("{resource}/.default");
        self.entra
            .token(name, credential, &tenant, &client_id, &authority, &scope)
            .await
    }

    /// A type-0 token from the node's IMDS.
    async fn managed_identity(
        &self,
        selector: &Selector,
        resource: &str,
        forced: bool,
    ) -> Result<Token, UpstreamError> {
        let fetched_at = unix_now();
        let answer = self
            .imds
            .token(IMDS_API_VERSION, resource, Some(selector), forced)
            .await
            .map_err(|e| UpstreamError::unavailable(e.to_string()))?;
        if answer.status == 200 {
            parse_imds_token(&answer.body, fetched_at)
        } else {
            Err(classify_imds(
                answer.status,
                &answer.body,
                answer.retry_after.as_deref(),
            ))
        }
    }

    /// The referenced Secret's data (`clientPassword`; its namespace defaults to the
    /// identity's), named for errors. Never logged.
    async fn secret(
        &self,
        identity: &IdentityRecord,
    ) -> Result<(ObjKey, BTreeMap<String, ByteString>), UpstreamError> {
        let name = &identity.key;
        let reference = identity
            .identity
            .spec
            .client_password
            .as_ref()
            .and_then(|r| {
                r.name
                    .as_deref()
                    .filter(|n| !n.is_empty())
                    .map(|n| (n, r.namespace.as_deref()))
            })
            .ok_or_else(|| {
                UpstreamError::forbidden(format!(
                    "AzureIdentity {name} has no clientPassword Secret"
                ))
            })?;
        let secret_key = ObjKey::new(
            reference
                .1
                .filter(|n| !n.is_empty())
                .unwrap_or(&name.namespace),
            reference.0,
        );
        // Whoever may write an AzureIdentity in one namespace must not get tokend to use
        // another namespace's Secret as a credential (and so that namespace's identity).
        if secret_key.namespace != name.namespace {
            return Err(UpstreamError::forbidden(format!(
                "AzureIdentity {name}: clientPassword names Secret {secret_key} of another namespace; podid reads Secrets of the identity's own namespace only"
            )));
        }
        let api: Api<Secret> = Api::namespaced(self.kube.clone(), &secret_key.namespace);
        let secret = match tokio::time::timeout(KUBE_TIMEOUT, api.get(&secret_key.name)).await {
            Ok(Ok(secret)) => secret,
            Ok(Err(kube::Error::Api(status))) if status.code == 404 => {
                return Err(UpstreamError::forbidden(format!(
                    "AzureIdentity {name}: Secret {secret_key} does not exist"
                )));
            }
            Ok(Err(kube::Error::Api(status))) if status.code == 403 => {
                return Err(UpstreamError::forbidden(format!(
                    "AzureIdentity {name}: podid-tokend may not read Secret {secret_key}"
                )));
            }
            Ok(Err(e)) => {
                return Err(UpstreamError::unavailable(format!(
                    "reading Secret {secret_key}: {e}"
                )));
            }
            Err(_) => {
                return Err(UpstreamError::unavailable(format!(
                    "reading Secret {secret_key}: no answer from the Kubernetes API in {}s",
                    KUBE_TIMEOUT.as_secs()
                )));
            }
        };
        let data = secret.data.unwrap_or_default();
        if data.is_empty() {
            return Err(UpstreamError::forbidden(format!(
                "AzureIdentity {name}: Secret {secret_key} has no data"
            )));
        }
        Ok((secret_key, data))
    }

    /// A short service-account token for the pod (audience `api://AzureADTokenExchange`,
    /// bound to the pod), the client assertion of a federated identity.
    async fn assertion(&self, pod: &PodInfo) -> Result<String, UpstreamError> {
        let account = ObjKey::new(&pod.namespace, &pod.service_account);
        let api: Api<ServiceAccount> = Api::namespaced(self.kube.clone(), &pod.namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![TOKEN_EXCHANGE_AUDIENCE.to_owned()],
                expiration_seconds: Some(ASSERTION_SECONDS),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(pod.name.clone()),
                    uid: Some(pod.uid.clone()),
                }),
            },
            ..Default::default()
        };
        let created = tokio::time::timeout(
            KUBE_TIMEOUT,
            api.create_token_request(&pod.service_account, &PostParams::default(), &request),
        )
        .await;
        match created {
            Ok(Ok(answer)) => answer
                .status
                .map(|s| s.token)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    UpstreamError::unavailable(format!(
                        "the TokenRequest of service account {account} returned no token"
                    ))
                }),
            Ok(Err(kube::Error::Api(status))) if (400..500).contains(&status.code) => {
                Err(UpstreamError::forbidden(format!(
                    "no token for service account {account} of pod {}/{}: {}",
                    pod.namespace, pod.name, status.message
                )))
            }
            Ok(Err(e)) => Err(UpstreamError::unavailable(format!(
                "TokenRequest of service account {account}: {e}"
            ))),
            Err(_) => Err(UpstreamError::unavailable(format!(
                "TokenRequest of service account {account}: no answer from the Kubernetes API in {}s",
                KUBE_TIMEOUT.as_secs()
            ))),
        }
    }

    /// An exception pod's request, passed to the node's IMDS with its selector; IMDS's
    /// answer goes back as it came.
    pub async fn node_token(&self, request: &PodTokenRequest) -> Result<Relayed, UpstreamError> {
        let _permit = self.permit().await?;
        self.metrics.call("node");
        let answer = self
            .imds
            .token(
                &request.api_version,
                &request.resource,
                request.selector.as_ref(),
                request.bypass_cache,
            )
            .await
            .map_err(|e| {
                let error = UpstreamError::unavailable(e.to_string());
                self.metrics.error("node", &error);
                warn!(detail = error.detail(), "no answer from the node's IMDS");
                error
            })?;
        Ok(relayed(answer))
    }

    /// An instance metadata request, passed to the node's IMDS.
    pub async fn instance_metadata(
        &self,
        request: &MetadataRequest,
    ) -> Result<Relayed, UpstreamError> {
        let _permit = self.permit().await?;
        self.metrics.call("instance");
        let answer = self
            .imds
            .metadata(&request.path, request.query.as_deref())
            .await
            .map_err(|e| {
                let error = UpstreamError::unavailable(e.to_string());
                self.metrics.error("instance", &error);
                warn!(detail = error.detail(), "no answer from the node's IMDS");
                error
            })?;
        Ok(relayed(answer))
    }
}

fn relayed(answer: ImdsAnswer) -> Relayed {
    Relayed {
        status: hyper::StatusCode::from_u16(answer.status)
            .unwrap_or(hyper::StatusCode::BAD_GATEWAY),
        content_type: answer.content_type,
        retry_after: answer.retry_after,
        body: answer.body,
    }
}

/// The authority hosts of Azure's clouds (public, US Government, China, Germany).
const CLOUD_AUTHORITIES: [&str; 4] = [
    "login.microsoftonline.com",
    "login.microsoftonline.us",
    "login.chinacloudapi.cn",
    "login.microsoftonline.de",
];

/// An identity's `adEndpoint` as the authority to use: one of Azure's clouds or
/// `--authority-host`, nothing else, so that an AzureIdentity cannot send its credential
/// (a Secret's value) to a host of its writer's choosing.
pub fn allowed_authority(endpoint: &str, configured: &Url) -> Result<Url, &'static str> {
    let url = authority_of(endpoint)?;
    let host = url.host_str().unwrap_or_default();
    let cloud = url.port().is_none()
        && CLOUD_AUTHORITIES
            .iter()
            .any(|c| c.eq_ignore_ascii_case(host));
    let same_origin = url.origin() == configured.origin();
    if cloud || same_origin {
        Ok(url)
    } else {
        Err("is neither an Azure cloud's authority host nor --authority-host")
    }
}

/// An identity's `adEndpoint` as an authority host: https, no path, query or credentials.
pub fn authority_of(endpoint: &str) -> Result<Url, &'static str> {
    let url = Url::parse(endpoint.trim()).map_err(|_| "is not a URL")?;
    if url.scheme() != "https" {
        return Err("must use https");
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host");
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err("must be a plain https://host URL");
    }
    let mut url = url;
    url.set_path("/");
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aad(status: u16, error: &str, code: i64, message: &str) -> (u16, Vec<u8>) {
        // Real Entra descriptions end in \r\n-separated trace lines.
        let body = serde_json::json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {message}\r\nTrace ID: 1\r\nCorrelation ID: 2\r\nTimestamp: 2026-01-01 00:00:00Z"),
            "error_codes": [code],
            "trace_id": "1",
        });
        (status, serde_json::to_vec(&body).unwrap())
    }

    #[test]
    fn entra_errors_by_what_entra_said() {
        for (status, error, code, expected) in [
            (400, "invalid_scope", 70011, "invalid_resource"),
            (400, "invalid_resource", 500011, "invalid_resource"),
            (400, "invalid_request", 500011, "invalid_resource"),
            (401, "invalid_client", 7000215, "forbidden"),
            (400, "unauthorized_client", 700016, "forbidden"),
            (400, "invalid_grant", 70021, "forbidden"),
            (400, "invalid_request", 90002, "forbidden"),
            (500, "server_error", 50000, "unavailable"),
            (503, "temporarily_unavailable", 90033, "unavailable"),
            (429, "temporarily_unavailable", 90055, "throttled"),
        ] {
            let (status, body) = aad(status, error, code, "message");
            let classified = classify_entra(status, &body, Some("7"));
            assert_eq!(classified.reason(), expected, "{status} {error} {code}");
        }
    }

    #[test]
    fn entra_descriptions_with_crlf_are_kept_whole() {
        let (status, body) = aad(
            401,
            "invalid_client",
            7000215,
            "Invalid client secret provided.",
        );
        match classify_entra(status, &body, None) {
            UpstreamError::Forbidden { description } => {
                assert!(
                    description.starts_with(
                        "AADSTS7000215: Invalid client secret provided.\r\nTrace ID: 1"
                    )
                );
            }
            other => panic!("{other:?}"),
        }
        let (status, body) = aad(400, "invalid_scope", 70011, "The scope x is not valid.");
        match classify_entra(status, &body, None) {
            UpstreamError::InvalidResource { description } => assert!(
                description.starts_with("AADSTS70011: The scope x is not valid.\r\nTrace ID: 1")
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn throttling_keeps_retry_after() {
        let (status, body) = aad(429, "temporarily_unavailable", 90055, "slow down");
        assert_eq!(
            classify_entra(status, &body, Some("17")),
            UpstreamError::Throttled {
                retry_after: 17,
                description: "AADSTS90055: slow down\r\nTrace ID: 1\r\nCorrelation ID: 2\r\nTimestamp: 2026-01-01 00:00:00Z".into(),
            }
        );
        assert!(matches!(
            classify_entra(429, b"", None),
            UpstreamError::Throttled { retry_after: 5, .. }
        ));
        assert_eq!(retry_after_secs(Some("0")), 1);
        assert_eq!(retry_after_secs(Some("Wed, 21 Oct 2015 07:28:00 GMT")), 5);
    }

    #[test]
    fn unreadable_error_bodies_are_classified_by_status() {
        assert_eq!(classify_entra(502, b"<html>", None).reason(), "unavailable");
        assert_eq!(classify_entra(400, b"<html>", None).reason(), "forbidden");
        assert_eq!(classify_entra(408, b"", None).reason(), "unavailable");
    }

    #[test]
    fn imds_errors() {
        let body = |error: &str, description: &str| {
            serde_json::to_vec(
                &serde_json::json!({"error": error, "error_description": description}),
            )
            .unwrap()
        };
        assert_eq!(
            classify_imds(400, &body("invalid_request", "Identity not found"), None),
            UpstreamError::forbidden(
                "The managed identity is not assigned to this node's virtual machine or scale set"
            )
        );
        assert_eq!(
            classify_imds(400, &body("invalid_resource", "AADSTS500011: nope"), None).reason(),
            "invalid_resource"
        );
        assert!(matches!(
            classify_imds(429, &body("too_many_requests", "x"), Some("3")),
            UpstreamError::Throttled { retry_after: 3, .. }
        ));
        for status in [404, 410, 500, 503] {
            assert_eq!(
                classify_imds(status, b"{}", None).reason(),
                "unavailable",
                "{status}"
            );
        }
    }

    #[test]
    fn imds_token_answers() {
        let body = br#"{"access_token":"t","client_id":"c","expires_in":"3599","expires_on":"1700003600","ext_expires_in":"3599","not_before":"1700000000","resource":"r","token_type":"Bearer"}"#;
        let token = parse_imds_token(body, 5).unwrap();
        assert_eq!(
            (token.expires_on, token.not_before),
            (1_700_003_600, 1_700_000_000)
        );
        assert_eq!(token.client_id.as_deref(), Some("c"));
        let numeric = br#"{"access_token":"t","expires_on":1700003600}"#;
        let token = parse_imds_token(numeric, 5).unwrap();
        assert_eq!((token.expires_on, token.not_before), (1_700_003_600, 5));
        for bad in [
            &br#"{"access_token":"t","expires_on":"soon"}"#[..],
            b"{}",
            b"nope",
            br#"{"access_token":"","expires_on":1}"#,
        ] {
            assert_eq!(
                parse_imds_token(bad, 5).unwrap_err().reason(),
                "unavailable"
            );
        }
    }

    #[test]
    fn the_first_value_in_key_order_is_the_secret() {
        let data: BTreeMap<String, ByteString> = [
            ("zz".to_owned(), ByteString(b"last".to_vec())),
            ("clientSecret".to_owned(), ByteString(b"first".to_vec())),
        ]
        .into();
        assert_eq!(client_secret_of(&data).as_deref(), Some("first"));
        assert_eq!(client_secret_of(&BTreeMap::new()), None);
    }

    #[test]
    fn ad_endpoints() {
        assert_eq!(
            authority_of("https://login.microsoftonline.us/")
                .unwrap()
                .as_str(),
            "https://login.microsoftonline.us/"
        );
        assert_eq!(
            authority_of(" https://login.chinacloudapi.cn/some/path ")
                .unwrap()
                .as_str(),
            "https://login.chinacloudapi.cn/"
        );
        assert_eq!(authority_of("http://login.example"), Err("must use https"));
        assert_eq!(authority_of("login"), Err("is not a URL"));
        let configured = Url::parse("https://login.private.example:8443").unwrap();
        for ok in [
            "https://login.microsoftonline.us/",
            "https://LOGIN.chinacloudapi.cn",
            "https://login.private.example:8443/",
        ] {
            assert!(allowed_authority(ok, &configured).is_ok(), "{ok}");
        }
        for refused in [
            "https://attacker.example/",
            "https://login.microsoftonline.com.attacker.example",
            "https://login.microsoftonline.com:8443",
            "https://login.private.example",
        ] {
            assert_eq!(
                allowed_authority(refused, &configured),
                Err("is neither an Azure cloud's authority host nor --authority-host"),
                "{refused}"
            );
        }
    }
}
