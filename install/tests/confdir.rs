//! The conf dir edits on real files in temp dirs: the fixtures of real nodes chained exactly,
//! modes kept, a second pass writing nothing, uninstall giving back the original bytes.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use podid_install::confdir::{ConfDir, ConfError, Outcome, Records};
use podid_install::conflist::Entry;
use serde_json::{Value, json};
use tempfile::TempDir;

const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

fn supported() -> Vec<String> {
    SUPPORTED.iter().map(|v| (*v).to_owned()).collect()
}

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

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A conf dir and a state dir of its own.
struct Node {
    _tmp: TempDir,
    conf: PathBuf,
    state: PathBuf,
}

impl Node {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let conf = tmp.path().join("net.d");
        let state = tmp.path().join("install");
        fs::create_dir(&conf).unwrap();
        Self {
            _tmp: tmp,
            conf,
            state,
        }
    }

    fn put(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = self.conf.join(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn dir(&self) -> ConfDir {
        ConfDir::new(self.conf.clone(), Records::new(self.state.clone()))
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.conf)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }
}

/// The original with our entry appended, serialized with its key order.
fn expected_json(original: &str) -> String {
    let mut value: Value = serde_json::from_str(original).unwrap();
    value["plugins"]
        .as_array_mut()
        .unwrap()
        .push(entry().as_value());
    value.to_string()
}

fn as_ordered_json(text: &str) -> String {
    serde_json::from_str::<Value>(text).unwrap().to_string()
}

fn chained(outcome: Outcome, file: &str, wrote: bool) {
    match outcome {
        Outcome::Chained {
            file: f, wrote: w, ..
        } => assert_eq!((f.as_str(), w), (file, wrote)),
        other => panic!("expected {file} chained, got {other:?}"),
    }
}

/// Chains `name`, checks the result, runs again (nothing written), uninstalls (bytes back).
fn round_trip(name: &str, mode: u32) -> String {
    let node = Node::new();
    let original = fixture(name);
    let path = node.put(name, &original, mode);
    let mut dir = node.dir();
    chained(dir.reconcile(&entry(), &supported()).unwrap(), name, true);
    let result = fs::read_to_string(&path).unwrap();
    assert_eq!(as_ordered_json(&result), expected_json(&original), "{name}");
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(meta.mode() & 0o7777, mode, "{name}: mode kept");
    // A second pass, and a pass of a fresh installer: no write, not even the mtime moves.
    chained(dir.reconcile(&entry(), &supported()).unwrap(), name, false);
    chained(
        node.dir().reconcile(&entry(), &supported()).unwrap(),
        name,
        false,
    );
    let again = fs::metadata(&path).unwrap();
    assert_eq!(
        (again.ino(), again.mtime(), again.mtime_nsec()),
        (meta.ino(), meta.mtime(), meta.mtime_nsec())
    );
    let removal = node.dir().uninstall(Duration::from_secs(1)).unwrap();
    assert_eq!(removal.unchained, [name]);
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        original,
        "{name}: uninstall"
    );
    assert_eq!(
        fs::metadata(&path).unwrap().mode() & 0o7777,
        mode,
        "{name}: mode kept by uninstall"
    );
    assert_eq!(node.names(), [name], "no temp file left");
    result
}

