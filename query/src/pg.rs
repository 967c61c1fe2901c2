//! The PostgreSQL wire protocol front end: one [`Session`] per connection, simple and
//! extended query protocols, PostgreSQL command tags and SQLSTATE codes.

use std::collections::HashMap;
use std::fmt::Debug;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::scalar::ScalarValue;
use datafusion::sql::sqlparser::ast::{
    visit_expressions, visit_expressions_mut, Expr as SqlExpr, Statement, Value,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::Token;
use futures::{stream, Sink};
use pgwire::api::auth::noop::NoopStartupHandler;
use pgwire::api::auth::StartupHandler;
use pgwire::api::cancel::CancelHandler;
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
use pgwire::messages::extendedquery::Execute;
use pgwire::messages::response::TransactionStatus;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use spheredb_client::Client;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::as_of::{self, AsOf};
use crate::cancel::{Canceler, Cancelers};
use crate::error::SqlError;
use crate::session::{Outcome, Session};

/// Most client connections a node serves at once; more are closed at once (and logged).
pub const MAX_SQL_CONNECTIONS: usize = 1_000;

/// Accepts connections on `listener` until the process ends, each served by its own
/// session over `client`.
pub async fn serve(listener: TcpListener, client: Client) -> std::io::Result<()> {
    let open = Arc::new(AtomicUsize::new(0));
    let cancelers = Arc::new(Cancelers::default());
    loop {
        let (socket, peer) = listener.accept().await?;
        let _ = socket.set_nodelay(true);
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_SQL_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(%peer, limit = MAX_SQL_CONNECTIONS, "SQL connection refused: too many");
            continue;
        }
        let session = Session::new(client.clone());
        let handler = Arc::new(Handler {
            canceler: session.canceler(),
            session: Mutex::new(session),
            parser: Arc::new(NoopQueryParser::new()),
            described: std::sync::Mutex::new(HashMap::new()),
            cancelers: cancelers.clone(),
            cancel_key: std::sync::Mutex::new(None),
        });
        let connection = Arc::new(Connection {
            handler: handler.clone(),
            cancelers: cancelers.clone(),
        });
        let open = open.clone();
        tokio::spawn(async move {
            if let Err(e) = pgwire::tokio::process_socket(socket, None, connection).await {
                tracing::debug!(%peer, error = %e, "SQL connection ended");
            }
            handler.forget_cancel_key();
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// One client connection: its handlers share its session.
struct Connection {
    handler: Arc<Handler>,
    /// Every session of the node, for cancel requests (which come on connections of their
    /// own).
    cancelers: Arc<Cancelers>,
}

impl PgWireServerHandlers for Connection {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.handler.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.handler.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.handler.clone()
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        self.cancelers.clone()
    }
}

struct Handler {
    session: Mutex<Session>,
    parser: Arc<NoopQueryParser>,
    /// What this connection's Describe messages answered, by statement name and text.
    described: std::sync::Mutex<HashMap<(String, String), Description>>,
    /// Cancels the session's running statement without waiting for the session's lock.
    canceler: Canceler,
    cancelers: Arc<Cancelers>,
    /// The process id and secret key the client was given at startup, under which
    /// `cancelers` knows this session.
    cancel_key: std::sync::Mutex<Option<(i32, Vec<u8>)>>,
}

impl Handler {
    fn forget_cancel_key(&self) {
        let key = self
            .cancel_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(key) = key {
            self.cancelers.unregister(&key);
        }
    }
}

/// Startup without authentication (it comes with the security work); the session is
/// registered for cancel requests under the key the client is sent (BackendKeyData).
#[async_trait]
impl NoopStartupHandler for Handler {
    async fn post_startup<C>(
        &self,
        client: &mut C,
        _message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (pid, secret_key) = client.pid_and_secret_key();
        let key = (pid, secret_key.to_bytes().to_vec());
        self.cancelers.register(key.clone(), self.canceler.clone());
        *self.cancel_key.lock().unwrap_or_else(|p| p.into_inner()) = Some(key);
        Ok(())
    }
}

/// The ErrorResponse of a failed statement.
fn error_response(e: &SqlError) -> Response {
    Response::Error(Box::new(error_info(e)))
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
        Outcome::Rows { schema, batches } => rows_response(&schema, batches, format, "SELECT")?,
        Outcome::Returned {
            tag,
            schema,
            batches,
        } => rows_response(&schema, batches, format, tag)?,
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

/// A result set; `tag` is its CommandComplete tag before the row count (`SELECT`,
/// `INSERT 0`, `UPDATE`, `DELETE`).
fn rows_response(
    schema: &SchemaRef,
    batches: Vec<RecordBatch>,
    format: &Format,
    tag: &str,
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
    let mut response = QueryResponse::new(fields, stream::iter(rows));
    response.command_tag = tag.to_string();
    Ok(Response::Query(response))
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
            if field.format() == FieldFormat::Text {
                // Written out digit by digit: every NUMERIC(38, s) value fits, where
                // rust_decimal holds 96 bits.
                return encoder.encode_field_with_type_and_format(
                    &decimal_text(*v, *scale),
                    field.datatype(),
                    FieldFormat::Text,
                    field.format_options(),
                );
            }
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

/// A decimal of `scale` digits after the point, as PostgreSQL prints NUMERIC.
fn decimal_text(value: i128, scale: i8) -> String {
    let digits = value.unsigned_abs().to_string();
    let sign = if value < 0 { "-" } else { "" };
    if scale <= 0 {
        let zeros = "0".repeat(scale.unsigned_abs() as usize);
        return format!("{sign}{digits}{zeros}");
    }
    let scale = scale as usize;
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = padded.split_at(padded.len() - scale);
    format!("{sign}{whole}.{fraction}")
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
        let mut responses = Vec::with_capacity(results.len());
        for result in results {
            if let Ok(outcome) = &result {
                self.note_schema_change(outcome);
            }
            match respond(result, &Format::UnifiedText) {
                Ok(response) => responses.push(response),
                // The statements before it did run (and may have committed): their answers
                // stay, and this one's error takes its place.
                Err(e) => {
                    session.fail();
                    let message = e.to_string();
                    responses.push(error_response(&SqlError::internal(format!(
                        "a result could not be sent: {message}"
                    ))));
                    break;
                }
            }
        }
        // A failed COMMIT ends its transaction, as in PostgreSQL: the ReadyForQuery after it
        // must say idle, not failed, and pgwire derives that status from the responses. (Not
        // for an unknown outcome, which a ROLLBACK tag would misstate.)
        let unknown = matches!(responses.last(), Some(Response::Error(e)) if e.code == "08007");
        if session.commit_failed() && !unknown {
            let error = responses.pop();
            responses.push(Response::TransactionEnd(Tag::new("ROLLBACK")));
            responses.extend(error);
        }
        Ok(responses)
    }
}

#[async_trait]
impl ExtendedQueryHandler for Handler {
    type Statement = String;
    type QueryParser = NoopQueryParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    async fn on_execute<C>(&self, client: &mut C, message: Execute) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let result = self._on_execute(client, message).await;
        // A failed COMMIT ends its transaction, as in PostgreSQL: the ReadyForQuery at the
        // next Sync must say idle, not failed.
        if self.session.lock().await.commit_failed() {
            client.set_transaction_status(TransactionStatus::Idle);
        }
        result
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
        let mut session = self.session.lock().await;
        let (statement, as_of) = match self.bound(portal) {
            Ok(Some(bound)) => bound,
            Ok(None) => return Ok(Response::EmptyQuery),
            Err(e) => return Err(failed(&mut session, e)),
        };
        // Errors are returned, not answered: pgwire then skips the rest of the pipeline up
        // to the next Sync, as PostgreSQL does.
        let outcome = session
            .run_at(statement, as_of)
            .await
            .map_err(|e| PgWireError::UserError(Box::new(error_info(&e))))?;
        self.note_schema_change(&outcome);
        respond(Ok(outcome), &portal.result_column_format).inspect_err(|_| session.fail())
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
        let (statement, as_of) = match one_statement(&target.statement) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return Ok(DescribeStatementResponse::new(Vec::new(), Vec::new())),
            Err(e) => return Err(failed(&mut session, e)),
        };
        let count = placeholder_count(&statement).max(target.parameter_types.len());
        if count > MAX_PARAMETERS {
            return Err(failed(
                &mut session,
                SqlError::new(
                    "54023",
                    format!("a statement has at most {MAX_PARAMETERS} parameters, not {count}"),
                ),
            ));
        }
        let described = session
            .describe(statement, as_of)
            .await
            .map_err(|e| PgWireError::UserError(Box::new(error_info(&e))))?;
        let parameters: Vec<Type> = (0..count)
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
        let keep_result = !target.id.is_empty() && !relative(as_of);
        self.remember(&target.id, &target.statement, |d| {
            d.parameters = Some(parameters.clone());
            // Unnamed statements, and those reading at a time relative to the clock, are
            // planned again for every portal.
            if keep_result {
                d.result = Some(described.schema.clone());
            }
        });
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
        let stored = &portal.statement;
        // A named statement's result columns do not depend on its parameters' values:
        // drivers that describe every portal they run (libpq, JDBC) get the answer planned
        // once. Unnamed statements are planned every time, as PostgreSQL re-plans them.
        let known = self
            .description(&stored.id, &stored.statement)
            .and_then(|d| d.result);
        let schema = match known {
            Some(schema) => schema,
            None => {
                let mut session = self.session.lock().await;
                let (statement, as_of) = match self.bound(portal) {
                    Ok(Some(bound)) => bound,
                    Ok(None) => return Ok(DescribePortalResponse::new(Vec::new())),
                    Err(e) => return Err(failed(&mut session, e)),
                };
                let described = session
                    .describe(statement, as_of)
                    .await
                    .map_err(|e| PgWireError::UserError(Box::new(error_info(&e))))?;
                if !stored.id.is_empty() && !relative(as_of) {
                    self.remember(&stored.id, &stored.statement, |d| {
                        d.result = Some(described.schema.clone())
                    });
                }
                described.schema
            }
        };
        Ok(DescribePortalResponse::new(
            schema
                .map(|s| fields(&s, &portal.result_column_format))
                .unwrap_or_default(),
        ))
    }
}

/// Marks the session's transaction failed and turns `e` into the error pgwire sends.
fn failed(session: &mut Session, e: SqlError) -> PgWireError {
    session.fail();
    PgWireError::UserError(Box::new(error_info(&e)))
}

fn error_info(e: &SqlError) -> ErrorInfo {
    ErrorInfo::new("ERROR".to_string(), e.code.to_string(), e.message.clone())
}

/// Whether a statement reads at a time relative to the clock (`AS OF SYSTEM TIME '-10s'`):
/// the tables it reads, and so its result columns, may differ at each execution.
fn relative(as_of: Option<AsOf>) -> bool {
    matches!(as_of, Some(AsOf::Ago { .. }))
}

/// The one statement of a prepared statement's text (`None` for an empty one). More than
/// one is refused before anything runs, as PostgreSQL refuses it at Parse.
fn one_statement(sql: &str) -> Result<Option<(Statement, Option<AsOf>)>, SqlError> {
    let (sql, as_of) = as_of::split(sql)?;
    let mut statements = Session::parse(&sql)?;
    match statements.len() {
        0 => Ok(None),
        1 => Ok(Some((statements.remove(0), as_of))),
        _ => Err(SqlError::syntax(
            "cannot insert multiple commands into a prepared statement",
        )),
    }
}

/// The number `n` of a `$n` placeholder expression.
fn placeholder(expr: &SqlExpr) -> Option<Result<usize, String>> {
    let SqlExpr::Value(v) = expr else {
        return None;
    };
    let Value::Placeholder(p) = &v.value else {
        return None;
    };
    Some(
        p.strip_prefix('$')
            .and_then(|d| d.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| p.clone()),
    )
}

/// Parameters one statement may have, as in PostgreSQL (the Bind message counts them in 16
/// bits); a higher `$n` is refused before anything is sized by it.
pub const MAX_PARAMETERS: usize = 65_535;

/// The highest `$n` a statement refers to.
fn placeholder_count(statement: &Statement) -> usize {
    let mut highest = 0;
    let _ = visit_expressions(statement, |expr| {
        if let Some(Ok(n)) = placeholder(expr) {
            highest = highest.max(n);
        }
        ControlFlow::<()>::Continue(())
    });
    highest
}

/// Replaces every `$n` placeholder of the parsed statement by the expression of parameter
/// `n`. The statement is never printed and parsed again, so no parameter value can change
/// the statement's shape (a comment, a string or a minus sign next to a placeholder).
fn substitute(statement: &mut Statement, values: &[SqlExpr]) -> Result<(), SqlError> {
    let mut missing = None;
    let _ = visit_expressions_mut(statement, |expr| {
        match placeholder(expr) {
            None => {}
            Some(Ok(n)) if n <= values.len() => *expr = values[n - 1].clone(),
            Some(Ok(n)) => {
                missing = Some(format!("${n}"));
                return ControlFlow::Break(());
            }
            Some(Err(p)) => {
                missing = Some(p);
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    });
    match missing {
        Some(p) => Err(SqlError::new(
            "08P01",
            format!("there is no parameter {p} ({} given)", values.len()),
        )),
        None => Ok(()),
    }
}

/// `text` as a SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// One parameter value as an expression: parsed on its own from text this module writes, so
/// it is exactly one expression whatever the value holds.
fn parameter_expr(text: &str) -> Result<SqlExpr, SqlError> {
    let dialect = PostgreSqlDialect {};
    let mut parser = Parser::new(&dialect)
        .try_with_sql(text)
        .map_err(|e| SqlError::internal(format!("parameter {text:?}: {e}")))?;
    let expr = parser
        .parse_expr()
        .map_err(|e| SqlError::internal(format!("parameter {text:?}: {e}")))?;
    if parser.peek_token().token != Token::EOF {
        return Err(SqlError::internal(format!(
            "parameter {text:?} is more than one expression"
        )));
    }
    Ok(expr)
}

/// Parameter `i` of `portal`, of type `ty`, as SQL text of one self-contained expression.
fn parameter_text(portal: &Portal<String>, i: usize, ty: &Type) -> Result<String, SqlError> {
    let bad = |e: PgWireError| SqlError::invalid_text(format!("parameter ${}: {e}", i + 1));
    if portal.parameters[i].is_none() {
        return Ok("NULL".to_string());
    }
    let cast = |value: Option<String>, sql_type: &str| {
        value.map(|v| format!("CAST({} AS {sql_type})", literal(&v)))
    };
    // The value read as Rust type `$t`, written back as text and cast to SQL type `$sql`.
    macro_rules! typed {
        ($t:ty, $sql:expr) => {
            cast(
                portal
                    .parameter::<$t>(i, ty)
                    .map_err(bad)?
                    .map(|v| v.to_string()),
                $sql,
            )
        };
    }
    let text = match *ty {
        Type::BOOL => typed!(bool, "BOOLEAN"),
        Type::INT2 => typed!(i16, "SMALLINT"),
        Type::INT4 => typed!(i32, "INT"),
        Type::INT8 => typed!(i64, "BIGINT"),
        Type::FLOAT4 => typed!(f32, "REAL"),
        Type::FLOAT8 => typed!(f64, "DOUBLE PRECISION"),
        Type::NUMERIC => typed!(rust_decimal::Decimal, "NUMERIC"),
        Type::BYTEA => portal.parameter::<Vec<u8>>(i, ty).map_err(bad)?.map(|v| {
            let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
            format!("decode('{hex}', 'hex')")
        }),
        _ => {
            if portal.parameter_format.format_for(i) == FieldFormat::Binary
                && *ty != Type::TEXT
                && *ty != Type::VARCHAR
            {
                return Err(SqlError::feature(format!(
                    "parameter ${} of type {ty} in binary format is not supported; send it as \
                     text, or as bool, int2/4/8, float4/8, numeric, bytea or text",
                    i + 1
                )));
            }
            let bytes = portal.parameters[i].as_deref().unwrap_or_default();
            let text = std::str::from_utf8(bytes).map_err(|_| {
                SqlError::invalid_text(format!("parameter ${} is not UTF-8", i + 1))
            })?;
            Some(literal(text))
        }
    };
    Ok(text.unwrap_or_else(|| "NULL".to_string()))
}

/// Statements whose descriptions this connection keeps (parameter types for values the
/// client then sends in binary, result columns for Describe of a portal): at most this
/// many, all forgotten past it.
pub const MAX_DESCRIBED_STATEMENTS: usize = 1_000;

/// What Describe answered for one prepared statement.
#[derive(Clone, Default)]
struct Description {
    parameters: Option<Vec<Type>>,
    /// Its result columns (`Some(None)`: it returns no rows); named statements only, and
    /// forgotten when this connection changes a table. A table another connection drops
    /// and creates again with other columns is not noticed: the client is answered rows
    /// of the new columns under the old description (PostgreSQL refuses such a cached plan
    /// with "cached plan must not change result type"); prepare the statement again under
    /// another name.
    result: Option<Option<SchemaRef>>,
}

impl Handler {
    fn remember(&self, id: &str, sql: &str, update: impl FnOnce(&mut Description)) {
        let mut described = self.described.lock().unwrap_or_else(|p| p.into_inner());
        if described.len() >= MAX_DESCRIBED_STATEMENTS {
            described.clear();
        }
        update(
            described
                .entry((id.to_string(), sql.to_string()))
                .or_default(),
        );
    }

    /// Forgets the result columns of every described statement after this connection
    /// created or dropped a table.
    fn note_schema_change(&self, outcome: &Outcome) {
        if let Outcome::Command {
            tag: "CREATE TABLE" | "DROP TABLE",
            ..
        } = outcome
        {
            let mut described = self.described.lock().unwrap_or_else(|p| p.into_inner());
            for d in described.values_mut() {
                d.result = None;
            }
        }
    }

    fn description(&self, id: &str, sql: &str) -> Option<Description> {
        self.described
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(id.to_string(), sql.to_string()))
            .cloned()
    }

    /// The portal's statement with its parameters in place.
    fn bound(
        &self,
        portal: &Portal<String>,
    ) -> Result<Option<(Statement, Option<AsOf>)>, SqlError> {
        let stored = &portal.statement;
        let Some((mut statement, as_of)) = one_statement(&stored.statement)? else {
            return Ok(None);
        };
        let described = self
            .description(&stored.id, &stored.statement)
            .and_then(|d| d.parameters)
            .unwrap_or_default();
        let mut values = Vec::with_capacity(portal.parameters.len());
        for i in 0..portal.parameters.len() {
            let ty = stored
                .parameter_types
                .get(i)
                .cloned()
                .flatten()
                .or_else(|| described.get(i).cloned())
                .unwrap_or(Type::UNKNOWN);
            values.push(parameter_expr(&parameter_text(portal, i, &ty)?)?);
        }
        substitute(&mut statement, &values)?;
        Ok(Some((statement, as_of)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_cannot_change_the_statement_around_them() {
        // `-$1` with a negative value must not become a comment, and a value with a comment
        // and a newline must stay one string.
        let mut statement =
            one_statement("UPDATE t SET score = score-$1 WHERE sphere_id = $2 -- $2 in a comment")
                .unwrap()
                .unwrap()
                .0;
        assert_eq!(placeholder_count(&statement), 2);
        let values = [
            parameter_expr("CAST('-3' AS BIGINT)").unwrap(),
            parameter_expr(&literal("x\n OR true --'")).unwrap(),
        ];
        substitute(&mut statement, &values).unwrap();
        let text = statement.to_string();
        assert!(text.contains("score - CAST('-3' AS BIGINT)"), "{text}");
        assert!(text.contains("sphere_id = 'x\n OR true --'''"), "{text}");
        assert!(parameter_expr("1; DROP TABLE t").is_err());
        let mut short = one_statement("SELECT $3").unwrap().unwrap().0;
        assert_eq!(substitute(&mut short, &values).unwrap_err().code, "08P01");
        assert!(one_statement("SELECT 1; SELECT 2").is_err());
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[test]
    fn decimals_print_every_digit() {
        assert_eq!(decimal_text(12345, 2), "123.45");
        assert_eq!(decimal_text(-5, 2), "-0.05");
        assert_eq!(decimal_text(7, 0), "7");
        assert_eq!(decimal_text(7, -2), "700");
        let big = 10i128.pow(37) + 1;
        assert_eq!(
            decimal_text(big, 10),
            "1000000000000000000000000000.0000000001"
        );
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
