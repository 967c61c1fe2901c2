//! A SQL session: one client connection's statements and its transaction.
//!
//! Every statement runs in a transaction: the session's explicit one between `BEGIN` and
//! `COMMIT`/`ROLLBACK`, or its own (committed when it succeeds, rolled back when it fails).
//! Queries are planned and run by DataFusion over [`SphereTable`]s that read in that
//! transaction. `INSERT`, `UPDATE` and `DELETE` are planned here, not through DataFusion's DML
//! hooks (which change every row for some filters, see docs/sql.md): the rows a statement
//! changes are those an ordinary `SELECT` with the statement's `WHERE` returns, so every
//! filter shape DataFusion can query is handled, and a `WHERE` that folds to false changes
//! nothing.

use std::collections::{BTreeSet, HashMap};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::compute::{cast_with_options, CastOptions};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::datatypes::{DataType, Decimal128Type, Float64Type};
use datafusion::common::TableReference;
use datafusion::execution::context::{SessionConfig, SessionContext};
use datafusion::scalar::ScalarValue;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{
    Assignment, AssignmentTarget, ColumnOption, ConflictTarget, CreateTable, Delete, DoUpdate,
    Expr as SqlExpr, FromTable, GroupByExpr, Insert, ObjectName, ObjectType, OnConflictAction,
    OnInsert, Query, SelectItem, Set, SetExpr, Statement, TableConstraint, TableFactor,
    TableObject, TableWithJoins, TransactionIsolationLevel, TransactionMode, Update, Visit,
    Visitor,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use spheredb_client::{Client, Keyspace};
use spheredb_storage::keys::Datum;

use crate::as_of::{self, AsOf};
use crate::cancel::{self, CancelWatch, Canceler};
use crate::catalog::{self, ColumnDesc, TableDesc};
use crate::error::SqlError;
use crate::params;
use crate::returning;
use crate::row;
use crate::table::{SharedTxn, SphereTable};
use crate::types::SqlType;
use crate::upsert::{self, Conflict};

/// `statement_timeout` when the session sets none: 0, no limit (as PostgreSQL).
pub const DEFAULT_STATEMENT_TIMEOUT_MS: u64 = 0;
/// Most rows one `INSERT`, `UPDATE` or `DELETE` changes: a transaction's writes are buffered
/// in memory until commit.
pub const MAX_ROWS_PER_STATEMENT: usize = 100_000;

/// What a statement produced.
#[derive(Debug)]
pub enum Outcome {
    /// A result set.
    Rows {
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
    },
    /// The rows an INSERT, UPDATE or DELETE returned (`RETURNING`), with the statement's
    /// tag before its row count (`INSERT 0`, `UPDATE`, `DELETE`).
    Returned {
        tag: &'static str,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
    },
    /// A command and its tag (`INSERT 0 3`, `CREATE TABLE`).
    Command {
        tag: &'static str,
        rows: Option<usize>,
    },
    /// `BEGIN` started a transaction.
    Began,
    /// `COMMIT` or `ROLLBACK` ended one (`ROLLBACK` also answers `COMMIT` of a failed one).
    Ended { tag: &'static str },
}

impl Outcome {
    fn command(tag: &'static str) -> Outcome {
        Outcome::Command { tag, rows: None }
    }
    fn counted(tag: &'static str, rows: usize) -> Outcome {
        Outcome::Command {
            tag,
            rows: Some(rows),
        }
    }
}

/// What [`Session::describe`] tells of a statement.
#[derive(Debug, Default)]
pub struct Described {
    pub schema: Option<SchemaRef>,
    /// The type of `$1`, `$2`, ... where the plan fixes it.
    pub parameters: Vec<Option<datafusion::arrow::datatypes::DataType>>,
}

/// The state of the session's explicit transaction.
enum Block {
    /// No `BEGIN`: each statement is its own transaction.
    None,
    /// Between `BEGIN` and its end.
    Open(SharedTxn),
    /// A statement failed: everything but `ROLLBACK`/`COMMIT` is refused.
    Failed,
}

/// One connection's session.
pub struct Session {
    client: Client,
    /// DataFusion's context, reused by every statement (`context` swaps its tables).
    ctx: SessionContext,
    block: Block,
    statement_timeout_ms: u64,
    /// Settings a client set (`SET x = y`), shown back by `SHOW x`.
    settings: HashMap<String, String>,
    /// The last statement was a `COMMIT` that failed: the transaction is over (rolled back
    /// or, for `OutcomeUnknown`, of unknown outcome), as PostgreSQL ends it.
    commit_failed: bool,
    /// Cancel requests for the running statement, and the handle that sends them.
    cancels: CancelWatch,
    canceler: Canceler,
}

impl Session {
    pub fn new(client: Client) -> Session {
        let (canceler, cancels) = cancel::channel();
        Session {
            client,
            ctx: base_context(),
            block: Block::None,
            statement_timeout_ms: DEFAULT_STATEMENT_TIMEOUT_MS,
            settings: HashMap::new(),
            commit_failed: false,
            cancels,
            canceler,
        }
    }

    /// Cancels the statement running when it is called (see [`crate::cancel`]).
    pub fn canceler(&self) -> Canceler {
        self.canceler.clone()
    }

    /// Parses `sql` into statements.
    pub fn parse(sql: &str) -> Result<Vec<Statement>, SqlError> {
        Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|e| SqlError::syntax(e.to_string()))
    }

    /// Runs every statement of `sql` in order, stopping at the first error (as PostgreSQL's
    /// simple query protocol does). Outside `BEGIN`, several statements with no transaction
    /// control among them run as one transaction, as PostgreSQL runs them: all or nothing.
    pub async fn execute(&mut self, sql: &str) -> Vec<Result<Outcome, SqlError>> {
        self.commit_failed = false;
        self.cancels.arm();
        let parsed = as_of::split(sql).and_then(|(sql, as_of)| Ok((Session::parse(&sql)?, as_of)));
        let statements = match parsed {
            Ok((statements, None)) => statements,
            Ok((mut statements, Some(as_of))) if statements.len() == 1 => {
                return vec![self.run_armed(statements.remove(0), Some(as_of)).await];
            }
            Ok((_, Some(_))) => {
                self.fail();
                return vec![Err(SqlError::feature(
                    "AS OF SYSTEM TIME in a query string of several statements: send its \
                     statement alone",
                ))];
            }
            Err(e) => {
                self.fail();
                return vec![Err(e)];
            }
        };
        let implicit = statements.len() > 1
            && matches!(self.block, Block::None)
            && !statements.iter().any(|s| {
                matches!(
                    s,
                    Statement::StartTransaction { .. }
                        | Statement::Commit { .. }
                        | Statement::Rollback { .. }
                )
            });
        if implicit {
            if let Err(e) = self.begin(&[]).await {
                return vec![Err(e)];
            }
        }
        let mut out = Vec::with_capacity(statements.len());
        for statement in statements {
            let result = self.run(statement).await;
            let failed = result.is_err();
            out.push(result);
            if failed {
                break;
            }
        }
        if implicit {
            match self.block {
                Block::Open(_) => {
                    if let Err(e) = self.commit().await {
                        out.push(Err(e));
                    }
                    // Its end is not the client's to see: it never said BEGIN.
                    self.commit_failed = false;
                }
                // The failed statement rolled it back; the client never opened a block.
                Block::Failed | Block::None => self.block = Block::None,
            }
        }
        out
    }

    /// Runs one statement that came in a message of its own (the extended protocol's
    /// Execute), reading history when `as_of` names a time (`AS OF SYSTEM TIME`, cut out of
    /// its text by [`as_of::split`]). Cancel requests from now on stop it.
    pub async fn run_at(
        &mut self,
        statement: Statement,
        as_of: Option<AsOf>,
    ) -> Result<Outcome, SqlError> {
        self.cancels.arm();
        self.run_armed(statement, as_of).await
    }

    async fn run_armed(
        &mut self,
        statement: Statement,
        as_of: Option<AsOf>,
    ) -> Result<Outcome, SqlError> {
        let Some(as_of) = as_of else {
            return self.run(statement).await;
        };
        self.commit_failed = false;
        let result = self.run_as_of(statement, as_of).await;
        self.failing(result)
    }

    /// `BEGIN AS OF SYSTEM TIME` opens a read-only transaction at that time; a query with the
    /// clause runs in one of its own. Other statements cannot read history.
    async fn run_as_of(&mut self, statement: Statement, as_of: AsOf) -> Result<Outcome, SqlError> {
        let begins = match &statement {
            Statement::StartTransaction { modes, .. } => {
                refuse_serializable(modes)?;
                true
            }
            Statement::Query(_) | Statement::Explain { .. } => false,
            _ => {
                return Err(SqlError::feature(
                    "AS OF SYSTEM TIME applies to SELECT and BEGIN only",
                ))
            }
        };
        match self.block {
            Block::None => {}
            Block::Failed => return Err(SqlError::in_failed_transaction()),
            Block::Open(_) => return Err(as_of_inside_transaction()),
        }
        let txn = self.historical(as_of)?;
        if begins {
            self.block = Block::Open(txn);
            return Ok(Outcome::Began);
        }
        self.run_with(statement, txn, true).await
    }

    /// A read-only transaction at the time `as_of` names.
    fn historical(&self, as_of: AsOf) -> Result<SharedTxn, SqlError> {
        let ts = as_of.timestamp(as_of::now_unix_ms())?;
        Ok(Arc::new(tokio::sync::Mutex::new(self.client.begin_at(ts)?)))
    }

    /// Runs one statement.
    pub async fn run(&mut self, statement: Statement) -> Result<Outcome, SqlError> {
        self.commit_failed = false;
        match statement {
            Statement::StartTransaction { modes, .. } => {
                let result = self.begin(&modes).await;
                self.failing(result)
            }
            Statement::Commit { chain: true, .. } | Statement::Rollback { chain: true, .. } => {
                self.failing(Err(SqlError::feature("AND CHAIN is not supported")))
            }
            Statement::Commit { .. } => self.commit().await,
            Statement::Rollback { savepoint, .. } => {
                if savepoint.is_some() {
                    return self.failing(Err(SqlError::feature("savepoints are not supported")));
                }
                self.rollback().await
            }
            statement => {
                if matches!(self.block, Block::Failed) {
                    return Err(SqlError::in_failed_transaction());
                }
                let result = self.run_in_transaction(statement).await;
                self.failing(result)
            }
        }
    }

    /// Marks the explicit transaction failed when `result` is an error.
    fn failing<T>(&mut self, result: Result<T, SqlError>) -> Result<T, SqlError> {
        if result.is_err() {
            self.fail();
        }
        result
    }

    /// A statement failed: an explicit transaction is failed until `ROLLBACK`; outside one
    /// nothing changes. The wire protocol calls it for errors it finds itself (binding
    /// parameters, describing, sending rows).
    pub fn fail(&mut self) {
        match std::mem::replace(&mut self.block, Block::None) {
            Block::None => {}
            Block::Failed => self.block = Block::Failed,
            Block::Open(txn) => {
                self.block = Block::Failed;
                // Its locks go now rather than at ROLLBACK.
                tokio::spawn(async move {
                    if let Err(e) = txn.lock().await.rollback().await {
                        tracing::warn!(error = %e, "rolling back a failed transaction");
                    }
                });
            }
        }
    }

    async fn begin(&mut self, modes: &[TransactionMode]) -> Result<Outcome, SqlError> {
        refuse_serializable(modes)?;
        match self.block {
            // PostgreSQL warns and goes on in the open transaction.
            Block::Open(_) => Ok(Outcome::Began),
            Block::Failed => Err(SqlError::in_failed_transaction()),
            Block::None => {
                let txn = self.client.begin().await?;
                self.block = Block::Open(Arc::new(tokio::sync::Mutex::new(txn)));
                Ok(Outcome::Began)
            }
        }
    }

    async fn commit(&mut self) -> Result<Outcome, SqlError> {
        match std::mem::replace(&mut self.block, Block::None) {
            Block::None => Ok(Outcome::Ended { tag: "COMMIT" }),
            Block::Failed => Ok(Outcome::Ended { tag: "ROLLBACK" }),
            Block::Open(txn) => {
                let result = txn.lock().await.commit().await;
                self.commit_failed = result.is_err();
                result?;
                Ok(Outcome::Ended { tag: "COMMIT" })
            }
        }
    }

    /// Whether the last statement was a `COMMIT` that failed, which ended its transaction.
    pub fn commit_failed(&self) -> bool {
        self.commit_failed
    }

    async fn rollback(&mut self) -> Result<Outcome, SqlError> {
        if let Block::Open(txn) = std::mem::replace(&mut self.block, Block::None) {
            // The transaction is over either way: locks left behind expire with their TTL.
            if let Err(e) = txn.lock().await.rollback().await {
                tracing::warn!(error = %e, "rolling back a transaction");
            }
        }
        Ok(Outcome::Ended { tag: "ROLLBACK" })
    }

    /// Runs `statement` in the explicit transaction, or in one of its own.
    async fn run_in_transaction(&mut self, statement: Statement) -> Result<Outcome, SqlError> {
        if let Some(outcome) = self.session_statement(&statement)? {
            return Ok(outcome);
        }
        let (txn, own) = match &self.block {
            Block::Open(txn) => (txn.clone(), false),
            _ => (
                Arc::new(tokio::sync::Mutex::new(self.client.begin().await?)),
                true,
            ),
        };
        self.run_with(statement, txn, own).await
    }

    /// Runs `statement` in `txn`, which it ends when it is the statement's `own`.
    async fn run_with(
        &mut self,
        statement: Statement,
        txn: SharedTxn,
        own: bool,
    ) -> Result<Outcome, SqlError> {
        if let Some(what) = writes(&statement) {
            if txn.lock().await.is_read_only() {
                return Err(SqlError::new(
                    "25006",
                    format!(
                        "cannot execute {what} in a read-only transaction (it reads history \
                         AS OF SYSTEM TIME)"
                    ),
                ));
            }
        }
        let timeout_ms = self.statement_timeout_ms;
        let canceled = self.cancels.canceled();
        let work = run_statement(statement, &self.ctx, txn.clone());
        // A statement stopped by its timeout or a cancel request fails: its own transaction
        // rolls back below, an explicit one is failed until ROLLBACK, so none of its writes
        // are ever committed. The commit after it is never interrupted.
        let limited = async {
            if timeout_ms == 0 {
                return work.await;
            }
            match tokio::time::timeout(Duration::from_millis(timeout_ms), work).await {
                Ok(r) => r,
                Err(_) => Err(SqlError::canceled(format!(
                    "canceling statement due to statement timeout ({timeout_ms} ms)"
                ))),
            }
        };
        let result = tokio::select! {
            result = limited => result,
            () = canceled => Err(SqlError::canceled("canceling statement due to user request")),
        };
        if own {
            let mut txn = txn.lock().await;
            match &result {
                Ok(_) => txn.commit().await?,
                Err(_) => {
                    if let Err(e) = txn.rollback().await {
                        tracing::warn!(error = %e, "rolling back a failed statement");
                    }
                }
            }
        }
        result
    }

    /// What a statement would return, without running it: its result columns (`None` for a
    /// statement that returns no rows) and the types of its `$n` parameters where the plan
    /// fixes them. A statement that reads history (`as_of`) is planned over the catalog of
    /// that time.
    pub async fn describe(
        &mut self,
        statement: Statement,
        as_of: Option<AsOf>,
    ) -> Result<Described, SqlError> {
        let result = self.describe_statement(statement, as_of).await;
        self.failing(result)
    }

    async fn describe_statement(
        &mut self,
        statement: Statement,
        as_of: Option<AsOf>,
    ) -> Result<Described, SqlError> {
        let changes_rows = matches!(
            statement,
            Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_)
        );
        match statement {
            Statement::Query(_) | Statement::Explain { .. } => {}
            _ if changes_rows => {}
            Statement::ShowVariable { .. } => {
                return Ok(Described {
                    schema: Some(Arc::new(datafusion::arrow::datatypes::Schema::new(vec![
                        datafusion::arrow::datatypes::Field::new(
                            "setting",
                            datafusion::arrow::datatypes::DataType::Utf8,
                            false,
                        ),
                    ]))),
                    parameters: Vec::new(),
                })
            }
            _ => return Ok(Described::default()),
        }
        let txn = match (&self.block, as_of) {
            (Block::Failed, _) => return Err(SqlError::in_failed_transaction()),
            // As its execution would be.
            (Block::Open(_), Some(_)) => return Err(as_of_inside_transaction()),
            // Planning reads the catalog only; the transaction has nothing to commit.
            (Block::None, Some(as_of)) => self.historical(as_of)?,
            (Block::Open(txn), None) => txn.clone(),
            (Block::None, None) => Arc::new(tokio::sync::Mutex::new(self.client.begin().await?)),
        };
        let (ctx, descs) = context(&self.ctx, &txn).await?;
        if changes_rows {
            // DataFusion does not plan these: their parameters' types come from the text
            // and the changed table's columns.
            let (name, qualifier) = changed_table(&statement)?;
            let desc = target(&descs, name)?;
            let qualifier = qualifier.unwrap_or_else(|| desc.name.clone());
            let fixed = params::fixed_types(&statement, Some((desc, &qualifier)));
            let schema = match returning_list(&statement) {
                Some(items) => Some(
                    returning::project(&ctx, desc, &qualifier, items, Vec::new())
                        .await?
                        .0,
                ),
                None => None,
            };
            return Ok(Described {
                schema,
                parameters: numbered(fixed, &HashMap::new()),
            });
        }
        let fixed = params::fixed_types(&statement, None);
        let plan = ctx
            .state()
            .statement_to_plan(DfStatement::Statement(Box::new(statement)))
            .await?;
        let planned = plan.get_parameter_types()?;
        Ok(Described {
            schema: Some(Arc::new(plan.schema().as_arrow().clone())),
            parameters: numbered(fixed, &planned),
        })
    }

    /// `SET` and `SHOW`: the session's own settings, no transaction needed.
    fn session_statement(&mut self, statement: &Statement) -> Result<Option<Outcome>, SqlError> {
        match statement {
            Statement::Set(Set::SingleAssignment {
                variable, values, ..
            }) => {
                let name = variable.to_string().to_ascii_lowercase();
                let value = values
                    .iter()
                    .map(|v| match v {
                        SqlExpr::Value(v) => v.to_string().trim_matches('\'').to_string(),
                        other => other.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                if name == "statement_timeout" {
                    self.statement_timeout_ms = parse_timeout_ms(&value)?;
                }
                let isolation =
                    name == "transaction_isolation" || name == "default_transaction_isolation";
                if isolation && value.eq_ignore_ascii_case("serializable") {
                    return Err(SqlError::feature(
                        "SERIALIZABLE is not supported: SphereDB transactions are snapshot \
                         isolation",
                    ));
                }
                self.settings.insert(name, value);
                Ok(Some(Outcome::command("SET")))
            }
            Statement::Set(Set::SetTransaction { modes, .. }) => {
                refuse_serializable(modes)?;
                Ok(Some(Outcome::command("SET")))
            }
            Statement::Set(_) => Ok(Some(Outcome::command("SET"))),
            Statement::ShowVariable { variable } => {
                let name = variable
                    .iter()
                    .map(|i| i.value.to_ascii_lowercase())
                    .collect::<Vec<_>>()
                    .join(" ");
                let value = match name.as_str() {
                    "statement_timeout" => format!("{}ms", self.statement_timeout_ms),
                    "transaction isolation level" | "transaction_isolation" => {
                        "repeatable read".into()
                    }
                    "server_version" => crate::SERVER_VERSION.into(),
                    other => self.settings.get(other).cloned().ok_or_else(|| {
                        SqlError::new(
                            "42704",
                            format!("unrecognized configuration parameter \"{other}\""),
                        )
                    })?,
                };
                let schema = Arc::new(datafusion::arrow::datatypes::Schema::new(vec![
                    datafusion::arrow::datatypes::Field::new(
                        name.replace(' ', "_"),
                        datafusion::arrow::datatypes::DataType::Utf8,
                        false,
                    ),
                ]));
                let batch =
                    crate::table::batch_of(&schema, vec![vec![ScalarValue::Utf8(Some(value))]])?;
                Ok(Some(Outcome::Rows {
                    schema,
                    batches: vec![batch],
                }))
            }
            _ => Ok(None),
        }
    }
}

fn as_of_inside_transaction() -> SqlError {
    SqlError::new(
        "25001",
        "AS OF SYSTEM TIME inside a transaction: the transaction reads at one time; begin it \
         with BEGIN AS OF SYSTEM TIME",
    )
}

/// The name of a statement that writes (rows or the catalog), for a read-only transaction's
/// refusal; queries that lock (`FOR UPDATE`) are refused by the transaction itself.
fn writes(statement: &Statement) -> Option<&'static str> {
    match statement {
        Statement::Insert(_) => Some("INSERT"),
        Statement::Update(_) => Some("UPDATE"),
        Statement::Delete(_) => Some("DELETE"),
        Statement::CreateTable(_) => Some("CREATE TABLE"),
        Statement::Drop { .. } => Some("DROP"),
        _ => None,
    }
}

/// Refuses `SERIALIZABLE` rather than give snapshot isolation, which allows write skew;
/// weaker levels get snapshot isolation, which is at least as strong.
fn refuse_serializable(modes: &[TransactionMode]) -> Result<(), SqlError> {
    for mode in modes {
        if let TransactionMode::IsolationLevel(TransactionIsolationLevel::Serializable) = mode {
            return Err(SqlError::feature(
                "SERIALIZABLE is not supported: SphereDB transactions are snapshot isolation \
                 (ask for REPEATABLE READ); SELECT ... FOR UPDATE locks the rows a \
                 transaction must keep unchanged",
            ));
        }
    }
    Ok(())
}

/// `statement_timeout` values: a number of milliseconds or a number with a unit.
fn parse_timeout_ms(value: &str) -> Result<u64, SqlError> {
    let v = value.trim().trim_matches('\'').to_ascii_lowercase();
    let (digits, unit_ms) = if let Some(d) = v.strip_suffix("ms") {
        (d, 1)
    } else if let Some(d) = v.strip_suffix("min") {
        (d, 60_000)
    } else if let Some(d) = v.strip_suffix('s') {
        (d, 1_000)
    } else {
        (v.as_str(), 1)
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_ms))
        .ok_or_else(|| {
            SqlError::invalid(format!(
                "invalid value for statement_timeout: {value:?} (milliseconds, or e.g. '5s')"
            ))
        })
}

