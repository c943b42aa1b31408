//! The conf dir as the runtime sees it, and the edits of [`crate::conflist`] applied to it:
//! chain podid into the primary (converting a lone `.conf`), and take it out on uninstall.
//! Every write is an atomic, durable replace that keeps the file's mode, owner and group, and
//! lands only if the file is still the version that was read.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podid_api::fsutil::{self, Durability, is_temp_file};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::conflist::{self, Candidate, Edit, EditError, Entry, Kind, Selection, Verdict};
use crate::files::{self, Expect, Fingerprint, ReadError, Snapshot, WriteError};

/// How long a truncated file must stay unchanged before it counts as broken rather than
/// half-written (a writer between chunks touches it far more often).
pub const SETTLE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    #[error("listing {dir}: {source}")]
    List {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("{file}: {source}")]
    Edit {
        file: String,
        #[source]
        source: EditError,
    },
    #[error(
        "{file} has cniVersion {version:?}, which the installed podid does not speak (it speaks {supported:?}); not chaining rather than breaking every pod's ADD"
    )]
    UnsupportedVersion {
        file: String,
        version: String,
        supported: Vec<String>,
    },
    #[error(
        "cannot convert {conf} into {conflist}: {conflist} exists and podid did not create it; move one of them"
    )]
    ConversionBlocked { conf: String, conflist: String },
    #[error("conversion record {path}: {source}")]
    Record {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where the primary stands after a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No valid network config yet: the primary plugin's installer has not written one.
    NoPrimary,
    /// `file` sorts first and is truncated: maybe half-written; look again soon.
    Pending { file: String },
    /// The file changed between our read and our write: nothing written; look again soon.
    Raced { file: String },
    /// `file` is the primary and ends with our entry.
    Chained {
        file: String,
        /// Whether this pass wrote it.
        wrote: bool,
        /// The lone config this pass converted into `file`.
        converted_from: Option<String>,
    },
}

/// One file of the dir, read.
#[derive(Debug)]
struct Scanned {
    name: String,
    /// `<dir>/<name>`: the directory entry (maybe a symlink).
    entry: PathBuf,
    /// The real file behind it, which is what gets edited.
    real: PathBuf,
    snapshot: Option<Snapshot>,
    verdict: Verdict,
}

/// A lone config podid turned into a list, kept so that uninstall can put the original back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The original file name (`87-podman.conf`).
    pub original: String,
    /// The list podid wrote (`87-podman.conflist`).
    pub conflist: String,
    /// The original file's exact text.
    pub contents: String,
}

/// The conversion records, one JSON file per list podid created.
#[derive(Debug, Clone)]
pub struct Records {
    dir: PathBuf,
}

impl Records {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn path(&self, conflist: &str) -> PathBuf {
        self.dir.join(format!("{conflist}.json"))
    }

    pub fn get(&self, conflist: &str) -> Result<Option<Record>, ConfError> {
        let path = self.path(conflist);
        let record_error = |source| ConfError::Record {
            path: path.clone(),
            source,
        };
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| record_error(io::Error::new(io::ErrorKind::InvalidData, e))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(record_error(e)),
        }
    }

    fn put(&self, record: &Record) -> Result<(), ConfError> {
        let path = self.path(&record.conflist);
        let record_error = |source| ConfError::Record {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(&self.dir).map_err(record_error)?;
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|e| record_error(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        fsutil::write_atomic(&path, &bytes, 0o600, Durability::Durable).map_err(record_error)
    }

    fn remove(&self, conflist: &str) -> Result<(), ConfError> {
        let path = self.path(conflist);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ConfError::Record { path, source }),
        }
    }

    /// Every record, by list name.
    pub fn all(&self) -> Result<Vec<Record>, ConfError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(ConfError::Record {
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(conflist) = name.strip_suffix(".json")
                && !is_temp_file(&name)
                && let Some(record) = self.get(conflist)?
            {
                records.push(record);
            }
        }
        records.sort_by(|a, b| a.conflist.cmp(&b.conflist));
        Ok(records)
    }
}

/// What uninstall did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removal {
    /// Lists podid's entry was removed from.
    pub unchained: Vec<String>,
    /// `(list removed, original written back)`.
    pub restored: Vec<(String, String)>,
    /// Lists podid converted but left as lists, and why.
    pub kept: Vec<(String, String)>,
    /// Files still truncated when uninstall gave up waiting for them.
    pub unreadable: Vec<String>,
}

