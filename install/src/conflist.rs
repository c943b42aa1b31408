//! The network config rules, pure: how the runtime judges a file in the conf dir, and the text
//! edits that chain podid into the primary, convert a lone `.conf` into a `.conflist`, and take
//! podid out again.
//!
//! Edits are splices: the file's text is kept byte for byte except the `plugins` array, and
//! inside it every other entry keeps its exact text (`RawValue`), so `cniVersion`, `name`,
//! unknown keys, key order, number spellings and formatting all survive.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The `type` of our entry (the binary's name in the CNI bin dir).
pub const PLUGIN_TYPE: &str = "podid";

/// How a runtime reads a file, by its extension: libcni's `ConfFiles` takes `.conf`, `.conflist`
/// and `.json`; go-cni and ocicni read only `.conflist` as a list, the others as one plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    List,
    Single,
}

impl Kind {
    /// The kind of a directory entry, `None` when no runtime reads it.
    pub fn of(file_name: &str) -> Option<Self> {
        let (_, ext) = file_name.rsplit_once('.')?;
        match ext {
            "conflist" => Some(Self::List),
            "conf" | "json" => Some(Self::Single),
            _ => None,
        }
    }
}

/// A network config the runtime would run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub kind: Kind,
    pub name: String,
    pub cni_version: Option<String>,
    /// The `type` of each plugin, in chain order.
    pub plugin_types: Vec<String>,
}

impl Network {
    /// Whether podid's entry is the last plugin (what "chained" means for a list).
    pub fn ends_with_podid(&self) -> bool {
        self.plugin_types.last().is_some_and(|t| t == PLUGIN_TYPE)
    }

    pub fn has_podid(&self) -> bool {
        self.plugin_types.iter().any(|t| t == PLUGIN_TYPE)
    }
}

/// What a file in the conf dir is, when choosing the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Valid(Network),
    /// Truncated JSON (or nothing yet): a writer may be half-way through it, as dropgz is
    /// between its `O_TRUNC` and its last chunk. A prefix of valid JSON never has a syntax
    /// error, so only an unexpected end means "maybe still being written".
    Incomplete(String),
    /// Complete, but no network config: cri-o skips it, containerd stops at it.
    Invalid(String),
}

/// Judges a file's contents as a runtime would (libcni `ConfListFromBytes` / `ConfFromBytes`).
pub fn classify(kind: Kind, bytes: &[u8]) -> Verdict {
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        // error_len() is None when the bytes end inside a character
        Err(e) if e.error_len().is_none() => {
            return Verdict::Incomplete("ends inside a UTF-8 character".to_owned());
        }
        Err(e) => return Verdict::Invalid(format!("not UTF-8: {e}")),
    };
    if text.trim().is_empty() {
        return Verdict::Incomplete("empty".to_owned());
    }
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) if e.is_eof() => return Verdict::Incomplete(format!("truncated JSON: {e}")),
        Err(e) => return Verdict::Invalid(format!("not JSON: {e}")),
    };
    match network(kind, &value) {
        Ok(network) => Verdict::Valid(network),
        Err(why) => Verdict::Invalid(why),
    }
}

fn network(kind: Kind, value: &Value) -> Result<Network, String> {
    let Value::Object(top) = value else {
        return Err("not a JSON object".to_owned());
    };
    let name = match top.get("name") {
        Some(Value::String(name)) if !name.is_empty() => name.clone(),
        Some(Value::String(_)) => return Err("\"name\" is empty".to_owned()),
        Some(_) => return Err("\"name\" is not a string".to_owned()),
        None => return Err("no \"name\"".to_owned()),
    };
    let cni_version = match top.get("cniVersion") {
        Some(Value::String(version)) => Some(version.clone()),
        Some(_) => return Err("\"cniVersion\" is not a string".to_owned()),
        None => None,
    };
    let plugin_types = match kind {
        Kind::Single => vec![
            plugin_type(top)
                .map_err(|why| format!("{why} (a .conf or .json file holds one plugin)"))?,
        ],
        Kind::List => {
            let plugins = match top.get("plugins") {
                Some(Value::Array(plugins)) if !plugins.is_empty() => plugins,
                Some(Value::Array(_)) => return Err("\"plugins\" is empty".to_owned()),
                Some(_) => return Err("\"plugins\" is not an array".to_owned()),
                None => return Err("no \"plugins\"".to_owned()),
            };
            plugins
                .iter()
                .enumerate()
                .map(|(i, plugin)| match plugin {
                    Value::Object(plugin) => {
                        plugin_type(plugin).map_err(|why| format!("plugins[{i}]: {why}"))
                    }
                    _ => Err(format!("plugins[{i}] is not an object")),
                })
                .collect::<Result<_, _>>()?
        }
    };
    Ok(Network {
        kind,
        name,
        cni_version,
        plugin_types,
    })
}

