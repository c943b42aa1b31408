//! The network configuration on stdin: the keys every CNI request has (`cniVersion`, `name`,
//! `prevResult`, GC's attachment lists) and podid's own keys (DESIGN.md "Plugin config").
//!
//! A key with the wrong JSON type is an invalid configuration (code 7); a key of the right
//! type whose value podid cannot use is an unsupported field (code 2). Either error names the
//! key and the value.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use podid_api::defaults;
use serde::Deserialize;
use serde_json::value::RawValue;

/// Longest `timeoutMs` podid accepts: a runtime gives up on a plugin long before a minute.
pub const MAX_TIMEOUT_MS: u64 = 60_000;
/// Longest value text an error message quotes.
const MAX_SHOWN: usize = 120;

/// Every top-level key of the request, each value kept as the exact bytes received.
#[derive(Debug)]
pub struct RawConf(HashMap<String, Box<RawValue>>);

/// What podid does with a pod when tokend does not take its record in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// ADD fails with code 11 and the runtime retries.
    Fail,
    /// The record is spooled for tokend and ADD succeeds.
    Ignore,
}

/// podid's own keys, with DESIGN.md's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub socket: PathBuf,
    pub metadata_address: Ipv4Addr,
    pub timeout_ms: u64,
    pub failure_policy: FailurePolicy,
    pub fail_open_namespaces: Vec<String>,
    pub state_dir: PathBuf,
    pub log_file: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: defaults::SOCKET.into(),
            metadata_address: Ipv4Addr::new(169, 254, 169, 254),
            timeout_ms: defaults::TIMEOUT_MS,
            failure_policy: FailurePolicy::Fail,
            fail_open_namespaces: defaults::FAIL_OPEN_NAMESPACES
                .iter()
                .map(|ns| (*ns).to_owned())
                .collect(),
            state_dir: defaults::STATE_DIR.into(),
            log_file: defaults::LOG_FILE.into(),
        }
    }
}

impl Config {
    /// Whether a pod of `namespace` is spooled rather than failed when tokend is unavailable.
    pub fn fails_open(&self, namespace: Option<&str>) -> bool {
        self.failure_policy == FailurePolicy::Ignore
            || namespace.is_some_and(|ns| self.fail_open_namespaces.iter().any(|n| n == ns))
    }

    /// Whether STATUS must report tokend's unreadiness: only when no pod could start without it.
    pub fn strict_status(&self) -> bool {
        self.failure_policy == FailurePolicy::Fail && self.fail_open_namespaces.is_empty()
    }
}

/// One `{"containerID", "ifname"}` entry of GC's valid-attachments list.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the network configuration has no {0:?}")]
    Missing(&'static str),
    #[error("key {key:?} must be {expected}, got {value}")]
    WrongType {
        key: &'static str,
        expected: &'static str,
        value: String,
    },
    #[error("unsupported value {value} for key {key:?}")]
    Unsupported {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("network name {0} is invalid")]
    Name(String),
    #[error("podid must be called as a chained plugin: prevResult is missing")]
    NoPrevResult,
    #[error("prevResult is not a CNI result: {0}")]
    PrevResult(String),
    #[error("{key} entry {value} is malformed")]
    Attachment {
        key: &'static str,
        value: String,
        reason: String,
    },
}

impl ConfigError {
    /// Unsupported values are CNI code 2; everything else here is code 7.
    pub fn is_unsupported_value(&self) -> bool {
        matches!(self, Self::Unsupported { .. })
    }

    pub fn details(&self) -> String {
        match self {
            Self::Missing(key) => format!("the runtime must set {key:?}"),
            Self::WrongType {
                key,
                expected,
                value,
            } => format!("{key} = {value}: expected {expected}"),
            Self::Unsupported { key, value, reason } => format!("{key} = {value}: {reason}"),
            Self::Name(_) => "a network name starts with a letter or digit and contains only letters, digits, '_', '.' and '-'".to_owned(),
            Self::NoPrevResult => "add podid after the network's main plugin (azure-vnet, bridge, ...) in the plugins list of the conflist".to_owned(),
            Self::PrevResult(e) => e.clone(),
            Self::Attachment { key, reason, .. } => {
                format!("every {key} entry must be {{\"containerID\": string, \"ifname\": string}}: {reason}")
            }
        }
    }
}

