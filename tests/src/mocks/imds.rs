//! Mock node IMDS: the instance metadata service of the VM a node runs on, as tokend reaches it
//! (plain HTTP, normally 169.254.169.254:80). It answers managed-identity token requests for the
//! identities attached to the VM, `/metadata/instance`, `/metadata/versions` and
//! `/metadata/identity/info`, in IMDS's exact shapes (all-string token fields, its error bodies),
//! and caches tokens per identity and resource as IMDS does.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::fault::{Fault, FaultQueue, FaultTarget};
use super::jwt;
use super::resources::KnownResources;
use super::server::{self, Handler, Reply, Running, StartError};
use super::util::{guid, json_bytes, now_unix, response};

/// Managed-identity tokens are valid for a day.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(86_399);
/// Oldest api-version of the identity endpoint (`/metadata/instance` goes back further).
pub const MIN_IDENTITY_API_VERSION: &str = "2018-02-01";
const MIN_INSTANCE_API_VERSION: &str = "2017-03-01";
/// Versions `/metadata/versions` lists.
const API_VERSIONS: [&str; 30] = [
    "2017-03-01",
    "2017-04-02",
    "2017-08-01",
    "2017-10-01",
    "2017-12-01",
    "2018-02-01",
    "2018-04-02",
    "2018-10-01",
    "2019-02-01",
    "2019-03-11",
    "2019-04-30",
    "2019-06-01",
    "2019-06-04",
    "2019-08-01",
    "2019-08-15",
    "2019-11-01",
    "2020-06-01",
    "2020-07-15",
    "2020-09-01",
    "2020-10-01",
    "2020-12-01",
    "2021-01-01",
    "2021-02-01",
    "2021-03-01",
    "2021-05-01",
    "2021-10-01",
    "2021-11-01",
    "2021-11-15",
    "2021-12-13",
    "2023-07-01",
];
const JSON: &str = "application/json; charset=utf-8";
/// The `Server` header real IMDS sends.
const SERVER: &str = "IMDS/150.870.65.1015";
/// A cached token is served again while it has more than this left (or half its lifetime).
const CACHE_MARGIN: i64 = 300;

/// A managed identity: what selects it in a token request and what its tokens carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedIdentity {
    pub client_id: String,
    pub object_id: String,
    /// ARM id: `/subscriptions/…/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>`
    /// for a user-assigned identity, the VM's own id for the system-assigned one.
    pub resource_id: String,
}

impl ManagedIdentity {
    pub fn new(client_id: &str, object_id: &str, resource_id: &str) -> Self {
        Self {
            client_id: client_id.to_string(),
            object_id: object_id.to_string(),
            resource_id: resource_id.to_string(),
        }
    }

    /// A user-assigned identity `name` in the VM's subscription and resource group, with new
    /// random client and object ids.
    pub fn user_assigned(instance: &InstanceMetadata, name: &str) -> Self {
        Self::new(
            &guid(),
            &guid(),
            &format!(
                "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}",
                instance.subscription_id, instance.resource_group
            ),
        )
    }

    /// The VM's system-assigned identity, with new random ids.
    pub fn system_assigned(instance: &InstanceMetadata) -> Self {
        Self::new(&guid(), &guid(), &instance.resource_id())
    }
}

/// What `/metadata/instance` describes: an AKS node of a scale set by default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstanceMetadata {
    pub name: String,
    pub location: String,
    pub subscription_id: String,
    pub resource_group: String,
    pub vm_scale_set_name: String,
    pub vm_id: String,
    pub vm_size: String,
    pub private_ip: String,
    pub subnet_address: String,
    pub subnet_prefix: String,
    pub mac_address: String,
}

impl Default for InstanceMetadata {
    fn default() -> Self {
        Self {
            name: "aks-nodepool1-12345678-vmss000000".into(),
            location: "westeurope".into(),
            subscription_id: "9b8f3c1e-5a2d-4e7f-8c6b-1d0a9e3f5b72".into(),
            resource_group: "MC_podid-rg_podid-aks_westeurope".into(),
            vm_scale_set_name: "aks-nodepool1-12345678-vmss".into(),
            vm_id: "4c7a2e91-3b5d-4f08-a6c1-8e2d9f0b7a35".into(),
            vm_size: "Standard_D4s_v3".into(),
            private_ip: "10.224.0.4".into(),
            subnet_address: "10.224.0.0".into(),
            subnet_prefix: "16".into(),
            mac_address: "000D3A2B4C5D".into(),
        }
    }
}

