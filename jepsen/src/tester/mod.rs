//! The fault-injecting tester: starts a real cluster of `spheredb start` processes, runs a
//! client workload against it while a nemesis injects faults on a seeded schedule, heals,
//! lets the cluster recover, does final reads, and checks the history.
//!
//! ```text
//! cluster::start -> workers + nemesis until the time limit -> nemesis::heal_all
//!   -> wait for recovery -> final reads -> stop nodes -> history.jsonl -> check
//!   -> results.json + report.html
//! ```
//!
//! The changefeed workload also runs consumers of the change feed alongside the workers
//! ([`feeds`]); their final checkpoint takes the place of final reads, and what they
//! delivered goes to `feeds.jsonl` next to the history.
//!
//! Every process the tester starts is killed and every firewall rule it adds is removed when
//! the run ends, also on Ctrl-C, SIGTERM or a panic: both are owned by guards
//! ([`cluster::Cluster`], [`netfilter::Netfilter`]) that act on drop.

pub mod churn;
pub mod cluster;
pub mod feeds;
pub mod history;
pub mod nemesis;
pub mod netfilter;
pub mod report;
pub mod suite;
pub mod workload;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use spheredb_client::{Client, ClientOptions};

use crate::check::bank::check_bank;
use crate::check::changefeed;
use crate::check::list_append::{self, Consistency as TxnConsistency};
use crate::check::scan::{check_scan_history, check_set_reads};
use crate::check::set_final::check_set_final;
use crate::check::{check_events, CheckOptions, Verdict};
use crate::model::ModelKind;
use crate::parse::{parse_str, Format};
use cluster::{poll_until, ClusterConfig, ClusterError, UnexpectedExit};
use history::{count_ops, history_jsonl, op_spans, write_file, OpCounts, Recorder};
use nemesis::{Fault, NemesisConfig, NemesisError, Shared};
use netfilter::{Netfilter, NetfilterError};
use workload::{Workload, WorkloadConfig, WorkloadKind};

/// Exit status: the history is valid.
pub const EXIT_VALID: u8 = 0;
/// Exit status: the checker found an anomaly.
pub const EXIT_ANOMALY: u8 = 1;
/// Exit status: the checker could not decide (budget, or nothing was read).
pub const EXIT_UNKNOWN: u8 = 2;
/// Exit status: the test could not run (bad options, missing binary or tools).
pub const EXIT_ERROR: u8 = 3;
/// Exit status: no anomaly, but the cluster misbehaved: a node panicked or exited by itself,
/// the cluster did not recover after the final heal, or the nemesis or a worker died early.
pub const EXIT_UNHEALTHY: u8 = 4;

/// Log entries between snapshots in tester clusters (the engine's default is 100,000): a
/// run of a few thousand operations snapshots, purges its log and sends snapshots to nodes
/// that fell behind many times.
pub const DEFAULT_SNAPSHOT_LOG_THRESHOLD: u64 = 50;
/// Log entries kept behind a snapshot in tester clusters: few, so that a node back from a
/// kill or a partition often needs a snapshot rather than the log.
const LOG_KEPT_BEHIND_SNAPSHOT: u64 = 10;

/// Concurrent workers by default: with [`DEFAULT_KEY_COUNT`] keys, five on each key, as in
/// Jepsen's etcd suite.
pub const DEFAULT_CONCURRENCY: usize = 10;
/// Target operations per second by default, all workers together.
pub const DEFAULT_RATE_OPS_PER_SEC: f64 = 100.0;
/// Register keys in use at a time by default.
pub const DEFAULT_KEY_COUNT: usize = 2;
/// Operations on one register key before a fresh one replaces it, by default.
pub const DEFAULT_OPS_PER_KEY: usize = 150;
/// Register values by default: `0..5`, so compare-and-set often succeeds and often fails.
pub const DEFAULT_VALUE_DOMAIN: i64 = 5;

/// Longest the cluster may take to recover after the final heal.
pub const RECOVERY_TIMEOUT_MS: u64 = 30_000;
/// Key of the write that shows the cluster recovered; outside every workload's keys.
const PROBE_KEY: &[u8] = b"jepsen/probe";
/// Deadline of one probe write.
const PROBE_DEADLINE_MS: u64 = 2_000;
/// Most runs that may start in the same second in one store folder.
const MAX_RUN_DIR_SUFFIX: u32 = 1_000;
/// Time after the deadline the workers get to finish their last operation.
const WORKER_DRAIN_SLACK_MS: u64 = 10_000;
/// Longest time limit accepted, one day.
const MAX_TIME_LIMIT_SECS: u64 = 86_400;
/// Bounds on what one run may ask for.
const MAX_NODES: usize = 9;
const MAX_CONCURRENCY: usize = 1_000;

