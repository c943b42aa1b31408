//! `conf/`, what an operator applies: every kustomization renders with `kubectl kustomize`,
//! every object parses strictly into its type, the RBAC grants exactly what docs/deploy.md
//! says, the workloads match the flags of the binaries, and the image built offline by
//! `conf/image/build.sh` holds the four static binaries, which run and resolve names in it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    Container, Namespace, Pod, PodSpec, Probe, Secret, ServiceAccount,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use podid_api::crd::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException,
    BINDING_LABEL, IdentityKind,
};
use podid_api::matching::MatchPolicy;
use podid_tests::bins::workspace_root;
use podid_tests::netns::Netns;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const NAMESPACE: &str = "podid-system";
const NODE_ACCOUNT: &str = "podid-node";
const CONTROLLER_ACCOUNT: &str = "podid-controller";
const IMAGE_REPOSITORY: &str = "ghcr.io/podid/podid";
/// Where the image puts its binaries (the manifests' commands, and `PATH`).
const IMAGE_BIN_DIR: &str = "usr/local/bin";
const BINARIES: [&str; 4] = ["podid", "podid-tokend", "podid-controller", "podid-install"];
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";
const COMPONENTS: [&str; 3] = ["service-principal", "federated", "compat"];
const WRITE_VERBS: [&str; 8] = [
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "escalate",
    "bind",
    "impersonate",
];

fn conf() -> PathBuf {
    workspace_root().join("conf")
}

fn image_name() -> String {
    format!("{IMAGE_REPOSITORY}:{}", env!("CARGO_PKG_VERSION"))
}

// ---------------------------------------------------------------------------------------------
// Rendering

/// `kubectl kustomize <dir>`, split into its objects.
fn kustomize(dir: &Path) -> Vec<Value> {
    let out = match Command::new("kubectl").arg("kustomize").arg(dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "kubectl not found on PATH: the conf/ tests render the manifests with `kubectl kustomize` \
             (kubectl is preinstalled on the project's machines; .ci/run checks for it)"
        ),
        Err(e) => panic!("running kubectl kustomize {}: {e}", dir.display()),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("kustomize prints UTF-8");
    let objects: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("output of kubectl kustomize {}: {e}", dir.display()));
    assert!(!objects.is_empty(), "{} renders nothing", dir.display());
    objects
}

/// One rendered installation: the base plus some of the components.
#[derive(Debug)]
struct Rendering {
    name: String,
    components: BTreeSet<&'static str>,
    objects: Vec<Value>,
}

impl Rendering {
    fn has(&self, component: &str) -> bool {
        self.components.contains(component)
    }

    fn of_kind(&self, kind: &str) -> impl Iterator<Item = &Value> {
        self.objects.iter().filter(move |o| o["kind"] == kind)
    }

    fn all<T: DeserializeOwned>(&self, kind: &str) -> Vec<T> {
        self.of_kind(kind)
            .map(|o| serde_json::from_value(o.clone()).unwrap())
            .collect()
    }

    fn one<T: DeserializeOwned>(&self, kind: &str, name: &str) -> T {
        let found: Vec<&Value> = self
            .of_kind(kind)
            .filter(|o| o["metadata"]["name"] == name)
            .collect();
        assert_eq!(found.len(), 1, "{}: {kind} {name}", self.name);
        serde_json::from_value(found[0].clone()).unwrap()
    }
}

/// `kubectl apply -k conf/`, each overlay, and all components at once (they must compose).
fn renderings() -> &'static [Rendering] {
    static RENDERINGS: OnceLock<Vec<Rendering>> = OnceLock::new();
    RENDERINGS.get_or_init(|| {
        let mut all = vec![Rendering {
            name: "conf/".into(),
            components: BTreeSet::new(),
            objects: kustomize(&conf()),
        }];
        for component in COMPONENTS {
            all.push(Rendering {
                name: format!("conf/overlays/{component}"),
                components: [component].into(),
                objects: kustomize(&conf().join("overlays").join(component)),
            });
        }
        // kustomize takes only relative paths, so the combined kustomization lives in the
        // workspace's target dir and names conf/ relative to it
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let to_conf = relative(dir.path(), &conf());
        let components: Vec<String> = COMPONENTS
            .iter()
            .map(|c| to_conf.join("components").join(c).display().to_string())
            .collect();
        let kustomization = serde_json::json!({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [to_conf.join("base").display().to_string()],
            "components": components,
        });
        std::fs::write(
            dir.path().join("kustomization.yaml"),
            kustomization.to_string(),
        )
        .unwrap();
        all.push(Rendering {
            name: "base with every component".into(),
            components: COMPONENTS.into(),
            objects: kustomize(dir.path()),
        });
        all
    })
}

/// `to` as a path relative to the directory `from`.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from = from.canonicalize().unwrap();
    let to = to.canonicalize().unwrap();
    let common = from
        .components()
        .zip(to.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut path = PathBuf::new();
    for _ in from.components().skip(common) {
        path.push("..");
    }
    path.extend(to.components().skip(common));
    path
}

fn base() -> &'static Rendering {
    &renderings()[0]
}

/// Every example under conf/examples, rendered.
fn examples() -> Vec<(String, Vec<Value>)> {
    let dir = conf().join("examples");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["federated", "rgapi", "service-principal"]);
    names
        .into_iter()
        .map(|name| {
            let objects = kustomize(&dir.join(&name));
            (name, objects)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Strict parsing

/// Parses `object` as `T` and checks that `T` writes back exactly `object`: serde ignores
/// unknown fields, so a misspelled or unknown field shows up as a difference.
fn strict<T: DeserializeOwned + Serialize>(object: &Value, what: &str) {
    let typed: T = serde_json::from_value(object.clone())
        .unwrap_or_else(|e| panic!("{what} does not parse: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    let mut differences = Vec::new();
    difference("", object, &back, &mut differences);
    assert!(
        differences.is_empty(),
        "{what} has fields its type does not know (or spells differently): {differences:#?}"
    );
}

/// The paths where `input` and `back` differ.
fn difference(path: &str, input: &Value, back: &Value, out: &mut Vec<String>) {
    match (input, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let at = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => difference(&at, value, other, out),
                    None => out.push(format!("{at}: dropped")),
                }
            }
            for key in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{path}.{key}: added"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                difference(&format!("{path}[{i}]"), x, y, out);
            }
        }
        _ if input != back => out.push(format!("{path}: {input} became {back}")),
        _ => {}
    }
}

