//! A pod's IMDS listener: the accept loop on a socket that [`crate::netns`] bound inside the
//! pod's netns, and the hyper glue around the pure rules of [`crate::imds`].

use std::convert::Infallible;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
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

use crate::imds::{self, Caller, Generation, ImdsBackend, ImdsRequest, Reply, Route};
use crate::registry::{NetnsShared, PodAttribution};
use crate::token::unix_now;

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
    /// `requests{code_class="2xx"}`, resolved once for the hot path.
    ok: Counter,
    duration: Histogram,
    refused: Counter,
    heap_releases: Counter,
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
        let refused = Counter::default();
        registry.register(
            "imds_connections_refused",
            "Pod connections closed at once because --max-connections were open on the node",
            refused.clone(),
        );
        let heap_releases = Counter::default();
        registry.register(
            "imds_heap_releases",
            "Times the memory of a burst of pod connections was given back to the system",
            heap_releases.clone(),
        );
        let ok = requests
            .get_or_create(&CodeClassLabels { code_class: "2xx" })
            .clone();
        Self {
            requests,
            ok,
            duration,
            refused,
            heap_releases,
        }
    }

    fn count(&self, status: StatusCode, took: Duration) {
        self.duration.observe(took.as_secs_f64());
        match status.as_u16() {
            200..=299 => self.ok.inc(),
            code_class => self
                .requests
                .get_or_create(&CodeClassLabels {
                    code_class: match code_class {
                        400..=499 => "4xx",
                        500..=599 => "5xx",
                        _ => "other",
                    },
                })
                .inc(),
        };
    }
}

/// What every pod listener shares: the identity step, the metrics and the node-wide bound on
/// open connections.
#[derive(Debug)]
pub struct ListenerEnv {
    backend: Arc<dyn ImdsBackend>,
    metrics: ImdsMetrics,
    connections: Arc<Semaphore>,
    max_connections: usize,
    /// Connections accepted since the last check of [`ListenerEnv::give_back_memory`].
    accepted: AtomicUsize,
}

impl ListenerEnv {
    /// `max_connections`: pod connections open at once on all listeners together.
    pub fn new(
        backend: Arc<dyn ImdsBackend>,
        metrics: ImdsMetrics,
        max_connections: usize,
    ) -> Self {
        let max_connections = max_connections.max(1);
        Self {
            backend,
            metrics,
            connections: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            accepted: AtomicUsize::new(0),
        }
    }

    /// Pod connections open now, on all listeners.
    pub fn open_connections(&self) -> usize {
        self.max_connections
            .saturating_sub(self.connections.available_permits())
    }

    /// Gives the heap a burst of connections left behind back to the system once the burst is
    /// over, checking every `every` until `shutdown`. Each connection takes about 20 KiB
    /// (hyper's buffers, its task) that the allocator keeps after it closes: without this,
    /// tokend would stay at its largest burst's size, and grow with fragmentation.
    pub async fn give_back_memory(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut burst_seen = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let accepted = self.accepted.swap(0, Ordering::Relaxed);
            burst_seen |= accepted >= TRIM_AFTER_CONNECTIONS;
            if burst_seen && self.open_connections() < TRIM_AFTER_CONNECTIONS / 4 {
                burst_seen = false;
                let started = Instant::now();
                let released = tokio::task::spawn_blocking(release_free_heap).await;
                self.metrics.heap_releases.inc();
                debug!(
                    took_ms = started.elapsed().as_secs_f64() * 1000.0,
                    released = matches!(released, Ok(true)),
                    "gave the memory of a burst of connections back"
                );
            }
        }
    }
}

/// Connections accepted between two checks of [`ListenerEnv::give_back_memory`] that make a
/// burst worth giving memory back after.
const TRIM_AFTER_CONNECTIONS: usize = 128;

/// Gives the free heap pages of every arena back to the system (glibc's `malloc_trim`). The
/// one `unsafe` of tokend: no safe binding of it exists (`nix` has none).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_free_heap() -> bool {
    // SAFETY: malloc_trim only walks the allocator's own free lists, under its own locks.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_heap() -> bool {
    false
}

