//! Transactions: snapshot isolation over any keys of any spheres and ranges (Percolator, as
//! TiKV), and the resolution of the locks readers and writers meet.
//!
//! A [`Txn`] reads at its start timestamp and buffers its writes. Its commit takes one of two
//! paths:
//!
//! - every key in one range: one `CommitOnePhase` call, one Raft entry (1PC);
//! - otherwise two phases: prewrite every key (a lock each, all keys of one range in one
//!   call), take a commit timestamp from the oracle, commit the primary key (the commit
//!   point), then the other keys in the background. Locks the background commit misses (the
//!   client died) are rolled forward by whoever meets them next.
//!
//! A reader that meets a lock asks the lock's primary for its transaction's status: committed
//! → the lock is committed too; rolled back or expired → it is rolled back; running → the
//! reader waits and asks again. A running transaction keeps its primary's lock alive with
//! heartbeats.
//!
//! ```no_run
//! # async fn demo(client: spheredb_client::Client) -> Result<(), spheredb_client::ClientError> {
//! // Move 10 from account a to account b, retried on conflicts.
//! client
//!     .transact(|txn| {
//!         Box::pin(async move {
//!             let read = |v: Option<Vec<u8>>| -> i64 {
//!                 v.and_then(|v| String::from_utf8(v).ok()?.parse().ok()).unwrap_or(0)
//!             };
//!             let a = read(txn.get(1, b"a").await?);
//!             let b = read(txn.get(1, b"b").await?);
//!             txn.put(1, b"a", (a - 10).to_string().as_bytes())?;
//!             txn.put(1, b"b", (b + 10).to_string().as_bytes())?;
//!             Ok(())
//!         })
//!     })
//!     .await
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use spheredb_storage::keys::{self, Keyspace};
use spheredb_storage::mvcc::physical_ms;

use crate::client::{Client, Retry};
use crate::error::ClientError;
use crate::limits::{check_key, check_value};
use crate::proto::v1::txn_client::TxnClient;
use crate::proto::v1::txn_mutation::Op as WireOp;
use crate::proto::v1::txn_status_response::State as WireState;
use crate::proto::v1::{
    CheckTxnStatusRequest, CommitOnePhaseRequest, CommitRequest, Header, KeyValue, LockInfo,
    PessimisticLockRequest, PrewriteRequest, RollbackRequest, TxnHeartbeatRequest, TxnMutation,
    TxnStatusResponse,
};
use tonic::transport::Channel;

/// Default TTL of a transaction's locks: after this long without a heartbeat, a transaction
/// whose client died is rolled back by the first reader or writer that meets its locks.
pub const DEFAULT_LOCK_TTL_MS: u64 = 3_000;
/// A running transaction's heartbeat raises its primary's TTL this often, to the time it has
/// run plus [`DEFAULT_LOCK_TTL_MS`].
pub const HEARTBEAT_INTERVAL_MS: u64 = 1_000;
/// Rounds of lock resolution one read or write goes through before it gives up with
/// `Locked`: a lock whose transaction is alive is waited for, with a backoff from
/// [`LOCK_BACKOFF_INITIAL_MS`] to [`LOCK_BACKOFF_MAX_MS`].
pub const MAX_LOCK_RESOLUTION_ROUNDS: u32 = 64;
pub const LOCK_BACKOFF_INITIAL_MS: u64 = 5;
pub const LOCK_BACKOFF_MAX_MS: u64 = 200;
/// Attempts of [`Client::transact`] (each a new transaction) before it returns the last
/// conflict; between them a backoff from [`TRANSACT_BACKOFF_INITIAL_MS`] doubles up to
/// [`TRANSACT_BACKOFF_MAX_MS`], jittered.
pub const MAX_TRANSACT_ATTEMPTS: u32 = 32;
pub const TRANSACT_BACKOFF_INITIAL_MS: u64 = 2;
pub const TRANSACT_BACKOFF_MAX_MS: u64 = 250;
/// Attempts of the primary's commit when its outcome is unknown (a commit is idempotent, so
/// it is sent again until it is known), before the transaction ends `OutcomeUnknown`.
pub const MAX_PRIMARY_COMMIT_ATTEMPTS: u32 = 8;
/// Attempts to commit one range's secondary keys in the background before leaving them to
/// be rolled forward by the readers that meet them.
pub const MAX_SECONDARY_COMMIT_ATTEMPTS: u32 = 4;

