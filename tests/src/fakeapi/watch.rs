//! One watch stream: the initial or replayed events, then live changes filtered for this watch
//! (with selector transitions turned into ADDED/DELETED), bookmarks, and the timeout.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use serde_json::{Value, json};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::time::{Instant, Interval};
use tokio_util::sync::CancellationToken;

use super::resources::ResourceDef;
use super::selectors::Selectors;
use super::status::ApiError;
use super::store::{Change, EventType, Store, WatchFrom, event_line};

/// What a watch request asked for.
#[derive(Debug, Clone)]
pub struct WatchRequest {
    pub res: &'static ResourceDef,
    pub namespace: Option<String>,
    pub selectors: Selectors,
    pub from: WatchFrom,
    /// `allowWatchBookmarks=true`.
    pub bookmarks: bool,
    /// `sendInitialEvents=true`: end the initial events with the `initial-events-end` bookmark.
    pub initial_events_end: bool,
    pub timeout: Duration,
    pub bookmark_interval: Duration,
    /// `Accept: ...;as=PartialObjectMetadata`: objects reduced to their metadata.
    pub metadata_only: bool,
}

/// Extra latency of live watch events by resource plural: separate watch streams of a real API
/// server deliver with independent delays, so a client can see a pod before a binding created
/// earlier. Tests set it to make that order certain.
#[derive(Debug, Clone, Default)]
pub struct WatchDelays(Arc<Mutex<HashMap<&'static str, Duration>>>);

impl WatchDelays {
    pub fn set(&self, plural: &'static str, delay: Duration) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(plural, delay);
    }

    fn of(&self, plural: &str) -> Duration {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(plural)
            .copied()
            .unwrap_or_default()
    }
}

/// An event waiting to be written; translated only when its turn comes.
#[derive(Debug)]
enum Pending {
    Initial(Arc<Value>),
    Replay(Arc<Change>),
    Line(Bytes),
}

struct Watching {
    req: WatchRequest,
    queue: VecDeque<Pending>,
    receiver: broadcast::Receiver<Arc<Change>>,
    /// Every change up to here has been seen (sent or filtered out): what a bookmark may claim.
    seen_rv: u64,
    deadline: Instant,
    bookmark: Option<Interval>,
    closed: CancellationToken,
    shutdown: CancellationToken,
    delays: WatchDelays,
}

impl Watching {
    fn in_scope(&self, obj: &Value) -> bool {
        let ns_ok = self.req.namespace.as_deref().is_none_or(|ns| {
            obj.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns)
        });
        ns_ok && self.req.selectors.matches(obj)
    }

    fn line(&self, event_type: &str, obj: &Value) -> Bytes {
        if self.req.metadata_only {
            event_line(event_type, &partial_object_metadata(obj))
        } else {
            event_line(event_type, obj)
        }
    }

    /// The shared serialization of a change, unless this watch renders objects its own way.
    fn common_line(&self, change: &Change) -> Bytes {
        if self.req.metadata_only {
            self.line(change.event.as_str(), &change.object)
        } else {
            change.line()
        }
    }

    /// The line this watch sends for a change, if any. An update that takes the object out of
    /// the selection is DELETED (the previous object at the new version), into it ADDED.
    fn translate(&self, change: &Change) -> Option<Bytes> {
        if change.resource != self.req.res.index() {
            return None;
        }
        let now = self.in_scope(&change.object);
        match change.event {
            EventType::Added | EventType::Deleted => now.then(|| self.common_line(change)),
            EventType::Modified => {
                let before = change.previous.as_deref().is_some_and(|p| self.in_scope(p));
                match (before, now) {
                    (true, true) => Some(self.common_line(change)),
                    (false, true) => Some(self.line("ADDED", &change.object)),
                    (true, false) => {
                        let mut last = change.previous.as_deref().cloned().unwrap_or(Value::Null);
                        last["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                        Some(self.line("DELETED", &last))
                    }
                    (false, false) => None,
                }
            }
        }
    }

    fn bookmark_line(&self, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": self.seen_rv.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object = if self.req.metadata_only {
            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": metadata})
        } else {
            json!({"kind": self.req.res.kind, "apiVersion": self.req.res.api_version(), "metadata": metadata})
        };
        event_line("BOOKMARK", &object)
    }

    async fn next_line(&mut self) -> Option<Bytes> {
        loop {
            if let Some(pending) = self.queue.pop_front() {
                let line = match pending {
                    Pending::Initial(obj) => Some(self.line("ADDED", &obj)),
                    Pending::Replay(change) => self.translate(&change),
                    Pending::Line(line) => Some(line),
                };
                match line {
                    Some(line) => return Some(line),
                    None => continue,
                }
            }
            let bookmark = async {
                match self.bookmark.as_mut() {
                    Some(interval) => interval.tick().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return None,
                () = self.closed.cancelled() => return None,
                () = tokio::time::sleep_until(self.deadline) => return None,
                received = self.receiver.recv() => match received {
                    Ok(change) => {
                        self.seen_rv = change.rv;
                        if let Some(line) = self.translate(&change) {
                            let delay = self.delays.of(self.req.res.plural);
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            return Some(line);
                        }
                    }
                    // a watcher too slow for the buffer is closed, as kube-apiserver closes it;
                    // the client resumes from its last version (410 if that has been compacted)
                    Err(RecvError::Lagged(_) | RecvError::Closed) => return None,
                },
                _ = bookmark => return Some(self.bookmark_line(false)),
            }
        }
    }
}

/// The body of a watch response: one JSON event per line.
pub fn stream(
    store: &Store,
    req: WatchRequest,
    delays: WatchDelays,
    shutdown: CancellationToken,
) -> impl Stream<Item = Bytes> + Send + 'static {
    let start = store.watch(req.res, req.namespace.as_deref(), &req.selectors, req.from);
    let watching = match start {
        // errors after the request was accepted go in the stream, as the real server's error watcher does
        Err(err) => Err(error_line(&err)),
        Ok(start) => {
            let mut queue: VecDeque<Pending> =
                start.initial.into_iter().map(Pending::Initial).collect();
            queue.extend(start.replay.into_iter().map(Pending::Replay));
            let bookmark = req.bookmarks.then(|| {
                let period = req.bookmark_interval.max(Duration::from_millis(1));
                tokio::time::interval_at(Instant::now() + period, period)
            });
            let mut watching = Watching {
                deadline: Instant::now() + req.timeout,
                req,
                queue,
                receiver: start.receiver,
                seen_rv: start.resource_version,
                bookmark,
                closed: start.closed,
                shutdown,
                delays,
            };
            if watching.req.initial_events_end {
                let end = watching.bookmark_line(true);
                watching.queue.push_back(Pending::Line(end));
            }
            Ok(watching)
        }
    };
    futures::stream::unfold(Some(watching), |state| async move {
        match state? {
            Err(line) => Some((line, None)),
            Ok(mut watching) => {
                let line = watching.next_line().await?;
                Some((line, Some(Ok(watching))))
            }
        }
    })
}

/// An object reduced to `meta.k8s.io/v1` `PartialObjectMetadata`, as metadata-only requests get it.
pub fn partial_object_metadata(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({}))})
}

/// An ERROR watch event carrying a Status.
pub fn error_line(err: &ApiError) -> Bytes {
    event_line("ERROR", &err.to_status())
}
