//! The plugin binary in the CNI bin dir: copied in atomically (a temp file in the same dir,
//! fsync, mode 0755, rename over `podid`, fsync of the dir), never opened for writing in place
//! (a running plugin makes that ETXTBSY), skipped when identical, and verified by running its
//! `VERSION` command before any config names it (cri-o skips configs whose plugins fail that).

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::conflist::PLUGIN_TYPE;
use crate::files::{self, Expect, Fingerprint, Ownership, WriteError};

/// The installed binary's mode.
pub const MODE: u32 = 0o755;
/// How long `VERSION` may take.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(10);
/// Exec attempts while the kernel says ETXTBSY (a forked child may briefly hold a write fd).
const EXEC_ATTEMPTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("--plugin-binary {path}: {source}")]
    Source {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--plugin-binary {path}: empty file")]
    EmptySource { path: PathBuf },
    #[error("reading the installed {path}: {source}")]
    Target {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("the installed {path} does not answer CNI_COMMAND=VERSION: {why}")]
    Verify { path: PathBuf, why: String },
}

/// What `ensure` found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Whether this call wrote the binary.
    pub wrote: bool,
    /// The cniVersions the installed binary says it speaks.
    pub supported: Vec<String>,
}

/// The source binary and its place in the bin dir.
#[derive(Debug)]
pub struct Plugin {
    source: PathBuf,
    target: PathBuf,
    /// The installed version last verified, so an unchanged binary is not read again.
    verified: Option<(Fingerprint, Vec<String>)>,
}

