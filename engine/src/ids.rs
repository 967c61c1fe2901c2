//! Range ids every room of the engine agrees on. Constants only: this module imports
//! nothing from the crate, so any module may import it.

use spheredb_raft::RangeId;

/// The meta range: descriptors, node registry, liveness. Never splits, never quiesces.
pub const META_RANGE_ID: RangeId = 1;
/// The range a new cluster starts with for all user data.
pub const FIRST_USER_RANGE_ID: RangeId = 2;
