//! SphereDB storage: one RocksDB per node, the key encoding, and checksummed records.
//!
//! This crate owns the on-disk layout (column families, key prefixes, record framing).
//! It knows nothing about Raft or the network; `spheredb-raft` builds the log store and
//! state machine on top of it.

#[cfg(feature = "rocksdb")]
pub mod db;
pub mod error;
pub mod keys;
pub mod mvcc;
pub mod record;

#[cfg(feature = "rocksdb")]
pub use db::{ColumnFamilyName, Db, DbOptions};
pub use error::StorageError;
