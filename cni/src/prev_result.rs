//! The previous plugin's result: podid changes nothing in it, so ADD prints it back byte for
//! byte, only rewriting `cniVersion` when the previous plugin answered in another version.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::ConfigError;

/// The only parts of a result podid reads.
#[derive(Debug, Deserialize)]
struct ResultView {
    #[serde(rename = "cniVersion", default)]
    cni_version: Option<serde_json::Value>,
    #[serde(default)]
    ips: Option<Vec<IpConfigView>>,
}

#[derive(Debug, Deserialize)]
struct IpConfigView {
    address: String,
}

/// A validated `prevResult`.
#[derive(Debug)]
pub struct PrevResult<'a> {
    raw: &'a RawValue,
    view: ResultView,
}

impl<'a> PrevResult<'a> {
    pub fn parse(raw: &'a RawValue) -> Result<Self, ConfigError> {
        if !raw.get().trim_start().starts_with('{') {
            return Err(ConfigError::PrevResult(
                "it is not a JSON object".to_owned(),
            ));
        }
        let view =
            serde_json::from_str(raw.get()).map_err(|e| ConfigError::PrevResult(e.to_string()))?;
        Ok(Self { raw, view })
    }

    /// Every `ips[].address`, exactly as the previous plugin wrote it (`"10.244.1.7/24"`).
    pub fn addresses(&self) -> Vec<String> {
        self.view
            .ips
            .iter()
            .flatten()
            .map(|ip| ip.address.clone())
            .collect()
    }

    /// The result podid prints for ADD: the bytes received when their `cniVersion` already is
    /// the request's, else the same object with `cniVersion` set to the request's.
    pub fn output(&self, cni_version: &str) -> Result<String, ConfigError> {
        if self.view.cni_version.as_ref().and_then(|v| v.as_str()) == Some(cni_version) {
            return Ok(self.raw.get().to_owned());
        }
        let mut object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(self.raw.get())
                .map_err(|e| ConfigError::PrevResult(e.to_string()))?;
        object.insert("cniVersion".to_owned(), cni_version.into());
        serde_json::to_string(&object).map_err(|e| ConfigError::PrevResult(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 0.3.0 `bridge` + `host-local` result as Debian's plugins print it (reference/cni.md §5.1).
    const BRIDGE_030: &str = include_str!("../tests/fixtures/bridge-0.3.0.json");
    /// azure-vnet's 0.3.0 result: one interface without `sandbox`, IPs without `interface`
    /// (reference/cni.md §2.5, `convertInterfaceInfoToCniResult`).
    const AZURE_VNET_030: &str = include_str!("../tests/fixtures/azure-vnet-0.3.0.json");
    /// A 1.1.0 result with the fields 1.1 added and keys no spec has yet.
    const FUTURE_110: &str = include_str!("../tests/fixtures/result-1.1.0.json");

    fn raw_value(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.trim_end().to_owned()).unwrap()
    }

    #[test]
    fn same_version_is_passed_through_byte_for_byte() {
        for (fixture, version) in [
            (BRIDGE_030, "0.3.0"),
            (AZURE_VNET_030, "0.3.0"),
            (FUTURE_110, "1.1.0"),
        ] {
            let raw = raw_value(fixture);
            let prev = PrevResult::parse(&raw).unwrap();
            assert_eq!(prev.output(version).unwrap(), fixture.trim_end());
        }
    }

    #[test]
    fn other_version_is_rewritten_in_place_keeping_every_field() {
        let raw = raw_value(AZURE_VNET_030);
        let prev = PrevResult::parse(&raw).unwrap();
        let out = prev.output("0.4.0").unwrap();
        let mut expected: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(AZURE_VNET_030).unwrap();
        expected["cniVersion"] = "0.4.0".into();
        let got: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&out).unwrap();
        assert_eq!(got, expected);
        let keys: Vec<_> = got.keys().collect();
        let expected_keys: Vec<_> = expected.keys().collect();
        assert_eq!(keys, expected_keys, "key order is kept");
    }

    #[test]
    fn missing_version_is_inserted() {
        let raw = raw_value(r#"{"ips":[{"address":"10.0.0.2/24"}],"x-future":{"a":[1,2]}}"#);
        let out = PrevResult::parse(&raw).unwrap().output("1.0.0").unwrap();
        assert_eq!(
            out,
            r#"{"ips":[{"address":"10.0.0.2/24"}],"x-future":{"a":[1,2]},"cniVersion":"1.0.0"}"#
        );
    }

    #[test]
    fn addresses_are_read_as_written() {
        let raw = raw_value(AZURE_VNET_030);
        assert_eq!(
            PrevResult::parse(&raw).unwrap().addresses(),
            ["10.224.0.42/16"]
        );
        let raw = raw_value(FUTURE_110);
        assert_eq!(
            PrevResult::parse(&raw).unwrap().addresses(),
            ["10.244.1.7/24", "fd00:10:244:1::7/64"]
        );
        let raw = raw_value(r#"{"cniVersion":"1.0.0"}"#);
        assert!(PrevResult::parse(&raw).unwrap().addresses().is_empty());
    }

    #[test]
    fn rejects_what_is_not_a_result() {
        for bad in [
            "[]",
            "\"x\"",
            "3",
            r#"{"ips":"10.0.0.1/24"}"#,
            r#"{"ips":[{"gateway":"10.0.0.1"}]}"#,
        ] {
            let raw = raw_value(bad);
            assert!(PrevResult::parse(&raw).is_err(), "{bad}");
        }
    }
}
