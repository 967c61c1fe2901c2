//! The Raft type configuration and the commands a range replicates.

use serde::{Deserialize, Serialize};
pub use spheredb_storage::mvcc::Timestamp;

/// A node's id. Allocated by the cluster's node registry and never reused.
pub type NodeId = u64;

/// A replica's id within its range: openraft's node id. Never reused within a range, so a
/// replica that was removed and comes back on the same node starts as a new member and can
/// never vote twice in a term under an old identity.
pub type ReplicaId = u64;

/// A range's id. Allocated by the meta range and never reused.
pub type RangeId = u64;

/// Where a replica lives: openraft's `Node` type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaNode {
    pub node_id: NodeId,
    pub addr: String,
}

openraft::declare_raft_types!(
    /// SphereDB's Raft types.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = ReplicaId,
        Node = ReplicaNode,
);

/// A range's identity and span as its replicas hold it, written atomically with the applied
/// state; the replica set is the Raft membership stored next to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeSpan {
    pub range_id: RangeId,
    /// Inclusive start (encoded key); empty is the start of the keyspace.
    pub start_key: Vec<u8>,
    /// Exclusive end; empty is the end of the keyspace.
    pub end_key: Vec<u8>,
    /// Bumped by every split, merge and replica change.
    pub generation: u64,
    /// Lowest replica id never used in this range.
    pub next_replica_id: ReplicaId,
}

impl RangeSpan {
    /// True when `key` lies in `[start_key, end_key)`.
    pub fn contains(&self, key: &[u8]) -> bool {
        spheredb_storage::keys::span_contains(&self.start_key, &self.end_key, key)
    }

    /// True when every key of `other` lies in this span.
    pub fn covers(&self, other: &RangeSpan) -> bool {
        self.contains(&other.start_key)
            && (self.end_key.is_empty()
                || !other.end_key.is_empty() && other.end_key <= self.end_key)
    }

    /// True when the two spans share a key.
    pub fn overlaps(&self, other: &RangeSpan) -> bool {
        spheredb_storage::keys::spans_overlap(
            &self.start_key,
            &self.end_key,
            &other.start_key,
            &other.end_key,
        )
    }
}

/// A Raft handle for one range.
pub type RaftHandle = openraft::Raft<TypeConfig, crate::state_machine::StateMachine>;
/// Snapshot payload: a verified snapshot file (format in `crate::snapshot`).
pub type SnapshotData = crate::snapshot::SnapshotFile;
/// One replica of a range as the meta range records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub replica_id: ReplicaId,
    pub node_id: NodeId,
    /// False for a learner.
    pub voter: bool,
}

/// A range descriptor: span, generation and replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRecord {
    pub span: RangeSpan,
    pub replicas: Vec<ReplicaRecord>,
}

impl RangeRecord {
    /// The descriptor of a range with `span` and `membership`.
    pub fn new(span: RangeSpan, membership: &Membership) -> RangeRecord {
        let voters: std::collections::BTreeSet<ReplicaId> = membership.voter_ids().collect();
        let replicas = membership
            .nodes()
            .map(|(id, node)| ReplicaRecord {
                replica_id: *id,
                node_id: node.node_id,
                voter: voters.contains(id),
            })
            .collect();
        RangeRecord { span, replicas }
    }

    /// The replica on `node_id`, if any.
    pub fn replica_on(&self, node_id: NodeId) -> Option<&ReplicaRecord> {
        self.replicas.iter().find(|r| r.node_id == node_id)
    }
}

/// A log id.
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
/// A vote.
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
/// A log entry.
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
/// Membership as stored with the applied state.
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
/// A range's Raft membership.
pub type Membership = openraft::Membership<ReplicaId, ReplicaNode>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;

