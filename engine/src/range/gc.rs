//! MVCC garbage collection on a node: range leaders raise their range's GC horizon through
//! Raft as time passes, and every replica collects the versions behind the horizon it has
//! applied, in bounded passes off the write path.
//!
//! The horizon is `--gc-ttl` behind the newest oracle timestamp the node holds, and below the
//! oldest lock in the range (a later issue lowers it for spans whose history moves to cold
//! storage first). It lives in the range's applied state,
//! so every replica refuses the same reads, snapshots carry it, a split's halves keep it and a
//! merge takes the higher of the two. A read checks it *after* reading: collection starts only
//! once a horizon is applied, so a read at or above the horizon it finds afterwards read
//! versions collection leaves alone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use spheredb_raft::network::ReplicaDirectory;
use spheredb_raft::{Command, RangeId};
use spheredb_storage::mvcc::{self, Timestamp};
use spheredb_storage::Db;
use tokio::sync::watch;

use crate::meta::tso::{compose, physical_ms};
use crate::range::timestamps::NodeTimestamps;

/// Keys one collection pass of a range reads before it yields to the next range.
pub const GC_MAX_KEYS_PER_PASS: u64 = 10_000;
/// A leader raises its range's horizon once the target moved this far past it.
pub const GC_HORIZON_STEP_MS: u64 = 1_000;
/// Longest a horizon proposal waits for its commit.
const GC_PROPOSE_TIMEOUT_MS: u64 = 5_000;

/// The horizon `ttl_ms` behind `newest`, an oracle timestamp; `None` before the oracle's
/// clock has passed the TTL.
pub fn horizon_target(newest: Timestamp, ttl_ms: u64) -> Option<Timestamp> {
    let physical = physical_ms(newest);
    (newest > 0 && physical > ttl_ms).then(|| compose(physical - ttl_ms, 0))
}

/// Locks a leader reads to find its range's oldest before it raises the horizon; with more,
/// the horizon waits (for them to be resolved).
pub const GC_MAX_LOCKS_SCANNED: usize = 10_000;

/// The horizon a range with `oldest_lock` (the oldest start ts of its locks) may move to when
/// the time-based target is `target`: below every lock, so the transaction of a lock can still
/// commit above what it read and a prewrite of it is never refused for the horizon.
pub fn below_locks(target: Timestamp, oldest_lock: Option<Timestamp>) -> Timestamp {
    match oldest_lock {
        Some(ts) => target.min(ts.saturating_sub(1)),
        None => target,
    }
}

/// Whether a leader whose range is at `current` should raise it to `target`.
pub fn should_raise(current: Timestamp, target: Timestamp) -> bool {
    physical_ms(target) >= physical_ms(current) + GC_HORIZON_STEP_MS
}

/// The GC of one node.
pub struct Gc {
    pub db: Db,
    pub replicas: Arc<ReplicaDirectory>,
    pub timestamps: Arc<NodeTimestamps>,
    pub ttl_ms: u64,
    pub interval_ms: u64,
}

/// How far a range's collection got: the horizon it works towards and where it resumes.
#[derive(Debug, Clone, Default)]
struct Progress {
    horizon: Timestamp,
    /// `None`: the span is collected up to `horizon`.
    resume_key: Option<Vec<u8>>,
}

/// Runs the node's GC every `interval_ms` until `stop`.
pub async fn gc_loop(gc: Gc, mut stop: watch::Receiver<bool>) {
    let mut progress: HashMap<RangeId, Progress> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(Duration::from_millis(gc.interval_ms)) => {}
        }
        let target = horizon_target(gc.timestamps.newest_known(), gc.ttl_ms);
        let replicas = gc.replicas.all();
        progress.retain(|id, _| replicas.iter().any(|r| r.shared.range_id == *id));
        for replica in replicas {
            let range_id = replica.shared.range_id;
            let current = replica.shared.gc_horizon();
            let target = match (target, replica.shared.span()) {
                (Some(t), Some(span)) if replica.raft.is_leader() => {
                    match mvcc::locks::oldest_lock_start_ts(
                        &gc.db,
                        &span.start_key,
                        &span.end_key,
                        GC_MAX_LOCKS_SCANNED,
                    ) {
                        Ok(Some(oldest)) => Some(below_locks(t, oldest)),
                        Ok(None) => None,
                        Err(e) => {
                            tracing::warn!(range_id, "reading the range's locks for GC: {e}");
                            None
                        }
                    }
                }
                _ => None,
            };
            if let Some(target) = target.filter(|t| should_raise(current, *t)) {
                if replica.raft.is_leader() {
                    let proposal = replica
                        .raft
                        .client_write(Command::RaiseGcHorizon { horizon: target });
                    match tokio::time::timeout(
                        Duration::from_millis(GC_PROPOSE_TIMEOUT_MS),
                        proposal,
                    )
                    .await
                    {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::debug!(range_id, "raising the GC horizon: {e}"),
                        Err(_) => tracing::debug!(range_id, "raising the GC horizon timed out"),
                    }
                }
            }
            let horizon = replica.shared.gc_horizon();
            let Some(span) = replica.shared.span() else {
                continue;
            };
            let entry = progress.entry(range_id).or_default();
            if entry.horizon != horizon {
                // A new horizon: the whole span again.
                *entry = Progress {
                    horizon,
                    resume_key: Some(span.start_key.clone()),
                };
            }
            let Some(from) = entry.resume_key.clone() else {
                continue;
            };
            if horizon == 0 {
                entry.resume_key = None;
                continue;
            }
            let db = gc.db.clone();
            let end = span.end_key.clone();
            let pass = tokio::task::spawn_blocking(move || {
                mvcc::gc::collect(&db, &from, &end, horizon, GC_MAX_KEYS_PER_PASS)
            })
            .await;
            match pass {
                Ok(Ok(pass)) => {
                    if pass.versions_collected > 0 {
                        tracing::debug!(
                            range_id,
                            horizon,
                            keys = pass.keys_seen,
                            collected = pass.versions_collected,
                            "collected old versions"
                        );
                    }
                    entry.resume_key = pass.resume_key;
                }
                Ok(Err(e)) => tracing::warn!(range_id, "collecting old versions: {e}"),
                Err(e) => tracing::warn!(range_id, "collection task failed: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_horizon_trails_the_oracle_by_the_ttl_and_moves_in_steps() {
        let ttl_ms = 25 * 3_600_000;
        assert_eq!(horizon_target(0, ttl_ms), None);
        assert_eq!(horizon_target(compose(1_000, 5), ttl_ms), None);
        let now = compose(ttl_ms + 10_000, 77);
        assert_eq!(horizon_target(now, ttl_ms), Some(compose(10_000, 0)));
        assert!(should_raise(0, compose(10_000, 0)));
        assert!(!should_raise(compose(9_500, 0), compose(10_000, 0)));
        assert!(should_raise(compose(9_000, 0), compose(10_000, 0)));
    }

    #[test]
    fn the_horizon_stays_below_the_oldest_lock() {
        assert_eq!(below_locks(100, None), 100);
        assert_eq!(below_locks(100, Some(50)), 49);
        assert_eq!(below_locks(100, Some(500)), 100);
    }
}
