//! The named suites of runs: `ci` (short runs on several seeds, what CI runs) and `long`
//! (every nemesis on 5 nodes, `make jepsen-long`). The tester's own failpoint tests run the
//! `ci` suite's runs with a failpoint added, so a bug is proved catchable with exactly the
//! settings CI uses.

use std::path::Path;

use super::nemesis::parse_nemesis;
use super::workload::WorkloadKind;
use super::{run_test, TestOptions, TestOutcome, TesterError, Validity};
use super::{EXIT_ANOMALY, EXIT_UNHEALTHY, EXIT_UNKNOWN, EXIT_VALID};

/// One run of a suite.
#[derive(Debug, Clone)]
pub struct SuiteRun {
    /// Short name, e.g. `scan-churn-3n-s1`.
    pub name: String,
    pub options: TestOptions,
}

/// Which suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    Ci,
    Long,
}

impl Suite {
    pub fn name(self) -> &'static str {
        match self {
            Suite::Ci => "ci",
            Suite::Long => "long",
        }
    }
}

/// What a run of the suite covers, for [`runs`] to build options from.
struct Spec {
    tag: &'static str,
    workload: WorkloadKind,
    nemesis: &'static str,
    nodes: usize,
    seed: u64,
    time_limit_secs: u64,
    quiet_ms: u64,
    fault_ms: u64,
    lease: bool,
    overlap: bool,
}

/// Short CI runs: seconds of workload, mean quiet time and mean fault length.
const CI_SECS: u64 = 15;
const CI_QUIET_MS: u64 = 1_500;
const CI_FAULT_MS: u64 = 3_000;
/// The lease runs are longer and denser in faults: a lease bug shows only while a deposed
/// leader is cut off, which only some partitions do.
const CI_LEASE_SECS: u64 = 25;
const CI_LEASE_QUIET_MS: u64 = 1_000;
const CI_LEASE_FAULT_MS: u64 = 2_500;
/// Long runs.
const LONG_SECS: u64 = 180;
const LONG_QUIET_MS: u64 = 4_000;
const LONG_FAULT_MS: u64 = 5_000;

fn ci_specs() -> Vec<Spec> {
    let short = |tag, workload, nemesis, nodes, seed| Spec {
        tag,
        workload,
        nemesis,
        nodes,
        seed,
        time_limit_secs: CI_SECS,
        quiet_ms: CI_QUIET_MS,
        fault_ms: CI_FAULT_MS,
        lease: false,
        overlap: false,
    };
    let lease = |nodes, seed| Spec {
        tag: "lease",
        workload: WorkloadKind::Register,
        nemesis: "clock-rate,kill-majority,partition,slow-apply",
        nodes,
        seed,
        time_limit_secs: CI_LEASE_SECS,
        quiet_ms: CI_LEASE_QUIET_MS,
        fault_ms: CI_LEASE_FAULT_MS,
        lease: true,
        overlap: false,
    };
    vec![
        // Register runs also stall apply now and then (slow-apply): reads must wait for a
        // new leader's state machine to catch up with what its predecessor acknowledged.
        short(
            "kill-partition",
            WorkloadKind::Register,
            "kill,partition,slow-apply",
            3,
            1,
        ),
        // Commit timestamps must not care about clocks or range changes either.
        short(
            "churn-clock-rate",
            WorkloadKind::Register,
            "churn,kill,partition,clock-rate,slow-apply",
            3,
            2,
        ),
        short("kill-partition", WorkloadKind::Set, "kill,partition", 3, 1),
        short("kill-partition", WorkloadKind::Set, "kill,partition", 3, 2),
        short("churn", WorkloadKind::Scan, "churn,kill,partition", 3, 1),
        // Snapshot reads at oracle timestamps and commit timestamps under clocks at their
        // own rates.
        short(
            "churn-clock-rate",
            WorkloadKind::Scan,
            "churn,kill,partition,clock-rate",
            3,
            2,
        ),
        short("churn", WorkloadKind::Scan, "churn,kill,partition", 5, 3),
        // Transactions across ranges that split, merge and move, under clocks at their own
        // rates: totals never change, no dependency cycle that snapshot isolation forbids.
        short(
            "churn-clock-rate",
            WorkloadKind::Bank,
            "churn,kill,partition,clock-rate",
            3,
            7,
        ),
        short(
            "churn",
            WorkloadKind::ListAppend,
            "churn,kill,partition",
            5,
            8,
        ),
        // Change feeds followed (and resumed from their cursors) while the ranges they
        // follow split, merge and move, leaders die, stall and are cut off, and clocks run
        // at their own rates.
        short(
            "churn-clock-rate",
            WorkloadKind::Changefeed,
            "churn,kill,pause,partition,clock-rate",
            3,
            9,
        ),
        lease(3, 4),
        lease(3, 5),
        lease(5, 6),
    ]
}

