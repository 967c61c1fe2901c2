//! The replicated state machine of one range, applied to the node's data column families.
//!
//! System keys are written as plain values; sphere keys as versions at the commit ts each
//! write carries (see `spheredb_storage::mvcc`). Apply never reads a clock: the leader fixed
//! the commit ts when it proposed the entry, so every replica writes the same versions.
//!
//! Every applied entry is written in one RocksDB batch together with the applied log id (and
//! membership), so after a crash the state machine is exactly at some applied id: nothing is
//! applied twice or skipped. Snapshots stream the range's key span from a RocksDB snapshot,
//! so building one never blocks or races `apply`; the file format is `crate::snapshot`'s.
//!
//! Installing a snapshot replaces the span's keys in bounded batches, so it is not one atomic
//! write. It is made crash-safe by an install marker: the marker is written (synced) first,
//! then the snapshot file is published as the range's file, then the keys are replaced, and
//! the last batch writes the new applied state and removes the marker. A replica opened
//! with a marker redoes the install from its file when the file is the marked one, and
//! otherwise (the crash came before the file was published, so no key was touched) drops
//! the marker.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use crate::snapshot::remove_temp_files as remove_snapshot_temp_files;
use std::sync::{Arc, RwLock};

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};
use spheredb_storage::mvcc::{self, Timestamp};
use spheredb_storage::{keys, record, ColumnFamilyName, Db, StorageError};

use crate::layout::{state_key, StateTag};
use crate::log_store::{decode_record, encode_record, read_state, write_state};
use crate::registry;
use crate::snapshot::{
    AppliedMerge, SnapshotFile, SnapshotHeader, SnapshotWriter, SNAPSHOT_FORMAT_VERSION,
};
use crate::spans::{SpanChange, SpanRegistry};
use crate::types::{
    Command, CommandResponse, LogId, Membership, MergeFreeze, RangeId, RangeRecord, RangeSpan,
    RangeTimes, ReplicaId, SnapshotData, SnapshotMeta, StoredMembership, TxnRefusal, TypeConfig,
    WriteOp,
};

/// Locks a `RaiseGcHorizon` reads on apply to keep the horizon below them; with more, the
/// horizon does not move.
pub const MAX_LOCKS_READ_FOR_GC_HORIZON: usize = 10_000;

/// An install writes the snapshot's pairs in batches of about this size.
pub const MAX_INSTALL_BATCH_BYTES: usize = 4 << 20;
/// How often a merge waiting for a snapshot install of its right-hand range looks again.
const MERGE_INSTALL_POLL_MS: u64 = 10;
/// How often a merge still waiting says so in the log.
const MERGE_WAIT_REPORT_MS: u64 = 10_000;
/// Merges a range remembers (see `AppliedState::recent_merges`).
pub const MAX_RECENT_MERGES: usize = 16;
/// Most range events queued for the node before apply waits for it to catch up.
pub const MAX_PENDING_RANGE_EVENTS: usize = 4096;

/// What the node must act on after an apply: a new range to start, a span that changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeEvent {
    /// `parent` split off `child`. When `child_here`, this node's replica of `child` exists on
    /// disk and must be started.
    Split {
        parent: RangeId,
        child: RangeId,
        child_here: bool,
    },
    /// `left` took over `right`; this node's replica of `right` must stop, its data now
    /// belonging to `left`.
    Merged { left: RangeId, right: RangeId },
}

/// What a replica last applied, as the rest of the node sees it.
#[derive(Debug, Clone)]
struct AppliedView {
    span: Option<RangeSpan>,
    membership: Membership,
    frozen: Option<MergeFreeze>,
    recent_merges: Vec<AppliedMerge>,
    gc_horizon: Timestamp,
    /// Index of the last log entry applied (or covered by the installed snapshot).
    applied_index: Option<u64>,
}

/// What a range's state machine shares with the rest of the node.
#[derive(Debug)]
pub struct ReplicaShared {
    pub range_id: RangeId,
    /// Span, membership and freeze as last applied, always from the same apply.
    applied: RwLock<AppliedView>,
    /// Bytes written by applied commands since the node last measured the range.
    pub written_bytes: AtomicU64,
    /// True once the node stopped this replica for good (destroyed, or subsumed by a
    /// merge). openraft does not wait for its state-machine worker on shutdown, so an apply
    /// or install already queued may still run: it holds this lock (read) across its write
    /// and its span-registry update and does nothing once retired, and the node sets it
    /// (write) before it deletes or hands over the replica's keys.
    retired: RwLock<bool>,
    /// Why this replica's data cannot be trusted (a checksum mismatch), once it is found.
    quarantine: std::sync::Mutex<Option<String>>,
    /// Set once the replica's Raft group runs, after openraft replayed the committed
    /// entries at start-up (the failpoint `sm-apply-stall` holds back only later applies).
    running: std::sync::atomic::AtomicBool,
    /// Counts the applies (and snapshot installs) written, for change feeds that wake on them.
    applies: tokio::sync::watch::Sender<u64>,
}

