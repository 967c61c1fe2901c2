//! The one error type of every SphereDB service, and its mapping to gRPC statuses.

use prost::Message;

use crate::proto::v1::{Error as WireError, ErrorCode, LockInfo, NodeInfo, RangeDescriptor};

/// A typed client-side error. Each variant says what the caller can do next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The node is not the range leader; retry on `leader` when known.
    #[error("not leader{}", leader.as_ref().map(|l| format!(" (leader is node {} at {})", l.node_id, l.addr)).unwrap_or_default())]
    NotLeader { leader: Option<NodeInfo> },
    /// The key is outside the range named in the request; refresh descriptors.
    #[error("key not in range: {message}")]
    KeyNotInRange {
        message: String,
        descriptors: Vec<RangeDescriptor>,
    },
    /// The request named an old generation of the range; refresh descriptors.
    #[error("stale range generation: {message}")]
    StaleGeneration {
        message: String,
        descriptors: Vec<RangeDescriptor>,
    },
    /// No such range on the node.
    #[error("range not found: {0}")]
    RangeNotFound(String),
    /// The request is malformed or over a limit; fix it, do not retry.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The cluster cannot serve the request now (no quorum, node down); retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The outcome of a write is unknown: it may or may not have been applied.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// The server found a checksum mismatch; the data was not served.
    #[error("corruption: {0}")]
    Corruption(String),
    /// The per-call deadline passed before the call succeeded.
    #[error("deadline of {deadline_ms} ms exceeded: {last_error}")]
    DeadlineExceeded {
        deadline_ms: u64,
        last_error: String,
    },
    /// An unexpected server-side failure.
    #[error("internal error: {0}")]
    Internal(String),
    /// The node refused a write because its disk is nearly full; nothing was written. Retry
    /// once space is freed.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The read asked for history older than the range's GC horizon; read at `horizon` or
    /// later (a device resyncs from the latest state).
    #[error("history compacted: {message} (the oldest readable timestamp is {horizon})")]
    HistoryCompacted { message: String, horizon: u64 },
    /// Another transaction's locks are on keys the call needed; nothing was done. The
    /// client resolves them (through each lock's primary) and retries by itself; this
    /// reaches callers only when a lock outlives the retries.
    #[error("locked: {message}")]
    Locked {
        message: String,
        locks: Vec<LockInfo>,
    },
    /// A write committed at `conflict_ts`, at or after the transaction's start: the
    /// transaction was not committed. Run it again (`Client::transact` does).
    #[error("write conflict: {message}")]
    WriteConflict { message: String, conflict_ts: u64 },
    /// The transaction was rolled back (by its client, or by another that found it expired);
    /// nothing of it was committed. Run it again.
    #[error("transaction aborted: {0}")]
    TxnAborted(String),
}

