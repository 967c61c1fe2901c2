//! The Raft log of one range, kept in the node's shared RocksDB.
//!
//! Entries live in `raft_log` under `(range_id, index)`, each a crc-framed postcard record.
//! `append` writes without syncing and hands its durability callback to the node's
//! [`GroupCommit`], which fires it only after a WAL fsync. Votes and truncations are
//! synced inline: they are rare and must never be lost.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use serde::de::DeserializeOwned;
use serde::Serialize;
use spheredb_storage::{record, ColumnFamilyName, Db, StorageError};

use crate::group_commit::GroupCommit;
use crate::layout::{log_key, log_key_index, state_key, StateTag};
use crate::types::{Entry, LogId, RangeId, TypeConfig, Vote};

/// Encodes a value as a crc-framed postcard record.
pub fn encode_record<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    let payload =
        postcard::to_stdvec(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    Ok(record::encode(&payload))
}

/// Decodes a crc-framed postcard record; damage is an `InvalidData` error naming `what`.
pub fn decode_record<T: DeserializeOwned>(what: &str, framed: &[u8]) -> io::Result<T> {
    let payload = record::decode(what, framed).map_err(io::Error::from)?;
    postcard::from_bytes(payload).map_err(|e| {
        io::Error::from(StorageError::corruption(
            what,
            format!("undecodable record: {e}"),
        ))
    })
}

/// Reads a per-range state record.
pub fn read_state<T: DeserializeOwned>(
    db: &Db,
    range_id: RangeId,
    tag: StateTag,
) -> io::Result<Option<T>> {
    let key = state_key(range_id, tag);
    match db
        .raw()
        .get_pinned_cf(db.cf(ColumnFamilyName::RaftState), key)
        .map_err(io::Error::other)?
    {
        None => Ok(None),
        Some(framed) => {
            decode_record(&format!("raft state {tag:?} of range {range_id}"), &framed).map(Some)
        }
    }
}

/// Writes a per-range state record, synced when `sync`.
pub fn write_state<T: Serialize>(
    db: &Db,
    range_id: RangeId,
    tag: StateTag,
    value: &T,
    sync: bool,
) -> io::Result<()> {
    let mut batch = WriteBatch::default();
    batch.put_cf(
        db.cf(ColumnFamilyName::RaftState),
        state_key(range_id, tag),
        encode_record(value)?,
    );
    db.write(batch, sync).map_err(io::Error::from)
}

/// Ranges with a replica on this node: those with applied state or a local replica id.
pub fn local_ranges(db: &Db) -> io::Result<Vec<RangeId>> {
    let iter = db
        .raw()
        .iterator_cf(db.cf(ColumnFamilyName::RaftState), IteratorMode::Start);
    let mut out = Vec::new();
    for item in iter {
        let (key, _) = item.map_err(io::Error::other)?;
        if let Some((range_id, tag)) = crate::layout::parse_state_key(&key) {
            let is_replica = tag == StateTag::Applied as u8 || tag == StateTag::LocalReplica as u8;
            if range_id != crate::layout::NODE_RECORDS
                && is_replica
                && out.last() != Some(&range_id)
            {
                out.push(range_id);
            }
        }
    }
    Ok(out)
}

/// The tombstone of `range_id`: the lowest replica id this node may still host for it (it
/// destroyed every lower one), 0 when it destroyed none.
pub fn tombstone(db: &Db, range_id: RangeId) -> io::Result<u64> {
    Ok(read_state(db, range_id, StateTag::Tombstone)?.unwrap_or(0))
}

/// Raises the tombstone of `range_id` to `floor` (never lowers it: a lower one would let a
/// destroyed replica's messages start it again). Synced.
pub fn raise_tombstone(db: &Db, range_id: RangeId, floor: u64) -> io::Result<()> {
    if tombstone(db, range_id)? >= floor {
        return Ok(());
    }
    write_state(db, range_id, StateTag::Tombstone, &floor, true)
}