impl InstanceMetadata {
    /// The VM's ARM id (a scale-set instance when `vm_scale_set_name` is set).
    pub fn resource_id(&self) -> String {
        let base = format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute",
            self.subscription_id, self.resource_group
        );
        match self.name.strip_prefix(&self.vm_scale_set_name) {
            Some(suffix) if !self.vm_scale_set_name.is_empty() => {
                let index = u64::from_str_radix(suffix, 36).unwrap_or(0);
                format!(
                    "{base}/virtualMachineScaleSets/{}/virtualMachines/{index}",
                    self.vm_scale_set_name
                )
            }
            _ => format!("{base}/virtualMachines/{}", self.name),
        }
    }

    /// The `/metadata/instance` document: every leaf is a string, as IMDS writes them.
    pub fn document(&self) -> Value {
        json!({
            "compute": {
                "azEnvironment": "AzurePublicCloud",
                "isHostCompatibilityLayerVm": "false",
                "location": self.location,
                "name": self.name,
                "offer": "",
                "osProfile": {
                    "adminUsername": "azureuser",
                    "computerName": self.name,
                    "disablePasswordAuthentication": "true",
                },
                "osType": "Linux",
                "placementGroupId": "",
                "platformFaultDomain": "0",
                "platformUpdateDomain": "0",
                "provider": "Microsoft.Compute",
                "publisher": "",
                "resourceGroupName": self.resource_group,
                "resourceId": self.resource_id(),
                "sku": "",
                "subscriptionId": self.subscription_id,
                "tags": "",
                "tagsList": [],
                "version": "",
                "vmId": self.vm_id,
                "vmScaleSetName": self.vm_scale_set_name,
                "vmSize": self.vm_size,
                "zone": "",
            },
            "network": {
                "interface": [{
                    "ipv4": {
                        "ipAddress": [{"privateIpAddress": self.private_ip, "publicIpAddress": ""}],
                        "subnet": [{"address": self.subnet_address, "prefix": self.subnet_prefix}],
                    },
                    "ipv6": {"ipAddress": []},
                    "macAddress": self.mac_address,
                }],
            },
        })
    }
}

/// The identity selector of a token request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    ClientId(String),
    ObjectId(String),
    ResourceId(String),
}

impl Selector {
    fn matches(&self, identity: &ManagedIdentity) -> bool {
        match self {
            Selector::ClientId(id) => id.eq_ignore_ascii_case(&identity.client_id),
            Selector::ObjectId(id) => id.eq_ignore_ascii_case(&identity.object_id),
            Selector::ResourceId(id) => id.trim().eq_ignore_ascii_case(identity.resource_id.trim()),
        }
    }
}

/// Which endpoint a request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImdsRoute {
    Token,
    Instance,
    Versions,
    IdentityInfo,
    PlatformMetadata,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImdsOutcome {
    /// A token; `cached` when IMDS served one it had issued before.
    Issued {
        cached: bool,
    },
    /// A non-token 200 (instance metadata, versions, identity info).
    Served,
    Rejected {
        status: u16,
        error: String,
    },
    /// A forced status or raw answer from the fault queue.
    Injected {
        status: u16,
    },
    /// The connection was reset by the fault queue.
    Reset,
}

