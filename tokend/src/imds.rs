//! The IMDS endpoint tokend emulates on every pod listener, as a pure function from a request
//! (method, path, query, two headers) to a decision, following the processing order of
//! reference/imds.md "(a) Spec for the emulated endpoint". The token route ends in the
//! identity step ([`ImdsBackend`]); every IMDS error answer, whatever decided it, is built
//! here, in one place ([`Failure::error`]), and so is the success body ([`token_body`]).
//!
//! One identity named under two alias spellings (`object_id=X&principal_id=x`) is one
//! selector; two kinds, or one kind with two different values, is "Multiple identity
//! selectors".

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use hyper::StatusCode;
use serde::Serialize;

use crate::netns::NetnsId;
use crate::registry::PodAttribution;
use crate::token::Token;
use crate::upstream::UpstreamError;

/// Content type of every answer, as real IMDS sends it.
pub const CONTENT_TYPE: &str = "application/json; charset=utf-8";
/// `Retry-After` (seconds) of a 404 while tokend does not know the pod or its assignment yet.
pub const NOT_YET_RETRY_AFTER: u64 = 5;
/// Description of every upstream failure a retry may fix (reference/imds.md §1.3).
pub const UPSTREAM_FAILED: &str = "Failed to retrieve token from the Active directory";
/// Oldest api-version IMDS serves tokens for.
const MIN_API_VERSION: (u16, u8, u8) = (2018, 2, 1);
/// Longest query parameter name echoed in an error description.
const MAX_ECHOED_NAME: usize = 64;

/// The parts of an HTTP request the endpoint looks at.
#[derive(Debug, Clone, Copy)]
pub struct ImdsRequest<'a> {
    pub method: &'a str,
    /// Path as received (not percent-decoded).
    pub path: &'a str,
    /// Raw query string, without the `?`.
    pub query: Option<&'a str>,
    /// First value of the `Metadata` header.
    pub metadata: Option<&'a [u8]>,
    /// Whether an `X-Forwarded-For` header is present.
    pub forwarded_for: bool,
}

/// A well-formed token request, ready for the identity step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    pub api_version: String,
    /// Percent-decoded, otherwise exactly as received (echoed in the answer, scope = resource + "/.default").
    pub resource: String,
    pub selector: Option<Selector>,
    /// `bypass_cache=true`: a fresh token from upstream.
    pub bypass_cache: bool,
    /// `token_sha256_to_refresh`: a fresh token if the cached one has this SHA-256 (hex).
    pub refresh_sha256: Option<String>,
}

/// A headered request for instance metadata (`/metadata/instance…`, `/metadata/versions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataRequest {
    /// The path with repeated slashes collapsed and no trailing slash, case kept.
    pub path: String,
    /// Raw query string, without the `?`.
    pub query: Option<String>,
}

/// Which identity the request names, whatever spelling it used.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // Azure's names for the three ids of an identity.
pub enum Selector {
    /// `client_id`.
    ClientId(String),
    /// `object_id` or `principal_id`.
    ObjectId(String),
    /// `msi_res_id`, `mi_res_id` or `resource_id`.
    ResourceId(String),
}

impl Selector {
    /// Whether `value` is the id this selector names: ids case-insensitively, resource ids
    /// case-insensitively after trimming (DESIGN.md "Selector spellings").
    pub fn names(&self, value: &str) -> bool {
        match self {
            Self::ClientId(id) | Self::ObjectId(id) => id.eq_ignore_ascii_case(value),
            Self::ResourceId(id) => id.trim().eq_ignore_ascii_case(value.trim()),
        }
    }

    /// The selector's query parameter as real IMDS spells it, and its value.
    pub fn imds_param(&self) -> (&'static str, &str) {
        match self {
            Self::ClientId(id) => ("client_id", id),
            Self::ObjectId(id) => ("object_id", id),
            Self::ResourceId(id) => ("msi_res_id", id.trim()),
        }
    }

    /// Two spellings of one selector kind name the same identity: ids case-insensitively,
    /// resource ids case-insensitively after trimming (DESIGN.md "Selector spellings").
    fn same_identity(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::ClientId(a), Self::ClientId(b)) | (Self::ObjectId(a), Self::ObjectId(b)) => {
                a.eq_ignore_ascii_case(b)
            }
            (Self::ResourceId(a), Self::ResourceId(b)) => a.trim().eq_ignore_ascii_case(b.trim()),
            _ => false,
        }
    }
}

/// What the endpoint does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A token request that passed every check: hand it to the identity step.
    Token(TokenRequest),
    /// A headered instance metadata request: proxied, blocked or denied by policy.
    Metadata(MetadataRequest),
    /// Answer this error at once.
    Reject(ImdsError),
}

/// An IMDS-shaped error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsError {
    pub status: StatusCode,
    pub error: &'static str,
    pub description: String,
    /// `Retry-After` in whole seconds.
    pub retry_after: Option<u64>,
}

