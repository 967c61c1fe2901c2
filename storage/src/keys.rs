//! Order-preserving ("memcomparable") key encoding.
//!
//! Byte order of an encoded key equals the order of the values it encodes, so key spans
//! map to value ranges. Layout (see DESIGN.md, "Keys"):
//!
//! ```text
//! 0x00 <name>                                                       system keys
//! 0x01 sphere_id:u64be 0x01 table_id:u32be index_id:u32be <pk>      SQL rows (pk memcomparable)
//! 0x01 sphere_id:u64be 0x02 <user key bytes>                        raw KV keyspace of a sphere
//! ```
//!
//! The sphere id comes right after the prefix, so all of a sphere's data (every table and its
//! raw KV keys) is one contiguous span, [`sphere_span`]: feeds, placement, hibernation and
//! access control each deal with one span per sphere. Changing this layout changes
//! [`KEY_LAYOUT_VERSION`], which is part of the data directory's format version.
//!
//! ```
//! use spheredb_storage::keys;
//! let a = keys::kv_key(7, b"apple");
//! let b = keys::kv_key(7, b"banana");
//! assert!(a < b);
//! assert_eq!(keys::decode_kv_key(&a).unwrap(), (7, &b"apple"[..]));
//! let (start, end) = keys::sphere_span(7);
//! let row = keys::sql_row_key(7, 1, 1, &[keys::Datum::Int(1)]);
//! assert!(keys::span_contains(&start, &end, &a) && keys::span_contains(&start, &end, &row));
//! ```

use crate::StorageError;

/// Version of the key layout below; 2 is sphere-major (1 put the kind before the sphere).
pub const KEY_LAYOUT_VERSION: u32 = 2;
/// Prefix of system keys (descriptors, node registry, catalog).
pub const SYSTEM_PREFIX: u8 = 0x00;
/// Prefix of every key that belongs to a sphere (SQL rows and raw KV keys).
pub const SPHERE_PREFIX: u8 = 0x01;
/// Byte after the sphere id that marks a SQL row or index entry.
pub const SQL_KIND: u8 = 0x01;
/// Byte after the sphere id that marks a raw KV key.
pub const KV_KIND: u8 = 0x02;
/// Length of `SPHERE_PREFIX sphere_id kind`, the header of every sphere key.
const SPHERE_HEADER_LEN: usize = 10;
/// Length of a SQL row key's header: sphere header, table id and index id.
const SQL_HEADER_LEN: usize = SPHERE_HEADER_LEN + 8;

fn sphere_header(sphere_id: u64, kind: u8, capacity: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(capacity);
    k.push(SPHERE_PREFIX);
    k.extend_from_slice(&sphere_id.to_be_bytes());
    k.push(kind);
    k
}

/// The half-open span `[start, end)` holding all of `sphere_id`'s data: its SQL rows and its
/// raw KV keys.
pub fn sphere_span(sphere_id: u64) -> (Vec<u8>, Vec<u8>) {
    let mut start = Vec::with_capacity(9);
    start.push(SPHERE_PREFIX);
    start.extend_from_slice(&sphere_id.to_be_bytes());
    let end = prefix_end(&start);
    (start, end)
}

/// The span of every sphere's data: everything but system keys.
pub fn all_spheres_span() -> (Vec<u8>, Vec<u8>) {
    (vec![SPHERE_PREFIX], prefix_end(&[SPHERE_PREFIX]))
}

/// True for a key that belongs to a sphere (a SQL row or a raw KV key): such keys are
/// versioned (see [`crate::mvcc`]); system keys are not.
pub fn is_sphere_key(key: &[u8]) -> bool {
    key.first() == Some(&SPHERE_PREFIX)
}

/// Encodes a system key.
pub fn system_key(name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(SYSTEM_PREFIX);
    k.extend_from_slice(name);
    k
}

/// Encodes a raw KV key of `sphere_id`.
pub fn kv_key(sphere_id: u64, user_key: &[u8]) -> Vec<u8> {
    Keyspace::Kv.key(sphere_id, user_key)
}

