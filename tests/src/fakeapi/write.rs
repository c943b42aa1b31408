//! The write verbs (create, replace, patch in every format, delete) and their rules: type and
//! identity checks, preconditions, status isolation, finalizers, generation, no-op detection,
//! and the field ownership that server-side apply and updates leave behind.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::{Value, json};

use super::patch::{self, FieldPath};
use super::resources::{ResourceDef, StatusOnCreate};
use super::selectors::Selectors;
use super::status::ApiError;
use super::store::{
    DeleteOptions, Deletion, EventType, Manager, ObjectKey, Part, PatchKind, Propagation, Record,
    State, Store, Writer, finalizers, meta, meta_mut, meta_str, now_rfc3339,
};

/// Whether anything `generation` counts changed: everything but metadata (and status, when the
/// type has a status subresource).
fn generation_changed(old: &Value, new: &Value, res: &ResourceDef) -> bool {
    let counted = |k: &str| match k {
        "metadata" | "apiVersion" | "kind" => false,
        "status" => !res.status_subresource,
        _ => true,
    };
    let (Some(old), Some(new)) = (old.as_object(), new.as_object()) else {
        return old != new;
    };
    old.keys()
        .chain(new.keys())
        .filter(|k| counted(k))
        .any(|k| old.get(k) != new.get(k))
}

/// A lowercase RFC 1123 subdomain, as object names must be.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

impl Store {
    /// POST: a new object.
    pub fn create(
        &self,
        res: &'static ResourceDef,
        ns: Option<&str>,
        body: Value,
        writer: Writer<'_>,
    ) -> Result<Arc<Value>, ApiError> {
        let mut state = self.lock();
        self.create_locked(&mut state, res, ns, body, writer, None)
    }

    /// Creates under the lock; `applied` carries an apply manager's field set instead of the
    /// Update ownership a POST gets.
    fn create_locked(
        &self,
        state: &mut State,
        res: &'static ResourceDef,
        ns: Option<&str>,
        mut body: Value,
        writer: Writer<'_>,
        applied: Option<BTreeSet<FieldPath>>,
    ) -> Result<Arc<Value>, ApiError> {
        check_type(res, &mut body)?;
        let ns = scope_namespace(res, ns, &body)?;
        let mut name = meta_str(&body, "name").unwrap_or_default().to_string();
        let generate = meta_str(&body, "generateName").map(String::from);
        if name.is_empty() {
            match &generate {
                Some(prefix) => {
                    let table = &state.tables[res.index()];
                    name = (0..8)
                        .map(|_| format!("{prefix}{}", self.name_suffix()))
                        .find(|n| !table.contains_key(&(ns.clone(), n.clone())))
                        .ok_or_else(|| ApiError::already_exists(res, prefix))?;
                }
                None => {
                    return Err(ApiError::invalid(
                        res,
                        "",
                        "metadata.name",
                        "Required value: name or generateName is required",
                    ));
                }
            }
        }
        if !valid_name(&name) {
            return Err(ApiError::invalid(
                res,
                &name,
                "metadata.name",
                format!(
                    "Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
                ),
            ));
        }
        let key = (ns.clone(), name.clone());
        if state.tables[res.index()].contains_key(&key) {
            return Err(ApiError::already_exists(res, &name));
        }
        let now = now_rfc3339();
        let m = meta_mut(&mut body);
        m.insert("name".into(), json!(name));
        if res.namespaced {
            m.insert("namespace".into(), json!(ns));
        } else {
            m.remove("namespace");
        }
        for server_owned in [
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "selfLink",
        ] {
            m.remove(server_owned);
        }
        m.insert("uid".into(), json!(self.new_uid()));
        m.insert("creationTimestamp".into(), json!(now));
        m.insert("generation".into(), json!(1));
        m.remove("resourceVersion");
        if res.status_subresource {
            match res.status_on_create {
                StatusOnCreate::Keep => {}
                StatusOnCreate::Drop => {
                    body.as_object_mut()
                        .expect("checked object")
                        .remove("status");
                }
                StatusOnCreate::Set(initial) => {
                    body["status"] =
                        serde_json::from_str(initial).expect("registry status JSON is valid");
                }
            }
        }
        let (apply, fields) = match applied {
            Some(fields) => (true, fields),
            None => (false, patch::leaf_paths(&body).into_keys().collect()),
        };
        let managers = vec![Manager {
            name: writer.manager.to_string(),
            apply,
            subresource: "",
            api_version: res.api_version(),
            time: now,
            fields,
        }];
        if writer.dry_run {
            render_managed_fields(&mut body, &managers);
            return Ok(Arc::new(body));
        }
        let object = state.commit(res, key, None, body, managers, EventType::Added);
        Ok(object)
    }

