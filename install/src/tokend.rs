//! Asks tokend whether it is ready to serve ADD: `GET /v1/status` over its unix socket, HTTP/1.1
//! (DESIGN.md "Plugin ↔ tokend"), `200 {"ready": true, ...}` when it is.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use podid_api::wire::STATUS_PATH;
use serde::Deserialize;
use tokio::net::UnixStream;

/// Largest status answer read.
const MAX_ANSWER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TokendError {
    #[error("connecting to tokend at {socket}: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("GET {STATUS_PATH} on {socket}: {why}")]
    Http { socket: PathBuf, why: String },
    #[error("GET {STATUS_PATH} on {socket}: no answer within {timeout:?}")]
    Timeout { socket: PathBuf, timeout: Duration },
}

/// The part of tokend's status the installer reads.
#[derive(Debug, Deserialize)]
struct Status {
    ready: bool,
}

/// Whether tokend says it is ready; `Ok(false)` for a `503` or `"ready": false`.
pub async fn is_ready(socket: &Path, timeout: Duration) -> Result<bool, TokendError> {
    match tokio::time::timeout(timeout, ask(socket)).await {
        Ok(answer) => answer,
        Err(_) => Err(TokendError::Timeout {
            socket: socket.to_owned(),
            timeout,
        }),
    }
}

async fn ask(socket: &Path) -> Result<bool, TokendError> {
    let http = |why: String| TokendError::Http {
        socket: socket.to_owned(),
        why,
    };
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| TokendError::Connect {
            socket: socket.to_owned(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(e.to_string()))?;
    let driver = tokio::spawn(connection);
    let request = Request::get(STATUS_PATH)
        .header(hyper::header::HOST, "podid-tokend")
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| http(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| http(e.to_string()))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| http(format!("reading the answer: {e}")))?
        .to_bytes();
    driver.abort();
    let parsed: Option<Status> = serde_json::from_slice(&body).ok();
    match (status, parsed) {
        (StatusCode::OK, Some(Status { ready })) => Ok(ready),
        (StatusCode::SERVICE_UNAVAILABLE, _) => Ok(false),
        (status, _) => Err(http(format!(
            "answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    async fn serve_once(listener: UnixListener, answer: &'static str) {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = vec![0; 4096];
        let n = stream.read(&mut buf).await.unwrap();
        let request = String::from_utf8_lossy(&buf[..n]);
        assert!(
            request.starts_with("GET /v1/status HTTP/1.1\r\n"),
            "{request}"
        );
        stream.write_all(answer.as_bytes()).await.unwrap();
    }

    fn answer(status: &str, body: &str) -> &'static str {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .leak()
    }

    #[tokio::test]
    async fn ready_not_ready_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("tokend.sock");
        let timeout = Duration::from_secs(5);
        for (status, body, expected) in [
            (
                "200 OK",
                r#"{"ready":true,"pods":0,"listenerPort":2579}"#,
                Some(true),
            ),
            ("200 OK", r#"{"ready":false}"#, Some(false)),
            ("503 Service Unavailable", r#"{"ready":false}"#, Some(false)),
            ("500 Internal Server Error", "boom", None),
            ("200 OK", "not json", None),
        ] {
            let _ = std::fs::remove_file(&socket);
            let listener = UnixListener::bind(&socket).unwrap();
            let server = tokio::spawn(serve_once(listener, answer(status, body)));
            let got = is_ready(&socket, timeout).await;
            server.await.unwrap();
            match expected {
                Some(ready) => assert_eq!(got.unwrap(), ready, "{status} {body}"),
                None => {
                    let err = got.unwrap_err().to_string();
                    assert!(err.contains("GET /v1/status on"), "{err}");
                }
            }
        }
        let err = is_ready(&dir.path().join("none.sock"), timeout)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("connecting to tokend at"), "{err}");
    }

    #[tokio::test]
    async fn a_silent_tokend_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("tokend.sock");
        let _listener = UnixListener::bind(&socket).unwrap();
        let err = is_ready(&socket, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, TokendError::Timeout { .. }), "{err}");
    }
}
