//! Garbage collection by ownerReferences, done synchronously when an owner is removed.

use serde_json::{Value, json};

use super::resources::{RESOURCES, ResourceDef};
use super::store::{
    EventType, ObjectKey, Record, State, finalizers, meta, meta_mut, meta_str, now_rfc3339,
    owner_uids,
};

impl State {
    /// Garbage collection for a removed owner, synchronously and recursively: a dependent with
    /// another live owner only loses the reference; the others are deleted in the background way.
    pub(super) fn collect_dependents(&mut self, owner_uid: &str) {
        let Some(dependents) = self.dependents.get(owner_uid).cloned() else {
            return;
        };
        for (table, key) in dependents {
            let res = &RESOURCES[table];
            let Some(record) = self.tables[table].get(&key).cloned() else {
                continue;
            };
            let owners = owner_uids(&record.object);
            let other_live_owner = owners
                .iter()
                .any(|u| u != owner_uid && self.uids.contains_key(u));
            if other_live_owner {
                self.drop_owner_reference(res, &key, &record, owner_uid);
                continue;
            }
            let uid = meta_str(&record.object, "uid")
                .unwrap_or_default()
                .to_string();
            if finalizers(&record.object).is_empty() {
                self.remove(res, &key);
                self.collect_dependents(&uid);
            } else if !meta(&record.object).is_some_and(|m| m.contains_key("deletionTimestamp")) {
                let mut marked = (*record.object).clone();
                let m = meta_mut(&mut marked);
                m.insert("deletionTimestamp".into(), json!(now_rfc3339()));
                m.insert("deletionGracePeriodSeconds".into(), json!(0));
                self.commit(
                    res,
                    key,
                    Some(&record),
                    marked,
                    record.managers.clone(),
                    EventType::Modified,
                );
            }
        }
    }

    /// Orphan propagation: dependents lose their reference to the owner and stay.
    pub(super) fn orphan_dependents(&mut self, owner_uid: &str) {
        let Some(dependents) = self.dependents.get(owner_uid).cloned() else {
            return;
        };
        for (table, key) in dependents {
            if let Some(record) = self.tables[table].get(&key).cloned() {
                self.drop_owner_reference(&RESOURCES[table], &key, &record, owner_uid);
            }
        }
    }

    fn drop_owner_reference(
        &mut self,
        res: &'static ResourceDef,
        key: &ObjectKey,
        record: &Record,
        owner_uid: &str,
    ) {
        let mut updated = (*record.object).clone();
        let m = meta_mut(&mut updated);
        if let Some(refs) = m.get_mut("ownerReferences").and_then(Value::as_array_mut) {
            refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(owner_uid));
            if refs.is_empty() {
                m.remove("ownerReferences");
            }
        }
        self.commit(
            res,
            key.clone(),
            Some(record),
            updated,
            record.managers.clone(),
            EventType::Modified,
        );
    }
}
