//! `bench-report`: runs every benchmark (`cni-bench`, `install-bench`, `controller-bench`,
//! `tokend-bench`) one after the other as child processes, each with `--json`, and prints one
//! table: each metric, the peer or floor it is compared with in the same run, the ratio, the
//! target and whether it is met. The benches' own output goes to stderr.
//!
//! `cargo run --release -p podid-tests --bin bench-report -- [--quick] [--only cni,tokend]
//! [--cni "--pods 50"] [--install ARGS] [--controller ARGS] [--tokend ARGS] [--json FILE]`
//!
//! Exits non-zero when a bench fails to run; a missed target is a ✗ in the table.

#![allow(clippy::print_stdout)]

use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use podid_tests::bench::{self, BenchResult};
use podid_tests::bins;

const COMMAND: &str = "cargo run --release -p podid-tests --bin bench-report";

/// One bench binary, its key on this command line and its `--quick` sizes.
struct Bench {
    key: &'static str,
    binary: &'static str,
    quick: &'static [(&'static str, &'static str)],
}

/// In the order they run: the short ones first.
const BENCHES: [Bench; 4] = [
    Bench {
        key: "cni",
        binary: "cni-bench",
        quick: &[("--pods", "10")],
    },
    Bench {
        key: "install",
        binary: "install-bench",
        quick: &[("--rewrites", "20")],
    },
    Bench {
        key: "controller",
        binary: "controller-bench",
        quick: &[
            ("--namespaces", "10"),
            ("--identities-per-namespace", "5"),
            ("--pods", "500"),
            ("--nodes", "10"),
            ("--latency-samples", "20"),
        ],
    },
    Bench {
        key: "tokend",
        binary: "tokend-bench",
        quick: &[
            ("--duration", "1"),
            ("--rounds", "1"),
            ("--pods", "20"),
            ("--per-pod", "5"),
            ("--registered", "20"),
            ("--repeat", "1"),
            ("--settle", "1"),
        ],
    },
];

