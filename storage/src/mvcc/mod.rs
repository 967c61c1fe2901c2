//! Multi-version storage of sphere keys: the encoding of versions and of their records.
//!
//! Sphere keys (SQL rows and raw KV keys) keep every version until GC removes it, in the
//! Percolator layout of three column families (as TiKV):
//!
//! - `write`: `key || !commit_ts` → a [`WriteRecord`]: what the version is (a put or a
//!   delete), the transaction's start ts, and the value itself when it is short;
//! - `data`: `key || !start_ts` → the value of a put too long to sit in its write record;
//! - `lock`: `key` → a transaction's lock (written by the two-phase commit that builds on
//!   this layout).
//!
//! The timestamp is stored inverted and big-endian, so a key's versions sort newest first and
//! a seek to `key || !ts` lands on the newest version at or below `ts`. Plain concatenation
//! would not keep keys in order (a key that is a prefix of another would sort by its
//! timestamp bytes), so the `write` and `data` families are ordered by
//! [`compare_version_keys`], which compares the key part first and the timestamp second.
//!
//! System keys (descriptors, the node registry, the oracle's limit) are not versioned and
//! live in the `system` family. This module is pure encoding; reads and writes against
//! RocksDB are in [`store`], garbage collection behind a horizon in [`gc`], the changes after a
//! timestamp (a change feed's catch-up scan) in [`changes`].

use std::cmp::Ordering;

use crate::{record, StorageError};

#[cfg(feature = "rocksdb")]
pub mod changes;
#[cfg(feature = "rocksdb")]
pub mod gc;
#[cfg(feature = "rocksdb")]
pub mod locks;
pub mod percolator;
#[cfg(feature = "rocksdb")]
pub mod store;

/// A hybrid timestamp: `physical_ms << 18 | logical` (see the timestamp oracle).
pub type Timestamp = u64;

/// Size of the timestamp suffix of a version key.
pub const TIMESTAMP_SIZE_BYTES: usize = 8;

/// Values up to this size are kept in their write record; longer ones go to the `data`
/// family, so scans over write records stay small (TiKV's short values). TiKV keeps 255
/// bytes; a kilobyte covers the rows and values of a social application (a post, a
/// profile, a settings blob), each of which then costs one write and one lookup, not two.
pub const SHORT_VALUE_MAX_BYTES: usize = 1024;

/// Name RocksDB stores with the `write` and `data` families; a database created with
/// another ordering refuses to open instead of being read out of order.
pub const VERSION_KEY_COMPARATOR: &str = "spheredb.version_key.v1";

/// Bits of a hybrid timestamp below its physical milliseconds.
pub const LOGICAL_BITS: u32 = 18;

/// The physical milliseconds of a hybrid timestamp.
pub fn physical_ms(ts: Timestamp) -> u64 {
    ts >> LOGICAL_BITS
}

/// The key of `key`'s version at `ts`.
pub fn version_key(key: &[u8], ts: Timestamp) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + TIMESTAMP_SIZE_BYTES);
    k.extend_from_slice(key);
    k.extend_from_slice(&(!ts).to_be_bytes());
    k
}

/// Splits a version key into its key and timestamp.
pub fn split_version_key(versioned: &[u8]) -> Result<(&[u8], Timestamp), StorageError> {
    if versioned.len() < TIMESTAMP_SIZE_BYTES {
        return Err(StorageError::corruption(
            "version key",
            format!("{} bytes, shorter than its timestamp", versioned.len()),
        ));
    }
    let (key, suffix) = versioned.split_at(versioned.len() - TIMESTAMP_SIZE_BYTES);
    let mut inverted = [0u8; TIMESTAMP_SIZE_BYTES];
    inverted.copy_from_slice(suffix);
    Ok((key, !u64::from_be_bytes(inverted)))
}

/// The ordering of the `write` and `data` families: by key, then newest first.
///
/// Every stored key and every bound the store builds has the timestamp suffix; a shorter
/// byte string (never written) is ordered as a key with an empty suffix, so the order stays
/// total and consistent as RocksDB requires.
pub fn compare_version_keys(a: &[u8], b: &[u8]) -> Ordering {
    fn split(k: &[u8]) -> (&[u8], &[u8]) {
        if k.len() < TIMESTAMP_SIZE_BYTES {
            (k, &[])
        } else {
            k.split_at(k.len() - TIMESTAMP_SIZE_BYTES)
        }
    }
    let (ak, at) = split(a);
    let (bk, bt) = split(b);
    ak.cmp(bk).then_with(|| at.cmp(bt))
}

