//! Transactions in RocksDB: looking up what the Percolator rules (`percolator`) decide on,
//! and writing what they decide, into the caller's write batch.
//!
//! The caller (a range's state machine) applies each transaction command alone, so every
//! lookup here sees the effect of every command before it; nothing here keeps state.

use rocksdb::{ReadOptions, Snapshot, WriteBatch};

use super::percolator::{
    self, CommitStep, KeyError, PrewriteStep, RollbackStep, StatusStep, TxnRecord, TxnStatus,
};
use super::store::after_key_bound;
use super::{
    split_version_key, version_key, LockKind, LockRecord, Timestamp, WriteKind, WriteRecord,
    SHORT_VALUE_MAX_BYTES,
};
use crate::{record, ColumnFamilyName, Db, StorageError};

/// The lock on `key`, if any (from `snapshot` when given).
pub fn lock_of(
    db: &Db,
    snapshot: Option<&Snapshot<'_>>,
    key: &[u8],
) -> Result<Option<LockRecord>, StorageError> {
    let cf = db.cf(ColumnFamilyName::Lock);
    let found = match snapshot {
        Some(s) => s.get_pinned_cf_opt(cf, key, ReadOptions::default())?,
        None => db.raw().get_pinned_cf(cf, key)?,
    };
    found.map(|framed| LockRecord::decode(&framed)).transpose()
}

/// Up to `max_locks` locks in `[start, end)` (empty `end`: unbounded) that keep a read at
/// `read_ts` from reading, with their keys, in key order, read from `snapshot`.
pub fn locks_blocking_read(
    db: &Db,
    snapshot: &Snapshot<'_>,
    start: &[u8],
    end: &[u8],
    read_ts: Timestamp,
    max_locks: usize,
) -> Result<Vec<(Vec<u8>, LockRecord)>, StorageError> {
    let mut opts = ReadOptions::default();
    if !end.is_empty() {
        opts.set_iterate_upper_bound(end.to_vec());
    }
    let mut iter = snapshot.raw_iterator_cf_opt(db.cf(ColumnFamilyName::Lock), opts);
    iter.seek(start);
    let mut found = Vec::new();
    while iter.valid() && found.len() < max_locks {
        let lock = LockRecord::decode(iter.value().unwrap_or_default())?;
        if percolator::blocks_read(&lock, read_ts) {
            found.push((iter.key().unwrap_or_default().to_vec(), lock));
        }
        iter.next();
    }
    iter.status()?;
    Ok(found)
}

/// The oldest start ts among the locks in `[start, end)` (empty `end`: unbounded), reading
/// at most `max_locks` of them: `Ok(None)` when there are more (the caller cannot know the
/// oldest), `Ok(Some(None))` when there is none.
pub fn oldest_lock_start_ts(
    db: &Db,
    start: &[u8],
    end: &[u8],
    max_locks: usize,
) -> Result<Option<Option<Timestamp>>, StorageError> {
    Ok(match oldest_lock(db, start, end, max_locks)? {
        OldestLock::None => Some(None),
        OldestLock::Found(_, lock) => Some(Some(lock.start_ts)),
        OldestLock::TooMany(..) => None,
    })
}

/// The oldest lock of a span, as far as a bounded read can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldestLock {
    /// No lock on the span.
    None,
    /// The lock with the oldest start ts, and its key.
    Found(Vec<u8>, LockRecord),
    /// More locks than the read may take: the oldest is unknown. The oldest of those read,
    /// and its key, is one a caller may resolve to make progress.
    TooMany(Vec<u8>, LockRecord),
}

/// The lock with the oldest start ts in `[start, end)` (empty `end`: unbounded), with its
/// key, reading at most `max_locks` locks.
pub fn oldest_lock(
    db: &Db,
    start: &[u8],
    end: &[u8],
    max_locks: usize,
) -> Result<OldestLock, StorageError> {
    let mut oldest: Option<(Vec<u8>, LockRecord)> = None;
    for (n, item) in db.iter_span(ColumnFamilyName::Lock, start, end).enumerate() {
        if n >= max_locks {
            if let Some((key, lock)) = oldest {
                return Ok(OldestLock::TooMany(key, lock));
            }
        }
        let (key, framed) = item?;
        let lock = LockRecord::decode(&framed)?;
        if oldest
            .as_ref()
            .is_none_or(|(_, o)| lock.start_ts < o.start_ts)
        {
            oldest = Some((key.to_vec(), lock));
        }
    }
    Ok(match oldest {
        Some((key, lock)) => OldestLock::Found(key, lock),
        None => OldestLock::None,
    })
}

