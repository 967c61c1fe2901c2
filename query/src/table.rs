//! A table's rows as a DataFusion table: read in the statement's transaction (its snapshot
//! plus its own writes). Equality filters on primary-key columns narrow the read: the span
//! of the pinned key prefix in one sphere (one row when the whole key is pinned), every
//! sphere that holds the table's rows when `sphere_id` is not pinned.

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
use spheredb_storage::keys::{self, Datum};
use tokio::sync::Mutex;

use crate::catalog::{self, TableDesc};
use crate::error::{to_datafusion, SqlError};
use crate::row;
use crate::types::SqlType;

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

/// A primary-key column a filter pins to one value: `key_column = <literal>` either way
/// round, as (the column's place in the primary key, its key datum). Only literals whose
/// type is the column's own (any integer type for an integer column) qualify, so that
/// comparing key datums is exactly the comparison DataFusion would make; UUIDs only in
/// their stored lowercase spelling.
fn key_filter(desc: &TableDesc, expr: &Expr) -> Option<(usize, Datum)> {
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
    let position = desc.position(&column.name)?;
    let key_index = desc.key_positions().iter().position(|p| *p == position)?;
    let ty = desc.columns[position].ty;
    let integers = |t: &DataType| matches!(t, DataType::Int16 | DataType::Int32 | DataType::Int64);
    let same_type = literal.data_type() == ty.arrow()
        || (integers(&literal.data_type()) && integers(&ty.arrow()));
    if literal.is_null() || !same_type {
        return None;
    }
    if let (SqlType::Uuid, ScalarValue::Utf8(Some(text))) = (ty, literal) {
        if text.chars().any(|c| c.is_ascii_uppercase()) {
            return None;
        }
    }
    let datum = ty.datum(&column.name, literal).ok()?;
    Some((key_index, datum))
}

/// What the filters pin of a primary key: one value per pinned key column, or `None` when
/// two filters pin a column to different values (nothing matches).
fn key_pins(desc: &TableDesc, filters: &[Expr]) -> Option<Vec<Option<Datum>>> {
    let mut pins: Vec<Option<Datum>> = vec![None; desc.primary_key.len()];
    for (index, datum) in filters.iter().filter_map(|f| key_filter(desc, f)) {
        match &pins[index] {
            Some(pinned) if *pinned != datum => return None,
            _ => pins[index] = Some(datum),
        }
    }
    Some(pins)
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
        // `key_column = X` is exact: the scan reads the span of the pinned key prefix and
        // checks every other pinned key column on the decoded key. Everything else
        // DataFusion filters.
        Ok(filters
            .iter()
            .map(|f| match key_filter(&self.desc, f) {
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
        let batch = match key_pins(&self.desc, filters) {
            Some(pins) => self.read(&pins, limit).await.map_err(to_datafusion)?,
            None => batch_of(&self.schema, Vec::new()).map_err(to_datafusion)?,
        };
        let plan = MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            self.schema.clone(),
            projection.cloned(),
        )?;
        Ok(plan)
    }
}

impl SphereTable {
    /// Every row of the table whose key holds the pinned values, up to `limit`: the span of
    /// the pinned key prefix in the pinned sphere (every sphere of the table when
    /// `sphere_id` is not pinned).
    async fn read(
        &self,
        pins: &[Option<Datum>],
        limit: Option<usize>,
    ) -> Result<RecordBatch, SqlError> {
        let mut txn = self.txn.lock().await;
        let spheres: Vec<u64> = match pins.first() {
            // A negative sphere id names no sphere.
            Some(Some(Datum::Int(sphere))) => u64::try_from(*sphere).into_iter().collect(),
            Some(Some(other)) => {
                return Err(SqlError::internal(format!(
                    "sphere_id pinned to {other:?}, not an integer"
                )))
            }
            _ => catalog::spheres_of(&mut txn, self.desc.id).await?,
        };
        let prefix: Vec<Datum> = pins.iter().map_while(Clone::clone).collect();
        let (start, end) = if prefix.is_empty() {
            self.desc.rows_span()
        } else {
            let start = self.desc.row_key(&prefix);
            let end = keys::prefix_end(&start);
            (start, end)
        };
        let limit = limit.unwrap_or(usize::MAX);
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
                    let pk = self.desc.decode_row_key(&kv.key)?;
                    let pinned_match = pins
                        .iter()
                        .zip(&pk)
                        .all(|(pin, datum)| pin.as_ref().is_none_or(|p| p == datum));
                    if !pinned_match {
                        continue;
                    }
                    rows.push(row::decode_with_key(&self.desc, &pk, &kv.value)?);
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
