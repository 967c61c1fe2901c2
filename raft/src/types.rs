//! The Raft type configuration and the commands a range replicates.

use serde::{Deserialize, Serialize};

/// A node's id. Allocated by the cluster's node registry and never reused, so it doubles as
/// the replica id of the node's replica in every range.
pub type NodeId = u64;

/// A range's id.
pub type RangeId = u64;

openraft::declare_raft_types!(
    /// SphereDB's Raft types.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = openraft::BasicNode,
);

/// A Raft handle for one range.
pub type RaftHandle = openraft::Raft<TypeConfig, crate::state_machine::StateMachine>;
/// Snapshot payload: the range's data in the format of `state_machine::snapshot_format`.
pub type SnapshotData = Vec<u8>;
/// A log id.
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
/// A vote.
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
/// A log entry.
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
/// Membership as stored with the applied state.
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;

/// One write to a key: `Some(value)` puts, `None` deletes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteOp {
    /// Encoded key (see `spheredb_storage::keys`).
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// A replicated command. Keys are fully encoded keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Atomically apply every op, in order.
    Write { ops: Vec<WriteOp> },
    /// Delete a key, reporting whether it existed.
    Delete { key: Vec<u8> },
    /// Set `key` to `new_value` if it holds `expected` (`None`: absent).
    CompareAndSwap {
        key: Vec<u8>,
        expected: Option<Vec<u8>>,
        new_value: Option<Vec<u8>>,
    },
    /// First command of a new cluster: records its id and the bootstrap node.
    InitCluster {
        cluster_id: u64,
        node_id: NodeId,
        addr: String,
    },
    /// Allocate (or look up, for a retried join) the node id for `join_token`.
    RegisterNode { join_token: Vec<u8>, addr: String },
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
    /// The command could not be applied; nothing was written.
    Rejected {
        reason: String,
    },
}

impl Command {
    /// True for commands that read the node registry straight from the database.
    pub fn reads_registry(&self) -> bool {
        matches!(
            self,
            Command::InitCluster { .. } | Command::RegisterNode { .. }
        )
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Write { ops } => write!(f, "write({} ops)", ops.len()),
            Command::Delete { .. } => write!(f, "delete"),
            Command::CompareAndSwap { .. } => write!(f, "compare-and-swap"),
            Command::InitCluster {
                cluster_id,
                node_id,
                ..
            } => {
                write!(f, "init-cluster({cluster_id:016x}, node {node_id})")
            }
            Command::RegisterNode { addr, .. } => write!(f, "register-node({addr})"),
        }
    }
}

impl std::fmt::Display for CommandResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}
