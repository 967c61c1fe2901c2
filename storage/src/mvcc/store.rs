//! Versions in RocksDB: writing a version, reading a key or a span as of a timestamp.
//!
//! Reads take a RocksDB snapshot (or use the caller's), so a write record and the long value
//! it points at are always read from the same state. Every record read is verified.

use rocksdb::{DBRawIterator, ReadOptions, Snapshot, WriteBatch};

use super::{
    newest_bound, split_version_key, version_key, Timestamp, Version, WriteKind, WriteRecord,
    SHORT_VALUE_MAX_BYTES,
};
use crate::{record, ColumnFamilyName, Db, StorageError};

/// A key and its value.
pub type KvPair = (Vec<u8>, Vec<u8>);

/// Where a bounded scan stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPage {
    /// The live pairs read, in key order.
    pub pairs: Vec<KvPair>,
    /// `Some(key)` when a limit cut the scan short: the rest starts at `key` (inclusive).
    pub resume_key: Option<Vec<u8>>,
}

/// Older versions of a key a scan steps over one by one before it seeks past them: a few
/// `next`s are cheaper than a seek, many are not (a hot key keeps every version of the GC
/// window).
const NEXTS_BEFORE_SEEK: usize = 8;

/// Adds `key`'s version at `commit_ts` to `batch`: a put of `value`, or a delete (`None`).
/// The version is written as committed in one step (`start_ts == commit_ts`).
pub fn put_version(
    db: &Db,
    batch: &mut WriteBatch,
    key: &[u8],
    commit_ts: Timestamp,
    value: Option<&[u8]>,
) {
    let record = match value {
        None => WriteRecord {
            kind: WriteKind::Delete,
            start_ts: commit_ts,
            short_value: None,
        },
        Some(v) if v.len() <= SHORT_VALUE_MAX_BYTES => WriteRecord {
            kind: WriteKind::Put,
            start_ts: commit_ts,
            short_value: Some(v.to_vec()),
        },
        Some(v) => {
            batch.put_cf(
                db.cf(ColumnFamilyName::Data),
                version_key(key, commit_ts),
                record::encode(v),
            );
            WriteRecord {
                kind: WriteKind::Put,
                start_ts: commit_ts,
                short_value: None,
            }
        }
    };
    batch.put_cf(
        db.cf(ColumnFamilyName::Write),
        version_key(key, commit_ts),
        record.encode(),
    );
}

/// The upper bound of every version of `key`: the newest bound of the key right after it.
pub(crate) fn after_key_bound(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    newest_bound(&next)
}

/// The newest version of `key` at or below `ts`, if any (`Version::value` is `None` for a
/// delete). `snapshot`: read from it, else from a fresh one.
pub fn get_at(
    db: &Db,
    snapshot: Option<&Snapshot<'_>>,
    key: &[u8],
    ts: Timestamp,
) -> Result<Option<Version>, StorageError> {
    let own;
    let snapshot = match snapshot {
        Some(s) => s,
        None => {
            own = db.raw().snapshot();
            &own
        }
    };
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(after_key_bound(key));
    let mut iter = snapshot.raw_iterator_cf_opt(db.cf(ColumnFamilyName::Write), opts);
    iter.seek(version_key(key, ts));
    // Past records that are not versions (rollbacks, lock-only commits) to the newest
    // version at or below `ts`.
    while iter.valid() {
        let (found, commit_ts) = split_version_key(iter.key().unwrap_or_default())?;
        if found != key {
            return Ok(None);
        }
        let record = WriteRecord::decode(iter.value().unwrap_or_default())?;
        if record.kind.is_version() {
            let value = value_of(db, snapshot, key, &record)?;
            return Ok(Some(Version { value, commit_ts }));
        }
        iter.next();
    }
    iter.status()?;
    Ok(None)
}

