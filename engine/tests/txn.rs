//! Transactions across ranges: atomic commits, write conflicts, pessimistic locks, balances
//! that concurrent transfers never change in total, and the locks of a coordinator killed
//! mid-commit resolved by the readers that meet them (real processes).

mod common;

use std::time::Duration;

use spheredb_client::{kv_key, Client, ClientError, ClientOptions};

use common::{three_nodes_with, ProcCluster};

const SPHERE: u64 = 9;
/// Accounts of the bank check, spread over both ranges.
const ACCOUNTS: usize = 8;
const INITIAL_BALANCE: i64 = 100;
const TRANSFER_TASKS: usize = 4;
const TRANSFERS_PER_TASK: usize = 20;

async fn client_of(addrs: &[String], call_deadline_ms: u64) -> Client {
    let options = ClientOptions {
        call_deadline_ms,
        ..Default::default()
    };
    Client::connect(addrs, options).await.unwrap()
}

/// Three in-process nodes with the sphere split at "m", and a client.
async fn split_cluster() -> (
    tempfile::TempDir,
    Vec<spheredb_engine::Node>,
    Vec<String>,
    Client,
) {
    let dir = tempfile::tempdir().unwrap();
    let nodes = three_nodes_with(dir.path(), |_| {}).await;
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr().to_string()).collect();
    let client = client_of(&addrs, 10_000).await;
    client.split(&kv_key(SPHERE, b"m")).await.unwrap();
    (dir, nodes, addrs, client)
}

fn account(i: usize) -> Vec<u8> {
    // Accounts a.. on the left of the split at "m", n.. on the right.
    let first = if i.is_multiple_of(2) { b'a' } else { b'n' };
    vec![first + (i / 2) as u8]
}

fn balance(v: Option<Vec<u8>>) -> i64 {
    v.and_then(|v| String::from_utf8(v).ok()?.parse().ok())
        .expect("every account holds a number")
}

/// The sum of every balance as of one timestamp.
async fn total_at(client: &Client, ts: u64) -> i64 {
    let pairs = client
        .scan_at(SPHERE, b"", b"", 1_000, ts)
        .await
        .expect("a snapshot scan of the accounts");
    assert_eq!(pairs.len(), ACCOUNTS, "{pairs:?}");
    pairs.into_iter().map(|kv| balance(Some(kv.value))).sum()
}

/// Two transactions from the same snapshot write the same key (across two ranges): the
/// second must abort. Returns what happened otherwise.
async fn same_key_writers_conflict(client: &Client) -> Result<(), String> {
    let mut first = client.begin().await.map_err(|e| e.to_string())?;
    let mut second = client.begin().await.map_err(|e| e.to_string())?;
    first.get(SPHERE, b"a").await.map_err(|e| e.to_string())?;
    second.get(SPHERE, b"a").await.map_err(|e| e.to_string())?;
    first.put(SPHERE, b"a", b"1").map_err(|e| e.to_string())?;
    first.put(SPHERE, b"n", b"1").map_err(|e| e.to_string())?;
    second.put(SPHERE, b"a", b"2").map_err(|e| e.to_string())?;
    second.put(SPHERE, b"o", b"2").map_err(|e| e.to_string())?;
    first.commit().await.map_err(|e| e.to_string())?;
    match second.commit().await {
        Err(ClientError::WriteConflict { .. }) => Ok(()),
        other => Err(format!(
            "the second writer of a key from the same snapshot: {other:?}"
        )),
    }
}