/// The conf dir and what the installer remembers about it between passes.
#[derive(Debug)]
pub struct ConfDir {
    dir: PathBuf,
    records: Records,
    settle: Duration,
    /// Truncated files: the version first seen and when.
    truncated: HashMap<String, (Fingerprint, Instant)>,
    /// Invalid files already reported, by version, so each is logged loudly once.
    reported: HashMap<String, Option<Fingerprint>>,
}

impl ConfDir {
    pub fn new(dir: PathBuf, records: Records) -> Self {
        Self {
            dir,
            records,
            settle: SETTLE,
            truncated: HashMap::new(),
            reported: HashMap::new(),
        }
    }

    /// Changes how long a truncated file is waited for (tests).
    pub fn with_settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// One pass: find the primary as the runtime does and make it end with `entry`.
    /// `supported` are the cniVersions the installed plugin speaks.
    pub fn reconcile(&mut self, entry: &Entry, supported: &[String]) -> Result<Outcome, ConfError> {
        let scanned = self.scan()?;
        self.report_invalid(&scanned);
        let candidates: Vec<Candidate> = scanned
            .iter()
            .map(|s| Candidate {
                name: s.name.clone(),
                verdict: s.verdict.clone(),
            })
            .collect();
        let primary = match conflist::select(&candidates) {
            Selection::Nothing => return Ok(Outcome::NoPrimary),
            Selection::Pending(i) => {
                return Ok(Outcome::Pending {
                    file: scanned[i].name.clone(),
                });
            }
            Selection::Primary(i) => &scanned[i],
        };
        let (Verdict::Valid(network), Some(snapshot)) = (&primary.verdict, &primary.snapshot)
        else {
            return Ok(Outcome::Pending {
                file: primary.name.clone(),
            });
        };
        if let Some(version) = &network.cni_version
            && !supported.contains(version)
        {
            return Err(ConfError::UnsupportedVersion {
                file: primary.name.clone(),
                version: version.clone(),
                supported: supported.to_vec(),
            });
        }
        let text = String::from_utf8_lossy(&snapshot.bytes);
        match network.kind {
            Kind::List => self.chain_list(primary, snapshot, &text, entry),
            Kind::Single => self.convert_single(primary, snapshot, &text, entry),
        }
    }

