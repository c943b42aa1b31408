//! The pure core of tokend's node data path: which attachments are registered, in which
//! network namespace, and which listener (netns, port) each one holds. It decides (existing /
//! replace / share / new listener / release); the caller does the I/O the decision asks for
//! and then commits it. `L` is the caller's handle to a live listener.
//!
//! It also keeps, per netns, which pod its listeners serve ([`PodAttribution`]): the identity
//! step reads it on every request, so it lives in [`NetnsShared`], beside the request counter.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use podid_api::wire::PodState;
use podid_api::{BoundPod, PodKey, PodRecord};

use crate::netns::NetnsId;

/// A Kubernetes pod as its CNI args name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which pod the listeners of one netns serve, from the records registered in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodAttribution {
    /// Every record names this pod, with namespace, name and UID.
    Pod(PodRef),
    /// No record names a pod completely (a runtime that passes no `K8S_POD_*` args, or no
    /// `K8S_POD_UID`): the listener matches no identity.
    Unnamed,
    /// The records name different pods: fail closed, no identity.
    Conflicting,
}

impl PodAttribution {
    /// The pod named by `records`: one complete (namespace, name, UID) shared by all of them.
    pub fn of<'a>(records: impl IntoIterator<Item = &'a PodRecord>) -> Self {
        let named: BTreeSet<Option<PodRef>> = records
            .into_iter()
            .map(|r| match (&r.pod_namespace, &r.pod_name, &r.pod_uid) {
                (Some(namespace), Some(name), Some(uid))
                    if !namespace.is_empty() && !name.is_empty() && !uid.is_empty() =>
                {
                    Some(PodRef {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        uid: uid.clone(),
                    })
                }
                _ => None,
            })
            .collect();
        let mut named = named.into_iter();
        match (named.next(), named.next()) {
            (Some(Some(pod)), None) => Self::Pod(pod),
            (Some(None), None) | (None, _) => Self::Unnamed,
            (Some(_), Some(_)) => Self::Conflicting,
        }
    }
}

/// What the listeners of one netns share: their request counter and the pod they serve.
#[derive(Debug)]
pub struct NetnsShared {
    requests: AtomicU64,
    pod: RwLock<Arc<PodAttribution>>,
}

impl Default for NetnsShared {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            pod: RwLock::new(Arc::new(PodAttribution::Unnamed)),
        }
    }
}

impl NetnsShared {
    /// A new netns's state, serving `pod` from the start (its listener may take requests
    /// before the registration is committed).
    pub fn attributed(pod: PodAttribution) -> Self {
        Self {
            requests: AtomicU64::new(0),
            pod: RwLock::new(Arc::new(pod)),
        }
    }

    /// Counts one answered request.
    pub fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The pod the netns's listeners serve now.
    pub fn pod(&self) -> Arc<PodAttribution> {
        Arc::clone(&self.pod.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub(crate) fn set_pod(&self, pod: PodAttribution) {
        let mut slot = self.pod.write().unwrap_or_else(PoisonError::into_inner);
        if **slot != pod {
            *slot = Arc::new(pod);
        }
    }
}

/// Which port a registration asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortChoice {
    /// A PUT: share any listener the netns already has (this port first), else bind this one.
    Configured(u16),
    /// An adopted or restored record: exactly this port, where its redirect already points.
    Exact(u16),
}

/// What to do with a registration.
#[derive(Debug)]
pub enum Plan {
    /// The key is already registered in this netns on this port.
    Existing {
        port: u16,
        /// Whether its listener is open (else the caller binds it again).
        live: bool,
        /// Whether the record differs from the stored one (the caller persists and re-inserts).
        changed: bool,
    },
    /// Register the key on `port`; [`Registry::insert`] releases what the key held before.
    Register {
        port: u16,
        /// Whether no open listener exists on (netns, port) yet: the caller binds one.
        needs_bind: bool,
        /// Whether the key was registered elsewhere (another netns or another port).
        replaces: bool,
        /// What the netns's listeners share.
        shared: Arc<NetnsShared>,
    },
}

/// A listener slot the caller should try to open again.
#[derive(Debug, Clone)]
pub struct BindTarget {
    pub netns: NetnsId,
    pub port: u16,
    /// Netns path of one of the slot's keys.
    pub path: String,
    pub shared: Arc<NetnsShared>,
}

/// One registered key, for the periodic netns check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub key: PodKey,
    pub path: String,
    pub netns: NetnsId,
}