#[test]
fn aks_azure_conflist() {
    let result = round_trip("10-azure.conflist", 0o600);
    assert_eq!(
        result,
        r#"{
   "cniVersion":"0.3.0",
   "name":"azure",
   "plugins":[
      { "type":"azure-vnet", "mode":"transparent", "ipsToRouteViaHost":["169.254.20.10"],
        "ipam":{ "type":"azure-vnet-ipam" } },
      { "type":"portmap", "capabilities":{ "portMappings":true }, "snat":true },
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
}

#[test]
fn cns_swift_overlay_conflist() {
    let result = round_trip("15-azure-swift-overlay.conflist", 0o644);
    // Tab-indented like the rest of the file.
    assert!(
        result.contains("\t\t},\n\t\t{\n\t\t\t\"type\": \"podid\",\n"),
        "{result}"
    );
    assert!(result.ends_with("\t\t}\n\t]\n}\n"), "{result}");
}

#[test]
fn containerd_1_0_0_conflist() {
    round_trip("10-containerd-net.conflist", 0o644);
}

#[test]
fn a_lone_conf_becomes_a_list_and_comes_back_on_uninstall() {
    let node = Node::new();
    let original = fixture("10-bridge.conf");
    node.put("10-bridge.conf", &original, 0o640);
    let mut dir = node.dir();
    match dir.reconcile(&entry(), &supported()).unwrap() {
        Outcome::Chained {
            file,
            wrote: true,
            converted_from: Some(from),
        } => assert_eq!(
            (file.as_str(), from.as_str()),
            ("10-bridge.conflist", "10-bridge.conf")
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(node.names(), ["10-bridge.conflist"]);
    let list = fs::read_to_string(node.conf.join("10-bridge.conflist")).unwrap();
    let value: Value = serde_json::from_str(&list).unwrap();
    let original_value: Value = serde_json::from_str(&original).unwrap();
    assert_eq!(
        value.to_string(),
        json!({
            "cniVersion": "0.3.1",
            "name": "containerd-net",
            "plugins": [original_value, entry().as_value()],
        })
        .to_string()
    );
    assert_eq!(
        fs::metadata(node.conf.join("10-bridge.conflist"))
            .unwrap()
            .mode()
            & 0o7777,
        0o640
    );
    chained(
        dir.reconcile(&entry(), &supported()).unwrap(),
        "10-bridge.conflist",
        false,
    );
    // The plugin's owner writes its .conf again: it sorts first, so it is converted again.
    node.put("10-bridge.conf", &original, 0o640);
    match dir.reconcile(&entry(), &supported()).unwrap() {
        Outcome::Chained {
            converted_from: Some(_),
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(node.names(), ["10-bridge.conflist"]);
    let removal = node.dir().uninstall(Duration::from_secs(1)).unwrap();
    assert_eq!(removal.unchained, ["10-bridge.conflist"]);
    assert_eq!(
        removal.restored,
        [("10-bridge.conflist".to_owned(), "10-bridge.conf".to_owned())]
    );
    assert_eq!(node.names(), ["10-bridge.conf"]);
    assert_eq!(
        fs::read_to_string(node.conf.join("10-bridge.conf")).unwrap(),
        original
    );
    assert_eq!(
        fs::metadata(node.conf.join("10-bridge.conf"))
            .unwrap()
            .mode()
            & 0o7777,
        0o640
    );
    assert_eq!(fs::read_dir(&node.state).unwrap().count(), 0, "record gone");
}

#[test]
fn a_converted_list_changed_by_someone_else_stays_a_list() {
    let node = Node::new();
    node.put("10-bridge.conf", &fixture("10-bridge.conf"), 0o644);
    node.dir().reconcile(&entry(), &supported()).unwrap();
    let path = node.conf.join("10-bridge.conflist");
    let edited = fs::read_to_string(&path)
        .unwrap()
        .replace("\"ipMasq\": true", "\"ipMasq\": false");
    fs::write(&path, edited).unwrap();
    let removal = node.dir().uninstall(Duration::from_secs(1)).unwrap();
    assert!(removal.restored.is_empty());
    assert_eq!(removal.kept.len(), 1, "{removal:?}");
    assert!(removal.kept[0].1.contains("changed"), "{removal:?}");
    assert_eq!(node.names(), ["10-bridge.conflist"]);
    let left = fs::read_to_string(&path).unwrap();
    assert!(
        !left.contains("podid") && left.contains("\"ipMasq\": false"),
        "{left}"
    );
}

#[test]
fn conversion_never_overwrites_a_list_it_did_not_make() {
    let node = Node::new();
    node.put("10-bridge.conf", &fixture("10-bridge.conf"), 0o644);
    let theirs = fixture("10-containerd-net.conflist");
    node.put("10-bridge.conflist", &theirs, 0o644);
    let err = node.dir().reconcile(&entry(), &supported()).unwrap_err();
    assert!(matches!(err, ConfError::ConversionBlocked { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "cannot convert 10-bridge.conf into 10-bridge.conflist: 10-bridge.conflist exists and podid did not create it; move one of them"
    );
    assert_eq!(
        fs::read_to_string(node.conf.join("10-bridge.conflist")).unwrap(),
        theirs
    );
}

#[test]
fn an_invalid_file_sorting_first_is_skipped() {
    let node = Node::new();
    let broken = fixture("00-broken.conflist");
    node.put("00-broken.conflist", &broken, 0o644);
    let original = fixture("10-azure.conflist");
    let azure = node.put("10-azure.conflist", &original, 0o600);
    chained(
        node.dir().reconcile(&entry(), &supported()).unwrap(),
        "10-azure.conflist",
        true,
    );
    assert_eq!(
        fs::read_to_string(node.conf.join("00-broken.conflist")).unwrap(),
        broken
    );
    assert_eq!(
        as_ordered_json(&fs::read_to_string(&azure).unwrap()),
        expected_json(&original)
    );
}

#[test]
fn a_truncated_file_sorting_first_is_waited_for_then_skipped() {
    let node = Node::new();
    let original = fixture("10-azure.conflist");
    node.put("10-azure.conflist", &original, 0o600);
    node.put("05-new.conflist", &original[..40], 0o644);
    let mut dir = node.dir().with_settle(Duration::from_millis(300));
    assert_eq!(
        dir.reconcile(&entry(), &supported()).unwrap(),
        Outcome::Pending {
            file: "05-new.conflist".into()
        }
    );
    assert_eq!(
        fs::read_to_string(node.conf.join("10-azure.conflist")).unwrap(),
        original,
        "nothing written while the first file may be half-written"
    );
    std::thread::sleep(Duration::from_millis(350));
    chained(
        dir.reconcile(&entry(), &supported()).unwrap(),
        "10-azure.conflist",
        true,
    );
    // The writer finishes 05-new: it is the primary now, and gets chained.
    node.put("05-new.conflist", &original, 0o644);
    chained(
        dir.reconcile(&entry(), &supported()).unwrap(),
        "05-new.conflist",
        true,
    );
}

#[test]
fn no_config_means_waiting_never_creating_one() {
    let node = Node::new();
    node.put(
        "10-azure.conflist.old",
        &fixture("10-azure.conflist"),
        0o600,
    );
    assert_eq!(
        node.dir().reconcile(&entry(), &supported()).unwrap(),
        Outcome::NoPrimary
    );
    assert_eq!(node.names(), ["10-azure.conflist.old"]);
}

#[test]
fn a_symlinked_primary_is_edited_where_it_lives() {
    let node = Node::new();
    let real_dir = node.conf.parent().unwrap().join("real");
    fs::create_dir(&real_dir).unwrap();
    let real = real_dir.join("azure.conflist");
    let original = fixture("10-azure.conflist");
    fs::write(&real, &original).unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&real, node.conf.join("10-azure.conflist")).unwrap();
    chained(
        node.dir().reconcile(&entry(), &supported()).unwrap(),
        "10-azure.conflist",
        true,
    );
    assert!(
        fs::symlink_metadata(node.conf.join("10-azure.conflist"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        as_ordered_json(&fs::read_to_string(&real).unwrap()),
        expected_json(&original)
    );
    assert_eq!(fs::metadata(&real).unwrap().mode() & 0o7777, 0o600);
}

#[test]
fn a_cni_version_podid_does_not_speak_is_left_alone() {
    let node = Node::new();
    let old = fixture("10-azure.conflist").replace("0.3.0", "0.2.0");
    node.put("10-azure.conflist", &old, 0o600);
    let err = node
        .dir()
        .reconcile(&entry(), &supported())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(
            "10-azure.conflist has cniVersion \"0.2.0\", which the installed podid does not speak"
        ),
        "{err}"
    );
    assert_eq!(
        fs::read_to_string(node.conf.join("10-azure.conflist")).unwrap(),
        old
    );
}

#[test]
fn uninstall_takes_podid_out_of_every_list() {
    let node = Node::new();
    let azure = fixture("10-azure.conflist");
    let overlay = fixture("15-azure-swift-overlay.conflist");
    node.put("10-azure.conflist", &azure, 0o600);
    node.put("15-azure-swift-overlay.conflist", &overlay, 0o600);
    node.dir().reconcile(&entry(), &supported()).unwrap();
    // A window in which 15-... was the primary (10-... renamed aside by dropgz) chained it too.
    fs::rename(
        node.conf.join("10-azure.conflist"),
        node.conf.join("10-azure.conflist.old"),
    )
    .unwrap();
    node.dir().reconcile(&entry(), &supported()).unwrap();
    fs::rename(
        node.conf.join("10-azure.conflist.old"),
        node.conf.join("10-azure.conflist"),
    )
    .unwrap();
    let removal = node.dir().uninstall(Duration::from_secs(1)).unwrap();
    assert_eq!(
        removal.unchained,
        ["10-azure.conflist", "15-azure-swift-overlay.conflist"]
    );
    assert_eq!(
        fs::read_to_string(node.conf.join("10-azure.conflist")).unwrap(),
        azure
    );
    assert_eq!(
        fs::read_to_string(node.conf.join("15-azure-swift-overlay.conflist")).unwrap(),
        overlay
    );
    let nothing = node.dir().uninstall(Duration::from_secs(1)).unwrap();
    assert!(nothing.unchained.is_empty());
}
