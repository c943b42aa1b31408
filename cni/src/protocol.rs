//! The CNI protocol around the commands: `CNI_*` environment, the request on stdin, the
//! VERSION reply, the error JSON, and the one writer of stdout (SPEC.md §2, §3, §5).

use std::io::{self, IsTerminal, Read, Write};

use podid_api::PodKey;
use podid_api::pod::{validate_container_id, validate_ifname};

use crate::args::CniArgs;
use crate::config::{Config, ConfigError, RawConf};
use crate::error::CniError;

/// Versions podid speaks: every one with `prevResult` (AKS's conflists are 0.3.0).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The version of answers to input that could not be read.
pub const LATEST_VERSION: &str = "1.1.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    pub fn parse(name: &str) -> Result<Self, CniError> {
        Ok(match name {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "GC" => Self::Gc,
            "STATUS" => Self::Status,
            "VERSION" => Self::Version,
            other => return Err(CniError::UnknownCommand(other.to_owned())),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Gc => "GC",
            Self::Status => "STATUS",
            Self::Version => "VERSION",
        }
    }

    /// ADD, DEL and CHECK act on one attachment named by the environment.
    fn names_attachment(self) -> bool {
        matches!(self, Self::Add | Self::Del | Self::Check)
    }
}

/// The attachment the runtime names in `CNI_CONTAINERID`, `CNI_IFNAME`, `CNI_NETNS`, `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentEnv {
    pub key: PodKey,
    /// Absent only for DEL.
    pub netns: Option<String>,
    pub args: CniArgs,
}

/// A request podid can act on.
#[derive(Debug)]
pub struct Request {
    pub command: Command,
    pub cni_version: String,
    /// The network (conflist) name.
    pub name: String,
    pub raw: RawConf,
    pub config: Config,
    /// DEL only: config keys replaced by their defaults because their values were unusable.
    pub config_warnings: Vec<ConfigError>,
    pub env: Option<AttachmentEnv>,
}

/// A request that cannot be acted on, and the version to answer it in.
#[derive(Debug)]
pub struct Failure {
    pub cni_version: String,
    pub error: CniError,
}

/// Validates a request in the order that lets every error carry the version in use: stdin,
/// `cniVersion`, `name`, environment, then podid's own keys.
pub fn parse_request(
    command: Command,
    stdin: &[u8],
    env: impl Fn(&str) -> Option<String>,
) -> Result<Request, Failure> {
    let unversioned = |error: CniError| Failure {
        cni_version: LATEST_VERSION.to_owned(),
        error,
    };
    let raw = RawConf::parse(stdin).map_err(|e| unversioned(CniError::Decode(e)))?;
    let cni_version = raw.cni_version().map_err(|e| unversioned(e.into()))?;
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(unversioned(CniError::IncompatibleVersion(cni_version)));
    }
    let versioned = |error: CniError| Failure {
        cni_version: cni_version.clone(),
        error,
    };
    let name = raw.name().map_err(|e| versioned(e.into()))?;
    let env = if command.names_attachment() {
        Some(attachment_env(command, &env).map_err(versioned)?)
    } else {
        None
    };
    let (config, config_warnings) = if command == Command::Del {
        raw.config_lenient()
    } else {
        (raw.config().map_err(|e| versioned(e.into()))?, Vec::new())
    };
    Ok(Request {
        command,
        cni_version,
        name,
        raw,
        config,
        config_warnings,
        env,
    })
}

