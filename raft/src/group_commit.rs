//! Group commit: one WAL fsync makes the appends of many Raft groups durable.
//!
//! A log append writes its entries to RocksDB without syncing, then hands its completion
//! callback to [`GroupCommit`]. One syncer thread takes every queued callback, fsyncs the WAL
//! once (which covers every write issued before the fsync began), and only then completes
//! the callbacks. openraft treats a completion as "durable up to here", so completing before
//! the fsync would be a durability bug; the `durability_callback_fires_only_after_sync` test
//! pins the order.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tokio::sync::Semaphore;

include!("commit_queue.rs");

/// Most completions waiting for one fsync; appends beyond it wait for a slot.
pub const GROUP_COMMIT_QUEUE_CAPACITY: usize = 8192;
/// Most completions released by one fsync.
pub const MAX_GROUP_COMMIT_BATCH: usize = 4096;

/// Something that can make every write issued so far durable.
pub trait WalSync: Send + Sync + 'static {
    /// Blocks until every write issued before the call is on stable storage.
    fn sync_wal(&self) -> io::Result<()>;
}

impl WalSync for spheredb_storage::Db {
    fn sync_wal(&self) -> io::Result<()> {
        spheredb_storage::Db::sync_wal(self).map_err(io::Error::from)
    }
}

/// A completion to run once the WAL is synced.
pub type Completion = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Counters for benchmarks and status.
#[derive(Debug, Default)]
pub struct GroupCommitStats {
    /// WAL fsyncs that succeeded.
    pub syncs: AtomicU64,
    /// Appends those fsyncs made durable.
    pub completions: AtomicU64,
}

/// The node's group committer. Cheap to clone; clones share the syncer.
#[derive(Clone)]
pub struct GroupCommit {
    queue: Arc<CommitQueue<Completion>>,
    slots: Arc<Semaphore>,
    stats: Arc<GroupCommitStats>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
    failure: Arc<Mutex<Option<String>>>,
}

/// The failpoint `wal-sync-fail` (off unless FAILPOINTS names it): the next fsync fails.
fn injected_sync_failure() -> Option<io::Error> {
    fail::fail_point!("wal-sync-fail", |_| Some(io::Error::other(
        "injected fsync failure (failpoint wal-sync-fail)"
    )));
    None
}

/// What the syncer thread does after a failed fsync: nothing more. After a failed fsync the
/// kernel may have dropped the dirty pages and cleared the error, so a retry can "succeed"
/// without the data on disk (PostgreSQL's fsyncgate). The failed batch is answered with the
/// error, the queue is closed so every later append fails too, and [`GroupCommit::failure`]
/// says why; the node then stops itself (fail-stop) rather than serve from a log it cannot
/// trust to be durable.
fn stop_after_failure(
    queue: &CommitQueue<Completion>,
    slots: &Semaphore,
    failure: &Mutex<Option<String>>,
    reason: String,
) {
    tracing::error!(%reason, "WAL sync failed; no further appends are accepted");
    failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert(reason);
    queue.close();
    slots.close();
}

impl GroupCommit {
    /// Starts the syncer thread over `wal`.
    pub fn start(wal: Arc<dyn WalSync>) -> io::Result<GroupCommit> {
        let queue = Arc::new(CommitQueue::<Completion>::new(GROUP_COMMIT_QUEUE_CAPACITY));
        let slots = Arc::new(Semaphore::new(GROUP_COMMIT_QUEUE_CAPACITY));
        let stats = Arc::new(GroupCommitStats::default());
        let failure = Arc::new(Mutex::new(None));
        let thread = {
            let (queue, slots, stats, failure) =
                (queue.clone(), slots.clone(), stats.clone(), failure.clone());
            std::thread::Builder::new()
                .name("spheredb-wal-sync".into())
                .spawn(move || {
                    // A panic here would leave every waiting append hanging: record it, so
                    // the node stops itself, and refuse further appends.
                    let run = std::panic::AssertUnwindSafe(|| {
                        while let Some(batch) = queue.pop_batch(MAX_GROUP_COMMIT_BATCH) {
                            fail::fail_point!("wal-sync-panic", |_| panic!(
                                "failpoint wal-sync-panic"
                            ));
                            let result =
                                injected_sync_failure().map_or_else(|| wal.sync_wal(), Err);
                            if result.is_ok() {
                                stats.syncs.fetch_add(1, Ordering::Relaxed);
                                stats
                                    .completions
                                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                            }
                            // Stop first, then answer: whoever sees the error finds the
                            // failure recorded and every later append refused.
                            if let Err(e) = &result {
                                stop_after_failure(
                                    &queue,
                                    &slots,
                                    &failure,
                                    format!("WAL fsync failed: {e}"),
                                );
                            }
                            let n = batch.len();
                            for done in batch {
                                done(match &result {
                                    Ok(()) => Ok(()),
                                    Err(e) => Err(io::Error::new(
                                        e.kind(),
                                        format!("WAL sync failed: {e}"),
                                    )),
                                });
                            }
                            slots.add_permits(n);
                        }
                    });
                    if std::panic::catch_unwind(run).is_err() {
                        stop_after_failure(
                            &queue,
                            &slots,
                            &failure,
                            "the WAL sync thread panicked".into(),
                        );
                    }
                })?
        };
        Ok(GroupCommit {
            queue,
            slots,
            stats,
            thread: Arc::new(Mutex::new(Some(thread))),
            failure,
        })
    }

