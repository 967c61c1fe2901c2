//! The node's single RocksDB instance and its column families.
//!
//! Every Raft group on a node shares this database: the log of every range lives in
//! `raft_log`, votes and applied ids in `raft_state`, system keys in `system`, and the versions
//! of sphere keys in `lock`, `write` and `data` (see [`crate::mvcc`]). Sharing one
//! WAL is what makes cross-group group commit possible: one `sync_wal` makes every write
//! issued before it durable.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DBIteratorWithThreadMode, Direction, IteratorMode,
    Options, ReadOptions, WriteBatch, WriteOptions, DB,
};

use crate::{keys, mvcc, record, StorageError};

/// Version of everything this build writes to a data directory: key layout, record framing,
/// applied-state and snapshot encodings. A directory written with another version is refused
/// at open, naming both versions, instead of being misread.
///
/// History: 1 = kind-major keys, no version record (directories without the record);
/// 2 = sphere-major keys (`keys::KEY_LAYOUT_VERSION` 2), versioned snapshots;
/// 3 = multi-version sphere keys (`lock`, `write`, `data`), system keys in `system`.
pub const DATA_FORMAT_VERSION: u32 = 3;
/// Key of the format-version record in `raft_state`; its length (14 bytes) differs from every
/// Raft state key (9 bytes), so the two never collide.
const FORMAT_VERSION_KEY: &[u8] = b"format_version";

/// The column families of a node's database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnFamilyName {
    /// Raft log entries keyed by `(range_id, index)`.
    RaftLog,
    /// Per-range vote, committed id, applied state; node identity.
    RaftState,
    /// System keys (descriptors, node registry, the oracle's limit), one value each.
    System,
    /// Transactions' locks on sphere keys, keyed by the key.
    Lock,
    /// Committed versions of sphere keys, `key || !commit_ts`.
    Write,
    /// Long values of versions, `key || !start_ts`.
    Data,
}

impl ColumnFamilyName {
    /// All column families, in creation order.
    pub const ALL: [ColumnFamilyName; 6] = [
        Self::RaftLog,
        Self::RaftState,
        Self::System,
        Self::Lock,
        Self::Write,
        Self::Data,
    ];

    /// The families holding a range's data; a range's snapshot has one section for each, in
    /// this order.
    pub const RANGE_DATA: [ColumnFamilyName; 4] =
        [Self::System, Self::Lock, Self::Write, Self::Data];

    /// The name RocksDB knows the family by.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RaftLog => "raft_log",
            Self::RaftState => "raft_state",
            Self::System => "system",
            Self::Lock => "lock",
            Self::Write => "write",
            Self::Data => "data",
        }
    }

    /// The family named `name`.
    pub fn from_name(name: &str) -> Option<ColumnFamilyName> {
        Self::ALL.into_iter().find(|cf| cf.as_str() == name)
    }

    /// True for the families keyed by version keys (`key || !ts`, see [`crate::mvcc`]).
    pub fn is_versioned(self) -> bool {
        matches!(self, Self::Write | Self::Data)
    }
}

/// Tuning knobs for the node's database.
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// Size of each memtable.
    pub write_buffer_size_bytes: usize,
    /// Shared block cache.
    pub block_cache_size_bytes: usize,
}

/// Default memtable size.
pub const DEFAULT_WRITE_BUFFER_SIZE_BYTES: usize = 64 << 20;
/// Default block cache size.
pub const DEFAULT_BLOCK_CACHE_SIZE_BYTES: usize = 256 << 20;

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            write_buffer_size_bytes: DEFAULT_WRITE_BUFFER_SIZE_BYTES,
            block_cache_size_bytes: DEFAULT_BLOCK_CACHE_SIZE_BYTES,
        }
    }
}

/// A node's RocksDB. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    inner: Arc<DB>,
    path: PathBuf,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("path", &self.path).finish()
    }
}

impl Db {
    /// Opens (creating if missing) the database under `dir`.
    ///
    /// A new database is stamped with [`DATA_FORMAT_VERSION`]; an existing one must carry the
    /// same version, or the open fails with [`StorageError::IncompatibleFormat`].
    pub fn open(dir: &Path, opts: &DbOptions) -> Result<Db, StorageError> {
        Self::open_with(dir, opts, true)
    }

