//! `bench-report --quick` end to end: every bench runs at small sizes as a child process, and the
//! one table it prints has every metric row once, with figures, the peer measured in the same
//! run, the ratio computed from them, the target and a verdict.

use std::process::Command;

use podid_tests::bench::{BenchResult, number};

/// What a row must carry besides its figure.
#[derive(Clone, Copy, PartialEq)]
enum Has {
    Nothing,
    Peer,
    Target,
    PeerAndTarget,
}

/// Every metric row of a quick run, by the start of its metric cell.
fn expected() -> Vec<(&'static str, String, Has)> {
    let mut rows = vec![
        (
            "cni-bench",
            "ADD+DEL p50 of `[bridge, podid]`".to_owned(),
            Has::Peer,
        ),
        (
            "cni-bench",
            "added ADD+DEL p50".to_owned(),
            Has::PeerAndTarget,
        ),
        ("cni-bench", "added ADD p50".to_owned(), Has::Peer),
        ("cni-bench", "added DEL p50".to_owned(), Has::Peer),
    ];
    for writer in ["CNS", "dropgz"] {
        for (q, has) in [
            ("p50", Has::Nothing),
            ("p99", Has::Nothing),
            ("max", Has::Target),
        ] {
            rows.push((
                "install-bench",
                format!("re-chain after a {writer} rewrite, {q} of 20"),
                has,
            ));
        }
    }
    rows.push((
        "install-bench",
        "conflist writes by the installer".to_owned(),
        Has::Peer,
    ));
    rows.extend([
        (
            "controller-bench",
            "controller start → all 500 assignments Assigned".to_owned(),
            Has::PeerAndTarget,
        ),
        (
            "controller-bench",
            "API requests during convergence".to_owned(),
            Has::Nothing,
        ),
        (
            "controller-bench",
            "new pod → its assignment Assigned, median of 20".to_owned(),
            Has::PeerAndTarget,
        ),
        (
            "controller-bench",
            "new pod → its assignment Assigned, p90".to_owned(),
            Has::Peer,
        ),
        (
            "controller-bench",
            "controller peak RSS (VmHWM)".to_owned(),
            Has::Target,
        ),
    ]);
    for c in ["1 connection", "16 connections", "64 connections"] {
        rows.push((
            "tokend-bench",
            format!("cached-token throughput, {c}"),
            Has::PeerAndTarget,
        ));
        rows.push((
            "tokend-bench",
            format!("cached-token p99 latency, {c}"),
            Has::PeerAndTarget,
        ));
        rows.push((
            "tokend-bench",
            format!("server CPU per request, {c}"),
            Has::Peer,
        ));
    }
    rows.extend([
        (
            "tokend-bench",
            "upstream calls (IMDS + Entra) for 100 identical concurrent requests".to_owned(),
            Has::Target,
        ),
        (
            "tokend-bench",
            "200 OK among those 100 requests".to_owned(),
            Has::Target,
        ),
        (
            "tokend-bench",
            "VmRSS, 20 pods registered and assigned, idle".to_owned(),
            Has::PeerAndTarget,
        ),
        (
            "tokend-bench",
            "VmHWM, 20 pods, after 2 bursts of 20 × 5 connections".to_owned(),
            Has::PeerAndTarget,
        ),
    ]);
    rows
}

/// `"15.2 ms"` → 15.2; the cell must be a number and a unit.
fn figure(cell: &str) -> f64 {
    let (n, unit) = cell
        .split_once(' ')
        .unwrap_or_else(|| panic!("{cell:?} is not `<number> <unit>`"));
    assert!(!unit.is_empty(), "{cell:?} has no unit");
    n.parse()
        .unwrap_or_else(|_| panic!("{cell:?} does not start with a number"))
}

