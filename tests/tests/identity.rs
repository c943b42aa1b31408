//! End to end on one simulated node: pods created through the CNI chain, the controller writing
//! assignments, tokend serving tokens from the mock IMDS and the mock Entra ID, and the
//! conformance cases of shared/reference/imds.md §(b) sent as raw HTTP from inside pod netns.
//! The cases a single tokend covers in more depth (upstream error mapping, waits, coalescing
//! under faults) are in tokend/tests/tokens.rs; here every request crosses the real redirect.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, ListParams};
use podid_api::crd::{AzureAssignedIdentity, AzureIdentityBinding, IdentityType};
use podid_tests::fakeapi::ISSUER;
use podid_tests::http::{self, Request, Response};
use podid_tests::mocks::entra::{App, CredentialKind, FederatedCredential};
use podid_tests::mocks::imds::ImdsRoute;
use podid_tests::mocks::jwt::decode_claims;
use podid_tests::mocks::tls::ClientCertificate;
use podid_tests::node::{IMDS_ADDR, Pod, wait_for};
use podid_tests::objects::{self, binding, exception, pod, weighted};
use podid_tests::world::{TENANT, World};
use serde_json::Value;
use sha2::{Digest, Sha256};

const ARM: &str = "https://management.azure.com/";
const TOKEN: &str = "/metadata/identity/oauth2/token";