impl RawConf {
    /// Parses stdin as one JSON object, keeping every value's bytes.
    pub fn parse(stdin: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(stdin).map(Self)
    }

    /// A key's raw value; JSON `null` counts as absent.
    fn get(&self, key: &str) -> Option<&RawValue> {
        self.0
            .get(key)
            .map(Box::as_ref)
            .filter(|raw| raw.get() != "null")
    }

    /// A key's raw value, owned, for the parts the plugin passes on byte for byte.
    pub fn take_raw(&self, key: &str) -> Option<Box<RawValue>> {
        self.get(key).map(ToOwned::to_owned)
    }

    pub fn cni_version(&self) -> Result<String, ConfigError> {
        let raw = self
            .get("cniVersion")
            .ok_or(ConfigError::Missing("cniVersion"))?;
        typed(raw, "cniVersion", "a string")
    }

    /// `name`, checked like the Go skel does: `[A-Za-z0-9][A-Za-z0-9_.-]*`.
    pub fn name(&self) -> Result<String, ConfigError> {
        let raw = self.get("name").ok_or(ConfigError::Missing("name"))?;
        let name: String = typed(raw, "name", "a string")?;
        let mut bytes = name.bytes();
        let valid = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
            && bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if valid {
            Ok(name)
        } else {
            Err(ConfigError::Name(show(raw)))
        }
    }