impl ImdsError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            error,
            description: description.into(),
            retry_after: None,
        }
    }

    fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds.max(1));
        self
    }

    fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    fn not_found(description: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", description)
    }

    /// The JSON body: `{"error": ..., "error_description": ...}`, in that order.
    pub fn body(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            error: &'a str,
            error_description: &'a str,
        }
        serde_json::to_vec(&Body {
            error: self.error,
            error_description: &self.description,
        })
        .unwrap_or_else(|_| br#"{"error":"server_error"}"#.to_vec())
    }
}

impl fmt::Display for ImdsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.error,
            self.description
        )
    }
}

/// The listener a request arrived on: it alone identifies the calling pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub netns: NetnsId,
    pub port: u16,
    /// The pod the listener's records name, as of this request.
    pub pod: Arc<PodAttribution>,
}

/// Why a request gets an error answer after the checks of [`classify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No identity of the pod, current or coming, matches the request: `400 Identity not
    /// found` at once, so `DefaultAzureCredential` moves on to its next credential.
    IdentityNotFound,
    /// The pod is not (yet) in tokend's pod watch, or the watches have not listed yet.
    PodNotFound,
    /// An identity the pod's bindings bring is not assigned yet.
    AssignmentPending,
    /// The pod used up its token bucket; `retry_after` in seconds.
    RateLimited { retry_after: u64 },
    /// The pod has too many requests in progress.
    TooManyInFlight,
    /// Getting the token upstream failed.
    Upstream(UpstreamError),
    /// `--instance-metadata block`.
    InstanceMetadataBlocked,
    /// `--instance-metadata deny`.
    InstanceMetadataDenied,
}

impl Failure {
    /// The IMDS answer for this failure: the one place where tokend's decisions become
    /// statuses (reference/imds.md §1.3 and (a).8-12).
    pub fn error(&self) -> ImdsError {
        match self {
            Self::IdentityNotFound => ImdsError::invalid_request("Identity not found"),
            Self::PodNotFound => {
                ImdsError::not_found("The pod is not known to podid-tokend yet; try again")
                    .retry_after(NOT_YET_RETRY_AFTER)
            }
            Self::AssignmentPending => ImdsError::not_found(
                "The pod's identity is being assigned and is not available yet; try again",
            )
            .retry_after(NOT_YET_RETRY_AFTER),
            Self::RateLimited { retry_after } => ImdsError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                "Too many requests from this pod",
            )
            .retry_after(*retry_after),
            Self::TooManyInFlight => ImdsError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                "Too many requests from this pod in progress",
            )
            .retry_after(1),
            Self::Upstream(e) => upstream_error(e),
            Self::InstanceMetadataBlocked => ImdsError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "Request blocked by podid-tokend",
            ),
            Self::InstanceMetadataDenied => {
                ImdsError::not_found("Only the managed identity token endpoint is served to pods")
            }
        }
    }
}

fn upstream_error(e: &UpstreamError) -> ImdsError {
    match e {
        UpstreamError::InvalidResource { description } => ImdsError::new(
            StatusCode::BAD_REQUEST,
            "invalid_resource",
            safe_description(description),
        ),
        UpstreamError::Forbidden { description } => ImdsError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            safe_description(description),
        ),
        UpstreamError::Throttled {
            retry_after,
            description,
        } => ImdsError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            safe_description(description),
        )
        .retry_after(*retry_after),
        UpstreamError::Busy => ImdsError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            "Too many token requests in progress on this node",
        )
        .retry_after(1),
        UpstreamError::Unavailable { .. } => ImdsError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            UPSTREAM_FAILED,
        ),
    }
}

/// An upstream text as a pod may see it: never "unreachable" (Python, JS and Go SDKs read a
/// 403 saying it as "no IMDS here") nor "Identity not found" (which means "no identity" to
/// .NET and DefaultAzureCredential), whatever case upstream wrote them in.
fn safe_description(text: &str) -> String {
    let mut out = text.to_owned();
    for (word, replacement) in [
        ("unreachable", "not reachable"),
        ("identity not found", "identity was not found"),
    ] {
        while let Some(at) = out.to_ascii_lowercase().find(word) {
            out.replace_range(at..at + word.len(), replacement);
        }
    }
    out
}

/// What the identity step answers.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with this success body ([`token_body`]), whose `expires_in` counts from the unix
    /// second `rendered_at`; `cached`: no upstream call was waited for.
    Token {
        body: Bytes,
        cached: bool,
        rendered_at: i64,
    },
    /// An error answer.
    Failure(Failure),
    /// The node IMDS's answer, passed on as it came.
    Relay(Relayed),
}

/// An answer of the node's IMDS, relayed to a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub retry_after: Option<String>,
    pub body: Bytes,
}

