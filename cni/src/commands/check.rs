//! CHECK: tokend knows the attachment, and the pod netns holds exactly the redirect ADD
//! installs, to the port tokend recorded for it.

use std::time::Duration;

use crate::config::ConfigError;
use crate::error::CniError;
use crate::log::Logger;
use crate::netns::{self, WORK_DEADLINE};
use crate::nft::{self, Redirect};
use crate::prev_result::PrevResult;
use crate::protocol::{AttachmentEnv, Request};
use crate::redirect;
use crate::tokend::Tokend;

pub fn check(request: &Request, env: &AttachmentEnv, log: &Logger) -> Result<(), CniError> {
    let prev_raw = request
        .raw
        .take_raw("prevResult")
        .ok_or(ConfigError::NoPrevResult)?;
    PrevResult::parse(&prev_raw)?;
    let netns = env
        .netns
        .clone()
        .ok_or_else(|| CniError::MissingEnv(vec!["CNI_NETNS"]))?;
    let config = &request.config;

    let tokend = Tokend::new(&config.socket, Duration::from_millis(config.timeout_ms));
    let state = match tokend.get_pod(&env.key) {
        Ok(Some(state)) => state,
        Ok(None) => {
            return Err(CniError::CheckPodUnknown {
                key: env.key.clone(),
                detail: "it answered 404".to_owned(),
            });
        }
        Err(e) if e.is_unreachable() => return Err(super::tokend_unavailable(request, e)),
        Err(e) => {
            return Err(CniError::CheckPodUnknown {
                key: env.key.clone(),
                detail: e.to_string(),
            });
        }
    };
    if state.bound.record.netns != netns {
        return Err(CniError::CheckPodUnknown {
            key: env.key.clone(),
            detail: format!(
                "it has the pod in netns {}, the runtime says {netns}",
                state.bound.record.netns
            ),
        });
    }

    let expected = Redirect::metadata(config.metadata_address, state.bound.listener_port);
    let observed = netns::run_in(&netns, WORK_DEADLINE, redirect::observe)?.map_err(|cause| {
        CniError::Nftables {
            netns: netns.clone(),
            cause,
        }
    })?;
    nft::verify(&observed, &env.key.container_id, &expected).map_err(|what| {
        CniError::CheckRedirect {
            netns: netns.clone(),
            what,
        }
    })?;
    log.info(
        "redirect verified",
        &[
            ("redirect", &expected),
            ("listenerBound", &state.listener_bound),
        ],
    );
    Ok(())
}