/// Serializes the tests of this file that configure process-wide failpoints.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transactions_across_ranges_commit_whole_and_conflicting_ones_abort() {
    let _serial = SERIAL.lock().await;
    let (_dir, _nodes, addrs, client) = split_cluster().await;

    // A batch across the two ranges is now one transaction.
    let ops: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..ACCOUNTS)
        .map(|i| (account(i), Some(INITIAL_BALANCE.to_string().into_bytes())))
        .collect();
    client.batch(SPHERE, &ops).await.unwrap();
    let ts = client.timestamp().await.unwrap();
    assert_eq!(
        total_at(&client, ts).await,
        ACCOUNTS as i64 * INITIAL_BALANCE
    );

    same_key_writers_conflict(&client).await.unwrap();
    assert_eq!(client.get(SPHERE, b"a").await.unwrap(), Some(b"1".to_vec()));
    assert_eq!(client.get(SPHERE, b"n").await.unwrap(), Some(b"1".to_vec()));
    // The same within one range (one-phase commits).
    let mut one = client.begin().await.unwrap();
    let mut other = client.begin().await.unwrap();
    one.put(SPHERE, b"b", b"x").unwrap();
    other.put(SPHERE, b"b", b"y").unwrap();
    one.commit().await.unwrap();
    assert!(matches!(
        other.commit().await,
        Err(ClientError::WriteConflict { .. })
    ));

    // A pessimistic lock keeps writers out until its transaction ends; readers read on.
    let impatient = client_of(&addrs, 1_500).await;
    let mut locker = client.begin().await.unwrap();
    locker.lock(SPHERE, b"c").await.unwrap();
    assert_eq!(
        impatient.get(SPHERE, b"c").await.unwrap(),
        Some(b"100".to_vec())
    );
    match impatient.put(SPHERE, b"c", b"blocked").await {
        Err(ClientError::Locked { .. }) => {}
        other => panic!("a write went through a live pessimistic lock: {other:?}"),
    }
    locker.rollback().await.unwrap();
    impatient.put(SPHERE, b"c", b"free").await.unwrap();
    // A write to the locked key committed after the locker began: its commit conflicts.
    let mut late = client.begin().await.unwrap();
    client.put(SPHERE, b"d", b"changed").await.unwrap();
    match late.lock(SPHERE, b"d").await {
        Err(ClientError::WriteConflict { .. }) => {}
        other => panic!("locked a key written after the transaction began: {other:?}"),
    }

    // A transaction begun at an earlier timestamp reads history and writes nothing.
    let mut past = client.begin_at(ts).unwrap();
    assert!(client.begin_at(0).is_err());
    assert_eq!(
        past.get(SPHERE, b"c").await.unwrap(),
        Some(b"100".to_vec()),
        "history as of {ts}"
    );
    assert!(matches!(
        past.put(SPHERE, b"c", b"rewritten"),
        Err(ClientError::InvalidArgument(_))
    ));
    assert!(matches!(
        past.lock(SPHERE, b"c").await,
        Err(ClientError::InvalidArgument(_))
    ));
    past.commit().await.unwrap();
    assert_eq!(
        client.get(SPHERE, b"c").await.unwrap(),
        Some(b"free".to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transfers_across_ranges_never_change_the_total() {
    let _serial = SERIAL.lock().await;
    let (_dir, _nodes, _addrs, client) = split_cluster().await;
    let ops: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..ACCOUNTS)
        .map(|i| (account(i), Some(INITIAL_BALANCE.to_string().into_bytes())))
        .collect();
    client.batch(SPHERE, &ops).await.unwrap();
    let expected = ACCOUNTS as i64 * INITIAL_BALANCE;

    let mut tasks = Vec::new();
    for t in 0..TRANSFER_TASKS {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..TRANSFERS_PER_TASK {
                let from = account((t + n) % ACCOUNTS);
                let to = account((t * 3 + n * 5 + 1) % ACCOUNTS);
                if from == to {
                    continue;
                }
                client
                    .transact(|txn| {
                        let (from, to) = (from.clone(), to.clone());
                        Box::pin(async move {
                            let a = balance(txn.get(SPHERE, &from).await?);
                            let b = balance(txn.get(SPHERE, &to).await?);
                            let amount = (a / 4).min(10);
                            txn.put(SPHERE, &from, (a - amount).to_string().as_bytes())?;
                            txn.put(SPHERE, &to, (b + amount).to_string().as_bytes())?;
                            Ok(())
                        })
                    })
                    .await
                    .expect("a transfer commits within its retries");
            }
        }));
    }
    // Snapshot reads while the transfers run: every one sees the same total.
    let reader = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut totals = Vec::new();
            for _ in 0..20 {
                let ts = client.timestamp().await.unwrap();
                totals.push(total_at(&client, ts).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            totals
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    let totals = reader.await.unwrap();
    assert!(
        totals.iter().all(|t| *t == expected),
        "snapshot totals {totals:?}, expected {expected} each"
    );
    let ts = client.timestamp().await.unwrap();
    assert_eq!(total_at(&client, ts).await, expected);
    let pairs = client.scan(SPHERE, b"", b"", 100).await.unwrap();
    assert!(
        pairs.iter().all(|kv| balance(Some(kv.value.clone())) >= 0),
        "{pairs:?}"
    );
}

/// With the failpoint `txn-skip-write-conflict-check` (prewrites ignore writes committed
/// since their start), both writers of a key commit: the conflict check above catches it.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prewrite_that_skips_the_conflict_check_is_caught() {
    let _serial = SERIAL.lock().await;
    let (_dir, nodes, _addrs, client) = split_cluster().await;
    fail::cfg("txn-skip-write-conflict-check", "return").unwrap();
    let outcome = same_key_writers_conflict(&client).await;
    fail::remove("txn-skip-write-conflict-check");
    for n in nodes {
        n.shutdown().await.unwrap();
    }
    assert!(outcome.is_err(), "a lost update went unnoticed");
}

