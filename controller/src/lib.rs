//! podid-controller: turns pods × AzureIdentityBinding × AzureIdentity into
//! AzureAssignedIdentity objects (DESIGN.md "The flow", step 4), in managed mode.
//!
//! The decisions are pure ([`index`], [`assignment`], [`lease::decide`]); the kube shell
//! ([`watch`], [`reconcile`], [`lease`], [`health`]) feeds and applies them, and [`runtime`]
//! wires it together.

pub mod assignment;
pub mod config;
pub mod health;
pub mod index;
pub mod lease;
pub mod metrics;
pub mod queue;
pub mod reconcile;
pub mod runtime;
pub mod watch;

#[cfg(test)]
mod testing;

pub use config::{Args, Settings};
pub use runtime::{Controller, ControllerHandle, RunError};

/// The field manager of every write, and the `app.kubernetes.io/managed-by` value of every
/// assignment the controller writes.
pub const FIELD_MANAGER: &str = "podid-controller";
/// The label that marks the assignments this controller manages.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
