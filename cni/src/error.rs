//! Every way the plugin can fail, and the one place that maps a failure to its CNI error code.

use std::io;

use podid_api::PodKey;

use crate::config::ConfigError;
use crate::netlink::NetlinkError;
use crate::netns::NetnsError;
use crate::protocol::SUPPORTED_VERSIONS;
use crate::tokend::TokendError;

/// CNI error codes (SPEC.md §5 "Error"); 0–99 are the spec's, 100 and up are podid's own.
pub mod code {
    /// The request's `cniVersion` is not one podid supports.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// One of podid's config keys has a value podid cannot use.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// A `CNI_*` environment variable is missing or invalid.
    pub const INVALID_ENV: u32 = 4;
    /// Reading stdin failed.
    pub const IO: u32 = 5;
    /// stdin is not JSON.
    pub const DECODE: u32 = 6;
    /// The network configuration is invalid (missing or mistyped keys, no prevResult).
    pub const INVALID_CONFIG: u32 = 7;
    /// Transient: tokend not ready, unreachable or too slow; the runtime retries.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: podid cannot serve ADD right now.
    pub const NOT_AVAILABLE: u32 = 50;
    /// tokend refused the pod record (400 or 404); the message is tokend's.
    pub const TOKEND_REJECTED: u32 = 100;
    /// `CNI_NETNS` cannot be opened, is not a network namespace, or cannot be entered.
    pub const NETNS_UNUSABLE: u32 = 101;
    /// The nf_tables redirect could not be programmed or read.
    pub const NFTABLES: u32 = 102;
    /// CHECK: tokend does not know the attachment (or knows it with another netns).
    pub const CHECK_POD_UNKNOWN: u32 = 103;
    /// CHECK: the redirect in the pod netns is missing or differs from the expected one.
    pub const CHECK_REDIRECT: u32 = 104;
    /// The pod record could not be written to the spool.
    pub const SPOOL: u32 = 105;
    /// `lo` in the pod netns could not be brought up.
    pub const LOOPBACK: u32 = 106;
    /// GC could not remove every stale registration or spool file.
    pub const GC_INCOMPLETE: u32 = 107;
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("incompatible CNI version {0:?}")]
    IncompatibleVersion(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("unknown CNI_COMMAND {0:?}")]
    UnknownCommand(String),
    #[error("required environment variables missing: {}", .0.join(", "))]
    MissingEnv(Vec<&'static str>),
    #[error("invalid {name} {value:?}")]
    InvalidEnv {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("reading the network configuration from stdin failed: {0}")]
    Stdin(io::Error),
    #[error("failed to decode the network configuration: {0}")]
    Decode(serde_json::Error),
    #[error("podid-tokend at {socket} was not available within {timeout_ms} ms: {cause}")]
    TokendUnavailable {
        socket: String,
        timeout_ms: u64,
        cause: Box<TokendError>,
    },
    #[error(
        "GC removed stale spool files but could not collect registrations: podid-tokend at {socket} was not available within {timeout_ms} ms: {cause}"
    )]
    GcTokendUnavailable {
        socket: String,
        timeout_ms: u64,
        cause: Box<TokendError>,
        others: Vec<String>,
    },
    #[error("podid-tokend is not ready: {0}")]
    NotReady(String),
    #[error("podid-tokend rejected {key}: {message}")]
    TokendRejected {
        key: PodKey,
        status: u16,
        message: String,
    },
    #[error(transparent)]
    Netns(NetnsError),
    #[error("programming the podid nftables table in {netns} failed: {cause}")]
    Nftables { netns: String, cause: NetlinkError },
    #[error("bringing up lo in {netns} failed: {cause}")]
    Loopback { netns: String, cause: NetlinkError },
    #[error("podid-tokend does not know {key}: {detail}")]
    CheckPodUnknown { key: PodKey, detail: String },
    #[error("the podid redirect in {netns} is missing or wrong: {what}")]
    CheckRedirect { netns: String, what: String },
    #[error("spooling {key} to {path} failed: {cause}")]
    Spool {
        key: PodKey,
        path: String,
        cause: io::Error,
    },
    #[error("GC was incomplete: {}", .0.join("; "))]
    GcIncomplete(Vec<String>),
}

