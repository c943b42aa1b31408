//! The HTTP face: one hyper service that parses a request (path, query, body, content type),
//! calls the store, and answers with JSON objects, lists, watch streams or `Status` errors.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue, USER_AGENT};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::discovery;
use super::routes::{self, ResourcePath, Route};
use super::selectors::Selectors;
use super::stats::Stats;
use super::status::{self, ApiError};
use super::store::{
    DeleteOptions, Deletion, Part, PatchKind, Propagation, Store, WatchFrom, Writer,
};
use super::token;
use super::watch::{self, WatchRequest};

/// The response body type: whole JSON documents or watch streams.
pub type Body = BoxBody<Bytes, Infallible>;

/// Largest request body accepted, as kube-apiserver's 3 MiB limit.
const MAX_BODY: usize = 3 * 1024 * 1024;

/// Tunables of the server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub bookmark_interval: Duration,
    /// Watch length when the client sends no `timeoutSeconds` (kube-apiserver: 30 to 60 minutes).
    pub default_watch_timeout: Duration,
}

/// Everything a request handler needs.
#[derive(Debug)]
pub struct Shared {
    pub store: Store,
    pub stats: Stats,
    /// Extra latency of live watch events, by resource plural (see
    /// [`FakeApiServer::delay_watch_events`](super::FakeApiServer::delay_watch_events)).
    pub watch_delays: watch::WatchDelays,
    pub options: ServerOptions,
    pub shutdown: CancellationToken,
    pub address: String,
}

type Query = HashMap<String, String>;

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    bytes_response(
        code,
        Bytes::from(serde_json::to_vec(value).expect("JSON values serialize")),
        "application/json",
    )
}

fn bytes_response(code: StatusCode, body: Bytes, content_type: &str) -> Response<Body> {
    let mut response = Response::new(Full::new(body).boxed());
    *response.status_mut() = code;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_str(content_type).expect("static content types"),
    );
    response
}

fn error_response(err: &ApiError) -> Response<Body> {
    json_response(err.http_status(), &err.to_status())
}

fn flag(query: &Query, key: &str) -> Option<bool> {
    query.get(key).map(|v| v == "true" || v == "1")
}

/// Serves one request; every failure is a `Status` answer, never a dropped connection.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let response = match serve(&shared, req).await {
        Ok(response) => response,
        Err(err) => error_response(&err),
    };
    Ok(response)
}

async fn serve(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let route = routes::parse(req.uri().path());
    let query: Query = form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let method = req.method().clone();
    let route = match route {
        Ok(route) => route,
        Err(err) => {
            shared.stats.count("other");
            return Err(err);
        }
    };
    let accept = req
        .headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    match route {
        Route::Stats => Ok(json_response(
            StatusCode::OK,
            &json!(shared.stats.snapshot(&shared.store)),
        )),
        Route::Health => {
            shared.stats.count("other");
            Ok(bytes_response(
                StatusCode::OK,
                Bytes::from_static(b"ok"),
                "text/plain",
            ))
        }
        Route::Version => discovery_answer(shared, &method, Some(discovery::version())),
        Route::CoreVersions if discovery::wants_aggregated(&accept) => {
            aggregated_answer(shared, &method, true)
        }
        Route::Groups if discovery::wants_aggregated(&accept) => {
            aggregated_answer(shared, &method, false)
        }
        Route::CoreVersions => discovery_answer(
            shared,
            &method,
            Some(discovery::core_versions(&shared.address)),
        ),
        Route::Groups => discovery_answer(shared, &method, Some(discovery::group_list())),
        Route::Group(group) => discovery_answer(shared, &method, discovery::group(&group)),
        Route::ResourceList { group, version } => {
            discovery_answer(shared, &method, discovery::resource_list(&group, &version))
        }
        Route::Resource(path) => resource(shared, req, path, query).await,
    }
}

fn discovery_answer(
    shared: &Shared,
    method: &Method,
    doc: Option<Value>,
) -> Result<Response<Body>, ApiError> {
    shared.stats.count("discovery");
    if method != Method::GET {
        return Err(ApiError::method_not_allowed());
    }
    doc.map(|d| json_response(StatusCode::OK, &d))
        .ok_or_else(ApiError::no_route)
}

