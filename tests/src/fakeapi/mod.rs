//! A loopback fake Kubernetes API server that the real `kube::Client`, watchers, reflectors,
//! `Controller` and `finalizer` run against: real resourceVersion, watch, selector, patch,
//! apply, status, finalizer and cascade semantics for podid's resource types. What it does
//! and does not emulate: `README.md` beside this file.

mod discovery;
mod gc;
mod http;
mod kubeconfig;
mod patch;
pub mod resources;
mod routes;
mod selectors;
mod server;
mod stats;
mod status;
mod store;
mod token;
mod watch;
mod write;

pub use kubeconfig::render as kubeconfig;
pub use server::{FakeApiServer, FakeApiServerBuilder};
pub use stats::StatsSnapshot;
pub use token::{ISSUER, decode_claims};
