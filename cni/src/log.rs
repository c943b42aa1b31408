//! The plugin's log: one line per event, `<RFC3339 UTC> <LEVEL> key=value ...`, appended to
//! `logFile` with one write(2) per line, so concurrent plugin processes never interleave.
//! stdout belongs to the CNI result, so the fallback is stderr.

use std::fmt::{self, Display, Write as _};
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Info => "INFO",
            Self::Warn => "WARN",
            Self::Error => "ERROR",
        })
    }
}

#[derive(Debug)]
enum Sink {
    File(File),
    Stderr,
}

/// A logger carrying the fields every line of one invocation repeats.
#[derive(Debug)]
pub struct Logger {
    sink: Sink,
    context: Vec<(&'static str, String)>,
}

impl Logger {
    pub fn stderr() -> Self {
        Self {
            sink: Sink::Stderr,
            context: Vec::new(),
        }
    }

    /// Appends to `path`, creating its directory (0755) and the file (0640) when missing;
    /// falls back to stderr, saying why, when it cannot.
    pub fn open(path: &Path) -> Self {
        match open_append(path) {
            Ok(file) => Self {
                sink: Sink::File(file),
                context: Vec::new(),
            },
            Err(e) => {
                let logger = Self::stderr();
                let path = path.display();
                logger.warn(
                    "cannot open the log file; logging to stderr",
                    &[("logFile", &path), ("error", &e)],
                );
                logger
            }
        }
    }

    /// Adds a field to every later line.
    pub fn with(mut self, key: &'static str, value: impl Display) -> Self {
        self.context.push((key, value.to_string()));
        self
    }

    pub fn info(&self, msg: &str, fields: &[(&str, &dyn Display)]) {
        self.log(Level::Info, msg, fields);
    }

    pub fn warn(&self, msg: &str, fields: &[(&str, &dyn Display)]) {
        self.log(Level::Warn, msg, fields);
    }

    pub fn log(&self, level: Level, msg: &str, fields: &[(&str, &dyn Display)]) {
        let line = format_line(SystemTime::now(), level, &self.context, msg, fields);
        // A log line that cannot be written has nowhere else to go.
        let _ = match &self.sink {
            Sink::File(file) => (&*file).write_all(line.as_bytes()),
            Sink::Stderr => io::stderr().lock().write_all(line.as_bytes()),
        };
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        DirBuilder::new().recursive(true).mode(0o755).create(dir)?;
    }
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

fn format_line(
    now: SystemTime,
    level: Level,
    context: &[(&'static str, String)],
    msg: &str,
    fields: &[(&str, &dyn Display)],
) -> String {
    let mut line = format!("{} {level}", rfc3339(now));
    for (key, value) in context {
        push_field(&mut line, key, value);
    }
    push_field(&mut line, "msg", msg);
    for (key, value) in fields {
        push_field(&mut line, key, &value.to_string());
    }
    line.push('\n');
    line
}

/// ` key=value`, quoting the value when it holds anything a log reader would split on.
fn push_field(line: &mut String, key: &str, value: &str) {
    let bare = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '=' && c != '\\');
    let _ = if bare {
        write!(line, " {key}={value}")
    } else {
        write!(line, " {key}={value:?}")
    };
}

/// `2024-05-01T12:34:56.789Z`.
fn rfc3339(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (year, month, day) = podid_api::time::civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(at(1_709_164_799, 999)), "2024-02-28T23:59:59.999Z");
        assert_eq!(rfc3339(at(4_102_444_800, 0)), "2100-01-01T00:00:00.000Z");
    }

    #[test]
    fn line_shape() {
        let context = vec![("command", "ADD".to_owned()), ("pod", "ns/p 1".to_owned())];
        let line = format_line(
            at(0, 0),
            Level::Warn,
            &context,
            "spooled",
            &[("duration_ms", &12), ("path", &"/a=b"), ("empty", &"")],
        );
        assert_eq!(
            line,
            "1970-01-01T00:00:00.000Z WARN command=ADD pod=\"ns/p 1\" msg=spooled duration_ms=12 path=\"/a=b\" empty=\"\"\n"
        );
    }

    #[test]
    fn control_characters_cannot_forge_lines() {
        let line = format_line(at(0, 0), Level::Info, &[], "x", &[("pod", &"a\nINFO b")]);
        assert_eq!(line.matches('\n').count(), 1);
    }

    #[test]
    fn appends_and_creates_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/cni.log");
        Logger::open(&path).with("command", "DEL").info("one", &[]);
        Logger::open(&path).info("two", &[]);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].ends_with("INFO command=DEL msg=one"),
            "{}",
            lines[0]
        );
        assert!(lines[1].ends_with("INFO msg=two"), "{}", lines[1]);
    }
}