/// A session's DataFusion context, built once per connection: building one (configuration,
/// every function, every optimizer rule) costs more than planning a point query.
fn base_context() -> SessionContext {
    // One partition: statements read rows one scan at a time anyway (scans do not stream
    // yet), and plans keep their input's order, which RETURNING's answers rely on.
    let config = SessionConfig::new()
        .with_target_partitions(1)
        .with_information_schema(true)
        .set_str("datafusion.sql_parser.dialect", "PostgreSQL");
    let ctx = SessionContext::new_with_config(config);
    let uuid = datafusion::functions::string::uuid();
    ctx.register_udf(uuid.as_ref().clone().with_aliases(["gen_random_uuid"]));
    ctx
}

/// The session's context with the catalog's tables, read in `txn`, as its only tables: the
/// previous statement's tables (bound to its transaction) and the rows RETURNING or ON
/// CONFLICT registered are gone.
async fn context(
    base: &SessionContext,
    txn: &SharedTxn,
) -> Result<(SessionContext, Vec<Arc<TableDesc>>), SqlError> {
    let tables = catalog::load_tables(&mut *txn.lock().await).await?;
    // Through the lock, not `state()`, which clones the whole state (every function).
    let schema = base
        .state_ref()
        .read()
        .schema_for_ref(TableReference::bare("any"))?;
    for name in schema.table_names() {
        schema.deregister_table(&name)?;
    }
    let mut descs = Vec::with_capacity(tables.len());
    for desc in tables {
        let desc = Arc::new(desc);
        // Bare: the catalog's name as stored, never parsed again (a quoted "a.b" or "Posts"
        // is one name).
        base.register_table(
            TableReference::bare(desc.name.clone()),
            Arc::new(SphereTable::new(desc.clone(), txn.clone())),
        )?;
        descs.push(desc);
    }
    Ok((base.clone(), descs))
}

