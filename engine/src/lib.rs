//! The SphereDB node: ranges, membership, the KV and admin services, and the `spheredb`
//! command line.

pub mod admin_service;
pub mod allocator;
pub mod cli;
pub mod config;
pub mod demo;
pub mod disk;
pub mod errors;
pub mod health;
pub mod kv_service;
pub mod merge;
pub mod meta;
pub mod node;
pub mod quiesce;
pub mod split;
pub mod status;

pub use config::NodeConfig;
pub use node::Node;