/// One write to a key: `Some(value)` puts, `None` deletes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Byte fields go through `serde_bytes`: postcard then copies them whole instead of one
// element at a time, with the same bytes on the wire and on disk (a length, then the bytes;
// see the `byte_fields_encode_as_before` test).
pub struct WriteOp {
    /// Encoded key (see `spheredb_storage::keys`).
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
}

/// A replicated command. Keys are fully encoded keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Atomically apply every op, in order. Sphere keys are written as versions at
    /// `commit_ts`, which the leader fixed when it proposed the entry (a single-range
    /// transaction committed in one entry); system keys need none.
    Write {
        ops: Vec<WriteOp>,
        commit_ts: Option<Timestamp>,
    },
    /// Delete a key, reporting whether it existed.
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        commit_ts: Option<Timestamp>,
    },
    /// Set `key` to `new_value` if it holds `expected` (`None`: absent).
    CompareAndSwap {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        expected: Option<Vec<u8>>,
        #[serde(with = "serde_bytes")]
        new_value: Option<Vec<u8>>,
        commit_ts: Option<Timestamp>,
    },
    /// Allocate (or look up, for a retried join) the node id for `join_token`.
    RegisterNode { join_token: Vec<u8>, addr: String },
    /// Split the range at `split_key` (meta range: allocated by the caller) if it is still at
    /// `expected_generation`. The right half becomes range `new_range_id` on the same replicas.
    Split {
        split_key: Vec<u8>,
        new_range_id: RangeId,
        expected_generation: u64,
    },
    /// Meta range only: allocate `count` range ids.
    AllocRangeIds { count: u64 },
    /// Right-hand side of a merge: stop taking reads and writes so the data is final, to be
    /// taken over by range `into` at its generation `left_generation`. Only if this range is
    /// still at `expected_generation`.
    Freeze {
        into: RangeId,
        left_generation: u64,
        expected_generation: u64,
    },
    /// Undo the [`Command::Freeze`] `freeze` (only that one) once its merge can no longer
    /// happen.
    Thaw { freeze: MergeFreeze },
    /// Left-hand side of a merge: take over `right` (frozen into this range, its data on
    /// every replica) if this range is still at `expected_generation`.
    Merge {
        right: RangeSpan,
        expected_generation: u64,
    },
    /// Left-hand side: make sure no [`Command::Merge`] of `right` expecting generation
    /// `left_generation` applies from here on (moving to a new generation if still there),
    /// and answer whether that merge already happened.
    AbortMerge {
        right: RangeSpan,
        left_generation: u64,
    },
    /// Allocate a replica id for a replica about to be added, if the range is still at
    /// `expected_generation`. Ids are allocated through the log, never from a leader's view of
    /// the membership: an add that is proposed and then discarded (leader change) must not
    /// free its id for another replica, which would make two replicas answer to one id.
    AllocReplicaId { expected_generation: u64 },
    /// Meta range only: raise the timestamp oracle's limit to `until_ms` (never lowers it).
    /// No leader hands out a timestamp at or above the stored limit, so a new leader that
    /// starts at the limit it finds is above every timestamp handed out before.
    ReserveTimestamps { until_ms: u64 },
    /// Raise the range's GC horizon to `horizon` (never lowers it): versions older than the
    /// newest one at or below it may be collected, and reads below it are refused.
    RaiseGcHorizon { horizon: Timestamp },
    /// Percolator prewrite of a transaction's keys in this range (all or none): a lock on
    /// each, after checking for locks of others and for writes committed since `start_ts`.
    /// With `TxnOp::PessimisticLock` ops, a pessimistic lock (`Txn::lock`).
    Prewrite {
        mutations: Vec<TxnMutation>,
        #[serde(with = "serde_bytes")]
        primary: Vec<u8>,
        start_ts: Timestamp,
        ttl_ms: u64,
    },
    /// Commit the transaction's locks on `keys` at `commit_ts` (all or none).
    CommitTxn {
        keys: Vec<TxnKey>,
        start_ts: Timestamp,
        commit_ts: Timestamp,
    },
    /// Roll the transaction back on `keys` (all or none: refused if one committed).
    RollbackTxn {
        keys: Vec<TxnKey>,
        start_ts: Timestamp,
    },
    /// The transaction's status on its primary at `current_ts`, rolling it back when its
    /// lock expired (or it left no trace and `rollback_if_missing`).
    CheckTxnStatus {
        #[serde(with = "serde_bytes")]
        primary: Vec<u8>,
        start_ts: Timestamp,
        current_ts: Timestamp,
        rollback_if_missing: bool,
    },
    /// Raise the TTL of the transaction's primary lock to `ttl_ms`.
    TxnHeartbeat {
        #[serde(with = "serde_bytes")]
        primary: Vec<u8>,
        start_ts: Timestamp,
        ttl_ms: u64,
    },
    /// A transaction whose keys all lie in this range, committed in one entry (1PC): the
    /// checks of a prewrite against `start_ts`, then the writes as versions at `commit_ts`,
    /// which the leader fixed as for [`Command::Write`].
    OnePhaseTxn {
        ops: Vec<WriteOp>,
        start_ts: Timestamp,
        commit_ts: Option<Timestamp>,
    },
}

