//! The nemesis: faults injected from outside the node processes on a seeded schedule (quiet
//! period, fault, heal, repeat). Every fault is bounded in time and healed before the next
//! one starts; [`heal_all`] undoes anything left at the end.
//!
//! - kill: `kill -9` of a random node, the leader, or a minority, restarted at heal;
//! - pause: SIGSTOP of a random node or the leader, SIGCONT at heal;
//! - partition: iptables rules between the nodes' loopback IPs (see [`super::netfilter`]):
//!   one node or the leader isolated, random halves, a majorities ring (every node sees a
//!   majority, no two the same one), a bridge (two halves and one node seeing both);
//! - clock-skew: libfaketime offsets of a minority of nodes' wall clocks, reset at heal;
//! - clock-rate: every node's clocks (wall and monotonic) run at their own rate for the whole
//!   run, libfaketime `x` factors within [`MAX_CLOCK_RATE_DRIFT_PPM`] of real time;
//! - churn: splits, merges, leader transfers and replica moves ([`super::churn`]).
//!
//! Churn runs on its own seeded schedule, overlapping every other fault. With `--overlap`,
//! process, network and clock faults overlap too (one schedule per class); otherwise they
//! take turns on one schedule, which keeps the cluster available more of the time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::churn::churn_once;
use super::cluster::{Cluster, ClusterError, StatusView};
use super::history::Recorder;
use super::netfilter::{Netfilter, NetfilterError};
use super::workload::WorkloadKind;
pub use spheredb_client::limits::MAX_CLOCK_RATE_DRIFT_PPM;

/// Most faults one run injects, whatever the time limit.
pub const MAX_FAULTS: usize = 10_000;
/// Largest clock offset the clock nemesis sets, in seconds either way.
pub const MAX_CLOCK_SKEW_SECS: i64 = 120;
/// Where Debian's `faketime` package puts the library.
pub const FAKETIME_LIB_PATHS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
];

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    KillRandom,
    KillLeader,
    KillMinority,
    /// A majority at once: the cluster is unavailable until the heal restarts them.
    KillMajority,
    /// Every node at once (a power cut), then all restart.
    KillAll,
    PauseRandom,
    PauseLeader,
    PartitionOne,
    PartitionLeader,
    PartitionHalves,
    PartitionRing,
    PartitionBridge,
    ClockSkew,
    /// Not injected and healed: every node's clocks run at their own rate all run long.
    ClockRate,
    Churn,
    /// Not injected and healed: all run long, every node's followers hold their applies
    /// back for [`SLOW_APPLY_HOLD_MS`], then drain them for [`SLOW_APPLY_FREE_MS`], again
    /// and again, as behind a slow disk: a follower's applied state lags its commit index,
    /// writes already acknowledged included, and a follower elected meanwhile starts with
    /// that lag. Needs a node built with failpoints.
    SlowApply,
}

/// How long a `slow-apply` hold lasts: well past an election (a few election timeouts), so
/// a follower elected while held is still behind when it starts to serve.
pub const SLOW_APPLY_HOLD_MS: u64 = 2_500;
/// How long the backlog drains between two holds.
pub const SLOW_APPLY_FREE_MS: u64 = 500;

/// The FAILPOINTS item of the `slow-apply` fault (the state machine's `ApplyStall`).
pub fn slow_apply_failpoint() -> String {
    format!("sm-apply-stall=return({SLOW_APPLY_HOLD_MS}:{SLOW_APPLY_FREE_MS})")
}

/// Faults of one class take turns; faults of different classes may overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultClass {
    Process,
    Network,
    Clock,
    Churn,
}