/// Plans and runs a query, collecting its result.
async fn query(
    ctx: &SessionContext,
    statement: Statement,
) -> Result<(SchemaRef, Vec<RecordBatch>), SqlError> {
    let plan = ctx
        .state()
        .statement_to_plan(DfStatement::Statement(Box::new(statement)))
        .await?;
    let frame = ctx.execute_logical_plan(plan).await?;
    let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
    let batches = frame.collect().await?;
    Ok((schema, batches))
}

pub(crate) async fn query_text(
    ctx: &SessionContext,
    sql: &str,
) -> Result<(SchemaRef, Vec<RecordBatch>), SqlError> {
    let mut statements = Session::parse(sql)?;
    if statements.len() != 1 {
        return Err(SqlError::internal(format!(
            "built query {sql:?} is not one statement"
        )));
    }
    query(ctx, statements.remove(0)).await
}

/// Runs one statement (not a transaction-control one) in `txn`.
async fn run_statement(
    statement: Statement,
    base: &SessionContext,
    txn: SharedTxn,
) -> Result<Outcome, SqlError> {
    match statement {
        Statement::Query(mut q) => {
            check_locks(&q)?;
            let (ctx, descs) = context(base, &txn).await?;
            if !q.locks.is_empty() {
                lock_rows(&ctx, &descs, &q, &txn).await?;
                q.locks.clear();
            }
            let (schema, batches) = query(&ctx, Statement::Query(q)).await?;
            Ok(Outcome::Rows { schema, batches })
        }
        Statement::Explain {
            statement: ref explained,
            ..
        } => {
            if !matches!(explained.as_ref(), Statement::Query(_)) {
                return Err(SqlError::feature(
                    "EXPLAIN is supported for queries only (it never runs INSERT, UPDATE or \
                     DELETE)",
                ));
            }
            let (ctx, _) = context(base, &txn).await?;
            // The EXPLAIN itself: its answer is the plan, not the query's rows.
            let (schema, batches) = query(&ctx, statement.clone()).await?;
            Ok(Outcome::Rows { schema, batches })
        }
        Statement::CreateTable(create) => create_table(create, &txn).await,
        Statement::Drop {
            object_type,
            if_exists,
            names,
            ..
        } => {
            if object_type != ObjectType::Table {
                return Err(SqlError::feature(format!(
                    "DROP {object_type} is not supported"
                )));
            }
            let mut txn = txn.lock().await;
            for name in &names {
                let name = table_name(name)?;
                if !catalog::drop_table(&mut txn, &name).await? && !if_exists {
                    return Err(SqlError::undefined_table(&name));
                }
            }
            Ok(Outcome::command("DROP TABLE"))
        }
        Statement::Insert(insert) => insert_rows(insert, base, &txn).await,
        Statement::Update(update) => update_rows(update, base, &txn).await,
        Statement::Delete(delete) => delete_rows(delete, base, &txn).await,
        other => Err(SqlError::feature(format!(
            "statement not supported: {}",
            first_words(&other.to_string())
        ))),
    }
}

