//! The SphereDB node: ranges, membership, the KV and admin services, and the `spheredb`
//! command line.
//!
//! Rooms:
//! - [`node`]: a running node (start-up, replica lifecycle, its heartbeat, fail-stop); it
//!   builds every other part and wires them, and no other room imports it;
//! - [`range`]: what happens to one range's span: splits, merges, quiescence;
//! - [`meta`]: the meta range's bookkeeping (descriptors, liveness, load) and the allocator;
//! - [`service`]: the gRPC services (KV, transactions, change feeds, admin) and the cluster status view;
//! - [`peers`]: calls to other nodes' admin services and to the meta-range leader;
//! - [`replica`], [`descriptor`], [`ids`]: read-only views of a local replica, descriptor
//!   conversions, and the fixed range ids, shared by every room;
//! - [`disk`]: the disk-space guard;
//! - [`cli`], [`feed_cli`], [`config`], [`demo`]: the `spheredb` command.

pub mod cli;
pub mod config;
pub mod demo;
pub mod descriptor;
pub mod disk;
pub mod errors;
pub mod feed_cli;
pub mod ids;
pub mod meta;
pub mod node;
pub mod peers;
pub mod range;
pub mod replica;
pub mod service;
pub mod sql_cli;

pub use config::NodeConfig;
pub use node::Node;
