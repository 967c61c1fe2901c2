//! Micro-benchmarks of the hot paths: key encoding, log append with group commit, state
//! machine apply, point read, and the whole write path of one Raft group in-process
//! (proposal, log append, group-commit fsync, commit, apply, answer). Run with
//! `cargo bench -p spheredb-bench`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::type_config::TypeConfigExt;
use openraft::vote::RaftLeaderIdExt;
use spheredb_engine::range::commit_ts::Epoch;
use spheredb_engine::range::timestamps::{Proposal, RangeClock};
use spheredb_raft::group_commit::GroupCommit;
use spheredb_raft::log_store::LogStore;
use spheredb_raft::state_machine::StateMachine;
use spheredb_raft::{Command, Entry, LogId, TypeConfig, WriteOp};
use spheredb_storage::keys::{self, Datum};
use spheredb_storage::{Db, DbOptions};

/// Concurrent appenders in the group-commit benchmark (ranges writing at once).
const APPENDERS: usize = 64;
/// Value size used throughout, as in the load benchmarks.
const VALUE_SIZE_BYTES: usize = 256;

fn log_id(index: u64) -> LogId {
    openraft::LogId::new(
        openraft::vote::leader_id_adv::LeaderId::<u64, u64>::new_committed(1, 1),
        index,
    )
}

fn write_entry(index: u64) -> Entry {
    Entry::new_normal(
        log_id(index),
        Command::Write {
            ops: vec![WriteOp {
                key: keys::kv_key(1, format!("user{index:012}").as_bytes()),
                value: Some(vec![b'x'; VALUE_SIZE_BYTES]),
            }],
            commit_ts: Some(index),
        },
    )
}

fn key_encoding(c: &mut Criterion) {
    let mut g = c.benchmark_group("keys");
    g.throughput(Throughput::Elements(1));
    g.bench_function("kv_key", |b| {
        b.iter(|| keys::kv_key(std::hint::black_box(42), b"user000000001234"))
    });
    let pk = vec![Datum::Int(123_456), Datum::Text("album/summer".into())];
    g.bench_function("sql_row_key", |b| {
        b.iter(|| keys::sql_row_key(1, 2, 3, std::hint::black_box(&pk)))
    });
    let encoded = keys::sql_row_key(1, 2, 3, &pk);
    g.bench_function("decode_sql_row_key", |b| {
        b.iter(|| keys::decode_sql_row_key(std::hint::black_box(&encoded)))
    });
    g.finish();
}

fn log_append(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Db::open(dir.path(), &DbOptions::default()).expect("open db");
    let gc = GroupCommit::start(Arc::new(db.clone())).expect("group commit");
    let stores: Vec<LogStore> = (0..APPENDERS as u64)
        .map(|r| LogStore::new(db.clone(), r + 1, gc.clone()))
        .collect();
    let mut next_index = 1u64;
    let mut g = c.benchmark_group("log_append");
    g.throughput(Throughput::Elements(APPENDERS as u64));
    g.sample_size(20);
    let (syncs_before, done_before) = (
        gc.stats().syncs.load(Ordering::Relaxed),
        gc.stats().completions.load(Ordering::Relaxed),
    );
    g.bench_function(format!("{APPENDERS}_ranges_one_entry_each_durable"), |b| {
        b.iter(|| {
            let index = next_index;
            next_index += 1;
            rt.block_on(async {
                let waits: Vec<_> = stores
                    .iter()
                    .map(|s| {
                        let mut s = s.clone();
                        tokio::spawn(async move {
                            let (tx, rx) = TypeConfig::oneshot();
                            s.append([write_entry(index)], IOFlushed::signal(tx))
                                .await
                                .expect("append");
                            rx.await.expect("callback").expect("durable");
                        })
                    })
                    .collect();
                for w in waits {
                    w.await.expect("appender");
                }
            })
        })
    });
    g.finish();
    let syncs = gc.stats().syncs.load(Ordering::Relaxed) - syncs_before;
    let done = gc.stats().completions.load(Ordering::Relaxed) - done_before;
    eprintln!(
        "group commit: {done} appends in {syncs} WAL fsyncs = {:.1} appends per fsync",
        done as f64 / syncs.max(1) as f64
    );
    gc.shutdown();
}