/// Where `FOR UPDATE` may stand: on the top-level query only, without WITH, ORDER BY,
/// LIMIT or OFFSET (whose rows a second run might pick differently), NOWAIT, SKIP LOCKED or
/// OF. Anything else is refused rather than run without the locks it asks for.
fn check_locks(top: &Query) -> Result<(), SqlError> {
    struct Nested(bool);
    impl Visitor for Nested {
        type Break = ();
        fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
            if query.locks.is_empty() {
                return ControlFlow::Continue(());
            }
            self.0 = true;
            ControlFlow::Break(())
        }
    }
    let mut inner = top.clone();
    inner.locks.clear();
    let mut nested = Nested(false);
    let _ = inner.visit(&mut nested);
    if nested.0 {
        return Err(SqlError::feature(
            "FOR UPDATE is supported on the outermost SELECT only",
        ));
    }
    if top.locks.is_empty() {
        return Ok(());
    }
    if top.with.is_some()
        || top.order_by.is_some()
        || top.limit_clause.is_some()
        || top.fetch.is_some()
    {
        return Err(SqlError::feature(
            "SELECT ... FOR UPDATE with WITH, ORDER BY, LIMIT or OFFSET is not supported; \
             lock the rows by key (WHERE) and order them afterwards",
        ));
    }
    if top
        .locks
        .iter()
        .any(|l| l.of.is_some() || l.nonblock.is_some())
    {
        return Err(SqlError::feature(
            "FOR UPDATE OF, NOWAIT and SKIP LOCKED are not supported",
        ));
    }
    Ok(())
}

/// `SELECT ... FOR UPDATE` (or `FOR SHARE`, taken as `FOR UPDATE`): locks the rows of the
/// query's one table that its WHERE, ORDER BY and LIMIT select, before the query reads them.
/// A locked row cannot be written by another transaction until this one ends, and a row
/// written by another since this transaction began fails the lock at once with 40001.
async fn lock_rows(
    ctx: &SessionContext,
    descs: &[Arc<TableDesc>],
    query_with_locks: &Query,
    txn: &SharedTxn,
) -> Result<(), SqlError> {
    let unsupported = || {
        SqlError::feature(
            "SELECT ... FOR UPDATE is supported on queries of one table without GROUP BY, \
             HAVING or DISTINCT",
        )
    };
    let mut keys_query = query_with_locks.clone();
    keys_query.locks.clear();
    let SetExpr::Select(select) = keys_query.body.as_mut() else {
        return Err(unsupported());
    };
    let plain = select.from.len() == 1
        && select.having.is_none()
        && select.distinct.is_none()
        && matches!(&select.group_by, GroupByExpr::Expressions(e, _) if e.is_empty());
    if !plain {
        return Err(unsupported());
    }
    let (name, _, _) = single_table(&select.from[0])?;
    let desc = target(descs, name)?.clone();
    let qualifier = match &select.from[0].relation {
        TableFactor::Table {
            alias: Some(alias), ..
        } => format!("{}.", quoted(&column_name(&alias.name))),
        _ => String::new(),
    };
    let keys = desc.key_positions();
    select.projection = keys
        .iter()
        .map(|p| {
            parse_expr(&format!("{qualifier}{}", quoted(&desc.columns[*p].name)))
                .map(SelectItem::UnnamedExpr)
        })
        .collect::<Result<_, _>>()?;
    let (_, batches) = query(ctx, Statement::Query(Box::new(keys_query))).await?;
    let mut txn = txn.lock().await;
    let mut locked = 0usize;
    for batch in batches {
        locked += batch.num_rows();
        if locked > MAX_ROWS_PER_STATEMENT {
            return Err(too_many_rows());
        }
        let columns = cast_to_columns(&desc, &keys, batch.columns())?;
        for r in 0..batch.num_rows() {
            let pk = key_of(&desc, &keys, &columns, r)?;
            let sphere = sphere_of(&pk)?;
            txn.lock_in(Keyspace::Sql, sphere, &desc.row_key(&pk))
                .await?;
        }
    }
    Ok(())
}

/// The primary key of row `r` of `columns` (the key columns, cast to their types).
fn key_of(
    desc: &TableDesc,
    keys: &[usize],
    columns: &[ArrayRef],
    r: usize,
) -> Result<Vec<Datum>, SqlError> {
    keys.iter()
        .zip(columns)
        .map(|(p, array)| {
            let column = &desc.columns[*p];
            column
                .ty
                .datum(&column.name, &ScalarValue::try_from_array(array, r)?)
        })
        .collect()
}

/// The sphere of a primary key (its first column).
fn sphere_of(pk: &[Datum]) -> Result<u64, SqlError> {
    match pk.first() {
        Some(Datum::Int(s)) if *s >= 0 => Ok(*s as u64),
        _ => Err(SqlError::internal(format!(
            "a row key without sphere_id: {pk:?}"
        ))),
    }
}

/// One expression parsed from text this module writes.
fn parse_expr(text: &str) -> Result<SqlExpr, SqlError> {
    let dialect = PostgreSqlDialect {};
    Parser::new(&dialect)
        .try_with_sql(text)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| SqlError::internal(format!("expression {text:?}: {e}")))
}

