//! DEL: best effort, never an error. Drop the spooled record, tell tokend, and remove the
//! redirect table only if it is tagged with this container id (a `/proc/<pid>/ns/net` path
//! may name another pod's netns by now).

use std::time::Duration;

use crate::error::CniError;
use crate::log::Logger;
use crate::netns::{self, WORK_DEADLINE};
use crate::protocol::{AttachmentEnv, Request};
use crate::redirect::{self, Removal};
use crate::spool;
use crate::tokend::Tokend;

/// DEL's budget for tokend: the pod is going away, and DEL must not hold up the runtime.
const DELETE_BUDGET_MS: u64 = 1000;

pub fn del(request: &Request, env: &AttachmentEnv, log: &Logger) -> Result<(), CniError> {
    let config = &request.config;
    for warning in &request.config_warnings {
        log.warn(
            "config value unusable; DEL uses the default",
            &[("error", warning)],
        );
    }

    match spool::remove(&config.state_dir, &env.key) {
        Ok(true) => log.info("spooled record removed", &[]),
        Ok(false) => {}
        Err(e) => log.warn("spooled record could not be removed", &[("error", &e)]),
    }

    let budget = Duration::from_millis(config.timeout_ms.min(DELETE_BUDGET_MS));
    match Tokend::new(&config.socket, budget).delete_pod(&env.key) {
        Ok(true) => log.info("deregistered from podid-tokend", &[]),
        Ok(false) => log.info("podid-tokend did not know the pod", &[]),
        Err(e) => log.warn(
            "podid-tokend not told; it drops pods whose netns is gone",
            &[("socket", &config.socket.display()), ("error", &e)],
        ),
    }

    let Some(netns) = env.netns.clone() else {
        log.info("no CNI_NETNS: nothing to remove in the pod netns", &[]);
        return Ok(());
    };
    let container_id = env.key.container_id.clone();
    match netns::run_in(&netns, WORK_DEADLINE, move || {
        redirect::remove_if_owned(&container_id)
    }) {
        Ok(Ok(Removal::Removed)) => log.info("table ip podid removed", &[]),
        Ok(Ok(Removal::Absent)) => log.info("no table ip podid to remove", &[]),
        Ok(Ok(Removal::NotOurs(owner))) => log.warn(
            "table ip podid belongs to another container; left in place",
            &[("owner", &owner.as_deref().unwrap_or("(none)"))],
        ),
        Ok(Err(e)) => log.warn("table ip podid could not be removed", &[("error", &e)]),
        Err(e) if e.is_gone() => log.info("pod netns already gone", &[]),
        Err(e) => log.warn(
            "pod netns unusable; nothing removed there",
            &[("error", &e)],
        ),
    }
    Ok(())
}
