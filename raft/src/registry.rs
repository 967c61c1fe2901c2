//! The cluster's node registry, kept under system keys in the replicated data.
//!
//! Node ids come from a counter that only grows, so an id is never handed out twice, and a
//! join token maps to its id so a retried join gets the same answer.

use std::io;

use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use serde::{Deserialize, Serialize};
use spheredb_storage::{keys, ColumnFamilyName, Db};

use crate::log_store::{decode_record, encode_record};
use crate::types::NodeId;

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node_id: NodeId,
    pub addr: String,
}

const NODE_PREFIX: &[u8] = b"node/";

fn cluster_id_key() -> Vec<u8> {
    keys::system_key(b"cluster_id")
}
fn next_node_id_key() -> Vec<u8> {
    keys::system_key(b"next_node_id")
}
fn node_key(node_id: NodeId) -> Vec<u8> {
    let mut name = NODE_PREFIX.to_vec();
    name.extend_from_slice(&node_id.to_be_bytes());
    keys::system_key(&name)
}
fn join_key(token: &[u8]) -> Vec<u8> {
    let mut name = b"join/".to_vec();
    name.extend_from_slice(token);
    keys::system_key(&name)
}

fn get<T: for<'de> Deserialize<'de>>(db: &Db, key: &[u8], what: &str) -> io::Result<Option<T>> {
    match db
        .raw()
        .get_pinned_cf(db.cf(ColumnFamilyName::Data), key)
        .map_err(io::Error::other)?
    {
        None => Ok(None),
        Some(v) => decode_record(what, &v).map(Some),
    }
}

fn put<T: Serialize>(db: &Db, batch: &mut WriteBatch, key: &[u8], value: &T) -> io::Result<()> {
    batch.put_cf(db.cf(ColumnFamilyName::Data), key, encode_record(value)?);
    Ok(())
}

/// The cluster id, once the cluster is initialised.
pub fn cluster_id(db: &Db) -> io::Result<Option<u64>> {
    get(db, &cluster_id_key(), "cluster id")
}

/// Every registered node, by id.
pub fn nodes(db: &Db) -> io::Result<Vec<NodeRecord>> {
    let prefix = {
        let mut p = vec![keys::SYSTEM_PREFIX];
        p.extend_from_slice(NODE_PREFIX);
        p
    };
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(keys::prefix_end(&prefix));
    let iter = db.raw().iterator_cf_opt(
        db.cf(ColumnFamilyName::Data),
        opts,
        IteratorMode::From(&prefix, Direction::Forward),
    );
    let mut out = Vec::new();
    for item in iter {
        let (_, v) = item.map_err(io::Error::other)?;
        out.push(decode_record("node record", &v)?);
    }
    Ok(out)
}

/// Adds the writes of cluster initialisation to `batch`.
pub fn init_cluster(
    db: &Db,
    batch: &mut WriteBatch,
    cluster_id: u64,
    node: &NodeRecord,
) -> io::Result<()> {
    put(db, batch, &cluster_id_key(), &cluster_id)?;
    put(db, batch, &next_node_id_key(), &(node.node_id + 1))?;
    put(db, batch, &node_key(node.node_id), node)
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
        },
    )?;
    Ok(next)
}