/// The value a put's record names: kept in the record, or in `data` at its start ts.
pub(crate) fn value_of(
    db: &Db,
    snapshot: &Snapshot<'_>,
    key: &[u8],
    record: &WriteRecord,
) -> Result<Option<Vec<u8>>, StorageError> {
    match (record.kind, &record.short_value) {
        (WriteKind::Delete | WriteKind::Lock | WriteKind::Rollback, _) => Ok(None),
        (WriteKind::Put, Some(v)) => Ok(Some(v.clone())),
        (WriteKind::Put, None) => {
            let at = version_key(key, record.start_ts);
            match snapshot.get_pinned_cf_opt(
                db.cf(ColumnFamilyName::Data),
                &at,
                ReadOptions::default(),
            )? {
                Some(framed) => Ok(Some(record::decode("data", &framed)?.to_vec())),
                None => Err(StorageError::corruption(
                    "data",
                    format!(
                        "the write record of a key names a value at start ts {} that is missing",
                        record.start_ts
                    ),
                )),
            }
        }
    }
}

/// Reads the live pairs with `start <= key < end` (empty `end`: unbounded) as of `ts` from
/// `snapshot`: for each key its newest version at or below `ts`, if that is a put. Stops after
/// `max_pairs` pairs or `max_bytes` bytes of keys and values (the pair that crosses
/// `max_bytes` is included, so every page makes progress). Verifies every record read.
pub fn scan_at(
    db: &Db,
    snapshot: &Snapshot<'_>,
    start: &[u8],
    end: &[u8],
    ts: Timestamp,
    max_pairs: usize,
    max_bytes: usize,
) -> Result<ScanPage, StorageError> {
    let mut opts = ReadOptions::default();
    let (_, upper) = db.span_bounds(ColumnFamilyName::Write, start, end);
    opts.set_iterate_upper_bound(upper);
    let mut iter: DBRawIterator<'_> =
        snapshot.raw_iterator_cf_opt(db.cf(ColumnFamilyName::Write), opts);
    iter.seek(newest_bound(start));
    let mut pairs: Vec<KvPair> = Vec::new();
    let mut size_bytes = 0usize;
    while iter.valid() {
        let (key, version_ts) = split_version_key(iter.key().unwrap_or_default())?;
        let key = key.to_vec();
        if version_ts > ts {
            // Only versions newer than the read: jump to the newest one at or below it.
            iter.seek(version_key(&key, ts));
            if !iter.valid() {
                break;
            }
            let (again, _) = split_version_key(iter.key().unwrap_or_default())?;
            if again != key.as_slice() {
                continue;
            }
        }
        let record = WriteRecord::decode(iter.value().unwrap_or_default())?;
        if !record.kind.is_version() {
            // A rollback or a lock-only commit: the next record is an older one of this
            // key (at or below `ts`), or the next key.
            iter.next();
            continue;
        }
        if pairs.len() >= max_pairs || size_bytes >= max_bytes {
            return Ok(ScanPage {
                pairs,
                resume_key: Some(key),
            });
        }
        if let Some(value) = value_of(db, snapshot, &key, &record)? {
            size_bytes += key.len() + value.len();
            pairs.push((key.clone(), value));
        }
        skip_older_versions(&mut iter, &key)?;
    }
    iter.status()?;
    Ok(ScanPage {
        pairs,
        resume_key: None,
    })
}

/// Moves `iter` from a version of `key` to the first version of the next key.
fn skip_older_versions(iter: &mut DBRawIterator<'_>, key: &[u8]) -> Result<(), StorageError> {
    for _ in 0..NEXTS_BEFORE_SEEK {
        iter.next();
        if !iter.valid() {
            return Ok(());
        }
        if split_version_key(iter.key().unwrap_or_default())?.0 != key {
            return Ok(());
        }
    }
    iter.seek(after_key_bound(key));
    Ok(())
}

