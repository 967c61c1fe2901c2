//! Mapping of openraft and storage failures to the wire error of every service.

use openraft::errors::{ClientWriteError, ForwardToLeader, LinearizableReadError, RaftError};
use spheredb_client::proto::v1::{LockInfo as WireLockInfo, NodeInfo};
use spheredb_client::ClientError;
use spheredb_raft::{LockInfo, TxnRefusal, TypeConfig};
use spheredb_storage::{keys, StorageError};

/// `NotLeader` with the leader's node when openraft knows it.
pub fn not_leader(f: &ForwardToLeader<TypeConfig>) -> ClientError {
    not_leader_hint(f.leader_node.as_ref().map(|node| NodeInfo {
        node_id: node.node_id,
        addr: node.addr.clone(),
    }))
}

/// `NotLeader` pointing at `leader`, when known.
pub fn not_leader_hint(leader: Option<NodeInfo>) -> ClientError {
    ClientError::NotLeader { leader }
}

/// Maps a failed write. Only errors raised before the entry was appended say "not applied".
pub fn write_error(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> ClientError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => not_leader(&f),
        RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => ClientError::OutcomeUnknown(format!(
            "leader changed while the write was in flight (new leader {:?}); it may or may not have applied",
            f.leader_id
        )),
        RaftError::APIError(other) => ClientError::Internal(other.to_string()),
        RaftError::Fatal(f) => ClientError::OutcomeUnknown(format!("raft stopped during the write: {f}")),
    }
}

/// Maps a failed linearizable-read barrier. Reads never change state, so all are retryable.
pub fn read_error(e: RaftError<TypeConfig, LinearizableReadError<TypeConfig>>) -> ClientError {
    match e {
        RaftError::APIError(LinearizableReadError::ForwardToLeader(f)) => not_leader(&f),
        RaftError::APIError(LinearizableReadError::QuorumNotEnough(q)) => {
            ClientError::Unavailable(format!("no quorum to confirm leadership: {q}"))
        }
        RaftError::Fatal(f) => ClientError::Unavailable(format!("raft stopped: {f}")),
    }
}

/// An unexpected failure inside the node (a bad record encoding, a failed task).
pub fn internal(e: impl std::fmt::Display) -> ClientError {
    ClientError::Internal(e.to_string())
}

/// Maps a storage failure; corruption stays corruption.
pub fn storage_error(e: StorageError) -> ClientError {
    if e.is_corruption() {
        return ClientError::Corruption(e.to_string());
    }
    ClientError::Internal(e.to_string())
}

/// A stored key as people read it: `sphere S key "K"` for a raw KV key, `sphere S row
/// [..]` for a SQL row.
pub fn key_text(key: &[u8]) -> String {
    match keys::decode_sphere_key(key) {
        Some((keys::Keyspace::Kv, sphere, user)) => {
            format!("sphere {sphere} key {:?}", String::from_utf8_lossy(user))
        }
        Some((keys::Keyspace::Sql, sphere, row)) => format!("sphere {sphere} row {row:?}"),
        None => format!("key {key:?}"),
    }
}

/// The wire form of a lock report.
pub fn wire_lock(lock: LockInfo) -> WireLockInfo {
    WireLockInfo {
        key: lock.key,
        primary: lock.primary,
        start_ts: lock.start_ts,
        ttl_ms: lock.ttl_ms,
    }
}

/// The error for a transaction command (or a single-range write) the range refused.
pub fn txn_refused(refusal: TxnRefusal) -> ClientError {
    match refusal {
        TxnRefusal::Locked(lock) => ClientError::Locked {
            message: format!(
                "{} is locked by the transaction that started at {}",
                key_text(&lock.key),
                lock.start_ts
            ),
            locks: vec![wire_lock(lock)],
        },
        TxnRefusal::WriteConflict { key, commit_ts } => ClientError::WriteConflict {
            message: format!(
                "{} has a write committed at {commit_ts}, at or after the transaction's start",
                key_text(&key)
            ),
            conflict_ts: commit_ts,
        },
        TxnRefusal::Aborted { key } => ClientError::TxnAborted(format!(
            "the transaction was rolled back (found on {})",
            key_text(&key)
        )),
        TxnRefusal::Committed { commit_ts } => ClientError::InvalidArgument(format!(
            "the transaction already committed at {commit_ts}; it can no longer be rolled back"
        )),
        TxnRefusal::BelowGcHorizon { horizon } => ClientError::HistoryCompacted {
            message: "the transaction's start timestamp is at or below the range's GC horizon; \
                      start a new transaction"
                .into(),
            horizon,
        },
    }
}
