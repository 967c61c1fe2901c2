//! The changes of a span after a timestamp, read back from MVCC history: the catch-up scan
//! of a change feed.
//!
//! A change is a committed version (a put or a delete) with its commit timestamp and,
//! when asked for, the value the key held just before it. Records that are not versions
//! (rollbacks, lock-only commits) are never changes, and neither is anything GC, a split, a
//! merge or a snapshot does: those move or drop versions without writing new ones.
//!
//! Changes come key by key, in key order, and each key's changes in commit order (oldest
//! first), which is the order a feed promises per key. A page stops at a count or a size
//! bound, possibly in the middle of a key's history; the page says where to go on from.
//! This module only reads a snapshot; it must not decide what a feed may deliver (the
//! caller picks the snapshot and the timestamps).

use rocksdb::{DBRawIterator, ReadOptions, Snapshot};

use super::store::{after_key_bound, get_at, value_of};
use super::{newest_bound, split_version_key, version_key, Timestamp, WriteRecord};
use crate::{ColumnFamilyName, Db, StorageError};

/// One committed version of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: Vec<u8>,
    pub commit_ts: Timestamp,
    /// The value written; `None` for a delete.
    pub value: Option<Vec<u8>>,
    /// The key's value right before this change (`None`: absent, or not asked for).
    pub prev_value: Option<Vec<u8>>,
}

impl Change {
    /// Bytes this change holds, for accounting against memory bounds.
    pub fn size_bytes(&self) -> usize {
        change_size_bytes(&self.key, &self.value, &self.prev_value)
    }
}

fn change_size_bytes(key: &[u8], value: &Option<Vec<u8>>, prev_value: &Option<Vec<u8>>) -> usize {
    key.len()
        + value.as_ref().map_or(0, Vec::len)
        + prev_value.as_ref().map_or(0, Vec::len)
        + std::mem::size_of::<Timestamp>()
}

/// Where a catch-up scan goes on: the changes of `key` after `after_ts`, then the keys that
/// follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeResume {
    pub key: Vec<u8>,
    pub after_ts: Timestamp,
}

/// A page of changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangePage {
    pub changes: Vec<Change>,
    /// `Some` when a bound cut the page short.
    pub resume: Option<ChangeResume>,
}

/// What to read: the changes of `[start, end)` (empty `end`: unbounded) with
/// `since < commit_ts <= until`.
#[derive(Debug, Clone)]
pub struct ChangeScan<'a> {
    pub start: &'a [u8],
    pub end: &'a [u8],
    pub since: Timestamp,
    pub until: Timestamp,
    /// Whether each change carries the value before it.
    pub with_prev_value: bool,
    /// Bounds of one page: changes, and bytes of keys and values (a change that would cross
    /// `max_bytes` starts the next page, alone if it is larger, so every page makes progress
    /// and none holds more than `max_bytes` or one change).
    pub max_changes: usize,
    pub max_bytes: usize,
}