/// An encoded key in a transaction command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnKey(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// What a transaction does to a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    Put(#[serde(with = "serde_bytes")] Vec<u8>),
    Delete,
    /// Lock the key without writing it (its value is unchanged by the commit).
    Lock,
    /// Take a pessimistic lock now; the prewrite turns it into one of the others.
    PessimisticLock,
}

/// One key of a prewrite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnMutation {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub op: TxnOp,
}

/// A transaction's lock, as a refusal reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub primary: Vec<u8>,
    pub start_ts: Timestamp,
    pub ttl_ms: u64,
}

/// Why a transaction command was refused; nothing of it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnRefusal {
    /// Another transaction's lock: resolve it through its primary and retry.
    Locked(LockInfo),
    /// `key` has a write committed at `commit_ts`, at or after the transaction's start.
    WriteConflict {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        commit_ts: Timestamp,
    },
    /// The transaction was rolled back.
    Aborted {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// The transaction committed at `commit_ts` (a rollback came too late).
    Committed { commit_ts: Timestamp },
    /// The transaction's start ts is at or below the range's GC horizon.
    BelowGcHorizon { horizon: Timestamp },
}

/// A transaction's state as its primary tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnState {
    Committed(Timestamp),
    RolledBack,
    Alive { ttl_ms: u64 },
    NotFound,
}

/// A range frozen for a merge into its left neighbour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeFreeze {
    /// The left neighbour taking the range over.
    pub into: RangeId,
    /// The left neighbour's generation the merge expects.
    pub left_generation: u64,
}

/// A range's bounds in time, kept with its applied state and carried by its snapshots,
/// splits and merges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeTimes {
    /// Versions older than the newest one at or below this timestamp may be collected; no
    /// read below it is served. Only rises (see [`Command::RaiseGcHorizon`]).
    pub gc_horizon: Timestamp,
    /// The highest commit timestamp the range applied. A leader fixes commit timestamps in
    /// log order, each above the last, and a new leader starts above every timestamp handed
    /// out before it, so every committed single-range write lies above this one; one that
    /// does not is refused. A split's right half copies it; a merge keeps the left range's
    /// own (writes fixed before the merge applied may follow it in the log below the right
    /// range's commits; the right half's keys are written only under a fresh seed).
    pub last_commit_ts: Timestamp,
}