/// What removing a key released.
#[derive(Debug)]
pub struct Removed<L> {
    pub bound: BoundPod,
    /// The listener the key was the last user of, if it was open.
    pub closed: Option<L>,
}

#[derive(Debug)]
struct PodEntry {
    bound: BoundPod,
    netns: NetnsId,
}

#[derive(Debug)]
struct NetnsEntry<L> {
    listeners: BTreeMap<u16, Slot<L>>,
    shared: Arc<NetnsShared>,
}

#[derive(Debug)]
struct Slot<L> {
    users: BTreeSet<PodKey>,
    live: Option<L>,
}

/// Registered attachments and their listeners. Invariant: the listeners of a netns are exactly
/// the ports its keys hold, and a slot exists only while at least one key uses it.
#[derive(Debug)]
pub struct Registry<L> {
    pods: BTreeMap<PodKey, PodEntry>,
    netns: BTreeMap<NetnsId, NetnsEntry<L>>,
}

impl<L> Default for Registry<L> {
    fn default() -> Self {
        Self {
            pods: BTreeMap::new(),
            netns: BTreeMap::new(),
        }
    }
}

impl<L> Registry<L> {
    /// Decides how to register `record`, whose netns path names `netns` right now.
    pub fn plan(&self, record: &PodRecord, netns: NetnsId, choice: PortChoice) -> Plan {
        let key = record.key();
        let current = self.pods.get(&key);
        if let Some(entry) = current.filter(|e| e.netns == netns) {
            let port = entry.bound.listener_port;
            let same_port = match choice {
                PortChoice::Configured(_) => true,
                PortChoice::Exact(wanted) => wanted == port,
            };
            if same_port {
                return Plan::Existing {
                    port,
                    live: self.is_live(netns, port),
                    changed: entry.bound.record != *record,
                };
            }
        }
        let ns = self.netns.get(&netns);
        let port = match choice {
            PortChoice::Exact(port) => port,
            PortChoice::Configured(default) => ns
                .filter(|ns| !ns.listeners.contains_key(&default))
                .and_then(|ns| ns.listeners.keys().next().copied())
                .unwrap_or(default),
        };
        Plan::Register {
            port,
            needs_bind: !self.is_live(netns, port),
            replaces: current.is_some(),
            shared: ns.map_or_else(
                || Arc::new(NetnsShared::attributed(PodAttribution::of([record]))),
                |ns| Arc::clone(&ns.shared),
            ),
        }
    }

    /// Registers `bound` in `netns`, using `live` as the listener of its slot if given, and
    /// releases whatever the key held before. Returns the listeners that must be closed.
    pub fn insert(
        &mut self,
        bound: BoundPod,
        netns: NetnsId,
        live: Option<L>,
        shared: Arc<NetnsShared>,
    ) -> Vec<L> {
        let key = bound.record.key();
        let port = bound.listener_port;
        let mut closed = Vec::new();
        let ns = self.netns.entry(netns).or_insert_with(|| NetnsEntry {
            listeners: BTreeMap::new(),
            shared,
        });
        let slot = ns.listeners.entry(port).or_insert_with(|| Slot {
            users: BTreeSet::new(),
            live: None,
        });
        slot.users.insert(key.clone());
        if let Some(old) = live.and_then(|live| slot.live.replace(live)) {
            closed.push(old);
        }
        if let Some(previous) = self.pods.insert(key.clone(), PodEntry { bound, netns }) {
            let previous_slot = (previous.netns, previous.bound.listener_port);
            if previous_slot != (netns, port) {
                closed.extend(self.release(previous_slot.0, previous_slot.1, &key));
            }
        }
        self.attribute(netns);
        closed
    }

    /// Unregisters `key`; the listener it was the last user of is handed back for closing.
    pub fn remove(&mut self, key: &PodKey) -> Option<Removed<L>> {
        let entry = self.pods.remove(key)?;
        let closed = self.release(entry.netns, entry.bound.listener_port, key);
        Some(Removed {
            bound: entry.bound,
            closed,
        })
    }

