//! Patch bodies (RFC 7386 merge, RFC 6902 JSON patch) and the field paths that server-side
//! apply tracks per manager.

use std::collections::{BTreeMap, BTreeSet};

use json_patch::PatchOperation;
use serde_json::{Map, Value};

use super::status::ApiError;

/// RFC 7386: objects merge recursively, `null` deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// RFC 6902, with one kube-apiserver leniency: a `test` of `null` against a missing member
/// of an existing parent passes (evanphx/json-patch does this; kube's finalizer helper relies on it).
pub fn json_patch(target: &Value, body: &Value) -> Result<Value, ApiError> {
    let ops: Vec<PatchOperation> = serde_json::from_value(body.clone())
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    let mut doc = target.clone();
    for (i, op) in ops.iter().enumerate() {
        if let PatchOperation::Test(test) = op
            && test.value.is_null()
            && missing_member_of_existing_parent(&doc, test.path.as_str())
        {
            continue;
        }
        json_patch::patch_unsafe(&mut doc, std::slice::from_ref(op)).map_err(|e| {
            ApiError::unprocessable(format!("the server rejected our request due to an error in our request: operation {i} ({}): {}", op_name(op), e.kind))
        })?;
    }
    Ok(doc)
}

fn op_name(op: &PatchOperation) -> &'static str {
    match op {
        PatchOperation::Add(_) => "add",
        PatchOperation::Remove(_) => "remove",
        PatchOperation::Replace(_) => "replace",
        PatchOperation::Move(_) => "move",
        PatchOperation::Copy(_) => "copy",
        PatchOperation::Test(_) => "test",
    }
}

fn missing_member_of_existing_parent(doc: &Value, pointer: &str) -> bool {
    if doc.pointer(pointer).is_some() {
        return false;
    }
    match pointer.rfind('/') {
        Some(i) => doc
            .pointer(&pointer[..i])
            .is_some_and(|p| p.is_object() || p.is_array()),
        None => false,
    }
}

/// A field's path from the object root: object member names; lists are atomic leaves.
pub type FieldPath = Vec<String>;

/// Fields the server owns or that identify the object; never tracked, never removed by apply.
fn is_tracked(path: &[String]) -> bool {
    match path {
        [] => false,
        [top, ..] if top == "apiVersion" || top == "kind" => false,
        [meta, field, ..] if meta == "metadata" => !matches!(
            field.as_str(),
            "name"
                | "namespace"
                | "resourceVersion"
                | "managedFields"
                | "uid"
                | "creationTimestamp"
                | "generation"
                | "deletionTimestamp"
                | "deletionGracePeriodSeconds"
                | "selfLink"
                | "generateName"
        ),
        _ => true,
    }
}