    /// podid's keys, validated; the first error wins.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let (config, errors) = self.config_lenient();
        match errors.into_iter().next() {
            None => Ok(config),
            Some(first) => Err(first),
        }
    }

    /// podid's keys, with the default in place of every unusable value (DEL must not fail
    /// over a config key it barely needs), and the errors that caused each substitution.
    pub fn config_lenient(&self) -> (Config, Vec<ConfigError>) {
        let mut config = Config::default();
        let mut errors = Vec::new();
        let mut apply = |result: Result<(), ConfigError>| {
            if let Err(e) = result {
                errors.push(e);
            }
        };
        apply(self.path("socket").map(|v| set(&mut config.socket, v)));
        apply(
            self.metadata_address()
                .map(|v| set(&mut config.metadata_address, v)),
        );
        apply(self.timeout_ms().map(|v| set(&mut config.timeout_ms, v)));
        apply(
            self.failure_policy()
                .map(|v| set(&mut config.failure_policy, v)),
        );
        apply(
            self.fail_open_namespaces()
                .map(|v| set(&mut config.fail_open_namespaces, v)),
        );
        apply(self.path("stateDir").map(|v| set(&mut config.state_dir, v)));
        apply(self.path("logFile").map(|v| set(&mut config.log_file, v)));
        (config, errors)
    }

    /// GC's valid set: the union of `cni.dev/valid-attachments` and the legacy
    /// `cni.dev/attachments` (libcni sends both; `null` is an empty list). Neither key present
    /// is an error: a GC without its valid set would collect every pod of the network.
    pub fn valid_attachments(&self) -> Result<Vec<Attachment>, ConfigError> {
        const KEYS: [&str; 2] = ["cni.dev/valid-attachments", "cni.dev/attachments"];
        if KEYS.iter().all(|key| !self.0.contains_key(*key)) {
            return Err(ConfigError::Missing(KEYS[0]));
        }
        let mut all = Vec::new();
        for key in KEYS {
            let Some(raw) = self.get(key) else { continue };
            let entries: Vec<&RawValue> = typed(raw, key, "an array of attachments")?;
            for entry in entries {
                let attachment = serde_json::from_str::<Attachment>(entry.get()).map_err(|e| {
                    ConfigError::Attachment {
                        key,
                        value: show(entry),
                        reason: e.to_string(),
                    }
                })?;
                all.push(attachment);
            }
        }
        Ok(all)
    }

    fn path(&self, key: &'static str) -> Result<Option<PathBuf>, ConfigError> {
        let Some(raw) = self.get(key) else {
            return Ok(None);
        };
        let text: String = typed(raw, key, "a string")?;
        if !text.starts_with('/') || text.contains('\0') {
            return Err(ConfigError::Unsupported {
                key,
                value: show(raw),
                reason: "must be an absolute path",
            });
        }
        Ok(Some(text.into()))
    }

    fn metadata_address(&self) -> Result<Option<Ipv4Addr>, ConfigError> {
        let key = "metadataAddress";
        let Some(raw) = self.get(key) else {
            return Ok(None);
        };
        let text: String = typed(raw, key, "a string")?;
        text.parse()
            .map(Some)
            .map_err(|_| ConfigError::Unsupported {
                key,
                value: show(raw),
                reason: "must be an IPv4 address such as 169.254.169.254",
            })
    }

    fn timeout_ms(&self) -> Result<Option<u64>, ConfigError> {
        let key = "timeoutMs";
        let Some(raw) = self.get(key) else {
            return Ok(None);
        };
        let number: serde_json::Number = typed(raw, key, "a number of milliseconds")?;
        match number.as_u64() {
            Some(ms @ 1..=MAX_TIMEOUT_MS) => Ok(Some(ms)),
            _ => Err(ConfigError::Unsupported {
                key,
                value: show(raw),
                reason: "must be a whole number of milliseconds from 1 to 60000",
            }),
        }
    }

    fn failure_policy(&self) -> Result<Option<FailurePolicy>, ConfigError> {
        let key = "failurePolicy";
        let Some(raw) = self.get(key) else {
            return Ok(None);
        };
        match typed::<String>(raw, key, "a string")?.as_str() {
            "Fail" => Ok(Some(FailurePolicy::Fail)),
            "Ignore" => Ok(Some(FailurePolicy::Ignore)),
            _ => Err(ConfigError::Unsupported {
                key,
                value: show(raw),
                reason: "must be \"Fail\" or \"Ignore\"",
            }),
        }
    }

    fn fail_open_namespaces(&self) -> Result<Option<Vec<String>>, ConfigError> {
        let key = "failOpenNamespaces";
        match self.get(key) {
            Some(raw) => typed(raw, key, "an array of namespace names").map(Some),
            None => Ok(None),
        }
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}

fn typed<'a, T: Deserialize<'a>>(
    raw: &'a RawValue,
    key: &'static str,
    expected: &'static str,
) -> Result<T, ConfigError> {
    serde_json::from_str(raw.get()).map_err(|_| ConfigError::WrongType {
        key,
        expected,
        value: show(raw),
    })
}

