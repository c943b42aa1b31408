//! `controller-bench`: podid-controller at scale against the fake API server in its own
//! process. 100 namespaces × 10 identities with one binding each, 10,000 scheduled pods over 100
//! nodes each labelled for one binding of its namespace, created before the controller starts;
//! then the time from controller start to all assignments Assigned (and the API requests/s it
//! took), the latency from one new pod to its assignment once converged (100 pods, one at a
//! time), and the controller's peak RSS. Prints one markdown table; `--json <file>` also writes
//! the results for `bench-report`, with floors measured in the same run: the bench's own
//! seeding of the objects through the same API server, and the round trip of a pod create.
//!
//! `cargo run --release -p podid-tests --bin controller-bench`

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, ResourceExt as _};
use podid_api::crd::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec,
    AzureIdentitySpec, BINDING_LABEL, assignment_name,
};
use podid_tests::bench::{BenchResult, Bound, Metric, Target};
use podid_tests::bins;
use podid_tests::fakeapi::StatsSnapshot;
use tokio::sync::Notify;

const COMMAND: &str = "cargo run --release -p podid-tests --bin controller-bench";
/// Creations in flight while seeding the cluster.
const SEED_CONCURRENCY: usize = 64;
/// Targets: controller start → every assignment Assigned; new pod → its assignment, median;
/// the controller's peak RSS.
const TARGET_CONVERGE_S: f64 = 30.0;
const TARGET_NEW_POD_MS: f64 = 50.0;
const TARGET_RSS_MIB: f64 = 150.0;

#[derive(Debug, Parser)]
#[command(about = "podid-controller at scale against the fake API server")]
struct Args {
    #[arg(long, default_value_t = 100)]
    namespaces: usize,
    #[arg(long, default_value_t = 10)]
    identities_per_namespace: usize,
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// New pods created one at a time once converged.
    #[arg(long, default_value_t = 100)]
    latency_samples: usize,
    /// Where the fake API server's and the controller's logs go (default: a temporary dir).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Also write the results there as JSON (for `bench-report`).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// When each assignment was first seen Assigned, by `namespace/name`.
#[derive(Default)]
struct Seen {
    at: Mutex<HashMap<String, Instant>>,
    changed: Notify,
}

impl Seen {
    fn count(&self) -> usize {
        self.at.lock().map(|m| m.len()).unwrap_or(0)
    }

    fn get(&self, key: &str) -> Option<Instant> {
        self.at.lock().ok().and_then(|m| m.get(key).copied())
    }

    async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Self) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if done(self) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "timed out after {timeout:?} waiting for {what} ({} assignments seen)",
                    self.count()
                );
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_fake(binary: &Path, kubeconfig: &Path, logs: &Path) -> Result<(Process, String)> {
    let mut child = Command::new(binary)
        .args([
            "--port",
            "0",
            "--kubeconfig",
            &kubeconfig.display().to_string(),
        ])
        // the controller's first list and its writes stay resumable from the history
        .args(["--history", "400000"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(logs.join("fake-apiserver.log"))?)
        .spawn()
        .context("starting fake-apiserver")?;
    let stdout = child.stdout.take().context("fake-apiserver stdout")?;
    let process = Process(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading fake-apiserver's first line")?;
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .with_context(|| format!("unexpected first line from fake-apiserver: {line:?}"))?
        .to_owned();
    Ok((process, url))
}

async fn stats(url: &str) -> Result<StatsSnapshot> {
    let addr = url.trim_start_matches("http://").to_owned();
    let response = tokio::task::spawn_blocking(move || {
        podid_tests::http::tcp(&addr, &podid_tests::http::Request::get("/fake/stats"))
    })
    .await??;
    Ok(serde_json::from_value(response.json()?)?)
}

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(ns.into()),
        ..Default::default()
    }
}

fn bench_pod(ns: &str, name: &str, selector: &str, node: &str) -> Pod {
    let mut metadata = meta(ns, name);
    metadata.labels = Some(BTreeMap::from([
        (BINDING_LABEL.to_owned(), selector.to_owned()),
        ("app".to_owned(), "bench".to_owned()),
    ]));
    Pod {
        metadata,
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some("registry.k8s.io/pause:3.10".into()),
                ..Default::default()
            }],
            node_name: Some(node.into()),
            ..Default::default()
        }),
        status: None,
    }
}