    /// Why the group commit stopped accepting appends (a failed fsync or a panic of its
    /// thread), if it did. The node treats this as fatal.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Queues `done` to run after the next WAL sync. Waits while the queue is full.
    pub async fn submit(&self, done: Completion) -> io::Result<()> {
        let slot = match self.slots.acquire().await {
            Ok(slot) => slot,
            Err(_) => {
                // Closed by shutdown or after a failed fsync: every callback is answered.
                let why = self
                    .failure()
                    .unwrap_or_else(|| "group commit is shut down".into());
                done(Err(io::Error::other(why.clone())));
                return Err(io::Error::other(why));
            }
        };
        slot.forget();
        match self.queue.try_push(done) {
            Ok(()) => Ok(()),
            Err(PushError::Closed(done)) => {
                let err = io::Error::other("group commit is shut down");
                done(Err(io::Error::other("group commit is shut down")));
                Err(err)
            }
            Err(PushError::Full(done)) => {
                let msg = "group commit queue full despite a free slot";
                done(Err(io::Error::other(msg)));
                Err(io::Error::other(msg))
            }
        }
    }

    /// Counters since start.
    pub fn stats(&self) -> &GroupCommitStats {
        &self.stats
    }

    /// Syncs what is queued, completes it, and stops the syncer thread.
    pub fn shutdown(&self) {
        self.queue.close();
        self.slots.close();
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("WAL sync thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A WAL whose sync blocks until the test allows it, recording the order of events.
    struct GatedWal {
        events: Arc<Mutex<Vec<&'static str>>>,
        gate: Mutex<mpsc::Receiver<()>>,
    }

    impl WalSync for GatedWal {
        fn sync_wal(&self) -> io::Result<()> {
            self.gate
                .lock()
                .unwrap()
                .recv()
                .map_err(|_| io::Error::other("gate closed"))?;
            self.events.lock().unwrap().push("sync");
            Ok(())
        }
    }

    #[tokio::test]
    async fn durability_callback_fires_only_after_sync() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let (open_gate, gate) = mpsc::channel();
        let wal = Arc::new(GatedWal {
            events: events.clone(),
            gate: Mutex::new(gate),
        });
        let gc = GroupCommit::start(wal).unwrap();
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let ev = events.clone();
        gc.submit(Box::new(move |r| {
            ev.lock().unwrap().push("callback");
            let _ = tx.send(r.is_ok());
        }))
        .await
        .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(rx.try_recv().is_err(), "callback fired before the WAL sync");
        open_gate.send(()).unwrap();
        assert!(rx.await.unwrap());
        assert_eq!(*events.lock().unwrap(), vec!["sync", "callback"]);
        drop(open_gate);
        gc.shutdown();
    }

    struct CountingWal(AtomicU64);
    impl WalSync for CountingWal {
        fn sync_wal(&self) -> io::Result<()> {
            std::thread::sleep(std::time::Duration::from_millis(5));
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[tokio::test]
    async fn many_appends_share_few_syncs() {
        let wal = Arc::new(CountingWal(AtomicU64::new(0)));
        let gc = GroupCommit::start(wal.clone()).unwrap();
        let mut waits = Vec::new();
        for _ in 0..1000 {
            let (tx, rx) = tokio::sync::oneshot::channel();
            gc.submit(Box::new(move |r| {
                let _ = tx.send(r.is_ok());
            }))
            .await
            .unwrap();
            waits.push(rx);
        }
        for w in waits {
            assert!(w.await.unwrap());
        }
        let syncs = wal.0.load(Ordering::SeqCst);
        assert!(
            syncs < 1000,
            "expected batching, got {syncs} syncs for 1000 appends"
        );
        assert_eq!(gc.stats().completions.load(Ordering::Relaxed), 1000);
        gc.shutdown();
    }

    #[tokio::test]
    async fn failed_sync_fails_every_waiting_append() {
        struct FailingWal;
        impl WalSync for FailingWal {
            fn sync_wal(&self) -> io::Result<()> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let gc = GroupCommit::start(Arc::new(FailingWal)).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        gc.submit(Box::new(move |r| {
            let _ = tx.send(r);
        }))
        .await
        .unwrap();
        assert!(rx.await.unwrap().is_err());
        // Fail-stop: no append is accepted after a failed fsync (a retried fsync can report
        // success for pages the kernel already dropped), and the failure is reported.
        assert!(gc.failure().is_some_and(|f| f.contains("disk on fire")));
        let (tx, rx) = tokio::sync::oneshot::channel();
        assert!(gc
            .submit(Box::new(move |r| {
                let _ = tx.send(r);
            }))
            .await
            .is_err());
        assert!(rx.await.unwrap().is_err());
        gc.shutdown();
    }

    #[tokio::test]
    async fn a_panicking_sync_thread_is_reported_and_refuses_appends() {
        struct PanickingWal;
        impl WalSync for PanickingWal {
            fn sync_wal(&self) -> io::Result<()> {
                panic!("sync thread bug");
            }
        }
        let gc = GroupCommit::start(Arc::new(PanickingWal)).unwrap();
        let (tx, _rx) = tokio::sync::oneshot::channel::<io::Result<()>>();
        gc.submit(Box::new(move |r| {
            let _ = tx.send(r);
        }))
        .await
        .unwrap();
        for _ in 0..500 {
            if gc.failure().is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(
            gc.failure().as_deref(),
            Some("the WAL sync thread panicked")
        );
        assert!(gc.submit(Box::new(|_| {})).await.is_err());
        gc.shutdown();
    }
}

/// Model check of the queue with loom: every pushed item is popped exactly once, in
/// per-producer order, and the consumer ends once the queue is closed and drained.
#[cfg(test)]
mod loom_model {
    mod model {
        #![allow(dead_code)]
        use loom::sync::{Condvar, Mutex};
        use std::collections::VecDeque;
        include!("commit_queue.rs");
    }

    /// Loom explores every interleaving up to this many preemptions; enough to cover a
    /// producer racing the consumer's wait while keeping the model fast.
    const PREEMPTION_BOUND: usize = 3;

    #[test]
    fn queue_delivers_each_item_once_in_order() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(PREEMPTION_BOUND);
        builder.check(|| {
            use loom::sync::Arc;
            let q = Arc::new(model::CommitQueue::new(4));
            // Producer 0 pushes two items (order must hold), producer 1 pushes one.
            let producers: Vec<_> = [2u32, 1]
                .into_iter()
                .enumerate()
                .map(|(p, count)| {
                    let q = q.clone();
                    loom::thread::spawn(move || {
                        for i in 0..count {
                            assert!(q.try_push(p as u32 * 10 + i).is_ok());
                        }
                    })
                })
                .collect();
            let consumer = {
                let q = q.clone();
                loom::thread::spawn(move || {
                    let mut seen = Vec::new();
                    while let Some(batch) = q.pop_batch(2) {
                        assert!(!batch.is_empty() && batch.len() <= 2);
                        seen.extend(batch);
                    }
                    seen
                })
            };
            for p in producers {
                p.join().unwrap();
            }
            q.close();
            let seen = consumer.join().unwrap();
            assert_eq!(seen.len(), 3);
            let first: Vec<u32> = seen.iter().copied().filter(|v| v / 10 == 0).collect();
            assert_eq!(first, vec![0, 1]);
            assert!(seen.contains(&10));
        });
    }

    #[test]
    fn full_queue_refuses_and_closed_queue_refuses() {
        loom::model(|| {
            let q = model::CommitQueue::new(1);
            assert!(q.try_push(1).is_ok());
            assert!(matches!(q.try_push(2), Err(model::PushError::Full(2))));
            q.close();
            assert!(matches!(q.try_push(3), Err(model::PushError::Closed(3))));
            assert_eq!(q.pop_batch(8), Some(vec![1]));
            assert_eq!(q.pop_batch(8), None);
        });
    }
}
