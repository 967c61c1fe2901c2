//! What happens to a range's span: splits (by size or load), merges of small cold
//! neighbours, and quiescence of idle ranges. Each protocol keeps its decisions in pure
//! functions over plain data (`split::split_point`, `merge::merge_candidates`), apart from the
//! RPCs that carry them out.

pub mod merge;
pub mod quiesce;
pub mod split;
