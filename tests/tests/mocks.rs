//! The Azure mocks against real clients: azure_identity 1.0's `ClientSecretCredential`,
//! `ClientCertificateCredential` and `ClientAssertionCredential` over real TLS to the mock
//! Entra ID (test CA, `login.mock.test` resolved to loopback), its `ManagedIdentityCredential`
//! through a URL-rewriting transport to the mock IMDS, raw HTTP for every other shape, and the
//! `mock-azure` binary.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::{Secret, SecretBytes, TokenCredential};
use azure_core::http::{
    AsyncRawResponse, ClientMethodOptions, ClientOptions, HttpClient, Request, RetryOptions,
    Transport, Url,
};
use azure_identity::{
    ClientAssertion, ClientAssertionCredential, ClientAssertionCredentialOptions,
    ClientCertificateCredential, ClientCertificateCredentialOptions, ClientSecretCredential,
    ClientSecretCredentialOptions, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId,
};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use podid_tests::fakeapi::{self, FakeApiServer};
use podid_tests::mocks::entra::{
    self, App, CredentialKind, EntraMock, EntraOutcome, FederatedCredential, Tenant,
};
use podid_tests::mocks::imds::{
    self, ImdsMock, ImdsOutcome, ImdsRoute, InstanceMetadata, ManagedIdentity, Selector,
};
use podid_tests::mocks::jwt::{
    self, ClientAssertion as Assertion, JwtAlg, TOKEN_EXCHANGE_AUDIENCE, Thumbprint,
};
use podid_tests::mocks::tls::{ClientCertificate, TestCa};
use podid_tests::mocks::{Fault, FaultTarget};
use serde_json::{Value, json};

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const OTHER_TENANT: &str = "0c8e4f55-3d5a-4d9b-9a5e-6c2f1b7d8e90";
const CLIENT: &str = "5a1b3c7d-2e4f-4a6b-8c9d-0e1f2a3b4c5d";
const OID: &str = "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a";
const SECRET: &str = "Qx8~podid.test-secret_0ld";
const NEW_SECRET: &str = "Qx8~podid.test-secret_n3w";
const ARM: &str = "https://management.azure.com/.default";
const SA_ISSUER: &str = "https://oidc.podid.test/cluster-1";

// ---------------------------------------------------------------------------------------------
// Wiring azure_identity to the mocks

/// A reqwest 0.13 client builder that trusts only the test CA, over ring (the workspace's rustls
/// has no other provider, so reqwest needs its TLS configuration handed in).
fn trusting_client(ca: &TestCa) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .tls_backend_preconfigured(ca.client_config().expect("a client configuration"))
}

/// ... resolving the mock's host name to its loopback address.
fn tls_client(entra: &EntraMock) -> reqwest::Client {
    trusting_client(entra.ca())
        .resolve(entra.host(), entra.addr())
        .no_proxy()
        .build()
        .expect("a reqwest client builds")
}

/// Client options for an Entra credential: real TLS to the mock, no retries.
fn entra_options(entra: &EntraMock) -> ClientOptions {
    let mut cloud = CustomConfiguration::default();
    cloud.authority_host = entra.authority_host();
    ClientOptions {
        transport: Some(Transport::new(Arc::new(tls_client(entra)))),
        cloud: Some(Arc::new(CloudConfiguration::Custom(cloud))),
        retry: RetryOptions::none(),
        ..Default::default()
    }
}

fn secret_credential(
    entra: &EntraMock,
    tenant: &str,
    client_id: &str,
    secret: &str,
) -> Arc<ClientSecretCredential> {
    ClientSecretCredential::new(
        tenant,
        client_id.to_string(),
        Secret::new(secret.to_string()),
        Some(ClientSecretCredentialOptions {
            client_options: entra_options(entra),
        }),
    )
    .expect("the credential builds")
}

/// A fixed client assertion (what a workload-identity token file holds).
struct FixedAssertion(String);

impl std::fmt::Debug for FixedAssertion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FixedAssertion")
    }
}

#[async_trait]
impl ClientAssertion for FixedAssertion {
    async fn secret(&self, _: Option<ClientMethodOptions<'_>>) -> azure_core::Result<String> {
        Ok(self.0.clone())
    }
}

fn assertion_credential(
    entra: &EntraMock,
    client_id: &str,
    assertion: String,
) -> Arc<ClientAssertionCredential<FixedAssertion>> {
    ClientAssertionCredential::new(
        TENANT.to_string(),
        client_id.to_string(),
        FixedAssertion(assertion),
        Some(ClientAssertionCredentialOptions {
            client_options: entra_options(entra),
        }),
    )
    .expect("the credential builds")
}

/// The error text with its whole source chain, where azure_identity keeps Entra's description.
fn error_text(err: &azure_core::Error) -> String {
    let mut text = format!("{err} | {err:?}");
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(&format!(" | {s}"));
        source = s.source();
    }
    text
}

async fn token_error(credential: &dyn TokenCredential, scopes: &[&str]) -> String {
    let err = credential
        .get_token(scopes, None)
        .await
        .expect_err("the mock refuses this request");
    error_text(&err)
}

/// Plan A of imds.md §(c): rewrites `http://169.254.169.254` to the mock's loopback address,
/// since ManagedIdentityCredential's IMDS URL is fixed.
#[derive(Debug)]
struct ToLoopback {
    inner: reqwest::Client,
    imds: Url,
}

#[async_trait]
impl HttpClient for ToLoopback {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let mut request = request.clone();
        if request.url().host_str() == Some("169.254.169.254") {
            let url = request.url_mut();
            url.set_host(self.imds.host_str()).expect("a loopback host");
            url.set_port(self.imds.port())
                .expect("http URLs take ports");
        }
        self.inner.execute_request(&request).await
    }
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn answer(response: reqwest::Response) -> Answer {
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.text().await.expect("a readable body"),
    }
}

async fn post_token(entra: &EntraMock, tenant: &str, fields: &[(&str, &str)]) -> Answer {
    let body = form_body(fields);
    let response = tls_client(entra)
        .post(entra.token_url(tenant))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .expect("the mock answers");
    answer(response).await
}

async fn secret_request(entra: &EntraMock, client_id: &str, secret: &str, scope: &str) -> Answer {
    post_token(
        entra,
        TENANT,
        &[
            ("client_id", client_id),
            ("client_secret", secret),
            ("grant_type", "client_credentials"),
            ("scope", scope),
        ],
    )
    .await
}

async fn assertion_request(
    entra: &EntraMock,
    client_id: &str,
    assertion: &str,
    scope: &str,
) -> Answer {
    post_token(
        entra,
        TENANT,
        &[
            ("client_assertion", assertion),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_id", client_id),
            ("grant_type", "client_credentials"),
            ("scope", scope),
        ],
    )
    .await
}

/// Asserts Entra's error document: status, error, code, and the `\r\n` trace lines.
fn assert_aad_error(answer: &Answer, status: u16, error: &str, code: u64) -> String {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(
        answer.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    let body = answer.json();
    let keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "error",
            "error_description",
            "error_codes",
            "timestamp",
            "trace_id",
            "correlation_id",
            "error_uri"
        ]
    );
    assert_eq!(body["error"], error);
    assert_eq!(body["error_codes"], json!([code]));
    let description = body["error_description"].as_str().unwrap().to_string();
    assert!(
        description.starts_with(&format!("AADSTS{code}: ")),
        "{description}"
    );
    let trace = format!(
        "\r\nTrace ID: {}\r\nCorrelation ID: {}\r\nTimestamp: {}",
        body["trace_id"].as_str().unwrap(),
        body["correlation_id"].as_str().unwrap(),
        body["timestamp"].as_str().unwrap()
    );
    assert!(description.ends_with(&trace), "{description:?}");
    // the raw body carries the escapes, as Entra's does
    assert!(answer.body.contains("\\r\\nTrace ID: "));
    description
}

fn form_body(fields: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish()
}

