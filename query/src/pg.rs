//! The PostgreSQL wire protocol front end: one [`Session`] per connection, simple and
//! extended query protocols, PostgreSQL command tags and SQLSTATE codes.

use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::scalar::ScalarValue;
use futures::{stream, Sink};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{
    DataRowEncoder, DescribePortalResponse, DescribeStatementResponse, FieldFormat, FieldInfo,
    QueryResponse, Response, Tag,
};
use pgwire::api::stmt::{NoopQueryParser, StoredStatement};
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use spheredb_client::Client;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::error::SqlError;
use crate::session::{Outcome, Session};

/// Default port of the SQL front end (PostgreSQL's is 5432).
pub const DEFAULT_SQL_PORT: u16 = 5433;
/// Most client connections a node serves at once; more are refused with SQLSTATE 53300.
pub const MAX_SQL_CONNECTIONS: usize = 1_000;

/// Accepts connections on `listener` until the process ends, each served by its own
/// session over `client`.
pub async fn serve(listener: TcpListener, client: Client) -> std::io::Result<()> {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let (socket, peer) = listener.accept().await?;
        let _ = socket.set_nodelay(true);
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_SQL_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(%peer, limit = MAX_SQL_CONNECTIONS, "SQL connection refused: too many");
            continue;
        }
        let connection = Arc::new(Connection {
            handler: Arc::new(Handler {
                session: Mutex::new(Session::new(client.clone())),
                parser: Arc::new(NoopQueryParser::new()),
            }),
        });
        let open = open.clone();
        tokio::spawn(async move {
            if let Err(e) = pgwire::tokio::process_socket(socket, None, connection).await {
                tracing::debug!(%peer, error = %e, "SQL connection ended");
            }
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// One client connection: its handlers share its session.
struct Connection {
    handler: Arc<Handler>,
}

impl PgWireServerHandlers for Connection {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.handler.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.handler.clone()
    }
}

struct Handler {
    session: Mutex<Session>,
    parser: Arc<NoopQueryParser>,
}

/// The ErrorResponse of a failed statement.
fn error_response(e: &SqlError) -> Response {
    Response::Error(Box::new(ErrorInfo::new(
        "ERROR".to_string(),
        e.code.to_string(),
        e.message.clone(),
    )))
}

/// The response to one statement's outcome.
fn respond(outcome: Result<Outcome, SqlError>, format: &Format) -> PgWireResult<Response> {
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => return Ok(error_response(&e)),
    };
    Ok(match outcome {
        Outcome::Began => Response::TransactionStart(Tag::new("BEGIN")),
        Outcome::Ended { tag } => Response::TransactionEnd(Tag::new(tag)),
        Outcome::Command {
            tag: "INSERT",
            rows,
        } => Response::Execution(Tag::new("INSERT").with_oid(0).with_rows(rows.unwrap_or(0))),
        Outcome::Command { tag, rows: Some(n) } => Response::Execution(Tag::new(tag).with_rows(n)),
        Outcome::Command { tag, rows: None } => Response::Execution(Tag::new(tag)),
        Outcome::Rows { schema, batches } => rows_response(&schema, batches, format)?,
    })
}

/// The PostgreSQL type a result column is sent as.
fn pg_type(data_type: &DataType) -> Type {
    match data_type {
        DataType::Boolean => Type::BOOL,
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => Type::INT2,
        DataType::Int32 | DataType::UInt16 => Type::INT4,
        DataType::Int64 | DataType::UInt32 | DataType::UInt64 => Type::INT8,
        DataType::Float16 | DataType::Float32 => Type::FLOAT4,
        DataType::Float64 => Type::FLOAT8,
        DataType::Decimal128(..) => Type::NUMERIC,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => Type::BYTEA,
        DataType::Date32 => Type::DATE,
        DataType::Timestamp(_, None) => Type::TIMESTAMP,
        DataType::Timestamp(_, Some(_)) => Type::TIMESTAMPTZ,
        _ => Type::TEXT,
    }
}

/// The row description of a result.
fn fields(schema: &SchemaRef, format: &Format) -> Vec<FieldInfo> {
    schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            FieldInfo::new(
                f.name().clone(),
                None,
                None,
                pg_type(f.data_type()),
                format.format_for(i),
            )
        })
        .collect()
}