/// Reads the attachment variables; an empty variable counts as unset, as in the Go skel.
fn attachment_env(
    command: Command,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<AttachmentEnv, CniError> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    let container_id = var("CNI_CONTAINERID");
    let netns = var("CNI_NETNS");
    let ifname = var("CNI_IFNAME");
    let mut missing = Vec::new();
    if container_id.is_none() {
        missing.push("CNI_CONTAINERID");
    }
    if netns.is_none() && command != Command::Del {
        missing.push("CNI_NETNS");
    }
    if ifname.is_none() {
        missing.push("CNI_IFNAME");
    }
    let (Some(container_id), Some(ifname)) = (container_id, ifname) else {
        return Err(CniError::MissingEnv(missing));
    };
    if !missing.is_empty() {
        return Err(CniError::MissingEnv(missing));
    }
    validate_container_id(&container_id).map_err(|e| CniError::InvalidEnv {
        name: "CNI_CONTAINERID",
        value: container_id.clone(),
        reason: e.to_string(),
    })?;
    validate_ifname(&ifname).map_err(|e| CniError::InvalidEnv {
        name: "CNI_IFNAME",
        value: ifname.clone(),
        reason: e.to_string(),
    })?;
    Ok(AttachmentEnv {
        key: PodKey::new(container_id, ifname),
        netns,
        args: CniArgs::parse(&var("CNI_ARGS").unwrap_or_default()),
    })
}

/// The whole of stdin.
pub fn read_stdin() -> Result<Vec<u8>, CniError> {
    let mut stdin = Vec::new();
    io::stdin()
        .lock()
        .read_to_end(&mut stdin)
        .map_err(CniError::Stdin)?;
    Ok(stdin)
}

/// stdin for VERSION: read only when it is not a terminal, and never an error.
pub fn read_version_stdin() -> Option<Vec<u8>> {
    if io::stdin().is_terminal() {
        return None;
    }
    read_stdin().ok()
}

/// `{"cniVersion", "supportedVersions"}`, in the requested version when podid speaks it.
pub fn version_reply(stdin: Option<&[u8]>) -> String {
    let requested = stdin
        .and_then(|bytes| RawConf::parse(bytes).ok())
        .and_then(|raw| raw.cni_version().ok());
    version_answer(requested.as_deref())
}