/// Splits a raw KV key into `(sphere_id, user_key)`; `None` if it is not a raw KV key.
pub fn decode_kv_key(key: &[u8]) -> Option<(u64, &[u8])> {
    if key.len() < SPHERE_HEADER_LEN || key[0] != SPHERE_PREFIX || key[9] != KV_KIND {
        return None;
    }
    let mut sphere = [0u8; 8];
    sphere.copy_from_slice(&key[1..9]);
    Some((u64::from_be_bytes(sphere), &key[SPHERE_HEADER_LEN..]))
}

/// The half-open span `[start, end)` holding every raw KV key of `sphere_id`.
pub fn kv_sphere_span(sphere_id: u64) -> (Vec<u8>, Vec<u8>) {
    Keyspace::Kv.span(sphere_id)
}

/// One of a sphere's two keyspaces: its raw KV keys or its SQL rows. A key of either is
/// `0x01 sphere_id kind rest`; requests name the keyspace and carry `rest`.
///
/// ```
/// use spheredb_storage::keys::{self, Keyspace};
/// let row = Keyspace::Sql.key(7, b"\x00\x00\x00\x02");
/// assert_eq!(keys::decode_sphere_key(&row), Some((Keyspace::Sql, 7, &b"\x00\x00\x00\x02"[..])));
/// assert_eq!(Keyspace::Kv.key(7, b"a"), keys::kv_key(7, b"a"));
/// let (start, end) = Keyspace::Sql.span(7);
/// assert!(keys::span_contains(&start, &end, &row));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Keyspace {
    /// Raw KV keys: `0x01 sphere_id 0x02 user_key`.
    #[default]
    Kv,
    /// SQL rows and index entries: `0x01 sphere_id 0x01 table_id index_id pk`.
    Sql,
}

impl Keyspace {
    /// The byte after the sphere id that marks this keyspace.
    pub fn kind(self) -> u8 {
        match self {
            Keyspace::Kv => KV_KIND,
            Keyspace::Sql => SQL_KIND,
        }
    }

    /// The keyspace a kind byte marks.
    pub fn from_kind(kind: u8) -> Option<Keyspace> {
        match kind {
            KV_KIND => Some(Keyspace::Kv),
            SQL_KIND => Some(Keyspace::Sql),
            _ => None,
        }
    }

    /// The encoded key of `rest` in this keyspace of `sphere_id`.
    pub fn key(self, sphere_id: u64, rest: &[u8]) -> Vec<u8> {
        let mut k = sphere_header(sphere_id, self.kind(), SPHERE_HEADER_LEN + rest.len());
        k.extend_from_slice(rest);
        k
    }

    /// The half-open span `[start, end)` of this keyspace of `sphere_id`.
    pub fn span(self, sphere_id: u64) -> (Vec<u8>, Vec<u8>) {
        let start = self.key(sphere_id, b"");
        let end = prefix_end(&start);
        (start, end)
    }
}

/// Splits a sphere key into its keyspace, sphere and the rest; `None` for a system key or a
/// key too short or of an unknown kind.
pub fn decode_sphere_key(key: &[u8]) -> Option<(Keyspace, u64, &[u8])> {
    if key.len() < SPHERE_HEADER_LEN || key[0] != SPHERE_PREFIX {
        return None;
    }
    let keyspace = Keyspace::from_kind(key[9])?;
    let mut sphere = [0u8; 8];
    sphere.copy_from_slice(&key[1..9]);
    Some((
        keyspace,
        u64::from_be_bytes(sphere),
        &key[SPHERE_HEADER_LEN..],
    ))
}

/// The smallest key greater than every key that starts with `prefix`
/// (empty when no such key exists, meaning "end of keyspace").
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last != 0xFF {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

/// One primary-key column value of a SQL row.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Datum {
    /// SQL NULL sorts first.
    Null,
    Bool(bool),
    Int(i64),
    Bytes(Vec<u8>),
    Text(String),
}

