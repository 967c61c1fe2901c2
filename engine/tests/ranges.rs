//! Range sharding with real processes: splits under load, merges, replicas spreading to new
//! nodes, decommissioning, re-replication after a node dies, and idle cost of many ranges.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, fully_replicated, ProcCluster};
use spheredb_client::proto::v1::RangeListResponse;
use spheredb_client::{Client, ClientOptions};
use spheredb_storage::keys;

const SPHERE: u64 = 42;

/// These tests run one at a time: each runs up to five nodes, and two clusters at once on a
/// small machine starve each other's heartbeats.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Small thresholds and fast timers so a test sees many ranges and quick reactions.
/// Five nodes and a hundred Raft groups share two cores here: heartbeats (which openraft
/// also uses as the RPC deadline) get room so a busy moment is not a lost lease.
const SHARDING_ARGS: &[&str] = &[
    "--heartbeat-interval-ms",
    "250",
    "--election-timeout-ms",
    "1250",
    "--range-split-size-bytes",
    "12000",
    "--node-heartbeat-interval-ms",
    "300",
    "--dead-node-timeout-ms",
    "4000",
    // Merges are asked for by hand here; automatic ones have their own test.
    "--range-merge-size-bytes",
    "0",
];

fn key(i: u32) -> Vec<u8> {
    format!("item/{i:05}").into_bytes()
}

fn value(i: u32) -> Vec<u8> {
    format!("{i:05}-{}", "v".repeat(200)).into_bytes()
}

/// Writes keys `from..count` in batches of consecutive keys. Only new keys: they land at the
/// end of the sphere, so a batch stays in one range (splits happen inside data written
/// earlier; rewriting earlier keys could straddle a split, which a batch may not).
async fn load(client: &Client, from: u32, count: u32) {
    const BATCH_KEYS: u32 = 25;
    for start in (from..count).step_by(BATCH_KEYS as usize) {
        let ops: Vec<(Vec<u8>, Option<Vec<u8>>)> = (start..(start + BATCH_KEYS).min(count))
            .map(|i| (key(i), Some(value(i))))
            .collect();
        // As in `spawn_reader`: one call retries within its deadline; a second call covers a
        // leadership change that outlasts it (a transfer to a replica that does not take
        // over stalls the range until an election). Two failed calls in a row fail the test.
        // Rewriting the same values is idempotent.
        if let Err(first) = client.batch(SPHERE, &ops).await {
            eprintln!("batch at key {start} failed once, retrying: {first}");
            client
                .batch(SPHERE, &ops)
                .await
                .unwrap_or_else(|e| panic!("batch at key {start}: {e}"));
        }
    }
}

/// Reads every key through `client` (and a full scan), asserting each value.
async fn check_all(client: &Client, count: u32, who: &str) {
    for i in 0..count {
        let got = match client.get(SPHERE, &key(i)).await {
            Ok(v) => v,
            Err(e) => panic!(
                "{who}: reading key {i}: {e}\n{}",
                describe_key(client, &keys::kv_key(SPHERE, &key(i))).await
            ),
        };
        assert_eq!(got, Some(value(i)), "{who}: key {i}");
    }
    let scanned = client.scan(SPHERE, b"", b"", 100_000).await.unwrap();
    assert_eq!(scanned.len(), count as usize, "{who}: scan across ranges");
    for (i, kv) in scanned.iter().enumerate() {
        assert_eq!(kv.key, key(i as u32), "{who}: scan order");
    }
}

