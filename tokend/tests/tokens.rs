//! The identity half end to end: the real podid-tokend in a node netns, pods in netns of
//! their own registered over the unix socket, their Pods, AzureIdentities, bindings and
//! assignments in a fake API server, and tokens from a mock Entra ID (HTTPS, test CA) and a
//! mock node IMDS. Every request goes from inside a pod netns to its listener.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use podid_api::crd::AzureIdentityBinding;
use podid_tests::fakeapi::ISSUER;
use podid_tests::mocks::entra::{App, CredentialKind, EntraOutcome, FederatedCredential};
use podid_tests::mocks::imds::{ImdsOutcome, ImdsRoute, ManagedIdentity, Selector as ImdsSelector};
use podid_tests::mocks::tls::ClientCertificate;
use podid_tests::mocks::{Fault, FaultTarget};
use serde_json::Value;
use sha2::{Digest, Sha256};
use support::{
    Netns, Node, PORT, Response, Tokend, binding, eventually, exception, federated, identity,
    msi_resource_id, pod_record, root, secret, service_principal,
};

const ARM: &str = "https://management.azure.com/";
const METADATA: &[(&str, &str)] = &[("Metadata", "true")];
const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

fn encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// `GET /metadata/identity/oauth2/token` for `resource`, plus `extra` query parameters.
fn token(pod: &Netns, resource: &str, extra: &str) -> Response {
    let mut target = format!(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource={}",
        encode(resource)
    );
    if !extra.is_empty() {
        target.push('&');
        target.push_str(extra);
    }
    pod.get(PORT, &target, METADATA).unwrap()
}

/// Starts tokend on `node` and waits until its Kubernetes watches have listed.
fn start(node: &Node, extra: &[&str]) -> Tokend {
    let tokend = node.start(extra);
    eventually("tokend ready (watches listed)", || {
        node.health("/readyz").status == 200
    });
    tokend
}

/// A pod of `namespace` labelled `label`, in a netns of its own registered with tokend.
fn pod(
    node: &Node,
    tokend: &Tokend,
    namespace: &str,
    name: &str,
    label: Option<&str>,
    labels: &[(&str, &str)],
) -> (Pod, Netns) {
    let pod = node.pod(namespace, name, label, labels);
    let netns = Netns::new();
    let put = tokend.put(&pod_record(&pod, &format!("c-{name}"), &netns));
    assert_eq!(put.status, 200, "{}", put.body);
    (pod, netns)
}

/// Asserts a success answer: IMDS's all-string body in order, for `client_id` and
/// `resource`, expiring with the token; returns the access token.
fn assert_token(answer: &Response, client_id: &str, resource: &str) -> String {
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.header("content-type").as_deref(),
        Some("application/json; charset=utf-8")
    );
    let body = answer.json();
    let object = body.as_object().unwrap();
    let keys: Vec<&str> = object.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "access_token",
            "client_id",
            "expires_in",
            "expires_on",
            "ext_expires_in",
            "not_before",
            "refresh_token",
            "resource",
            "token_type"
        ]
    );
    assert!(object.values().all(Value::is_string), "{body}");
    assert_eq!(body["client_id"], client_id);
    assert_eq!(body["resource"], resource);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["refresh_token"], "");
    let number = |key: &str| body[key].as_str().unwrap().parse::<i64>().unwrap();
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    assert!(
        (number("expires_on") - now - number("expires_in")).abs() <= 2,
        "{body}"
    );
    assert!(number("expires_in") > 300, "{body}");
    assert!(number("not_before") <= now + 1, "{body}");
    let access_token = body["access_token"].as_str().unwrap().to_owned();
    // The real token: its `exp` is the answer's expiry.
    let claims = podid_tests::fakeapi::decode_claims(&access_token).unwrap();
    assert_eq!(claims["exp"].as_i64().unwrap(), number("expires_on"));
    access_token
}

fn assert_error(answer: &Response, status: u16, error: &str) {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(answer.json()["error"], error, "{}", answer.body);
    assert!(
        !answer.body.to_ascii_lowercase().contains("unreachable"),
        "{}",
        answer.body
    );
}

