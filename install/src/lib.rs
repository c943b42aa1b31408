//! podid-install: puts the podid plugin into the node's CNI chain and keeps it there, installs
//! the host guard, and removes the node's startup taint once the node is ready
//! (DESIGN.md "The flow" step 1, "Host guard", "Upgrades").
//!
//! The decisions are pure (`conflist`, `guard::nft`, `taint::without_ours`); `confdir`,
//! `binary`, `guard`, `tokend` and `taint::remove` are their I/O shells; `run` wires them up.

pub mod binary;
pub mod confdir;
pub mod config;
pub mod conflist;
pub mod files;
pub mod guard;
pub mod health;
pub mod metrics;
pub mod readiness;
pub mod run;
pub mod taint;
pub mod tokend;
pub mod watch;