#[test]
fn quick_report_has_every_metric_with_figures_peer_ratio_and_verdict() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_bench-report"))
        .arg("--quick")
        .arg("--json")
        .arg(&json)
        .output()
        .expect("running bench-report");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench-report --quick failed: {}\n{stdout}\n{stderr}",
        out.status
    );

    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| benchmark |"))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(str::trim)
                .collect::<Vec<_>>()
        })
        .collect();
    let expected = expected();
    assert_eq!(rows.len(), expected.len(), "rows of the table:\n{stdout}");
    let results: Vec<BenchResult> =
        serde_json::from_slice(&std::fs::read(&json).expect("--json file")).expect("JSON array");
    let metrics: Vec<_> = results
        .iter()
        .flat_map(|r| r.metrics.iter().map(move |m| (&r.bench, m)))
        .collect();
    assert_eq!(metrics.len(), rows.len());

    for (bench, metric, has) in &expected {
        let matching: Vec<usize> = (0..rows.len())
            .filter(|&i| rows[i][0] == *bench && rows[i][1].starts_with(metric.as_str()))
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "{bench} {metric:?} should be one row of:\n{stdout}"
        );
        let i = matching[0];
        let row = &rows[i];
        assert_eq!(row.len(), 7, "{row:?}");
        let (json_bench, json_metric) = metrics[i];
        assert_eq!(
            (json_bench.as_str(), json_metric.metric.as_str()),
            (row[0], row[1])
        );

        let value = figure(row[2]);
        assert_eq!(
            row[2],
            format!("{} {}", number(json_metric.value), json_metric.unit)
        );
        let peered = matches!(has, Has::Peer | Has::PeerAndTarget);
        let targeted = matches!(has, Has::Target | Has::PeerAndTarget);
        if peered {
            let (name, peer_cell) = row[3]
                .rsplit_once(": ")
                .unwrap_or_else(|| panic!("{metric}: peer cell {:?}", row[3]));
            assert!(!name.is_empty(), "{metric}: unnamed peer");
            let peer = figure(peer_cell);
            let peer_json = json_metric.peer.as_ref().expect("peer in the JSON").value;
            assert_eq!(
                peer_cell,
                format!("{} {}", number(peer_json), json_metric.unit)
            );
            // The ratio is computed from the run's own figures, not copied.
            if peer_json > 0.0 {
                assert_eq!(row[4], number(json_metric.value / peer_json), "{row:?}");
                assert!(row[4].parse::<f64>().is_ok(), "{row:?}");
            } else {
                assert_eq!(row[4], "n/a (peer ≤ 0)", "{row:?}");
            }
            assert!(value.is_finite() && peer.is_finite());
        } else {
            assert_eq!((row[3], row[4]), ("—", "—"), "{row:?}");
        }
        if targeted {
            assert_ne!(row[5], "—", "{metric}: no target");
            let met = json_metric.met().expect("a target");
            assert_eq!(row[6], if met { "✓" } else { "✗" }, "{row:?}");
        } else {
            assert_eq!((row[5], row[6]), ("—", "—"), "{row:?}");
        }
    }

    // Figures that cannot be anything else whatever the machine's speed.
    let by_metric = |prefix: &str| {
        metrics
            .iter()
            .find(|(_, m)| m.metric.starts_with(prefix))
            .map(|(_, m)| (*m).clone())
            .unwrap_or_else(|| panic!("no {prefix:?}"))
    };
    let writes = by_metric("conflist writes by the installer");
    assert_eq!(
        writes.peer.as_ref().map(|p| p.value),
        Some(1.0 + 2.0 * (5.0 + 20.0)),
        "the first chain and 25 rewrites per writer"
    );
    assert!(writes.value >= 1.0 + 2.0 * 25.0, "{writes:?}");
    let answered = by_metric("200 OK among those 100 requests");
    assert!(answered.value <= 100.0, "{answered:?}");
    for c in ["1 connection", "16 connections", "64 connections"] {
        let rps = by_metric(&format!("cached-token throughput, {c}"));
        assert!(rps.value > 0.0 && rps.peer.as_ref().is_some_and(|p| p.value > 0.0));
    }
}