    /// PUT: replaces the object (or its status).
    pub fn replace(
        &self,
        res: &'static ResourceDef,
        ns: &str,
        name: &str,
        body: Value,
        part: Part,
        writer: Writer<'_>,
    ) -> Result<Arc<Value>, ApiError> {
        let mut body = body;
        check_type(res, &mut body)?;
        check_identity(res, ns, name, &body)?;
        let mut state = self.lock();
        let key = (ns.to_string(), name.to_string());
        let record = state.tables[res.index()]
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, name))?;
        check_precondition(res, name, &record.object, &body)?;
        let candidate = isolate(res, part, &record.object, body)?;
        Ok(state.update(res, key, &record, candidate, writer, part, None))
    }

    /// PATCH in any of the four formats; an apply to a missing object creates it.
    #[allow(clippy::too_many_arguments)] // the target, the patch and the request options
    pub fn patch(
        &self,
        res: &'static ResourceDef,
        ns: &str,
        name: &str,
        kind: PatchKind,
        body: Value,
        part: Part,
        writer: Writer<'_>,
    ) -> Result<Arc<Value>, ApiError> {
        let mut state = self.lock();
        let key = (ns.to_string(), name.to_string());
        let existing = state.tables[res.index()].get(&key).cloned();
        match kind {
            PatchKind::Apply { force: _ } => {
                let mut applied = body;
                check_type(res, &mut applied)?;
                check_identity(res, ns, name, &applied)?;
                let applied = applied_part(res, part, applied);
                let fields: BTreeSet<FieldPath> = patch::leaf_paths(&applied).into_keys().collect();
                let Some(record) = existing else {
                    if part == Part::Status {
                        return Err(ApiError::not_found(res, name));
                    }
                    let mut body = applied;
                    meta_mut(&mut body).insert("name".into(), json!(name));
                    let ns = res.namespaced.then_some(ns);
                    return self.create_locked(&mut state, res, ns, body, writer, Some(fields));
                };
                check_precondition(res, name, &record.object, &applied)?;
                let mut merged = (*record.object).clone();
                let mut applied = applied;
                meta_mut(&mut applied).remove("resourceVersion");
                patch::apply_merge(&mut merged, &applied);
                // fields this manager applied before and dropped now go, unless someone else owns them
                let previous = record
                    .managers
                    .iter()
                    .find(|m| {
                        m.apply && m.name == writer.manager && m.subresource == part.subresource()
                    })
                    .map(|m| m.fields.clone())
                    .unwrap_or_default();
                let others: Vec<&FieldPath> = record
                    .managers
                    .iter()
                    .filter(|m| {
                        !(m.apply
                            && m.name == writer.manager
                            && m.subresource == part.subresource())
                    })
                    .flat_map(|m| m.fields.iter())
                    .collect();
                // a field stays while anyone owns it or something inside it
                let claimed = |p: &[String]| {
                    others.iter().any(|o| o.starts_with(p))
                        || fields.iter().any(|f| f.starts_with(p))
                };
                for dropped in previous.difference(&fields) {
                    if !claimed(dropped) {
                        patch::remove_path(&mut merged, dropped, &claimed);
                    }
                }
                let candidate = isolate(res, part, &record.object, merged)?;
                Ok(state.update(res, key, &record, candidate, writer, part, Some(fields)))
            }
            _ => {
                let record = existing.ok_or_else(|| ApiError::not_found(res, name))?;
                let patched = match kind {
                    PatchKind::Json => patch::json_patch(&record.object, &body)?,
                    _ => {
                        if !body.is_object() {
                            return Err(ApiError::bad_request(
                                "a merge patch must be a JSON object",
                            ));
                        }
                        let mut target = (*record.object).clone();
                        patch::merge_patch(&mut target, &body);
                        target
                    }
                };
                if !patched.is_object() {
                    return Err(ApiError::bad_request(
                        "the patched object is not a JSON object",
                    ));
                }
                let mut patched = patched;
                check_type(res, &mut patched)?;
                check_identity(res, ns, name, &patched)?;
                check_precondition(res, name, &record.object, &patched)?;
                let candidate = isolate(res, part, &record.object, patched)?;
                Ok(state.update(res, key, &record, candidate, writer, part, None))
            }
        }
    }

    /// DELETE: honours preconditions, finalizers and the propagation policy.
    pub fn delete(
        &self,
        res: &'static ResourceDef,
        ns: &str,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Deletion, ApiError> {
        let mut state = self.lock();
        let key = (ns.to_string(), name.to_string());
        let record = state.tables[res.index()]
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, name))?;
        let obj = &record.object;
        if let Some(uid) = &opts.uid
            && meta_str(obj, "uid") != Some(uid)
        {
            let why = format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                meta_str(obj, "uid").unwrap_or("")
            );
            return Err(ApiError::conflict(res, name, why));
        }
        if let Some(rv) = &opts.resource_version
            && meta_str(obj, "resourceVersion") != Some(rv)
        {
            let why = format!(
                "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                meta_str(obj, "resourceVersion").unwrap_or("")
            );
            return Err(ApiError::conflict(res, name, why));
        }
        if opts.dry_run {
            return Ok(if finalizers(obj).is_empty() {
                Deletion::Removed(Arc::clone(obj))
            } else {
                Deletion::Kept(Arc::clone(obj))
            });
        }
        let uid = meta_str(obj, "uid").unwrap_or_default().to_string();
        match opts.propagation {
            Propagation::Orphan => state.orphan_dependents(&uid),
            Propagation::Foreground => state.collect_dependents(&uid),
            Propagation::Background => {}
        }
        if finalizers(obj).is_empty() {
            let removed = state.remove(res, &key);
            state.collect_dependents(&uid);
            return Ok(Deletion::Removed(removed));
        }
        if meta(obj).is_some_and(|m| m.contains_key("deletionTimestamp")) {
            return Ok(Deletion::Kept(Arc::clone(obj)));
        }
        let mut marked = (**obj).clone();
        let m = meta_mut(&mut marked);
        m.insert("deletionTimestamp".into(), json!(now_rfc3339()));
        m.insert("deletionGracePeriodSeconds".into(), json!(0));
        if let Some(g) = m
            .get("generation")
            .and_then(Value::as_i64)
            .filter(|g| *g > 0)
        {
            m.insert("generation".into(), json!(g + 1));
        }
        let kept = state.commit(
            res,
            key,
            Some(&record),
            marked,
            record.managers.clone(),
            EventType::Modified,
        );
        Ok(Deletion::Kept(kept))
    }

    /// The objects of `res` a DELETE of the collection removes (each then deleted one by one).
    pub fn names(
        &self,
        res: &'static ResourceDef,
        ns: Option<&str>,
        selectors: &Selectors,
    ) -> Vec<ObjectKey> {
        let state = self.lock();
        state.tables[res.index()]
            .iter()
            .filter(|((k_ns, _), r)| ns.is_none_or(|ns| k_ns == ns) && selectors.matches(&r.object))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// Fills in `apiVersion`/`kind` or rejects a body of another type.
fn check_type(res: &ResourceDef, body: &mut Value) -> Result<(), ApiError> {
    let Some(obj) = body.as_object_mut() else {
        return Err(ApiError::bad_request(
            "the body of the request is not a JSON object",
        ));
    };
    let expected = res.api_version();
    match obj.get("apiVersion").and_then(Value::as_str) {
        None | Some("") => {
            obj.insert("apiVersion".into(), json!(expected));
        }
        Some(v) if v != expected => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({expected})"
            )));
        }
        Some(_) => {}
    }
    match obj.get("kind").and_then(Value::as_str) {
        None | Some("") => {
            obj.insert("kind".into(), json!(res.kind));
        }
        Some(k) if k != res.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                res.kind
            )));
        }
        Some(_) => {}
    }
    Ok(())
}