/// Everything a test run needs.
#[derive(Debug, Clone)]
pub struct TestOptions {
    pub workload: WorkloadKind,
    pub faults: Vec<Fault>,
    pub nodes: usize,
    pub time_limit_secs: u64,
    pub concurrency: usize,
    pub rate_ops_per_sec: f64,
    pub seed: u64,
    /// The `spheredb` binary.
    pub bin: PathBuf,
    /// Folder that gets one subfolder per run.
    pub store: PathBuf,
    /// FAILPOINTS for the nodes (needs a binary built with the `failpoints` feature).
    pub failpoints: Option<String>,
    /// Mean quiet time between faults.
    pub quiet_ms: u64,
    /// Mean fault length.
    pub fault_ms: u64,
    /// Time to let the cluster settle after the final heal, before final reads.
    pub recovery_ms: u64,
    /// Client call deadline during the run.
    pub op_timeout_ms: u64,
    pub key_count: usize,
    pub ops_per_key: usize,
    /// Register values are drawn from `0..value_domain`.
    pub value_domain: i64,
    /// `--read-consistency`: how the clients' reads are made linearizable.
    pub read_consistency: spheredb_client::Consistency,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_ms: u64,
    /// Nodes snapshot every this many log entries (low, so that snapshots, log purges and
    /// catch-up from a snapshot happen in every run).
    pub snapshot_log_threshold: u64,
    /// IP of node 1; node i gets the i-th next address.
    pub first_ip: Ipv4Addr,
    pub check_time_limit_secs: u64,
    pub check_memory_limit_mib: usize,
    /// Keep the nodes' data directories after the run (logs are always kept).
    pub keep_data: bool,
    /// Clock nemesis: skew the monotonic clock too, not only the wall clock.
    pub clock_monotonic: bool,
    /// Process, network and clock faults overlap (each class on its own schedule).
    pub overlap: bool,
}

impl TestOptions {
    /// Defaults for everything but what to run and with which binary.
    pub fn new(workload: WorkloadKind, bin: PathBuf) -> Self {
        TestOptions {
            workload,
            faults: Vec::new(),
            nodes: 3,
            time_limit_secs: 60,
            concurrency: DEFAULT_CONCURRENCY,
            rate_ops_per_sec: DEFAULT_RATE_OPS_PER_SEC,
            seed: 1,
            bin,
            store: PathBuf::from("jepsen/store"),
            failpoints: None,
            quiet_ms: 4_000,
            fault_ms: 5_000,
            recovery_ms: 3_000,
            op_timeout_ms: 1_500,
            key_count: DEFAULT_KEY_COUNT,
            ops_per_key: DEFAULT_OPS_PER_KEY,
            value_domain: DEFAULT_VALUE_DOMAIN,
            read_consistency: spheredb_client::Consistency::Linearizable,
            heartbeat_interval_ms: 50,
            election_timeout_ms: 300,
            snapshot_log_threshold: DEFAULT_SNAPSHOT_LOG_THRESHOLD,
            first_ip: Ipv4Addr::new(127, 0, 0, 11),
            check_time_limit_secs: 60,
            check_memory_limit_mib: 2_048,
            keep_data: false,
            clock_monotonic: false,
            overlap: false,
        }
    }

    fn validate(&self) -> Result<(), TesterError> {
        let bad = |m: String| Err(TesterError::Options(m));
        if !(1..=MAX_NODES).contains(&self.nodes) {
            return bad(format!(
                "--nodes must be 1..={MAX_NODES}, got {}",
                self.nodes
            ));
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return bad(format!(
                "--concurrency must be 1..={MAX_CONCURRENCY}, got {}",
                self.concurrency
            ));
        }
        if !(1..=MAX_TIME_LIMIT_SECS).contains(&self.time_limit_secs) {
            return bad(format!(
                "--time-limit must be 1..={MAX_TIME_LIMIT_SECS} seconds"
            ));
        }
        if !(self.rate_ops_per_sec.is_finite() && self.rate_ops_per_sec > 0.0) {
            return bad("--rate must be a positive number of operations per second".into());
        }
        if self.key_count == 0 || self.ops_per_key == 0 || self.value_domain <= 0 {
            return bad("--keys, --ops-per-key and --value-domain must be positive".into());
        }
        nemesis::check_compatible(&self.faults).map_err(TesterError::Options)?;
        if self.quiet_ms == 0 || self.fault_ms == 0 {
            return bad("--quiet-ms and --fault-ms must be positive".into());
        }
        let last = u32::from(self.first_ip).saturating_add(self.nodes as u32 - 1);
        if !self.first_ip.is_loopback() || !Ipv4Addr::from(last).is_loopback() {
            return bad(format!(
                "node addresses from {} must stay in 127.0.0.0/8",
                self.first_ip
            ));
        }
        Ok(())
    }

