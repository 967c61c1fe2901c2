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
//! RocksDB are in [`store`], garbage collection behind a horizon in [`gc`].

use std::cmp::Ordering;

use crate::{record, StorageError};

#[cfg(feature = "rocksdb")]
pub mod gc;
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

/// What a version is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// The key holds a value from this version on.
    Put,
    /// The key is absent from this version on (a tombstone).
    Delete,
}

impl WriteKind {
    fn code(self) -> u8 {
        match self {
            WriteKind::Put => b'P',
            WriteKind::Delete => b'D',
        }
    }

    fn from_code(code: u8) -> Option<WriteKind> {
        match code {
            b'P' => Some(WriteKind::Put),
            b'D' => Some(WriteKind::Delete),
            _ => None,
        }
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
        if kind == WriteKind::Delete && short_value.is_some() {
            return Err(bad("a delete carries a value".into()));
        }
        Ok(WriteRecord {
            kind,
            start_ts: u64::from_be_bytes(ts),
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
