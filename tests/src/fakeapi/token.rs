//! `POST .../serviceaccounts/<name>/token`: a TokenRequest answered with a JWT-shaped token
//! whose claims are those of a real projected service account token. It is not signed.

use base64::Engine as _;
use serde_json::{Value, json};

use super::resources::{ResourceDef, find};
use super::status::ApiError;
use super::store::Store;

/// The issuer and default audience, as a kind or kubeadm cluster names itself.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;
const MIN_EXPIRATION_SECONDS: i64 = 600;
const MAX_EXPIRATION_SECONDS: i64 = 1 << 32;

fn core(plural: &str) -> &'static ResourceDef {
    find("", "v1", plural).expect("core types are registered")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Validates the request, checks the bound object, and returns the TokenRequest with its status.
pub fn token_request(
    store: &Store,
    ns: &str,
    sa_name: &str,
    body: &Value,
) -> Result<Value, ApiError> {
    let tr = find_token_request();
    let sa = store.get(core("serviceaccounts"), ns, sa_name)?;
    let spec = body.get("spec").cloned().unwrap_or_else(|| json!({}));
    let expiration = spec
        .get("expirationSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(DEFAULT_EXPIRATION_SECONDS);
    if expiration < MIN_EXPIRATION_SECONDS {
        return Err(ApiError::invalid(
            tr,
            "",
            "spec.expirationSeconds",
            format!("Invalid value: {expiration}: may not specify a duration less than 10 minutes"),
        ));
    }
    if expiration > MAX_EXPIRATION_SECONDS {
        return Err(ApiError::invalid(
            tr,
            "",
            "spec.expirationSeconds",
            format!(
                "Invalid value: {expiration}: may not specify a duration larger than 2^32 seconds"
            ),
        ));
    }
    let audiences: Vec<String> = spec
        .get("audiences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .filter(|a: &Vec<String>| !a.is_empty())
        .unwrap_or_else(|| vec![ISSUER.to_string()]);

    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let exp = now + expiration;
    let mut k8s = json!({
        "namespace": ns,
        "serviceaccount": {"name": sa_name, "uid": str_at(&sa, "/metadata/uid")},
    });
    if let Some(bound) = spec.get("boundObjectRef").filter(|b| !b.is_null()) {
        let kind = str_at(bound, "/kind");
        let name = str_at(bound, "/name");
        let uid = str_at(bound, "/uid");
        let res = match kind {
            "Pod" => core("pods"),
            "Secret" => core("secrets"),
            "Node" => core("nodes"),
            other => {
                return Err(ApiError::bad_request(format!(
                    "cannot bind token to object of type {other}"
                )));
            }
        };
        let object = store.get(res, if res.namespaced { ns } else { "" }, name)?;
        let actual_uid = str_at(&object, "/metadata/uid");
        if !uid.is_empty() && uid != actual_uid {
            return Err(ApiError::conflict(
                res,
                name,
                format!(
                    "the UID in the bound object reference ({uid}) does not match the UID in record. The object might have been deleted and then recreated"
                ),
            ));
        }
        if kind == "Pod" {
            let pod_sa = object
                .pointer("/spec/serviceAccountName")
                .and_then(Value::as_str)
                .unwrap_or("default");
            if pod_sa != sa_name {
                return Err(ApiError::bad_request(format!(
                    "cannot bind token for serviceaccount \"{sa_name}\" to pod running with different serviceaccount name."
                )));
            }
            k8s["pod"] = json!({"name": name, "uid": actual_uid});
            let node_name = str_at(&object, "/spec/nodeName");
            if !node_name.is_empty()
                && let Ok(node) = store.get(core("nodes"), "", node_name)
            {
                k8s["node"] = json!({"name": node_name, "uid": str_at(&node, "/metadata/uid")});
            }
        } else {
            k8s[kind.to_lowercase()] = json!({"name": name, "uid": actual_uid});
        }
    }
    let claims = json!({
        "aud": audiences,
        "exp": exp,
        "iat": now,
        "iss": ISSUER,
        "jti": format!("{:x}-{}", now, store.resource_version()),
        "kubernetes.io": k8s,
        "nbf": now,
        "sub": format!("system:serviceaccount:{ns}:{sa_name}"),
    });
    let header = json!({"alg": "RS256", "kid": "fake-apiserver", "typ": "JWT"});
    let token = format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(b"unsigned: issued by the podid fake API server")
    );
    let expiration_timestamp = k8s_openapi::jiff::Timestamp::from_second(exp)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .map_err(|e| ApiError::bad_request(format!("expiration out of range: {e}")))?;
    let mut response_spec = spec;
    response_spec["audiences"] = json!(audiences);
    response_spec["expirationSeconds"] = json!(expiration);
    Ok(json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": sa_name, "namespace": ns, "creationTimestamp": null},
        "spec": response_spec,
        "status": {"token": token, "expirationTimestamp": expiration_timestamp},
    }))
}

/// A pseudo type for TokenRequest validation messages.
fn find_token_request() -> &'static ResourceDef {
    static TOKEN_REQUEST: ResourceDef = ResourceDef {
        group: "authentication.k8s.io",
        version: "v1",
        kind: "TokenRequest",
        plural: "tokenrequests",
        singular: "tokenrequest",
        namespaced: true,
        short_names: &[],
        status_subresource: false,
        status_on_create: super::resources::StatusOnCreate::Keep,
        extra_subresources: &[],
        field_labels: &[],
        custom: false,
    };
    &TOKEN_REQUEST
}

/// The claims of a token this server issued (tests and tools read them back).
pub fn decode_claims(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}
