//! What happens to a range's span: splits (by size or load), merges of small cold
//! neighbours, and quiescence of idle ranges. Each protocol keeps its decisions in pure
//! functions over plain data (`split::split_point`, `merge::plan`), apart from the RPCs that
//! carry them out (the merge's behind `merge::MergeTransport`). These modules take the few
//! handles they use as arguments and do not import `node`.

pub mod commit_ts;
pub mod gc;
pub mod leadership;
pub mod merge;
pub mod quiesce;
pub mod split;
pub mod timestamps;
