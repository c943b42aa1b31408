//! The pod record: what the plugin tells tokend about one pod attachment at ADD.

use std::fmt;
use std::net::IpAddr;
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

/// Longest container id we accept: `<containerId>-<ifname>.json` must stay a valid file name.
pub const MAX_CONTAINER_ID_LEN: usize = 255 - 1 - MAX_IFNAME_LEN - ".json".len();
/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;
/// Kubernetes object names are at most 253 characters; UIDs are far shorter.
const MAX_POD_FIELD_LEN: usize = 253;

/// Directories where runtimes keep named network namespaces; the only ones tokend accepts.
pub const NETNS_DIRS: &[&str] = &["/var/run/netns", "/run/netns"];

/// One attachment of one pod, as the plugin saw it at ADD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    pub container_id: String,
    pub ifname: String,
    /// Path of the pod's network namespace (`CNI_NETNS`).
    pub netns: String,
    /// `st_ino` of the netns file at ADD: a path that later names another netns is refused.
    pub netns_inode: u64,
    /// `st_dev` of the netns file at ADD.
    pub netns_dev: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// Addresses exactly as in the CNI result, e.g. `"10.244.1.7/24"`.
    #[serde(default)]
    pub ips: Vec<String>,
    /// The CNI network (conflist `name`) this attachment belongs to; GC only touches its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// A record together with the listener port its redirect points to: what tokend persists
/// under `<state dir>/pods` and what the plugin spools under `<state dir>/pending`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BoundPod {
    #[serde(flatten)]
    pub record: PodRecord,
    pub listener_port: u16,
}

/// `(containerId, ifname)`: the key of an attachment in CNI and in tokend.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub container_id: String,
    pub ifname: String,
}

impl PodKey {
    pub fn new(container_id: impl Into<String>, ifname: impl Into<String>) -> Self {
        Self {
            container_id: container_id.into(),
            ifname: ifname.into(),
        }
    }

    /// Checks both halves as the CNI spec and the Go reference skel do.
    pub fn validate(&self) -> Result<(), RecordError> {
        validate_container_id(&self.container_id)?;
        validate_ifname(&self.ifname)
    }

    /// `<containerId>-<ifname>.json`: the file name of this key in the spool and the store.
    pub fn file_name(&self) -> String {
        format!("{}-{}.json", self.container_id, self.ifname)
    }

    /// The `/v1/pods/{containerId}/{ifname}` path of this key, each segment percent-encoded
    /// (an interface name may hold `?`, `#` or `%`).
    pub fn api_path(&self) -> String {
        format!(
            "{}/{}/{}",
            crate::wire::PODS_PATH,
            encode_segment(&self.container_id),
            encode_segment(&self.ifname)
        )
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.container_id, self.ifname)
    }
}

/// Why a record or one of its parts is not acceptable; each variant names the bad input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error(
        "containerId {0:?} is invalid: it must start with a letter or digit and contain only letters, digits, '_', '.' and '-'"
    )]
    ContainerIdChars(String),
    #[error("containerId is {0} bytes long; at most {MAX_CONTAINER_ID_LEN} are supported")]
    ContainerIdLength(usize),
    #[error(
        "ifname {0:?} is invalid: it must be 1 to 15 bytes, not '.' or '..', without '/', ':' or whitespace"
    )]
    Ifname(String),
    #[error("netns {0:?} is not an absolute path")]
    NetnsNotAbsolute(String),
    #[error(
        "netns {0:?} is not supported: only named namespaces directly under /var/run/netns or /run/netns are"
    )]
    NetnsUnsupported(String),
    #[error(
        "{field} {value:?} is invalid: it must be 1 to {MAX_POD_FIELD_LEN} printable characters"
    )]
    PodField { field: &'static str, value: String },
    #[error("ips entry {0:?} is not an address in CIDR notation")]
    Ip(String),
}

impl RecordError {
    /// Whether the error is about the netns path (tokend answers those with 404, the rest 400).
    pub fn is_netns(&self) -> bool {
        matches!(self, Self::NetnsNotAbsolute(_) | Self::NetnsUnsupported(_))
    }
}

impl PodRecord {
    pub fn key(&self) -> PodKey {
        PodKey::new(&self.container_id, &self.ifname)
    }