/// Waits until tokend holds every AzureIdentity, binding and exception the API server has:
/// tokend answers "Identity not found" at once for a label no binding it knows has, so a
/// test must not ask before its watches caught up with the configuration it just wrote.
fn settle(node: &Node) {
    use kube::api::{Api, ListParams};
    use podid_api::crd::{AzureIdentity, AzurePodIdentityException};
    let client = node.client();
    let count = |n: usize| n as f64;
    let (identities, bindings, exceptions) = node.rt.block_on(async {
        let lp = ListParams::default();
        (
            Api::<AzureIdentity>::all(client.clone())
                .list(&lp)
                .await
                .unwrap()
                .items
                .len(),
            Api::<AzureIdentityBinding>::all(client.clone())
                .list(&lp)
                .await
                .unwrap()
                .items
                .len(),
            Api::<AzurePodIdentityException>::all(client)
                .list(&lp)
                .await
                .unwrap()
                .items
                .len(),
        )
    });
    eventually("tokend's watches caught up with the configuration", || {
        node.metric("podid_tokend_kube_objects{resource=\"azureidentities\"}") == count(identities)
            && node.metric("podid_tokend_kube_objects{resource=\"azureidentitybindings\"}")
                == count(bindings)
            && node.metric("podid_tokend_kube_objects{resource=\"azurepodidentityexceptions\"}")
                == count(exceptions)
    });
}

fn imds_token_requests(node: &Node) -> usize {
    node.cloud()
        .imds
        .log()
        .iter()
        .filter(|r| r.route == ImdsRoute::Token)
        .count()
}

fn sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Identity `ns/msi` of type 0, attached to the node VM, bound by selector `web`.
fn user_assigned(node: &Node, namespace: &str) -> (ManagedIdentity, AzureIdentityBinding) {
    let msi = ManagedIdentity::new(
        "6c2d4f0e-1b3a-4c5d-8e9f-0a1b2c3d4e5f",
        "0b7e3d2c-9f8a-4b6c-a5d4-e3f2a1b0c9d8",
        &msi_resource_id("msi"),
    );
    node.cloud().imds.attach(msi.clone());
    node.create(&identity(namespace, "msi", 0, &msi.client_id));
    let b = node.create(&binding(namespace, "msi-binding", "msi", "web", None));
    settle(node);
    (msi, b)
}