    /// Short description, e.g. `register, nemesis kill-leader, 3 nodes, seed 1`.
    pub fn title(&self) -> String {
        let nemesis = if self.faults.is_empty() {
            "none".to_string()
        } else {
            self.faults
                .iter()
                .map(|f| f.name())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut title = format!(
            "{}, nemesis {nemesis}, {} nodes, {} s, seed {}",
            self.workload.name(),
            self.nodes,
            self.time_limit_secs,
            self.seed
        );
        if self.read_consistency == spheredb_client::Consistency::Lease {
            title.push_str(", lease reads");
        }
        if self.overlap {
            title.push_str(", overlapping faults");
        }
        if let Some(fp) = &self.failpoints {
            title.push_str(&format!(", failpoints {fp}"));
        }
        title
    }
}

/// What the checker concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    Valid,
    Anomaly,
    Unknown,
}

impl Validity {
    /// `ok`, `illegal` or `unknown`, as the `check` command prints.
    pub fn label(self) -> &'static str {
        match self {
            Validity::Valid => "ok",
            Validity::Anomaly => "illegal",
            Validity::Unknown => "unknown",
        }
    }

    pub fn exit_code(self) -> u8 {
        match self {
            Validity::Valid => EXIT_VALID,
            Validity::Anomaly => EXIT_ANOMALY,
            Validity::Unknown => EXIT_UNKNOWN,
        }
    }
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct TestOutcome {
    pub validity: Validity,
    pub run_dir: PathBuf,
    pub counts: OpCounts,
    pub faults_injected: usize,
    /// The checker's explanation (anomalies, budgets) as lines.
    pub checker_lines: Vec<String>,
    pub unexpected_exits: Vec<UnexpectedExit>,
    /// What went wrong besides the checker's findings: panics in node logs, nodes that
    /// exited by themselves, a cluster that did not recover, a nemesis or worker that died.
    /// Any of them fails the run.
    pub problems: Vec<String>,
    /// Remarks that do not fail the run.
    pub notes: Vec<String>,
    pub elapsed: Duration,
}

impl TestOutcome {
    /// The process exit status: an anomaly first, then any problem, then the verdict.
    pub fn exit_code(&self) -> u8 {
        exit_code_of(self.validity, &self.problems)
    }

    /// `ok`, `illegal`, `unknown`, or `unhealthy` (no anomaly, but a problem).
    pub fn label(&self) -> &'static str {
        match self.exit_code() {
            EXIT_UNHEALTHY => "unhealthy",
            _ => self.validity.label(),
        }
    }

    /// The run in a few lines: counts, faults, time, the checker's explanation and notes.
    pub fn summary_lines(&self) -> Vec<String> {
        let c = &self.counts;
        let mut lines = vec![format!(
            "{} operations ({} ok, {} fail, {} info), {} faults, {:.1} s",
            c.invoked,
            c.ok,
            c.fail,
            c.info,
            self.faults_injected,
            self.elapsed.as_secs_f64()
        )];
        lines.extend(self.checker_lines.iter().cloned());
        lines.extend(self.problems.iter().map(|n| format!("problem: {n}")));
        lines.extend(self.notes.iter().map(|n| format!("note: {n}")));
        lines
    }
}

/// The exit status of a run with `validity` and `problems`.
fn exit_code_of(validity: Validity, problems: &[String]) -> u8 {
    match validity {
        Validity::Anomaly => EXIT_ANOMALY,
        _ if !problems.is_empty() => EXIT_UNHEALTHY,
        v => v.exit_code(),
    }
}