fn long_specs() -> Vec<Spec> {
    let long = |tag, workload, nemesis, seed, lease, overlap| Spec {
        tag,
        workload,
        nemesis,
        nodes: 5,
        seed,
        time_limit_secs: LONG_SECS,
        quiet_ms: LONG_QUIET_MS,
        fault_ms: LONG_FAULT_MS,
        lease,
        overlap,
    };
    vec![
        long("all", WorkloadKind::Register, "all", 1, false, false),
        long("all-overlap", WorkloadKind::Register, "all", 2, false, true),
        long("all", WorkloadKind::Set, "all", 3, false, false),
        long("all-overlap", WorkloadKind::Scan, "all", 4, false, true),
        long("all", WorkloadKind::Bank, "all", 6, false, false),
        long("all", WorkloadKind::ListAppend, "all", 7, false, false),
        long("all", WorkloadKind::Changefeed, "all", 8, false, false),
        long(
            "clock-rate",
            WorkloadKind::Changefeed,
            "clock-rate,kill,pause,partition,churn",
            9,
            false,
            false,
        ),
        long(
            "lease",
            WorkloadKind::Register,
            "clock-rate,kill,pause,partition,churn,slow-apply",
            5,
            true,
            false,
        ),
    ]
}

/// The runs of `suite` with the binary `bin`, run folders under `store`.
pub fn runs(suite: Suite, bin: &Path, store: &Path) -> Vec<SuiteRun> {
    let specs = match suite {
        Suite::Ci => ci_specs(),
        Suite::Long => long_specs(),
    };
    specs
        .into_iter()
        .map(|s| {
            let mut o = TestOptions::new(s.workload, bin.to_path_buf());
            o.store = store.to_path_buf();
            // The specs name only known faults; a typo is a bug in this file.
            o.faults = parse_nemesis(s.nemesis).unwrap_or_else(|e| panic!("suite spec: {e}"));
            o.nodes = s.nodes;
            o.seed = s.seed;
            o.time_limit_secs = s.time_limit_secs;
            o.quiet_ms = s.quiet_ms;
            o.fault_ms = s.fault_ms;
            o.overlap = s.overlap;
            if s.lease {
                o.read_consistency = spheredb_client::Consistency::Lease;
            }
            SuiteRun {
                name: format!("{}-{}-{}n-s{}", s.workload.name(), s.tag, s.nodes, s.seed),
                options: o,
            }
        })
        .collect()
}

/// One finished run of a suite.
#[derive(Debug)]
pub struct SuiteResult {
    pub name: String,
    pub outcome: Result<TestOutcome, TesterError>,
}

impl SuiteResult {
    pub fn exit_code(&self) -> u8 {
        match &self.outcome {
            Ok(o) => o.exit_code(),
            Err(_) => super::EXIT_ERROR,
        }
    }
}