    /// Installs a freshly bound listener on a slot that had none open. Returns `live` back
    /// when the slot no longer exists (its keys were removed meanwhile) or was already open.
    pub fn set_live(&mut self, netns: NetnsId, port: u16, live: L) -> Result<(), L> {
        match self
            .netns
            .get_mut(&netns)
            .and_then(|ns| ns.listeners.get_mut(&port))
        {
            Some(slot) if slot.live.is_none() => {
                slot.live = Some(live);
                Ok(())
            }
            _ => Err(live),
        }
    }

    /// Slots whose listener is not open, to be retried.
    pub fn unbound(&self) -> Vec<BindTarget> {
        let mut targets = Vec::new();
        for (netns, ns) in &self.netns {
            for (port, slot) in &ns.listeners {
                if slot.live.is_some() {
                    continue;
                }
                let path = slot
                    .users
                    .iter()
                    .find_map(|key| self.pods.get(key))
                    .map(|entry| entry.bound.record.netns.clone());
                if let Some(path) = path {
                    targets.push(BindTarget {
                        netns: *netns,
                        port: *port,
                        path,
                        shared: Arc::clone(&ns.shared),
                    });
                }
            }
        }
        targets
    }

    /// Every registered key with its netns path and identity.
    pub fn registered(&self) -> Vec<Registered> {
        self.pods
            .iter()
            .map(|(key, entry)| Registered {
                key: key.clone(),
                path: entry.bound.record.netns.clone(),
                netns: entry.netns,
            })
            .collect()
    }

    /// What the listeners of `netns` share, if it has registrations.
    pub fn shared(&self, netns: NetnsId) -> Option<Arc<NetnsShared>> {
        self.netns.get(&netns).map(|ns| Arc::clone(&ns.shared))
    }

    pub fn contains(&self, key: &PodKey) -> bool {
        self.pods.contains_key(key)
    }

    /// Number of registered keys.
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// Number of open listeners.
    pub fn live_listeners(&self) -> usize {
        self.netns
            .values()
            .flat_map(|ns| ns.listeners.values())
            .filter(|slot| slot.live.is_some())
            .count()
    }

    /// The API view of one key.
    pub fn state(&self, key: &PodKey) -> Option<PodState> {
        self.pods.get(key).map(|entry| self.state_of(entry))
    }

    /// The API view of every key, sorted by key.
    pub fn states(&self) -> Vec<PodState> {
        self.pods
            .values()
            .map(|entry| self.state_of(entry))
            .collect()
    }

    fn state_of(&self, entry: &PodEntry) -> PodState {
        PodState {
            bound: entry.bound.clone(),
            listener_bound: self.is_live(entry.netns, entry.bound.listener_port),
            requests: self
                .netns
                .get(&entry.netns)
                .map_or(0, |ns| ns.shared.requests()),
        }
    }

    fn is_live(&self, netns: NetnsId, port: u16) -> bool {
        self.netns
            .get(&netns)
            .and_then(|ns| ns.listeners.get(&port))
            .is_some_and(|slot| slot.live.is_some())
    }

    fn release(&mut self, netns: NetnsId, port: u16, key: &PodKey) -> Option<L> {
        let ns = self.netns.get_mut(&netns)?;
        let slot = ns.listeners.get_mut(&port)?;
        slot.users.remove(key);
        if !slot.users.is_empty() {
            self.attribute(netns);
            return None;
        }
        let live = ns.listeners.remove(&port).and_then(|slot| slot.live);
        if ns.listeners.is_empty() {
            self.netns.remove(&netns);
        } else {
            self.attribute(netns);
        }
        live
    }

