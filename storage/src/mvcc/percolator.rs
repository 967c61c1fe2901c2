//! The Percolator rules of one key, as pure functions over what the key holds: its lock, its
//! newest `write` record, and the record a transaction left on it (its commit or its
//! rollback). `locks` looks these up in RocksDB and writes what the rules decide; the range's
//! state machine applies every transaction command through them, alone in its apply batch,
//! so each decision sees every earlier command's effect and every replica decides alike.
//!
//! A transaction is named by its start ts. Its records on a key:
//!
//! - a lock (prewrite, or a pessimistic lock) while it runs;
//! - on commit, a `write` record at its commit ts with `start_ts` = its start ts and
//!   `commit_ts > start_ts`;
//! - on rollback, a `Rollback` record at `key || !start_ts`, so a prewrite that arrives late
//!   finds it and fails.
//!
//! A single-range write committed in one Raft entry has `start_ts == commit_ts` and is never
//! taken for a transaction's commit. When its commit ts equals a transaction's start ts, the
//! two records share a slot: a rollback then leaves the write where it is, since a prewrite
//! of that transaction conflicts with it anyway (see [`prewrite`]).

use super::{LockKind, LockRecord, Timestamp, WriteKind, WriteRecord};

/// What a transaction left on a key, found by its start ts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnRecord {
    /// It committed at this timestamp.
    Committed(Timestamp),
    /// It was rolled back.
    RolledBack,
}

impl TxnRecord {
    /// The transaction record `record`, found at `commit_ts`, is for the transaction that
    /// started at `start_ts`, if it is one.
    pub fn of(start_ts: Timestamp, commit_ts: Timestamp, record: &WriteRecord) -> Option<Self> {
        if record.start_ts != start_ts {
            return None;
        }
        match record.kind {
            WriteKind::Rollback if commit_ts == start_ts => Some(TxnRecord::RolledBack),
            WriteKind::Rollback => None,
            _ if commit_ts > start_ts => Some(TxnRecord::Committed(commit_ts)),
            // A single-range write at this very timestamp: someone else's.
            _ => None,
        }
    }
}

/// Why a transaction command failed on a key. Nothing of the command was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// Another transaction holds a lock on the key: resolve it through its primary.
    Locked(LockRecord),
    /// A write committed at `commit_ts`, at or after the transaction's start: it must abort.
    WriteConflict { commit_ts: Timestamp },
    /// The transaction was rolled back (by itself, or by another that found its lock
    /// expired); it can no longer commit.
    Aborted,
    /// The transaction already committed at `commit_ts` (a rollback asked too late).
    Committed { commit_ts: Timestamp },
}

/// What a prewrite (or a pessimistic lock) does to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrewriteStep {
    /// Write the transaction's lock.
    Lock,
    /// The transaction's lock is there already (a retried request): nothing to do.
    AlreadyLocked,
    /// The transaction already committed (a retry that arrives after the commit): nothing to
    /// do.
    AlreadyCommitted,
}

/// The prewrite of a key by the transaction that started at `start_ts`. `pessimistic`: the
/// request is a pessimistic lock rather than a prewrite. `newest` is the key's newest `write`
/// record other than a rollback (another transaction's rollback wrote nothing), with its
/// commit ts; `own` what the transaction left on the key.
///
/// Conflicts are `commit_ts >= start_ts`, one more than Percolator's `>`: a single-range
/// write at exactly `start_ts` then conflicts too, which is what keeps a late prewrite of a
/// rolled-back transaction out should such a write share the rollback's slot (the module
/// comment; single-range commit timestamps come from the leader's oracle batch, so this is
/// a guard rather than a case expected to happen).
pub fn prewrite(
    start_ts: Timestamp,
    pessimistic: bool,
    lock: Option<&LockRecord>,
    newest: Option<(Timestamp, &WriteRecord)>,
    own: Option<TxnRecord>,
) -> Result<PrewriteStep, KeyError> {
    match own {
        Some(TxnRecord::RolledBack) => return Err(KeyError::Aborted),
        Some(TxnRecord::Committed(_)) => return Ok(PrewriteStep::AlreadyCommitted),
        None => {}
    }
    if let Some(lock) = lock {
        if lock.start_ts != start_ts {
            return Err(KeyError::Locked(lock.clone()));
        }
        // The transaction's own lock: a retry, or a prewrite over its own pessimistic lock,
        // which turns it into the write it carries.
        return Ok(if lock.kind == LockKind::Pessimistic && !pessimistic {
            PrewriteStep::Lock
        } else {
            PrewriteStep::AlreadyLocked
        });
    }
    if let Some((commit_ts, _)) = newest {
        if commit_ts >= start_ts && !skip_write_conflict_check() {
            return Err(KeyError::WriteConflict { commit_ts });
        }
    }
    Ok(PrewriteStep::Lock)
}