/// Receiver of a state machine's range events.
type EventsRx = tokio::sync::mpsc::Receiver<spheredb_raft::state_machine::RangeEvent>;

/// Range 1 covering the whole keyspace with `membership`, as bootstrap creates it, written
/// into `db`, and its state machine (snapshots under `dir/snap`) with the receiver of its
/// range events, which the caller keeps while the state machine lives.
fn whole_keyspace_range(
    db: &Db,
    dir: &std::path::Path,
    membership: spheredb_raft::Membership,
) -> (StateMachine, EventsRx) {
    let span = spheredb_raft::RangeSpan {
        range_id: 1,
        start_key: Vec::new(),
        end_key: Vec::new(),
        generation: 1,
        next_replica_id: 2,
    };
    let mut batch = rocksdb::WriteBatch::default();
    spheredb_raft::state_machine::write_range_origin(
        db,
        &mut batch,
        &span,
        membership,
        spheredb_raft::RangeTimes::default(),
    )
    .expect("origin");
    db.write(batch, true).expect("write origin");
    let (events, events_rx) =
        tokio::sync::mpsc::channel(spheredb_raft::state_machine::MAX_PENDING_RANGE_EVENTS);
    let (sm, _shared) = StateMachine::open(
        db.clone(),
        1,
        1,
        &dir.join("snap"),
        Default::default(),
        events,
    )
    .expect("sm");
    (sm, events_rx)
}