/// Deletes the replica of `range_id` from this node: its log, its Raft state, and the data
/// in `data_span` (`(start, end)`, empty end: unbounded), and leaves a tombstone so no
/// replica id up to `replica_id` is ever hosted here again. Synced.
pub fn destroy_replica(
    db: &Db,
    range_id: RangeId,
    replica_id: u64,
    data_span: Option<(Vec<u8>, Vec<u8>)>,
) -> io::Result<()> {
    let mut batch = WriteBatch::default();
    let log = db.cf(ColumnFamilyName::RaftLog);
    batch.delete_range_cf(log, log_key(range_id, 0), log_key(range_id, u64::MAX));
    batch.delete_cf(log, log_key(range_id, u64::MAX));
    let state = db.cf(ColumnFamilyName::RaftState);
    for tag in [
        StateTag::Vote,
        StateTag::Committed,
        StateTag::LastPurged,
        StateTag::Applied,
        StateTag::LocalReplica,
        StateTag::Installing,
        StateTag::Quarantined,
    ] {
        batch.delete_cf(state, state_key(range_id, tag));
    }
    let floor = tombstone(db, range_id)?.max(replica_id + 1);
    batch.put_cf(
        state,
        state_key(range_id, StateTag::Tombstone),
        encode_record(&floor)?,
    );
    if let Some((start, end)) = data_span {
        db.batch_delete_range_data(&mut batch, &start, &end);
    }
    db.write(batch, true).map_err(io::Error::from)
}

/// The log store of one range. Clones share the database and the group committer.
#[derive(Clone)]
pub struct LogStore {
    db: Db,
    range_id: RangeId,
    group_commit: GroupCommit,
}

impl LogStore {
    /// The log of `range_id` in `db`.
    pub fn new(db: Db, range_id: RangeId, group_commit: GroupCommit) -> Self {
        LogStore {
            db,
            range_id,
            group_commit,
        }
    }

    fn cf(&self) -> &rocksdb::ColumnFamily {
        self.db.cf(ColumnFamilyName::RaftLog)
    }

    fn last_entry_log_id(&self) -> io::Result<Option<LogId>> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(log_key(self.range_id, 0).to_vec());
        let upper = log_key(self.range_id, u64::MAX);
        let mut iter = self.db.raw().iterator_cf_opt(
            self.cf(),
            opts,
            IteratorMode::From(&upper, Direction::Reverse),
        );
        match iter.next() {
            None => Ok(None),
            Some(item) => {
                let (key, value) = item.map_err(io::Error::other)?;
                let index = log_key_index(self.range_id, &key).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "foreign key in range log")
                })?;
                let entry: Entry = decode_record(
                    &format!("log entry {index} of range {}", self.range_id),
                    &value,
                )?;
                Ok(Some(entry.log_id))
            }
        }
    }

    fn delete_from(&self, batch: &mut WriteBatch, first_index: u64) {
        batch.delete_range_cf(
            self.cf(),
            log_key(self.range_id, first_index),
            log_key(self.range_id, u64::MAX),
        );
        // delete_range's end is exclusive; the last possible index is removed explicitly.
        batch.delete_cf(self.cf(), log_key(self.range_id, u64::MAX));
    }
}

/// `[start, end_exclusive)` of a range of log indexes.
fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end_exclusive = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end_exclusive)
}

/// Most bytes of stored log entries one replication message carries. Reading stops after the
/// entry that crosses it, so a message holds at most this plus one entry (an entry is at most
/// one client batch, `MAX_BATCH_SIZE_BYTES` plus framing): far under
/// `network::MAX_RAFT_MESSAGE_SIZE_BYTES`, so a lagging follower is caught up in bounded steps
/// instead of one message that fails to encode and is retried forever.
pub const MAX_APPEND_SIZE_BYTES: usize = 8 << 20;

