//! Column types: how a SQL type is named, held in Arrow, stored in a row and shown to
//! PostgreSQL clients. Pure: no I/O.

use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::scalar::ScalarValue;
use serde::{Deserialize, Serialize};
use spheredb_storage::keys::Datum;

use crate::error::SqlError;

/// Precision and scale of a `NUMERIC` declared without them (PostgreSQL's is unbounded;
/// Arrow's widest exact decimal holds 38 digits).
pub const DEFAULT_NUMERIC_PRECISION: u8 = 38;
pub const DEFAULT_NUMERIC_SCALE: i8 = 10;

/// The time zone Arrow gives `TIMESTAMPTZ` values: they are instants, shown in UTC.
pub const UTC: &str = "+00:00";

/// A column's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SqlType {
    Bool,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    Numeric {
        precision: u8,
        scale: i8,
    },
    Text,
    Bytea,
    Date,
    Timestamp,
    TimestampTz,
    /// Stored as its canonical lowercase text.
    Uuid,
    /// Stored as text (checked to be JSON on write).
    Jsonb,
}

impl SqlType {
    /// Parses a type as written in `CREATE TABLE` (sqlparser's rendering of it).
    pub fn parse(written: &str) -> Result<SqlType, SqlError> {
        let upper = written.trim().to_ascii_uppercase();
        let (base, args) = match upper.find('(') {
            Some(i) => (upper[..i].trim(), Some(upper[i..].trim())),
            None => (upper.as_str(), None),
        };
        let ty = match base {
            "BOOLEAN" | "BOOL" => SqlType::Bool,
            "SMALLINT" | "INT2" => SqlType::Int16,
            "INT" | "INTEGER" | "INT4" => SqlType::Int32,
            "BIGINT" | "INT8" => SqlType::Int64,
            "REAL" | "FLOAT4" => SqlType::Float32,
            "DOUBLE" | "DOUBLE PRECISION" | "FLOAT8" | "FLOAT" => SqlType::Float64,
            "NUMERIC" | "DECIMAL" => numeric(args)?,
            "TEXT" | "VARCHAR" | "CHARACTER VARYING" | "STRING" => SqlType::Text,
            "BYTEA" => SqlType::Bytea,
            "DATE" => SqlType::Date,
            "TIMESTAMP" | "TIMESTAMP WITHOUT TIME ZONE" => SqlType::Timestamp,
            "TIMESTAMPTZ" | "TIMESTAMP WITH TIME ZONE" => SqlType::TimestampTz,
            "UUID" => SqlType::Uuid,
            "JSONB" | "JSON" => SqlType::Jsonb,
            _ => {
                return Err(SqlError::feature(format!(
                    "type {written} is not supported; use BOOLEAN, SMALLINT, INT, BIGINT, REAL, \
                     DOUBLE PRECISION, NUMERIC(p,s), TEXT, VARCHAR, BYTEA, DATE, TIMESTAMP, \
                     TIMESTAMPTZ, UUID or JSONB"
                )))
            }
        };
        Ok(ty)
    }

