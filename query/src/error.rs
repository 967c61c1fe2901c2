//! SQL errors: a PostgreSQL SQLSTATE code and a message, so drivers act on the code (retry
//! `40001`, report `23505`) and people read the message.

use datafusion::error::DataFusionError;
use spheredb_client::ClientError;

/// An error a statement ends with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (SQLSTATE {code})")]
pub struct SqlError {
    /// The SQLSTATE code (PostgreSQL appendix A).
    pub code: &'static str,
    pub message: String,
}

impl SqlError {
    pub fn new(code: &'static str, message: impl Into<String>) -> SqlError {
        SqlError {
            code,
            message: message.into(),
        }
    }
    /// 0A000: a feature SphereDB does not have (yet); the message says what to do instead.
    pub fn feature(message: impl Into<String>) -> SqlError {
        SqlError::new("0A000", message)
    }
    /// 42601: the statement does not parse.
    pub fn syntax(message: impl Into<String>) -> SqlError {
        SqlError::new("42601", message)
    }
    /// 22023: an argument out of its allowed values.
    pub fn invalid(message: impl Into<String>) -> SqlError {
        SqlError::new("22023", message)
    }
    /// 22P02: text that is not a value of its type.
    pub fn invalid_text(message: impl Into<String>) -> SqlError {
        SqlError::new("22P02", message)
    }
    /// 23502: NULL where it is not allowed.
    pub fn not_null(message: impl Into<String>) -> SqlError {
        SqlError::new("23502", message)
    }
    /// 23505: a primary key that exists already.
    pub fn unique(message: impl Into<String>) -> SqlError {
        SqlError::new("23505", message)
    }
    /// 42P01: no such table.
    pub fn undefined_table(name: &str) -> SqlError {
        SqlError::new(
            "42P01",
            format!("relation \"{name}\" does not exist (\\dt lists the tables)"),
        )
    }
    /// 42P07: a table that exists already.
    pub fn duplicate_table(name: &str) -> SqlError {
        SqlError::new("42P07", format!("relation \"{name}\" already exists"))
    }
    /// 42703: no such column.
    pub fn undefined_column(table: &str, column: &str) -> SqlError {
        SqlError::new(
            "42703",
            format!("column \"{column}\" of relation \"{table}\" does not exist"),
        )
    }
    /// 42P16: a table definition SphereDB cannot store.
    pub fn invalid_table(message: impl Into<String>) -> SqlError {
        SqlError::new("42P16", message)
    }
    /// 25P02: a statement in a transaction that already failed.
    pub fn in_failed_transaction() -> SqlError {
        SqlError::new(
            "25P02",
            "current transaction is aborted, commands ignored until end of transaction block \
             (send ROLLBACK)",
        )
    }
    /// 40001: the transaction conflicted with another; run it again.
    pub fn serialization(message: impl Into<String>) -> SqlError {
        SqlError::new("40001", message)
    }
    /// 57014: cancelled, or over `statement_timeout`.
    pub fn canceled(message: impl Into<String>) -> SqlError {
        SqlError::new("57014", message)
    }
    /// XX001: stored data that does not decode.
    pub fn corruption(message: impl Into<String>) -> SqlError {
        SqlError::new("XX001", message)
    }
    /// XX000: a bug.
    pub fn internal(message: impl Into<String>) -> SqlError {
        SqlError::new("XX000", message)
    }
}

impl From<ClientError> for SqlError {
    fn from(e: ClientError) -> SqlError {
        let code = match &e {
            ClientError::WriteConflict { .. } | ClientError::TxnAborted(_) => "40001",
            // A lock that stayed held through every round of resolution: retrying later is
            // what a driver should do, as after a deadlock.
            ClientError::Locked { .. } => "40001",
            ClientError::InvalidArgument(_) => "22023",
            ClientError::Corruption(_) => "XX001",
            ClientError::DeadlineExceeded { .. } => "57014",
            ClientError::ResourceExhausted(_) => "53000",
            // A snapshot older than the GC horizon: PostgreSQL's snapshot_too_old. Not 40001:
            // a driver retrying an `AS OF SYSTEM TIME` read would meet it again every time.
            ClientError::HistoryCompacted { .. } => "72000",
            // The commit may or may not have happened: PostgreSQL's
            // transaction_resolution_unknown.
            ClientError::OutcomeUnknown(_) => "08007",
            // Routing that the client's retries did not settle in time: the statement can run
            // again (not 08006, which makes drivers drop the connection).
            ClientError::NotLeader { .. }
            | ClientError::KeyNotInRange { .. }
            | ClientError::StaleGeneration { .. }
            | ClientError::RangeNotFound(_) => "40001",
            ClientError::Unavailable(_) => "57P03",
            ClientError::Internal(_) => "XX000",
        };
        SqlError::new(code, e.to_string())
    }
}

impl From<DataFusionError> for SqlError {
    fn from(e: DataFusionError) -> SqlError {
        // Context, diagnostics and shared errors wrap the one that says what happened.
        let root = e.find_root();
        if let DataFusionError::External(inner) = root {
            if let Some(sql) = inner.downcast_ref::<SqlError>() {
                return sql.clone();
            }
        }
        match root {
            DataFusionError::SQL(e, _) => SqlError::syntax(e.to_string()),
            DataFusionError::Plan(m) => plan_error(m),
            DataFusionError::SchemaError(e, _) => plan_error(&e.to_string()),
            DataFusionError::NotImplemented(m) => SqlError::feature(m.clone()),
            DataFusionError::ArrowError(e, _) => SqlError::new("22000", e.to_string()),
            DataFusionError::Execution(m) => SqlError::new("22000", m.clone()),
            other => SqlError::internal(other.to_string()),
        }
    }
}

/// Plan errors are mostly unknown names: said as PostgreSQL says them.
fn plan_error(message: &str) -> SqlError {
    if let Some(rest) = message.strip_prefix("table '") {
        if let Some(name) = rest.strip_suffix("' not found") {
            let table = name.rsplit('.').next().unwrap_or(name);
            return SqlError::undefined_table(table);
        }
    }
    if message.contains("No field named") || message.contains("not found") {
        return SqlError::new("42703", message.to_string());
    }
    SqlError::new("42000", message.to_string())
}

/// Carries a [`SqlError`] through DataFusion, which gives it back by [`SqlError::from`].
pub fn to_datafusion(e: SqlError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}