async fn seed(client: &Client, args: &Args) -> Result<()> {
    let configs = (0..args.namespaces * args.identities_per_namespace).map(|i| {
        let client = client.clone();
        let ns = format!("ns-{}", i / args.identities_per_namespace);
        let k = i % args.identities_per_namespace;
        async move {
            let identity = AzureIdentity {
                metadata: meta(&ns, &format!("id-{k}")),
                spec: AzureIdentitySpec {
                    client_id: Some(format!("00000000-0000-0000-0000-{i:012}")),
                    resource_id: Some(format!(
                        "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{ns}-id-{k}"
                    )),
                    ..Default::default()
                },
                status: None,
            };
            Api::<AzureIdentity>::namespaced(client.clone(), &ns)
                .create(&PostParams::default(), &identity)
                .await?;
            let binding = AzureIdentityBinding {
                metadata: meta(&ns, &format!("binding-{k}")),
                spec: AzureIdentityBindingSpec {
                    azure_identity: Some(format!("id-{k}")),
                    selector: Some(format!("sel-{k}")),
                    weight: None,
                },
                status: None,
            };
            Api::<AzureIdentityBinding>::namespaced(client, &ns)
                .create(&PostParams::default(), &binding)
                .await?;
            Ok::<_, kube::Error>(())
        }
    });
    futures::stream::iter(configs)
        .buffer_unordered(SEED_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .context("creating identities and bindings")?;

    let per_namespace = args.pods / args.namespaces;
    let pods = (0..args.pods).map(|i| {
        let client = client.clone();
        let ns = format!("ns-{}", (i / per_namespace.max(1)).min(args.namespaces - 1));
        let selector = format!("sel-{}", i % args.identities_per_namespace);
        let node = format!("node-{}", i % args.nodes);
        async move {
            Api::<Pod>::namespaced(client, &ns)
                .create(
                    &PostParams::default(),
                    &bench_pod(&ns, &format!("pod-{i}"), &selector, &node),
                )
                .await
                .map(|_| ())
        }
    });
    futures::stream::iter(pods)
        .buffer_unordered(SEED_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .context("creating pods")?;
    Ok(())
}

/// Records every assignment the first time it is seen Assigned.
fn watch_assignments(client: Client, seen: Arc<Seen>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let api: Api<AzureAssignedIdentity> = Api::all(client);
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects();
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            let Ok(aai) = item else { continue };
            if aai.status.as_ref().and_then(|s| s.status.as_deref()) != Some("Assigned") {
                continue;
            }
            let key = format!("{}/{}", aai.namespace().unwrap_or_default(), aai.name_any());
            if let Ok(mut at) = seen.at.lock() {
                at.entry(key).or_insert_with(Instant::now);
            }
            seen.changed.notify_waiters();
        }
    })
}

fn vm_hwm_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("reading /proc/<pid>/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/<pid>/status")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Row {
    metric: String,
    value: String,
    target: String,
    met: Option<bool>,
}