fn plugin_type(plugin: &Map<String, Value>) -> Result<String, String> {
    match plugin.get("type") {
        Some(Value::String(t)) if !t.is_empty() => Ok(t.clone()),
        Some(_) => Err("\"type\" is not a non-empty string".to_owned()),
        None => Err("no \"type\"".to_owned()),
    }
}

/// One candidate of the conf dir, in the order the runtime reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub verdict: Verdict,
}

/// What the runtime's choice of default network is, seen from the sorted candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Index of the first valid file.
    Primary(usize),
    /// Index of an incomplete file that sorts before every valid one: wait for it.
    Pending(usize),
    /// No valid file at all: wait for the primary plugin's installer.
    Nothing,
}

/// The runtime's rule: files sorted by name (byte order, Go's `sort.Strings`), the first valid
/// one wins. Invalid files are passed over; an incomplete one stops the walk, since it may be
/// the primary half-written.
pub fn select(candidates: &[Candidate]) -> Selection {
    for (i, candidate) in candidates.iter().enumerate() {
        match candidate.verdict {
            Verdict::Valid(_) => return Selection::Primary(i),
            Verdict::Incomplete(_) => return Selection::Pending(i),
            Verdict::Invalid(_) => {}
        }
    }
    Selection::Nothing
}

/// Whether an edit changes the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    Unchanged,
    Changed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("not a network config: {0}")]
    NotConfig(String),
    #[error(
        "every plugin of the list is podid: there is no primary plugin to chain after, and removing podid would leave an empty list"
    )]
    OnlyPodid,
}

/// Our entry of the plugins list: `{"type": "podid", ...}`, never `name` or `cniVersion` (the
/// list's values are what the runtime passes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry(Map<String, Value>);

impl Entry {
    /// `keys` after `"type": "podid"`, in the order given.
    pub fn new(keys: impl IntoIterator<Item = (&'static str, Value)>) -> Self {
        let mut map = Map::new();
        map.insert("type".to_owned(), Value::String(PLUGIN_TYPE.to_owned()));
        for (key, value) in keys {
            if key != "type" && key != "name" && key != "cniVersion" {
                map.insert(key.to_owned(), value);
            }
        }
        Self(map)
    }

    pub fn as_value(&self) -> Value {
        Value::Object(self.0.clone())
    }

    /// The entry as text placed at `indent` (the whitespace the other entries start with), one
    /// level being `unit`; compact when the list is on one line (`indent` is `None`).
    fn render(&self, indent: Option<&str>, unit: &str) -> String {
        let value = self.as_value();
        let Some(indent) = indent else {
            return value.to_string();
        };
        let mut out = Vec::new();
        let formatter = serde_json::ser::PrettyFormatter::with_indent(unit.as_bytes());
        let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
        // Serializing a Value into a Vec cannot fail.
        let _ = serde::Serialize::serialize(&value, &mut serializer);
        reindent(&String::from_utf8_lossy(&out), indent)
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_value())
    }
}

/// Places every line after the first at `indent`. JSON text holds no raw newline inside a
/// string, so every `\n` is layout.
fn reindent(text: &str, indent: &str) -> String {
    text.replace('\n', &format!("\n{indent}"))
}

/// The top level of a JSON object, keys in file order, each value's exact text.
struct TopLevel<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TopVisitor;
        impl<'de> Visitor<'de> for TopVisitor {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some((key, value)) = map.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                    entries.push((key.into_owned(), value));
                }
                Ok(TopLevel(entries))
            }
        }
        deserializer.deserialize_map(TopVisitor)
    }
}

impl<'a> TopLevel<'a> {
    fn parse(text: &'a str) -> Result<Self, EditError> {
        serde_json::from_str(text).map_err(|e| EditError::NotConfig(e.to_string()))
    }