/// The identity step and the instance metadata policy, behind every pod listener. The token
/// service plugs in here.
#[async_trait]
pub trait ImdsBackend: fmt::Debug + Send + Sync + 'static {
    /// A token request that passed the checks of [`classify`].
    async fn token(&self, caller: &Caller, request: TokenRequest) -> Reply;
    /// A headered instance metadata request.
    async fn metadata(&self, caller: &Caller, request: MetadataRequest) -> Reply;

    /// The generation of everything a cached token answer depends on besides the request, the
    /// pod and the clock. A listener may answer a request byte-identical to one it answered
    /// with a cached token, from the same pod within the same second, with that same answer
    /// while the generation is unchanged; read it *before* [`ImdsBackend::token`]. `None`:
    /// never.
    fn generation(&self) -> Option<Generation> {
        None
    }

    /// Admits a request the listener answers from its memo (the pod's rate limit still
    /// applies); `Err` is the answer to send instead.
    fn admit_repeat(&self, _caller: &Caller) -> Result<(), Reply> {
        Ok(())
    }
}

/// See [`ImdsBackend::generation`]: changes whenever the cluster view or the token cache
/// changes (each counter only grows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation {
    pub cluster: u64,
    pub cache: u64,
}

/// No identities at all: every token request is "Identity not found", instance metadata is
/// denied. The backend of the listener's own tests.
#[cfg(test)]
#[derive(Debug, Clone, Copy, Default)]
pub struct NoIdentities;

#[cfg(test)]
#[async_trait]
impl ImdsBackend for NoIdentities {
    async fn token(&self, _caller: &Caller, _request: TokenRequest) -> Reply {
        Reply::Failure(Failure::IdentityNotFound)
    }

    async fn metadata(&self, _caller: &Caller, _request: MetadataRequest) -> Reply {
        Reply::Failure(Failure::InstanceMetadataDenied)
    }
}

/// The success body of reference/imds.md (a) "Success response": these keys in this order,
/// every value a string. `expires_in` counts from `now` (unix seconds) and is at least 1;
/// `ext_expires_in` is the same; `not_before` is when the token was fetched upstream.
pub fn token_body(token: &Token, client_id: &str, resource: &str, now: i64) -> Vec<u8> {
    #[derive(Serialize)]
    struct Body<'a> {
        access_token: &'a str,
        client_id: &'a str,
        expires_in: String,
        expires_on: String,
        ext_expires_in: String,
        not_before: String,
        refresh_token: &'a str,
        resource: &'a str,
        token_type: &'a str,
    }
    let expires_in = token.expires_on.saturating_sub(now).max(1).to_string();
    // The keys, quotes and numbers take about 200 bytes: one allocation, no regrowth.
    let mut out =
        Vec::with_capacity(token.access_token().len() + client_id.len() + resource.len() + 256);
    let body = Body {
        access_token: token.access_token(),
        client_id,
        expires_in: expires_in.clone(),
        expires_on: token.expires_on.to_string(),
        ext_expires_in: expires_in,
        not_before: token.not_before.to_string(),
        refresh_token: "",
        resource,
        token_type: "Bearer",
    };
    match serde_json::to_writer(&mut out, &body) {
        Ok(()) => out,
        Err(_) => Failure::Upstream(UpstreamError::unavailable("cannot encode the token"))
            .error()
            .body(),
    }
}

/// Classifies a request, checking in the order real IMDS does (probes depend on it).
pub fn classify(request: &ImdsRequest<'_>) -> Route {
    check(request).unwrap_or_else(Route::Reject)
}

fn check(request: &ImdsRequest<'_>) -> Result<Route, ImdsError> {
    // Collapsing repeated '/' and ignoring a trailing one is dropping empty segments.
    let segments: Vec<&str> = request.path.split('/').filter(|s| !s.is_empty()).collect();
    let Some((first, rest)) = segments.split_first() else {
        return Err(ImdsError::not_found("The requested path was not found"));
    };
    if !first.eq_ignore_ascii_case("metadata") {
        return Err(ImdsError::not_found("The requested path was not found"));
    }
    if !matches!(request.method, "GET" | "HEAD") {
        return Err(ImdsError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "The HTTP method is not allowed",
        ));
    }
    // MSAL.NET reads a 400 here, header or not, as "IMDSv2 present".
    if starts_with(rest, &["identity", "getplatformmetadata"]) {
        return Err(ImdsError::not_found("The requested path was not found"));
    }
    if !request
        .metadata
        .is_some_and(|value| value.eq_ignore_ascii_case(b"true"))
    {
        return Err(ImdsError::invalid_request(
            "Required metadata header not specified",
        ));
    }
    if request.forwarded_for {
        return Err(ImdsError::invalid_request(
            "Request contains X-Forwarded-For header",
        ));
    }
    let params = parse_query(request.query.unwrap_or(""))?;
    if rest.len() == 3 && starts_with(rest, &["identity", "oauth2", "token"]) {
        token_request(&params).map(Route::Token)
    } else if (starts_with(rest, &["instance"])
        || (rest.len() == 1 && starts_with(rest, &["versions"])))
        && rest.iter().all(|s| plain_segment(s))
    {
        Ok(Route::Metadata(MetadataRequest {
            path: format!("/{}", segments.join("/")),
            query: request.query.map(str::to_owned),
        }))
    } else {
        Err(ImdsError::not_found(
            "Only the managed identity token endpoint is served to pods",
        ))
    }
}