    /// Checks every field; the netns path must be a named namespace (`netns_path_supported`).
    pub fn validate(&self) -> Result<(), RecordError> {
        self.key().validate()?;
        validate_netns_path(&self.netns)?;
        for (field, value) in [
            ("podNamespace", &self.pod_namespace),
            ("podName", &self.pod_name),
            ("podUid", &self.pod_uid),
            ("network", &self.network),
        ] {
            if let Some(value) = value {
                validate_pod_field(field, value)?;
            }
        }
        for ip in &self.ips {
            validate_cidr(ip)?;
        }
        Ok(())
    }

    /// `namespace/name` of the pod, when the runtime told us.
    pub fn pod_ref(&self) -> Option<String> {
        match (&self.pod_namespace, &self.pod_name) {
            (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
            _ => None,
        }
    }
}

/// Percent-encodes every byte of a URL path segment except RFC 3986's unreserved characters.
pub fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes a percent-encoded URL path segment; `None` for a malformed escape or non-UTF-8.
pub fn decode_segment(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `^[A-Za-z0-9][A-Za-z0-9_.-]*$`, as in the CNI spec, and short enough for a file name.
pub fn validate_container_id(id: &str) -> Result<(), RecordError> {
    let mut bytes = id.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
        return Err(RecordError::ContainerIdChars(id.to_owned()));
    }
    if id.len() > MAX_CONTAINER_ID_LEN {
        return Err(RecordError::ContainerIdLength(id.len()));
    }
    Ok(())
}

/// 1 to 15 bytes, not `.` or `..`, no `/`, `:` or whitespace (the Go reference's rules).
pub fn validate_ifname(name: &str) -> Result<(), RecordError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0');
    if ok {
        Ok(())
    } else {
        Err(RecordError::Ifname(name.to_owned()))
    }
}

/// A named network namespace: `/var/run/netns/<name>` or `/run/netns/<name>`.
pub fn validate_netns_path(path: &str) -> Result<(), RecordError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(RecordError::NetnsNotAbsolute(path.to_owned()));
    }
    let parent_ok = p
        .parent()
        .and_then(Path::to_str)
        .is_some_and(|dir| NETNS_DIRS.contains(&dir));
    let name_ok = matches!(p.components().next_back(), Some(Component::Normal(_)))
        && !path.ends_with('/')
        && !path.contains("//");
    if parent_ok && name_ok {
        Ok(())
    } else {
        Err(RecordError::NetnsUnsupported(path.to_owned()))
    }
}

fn validate_pod_field(field: &'static str, value: &str) -> Result<(), RecordError> {
    if value.is_empty() || value.len() > MAX_POD_FIELD_LEN || value.chars().any(char::is_control) {
        return Err(RecordError::PodField {
            field,
            value: value.to_owned(),
        });
    }
    Ok(())
}