#[test]
fn type_0_tokens_come_from_the_node_imds_by_every_selector() {
    if !root() {
        return;
    }
    let node = Node::with_cloud();
    let tokend = start(&node, &[]);
    let (msi, b) = user_assigned(&node, "apps");
    let id = identity("apps", "msi", 0, &msi.client_id);
    let (web, web_ns) = pod(&node, &tokend, "apps", "web", Some("web"), &[]);
    node.assign(&web, &id, &b);

    let first = token(&web_ns, ARM, "");
    let access = assert_token(&first, &msi.client_id, ARM);
    let log = node.cloud().imds.log();
    let call = log.iter().find(|r| r.route == ImdsRoute::Token).unwrap();
    assert_eq!(call.resource.as_deref(), Some(ARM));
    assert_eq!(call.api_version.as_deref(), Some("2018-02-01"));
    assert_eq!(
        call.selector,
        Some(ImdsSelector::ClientId(msi.client_id.clone()))
    );
    assert_eq!(imds_token_requests(&node), 1);

    // Cached: every spelling of the identity's ids, ids in any case, resource ids trimmed;
    // the object id was learned from the first token's `oid`.
    for selector in [
        format!("client_id={}", msi.client_id.to_uppercase()),
        format!("msi_res_id={}", encode(&msi.resource_id)),
        format!("mi_res_id={}", encode(&msi.resource_id.to_uppercase())),
        format!("resource_id={}", encode(&format!(" {} ", msi.resource_id))),
        format!("object_id={}", msi.object_id),
        format!("principal_id={}", msi.object_id.to_uppercase()),
    ] {
        let again = token(&web_ns, ARM, &selector);
        assert_eq!(
            assert_token(&again, &msi.client_id, ARM),
            access,
            "{selector}"
        );
    }
    assert_eq!(imds_token_requests(&node), 1, "served from the cache");

    // bypass_cache and a matching token_sha256_to_refresh force a call; others do not.
    let fresh = token(&web_ns, ARM, "bypass_cache=true");
    assert_token(&fresh, &msi.client_id, ARM);
    assert_eq!(imds_token_requests(&node), 2);
    let second = node
        .cloud()
        .imds
        .log()
        .into_iter()
        .filter(|r| r.route == ImdsRoute::Token)
        .nth(1)
        .unwrap();
    assert_eq!(
        second.outcome,
        ImdsOutcome::Issued { cached: false },
        "IMDS was told to bypass its cache too"
    );
    let current = token(&web_ns, ARM, "").json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    token(
        &web_ns,
        ARM,
        &format!("token_sha256_to_refresh={}", sha256_hex("other")),
    );
    assert_eq!(imds_token_requests(&node), 2);
    token(
        &web_ns,
        ARM,
        &format!("token_sha256_to_refresh={}", sha256_hex(&current)),
    );
    assert_eq!(imds_token_requests(&node), 3);

    // Another resource is another token, echoed verbatim.
    let vault = token(&web_ns, "https://vault.azure.net", "");
    assert_token(&vault, &msi.client_id, "https://vault.azure.net");
    assert_eq!(imds_token_requests(&node), 4);

    // Ids the pod does not have, and two selectors.
    for selector in [
        "client_id=00000000-0000-0000-0000-000000000000".to_owned(),
        format!("object_id={}", msi.client_id),
        format!("msi_res_id={}", encode(&msi_resource_id("other"))),
    ] {
        let refused = token(&web_ns, ARM, &selector);
        assert_error(&refused, 400, "invalid_request");
        assert_eq!(refused.json()["error_description"], "Identity not found");
    }
    let two = token(
        &web_ns,
        ARM,
        &format!("client_id={}&object_id={}", msi.client_id, msi.object_id),
    );
    assert_error(&two, 400, "invalid_request");

    // Pod B, without the label, asks for pod A's identity by client id: never.
    let (_, other_ns) = pod(&node, &tokend, "apps", "other", None, &[]);
    let stolen = token(&other_ns, ARM, &format!("client_id={}", msi.client_id));
    assert_error(&stolen, 400, "invalid_request");
    assert_eq!(stolen.json()["error_description"], "Identity not found");
    // A pod of another namespace with the same label: not in reach of the binding.
    let (_, far_ns) = pod(&node, &tokend, "elsewhere", "far", Some("web"), &[]);
    let far = token(&far_ns, ARM, "");
    assert_eq!(far.json()["error_description"], "Identity not found");
    assert_eq!(imds_token_requests(&node), 4);

    assert_eq!(
        node.metric("podid_tokend_upstream_calls_total{type=\"0\"}"),
        4.0
    );
    assert!(node.metric("podid_tokend_token_cache_lookups_total{result=\"hit\"}") >= 7.0);
    let log = tokend.log();
    assert!(log.contains("matched pod with identity"), "{log}");
    assert!(!log.contains(&access), "tokens are never logged");
}

