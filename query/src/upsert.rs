//! `INSERT ... ON CONFLICT (pk) DO UPDATE SET ... [WHERE ...]`: the new values of the rows an
//! insert found already there, computed in one query over the existing rows (named by the
//! table or its alias) and the rows proposed for insertion (`excluded`), as PostgreSQL
//! defines them. DataFusion 55 plans no ON CONFLICT at all.
//!
//! This module only computes values; the caller finds the conflicts, checks the new rows and
//! writes them. It must not read or write the transaction itself.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use datafusion::execution::context::SessionContext;
use datafusion::scalar::ScalarValue;
use datafusion::sql::sqlparser::ast::{DoUpdate, Expr as SqlExpr, Ident, VisitMut, VisitorMut};

use crate::catalog::TableDesc;
use crate::error::SqlError;
use crate::returning::register_rows;
use crate::session::{
    assigned_column, cast_to_columns, column_name, multiple_assignments, query_text, quoted,
};

/// Names under which the two sides of the conflicts are registered for the one query.
const EXISTING_TABLE: &str = "__conflict_existing";
const EXCLUDED_TABLE: &str = "__conflict_excluded";
/// The column that pairs an existing row with the row proposed in its place.
const PAIR_COLUMN: &str = "__conflict_pair";
/// What `excluded.c` is renamed to, so that an unqualified `c` names the existing row only.
const EXCLUDED_PREFIX: &str = "__excluded_";

/// An existing row and the row an INSERT proposed with the same primary key.
pub struct Conflict {
    pub existing: Vec<ScalarValue>,
    pub proposed: Vec<ScalarValue>,
}

/// The columns `DO UPDATE SET` assigns, by position, with their expressions. Key columns
/// may not be assigned: the row stays where the conflict found it.
pub fn assignments(desc: &TableDesc, update: &DoUpdate) -> Result<Vec<(usize, SqlExpr)>, SqlError> {
    let mut assigned: Vec<(usize, SqlExpr)> = Vec::with_capacity(update.assignments.len());
    for a in &update.assignments {
        let p = assigned_column(desc, a, "ON CONFLICT DO UPDATE")?;
        let name = &desc.columns[p].name;
        if desc.is_key_column(desc.columns[p].id) {
            return Err(SqlError::feature(format!(
                "ON CONFLICT DO UPDATE cannot change primary-key column \"{name}\"; delete \
                 the row and insert it under its new key"
            )));
        }
        if assigned.iter().any(|(q, _)| *q == p) {
            return Err(multiple_assignments(name));
        }
        assigned.push((p, a.value.clone()));
    }
    Ok(assigned)
}

/// Renames `excluded.c` to the column the excluded rows are registered under.
struct ExcludedColumns;

impl VisitorMut for ExcludedColumns {
    type Break = ();

    fn post_visit_expr(&mut self, expr: &mut SqlExpr) -> ControlFlow<()> {
        if let SqlExpr::CompoundIdentifier(parts) = expr {
            if let [table, column] = parts.as_mut_slice() {
                if column_name(table) == "excluded" {
                    let renamed = format!("{EXCLUDED_PREFIX}{}", column_name(column));
                    *column = Ident::with_quote('"', renamed);
                }
            }
        }
        ControlFlow::Continue(())
    }
}

fn excluded_columns(mut expr: SqlExpr) -> String {
    let _ = expr.visit(&mut ExcludedColumns);
    expr.to_string()
}

/// The new values of each conflict's row, in the order given: `None` where the `WHERE` of
/// `DO UPDATE` is not true (the row stays as it is). `qualifier` is the name the existing
/// row goes by: the table's, or the INSERT's alias.
pub async fn new_rows(
    ctx: &SessionContext,
    desc: &TableDesc,
    qualifier: &str,
    update: &DoUpdate,
    conflicts: &[Conflict],
) -> Result<Vec<Option<Vec<ScalarValue>>>, SqlError> {
    if conflicts.is_empty() {
        return Ok(Vec::new());
    }
    let assigned = assignments(desc, update)?;
    // The table's columns (renamed with `prefix`) and the pair number.
    let side = |prefix: &str| -> SchemaRef {
        let mut fields: Vec<Field> = desc
            .columns
            .iter()
            .map(|c| Field::new(format!("{prefix}{}", c.name), c.ty.arrow(), true))
            .collect();
        fields.push(Field::new(PAIR_COLUMN, DataType::Int64, false));
        Arc::new(Schema::new(fields))
    };
    let paired = |f: fn(&Conflict) -> &Vec<ScalarValue>| -> Vec<Vec<ScalarValue>> {
        conflicts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut row = f(c).clone();
                row.push(ScalarValue::Int64(Some(i as i64)));
                row
            })
            .collect()
    };
    register_rows(ctx, EXISTING_TABLE, side(""), paired(|c| &c.existing))?;
    register_rows(
        ctx,
        EXCLUDED_TABLE,
        side(EXCLUDED_PREFIX),
        paired(|c| &c.proposed),
    )?;
    let q = quoted(qualifier);
    let mut select = vec![format!("{q}.{PAIR_COLUMN}")];
    for (p, expr) in &assigned {
        select.push(format!(
            "({}) AS \"__new_{p}\"",
            excluded_columns(expr.clone())
        ));
    }
    select.push(match &update.selection {
        Some(w) => format!("({}) AS \"__where\"", excluded_columns(w.clone())),
        None => "true AS \"__where\"".to_string(),
    });
    let sql = format!(
        "SELECT {} FROM {EXISTING_TABLE} AS {q} JOIN {EXCLUDED_TABLE} AS excluded \
         ON {q}.{PAIR_COLUMN} = excluded.{PAIR_COLUMN}",
        select.join(", ")
    );
    let (_, batches) = query_text(ctx, &sql).await?;
    let positions: Vec<usize> = assigned.iter().map(|(p, _)| *p).collect();
    let mut out: Vec<Option<Vec<ScalarValue>>> = vec![None; conflicts.len()];
    let mut seen: HashSet<usize> = HashSet::new();
    for batch in batches {
        let pairs = batch.column(0).as_primitive::<Int64Type>().clone();
        let values = cast_to_columns(desc, &positions, &batch.columns()[1..=positions.len()])?;
        let chosen = batch.column(positions.len() + 1);
        let chosen = match chosen.data_type() {
            DataType::Boolean => chosen.as_boolean().clone(),
            other => {
                return Err(SqlError::new(
                    "42804",
                    format!("argument of WHERE must be type boolean, not type {other}"),
                ))
            }
        };
        for r in 0..batch.num_rows() {
            let pair = usize::try_from(pairs.value(r))
                .ok()
                .filter(|i| *i < conflicts.len())
                .ok_or_else(|| SqlError::internal("a conflict pair out of range"))?;
            if !seen.insert(pair) {
                return Err(SqlError::internal("a conflict pair answered twice"));
            }
            if chosen.is_null(r) || !chosen.value(r) {
                continue;
            }
            let mut row = conflicts[pair].existing.clone();
            for (i, p) in positions.iter().enumerate() {
                row[*p] = ScalarValue::try_from_array(&values[i], r)?;
            }
            out[pair] = Some(row);
        }
    }
    if seen.len() != conflicts.len() {
        return Err(SqlError::internal(format!(
            "{} of {} conflicts answered",
            seen.len(),
            conflicts.len()
        )));
    }
    Ok(out)
}