    fn open_with(dir: &Path, opts: &DbOptions, check_version: bool) -> Result<Db, StorageError> {
        std::fs::create_dir_all(dir)?;
        // RocksDB writes CURRENT when it creates a database: its absence means a new one.
        let is_new = !dir.join("CURRENT").exists();
        let cache = rocksdb::Cache::new_lru_cache(opts.block_cache_size_bytes);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);

        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        let cfs = ColumnFamilyName::ALL.iter().map(|name| {
            let mut cf = Options::default();
            cf.set_write_buffer_size(opts.write_buffer_size_bytes);
            cf.set_block_based_table_factory(&table);
            cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
            cf.set_bottommost_compression_type(rocksdb::DBCompressionType::Zstd);
            if name.is_versioned() {
                cf.set_comparator(
                    mvcc::VERSION_KEY_COMPARATOR,
                    Box::new(mvcc::compare_version_keys),
                );
            }
            ColumnFamilyDescriptor::new(name.as_str(), cf)
        });
        // The version is read before the full open: an older directory's families may be
        // ordered differently, which RocksDB would refuse with a less helpful error.
        let stored = if is_new || !check_version {
            None
        } else {
            Self::stored_format_version(dir)?
        };
        if let Some(found) = stored.filter(|v| *v != DATA_FORMAT_VERSION) {
            return Err(StorageError::IncompatibleFormat {
                dir: dir.display().to_string(),
                found,
                supported: DATA_FORMAT_VERSION,
            });
        }
        let db = match DB::open_cf_descriptors(&db_opts, dir, cfs) {
            Ok(db) => db,
            // Without a version record, a directory whose families RocksDB refuses (their
            // ordering differs) is from before format versions; saying so tells the operator
            // what to do, RocksDB's comparator message would not.
            Err(_) if check_version && !is_new && stored.is_none() => {
                return Err(StorageError::IncompatibleFormat {
                    dir: dir.display().to_string(),
                    found: 1,
                    supported: DATA_FORMAT_VERSION,
                });
            }
            Err(e) => return Err(e.into()),
        };
        let db = Db {
            inner: Arc::new(db),
            path: dir.to_path_buf(),
        };
        if is_new {
            db.stamp_format_version(DATA_FORMAT_VERSION)?;
        } else if check_version {
            db.check_format_version(dir)?;
        }
        Ok(db)
    }

    /// The format version recorded in the directory, read without opening its other
    /// families; `None` when there is no record.
    fn stored_format_version(dir: &Path) -> Result<Option<u32>, StorageError> {
        let opts = Options::default();
        let db =
            DB::open_cf_for_read_only(&opts, dir, [ColumnFamilyName::RaftState.as_str()], false)?;
        let Some(cf) = db.cf_handle(ColumnFamilyName::RaftState.as_str()) else {
            return Ok(None);
        };
        let framed = db.get_pinned_cf(cf, FORMAT_VERSION_KEY)?;
        let version = match framed {
            None => None,
            Some(framed) => Some(decode_format_version(record::decode(
                "format version",
                &framed,
            )?)?),
        };
        Ok(version)
    }

    /// True when no column family holds any key.
    fn is_empty(&self) -> Result<bool, StorageError> {
        for cf in ColumnFamilyName::ALL {
            let mut iter = self.inner.iterator_cf(self.cf(cf), IteratorMode::Start);
            if iter.next().transpose()?.is_some() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Records `version` as this database's format version (synced).
    fn stamp_format_version(&self, version: u32) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        self.batch_put_record(
            &mut batch,
            ColumnFamilyName::RaftState,
            FORMAT_VERSION_KEY,
            &version.to_le_bytes(),
        );
        self.write(batch, true)
    }

    fn check_format_version(&self, dir: &Path) -> Result<(), StorageError> {
        let found = match self.get_record(ColumnFamilyName::RaftState, FORMAT_VERSION_KEY)? {
            // Created, but the process stopped before the stamp: nothing else was written.
            None if self.is_empty()? => {
                return self.stamp_format_version(DATA_FORMAT_VERSION);
            }
            // Written before format versions existed.
            None => 1,
            Some(raw) => decode_format_version(&raw)?,
        };
        if found != DATA_FORMAT_VERSION {
            return Err(StorageError::IncompatibleFormat {
                dir: dir.display().to_string(),
                found,
                supported: DATA_FORMAT_VERSION,
            });
        }
        debug_assert_eq!(
            keys::KEY_LAYOUT_VERSION,
            2,
            "a new key layout needs a new format"
        );
        Ok(())
    }

    /// Directory of the database.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying RocksDB handle.
    pub fn raw(&self) -> &DB {
        &self.inner
    }

    /// Handle of a column family. The families are created at open, so this cannot fail.
    pub fn cf(&self, name: ColumnFamilyName) -> &ColumnFamily {
        // Every family in `ColumnFamilyName::ALL` is opened in `Db::open`.
        self.inner
            .cf_handle(name.as_str())
            .expect("column family opened in Db::open")
    }

    /// Reads a checksummed record; `Ok(None)` when absent, `Corruption` when damaged.
    pub fn get_record(
        &self,
        cf: ColumnFamilyName,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StorageError> {
        match self.inner.get_pinned_cf(self.cf(cf), key)? {
            None => Ok(None),
            Some(framed) => Ok(Some(record::decode(cf.as_str(), &framed)?.to_vec())),
        }
    }

    /// The stored-key bounds `[lower, upper)` of the keys `start <= key < end` (empty `end`:
    /// unbounded) in `cf`: the keys themselves, or for a versioned family the bounds of all
    /// their versions.
    pub fn span_bounds(
        &self,
        cf: ColumnFamilyName,
        start: &[u8],
        end: &[u8],
    ) -> (Vec<u8>, Vec<u8>) {
        // Every encoded key starts with a prefix byte below 0xff, so this bounds them all
        // (and, read as a version key, its key part does too).
        const ABOVE_EVERY_KEY: [u8; 16] = [0xff; 16];
        let upper = if end.is_empty() {
            ABOVE_EVERY_KEY.to_vec()
        } else if cf.is_versioned() {
            mvcc::newest_bound(end)
        } else {
            end.to_vec()
        };
        let lower = if cf.is_versioned() {
            mvcc::newest_bound(start)
        } else {
            start.to_vec()
        };
        (lower, upper)
    }

    /// Iterates `cf` over the stored keys of `[start, end)` in order (empty `end`:
    /// unbounded); in a versioned family, over every version of those keys.
    pub fn iter_span(
        &self,
        cf: ColumnFamilyName,
        start: &[u8],
        end: &[u8],
    ) -> DBIteratorWithThreadMode<'_, DB> {
        let (lower, upper) = self.span_bounds(cf, start, end);
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(upper);
        self.inner.iterator_cf_opt(
            self.cf(cf),
            opts,
            IteratorMode::From(&lower, Direction::Forward),
        )
    }

    /// Adds to `batch` the deletion of every stored key of `cf` in `[start, end)` (empty
    /// `end`: unbounded); in a versioned family, of every version of those keys.
    pub fn batch_delete_span(
        &self,
        batch: &mut WriteBatch,
        cf: ColumnFamilyName,
        start: &[u8],
        end: &[u8],
    ) {
        let (lower, upper) = self.span_bounds(cf, start, end);
        batch.delete_range_cf(self.cf(cf), lower, upper);
    }

    /// Adds to `batch` the deletion of a range's data in `[start, end)`: its keys in every
    /// family of [`ColumnFamilyName::RANGE_DATA`].
    pub fn batch_delete_range_data(&self, batch: &mut WriteBatch, start: &[u8], end: &[u8]) {
        for cf in ColumnFamilyName::RANGE_DATA {
            self.batch_delete_span(batch, cf, start, end);
        }
    }

    /// Adds a checksummed put to `batch`.
    pub fn batch_put_record(
        &self,
        batch: &mut WriteBatch,
        cf: ColumnFamilyName,
        key: &[u8],
        payload: &[u8],
    ) {
        batch.put_cf(self.cf(cf), key, record::encode(payload));
    }

    /// Writes `batch` atomically. With `sync` the WAL is fsynced before returning.
    pub fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StorageError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.inner.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Makes every write issued before this call durable (one WAL fsync).
    pub fn sync_wal(&self) -> Result<(), StorageError> {
        self.inner.flush_wal(true)?;
        Ok(())
    }
}