/// A path segment forwarded to the node's IMDS: letters, digits, `_` and `-` only, so no dot
/// segment (`..`, `%2e%2e`) can lead the proxy out of instance metadata (to the node's own
/// token endpoint).
fn plain_segment(segment: &str) -> bool {
    segment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn starts_with(segments: &[&str], prefix: &[&str]) -> bool {
    segments.len() >= prefix.len()
        && segments
            .iter()
            .zip(prefix)
            .all(|(segment, expected)| segment.eq_ignore_ascii_case(expected))
}

type Params<'a> = Vec<(Cow<'a, str>, Cow<'a, str>)>;

/// Percent-decodes the query and rejects a repeated parameter name.
fn parse_query(query: &str) -> Result<Params<'_>, ImdsError> {
    let params: Params<'_> = form_urlencoded::parse(query.as_bytes()).collect();
    let mut seen = BTreeSet::new();
    for (name, _) in &params {
        if !seen.insert(&**name) {
            return Err(ImdsError::invalid_request(format!(
                "Query parameter '{}' is specified more than once",
                echo(name)
            )));
        }
    }
    Ok(params)
}

fn token_request(params: &Params<'_>) -> Result<TokenRequest, ImdsError> {
    let value = |name: &str| params.iter().find(|(n, _)| *n == name).map(|(_, v)| &**v);
    let api_version = value("api-version")
        .filter(|v| api_version_supported(v))
        .ok_or_else(|| {
            ImdsError::invalid_request("api-version is invalid or was not specified in the request")
        })?;
    let resource = value("resource").filter(|v| !v.is_empty()).ok_or_else(|| {
        ImdsError::invalid_request("Required query variable 'resource' is missing")
    })?;
    let mut selector: Option<Selector> = None;
    for (name, value) in params {
        let candidate = match &**name {
            "client_id" => Selector::ClientId(value.to_string()),
            "object_id" | "principal_id" => Selector::ObjectId(value.to_string()),
            "msi_res_id" | "mi_res_id" | "resource_id" => Selector::ResourceId(value.to_string()),
            // msi-res-id (the .NET probe's spelling), authority, xms_cc, bypass_cache,
            // token_sha256_to_refresh and unknown parameters do not select an identity.
            _ => continue,
        };
        if value.trim().is_empty() {
            return Err(ImdsError::invalid_request(format!(
                "Query variable '{}' is empty",
                echo(name)
            )));
        }
        match &selector {
            None => selector = Some(candidate),
            Some(first) if first.same_identity(&candidate) => {}
            Some(_) => {
                return Err(ImdsError::invalid_request(
                    "Multiple identity selectors (client_id, object_id, msi_res_id) were specified",
                ));
            }
        }
    }
    Ok(TokenRequest {
        api_version: api_version.to_owned(),
        resource: resource.to_owned(),
        selector,
        bypass_cache: value("bypass_cache").is_some_and(|v| v.eq_ignore_ascii_case("true")),
        refresh_sha256: value("token_sha256_to_refresh")
            .filter(|v| !v.is_empty())
            .map(str::to_owned),
    })
}

/// `YYYY-MM-DD` no older than 2018-02-01, optionally followed by `-<label>` (`-preview`).
fn api_version_supported(version: &str) -> bool {
    let bytes = version.as_bytes();
    if bytes.len() < 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return false;
    }
    let digits = |range: std::ops::Range<usize>| {
        bytes[range].iter().try_fold(0u16, |n, b| {
            b.is_ascii_digit().then(|| n * 10 + u16::from(b - b'0'))
        })
    };
    let (Some(year), Some(month), Some(day)) = (digits(0..4), digits(5..7), digits(8..10)) else {
        return false;
    };
    let suffix = &bytes[10..];
    let suffix_ok = suffix.is_empty()
        || (suffix.len() > 1
            && suffix[0] == b'-'
            && suffix[1..]
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'.'));
    // Both casts are exact: month and day are at most 99.
    let date = (year, month as u8, day as u8);
    suffix_ok && (1..=12).contains(&month) && (1..=31).contains(&day) && date >= MIN_API_VERSION
}