/// A transaction whose secondary key is still locked (the failpoint
/// `txn-skip-secondary-commits` leaves it so) is seen whole by a linearizable read right
/// after its commit, also on a range whose read timestamps were below the transaction's
/// start: the read meets the lock and rolls it forward instead of reading under it.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_after_a_commit_rolls_its_locked_secondary_forward() {
    let _serial = SERIAL.lock().await;
    let (_dir, nodes, _addrs, client) = split_cluster().await;
    client.put(SPHERE, b"z", b"old").await.unwrap();
    // Reads of the right range, at timestamps below the transaction's start.
    assert_eq!(
        client.get(SPHERE, b"z").await.unwrap(),
        Some(b"old".to_vec())
    );
    fail::cfg("txn-skip-secondary-commits", "return").unwrap();
    let written = client
        .batch(
            SPHERE,
            &[
                (b"a".to_vec(), Some(b"new".to_vec())),
                (b"z".to_vec(), Some(b"new".to_vec())),
            ],
        )
        .await;
    fail::remove("txn-skip-secondary-commits");
    written.unwrap();
    let z = client.get(SPHERE, b"z").await.unwrap();
    for n in nodes {
        n.shutdown().await.unwrap();
    }
    assert_eq!(
        z,
        Some(b"new".to_vec()),
        "a read missed an acknowledged transaction"
    );
}

const FAST_ELECTIONS: &[&str] = &[
    "--heartbeat-interval-ms",
    "50",
    "--election-timeout-ms",
    "300",
];

/// Runs `spheredb kv txn SCRIPT` against `addr` with the failpoints `failpoints` active in
/// the client process; returns its stdout.
fn run_txn_cli(addr: &str, script: &str, failpoints: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spheredb"))
        .args(["kv", "--host", addr, "--sphere", "9", "txn", script])
        .env("FAILPOINTS", failpoints)
        .output()
        .expect("running spheredb kv txn");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the `failpoints` feature (cargo test --workspace turns it on)"
)]
async fn locks_of_a_coordinator_killed_mid_commit_are_resolved_by_readers() {
    let cluster = ProcCluster::start(3, FAST_ELECTIONS).await;
    let client = cluster.client().await;
    client.split(&kv_key(SPHERE, b"m")).await.unwrap();
    let addr = cluster.procs[0].addr.clone();

    killed_after_primary_commit_is_rolled_forward(&client, &addr)
        .await
        .unwrap();

    // Killed after its prewrites, before the commit point: once its locks expire, readers
    // roll it back, and nothing of it is ever seen.
    let out = run_txn_cli(&addr, "put b 1; put y 2", "txn-exit-after-prewrite=return");
    assert!(!out.contains("committed"), "the coordinator ran on: {out}");
    let started = std::time::Instant::now();
    assert_eq!(client.get(SPHERE, b"y").await.unwrap(), None);
    assert_eq!(client.get(SPHERE, b"b").await.unwrap(), None);
    eprintln!(
        "the dead transaction's locks were resolved after {} ms",
        started.elapsed().as_millis()
    );
    // Its keys are free for others.
    let out = run_txn_cli(&addr, "put b 3; put y 4; get b", "");
    assert!(out.contains("b\t3") && out.contains("committed"), "{out}");
    assert_eq!(client.get(SPHERE, b"y").await.unwrap(), Some(b"4".to_vec()));
}

/// A coordinator killed between the primary's commit ("a", the first key) and the
/// secondary's ("z"): the transaction committed, so a reader of "z" must roll its lock
/// forward and see it whole. Returns what the reader saw otherwise.
async fn killed_after_primary_commit_is_rolled_forward(
    client: &Client,
    addr: &str,
) -> Result<(), String> {
    let out = run_txn_cli(
        addr,
        "put a 1; put z 2",
        "txn-exit-after-primary-commit=return",
    );
    if out.contains("committed") {
        return Err(format!("the coordinator ran on: {out}"));
    }
    let z = client.get(SPHERE, b"z").await.map_err(|e| e.to_string())?;
    let a = client.get(SPHERE, b"a").await.map_err(|e| e.to_string())?;
    if z.as_deref() != Some(b"2") || a.as_deref() != Some(b"1") {
        return Err(format!("half a transaction: a = {a:?}, z = {z:?}"));
    }
    Ok(())
}

/// With the failpoint `txn-reader-ignores-locks` on the nodes, a reader looks past the lock
/// the dead coordinator left on "z" and sees half of its transaction: caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the `failpoints` feature (cargo test --workspace turns it on)"
)]
async fn a_reader_that_ignores_locks_is_caught() {
    let mut cluster = ProcCluster::start(3, FAST_ELECTIONS).await;
    for p in &mut cluster.procs {
        p.kill9();
        p.env.push((
            "FAILPOINTS".into(),
            "txn-reader-ignores-locks=return".into(),
        ));
        p.spawn();
    }
    let client = cluster.client().await;
    common::eventually("the restarted cluster to take a write", || async {
        client.put(SPHERE, b"warm", b"up").await.ok()
    })
    .await;
    client.split(&kv_key(SPHERE, b"m")).await.unwrap();
    let addr = cluster.procs[0].addr.clone();
    let outcome = killed_after_primary_commit_is_rolled_forward(&client, &addr).await;
    assert!(
        outcome.is_err(),
        "a reader that ignores locks went unnoticed"
    );
}