/// Runs `runs` one after another; `on_done` sees each result as it comes.
pub fn run_all(runs: &[SuiteRun], mut on_done: impl FnMut(&SuiteResult)) -> Vec<SuiteResult> {
    let mut results = Vec::with_capacity(runs.len());
    for run in runs {
        let result = SuiteResult {
            name: run.name.clone(),
            outcome: run_test(&run.options),
        };
        on_done(&result);
        results.push(result);
    }
    results
}

/// The suite's exit status: an anomaly in any run first, then a sick cluster, then an
/// undecided check, then a run that could not start.
pub fn suite_exit_code(results: &[SuiteResult]) -> u8 {
    let codes: Vec<u8> = results.iter().map(SuiteResult::exit_code).collect();
    [
        EXIT_ANOMALY,
        EXIT_UNHEALTHY,
        EXIT_UNKNOWN,
        super::EXIT_ERROR,
    ]
    .into_iter()
    .find(|c| codes.contains(c))
    .unwrap_or(EXIT_VALID)
}

/// One line per run: name, verdict, operations, faults, anomalies, time, folder.
pub fn summary_table(results: &[SuiteResult]) -> Vec<String> {
    let mut lines = vec![format!(
        "{:<34} {:>9} {:>6} {:>6} {:>6} {:>5} {:>7}  folder",
        "run", "verdict", "ops", "ok", "info", "flt", "secs"
    )];
    for r in results {
        lines.push(match &r.outcome {
            Ok(o) => format!(
                "{:<34} {:>9} {:>6} {:>6} {:>6} {:>5} {:>7.1}  {}",
                r.name,
                o.label(),
                o.counts.invoked,
                o.counts.ok,
                o.counts.info,
                o.faults_injected,
                o.elapsed.as_secs_f64(),
                o.run_dir.display()
            ),
            Err(e) => format!("{:<34} {:>9}  {e}", r.name, "error"),
        });
    }
    lines
}

/// Whether a run found what a failpoint broke: an anomaly, or a cluster that fell over.
pub fn caught(outcome: &TestOutcome) -> bool {
    outcome.validity == Validity::Anomaly || !outcome.problems.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tester::nemesis::Fault;

    #[test]
    fn ci_covers_the_required_combinations_on_3_and_5_nodes() {
        let runs = runs(Suite::Ci, Path::new("spheredb"), Path::new("store"));
        let has = |workload, fault, nodes| {
            runs.iter().any(|r| {
                r.options.workload == workload
                    && r.options.faults.contains(&fault)
                    && r.options.nodes == nodes
            })
        };
        for nodes in [3, 5] {
            assert!(has(WorkloadKind::Scan, Fault::Churn, nodes));
            assert!(has(WorkloadKind::Register, Fault::ClockRate, nodes));
            assert!(has(WorkloadKind::Register, Fault::SlowApply, nodes));
        }
        assert!(has(WorkloadKind::Scan, Fault::ClockRate, 3));
        assert!(has(WorkloadKind::Bank, Fault::Churn, 3));
        assert!(has(WorkloadKind::Bank, Fault::ClockRate, 3));
        assert!(has(WorkloadKind::ListAppend, Fault::Churn, 5));
        assert!(has(WorkloadKind::Changefeed, Fault::Churn, 3));
        assert!(has(WorkloadKind::Changefeed, Fault::PauseRandom, 3));
        assert!(has(WorkloadKind::Changefeed, Fault::ClockRate, 3));
        for r in &runs {
            assert!(r.options.validate().is_ok(), "{}", r.name);
        }
        let names: std::collections::BTreeSet<_> = runs.iter().map(|r| &r.name).collect();
        assert_eq!(names.len(), runs.len(), "run names are unique");
    }

    #[test]
    fn long_runs_every_fault_on_5_nodes() {
        let runs = runs(Suite::Long, Path::new("spheredb"), Path::new("store"));
        for fault in Fault::ALL {
            assert!(
                runs.iter().any(|r| r.options.faults.contains(&fault)),
                "{fault:?}"
            );
        }
        assert!(runs.iter().all(|r| r.options.nodes == 5));
    }
}
