//! The test topology itself: the cloud netns routed from the node, and the TCP bridge that lets
//! the node's daemons reach servers of the test process.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use podid_tests::bridge::TcpBridge;
use podid_tests::cloud::{CLOUD_SIDE, Cloud};
use podid_tests::node::Node;

/// Serves one connection on `listener`: reads a line, answers `<tag>:<line>`.
fn answer_once(listener: TcpListener, tag: &'static str) -> std::thread::JoinHandle<()> {
    listener.set_nonblocking(false).unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).unwrap();
        stream.write_all(format!("{tag}:").as_bytes()).unwrap();
        stream.write_all(&buf[..n]).unwrap();
    })
}

fn ask(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"ping")?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut out = String::new();
    stream.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn the_node_reaches_the_cloud_by_route_and_the_host_never_sees_it() {
    let node = Node::new("topo").unwrap();
    let cloud = Cloud::attach(&node).unwrap();
    let imds = answer_once(cloud.listen(Cloud::imds_addr()).unwrap(), "imds");
    let entra = answer_once(cloud.listen(Cloud::entra_addr()).unwrap(), "entra");
    let from_node = node
        .netns
        .run(|| {
            (
                ask(Cloud::imds_addr()).unwrap(),
                ask(Cloud::entra_addr()).unwrap(),
            )
        })
        .unwrap();
    assert_eq!(from_node, ("imds:ping".to_owned(), "entra:ping".to_owned()));
    imds.join().unwrap();
    entra.join().unwrap();
    let host_links = podid_tests::netns::run("ip", &["-o", "link"]).unwrap();
    assert!(
        !host_links.contains("vcloud") && !host_links.contains("vnode"),
        "{host_links}"
    );
    let host_routes = podid_tests::netns::run("ip", &["route"]).unwrap();
    assert!(
        !host_routes.contains(&CLOUD_SIDE.to_string()),
        "{host_routes}"
    );
}

#[test]
fn a_bridge_lets_the_node_reach_a_server_of_the_test_process() {
    let node = Node::new("bridge").unwrap();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = server.local_addr().unwrap();
    let served = answer_once(server, "host");
    let bridge =
        TcpBridge::into_netns(&node.netns, "127.0.0.1:7443".parse().unwrap(), target).unwrap();
    let answer = node.netns.run(|| ask(bridge.addr()).unwrap()).unwrap();
    assert_eq!(answer, "host:ping");
    served.join().unwrap();
    // From the machine's own netns the bridge's address is not there.
    assert!(ask(bridge.addr()).is_err());
    drop(bridge);
    let refused = node
        .netns
        .run(|| ask("127.0.0.1:7443".parse().unwrap()).is_err())
        .unwrap();
    assert!(refused, "a dropped bridge stops listening");
}