/// Every tracked leaf: scalars, lists, and empty objects; `null`s are not fields.
pub fn leaf_paths(value: &Value) -> BTreeMap<FieldPath, &Value> {
    fn walk<'a>(v: &'a Value, path: &mut FieldPath, out: &mut BTreeMap<FieldPath, &'a Value>) {
        match v {
            Value::Object(map) if !map.is_empty() => {
                for (k, child) in map {
                    path.push(k.clone());
                    walk(child, path, out);
                    path.pop();
                }
            }
            Value::Null => {}
            leaf => {
                if is_tracked(path) {
                    out.insert(path.clone(), leaf);
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(value, &mut Vec::new(), &mut out);
    out
}

/// Tracked leaves whose value differs between two versions of an object (added, changed, removed).
pub fn changed_paths(old: &Value, new: &Value) -> BTreeSet<FieldPath> {
    let (a, b) = (leaf_paths(old), leaf_paths(new));
    let mut changed: BTreeSet<FieldPath> = a
        .iter()
        .filter(|(p, v)| b.get(*p) != Some(v))
        .map(|(p, _)| p.clone())
        .collect();
    changed.extend(
        b.iter()
            .filter(|(p, v)| a.get(*p) != Some(v))
            .map(|(p, _)| p.clone()),
    );
    changed
}

/// Removes the field at `path`, then parents left empty that `keep` does not claim.
pub fn remove_path(object: &mut Value, path: &[String], keep: &dyn Fn(&[String]) -> bool) {
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    let Some(parent) = get_mut(object, parent_path) else {
        return;
    };
    let Some(map) = parent.as_object_mut() else {
        return;
    };
    map.remove(last);
    let emptied = map.is_empty();
    if emptied && !parent_path.is_empty() && !keep(parent_path) {
        remove_path(object, parent_path, keep);
    }
}

fn get_mut<'a>(object: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter()
        .try_fold(object, |v, k| v.as_object_mut()?.get_mut(k))
}

/// The applied configuration merged onto the live object: maps merge, everything else
/// (lists included) replaces, `null` removes.
pub fn apply_merge(target: &mut Value, applied: &Value) {
    merge_patch(target, applied);
}

/// `managedFields[].fieldsV1` for a set of leaf paths: `{"f:spec": {"f:x": {}}}`.
pub fn fields_v1(paths: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for path in paths {
        let mut node = &mut root;
        for (i, segment) in path.iter().enumerate() {
            let entry = node
                .entry(format!("f:{segment}"))
                .or_insert_with(|| Value::Object(Map::new()));
            let map = entry.as_object_mut().expect("fieldsV1 nodes are objects");
            if i + 1 < path.len() && paths.contains(&path[..=i]) {
                // an owned leaf that is also the parent of another owned leaf
                map.insert(".".into(), Value::Object(Map::new()));
            }
            node = map;
        }
    }
    Value::Object(root)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn p(s: &str) -> FieldPath {
        s.split('.').map(String::from).collect()
    }

    #[test]
    fn merge_patch_rfc7386_examples() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(
            &mut doc,
            &json!({"a": "z", "c": {"f": null}, "l": [3], "n": {"x": 1}}),
        );
        assert_eq!(
            doc,
            json!({"a": "z", "c": {"d": "e"}, "l": [3], "n": {"x": 1}})
        );
        let mut scalar = json!("x");
        merge_patch(&mut scalar, &json!({"a": 1}));
        assert_eq!(scalar, json!({"a": 1}));
    }

    #[test]
    fn json_patch_test_null_against_missing_member_passes() {
        let doc = json!({"metadata": {"name": "x"}});
        let patch = json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["f"]}
        ]);
        assert_eq!(
            json_patch(&doc, &patch).ok(),
            Some(json!({"metadata": {"name": "x", "finalizers": ["f"]}}))
        );
    }

    #[test]
    fn json_patch_failures_are_422_and_atomic() {
        let doc = json!({"metadata": {"finalizers": ["a"]}});
        let wrong = json!([{"op": "test", "path": "/metadata/finalizers", "value": null}]);
        assert_eq!(json_patch(&doc, &wrong).map_err(|e| e.code), Err(422));
        let no_parent = json!([{"op": "test", "path": "/spec/x", "value": null}]);
        assert_eq!(json_patch(&doc, &no_parent).map_err(|e| e.code), Err(422));
        let bad = json!([{"op": "frobnicate", "path": "/a"}]);
        assert_eq!(json_patch(&doc, &bad).map_err(|e| e.code), Err(400));
        let ok = json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": "a"},
            {"op": "remove", "path": "/metadata/finalizers/0"},
            {"op": "copy", "from": "/metadata", "path": "/spec"},
            {"op": "replace", "path": "/spec/finalizers", "value": "x"},
            {"op": "move", "from": "/spec/finalizers", "path": "/moved"}
        ]);
        assert_eq!(
            json_patch(&doc, &ok).ok(),
            Some(json!({"metadata": {"finalizers": []}, "spec": {}, "moved": "x"}))
        );
    }

    #[test]
    fn leaf_paths_skip_identity_and_server_fields() {
        let obj = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "n", "resourceVersion": "3", "labels": {"a": "1"}, "annotations": {}},
            "spec": {"containers": [{"name": "c"}], "x": null}
        });
        let paths: Vec<FieldPath> = leaf_paths(&obj).into_keys().collect();
        assert_eq!(
            paths,
            vec![
                p("metadata.annotations"),
                p("metadata.labels.a"),
                p("spec.containers")
            ]
        );
    }

    #[test]
    fn changed_paths_cover_added_changed_and_removed() {
        let old = json!({"spec": {"a": 1, "b": 2, "c": 3}});
        let new = json!({"spec": {"a": 1, "b": 5, "d": 4}});
        let changed: Vec<FieldPath> = changed_paths(&old, &new).into_iter().collect();
        assert_eq!(changed, vec![p("spec.b"), p("spec.c"), p("spec.d")]);
    }

    #[test]
    fn remove_path_prunes_unclaimed_empty_parents() {
        let mut obj = json!({"spec": {"a": {"b": 1}}, "metadata": {"labels": {"x": "1"}}});
        remove_path(&mut obj, &p("spec.a.b"), &|_| false);
        assert_eq!(obj, json!({"metadata": {"labels": {"x": "1"}}}));
        remove_path(&mut obj, &p("metadata.labels.x"), &|q| {
            q == p("metadata.labels").as_slice()
        });
        assert_eq!(obj, json!({"metadata": {"labels": {}}}));
    }

    #[test]
    fn fields_v1_shape() {
        let set: BTreeSet<FieldPath> = [
            p("spec.x"),
            p("spec.y.z"),
            p("metadata.labels"),
            p("metadata.labels.a"),
        ]
        .into();
        assert_eq!(
            fields_v1(&set),
            json!({"f:metadata": {"f:labels": {".": {}, "f:a": {}}}, "f:spec": {"f:x": {}, "f:y": {"f:z": {}}}})
        );
    }
}