/// What a commit does to a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitStep {
    /// Replace the lock with a `write` record at the commit ts.
    Commit(LockRecord),
    /// A pessimistic lock the transaction took and never prewrote (the key is not among its
    /// writes): remove it and write nothing (TiKV#14551 commits it as nothing, too).
    RemovePessimistic,
    /// Committed before (a retry): nothing to do.
    AlreadyCommitted,
}

/// The commit of a key by the transaction that started at `start_ts`.
pub fn commit(
    start_ts: Timestamp,
    lock: Option<&LockRecord>,
    own: Option<TxnRecord>,
) -> Result<CommitStep, KeyError> {
    match lock {
        Some(lock) if lock.start_ts == start_ts => {
            if lock.kind == LockKind::Pessimistic {
                // Locked and never prewritten: committing it would write a record nobody
                // prewrote. The client prewrites every key it locked; one whose lock call
                // ended without an answer may be left, and must not block the key for good.
                return Ok(CommitStep::RemovePessimistic);
            }
            Ok(CommitStep::Commit(lock.clone()))
        }
        _ => match own {
            Some(TxnRecord::Committed(_)) => Ok(CommitStep::AlreadyCommitted),
            // Rolled back, or its lock is gone without a trace: in either case somebody
            // rolled the transaction back (a rollback writes its record unless another
            // write already fills the slot).
            _ => Err(KeyError::Aborted),
        },
    }
}

/// What a rollback does to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackStep {
    /// Remove the transaction's lock and mark the key rolled back.
    RemoveLockAndMark,
    /// No lock of the transaction: mark the key so a late prewrite fails.
    Mark,
    /// Rolled back before: nothing to do.
    AlreadyRolledBack,
}

/// The rollback of a key by (or on behalf of) the transaction that started at `start_ts`.
pub fn rollback(
    start_ts: Timestamp,
    lock: Option<&LockRecord>,
    own: Option<TxnRecord>,
) -> Result<RollbackStep, KeyError> {
    match own {
        Some(TxnRecord::Committed(commit_ts)) => return Err(KeyError::Committed { commit_ts }),
        Some(TxnRecord::RolledBack) => return Ok(RollbackStep::AlreadyRolledBack),
        None => {}
    }
    Ok(match lock {
        Some(lock) if lock.start_ts == start_ts => RollbackStep::RemoveLockAndMark,
        _ => RollbackStep::Mark,
    })
}

/// A transaction's state as its primary key tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnStatus {
    /// Committed at this timestamp: its other locks are rolled forward.
    Committed(Timestamp),
    /// Rolled back: its other locks are removed.
    RolledBack,
    /// Running: its primary's lock lives for `ttl_ms` from its start.
    Alive { ttl_ms: u64 },
    /// No lock and no record on the primary, and the caller did not ask to roll it back:
    /// its prewrite of the primary may still be on its way.
    NotFound,
}

/// What checking a transaction's status does to its primary key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusStep {
    /// Nothing to write.
    Report(TxnStatus),
    /// The primary's lock expired: roll the transaction back (lock removed, key marked).
    RollBackExpired,
    /// No trace of the transaction and the caller asked: mark the primary rolled back, so
    /// its prewrite fails if it ever arrives.
    MarkRolledBack,
}

/// The status of the transaction that started at `start_ts`, checked on its primary at
/// `current_ts` (an oracle timestamp). `rollback_if_missing`: the caller found another of
/// its locks expired, so a transaction without a trace on its primary is rolled back.
pub fn check_txn_status(
    start_ts: Timestamp,
    current_ts: Timestamp,
    rollback_if_missing: bool,
    lock: Option<&LockRecord>,
    own: Option<TxnRecord>,
) -> StatusStep {
    match (lock, own) {
        (Some(lock), _) if lock.start_ts == start_ts => {
            if lock.expired_at(current_ts) {
                StatusStep::RollBackExpired
            } else {
                StatusStep::Report(TxnStatus::Alive {
                    ttl_ms: lock.ttl_ms,
                })
            }
        }
        (_, Some(TxnRecord::Committed(commit_ts))) => {
            StatusStep::Report(TxnStatus::Committed(commit_ts))
        }
        (_, Some(TxnRecord::RolledBack)) => StatusStep::Report(TxnStatus::RolledBack),
        (_, None) if rollback_if_missing => StatusStep::MarkRolledBack,
        (_, None) => StatusStep::Report(TxnStatus::NotFound),
    }
}

