//! Closed-loop clients that retry their own conflicts: each client runs one operation after
//! another for a warm-up and a measured window, runs an operation again after a conflict
//! (bounded attempts, jittered exponential backoff) and counts attempts, aborts and errors.
//! The transaction benchmarks (`transfers`, `sql`) share it so that every system they
//! compare is driven the same way.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::compare::{median, pair_ratios_cell, ratio_cell};
use crate::runner::{HISTOGRAM_PRECISION_DIGITS, MAX_TRACKED_LATENCY_US};

/// Attempts of one operation before it counts as an error.
pub const MAX_ATTEMPTS: u32 = 32;
/// Backoff between attempts: doubles from the first to the last value, jittered (the
/// values `Client::transact` uses).
pub const RETRY_BACKOFF_INITIAL_MS: u64 = spheredb_client::txn::TRANSACT_BACKOFF_INITIAL_MS;
pub const RETRY_BACKOFF_MAX_MS: u64 = spheredb_client::txn::TRANSACT_BACKOFF_MAX_MS;

/// How an attempt ended, when it did not commit.
pub enum Failure {
    /// A conflict: run the operation again.
    Conflict,
    Other(anyhow::Error),
}

/// One client's connection and what it does.
pub trait Client: Send + 'static {
    /// One operation's parameters, chosen before its first attempt and kept for its retries.
    type Op: Send + Sync;
    fn pick(&mut self, rng: &mut StdRng) -> Self::Op;
    fn attempt(&mut self, op: &Self::Op) -> impl Future<Output = Result<(), Failure>> + Send;
}

/// What the clients did in the measured window.
pub struct Totals {
    /// Operations committed within the window.
    pub done: u64,
    /// Attempts in the window, and those that ended in a conflict and were retried.
    pub attempts: u64,
    pub aborts: u64,
    /// Operations that failed for another reason or ran out of attempts.
    pub errors: u64,
    /// From an operation's first attempt to its commit, retries included.
    pub latency_us: Histogram<u64>,
}

fn jitter_ms(rng: &mut StdRng, ms: u64) -> u64 {
    ms / 2 + rng.random_range(0..=ms / 2 + 1)
}

/// Runs `clients` (each with its own seeded generator) for `warmup_secs`, then measures for
/// `duration_secs`. A client's first error other than a conflict is printed.
pub async fn run<C: Client>(
    clients: Vec<C>,
    seed: u64,
    warmup_secs: f64,
    duration_secs: f64,
) -> anyhow::Result<Totals> {
    let start = Instant::now();
    let warm_end = start + Duration::from_secs_f64(warmup_secs);
    let end = warm_end + Duration::from_secs_f64(duration_secs);
    let done = Arc::new(AtomicU64::new(0));
    let attempts = Arc::new(AtomicU64::new(0));
    let aborts = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (c, mut client) in clients.into_iter().enumerate() {
        let (done, attempts, aborts, errors) = (
            done.clone(),
            attempts.clone(),
            aborts.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(
                1,
                MAX_TRACKED_LATENCY_US,
                HISTOGRAM_PRECISION_DIGITS,
            )
            .expect("valid histogram bounds");
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(c as u64 * 7919));
            // Backoff jitter from its own generator, so that conflicts do not change which
            // operations a client makes: every system gets the same sequence.
            let mut jitter_rng = StdRng::seed_from_u64(!seed.wrapping_add(c as u64));
            let mut first_error = None;
            while Instant::now() < end {
                let began = Instant::now();
                let measured = began >= warm_end;
                let op = client.pick(&mut rng);
                let mut backoff_ms = RETRY_BACKOFF_INITIAL_MS;
                let mut committed = false;
                for _ in 0..MAX_ATTEMPTS {
                    let outcome = client.attempt(&op).await;
                    if measured {
                        attempts.fetch_add(1, Ordering::Relaxed);
                    }
                    match outcome {
                        Ok(()) => {
                            committed = true;
                            break;
                        }
                        Err(Failure::Conflict) => {
                            if measured {
                                aborts.fetch_add(1, Ordering::Relaxed);
                            }
                            let ms = jitter_ms(&mut jitter_rng, backoff_ms);
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            backoff_ms = (backoff_ms * 2).min(RETRY_BACKOFF_MAX_MS);
                        }
                        Err(Failure::Other(e)) => {
                            first_error.get_or_insert(e);
                            break;
                        }
                    }
                }
                if !measured {
                    continue;
                }
                if committed {
                    // Operations that end after the window count neither way.
                    if Instant::now() <= end {
                        done.fetch_add(1, Ordering::Relaxed);
                        let us =
                            (began.elapsed().as_micros() as u64).clamp(1, MAX_TRACKED_LATENCY_US);
                        hist.record(us).expect("value within bounds");
                    }
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            (hist, first_error)
        }));
    }
    let mut latency_us =
        Histogram::<u64>::new_with_bounds(1, MAX_TRACKED_LATENCY_US, HISTOGRAM_PRECISION_DIGITS)?;
    for t in tasks {
        let (hist, first_error) = t.await?;
        latency_us.add(hist)?;
        if let Some(e) = first_error {
            eprintln!("    a client's first error: {e:#}");
        }
    }
    Ok(Totals {
        done: done.load(Ordering::Relaxed),
        attempts: attempts.load(Ordering::Relaxed),
        aborts: aborts.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        latency_us,
    })
}