/// One request as the log keeps it (never a token).
#[derive(Debug, Clone)]
pub struct ImdsRequest {
    pub at: SystemTime,
    pub method: String,
    /// The path as sent, without the query.
    pub path: String,
    pub route: ImdsRoute,
    /// `Metadata: true` was present.
    pub metadata_header: bool,
    pub api_version: Option<String>,
    pub resource: Option<String>,
    pub selector: Option<Selector>,
    /// Client id of the identity the request resolved to.
    pub identity: Option<String>,
    pub delayed: Option<Duration>,
    pub outcome: ImdsOutcome,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImdsStats {
    pub requests: u64,
    /// Tokens newly minted.
    pub issued: u64,
    /// Tokens served again from IMDS's cache.
    pub cached: u64,
    pub served: u64,
    pub rejected: u64,
    pub injected: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    issued: AtomicU64,
    cached: AtomicU64,
    served: AtomicU64,
    rejected: AtomicU64,
    injected: AtomicU64,
}

#[derive(Debug, Clone)]
struct CachedToken {
    access_token: String,
    not_before: i64,
    expires_on: i64,
}

#[derive(Debug)]
struct Node {
    tenant: String,
    system: Option<ManagedIdentity>,
    attached: Vec<ManagedIdentity>,
    instance: InstanceMetadata,
    resources: KnownResources,
    token_lifetime: Duration,
    cache_tokens: bool,
    /// (client id in lower case, resource as sent) → token
    cache: HashMap<(String, String), CachedToken>,
}

impl Node {
    /// With a selector, the attached identity it names; without, the system-assigned identity,
    /// else the only user-assigned one (IMDS needs a selector only when there are several).
    fn resolve(&self, selector: Option<&Selector>) -> Option<ManagedIdentity> {
        let mut all = self.system.iter().chain(self.attached.iter());
        match selector {
            Some(selector) => all.find(|i| selector.matches(i)).cloned(),
            None => self
                .system
                .clone()
                .or_else(|| match self.attached.as_slice() {
                    [only] => Some(only.clone()),
                    _ => None,
                }),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // a panicking test thread must not take the mock down with it
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An IMDS error answer.
#[derive(Debug)]
struct ImdsError {
    status: u16,
    body: Value,
}

impl ImdsError {
    fn new(status: u16, error: &str, description: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({"error": error, "error_description": description.into()}),
        }
    }

    fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(400, "invalid_request", description)
    }

    /// `/metadata/instance` errors carry one `error` string (and the versions on a bad one).
    fn instance(status: u16, error: &str, with_versions: bool) -> Self {
        let mut body = json!({"error": error});
        if with_versions {
            body["newest-versions"] = json!(newest_versions());
        }
        Self { status, body }
    }

    /// The body IMDS sends for a status forced by fault injection.
    fn injected(status: u16) -> Self {
        let (error, description) = match status {
            404 => ("not_found", "IMDS endpoint is updating"),
            410 => ("service_unavailable", "IMDS endpoint is updating"),
            429 => ("too_many_requests", "Too many requests"),
            500 => (
                "unknown",
                "Failed to retrieve token from the Active directory. For details see logs in /var/log/azure",
            ),
            502 | 504 => ("server_error", "Gateway error"),
            503 => (
                "service_unavailable",
                "The service is temporarily unavailable",
            ),
            400..=499 => ("bad_request", "Bad request"),
            _ => ("server_error", "Internal server error"),
        };
        Self::new(status, error, description)
    }

    fn error(&self) -> String {
        self.body["error"].as_str().unwrap_or_default().to_string()
    }
}

fn newest_versions() -> Vec<&'static str> {
    API_VERSIONS.iter().rev().take(3).copied().collect()
}

fn json_response(status: u16, body: &Value, retry_after: Option<u64>) -> Response<Full<Bytes>> {
    let mut headers = vec![("server", SERVER.to_string())];
    if let Some(seconds) = retry_after {
        headers.push(("retry-after", seconds.to_string()));
    }
    response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        JSON,
        &headers,
        json_bytes(body),
    )
}

/// `YYYY-MM-DD`, not older than `min` (compared as text, which orders ISO dates).
fn api_version_ok(version: &str, min: &str) -> bool {
    let shape = version.len() == 10
        && version.bytes().enumerate().all(|(i, c)| match i {
            4 | 7 => c == b'-',
            _ => c.is_ascii_digit(),
        });
    shape && version >= min
}