/// The object's namespace: the path's, which a different one in the body may not contradict.
fn scope_namespace(res: &ResourceDef, ns: Option<&str>, body: &Value) -> Result<String, ApiError> {
    if !res.namespaced {
        return Ok(String::new());
    }
    let path_ns = ns.unwrap_or_default();
    match meta_str(body, "namespace") {
        Some(body_ns) if !body_ns.is_empty() && body_ns != path_ns => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => Ok(path_ns.to_string()),
    }
}

/// A body's name and namespace must be those of the URL when given.
fn check_identity(res: &ResourceDef, ns: &str, name: &str, body: &Value) -> Result<(), ApiError> {
    if let Some(body_name) = meta_str(body, "name").filter(|n| !n.is_empty())
        && body_name != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    scope_namespace(res, Some(ns), body).map(|_| ())
}

/// A metadata.resourceVersion in a write body must be the stored one.
fn check_precondition(
    res: &ResourceDef,
    name: &str,
    stored: &Value,
    body: &Value,
) -> Result<(), ApiError> {
    match meta_str(body, "resourceVersion").filter(|v| !v.is_empty()) {
        Some(v) if Some(v) != meta_str(stored, "resourceVersion") => {
            Err(ApiError::stale(res, name))
        }
        _ => Ok(()),
    }
}