    /// The value of `key`; the last one wins, as with Go's `json.Unmarshal` into a map.
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

/// Where `part` (a slice of `text`) lies in `text`.
fn span(text: &str, part: &str) -> Result<Range<usize>, EditError> {
    let start = (part.as_ptr() as usize)
        .checked_sub(text.as_ptr() as usize)
        .filter(|start| start + part.len() <= text.len())
        .ok_or_else(|| EditError::NotConfig("a parsed value lies outside its text".to_owned()))?;
    Ok(start..start + part.len())
}

/// The `plugins` array of a list as spans of its text.
struct ListLayout<'a> {
    text: &'a str,
    /// The array, brackets included.
    array: Range<usize>,
    /// Each entry.
    entries: Vec<Range<usize>>,
    /// Each entry parsed, to compare and to read its `type`.
    values: Vec<Value>,
}

impl<'a> ListLayout<'a> {
    fn parse(text: &'a str) -> Result<Self, EditError> {
        let top = TopLevel::parse(text)?;
        let plugins = top
            .get("plugins")
            .ok_or_else(|| EditError::NotConfig("no \"plugins\"".to_owned()))?;
        let raw_entries: Vec<&RawValue> = serde_json::from_str(plugins.get())
            .map_err(|e| EditError::NotConfig(format!("\"plugins\" is not an array: {e}")))?;
        if raw_entries.is_empty() {
            return Err(EditError::NotConfig("\"plugins\" is empty".to_owned()));
        }
        let entries = raw_entries
            .iter()
            .map(|raw| span(text, raw.get()))
            .collect::<Result<Vec<_>, _>>()?;
        let values = raw_entries
            .iter()
            .map(|raw| serde_json::from_str(raw.get()))
            .collect::<Result<Vec<Value>, _>>()
            .map_err(|e| EditError::NotConfig(e.to_string()))?;
        Ok(Self {
            text,
            array: span(text, plugins.get())?,
            entries,
            values,
        })
    }

    fn is_podid(&self, i: usize) -> bool {
        self.values[i].get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
    }

    /// Whitespace between `[` and the first entry.
    fn opening(&self) -> &'a str {
        &self.text[self.array.start + 1..self.entries[0].start]
    }

    /// Whitespace between the last entry and `]`.
    fn closing(&self) -> &'a str {
        let last = &self.entries[self.entries.len() - 1];
        &self.text[last.end..self.array.end - 1]
    }

    /// What separates two entries: the file's own separator, else a comma and the opening.
    fn separator(&self) -> Cow<'a, str> {
        match self.entries.as_slice() {
            [first, second, ..] => Cow::Borrowed(&self.text[first.end..second.start]),
            _ => Cow::Owned(format!(",{}", self.opening())),
        }
    }

    /// The indentation of entries, `None` when the array is on one line.
    fn indent(&self) -> Option<&'a str> {
        self.opening().rsplit_once('\n').map(|(_, indent)| indent)
    }

    /// One level of indentation: the entries' indent minus the closing bracket's.
    fn unit(&self) -> &'a str {
        let outer = self
            .closing()
            .rsplit_once('\n')
            .map_or("", |(_, indent)| indent);
        match self.indent().and_then(|inner| inner.strip_prefix(outer)) {
            Some(unit) if !unit.is_empty() => unit,
            _ => "  ",
        }
    }

    /// The text with the array holding `keep` (indices of existing entries) and then `extra`.
    fn splice(&self, keep: &[usize], extra: Option<&str>) -> String {
        let separator = self.separator();
        let mut items: Vec<&str> = keep
            .iter()
            .map(|&i| &self.text[self.entries[i].clone()])
            .collect();
        items.extend(extra);
        let mut out = String::with_capacity(self.text.len() + extra.map_or(0, str::len));
        out.push_str(&self.text[..self.array.start]);
        out.push('[');
        out.push_str(self.opening());
        out.push_str(&items.join(&separator));
        out.push_str(self.closing());
        out.push(']');
        out.push_str(&self.text[self.array.end..]);
        out
    }
}

/// Whether `text` (a list) already ends with exactly `entry` and holds no other podid entry.
pub fn is_chained(text: &str, entry: &Entry) -> bool {
    ListLayout::parse(text).is_ok_and(|layout| chained(&layout, entry))
}