const TAG_NULL: u8 = 0x01;
const TAG_FALSE: u8 = 0x02;
const TAG_TRUE: u8 = 0x03;
const TAG_INT: u8 = 0x10;
const TAG_BYTES: u8 = 0x20;
const TAG_TEXT: u8 = 0x21;
/// Inside an escaped byte string, 0x00 is written as `0x00 0xFF` and the string ends with
/// `0x00 0x01`, so a prefix always sorts before its extensions.
const ESCAPE: u8 = 0xFF;
const TERMINATOR: u8 = 0x01;

/// Encodes a SQL row key.
pub fn sql_row_key(sphere_id: u64, table_id: u32, index_id: u32, pk: &[Datum]) -> Vec<u8> {
    let mut k = sphere_header(sphere_id, SQL_KIND, SQL_HEADER_LEN + pk.len() * 9);
    k.extend_from_slice(&table_id.to_be_bytes());
    k.extend_from_slice(&index_id.to_be_bytes());
    for d in pk {
        encode_datum(&mut k, d);
    }
    k
}

/// A decoded SQL row key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlRowKey {
    pub sphere_id: u64,
    pub table_id: u32,
    pub index_id: u32,
    pub pk: Vec<Datum>,
}

/// Decodes a key produced by [`sql_row_key`].
pub fn decode_sql_row_key(key: &[u8]) -> Result<SqlRowKey, StorageError> {
    let bad = |d: &str| StorageError::corruption("sql row key", d.to_string());
    if !is_sql_key(key) {
        return Err(bad("missing sphere prefix, SQL kind or header"));
    }
    let sphere_id = u64::from_be_bytes(key[1..9].try_into().map_err(|_| bad("sphere id"))?);
    let table_id = u32::from_be_bytes(key[10..14].try_into().map_err(|_| bad("table id"))?);
    let index_id = u32::from_be_bytes(key[14..18].try_into().map_err(|_| bad("index id"))?);
    let mut rest = &key[SQL_HEADER_LEN..];
    let mut pk = Vec::new();
    while !rest.is_empty() {
        let (d, used) = decode_datum(rest).ok_or_else(|| bad("malformed pk column"))?;
        pk.push(d);
        rest = &rest[used..];
    }
    Ok(SqlRowKey {
        sphere_id,
        table_id,
        index_id,
        pk,
    })
}

/// True when `key` has a SQL row key's prefix and full header.
fn is_sql_key(key: &[u8]) -> bool {
    key.len() >= SQL_HEADER_LEN && key[0] == SPHERE_PREFIX && key[9] == SQL_KIND
}

fn encode_datum(out: &mut Vec<u8>, d: &Datum) {
    match d {
        Datum::Null => out.push(TAG_NULL),
        Datum::Bool(false) => out.push(TAG_FALSE),
        Datum::Bool(true) => out.push(TAG_TRUE),
        Datum::Int(v) => {
            out.push(TAG_INT);
            // Flipping the sign bit makes two's complement sort as unsigned big-endian.
            out.extend_from_slice(&((*v as u64) ^ (1 << 63)).to_be_bytes());
        }
        Datum::Bytes(b) => {
            out.push(TAG_BYTES);
            encode_escaped(out, b);
        }
        Datum::Text(s) => {
            out.push(TAG_TEXT);
            encode_escaped(out, s.as_bytes());
        }
    }
}

fn encode_escaped(out: &mut Vec<u8>, b: &[u8]) {
    for &byte in b {
        out.push(byte);
        if byte == 0 {
            out.push(ESCAPE);
        }
    }
    out.push(0);
    out.push(TERMINATOR);
}

fn decode_escaped(input: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let byte = *input.get(i)?;
        if byte != 0 {
            out.push(byte);
            i += 1;
            continue;
        }
        match *input.get(i + 1)? {
            ESCAPE => out.push(0),
            TERMINATOR => return Some((out, i + 2)),
            _ => return None,
        }
        i += 2;
    }
}