impl Plugin {
    pub fn new(source: PathBuf, bin_dir: &Path) -> Self {
        Self {
            source,
            target: bin_dir.join(PLUGIN_TYPE),
            verified: None,
        }
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Makes the bin dir hold a verified copy of the source binary.
    pub fn ensure(&mut self) -> Result<Installed, BinaryError> {
        let target_error = |source| BinaryError::Target {
            path: self.target.clone(),
            source,
        };
        let current = Fingerprint::current(&self.target).map_err(target_error)?;
        if let Some((verified, supported)) = &self.verified
            && current == Some(*verified)
        {
            return Ok(Installed {
                wrote: false,
                supported: supported.clone(),
            });
        }
        self.verified = None;
        let source_error = |source| BinaryError::Source {
            path: self.source.clone(),
            source,
        };
        let wanted = fs::read(&self.source).map_err(source_error)?;
        if wanted.is_empty() {
            return Err(BinaryError::EmptySource {
                path: self.source.clone(),
            });
        }
        let wrote = !self.is_installed(&wanted).map_err(target_error)?;
        if wrote {
            let ownership = Ownership {
                mode: MODE,
                uid: nix::unistd::geteuid().as_raw(),
                gid: nix::unistd::getegid().as_raw(),
            };
            files::replace(&self.target, &wanted, ownership, Expect::Any)?;
        }
        let supported = verify(&self.target)?;
        if let Some(fingerprint) = Fingerprint::current(&self.target).map_err(target_error)? {
            self.verified = Some((fingerprint, supported.clone()));
        }
        Ok(Installed { wrote, supported })
    }

    /// Whether the target is a regular file with mode 0755 holding exactly `wanted`.
    fn is_installed(&self, wanted: &[u8]) -> io::Result<bool> {
        let meta = match fs::symlink_metadata(&self.target) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        if !meta.is_file()
            || meta.permissions().mode() & 0o7777 != MODE
            || meta.len() != wanted.len() as u64
        {
            return Ok(false);
        }
        let mut installed = Vec::with_capacity(wanted.len());
        fs::File::open(&self.target)?.read_to_end(&mut installed)?;
        Ok(installed == wanted)
    }
}

/// The VERSION answer (SPEC.md §5 "VERSION Success").
#[derive(Debug, Deserialize)]
struct VersionAnswer {
    #[serde(rename = "supportedVersions")]
    supported_versions: Vec<String>,
}

/// Runs `binary` as a runtime would for `VERSION` and returns the versions it speaks.
pub fn verify(binary: &Path) -> Result<Vec<String>, BinaryError> {
    let fail = |why: String| BinaryError::Verify {
        path: binary.to_owned(),
        why,
    };
    let mut attempt = 0;
    let mut child = loop {
        attempt += 1;
        match Command::new(binary)
            .env_clear()
            .env("CNI_COMMAND", "VERSION")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => break child,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < EXEC_ATTEMPTS => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(fail(format!("exec: {e}"))),
        }
    };
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < VERIFY_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!("no answer within {VERIFY_TIMEOUT:?}")));
            }
            Err(e) => return Err(fail(format!("wait: {e}"))),
        }
    };
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_end(&mut stdout);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_end(&mut stderr);
    }
    if !status.success() {
        return Err(fail(format!(
            "{status}: {}{}",
            String::from_utf8_lossy(&stdout).trim(),
            String::from_utf8_lossy(&stderr).trim()
        )));
    }
    let answer: VersionAnswer = serde_json::from_slice(&stdout).map_err(|e| {
        fail(format!(
            "answer {:?} is not a VERSION result: {e}",
            String::from_utf8_lossy(&stdout)
        ))
    })?;
    if answer.supported_versions.is_empty() {
        return Err(fail("it supports no cniVersion".to_owned()));
    }
    Ok(answer.supported_versions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A stand-in plugin: a shell script answering VERSION.
    fn script(dir: &Path, name: &str, answer: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(
            &path,
            format!("#!/bin/sh\n[ \"$CNI_COMMAND\" = VERSION ] || exit 4\necho '{answer}'\n"),
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    const ANSWER: &str = r#"{"cniVersion":"1.1.0","supportedVersions":["0.3.0","1.0.0"]}"#;

    #[test]
    fn installs_once_then_skips_until_the_file_changes() {
        let src = tempfile::tempdir().unwrap();
        let bin = tempfile::tempdir().unwrap();
        let source = script(src.path(), "podid", ANSWER);
        let mut plugin = Plugin::new(source.clone(), bin.path());
        let first = plugin.ensure().unwrap();
        assert!(first.wrote);
        assert_eq!(first.supported, ["0.3.0", "1.0.0"]);
        let meta = fs::metadata(bin.path().join("podid")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o755);
        let ino = meta.ino();
        assert!(!plugin.ensure().unwrap().wrote);
        // A new installer process finds the same bytes: no write either.
        assert!(
            !Plugin::new(source.clone(), bin.path())
                .ensure()
                .unwrap()
                .wrote
        );
        assert_eq!(fs::metadata(bin.path().join("podid")).unwrap().ino(), ino);
        // Someone deleted it: back; someone chmodded it: replaced, not chmodded in place.
        fs::remove_file(bin.path().join("podid")).unwrap();
        assert!(plugin.ensure().unwrap().wrote);
        fs::set_permissions(bin.path().join("podid"), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(plugin.ensure().unwrap().wrote);
        let entries: Vec<_> = fs::read_dir(bin.path()).unwrap().collect();
        assert_eq!(entries.len(), 1, "no temp file left");
    }

    #[test]
    fn a_binary_that_does_not_answer_version_is_reported() {
        let src = tempfile::tempdir().unwrap();
        let bin = tempfile::tempdir().unwrap();
        let source = script(src.path(), "podid", "not json");
        let err = Plugin::new(source, bin.path())
            .ensure()
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not answer CNI_COMMAND=VERSION"), "{err}");
        assert!(err.contains("not json"), "{err}");
        let missing = Plugin::new(src.path().join("nope"), bin.path())
            .ensure()
            .unwrap_err()
            .to_string();
        assert!(missing.starts_with("--plugin-binary "), "{missing}");
    }
}
