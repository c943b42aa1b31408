//! A pod's IMDS listener: the accept loop on a socket that [`crate::netns`] bound inside the
//! pod's netns, and the hyper glue around the pure rules of [`crate::imds`].

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::imds::{self, Caller, ImdsBackend, ImdsRequest, Reply, Route};
use crate::registry::NetnsShared;

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
    duration: Histogram,
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
        // 50 µs to about 27 s.
        let duration = Histogram::new(exponential_buckets(0.000_05, 2.0, 20));
        registry.register(
            "imds_request_duration_seconds",
            "Time to answer an IMDS request on a pod listener, waits and upstream calls included",
            duration.clone(),
        );
        Self { requests, duration }
    }

    fn count(&self, status: StatusCode, took: Duration) {
        self.duration.observe(took.as_secs_f64());
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
    pub backend: Arc<dyn ImdsBackend>,
    pub metrics: ImdsMetrics,
}

#[derive(Debug)]
struct Context {
    netns: crate::netns::NetnsId,
    port: u16,
    shared: Arc<NetnsShared>,
    env: Arc<ListenerEnv>,
}

/// An open pod listener. Dropping it stops the accept loop and its connections;
/// [`ListenerHandle::close`] also waits until the socket is closed.
#[derive(Debug)]
pub struct ListenerHandle {
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
    netns: crate::netns::NetnsId,
    port: u16,
}

impl ListenerHandle {
    /// Serves IMDS on `listener` (non-blocking, bound in the pod netns `netns`) until closed.
    /// `shared` counts every answered request and names the pod served.
    pub fn start(
        listener: std::net::TcpListener,
        netns: crate::netns::NetnsId,
        port: u16,
        shared: Arc<NetnsShared>,
        env: Arc<ListenerEnv>,
    ) -> io::Result<Self> {
        let listener = TcpListener::from_std(listener)?;
        let cancel = CancellationToken::new();
        let context = Arc::new(Context {
            netns,
            port,
            shared,
            env,
        });
        let task = tokio::spawn(accept_loop(listener, context, cancel.clone()));
        Ok(Self {
            cancel,
            task: Some(task),
            netns,
            port,
        })
    }

    /// Stops accepting, drops every open connection and returns once the socket is closed.
    pub async fn close(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            warn!(netns = %self.netns, port = self.port, error = %e, "listener task failed");
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
                warn!(netns = %context.netns, port = context.port, error = %e, "accept failed");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            debug!(netns = %context.netns, port = context.port, "connection refused: too many open");
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
                    debug!(netns = %context.netns, port = context.port, error = %e, "connection ended with an error");
                },
                () = cancel.cancelled() => {}
            }
        });
    }
    debug!(netns = %context.netns, port = context.port, "listener closed");
}

async fn answer(context: &Context, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let headers = request.headers();
    let imds_request = ImdsRequest {
        method: request.method().as_str(),
        path: request.uri().path(),
        query: request.uri().query(),
        metadata: headers.get("metadata").map(HeaderValue::as_bytes),
        forwarded_for: headers.contains_key("x-forwarded-for"),
    };
    let caller = || Caller {
        netns: context.netns,
        port: context.port,
        pod: context.shared.pod(),
    };
    let (route, reply) = match imds::classify(&imds_request) {
        Route::Reject(error) => ("checks", Err(error)),
        Route::Token(token) => (
            "token",
            Ok(context.env.backend.token(&caller(), token).await),
        ),
        Route::Metadata(metadata) => (
            "metadata",
            Ok(context.env.backend.metadata(&caller(), metadata).await),
        ),
    };
    let (response, cached) = match reply {
        Err(error) => (error_response(&error), false),
        Ok(Reply::Failure(failure)) => (error_response(&failure.error()), false),
        Ok(Reply::Token { body, cached }) => (json_response(StatusCode::OK, body), cached),
        Ok(Reply::Relay(relayed)) => {
            let mut response = Response::new(Full::new(relayed.body));
            *response.status_mut() = relayed.status;
            let content_type = relayed
                .content_type
                .and_then(|v| HeaderValue::from_str(&v).ok())
                .unwrap_or(HeaderValue::from_static(imds::CONTENT_TYPE));
            response.headers_mut().insert(CONTENT_TYPE, content_type);
            if let Some(value) = relayed
                .retry_after
                .and_then(|v| HeaderValue::from_str(&v).ok())
            {
                response.headers_mut().insert(RETRY_AFTER, value);
            }
            (response, false)
        }
    };
    let took = started.elapsed();
    context.shared.count_request();
    context.env.metrics.count(response.status(), took);
    let status = response.status().as_u16();
    let took_ms = took.as_secs_f64() * 1000.0;
    // Like NMI's "status (N) took X ms", at info for what matters: every token-route answer
    // but cached tokens, whose volume would drown the log.
    if route == "checks" || cached {
        debug!(netns = %context.netns, route, status, took_ms, "imds request answered");
    } else {
        info!(netns = %context.netns, route, status, took_ms, "imds request answered");
    }
    response
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(imds::CONTENT_TYPE));
    response
}