/// Repeated slashes collapsed, one trailing slash dropped.
fn normalize(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

fn route_of(lower: &str) -> ImdsRoute {
    match lower {
        "/metadata/identity/oauth2/token" => ImdsRoute::Token,
        "/metadata/identity/getplatformmetadata" => ImdsRoute::PlatformMetadata,
        "/metadata/identity/info" => ImdsRoute::IdentityInfo,
        "/metadata/versions" => ImdsRoute::Versions,
        p if p == "/metadata/instance" || p.starts_with("/metadata/instance/") => {
            ImdsRoute::Instance
        }
        _ => ImdsRoute::Other,
    }
}

struct ImdsState {
    node: Mutex<Node>,
    faults: Mutex<FaultQueue>,
    log: Mutex<Vec<ImdsRequest>>,
    counters: Counters,
}

/// What the token handler decided, before it is logged.
enum TokenAnswer {
    Token { body: Value, cached: bool },
    Error(ImdsError),
}

impl ImdsState {
    fn record(&self, entry: ImdsRequest) {
        let counter = match entry.outcome {
            ImdsOutcome::Issued { cached: false } => &self.counters.issued,
            ImdsOutcome::Issued { cached: true } => &self.counters.cached,
            ImdsOutcome::Served => &self.counters.served,
            ImdsOutcome::Rejected { .. } => &self.counters.rejected,
            ImdsOutcome::Injected { .. } | ImdsOutcome::Reset => &self.counters.injected,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        lock(&self.log).push(entry);
    }

    fn token(&self, identity: &ManagedIdentity, resource: &str, bypass_cache: bool) -> TokenAnswer {
        let mut node = lock(&self.node);
        if !node.resources.contains(resource) {
            return TokenAnswer::Error(ImdsError::new(
                400,
                "invalid_resource",
                format!(
                    "AADSTS50001: The application named {resource} was not found in the tenant named {}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant.",
                    node.tenant
                ),
            ));
        }
        let now = now_unix();
        let lifetime = i64::try_from(node.token_lifetime.as_secs()).unwrap_or(i64::MAX / 2);
        let margin = CACHE_MARGIN.min(lifetime / 2);
        let key = (
            identity.client_id.to_ascii_lowercase(),
            resource.to_string(),
        );
        let reusable = node
            .cache
            .get(&key)
            .filter(|t| node.cache_tokens && !bypass_cache && t.expires_on - now > margin)
            .cloned();
        let (token, cached) = match reusable {
            Some(token) => (token, true),
            None => {
                let token = mint(&node.tenant, identity, resource, now, lifetime);
                node.cache.insert(key, token.clone());
                (token, false)
            }
        };
        let expires_in = (token.expires_on - now).to_string();
        let body = json!({
            "access_token": token.access_token,
            "client_id": identity.client_id,
            "expires_in": expires_in,
            "expires_on": token.expires_on.to_string(),
            "ext_expires_in": expires_in,
            "not_before": token.not_before.to_string(),
            "resource": resource,
            "token_type": "Bearer",
        });
        TokenAnswer::Token { body, cached }
    }
}

/// A JWT-shaped v1 access token for a managed identity, as Entra issues them through IMDS.
fn mint(
    tenant: &str,
    identity: &ManagedIdentity,
    resource: &str,
    now: i64,
    lifetime: i64,
) -> CachedToken {
    let issuer = format!("https://sts.windows.net/{tenant}/");
    let expires_on = now + lifetime;
    let claims = json!({
        "aud": resource,
        "iss": issuer,
        "iat": now,
        "nbf": now,
        "exp": expires_on,
        "appid": identity.client_id,
        "appidacr": "2",
        "azp": identity.client_id,
        "azpacr": "2",
        "idp": issuer,
        "idtyp": "app",
        "oid": identity.object_id,
        "sub": identity.object_id,
        "tid": tenant,
        "uti": jwt::b64url(guid().as_bytes()).get(..22).unwrap_or_default(),
        "ver": "1.0",
        "xms_mirid": identity.resource_id,
    });
    let header = json!({"alg": "RS256", "typ": "JWT"});
    CachedToken {
        access_token: jwt::placeholder_signed(&header, &claims),
        not_before: now,
        expires_on,
    }
}

/// Query parameters in order; `None` when a name repeats (IMDS rejects duplicates).
fn parse_query(query: &str) -> Result<Vec<(String, String)>, String> {
    let mut params: Vec<(String, String)> = Vec::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if params.iter().any(|(k, _)| k == key.as_ref()) {
            return Err(key.into_owned());
        }
        params.push((key.into_owned(), value.into_owned()));
    }
    Ok(params)
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `client_id`, `object_id` or `msi_res_id` (the spellings IMDS documents); empty ones ignored.
fn selector_of(params: &[(String, String)]) -> Result<Option<Selector>, ImdsError> {
    let given: Vec<Selector> = [
        ("client_id", Selector::ClientId as fn(String) -> Selector),
        ("object_id", Selector::ObjectId),
        ("msi_res_id", Selector::ResourceId),
    ]
    .into_iter()
    .filter_map(|(name, make)| {
        param(params, name)
            .filter(|v| !v.is_empty())
            .map(|v| make(v.to_string()))
    })
    .collect();
    match given.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.clone())),
        _ => Err(ImdsError::invalid_request(
            "Multiple identity selectors were specified. Specify only one of client_id, object_id or msi_res_id",
        )),
    }
}

