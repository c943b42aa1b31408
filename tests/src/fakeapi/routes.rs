//! URL paths of the Kubernetes API, parsed into what they address.

use super::resources::{ResourceDef, find};
use super::status::ApiError;

/// What a request path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Version,
    /// `/api`
    CoreVersions,
    /// `/apis`
    Groups,
    /// `/apis/<group>`
    Group(String),
    /// `/api/v1`, `/apis/<group>/<version>`
    ResourceList {
        group: String,
        version: String,
    },
    /// `/healthz`, `/readyz`, `/livez`
    Health,
    /// `/fake/stats`: request counters, not part of the Kubernetes API.
    Stats,
    Resource(ResourcePath),
}

/// A path into a resource type: its collection, one object, or one object's subresource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourcePath {
    pub res: &'static ResourceDef,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

/// Parses a request path (without the query).
pub fn parse(path: &str) -> Result<Route, ApiError> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let route = match segments.as_slice() {
        ["version"] => Route::Version,
        ["api"] => Route::CoreVersions,
        ["apis"] => Route::Groups,
        ["healthz" | "readyz" | "livez"] => Route::Health,
        ["fake", "stats"] => Route::Stats,
        ["apis", group] => Route::Group((*group).to_string()),
        ["api", version] => Route::ResourceList {
            group: String::new(),
            version: (*version).to_string(),
        },
        ["apis", group, version] => Route::ResourceList {
            group: (*group).to_string(),
            version: (*version).to_string(),
        },
        ["api", version, rest @ ..] => Route::Resource(resource_path("", version, rest)?),
        ["apis", group, version, rest @ ..] => {
            Route::Resource(resource_path(group, version, rest)?)
        }
        _ => return Err(ApiError::no_route()),
    };
    Ok(route)
}

fn resource_path(group: &str, version: &str, rest: &[&str]) -> Result<ResourcePath, ApiError> {
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(*name), None),
        [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
        _ => return Err(ApiError::no_route()),
    };
    let res = find(group, version, plural).ok_or_else(ApiError::no_route)?;
    if namespace.is_some() != res.namespaced && (name.is_some() || namespace.is_some()) {
        // a cluster-scoped type under a namespace, or one namespaced object without one
        return Err(ApiError::no_route());
    }
    if let Some(sub) = subresource
        && !(sub == "status" && res.status_subresource)
        && res.subresource(sub).is_none()
    {
        return Err(ApiError::no_route());
    }
    if namespace.as_deref() == Some("") || name == Some("") {
        return Err(ApiError::no_route());
    }
    Ok(ResourcePath {
        res,
        namespace,
        name: name.map(String::from),
        subresource: subresource.map(String::from),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(path: &str) -> ResourcePath {
        match parse(path) {
            Ok(Route::Resource(r)) => r,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn discovery_paths() {
        assert_eq!(parse("/api").ok(), Some(Route::CoreVersions));
        assert_eq!(parse("/apis/").ok(), Some(Route::Groups));
        assert_eq!(
            parse("/apis/coordination.k8s.io").ok(),
            Some(Route::Group("coordination.k8s.io".into()))
        );
        assert_eq!(
            parse("/apis/coordination.k8s.io/v1").ok(),
            Some(Route::ResourceList {
                group: "coordination.k8s.io".into(),
                version: "v1".into()
            })
        );
        assert_eq!(parse("/version").ok(), Some(Route::Version));
        assert_eq!(parse("/fake/stats").ok(), Some(Route::Stats));
    }

    #[test]
    fn resource_paths() {
        let all = resource("/api/v1/pods");
        assert_eq!((all.res.kind, all.namespace, all.name), ("Pod", None, None));
        let one = resource("/api/v1/namespaces/ns/pods/p/status");
        assert_eq!(
            (
                one.namespace.as_deref(),
                one.name.as_deref(),
                one.subresource.as_deref()
            ),
            (Some("ns"), Some("p"), Some("status"))
        );
        let node = resource("/api/v1/nodes/n1");
        assert_eq!((node.res.kind, node.name.as_deref()), ("Node", Some("n1")));
        let crd =
            resource("/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureassignedidentities");
        assert_eq!(crd.res.kind, "AzureAssignedIdentity");
        let token = resource("/api/v1/namespaces/ns/serviceaccounts/sa/token");
        assert_eq!(token.subresource.as_deref(), Some("token"));
        assert_eq!(
            resource("/apis/events.k8s.io/v1/namespaces/a/events")
                .res
                .group,
            "events.k8s.io"
        );
    }

    #[test]
    fn unknown_or_misplaced_paths_are_404() {
        for path in [
            "/api/v1/namespaces/ns/nodes/n1",
            "/api/v1/pods/p",
            "/api/v1/namespaces/ns",
            "/api/v1/namespaces/ns/pods/p/log",
            "/api/v1/namespaces/ns/secrets/s/status",
            "/apis/apps/v1/deployments",
            "/api/v2/pods",
            "/nope",
        ] {
            assert_eq!(parse(path).map_err(|e| e.code), Err(404), "{path}");
        }
    }
}
