//! A TCP bridge between network namespaces, with no interface and no rule: the listening socket
//! is created inside one netns (on a thread that entered it) and every connection it accepts is
//! forwarded to an address reached from the creating process's own netns. Sockets keep the
//! netns they were created in, so one process can join the two.
//!
//! Used to let daemons in a simulated node reach the test's in-process fake API server.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context, Result};

use crate::netns::Netns;

/// Forwards connections made to `listen` inside a netns to `target` in the caller's netns.
#[derive(Debug)]
pub struct TcpBridge {
    listener: Arc<TcpListener>,
    stopping: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl TcpBridge {
    /// Listens on `listen` inside `netns`; each connection is joined to a new connection to
    /// `target` from this process's netns.
    pub fn into_netns(netns: &Netns, listen: SocketAddr, target: SocketAddr) -> Result<Self> {
        let listener = netns
            .run(|| TcpListener::bind(listen))?
            .with_context(|| format!("bind {listen} in {}", netns.name()))?;
        let addr = listener.local_addr()?;
        let listener = Arc::new(listener);
        let stopping = Arc::new(AtomicBool::new(false));
        let accept = {
            let (listener, stopping) = (Arc::clone(&listener), Arc::clone(&stopping));
            std::thread::Builder::new()
                .name(format!("bridge-{addr}"))
                .spawn(move || accept_loop(&listener, &stopping, target))?
        };
        Ok(Self {
            listener,
            stopping,
            accept: Some(accept),
            addr,
        })
    }

    /// The address the bridge listens on, inside its netns.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TcpBridge {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Shutting a listening socket down wakes a blocked accept() with EINVAL.
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, stopping: &AtomicBool, target: SocketAddr) {
    while !stopping.load(Ordering::SeqCst) {
        let Ok((inbound, _)) = listener.accept() else {
            continue;
        };
        let Ok(outbound) = TcpStream::connect(target) else {
            continue;
        };
        let _ = std::thread::Builder::new()
            .name("bridge-conn".into())
            .spawn(move || join(inbound, outbound));
    }
}

/// Copies both ways until each side has closed its half.
fn join(a: TcpStream, b: TcpStream) -> io::Result<()> {
    let (a2, b2) = (a.try_clone()?, b.try_clone()?);
    let upstream = std::thread::spawn(move || pipe(a2, b2));
    pipe(b, a)?;
    upstream
        .join()
        .map_err(|_| io::Error::other("bridge thread panicked"))?
}

fn pipe(mut from: TcpStream, mut to: TcpStream) -> io::Result<()> {
    let copied = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    copied.map(|_| ())
}
