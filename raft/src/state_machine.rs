//! The replicated state machine of one range, applied to the node's data column family.
//!
//! Every applied entry is written in one RocksDB batch together with the applied log id (and
//! membership), so after a crash the state machine is exactly at some applied id: nothing is
//! applied twice or skipped. Snapshots stream the range's key span from a RocksDB snapshot,
//! so building one never blocks or races `apply`.

use std::io;
use std::path::{Path, PathBuf};

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use serde::{Deserialize, Serialize};
use spheredb_storage::{keys, record, ColumnFamilyName, Db, StorageError};

use crate::layout::{state_key, StateTag};
use crate::log_store::{decode_record, encode_record, read_state};
use crate::registry::{self, NodeRecord};
use crate::types::{
    Command, CommandResponse, LogId, RangeId, SnapshotData, SnapshotMeta, StoredMembership,
    TypeConfig, WriteOp,
};

/// Largest snapshot accepted on install; a bigger one is refused as corrupt or hostile.
pub const MAX_SNAPSHOT_SIZE_BYTES: usize = 1 << 30;
const SNAPSHOT_MAGIC: &[u8; 8] = b"SPHSNAP1";

/// Most responses held back by one apply batch before it is written.
pub const MAX_APPLY_BATCH_ENTRIES: usize = 1024;
/// Largest apply batch before it is written.
pub const MAX_APPLY_BATCH_BYTES: usize = 32 << 20;

/// Writes of applied entries not yet handed to RocksDB, with an overlay so later entries of
/// the batch read what earlier ones wrote.
#[derive(Default)]
struct PendingApply {
    batch: WriteBatch,
    overlay: std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>,
    responders: Vec<(
        openraft::storage::ApplyResponder<TypeConfig>,
        CommandResponse,
    )>,
}

/// Applied state as persisted with the data.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppliedState {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

/// A snapshot as kept on disk.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// A key and its value.
pub type KvPair = (Vec<u8>, Vec<u8>);

/// Reads the value of an encoded key; verifies its checksum.
pub fn read_value(db: &Db, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
    db.get_record(ColumnFamilyName::Data, key)
}

/// Reads up to `limit` pairs with `start <= key < end` (empty `end`: unbounded). The boolean
/// is true when more pairs remain.
pub fn scan_values(
    db: &Db,
    start: &[u8],
    end: &[u8],
    limit: usize,
) -> Result<(Vec<KvPair>, bool), StorageError> {
    let mut opts = ReadOptions::default();
    if !end.is_empty() {
        opts.set_iterate_upper_bound(end.to_vec());
    }
    let iter = db.raw().iterator_cf_opt(
        db.cf(ColumnFamilyName::Data),
        opts,
        IteratorMode::From(start, Direction::Forward),
    );
    let mut out = Vec::new();
    for item in iter {
        let (k, v) = item?;
        if out.len() == limit {
            return Ok((out, true));
        }
        let value = record::decode("data", &v)?.to_vec();
        out.push((k.to_vec(), value));
    }
    Ok((out, false))
}

/// The state machine of one range.
pub struct StateMachine {
    db: Db,
    range_id: RangeId,
    span_start: Vec<u8>,
    span_end: Vec<u8>,
    applied: AppliedState,
    snapshot_dir: PathBuf,
}

impl StateMachine {
    /// Opens the state machine of `range_id` covering `[span_start, span_end)`.
    pub fn open(
        db: Db,
        range_id: RangeId,
        span_start: Vec<u8>,
        span_end: Vec<u8>,
        snapshot_dir: &Path,
    ) -> io::Result<StateMachine> {
        std::fs::create_dir_all(snapshot_dir)?;
        let applied = read_state(&db, range_id, StateTag::Applied)?.unwrap_or_default();
        Ok(StateMachine {
            db,
            range_id,
            span_start,
            span_end,
            applied,
            snapshot_dir: snapshot_dir.to_path_buf(),
        })
    }

