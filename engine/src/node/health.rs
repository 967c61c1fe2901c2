//! Fail-stop: the node stops itself when it can no longer keep its promises.
//!
//! A node that keeps answering status calls while a Raft group inside it has stopped (a
//! failed fsync, a failed snapshot build, a storage error, a panic in openraft's core) looks
//! live to the allocator, so its replicas are never replaced, and its clients get
//! `OUTCOME_UNKNOWN` forever. Instead the node reports the first fatal condition and the
//! `spheredb start` process exits non-zero; an operator or supervisor restarts it once the
//! cause is fixed, and meanwhile the cluster treats it as dead and re-replicates.
//!
//! Owns: deciding what is fatal ([`fatal_reason`], pure) and watching for it
//! ([`health_loop`]). Must not: try to repair anything.

use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::error::Fatal;
use spheredb_raft::group_commit::GroupCommit;
use spheredb_raft::network::ReplicaDirectory;
use spheredb_raft::{RangeId, TypeConfig};
use tokio::sync::watch;

/// How often the node checks its Raft groups and its WAL syncer.
pub const HEALTH_CHECK_INTERVAL_MS: u64 = 200;

/// The health of one replica's Raft group as the check sees it.
pub struct GroupHealth {
    pub range_id: RangeId,
    /// The replica's data failed a checksum: it is quarantined, and its group stopping is
    /// expected (the allocator replaces the replica; the node goes on).
    pub quarantined: bool,
    pub state: Result<(), Fatal<TypeConfig>>,
}

/// The first fatal condition among the WAL syncer's failure and the running state of each
/// replica's Raft group, or `None` when all is well. A group stopped on purpose
/// (`Fatal::Stopped`: shut down by a merge, a removal or node shutdown) or stopped with its
/// replica quarantined is not fatal.
pub fn fatal_reason(
    wal_failure: Option<String>,
    groups: impl IntoIterator<Item = GroupHealth>,
) -> Option<String> {
    if let Some(reason) = wal_failure {
        return Some(format!(
            "{reason}; the write-ahead log can no longer be trusted"
        ));
    }
    groups.into_iter().find_map(|g| match g.state {
        Ok(()) | Err(Fatal::Stopped) => None,
        Err(_) if g.quarantined => None,
        Err(fatal) => Some(format!(
            "the Raft group of range {} stopped: {fatal}",
            g.range_id
        )),
    })
}

/// Checks every [`HEALTH_CHECK_INTERVAL_MS`] until a fatal condition appears, then publishes
/// it on `fatal` and ends. Ends too when `stop` turns true.
pub async fn health_loop(
    replicas: Arc<ReplicaDirectory>,
    group_commit: GroupCommit,
    fatal: watch::Sender<Option<String>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(Duration::from_millis(HEALTH_CHECK_INTERVAL_MS)) => {}
        }
        let groups = replicas.all().into_iter().map(|r| GroupHealth {
            range_id: r.shared.range_id,
            quarantined: r.shared.quarantined().is_some(),
            state: r.raft.metrics().borrow_watched().running_state.clone(),
        });
        if let Some(reason) = fatal_reason(group_commit.failure(), groups) {
            tracing::error!(%reason, "fatal: this node stops serving");
            let _ = fatal.send(Some(reason));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(range_id: RangeId, state: Result<(), Fatal<TypeConfig>>) -> GroupHealth {
        GroupHealth {
            range_id,
            quarantined: false,
            state,
        }
    }

    #[test]
    fn stopped_groups_are_fine_failed_ones_and_wal_failures_are_fatal() {
        assert_eq!(
            fatal_reason(None, [group(2, Ok(())), group(3, Err(Fatal::Stopped))]),
            None
        );
        let reason =
            fatal_reason(None, [group(2, Ok(())), group(3, Err(Fatal::Panicked))]).unwrap();
        assert!(reason.contains("range 3"), "{reason}");
        let reason =
            fatal_reason(Some("WAL fsync failed: EIO".into()), [group(2, Ok(()))]).unwrap();
        assert!(reason.contains("EIO"), "{reason}");
    }

    #[test]
    fn a_group_stopped_by_damaged_data_is_quarantined_not_fatal() {
        use openraft::errors::ErrorSource;
        let damaged = || {
            Err(Fatal::StorageError(
                openraft::StorageError::read_state_machine(ErrorSource::from_string(
                    "checksum mismatch",
                )),
            ))
        };
        let quarantined = GroupHealth {
            range_id: 4,
            quarantined: true,
            state: damaged(),
        };
        assert_eq!(fatal_reason(None, [group(2, Ok(())), quarantined]), None);
        // The same failure without a quarantine (damage the state machine did not see as
        // such) still stops the node.
        assert!(fatal_reason(None, [group(4, damaged())]).is_some());
    }
}
