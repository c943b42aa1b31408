//! ADD+DEL wall time per pod through the harness's CNI runtime for three chains, interleaved in
//! one run on one simulated node: `[bridge]` (the floor), `[bridge, podid]` and
//! `[bridge, tuning]` (Debian's Go `tuning` setting one sysctl in the pod netns, the peer).
//! A plugin's added time is its chain's median minus `[bridge]`'s.
//!
//! `cargo run --release -p podid-tests --bin cni-bench -- [--pods 200] [--cni-version 0.3.0]
//! [--json <file>]`; `--json` also writes the results for `bench-report`.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use podid_tests::bench::{BenchResult, Bound, Metric, Target};
use podid_tests::node::Node;
use podid_tests::runtime::Runtime;

/// podid's added time must be at most this fraction of tuning's.
const TARGET_RATIO: f64 = 0.5;
const WARMUP: usize = 5;

fn main() -> Result<()> {
    let mut pods = 200usize;
    let mut version = "0.3.0".to_owned();
    let mut json: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--pods" => {
                pods = args
                    .next()
                    .context("--pods needs a value")?
                    .parse()
                    .context("--pods")?
            }
            "--cni-version" => version = args.next().context("--cni-version needs a value")?,
            "--json" => json = Some(args.next().context("--json needs a file")?.into()),
            other => bail!(
                "unknown argument {other:?} (expected --pods N, --cni-version V, --json FILE)"
            ),
        }
    }
    ensure!(pods > 0, "--pods must be at least 1");

    let node = Node::new("bench")?;
    node.start_tokend()?;
    let settings = Default::default();
    let chains: [(&str, Runtime); 3] = [
        (
            "[bridge]",
            node.runtime(&version, vec![node.bridge_entry()]),
        ),
        (
            "[bridge, podid]",
            node.runtime(
                &version,
                vec![node.bridge_entry(), node.podid_entry(&settings)],
            ),
        ),
        (
            "[bridge, tuning]",
            node.runtime(&version, vec![node.bridge_entry(), node.tuning_entry()]),
        ),
    ];
    // Per chain: ADD+DEL, ADD alone, DEL alone.
    let mut samples: [[Vec<Duration>; 3]; 3] = Default::default();
    println!("cni-bench: {pods} pods per chain, cniVersion {version}, interleaved");
    for round in 0..WARMUP + pods {
        for offset in 0..chains.len() {
            let which = (round + offset) % chains.len();
            let (add, del) = add_del(&node, &chains[which].1, round * chains.len() + offset)?;
            if round >= WARMUP {
                samples[which][0].push(add + del);
                samples[which][1].push(add);
                samples[which][2].push(del);
            }
        }
    }

    println!();
    println!(
        "| chain | ADD+DEL p10 ms | p50 ms | p90 ms | added p50 ms | ADD p50 ms | DEL p50 ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    let floor = percentile(&mut samples[0][0], 0.5);
    let mut added = [0.0; 3];
    // ADD p50 and DEL p50 per chain.
    let mut parts = [[0.0; 2]; 3];
    for (i, (name, _)) in chains.iter().enumerate() {
        let [both, add, del] = &mut samples[i];
        let (p10, p50, p90) = (
            percentile(both, 0.1),
            percentile(both, 0.5),
            percentile(both, 0.9),
        );
        added[i] = p50 - floor;
        parts[i] = [percentile(add, 0.5), percentile(del, 0.5)];
        println!(
            "| `{name}` | {p10:.2} | {p50:.2} | {p90:.2} | {:.2} | {:.2} | {:.2} |",
            added[i], parts[i][0], parts[i][1]
        );
    }
    let ratio = added[1] / added[2];
    println!();
    println!(
        "median ADD+DEL: [bridge] {floor:.2} ms, [bridge, podid] {:.2} ms, [bridge, tuning] {:.2} ms",
        floor + added[1],
        floor + added[2]
    );
    println!(
        "podid added {:.2} ms, tuning added {:.2} ms: ratio podid/tuning = {ratio:.2} (target <= {TARGET_RATIO}: {})",
        added[1],
        added[2],
        if ratio <= TARGET_RATIO {
            "met"
        } else {
            "NOT met"
        }
    );
    if let Some(path) = json {
        let added_part = |chain: usize, part: usize| parts[chain][part] - parts[0][part];
        let metrics = vec![
            Metric::new(
                format!("ADD+DEL p50 of `[bridge, podid]`, {pods} pods"),
                floor + added[1],
                "ms",
            )
            .peer("`[bridge]` alone (floor)", floor),
            Metric::new("added ADD+DEL p50 (chain − `[bridge]`)", added[1], "ms")
                .peer("`tuning` added", added[2])
                .target(Target::ratio(Bound::AtMost(TARGET_RATIO))),
            Metric::new("added ADD p50", added_part(1, 0), "ms")
                .peer("`tuning` added", added_part(2, 0)),
            Metric::new("added DEL p50", added_part(1, 1), "ms")
                .peer("`tuning` added", added_part(2, 1)),
        ];
        BenchResult::new("cni-bench", metrics).write(&path)?;
    }
    Ok(())
}

/// One pod sandbox: netns created (not timed), ADD and DEL timed, netns deleted.
fn add_del(node: &Node, rt: &Runtime, n: usize) -> Result<(Duration, Duration)> {
    let pod = node.pod("bench", &format!("pod-{n}"))?;
    let start = Instant::now();
    rt.add(&pod.attachment)?;
    let added = Instant::now();
    rt.del(&pod.attachment)?;
    Ok((added - start, added.elapsed()))
}

/// The `q` quantile in milliseconds (nearest rank).
fn percentile(samples: &mut [Duration], q: f64) -> f64 {
    samples.sort();
    let rank = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1].as_secs_f64() * 1000.0
}