/// Whether `text` (a list) holds any podid entry.
pub fn holds_podid(text: &str) -> bool {
    ListLayout::parse(text)
        .is_ok_and(|layout| (0..layout.entries.len()).any(|i| layout.is_podid(i)))
}

fn chained(layout: &ListLayout<'_>, entry: &Entry) -> bool {
    let last = layout.entries.len() - 1;
    let podid: Vec<usize> = (0..layout.entries.len())
        .filter(|&i| layout.is_podid(i))
        .collect();
    podid == [last] && layout.values[last] == entry.as_value()
}

/// Chains podid into a list: every existing podid entry is removed and `entry` appended last,
/// after the primary plugin and every other plugin (portmap, bandwidth, ...).
pub fn chain(text: &str, entry: &Entry) -> Result<Edit, EditError> {
    let layout = ListLayout::parse(text)?;
    if chained(&layout, entry) {
        return Ok(Edit::Unchanged);
    }
    let keep: Vec<usize> = (0..layout.entries.len())
        .filter(|&i| !layout.is_podid(i))
        .collect();
    if keep.is_empty() {
        return Err(EditError::OnlyPodid);
    }
    let ours = entry.render(layout.indent(), layout.unit());
    Ok(Edit::Changed(layout.splice(&keep, Some(&ours))))
}

/// Removes every podid entry from a list, leaving everything else as it is.
pub fn unchain(text: &str) -> Result<Edit, EditError> {
    let layout = ListLayout::parse(text)?;
    let keep: Vec<usize> = (0..layout.entries.len())
        .filter(|&i| !layout.is_podid(i))
        .collect();
    if keep.len() == layout.entries.len() {
        return Ok(Edit::Unchanged);
    }
    if keep.is_empty() {
        return Err(EditError::OnlyPodid);
    }
    Ok(Edit::Changed(layout.splice(&keep, None)))
}

/// A lone plugin config (`.conf`, `.json`) as a list, as libcni's `ConfListFromConf` sees it:
/// `{"cniVersion": <its cniVersion, if any>, "name": <its name>, "plugins": [<the original
/// object, unchanged, its name and cniVersion included>, <entry, if given>]}`.
pub fn convert(text: &str, entry: Option<&Entry>) -> Result<String, EditError> {
    let top = TopLevel::parse(text)?;
    let name = top
        .get("name")
        .ok_or_else(|| EditError::NotConfig("no \"name\"".to_owned()))?;
    const INDENT: &str = "    ";
    let mut out = String::from("{\n");
    if let Some(version) = top.get("cniVersion") {
        out.push_str(&format!("  \"cniVersion\": {},\n", version.get()));
    }
    out.push_str(&format!("  \"name\": {},\n", name.get()));
    out.push_str("  \"plugins\": [\n");
    out.push_str(INDENT);
    out.push_str(&reindent(text.trim(), INDENT));
    if let Some(entry) = entry {
        out.push_str(",\n");
        out.push_str(INDENT);
        out.push_str(&entry.render(Some(INDENT), "  "));
    }
    out.push_str("\n  ]\n}\n");
    Ok(out)
}

