//! The benchmarks' machine-readable results and the one table `bench-report` prints.
//!
//! Every bench binary takes `--json <file>` and writes one [`BenchResult`] there: its metrics,
//! each with the peer or floor it was compared with in the same run and its target. The bench
//! decides what it compares and against which bound; this module only computes the ratio, the
//! verdict and the table, so the figures in the table are the ones the bench printed.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One bench run: which bench, with which arguments, and its metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    /// The bench binary's name, e.g. `cni-bench`.
    pub bench: String,
    /// The arguments it ran with.
    pub args: Vec<String>,
    pub metrics: Vec<Metric>,
}

/// One measured figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub metric: String,
    /// podid's figure.
    pub value: f64,
    /// The unit of `value` and of the peer's value: `ms`, `s`, `MiB`, `req/s`, `requests`, ….
    pub unit: String,
    /// What `value` is compared with, measured in the same run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<Peer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
}

/// The program or floor a metric is compared with, in the metric's unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Peer {
    pub name: String,
    pub value: f64,
}

/// A bound on the metric's value or on its ratio to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub of: Of,
    pub bound: Bound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Of {
    Value,
    /// `value / peer.value`.
    Ratio,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    AtMost(f64),
    AtLeast(f64),
    Exactly(f64),
}

impl Target {
    pub fn value(bound: Bound) -> Self {
        Self {
            of: Of::Value,
            bound,
        }
    }

    pub fn ratio(bound: Bound) -> Self {
        Self {
            of: Of::Ratio,
            bound,
        }
    }
}

impl Bound {
    fn holds(self, x: f64) -> bool {
        match self {
            Self::AtMost(b) => x <= b,
            Self::AtLeast(b) => x >= b,
            Self::Exactly(b) => x == b,
        }
    }

    fn describe(self) -> String {
        match self {
            Self::AtMost(b) => format!("≤ {b}"),
            Self::AtLeast(b) => format!("≥ {b}"),
            Self::Exactly(b) => format!("= {b}"),
        }
    }
}

impl Metric {
    pub fn new(metric: impl Into<String>, value: f64, unit: impl Into<String>) -> Self {
        Self {
            metric: metric.into(),
            value,
            unit: unit.into(),
            peer: None,
            target: None,
        }
    }

    pub fn peer(mut self, name: impl Into<String>, value: f64) -> Self {
        self.peer = Some(Peer {
            name: name.into(),
            value,
        });
        self
    }

