//! Change feeds beside etcd watch, on the same machine and load (`spheredb-bench feed`):
//!
//! - **delivery**: one subscriber following a sphere (etcd: a watch on a prefix) while
//!   writers put new keys at a fixed total rate; the latency from each write's
//!   acknowledgement to its delivery, p50 and p99.
//! - **fan-out**: one subscriber per sphere on many spheres (etcd: one watch per prefix, each
//!   on a stream of its own), writes spread over the spheres at a fixed total rate.
//! - **catch-up**: a subscriber whose cursor stands before a preload of many writes; events
//!   per second until it has them all.
//! - **resolved lag** (SphereDB only: etcd has no resolved timestamps): a subscriber
//!   following a sphere split into many idle ranges; how far its checkpoint trails the
//!   clock, sampled every [`LAG_SAMPLE_INTERVAL_MS`].
//! - **feed cost**: kv0 throughput at a fixed client count with and without one subscriber
//!   following every key the load writes.
//!
//! Every point runs each system on a fresh cluster, in ABBA pairs as `compare` does, and
//! reports medians. A write never delivered within [`DRAIN_TIMEOUT_MS`] counts as lost and
//! fails the run: latency numbers over a feed that drops events would mean nothing.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde::Serialize;
use spheredb_client::feed::FeedItem;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::etcd::watch_client::WatchClient;
use crate::etcd::{watch_request, PutRequest, WatchCreateRequest, WatchRequest};
use crate::runner::{self, RunConfig};
use crate::target::{self, Cluster, Conn, ReadConsistency, System, BENCH_SPHERE};
use crate::workload::{KeyDistribution, Workload};

/// Longest the feed may take to deliver the last writes after the load stops.
pub const DRAIN_TIMEOUT_MS: u64 = 30_000;
/// Longest subscribing (every subscriber live) may take.
pub const SUBSCRIBE_TIMEOUT_MS: u64 = 120_000;
/// Events per etcd transaction in the catch-up preload (etcd's default `--max-txn-ops`).
const PRELOAD_CHUNK_KEYS: usize = 128;
/// Preload writes in flight at once.
const PRELOAD_CONCURRENCY: usize = 8;
/// How often the resolved-lag point samples the subscriber's checkpoint.
const LAG_SAMPLE_INTERVAL_MS: u64 = 50;
/// Splits in flight at once while the resolved-lag point makes its ranges.
const CONCURRENT_SPLITS: usize = 8;
/// Attempts per split (a concurrent split of the same range makes one give way).
const SPLIT_ATTEMPTS: u64 = 20;
/// Largest etcd watch response taken: etcd sends a catch-up from a revision as few large
/// responses (tens of megabytes for 100,000 events), past tonic's 4 MiB default.
const ETCD_MAX_WATCH_RESPONSE_BYTES: usize = 256 << 20;
/// Digits of the sequence number in every key the benchmark writes.
const SEQ_DIGITS: usize = 10;

/// The two systems compared (SphereDB with its defaults, etcd through balanced clients).
const SYSTEMS: [System; 2] = [System::Spheredb, System::Etcd];