/// The first version key of `key` in store order (its newest possible version): the lower
/// bound of `key` and of every span starting at `key`.
pub fn newest_bound(key: &[u8]) -> Vec<u8> {
    version_key(key, Timestamp::MAX)
}

/// What a record of the `write` family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// A version: the key holds a value from here on.
    Put,
    /// A version: the key is absent from here on (a tombstone).
    Delete,
    /// A transaction that only locked the key committed here; the key's value is unchanged.
    /// Not a version: reads look past it. It still conflicts with a transaction that started
    /// before it and writes the key.
    Lock,
    /// A transaction that started at this timestamp was rolled back here (`commit_ts ==
    /// start_ts`), so a prewrite of it that arrives late fails. Not a version.
    Rollback,
}

impl WriteKind {
    fn code(self) -> u8 {
        match self {
            WriteKind::Put => b'P',
            WriteKind::Delete => b'D',
            WriteKind::Lock => b'L',
            WriteKind::Rollback => b'R',
        }
    }

    fn from_code(code: u8) -> Option<WriteKind> {
        match code {
            b'P' => Some(WriteKind::Put),
            b'D' => Some(WriteKind::Delete),
            b'L' => Some(WriteKind::Lock),
            b'R' => Some(WriteKind::Rollback),
            _ => None,
        }
    }

    /// Whether a record of this kind is a version of the key's value (reads stop at it).
    pub fn is_version(self) -> bool {
        matches!(self, WriteKind::Put | WriteKind::Delete)
    }
}

/// A committed version in the `write` family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRecord {
    pub kind: WriteKind,
    /// The writing transaction's start ts; a value not kept here is in `data` at
    /// `key || !start_ts`. A single-range write that commits in one entry has
    /// `start_ts == commit_ts`.
    pub start_ts: Timestamp,
    /// The value of a put of at most [`SHORT_VALUE_MAX_BYTES`].
    pub short_value: Option<Vec<u8>>,
}

impl WriteRecord {
    /// Encodes the record, crc-framed: `kind:u8 start_ts:u64be [value]`. A put's short value
    /// follows; a put without it has its value in `data`, told apart by a flag byte.
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = Vec::with_capacity(10 + self.short_value.as_ref().map_or(0, Vec::len));
        payload.push(self.kind.code());
        payload.extend_from_slice(&self.start_ts.to_be_bytes());
        match &self.short_value {
            Some(v) => {
                payload.push(1);
                payload.extend_from_slice(v);
            }
            None => payload.push(0),
        }
        record::encode(&payload)
    }

    /// Decodes and verifies a framed record.
    pub fn decode(framed: &[u8]) -> Result<WriteRecord, StorageError> {
        let payload = record::decode("write record", framed)?;
        let bad = |detail: String| StorageError::corruption("write record", detail);
        if payload.len() < 10 {
            return Err(bad(format!(
                "{} bytes, expected at least 10",
                payload.len()
            )));
        }
        let kind = WriteKind::from_code(payload[0])
            .ok_or_else(|| bad(format!("unknown kind {:#04x}", payload[0])))?;
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&payload[1..9]);
        let short_value = match payload[9] {
            0 => None,
            1 => Some(payload[10..].to_vec()),
            flag => return Err(bad(format!("unknown value flag {flag:#04x}"))),
        };
        if kind != WriteKind::Put && short_value.is_some() {
            return Err(bad(format!("a {kind:?} record carries a value")));
        }
        Ok(WriteRecord {
            kind,
            start_ts: u64::from_be_bytes(ts),
            short_value,
        })
    }
}

/// What a transaction's lock on a key will write when the transaction commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// A prewritten put; its value is in the lock when short, else in `data` at the
    /// transaction's start ts.
    Put,
    /// A prewritten delete.
    Delete,
    /// A prewritten lock without a write (a key locked and not written).
    Lock,
    /// A pessimistic lock taken before the prewrite (`SELECT ... FOR UPDATE`, `Txn::lock`):
    /// it keeps other writers off the key but carries no write yet, so readers look past it
    /// and a commit refuses it (only a prewrite turns it into one of the kinds above).
    Pessimistic,
}

impl LockKind {
    fn code(self) -> u8 {
        match self {
            LockKind::Put => b'P',
            LockKind::Delete => b'D',
            LockKind::Lock => b'L',
            LockKind::Pessimistic => b'S',
        }
    }