/// The leaf or subtree of the instance document at `segments` (array items by index).
fn instance_subtree<'a>(doc: &'a Value, segments: &[&str]) -> Option<&'a Value> {
    segments.iter().try_fold(doc, |node, segment| match node {
        Value::Object(map) => map
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(segment))
            .map(|(_, v)| v),
        Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

impl Handler for ImdsState {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Reply {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let path = normalize(req.uri().path());
        let lower = path.to_ascii_lowercase();
        let route = route_of(&lower);
        let metadata_header = req
            .headers()
            .get("metadata")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let mut entry = ImdsRequest {
            at: SystemTime::now(),
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            route,
            metadata_header,
            api_version: None,
            resource: None,
            selector: None,
            identity: None,
            delayed: None,
            outcome: ImdsOutcome::Served,
        };
        let reply = self.answer(&req, &path, &mut entry).await;
        match reply {
            Answer::Reply(status, body, retry_after) => {
                if entry.outcome == ImdsOutcome::Served && status != 200 {
                    entry.outcome = ImdsOutcome::Rejected {
                        status,
                        error: body["error"].as_str().unwrap_or_default().to_string(),
                    };
                }
                self.record(entry);
                Reply::Response(json_response(status, &body, retry_after))
            }
            Answer::Text(text) => {
                self.record(entry);
                Reply::Response(response(
                    StatusCode::OK,
                    "text/plain; charset=utf-8",
                    &[("server", SERVER.to_string())],
                    text,
                ))
            }
            Answer::Raw(status, content_type, body) => {
                self.record(entry);
                Reply::Response(response(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    &content_type,
                    &[],
                    body,
                ))
            }
            Answer::Reset => {
                self.record(entry);
                Reply::Reset
            }
        }
    }
}

/// A decided answer; the outcome is already in the log entry unless it is a plain reply.
enum Answer {
    Reply(u16, Value, Option<u64>),
    Text(String),
    Raw(u16, String, Vec<u8>),
    Reset,
}

impl Answer {
    fn error(err: ImdsError) -> Self {
        Answer::Reply(err.status, err.body, None)
    }
}

impl ImdsState {
    /// Applies a fault; `None` means carry on (after any delay).
    async fn apply_fault(&self, fault: Option<Fault>, entry: &mut ImdsRequest) -> Option<Answer> {
        match fault? {
            Fault::Delay(delay) => {
                tokio::time::sleep(delay).await;
                entry.delayed = Some(delay);
                None
            }
            Fault::Reset => {
                entry.outcome = ImdsOutcome::Reset;
                Some(Answer::Reset)
            }
            Fault::Status {
                status,
                retry_after,
            } => {
                entry.outcome = ImdsOutcome::Injected { status };
                let err = ImdsError::injected(status);
                Some(Answer::Reply(err.status, err.body, retry_after))
            }
            Fault::Raw {
                status,
                content_type,
                body,
            } => {
                entry.outcome = ImdsOutcome::Injected { status };
                Some(Answer::Raw(status, content_type, body))
            }
        }
    }

    async fn answer(&self, req: &Request<Incoming>, path: &str, entry: &mut ImdsRequest) -> Answer {
        let lower = path.to_ascii_lowercase();
        if entry.route == ImdsRoute::PlatformMetadata {
            // IMDS has no v2 platform metadata here; a 400 would read as "IMDSv2 present"
            return Answer::Reply(404, json!({"error": "not_found"}), None);
        }
        if lower != "/metadata" && !lower.starts_with("/metadata/") {
            return Answer::Reply(
                404,
                json!({"error": "not_found", "error_description": "The requested path was not found"}),
                None,
            );
        }
        if req.method() != Method::GET {
            return Answer::Reply(
                405,
                json!({"error": "method_not_allowed", "error_description": "The HTTP method is not allowed"}),
                None,
            );
        }
        if !entry.metadata_header {
            return Answer::error(ImdsError::invalid_request(
                "Required metadata header not specified",
            ));
        }
        if req.headers().contains_key("x-forwarded-for") {
            return Answer::error(ImdsError::invalid_request(
                "Request contains X-Forwarded-For header",
            ));
        }
        let params = match parse_query(req.uri().query().unwrap_or_default()) {
            Ok(params) => params,
            Err(name) => {
                return Answer::error(ImdsError::invalid_request(format!(
                    "Duplicate query parameter '{name}'"
                )));
            }
        };
        entry.api_version = param(&params, "api-version").map(str::to_string);
        match entry.route {
            ImdsRoute::Token => self.token_route(&params, entry).await,
            ImdsRoute::Instance => self.instance_route(&lower, &params, entry).await,
            ImdsRoute::Versions => Answer::Reply(200, json!({"apiVersions": API_VERSIONS}), None),
            ImdsRoute::IdentityInfo => {
                if !entry
                    .api_version
                    .as_deref()
                    .is_some_and(|v| api_version_ok(v, MIN_IDENTITY_API_VERSION))
                {
                    return Answer::error(ImdsError::invalid_request(
                        "api-version is invalid or was not specified in the request",
                    ));
                }
                let tenant = lock(&self.node).tenant.clone();
                Answer::Reply(200, json!({"tenantId": tenant}), None)
            }
            ImdsRoute::PlatformMetadata | ImdsRoute::Other => Answer::Reply(
                404,
                json!({"error": "not_found", "error_description": "The requested path was not found"}),
                None,
            ),
        }
    }

    async fn token_route(&self, params: &[(String, String)], entry: &mut ImdsRequest) -> Answer {
        if !entry
            .api_version
            .as_deref()
            .is_some_and(|v| api_version_ok(v, MIN_IDENTITY_API_VERSION))
        {
            return Answer::error(ImdsError::invalid_request(
                "api-version is invalid or was not specified in the request",
            ));
        }
        let fault = lock(&self.faults).take(None, true);
        if let Some(answer) = self.apply_fault(fault, entry).await {
            return answer;
        }
        let resource = param(params, "resource").filter(|r| !r.is_empty());
        entry.resource = resource.map(str::to_string);
        let Some(resource) = resource else {
            return Answer::error(ImdsError::invalid_request(
                "Required query variable 'resource' is missing",
            ));
        };
        let selector = match selector_of(params) {
            Ok(selector) => selector,
            Err(err) => return Answer::error(err),
        };
        entry.selector = selector.clone();
        let Some(identity) = lock(&self.node).resolve(selector.as_ref()) else {
            return Answer::error(ImdsError::invalid_request("Identity not found"));
        };
        entry.identity = Some(identity.client_id.clone());
        let fault = lock(&self.faults).take(Some(&identity.client_id), false);
        if let Some(answer) = self.apply_fault(fault, entry).await {
            return answer;
        }
        let bypass_cache = param(params, "bypass_cache") == Some("true");
        match self.token(&identity, resource, bypass_cache) {
            TokenAnswer::Token { body, cached } => {
                entry.outcome = ImdsOutcome::Issued { cached };
                Answer::Reply(200, body, None)
            }
            TokenAnswer::Error(err) => {
                entry.outcome = ImdsOutcome::Rejected {
                    status: err.status,
                    error: err.error(),
                };
                Answer::error(err)
            }
        }
    }

    async fn instance_route(
        &self,
        lower: &str,
        params: &[(String, String)],
        entry: &mut ImdsRequest,
    ) -> Answer {
        if !entry
            .api_version
            .as_deref()
            .is_some_and(|v| api_version_ok(v, MIN_INSTANCE_API_VERSION))
        {
            let err = ImdsError::instance(
                400,
                "Bad request. api-version is invalid or was not specified in the request. For more information refer to aka.ms/azureimds",
                true,
            );
            return Answer::error(err);
        }
        let fault = lock(&self.faults).take(None, true);
        if let Some(answer) = self.apply_fault(fault, entry).await {
            return answer;
        }
        let document = lock(&self.node).instance.document();
        let segments: Vec<&str> = lower
            .trim_start_matches("/metadata/instance")
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let Some(node) = instance_subtree(&document, &segments) else {
            return Answer::error(ImdsError::instance(404, "Not found", false));
        };
        let text = param(params, "format") == Some("text");
        match node {
            Value::String(leaf) if text => Answer::Text(leaf.clone()),
            Value::String(_) => Answer::error(ImdsError::instance(
                400,
                "Bad request. Leaf nodes must be requested with format=text. For more information refer to aka.ms/azureimds",
                false,
            )),
            _ if text => Answer::error(ImdsError::instance(
                400,
                "Bad request. format=text is only supported for leaf nodes. For more information refer to aka.ms/azureimds",
                false,
            )),
            other => Answer::Reply(200, other.clone(), None),
        }
    }
}

/// How to build an [`ImdsMock`]; `ImdsMock::start()` uses the defaults.
#[derive(Debug)]
pub struct ImdsMockBuilder {
    tenant: String,
    system: Option<ManagedIdentity>,
    attached: Vec<ManagedIdentity>,
    instance: InstanceMetadata,
    resources: KnownResources,
    token_lifetime: Duration,
    cache_tokens: bool,
}

impl Default for ImdsMockBuilder {
    fn default() -> Self {
        Self {
            tenant: guid(),
            system: None,
            attached: Vec::new(),
            instance: InstanceMetadata::default(),
            resources: KnownResources::default(),
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
            cache_tokens: true,
        }
    }
}

impl ImdsMockBuilder {
    /// The tenant of the VM's identities (`tid` of their tokens); random by default.
    pub fn tenant(mut self, tenant: &str) -> Self {
        self.tenant = tenant.to_string();
        self
    }

    pub fn system_identity(mut self, identity: ManagedIdentity) -> Self {
        self.system = Some(identity);
        self
    }

    /// A user-assigned identity attached to the VM.
    pub fn attach(mut self, identity: ManagedIdentity) -> Self {
        self.attached.push(identity);
        self
    }

    pub fn instance(mut self, instance: InstanceMetadata) -> Self {
        self.instance = instance;
        self
    }

    pub fn resources(mut self, resources: KnownResources) -> Self {
        self.resources = resources;
        self
    }

    pub fn token_lifetime(mut self, lifetime: Duration) -> Self {
        self.token_lifetime = lifetime;
        self
    }

    /// Whether a repeated request gets the token IMDS issued before (default: yes, as IMDS).
    pub fn cache_tokens(mut self, cache: bool) -> Self {
        self.cache_tokens = cache;
        self
    }

    /// Serves on 127.0.0.1 and a free port.
    pub async fn start(self) -> Result<ImdsMock, StartError> {
        let listener = server::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        self.start_on(listener).await
    }

    /// Serves on a socket the caller bound (169.254.169.254:80 in a netns), on this runtime.
    pub async fn start_on(self, listener: std::net::TcpListener) -> Result<ImdsMock, StartError> {
        let state = Arc::new(ImdsState {
            node: Mutex::new(Node {
                tenant: self.tenant,
                system: self.system,
                attached: self.attached,
                instance: self.instance,
                resources: self.resources,
                token_lifetime: self.token_lifetime,
                cache_tokens: self.cache_tokens,
                cache: HashMap::new(),
            }),
            faults: Mutex::default(),
            log: Mutex::default(),
            counters: Counters::default(),
        });
        let server = Running::spawn(listener, None, Arc::clone(&state))?;
        Ok(ImdsMock { server, state })
    }
}

/// A running mock IMDS. Dropping it stops it.
pub struct ImdsMock {
    server: Running,
    state: Arc<ImdsState>,
}

impl fmt::Debug for ImdsMock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImdsMock")
            .field("addr", &self.server.addr())
            .finish_non_exhaustive()
    }
}

