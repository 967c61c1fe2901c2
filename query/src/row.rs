//! Row values: the non-key columns of a row, each tagged with its column id.
//!
//! ```text
//! ROW_FORMAT_VERSION:u8 { column_id:u32le len:u32le payload }*
//! ```
//!
//! NULLs are left out. A column id the table no longer has (a dropped column) is skipped on
//! read, and a column added later reads as NULL from older rows, so adding or dropping a
//! column never rewrites rows. Key columns live in the key only. (The storage layer checks
//! every stored record's checksum; a row that still does not decode is corruption.)

use datafusion::scalar::ScalarValue;
use spheredb_storage::keys::Datum;

use crate::catalog::TableDesc;
use crate::error::SqlError;
use crate::types::{SqlType, UTC};

/// Version byte every row value starts with.
const ROW_FORMAT_VERSION: u8 = 1;

/// Encodes the non-key columns of a row whose values (one per column of `table`, in column
/// order) are already of the columns' Arrow types.
pub fn encode(table: &TableDesc, values: &[ScalarValue]) -> Result<Vec<u8>, SqlError> {
    let mut out = vec![ROW_FORMAT_VERSION];
    for (column, value) in table.columns.iter().zip(values) {
        if table.is_key_column(column.id) || value.is_null() {
            continue;
        }
        let payload: Vec<u8> = match value {
            ScalarValue::Boolean(Some(b)) => vec![u8::from(*b)],
            ScalarValue::Int16(Some(v)) => (*v as i64).to_le_bytes().to_vec(),
            ScalarValue::Int32(Some(v)) => (*v as i64).to_le_bytes().to_vec(),
            ScalarValue::Int64(Some(v)) => v.to_le_bytes().to_vec(),
            ScalarValue::Date32(Some(v)) => (*v as i64).to_le_bytes().to_vec(),
            ScalarValue::TimestampMicrosecond(Some(v), _) => v.to_le_bytes().to_vec(),
            ScalarValue::Float32(Some(v)) => (*v as f64).to_le_bytes().to_vec(),
            ScalarValue::Float64(Some(v)) => v.to_le_bytes().to_vec(),
            ScalarValue::Decimal128(Some(v), _, _) => v.to_le_bytes().to_vec(),
            ScalarValue::Utf8(Some(s)) => s.as_bytes().to_vec(),
            ScalarValue::Binary(Some(b)) => b.clone(),
            other => {
                return Err(SqlError::internal(format!(
                    "column {} of type {} holds {other:?}",
                    column.name,
                    column.ty.name()
                )))
            }
        };
        let len = u32::try_from(payload.len()).map_err(|_| {
            SqlError::new(
                "54000",
                format!("value of column {} is over 4 GiB", column.name),
            )
        })?;
        out.extend_from_slice(&column.id.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&payload);
    }
    Ok(out)
}

/// A whole row: the values of `bytes` with the key columns filled from its primary key `pk`.
pub fn decode_with_key(
    table: &TableDesc,
    pk: &[Datum],
    bytes: &[u8],
) -> Result<Vec<ScalarValue>, SqlError> {
    let mut values = decode(table, bytes)?;
    for (position, datum) in table.key_positions().into_iter().zip(pk) {
        values[position] = table.columns[position].ty.from_datum(datum)?;
    }
    Ok(values)
}

/// Decodes a row value into one value per column of `table` (key columns and absent
/// columns are NULL here; the caller fills key columns from the key).
pub fn decode(table: &TableDesc, bytes: &[u8]) -> Result<Vec<ScalarValue>, SqlError> {
    let corrupt = |what: &str| {
        SqlError::corruption(format!(
            "a row of table {} does not decode: {what}",
            table.name
        ))
    };
    let mut values = table
        .columns
        .iter()
        .map(|c| ScalarValue::try_new_null(&c.ty.arrow()).map_err(SqlError::from))
        .collect::<Result<Vec<_>, _>>()?;
    match bytes.first() {
        Some(&ROW_FORMAT_VERSION) => {}
        Some(v) => return Err(corrupt(&format!("format version {v}"))),
        None => return Err(corrupt("empty value")),
    }
    let mut rest = &bytes[1..];
    while !rest.is_empty() {
        let header: [u8; 8] = rest
            .get(..8)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| corrupt("truncated column header"))?;
        let id = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let payload = rest
            .get(8..8 + len)
            .ok_or_else(|| corrupt("truncated column value"))?;
        rest = &rest[8 + len..];
        let Some(position) = table.columns.iter().position(|c| c.id == id) else {
            continue; // a dropped column
        };
        let ty = table.columns[position].ty;
        values[position] = decode_value(ty, payload).ok_or_else(|| {
            corrupt(&format!(
                "column {} is not a {}",
                table.columns[position].name,
                ty.name()
            ))
        })?;
    }
    Ok(values)
}

