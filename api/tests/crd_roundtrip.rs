//! aad-pod-identity manifests, in the shapes its documentation gives and as the AKS add-on
//! writes them, deserialize into podid's types and serialize back with every field kept.

use std::path::Path;

use podid_api::crd::{
    AzureIdentity, AzureIdentityBinding, AzurePodIdentityException, IdentityKind,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/aad-pod-identity")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Parses `name` as `K`, and checks that serializing it gives back exactly the manifest.
fn round_trip<K: DeserializeOwned + Serialize>(name: &str) -> K {
    let yaml = fixture(name);
    let object: K = serde_saphyr::from_str(&yaml).unwrap_or_else(|e| panic!("{name}: {e}"));
    let written: Value = serde_saphyr::from_str(&yaml).unwrap();
    let back = serde_json::to_value(&object).unwrap();
    assert_eq!(back, written, "{name} does not round-trip");
    object
}

#[test]
fn user_assigned_identity() {
    let id: AzureIdentity = round_trip("user-assigned-identity.yaml");
    assert_eq!(id.spec.type_.kind(), Some(IdentityKind::UserAssignedMsi));
    assert_eq!(
        id.spec.client_id.as_deref(),
        Some("11111111-1111-1111-1111-111111111111")
    );
    assert!(
        id.spec
            .resource_id
            .as_deref()
            .unwrap()
            .ends_with("/userAssignedIdentities/demo-identity")
    );
    assert!(!id.forces_namespaced());
}

#[test]
fn service_principal_with_secret() {
    let id: AzureIdentity = round_trip("service-principal-secret.yaml");
    assert_eq!(id.spec.type_.kind(), Some(IdentityKind::ServicePrincipal));
    let secret = id.spec.client_password.unwrap();
    assert_eq!(
        (secret.name.as_deref(), secret.namespace.as_deref()),
        (Some("sp-secret"), Some("apps"))
    );
    assert_eq!(id.spec.auxiliary_tenant_ids.unwrap().len(), 1);
    assert_eq!(
        id.spec.ad_endpoint.as_deref(),
        Some("https://login.microsoftonline.com/")
    );
}

#[test]
fn service_principal_with_certificate() {
    let id: AzureIdentity = round_trip("service-principal-certificate.yaml");
    assert_eq!(
        id.spec.type_.kind(),
        Some(IdentityKind::ServicePrincipalCertificate)
    );
    assert_eq!(
        id.spec.tenant_id.as_deref(),
        Some("22222222-2222-2222-2222-222222222222")
    );
}

#[test]
fn federated_identity() {
    let id: AzureIdentity = round_trip("federated-identity.yaml");
    assert_eq!(id.spec.type_.kind(), Some(IdentityKind::Federated));
}

#[test]
fn binding_with_weight() {
    let binding: AzureIdentityBinding = round_trip("binding-with-weight.yaml");
    assert_eq!(
        binding.spec.azure_identity.as_deref(),
        Some("demo-identity")
    );
    assert_eq!(binding.spec.selector.as_deref(), Some("demo"));
    assert_eq!(binding.spec.weight, Some(10));
}

#[test]
fn exception() {
    let exception: AzurePodIdentityException = round_trip("exception.yaml");
    assert_eq!(
        exception.spec.pod_labels.get("app").map(String::as_str),
        Some("mic")
    );
    assert_eq!(exception.spec.pod_labels.len(), 2);
}

#[test]
fn seeds_aks_add_on_example() {
    let id: AzureIdentity = round_trip("seeds-rgapi-identity.yaml");
    assert_eq!(id.metadata.namespace.as_deref(), Some("rgapi"));
    assert!(
        id.forces_namespaced(),
        "the add-on's identities are namespaced"
    );
    let binding: AzureIdentityBinding = round_trip("seeds-rgapi-binding.yaml");
    assert_eq!(binding.spec.selector.as_deref(), Some("rgapi"));
    assert_eq!(
        binding.spec.azure_identity.as_deref(),
        id.metadata.name.as_deref()
    );
    assert_eq!(
        binding.spec.weight, None,
        "a weight the user did not write is not invented"
    );
}

#[test]
fn capitalised_keys_of_old_docs_are_not_supported() {
    // aad-pod-identity's own v1 CRDs pruned `ResourceID:`/`ClientID:` too; podid does not read them.
    let yaml = "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata: {name: old}\nspec: {type: 0, ClientID: abc}\n";
    let id: AzureIdentity = serde_saphyr::from_str(yaml).unwrap();
    assert_eq!(id.spec.client_id, None);
}