/// Parses any object podid's manifests or examples may contain, by apiVersion and kind.
fn parse_strictly(object: &Value, source: &str) {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let what = format!(
        "{source}: {kind} {}/{}",
        object["metadata"]["namespace"].as_str().unwrap_or_default(),
        object["metadata"]["name"].as_str().unwrap_or_default()
    );
    match (api_version, kind) {
        ("v1", "Namespace") => strict::<Namespace>(object, &what),
        ("v1", "ServiceAccount") => strict::<ServiceAccount>(object, &what),
        ("v1", "Secret") => strict::<Secret>(object, &what),
        ("v1", "Pod") => strict::<Pod>(object, &what),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => strict::<ClusterRole>(object, &what),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            strict::<ClusterRoleBinding>(object, &what)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => strict::<Role>(object, &what),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => strict::<RoleBinding>(object, &what),
        ("apps/v1", "Deployment") => strict::<Deployment>(object, &what),
        ("apps/v1", "DaemonSet") => strict::<DaemonSet>(object, &what),
        ("policy/v1", "PodDisruptionBudget") => strict::<PodDisruptionBudget>(object, &what),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            strict::<CustomResourceDefinition>(object, &what)
        }
        ("aadpodidentity.k8s.io/v1", "AzureIdentity") => strict::<AzureIdentity>(object, &what),
        ("aadpodidentity.k8s.io/v1", "AzureIdentityBinding") => {
            strict::<AzureIdentityBinding>(object, &what)
        }
        ("aadpodidentity.k8s.io/v1", "AzureAssignedIdentity") => {
            strict::<AzureAssignedIdentity>(object, &what)
        }
        ("aadpodidentity.k8s.io/v1", "AzurePodIdentityException") => {
            strict::<AzurePodIdentityException>(object, &what)
        }
        _ => panic!("{what}: no type known for apiVersion {api_version:?} kind {kind:?}"),
    }
}

#[test]
fn every_rendered_object_parses_strictly() {
    for rendering in renderings() {
        for object in &rendering.objects {
            parse_strictly(object, &rendering.name);
        }
    }
    for (name, objects) in examples() {
        for object in &objects {
            parse_strictly(object, &format!("conf/examples/{name}"));
        }
    }
}

#[test]
fn strict_parsing_catches_a_misspelled_field() {
    let mut daemonset = base()
        .of_kind("DaemonSet")
        .next()
        .expect("a DaemonSet")
        .clone();
    daemonset["spec"]["template"]["spec"]["hostNetworking"] = Value::Bool(true);
    let caught = std::panic::catch_unwind(|| parse_strictly(&daemonset, "test"));
    assert!(caught.is_err(), "hostNetworking went unnoticed");
    let rgapi = &examples()[1];
    assert_eq!(rgapi.0, "rgapi");
    let mut identity = rgapi
        .1
        .iter()
        .find(|o| o["kind"] == "AzureIdentity")
        .unwrap()
        .clone();
    let client_id = identity["spec"]["clientID"].take();
    identity["spec"]["clientId"] = client_id;
    let caught = std::panic::catch_unwind(|| parse_strictly(&identity, "test"));
    assert!(caught.is_err(), "clientId (not clientID) went unnoticed");
}

#[test]
fn namespaced_objects_live_in_podid_system() {
    for rendering in renderings() {
        for object in &rendering.objects {
            let kind = object["kind"].as_str().unwrap();
            let namespaced = !matches!(
                kind,
                "Namespace" | "ClusterRole" | "ClusterRoleBinding" | "CustomResourceDefinition"
            );
            let namespace = object["metadata"]["namespace"].as_str();
            if namespaced {
                assert_eq!(namespace, Some(NAMESPACE), "{}: {object}", rendering.name);
            } else {
                assert_eq!(namespace, None, "{}: {kind}", rendering.name);
            }
        }
        let namespaces: Vec<Namespace> = rendering.all("Namespace");
        assert_eq!(namespaces.len(), 1);
        assert_eq!(namespaces[0].metadata.name.as_deref(), Some(NAMESPACE));
    }
}

#[test]
fn overlays_only_add_to_the_base() {
    let key = |o: &Value| {
        (
            o["kind"].as_str().unwrap().to_owned(),
            o["metadata"]["namespace"].as_str().unwrap_or("").to_owned(),
            o["metadata"]["name"].as_str().unwrap().to_owned(),
        )
    };
    let base_objects: BTreeMap<_, _> = base().objects.iter().map(|o| (key(o), o)).collect();
    for rendering in &renderings()[1..] {
        let objects: BTreeMap<_, _> = rendering.objects.iter().map(|o| (key(o), o)).collect();
        for (k, object) in &base_objects {
            let Some(overlaid) = objects.get(k) else {
                panic!("{} lacks {k:?} of the base", rendering.name);
            };
            // compat changes only the args of tokend and the controller, checked below
            if !(rendering.has("compat") && matches!(k.0.as_str(), "Deployment" | "DaemonSet")) {
                assert_eq!(overlaid, object, "{} changes {k:?}", rendering.name);
            }
        }
        for k in objects.keys().filter(|k| !base_objects.contains_key(*k)) {
            assert!(
                matches!(k.0.as_str(), "ClusterRole" | "ClusterRoleBinding"),
                "{} adds {k:?}: the overlays add RBAC only",
                rendering.name
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CRDs

#[test]
fn crds_are_crdgens_output() {
    let generated: BTreeMap<String, Value> = podid_api::crd::manifests()
        .into_iter()
        .map(|(file, yaml)| {
            let mut docs: Vec<Value> = serde_saphyr::from_multiple(&yaml).unwrap();
            assert_eq!(docs.len(), 1, "{file}");
            (file, docs.remove(0))
        })
        .collect();
    for rendering in renderings() {
        let rendered: BTreeMap<String, &Value> = rendering
            .of_kind("CustomResourceDefinition")
            .map(|o| {
                (
                    format!("{}.yaml", o["metadata"]["name"].as_str().unwrap()),
                    o,
                )
            })
            .collect();
        assert_eq!(
            rendered.keys().collect::<Vec<_>>(),
            generated.keys().collect::<Vec<_>>(),
            "{}",
            rendering.name
        );
        for (file, crd) in &generated {
            assert_eq!(
                rendered[file], crd,
                "{}: {file} differs from crdgen's output; run `cargo run -p podid-api --features crds --bin crdgen`",
                rendering.name
            );
        }
    }
    // conf/crds holds crdgen's files and the kustomization naming exactly them
    let dir = conf().join("crds");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != "kustomization.yaml")
        .collect();
    on_disk.sort();
    assert_eq!(on_disk, generated.keys().cloned().collect::<Vec<_>>());
    let kustomization: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap())
            .unwrap();
    let mut listed: Vec<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    assert_eq!(listed, on_disk, "conf/crds/kustomization.yaml");
}

// ---------------------------------------------------------------------------------------------
// RBAC

/// One permission: verb on group/resource (a subresource as `resource/sub`), cluster-wide
/// (`namespace: None`) or in one namespace, for any object or one name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    namespace: Option<String>,
    group: String,
    resource: String,
    verb: String,
    name: Option<String>,
}

fn expand(rules: &[PolicyRule], namespace: Option<&str>, out: &mut BTreeSet<Grant>) {
    for rule in rules {
        assert!(
            rule.non_resource_urls.is_none(),
            "non-resource URLs granted: {rule:?}"
        );
        let names: Vec<Option<String>> = match &rule.resource_names {
            Some(names) if !names.is_empty() => names.iter().cloned().map(Some).collect(),
            _ => vec![None],
        };
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    for name in &names {
                        out.insert(Grant {
                            namespace: namespace.map(str::to_owned),
                            group: group.clone(),
                            resource: resource.clone(),
                            verb: verb.clone(),
                            name: name.clone(),
                        });
                    }
                }
            }
        }
    }
}

