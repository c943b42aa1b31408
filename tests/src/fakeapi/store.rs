//! The object store: one table per resource type behind one lock, a global resourceVersion
//! counter bumped on every write, a bounded history of changes for watch resumption, lists and
//! watch registration. The write verbs are in `write.rs`, garbage collection in `gc.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::patch::FieldPath;
use super::resources::{RESOURCES, ResourceDef};
use super::selectors::Selectors;
use super::status::ApiError;
use super::write::render_managed_fields;

/// `(namespace, name)`; the namespace is "" for cluster-scoped objects. Orders like etcd keys.
pub type ObjectKey = (String, String);

/// Watch event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One committed change, as kept in the history and broadcast to open watches.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub resource: usize,
    pub event: EventType,
    /// The object after the change; for `Deleted`, its last state carrying the deletion's version.
    pub object: Arc<Value>,
    /// The object before the change (`Modified` only), to find selector transitions.
    pub previous: Option<Arc<Value>>,
    line: OnceLock<Bytes>,
}

impl Change {
    /// The watch line for this change as most watches see it, serialized once.
    pub fn line(&self) -> Bytes {
        self.line
            .get_or_init(|| event_line(self.event.as_str(), &self.object))
            .clone()
    }
}

/// `{"type":...,"object":...}` and a newline: one watch event on the wire.
pub fn event_line(event_type: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": event_type, "object": object}))
        .expect("JSON values serialize");
    line.push(b'\n');
    Bytes::from(line)
}

/// Who owns which fields of an object, as `metadata.managedFields` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Manager {
    pub(super) name: String,
    pub(super) apply: bool,
    pub(super) subresource: &'static str,
    pub(super) api_version: String,
    pub(super) time: String,
    pub(super) fields: BTreeSet<FieldPath>,
}

#[derive(Debug, Clone)]
pub(super) struct Record {
    pub(super) object: Arc<Value>,
    pub(super) managers: Vec<Manager>,
}

/// Which part of an object a write addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Main,
    Status,
}

impl Part {
    pub(super) fn subresource(self) -> &'static str {
        match self {
            Part::Main => "",
            Part::Status => "status",
        }
    }
}

/// The writer of a change, for field ownership.
#[derive(Debug, Clone, Copy)]
pub struct Writer<'a> {
    pub manager: &'a str,
    pub dry_run: bool,
}

/// The patch formats the server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply { force: bool },
}

/// `DeleteOptions` that the store honours.
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub propagation: Propagation,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Propagation {
    #[default]
    Background,
    Foreground,
    Orphan,
}

/// What a DELETE did.
#[derive(Debug)]
pub enum Deletion {
    /// Finalizers keep the object; it now carries a deletionTimestamp.
    Kept(Arc<Value>),
    /// The object is gone.
    Removed(Arc<Value>),
}

/// One page of a list.
#[derive(Debug)]
pub struct ListPage {
    pub items: Vec<Arc<Value>>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<u64>,
}

/// Where a watch starts.
#[derive(Debug)]
pub struct WatchStart {
    /// Objects to send as synthetic ADDED events (a watch from "0", or initial events).
    pub initial: Vec<Arc<Value>>,
    /// Retained changes after the requested version, to replay.
    pub replay: Vec<Arc<Change>>,
    pub receiver: broadcast::Receiver<Arc<Change>>,
    /// The version the initial objects or the replay bring the watcher to.
    pub resource_version: u64,
    /// Cancelled by `close_watches`.
    pub closed: CancellationToken,
}

/// The requested start of a watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchFrom {
    /// Current objects as ADDED, then live changes.
    Current,
    /// Live changes only, from now.
    Now,
    /// Every retained change after this version, then live changes.
    Version(u64),
}

pub(super) struct State {
    pub(super) rv: u64,
    pub(super) tables: Vec<BTreeMap<ObjectKey, Record>>,
    /// uid → where that object lives, for owner lookups.
    pub(super) uids: HashMap<String, (usize, ObjectKey)>,
    /// owner uid → objects whose ownerReferences name it.
    pub(super) dependents: HashMap<String, BTreeSet<(usize, ObjectKey)>>,
    pub(super) history: VecDeque<Arc<Change>>,
    /// Changes up to this version are gone from the history.
    pub(super) compacted: u64,
    pub(super) history_limit: usize,
    pub(super) sender: broadcast::Sender<Arc<Change>>,
    pub(super) watches_closed: CancellationToken,
}

