//! The declarative registry of served resource types: one `ResourceDef` per type says where
//! it lives in the URL space and how it behaves; add a type by adding an entry.

/// What a create does with `.status` on a type that has a status subresource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusOnCreate {
    /// Kept as sent (Nodes: the kubelet registers with its status).
    Keep,
    /// Dropped, as for custom resources with a status subresource.
    Drop,
    /// Replaced by this JSON (Pods start `Pending`).
    Set(&'static str),
}

/// A field label usable in a field selector, beyond `metadata.name` and `metadata.namespace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldLabel {
    pub label: &'static str,
    /// JSON pointer into the object.
    pub pointer: &'static str,
    /// The value compared when the field is absent (Go's zero value as the server prints it).
    pub default: &'static str,
}

const fn field(label: &'static str, pointer: &'static str) -> FieldLabel {
    FieldLabel {
        label,
        pointer,
        default: "",
    }
}

/// One served resource type.
#[derive(Debug, PartialEq, Eq)]
pub struct ResourceDef {
    /// "" for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Has a `/status` subresource: main writes ignore `.status`, status writes change only it.
    pub status_subresource: bool,
    pub status_on_create: StatusOnCreate,
    /// Subresources other than status, answered by a dedicated handler.
    pub extra_subresources: &'static [Subresource],
    pub field_labels: &'static [FieldLabel],
    /// A custom resource: no strategic merge patch, as for any CRD.
    pub custom: bool,
}

/// A non-status subresource: `POST .../serviceaccounts/<name>/token`.
#[derive(Debug, PartialEq, Eq)]
pub struct Subresource {
    pub name: &'static str,
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
}

impl ResourceDef {
    /// `v1` or `group/version`, as objects spell `apiVersion`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// `pods` or `leases.coordination.k8s.io`, as error messages name the resource.
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// `/v1, Resource=pods`, as the field selector error names the resource.
    pub fn gvr(&self) -> String {
        format!("{}/{}, Resource={}", self.group, self.version, self.plural)
    }

    pub fn field_label(&self, label: &str) -> Option<&FieldLabel> {
        self.field_labels.iter().find(|f| f.label == label)
    }

    pub fn subresource(&self, name: &str) -> Option<&Subresource> {
        self.extra_subresources.iter().find(|s| s.name == name)
    }

    /// This type's index in `RESOURCES`, the key of its table in the store.
    pub fn index(&self) -> usize {
        RESOURCES
            .iter()
            .position(|r| std::ptr::eq(r, self))
            .expect("a registered resource")
    }
}

const POD_FIELDS: &[FieldLabel] = &[
    field("spec.nodeName", "/spec/nodeName"),
    field("spec.restartPolicy", "/spec/restartPolicy"),
    field("spec.schedulerName", "/spec/schedulerName"),
    field("spec.serviceAccountName", "/spec/serviceAccountName"),
    FieldLabel {
        label: "spec.hostNetwork",
        pointer: "/spec/hostNetwork",
        default: "false",
    },
    field("status.phase", "/status/phase"),
    field("status.podIP", "/status/podIP"),
    field("status.nominatedNodeName", "/status/nominatedNodeName"),
];

const NODE_FIELDS: &[FieldLabel] = &[FieldLabel {
    label: "spec.unschedulable",
    pointer: "/spec/unschedulable",
    default: "false",
}];

const SECRET_FIELDS: &[FieldLabel] = &[field("type", "/type")];

const CORE_EVENT_FIELDS: &[FieldLabel] = &[
    field("involvedObject.kind", "/involvedObject/kind"),
    field("involvedObject.namespace", "/involvedObject/namespace"),
    field("involvedObject.name", "/involvedObject/name"),
    field("involvedObject.uid", "/involvedObject/uid"),
    field("involvedObject.apiVersion", "/involvedObject/apiVersion"),
    field("reason", "/reason"),
    field("reportingComponent", "/reportingComponent"),
    field("type", "/type"),
];

const EVENTS_V1_FIELDS: &[FieldLabel] = &[
    field("regarding.kind", "/regarding/kind"),
    field("regarding.namespace", "/regarding/namespace"),
    field("regarding.name", "/regarding/name"),
    field("regarding.uid", "/regarding/uid"),
    field("reason", "/reason"),
    field("reportingController", "/reportingController"),
    field("type", "/type"),
];

const TOKEN: Subresource = Subresource {
    name: "token",
    group: "authentication.k8s.io",
    version: "v1",
    kind: "TokenRequest",
};

const fn crd(
    kind: &'static str,
    plural: &'static str,
    singular: &'static str,
    short: &'static [&'static str],
) -> ResourceDef {
    ResourceDef {
        group: "aadpodidentity.k8s.io",
        version: "v1",
        kind,
        plural,
        singular,
        namespaced: true,
        short_names: short,
        status_subresource: true,
        status_on_create: StatusOnCreate::Drop,
        extra_subresources: &[],
        field_labels: &[],
        custom: true,
    }
}