/// Everything the service account `podid-system/<account>` is granted in `rendering`.
fn grants_of(rendering: &Rendering, account: &str) -> BTreeSet<Grant> {
    let is_account = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == account
                && s.namespace.as_deref() == Some(NAMESPACE)
        })
    };
    let cluster_role = |name: &str| -> ClusterRole { rendering.one("ClusterRole", name) };
    let mut grants = BTreeSet::new();
    for binding in rendering.all::<ClusterRoleBinding>("ClusterRoleBinding") {
        if is_account(&binding.subjects) {
            assert_eq!(binding.role_ref.kind, "ClusterRole");
            let role = cluster_role(&binding.role_ref.name);
            expand(role.rules.as_deref().unwrap_or_default(), None, &mut grants);
        }
    }
    for binding in rendering.all::<RoleBinding>("RoleBinding") {
        if is_account(&binding.subjects) {
            let namespace = binding.metadata.namespace.clone().unwrap();
            let rules = match binding.role_ref.kind.as_str() {
                "ClusterRole" => cluster_role(&binding.role_ref.name).rules,
                "Role" => {
                    let role: Role = rendering.one("Role", &binding.role_ref.name);
                    assert_eq!(role.metadata.namespace.as_deref(), Some(namespace.as_str()));
                    role.rules
                }
                other => panic!("roleRef kind {other}"),
            };
            expand(
                rules.as_deref().unwrap_or_default(),
                Some(&namespace),
                &mut grants,
            );
        }
    }
    grants
}

fn grant(
    namespace: Option<&str>,
    group: &str,
    resources: &[&str],
    verbs: &[&str],
    name: Option<&str>,
) -> Vec<Grant> {
    let mut out = Vec::new();
    for resource in resources {
        for verb in verbs {
            out.push(Grant {
                namespace: namespace.map(str::to_owned),
                group: group.to_owned(),
                resource: (*resource).to_owned(),
                verb: (*verb).to_owned(),
                name: name.map(str::to_owned),
            });
        }
    }
    out
}

const READ: &[&str] = &["get", "list", "watch"];
const CRDS: &[&str] = &[
    "azureidentities",
    "azureidentitybindings",
    "azureassignedidentities",
    "azurepodidentityexceptions",
];
const GROUP: &str = "aadpodidentity.k8s.io";

fn node_grants(rendering: &Rendering) -> BTreeSet<Grant> {
    let mut want: BTreeSet<Grant> = [
        grant(None, "", &["pods"], READ, None),
        grant(None, GROUP, CRDS, READ, None),
        grant(None, "", &["nodes"], &["get", "patch"], None),
    ]
    .into_iter()
    .flatten()
    .collect();
    if rendering.has("service-principal") {
        want.extend(grant(None, "", &["secrets"], &["get"], None));
    }
    if rendering.has("federated") {
        want.extend(grant(
            None,
            "",
            &["serviceaccounts/token"],
            &["create"],
            None,
        ));
    }
    want
}

fn controller_grants(lease: &str) -> BTreeSet<Grant> {
    let ns = Some(NAMESPACE);
    [
        grant(None, "", &["pods"], READ, None),
        grant(None, "", &["pods/status"], &["get", "patch"], None),
        grant(
            None,
            GROUP,
            &["azureidentities", "azureidentitybindings"],
            READ,
            None,
        ),
        grant(
            None,
            GROUP,
            &["azureassignedidentities"],
            &["get", "list", "watch", "create", "patch", "delete"],
            None,
        ),
        grant(
            None,
            GROUP,
            &["azureassignedidentities/status"],
            &["patch"],
            None,
        ),
        grant(None, "events.k8s.io", &["events"], &["create"], None),
        grant(ns, "coordination.k8s.io", &["leases"], &["create"], None),
        grant(
            ns,
            "coordination.k8s.io",
            &["leases"],
            &["get", "update"],
            Some(lease),
        ),
    ]
    .into_iter()
    .flatten()
    .collect()
}

#[test]
fn accounts_are_granted_exactly_this() {
    for rendering in renderings() {
        let node = grants_of(rendering, NODE_ACCOUNT);
        assert_eq!(
            node,
            node_grants(rendering),
            "{}: podid-node",
            rendering.name
        );
        let controller = controller(rendering);
        let lease = arg(&controller.args, "--lease-name").expect("--lease-name");
        assert_eq!(
            grants_of(rendering, CONTROLLER_ACCOUNT),
            controller_grants(lease),
            "{}: podid-controller (its Lease name must be the Role's resourceName)",
            rendering.name
        );
        // nothing else is bound, and every role is bound to one of podid's accounts
        let accounts: Vec<ServiceAccount> = rendering.all("ServiceAccount");
        let mut names: Vec<&str> = accounts
            .iter()
            .map(|a| a.metadata.name.as_deref().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [CONTROLLER_ACCOUNT, NODE_ACCOUNT],
            "{}",
            rendering.name
        );
        let mut bound = BTreeSet::new();
        for binding in rendering.all::<ClusterRoleBinding>("ClusterRoleBinding") {
            bound.insert(("ClusterRole".to_owned(), binding.role_ref.name.clone()));
            for subject in binding.subjects.iter().flatten() {
                assert!(names.contains(&subject.name.as_str()), "{subject:?}");
            }
        }
        for binding in rendering.all::<RoleBinding>("RoleBinding") {
            bound.insert((binding.role_ref.kind.clone(), binding.role_ref.name.clone()));
            for subject in binding.subjects.iter().flatten() {
                assert!(names.contains(&subject.name.as_str()), "{subject:?}");
            }
        }
        for kind in ["ClusterRole", "Role"] {
            for role in rendering.of_kind(kind) {
                let name = role["metadata"]["name"].as_str().unwrap().to_owned();
                assert!(
                    bound.contains(&(kind.to_owned(), name.clone())),
                    "{}: {kind} {name} is bound to nobody",
                    rendering.name
                );
            }
        }
    }
}

/// Every rule of every Role and ClusterRole of a rendering, with the role's name.
fn all_rules(objects: &[Value]) -> Vec<(String, PolicyRule)> {
    let mut out = Vec::new();
    for object in objects {
        if object["kind"] == "ClusterRole" || object["kind"] == "Role" {
            assert!(
                object.get("aggregationRule").is_none(),
                "aggregated role: {object}"
            );
            let rules: Vec<PolicyRule> =
                serde_json::from_value(object["rules"].clone()).unwrap_or_default();
            let name = object["metadata"]["name"].as_str().unwrap().to_owned();
            out.extend(rules.into_iter().map(|r| (name.clone(), r)));
        }
    }
    out
}

