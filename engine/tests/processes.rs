//! Multi-node behaviour with real `spheredb` processes on loopback.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::{eventually, range, status, ProcCluster, USER_RANGE};

const FAST_ELECTIONS: &[&str] = &[
    "--heartbeat-interval-ms",
    "50",
    "--election-timeout-ms",
    "300",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acked_writes_survive_leader_kill() {
    let mut cluster = ProcCluster::start(3, FAST_ELECTIONS).await;
    let client = cluster.client().await;
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();

    // Writers run across the kill; every write they saw acknowledged must survive.
    const WRITERS: usize = 4;
    const WRITES_PER_WRITER: usize = 150;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (client, acked, stop) = (client.clone(), acked.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..WRITES_PER_WRITER {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let (k, v) = (format!("w{w}-{i:04}"), format!("value-{w}-{i}"));
                if client.put(7, k.as_bytes(), v.as_bytes()).await.is_ok() {
                    acked.lock().unwrap().insert(k, v);
                }
            }
        }));
    }
    eventually("some writes to be acknowledged", || async {
        (acked.lock().unwrap().len() >= 100).then_some(())
    })
    .await;
    let leader = cluster.leader().await;
    let killed_at = Instant::now();
    cluster.procs[leader].kill9();
    let survivor = cluster.procs[(leader + 1) % 3].addr.clone();
    let old_leader_addr = cluster.procs[leader].addr.clone();
    eventually("a new leader after kill -9", || async {
        let s = status(&survivor, false).await?;
        let l = range(&s, USER_RANGE)?.leader_id?;
        let addr = &s.nodes.iter().find(|n| n.node_id == l)?.addr;
        (*addr != old_leader_addr).then_some(())
    })
    .await;
    eprintln!("new leader after {} ms", killed_at.elapsed().as_millis());
    let before = acked.lock().unwrap().len();
    eventually("writes to be acknowledged by the new leader", || async {
        (acked.lock().unwrap().len() > before + 20).then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    eprintln!("{} acknowledged writes", acked.len());
    for (k, v) in &acked {
        let got = client.get(7, k.as_bytes()).await.unwrap();
        assert_eq!(
            got.as_deref(),
            Some(v.as_bytes()),
            "acknowledged write {k} lost"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_node_catches_up_via_snapshot_after_log_purge() {
    let mut args = FAST_ELECTIONS.to_vec();
    args.extend([
        "--snapshot-log-threshold",
        "20",
        "--log-kept-behind-snapshot",
        "0",
    ]);
    let mut cluster = ProcCluster::start(3, &args).await;
    let client = cluster.client().await;
    client.put(1, b"before", b"stop").await.unwrap();
    let leader = cluster.leader().await;
    let follower = (leader + 1) % 3;
    cluster.procs[follower].kill9();

    for i in 0..200u32 {
        client
            .put(1, format!("k{i:03}").as_bytes(), format!("v{i}").as_bytes())
            .await
            .unwrap();
    }
    let leader_addr = cluster.procs[leader].addr.clone();
    let leader_status = eventually("the leader to snapshot and purge", || async {
        let s = status(&leader_addr, true).await?;
        let r = range(&s, USER_RANGE)?;
        (r.snapshot_index? > 150).then(|| r.clone())
    })
    .await;

    cluster.procs[follower].restart_plain();
    let follower_addr = cluster.procs[follower].addr.clone();
    let want_applied = leader_status.applied_index.unwrap();
    let caught_up = eventually("the restarted node to catch up", || async {
        let s = status(&follower_addr, true).await?;
        let r = range(&s, USER_RANGE)?.clone();
        (r.applied_index? >= want_applied).then_some(r)
    })
    .await;
    assert!(
        caught_up.snapshot_index.is_some(),
        "follower caught up without installing a snapshot\n{}",
        cluster.log(follower)
    );
    // Same data on both: compare digests at an equal applied index. Both are read afresh on
    // every try: the allocator may move the lease to the restarted node meanwhile, and the new
    // term's blank entry moves both applied indexes past any index read before.
    let (fr, lr) = eventually("both nodes to apply the same entries", || async {
        let f = status(&follower_addr, true).await?;
        let l = status(&leader_addr, true).await?;
        let (fr, lr) = (range(&f, USER_RANGE)?, range(&l, USER_RANGE)?);
        (fr.applied_index == lr.applied_index).then(|| (fr.clone(), lr.clone()))
    })
    .await;
    assert_eq!((fr.key_count, fr.data_crc32), (lr.key_count, lr.data_crc32));
    assert!(fr.key_count.unwrap() >= 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timestamps_keep_increasing_across_a_meta_leader_kill() {
    let mut cluster = ProcCluster::start(3, FAST_ELECTIONS).await;
    let client = cluster.client().await;
    // Concurrent callers share calls, each with its own timestamp.
    let before: Vec<u64> = futures::future::join_all((0..64).map(|_| client.timestamp()))
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    let distinct: std::collections::BTreeSet<u64> = before.iter().copied().collect();
    assert_eq!(distinct.len(), before.len(), "a timestamp handed out twice");
    let highest_before = *distinct.last().unwrap();

    let meta_leader = cluster.leader_of(spheredb_engine::ids::META_RANGE_ID).await;
    cluster.procs[meta_leader].kill9();
    let after = eventually("a timestamp from the next meta-range leader", || async {
        client.timestamp().await.ok()
    })
    .await;
    assert!(
        after > highest_before,
        "timestamp {after} after {highest_before}, across a meta-leader kill"
    );
    cluster.procs[meta_leader].restart_plain();
    let mut last = after;
    for _ in 0..20 {
        let ts = client.timestamp().await.unwrap();
        assert!(ts > last, "timestamp {ts} after {last}");
        last = ts;
    }
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_successor_whose_clock_is_behind_starts_above_its_predecessors_timestamps() {
    // The followers' oracle clocks run 20 s behind the leader's: the successor must start
    // at the limit its predecessor stored, not at its own clock.
    let mut cluster = ProcCluster::start(3, FAST_ELECTIONS).await;
    let meta = spheredb_engine::ids::META_RANGE_ID;
    let leader = cluster.leader_of(meta).await;
    for i in (0..3).filter(|i| *i != leader) {
        cluster.procs[i].kill9();
        cluster.procs[i].env = vec![(
            "FAILPOINTS".into(),
            "tso-clock-offset-ms=return(-20000)".into(),
        )];
        cluster.procs[i].spawn();
        eventually("the restarted node to log its failpoints", || async {
            cluster.log(i).contains("failpoints active").then_some(())
        })
        .await;
    }
    assert_eq!(cluster.leader_of(meta).await, leader);
    let client = cluster.client().await;
    let before = client.timestamp().await.unwrap();
    cluster.procs[leader].kill9();
    let after = eventually("a timestamp from the successor", || async {
        client.timestamp().await.ok()
    })
    .await;
    assert!(
        after > before,
        "the successor handed out {after} after its predecessor's {before}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_and_kv_commands_work_from_the_cli() {
    let cluster = ProcCluster::start(1, &["--replication-factor", "1"]).await;
    let addr = cluster.procs[0].addr.clone();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_spheredb"))
            .args(args)
            .output()
            .expect("running spheredb")
    };
    let put = run(&[
        "kv", "--host", &addr, "--sphere", "3", "put", "hello", "world",
    ]);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let get = run(&["kv", "--host", &addr, "--sphere", "3", "get", "hello"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "world");
    let other_sphere = run(&["kv", "--host", &addr, "--sphere", "4", "get", "hello"]);
    assert!(
        !other_sphere.status.success(),
        "spheres must not share keys"
    );
    let st = run(&["status", "--host", &addr, "--format", "json"]);
    let v: serde_json::Value =
        serde_json::from_slice(&st.stdout).expect("status --format json prints JSON");
    assert_eq!(v["nodes"][0]["live"], true);
    let ranges = v["range_map"]["ranges"].as_array().unwrap();
    assert!(ranges.len() >= 2, "meta range and a user range: {v}");
    assert_eq!(ranges[0]["voters"].as_array().unwrap().len(), 1);
    let ts = run(&["timestamp", "--host", &addr]);
    assert!(ts.status.success(), "{ts:?}");
    let printed = String::from_utf8_lossy(&ts.stdout);
    let first: u64 = printed.split_whitespace().next().unwrap().parse().unwrap();
    let again = run(&["timestamp", "--host", &addr]);
    let second: u64 = String::from_utf8_lossy(&again.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(second > first, "{second} after {first}");

    let down = run(&["status", "--host", "127.0.0.1:1"]);
    assert!(!down.status.success());
    assert!(String::from_utf8_lossy(&down.stderr).contains("is a node running there"));
}

/// Restarts node 0 of a one-node cluster with `failpoint` active, writes until the process
/// exits by itself, and returns the acknowledged keys and how it exited.
async fn write_until_the_node_stops(
    cluster: &mut ProcCluster,
    failpoint: &str,
) -> (Vec<String>, std::process::ExitStatus) {
    cluster.procs[0].kill9();
    cluster.procs[0].env = vec![("FAILPOINTS".into(), failpoint.into())];
    cluster.procs[0].spawn();
    let client = cluster.client().await;
    let mut acked = Vec::new();
    // Bounded: the failpoint fires after a few hundred syncs; each write is at least one.
    const MAX_WRITES: usize = 20_000;
    for i in 0..MAX_WRITES {
        let key = format!("k{i:05}");
        if client.put(3, key.as_bytes(), b"v").await.is_ok() {
            acked.push(key);
        }
        if let Some(exit) = cluster.procs[0].child.as_mut().unwrap().try_wait().unwrap() {
            cluster.procs[0].child = None;
            return (acked, exit);
        }
    }
    panic!(
        "the node kept running after {MAX_WRITES} writes with {failpoint}\n{}",
        cluster.log(0)
    );
}

/// A node whose WAL fsync fails, or whose WAL-sync thread panics, must exit non-zero with a
/// clear message (fail-stop) instead of staying up with stopped Raft groups; what it
/// acknowledged before is still there after a restart.
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the `failpoints` feature (cargo test --workspace turns it on)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_fsync_fails_exits_instead_of_serving() {
    let mut cluster = ProcCluster::start(1, FAST_ELECTIONS).await;
    for (failpoint, says) in [
        ("wal-sync-fail=300*off->return", "WAL fsync failed"),
        ("wal-sync-panic=300*off->return", "failpoint wal-sync-panic"),
    ] {
        let (acked, exit) = write_until_the_node_stops(&mut cluster, failpoint).await;
        let log = cluster.log(0);
        assert!(
            log.contains("failpoints active"),
            "binary without failpoints:\n{log}"
        );
        assert!(!exit.success(), "{failpoint}: exited with {exit}\n{log}");
        assert!(
            log.contains(says),
            "{failpoint}: the log does not say {says:?}\n{log}"
        );
        cluster.procs[0].env.clear();
        cluster.procs[0].spawn();
        let client = cluster.client().await;
        for key in &acked {
            assert_eq!(
                client.get(3, key.as_bytes()).await.unwrap().as_deref(),
                Some(&b"v"[..]),
                "{failpoint}: acknowledged write {key} lost"
            );
        }
        eprintln!(
            "{failpoint}: exited with {exit} after {} acknowledged writes",
            acked.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_quarantined_before_a_restart_stays_stopped_and_is_replaced() {
    let mut args = FAST_ELECTIONS.to_vec();
    args.extend(["--node-heartbeat-interval-ms", "300"]);
    let mut cluster = ProcCluster::start(3, &args).await;
    let client = cluster.client().await;
    client.put(9, b"precious", b"v1").await.unwrap();
    let victim = (cluster.leader().await + 1) % 3;
    let replica_of = |list: &spheredb_client::proto::v1::RangeListResponse, node_id: u64| {
        list.ranges
            .iter()
            .find(|d| d.range_id == USER_RANGE)
            .and_then(|d| d.replicas.iter().find(|r| r.node_id == node_id))
            .map(|r| r.replica_id)
    };
    let victim_addr = cluster.procs[victim].addr.clone();
    let victim_node = eventually("the victim's node id", || async {
        let s = status(&victim_addr, false).await?;
        Some(s.node_id)
    })
    .await;
    let list = client.range_list().await.unwrap();
    let old_replica = replica_of(&list, victim_node).expect("the victim holds the user range");

    // The node found damage in its replica and recorded the quarantine, then went down
    // (a crash, an upgrade) before the replica was replaced.
    cluster.procs[victim].kill9();
    {
        let db = spheredb_storage::Db::open(
            &cluster.procs[victim].data_dir.join("db"),
            &spheredb_storage::DbOptions::default(),
        )
        .unwrap();
        spheredb_raft::log_store::write_state(
            &db,
            USER_RANGE,
            spheredb_raft::layout::StateTag::Quarantined,
            &"checksum mismatch in data (test)".to_string(),
            true,
        )
        .unwrap();
    }
    cluster.procs[victim].spawn();

    // It comes back without starting that replica's Raft group (doing so would re-read the
    // damage), keeps reporting it, and the allocator replaces it with a fresh replica on the
    // same node (three nodes, three replicas).
    eventually("the quarantined replica to be replaced", || async {
        let list = client.range_list().await.ok()?;
        let d = list.ranges.iter().find(|d| d.range_id == USER_RANGE)?;
        let now = replica_of(&list, victim_node)?;
        (now > old_replica && d.voters.len() == 3 && d.learners.is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        client.get(9, b"precious").await.unwrap().as_deref(),
        Some(&b"v1"[..])
    );
    let exited = cluster.procs[victim]
        .child
        .as_mut()
        .and_then(|c| c.try_wait().ok().flatten());
    assert!(
        exited.is_none(),
        "the node exited: {exited:?}\n{}",
        cluster.log(victim)
    );
}
