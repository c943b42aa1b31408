//! A work queue of keys, client-go style: a key is queued at most once, never handed to two
//! workers at once (a key changed while being processed is queued again when its worker is
//! done), failed keys come back after an exponential backoff. Inactive (not the leader, caches
//! not synced) it drops what it is given: a new leader enqueues everything anyway.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

/// First retry delay after a failure; doubled per consecutive failure.
const RETRY_BASE: Duration = Duration::from_millis(100);
/// Longest retry delay.
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Inner<K> {
    active: bool,
    queue: VecDeque<K>,
    /// Keys queued or to be queued again once their worker is done.
    dirty: HashSet<K>,
    processing: HashSet<K>,
    failures: HashMap<K, u32>,
}

/// The queue. Shared as `Arc<WorkQueue<K>>`.
#[derive(Debug)]
pub struct WorkQueue<K> {
    inner: Mutex<Inner<K>>,
    ready: Notify,
    depth: Gauge,
}

impl<K: Clone + Eq + Hash + Send + 'static> WorkQueue<K> {
    /// `depth` is set to the number of keys waiting (not those being processed).
    pub fn new(depth: Gauge) -> Self {
        Self {
            inner: Mutex::new(Inner {
                active: false,
                queue: VecDeque::new(),
                dirty: HashSet::new(),
                processing: HashSet::new(),
                failures: HashMap::new(),
            }),
            ready: Notify::new(),
            depth,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K>> {
        // a panic while holding this lock leaves plain collections behind, still usable
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts accepting keys.
    pub fn activate(&self) {
        self.lock().active = true;
    }

    /// Stops accepting keys and forgets the waiting ones.
    pub fn deactivate(&self) {
        let mut inner = self.lock();
        inner.active = false;
        inner.queue.clear();
        inner.dirty.clear();
        inner.failures.clear();
        self.depth.set(0);
    }

    pub fn is_active(&self) -> bool {
        self.lock().active
    }

    /// Queues `key` unless it is queued already.
    pub fn add(&self, key: K) {
        let mut inner = self.lock();
        if !inner.active || !inner.dirty.insert(key.clone()) {
            return;
        }
        if inner.processing.contains(&key) {
            return;
        }
        inner.queue.push_back(key);
        self.depth.set(inner.queue.len() as i64);
        drop(inner);
        self.ready.notify_one();
    }

    pub fn extend(&self, keys: impl IntoIterator<Item = K>) {
        for key in keys {
            self.add(key);
        }
    }

    /// The next key to process; the caller must call [`done`](Self::done) or
    /// [`retry`](Self::retry) with it.
    pub async fn next(&self) -> K {
        loop {
            {
                let mut inner = self.lock();
                if let Some(key) = inner.queue.pop_front() {
                    inner.dirty.remove(&key);
                    inner.processing.insert(key.clone());
                    self.depth.set(inner.queue.len() as i64);
                    // more work: let another waiting worker take it
                    if !inner.queue.is_empty() {
                        self.ready.notify_one();
                    }
                    return key;
                }
            }
            self.ready.notified().await;
        }
    }

    /// Processing `key` succeeded.
    pub fn done(&self, key: &K) {
        let mut inner = self.lock();
        inner.failures.remove(key);
        self.finish(inner, key);
    }

    fn finish(&self, mut inner: MutexGuard<'_, Inner<K>>, key: &K) {
        inner.processing.remove(key);
        if inner.active && inner.dirty.contains(key) {
            inner.queue.push_back(key.clone());
            self.depth.set(inner.queue.len() as i64);
            drop(inner);
            self.ready.notify_one();
        }
    }

    /// Processing `key` failed: it comes back after a backoff that grows with each
    /// consecutive failure. Returns the delay.
    pub fn retry(self: &Arc<Self>, key: K) -> Duration {
        let mut inner = self.lock();
        let failures = inner.failures.entry(key.clone()).or_insert(0);
        *failures = failures.saturating_add(1);
        let delay = backoff(*failures);
        self.finish(inner, &key);
        let queue = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            queue.add(key);
        });
        delay
    }

    /// Keys waiting.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The delay before retry number `failures` (1-based).
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    RETRY_BASE.saturating_mul(1 << exp).min(RETRY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> Arc<WorkQueue<&'static str>> {
        let q = Arc::new(WorkQueue::new(Gauge::default()));
        q.activate();
        q
    }

    #[tokio::test]
    async fn dedups_and_keeps_order() {
        let q = queue();
        q.add("a");
        q.add("b");
        q.add("a");
        assert_eq!(q.len(), 2);
        assert_eq!(q.depth.get(), 2);
        assert_eq!(q.next().await, "a");
        assert_eq!(q.next().await, "b");
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn a_key_changed_while_processing_comes_back_after_done() {
        let q = queue();
        q.add("a");
        let key = q.next().await;
        q.add("a");
        assert!(
            q.is_empty(),
            "not handed to a second worker while the first has it"
        );
        q.done(&key);
        assert_eq!(q.len(), 1);
        assert_eq!(q.next().await, "a");
    }

    #[tokio::test]
    async fn inactive_queue_drops_keys() {
        let q = Arc::new(WorkQueue::new(Gauge::default()));
        q.add("a");
        assert!(q.is_empty());
        q.activate();
        q.add("a");
        q.deactivate();
        assert!(q.is_empty());
        assert_eq!(q.depth.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially() {
        let q = queue();
        q.add("a");
        let key = q.next().await;
        assert_eq!(q.retry(key), Duration::from_millis(100));
        assert!(q.is_empty());
        tokio::time::sleep(Duration::from_millis(150)).await;
        let key = q.next().await;
        assert_eq!(q.retry(key), Duration::from_millis(200));
        tokio::time::sleep(Duration::from_millis(250)).await;
        let key = q.next().await;
        q.done(&key);
        q.add("a");
        let key = q.next().await;
        assert_eq!(
            q.retry(key),
            Duration::from_millis(100),
            "success resets the backoff"
        );
        assert_eq!(backoff(40), RETRY_MAX);
    }

    #[tokio::test]
    async fn waiting_workers_wake_up() {
        let q = queue();
        let worker = {
            let q = Arc::clone(&q);
            tokio::spawn(async move { q.next().await })
        };
        tokio::task::yield_now().await;
        q.add("x");
        let got = tokio::time::timeout(Duration::from_secs(5), worker)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, "x");
    }
}