fn validate_cidr(s: &str) -> Result<(), RecordError> {
    let bad = || RecordError::Ip(s.to_owned());
    let (addr, prefix_text) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix_text.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    // `parse` accepts "+24" and "024"; the canonical text must round-trip.
    if prefix > max || prefix.to_string() != prefix_text {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn record() -> PodRecord {
        PodRecord {
            container_id: "0123abcd".into(),
            ifname: "eth0".into(),
            netns: "/var/run/netns/cni-1234".into(),
            netns_inode: 4026532000,
            netns_dev: 4,
            pod_namespace: Some("rgapi".into()),
            pod_name: Some("api-0".into()),
            pod_uid: Some("5f0c2a6e-6c1e-4a55-9d59-1b1f7c1d2e3f".into()),
            ips: vec!["10.244.1.7/24".into(), "fd00::7/64".into()],
            network: Some("azure".into()),
        }
    }

    #[test]
    fn record_json_uses_design_names() {
        let json = serde_json::to_value(BoundPod {
            record: record(),
            listener_port: 2579,
        })
        .unwrap();
        for key in [
            "containerId",
            "ifname",
            "netns",
            "netnsInode",
            "netnsDev",
            "podNamespace",
            "podName",
            "podUid",
            "ips",
            "network",
            "listenerPort",
        ] {
            assert!(json.get(key).is_some(), "missing {key} in {json}");
        }
        let back: BoundPod = serde_json::from_value(json).unwrap();
        assert_eq!(back.record, record());
    }

    #[test]
    fn record_without_pod_args_round_trips() {
        let mut r = record();
        r.pod_namespace = None;
        r.pod_name = None;
        r.pod_uid = None;
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("podName"));
        assert_eq!(serde_json::from_str::<PodRecord>(&json).unwrap(), r);
        assert!(r.validate().is_ok());
        assert_eq!(r.pod_ref(), None);
    }

    #[test]
    fn valid_record() {
        assert_eq!(record().validate(), Ok(()));
        assert_eq!(record().pod_ref().as_deref(), Some("rgapi/api-0"));
        assert_eq!(record().key().file_name(), "0123abcd-eth0.json");
        assert_eq!(record().key().api_path(), "/v1/pods/0123abcd/eth0");
    }

    #[test]
    fn path_segments_round_trip() {
        let key = PodKey::new("abc", "e?#%/ 1");
        assert_eq!(key.api_path(), "/v1/pods/abc/e%3F%23%25%2F%201");
        assert_eq!(
            decode_segment("e%3F%23%25%2F%201").as_deref(),
            Some("e?#%/ 1")
        );
        assert_eq!(decode_segment("eth0").as_deref(), Some("eth0"));
        for bad in ["%", "%4", "%zz", "%FF"] {
            assert_eq!(decode_segment(bad), None, "{bad}");
        }
    }

    #[test]
    fn container_ids() {
        assert!(validate_container_id("a").is_ok());
        assert!(validate_container_id("A1_b.c-d").is_ok());
        for bad in ["", "-a", ".a", "_a", "a/b", "a b", "a:b", "é"] {
            assert!(validate_container_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_container_id(&"a".repeat(MAX_CONTAINER_ID_LEN)).is_ok());
        assert_eq!(
            validate_container_id(&"a".repeat(MAX_CONTAINER_ID_LEN + 1)),
            Err(RecordError::ContainerIdLength(MAX_CONTAINER_ID_LEN + 1))
        );
    }

    #[test]
    fn ifnames() {
        for ok in ["eth0", "net1", "a", "123456789012345"] {
            assert!(validate_ifname(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "1234567890123456",
        ] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn netns_paths() {
        for ok in ["/var/run/netns/cni-1", "/run/netns/x"] {
            assert!(validate_netns_path(ok).is_ok(), "{ok}");
        }
        assert!(matches!(
            validate_netns_path("run/netns/x"),
            Err(RecordError::NetnsNotAbsolute(_))
        ));
        for bad in [
            "/proc/123/ns/net",
            "/run/netns/",
            "/run/netns",
            "/run/netns/..",
            "/run/netns/../x",
            "/run/netns/a/b",
            "/tmp/netns/x",
            "/run//netns/x",
        ] {
            let err = validate_netns_path(bad).unwrap_err();
            assert!(err.is_netns(), "{bad}");
        }
    }

    #[test]
    fn ips() {
        for ok in ["10.0.0.1/24", "fd00::1/64", "10.0.0.1/32", "::/0"] {
            assert!(validate_cidr(ok).is_ok(), "{ok}");
        }
        for bad in [
            "10.0.0.1",
            "10.0.0.1/33",
            "x/24",
            "10.0.0.1/",
            "10.0.0.1/+1",
            "fd00::1/129",
        ] {
            assert!(validate_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pod_fields_reject_control_characters() {
        let mut r = record();
        r.pod_name = Some("a\nb".into());
        assert!(matches!(
            r.validate(),
            Err(RecordError::PodField {
                field: "podName",
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn record_parsing_never_panics(s in ".*") {
            if let Ok(r) = serde_json::from_str::<PodRecord>(&s) {
                let _ = r.validate();
            }
        }

        #[test]
        fn validators_never_panic(s in any::<String>()) {
            let _ = validate_container_id(&s);
            let _ = validate_ifname(&s);
            let _ = validate_netns_path(&s);
            let _ = validate_cidr(&s);
            prop_assert_eq!(decode_segment(&encode_segment(&s)), Some(s.clone()));
        }
    }
}
