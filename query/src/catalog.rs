//! The SQL catalog: table descriptors, table ids and which spheres hold a table's rows.
//!
//! The catalog is rows of reserved tables in sphere 0's SQL keyspace, read and written in
//! the statement's own transaction, so DDL is transactional and every statement sees the
//! catalog of its snapshot:
//!
//! ```text
//! table 1 index 1 pk (name)               descriptor of table `name` (JSON)
//! table 1 index 2 pk ()                   the next table id
//! table 2 index 1 pk (table_id, sphere)   sphere `sphere` holds (or held) rows of table_id
//! ```
//!
//! Table ids and column ids are never reused, so a row written under a dropped table or
//! column is never read as another's.

use serde::{Deserialize, Serialize};
use spheredb_client::{Keyspace, Txn};
use spheredb_storage::keys::{self, Datum};

use crate::error::SqlError;
use crate::types::SqlType;

/// The sphere that holds the catalog (and, by convention, platform-wide tables).
pub const CATALOG_SPHERE: u64 = 0;
/// Reserved table id of the descriptors.
const DESCRIPTORS_TABLE_ID: u32 = 1;
/// Reserved table id of the sphere directory.
const SPHERE_DIRECTORY_TABLE_ID: u32 = 2;
/// Index of a table's rows by primary key.
pub const PRIMARY_INDEX_ID: u32 = 1;
/// Index id of the next-table-id counter inside the descriptors table.
const COUNTER_INDEX_ID: u32 = 2;
/// The first id a user table gets; ids below are reserved for the system.
pub const FIRST_USER_TABLE_ID: u32 = 100;
/// Most tables one catalog read returns: a bound on the scan, far above any real schema.
pub const MAX_TABLES: u32 = 100_000;
/// Most spheres one directory read returns for a table scanned without `sphere_id`.
pub const MAX_SPHERES_PER_SCAN: u32 = 100_000;

/// A column of a table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnDesc {
    /// Never reused within a table: row values are tagged with it.
    pub id: u32,
    pub name: String,
    pub ty: SqlType,
    pub nullable: bool,
    /// The `DEFAULT` expression as SQL text.
    pub default: Option<String>,
}

/// A table: its columns and primary key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableDesc {
    pub id: u32,
    pub name: String,
    pub columns: Vec<ColumnDesc>,
    /// Column ids of the primary key, in key order; the first is `sphere_id`.
    pub primary_key: Vec<u32>,
    pub next_column_id: u32,
}

impl TableDesc {
    pub fn column_by_id(&self, id: u32) -> Option<&ColumnDesc> {
        self.columns.iter().find(|c| c.id == id)
    }

