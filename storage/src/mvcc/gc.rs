//! Garbage collection of versions behind a GC horizon, in bounded passes.
//!
//! For every key, the newest version at or below the horizon is what reads at the horizon
//! and later see; every older version is garbage, and so is that newest one when it is a
//! delete (a read then finds nothing either way). Versions above the horizon are never
//! touched. A pass reads from a RocksDB snapshot and deletes with plain writes: collection is
//! idempotent, so a pass cut short by a crash is simply done again.

use rocksdb::{ReadOptions, WriteBatch};

use super::{split_version_key, version_key, Timestamp, WriteKind, WriteRecord};
use crate::{ColumnFamilyName, Db, StorageError};

/// Deletes are written in batches of about this size.
pub const MAX_GC_BATCH_BYTES: usize = 1 << 20;

/// What to do with one version, given the versions of its key seen before it (newer ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Collect,
}

/// The rule, as a pure function: `newest_below_seen` tells whether a newer version of the key
/// at or below `horizon` was already seen.
pub fn verdict(
    ts: Timestamp,
    kind: WriteKind,
    horizon: Timestamp,
    newest_below_seen: bool,
) -> Verdict {
    if ts > horizon {
        Verdict::Keep
    } else if !kind.is_version() {
        // Rollbacks and lock-only commits only keep late prewrites out, and prewrites at or
        // below the horizon are refused anyway.
        Verdict::Collect
    } else if newest_below_seen || kind == WriteKind::Delete {
        Verdict::Collect
    } else {
        Verdict::Keep
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcPass {
    /// Where the next pass starts (inclusive); `None` when the span is done.
    pub resume_key: Option<Vec<u8>>,
    pub keys_seen: u64,
    pub versions_collected: u64,
}

/// Collects the garbage of the keys in `[from, end)` (empty `end`: unbounded) behind
/// `horizon`, stopping after `max_keys` keys.
pub fn collect(
    db: &Db,
    from: &[u8],
    end: &[u8],
    horizon: Timestamp,
    max_keys: u64,
) -> Result<GcPass, StorageError> {
    let snapshot = db.raw().snapshot();
    let (lower, upper) = db.span_bounds(ColumnFamilyName::Write, from, end);
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(upper);
    let mut iter = snapshot.raw_iterator_cf_opt(db.cf(ColumnFamilyName::Write), opts);
    iter.seek(lower);
    let mut pass = GcPass::default();
    let mut batch = WriteBatch::default();
    let mut current: Option<Vec<u8>> = None;
    let mut newest_below_seen = false;
    while iter.valid() {
        let stored = iter.key().unwrap_or_default();
        let (key, ts) = split_version_key(stored)?;
        if current.as_deref() != Some(key) {
            if pass.keys_seen >= max_keys {
                pass.resume_key = Some(key.to_vec());
                break;
            }
            current = Some(key.to_vec());
            newest_below_seen = false;
            pass.keys_seen += 1;
        }
        let record = WriteRecord::decode(iter.value().unwrap_or_default())?;
        if verdict(ts, record.kind, horizon, newest_below_seen) == Verdict::Collect {
            batch.delete_cf(db.cf(ColumnFamilyName::Write), stored);
            if record.kind == WriteKind::Put && record.short_value.is_none() {
                batch.delete_cf(
                    db.cf(ColumnFamilyName::Data),
                    version_key(key, record.start_ts),
                );
            }
            pass.versions_collected += 1;
        }
        if ts <= horizon && record.kind.is_version() {
            newest_below_seen = true;
        }
        if batch.size_in_bytes() >= MAX_GC_BATCH_BYTES {
            db.write(std::mem::take(&mut batch), false)?;
        }
        iter.next();
    }
    iter.status()?;
    db.write(batch, false)?;
    Ok(pass)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::store::{get_at, write};
    use crate::mvcc::SHORT_VALUE_MAX_BYTES;
    use crate::DbOptions;

    fn versions(db: &Db) -> Vec<(Vec<u8>, Timestamp)> {
        db.iter_span(ColumnFamilyName::Write, b"", b"")
            .map(|item| {
                let (k, _) = item.unwrap();
                let (key, ts) = split_version_key(&k).unwrap();
                (key.to_vec(), ts)
            })
            .collect()
    }

    #[test]
    fn the_rule_keeps_what_reads_at_and_after_the_horizon_see() {
        use Verdict::*;
        use WriteKind::*;
        assert_eq!(verdict(20, Put, 10, false), Keep);
        assert_eq!(verdict(10, Put, 10, false), Keep);
        assert_eq!(verdict(9, Put, 10, true), Collect);
        assert_eq!(verdict(10, Delete, 10, false), Collect);
        assert_eq!(verdict(11, Delete, 10, false), Keep);
    }

    #[test]
    fn collection_keeps_every_read_at_or_after_the_horizon_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let long = vec![3u8; SHORT_VALUE_MAX_BYTES + 1];
        write(&db, b"a", 1, Some(b"a1"));
        write(&db, b"a", 5, Some(&long));
        write(&db, b"a", 8, Some(b"a8"));
        write(&db, b"a", 30, Some(b"a30"));
        write(&db, b"b", 2, Some(b"b2"));
        write(&db, b"b", 6, None);
        write(&db, b"c", 25, Some(b"c25"));
        let reads = |db: &Db| {
            (10..35)
                .flat_map(|ts| {
                    [b"a", b"b", b"c"]
                        .map(|k| get_at(db, None, k, ts).unwrap().and_then(|v| v.value))
                })
                .collect::<Vec<_>>()
        };
        let before = reads(&db);
        // One key per pass: the passes resume where the last stopped.
        let mut from = Vec::new();
        let mut collected = 0;
        loop {
            let pass = collect(&db, &from, b"", 10, 1).unwrap();
            collected += pass.versions_collected;
            match pass.resume_key {
                Some(k) => from = k,
                None => break,
            }
        }
        assert_eq!(collected, 4);
        assert_eq!(reads(&db), before);
        assert_eq!(
            versions(&db),
            vec![(b"a".to_vec(), 30), (b"a".to_vec(), 8), (b"c".to_vec(), 25)]
        );
        // The long value's `data` record went with its version.
        assert_eq!(db.iter_span(ColumnFamilyName::Data, b"", b"").count(), 0);
        // Collecting again finds nothing.
        assert_eq!(
            collect(&db, b"", b"", 10, 100).unwrap().versions_collected,
            0
        );
    }
}
