//! The client of tokend's API over its unix socket (DESIGN.md "Plugin ↔ tokend").
//!
//! Every exchange (connect, write, read) is bounded by one budget. A unix-socket connect
//! blocks while the listener's backlog is full, so the exchange runs on a helper thread and
//! the caller stops waiting when the budget is spent.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use podid_api::wire::{ErrorBody, PODS_PATH, PodList, PodState, PutAnswer, STATUS_PATH, Status};
use podid_api::{PodKey, PodRecord};
use serde::de::DeserializeOwned;

use crate::http::{self, Answer, HttpError, Progress};

/// Longest tokend message quoted in an error.
const MAX_MESSAGE: usize = 300;

#[derive(Debug, thiserror::Error)]
pub enum TokendError {
    #[error("the socket does not exist")]
    NoSocket,
    #[error("connection refused")]
    Refused,
    #[error("connecting failed: {0}")]
    Connect(io::Error),
    #[error("no complete answer in time")]
    Timeout,
    #[error("I/O error: {0}")]
    Io(io::Error),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("{method} {path} answered HTTP {status}: {message}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        message: String,
    },
    #[error("{method} {path} answered HTTP 200 with an unreadable body: {error}")]
    Body {
        method: &'static str,
        path: String,
        error: String,
    },
}

impl TokendError {
    /// Whether tokend could not be talked to at all (down, starting, wedged, or failing with
    /// 5xx), as opposed to answering something podid did not expect.
    pub fn is_unreachable(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status >= 500,
            Self::Body { .. } => false,
            _ => true,
        }
    }
}

/// tokend's answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// The pod's listener is bound on this port.
    Bound(u16),
    /// 400 or 404: tokend will not take this record, whatever the retries.
    Rejected { status: u16, message: String },
}

#[derive(Debug, Clone)]
pub struct Tokend {
    socket: PathBuf,
    budget: Duration,
}

impl Tokend {
    pub fn new(socket: &Path, budget: Duration) -> Self {
        Self {
            socket: socket.to_owned(),
            budget,
        }
    }

    /// `PUT /v1/pods/{containerId}/{ifname}`.
    pub fn put_pod(&self, record: &PodRecord) -> Result<PutOutcome, TokendError> {
        let path = record.key().api_path();
        let body = serde_json::to_vec(record).map_err(|e| TokendError::Io(e.into()))?;
        let answer = self.exchange("PUT", &path, Some(body))?;
        match answer.status {
            200 => parse_body::<PutAnswer>("PUT", &path, &answer.body)
                .map(|a| PutOutcome::Bound(a.listener_port)),
            status @ (400 | 404) => Ok(PutOutcome::Rejected {
                status,
                message: error_message(&answer.body),
            }),
            status => Err(status_error("PUT", path, status, &answer.body)),
        }
    }

    /// `DELETE /v1/pods/{containerId}/{ifname}`; `Ok(false)` when tokend did not know it.
    pub fn delete_pod(&self, key: &PodKey) -> Result<bool, TokendError> {
        let path = key.api_path();
        let answer = self.exchange("DELETE", &path, None)?;
        match answer.status {
            200 => Ok(true),
            404 => Ok(false),
            status => Err(status_error("DELETE", path, status, &answer.body)),
        }
    }

    /// `GET /v1/pods/{containerId}/{ifname}`; `Ok(None)` on 404.
    pub fn get_pod(&self, key: &PodKey) -> Result<Option<PodState>, TokendError> {
        let path = key.api_path();
        let answer = self.exchange("GET", &path, None)?;
        match answer.status {
            200 => parse_body("GET", &path, &answer.body).map(Some),
            404 => Ok(None),
            status => Err(status_error("GET", path, status, &answer.body)),
        }
    }

    /// `GET /v1/pods`.
    pub fn list_pods(&self) -> Result<PodList, TokendError> {
        let answer = self.exchange("GET", PODS_PATH, None)?;
        match answer.status {
            200 => parse_body("GET", PODS_PATH, &answer.body),
            status => Err(status_error(
                "GET",
                PODS_PATH.to_owned(),
                status,
                &answer.body,
            )),
        }
    }

    /// `GET /v1/status`: tokend answers 200 when ready and 503 with the same body when not.
    pub fn status(&self) -> Result<Status, TokendError> {
        let answer = self.exchange("GET", STATUS_PATH, None)?;
        match answer.status {
            200 => parse_body("GET", STATUS_PATH, &answer.body),
            503 => match serde_json::from_slice::<Status>(&answer.body) {
                Ok(status) => Ok(status),
                Err(_) => Err(status_error(
                    "GET",
                    STATUS_PATH.to_owned(),
                    503,
                    &answer.body,
                )),
            },
            status => Err(status_error(
                "GET",
                STATUS_PATH.to_owned(),
                status,
                &answer.body,
            )),
        }
    }

    fn exchange(
        &self,
        method: &'static str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, TokendError> {
        let deadline = Instant::now() + self.budget;
        let request = http::request(method, path, body.as_deref());
        let socket = self.socket.clone();
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name("tokend-client".to_owned())
            .spawn(move || {
                // The caller may have stopped waiting; then nobody needs the answer.
                let _ = tx.send(exchange_blocking(&socket, deadline, &request));
            })
            .map_err(TokendError::Io)?;
        match rx.recv_timeout(self.budget) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(TokendError::Timeout),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(TokendError::Io(io::Error::other(
                "the client thread ended without an answer",
            ))),
        }
    }
}

