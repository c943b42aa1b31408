//! "The cloud" seen from a simulated node: a network namespace of its own, joined to the node's
//! by a veth pair, holding the mock IMDS on `169.254.169.254:80` and the mock Entra ID. As on
//! Azure, IMDS is off the node: the node reaches it through a route, so a pod's traffic to it is
//! forwarded by the node (what the host guard drops), while the node's own processes reach it
//! on the output path.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};

use anyhow::{Context, Result};

use crate::netns::Netns;
use crate::node::Node;

/// The node's end of the link to the cloud.
pub const NODE_SIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The cloud's end: where the mock Entra ID listens.
pub const CLOUD_SIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The metadata address, on the cloud's loopback.
pub const IMDS_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// The cloud netns attached to one node.
#[derive(Debug)]
pub struct Cloud {
    pub netns: Netns,
}

impl Cloud {
    /// Creates the cloud netns and links it to `node`: node `198.51.100.1/30` ↔ cloud
    /// `198.51.100.2/30`, `169.254.169.254/32` on the cloud's `lo`, a route to it from the node,
    /// a route back to the node's pod subnet, and forwarding on in the node.
    pub fn attach(node: &Node) -> Result<Self> {
        Self::attach_to(&node.netns, &node.subnet)
    }

    /// Like [`attach`](Self::attach), for a node netns not made by [`Node`] (the system
    /// harness's), whose pods live in `pod_subnet`.
    pub fn attach_to(node_netns: &Netns, pod_subnet: &str) -> Result<Self> {
        let netns = Netns::new("cloud")?;
        let (n, c) = (node_netns.name(), netns.name());
        // Created inside the node netns and moved straight to the cloud: the machine's own netns
        // never holds either end.
        run_ip(
            node_netns,
            &format!("link add vcloud type veth peer name vnode netns {c}"),
        )?;
        run_ip(node_netns, &format!("addr add {NODE_SIDE}/30 dev vcloud"))?;
        run_ip(node_netns, "link set vcloud up")?;
        run_ip(&netns, &format!("addr add {CLOUD_SIDE}/30 dev vnode"))?;
        run_ip(&netns, "link set vnode up")?;
        run_ip(&netns, "link set lo up")?;
        run_ip(&netns, &format!("addr add {IMDS_IP}/32 dev lo"))?;
        run_ip(
            node_netns,
            &format!("route add {IMDS_IP}/32 via {CLOUD_SIDE}"),
        )?;
        run_ip(&netns, &format!("route add {pod_subnet} via {NODE_SIDE}"))?;
        node_netns
            .exec_ok("sysctl", &["-qw", "net.ipv4.ip_forward=1"])
            .with_context(|| format!("enabling forwarding in {n}"))?;
        Ok(Self { netns })
    }

    /// A listening socket created inside the cloud netns, for a mock to serve on.
    pub fn listen(&self, addr: SocketAddr) -> Result<TcpListener> {
        let listener = self
            .netns
            .run(|| TcpListener::bind(addr))?
            .with_context(|| format!("bind {addr} in {}", self.netns.name()))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    }

    /// `169.254.169.254:80`, where the node's IMDS answers.
    pub fn imds_addr() -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(IMDS_IP, 80))
    }

    /// `198.51.100.2:443`, where the mock Entra ID answers (by name, through the node's hosts file).
    pub fn entra_addr() -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(CLOUD_SIDE, 443))
    }
}

fn run_ip(ns: &Netns, args: &str) -> Result<()> {
    ns.exec_ok("ip", &args.split(' ').collect::<Vec<_>>())
        .map(|_| ())
}