/// The body of a [`Client::transact`]: runs against the transaction it is given.
pub type TxnBody<'t, T> = Pin<Box<dyn Future<Output = Result<T, ClientError>> + Send + 't>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxnState {
    Active,
    Committed,
    RolledBack,
    /// The primary's commit at `commit_ts` was sent: from here on the transaction may have
    /// committed, so nothing of it is rolled back (readers resolve what is left).
    Committing {
        commit_ts: u64,
    },
    /// The primary's commit at `commit_ts` did not answer.
    CommitUnknown {
        commit_ts: u64,
    },
}

/// A transaction: reads see the database as of its start timestamp plus its own writes;
/// writes are buffered until [`Txn::commit`]. Dropping an active transaction rolls back the
/// locks it took (in the background).
pub struct Txn {
    client: Client,
    start_ts: u64,
    /// Buffered writes by encoded key: a put (`Some`) or a delete (`None`).
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Keys pessimistically locked ([`Txn::lock`]), encoded.
    locked: BTreeSet<Vec<u8>>,
    /// The primary key, fixed by the first lock or at commit.
    primary: Option<Vec<u8>>,
    /// Keys that may hold this transaction's locks (to roll back on failure).
    maybe_locked: BTreeSet<Vec<u8>>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    state: TxnState,
    /// When the start timestamp was handed out (about): lock TTLs count from it.
    began: Instant,
    /// Begun at a timestamp of the caller's ([`Client::begin_at`]): reads only.
    read_only: bool,
}

impl Client {
    /// Begins a transaction at a fresh timestamp from the oracle: it sees every transaction
    /// and write acknowledged before this call.
    pub async fn begin(&self) -> Result<Txn, ClientError> {
        let start_ts = self.timestamp().await?;
        Ok(self.txn_at(start_ts, false))
    }

    /// Begins a read-only transaction that sees the database as of `ts` (history): every
    /// transaction committed at or below `ts`, none above. Reads at a `ts` the oracle has not
    /// handed out yet are refused (`InvalidArgument`), and reads below the GC horizon answer
    /// `HistoryCompacted`; writes and locks are refused. Timestamp 0 is refused: reads take
    /// it for "the latest".
    pub fn begin_at(&self, ts: u64) -> Result<Txn, ClientError> {
        if ts == 0 {
            return Err(ClientError::InvalidArgument(
                "timestamp 0 is before any write; read at a timestamp the oracle handed out".into(),
            ));
        }
        Ok(self.txn_at(ts, true))
    }

    fn txn_at(&self, start_ts: u64, read_only: bool) -> Txn {
        Txn {
            client: self.clone(),
            start_ts,
            writes: BTreeMap::new(),
            locked: BTreeSet::new(),
            primary: None,
            maybe_locked: BTreeSet::new(),
            heartbeat: None,
            state: TxnState::Active,
            began: Instant::now(),
            read_only,
        }
    }

