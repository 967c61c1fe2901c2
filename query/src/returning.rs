//! `RETURNING`: the rows an INSERT or UPDATE wrote, or a DELETE removed, projected through
//! the statement's RETURNING list in one query over them. The rows go by the table's name,
//! or the statement's alias, as in PostgreSQL.
//!
//! This module only projects rows it is given; it must not read or write the transaction.

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::context::SessionContext;
use datafusion::scalar::ScalarValue;
use datafusion::sql::sqlparser::ast::SelectItem;

use crate::catalog::TableDesc;
use crate::error::SqlError;
use crate::session::{query_text, quoted};
use crate::table::{batch_of, schema_of};

/// The name the rows are registered under for the one query.
const ROWS_TABLE: &str = "__returning_rows";

/// Registers `rows` (whole rows of `desc`) as `name` in `ctx`, replacing any earlier table of
/// that name.
pub fn register_rows(
    ctx: &SessionContext,
    name: &str,
    schema: SchemaRef,
    rows: Vec<Vec<ScalarValue>>,
) -> Result<(), SqlError> {
    ctx.deregister_table(name)?;
    ctx.register_batch(name, batch_of(&schema, rows)?)?;
    Ok(())
}

/// The RETURNING list `items` over `rows`, each a whole row of `desc`, which the list calls
/// `qualifier`. With no rows it still answers the result's schema (for Describe).
pub async fn project(
    ctx: &SessionContext,
    desc: &TableDesc,
    qualifier: &str,
    items: &[SelectItem],
    rows: Vec<Vec<ScalarValue>>,
) -> Result<(SchemaRef, Vec<RecordBatch>), SqlError> {
    if items.is_empty() {
        return Err(SqlError::syntax("RETURNING needs at least one column"));
    }
    let count = rows.len();
    register_rows(ctx, ROWS_TABLE, schema_of(desc), rows)?;
    let list: Vec<String> = items.iter().map(ToString::to_string).collect();
    let sql = format!(
        "SELECT {} FROM {ROWS_TABLE} AS {}",
        list.join(", "),
        quoted(qualifier)
    );
    let (schema, batches) = query_text(ctx, &sql).await?;
    // One returned row per changed row: an aggregate (`count(*)`) or a set-returning function
    // would change the count, and the tag would no longer say how many rows changed.
    let returned: usize = batches.iter().map(RecordBatch::num_rows).sum();
    if returned != count {
        return Err(SqlError::new(
            "42803",
            format!(
                "RETURNING answers one row per changed row; aggregate and set-returning \
                 functions are not allowed in RETURNING ({returned} rows for {count})"
            ),
        ));
    }
    Ok((schema, batches))
}
