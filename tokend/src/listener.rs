//! A pod's IMDS listener: the accept loop on a socket that [`crate::netns`] bound inside the
//! pod's netns, and the hyper glue around the pure rules of [`crate::imds`].

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::imds::{self, Caller, IdentityResolver, ImdsRequest, Route};

/// Connections one pod may hold open at once: a pod must not exhaust tokend's descriptors.
const MAX_CONNECTIONS_PER_LISTENER: usize = 64;
/// Pause after a failed accept (out of descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeClassLabels {
    code_class: &'static str,
}

/// The metrics the pod listeners count.
#[derive(Debug, Clone)]
pub struct ImdsMetrics {
    requests: Family<CodeClassLabels, Counter>,
}

impl ImdsMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let requests = Family::<CodeClassLabels, Counter>::default();
        registry.register(
            "imds_requests",
            "IMDS requests answered on pod listeners, by status class",
            requests.clone(),
        );
        for code_class in ["2xx", "4xx", "5xx"] {
            requests
                .get_or_create(&CodeClassLabels { code_class })
                .inc_by(0);
        }
        Self { requests }
    }

    fn count(&self, status: StatusCode) {
        let code_class = match status.as_u16() {
            200..=299 => "2xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "other",
        };
        self.requests
            .get_or_create(&CodeClassLabels { code_class })
            .inc();
    }
}

/// What every pod listener shares: the identity step and the metrics.
#[derive(Debug)]
pub struct ListenerEnv {
    pub identity: Arc<dyn IdentityResolver>,
    pub metrics: ImdsMetrics,
}

#[derive(Debug)]
struct Context {
    caller: Caller,
    requests: Arc<AtomicU64>,
    env: Arc<ListenerEnv>,
}

/// An open pod listener. Dropping it stops the accept loop and its connections;
/// [`ListenerHandle::close`] also waits until the socket is closed.
#[derive(Debug)]
pub struct ListenerHandle {
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
    caller: Caller,
}

impl ListenerHandle {
    /// Serves IMDS on `listener` (non-blocking, bound in the pod netns) until closed.
    /// `requests` counts every answered request.
    pub fn start(
        listener: std::net::TcpListener,
        caller: Caller,
        requests: Arc<AtomicU64>,
        env: Arc<ListenerEnv>,
    ) -> io::Result<Self> {
        let listener = TcpListener::from_std(listener)?;
        let cancel = CancellationToken::new();
        let context = Arc::new(Context {
            caller,
            requests,
            env,
        });
        let task = tokio::spawn(accept_loop(listener, context, cancel.clone()));
        Ok(Self {
            cancel,
            task: Some(task),
            caller,
        })
    }

    /// Stops accepting, drops every open connection and returns once the socket is closed.
    pub async fn close(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            warn!(netns = %self.caller.netns, port = self.caller.port, error = %e, "listener task failed");
        }
    }
}

impl Drop for ListenerHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn accept_loop(listener: TcpListener, context: Arc<Context>, cancel: CancellationToken) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS_PER_LISTENER));
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(netns = %context.caller.netns, port = context.caller.port, error = %e, "accept failed");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            debug!(netns = %context.caller.netns, port = context.caller.port, "connection refused: too many open");
            continue;
        };
        let context = Arc::clone(&context);
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service_context = Arc::clone(&context);
            let service = service_fn(move |request| {
                let context = Arc::clone(&service_context);
                async move { Ok::<_, Infallible>(answer(&context, &request).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = connection => if let Err(e) = result {
                    debug!(netns = %context.caller.netns, port = context.caller.port, error = %e, "connection ended with an error");
                },
                () = cancel.cancelled() => {}
            }
        });
    }
    debug!(netns = %context.caller.netns, port = context.caller.port, "listener closed");
}

async fn answer(context: &Context, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let headers = request.headers();
    let imds_request = ImdsRequest {
        method: request.method().as_str(),
        path: request.uri().path(),
        query: request.uri().query(),
        metadata: headers.get("metadata").map(HeaderValue::as_bytes),
        forwarded_for: headers.contains_key("x-forwarded-for"),
    };
    let error = match imds::classify(&imds_request) {
        Route::Reject(error) => error,
        Route::Token(token) => {
            let answer = context.env.identity.resolve(context.caller, &token).await;
            imds::identity_error(&answer)
        }
    };
    context.requests.fetch_add(1, Ordering::Relaxed);
    context.env.metrics.count(error.status);
    debug!(
        netns = %context.caller.netns,
        port = context.caller.port,
        status = error.status.as_u16(),
        error = error.error,
        "imds request answered"
    );
    let mut response = Response::new(Full::new(Bytes::from(error.body())));
    *response.status_mut() = error.status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(imds::CONTENT_TYPE));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imds::NoIdentities;
    use crate::netns::NetnsId;
    use std::io::{Read, Write};

    fn env() -> (Arc<ListenerEnv>, prometheus_client::registry::Registry) {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = ImdsMetrics::register(&mut registry);
        (
            Arc::new(ListenerEnv {
                identity: Arc::new(NoIdentities),
                metrics,
            }),
            registry,
        )
    }

    fn exchange(port: u16, request: &str) -> String {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).unwrap();
        out
    }

    /// The glue on a loopback socket of the test's own netns (no setns needed).
    #[tokio::test(flavor = "multi_thread")]
    async fn serves_imds_counts_and_closes() {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicU64::new(0));
        let (env, registry) = env();
        let caller = Caller {
            netns: NetnsId { dev: 1, ino: 2 },
            port,
        };
        let handle =
            ListenerHandle::start(std_listener, caller, Arc::clone(&requests), env).unwrap();

        let out = tokio::task::spawn_blocking(move || {
            [
                exchange(port, "GET /metadata/identity/oauth2/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
                exchange(port, "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=r HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nConnection: close\r\n\r\n"),
            ]
        })
        .await
        .unwrap();
        assert!(out[0].starts_with("HTTP/1.1 400"), "{}", out[0]);
        assert!(
            out[0].contains("content-type: application/json; charset=utf-8"),
            "{}",
            out[0]
        );
        assert!(
            out[0].contains("Required metadata header not specified"),
            "{}",
            out[0]
        );
        assert!(out[1].starts_with("HTTP/1.1 400"), "{}", out[1]);
        assert!(
            out[1].contains(r#""error_description":"Identity not found""#),
            "{}",
            out[1]
        );
        assert_eq!(requests.load(Ordering::Relaxed), 2);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"imds_requests_total{code_class="4xx"} 2"#),
            "{text}"
        );

        // An idle keep-alive connection is dropped with the listener.
        let mut idle = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        handle.close().await;
        let refused = std::net::TcpStream::connect(("127.0.0.1", port));
        assert!(
            refused.is_err(),
            "the socket is closed once close() returns"
        );
        idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(idle.read(&mut buf), Ok(0) | Err(_)));
    }
}