/// The VERSION reply for a requested version, which it echoes when podid speaks it.
pub fn version_answer(requested: Option<&str>) -> String {
    let version = requested
        .filter(|v| SUPPORTED_VERSIONS.contains(v))
        .unwrap_or(LATEST_VERSION);
    serde_json::json!({
        "cniVersion": version,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
}

/// The error result (SPEC.md §5 "Error").
pub fn error_json(cni_version: &str, error: &CniError) -> String {
    serde_json::json!({
        "cniVersion": cni_version,
        "code": error.code(),
        "msg": error.to_string(),
        "details": error.details(),
    })
    .to_string()
}

/// The about text for a bare run without `CNI_COMMAND`, as the Go skel prints it.
pub fn about() -> String {
    format!(
        "CNI podid plugin v{}\nCNI protocol versions supported: {}\n",
        env!("CARGO_PKG_VERSION"),
        SUPPORTED_VERSIONS.join(", ")
    )
}

/// The only writer of stdout, which carries the CNI result or error and nothing else.
pub fn write_stdout(text: &str) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::code;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const CONF: &str = r#"{"cniVersion":"0.3.0","name":"azure","type":"podid"}"#;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn full_env() -> Vec<(&'static str, &'static str)> {
        vec![
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p"),
        ]
    }

    fn fail(command: Command, stdin: &str, env: &[(&str, &str)]) -> Failure {
        parse_request(command, stdin.as_bytes(), env_of(env)).unwrap_err()
    }

    #[test]
    fn commands() {
        for name in ["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"] {
            assert_eq!(Command::parse(name).unwrap().as_str(), name);
        }
        let err = Command::parse("add").unwrap_err();
        assert_eq!(err.code(), code::INVALID_ENV);
        assert!(err.to_string().contains("\"add\""));
    }

    #[test]
    fn a_complete_add() {
        let request = parse_request(Command::Add, CONF.as_bytes(), env_of(&full_env())).unwrap();
        assert_eq!(request.cni_version, "0.3.0");
        assert_eq!(request.name, "azure");
        let env = request.env.unwrap();
        assert_eq!(env.key, PodKey::new("abc123", "eth0"));
        assert_eq!(env.netns.as_deref(), Some("/run/netns/x"));
        assert_eq!(env.args.pod_ref().as_deref(), Some("ns/p"));
    }

    #[test]
    fn missing_variables_are_named_together() {
        for (command, expected) in [
            (Command::Add, "CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME"),
            (Command::Check, "CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME"),
            (Command::Del, "CNI_CONTAINERID, CNI_IFNAME"),
        ] {
            let failure = fail(command, CONF, &[("CNI_NETNS", "")]);
            assert_eq!(failure.error.code(), code::INVALID_ENV);
            assert_eq!(failure.cni_version, "0.3.0");
            assert!(
                failure.error.to_string().ends_with(expected),
                "{}",
                failure.error
            );
        }
        let failure = fail(
            Command::Add,
            CONF,
            &[("CNI_CONTAINERID", "a"), ("CNI_IFNAME", "eth0")],
        );
        assert!(failure.error.to_string().ends_with("missing: CNI_NETNS"));
    }

    #[test]
    fn del_does_not_need_a_netns() {
        let env = [
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", ""),
        ];
        let request = parse_request(Command::Del, CONF.as_bytes(), env_of(&env)).unwrap();
        assert_eq!(request.env.unwrap().netns, None);
    }

    #[test]
    fn invalid_variables_name_variable_and_value() {
        for (name, value) in [
            ("CNI_CONTAINERID", "../etc"),
            ("CNI_CONTAINERID", "-abc"),
            ("CNI_IFNAME", "eth/0"),
            ("CNI_IFNAME", "averyveryverylongname"),
        ] {
            let mut env = full_env();
            env.retain(|(k, _)| *k != name);
            env.push((name, value));
            let failure = fail(Command::Add, CONF, &env);
            assert_eq!(failure.error.code(), code::INVALID_ENV);
            let msg = failure.error.to_string();
            assert!(msg.contains(name) && msg.contains(value), "{msg}");
        }
    }

    #[test]
    fn stdin_errors() {
        let failure = fail(Command::Add, "{not json", &full_env());
        assert_eq!(failure.error.code(), code::DECODE);
        assert_eq!(failure.cni_version, LATEST_VERSION);
        assert!(failure.error.to_string().contains("line 1"));
        assert_eq!(
            fail(Command::Add, "[1]", &full_env()).error.code(),
            code::DECODE
        );
        assert_eq!(
            fail(Command::Del, "", &full_env()).error.code(),
            code::DECODE
        );
    }

    #[test]
    fn version_checks() {
        let failure = fail(Command::Add, r#"{"name":"azure"}"#, &full_env());
        assert_eq!(failure.error.code(), code::INVALID_CONFIG);
        assert!(failure.error.to_string().contains("cniVersion"));
        for command in [Command::Add, Command::Del, Command::Gc, Command::Status] {
            let failure = fail(
                command,
                r#"{"cniVersion":"0.2.0","name":"azure"}"#,
                &full_env(),
            );
            assert_eq!(failure.error.code(), code::INCOMPATIBLE_VERSION);
            assert_eq!(failure.cni_version, LATEST_VERSION);
            assert!(failure.error.to_string().contains("0.2.0"));
            assert!(
                failure
                    .error
                    .details()
                    .contains("0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0")
            );
        }
    }

    #[test]
    fn name_checks() {
        let failure = fail(Command::Gc, r#"{"cniVersion":"1.1.0"}"#, &[]);
        assert_eq!(failure.error.code(), code::INVALID_CONFIG);
        assert_eq!(failure.cni_version, "1.1.0");
        let failure = fail(
            Command::Status,
            r#"{"cniVersion":"1.1.0","name":"a b"}"#,
            &[],
        );
        assert_eq!(failure.error.code(), code::INVALID_CONFIG);
        assert!(failure.error.to_string().contains("\"a b\""));
    }

    #[test]
    fn config_errors_carry_their_codes() {
        let stdin = r#"{"cniVersion":"1.0.0","name":"n","timeoutMs":"abc"}"#;
        let failure = fail(Command::Add, stdin, &full_env());
        assert_eq!(failure.error.code(), code::INVALID_CONFIG);
        assert!(format!("{} {}", failure.error, failure.error.details()).contains("\"abc\""));
        let stdin = r#"{"cniVersion":"1.0.0","name":"n","failurePolicy":"Maybe"}"#;
        let failure = fail(Command::Check, stdin, &full_env());
        assert_eq!(failure.error.code(), code::UNSUPPORTED_FIELD);
        let msg = failure.error.to_string();
        assert!(
            msg.contains("failurePolicy") && msg.contains("Maybe"),
            "{msg}"
        );
    }

    #[test]
    fn del_survives_bad_config_values() {
        let stdin = r#"{"cniVersion":"1.0.0","name":"n","timeoutMs":"abc","stateDir":"/s"}"#;
        let request = parse_request(Command::Del, stdin.as_bytes(), env_of(&full_env())).unwrap();
        assert_eq!(request.config.timeout_ms, 2000);
        assert_eq!(request.config.state_dir, std::path::PathBuf::from("/s"));
        assert_eq!(request.config_warnings.len(), 1);
    }

    #[test]
    fn gc_and_status_need_no_attachment_env() {
        let stdin = r#"{"cniVersion":"1.1.0","name":"n"}"#;
        for command in [Command::Gc, Command::Status] {
            let request = parse_request(command, stdin.as_bytes(), env_of(&[])).unwrap();
            assert!(request.env.is_none());
        }
    }

    #[test]
    fn version_replies() {
        let supported = r#"["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]"#;
        assert_eq!(
            version_reply(Some(br#"{"cniVersion":"0.3.0"}"#)),
            format!(r#"{{"cniVersion":"0.3.0","supportedVersions":{supported}}}"#)
        );
        for stdin in [
            None,
            Some(&b""[..]),
            Some(b"garbage"),
            Some(br#"{"cniVersion":"0.1.0"}"#),
        ] {
            assert_eq!(
                version_reply(stdin),
                format!(r#"{{"cniVersion":"1.1.0","supportedVersions":{supported}}}"#)
            );
        }
    }

    #[test]
    fn error_json_shape() {
        let json = error_json("0.3.0", &CniError::MissingEnv(vec!["CNI_NETNS"]));
        assert_eq!(
            json,
            r#"{"cniVersion":"0.3.0","code":4,"msg":"required environment variables missing: CNI_NETNS","details":"the runtime must set CNI_NETNS for this command"}"#
        );
    }

    #[test]
    fn about_names_versions() {
        assert!(about().starts_with("CNI podid plugin v0."));
        assert!(about().contains("0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"));
    }

    proptest! {
        #[test]
        fn parse_request_never_panics(
            stdin in proptest::collection::vec(any::<u8>(), 0..256),
            container_id in ".{0,12}",
            ifname in ".{0,20}",
        ) {
            let env = [("CNI_CONTAINERID", container_id.as_str()), ("CNI_IFNAME", ifname.as_str()), ("CNI_NETNS", "/x")];
            for command in [Command::Add, Command::Del, Command::Check, Command::Gc, Command::Status] {
                let _ = parse_request(command, &stdin, env_of(&env));
            }
            let _ = version_reply(Some(&stdin));
        }

        #[test]
        fn parse_request_never_panics_on_json_strings(stdin in r#"\{("[a-zA-Z/.]{0,12}": ?("[^"\\]{0,10}"|-?[0-9]{1,5}|null|true|\[\]|\{\}),? ?){0,6}\}"#) {
            for command in [Command::Add, Command::Del, Command::Gc] {
                let _ = parse_request(command, stdin.as_bytes(), env_of(&full_env()));
            }
        }
    }
}
