//! Forced answers: a queue of faults that the next matching requests get instead of (or, for a
//! delay, before) their normal answer.

use std::collections::VecDeque;
use std::time::Duration;

/// What a faulted request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// This HTTP status with the endpoint's usual error body for it; `retry_after` (seconds)
    /// adds a `Retry-After` header, as throttling and outage answers carry.
    Status {
        status: u16,
        retry_after: Option<u64>,
    },
    /// Waits this long, then answers normally (timeouts, slow upstreams).
    Delay(Duration),
    /// Closes the connection with a TCP reset instead of answering.
    Reset,
    /// This exact answer, for malformed-response tests (a string `expires_in`, a non-JSON body).
    Raw {
        status: u16,
        content_type: String,
        body: Vec<u8>,
    },
}

impl Fault {
    pub fn status(status: u16) -> Self {
        Fault::Status {
            status,
            retry_after: None,
        }
    }

    /// 429 with `Retry-After: <seconds>`.
    pub fn throttled(retry_after: u64) -> Self {
        Fault::Status {
            status: 429,
            retry_after: Some(retry_after),
        }
    }

    /// 503 with `Retry-After: <seconds>`.
    pub fn unavailable(retry_after: u64) -> Self {
        Fault::Status {
            status: 503,
            retry_after: Some(retry_after),
        }
    }

    pub fn raw(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Fault::Raw {
            status,
            content_type: content_type.to_string(),
            body: body.into(),
        }
    }
}

/// Which requests a fault applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultTarget {
    /// Every token request (and, at the IMDS, every instance-metadata request).
    Any,
    /// Token requests for this client id: an app registration at Entra, an identity at IMDS.
    Client(String),
}

impl FaultTarget {
    fn matches(&self, client_id: Option<&str>) -> bool {
        match self {
            FaultTarget::Any => true,
            FaultTarget::Client(id) => client_id.is_some_and(|c| c.eq_ignore_ascii_case(id)),
        }
    }
}

#[derive(Debug)]
struct Rule {
    target: FaultTarget,
    fault: Fault,
    remaining: usize,
}

/// The pending faults, oldest first; a request takes the first rule that matches it.
#[derive(Debug, Default)]
pub(crate) struct FaultQueue {
    rules: VecDeque<Rule>,
}

impl FaultQueue {
    pub(crate) fn push(&mut self, target: FaultTarget, fault: Fault, times: usize) {
        if times > 0 {
            self.rules.push_back(Rule {
                target,
                fault,
                remaining: times,
            });
        }
    }

    /// Takes one use of the first rule for this request, if any.
    pub(crate) fn take(&mut self, client_id: Option<&str>, any_allowed: bool) -> Option<Fault> {
        let index = self.rules.iter().position(|r| match r.target {
            FaultTarget::Any => any_allowed,
            FaultTarget::Client(_) => r.target.matches(client_id),
        })?;
        let rule = &mut self.rules[index];
        rule.remaining -= 1;
        let fault = rule.fault.clone();
        if rule.remaining == 0 {
            self.rules.remove(index);
        }
        Some(fault)
    }

    pub(crate) fn clear(&mut self) {
        self.rules.clear();
    }

    /// Uses left over all rules.
    pub(crate) fn pending(&self) -> usize {
        self.rules.iter().map(|r| r.remaining).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_apply_in_order_and_run_out() {
        let mut q = FaultQueue::default();
        q.push(FaultTarget::Client("App-1".into()), Fault::Reset, 1);
        q.push(FaultTarget::Any, Fault::throttled(3), 2);
        assert_eq!(q.pending(), 3);
        assert_eq!(q.take(Some("other"), true), Some(Fault::throttled(3)));
        assert_eq!(q.take(Some("app-1"), true), Some(Fault::Reset));
        assert_eq!(q.take(Some("app-1"), false), None);
        assert_eq!(q.take(None, true), Some(Fault::throttled(3)));
        assert_eq!(q.take(None, true), None);
        assert_eq!(q.pending(), 0);
    }
}