#[test]
fn type_1_client_secret_and_upstream_errors() {
    if !root() {
        return;
    }
    let node = Node::with_cloud();
    let entra = &node.cloud().entra;
    let client_id = "3f1e2d4c-5b6a-4798-8a9b-0c1d2e3f4a5b";
    entra
        .register(App::new(TENANT, client_id).secret("first-secret"))
        .unwrap();
    let tokend = start(&node, &[]);
    node.create(&secret(
        "apps",
        "sp-secret",
        &[("clientSecret", b"first-secret")],
    ));
    let id = node.create(&service_principal(
        "apps",
        "sp",
        1,
        TENANT,
        client_id,
        "sp-secret",
    ));
    let b = node.create(&binding("apps", "sp-binding", "sp", "api", None));
    settle(&node);
    let (api, api_ns) = pod(&node, &tokend, "apps", "api", Some("api"), &[]);
    node.assign(&api, &id, &b);

    let answer = token(&api_ns, ARM, "");
    let access = assert_token(&answer, client_id, ARM);
    let calls = entra.requests_for(client_id);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].credential, CredentialKind::Secret);
    assert_eq!(calls[0].tenant.as_deref(), Some(TENANT));
    assert_eq!(
        calls[0].scope.as_deref(),
        Some("https://management.azure.com//.default"),
        "scope = resource + /.default, no trimming"
    );
    assert_eq!(
        assert_token(&token(&api_ns, ARM, ""), client_id, ARM),
        access
    );
    assert_eq!(entra.requests_for(client_id).len(), 1, "cached");

    // A resource Entra does not know: 400 invalid_resource with the AADSTS text.
    let unknown = token(&api_ns, "https://unknown.example.com", "");
    assert_error(&unknown, 400, "invalid_resource");
    assert!(
        unknown.json()["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS500011"),
        "{}",
        unknown.body
    );

    // Throttled: 429 with Entra's Retry-After, at once (no retry of a 429).
    entra.inject(
        FaultTarget::Client(client_id.into()),
        Fault::throttled(7),
        1,
    );
    let throttled = token(&api_ns, ARM, "bypass_cache=true");
    assert_error(&throttled, 429, "too_many_requests");
    assert_eq!(throttled.header("retry-after").as_deref(), Some("7"));

    // An outage: two bounded retries, then 500 server_error.
    let before = entra.requests_for(client_id).len();
    entra.inject(FaultTarget::Client(client_id.into()), Fault::status(503), 3);
    let down = token(&api_ns, ARM, "bypass_cache=true");
    assert_error(&down, 500, "server_error");
    assert_eq!(
        down.json()["error_description"],
        "Failed to retrieve token from the Active directory"
    );
    assert_eq!(entra.requests_for(client_id).len(), before + 3);

    // A rotated secret: the new Secret value is read on the next upstream call.
    entra.add_secret(client_id, "second-secret").unwrap();
    entra.revoke_secret(client_id, "first-secret");
    let revoked = token(&api_ns, ARM, "bypass_cache=true");
    assert_error(&revoked, 403, "forbidden");
    assert!(
        revoked.json()["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS7000215"),
        "{}",
        revoked.body
    );
    node.delete::<k8s_openapi::api::core::v1::Secret>("apps", "sp-secret");
    node.create(&secret(
        "apps",
        "sp-secret",
        &[("clientSecret", b"second-secret")],
    ));
    assert_token(&token(&api_ns, ARM, "bypass_cache=true"), client_id, ARM);

    // The Secret gone: 403 naming it, and a log line naming it, never its value.
    node.delete::<k8s_openapi::api::core::v1::Secret>("apps", "sp-secret");
    let missing = token(&api_ns, ARM, "bypass_cache=true");
    assert_error(&missing, 403, "forbidden");
    let description = missing.json()["error_description"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        description.contains("Secret apps/sp-secret does not exist"),
        "{description}"
    );
    let log = tokend.log();
    assert!(
        log.contains("Secret apps/sp-secret does not exist"),
        "{log}"
    );
    for secret in ["first-secret", "second-secret", access.as_str()] {
        assert!(!log.contains(secret), "the log shows a secret or token");
    }
    assert!(
        node.metric("podid_tokend_upstream_errors_total{type=\"1\",reason=\"forbidden\"}") >= 2.0
    );

    // Never another namespace's Secret, never a credential sent to a host of the identity's
    // writer's choosing.
    node.create(&secret(
        "victims",
        "their-secret",
        &[("clientSecret", b"first-secret")],
    ));
    let mut borrowed = service_principal("apps", "borrowed", 1, TENANT, client_id, "their-secret");
    borrowed.spec.client_password.as_mut().unwrap().namespace = Some("victims".into());
    let mut exfiltrating = service_principal("apps", "exfil", 1, TENANT, client_id, "sp-secret");
    exfiltrating.spec.ad_endpoint = Some("https://attacker.example/".into());
    for (identity, label, expected) in [
        (borrowed, "borrowed", "of another namespace"),
        (
            exfiltrating,
            "exfil",
            "is neither an Azure cloud's authority host nor --authority-host",
        ),
    ] {
        let name = identity.metadata.name.clone().unwrap();
        let id = node.create(&identity);
        let b = node.create(&binding(
            "apps",
            &format!("{name}-binding"),
            &name,
            label,
            None,
        ));
        settle(&node);
        let (p, p_ns) = pod(&node, &tokend, "apps", label, Some(label), &[]);
        node.assign(&p, &id, &b);
        let refused = token(&p_ns, ARM, "");
        assert_error(&refused, 403, "forbidden");
        assert!(refused.body.contains(expected), "{}", refused.body);
    }
}