/// Whether `lock` keeps a read at `read_ts` from reading the key: the lock's transaction
/// may commit at or below `read_ts`. A pessimistic lock carries no write yet; the
/// transaction's commit ts will come from the oracle after its prewrite, so after this read.
pub fn blocks_read(lock: &LockRecord, read_ts: Timestamp) -> bool {
    lock.kind != LockKind::Pessimistic && lock.start_ts <= read_ts && !reader_ignores_locks()
}

/// Whether the failpoint `txn-skip-write-conflict-check` is active: a prewrite ignores
/// writes committed after its start, so two transactions can both write a key from the same
/// snapshot (lost update). Always false unless built with the `failpoints` feature and
/// FAILPOINTS activates it.
fn skip_write_conflict_check() -> bool {
    fail::fail_point!("txn-skip-write-conflict-check", |_| true);
    false
}

/// Whether the failpoint `txn-reader-ignores-locks` is active: reads look past every lock,
/// so a read can miss a transaction that commits below its timestamp (and see half of one).
fn reader_ignores_locks() -> bool {
    fail::fail_point!("txn-reader-ignores-locks", |_| true);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(start_ts: Timestamp, kind: LockKind) -> LockRecord {
        LockRecord {
            kind,
            start_ts,
            primary: b"p".to_vec(),
            ttl_ms: 100,
            short_value: None,
        }
    }

    fn record(kind: WriteKind, start_ts: Timestamp) -> WriteRecord {
        WriteRecord {
            kind,
            start_ts,
            short_value: None,
        }
    }

    #[test]
    fn a_record_names_a_transaction_only_as_its_commit_or_its_rollback() {
        let put = record(WriteKind::Put, 10);
        assert_eq!(TxnRecord::of(10, 12, &put), Some(TxnRecord::Committed(12)));
        assert_eq!(TxnRecord::of(11, 12, &put), None);
        // A single-range write at the transaction's start ts is someone else's.
        assert_eq!(TxnRecord::of(10, 10, &put), None);
        let rb = record(WriteKind::Rollback, 10);
        assert_eq!(TxnRecord::of(10, 10, &rb), Some(TxnRecord::RolledBack));
        assert_eq!(TxnRecord::of(10, 11, &rb), None);
        let locked = record(WriteKind::Lock, 10);
        assert_eq!(
            TxnRecord::of(10, 15, &locked),
            Some(TxnRecord::Committed(15))
        );
    }

    #[test]
    fn prewrite_conflicts_with_writes_at_or_after_its_start_and_with_other_locks() {
        let put = record(WriteKind::Put, 7);
        assert_eq!(
            prewrite(10, false, None, None, None),
            Ok(PrewriteStep::Lock)
        );
        assert_eq!(
            prewrite(10, false, None, Some((9, &put)), None),
            Ok(PrewriteStep::Lock)
        );
        assert_eq!(
            prewrite(10, false, None, Some((10, &put)), None),
            Err(KeyError::WriteConflict { commit_ts: 10 })
        );
        assert_eq!(
            prewrite(10, false, None, Some((11, &put)), None),
            Err(KeyError::WriteConflict { commit_ts: 11 })
        );
        let other = lock(8, LockKind::Put);
        assert_eq!(
            prewrite(10, false, Some(&other), None, None),
            Err(KeyError::Locked(other.clone()))
        );
        // A pessimistic lock of another transaction keeps writers out too.
        let other_pessimistic = lock(8, LockKind::Pessimistic);
        assert!(matches!(
            prewrite(10, true, Some(&other_pessimistic), None, None),
            Err(KeyError::Locked(_))
        ));
    }

    #[test]
    fn prewrite_is_idempotent_and_a_rolled_back_transaction_cannot_prewrite() {
        let own = lock(10, LockKind::Put);
        assert_eq!(
            prewrite(10, false, Some(&own), None, None),
            Ok(PrewriteStep::AlreadyLocked)
        );
        let own_pessimistic = lock(10, LockKind::Pessimistic);
        assert_eq!(
            prewrite(10, false, Some(&own_pessimistic), None, None),
            Ok(PrewriteStep::Lock)
        );
        assert_eq!(
            prewrite(10, true, Some(&own_pessimistic), None, None),
            Ok(PrewriteStep::AlreadyLocked)
        );
        assert_eq!(
            prewrite(10, false, None, None, Some(TxnRecord::RolledBack)),
            Err(KeyError::Aborted)
        );
        assert_eq!(
            prewrite(10, false, None, None, Some(TxnRecord::Committed(12))),
            Ok(PrewriteStep::AlreadyCommitted)
        );
    }

    #[test]
    fn commit_needs_the_transaction_s_prewrite_lock() {
        let own = lock(10, LockKind::Put);
        assert_eq!(
            commit(10, Some(&own), None),
            Ok(CommitStep::Commit(own.clone()))
        );
        assert_eq!(
            commit(10, None, Some(TxnRecord::Committed(12))),
            Ok(CommitStep::AlreadyCommitted)
        );
        assert_eq!(commit(10, None, None), Err(KeyError::Aborted));
        assert_eq!(
            commit(10, None, Some(TxnRecord::RolledBack)),
            Err(KeyError::Aborted)
        );
        assert_eq!(
            commit(10, Some(&lock(9, LockKind::Put)), None),
            Err(KeyError::Aborted)
        );
        assert_eq!(
            commit(10, Some(&lock(10, LockKind::Pessimistic)), None),
            Ok(CommitStep::RemovePessimistic)
        );
    }

    #[test]
    fn rollback_marks_the_key_unless_the_transaction_committed() {
        let own = lock(10, LockKind::Put);
        assert_eq!(
            rollback(10, Some(&own), None),
            Ok(RollbackStep::RemoveLockAndMark)
        );
        assert_eq!(
            rollback(10, Some(&lock(9, LockKind::Put)), None),
            Ok(RollbackStep::Mark)
        );
        assert_eq!(rollback(10, None, None), Ok(RollbackStep::Mark));
        assert_eq!(
            rollback(10, None, Some(TxnRecord::RolledBack)),
            Ok(RollbackStep::AlreadyRolledBack)
        );
        assert_eq!(
            rollback(10, None, Some(TxnRecord::Committed(12))),
            Err(KeyError::Committed { commit_ts: 12 })
        );
    }

    #[test]
    fn status_rolls_back_an_expired_primary_and_reports_the_rest() {
        let start = 1_000 << super::super::LOGICAL_BITS;
        let own = LockRecord {
            start_ts: start,
            ..lock(start, LockKind::Put)
        };
        let before_ttl = (1_050 << super::super::LOGICAL_BITS) as Timestamp;
        let after_ttl = (1_100 << super::super::LOGICAL_BITS) as Timestamp;
        assert_eq!(
            check_txn_status(start, before_ttl, true, Some(&own), None),
            StatusStep::Report(TxnStatus::Alive { ttl_ms: 100 })
        );
        assert_eq!(
            check_txn_status(start, after_ttl, false, Some(&own), None),
            StatusStep::RollBackExpired
        );
        assert_eq!(
            check_txn_status(start, after_ttl, false, None, Some(TxnRecord::Committed(9))),
            StatusStep::Report(TxnStatus::Committed(9))
        );
        assert_eq!(
            check_txn_status(start, after_ttl, false, None, Some(TxnRecord::RolledBack)),
            StatusStep::Report(TxnStatus::RolledBack)
        );
        assert_eq!(
            check_txn_status(start, after_ttl, false, None, None),
            StatusStep::Report(TxnStatus::NotFound)
        );
        assert_eq!(
            check_txn_status(start, after_ttl, true, None, None),
            StatusStep::MarkRolledBack
        );
    }

    #[test]
    fn reads_wait_for_prewrite_locks_at_or_below_their_ts_only() {
        assert!(blocks_read(&lock(10, LockKind::Put), 10));
        assert!(blocks_read(&lock(10, LockKind::Lock), 11));
        assert!(!blocks_read(&lock(10, LockKind::Put), 9));
        assert!(!blocks_read(&lock(10, LockKind::Pessimistic), 11));
    }
}
