//! An access token as tokend keeps it: the token, its real expiry, when it was fetched, and
//! what tokend may read from it without verifying it (the `oid` claim). Its `Debug` never
//! shows the token.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use sha2::{Digest, Sha256};

/// JWT segments are base64url without padding; some issuers pad anyway.
const JWT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Seconds since the epoch, now.
pub fn unix_now() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(elapsed) => i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

/// An access token from Entra ID or the node's IMDS.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    access_token: String,
    /// Unix seconds when the token expires, as upstream said.
    pub expires_on: i64,
    /// Unix seconds when tokend got the token (IMDS: its own `not_before`).
    pub not_before: i64,
    /// The client id upstream reported with the token, if it did (IMDS does).
    pub client_id: Option<String>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("expires_on", &self.expires_on)
            .field("not_before", &self.not_before)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl Token {
    pub fn new(access_token: String, expires_on: i64, not_before: i64) -> Self {
        Self {
            access_token,
            expires_on,
            not_before,
            client_id: None,
        }
    }

    pub fn with_client_id(mut self, client_id: Option<String>) -> Self {
        self.client_id = client_id.filter(|c| !c.is_empty());
        self
    }

    pub fn access_token(&self) -> &str {
        &self.access_token
    }

    /// Seconds between fetch and expiry.
    pub fn lifetime(&self) -> i64 {
        self.expires_on.saturating_sub(self.not_before)
    }

    /// Lower-case hex SHA-256 of the token, what `token_sha256_to_refresh` names.
    pub fn sha256_hex(&self) -> String {
        Sha256::digest(self.access_token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The `oid` claim (the identity's object id), read from the JWT payload without
    /// verifying the token: tokend got it from upstream itself and only learns which object
    /// id its identity has.
    pub fn object_id(&self) -> Option<String> {
        self.claims()?
            .get("oid")?
            .as_str()
            .filter(|oid| !oid.is_empty())
            .map(str::to_owned)
    }

    /// The `exp` claim, when the token is a JWT that has one.
    pub fn claimed_expiry(&self) -> Option<i64> {
        self.claims()?.get("exp")?.as_i64()
    }

    /// The token's real expiry: the earlier of `expires_on` as upstream reported it and the
    /// token's own `exp` (Entra reports a lifetime, which tokend can only add to its clock).
    pub fn with_claimed_expiry(mut self) -> Self {
        if let Some(exp) = self.claimed_expiry() {
            self.expires_on = self.expires_on.min(exp);
        }
        self
    }

    /// The JWT payload, decoded without verifying the token.
    fn claims(&self) -> Option<serde_json::Value> {
        let payload = self.access_token.split('.').nth(1)?;
        let bytes = JWT_BASE64.decode(payload).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            b64.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
            b64.encode(claims)
        )
    }

    #[test]
    fn object_id_comes_from_the_oid_claim() {
        let token = Token::new(jwt(r#"{"oid":"0f3c-OID","tid":"t"}"#), 10, 0);
        assert_eq!(token.object_id().as_deref(), Some("0f3c-OID"));
        // Padded segments decode too.
        let padded = format!(
            "x.{}.y",
            base64::engine::general_purpose::URL_SAFE.encode(r#"{"oid":"ab"}"#)
        );
        assert_eq!(Token::new(padded, 1, 0).object_id().as_deref(), Some("ab"));
        for opaque in [
            "opaque",
            "a.!!!.c",
            &jwt(r#"{"tid":"t"}"#),
            &jwt(r#"{"oid":""}"#),
            &jwt("[1]"),
        ] {
            assert_eq!(
                Token::new(opaque.to_string(), 1, 0).object_id(),
                None,
                "{opaque}"
            );
        }
    }

    #[test]
    fn the_claimed_expiry_wins_when_earlier() {
        let token = Token::new(jwt(r#"{"exp":1000}"#), 1001, 0).with_claimed_expiry();
        assert_eq!(token.expires_on, 1000);
        let token = Token::new(jwt(r#"{"exp":1000}"#), 999, 0).with_claimed_expiry();
        assert_eq!(token.expires_on, 999);
        let opaque = Token::new("opaque".into(), 1001, 0).with_claimed_expiry();
        assert_eq!(opaque.expires_on, 1001);
    }

    #[test]
    fn sha256_is_lower_case_hex() {
        let token = Token::new("abc".into(), 1, 0);
        assert_eq!(
            token.sha256_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn debug_never_shows_the_token() {
        let token =
            Token::new("secret-token-value".into(), 100, 40).with_client_id(Some("cid".into()));
        let shown = format!("{token:?}");
        assert!(!shown.contains("secret-token-value"), "{shown}");
        assert!(shown.contains("cid"));
        assert_eq!(token.lifetime(), 60);
        assert_eq!(
            Token::new("t".into(), 1, 0)
                .with_client_id(Some(String::new()))
                .client_id,
            None
        );
    }
}
