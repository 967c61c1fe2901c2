//! The SphereDB node: ranges, membership, the KV and admin services, and the `spheredb`
//! command line.
//!
//! Rooms:
//! - [`node`]: a running node (start-up, replicas, fail-stop, the disk guard);
//! - [`range`]: what happens to one range's span: splits, merges, quiescence;
//! - [`meta`]: the meta range's bookkeeping (descriptors, liveness, load) and the allocator;
//! - [`service`]: the gRPC services (KV, admin) and the cluster status view;
//! - [`cli`], [`config`], [`demo`]: the `spheredb` command.

pub mod cli;
pub mod config;
pub mod demo;
pub mod errors;
pub mod meta;
pub mod node;
pub mod range;
pub mod service;

pub use config::NodeConfig;
pub use node::Node;
