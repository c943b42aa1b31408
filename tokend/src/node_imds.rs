//! tokend's own small client of the node's instance metadata service (DESIGN.md "tokend
//! upstream credentials"): a GET with `Metadata: true`, short timeouts, and for token requests
//! a bounded retry (at most [`MAX_ATTEMPTS`] attempts within [`RETRY_BUDGET`], `Retry-After`
//! honoured when it fits). Not `azure_identity`'s ManagedIdentityCredential, which retries
//! for about 100 s whatever its options say. Never through a proxy.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::Url;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};

use crate::imds::Selector;

/// Connect timeout to the node's IMDS (link-local, one hop).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of one attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts of one token request at most.
pub const MAX_ATTEMPTS: u32 = 3;
/// A retry is not started once this much time has passed since the first attempt.
pub const RETRY_BUDGET: Duration = Duration::from_secs(4);
/// Pause before the first retry; doubled for each further one.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest answer read from IMDS.
const MAX_BODY: usize = 1 << 20;

/// Why the node's IMDS gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum NodeImdsError {
    #[error("no answer from the node's IMDS at {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the node's IMDS answer is larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("cannot build a request to the node's IMDS for path {path:?}: {reason}")]
    Url { path: String, reason: String },
}

/// An answer of the node's IMDS, whatever its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsAnswer {
    pub status: u16,
    pub content_type: Option<String>,
    pub retry_after: Option<String>,
    pub body: Bytes,
}

/// Whether a token answer (or a failure to get one) is worth another attempt: IMDS's own
/// retry guidance (404 and 410 while it updates, 429, 5xx) and network failures.
pub fn retryable(outcome: &Result<ImdsAnswer, NodeImdsError>) -> bool {
    match outcome {
        Ok(answer) => matches!(answer.status, 404 | 410 | 429 | 500..=599),
        Err(NodeImdsError::Transport { .. }) => true,
        Err(_) => false,
    }
}

/// How long to wait before attempt `next` (1-based retries), honouring `Retry-After`.
pub fn backoff(next: u32, outcome: &Result<ImdsAnswer, NodeImdsError>) -> Duration {
    let computed = FIRST_BACKOFF * 2u32.saturating_pow(next.saturating_sub(1));
    let asked = match outcome {
        Ok(answer) => answer
            .retry_after
            .as_deref()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs),
        Err(_) => None,
    };
    asked.map_or(computed, |asked| asked.max(computed))
}

/// The client.
#[derive(Debug, Clone)]
pub struct NodeImds {
    http: reqwest::Client,
    endpoint: Url,
}

impl NodeImds {
    pub fn new(endpoint: Url) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(ATTEMPT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self { http, endpoint })
    }

    /// A managed-identity token request, retried within the budget.
    pub async fn token(
        &self,
        api_version: &str,
        resource: &str,
        selector: Option<&Selector>,
        bypass_cache: bool,
    ) -> Result<ImdsAnswer, NodeImdsError> {
        let mut url = self.url("/metadata/identity/oauth2/token")?;
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("api-version", api_version);
            query.append_pair("resource", resource);
            if let Some(selector) = selector {
                let (name, value) = selector.imds_param();
                query.append_pair(name, value);
            }
            if bypass_cache {
                query.append_pair("bypass_cache", "true");
            }
        }
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            let outcome = self.get(url.clone()).await;
            if attempt >= MAX_ATTEMPTS || !retryable(&outcome) {
                return outcome;
            }
            let pause = backoff(attempt, &outcome);
            if started.elapsed() + pause > RETRY_BUDGET {
                return outcome;
            }
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    /// An instance metadata request (`path` already checked by [`crate::imds`]), once.
    pub async fn metadata(
        &self,
        path: &str,
        query: Option<&str>,
    ) -> Result<ImdsAnswer, NodeImdsError> {
        let mut url = self.url(path)?;
        url.set_query(query);
        self.get(url).await
    }

    fn url(&self, path: &str) -> Result<Url, NodeImdsError> {
        self.endpoint.join(path).map_err(|e| NodeImdsError::Url {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    async fn get(&self, url: Url) -> Result<ImdsAnswer, NodeImdsError> {
        let shown = format!(
            "{}://{}{}",
            url.scheme(),
            url.host_str().unwrap_or_default(),
            url.path()
        );
        let transport = |source| NodeImdsError::Transport {
            url: shown.clone(),
            source,
        };
        let mut response = self
            .http
            .get(url)
            .header("Metadata", "true")
            .send()
            .await
            .map_err(transport)?;
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let content_type = header(CONTENT_TYPE);
        let retry_after = header(RETRY_AFTER);
        let status = response.status().as_u16();
        let mut body = BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(NodeImdsError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(ImdsAnswer {
            status,
            content_type,
            retry_after,
            body: body.freeze(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, retry_after: Option<&str>) -> Result<ImdsAnswer, NodeImdsError> {
        Ok(ImdsAnswer {
            status,
            content_type: None,
            retry_after: retry_after.map(str::to_owned),
            body: Bytes::new(),
        })
    }

    #[test]
    fn what_is_retried() {
        for status in [404, 410, 429, 500, 503] {
            assert!(retryable(&answer(status, None)), "{status}");
        }
        for status in [200, 400, 401, 403] {
            assert!(!retryable(&answer(status, None)), "{status}");
        }
    }

    #[test]
    fn backoff_doubles_and_honours_retry_after() {
        assert_eq!(backoff(1, &answer(500, None)), Duration::from_millis(500));
        assert_eq!(backoff(2, &answer(500, None)), Duration::from_secs(1));
        assert_eq!(backoff(1, &answer(429, Some("3"))), Duration::from_secs(3));
        assert_eq!(backoff(2, &answer(429, Some("0"))), Duration::from_secs(1));
        assert_eq!(
            backoff(1, &answer(429, Some("soon"))),
            Duration::from_millis(500)
        );
        // A Retry-After beyond the budget ends the retries (checked by the caller).
        assert!(backoff(1, &answer(429, Some("30"))) > RETRY_BUDGET);
    }
}