impl CniError {
    /// The CNI error code of this failure.
    pub fn code(&self) -> u32 {
        match self {
            Self::IncompatibleVersion(_) => code::INCOMPATIBLE_VERSION,
            Self::Config(e) if e.is_unsupported_value() => code::UNSUPPORTED_FIELD,
            Self::Config(_) => code::INVALID_CONFIG,
            Self::UnknownCommand(_) | Self::MissingEnv(_) | Self::InvalidEnv { .. } => {
                code::INVALID_ENV
            }
            Self::Stdin(_) => code::IO,
            Self::Decode(_) => code::DECODE,
            Self::TokendUnavailable { .. } | Self::GcTokendUnavailable { .. } => {
                code::TRY_AGAIN_LATER
            }
            Self::Netns(NetnsError::Deadline { .. }) => code::TRY_AGAIN_LATER,
            Self::NotReady(_) => code::NOT_AVAILABLE,
            Self::TokendRejected { .. } => code::TOKEND_REJECTED,
            Self::Netns(_) => code::NETNS_UNUSABLE,
            Self::Nftables { .. } => code::NFTABLES,
            Self::Loopback { .. } => code::LOOPBACK,
            Self::CheckPodUnknown { .. } => code::CHECK_POD_UNKNOWN,
            Self::CheckRedirect { .. } => code::CHECK_REDIRECT,
            Self::Spool { .. } => code::SPOOL,
            Self::GcIncomplete(_) => code::GC_INCOMPLETE,
        }
    }

    /// The `details` of the error JSON: what to do about it, or the evidence behind `msg`.
    pub fn details(&self) -> String {
        match self {
            Self::IncompatibleVersion(_) => {
                format!("podid supports CNI versions {}", SUPPORTED_VERSIONS.join(", "))
            }
            Self::Config(e) => e.details(),
            Self::UnknownCommand(_) => {
                "CNI_COMMAND must be one of ADD, DEL, CHECK, GC, STATUS, VERSION".to_owned()
            }
            Self::MissingEnv(names) => format!(
                "the runtime must set {} for this command",
                names.join(", ")
            ),
            Self::InvalidEnv { reason, .. } => reason.clone(),
            Self::Stdin(e) => e.to_string(),
            Self::Decode(e) => e.to_string(),
            Self::TokendUnavailable { .. } => {
                "podid-tokend must run and be ready on this node; the runtime retries (with failurePolicy Ignore, or for pods in failOpenNamespaces, pods start without it)".to_owned()
            }
            Self::GcTokendUnavailable { others, .. } if !others.is_empty() => {
                format!("also: {}", others.join("; "))
            }
            Self::GcTokendUnavailable { .. } => {
                "registrations of deleted pods stay until the next GC or tokend's own sweep".to_owned()
            }
            Self::NotReady(_) => {
                "failurePolicy is Fail and failOpenNamespaces is empty, so no pod can start until podid-tokend is ready".to_owned()
            }
            Self::TokendRejected { status, .. } => {
                format!("podid-tokend answered HTTP {status}")
            }
            Self::Netns(e) => e.details(),
            Self::Nftables { cause, .. } => match cause.errno() {
                Some(errno) => format!(
                    "errno {errno}; podid needs CAP_NET_ADMIN and the kernel modules nf_tables, nft_chain_nat and nft_redir"
                ),
                None => "the netlink exchange with the kernel failed".to_owned(),
            },
            Self::Loopback { cause, .. } => match cause.errno() {
                Some(errno) => format!("errno {errno}; podid needs CAP_NET_ADMIN in the pod netns"),
                None => "the netlink exchange with the kernel failed".to_owned(),
            },
            Self::CheckPodUnknown { .. } => {
                "the pod was never registered, or tokend dropped it; recreate the pod".to_owned()
            }
            Self::CheckRedirect { .. } => {
                "something in the pod changed table ip podid; recreate the pod".to_owned()
            }
            Self::Spool { cause, .. } => cause.to_string(),
            Self::GcIncomplete(errors) => format!("{} error(s); the next GC retries", errors.len()),
        }
    }
}

impl From<NetnsError> for CniError {
    fn from(e: NetnsError) -> Self {
        Self::Netns(e)
    }
}
