//! Runs one measurement: closed loop (C clients back to back) or open loop (a fixed arrival
//! rate, latency measured from each operation's intended start so queueing delay is counted:
//! coordinated-omission correction).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::cpu;
use crate::target::{Conn, ReadConsistency, System};
use crate::workload::{key, KeyChooser, KeyDistribution, OpKind, Workload};

/// Highest latency the histograms track (longer ones are clamped).
pub const MAX_TRACKED_LATENCY_US: u64 = 60_000_000;
/// Significant digits kept by the histograms.
pub const HISTOGRAM_PRECISION_DIGITS: u8 = 3;
/// Length of the window, right before the load starts, whose server CPU is reported as the
/// idle baseline (scaled to the measured window; shown next to the run's CPU, not subtracted).
pub const IDLE_BASELINE_MS: u64 = 2_000;

/// What to measure.
#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    pub workload: Workload,
    pub clients: usize,
    /// Total operations per second for an open loop; `None` runs closed loop.
    pub rate_ops_per_sec: Option<f64>,
    pub warmup_secs: f64,
    pub duration_secs: f64,
    pub keys: u64,
    pub value_size_bytes: usize,
    pub distribution: KeyDistribution,
    pub consistency: ReadConsistency,
    pub seed: u64,
    /// HTTP/2 connections to each node (see [`crate::target::Conn::connect`]).
    pub connections: usize,
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub system: System,
    pub workload: Workload,
    pub clients: usize,
    pub consistency: ReadConsistency,
    /// Operations of the measured window that finished within it.
    pub ops: u64,
    /// Operations of the window that finished after it (an open loop behind its schedule);
    /// their latency is in the percentiles, they are not in `ops`.
    pub late_ops: u64,
    pub errors: u64,
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    /// Server CPU over the measured window, all processes and threads.
    pub server_cpu_seconds: f64,
    /// The kernel's share of it (system time: syscalls, fsync, networking).
    pub server_system_cpu_seconds: f64,
    /// What the servers burn idle over as long (heartbeats, timers), measured before the run.
    pub server_idle_cpu_seconds: f64,
    /// The load generator's own CPU over the window.
    pub loadgen_cpu_seconds: f64,
    /// Busy share of the whole machine over the window (1.0: every core busy).
    pub machine_busy_fraction: f64,
    /// SphereDB: ranges holding user data when the run ended (load-based splits fire
    /// mid-run); `None` for etcd.
    pub range_count: Option<usize>,
    pub measured_secs: f64,
}

fn value(rng: &mut StdRng, size_bytes: usize) -> Vec<u8> {
    (0..size_bytes)
        .map(|_| rng.random_range(b'a'..=b'z'))
        .collect()
}

/// Writes every key once so reads find data.
pub async fn preload(conn: &mut Conn, cfg: &RunConfig) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x5EED);
    let pairs = (0..cfg.keys)
        .map(|i| (key(i), value(&mut rng, cfg.value_size_bytes)))
        .collect();
    conn.preload(pairs).await
}

async fn one_op(conn: &mut Conn, op: OpKind, k: &[u8], v: &[u8]) -> anyhow::Result<()> {
    match op {
        OpKind::Read => conn.get(k).await.map(|_| ()),
        OpKind::Write => conn.put(k, v).await,
        OpKind::ReadModifyWrite => {
            conn.get(k).await?;
            conn.put(k, v).await
        }
    }
}