/// The newest record of `key` in the `write` family that a transaction committed (a
/// version or a lock-only commit; rollbacks are passed over), with its commit ts.
fn newest_commit(db: &Db, key: &[u8]) -> Result<Option<(Timestamp, WriteRecord)>, StorageError> {
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(after_key_bound(key));
    let mut iter = db
        .raw()
        .raw_iterator_cf_opt(db.cf(ColumnFamilyName::Write), opts);
    iter.seek(version_key(key, Timestamp::MAX));
    while iter.valid() {
        let (found, commit_ts) = split_version_key(iter.key().unwrap_or_default())?;
        if found != key {
            return Ok(None);
        }
        let record = WriteRecord::decode(iter.value().unwrap_or_default())?;
        if record.kind != WriteKind::Rollback {
            return Ok(Some((commit_ts, record)));
        }
        iter.next();
    }
    iter.status()?;
    Ok(None)
}

/// What the transaction that started at `start_ts` left on `key`: its commit record (at or
/// after its start) or its rollback record (at its start).
pub fn txn_record(
    db: &Db,
    key: &[u8],
    start_ts: Timestamp,
) -> Result<Option<TxnRecord>, StorageError> {
    let mut opts = ReadOptions::default();
    // Records from the newest down to the one at `start_ts` itself.
    opts.set_iterate_upper_bound(version_key(key, start_ts.saturating_sub(1)));
    let mut iter = db
        .raw()
        .raw_iterator_cf_opt(db.cf(ColumnFamilyName::Write), opts);
    iter.seek(version_key(key, Timestamp::MAX));
    while iter.valid() {
        let (found, commit_ts) = split_version_key(iter.key().unwrap_or_default())?;
        if found != key || commit_ts < start_ts {
            break;
        }
        let record = WriteRecord::decode(iter.value().unwrap_or_default())?;
        if let Some(own) = TxnRecord::of(start_ts, commit_ts, &record) {
            return Ok(Some(own));
        }
        iter.next();
    }
    iter.status()?;
    Ok(None)
}

/// One key a prewrite locks: the lock's kind and, for a put, its value.
#[derive(Debug, Clone, Copy)]
pub struct Mutation<'a> {
    pub key: &'a [u8],
    pub kind: LockKind,
    pub value: Option<&'a [u8]>,
}

/// A failure of a transaction command on one key; the command wrote nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFailure {
    pub key: Vec<u8>,
    pub error: KeyError,
}

/// The outcome of a transaction command: written into the batch, or refused on a key.
pub type TxnOutcome<T> = Result<Result<T, KeyFailure>, StorageError>;

fn failed<T>(key: &[u8], error: KeyError) -> TxnOutcome<T> {
    Ok(Err(KeyFailure {
        key: key.to_vec(),
        error,
    }))
}