    /// Recomputes which pod the listeners of `netns` serve from the records registered there.
    fn attribute(&self, netns: NetnsId) {
        let Some(ns) = self.netns.get(&netns) else {
            return;
        };
        let records = ns
            .listeners
            .values()
            .flat_map(|slot| &slot.users)
            .filter_map(|key| self.pods.get(key))
            .map(|entry| &entry.bound.record);
        ns.shared.set_pod(PodAttribution::of(records));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS_A: NetnsId = NetnsId { dev: 4, ino: 100 };
    const NS_B: NetnsId = NetnsId { dev: 4, ino: 200 };

    /// A listener stand-in that says which slot it was bound for.
    #[derive(Debug, PartialEq, Eq)]
    struct Fake(&'static str);

    fn record(cid: &str, ifname: &str, netns: &str) -> PodRecord {
        PodRecord {
            container_id: cid.into(),
            ifname: ifname.into(),
            netns: format!("/run/netns/{netns}"),
            netns_inode: 0,
            netns_dev: 0,
            pod_namespace: Some("ns".into()),
            pod_name: Some(cid.into()),
            pod_uid: None,
            ips: vec![],
            network: None,
        }
    }

    /// Plans, "binds" when asked, and inserts: what the shell does, minus the I/O.
    fn register(
        reg: &mut Registry<Fake>,
        record: PodRecord,
        netns: NetnsId,
        choice: PortChoice,
        name: &'static str,
    ) -> (u16, Vec<Fake>) {
        match reg.plan(&record, netns, choice) {
            Plan::Existing { port, .. } => (port, vec![]),
            Plan::Register {
                port,
                needs_bind,
                shared,
                ..
            } => {
                let live = needs_bind.then_some(Fake(name));
                let bound = BoundPod {
                    record,
                    listener_port: port,
                };
                (port, reg.insert(bound, netns, live, shared))
            }
        }
    }

    #[test]
    fn new_key_binds_the_configured_port() {
        let reg = Registry::<Fake>::default();
        match reg.plan(
            &record("a", "eth0", "a"),
            NS_A,
            PortChoice::Configured(2579),
        ) {
            Plan::Register {
                port,
                needs_bind,
                replaces,
                ..
            } => {
                assert_eq!(port, 2579);
                assert!(needs_bind);
                assert!(!replaces);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn same_key_same_netns_is_existing() {
        let mut reg = Registry::default();
        let r = record("a", "eth0", "a");
        register(&mut reg, r.clone(), NS_A, PortChoice::Configured(2579), "a");
        match reg.plan(&r, NS_A, PortChoice::Configured(3000)) {
            Plan::Existing {
                port,
                live,
                changed,
            } => {
                assert_eq!(
                    port, 2579,
                    "an idempotent PUT keeps the port it answered first"
                );
                assert!(live);
                assert!(!changed);
            }
            other => panic!("{other:?}"),
        }
        let mut renamed = r.clone();
        renamed.pod_name = Some("other".into());
        assert!(matches!(
            reg.plan(&renamed, NS_A, PortChoice::Configured(2579)),
            Plan::Existing { changed: true, .. }
        ));
        // Re-inserting a changed record on the same slot keeps the listener open.
        let closed = reg.insert(
            BoundPod {
                record: renamed,
                listener_port: 2579,
            },
            NS_A,
            None,
            Arc::default(),
        );
        assert!(closed.is_empty());
        assert_eq!(reg.live_listeners(), 1);
        assert_eq!(
            reg.state(&r.key())
                .unwrap()
                .bound
                .record
                .pod_name
                .as_deref(),
            Some("other")
        );
    }

    #[test]
    fn same_key_other_netns_replaces_and_closes_the_old_listener() {
        let mut reg = Registry::default();
        register(
            &mut reg,
            record("a", "eth0", "a"),
            NS_A,
            PortChoice::Configured(2579),
            "a",
        );
        let moved = record("a", "eth0", "b");
        match reg.plan(&moved, NS_B, PortChoice::Configured(2579)) {
            Plan::Register {
                needs_bind,
                replaces,
                ..
            } => assert!(needs_bind && replaces),
            other => panic!("{other:?}"),
        }
        let (port, closed) = register(&mut reg, moved, NS_B, PortChoice::Configured(2579), "b");
        assert_eq!(port, 2579);
        assert_eq!(closed, vec![Fake("a")]);
        assert_eq!(reg.len(), 1);
        assert_eq!(reg.live_listeners(), 1);
        assert!(reg.shared(NS_A).is_none(), "the old netns is forgotten");
    }

    #[test]
    fn keys_of_one_netns_share_a_listener_until_the_last_leaves() {
        let mut reg = Registry::default();
        register(
            &mut reg,
            record("a", "eth0", "a"),
            NS_A,
            PortChoice::Configured(2579),
            "a",
        );
        match reg.plan(
            &record("a", "net1", "a"),
            NS_A,
            PortChoice::Configured(2579),
        ) {
            Plan::Register {
                port, needs_bind, ..
            } => assert!(port == 2579 && !needs_bind),
            other => panic!("{other:?}"),
        }
        register(
            &mut reg,
            record("a", "net1", "a"),
            NS_A,
            PortChoice::Configured(2579),
            "x",
        );
        assert_eq!(reg.live_listeners(), 1);
        assert_eq!(reg.len(), 2);
        for _ in 0..3 {
            reg.shared(NS_A).unwrap().count_request();
        }
        assert!(
            reg.states()
                .iter()
                .all(|s| s.requests == 3 && s.listener_bound)
        );

        let removed = reg.remove(&PodKey::new("a", "eth0")).unwrap();
        assert!(removed.closed.is_none());
        assert_eq!(reg.live_listeners(), 1);
        let removed = reg.remove(&PodKey::new("a", "net1")).unwrap();
        assert_eq!(removed.closed, Some(Fake("a")));
        assert_eq!(reg.live_listeners(), 0);
        assert!(reg.remove(&PodKey::new("a", "net1")).is_none());
    }

    #[test]
    fn a_put_shares_the_port_the_netns_already_listens_on() {
        let mut reg = Registry::default();
        // Adopted from the spool on the port an older tokend announced.
        register(
            &mut reg,
            record("a", "eth0", "a"),
            NS_A,
            PortChoice::Exact(2600),
            "a",
        );
        let (port, closed) = register(
            &mut reg,
            record("a", "net1", "a"),
            NS_A,
            PortChoice::Configured(2579),
            "x",
        );
        assert_eq!(port, 2600);
        assert!(closed.is_empty());
        assert_eq!(reg.live_listeners(), 1);
    }

    #[test]
    fn adoption_binds_its_own_port_next_to_an_existing_listener() {
        let mut reg = Registry::default();
        register(
            &mut reg,
            record("a", "eth0", "a"),
            NS_A,
            PortChoice::Configured(2579),
            "a",
        );
        let (port, _) = register(
            &mut reg,
            record("a", "net1", "a"),
            NS_A,
            PortChoice::Exact(2600),
            "b",
        );
        assert_eq!(port, 2600);
        assert_eq!(reg.live_listeners(), 2);
        reg.shared(NS_A).unwrap().count_request();
        assert!(reg.states().iter().all(|s| s.requests == 1));
    }

    #[test]
    fn adoption_of_a_known_key_on_another_port_moves_it() {
        let mut reg = Registry::default();
        let r = record("a", "eth0", "a");
        register(&mut reg, r.clone(), NS_A, PortChoice::Configured(2579), "a");
        assert!(matches!(
            reg.plan(&r, NS_A, PortChoice::Exact(2579)),
            Plan::Existing { .. }
        ));
        match reg.plan(&r, NS_A, PortChoice::Exact(2600)) {
            Plan::Register {
                port,
                needs_bind,
                replaces,
                ..
            } => assert!(port == 2600 && needs_bind && replaces),
            other => panic!("{other:?}"),
        }
        let (_, closed) = register(&mut reg, r.clone(), NS_A, PortChoice::Exact(2600), "b");
        assert_eq!(closed, vec![Fake("a")]);
        assert_eq!(reg.state(&r.key()).unwrap().bound.listener_port, 2600);
        assert_eq!(reg.live_listeners(), 1);
    }

    #[test]
    fn unbound_slots_are_listed_and_can_be_opened_later() {
        let mut reg = Registry::<Fake>::default();
        let r = record("a", "eth0", "a");
        let shared = Arc::new(NetnsShared::default());
        let closed = reg.insert(
            BoundPod {
                record: r.clone(),
                listener_port: 2579,
            },
            NS_A,
            None,
            shared,
        );
        assert!(closed.is_empty());
        assert!(!reg.state(&r.key()).unwrap().listener_bound);
        let targets = reg.unbound();
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].path, "/run/netns/a");
        assert_eq!((targets[0].netns, targets[0].port), (NS_A, 2579));
        assert!(matches!(
            reg.plan(&r, NS_A, PortChoice::Configured(2579)),
            Plan::Existing { live: false, .. }
        ));

        assert!(reg.set_live(NS_A, 2579, Fake("late")).is_ok());
        assert!(reg.state(&r.key()).unwrap().listener_bound);
        assert!(reg.unbound().is_empty());
        assert_eq!(reg.set_live(NS_A, 2579, Fake("twice")), Err(Fake("twice")));
        assert_eq!(
            reg.set_live(NS_B, 2579, Fake("nobody")),
            Err(Fake("nobody"))
        );
    }

    #[test]
    fn states_are_sorted_by_key() {
        let mut reg = Registry::default();
        for (ino, cid) in [(1, "c"), (2, "a"), (3, "b")] {
            let netns = NetnsId { dev: 1, ino };
            register(
                &mut reg,
                record(cid, "eth0", cid),
                netns,
                PortChoice::Configured(2579),
                "x",
            );
        }
        let keys: Vec<_> = reg
            .states()
            .iter()
            .map(|s| s.bound.record.container_id.clone())
            .collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert_eq!(reg.registered().len(), 3);
        assert_eq!(reg.len(), 3);
    }

    fn pod_of(cid: &str, namespace: &str, name: &str, uid: Option<&str>) -> PodRecord {
        let mut r = record(cid, "eth0", cid);
        r.pod_namespace = Some(namespace.into());
        r.pod_name = Some(name.into());
        r.pod_uid = uid.map(Into::into);
        r
    }

    #[test]
    fn attribution_names_one_complete_pod_or_none() {
        let pod = PodRef {
            namespace: "ns".into(),
            name: "web".into(),
            uid: "u1".into(),
        };
        let a = pod_of("a", "ns", "web", Some("u1"));
        let b = pod_of("b", "ns", "web", Some("u1"));
        assert_eq!(PodAttribution::of([&a, &b]), PodAttribution::Pod(pod));
        let no_uid = pod_of("c", "ns", "web", None);
        assert_eq!(PodAttribution::of([&no_uid]), PodAttribution::Unnamed);
        let mut bare = record("d", "eth0", "d");
        bare.pod_namespace = None;
        bare.pod_name = None;
        assert_eq!(PodAttribution::of([&bare]), PodAttribution::Unnamed);
        assert_eq!(PodAttribution::of([]), PodAttribution::Unnamed);
        let other = pod_of("e", "ns", "web", Some("u2"));
        assert_eq!(
            PodAttribution::of([&a, &other]),
            PodAttribution::Conflicting
        );
        assert_eq!(
            PodAttribution::of([&a, &no_uid]),
            PodAttribution::Conflicting
        );
    }

    #[test]
    fn a_new_netns_serves_its_pod_before_it_is_committed() {
        let reg = Registry::<Fake>::default();
        let r = pod_of("a", "ns", "web", Some("u1"));
        match reg.plan(&r, NS_A, PortChoice::Configured(2579)) {
            Plan::Register { shared, .. } => {
                assert!(matches!(&*shared.pod(), PodAttribution::Pod(p) if p.uid == "u1"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_registry_keeps_each_netns_attribution_current() {
        let mut reg = Registry::default();
        let first = pod_of("a", "ns", "web", Some("u1"));
        register(&mut reg, first, NS_A, PortChoice::Configured(2579), "a");
        let shared = reg.shared(NS_A).unwrap();
        assert!(matches!(&*shared.pod(), PodAttribution::Pod(p) if p.uid == "u1"));
        // A second interface of another pod in the same netns: conflicting, no identity.
        let mut second = pod_of("b", "ns", "other", Some("u2"));
        second.netns = "/run/netns/a".into();
        register(&mut reg, second, NS_A, PortChoice::Configured(2579), "b");
        assert_eq!(*shared.pod(), PodAttribution::Conflicting);
        reg.remove(&PodKey::new("b", "eth0")).unwrap();
        assert!(matches!(&*shared.pod(), PodAttribution::Pod(p) if p.name == "web"));
        // A changed record on the same slot is seen at once.
        let renamed = pod_of("a", "ns", "web", Some("u3"));
        reg.insert(
            BoundPod {
                record: renamed,
                listener_port: 2579,
            },
            NS_A,
            None,
            Arc::default(),
        );
        assert!(matches!(&*shared.pod(), PodAttribution::Pod(p) if p.uid == "u3"));
    }
}
