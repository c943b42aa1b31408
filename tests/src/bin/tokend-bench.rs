//! tokend's benchmark (issue "IMDS token service" §5), on simulated nodes of the test harness:
//!
//! 1. **Cached tokens vs a bare responder.** One pod, its token cached; Debian's `wrk` runs in
//!    the pod netns against `http://169.254.169.254:80` (the plugin's nft redirect → tokend's
//!    listener bound in the pod netns) and against `http://169.254.169.254:81`, which an nft
//!    rule of the same kind in the same netns redirects to a bare hyper responder, also bound
//!    on 127.0.0.1 inside the pod netns, answering a fixed JSON body of the same size. Both
//!    servers are hyper HTTP/1.1 connections on a multi-thread tokio runtime with one worker
//!    per core; the per-pod limits are raised by flags so that the limiter does not shape the
//!    load. Interleaved: every round runs each connection count against both, in alternating
//!    order; medians over rounds are reported, with each server's CPU time per request.
//! 2. **Coalescing.** A second node whose tokend runs with the default limits: 1,000 identical
//!    token requests at once from 100 pods (10 connections each), for a resource not fetched
//!    before; the mock IMDS delays its first answer so every request arrives while the one
//!    upstream call is in flight. Upstream calls are counted in the mock IMDS and Entra logs.
//! 3. **Memory.** tokend's VmRSS with 250 pods registered through the CNI chain (one binding),
//!    then after the burst and after more bursts of the same shape.
//!
//! tokend runs at its shipped log level (`info`): the harness's tokend logs at `debug` (a line
//! per cached token, which would dominate the numbers), so each node's tokend is replaced by
//! the same binary with the same flags and namespaces before any pod exists.
//!
//! `cargo run --release -p podid-tests --bin tokend-bench -- [--duration 5] [--rounds 3]
//!  [--connections 1,16,64] [--pods 100] [--per-pod 10] [--registered 250] [--repeat 3]
//!  [--settle 10] [--part all|throughput|scale] [--json <file>]`; `PODID_BENCH_TOKEND=<path>`
//! benchmarks another tokend build; `--json` also writes the results for `bench-report`.

#![allow(clippy::print_stdout)]

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use kube::Api;
use kube::api::ListParams;
use podid_api::crd::{AzureAssignedIdentity, assignment_state};
use podid_tests::bench::{BenchResult, Bound, Metric, Target};
use podid_tests::mocks::imds::ImdsRoute;
use podid_tests::mocks::{Fault, FaultTarget};
use podid_tests::netns::in_netns;
use podid_tests::node::{IMDS_ADDR, Pod, TOKEN_PATH, wait_for};
use podid_tests::objects::pod;
use podid_tests::world::{ENTRA_HOST, World};
use podid_tests::{bins, http};

/// The bare responder's port as the pod calls it; an nft rule redirects it like the plugin's.
const BARE_ADDR: &str = "169.254.169.254:81";
/// What tokend and the bare responder send as content type.
const JSON: &str = "application/json; charset=utf-8";
/// Per-pod limits for the throughput runs: far above what one pod can send here.
const UNLIMITED: &str = "1000000";
/// The upstream latency the mock IMDS adds to the coalescing run's first token call.
const UPSTREAM_DELAY: Duration = Duration::from_millis(500);
/// A resource no earlier request of the coalescing node asked for.
const COALESCE_PATH: &str =
    "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net";

const TARGET_THROUGHPUT: f64 = 0.8;
const TARGET_P99: f64 = 1.5;
const TARGET_RSS_MIB: f64 = 40.0;

/// wrk's script: the IMDS header, and one machine-readable line at the end.
const WRK_SCRIPT: &str = r#"wrk.headers["Metadata"] = "true"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("PODID_BENCH %d %d %d %d %d %d %d %d %d %d\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"#;

