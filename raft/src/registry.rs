//! The meta range's records, kept under system keys: the node registry, node liveness, range
//! descriptors and the range id counter.
//!
//! Node and range ids come from counters that only grow, so an id is never handed out twice,
//! and a join token maps to its id so a retried join gets the same answer.

use std::io;

use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use serde::{Deserialize, Serialize};
use spheredb_storage::{keys, ColumnFamilyName, Db};

use crate::log_store::{decode_record, encode_record};
use crate::types::{NodeId, RangeId, RangeRecord};

/// What the cluster asks of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Holds replicas.
    Active,
    /// Its replicas are being moved away.
    Decommissioning,
    /// Holds no replicas and gets none.
    Decommissioned,
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node_id: NodeId,
    pub addr: String,
    pub state: NodeState,
}

/// A node's liveness as the meta-range leader last declared it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LivenessRecord {
    pub node_id: NodeId,
    /// False once the node missed heartbeats for longer than the dead timeout.
    pub live: bool,
    /// Wall-clock time of the declaration, ms since the Unix epoch.
    pub since_unix_ms: u64,
}

const NODE_PREFIX: &[u8] = b"node/";
const RANGE_PREFIX: &[u8] = b"range/";
const LIVENESS_PREFIX: &[u8] = b"liveness/";

fn id_key(prefix: &[u8], id: u64) -> Vec<u8> {
    let mut name = prefix.to_vec();
    name.extend_from_slice(&id.to_be_bytes());
    keys::system_key(&name)
}

/// Key of the timestamp oracle's limit (ms since the Unix epoch): no timestamp handed out
/// has a physical part at or above it.
pub fn timestamp_limit_key() -> Vec<u8> {
    keys::system_key(b"tso_limit_ms")
}

/// Raises the timestamp oracle's limit to `until_ms` unless it is higher already; returns
/// the limit before and after. Adds the update to `batch`.
pub fn reserve_timestamps(
    db: &Db,
    batch: &mut WriteBatch,
    until_ms: u64,
) -> io::Result<(u64, u64)> {
    let previous: u64 = get(db, &timestamp_limit_key(), "timestamp limit")?.unwrap_or(0);
    let limit = previous.max(until_ms);
    if limit > previous {
        put(db, batch, &timestamp_limit_key(), &limit)?;
    }
    Ok((previous, limit))
}

/// Key of the range id counter.
pub fn next_range_id_key() -> Vec<u8> {
    keys::system_key(b"next_range_id")
}

/// Key of the descriptor of `range_id`.
pub fn range_key(range_id: RangeId) -> Vec<u8> {
    id_key(RANGE_PREFIX, range_id)
}

/// Key of the liveness record of `node_id`.
pub fn liveness_key(node_id: NodeId) -> Vec<u8> {
    id_key(LIVENESS_PREFIX, node_id)
}

fn cluster_id_key() -> Vec<u8> {
    keys::system_key(b"cluster_id")
}
fn next_node_id_key() -> Vec<u8> {
    keys::system_key(b"next_node_id")
}
/// Key of the record of `node_id`.
pub fn node_key(node_id: NodeId) -> Vec<u8> {
    id_key(NODE_PREFIX, node_id)
}
fn join_key(token: &[u8]) -> Vec<u8> {
    let mut name = b"join/".to_vec();
    name.extend_from_slice(token);
    keys::system_key(&name)
}

fn get<T: for<'de> Deserialize<'de>>(db: &Db, key: &[u8], what: &str) -> io::Result<Option<T>> {
    match db
        .raw()
        .get_pinned_cf(db.cf(ColumnFamilyName::System), key)
        .map_err(io::Error::other)?
    {
        None => Ok(None),
        Some(v) => decode_record(what, &v).map(Some),
    }
}

fn put<T: Serialize>(db: &Db, batch: &mut WriteBatch, key: &[u8], value: &T) -> io::Result<()> {
    batch.put_cf(db.cf(ColumnFamilyName::System), key, encode_record(value)?);
    Ok(())
}

/// The cluster id, once the cluster is initialised.
pub fn cluster_id(db: &Db) -> io::Result<Option<u64>> {
    get(db, &cluster_id_key(), "cluster id")
}

/// Every registered node, by id.
pub fn nodes(db: &Db) -> io::Result<Vec<NodeRecord>> {
    list(db, NODE_PREFIX, "node record")
}

/// Every range descriptor, by range id.
pub fn ranges(db: &Db) -> io::Result<Vec<RangeRecord>> {
    list(db, RANGE_PREFIX, "range descriptor")
}

/// One page of range descriptors by id: those after `after` (exclusive), at most `limit`,
/// stopping after the descriptor that crosses `budget_bytes` of stored size. The flag is
/// true when more descriptors follow.
pub fn ranges_page(
    db: &Db,
    after: RangeId,
    limit: usize,
    budget_bytes: usize,
) -> io::Result<(Vec<RangeRecord>, bool)> {
    let Some(first) = after.checked_add(1) else {
        return Ok((Vec::new(), false));
    };
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(keys::prefix_end(&keys::system_key(RANGE_PREFIX)));
    let start = range_key(first);
    let iter = db.raw().iterator_cf_opt(
        db.cf(ColumnFamilyName::System),
        opts,
        IteratorMode::From(&start, Direction::Forward),
    );
    let (mut page, mut bytes) = (Vec::new(), 0usize);
    for item in iter {
        let (_, v) = item.map_err(io::Error::other)?;
        if page.len() >= limit.max(1) || bytes >= budget_bytes {
            return Ok((page, true));
        }
        bytes += v.len();
        page.push(decode_record("range descriptor", &v)?);
    }
    Ok((page, false))
}