impl ClientError {
    /// The wire error for this client error (used by servers to build statuses).
    pub fn to_wire(&self) -> WireError {
        let gc_horizon = match self {
            ClientError::HistoryCompacted { horizon, .. } => *horizon,
            _ => 0,
        };
        let (locks, conflict_ts) = match self {
            ClientError::Locked { locks, .. } => (locks.clone(), 0),
            ClientError::WriteConflict { conflict_ts, .. } => (Vec::new(), *conflict_ts),
            _ => (Vec::new(), 0),
        };
        let (code, leader_hint, descriptors) = match self {
            ClientError::NotLeader { leader } => (ErrorCode::NotLeader, leader.clone(), vec![]),
            ClientError::KeyNotInRange { descriptors, .. } => {
                (ErrorCode::KeyNotInRange, None, descriptors.clone())
            }
            ClientError::StaleGeneration { descriptors, .. } => {
                (ErrorCode::StaleGeneration, None, descriptors.clone())
            }
            ClientError::RangeNotFound(_) => (ErrorCode::RangeNotFound, None, vec![]),
            ClientError::InvalidArgument(_) => (ErrorCode::InvalidArgument, None, vec![]),
            ClientError::Unavailable(_) | ClientError::DeadlineExceeded { .. } => {
                (ErrorCode::Unavailable, None, vec![])
            }
            ClientError::OutcomeUnknown(_) => (ErrorCode::OutcomeUnknown, None, vec![]),
            ClientError::Corruption(_) => (ErrorCode::Corruption, None, vec![]),
            ClientError::Internal(_) => (ErrorCode::Internal, None, vec![]),
            ClientError::ResourceExhausted(_) => (ErrorCode::ResourceExhausted, None, vec![]),
            ClientError::HistoryCompacted { .. } => (ErrorCode::HistoryCompacted, None, vec![]),
            ClientError::Locked { .. } => (ErrorCode::Locked, None, vec![]),
            ClientError::WriteConflict { .. } => (ErrorCode::WriteConflict, None, vec![]),
            ClientError::TxnAborted(_) => (ErrorCode::TxnAborted, None, vec![]),
        };
        WireError {
            code: code as i32,
            message: match self {
                ClientError::HistoryCompacted { message, .. }
                | ClientError::Locked { message, .. }
                | ClientError::WriteConflict { message, .. } => message.clone(),
                ClientError::TxnAborted(message) => message.clone(),
                other => other.to_string(),
            },
            leader_hint,
            descriptors,
            gc_horizon,
            locks,
            conflict_ts,
        }
    }

    /// Encodes this error as a gRPC status with the wire error in its details.
    pub fn to_status(&self) -> tonic::Status {
        let wire = self.to_wire();
        let code = match self {
            ClientError::NotLeader { .. }
            | ClientError::KeyNotInRange { .. }
            | ClientError::StaleGeneration { .. } => tonic::Code::FailedPrecondition,
            ClientError::RangeNotFound(_) => tonic::Code::NotFound,
            ClientError::InvalidArgument(_) => tonic::Code::InvalidArgument,
            ClientError::Unavailable(_) | ClientError::OutcomeUnknown(_) => {
                tonic::Code::Unavailable
            }
            ClientError::DeadlineExceeded { .. } => tonic::Code::DeadlineExceeded,
            ClientError::Corruption(_) => tonic::Code::DataLoss,
            ClientError::Internal(_) => tonic::Code::Internal,
            ClientError::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            ClientError::HistoryCompacted { .. } => tonic::Code::OutOfRange,
            ClientError::Locked { .. } | ClientError::WriteConflict { .. } => tonic::Code::Aborted,
            ClientError::TxnAborted(_) => tonic::Code::Aborted,
        };
        tonic::Status::with_details(code, wire.message.clone(), wire.encode_to_vec().into())
    }