fn aggregated_answer(
    shared: &Shared,
    method: &Method,
    core: bool,
) -> Result<Response<Body>, ApiError> {
    shared.stats.count("discovery");
    if method != Method::GET {
        return Err(ApiError::method_not_allowed());
    }
    let body = serde_json::to_vec(&discovery::aggregated(core)).expect("JSON values serialize");
    Ok(bytes_response(
        StatusCode::OK,
        Bytes::from(body),
        discovery::AGGREGATED_CONTENT_TYPE,
    ))
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding the request body as JSON: {e}")))
}

/// The Update manager of a write without `fieldManager`: the User-Agent's program name, as the server does.
fn manager_of(query: &Query, req: &Request<Incoming>) -> String {
    if let Some(m) = query.get("fieldManager").filter(|m| !m.is_empty()) {
        return m.clone();
    }
    req.headers()
        .get(USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .filter(|s| !s.is_empty())
        .unwrap_or("unknown")
        .to_string()
}

fn dry_run(query: &Query) -> Result<bool, ApiError> {
    match query.get("dryRun").map(String::as_str) {
        None | Some("") => Ok(false),
        Some("All") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "unsupported dryRun value {other:?}: supported values: \"All\""
        ))),
    }
}

fn verb_of(method: &Method, path: &ResourcePath, query: &Query) -> &'static str {
    match (method.as_str(), path.name.is_some()) {
        ("GET", true) => "get",
        ("GET", false) if flag(query, "watch") == Some(true) => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "other",
    }
}