/// The first words of a statement, for messages.
fn first_words(sql: &str) -> String {
    sql.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// A table name as the catalog keys it: unqualified (or `public.`), as written for quoted
/// names, lower case otherwise.
fn table_name(name: &ObjectName) -> Result<String, SqlError> {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|p| match p.as_ident() {
            Some(ident) if ident.quote_style.is_some() => Ok(ident.value.clone()),
            Some(ident) => Ok(ident.value.to_ascii_lowercase()),
            None => Err(SqlError::syntax(format!("bad table name {name}"))),
        })
        .collect::<Result<_, _>>()?;
    match parts.as_slice() {
        [table] => Ok(table.clone()),
        [schema, table] if schema == "public" => Ok(table.clone()),
        _ => Err(SqlError::feature(format!(
            "table name {name}: only the public schema holds tables"
        ))),
    }
}

pub(crate) fn column_name(ident: &datafusion::sql::sqlparser::ast::Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_ascii_lowercase()
    }
}

/// `"name"`, quoted for SQL text.
pub(crate) fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn create_table(create: CreateTable, txn: &SharedTxn) -> Result<Outcome, SqlError> {
    if create.query.is_some() {
        return Err(SqlError::feature("CREATE TABLE ... AS is not supported"));
    }
    let name = table_name(&create.name)?;
    let mut columns = Vec::with_capacity(create.columns.len());
    let mut primary_key: Vec<String> = Vec::new();
    for (i, def) in create.columns.iter().enumerate() {
        let column = column_name(&def.name);
        let mut desc = ColumnDesc {
            id: i as u32 + 1,
            name: column.clone(),
            ty: SqlType::parse(&def.data_type.to_string())?,
            nullable: true,
            default: None,
        };
        for option in &def.options {
            match &option.option {
                ColumnOption::Null => {}
                ColumnOption::NotNull => desc.nullable = false,
                ColumnOption::Default(expr) => desc.default = Some(expr.to_string()),
                ColumnOption::PrimaryKey(_) => {
                    if !primary_key.is_empty() {
                        return Err(SqlError::invalid_table(format!(
                            "multiple primary keys for table \"{name}\" are not allowed"
                        )));
                    }
                    primary_key.push(column.clone());
                }
                other => {
                    return Err(SqlError::feature(format!(
                        "column option {other} is not supported"
                    )))
                }
            }
        }
        columns.push(desc);
    }
    for constraint in &create.constraints {
        match constraint {
            TableConstraint::PrimaryKey(pk) => {
                if !primary_key.is_empty() {
                    return Err(SqlError::invalid_table(format!(
                        "multiple primary keys for table \"{name}\" are not allowed"
                    )));
                }
                for c in &pk.columns {
                    match &c.column.expr {
                        SqlExpr::Identifier(ident) => primary_key.push(column_name(ident)),
                        other => {
                            return Err(SqlError::syntax(format!(
                                "primary-key column {other} is not a column name"
                            )))
                        }
                    }
                }
            }
            other => {
                return Err(SqlError::feature(format!(
                    "table constraint {other} is not supported (only PRIMARY KEY)"
                )))
            }
        }
    }
    let mut key_ids = Vec::with_capacity(primary_key.len());
    for key in &primary_key {
        let Some(c) = columns.iter_mut().find(|c| &c.name == key) else {
            return Err(SqlError::undefined_column(&name, key));
        };
        c.nullable = false;
        key_ids.push(c.id);
    }
    let desc = TableDesc {
        id: 0,
        name: name.clone(),
        next_column_id: columns.len() as u32 + 1,
        columns,
        primary_key: key_ids,
    };
    desc.validate()?;
    let mut txn = txn.lock().await;
    if create.if_not_exists && catalog::table(&mut txn, &name).await?.is_some() {
        return Ok(Outcome::command("CREATE TABLE"));
    }
    catalog::create_table(&mut txn, desc).await?;
    Ok(Outcome::command("CREATE TABLE"))
}

/// The table a DML statement names, from the statement's catalog.
fn target<'d>(
    descs: &'d [Arc<TableDesc>],
    name: &ObjectName,
) -> Result<&'d Arc<TableDesc>, SqlError> {
    let name = table_name(name)?;
    descs
        .iter()
        .find(|d| d.name == name)
        .ok_or_else(|| SqlError::undefined_table(&name))
}

/// The one table of an `UPDATE` or `DELETE`: its name, the relation as written (with its
/// alias) and the name its rows go by (the alias, or the table's).
fn single_table(from: &TableWithJoins) -> Result<(&ObjectName, String, String), SqlError> {
    if !from.joins.is_empty() {
        return Err(SqlError::feature(
            "joins in UPDATE or DELETE are not supported; use a subquery in WHERE",
        ));
    }
    match &from.relation {
        TableFactor::Table { name, alias, .. } => {
            let (relation, qualifier) = match alias {
                Some(a) if !a.columns.is_empty() || a.at.is_some() => {
                    return Err(SqlError::feature(format!(
                        "column aliases on the changed table ({a}) are not supported"
                    )))
                }
                // The alias's name only: its own Display may already hold `AS`.
                Some(a) => (format!("{name} AS {}", a.name), column_name(&a.name)),
                None => (name.to_string(), table_name(name)?),
            };
            Ok((name, relation, qualifier))
        }
        other => Err(SqlError::feature(format!("cannot change rows of {other}"))),
    }
}

/// Casts every column of `batch` to the table columns at `positions`.
pub(crate) fn cast_to_columns(
    desc: &TableDesc,
    positions: &[usize],
    columns: &[ArrayRef],
) -> Result<Vec<ArrayRef>, SqlError> {
    let options = CastOptions {
        safe: false,
        ..Default::default()
    };
    positions
        .iter()
        .zip(columns)
        .map(|(p, array)| {
            let column = &desc.columns[*p];
            let target = column.ty.arrow();
            // Arrow truncates fractions into integers; PostgreSQL rounds (half away from 0).
            let rounded: ArrayRef;
            let array = match array.data_type() {
                // Half away from zero, as PostgreSQL rounds numeric literals such as 2.5
                // (DataFusion types those as floats).
                DataType::Float32 | DataType::Float64 if target.is_integer() => {
                    let floats = cast_with_options(array, &DataType::Float64, &options)
                        .map_err(|e| SqlError::new("22003", e.to_string()))?;
                    rounded = Arc::new(
                        floats
                            .as_primitive::<Float64Type>()
                            .unary::<_, Float64Type>(f64::round),
                    );
                    &rounded
                }
                // Decimals round half away from zero, in exact integer arithmetic.
                DataType::Decimal128(precision, scale) if target.is_integer() && *scale > 0 => {
                    let unit = 10i128.pow(*scale as u32);
                    let whole = array
                        .as_primitive::<Decimal128Type>()
                        .unary::<_, Decimal128Type>(|v| (v + v.signum() * (unit / 2)) / unit)
                        .with_precision_and_scale(*precision, 0)
                        .map_err(|e| SqlError::new("22003", e.to_string()))?;
                    rounded = Arc::new(whole);
                    &rounded
                }
                _ => array,
            };
            cast_with_options(array, &target, &options).map_err(|e| {
                SqlError::new(
                    "42804",
                    format!(
                        "column \"{}\" is of type {} but the value is {}: {e}",
                        column.name,
                        column.ty.name(),
                        array.data_type()
                    ),
                )
            })
        })
        .collect()
}

/// Parameter types by position: those the text fixes, else those the plan inferred (keyed
/// `$n`), as many as the highest number either knows.
fn numbered(
    fixed: HashMap<usize, DataType>,
    planned: &HashMap<String, Option<DataType>>,
) -> Vec<Option<DataType>> {
    // Bounded: a `$4000000000` must not size an allocation (the wire layer refuses it).
    let highest = planned
        .keys()
        .filter_map(|k| k.strip_prefix('$')?.parse::<usize>().ok())
        .chain(fixed.keys().copied())
        .max()
        .unwrap_or(0)
        .min(crate::pg::MAX_PARAMETERS);
    (1..=highest)
        .map(|n| {
            fixed
                .get(&n)
                .cloned()
                .or_else(|| planned.get(&format!("${n}")).cloned().flatten())
        })
        .collect()
}