#[allow(clippy::print_stdout)] // the report is this program's output
fn print_table(rows: &[Row]) {
    println!("| metric | value | target | met |");
    println!("|---|---|---|---|");
    for r in rows {
        let met = match r.met {
            Some(true) => "met",
            Some(false) => "not met",
            None => "—",
        };
        println!("| {} | {} | {} | {} |", r.metric, r.value, r.target, met);
    }
    println!();
    println!("command: `{COMMAND}`");
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    if args.namespaces == 0
        || args.identities_per_namespace == 0
        || args.nodes == 0
        || args.pods < args.namespaces
    {
        bail!(
            "--namespaces, --identities-per-namespace and --nodes must be positive, --pods at least --namespaces"
        );
    }
    let temp = tempfile::tempdir().context("temporary directory")?;
    let logs = args
        .log_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&logs)?;
    eprintln!("building fake-apiserver and podid-controller (release)...");
    let fake_binary = bins::build_release("podid-tests", "fake-apiserver")?;
    let controller_binary = bins::controller()?;

    let kubeconfig = temp.path().join("kubeconfig");
    let (_fake, url) = start_fake(&fake_binary, &kubeconfig, &logs)?;
    let client = Client::try_from(kube::Config::new(
        url.parse().context("fake-apiserver URL")?,
    ))?;

    eprintln!(
        "seeding {} namespaces x {} identities and bindings, {} pods on {} nodes...",
        args.namespaces, args.identities_per_namespace, args.pods, args.nodes
    );
    let seeding = Instant::now();
    seed(&client, &args).await?;
    let seeded = seeding.elapsed();
    eprintln!("seeded in {seeded:.1?}");

    let seen = Arc::new(Seen::default());
    let watch = watch_assignments(client.clone(), Arc::clone(&seen));

    let health_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let before = stats(&url).await?;
    let started = Instant::now();
    let child = Command::new(&controller_binary)
        .args(["--kubeconfig", &kubeconfig.display().to_string()])
        .args([
            "--holder-identity",
            "bench",
            "--lease-namespace",
            "podid-system",
        ])
        .args(["--health-addr", &format!("127.0.0.1:{health_port}")])
        .env("PODID_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(logs.join("podid-controller.log"))?)
        .spawn()
        .context("starting podid-controller")?;
    let pid = child.id();
    let _controller = Process(child);

    let total = args.pods;
    seen.wait_for("every assignment Assigned", Duration::from_secs(300), |s| {
        s.count() >= total
    })
    .await?;
    let converged = started.elapsed();
    let after = stats(&url).await?;
    let requests = after.requests - before.requests;
    let rps = requests as f64 / converged.as_secs_f64();
    let by_verb: Vec<String> = after
        .by_verb
        .iter()
        .filter_map(|(verb, n)| {
            let d = n - before.verb(verb);
            (d > 0).then(|| format!("{verb} {d}"))
        })
        .collect();
    eprintln!(
        "converged in {converged:.2?}: {requests} requests ({})",
        by_verb.join(", ")
    );

    // let the conditions and events of the first wave finish before measuring single pods
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut latencies = Vec::with_capacity(args.latency_samples);
    // The API server's own part of each sample: the create's round trip.
    let mut creates = Vec::with_capacity(args.latency_samples);
    for i in 0..args.latency_samples {
        let ns = format!("ns-{}", i % args.namespaces);
        let name = format!("late-{i}");
        let selector_index = i % args.identities_per_namespace;
        let t0 = Instant::now();
        let created = Api::<Pod>::namespaced(client.clone(), &ns)
            .create(
                &PostParams::default(),
                &bench_pod(
                    &ns,
                    &name,
                    &format!("sel-{selector_index}"),
                    &format!("node-{}", i % args.nodes),
                ),
            )
            .await
            .with_context(|| format!("creating {ns}/{name}"))?;
        creates.push(t0.elapsed());
        let uid = created.uid().context("created pod has no uid")?;
        let key = format!(
            "{ns}/{}",
            assignment_name(&name, &uid, &ns, &format!("id-{selector_index}"))
        );
        seen.wait_for(&key, Duration::from_secs(10), |s| s.get(&key).is_some())
            .await?;
        let at = seen.get(&key).unwrap_or_else(Instant::now);
        latencies.push(at.saturating_duration_since(t0));
    }
    latencies.sort();
    creates.sort();
    let median = percentile(&latencies, 50.0);
    let p90 = percentile(&latencies, 90.0);
    let rss_kib = vm_hwm_kib(pid)?;
    let rss_mib = rss_kib as f64 / 1024.0;
    watch.abort();

    let rows = vec![
        Row {
            metric: format!("controller start → all {total} assignments Assigned"),
            value: format!("{:.2} s", converged.as_secs_f64()),
            target: format!("≤ {TARGET_CONVERGE_S} s"),
            met: Some(converged.as_secs_f64() <= TARGET_CONVERGE_S),
        },
        Row {
            metric: "API requests during convergence".into(),
            value: format!("{requests} ({rps:.0} req/s; {})", by_verb.join(", ")),
            target: "—".into(),
            met: None,
        },
        Row {
            metric: format!(
                "new pod → its assignment Assigned, median of {}",
                latencies.len()
            ),
            value: format!("{:.1} ms", median.as_secs_f64() * 1000.0),
            target: format!("≤ {TARGET_NEW_POD_MS} ms"),
            met: Some(median.as_secs_f64() * 1000.0 <= TARGET_NEW_POD_MS),
        },
        Row {
            metric: "new pod → its assignment Assigned, p90".into(),
            value: format!("{:.1} ms", p90.as_secs_f64() * 1000.0),
            target: "—".into(),
            met: None,
        },
        Row {
            metric: "controller peak RSS (VmHWM)".into(),
            value: format!("{rss_mib:.1} MiB"),
            target: format!("≤ {TARGET_RSS_MIB} MiB"),
            met: Some(rss_mib <= TARGET_RSS_MIB),
        },
    ];
    print_table(&rows);
    if let Some(path) = &args.json {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let configs = args.namespaces * args.identities_per_namespace;
        let seeding_floor = format!(
            "the bench creating the {configs} identities + bindings and {total} pods, {SEED_CONCURRENCY} in flight (floor)"
        );
        let metrics = vec![
            Metric::new(
                format!("controller start → all {total} assignments Assigned"),
                converged.as_secs_f64(),
                "s",
            )
            .peer(seeding_floor, seeded.as_secs_f64())
            .target(Target::value(Bound::AtMost(TARGET_CONVERGE_S))),
            Metric::new(
                "API requests during convergence",
                requests as f64,
                "requests",
            ),
            Metric::new(
                format!(
                    "new pod → its assignment Assigned, median of {}",
                    latencies.len()
                ),
                ms(median),
                "ms",
            )
            .peer(
                "the pod create's round trip (floor)",
                ms(percentile(&creates, 50.0)),
            )
            .target(Target::value(Bound::AtMost(TARGET_NEW_POD_MS))),
            Metric::new("new pod → its assignment Assigned, p90", ms(p90), "ms").peer(
                "the pod create's round trip (floor)",
                ms(percentile(&creates, 90.0)),
            ),
            Metric::new("controller peak RSS (VmHWM)", rss_mib, "MiB")
                .target(Target::value(Bound::AtMost(TARGET_RSS_MIB))),
        ];
        BenchResult::new("controller-bench", metrics).write(path)?;
    }
    Ok(())
}
