//! The plugin ↔ tokend API on the unix socket (api/src/wire.rs): routing, bodies, and the one
//! place where [`NodeError`]s become HTTP statuses.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use podid_api::PodKey;
use podid_api::pod::{decode_segment, validate_container_id, validate_ifname};
use podid_api::wire::{ErrorBody, PODS_PATH, PutAnswer, STATUS_PATH};
use serde::Serialize;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::node::{Node, NodeError};

/// Largest request body accepted; a pod record is well under 2 KiB.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

type Answer = Response<Full<Bytes>>;

/// An early refusal: status and message, turned into an [`ErrorBody`] answer by the caller.
type Refusal = (StatusCode, String);

/// Serves the API on `listener` until `shutdown`, then waits for the requests in flight.
pub async fn serve(listener: UnixListener, node: Arc<Node>, shutdown: CancellationToken) {
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "api accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let node = Arc::clone(&node);
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let node = Arc::clone(&node);
                async move { Ok::<_, Infallible>(handle(&node, request).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => if let Err(e) = result {
                    debug!(error = %e, "api connection ended with an error");
                },
                () = shutdown.cancelled() => {
                    // Finish the request in progress, then close.
                    connection.as_mut().graceful_shutdown();
                    if let Err(e) = connection.await {
                        debug!(error = %e, "api connection ended with an error");
                    }
                }
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// The routes of wire.rs.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Status,
    Pods,
    Pod(PodKey),
}

/// Routes one request and answers it.
pub async fn handle(node: &Node, request: Request<Incoming>) -> Answer {
    let target = match route(request.uri().path()) {
        Ok(target) => target,
        Err((status, message)) => return error(status, message),
    };
    let method = request.method().clone();
    match (&target, &method) {
        (Target::Status, &Method::GET | &Method::HEAD) => {
            let status = node.status().await;
            let code = if status.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(code, &status)
        }
        (Target::Pods, &Method::GET | &Method::HEAD) => json(StatusCode::OK, &node.list().await),
        (Target::Pod(key), &Method::GET | &Method::HEAD) => match node.get(key).await {
            Ok(state) => json(StatusCode::OK, &state),
            Err(e) => node_error(&e),
        },
        (Target::Pod(key), &Method::PUT) => {
            let body = match read_body(request).await {
                Ok(body) => body,
                Err((status, message)) => return error(status, message),
            };
            let record = match serde_json::from_slice(&body) {
                Ok(record) => record,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("the body is not a pod record: {e}"),
                    );
                }
            };
            match node.put(key, record).await {
                Ok(listener_port) => json(StatusCode::OK, &PutAnswer { listener_port }),
                Err(e) => node_error(&e),
            }
        }
        (Target::Pod(key), &Method::DELETE) => match node.delete(key).await {
            Ok(()) => json(StatusCode::OK, &serde_json::json!({})),
            Err(e) => node_error(&e),
        },
        (Target::Pod(_), _) => method_not_allowed(&method, "GET, HEAD, PUT, DELETE"),
        (Target::Status | Target::Pods, _) => method_not_allowed(&method, "GET, HEAD"),
    }
}

fn route(path: &str) -> Result<Target, Refusal> {
    if path == STATUS_PATH {
        return Ok(Target::Status);
    }
    if path == PODS_PATH {
        return Ok(Target::Pods);
    }
    let not_found = || (StatusCode::NOT_FOUND, format!("no route {path}"));
    let Some(rest) = path
        .strip_prefix(PODS_PATH)
        .and_then(|rest| rest.strip_prefix('/'))
    else {
        return Err(not_found());
    };
    let Some((container_id, ifname)) = rest.split_once('/') else {
        return Err(not_found());
    };
    if ifname.contains('/') {
        return Err(not_found());
    }
    let bad_escape = |s: &str| {
        (
            StatusCode::BAD_REQUEST,
            format!("path segment {s:?} has a malformed percent escape"),
        )
    };
    let container_id = decode_segment(container_id).ok_or_else(|| bad_escape(container_id))?;
    let ifname = decode_segment(ifname).ok_or_else(|| bad_escape(ifname))?;
    let (container_id, ifname) = (container_id.as_str(), ifname.as_str());
    validate_container_id(container_id)
        .and_then(|()| validate_ifname(ifname))
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(Target::Pod(PodKey::new(container_id, ifname)))
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, Refusal> {
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(too_large()),
        Err(e) => Err((
            StatusCode::BAD_REQUEST,
            format!("cannot read the body: {e}"),
        )),
    }
}