/// The table an INSERT, UPDATE or DELETE changes, and the name its rows go by when the
/// statement gives it an alias.
fn changed_table(statement: &Statement) -> Result<(&ObjectName, Option<String>), SqlError> {
    match statement {
        Statement::Insert(insert) => match &insert.table {
            TableObject::TableName(name) => Ok((
                name,
                insert.table_alias.as_ref().map(|a| column_name(&a.alias)),
            )),
            _ => Err(SqlError::feature(
                "INSERT INTO a table function is not supported",
            )),
        },
        Statement::Update(update) => {
            let (name, _, qualifier) = single_table(&update.table)?;
            Ok((name, Some(qualifier)))
        }
        Statement::Delete(delete) => {
            let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = &delete.from;
            match from.as_slice() {
                [table] => {
                    let (name, _, qualifier) = single_table(table)?;
                    Ok((name, Some(qualifier)))
                }
                _ => Err(SqlError::feature(
                    "DELETE from several tables is not supported",
                )),
            }
        }
        other => Err(SqlError::internal(format!(
            "{} changes no table",
            first_words(&other.to_string())
        ))),
    }
}

/// The RETURNING list of an INSERT, UPDATE or DELETE.
fn returning_list(statement: &Statement) -> Option<&[SelectItem]> {
    match statement {
        Statement::Insert(insert) => insert.returning.as_deref(),
        Statement::Update(update) => update.returning.as_deref(),
        Statement::Delete(delete) => delete.returning.as_deref(),
        _ => None,
    }
}

/// Checks a full row and returns its sphere and primary key.
fn check_row(desc: &TableDesc, values: &mut [ScalarValue]) -> Result<(u64, Vec<Datum>), SqlError> {
    for (column, value) in desc.columns.iter().zip(values.iter_mut()) {
        // UUIDs are stored in one spelling, so text comparisons find them.
        if let (SqlType::Uuid, ScalarValue::Utf8(Some(text))) = (column.ty, &mut *value) {
            *text = text.to_ascii_lowercase();
        }
        if value.is_null() && !column.nullable {
            return Err(SqlError::not_null(format!(
                "null value in column \"{}\" of relation \"{}\" violates not-null constraint",
                column.name, desc.name
            )));
        }
        column.ty.check(&column.name, value)?;
    }
    let mut pk = Vec::with_capacity(desc.primary_key.len());
    for position in desc.key_positions() {
        let column = &desc.columns[position];
        pk.push(column.ty.datum(&column.name, &values[position])?);
    }
    let sphere = match pk.first() {
        Some(Datum::Int(s)) if *s >= 0 => *s as u64,
        _ => {
            return Err(SqlError::invalid(format!(
                "sphere_id of a row of {} must be a non-negative integer",
                desc.name
            )))
        }
    };
    Ok((sphere, pk))
}

fn too_many_rows() -> SqlError {
    SqlError::new(
        "54000",
        format!(
            "a statement changes at most {MAX_ROWS_PER_STATEMENT} rows; split it (e.g. by \
             sphere_id)"
        ),
    )
}

async fn insert_rows(
    insert: Insert,
    base: &SessionContext,
    txn: &SharedTxn,
) -> Result<Outcome, SqlError> {
    let on_conflict = match &insert.on {
        None => OnConflict::Refuse,
        Some(OnInsert::OnConflict(c)) => match &c.action {
            OnConflictAction::DoNothing => OnConflict::Skip,
            OnConflictAction::DoUpdate(update) => OnConflict::Update(Box::new(update.clone())),
        },
        Some(_) => {
            return Err(SqlError::feature(
                "ON DUPLICATE KEY UPDATE is not supported",
            ))
        }
    };
    let TableObject::TableName(name) = &insert.table else {
        return Err(SqlError::feature(
            "INSERT INTO a table function is not supported",
        ));
    };
    let (ctx, descs) = context(base, txn).await?;
    let desc = target(&descs, name)?.clone();
    let qualifier = insert_qualifier(&insert, &desc);
    if let Some(OnInsert::OnConflict(c)) = &insert.on {
        check_conflict_target(&desc, c.conflict_target.as_ref())?;
        if let OnConflict::Update(update) = &on_conflict {
            if c.conflict_target.is_none() {
                return Err(SqlError::syntax(
                    "ON CONFLICT DO UPDATE requires inference specification or constraint \
                     name; name the primary key: ON CONFLICT (sphere_id, ...)",
                ));
            }
            // Refused before any row is written: key columns, unknown columns, repeats.
            upsert::assignments(&desc, update)?;
        }
    }
    let targets: Vec<usize> = if insert.columns.is_empty() {
        (0..desc.columns.len()).collect()
    } else {
        insert
            .columns
            .iter()
            .map(|c| {
                let name = c.to_string().trim_matches('"').to_string();
                let name = if c.to_string().starts_with('"') {
                    name
                } else {
                    name.to_ascii_lowercase()
                };
                desc.position(&name)
                    .ok_or_else(|| SqlError::undefined_column(&desc.name, &name))
            })
            .collect::<Result<_, _>>()?
    };
    for (i, t) in targets.iter().enumerate() {
        if targets[..i].contains(t) {
            return Err(SqlError::new(
                "42701",
                format!(
                    "column \"{}\" specified more than once",
                    desc.columns[*t].name
                ),
            ));
        }
    }
    let Some(source) = insert.source else {
        return Err(SqlError::feature(
            "INSERT ... DEFAULT VALUES is not supported yet",
        ));
    };
    let (_, batches) = query(&ctx, Statement::Query(source)).await?;
    let mut rows_done = 0usize;
    let mut written: BTreeSet<(u64, Vec<u8>)> = BTreeSet::new();
    let mut spheres: BTreeSet<u64> = BTreeSet::new();
    // Rows found taken under DO UPDATE: their new values come from one query at the end.
    let mut conflicts: Vec<Conflict> = Vec::new();
    // What the statement writes, in input order. Nothing is written until every value (DO
    // UPDATE's, RETURNING's) is computed: the statement's subqueries see the rows as they
    // were before it, as in PostgreSQL.
    let mut changes: Vec<Change> = Vec::new();
    for batch in batches {
        if batch.num_columns() != targets.len() {
            return Err(SqlError::syntax(format!(
                "INSERT has {} expressions but {} target columns",
                batch.num_columns(),
                targets.len()
            )));
        }
        let n = batch.num_rows();
        if rows_done + n > MAX_ROWS_PER_STATEMENT {
            return Err(too_many_rows());
        }
        let given = cast_to_columns(&desc, &targets, batch.columns())?;
        let defaults = defaults(&ctx, &desc, &targets, n).await?;
        let mut txn = txn.lock().await;
        for r in 0..n {
            let mut values = Vec::with_capacity(desc.columns.len());
            for (p, column) in desc.columns.iter().enumerate() {
                let value = match targets.iter().position(|t| *t == p) {
                    Some(i) => ScalarValue::try_from_array(&given[i], r)?,
                    None => match &defaults[p] {
                        Some(array) => ScalarValue::try_from_array(array, r)?,
                        None => ScalarValue::try_new_null(&column.ty.arrow())?,
                    },
                };
                values.push(value);
            }
            let (sphere, pk) = check_row(&desc, &mut values)?;
            let key = desc.row_key(&pk);
            let in_statement = written.contains(&(sphere, key.clone()));
            let stored = match in_statement {
                true => None,
                false => txn.get_in(Keyspace::Sql, sphere, &key).await?,
            };
            if in_statement || stored.is_some() {
                let duplicate = || {
                    SqlError::unique(format!(
                        "duplicate key value violates unique constraint \"{}_pkey\" (key \
                         {pk:?})",
                        desc.name
                    ))
                };
                match (&on_conflict, stored) {
                    (OnConflict::Skip, _) => continue,
                    (OnConflict::Refuse, _) => return Err(duplicate()),
                    (OnConflict::Update(_), None) => {
                        return Err(SqlError::new(
                            "21000",
                            "ON CONFLICT DO UPDATE command cannot affect row a second time; \
                             no two rows of one INSERT may have the same primary key",
                        ))
                    }
                    (OnConflict::Update(_), Some(bytes)) => {
                        conflicts.push(Conflict {
                            existing: row::decode_with_key(&desc, &pk, &bytes)?,
                            proposed: values,
                        });
                        changes.push(Change::Update {
                            conflict: conflicts.len() - 1,
                            sphere,
                            key: key.clone(),
                        });
                        written.insert((sphere, key));
                        rows_done += 1;
                        continue;
                    }
                }
            }
            written.insert((sphere, key.clone()));
            changes.push(Change::Insert {
                sphere,
                key,
                values,
            });
            rows_done += 1;
        }
    }
    // Without the transaction's lock: a subquery in SET reads through it.
    let mut updated = match &on_conflict {
        OnConflict::Update(update) => {
            upsert::new_rows(&ctx, &desc, &qualifier, update, &conflicts).await?
        }
        _ => Vec::new(),
    };
    // (sphere, key, values, whether the row is new), in input order.
    let mut rows: Vec<(u64, Vec<u8>, Vec<ScalarValue>, bool)> = Vec::with_capacity(changes.len());
    for change in changes {
        match change {
            Change::Insert {
                sphere,
                key,
                values,
            } => rows.push((sphere, key, values, true)),
            Change::Update {
                conflict,
                sphere,
                key,
            } => {
                // A row DO UPDATE's WHERE rejected stays as it is.
                let Some(mut values) = updated.get_mut(conflict).and_then(Option::take) else {
                    continue;
                };
                let (new_sphere, pk) = check_row(&desc, &mut values)?;
                if (new_sphere, desc.row_key(&pk)) != (sphere, key.clone()) {
                    return Err(SqlError::internal("ON CONFLICT DO UPDATE moved a row"));
                }
                rows.push((sphere, key, values, false));
            }
        }
    }
    let outcome = match &insert.returning {
        Some(items) => {
            let returned = rows.iter().map(|r| r.2.clone()).collect();
            returning_outcome("INSERT 0", &ctx, &desc, &qualifier, items, returned).await?
        }
        None => Outcome::Command {
            tag: "INSERT",
            rows: Some(rows.len()),
        },
    };
    let mut txn = txn.lock().await;
    for (sphere, key, values, new) in rows {
        txn.put_in(Keyspace::Sql, sphere, &key, &row::encode(&desc, &values)?)?;
        if new && spheres.insert(sphere) {
            catalog::note_sphere(&mut txn, desc.id, sphere).await?;
        }
    }
    Ok(outcome)
}