/// What an apply to `part` is allowed to say: the status only, or everything but the status.
fn applied_part(res: &ResourceDef, part: Part, mut applied: Value) -> Value {
    let obj = applied.as_object_mut().expect("checked object");
    match part {
        Part::Status => {
            obj.retain(|k, _| matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status"));
            if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                m.retain(|k, _| matches!(k.as_str(), "name" | "namespace" | "resourceVersion"));
            }
        }
        Part::Main if res.status_subresource => {
            obj.remove("status");
        }
        Part::Main => {}
    }
    applied
}

/// The stored object as this write may change it: server-owned metadata kept; `.status` taken
/// only through the status subresource when the type has one, and nothing else through it.
fn isolate(res: &ResourceDef, part: Part, old: &Value, new: Value) -> Result<Value, ApiError> {
    let mut result = match part {
        Part::Status => {
            let mut result = old.clone();
            let obj = result.as_object_mut().expect("stored objects are objects");
            match new.get("status") {
                Some(status) if !status.is_null() => {
                    obj.insert("status".into(), status.clone());
                }
                _ => {
                    obj.remove("status");
                }
            }
            result
        }
        Part::Main => {
            let mut result = new;
            if res.status_subresource {
                let obj = result.as_object_mut().expect("checked object");
                match old.get("status") {
                    Some(status) => {
                        obj.insert("status".into(), status.clone());
                    }
                    None => {
                        obj.remove("status");
                    }
                }
            }
            result
        }
    };
    let old_meta = meta(old).cloned().unwrap_or_default();
    let m = meta_mut(&mut result);
    for server_owned in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "resourceVersion",
        "managedFields",
        "generateName",
    ] {
        match old_meta.get(server_owned) {
            Some(v) => {
                m.insert(server_owned.into(), v.clone());
            }
            None => {
                m.remove(server_owned);
            }
        }
    }
    if old_meta.contains_key("deletionTimestamp") {
        let before = finalizers(old);
        let added: Vec<String> = finalizers(&result)
            .into_iter()
            .filter(|f| !before.contains(f))
            .map(|f| format!("{f:?}"))
            .collect();
        if !added.is_empty() {
            let name = old_meta
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            return Err(ApiError::invalid(
                res,
                name,
                "metadata.finalizers",
                format!(
                    "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
                    added.join(", ")
                ),
            ));
        }
    }
    Ok(result)
}