    fn from_code(code: u8) -> Option<LockKind> {
        match code {
            b'P' => Some(LockKind::Put),
            b'D' => Some(LockKind::Delete),
            b'L' => Some(LockKind::Lock),
            b'S' => Some(LockKind::Pessimistic),
            _ => None,
        }
    }

    /// The kind of the record a commit of this lock writes (`None`: a pessimistic lock,
    /// which cannot be committed).
    pub fn write_kind(self) -> Option<WriteKind> {
        match self {
            LockKind::Put => Some(WriteKind::Put),
            LockKind::Delete => Some(WriteKind::Delete),
            LockKind::Lock => Some(WriteKind::Lock),
            LockKind::Pessimistic => None,
        }
    }
}

/// A transaction's lock on a key, in the `lock` family (one per key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockRecord {
    pub kind: LockKind,
    /// The transaction's start ts: its snapshot, and its identity.
    pub start_ts: Timestamp,
    /// The transaction's primary key (encoded): its commit point. Whoever meets this lock
    /// asks the primary whether the transaction committed.
    pub primary: Vec<u8>,
    /// The lock may be rolled back by others once the oracle's clock passes the physical
    /// time of `start_ts` by this much; a heartbeat on the primary raises it.
    pub ttl_ms: u64,
    /// The value of a put of at most [`SHORT_VALUE_MAX_BYTES`].
    pub short_value: Option<Vec<u8>>,
}

impl LockRecord {
    /// Whether the lock has expired at `current_ts` (an oracle timestamp).
    pub fn expired_at(&self, current_ts: Timestamp) -> bool {
        physical_ms(current_ts) >= physical_ms(self.start_ts).saturating_add(self.ttl_ms)
    }

    /// Encodes the lock, crc-framed: `kind:u8 start_ts:u64be ttl_ms:u64be
    /// primary_len:u32be primary flag:u8 [value]`.
    pub fn encode(&self) -> Vec<u8> {
        let value_len = self.short_value.as_ref().map_or(0, Vec::len);
        let mut payload = Vec::with_capacity(22 + self.primary.len() + value_len);
        payload.push(self.kind.code());
        payload.extend_from_slice(&self.start_ts.to_be_bytes());
        payload.extend_from_slice(&self.ttl_ms.to_be_bytes());
        payload.extend_from_slice(&(self.primary.len() as u32).to_be_bytes());
        payload.extend_from_slice(&self.primary);
        match &self.short_value {
            Some(v) => {
                payload.push(1);
                payload.extend_from_slice(v);
            }
            None => payload.push(0),
        }
        record::encode(&payload)
    }

    /// Decodes and verifies a framed lock.
    pub fn decode(framed: &[u8]) -> Result<LockRecord, StorageError> {
        let payload = record::decode("lock record", framed)?;
        let bad = |detail: String| StorageError::corruption("lock record", detail);
        if payload.len() < 22 {
            return Err(bad(format!(
                "{} bytes, expected at least 22",
                payload.len()
            )));
        }
        let kind = LockKind::from_code(payload[0])
            .ok_or_else(|| bad(format!("unknown kind {:#04x}", payload[0])))?;
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&payload[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let start_ts = u64_at(1);
        let ttl_ms = u64_at(9);
        let mut len = [0u8; 4];
        len.copy_from_slice(&payload[17..21]);
        let primary_end = 21 + u32::from_be_bytes(len) as usize;
        if primary_end + 1 > payload.len() {
            return Err(bad(format!(
                "primary key of {} bytes runs past the record's {} bytes",
                primary_end - 21,
                payload.len()
            )));
        }
        let short_value = match payload[primary_end] {
            0 => None,
            1 => Some(payload[primary_end + 1..].to_vec()),
            flag => return Err(bad(format!("unknown value flag {flag:#04x}"))),
        };
        if kind != LockKind::Put && short_value.is_some() {
            return Err(bad(format!("a {kind:?} lock carries a value")));
        }
        Ok(LockRecord {
            kind,
            start_ts,
            primary: payload[21..primary_end].to_vec(),
            ttl_ms,
            short_value,
        })
    }
}

/// One version of a key as read: the value (`None`: deleted) and its commit ts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub value: Option<Vec<u8>>,
    pub commit_ts: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn versions_of_a_key_sort_newest_first_and_keys_stay_in_key_order() {
        let mut keys = [
            version_key(b"ab", 5),
            version_key(b"a", 1),
            version_key(b"ab", 9),
            version_key(b"a", 7),
            version_key(b"abc", 0),
            version_key(b"", 3),
        ];
        keys.sort_by(|a, b| compare_version_keys(a, b));
        let split: Vec<(Vec<u8>, u64)> = keys
            .iter()
            .map(|k| {
                let (key, ts) = split_version_key(k).unwrap();
                (key.to_vec(), ts)
            })
            .collect();
        assert_eq!(
            split,
            vec![
                (b"".to_vec(), 3),
                (b"a".to_vec(), 7),
                (b"a".to_vec(), 1),
                (b"ab".to_vec(), 9),
                (b"ab".to_vec(), 5),
                (b"abc".to_vec(), 0),
            ]
        );
        assert!(compare_version_keys(&newest_bound(b"a"), &version_key(b"a", u64::MAX)).is_eq());
    }

