//! Applying transaction commands: the state machine checks that the keys are its own, then
//! hands each command here, which runs the Percolator rules (`spheredb_storage::mvcc::locks`)
//! into the entry's write batch and turns their outcome into the command's response.
//!
//! Transaction commands are applied alone in their batch (see `Command::reads_registry`), so
//! the rules read every earlier command's effect straight from the database.

use rocksdb::WriteBatch;
use spheredb_storage::mvcc::locks::{self, KeyFailure, Mutation};
use spheredb_storage::mvcc::percolator::{KeyError, TxnStatus};
use spheredb_storage::mvcc::{LockKind, LockRecord, Timestamp};
use spheredb_storage::{Db, StorageError};

use crate::types::{CommandResponse, LockInfo, TxnKey, TxnMutation, TxnOp, TxnRefusal, TxnState};

/// The lock report of `lock` on `key`.
pub fn lock_info(key: &[u8], lock: &LockRecord) -> LockInfo {
    LockInfo {
        key: key.to_vec(),
        primary: lock.primary.clone(),
        start_ts: lock.start_ts,
        ttl_ms: lock.ttl_ms,
    }
}

/// The refusal for a rule's failure on a key.
pub fn refusal(failure: KeyFailure) -> TxnRefusal {
    let KeyFailure { key, error } = failure;
    match error {
        KeyError::Locked(lock) => TxnRefusal::Locked(lock_info(&key, &lock)),
        KeyError::WriteConflict { commit_ts } => TxnRefusal::WriteConflict { key, commit_ts },
        KeyError::Aborted => TxnRefusal::Aborted { key },
        KeyError::Committed { commit_ts } => TxnRefusal::Committed { commit_ts },
    }
}

fn respond(outcome: Result<(), KeyFailure>) -> CommandResponse {
    match outcome {
        Ok(()) => CommandResponse::Done,
        Err(failure) => CommandResponse::TxnRefused(refusal(failure)),
    }
}

fn state(status: TxnStatus) -> CommandResponse {
    CommandResponse::TxnStatus(match status {
        TxnStatus::Committed(ts) => TxnState::Committed(ts),
        TxnStatus::RolledBack => TxnState::RolledBack,
        TxnStatus::Alive { ttl_ms } => TxnState::Alive { ttl_ms },
        TxnStatus::NotFound => TxnState::NotFound,
    })
}

fn plain(keys: &[TxnKey]) -> Vec<Vec<u8>> {
    keys.iter().map(|k| k.0.clone()).collect()
}

/// Applies a prewrite (or pessimistic lock) of `mutations`.
pub fn prewrite(
    db: &Db,
    batch: &mut WriteBatch,
    mutations: &[TxnMutation],
    primary: &[u8],
    start_ts: Timestamp,
    ttl_ms: u64,
) -> Result<CommandResponse, StorageError> {
    let muts: Vec<Mutation<'_>> = mutations
        .iter()
        .map(|m| {
            let (kind, value) = match &m.op {
                TxnOp::Put(v) => (LockKind::Put, Some(v.as_slice())),
                TxnOp::Delete => (LockKind::Delete, None),
                TxnOp::Lock => (LockKind::Lock, None),
                TxnOp::PessimisticLock => (LockKind::Pessimistic, None),
            };
            Mutation {
                key: &m.key,
                kind,
                value,
            }
        })
        .collect();
    Ok(respond(locks::prewrite(
        db, batch, &muts, primary, start_ts, ttl_ms,
    )?))
}

/// Applies the commit of `keys`.
pub fn commit(
    db: &Db,
    batch: &mut WriteBatch,
    keys: &[TxnKey],
    start_ts: Timestamp,
    commit_ts: Timestamp,
) -> Result<CommandResponse, StorageError> {
    Ok(respond(locks::commit(
        db,
        batch,
        &plain(keys),
        start_ts,
        commit_ts,
    )?))
}

/// Applies the rollback of `keys`.
pub fn rollback(
    db: &Db,
    batch: &mut WriteBatch,
    keys: &[TxnKey],
    start_ts: Timestamp,
) -> Result<CommandResponse, StorageError> {
    Ok(respond(locks::rollback(db, batch, &plain(keys), start_ts)?))
}

/// Applies a status check on the primary.
pub fn check_status(
    db: &Db,
    batch: &mut WriteBatch,
    primary: &[u8],
    start_ts: Timestamp,
    current_ts: Timestamp,
    rollback_if_missing: bool,
) -> Result<CommandResponse, StorageError> {
    Ok(state(locks::check_txn_status(
        db,
        batch,
        primary,
        start_ts,
        current_ts,
        rollback_if_missing,
    )?))
}

/// Applies a heartbeat on the primary.
pub fn heartbeat(
    db: &Db,
    batch: &mut WriteBatch,
    primary: &[u8],
    start_ts: Timestamp,
    ttl_ms: u64,
) -> Result<CommandResponse, StorageError> {
    Ok(state(locks::heartbeat(
        db, batch, primary, start_ts, ttl_ms,
    )?))
}

/// Checks a one-phase transaction's keys as a prewrite at `start_ts` would, without writing:
/// the refusal of the first key that has another's lock or a write since `start_ts`.
pub fn check_one_phase(
    db: &Db,
    keys: &[&[u8]],
    start_ts: Timestamp,
) -> Result<Option<TxnRefusal>, StorageError> {
    let muts: Vec<Mutation<'_>> = keys
        .iter()
        .map(|key| Mutation {
            key,
            kind: LockKind::Lock,
            value: None,
        })
        .collect();
    // Only the checks: the prewrite's batch is dropped.
    let mut scratch = WriteBatch::default();
    Ok(
        match locks::prewrite(db, &mut scratch, &muts, &[], start_ts, 0)? {
            Ok(()) => None,
            Err(failure) => Some(refusal(failure)),
        },
    )
}

/// The refusal of a single-range write of `key`, when a transaction's lock is on it.
pub fn lock_refusal(db: &Db, key: &[u8]) -> Result<Option<TxnRefusal>, StorageError> {
    Ok(locks::lock_of(db, None, key)?.map(|lock| TxnRefusal::Locked(lock_info(key, &lock))))
}