fn decode_format_version(raw: &[u8]) -> Result<u32, StorageError> {
    let bytes: [u8; 4] = raw.try_into().map_err(|_| {
        StorageError::corruption(
            "format version",
            format!("record of {} bytes, expected 4", raw.len()),
        )
    })?;
    Ok(u32::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_table_block_is_reported_as_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<Vec<u8>> = (0..2_000u32).map(|i| i.to_be_bytes().to_vec()).collect();
        {
            let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
            let mut batch = WriteBatch::default();
            for k in &keys {
                // Incompressible values, so the damage lands in stored bytes.
                let v: Vec<u8> = (0..200u32)
                    .map(|j| (j * 31 + k[3] as u32 * 7) as u8)
                    .collect();
                db.batch_put_record(&mut batch, ColumnFamilyName::System, k, &v);
            }
            db.write(batch, true).unwrap();
            db.raw().flush_cf(db.cf(ColumnFamilyName::System)).unwrap();
        }
        // Flip bytes in the first data blocks of every table file (the footer and index at
        // the end stay whole, so the database still opens).
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "sst") {
                let mut bytes = std::fs::read(&path).unwrap();
                for at in (64..bytes.len() / 3).step_by(512) {
                    bytes[at] ^= 0x5a;
                }
                std::fs::write(&path, bytes).unwrap();
            }
        }
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let errors: Vec<StorageError> = keys
            .iter()
            .filter_map(|k| db.get_record(ColumnFamilyName::System, k).err())
            .collect();
        assert!(!errors.is_empty(), "no read noticed the damage");
        for e in errors {
            assert!(e.is_corruption(), "{e}");
            // And it stays damage once it is an io::Error (how the state machine sees it).
            assert_eq!(
                std::io::Error::from(e).kind(),
                std::io::ErrorKind::InvalidData
            );
        }
    }

    #[test]
    fn a_directory_of_another_format_version_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
            db.stamp_format_version(DATA_FORMAT_VERSION + 1).unwrap();
        }
        let unchecked = || Db::open_with(dir.path(), &DbOptions::default(), false).unwrap();
        let err = Db::open(dir.path(), &DbOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("format version {}", DATA_FORMAT_VERSION + 1))
                && msg.contains(&format!("reads format version {DATA_FORMAT_VERSION}")),
            "{msg}"
        );
        // A directory from before format versions (data, no record) is version 1.
        {
            let db = unchecked();
            db.raw()
                .delete_cf(db.cf(ColumnFamilyName::RaftState), FORMAT_VERSION_KEY)
                .unwrap();
            db.raw()
                .put_cf(db.cf(ColumnFamilyName::System), b"\x02old", b"row")
                .unwrap();
        }
        let msg = Db::open(dir.path(), &DbOptions::default())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("format version 1"), "{msg}");
        // A directory created but never stamped (a crash right after creation) holds nothing
        // else, and opens as new.
        let crashed = tempfile::tempdir().unwrap();
        {
            let db = Db::open(crashed.path(), &DbOptions::default()).unwrap();
            db.raw()
                .delete_cf(db.cf(ColumnFamilyName::RaftState), FORMAT_VERSION_KEY)
                .unwrap();
        }
        Db::open(crashed.path(), &DbOptions::default()).unwrap();
        Db::open(crashed.path(), &DbOptions::default()).unwrap();
        // A new directory is stamped and opens again.
        let fresh = tempfile::tempdir().unwrap();
        drop(Db::open(fresh.path(), &DbOptions::default()).unwrap());
        Db::open(fresh.path(), &DbOptions::default()).unwrap();
    }

    #[test]
    fn records_survive_reopen_and_corruption_is_typed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
            let mut b = WriteBatch::default();
            db.batch_put_record(&mut b, ColumnFamilyName::System, b"k", b"v");
            b.put_cf(
                db.cf(ColumnFamilyName::System),
                b"bad",
                b"\x00\x00\x00\x00xyz",
            );
            db.write(b, true).unwrap();
        }
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        assert_eq!(
            db.get_record(ColumnFamilyName::System, b"k")
                .unwrap()
                .unwrap(),
            b"v"
        );
        assert_eq!(
            db.get_record(ColumnFamilyName::System, b"none").unwrap(),
            None
        );
        assert!(db
            .get_record(ColumnFamilyName::System, b"bad")
            .unwrap_err()
            .is_corruption());
    }
}