/// Why a run could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum TesterError {
    #[error("{0}")]
    Options(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Netfilter(#[from] NetfilterError),
    #[error(transparent)]
    Nemesis(#[from] NemesisError),
    #[error("{0}")]
    Faketime(String),
    #[error("cannot prepare the workload: {0}")]
    Setup(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("interrupted; every node was stopped and every firewall rule removed")]
    Interrupted,
    #[error("the recorded history cannot be checked: {0}")]
    Check(String),
    #[error("cannot draw the report: {0}")]
    Report(String),
}

/// Checks that the machine can run `options` (root and iptables for partitions, libfaketime
/// for clock skew) without starting anything.
pub fn preflight(options: &TestOptions) -> Result<Option<PathBuf>, TesterError> {
    options.validate()?;
    if !options.bin.is_file() {
        return Err(ClusterError::MissingBinary {
            path: options.bin.clone(),
        }
        .into());
    }
    if options.faults.iter().any(|f| f.needs_netfilter()) {
        netfilter::check_available()?;
    }
    if options.faults.iter().any(|f| f.needs_faketime()) {
        return nemesis::find_faketime()
            .map(Some)
            .map_err(TesterError::Faketime);
    }
    Ok(None)
}

/// FAILPOINTS of the nodes: the run's own, and the `slow-apply` fault's.
fn node_failpoints(options: &TestOptions) -> Option<String> {
    let slow_apply = options
        .faults
        .contains(&Fault::SlowApply)
        .then(nemesis::slow_apply_failpoint);
    match (options.failpoints.clone(), slow_apply) {
        (Some(a), Some(b)) => Some(format!("{a};{b}")),
        (a, b) => a.or(b),
    }
}

/// Civil UTC time `YYYYMMDDTHHMMSSZ` (days-from-epoch conversion, proleptic Gregorian).
fn utc_stamp(now: SystemTime) -> String {
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

fn create_run_dir(store: &Path, workload: WorkloadKind) -> Result<PathBuf, TesterError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TesterError::Io { path, source }
    };
    std::fs::create_dir_all(store).map_err(io(store))?;
    let base = format!("{}-{}", workload.name(), utc_stamp(SystemTime::now()));
    for suffix in 0..MAX_RUN_DIR_SUFFIX {
        let name = match suffix {
            0 => base.clone(),
            n => format!("{base}-{n}"),
        };
        let dir = store.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(&dir)(e)),
        }
    }
    Err(TesterError::Options(format!(
        "{}: too many runs started this second",
        store.display()
    )))
}

/// Prefix of failpoints that live in the client library, which runs in the tester's own
/// process; every other failpoint is the nodes'.
const CLIENT_FAILPOINT_PREFIX: &str = "client-";

/// The client failpoints of a run, configured in this process while it lives.
struct ClientFailpoints(Vec<String>);

impl ClientFailpoints {
    /// Configures the `client-` items of a FAILPOINTS spec (`name=actions;...`).
    fn configure(spec: Option<&str>) -> Result<Self, TesterError> {
        let mut names = Vec::new();
        for item in spec.unwrap_or_default().split(';').map(str::trim) {
            let Some((name, actions)) = item.split_once('=') else {
                continue;
            };
            if !name.starts_with(CLIENT_FAILPOINT_PREFIX) {
                continue;
            }
            if !fail::has_failpoints() {
                return Err(TesterError::Options(format!(
                    "failpoint {name} lives in the client library, which this tester was built \
                     without; build it with `cargo build -p spheredb-jepsen --features \
                     spheredb-client/failpoints` (`cargo test --workspace` does)"
                )));
            }
            fail::cfg(name, actions)
                .map_err(|e| TesterError::Options(format!("failpoint {name}={actions}: {e}")))?;
            names.push(name.to_string());
        }
        Ok(ClientFailpoints(names))
    }
}

impl Drop for ClientFailpoints {
    fn drop(&mut self) {
        for name in &self.0 {
            fail::remove(name);
        }
    }
}