#[test]
fn no_wildcards_anywhere() {
    let mut sets: Vec<(String, Vec<Value>)> = renderings()
        .iter()
        .map(|r| (r.name.clone(), r.objects.clone()))
        .collect();
    sets.extend(examples());
    for (name, objects) in &sets {
        for (role, rule) in all_rules(objects) {
            let words = rule
                .verbs
                .iter()
                .chain(rule.resources.iter().flatten())
                .chain(rule.api_groups.iter().flatten())
                .chain(rule.resource_names.iter().flatten());
            for word in words {
                assert!(!word.contains('*'), "{name}: {role} grants {word:?}");
            }
            assert!(
                !rule.verbs.is_empty(),
                "{name}: {role} has a rule without verbs"
            );
        }
    }
}

#[test]
fn secrets_only_with_service_principal_and_tokens_only_with_federated() {
    for rendering in renderings() {
        let rules = all_rules(&rendering.objects);
        let names = |resource: &str| -> Vec<String> {
            rules
                .iter()
                .filter(|(_, r)| {
                    r.resources
                        .iter()
                        .flatten()
                        .any(|res| res == resource || res.starts_with(&format!("{resource}/")))
                })
                .map(|(role, _)| role.clone())
                .collect()
        };
        let secrets = names("secrets");
        assert_eq!(
            !secrets.is_empty(),
            rendering.has("service-principal"),
            "{}: secrets in {secrets:?}",
            rendering.name
        );
        let tokens: Vec<String> = names("serviceaccounts")
            .into_iter()
            .chain(names("tokenrequests"))
            .collect();
        assert_eq!(
            !tokens.is_empty(),
            rendering.has("federated"),
            "{}: service-account tokens in {tokens:?}",
            rendering.name
        );
        if rendering.has("service-principal") {
            let secret_grants: BTreeSet<Grant> = grants_of(rendering, NODE_ACCOUNT)
                .into_iter()
                .filter(|g| g.resource == "secrets")
                .collect();
            assert_eq!(
                secret_grants,
                grant(None, "", &["secrets"], &["get"], None)
                    .into_iter()
                    .collect(),
                "{}: get by name only, no list or watch",
                rendering.name
            );
        }
    }
}

#[test]
fn node_account_cannot_write_pods_or_podid_resources() {
    for rendering in renderings() {
        let writes: BTreeSet<Grant> = grants_of(rendering, NODE_ACCOUNT)
            .into_iter()
            .filter(|g| WRITE_VERBS.contains(&g.verb.as_str()))
            .collect();
        for g in &writes {
            assert!(
                !(g.group.is_empty() && (g.resource == "pods" || g.resource.starts_with("pods/"))),
                "{}: podid-node may {} {}",
                rendering.name,
                g.verb,
                g.resource
            );
            assert_ne!(
                g.group, GROUP,
                "{}: podid-node may write {g:?}",
                rendering.name
            );
        }
        let mut want: BTreeSet<Grant> = grant(None, "", &["nodes"], &["patch"], None)
            .into_iter()
            .collect();
        if rendering.has("federated") {
            want.extend(grant(
                None,
                "",
                &["serviceaccounts/token"],
                &["create"],
                None,
            ));
        }
        assert_eq!(writes, want, "{}", rendering.name);
    }
}

// ---------------------------------------------------------------------------------------------
// Workloads

/// The value of `--flag=value` in `args`; `Some("")` for a bare `--flag`.
fn arg<'a>(args: &'a Option<Vec<String>>, flag: &str) -> Option<&'a str> {
    args.iter().flatten().find_map(|a| {
        if a == flag {
            Some("")
        } else {
            a.strip_prefix(flag).and_then(|rest| rest.strip_prefix('='))
        }
    })
}

fn port_of(addr: &str) -> i32 {
    addr.rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("{addr} has no port"))
}

fn node_daemonset(rendering: &Rendering) -> DaemonSet {
    rendering.one("DaemonSet", "podid-node")
}

fn pod_spec_of_daemonset(ds: &DaemonSet) -> PodSpec {
    ds.spec.as_ref().unwrap().template.spec.clone().unwrap()
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn controller(rendering: &Rendering) -> Container {
    let deployment: Deployment = rendering.one("Deployment", "podid-controller");
    let spec = deployment.spec.unwrap().template.spec.unwrap();
    assert_eq!(spec.containers.len(), 1);
    spec.containers[0].clone()
}

fn assert_http_probe(probe: &Option<Probe>, path: &str, port: i32, host: Option<&str>, what: &str) {
    let get = probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("{what}: no httpGet probe for {path}"));
    assert_eq!(get.path.as_deref(), Some(path), "{what}");
    assert_eq!(get.port, IntOrString::Int(port), "{what}: {path}");
    assert_eq!(get.host.as_deref(), host, "{what}: {path}");
}

fn env_field(container: &Container, name: &str) -> Option<String> {
    container.env.iter().flatten().find_map(|e| {
        (e.name == name)
            .then(|| e.value_from.as_ref()?.field_ref.as_ref())
            .flatten()
            .map(|f| f.field_path.clone())
    })
}

