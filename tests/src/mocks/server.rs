//! The serving loop both mocks share: takes a listening socket (bound by the caller, possibly
//! inside another network namespace), serves HTTP/1.1 with keep-alive, plain or over TLS, on the
//! caller's tokio runtime, and stops when cancelled.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::tls::TlsError;

/// A client that connects but never finishes the handshake is dropped after this long.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a mock could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("using the given listener: {0}")]
    Listener(std::io::Error),
    #[error("making the server certificate: {0}")]
    Tls(#[from] TlsError),
}

/// What a handler answers.
#[derive(Debug)]
pub(crate) enum Reply {
    Response(Response<Full<Bytes>>),
    /// No answer: the connection is aborted with a TCP reset.
    Reset,
}

pub(crate) trait Handler: Send + Sync + 'static {
    fn handle(self: Arc<Self>, req: Request<Incoming>) -> impl Future<Output = Reply> + Send;
}

/// Binds `addr` with the standard library, for `start()` on 127.0.0.1.
pub(crate) fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, StartError> {
    std::net::TcpListener::bind(addr).map_err(|source| StartError::Bind { addr, source })
}

/// A running server; dropping it stops it.
#[derive(Debug)]
pub(crate) struct Running {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Running {
    /// Serves `listener` on the current tokio runtime.
    pub(crate) fn spawn<H: Handler>(
        listener: std::net::TcpListener,
        tls: Option<TlsAcceptor>,
        handler: Arc<H>,
    ) -> Result<Self, StartError> {
        listener
            .set_nonblocking(true)
            .map_err(StartError::Listener)?;
        let addr = listener.local_addr().map_err(StartError::Listener)?;
        let listener = TcpListener::from_std(listener).map_err(StartError::Listener)?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(accept_loop(listener, tls, handler, shutdown.clone()));
        Ok(Self {
            addr,
            shutdown,
            task: Some(task),
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, aborts open connections and waits for the server task.
    pub(crate) async fn shutdown(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            // it only ends by the cancellation; a panic in it was reported when it happened
            let _ = task.await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn accept_loop<H: Handler>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Arc<H>,
    shutdown: CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _peer)) = accepted else {
            // out of file descriptors and the like: back off instead of spinning
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        connections.spawn(serve(stream, tls.clone(), Arc::clone(&handler)));
        while connections.try_join_next().is_some() {}
    }
    connections.shutdown().await;
}

#[derive(Debug, thiserror::Error)]
#[error("connection reset by fault injection")]
struct ResetRequested;

async fn serve<H: Handler>(stream: TcpStream, tls: Option<TlsAcceptor>, handler: Arc<H>) {
    let _ = stream.set_nodelay(true);
    // a second descriptor of the socket: hyper owns the first, a reset needs SO_LINGER 0 on it
    let Ok(stream) = stream.into_std() else {
        return;
    };
    let Ok(abort_handle) = stream.try_clone() else {
        return;
    };
    let Ok(stream) = TcpStream::from_std(stream) else {
        return;
    };
    let abort_handle = Arc::new(abort_handle);
    let service = {
        let abort_handle = Arc::clone(&abort_handle);
        service_fn(move |req| {
            let handler = Arc::clone(&handler);
            let abort_handle = Arc::clone(&abort_handle);
            async move {
                match handler.handle(req).await {
                    Reply::Response(response) => Ok::<_, ResetRequested>(response),
                    Reply::Reset => {
                        // the last close of the socket then sends RST instead of FIN
                        let _ =
                            socket2::SockRef::from(&*abort_handle).set_linger(Some(Duration::ZERO));
                        Err(ResetRequested)
                    }
                }
            }
        })
    };
    let builder = {
        let mut b = http1::Builder::new();
        b.keep_alive(true);
        b
    };
    match tls {
        Some(acceptor) => {
            let Ok(Ok(stream)) =
                tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
            else {
                return;
            };
            // a connection error is the client's hang-up or an injected reset: nothing to report
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
        None => {
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    }
    drop(abort_handle);
}
