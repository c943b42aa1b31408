//! Request counters for benchmarks, served at `/fake/stats` and by `FakeApiServer::stats`.

use std::sync::atomic::{AtomicU64, Ordering};

use super::store::Store;

/// The request verbs counted, as the API server's audit log names them.
pub const VERBS: [&str; 10] = [
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "discovery",
    "other",
];

/// Request counters; `/fake/stats` requests are not counted.
#[derive(Debug, Default)]
pub struct Stats {
    total: AtomicU64,
    by_verb: [AtomicU64; VERBS.len()],
    pub(super) open_watches: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsSnapshot {
    pub requests: u64,
    pub by_verb: std::collections::BTreeMap<String, u64>,
    pub open_watches: u64,
    pub resource_version: u64,
    pub objects: u64,
}

impl StatsSnapshot {
    /// Requests of one verb (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, ...).
    pub fn verb(&self, verb: &str) -> u64 {
        self.by_verb.get(verb).copied().unwrap_or(0)
    }
}

impl Stats {
    pub(super) fn count(&self, verb: &str) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let i = VERBS
            .iter()
            .position(|v| *v == verb)
            .unwrap_or(VERBS.len() - 1);
        self.by_verb[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self, store: &Store) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.total.load(Ordering::Relaxed),
            by_verb: VERBS
                .iter()
                .zip(&self.by_verb)
                .map(|(v, n)| ((*v).to_string(), n.load(Ordering::Relaxed)))
                .collect(),
            open_watches: self.open_watches.load(Ordering::Relaxed),
            resource_version: store.resource_version(),
            objects: store.object_count() as u64,
        }
    }
}