fn rows_response(
    schema: &SchemaRef,
    batches: Vec<RecordBatch>,
    format: &Format,
) -> PgWireResult<Response> {
    let fields = Arc::new(fields(schema, format));
    let mut encoder = DataRowEncoder::new(fields.clone());
    let mut rows = Vec::new();
    for batch in &batches {
        for r in 0..batch.num_rows() {
            for (c, column) in batch.columns().iter().enumerate() {
                let value = ScalarValue::try_from_array(column, r)
                    .map_err(|e| PgWireError::ApiError(Box::new(e)))?;
                encode(&mut encoder, &value, &fields[c])?;
            }
            rows.push(Ok(encoder.take_row()));
        }
    }
    Ok(Response::Query(QueryResponse::new(
        fields,
        stream::iter(rows),
    )))
}

/// Encodes one value as its column's PostgreSQL type says.
fn encode(
    encoder: &mut DataRowEncoder,
    value: &ScalarValue,
    field: &FieldInfo,
) -> PgWireResult<()> {
    use chrono::{DateTime, NaiveDate};
    if value.is_null() {
        return encoder.encode_field(&None::<i8>);
    }
    let bad =
        || PgWireError::ApiError(format!("cannot send {value:?} as {}", field.datatype()).into());
    match value {
        ScalarValue::Boolean(Some(v)) => encoder.encode_field(v),
        ScalarValue::Int8(Some(v)) => encoder.encode_field(&(*v as i16)),
        ScalarValue::UInt8(Some(v)) => encoder.encode_field(&(*v as i16)),
        ScalarValue::Int16(Some(v)) => encoder.encode_field(v),
        ScalarValue::UInt16(Some(v)) => encoder.encode_field(&(*v as i32)),
        ScalarValue::Int32(Some(v)) => encoder.encode_field(v),
        ScalarValue::UInt32(Some(v)) => encoder.encode_field(&(*v as i64)),
        ScalarValue::Int64(Some(v)) => encoder.encode_field(v),
        ScalarValue::UInt64(Some(v)) => {
            encoder.encode_field(&i64::try_from(*v).map_err(|_| bad())?)
        }
        ScalarValue::Float32(Some(v)) => encoder.encode_field(v),
        ScalarValue::Float64(Some(v)) => encoder.encode_field(v),
        ScalarValue::Decimal128(Some(v), _, scale) => {
            let d = rust_decimal::Decimal::try_from_i128_with_scale(*v, (*scale).max(0) as u32)
                .map_err(|_| bad())?;
            encoder.encode_field(&d)
        }
        ScalarValue::Binary(Some(b))
        | ScalarValue::LargeBinary(Some(b))
        | ScalarValue::BinaryView(Some(b)) => encoder.encode_field(b),
        ScalarValue::Date32(Some(days)) => {
            let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).ok_or_else(bad)?;
            let date = epoch
                .checked_add_signed(chrono::Duration::days(*days as i64))
                .ok_or_else(bad)?;
            encoder.encode_field(&date)
        }
        ScalarValue::TimestampMicrosecond(Some(us), tz) => {
            let t = DateTime::from_timestamp_micros(*us).ok_or_else(bad)?;
            if field.format() == FieldFormat::Text {
                // As PostgreSQL prints it: no fraction when it is zero, no trailing zeros.
                let text = timestamp_text(&t.naive_utc(), tz.is_some());
                return encoder.encode_field_with_type_and_format(
                    &text,
                    field.datatype(),
                    FieldFormat::Text,
                    field.format_options(),
                );
            }
            if tz.is_some() {
                encoder.encode_field(&t)
            } else {
                encoder.encode_field(&t.naive_utc())
            }
        }
        ScalarValue::TimestampNanosecond(Some(ns), tz) => {
            let t = DateTime::from_timestamp_nanos(*ns);
            if tz.is_some() {
                encoder.encode_field(&t)
            } else {
                encoder.encode_field(&t.naive_utc())
            }
        }
        other => {
            // Everything else is sent as its text (the column is described as text).
            let text = match other {
                ScalarValue::Utf8(Some(s))
                | ScalarValue::LargeUtf8(Some(s))
                | ScalarValue::Utf8View(Some(s)) => s.clone(),
                other => other.to_string(),
            };
            if *field.datatype() != Type::TEXT {
                return Err(bad());
            }
            encoder.encode_field(&text)
        }
    }
}

