//! `AS OF SYSTEM TIME`: reading history. The clause is CockroachDB's, which the PostgreSQL
//! dialect of the SQL parser does not know, so it is cut out of a statement's text before
//! parsing ([`split`]) and the timestamp it names goes with the statement.
//!
//! It is accepted after a query's `FROM` list (`SELECT ... FROM t AS OF SYSTEM TIME '-10s'`)
//! and after `BEGIN`, which starts a read-only transaction at that time. Its value is one of:
//! - a negative interval: `'-10s'`, `'-500ms'`, `'-5m'`, `'-2h'`, `'-1d'` before this node's
//!   clock;
//! - a timestamp: `'2026-12-04 13:00:00'` (UTC unless it names a zone);
//! - a SphereDB timestamp as `spheredb timestamp` prints it: `'1234567890123'` or a bare
//!   number.

use datafusion::arrow::compute::kernels::cast_utils::string_to_timestamp_nanos;
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::tokenizer::{Location, Token, Tokenizer};
use spheredb_storage::mvcc::LOGICAL_BITS;

use crate::error::SqlError;

/// The keywords of the clause, in order.
const CLAUSE: [&str; 4] = ["AS", "OF", "SYSTEM", "TIME"];

/// The time an `AS OF SYSTEM TIME` clause names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// A SphereDB (hybrid) timestamp.
    Timestamp(u64),
    /// This long before the node's clock.
    Ago { ms: u64 },
    /// A wall-clock time, in milliseconds since the Unix epoch.
    UnixMs(u64),
}

impl AsOf {
    /// The hybrid timestamp to read at, with the node's clock at `now_unix_ms`.
    pub fn timestamp(self, now_unix_ms: u64) -> Result<u64, SqlError> {
        let unix_ms = match self {
            AsOf::Timestamp(ts) => return Ok(ts),
            AsOf::Ago { ms } => now_unix_ms.checked_sub(ms).ok_or_else(|| {
                SqlError::invalid(format!("AS OF SYSTEM TIME -{ms}ms is before 1970"))
            })?,
            AsOf::UnixMs(ms) => ms,
        };
        unix_ms
            .checked_shl(LOGICAL_BITS)
            .filter(|ts| ts >> LOGICAL_BITS == unix_ms)
            .ok_or_else(|| SqlError::invalid("AS OF SYSTEM TIME is out of range"))
    }

    fn parse(value: &str) -> Result<AsOf, SqlError> {
        let text = value.trim();
        if let Some(ago) = text.strip_prefix('-') {
            return ago_ms(ago.trim())
                .map(|ms| AsOf::Ago { ms })
                .ok_or_else(|| {
                    SqlError::invalid(format!(
                        "AS OF SYSTEM TIME '{value}': write an interval such as '-10s', '-500ms', \
                     '-5m', '-2h' or '-1d'"
                    ))
                });
        }
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return text.parse().map(AsOf::Timestamp).map_err(|_| {
                SqlError::invalid(format!("AS OF SYSTEM TIME {value} is out of range"))
            });
        }
        let nanos = string_to_timestamp_nanos(text).map_err(|_| {
            SqlError::invalid(format!(
                "AS OF SYSTEM TIME '{value}' is neither a negative interval ('-10s'), a \
                 timestamp ('2026-12-04 13:00:00') nor a SphereDB timestamp"
            ))
        })?;
        u64::try_from(nanos / 1_000_000)
            .map(AsOf::UnixMs)
            .map_err(|_| SqlError::invalid(format!("AS OF SYSTEM TIME '{value}' is before 1970")))
    }
}

/// This node's clock, in milliseconds since the Unix epoch (0 for a clock before it).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Milliseconds in an interval such as `10s`, `500ms`, `5m`, `2h`, `1d`, `10 seconds`.
fn ago_ms(text: &str) -> Option<u64> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let unit_ms = match unit.trim() {
        "ms" | "millisecond" | "milliseconds" => 1,
        "s" | "sec" | "second" | "seconds" => 1_000,
        "m" | "min" | "minute" | "minutes" => 60_000,
        "h" | "hour" | "hours" => 3_600_000,
        "d" | "day" | "days" => 86_400_000,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(unit_ms)
}