impl LogStore {
    /// Reads entries `[start, end_exclusive)` in order, stopping after the entry that brings
    /// their stored size to `max_bytes` (`usize::MAX`: no byte bound). Checks that indexes are
    /// contiguous and every checksum holds.
    fn read_entries(
        &self,
        start: u64,
        end_exclusive: u64,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, io::Error> {
        if start >= end_exclusive {
            return Ok(Vec::new());
        }
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(log_key(self.range_id, end_exclusive).to_vec());
        let from = log_key(self.range_id, start);
        let iter = self.db.raw().iterator_cf_opt(
            self.cf(),
            opts,
            IteratorMode::From(&from, Direction::Forward),
        );
        let mut entries = Vec::new();
        let mut expected = start;
        let mut size_bytes = 0usize;
        for item in iter {
            if size_bytes >= max_bytes {
                break;
            }
            let (key, value) = item.map_err(io::Error::other)?;
            size_bytes += value.len();
            let Some(index) = log_key_index(self.range_id, &key) else {
                break;
            };
            let entry: Entry = decode_record(
                &format!("log entry {index} of range {}", self.range_id),
                &value,
            )?;
            if entry.log_id.index != index || (!entries.is_empty() && index != expected) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "range {} log not contiguous: key index {index}, entry index {}, expected {expected}",
                        self.range_id, entry.log_id.index
                    ),
                ));
            }
            expected = index + 1;
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end_exclusive) = bounds(&range);
        self.read_entries(start, end_exclusive, usize::MAX)
    }

    /// Replication reads through here: at most [`MAX_APPEND_SIZE_BYTES`] (and never nothing
    /// for a non-empty range, as openraft requires).
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, io::Error> {
        self.read_entries(start, end, MAX_APPEND_SIZE_BYTES)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        read_state(&self.db, self.range_id, StateTag::Vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged: Option<LogId> = read_state(&self.db, self.range_id, StateTag::LastPurged)?;
        let last = self.last_entry_log_id()?.or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        write_state(&self.db, self.range_id, StateTag::Vote, vote, true)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not synced: the committed id only speeds up recovery; losing it is safe.
        write_state(
            &self.db,
            self.range_id,
            StateTag::Committed,
            &committed,
            false,
        )
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(read_state::<Option<LogId>>(&self.db, self.range_id, StateTag::Committed)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        for entry in entries {
            batch.put_cf(
                self.cf(),
                log_key(self.range_id, entry.log_id.index),
                encode_record(&entry)?,
            );
        }
        // Visible to readers now; durable only after the group commit's fsync, which is when
        // the callback fires.
        self.db.write(batch, false).map_err(io::Error::from)?;
        self.group_commit
            .submit(Box::new(move |result| callback.io_completed(result)))
            .await
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let first_removed = last_log_id.map_or(0, |id| id.index + 1);
        let mut batch = WriteBatch::default();
        self.delete_from(&mut batch, first_removed);
        self.db.write(batch, true).map_err(io::Error::from)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.db.cf(ColumnFamilyName::RaftState),
            state_key(self.range_id, StateTag::LastPurged),
            encode_record(&log_id)?,
        );
        batch.delete_range_cf(
            self.cf(),
            log_key(self.range_id, 0),
            log_key(self.range_id, log_id.index + 1),
        );
        // Not synced: a purge lost in a crash only leaves extra log behind.
        self.db.write(batch, false).map_err(io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::entry::RaftEntry;
    use openraft::type_config::TypeConfigExt;
    use openraft::vote::RaftLeaderIdExt;
    use spheredb_storage::DbOptions;
    use std::sync::Arc;

    fn log_id(term: u64, index: u64) -> LogId {
        openraft::LogId::new(
            openraft::vote::leader_id_adv::LeaderId::<u64, u64>::new_committed(term, 1),
            index,
        )
    }

    fn entry(term: u64, index: u64) -> Entry {
        Entry::new_blank(log_id(term, index))
    }

    async fn append(store: &mut LogStore, entries: Vec<Entry>) {
        let (tx, rx) = TypeConfig::oneshot();
        store.append(entries, IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
    }

    fn open(dir: &std::path::Path) -> (Db, GroupCommit) {
        let db = Db::open(dir, &DbOptions::default()).unwrap();
        let gc = GroupCommit::start(Arc::new(db.clone())).unwrap();
        (db, gc)
    }

    #[tokio::test]
    async fn replication_reads_stop_at_the_byte_budget_but_never_return_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (db, gc) = open(dir.path());
        let mut store = LogStore::new(db, 7, gc);
        // Five entries of 3 MiB each: 15 MiB in all, over the 8 MiB budget.
        let big = |index| {
            Entry::new_normal(
                log_id(1, index),
                crate::Command::Write {
                    ops: vec![crate::WriteOp {
                        key: vec![1, index as u8],
                        value: Some(vec![7; 3 << 20]),
                    }],
                    commit_ts: Some(index),
                },
            )
        };
        append(&mut store, (1..=5).map(big).collect()).await;
        let limited = store.limited_get_log_entries(1, 6).await.unwrap();
        let indexes: Vec<u64> = limited.iter().map(|e| e.log_id.index).collect();
        // The third entry crosses 8 MiB and is the last one sent.
        assert_eq!(indexes, vec![1, 2, 3]);
        let rest = store.limited_get_log_entries(4, 6).await.unwrap();
        assert_eq!(rest.len(), 2);
        // Reads that must be complete are not bounded.
        assert_eq!(store.try_get_log_entries(1..6).await.unwrap().len(), 5);
    }

    #[tokio::test]
    async fn append_truncate_purge_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (db, gc) = open(dir.path());
            let mut store = LogStore::new(db.clone(), 7, gc.clone());
            // Another range's log in the same column family must stay separate.
            let mut other = LogStore::new(db, 8, gc.clone());
            append(&mut other, (1..=3).map(|i| entry(1, i)).collect()).await;

            append(&mut store, (1..=10).map(|i| entry(1, i)).collect()).await;
            let got = store.try_get_log_entries(3..6).await.unwrap();
            assert_eq!(
                got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
                vec![3, 4, 5]
            );

            store.truncate_after(Some(log_id(1, 7))).await.unwrap();
            assert_eq!(
                store.get_log_state().await.unwrap().last_log_id,
                Some(log_id(1, 7))
            );
            append(&mut store, vec![entry(2, 8)]).await;

            store.purge(log_id(1, 4)).await.unwrap();
            let state = store.get_log_state().await.unwrap();
            assert_eq!(state.last_purged_log_id, Some(log_id(1, 4)));
            assert_eq!(state.last_log_id, Some(log_id(2, 8)));
            assert!(store.try_get_log_entries(0..5).await.unwrap().is_empty());

            let vote = Vote::new(3, 2);
            store.save_vote(&vote).await.unwrap();
            gc.shutdown();
        }
        let (db, gc) = open(dir.path());
        let mut store = LogStore::new(db.clone(), 7, gc.clone());
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 4)));
        assert_eq!(state.last_log_id, Some(log_id(2, 8)));
        let got = store.try_get_log_entries(..).await.unwrap();
        assert_eq!(
            got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            vec![5, 6, 7, 8]
        );
        assert_eq!(got.last().unwrap().log_id, log_id(2, 8));
        assert_eq!(store.read_vote().await.unwrap(), Some(Vote::new(3, 2)));
        let mut other = LogStore::new(db, 8, gc.clone());
        assert_eq!(other.try_get_log_entries(..).await.unwrap().len(), 3);
        gc.shutdown();
    }

    #[tokio::test]
    async fn purging_everything_keeps_the_last_log_id() {
        let dir = tempfile::tempdir().unwrap();
        let (db, gc) = open(dir.path());
        let mut store = LogStore::new(db, 1, gc.clone());
        append(&mut store, (1..=5).map(|i| entry(1, i)).collect()).await;
        store.purge(log_id(1, 5)).await.unwrap();
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(1, 5)));
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 5)));
        gc.shutdown();
    }

    #[tokio::test]
    async fn a_corrupted_entry_is_a_loud_error() {
        let dir = tempfile::tempdir().unwrap();
        let (db, gc) = open(dir.path());
        let mut store = LogStore::new(db.clone(), 1, gc.clone());
        append(&mut store, (1..=3).map(|i| entry(1, i)).collect()).await;
        let key = log_key(1, 2);
        let mut raw = db
            .raw()
            .get_cf(db.cf(ColumnFamilyName::RaftLog), key)
            .unwrap()
            .unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 0x40;
        db.raw()
            .put_cf(db.cf(ColumnFamilyName::RaftLog), key, raw)
            .unwrap();
        let err = store.try_get_log_entries(1..4).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("corruption"), "{err}");
        gc.shutdown();
    }
}