/// The whole API state.
pub struct Store {
    pub(super) state: Mutex<State>,
    pub(super) uid_seq: AtomicU64,
    pub(super) random: RandomState,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("Store")
            .field("resource_version", &state.rv)
            .field(
                "objects",
                &state.tables.iter().map(BTreeMap::len).sum::<usize>(),
            )
            .field("history", &state.history.len())
            .finish()
    }
}

/// Server time as object timestamps spell it (RFC 3339, whole seconds, UTC).
pub fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

pub(super) fn meta(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata").and_then(Value::as_object)
}

pub(super) fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    meta(obj).and_then(|m| m.get(field)).and_then(Value::as_str)
}

pub(super) fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = Value::Object(Map::new());
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata made an object above")
}

pub(super) fn finalizers(obj: &Value) -> Vec<&str> {
    meta(obj)
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

pub(super) fn owner_uids(obj: &Value) -> BTreeSet<String> {
    meta(obj)
        .and_then(|m| m.get("ownerReferences"))
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str))
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// The characters kube-apiserver draws `generateName` suffixes from.
pub(super) const NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

impl Store {
    pub fn new(history_limit: usize, watch_buffer: usize) -> Self {
        let (sender, _) = broadcast::channel(watch_buffer.max(1));
        Self {
            state: Mutex::new(State {
                rv: 0,
                tables: RESOURCES.iter().map(|_| BTreeMap::new()).collect(),
                uids: HashMap::new(),
                dependents: HashMap::new(),
                history: VecDeque::new(),
                compacted: 0,
                history_limit: history_limit.max(1),
                sender,
                watches_closed: CancellationToken::new(),
            }),
            uid_seq: AtomicU64::new(0),
            random: RandomState::new(),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn random_u64(&self) -> u64 {
        self.random
            .hash_one(self.uid_seq.fetch_add(1, Ordering::Relaxed))
    }

    pub(super) fn new_uid(&self) -> String {
        let (a, b) = (self.random_u64(), self.random_u64());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0x0fff,
            0x8000 | (b >> 48) & 0x3fff,
            b & 0xffff_ffff_ffff
        )
    }

    pub(super) fn name_suffix(&self) -> String {
        let mut r = self.random_u64();
        (0..5)
            .map(|_| {
                let c = NAME_ALPHABET[(r % NAME_ALPHABET.len() as u64) as usize];
                r /= NAME_ALPHABET.len() as u64;
                c as char
            })
            .collect()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Number of stored objects of every type.
    pub fn object_count(&self) -> usize {
        self.lock().tables.iter().map(BTreeMap::len).sum()
    }

    /// Drops the whole retained history: a watch from any earlier version then gets 410.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.history.clear();
        state.compacted = state.rv;
    }

    /// Ends every open watch stream, as an API server restart would.
    pub fn close_watches(&self) {
        let mut state = self.lock();
        state.watches_closed.cancel();
        state.watches_closed = CancellationToken::new();
    }

    pub fn get(
        &self,
        res: &'static ResourceDef,
        ns: &str,
        name: &str,
    ) -> Result<Arc<Value>, ApiError> {
        let state = self.lock();
        state.tables[res.index()]
            .get(&(ns.to_string(), name.to_string()))
            .map(|r| Arc::clone(&r.object))
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    /// Lists `res` in `ns` (or everywhere), paged by `limit` and `continue`.
    #[allow(clippy::too_many_arguments)] // the list options of the real API, one each
    pub fn list(
        &self,
        res: &'static ResourceDef,
        ns: Option<&str>,
        selectors: &Selectors,
        limit: Option<usize>,
        continue_token: Option<&str>,
        resource_version: Option<&str>,
        resource_version_match: Option<&str>,
    ) -> Result<ListPage, ApiError> {
        let state = self.lock();
        if continue_token.is_some() && resource_version.is_some_and(|v| !v.is_empty()) {
            return Err(ApiError::bad_request(
                "specifying resource version is not allowed when using continue",
            ));
        }
        let requested = match resource_version.filter(|v| !v.is_empty()) {
            Some(v) => Some(parse_rv(v)?),
            None => None,
        };
        match (resource_version_match.filter(|m| !m.is_empty()), requested) {
            (Some(_), None) => {
                return Err(ApiError::unprocessable(
                    "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
                ));
            }
            (Some("Exact" | "NotOlderThan") | None, Some(v)) if v > state.rv => {
                return Err(ApiError::too_large_resource_version(v, state.rv));
            }
            // lists are served at the current version only: no MVCC history to read an older one from
            (Some("Exact"), Some(v)) if v != state.rv => {
                return Err(ApiError::expired(format!(
                    "too old resource version: {v} ({})",
                    state.rv
                )));
            }
            (Some(other), _) if other != "Exact" && other != "NotOlderThan" => {
                return Err(ApiError::unprocessable(format!(
                    "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Unsupported value: \"{other}\": supported values: \"Exact\", \"NotOlderThan\""
                )));
            }
            _ => {}
        }
        // the watch cache serves resourceVersion=0 whole, ignoring limit, as the real server does
        let limit = if requested == Some(0) {
            None
        } else {
            limit.filter(|l| *l > 0)
        };
        let (list_rv, start) = match continue_token {
            Some(token) => {
                let (rv, start) = decode_continue(token)?;
                if rv < state.compacted {
                    return Err(ApiError::expired(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
                    ));
                }
                (rv, Some(start))
            }
            None => (state.rv, None),
        };
        let table = &state.tables[res.index()];
        let lower = match (&start, ns) {
            (Some(key), _) => std::ops::Bound::Excluded(key.clone()),
            (None, Some(ns)) => std::ops::Bound::Included((ns.to_string(), String::new())),
            (None, None) => std::ops::Bound::Unbounded,
        };
        let mut matching = table
            .range((lower, std::ops::Bound::Unbounded))
            .take_while(|((k_ns, _), _)| ns.is_none_or(|ns| k_ns == ns))
            .filter(|(_, r)| selectors.matches(&r.object));
        let mut items = Vec::new();
        let mut last_key = None;
        for (key, record) in matching.by_ref() {
            if limit.is_some_and(|l| items.len() == l) {
                // one more exists: hand out a token that resumes after the last returned key
                let rest = 1 + matching.count() as u64;
                let no_selectors = selectors.labels.is_empty() && selectors.fields.is_empty();
                return Ok(ListPage {
                    items,
                    resource_version: list_rv,
                    continue_token: last_key.map(|k| encode_continue(list_rv, k)),
                    remaining: no_selectors.then_some(rest),
                });
            }
            items.push(Arc::clone(&record.object));
            last_key = Some(key);
        }
        Ok(ListPage {
            items,
            resource_version: list_rv,
            continue_token: None,
            remaining: None,
        })
    }

    /// Registers a watch: the events to send first and a receiver for live changes, taken
    /// under the lock so nothing falls between them.
    pub fn watch(
        &self,
        res: &'static ResourceDef,
        ns: Option<&str>,
        selectors: &Selectors,
        from: WatchFrom,
    ) -> Result<WatchStart, ApiError> {
        let state = self.lock();
        let receiver = state.sender.subscribe();
        let closed = state.watches_closed.clone();
        let in_scope = |obj: &Value| ns.is_none_or(|ns| meta_str(obj, "namespace") == Some(ns));
        match from {
            WatchFrom::Current => {
                let initial = state.tables[res.index()]
                    .values()
                    .filter(|r| in_scope(&r.object) && selectors.matches(&r.object))
                    .map(|r| Arc::clone(&r.object))
                    .collect();
                Ok(WatchStart {
                    initial,
                    replay: Vec::new(),
                    receiver,
                    resource_version: state.rv,
                    closed,
                })
            }
            WatchFrom::Now => Ok(WatchStart {
                initial: Vec::new(),
                replay: Vec::new(),
                receiver,
                resource_version: state.rv,
                closed,
            }),
            WatchFrom::Version(v) if v > state.rv => {
                Err(ApiError::too_large_resource_version(v, state.rv))
            }
            WatchFrom::Version(v) if v < state.compacted => Err(ApiError::expired(format!(
                "too old resource version: {v} ({})",
                state.compacted + 1
            ))),
            WatchFrom::Version(v) => {
                let first = state.history.partition_point(|c| c.rv <= v);
                let replay = state
                    .history
                    .range(first..)
                    .filter(|c| c.resource == res.index())
                    .cloned()
                    .collect();
                Ok(WatchStart {
                    initial: Vec::new(),
                    replay,
                    receiver,
                    resource_version: state.rv,
                    closed,
                })
            }
        }
    }
}

pub(super) fn parse_rv(v: &str) -> Result<u64, ApiError> {
    v.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {v:?}")))
}

pub(super) fn encode_continue(rv: u64, key: &ObjectKey) -> String {
    use base64::Engine as _;
    let start = if key.0.is_empty() {
        key.1.clone()
    } else {
        format!("{}/{}", key.0, key.1)
    };
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start});
    base64::engine::general_purpose::URL_SAFE.encode(token.to_string())
}