pub(super) fn render_managed_fields(obj: &mut Value, managers: &[Manager]) {
    let entries: Vec<Value> = managers
        .iter()
        .map(|m| {
            let mut entry = json!({
                "manager": m.name,
                "operation": if m.apply { "Apply" } else { "Update" },
                "apiVersion": m.api_version,
                "time": m.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": patch::fields_v1(&m.fields),
            });
            if !m.subresource.is_empty() {
                entry["subresource"] = json!(m.subresource);
            }
            entry
        })
        .collect();
    let m = meta_mut(obj);
    if entries.is_empty() {
        m.remove("managedFields");
    } else {
        m.insert("managedFields".into(), Value::Array(entries));
    }
}

impl State {
    /// Ownership after a write: changed fields leave other managers; the writer owns what it
    /// applied (apply) or what it changed (update).
    fn next_managers(
        record: &Record,
        new: &Value,
        writer: Writer<'_>,
        part: Part,
        applied: Option<BTreeSet<FieldPath>>,
        api_version: String,
    ) -> Vec<Manager> {
        let changed = patch::changed_paths(&record.object, new);
        let apply = applied.is_some();
        let is_writer = |m: &Manager| {
            m.name == writer.manager && m.apply == apply && m.subresource == part.subresource()
        };
        let mut managers: Vec<Manager> = record
            .managers
            .iter()
            .map(|m| {
                let mut m = m.clone();
                if !is_writer(&m) {
                    m.fields.retain(|f| !changed.contains(f));
                }
                m
            })
            .collect();
        let present = patch::leaf_paths(new);
        let mine = match applied {
            Some(fields) => fields,
            None => {
                let mut owned = managers
                    .iter()
                    .find(|m| is_writer(m))
                    .map(|m| m.fields.clone())
                    .unwrap_or_default();
                owned.extend(changed.iter().filter(|p| present.contains_key(*p)).cloned());
                owned.retain(|p| present.contains_key(p));
                owned
            }
        };
        match managers.iter_mut().find(|m| is_writer(m)) {
            Some(m) => {
                if m.fields != mine {
                    m.time = now_rfc3339();
                }
                m.fields = mine;
                m.api_version = api_version;
            }
            None => managers.push(Manager {
                name: writer.manager.to_string(),
                apply,
                subresource: part.subresource(),
                api_version,
                time: now_rfc3339(),
                fields: mine,
            }),
        }
        managers.retain(|m| !m.fields.is_empty());
        managers
    }

    /// Commits an update of an existing object: generation, no-op detection, finalizer completion.
    #[allow(clippy::too_many_arguments)] // the change and who made it
    fn update(
        &mut self,
        res: &'static ResourceDef,
        key: ObjectKey,
        record: &Record,
        mut candidate: Value,
        writer: Writer<'_>,
        part: Part,
        applied: Option<BTreeSet<FieldPath>>,
    ) -> Arc<Value> {
        let managers =
            Self::next_managers(record, &candidate, writer, part, applied, res.api_version());
        if candidate == *record.object && managers == record.managers {
            return Arc::clone(&record.object);
        }
        if generation_changed(&record.object, &candidate, res) {
            let m = meta_mut(&mut candidate);
            let generation = m.get("generation").and_then(Value::as_i64).unwrap_or(0);
            m.insert("generation".into(), json!(generation + 1));
        }
        if writer.dry_run {
            render_managed_fields(&mut candidate, &managers);
            return Arc::new(candidate);
        }
        let finishing = meta(&candidate).is_some_and(|m| m.contains_key("deletionTimestamp"))
            && finalizers(&candidate).is_empty();
        if finishing {
            let uid = meta_str(&candidate, "uid").unwrap_or_default().to_string();
            let removed = self.commit(
                res,
                key,
                Some(record),
                candidate,
                managers,
                EventType::Deleted,
            );
            self.collect_dependents(&uid);
            return removed;
        }
        self.commit(
            res,
            key,
            Some(record),
            candidate,
            managers,
            EventType::Modified,
        )
    }
}