#[test]
fn type_2_client_certificate() {
    if !root() {
        return;
    }
    let node = Node::with_cloud();
    let entra = &node.cloud().entra;
    let client_id = "8a7b6c5d-4e3f-4a1b-9c8d-7e6f5a4b3c2d";
    let certificate = ClientCertificate::generate("CN=podid-test-app").unwrap();
    entra
        .register(App::new(TENANT, client_id).certificate(certificate.cert_der()))
        .unwrap();
    let tokend = start(&node, &[]);
    let pkcs12 = certificate.pkcs12("p12-password").unwrap();
    node.create(&secret(
        "apps",
        "sp-cert",
        &[("certificate", &pkcs12), ("password", b"p12-password")],
    ));
    let id = node.create(&service_principal(
        "apps", "cert", 2, TENANT, client_id, "sp-cert",
    ));
    let b = node.create(&binding("apps", "cert-binding", "cert", "certs", None));
    settle(&node);
    let (p, p_ns) = pod(&node, &tokend, "apps", "certs", Some("certs"), &[]);
    node.assign(&p, &id, &b);
    assert_token(
        &token(&p_ns, "https://vault.azure.net", ""),
        client_id,
        "https://vault.azure.net",
    );
    let calls = entra.requests_for(client_id);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].credential, CredentialKind::Certificate);
    assert!(matches!(calls[0].outcome, EntraOutcome::Issued { .. }));

    // A Secret whose certificate is not a PKCS#12: 403 naming the Secret.
    node.create(&secret(
        "apps",
        "bad-cert",
        &[("certificate", b"not a pkcs12"), ("password", b"x")],
    ));
    let bad = node.create(&service_principal(
        "apps", "bad", 2, TENANT, client_id, "bad-cert",
    ));
    let bb = node.create(&binding("apps", "bad-binding", "bad", "bad", None));
    settle(&node);
    let (q, q_ns) = pod(&node, &tokend, "apps", "bad", Some("bad"), &[]);
    node.assign(&q, &bad, &bb);
    let refused = token(&q_ns, ARM, "");
    assert_error(&refused, 403, "forbidden");
    assert!(refused.body.contains("apps/bad-cert"), "{}", refused.body);
    assert_eq!(
        entra.requests_for(client_id).len(),
        1,
        "no call with an unusable certificate"
    );
    assert!(!tokend.log().contains("p12-password"));
}

#[test]
fn type_3_federated_with_a_pod_bound_service_account_token() {
    if !root() {
        return;
    }
    let node = Node::with_cloud();
    let entra = &node.cloud().entra;
    let client_id = "1d2c3b4a-5f6e-4d7c-8b9a-0f1e2d3c4b5a";
    entra
        .register(
            App::new(TENANT, client_id).federated(FederatedCredential::service_account(
                ISSUER, "apps", "default",
            )),
        )
        .unwrap();
    let tokend = start(&node, &[]);
    node.service_account("apps", "default");
    let id = node.create(&federated("apps", "fed", TENANT, client_id));
    let b = node.create(&binding("apps", "fed-binding", "fed", "fed", None));
    settle(&node);
    let (one, one_ns) = pod(&node, &tokend, "apps", "one", Some("fed"), &[]);
    let (two, two_ns) = pod(&node, &tokend, "apps", "two", Some("fed"), &[]);
    node.assign(&one, &id, &b);
    node.assign(&two, &id, &b);
    assert_token(&token(&one_ns, ARM, ""), client_id, ARM);
    assert_token(&token(&one_ns, ARM, ""), client_id, ARM);
    let calls = entra.requests_for(client_id);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].credential, CredentialKind::Federated);
    // The assertion is bound to the pod: another pod's token is its own call.
    assert_token(&token(&two_ns, ARM, ""), client_id, ARM);
    assert_eq!(entra.requests_for(client_id).len(), 2);
    assert_eq!(
        node.metric("podid_tokend_upstream_calls_total{type=\"3\"}"),
        2.0
    );
}