pub(super) fn decode_continue(token: &str) -> Result<(u64, ObjectKey), ApiError> {
    use base64::Engine as _;
    let invalid = |why: &str| ApiError::bad_request(format!("continue key is not valid: {why}"));
    let bytes = base64::engine::general_purpose::URL_SAFE
        .decode(token)
        .map_err(|_| invalid("not base64"))?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| invalid("not JSON"))?;
    if value.get("v").and_then(Value::as_str) != Some("meta.k8s.io/v1") {
        return Err(invalid(
            "incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
        ));
    }
    let rv = value
        .get("rv")
        .and_then(Value::as_u64)
        .ok_or_else(|| invalid("no resourceVersion"))?;
    let start = value
        .get("start")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("no start key"))?;
    let key = match start.split_once('/') {
        Some((ns, name)) => (ns.to_string(), name.to_string()),
        None => (String::new(), start.to_string()),
    };
    Ok((rv, key))
}

impl State {
    /// Stores (or, for `Deleted`, drops) the object at a new resourceVersion and records the change.
    pub(super) fn commit(
        &mut self,
        res: &'static ResourceDef,
        key: ObjectKey,
        old: Option<&Record>,
        mut object: Value,
        managers: Vec<Manager>,
        event: EventType,
    ) -> Arc<Value> {
        self.rv += 1;
        let rv = self.rv;
        meta_mut(&mut object).insert("resourceVersion".into(), json!(rv.to_string()));
        render_managed_fields(&mut object, &managers);
        let object = Arc::new(object);
        let table = res.index();
        let old_owners = old.map(|r| owner_uids(&r.object)).unwrap_or_default();
        let new_owners = if event == EventType::Deleted {
            BTreeSet::new()
        } else {
            owner_uids(&object)
        };
        for gone in old_owners.difference(&new_owners) {
            if let Some(set) = self.dependents.get_mut(gone) {
                set.remove(&(table, key.clone()));
                if set.is_empty() {
                    self.dependents.remove(gone);
                }
            }
        }
        for owner in new_owners.difference(&old_owners) {
            self.dependents
                .entry(owner.clone())
                .or_default()
                .insert((table, key.clone()));
        }
        let uid = meta_str(&object, "uid").unwrap_or_default().to_string();
        if event == EventType::Deleted {
            self.tables[table].remove(&key);
            self.uids.remove(&uid);
        } else {
            self.uids.insert(uid, (table, key.clone()));
            self.tables[table].insert(
                key,
                Record {
                    object: Arc::clone(&object),
                    managers,
                },
            );
        }
        let change = Arc::new(Change {
            rv,
            resource: table,
            event,
            object: Arc::clone(&object),
            previous: old
                .filter(|_| event == EventType::Modified)
                .map(|r| Arc::clone(&r.object)),
            line: OnceLock::new(),
        });
        self.history.push_back(Arc::clone(&change));
        while self.history.len() > self.history_limit {
            if let Some(oldest) = self.history.pop_front() {
                self.compacted = oldest.rv;
            }
        }
        // no receivers is fine: nobody is watching
        let _ = self.sender.send(change);
        object
    }