/// Cuts `AS OF SYSTEM TIME <value>` out of `sql`, returning the rest of the text (unchanged
/// otherwise) and the time named. Several clauses are refused: a statement reads at one time.
pub fn split(sql: &str) -> Result<(String, Option<AsOf>), SqlError> {
    // Cheap test first: most statements have no such clause.
    let mentions_system = sql
        .as_bytes()
        .windows(CLAUSE[2].len())
        .any(|w| w.eq_ignore_ascii_case(CLAUSE[2].as_bytes()));
    if !mentions_system {
        return Ok((sql.to_string(), None));
    }
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
        .tokenize_with_location()
        .map_err(|e| SqlError::syntax(e.to_string()))?;
    // Tokens that are not whitespace or comments, with their place in `tokens`.
    let significant: Vec<usize> = (0..tokens.len())
        .filter(|i| !matches!(tokens[*i].token, Token::Whitespace(_)))
        .collect();
    let mut found: Option<(usize, usize, AsOf)> = None;
    for (n, &first) in significant.iter().enumerate() {
        let keywords = significant.get(n..n + CLAUSE.len());
        let is_clause = keywords.is_some_and(|at| {
            at.iter().zip(CLAUSE).all(|(i, word)| {
                matches!(&tokens[*i].token, Token::Word(w)
                    if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word))
            })
        });
        if !is_clause {
            continue;
        }
        let Some(&value_at) = significant.get(n + CLAUSE.len()) else {
            return Err(SqlError::syntax(
                "AS OF SYSTEM TIME needs a value, e.g. '-10s'",
            ));
        };
        let value = match &tokens[value_at].token {
            Token::SingleQuotedString(s) => AsOf::parse(s)?,
            Token::Number(s, _) => AsOf::parse(s)?,
            other => {
                return Err(SqlError::syntax(format!(
                    "AS OF SYSTEM TIME needs a quoted value such as '-10s', not {other}"
                )))
            }
        };
        if found.is_some() {
            return Err(SqlError::feature(
                "several AS OF SYSTEM TIME clauses: a statement reads at one time",
            ));
        }
        found = Some((first, value_at, value));
    }
    let Some((first, last, as_of)) = found else {
        return Ok((sql.to_string(), None));
    };
    let lines = line_starts(sql);
    let start = byte_offset(sql, &lines, tokens[first].span.start);
    let end = byte_offset(sql, &lines, tokens[last].span.end);
    let mut rest = String::with_capacity(sql.len());
    rest.push_str(&sql[..start]);
    rest.push(' ');
    rest.push_str(&sql[end..]);
    Ok((rest, Some(as_of)))
}

/// Byte offset of the start of each line of `text`.
fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect()
}

/// Byte offset of a tokenizer location (1-based line, 1-based column in characters).
fn byte_offset(text: &str, lines: &[usize], at: Location) -> usize {
    let Some(&line_start) = (at.line as usize)
        .checked_sub(1)
        .and_then(|line| lines.get(line))
    else {
        return text.len();
    };
    let column = (at.column as usize).saturating_sub(1);
    text[line_start..]
        .char_indices()
        .nth(column)
        .map_or(text.len(), |(i, _)| line_start + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clause_is_cut_out_and_the_rest_kept_byte_for_byte() {
        let (rest, as_of) =
            split("SELECT 'é AS OF', x FROM t AS OF SYSTEM TIME '-10s' WHERE y = 'a''b'").unwrap();
        assert_eq!(rest, "SELECT 'é AS OF', x FROM t   WHERE y = 'a''b'");
        assert_eq!(as_of, Some(AsOf::Ago { ms: 10_000 }));
        let (rest, as_of) = split("begin\n  as of system time 123456").unwrap();
        assert_eq!(rest.trim(), "begin");
        assert_eq!(as_of, Some(AsOf::Timestamp(123_456)));
    }

    #[test]
    fn text_that_only_looks_like_the_clause_is_left_alone() {
        for sql in [
            "SELECT 'AS OF SYSTEM TIME 1' FROM t",
            "SELECT \"as\" FROM t -- as of system time '-1s'",
            "SELECT 1",
        ] {
            assert_eq!(split(sql).unwrap(), (sql.to_string(), None), "{sql}");
        }
    }

    #[test]
    fn values_name_a_time_or_are_refused() {
        let at = |v: &str| split(&format!("SELECT 1 AS OF SYSTEM TIME {v}")).map(|(_, a)| a);
        assert_eq!(at("'-500ms'").unwrap(), Some(AsOf::Ago { ms: 500 }));
        assert_eq!(at("'-2 hours'").unwrap(), Some(AsOf::Ago { ms: 7_200_000 }));
        assert_eq!(
            at("'2026-12-04 13:00:00'").unwrap(),
            Some(AsOf::UnixMs(1_796_389_200_000))
        );
        assert_eq!(
            at("'2026-12-04T13:00:00+01:00'").unwrap(),
            Some(AsOf::UnixMs(1_796_385_600_000))
        );
        for bad in ["'-10 parsecs'", "'yesterday'", "now()", "", "'-'"] {
            assert!(at(bad).is_err(), "{bad}");
        }
        assert!(
            split("SELECT 1 FROM a AS OF SYSTEM TIME '-1s', b AS OF SYSTEM TIME '-2s'").is_err()
        );
    }

    #[test]
    fn times_become_hybrid_timestamps() {
        let now_ms = 1_796_389_200_000;
        assert_eq!(AsOf::Timestamp(42).timestamp(now_ms).unwrap(), 42);
        assert_eq!(
            AsOf::Ago { ms: 1_000 }.timestamp(now_ms).unwrap(),
            (now_ms - 1_000) << LOGICAL_BITS
        );
        assert!(AsOf::Ago { ms: now_ms + 1 }.timestamp(now_ms).is_err());
        assert!(AsOf::UnixMs(u64::MAX >> 4).timestamp(now_ms).is_err());
    }
}
