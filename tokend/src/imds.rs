//! The IMDS endpoint tokend emulates on every pod listener, as a pure function from a request
//! (method, path, query, two headers) to a decision, following the processing order of
//! reference/imds.md "(a) Spec for the emulated endpoint". The token route ends in the
//! identity step ([`IdentityResolver`]); every IMDS error is built here, in one place.
//!
//! One identity named under two alias spellings (`object_id=X&principal_id=x`) is one
//! selector; two kinds, or one kind with two different values, is "Multiple identity
//! selectors".

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use hyper::StatusCode;
use serde::Serialize;

use crate::netns::NetnsId;

/// Content type of every answer, as real IMDS sends it.
pub const CONTENT_TYPE: &str = "application/json; charset=utf-8";
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
    /// Answer this error at once.
    Reject(ImdsError),
}

/// An IMDS-shaped error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsError {
    pub status: StatusCode,
    pub error: &'static str,
    pub description: String,
}

impl ImdsError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            error,
            description: description.into(),
        }
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub netns: NetnsId,
    pub port: u16,
}

/// What the identity step decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityAnswer {
    /// No identity of the pod matches the request: `400 Identity not found`, so
    /// `DefaultAzureCredential` moves on to its next credential.
    NotFound,
}

/// The identity step: resolves a token request of a pod to an answer. The token service
/// plugs in here; until it does, [`NoIdentities`] answers every request.
pub trait IdentityResolver: fmt::Debug + Send + Sync + 'static {
    fn resolve<'a>(
        &'a self,
        caller: Caller,
        request: &'a TokenRequest,
    ) -> Pin<Box<dyn Future<Output = IdentityAnswer> + Send + 'a>>;
}

/// Nothing assigns identities yet: every pod has none.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoIdentities;

impl IdentityResolver for NoIdentities {
    fn resolve<'a>(
        &'a self,
        _caller: Caller,
        _request: &'a TokenRequest,
    ) -> Pin<Box<dyn Future<Output = IdentityAnswer> + Send + 'a>> {
        Box::pin(std::future::ready(IdentityAnswer::NotFound))
    }
}

/// The error answer for an identity decision.
pub fn identity_error(answer: &IdentityAnswer) -> ImdsError {
    match answer {
        IdentityAnswer::NotFound => ImdsError::invalid_request("Identity not found"),
    }
}

/// Classifies a request, checking in the order real IMDS does (probes depend on it).
pub fn classify(request: &ImdsRequest<'_>) -> Route {
    match check(request) {
        Ok(token) => Route::Token(token),
        Err(error) => Route::Reject(error),
    }
}

fn check(request: &ImdsRequest<'_>) -> Result<TokenRequest, ImdsError> {
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
        token_request(&params)
    } else {
        Err(ImdsError::not_found(
            "Only the managed identity token endpoint is served to pods",
        ))
    }
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
                Route::Token(t) => panic!("expected an error, got {t:?}"),
            }
        }
        fn token(self) -> TokenRequest {
            match self.route() {
                Route::Token(t) => t,
                Route::Reject(e) => panic!("expected a token request, got {e}"),
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
        let e = identity_error(&IdentityAnswer::NotFound);
        assert_error(e.clone(), 400, "invalid_request", "Identity not found");
        assert_eq!(
            e.body(),
            br#"{"error":"invalid_request","error_description":"Identity not found"}"#
        );
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
            "/metadata/instance",
            "/metadata/versions",
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
        };
        assert_eq!(
            NoIdentities.resolve(caller, &request).await,
            IdentityAnswer::NotFound
        );
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