    /// Position of a column in [`TableDesc::columns`] (and in the table's Arrow schema).
    pub fn position(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// Positions of the primary-key columns, in key order.
    pub fn key_positions(&self) -> Vec<usize> {
        self.primary_key
            .iter()
            .filter_map(|id| self.columns.iter().position(|c| c.id == *id))
            .collect()
    }

    pub fn is_key_column(&self, id: u32) -> bool {
        self.primary_key.contains(&id)
    }

    /// Checks what every table must be: a primary key starting with `sphere_id BIGINT`, key
    /// columns of keyable types, unique column names.
    pub fn validate(&self) -> Result<(), SqlError> {
        let hint = "a table's primary key begins with sphere_id BIGINT, e.g. \
                    PRIMARY KEY (sphere_id, id); platform-wide tables use sphere 0";
        let first = self
            .primary_key
            .first()
            .and_then(|id| self.column_by_id(*id))
            .ok_or_else(|| {
                SqlError::invalid_table(format!("table {} has no primary key; {hint}", self.name))
            })?;
        if first.name != "sphere_id" || first.ty != SqlType::Int64 {
            return Err(SqlError::invalid_table(format!(
                "the primary key of {} begins with {} {}; {hint}",
                self.name,
                first.name,
                first.ty.name()
            )));
        }
        for id in &self.primary_key {
            let Some(c) = self.column_by_id(*id) else {
                return Err(SqlError::internal(format!(
                    "key column id {id} has no column"
                )));
            };
            if !c.ty.keyable() {
                return Err(SqlError::invalid_table(format!(
                    "primary-key column {} has type {}; key columns must be integers, text, \
                     bytea, boolean, uuid, date or timestamps",
                    c.name,
                    c.ty.name()
                )));
            }
        }
        for (i, c) in self.columns.iter().enumerate() {
            if self.columns[..i].iter().any(|o| o.name == c.name) {
                return Err(SqlError::new(
                    "42701",
                    format!("column \"{}\" specified more than once", c.name),
                ));
            }
        }
        Ok(())
    }

    /// The key, after the sphere's SQL header, of the row with primary key `pk`.
    pub fn row_key(&self, pk: &[Datum]) -> Vec<u8> {
        sql_rest(self.id, PRIMARY_INDEX_ID, pk)
    }

    /// The span, after the sphere's SQL header, of every row of this table in a sphere.
    pub fn rows_span(&self) -> (Vec<u8>, Vec<u8>) {
        let start = sql_rest(self.id, PRIMARY_INDEX_ID, &[]);
        let end = keys::prefix_end(&start);
        (start, end)
    }

    /// The primary key of a row key read back from a scan of [`TableDesc::rows_span`].
    pub fn decode_row_key(&self, rest: &[u8]) -> Result<Vec<Datum>, SqlError> {
        let full = Keyspace::Sql.key(CATALOG_SPHERE, rest);
        let decoded = keys::decode_sql_row_key(&full)
            .map_err(|e| SqlError::corruption(format!("row key of table {}: {e}", self.name)))?;
        if decoded.table_id != self.id || decoded.pk.len() != self.primary_key.len() {
            return Err(SqlError::corruption(format!(
                "row key {rest:?} is not a key of table {} ({} key columns)",
                self.name,
                self.primary_key.len()
            )));
        }
        Ok(decoded.pk)
    }
}

/// `table_id index_id pk`: a SQL key after its sphere header.
fn sql_rest(table_id: u32, index_id: u32, pk: &[Datum]) -> Vec<u8> {
    let full = keys::sql_row_key(CATALOG_SPHERE, table_id, index_id, pk);
    let header = Keyspace::Sql.key(CATALOG_SPHERE, b"").len();
    full[header..].to_vec()
}

fn descriptor_key(name: &str) -> Vec<u8> {
    sql_rest(
        DESCRIPTORS_TABLE_ID,
        PRIMARY_INDEX_ID,
        &[Datum::Text(name.to_string())],
    )
}

fn directory_key(table_id: u32, sphere: u64) -> Vec<u8> {
    sql_rest(
        SPHERE_DIRECTORY_TABLE_ID,
        PRIMARY_INDEX_ID,
        &[Datum::Int(table_id as i64), Datum::Int(sphere as i64)],
    )
}

fn decode_descriptor(value: &[u8]) -> Result<TableDesc, SqlError> {
    serde_json::from_slice(value)
        .map_err(|e| SqlError::corruption(format!("table descriptor does not decode: {e}")))
}

/// Every table, as of the transaction's snapshot.
pub async fn load_tables(txn: &mut Txn) -> Result<Vec<TableDesc>, SqlError> {
    let start = sql_rest(DESCRIPTORS_TABLE_ID, PRIMARY_INDEX_ID, &[]);
    let end = keys::prefix_end(&start);
    let pairs = txn
        .scan_in(Keyspace::Sql, CATALOG_SPHERE, &start, &end, MAX_TABLES)
        .await?;
    pairs
        .iter()
        .map(|kv| decode_descriptor(&kv.value))
        .collect()
}

/// Table `name`, as of the transaction's snapshot.
pub async fn table(txn: &mut Txn, name: &str) -> Result<Option<TableDesc>, SqlError> {
    match txn
        .get_in(Keyspace::Sql, CATALOG_SPHERE, &descriptor_key(name))
        .await?
    {
        Some(v) => Ok(Some(decode_descriptor(&v)?)),
        None => Ok(None),
    }
}

/// Creates a table from `desc` (its id is assigned here). Two transactions creating tables
/// at once both write the id counter, so one of them conflicts and retries.
pub async fn create_table(txn: &mut Txn, mut desc: TableDesc) -> Result<TableDesc, SqlError> {
    if table(txn, &desc.name).await?.is_some() {
        return Err(SqlError::duplicate_table(&desc.name));
    }
    let counter = sql_rest(DESCRIPTORS_TABLE_ID, COUNTER_INDEX_ID, &[]);
    let id = match txn.get_in(Keyspace::Sql, CATALOG_SPHERE, &counter).await? {
        Some(v) => {
            let bytes: [u8; 4] = v
                .as_slice()
                .try_into()
                .map_err(|_| SqlError::corruption("the table id counter is not 4 bytes"))?;
            u32::from_be_bytes(bytes)
        }
        None => FIRST_USER_TABLE_ID,
    };
    let next = id
        .checked_add(1)
        .ok_or_else(|| SqlError::new("54000", "table ids are exhausted"))?;
    txn.put_in(Keyspace::Sql, CATALOG_SPHERE, &counter, &next.to_be_bytes())?;
    desc.id = id;
    desc.validate()?;
    put_descriptor(txn, &desc)?;
    Ok(desc)
}

fn put_descriptor(txn: &mut Txn, desc: &TableDesc) -> Result<(), SqlError> {
    let value = serde_json::to_vec(desc)
        .map_err(|e| SqlError::internal(format!("descriptor does not encode: {e}")))?;
    txn.put_in(
        Keyspace::Sql,
        CATALOG_SPHERE,
        &descriptor_key(&desc.name),
        &value,
    )?;
    Ok(())
}

/// Drops table `name`. Its rows stay behind under its id, which is never reused, so no
/// table ever reads them; reclaiming them is left to a later cleanup.
pub async fn drop_table(txn: &mut Txn, name: &str) -> Result<bool, SqlError> {
    if table(txn, name).await?.is_none() {
        return Ok(false);
    }
    txn.delete_in(Keyspace::Sql, CATALOG_SPHERE, &descriptor_key(name))?;
    Ok(true)
}

/// Records that `sphere` holds rows of `table_id`, if not recorded yet.
pub async fn note_sphere(txn: &mut Txn, table_id: u32, sphere: u64) -> Result<(), SqlError> {
    let key = directory_key(table_id, sphere);
    if txn
        .get_in(Keyspace::Sql, CATALOG_SPHERE, &key)
        .await?
        .is_none()
    {
        txn.put_in(Keyspace::Sql, CATALOG_SPHERE, &key, b"")?;
    }
    Ok(())
}

/// The spheres that hold (or held) rows of `table_id`, in order.
pub async fn spheres_of(txn: &mut Txn, table_id: u32) -> Result<Vec<u64>, SqlError> {
    let start = sql_rest(
        SPHERE_DIRECTORY_TABLE_ID,
        PRIMARY_INDEX_ID,
        &[Datum::Int(table_id as i64)],
    );
    let end = keys::prefix_end(&start);
    let pairs = txn
        .scan_in(
            Keyspace::Sql,
            CATALOG_SPHERE,
            &start,
            &end,
            MAX_SPHERES_PER_SCAN,
        )
        .await?;
    if pairs.len() as u32 >= MAX_SPHERES_PER_SCAN {
        return Err(SqlError::new(
            "54000",
            format!(
                "the table has rows in more than {MAX_SPHERES_PER_SCAN} spheres; filter on \
                 sphere_id"
            ),
        ));
    }
    let mut spheres = Vec::with_capacity(pairs.len());
    for kv in pairs {
        let full = Keyspace::Sql.key(CATALOG_SPHERE, &kv.key);
        let decoded = keys::decode_sql_row_key(&full)
            .map_err(|e| SqlError::corruption(format!("sphere directory key: {e}")))?;
        match decoded.pk.as_slice() {
            [Datum::Int(_), Datum::Int(sphere)] => spheres.push(*sphere as u64),
            other => {
                return Err(SqlError::corruption(format!(
                    "sphere directory key holds {other:?}"
                )))
            }
        }
    }
    Ok(spheres)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(id: u32, name: &str, ty: SqlType) -> ColumnDesc {
        ColumnDesc {
            id,
            name: name.into(),
            ty,
            nullable: true,
            default: None,
        }
    }

    fn posts() -> TableDesc {
        TableDesc {
            id: 100,
            name: "posts".into(),
            columns: vec![
                column(1, "sphere_id", SqlType::Int64),
                column(2, "id", SqlType::Int64),
                column(3, "body", SqlType::Text),
            ],
            primary_key: vec![1, 2],
            next_column_id: 4,
        }
    }

    #[test]
    fn a_table_keyed_by_sphere_is_valid_and_others_are_told_how_to_fix_it() {
        posts().validate().unwrap();
        let mut no_sphere = posts();
        no_sphere.primary_key = vec![2];
        let err = no_sphere.validate().unwrap_err();
        assert_eq!(err.code, "42P16");
        assert!(err.message.contains("PRIMARY KEY (sphere_id, id)"), "{err}");
        let mut float_key = posts();
        float_key.columns[1].ty = SqlType::Float64;
        assert!(float_key.validate().is_err());
    }

    #[test]
    fn row_keys_decode_back_and_stay_inside_the_table_span() {
        let t = posts();
        let key = t.row_key(&[Datum::Int(7), Datum::Int(-3)]);
        let (start, end) = t.rows_span();
        assert!(key >= start && key < end);
        assert_eq!(
            t.decode_row_key(&key).unwrap(),
            vec![Datum::Int(7), Datum::Int(-3)]
        );
        let mut other = posts();
        other.id = 101;
        assert!(other.decode_row_key(&key).is_err());
    }
}
