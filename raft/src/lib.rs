//! Raft for SphereDB ranges: openraft over the node's shared RocksDB.
//!
//! - [`log_store`]: per-range log in the `raft_log` column family, durable through
//!   [`group_commit`] (one WAL fsync for many appends across ranges).
//! - [`state_machine`]: applies commands to the `data` family atomically with the applied id;
//!   builds and installs snapshots.
//! - [`network`]: tonic transport, one connection per peer node for all ranges.
//!
//! This crate does not decide placement or membership; the engine does.

pub mod group_commit;
pub mod layout;
pub mod log_store;
pub mod network;
pub mod registry;
pub mod snapshot;
pub mod spans;
pub mod state_machine;
pub mod txn;
pub mod types;

pub use types::*;