/// The result of applying a [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    /// Blank and membership entries, plain writes.
    Done,
    Deleted {
        existed: bool,
    },
    Swapped {
        succeeded: bool,
        current: Option<Vec<u8>>,
    },
    NodeRegistered {
        node_id: NodeId,
        cluster_id: u64,
    },
    /// The range split; the spans of both halves.
    SplitDone {
        left: Box<RangeSpan>,
        right: Box<RangeSpan>,
    },
    /// The first of `count` newly allocated range ids.
    RangeIds {
        first: RangeId,
        count: u64,
    },
    /// A key of the command lies outside the range (it split or merged since the command was
    /// proposed); nothing was written.
    OutsideSpan {
        span: Option<Box<RangeSpan>>,
    },
    /// The range is frozen for a merge into `into`; nothing was written. Retry shortly.
    Frozen {
        into: RangeId,
    },
    /// The range is frozen (or was already, for the same merge).
    FreezeDone {
        span: Box<RangeSpan>,
    },
    /// The range took over its right neighbour; its new span.
    MergeDone {
        span: Box<RangeSpan>,
    },
    /// A pending merge can no longer apply; `merged` when it already had.
    MergeAborted {
        merged: bool,
        span: Box<RangeSpan>,
    },
    /// A newly allocated replica id.
    ReplicaId {
        replica_id: ReplicaId,
    },
    /// The command could not be applied; nothing was written.
    Rejected {
        reason: String,
    },
    /// The timestamp oracle's limit before and after a [`Command::ReserveTimestamps`].
    TimestampsReserved {
        previous_ms: u64,
        limit_ms: u64,
    },
    /// A transaction command (or a single-range write meeting a lock) was refused.
    TxnRefused(TxnRefusal),
    /// A transaction's state (status checks and heartbeats).
    TxnStatus(TxnState),
}

impl Command {
    /// True for commands applied alone: they read the database directly or change the range.
    pub fn reads_registry(&self) -> bool {
        matches!(
            self,
            Command::RegisterNode { .. }
                | Command::Split { .. }
                | Command::AllocRangeIds { .. }
                | Command::Freeze { .. }
                | Command::Thaw { .. }
                | Command::Merge { .. }
                | Command::AbortMerge { .. }
                | Command::AllocReplicaId { .. }
                | Command::ReserveTimestamps { .. }
                | Command::Prewrite { .. }
                | Command::CommitTxn { .. }
                | Command::RollbackTxn { .. }
                | Command::CheckTxnStatus { .. }
                | Command::TxnHeartbeat { .. }
                | Command::OnePhaseTxn { .. }
        )
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Write { ops, .. } => write!(f, "write({} ops)", ops.len()),
            Command::Delete { .. } => write!(f, "delete"),
            Command::CompareAndSwap { .. } => write!(f, "compare-and-swap"),
            Command::RegisterNode { addr, .. } => write!(f, "register-node({addr})"),
            Command::Split { new_range_id, .. } => write!(f, "split(new range {new_range_id})"),
            Command::AllocRangeIds { count } => write!(f, "alloc-range-ids({count})"),
            Command::Freeze { into, .. } => write!(f, "freeze(into range {into})"),
            Command::Thaw { .. } => write!(f, "thaw"),
            Command::Merge { right, .. } => write!(f, "merge(range {})", right.range_id),
            Command::AbortMerge { right, .. } => {
                write!(f, "abort-merge(range {})", right.range_id)
            }
            Command::AllocReplicaId { .. } => write!(f, "alloc-replica-id"),
            Command::ReserveTimestamps { until_ms } => {
                write!(f, "reserve-timestamps(until {until_ms} ms)")
            }
            Command::RaiseGcHorizon { horizon } => write!(f, "raise-gc-horizon({horizon})"),
            Command::Prewrite {
                mutations,
                start_ts,
                ..
            } => write!(f, "prewrite({} keys, start {start_ts})", mutations.len()),
            Command::CommitTxn {
                keys,
                start_ts,
                commit_ts,
            } => write!(
                f,
                "commit-txn({} keys, start {start_ts}, commit {commit_ts})",
                keys.len()
            ),
            Command::RollbackTxn { keys, start_ts } => {
                write!(f, "rollback-txn({} keys, start {start_ts})", keys.len())
            }
            Command::CheckTxnStatus { start_ts, .. } => {
                write!(f, "check-txn-status(start {start_ts})")
            }
            Command::TxnHeartbeat { start_ts, .. } => write!(f, "txn-heartbeat(start {start_ts})"),
            Command::OnePhaseTxn { ops, start_ts, .. } => {
                write!(f, "one-phase-txn({} ops, start {start_ts})", ops.len())
            }
        }
    }
}