    pub fn target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self
    }

    /// `value / peer`, when there is a peer with a positive value (an added time of a peer can
    /// come out at or below zero in a noisy run, and a ratio to it means nothing).
    pub fn ratio(&self) -> Option<f64> {
        self.peer
            .as_ref()
            .filter(|p| p.value > 0.0)
            .map(|p| self.value / p.value)
    }

    /// Whether the target is met; `None` without a target. A ratio target without a ratio is
    /// not met.
    pub fn met(&self) -> Option<bool> {
        let target = self.target?;
        Some(match target.of {
            Of::Value => target.bound.holds(self.value),
            Of::Ratio => self.ratio().is_some_and(|r| target.bound.holds(r)),
        })
    }

    fn target_text(&self) -> String {
        match self.target {
            None => "—".to_owned(),
            Some(Target {
                of: Of::Value,
                bound,
            }) => format!("{} {}", bound.describe(), self.unit),
            Some(Target {
                of: Of::Ratio,
                bound,
            }) => format!("ratio {}", bound.describe()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error("{bench}: metric {metric:?} has a non-finite {what}")]
    NotFinite {
        bench: String,
        metric: String,
        what: &'static str,
    },
    #[error("{bench}: no metrics")]
    Empty { bench: String },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a bench result: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
}

impl BenchResult {
    /// This process's result: the binary's name and its arguments.
    pub fn new(bench: &str, metrics: Vec<Metric>) -> Self {
        Self {
            bench: bench.to_owned(),
            args: std::env::args().skip(1).collect(),
            metrics,
        }
    }

    /// Every figure is a finite number and there is at least one metric.
    pub fn validate(&self) -> Result<(), ResultError> {
        if self.metrics.is_empty() {
            return Err(ResultError::Empty {
                bench: self.bench.clone(),
            });
        }
        for m in &self.metrics {
            let figures = [
                ("value", Some(m.value)),
                ("peer value", m.peer.as_ref().map(|p| p.value)),
            ];
            for (what, figure) in figures {
                if figure.is_some_and(|f| !f.is_finite()) {
                    return Err(ResultError::NotFinite {
                        bench: self.bench.clone(),
                        metric: m.metric.clone(),
                        what,
                    });
                }
            }
        }
        Ok(())
    }

    pub fn write(&self, path: &Path) -> Result<(), ResultError> {
        self.validate()?;
        let text = serde_json::to_string_pretty(self).expect("a BenchResult serializes");
        std::fs::write(path, text + "\n").map_err(|source| ResultError::Write {
            path: path.display().to_string(),
            source,
        })
    }

    pub fn read(path: &Path) -> Result<Self, ResultError> {
        let text = std::fs::read_to_string(path).map_err(|source| ResultError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let result: Self = serde_json::from_str(&text).map_err(|source| ResultError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        result.validate()?;
        Ok(result)
    }
}

/// The markdown table of every metric of `results`, in order.
pub fn table(results: &[BenchResult]) -> String {
    let mut out = String::new();
    out.push_str(
        "| benchmark | metric | podid | peer / floor (same run) | ratio | target | met |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|\n");
    for result in results {
        for m in &result.metrics {
            let peer = match &m.peer {
                Some(p) => format!("{}: {} {}", p.name, number(p.value), m.unit),
                None => "—".to_owned(),
            };
            let ratio = match (&m.peer, m.ratio()) {
                (_, Some(r)) => number(r),
                (Some(_), None) => "n/a (peer ≤ 0)".to_owned(),
                (None, None) => "—".to_owned(),
            };
            let met = match m.met() {
                Some(true) => "✓",
                Some(false) => "✗",
                None => "—",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} {} | {peer} | {ratio} | {} | {met} |",
                result.bench,
                m.metric,
                number(m.value),
                m.unit,
                m.target_text()
            );
        }
    }
    out
}

/// A figure with as many decimals as its size warrants: 15130, 38.5, 4.38, 0.179, 0.0712.
pub fn number(x: f64) -> String {
    let a = x.abs();
    if (x == x.trunc() && a < 1e15) || a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        // three significant figures
        let decimals = (2 - a.log10().floor() as i32).clamp(3, 9) as usize;
        format!("{x:.decimals$}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(metrics: Vec<Metric>) -> BenchResult {
        BenchResult {
            bench: "x-bench".into(),
            args: vec![],
            metrics,
        }
    }

    #[test]
    fn ratio_targets_compare_value_over_peer() {
        let slow = Metric::new("throughput", 67.0, "req/s")
            .peer("bare", 100.0)
            .target(Target::ratio(Bound::AtLeast(0.8)));
        assert_eq!(slow.ratio(), Some(0.67));
        assert_eq!(slow.met(), Some(false));
        let fast = Metric::new("throughput", 96.0, "req/s")
            .peer("bare", 100.0)
            .target(Target::ratio(Bound::AtLeast(0.8)));
        assert_eq!(fast.met(), Some(true));
        for peer in [0.0, -0.9] {
            let no_ratio = Metric::new("added", 3.0, "ms")
                .peer("tuning", peer)
                .target(Target::ratio(Bound::AtMost(0.5)));
            assert_eq!(no_ratio.ratio(), None);
            assert_eq!(no_ratio.met(), Some(false));
        }
    }

    #[test]
    fn value_targets_ignore_the_peer() {
        let m = Metric::new("converged", 4.38, "s")
            .peer("seeding", 2.0)
            .target(Target::value(Bound::AtMost(30.0)));
        assert_eq!(m.met(), Some(true));
        let calls =
            Metric::new("upstream calls", 2.0, "calls").target(Target::value(Bound::Exactly(1.0)));
        assert_eq!(calls.met(), Some(false));
        assert_eq!(Metric::new("info", 1.0, "ms").met(), None);
    }

    #[test]
    fn the_table_has_one_row_per_metric_with_ratio_target_and_verdict() {
        let table = table(&[result(vec![
            Metric::new("added ADD+DEL p50", 15.23, "ms")
                .peer("tuning added", 8.26)
                .target(Target::ratio(Bound::AtMost(0.5))),
            Metric::new("peak RSS", 101.7, "MiB").target(Target::value(Bound::AtMost(150.0))),
            Metric::new("requests", 40019.0, "requests"),
        ])]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5, "{table}");
        assert_eq!(
            lines[2],
            "| x-bench | added ADD+DEL p50 | 15.2 ms | tuning added: 8.26 ms | 1.84 | ratio ≤ 0.5 | ✗ |"
        );
        assert_eq!(
            lines[3],
            "| x-bench | peak RSS | 102 MiB | — | — | ≤ 150 MiB | ✓ |"
        );
        assert_eq!(
            lines[4],
            "| x-bench | requests | 40019 requests | — | — | — | — |"
        );
    }

    #[test]
    fn results_round_trip_and_reject_non_finite_figures() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.json");
        let good = result(vec![
            Metric::new("a", 1.5, "ms")
                .peer("b", 3.0)
                .target(Target::ratio(Bound::AtMost(0.5))),
        ]);
        good.write(&path).expect("write");
        assert_eq!(BenchResult::read(&path).expect("read"), good);

        let bad = result(vec![Metric::new("a", f64::NAN, "ms")]);
        assert!(matches!(
            bad.write(&path),
            Err(ResultError::NotFinite { what: "value", .. })
        ));
        assert!(matches!(
            result(vec![]).validate(),
            Err(ResultError::Empty { .. })
        ));
    }

    #[test]
    fn numbers_keep_three_significant_figures_or_the_integer() {
        assert_eq!(number(15130.4), "15130");
        assert_eq!(number(38.54), "38.5");
        assert_eq!(number(4.384), "4.38");
        assert_eq!(number(0.1794), "0.179");
        assert_eq!(number(1.0), "1");
        assert_eq!(number(0.0123), "0.0123");
        assert_eq!(number(-0.5), "-0.500");
    }
}