    /// Runs `body` in a transaction and commits it; on a write conflict, a lock that outlived
    /// its resolution or an abort, runs it again in a new transaction (at most
    /// [`MAX_TRANSACT_ATTEMPTS`] times, with a backoff). `body` may run several times, so it
    /// must do nothing but read and write through its transaction. Any other error is
    /// returned at once; `OutcomeUnknown` means the commit may have happened.
    ///
    /// The future `body` returns may borrow the transaction only: give it owned copies of
    /// anything else it uses (clone them in the closure, before `async move`).
    pub async fn transact<T, F>(&self, mut body: F) -> Result<T, ClientError>
    where
        F: for<'t> FnMut(&'t mut Txn) -> TxnBody<'t, T>,
    {
        let mut backoff_ms = TRANSACT_BACKOFF_INITIAL_MS;
        let mut last = None;
        for _ in 0..MAX_TRANSACT_ATTEMPTS {
            let mut txn = self.begin().await?;
            let outcome = match body(&mut txn).await {
                Ok(value) => txn.commit().await.map(|()| value),
                Err(e) => {
                    txn.rollback().await.ok();
                    Err(e)
                }
            };
            match outcome {
                Err(
                    e @ (ClientError::WriteConflict { .. }
                    | ClientError::Locked { .. }
                    | ClientError::TxnAborted(_)),
                ) => last = Some(e),
                other => return other,
            }
            tokio::time::sleep(Duration::from_millis(jitter(backoff_ms))).await;
            backoff_ms = (backoff_ms * 2).min(TRANSACT_BACKOFF_MAX_MS);
        }
        Err(last.unwrap_or_else(|| ClientError::Internal("no transaction attempt ran".into())))
    }

    /// Runs `attempt` until no lock stands in its way: every `Locked` answer has its locks
    /// resolved through their primaries, and a lock whose transaction still runs is waited
    /// for. At most [`MAX_LOCK_RESOLUTION_ROUNDS`] rounds and one call deadline.
    pub(crate) async fn resolving_locks<T, F, Fut>(&self, mut attempt: F) -> Result<T, ClientError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let started = Instant::now();
        let deadline = Duration::from_millis(self.options().call_deadline_ms);
        let mut backoff_ms = LOCK_BACKOFF_INITIAL_MS;
        let mut last = None;
        for _ in 0..MAX_LOCK_RESOLUTION_ROUNDS {
            match attempt().await {
                Err(ClientError::Locked { message, locks }) => {
                    let all_resolved = self.resolve_locks(&locks).await?;
                    last = Some(ClientError::Locked { message, locks });
                    if !all_resolved {
                        if started.elapsed() >= deadline {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                        backoff_ms = (backoff_ms * 2).min(LOCK_BACKOFF_MAX_MS);
                    }
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Internal("no attempt ran".into())))
    }

    /// Resolves `locks`: asks each transaction's primary for its status (one check per
    /// transaction) and commits or rolls back its locks here accordingly. Returns whether
    /// every lock was resolved (not: a transaction still running, or its prewrite of the
    /// primary still on its way).
    pub async fn resolve_locks(&self, locks: &[LockInfo]) -> Result<bool, ClientError> {
        let mut by_txn: HashMap<(u64, Vec<u8>), Vec<&LockInfo>> = HashMap::new();
        for lock in locks {
            by_txn
                .entry((lock.start_ts, lock.primary.clone()))
                .or_default()
                .push(lock);
        }
        let mut all_resolved = true;
        for ((start_ts, primary), locks) in by_txn {
            let current_ts = self.timestamp().await?;
            // A transaction that left no trace on its primary is rolled back only once one of
            // its locks expired: until then its prewrite of the primary may be on its way.
            let expired = locks.iter().any(|l| {
                physical_ms(current_ts) >= physical_ms(l.start_ts).saturating_add(l.ttl_ms)
            });
            let status = self
                .check_txn_status(&primary, start_ts, current_ts, expired)
                .await?;
            let keys: Vec<Vec<u8>> = locks.iter().map(|l| l.key.clone()).collect();
            match WireState::try_from(status.state) {
                Ok(WireState::Committed) => {
                    self.commit_keys(&keys, start_ts, status.commit_ts).await?;
                }
                Ok(WireState::RolledBack) => self.rollback_keys(&keys, start_ts).await?,
                Ok(WireState::Alive | WireState::NotFound) => all_resolved = false,
                Err(_) => {
                    return Err(ClientError::Internal(format!(
                        "unknown transaction state {}",
                        status.state
                    )))
                }
            }
        }
        Ok(all_resolved)
    }

    async fn check_txn_status(
        &self,
        primary: &[u8],
        start_ts: u64,
        current_ts: u64,
        rollback_if_missing: bool,
    ) -> Result<TxnStatusResponse, ClientError> {
        self.call_with(
            primary,
            Retry::Always,
            Client::txn_stub,
            |mut txn, header, _| async move {
                Ok(txn
                    .check_txn_status(CheckTxnStatusRequest {
                        header: Some(header),
                        primary: primary.to_vec(),
                        start_ts,
                        current_ts,
                        rollback_if_missing,
                    })
                    .await?
                    .into_inner())
            },
        )
        .await
    }

    /// Whether this client's range map puts every key of `keys` in one range.
    async fn one_range(&self, keys: &[Vec<u8>]) -> Result<bool, ClientError> {
        let mut ids = BTreeSet::new();
        for key in keys {
            let range = match self.cached_range(key) {
                Some(r) => Some(r),
                None => {
                    self.refresh_ranges().await?;
                    self.cached_range(key)
                }
            };
            ids.insert(range.map(|r| r.range_id));
        }
        Ok(ids.len() == 1 && !ids.contains(&None))
    }

    /// Sends `op` once for the keys of `keys` in each range: the keys of the range holding
    /// the first key left, as the call finds that range (a map gone stale is corrected by
    /// the server's answer), until every key was sent. Each call ends with one key fewer at
    /// least, so there are at most `keys.len()` rounds.
    async fn per_range<F, Fut>(&self, keys: &[Vec<u8>], op: F) -> Result<(), ClientError>
    where
        F: Fn(TxnClient<Channel>, Header, Vec<Vec<u8>>) -> Fut,
        Fut: Future<Output = Result<(), tonic::Status>>,
    {
        let mut pending: BTreeSet<Vec<u8>> = keys.iter().cloned().collect();
        while let Some(first) = pending.first().cloned() {
            let (pending_ref, op) = (&pending, &op);
            let sent: Vec<Vec<u8>> = self
                .call_with(
                    &first,
                    Retry::Always,
                    Client::txn_stub,
                    |txn, header, range| {
                        let subset: Vec<Vec<u8>> = pending_ref
                            .iter()
                            .filter(|k| keys::span_contains(&range.start_key, &range.end_key, k))
                            .cloned()
                            .collect();
                        async move {
                            op(txn, header, subset.clone()).await?;
                            Ok(subset)
                        }
                    },
                )
                .await?;
            if !sent.contains(&first) {
                return Err(ClientError::Internal(
                    "a range answered for keys without the key it was asked for".into(),
                ));
            }
            for key in sent {
                pending.remove(&key);
            }
        }
        Ok(())
    }

    /// Commits `keys` (all of one transaction's locks) at `commit_ts`.
    async fn commit_keys(
        &self,
        keys: &[Vec<u8>],
        start_ts: u64,
        commit_ts: u64,
    ) -> Result<(), ClientError> {
        self.per_range(keys, |mut txn, header, keys| async move {
            txn.commit(CommitRequest {
                header: Some(header),
                keys,
                start_ts,
                commit_ts,
            })
            .await?;
            Ok(())
        })
        .await
    }

    /// Rolls a transaction back on `keys`: its primary first, alone, and the other keys only
    /// once that succeeded. A rollback refused on the primary (the transaction committed)
    /// then touches nothing else, so no committed transaction loses a key to it.
    async fn roll_back_txn(
        &self,
        primary: Option<&[u8]>,
        keys: &[Vec<u8>],
        start_ts: u64,
    ) -> Result<(), ClientError> {
        if let Some(primary) = primary {
            self.rollback_keys(&[primary.to_vec()], start_ts).await?;
        }
        let rest: Vec<Vec<u8>> = keys
            .iter()
            .filter(|k| Some(k.as_slice()) != primary)
            .cloned()
            .collect();
        if rest.is_empty() {
            return Ok(());
        }
        self.rollback_keys(&rest, start_ts).await
    }

    /// Rolls `keys` of one transaction back.
    async fn rollback_keys(&self, keys: &[Vec<u8>], start_ts: u64) -> Result<(), ClientError> {
        self.per_range(keys, |mut txn, header, keys| async move {
            txn.rollback(RollbackRequest {
                header: Some(header),
                keys,
                start_ts,
            })
            .await?;
            Ok(())
        })
        .await
    }
}

