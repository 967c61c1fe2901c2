//! Mapping of openraft and storage failures to the wire error of every service.

use openraft::errors::{ClientWriteError, ForwardToLeader, LinearizableReadError, RaftError};
use spheredb_client::proto::v1::NodeInfo;
use spheredb_client::ClientError;
use spheredb_raft::TypeConfig;
use spheredb_storage::StorageError;

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
        RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => ClientError::Indeterminate(format!(
            "leader changed while the write was in flight (new leader {:?}); it may or may not have applied",
            f.leader_id
        )),
        RaftError::APIError(other) => ClientError::Internal(other.to_string()),
        RaftError::Fatal(f) => ClientError::Indeterminate(format!("raft stopped during the write: {f}")),
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