/// A timestamp as PostgreSQL prints it: `2024-02-29 12:34:56.5`, with `+00` for one with a
/// time zone (shown in UTC).
fn timestamp_text(t: &chrono::NaiveDateTime, utc: bool) -> String {
    use chrono::Timelike;
    let mut text = t.format("%Y-%m-%d %H:%M:%S").to_string();
    let micros = t.nanosecond() / 1_000;
    if micros != 0 {
        let fraction = format!("{micros:06}");
        text.push('.');
        text.push_str(fraction.trim_end_matches('0'));
    }
    if utc {
        text.push_str("+00");
    }
    text
}

#[async_trait]
impl SimpleQueryHandler for Handler {
    async fn do_query<C>(&self, _client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let mut session = self.session.lock().await;
        let results = session.execute(query).await;
        results
            .into_iter()
            .map(|r| respond(r, &Format::UnifiedText))
            .collect()
    }
}

#[async_trait]
impl ExtendedQueryHandler for Handler {
    type Statement = String;
    type QueryParser = NoopQueryParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        _client: &mut C,
        portal: &Portal<Self::Statement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let sql = match bind(portal) {
            Ok(sql) => sql,
            Err(e) => return Ok(error_response(&e)),
        };
        let mut session = self.session.lock().await;
        let mut results = session.execute(&sql).await;
        match results.len() {
            0 => Ok(Response::EmptyQuery),
            1 => respond(results.remove(0), &portal.result_column_format),
            _ => Ok(error_response(&SqlError::syntax(
                "cannot insert multiple commands into a prepared statement",
            ))),
        }
    }

    async fn do_describe_statement<C>(
        &self,
        _client: &mut C,
        target: &StoredStatement<Self::Statement>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let mut session = self.session.lock().await;
        let described = session
            .describe(&target.statement)
            .await
            .map_err(|e| PgWireError::UserError(Box::new(error_info(&e))))?;
        let count = placeholders(&target.statement).max(target.parameter_types.len());
        let parameters = (0..count)
            .map(|i| {
                target
                    .parameter_types
                    .get(i)
                    .cloned()
                    .flatten()
                    .or_else(|| {
                        described
                            .parameters
                            .get(i)
                            .cloned()
                            .flatten()
                            .map(|t| pg_type(&t))
                    })
                    .unwrap_or(Type::TEXT)
            })
            .collect();
        let fields = described
            .schema
            .map(|s| fields(&s, &Format::UnifiedBinary))
            .unwrap_or_default();
        Ok(DescribeStatementResponse::new(parameters, fields))
    }

    async fn do_describe_portal<C>(
        &self,
        _client: &mut C,
        portal: &Portal<Self::Statement>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let sql = bind(portal).map_err(|e| PgWireError::UserError(Box::new(error_info(&e))))?;
        let mut session = self.session.lock().await;
        let described = session
            .describe(&sql)
            .await
            .map_err(|e| PgWireError::UserError(Box::new(error_info(&e))))?;
        Ok(DescribePortalResponse::new(
            described
                .schema
                .map(|s| fields(&s, &portal.result_column_format))
                .unwrap_or_default(),
        ))
    }
}

fn error_info(e: &SqlError) -> ErrorInfo {
    ErrorInfo::new("ERROR".to_string(), e.code.to_string(), e.message.clone())
}

/// The number of `$n` placeholders `sql` refers to (the highest `n`).
fn placeholders(sql: &str) -> usize {
    let mut highest = 0;
    scan_placeholders(sql, |n| {
        highest = highest.max(n);
        None
    });
    highest
}

/// Calls `replace` with each `$n` outside string literals and quoted names; where it
/// returns text, that text replaces the placeholder. Returns the rewritten SQL.
fn scan_placeholders(sql: &str, mut replace: impl FnMut(usize) -> Option<String>) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.char_indices().peekable();
    let mut quote: Option<char> = None;
    while let Some((_, c)) = chars.next() {
        match quote {
            Some(q) => {
                out.push(c);
                if c == q {
                    quote = None;
                }
            }
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                out.push(c);
            }
            None if c == '$' => {
                let mut digits = String::new();
                while let Some((_, d)) = chars.peek() {
                    if d.is_ascii_digit() {
                        digits.push(*d);
                        chars.next();
                    } else {
                        break;
                    }
                }
                match digits.parse::<usize>() {
                    Ok(n) if n > 0 => match replace(n) {
                        Some(text) => out.push_str(&text),
                        None => {
                            out.push('$');
                            out.push_str(&digits);
                        }
                    },
                    _ => {
                        out.push('$');
                        out.push_str(&digits);
                    }
                }
            }
            None => out.push(c),
        }
    }
    out
}

