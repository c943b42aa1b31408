//! STATUS (CNI 1.1): on 1.1 runtimes an error marks the whole node's network not ready, so
//! podid reports tokend's unreadiness only when no pod could start without tokend anyway
//! (DESIGN.md "Plugin ↔ tokend"); node readiness is the taint's job.

use std::time::Duration;

use crate::error::CniError;
use crate::log::Logger;
use crate::protocol::Request;
use crate::tokend::Tokend;

pub fn status(request: &Request, log: &Logger) -> Result<(), CniError> {
    let config = &request.config;
    let socket = config.socket.display();
    let tokend = Tokend::new(&config.socket, Duration::from_millis(config.timeout_ms));
    let problem = match tokend.status() {
        Ok(status) if status.ready => return Ok(()),
        Ok(status) => format!(
            "{socket} reports ready=false ({} pods registered)",
            status.pods
        ),
        Err(e) => format!("{socket}: {e}"),
    };
    if config.strict_status() {
        return Err(CniError::NotReady(problem));
    }
    log.warn(
        "podid-tokend not ready; STATUS succeeds because pods may start without it",
        &[("cause", &problem)],
    );
    Ok(())
}
