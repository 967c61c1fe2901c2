//! A table's rows as a DataFusion table: read in the statement's transaction (its snapshot
//! plus its own writes), one sphere's span when the query names `sphere_id`, every sphere
//! that holds the table's rows otherwise.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{new_empty_array, ArrayRef, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::Session;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::scalar::ScalarValue;
use spheredb_client::{Keyspace, Txn};
use tokio::sync::Mutex;

use crate::catalog::{self, TableDesc};
use crate::error::{to_datafusion, SqlError};
use crate::row;

/// The statement's transaction, shared by the tables it reads.
pub type SharedTxn = Arc<Mutex<Txn>>;

/// Rows read from a range per call while scanning a table.
pub const SCAN_PAGE_ROWS: u32 = 1_000;
/// Most rows one scan of a table reads into memory; a query over more fails with a message
/// that says to filter on `sphere_id` (scans do not stream yet).
pub const MAX_SCAN_ROWS: usize = 1_000_000;

/// The Arrow schema of a table: its columns in order.
pub fn schema_of(desc: &TableDesc) -> SchemaRef {
    Arc::new(Schema::new(
        desc.columns
            .iter()
            .map(|c| Field::new(&c.name, c.ty.arrow(), c.nullable))
            .collect::<Vec<_>>(),
    ))
}

/// A table read inside a transaction.
pub struct SphereTable {
    desc: Arc<TableDesc>,
    schema: SchemaRef,
    txn: SharedTxn,
}

impl fmt::Debug for SphereTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SphereTable")
            .field("table", &self.desc.name)
            .finish()
    }
}

impl SphereTable {
    pub fn new(desc: Arc<TableDesc>, txn: SharedTxn) -> SphereTable {
        let schema = schema_of(&desc);
        SphereTable { desc, schema, txn }
    }
}

/// The sphere a filter pins the scan to: `sphere_id = <integer>` either way round.
fn sphere_filter(expr: &Expr) -> Option<i64> {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = expr else {
        return None;
    };
    if *op != Operator::Eq {
        return None;
    }
    let (column, literal) = match (left.as_ref(), right.as_ref()) {
        (Expr::Column(c), Expr::Literal(v, _)) | (Expr::Literal(v, _), Expr::Column(c)) => (c, v),
        _ => return None,
    };
    if column.name != "sphere_id" {
        return None;
    }
    match literal.cast_to(&DataType::Int64).ok()? {
        ScalarValue::Int64(Some(v)) => Some(v),
        _ => None,
    }
}

#[async_trait]
impl TableProvider for SphereTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // `sphere_id = X` is exact: the scan reads sphere X's span only, where every row has
        // sphere_id X. Everything else DataFusion filters.
        Ok(filters
            .iter()
            .map(|f| match sphere_filter(f) {
                Some(_) => TableProviderFilterPushDown::Exact,
                None => TableProviderFilterPushDown::Unsupported,
            })
            .collect())
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let pinned: Vec<i64> = filters.iter().filter_map(sphere_filter).collect();
        let batch = self.read(&pinned, limit).await.map_err(to_datafusion)?;
        let plan = MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            self.schema.clone(),
            projection.cloned(),
        )?;
        Ok(plan)
    }
}

impl SphereTable {
    /// Every row of the table (of the pinned sphere, if any), up to `limit`.
    async fn read(&self, pinned: &[i64], limit: Option<usize>) -> Result<RecordBatch, SqlError> {
        let mut txn = self.txn.lock().await;
        let spheres: Vec<u64> = match pinned.split_first() {
            // Two different pins match nothing; a negative sphere id names no sphere.
            Some((first, rest)) if rest.iter().all(|p| p == first) => {
                u64::try_from(*first).into_iter().collect()
            }
            Some(_) => Vec::new(),
            None => catalog::spheres_of(&mut txn, self.desc.id).await?,
        };
        let limit = limit.unwrap_or(usize::MAX);
        let key_positions = self.desc.key_positions();
        let (start, end) = self.desc.rows_span();
        let mut rows: Vec<Vec<ScalarValue>> = Vec::new();
        'spheres: for sphere in spheres {
            let mut cursor = start.clone();
            loop {
                let (page, next) = txn
                    .scan_page_in(Keyspace::Sql, sphere, &cursor, &end, SCAN_PAGE_ROWS)
                    .await?;
                for kv in &page {
                    if rows.len() >= limit {
                        break 'spheres;
                    }
                    if rows.len() >= MAX_SCAN_ROWS {
                        return Err(SqlError::new(
                            "54000",
                            format!(
                                "a scan of {} read more than {MAX_SCAN_ROWS} rows; filter on \
                                 sphere_id or add LIMIT",
                                self.desc.name
                            ),
                        ));
                    }
                    let mut values = row::decode(&self.desc, &kv.value)?;
                    let pk = self.desc.decode_row_key(&kv.key)?;
                    for (position, datum) in key_positions.iter().zip(&pk) {
                        values[*position] = self.desc.columns[*position].ty.from_datum(datum)?;
                    }
                    rows.push(values);
                }
                match next {
                    Some(next) => cursor = next,
                    None => break,
                }
            }
        }
        batch_of(&self.schema, rows)
    }
}

/// A record batch of `rows` (each one value per field of `schema`).
pub fn batch_of(schema: &SchemaRef, rows: Vec<Vec<ScalarValue>>) -> Result<RecordBatch, SqlError> {
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (i, field) in schema.fields().iter().enumerate() {
        let array = if rows.is_empty() {
            new_empty_array(field.data_type())
        } else {
            ScalarValue::iter_to_array(rows.iter().map(|r| r[i].clone()))?
        };
        columns.push(array);
    }
    RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| SqlError::internal(format!("a batch of {}: {e}", schema.fields().len())))
}