/// The TTL of the locks of a transaction that began at `began`: a lock expires its TTL after
/// the physical time of the start ts, so a transaction asks for how long it has run, plus
/// [`DEFAULT_LOCK_TTL_MS`].
fn lock_ttl_ms(began: Instant) -> u64 {
    (began.elapsed().as_millis() as u64).saturating_add(DEFAULT_LOCK_TTL_MS)
}

/// `ms` with up to half of it added at random, so that transactions retrying after the same
/// conflict do not collide again in step.
fn jitter(ms: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    ms + nanos % (ms / 2 + 1)
}

impl Txn {
    /// The transaction's start timestamp: its snapshot, and its identity (the key a commit
    /// that ended `OutcomeUnknown` is retried under).
    pub fn start_ts(&self) -> u64 {
        self.start_ts
    }

    fn check_active(&self) -> Result<(), ClientError> {
        match self.state {
            TxnState::Active => Ok(()),
            TxnState::Committed => Err(ClientError::InvalidArgument(
                "the transaction already committed; begin another".into(),
            )),
            TxnState::RolledBack => Err(ClientError::TxnAborted(
                "the transaction was rolled back; begin another".into(),
            )),
            TxnState::Committing { .. } | TxnState::CommitUnknown { .. } => {
                Err(ClientError::InvalidArgument(
                    "the transaction's commit outcome is unknown; call commit again to learn it"
                        .into(),
                ))
            }
        }
    }

    /// Refuses a write or a lock in a read-only transaction.
    fn check_writable(&self) -> Result<(), ClientError> {
        self.check_active()?;
        if self.read_only {
            return Err(ClientError::InvalidArgument(format!(
                "the transaction reads history as of {} and cannot write or lock; write in a \
                 transaction begun now",
                self.start_ts
            )));
        }
        Ok(())
    }

