//! The node's startup taint `podid.io/agent-not-ready:NoSchedule` (DESIGN.md "Names shared by
//! the parts"): operators put it on new nodes through the node pool (or kubelet
//! `--register-with-taints`), so that no pod lands on a node before podid protects it there;
//! the installer removes it from its own Node once the node is ready. Other taints are left as
//! they are; a node without the taint is fine.

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

/// The taint's key.
pub const TAINT_KEY: &str = "podid.io/agent-not-ready";
/// The taint's effect.
pub const TAINT_EFFECT: &str = "NoSchedule";
/// Conflicting writes (another agent changed the Node meanwhile) retried before giving up for
/// this round.
const CONFLICT_RETRIES: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum TaintError {
    #[error("reading Node {node}: {source}")]
    Get {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("removing the taint from Node {node}: {source}")]
    Patch {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("Node {node} kept changing: {CONFLICT_RETRIES} conflicting writes in a row")]
    Conflicts { node: String },
}

/// Whether `taint` is ours.
pub fn is_ours(taint: &Taint) -> bool {
    taint.key == TAINT_KEY && taint.effect == TAINT_EFFECT
}

/// The taints without ours, or `None` when ours is not among them.
pub fn without_ours(taints: &[Taint]) -> Option<Vec<Taint>> {
    taints
        .iter()
        .any(is_ours)
        .then(|| taints.iter().filter(|t| !is_ours(t)).cloned().collect())
}

/// What happened to the taint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Untainted {
    Removed,
    /// The node did not carry it.
    Absent,
}

/// Removes our taint from Node `node`: a merge patch of `spec.taints` with the
/// resourceVersion read as precondition, re-read and retried on conflict.
pub async fn remove(nodes: &Api<Node>, node: &str) -> Result<Untainted, TaintError> {
    for _ in 0..CONFLICT_RETRIES {
        let current = nodes.get(node).await.map_err(|source| TaintError::Get {
            node: node.to_owned(),
            source,
        })?;
        let taints = current
            .spec
            .as_ref()
            .and_then(|spec| spec.taints.as_deref())
            .unwrap_or_default();
        let Some(remaining) = without_ours(taints) else {
            return Ok(Untainted::Absent);
        };
        let patch = json!({
            "metadata": {"resourceVersion": current.metadata.resource_version},
            "spec": {"taints": remaining},
        });
        match nodes
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(Untainted::Removed),
            Err(kube::Error::Api(status)) if status.is_conflict() => {}
            Err(source) => {
                return Err(TaintError::Patch {
                    node: node.to_owned(),
                    source,
                });
            }
        }
    }
    Err(TaintError::Conflicts {
        node: node.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            effect: effect.into(),
            value: Some("true".into()),
            time_added: None,
        }
    }

    #[test]
    fn only_our_taint_goes() {
        let others = [
            taint("node.kubernetes.io/not-ready", "NoSchedule"),
            taint(TAINT_KEY, "NoExecute"),
            taint("CriticalAddonsOnly", "NoSchedule"),
        ];
        assert_eq!(without_ours(&others), None);
        let mut all = others.to_vec();
        all.insert(1, taint(TAINT_KEY, TAINT_EFFECT));
        assert_eq!(without_ours(&all), Some(others.to_vec()));
        assert_eq!(
            without_ours(&[taint(TAINT_KEY, TAINT_EFFECT)]),
            Some(vec![])
        );
        assert_eq!(without_ours(&[]), None);
    }
}
