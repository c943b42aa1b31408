//! `podid`: the chained CNI plugin that registers each pod with podid-tokend and redirects
//! the pod's metadata traffic (169.254.169.254:80) to tokend's listener in the pod netns.
//!
//! Dispatch only: the protocol is in `protocol`, each command in `commands`.

mod args;
mod commands;
mod config;
mod error;
mod http;
mod link;
mod log;
mod netlink;
mod netns;
mod nft;
mod prev_result;
mod protocol;
mod redirect;
mod spool;
mod tokend;

use std::env;
use std::process::ExitCode;
use std::time::Instant;

use crate::error::CniError;
use crate::log::{Level, Logger};
use crate::protocol::{Command, Failure, LATEST_VERSION};

fn main() -> ExitCode {
    let started = Instant::now();
    let command = match env::var_os("CNI_COMMAND") {
        Some(name) if !name.is_empty() => name.to_string_lossy().into_owned(),
        _ => {
            eprint!("{}", protocol::about());
            return ExitCode::SUCCESS;
        }
    };
    let command = match Command::parse(&command) {
        Ok(command) => command,
        Err(error) => {
            return fail(
                &Logger::stderr(),
                Failure {
                    cni_version: LATEST_VERSION.to_owned(),
                    error,
                },
            );
        }
    };
    if command == Command::Version {
        let stdin = protocol::read_version_stdin();
        return finish(&Logger::stderr(), protocol::version_reply(stdin.as_deref()));
    }

    let parsed = protocol::read_stdin().map(|stdin| {
        protocol::parse_request(command, &stdin, |name| {
            env::var_os(name).map(|v| v.to_string_lossy().into_owned())
        })
    });
    let request = match parsed {
        Ok(Ok(request)) => request,
        Ok(Err(failure)) => {
            return fail(&Logger::stderr().with("command", command.as_str()), failure);
        }
        Err(error) => {
            return fail(
                &Logger::stderr().with("command", command.as_str()),
                Failure {
                    cni_version: LATEST_VERSION.to_owned(),
                    error,
                },
            );
        }
    };

    let mut log = Logger::open(&request.config.log_file).with("command", command.as_str());
    if let Some(env) = &request.env {
        log = log
            .with("containerId", &env.key.container_id)
            .with("ifname", &env.key.ifname);
        if let Some(pod) = env.args.pod_ref() {
            log = log.with("pod", pod);
        }
    }
    let outcome = commands::run(&request, &log);
    let duration_ms = started.elapsed().as_millis();
    match outcome {
        Ok(output) => {
            log.info("done", &[("outcome", &"ok"), ("duration_ms", &duration_ms)]);
            match output {
                Some(output) => finish(&log, output),
                None => ExitCode::SUCCESS,
            }
        }
        Err(error) => {
            log.log(
                Level::Error,
                &error.to_string(),
                &[
                    ("outcome", &"error"),
                    ("code", &error.code()),
                    ("duration_ms", &duration_ms),
                ],
            );
            emit_error(&log, &request.cni_version, &error)
        }
    }
}

/// Reports a request that could not be acted on.
fn fail(log: &Logger, failure: Failure) -> ExitCode {
    log.log(
        Level::Error,
        &failure.error.to_string(),
        &[("outcome", &"error"), ("code", &failure.error.code())],
    );
    emit_error(log, &failure.cni_version, &failure.error)
}

fn emit_error(log: &Logger, cni_version: &str, error: &CniError) -> ExitCode {
    if let Err(e) = protocol::write_stdout(&protocol::error_json(cni_version, error)) {
        log.warn("writing the error to stdout failed", &[("error", &e)]);
    }
    ExitCode::FAILURE
}

fn finish(log: &Logger, output: String) -> ExitCode {
    match protocol::write_stdout(&output) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log.log(
                Level::Error,
                "writing the result to stdout failed",
                &[("error", &e)],
            );
            ExitCode::FAILURE
        }
    }
}
