//! Real, unmodified Azure SDKs inside pod network namespaces (issue "IMDS token service" §4):
//! Python `azure-identity` (sync through MSAL, and `aio`) and `@azure/identity` for Node.js call
//! `http://169.254.169.254/metadata/identity/oauth2/token` as they would in a pod, cross the
//! plugin's redirect into tokend, and must get a token for *their* pod's identity and no other;
//! in a pod without any identity `DefaultAzureCredential` must move on at once.
//!
//! The SDKs come from `.ci/run` (venv in `target/sdk/venv`, `npm ci` in `tests/sdk/node`); when
//! they are missing these tests fail and say so. See `podid_tests::sdk`.

use std::thread;
use std::time::Duration;

use podid_tests::mocks::imds::ManagedIdentity;
use podid_tests::node::Pod;
use podid_tests::objects::pod;
use podid_tests::sdk::{self, Call, Outcome, Sdk};
use podid_tests::world::{TENANT, World};

/// How long `DefaultAzureCredential` may take to give up in a pod without identity, process
/// start included: its IMDS probe and token request answered at once, every other credential
/// unavailable. An SDK that retried the answer (Python: 5 retries ≈ 25 s; Node.js: 404/410
/// ≈ 25 s) or timed out would exceed it.
const MOVE_ON_WITHIN: Duration = Duration::from_secs(20);

/// Runs `call` in `pod` and logs what happened (never the token).
fn run(pod: &Pod, call: &Call) -> Outcome {
    let outcome = call
        .run_in(pod.netns.path())
        .unwrap_or_else(|e| panic!("{call}: {e:#}"));
    eprintln!(
        "{}: ok={} in {:.2} s (get_token {:.2} s){}",
        outcome.call,
        outcome.ok(),
        outcome.wall.as_secs_f64(),
        outcome.seconds(),
        if outcome.ok() {
            String::new()
        } else {
            format!(" {}: {}", outcome.error(), first_line(outcome.message()))
        }
    );
    outcome
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// Asserts a token of `identity` for the call's resource; returns the token's SHA-256.
fn assert_token_of(outcome: &Outcome, call: &Call, identity: &ManagedIdentity) -> String {
    let claims = outcome.claims();
    assert_eq!(
        claims["oid"], identity.object_id,
        "{}: token of the wrong identity: {claims}",
        outcome.call
    );
    assert_eq!(claims["appid"], identity.client_id, "{}", outcome.call);
    assert_eq!(
        claims["xms_mirid"], identity.resource_id,
        "{}",
        outcome.call
    );
    assert_eq!(claims["aud"], call.resource(), "{}", outcome.call);
    assert_eq!(claims["tid"], TENANT, "{}", outcome.call);
    outcome.token_sha256().to_owned()
}

/// Asserts that the SDK got no token because the identity it named is not the pod's.
fn assert_refused(outcome: &Outcome) {
    assert!(
        !outcome.ok(),
        "{} got a token of an identity its pod does not have: {}",
        outcome.call,
        outcome.printed["claims"]
    );
    assert!(
        outcome.message().contains("Identity not found"),
        "{}: expected IMDS's \"Identity not found\", got {}: {}",
        outcome.call,
        outcome.error(),
        outcome.message()
    );
}

/// Every credential shape of both SDKs in a pod with identity `mine`; `theirs` is another
/// identity on the node that the pod must never get. Returns the tokens' SHA-256.
fn every_sdk_gets(pod: &Pod, mine: &ManagedIdentity, theirs: &ManagedIdentity) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut got = |call: Call| tokens.push(assert_token_of(&run(pod, &call), &call, mine));
    got(Call::managed(Sdk::Python));
    got(Call::managed(Sdk::Python).client_id(&mine.client_id));
    got(Call::default_credential(Sdk::Python));
    // AZURE_CLIENT_ID, as aad-pod-identity's docs had pods set it, becomes DAC's client_id.
    got(Call::default_credential(Sdk::Python).env("AZURE_CLIENT_ID", &mine.client_id));
    // aio sends identity_config keys verbatim: resource_id=… on the wire.
    got(Call::managed(Sdk::PythonAsync).resource_id(&mine.resource_id));
    got(Call::managed(Sdk::Node));
    got(Call::managed(Sdk::Node).client_id(&mine.client_id));
    got(Call::managed(Sdk::Node).resource_id(&mine.resource_id));
    got(Call::default_credential(Sdk::Node));

    assert_refused(&run(
        pod,
        &Call::managed(Sdk::Python).client_id(&theirs.client_id),
    ));
    assert_refused(&run(
        pod,
        &Call::managed(Sdk::Node).client_id(&theirs.client_id),
    ));
    tokens
}