/// The descriptor of `range_id`, if the meta range has one.
pub fn range(db: &Db, range_id: RangeId) -> io::Result<Option<RangeRecord>> {
    get(db, &range_key(range_id), "range descriptor")
}

/// Every liveness record, by node id.
pub fn liveness(db: &Db) -> io::Result<Vec<LivenessRecord>> {
    list(db, LIVENESS_PREFIX, "liveness record")
}

/// Encodes a record as the value of a meta `Write` command (the state machine adds the
/// checksum framing when it stores it).
pub fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

fn list<T: for<'de> Deserialize<'de>>(db: &Db, name: &[u8], what: &str) -> io::Result<Vec<T>> {
    let prefix = {
        let mut p = vec![keys::SYSTEM_PREFIX];
        p.extend_from_slice(name);
        p
    };
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(keys::prefix_end(&prefix));
    let iter = db.raw().iterator_cf_opt(
        db.cf(ColumnFamilyName::System),
        opts,
        IteratorMode::From(&prefix, Direction::Forward),
    );
    let mut out = Vec::new();
    for item in iter {
        let (_, v) = item.map_err(io::Error::other)?;
        out.push(decode_record(what, &v)?);
    }
    Ok(out)
}

/// Adds the meta records of a new cluster to `batch`: its id, the bootstrap node, and the
/// descriptors of the first ranges.
pub fn init_cluster(
    db: &Db,
    batch: &mut WriteBatch,
    cluster_id: u64,
    node: &NodeRecord,
    ranges: &[RangeRecord],
) -> io::Result<()> {
    put(db, batch, &cluster_id_key(), &cluster_id)?;
    put(db, batch, &next_node_id_key(), &(node.node_id + 1))?;
    put(db, batch, &node_key(node.node_id), node)?;
    let next_range: RangeId = ranges.iter().map(|r| r.span.range_id).max().unwrap_or(0) + 1;
    put(db, batch, &next_range_id_key(), &next_range)?;
    for r in ranges {
        put(db, batch, &range_key(r.span.range_id), r)?;
    }
    Ok(())
}

/// Allocates `count` range ids; returns the first. Adds the counter's update to `batch`.
pub fn alloc_range_ids(db: &Db, batch: &mut WriteBatch, count: u64) -> io::Result<RangeId> {
    let next: RangeId = get(db, &next_range_id_key(), "next range id")?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "cluster not initialised: no range id counter",
        )
    })?;
    put(db, batch, &next_range_id_key(), &(next + count))?;
    Ok(next)
}

/// Allocates the node id of `join_token` (or returns the one it already has) and records the
/// node; adds the writes to `batch`.
pub fn register(
    db: &Db,
    batch: &mut WriteBatch,
    join_token: &[u8],
    addr: &str,
) -> io::Result<NodeId> {
    if let Some(existing) = get::<NodeId>(db, &join_key(join_token), "join token")? {
        put(
            db,
            batch,
            &node_key(existing),
            &NodeRecord {
                node_id: existing,
                addr: addr.to_string(),
                state: NodeState::Active,
            },
        )?;
        return Ok(existing);
    }
    let next: NodeId = get(db, &next_node_id_key(), "next node id")?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "cluster not initialised: no node id counter",
        )
    })?;
    put(db, batch, &next_node_id_key(), &(next + 1))?;
    put(db, batch, &join_key(join_token), &next)?;
    put(
        db,
        batch,
        &node_key(next),
        &NodeRecord {
            node_id: next,
            addr: addr.to_string(),
            state: NodeState::Active,
        },
    )?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use spheredb_storage::DbOptions;

    use super::*;
    use crate::types::{Membership, RangeSpan, ReplicaNode};

    fn with_ranges(dir: &std::path::Path, count: u64) -> Db {
        let db = Db::open(&dir.join("db"), &DbOptions::default()).unwrap();
        let membership = Membership::new(
            vec![BTreeSet::from([1])],
            BTreeMap::from([(1, ReplicaNode::default())]),
        )
        .unwrap();
        let mut batch = WriteBatch::default();
        for id in 1..=count {
            let span = RangeSpan {
                range_id: id,
                start_key: vec![1, id as u8],
                end_key: vec![1, id as u8 + 1],
                generation: 1,
                next_replica_id: 2,
            };
            put(
                &db,
                &mut batch,
                &range_key(id),
                &RangeRecord::new(span, &membership),
            )
            .unwrap();
        }
        db.write(batch, true).unwrap();
        db
    }

    fn ids(page: &[RangeRecord]) -> Vec<RangeId> {
        page.iter().map(|r| r.span.range_id).collect()
    }

    #[test]
    fn range_pages_cover_every_range_once_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = with_ranges(dir.path(), 25);
        let (mut after, mut seen, mut pages) = (0, Vec::new(), 0);
        loop {
            let (page, more) = ranges_page(&db, after, 10, usize::MAX).unwrap();
            pages += 1;
            seen.extend(ids(&page));
            match page.last() {
                Some(last) if more => after = last.span.range_id,
                _ => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(seen, (1..=25).collect::<Vec<_>>());
        assert_eq!(ids(&ranges(&db).unwrap()), seen);
        // A byte budget below one descriptor still makes progress, one range per page.
        let (page, more) = ranges_page(&db, 7, 10, 1).unwrap();
        assert_eq!((ids(&page), more), (vec![8], true));
        assert!(!ranges_page(&db, 25, 10, usize::MAX).unwrap().1);
        assert!(ranges_page(&db, u64::MAX, 10, usize::MAX)
            .unwrap()
            .0
            .is_empty());
    }
}