fn decode_datum(input: &[u8]) -> Option<(Datum, usize)> {
    let tag = *input.first()?;
    match tag {
        TAG_NULL => Some((Datum::Null, 1)),
        TAG_FALSE => Some((Datum::Bool(false), 1)),
        TAG_TRUE => Some((Datum::Bool(true), 1)),
        TAG_INT => {
            let raw: [u8; 8] = input.get(1..9)?.try_into().ok()?;
            Some((Datum::Int((u64::from_be_bytes(raw) ^ (1 << 63)) as i64), 9))
        }
        TAG_BYTES => {
            let (b, used) = decode_escaped(&input[1..])?;
            Some((Datum::Bytes(b), 1 + used))
        }
        TAG_TEXT => {
            let (b, used) = decode_escaped(&input[1..])?;
            Some((Datum::Text(String::from_utf8(b).ok()?), 1 + used))
        }
        _ => None,
    }
}

/// The start of the row `key` belongs to: a range split at this key keeps every key of the
/// row on one side. For SQL keys that is the header plus the whole primary-key columns (a
/// trailing part that is not a column, such as a column-family suffix, is cut off); a raw
/// KV or system key is its own row.
pub fn row_prefix(key: &[u8]) -> &[u8] {
    if !is_sql_key(key) {
        return key;
    }
    let mut end = SQL_HEADER_LEN;
    while end < key.len() {
        match decode_datum(&key[end..]) {
            Some((_, used)) if used > 0 => end += used,
            _ => break,
        }
    }
    &key[..end]
}

/// True when the half-open spans `[a_start, a_end)` and `[b_start, b_end)` share a key; an
/// empty end is unbounded.
pub fn spans_overlap(a_start: &[u8], a_end: &[u8], b_start: &[u8], b_end: &[u8]) -> bool {
    let a_before_b_end = b_end.is_empty() || a_start < b_end;
    let b_before_a_end = a_end.is_empty() || b_start < a_end;
    a_before_b_end && b_before_a_end
}

