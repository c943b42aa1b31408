//! podid's test harness: network namespaces that always clean up, a small CNI runtime that
//! runs a conflist like libcni, a simulated node running the real binaries, and an HTTP client.

pub mod bench;
pub mod bins;
pub mod bridge;
pub mod cloud;
pub mod demo;
pub mod fakeapi;
pub mod http;
pub mod mocks;
pub mod netns;
pub mod node;
pub mod objects;
pub mod runtime;
pub mod sdk;
pub mod system;
pub mod world;