/// Reads one page of `scan`'s changes from `snapshot`, starting at `resume` when given (a
/// page's `resume` from an earlier call over the same snapshot). Verifies every record read.
///
/// What the caller must guarantee, since only it knows: `since` is at or above the range's
/// GC horizon (below it, versions and previous values may be gone), and `until` is at or
/// below the span's resolved timestamp (the lock family is not read, so a transaction still
/// holding a lock at or below `until` would commit a change this scan never returns).
pub fn scan_changes(
    db: &Db,
    snapshot: &Snapshot<'_>,
    scan: &ChangeScan<'_>,
    resume: Option<&ChangeResume>,
) -> Result<ChangePage, StorageError> {
    let mut page = PageBuilder {
        scan,
        changes: Vec::new(),
        size_bytes: 0,
    };
    if scan.until <= scan.since {
        return Ok(page.done(None));
    }
    let mut opts = ReadOptions::default();
    let (_, upper) = db.span_bounds(ColumnFamilyName::Write, scan.start, scan.end);
    opts.set_iterate_upper_bound(upper);
    let mut iter: DBRawIterator<'_> =
        snapshot.raw_iterator_cf_opt(db.cf(ColumnFamilyName::Write), opts);
    if let Some(r) = resume {
        if let Some(stop) = page.key_changes(db, snapshot, &mut iter, &r.key, r.after_ts)? {
            return Ok(page.done(Some(stop)));
        }
        iter.seek(after_key_bound(&r.key));
    } else {
        iter.seek(newest_bound(scan.start));
    }
    while iter.valid() {
        let (key, newest_ts) = split_version_key(iter.key().unwrap_or_default())?;
        let key = key.to_vec();
        if page.full() {
            // Not past a full page: the keys that follow are the next page's work.
            return Ok(page.done(Some(ChangeResume {
                key,
                after_ts: scan.since,
            })));
        }
        // The key's newest record: when it is at or below `since`, the key has no change.
        if newest_ts > scan.since {
            if let Some(stop) = page.key_changes(db, snapshot, &mut iter, &key, scan.since)? {
                return Ok(page.done(Some(stop)));
            }
        }
        iter.seek(after_key_bound(&key));
    }
    iter.status()?;
    Ok(page.done(None))
}

struct PageBuilder<'s, 'a> {
    scan: &'s ChangeScan<'a>,
    changes: Vec<Change>,
    size_bytes: usize,
}

impl PageBuilder<'_, '_> {
    /// Whether the page is done; never before its first change, so that every page makes
    /// progress whatever its bounds.
    fn full(&self) -> bool {
        !self.changes.is_empty()
            && (self.changes.len() >= self.scan.max_changes
                || self.size_bytes >= self.scan.max_bytes)
    }

    /// Where the next page starts: at `key`, after the newest of its changes this page holds
    /// (or after `after_ts` when it holds none of them).
    fn resume_at(&self, key: &[u8], after_ts: Timestamp) -> ChangeResume {
        ChangeResume {
            key: key.to_vec(),
            after_ts: self.changes.last().map_or(after_ts, |c| {
                if c.key == key {
                    c.commit_ts
                } else {
                    after_ts
                }
            }),
        }
    }

    fn done(self, resume: Option<ChangeResume>) -> ChangePage {
        ChangePage {
            changes: self.changes,
            resume,
        }
    }

    /// Adds `key`'s changes after `after_ts` (and at or below `until`), oldest first, moving
    /// `iter` backwards through its versions. Returns where to resume when the page filled.
    fn key_changes(
        &mut self,
        db: &Db,
        snapshot: &Snapshot<'_>,
        iter: &mut DBRawIterator<'_>,
        key: &[u8],
        after_ts: Timestamp,
    ) -> Result<Option<ChangeResume>, StorageError> {
        if after_ts >= self.scan.until {
            return Ok(None);
        }
        let mut prev_value = if self.scan.with_prev_value {
            get_at(db, Some(snapshot), key, after_ts)?.and_then(|v| v.value)
        } else {
            None
        };
        // Versions sort newest first, so the oldest version above `after_ts` is the last
        // record at or before the key of `after_ts + 1`.
        iter.seek_for_prev(version_key(key, after_ts + 1));
        while iter.valid() {
            let (found, commit_ts) = split_version_key(iter.key().unwrap_or_default())?;
            if found != key || commit_ts > self.scan.until {
                break;
            }
            if commit_ts <= after_ts {
                // Cannot happen with a well-ordered family; loud rather than a duplicate.
                return Err(StorageError::corruption(
                    "write",
                    format!("a version at {commit_ts} met walking versions above {after_ts}"),
                ));
            }
            let record = WriteRecord::decode(iter.value().unwrap_or_default())?;
            if record.kind.is_version() {
                if self.full() {
                    return Ok(Some(self.resume_at(key, after_ts)));
                }
                let value = value_of(db, snapshot, key, &record)?;
                // A change that would take a page past its byte bound starts the next one
                // (alone if need be), so a page stays within one message.
                if !self.changes.is_empty()
                    && self.size_bytes + change_size_bytes(key, &value, &prev_value)
                        > self.scan.max_bytes
                {
                    return Ok(Some(self.resume_at(key, after_ts)));
                }
                let change = Change {
                    key: key.to_vec(),
                    commit_ts,
                    prev_value: if self.scan.with_prev_value {
                        std::mem::replace(&mut prev_value, value.clone())
                    } else {
                        None
                    },
                    value,
                };
                self.size_bytes += change.size_bytes();
                self.changes.push(change);
            }
            iter.prev();
        }
        iter.status()?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::store::write;
    use crate::mvcc::WriteKind;
    use crate::DbOptions;

    fn scan(since: Timestamp, until: Timestamp, max_changes: usize) -> ChangeScan<'static> {
        ChangeScan {
            start: b"",
            end: b"",
            since,
            until,
            with_prev_value: true,
            max_changes,
            max_bytes: usize::MAX,
        }
    }