fn claims(token: &str) -> Value {
    jwt::decode_claims(token).expect("a JWT-shaped token")
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// ---------------------------------------------------------------------------------------------
// Mock Entra ID, real clients

async fn entra_with_secret_app() -> EntraMock {
    EntraMock::builder()
        .app(App::new(TENANT, CLIENT).object_id(OID).secret(SECRET))
        .start()
        .await
        .expect("the mock starts")
}

#[tokio::test]
async fn client_secret_credential_gets_a_token_with_the_apps_claims() {
    let entra = entra_with_secret_app().await;
    let credential = secret_credential(&entra, TENANT, CLIENT, SECRET);
    let before = now();
    let token = credential.get_token(&[ARM], None).await.expect("a token");

    let expires_on = token.expires_on.unix_timestamp();
    assert!(
        (before + 3599..=now() + 3599).contains(&expires_on),
        "{expires_on}"
    );
    let access_token = token.token.secret();
    assert_eq!(
        jwt::decode_header(access_token).unwrap(),
        json!({"alg": "RS256", "typ": "JWT"})
    );
    let c = claims(access_token);
    assert_eq!(c["aud"], "https://management.azure.com");
    assert_eq!(c["iss"], format!("https://sts.windows.net/{TENANT}/"));
    assert_eq!(c["tid"], TENANT);
    assert_eq!(c["oid"], OID);
    assert_eq!(c["sub"], OID);
    assert_eq!(c["appid"], CLIENT);
    assert_eq!(c["azp"], CLIENT);
    assert_eq!(c["appidacr"], "1");
    assert_eq!(c["idtyp"], "app");
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        3599
    );
    assert_eq!(c["nbf"], c["iat"]);

    let log = entra.log();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].tenant.as_deref(), Some(TENANT));
    assert_eq!(log[0].client_id.as_deref(), Some(CLIENT));
    assert_eq!(log[0].credential, CredentialKind::Secret);
    assert_eq!(log[0].scope.as_deref(), Some(ARM));
    assert_eq!(log[0].outcome, EntraOutcome::Issued { expires_in: 3599 });
    // the log keeps neither the secret nor the token
    let dump = format!("{log:?}");
    assert!(!dump.contains(SECRET) && !dump.contains(access_token));
    assert_eq!(entra.stats().issued, 1);
}

#[tokio::test]
async fn success_bodies_have_numeric_lifetimes_and_keep_the_trailing_slash_in_aud() {
    let entra = entra_with_secret_app().await;
    let a = secret_request(
        &entra,
        CLIENT,
        SECRET,
        "https://management.azure.com//.default",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(a.header("cache-control"), Some("no-store, no-cache"));
    let body = a.json();
    let keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        ["token_type", "expires_in", "ext_expires_in", "access_token"]
    );
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], json!(3599));
    assert_eq!(body["ext_expires_in"], json!(3599));
    assert_eq!(
        claims(body["access_token"].as_str().unwrap())["aud"],
        "https://management.azure.com/"
    );

    // a GUID names an application directly
    let guid = "cfa8b339-82a2-471a-a3c9-0fc0be7a4093";
    let a = secret_request(&entra, CLIENT, SECRET, &format!("{guid}/.default")).await;
    assert_eq!(
        claims(a.json()["access_token"].as_str().unwrap())["aud"],
        guid
    );
}

#[tokio::test]
async fn short_lifetimes_are_configurable_per_server_and_per_app() {
    let entra = EntraMock::builder()
        .token_lifetime(Duration::from_secs(120))
        .app(App::new(TENANT, CLIENT).secret(SECRET))
        .app(
            App::new(TENANT, "short-lived-app")
                .secret(SECRET)
                .token_lifetime(Duration::from_secs(15)),
        )
        .start()
        .await
        .unwrap();
    let token = secret_credential(&entra, TENANT, CLIENT, SECRET)
        .get_token(&[ARM], None)
        .await
        .unwrap();
    assert!((token.expires_on.unix_timestamp() - now() - 120).abs() <= 2);
    let a = secret_request(&entra, "short-lived-app", SECRET, ARM).await;
    assert_eq!(a.json()["expires_in"], json!(15));
    entra.set_token_lifetime(Duration::from_secs(60));
    assert_eq!(
        secret_request(&entra, CLIENT, SECRET, ARM).await.json()["expires_in"],
        json!(60)
    );
}

#[tokio::test]
async fn a_wrong_secret_is_invalid_client_7000215() {
    let entra = entra_with_secret_app().await;
    let text = token_error(&*secret_credential(&entra, TENANT, CLIENT, "wrong"), &[ARM]).await;
    assert!(text.contains("AADSTS7000215"), "{text}");

    let a = secret_request(&entra, CLIENT, "wrong", ARM).await;
    let description = assert_aad_error(&a, 401, "invalid_client", 7000215);
    assert!(description.contains(&format!("for a secret added to app '{CLIENT}'")));
    assert_eq!(a.header("cache-control"), Some("no-store, no-cache"));
    assert_eq!(entra.stats().rejected, 2);
}

#[tokio::test]
async fn azure_identity_loses_the_status_of_escaped_descriptions() {
    // imds.md §3.5: a description with JSON escapes does not borrow, so the HTTP status is lost
    let entra = entra_with_secret_app().await;
    let err = secret_credential(&entra, TENANT, CLIENT, "wrong")
        .get_token(&[ARM], None)
        .await
        .unwrap_err();
    assert!(matches!(
        err.kind(),
        azure_core::error::ErrorKind::Credential
    ));
    let inner = std::error::Error::source(&err)
        .and_then(|e| e.downcast_ref::<azure_core::Error>())
        .expect("the cause is kept");
    assert!(
        matches!(inner.kind(), azure_core::error::ErrorKind::DataConversion),
        "{:?}",
        inner.kind()
    );
}

#[tokio::test]
async fn secrets_rotate_expire_and_are_revoked() {
    let entra = entra_with_secret_app().await;
    entra.add_secret(CLIENT, NEW_SECRET).unwrap();
    // during a rotation both secrets are valid
    assert_eq!(
        secret_request(&entra, CLIENT, SECRET, ARM).await.status,
        200
    );
    assert_eq!(
        secret_request(&entra, CLIENT, NEW_SECRET, ARM).await.status,
        200
    );

    assert!(entra.revoke_secret(CLIENT, SECRET));
    let text = token_error(&*secret_credential(&entra, TENANT, CLIENT, SECRET), &[ARM]).await;
    assert!(text.contains("AADSTS7000215"), "{text}");
    secret_credential(&entra, TENANT, CLIENT, NEW_SECRET)
        .get_token(&[ARM], None)
        .await
        .expect("the new secret works");

    assert!(entra.expire_secret(CLIENT, NEW_SECRET));
    let a = secret_request(&entra, CLIENT, NEW_SECRET, ARM).await;
    assert!(assert_aad_error(&a, 401, "invalid_client", 7000222).contains("are expired"));
    assert!(!entra.revoke_secret(CLIENT, "never added"));
    assert!(entra.add_secret("no-such-app", "x").is_err());

    entra
        .add_secret_expiring(
            CLIENT,
            "later",
            SystemTime::now() + Duration::from_secs(3600),
        )
        .unwrap();
    assert_eq!(
        secret_request(&entra, CLIENT, "later", ARM).await.status,
        200
    );
}