impl Fault {
    pub const ALL: [Fault; 16] = [
        Fault::KillRandom,
        Fault::KillLeader,
        Fault::KillMinority,
        Fault::KillMajority,
        Fault::KillAll,
        Fault::PauseRandom,
        Fault::PauseLeader,
        Fault::PartitionOne,
        Fault::PartitionLeader,
        Fault::PartitionHalves,
        Fault::PartitionRing,
        Fault::PartitionBridge,
        Fault::ClockSkew,
        Fault::ClockRate,
        Fault::Churn,
        Fault::SlowApply,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillRandom => "kill-random",
            Fault::KillLeader => "kill-leader",
            Fault::KillMinority => "kill-minority",
            Fault::KillMajority => "kill-majority",
            Fault::KillAll => "kill-all",
            Fault::PauseRandom => "pause-random",
            Fault::PauseLeader => "pause-leader",
            Fault::PartitionOne => "partition-one",
            Fault::PartitionLeader => "partition-leader",
            Fault::PartitionHalves => "partition-halves",
            Fault::PartitionRing => "partition-ring",
            Fault::PartitionBridge => "partition-bridge",
            Fault::ClockSkew => "clock-skew",
            Fault::ClockRate => "clock-rate",
            Fault::Churn => "churn",
            Fault::SlowApply => "slow-apply",
        }
    }

    pub fn class(self) -> FaultClass {
        match self {
            Fault::KillRandom
            | Fault::KillLeader
            | Fault::KillMinority
            | Fault::KillMajority
            | Fault::KillAll
            | Fault::PauseRandom
            | Fault::PauseLeader
            | Fault::SlowApply => FaultClass::Process,
            Fault::PartitionOne
            | Fault::PartitionLeader
            | Fault::PartitionHalves
            | Fault::PartitionRing
            | Fault::PartitionBridge => FaultClass::Network,
            Fault::ClockSkew | Fault::ClockRate => FaultClass::Clock,
            Fault::Churn => FaultClass::Churn,
        }
    }

    pub fn needs_netfilter(self) -> bool {
        matches!(
            self,
            Fault::PartitionOne
                | Fault::PartitionLeader
                | Fault::PartitionHalves
                | Fault::PartitionRing
                | Fault::PartitionBridge
        )
    }

    /// Whether the fault holds for the whole run instead of being injected and healed.
    pub fn whole_run(self) -> bool {
        matches!(self, Fault::ClockRate | Fault::SlowApply)
    }

    pub fn needs_faketime(self) -> bool {
        matches!(self, Fault::ClockSkew | Fault::ClockRate)
    }
}

/// Groups accepted by `--nemesis`, besides single fault names. `all` is every fault but
/// `clock-rate`, which cannot run with `clock-skew` (see [`check_compatible`]), and
/// `slow-apply`, which needs a node built with failpoints.
pub const NEMESIS_GROUPS: &[&str] = &["none", "kill", "pause", "partition", "clock", "all"];

/// Refuses fault sets that cannot run together: `clock-rate` fakes the monotonic clock (the
/// rate must reach the nodes' timers), and `clock-skew` would then make it jump backwards,
/// which no real monotonic clock does.
pub fn check_compatible(faults: &[Fault]) -> Result<(), String> {
    if faults.contains(&Fault::ClockRate) && faults.contains(&Fault::ClockSkew) {
        return Err(
            "clock-rate and clock-skew cannot run together: clock-rate fakes the \
                    monotonic clock, which a skew would make jump backwards; run them in \
                    separate tests"
                .into(),
        );
    }
    Ok(())
}

/// Parses `--nemesis`: comma-separated groups (`none`, `kill`, `pause`, `partition`,
/// `clock`, `all`) and single faults (`kill-leader`, `partition-ring`, `churn`, ...).
pub fn parse_nemesis(spec: &str) -> Result<Vec<Fault>, String> {
    let mut faults: BTreeSet<Fault> = BTreeSet::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let group: Vec<Fault> = match item {
            "none" => vec![],
            "kill" => vec![Fault::KillRandom, Fault::KillLeader, Fault::KillMinority],
            "pause" => vec![Fault::PauseRandom, Fault::PauseLeader],
            "partition" => vec![
                Fault::PartitionOne,
                Fault::PartitionLeader,
                Fault::PartitionHalves,
                Fault::PartitionRing,
                Fault::PartitionBridge,
            ],
            "clock" => vec![Fault::ClockSkew],
            "all" => Fault::ALL
                .into_iter()
                .filter(|f| !matches!(f, Fault::ClockRate | Fault::SlowApply))
                .collect(),
            name => match Fault::ALL.iter().find(|f| f.name() == name) {
                Some(f) => vec![*f],
                None => {
                    let singles: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                    return Err(format!(
                        "unknown nemesis {name:?}; use {} or one of {}",
                        NEMESIS_GROUPS.join(", "),
                        singles.join(", ")
                    ));
                }
            },
        };
        faults.extend(group);
    }
    let faults: Vec<Fault> = faults.into_iter().collect();
    check_compatible(&faults)?;
    Ok(faults)
}

