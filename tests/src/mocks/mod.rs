//! Local stand-ins for the two Azure endpoints podid-tokend talks to: Entra ID's v2 token
//! endpoint over HTTPS with a test CA ([`entra`]), and the node's instance metadata service
//! ([`imds`]). Both validate requests the way the real services do, answer in their exact
//! shapes, take injected faults, and keep a request log without secrets or tokens. What is and
//! is not emulated: `README.md` beside this file.

pub mod config;
pub mod entra;
mod fault;
pub mod imds;
pub mod jwt;
mod resources;
mod server;
pub mod tls;
mod util;

pub use fault::{Fault, FaultTarget};
pub use resources::{KnownResources, resource_of_scope};
pub use server::StartError;
