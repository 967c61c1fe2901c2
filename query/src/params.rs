//! The types of a statement's `$n` parameters that its text fixes the way PostgreSQL reads
//! them: `$n::type` or `CAST($n AS type)`, a value for a column (`INSERT ... VALUES`,
//! `SET column = $n`) and a comparison with a column of the changed table. Clients that
//! send typed binary values (tokio-postgres, JDBC) bind by these types, and DataFusion
//! plans neither INSERT, UPDATE nor DELETE, so it cannot infer them there.

use std::collections::HashMap;
use std::ops::ControlFlow;

use datafusion::arrow::datatypes::DataType;
use datafusion::sql::sqlparser::ast::{
    visit_expressions, Assignment, AssignmentTarget, BinaryOperator, Expr, ObjectName,
    OnConflictAction, OnInsert, SetExpr, Statement, Value,
};

use crate::catalog::{ColumnDesc, TableDesc};
use crate::session::column_name;
use crate::types::SqlType;

/// `$n` as a 1-based number, when `expr` is one.
fn placeholder(expr: &Expr) -> Option<usize> {
    let Expr::Value(v) = expr else { return None };
    let Value::Placeholder(p) = &v.value else {
        return None;
    };
    p.strip_prefix('$')?.parse().ok().filter(|n| *n > 0)
}

/// The column of `desc` an expression names: `c`, or `q.c` where `q` is the name the changed
/// table's rows go by.
fn column_of<'d>(desc: &'d TableDesc, qualifier: &str, expr: &Expr) -> Option<&'d ColumnDesc> {
    let ident = match expr {
        Expr::Identifier(i) => i,
        Expr::CompoundIdentifier(parts) => match parts.as_slice() {
            [table, column] if column_name(table) == qualifier => column,
            _ => return None,
        },
        _ => return None,
    };
    let p = desc.position(&column_name(ident))?;
    Some(&desc.columns[p])
}

/// Comparisons of a parameter with a column of the changed table in a WHERE, through AND,
/// OR, NOT and parentheses only: a subquery's columns are another table's.
fn comparisons<'d>(
    desc: &'d TableDesc,
    qualifier: &str,
    expr: &Expr,
    pairs: &mut Vec<(Option<usize>, Option<&'d ColumnDesc>)>,
) {
    match expr {
        Expr::BinaryOp { left, op, right } if is_comparison(op) => {
            pairs.push((placeholder(right), column_of(desc, qualifier, left)));
            pairs.push((placeholder(left), column_of(desc, qualifier, right)));
        }
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And | BinaryOperator::Or,
            right,
        } => {
            comparisons(desc, qualifier, left, pairs);
            comparisons(desc, qualifier, right, pairs);
        }
        Expr::Nested(inner) | Expr::UnaryOp { expr: inner, .. } => {
            comparisons(desc, qualifier, inner, pairs)
        }
        _ => {}
    }
}

fn is_comparison(op: &BinaryOperator) -> bool {
    matches!(
        op,
        BinaryOperator::Eq
            | BinaryOperator::NotEq
            | BinaryOperator::Lt
            | BinaryOperator::LtEq
            | BinaryOperator::Gt
            | BinaryOperator::GtEq
    )
}