/// `text` as a SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The portal's statement with its parameters written in as literals.
fn bind(portal: &Portal<String>) -> Result<String, SqlError> {
    let statement = &portal.statement;
    let mut values = Vec::with_capacity(portal.parameters.len());
    for i in 0..portal.parameters.len() {
        let ty = statement
            .parameter_types
            .get(i)
            .cloned()
            .flatten()
            .unwrap_or(Type::UNKNOWN);
        let bad = |e: PgWireError| SqlError::invalid_text(format!("parameter ${}: {e}", i + 1));
        let text = if portal.parameters[i].is_none() {
            "NULL".to_string()
        } else {
            match ty {
                Type::BOOL => portal.parameter::<bool>(i, &ty).map_err(bad)?.map(|b| b.to_string()),
                Type::INT2 => portal.parameter::<i16>(i, &ty).map_err(bad)?.map(|v| v.to_string()),
                Type::INT4 => portal.parameter::<i32>(i, &ty).map_err(bad)?.map(|v| v.to_string()),
                Type::INT8 => portal.parameter::<i64>(i, &ty).map_err(bad)?.map(|v| v.to_string()),
                Type::FLOAT4 => portal
                    .parameter::<f32>(i, &ty)
                    .map_err(bad)?
                    .map(|v| format!("CAST({} AS REAL)", literal(&v.to_string()))),
                Type::FLOAT8 => portal
                    .parameter::<f64>(i, &ty)
                    .map_err(bad)?
                    .map(|v| format!("CAST({} AS DOUBLE PRECISION)", literal(&v.to_string()))),
                Type::NUMERIC => portal
                    .parameter::<rust_decimal::Decimal>(i, &ty)
                    .map_err(bad)?
                    .map(|v| format!("CAST({} AS NUMERIC)", literal(&v.to_string()))),
                Type::BYTEA => portal.parameter::<Vec<u8>>(i, &ty).map_err(bad)?.map(|v| {
                    let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
                    format!("decode('{hex}', 'hex')")
                }),
                _ => {
                    let bytes = portal.parameters[i].as_deref().unwrap_or_default();
                    if portal.parameter_format.format_for(i) == FieldFormat::Binary
                        && ty != Type::TEXT
                        && ty != Type::VARCHAR
                        && ty != Type::UNKNOWN
                    {
                        return Err(SqlError::feature(format!(
                            "parameter ${} of type {ty} in binary format is not supported; send                              it as text",
                            i + 1
                        )));
                    }
                    let text = std::str::from_utf8(bytes).map_err(|_| {
                        SqlError::invalid_text(format!("parameter ${} is not UTF-8", i + 1))
                    })?;
                    Some(literal(text))
                }
            }
            .unwrap_or_else(|| "NULL".to_string())
        };
        values.push(text);
    }
    Ok(scan_placeholders(&statement.statement, |n| {
        values.get(n - 1).cloned()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced_outside_literals_only() {
        let sql = "SELECT '$1', \"$2\", $1 + $10 FROM t WHERE a = $2";
        let out = scan_placeholders(sql, |n| Some(format!("<{n}>")));
        assert_eq!(out, "SELECT '$1', \"$2\", <1> + <10> FROM t WHERE a = <2>");
        assert_eq!(placeholders(sql), 10);
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[test]
    fn timestamps_print_as_postgres_prints_them() {
        let t = chrono::DateTime::from_timestamp_micros(1_709_210_096_500_000)
            .unwrap()
            .naive_utc();
        assert_eq!(timestamp_text(&t, false), "2024-02-29 12:34:56.5");
        let whole = chrono::DateTime::from_timestamp_micros(1_709_210_096_000_000)
            .unwrap()
            .naive_utc();
        assert_eq!(timestamp_text(&whole, true), "2024-02-29 12:34:56+00");
    }
}
