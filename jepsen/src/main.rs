//! Command-line entry point: `spheredb-jepsen check` reads history files,
//! checks each one, prints one result line per file and sets the exit code;
//! `spheredb-jepsen test` runs a cluster under faults and checks what it did.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use spheredb_jepsen::check::{check_events, list_append, CheckOptions, CheckReport, Verdict};
use spheredb_jepsen::model::ModelKind;
use spheredb_jepsen::parse::{load, Format};
use spheredb_jepsen::tester::nemesis::parse_nemesis;
use spheredb_jepsen::tester::suite::{self, Suite};
use spheredb_jepsen::tester::workload::WorkloadKind;
use spheredb_jepsen::tester::{self, TestOptions};

/// Every history is linearizable.
const EXIT_OK: u8 = 0;
/// At least one history is not linearizable.
const EXIT_ILLEGAL: u8 = 1;
/// No history is illegal, but at least one could not be decided within its
/// time or memory budget.
const EXIT_UNKNOWN: u8 = 2;
/// No history is illegal, but a file could not be read or parsed, or the
/// command line was wrong.
const EXIT_ERROR: u8 = 3;

/// Text shared by the top-level and `check` help.
macro_rules! exit_codes_help {
    () => {
        "\
Exit status:
  0  every history is linearizable, or legal under --consistency (ok)
  1  at least one history is not (illegal)
  2  no history is illegal, but at least one is unknown (budget exhausted)
  3  no history is illegal, but a file could not be read or parsed,
     or the command line is invalid"
    };
}

const EXIT_CODES_HELP: &str = exit_codes_help!();

const CHECK_HELP: &str = concat!(
    "\
Examples:
  spheredb-jepsen check --model cas-register --format jepsen-log etcd_*.log
  spheredb-jepsen check --model kv --format edn history.edn
  spheredb-jepsen check --model set --format jsonl --time-limit-secs 300 run.jsonl
  spheredb-jepsen check --model list-append --consistency serializable --format edn h.edn

",
    exit_codes_help!()
);

#[derive(Debug, Parser)]
#[command(
    name = "spheredb-jepsen",
    version,
    about = "Linearizability checker for Jepsen-style histories",
    after_help = EXIT_CODES_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check history files for linearizability.
    ///
    /// Prints one line per file, `<path><TAB><ok|illegal|unknown|error>`. An
    /// illegal history is followed by indented lines explaining where the
    /// search got stuck; an unknown one by the budget that ran out.
    #[command(after_help = CHECK_HELP)]
    Check(CheckArgs),
    /// Run a real cluster under a workload and faults, then check the history.
    ///
    /// Starts `spheredb start` processes on 127.0.0.11, 127.0.0.12, ... in fresh data
    /// directories, runs client workers, injects faults on a seeded schedule, heals, does
    /// final reads and checks. Writes history.jsonl, results.json, report.html and the
    /// node logs to a new folder under --store.
    #[command(after_help = TEST_HELP)]
    Test(TestArgs),
    /// Run a named suite of tests one after another and print a summary table.
    ///
    /// `ci`: short runs on several seeds (register under kill, partition and slow-apply,
    /// set under kill and partition, scan under churn, kill and partition, once with
    /// clock-rate, on 3 and 5 nodes, bank, list-append, changefeed under churn, kill, pause,
    /// partition and clock-rate, lease reads under clock-rate, kill-majority, partition and
    /// slow-apply on 3 and 5 nodes), about 8 minutes. `long`: every nemesis on 5 nodes,
    /// about 25 minutes. Exit
    /// status as for `test`, worst run first. Needs a spheredb built with failpoints
    /// (`cargo build --workspace` does) for slow-apply.
    Suite(SuiteArgs),
}

#[derive(Debug, Args)]
struct SuiteArgs {
    /// Which suite.
    #[arg(value_enum)]
    suite: SuiteArg,

    #[command(flatten)]
    target: TargetArgs,
}

/// What every run starts and where it writes, shared by `test` and `suite`.
#[derive(Debug, Args)]
struct TargetArgs {
    /// The spheredb binary.
    #[arg(long, value_name = "PATH", default_value = "target/debug/spheredb")]
    bin: PathBuf,

    /// Folder for run folders.
    #[arg(long, value_name = "DIR", default_value = "jepsen/store")]
    store: PathBuf,