/// Parameter types the statement's text fixes, by 1-based number. A cast wins over a
/// column; `changed`, the table a DML statement changes and the name its rows go by (its
/// alias, or its name), supplies the columns.
pub fn fixed_types(
    statement: &Statement,
    changed: Option<(&TableDesc, &str)>,
) -> HashMap<usize, DataType> {
    let mut types: HashMap<usize, DataType> = HashMap::new();
    let _ = visit_expressions(statement, |expr| {
        if let Expr::Cast {
            expr: inner,
            data_type,
            ..
        } = expr
        {
            if let (Some(n), Ok(ty)) = (placeholder(inner), SqlType::parse(&data_type.to_string()))
            {
                types.entry(n).or_insert(ty.arrow());
            }
        }
        ControlFlow::<()>::Continue(())
    });
    let Some((desc, qualifier)) = changed else {
        return types;
    };
    let mut pairs: Vec<(Option<usize>, Option<&ColumnDesc>)> = Vec::new();
    let named = |name: &ObjectName| {
        name.0
            .last()
            .and_then(|p| p.as_ident())
            .and_then(|i| desc.position(&column_name(i)))
            .map(|p| &desc.columns[p])
    };
    let assigned = |list: &[Assignment], pairs: &mut Vec<_>| {
        for a in list {
            if let AssignmentTarget::ColumnName(name) = &a.target {
                pairs.push((placeholder(&a.value), named(name)));
            }
        }
    };
    match statement {
        Statement::Insert(insert) => {
            let targets: Vec<Option<&ColumnDesc>> = if insert.columns.is_empty() {
                desc.columns.iter().map(Some).collect()
            } else {
                insert.columns.iter().map(named).collect()
            };
            if let Some(SetExpr::Values(values)) = insert.source.as_ref().map(|q| q.body.as_ref()) {
                for row in &values.rows {
                    for (expr, column) in row.content.iter().zip(&targets) {
                        pairs.push((placeholder(expr), *column));
                    }
                }
            }
            if let Some(OnInsert::OnConflict(c)) = &insert.on {
                if let OnConflictAction::DoUpdate(update) = &c.action {
                    assigned(&update.assignments, &mut pairs);
                }
            }
        }
        Statement::Update(update) => assigned(&update.assignments, &mut pairs),
        _ => {}
    }
    let selection = match statement {
        Statement::Update(update) => update.selection.as_ref(),
        Statement::Delete(delete) => delete.selection.as_ref(),
        _ => None,
    };
    if let Some(selection) = selection {
        comparisons(desc, qualifier, selection, &mut pairs);
    }
    for (n, column) in pairs {
        // NUMERIC values stay text: a binary NUMERIC would pass through rust_decimal, which
        // holds 28 digits, where the column holds up to 38.
        if let (Some(n), Some(c)) = (n, column) {
            if !matches!(c.ty, SqlType::Numeric { .. }) {
                types.entry(n).or_insert(c.ty.arrow());
            }
        }
    }
    types
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Session;

    fn items() -> TableDesc {
        let column = |id, name: &str, ty| ColumnDesc {
            id,
            name: name.to_string(),
            ty,
            nullable: true,
            default: None,
        };
        TableDesc {
            id: 100,
            name: "items".to_string(),
            columns: vec![
                column(1, "sphere_id", SqlType::Int64),
                column(2, "id", SqlType::Int32),
                column(3, "v", SqlType::Text),
                column(4, "at", SqlType::Date),
            ],
            primary_key: vec![1, 2],
            next_column_id: 5,
        }
    }

    fn fixed(sql: &str) -> Vec<(usize, DataType)> {
        let statement = Session::parse(sql).unwrap().remove(0);
        let mut types: Vec<_> = fixed_types(&statement, Some((&items(), "items")))
            .into_iter()
            .collect();
        types.sort_by_key(|(n, _)| *n);
        types
    }

    #[test]
    fn insert_values_take_their_columns_types_and_casts_win() {
        assert_eq!(
            fixed("INSERT INTO items (v, id, sphere_id) VALUES ($1, $2, $3::SMALLINT)"),
            vec![
                (1, DataType::Utf8),
                (2, DataType::Int32),
                (3, DataType::Int16)
            ]
        );
        assert_eq!(
            fixed("INSERT INTO items VALUES ($1, $2, 'x', $3) ON CONFLICT (sphere_id, id) DO UPDATE SET v = $4"),
            vec![
                (1, DataType::Int64),
                (2, DataType::Int32),
                (3, DataType::Date32),
                (4, DataType::Utf8)
            ]
        );
    }

    #[test]
    fn updates_and_deletes_take_assigned_and_compared_columns_types() {
        assert_eq!(
            fixed("UPDATE items SET v = $1, at = $4 WHERE sphere_id = $2 AND $3 < items.id"),
            vec![
                (1, DataType::Utf8),
                (2, DataType::Int64),
                (3, DataType::Int32),
                (4, DataType::Date32)
            ]
        );
        assert_eq!(
            fixed("DELETE FROM items WHERE id = $1 OR v = lower($2)"),
            vec![(1, DataType::Int32)]
        );
    }

    #[test]
    fn columns_of_subqueries_and_other_tables_fix_nothing() {
        assert!(
            fixed("DELETE FROM items WHERE id IN (SELECT id FROM scores WHERE score = $1)")
                .is_empty()
        );
        assert!(fixed("DELETE FROM items WHERE other.id = $1").is_empty());
        assert_eq!(
            fixed("DELETE FROM items WHERE NOT (items.id = $1 OR v = $2)"),
            vec![(1, DataType::Int32), (2, DataType::Utf8)]
        );
    }

    #[test]
    fn unknown_columns_and_types_fix_nothing() {
        assert!(fixed("UPDATE items SET nope = $1 WHERE other = $2").is_empty());
        assert!(fixed("SELECT CAST($1 AS GEOMETRY)").is_empty());
    }
}
