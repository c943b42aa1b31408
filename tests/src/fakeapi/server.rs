//! The in-process server: binds 127.0.0.1, serves HTTP/1.1 with hyper until stopped, and hands
//! tests a `kube::Client`, the counters and the hooks that provoke compaction.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::http::{ServerOptions, Shared, handle};
use super::stats::{Stats, StatsSnapshot};
use super::store::Store;

/// How to build a server; `FakeApiServer::start()` uses the defaults.
#[derive(Debug, Clone)]
pub struct FakeApiServerBuilder {
    port: u16,
    history_limit: usize,
    watch_buffer: usize,
    bookmark_interval: Duration,
    default_watch_timeout: Duration,
}

impl Default for FakeApiServerBuilder {
    fn default() -> Self {
        Self {
            port: 0,
            history_limit: 20_000,
            watch_buffer: 16_384,
            bookmark_interval: Duration::from_secs(5),
            default_watch_timeout: Duration::from_secs(1800),
        }
    }
}

impl FakeApiServerBuilder {
    /// Port on 127.0.0.1; 0 (the default) picks a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Changes kept for watch resumption; older versions get 410 Gone.
    pub fn history_limit(mut self, changes: usize) -> Self {
        self.history_limit = changes;
        self
    }

    /// Changes a watch may fall behind before the server closes it.
    pub fn watch_buffer(mut self, changes: usize) -> Self {
        self.watch_buffer = changes;
        self
    }

    /// How often a watch that allows bookmarks gets one.
    pub fn bookmark_interval(mut self, interval: Duration) -> Self {
        self.bookmark_interval = interval;
        self
    }

    /// Binds and starts serving.
    pub async fn start(self) -> std::io::Result<FakeApiServer> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], self.port))).await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            store: Store::new(self.history_limit, self.watch_buffer),
            stats: Stats::default(),
            watch_delays: Default::default(),
            options: ServerOptions {
                bookmark_interval: self.bookmark_interval,
                default_watch_timeout: self.default_watch_timeout,
            },
            shutdown: shutdown.clone(),
            address: addr.to_string(),
        });
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(FakeApiServer {
            addr,
            shared,
            task: Some(task),
        })
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _peer)) = accepted else {
            // out of file descriptors and the like: back off instead of spinning
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        // watch lines are small: send them at once
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        connections.spawn(async move {
            let service = service_fn(move |req| handle(Arc::clone(&shared), req));
            let connection = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            // a connection error is the client's hang-up; nothing to report
            let _ = connection.await;
        });
        while connections.try_join_next().is_some() {}
    }
    connections.shutdown().await;
}

/// A running fake API server. Dropping it stops it.
#[derive(Debug)]
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts a server on a free port with the default options.
    pub async fn start() -> std::io::Result<Self> {
        FakeApiServerBuilder::default().start().await
    }

    pub fn builder() -> FakeApiServerBuilder {
        FakeApiServerBuilder::default()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A real `kube::Client` for this server, default namespace `default`.
    pub fn client(&self) -> kube::Client {
        let uri = self
            .url()
            .parse()
            .expect("a socket address makes a valid URI");
        kube::Client::try_from(kube::Config::new(uri)).expect("a plain-HTTP kube client builds")
    }

    /// A kubeconfig (server, context, user without credentials) pointing at this server.
    pub fn kubeconfig(&self) -> String {
        super::kubeconfig::render(&self.url())
    }

    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// Request counters, total and by verb.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot(&self.shared.store)
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.resource_version()
    }

    /// Drops all retained history: a watch resuming from an earlier version gets `410 Gone`.
    pub fn compact_history(&self) {
        self.shared.store.compact();
    }

    /// Delays every live watch event of the resource `plural` (e.g. `azureidentitybindings`)
    /// by `delay`, from now on (zero: no delay). Lists and gets are not delayed.
    pub fn delay_watch_events(&self, plural: &'static str, delay: Duration) {
        self.shared.watch_delays.set(plural, delay);
    }

    /// Ends every open watch stream, as an API server restart would; clients re-watch.
    pub fn close_watches(&self) {
        self.shared.store.close_watches();
    }

    /// Stops accepting, ends every connection and watch, and waits for the server task.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        if let Some(task) = self.task.take() {
            // the task only ends by the cancellation above; a panic in it has been reported already
            let _ = task.await;
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}