    /// FAILPOINTS for every node, e.g. `kv-read-skip-barrier=return`, and for the tester's
    /// own client (`client-` ones); the binaries must be built with the failpoints (`cargo
    /// test --workspace` builds them so).
    #[arg(long, value_name = "SPEC")]
    failpoints: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SuiteArg {
    Ci,
    Long,
}

const TEST_HELP: &str = "\
Nemeses (--nemesis, comma-separated; groups or single faults):
  none
  kill       kill-random, kill-leader, kill-minority (kill -9, restarted at heal)
  (single)   kill-majority, kill-all (a majority, or every node, at once)
  pause      pause-random, pause-leader (SIGSTOP, SIGCONT at heal)
  partition  partition-one, partition-leader, partition-halves, partition-ring,
             partition-bridge (iptables; needs root and the `iptables` package)
  clock      clock-skew (libfaketime; needs the `faketime` package)
  (single)   clock-rate: every node's clocks run fast or slow, within the drift bound the
             engine states, all run long (libfaketime; not with clock-skew)
  (single)   churn: splits, merges, leader transfers and replica moves through the admin API
  (single)   slow-apply: followers hold their applies back 2.5 s, then drain them 0.5 s,
             all run long (failpoint sm-apply-stall: needs a failpoints build)
  all        every fault above but clock-rate and slow-apply

Process, network and clock faults take turns unless --overlap; churn always runs alongside.

Examples:
  spheredb-jepsen test --workload register --nemesis kill,partition --time-limit 60
  spheredb-jepsen test --workload set --nemesis kill-leader --failpoints \
      kv-write-ack-before-commit=return --time-limit 20

Exit status:
  0  the history is valid
  1  the checker found an anomaly
  2  unknown (checker budget exhausted, or no final read succeeded)
  3  the test could not run (options, missing binary, iptables or faketime)
  4  no anomaly, but the cluster misbehaved: a node panicked or exited by itself, the
     cluster did not recover after the final heal, or the nemesis or a worker died early
     (listed as `problem:` lines and in results.json)";

#[derive(Debug, Args)]
struct TestArgs {
    /// What the clients do.
    #[arg(long, value_enum, default_value_t = WorkloadArg::Register)]
    workload: WorkloadArg,

    /// Faults to inject: none, kill, pause, partition, clock, all, or single faults
    /// (kill-majority, kill-all, churn, clock-rate, slow-apply, ...).
    #[arg(long, default_value = "none")]
    nemesis: String,

    /// Cluster size (every node a voter).
    #[arg(long, default_value_t = 3)]
    nodes: usize,