impl std::fmt::Display for CommandResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The commands with plain byte vectors instead of `serde_bytes` fields.
    #[derive(Serialize)]
    struct PlainWriteOp {
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    }

    #[derive(Serialize)]
    enum PlainCommand {
        Write {
            ops: Vec<PlainWriteOp>,
            commit_ts: Option<u64>,
        },
        Delete {
            key: Vec<u8>,
            commit_ts: Option<u64>,
        },
        CompareAndSwap {
            key: Vec<u8>,
            expected: Option<Vec<u8>>,
            new_value: Option<Vec<u8>>,
            commit_ts: Option<u64>,
        },
    }

    #[test]
    fn byte_fields_encode_as_plain_byte_vectors() {
        // `serde_bytes` is only a faster path: the bytes must be exactly those of plain
        // vectors, so the encoding stays what the format version says it is.
        let long = vec![7u8; 300]; // a length that takes two varint bytes
        let cases = [
            (
                Command::Write {
                    ops: vec![
                        WriteOp {
                            key: b"k".to_vec(),
                            value: Some(long.clone()),
                        },
                        WriteOp {
                            key: Vec::new(),
                            value: None,
                        },
                    ],
                    commit_ts: Some(300),
                },
                PlainCommand::Write {
                    ops: vec![
                        PlainWriteOp {
                            key: b"k".to_vec(),
                            value: Some(long.clone()),
                        },
                        PlainWriteOp {
                            key: Vec::new(),
                            value: None,
                        },
                    ],
                    commit_ts: Some(300),
                },
            ),
            (
                Command::Delete {
                    key: long.clone(),
                    commit_ts: None,
                },
                PlainCommand::Delete {
                    key: long.clone(),
                    commit_ts: None,
                },
            ),
            (
                Command::CompareAndSwap {
                    key: b"c".to_vec(),
                    expected: None,
                    new_value: Some(b"v".to_vec()),
                    commit_ts: Some(1),
                },
                PlainCommand::CompareAndSwap {
                    key: b"c".to_vec(),
                    expected: None,
                    new_value: Some(b"v".to_vec()),
                    commit_ts: Some(1),
                },
            ),
            (
                Command::CompareAndSwap {
                    key: Vec::new(),
                    expected: Some(Vec::new()),
                    new_value: Some(long.clone()),
                    commit_ts: Some(u64::MAX),
                },
                PlainCommand::CompareAndSwap {
                    key: Vec::new(),
                    expected: Some(Vec::new()),
                    new_value: Some(long.clone()),
                    commit_ts: Some(u64::MAX),
                },
            ),
        ];
        for (cmd, plain) in cases {
            let new = postcard::to_stdvec(&cmd).unwrap();
            let old = postcard::to_stdvec(&plain).unwrap();
            assert_eq!(new, old, "{cmd:?}");
            let back: Command = postcard::from_bytes(&old).unwrap();
            assert_eq!(back, cmd);
        }
        // And the bytes themselves, so that a change of postcard cannot move both sides.
        let cas = Command::CompareAndSwap {
            key: b"k".to_vec(),
            expected: Some(Vec::new()),
            new_value: None,
            commit_ts: Some(5),
        };
        // Variant 2, key (length 1, 'k'), Some(empty), None, Some(5).
        assert_eq!(
            postcard::to_stdvec(&cas).unwrap(),
            [2, 1, b'k', 1, 0, 0, 1, 5]
        );
    }
}