/// Writes one version of `key` at once (tests of this module and of `gc`).
#[cfg(test)]
pub(crate) fn write(db: &Db, key: &[u8], ts: Timestamp, value: Option<&[u8]>) {
    let mut batch = WriteBatch::default();
    put_version(db, &mut batch, key, ts, value);
    db.write(batch, false).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DbOptions;

    fn value_at(db: &Db, key: &[u8], ts: Timestamp) -> Option<Vec<u8>> {
        get_at(db, None, key, ts).unwrap().and_then(|v| v.value)
    }

    #[test]
    fn a_read_sees_the_newest_version_at_or_below_its_timestamp() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let long = vec![7u8; SHORT_VALUE_MAX_BYTES + 1];
        write(&db, b"k", 10, Some(b"v10"));
        write(&db, b"k", 20, None);
        write(&db, b"k", 30, Some(&long));
        // A key that extends `k` must not be mistaken for one of its versions.
        write(&db, b"k\x00", 5, Some(b"other"));
        assert_eq!(value_at(&db, b"k", 9), None);
        assert_eq!(value_at(&db, b"k", 10), Some(b"v10".to_vec()));
        assert_eq!(value_at(&db, b"k", 19), Some(b"v10".to_vec()));
        assert_eq!(get_at(&db, None, b"k", 25).unwrap().unwrap().commit_ts, 20);
        assert_eq!(value_at(&db, b"k", 25), None);
        assert_eq!(value_at(&db, b"k", u64::MAX), Some(long.clone()));
        assert_eq!(get_at(&db, None, b"j", u64::MAX).unwrap(), None);
        assert_eq!(value_at(&db, b"k\x00", 5), Some(b"other".to_vec()));

        let snap = db.raw().snapshot();
        let page = scan_at(&db, &snap, b"", b"", 25, 100, usize::MAX).unwrap();
        assert_eq!(page.pairs, vec![(b"k\x00".to_vec(), b"other".to_vec())]);
        let page = scan_at(&db, &snap, b"k", b"l", 15, 100, usize::MAX).unwrap();
        assert_eq!(
            page.pairs,
            vec![
                (b"k".to_vec(), b"v10".to_vec()),
                (b"k\x00".to_vec(), b"other".to_vec())
            ]
        );
        let page = scan_at(&db, &snap, b"k", b"k\x00", 40, 100, usize::MAX).unwrap();
        assert_eq!(page.pairs, vec![(b"k".to_vec(), long)]);
    }

    #[test]
    fn scans_walk_many_versions_and_stop_at_their_limits() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        for key in 0u8..5 {
            for ts in 1..=3 * NEXTS_BEFORE_SEEK as u64 {
                write(&db, &[key], ts, Some(&[key, ts as u8]));
            }
        }
        let snap = db.raw().snapshot();
        let page = scan_at(&db, &snap, &[0], &[5], 4, 2, usize::MAX).unwrap();
        assert_eq!(
            page.pairs,
            vec![(vec![0], vec![0, 4]), (vec![1], vec![1, 4])]
        );
        assert_eq!(page.resume_key, Some(vec![2]));
        let page = scan_at(&db, &snap, &[2], &[5], u64::MAX, 100, 1).unwrap();
        assert_eq!(page.pairs, vec![(vec![2], vec![2, 24])]);
        assert_eq!(page.resume_key, Some(vec![3]));
        let page = scan_at(&db, &snap, &[0], &[], 0, 100, usize::MAX).unwrap();
        assert!(page.pairs.is_empty() && page.resume_key.is_none());
    }

    #[test]
    fn a_damaged_write_record_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let mut bad = WriteRecord {
            kind: WriteKind::Put,
            start_ts: 1,
            short_value: Some(b"v".to_vec()),
        }
        .encode();
        bad[5] ^= 0x40;
        db.raw()
            .put_cf(db.cf(ColumnFamilyName::Write), version_key(b"k", 1), bad)
            .unwrap();
        assert!(get_at(&db, None, b"k", 1).unwrap_err().is_corruption());
    }
}