/// Runs the workload against `conn` and reports, counting CPU of `server_pids`.
pub async fn run(
    system: System,
    conn: Conn,
    cfg: &RunConfig,
    server_pids: &[u32],
) -> anyhow::Result<RunResult> {
    anyhow::ensure!(cfg.clients > 0, "--clients must be at least 1");
    // What the servers burn doing nothing, to subtract from the run's CPU.
    let idle_started = Instant::now();
    let idle_before = cpu::total_cpu_seconds(server_pids);
    tokio::time::sleep(Duration::from_millis(IDLE_BASELINE_MS)).await;
    let idle_cpu_per_sec =
        (cpu::total_cpu_seconds(server_pids) - idle_before) / idle_started.elapsed().as_secs_f64();
    let chooser = Arc::new(KeyChooser::new(cfg.keys, cfg.distribution)?);
    let start = Instant::now();
    let warm_end = start + Duration::from_secs_f64(cfg.warmup_secs);
    let end = warm_end + Duration::from_secs_f64(cfg.duration_secs);
    let next_op = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    // Operations of the measured window that finished within it: an open loop that falls
    // behind its schedule finishes the rest late, and they must not count as throughput.
    let completed_in_window = Arc::new(AtomicU64::new(0));

    let mut tasks = Vec::new();
    for c in 0..cfg.clients {
        let (mut conn, chooser, next_op, errors, cfg) = (
            conn.clone(),
            chooser.clone(),
            next_op.clone(),
            errors.clone(),
            cfg.clone(),
        );
        let completed_in_window = completed_in_window.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(
                1,
                MAX_TRACKED_LATENCY_US,
                HISTOGRAM_PRECISION_DIGITS,
            )
            .expect("valid histogram bounds");
            let mut rng = StdRng::seed_from_u64(cfg.seed.wrapping_add(c as u64 * 7919));
            loop {
                // Open loop: take the next slot of the global schedule and wait for it.
                let intended = match cfg.rate_ops_per_sec {
                    Some(rate) => {
                        let n = next_op.fetch_add(1, Ordering::Relaxed);
                        let at = start + Duration::from_secs_f64(n as f64 / rate);
                        if at >= end {
                            break;
                        }
                        tokio::time::sleep_until(at.into()).await;
                        at
                    }
                    None => Instant::now(),
                };
                if intended >= end {
                    break;
                }
                let op = cfg.workload.next_op(&mut rng);
                let k = key(chooser.next(&mut rng));
                let v = value(&mut rng, cfg.value_size_bytes);
                let result = one_op(&mut conn, op, &k, &v).await;
                if intended >= warm_end {
                    match result {
                        Ok(()) => {
                            let us = (intended.elapsed().as_micros() as u64)
                                .clamp(1, MAX_TRACKED_LATENCY_US);
                            hist.record(us).expect("value within bounds");
                            if Instant::now() <= end {
                                completed_in_window.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            hist
        }));
    }
    tokio::time::sleep_until(warm_end.into()).await;
    let window_started = Instant::now();
    let cpu_before = cpu::total_cpu_seconds(server_pids);
    let system_before = cpu::total_user_system_seconds(server_pids).1;
    let loadgen_before = cpu::cpu_seconds(std::process::id()).unwrap_or(0.0);
    let machine_before = cpu::machine_cpu_seconds();
    // CPU is read at the end of the window, not after late operations drained.
    tokio::time::sleep_until(end.into()).await;
    let cpu_used = cpu::total_cpu_seconds(server_pids) - cpu_before;
    let server_system_cpu_seconds = cpu::total_user_system_seconds(server_pids).1 - system_before;
    let loadgen_cpu_seconds = cpu::cpu_seconds(std::process::id()).unwrap_or(0.0) - loadgen_before;
    let machine_busy_fraction = match (machine_before, cpu::machine_cpu_seconds()) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => (b1 - b0) / (t1 - t0),
        _ => 0.0,
    };
    let server_idle_cpu_seconds = idle_cpu_per_sec * window_started.elapsed().as_secs_f64();
    let mut total =
        Histogram::<u64>::new_with_bounds(1, MAX_TRACKED_LATENCY_US, HISTOGRAM_PRECISION_DIGITS)?;
    for t in tasks {
        total.add(t.await?)?;
    }
    let measured_secs = cfg.duration_secs;
    let ops = completed_in_window.load(Ordering::Relaxed);
    Ok(RunResult {
        system,
        workload: cfg.workload,
        clients: cfg.clients,
        consistency: cfg.consistency,
        ops,
        late_ops: total.len().saturating_sub(ops),
        errors: errors.load(Ordering::Relaxed),
        ops_per_sec: ops as f64 / measured_secs,
        p50_us: total.value_at_quantile(0.50),
        p95_us: total.value_at_quantile(0.95),
        p99_us: total.value_at_quantile(0.99),
        p999_us: total.value_at_quantile(0.999),
        server_cpu_seconds: cpu_used,
        server_system_cpu_seconds,
        server_idle_cpu_seconds,
        loadgen_cpu_seconds,
        machine_busy_fraction,
        range_count: None,
        measured_secs,
    })
}