#[tokio::test]
async fn basic_client_authentication_is_accepted() {
    let entra = entra_with_secret_app().await;
    let response = tls_client(&entra)
        .post(entra.token_url(TENANT))
        .basic_auth(CLIENT, Some(SECRET))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&[
            ("grant_type", "client_credentials"),
            ("scope", ARM),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(answer(response).await.status, 200);
}

#[tokio::test]
async fn client_certificate_credential_is_verified_against_the_registered_certificate() {
    let cert = ClientCertificate::generate("podid-app").unwrap();
    let entra = EntraMock::builder()
        .app(
            App::new(TENANT, CLIENT)
                .object_id(OID)
                .certificate(cert.cert_der()),
        )
        .start()
        .await
        .unwrap();
    let credential = ClientCertificateCredential::new(
        TENANT.to_string(),
        CLIENT.to_string(),
        SecretBytes::new(cert.pkcs12("p12-password").unwrap()),
        Some(ClientCertificateCredentialOptions {
            client_options: entra_options(&entra),
            password: Some(Secret::new("p12-password")),
        }),
    )
    .expect("azure_identity reads the PKCS#12");
    let token = credential.get_token(&[ARM], None).await.expect("a token");
    let c = claims(token.token.secret());
    assert_eq!(
        (c["oid"].as_str(), c["appidacr"].as_str()),
        (Some(OID), Some("2"))
    );
    assert_eq!(entra.log()[0].credential, CredentialKind::Certificate);

    // a removed certificate no longer verifies
    assert!(entra.remove_certificate(CLIENT, cert.cert_der()));
    let text = token_error(&*credential, &["https://vault.azure.net/.default"]).await;
    assert!(text.contains("AADSTS700027"), "{text}");
}

#[tokio::test]
async fn ps256_and_every_thumbprint_spelling_are_accepted() {
    let cert = ClientCertificate::generate("podid-app").unwrap();
    let entra = EntraMock::builder()
        .app(App::new(TENANT, CLIENT).certificate(cert.cert_der()))
        .start()
        .await
        .unwrap();
    let aud = entra.token_url(TENANT);
    for (alg, thumbprint) in [
        (JwtAlg::Rs256, Thumbprint::X5t),
        (JwtAlg::Rs256, Thumbprint::X5tUrl),
        (JwtAlg::Ps256, Thumbprint::X5tS256),
        (JwtAlg::Ps256, Thumbprint::X5t),
    ] {
        let assertion = Assertion::new(&cert, CLIENT, &aud)
            .alg(alg)
            .thumbprint(thumbprint)
            .sign();
        assertion_credential(&entra, CLIENT, assertion)
            .get_token(&[ARM], None)
            .await
            .unwrap_or_else(|e| panic!("{alg:?} {thumbprint:?}: {}", error_text(&e)));
    }
    assert_eq!(entra.stats().issued, 4);
}

#[tokio::test]
async fn certificate_assertions_fail_as_entra_fails_them() {
    let cert = ClientCertificate::generate("podid-app").unwrap();
    let foreign = ClientCertificate::generate("someone-else").unwrap();
    let entra = EntraMock::builder()
        .app(App::new(TENANT, CLIENT).certificate(cert.cert_der()))
        .start()
        .await
        .unwrap();
    let aud = entra.token_url(TENANT);

    // the registered thumbprint, signed by a foreign key
    let forged = Assertion::new(&cert, CLIENT, &aud).sign_with(&foreign);
    let text = token_error(
        &*assertion_credential(&entra, CLIENT, forged.clone()),
        &[ARM],
    )
    .await;
    assert!(text.contains("AADSTS700027"), "{text}");
    let d = assert_aad_error(
        &assertion_request(&entra, CLIENT, &forged, ARM).await,
        401,
        "invalid_client",
        700027,
    );
    assert!(
        d.contains("did not match the expected signature value"),
        "{d}"
    );

    // an unregistered certificate
    let unknown = Assertion::new(&foreign, CLIENT, &aud).sign();
    let d = assert_aad_error(
        &assertion_request(&entra, CLIENT, &unknown, ARM).await,
        401,
        "invalid_client",
        700027,
    );
    assert!(d.contains("The key was not found"), "{d}");
    let no_thumbprint = Assertion::new(&cert, CLIENT, &aud)
        .thumbprint(Thumbprint::None)
        .sign();
    assert_aad_error(
        &assertion_request(&entra, CLIENT, &no_thumbprint, ARM).await,
        401,
        "invalid_client",
        700027,
    );

    // aud must be the token URL the client posts to
    let wrong_aud = Assertion::new(
        &cert,
        CLIENT,
        "https://login.microsoftonline.com/x/oauth2/v2.0/token",
    )
    .sign();
    assert_aad_error(
        &assertion_request(&entra, CLIENT, &wrong_aud, ARM).await,
        401,
        "invalid_client",
        50013,
    );

    // sub must be the client id too
    let wrong_sub = Assertion::new(&cert, CLIENT, &aud)
        .subject("another")
        .sign();
    assert_aad_error(
        &assertion_request(&entra, CLIENT, &wrong_sub, ARM).await,
        401,
        "invalid_client",
        700021,
    );

    // outside its lifetime (beyond the clock skew Entra allows)
    let expired = Assertion::new(&cert, CLIENT, &aud)
        .not_before(SystemTime::now() - Duration::from_secs(3600))
        .sign();
    let d = assert_aad_error(
        &assertion_request(&entra, CLIENT, &expired, ARM).await,
        400,
        "invalid_grant",
        700024,
    );
    assert!(d.contains("not within its valid time range"), "{d}");
    let future = Assertion::new(&cert, CLIENT, &aud)
        .not_before(SystemTime::now() + Duration::from_secs(3600))
        .sign();
    assert_aad_error(
        &assertion_request(&entra, CLIENT, &future, ARM).await,
        400,
        "invalid_grant",
        700024,
    );
    let skewed = Assertion::new(&cert, CLIENT, &aud)
        .not_before(SystemTime::now() + Duration::from_secs(60))
        .sign();
    assert_eq!(
        assertion_request(&entra, CLIENT, &skewed, ARM).await.status,
        200
    );

    assert_aad_error(
        &assertion_request(&entra, CLIENT, "not-a-jwt", ARM).await,
        400,
        "invalid_request",
        50027,
    );
}

#[tokio::test]
async fn an_expired_registered_certificate_is_refused() {
    let now = SystemTime::now();
    let cert = ClientCertificate::generate_valid(
        "expired",
        now - Duration::from_secs(2 * 86_400),
        now - Duration::from_secs(86_400),
    )
    .unwrap();
    let entra = EntraMock::builder()
        .app(App::new(TENANT, CLIENT).certificate(cert.cert_der()))
        .start()
        .await
        .unwrap();
    let assertion = Assertion::new(&cert, CLIENT, &entra.token_url(TENANT)).sign();
    let d = assert_aad_error(
        &assertion_request(&entra, CLIENT, &assertion, ARM).await,
        401,
        "invalid_client",
        700027,
    );
    assert!(d.contains("The key used is expired"), "{d}");
}

fn federated_entra_app() -> App {
    App::new(TENANT, CLIENT)
        .object_id(OID)
        .federated(FederatedCredential::service_account(
            fakeapi::ISSUER,
            "apps",
            "reader",
        ))
        .federated(FederatedCredential::service_account(
            SA_ISSUER, "apps", "reader",
        ))
}

#[tokio::test]
async fn a_fake_api_server_service_account_token_is_a_valid_federated_assertion() {
    let api = FakeApiServer::start().await.unwrap();
    let accounts: Api<ServiceAccount> = Api::namespaced(api.client(), "apps");
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("reader".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    accounts
        .create(&PostParams::default(), &account)
        .await
        .unwrap();
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![TOKEN_EXCHANGE_AUDIENCE.into()],
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let issued = accounts
        .create_token_request("reader", &PostParams::default(), &request)
        .await
        .unwrap();
    let sa_token = issued.status.unwrap().token;

    let entra = EntraMock::builder()
        .app(federated_entra_app())
        .start()
        .await
        .unwrap();
    let token = assertion_credential(&entra, CLIENT, sa_token)
        .get_token(&[ARM], None)
        .await
        .unwrap_or_else(|e| panic!("{}", error_text(&e)));
    assert_eq!(claims(token.token.secret())["oid"], OID);
    assert_eq!(entra.log()[0].credential, CredentialKind::Federated);
}

fn issued_token_for(issuer: &str, namespace: &str, name: &str) -> String {
    jwt::service_account_token(
        issuer,
        namespace,
        name,
        &[TOKEN_EXCHANGE_AUDIENCE],
        SystemTime::now(),
        Duration::from_secs(3600),
    )
}

#[tokio::test]
async fn federated_assertions_must_match_a_credential_and_be_current() {
    let entra = EntraMock::builder()
        .app(federated_entra_app())
        .start()
        .await
        .unwrap();
    let ok = issued_token_for(SA_ISSUER, "apps", "reader");
    assertion_credential(&entra, CLIENT, ok.clone())
        .get_token(&[ARM], None)
        .await
        .unwrap();

    let other_subject = issued_token_for(SA_ISSUER, "apps", "writer");
    let text = token_error(
        &*assertion_credential(&entra, CLIENT, other_subject.clone()),
        &[ARM],
    )
    .await;
    assert!(text.contains("AADSTS70021"), "{text}");
    let d = assert_aad_error(
        &assertion_request(&entra, CLIENT, &other_subject, ARM).await,
        400,
        "invalid_grant",
        70021,
    );
    assert!(
        d.contains("Assertion Subject: 'system:serviceaccount:apps:writer'"),
        "{d}"
    );

    let other_issuer = issued_token_for("https://elsewhere.example", "apps", "reader");
    assert_aad_error(
        &assertion_request(&entra, CLIENT, &other_issuer, ARM).await,
        400,
        "invalid_grant",
        70021,
    );

    let expired = jwt::service_account_token(
        SA_ISSUER,
        "apps",
        "reader",
        &[TOKEN_EXCHANGE_AUDIENCE],
        SystemTime::now() - Duration::from_secs(7200),
        Duration::from_secs(3600),
    );
    let text = token_error(
        &*assertion_credential(&entra, CLIENT, expired.clone()),
        &[ARM],
    )
    .await;
    assert!(text.contains("AADSTS700024"), "{text}");
    assert_aad_error(
        &assertion_request(&entra, CLIENT, &expired, ARM).await,
        400,
        "invalid_grant",
        700024,
    );

    let wrong_audience = jwt::service_account_token(
        SA_ISSUER,
        "apps",
        "reader",
        &["https://kubernetes.default.svc"],
        SystemTime::now(),
        Duration::from_secs(600),
    );
    assert_aad_error(
        &assertion_request(&entra, CLIENT, &wrong_audience, ARM).await,
        400,
        "invalid_grant",
        700212,
    );

    // credentials change at runtime
    assert!(entra.remove_federated(CLIENT, SA_ISSUER, "system:serviceaccount:apps:reader"));
    assert_aad_error(
        &assertion_request(&entra, CLIENT, &ok, ARM).await,
        400,
        "invalid_grant",
        70021,
    );
    entra
        .add_federated(
            CLIENT,
            FederatedCredential::service_account(SA_ISSUER, "apps", "writer"),
        )
        .unwrap();
    assert_eq!(
        assertion_request(&entra, CLIENT, &other_subject, ARM)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn scopes_map_to_one_known_resource() {
    let entra = entra_with_secret_app().await;
    let credential = secret_credential(&entra, TENANT, CLIENT, SECRET);
    // azure_identity joins several scopes with spaces; Entra takes one resource per token
    let text = token_error(&*credential, &[ARM, "https://vault.azure.net/.default"]).await;
    assert!(text.contains("AADSTS70011"), "{text}");
    assert_aad_error(
        &secret_request(
            &entra,
            CLIENT,
            SECRET,
            "https://vault.azure.net/.default https://graph.microsoft.com/.default",
        )
        .await,
        400,
        "invalid_scope",
        70011,
    );
    assert_aad_error(
        &secret_request(
            &entra,
            CLIENT,
            SECRET,
            "https://vault.azure.net/user_impersonation",
        )
        .await,
        400,
        "invalid_scope",
        1002012,
    );
    let d = assert_aad_error(
        &secret_request(&entra, CLIENT, SECRET, "https://unknown.example/.default").await,
        400,
        "invalid_resource",
        500011,
    );
    assert!(
        d.contains(
            "The resource principal named https://unknown.example was not found in the tenant"
        ),
        "{d}"
    );
    let text = token_error(&*credential, &["https://unknown.example/.default"]).await;
    assert!(text.contains("AADSTS500011"), "{text}");

    entra.allow_resource("https://unknown.example");
    assert_eq!(
        secret_request(&entra, CLIENT, SECRET, "https://unknown.example/.default")
            .await
            .status,
        200
    );
    for known in [
        "https://vault.azure.net/.default",
        "https://storage.azure.com//.default",
        "https://graph.microsoft.com/.default",
        "https://management.core.windows.net//.default",
    ] {
        assert_eq!(
            secret_request(&entra, CLIENT, SECRET, known).await.status,
            200,
            "{known}"
        );
    }
}

#[tokio::test]
async fn tenants_apps_and_parameters_are_checked() {
    let entra = EntraMock::builder()
        .tenant(Tenant::new(TENANT).domain("podid.onmicrosoft.com"))
        .app(App::new(TENANT, CLIENT).secret(SECRET))
        .app(App::new(OTHER_TENANT, "other-tenant-app").secret(SECRET))
        .start()
        .await
        .unwrap();
    // the app exists, but in another tenant
    let text = token_error(
        &*secret_credential(&entra, OTHER_TENANT, CLIENT, SECRET),
        &[ARM],
    )
    .await;
    assert!(text.contains("AADSTS700016"), "{text}");
    assert_aad_error(
        &secret_request(&entra, "no-such-app", SECRET, ARM).await,
        400,
        "unauthorized_client",
        700016,
    );
    let unknown_tenant = post_token(
        &entra,
        "11111111-2222-4333-8444-555555555555",
        &[("client_id", CLIENT)],
    )
    .await;
    assert_aad_error(&unknown_tenant, 400, "invalid_request", 90002);
    // a domain name selects its tenant
    secret_credential(&entra, "podid.onmicrosoft.com", CLIENT, SECRET)
        .get_token(&[ARM], None)
        .await
        .unwrap();

    let missing_grant = post_token(&entra, TENANT, &[("client_id", CLIENT)]).await;
    assert!(
        assert_aad_error(&missing_grant, 400, "invalid_request", 900144).contains("'grant_type'")
    );
    let wrong_grant = post_token(
        &entra,
        TENANT,
        &[("grant_type", "password"), ("client_id", CLIENT)],
    )
    .await;
    assert_aad_error(&wrong_grant, 400, "unsupported_grant_type", 70003);
    let no_scope = post_token(
        &entra,
        TENANT,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("client_secret", SECRET),
        ],
    )
    .await;
    assert!(assert_aad_error(&no_scope, 400, "invalid_request", 900144).contains("'scope'"));
    let no_credential = post_token(
        &entra,
        TENANT,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("scope", ARM),
        ],
    )
    .await;
    assert_aad_error(&no_credential, 401, "invalid_client", 7000216);

    let client = tls_client(&entra);
    let get = answer(client.get(entra.token_url(TENANT)).send().await.unwrap()).await;
    assert_aad_error(&get, 405, "invalid_request", 900561);
    let elsewhere = answer(
        client
            .get(format!(
                "{}/common/discovery/instance",
                entra.authority_host()
            ))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(elsewhere.status, 404);
}

#[tokio::test]
async fn a_client_request_id_becomes_the_correlation_id() {
    let entra = entra_with_secret_app().await;
    let id = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0";
    let response = tls_client(&entra)
        .post(entra.token_url(TENANT))
        .header("client-request-id", id)
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap();
    let a = answer(response).await;
    assert_eq!(a.json()["correlation_id"], id);
}

#[tokio::test]
async fn throttling_and_outages_are_injected_with_retry_after() {
    let entra = entra_with_secret_app().await;
    entra.inject(FaultTarget::Any, Fault::throttled(7), 1);
    entra.inject(FaultTarget::Any, Fault::unavailable(3), 1);
    entra.inject(FaultTarget::Any, Fault::status(500), 1);
    assert_eq!(entra.pending_faults(), 3);

    let credential = secret_credential(&entra, TENANT, CLIENT, SECRET);
    let text = token_error(&*credential, &[ARM]).await;
    assert!(text.contains("AADSTS90055"), "{text}");
    let a = secret_request(&entra, CLIENT, SECRET, ARM).await;
    assert_aad_error(&a, 503, "temporarily_unavailable", 90033);
    assert_eq!(a.header("retry-after"), Some("3"));
    let a = secret_request(&entra, CLIENT, SECRET, ARM).await;
    assert_aad_error(&a, 500, "server_error", 50000);
    assert_eq!(a.header("retry-after"), None);
    // the queue ran out: back to normal
    credential
        .get_token(&[ARM], None)
        .await
        .expect("a token after the faults");

    let outcomes: Vec<EntraOutcome> = entra.log().into_iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        [
            EntraOutcome::Injected { status: 429 },
            EntraOutcome::Injected { status: 503 },
            EntraOutcome::Injected { status: 500 },
            EntraOutcome::Issued { expires_in: 3599 },
        ]
    );
    assert_eq!(entra.stats().injected, 3);

    // raw 429 shape
    entra.inject(FaultTarget::Any, Fault::throttled(7), 1);
    let a = secret_request(&entra, CLIENT, SECRET, ARM).await;
    assert_aad_error(&a, 429, "temporarily_unavailable", 90055);
    assert_eq!(a.header("retry-after"), Some("7"));
}

#[tokio::test]
async fn azure_identity_retries_after_retry_after() {
    let entra = entra_with_secret_app().await;
    entra.inject(FaultTarget::Client(CLIENT.into()), Fault::throttled(1), 1);
    let mut options = entra_options(&entra);
    options.retry = RetryOptions::default();
    let credential = ClientSecretCredential::new(
        TENANT,
        CLIENT.into(),
        Secret::new(SECRET),
        Some(ClientSecretCredentialOptions {
            client_options: options,
        }),
    )
    .unwrap();
    let started = Instant::now();
    credential
        .get_token(&[ARM], None)
        .await
        .expect("the retry succeeds");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(entra.requests_for(CLIENT).len(), 2);
}

#[tokio::test]
async fn faults_can_target_one_app_delay_or_reset() {
    let entra = EntraMock::builder()
        .app(App::new(TENANT, CLIENT).secret(SECRET))
        .app(App::new(TENANT, "healthy-app").secret(SECRET))
        .start()
        .await
        .unwrap();
    entra.inject(FaultTarget::Client(CLIENT.into()), Fault::unavailable(1), 1);
    assert_eq!(
        secret_request(&entra, "healthy-app", SECRET, ARM)
            .await
            .status,
        200
    );
    assert_eq!(
        secret_request(&entra, CLIENT, SECRET, ARM).await.status,
        503
    );

    entra.inject(
        FaultTarget::Any,
        Fault::Delay(Duration::from_millis(300)),
        1,
    );
    let started = Instant::now();
    assert_eq!(
        secret_request(&entra, CLIENT, SECRET, ARM).await.status,
        200
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        entra.log().last().unwrap().delayed,
        Some(Duration::from_millis(300))
    );

    entra.inject(FaultTarget::Any, Fault::Reset, 1);
    let body = format!(
        "client_id={CLIENT}&client_secret={SECRET}&grant_type=client_credentials&scope={ARM}"
    );
    let err = tls_client(&entra)
        .post(entra.token_url(TENANT))
        .body(body)
        .send()
        .await
        .expect_err("the connection is reset");
    assert!(!err.is_status(), "{err:?}");
    assert_eq!(entra.log().last().unwrap().outcome, EntraOutcome::Reset);
    // the server goes on serving new connections
    assert_eq!(
        secret_request(&entra, CLIENT, SECRET, ARM).await.status,
        200
    );
}

#[tokio::test]
async fn a_string_expires_in_breaks_azure_identity() {
    // imds.md §3.5: the v2 response needs a JSON number; Raw faults reproduce bad upstreams
    let entra = entra_with_secret_app().await;
    let body = r#"{"token_type":"Bearer","expires_in":"3599","ext_expires_in":"3599","access_token":"x.y.z"}"#;
    entra.inject(
        FaultTarget::Any,
        Fault::raw(200, "application/json; charset=utf-8", body),
        1,
    );
    let err = secret_credential(&entra, TENANT, CLIENT, SECRET)
        .get_token(&[ARM], None)
        .await
        .expect_err("a string expires_in does not parse");
    assert!(
        error_text(&err).contains("invalid type: string"),
        "{}",
        error_text(&err)
    );
}

#[tokio::test]
async fn entra_serves_a_listener_the_caller_bound_and_shuts_down() {
    // as the netns harness does: bind elsewhere, hand the socket over
    let listener = std::thread::spawn(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .join()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let ca = Arc::new(TestCa::generate().unwrap());
    let entra = EntraMock::builder()
        .host("login.podid.test")
        .ca(Arc::clone(&ca))
        .app(App::new(TENANT, CLIENT).secret(SECRET))
        .start_on(listener)
        .await
        .unwrap();
    assert_eq!(entra.addr(), addr);
    assert_eq!(
        entra.authority_host(),
        format!("https://login.podid.test:{}", addr.port())
    );
    assert_eq!(entra.ca_pem(), ca.pem());
    let dir = tempfile::tempdir().unwrap();
    entra.write_ca_pem(&dir.path().join("ca.pem")).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
        ca.pem()
    );
    secret_credential(&entra, TENANT, CLIENT, SECRET)
        .get_token(&[ARM], None)
        .await
        .unwrap();

    // the certificate also names 127.0.0.1
    let by_ip = trusting_client(&ca).no_proxy().build().unwrap();
    let a = answer(
        by_ip
            .post(format!("https://{addr}/{TENANT}/oauth2/v2.0/token"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, 400);

    entra.shutdown().await;
    assert!(std::net::TcpStream::connect(addr).is_err());
}

// ---------------------------------------------------------------------------------------------
// Mock IMDS

const API: &str = "2018-02-01";

struct Node {
    imds: ImdsMock,
    a: ManagedIdentity,
    b: ManagedIdentity,
    instance: InstanceMetadata,
}

async fn node_with_two_identities() -> Node {
    let instance = InstanceMetadata::default();
    let a = ManagedIdentity::user_assigned(&instance, "podid-a");
    let b = ManagedIdentity::user_assigned(&instance, "podid-b");
    let imds = ImdsMock::builder()
        .tenant(TENANT)
        .attach(a.clone())
        .attach(b.clone())
        .start()
        .await
        .unwrap();
    Node {
        imds,
        a,
        b,
        instance,
    }
}

fn plain_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn imds_get(imds: &ImdsMock, path_and_query: &str, metadata: Option<&str>) -> Answer {
    let mut request = plain_client().get(format!("{}{path_and_query}", imds.url()));
    if let Some(value) = metadata {
        request = request.header("Metadata", value);
    }
    answer(request.send().await.expect("the mock answers")).await
}

fn token_query(resource: &str, selector: &str) -> String {
    let resource: String = form_urlencoded::byte_serialize(resource.as_bytes()).collect();
    format!("/metadata/identity/oauth2/token?api-version={API}&resource={resource}{selector}")
}

fn assert_imds_error(a: &Answer, status: u16, error: &str, description: &str) {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(
        a.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(
        a.json(),
        json!({"error": error, "error_description": description})
    );
}

#[tokio::test]
async fn managed_identity_credential_gets_a_token_by_client_id() {
    let node = node_with_two_identities().await;
    let mut options = ClientOptions {
        transport: Some(Transport::new(Arc::new(ToLoopback {
            inner: plain_client(),
            imds: Url::parse(&node.imds.url()).unwrap(),
        }))),
        ..Default::default()
    };
    options.retry = RetryOptions::none();
    let credential = ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
        user_assigned_id: Some(UserAssignedId::ClientId(node.b.client_id.clone())),
        client_options: options,
    }))
    .unwrap();
    let token = credential.get_token(&[ARM], None).await.expect("a token");
    let c = claims(token.token.secret());
    assert_eq!(c["aud"], "https://management.azure.com");
    assert_eq!(c["oid"], node.b.object_id);
    assert_eq!(c["appid"], node.b.client_id);
    assert_eq!(c["xms_mirid"], node.b.resource_id);
    assert_eq!(c["tid"], TENANT);
    // azure_identity takes expires_on from the body: the token's exp
    assert_eq!(
        token.expires_on.unix_timestamp(),
        c["exp"].as_i64().unwrap()
    );

    let log = node.imds.log();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].api_version.as_deref(), Some("2019-08-01"));
    assert_eq!(
        log[0].resource.as_deref(),
        Some("https://management.azure.com")
    );
    assert_eq!(
        log[0].selector,
        Some(Selector::ClientId(node.b.client_id.clone()))
    );
    assert_eq!(log[0].outcome, ImdsOutcome::Issued { cached: false });
    assert!(!format!("{log:?}").contains(token.token.secret()));
}