#[derive(Debug)]
struct Args {
    duration: u64,
    rounds: usize,
    connections: Vec<usize>,
    pods: usize,
    per_pod: usize,
    registered: usize,
    /// Cached bursts of the same shape after the first.
    repeat: usize,
    /// How long after the first burst tokend's memory is read again.
    settle: Duration,
    /// `all`, `throughput` or `scale`.
    part: String,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        duration: 5,
        rounds: 3,
        connections: vec![1, 16, 64],
        pods: 100,
        per_pod: 10,
        registered: 250,
        repeat: 3,
        settle: Duration::from_secs(10),
        part: "all".into(),
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--duration" => args.duration = value()?.parse().context("--duration")?,
            "--rounds" => args.rounds = value()?.parse().context("--rounds")?,
            "--connections" => {
                args.connections = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("--connections")?
            }
            "--pods" => args.pods = value()?.parse().context("--pods")?,
            "--per-pod" => args.per_pod = value()?.parse().context("--per-pod")?,
            "--registered" => args.registered = value()?.parse().context("--registered")?,
            "--repeat" => args.repeat = value()?.parse().context("--repeat")?,
            "--settle" => args.settle = Duration::from_secs(value()?.parse().context("--settle")?),
            "--part" => args.part = value()?,
            "--json" => args.json = Some(value()?.into()),
            other => bail!(
                "unknown argument {other:?} (expected --duration S, --rounds N, \
                 --connections A,B,C, --pods N, --per-pod N, --registered N, \
                 --repeat N, --settle S, --part all|throughput|scale, --json FILE)"
            ),
        }
    }
    ensure!(
        args.registered >= args.pods,
        "--registered must be at least --pods"
    );
    ensure!(args.rounds > 0 && args.duration > 0, "nothing to run");
    ensure!(
        matches!(args.part.as_str(), "all" | "throughput" | "scale"),
        "--part is all, throughput or scale"
    );
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    Command::new("wrk")
        .arg("--version")
        .output()
        .context("wrk not found: install Debian's wrk (.ci/run does)")?;
    println!(
        "tokend-bench: {} s per run, {} rounds, connections {:?}, tokend {}",
        args.duration,
        args.rounds,
        args.connections,
        tokend_binary()?.display()
    );
    let mut metrics = Vec::new();
    if args.part != "scale" {
        let rows = throughput(&args)?;
        report_throughput(&args, &rows);
        metrics.extend(throughput_metrics(&rows));
    }
    if args.part != "throughput" {
        let result = scale(&args)?;
        report_scale(&args, &result);
        metrics.extend(scale_metrics(&args, &result));
    }
    if let Some(path) = &args.json {
        BenchResult::new("tokend-bench", metrics).write(path)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. Cached-token throughput against the bare responder

/// One wrk run.
#[derive(Debug, Clone, Copy)]
struct WrkRun {
    requests: u64,
    seconds: f64,
    errors: u64,
    non_2xx: u64,
    p50_us: f64,
    p99_us: f64,
    /// The server's CPU time during the run (user + system), µs: tokend's process, or the
    /// bare responder's worker threads.
    server_cpu_us: f64,
}

impl WrkRun {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    fn cpu_per_request(&self) -> f64 {
        self.server_cpu_us / self.requests as f64
    }
}

/// Medians over rounds at one connection count.
#[derive(Debug)]
struct ThroughputRow {
    connections: usize,
    bare: Vec<WrkRun>,
    tokend: Vec<WrkRun>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The median of `f` over `runs`.
fn med(runs: &[WrkRun], f: impl Fn(&WrkRun) -> f64) -> f64 {
    median(runs.iter().map(f).collect())
}

fn throughput(args: &Args) -> Result<Vec<ThroughputRow>> {
    let world = World::new("tbench", &[])?;
    let tokend = ProductionTokend::replace(
        &world,
        &[
            "--pod-rps",
            UNLIMITED,
            "--pod-burst",
            UNLIMITED,
            "--pod-inflight",
            UNLIMITED,
        ],
    )?;
    world.user_assigned("bench", "bench-id")?;
    world.bind("bench", "bench-binding", "bench-id", "bench")?;
    let client = world.start_pod(pod("bench", "client-0").binding("bench"))?;
    world.wait_assigned(&client, "bench", 1)?;
    let tokend_pid = tokend.pid();

    // tokend's answer, which also caches the token.
    let first = client.token_request()?;
    ensure!(first.status == 200, "first token request: {}", first.status);
    let size = first.body.len();
    let bare = BareResponder::start(&client, size)?;
    let check = in_netns(client.netns.path(), || {
        http::tcp(
            BARE_ADDR,
            &http::Request::get(TOKEN_PATH).header("Metadata", "true"),
        )
    })??;
    ensure!(
        check.status == 200
            && check.body.len() == size
            && check.header("content-type") == Some(JSON),
        "the bare responder answers {} with {} bytes, tokend 200 with {size}",
        check.status,
        check.body.len()
    );
    println!(
        "throughput: tokend (pid {tokend_pid}) and the bare responder both answer 200 with a {size}-byte JSON body"
    );

    let script = tempfile::Builder::new().suffix(".lua").tempfile()?;
    std::fs::write(script.path(), WRK_SCRIPT)?;
    let mut rows: Vec<ThroughputRow> = args
        .connections
        .iter()
        .map(|&connections| ThroughputRow {
            connections,
            bare: Vec::new(),
            tokend: Vec::new(),
        })
        .collect();
    // Warm both servers and the machine.
    for addr in [IMDS_ADDR, BARE_ADDR] {
        wrk(&client, addr, 16, 1, script.path())?;
    }
    for round in 0..args.rounds {
        for row in &mut rows {
            for which in 0..2 {
                let tokend_first = (round + row.connections) % 2 == 0;
                if (which == 0) == tokend_first {
                    let before = cpu_us(&format!("/proc/{tokend_pid}/stat"))?;
                    let mut run = wrk(
                        &client,
                        IMDS_ADDR,
                        row.connections,
                        args.duration,
                        script.path(),
                    )?;
                    run.server_cpu_us = cpu_us(&format!("/proc/{tokend_pid}/stat"))? - before;
                    ensure!(
                        run.non_2xx == 0 && run.errors == 0,
                        "tokend answered {} requests with a non-2xx status and {} failed: raise the limits",
                        run.non_2xx,
                        run.errors
                    );
                    row.tokend.push(run);
                } else {
                    let before = bare_cpu_us()?;
                    let mut run = wrk(
                        &client,
                        BARE_ADDR,
                        row.connections,
                        args.duration,
                        script.path(),
                    )?;
                    run.server_cpu_us = bare_cpu_us()? - before;
                    ensure!(run.non_2xx == 0 && run.errors == 0, "bare: {run:?}");
                    row.bare.push(run);
                }
            }
            let (b, t) = (
                row.bare.last().expect("ran"),
                row.tokend.last().expect("ran"),
            );
            println!(
                "  round {} c={:>2}: bare {:>7.0} req/s p50 {:.3} ms p99 {:.3} ms {:.1} µs CPU/req | tokend {:>7.0} req/s p50 {:.3} ms p99 {:.3} ms {:.1} µs CPU/req",
                round + 1,
                row.connections,
                b.rps(),
                b.p50_us / 1000.0,
                b.p99_us / 1000.0,
                b.cpu_per_request(),
                t.rps(),
                t.p50_us / 1000.0,
                t.p99_us / 1000.0,
                t.cpu_per_request()
            );
        }
    }
    drop(bare);
    Ok(rows)
}

/// Runs wrk in `pod`'s netns against `http://addr` with `connections` for `seconds`.
fn wrk(pod: &Pod, addr: &str, connections: usize, seconds: u64, script: &Path) -> Result<WrkRun> {
    let threads = connections.clamp(1, 2);
    let mut command = Command::new("wrk");
    command
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .args(["--timeout", "10s", "-s"])
        .arg(script)
        .arg(format!("http://{addr}{TOKEN_PATH}"));
    let out = in_netns(pod.netns.path(), || command.output())?.context("running wrk")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("PODID_BENCH "))
        .with_context(|| {
            format!(
                "wrk printed no result: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let n: Vec<f64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("wrk result {line:?}"))?;
    ensure!(n.len() == 10, "wrk result {line:?}");
    Ok(WrkRun {
        requests: n[0] as u64,
        seconds: n[1] / 1e6,
        errors: (n[2] + n[3] + n[4] + n[6]) as u64,
        non_2xx: n[5] as u64,
        p50_us: n[7],
        p99_us: n[8],
        server_cpu_us: 0.0,
    })
}

/// A minimal HTTP/1.1 responder bound on 127.0.0.1 inside a pod's netns, with a port redirect
/// from [`BARE_ADDR`] in that netns: the same path as tokend's listener, with no IMDS logic.
/// Its tasks end when it is dropped; its nft table goes with the pod netns.
struct BareResponder {
    _runtime: tokio::runtime::Runtime,
}

impl BareResponder {
    fn start(pod: &Pod, size: usize) -> Result<Self> {
        // A fixed JSON body of exactly `size` bytes.
        let skeleton = r#"{"access_token":"","token_type":"Bearer"}"#;
        ensure!(size > skeleton.len(), "body of {size} bytes is too small");
        let body = Bytes::from(format!(
            r#"{{"access_token":"{}","token_type":"Bearer"}}"#,
            "x".repeat(size - skeleton.len())
        ));
        let listener = in_netns(pod.netns.path(), || -> std::io::Result<_> {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })??;
        let port = listener.local_addr()?.port();
        // tokend's runtime: multi-thread, one worker per core.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("bare-responder")
            .build()?;
        runtime.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((stream, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_request: Request<hyper::body::Incoming>| {
                        let mut response = Response::new(Full::new(body.clone()));
                        response
                            .headers_mut()
                            .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let _ = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let rules = format!(
            "table ip podid_bench {{\n  chain output {{\n    type nat hook output priority -100; policy accept;\n    ip daddr 169.254.169.254 tcp dport 81 redirect to :{port}\n  }}\n}}\n"
        );
        let file = tempfile::Builder::new().suffix(".nft").tempfile()?;
        std::fs::write(file.path(), rules)?;
        pod.netns
            .exec_ok("nft", &["-f", &file.path().display().to_string()])?;
        Ok(Self { _runtime: runtime })
    }
}

// ---------------------------------------------------------------------------------------------
// 2 and 3. Coalescing and memory at the default limits

#[derive(Debug)]
struct ScaleResult {
    registered: usize,
    register_seconds: f64,
    rss_empty_kib: u64,
    rss_idle_kib: u64,
    rss_after_kib: u64,
    rss_settled_kib: u64,
    /// After each repeated (cached) burst.
    rss_repeated_kib: Vec<u64>,
    hwm_kib: u64,
    requests: usize,
    ok: usize,
    distinct_tokens: usize,
    upstream_imds: usize,
    upstream_entra: usize,
    /// Answers that took at least most of the upstream delay: they joined the one fetch.
    joined: usize,
    p50_ms: f64,
    max_ms: f64,
}

fn scale(args: &Args) -> Result<ScaleResult> {
    let world = World::new("tscale", &[])?;
    let tokend = ProductionTokend::replace(&world, &[])?;
    let rss_empty_kib = proc_status_kib(tokend.pid(), "VmRSS")?;
    world.user_assigned("scale", "shared-id")?;
    world.bind("scale", "shared-binding", "shared-id", "shared")?;
    let started = Instant::now();
    let mut pods = Vec::with_capacity(args.registered);
    for i in 0..args.registered {
        pods.push(world.start_pod(pod("scale", &format!("app-{i:03}")).binding("shared"))?);
    }
    let register_seconds = started.elapsed().as_secs_f64();
    wait_all_assigned(&world, "scale", args.registered)?;
    let bound = world
        .node
        .tokend_pods()?
        .iter()
        .filter(|p| p.listener_bound)
        .count();
    ensure!(
        bound == args.registered,
        "tokend has {bound} bound listeners, {} pods were created",
        args.registered
    );
    let tokend_pid = tokend.pid();
    let rss_idle_kib = proc_status_kib(tokend_pid, "VmRSS")?;
    println!(
        "scale: {} pods registered in {register_seconds:.1} s, tokend (pid {tokend_pid}) VmRSS {:.1} MiB",
        args.registered,
        rss_idle_kib as f64 / 1024.0
    );

    world.imds.clear_log();
    world.entra.clear_log();
    world
        .imds
        .inject(FaultTarget::Any, Fault::Delay(UPSTREAM_DELAY), 1);
    let answers = burst(&pods[..args.pods], args.per_pod)?;
    let upstream_imds = world
        .imds
        .log()
        .iter()
        .filter(|r| r.route == ImdsRoute::Token)
        .count();
    let upstream_entra = world.entra.log().len();
    let rss_after_kib = proc_status_kib(tokend_pid, "VmRSS")?;
    std::thread::sleep(args.settle);
    let rss_settled_kib = proc_status_kib(tokend_pid, "VmRSS")?;
    // The same burst again, now from the cache: does the memory come back or grow?
    let mut rss_repeated_kib = Vec::new();
    for _ in 0..args.repeat {
        let again = burst(&pods[..args.pods], args.per_pod)?;
        let ok = again.iter().filter(|a| a.status == 200).count();
        ensure!(
            ok == again.len(),
            "repeated burst: {ok} of {} answered 200",
            again.len()
        );
        rss_repeated_kib.push(proc_status_kib(tokend_pid, "VmRSS")?);
    }
    let hwm_kib = proc_status_kib(tokend_pid, "VmHWM")?;

    let ok = answers.iter().filter(|a| a.status == 200).count();
    let mut tokens: Vec<[u8; 32]> = answers.iter().filter_map(|a| a.token_sha256).collect();
    tokens.sort_unstable();
    tokens.dedup();
    let joined = answers
        .iter()
        .filter(|a| a.took >= UPSTREAM_DELAY.mul_f64(0.8))
        .count();
    let latencies: Vec<f64> = answers
        .iter()
        .map(|a| a.took.as_secs_f64() * 1000.0)
        .collect();
    let max_ms = latencies.iter().copied().fold(0.0, f64::max);
    Ok(ScaleResult {
        registered: args.registered,
        register_seconds,
        rss_empty_kib,
        rss_idle_kib,
        rss_after_kib,
        rss_settled_kib,
        rss_repeated_kib,
        hwm_kib,
        requests: answers.len(),
        ok,
        distinct_tokens: tokens.len(),
        upstream_imds,
        upstream_entra,
        joined,
        p50_ms: median(latencies),
        max_ms,
    })
}

fn wait_all_assigned(world: &World, namespace: &str, count: usize) -> Result<()> {
    let api: Api<AzureAssignedIdentity> = Api::namespaced(world.node.client(), namespace);
    wait_for(Duration::from_secs(120), "every pod's assignment", || {
        let list = world.node.block_on(api.list(&ListParams::default())).ok()?;
        let assigned = list
            .items
            .iter()
            .filter(|a| {
                a.status.as_ref().and_then(|s| s.status.as_deref())
                    == Some(assignment_state::ASSIGNED)
            })
            .count();
        (assigned == count).then_some(())
    })
}

#[derive(Debug)]
struct Answer {
    status: u16,
    took: Duration,
    token_sha256: Option<[u8; 32]>,
}

/// `per_pod` connections from each pod, opened first; then, all at once, one token request on
/// each; every answer read in full.
fn burst(pods: &[Pod], per_pod: usize) -> Result<Vec<Answer>> {
    let barrier = Arc::new(Barrier::new(pods.len()));
    let request = format!(
        "GET {COALESCE_PATH} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n"
    );
    let results: Vec<Result<Vec<Answer>>> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|pod| {
                let barrier = Arc::clone(&barrier);
                let request = request.as_bytes();
                s.spawn(move || {
                    in_netns(pod.netns.path(), || {
                        let streams: Result<Vec<TcpStream>> = (0..per_pod)
                            .map(|_| {
                                let stream = TcpStream::connect(IMDS_ADDR)?;
                                stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                                Ok(stream)
                            })
                            .collect();
                        // Every thread reaches the barrier, even one that failed to connect.
                        barrier.wait();
                        let mut streams = streams?;
                        let sent = Instant::now();
                        for stream in &mut streams {
                            stream.write_all(request)?;
                        }
                        streams.into_iter().map(|s| read_answer(s, sent)).collect()
                    })?
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut answers = Vec::new();
    for result in results {
        answers.extend(result?);
    }
    Ok(answers)
}

fn read_answer(mut stream: TcpStream, sent: Instant) -> Result<Answer> {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let took = sent.elapsed();
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status line in {} bytes", raw.len()))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let token_sha256 = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["access_token"].as_str().map(str::to_owned))
        .map(|token| {
            let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
            let mut out = [0u8; 32];
            out.copy_from_slice(digest.as_ref());
            out
        });
    Ok(Answer {
        status,
        took,
        token_sha256,
    })
}

// ---------------------------------------------------------------------------------------------
// tokend's process

/// The World's tokend logs at `debug` (one line per cached token: a harness choice that would
/// dominate these numbers); this replaces it, before any pod exists, with the same tokend, same
/// flags, same mount and network namespaces, at the shipped log level (`info`) and with
/// `extra` flags. Killed on drop, before the World goes.
struct ProductionTokend(Child);

impl ProductionTokend {
    fn replace(world: &World, extra: &[&str]) -> Result<Self> {
        let node = &world.node;
        let binary = tokend_binary()?;
        node.kill_tokend()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir().join("log/tokend.log"))?;
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "slave", "--", "sh", "-c"])
            .arg(r#"mount --bind "$1" /etc/hosts && ns="$2" && shift 2 && exec nsenter --net="$ns" -- "$@""#)
            .arg("sh")
            .arg(node.dir().join("hosts"))
            .arg(node.netns.path())
            .arg(&binary)
            .arg("--node-name")
            .arg(&node.name)
            .arg("--kubeconfig")
            .arg(node.kubeconfig())
            .arg("--socket")
            .arg(node.socket())
            .arg("--state-dir")
            .arg(node.state_dir())
            .arg("--listener-port")
            .arg(node.listener_port.to_string())
            .args(["--health-addr", "127.0.0.1:2580"])
            .arg("--authority-host")
            .arg(format!("https://{ENTRA_HOST}"))
            .arg("--ca-file")
            .arg(node.dir().join("entra-ca.pem"))
            .args(extra)
            .env("PODID_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let tokend = Self(command.spawn().context("starting podid-tokend")?);
        node.wait_tokend_ready(Duration::from_secs(10))?;
        // unshare, sh and nsenter each exec the next: the child's pid is tokend's now.
        let exe = std::fs::read_link(format!("/proc/{}/exe", tokend.pid()))?;
        ensure!(
            exe.file_name() == binary.file_name(),
            "pid {} runs {}, not tokend",
            tokend.pid(),
            exe.display()
        );
        Ok(tokend)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// The workspace's podid-tokend, or the build named by `PODID_BENCH_TOKEND` (to measure a
/// candidate change against the same harness).
fn tokend_binary() -> Result<std::path::PathBuf> {
    match std::env::var_os("PODID_BENCH_TOKEND") {
        Some(path) => Ok(path.into()),
        None => bins::tokend(),
    }
}

impl Drop for ProductionTokend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `kB` field of `/proc/<pid>/status`.
fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("/proc/{pid}/status has no {field}"))
}

/// CPU time (user + system) of the bare responder's threads, µs.
fn bare_cpu_us() -> Result<f64> {
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task")?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == "bare-responder" {
            total += cpu_us(&task.path().join("stat").display().to_string())?;
        }
    }
    Ok(total)
}

/// User + system CPU time in a `/proc/…/stat` file, µs.
fn cpu_us(path: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(path)?;
    // Fields after the parenthesised command; utime and stime are the 14th and 15th fields.
    let rest = stat.rsplit_once(')').context("/proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // USER_HZ, 100 on every Linux architecture this runs on.
    Ok(ticks * 1e6 / 100.0)
}

// ---------------------------------------------------------------------------------------------
// Report

fn report_throughput(args: &Args, rows: &[ThroughputRow]) {
    println!();
    println!(
        "Cached token, one pod, wrk {} s × {} rounds per cell (medians over rounds):",
        args.duration, args.rounds
    );
    println!();
    println!(
        "| connections | bare req/s | tokend req/s | throughput ratio (≥ {TARGET_THROUGHPUT}) | bare p50 ms | tokend p50 ms | bare p99 ms | tokend p99 ms | p99 ratio (≤ {TARGET_P99}) | bare CPU µs/req | tokend CPU µs/req |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let (bare_rps, tokend_rps) = (med(&row.bare, WrkRun::rps), med(&row.tokend, WrkRun::rps));
        let (bare_p99, tokend_p99) = (med(&row.bare, |r| r.p99_us), med(&row.tokend, |r| r.p99_us));
        let ratio = tokend_rps / bare_rps;
        let p99_ratio = tokend_p99 / bare_p99;
        println!(
            "| {} | {:.0} | {:.0} | {:.2} {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} {} | {:.1} | {:.1} |",
            row.connections,
            bare_rps,
            tokend_rps,
            ratio,
            verdict(ratio >= TARGET_THROUGHPUT),
            med(&row.bare, |r| r.p50_us) / 1000.0,
            med(&row.tokend, |r| r.p50_us) / 1000.0,
            bare_p99 / 1000.0,
            tokend_p99 / 1000.0,
            p99_ratio,
            verdict(p99_ratio <= TARGET_P99),
            med(&row.bare, WrkRun::cpu_per_request),
            med(&row.tokend, WrkRun::cpu_per_request)
        );
    }
}

fn report_scale(args: &Args, scale: &ScaleResult) {
    println!();
    println!(
        "Coalescing, default limits: {} identical token requests at once from {} pods × {} \
         (first upstream answer delayed {} ms):",
        scale.requests,
        args.pods,
        args.per_pod,
        UPSTREAM_DELAY.as_millis()
    );
    println!();
    println!(
        "| requests | 200 OK | distinct tokens | upstream calls: IMDS + Entra (target 1) | answers that waited on the fetch | p50 ms | max ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    let upstream = scale.upstream_imds + scale.upstream_entra;
    println!(
        "| {} | {} | {} | {} + {} = {} {} | {} | {:.1} | {:.1} |",
        scale.requests,
        scale.ok,
        scale.distinct_tokens,
        scale.upstream_imds,
        scale.upstream_entra,
        upstream,
        verdict(upstream == 1 && scale.ok == scale.requests),
        scale.joined,
        scale.p50_ms,
        scale.max_ms
    );
    println!();
    println!("tokend memory:");
    println!();
    println!("| when | pods registered | VmRSS MiB (≤ {TARGET_RSS_MIB}) |");
    println!("|---|---|---|");
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut rows: Vec<(String, usize, u64)> = vec![
        ("started, no pod".into(), 0, scale.rss_empty_kib),
        (
            format!(
                "all pods registered and assigned ({:.1} s through the chain), idle",
                scale.register_seconds
            ),
            scale.registered,
            scale.rss_idle_kib,
        ),
        (
            format!("right after burst 1 ({} requests)", scale.requests),
            scale.registered,
            scale.rss_after_kib,
        ),
        (
            format!("{} s after burst 1", args.settle.as_secs()),
            scale.registered,
            scale.rss_settled_kib,
        ),
    ];
    for (i, kib) in scale.rss_repeated_kib.iter().enumerate() {
        rows.push((
            format!("after burst {} of the same shape (token cached)", i + 2),
            scale.registered,
            *kib,
        ));
    }
    rows.push(("peak (VmHWM)".into(), scale.registered, scale.hwm_kib));
    for (when, pods, kib) in rows {
        println!(
            "| {when} | {pods} | {:.1} {} |",
            mib(kib),
            verdict(mib(kib) <= TARGET_RSS_MIB)
        );
    }
}

fn throughput_metrics(rows: &[ThroughputRow]) -> Vec<Metric> {
    let bare = "bare responder (same netns, same redirect)";
    let mut metrics = Vec::new();
    for row in rows {
        let c = match row.connections {
            1 => "1 connection".to_owned(),
            n => format!("{n} connections"),
        };
        metrics.push(
            Metric::new(
                format!("cached-token throughput, {c}"),
                med(&row.tokend, WrkRun::rps),
                "req/s",
            )
            .peer(bare, med(&row.bare, WrkRun::rps))
            .target(Target::ratio(Bound::AtLeast(TARGET_THROUGHPUT))),
        );
        metrics.push(
            Metric::new(
                format!("cached-token p99 latency, {c}"),
                med(&row.tokend, |r| r.p99_us) / 1000.0,
                "ms",
            )
            .peer(bare, med(&row.bare, |r| r.p99_us) / 1000.0)
            .target(Target::ratio(Bound::AtMost(TARGET_P99))),
        );
        metrics.push(
            Metric::new(
                format!("server CPU per request, {c}"),
                med(&row.tokend, WrkRun::cpu_per_request),
                "µs",
            )
            .peer(bare, med(&row.bare, WrkRun::cpu_per_request)),
        );
    }
    metrics
}

fn scale_metrics(args: &Args, scale: &ScaleResult) -> Vec<Metric> {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let empty = "the same tokend started, no pod (floor)";
    let bursts = 1 + scale.rss_repeated_kib.len();
    vec![
        Metric::new(
            format!(
                "upstream calls (IMDS + Entra) for {} identical concurrent requests",
                scale.requests
            ),
            (scale.upstream_imds + scale.upstream_entra) as f64,
            "calls",
        )
        .target(Target::value(Bound::Exactly(1.0))),
        Metric::new(
            format!("200 OK among those {} requests", scale.requests),
            scale.ok as f64,
            "answers",
        )
        .target(Target::value(Bound::Exactly(scale.requests as f64))),
        Metric::new(
            format!(
                "VmRSS, {} pods registered and assigned, idle",
                scale.registered
            ),
            mib(scale.rss_idle_kib),
            "MiB",
        )
        .peer(empty, mib(scale.rss_empty_kib))
        .target(Target::value(Bound::AtMost(TARGET_RSS_MIB))),
        Metric::new(
            format!(
                "VmHWM, {} pods, after {bursts} bursts of {} × {} connections",
                scale.registered, args.pods, args.per_pod
            ),
            mib(scale.hwm_kib),
            "MiB",
        )
        .peer(empty, mib(scale.rss_empty_kib))
        .target(Target::value(Bound::AtMost(TARGET_RSS_MIB))),
    ]
}

fn verdict(met: bool) -> &'static str {
    if met { "✓" } else { "✗" }
}