    fn snapshot_path(&self) -> PathBuf {
        self.snapshot_dir
            .join(format!("range-{}.snap", self.range_id))
    }

    fn data_cf(&self) -> &rocksdb::ColumnFamily {
        self.db.cf(ColumnFamilyName::Data)
    }

    fn put_applied(&self, batch: &mut WriteBatch) -> io::Result<()> {
        batch.put_cf(
            self.db.cf(ColumnFamilyName::RaftState),
            state_key(self.range_id, StateTag::Applied),
            encode_record(&self.applied)?,
        );
        Ok(())
    }

    fn check_in_span(&self, key: &[u8]) -> Result<(), String> {
        if keys::span_contains(&self.span_start, &self.span_end, key) {
            Ok(())
        } else {
            Err(format!("key outside the span of range {}", self.range_id))
        }
    }

    /// Applies one command into `pending`. Reads see earlier entries of the same batch
    /// through its overlay. Every rejection happens before the command adds any write.
    fn apply_command(
        &self,
        pending: &mut PendingApply,
        cmd: Command,
    ) -> io::Result<CommandResponse> {
        let current = |pending: &PendingApply, key: &[u8]| match pending.overlay.get(key) {
            Some(v) => Ok(v.clone()),
            None => read_value(&self.db, key).map_err(io::Error::from),
        };
        let batch = &mut pending.batch;
        match cmd {
            Command::Write { ops } => {
                for op in &ops {
                    if let Err(reason) = self.check_in_span(&op.key) {
                        return Ok(CommandResponse::Rejected { reason });
                    }
                }
                for WriteOp { key, value } in ops {
                    match &value {
                        Some(v) => batch.put_cf(self.data_cf(), &key, record::encode(v)),
                        None => batch.delete_cf(self.data_cf(), &key),
                    }
                    pending.overlay.insert(key, value);
                }
                Ok(CommandResponse::Done)
            }
            Command::Delete { key } => {
                if let Err(reason) = self.check_in_span(&key) {
                    return Ok(CommandResponse::Rejected { reason });
                }
                let existed = current(pending, &key)?.is_some();
                pending.batch.delete_cf(self.data_cf(), &key);
                pending.overlay.insert(key, None);
                Ok(CommandResponse::Deleted { existed })
            }
            Command::CompareAndSwap {
                key,
                expected,
                new_value,
            } => {
                if let Err(reason) = self.check_in_span(&key) {
                    return Ok(CommandResponse::Rejected { reason });
                }
                let found = current(pending, &key)?;
                if found != expected {
                    return Ok(CommandResponse::Swapped {
                        succeeded: false,
                        current: found,
                    });
                }
                match &new_value {
                    Some(v) => pending
                        .batch
                        .put_cf(self.data_cf(), &key, record::encode(v)),
                    None => pending.batch.delete_cf(self.data_cf(), &key),
                }
                pending.overlay.insert(key, new_value.clone());
                Ok(CommandResponse::Swapped {
                    succeeded: true,
                    current: new_value,
                })
            }
            Command::InitCluster {
                cluster_id,
                node_id,
                addr,
            } => {
                if registry::cluster_id(&self.db)?.is_some() {
                    return Ok(CommandResponse::Rejected {
                        reason: "cluster already initialised".into(),
                    });
                }
                registry::init_cluster(
                    &self.db,
                    &mut pending.batch,
                    cluster_id,
                    &NodeRecord { node_id, addr },
                )?;
                Ok(CommandResponse::NodeRegistered {
                    node_id,
                    cluster_id,
                })
            }
            Command::RegisterNode { join_token, addr } => {
                let Some(cluster_id) = registry::cluster_id(&self.db)? else {
                    return Ok(CommandResponse::Rejected {
                        reason: "cluster not initialised".into(),
                    });
                };
                let node_id = registry::register(&self.db, &mut pending.batch, &join_token, &addr)?;
                Ok(CommandResponse::NodeRegistered {
                    node_id,
                    cluster_id,
                })
            }
        }
    }