fn enc(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// `GET target` from inside `pod` with `Metadata: true`.
fn get(pod: &Pod, target: &str) -> Response {
    pod.imds(&Request::get(target).header("Metadata", "true"))
        .unwrap()
}

/// A token request for `resource` with `extra` query parameters.
fn token(pod: &Pod, resource: &str, extra: &str) -> Response {
    let mut target = format!("{TOKEN}?api-version=2018-02-01&resource={}", enc(resource));
    if !extra.is_empty() {
        target.push('&');
        target.push_str(extra);
    }
    get(pod, &target)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Checks the IMDS success body: the documented keys in order, every value a string, integer
/// strings, `expires_in` ≈ `expires_on - now`; returns the body.
fn success(resp: &Response, resource: &str, client_id: &str) -> serde_json::Map<String, Value> {
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    let body: serde_json::Map<String, Value> = serde_json::from_slice(&resp.body).unwrap();
    let keys: Vec<&str> = body.keys().map(String::as_str).collect();
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
    assert!(
        body.values().all(Value::is_string),
        "every value is a string: {}",
        resp.text()
    );
    for key in ["expires_in", "expires_on", "ext_expires_in", "not_before"] {
        let v = body[key].as_str().unwrap();
        assert!(
            v.parse::<i64>().is_ok(),
            "{key} = {v:?} is not an integer string"
        );
    }
    let expires_in: i64 = body["expires_in"].as_str().unwrap().parse().unwrap();
    let expires_on: i64 = body["expires_on"].as_str().unwrap().parse().unwrap();
    assert!(expires_in > 0);
    assert!(
        (expires_on - now() - expires_in).abs() <= 2,
        "expires_in {expires_in}, expires_on {expires_on}"
    );
    assert_eq!(body["resource"], resource, "resource echoed byte for byte");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["refresh_token"], "");
    assert_eq!(body["client_id"], client_id);
    body
}

/// The token's claims after [`success`].
fn claims(resp: &Response, resource: &str, client_id: &str) -> Value {
    let body = success(resp, resource, client_id);
    decode_claims(body["access_token"].as_str().unwrap()).unwrap()
}

fn access_token(resp: &Response) -> String {
    resp.json().unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn sha256_hex(value: &str) -> String {
    Sha256::digest(value.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Asserts an IMDS-shaped error.
fn error(resp: &Response, status: u16, error: &str) -> String {
    assert_eq!(resp.status, status, "{}", resp.text());
    assert_eq!(
        resp.header("content-type"),
        Some("application/json; charset=utf-8"),
        "{}",
        resp.text()
    );
    let body = resp.json().unwrap();
    assert_eq!(body["error"], error, "{}", resp.text());
    let description = body["error_description"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!description.contains("unreachable"), "{description}");
    description
}

fn not_found(resp: &Response) {
    assert_eq!(error(resp, 400, "invalid_request"), "Identity not found");
}

/// Token requests the node's IMDS has seen.
fn imds_token_calls(world: &World) -> usize {
    world
        .imds
        .log()
        .iter()
        .filter(|r| r.route == ImdsRoute::Token)
        .count()
}

fn assignments(world: &World, namespace: &str) -> Vec<AzureAssignedIdentity> {
    let api: Api<AzureAssignedIdentity> = Api::namespaced(world.node.client(), namespace);
    world
        .node
        .block_on(api.list(&ListParams::default()))
        .unwrap()
        .items
}

/// The pod's IPv4 address on `eth0`.
fn pod_ip(pod: &Pod) -> String {
    let out = pod
        .netns
        .exec_ok("ip", &["-4", "-o", "addr", "show", "dev", "eth0"])
        .unwrap();
    let cidr = out
        .split_whitespace()
        .nth(3)
        .expect("ip -o addr prints the address fourth");
    cidr.split('/').next().unwrap().to_owned()
}

/// The seeds' walk-through: identity `rgapi` in namespace `rgapi`, its binding with selector
/// `rgapi`, a pod labelled `aadpodidbinding: rgapi`; the very first request, sent as soon as
/// the sandbox exists, gets the token.
#[test]
fn the_seeds_pod_gets_a_token_for_its_identity() {
    let world = World::new("seeds", &[]).unwrap();
    let id = world.user_assigned("rgapi", "rgapi").unwrap();
    world
        .bind("rgapi", "rgapi-binding", "rgapi", "rgapi")
        .unwrap();
    let started = Instant::now();
    let api = world
        .start_pod(pod("rgapi", "api-0").binding("rgapi"))
        .unwrap();
    let resp = token(&api, ARM, "");
    let claims = claims(&resp, ARM, &id.client_id);
    eprintln!("pod creation to first token: {:?}", started.elapsed());
    assert_eq!(claims["oid"], id.object_id.as_str());
    assert_eq!(claims["aud"], ARM);
    world.wait_assigned(&api, "rgapi", 1).unwrap();
}

/// A binding and its identity created just before the pod, whose watch events reach tokend
/// after the pod's: the first request waits for them instead of saying "Identity not found"
/// from a cache that is behind, and a pod without identity still gets its 400 at once.
#[test]
fn lagging_watches_never_make_identity_not_found() {
    let world = World::new("lagging", &[]).unwrap();
    for plural in [
        "azureidentitybindings",
        "azureidentities",
        "azurepodidentityexceptions",
    ] {
        world
            .node
            .api()
            .delay_watch_events(plural, Duration::from_millis(1500));
    }
    let id = world.user_assigned("apps", "late").unwrap();
    world.bind("apps", "late-binding", "late", "late").unwrap();
    world
        .node
        .create(&exception("apps", "late-exception", &[("app", "late-csi")]))
        .unwrap();
    let fresh = world
        .start_pod(pod("apps", "fresh").binding("late"))
        .unwrap();
    let csi = world
        .start_pod(pod("apps", "csi").label("app", "late-csi"))
        .unwrap();
    let bare = world.start_pod(pod("apps", "bare")).unwrap();
    success(&token(&fresh, ARM, ""), ARM, &id.client_id);
    let node = token(&csi, ARM, "");
    assert_eq!(node.status, 200, "{}", node.text());
    assert_eq!(
        node.json().unwrap()["client_id"],
        world.system.client_id.as_str()
    );
    let started = Instant::now();
    not_found(&token(&bare, ARM, ""));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a pod with no identity waited {:?}",
        started.elapsed()
    );
}

/// reference/imds.md §(b) cases 1–11 and 15, from inside a pod through the redirect.
#[test]
fn imds_conformance_from_inside_a_pod() {
    let world = World::new("conform", &[]).unwrap();
    let api = world.user_assigned("apps", "api-id").unwrap();
    let reader = world.user_assigned("apps", "reader-id").unwrap();
    world.bind("apps", "api-binding", "api-id", "web").unwrap();
    world
        .node
        .create(&weighted(
            binding("apps", "reader-binding", "reader-id", "web"),
            5,
        ))
        .unwrap();
    let web = world.start_pod(pod("apps", "web").binding("web")).unwrap();
    world.wait_assigned(&web, "apps", 2).unwrap();

    // 1. Header-less probes of every SDK's shape: 400 JSON at once, nothing upstream.
    let upstream = (imds_token_calls(&world), world.entra.log().len());
    for target in [
        TOKEN.to_owned(),
        format!("{TOKEN}?api-version=2018-02-01&resource={}", enc(ARM)),
        format!(
            "{TOKEN}?api-version=2018-02-01&msi-res-id={}",
            enc(&api.resource_id)
        ),
        format!("{TOKEN}?api-version=2018-02-01&client_id={}", api.client_id),
    ] {
        let started = Instant::now();
        let resp = web.imds(&Request::get(&target)).unwrap();
        let elapsed = started.elapsed();
        assert_eq!(
            error(&resp, 400, "invalid_request"),
            "Required metadata header not specified"
        );
        assert!(!resp.text().contains("Identity not found"));
        assert!(
            elapsed < Duration::from_secs(1),
            "probe {target} took {elapsed:?}"
        );
    }
    assert_eq!(
        (imds_token_calls(&world), world.entra.log().len()),
        upstream,
        "no upstream call for a probe"
    );

    // 2. `Metadata: True` is accepted, `Metadata: false` is not.
    let target = format!("{TOKEN}?api-version=2018-02-01&resource={}", enc(ARM));
    let capital = web
        .imds(&Request::get(&target).header("Metadata", "True"))
        .unwrap();
    success(&capital, ARM, &reader.client_id);
    let falsy = web
        .imds(&Request::get(&target).header("Metadata", "false"))
        .unwrap();
    error(&falsy, 400, "invalid_request");

    // 3. IMDSv2 detection gets 404, header or not.
    let platform = web
        .imds(&Request::get(
            "/metadata/identity/getplatformmetadata?cred-api-version=2.0",
        ))
        .unwrap();
    assert_eq!(platform.status, 404, "{}", platform.text());

    // 4. Path spellings that are the token route.
    for path in [
        "//metadata/identity/oauth2/token",
        "/Metadata/identity/oauth2/token",
        "/metadata/identity/oauth2/token/",
    ] {
        let resp = get(
            &web,
            &format!("{path}?api-version=2018-02-01&resource={}", enc(ARM)),
        );
        success(&resp, ARM, &reader.client_id);
    }
    let elsewhere = get(&web, "/not/imds");
    assert_eq!(elsewhere.status, 404, "{}", elsewhere.text());
    assert!(elsewhere.json().is_ok(), "404 JSON");

    // 5. Method, X-Forwarded-For, duplicate parameters.
    let post = web
        .imds(&Request::new("POST", &target).header("Metadata", "true"))
        .unwrap();
    error(&post, 405, "method_not_allowed");
    let forwarded = web
        .imds(
            &Request::get(&target)
                .header("Metadata", "true")
                .header("X-Forwarded-For", "10.0.0.1"),
        )
        .unwrap();
    assert_eq!(
        error(&forwarded, 400, "invalid_request"),
        "Request contains X-Forwarded-For header"
    );
    let duplicate = get(
        &web,
        &format!("{target}&resource={}", enc("https://vault.azure.net")),
    );
    error(&duplicate, 400, "invalid_request");

    // 6. api-version.
    let missing = get(&web, &format!("{TOKEN}?resource={}", enc(ARM)));
    assert_eq!(
        error(&missing, 400, "invalid_request"),
        "api-version is invalid or was not specified in the request"
    );
    for version in ["2018-02-01", "2019-08-01", "2023-07-01"] {
        let resp = get(
            &web,
            &format!("{TOKEN}?api-version={version}&resource={}", enc(ARM)),
        );
        success(&resp, ARM, &reader.client_id);
    }
    error(
        &get(
            &web,
            &format!("{TOKEN}?api-version=1999-01-01&resource={}", enc(ARM)),
        ),
        400,
        "invalid_request",
    );

    // 7. resource.
    for target in [
        format!("{TOKEN}?api-version=2018-02-01"),
        format!("{TOKEN}?api-version=2018-02-01&resource="),
    ] {
        assert_eq!(
            error(&get(&web, &target), 400, "invalid_request"),
            "Required query variable 'resource' is missing"
        );
    }

    // 8. Selectors: every spelling, case-insensitive ids, the default by weight.
    success(&token(&web, ARM, ""), ARM, &reader.client_id);
    success(
        &token(&web, ARM, &format!("client_id={}", api.client_id)),
        ARM,
        &api.client_id,
    );
    success(
        &token(
            &web,
            ARM,
            &format!("client_id={}", api.client_id.to_uppercase()),
        ),
        ARM,
        &api.client_id,
    );
    for key in ["object_id", "principal_id"] {
        let resp = token(
            &web,
            ARM,
            &format!("{key}={}", api.object_id.to_uppercase()),
        );
        success(&resp, ARM, &api.client_id);
    }
    for key in ["msi_res_id", "mi_res_id", "resource_id"] {
        let spelled = format!(" {} ", api.resource_id.to_uppercase());
        success(
            &token(&web, ARM, &format!("{key}={}", enc(&spelled))),
            ARM,
            &api.client_id,
        );
        success(
            &token(&web, ARM, &format!("{key}={}", enc(&reader.resource_id))),
            ARM,
            &reader.client_id,
        );
    }
    let two = token(
        &web,
        ARM,
        &format!("client_id={}&object_id={}", api.client_id, reader.object_id),
    );
    assert!(error(&two, 400, "invalid_request").starts_with("Multiple identity selectors"));
    not_found(&token(
        &web,
        ARM,
        "client_id=00000000-0000-0000-0000-000000000001",
    ));
    not_found(&token(
        &web,
        ARM,
        "object_id=00000000-0000-0000-0000-000000000002",
    ));

    // Two identities of equal weight: the lowest identity name is the default.
    let beta = world.user_assigned("ties", "beta").unwrap();
    let alpha = world.user_assigned("ties", "alpha").unwrap();
    world.bind("ties", "to-beta", "beta", "tie").unwrap();
    world.bind("ties", "to-alpha", "alpha", "tie").unwrap();
    let tie = world.start_pod(pod("ties", "tie").binding("tie")).unwrap();
    world.wait_assigned(&tie, "ties", 2).unwrap();
    success(&token(&tie, ARM, ""), ARM, &alpha.client_id);
    success(
        &token(&tie, ARM, &format!("client_id={}", beta.client_id)),
        ARM,
        &beta.client_id,
    );

    // 9 and 10. The resource echoed byte for byte and passed upstream as sent.
    for resource in [
        "https://management.azure.com",
        "https://management.azure.com/",
        "https://vault.azure.net",
        "https://management.core.windows.net/",
        "7f59a773-2eaf-429c-a059-50fc5bb28b44",
    ] {
        let resp = token(&web, resource, "bypass_cache=true");
        let claims = claims(&resp, resource, &reader.client_id);
        assert_eq!(claims["aud"], resource);
        let last = world
            .imds
            .log()
            .into_iter()
            .rfind(|r| r.route == ImdsRoute::Token)
            .unwrap();
        assert_eq!(
            last.resource.as_deref(),
            Some(resource),
            "the node's IMDS got the resource as sent"
        );
    }

    // 11. Caching.
    let vault = "https://vault.azure.net";
    let before = imds_token_calls(&world);
    let cached = access_token(&token(&web, vault, ""));
    assert_eq!(
        access_token(&token(&web, vault, "")),
        cached,
        "the second request is served from cache"
    );
    assert_eq!(
        imds_token_calls(&world),
        before,
        "the bypassing request above already cached it"
    );
    token(&web, vault, "bypass_cache=true");
    assert_eq!(
        imds_token_calls(&world),
        before + 1,
        "bypass_cache=true goes upstream"
    );
    let current = access_token(&token(&web, vault, ""));
    token(
        &web,
        vault,
        &format!("token_sha256_to_refresh={}", sha256_hex("something else")),
    );
    assert_eq!(
        imds_token_calls(&world),
        before + 1,
        "a non-matching hash is served from cache"
    );
    token(
        &web,
        vault,
        &format!("token_sha256_to_refresh={}", sha256_hex(&current)),
    );
    assert_eq!(
        imds_token_calls(&world),
        before + 2,
        "the cached token's hash refreshes it"
    );

    // Caches are per identity.
    let of_api = access_token(&token(&web, vault, &format!("client_id={}", api.client_id)));
    assert_ne!(of_api, access_token(&token(&web, vault, "")));

    // Concurrent misses for one key, as many as the pod may have in progress (the default
    // --pod-inflight; more would rightly get 429 on a busy machine): one upstream call.
    let storage = "https://storage.azure.com/";
    let before = imds_token_calls(&world);
    let answers: Vec<Response> = thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|_| s.spawn(|| token(&web, storage, "")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = access_token(&answers[0]);
    for resp in &answers {
        success(resp, storage, &reader.client_id);
        assert_eq!(access_token(resp), first);
    }
    assert_eq!(
        imds_token_calls(&world),
        before + 1,
        "16 concurrent misses, one upstream call"
    );

    // A token with less than 5 minutes left is never served from cache.
    world.imds.set_token_lifetime(Duration::from_secs(240));
    world.imds.clear_token_cache();
    let graph = "https://graph.microsoft.com";
    let before = imds_token_calls(&world);
    success(&token(&web, graph, ""), graph, &reader.client_id);
    success(&token(&web, graph, ""), graph, &reader.client_id);
    assert_eq!(
        imds_token_calls(&world),
        before + 2,
        "a short-lived token is fetched again"
    );

    // 15. Instance metadata: header first, then proxied (the default policy); never 400 with it.
    let instance = "/metadata/instance?api-version=2021-02-01";
    error(
        &web.imds(&Request::get(instance)).unwrap(),
        400,
        "invalid_request",
    );
    let proxied = get(&web, instance);
    assert_eq!(proxied.status, 200, "{}", proxied.text());
    assert_eq!(
        proxied.json().unwrap()["compute"]["vmId"],
        world.vm.vm_id.as_str()
    );
}

/// reference/imds.md §(b) 12, 14, 16 and the issue's attacks: nothing gets a token it should not.
#[test]
fn attacks_never_get_a_token_they_should_not() {
    let mut world = World::new("attacks", &[]).unwrap();
    let a = world.user_assigned("apps", "a-id").unwrap();
    let b = world.user_assigned("apps", "b-id").unwrap();
    world.bind("apps", "a-binding", "a-id", "a").unwrap();
    world.bind("apps", "b-binding", "b-id", "b").unwrap();
    world
        .node
        .create(&exception("kube-system", "csi", &[("app", "csi")]))
        .unwrap();
    let pa = world.start_pod(pod("apps", "pod-a").binding("a")).unwrap();
    let pb = world.start_pod(pod("apps", "pod-b").binding("b")).unwrap();
    // A pod in another namespace labelled with the apps namespace's selector.
    let stranger = world
        .start_pod(pod("other", "stranger").binding("a"))
        .unwrap();
    let plain = world.start_pod(pod("apps", "plain")).unwrap();
    let csi = world
        .start_pod(pod("kube-system", "csi").label("app", "csi"))
        .unwrap();
    let not_csi = world
        .start_pod(pod("kube-system", "other").label("app", "dns"))
        .unwrap();
    let node_identity = world.system.clone();

    success(&token(&pa, ARM, ""), ARM, &a.client_id);
    success(&token(&pb, ARM, ""), ARM, &b.client_id);

    // Pod B names pod A's identity every way it can.
    for selector in [
        format!("client_id={}", a.client_id),
        format!("object_id={}", a.object_id),
        format!("principal_id={}", a.object_id),
        format!("msi_res_id={}", enc(&a.resource_id)),
        format!("mi_res_id={}", enc(&a.resource_id)),
        format!("resource_id={}", enc(&a.resource_id)),
    ] {
        not_found(&token(&pb, ARM, &selector));
    }
    // Nobody names the node's identity into a token.
    for p in [&pa, &pb, &stranger, &plain, &not_csi] {
        for selector in [
            format!("client_id={}", node_identity.client_id),
            format!("msi_res_id={}", enc(&node_identity.resource_id)),
        ] {
            not_found(&token(p, ARM, &selector));
        }
    }
    // Another namespace's binding brings nothing; no label brings nothing: 400 at once.
    for p in [&stranger, &plain, &not_csi] {
        let started = Instant::now();
        not_found(&token(p, ARM, ""));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "no wait for a pod with no coming identity"
        );
    }
    not_found(&token(
        &stranger,
        ARM,
        &format!("client_id={}", a.client_id),
    ));
    assert!(
        assignments(&world, "other").is_empty(),
        "namespaced matching assigns nothing across namespaces"
    );

    // The exception, and only it, gets the node's identity: the node IMDS's answer, proxied.
    let proxied = token(&csi, ARM, "");
    assert_eq!(proxied.status, 200, "{}", proxied.text());
    assert_eq!(
        proxied.json().unwrap()["client_id"],
        node_identity.client_id.as_str()
    );

    // X-Forwarded-For naming pod A, Host naming pod A: pod B stays pod B.
    let ip_a = pod_ip(&pa);
    let target = format!("{TOKEN}?api-version=2018-02-01&resource={}", enc(ARM));
    let spoofed = pb
        .imds(
            &Request::get(&target)
                .header("Metadata", "true")
                .header("X-Forwarded-For", &ip_a),
        )
        .unwrap();
    error(&spoofed, 400, "invalid_request");
    for host in [ip_a.as_str(), "169.254.169.254", "localhost"] {
        let resp = pb
            .netns
            .run(|| {
                let stream = TcpStream::connect(IMDS_ADDR).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                Request::get(&target)
                    .header("Metadata", "true")
                    .send(stream, host)
            })
            .unwrap()
            .unwrap();
        success(&resp, ARM, &b.client_id);
    }
    // Pod A's listener cannot be reached from pod B at pod A's address.
    let port = world.node.listener_port;
    let reached = pb
        .netns
        .run(|| {
            TcpStream::connect_timeout(
                &format!("{ip_a}:{port}").parse().unwrap(),
                Duration::from_secs(2),
            )
            .is_ok()
        })
        .unwrap();
    assert!(!reached, "pod A's listener answers pod B");
    // Nor by raw bytes on the node's own listener port from pod B: its own listener, its own identity.
    let raw = pb
        .netns
        .run(|| {
            let mut stream = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(stream, "GET {target} HTTP/1.1\r\nHost: {ip_a}\r\nMetadata: true\r\nConnection: close\r\n\r\n").unwrap();
            let mut out = Vec::new();
            stream.read_to_end(&mut out).unwrap();
            http::parse(&out).unwrap()
        })
        .unwrap();
    success(&raw, ARM, &b.client_id);

    // A request while the assignment is being deleted: pod A's answers are its own token, then
    // "Identity not found" once tokend sees the binding gone; never anything else.
    let hammer = {
        let deadline = Instant::now() + Duration::from_secs(4);
        thread::scope(|s| {
            let requests = s.spawn(|| {
                let mut seen = Vec::new();
                while Instant::now() < deadline {
                    seen.push(token(&pa, ARM, ""));
                    // Under the default per-pod rate (50/s): this is about identity, not limits.
                    thread::sleep(Duration::from_millis(40));
                }
                seen
            });
            thread::sleep(Duration::from_millis(300));
            world
                .node
                .delete::<AzureIdentityBinding>("apps", "a-binding")
                .unwrap();
            requests.join().unwrap()
        })
    };
    assert!(hammer.len() > 5, "only {} requests", hammer.len());
    for resp in &hammer {
        match resp.status {
            200 => assert_eq!(resp.json().unwrap()["client_id"], a.client_id.as_str()),
            400 => not_found(resp),
            other => panic!("unexpected {other}: {}", resp.text()),
        }
    }
    wait_for(Duration::from_secs(10), "pod A's assignment to go", || {
        assignments(&world, "apps")
            .iter()
            .all(|x| x.spec.pod.as_deref() != Some("pod-a"))
            .then_some(())
    })
    .unwrap();
    wait_for(
        Duration::from_secs(5),
        "tokend to stop serving pod A",
        || (token(&pa, ARM, "").status == 400).then_some(()),
    )
    .unwrap();
    for _ in 0..10 {
        not_found(&token(&pa, ARM, ""));
    }

    // Pod B deleted while the controller is down and before the garbage collector got to its
    // assignment (orphaned, so it stays), and a new pod reusing its name without the label: the
    // stale assignment is never its.
    world.stop_controller();
    world.chain.del(&pb.attachment).unwrap();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(world.node.client(), "apps");
    world
        .node
        .block_on(pods.delete("pod-b", &DeleteParams::orphan()))
        .unwrap();
    let stale: Vec<_> = assignments(&world, "apps")
        .into_iter()
        .filter(|x| x.spec.pod.as_deref() == Some("pod-b"))
        .collect();
    assert_eq!(stale.len(), 1, "the old pod's assignment is still there");
    let reborn = world.start_pod(pod("apps", "pod-b")).unwrap();
    assert_ne!(reborn.uid, pb.uid);
    not_found(&token(&reborn, ARM, ""));
    not_found(&token(&reborn, ARM, &format!("client_id={}", b.client_id)));
    // With the label it is served, but only once its own assignment exists.
    world.start_controller();
    let labelled = world.start_pod(pod("apps", "pod-b2").binding("b")).unwrap();
    success(&token(&labelled, ARM, ""), ARM, &b.client_id);
    wait_for(
        Duration::from_secs(10),
        "the stale assignment to be collected",
        || {
            assignments(&world, "apps")
                .iter()
                .all(|x| x.spec.pod_uid.as_deref() != Some(pb.uid.as_str()))
                .then_some(())
        },
    )
    .unwrap();
    not_found(&token(&reborn, ARM, ""));
}

/// Types 1, 2 and 3 against the mock Entra ID, with expired, rotated and revoked credentials;
/// the scope is the resource plus `/.default`.
#[test]
fn every_identity_type_against_the_mocks() {
    let world = World::new("types", &[]).unwrap();
    let node = &world.node;
    let entra = &world.entra;

    // Type 0: a user-assigned identity of the node pool; detached from the VMs, it is refused
    // (403, never "Identity not found" that would send DefaultAzureCredential elsewhere).
    let msi = world.user_assigned("apps", "msi").unwrap();
    world.bind("apps", "msi-binding", "msi", "msi").unwrap();
    let msi_pod = world
        .start_pod(pod("apps", "msi-pod").binding("msi"))
        .unwrap();
    success(&token(&msi_pod, ARM, ""), ARM, &msi.client_id);
    assert!(world.imds.detach(&msi.client_id));
    let detached = token(&msi_pod, ARM, "bypass_cache=true");
    assert!(
        error(&detached, 403, "forbidden").contains("not assigned to this node"),
        "{}",
        detached.text()
    );

    // Type 1: client secret.
    let sp = "3f1e2d4c-5b6a-4798-8a9b-0c1d2e3f4a5b";
    entra
        .register(App::new(TENANT, sp).secret("first-secret"))
        .unwrap();
    node.create(&objects::secret(
        "apps",
        "sp-secret",
        &[("clientSecret", b"first-secret")],
    ))
    .unwrap();
    node.create(
        &objects::identity("apps", "sp")
            .service_principal(
                IdentityType::SERVICE_PRINCIPAL,
                TENANT,
                sp,
                ("apps", "sp-secret"),
            )
            .build(),
    )
    .unwrap();
    world.bind("apps", "sp-binding", "sp", "sp").unwrap();
    let sp_pod = world
        .start_pod(pod("apps", "sp-pod").binding("sp"))
        .unwrap();
    let claims_of = claims(&token(&sp_pod, ARM, ""), ARM, sp);
    assert_eq!(claims_of["appid"], sp);
    let core = "https://management.core.windows.net/";
    success(&token(&sp_pod, core, ""), core, sp);
    let scopes: Vec<_> = entra
        .requests_for(sp)
        .iter()
        .map(|r| r.scope.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        scopes,
        [
            "https://management.azure.com//.default",
            "https://management.core.windows.net//.default"
        ],
        "scope = resource + /.default, no trimming"
    );
    assert!(
        entra
            .requests_for(sp)
            .iter()
            .all(|r| r.credential == CredentialKind::Secret)
    );
    // Expired: 403 with the AADSTS text; rotated: the new Secret is read on the next call.
    entra.expire_secret(sp, "first-secret");
    let expired = token(&sp_pod, ARM, "bypass_cache=true");
    assert!(
        error(&expired, 403, "forbidden").starts_with("AADSTS7000222"),
        "{}",
        expired.text()
    );
    entra.add_secret(sp, "second-secret").unwrap();
    node.delete::<Secret>("apps", "sp-secret").unwrap();
    node.create(&objects::secret(
        "apps",
        "sp-secret",
        &[("clientSecret", b"second-secret")],
    ))
    .unwrap();
    wait_for(
        Duration::from_secs(5),
        "the rotated secret to be used",
        || (token(&sp_pod, ARM, "bypass_cache=true").status == 200).then_some(()),
    )
    .unwrap();
    entra.revoke_secret(sp, "second-secret");
    let revoked = token(&sp_pod, ARM, "bypass_cache=true");
    assert!(
        error(&revoked, 403, "forbidden").starts_with("AADSTS7000215"),
        "{}",
        revoked.text()
    );

    // Type 2: client certificate, rotated then revoked.
    let cert_app = "8a7b6c5d-4e3f-4a1b-9c8d-7e6f5a4b3c2d";
    let first = ClientCertificate::generate("CN=podid-first").unwrap();
    let second = ClientCertificate::generate("CN=podid-second").unwrap();
    entra
        .register(App::new(TENANT, cert_app).certificate(first.cert_der()))
        .unwrap();
    let p12 = first.pkcs12("pw-one").unwrap();
    node.create(&objects::secret(
        "apps",
        "sp-cert",
        &[("certificate", &p12), ("password", b"pw-one")],
    ))
    .unwrap();
    node.create(
        &objects::identity("apps", "cert")
            .service_principal(
                IdentityType::SERVICE_PRINCIPAL_CERTIFICATE,
                TENANT,
                cert_app,
                ("apps", "sp-cert"),
            )
            .build(),
    )
    .unwrap();
    world.bind("apps", "cert-binding", "cert", "cert").unwrap();
    let cert_pod = world
        .start_pod(pod("apps", "cert-pod").binding("cert"))
        .unwrap();
    let vault = "https://vault.azure.net";
    success(&token(&cert_pod, vault, ""), vault, cert_app);
    assert_eq!(
        entra.requests_for(cert_app)[0].credential,
        CredentialKind::Certificate
    );
    assert_eq!(
        entra.requests_for(cert_app)[0].scope.as_deref(),
        Some("https://vault.azure.net/.default")
    );
    entra.add_certificate(cert_app, second.cert_der()).unwrap();
    entra.remove_certificate(cert_app, first.cert_der());
    error(
        &token(&cert_pod, vault, "bypass_cache=true"),
        403,
        "forbidden",
    );
    let p12 = second.pkcs12("pw-two").unwrap();
    node.delete::<Secret>("apps", "sp-cert").unwrap();
    node.create(&objects::secret(
        "apps",
        "sp-cert",
        &[("certificate", &p12), ("password", b"pw-two")],
    ))
    .unwrap();
    wait_for(
        Duration::from_secs(5),
        "the rotated certificate to be used",
        || (token(&cert_pod, vault, "bypass_cache=true").status == 200).then_some(()),
    )
    .unwrap();
    entra.remove_certificate(cert_app, second.cert_der());
    error(
        &token(&cert_pod, vault, "bypass_cache=true"),
        403,
        "forbidden",
    );

    // Type 3: federated with the pod's own service account token; the trust revoked.
    let fed = "1d2c3b4a-5f6e-4d7c-8b9a-0f1e2d3c4b5a";
    entra
        .register(
            App::new(TENANT, fed).federated(FederatedCredential::service_account(
                ISSUER, "apps", "runner",
            )),
        )
        .unwrap();
    node.create(&objects::service_account("apps", "runner"))
        .unwrap();
    node.create(
        &objects::identity("apps", "fed")
            .federated(TENANT, fed)
            .build(),
    )
    .unwrap();
    world.bind("apps", "fed-binding", "fed", "fed").unwrap();
    let fed_pod = world
        .start_pod(
            pod("apps", "fed-pod")
                .binding("fed")
                .service_account("runner"),
        )
        .unwrap();
    success(&token(&fed_pod, ARM, ""), ARM, fed);
    assert_eq!(
        entra.requests_for(fed)[0].credential,
        CredentialKind::Federated
    );
    // Another service account is another subject: Entra refuses it.
    node.create(&objects::service_account("apps", "default"))
        .unwrap();
    let other = world
        .start_pod(pod("apps", "fed-other").binding("fed"))
        .unwrap();
    error(&token(&other, ARM, ""), 403, "forbidden");
    entra.remove_federated(fed, ISSUER, "system:serviceaccount:apps:runner");
    error(&token(&fed_pod, ARM, "bypass_cache=true"), 403, "forbidden");

    // Nothing secret in tokend's log.
    let log = node.tokend_log();
    for secret in ["first-secret", "second-secret", "pw-one", "pw-two"] {
        assert!(!log.contains(secret), "tokend's log shows {secret}");
    }
}

/// The limits and policies set by flags: a noisy pod is limited alone (429 + Retry-After), the
/// instance endpoint blocked with 403, an unknown pod answered 404 + Retry-After after
/// `--pod-wait`.
#[test]
fn limits_and_policies_from_flags() {
    let world = World::new(
        "limits",
        &[
            "--pod-rps",
            "1",
            "--pod-burst",
            "3",
            "--instance-metadata",
            "block",
            "--pod-wait",
            "1s",
        ],
    )
    .unwrap();
    let id = world.user_assigned("apps", "busy").unwrap();
    world.bind("apps", "busy-binding", "busy", "busy").unwrap();
    let noisy = world
        .start_pod(pod("apps", "noisy").binding("busy"))
        .unwrap();
    let quiet = world
        .start_pod(pod("apps", "quiet").binding("busy"))
        .unwrap();
    world.wait_assigned(&quiet, "apps", 1).unwrap();

    let answers: Vec<Response> = (0..8).map(|_| token(&noisy, ARM, "")).collect();
    let limited: Vec<&Response> = answers.iter().filter(|r| r.status == 429).collect();
    assert!(
        !limited.is_empty(),
        "8 requests at once over a burst of 3: none limited"
    );
    for resp in &limited {
        error(resp, 429, "too_many_requests");
        let after: u64 = resp
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .unwrap();
        assert!(after >= 1);
    }
    for resp in answers.iter().filter(|r| r.status != 429) {
        success(resp, ARM, &id.client_id);
    }
    success(&token(&quiet, ARM, ""), ARM, &id.client_id);

    let instance = "/metadata/instance?api-version=2021-02-01";
    error(
        &quiet.imds(&Request::get(instance)).unwrap(),
        400,
        "invalid_request",
    );
    let blocked = get(&quiet, instance);
    assert_eq!(blocked.status, 403, "{}", blocked.text());

    // A sandbox whose Pod the API server has never seen.
    let ghost_ns = podid_tests::netns::Netns::new("ghost").unwrap();
    let ghost = Pod {
        attachment: podid_tests::runtime::Attachment::pod(
            &podid_tests::node::container_id(),
            ghost_ns.path(),
            "apps",
            "ghost",
            "0b9a8c7d-0000-4000-8000-000000000000",
        ),
        netns: ghost_ns,
        uid: "0b9a8c7d-0000-4000-8000-000000000000".into(),
    };
    world.chain.add(&ghost.attachment).unwrap();
    let started = Instant::now();
    let unknown = token(&ghost, ARM, "");
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    assert_eq!(unknown.header("retry-after"), Some("5"));
    assert!(!unknown.text().contains("Identity not found"));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "answered before --pod-wait"
    );
}