/// The `feed` command's arguments.
#[derive(clap::Args)]
pub struct FeedConfig {
    /// Total write rates (writes/s) of the one-subscriber delivery points; 0 skips them.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    pub rates: Vec<f64>,
    /// Subscribers (one per sphere, or per etcd prefix) of the fan-out point; 0 skips it.
    #[arg(long, default_value_t = 1_000)]
    pub fanout_subscribers: u64,
    /// Total write rate (writes/s) of the fan-out point.
    #[arg(long, default_value_t = 1_000.0)]
    pub fanout_rate: f64,
    /// Writes the catch-up subscriber starts behind (about ten minutes of a sphere written
    /// 170 times a second); 0 skips it.
    #[arg(long, default_value_t = 100_000)]
    pub catch_up_events: u64,
    /// Idle ranges of the resolved-lag point; 0 skips it.
    #[arg(long, default_value_t = 1_000)]
    pub idle_ranges: u32,
    /// kv0 clients of the feed-cost point; 0 skips it.
    #[arg(long, default_value_t = 64)]
    pub cost_clients: usize,
    /// Concurrent writers of the delivery and fan-out points (an open loop: each write
    /// starts at its scheduled time, or as soon as a writer is free).
    #[arg(long, default_value_t = 128)]
    pub writers: usize,
    #[arg(long, default_value_t = 256)]
    pub value_size_bytes: usize,
    /// Pairs per point (each system once per pair, in alternating order).
    #[arg(long, default_value_t = 2)]
    pub pairs: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 10.0)]
    pub duration_secs: f64,
    /// Warm-up seconds per run, excluded from results.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_secs: f64,
    /// The spheredb binary [default: next to this one].
    #[arg(long, default_value_os_t = target::default_spheredb_bin())]
    pub spheredb_bin: PathBuf,
    /// The etcd binary (Debian: apt-get install -y etcd-server).
    #[arg(long, default_value = "etcd")]
    pub etcd_bin: PathBuf,
    /// Where feed.md and feed.json go.
    #[arg(long, default_value = "bench-results/feed")]
    pub out_dir: PathBuf,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct FeedResult {
    pub system: System,
    pub point: String,
    /// Write→delivery latency (from the write's acknowledgement; 0 when the event came
    /// first) of the writes scheduled in the measured window.
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    /// Writes acknowledged in the measured window, and the rate they reached.
    pub writes: u64,
    pub writes_per_sec: f64,
    /// Catch-up: events per second delivered from behind.
    pub catch_up_events_per_sec: Option<f64>,
    /// Feed cost: kv0 operations per second.
    pub kv0_ops_per_sec: Option<f64>,
}

/// When each write was acknowledged and when it was delivered, in microseconds since the
/// run began (+1, so 0 means "not yet").
struct Times {
    origin: Instant,
    acked: Vec<AtomicU64>,
    delivered: Vec<AtomicU64>,
    delivered_count: AtomicU64,
}

impl Times {
    fn new(writes: usize) -> Arc<Times> {
        Arc::new(Times {
            origin: Instant::now(),
            acked: (0..writes).map(|_| AtomicU64::new(0)).collect(),
            delivered: (0..writes).map(|_| AtomicU64::new(0)).collect(),
            delivered_count: AtomicU64::new(0),
        })
    }

    fn now_us(&self) -> u64 {
        self.origin.elapsed().as_micros() as u64 + 1
    }

    fn ack(&self, seq: u64) {
        if let Some(slot) = self.acked.get(seq as usize) {
            slot.store(self.now_us(), Ordering::Relaxed);
        }
    }