/// Every [`NodeError`] to its status: 400 bad record, 404 netns or pod not found, 503 not
/// ready, 500 for tokend's own failures.
fn status_of(e: &NodeError) -> StatusCode {
    match e {
        NodeError::KeyMismatch { .. } | NodeError::InvalidRecord(_) => StatusCode::BAD_REQUEST,
        NodeError::UnsupportedNetns(_) | NodeError::NotFound(_) => StatusCode::NOT_FOUND,
        NodeError::Netns(e) if e.is_gone_or_changed() => StatusCode::NOT_FOUND,
        NodeError::NotReady => StatusCode::SERVICE_UNAVAILABLE,
        NodeError::Netns(_) | NodeError::Listener { .. } | NodeError::Store(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

fn node_error(e: &NodeError) -> Answer {
    error(status_of(e), e.to_string())
}

fn method_not_allowed(method: &Method, allow: &'static str) -> Answer {
    let mut answer = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed here; allowed: {allow}"),
    );
    answer
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    answer
}

fn error(status: StatusCode, message: String) -> Answer {
    json(status, &ErrorBody { error: message })
}

fn json(status: StatusCode, value: &impl Serialize) -> Answer {
    let body = serde_json::to_vec(value)
        .unwrap_or_else(|e| format!(r#"{{"error":"cannot encode the answer: {e}"}}"#).into_bytes());
    let mut answer = Response::new(Full::new(Bytes::from(body)));
    *answer.status_mut() = status;
    answer
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(result: Result<Target, Refusal>) -> u16 {
        match result {
            Ok(target) => panic!("expected an error, got {target:?}"),
            Err((status, _)) => status.as_u16(),
        }
    }

    #[test]
    fn routes() {
        assert_eq!(route("/v1/status").unwrap(), Target::Status);
        assert_eq!(route("/v1/pods").unwrap(), Target::Pods);
        assert_eq!(
            route("/v1/pods/abc123/eth0").unwrap(),
            Target::Pod(PodKey::new("abc123", "eth0"))
        );
        for unknown in [
            "/",
            "/v1",
            "/v1/pods/",
            "/v1/pods/abc",
            "/v1/pods/a/b/c",
            "/v2/pods",
            "/v1/statusx",
        ] {
            assert_eq!(status(route(unknown)), 404, "{unknown}");
        }
        for bad in [
            "/v1/pods/-abc/eth0",
            "/v1/pods/abc/",
            "/v1/pods/abc/a:b",
            "/v1/pods//eth0",
            "/v1/pods/abc/0123456789abcdefg",
        ] {
            assert_eq!(status(route(bad)), 400, "{bad}");
        }
    }

    #[test]
    fn bad_segments_are_named() {
        let Err((_, message)) = route("/v1/pods/abc/..") else {
            panic!("accepted ..");
        };
        assert!(message.contains("\"..\""), "{message}");
        let Err((_, message)) = route("/v1/pods/a:b/eth0") else {
            panic!("accepted a:b");
        };
        assert!(message.contains("\"a:b\""), "{message}");
    }

    #[test]
    fn error_statuses() {
        use crate::netns::{NetnsError, NetnsId};
        use podid_api::RecordError;
        let path = std::path::PathBuf::from("/run/netns/x");
        let id = NetnsId { dev: 1, ino: 2 };
        for (e, code) in [
            (NodeError::InvalidRecord(RecordError::Ip("x".into())), 400),
            (
                NodeError::KeyMismatch {
                    path: PodKey::new("a", "eth0"),
                    body: PodKey::new("b", "eth0"),
                },
                400,
            ),
            (
                NodeError::UnsupportedNetns(RecordError::NetnsUnsupported("/proc/1/ns/net".into())),
                404,
            ),
            (
                NodeError::Netns(NetnsError::Gone { path: path.clone() }),
                404,
            ),
            (
                NodeError::Netns(NetnsError::Changed {
                    path: path.clone(),
                    expected: id,
                    found: id,
                }),
                404,
            ),
            (
                NodeError::Netns(NetnsError::Bind {
                    path,
                    port: 2579,
                    source: std::io::ErrorKind::AddrInUse.into(),
                }),
                500,
            ),
            (NodeError::NotFound(PodKey::new("a", "eth0")), 404),
            (NodeError::NotReady, 503),
        ] {
            assert_eq!(status_of(&e).as_u16(), code, "{e}");
        }
    }
}
