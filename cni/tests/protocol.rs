//! The protocol as a runtime sees it through the binary: VERSION, the about text, and error
//! results on stdout with exit status 1. Needs no root.

mod common;

use common::{Setup, podid};
use serde_json::{Value, json};

#[test]
fn version_echoes_a_supported_request_version() {
    let run = podid(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"0.3.0"}"#);
    run.assert_ok();
    let reply: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        reply,
        json!({"cniVersion": "0.3.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
    for stdin in ["", "not json", r#"{"cniVersion":"0.2.0"}"#] {
        let run = podid(&[("CNI_COMMAND", "VERSION")], stdin);
        run.assert_ok();
        let reply: Value = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!(reply["cniVersion"], "1.1.0", "{stdin:?}");
    }
}

#[test]
fn no_command_prints_about_to_stderr() {
    for env in [&[][..], &[("CNI_COMMAND", "")][..]] {
        let run = podid(env, "");
        run.assert_ok();
        assert_eq!(run.stdout, "");
        assert!(
            run.stderr.starts_with("CNI podid plugin v"),
            "{}",
            run.stderr
        );
        assert!(run.stderr.contains("0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"));
    }
}

#[test]
fn unknown_command_is_code_4() {
    let run = podid(&[("CNI_COMMAND", "FROB")], "{}");
    let error = run.error();
    assert_eq!(error["code"], 4);
    assert_eq!(error["cniVersion"], "1.1.0");
    assert!(error["msg"].as_str().unwrap().contains("FROB"));
}

#[test]
fn input_errors_are_json_on_stdout() {
    let setup = Setup::new();
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc"),
        ("CNI_NETNS", "/run/netns/none"),
        ("CNI_IFNAME", "eth0"),
    ];
    let conf = |extra: Value| setup.conf("0.4.0", extra).to_string();
    let cases = [
        ("{", 6, "1.1.0", "decode"),
        (r#"{"name":"azure"}"#, 7, "1.1.0", "cniVersion"),
        (
            r#"{"cniVersion":"9.9.9","name":"azure"}"#,
            1,
            "1.1.0",
            "9.9.9",
        ),
        (r#"{"cniVersion":"0.4.0"}"#, 7, "0.4.0", "name"),
        (&conf(json!({})), 7, "0.4.0", "prevResult is missing"),
        (&conf(json!({"timeoutMs": "abc"})), 7, "0.4.0", "\"abc\""),
        (
            &conf(json!({"failurePolicy": "Maybe"})),
            2,
            "0.4.0",
            "\"Maybe\"",
        ),
        (
            &conf(json!({"metadataAddress": "::1"})),
            2,
            "0.4.0",
            "metadataAddress",
        ),
    ];
    for (stdin, code, version, needle) in cases {
        let run = podid(&env, stdin);
        let error = run.error();
        assert_eq!(error["code"], code, "{stdin}: {error}");
        assert_eq!(error["cniVersion"], version, "{stdin}: {error}");
        let text = format!(
            "{} {}",
            error["msg"].as_str().unwrap(),
            error["details"].as_str().unwrap()
        );
        assert!(text.contains(needle), "{stdin}: {text}");
    }
}

#[test]
fn missing_and_invalid_environment_is_code_4() {
    let setup = Setup::new();
    let stdin = setup.conf("1.0.0", json!({})).to_string();
    let error = podid(&[("CNI_COMMAND", "CHECK")], &stdin).error();
    assert_eq!(error["code"], 4);
    assert_eq!(error["cniVersion"], "1.0.0");
    assert!(
        error["msg"]
            .as_str()
            .unwrap()
            .ends_with("CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME")
    );

    let error = podid(
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "bad/name"),
        ],
        &stdin,
    )
    .error();
    assert_eq!(error["code"], 4);
    let msg = error["msg"].as_str().unwrap();
    assert!(
        msg.contains("CNI_IFNAME") && msg.contains("bad/name"),
        "{msg}"
    );
}
