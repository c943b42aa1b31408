//! GC (CNI 1.1): forget every attachment of this network that the runtime no longer lists,
//! in the spool and in tokend. Keeps going past errors and reports them at the end.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::time::Duration;

use podid_api::PodKey;

use crate::error::CniError;
use crate::log::Logger;
use crate::protocol::Request;
use crate::spool;
use crate::tokend::Tokend;

pub fn gc(request: &Request, log: &Logger) -> Result<(), CniError> {
    let valid: HashSet<PodKey> = request
        .raw
        .valid_attachments()?
        .into_iter()
        .map(|a| PodKey::new(a.container_id, a.ifname))
        .collect();
    let stale = |network: Option<&str>, key: &PodKey| {
        network.is_none_or(|n| n == request.name) && !valid.contains(key)
    };
    let config = &request.config;
    let mut errors = Vec::new();

    match spool::list(&config.state_dir) {
        Ok(entries) => {
            for entry in entries {
                let pod = match entry.pod {
                    Ok(pod) => pod,
                    Err(why) => {
                        log.warn(
                            "unreadable spool file left for podid-tokend",
                            &[("path", &entry.path.display()), ("error", &why)],
                        );
                        continue;
                    }
                };
                let key = pod.record.key();
                if !stale(pod.record.network.as_deref(), &key) {
                    continue;
                }
                match fs::remove_file(&entry.path) {
                    Ok(()) => log.info("stale spooled record removed", &[("attachment", &key)]),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => errors.push(format!("removing {}: {e}", entry.path.display())),
                }
            }
        }
        Err(e) => errors.push(format!(
            "listing the spool under {}: {e}",
            config.state_dir.display()
        )),
    }

    let tokend = Tokend::new(&config.socket, Duration::from_millis(config.timeout_ms));
    let unreachable = |cause, errors: Vec<String>| CniError::GcTokendUnavailable {
        socket: config.socket.display().to_string(),
        timeout_ms: config.timeout_ms,
        cause: Box::new(cause),
        others: errors,
    };
    let pods = match tokend.list_pods() {
        Ok(list) => list.pods,
        Err(e) if e.is_unreachable() => return Err(unreachable(e, errors)),
        Err(e) => {
            errors.push(e.to_string());
            Vec::new()
        }
    };
    for pod in pods {
        let key = pod.bound.record.key();
        if !stale(pod.bound.record.network.as_deref(), &key) {
            continue;
        }
        match tokend.delete_pod(&key) {
            Ok(_) => log.info("stale registration removed", &[("attachment", &key)]),
            Err(e) if e.is_unreachable() => return Err(unreachable(e, errors)),
            Err(e) => errors.push(format!("deleting {key}: {e}")),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CniError::GcIncomplete(errors))
    }
}