async fn resource(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    path: ResourcePath,
    query: Query,
) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    shared.stats.count(verb_of(&method, &path, &query));
    let metadata_only = req
        .headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| {
            a.split(',')
                .next()
                .is_some_and(|first| first.contains("as=PartialObjectMetadata"))
        });
    let res = path.res;
    let ns = path.namespace.clone().unwrap_or_default();
    let part = if path.subresource.as_deref() == Some("status") {
        Part::Status
    } else {
        Part::Main
    };
    let store = &shared.store;
    match (method, path.name.as_deref(), path.subresource.as_deref()) {
        (Method::GET, None, None) => {
            let selectors = Selectors::parse(
                query.get("labelSelector").map(String::as_str),
                query.get("fieldSelector").map(String::as_str),
                res,
            )?;
            if flag(&query, "watch") == Some(true) {
                return start_watch(shared, path, selectors, &query, metadata_only);
            }
            list(store, &path, &selectors, &query, metadata_only)
        }
        (Method::GET, Some(name), None | Some("status")) => {
            let object = store.get(res, &ns, name)?;
            if metadata_only {
                return Ok(json_response(
                    StatusCode::OK,
                    &watch::partial_object_metadata(&object),
                ));
            }
            Ok(json_response(StatusCode::OK, &object))
        }
        (Method::POST, None, None) => {
            if res.namespaced && path.namespace.is_none() {
                return Err(ApiError::method_not_allowed());
            }
            let manager = manager_of(&query, &req);
            let dry = dry_run(&query)?;
            let body = parse_json(&read_body(req).await?)?;
            let created = store.create(
                res,
                path.namespace.as_deref(),
                body,
                Writer {
                    manager: &manager,
                    dry_run: dry,
                },
            )?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        (Method::POST, Some(name), Some("token")) => {
            let body = parse_json(&read_body(req).await?)?;
            Ok(json_response(
                StatusCode::CREATED,
                &token::token_request(store, &ns, name, &body)?,
            ))
        }
        (Method::PUT, Some(name), None | Some("status")) => {
            let manager = manager_of(&query, &req);
            let dry = dry_run(&query)?;
            let body = parse_json(&read_body(req).await?)?;
            let updated = store.replace(
                res,
                &ns,
                name,
                body,
                part,
                Writer {
                    manager: &manager,
                    dry_run: dry,
                },
            )?;
            Ok(json_response(StatusCode::OK, &updated))
        }
        (Method::PATCH, Some(name), None | Some("status")) => {
            let content_type = req
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let media = content_type.split(';').next().unwrap_or("").trim();
            let force = flag(&query, "force").unwrap_or(false);
            let kind = match media {
                "application/json-patch+json" => PatchKind::Json,
                "application/merge-patch+json" => PatchKind::Merge,
                // custom resources have no Go struct tags to merge by, so the server refuses this
                "application/strategic-merge-patch+json" if res.custom => {
                    return Err(ApiError::unsupported_media_type(media));
                }
                "application/strategic-merge-patch+json" => PatchKind::Strategic,
                "application/apply-patch+yaml" => PatchKind::Apply { force },
                other => return Err(ApiError::unsupported_media_type(other)),
            };
            let manager = match kind {
                PatchKind::Apply { .. } => query.get("fieldManager").filter(|m| !m.is_empty()).cloned().ok_or_else(|| {
                    ApiError::unprocessable("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch")
                })?,
                _ if query.contains_key("force") => {
                    return Err(ApiError::unprocessable("PatchOptions.meta.k8s.io \"\" is invalid: force: Forbidden: may not be specified for non-apply patch"));
                }
                _ => manager_of(&query, &req),
            };
            let dry = dry_run(&query)?;
            let body = parse_json(&read_body(req).await?)?;
            let existed = store.get(res, &ns, name).is_ok();
            let patched = store.patch(
                res,
                &ns,
                name,
                kind,
                body,
                part,
                Writer {
                    manager: &manager,
                    dry_run: dry,
                },
            )?;
            let code = if existed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Ok(json_response(code, &patched))
        }
        (Method::DELETE, Some(name), None) => {
            let body = read_body(req).await?;
            let opts = delete_options(&query, &body)?;
            match store.delete(res, &ns, name, &opts)? {
                Deletion::Kept(obj) => Ok(json_response(StatusCode::OK, &obj)),
                Deletion::Removed(obj) => {
                    let uid = obj
                        .pointer("/metadata/uid")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    Ok(json_response(
                        StatusCode::OK,
                        &status::deleted(res, name, uid),
                    ))
                }
            }
        }
        (Method::DELETE, None, None) => {
            if res.namespaced && path.namespace.is_none() {
                return Err(ApiError::method_not_allowed());
            }
            let selectors = Selectors::parse(
                query.get("labelSelector").map(String::as_str),
                query.get("fieldSelector").map(String::as_str),
                res,
            )?;
            let body = read_body(req).await?;
            let opts = delete_options(&query, &body)?;
            let mut deleted = Vec::new();
            for (key_ns, name) in store.names(res, path.namespace.as_deref(), &selectors) {
                match store.delete(res, &key_ns, &name, &opts) {
                    Ok(Deletion::Kept(obj) | Deletion::Removed(obj)) => {
                        deleted.push((*obj).clone())
                    }
                    // deleted meanwhile by a cascade or another client
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
            let list = json!({
                "kind": res.list_kind(),
                "apiVersion": res.api_version(),
                "metadata": {"resourceVersion": store.resource_version().to_string()},
                "items": deleted,
            });
            Ok(json_response(StatusCode::OK, &list))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn list(
    store: &Store,
    path: &ResourcePath,
    selectors: &Selectors,
    query: &Query,
    metadata_only: bool,
) -> Result<Response<Body>, ApiError> {
    let limit = match query.get("limit") {
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        ),
        None => None,
    };
    let page = store.list(
        path.res,
        path.namespace.as_deref(),
        selectors,
        limit,
        query
            .get("continue")
            .map(String::as_str)
            .filter(|c| !c.is_empty()),
        query.get("resourceVersion").map(String::as_str),
        query.get("resourceVersionMatch").map(String::as_str),
    )?;
    let mut metadata = json!({"resourceVersion": page.resource_version.to_string()});
    if let Some(token) = &page.continue_token {
        metadata["continue"] = json!(token);
    }
    if let Some(remaining) = page.remaining {
        metadata["remainingItemCount"] = json!(remaining);
    }
    // written by hand so that 10,000 stored objects are serialized once, not cloned into a Value
    let mut out = Vec::with_capacity(256 + page.items.len() * 1024);
    let (kind, api_version) = if metadata_only {
        (
            "PartialObjectMetadataList".to_string(),
            "meta.k8s.io/v1".to_string(),
        )
    } else {
        (path.res.list_kind(), path.res.api_version())
    };
    out.extend_from_slice(b"{\"kind\":");
    serde_json::to_writer(&mut out, &kind).expect("strings serialize");
    out.extend_from_slice(b",\"apiVersion\":");
    serde_json::to_writer(&mut out, &api_version).expect("strings serialize");
    out.extend_from_slice(b",\"metadata\":");
    serde_json::to_writer(&mut out, &metadata).expect("JSON values serialize");
    out.extend_from_slice(b",\"items\":[");
    for (i, item) in page.items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        if metadata_only {
            serde_json::to_writer(&mut out, &watch::partial_object_metadata(item))
                .expect("JSON values serialize");
        } else {
            serde_json::to_writer(&mut out, &**item).expect("JSON values serialize");
        }
    }
    out.extend_from_slice(b"]}");
    Ok(bytes_response(
        StatusCode::OK,
        Bytes::from(out),
        "application/json",
    ))
}

fn start_watch(
    shared: &Arc<Shared>,
    path: ResourcePath,
    selectors: Selectors,
    query: &Query,
    metadata_only: bool,
) -> Result<Response<Body>, ApiError> {
    let send_initial = flag(query, "sendInitialEvents");
    let bookmarks = flag(query, "allowWatchBookmarks").unwrap_or(false);
    let rv_match = query
        .get("resourceVersionMatch")
        .map(String::as_str)
        .filter(|m| !m.is_empty());
    if send_initial == Some(true) {
        if !bookmarks {
            return Err(ApiError::unprocessable(
                "ListOptions.meta.k8s.io \"\" is invalid: allowWatchBookmarks: Forbidden: sendInitialEvents requires setting allowWatchBookmarks to true",
            ));
        }
        if rv_match != Some("NotOlderThan") {
            return Err(ApiError::unprocessable(
                "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
    } else if rv_match.is_some() && send_initial.is_none() {
        return Err(ApiError::unprocessable(
            "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        ));
    }
    let rv = query
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or("");
    let version = match rv {
        "" | "0" => None,
        v => Some(
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {v:?}")))?,
        ),
    };
    let from = match (send_initial, version) {
        (Some(true), _) | (None, None) => WatchFrom::Current,
        (Some(false), None) => WatchFrom::Now,
        (_, Some(v)) => WatchFrom::Version(v),
    };
    let timeout = match query.get("timeoutSeconds") {
        Some(t) => Duration::from_secs(
            t.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?,
        ),
        None => shared.options.default_watch_timeout,
    };
    let request = WatchRequest {
        res: path.res,
        namespace: path.namespace,
        selectors,
        from,
        bookmarks,
        initial_events_end: send_initial == Some(true),
        timeout,
        bookmark_interval: shared.options.bookmark_interval,
        metadata_only,
    };
    let guard = OpenWatch::new(Arc::clone(shared));
    let lines = watch::stream(
        &shared.store,
        request,
        shared.watch_delays.clone(),
        shared.shutdown.clone(),
    )
    .map(move |line| {
        let _open = &guard;
        Ok::<_, Infallible>(Frame::data(line))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(lines)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// Counts a watch as open for as long as its body lives.
struct OpenWatch(Arc<Shared>);

impl OpenWatch {
    fn new(shared: Arc<Shared>) -> Self {
        shared.stats.open_watches.fetch_add(1, Ordering::Relaxed);
        Self(shared)
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.stats.open_watches.fetch_sub(1, Ordering::Relaxed);
    }
}

/// DeleteOptions from the body (kube sends one) and the query parameters.
fn delete_options(query: &Query, body: &[u8]) -> Result<DeleteOptions, ApiError> {
    let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        parse_json(body)?
    };
    let text = |key: &str| {
        body.get(key)
            .and_then(Value::as_str)
            .map(String::from)
            .or_else(|| query.get(key).cloned())
    };
    let propagation = match text("propagationPolicy").as_deref() {
        None | Some("") | Some("Background") => Propagation::Background,
        Some("Foreground") => Propagation::Foreground,
        Some("Orphan") => Propagation::Orphan,
        Some(other) => {
            return Err(ApiError::unprocessable(format!(
                "DeleteOptions.meta.k8s.io \"\" is invalid: propagationPolicy: Unsupported value: \"{other}\": supported values: \"Foreground\", \"Background\", \"Orphan\", \"nil\""
            )));
        }
    };
    let orphan = body
        .get("orphanDependents")
        .and_then(Value::as_bool)
        .or_else(|| flag(query, "orphanDependents"));
    let propagation = if orphan == Some(true) {
        Propagation::Orphan
    } else {
        propagation
    };
    let dry_run = match body.get("dryRun").and_then(Value::as_array) {
        Some(modes) => modes.iter().any(|m| m.as_str() == Some("All")),
        None => dry_run(query)?,
    };
    let pre = body.get("preconditions");
    let pre_text = |key: &str| {
        pre.and_then(|p| p.get(key))
            .and_then(Value::as_str)
            .map(String::from)
    };
    Ok(DeleteOptions {
        uid: pre_text("uid"),
        resource_version: pre_text("resourceVersion"),
        propagation,
        dry_run,
    })
}