/// A parameter name as it may appear in an error description: bounded in length.
fn echo(name: &str) -> Cow<'_, str> {
    match name.char_indices().nth(MAX_ECHOED_NAME) {
        Some((cut, _)) => Cow::Owned(format!("{}…", &name[..cut])),
        None => Cow::Borrowed(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TOKEN: &str = "/metadata/identity/oauth2/token";
    const GOOD_QUERY: &str = "api-version=2018-02-01&resource=https://management.azure.com/";

    /// A request builder: a headered GET of the token route unless told otherwise.
    #[derive(Clone, Copy)]
    struct Req<'a>(ImdsRequest<'a>);

    fn get(path: &str) -> Req<'_> {
        Req(ImdsRequest {
            method: "GET",
            path,
            query: None,
            metadata: Some(b"true"),
            forwarded_for: false,
        })
    }

    fn token(query: &str) -> Req<'_> {
        get(TOKEN).query(query)
    }

    impl<'a> Req<'a> {
        fn method(mut self, method: &'a str) -> Self {
            self.0.method = method;
            self
        }
        fn query(mut self, query: &'a str) -> Self {
            self.0.query = Some(query);
            self
        }
        fn metadata(mut self, value: Option<&'a [u8]>) -> Self {
            self.0.metadata = value;
            self
        }
        fn forwarded(mut self) -> Self {
            self.0.forwarded_for = true;
            self
        }
        fn route(self) -> Route {
            classify(&self.0)
        }
        fn error(self) -> ImdsError {
            match self.route() {
                Route::Reject(e) => e,
                other => panic!("expected an error, got {other:?}"),
            }
        }
        fn token(self) -> TokenRequest {
            match self.route() {
                Route::Token(t) => t,
                other => panic!("expected a token request, got {other:?}"),
            }
        }
    }

    fn assert_error(error: ImdsError, status: u16, code: &str, description: &str) {
        assert_eq!(error.status.as_u16(), status, "{error}");
        assert_eq!(error.error, code, "{error}");
        assert!(
            error.description.contains(description),
            "{error} does not say {description:?}"
        );
    }

    #[test]
    fn well_formed_request() {
        let t = token(GOOD_QUERY).token();
        assert_eq!(t.api_version, "2018-02-01");
        assert_eq!(t.resource, "https://management.azure.com/");
        assert_eq!(t.selector, None);
        assert!(!t.bypass_cache);
        assert_eq!(t.refresh_sha256, None);
        let e = Failure::IdentityNotFound.error();
        assert_error(e.clone(), 400, "invalid_request", "Identity not found");
        assert_eq!(e.retry_after, None);
        assert_eq!(
            e.body(),
            br#"{"error":"invalid_request","error_description":"Identity not found"}"#
        );
    }

    #[test]
    fn cache_parameters() {
        let t = token(&format!("{GOOD_QUERY}&bypass_cache=true")).token();
        assert!(t.bypass_cache);
        let t = token(&format!("{GOOD_QUERY}&bypass_cache=TRUE")).token();
        assert!(t.bypass_cache);
        let t = token(&format!("{GOOD_QUERY}&bypass_cache=false")).token();
        assert!(!t.bypass_cache);
        let t = token(&format!("{GOOD_QUERY}&token_sha256_to_refresh=ab12")).token();
        assert_eq!(t.refresh_sha256.as_deref(), Some("ab12"));
        let t = token(&format!("{GOOD_QUERY}&token_sha256_to_refresh=")).token();
        assert_eq!(t.refresh_sha256, None);
    }

    #[test]
    fn instance_metadata_routes() {
        for (path, query, expected) in [
            (
                "/metadata/instance",
                Some("api-version=2021-02-01"),
                "/metadata/instance",
            ),
            (
                "//metadata/instance/compute/location/",
                Some("api-version=2021-02-01&format=text"),
                "/metadata/instance/compute/location",
            ),
            ("/Metadata/versions", None, "/Metadata/versions"),
        ] {
            let mut req = get(path);
            if let Some(q) = query {
                req = req.query(q);
            }
            match req.route() {
                Route::Metadata(m) => {
                    assert_eq!(m.path, expected);
                    assert_eq!(m.query.as_deref(), query);
                }
                other => panic!("{path}: {other:?}"),
            }
        }
        // The header check comes first, and duplicates are refused.
        let e = get("/metadata/instance").metadata(None).error();
        assert_eq!(e.status, 400);
        let e = get("/metadata/instance").query("a=1&a=2").error();
        assert_eq!(e.status, 400);
        assert_eq!(get("/metadata/versions/x").error().status, 404);
        // Nothing that could climb out of /metadata/instance reaches the proxy.
        for path in [
            "/metadata/instance/../identity/oauth2/token",
            "/metadata/instance/%2e%2e/identity/oauth2/token",
            "/metadata/instance/.%2E/identity",
            "/metadata/instance/compute/./x",
            "/metadata/instance/a%2fb",
        ] {
            assert_eq!(
                get(path).query("api-version=2021-02-01").error().status,
                404,
                "{path}"
            );
        }
    }

    #[test]
    fn every_failure_has_its_status_in_one_place() {
        let table: Vec<(Failure, u16, &str, Option<u64>)> = vec![
            (Failure::IdentityNotFound, 400, "invalid_request", None),
            (Failure::PodNotFound, 404, "not_found", Some(5)),
            (Failure::AssignmentPending, 404, "not_found", Some(5)),
            (
                Failure::RateLimited { retry_after: 0 },
                429,
                "too_many_requests",
                Some(1),
            ),
            (
                Failure::RateLimited { retry_after: 3 },
                429,
                "too_many_requests",
                Some(3),
            ),
            (Failure::TooManyInFlight, 429, "too_many_requests", Some(1)),
            (Failure::InstanceMetadataBlocked, 403, "forbidden", None),
            (Failure::InstanceMetadataDenied, 404, "not_found", None),
            (
                Failure::Upstream(UpstreamError::InvalidResource {
                    description: "AADSTS500011: no such resource".into(),
                }),
                400,
                "invalid_resource",
                None,
            ),
            (
                Failure::Upstream(UpstreamError::Forbidden {
                    description: "AADSTS7000215: Invalid client secret".into(),
                }),
                403,
                "forbidden",
                None,
            ),
            (
                Failure::Upstream(UpstreamError::Throttled {
                    retry_after: 7,
                    description: "slow down".into(),
                }),
                429,
                "too_many_requests",
                Some(7),
            ),
            (
                Failure::Upstream(UpstreamError::Busy),
                429,
                "too_many_requests",
                Some(1),
            ),
            (
                Failure::Upstream(UpstreamError::unavailable("connection refused")),
                500,
                "server_error",
                None,
            ),
        ];
        for (failure, status, code, retry_after) in table {
            let e = failure.error();
            assert_eq!(e.status.as_u16(), status, "{failure:?}");
            assert_eq!(e.error, code, "{failure:?}");
            assert_eq!(e.retry_after, retry_after, "{failure:?}");
            let body = String::from_utf8(e.body()).unwrap();
            if failure != Failure::IdentityNotFound {
                assert!(!body.contains("Identity not found"), "{body}");
            }
            assert!(!body.to_ascii_lowercase().contains("unreachable"), "{body}");
        }
        let e = Failure::Upstream(UpstreamError::unavailable("secret detail")).error();
        assert_eq!(e.description, UPSTREAM_FAILED, "details stay in the log");
    }

    #[test]
    fn upstream_texts_never_say_the_words_clients_branch_on() {
        assert_eq!(
            safe_description("Host UNREACHABLE; Identity not found; unreachable"),
            "Host not reachable; identity was not found; not reachable"
        );
        assert_eq!(
            safe_description("AADSTS70011: bad scope"),
            "AADSTS70011: bad scope"
        );
    }

    #[test]
    fn success_body_keys_in_order_all_strings() {
        let token = Token::new("eyJ.a.b".into(), 1_700_003_600, 1_700_000_000);
        let body = token_body(&token, "cid", "https://vault.azure.net", 1_700_000_100);
        let text = String::from_utf8(body).unwrap();
        assert_eq!(
            text,
            r#"{"access_token":"eyJ.a.b","client_id":"cid","expires_in":"3500","expires_on":"1700003600","ext_expires_in":"3500","not_before":"1700000000","refresh_token":"","resource":"https://vault.azure.net","token_type":"Bearer"}"#
        );
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            value
                .as_object()
                .unwrap()
                .values()
                .all(serde_json::Value::is_string)
        );
        // expires_in never reaches zero.
        let late = token_body(&token, "cid", "r", 1_700_003_600);
        let value: serde_json::Value = serde_json::from_slice(&late).unwrap();
        assert_eq!(value["expires_in"], "1");
    }

    #[test]
    fn paths_outside_metadata_are_404_before_anything_else() {
        for path in ["/", "", "/foo", "/metadatax/identity", "/msi/token"] {
            let e = get(path).method("POST").metadata(None).error();
            assert_error(e, 404, "not_found", "");
        }
    }

    #[test]
    fn method_is_checked_before_the_header() {
        let e = token(GOOD_QUERY).method("POST").metadata(None).error();
        assert_error(
            e,
            405,
            "method_not_allowed",
            "The HTTP method is not allowed",
        );
        for method in ["PUT", "DELETE", "OPTIONS", "PATCH"] {
            assert_eq!(token(GOOD_QUERY).method(method).error().status, 405);
        }
        assert!(matches!(
            token(GOOD_QUERY).method("HEAD").route(),
            Route::Token(_)
        ));
    }

    #[test]
    fn getplatformmetadata_is_404_with_or_without_the_header() {
        for metadata in [None, Some(&b"true"[..]), Some(&b"false"[..])] {
            let e = get("/metadata/identity/getplatformmetadata")
                .query("cred-api-version=2.0")
                .metadata(metadata)
                .error();
            assert_error(e, 404, "not_found", "");
        }
        assert_eq!(
            get("//Metadata/Identity/GetPlatformMetadata/")
                .metadata(None)
                .error()
                .status,
            404
        );
    }

    #[test]
    fn header_is_required_and_checked_before_lookups() {
        // The probe shapes of reference/imds.md (b) 1a-1d.
        for query in [
            None,
            Some(GOOD_QUERY),
            Some("api-version=2018-02-01&msi-res-id=/subscriptions/x"),
            Some("api-version=2018-02-01&client_id=abc"),
            Some("resource=x&resource=y"),
        ] {
            let mut req = get(TOKEN).metadata(None);
            if let Some(q) = query {
                req = req.query(q);
            }
            let e = req.error();
            assert_error(
                e.clone(),
                400,
                "invalid_request",
                "Required metadata header not specified",
            );
            assert!(!String::from_utf8_lossy(&e.body()).contains("Identity not found"));
        }
        for value in [&b"false"[..], b"", b"1", b"yes", b"true "] {
            assert_eq!(token(GOOD_QUERY).metadata(Some(value)).error().status, 400);
        }
        for value in [&b"True"[..], b"TRUE", b"true"] {
            assert!(matches!(
                token(GOOD_QUERY).metadata(Some(value)).route(),
                Route::Token(_)
            ));
        }
        // Any /metadata path needs the header first, instance metadata included.
        let e = get("/metadata/instance").metadata(None).error();
        assert_error(e, 400, "invalid_request", "Required metadata header");
    }

    #[test]
    fn forwarded_requests_are_refused() {
        let e = token(GOOD_QUERY).forwarded().error();
        assert_error(
            e,
            400,
            "invalid_request",
            "Request contains X-Forwarded-For header",
        );
        // ... but only after the header check.
        let e = token(GOOD_QUERY).forwarded().metadata(None).error();
        assert_error(e, 400, "invalid_request", "Required metadata header");
    }

    #[test]
    fn duplicate_parameters_are_refused_by_name() {
        let e = token("api-version=2018-02-01&resource=a&resource=b").error();
        assert_error(e, 400, "invalid_request", "'resource'");
        // Names compare after decoding.
        let e = token("api-version=2018-02-01&resource=a&reso%75rce=a").error();
        assert_error(e, 400, "invalid_request", "'resource'");
        let e = token(&format!("{GOOD_QUERY}&x=1&x=2")).error();
        assert_error(e, 400, "invalid_request", "'x'");
    }

    #[test]
    fn path_normalisation() {
        for path in [
            "//metadata/identity/oauth2/token",
            "/metadata/identity/oauth2/token/",
            "/Metadata/identity/oauth2/token",
            "/METADATA//identity///oauth2/token//",
        ] {
            assert!(
                matches!(get(path).query(GOOD_QUERY).route(), Route::Token(_)),
                "{path}"
            );
        }
        for path in [
            "/metadata/identity/oauth2/token/extra",
            "/metadata/identity/oauth2",
            "/metadata/identity/oauth2token",
            "/metadata/instances",
            "/metadata/identity/info",
            "/metadata",
        ] {
            let e = get(path).query(GOOD_QUERY).error();
            assert_error(e, 404, "not_found", "");
        }
    }

    #[test]
    fn api_versions() {
        for ok in [
            "2018-02-01",
            "2019-08-01",
            "2023-07-01",
            "2025-04-07",
            "2021-12-13-preview",
        ] {
            let t = token(&format!("api-version={ok}&resource=r")).token();
            assert_eq!(t.api_version, ok);
        }
        for bad in [
            "1999-01-01",
            "2018-01-31",
            "2017-12-01",
            "2018-13-01",
            "2018-02-00",
            "2018-2-01",
            "20180201",
            "2018-02-01-",
            "2018-02-01preview",
            "latest",
            "",
        ] {
            let e = token(&format!("api-version={bad}&resource=r")).error();
            assert_error(
                e,
                400,
                "invalid_request",
                "api-version is invalid or was not specified",
            );
        }
        let e = token("resource=r").error();
        assert_error(
            e,
            400,
            "invalid_request",
            "api-version is invalid or was not specified",
        );
    }

    #[test]
    fn resource_is_required_and_kept_verbatim() {
        for query in ["api-version=2018-02-01", "api-version=2018-02-01&resource="] {
            let e = token(query).error();
            assert_error(
                e,
                400,
                "invalid_request",
                "Required query variable 'resource' is missing",
            );
        }
        for (encoded, decoded) in [
            ("https%3A%2F%2Fvault.azure.net", "https://vault.azure.net"),
            (
                "https://management.core.windows.net/",
                "https://management.core.windows.net/",
            ),
            (
                "6e4a2a5c-0c8e-4a8f-9c51-7d1e8f2c3b4a",
                "6e4a2a5c-0c8e-4a8f-9c51-7d1e8f2c3b4a",
            ),
            ("%20padded%20", " padded "),
        ] {
            let t = token(&format!("api-version=2019-08-01&resource={encoded}")).token();
            assert_eq!(t.resource, decoded);
        }
    }

    #[test]
    fn every_selector_spelling() {
        for (param, expected) in [
            ("client_id", Selector::ClientId("ID".into())),
            ("object_id", Selector::ObjectId("ID".into())),
            ("principal_id", Selector::ObjectId("ID".into())),
            ("msi_res_id", Selector::ResourceId("ID".into())),
            ("mi_res_id", Selector::ResourceId("ID".into())),
            ("resource_id", Selector::ResourceId("ID".into())),
        ] {
            let t = token(&format!("{GOOD_QUERY}&{param}=ID")).token();
            assert_eq!(t.selector, Some(expected), "{param}");
        }
        // Not selectors: the .NET probe's typo, and parameters the token step may use later.
        for ignored in [
            "msi-res-id=/x",
            "authority=https://login.example",
            "xms_cc=cp1",
            "bypass_cache=true",
            "token_sha256_to_refresh=abcd",
            "unknown=1",
        ] {
            let t = token(&format!("{GOOD_QUERY}&{ignored}")).token();
            assert_eq!(t.selector, None, "{ignored}");
        }
        let e = token(&format!("{GOOD_QUERY}&client_id=")).error();
        assert_error(e, 400, "invalid_request", "'client_id' is empty");
    }

    #[test]
    fn multiple_selectors() {
        let multiple =
            "Multiple identity selectors (client_id, object_id, msi_res_id) were specified";
        for query in [
            "client_id=a&object_id=b",
            "client_id=a&msi_res_id=/x",
            "principal_id=a&mi_res_id=/x",
            // Same kind under two spellings but different values: two identities.
            "object_id=a&principal_id=b",
            "msi_res_id=/x&resource_id=/y",
        ] {
            let e = token(&format!("{GOOD_QUERY}&{query}")).error();
            assert_error(e, 400, "invalid_request", multiple);
        }
        // Decision: one identity under two alias spellings is one selector (the first spelling
        // wins), comparing as DESIGN.md compares selectors.
        let t = token(&format!("{GOOD_QUERY}&object_id=AbC&principal_id=abc")).token();
        assert_eq!(t.selector, Some(Selector::ObjectId("AbC".into())));
        let t = token(&format!(
            "{GOOD_QUERY}&msi_res_id=/Subs/X&resource_id=%20/subs/x%20"
        ))
        .token();
        assert_eq!(t.selector, Some(Selector::ResourceId("/Subs/X".into())));
    }

    #[test]
    fn long_names_are_cut_in_descriptions() {
        let name = "n".repeat(500);
        let e = token(&format!("{GOOD_QUERY}&{name}=1&{name}=2")).error();
        assert!(e.description.len() < 200, "{}", e.description);
    }

    #[tokio::test]
    async fn no_identities_finds_nothing() {
        let request = token(GOOD_QUERY).token();
        let caller = Caller {
            netns: NetnsId { dev: 1, ino: 2 },
            port: 2579,
            pod: Arc::new(PodAttribution::Unnamed),
        };
        assert!(matches!(
            NoIdentities.token(&caller, request).await,
            Reply::Failure(Failure::IdentityNotFound)
        ));
        let metadata = MetadataRequest {
            path: "/metadata/instance".into(),
            query: None,
        };
        assert!(matches!(
            NoIdentities.metadata(&caller, metadata).await,
            Reply::Failure(Failure::InstanceMetadataDenied)
        ));
    }

    proptest! {
        #[test]
        fn never_panics(
            method in prop_oneof![Just("GET".to_owned()), Just("HEAD".to_owned()), "[A-Z]{0,8}"],
            path in prop_oneof![
                "/[mM][eE][tT][aA][dD][aA][tT][aA](/[a-zA-Z0-9_%/.]{0,20}){0,4}",
                "\\PC{0,40}",
                ".{0,40}",
            ],
            query in proptest::option::of(prop_oneof![
                "((api-version|resource|client_id|object_id|principal_id|msi_res_id|mi_res_id|resource_id|x)=[^&]{0,20}&?){0,6}",
                ".{0,80}",
            ]),
            metadata in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
            forwarded_for in any::<bool>(),
        ) {
            let route = classify(&ImdsRequest {
                method: &method,
                path: &path,
                query: query.as_deref(),
                metadata: metadata.as_deref(),
                forwarded_for,
            });
            if let Route::Reject(e) = route {
                let body: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
                prop_assert!(body["error"].is_string() && body["error_description"].is_string());
                prop_assert!(e.status.is_client_error());
            }
        }

        #[test]
        fn api_version_parser_never_panics(version in ".{0,20}") {
            let _ = api_version_supported(&version);
        }
    }
}