impl ReplicaShared {
    fn new(range_id: RangeId, applied: &AppliedState) -> ReplicaShared {
        ReplicaShared {
            range_id,
            applied: RwLock::new(applied.view()),
            written_bytes: AtomicU64::new(0),
            retired: RwLock::new(false),
            quarantine: std::sync::Mutex::new(None),
            running: std::sync::atomic::AtomicBool::new(false),
            applies: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Changes whenever the replica wrote an apply or installed a snapshot: a change feed
    /// waits on it for new changes to read.
    pub fn watch_applies(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applies.subscribe()
    }

    /// Marks the replica's Raft group as running (its start-up replay is done).
    pub fn mark_running(&self) {
        self.running
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Why the replica is quarantined, if it is: its data failed a checksum, so it serves
    /// nothing and its Raft group stops; the node reports it and the allocator replaces it.
    pub fn quarantined(&self) -> Option<String> {
        self.quarantine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Marks the replica retired: from now on its state machine writes nothing. Waits for a
    /// write in progress to finish.
    pub fn retire(&self) {
        *self.retired.write().unwrap_or_else(|p| p.into_inner()) = true;
    }

    /// Holds off [`ReplicaShared::retire`] while the replica writes; an error once retired.
    fn writing(&self) -> io::Result<std::sync::RwLockReadGuard<'_, bool>> {
        let guard = self.retired.read().unwrap_or_else(|p| p.into_inner());
        if *guard {
            return Err(io::Error::other(format!(
                "replica of range {} was stopped by the node; not writing",
                self.range_id
            )));
        }
        Ok(guard)
    }

    fn view(&self) -> std::sync::RwLockReadGuard<'_, AppliedView> {
        self.applied.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Index of the last log entry applied, or covered by the installed snapshot.
    pub fn applied_index(&self) -> Option<u64> {
        self.view().applied_index
    }

    /// The span as last applied; `None` until the replica received its first snapshot.
    pub fn span(&self) -> Option<RangeSpan> {
        self.view().span.clone()
    }

    /// The GC horizon as last applied: reads below it are refused, versions they would need
    /// may be gone.
    pub fn gc_horizon(&self) -> Timestamp {
        self.view().gc_horizon
    }

    /// The merge this range is frozen for, if any.
    pub fn frozen(&self) -> Option<MergeFreeze> {
        self.view().frozen
    }

    /// True when this range took over range `right` (among its last
    /// [`MAX_RECENT_MERGES`] merges).
    pub fn merged(&self, right: RangeId) -> bool {
        self.view().recent_merges.iter().any(|m| m.right == right)
    }

    /// The descriptor as last applied: span and the membership applied with it.
    pub fn record(&self) -> Option<RangeRecord> {
        let applied = self.view();
        let span = applied.span.clone()?;
        Some(RangeRecord::new(span, &applied.membership))
    }

    fn set_applied(&self, applied: &AppliedState) {
        *self.applied.write().unwrap_or_else(|p| p.into_inner()) = applied.view();
        self.applies.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The log id at which a range created by bootstrap or by a split starts: its log is
/// "purged" up to here, so a new replica always starts from a snapshot of the data, never
/// from a replay that would miss what the data held before the range existed.
pub fn range_origin_log_id() -> LogId {
    use openraft::vote::RaftLeaderIdExt;
    openraft::LogId::new(
        openraft::vote::leader_id_adv::LeaderId::<u64, u64>::new_committed(0, 0),
        0,
    )
}

/// Adds to `batch` the on-disk state of a new replica of `span` whose members are
/// `membership`: applied and purged up to [`range_origin_log_id`], no log, no vote.
pub fn write_range_origin(
    db: &Db,
    batch: &mut WriteBatch,
    span: &RangeSpan,
    membership: Membership,
    times: RangeTimes,
) -> io::Result<()> {
    let origin = range_origin_log_id();
    let applied = AppliedState {
        last_applied: Some(origin),
        membership: StoredMembership::new(Some(origin), membership),
        span: Some(span.clone()),
        times,
        ..AppliedState::default()
    };
    let state = db.cf(ColumnFamilyName::RaftState);
    batch.put_cf(
        state,
        state_key(span.range_id, StateTag::Applied),
        encode_record(&applied)?,
    );
    batch.put_cf(
        state,
        state_key(span.range_id, StateTag::LastPurged),
        encode_record(&origin)?,
    );
    Ok(())
}

/// The span and membership a replica of `range_id` on this node has applied, if any.
pub fn stored_state(
    db: &Db,
    range_id: RangeId,
) -> io::Result<Option<(Option<RangeSpan>, Membership)>> {
    Ok(read_state::<AppliedState>(db, range_id, StateTag::Applied)?
        .map(|a| (a.span, a.membership.membership().clone())))
}

/// Most responses held back by one apply batch before it is written.
pub const MAX_APPLY_BATCH_ENTRIES: usize = 1024;
/// Largest apply batch before it is written.
pub const MAX_APPLY_BATCH_BYTES: usize = 32 << 20;

/// Writes of applied entries not yet handed to RocksDB, with an overlay so later entries of
/// the batch read what earlier ones wrote.
#[derive(Default)]
struct PendingApply {
    batch: WriteBatch,
    /// Each key's value as the batch leaves it (`None`: deleted).
    overlay: std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>,
    events: Vec<RangeEvent>,
    /// Keys this batch moves between ranges (splits, merges), for the span registry.
    span_changes: Vec<SpanChange>,
    responders: Vec<(
        openraft::storage::ApplyResponder<TypeConfig>,
        CommandResponse,
    )>,
}

/// Applied state as persisted with the data.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppliedState {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// `None` for a replica created empty, until its first snapshot.
    span: Option<RangeSpan>,
    /// Set while the range is frozen for a merge into its left neighbour.
    frozen: Option<MergeFreeze>,
    /// No snapshot older than this may be sent or kept as current: set by every split and
    /// merge applied (a replica replaying a merge from an older snapshot would lack the right
    /// side's data; one replaying a split would carry the old, wider span) and by every
    /// snapshot installed (the file is written after the database, so a crash in between
    /// leaves an older file behind). `get_current_snapshot` builds a fresh one instead.
    snapshot_floor: Option<LogId>,
    /// The last merges applied, newest last: how an abort learns that a merge happened even
    /// after the span changed again.
    recent_merges: Vec<AppliedMerge>,
    #[serde(default)]
    times: RangeTimes,
}

impl AppliedState {
    fn view(&self) -> AppliedView {
        AppliedView {
            span: self.span.clone(),
            membership: self.membership.membership().clone(),
            frozen: self.frozen,
            recent_merges: self.recent_merges.clone(),
            gc_horizon: self.times.gc_horizon,
            applied_index: self.last_applied.as_ref().map(|l| l.index),
        }
    }
}

pub use spheredb_storage::mvcc::store::{KvPair, ScanPage};

/// The value of the system key `key`; verifies its checksum.
pub fn read_system_value(db: &Db, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
    db.get_record(ColumnFamilyName::System, key)
}

/// The state machine of one range.
pub struct StateMachine {
    db: Db,
    range_id: RangeId,
    /// This replica's id in the range.
    replica_id: ReplicaId,
    applied: AppliedState,
    snapshot_dir: PathBuf,
    /// Last log id of the newest snapshot file this replica wrote (shared by its handles).
    newest_snapshot_file: Arc<std::sync::Mutex<Option<Option<LogId>>>>,
    /// The node's span registry: the only way this replica gains or drops keys.
    spans: Arc<SpanRegistry>,
    shared: Arc<ReplicaShared>,
    events: tokio::sync::mpsc::Sender<RangeEvent>,
    /// When the failpoint `sm-apply-stall` began its current hold (see [`ApplyStall`]);
    /// never set without it.
    stall_began_at: Option<std::time::Instant>,
}

impl StateMachine {
    /// Opens the state machine of `range_id` (its span comes from its applied state) and
    /// claims that span in `spans`; a span another local replica claims is refused.
    /// Returns it with the state it shares with the node.
    pub fn open(
        db: Db,
        range_id: RangeId,
        replica_id: ReplicaId,
        snapshot_dir: &Path,
        spans: Arc<SpanRegistry>,
        events: tokio::sync::mpsc::Sender<RangeEvent>,
    ) -> io::Result<(StateMachine, Arc<ReplicaShared>)> {
        std::fs::create_dir_all(snapshot_dir)?;
        let applied: AppliedState =
            read_state(&db, range_id, StateTag::Applied)?.unwrap_or_default();
        let redo = interrupted_install(&db, range_id, snapshot_dir)?;
        // A replica whose install a crash interrupted claims the span it was replacing.
        let (claim, frozen_into) = match &redo {
            Some(file) => (
                file.header().span.clone(),
                file.header().frozen.map(|f| f.into),
            ),
            None => (applied.span.clone(), applied.frozen.map(|f| f.into)),
        };
        let claimed = spans
            .open(range_id, claim.as_ref(), frozen_into)
            .map_err(|conflict| {
                io::Error::from(StorageError::corruption(
                    "replica spans",
                    format!("{conflict}: two local replicas own the same keys"),
                ))
            })?;
        let shared = Arc::new(ReplicaShared::new(range_id, &applied));
        if let Some(reason) = read_state::<String>(&db, range_id, StateTag::Quarantined)? {
            *shared.quarantine.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        }
        let mut sm = StateMachine {
            db,
            range_id,
            replica_id,
            applied,
            snapshot_dir: snapshot_dir.to_path_buf(),
            newest_snapshot_file: Arc::default(),
            spans,
            shared: shared.clone(),
            events,
            stall_began_at: None,
        };
        if let (Some(_), false) = (&redo, claimed) {
            // A frozen replica whose keys a merged range owns now, with its own keys maybe
            // half replaced. Merges wait for installs (`apply_merge`), so this is never
            // expected: the replica is quarantined (and collected), the merged range's keys
            // are left alone.
            quarantine(
                &sm.db,
                &shared,
                "an interrupted snapshot install of a range merged away",
            )?;
            sm.db
                .write(install_marker_removal(&sm.db, range_id), true)
                .map_err(io::Error::from)?;
        } else if let Some(file) = redo {
            tracing::warn!(range_id, last_log_id = ?file.meta().last_log_id, "redoing a snapshot install a crash interrupted");
            sm.applied = sm.load_snapshot(&file)?;
            *sm.newest_snapshot_file
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(file.meta().last_log_id);
            shared.set_applied(&sm.applied);
        }
        Ok((sm, shared))
    }

    fn span_bounds(&self) -> (Vec<u8>, Vec<u8>) {
        match &self.applied.span {
            Some(s) => (s.start_key.clone(), s.end_key.clone()),
            // An empty replica owns nothing: an empty interval at the start.
            None => (Vec::new(), vec![0]),
        }
    }

    fn snapshot_path(&self) -> PathBuf {
        snapshot_file(&self.snapshot_dir, self.range_id)
    }

    /// The value of `key` as applied so far, including the pending batch.
    fn current(&self, pending: &PendingApply, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        if let Some(value) = pending.overlay.get(key) {
            return Ok(value.clone());
        }
        if !keys::is_sphere_key(key) {
            return Ok(read_system_value(&self.db, key)?);
        }
        let newest = mvcc::store::get_at(&self.db, None, key, Timestamp::MAX)?;
        Ok(newest.and_then(|v| v.value))
    }

    /// Checks that `key` may be written by a command committing at `commit_ts`: inside the
    /// span, and for a sphere key above the range's last commit (see
    /// [`RangeTimes::last_commit_ts`]). A write at or below it could hide an acknowledged
    /// write behind an older one, or land below a read that already happened, so the leader
    /// never proposes one; applying it anyway is refused on every replica alike. The check
    /// is range-wide rather than per key (which would cost a lookup of the key's newest
    /// version in every write): the range's leaders fix commit timestamps in log order.
    fn check_write(&self, key: &[u8], commit_ts: Option<Timestamp>) -> Result<(), CommandResponse> {
        self.check_in_span(key)?;
        if !keys::is_sphere_key(key) {
            return Ok(());
        }
        let Some(commit_ts) = commit_ts else {
            return Err(CommandResponse::Rejected {
                reason: "a write of a sphere key carries no commit timestamp".into(),
            });
        };
        match crate::txn::lock_refusal(&self.db, key) {
            Ok(Some(locked)) => return Err(CommandResponse::TxnRefused(locked)),
            Ok(None) => {}
            Err(e) => {
                // Refused like a write that met a lock: the caller retries, nothing applied.
                tracing::error!(range_id = self.range_id, "reading a lock: {e}");
                return Err(CommandResponse::Rejected {
                    reason: format!("cannot read the key's lock: {e}"),
                });
            }
        }
        let last = self.applied.times.last_commit_ts;
        if commit_ts <= last {
            tracing::error!(
                range_id = self.range_id,
                commit_ts,
                last_commit_ts = last,
                "refusing a write at or below the range's last commit: the leader's commit timestamps went backwards"
            );
            return Err(CommandResponse::Rejected {
                reason: format!(
                    "commit timestamp {commit_ts} is not above the range's last commit {last}; \
                     the write was not applied"
                ),
            });
        }
        Ok(())
    }

    /// Writes `key` (checked by [`Self::check_write`]) into the pending batch.
    fn write_key(
        &mut self,
        pending: &mut PendingApply,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        commit_ts: Option<Timestamp>,
    ) {
        if keys::is_sphere_key(&key) {
            let ts = commit_ts.unwrap_or_default();
            mvcc::store::put_version(&self.db, &mut pending.batch, &key, ts, value.as_deref());
            let last = &mut self.applied.times.last_commit_ts;
            *last = (*last).max(ts);
        } else {
            match &value {
                Some(v) => {
                    self.db
                        .batch_put_record(&mut pending.batch, ColumnFamilyName::System, &key, v)
                }
                None => pending
                    .batch
                    .delete_cf(self.db.cf(ColumnFamilyName::System), &key),
            }
        }
        pending.overlay.insert(key, value);
    }

    fn put_applied(&self, batch: &mut WriteBatch) -> io::Result<()> {
        batch.put_cf(
            self.db.cf(ColumnFamilyName::RaftState),
            state_key(self.range_id, StateTag::Applied),
            encode_record(&self.applied)?,
        );
        Ok(())
    }

    fn check_in_span(&self, key: &[u8]) -> Result<(), CommandResponse> {
        if let Some(frozen) = &self.applied.frozen {
            return Err(CommandResponse::Frozen { into: frozen.into });
        }
        match &self.applied.span {
            Some(span) if span.contains(key) => Ok(()),
            span => Err(CommandResponse::OutsideSpan {
                span: span.clone().map(Box::new),
            }),
        }
    }

    /// Checks that every key of a transaction command is a sphere key of this range, and
    /// that a prewrite's `start_ts` (0 for other commands) is above the GC horizon: versions
    /// it should conflict with may be gone below it, and the rollback records that keep late
    /// prewrites out are collected there.
    fn check_txn_keys<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k [u8]>,
        start_ts: Timestamp,
    ) -> Option<CommandResponse> {
        for key in keys {
            if !keys::is_sphere_key(key) {
                return Some(CommandResponse::Rejected {
                    reason: "a transaction names a key outside every sphere".into(),
                });
            }
            if let Err(refused) = self.check_in_span(key) {
                return Some(refused);
            }
        }
        let horizon = self.applied.times.gc_horizon;
        (start_ts != 0 && start_ts <= horizon).then_some(CommandResponse::TxnRefused(
            TxnRefusal::BelowGcHorizon { horizon },
        ))
    }

    /// The rejection of a `what` (split, merge) that expected the range at
    /// `expected_generation` while it is at another.
    fn stale_generation(
        &self,
        span: &RangeSpan,
        expected_generation: u64,
        what: &str,
    ) -> Option<CommandResponse> {
        (span.generation != expected_generation).then(|| CommandResponse::Rejected {
            reason: format!(
                "range {} is at generation {}, the {what} expected {expected_generation}",
                self.range_id, span.generation
            ),
        })
    }

    /// Splits the range at `split_key`: shrinks this span and writes the origin state of the
    /// right half's replica on this node, all in the pending batch.
    fn apply_split(
        &mut self,
        pending: &mut PendingApply,
        split_key: Vec<u8>,
        new_range_id: RangeId,
        expected_generation: u64,
    ) -> io::Result<CommandResponse> {
        let Some(span) = self.applied.span.clone() else {
            return Ok(CommandResponse::OutsideSpan { span: None });
        };
        if let Some(rejected) = self.stale_generation(&span, expected_generation, "split") {
            return Ok(rejected);
        }
        if let Some(frozen) = &self.applied.frozen {
            return Ok(CommandResponse::Frozen { into: frozen.into });
        }
        if split_key <= span.start_key || !span.contains(&split_key) {
            return Ok(CommandResponse::Rejected {
                reason: format!("split key is not strictly inside range {}", self.range_id),
            });
        }
        let membership = self.applied.membership.membership().clone();
        if membership.get_joint_config().len() > 1 {
            return Ok(CommandResponse::Rejected {
                reason: "a replica change is in progress; split after it".into(),
            });
        }
        let generation = span.generation + 1;
        let left = RangeSpan {
            end_key: split_key.clone(),
            generation,
            ..span.clone()
        };
        let right = RangeSpan {
            range_id: new_range_id,
            start_key: split_key,
            end_key: span.end_key.clone(),
            generation,
            next_replica_id: span.next_replica_id,
        };
        if !membership.nodes().any(|(id, _)| *id == self.replica_id) {
            // This replica joined after the split was proposed (it caught up from an older
            // snapshot): the right half has no replica here. Its keys are not ours any more.
            self.applied.span = Some(left.clone());
            self.db
                .batch_delete_range_data(&mut pending.batch, &right.start_key, &right.end_key);
            pending.events.push(RangeEvent::Split {
                parent: self.range_id,
                child: new_range_id,
                child_here: false,
            });
            return Ok(CommandResponse::SplitDone {
                left: Box::new(left),
                right: Box::new(right),
            });
        }
        // Every replica applies the split the same way (the parent's span is replicated
        // state); only what this node keeps of the right half is local. A right half that
        // already has state here (it cannot, while the parent's span covers it) is kept.
        if read_state::<AppliedState>(&self.db, new_range_id, StateTag::Applied)?.is_some() {
            tracing::error!(
                range_id = self.range_id,
                new_range_id,
                "right half of a split already exists on this node; keeping its state"
            );
        } else {
            // The right half's versions were collected up to the parent's horizon, and
            // written up to its last commit.
            write_range_origin(
                &self.db,
                &mut pending.batch,
                &right,
                membership,
                self.applied.times,
            )?;
        }
        self.applied.span = Some(left.clone());
        pending.span_changes.push(SpanChange::SplitChild {
            child: new_range_id,
            span: right.clone(),
        });
        pending.events.push(RangeEvent::Split {
            parent: self.range_id,
            child: new_range_id,
            child_here: true,
        });
        Ok(CommandResponse::SplitDone {
            left: Box::new(left),
            right: Box::new(right),
        })
    }

    /// Freezes the range for a merge: from here on it applies no reads or writes, so its data
    /// is final on every replica that applied this entry.
    fn apply_freeze(&mut self, freeze: MergeFreeze, expected_generation: u64) -> CommandResponse {
        let Some(span) = self.applied.span.clone() else {
            return CommandResponse::OutsideSpan { span: None };
        };
        if let Some(frozen) = &self.applied.frozen {
            return if *frozen == freeze {
                CommandResponse::FreezeDone {
                    span: Box::new(span),
                }
            } else {
                CommandResponse::Frozen { into: frozen.into }
            };
        }
        if let Some(rejected) = self.stale_generation(&span, expected_generation, "merge") {
            return rejected;
        }
        if self
            .applied
            .membership
            .membership()
            .get_joint_config()
            .len()
            > 1
        {
            return CommandResponse::Rejected {
                reason: "a replica change is in progress; merge after it".into(),
            };
        }
        tracing::info!(
            range_id = self.range_id,
            into = freeze.into,
            "range frozen for a merge"
        );
        self.applied.frozen = Some(freeze);
        CommandResponse::FreezeDone {
            span: Box::new(span),
        }
    }

    /// Takes over `right`, the right neighbour frozen into this range. Its data is already on
    /// this node (the merge is proposed only once every replica applied the freeze), so the
    /// span simply widens; the node then stops the right-hand replica, keeping its data.
    fn apply_merge(
        &mut self,
        pending: &mut PendingApply,
        right: RangeSpan,
        expected_generation: u64,
    ) -> io::Result<CommandResponse> {
        let Some(span) = self.applied.span.clone() else {
            return Ok(CommandResponse::OutsideSpan { span: None });
        };
        if let Some(rejected) = self.stale_generation(&span, expected_generation, "merge") {
            return Ok(rejected);
        }
        if span.end_key != right.start_key || span.end_key.is_empty() {
            return Ok(CommandResponse::Rejected {
                reason: format!(
                    "range {} does not end where range {} starts",
                    self.range_id, right.range_id
                ),
            });
        }
        if let Some(frozen) = &self.applied.frozen {
            return Ok(CommandResponse::Frozen { into: frozen.into });
        }
        if self
            .applied
            .membership
            .membership()
            .get_joint_config()
            .len()
            > 1
        {
            return Ok(CommandResponse::Rejected {
                reason: "a replica change is in progress; merge after it".into(),
            });
        }
        // Not across a snapshot install of the right range on this node (in flight, or
        // interrupted and not yet redone): it replaces the right range's keys in several
        // batches, so it would overwrite, or leave half replaced, keys this range owns from
        // the merge on. The caller waits and applies again (nothing was changed).
        let install_pending =
            read_state::<Option<LogId>>(&self.db, right.range_id, StateTag::Installing)?.is_some()
                || self.spans.installing(right.range_id);
        if install_pending {
            return Err(merge_must_wait(right.range_id));
        }
        // The right-hand side as this node holds it must be exactly the frozen range the
        // merge was planned on. Anything else means this replica lacks its data: stop this
        // replica loudly rather than serve keys it does not have.
        let local: Option<AppliedState> = read_state(&self.db, right.range_id, StateTag::Applied)?;
        let expected_freeze = MergeFreeze {
            into: self.range_id,
            left_generation: expected_generation,
        };
        let same_span = |s: &RangeSpan| {
            (s.range_id, &s.start_key, &s.end_key, s.generation)
                == (
                    right.range_id,
                    &right.start_key,
                    &right.end_key,
                    right.generation,
                )
        };
        let holds_right = local.as_ref().is_some_and(|l| {
            l.span.as_ref().is_some_and(same_span) && l.frozen.as_ref() == Some(&expected_freeze)
        });
        if !holds_right {
            tracing::error!(
                range_id = self.range_id,
                right = right.range_id,
                local_span = ?local.as_ref().map(|l| &l.span),
                local_frozen = ?local.as_ref().map(|l| &l.frozen),
                "merge applied on a replica without the frozen right-hand side; stopping this replica"
            );
            // This replica cannot follow its range: it is quarantined (and replaced), as a
            // replica with damaged data is; failing the node would replay the same entry and
            // fail again after every restart.
            return Err(io::Error::from(StorageError::corruption(
                "merge",
                format!(
                    "range {} cannot take over range {}: its frozen replica is not on this node",
                    self.range_id, right.range_id
                ),
            )));
        }
        // From here the merge applies: no install of the right range may start. One that
        // reserved since the check above makes the merge wait after all.
        if !self.spans.seal_for_merge(right.range_id) {
            return Err(merge_must_wait(right.range_id));
        }
        let merged = RangeSpan {
            end_key: right.end_key.clone(),
            generation: span.generation.max(right.generation) + 1,
            ..span
        };
        self.applied.span = Some(merged.clone());
        // The right half's keys may have been collected up to its own horizon. Its last
        // commit is not taken over: writes this range's leader fixed before the merge
        // applied follow the merge entry in the log and may lie below it. The right half's
        // keys are written only under the merged range's next seed, a fresh oracle
        // timestamp above everything the right range committed.
        let right_horizon = local.as_ref().map_or(0, |l| l.times.gc_horizon);
        self.applied.times.gc_horizon = self.applied.times.gc_horizon.max(right_horizon);
        self.applied.recent_merges.push(AppliedMerge {
            right: right.range_id,
            left_generation: expected_generation,
        });
        if self.applied.recent_merges.len() > MAX_RECENT_MERGES {
            self.applied.recent_merges.remove(0);
        }
        pending.span_changes.push(SpanChange::MergedAway {
            right: right.range_id,
        });
        pending.events.push(RangeEvent::Merged {
            left: self.range_id,
            right: right.range_id,
        });
        tracing::info!(
            range_id = self.range_id,
            right = right.range_id,
            "ranges merged"
        );
        Ok(CommandResponse::MergeDone {
            span: Box::new(merged),
        })
    }

    /// Applies one command into `pending`. Reads see earlier entries of the same batch
    /// through its overlay. Every rejection happens before the command adds any write.
    fn apply_command(
        &mut self,
        pending: &mut PendingApply,
        cmd: Command,
    ) -> io::Result<CommandResponse> {
        match cmd {
            Command::Write { ops, commit_ts } => {
                let commit_ts = applied_commit_ts(commit_ts);
                for op in &ops {
                    if let Err(refused) = self.check_write(&op.key, commit_ts) {
                        return Ok(refused);
                    }
                }
                let written: usize = ops
                    .iter()
                    .map(|op| op.key.len() + op.value.as_ref().map_or(0, Vec::len))
                    .sum();
                self.shared
                    .written_bytes
                    .fetch_add(written as u64, Ordering::Relaxed);
                for WriteOp { key, value } in ops {
                    self.write_key(pending, key, value, commit_ts);
                }
                Ok(CommandResponse::Done)
            }
            Command::Delete { key, commit_ts } => {
                let commit_ts = applied_commit_ts(commit_ts);
                if let Err(refused) = self.check_write(&key, commit_ts) {
                    return Ok(refused);
                }
                let existed = self.current(pending, &key)?.is_some();
                self.write_key(pending, key, None, commit_ts);
                Ok(CommandResponse::Deleted { existed })
            }
            Command::CompareAndSwap {
                key,
                expected,
                new_value,
                commit_ts,
            } => {
                let commit_ts = applied_commit_ts(commit_ts);
                if let Err(refused) = self.check_write(&key, commit_ts) {
                    return Ok(refused);
                }
                let found = self.current(pending, &key)?;
                if found != expected {
                    return Ok(CommandResponse::Swapped {
                        succeeded: false,
                        current: found,
                    });
                }
                self.write_key(pending, key, new_value.clone(), commit_ts);
                Ok(CommandResponse::Swapped {
                    succeeded: true,
                    current: new_value,
                })
            }
            Command::Prewrite {
                mutations,
                primary,
                start_ts,
                ttl_ms,
            } => {
                if let Some(refused) =
                    self.check_txn_keys(mutations.iter().map(|m| m.key.as_slice()), start_ts)
                {
                    return Ok(refused);
                }
                Ok(crate::txn::prewrite(
                    &self.db,
                    &mut pending.batch,
                    &mutations,
                    &primary,
                    start_ts,
                    ttl_ms,
                )?)
            }
            Command::CommitTxn {
                keys,
                start_ts,
                commit_ts,
            } => {
                if let Some(refused) = self.check_txn_keys(keys.iter().map(|k| k.0.as_slice()), 0) {
                    return Ok(refused);
                }
                if commit_ts <= start_ts {
                    return Ok(CommandResponse::Rejected {
                        reason: format!(
                            "commit ts {commit_ts} is not above the transaction's start ts {start_ts}"
                        ),
                    });
                }
                let response =
                    crate::txn::commit(&self.db, &mut pending.batch, &keys, start_ts, commit_ts)?;
                if response == CommandResponse::Done {
                    let last = &mut self.applied.times.last_commit_ts;
                    *last = (*last).max(commit_ts);
                }
                Ok(response)
            }
            Command::RollbackTxn { keys, start_ts } => {
                if let Some(refused) = self.check_txn_keys(keys.iter().map(|k| k.0.as_slice()), 0) {
                    return Ok(refused);
                }
                Ok(crate::txn::rollback(
                    &self.db,
                    &mut pending.batch,
                    &keys,
                    start_ts,
                )?)
            }
            Command::CheckTxnStatus {
                primary,
                start_ts,
                current_ts,
                rollback_if_missing,
            } => {
                if let Some(refused) = self.check_txn_keys([primary.as_slice()], 0) {
                    return Ok(refused);
                }
                Ok(crate::txn::check_status(
                    &self.db,
                    &mut pending.batch,
                    &primary,
                    start_ts,
                    current_ts,
                    rollback_if_missing,
                )?)
            }
            Command::TxnHeartbeat {
                primary,
                start_ts,
                ttl_ms,
            } => {
                if let Some(refused) = self.check_txn_keys([primary.as_slice()], 0) {
                    return Ok(refused);
                }
                Ok(crate::txn::heartbeat(
                    &self.db,
                    &mut pending.batch,
                    &primary,
                    start_ts,
                    ttl_ms,
                )?)
            }
            Command::OnePhaseTxn {
                ops,
                start_ts,
                commit_ts,
            } => {
                let commit_ts = applied_commit_ts(commit_ts);
                if let Some(refused) =
                    self.check_txn_keys(ops.iter().map(|op| op.key.as_slice()), start_ts)
                {
                    return Ok(refused);
                }
                for op in &ops {
                    if let Err(refused) = self.check_write(&op.key, commit_ts) {
                        return Ok(refused);
                    }
                }
                let keys: Vec<&[u8]> = ops.iter().map(|op| op.key.as_slice()).collect();
                if let Some(refused) = crate::txn::check_one_phase(&self.db, &keys, start_ts)? {
                    return Ok(CommandResponse::TxnRefused(refused));
                }
                if commit_ts.is_some_and(|ts| ts <= start_ts) {
                    return Ok(CommandResponse::Rejected {
                        reason: format!(
                            "commit ts {commit_ts:?} is not above the transaction's start ts {start_ts}"
                        ),
                    });
                }
                for WriteOp { key, value } in ops {
                    self.write_key(pending, key, value, commit_ts);
                }
                Ok(CommandResponse::Done)
            }
            Command::RegisterNode { join_token, addr } => {
                let Some(cluster_id) = registry::cluster_id(&self.db)? else {
                    return Ok(CommandResponse::Rejected {
                        reason: "cluster not initialised".into(),
                    });
                };
                let node_id = registry::register(&self.db, &mut pending.batch, &join_token, &addr)?;
                Ok(CommandResponse::NodeRegistered {
                    node_id,
                    cluster_id,
                })
            }
            Command::Split {
                split_key,
                new_range_id,
                expected_generation,
            } => self.apply_split(pending, split_key, new_range_id, expected_generation),
            Command::Freeze {
                into,
                left_generation,
                expected_generation,
            } => Ok(self.apply_freeze(
                MergeFreeze {
                    into,
                    left_generation,
                },
                expected_generation,
            )),
            Command::Thaw { freeze } => {
                // Only the freeze it names: a stale coordinator's thaw must not undo a later
                // freeze for another attempt.
                if self.applied.frozen == Some(freeze) {
                    self.applied.frozen = None;
                    tracing::info!(range_id = self.range_id, "range thawed; merge abandoned");
                }
                Ok(CommandResponse::Done)
            }
            Command::Merge {
                right,
                expected_generation,
            } => self.apply_merge(pending, right, expected_generation),
            Command::AbortMerge {
                right,
                left_generation,
            } => {
                if let Some(frozen) = &self.applied.frozen {
                    // This range's own generation must not move while its left neighbour may
                    // be merging it.
                    return Ok(CommandResponse::Frozen { into: frozen.into });
                }
                let Some(span) = self.applied.span.as_mut() else {
                    return Ok(CommandResponse::OutsideSpan { span: None });
                };
                let merged = self.applied.recent_merges.contains(&AppliedMerge {
                    right: right.range_id,
                    left_generation,
                });
                if !merged && span.generation == left_generation {
                    span.generation += 1;
                }
                Ok(CommandResponse::MergeAborted {
                    merged,
                    span: Box::new(span.clone()),
                })
            }
            Command::AllocRangeIds { count } => {
                if let Err(outside) = self.check_in_span(&registry::next_range_id_key()) {
                    return Ok(outside);
                }
                let first = registry::alloc_range_ids(&self.db, &mut pending.batch, count)?;
                Ok(CommandResponse::RangeIds { first, count })
            }
            Command::RaiseGcHorizon { horizon } => {
                if let Some(frozen) = &self.applied.frozen {
                    // A frozen range's state is final until the merge: its left neighbour
                    // takes the horizon it has now.
                    return Ok(CommandResponse::Frozen { into: frozen.into });
                }
                // Never past a lock: its transaction must still be able to commit above
                // what it read, and the leader's own check of its locks ran before this
                // entry, so a prewrite may have applied in between.
                let (start, end) = self.span_bounds();
                let horizon = match mvcc::locks::oldest_lock_start_ts(
                    &self.db,
                    &start,
                    &end,
                    MAX_LOCKS_READ_FOR_GC_HORIZON,
                )? {
                    Some(Some(oldest)) => horizon.min(oldest.saturating_sub(1)),
                    Some(None) => horizon,
                    // More locks than are worth reading on apply: the horizon stays.
                    None => self.applied.times.gc_horizon,
                };
                self.applied.times.gc_horizon = self.applied.times.gc_horizon.max(horizon);
                Ok(CommandResponse::Done)
            }
            Command::ReserveTimestamps { until_ms } => {
                if let Err(outside) = self.check_in_span(&registry::timestamp_limit_key()) {
                    return Ok(outside);
                }
                let (previous_ms, limit_ms) =
                    registry::reserve_timestamps(&self.db, &mut pending.batch, until_ms)?;
                Ok(CommandResponse::TimestampsReserved {
                    previous_ms,
                    limit_ms,
                })
            }
            Command::AllocReplicaId {
                expected_generation,
            } => {
                if let Some(frozen) = &self.applied.frozen {
                    return Ok(CommandResponse::Frozen { into: frozen.into });
                }
                let Some(current) = &self.applied.span else {
                    return Ok(CommandResponse::OutsideSpan { span: None });
                };
                if let Some(rejected) =
                    self.stale_generation(current, expected_generation, "replica id allocation")
                {
                    return Ok(rejected);
                }
                // Above every member too, for ranges whose ids were allocated before this
                // command existed.
                let highest = self
                    .applied
                    .membership
                    .membership()
                    .nodes()
                    .map(|(id, _)| *id)
                    .max()
                    .unwrap_or(0);
                let Some(span) = self.applied.span.as_mut() else {
                    return Ok(CommandResponse::OutsideSpan { span: None });
                };
                let replica_id = span.next_replica_id.max(highest + 1);
                span.next_replica_id = replica_id + 1;
                Ok(CommandResponse::ReplicaId { replica_id })
            }
        }
    }

    /// Applies committed entries (see [`RaftStateMachine::apply`]).
    async fn apply_entries<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        // Entries are applied into one write batch (flushed at the bounds below), so a burst
        // of commits costs one RocksDB write, not one per entry.
        let mut pending = PendingApply::default();
        let mut first_entry = true;
        while let Some((entry, responder)) = entries.try_next().await? {
            let replaying = !self
                .shared
                .running
                .load(std::sync::atomic::Ordering::Relaxed);
            if std::mem::take(&mut first_entry) && responder.is_none() && !replaying {
                // Only a replica's own proposals carry responders: a batch without one is a
                // follower's, or a new leader's backlog (see `ApplyStall`).
                if let Some(stall) = injected_apply_stall() {
                    let now = std::time::Instant::now();
                    let since_hold_ms = self
                        .stall_began_at
                        .map(|t| now.duration_since(t).as_millis() as u64);
                    let (wait_ms, new_hold) = stall.wait(since_hold_ms);
                    if new_hold {
                        self.stall_began_at = Some(now);
                        tracing::info!(
                            range_id = self.range_id,
                            index = entry.log_id.index,
                            wait_ms,
                            "failpoint sm-apply-stall: holding applies back"
                        );
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(wait_ms)).await;
                }
            }
            let response = match entry.payload {
                EntryPayload::Blank => CommandResponse::Done,
                EntryPayload::Normal(cmd) if cmd.reads_registry() => {
                    // These read the database directly or change the range: apply them alone.
                    self.flush(&mut pending).await?;
                    let r = self.apply_waiting_for_installs(&mut pending, cmd).await?;
                    if matches!(
                        r,
                        CommandResponse::MergeDone { .. } | CommandResponse::SplitDone { .. }
                    ) {
                        self.applied.snapshot_floor = Some(entry.log_id);
                    }
                    self.applied.last_applied = Some(entry.log_id);
                    pending.responders.extend(responder.map(|x| (x, r)));
                    self.flush(&mut pending).await?;
                    continue;
                }
                EntryPayload::Normal(cmd) => self.apply_command(&mut pending, cmd)?,
                EntryPayload::Membership(m) => {
                    if let Some(span) = &mut self.applied.span {
                        span.generation += 1;
                        let highest: Option<ReplicaId> = m.nodes().map(|(id, _)| *id).max();
                        if let Some(h) = highest {
                            span.next_replica_id = span.next_replica_id.max(h + 1);
                        }
                    }
                    self.applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    CommandResponse::Done
                }
            };
            self.applied.last_applied = Some(entry.log_id);
            pending.responders.extend(responder.map(|x| (x, response)));
            if pending.responders.len() >= MAX_APPLY_BATCH_ENTRIES
                || pending.batch.size_in_bytes() >= MAX_APPLY_BATCH_BYTES
            {
                self.flush(&mut pending).await?;
            }
        }
        self.flush(&mut pending).await
    }

    /// Applies `cmd`; a merge that must wait for a snapshot install of its right-hand range
    /// on this node (see `apply_merge`) is applied again once the install is done. The wait
    /// lasts as long as the install (the replica of the right range redoes an interrupted
    /// one when it opens) and only holds up this replica's applies; it is reported every
    /// [`MERGE_WAIT_REPORT_MS`].
    async fn apply_waiting_for_installs(
        &mut self,
        pending: &mut PendingApply,
        cmd: Command,
    ) -> io::Result<CommandResponse> {
        let started = std::time::Instant::now();
        let mut reported = started;
        loop {
            match self.apply_command(pending, cmd.clone()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if reported.elapsed() >= std::time::Duration::from_millis(MERGE_WAIT_REPORT_MS)
                    {
                        reported = std::time::Instant::now();
                        tracing::warn!(
                            range_id = self.range_id,
                            waited_ms = started.elapsed().as_millis() as u64,
                            "{e}"
                        );
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(MERGE_INSTALL_POLL_MS))
                        .await;
                }
                other => return other,
            }
        }
    }

    /// Writes the pending batch with the applied state, then answers its clients.
    async fn flush(&mut self, pending: &mut PendingApply) -> io::Result<()> {
        let mut taken = std::mem::take(pending);
        self.put_applied(&mut taken.batch)?;
        let shared = self.shared.clone();
        let writing = shared.writing()?;
        self.db.write(taken.batch, false).map_err(io::Error::from)?;
        // Written: the keys this batch moved change owners now, before anyone can see the
        // new span (a split's right half is claimed for its child before the child starts).
        self.spans.after_apply(
            self.range_id,
            self.applied.span.as_ref(),
            self.applied.frozen.map(|f| f.into),
            &taken.span_changes,
        );
        drop(writing);
        self.shared.set_applied(&self.applied);
        for event in taken.events {
            // The node is gone only when it shuts down; nothing is left to start then.
            let _ = self.events.send(event).await;
        }
        for (responder, response) in taken.responders {
            responder.send(response);
        }
        Ok(())
    }

    /// Another handle on the same range state, for work off the apply task.
    fn handle(&self) -> StateMachine {
        StateMachine {
            db: self.db.clone(),
            range_id: self.range_id,
            replica_id: self.replica_id,
            applied: self.applied.clone(),
            snapshot_dir: self.snapshot_dir.clone(),
            newest_snapshot_file: self.newest_snapshot_file.clone(),
            spans: self.spans.clone(),
            shared: self.shared.clone(),
            events: self.events.clone(),
            stall_began_at: None,
        }
    }

    /// Exports the range at a consistent point and publishes it as the current snapshot.
    fn build_snapshot_blocking(&self) -> io::Result<SnapshotFile> {
        let rocks_snapshot = self.db.raw().snapshot();
        let applied: AppliedState = match rocks_snapshot
            .get_cf(
                self.db.cf(ColumnFamilyName::RaftState),
                state_key(self.range_id, StateTag::Applied),
            )
            .map_err(StorageError::rocks_io)?
        {
            Some(framed) => decode_record("applied state", &framed)?,
            None => AppliedState::default(),
        };
        let header = SnapshotHeader {
            format_version: SNAPSHOT_FORMAT_VERSION,
            meta: SnapshotMeta {
                last_log_id: applied.last_applied,
                last_membership: applied.membership,
            },
            span: applied.span,
            frozen: applied.frozen,
            recent_merges: applied.recent_merges,
            times: applied.times,
        };
        let mut writer = SnapshotWriter::create(&self.snapshot_dir, self.range_id, &header)?;
        for cf in ColumnFamilyName::RANGE_DATA {
            writer.begin_section(cf.as_str())?;
            if let Some(span) = &header.span {
                let (lower, upper) = self.db.span_bounds(cf, &span.start_key, &span.end_key);
                let mut opts = rocksdb::ReadOptions::default();
                opts.set_iterate_upper_bound(upper);
                let iter = rocks_snapshot.iterator_cf_opt(
                    self.db.cf(cf),
                    opts,
                    rocksdb::IteratorMode::From(&lower, rocksdb::Direction::Forward),
                );
                for item in iter {
                    let (k, v) = item.map_err(StorageError::rocks_io)?;
                    // Values stay framed with their checksums, verified again on install.
                    record::decode(cf.as_str(), &v).map_err(io::Error::from)?;
                    writer.pair(&k, &v)?;
                }
            }
            writer.end_section()?;
        }
        drop(rocks_snapshot);
        let file = writer.finish()?;
        self.publish_snapshot_file(&file)?;
        tracing::info!(range_id = self.range_id, last_log_id = ?file.meta().last_log_id, size_bytes = file.size_bytes(), "built snapshot");
        Ok(file)
    }

    /// Makes `file` the range's snapshot file, unless a newer one was published meanwhile (a
    /// slow build racing an install must not roll the file back); returns whether it did.
    fn publish_snapshot_file(&self, file: &SnapshotFile) -> io::Result<bool> {
        let mut newest = self
            .newest_snapshot_file
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let last_log_id = file.meta().last_log_id;
        if newest.is_some_and(|n| n > last_log_id) {
            tracing::debug!(
                range_id = self.range_id,
                "a newer snapshot file exists; not replacing it"
            );
            return Ok(false);
        }
        file.publish(&self.snapshot_path())?;
        *newest = Some(last_log_id);
        Ok(true)
    }

    fn remove_snapshot_file(&self) -> io::Result<()> {
        let mut newest = self
            .newest_snapshot_file
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match std::fs::remove_file(self.snapshot_path()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        *newest = None;
        Ok(())
    }

    /// The range's snapshot file, verified, if any. A damaged file is moved aside
    /// (`.corrupt`) and reported, and the range goes on without it: the file is a copy of
    /// what the database holds, and a fresh one is built when one is needed. (It used to stop
    /// the whole node from starting.)
    fn read_snapshot_file(&self) -> io::Result<Option<SnapshotFile>> {
        let path = self.snapshot_path();
        match SnapshotFile::open_verified(&path) {
            Ok(file) => Ok(Some(file)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let aside = path.with_extension("snap.corrupt");
                tracing::error!(
                    range_id = self.range_id,
                    moved_to = %aside.display(),
                    "snapshot file is corrupt ({e}); moved aside, a fresh one is built when needed"
                );
                std::fs::rename(&path, &aside)?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Installs `file`: marker, publish, load (see the module comment). Returns the new
    /// applied state; the caller makes it current.
    fn install_blocking(&self, file: &SnapshotFile) -> io::Result<AppliedState> {
        let header = file.header();
        // The node admitted this snapshot only with a reservation of its span; an install
        // without one (not through the transport) reserves now. Either way no other local
        // replica claims any of these keys while they are replaced.
        let writing = self.shared.writing()?;
        let Some(span) = &header.span else {
            // Only a replica that owns nothing yet could take a snapshot without a span;
            // clearing a span it owns would go around the span registry.
            if self.applied.span.is_some() {
                return Err(io::Error::other(
                    "refusing a snapshot without a span over a replica that has one",
                ));
            }
            return self.install_reserved(file, writing);
        };
        if !skip_span_reservation() {
            self.spans
                .begin_install(self.range_id, span)
                .map_err(|conflict| {
                    io::Error::other(format!("refusing snapshot install: {conflict}"))
                })?;
        }
        let installed = self.install_reserved(file, writing);
        if installed.is_err() {
            // The span goes back (a reservation the transport holds would give it back too).
            self.spans.abort_install(self.range_id);
        }
        installed
    }

    /// [`StateMachine::install_blocking`] once the span is reserved.
    fn install_reserved(
        &self,
        file: &SnapshotFile,
        writing: std::sync::RwLockReadGuard<'_, bool>,
    ) -> io::Result<AppliedState> {
        let target = file.meta().last_log_id;
        write_state(&self.db, self.range_id, StateTag::Installing, &target, true)?;
        if !self.publish_snapshot_file(file)? {
            // Nothing replaced yet; without its file the install could not be redone.
            self.db
                .write(install_marker_removal(&self.db, self.range_id), true)
                .map_err(io::Error::from)?;
            return Err(io::Error::other(
                "refusing snapshot install: a newer snapshot file exists",
            ));
        }
        let applied = self.load_snapshot(file)?;
        self.spans.commit_install(
            self.range_id,
            applied.span.as_ref(),
            applied.frozen.map(|f| f.into),
        );
        drop(writing);
        Ok(applied)
    }

    /// Replaces the span's keys with the file's pairs, in batches of at most about
    /// [`MAX_INSTALL_BATCH_BYTES`]; the last batch (synced) writes the applied state the
    /// file describes and removes the install marker.
    fn load_snapshot(&self, file: &SnapshotFile) -> io::Result<AppliedState> {
        let header = file.header();
        let (start, end) = match &header.span {
            Some(s) => (s.start_key.clone(), s.end_key.clone()),
            None => self.span_bounds(),
        };
        let mut batch = WriteBatch::default();
        self.db.batch_delete_range_data(&mut batch, &start, &end);
        // Keys of what the replica owned before, outside the new span (a snapshot taken
        // after a split the replica missed), would belong to nobody afterwards: they go too.
        if let Some(owned) = self.spans.owned(self.range_id) {
            self.db
                .batch_delete_range_data(&mut batch, &owned.start, &owned.end);
        }
        let mut pairs = 0u64;
        file.visit_pairs(|cf, key, value| {
            let Some(cf) = ColumnFamilyName::from_name(cf)
                .filter(|cf| ColumnFamilyName::RANGE_DATA.contains(cf))
            else {
                return Err(io::Error::from(StorageError::corruption(
                    "snapshot",
                    format!("unknown column family section {cf:?}"),
                )));
            };
            record::decode("snapshot value", value).map_err(io::Error::from)?;
            batch.put_cf(self.db.cf(cf), key, value);
            pairs += 1;
            if batch.size_in_bytes() >= MAX_INSTALL_BATCH_BYTES {
                // Unsynced: the last, synced batch makes every earlier one durable.
                self.db
                    .write(std::mem::take(&mut batch), false)
                    .map_err(io::Error::from)?;
            }
            Ok(())
        })?;
        let meta = &header.meta;
        let applied = AppliedState {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            span: header.span.clone(),
            frozen: header.frozen,
            snapshot_floor: meta.last_log_id,
            recent_merges: header.recent_merges.clone(),
            times: header.times,
        };
        batch.put_cf(
            self.db.cf(ColumnFamilyName::RaftState),
            state_key(self.range_id, StateTag::Applied),
            encode_record(&applied)?,
        );
        batch.delete_cf(
            self.db.cf(ColumnFamilyName::RaftState),
            state_key(self.range_id, StateTag::Installing),
        );
        self.db.write(batch, true).map_err(io::Error::from)?;
        tracing::info!(range_id = self.range_id, last_log_id = ?meta.last_log_id, pairs, size_bytes = file.size_bytes(), "installed snapshot");
        Ok(applied)
    }
}

/// The snapshot an interrupted install left to redo, if any (see the module comment). A
/// marker whose file is not the marked one is dropped: the crash came before the file was
/// published, so no key was replaced.
fn interrupted_install(
    db: &Db,
    range_id: RangeId,
    snapshot_dir: &Path,
) -> io::Result<Option<SnapshotFile>> {
    let Some(target) = read_state::<Option<LogId>>(db, range_id, StateTag::Installing)? else {
        return Ok(None);
    };
    let file = match SnapshotFile::open_verified(&snapshot_file(snapshot_dir, range_id)) {
        Ok(file) => Some(file),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(io::Error::from(StorageError::corruption(
                "snapshot install",
                format!(
                    "range {range_id}: an interrupted snapshot install cannot be redone, its \
                     file is unreadable ({e}); the replica's keys may be partly replaced. \
                     Remove the node from the cluster and wipe its data directory"
                ),
            )))
        }
    };
    match file {
        Some(file) if file.meta().last_log_id == target => Ok(Some(file)),
        _ => {
            db.write(install_marker_removal(db, range_id), true)
                .map_err(io::Error::from)?;
            Ok(None)
        }
    }
}

fn install_marker_removal(db: &Db, range_id: RangeId) -> WriteBatch {
    let mut batch = WriteBatch::default();
    batch.delete_cf(
        db.cf(ColumnFamilyName::RaftState),
        state_key(range_id, StateTag::Installing),
    );
    batch
}

/// Quarantines a replica whose data failed a checksum: persists the reason (a restarted
/// node keeps it quarantined instead of crash-looping on the same bad block) and marks it
/// for the node, which stops its Raft group and reports it so the allocator replaces it.
/// One bad replica costs one replica, not the node.
pub fn quarantine(db: &Db, shared: &ReplicaShared, reason: &str) -> io::Result<()> {
    let mut q = shared.quarantine.lock().unwrap_or_else(|p| p.into_inner());
    if q.is_some() {
        return Ok(());
    }
    tracing::error!(range_id = shared.range_id, %reason, "quarantining this replica: its data failed a checksum");
    write_state(db, shared.range_id, StateTag::Quarantined, &reason, true)?;
    *q = Some(reason.to_string());
    Ok(())
}

/// The error of a merge that must wait for an install of its right range `right`.
fn merge_must_wait(right: RangeId) -> io::Error {
    io::Error::new(
        io::ErrorKind::WouldBlock,
        format!("merge waits for a snapshot install of range {right} on this node"),
    )
}

/// Quarantines the replica when `e` reports damaged data; returns `e`.
fn quarantine_on_damage(db: &Db, shared: &ReplicaShared, e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::InvalidData {
        if let Err(q) = quarantine(db, shared, &e.to_string()) {
            tracing::error!(
                range_id = shared.range_id,
                "cannot record the quarantine: {q}"
            );
        }
    }
    e
}

/// The snapshot file of `range_id` in `snapshot_dir`.
pub fn snapshot_file(snapshot_dir: &Path, range_id: RangeId) -> PathBuf {
    snapshot_dir.join(format!("range-{range_id}.snap"))
}

/// Builds snapshots from a consistent RocksDB snapshot.
pub struct SnapshotBuilder {
    sm: StateMachine,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(
        &mut self,
    ) -> Result<openraft::alias::SnapshotOf<TypeConfig, SnapshotData>, io::Error> {
        // Reading the whole range and fsyncing the file would stall an async worker for as
        // long as it takes; run it on the blocking pool.
        let sm = self.sm.handle();
        let file = tokio::task::spawn_blocking(move || sm.build_snapshot_blocking())
            .await
            .map_err(|e| io::Error::other(format!("snapshot task failed: {e}")))?
            .map_err(|e| quarantine_on_damage(&self.sm.db, &self.sm.shared, e))?;
        Ok(Snapshot {
            meta: file.meta().clone(),
            snapshot: file,
        })
    }
}

/// The failpoint `sm-apply-stall` (off unless FAILPOINTS names it, as
/// `sm-apply-stall=return(HOLD:FREE)` in milliseconds), as behind a slow disk that writes in
/// bursts: a replica holds back batches that carry none of its own proposals for HOLD, then
/// lets every batch through for FREE (enough to drain what queued up), then holds again.
/// Held are a follower's batches and a new leader's backlog (see
/// [`StateMachine::apply_entries`]): under load a follower's applied state lags its commit
/// index, writes the leader already acknowledged included, and a follower elected meanwhile
/// starts with that lag; the leader's own writes are not slowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStall {
    pub hold_ms: u64,
    pub free_ms: u64,
}

impl ApplyStall {
    /// Parses `HOLD:FREE`.
    pub fn parse(arg: &str) -> Option<ApplyStall> {
        let (hold, free) = arg.split_once(':')?;
        Some(ApplyStall {
            hold_ms: hold.trim().parse().ok()?,
            free_ms: free.trim().parse().ok()?,
        })
    }

    /// How long a batch starting `since_hold_ms` after the current hold began (`None`: no
    /// hold yet) waits, and whether it begins a new hold.
    pub fn wait(&self, since_hold_ms: Option<u64>) -> (u64, bool) {
        match since_hold_ms {
            Some(t) if t < self.hold_ms + self.free_ms => (self.hold_ms.saturating_sub(t), false),
            _ => (self.hold_ms, true),
        }
    }
}

/// The commit ts a write is applied at: the one its entry carries. The failpoint
/// `sm-commit-ts-from-clock=return(OFFSET_MS)` takes it from this replica's wall clock
/// shifted by `OFFSET_MS` instead (the classic mistake of stamping versions at apply), so
/// replicas write different versions and an acknowledged write can land above a timestamp
/// the oracle hands out after its acknowledgement. The tests must catch it.
fn applied_commit_ts(carried: Option<Timestamp>) -> Option<Timestamp> {
    fail::fail_point!("sm-commit-ts-from-clock", |arg: Option<String>| {
        let offset_ms: i64 = arg
            .as_deref()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                panic!("failpoint sm-commit-ts-from-clock wants return(OFFSET_MS), got {arg:?}")
            });
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        carried.map(|_| ((now_ms + offset_ms).max(0) as u64) << 18)
    });
    carried
}

/// The failpoint `sm-apply-stall`, when on (see [`ApplyStall`]).
fn injected_apply_stall() -> Option<ApplyStall> {
    fail::fail_point!("sm-apply-stall", |arg: Option<String>| {
        let arg = arg.unwrap_or_default();
        match ApplyStall::parse(&arg) {
            Some(stall) => Some(stall),
            // A fault that silently does nothing would make a run look safer than it is.
            None => panic!("failpoint sm-apply-stall wants return(HOLD:FREE) in ms, got {arg:?}"),
        }
    });
    None
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<Strm>(&mut self, entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        // Damaged data stops this group (openraft stops on any apply error) and quarantines
        // the replica, instead of failing the node.
        let applied = self.apply_entries(entries).await;
        applied.map_err(|e| quarantine_on_damage(&self.db, &self.shared, e))
    }
    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { sm: self.handle() }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        if snapshot.meta().last_log_id != meta.last_log_id {
            return Err(io::Error::from(StorageError::corruption(
                "snapshot",
                format!(
                    "file holds log id {:?}, its transfer named {:?}",
                    snapshot.meta().last_log_id,
                    meta.last_log_id
                ),
            )));
        }
        // Reading the file and writing the range would stall an async worker for as long as
        // they take; run them on the blocking pool.
        let sm = self.handle();
        let applied = tokio::task::spawn_blocking(move || sm.install_blocking(&snapshot))
            .await
            .map_err(|e| io::Error::other(format!("snapshot install task failed: {e}")))??;
        self.applied = applied;
        self.shared.set_applied(&self.applied);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<openraft::alias::SnapshotOf<TypeConfig, SnapshotData>>, io::Error> {
        let sm = self.handle();
        let mut current = tokio::task::spawn_blocking(move || sm.read_snapshot_file())
            .await
            .map_err(|e| io::Error::other(format!("snapshot task failed: {e}")))??;
        let applied = self.applied.last_applied;
        if current
            .as_ref()
            .is_some_and(|f| f.meta().last_log_id > applied)
        {
            // Never legitimate: an install's file becomes current only with the install (a
            // crash in between is redone at start-up) and builds read the applied state from
            // the snapshot they export. Such a file is a leftover of a replica destroyed
            // mid-way (its span may belong to another range by now); installing it would
            // overwrite that range's keys.
            tracing::warn!(
                range_id = self.range_id,
                file = ?current.as_ref().map(|f| f.meta().last_log_id),
                ?applied,
                "discarding a snapshot file newer than the applied state"
            );
            self.remove_snapshot_file()?;
            current = None;
        }
        let floor = self.applied.snapshot_floor;
        let predates_floor =
            |f: &SnapshotFile| floor.is_some_and(|fl| f.meta().last_log_id.is_none_or(|l| l < fl));
        let missing = current.is_none() && applied.is_some();
        if missing || current.as_ref().is_some_and(predates_floor) {
            // A replica starting from a snapshot older than a split, merge or install would
            // replay from the wrong state: send a fresh one. With no usable file at all
            // (moved aside as corrupt, discarded as a leftover), build one too: openraft
            // treats "no snapshot" as a storage error when it must send one.
            let sm = self.handle();
            let fresh = tokio::task::spawn_blocking(move || sm.build_snapshot_blocking())
                .await
                .map_err(|e| io::Error::other(format!("snapshot task failed: {e}")))?
                .map_err(|e| quarantine_on_damage(&self.db, &self.shared, e))?;
            current = Some(fresh);
        }
        Ok(current.map(|file| Snapshot {
            meta: file.meta().clone(),
            snapshot: file,
        }))
    }
}

/// Whether the failpoint `snapshot-install-skip-span-reservation` is active (never, unless
/// built with the `failpoints` feature and configured): deliberately broken, a snapshot is
/// received and installed without reserving its span, so it can clear and overwrite keys
/// another replica on the node owns. The span registry's overlap assertion (debug builds)
/// or the data then shows it.
pub(crate) fn skip_span_reservation() -> bool {
    fail::fail_point!("snapshot-install-skip-span-reservation", |_| true);
    false
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use spheredb_storage::DbOptions;

    use super::*;
    use crate::types::ReplicaNode;

    const LEFT: RangeId = 2;
    const RIGHT: RangeId = 3;

    #[test]
    fn apply_stalls_hold_then_let_the_backlog_through() {
        let stall = ApplyStall::parse("2500:500").unwrap();
        assert_eq!(stall.wait(None), (2_500, true));
        // Queued behind the held batch: released with it.
        assert_eq!(stall.wait(Some(10)), (2_490, false));
        // The free period: the backlog drains.
        assert_eq!(stall.wait(Some(2_500)), (0, false));
        assert_eq!(stall.wait(Some(2_999)), (0, false));
        // Then the next hold.
        assert_eq!(stall.wait(Some(3_000)), (2_500, true));
        for bad in ["", "2500", "a:1", "1:b"] {
            assert_eq!(ApplyStall::parse(bad), None, "{bad:?}");
        }
    }

    fn span(range_id: RangeId, start: &[u8], end: &[u8], generation: u64) -> RangeSpan {
        RangeSpan {
            range_id,
            start_key: start.to_vec(),
            end_key: end.to_vec(),
            generation,
            next_replica_id: 2,
        }
    }

    fn membership() -> Membership {
        Membership::new(
            vec![BTreeSet::from([1])],
            BTreeMap::from([(1, ReplicaNode::default())]),
        )
        .unwrap()
    }

    /// Opens replica 1 of `range` at `s` (its origin written first), as a node would.
    fn open(db: &Db, dir: &Path, s: &RangeSpan) -> StateMachine {
        let mut batch = WriteBatch::default();
        write_range_origin(db, &mut batch, s, membership(), RangeTimes::default()).unwrap();
        db.write(batch, true).unwrap();
        let (events, _) = tokio::sync::mpsc::channel(MAX_PENDING_RANGE_EVENTS);
        StateMachine::open(db.clone(), s.range_id, 1, dir, Arc::default(), events)
            .unwrap()
            .0
    }

    /// Applies `cmd` and writes its batch, as `apply` does.
    fn apply(sm: &mut StateMachine, cmd: Command) -> CommandResponse {
        let mut pending = PendingApply::default();
        let response = sm.apply_command(&mut pending, cmd).unwrap();
        sm.put_applied(&mut pending.batch).unwrap();
        sm.db.write(pending.batch, false).unwrap();
        sm.shared.set_applied(&sm.applied);
        response
    }

    fn put(key: &[u8]) -> Command {
        Command::Write {
            ops: vec![WriteOp {
                key: key.to_vec(),
                value: Some(b"v".to_vec()),
            }],
            commit_ts: None,
        }
    }

    fn freeze(left_generation: u64) -> Command {
        Command::Freeze {
            into: LEFT,
            left_generation,
            expected_generation: 5,
        }
    }

    /// A snapshot file claiming log index `index`, holding one pair named after it.
    fn stored_at(sm: &StateMachine, index: u64) -> SnapshotFile {
        let mut log_id = range_origin_log_id();
        log_id.index = index;
        let header = SnapshotHeader {
            format_version: SNAPSHOT_FORMAT_VERSION,
            meta: SnapshotMeta {
                last_log_id: Some(log_id),
                last_membership: sm.applied.membership.clone(),
            },
            span: sm.applied.span.clone(),
            frozen: None,
            recent_merges: Vec::new(),
            times: RangeTimes::default(),
        };
        let mut w = SnapshotWriter::create(&sm.snapshot_dir, sm.range_id, &header).unwrap();
        w.begin_section(ColumnFamilyName::System.as_str()).unwrap();
        w.pair(format!("b{index}").as_bytes(), &record::encode(b"v"))
            .unwrap();
        w.finish().unwrap()
    }

    fn pairs_of(file: &SnapshotFile) -> Vec<KvPair> {
        let mut pairs = Vec::new();
        file.visit_pairs(|_, k, v| {
            pairs.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
        pairs
    }

    fn file_index(sm: &StateMachine) -> Option<u64> {
        sm.read_snapshot_file()
            .unwrap()
            .and_then(|s| s.meta().last_log_id)
            .map(|l| l.index)
    }

    #[tokio::test]
    async fn a_retired_replica_writes_nothing_and_claims_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db"), &DbOptions::default()).unwrap();
        let spans = Arc::new(SpanRegistry::default());
        let s = span(LEFT, b"a", b"m", 1);
        let mut batch = WriteBatch::default();
        write_range_origin(&db, &mut batch, &s, membership(), RangeTimes::default()).unwrap();
        db.write(batch, true).unwrap();
        let (events, _) = tokio::sync::mpsc::channel(MAX_PENDING_RANGE_EVENTS);
        let (mut sm, shared) =
            StateMachine::open(db.clone(), LEFT, 1, dir.path(), spans.clone(), events).unwrap();
        // The node destroys the replica (retire, then delete and release); an apply that
        // openraft had queued runs afterwards.
        shared.retire();
        spans.release(LEFT);
        let mut pending = PendingApply::default();
        sm.apply_command(&mut pending, put(b"b")).unwrap();
        assert!(sm.flush(&mut pending).await.is_err());
        assert_eq!(read_system_value(&db, b"b").unwrap(), None);
        assert_eq!(spans.owned(LEFT), None);
    }

    #[test]
    fn replica_ids_are_allocated_through_the_log_and_never_handed_out_twice() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db"), &DbOptions::default()).unwrap();
        let mut sm = open(&db, dir.path(), &span(LEFT, b"a", b"z", 1));
        let alloc = |sm: &mut StateMachine, generation| {
            apply(
                sm,
                Command::AllocReplicaId {
                    expected_generation: generation,
                },
            )
        };
        // Member 1 exists and the span says 2 is next. An id allocated for an add that was
        // then discarded (never reached the membership) is not handed out again: the leader's
        // view of the membership alone would have offered 2 twice.
        assert_eq!(
            alloc(&mut sm, 1),
            CommandResponse::ReplicaId { replica_id: 2 }
        );
        assert_eq!(
            alloc(&mut sm, 1),
            CommandResponse::ReplicaId { replica_id: 3 }
        );
        assert!(matches!(
            alloc(&mut sm, 7),
            CommandResponse::Rejected { .. }
        ));
        // The allocation is persisted with the applied state.
        drop(sm);
        let (events, _) = tokio::sync::mpsc::channel(MAX_PENDING_RANGE_EVENTS);
        let (mut sm, _) =
            StateMachine::open(db.clone(), LEFT, 1, dir.path(), Arc::default(), events).unwrap();
        assert_eq!(
            alloc(&mut sm, 1),
            CommandResponse::ReplicaId { replica_id: 4 }
        );
    }

    #[test]
    fn an_older_snapshot_never_replaces_a_newer_file_and_writers_leave_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db"), &DbOptions::default()).unwrap();
        let snaps = dir.path().join("snapshots");
        let sm = open(&db, &snaps, &span(LEFT, b"a", b"z", 1));
        sm.publish_snapshot_file(&stored_at(&sm, 20)).unwrap();
        // A slow build that read an older state finishes after an install: ignored.
        sm.handle()
            .publish_snapshot_file(&stored_at(&sm, 10))
            .unwrap();
        assert_eq!(file_index(&sm), Some(20));
        sm.publish_snapshot_file(&stored_at(&sm, 30)).unwrap();
        assert_eq!(file_index(&sm), Some(30));
        let names: Vec<String> = std::fs::read_dir(&snaps)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![format!("range-{LEFT}.snap")]);
        // Leftovers of an interrupted writer are removed at start-up.
        std::fs::write(snaps.join(format!("range-{LEFT}.snap.tmp.7")), b"half").unwrap();
        assert_eq!(remove_snapshot_temp_files(&snaps).unwrap(), 1);
    }

    #[tokio::test]
    async fn corrupt_and_leftover_snapshot_files_are_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db"), &DbOptions::default()).unwrap();
        let snaps = dir.path().join("snapshots");
        let mut sm = open(&db, &snaps, &span(LEFT, b"a", b"z", 1));
        apply(&mut sm, put(b"k"));

        let applied = sm.applied.last_applied;
        // A file newer than the applied state is a leftover of a replica destroyed mid-way:
        // discarded, never installed over whatever owns its span now; a fresh snapshot of
        // what the replica holds takes its place.
        sm.publish_snapshot_file(&stored_at(&sm, 1_000)).unwrap();
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.last_log_id, applied);
        assert_eq!(file_index(&sm), applied.map(|l| l.index));

        // A corrupt file is moved aside instead of failing (it used to stop the node), and
        // replaced by a fresh one (openraft treats a missing snapshot it must send as fatal).
        let path = sm.snapshot_path();
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        // Damaged on disk as a new file would be: files are replaced by rename, never
        // rewritten in place, so open handles keep reading what they opened.
        let damaged = path.with_extension("damaged");
        std::fs::write(&damaged, bytes).unwrap();
        std::fs::rename(&damaged, &path).unwrap();
        let fresh = sm.get_current_snapshot().await.unwrap().unwrap();
        assert!(path.with_extension("snap.corrupt").exists());
        assert_eq!(fresh.meta.last_log_id, applied);
        assert_eq!(pairs_of(&fresh.snapshot), pairs_of(&current.snapshot));

        // Once a snapshot was installed (or a split or merge applied), an older file is not
        // current: a fresh one is built from the database.
        sm.publish_snapshot_file(&stored_at(&sm, 0)).unwrap();
        let mut floor = range_origin_log_id();
        floor.index = 1;
        sm.applied.snapshot_floor = Some(floor);
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(pairs_of(&current.snapshot), pairs_of(&fresh.snapshot));
    }

    /// A replica of LEFT over `[a, z)` holding `count` keys `k…` of `value_bytes` each.
    fn loaded(db: &Db, dir: &Path, count: usize, value_bytes: usize) -> StateMachine {
        let mut sm = open(db, dir, &span(LEFT, b"a", b"z", 1));
        let ops = (0..count)
            .map(|i| WriteOp {
                key: format!("k{i:06}").into_bytes(),
                value: Some(vec![(i % 251) as u8; value_bytes]),
            })
            .collect();
        apply(
            &mut sm,
            Command::Write {
                ops,
                commit_ts: None,
            },
        );
        sm
    }

    fn span_pairs(db: &Db) -> Vec<KvPair> {
        db.iter_span(ColumnFamilyName::System, b"", b"")
            .map(|item| {
                let (k, v) = item.unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect()
    }

    #[tokio::test]
    async fn a_snapshot_larger_than_one_batch_replaces_exactly_its_span() {
        let source_dir = tempfile::tempdir().unwrap();
        let source_db = Db::open(&source_dir.path().join("db"), &DbOptions::default()).unwrap();
        // 16 MiB of values: four install batches, about sixty snapshot blocks.
        let source = loaded(&source_db, source_dir.path(), 4_000, 4 << 10);
        let snapshot = source.handle().build_snapshot_blocking().unwrap();
        assert!(snapshot.size_bytes() > 3 * MAX_INSTALL_BATCH_BYTES as u64);

        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db"), &DbOptions::default()).unwrap();
        let mut sm = open(
            &db,
            &dir.path().join("snapshots"),
            &span(LEFT, b"a", b"z", 1),
        );
        // A key the snapshot does not hold goes; one outside the span stays.
        apply(&mut sm, put(b"stale"));
        let mut outside = WriteBatch::default();
        outside.put_cf(db.cf(ColumnFamilyName::System), b"zz", record::encode(b"x"));
        db.write(outside, true).unwrap();

        let meta = snapshot.meta().clone();
        sm.install_snapshot(&meta, snapshot).await.unwrap();
        let mut expected = span_pairs(&source_db);
        expected.push((b"zz".to_vec(), record::encode(b"x")));
        assert_eq!(span_pairs(&db), expected);
        assert_eq!(sm.applied.last_applied, meta.last_log_id);
        assert_eq!(file_index(&sm), meta.last_log_id.map(|l| l.index));
        assert_eq!(
            read_state::<Option<LogId>>(&db, LEFT, StateTag::Installing).unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn an_install_a_crash_interrupted_after_publishing_its_file_is_redone_at_open() {
        let source_dir = tempfile::tempdir().unwrap();
        let source_db = Db::open(&source_dir.path().join("db"), &DbOptions::default()).unwrap();
        let source = loaded(&source_db, source_dir.path(), 2_000, 4 << 10);
        let mut snapshot = source.handle().build_snapshot_blocking().unwrap();
        // The source's log moved on: the snapshot is newer than anything the target applied.
        let mut header = snapshot.header().clone();
        let mut last = header.meta.last_log_id.unwrap();
        last.index += 10;
        header.meta.last_log_id = Some(last);
        let mut w = SnapshotWriter::create(source_dir.path(), LEFT, &header).unwrap();
        w.begin_section(ColumnFamilyName::System.as_str()).unwrap();
        snapshot.visit_pairs(|_, k, v| w.pair(k, v)).unwrap();
        snapshot = w.finish().unwrap();

        let dir = tempfile::tempdir().unwrap();
        let snaps = dir.path().join("snapshots");
        let db = Db::open(&dir.path().join("db"), &DbOptions::default()).unwrap();
        let mut sm = open(&db, &snaps, &span(LEFT, b"a", b"z", 1));
        apply(&mut sm, put(b"stale"));
        let before = sm.applied.last_applied;
        // The install's first steps, then a crash part-way through replacing the keys.
        write_state(&db, LEFT, StateTag::Installing, &Some(last), true).unwrap();
        assert!(sm.publish_snapshot_file(&snapshot).unwrap());
        let mut half = WriteBatch::default();
        db.batch_delete_span(&mut half, ColumnFamilyName::System, b"a", b"z");
        half.put_cf(
            db.cf(ColumnFamilyName::System),
            b"k000000",
            record::encode(b"torn"),
        );
        db.write(half, true).unwrap();
        drop(sm);

        let (events, _) = tokio::sync::mpsc::channel(MAX_PENDING_RANGE_EVENTS);
        let spans = Arc::new(SpanRegistry::default());
        let (sm, shared) =
            StateMachine::open(db.clone(), LEFT, 1, &snaps, spans.clone(), events).unwrap();
        assert_eq!(span_pairs(&db), span_pairs(&source_db));
        assert_eq!(sm.applied.last_applied, Some(last));
        assert_ne!(sm.applied.last_applied, before);
        assert_eq!(shared.span().map(|s| s.end_key), Some(b"z".to_vec()));
        assert!(spans.owned(LEFT).is_some());
        assert_eq!(
            read_state::<Option<LogId>>(&db, LEFT, StateTag::Installing).unwrap(),
            None
        );

        // A marker whose file was never published (the crash came first) touched no key:
        // it is dropped and the replica keeps its state.
        drop(sm);
        let mut other = last;
        other.index += 5;
        write_state(&db, LEFT, StateTag::Installing, &Some(other), true).unwrap();
        let (events, _) = tokio::sync::mpsc::channel(MAX_PENDING_RANGE_EVENTS);
        let (sm, _) =
            StateMachine::open(db.clone(), LEFT, 1, &snaps, Arc::default(), events).unwrap();
        assert_eq!(sm.applied.last_applied, Some(last));
        assert_eq!(
            read_state::<Option<LogId>>(&db, LEFT, StateTag::Installing).unwrap(),
            None
        );

        // A marked install whose file is damaged cannot be redone: the replica refuses to
        // open rather than serve partly replaced keys.
        drop(sm);
        write_state(&db, LEFT, StateTag::Installing, &Some(last), true).unwrap();
        let path = snapshot_file(&snaps, LEFT);
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
        let (events, _) = tokio::sync::mpsc::channel(MAX_PENDING_RANGE_EVENTS);
        let refused = StateMachine::open(db.clone(), LEFT, 1, &snaps, Arc::default(), events);
        assert!(refused.is_err());
    }

    #[tokio::test]
    async fn a_merge_waits_for_an_install_of_its_right_range_and_then_admits_none() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db"), &DbOptions::default()).unwrap();
        let spans = Arc::new(SpanRegistry::default());
        let open_shared = |s: &RangeSpan| {
            let mut batch = WriteBatch::default();
            write_range_origin(&db, &mut batch, s, membership(), RangeTimes::default()).unwrap();
            db.write(batch, true).unwrap();
            let (events, _) = tokio::sync::mpsc::channel(MAX_PENDING_RANGE_EVENTS);
            StateMachine::open(db.clone(), s.range_id, 1, dir.path(), spans.clone(), events)
                .unwrap()
                .0
        };
        let mut left = open_shared(&span(LEFT, b"a", b"m", 3));
        let mut right = open_shared(&span(RIGHT, b"m", b"", 5));
        apply(&mut right, freeze(3));
        let merge = Command::Merge {
            right: span(RIGHT, b"m", b"", 5),
            expected_generation: 3,
        };
        // An install of the right range is in flight here (the right replica is catching
        // up from a snapshot): the merge waits, changing nothing.
        let install = spans.reserve(RIGHT, &span(RIGHT, b"m", b"", 5)).unwrap();
        let mut pending = PendingApply::default();
        let err = left.apply_command(&mut pending, merge.clone()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        assert_eq!(
            left.applied.span.as_ref().map(|s| s.end_key.clone()),
            Some(b"m".to_vec())
        );
        let waiting = tokio::spawn(async move {
            let mut pending = PendingApply::default();
            let r = left.apply_waiting_for_installs(&mut pending, merge).await;
            (left, r)
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            !waiting.is_finished(),
            "the merge did not wait for the install"
        );
        drop(install);
        let (_left, merged) = waiting.await.unwrap();
        assert!(
            matches!(merged, Ok(CommandResponse::MergeDone { .. })),
            "{merged:?}"
        );
        // No install of the right range is admitted any more.
        assert!(spans.reserve(RIGHT, &span(RIGHT, b"m", b"", 5)).is_err());

        // An interrupted install's marker on disk makes a merge wait too.
        let mut other = open_shared(&span(7, b"0", b"1", 3));
        write_state(
            &db,
            8,
            StateTag::Installing,
            &Some(range_origin_log_id()),
            true,
        )
        .unwrap();
        let merge_8 = Command::Merge {
            right: span(8, b"1", b"2", 5),
            expected_generation: 3,
        };
        let err = other
            .apply_command(&mut PendingApply::default(), merge_8)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
    }

    #[tokio::test]
    async fn damaged_data_quarantines_the_replica_and_the_quarantine_survives_a_restart() {
        use openraft::entry::RaftEntry;
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db"), &DbOptions::default()).unwrap();
        let mut sm = loaded(&db, dir.path(), 10, 100);
        // One stored value loses a bit: its checksum no longer matches.
        let key = b"k000003".to_vec();
        let mut framed = db
            .raw()
            .get_cf(db.cf(ColumnFamilyName::System), &key)
            .unwrap()
            .unwrap();
        framed[6] ^= 0x10;
        let mut batch = WriteBatch::default();
        batch.put_cf(db.cf(ColumnFamilyName::System), &key, &framed);
        db.write(batch, true).unwrap();

        // An apply that reads it (a compare-and-swap) fails and quarantines the replica.
        let mut log_id = range_origin_log_id();
        log_id.index = 5;
        let entry = crate::types::Entry::new_normal(
            log_id,
            Command::CompareAndSwap {
                key: key.clone(),
                expected: None,
                new_value: Some(b"x".to_vec()),
                commit_ts: None,
            },
        );
        let entries = futures::stream::iter(vec![Ok((entry, None))]);
        let err = RaftStateMachine::apply(&mut sm, entries).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(sm.shared.quarantined().is_some());

        drop(sm);
        let (events, _) = tokio::sync::mpsc::channel(MAX_PENDING_RANGE_EVENTS);
        let (sm, shared) =
            StateMachine::open(db.clone(), LEFT, 1, dir.path(), Arc::default(), events).unwrap();
        // The quarantine was persisted: a restarted node does not serve it again.
        assert!(shared.quarantined().is_some());
        drop(sm);
        let mut batch = WriteBatch::default();
        batch.delete_cf(
            db.cf(ColumnFamilyName::RaftState),
            state_key(LEFT, StateTag::Quarantined),
        );
        db.write(batch, true).unwrap();
        // Building a snapshot over the damaged value quarantines too.
        let (events, _) = tokio::sync::mpsc::channel(MAX_PENDING_RANGE_EVENTS);
        let (mut fresh, shared) =
            StateMachine::open(db.clone(), LEFT, 1, dir.path(), Arc::default(), events).unwrap();
        assert!(shared.quarantined().is_none());
        let mut builder = fresh.get_snapshot_builder().await;
        assert!(builder.build_snapshot().await.is_err());
        assert!(shared.quarantined().is_some());
    }

    #[test]
    fn a_frozen_range_refuses_writes_and_splits_until_thawed() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let mut right = open(&db, dir.path(), &span(RIGHT, b"m", b"", 5));
        assert!(matches!(
            apply(&mut right, freeze(3)),
            CommandResponse::FreezeDone { .. }
        ));
        // Asking again for the same merge is answered the same; another merge is refused.
        assert!(matches!(
            apply(&mut right, freeze(3)),
            CommandResponse::FreezeDone { .. }
        ));
        assert_eq!(
            apply(&mut right, freeze(4)),
            CommandResponse::Frozen { into: LEFT }
        );
        assert_eq!(
            apply(&mut right, put(b"n")),
            CommandResponse::Frozen { into: LEFT }
        );
        let split = Command::Split {
            split_key: b"p".to_vec(),
            new_range_id: 9,
            expected_generation: 5,
        };
        assert_eq!(
            apply(&mut right, split),
            CommandResponse::Frozen { into: LEFT }
        );
        assert_eq!(right.shared.frozen().map(|f| f.into), Some(LEFT));
        // A thaw for another freeze changes nothing; the matching one thaws.
        let other = MergeFreeze {
            into: LEFT,
            left_generation: 4,
        };
        apply(&mut right, Command::Thaw { freeze: other });
        assert!(right.shared.frozen().is_some());
        let ours = MergeFreeze {
            into: LEFT,
            left_generation: 3,
        };
        apply(&mut right, Command::Thaw { freeze: ours });
        assert_eq!(apply(&mut right, put(b"n")), CommandResponse::Done);
        assert!(right.shared.frozen().is_none());
    }

    #[test]
    fn merge_takes_over_the_frozen_right_range_and_moves_past_both_generations() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let mut left = open(&db, dir.path(), &span(LEFT, b"a", b"m", 3));
        let mut right = open(&db, dir.path(), &span(RIGHT, b"m", b"", 5));
        apply(&mut right, put(b"n"));
        let merge = |expected_generation| Command::Merge {
            right: span(RIGHT, b"m", b"", 5),
            expected_generation,
        };
        // The right range is not frozen: this replica lacks its final data; it stops.
        let mut pending = PendingApply::default();
        assert!(left.apply_command(&mut pending, merge(3)).is_err());

        apply(&mut right, freeze(3));
        assert!(matches!(
            apply(&mut left, merge(2)),
            CommandResponse::Rejected { .. }
        ));
        let CommandResponse::MergeDone { span: merged } = apply(&mut left, merge(3)) else {
            panic!("merge refused");
        };
        assert_eq!(
            (merged.start_key.as_slice(), merged.end_key.as_slice()),
            (&b"a"[..], &b""[..])
        );
        assert_eq!(merged.generation, 6);
        // The right range's data is now the left range's, without moving.
        assert_eq!(apply(&mut left, put(b"n")), CommandResponse::Done);
        // A split moves the merged keys on; an abort still learns that the merge happened.
        let split = Command::Split {
            split_key: b"c".to_vec(),
            new_range_id: 9,
            expected_generation: 6,
        };
        assert!(matches!(
            apply(&mut left, split),
            CommandResponse::SplitDone { .. }
        ));
        let abort = Command::AbortMerge {
            right: span(RIGHT, b"m", b"", 5),
            left_generation: 3,
        };
        assert!(matches!(
            apply(&mut left, abort),
            CommandResponse::MergeAborted { merged: true, .. }
        ));
        assert_eq!(left.shared.span().map(|s| s.generation), Some(7));
    }

    fn put_sphere_keys(names: &[&[u8]], commit_ts: Timestamp) -> Command {
        Command::Write {
            ops: names
                .iter()
                .map(|name| WriteOp {
                    key: keys::kv_key(1, name),
                    value: Some(b"v".to_vec()),
                })
                .collect(),
            commit_ts: Some(commit_ts),
        }
    }

    #[test]
    fn sphere_writes_commit_above_the_range_s_last_commit_which_splits_carry_and_merges_keep() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let middle = keys::kv_key(1, b"m");
        let mut left = open(&db, dir.path(), &span(LEFT, b"\x01", &middle, 3));
        let mut right = open(&db, dir.path(), &span(RIGHT, &middle, b"", 5));
        let refused = |r: CommandResponse| matches!(r, CommandResponse::Rejected { .. });
        // One entry's keys share its commit ts; the next entry must go above it, whatever
        // its keys.
        assert_eq!(
            apply(&mut left, put_sphere_keys(&[b"a", b"b"], 10)),
            CommandResponse::Done
        );
        assert!(refused(apply(&mut left, put_sphere_keys(&[b"c"], 10))));
        assert!(refused(apply(&mut left, put_sphere_keys(&[b"c"], 9))));
        assert_eq!(
            apply(&mut left, put_sphere_keys(&[b"c"], 11)),
            CommandResponse::Done
        );
        // Nothing of a refused entry was written.
        assert_eq!(
            mvcc::store::get_at(&db, None, &keys::kv_key(1, b"c"), Timestamp::MAX)
                .unwrap()
                .map(|v| v.commit_ts),
            Some(11)
        );
        // A merge keeps the left range's own last commit: a write its leader fixed before
        // the merge applied, below the right range's commits, still applies.
        assert_eq!(
            apply(&mut right, put_sphere_keys(&[b"n"], 20)),
            CommandResponse::Done
        );
        apply(&mut right, freeze(3));
        let merge = Command::Merge {
            right: span(RIGHT, &middle, b"", 5),
            expected_generation: 3,
        };
        assert!(matches!(
            apply(&mut left, merge),
            CommandResponse::MergeDone { .. }
        ));
        assert_eq!(
            apply(&mut left, put_sphere_keys(&[b"d"], 15)),
            CommandResponse::Done
        );
        assert!(refused(apply(&mut left, put_sphere_keys(&[b"g"], 15))));
        assert_eq!(
            apply(&mut left, put_sphere_keys(&[b"g"], 21)),
            CommandResponse::Done
        );
        // A split hands the last commit to the right half.
        let split = Command::Split {
            split_key: keys::kv_key(1, b"e"),
            new_range_id: 9,
            expected_generation: 6,
        };
        assert!(matches!(
            apply(&mut left, split),
            CommandResponse::SplitDone { .. }
        ));
        let (events, _) = tokio::sync::mpsc::channel(MAX_PENDING_RANGE_EVENTS);
        let (mut child, _) =
            StateMachine::open(db.clone(), 9, 1, dir.path(), Arc::default(), events).unwrap();
        assert!(refused(apply(&mut child, put_sphere_keys(&[b"f"], 21))));
        assert_eq!(
            apply(&mut child, put_sphere_keys(&[b"f"], 22)),
            CommandResponse::Done
        );
    }

    #[test]
    fn an_abort_before_the_merge_makes_the_merge_fail() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let mut left = open(&db, dir.path(), &span(LEFT, b"a", b"m", 3));
        let mut right = open(&db, dir.path(), &span(RIGHT, b"m", b"", 5));
        apply(&mut right, freeze(3));
        let abort = Command::AbortMerge {
            right: span(RIGHT, b"m", b"", 5),
            left_generation: 3,
        };
        assert!(matches!(
            apply(&mut left, abort),
            CommandResponse::MergeAborted { merged: false, .. }
        ));
        let merge = Command::Merge {
            right: span(RIGHT, b"m", b"", 5),
            expected_generation: 3,
        };
        assert!(matches!(
            apply(&mut left, merge),
            CommandResponse::Rejected { .. }
        ));
        assert_eq!(left.shared.span().map(|s| s.end_key), Some(b"m".to_vec()));
    }
}