/// A reader that keeps reading known keys until stopped; counts reads, fails on any error.
fn spawn_reader(
    client: Client,
    count: u32,
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut i = 0u32;
        // Bounded: stops when told, or after this many reads.
        const MAX_READS: u64 = 1_000_000;
        while !stop.load(Ordering::Relaxed) && reads.load(Ordering::Relaxed) < MAX_READS {
            i = (i + 7919) % count;
            // One client call retries for up to its deadline (10 s); a second call covers a
            // node kill landing mid-call. Two failed calls in a row fail the test.
            let started = std::time::Instant::now();
            let got = match client.get(SPHERE, &key(i)).await {
                Ok(v) => {
                    if started.elapsed() > Duration::from_secs(1) {
                        eprintln!("slow read of key {i}: {:?}", started.elapsed());
                    }
                    v
                }
                Err(first) => {
                    eprintln!("read of key {i} failed once, retrying: {first}");
                    client
                        .get(SPHERE, &key(i))
                        .await
                        .unwrap_or_else(|e| panic!("reading key {i} while ranges change: {e}"))
                }
            };
            assert_eq!(got, Some(value(i)), "key {i} while ranges change");
            reads.fetch_add(1, Ordering::Relaxed);
        }
    })
}

/// Replicas and leaders per node in the range map.
fn spread(list: &RangeListResponse) -> (BTreeMap<u64, usize>, BTreeMap<u64, usize>) {
    let mut replicas: BTreeMap<u64, usize> = list.nodes.iter().map(|n| (n.node_id, 0)).collect();
    let mut leaders = replicas.clone();
    for d in &list.ranges {
        for r in &d.replicas {
            *replicas.entry(r.node_id).or_default() += 1;
        }
    }
    for l in &list.loads {
        if let Some(n) = l.leader_node_id {
            *leaders.entry(n).or_default() += 1;
        }
    }
    (replicas, leaders)
}