#[tokio::test]
async fn token_bodies_are_all_strings_in_imds_order() {
    let node = node_with_two_identities().await;
    for resource in [
        "https://management.azure.com",
        "https://management.azure.com/",
        "https://vault.azure.net",
        "cfa8b339-82a2-471a-a3c9-0fc0be7a4093",
    ] {
        let before = now();
        let a = imds_get(
            &node.imds,
            &token_query(resource, &format!("&client_id={}", node.a.client_id)),
            Some("true"),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(
            a.header("content-type"),
            Some("application/json; charset=utf-8")
        );
        assert_eq!(a.header("server"), Some("IMDS/150.870.65.1015"));
        let body = a.json();
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
                "resource",
                "token_type"
            ]
        );
        assert!(object.values().all(Value::is_string), "{body}");
        let int = |k: &str| body[k].as_str().unwrap().parse::<i64>().unwrap();
        assert_eq!(int("expires_in"), 86_399);
        assert!((int("expires_on") - before - int("expires_in")).abs() <= 2);
        assert_eq!(int("ext_expires_in"), int("expires_in"));
        assert!((int("not_before") - before).abs() <= 2);
        assert_eq!(body["resource"], resource, "echoed byte for byte");
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["client_id"], node.a.client_id);
        let c = claims(body["access_token"].as_str().unwrap());
        assert_eq!(c["aud"], resource);
        assert_eq!(c["oid"], node.a.object_id);
        assert_eq!(c["azp"], node.a.client_id);
        assert_eq!(c["exp"].as_i64().unwrap(), int("expires_on"));
    }
}