fn decode_value(ty: SqlType, payload: &[u8]) -> Option<ScalarValue> {
    let int = || Some(i64::from_le_bytes(payload.try_into().ok()?));
    let float = || Some(f64::from_le_bytes(payload.try_into().ok()?));
    let value = match ty {
        SqlType::Bool => match payload {
            [0] => ScalarValue::Boolean(Some(false)),
            [1] => ScalarValue::Boolean(Some(true)),
            _ => return None,
        },
        SqlType::Int16 => ScalarValue::Int16(Some(i16::try_from(int()?).ok()?)),
        SqlType::Int32 => ScalarValue::Int32(Some(i32::try_from(int()?).ok()?)),
        SqlType::Int64 => ScalarValue::Int64(Some(int()?)),
        SqlType::Date => ScalarValue::Date32(Some(i32::try_from(int()?).ok()?)),
        SqlType::Timestamp => ScalarValue::TimestampMicrosecond(Some(int()?), None),
        SqlType::TimestampTz => ScalarValue::TimestampMicrosecond(Some(int()?), Some(UTC.into())),
        SqlType::Float32 => ScalarValue::Float32(Some(float()? as f32)),
        SqlType::Float64 => ScalarValue::Float64(Some(float()?)),
        SqlType::Numeric { precision, scale } => ScalarValue::Decimal128(
            Some(i128::from_le_bytes(payload.try_into().ok()?)),
            precision,
            scale,
        ),
        SqlType::Text | SqlType::Uuid | SqlType::Jsonb => {
            ScalarValue::Utf8(Some(String::from_utf8(payload.to_vec()).ok()?))
        }
        SqlType::Bytea => ScalarValue::Binary(Some(payload.to_vec())),
    };
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ColumnDesc;

    fn table(columns: &[(u32, &str, SqlType)]) -> TableDesc {
        TableDesc {
            id: 100,
            name: "t".into(),
            columns: columns
                .iter()
                .map(|(id, name, ty)| ColumnDesc {
                    id: *id,
                    name: name.to_string(),
                    ty: *ty,
                    nullable: true,
                    default: None,
                })
                .collect(),
            primary_key: vec![1],
            next_column_id: 10,
        }
    }

    #[test]
    fn every_type_round_trips_and_nulls_stay_null() {
        let t = table(&[
            (1, "sphere_id", SqlType::Int64),
            (2, "b", SqlType::Bool),
            (3, "i", SqlType::Int32),
            (4, "f", SqlType::Float32),
            (
                5,
                "n",
                SqlType::Numeric {
                    precision: 10,
                    scale: 2,
                },
            ),
            (6, "s", SqlType::Text),
            (7, "bytes", SqlType::Bytea),
            (8, "ts", SqlType::TimestampTz),
            (9, "missing", SqlType::Int64),
        ]);
        let row = vec![
            ScalarValue::Int64(Some(7)),
            ScalarValue::Boolean(Some(true)),
            ScalarValue::Int32(Some(-4)),
            ScalarValue::Float32(Some(1.5)),
            ScalarValue::Decimal128(Some(12345), 10, 2),
            ScalarValue::Utf8(Some("héllo".into())),
            ScalarValue::Binary(Some(vec![0, 1, 255])),
            ScalarValue::TimestampMicrosecond(Some(1_700_000_000_000_000), Some(UTC.into())),
            ScalarValue::Int64(None),
        ];
        let decoded = decode(&t, &encode(&t, &row).unwrap()).unwrap();
        // The key column is not in the value.
        assert_eq!(decoded[0], ScalarValue::Int64(None));
        assert_eq!(decoded[1..], row[1..]);
    }

    #[test]
    fn dropped_columns_are_skipped_and_added_ones_read_null() {
        let before = table(&[
            (1, "sphere_id", SqlType::Int64),
            (2, "old", SqlType::Text),
            (3, "kept", SqlType::Int64),
        ]);
        let bytes = encode(
            &before,
            &[
                ScalarValue::Int64(Some(1)),
                ScalarValue::Utf8(Some("x".into())),
                ScalarValue::Int64(Some(9)),
            ],
        )
        .unwrap();
        let after = table(&[
            (1, "sphere_id", SqlType::Int64),
            (3, "kept", SqlType::Int64),
            (4, "new", SqlType::Text),
        ]);
        let decoded = decode(&after, &bytes).unwrap();
        assert_eq!(decoded[1], ScalarValue::Int64(Some(9)));
        assert_eq!(decoded[2], ScalarValue::Utf8(None));
    }

    #[test]
    fn damaged_values_are_corruption_not_data() {
        let t = table(&[(1, "sphere_id", SqlType::Int64), (2, "i", SqlType::Int64)]);
        let good = encode(
            &t,
            &[ScalarValue::Int64(Some(1)), ScalarValue::Int64(Some(5))],
        )
        .unwrap();
        for bad in [
            vec![],
            vec![9],
            good[..good.len() - 1].to_vec(),
            [&good[..], &[1, 2]].concat(),
        ] {
            assert_eq!(decode(&t, &bad).unwrap_err().code, "XX001", "{bad:?}");
        }
    }
}