    /// The Arrow type values of this column have in query plans.
    pub fn arrow(self) -> DataType {
        match self {
            SqlType::Bool => DataType::Boolean,
            SqlType::Int16 => DataType::Int16,
            SqlType::Int32 => DataType::Int32,
            SqlType::Int64 => DataType::Int64,
            SqlType::Float32 => DataType::Float32,
            SqlType::Float64 => DataType::Float64,
            SqlType::Numeric { precision, scale } => DataType::Decimal128(precision, scale),
            SqlType::Text | SqlType::Uuid | SqlType::Jsonb => DataType::Utf8,
            SqlType::Bytea => DataType::Binary,
            SqlType::Date => DataType::Date32,
            SqlType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            SqlType::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into())),
        }
    }

    /// The name `information_schema` and error messages use.
    pub fn name(self) -> String {
        match self {
            SqlType::Bool => "boolean".into(),
            SqlType::Int16 => "smallint".into(),
            SqlType::Int32 => "integer".into(),
            SqlType::Int64 => "bigint".into(),
            SqlType::Float32 => "real".into(),
            SqlType::Float64 => "double precision".into(),
            SqlType::Numeric { precision, scale } => format!("numeric({precision},{scale})"),
            SqlType::Text => "text".into(),
            SqlType::Bytea => "bytea".into(),
            SqlType::Date => "date".into(),
            SqlType::Timestamp => "timestamp without time zone".into(),
            SqlType::TimestampTz => "timestamp with time zone".into(),
            SqlType::Uuid => "uuid".into(),
            SqlType::Jsonb => "jsonb".into(),
        }
    }

    /// Whether a primary-key column may have this type: its values must sort in the key
    /// encoding as they compare in SQL.
    pub fn keyable(self) -> bool {
        matches!(
            self,
            SqlType::Bool
                | SqlType::Int16
                | SqlType::Int32
                | SqlType::Int64
                | SqlType::Text
                | SqlType::Bytea
                | SqlType::Date
                | SqlType::Timestamp
                | SqlType::TimestampTz
                | SqlType::Uuid
        )
    }

    /// Checks a value already cast to [`SqlType::arrow`] for what Arrow's type does not
    /// say: that a UUID is one and that JSON parses.
    pub fn check(self, column: &str, value: &ScalarValue) -> Result<(), SqlError> {
        let ScalarValue::Utf8(Some(text)) = value else {
            return Ok(());
        };
        match self {
            SqlType::Uuid if !is_uuid(text) => Err(SqlError::invalid_text(format!(
                "invalid input syntax for type uuid: {text:?} (column {column})"
            ))),
            SqlType::Jsonb if serde_json::from_str::<serde_json::Value>(text).is_err() => {
                Err(SqlError::invalid_text(format!(
                    "invalid input syntax for type json: {text:?} (column {column})"
                )))
            }
            _ => Ok(()),
        }
    }

    /// The key form of a primary-key value (of type [`SqlType::arrow`]).
    pub fn datum(self, column: &str, value: &ScalarValue) -> Result<Datum, SqlError> {
        let datum = match value {
            _ if value.is_null() => {
                return Err(SqlError::not_null(format!(
                    "null value in primary-key column {column}"
                )))
            }
            ScalarValue::Boolean(Some(b)) => Datum::Bool(*b),
            ScalarValue::Int16(Some(v)) => Datum::Int(*v as i64),
            ScalarValue::Int32(Some(v)) => Datum::Int(*v as i64),
            ScalarValue::Int64(Some(v)) => Datum::Int(*v),
            ScalarValue::Date32(Some(v)) => Datum::Int(*v as i64),
            ScalarValue::TimestampMicrosecond(Some(v), _) => Datum::Int(*v),
            ScalarValue::Utf8(Some(s)) if self == SqlType::Uuid => Datum::Text(s.to_lowercase()),
            ScalarValue::Utf8(Some(s)) => Datum::Text(s.clone()),
            ScalarValue::Binary(Some(b)) => Datum::Bytes(b.clone()),
            other => {
                return Err(SqlError::internal(format!(
                    "primary-key column {column} holds {other:?}, not a {}",
                    self.name()
                )))
            }
        };
        Ok(datum)
    }

    /// The value of a primary-key column from its key form.
    pub fn from_datum(self, datum: &Datum) -> Result<ScalarValue, SqlError> {
        let bad = || {
            SqlError::corruption(format!(
                "key column of type {} holds {datum:?}",
                self.name()
            ))
        };
        let value = match (self, datum) {
            (_, Datum::Null) => ScalarValue::try_new_null(&self.arrow()).map_err(SqlError::from)?,
            (SqlType::Bool, Datum::Bool(b)) => ScalarValue::Boolean(Some(*b)),
            (SqlType::Int16, Datum::Int(v)) => {
                ScalarValue::Int16(Some(i16::try_from(*v).map_err(|_| bad())?))
            }
            (SqlType::Int32, Datum::Int(v)) => {
                ScalarValue::Int32(Some(i32::try_from(*v).map_err(|_| bad())?))
            }
            (SqlType::Int64, Datum::Int(v)) => ScalarValue::Int64(Some(*v)),
            (SqlType::Date, Datum::Int(v)) => {
                ScalarValue::Date32(Some(i32::try_from(*v).map_err(|_| bad())?))
            }
            (SqlType::Timestamp, Datum::Int(v)) => {
                ScalarValue::TimestampMicrosecond(Some(*v), None)
            }
            (SqlType::TimestampTz, Datum::Int(v)) => {
                ScalarValue::TimestampMicrosecond(Some(*v), Some(UTC.into()))
            }
            (SqlType::Text | SqlType::Uuid, Datum::Text(s)) => ScalarValue::Utf8(Some(s.clone())),
            (SqlType::Bytea, Datum::Bytes(b)) => ScalarValue::Binary(Some(b.clone())),
            _ => return Err(bad()),
        };
        Ok(value)
    }
}

