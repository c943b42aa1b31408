//! The plugin ↔ tokend API over tokend's unix socket (DESIGN.md "Plugin ↔ tokend").
//!
//! - `PUT /v1/pods/{containerId}/{ifname}` body [`PodRecord`](crate::PodRecord) →
//!   `200` [`PutAnswer`] once the listener is bound; `400` invalid record, `404` netns not
//!   found or unsupported, `503` not ready; errors carry an [`ErrorBody`].
//! - `DELETE /v1/pods/{containerId}/{ifname}` → `200` or `404`.
//! - `GET /v1/pods` → [`PodList`]; `GET /v1/pods/{containerId}/{ifname}` → [`PodState`] or `404`.
//! - `GET /v1/status` → `200` [`Status`] when ready to serve ADD, else `503` [`Status`].

use serde::{Deserialize, Serialize};

use crate::pod::BoundPod;

pub const PODS_PATH: &str = "/v1/pods";
pub const STATUS_PATH: &str = "/v1/status";

/// Answer to a successful PUT: the port the plugin must redirect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PutAnswer {
    pub listener_port: u16,
}

/// One attachment as tokend knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodState {
    #[serde(flatten)]
    pub bound: BoundPod,
    /// Whether the listener in the pod's netns is open right now.
    pub listener_bound: bool,
    /// Requests answered on the pod's listener since tokend started (shared by the keys of one netns).
    pub requests: u64,
}

/// Answer to `GET /v1/pods`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PodList {
    pub pods: Vec<PodState>,
}

/// Answer to `GET /v1/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub ready: bool,
    pub pods: usize,
    pub listener_port: u16,
}

/// Body of every error answer of the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_use_design_names() {
        assert_eq!(
            serde_json::to_string(&PutAnswer {
                listener_port: 2579
            })
            .unwrap(),
            r#"{"listenerPort":2579}"#
        );
        let status: Status =
            serde_json::from_str(r#"{"ready":true,"pods":3,"listenerPort":2579}"#).unwrap();
        assert!(status.ready);
    }
}