    /// Records the delivery of the write whose key is `key` (its sequence number ends it).
    fn deliver(&self, key: &[u8]) {
        let Some(seq) = seq_of(key) else { return };
        if let Some(slot) = self.delivered.get(seq as usize) {
            if slot
                .compare_exchange(0, self.now_us(), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                self.delivered_count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The sequence number at the end of a benchmark key.
fn seq_of(key: &[u8]) -> Option<u64> {
    let digits = key.get(key.len().checked_sub(SEQ_DIGITS)?..)?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The spheres (SphereDB) or prefixes (etcd) a point writes to: `1..=spheres`.
fn etcd_prefix(sphere: u64) -> Vec<u8> {
    format!("s{sphere:06}/").into_bytes()
}

/// The key of write `seq` in `sphere`.
fn write_key(system: System, sphere: u64, seq: u64) -> Vec<u8> {
    let own = format!("f{seq:0width$}", width = SEQ_DIGITS).into_bytes();
    if system.is_spheredb() {
        own
    } else {
        [etcd_prefix(sphere), own].concat()
    }
}

/// The key just past every key with `prefix` (etcd's `range_end` for a prefix watch).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

async fn start(system: System, cfg: &FeedConfig) -> anyhow::Result<Cluster> {
    if system.is_spheredb() {
        target::start_spheredb(&cfg.spheredb_bin, 3, system).await
    } else {
        target::start_etcd(&cfg.etcd_bin, 3, system).await
    }
}

fn etcd_channel(cluster: &Cluster) -> anyhow::Result<Channel> {
    let endpoints = cluster
        .endpoints
        .iter()
        .map(|e| Channel::from_shared(format!("http://{e}")).map(|c| c.tcp_nodelay(true)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Channel::balance_list(endpoints.into_iter()))
}

/// Starts one subscriber per sphere in `spheres` (from now, or from `since`: a SphereDB
/// timestamp or an etcd revision), recording deliveries in `times`. Returns once every
/// subscriber is live.
async fn subscribe(
    cluster: &Cluster,
    conn: &Conn,
    spheres: std::ops::RangeInclusive<u64>,
    since: Option<u64>,
    times: &Arc<Times>,
    tasks: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let (live_tx, mut live_rx) = tokio::sync::mpsc::channel::<()>(1_024);
    let count = spheres.clone().count();
    let channel = match conn {
        Conn::Etcd(..) => Some(etcd_channel(cluster)?),
        Conn::Spheredb(_) => None,
    };
    for sphere in spheres {
        let (times, live) = (times.clone(), live_tx.clone());
        match conn {
            Conn::Spheredb(client) => {
                let mut builder = client.feed(sphere);
                if let Some(ts) = since {
                    builder = builder.since_ts(ts);
                }
                let mut sub = builder.subscribe().await?;
                tasks.spawn(async move {
                    let mut live = Some(live);
                    while let Some(item) = sub.next().await {
                        match item? {
                            FeedItem::Change(c) => times.deliver(&c.key),
                            FeedItem::Txn { changes, .. } => {
                                changes.iter().for_each(|c| times.deliver(&c.key))
                            }
                            FeedItem::Checkpoint(_) => {
                                if let Some(live) = live.take() {
                                    let _ = live.send(()).await;
                                }
                            }
                        }
                    }
                    bail!("the subscription of sphere {sphere} ended")
                });
            }
            Conn::Etcd(..) => {
                let channel = channel.clone().context("an etcd channel")?;
                let prefix = etcd_prefix(sphere);
                let create = WatchRequest {
                    request_union: Some(watch_request::RequestUnion::CreateRequest(
                        WatchCreateRequest {
                            range_end: prefix_end(&prefix),
                            key: prefix,
                            start_revision: since.map_or(0, |r| r as i64),
                            ..Default::default()
                        },
                    )),
                };
                // The request stream stays open: etcd cancels a watch whose stream closed.
                let requests = futures::StreamExt::chain(
                    futures::stream::iter([create]),
                    futures::stream::pending(),
                );
                tasks.spawn(async move {
                    let mut stream = WatchClient::new(channel)
                        .max_decoding_message_size(ETCD_MAX_WATCH_RESPONSE_BYTES)
                        .watch(requests)
                        .await?
                        .into_inner();
                    let mut live = Some(live);
                    while let Some(response) = stream.message().await? {
                        if response.canceled {
                            bail!("etcd canceled the watch: {}", response.cancel_reason);
                        }
                        if response.created {
                            if let Some(live) = live.take() {
                                let _ = live.send(()).await;
                            }
                        }
                        for event in response.events {
                            if let Some(kv) = event.kv {
                                times.deliver(&kv.key);
                            }
                        }
                    }
                    bail!("etcd ended the watch of sphere {sphere}")
                });
            }
        }
    }
    drop(live_tx);
    let deadline = Instant::now() + Duration::from_millis(SUBSCRIBE_TIMEOUT_MS);
    for _ in 0..count {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            live = tokio::time::timeout(left, live_rx.recv()) => match live {
                Ok(Some(())) => {}
                _ => bail!("{count} subscribers were not live within {SUBSCRIBE_TIMEOUT_MS} ms"),
            },
            Some(ended) = tasks.join_next() => {
                ended??;
                bail!("a subscriber ended before it was live");
            }
        }
    }
    Ok(())
}

/// When the writes of a delivery run go out: write `seq` of `0..writes` at
/// `start + seq / rate`, over `writers` tasks, into sphere `1 + seq % spheres`.
#[derive(Clone, Copy)]
struct Schedule {
    start: tokio::time::Instant,
    rate: f64,
    writes: u64,
    spheres: u64,
    writers: usize,
}

/// Puts one key per write of `schedule`, each with `value`.
async fn write_at_rate(
    conn: &Conn,
    times: &Arc<Times>,
    schedule: Schedule,
    value: &[u8],
) -> anyhow::Result<()> {
    let Schedule {
        start,
        rate,
        writes,
        spheres,
        writers,
    } = schedule;
    let mut tasks = JoinSet::new();
    let system = match conn {
        Conn::Spheredb(_) => System::Spheredb,
        Conn::Etcd(..) => System::Etcd,
    };
    for w in 0..writers as u64 {
        let (mut conn, times, value) = (conn.clone(), times.clone(), value.to_vec());
        tasks.spawn(async move {
            let mut seq = w;
            while seq < writes {
                tokio::time::sleep_until(start + Duration::from_secs_f64(seq as f64 / rate)).await;
                let sphere = 1 + seq % spheres;
                let key = write_key(system, sphere, seq);
                match &mut conn {
                    Conn::Spheredb(c) => c.put(sphere, &key, &value).await?,
                    Conn::Etcd(..) => conn.put(&key, &value).await?,
                }
                times.ack(seq);
                seq += writers as u64;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// Waits until `writes` writes were delivered (the subscribers keep running).
async fn drain(
    times: &Times,
    writes: u64,
    subscribers: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(DRAIN_TIMEOUT_MS);
    while times.delivered_count.load(Ordering::Relaxed) < writes {
        if Instant::now() > deadline {
            bail!(
                "{} of {writes} writes were never delivered within {DRAIN_TIMEOUT_MS} ms",
                writes - times.delivered_count.load(Ordering::Relaxed)
            );
        }
        if let Ok(Some(ended)) =
            tokio::time::timeout(Duration::from_millis(10), subscribers.join_next()).await
        {
            ended??;
            bail!("a subscriber ended");
        }
    }
    Ok(())
}

/// One delivery or fan-out run: one subscriber per sphere of `1..=spheres`, writes at
/// `rate`.
async fn delivery_run(
    system: System,
    cfg: &FeedConfig,
    spheres: u64,
    rate: f64,
    point: &str,
) -> anyhow::Result<FeedResult> {
    let cluster = start(system, cfg).await?;
    let conn = Conn::connect(&cluster, &run_config(cfg, 1)).await?;
    let writes = (rate * (cfg.warmup_secs + cfg.duration_secs)).ceil() as u64;
    let times = Times::new(writes as usize);
    let mut subscribers = JoinSet::new();
    subscribe(&cluster, &conn, 1..=spheres, None, &times, &mut subscribers).await?;
    let start = tokio::time::Instant::now();
    let schedule = Schedule {
        start,
        rate,
        writes,
        spheres,
        writers: cfg.writers,
    };
    let value = vec![b'v'; cfg.value_size_bytes];
    tokio::select! {
        written = write_at_rate(&conn, &times, schedule, &value) => written?,
        Some(ended) = subscribers.join_next() => {
            ended??;
            bail!("a subscriber ended while the writes went on");
        }
    }
    let write_secs = start.elapsed().as_secs_f64();
    drain(&times, writes, &mut subscribers).await?;
    subscribers.abort_all();
    let first_measured = (rate * cfg.warmup_secs).ceil() as usize;
    let mut latency = Histogram::<u64>::new(3)?;
    for seq in first_measured..writes as usize {
        let acked = times.acked[seq].load(Ordering::Relaxed);
        let delivered = times.delivered[seq].load(Ordering::Relaxed);
        latency.record(delivered.saturating_sub(acked))?;
    }
    let measured = writes - first_measured as u64;
    Ok(FeedResult {
        system,
        point: point.to_string(),
        p50_us: Some(latency.value_at_quantile(0.50)),
        p99_us: Some(latency.value_at_quantile(0.99)),
        writes: measured,
        writes_per_sec: writes as f64 / write_secs,
        catch_up_events_per_sec: None,
        kv0_ops_per_sec: None,
    })
}

/// The catch-up run: `events` writes preloaded, then a subscriber from before them.
async fn catch_up_run(system: System, cfg: &FeedConfig) -> anyhow::Result<FeedResult> {
    let cluster = start(system, cfg).await?;
    let mut conn = Conn::connect(&cluster, &run_config(cfg, 1)).await?;
    let events = cfg.catch_up_events;
    // The cursor: a timestamp (SphereDB) or the revision after a first write (etcd).
    let since = match &mut conn {
        Conn::Spheredb(c) => c.timestamp().await?,
        Conn::Etcd(pool, _) => {
            let put = pool
                .next()
                .put(PutRequest {
                    key: b"bench-cursor".to_vec(),
                    value: b"1".to_vec(),
                    lease: 0,
                })
                .await?
                .into_inner();
            put.header.context("etcd's put carried no header")?.revision as u64 + 1
        }
    };
    let value = vec![b'v'; cfg.value_size_bytes];
    let chunks: Vec<Vec<u64>> = (0..events)
        .collect::<Vec<_>>()
        .chunks(PRELOAD_CHUNK_KEYS)
        .map(<[u64]>::to_vec)
        .collect();
    let mut next = 0;
    let mut loading = JoinSet::new();
    while next < chunks.len() || !loading.is_empty() {
        while next < chunks.len() && loading.len() < PRELOAD_CONCURRENCY {
            let pairs: Vec<(Vec<u8>, Vec<u8>)> = chunks[next]
                .iter()
                .map(|&seq| (write_key(system, BENCH_SPHERE, seq), value.clone()))
                .collect();
            let mut conn = conn.clone();
            loading.spawn(async move { conn.preload(pairs).await });
            next += 1;
        }
        if let Some(done) = loading.join_next().await {
            done??;
        }
    }
    let times = Times::new(events as usize);
    let started = Instant::now();
    let mut subscribers = JoinSet::new();
    let sphere = BENCH_SPHERE..=BENCH_SPHERE;
    subscribe(
        &cluster,
        &conn,
        sphere,
        Some(since),
        &times,
        &mut subscribers,
    )
    .await?;
    drain(&times, events, &mut subscribers).await?;
    let secs = started.elapsed().as_secs_f64();
    subscribers.abort_all();
    Ok(FeedResult {
        system,
        point: "catch-up".into(),
        p50_us: None,
        p99_us: None,
        writes: events,
        writes_per_sec: 0.0,
        catch_up_events_per_sec: Some(events as f64 / secs),
        kv0_ops_per_sec: None,
    })
}

/// Splits the bench sphere into `ranges` ranges at `r000001`, `r000002`, ...
async fn split_into(client: &spheredb_client::Client, ranges: u32) -> anyhow::Result<()> {
    let mut pending = 1..ranges;
    let mut tasks = JoinSet::new();
    let mut done = 0;
    loop {
        while tasks.len() < CONCURRENT_SPLITS {
            let Some(i) = pending.next() else { break };
            let client = client.clone();
            tasks.spawn(async move {
                let at = spheredb_client::kv_key(BENCH_SPHERE, format!("r{i:06}").as_bytes());
                let mut attempt = 1;
                loop {
                    match client.split(&at).await {
                        Ok(_) => return anyhow::Ok(()),
                        Err(e) if attempt == SPLIT_ATTEMPTS => {
                            bail!("split at r{i:06}: {e}")
                        }
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                            attempt += 1;
                        }
                    }
                }
            });
        }
        match tasks.join_next().await {
            Some(split) => {
                split??;
                done += 1;
                if done % 100 == 0 {
                    eprintln!("    {done} of {} splits", ranges - 1);
                }
            }
            None => return Ok(()),
        }
    }
}

/// The resolved-lag run: a subscriber over `cfg.idle_ranges` idle ranges.
async fn resolved_lag_run(cfg: &FeedConfig) -> anyhow::Result<FeedResult> {
    let cluster = start(System::Spheredb, cfg).await?;
    let options = spheredb_client::ClientOptions {
        call_deadline_ms: 30_000,
        ..Default::default()
    };
    let client = spheredb_client::Client::connect(&cluster.endpoints, options).await?;
    split_into(&client, cfg.idle_ranges).await?;
    let resolved = Arc::new(AtomicU64::new(0));
    let mut sub = client.feed(BENCH_SPHERE).subscribe().await?;
    let mut follower: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let last = resolved.clone();
    follower.spawn(async move {
        while let Some(item) = sub.next().await {
            if let FeedItem::Checkpoint(cursor) = item? {
                last.store(cursor.resolved_ts(), Ordering::Relaxed);
            }
        }
        bail!("the subscription ended")
    });
    let deadline = Instant::now() + Duration::from_millis(SUBSCRIBE_TIMEOUT_MS);
    while resolved.load(Ordering::Relaxed) == 0 {
        if Instant::now() > deadline {
            bail!(
                "no checkpoint over {} ranges within {SUBSCRIBE_TIMEOUT_MS} ms",
                cfg.idle_ranges
            );
        }
        if let Some(Ok(Err(e))) = follower.try_join_next() {
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(LAG_SAMPLE_INTERVAL_MS)).await;
    }
    tokio::time::sleep(Duration::from_secs_f64(cfg.warmup_secs)).await;
    let mut lag_us = Histogram::<u64>::new(3)?;
    let measured_until = Instant::now() + Duration::from_secs_f64(cfg.duration_secs);
    while Instant::now() < measured_until {
        if let Some(Ok(Err(e))) = follower.try_join_next() {
            return Err(e.context("the subscription failed"));
        }
        let wall_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        let resolved_ms = spheredb_client::physical_ms(resolved.load(Ordering::Relaxed));
        lag_us.record(wall_ms.saturating_sub(resolved_ms) * 1_000)?;
        tokio::time::sleep(Duration::from_millis(LAG_SAMPLE_INTERVAL_MS)).await;
    }
    follower.abort_all();
    let ranges = target::spheredb_user_ranges(&cluster.endpoints).await?;
    eprintln!("    {ranges} user ranges at the end of the run");
    Ok(FeedResult {
        system: System::Spheredb,
        point: String::new(),
        p50_us: Some(lag_us.value_at_quantile(0.50)),
        p99_us: Some(lag_us.value_at_quantile(0.99)),
        writes: 0,
        writes_per_sec: 0.0,
        catch_up_events_per_sec: None,
        kv0_ops_per_sec: None,
    })
}

/// kv0 at `cfg.cost_clients` clients, with or without a subscriber following every key.
async fn cost_run(system: System, cfg: &FeedConfig, with_feed: bool) -> anyhow::Result<FeedResult> {
    let cluster = start(system, cfg).await?;
    let run = run_config(cfg, cfg.cost_clients);
    let mut conn = Conn::connect(&cluster, &run).await?;
    runner::preload(&mut conn, &run).await?;
    let mut subscribers: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let followed = Arc::new(AtomicU64::new(0));
    if with_feed {
        let followed = followed.clone();
        match &conn {
            Conn::Spheredb(client) => {
                let mut sub = client.feed(BENCH_SPHERE).subscribe().await?;
                subscribers.spawn(async move {
                    while let Some(item) = sub.next().await {
                        if let FeedItem::Change(_) = item? {
                            followed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    bail!("the subscription ended")
                });
            }
            Conn::Etcd(..) => {
                let create = WatchRequest {
                    request_union: Some(watch_request::RequestUnion::CreateRequest(
                        WatchCreateRequest {
                            key: vec![0],
                            range_end: vec![0],
                            ..Default::default()
                        },
                    )),
                };
                let requests = futures::StreamExt::chain(
                    futures::stream::iter([create]),
                    futures::stream::pending(),
                );
                let channel = etcd_channel(&cluster)?;
                subscribers.spawn(async move {
                    let mut stream = WatchClient::new(channel)
                        .max_decoding_message_size(ETCD_MAX_WATCH_RESPONSE_BYTES)
                        .watch(requests)
                        .await?
                        .into_inner();
                    while let Some(response) = stream.message().await? {
                        followed.fetch_add(response.events.len() as u64, Ordering::Relaxed);
                    }
                    bail!("etcd ended the watch")
                });
            }
        }
    }
    let result = runner::run(system, conn, &run, &cluster.pids()).await?;
    if with_feed && followed.load(Ordering::Relaxed) == 0 {
        bail!("the subscriber followed none of {} writes", result.ops);
    }
    if let Some(Ok(Err(e))) = subscribers.try_join_next() {
        return Err(e.context("the subscriber failed during the run"));
    }
    subscribers.abort_all();
    Ok(FeedResult {
        system,
        point: if with_feed { "kv0+feed" } else { "kv0" }.into(),
        p50_us: None,
        p99_us: None,
        writes: result.ops,
        writes_per_sec: result.ops_per_sec,
        catch_up_events_per_sec: None,
        kv0_ops_per_sec: Some(result.ops_per_sec),
    })
}

/// A point: what it is called and how one of its runs goes.
#[derive(Clone)]
enum Point {
    Delivery { rate: f64 },
    Fanout,
    CatchUp,
    ResolvedLag,
    Cost { with_feed: bool },
}

impl Point {
    fn name(&self, cfg: &FeedConfig) -> String {
        match self {
            Point::Delivery { rate } => format!("1 subscriber, {rate} writes/s"),
            Point::Fanout => format!(
                "{} subscribers on as many spheres, {} writes/s",
                cfg.fanout_subscribers, cfg.fanout_rate
            ),
            Point::CatchUp => format!("catch-up from {} writes behind", cfg.catch_up_events),
            Point::ResolvedLag => format!("resolved lag over {} idle ranges", cfg.idle_ranges),
            Point::Cost { with_feed: false } => format!("kv0, {} clients", cfg.cost_clients),
            Point::Cost { with_feed: true } => {
                format!("kv0, {} clients, one feed following", cfg.cost_clients)
            }
        }
    }

    async fn run(&self, system: System, cfg: &FeedConfig) -> anyhow::Result<FeedResult> {
        let name = self.name(cfg);
        let mut result = match *self {
            Point::Delivery { rate } => delivery_run(system, cfg, 1, rate, &name).await,
            Point::Fanout => {
                delivery_run(system, cfg, cfg.fanout_subscribers, cfg.fanout_rate, &name).await
            }
            Point::CatchUp => catch_up_run(system, cfg).await,
            Point::ResolvedLag => resolved_lag_run(cfg).await,
            Point::Cost { with_feed } => cost_run(system, cfg, with_feed).await,
        }?;
        // The table finds each run by its point's name.
        result.point = name;
        Ok(result)
    }
}

/// Median of each run's value, `None` when no run has one.
fn median_of(runs: &[&FeedResult], f: impl Fn(&FeedResult) -> Option<f64>) -> Option<f64> {
    let values: Vec<f64> = runs.iter().filter_map(|r| f(r)).collect();
    (!values.is_empty()).then(|| crate::compare::median(values))
}

/// Runs every point and writes feed.md and feed.json; returns the Markdown.
pub async fn run(cfg: FeedConfig) -> anyhow::Result<String> {
    anyhow::ensure!(cfg.pairs > 0, "--pairs must be at least 1");
    anyhow::ensure!(cfg.writers > 0, "--writers must be at least 1");
    anyhow::ensure!(
        cfg.rates.iter().all(|r| *r >= 0.0) && cfg.fanout_rate > 0.0,
        "write rates must be above 0 (a delivery rate of 0 skips the delivery points)"
    );
    let mut points: Vec<Point> = cfg
        .rates
        .iter()
        .filter(|&&rate| rate > 0.0)
        .map(|&rate| Point::Delivery { rate })
        .collect();
    if cfg.fanout_subscribers > 0 {
        points.push(Point::Fanout);
    }
    if cfg.catch_up_events > 0 {
        points.push(Point::CatchUp);
    }
    if cfg.idle_ranges > 0 {
        points.push(Point::ResolvedLag);
    }
    if cfg.cost_clients > 0 {
        points.push(Point::Cost { with_feed: false });
        points.push(Point::Cost { with_feed: true });
    }
    let mut results = Vec::new();
    for point in &points {
        for pair in 0..cfg.pairs {
            let order: Vec<System> = if pair % 2 == 0 {
                SYSTEMS.to_vec()
            } else {
                SYSTEMS.iter().rev().copied().collect()
            };
            for system in order {
                if matches!(point, Point::ResolvedLag) && !system.is_spheredb() {
                    continue;
                }
                eprintln!("  {} / {system} (pair {})", point.name(&cfg), pair + 1);
                let result = point
                    .run(system, &cfg)
                    .await
                    .with_context(|| format!("{} on {system}", point.name(&cfg)))?;
                eprintln!("    {result:?}");
                results.push(result);
            }
        }
    }
    let md = table(&cfg, &points, &results);
    std::fs::create_dir_all(&cfg.out_dir)?;
    std::fs::write(cfg.out_dir.join("feed.md"), &md)?;
    std::fs::write(
        cfg.out_dir.join("feed.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    Ok(md)
}

fn table(cfg: &FeedConfig, points: &[Point], results: &[FeedResult]) -> String {
    let runs = |point: &str, system: System| -> Vec<&FeedResult> {
        results
            .iter()
            .filter(|r| r.point == point && r.system == system)
            .collect()
    };
    let ms = |us: Option<f64>| us.map_or("-".to_string(), |us| format!("{:.1}", us / 1_000.0));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "-".to_string(),
    };
    let mut md = String::from(
        "| point | SphereDB p50 / p99 ms | etcd p50 / p99 ms | p99 ratio (SphereDB / etcd) |\n\
         |---|---|---|---|\n",
    );
    let mut rest = String::from(
        "\n| point | SphereDB | etcd | ratio (SphereDB / etcd) |\n|---|---|---|---|\n",
    );
    for point in points {
        let name = point.name(cfg);
        let (s, e) = (runs(&name, System::Spheredb), runs(&name, System::Etcd));
        match point {
            Point::Delivery { .. } | Point::Fanout | Point::ResolvedLag => {
                let p50 = |r: &[&FeedResult]| median_of(r, |x| x.p50_us.map(|v| v as f64));
                let p99 = |r: &[&FeedResult]| median_of(r, |x| x.p99_us.map(|v| v as f64));
                md.push_str(&format!(
                    "| {name} | {} / {} | {} / {} | {} |\n",
                    ms(p50(&s)),
                    ms(p99(&s)),
                    ms(p50(&e)),
                    ms(p99(&e)),
                    ratio(p99(&s), p99(&e)),
                ));
            }
            Point::CatchUp => {
                let rate = |r: &[&FeedResult]| median_of(r, |x| x.catch_up_events_per_sec);
                rest.push_str(&format!(
                    "| {name}: events/s | {:.0} | {:.0} | {} |\n",
                    rate(&s).unwrap_or(0.0),
                    rate(&e).unwrap_or(0.0),
                    ratio(rate(&s), rate(&e)),
                ));
            }
            Point::Cost { .. } => {
                let ops = |r: &[&FeedResult]| median_of(r, |x| x.kv0_ops_per_sec);
                rest.push_str(&format!(
                    "| {name}: ops/s | {:.0} | {:.0} | {} |\n",
                    ops(&s).unwrap_or(0.0),
                    ops(&e).unwrap_or(0.0),
                    ratio(ops(&s), ops(&e)),
                ));
            }
        }
    }
    // What an active feed costs each system: kv0 with one over kv0 without.
    let cost = |system: System| {
        let ops = |with_feed: bool| {
            median_of(&runs(&Point::Cost { with_feed }.name(cfg), system), |x| {
                x.kv0_ops_per_sec
            })
        };
        match (ops(false), ops(true)) {
            (Some(without), Some(with)) if without > 0.0 => {
                format!("{:+.1} %", (with / without - 1.0) * 100.0)
            }
            _ => "-".to_string(),
        }
    };
    if cfg.cost_clients > 0 {
        rest.push_str(&format!(
            "| throughput change with a feed following | {} | {} | |\n",
            cost(System::Spheredb),
            cost(System::Etcd)
        ));
    }
    md + &rest
}

fn run_config(cfg: &FeedConfig, clients: usize) -> RunConfig {
    RunConfig {
        workload: Workload::Kv0,
        clients,
        rate_ops_per_sec: None,
        warmup_secs: cfg.warmup_secs,
        duration_secs: cfg.duration_secs,
        keys: crate::DEFAULT_KEYS,
        value_size_bytes: cfg.value_size_bytes,
        distribution: KeyDistribution::Zipfian,
        consistency: ReadConsistency::Linearizable,
        seed: 42,
        connections: spheredb_client::client::DEFAULT_CONNECTIONS_PER_NODE,
    }
}