/// Two pods, two identities: in each pod, Python's and Node.js's ManagedIdentityCredential (no
/// id, the pod's client id, its resource id) and DefaultAzureCredential get that pod's token,
/// and naming the other pod's client id gets nothing. Both pods run their SDKs at once.
#[test]
fn each_sdk_gets_its_own_pods_identity() {
    sdk::check_installed().unwrap_or_else(|e| panic!("{e:#}"));
    let world = World::new("sdk", &[]).unwrap();
    let front = world.user_assigned("shop", "front-id").unwrap();
    let back = world.user_assigned("shop", "back-id").unwrap();
    world
        .bind("shop", "front-binding", "front-id", "front")
        .unwrap();
    world
        .bind("shop", "back-binding", "back-id", "back")
        .unwrap();
    let front_pod = world
        .start_pod(pod("shop", "front-0").binding("front"))
        .unwrap();
    let back_pod = world
        .start_pod(pod("shop", "back-0").binding("back"))
        .unwrap();
    world.wait_assigned(&front_pod, "shop", 1).unwrap();
    world.wait_assigned(&back_pod, "shop", 1).unwrap();

    let (front_tokens, back_tokens) = thread::scope(|s| {
        let in_front = s.spawn(|| every_sdk_gets(&front_pod, &front, &back));
        let in_back = s.spawn(|| every_sdk_gets(&back_pod, &back, &front));
        (in_front.join().unwrap(), in_back.join().unwrap())
    });
    assert!(
        front_tokens.iter().all(|t| !back_tokens.contains(t)),
        "the two pods never share a token"
    );
}

/// Pods without identity (no binding label; a label no binding selects): Python's and
/// Node.js's DefaultAzureCredential get tokend's immediate `400 Identity not found`, move past
/// managed identity without retrying, and fail the chain within [`MOVE_ON_WITHIN`].
#[test]
fn default_credential_moves_on_quickly_without_identity() {
    sdk::check_installed().unwrap_or_else(|e| panic!("{e:#}"));
    let world = World::new("sdk-none", &[]).unwrap();
    world.user_assigned("shop", "front-id").unwrap();
    world
        .bind("shop", "front-binding", "front-id", "front")
        .unwrap();
    let unlabelled = world.start_pod(pod("shop", "batch-0")).unwrap();
    let unbound = world
        .start_pod(pod("shop", "stray-0").binding("no-such-binding"))
        .unwrap();

    for pod in [&unlabelled, &unbound] {
        for sdk in [Sdk::Python, Sdk::Node] {
            let outcome = run(pod, &Call::default_credential(sdk));
            assert!(
                !outcome.ok(),
                "{} in a pod without identity got a token: {}",
                outcome.call,
                outcome.printed["claims"]
            );
            assert!(
                outcome.wall < MOVE_ON_WITHIN,
                "{} took {:?} to move on (at most {MOVE_ON_WITHIN:?})",
                outcome.call,
                outcome.wall
            );
            // The chain reached managed identity and was told at once that the identity is not
            // there: tokend answered, nothing timed out.
            let message = outcome.message();
            assert!(
                message.contains("ManagedIdentityCredential")
                    && message.contains("Identity not found"),
                "{}: {}: {message}",
                outcome.call,
                outcome.error()
            );
        }
    }
}