    /// Decodes a gRPC status. Statuses without SphereDB details (transport failures) map to
    /// `Unavailable`, or `OutcomeUnknown` when the request may have reached the server.
    pub fn from_status(status: &tonic::Status) -> ClientError {
        if let Ok(wire) = WireError::decode(status.details()) {
            if wire.code != ErrorCode::Unknown as i32 || !wire.message.is_empty() {
                return ClientError::from_wire(wire);
            }
        }
        match status.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => {
                ClientError::InvalidArgument(status.message().to_string())
            }
            _ if is_connect_failure(status) => {
                ClientError::Unavailable(status.message().to_string())
            }
            tonic::Code::Unavailable
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown => {
                ClientError::OutcomeUnknown(format!("{}: {}", status.code(), status.message()))
            }
            _ => ClientError::Internal(format!("{}: {}", status.code(), status.message())),
        }
    }

    fn from_wire(wire: WireError) -> ClientError {
        let code = ErrorCode::try_from(wire.code).unwrap_or(ErrorCode::Unknown);
        match code {
            ErrorCode::NotLeader => ClientError::NotLeader {
                leader: wire.leader_hint,
            },
            ErrorCode::KeyNotInRange => ClientError::KeyNotInRange {
                message: wire.message,
                descriptors: wire.descriptors,
            },
            ErrorCode::StaleGeneration => ClientError::StaleGeneration {
                message: wire.message,
                descriptors: wire.descriptors,
            },
            ErrorCode::RangeNotFound => ClientError::RangeNotFound(wire.message),
            ErrorCode::InvalidArgument => ClientError::InvalidArgument(wire.message),
            ErrorCode::Unavailable => ClientError::Unavailable(wire.message),
            ErrorCode::Corruption => ClientError::Corruption(wire.message),
            ErrorCode::OutcomeUnknown => ClientError::OutcomeUnknown(wire.message),
            ErrorCode::ResourceExhausted => ClientError::ResourceExhausted(wire.message),
            ErrorCode::HistoryCompacted => ClientError::HistoryCompacted {
                message: wire.message,
                horizon: wire.gc_horizon,
            },
            ErrorCode::Locked => ClientError::Locked {
                message: wire.message,
                locks: wire.locks,
            },
            ErrorCode::WriteConflict => ClientError::WriteConflict {
                message: wire.message,
                conflict_ts: wire.conflict_ts,
            },
            ErrorCode::TxnAborted => ClientError::TxnAborted(wire.message),
            ErrorCode::Internal | ErrorCode::Unknown => ClientError::Internal(wire.message),
        }
    }

    /// True when the server guarantees the request was not applied, so any call may be retried.
    pub fn is_rejected_before_apply(&self) -> bool {
        matches!(
            self,
            ClientError::NotLeader { .. }
                | ClientError::KeyNotInRange { .. }
                | ClientError::StaleGeneration { .. }
                | ClientError::RangeNotFound(_)
                | ClientError::Unavailable(_)
        )
    }
}

/// True when the status comes from failing to connect, so the request never left the client.
fn is_connect_failure(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
            ) {
                return true;
            }
        }
        let text = err.to_string();
        if text.contains("tcp connect error") || text.contains("Connection refused") {
            return true;
        }
        source = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_leader_hint_survives_a_status_round_trip() {
        let err = ClientError::NotLeader {
            leader: Some(NodeInfo {
                node_id: 3,
                addr: "127.0.0.1:7403".into(),
            }),
        };
        let back = ClientError::from_status(&err.to_status());
        match back {
            ClientError::NotLeader { leader: Some(l) } => {
                assert_eq!((l.node_id, l.addr.as_str()), (3, "127.0.0.1:7403"))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn history_compacted_carries_its_horizon_through_a_status() {
        let err = ClientError::HistoryCompacted {
            message: "read at 5".into(),
            horizon: 42,
        };
        match ClientError::from_status(&err.to_status()) {
            ClientError::HistoryCompacted { horizon, message } => {
                assert_eq!((horizon, message.as_str()), (42, "read at 5"))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn transaction_errors_carry_their_locks_and_conflicts_through_a_status() {
        let lock = LockInfo {
            key: b"k".to_vec(),
            primary: b"p".to_vec(),
            start_ts: 7,
            ttl_ms: 3_000,
        };
        let err = ClientError::Locked {
            message: "key k".into(),
            locks: vec![lock.clone()],
        };
        match ClientError::from_status(&err.to_status()) {
            ClientError::Locked { locks, .. } => assert_eq!(locks, vec![lock]),
            other => panic!("unexpected {other:?}"),
        }
        let err = ClientError::WriteConflict {
            message: "key k".into(),
            conflict_ts: 9,
        };
        match ClientError::from_status(&err.to_status()) {
            ClientError::WriteConflict { conflict_ts, .. } => assert_eq!(conflict_ts, 9),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            ClientError::from_status(&ClientError::TxnAborted("gone".into()).to_status()),
            ClientError::TxnAborted(m) if m == "gone"
        ));
    }

    #[test]
    fn a_bare_unavailable_status_is_indeterminate() {
        let back = ClientError::from_status(&tonic::Status::unavailable("connection reset"));
        assert!(matches!(back, ClientError::OutcomeUnknown(_)));
        assert!(!back.is_rejected_before_apply());
    }
}