/// The last answer of a listener that may be sent again as it is: a cached token (see
/// [`ImdsBackend::generation`]). The checks of [`imds::classify`] read only the method, path,
/// query, `Metadata` value and whether `X-Forwarded-For` is present, so a request equal in
/// these is classified the same; with the same pod (the same record set), the same generation
/// and the same second, the backend would render the same body.
#[derive(Debug)]
struct Memo {
    path: Box<str>,
    query: Box<str>,
    metadata: Box<[u8]>,
    pod: Arc<PodAttribution>,
    generation: Generation,
    second: i64,
    body: Bytes,
}

impl Memo {
    fn answers(
        &self,
        request: &ImdsRequest<'_>,
        pod: &Arc<PodAttribution>,
        generation: Generation,
        second: i64,
    ) -> bool {
        request.method == "GET"
            && !request.forwarded_for
            && self.second == second
            && self.generation == generation
            && Arc::ptr_eq(&self.pod, pod)
            && *self.path == *request.path
            && request.query.is_some_and(|q| *self.query == *q)
            && request.metadata.is_some_and(|m| *self.metadata == *m)
    }
}

#[derive(Debug)]
struct Context {
    netns: crate::netns::NetnsId,
    port: u16,
    shared: Arc<NetnsShared>,
    env: Arc<ListenerEnv>,
    memo: Mutex<Option<Memo>>,
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
            memo: Mutex::new(None),
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
            debug!(netns = %context.netns, port = context.port, "connection refused: too many open in this pod");
            continue;
        };
        let Ok(node_permit) = Arc::clone(&context.env.connections).try_acquire_owned() else {
            context.env.metrics.refused.inc();
            debug!(netns = %context.netns, port = context.port, "connection refused: too many open on the node (--max-connections)");
            continue;
        };
        context.env.accepted.fetch_add(1, Ordering::Relaxed);
        let context = Arc::clone(&context);
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _permits = (permit, node_permit);
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
    let caller = Caller {
        netns: context.netns,
        port: context.port,
        pod: context.shared.pod(),
    };
    // Read before the backend looks at anything: a change after this moves it.
    let generation = context.env.backend.generation();
    let (route, reply) = match repeat(context, &imds_request, &caller, generation) {
        Some(reply) => ("token", Ok(reply)),
        None => match imds::classify(&imds_request) {
            Route::Reject(error) => ("checks", Err(error)),
            Route::Token(token) => {
                let memoizable = !token.bypass_cache && token.refresh_sha256.is_none();
                let reply = context.env.backend.token(&caller, token).await;
                if memoizable {
                    remember(context, &imds_request, &caller, generation, &reply);
                }
                ("token", Ok(reply))
            }
            Route::Metadata(metadata) => (
                "metadata",
                Ok(context.env.backend.metadata(&caller, metadata).await),
            ),
        },
    };
    let (response, cached) = match reply {
        Err(error) => (error_response(&error), false),
        Ok(Reply::Failure(failure)) => (error_response(&failure.error()), false),
        Ok(Reply::Token { body, cached, .. }) => (json_response(StatusCode::OK, body), cached),
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

/// The listener's memo of this very answer, when it still holds (the backend admits it as a
/// request of the pod first); `None`: the request takes the full path.
fn repeat(
    context: &Context,
    request: &ImdsRequest<'_>,
    caller: &Caller,
    generation: Option<Generation>,
) -> Option<Reply> {
    let generation = generation?;
    let (body, rendered_at) = {
        let memo = context.memo.lock().unwrap_or_else(PoisonError::into_inner);
        let memo = memo.as_ref()?;
        if !memo.answers(request, &caller.pod, generation, unix_now()) {
            return None;
        }
        (memo.body.clone(), memo.second)
    };
    Some(match context.env.backend.admit_repeat(caller) {
        Ok(()) => Reply::Token {
            body,
            cached: true,
            rendered_at,
        },
        Err(refused) => refused,
    })
}

/// Keeps `reply` as the listener's memo if it is a token answered from the cache.
fn remember(
    context: &Context,
    request: &ImdsRequest<'_>,
    caller: &Caller,
    generation: Option<Generation>,
    reply: &Reply,
) {
    let (
        Some(generation),
        Reply::Token {
            body,
            cached: true,
            rendered_at,
        },
        Some(query),
        Some(metadata),
    ) = (generation, reply, request.query, request.metadata)
    else {
        return;
    };
    let memo = Memo {
        path: request.path.into(),
        query: query.into(),
        metadata: metadata.into(),
        pod: Arc::clone(&caller.pod),
        generation,
        second: *rendered_at,
        body: body.clone(),
    };
    *context.memo.lock().unwrap_or_else(PoisonError::into_inner) = Some(memo);
}

fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
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
            Arc::new(ListenerEnv::new(Arc::new(NoIdentities), metrics, 1024)),
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
        let env = Arc::new(ListenerEnv::new(
            Arc::clone(&backend) as Arc<dyn ImdsBackend>,
            ImdsMetrics::register(&mut registry),
            1024,
        ));
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

    /// A backend answering every token request with a 200 marked cached or not, under a
    /// generation the test moves; it counts calls and can refuse repeats.
    #[derive(Debug)]
    struct Tokens {
        cached: std::sync::atomic::AtomicBool,
        generation: std::sync::Mutex<Generation>,
        calls: std::sync::atomic::AtomicUsize,
        repeats: std::sync::atomic::AtomicUsize,
        refuse_repeats: std::sync::atomic::AtomicBool,
    }

    impl Tokens {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                cached: true.into(),
                generation: std::sync::Mutex::new(Generation {
                    cluster: 0,
                    cache: 0,
                }),
                calls: 0.into(),
                repeats: 0.into(),
                refuse_repeats: false.into(),
            })
        }

        fn calls(&self) -> usize {
            self.calls.load(std::sync::atomic::Ordering::SeqCst)
        }

        fn repeats(&self) -> usize {
            self.repeats.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    #[async_trait::async_trait]
    impl ImdsBackend for Tokens {
        async fn token(&self, _caller: &Caller, request: imds::TokenRequest) -> Reply {
            let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Reply::Token {
                body: Bytes::from(format!(r#"{{"n":{n},"resource":"{}"}}"#, request.resource)),
                cached: self.cached.load(std::sync::atomic::Ordering::SeqCst),
                rendered_at: unix_now(),
            }
        }

        async fn metadata(&self, _caller: &Caller, _request: imds::MetadataRequest) -> Reply {
            Reply::Failure(imds::Failure::InstanceMetadataDenied)
        }

        fn generation(&self) -> Option<Generation> {
            Some(*self.generation.lock().unwrap())
        }

        fn admit_repeat(&self, _caller: &Caller) -> Result<(), Reply> {
            self.repeats
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self
                .refuse_repeats
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return Err(Reply::Failure(imds::Failure::RateLimited {
                    retry_after: 1,
                }));
            }
            Ok(())
        }
    }

    const TOKEN: &str = "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=r HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nConnection: close\r\n\r\n";

    struct MemoRig {
        port: u16,
        shared: Arc<NetnsShared>,
        backend: Arc<Tokens>,
        handle: ListenerHandle,
    }

    fn memo_rig() -> MemoRig {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let shared = Arc::new(NetnsShared::attributed(pod_a()));
        let backend = Tokens::new();
        let mut registry = prometheus_client::registry::Registry::default();
        let env = Arc::new(ListenerEnv::new(
            Arc::clone(&backend) as Arc<dyn ImdsBackend>,
            ImdsMetrics::register(&mut registry),
            1024,
        ));
        let netns = NetnsId { dev: 1, ino: 4 };
        let handle =
            ListenerHandle::start(std_listener, netns, port, Arc::clone(&shared), env).unwrap();
        MemoRig {
            port,
            shared,
            backend,
            handle,
        }
    }

    fn pod_a() -> PodAttribution {
        PodAttribution::Pod(crate::registry::PodRef {
            namespace: "ns".into(),
            name: "a".into(),
            uid: "ua".into(),
        })
    }

    /// Waits until just after the start of a unix second, so that the next few requests
    /// (well under a second) fall within one second.
    async fn second_start() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let into = Duration::from_nanos(u64::from(now.subsec_nanos()));
        tokio::time::sleep(Duration::from_secs(1) - into + Duration::from_millis(5)).await;
    }

    async fn send(port: u16, request: &'static str) -> String {
        tokio::task::spawn_blocking(move || exchange(port, request))
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_repeated_cached_answer_is_served_from_the_memo_within_its_second() {
        let rig = memo_rig();
        second_start().await;
        let first = send(rig.port, TOKEN).await;
        let second = send(rig.port, TOKEN).await;
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        assert!(first.ends_with(r#"{"n":0,"resource":"r"}"#), "{first}");
        assert!(second.ends_with(r#"{"n":0,"resource":"r"}"#), "{second}");
        assert_eq!((rig.backend.calls(), rig.backend.repeats()), (1, 1));
        assert_eq!(rig.shared.requests(), 2);

        // The pod's limit still applies to a repeat: its refusal is the answer.
        rig.backend
            .refuse_repeats
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let refused = send(rig.port, TOKEN).await;
        assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
        assert!(refused.contains("retry-after: 1\r\n"), "{refused}");
        assert_eq!((rig.backend.calls(), rig.backend.repeats()), (1, 2));

        // A new second renders again (expires_in moves).
        second_start().await;
        let later = send(rig.port, TOKEN).await;
        assert!(later.ends_with(r#"{"n":1,"resource":"r"}"#), "{later}");
        rig.handle.close().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_memo_is_dropped_by_every_change_it_depends_on() {
        let rig = memo_rig();
        let expect_new = |what: &str, before: usize| {
            assert_eq!(
                rig.backend.calls(),
                before + 1,
                "{what}: the backend was asked"
            );
        };
        second_start().await;
        send(rig.port, TOKEN).await;

        // The cluster view changed.
        let before = rig.backend.calls();
        rig.backend.generation.lock().unwrap().cluster += 1;
        send(rig.port, TOKEN).await;
        expect_new("cluster", before);

        // The token cache changed.
        let before = rig.backend.calls();
        rig.backend.generation.lock().unwrap().cache += 1;
        send(rig.port, TOKEN).await;
        expect_new("cache", before);

        // The netns's records now name another pod.
        let before = rig.backend.calls();
        rig.shared
            .set_pod(PodAttribution::Pod(crate::registry::PodRef {
                namespace: "ns".into(),
                name: "b".into(),
                uid: "ub".into(),
            }));
        send(rig.port, TOKEN).await;
        expect_new("pod", before);

        // Another query, other header spellings, X-Forwarded-For.
        for (what, request) in [
            (
                "query",
                "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=s HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nConnection: close\r\n\r\n",
            ),
            (
                "metadata value",
                "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=r HTTP/1.1\r\nHost: x\r\nMetadata: True\r\nConnection: close\r\n\r\n",
            ),
            (
                "path",
                "GET /metadata/identity/oauth2/token/?api-version=2018-02-01&resource=r HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nConnection: close\r\n\r\n",
            ),
        ] {
            send(rig.port, TOKEN).await;
            let before = rig.backend.calls();
            send(rig.port, request).await;
            expect_new(what, before);
        }
        send(rig.port, TOKEN).await;
        let before = rig.backend.calls();
        let forwarded = send(rig.port, "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=r HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nX-Forwarded-For: 10.0.0.1\r\nConnection: close\r\n\r\n").await;
        assert!(forwarded.starts_with("HTTP/1.1 400"), "{forwarded}");
        assert_eq!(rig.backend.calls(), before, "rejected by the checks");

        // A bypass_cache request is never answered from the memo, nor remembered.
        for _ in 0..2 {
            let before = rig.backend.calls();
            send(rig.port, "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=r&bypass_cache=true HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nConnection: close\r\n\r\n").await;
            expect_new("bypass_cache", before);
        }

        // An answer that waited for upstream is not remembered.
        rig.backend
            .cached
            .store(false, std::sync::atomic::Ordering::SeqCst);
        rig.backend.generation.lock().unwrap().cache += 1;
        for _ in 0..2 {
            let before = rig.backend.calls();
            send(rig.port, TOKEN).await;
            expect_new("uncached", before);
        }
        rig.handle.close().await;
    }

    #[test]
    fn a_memo_answers_only_the_same_request_in_the_same_second() {
        let pod = Arc::new(pod_a());
        let generation = Generation {
            cluster: 3,
            cache: 4,
        };
        let memo = Memo {
            path: "/metadata/identity/oauth2/token".into(),
            query: "api-version=2018-02-01&resource=r".into(),
            metadata: (*b"true").into(),
            pod: Arc::clone(&pod),
            generation,
            second: 100,
            body: Bytes::from_static(b"{}"),
        };
        let request = ImdsRequest {
            method: "GET",
            path: "/metadata/identity/oauth2/token",
            query: Some("api-version=2018-02-01&resource=r"),
            metadata: Some(b"true"),
            forwarded_for: false,
        };
        assert!(memo.answers(&request, &pod, generation, 100));
        assert!(!memo.answers(&request, &pod, generation, 101), "second");
        assert!(
            !memo.answers(&request, &Arc::new(pod_a()), generation, 100),
            "another record set, even naming the same pod"
        );
        for (what, other) in [
            (
                "method",
                ImdsRequest {
                    method: "POST",
                    ..request
                },
            ),
            (
                "xff",
                ImdsRequest {
                    forwarded_for: true,
                    ..request
                },
            ),
            (
                "no metadata",
                ImdsRequest {
                    metadata: None,
                    ..request
                },
            ),
            (
                "no query",
                ImdsRequest {
                    query: None,
                    ..request
                },
            ),
        ] {
            assert!(!memo.answers(&other, &pod, generation, 100), "{what}");
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn connections_beyond_the_node_cap_are_closed_and_bursts_give_memory_back() {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let mut registry = prometheus_client::registry::Registry::default();
        let env = Arc::new(ListenerEnv::new(
            Arc::new(NoIdentities),
            ImdsMetrics::register(&mut registry),
            2,
        ));
        let shared = Arc::new(NetnsShared::default());
        let handle = ListenerHandle::start(
            std_listener,
            NetnsId { dev: 1, ino: 5 },
            port,
            shared,
            Arc::clone(&env),
        )
        .unwrap();
        let metrics = |registry: &prometheus_client::registry::Registry| {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
            text
        };

        // Two idle keep-alive connections take the node's two places; a third is closed at
        // once, and is served again once one of the two goes away.
        let (open, refused) = tokio::task::spawn_blocking(move || {
            let open: Vec<_> = (0..2)
                .map(|_| {
                    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                    s.write_all(b"GET /metadata/identity/oauth2/token HTTP/1.1\r\nHost: x\r\n\r\n")
                        .unwrap();
                    let mut buf = [0u8; 12];
                    s.read_exact(&mut buf).unwrap();
                    assert_eq!(&buf, b"HTTP/1.1 400");
                    s
                })
                .collect();
            let mut third = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            third
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            // A request it would answer if served; closed unread, the socket may reset.
            let _ = third.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n");
            let mut buf = [0u8; 16];
            let refused = match third.read(&mut buf) {
                Ok(n) => n == 0,
                Err(e) => !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
            };
            (open, refused)
        })
        .await
        .unwrap();
        assert!(refused, "a connection beyond --max-connections is closed");
        assert_eq!(env.open_connections(), 2);
        assert!(
            metrics(&registry).contains("imds_connections_refused_total 1"),
            "{}",
            metrics(&registry)
        );
        drop(open);
        let again = tokio::task::spawn_blocking(move || {
            crate::listener::tests::wait(|| {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|mut s| {
                        s.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                            .unwrap();
                        let mut out = String::new();
                        let _ = s.read_to_string(&mut out);
                        out
                    })
                    .filter(|out| out.starts_with("HTTP/1.1"))
            })
        })
        .await
        .unwrap();
        assert!(again.starts_with("HTTP/1.1 404"), "{again}");

        // A burst (TRIM_AFTER_CONNECTIONS accepted) that is over: the heap is given back.
        let shutdown = CancellationToken::new();
        let trimmer = tokio::spawn(
            Arc::clone(&env).give_back_memory(Duration::from_millis(50), shutdown.clone()),
        );
        env.accepted
            .fetch_add(TRIM_AFTER_CONNECTIONS, Ordering::Relaxed);
        let released = tokio::task::spawn_blocking({
            let registry = Arc::new(registry);
            move || {
                crate::listener::tests::wait(|| {
                    metrics(&registry)
                        .contains("imds_heap_releases_total 1")
                        .then_some(())
                })
            }
        });
        released.await.unwrap();
        shutdown.cancel();
        trimmer.await.unwrap();
        handle.close().await;
    }

    /// Polls `f` every 20 ms for up to 5 s.
    fn wait<T>(mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