impl ImdsMock {
    pub fn builder() -> ImdsMockBuilder {
        ImdsMockBuilder::default()
    }

    /// A VM with no identities yet, on 127.0.0.1.
    pub async fn start() -> Result<Self, StartError> {
        ImdsMockBuilder::default().start().await
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://<addr>`
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    fn node(&self) -> MutexGuard<'_, Node> {
        lock(&self.state.node)
    }

    pub fn tenant(&self) -> String {
        self.node().tenant.clone()
    }

    pub fn instance(&self) -> InstanceMetadata {
        self.node().instance.clone()
    }

    /// Attaches a user-assigned identity (replacing one with the same client id).
    pub fn attach(&self, identity: ManagedIdentity) {
        let mut node = self.node();
        node.attached
            .retain(|i| !i.client_id.eq_ignore_ascii_case(&identity.client_id));
        node.attached.push(identity);
    }

    /// Detaches a user-assigned identity and forgets its cached tokens.
    pub fn detach(&self, client_id: &str) -> bool {
        let mut node = self.node();
        let before = node.attached.len();
        node.attached
            .retain(|i| !i.client_id.eq_ignore_ascii_case(client_id));
        let lower = client_id.to_ascii_lowercase();
        node.cache.retain(|(id, _), _| *id != lower);
        node.attached.len() != before
    }