/// Runs one test and writes its folder. Blocks; starts its own async runtime.
pub fn run_test(options: &TestOptions) -> Result<TestOutcome, TesterError> {
    let faketime_lib = preflight(options)?;
    let _client_failpoints = ClientFailpoints::configure(options.failpoints.as_deref())?;
    let run_dir = create_run_dir(&options.store, options.workload)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(TesterError::Runtime)?;
    let result = runtime.block_on(async {
        let interrupted = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async {
                    match term.as_mut() {
                        Some(t) => { t.recv().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => {}
            }
        };
        tokio::select! {
            result = run_inner(options, run_dir, faketime_lib) => result,
            _ = interrupted => Err(TesterError::Interrupted),
        }
    });
    // Dropping the runtime drops every task still running, and with them the last
    // references to the cluster and firewall guards, which stop the nodes and remove the
    // rules.
    drop(runtime);
    result
}

/// Waits until every node answers, all agree on a leader with every node a voter, and a
/// probe write commits (a node whose status still answers can have a stopped Raft core).
async fn wait_recovered(shared: &Shared, addrs: &[String]) -> bool {
    let nodes = addrs.len();
    let all: Vec<usize> = (0..nodes).collect();
    let options = ClientOptions {
        call_deadline_ms: PROBE_DEADLINE_MS,
        ..ClientOptions::default()
    };
    poll_until(RECOVERY_TIMEOUT_MS, || async {
        let view = shared.view.leaders(&all).await;
        if !(view.answered.len() == nodes
            && view.agreed
            && view.leader.is_some()
            && view.voters >= nodes)
        {
            return None;
        }
        let client = Client::connect(addrs, options.clone()).await.ok()?;
        client
            .put(workload::SPHERE, PROBE_KEY, b"recovered")
            .await
            .ok()
    })
    .await
    .is_some()
}

/// What a node logs when a correct cluster's invariant broke without a panic: apply refusing
/// a write its leader fixed below the range's last commit (a refused write is a clean
/// failure to the client, so no history shows it).
const BROKEN_INVARIANT_MARKERS: &[&str] = &["the leader's commit timestamps went backwards"];

/// Panics the nodes logged: a panicking task can leave a node up but useless (its Raft core
/// stopped), which no exit status shows. Also the broken invariants they logged
/// ([`BROKEN_INVARIANT_MARKERS`]).
fn panics_in_logs(run_dir: &Path, nodes: usize) -> Vec<String> {
    let mut found = Vec::new();
    for i in 1..=nodes {
        let log = run_dir.join("nodes").join(format!("n{i}.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for marker in BROKEN_INVARIANT_MARKERS {
            if let Some(n) = lines.iter().position(|l| l.contains(marker)) {
                found.push(format!(
                    "node n{i} logged a broken invariant at nodes/n{i}.log:{}: {}",
                    n + 1,
                    lines[n].trim()
                ));
            }
        }
        let panics: Vec<usize> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains("panicked at"))
            .map(|(n, _)| n)
            .collect();
        if let Some(&first) = panics.first() {
            let message = lines.get(first + 1).copied().unwrap_or_default();
            found.push(format!(
                "node n{i} logged {} panic(s); first at nodes/n{i}.log:{}: {} {}",
                panics.len(),
                first + 1,
                lines[first].trim(),
                message.trim()
            ));
        }
    }
    found
}

async fn run_inner(
    options: &TestOptions,
    run_dir: PathBuf,
    faketime_lib: Option<PathBuf>,
) -> Result<TestOutcome, TesterError> {
    let started = Instant::now();
    let mut notes: Vec<String> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let net = if options.faults.iter().any(|f| f.needs_netfilter()) {
        Some(Netfilter::install()?)
    } else {
        None
    };
    println!(
        "spheredb-jepsen: {}; starting {} nodes, output in {}",
        options.title(),
        options.nodes,
        run_dir.display()
    );
    let clock_rates = if options.faults.contains(&Fault::ClockRate) {
        nemesis::clock_rates(options.nodes, options.seed)
    } else {
        Vec::new()
    };
    let cfg = ClusterConfig {
        bin: options.bin.clone(),
        nodes: options.nodes,
        first_ip: options.first_ip,
        dir: run_dir.clone(),
        heartbeat_interval_ms: options.heartbeat_interval_ms,
        election_timeout_ms: options.election_timeout_ms,
        snapshot_log_threshold: options.snapshot_log_threshold,
        log_kept_behind_snapshot: LOG_KEPT_BEHIND_SNAPSHOT,
        failpoints: node_failpoints(options),
        faketime_lib,
        fake_monotonic: options.clock_monotonic || !clock_rates.is_empty(),
        clock_rates: clock_rates.clone(),
    };
    let (cluster, view) = cluster::start(cfg).await?;
    let addrs = cluster.addrs();
    let workload_addrs = addrs.clone();
    let recorder = Arc::new(Recorder::new());
    let shared = Arc::new(Shared {
        cluster: Mutex::new(cluster),
        net,
        view,
        recorder: recorder.clone(),
    });
    let cluster_start_ms = started.elapsed().as_millis();
    // Clock rates hold for the whole run: one fault from start to heal.
    let clock_rate_fault = (!clock_rates.is_empty()).then(|| {
        let detail: Vec<String> = clock_rates
            .iter()
            .enumerate()
            .map(|(i, r)| format!("n{} x{r:.4}", i + 1))
            .collect();
        println!("nemesis: clock-rate {}", detail.join(" "));
        let names = (1..=options.nodes).map(|i| format!("n{i}")).collect();
        recorder.fault_started(Fault::ClockRate.name(), names, detail.join(" "))
    });
    let slow_apply_fault = options.faults.contains(&Fault::SlowApply).then(|| {
        let detail = nemesis::slow_apply_failpoint();
        println!("nemesis: slow-apply {detail}");
        let names = (1..=options.nodes).map(|i| format!("n{i}")).collect();
        recorder.fault_started(Fault::SlowApply.name(), names, detail)
    });
    let deadline = Instant::now() + Duration::from_secs(options.time_limit_secs);

    let workload = Arc::new(Workload::new(
        WorkloadConfig {
            kind: options.workload,
            concurrency: options.concurrency,
            rate_ops_per_sec: options.rate_ops_per_sec,
            seed: options.seed,
            op_timeout_ms: options.op_timeout_ms,
            key_count: options.key_count,
            ops_per_key: options.ops_per_key,
            value_domain: options.value_domain,
            read_consistency: options.read_consistency,
        },
        addrs,
        recorder.clone(),
        deadline,
    ));
    let splits = workload.prepare().await.map_err(TesterError::Setup)?;
    if splits > 0 {
        println!(
            "spheredb-jepsen: key space split into {} ranges",
            splits + 1
        );
    }
    // Change-feed consumers start before any write, from a timestamp below every commit.
    let feed_consumers = match options.workload {
        WorkloadKind::Changefeed => Some(
            feeds::Consumers::start(
                workload_addrs.clone(),
                recorder.clone(),
                options.seed,
                deadline,
            )
            .await
            .map_err(TesterError::Setup)?,
        ),
        _ => None,
    };
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..options.concurrency {
        workers.spawn(workload.clone().worker(i));
    }
    let nemesis_task = tokio::spawn(nemesis::run(
        shared.clone(),
        NemesisConfig {
            faults: options.faults.clone(),
            quiet_ms: options.quiet_ms,
            fault_ms: options.fault_ms,
            seed: options.seed,
            workload: options.workload,
            overlap: options.overlap,
        },
        deadline,
    ));
    let drain_until = deadline
        + Duration::from_millis(options.op_timeout_ms.saturating_mul(2) + WORKER_DRAIN_SLACK_MS);
    let mut invoked = 0;
    // One iteration per worker, plus the one that sees none left.
    for _ in 0..=options.concurrency {
        let left = drain_until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, workers.join_next()).await {
            Ok(Some(Ok(n))) => invoked += n,
            Ok(Some(Err(e))) => problems.push(format!("a worker stopped abnormally: {e}")),
            Ok(None) => break,
            Err(_) => {
                notes.push(
                    "workers did not finish in time; their open operations count as info".into(),
                );
                workers.abort_all();
                break;
            }
        }
    }
    let faults_injected = match nemesis_task.await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            problems.push(format!("nemesis stopped early: {e}"));
            recorder.faults().len()
        }
        Err(e) => {
            problems.push(format!("nemesis stopped abnormally: {e}"));
            recorder.faults().len()
        }
    };
    println!(
        "spheredb-jepsen: {invoked} operations, {faults_injected} faults; healing and waiting for recovery"
    );
    nemesis::heal_all(&shared)?;
    if !wait_recovered(&shared, &workload_addrs).await {
        problems.push(format!(
            "the cluster did not fully recover within {RECOVERY_TIMEOUT_MS} ms after the final heal"
        ));
    }
    tokio::time::sleep(Duration::from_millis(options.recovery_ms)).await;
    let (final_reads, feed_records) = match feed_consumers {
        Some(consumers) => {
            let end = consumers.finish().await;
            notes.extend(end.notes);
            problems.extend(end.problems);
            (end.reached, Some(end.records))
        }
        None => (workload.final_reads().await, None),
    };
    // Whole-run faults hold until the nodes stop, final reads included.
    for record in [clock_rate_fault, slow_apply_fault].into_iter().flatten() {
        recorder.fault_healed(record);
    }
    let end_ns = recorder.now_ns();
    let unexpected_exits = {
        let mut cluster = shared.cluster();
        cluster.reap();
        let exits = cluster.unexpected_exits().to_vec();
        cluster.stop_all();
        if !options.keep_data {
            cluster.remove_data();
        }
        exits
    };
    for exit in &unexpected_exits {
        problems.push(format!(
            "node {} exited on its own ({}); see nodes/{}.log",
            exit.node, exit.status, exit.node
        ));
    }
    problems.extend(panics_in_logs(&run_dir, options.nodes));
    let run_ms = started.elapsed().as_millis();

    // History, check, report.
    let events = recorder.events();
    let faults = recorder.faults();
    let text = history_jsonl(&events, &faults);
    let history_path = run_dir.join("history.jsonl");
    write_file(&history_path, &text).map_err(|source| TesterError::Io {
        path: history_path.clone(),
        source,
    })?;
    let feed_text = feed_records.map(|records| changefeed::records_jsonl(&records));
    if let Some(feed_text) = &feed_text {
        let feeds_path = run_dir.join("feeds.jsonl");
        write_file(&feeds_path, feed_text).map_err(|source| TesterError::Io {
            path: feeds_path.clone(),
            source,
        })?;
    }
    let parsed = parse_str(Format::Jsonl, &text).map_err(|e| TesterError::Check(e.to_string()))?;
    let spans = op_spans(&events);
    let counts = count_ops(&spans);
    let check_started = Instant::now();
    let (mut validity, mut checker_lines, checker_json) = match options.workload {
        WorkloadKind::Register => {
            let check_options = CheckOptions {
                time_limit_ms: options.check_time_limit_secs.saturating_mul(1_000),
                max_memo_bytes: options.check_memory_limit_mib.saturating_mul(1 << 20),
            };
            let report = check_events(ModelKind::CasRegister, &parsed, &check_options)
                .map_err(|e| TesterError::Check(e.to_string()))?;
            let (validity, lines) = match &report.verdict {
                Verdict::Ok => (Validity::Valid, vec![]),
                Verdict::Illegal(explanation) => (Validity::Anomaly, explanation.lines()),
                Verdict::Unknown(reason) => (Validity::Unknown, vec![reason.to_string()]),
            };
            let json = json!({
                "model": "cas-register (one register per key)",
                "verdict": report.verdict.label(),
                "operations": report.operations,
                "partitions": report.partitions,
                "elapsed_ms": report.elapsed.as_millis(),
                "explanation": lines,
            });
            (validity, lines, json)
        }
        WorkloadKind::Scan => {
            let report = check_scan_history(&parsed).map_err(TesterError::Check)?;
            let validity = if report.anomaly_count() > 0 {
                Validity::Anomaly
            } else {
                Validity::Valid
            };
            let lines = report.lines();
            let json = json!({
                "model": "range reads against acknowledged writes and deletes, per key",
                "verdict": validity.label(),
                "reads": report.reads,
                "keys_checked": report.keys_checked,
                "missing": report.missing_count,
                "stale": report.stale_count,
                "phantom": report.phantom_count,
                "misplaced": report.misplaced_count,
                "excused_by_unknown_delete": report.excused_by_unknown_delete,
                "explanation": lines,
            });
            (validity, lines, json)
        }
        WorkloadKind::Bank => {
            let report = check_bank(
                &parsed,
                workload::BANK_ACCOUNTS as usize,
                Workload::bank_total(),
            );
            let validity = if report.anomaly_count > 0 {
                Validity::Anomaly
            } else {
                Validity::Valid
            };
            let lines = report.lines();
            let json = json!({
                "model": "bank: every snapshot read shows the same total, no balance below zero",
                "verdict": validity.label(),
                "reads": report.reads,
                "anomalies": report.anomaly_count,
                "explanation": lines,
            });
            (validity, lines, json)
        }
        WorkloadKind::ListAppend => {
            let txns = list_append::txns_from_events(&parsed).map_err(TesterError::Check)?;
            let report = list_append::check(&txns).map_err(TesterError::Check)?;
            let model = TxnConsistency::SnapshotIsolation;
            let validity = if report.valid_under(model) {
                Validity::Valid
            } else {
                Validity::Anomaly
            };
            let lines: Vec<String> = report
                .findings
                .iter()
                .filter(|f| model.forbids(f.anomaly))
                .map(|f| format!("{}: {}", f.anomaly.name(), f.explanation))
                .collect();
            let json = json!({
                "model": "list-append, snapshot isolation (Elle-style dependency cycles)",
                "verdict": validity.label(),
                "transactions": report.txns,
                "committed": report.committed,
                "edges": report.edges,
                "anomalies": report
                    .counts
                    .iter()
                    .map(|(a, n)| (a.name().to_string(), json!(n)))
                    .collect::<serde_json::Map<String, serde_json::Value>>(),
                "explanation": lines,
            });
            (validity, lines, json)
        }
        WorkloadKind::Changefeed => {
            // Checked from the file as written, so a run can be checked again from it.
            let feed_text = feed_text.as_deref().unwrap_or_default();
            let records = changefeed::parse_feed_records(feed_text).map_err(TesterError::Check)?;
            let report = changefeed::check(&parsed, &records).map_err(TesterError::Check)?;
            let validity = if report.anomaly_count() > 0 {
                Validity::Anomaly
            } else if !report.complete() {
                Validity::Unknown
            } else {
                Validity::Valid
            };
            let lines = report.lines();
            let json = json!({
                "model": "change feed: every acknowledged write delivered to every consumer, \
                          nothing failed or unwritten, once per subscription in commit order \
                          per key, nothing at or below a delivered checkpoint or the cursor \
                          resumed from, whole transactions in grouped mode",
                "verdict": validity.label(),
                "consumers": report.consumers,
                "consumers_reached_final": report.reached_final,
                "subscriptions": report.subscriptions,
                "changes": report.changes,
                "checkpoints": report.checkpoints,
                "writes_ok": report.writes_ok,
                "writes_failed": report.writes_failed,
                "writes_unknown": report.writes_unknown,
                "anomalies": report
                    .counts
                    .iter()
                    .map(|(a, n)| (a.name().to_string(), json!(n)))
                    .collect::<serde_json::Map<String, serde_json::Value>>(),
                "explanation": lines,
            });
            (validity, lines, json)
        }
        WorkloadKind::Set => {
            let report = check_set_final(&parsed);
            let during = check_set_reads(&parsed);
            let validity = match report.valid() {
                _ if during.anomaly_count() > 0 => Validity::Anomaly,
                Some(true) => Validity::Valid,
                Some(false) => Validity::Anomaly,
                None => Validity::Unknown,
            };
            let mut lines = report.lines();
            lines.extend(during.lines());
            let json = json!({
                "model": "set (final read)",
                "verdict": validity.label(),
                "final_read_size": report.final_read_size,
                "acknowledged": report.acknowledged,
                "failed": report.failed,
                "indeterminate": report.indeterminate,
                "recovered": report.recovered_count,
                "lost_count": report.lost_count,
                "lost": report.lost.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "unexpected_count": report.unexpected_count,
                "unexpected": report.unexpected.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "duplicated_count": report.duplicated_count,
                "reads_during_run": during.reads,
                "reads_during_run_anomalies": during.anomaly_count(),
                "explanation": lines,
            });
            (validity, lines, json)
        }
    };
    if validity == Validity::Valid && counts.ok == 0 {
        validity = Validity::Unknown;
        checker_lines.push("no operation succeeded, so the history shows nothing".into());
    }
    if final_reads == 0 && validity == Validity::Valid {
        validity = Validity::Unknown;
        checker_lines.push("no final read succeeded".into());
    }
    let check_ms = check_started.elapsed().as_millis();

    let results = json!({
        "title": options.title(),
        "validity": validity.label(),
        "exit_code": exit_code_of(validity, &problems),
        "options": {
            "workload": options.workload.name(),
            "nemesis": options.faults.iter().map(|f| f.name()).collect::<Vec<_>>(),
            "nodes": options.nodes,
            "time_limit_secs": options.time_limit_secs,
            "concurrency": options.concurrency,
            "rate_ops_per_sec": options.rate_ops_per_sec,
            "seed": options.seed,
            "failpoints": node_failpoints(options),
            "quiet_ms": options.quiet_ms,
            "fault_ms": options.fault_ms,
            "op_timeout_ms": options.op_timeout_ms,
            "snapshot_log_threshold": options.snapshot_log_threshold,
            "read_consistency": format!("{:?}", options.read_consistency).to_lowercase(),
            "overlap": options.overlap,
            "bin": options.bin.display().to_string(),
        },
        "ops": report::counts_json(&counts),
        "final_reads_ok": final_reads,
        "faults": report::faults_json(&faults),
        "unexpected_exits": unexpected_exits.iter().map(|e| json!({"node": e.node, "status": e.status})).collect::<Vec<_>>(),
        "checker": checker_json,
        "problems": problems,
        "notes": notes,
        "timings_ms": {
            "cluster_start": cluster_start_ms,
            "total_before_check": run_ms,
            "check": check_ms,
        },
    });
    let results_path = run_dir.join("results.json");
    let pretty = serde_json::to_string_pretty(&results).unwrap_or_else(|_| results.to_string());
    write_file(&results_path, &pretty).map_err(|source| TesterError::Io {
        path: results_path.clone(),
        source,
    })?;
    let html = report::render_html(&report::ReportInput {
        title: options.title(),
        validity: validity.label(),
        checker_lines: &checker_lines,
        counts: &counts,
        faults: &faults,
        spans: &spans,
        workers: options.concurrency,
        end_ns,
        notes: &problems
            .iter()
            .map(|p| format!("problem: {p}"))
            .chain(notes.iter().cloned())
            .collect::<Vec<_>>(),
    })
    .map_err(TesterError::Report)?;
    let report_path = run_dir.join("report.html");
    write_file(&report_path, &html).map_err(|source| TesterError::Io {
        path: report_path.clone(),
        source,
    })?;
    Ok(TestOutcome {
        validity,
        run_dir,
        counts,
        faults_injected,
        checker_lines,
        unexpected_exits,
        problems,
        notes,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101T000000Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(utc_stamp(t), "20261118T110640Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(utc_stamp(leap), "20000229T000000Z");
    }

    #[test]
    fn options_are_validated() {
        let mut o = TestOptions::new(WorkloadKind::Register, PathBuf::from("/nonexistent"));
        assert!(o.validate().is_ok());
        o.first_ip = Ipv4Addr::new(10, 0, 0, 1);
        assert!(o.validate().is_err());
        o.first_ip = Ipv4Addr::new(127, 255, 255, 254);
        assert!(o.validate().is_err(), "runs past 127/8");
        o.first_ip = Ipv4Addr::new(127, 0, 0, 11);
        o.rate_ops_per_sec = 0.0;
        assert!(o.validate().is_err());
    }
}
