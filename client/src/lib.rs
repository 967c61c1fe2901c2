//! SphereDB client library.
//!
//! Holds the wire protocol (`.proto` files under `client/proto`) and an async client that
//! connects to seed addresses, finds each range's leader, follows `NotLeader` hints, retries
//! what is safe to retry with bounded backoff and a per-call deadline, and returns typed
//! errors. It does not link RocksDB.
//!
//! ```no_run
//! # async fn demo() -> Result<(), spheredb_client::ClientError> {
//! let client = spheredb_client::Client::connect(&["127.0.0.1:7400"], Default::default()).await?;
//! client.put(1, b"greeting", b"hello").await?;
//! assert_eq!(client.get(1, b"greeting").await?.as_deref(), Some(&b"hello"[..]));
//! # Ok(()) }
//! ```

pub mod client;
pub mod error;
pub mod feed;
pub mod limits;
pub mod txn;

/// Generated protobuf types and gRPC stubs.
pub mod proto {
    /// Key-value and admin API.
    pub mod v1 {
        tonic::include_proto!("spheredb.v1");
    }
    /// Node-to-node Raft transport.
    pub mod raft {
        tonic::include_proto!("spheredb.raft.v1");
    }
}

pub use client::{Client, ClientOptions, Consistency};
pub use error::ClientError;
pub use feed::{Change, Cursor, FeedItem, Subscription};
/// The stored form of a sphere's raw key, as the admin API's split keys take it.
pub use spheredb_storage::keys::kv_key;
/// A sphere's raw KV keys or its SQL rows: the `_in` calls of [`Client`] and [`Txn`] take it.
pub use spheredb_storage::keys::Keyspace;
/// The wall-clock milliseconds of a timestamp (a cursor's, a change's commit ts).
pub use spheredb_storage::mvcc::physical_ms;
pub use txn::{Txn, TxnBody};
