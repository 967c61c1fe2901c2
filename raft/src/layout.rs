//! Key layout of the `raft_log` and `raft_state` column families.
//!
//! `raft_log`:   `range_id:u64be index:u64be` → crc-framed postcard(Entry)
//! `raft_state`: `range_id:u64be tag:u8`      → crc-framed postcard(value)
//! Node-wide records live under range id 0, which no range uses.

use crate::types::RangeId;

/// Range id under which node-wide records are kept.
pub const NODE_RECORDS: RangeId = 0;

/// Tags of per-range records in `raft_state`.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
pub enum StateTag {
    Vote = 1,
    Committed = 2,
    LastPurged = 3,
    /// Applied log id, membership and span, written atomically with the data they cover.
    Applied = 4,
    /// Lowest replica id this node may still host for a range whose replica it destroyed.
    Tombstone = 5,
    /// This node's replica id in the range.
    LocalReplica = 6,
    /// The last log id of a snapshot being installed; see `state_machine`'s module comment.
    Installing = 7,
    /// Why the replica is quarantined (its data failed a checksum).
    Quarantined = 8,
    /// Node-wide: this node's identity.
    NodeIdentity = 16,
    /// Node-wide: the token of a join in progress.
    JoinToken = 17,
}

/// Key of log entry `index` of `range_id`.
pub fn log_key(range_id: RangeId, index: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&range_id.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Index encoded in a log key, if `key` belongs to `range_id`.
pub fn log_key_index(range_id: RangeId, key: &[u8]) -> Option<u64> {
    if key.len() != 16 || key[..8] != range_id.to_be_bytes() {
        return None;
    }
    let mut idx = [0u8; 8];
    idx.copy_from_slice(&key[8..]);
    Some(u64::from_be_bytes(idx))
}

/// Range and tag of a `raft_state` key.
pub fn parse_state_key(key: &[u8]) -> Option<(RangeId, u8)> {
    if key.len() != 9 {
        return None;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&key[..8]);
    Some((u64::from_be_bytes(id), key[8]))
}

/// Key of a `raft_state` record.
pub fn state_key(range_id: RangeId, tag: StateTag) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&range_id.to_be_bytes());
    k[8] = tag as u8;
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_sort_by_range_then_index() {
        assert!(log_key(1, u64::MAX) < log_key(2, 0));
        assert!(log_key(1, 9) < log_key(1, 10));
        assert_eq!(log_key_index(1, &log_key(1, 42)), Some(42));
        assert_eq!(log_key_index(2, &log_key(1, 42)), None);
    }
}