    fn chain_list(
        &self,
        primary: &Scanned,
        snapshot: &Snapshot,
        text: &str,
        entry: &Entry,
    ) -> Result<Outcome, ConfError> {
        let edit = conflist::chain(text, entry).map_err(|source| ConfError::Edit {
            file: primary.name.clone(),
            source,
        })?;
        let Edit::Changed(chained) = edit else {
            return Ok(Outcome::Chained {
                file: primary.name.clone(),
                wrote: false,
                converted_from: None,
            });
        };
        match files::replace(
            &primary.real,
            chained.as_bytes(),
            snapshot.ownership,
            Expect::Fingerprint(snapshot.fingerprint),
        ) {
            Ok(()) => Ok(Outcome::Chained {
                file: primary.name.clone(),
                wrote: true,
                converted_from: None,
            }),
            Err(WriteError::Conflict { .. }) => Ok(Outcome::Raced {
                file: primary.name.clone(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// `<stem>.conf` → `<stem>.conflist`: record the original, write the list, and only then
    /// remove the `.conf` (istio/cni#85 lost the primary by renaming first).
    fn convert_single(
        &self,
        primary: &Scanned,
        snapshot: &Snapshot,
        text: &str,
        entry: &Entry,
    ) -> Result<Outcome, ConfError> {
        let edit_error = |source| ConfError::Edit {
            file: primary.name.clone(),
            source,
        };
        let conflist_name = conflist::converted_name(&primary.name).ok_or_else(|| {
            edit_error(EditError::NotConfig(
                "a lone config must end in .conf or .json".to_owned(),
            ))
        })?;
        let target = self.dir.join(&conflist_name);
        let ours = self
            .records
            .get(&conflist_name)?
            .is_some_and(|r| r.original == primary.name);
        if fs::symlink_metadata(&target).is_ok() && !ours {
            return Err(ConfError::ConversionBlocked {
                conf: primary.name.clone(),
                conflist: conflist_name,
            });
        }
        let converted = conflist::convert(text, Some(entry)).map_err(edit_error)?;
        self.records.put(&Record {
            original: primary.name.clone(),
            conflist: conflist_name.clone(),
            contents: text.to_owned(),
        })?;
        files::replace(
            &target,
            converted.as_bytes(),
            snapshot.ownership,
            Expect::Any,
        )?;
        if !files::remove_if_unchanged(&primary.entry, snapshot.fingerprint)? {
            return Ok(Outcome::Raced {
                file: primary.name.clone(),
            });
        }
        Ok(Outcome::Chained {
            file: conflist_name,
            wrote: true,
            converted_from: Some(primary.name.clone()),
        })
    }

    /// Takes podid out of every list in the dir, and writes back the lone configs it converted
    /// when their lists are otherwise unchanged. Waits up to `patience` for truncated files.
    pub fn uninstall(&mut self, patience: Duration) -> Result<Removal, ConfError> {
        let deadline = Instant::now() + patience;
        let mut removal = Removal::default();
        loop {
            let scanned = self.scan()?;
            let mut again = false;
            removal.unreadable.clear();
            for file in &scanned {
                match (&file.verdict, &file.snapshot) {
                    (Verdict::Valid(network), Some(snapshot))
                        if network.kind == Kind::List && network.has_podid() =>
                    {
                        let text = String::from_utf8_lossy(&snapshot.bytes);
                        let Edit::Changed(unchained) =
                            conflist::unchain(&text).map_err(|source| ConfError::Edit {
                                file: file.name.clone(),
                                source,
                            })?
                        else {
                            continue;
                        };
                        match files::replace(
                            &file.real,
                            unchained.as_bytes(),
                            snapshot.ownership,
                            Expect::Fingerprint(snapshot.fingerprint),
                        ) {
                            Ok(()) => {
                                info!(file = %file.name, "removed the podid entry");
                                removal.unchained.push(file.name.clone());
                            }
                            Err(WriteError::Conflict { .. }) => again = true,
                            Err(e) => return Err(e.into()),
                        }
                    }
                    (Verdict::Incomplete(why), _) => {
                        again = true;
                        removal.unreadable.push(format!("{}: {why}", file.name));
                    }
                    _ => {}
                }
            }
            if !again || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for record in self.records.all()? {
            self.restore(&record, &mut removal)?;
        }
        Ok(removal)
    }

    /// Writes a converted config back as the original file if its list is still what podid
    /// made of it; otherwise leaves the list (without podid) where it is.
    fn restore(&self, record: &Record, removal: &mut Removal) -> Result<(), ConfError> {
        let list = self.dir.join(&record.conflist);
        let original = self.dir.join(&record.original);
        let snapshot = match files::read_snapshot(&list) {
            Ok(snapshot) => snapshot,
            Err(ReadError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return self.records.remove(&record.conflist);
            }
            Err(e) => {
                removal
                    .kept
                    .push((record.conflist.clone(), format!("unreadable: {e}")));
                return self.records.remove(&record.conflist);
            }
        };
        let text = String::from_utf8_lossy(&snapshot.bytes);
        let why_kept = if conflist::holds_podid(&text) {
            Some("it still holds a podid entry".to_owned())
        } else if fs::symlink_metadata(&original).is_ok() {
            Some(format!("{} exists again", record.original))
        } else if !conflist::convert(&record.contents, None)
            .is_ok_and(|expected| conflist::same_json(&text, &expected))
        {
            Some("it changed since podid converted it".to_owned())
        } else {
            None
        };
        if let Some(why) = why_kept {
            warn!(list = %record.conflist, original = %record.original, %why, "not restoring the original config; the list stays");
            removal.kept.push((record.conflist.clone(), why));
            return self.records.remove(&record.conflist);
        }
        files::replace(
            &original,
            record.contents.as_bytes(),
            snapshot.ownership,
            Expect::Absent,
        )?;
        if files::remove_if_unchanged(&list, snapshot.fingerprint)? {
            info!(list = %record.conflist, original = %record.original, "restored the original config");
            removal
                .restored
                .push((record.conflist.clone(), record.original.clone()));
        } else {
            removal.kept.push((
                record.conflist.clone(),
                "it changed while the original was written back".to_owned(),
            ));
        }
        self.records.remove(&record.conflist)
    }

    /// Reads every file a runtime would consider, in the runtime's order.
    fn scan(&mut self) -> Result<Vec<Scanned>, ConfError> {
        let list_error = |source| ConfError::List {
            dir: self.dir.clone(),
            source,
        };
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(list_error)? {
            let entry = entry.map_err(list_error)?;
            let Ok(name) = entry.file_name().into_string() else {
                warn!(dir = %self.dir.display(), name = ?entry.file_name(), "ignoring a file whose name is not UTF-8");
                continue;
            };
            if Kind::of(&name).is_some() && !is_temp_file(&name) {
                names.push(name);
            }
        }
        // Go's sort.Strings: byte order.
        names.sort_unstable();
        let mut scanned = Vec::with_capacity(names.len());
        for name in names {
            if let Some(file) = self.read(name) {
                scanned.push(file);
            }
        }
        let present: Vec<&str> = scanned.iter().map(|s| s.name.as_str()).collect();
        self.truncated
            .retain(|name, _| present.contains(&name.as_str()));
        self.reported
            .retain(|name, _| present.contains(&name.as_str()));
        Ok(scanned)
    }

    /// One file; `None` when it vanished meanwhile (dropgz renames the old one aside first).
    fn read(&mut self, name: String) -> Option<Scanned> {
        let entry = self.dir.join(&name);
        let kind = Kind::of(&name)?;
        let meta = fs::symlink_metadata(&entry).ok()?;
        if meta.is_dir() {
            return None;
        }
        let real = match fs::canonicalize(&entry) {
            Ok(real) => real,
            Err(e) => {
                return Some(Scanned {
                    verdict: Verdict::Invalid(format!("cannot resolve: {e}")),
                    name,
                    real: entry.clone(),
                    entry,
                    snapshot: None,
                });
            }
        };
        let (snapshot, verdict) = match files::read_snapshot(&real) {
            Ok(snapshot) => {
                let verdict = conflist::classify(kind, &snapshot.bytes);
                (Some(snapshot), verdict)
            }
            Err(ReadError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return None;
            }
            Err(e @ ReadError::Changing { .. }) => (None, Verdict::Incomplete(e.to_string())),
            Err(e) => (None, Verdict::Invalid(e.to_string())),
        };
        let verdict = self.settle(&name, snapshot.as_ref(), verdict);
        Some(Scanned {
            name,
            entry,
            real,
            snapshot,
            verdict,
        })
    }

    /// A truncated file that stays the same for [`SETTLE`] is broken, not being written.
    fn settle(&mut self, name: &str, snapshot: Option<&Snapshot>, verdict: Verdict) -> Verdict {
        let Verdict::Incomplete(why) = verdict else {
            self.truncated.remove(name);
            return verdict;
        };
        let Some(fingerprint) = snapshot.map(|s| s.fingerprint) else {
            return Verdict::Incomplete(why);
        };
        let now = Instant::now();
        match self.truncated.get(name) {
            Some((seen, since)) if *seen == fingerprint => {
                if now.duration_since(*since) >= self.settle {
                    Verdict::Invalid(format!(
                        "{why}, unchanged for {}s",
                        self.settle.as_secs_f32()
                    ))
                } else {
                    Verdict::Incomplete(why)
                }
            }
            _ => {
                self.truncated.insert(name.to_owned(), (fingerprint, now));
                Verdict::Incomplete(why)
            }
        }
    }

    fn report_invalid(&mut self, scanned: &[Scanned]) {
        for file in scanned {
            let Verdict::Invalid(why) = &file.verdict else {
                self.reported.remove(&file.name);
                continue;
            };
            let version = file.snapshot.as_ref().map(|s| s.fingerprint);
            if self.reported.get(&file.name) == Some(&version) {
                continue;
            }
            self.reported.insert(file.name.clone(), version);
            error!(
                file = %file.entry.display(),
                %why,
                "skipping an invalid network config as cri-o does; containerd instead refuses to set up any pod while the first config is invalid"
            );
        }
    }
}