    /// A change as (key, commit ts, value, previous value).
    type Brief = (Vec<u8>, Timestamp, Option<Vec<u8>>, Option<Vec<u8>>);

    fn brief(changes: &[Change]) -> Vec<Brief> {
        changes
            .iter()
            .map(|c| {
                (
                    c.key.clone(),
                    c.commit_ts,
                    c.value.clone(),
                    c.prev_value.clone(),
                )
            })
            .collect()
    }

    fn v(s: &str) -> Option<Vec<u8>> {
        Some(s.as_bytes().to_vec())
    }

    #[test]
    fn changes_come_per_key_oldest_first_with_previous_values() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        write(&db, b"a", 5, Some(b"a5"));
        write(&db, b"a", 10, Some(b"a10"));
        write(&db, b"a", 20, None);
        write(&db, b"a", 30, Some(b"a30"));
        // A key extending `a` is a key of its own, and one without changes is skipped.
        write(&db, b"a\x00", 15, Some(b"x"));
        write(&db, b"b", 3, Some(b"b3"));
        // A rollback record is not a change.
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(
            db.cf(ColumnFamilyName::Write),
            version_key(b"a", 25),
            WriteRecord {
                kind: WriteKind::Rollback,
                start_ts: 25,
                short_value: None,
            }
            .encode(),
        );
        db.write(batch, false).unwrap();
        let snap = db.raw().snapshot();
        let page = scan_changes(&db, &snap, &scan(5, 25, 100), None).unwrap();
        assert_eq!(page.resume, None);
        assert_eq!(
            brief(&page.changes),
            vec![
                (b"a".to_vec(), 10, v("a10"), v("a5")),
                (b"a".to_vec(), 20, None, v("a10")),
                (b"a\x00".to_vec(), 15, v("x"), None),
            ]
        );
        let all = scan_changes(&db, &snap, &scan(0, Timestamp::MAX, 100), None).unwrap();
        assert_eq!(all.changes.len(), 6);
        assert_eq!(all.changes[3].prev_value, None, "after a delete");
        let none = scan_changes(&db, &snap, &scan(30, Timestamp::MAX, 100), None).unwrap();
        assert!(none.changes.is_empty() && none.resume.is_none());
    }

    #[test]
    fn a_change_that_would_cross_the_byte_bound_starts_the_next_page() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let big = vec![b'x'; 600];
        write(&db, b"a", 1, Some(&big));
        write(&db, b"a", 2, Some(&big));
        write(&db, b"b", 1, Some(b"small"));
        let snap = db.raw().snapshot();
        let bounded = ChangeScan {
            max_bytes: 1_000,
            ..scan(0, Timestamp::MAX, 100)
        };
        let mut pages = Vec::new();
        let mut resume = None;
        loop {
            let page = scan_changes(&db, &snap, &bounded, resume.as_ref()).unwrap();
            pages.push(
                page.changes
                    .iter()
                    .map(|c| (c.key.clone(), c.commit_ts))
                    .collect::<Vec<_>>(),
            );
            resume = page.resume;
            if resume.is_none() {
                break;
            }
        }
        // a@1 alone (600 bytes); a@2 carries a@1 as its previous value (1,200 bytes), alone
        // although larger than the bound; then b.
        assert_eq!(
            pages,
            vec![
                vec![(b"a".to_vec(), 1)],
                vec![(b"a".to_vec(), 2)],
                vec![(b"b".to_vec(), 1)],
            ]
        );
    }

    #[test]
    fn pages_resume_inside_a_key_without_a_gap_or_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        for ts in 1..=7u64 {
            write(&db, b"k", ts, Some(&[ts as u8]));
            write(&db, b"m", ts, Some(&[ts as u8 + 100]));
        }
        let snap = db.raw().snapshot();
        let mut seen = Vec::new();
        let mut resume = None;
        for _ in 0..20 {
            let page =
                scan_changes(&db, &snap, &scan(2, Timestamp::MAX, 3), resume.as_ref()).unwrap();
            assert!(page.changes.len() <= 3);
            seen.extend(brief(&page.changes));
            resume = page.resume;
            if resume.is_none() {
                break;
            }
        }
        let expected: Vec<_> = [(b"k", 0u8), (b"m", 100u8)]
            .iter()
            .flat_map(|(k, base)| {
                (3..=7u64).map(move |ts| {
                    (
                        k.to_vec(),
                        ts,
                        Some(vec![ts as u8 + base]),
                        Some(vec![ts as u8 - 1 + base]),
                    )
                })
            })
            .collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn every_page_size_reads_the_same_changes_as_one_page() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        // Keys with one, two and three changes, a key with none, and rollback records
        // between versions: pages end at every possible place, including a key's last change.
        for (key, stamps) in [
            (&b"a"[..], &[1u64, 4][..]),
            (b"b", &[2]),
            (b"c", &[1]),
            (b"d", &[3, 5, 6]),
            (b"e", &[2, 7]),
        ] {
            for ts in stamps {
                write(&db, key, *ts, Some(&[key[0], *ts as u8]));
            }
        }
        let mut batch = rocksdb::WriteBatch::default();
        for (key, ts) in [(&b"d"[..], 4u64), (b"a", 3)] {
            batch.put_cf(
                db.cf(ColumnFamilyName::Write),
                version_key(key, ts),
                WriteRecord {
                    kind: WriteKind::Rollback,
                    start_ts: ts,
                    short_value: None,
                }
                .encode(),
            );
        }
        db.write(batch, false).unwrap();
        let snap = db.raw().snapshot();
        for (since, until) in [(1, Timestamp::MAX), (0, 5), (2, 6)] {
            let whole = scan_changes(&db, &snap, &scan(since, until, usize::MAX), None).unwrap();
            assert!(whole.resume.is_none());
            for max_changes in 0..=whole.changes.len() + 1 {
                let mut seen = Vec::new();
                let mut resume = None;
                for _ in 0..=whole.changes.len() + 1 {
                    let page = scan_changes(
                        &db,
                        &snap,
                        &scan(since, until, max_changes),
                        resume.as_ref(),
                    )
                    .unwrap();
                    seen.extend(page.changes);
                    resume = page.resume;
                    if resume.is_none() {
                        break;
                    }
                }
                assert!(resume.is_none(), "pages of {max_changes} never ended");
                assert_eq!(
                    brief(&seen),
                    brief(&whole.changes),
                    "pages of {max_changes}, since {since}, until {until}"
                );
            }
        }
    }

    #[test]
    fn a_span_bounds_the_keys_and_a_long_value_is_read_from_data() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let long = vec![9u8; crate::mvcc::SHORT_VALUE_MAX_BYTES + 10];
        write(&db, b"a", 1, Some(b"a"));
        write(&db, b"b", 2, Some(&long));
        write(&db, b"c", 3, Some(b"c"));
        let snap = db.raw().snapshot();
        let mut s = scan(0, Timestamp::MAX, 100);
        s.start = b"b";
        s.end = b"c";
        let page = scan_changes(&db, &snap, &s, None).unwrap();
        assert_eq!(
            brief(&page.changes),
            vec![(b"b".to_vec(), 2, Some(long), None)]
        );
    }
}