#[test]
fn exception_pods_get_the_node_identity() {
    if !root() {
        return;
    }
    let node = Node::with_cloud();
    let tokend = start(&node, &[]);
    node.create(&exception("kube-system", "csi", &[("app", "csi-driver")]));
    settle(&node);
    let (_, csi_ns) = pod(
        &node,
        &tokend,
        "kube-system",
        "csi",
        None,
        &[("app", "csi-driver")],
    );
    let answer = token(&csi_ns, ARM, "");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["client_id"], node.cloud().system.client_id);
    let call = node
        .cloud()
        .imds
        .log()
        .into_iter()
        .find(|r| r.route == ImdsRoute::Token)
        .unwrap();
    assert_eq!(call.selector, None);
    // Its selector goes along; IMDS's own answer comes back.
    let unknown = token(
        &csi_ns,
        ARM,
        "client_id=00000000-0000-0000-0000-000000000001",
    );
    assert_eq!(unknown.status, 400, "{}", unknown.body);
    // The same labels in another namespace: no exception there.
    let (_, plain_ns) = pod(
        &node,
        &tokend,
        "apps",
        "csi",
        None,
        &[("app", "csi-driver")],
    );
    assert_eq!(
        token(&plain_ns, ARM, "").json()["error_description"],
        "Identity not found"
    );
    assert_eq!(
        node.metric("podid_tokend_upstream_calls_total{type=\"node\"}"),
        2.0
    );
}

#[test]
fn an_assignment_that_appears_during_the_wait_is_served() {
    if !root() {
        return;
    }
    let node = Node::with_cloud();
    let tokend = start(&node, &["--assignment-wait", "30s"]);
    let (msi, b) = user_assigned(&node, "apps");
    let id = identity("apps", "msi", 0, &msi.client_id);
    let (web, web_ns) = pod(&node, &tokend, "apps", "web", Some("web"), &[]);
    std::thread::scope(|scope| {
        let request = scope.spawn(|| {
            let started = Instant::now();
            (token(&web_ns, ARM, ""), started.elapsed())
        });
        eventually("the request waiting for its assignment", || {
            tokend
                .log()
                .contains("waiting for the identity's assignment")
        });
        node.assign(&web, &id, &b);
        let (answer, took) = request.join().unwrap();
        assert_token(&answer, &msi.client_id, ARM);
        assert!(
            took < Duration::from_secs(30),
            "served when the assignment came: {took:?}"
        );
    });
    assert_eq!(
        node.metric("podid_tokend_waits_total{kind=\"assignment\",result=\"settled\"}"),
        1.0
    );
}

#[test]
fn waits_end_in_404_with_retry_after_and_unknown_identities_in_400_at_once() {
    if !root() {
        return;
    }
    let node = Node::with_cloud();
    let tokend = start(&node, &["--assignment-wait", "1s", "--pod-wait", "1s"]);
    let (msi, _) = user_assigned(&node, "apps");

    // Bound by its label, never assigned: 404 with Retry-After after the wait, even for its
    // identity's client id; never "Identity not found".
    let (_, waiting_ns) = pod(&node, &tokend, "apps", "waiting", Some("web"), &[]);
    for selector in [String::new(), format!("client_id={}", msi.client_id)] {
        let started = Instant::now();
        let answer = token(&waiting_ns, ARM, &selector);
        assert_error(&answer, 404, "not_found");
        assert_eq!(answer.header("retry-after").as_deref(), Some("5"));
        assert!(!answer.body.contains("Identity not found"));
        assert!(started.elapsed() >= Duration::from_millis(900));
    }
    // A client id no current or coming identity has: 400 at once.
    let started = Instant::now();
    let other = token(
        &waiting_ns,
        ARM,
        "client_id=00000000-0000-0000-0000-000000000000",
    );
    assert_eq!(other.json()["error_description"], "Identity not found");
    assert!(started.elapsed() < Duration::from_millis(900));

    // No label, and a label no binding has: 400 at once.
    for (name, label) in [("bare", None), ("unbound", Some("nothing"))] {
        let (_, ns) = pod(&node, &tokend, "apps", name, label, &[]);
        let started = Instant::now();
        let answer = token(&ns, ARM, "");
        assert_error(&answer, 400, "invalid_request");
        assert_eq!(answer.json()["error_description"], "Identity not found");
        assert!(started.elapsed() < Duration::from_millis(900), "{name}");
    }

    // A record naming a pod the API server does not have: 404 after --pod-wait.
    let ghost_ns = Netns::new();
    let mut ghost = support::record("c-ghost", "eth0", &ghost_ns);
    ghost.pod_namespace = Some("apps".into());
    ghost.pod_name = Some("ghost".into());
    ghost.pod_uid = Some("2b0e1c6a-0000-4000-8000-000000000000".into());
    assert_eq!(tokend.put(&ghost).status, 200);
    let answer = token(&ghost_ns, ARM, "");
    assert_error(&answer, 404, "not_found");
    assert_eq!(answer.header("retry-after").as_deref(), Some("5"));
    assert!(node.metric("podid_tokend_waits_total{kind=\"assignment\",result=\"timeout\"}") >= 2.0);
    assert_eq!(
        node.metric("podid_tokend_waits_total{kind=\"pod\",result=\"timeout\"}"),
        1.0
    );
    assert_eq!(imds_token_requests(&node), 0);
}