#[test]
fn node_daemonset_runs_one_agent_per_node_with_little_privilege() {
    for rendering in renderings() {
        let ds = node_daemonset(rendering);
        let what = &rendering.name;
        let strategy = ds.spec.as_ref().unwrap().update_strategy.clone().unwrap();
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"), "{what}");
        let rolling = strategy.rolling_update.unwrap();
        assert_eq!(rolling.max_surge, Some(IntOrString::Int(0)), "{what}");
        assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)), "{what}");

        let spec = pod_spec_of_daemonset(&ds);
        assert_eq!(spec.host_network, Some(true), "{what}");
        assert_eq!(spec.dns_policy.as_deref(), Some("Default"), "{what}");
        assert_eq!(spec.host_pid, None, "{what}");
        assert_eq!(spec.host_ipc, None, "{what}");
        assert_eq!(
            spec.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        assert_eq!(spec.service_account_name.as_deref(), Some(NODE_ACCOUNT));
        let tolerations = spec.tolerations.clone().unwrap();
        assert_eq!(tolerations.len(), 1, "{what}");
        assert_eq!(tolerations[0].operator.as_deref(), Some("Exists"));
        assert_eq!(
            (
                &tolerations[0].key,
                &tolerations[0].effect,
                &tolerations[0].value
            ),
            (&None, &None, &None),
            "{what}: tolerates every taint"
        );
        assert!(spec.init_containers.is_none(), "{what}");

        let mut names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["install", "tokend"], "{what}");
        let mut added = BTreeSet::new();
        for c in &spec.containers {
            let sc = c.security_context.clone().unwrap();
            assert_ne!(sc.privileged, Some(true), "{what}: {}", c.name);
            assert_eq!(
                sc.read_only_root_filesystem,
                Some(true),
                "{what}: {}",
                c.name
            );
            let caps = sc.capabilities.unwrap();
            assert_eq!(
                caps.drop,
                Some(vec!["ALL".to_owned()]),
                "{what}: {}",
                c.name
            );
            added.extend(caps.add.unwrap_or_default());
        }
        assert_eq!(
            added,
            BTreeSet::from(["NET_ADMIN".to_owned(), "SYS_ADMIN".to_owned()]),
            "{what}"
        );
        // setns into pod netns: SYS_ADMIN; the host guard's nf_tables: NET_ADMIN
        let caps_of = |name: &str| {
            container(&spec, name)
                .security_context
                .clone()
                .unwrap()
                .capabilities
                .unwrap()
                .add
                .unwrap()
        };
        assert_eq!(caps_of("tokend"), ["SYS_ADMIN"]);
        assert_eq!(caps_of("install"), ["NET_ADMIN"]);

        // each hostPath is mounted at its own path, so the paths in the conflist and in the
        // plugin's records mean the same inside the containers
        let host_paths: BTreeMap<String, String> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| {
                let host = v
                    .host_path
                    .as_ref()
                    .unwrap_or_else(|| panic!("{what}: volume {} is no hostPath", v.name));
                (v.name.clone(), host.path.clone())
            })
            .collect();
        let want_paths: BTreeSet<&str> = [
            "/opt/cni/bin",
            "/etc/cni/net.d",
            "/var/run/netns",
            "/var/run/podid",
            "/var/lib/podid",
        ]
        .into();
        assert_eq!(
            host_paths
                .values()
                .map(String::as_str)
                .collect::<BTreeSet<_>>(),
            want_paths,
            "{what}"
        );
        let mounts = |c: &Container| -> BTreeMap<String, (Option<String>, bool)> {
            c.volume_mounts
                .iter()
                .flatten()
                .map(|m| {
                    assert_eq!(
                        Some(&m.mount_path),
                        host_paths.get(&m.name),
                        "{what}: {} mounts {} elsewhere",
                        c.name,
                        m.name
                    );
                    (
                        m.mount_path.clone(),
                        (m.mount_propagation.clone(), m.read_only == Some(true)),
                    )
                })
                .collect()
        };
        let install = container(&spec, "install");
        let tokend = container(&spec, "tokend");
        let install_mounts = mounts(install);
        let tokend_mounts = mounts(tokend);
        assert_eq!(
            install_mounts
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            [
                "/etc/cni/net.d",
                "/opt/cni/bin",
                "/var/lib/podid",
                "/var/run/podid"
            ],
            "{what}"
        );
        assert_eq!(
            tokend_mounts.keys().map(String::as_str).collect::<Vec<_>>(),
            ["/var/lib/podid", "/var/run/netns", "/var/run/podid"],
            "{what}"
        );
        assert_eq!(
            tokend_mounts["/var/run/netns"],
            (Some("HostToContainer".to_owned()), true),
            "{what}: pod netns created after tokend started must appear in it"
        );
        for (path, (propagation, _)) in install_mounts.iter().chain(&tokend_mounts) {
            if path != "/var/run/netns" {
                assert_eq!(propagation, &None, "{what}: {path}");
            }
        }

        // the two containers agree on tokend's socket and state dir, and mount them
        let socket = arg(&tokend.args, "--socket").unwrap();
        assert_eq!(arg(&install.args, "--socket"), Some(socket), "{what}");
        let state_dir = arg(&tokend.args, "--state-dir").unwrap();
        assert_eq!(arg(&install.args, "--state-dir"), Some(state_dir), "{what}");
        let socket_dir = Path::new(socket).parent().unwrap().to_str().unwrap();
        for mounts in [&install_mounts, &tokend_mounts] {
            assert!(mounts.contains_key(socket_dir), "{what}: {socket_dir}");
            assert!(mounts.contains_key(state_dir), "{what}: {state_dir}");
        }
        for flag in ["--cni-bin-dir", "--cni-conf-dir"] {
            let dir = arg(&install.args, flag).unwrap();
            assert!(install_mounts.contains_key(dir), "{what}: {flag} {dir}");
        }
        assert_eq!(
            arg(&install.args, "--plugin-binary"),
            Some(format!("/{IMAGE_BIN_DIR}/podid").as_str())
        );

        for c in [install, tokend] {
            let port = port_of(arg(&c.args, "--health-addr").unwrap());
            let name = format!("{what}: {}", c.name);
            assert_http_probe(
                &c.liveness_probe,
                "/healthz",
                port,
                Some("127.0.0.1"),
                &name,
            );
            assert_http_probe(
                &c.readiness_probe,
                "/readyz",
                port,
                Some("127.0.0.1"),
                &name,
            );
            assert_eq!(
                env_field(c, "NODE_NAME").as_deref(),
                Some("spec.nodeName"),
                "{name}"
            );
            assert_eq!(arg(&c.args, "--node-name"), Some("$(NODE_NAME)"), "{name}");
        }
        let cluster_wide = arg(&tokend.args, "--cluster-wide-bindings").is_some();
        assert_eq!(cluster_wide, rendering.has("compat"), "{what}: tokend");
        assert_eq!(arg(&install.args, "--cluster-wide-bindings"), None);
    }
}

#[test]
fn controller_is_highly_available() {
    for rendering in renderings() {
        let what = &rendering.name;
        let deployment: Deployment = rendering.one("Deployment", "podid-controller");
        let spec = deployment.spec.unwrap();
        assert_eq!(spec.replicas, Some(2), "{what}");
        let labels = spec.template.metadata.clone().unwrap().labels.unwrap();
        let selected = |selector: &BTreeMap<String, String>| {
            !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        };
        assert!(selected(spec.selector.match_labels.as_ref().unwrap()));
        let pod = spec.template.spec.unwrap();
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some(CONTROLLER_ACCOUNT)
        );
        assert_ne!(pod.host_network, Some(true));
        let anti = pod
            .affinity
            .and_then(|a| a.pod_anti_affinity)
            .expect("pod anti-affinity");
        let terms = anti
            .preferred_during_scheduling_ignored_during_execution
            .unwrap();
        assert!(terms.iter().any(|t| {
            t.pod_affinity_term.topology_key == "kubernetes.io/hostname"
                && t.pod_affinity_term
                    .label_selector
                    .as_ref()
                    .and_then(|s| s.match_labels.as_ref())
                    .is_some_and(selected)
        }));

        let pdb: PodDisruptionBudget = rendering.one("PodDisruptionBudget", "podid-controller");
        let pdb = pdb.spec.unwrap();
        assert_eq!(pdb.min_available, Some(IntOrString::Int(1)), "{what}");
        assert!(selected(
            pdb.selector.unwrap().match_labels.as_ref().unwrap()
        ));

        let c = controller(rendering);
        let port = port_of(arg(&c.args, "--health-addr").unwrap());
        assert_http_probe(&c.liveness_probe, "/healthz", port, None, what);
        assert_http_probe(&c.readiness_probe, "/readyz", port, None, what);
        assert_eq!(env_field(&c, "POD_NAME").as_deref(), Some("metadata.name"));
        assert_eq!(arg(&c.args, "--holder-identity"), Some("$(POD_NAME)"));
        let sc = c.security_context.unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(
            pod.security_context.unwrap().run_as_non_root,
            Some(true),
            "{what}"
        );
        let cluster_wide = arg(&c.args, "--cluster-wide-bindings").is_some();
        assert_eq!(cluster_wide, rendering.has("compat"), "{what}: controller");
    }
}