#[tokio::test]
async fn the_metadata_header_is_required() {
    let node = node_with_two_identities().await;
    let selector = format!("&client_id={}", node.a.client_id);
    for probe in [
        "/metadata/identity/oauth2/token".to_string(),
        token_query(ARM, ""),
        token_query("https://management.azure.com", &selector),
        format!("/metadata/identity/oauth2/token?api-version={API}&msi-res-id=x"),
    ] {
        let a = imds_get(&node.imds, &probe, None).await;
        assert_imds_error(
            &a,
            400,
            "invalid_request",
            "Required metadata header not specified",
        );
        assert!(!a.body.contains("Identity not found"));
    }
    let a = imds_get(
        &node.imds,
        &token_query("https://management.azure.com", &selector),
        Some("false"),
    )
    .await;
    assert_imds_error(
        &a,
        400,
        "invalid_request",
        "Required metadata header not specified",
    );
    let a = imds_get(
        &node.imds,
        &token_query("https://management.azure.com", &selector),
        Some("True"),
    )
    .await;
    assert_eq!(a.status, 200);
    let a = imds_get(
        &node.imds,
        "/metadata/instance?api-version=2021-02-01",
        None,
    )
    .await;
    assert_imds_error(
        &a,
        400,
        "invalid_request",
        "Required metadata header not specified",
    );
    assert!(node.imds.log().iter().take(5).all(|r| !r.metadata_header));
}