/// Whether two texts hold the same JSON value (key order aside).
pub fn same_json(a: &str, b: &str) -> bool {
    match (
        serde_json::from_str::<Value>(a),
        serde_json::from_str::<Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The file name a lone config `<stem>.conf` / `<stem>.json` is converted to.
pub fn converted_name(file_name: &str) -> Option<String> {
    let (stem, ext) = file_name.rsplit_once('.')?;
    matches!(ext, "conf" | "json").then(|| format!("{stem}.conflist"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry() -> Entry {
        Entry::new([
            ("socket", json!("/var/run/podid/tokend.sock")),
            ("timeoutMs", json!(2000)),
            ("failurePolicy", json!("Fail")),
            ("failOpenNamespaces", json!(["kube-system"])),
            ("stateDir", json!("/var/lib/podid")),
            ("logFile", json!("/var/log/podid/cni.log")),
        ])
    }

    const AKS: &str = r#"{
   "cniVersion":"0.3.0",
   "name":"azure",
   "plugins":[
      {
         "type":"azure-vnet",
         "mode":"transparent",
         "ipsToRouteViaHost":["169.254.20.10"],
         "ipam":{
            "type":"azure-vnet-ipam"
         }
      },
      {
         "type":"portmap",
         "capabilities":{
            "portMappings":true
         },
         "snat":true
      }
   ]
}
"#;

    fn types(text: &str) -> Vec<String> {
        match classify(Kind::List, text.as_bytes()) {
            Verdict::Valid(n) => n.plugin_types,
            other => panic!("{other:?}\n{text}"),
        }
    }

    #[test]
    fn kinds_follow_the_extension() {
        assert_eq!(Kind::of("10-azure.conflist"), Some(Kind::List));
        assert_eq!(Kind::of("87-podman.conf"), Some(Kind::Single));
        assert_eq!(Kind::of("x.json"), Some(Kind::Single));
        assert_eq!(Kind::of("10-azure.conflist.old"), None);
        assert_eq!(Kind::of(".podid-tmp-1-2-3"), None);
        assert_eq!(Kind::of("conflist"), None);
    }

    #[test]
    fn classify_tells_truncated_from_invalid() {
        assert!(matches!(classify(Kind::List, b""), Verdict::Incomplete(_)));
        assert!(matches!(
            classify(Kind::List, b" \n"),
            Verdict::Incomplete(_)
        ));
        // Every prefix of a valid file is either incomplete or (at the very end) valid.
        for cut in 1..AKS.len() {
            match classify(Kind::List, &AKS.as_bytes()[..cut]) {
                Verdict::Incomplete(_) => {}
                Verdict::Valid(_) => assert!(AKS[cut..].trim().is_empty(), "valid at {cut}"),
                Verdict::Invalid(why) => panic!("prefix of {cut} bytes judged invalid: {why}"),
            }
        }
        let euro = "{\"name\":\"€\"".as_bytes();
        assert!(matches!(
            classify(Kind::List, &euro[..euro.len() - 2]),
            Verdict::Incomplete(_)
        ));
        for (text, why) in [
            ("{\"name\": }", "not JSON"),
            ("[1]", "not a JSON object"),
            ("{} x", "not JSON"),
            ("{\"plugins\":[{\"type\":\"a\"}]}", "no \"name\""),
            (
                "{\"name\":\"\",\"plugins\":[{\"type\":\"a\"}]}",
                "\"name\" is empty",
            ),
            ("{\"name\":\"n\"}", "no \"plugins\""),
            ("{\"name\":\"n\",\"plugins\":[]}", "\"plugins\" is empty"),
            ("{\"name\":\"n\",\"plugins\":{}}", "not an array"),
            (
                "{\"name\":\"n\",\"plugins\":[{\"type\":\"a\"},3]}",
                "plugins[1] is not an object",
            ),
            (
                "{\"name\":\"n\",\"plugins\":[{\"mode\":\"a\"}]}",
                "plugins[0]: no \"type\"",
            ),
            (
                "{\"name\":\"n\",\"cniVersion\":1,\"plugins\":[{\"type\":\"a\"}]}",
                "cniVersion",
            ),
            ("\u{feff}{}", "not JSON"),
        ] {
            match classify(Kind::List, text.as_bytes()) {
                Verdict::Invalid(message) => assert!(message.contains(why), "{text}: {message}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            classify(Kind::List, b"\xff{}"),
            Verdict::Invalid(_)
        ));
        match classify(
            Kind::Single,
            b"{\"name\":\"n\",\"plugins\":[{\"type\":\"a\"}]}",
        ) {
            Verdict::Invalid(message) => assert!(message.contains("one plugin"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            classify(
                Kind::Single,
                br#"{"cniVersion":"1.0.0","name":"b","type":"bridge"}"#
            ),
            Verdict::Valid(Network {
                kind: Kind::Single,
                name: "b".into(),
                cni_version: Some("1.0.0".into()),
                plugin_types: vec!["bridge".into()],
            })
        );
    }

    #[test]
    fn the_first_valid_file_is_primary_and_truncated_ones_hold_the_walk() {
        let c = |name: &str, verdict: Verdict| Candidate {
            name: name.into(),
            verdict,
        };
        let valid = || {
            Verdict::Valid(Network {
                kind: Kind::List,
                name: "n".into(),
                cni_version: None,
                plugin_types: vec!["a".into()],
            })
        };
        let files = [
            c("00-bad.conflist", Verdict::Invalid("x".into())),
            c("10-azure.conflist", valid()),
            c("20-later.conflist", valid()),
        ];
        assert_eq!(select(&files), Selection::Primary(1));
        let files = [
            c("00-bad.conflist", Verdict::Invalid("x".into())),
            c("05-new.conflist", Verdict::Incomplete("empty".into())),
            c("10-azure.conflist", valid()),
        ];
        assert_eq!(select(&files), Selection::Pending(1));
        let files = [
            c("10-azure.conflist", valid()),
            c("20-writing.conflist", Verdict::Incomplete("empty".into())),
        ];
        assert_eq!(select(&files), Selection::Primary(0));
        assert_eq!(
            select(&[c("a.conf", Verdict::Invalid("x".into()))]),
            Selection::Nothing
        );
        assert_eq!(select(&[]), Selection::Nothing);
    }

    #[test]
    fn chaining_aks_appends_after_portmap_and_keeps_the_rest_byte_for_byte() {
        let Edit::Changed(out) = chain(AKS, &entry()).unwrap() else {
            panic!("unchanged")
        };
        assert_eq!(
            out,
            r#"{
   "cniVersion":"0.3.0",
   "name":"azure",
   "plugins":[
      {
         "type":"azure-vnet",
         "mode":"transparent",
         "ipsToRouteViaHost":["169.254.20.10"],
         "ipam":{
            "type":"azure-vnet-ipam"
         }
      },
      {
         "type":"portmap",
         "capabilities":{
            "portMappings":true
         },
         "snat":true
      },
      {
         "type": "podid",
         "socket": "/var/run/podid/tokend.sock",
         "timeoutMs": 2000,
         "failurePolicy": "Fail",
         "failOpenNamespaces": [
            "kube-system"
         ],
         "stateDir": "/var/lib/podid",
         "logFile": "/var/log/podid/cni.log"
      }
   ]
}
"#
        );
        assert_eq!(types(&out), ["azure-vnet", "portmap", "podid"]);
        assert_eq!(chain(&out, &entry()), Ok(Edit::Unchanged));
        assert!(is_chained(&out, &entry()));
        assert_eq!(unchain(&out), Ok(Edit::Changed(AKS.to_owned())));
        assert_eq!(unchain(AKS), Ok(Edit::Unchanged));
    }

    #[test]
    fn compact_lists_stay_compact() {
        let text = r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge","x":1e3}]}"#;
        let Edit::Changed(out) = chain(text, &entry()).unwrap() else {
            panic!()
        };
        assert_eq!(
            out,
            format!(
                r#"{{"cniVersion":"1.0.0","name":"n","plugins":[{{"type":"bridge","x":1e3}},{}]}}"#,
                entry()
            )
        );
        assert_eq!(unchain(&out), Ok(Edit::Changed(text.to_owned())));
    }

    #[test]
    fn old_and_duplicate_entries_are_replaced_by_one_last_entry() {
        let text = r#"{
  "name": "n",
  "plugins": [
    {"type": "podid", "socket": "/old"},
    {"type": "bridge"},
    {"type": "podid", "socket": "/old"},
    {"type": "portmap"}
  ],
  "extra": {"kept": [1, 2.50, "x"]}
}"#;
        let Edit::Changed(out) = chain(text, &entry()).unwrap() else {
            panic!()
        };
        assert_eq!(types(&out), ["bridge", "portmap", "podid"]);
        assert!(out.starts_with("{\n  \"name\": \"n\",\n  \"plugins\": [\n    {\"type\": \"bridge\"},\n    {\"type\": \"portmap\"},\n    {\n      \"type\": \"podid\""), "{out}");
        assert!(
            out.ends_with("  ],\n  \"extra\": {\"kept\": [1, 2.50, \"x\"]}\n}"),
            "{out}"
        );
        // Ours in the middle, not last: moved to the end.
        let text = format!(
            r#"{{"name":"n","plugins":[{},{{"type":"bridge"}}]}}"#,
            entry()
        );
        let Edit::Changed(out) = chain(&text, &entry()).unwrap() else {
            panic!()
        };
        assert_eq!(types(&out), ["bridge", "podid"]);
        // A different podid entry last: replaced.
        let stale = r#"{"name":"n","plugins":[{"type":"bridge"},{"type":"podid","timeoutMs":5}]}"#;
        let Edit::Changed(out) = chain(stale, &entry()).unwrap() else {
            panic!()
        };
        assert!(is_chained(&out, &entry()));
        assert_eq!(
            unchain(stale),
            Ok(Edit::Changed(
                r#"{"name":"n","plugins":[{"type":"bridge"}]}"#.to_owned()
            ))
        );
    }

    #[test]
    fn key_order_of_our_entry_does_not_matter_but_values_do() {
        let reordered = r#"{"name":"n","plugins":[{"type":"bridge"},{"logFile":"/var/log/podid/cni.log","type":"podid","socket":"/var/run/podid/tokend.sock","timeoutMs":2000,"failurePolicy":"Fail","failOpenNamespaces":["kube-system"],"stateDir":"/var/lib/podid"}]}"#;
        assert_eq!(chain(reordered, &entry()), Ok(Edit::Unchanged));
    }

    #[test]
    fn a_list_of_only_podid_is_refused() {
        let text = r#"{"name":"n","plugins":[{"type":"podid"}]}"#;
        assert_eq!(chain(text, &entry()), Err(EditError::OnlyPodid));
        assert_eq!(unchain(text), Err(EditError::OnlyPodid));
    }

    #[test]
    fn duplicate_plugins_keys_edit_the_last_as_go_reads_it() {
        let text = r#"{"name":"n","plugins":[{"type":"a"}],"plugins":[{"type":"b"}]}"#;
        let Edit::Changed(out) = chain(text, &entry()).unwrap() else {
            panic!()
        };
        assert!(
            out.starts_with(
                r#"{"name":"n","plugins":[{"type":"a"}],"plugins":[{"type":"b"},{"type":"podid""#
            ),
            "{out}"
        );
    }

    #[test]
    fn a_lone_conf_becomes_a_list_around_the_untouched_original() {
        let conf = "{\n  \"cniVersion\": \"0.4.0\",\n  \"name\": \"mynet\",\n  \"type\": \"bridge\",\n  \"bridge\": \"cni0\",\n  \"ipam\": {\"type\": \"host-local\", \"subnet\": \"10.22.0.0/16\"}\n}\n";
        let out = convert(conf, Some(&entry())).unwrap();
        assert_eq!(
            out,
            r#"{
  "cniVersion": "0.4.0",
  "name": "mynet",
  "plugins": [
    {
      "cniVersion": "0.4.0",
      "name": "mynet",
      "type": "bridge",
      "bridge": "cni0",
      "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}
    },
    {
      "type": "podid",
      "socket": "/var/run/podid/tokend.sock",
      "timeoutMs": 2000,
      "failurePolicy": "Fail",
      "failOpenNamespaces": [
        "kube-system"
      ],
      "stateDir": "/var/lib/podid",
      "logFile": "/var/log/podid/cni.log"
    }
  ]
}
"#
        );
        assert_eq!(types(&out), ["bridge", "podid"]);
        assert!(is_chained(&out, &entry()));
        let Edit::Changed(unchained) = unchain(&out).unwrap() else {
            panic!()
        };
        assert!(same_json(&unchained, &convert(conf, None).unwrap()));
        let bare = convert(r#"{"name":"x","type":"bridge"}"#, None).unwrap();
        assert_eq!(
            bare,
            "{\n  \"name\": \"x\",\n  \"plugins\": [\n    {\"name\":\"x\",\"type\":\"bridge\"}\n  ]\n}\n"
        );
        assert_eq!(
            converted_name("87-podman.conf").as_deref(),
            Some("87-podman.conflist")
        );
        assert_eq!(converted_name("a.b.json").as_deref(), Some("a.b.conflist"));
        assert_eq!(converted_name("a.conflist"), None);
    }

    #[test]
    fn entries_never_carry_name_or_version() {
        let e = Entry::new([
            ("name", json!("x")),
            ("cniVersion", json!("1.0.0")),
            ("type", json!("y")),
            ("a", json!(1)),
        ]);
        assert_eq!(e.as_value(), json!({"type": "podid", "a": 1}));
    }
}