/// True when `key` lies in the half-open span `[start, end)`; an empty `end` is unbounded.
pub fn span_contains(start: &[u8], end: &[u8], key: &[u8]) -> bool {
    key >= start && (end.is_empty() || key < end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn row_prefix_keeps_a_rows_keys_together() {
        let row = sql_row_key(7, 1, 1, &[Datum::Int(5), Datum::Text("a".into())]);
        let mut with_suffix = row.clone();
        with_suffix.push(0xfe); // not a datum tag
        assert_eq!(row_prefix(&with_suffix), row.as_slice());
        assert_eq!(row_prefix(&row), row.as_slice());
        let kv = kv_key(3, b"k");
        assert_eq!(row_prefix(&kv), kv.as_slice());
    }

    fn datum() -> impl Strategy<Value = Datum> {
        prop_oneof![
            Just(Datum::Null),
            any::<bool>().prop_map(Datum::Bool),
            any::<i64>().prop_map(Datum::Int),
            proptest::collection::vec(
                prop_oneof![Just(0u8), Just(1u8), Just(0xFFu8), any::<u8>()],
                0..12
            )
            .prop_map(Datum::Bytes),
            "[a-c\u{0}]{0,6}".prop_map(Datum::Text),
        ]
    }

    proptest! {
        #[test]
        fn kv_key_round_trips(sphere in any::<u64>(), key in proptest::collection::vec(any::<u8>(), 0..64)) {
            let enc = kv_key(sphere, &key);
            prop_assert_eq!(decode_kv_key(&enc), Some((sphere, &key[..])));
        }

        #[test]
        fn kv_key_preserves_order(a in (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..16)),
                                  b in (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..16))) {
            prop_assert_eq!(a.cmp(&b), kv_key(a.0, &a.1).cmp(&kv_key(b.0, &b.1)));
        }

        #[test]
        fn kv_keys_stay_inside_their_sphere_span(sphere in 0u64..u64::MAX, key in proptest::collection::vec(any::<u8>(), 0..16)) {
            let (start, end) = kv_sphere_span(sphere);
            prop_assert!(span_contains(&start, &end, &kv_key(sphere, &key)));
            prop_assert!(!span_contains(&start, &end, &kv_key(sphere + 1, &key)));
            let (start, end) = sphere_span(sphere);
            prop_assert!(span_contains(&start, &end, &kv_key(sphere, &key)));
            prop_assert!(span_contains(&start, &end, &sql_row_key(sphere, 1, 1, &[Datum::Bytes(key.clone())])));
            prop_assert!(!span_contains(&start, &end, &sql_row_key(sphere + 1, 0, 0, &[])));
        }

        #[test]
        fn sql_key_round_trips(sphere in any::<u64>(), table in any::<u32>(), index in any::<u32>(),
                               pk in proptest::collection::vec(datum(), 0..4)) {
            let enc = sql_row_key(sphere, table, index, &pk);
            let dec = decode_sql_row_key(&enc).unwrap();
            prop_assert_eq!(dec, SqlRowKey { sphere_id: sphere, table_id: table, index_id: index, pk });
        }

        #[test]
        fn sql_key_preserves_order(a in proptest::collection::vec(datum(), 1..4),
                                   b in proptest::collection::vec(datum(), 1..4)) {
            let ka = sql_row_key(1, 2, 3, &a);
            let kb = sql_row_key(1, 2, 3, &b);
            prop_assert_eq!(a.cmp(&b), ka.cmp(&kb), "{:?} vs {:?}", a, b);
        }
    }

    #[test]
    fn prefixes_order_system_before_spheres_and_sql_before_kv_within_a_sphere() {
        assert!(system_key(b"\xFF\xFF") < sql_row_key(0, 0, 0, &[]));
        assert!(sql_row_key(7, u32::MAX, u32::MAX, &[Datum::Text("z".into())]) < kv_key(7, b""));
        // Sphere-major: every key of sphere 7 sorts before any key of sphere 8.
        assert!(kv_key(7, b"\xFF\xFF\xFF") < sql_row_key(8, 0, 0, &[]));
    }

    #[test]
    fn a_spheres_sql_rows_and_kv_keys_are_one_span() {
        let (start, end) = sphere_span(7);
        let (kv_start, kv_end) = kv_sphere_span(7);
        assert!(start <= kv_start && kv_end <= end);
        for key in [
            sql_row_key(7, 0, 0, &[]),
            sql_row_key(7, u32::MAX, u32::MAX, &[Datum::Text("zz".into())]),
            kv_key(7, b""),
            kv_key(7, &[0xFF; 16]),
        ] {
            assert!(span_contains(&start, &end, &key), "{key:?}");
        }
        for key in [
            kv_key(6, &[0xFF; 4]),
            sql_row_key(8, 0, 0, &[]),
            system_key(b"x"),
        ] {
            assert!(!span_contains(&start, &end, &key), "{key:?}");
        }
        let (all_start, all_end) = all_spheres_span();
        assert!(span_contains(
            &all_start,
            &all_end,
            &kv_key(u64::MAX, &[0xFF; 4])
        ));
        assert!(!span_contains(&all_start, &all_end, &system_key(b"\xFF")));
    }

    #[test]
    fn a_kv_key_is_not_a_sql_key_and_the_other_way_round() {
        assert!(decode_kv_key(&sql_row_key(1, 2, 3, &[Datum::Int(1)])).is_none());
        assert!(decode_sql_row_key(&kv_key(1, b"0123456789abcdef")).is_err());
    }

    #[test]
    fn prefix_end_handles_trailing_ff() {
        assert_eq!(prefix_end(&[1, 2, 0xFF]), vec![1, 3]);
        assert_eq!(prefix_end(&[0xFF, 0xFF]), Vec::<u8>::new());
    }

    #[test]
    fn truncated_sql_key_is_corruption() {
        let enc = sql_row_key(1, 2, 3, &[Datum::Text("abc".into())]);
        assert!(decode_sql_row_key(&enc[..enc.len() - 1])
            .unwrap_err()
            .is_corruption());
    }
}