fn apply_and_read(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Db::open(&dir.path().join("db"), &DbOptions::default()).expect("open db");
    let (mut sm, _events_rx) = whole_keyspace_range(&db, dir.path(), Default::default());
    let mut next_index = 1u64;
    let mut g = c.benchmark_group("state_machine");
    const ENTRIES_PER_APPLY: u64 = 64;
    g.throughput(Throughput::Elements(ENTRIES_PER_APPLY));
    g.bench_function("apply_64_puts", |b| {
        b.iter_batched(
            || {
                let first = next_index;
                next_index += ENTRIES_PER_APPLY;
                (first..first + ENTRIES_PER_APPLY)
                    .map(write_entry)
                    .collect::<Vec<_>>()
            },
            |entries| {
                rt.block_on(sm.apply(futures::stream::iter(
                    entries.into_iter().map(|e| Ok((e, None))),
                )))
                .expect("apply")
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("read");
    g.throughput(Throughput::Elements(1));
    let written = next_index.max(2);
    let mut i = 0u64;
    g.bench_function("point_read", |b| {
        b.iter(|| {
            i = (i + 7919) % (written - 1) + 1;
            spheredb_storage::mvcc::store::get_at(
                &db,
                None,
                &keys::kv_key(1, format!("user{i:012}").as_bytes()),
                u64::MAX,
            )
            .expect("read")
        })
    });
    g.finish();
}

/// Concurrent proposers in the propose-to-apply benchmark, as many as the load benchmark's
/// largest client count.
const PROPOSERS: usize = 256;
/// Longest the one-voter group may take to elect itself.
const ELECTION_WAIT_MS: u64 = 10_000;

/// One range on one node with one voter, through openraft: what a write costs without the
/// network, from `client_write` until its answer (applied, durable on the WAL).
fn propose_to_apply(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Db::open(&dir.path().join("db"), &DbOptions::default()).expect("open db");
    let gc = GroupCommit::start(Arc::new(db.clone())).expect("group commit");
    let membership = spheredb_raft::Membership::new(
        vec![std::collections::BTreeSet::from([1])],
        std::collections::BTreeMap::from([(
            1,
            spheredb_raft::ReplicaNode {
                node_id: 1,
                // Never dialled: a single voter replicates to no one.
                addr: "127.0.0.1:1".into(),
            },
        )]),
    )
    .expect("membership");
    let (sm, _events_rx) = whole_keyspace_range(&db, dir.path(), membership);
    let config = openraft::Config {
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        ..Default::default()
    };
    let peers = spheredb_raft::network::PeerChannels::new(1, None, Default::default());
    let raft = rt
        .block_on(spheredb_raft::RaftHandle::new(
            1,
            Arc::new(config.validate().expect("raft config")),
            peers.factory(1),
            LogStore::new(db.clone(), 1, gc.clone()),
            sm,
        ))
        .expect("raft");
    rt.block_on(
        raft.wait(Some(std::time::Duration::from_millis(ELECTION_WAIT_MS)))
            .state(
                openraft::ServerState::Leader,
                "the single voter elects itself",
            ),
    )
    .expect("leader");
    let mut next_key = 0u64;
    let put = |i: u64, commit_ts: u64| Command::Write {
        ops: vec![WriteOp {
            key: keys::kv_key(1, format!("user{i:012}").as_bytes()),
            value: Some(vec![b'x'; VALUE_SIZE_BYTES]),
        }],
        commit_ts: Some(commit_ts),
    };
    let mut g = c.benchmark_group("write_path");
    g.throughput(Throughput::Elements(PROPOSERS as u64));
    g.sample_size(20);
    // The entry alone: timestamps from a counter, no rules.
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(1));
    g.bench_function(
        format!("{PROPOSERS}_concurrent_puts_propose_to_apply"),
        |b| {
            b.iter(|| {
                let counter = counter.clone();
                concurrent_writes(&rt, &mut next_key, |i| {
                    let (raft, counter) = (raft.clone(), counter.clone());
                    async move {
                        let ts = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        raft.client_write(put(i, ts)).await.expect("write");
                    }
                })
            })
        },
    );
    // As the KV service writes: the commit ts fixed under the range's rules, the proposal
    // made while they are held and conditional on the leader, the keys in flight until
    // applied. Timestamps come from a counter standing in for the node's oracle batch.
    let clock = Arc::new(RangeClock::default());
    let leader_id = raft.as_leader().expect("leader").to_committed_leader_id();
    let epoch = Epoch {
        term: 1,
        generation: 1,
    };
    rt.block_on(clock.seed(epoch, 1));
    g.bench_function(
        format!("{PROPOSERS}_concurrent_puts_with_commit_ts_rules"),
        |b| {
            b.iter(|| {
                concurrent_writes(&rt, &mut next_key, |i| {
                    let (raft, clock, counter) = (raft.clone(), clock.clone(), counter.clone());
                    async move {
                        let proposal = Proposal {
                            epoch,
                            leader_id,
                            keys: vec![keys::kv_key(1, format!("user{i:012}").as_bytes())],
                            timeout_ms: ELECTION_WAIT_MS,
                            txn_commit_ts: None,
                        };
                        let take = move |floor: u64| {
                            let ts =
                                counter.fetch_max(floor + 1, std::sync::atomic::Ordering::Relaxed);
                            Ok(ts.max(floor + 1))
                        };
                        clock
                            .propose(raft, proposal, take, move |ts| put(i, ts))
                            .await
                            .expect("write");
                    }
                })
            })
        },
    );
    g.finish();
    rt.block_on(raft.shutdown()).expect("shutdown");
    gc.shutdown();
}

/// Runs [`PROPOSERS`] writes at once, keys from `next_key` on, each as `write` builds it.
fn concurrent_writes<Fut>(
    rt: &tokio::runtime::Runtime,
    next_key: &mut u64,
    write: impl Fn(u64) -> Fut,
) where
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let first = *next_key;
    *next_key += PROPOSERS as u64;
    rt.block_on(async {
        let writes: Vec<_> = (first..first + PROPOSERS as u64)
            .map(|i| tokio::spawn(write(i)))
            .collect();
        for w in writes {
            w.await.expect("proposer");
        }
    })
}

criterion_group!(
    benches,
    key_encoding,
    log_append,
    apply_and_read,
    propose_to_apply
);
criterion_main!(benches);