#[tokio::test]
async fn selectors_pick_attached_identities_only() {
    let node = node_with_two_identities().await;
    let res = "https://vault.azure.net";
    let oid_of = |a: &Answer| {
        claims(a.json()["access_token"].as_str().unwrap())["oid"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for selector in [
        format!("&client_id={}", node.a.client_id),
        format!("&client_id={}", node.a.client_id.to_ascii_uppercase()),
        format!("&object_id={}", node.a.object_id),
        format!("&msi_res_id={}", node.a.resource_id),
        format!("&msi_res_id={}", node.a.resource_id.to_ascii_lowercase()),
    ] {
        let a = imds_get(&node.imds, &token_query(res, &selector), Some("true")).await;
        assert_eq!(a.status, 200, "{selector}: {}", a.body);
        assert_eq!(oid_of(&a), node.a.object_id, "{selector}");
    }
    let unattached = ManagedIdentity::user_assigned(&node.instance, "not-here");
    let a = imds_get(
        &node.imds,
        &token_query(res, &format!("&client_id={}", unattached.client_id)),
        Some("true"),
    )
    .await;
    assert_imds_error(&a, 400, "invalid_request", "Identity not found");
    // no selector, two user-assigned identities and no system identity
    let a = imds_get(&node.imds, &token_query(res, ""), Some("true")).await;
    assert_imds_error(&a, 400, "invalid_request", "Identity not found");
    let both = format!(
        "&client_id={}&object_id={}",
        node.a.client_id, node.b.object_id
    );
    let a = imds_get(&node.imds, &token_query(res, &both), Some("true")).await;
    assert_eq!(
        (a.status, a.json()["error"].as_str()),
        (400, Some("invalid_request"))
    );

    // attach and detach at runtime
    node.imds.attach(unattached.clone());
    let a = imds_get(
        &node.imds,
        &token_query(res, &format!("&object_id={}", unattached.object_id)),
        Some("true"),
    )
    .await;
    assert_eq!(oid_of(&a), unattached.object_id);
    assert!(node.imds.detach(&unattached.client_id));
    assert!(node.imds.detach(&node.b.client_id));
    let a = imds_get(
        &node.imds,
        &token_query(res, &format!("&object_id={}", unattached.object_id)),
        Some("true"),
    )
    .await;
    assert_imds_error(&a, 400, "invalid_request", "Identity not found");
    // IMDS needs no selector when one identity is left
    let a = imds_get(&node.imds, &token_query(res, ""), Some("true")).await;
    assert_eq!(oid_of(&a), node.a.object_id);

    // the system-assigned identity answers requests without a selector
    let system = ManagedIdentity::system_assigned(&node.instance);
    node.imds.set_system_identity(Some(system.clone()));
    let a = imds_get(&node.imds, &token_query(res, ""), Some("true")).await;
    let c = claims(a.json()["access_token"].as_str().unwrap());
    assert_eq!(c["oid"], system.object_id);
    assert_eq!(c["xms_mirid"], node.instance.resource_id());
    assert_eq!(node.imds.identities(), vec![node.a.clone()]);
}

#[tokio::test]
async fn parameters_are_validated_like_imds() {
    let node = node_with_two_identities().await;
    let selector = format!("&client_id={}", node.a.client_id);
    let a = imds_get(
        &node.imds,
        "/metadata/identity/oauth2/token?resource=https://vault.azure.net",
        Some("true"),
    )
    .await;
    assert_imds_error(
        &a,
        400,
        "invalid_request",
        "api-version is invalid or was not specified in the request",
    );
    let a = imds_get(
        &node.imds,
        &token_query("https://vault.azure.net", &selector).replace(API, "1999-01-01"),
        Some("true"),
    )
    .await;
    assert_eq!(a.status, 400);
    for version in ["2018-02-01", "2019-08-01", "2023-07-01"] {
        let a = imds_get(
            &node.imds,
            &token_query("https://vault.azure.net", &selector).replace(API, version),
            Some("true"),
        )
        .await;
        assert_eq!(a.status, 200, "{version}");
    }
    let a = imds_get(
        &node.imds,
        &format!("/metadata/identity/oauth2/token?api-version={API}&resource={selector}"),
        Some("true"),
    )
    .await;
    assert_imds_error(
        &a,
        400,
        "invalid_request",
        "Required query variable 'resource' is missing",
    );
    let a = imds_get(
        &node.imds,
        &format!(
            "{}&resource=https://vault.azure.net",
            token_query("https://vault.azure.net", &selector)
        ),
        Some("true"),
    )
    .await;
    assert_eq!(
        (a.status, a.json()["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let a = imds_get(
        &node.imds,
        &token_query("https://unknown.example", &selector),
        Some("true"),
    )
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"], "invalid_resource");
    assert!(
        a.json()["error_description"].as_str().unwrap().starts_with(
            "AADSTS50001: The application named https://unknown.example was not found"
        )
    );

    // paths: doubled slashes, capitals and a trailing slash are served
    for path in [
        "//metadata/identity/oauth2/token",
        "/Metadata/identity/oauth2/token",
        "/metadata/identity/oauth2/token/",
    ] {
        let query = token_query("https://vault.azure.net", &selector);
        let a = imds_get(
            &node.imds,
            &query.replace("/metadata/identity/oauth2/token", path),
            Some("true"),
        )
        .await;
        assert_eq!(a.status, 200, "{path}");
    }
    let post = plain_client()
        .post(format!(
            "{}{}",
            node.imds.url(),
            token_query("https://vault.azure.net", &selector)
        ))
        .header("Metadata", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(answer(post).await.status, 405);
    let forwarded = plain_client()
        .get(format!(
            "{}{}",
            node.imds.url(),
            token_query("https://vault.azure.net", &selector)
        ))
        .header("Metadata", "true")
        .header("X-Forwarded-For", "10.0.0.1")
        .send()
        .await
        .unwrap();
    assert_imds_error(
        &answer(forwarded).await,
        400,
        "invalid_request",
        "Request contains X-Forwarded-For header",
    );
}

#[tokio::test]
async fn tokens_are_cached_per_identity_and_resource_as_imds_does() {
    let node = node_with_two_identities().await;
    let query = token_query(
        "https://vault.azure.net",
        &format!("&client_id={}", node.a.client_id),
    );
    let token = |a: Answer| a.json()["access_token"].as_str().unwrap().to_string();
    let first = token(imds_get(&node.imds, &query, Some("true")).await);
    let second = token(imds_get(&node.imds, &query, Some("true")).await);
    assert_eq!(first, second);
    let other_resource = token(
        imds_get(
            &node.imds,
            &token_query(
                "https://vault.azure.net/",
                &format!("&client_id={}", node.a.client_id),
            ),
            Some("true"),
        )
        .await,
    );
    assert_ne!(first, other_resource);
    let bypassed = token(
        imds_get(
            &node.imds,
            &format!("{query}&bypass_cache=true"),
            Some("true"),
        )
        .await,
    );
    assert_ne!(first, bypassed);
    let stats = node.imds.stats();
    assert_eq!((stats.issued, stats.cached), (3, 1));

    // a token close to its end is replaced
    node.imds.set_token_lifetime(Duration::from_secs(2));
    node.imds.clear_token_cache();
    let short = token(imds_get(&node.imds, &query, Some("true")).await);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_ne!(
        short,
        token(imds_get(&node.imds, &query, Some("true")).await)
    );

    let uncached = ImdsMock::builder()
        .attach(node.a.clone())
        .cache_tokens(false)
        .start()
        .await
        .unwrap();
    let one = token(imds_get(&uncached, &query, Some("true")).await);
    assert_ne!(one, token(imds_get(&uncached, &query, Some("true")).await));
}

#[tokio::test]
async fn instance_metadata_and_the_other_routes() {
    let node = node_with_two_identities().await;
    let a = imds_get(
        &node.imds,
        "/metadata/instance?api-version=2021-02-01",
        Some("true"),
    )
    .await;
    assert_eq!(a.status, 200);
    let doc = a.json();
    assert_eq!(doc["compute"]["name"], node.instance.name);
    assert_eq!(doc["compute"]["resourceId"], node.instance.resource_id());
    assert_eq!(
        doc["network"]["interface"][0]["ipv4"]["ipAddress"][0]["privateIpAddress"],
        "10.224.0.4"
    );
    fn all_strings(v: &Value) -> bool {
        match v {
            Value::String(_) => true,
            Value::Object(m) => m.values().all(all_strings),
            Value::Array(a) => a.iter().all(all_strings),
            _ => false,
        }
    }
    assert!(all_strings(&doc));
    let a = imds_get(
        &node.imds,
        "/metadata/instance/compute?api-version=2021-02-01",
        Some("true"),
    )
    .await;
    assert_eq!(a.json()["location"], "westeurope");
    let a = imds_get(
        &node.imds,
        "/metadata/instance/compute/location?api-version=2021-02-01&format=text",
        Some("true"),
    )
    .await;
    assert_eq!((a.status, a.body.as_str()), (200, "westeurope"));
    let a = imds_get(
        &node.imds,
        "/metadata/instance/compute/location?api-version=2021-02-01",
        Some("true"),
    )
    .await;
    assert_eq!(a.status, 400);
    let a = imds_get(
        &node.imds,
        "/metadata/instance/network/interface/0/macAddress?api-version=2021-02-01&format=text",
        Some("true"),
    )
    .await;
    assert_eq!(a.body, "000D3A2B4C5D");
    let a = imds_get(&node.imds, "/metadata/instance", Some("true")).await;
    assert_eq!(a.status, 400);
    assert!(
        a.json()["error"]
            .as_str()
            .unwrap()
            .contains("api-version is invalid")
    );
    assert!(a.json()["newest-versions"].is_array());

    let a = imds_get(&node.imds, "/metadata/versions", Some("true")).await;
    assert!(
        a.json()["apiVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("2019-08-01"))
    );
    let a = imds_get(
        &node.imds,
        "/metadata/identity/info?api-version=2018-02-01",
        Some("true"),
    )
    .await;
    assert_eq!(a.json(), json!({"tenantId": TENANT}));

    // IMDSv2 detection must find nothing, header or not
    for header in [None, Some("true")] {
        let a = imds_get(
            &node.imds,
            "/metadata/identity/getplatformmetadata?cred-api-version=2.0",
            header,
        )
        .await;
        assert_eq!((a.status, a.json()), (404, json!({"error": "not_found"})));
    }
    assert_eq!(
        imds_get(&node.imds, "/metadata/nothing", Some("true"))
            .await
            .status,
        404
    );
    assert_eq!(imds_get(&node.imds, "/", None).await.status, 404);
    let routes: Vec<ImdsRoute> = node.imds.log().iter().map(|r| r.route).collect();
    assert_eq!(routes[0], ImdsRoute::Instance);
    assert!(routes.contains(&ImdsRoute::PlatformMetadata) && routes.contains(&ImdsRoute::Versions));
}

#[tokio::test]
async fn imds_faults_target_all_or_one_identity() {
    let node = node_with_two_identities().await;
    let query_a = token_query(
        "https://vault.azure.net",
        &format!("&client_id={}", node.a.client_id),
    );
    let query_b = token_query(
        "https://vault.azure.net",
        &format!("&client_id={}", node.b.client_id),
    );

    node.imds.inject(FaultTarget::Any, Fault::status(500), 1);
    let a = imds_get(&node.imds, &query_a, Some("true")).await;
    assert_eq!(a.status, 500);
    assert_eq!(a.json()["error"], "unknown");
    assert!(
        a.json()["error_description"]
            .as_str()
            .unwrap()
            .starts_with("Failed to retrieve token from the Active directory")
    );

    node.imds.inject(FaultTarget::Any, Fault::unavailable(5), 1);
    let a = imds_get(&node.imds, &query_a, Some("true")).await;
    assert_eq!((a.status, a.header("retry-after")), (503, Some("5")));
    node.imds.inject(FaultTarget::Any, Fault::throttled(2), 1);
    let a = imds_get(&node.imds, &query_a, Some("true")).await;
    assert_eq!((a.status, a.header("retry-after")), (429, Some("2")));
    assert_eq!(a.json()["error"], "too_many_requests");

    node.imds.inject(
        FaultTarget::Client(node.b.client_id.clone()),
        Fault::status(500),
        2,
    );
    assert_eq!(
        imds_get(&node.imds, &query_a, Some("true")).await.status,
        200
    );
    assert_eq!(
        imds_get(&node.imds, &query_b, Some("true")).await.status,
        500
    );
    assert_eq!(node.imds.pending_faults(), 1);
    node.imds.clear_faults();
    assert_eq!(
        imds_get(&node.imds, &query_b, Some("true")).await.status,
        200
    );

    // header-less probes never consume faults
    node.imds.inject(FaultTarget::Any, Fault::status(500), 1);
    assert_eq!(imds_get(&node.imds, &query_a, None).await.status, 400);
    assert_eq!(node.imds.pending_faults(), 1);
    node.imds.clear_faults();

    node.imds.inject(
        FaultTarget::Any,
        Fault::Delay(Duration::from_millis(250)),
        1,
    );
    let started = Instant::now();
    assert_eq!(
        imds_get(&node.imds, &query_a, Some("true")).await.status,
        200
    );
    assert!(started.elapsed() >= Duration::from_millis(250));

    node.imds.inject(FaultTarget::Any, Fault::Reset, 1);
    let err = plain_client()
        .get(format!("{}{query_a}", node.imds.url()))
        .header("Metadata", "true")
        .send()
        .await
        .expect_err("reset");
    assert!(!err.is_status());

    node.imds.inject(
        FaultTarget::Any,
        Fault::raw(200, "text/plain", "not json"),
        1,
    );
    assert_eq!(
        imds_get(&node.imds, &query_a, Some("true")).await.body,
        "not json"
    );

    let outcomes: Vec<ImdsOutcome> = node.imds.log().into_iter().map(|r| r.outcome).collect();
    assert!(outcomes.contains(&ImdsOutcome::Reset));
    assert!(outcomes.contains(&ImdsOutcome::Injected { status: 503 }));
    let stats = node.imds.stats();
    assert_eq!(stats.injected, 6);
    assert_eq!(
        stats.requests,
        stats.issued + stats.cached + stats.served + stats.rejected + stats.injected
    );
}

#[tokio::test]
async fn imds_serves_a_listener_the_caller_bound_and_shuts_down() {
    let listener = std::thread::spawn(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .join()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let imds = ImdsMock::builder().start_on(listener).await.unwrap();
    assert_eq!(imds.addr(), addr);
    assert_eq!(
        imds_get(&imds, "/metadata/versions", Some("true"))
            .await
            .status,
        200
    );
    imds.shutdown().await;
    assert!(std::net::TcpStream::connect(addr).is_err());

    let dropped = ImdsMock::start().await.unwrap();
    let addr = dropped.addr();
    drop(dropped);
    // the accept loop ends on its next turn of the runtime
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(std::net::TcpStream::connect(addr).is_err());
}

// ---------------------------------------------------------------------------------------------
// The mock-azure binary

#[tokio::test]
async fn the_mock_azure_binary_serves_its_configuration_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let cert = ClientCertificate::generate("from-config").unwrap();
    std::fs::write(dir.path().join("app.pem"), cert.cert_pem()).unwrap();
    let identity = ManagedIdentity::user_assigned(&InstanceMetadata::default(), "demo");
    let config = json!({
        "entra": {
            "host": "login.mock.test",
            "token_lifetime_seconds": 600,
            "apps": [{
                "tenant": TENANT,
                "client_id": CLIENT,
                "object_id": OID,
                "secrets": [SECRET],
                "certificates": ["app.pem"],
                "federated": [{"issuer": SA_ISSUER, "subject": "system:serviceaccount:apps:reader"}],
            }],
        },
        "imds": {"tenant": TENANT, "identities": [identity]},
    });
    let config_path = dir.path().join("mock-azure.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let ca_path = dir.path().join("ca.pem");

    let mut child = Command::new(env!("CARGO_BIN_EXE_mock-azure"))
        .arg("--config")
        .arg(&config_path)
        .arg("--ca-file")
        .arg(&ca_path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let entra_line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("entra's ready line");
    let imds_line = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("imds's ready line");
    // "entra listening on https://login.mock.test:<port> (127.0.0.1:<port>)"
    let entra_addr: SocketAddr = entra_line
        .rsplit_once('(')
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .expect("the line names the address")
        .parse()
        .unwrap();
    assert!(entra_line.starts_with(&format!(
        "entra listening on https://login.mock.test:{}",
        entra_addr.port()
    )));
    let imds_url = imds_line
        .strip_prefix("imds listening on ")
        .expect("imds's line")
        .to_string();

    // the CA file is what tokend gets with --ca-file: trust exactly its certificate
    let ca_der =
        podid_tests::mocks::tls::certificate_der(&std::fs::read(&ca_path).unwrap()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.into()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .resolve("login.mock.test", entra_addr)
        .no_proxy()
        .build()
        .unwrap();
    let response = client
        .post(format!(
            "https://login.mock.test:{}/{TENANT}/oauth2/v2.0/token",
            entra_addr.port()
        ))
        .body(form_body(&[
            ("client_id", CLIENT),
            ("client_secret", SECRET),
            ("grant_type", "client_credentials"),
            ("scope", ARM),
        ]))
        .send()
        .await
        .unwrap();
    let body = answer(response).await.json();
    assert_eq!(body["expires_in"], json!(600));
    assert_eq!(claims(body["access_token"].as_str().unwrap())["oid"], OID);
    let assertion = Assertion::new(
        &cert,
        CLIENT,
        &format!(
            "https://login.mock.test:{}/{TENANT}/oauth2/v2.0/token",
            entra_addr.port()
        ),
    )
    .sign();
    let response = client
        .post(format!(
            "https://login.mock.test:{}/{TENANT}/oauth2/v2.0/token",
            entra_addr.port()
        ))
        .body(form_body(&[
            ("client_assertion", assertion.as_str()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_id", CLIENT),
            ("grant_type", "client_credentials"),
            ("scope", ARM),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let response = plain_client()
        .get(format!("{imds_url}/metadata/identity/oauth2/token?api-version=2019-08-01&resource=https://vault.azure.net&client_id={}", identity.client_id))
        .header("Metadata", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "mock-azure did not exit on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn a_bad_configuration_names_the_failing_input() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.json");
    std::fs::write(&path, r#"{"entra": {"apps": [{"tenant": "t", "client_id": "c", "certificates": ["missing.pem"]}]}}"#).unwrap();
    let config = podid_tests::mocks::config::MockAzureConfig::from_file(&path).unwrap();
    let err = config
        .start(dir.path(), Arc::new(TestCa::generate().unwrap()))
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with("apps[c].certificates: "),
        "{err}"
    );
    std::fs::write(&path, r#"{"entra": {"hosts": "x"}}"#).unwrap();
    let err = podid_tests::mocks::config::MockAzureConfig::from_file(&path).unwrap_err();
    assert!(err.to_string().contains("unknown field `hosts`"), "{err}");
    // the mock module's own constants stay what the docs say
    assert_eq!(entra::DEFAULT_HOST, "login.mock.test");
    assert_eq!(imds::DEFAULT_TOKEN_LIFETIME, Duration::from_secs(86_399));
}