/// A row an INSERT writes: a new one, or one found taken under DO UPDATE (its new values come
/// from [`upsert::new_rows`], by its place among the conflicts).
enum Change {
    Insert {
        sphere: u64,
        key: Vec<u8>,
        values: Vec<ScalarValue>,
    },
    Update {
        conflict: usize,
        sphere: u64,
        key: Vec<u8>,
    },
}

/// The name an INSERT's rows go by in ON CONFLICT and RETURNING: its alias, or the table's.
fn insert_qualifier(insert: &Insert, desc: &TableDesc) -> String {
    match &insert.table_alias {
        Some(alias) => column_name(&alias.alias),
        None => desc.name.clone(),
    }
}

/// The RETURNING list over the rows a statement changed, as its result.
async fn returning_outcome(
    tag: &'static str,
    ctx: &SessionContext,
    desc: &TableDesc,
    qualifier: &str,
    items: &[SelectItem],
    rows: Vec<Vec<ScalarValue>>,
) -> Result<Outcome, SqlError> {
    let (schema, batches) = returning::project(ctx, desc, qualifier, items, rows).await?;
    Ok(Outcome::Returned {
        tag,
        schema,
        batches,
    })
}

/// What an INSERT does with a row whose primary key is taken.
enum OnConflict {
    /// No ON CONFLICT: a unique violation.
    Refuse,
    /// DO NOTHING: the row is left out.
    Skip,
    /// DO UPDATE: the existing row takes the assigned values.
    Update(Box<DoUpdate>),
}

/// `ON CONFLICT (cols)` or `ON CONFLICT ON CONSTRAINT t_pkey` must name the primary key,
/// the one unique constraint a table has.
fn check_conflict_target(
    desc: &TableDesc,
    target: Option<&ConflictTarget>,
) -> Result<(), SqlError> {
    let key: Vec<&str> = desc
        .key_positions()
        .iter()
        .map(|p| desc.columns[*p].name.as_str())
        .collect();
    let ok = match target {
        None => true,
        Some(ConflictTarget::Columns(columns)) => {
            let mut named: Vec<String> = columns.iter().map(column_name).collect();
            let mut key_sorted: Vec<String> = key.iter().map(|k| k.to_string()).collect();
            named.sort();
            key_sorted.sort();
            named == key_sorted
        }
        Some(ConflictTarget::OnConstraint(name)) => {
            table_name(name).is_ok_and(|n| n == format!("{}_pkey", desc.name))
        }
    };
    if ok {
        return Ok(());
    }
    Err(SqlError::new(
        "42P10",
        format!(
            "there is no unique constraint matching the ON CONFLICT specification; the only \
             one is the primary key ({})",
            key.join(", ")
        ),
    ))
}

/// For each column not among `targets`, its default evaluated `n` times (each row its own
/// value, as `gen_random_uuid()` needs), cast to the column's type.
async fn defaults(
    ctx: &SessionContext,
    desc: &TableDesc,
    targets: &[usize],
    n: usize,
) -> Result<Vec<Option<ArrayRef>>, SqlError> {
    let mut out: Vec<Option<ArrayRef>> = vec![None; desc.columns.len()];
    let wanted: Vec<usize> = (0..desc.columns.len())
        .filter(|p| !targets.contains(p) && desc.columns[*p].default.is_some())
        .collect();
    if wanted.is_empty() || n == 0 {
        return Ok(out);
    }
    let exprs = wanted
        .iter()
        .map(|p| desc.columns[*p].default.clone().unwrap_or_default())
        .collect::<Vec<_>>()
        .join(", ");
    let (_, batches) =
        query_text(ctx, &format!("SELECT {exprs} FROM generate_series(1, {n})")).await?;
    let batch = datafusion::arrow::compute::concat_batches(
        &batches
            .first()
            .map(|b| b.schema())
            .ok_or_else(|| SqlError::internal("defaults produced no batch"))?,
        &batches,
    )
    .map_err(|e| SqlError::internal(e.to_string()))?;
    let cast = cast_to_columns(desc, &wanted, batch.columns())?;
    for (p, array) in wanted.into_iter().zip(cast) {
        out[p] = Some(array);
    }
    Ok(out)
}