/// Prewrites (or, with `LockKind::Pessimistic` mutations, pessimistically locks) every
/// mutation for the transaction that started at `start_ts` with primary `primary`, or none:
/// every key is checked before any lock is written.
pub fn prewrite(
    db: &Db,
    batch: &mut WriteBatch,
    mutations: &[Mutation<'_>],
    primary: &[u8],
    start_ts: Timestamp,
    ttl_ms: u64,
) -> TxnOutcome<()> {
    let mut to_lock = Vec::with_capacity(mutations.len());
    for m in mutations {
        let lock = lock_of(db, None, m.key)?;
        let newest = newest_commit(db, m.key)?;
        let own = txn_record(db, m.key, start_ts)?;
        let pessimistic = m.kind == LockKind::Pessimistic;
        match percolator::prewrite(
            start_ts,
            pessimistic,
            lock.as_ref(),
            newest.as_ref().map(|(ts, r)| (*ts, r)),
            own,
        ) {
            Ok(PrewriteStep::Lock) => to_lock.push(m),
            Ok(PrewriteStep::AlreadyLocked | PrewriteStep::AlreadyCommitted) => {}
            Err(e) => return failed(m.key, e),
        }
    }
    for m in to_lock {
        let short_value = match m.value {
            Some(v) if v.len() <= SHORT_VALUE_MAX_BYTES => Some(v.to_vec()),
            Some(v) => {
                batch.put_cf(
                    db.cf(ColumnFamilyName::Data),
                    version_key(m.key, start_ts),
                    record::encode(v),
                );
                None
            }
            None => None,
        };
        let lock = LockRecord {
            kind: m.kind,
            start_ts,
            primary: primary.to_vec(),
            ttl_ms,
            short_value,
        };
        batch.put_cf(db.cf(ColumnFamilyName::Lock), m.key, lock.encode());
    }
    Ok(Ok(()))
}

/// Commits `keys` of the transaction that started at `start_ts` at `commit_ts`, or none.
pub fn commit(
    db: &Db,
    batch: &mut WriteBatch,
    keys: &[Vec<u8>],
    start_ts: Timestamp,
    commit_ts: Timestamp,
) -> TxnOutcome<()> {
    let mut to_commit = Vec::with_capacity(keys.len());
    let mut to_remove = Vec::new();
    for key in keys {
        let lock = lock_of(db, None, key)?;
        let own = match &lock {
            Some(l) if l.start_ts == start_ts => None,
            _ => txn_record(db, key, start_ts)?,
        };
        match percolator::commit(start_ts, lock.as_ref(), own) {
            Ok(CommitStep::Commit(lock)) => to_commit.push((key, lock)),
            Ok(CommitStep::RemovePessimistic) => to_remove.push(key),
            Ok(CommitStep::AlreadyCommitted) => {}
            Err(e) => return failed(key, e),
        }
    }
    for key in to_remove {
        batch.delete_cf(db.cf(ColumnFamilyName::Lock), key);
    }
    for (key, lock) in to_commit {
        let Some(kind) = lock.kind.write_kind() else {
            // `percolator::commit` removes pessimistic locks instead.
            return Err(StorageError::corruption(
                "lock record",
                "a pessimistic lock reached a commit",
            ));
        };
        let record = WriteRecord {
            kind,
            start_ts,
            short_value: lock.short_value,
        };
        batch.put_cf(
            db.cf(ColumnFamilyName::Write),
            version_key(key, commit_ts),
            record.encode(),
        );
        batch.delete_cf(db.cf(ColumnFamilyName::Lock), key);
    }
    Ok(Ok(()))
}

/// Removes the lock of the transaction that started at `start_ts` from `key` (and its long
/// value), when `remove_lock`, and marks the key rolled back: a `Rollback` record at
/// `key || !start_ts`, unless a single-range write already fills that slot (the write then
/// keeps a late prewrite out: see `percolator`).
fn roll_back_key(
    db: &Db,
    batch: &mut WriteBatch,
    key: &[u8],
    start_ts: Timestamp,
    remove_lock: Option<&LockRecord>,
) -> Result<(), StorageError> {
    if let Some(lock) = remove_lock {
        batch.delete_cf(db.cf(ColumnFamilyName::Lock), key);
        if lock.kind == LockKind::Put && lock.short_value.is_none() {
            batch.delete_cf(db.cf(ColumnFamilyName::Data), version_key(key, start_ts));
        }
    }
    let slot = version_key(key, start_ts);
    if db
        .raw()
        .get_pinned_cf(db.cf(ColumnFamilyName::Write), &slot)?
        .is_none()
    {
        let record = WriteRecord {
            kind: WriteKind::Rollback,
            start_ts,
            short_value: None,
        };
        batch.put_cf(db.cf(ColumnFamilyName::Write), slot, record.encode());
    }
    Ok(())
}

/// Rolls back `keys` of the transaction that started at `start_ts`, or none (when one of
/// them committed).
pub fn rollback(
    db: &Db,
    batch: &mut WriteBatch,
    keys: &[Vec<u8>],
    start_ts: Timestamp,
) -> TxnOutcome<()> {
    let mut to_roll_back = Vec::with_capacity(keys.len());
    for key in keys {
        let lock = lock_of(db, None, key)?;
        let own = txn_record(db, key, start_ts)?;
        match percolator::rollback(start_ts, lock.as_ref(), own) {
            Ok(RollbackStep::RemoveLockAndMark) => to_roll_back.push((key, lock)),
            Ok(RollbackStep::Mark) => to_roll_back.push((key, None)),
            Ok(RollbackStep::AlreadyRolledBack) => {}
            Err(e) => return failed(key, e),
        }
    }
    for (key, lock) in to_roll_back {
        roll_back_key(db, batch, key, start_ts, lock.as_ref())?;
    }
    Ok(Ok(()))
}

/// The status of the transaction that started at `start_ts`, checked on its primary key
/// `primary` at `current_ts` (see `percolator::check_txn_status`); rolls it back when its
/// lock expired, or when it left no trace and `rollback_if_missing`.
pub fn check_txn_status(
    db: &Db,
    batch: &mut WriteBatch,
    primary: &[u8],
    start_ts: Timestamp,
    current_ts: Timestamp,
    rollback_if_missing: bool,
) -> Result<TxnStatus, StorageError> {
    let lock = lock_of(db, None, primary)?;
    let own = txn_record(db, primary, start_ts)?;
    Ok(
        match percolator::check_txn_status(
            start_ts,
            current_ts,
            rollback_if_missing,
            lock.as_ref(),
            own,
        ) {
            StatusStep::Report(status) => status,
            StatusStep::RollBackExpired => {
                roll_back_key(db, batch, primary, start_ts, lock.as_ref())?;
                TxnStatus::RolledBack
            }
            StatusStep::MarkRolledBack => {
                roll_back_key(db, batch, primary, start_ts, None)?;
                TxnStatus::RolledBack
            }
        },
    )
}

/// Keeps the transaction that started at `start_ts` alive: raises its primary lock's TTL to
/// `ttl_ms` (never lowers it). Returns its status: `Alive` with the TTL now in force, or what
/// became of it.
pub fn heartbeat(
    db: &Db,
    batch: &mut WriteBatch,
    primary: &[u8],
    start_ts: Timestamp,
    ttl_ms: u64,
) -> Result<TxnStatus, StorageError> {
    match lock_of(db, None, primary)? {
        Some(mut lock) if lock.start_ts == start_ts => {
            if ttl_ms > lock.ttl_ms {
                lock.ttl_ms = ttl_ms;
                batch.put_cf(db.cf(ColumnFamilyName::Lock), primary, lock.encode());
            }
            Ok(TxnStatus::Alive {
                ttl_ms: lock.ttl_ms,
            })
        }
        _ => Ok(match txn_record(db, primary, start_ts)? {
            Some(TxnRecord::Committed(ts)) => TxnStatus::Committed(ts),
            Some(TxnRecord::RolledBack) => TxnStatus::RolledBack,
            None => TxnStatus::NotFound,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::store::{get_at, scan_at, write};
    use crate::DbOptions;

    fn put<'a>(key: &'a [u8], value: &'a [u8]) -> Mutation<'a> {
        Mutation {
            key,
            kind: LockKind::Put,
            value: Some(value),
        }
    }

    fn apply(db: &Db, f: impl FnOnce(&mut WriteBatch) -> TxnOutcome<()>) -> Result<(), KeyFailure> {
        let mut batch = WriteBatch::default();
        let out = f(&mut batch).unwrap();
        db.write(batch, false).unwrap();
        out
    }

    fn value_at(db: &Db, key: &[u8], ts: Timestamp) -> Option<Vec<u8>> {
        get_at(db, None, key, ts).unwrap().and_then(|v| v.value)
    }

    #[test]
    fn a_transaction_commits_on_every_key_and_readers_see_it_only_from_its_commit_ts() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        write(&db, b"a", 5, Some(b"a5"));
        let long = vec![9u8; SHORT_VALUE_MAX_BYTES + 10];
        let muts = [put(b"a", b"a10"), put(b"b", &long)];
        apply(&db, |b| prewrite(&db, b, &muts, b"a", 10, 1_000)).unwrap();
        let snap = db.raw().snapshot();
        let blocking = locks_blocking_read(&db, &snap, b"", b"", 10, 16).unwrap();
        assert_eq!(blocking.len(), 2);
        assert!(locks_blocking_read(&db, &snap, b"", b"", 9, 16)
            .unwrap()
            .is_empty());
        drop(snap);
        // Prewritten, not committed: versions are unchanged.
        assert_eq!(value_at(&db, b"a", 100), Some(b"a5".to_vec()));
        apply(&db, |b| commit(&db, b, &[b"a".to_vec()], 10, 12)).unwrap();
        apply(&db, |b| commit(&db, b, &[b"b".to_vec()], 10, 12)).unwrap();
        // A retried commit is a no-op.
        apply(&db, |b| commit(&db, b, &[b"b".to_vec()], 10, 12)).unwrap();
        assert_eq!(value_at(&db, b"a", 11), Some(b"a5".to_vec()));
        assert_eq!(value_at(&db, b"a", 12), Some(b"a10".to_vec()));
        assert_eq!(value_at(&db, b"b", 12), Some(long));
        assert!(lock_of(&db, None, b"a").unwrap().is_none());
        // The rollback of a committed transaction is refused.
        assert_eq!(
            apply(&db, |b| rollback(&db, b, &[b"a".to_vec()], 10))
                .unwrap_err()
                .error,
            KeyError::Committed { commit_ts: 12 }
        );
    }

    #[test]
    fn a_rolled_back_transaction_leaves_no_value_and_its_late_prewrite_fails() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let long = vec![1u8; SHORT_VALUE_MAX_BYTES + 1];
        let muts = [put(b"a", &long)];
        apply(&db, |b| prewrite(&db, b, &muts, b"a", 10, 1_000)).unwrap();
        apply(&db, |b| {
            rollback(&db, b, &[b"a".to_vec(), b"b".to_vec()], 10)
        })
        .unwrap();
        assert!(lock_of(&db, None, b"a").unwrap().is_none());
        assert_eq!(value_at(&db, b"a", 100), None);
        assert!(db
            .iter_span(ColumnFamilyName::Data, b"", b"")
            .next()
            .is_none());
        // Another transaction's rollback wrote nothing: an older transaction may still
        // prewrite the key.
        let earlier = [put(b"a", b"earlier")];
        apply(&db, |b| prewrite(&db, b, &earlier, b"a", 8, 1_000)).unwrap();
        apply(&db, |b| rollback(&db, b, &[b"a".to_vec()], 8)).unwrap();
        // `b` was never prewritten: its rollback record keeps the late prewrite out.
        let late = [put(b"b", b"v")];
        assert_eq!(
            apply(&db, |b| prewrite(&db, b, &late, b"a", 10, 1_000))
                .unwrap_err()
                .error,
            KeyError::Aborted
        );
        assert_eq!(
            apply(&db, |b| commit(&db, b, &[b"a".to_vec()], 10, 11))
                .unwrap_err()
                .error,
            KeyError::Aborted
        );
        // Scans look past rollback records to older versions.
        write(&db, b"c", 3, Some(b"c3"));
        apply(&db, |b| rollback(&db, b, &[b"c".to_vec()], 10)).unwrap();
        assert_eq!(value_at(&db, b"c", 20), Some(b"c3".to_vec()));
        let snap = db.raw().snapshot();
        let page = scan_at(&db, &snap, b"", b"", 20, 10, usize::MAX).unwrap();
        assert_eq!(page.pairs, vec![(b"c".to_vec(), b"c3".to_vec())]);
    }

    #[test]
    fn a_rollback_leaves_a_single_range_write_in_its_slot_and_that_write_still_keeps_the_prewrite_out(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        // A single-range write committed at 10, the start ts of a transaction rolled back.
        write(&db, b"k", 10, Some(b"one-phase"));
        apply(&db, |b| rollback(&db, b, &[b"k".to_vec()], 10)).unwrap();
        assert_eq!(value_at(&db, b"k", 10), Some(b"one-phase".to_vec()));
        assert_eq!(txn_record(&db, b"k", 10).unwrap(), None);
        let late = [put(b"k", b"v")];
        assert_eq!(
            apply(&db, |b| prewrite(&db, b, &late, b"k", 10, 1_000))
                .unwrap_err()
                .error,
            KeyError::WriteConflict { commit_ts: 10 }
        );
        // The same if the single-range write came after the rollback record.
        apply(&db, |b| rollback(&db, b, &[b"j".to_vec()], 20)).unwrap();
        write(&db, b"j", 20, Some(b"one-phase"));
        let late = [put(b"j", b"v")];
        assert!(apply(&db, |b| prewrite(&db, b, &late, b"j", 20, 1_000)).is_err());
        assert_eq!(
            apply(&db, |b| commit(&db, b, &[b"j".to_vec()], 20, 21))
                .unwrap_err()
                .error,
            KeyError::Aborted
        );
    }

    #[test]
    fn prewrite_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        write(&db, b"b", 15, Some(b"newer"));
        let muts = [put(b"a", b"x"), put(b"b", b"y")];
        let failure = apply(&db, |b| prewrite(&db, b, &muts, b"a", 10, 1_000)).unwrap_err();
        assert_eq!(failure.key, b"b".to_vec());
        assert_eq!(failure.error, KeyError::WriteConflict { commit_ts: 15 });
        assert!(lock_of(&db, None, b"a").unwrap().is_none());
    }

    #[test]
    fn an_expired_primary_is_rolled_back_and_a_heartbeat_keeps_it_alive() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let ms = |m: u64| m << super::super::LOGICAL_BITS;
        let muts = [put(b"p", b"v")];
        apply(&db, |b| prewrite(&db, b, &muts, b"p", ms(1_000), 100)).unwrap();
        let status = |now: u64, rollback_if_missing: bool| {
            let mut batch = WriteBatch::default();
            let s = check_txn_status(&db, &mut batch, b"p", ms(1_000), now, rollback_if_missing)
                .unwrap();
            db.write(batch, false).unwrap();
            s
        };
        assert_eq!(status(ms(1_050), false), TxnStatus::Alive { ttl_ms: 100 });
        let mut batch = WriteBatch::default();
        assert_eq!(
            heartbeat(&db, &mut batch, b"p", ms(1_000), 500).unwrap(),
            TxnStatus::Alive { ttl_ms: 500 }
        );
        db.write(batch, false).unwrap();
        assert_eq!(status(ms(1_200), false), TxnStatus::Alive { ttl_ms: 500 });
        assert_eq!(status(ms(1_500), false), TxnStatus::RolledBack);
        assert!(lock_of(&db, None, b"p").unwrap().is_none());
        assert_eq!(
            apply(&db, |b| commit(
                &db,
                b,
                &[b"p".to_vec()],
                ms(1_000),
                ms(1_600)
            ))
            .unwrap_err()
            .error,
            KeyError::Aborted
        );
        // A transaction without a trace is only rolled back when asked.
        assert_eq!(status_of(&db, ms(2_000), false), TxnStatus::NotFound);
        assert_eq!(status_of(&db, ms(2_000), true), TxnStatus::RolledBack);
        assert_eq!(status_of(&db, ms(2_000), false), TxnStatus::RolledBack);
    }

    fn status_of(db: &Db, start_ts: Timestamp, rollback_if_missing: bool) -> TxnStatus {
        let mut batch = WriteBatch::default();
        let s = check_txn_status(
            db,
            &mut batch,
            b"q",
            start_ts,
            start_ts + 1,
            rollback_if_missing,
        )
        .unwrap();
        db.write(batch, false).unwrap();
        s
    }

    #[test]
    fn a_pessimistic_lock_keeps_writers_out_but_not_readers_and_cannot_be_committed() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        write(&db, b"k", 5, Some(b"old"));
        let lock = [Mutation {
            key: b"k",
            kind: LockKind::Pessimistic,
            value: None,
        }];
        apply(&db, |b| prewrite(&db, b, &lock, b"k", 10, 1_000)).unwrap();
        let snap = db.raw().snapshot();
        assert!(locks_blocking_read(&db, &snap, b"", b"", 20, 16)
            .unwrap()
            .is_empty());
        drop(snap);
        // A pessimistic lock left unprewritten by a committed transaction is removed by its
        // commit, which writes nothing for it.
        let stray = [Mutation {
            key: b"s",
            kind: LockKind::Pessimistic,
            value: None,
        }];
        apply(&db, |b| prewrite(&db, b, &stray, b"k", 10, 1_000)).unwrap();
        apply(&db, |b| commit(&db, b, &[b"s".to_vec()], 10, 12)).unwrap();
        assert!(lock_of(&db, None, b"s").unwrap().is_none());
        assert_eq!(value_at(&db, b"s", 100), None);
        let other = [put(b"k", b"theirs")];
        assert!(matches!(
            apply(&db, |b| prewrite(&db, b, &other, b"k", 11, 1_000))
                .unwrap_err()
                .error,
            KeyError::Locked(_)
        ));
        // The prewrite turns it into a write, which then commits.
        let mine = [put(b"k", b"mine")];
        apply(&db, |b| prewrite(&db, b, &mine, b"k", 10, 1_000)).unwrap();
        apply(&db, |b| commit(&db, b, &[b"k".to_vec()], 10, 12)).unwrap();
        assert_eq!(value_at(&db, b"k", 12), Some(b"mine".to_vec()));
        assert_eq!(value_at(&db, b"k", 11), Some(b"old".to_vec()));
    }
}