    pub fn set_system_identity(&self, identity: Option<ManagedIdentity>) {
        let mut node = self.node();
        if let Some(old) = &node.system {
            let lower = old.client_id.to_ascii_lowercase();
            node.cache.retain(|(id, _), _| *id != lower);
        }
        node.system = identity;
    }

    /// The user-assigned identities attached now.
    pub fn identities(&self) -> Vec<ManagedIdentity> {
        self.node().attached.clone()
    }

    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.node().token_lifetime = lifetime;
    }

    pub fn allow_resource(&self, resource: &str) {
        self.node().resources.allow(resource);
    }

    /// Forgets every cached token (as an IMDS restart would).
    pub fn clear_token_cache(&self) {
        self.node().cache.clear();
    }

    /// The next `times` matching requests get `fault`: `Any` covers token and instance
    /// requests, `Client(id)` token requests that resolve to that identity.
    pub fn inject(&self, target: FaultTarget, fault: Fault, times: usize) {
        lock(&self.state.faults).push(target, fault, times);
    }

    pub fn clear_faults(&self) {
        lock(&self.state.faults).clear();
    }

    pub fn pending_faults(&self) -> usize {
        lock(&self.state.faults).pending()
    }

    pub fn log(&self) -> Vec<ImdsRequest> {
        lock(&self.state.log).clone()
    }

    pub fn clear_log(&self) {
        lock(&self.state.log).clear();
    }

    pub fn stats(&self) -> ImdsStats {
        let c = &self.state.counters;
        ImdsStats {
            requests: c.requests.load(Ordering::Relaxed),
            issued: c.issued.load(Ordering::Relaxed),
            cached: c.cached.load(Ordering::Relaxed),
            served: c.served.load(Ordering::Relaxed),
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
    fn paths_are_normalized() {
        assert_eq!(
            normalize("//metadata//identity/oauth2/token/"),
            "/metadata/identity/oauth2/token"
        );
        assert_eq!(normalize("/"), "/");
        assert_eq!(
            route_of("/metadata/instance/compute/location"),
            ImdsRoute::Instance
        );
        assert_eq!(route_of("/metadata/instancex"), ImdsRoute::Other);
    }

    #[test]
    fn api_versions_are_dates_not_older_than_the_minimum() {
        assert!(api_version_ok("2019-08-01", MIN_IDENTITY_API_VERSION));
        assert!(api_version_ok("2018-02-01", MIN_IDENTITY_API_VERSION));
        assert!(!api_version_ok("2017-12-01", MIN_IDENTITY_API_VERSION));
        assert!(!api_version_ok("1999-01-01", MIN_IDENTITY_API_VERSION));
        assert!(!api_version_ok("2019-8-01", MIN_IDENTITY_API_VERSION));
        assert!(!api_version_ok("latest", MIN_IDENTITY_API_VERSION));
    }

    #[test]
    fn duplicate_parameters_are_refused() {
        assert_eq!(parse_query("a=1&b=2&a=3").unwrap_err(), "a");
        assert_eq!(parse_query("a=1&b=").unwrap().len(), 2);
    }

    #[test]
    fn a_scale_set_node_has_a_scale_set_resource_id() {
        let mut instance = InstanceMetadata::default();
        assert!(
            instance.resource_id().ends_with(
                "/virtualMachineScaleSets/aks-nodepool1-12345678-vmss/virtualMachines/0"
            )
        );
        instance.name = "aks-nodepool1-12345678-vmss00000a".into();
        assert!(instance.resource_id().ends_with("/virtualMachines/10"));
        instance.vm_scale_set_name = String::new();
        assert!(instance.resource_id().ends_with(
            "/providers/Microsoft.Compute/virtualMachines/aks-nodepool1-12345678-vmss00000a"
        ));
    }

    #[test]
    fn without_a_selector_the_system_identity_or_the_only_one_is_used() {
        let instance = InstanceMetadata::default();
        let a = ManagedIdentity::user_assigned(&instance, "a");
        let b = ManagedIdentity::user_assigned(&instance, "b");
        let mut node = Node {
            tenant: guid(),
            system: None,
            attached: vec![a.clone()],
            instance: instance.clone(),
            resources: KnownResources::default(),
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
            cache_tokens: true,
            cache: HashMap::new(),
        };
        assert_eq!(node.resolve(None), Some(a.clone()));
        node.attached.push(b.clone());
        assert_eq!(node.resolve(None), None);
        let upper = Selector::ClientId(b.client_id.to_ascii_uppercase());
        assert_eq!(node.resolve(Some(&upper)), Some(b.clone()));
        let system = ManagedIdentity::system_assigned(&instance);
        node.system = Some(system.clone());
        assert_eq!(node.resolve(None), Some(system));
    }
}