async fn update_rows(
    update: Update,
    base: &SessionContext,
    txn: &SharedTxn,
) -> Result<Outcome, SqlError> {
    if update.from.is_some() {
        return Err(SqlError::feature(
            "UPDATE ... FROM is not supported; use a subquery in SET or WHERE",
        ));
    }
    if update.limit.is_some() || !update.order_by.is_empty() {
        return Err(SqlError::feature(
            "UPDATE ... ORDER BY / LIMIT is not supported",
        ));
    }
    let (ctx, descs) = context(base, txn).await?;
    let (name, relation, qualifier) = single_table(&update.table)?;
    let desc = target(&descs, name)?.clone();
    let mut assigned: HashMap<usize, String> = HashMap::new();
    for a in &update.assignments {
        let p = assigned_column(&desc, a, "UPDATE")?;
        if assigned.insert(p, a.value.to_string()).is_some() {
            return Err(multiple_assignments(&desc.columns[p].name));
        }
    }
    let keys = desc.key_positions();
    // The old key (to find the row) and every column's new value, aliased apart.
    let mut select: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{} AS \"__old_key_{i}\"", quoted(&desc.columns[*p].name)))
        .collect();
    for (p, column) in desc.columns.iter().enumerate() {
        select.push(match assigned.get(&p) {
            Some(expr) => format!("({expr}) AS \"__new_{p}\""),
            None => format!("{} AS \"__new_{p}\"", quoted(&column.name)),
        });
    }
    let where_clause = update
        .selection
        .map(|w| format!(" WHERE {w}"))
        .unwrap_or_default();
    let sql = format!("SELECT {} FROM {relation}{where_clause}", select.join(", "));
    let (_, batches) = query_text(&ctx, &sql).await?;
    let all: Vec<usize> = (0..desc.columns.len()).collect();
    let mut changed = 0usize;
    let mut removed: BTreeSet<(u64, Vec<u8>)> = BTreeSet::new();
    let mut written: BTreeSet<(u64, Vec<u8>)> = BTreeSet::new();
    let mut returned: Vec<Vec<ScalarValue>> = Vec::new();
    // Writes (None: a delete), applied in order once RETURNING is computed, so that its
    // subqueries see the rows as they were before the statement.
    let mut writes: Vec<(u64, Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    let mut txn_guard = txn.lock().await;
    for batch in batches {
        if changed + batch.num_rows() > MAX_ROWS_PER_STATEMENT {
            return Err(too_many_rows());
        }
        let old_keys = cast_to_columns(&desc, &keys, &batch.columns()[..keys.len()])?;
        let new = cast_to_columns(&desc, &all, &batch.columns()[keys.len()..])?;
        for r in 0..batch.num_rows() {
            let old_pk = key_of(&desc, &keys, &old_keys, r)?;
            let old_sphere = sphere_of(&old_pk)?;
            let mut values: Vec<ScalarValue> = new
                .iter()
                .map(|a| ScalarValue::try_from_array(a, r))
                .collect::<Result<_, _>>()?;
            let (sphere, pk) = check_row(&desc, &mut values)?;
            let key = desc.row_key(&pk);
            let old_key = desc.row_key(&old_pk);
            if (sphere, &key) != (old_sphere, &old_key) {
                writes.push((old_sphere, old_key.clone(), None));
                removed.insert((old_sphere, old_key));
                // Keys this statement wrote or removed are in `written` and `removed`; the
                // store answers for the others.
                let taken = written.contains(&(sphere, key.clone()))
                    || (!removed.contains(&(sphere, key.clone()))
                        && txn_guard
                            .get_in(Keyspace::Sql, sphere, &key)
                            .await?
                            .is_some());
                if taken {
                    return Err(SqlError::unique(format!(
                        "duplicate key value violates unique constraint \"{}_pkey\" (key \
                         {pk:?})",
                        desc.name
                    )));
                }
                catalog::note_sphere(&mut txn_guard, desc.id, sphere).await?;
            } else if written.contains(&(sphere, key.clone())) {
                return Err(SqlError::unique(format!(
                    "duplicate key value violates unique constraint \"{}_pkey\" (key {pk:?})",
                    desc.name
                )));
            }
            writes.push((sphere, key.clone(), Some(row::encode(&desc, &values)?)));
            if update.returning.is_some() {
                returned.push(values);
            }
            removed.remove(&(sphere, key.clone()));
            written.insert((sphere, key));
            changed += 1;
        }
    }
    drop(txn_guard);
    let outcome = match &update.returning {
        Some(items) => {
            returning_outcome("UPDATE", &ctx, &desc, &qualifier, items, returned).await?
        }
        None => Outcome::counted("UPDATE", changed),
    };
    apply(txn, writes).await?;
    Ok(outcome)
}

/// The position in `desc` of the column an assignment of `statement` (`UPDATE`, `ON
/// CONFLICT DO UPDATE`) sets.
pub(crate) fn assigned_column(
    desc: &TableDesc,
    assignment: &Assignment,
    statement: &str,
) -> Result<usize, SqlError> {
    let AssignmentTarget::ColumnName(column) = &assignment.target else {
        return Err(SqlError::feature(format!(
            "tuple assignments in {statement} are not supported"
        )));
    };
    let Some(last) = column.0.last().and_then(|p| p.as_ident()) else {
        return Err(SqlError::syntax(format!("bad column {column}")));
    };
    let column = column_name(last);
    desc.position(&column)
        .ok_or_else(|| SqlError::undefined_column(&desc.name, &column))
}

pub(crate) fn multiple_assignments(column: &str) -> SqlError {
    SqlError::new(
        "42601",
        format!("multiple assignments to same column \"{column}\""),
    )
}

/// Applies a statement's writes in order (`None`: a delete).
async fn apply(
    txn: &SharedTxn,
    writes: Vec<(u64, Vec<u8>, Option<Vec<u8>>)>,
) -> Result<(), SqlError> {
    let mut txn = txn.lock().await;
    for (sphere, key, value) in writes {
        match value {
            Some(value) => txn.put_in(Keyspace::Sql, sphere, &key, &value)?,
            None => txn.delete_in(Keyspace::Sql, sphere, &key)?,
        }
    }
    Ok(())
}

async fn delete_rows(
    delete: Delete,
    base: &SessionContext,
    txn: &SharedTxn,
) -> Result<Outcome, SqlError> {
    if delete.using.is_some() {
        return Err(SqlError::feature(
            "DELETE ... USING is not supported; use a subquery in WHERE",
        ));
    }
    if delete.limit.is_some() || !delete.order_by.is_empty() {
        return Err(SqlError::feature(
            "DELETE ... ORDER BY / LIMIT is not supported; select the keys to delete in WHERE",
        ));
    }
    let from = match &delete.from {
        FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => t,
    };
    let [table] = from.as_slice() else {
        return Err(SqlError::feature(
            "DELETE from several tables is not supported",
        ));
    };
    let (ctx, descs) = context(base, txn).await?;
    let (name, relation, qualifier) = single_table(table)?;
    let desc = target(&descs, name)?.clone();
    let keys = desc.key_positions();
    // Whole rows: their keys to delete them, and their values for RETURNING.
    let select = desc
        .columns
        .iter()
        .map(|c| quoted(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let where_clause = delete
        .selection
        .map(|w| format!(" WHERE {w}"))
        .unwrap_or_default();
    let (_, batches) = query_text(
        &ctx,
        &format!("SELECT {select} FROM {relation}{where_clause}"),
    )
    .await?;
    let all: Vec<usize> = (0..desc.columns.len()).collect();
    let mut deleted = 0usize;
    let mut returned: Vec<Vec<ScalarValue>> = Vec::new();
    let mut writes: Vec<(u64, Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    for batch in batches {
        if deleted + batch.num_rows() > MAX_ROWS_PER_STATEMENT {
            return Err(too_many_rows());
        }
        let columns = cast_to_columns(&desc, &all, batch.columns())?;
        let key_columns: Vec<ArrayRef> = keys.iter().map(|p| columns[*p].clone()).collect();
        for r in 0..batch.num_rows() {
            let pk = key_of(&desc, &keys, &key_columns, r)?;
            let sphere = sphere_of(&pk)?;
            writes.push((sphere, desc.row_key(&pk), None));
            if delete.returning.is_some() {
                returned.push(
                    columns
                        .iter()
                        .map(|a| ScalarValue::try_from_array(a, r))
                        .collect::<Result<_, _>>()?,
                );
            }
            deleted += 1;
        }
    }
    let outcome = match &delete.returning {
        Some(items) => {
            returning_outcome("DELETE", &ctx, &desc, &qualifier, items, returned).await?
        }
        None => Outcome::counted("DELETE", deleted),
    };
    apply(txn, writes).await?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_timeouts_parse_with_units() {
        assert_eq!(parse_timeout_ms("250").unwrap(), 250);
        assert_eq!(parse_timeout_ms("'5s'").unwrap(), 5_000);
        assert_eq!(parse_timeout_ms("2min").unwrap(), 120_000);
        assert!(parse_timeout_ms("soon").is_err());
    }

    #[test]
    fn table_names_fold_case_unless_quoted() {
        let parse = |sql: &str| match Session::parse(sql).unwrap().remove(0) {
            Statement::Drop { names, .. } => table_name(&names[0]),
            other => panic!("{other}"),
        };
        assert_eq!(parse("DROP TABLE Posts").unwrap(), "posts");
        assert_eq!(parse("DROP TABLE \"Posts\"").unwrap(), "Posts");
        assert_eq!(parse("DROP TABLE public.posts").unwrap(), "posts");
        assert!(parse("DROP TABLE other.posts").is_err());
    }
}