/// Every served type. Core types first, then by group, as discovery lists them.
pub static RESOURCES: &[ResourceDef] = &[
    ResourceDef {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        singular: "pod",
        namespaced: true,
        short_names: &["po"],
        status_subresource: true,
        status_on_create: StatusOnCreate::Set(r#"{"phase":"Pending"}"#),
        extra_subresources: &[],
        field_labels: POD_FIELDS,
        custom: false,
    },
    ResourceDef {
        group: "",
        version: "v1",
        kind: "Node",
        plural: "nodes",
        singular: "node",
        namespaced: false,
        short_names: &["no"],
        status_subresource: true,
        status_on_create: StatusOnCreate::Keep,
        extra_subresources: &[],
        field_labels: NODE_FIELDS,
        custom: false,
    },
    ResourceDef {
        group: "",
        version: "v1",
        kind: "Secret",
        plural: "secrets",
        singular: "secret",
        namespaced: true,
        short_names: &[],
        status_subresource: false,
        status_on_create: StatusOnCreate::Keep,
        extra_subresources: &[],
        field_labels: SECRET_FIELDS,
        custom: false,
    },
    ResourceDef {
        group: "",
        version: "v1",
        kind: "ServiceAccount",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        namespaced: true,
        short_names: &["sa"],
        status_subresource: false,
        status_on_create: StatusOnCreate::Keep,
        extra_subresources: &[TOKEN],
        field_labels: &[],
        custom: false,
    },
    ResourceDef {
        group: "",
        version: "v1",
        kind: "Event",
        plural: "events",
        singular: "event",
        namespaced: true,
        short_names: &["ev"],
        status_subresource: false,
        status_on_create: StatusOnCreate::Keep,
        extra_subresources: &[],
        field_labels: CORE_EVENT_FIELDS,
        custom: false,
    },
    ResourceDef {
        group: "coordination.k8s.io",
        version: "v1",
        kind: "Lease",
        plural: "leases",
        singular: "lease",
        namespaced: true,
        short_names: &[],
        status_subresource: false,
        status_on_create: StatusOnCreate::Keep,
        extra_subresources: &[],
        field_labels: &[],
        custom: false,
    },
    ResourceDef {
        group: "events.k8s.io",
        version: "v1",
        kind: "Event",
        plural: "events",
        singular: "event",
        namespaced: true,
        short_names: &["ev"],
        status_subresource: false,
        status_on_create: StatusOnCreate::Keep,
        extra_subresources: &[],
        field_labels: EVENTS_V1_FIELDS,
        custom: false,
    },
    crd("AzureIdentity", "azureidentities", "azureidentity", &[]),
    crd(
        "AzureIdentityBinding",
        "azureidentitybindings",
        "azureidentitybinding",
        &[],
    ),
    crd(
        "AzureAssignedIdentity",
        "azureassignedidentities",
        "azureassignedidentity",
        &[],
    ),
    crd(
        "AzurePodIdentityException",
        "azurepodidentityexceptions",
        "azurepodidentityexception",
        &[],
    ),
];

/// The type served at `group/version/plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceDef> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The type of this `apiVersion` and `kind`.
pub fn find_kind(api_version: &str, kind: &str) -> Option<&'static ResourceDef> {
    RESOURCES
        .iter()
        .find(|r| r.kind == kind && r.api_version() == api_version)
}

/// Served groups other than core, in registry order, each once.
pub fn groups() -> Vec<&'static str> {
    let mut groups: Vec<&'static str> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        if !groups.contains(&r.group) {
            groups.push(r.group);
        }
    }
    groups
}

/// Versions served for a group ("" = core), each once.
pub fn versions(group: &str) -> Vec<&'static str> {
    let mut versions: Vec<&'static str> = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.group == group) {
        if !versions.contains(&r.version) {
            versions.push(r.version);
        }
    }
    versions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_is_unique_and_indexed() {
        for (i, r) in RESOURCES.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert_eq!(
                find(r.group, r.version, r.plural).map(ResourceDef::index),
                Some(i)
            );
        }
        assert_eq!(
            find_kind("coordination.k8s.io/v1", "Lease").map(|r| r.plural),
            Some("leases")
        );
        assert_eq!(RESOURCES[0].gvr(), "/v1, Resource=pods");
        assert_eq!(
            find("", "v1", "serviceaccounts")
                .and_then(|r| r.subresource("token"))
                .map(|s| s.kind),
            Some("TokenRequest")
        );
    }

    #[test]
    fn groups_and_versions() {
        assert_eq!(
            groups(),
            [
                "coordination.k8s.io",
                "events.k8s.io",
                "aadpodidentity.k8s.io"
            ]
        );
        assert_eq!(versions(""), ["v1"]);
    }
}