fn error_response(error: &imds::ImdsError) -> Response<Full<Bytes>> {
    let mut response = json_response(error.status, error.body());
    if let Some(seconds) = error.retry_after {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
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
                backend: Arc::new(NoIdentities),
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
        let shared = Arc::new(NetnsShared::default());
        let (env, registry) = env();
        let netns = NetnsId { dev: 1, ino: 2 };
        let handle =
            ListenerHandle::start(std_listener, netns, port, Arc::clone(&shared), env).unwrap();

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
        assert_eq!(shared.requests(), 2);
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

    /// A backend answering every token request with a 404 to retry and every instance
    /// request with a relayed IMDS answer; it records who asked.
    #[derive(Debug, Default)]
    struct Scripted {
        callers: std::sync::Mutex<Vec<Caller>>,
    }

    #[async_trait::async_trait]
    impl ImdsBackend for Scripted {
        async fn token(&self, caller: &Caller, _request: imds::TokenRequest) -> Reply {
            self.callers.lock().unwrap().push(caller.clone());
            Reply::Failure(imds::Failure::PodNotFound)
        }

        async fn metadata(&self, _caller: &Caller, _request: imds::MetadataRequest) -> Reply {
            Reply::Relay(imds::Relayed {
                status: StatusCode::TOO_MANY_REQUESTS,
                content_type: Some("text/plain".into()),
                retry_after: Some("3".into()),
                body: Bytes::from_static(b"slow down"),
            })
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn retry_after_relays_and_the_pod_of_the_netns() {
        use crate::registry::{PodAttribution, PodRef};
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let pod = PodAttribution::Pod(PodRef {
            namespace: "ns".into(),
            name: "web".into(),
            uid: "u1".into(),
        });
        let shared = Arc::new(NetnsShared::attributed(pod.clone()));
        let backend = Arc::new(Scripted::default());
        let mut registry = prometheus_client::registry::Registry::default();
        let env = Arc::new(ListenerEnv {
            backend: Arc::clone(&backend) as Arc<dyn ImdsBackend>,
            metrics: ImdsMetrics::register(&mut registry),
        });
        let netns = NetnsId { dev: 1, ino: 3 };
        let handle = ListenerHandle::start(std_listener, netns, port, shared, env).unwrap();
        let out = tokio::task::spawn_blocking(move || {
            [
                exchange(port, "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=r HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nConnection: close\r\n\r\n"),
                exchange(port, "GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nConnection: close\r\n\r\n"),
            ]
        })
        .await
        .unwrap();
        assert!(out[0].starts_with("HTTP/1.1 404"), "{}", out[0]);
        assert!(out[0].contains("retry-after: 5\r\n"), "{}", out[0]);
        assert!(out[1].starts_with("HTTP/1.1 429"), "{}", out[1]);
        assert!(out[1].contains("retry-after: 3\r\n"), "{}", out[1]);
        assert!(
            out[1].contains("content-type: text/plain\r\n"),
            "{}",
            out[1]
        );
        assert!(out[1].ends_with("slow down"), "{}", out[1]);
        let callers = backend.callers.lock().unwrap().clone();
        assert_eq!(callers.len(), 1);
        assert_eq!((callers[0].netns, callers[0].port), (netns, port));
        assert_eq!(*callers[0].pod, pod);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("imds_request_duration_seconds_count 2"),
            "{text}"
        );
        handle.close().await;
    }
}