fn numeric(args: Option<&str>) -> Result<SqlType, SqlError> {
    let Some(args) = args else {
        return Ok(SqlType::Numeric {
            precision: DEFAULT_NUMERIC_PRECISION,
            scale: DEFAULT_NUMERIC_SCALE,
        });
    };
    let inner = args.trim_start_matches('(').trim_end_matches(')');
    let mut parts = inner.split(',').map(|p| p.trim().parse::<i64>());
    let bad = || {
        SqlError::invalid(format!(
            "NUMERIC{args}: precision 1..=38 and scale 0..=precision"
        ))
    };
    let precision = parts.next().and_then(|p| p.ok()).ok_or_else(bad)?;
    let scale = match parts.next() {
        Some(s) => s.map_err(|_| bad())?,
        None => 0,
    };
    if !(1..=38).contains(&precision) || !(0..=precision).contains(&scale) {
        return Err(bad());
    }
    Ok(SqlType::Numeric {
        precision: precision as u8,
        scale: scale as i8,
    })
}

/// `8-4-4-4-12` hexadecimal digits.
fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_parse_as_postgres_writes_them() {
        assert_eq!(SqlType::parse("BIGINT").unwrap(), SqlType::Int64);
        assert_eq!(SqlType::parse("int").unwrap(), SqlType::Int32);
        assert_eq!(SqlType::parse("VARCHAR(20)").unwrap(), SqlType::Text);
        assert_eq!(
            SqlType::parse("NUMERIC(10,2)").unwrap(),
            SqlType::Numeric {
                precision: 10,
                scale: 2
            }
        );
        assert_eq!(
            SqlType::parse("TIMESTAMP WITH TIME ZONE").unwrap(),
            SqlType::TimestampTz
        );
        assert!(SqlType::parse("NUMERIC(3,5)").is_err());
        assert!(SqlType::parse("GEOMETRY").is_err());
    }

    #[test]
    fn key_values_round_trip_and_null_keys_are_refused() {
        for (ty, v) in [
            (SqlType::Int64, ScalarValue::Int64(Some(-5))),
            (SqlType::Int16, ScalarValue::Int16(Some(7))),
            (SqlType::Text, ScalarValue::Utf8(Some("a\0b".into()))),
            (SqlType::Date, ScalarValue::Date32(Some(19_000))),
            (SqlType::Bool, ScalarValue::Boolean(Some(true))),
        ] {
            let d = ty.datum("c", &v).unwrap();
            assert_eq!(ty.from_datum(&d).unwrap(), v);
        }
        let err = SqlType::Int64
            .datum("id", &ScalarValue::Int64(None))
            .unwrap_err();
        assert_eq!(err.code, "23502");
        // A key column whose stored value does not fit its type is corruption.
        assert_eq!(
            SqlType::Int16
                .from_datum(&Datum::Int(1 << 20))
                .unwrap_err()
                .code,
            "XX001"
        );
    }

    #[test]
    fn uuids_and_json_are_checked() {
        let ok = ScalarValue::Utf8(Some("123e4567-e89b-12d3-a456-426614174000".into()));
        assert!(SqlType::Uuid.check("u", &ok).is_ok());
        let bad = ScalarValue::Utf8(Some("123e4567".into()));
        assert_eq!(SqlType::Uuid.check("u", &bad).unwrap_err().code, "22P02");
        assert!(SqlType::Jsonb
            .check("j", &ScalarValue::Utf8(Some("{\"a\": 1}".into())))
            .is_ok());
        assert!(SqlType::Jsonb
            .check("j", &ScalarValue::Utf8(Some("{a".into())))
            .is_err());
    }
}
