//! `spheredb-bench tso`: the timestamp oracle's own throughput, and the latency it adds,
//! beside the peer every transaction pays anyway: a single-key write, on the same cluster
//! in the same run. Closed loop: each client asks for one timestamp (or writes one key) at a
//! time; the client library shares one `GetTimestamps` call among every caller waiting.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use spheredb_client::{Client, ClientOptions};

use crate::target::{self, System, BENCH_SPHERE};

/// Most latency one histogram records (larger samples are clamped), in µs.
const MAX_RECORDED_LATENCY_US: u64 = 60_000_000;

pub struct TsoConfig {
    pub clients: Vec<usize>,
    pub duration_secs: f64,
    pub warmup_secs: f64,
    pub spheredb_bin: PathBuf,
}

/// One measured loop: operations per second and latency percentiles.
struct Measured {
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

#[derive(Clone, Copy)]
enum Op {
    Timestamp,
    Put,
}

/// Runs every client count on one fresh 3-node cluster; returns a Markdown table.
pub async fn run(cfg: &TsoConfig) -> anyhow::Result<String> {
    anyhow::ensure!(!cfg.clients.is_empty(), "--clients names no client count");
    let cluster = target::start_spheredb(&cfg.spheredb_bin, 3, System::Spheredb).await?;
    let client = Client::connect(&cluster.endpoints, ClientOptions::default()).await?;
    let mut md = String::from(
        "| clients | timestamps/s | timestamp p50 / p99 ms | puts/s | put p50 / p99 ms | timestamp p50 ÷ put p50 |\n\
         |---:|---:|---:|---:|---:|---:|\n",
    );
    for &clients in &cfg.clients {
        eprintln!("tso: {clients} clients");
        let ts = measure(&client, Op::Timestamp, clients, cfg).await?;
        let put = measure(&client, Op::Put, clients, cfg).await?;
        anyhow::ensure!(
            ts.errors == 0 && put.errors == 0,
            "{} timestamp and {} write errors at {clients} clients",
            ts.errors,
            put.errors
        );
        md.push_str(&format!(
            "| {clients} | {:.0} | {:.2} / {:.2} | {:.0} | {:.2} / {:.2} | {:.2} |\n",
            ts.ops_per_sec,
            ts.p50_ms,
            ts.p99_ms,
            put.ops_per_sec,
            put.p50_ms,
            put.p99_ms,
            ts.p50_ms / put.p50_ms
        ));
    }
    Ok(md)
}

/// `clients` closed loops of `op` for the warm-up, then for the measured window.
async fn measure(
    client: &Client,
    op: Op,
    clients: usize,
    cfg: &TsoConfig,
) -> anyhow::Result<Measured> {
    let warmup_end = Instant::now() + Duration::from_secs_f64(cfg.warmup_secs);
    let end = warmup_end + Duration::from_secs_f64(cfg.duration_secs);
    let tasks: Vec<_> = (0..clients)
        .map(|worker| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1, MAX_RECORDED_LATENCY_US, 3)?;
                let (mut ops, mut errors, mut i) = (0u64, 0u64, 0u64);
                let value = [7u8; 256];
                loop {
                    let started = Instant::now();
                    if started >= end {
                        break;
                    }
                    let ok = match op {
                        Op::Timestamp => client.timestamp().await.is_ok(),
                        Op::Put => {
                            let key = format!("tso-bench/{worker}/{}", i % 1_000);
                            client
                                .put(BENCH_SPHERE, key.as_bytes(), &value)
                                .await
                                .is_ok()
                        }
                    };
                    i += 1;
                    if started < warmup_end {
                        continue;
                    }
                    if ok {
                        ops += 1;
                        let us = started.elapsed().as_micros() as u64;
                        hist.record(us.clamp(1, MAX_RECORDED_LATENCY_US))?;
                    } else {
                        errors += 1;
                    }
                }
                Ok::<_, anyhow::Error>((hist, ops, errors))
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, MAX_RECORDED_LATENCY_US, 3)?;
    let (mut ops, mut errors) = (0u64, 0u64);
    for t in tasks {
        let (h, o, e) = t.await??;
        hist.add(h)?;
        ops += o;
        errors += e;
    }
    Ok(Measured {
        ops_per_sec: ops as f64 / cfg.duration_secs,
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1_000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1_000.0,
        errors,
    })
}