#[test]
fn a_recreated_pod_never_inherits_the_old_assignment() {
    if !root() {
        return;
    }
    let node = Node::with_cloud();
    let tokend = start(&node, &["--assignment-wait", "1s"]);
    let (msi, b) = user_assigned(&node, "apps");
    let id = identity("apps", "msi", 0, &msi.client_id);
    let (old, old_ns) = pod(&node, &tokend, "apps", "web", Some("web"), &[]);
    node.assign(&old, &id, &b);
    assert_token(&token(&old_ns, ARM, ""), &msi.client_id, ARM);
    // The pod is deleted and a new one takes its name; the old assignment is still there.
    node.delete::<Pod>("apps", "web");
    let (new, new_ns) = pod(&node, &tokend, "apps", "web", Some("web"), &[]);
    assert_ne!(new.metadata.uid, old.metadata.uid);
    let answer = token(&new_ns, ARM, "");
    assert_error(&answer, 404, "not_found");
    let stale = token(&new_ns, ARM, &format!("client_id={}", msi.client_id));
    assert_error(&stale, 404, "not_found");
    // Its own assignment serves it.
    node.assign(&new, &id, &b);
    assert_token(&token(&new_ns, ARM, ""), &msi.client_id, ARM);
}

#[test]
fn twenty_concurrent_misses_make_one_upstream_call() {
    if !root() {
        return;
    }
    let node = Node::with_cloud();
    let entra = &node.cloud().entra;
    let client_id = "5e4d3c2b-1a0f-4e9d-8c7b-6a5f4e3d2c1b";
    entra
        .register(App::new(TENANT, client_id).secret("s"))
        .unwrap();
    let tokend = start(&node, &["--pod-inflight", "32"]);
    node.create(&secret("apps", "s", &[("value", b"s")]));
    let id = node.create(&service_principal("apps", "sp", 1, TENANT, client_id, "s"));
    let b = node.create(&binding("apps", "b", "sp", "many", None));
    settle(&node);
    let (p, p_ns) = pod(&node, &tokend, "apps", "many", Some("many"), &[]);
    node.assign(&p, &id, &b);
    // A slow Entra: every request arrives while the first call is in progress.
    entra.inject(
        FaultTarget::Client(client_id.into()),
        Fault::Delay(Duration::from_millis(1500)),
        1,
    );
    let answers: Vec<Response> = std::thread::scope(|scope| {
        let requests: Vec<_> = (0..20)
            .map(|_| scope.spawn(|| token(&p_ns, ARM, "")))
            .collect();
        requests.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let tokens: BTreeMap<String, usize> = answers.iter().fold(BTreeMap::new(), |mut seen, a| {
        *seen.entry(assert_token(a, client_id, ARM)).or_default() += 1;
        seen
    });
    assert_eq!(tokens.len(), 1, "one token for all");
    assert_eq!(entra.requests_for(client_id).len(), 1);
    assert_eq!(
        node.metric("podid_tokend_token_cache_lookups_total{result=\"miss\"}"),
        1.0
    );
}

#[test]
fn a_noisy_pod_is_limited_alone() {
    if !root() {
        return;
    }
    let node = Node::with_cloud();
    let tokend = start(&node, &["--pod-rps", "1", "--pod-burst", "3"]);
    let noisy = Netns::new();
    let quiet = Netns::new();
    assert_eq!(
        tokend.put(&support::record("noisy", "eth0", &noisy)).status,
        200
    );
    assert_eq!(
        tokend.put(&support::record("quiet", "eth0", &quiet)).status,
        200
    );
    let statuses: Vec<u16> = (0..3).map(|_| token(&noisy, ARM, "").status).collect();
    assert_eq!(statuses, [400, 400, 400]);
    let limited = token(&noisy, ARM, "");
    assert_error(&limited, 429, "too_many_requests");
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    assert_eq!(
        token(&quiet, ARM, "").status,
        400,
        "another pod is not limited"
    );
    assert!(node.metric("podid_tokend_rate_limited_total{reason=\"rate\"}") >= 1.0);
    // A header-less probe never counts against the pod and is answered at once.
    let probe = noisy
        .get(PORT, "/metadata/identity/oauth2/token", &[])
        .unwrap();
    assert_eq!(probe.status, 400);
}

#[test]
fn instance_metadata_is_proxied_blocked_or_denied() {
    if !root() {
        return;
    }
    let node = Node::with_cloud();
    let pod = Netns::new();
    let instance = "/metadata/instance/compute?api-version=2021-02-01";
    let mut tokend = start(&node, &[]);
    assert_eq!(tokend.put(&support::record("i1", "eth0", &pod)).status, 200);
    let proxied = pod.get(PORT, instance, METADATA).unwrap();
    assert_eq!(proxied.status, 200, "{}", proxied.body);
    assert_eq!(
        proxied.json()["name"],
        node.cloud().imds.instance().name,
        "the node IMDS's document"
    );
    let versions = pod.get(PORT, "/metadata/versions", METADATA).unwrap();
    assert_eq!(versions.status, 200, "{}", versions.body);
    assert_eq!(
        pod.get(PORT, instance, &[]).unwrap().status,
        400,
        "header first"
    );
    let escape = pod
        .get(
            PORT,
            "/metadata/instance/../identity/oauth2/token?api-version=2018-02-01&resource=x",
            METADATA,
        )
        .unwrap();
    assert_eq!(escape.status, 404, "no way out of instance metadata");
    assert_eq!(tokend.terminate().code(), Some(0));

    let mut blocked = start(&node, &["--instance-metadata", "block"]);
    let answer = pod.get(PORT, instance, METADATA).unwrap();
    assert_error(&answer, 403, "forbidden");
    assert_eq!(
        answer.json()["error_description"],
        "Request blocked by podid-tokend"
    );
    assert_eq!(blocked.terminate().code(), Some(0));

    let _denied = start(&node, &["--instance-metadata", "deny"]);
    assert_error(
        &pod.get(PORT, instance, METADATA).unwrap(),
        404,
        "not_found",
    );
    assert_eq!(
        node.cloud()
            .imds
            .log()
            .iter()
            .filter(|r| r.route == ImdsRoute::Instance)
            .count(),
        1
    );
}

#[test]
fn without_the_api_server_tokend_serves_add_but_never_says_identity_not_found() {
    if !root() {
        return;
    }
    let mut node = Node::with_cloud();
    node.disconnect_api();
    let tokend = node.start(&["--pod-wait", "1s"]);
    assert_eq!(tokend.api("GET", "/v1/status", None).unwrap().status, 200);
    let readyz = node.health("/readyz");
    assert_eq!(readyz.status, 503);
    assert!(readyz.body.contains("pods"), "{}", readyz.body);
    let p = Netns::new();
    let mut record = support::record("c1", "eth0", &p);
    record.pod_uid = Some("9e8d7c6b-0000-4000-8000-000000000000".into());
    assert_eq!(tokend.put(&record).status, 200);
    let answer = token(&p, ARM, "");
    assert_error(&answer, 404, "not_found");
    assert_eq!(answer.header("retry-after").as_deref(), Some("5"));
}
