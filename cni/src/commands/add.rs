//! ADD: register the pod with tokend (or spool it), install the redirect in the pod netns,
//! print the previous result unchanged.

use std::time::Duration;

use podid_api::{BoundPod, PodRecord};

use crate::config::ConfigError;
use crate::error::CniError;
use crate::log::Logger;
use crate::netns::{self, WORK_DEADLINE};
use crate::nft::Redirect;
use crate::prev_result::PrevResult;
use crate::protocol::{AttachmentEnv, Request};
use crate::redirect::{self, SetupError};
use crate::spool;
use crate::tokend::{PutOutcome, Tokend};

pub fn add(request: &Request, env: &AttachmentEnv, log: &Logger) -> Result<String, CniError> {
    let prev_raw = request
        .raw
        .take_raw("prevResult")
        .ok_or(ConfigError::NoPrevResult)?;
    let prev = PrevResult::parse(&prev_raw)?;
    let output = prev.output(&request.cni_version)?;
    let netns = env
        .netns
        .clone()
        .ok_or_else(|| CniError::MissingEnv(vec!["CNI_NETNS"]))?;
    if let Some(infra) = env
        .args
        .infra_container_id
        .as_ref()
        .filter(|infra| **infra != env.key.container_id)
    {
        log.warn(
            "K8S_POD_INFRA_CONTAINER_ID differs from CNI_CONTAINERID",
            &[("infraContainerId", infra)],
        );
    }
    let (netns_dev, netns_inode) = netns::identity(&netns)?;
    let record = PodRecord {
        container_id: env.key.container_id.clone(),
        ifname: env.key.ifname.clone(),
        netns: netns.clone(),
        netns_inode,
        netns_dev,
        pod_namespace: env.args.pod_namespace.clone(),
        pod_name: env.args.pod_name.clone(),
        pod_uid: env.args.pod_uid.clone(),
        ips: prev.addresses(),
        network: Some(request.name.clone()),
    };
    let in_pod = |e| setup_error(&netns, e);
    let loopback = netns::run_in(&netns, WORK_DEADLINE, redirect::loopback_up)?.map_err(in_pod)?;
    let listener_port = register(request, record, log)?;

    let redirect = Redirect::metadata(request.config.metadata_address, listener_port);
    let container_id = env.key.container_id.clone();
    netns::run_in(&netns, WORK_DEADLINE, move || {
        redirect::install(&container_id, &redirect)
    })?
    .map_err(in_pod)?;
    log.info(
        "redirect installed",
        &[("redirect", &redirect), ("lo", &loopback)],
    );
    Ok(output)
}

fn setup_error(netns: &str, e: SetupError) -> CniError {
    match e {
        SetupError::Loopback(cause) => CniError::Loopback {
            netns: netns.to_owned(),
            cause,
        },
        SetupError::Nftables(cause) => CniError::Nftables {
            netns: netns.to_owned(),
            cause,
        },
    }
}

/// Hands the record to tokend and returns the port to redirect to; spools it when tokend is
/// unavailable and the pod may start without it.
fn register(request: &Request, record: PodRecord, log: &Logger) -> Result<u16, CniError> {
    let config = &request.config;
    let tokend = Tokend::new(&config.socket, Duration::from_millis(config.timeout_ms));
    let cause = match tokend.put_pod(&record) {
        Ok(PutOutcome::Bound(port)) => {
            log.info("registered with podid-tokend", &[("listenerPort", &port)]);
            return Ok(port);
        }
        Ok(PutOutcome::Rejected { status, message }) => {
            return Err(CniError::TokendRejected {
                key: record.key(),
                status,
                message,
            });
        }
        Err(cause) => cause,
    };
    if !config.fails_open(record.pod_namespace.as_deref()) {
        return Err(super::tokend_unavailable(request, cause));
    }
    let pod = BoundPod {
        listener_port: spool::announced_listener_port(&config.state_dir),
        record,
    };
    let path = spool::write(&config.state_dir, &pod).map_err(|e| CniError::Spool {
        key: pod.record.key(),
        path: spool::path(&config.state_dir, &pod.record.key())
            .display()
            .to_string(),
        cause: e,
    })?;
    log.warn(
        "podid-tokend unavailable; pod record spooled",
        &[
            ("cause", &cause),
            ("spool", &path.display()),
            ("listenerPort", &pod.listener_port),
        ],
    );
    Ok(pod.listener_port)
}