fn exchange_blocking(
    socket: &Path,
    deadline: Instant,
    request: &[u8],
) -> Result<Answer, TokendError> {
    let mut stream = UnixStream::connect(socket).map_err(|cause| match cause.kind() {
        io::ErrorKind::NotFound => TokendError::NoSocket,
        io::ErrorKind::ConnectionRefused => TokendError::Refused,
        _ => TokendError::Connect(cause),
    })?;
    stream
        .set_write_timeout(Some(remaining(deadline)?))
        .map_err(TokendError::Io)?;
    stream.write_all(request).map_err(io_error)?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        stream
            .set_read_timeout(Some(remaining(deadline)?))
            .map_err(TokendError::Io)?;
        let read = stream.read(&mut chunk).map_err(io_error)?;
        buf.extend_from_slice(&chunk[..read]);
        if let Progress::Complete(answer) = http::parse_answer(&buf, read == 0)? {
            return Ok(answer);
        }
    }
}

fn remaining(deadline: Instant) -> Result<Duration, TokendError> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or(TokendError::Timeout)
}

fn io_error(e: io::Error) -> TokendError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TokendError::Timeout,
        _ => TokendError::Io(e),
    }
}

fn parse_body<T: DeserializeOwned>(
    method: &'static str,
    path: &str,
    body: &[u8],
) -> Result<T, TokendError> {
    serde_json::from_slice(body).map_err(|e| TokendError::Body {
        method,
        path: path.to_owned(),
        error: e.to_string(),
    })
}

fn status_error(method: &'static str, path: String, status: u16, body: &[u8]) -> TokendError {
    TokendError::Status {
        method,
        path,
        status,
        message: error_message(body),
    }
}

/// tokend's `{"error": "..."}` text, or the body itself when it is not that shape.
pub fn error_message(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => e.error,
        Err(_) if body.is_empty() => "(empty body)".to_owned(),
        Err(_) => String::from_utf8_lossy(body).trim().to_owned(),
    };
    match text.char_indices().nth(MAX_MESSAGE) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// Serves one connection with `answer` after reading the request head.
    fn serve_once(answer: &'static [u8], delay: Duration) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokend.sock");
        let listener = UnixListener::bind(&path).unwrap();
        thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            thread::sleep(delay);
            let _ = conn.write_all(answer);
        });
        (dir, path)
    }

    fn record() -> PodRecord {
        PodRecord {
            container_id: "abc".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            netns_inode: 1,
            netns_dev: 2,
            pod_namespace: None,
            pod_name: None,
            pod_uid: None,
            ips: vec![],
            network: None,
        }
    }

    #[test]
    fn put_bound() {
        let (_dir, path) = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Length: 21\r\n\r\n{\"listenerPort\":2600}",
            Duration::ZERO,
        );
        let tokend = Tokend::new(&path, Duration::from_secs(2));
        assert_eq!(tokend.put_pod(&record()).unwrap(), PutOutcome::Bound(2600));
    }

    #[test]
    fn put_rejected_carries_tokends_message() {
        let (_dir, path) = serve_once(
            b"HTTP/1.1 404 Not Found\r\n\r\n{\"error\":\"netns /run/netns/x not found\"}",
            Duration::ZERO,
        );
        let tokend = Tokend::new(&path, Duration::from_secs(2));
        assert_eq!(
            tokend.put_pod(&record()).unwrap(),
            PutOutcome::Rejected {
                status: 404,
                message: "netns /run/netns/x not found".into()
            }
        );
    }

    #[test]
    fn unavailable_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Tokend::new(&dir.path().join("none.sock"), Duration::from_secs(1));
        let err = missing.put_pod(&record()).unwrap_err();
        assert!(
            matches!(err, TokendError::NoSocket) && err.is_unreachable(),
            "{err}"
        );

        let (_dir, path) = serve_once(
            b"HTTP/1.1 503 Service Unavailable\r\n\r\n{\"error\":\"starting\"}",
            Duration::ZERO,
        );
        let err = Tokend::new(&path, Duration::from_secs(2))
            .put_pod(&record())
            .unwrap_err();
        assert!(
            err.is_unreachable() && err.to_string().contains("starting"),
            "{err}"
        );

        let (_dir, path) = serve_once(b"HTTP/1.1 200 OK\r\n\r\n{}", Duration::from_millis(600));
        let started = Instant::now();
        let err = Tokend::new(&path, Duration::from_millis(200))
            .put_pod(&record())
            .unwrap_err();
        assert!(matches!(err, TokendError::Timeout), "{err}");
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn error_messages() {
        assert_eq!(error_message(br#"{"error":"bad ifname"}"#), "bad ifname");
        assert_eq!(error_message(b" plain text\n"), "plain text");
        assert_eq!(error_message(b""), "(empty body)");
        assert!(error_message("x".repeat(1000).as_bytes()).len() < 400);
    }
}