    /// Removes an object at once (DELETED event).
    pub(super) fn remove(&mut self, res: &'static ResourceDef, key: &ObjectKey) -> Arc<Value> {
        let record = self.tables[res.index()]
            .get(key)
            .cloned()
            .expect("caller checked existence");
        let last = (*record.object).clone();
        self.commit(
            res,
            key.clone(),
            Some(&record),
            last,
            record.managers.clone(),
            EventType::Deleted,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods() -> &'static ResourceDef {
        &RESOURCES[0]
    }

    fn w() -> Writer<'static> {
        Writer {
            manager: "test",
            dry_run: false,
        }
    }

    #[test]
    fn continue_tokens_round_trip() {
        let key = ("ns".to_string(), "p-1".to_string());
        let token = encode_continue(42, &key);
        assert_eq!(decode_continue(&token).ok(), Some((42, key)));
        assert_eq!(decode_continue("garbage!").map_err(|e| e.code), Err(400));
    }

    #[test]
    fn history_limit_compacts_and_expires_old_watches() {
        let store = Store::new(3, 16);
        for i in 0..5 {
            store
                .create(
                    pods(),
                    Some("ns"),
                    json!({"metadata": {"name": format!("p{i}")}}),
                    w(),
                )
                .expect("create");
        }
        assert_eq!(store.resource_version(), 5);
        let sel = Selectors::default();
        assert_eq!(
            store
                .watch(pods(), None, &sel, WatchFrom::Version(1))
                .map(|_| ())
                .map_err(|e| e.code),
            Err(410)
        );
        let from2 = store
            .watch(pods(), None, &sel, WatchFrom::Version(2))
            .expect("retained");
        assert_eq!(
            from2.replay.iter().map(|c| c.rv).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        assert_eq!(
            store
                .watch(pods(), None, &sel, WatchFrom::Version(9))
                .map(|_| ())
                .map_err(|e| e.code),
            Err(504)
        );
    }

    #[test]
    fn list_resource_version_options() {
        let store = Store::new(10, 16);
        for i in 0..3 {
            store
                .create(
                    pods(),
                    Some("ns"),
                    json!({"metadata": {"name": format!("p{i}")}}),
                    w(),
                )
                .expect("create");
        }
        let sel = Selectors::default();
        let list = |rv: Option<&str>, m: Option<&str>, cont: Option<&str>| {
            store
                .list(pods(), Some("ns"), &sel, None, cont, rv, m)
                .map(|p| p.items.len())
                .map_err(|e| e.code)
        };
        assert_eq!(list(None, None, None), Ok(3));
        assert_eq!(list(Some("0"), None, None), Ok(3));
        assert_eq!(list(Some("3"), Some("Exact"), None), Ok(3));
        assert_eq!(list(Some("2"), Some("Exact"), None), Err(410));
        assert_eq!(list(Some("2"), Some("NotOlderThan"), None), Ok(3));
        assert_eq!(list(Some("9"), Some("NotOlderThan"), None), Err(504));
        assert_eq!(list(None, Some("Exact"), None), Err(422));
        assert_eq!(list(Some("3"), Some("Newest"), None), Err(422));
        assert_eq!(list(Some("x"), None, None), Err(400));
        let token = encode_continue(3, &("ns".to_string(), "p0".to_string()));
        assert_eq!(list(None, None, Some(&token)), Ok(2));
        assert_eq!(list(Some("3"), None, Some(&token)), Err(400));
    }

    #[test]
    fn uids_are_uuid_shaped_and_distinct() {
        let store = Store::new(10, 16);
        let (a, b) = (store.new_uid(), store.new_uid());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'4');
        assert!(
            store
                .name_suffix()
                .bytes()
                .all(|c| NAME_ALPHABET.contains(&c))
        );
    }
}