    #[test]
    fn write_records_round_trip_and_damage_is_corruption() {
        for rec in [
            WriteRecord {
                kind: WriteKind::Put,
                start_ts: 42,
                short_value: Some(b"v".to_vec()),
            },
            WriteRecord {
                kind: WriteKind::Put,
                start_ts: 7,
                short_value: Some(Vec::new()),
            },
            WriteRecord {
                kind: WriteKind::Put,
                start_ts: 7,
                short_value: None,
            },
            WriteRecord {
                kind: WriteKind::Delete,
                start_ts: u64::MAX,
                short_value: None,
            },
            WriteRecord {
                kind: WriteKind::Rollback,
                start_ts: 9,
                short_value: None,
            },
            WriteRecord {
                kind: WriteKind::Lock,
                start_ts: 3,
                short_value: None,
            },
        ] {
            let framed = rec.encode();
            assert_eq!(WriteRecord::decode(&framed).unwrap(), rec);
            let mut bad = framed.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(WriteRecord::decode(&bad).unwrap_err().is_corruption());
        }
        assert!(split_version_key(b"short").is_err());
    }

    #[test]
    fn lock_records_round_trip_and_damage_is_corruption() {
        for lock in [
            LockRecord {
                kind: LockKind::Put,
                start_ts: 42,
                primary: b"primary".to_vec(),
                ttl_ms: 3_000,
                short_value: Some(b"v".to_vec()),
            },
            LockRecord {
                kind: LockKind::Put,
                start_ts: 42,
                primary: Vec::new(),
                ttl_ms: 0,
                short_value: None,
            },
            LockRecord {
                kind: LockKind::Pessimistic,
                start_ts: u64::MAX,
                primary: vec![0; 300],
                ttl_ms: u64::MAX,
                short_value: None,
            },
        ] {
            let framed = lock.encode();
            assert_eq!(LockRecord::decode(&framed).unwrap(), lock);
            let mut bad = framed.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(LockRecord::decode(&bad).unwrap_err().is_corruption());
        }
        // A primary length past the end is corruption, not a panic.
        let mut payload = vec![b'L'];
        payload.extend_from_slice(&[0; 16]);
        payload.extend_from_slice(&1000u32.to_be_bytes());
        payload.push(0);
        assert!(LockRecord::decode(&record::encode(&payload))
            .unwrap_err()
            .is_corruption());
    }

    #[test]
    fn a_lock_expires_when_the_oracle_passes_its_start_by_its_ttl() {
        let lock = LockRecord {
            kind: LockKind::Lock,
            start_ts: 1_000 << LOGICAL_BITS | 5,
            primary: Vec::new(),
            ttl_ms: 100,
            short_value: None,
        };
        assert!(!lock.expired_at(1_099 << LOGICAL_BITS | 7));
        assert!(lock.expired_at(1_100 << LOGICAL_BITS));
    }

    proptest! {
        /// The comparator orders version keys exactly as (key, newest first) tuples do.
        #[test]
        fn comparator_matches_key_then_descending_ts(
            a in proptest::collection::vec(any::<u8>(), 0..6),
            b in proptest::collection::vec(any::<u8>(), 0..6),
            ta in any::<u64>(),
            tb in any::<u64>(),
        ) {
            let expected = a.cmp(&b).then(tb.cmp(&ta));
            prop_assert_eq!(compare_version_keys(&version_key(&a, ta), &version_key(&b, tb)), expected);
        }
    }
}
