//! SQL over SphereDB: sphere-partitioned tables queried with DataFusion, changed in
//! transactions, served over the PostgreSQL wire protocol.
//!
//! - [`catalog`]: table descriptors, stored as rows of reserved tables in sphere 0;
//! - [`types`] and [`row`]: column types and the column-id-tagged row encoding;
//! - [`table`]: a table as a DataFusion table read in a transaction;
//! - [`session`]: one connection's statements and transaction (DML is planned here);
//! - [`returning`]: the RETURNING list over the rows a statement changed;
//! - [`upsert`]: the new values of `INSERT ... ON CONFLICT DO UPDATE`;
//! - [`as_of`]: `AS OF SYSTEM TIME`, cut from a statement's text;
//! - [`cancel`]: cancel requests for a session's running statement;
//! - [`params`]: the types of `$n` parameters a statement's text fixes;
//! - [`pg`]: the PostgreSQL wire protocol front end.
//!
//! The SQL layer reaches data only through the [`spheredb_client`] API applications use.

pub mod as_of;
pub mod cancel;
pub mod catalog;
pub mod error;
pub mod params;
pub mod pg;
pub mod returning;
pub mod row;
pub mod session;
pub mod table;
pub mod types;
pub mod upsert;

pub use error::SqlError;
pub use pg::serve;
pub use session::{Outcome, Session};

/// The PostgreSQL version clients are told (`server_version`): the protocol and catalog
/// behaviour SphereDB follows.
pub const SERVER_VERSION: &str = "15.0 (SphereDB)";