/// Every container of podid's workloads in `rendering`, with its workload's name.
fn workload_containers(rendering: &Rendering) -> Vec<(String, Container)> {
    let mut out: Vec<(String, Container)> = pod_spec_of_daemonset(&node_daemonset(rendering))
        .containers
        .into_iter()
        .map(|c| (format!("DaemonSet podid-node/{}", c.name), c))
        .collect();
    out.push(("Deployment podid-controller".into(), controller(rendering)));
    out
}

#[test]
fn manifests_name_the_image_and_its_binaries() {
    let image = image_name();
    for rendering in renderings() {
        for (what, c) in workload_containers(rendering) {
            assert_eq!(c.image.as_deref(), Some(image.as_str()), "{what}");
            let command = c.command.clone().unwrap_or_default();
            assert_eq!(command.len(), 1, "{what}: the binary, flags in args");
            let binary = command[0]
                .strip_prefix(&format!("/{IMAGE_BIN_DIR}/"))
                .unwrap_or_else(|| panic!("{what}: {} is not in /{IMAGE_BIN_DIR}", command[0]));
            assert!(BINARIES.contains(&binary), "{what}: {binary}");
            for a in c.args.iter().flatten() {
                assert!(a.starts_with("--"), "{what}: {a} is no --flag");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Examples

fn of_kind<'a>(objects: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> {
    objects.iter().filter(move |o| o["kind"] == kind)
}

#[test]
fn examples_give_their_pods_their_identities() {
    let fixtures = workspace_root().join("tests/fixtures/aad-pod-identity");
    for (name, objects) in examples() {
        let kinds = |kind: &'static str| of_kind(&objects, kind);
        let identities: Vec<AzureIdentity> = kinds("AzureIdentity")
            .map(|o| serde_json::from_value(o.clone()).unwrap())
            .collect();
        let bindings: Vec<AzureIdentityBinding> = kinds("AzureIdentityBinding")
            .map(|o| serde_json::from_value(o.clone()).unwrap())
            .collect();
        let pods: Vec<Pod> = kinds("Pod")
            .map(|o| serde_json::from_value(o.clone()).unwrap())
            .collect();
        assert_eq!(
            (identities.len(), bindings.len(), pods.len()),
            (1, 1, 1),
            "{name}"
        );
        let identity = &identities[0];
        let pod = &pods[0];
        let namespace = pod.metadata.namespace.as_deref().unwrap();
        let created: Vec<&str> = kinds("Namespace")
            .map(|o| o["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            created,
            [namespace],
            "{name}: the example creates its namespace"
        );
        let label = &pod.metadata.labels.as_ref().unwrap()[BINDING_LABEL];
        let selection = MatchPolicy::default().select(namespace, label, &bindings, |ns, n| {
            identities.iter().find(|i| {
                i.metadata.namespace.as_deref() == Some(ns) && i.metadata.name.as_deref() == Some(n)
            })
        });
        assert_eq!(selection.identities.len(), 1, "{name}");
        assert!(std::ptr::eq(selection.identities[0].identity, identity));

        let kind = identity.spec.type_.kind();
        match name.as_str() {
            "rgapi" => {
                assert_eq!(kind, Some(IdentityKind::UserAssignedMsi));
                assert_eq!((namespace, label.as_str()), ("rgapi", "rgapi"));
                // the seeds' walk-through, as the AKS add-on writes it
                for (kind, fixture) in [
                    ("AzureIdentity", "seeds-rgapi-identity.yaml"),
                    ("AzureIdentityBinding", "seeds-rgapi-binding.yaml"),
                ] {
                    let want: Value = serde_saphyr::from_str(
                        &std::fs::read_to_string(fixtures.join(fixture)).unwrap(),
                    )
                    .unwrap();
                    assert_eq!(kinds(kind).next().unwrap(), &want, "{fixture}");
                }
            }
            "service-principal" => {
                assert_eq!(kind, Some(IdentityKind::ServicePrincipal));
                let secret = identity.spec.client_password.clone().unwrap();
                assert_eq!(secret.namespace.as_deref(), Some(namespace));
                let secrets: Vec<Secret> = kinds("Secret")
                    .map(|o| serde_json::from_value(o.clone()).unwrap())
                    .collect();
                assert_eq!(secrets.len(), 1);
                assert_eq!(secrets[0].metadata.name, secret.name);
                assert_eq!(secrets[0].metadata.namespace.as_deref(), Some(namespace));
                assert_eq!(secrets[0].string_data.as_ref().map(BTreeMap::len), Some(1));
                assert!(identity.spec.tenant_id.is_some());
            }
            "federated" => {
                assert_eq!(kind, Some(IdentityKind::Federated));
                assert!(identity.spec.tenant_id.is_some());
                let account = pod.spec.as_ref().unwrap().service_account_name.clone();
                let accounts: Vec<&Value> = kinds("ServiceAccount").collect();
                assert_eq!(accounts.len(), 1);
                assert_eq!(accounts[0]["metadata"]["name"].as_str(), account.as_deref());
            }
            other => panic!("unexpected example {other}"),
        }
        assert!(identity.spec.client_id.is_some(), "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// The image

/// The image built by `conf/image/build.sh`, with a copy of its files.
#[derive(Debug)]
struct Image {
    name: String,
    rootfs: PathBuf,
}

fn image() -> &'static Image {
    static IMAGE: OnceLock<Result<Image, String>> = OnceLock::new();
    IMAGE
        .get_or_init(build_image)
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A command with the environment of a shell rather than of a test (cargo hands tests
/// `CARGO_*` and more; a nested build that saw them would rebuild dependencies).
fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear();
    for key in [
        "PATH",
        "HOME",
        "TMPDIR",
        "CARGO_HOME",
        "CARGO_TARGET_DIR",
        "RUSTUP_HOME",
        "RUSTUP_TOOLCHAIN",
    ] {
        if let Some(value) = std::env::var_os(key) {
            cmd.env(key, value);
        }
    }
    cmd
}

fn output_text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn build_image() -> Result<Image, String> {
    let started = Instant::now();
    let out = clean_command(conf().join("image/build.sh"))
        .output()
        .map_err(|e| format!("running conf/image/build.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!("conf/image/build.sh failed: {}", output_text(&out)));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let name = stdout.lines().last().unwrap_or_default().trim().to_owned();
    eprintln!("image {name} built in {:?}", started.elapsed());
    // the image's own files, as `podman image mount` shows them, copied out
    let rootfs = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("conf-image-rootfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    std::fs::create_dir_all(&rootfs).map_err(|e| format!("{}: {e}", rootfs.display()))?;
    let mount = Command::new("podman")
        .args(["image", "mount", &name])
        .output()
        .map_err(|e| format!("podman image mount: {e}"))?;
    if !mount.status.success() {
        return Err(format!(
            "podman image mount {name}: {}",
            output_text(&mount)
        ));
    }
    let mounted = String::from_utf8_lossy(&mount.stdout).trim().to_owned();
    let copied = Command::new("cp")
        .arg("-a")
        .arg(format!("{mounted}/."))
        .arg(&rootfs)
        .output();
    let _ = Command::new("podman")
        .args(["image", "unmount", &name])
        .output();
    let copied = copied.map_err(|e| format!("cp: {e}"))?;
    if !copied.status.success() {
        return Err(format!(
            "copying the image's files: {}",
            output_text(&copied)
        ));
    }
    Ok(Image { name, rootfs })
}

/// `podman run --rm <args>`. crun refuses to start containers on a host whose cgroup v1
/// controllers come with a cgroup2 mount at /sys/fs/cgroup/unified ("hybrid"), as on the
/// project's machines, so podman runs in a private mount namespace without that mount; and
/// podman's default rlimits are raised ones, which need CAP_SYS_RESOURCE, so they are set
/// lower explicitly.
fn podman_run(args: &[&str]) -> Output {
    let script = "umount /sys/fs/cgroup/unified 2>/dev/null; exec podman run --rm \
                  --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \"$@\"";
    Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .args(args)
        .output()
        .expect("running unshare and podman")
}

#[test]
fn image_is_built_offline_with_the_name_the_manifests_use() {
    let image = image();
    assert_eq!(image.name, image_name());
    let inspect = Command::new("podman")
        .args([
            "image",
            "inspect",
            "--format",
            "{{json .Config.Env}}",
            &image.name,
        ])
        .output()
        .unwrap();
    assert!(inspect.status.success(), "{}", output_text(&inspect));
    let env: Vec<String> = serde_json::from_slice(&inspect.stdout).unwrap();
    assert!(env.contains(&format!("PATH=/{IMAGE_BIN_DIR}")), "{env:?}");
    let size = Command::new("podman")
        .args(["image", "inspect", "--format", "{{.Size}}", &image.name])
        .output()
        .unwrap();
    eprintln!(
        "image {} size {} bytes",
        image.name,
        String::from_utf8_lossy(&size.stdout).trim()
    );
}

fn files_under(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            files_under(root, &entry.path(), out);
        } else {
            assert!(
                kind.is_file(),
                "{} is no regular file",
                entry.path().display()
            );
            let relative = entry.path().strip_prefix(root).unwrap().to_owned();
            out.insert(relative.to_string_lossy().into_owned());
        }
    }
}

#[test]
fn image_holds_the_four_static_binaries_and_the_ca_bundle() {
    use object::elf;
    use object::read::elf::{Dyn, ElfFile64, ProgramHeader};
    use std::os::unix::fs::PermissionsExt;

    let image = image();
    let mut files = BTreeSet::new();
    files_under(&image.rootfs, &image.rootfs, &mut files);
    let mut want: BTreeSet<String> = BINARIES
        .iter()
        .map(|b| format!("{IMAGE_BIN_DIR}/{b}"))
        .collect();
    want.insert(CA_BUNDLE.to_owned());
    assert_eq!(files, want);

    for binary in BINARIES {
        let path = image.rootfs.join(IMAGE_BIN_DIR).join(binary);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o111, 0o111, "{binary} is not executable");
        let data = std::fs::read(&path).unwrap();
        let file = ElfFile64::<object::Endianness>::parse(&*data).unwrap();
        let endian = file.endian();
        let mut needed = 0;
        for ph in file.elf_program_headers() {
            assert_ne!(
                ph.p_type(endian),
                elf::PT_INTERP,
                "{binary} asks for a dynamic loader"
            );
            if let Ok(Some(dynamic)) = ph.dynamic(endian, &*data) {
                needed += dynamic
                    .iter()
                    .filter(|d| d.tag(endian) == elf::DT_NEEDED)
                    .count();
            }
        }
        assert_eq!(needed, 0, "{binary} needs shared libraries");
    }
    let bundle = std::fs::read_to_string(image.rootfs.join(CA_BUNDLE)).unwrap();
    assert!(
        bundle.matches("-----BEGIN CERTIFICATE-----").count() > 10,
        "the CA bundle holds (almost) no certificates"
    );
}

#[test]
fn image_binaries_run_without_network() {
    let image = image();
    let version = env!("CARGO_PKG_VERSION");
    for binary in ["podid-tokend", "podid-controller", "podid-install"] {
        let out = podman_run(&["--network", "none", &image.name, binary, "--version"]);
        assert!(out.status.success(), "{binary}: {}", output_text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{binary} {version}")
        );
    }
    let out = podman_run(&[
        "--network",
        "none",
        "--env",
        "CNI_COMMAND=VERSION",
        &image.name,
        "podid",
    ]);
    assert!(out.status.success(), "podid: {}", output_text(&out));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        answer["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&Value::from("0.3.0")),
        "{answer}"
    );
}

#[test]
fn manifest_args_are_flags_of_the_binaries() {
    let image = image();
    let mut checked = 0;
    for rendering in renderings() {
        for (what, c) in workload_containers(rendering) {
            let command = &c.command.as_ref().unwrap()[0];
            let binary = image.rootfs.join(command.trim_start_matches('/'));
            let help = clean_command(&binary).arg("--help").output().unwrap();
            assert!(help.status.success(), "{what}: {}", output_text(&help));
            let help = String::from_utf8_lossy(&help.stdout).into_owned();
            let listed: BTreeSet<&str> = help
                .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '-'))
                .filter(|w| w.starts_with("--"))
                .collect();
            let args: Vec<String> = c
                .args
                .iter()
                .flatten()
                .map(|a| {
                    a.replace("$(NODE_NAME)", "aks-nodepool1-12345678-vmss000000")
                        .replace("$(POD_NAME)", "podid-controller-5d9c7b7b9c-x7k2p")
                })
                .collect();
            for a in &args {
                let flag = a.split('=').next().unwrap();
                assert!(
                    listed.contains(flag),
                    "{}: {what}: {flag} is no flag of {command}",
                    rendering.name
                );
            }
            // every value parses: clap reads the args in order and stops at --help only once
            // each one before it was accepted
            let out = clean_command(&binary)
                .args(&args)
                .arg("--help")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {what}: {command} {args:?}: {}",
                rendering.name,
                output_text(&out)
            );
            checked += 1;
        }
    }
    assert_eq!(checked, renderings().len() * 3);
    // and a wrong value would be caught
    let tokend = image.rootfs.join(IMAGE_BIN_DIR).join("podid-tokend");
    let out = clean_command(&tokend)
        .args(["--listener-port=none", "--help"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", output_text(&out));
}

/// A Kubernetes API server reachable only by name, inside a netns of its own: a DNS server
/// on 127.0.0.1:53 that knows `known`, and a TCP listener that records the Host header of
/// each request it gets.
struct NameWorld {
    netns: Netns,
    port: u16,
    queries: Arc<Mutex<Vec<String>>>,
    hosts: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl NameWorld {
    fn start(known: &'static [&'static str]) -> Self {
        let netns = Netns::new("names").unwrap();
        netns.exec_ok("ip", &["link", "set", "lo", "up"]).unwrap();
        let (udp, tcp) = netns
            .run(|| {
                (
                    UdpSocket::bind("127.0.0.1:53").unwrap(),
                    TcpListener::bind("127.0.0.1:0").unwrap(),
                )
            })
            .unwrap();
        let port = tcp.local_addr().unwrap().port();
        let queries = Arc::new(Mutex::new(Vec::new()));
        let hosts = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let (q, s) = (Arc::clone(&queries), Arc::clone(&stop));
        std::thread::spawn(move || serve_dns(&udp, known, &q, &s));
        tcp.set_nonblocking(true).unwrap();
        let (h, s) = (Arc::clone(&hosts), Arc::clone(&stop));
        std::thread::spawn(move || serve_http(&tcp, &h, &s));
        NameWorld {
            netns,
            port,
            queries,
            hosts,
            stop,
        }
    }

    /// Whether a request for `host` arrived within `wait`.
    fn wait_for_host(&self, host: &str, wait: Duration) -> bool {
        let want = format!("{host}:{}", self.port);
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if self.hosts.lock().unwrap().contains(&want) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for NameWorld {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Answers A queries for `known` names with 127.0.0.1, AAAA for them with no data, and
/// everything else with NXDOMAIN.
fn serve_dns(socket: &UdpSocket, known: &[&str], queries: &Mutex<Vec<String>>, stop: &AtomicBool) {
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let query = &buf[..n];
        let mut at = 12;
        let mut labels = Vec::new();
        while at < n && query[at] != 0 {
            let len = usize::from(query[at]);
            labels.push(String::from_utf8_lossy(&query[at + 1..at + 1 + len]).into_owned());
            at += 1 + len;
        }
        let question_end = at + 5;
        if question_end > n {
            continue;
        }
        let qtype = u16::from_be_bytes([query[at + 1], query[at + 2]]);
        let name = labels.join(".");
        queries.lock().unwrap().push(name.clone());
        let is_known = known.contains(&name.as_str());
        let answer_a = is_known && qtype == 1;
        let mut reply = Vec::with_capacity(question_end + 16);
        reply.extend_from_slice(&query[..2]);
        let flags: u16 = 0x8180 | if is_known { 0 } else { 3 };
        reply.extend_from_slice(&flags.to_be_bytes());
        reply.extend_from_slice(&1u16.to_be_bytes());
        reply.extend_from_slice(&u16::from(answer_a).to_be_bytes());
        reply.extend_from_slice(&[0, 0, 0, 0]);
        reply.extend_from_slice(&query[12..question_end]);
        if answer_a {
            reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 127, 0, 0, 1]);
        }
        let _ = socket.send_to(&reply, peer);
    }
}

fn serve_http(listener: &TcpListener, hosts: &Mutex<Vec<String>>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut stream, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&head);
        if let Some(host) = text.lines().find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("host"))
                .map(|(_, v)| v.trim().to_owned())
        }) {
            hosts.lock().unwrap().push(host);
        }
        let _ = stream.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n");
    }
}

/// A detached container, removed on drop.
struct Running(String);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "--force", "--time", "0", &self.0])
            .output();
    }
}