/// True when every node in `nodes` holds between half and 1.5× the mean of `counts`.
fn balanced(counts: &BTreeMap<u64, usize>, nodes: &[u64]) -> bool {
    let total: usize = nodes
        .iter()
        .map(|n| counts.get(n).copied().unwrap_or(0))
        .sum();
    let mean = total as f64 / nodes.len() as f64;
    nodes.iter().all(|n| {
        let c = counts.get(n).copied().unwrap_or(0) as f64;
        c <= 1.5 * mean && c >= 0.5 * mean
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ranges_split_spread_to_new_nodes_and_drain_without_losing_a_key() {
    let _one_at_a_time = SERIAL.lock().await;
    let mut cluster = ProcCluster::start(3, SHARDING_ARGS).await;
    let client = cluster.client().await;
    // A client whose range cache is filled now, while there are two ranges, and never
    // refreshed by hand: it must find its way through every split and move by hints.
    let stale = cluster.client().await;
    stale.get(SPHERE, b"warm-up").await.unwrap();

    const KEYS: u32 = 1_500;
    load(&client, 0, 100).await;
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = spawn_reader(stale.clone(), 100, stop.clone(), reads.clone());
    load(&client, 100, KEYS).await;

    let ranges = eventually("at least 20 ranges from splits", || async {
        let list = client.range_list().await.ok()?;
        (list.ranges.len() >= 20).then_some(list.ranges.len())
    })
    .await;
    eprintln!("{ranges} ranges after loading {KEYS} keys");
    eventually("every range fully replicated", || async {
        fully_replicated(&client, 3).await.then_some(())
    })
    .await;
    check_all(&stale, KEYS, "stale client after splits").await;

    // Two more nodes: replicas and leaders spread out while the reader keeps reading.
    cluster.add_node(SHARDING_ARGS);
    cluster.add_node(SHARDING_ARGS);
    let list = eventually("replicas and leaders spread over 5 nodes", || async {
        let list = client.range_list().await.ok()?;
        let (replicas, leaders) = spread(&list);
        let nodes: Vec<u64> = list.nodes.iter().map(|n| n.node_id).collect();
        let settled = nodes.len() == 5
            && balanced(&replicas, &nodes)
            && balanced(&leaders, &nodes)
            && fully_replicated(&client, 3).await;
        settled.then_some(list)
    })
    .await;
    let (replicas, leaders) = spread(&list);
    eprintln!("after adding nodes 4 and 5: replicas {replicas:?}, leaders {leaders:?}");
    check_all(&stale, KEYS, "stale client after replica moves").await;

    // Merges by hand, through the command line, of ranges whose replicas now sit on
    // different nodes: the right-hand range moves next to the left one first.
    let before = list.ranges.len();
    let mut sorted = list.ranges.clone();
    sorted.sort_by(|a, b| a.start_key.cmp(&b.start_key));
    let lefts: Vec<u64> = sorted
        .iter()
        .filter(|d| d.range_id != 1 && !d.end_key.is_empty())
        .step_by(4)
        .take(MANUAL_MERGES)
        .map(|d| d.range_id)
        .collect();
    for left in &lefts {
        let out = spheredb_cli(&["range", "--host", &cluster.procs[0].addr, "merge"])
            .args(["--range", &left.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "merging range {left}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("merged: {}", String::from_utf8_lossy(&out.stdout).trim());
    }
    // A merged range is past the split threshold again here, so it may split right away:
    // the range count says little, every key being readable says what matters.
    let list = eventually("merged ranges fully replicated", || async {
        let list = client.range_list().await.ok()?;
        fully_replicated(&client, 3).await.then_some(list)
    })
    .await;
    eprintln!(
        "{} ranges after {} merges (from {before})",
        list.ranges.len(),
        lefts.len()
    );
    check_all(&stale, KEYS, "stale client after merges").await;

    // Drain node 2: every replica leaves it, no key is lost.
    let drained = list.nodes.iter().find(|n| n.node_id == 2).unwrap().node_id;
    let left = client.decommission(drained).await.unwrap();
    eprintln!("decommissioning node {drained}: {left} replicas to move");
    eventually("node 2 to hold no replica", || async {
        let left = client.decommission(drained).await.ok()?;
        (left == 0 && fully_replicated(&client, 3).await).then_some(())
    })
    .await;
    let list = client.range_list().await.unwrap();
    assert!(
        list.ranges
            .iter()
            .all(|d| d.replicas.iter().all(|r| r.node_id != drained)),
        "a range still lists node {drained}"
    );
    // Node ids follow the order in which joins committed, not the order of the processes.
    let drained_addr = &list
        .nodes
        .iter()
        .find(|n| n.node_id == drained)
        .unwrap()
        .addr;
    let idx = cluster
        .procs
        .iter()
        .position(|p| &p.addr == drained_addr)
        .unwrap();
    cluster.procs[idx].kill9();
    check_all(&stale, KEYS, "stale client after decommission").await;

    stop.store(true, Ordering::Relaxed);
    reader.await.unwrap();
    eprintln!(
        "{} reads by the stale client while ranges changed",
        reads.load(Ordering::Relaxed)
    );
    let counters = common::node_counters(&cluster).await;
    eprintln!("actions per node: {counters:?}");
}

/// Merges the big test asks for by hand.
const MANUAL_MERGES: usize = 3;

/// The `spheredb` command line.
fn spheredb_cli(args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_spheredb"));
    cmd.args(args);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_cold_neighbours_merge_back_by_themselves() {
    let _one_at_a_time = SERIAL.lock().await;
    const ARGS: &[&str] = &[
        "--heartbeat-interval-ms",
        "250",
        "--election-timeout-ms",
        "1250",
        "--node-heartbeat-interval-ms",
        "300",
        // Everything here is small and, for merging, cold; spans count as settled after 2 s.
        "--range-merge-size-bytes",
        "200000",
        "--range-merge-qps",
        "100000",
        "--range-merge-after-split-ms",
        "2000",
    ];
    let cluster = ProcCluster::start(3, ARGS).await;
    let client = cluster.client().await;
    const KEYS: u32 = 200;
    load(&client, 0, KEYS).await;
    for i in 1..8 {
        let at = keys::kv_key(SPHERE, &key(i * KEYS / 8));
        client.split(&at).await.unwrap();
    }
    // A client that knows the split ranges, reading all through the merges.
    let stale = cluster.client().await;
    check_all(&stale, KEYS, "stale client before merges").await;
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = spawn_reader(stale.clone(), KEYS, stop.clone(), reads.clone());
    eventually("the user ranges to merge back into one", || async {
        let list = client.range_list().await.ok()?;
        (list.ranges.len() == 2 && fully_replicated(&client, 3).await).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    reader.await.unwrap();
    check_all(&stale, KEYS, "stale client after merges").await;
    let merges: u64 = common::node_counters(&cluster)
        .await
        .iter()
        .map(|(_, c)| c.get("merges").copied().unwrap_or(0))
        .sum();
    eprintln!(
        "{merges} merges; {} reads while ranges merged",
        reads.load(Ordering::Relaxed)
    );
    assert!(merges >= 7, "7 merges expected, counted {merges}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_nodes_ranges_return_to_full_replication() {
    let _one_at_a_time = SERIAL.lock().await;
    let mut cluster = ProcCluster::start(4, SHARDING_ARGS).await;
    let client = cluster.client().await;
    load(&client, 0, 200).await;
    // Manual splits through the command line, so there are several ranges to repair.
    for at in ["item/00040", "item/00080", "item/00120", "item/00160"] {
        let out = spheredb_cli(&["range", "--host", &cluster.procs[0].addr, "split"])
            .args(["--sphere", &SPHERE.to_string(), "--key", at])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let list = eventually("split ranges fully replicated", || async {
        let list = client.range_list().await.ok()?;
        (list.ranges.len() >= 6 && fully_replicated(&client, 3).await).then_some(list)
    })
    .await;
    // Kill a node that holds replicas (not node 1, the client's seed).
    let (replicas, _) = spread(&list);
    let victim = *replicas
        .iter()
        .filter(|(n, c)| **n != 1 && **c > 0)
        .max_by_key(|(_, c)| **c)
        .unwrap()
        .0;
    let idx = cluster
        .procs
        .iter()
        .position(|p| {
            list.nodes
                .iter()
                .any(|n| n.node_id == victim && n.addr == p.addr)
        })
        .unwrap();
    eprintln!(
        "killing node {victim} holding {} replicas",
        replicas[&victim]
    );
    cluster.procs[idx].kill9();
    eventually("every range back to 3 live voters", || async {
        let list = client.range_list().await.ok()?;
        let repaired = list
            .ranges
            .iter()
            .all(|d| d.voters.len() == 3 && !d.replicas.iter().any(|r| r.node_id == victim));
        (repaired && fully_replicated(&client, 3).await).then_some(())
    })
    .await;
    check_all(&client, 200, "after re-replication").await;
}

/// Splits the user range into `ranges` ranges, splitting at keys in an order that spreads
/// concurrent splits over different ranges.
async fn split_into(client: &Client, ranges: u32) {
    const CONCURRENT_SPLITS: usize = 8;
    // Bit-reversed order: halves first, then quarters, and so on.
    let bits = 32 - (ranges - 1).leading_zeros();
    let mut order: Vec<u32> = (1..ranges).collect();
    order.sort_by_key(|i| i.reverse_bits() >> (32 - bits));
    let mut pending = order.into_iter();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        while tasks.len() < CONCURRENT_SPLITS {
            let Some(i) = pending.next() else { break };
            let client = client.clone();
            tasks.spawn(async move {
                let at = keys::kv_key(SPHERE, format!("r{i:06}").as_bytes());
                // Bounded retries: a concurrent split of the same range makes one give way.
                const SPLIT_ATTEMPTS: u64 = 20;
                for attempt in 1..=SPLIT_ATTEMPTS {
                    match client.split(&at).await {
                        Ok(_) => return,
                        Err(e) if attempt == SPLIT_ATTEMPTS => {
                            panic!(
                                "split at r{i:06}: {e}\n{}",
                                describe_key(&client, &at).await
                            )
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(100 * attempt)).await,
                    }
                }
            });
        }
        match tasks.join_next().await {
            Some(r) => r.unwrap(),
            None => break,
        }
    }
}

/// What every node says about the replicas covering `key`, for failure messages.
async fn describe_key(client: &Client, key: &[u8]) -> String {
    let mut out = String::new();
    let Ok(list) = client.range_list().await else {
        return "range list unavailable".into();
    };
    for n in &list.nodes {
        let Ok(s) = client.status(&n.addr, false).await else {
            continue;
        };
        for r in &s.ranges {
            let Some(d) = &r.descriptor else { continue };
            if keys::span_contains(&d.start_key, &d.end_key, key) {
                out.push_str(&format!(
                    "node {}: range {} gen {} role {} leader {:?} term {} applied {:?} last {:?} quiesced {} voters {:?}\n",
                    n.node_id, d.range_id, d.generation, r.role, r.leader_id, r.term,
                    r.applied_index, r.last_log_index, r.quiesced, d.voters
                ));
            }
        }
    }
    out
}

/// 1,000 idle ranges on 3 nodes: reports the CPU the nodes use once the ranges quiesce.
/// No timing assertion; the numbers go to stderr. It takes minutes (999 splits on two
/// cores) and wants a release build, so it runs with `make idle-ranges`, not in the
/// default suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "minutes long; run with make idle-ranges"]
async fn thousand_idle_ranges_report_idle_cpu() {
    let _one_at_a_time = SERIAL.lock().await;
    const RANGES: u32 = 1_000;
    let cluster = ProcCluster::start(3, &["--quiesce-after-ms", "2000"]).await;
    let options = ClientOptions {
        call_deadline_ms: 30_000,
        ..ClientOptions::default()
    };
    let client = Client::connect(&cluster.addrs(), options).await.unwrap();
    let started = std::time::Instant::now();
    split_into(&client, RANGES).await;
    let total = eventually("1,000 user ranges in the meta range", || async {
        let list = client.range_list().await.ok()?;
        (list.ranges.len() > RANGES as usize).then_some(list.ranges.len())
    })
    .await;
    eprintln!(
        "{total} ranges (meta included) after {} s of splitting",
        started.elapsed().as_secs()
    );
    let count_quiesced = || async {
        let mut quiesced = 0usize;
        for a in cluster.addrs() {
            let s = common::status(&a, false).await?;
            quiesced += s.ranges.iter().filter(|r| r.quiesced).count();
        }
        Some(quiesced)
    };
    eventually("the idle ranges to quiesce", || async {
        let quiesced = count_quiesced().await?;
        (quiesced >= 3 * RANGES as usize * 9 / 10).then_some(quiesced)
    })
    .await;
    // The last stragglers quiesce over the next seconds; measure once they have.
    const SETTLE_SECS: u64 = 10;
    tokio::time::sleep(Duration::from_secs(SETTLE_SECS)).await;
    let quiesced = count_quiesced().await.unwrap_or(0);
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    const WINDOW_SECS: u64 = 10;
    let before: Vec<u64> = cluster
        .procs
        .iter()
        .map(|p| p.cpu_ticks().unwrap())
        .collect();
    tokio::time::sleep(Duration::from_secs(WINDOW_SECS)).await;
    let after: Vec<u64> = cluster
        .procs
        .iter()
        .map(|p| p.cpu_ticks().unwrap())
        .collect();
    let per_node: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) as f64 / ticks_per_sec / WINDOW_SECS as f64 * 100.0)
        .collect();
    eprintln!(
        "IDLE CPU with {total} ranges, {quiesced} of {} replicas quiesced: {:?} % of a core per node, {:.1} % in all",
        3 * total,
        per_node.iter().map(|p| format!("{p:.1}")).collect::<Vec<_>>(),
        per_node.iter().sum::<f64>()
    );
    // Still serving: a write and a read in an idle range wake it.
    client.put(SPHERE, b"r000500x", b"awake").await.unwrap();
    assert_eq!(
        client.get(SPHERE, b"r000500x").await.unwrap().as_deref(),
        Some(&b"awake"[..])
    );
}
