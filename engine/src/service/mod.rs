//! The node's gRPC services: the KV API, the admin API, and the cluster status view the CLI
//! assembles from them.

pub mod admin;
pub mod feed;
pub mod kv;
pub mod status;
pub mod txn;