    /// Whether the transaction reads history only ([`Client::begin_at`]).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Reads `key` of `sphere` as of the transaction's start, or as this transaction wrote it.
    pub async fn get(&mut self, sphere: u64, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        self.get_in(Keyspace::Kv, sphere, key).await
    }

    /// As [`Txn::get`], in either keyspace of the sphere.
    pub async fn get_in(
        &mut self,
        keyspace: Keyspace,
        sphere: u64,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, ClientError> {
        self.check_active()?;
        check_key(key)?;
        if let Some(buffered) = self.writes.get(&keyspace.key(sphere, key)) {
            return Ok(buffered.clone());
        }
        self.client
            .get_at_in(keyspace, sphere, key, self.start_ts)
            .await
    }

    /// Up to `limit` pairs of `sphere` with `start <= key < end` (empty `end`: to the end of
    /// the sphere) as of the transaction's start, with this transaction's own writes applied.
    pub async fn scan(
        &mut self,
        sphere: u64,
        start: &[u8],
        end: &[u8],
        limit: u32,
    ) -> Result<Vec<KeyValue>, ClientError> {
        self.scan_in(Keyspace::Kv, sphere, start, end, limit).await
    }

    /// As [`Txn::scan`], in either keyspace of the sphere.
    pub async fn scan_in(
        &mut self,
        keyspace: Keyspace,
        sphere: u64,
        start: &[u8],
        end: &[u8],
        limit: u32,
    ) -> Result<Vec<KeyValue>, ClientError> {
        Ok(self
            .scan_page_in(keyspace, sphere, start, end, limit)
            .await?
            .0)
    }

    /// One page of a scan in either keyspace of the sphere: up to `limit` pairs, and where
    /// the next page starts (inclusive) if the span may hold more. A page may hold fewer than
    /// `limit` pairs and still have a next one (this transaction deleted some of it), so a
    /// caller that pages goes on until there is no next start.
    pub async fn scan_page_in(
        &mut self,
        keyspace: Keyspace,
        sphere: u64,
        start: &[u8],
        end: &[u8],
        limit: u32,
    ) -> Result<(Vec<KeyValue>, Option<Vec<u8>>), ClientError> {
        self.check_active()?;
        let stored = self
            .client
            .scan_at_in(keyspace, sphere, start, end, limit, self.start_ts)
            .await?;
        // The stored page ends at its limit: own writes past its last key wait for the next.
        let page_full = limit != 0 && stored.len() as u32 >= limit;
        let last = stored.last().map(|kv| kv.key.clone());
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> =
            stored.into_iter().map(|kv| (kv.key, kv.value)).collect();
        let lo = keyspace.key(sphere, start);
        let hi = if end.is_empty() {
            keyspace.span(sphere).1
        } else {
            keyspace.key(sphere, end)
        };
        for (key, value) in self.writes.range(lo..hi) {
            let Some((_, _, user)) = keys::decode_sphere_key(key) else {
                continue;
            };
            if page_full && last.as_deref().is_some_and(|l| user > l) {
                continue;
            }
            match value {
                Some(v) => merged.insert(user.to_vec(), v.clone()),
                None => merged.remove(user),
            };
        }
        let limit = if limit == 0 { u32::MAX } else { limit } as usize;
        let truncated = merged.len() > limit;
        let page: Vec<KeyValue> = merged
            .into_iter()
            .take(limit)
            .map(|(key, value)| KeyValue { key, value })
            .collect();
        let after = |key: &[u8]| {
            let mut next = key.to_vec();
            next.push(0);
            next
        };
        let next = if truncated {
            page.last().map(|kv| after(&kv.key))
        } else if page_full {
            last.as_deref().map(after)
        } else {
            None
        };
        Ok((page, next))
    }

    /// Buffers `key = value` in `sphere`.
    pub fn put(&mut self, sphere: u64, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        self.put_in(Keyspace::Kv, sphere, key, value)
    }

    /// As [`Txn::put`], in either keyspace of the sphere.
    pub fn put_in(
        &mut self,
        keyspace: Keyspace,
        sphere: u64,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), ClientError> {
        self.check_writable()?;
        check_key(key)?;
        check_value(value)?;
        self.writes
            .insert(keyspace.key(sphere, key), Some(value.to_vec()));
        Ok(())
    }

    /// Buffers the delete of `key` in `sphere`.
    pub fn delete(&mut self, sphere: u64, key: &[u8]) -> Result<(), ClientError> {
        self.delete_in(Keyspace::Kv, sphere, key)
    }

    /// As [`Txn::delete`], in either keyspace of the sphere.
    pub fn delete_in(
        &mut self,
        keyspace: Keyspace,
        sphere: u64,
        key: &[u8],
    ) -> Result<(), ClientError> {
        self.check_writable()?;
        check_key(key)?;
        self.writes.insert(keyspace.key(sphere, key), None);
        Ok(())
    }

    /// Locks `key` of `sphere` now, without writing it (`SELECT ... FOR UPDATE`): until this
    /// transaction ends, other transactions cannot write it, and this one commits only if
    /// nobody wrote it since the transaction began (else `WriteConflict` at once).
    pub async fn lock(&mut self, sphere: u64, key: &[u8]) -> Result<(), ClientError> {
        self.lock_in(Keyspace::Kv, sphere, key).await
    }

    /// As [`Txn::lock`], in either keyspace of the sphere.
    pub async fn lock_in(
        &mut self,
        keyspace: Keyspace,
        sphere: u64,
        key: &[u8],
    ) -> Result<(), ClientError> {
        self.check_writable()?;
        check_key(key)?;
        let key = keyspace.key(sphere, key);
        if self.locked.contains(&key) {
            return Ok(());
        }
        // The primary is fixed once its lock is taken: a first lock that fails leaves none.
        let primary = self.primary.clone().unwrap_or_else(|| key.clone());
        self.maybe_locked.insert(key.clone());
        let (client, start_ts, began) = (&self.client, self.start_ts, self.began);
        let key_ref = &key;
        let primary_ref = &primary;
        client
            .resolving_locks(|| {
                client.call_with(
                    key_ref,
                    Retry::Always,
                    Client::txn_stub,
                    |mut txn, header, _| async move {
                        txn.pessimistic_lock(PessimisticLockRequest {
                            header: Some(header),
                            keys: vec![key_ref.clone()],
                            primary: primary_ref.clone(),
                            start_ts,
                            // Counted at each attempt: waiting for other locks ages it.
                            ttl_ms: lock_ttl_ms(began),
                        })
                        .await?;
                        Ok(())
                    },
                )
            })
            .await?;
        self.primary = Some(primary);
        self.locked.insert(key);
        self.start_heartbeat();
        Ok(())
    }

    /// Keeps the primary's lock alive while the transaction runs.
    fn start_heartbeat(&mut self) {
        if self.heartbeat.is_some() {
            return;
        }
        let Some(primary) = self.primary.clone() else {
            return;
        };
        let (client, start_ts, began) = (self.client.clone(), self.start_ts, self.began);
        self.heartbeat = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(HEARTBEAT_INTERVAL_MS)).await;
                let ttl_ms = lock_ttl_ms(began);
                let primary = &primary;
                let beat = client
                    .call_with(
                        primary,
                        Retry::Always,
                        Client::txn_stub,
                        |mut txn, header, _| async move {
                            Ok(txn
                                .heartbeat(TxnHeartbeatRequest {
                                    header: Some(header),
                                    primary: primary.clone(),
                                    start_ts,
                                    ttl_ms,
                                })
                                .await?
                                .into_inner())
                        },
                    )
                    .await;
                match beat.map(|s| WireState::try_from(s.state)) {
                    // Not found: the primary's prewrite may still be waiting for other locks.
                    Ok(Ok(WireState::Alive | WireState::NotFound)) => {}
                    // Committed or rolled back: nothing more to keep alive.
                    Ok(_) => return,
                    // Tried again at the next beat; should none get through, the locks expire
                    // and the commit finds the transaction rolled back (`TxnAborted`).
                    Err(_) => {}
                }
            }
        }));
    }

    /// Every key the commit writes or locks, with what it does to it.
    fn mutations(&self) -> Vec<TxnMutation> {
        let mut out: Vec<TxnMutation> = self
            .writes
            .iter()
            .map(|(key, value)| match value {
                Some(v) => TxnMutation {
                    key: key.clone(),
                    op: WireOp::Put as i32,
                    value: v.clone(),
                },
                None => TxnMutation {
                    key: key.clone(),
                    op: WireOp::Delete as i32,
                    value: Vec::new(),
                },
            })
            .collect();
        out.extend(
            self.locked
                .iter()
                .filter(|k| !self.writes.contains_key(*k))
                .map(|key| TxnMutation {
                    key: key.clone(),
                    op: WireOp::Lock as i32,
                    value: Vec::new(),
                }),
        );
        out
    }

    /// Commits the transaction: all of its writes become visible at one commit timestamp, or
    /// none do. `WriteConflict`, `Locked` and `TxnAborted` mean nothing was committed (run it
    /// again). `OutcomeUnknown` means the commit point did not answer: the transaction may
    /// have committed. Calling `commit` again then asks once more, under the same start and
    /// commit timestamps (committing is idempotent), and answers `Ok` or `TxnAborted` once
    /// the outcome is known; it is never reported as failed while it may have committed.
    pub async fn commit(&mut self) -> Result<(), ClientError> {
        if let TxnState::CommitUnknown { commit_ts } = self.state {
            return self.commit_primary(commit_ts).await;
        }
        self.check_active()?;
        let mutations = self.mutations();
        if mutations.is_empty() {
            self.finish(TxnState::Committed);
            return Ok(());
        }
        let keys: Vec<Vec<u8>> = mutations.iter().map(|m| m.key.clone()).collect();
        if self.locked.is_empty() && self.client.one_range(&keys).await? {
            match self.commit_one_phase(&mutations).await {
                Ok(true) => {
                    self.finish(TxnState::Committed);
                    return Ok(());
                }
                // The range split under the transaction: two phases then.
                Ok(false) => {}
                Err(e) => {
                    // A one-phase commit leaves no locks; one whose outcome is unknown may
                    // have committed and cannot be asked again.
                    self.finish(match e {
                        ClientError::OutcomeUnknown(_) => TxnState::Committed,
                        _ => TxnState::RolledBack,
                    });
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.prewrite_all(mutations).await {
            // Best effort: what is left expires and is rolled back by whoever meets it.
            let _ = self.roll_back_keys().await;
            self.finish(TxnState::RolledBack);
            return Err(e);
        }
        exit_after_prewrite();
        // The commit point: the primary's commit, at a timestamp above every read that could
        // have missed the locks.
        let commit_ts = self.client.timestamp().await?;
        self.commit_primary(commit_ts).await
    }

    /// Commits the primary at `commit_ts` (retried while its outcome is unknown), then the
    /// other keys in the background.
    async fn commit_primary(&mut self, commit_ts: u64) -> Result<(), ClientError> {
        let (client, start_ts) = (self.client.clone(), self.start_ts);
        let Some(primary) = self.primary.clone() else {
            return Err(ClientError::Internal(
                "a two-phase commit without a primary".into(),
            ));
        };
        self.state = TxnState::Committing { commit_ts };
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            match client
                .commit_keys(std::slice::from_ref(&primary), start_ts, commit_ts)
                .await
            {
                Ok(()) => break,
                Err(e @ ClientError::TxnAborted(_)) => {
                    let _ = self.roll_back_keys().await;
                    self.finish(TxnState::RolledBack);
                    return Err(e);
                }
                Err(e) if attempt >= MAX_PRIMARY_COMMIT_ATTEMPTS => {
                    self.state = TxnState::CommitUnknown { commit_ts };
                    if let Some(h) = self.heartbeat.take() {
                        h.abort();
                    }
                    return Err(ClientError::OutcomeUnknown(format!(
                        "the commit of the transaction's primary key did not answer ({e}); it \
                         may have committed at {commit_ts} (start ts {start_ts}): call commit \
                         again to find out"
                    )));
                }
                // Committing is idempotent: its outcome is known once an attempt answers.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(
                        LOCK_BACKOFF_INITIAL_MS << attempt.min(6),
                    ))
                    .await
                }
            }
        }
        self.finish(TxnState::Committed);
        exit_after_primary_commit();
        // Committed. The other keys are committed in the background; readers that come first
        // roll them forward through the primary.
        let secondaries: Vec<Vec<u8>> = self
            .maybe_locked
            .iter()
            .filter(|k| **k != primary)
            .cloned()
            .collect();
        if !secondaries.is_empty() && !skip_secondary_commits() {
            tokio::spawn(async move {
                for _ in 0..MAX_SECONDARY_COMMIT_ATTEMPTS {
                    if client
                        .commit_keys(&secondaries, start_ts, commit_ts)
                        .await
                        .is_ok()
                    {
                        return;
                    }
                }
            });
        }
        Ok(())
    }

    /// The one-phase commit of `mutations`, all in one range; `false` when they no longer
    /// are (nothing was written).
    async fn commit_one_phase(&self, mutations: &[TxnMutation]) -> Result<bool, ClientError> {
        let (client, start_ts) = (&self.client, self.start_ts);
        client
            .resolving_locks(|| {
                client.call_with(
                    &mutations[0].key,
                    Retry::OnlyIfNotApplied,
                    Client::txn_stub,
                    |mut txn, header, range| {
                        let whole = mutations
                            .iter()
                            .all(|m| keys::span_contains(&range.start_key, &range.end_key, &m.key));
                        async move {
                            if !whole {
                                return Ok(false);
                            }
                            txn.commit_one_phase(CommitOnePhaseRequest {
                                header: Some(header),
                                mutations: mutations.to_vec(),
                                start_ts,
                            })
                            .await?;
                            Ok(true)
                        }
                    },
                )
            })
            .await
    }

    /// Phase one: locks every key (with its write) for this transaction, or fails.
    async fn prewrite_all(&mut self, mutations: Vec<TxnMutation>) -> Result<(), ClientError> {
        let primary = self
            .primary
            .get_or_insert_with(|| mutations[0].key.clone())
            .clone();
        let by_key: BTreeMap<Vec<u8>, TxnMutation> =
            mutations.into_iter().map(|m| (m.key.clone(), m)).collect();
        let keys: Vec<Vec<u8>> = by_key.keys().cloned().collect();
        self.maybe_locked.extend(keys.iter().cloned());
        self.start_heartbeat();
        let (client, start_ts, began) = (&self.client, self.start_ts, self.began);
        let (by_key, primary, keys) = (&by_key, &primary, &keys);
        client
            .resolving_locks(|| {
                client.per_range(keys, |mut txn, header, keys| async move {
                    txn.prewrite(PrewriteRequest {
                        header: Some(header),
                        mutations: keys.iter().map(|k| by_key[k].clone()).collect(),
                        primary: primary.clone(),
                        start_ts,
                        // Counted at each call: waiting for other locks ages the transaction.
                        ttl_ms: lock_ttl_ms(began),
                    })
                    .await?;
                    Ok(())
                })
            })
            .await
    }

    /// Rolls the transaction back: its locks are removed and its keys marked, so a prewrite
    /// of it still on its way fails.
    pub async fn rollback(&mut self) -> Result<(), ClientError> {
        if self.state != TxnState::Active {
            return Ok(());
        }
        let outcome = self.roll_back_keys().await;
        self.finish(TxnState::RolledBack);
        outcome
    }

    async fn roll_back_keys(&self) -> Result<(), ClientError> {
        let keys: Vec<Vec<u8>> = self.maybe_locked.iter().cloned().collect();
        self.client
            .roll_back_txn(self.primary.as_deref(), &keys, self.start_ts)
            .await
    }

    fn finish(&mut self, state: TxnState) {
        self.state = state;
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }
}