#[test]
fn image_binaries_resolve_names_by_dns_and_hosts_file() {
    static KNOWN: [&str; 2] = ["ctl-dns.podid.test", "tokend-dns.podid.test"];
    let image = image();
    let world = NameWorld::start(&KNOWN);
    let dir = tempfile::tempdir().unwrap();
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    // (binary and its arguments, the API server's name, resolved through DNS or /etc/hosts)
    let cases: [(&[&str], &str, bool); 4] = [
        (
            &["podid-controller", "--holder-identity=a"],
            "ctl-dns.podid.test",
            true,
        ),
        (
            &["podid-controller", "--holder-identity=a"],
            "ctl-hosts.podid.test",
            false,
        ),
        (
            &[
                "podid-tokend",
                "--node-name=n1",
                "--state-dir=/tmp/state",
                "--socket=/tmp/tokend.sock",
            ],
            "tokend-dns.podid.test",
            true,
        ),
        (
            &[
                "podid-tokend",
                "--node-name=n1",
                "--state-dir=/tmp/state",
                "--socket=/tmp/tokend.sock",
            ],
            "tokend-hosts.podid.test",
            false,
        ),
    ];
    for (command, host, by_dns) in cases {
        let kubeconfig = dir.path().join(format!("{host}.kubeconfig"));
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": format!("http://{host}:{}", world.port)}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        });
        std::fs::write(&kubeconfig, config.to_string()).unwrap();
        let name = format!(
            "podid-conf-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let network = format!("ns:{}", world.netns.path().display());
        let volume = format!("{}:/kubeconfig:ro", kubeconfig.display());
        let add_host = format!("{host}:127.0.0.1");
        let mut args: Vec<&str> = vec![
            "--detach",
            "--name",
            name.as_str(),
            "--network",
            network.as_str(),
            "--dns",
            "127.0.0.1",
            "--volume",
            volume.as_str(),
        ];
        if !by_dns {
            args.extend(["--add-host", add_host.as_str()]);
        }
        args.push(&image.name);
        args.extend_from_slice(command);
        args.extend(["--kubeconfig", "/kubeconfig"]);
        let out = podman_run(&args);
        let running = Running(name);
        assert!(out.status.success(), "{host}: {}", output_text(&out));
        let reached = world.wait_for_host(host, Duration::from_secs(15));
        let logs = Command::new("podman")
            .args(["logs", &running.0])
            .output()
            .unwrap();
        drop(running);
        assert!(
            reached,
            "{} never reached the API server at {host}: {}",
            command[0],
            output_text(&logs)
        );
        let asked_dns = world.queries.lock().unwrap().iter().any(|q| q == host);
        assert_eq!(
            asked_dns, by_dns,
            "{host}: names in /etc/hosts are found there first, others by DNS"
        );
    }
}