    /// Serialises every pair of the span as `len key len framed-value` records.
    fn export_span(&self, rocks_snapshot: &rocksdb::Snapshot<'_>) -> io::Result<Vec<u8>> {
        let mut out = SNAPSHOT_MAGIC.to_vec();
        let mut opts = ReadOptions::default();
        if !self.span_end.is_empty() {
            opts.set_iterate_upper_bound(self.span_end.clone());
        }
        let iter = rocks_snapshot.iterator_cf_opt(
            self.data_cf(),
            opts,
            IteratorMode::From(&self.span_start, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(io::Error::other)?;
            // Values stay framed with their checksums, verified again on install.
            record::decode("data", &v).map_err(io::Error::from)?;
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(&k);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(&v);
        }
        Ok(out)
    }

    /// Writes the pending batch with the applied state, then answers its clients.
    fn flush(&mut self, pending: &mut PendingApply) -> io::Result<()> {
        let mut taken = std::mem::take(pending);
        self.put_applied(&mut taken.batch)?;
        self.db.write(taken.batch, false).map_err(io::Error::from)?;
        for (responder, response) in taken.responders {
            responder.send(response);
        }
        Ok(())
    }

    /// Another handle on the same range state, for work off the apply task.
    fn handle(&self) -> StateMachine {
        StateMachine {
            db: self.db.clone(),
            range_id: self.range_id,
            span_start: self.span_start.clone(),
            span_end: self.span_end.clone(),
            applied: self.applied.clone(),
            snapshot_dir: self.snapshot_dir.clone(),
        }
    }

    /// Exports the range at a consistent point and persists it as the current snapshot.
    fn build_snapshot_blocking(&self) -> io::Result<StoredSnapshot> {
        let rocks_snapshot = self.db.raw().snapshot();
        let applied: AppliedState = match rocks_snapshot
            .get_cf(
                self.db.cf(ColumnFamilyName::RaftState),
                state_key(self.range_id, StateTag::Applied),
            )
            .map_err(io::Error::other)?
        {
            Some(framed) => decode_record("applied state", &framed)?,
            None => AppliedState::default(),
        };
        let data = self.export_span(&rocks_snapshot)?;
        drop(rocks_snapshot);
        let stored = StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: applied.last_applied,
                last_membership: applied.membership,
            },
            data,
        };
        self.write_snapshot_file(&stored)?;
        tracing::info!(range_id = self.range_id, last_log_id = ?stored.meta.last_log_id, size_bytes = stored.data.len(), "built snapshot");
        Ok(stored)
    }

    fn write_snapshot_file(&self, snap: &StoredSnapshot) -> io::Result<()> {
        let bytes = encode_record(snap)?;
        let path = self.snapshot_path();
        let tmp = path.with_extension("snap.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.snapshot_dir)?.sync_all()
    }

    fn read_snapshot_file(&self) -> io::Result<Option<StoredSnapshot>> {
        match std::fs::read(self.snapshot_path()) {
            Ok(bytes) => {
                decode_record(&format!("snapshot of range {}", self.range_id), &bytes).map(Some)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Splits one length-prefixed field off the front of `rest`.
fn take_field<'a>(rest: &mut &'a [u8]) -> io::Result<&'a [u8]> {
    let corrupt = |d: &str| io::Error::from(StorageError::corruption("snapshot", d.to_string()));
    if rest.len() < 4 {
        return Err(corrupt("truncated length"));
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    if rest.len() < 4 + len {
        return Err(corrupt("truncated record"));
    }
    let (field, tail) = rest[4..].split_at(len);
    *rest = tail;
    Ok(field)
}

/// Parses a snapshot blob into `(key, framed value)` pairs, verifying every checksum.
fn parse_snapshot(data: &[u8]) -> io::Result<Vec<(&[u8], &[u8])>> {
    let corrupt = |d: &str| io::Error::from(StorageError::corruption("snapshot", d.to_string()));
    let rest = data
        .strip_prefix(SNAPSHOT_MAGIC.as_slice())
        .ok_or_else(|| corrupt("bad magic"))?;
    let mut pairs = Vec::new();
    let mut rest = rest;
    while !rest.is_empty() {
        let key = take_field(&mut rest)?;
        let value = take_field(&mut rest)?;
        record::decode("snapshot value", value).map_err(io::Error::from)?;
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// Builds snapshots from a consistent RocksDB snapshot.
pub struct SnapshotBuilder {
    sm: StateMachine,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(
        &mut self,
    ) -> Result<openraft::alias::SnapshotOf<TypeConfig, SnapshotData>, io::Error> {
        // Reading the whole range and fsyncing the file would stall an async worker for as
        // long as it takes; run it on the blocking pool.
        let sm = self.sm.handle();
        let stored = tokio::task::spawn_blocking(move || sm.build_snapshot_blocking())
            .await
            .map_err(|e| io::Error::other(format!("snapshot task failed: {e}")))??;
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: stored.data,
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        // Entries are applied into one write batch (flushed at the bounds below), so a burst
        // of commits costs one RocksDB write, not one per entry.
        let mut pending = PendingApply::default();
        while let Some((entry, responder)) = entries.try_next().await? {
            let response = match entry.payload {
                EntryPayload::Blank => CommandResponse::Done,
                EntryPayload::Normal(cmd) if cmd.reads_registry() => {
                    // Registry commands read the database directly: apply them alone.
                    self.flush(&mut pending)?;
                    let r = self.apply_command(&mut pending, cmd)?;
                    self.applied.last_applied = Some(entry.log_id);
                    pending.responders.extend(responder.map(|x| (x, r)));
                    self.flush(&mut pending)?;
                    continue;
                }
                EntryPayload::Normal(cmd) => self.apply_command(&mut pending, cmd)?,
                EntryPayload::Membership(m) => {
                    self.applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    CommandResponse::Done
                }
            };
            self.applied.last_applied = Some(entry.log_id);
            pending.responders.extend(responder.map(|x| (x, response)));
            if pending.responders.len() >= MAX_APPLY_BATCH_ENTRIES
                || pending.batch.size_in_bytes() >= MAX_APPLY_BATCH_BYTES
            {
                self.flush(&mut pending)?;
            }
        }
        self.flush(&mut pending)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { sm: self.handle() }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let pairs = parse_snapshot(&snapshot)?;
        let mut batch = WriteBatch::default();
        // Clear the span, then load the snapshot's pairs, in one atomic batch.
        let mut opts = ReadOptions::default();
        if !self.span_end.is_empty() {
            opts.set_iterate_upper_bound(self.span_end.clone());
        }
        let iter = self.db.raw().iterator_cf_opt(
            self.data_cf(),
            opts,
            IteratorMode::From(&self.span_start, Direction::Forward),
        );
        for item in iter {
            let (k, _) = item.map_err(io::Error::other)?;
            batch.delete_cf(self.data_cf(), k);
        }
        let pair_count = pairs.len();
        for (k, v) in &pairs {
            batch.put_cf(self.data_cf(), k, v);
        }
        drop(pairs);
        self.applied = AppliedState {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        self.put_applied(&mut batch)?;
        self.db.write(batch, true).map_err(io::Error::from)?;
        self.write_snapshot_file(&StoredSnapshot {
            meta: meta.clone(),
            data: snapshot,
        })?;
        tracing::info!(range_id = self.range_id, last_log_id = ?meta.last_log_id, pairs = pair_count, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<openraft::alias::SnapshotOf<TypeConfig, SnapshotData>>, io::Error> {
        Ok(self.read_snapshot_file()?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: s.data,
        }))
    }
}