/// libfaketime, or a message naming the package to install.
pub fn find_faketime() -> Result<PathBuf, String> {
    FAKETIME_LIB_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "the clock nemesis needs libfaketime, not found at {}; install the Debian \
                 package `faketime` (apt-get install faketime)",
                FAKETIME_LIB_PATHS.join(" or ")
            )
        })
}

/// A fault could not be injected or healed.
#[derive(Debug, thiserror::Error)]
pub enum NemesisError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Netfilter(#[from] NetfilterError),
    #[error("{0} needs iptables, which this run did not set up")]
    NoNetfilter(&'static str),
    #[error("a nemesis schedule stopped abnormally: {0}")]
    Panicked(String),
}

/// What the nemesis and the end of the run act on.
pub struct Shared {
    pub cluster: Mutex<Cluster>,
    pub net: Option<Netfilter>,
    pub view: StatusView,
    pub recorder: Arc<Recorder>,
}

impl Shared {
    /// The cluster, even if a panicking thread held the lock (the processes still exist and
    /// must still be controlled).
    pub fn cluster(&self) -> MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Schedule of the nemesis.
#[derive(Debug, Clone)]
pub struct NemesisConfig {
    pub faults: Vec<Fault>,
    /// Mean time between faults; each quiet period is drawn from [half, 1.5 x] of it.
    pub quiet_ms: u64,
    /// Mean fault length; each is drawn from [half, 1.5 x] of it.
    pub fault_ms: u64,
    pub seed: u64,
    /// The workload, whose keys churn splits and merges.
    pub workload: WorkloadKind,
    /// Faults of different classes (processes, network, clocks) overlap in time, each class
    /// on its own schedule; otherwise they take turns.
    pub overlap: bool,
}

/// How to undo an injected fault.
#[derive(Debug)]
enum Heal {
    Restart(Vec<usize>),
    Resume(Vec<usize>),
    Links,
    Clocks(Vec<usize>),
    /// Nothing to undo: the fault was one action, already over.
    Nothing,
}

struct Active {
    heal: Heal,
    record: usize,
}

fn around(rng: &mut StdRng, mean_ms: u64) -> u64 {
    let low = mean_ms / 2;
    let high = mean_ms.saturating_add(mean_ms / 2).max(low + 1);
    rng.random_range(low..high)
}

/// Runs faults until `deadline`, one schedule per fault class at once; returns how many were
/// injected. The faults active at the deadline are healed before returning.
pub async fn run(
    shared: Arc<Shared>,
    cfg: NemesisConfig,
    deadline: Instant,
) -> Result<usize, NemesisError> {
    let mut by_class: BTreeMap<FaultClass, Vec<Fault>> = BTreeMap::new();
    for &fault in cfg.faults.iter().filter(|f| !f.whole_run()) {
        // Without `overlap`, processes, network and clocks share one schedule; churn always
        // has its own (range changes during kills and partitions are the point of it).
        let class = match fault.class() {
            FaultClass::Churn => FaultClass::Churn,
            class if cfg.overlap => class,
            _ => FaultClass::Process,
        };
        by_class.entry(class).or_default().push(fault);
    }
    let mut schedules = tokio::task::JoinSet::new();
    for (n, faults) in by_class.into_values().enumerate() {
        // The first class keeps the run's seed, so a one-class run replays as before.
        let seed = cfg
            .seed
            .wrapping_add((n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let class_cfg = NemesisConfig {
            faults,
            seed,
            ..cfg.clone()
        };
        schedules.spawn(run_class(shared.clone(), class_cfg, deadline));
    }
    let mut injected = 0;
    let mut first_error = None;
    while let Some(result) = schedules.join_next().await {
        match result {
            Ok(Ok(n)) => injected += n,
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(NemesisError::Panicked(e.to_string()));
            }
        }
    }
    first_error.map_or(Ok(injected), Err)
}

/// One class's schedule: quiet, fault, heal, repeat.
async fn run_class(
    shared: Arc<Shared>,
    cfg: NemesisConfig,
    deadline: Instant,
) -> Result<usize, NemesisError> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut injected = 0;
    if cfg.faults.is_empty() {
        return Ok(0);
    }
    for _ in 0..MAX_FAULTS {
        let quiet = Duration::from_millis(around(&mut rng, cfg.quiet_ms));
        if Instant::now() + quiet >= deadline {
            break;
        }
        tokio::time::sleep(quiet).await;
        let fault = cfg.faults[rng.random_range(0..cfg.faults.len())];
        let active = inject(&shared, fault, cfg.workload, &mut rng).await?;
        injected += 1;
        if !matches!(active.heal, Heal::Nothing) {
            let length = Duration::from_millis(around(&mut rng, cfg.fault_ms));
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(length.min(left)).await;
        }
        heal(&shared, active)?;
    }
    Ok(injected)
}

/// The leader if the nodes name one, else a random responsive node.
async fn leader_or_random(shared: &Shared, rng: &mut StdRng) -> Option<usize> {
    let responsive = shared.cluster().responsive();
    let view = shared.view.leaders(&responsive).await;
    match view.leader.filter(|l| responsive.contains(l)) {
        Some(leader) => Some(leader),
        None if responsive.is_empty() => None,
        None => Some(responsive[rng.random_range(0..responsive.len())]),
    }
}

fn random_node(n: usize, rng: &mut StdRng) -> usize {
    rng.random_range(0..n)
}

/// A random minority: at least one node, fewer than half.
fn random_minority(n: usize, rng: &mut StdRng) -> Vec<usize> {
    let most = ((n.saturating_sub(1)) / 2).max(1);
    let size = rng.random_range(1..=most);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    order.truncate(size);
    order.sort_unstable();
    order
}

/// A random majority of `n` nodes (but not all of them when `n` > 1).
fn random_majority(n: usize, rng: &mut StdRng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    order.truncate(n / 2 + 1);
    order.sort_unstable();
    order
}

async fn inject(
    shared: &Shared,
    fault: Fault,
    workload: WorkloadKind,
    rng: &mut StdRng,
) -> Result<Active, NemesisError> {
    if fault == Fault::Churn {
        let record = shared
            .recorder
            .fault_started(fault.name(), Vec::new(), String::new());
        let addrs = shared.cluster().addrs();
        let done = churn_once(&addrs, workload, rng).await;
        println!("nemesis: churn {} {}", done.action, done.detail);
        shared.recorder.fault_done(
            record,
            done.targets,
            format!("{} {}", done.action, done.detail),
        );
        return Ok(Active {
            heal: Heal::Nothing,
            record,
        });
    }
    let n = shared.cluster().len();
    let leader = match fault {
        Fault::KillLeader | Fault::PauseLeader | Fault::PartitionLeader => {
            leader_or_random(shared, rng).await
        }
        _ => None,
    };
    let pick_one = |rng: &mut StdRng| leader.unwrap_or_else(|| random_node(n, rng));
    let (heal, targets, detail) = match fault {
        Fault::KillRandom
        | Fault::KillLeader
        | Fault::KillMinority
        | Fault::KillMajority
        | Fault::KillAll => {
            let targets = match fault {
                Fault::KillMinority => random_minority(n, rng),
                Fault::KillMajority => random_majority(n, rng),
                Fault::KillAll => (0..n).collect(),
                _ => vec![pick_one(rng)],
            };
            let mut cluster = shared.cluster();
            for &i in &targets {
                cluster.kill(i);
            }
            (Heal::Restart(targets.clone()), targets, String::new())
        }
        Fault::PauseRandom | Fault::PauseLeader => {
            let target = pick_one(rng);
            shared.cluster().pause(target);
            (Heal::Resume(vec![target]), vec![target], String::new())
        }
        Fault::PartitionOne
        | Fault::PartitionLeader
        | Fault::PartitionHalves
        | Fault::PartitionRing
        | Fault::PartitionBridge => {
            let net = shared
                .net
                .as_ref()
                .ok_or(NemesisError::NoNetfilter(fault.name()))?;
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(rng);
            let (links, targets) = match fault {
                Fault::PartitionOne | Fault::PartitionLeader => {
                    let target = pick_one(rng);
                    (isolate(target, n), vec![target])
                }
                Fault::PartitionHalves => {
                    let mut small = order[..n / 2].to_vec();
                    small.sort_unstable();
                    (halves(&order), small)
                }
                Fault::PartitionRing => (ring(&order), vec![]),
                _ => (bridge(&order), vec![order[n / 2]]),
            };
            let cluster = shared.cluster();
            let ips: Vec<_> = (0..n).map(|i| cluster.node(i).ip).collect();
            drop(cluster);
            let mut described = Vec::new();
            for &(a, b) in &links {
                net.cut(ips[a], ips[b])?;
                described.push(format!("n{}-n{}", a + 1, b + 1));
            }
            (Heal::Links, targets, format!("cut {}", described.join(" ")))
        }
        Fault::ClockRate | Fault::SlowApply | Fault::Churn => {
            unreachable!("not injected: {fault:?}")
        }
        Fault::ClockSkew => {
            let targets = random_minority(n, rng);
            let cluster = shared.cluster();
            let mut described = Vec::new();
            for &i in &targets {
                let magnitude = rng.random_range(1..=MAX_CLOCK_SKEW_SECS);
                let offset = if rng.random_bool(0.5) {
                    magnitude
                } else {
                    -magnitude
                };
                cluster.set_clock_offset(i, offset)?;
                described.push(format!("n{}{offset:+}s", i + 1));
            }
            (Heal::Clocks(targets.clone()), targets, described.join(" "))
        }
    };
    let names = shared.cluster().names(&targets);
    let record = shared
        .recorder
        .fault_started(fault.name(), names.clone(), detail.clone());
    let described = [fault.name().to_string(), names.join(","), detail.clone()];
    let described: Vec<&str> = described
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    println!("nemesis: {}", described.join(" "));
    Ok(Active { heal, record })
}

fn heal(shared: &Shared, active: Active) -> Result<(), NemesisError> {
    match active.heal {
        Heal::Restart(nodes) => {
            let mut cluster = shared.cluster();
            for i in nodes {
                cluster.restart(i)?;
            }
        }
        Heal::Resume(nodes) => {
            let mut cluster = shared.cluster();
            for i in nodes {
                cluster.resume(i);
            }
        }
        Heal::Links => {
            if let Some(net) = &shared.net {
                net.heal()?;
            }
        }
        Heal::Clocks(nodes) => {
            let cluster = shared.cluster();
            for i in nodes {
                cluster.set_clock_offset(i, 0)?;
            }
        }
        Heal::Nothing => {}
    }
    shared.recorder.fault_healed(active.record);
    Ok(())
}

/// Undoes everything: every link restored, clocks reset, paused nodes resumed, stopped or
/// crashed nodes restarted.
pub fn heal_all(shared: &Shared) -> Result<(), NemesisError> {
    if let Some(net) = &shared.net {
        net.heal()?;
    }
    let mut cluster = shared.cluster();
    cluster.reap();
    for i in 0..cluster.len() {
        cluster.set_clock_offset(i, 0)?;
        if cluster.is_paused(i) {
            cluster.resume(i);
        }
        if !cluster.is_running(i) {
            cluster.restart(i)?;
        }
    }
    Ok(())
}

/// Each node's clock rate for a `clock-rate` run: drawn from the seed within
/// [`MAX_CLOCK_RATE_DRIFT_PPM`] of real time, in the outer half of the bound, and alternately
/// fast and slow so that the fastest and slowest nodes differ by nearly twice the bound.
pub fn clock_rates(nodes: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xC10C_4A7E);
    let bound = MAX_CLOCK_RATE_DRIFT_PPM as f64 / 1_000_000.0;
    let fast_first = rng.random_bool(0.5);
    (0..nodes)
        .map(|i| {
            let drift = rng.random_range(bound / 2.0..=bound);
            if (i % 2 == 0) == fast_first {
                1.0 + drift
            } else {
                1.0 - drift
            }
        })
        .collect()
}

/// Links cutting `node` off from every other node.
pub fn isolate(node: usize, n: usize) -> Vec<(usize, usize)> {
    (0..n).filter(|&o| o != node).map(|o| (node, o)).collect()
}

/// Links between the first `n / 2` nodes of `order` and the rest.
pub fn halves(order: &[usize]) -> Vec<(usize, usize)> {
    let (small, large) = order.split_at(order.len() / 2);
    small
        .iter()
        .flat_map(|&a| large.iter().map(move |&b| (a, b)))
        .collect()
}

/// Majorities ring: nodes in `order` form a ring and each keeps links to its nearest
/// neighbours only, enough to see a majority (itself included); no two nodes see the same
/// majority. With three nodes keeping both neighbours cuts nothing, so one link is cut:
/// each end still sees a majority of two.
pub fn ring(order: &[usize]) -> Vec<(usize, usize)> {
    let n = order.len();
    if n < 3 {
        return vec![];
    }
    let majority = n / 2 + 1;
    let reach = (majority - 1).div_ceil(2);
    let mut links = Vec::new();
    for i in 0..n {
        for j in (i + 1)..n {
            let distance = (j - i).min(n - (j - i));
            if distance > reach {
                links.push((order[i], order[j]));
            }
        }
    }
    if links.is_empty() {
        links.push((order[0], order[1]));
    }
    links
}

/// Bridge: the node in the middle of `order` keeps links to everyone; the halves on either
/// side of it cannot reach each other.
pub fn bridge(order: &[usize]) -> Vec<(usize, usize)> {
    let n = order.len();
    if n < 3 {
        return vec![];
    }
    let middle = n / 2;
    let (left, right) = (&order[..middle], &order[middle + 1..]);
    left.iter()
        .flat_map(|&a| right.iter().map(move |&b| (a, b)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sees(node: usize, n: usize, links: &[(usize, usize)]) -> usize {
        (0..n)
            .filter(|&o| {
                o == node
                    || !links
                        .iter()
                        .any(|&(a, b)| (a, b) == (node, o) || (b, a) == (node, o))
            })
            .count()
    }

    #[test]
    fn a_majority_is_more_than_half_and_a_minority_less() {
        let mut rng = StdRng::seed_from_u64(7);
        for n in [3usize, 5, 7] {
            for _ in 0..20 {
                assert_eq!(random_majority(n, &mut rng).len(), n / 2 + 1, "n={n}");
                let minority = random_minority(n, &mut rng).len();
                assert!((1..=n / 2).contains(&minority), "n={n} minority={minority}");
            }
        }
    }

    #[test]
    fn clock_rates_stay_within_the_drift_bound_and_differ() {
        let bound = MAX_CLOCK_RATE_DRIFT_PPM as f64 / 1_000_000.0;
        for seed in 0..20 {
            let rates = clock_rates(5, seed);
            assert_eq!(rates.len(), 5);
            assert!(rates.iter().all(|r| (r - 1.0).abs() <= bound), "{rates:?}");
            assert!(rates.iter().any(|&r| r > 1.0) && rates.iter().any(|&r| r < 1.0));
        }
        assert_eq!(clock_rates(3, 9), clock_rates(3, 9), "seeded");
    }

    #[test]
    fn clock_rate_runs_alone_and_all_leaves_it_out() {
        assert!(parse_nemesis("clock-rate,clock-skew").is_err());
        assert!(parse_nemesis("clock-rate,kill-majority,partition,churn").is_ok());
        let all = parse_nemesis("all").expect("all parses");
        assert!(!all.contains(&Fault::ClockRate) && all.contains(&Fault::Churn));
    }

    #[test]
    fn parses_groups_and_names() {
        assert_eq!(parse_nemesis("none"), Ok(vec![]));
        assert_eq!(
            parse_nemesis("kill-leader,pause"),
            Ok(vec![
                Fault::KillLeader,
                Fault::PauseRandom,
                Fault::PauseLeader
            ])
        );
        // `all` leaves out clock-rate and slow-apply.
        assert_eq!(
            parse_nemesis("all").map(|f| f.len()),
            Ok(Fault::ALL.len() - 2)
        );
        assert_eq!(parse_nemesis("slow-apply"), Ok(vec![Fault::SlowApply]));
        assert!(parse_nemesis("meteor").unwrap_err().contains("meteor"));
    }

    #[test]
    fn ring_leaves_every_node_a_majority_but_not_the_same() {
        for n in [3usize, 5, 7] {
            let order: Vec<usize> = (0..n).rev().collect();
            let links = ring(&order);
            assert!(!links.is_empty(), "n={n}");
            for node in 0..n {
                assert!(sees(node, n, &links) > n / 2, "n={n} node={node}");
            }
        }
    }

    #[test]
    fn bridge_and_halves_split_the_cluster() {
        let order = [4, 0, 2, 1, 3];
        let links = bridge(&order);
        // Node 2 is the bridge: it sees everyone; the others see their side and the bridge.
        assert_eq!(sees(2, 5, &links), 5);
        assert_eq!(sees(4, 5, &links), 3);
        let links = halves(&order);
        assert_eq!(links.len(), 6);
        assert_eq!(sees(4, 5, &links), 2);
        assert_eq!(sees(1, 5, &links), 3);
        assert_eq!(isolate(1, 3), vec![(1, 0), (1, 2)]);
    }

    #[test]
    fn minority_is_never_a_majority() {
        let mut rng = StdRng::seed_from_u64(7);
        for n in [3usize, 5] {
            for _ in 0..50 {
                let m = random_minority(n, &mut rng);
                assert!(!m.is_empty() && m.len() <= (n - 1) / 2, "{m:?}");
            }
        }
    }
}