/// Checks a sweep's arguments: at least one pair, a positive window, a warm-up of zero or
/// more seconds, and client counts from 1 to what PostgreSQL's connections allow with
/// `reserved` kept for setup.
pub fn check_sweep(
    clients: &[usize],
    pairs: usize,
    duration_secs: f64,
    warmup_secs: f64,
    reserved: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(pairs > 0, "--pairs must be at least 1");
    anyhow::ensure!(
        duration_secs.is_finite() && duration_secs > 0.0,
        "--duration-secs must be a positive number of seconds"
    );
    anyhow::ensure!(
        warmup_secs.is_finite() && warmup_secs >= 0.0,
        "--warmup-secs must be zero or more seconds"
    );
    let most = crate::postgres::PG_MAX_CONNECTIONS - reserved;
    anyhow::ensure!(
        clients.iter().all(|c| (1..=most).contains(c)),
        "--clients must be 1 to {most} (PostgreSQL's connections, {reserved} kept for setup)"
    );
    Ok(())
}

/// What one closed-loop run measured, as a report needs it.
pub trait Measured {
    /// Operations committed per second of the measured window.
    fn throughput(&self) -> f64;
    fn attempts(&self) -> u64;
    fn aborts(&self) -> u64;
    fn errors(&self) -> u64;
    fn p50_us(&self) -> u64;
    fn p99_us(&self) -> u64;

    /// The share of attempts that ended in a conflict.
    fn abort_rate(&self) -> f64 {
        if self.attempts() == 0 {
            0.0
        } else {
            self.aborts() as f64 / self.attempts() as f64
        }
    }

    /// The run's progress line.
    fn summary(&self, unit: &str) -> String {
        format!(
            "{:.0} {unit}/s  p50 {} us  p99 {} us  aborts {:.1} % of {} attempts  errors {}",
            self.throughput(),
            self.p50_us(),
            self.p99_us(),
            self.abort_rate() * 100.0,
            self.attempts(),
            self.errors()
        )
    }
}

/// One point of a sweep (a system at a client count): medians over its pairs, and its
/// throughput over PostgreSQL's in each pair.
#[derive(Debug, serde::Serialize)]
pub struct Point {
    /// Reported under the benchmark's own name (`ops_per_sec`, `transfers_per_sec`).
    #[serde(skip)]
    pub throughput: f64,
    /// Throughput over PostgreSQL's in the same pairs (median); `None` for PostgreSQL
    /// itself or without it.
    pub ratio_vs_postgres: Option<f64>,
    pub pair_ratios_vs_postgres: Vec<f64>,
    pub p50_us: u64,
    pub p99_us: u64,
    pub abort_rate: f64,
    pub errors: u64,
}

impl Point {
    /// The point of `runs` ((pair, result) of one system at one client count), with ratios
    /// against `baseline`, PostgreSQL's runs of the same point (`None` for PostgreSQL's own).
    pub fn of<R: Measured>(runs: &[&(usize, R)], baseline: Option<&[&(usize, R)]>) -> Point {
        let med = |f: &dyn Fn(&R) -> f64| median(runs.iter().map(|(_, r)| f(r)).collect());
        let pair_ratios = baseline.map_or_else(Vec::new, |base| pair_ratios(runs, base));
        Point {
            throughput: med(&|r| r.throughput()),
            ratio_vs_postgres: (!pair_ratios.is_empty()).then(|| median(pair_ratios.clone())),
            pair_ratios_vs_postgres: pair_ratios,
            p50_us: med(&|r| r.p50_us() as f64) as u64,
            p99_us: med(&|r| r.p99_us() as f64) as u64,
            abort_rate: med(&|r| r.abort_rate()),
            errors: runs.iter().map(|(_, r)| r.errors()).sum(),
        }
    }

    /// The report's Markdown cells for the point: throughput, ratio, per-pair ratios,
    /// p50 / p99 ms, abort rate, errors.
    pub fn cells(&self) -> String {
        format!(
            "{:.0} | {} | {} | {:.2} / {:.2} | {:.1} % | {}",
            self.throughput,
            ratio_cell(self.ratio_vs_postgres),
            pair_ratios_cell(&self.pair_ratios_vs_postgres),
            self.p50_us as f64 / 1000.0,
            self.p99_us as f64 / 1000.0,
            self.abort_rate * 100.0,
            self.errors,
        )
    }
}

/// Throughput over the baseline's in the same pair, for every pair both ran (`runs` and
/// `baseline` are (pair, result) of one point).
fn pair_ratios<R: Measured>(runs: &[&(usize, R)], baseline: &[&(usize, R)]) -> Vec<f64> {
    runs.iter()
        .filter_map(|(pair, r)| {
            let (_, base) = baseline.iter().find(|(p, _)| p == pair)?;
            (base.throughput() > 0.0).then(|| r.throughput() / base.throughput())
        })
        .collect()
}

/// Writes a report: `<name>.md` and `<name>.json` in `out_dir`.
pub fn write_report(
    out_dir: &std::path::Path,
    name: &str,
    md: &str,
    json: &serde_json::Value,
) -> anyhow::Result<()> {
    std::fs::write(out_dir.join(format!("{name}.md")), md)?;
    std::fs::write(
        out_dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(json)?,
    )?;
    Ok(())
}

/// Implements [`Measured`] for a run's result struct with `attempts`, `aborts`, `errors`,
/// `p50_us` and `p99_us` fields and its throughput in the field named.
macro_rules! measured {
    ($result:ty, $throughput:ident) => {
        impl $crate::closed_loop::Measured for $result {
            fn throughput(&self) -> f64 {
                self.$throughput
            }
            fn attempts(&self) -> u64 {
                self.attempts
            }
            fn aborts(&self) -> u64 {
                self.aborts
            }
            fn errors(&self) -> u64 {
                self.errors
            }
            fn p50_us(&self) -> u64 {
                self.p50_us
            }
            fn p99_us(&self) -> u64 {
                self.p99_us
            }
        }
    };
}
pub(crate) use measured;