#[derive(Debug, Parser)]
#[command(about = "Runs every podid benchmark and prints one table of metrics, peers and targets")]
struct Args {
    /// Small sizes and short runs, for a smoke run (numbers are not meaningful).
    #[arg(long)]
    quick: bool,
    /// Run only these benches (cni, install, controller, tokend).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Extra arguments for cni-bench, e.g. "--pods 50" (they override --quick's).
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    cni: String,
    /// Extra arguments for install-bench, e.g. "--rewrites 50".
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    install: String,
    /// Extra arguments for controller-bench, e.g. "--pods 2000 --namespaces 20".
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    controller: String,
    /// Extra arguments for tokend-bench, e.g. "--duration 3 --rounds 2".
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    tokend: String,
    /// Also write every bench's results, as a JSON array, to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

impl Args {
    fn extra(&self, key: &str) -> &str {
        match key {
            "cni" => &self.cni,
            "install" => &self.install,
            "controller" => &self.controller,
            _ => &self.tokend,
        }
    }
}

/// `base` with `extra` (`--flag value` pairs) replacing the same flags or appended.
fn merge_args(base: &[(&str, &str)], extra: &str) -> Result<Vec<String>> {
    let mut pairs: Vec<(String, String)> = base
        .iter()
        .map(|(f, v)| ((*f).to_owned(), (*v).to_owned()))
        .collect();
    let mut tokens = extra.split_whitespace();
    while let Some(flag) = tokens.next() {
        ensure!(
            flag.starts_with("--"),
            "expected a --flag in {extra:?}, found {flag:?}"
        );
        ensure!(flag != "--json", "--json is bench-report's to set");
        let value = tokens
            .next()
            .with_context(|| format!("{flag} needs a value in {extra:?}"))?;
        match pairs.iter_mut().find(|(f, _)| f == flag) {
            Some(pair) => pair.1 = value.to_owned(),
            None => pairs.push((flag.to_owned(), value.to_owned())),
        }
    }
    Ok(pairs.into_iter().flat_map(|(f, v)| [f, v]).collect())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Runs one bench with `--json` into `dir`; its stdout and stderr go to this process's stderr.
fn run(binary: &Path, args: &[String], dir: &Path) -> Result<BenchResult> {
    let name = binary.file_name().unwrap_or_default().to_string_lossy();
    let json = dir.join(format!("{name}.json"));
    let stdout = std::io::stderr().as_fd().try_clone_to_owned()?;
    let status = Command::new(binary)
        .args(args)
        .arg("--json")
        .arg(&json)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::inherit())
        .status()
        .with_context(|| format!("starting {}", binary.display()))?;
    ensure!(
        status.success(),
        "{name} {} failed: {status}",
        args.join(" ")
    );
    let result = BenchResult::read(&json)?;
    ensure!(
        result.bench == name,
        "{} holds the results of {}, not {name}",
        json.display(),
        result.bench
    );
    Ok(result)
}

fn main() -> Result<()> {
    let args = Args::parse();
    for key in &args.only {
        ensure!(
            BENCHES.iter().any(|b| b.key == key),
            "--only {key:?}: the benches are cni, install, controller, tokend"
        );
    }
    let selected: Vec<&Bench> = BENCHES
        .iter()
        .filter(|b| args.only.is_empty() || args.only.iter().any(|k| k == b.key))
        .collect();
    let mut plan = Vec::new();
    for bench in &selected {
        let base: &[(&str, &str)] = if args.quick { bench.quick } else { &[] };
        plan.push((bench, merge_args(base, args.extra(bench.key))?));
    }
    eprintln!("bench-report: building the benches and the binaries they run (release)...");
    let mut binaries = Vec::new();
    for bench in &selected {
        binaries.push(bins::build_release("podid-tests", bench.binary)?);
    }
    // Built here, so that no bench's time includes a build.
    bins::plugin()?;
    bins::tokend()?;
    bins::controller()?;
    bins::installer()?;
    bins::build_release("podid-tests", "fake-apiserver")?;

    let dir = tempfile::Builder::new()
        .prefix("podid-bench-report-")
        .tempdir()?;
    let load_before = load_average();
    let started = Instant::now();
    let mut results = Vec::new();
    let mut failures = Vec::new();
    let mut ran = Vec::new();
    for ((bench, bench_args), binary) in plan.iter().zip(&binaries) {
        let line = format!("{} {}", bench.binary, bench_args.join(" "));
        eprintln!("bench-report: running {}", line.trim_end());
        let t0 = Instant::now();
        match run(binary, bench_args, dir.path()) {
            Ok(result) => results.push(result),
            Err(e) => {
                eprintln!("bench-report: {e:#}");
                failures.push(format!("{e:#}"));
            }
        }
        ran.push(format!(
            "`{}` ({:.0} s)",
            line.trim_end(),
            t0.elapsed().as_secs_f64()
        ));
    }

    println!(
        "bench-report{}: {COMMAND}{}",
        if args.quick {
            " (quick: sizes too small for meaningful numbers)"
        } else {
            ""
        },
        std::env::args()
            .skip(1)
            .map(|a| format!(" {a}"))
            .collect::<String>()
    );
    println!(
        "ran {} in {:.0} s; load average {load_before} before, {} after",
        ran.join(", "),
        started.elapsed().as_secs_f64(),
        load_average()
    );
    println!();
    print!("{}", bench::table(&results));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !failures.is_empty() {
        println!();
        for failure in &failures {
            println!("FAILED: {failure}");
        }
        bail!("{} of {} benches failed to run", failures.len(), plan.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::merge_args;

    #[test]
    fn extra_arguments_replace_the_quick_ones_or_are_appended() {
        let merged =
            merge_args(&[("--pods", "10"), ("--rounds", "1")], "--pods 50 --x y").expect("valid");
        assert_eq!(merged, ["--pods", "50", "--rounds", "1", "--x", "y"]);
        assert_eq!(merge_args(&[], "").expect("empty"), Vec::<String>::new());
        assert!(merge_args(&[], "--pods").is_err());
        assert!(merge_args(&[], "pods 5").is_err());
        assert!(merge_args(&[], "--json x").is_err());
    }
}
