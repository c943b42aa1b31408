//! One small function per CNI command, as in the Go reference plugins.

mod add;
mod check;
mod del;
mod gc;
mod status;

use crate::error::CniError;
use crate::log::Logger;
use crate::protocol::{self, Command, Request};
use crate::tokend::TokendError;

/// Runs the request's command; `Ok(Some(text))` is the result to print on stdout.
pub fn run(request: &Request, log: &Logger) -> Result<Option<String>, CniError> {
    match (request.command, &request.env) {
        (Command::Add, Some(env)) => add::add(request, env, log).map(Some),
        (Command::Del, Some(env)) => del::del(request, env, log).map(|()| None),
        (Command::Check, Some(env)) => check::check(request, env, log).map(|()| None),
        (Command::Gc, _) => gc::gc(request, log).map(|()| None),
        (Command::Status, _) => status::status(request, log).map(|()| None),
        (Command::Version, _) => Ok(Some(protocol::version_answer(Some(&request.cni_version)))),
        // `protocol::parse_request` reads the attachment for these three.
        (Command::Add | Command::Del | Command::Check, None) => {
            Err(CniError::MissingEnv(vec!["CNI_CONTAINERID", "CNI_IFNAME"]))
        }
    }
}

/// Code 11: tokend did not take the request within `timeoutMs`; the runtime retries.
fn tokend_unavailable(request: &Request, cause: TokendError) -> CniError {
    CniError::TokendUnavailable {
        socket: request.config.socket.display().to_string(),
        timeout_ms: request.config.timeout_ms,
        cause: Box::new(cause),
    }
}