/// A value's JSON text for an error message, cut short if long.
fn show(raw: &RawValue) -> String {
    let text = raw.get();
    match text.char_indices().nth(MAX_SHOWN) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn conf(json: &str) -> RawConf {
        RawConf::parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn defaults_match_design() {
        let config = conf(r#"{"cniVersion":"1.0.0","name":"azure","type":"podid"}"#)
            .config()
            .unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.socket, PathBuf::from("/var/run/podid/tokend.sock"));
        assert_eq!(
            config.metadata_address.to_string(),
            defaults::METADATA_ADDRESS
        );
        assert_eq!(config.timeout_ms, 2000);
        assert_eq!(config.failure_policy, FailurePolicy::Fail);
        assert_eq!(config.fail_open_namespaces, ["kube-system"]);
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/podid"));
        assert_eq!(config.log_file, PathBuf::from("/var/log/podid/cni.log"));
    }

    #[test]
    fn every_key_is_read() {
        let config = conf(
            r#"{"socket":"/s.sock","metadataAddress":"10.0.0.1","timeoutMs":500,
                "failurePolicy":"Ignore","failOpenNamespaces":["a","b"],
                "stateDir":"/st","logFile":"/l.log","unknown":{"x":1}}"#,
        )
        .config()
        .unwrap();
        assert_eq!(
            config,
            Config {
                socket: "/s.sock".into(),
                metadata_address: Ipv4Addr::new(10, 0, 0, 1),
                timeout_ms: 500,
                failure_policy: FailurePolicy::Ignore,
                fail_open_namespaces: vec!["a".into(), "b".into()],
                state_dir: "/st".into(),
                log_file: "/l.log".into(),
            }
        );
    }

    #[test]
    fn null_means_default() {
        let config = conf(r#"{"timeoutMs":null,"failOpenNamespaces":null}"#)
            .config()
            .unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn wrong_types_name_key_and_value() {
        for (json, key, value) in [
            (r#"{"timeoutMs":"abc"}"#, "timeoutMs", r#""abc""#),
            (
                r#"{"failOpenNamespaces":"x"}"#,
                "failOpenNamespaces",
                r#""x""#,
            ),
            (r#"{"failOpenNamespaces":[1]}"#, "failOpenNamespaces", "[1]"),
            (r#"{"socket":5}"#, "socket", "5"),
            (r#"{"metadataAddress":true}"#, "metadataAddress", "true"),
            (
                r#"{"failurePolicy":["Fail"]}"#,
                "failurePolicy",
                r#"["Fail"]"#,
            ),
        ] {
            let err = conf(json).config().unwrap_err();
            assert!(!err.is_unsupported_value(), "{json}");
            let text = format!("{err} {}", err.details());
            assert!(text.contains(key) && text.contains(value), "{json}: {text}");
        }
    }

    #[test]
    fn unsupported_values_name_key_and_value() {
        for (json, key, value) in [
            (r#"{"failurePolicy":"Maybe"}"#, "failurePolicy", "Maybe"),
            (
                r#"{"metadataAddress":"fd00::1"}"#,
                "metadataAddress",
                "fd00::1",
            ),
            (r#"{"metadataAddress":"imds"}"#, "metadataAddress", "imds"),
            (r#"{"timeoutMs":0}"#, "timeoutMs", "0"),
            (r#"{"timeoutMs":60001}"#, "timeoutMs", "60001"),
            (r#"{"timeoutMs":-5}"#, "timeoutMs", "-5"),
            (r#"{"timeoutMs":1.5}"#, "timeoutMs", "1.5"),
            (r#"{"socket":"run/t.sock"}"#, "socket", "run/t.sock"),
            (r#"{"stateDir":""}"#, "stateDir", r#""""#),
            (r#"{"logFile":"x.log"}"#, "logFile", "x.log"),
        ] {
            let err = conf(json).config().unwrap_err();
            assert!(err.is_unsupported_value(), "{json}");
            let msg = err.to_string();
            assert!(msg.contains(key) && msg.contains(value), "{json}: {msg}");
        }
    }

    #[test]
    fn lenient_keeps_good_keys_and_reports_bad_ones() {
        let (config, errors) =
            conf(r#"{"timeoutMs":"abc","stateDir":"/st","failurePolicy":"Maybe"}"#)
                .config_lenient();
        assert_eq!(config.timeout_ms, defaults::TIMEOUT_MS);
        assert_eq!(config.state_dir, PathBuf::from("/st"));
        assert_eq!(config.failure_policy, FailurePolicy::Fail);
        assert_eq!(errors.len(), 2);
    }

    #[test]
    fn version_and_name() {
        let c = conf(r#"{"cniVersion":"0.3.0","name":"azure"}"#);
        assert_eq!(c.cni_version().unwrap(), "0.3.0");
        assert_eq!(c.name().unwrap(), "azure");
        assert!(matches!(
            conf("{}").cni_version(),
            Err(ConfigError::Missing("cniVersion"))
        ));
        assert!(matches!(
            conf(r#"{"cniVersion":1}"#).cni_version(),
            Err(ConfigError::WrongType { .. })
        ));
        assert!(matches!(
            conf("{}").name(),
            Err(ConfigError::Missing("name"))
        ));
        for bad in [r#""""#, r#""-net""#, r#""a b""#, r#""a/b""#, "7"] {
            let c = conf(&format!(r#"{{"name":{bad}}}"#));
            assert!(c.name().is_err(), "{bad}");
        }
        assert_eq!(
            conf(r#"{"name":"k8s-pod_net.1"}"#).name().unwrap(),
            "k8s-pod_net.1"
        );
    }

    #[test]
    fn fail_open_and_strict_status() {
        let config = Config::default();
        assert!(config.fails_open(Some("kube-system")));
        assert!(!config.fails_open(Some("default")));
        assert!(!config.fails_open(None));
        assert!(!config.strict_status());
        let ignore = Config {
            failure_policy: FailurePolicy::Ignore,
            fail_open_namespaces: vec![],
            ..Config::default()
        };
        assert!(ignore.fails_open(None));
        assert!(!ignore.strict_status());
        let strict = Config {
            fail_open_namespaces: vec![],
            ..Config::default()
        };
        assert!(strict.strict_status());
        assert!(!strict.fails_open(Some("kube-system")));
    }

    #[test]
    fn valid_attachments_union_both_keys() {
        let c = conf(
            r#"{"cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}],
                "cni.dev/attachments":[{"containerID":"b","ifname":"net1"}]}"#,
        );
        let all = c.valid_attachments().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].container_id, "b");
        assert!(
            conf(r#"{"cni.dev/valid-attachments":null}"#)
                .valid_attachments()
                .unwrap()
                .is_empty()
        );
        assert!(matches!(
            conf("{}").valid_attachments(),
            Err(ConfigError::Missing(_))
        ));
        for bad in [
            r#"{"cni.dev/valid-attachments":[{"containerID":"a"}]}"#,
            r#"{"cni.dev/valid-attachments":["a"]}"#,
            r#"{"cni.dev/attachments":[{"containerID":1,"ifname":"eth0"}]}"#,
            r#"{"cni.dev/valid-attachments":{"containerID":"a","ifname":"eth0"}}"#,
        ] {
            assert!(conf(bad).valid_attachments().is_err(), "{bad}");
        }
    }

    #[test]
    fn long_values_are_cut() {
        let long = "x".repeat(1000);
        let err = conf(&format!(r#"{{"failurePolicy":"{long}"}}"#))
            .config()
            .unwrap_err();
        assert!(err.to_string().len() < 300);
    }

    proptest! {
        #[test]
        fn parser_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(c) = RawConf::parse(&bytes) {
                let _ = (c.cni_version(), c.name(), c.config_lenient(), c.valid_attachments());
            }
        }

        #[test]
        fn parser_never_panics_on_objects(
            key in prop::sample::select(vec![
                "cniVersion", "name", "socket", "metadataAddress", "timeoutMs", "failurePolicy",
                "failOpenNamespaces", "stateDir", "logFile", "prevResult",
                "cni.dev/valid-attachments", "cni.dev/attachments",
            ]),
            value in prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                any::<f64>().prop_map(|n| serde_json::json!(n).to_string()),
                ".*".prop_map(|s| serde_json::json!(s).to_string()),
                Just("[]".to_owned()),
                Just("{}".to_owned()),
                Just("[{\"containerID\":\"a\",\"ifname\":\"b\"}, 3]".to_owned()),
                Just("null".to_owned()),
            ],
        ) {
            let json = format!("{{\"{key}\": {value}}}");
            let c = RawConf::parse(json.as_bytes()).unwrap();
            let _ = (c.cni_version(), c.name(), c.config(), c.valid_attachments());
        }
    }
}