    /// Seconds of workload and faults (setup, recovery and checking come on top).
    #[arg(
        long = "time-limit",
        visible_alias = "time-limit-secs",
        value_name = "SECS",
        default_value_t = 60
    )]
    time_limit_secs: u64,

    /// Concurrent client workers (register: spread over --keys keys, several per key).
    #[arg(long, default_value_t = tester::DEFAULT_CONCURRENCY)]
    concurrency: usize,

    /// Target operations per second, all workers together.
    #[arg(long = "rate", value_name = "OPS", default_value_t = tester::DEFAULT_RATE_OPS_PER_SEC)]
    rate_ops_per_sec: f64,

    /// Seed of the operation mix and of the fault schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,

    #[command(flatten)]
    target: TargetArgs,

    /// Mean quiet time between faults, in milliseconds.
    #[arg(long, default_value_t = 4_000)]
    quiet_ms: u64,

    /// Mean length of a fault, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    fault_ms: u64,

    /// Client call deadline, in milliseconds.
    #[arg(long, default_value_t = 1_500)]
    op_timeout_ms: u64,

    /// Register keys in use at a time.
    #[arg(long = "keys", default_value_t = tester::DEFAULT_KEY_COUNT)]
    key_count: usize,

    /// Operations on one register key before a fresh key replaces it.
    #[arg(long, default_value_t = tester::DEFAULT_OPS_PER_KEY)]
    ops_per_key: usize,

    /// Register values are drawn from 0..N (small, so compare-and-set contends).
    #[arg(long, value_name = "N", default_value_t = tester::DEFAULT_VALUE_DOMAIN)]
    value_domain: i64,

    /// How the clients' reads are made linearizable (`lease` asks for leader-lease reads;
    /// the nodes serve them with ReadIndex until leases are safe, see docs/architecture.md).
    #[arg(long, value_enum, default_value_t = ReadConsistencyArg::Linearizable)]
    read_consistency: ReadConsistencyArg,

    /// Node heartbeat interval, in milliseconds.
    #[arg(long, default_value_t = 50)]
    heartbeat_interval_ms: u64,

    /// Log entries between snapshots on every node (low, so that snapshots, log purges and
    /// catch-up from snapshots happen in every run).
    #[arg(long, default_value_t = tester::DEFAULT_SNAPSHOT_LOG_THRESHOLD)]
    snapshot_log_threshold: u64,

    /// Node minimum election timeout, in milliseconds.
    #[arg(long, default_value_t = 300)]
    election_timeout_ms: u64,

    /// Time budget of the linearizability check, in seconds.
    #[arg(long, default_value_t = 60)]
    check_time_limit_secs: u64,

    /// Keep the nodes' data directories (logs are always kept).
    #[arg(long)]
    keep_data: bool,

    /// Clock nemesis: jump the monotonic clock too (by default only the wall clock is
    /// skewed; a real monotonic clock never goes back).
    #[arg(long)]
    clock_monotonic: bool,

    /// Let process, network and clock faults overlap, each class on its own schedule (by
    /// default they take turns; churn always runs alongside).
    #[arg(long)]
    overlap: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ReadConsistencyArg {
    Lease,
    Linearizable,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum WorkloadArg {
    /// Compare-and-set registers, many keys, checked for linearizability per key.
    Register,
    /// Unique adds, reads of recent elements during the run and a final read: lost, stale
    /// or phantom elements.
    Set,
    /// Writes, deletes and full and partial scans over a key space split into many ranges:
    /// acknowledged keys missing from a scan, deleted or replaced values still in one.
    Scan,
    /// Transfers between accounts spread over several ranges, in transactions, and snapshot
    /// reads of every balance: the total never changes, no balance goes negative.
    Bank,
    /// Transactions of appends to and reads of short lists, checked for dependency cycles
    /// (Elle-style) against snapshot isolation.
    ListAppend,
    /// Write transactions of 1 to 3 keys across ranges, each with a unique value, while
    /// consumers follow the change feed (one ungrouped, one grouped), resuming from their
    /// last cursor every few seconds: every acknowledged write delivered, nothing failed or
    /// unwritten, nothing twice or out of order in a subscription, nothing at or below a
    /// delivered checkpoint, whole transactions in grouped mode.
    Changefeed,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Sequential specification to check against.
    #[arg(long, value_enum)]
    model: ModelArg,

    /// Format of the history files.
    #[arg(long, value_enum, default_value_t = FormatArg::Edn)]
    format: FormatArg,

    /// The isolation level a list-append history is judged against.
    #[arg(long, value_enum, default_value_t = ConsistencyArg::SnapshotIsolation)]
    consistency: ConsistencyArg,

    /// Time budget per history, in seconds; past it the answer is `unknown`. (list-append
    /// needs none: its verdicts take linear time, and its cycle searches are bounded.)
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    time_limit_secs: u64,

    /// Memory the search may use per partition, in MiB; past it the answer
    /// is `unknown`.
    #[arg(long, value_name = "MIB", default_value_t = 4096)]
    memory_limit_mib: usize,

    /// Also print, per file, the number of operations and partitions checked
    /// and the time taken.
    #[arg(short, long)]
    verbose: bool,

    /// History files to check.
    #[arg(value_name = "FILE", required = true)]
    files: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModelArg {
    /// One register, initially nil: read, write, cas [from to].
    CasRegister,
    /// String key-value store, partitioned by key: put, get, append.
    Kv,
    /// Grow-only set: add, and read of all elements.
    Set,
    /// Transactions of appends to and reads of integer lists (Elle's list-append), checked
    /// for dependency cycles against `--consistency`.
    ListAppend,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ConsistencyArg {
    /// Forbids G0, G1a, G1b, G1c and G-single; allows G2-item (write skew).
    SnapshotIsolation,
    /// Forbids G2-item too.
    Serializable,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    /// Jepsen console log: `INFO  jepsen.util - <process> :<type> :<f> <value>`.
    JepsenLog,
    /// EDN op maps, e.g. `{:process 0, :type :invoke, :f :read, :value nil}`.
    Edn,
    /// One JSON object per line, e.g. `{"process":0,"type":"ok","f":"read","value":1}`.
    Jsonl,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // --help and --version are not errors.
            let code = if err.use_stderr() {
                EXIT_ERROR
            } else {
                EXIT_OK
            };
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    let args = match cli.command {
        Command::Check(args) => args,
        Command::Test(args) => return ExitCode::from(run_test(&args)),
        Command::Suite(args) => return ExitCode::from(run_suite(&args)),
    };
    match run_check(&args) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("spheredb-jepsen: cannot write output: {err}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn run_test(args: &TestArgs) -> u8 {
    let faults = match parse_nemesis(&args.nemesis) {
        Ok(f) => f,
        Err(message) => {
            eprintln!("spheredb-jepsen: --nemesis: {message}");
            return tester::EXIT_ERROR;
        }
    };
    let workload = match args.workload {
        WorkloadArg::Register => WorkloadKind::Register,
        WorkloadArg::Set => WorkloadKind::Set,
        WorkloadArg::Scan => WorkloadKind::Scan,
        WorkloadArg::Bank => WorkloadKind::Bank,
        WorkloadArg::ListAppend => WorkloadKind::ListAppend,
        WorkloadArg::Changefeed => WorkloadKind::Changefeed,
    };
    let mut options = TestOptions::new(workload, args.target.bin.clone());
    options.faults = faults;
    options.nodes = args.nodes;
    options.time_limit_secs = args.time_limit_secs;
    options.concurrency = args.concurrency;
    options.rate_ops_per_sec = args.rate_ops_per_sec;
    options.seed = args.seed;
    options.store = args.target.store.clone();
    options.failpoints = args.target.failpoints.clone();
    options.quiet_ms = args.quiet_ms;
    options.fault_ms = args.fault_ms;
    options.op_timeout_ms = args.op_timeout_ms;
    options.key_count = args.key_count;
    options.ops_per_key = args.ops_per_key;
    options.value_domain = args.value_domain;
    options.read_consistency = match args.read_consistency {
        ReadConsistencyArg::Lease => spheredb_client::Consistency::Lease,
        ReadConsistencyArg::Linearizable => spheredb_client::Consistency::Linearizable,
    };
    options.heartbeat_interval_ms = args.heartbeat_interval_ms;
    options.election_timeout_ms = args.election_timeout_ms;
    options.snapshot_log_threshold = args.snapshot_log_threshold;
    options.check_time_limit_secs = args.check_time_limit_secs;
    options.keep_data = args.keep_data;
    options.clock_monotonic = args.clock_monotonic;
    options.overlap = args.overlap;
    match tester::run_test(&options) {
        Ok(outcome) => {
            println!("{}\t{}", outcome.run_dir.display(), outcome.label());
            for line in outcome.summary_lines() {
                println!("    {line}");
            }
            println!(
                "    report: {}",
                outcome.run_dir.join("report.html").display()
            );
            outcome.exit_code()
        }
        Err(err) => {
            eprintln!("spheredb-jepsen: {err}");
            tester::EXIT_ERROR
        }
    }
}

fn run_suite(args: &SuiteArgs) -> u8 {
    let which = match args.suite {
        SuiteArg::Ci => Suite::Ci,
        SuiteArg::Long => Suite::Long,
    };
    let mut runs = suite::runs(which, &args.target.bin, &args.target.store);
    for run in &mut runs {
        run.options.failpoints = args.target.failpoints.clone();
    }
    let total = runs.len();
    let mut done = 0;
    let results = suite::run_all(&runs, |r| {
        done += 1;
        match &r.outcome {
            Ok(o) => {
                println!("[{done}/{total}] {}: {}", r.name, o.label());
                for line in o.summary_lines() {
                    println!("    {line}");
                }
            }
            Err(e) => println!("[{done}/{total}] {}: error: {e}", r.name),
        }
    });
    println!("suite {}:", which.name());
    for line in suite::summary_table(&results) {
        println!("  {line}");
    }
    suite::suite_exit_code(&results)
}

/// `check --model list-append`: one line `<file>\t<ok|illegal|error>` per file, then the
/// anomalies the model forbids, with their evidence.
fn run_list_append_check(args: &CheckArgs, format: Format) -> io::Result<u8> {
    let consistency = match args.consistency {
        ConsistencyArg::SnapshotIsolation => list_append::Consistency::SnapshotIsolation,
        ConsistencyArg::Serializable => list_append::Consistency::Serializable,
    };
    let (mut any_illegal, mut any_error) = (false, false);
    let mut out = io::stdout().lock();
    for path in &args.files {
        let shown = path.display();
        let checked = load(format, path)
            .map_err(|e| e.to_string())
            .and_then(|events| {
                list_append::txns_from_events(&events).map_err(|e| format!("{shown}: {e}"))
            });
        let report = match checked
            .and_then(|txns| list_append::check(&txns).map_err(|e| format!("{shown}: {e}")))
        {
            Ok(report) => report,
            Err(message) => {
                any_error = true;
                writeln!(out, "{shown}\terror")?;
                out.flush()?;
                eprintln!("spheredb-jepsen: {message}");
                continue;
            }
        };
        let valid = report.valid_under(consistency);
        any_illegal |= !valid;
        writeln!(out, "{shown}\t{}", if valid { "ok" } else { "illegal" })?;
        for (anomaly, count) in &report.counts {
            let verdict = if consistency.forbids(*anomaly) {
                "forbidden"
            } else {
                "allowed"
            };
            writeln!(out, "    {anomaly}: {count} ({verdict})")?;
        }
        for finding in &report.findings {
            if args.verbose || (!valid && consistency.forbids(finding.anomaly)) {
                writeln!(out, "    {}: {}", finding.anomaly, finding.explanation)?;
            }
        }
        if args.verbose {
            writeln!(
                out,
                "    {} transactions ({} committed), {} dependency edges",
                report.txns, report.committed, report.edges
            )?;
        }
        out.flush()?;
    }
    Ok(exit_status(any_illegal, any_error, false))
}

fn run_check(args: &CheckArgs) -> io::Result<u8> {
    let format = match args.format {
        FormatArg::JepsenLog => Format::JepsenLog,
        FormatArg::Edn => Format::Edn,
        FormatArg::Jsonl => Format::Jsonl,
    };
    let model = match args.model {
        ModelArg::CasRegister => ModelKind::CasRegister,
        ModelArg::Kv => ModelKind::Kv,
        ModelArg::Set => ModelKind::Set,
        ModelArg::ListAppend => return run_list_append_check(args, format),
    };
    let options = CheckOptions {
        time_limit_ms: args.time_limit_secs.saturating_mul(1000),
        max_memo_bytes: args.memory_limit_mib.saturating_mul(1 << 20),
    };
    let (mut any_illegal, mut any_unknown, mut any_error) = (false, false, false);
    let mut out = io::stdout().lock();
    for path in &args.files {
        let shown = path.display();
        let checked = load(format, path)
            .map_err(|e| e.to_string())
            .and_then(|events| {
                check_events(model, &events, &options).map_err(|e| format!("{shown}: {e}"))
            });
        let report: CheckReport = match checked {
            Ok(report) => report,
            Err(message) => {
                any_error = true;
                writeln!(out, "{shown}\terror")?;
                out.flush()?;
                eprintln!("spheredb-jepsen: {message}");
                continue;
            }
        };
        writeln!(out, "{shown}\t{}", report.verdict.label())?;
        match &report.verdict {
            Verdict::Ok => {}
            Verdict::Illegal(explanation) => {
                any_illegal = true;
                for line in explanation.lines() {
                    writeln!(out, "    {line}")?;
                }
            }
            Verdict::Unknown(reason) => {
                any_unknown = true;
                writeln!(out, "    {reason}")?;
            }
        }
        if args.verbose {
            writeln!(
                out,
                "    {} operations in {} partitions, checked in {} ms",
                report.operations,
                report.partitions,
                report.elapsed.as_millis()
            )?;
        }
        out.flush()?;
    }
    Ok(exit_status(any_illegal, any_error, any_unknown))
}

/// The exit status of `check`: illegal first, then errors, then unknown answers.
fn exit_status(any_illegal: bool, any_error: bool, any_unknown: bool) -> u8 {
    if any_illegal {
        EXIT_ILLEGAL
    } else if any_error {
        EXIT_ERROR
    } else if any_unknown {
        EXIT_UNKNOWN
    } else {
        EXIT_OK
    }
}