impl Drop for Txn {
    fn drop(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        // Only an active transaction is rolled back: once its primary's commit was sent, it
        // may have committed (a caller that stopped waiting for `commit`), and its locks are
        // for readers to resolve through the primary.
        if self.state != TxnState::Active || self.maybe_locked.is_empty() {
            return;
        }
        // Locks taken and never committed: rolled back in the background when a runtime is
        // there; else they expire.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let keys: Vec<Vec<u8>> = self.maybe_locked.iter().cloned().collect();
            let primary = self.primary.clone();
            let (client, start_ts) = (self.client.clone(), self.start_ts);
            handle.spawn(async move {
                let _ = client
                    .roll_back_txn(primary.as_deref(), &keys, start_ts)
                    .await;
            });
        }
    }
}

/// The failpoint `txn-exit-after-primary-commit`: the process exits right after the primary
/// committed, before any secondary, as a coordinator that dies there. The locks it leaves
/// must be rolled forward by readers.
fn exit_after_primary_commit() {
    fail::fail_point!("txn-exit-after-primary-commit", |_| {
        std::process::exit(0);
    });
}

/// The failpoint `txn-exit-after-prewrite`: the process exits once every key is prewritten,
/// before the commit point, as a coordinator that dies there. Its locks must expire and be
/// rolled back by readers, and nothing of the transaction may ever be seen.
fn exit_after_prewrite() {
    fail::fail_point!("txn-exit-after-prewrite", |_| {
        std::process::exit(0);
    });
}

/// The failpoint `txn-skip-secondary-commits`: a committed transaction leaves its other keys
/// locked, for readers to roll forward (tests of that resolution, in one process).
fn skip_secondary_commits() -> bool {
    fail::fail_point!("txn-skip-secondary-commits", |_| true);
    false
}
