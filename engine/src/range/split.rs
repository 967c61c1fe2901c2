//! Range splits: the size and load checks each range leader runs over its ranges, and the
//! split itself (one `Split` command on the parent's log; the right half starts as a new
//! Raft group on the same replicas, from the data already on each node).
//!
//! Where to split is [`split_point`], a pure function; this module asks the meta range for
//! the new range's id and proposes the split on the parent's log, and does not import
//! `node`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use openraft::async_runtime::WatchReceiver;
use std::time::Duration;

use spheredb_client::proto::v1::AllocRangeIdsRequest;
use spheredb_client::ClientError;
use spheredb_raft::network::{Replica, ReplicaDirectory};
use spheredb_raft::{Command, CommandResponse, RangeId, RangeRecord, RangeSpan};
use spheredb_storage::{keys, mvcc, ColumnFamilyName, Db, StorageError};
use tokio::sync::watch;

use crate::errors::{not_leader_hint, write_error};
use crate::ids::META_RANGE_ID;
use crate::meta::MetaState;
use crate::peers::Peers;
use crate::replica::leader_node;

/// Period of the split check on each node.
pub const SPLIT_CHECK_INTERVAL_MS: u64 = 1_000;
/// Most splits one node starts per check.
pub const MAX_SPLITS_PER_CHECK: usize = 4;
/// Longest a split waits for its command to commit.
pub const SPLIT_TIMEOUT_MS: u64 = 10_000;

/// Least time between two load splits of one range, so a split has time to show its effect
/// (and leaders to move) before the next. It also starts when this node becomes a range's
/// leader (a moved leader is the allocator's answer to load), and for both halves of any
/// split.
pub const LOAD_SPLIT_COOLDOWN_MS: u64 = 60_000;
/// Busy cores of the leader's node that count as busy whatever its core count: one hot
/// range's leader work runs mostly in a few serial tasks (its RaftCore, its apply loop), so
/// on a machine with many cores it saturates them long before it fills the machine.
pub const LOAD_SPLIT_ENOUGH_BUSY_CORES: f64 = 2.0;

/// The load-split rule: when a range busier than its threshold splits. A pure function of
/// what the split check observes, once per check, for each range this node leads.
#[derive(Debug, Clone)]
pub struct LoadSplitPolicy {
    /// Requests per second over which a range is busy.
    pub split_qps: f64,
    /// How long a range must stay busy, every check, before it splits.
    pub sustain_ms: u64,
    /// Share of the node's cores (0.0–1.0) its process must keep busy, every check, for a
    /// range it leads to count as busy (capped at [`LOAD_SPLIT_ENOUGH_BUSY_CORES`] cores);
    /// 0 splits on load alone.
    pub min_node_cpu_fraction: f64,
}

/// What [`LoadSplitPolicy`] remembers of one range between checks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadSplitState {
    /// When the range and its node became busy and have stayed so since.
    pub busy_since_ms: Option<u64>,
    /// When the cooldown last started: a change of the range's span (a split, by this check,
    /// by hand or one that committed after its proposal timed out; a merge), a new right
    /// half, or this node becoming its leader.
    pub cooldown_from_ms: Option<u64>,
    /// [`span_fingerprint`] of the range's span when last seen; another one starts the
    /// cooldown. (Not the generation: replica changes bump that too.)
    pub span: u64,
}

/// A fingerprint of `span`'s bounds, to notice that they changed.
pub fn span_fingerprint(span: &RangeSpan) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&span.start_key, &span.end_key).hash(&mut h);
    h.finish()
}

/// The node's CPU at one check: busy cores of its process, and the cores it may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeCpuSample {
    pub busy_cores: f64,
    pub cores: f64,
}

impl LoadSplitPolicy {
    /// Whether the node counts as short of CPU at this check; `None` (no reading: the first
    /// check, or no `getrusage`) does not hold a split back.
    fn node_busy(&self, cpu: Option<NodeCpuSample>) -> bool {
        cpu.is_none_or(|c| {
            let needed = (self.min_node_cpu_fraction * c.cores).min(LOAD_SPLIT_ENOUGH_BUSY_CORES);
            c.busy_cores >= needed
        })
    }

    /// Whether the range splits by load at `now_ms`, given its load `qps` and its node's CPU
    /// at this check; updates `state`. Both must have held at every check for the sustain
    /// period, and the cooldown must be over. The caller records a split it carried out with
    /// [`Self::split_done`].
    pub fn due(
        &self,
        state: &mut LoadSplitState,
        now_ms: u64,
        qps: f64,
        cpu: Option<NodeCpuSample>,
    ) -> bool {
        if qps <= self.split_qps || !self.node_busy(cpu) {
            state.busy_since_ms = None;
            return false;
        }
        let since = *state.busy_since_ms.get_or_insert(now_ms);
        let sustained = now_ms.saturating_sub(since) >= self.sustain_ms;
        let cooled = state
            .cooldown_from_ms
            .is_none_or(|at| now_ms.saturating_sub(at) >= LOAD_SPLIT_COOLDOWN_MS);
        sustained && cooled
    }

    /// Records a split of the range at `now_ms` (by size or by load): the sustain period
    /// starts over now (it may run during the cooldown), and so does the cooldown.
    pub fn split_done(state: &mut LoadSplitState, now_ms: u64) {
        state.busy_since_ms = None;
        state.cooldown_from_ms = Some(now_ms);
    }

    /// Notes the range's span (its [`span_fingerprint`]) at `now_ms`: a span changed since
    /// the last check (a split or merge, whoever made it) counts as a split.
    pub fn observe_span(state: &mut LoadSplitState, now_ms: u64, span: u64) {
        if state.span != span {
            state.span = span;
            Self::split_done(state, now_ms);
        }
    }

    /// The state of a range this node has just started to lead, or a new right half: in
    /// cooldown from `now_ms`.
    pub fn fresh(now_ms: u64, span: u64) -> LoadSplitState {
        LoadSplitState {
            busy_since_ms: None,
            cooldown_from_ms: Some(now_ms),
            span,
        }
    }
}

/// CPU seconds (user and system, all threads) this process has used so far, from
/// `getrusage(RUSAGE_SELF)`; `None` if the call fails.
pub fn process_cpu_seconds() -> Option<f64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole `rusage` into the pointer it is given on success,
    // and `usage` is read only then.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return None;
        }
        usage.assume_init()
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(secs(usage.ru_utime) + secs(usage.ru_stime))
}

/// Busy cores of this process between two readings of [`process_cpu_seconds`].
#[derive(Debug)]
struct NodeCpu {
    cores: f64,
    last: Option<(std::time::Instant, f64)>,
}

impl NodeCpu {
    fn new() -> NodeCpu {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        NodeCpu { cores, last: None }
    }

    /// The CPU since the previous call; `None` on the first call or without a reading.
    fn sample(&mut self) -> Option<NodeCpuSample> {
        let now = (std::time::Instant::now(), process_cpu_seconds()?);
        let previous = self.last.replace(now)?;
        let wall_secs = now.0.duration_since(previous.0).as_secs_f64();
        (wall_secs > 0.0).then(|| NodeCpuSample {
            busy_cores: (now.1 - previous.1) / wall_secs,
            cores: self.cores,
        })
    }
}

/// Size of a span's data and the row boundary near its middle by bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanSize {
    pub size_bytes: u64,
    /// Where to split to halve the range; `None` when no row boundary lies strictly inside.
    pub middle_key: Option<Vec<u8>>,
}

/// Measures `span`: its bytes in every data family, then a second pass over the family
/// holding most of them to find the middle. Version keys count as their key (a row's
/// versions never split), and long values (in `data`) count towards the size but not
/// towards the middle, which is found among the write records.
pub fn measure_span(db: &Db, span: &RangeSpan) -> Result<SpanSize, StorageError> {
    let mut total = 0u64;
    let mut by_family = Vec::new();
    for cf in ColumnFamilyName::RANGE_DATA {
        let mut size = 0u64;
        for item in db.iter_span(cf, &span.start_key, &span.end_key) {
            let (k, v) = item?;
            size += (k.len() + v.len()) as u64;
        }
        total += size;
        by_family.push((size, cf));
    }
    let middle_in = match by_family.iter().max_by_key(|(size, _)| *size) {
        Some((_, ColumnFamilyName::Data)) => ColumnFamilyName::Write,
        Some((_, cf)) => *cf,
        None => ColumnFamilyName::Write,
    };
    let family_total: u64 = by_family
        .iter()
        .filter(|(_, cf)| *cf == middle_in)
        .map(|(size, _)| *size)
        .sum();
    let mut seen = 0u64;
    let mut middle_key = None;
    for item in db.iter_span(middle_in, &span.start_key, &span.end_key) {
        let (k, v) = item?;
        seen += (k.len() + v.len()) as u64;
        if seen * 2 >= family_total {
            let key = if middle_in.is_versioned() {
                mvcc::split_version_key(&k)?.0.to_vec()
            } else {
                k.to_vec()
            };
            middle_key = split_point(span, &key);
            if middle_key.is_some() {
                break;
            }
        }
    }
    Ok(SpanSize {
        size_bytes: total,
        middle_key,
    })
}

/// The row boundary at or below `key` if it lies strictly inside `span`.
pub fn split_point(span: &RangeSpan, key: &[u8]) -> Option<Vec<u8>> {
    let row = keys::row_prefix(key);
    (row > span.start_key.as_slice() && span.contains(row)).then(|| row.to_vec())
}

/// Splits the range of `replica` (this node must lead it) at the row boundary of `key`,
/// with a range id from the meta range (through `peers`); counts the split in `counters`.
pub async fn split_range(
    peers: &Peers,
    counters: &MetaState,
    replica: &Replica,
    key: &[u8],
) -> Result<(RangeRecord, RangeRecord), ClientError> {
    let range_id = replica.shared.range_id;
    replica.touch();
    if !replica.raft.is_leader() {
        return Err(not_leader_hint(leader_node(replica)));
    }
    if range_id == META_RANGE_ID {
        return Err(ClientError::InvalidArgument(
            "the meta range does not split".into(),
        ));
    }
    let Some(span) = replica.shared.span() else {
        return Err(ClientError::Unavailable(format!(
            "range {range_id} has no data yet"
        )));
    };
    let Some(split_key) = split_point(&span, key) else {
        return Err(ClientError::InvalidArgument(format!(
            "the split key's row boundary is not strictly inside range {range_id}"
        )));
    };
    let new_range_id = peers
        .call_meta(|mut admin| async move {
            admin
                .alloc_range_ids(AllocRangeIdsRequest { count: 1 })
                .await
        })
        .await
        .map_err(|e| {
            ClientError::Unavailable(format!("allocating a range id from the meta range: {e}"))
        })?
        .first;
    let write = replica.raft.client_write(Command::Split {
        split_key,
        new_range_id,
        expected_generation: span.generation,
    });
    let resp = match tokio::time::timeout(Duration::from_millis(SPLIT_TIMEOUT_MS), write).await {
        Err(_) => {
            return Err(ClientError::OutcomeUnknown(
                "split not committed in time".into(),
            ))
        }
        Ok(Err(e)) => return Err(write_error(e)),
        Ok(Ok(r)) => r.data,
    };
    match resp {
        CommandResponse::SplitDone { left, right } => {
            counters.count("splits");
            let membership = replica
                .raft
                .metrics()
                .borrow_watched()
                .membership_config
                .membership()
                .clone();
            tracing::info!(range_id, new_range_id, "split");
            Ok((
                RangeRecord::new(*left, &membership),
                RangeRecord::new(*right, &membership),
            ))
        }
        CommandResponse::Rejected { reason } => Err(ClientError::Unavailable(reason)),
        other => Err(ClientError::Internal(format!(
            "unexpected split response {other:?}"
        ))),
    }
}

/// What the split check works with.
pub struct SplitCheck {
    pub db: Db,
    pub replicas: Arc<ReplicaDirectory>,
    pub peers: Arc<Peers>,
    pub counters: Arc<MetaState>,
    /// A range larger than this splits.
    pub split_size_bytes: u64,
    /// When a busy range splits.
    pub load: LoadSplitPolicy,
}

/// Checks the ranges this node leads every [`SPLIT_CHECK_INTERVAL_MS`] and splits those past
/// the size or load threshold.
pub async fn split_loop(check: SplitCheck, mut stop: watch::Receiver<bool>) {
    // Each range's last measurement and the span it measured; a range is measured again
    // once writes could have moved it by an eighth of the threshold, or its span changed
    // (a merge widened it).
    let mut measured: HashMap<RangeId, (RangeSpan, SpanSize)> = HashMap::new();
    let remeasure_bytes = (check.split_size_bytes / 8).max(1);
    let mut load_state: HashMap<RangeId, LoadSplitState> = HashMap::new();
    let mut node_cpu = NodeCpu::new();
    let started = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(Duration::from_millis(SPLIT_CHECK_INTERVAL_MS)) => {}
        }
        let mut splits = 0usize;
        let cpu = node_cpu.sample();
        for replica in check.replicas.all() {
            let range_id = replica.shared.range_id;
            // Taken per range: the splits before it in this pass may have taken seconds.
            let now_ms = started.elapsed().as_millis() as u64;
            if range_id == META_RANGE_ID || !replica.raft.is_leader() {
                // A leader that comes back starts in cooldown, and sees the load anew.
                load_state.remove(&range_id);
                continue;
            }
            let span_now = replica.shared.span().map_or(0, |s| span_fingerprint(&s));
            let state = load_state
                .entry(range_id)
                .or_insert_with(|| LoadSplitPolicy::fresh(now_ms, span_now));
            LoadSplitPolicy::observe_span(state, now_ms, span_now);
            let too_busy = check.load.due(state, now_ms, replica.qps(), cpu);
            if splits >= MAX_SPLITS_PER_CHECK {
                continue;
            }
            let Some(span) = replica.shared.span() else {
                continue;
            };
            let written = replica.shared.written_bytes.load(Ordering::Relaxed);
            let stale = measured.get(&range_id).is_none_or(|(at, _)| {
                written >= remeasure_bytes
                    || (&at.start_key, &at.end_key) != (&span.start_key, &span.end_key)
            });
            if stale {
                replica.shared.written_bytes.store(0, Ordering::Relaxed);
                let db = check.db.clone();
                let s = span.clone();
                match tokio::task::spawn_blocking(move || measure_span(&db, &s)).await {
                    Ok(Ok(size)) => {
                        replica.size_bytes.store(size.size_bytes, Ordering::Relaxed);
                        measured.insert(range_id, (span.clone(), size));
                    }
                    Ok(Err(e)) => tracing::warn!(range_id, "measuring range: {e}"),
                    Err(e) => tracing::warn!(range_id, "measuring task failed: {e}"),
                }
            }
            let Some((_, size)) = measured.get(&range_id).cloned() else {
                continue;
            };
            let too_big = size.size_bytes > check.split_size_bytes;
            let Some(key) = size.middle_key.clone().filter(|_| too_big || too_busy) else {
                continue;
            };
            match split_range(&check.peers, &check.counters, &replica, &key).await {
                Ok((_, right)) => {
                    splits += 1;
                    measured.remove(&range_id);
                    let now_ms = started.elapsed().as_millis() as u64;
                    // The left half's new span starts its cooldown at the next check.
                    load_state.insert(
                        right.span.range_id,
                        LoadSplitPolicy::fresh(now_ms, span_fingerprint(&right.span)),
                    );
                    tracing::info!(
                        range_id,
                        size_bytes = size.size_bytes,
                        qps = replica.qps(),
                        node_busy_cores = cpu.map(|c| c.busy_cores),
                        too_big,
                        "range split by the size/load check"
                    );
                }
                Err(e) => tracing::info!(range_id, "split failed: {e}"),
            }
        }
        measured.retain(|id, _| check.replicas.get(*id).is_some());
        load_state.retain(|id, _| check.replicas.get(*id).is_some());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: &[u8], end: &[u8]) -> RangeSpan {
        RangeSpan {
            range_id: 2,
            start_key: start.to_vec(),
            end_key: end.to_vec(),
            generation: 1,
            next_replica_id: 2,
        }
    }

    fn policy() -> LoadSplitPolicy {
        LoadSplitPolicy {
            split_qps: 100.0,
            sustain_ms: 10_000,
            min_node_cpu_fraction: 0.75,
        }
    }

    fn cpu(busy_cores: f64, cores: f64) -> Option<NodeCpuSample> {
        Some(NodeCpuSample { busy_cores, cores })
    }

    #[test]
    fn a_range_splits_by_load_only_after_staying_busy_for_the_whole_sustain_period() {
        let p = policy();
        let mut s = LoadSplitState::default();
        let busy = cpu(1.8, 2.0);
        assert!(!p.due(&mut s, 0, 500.0, busy));
        assert!(!p.due(&mut s, 9_999, 500.0, busy));
        // One quiet check starts the period over.
        assert!(!p.due(&mut s, 10_000, 50.0, busy));
        assert!(!p.due(&mut s, 11_000, 500.0, busy));
        assert!(!p.due(&mut s, 20_999, 500.0, busy));
        assert!(p.due(&mut s, 21_000, 500.0, busy));
    }

    #[test]
    fn a_busy_range_splits_only_while_its_node_stays_short_of_cpu() {
        let p = policy();
        let mut s = LoadSplitState::default();
        // Two nodes sharing two cores: this one never keeps 1.5 of them busy.
        assert!(!p.due(&mut s, 0, 500.0, cpu(0.9, 2.0)));
        assert!(!p.due(&mut s, 30_000, 500.0, cpu(0.9, 2.0)));
        // Its CPU must hold for the whole period too: one busy check (a compaction) is not
        // enough, and one idle check starts over.
        assert!(!p.due(&mut s, 31_000, 500.0, cpu(1.6, 2.0)));
        assert!(!p.due(&mut s, 35_000, 500.0, cpu(0.5, 2.0)));
        assert!(!p.due(&mut s, 36_000, 500.0, cpu(1.6, 2.0)));
        assert!(p.due(&mut s, 46_000, 500.0, cpu(1.6, 2.0)));
        // On 32 cores, two busy cores are enough (one range's serial work fills a few).
        let mut s = LoadSplitState::default();
        assert!(!p.due(&mut s, 0, 500.0, cpu(2.0, 32.0)));
        assert!(p.due(&mut s, 10_000, 500.0, cpu(2.0, 32.0)));
        let mut s = LoadSplitState::default();
        assert!(!p.due(&mut s, 0, 500.0, cpu(1.9, 32.0)));
        assert!(!p.due(&mut s, 10_000, 500.0, cpu(1.9, 32.0)));
        // Without a CPU reading load alone decides.
        let mut s = LoadSplitState::default();
        assert!(!p.due(&mut s, 0, 500.0, None));
        assert!(p.due(&mut s, 10_000, 500.0, None));
        // A zero fraction splits on load alone.
        let eager = LoadSplitPolicy {
            min_node_cpu_fraction: 0.0,
            ..policy()
        };
        let mut s = LoadSplitState::default();
        assert!(!eager.due(&mut s, 0, 500.0, cpu(0.0, 2.0)));
        assert!(eager.due(&mut s, 10_000, 500.0, cpu(0.0, 2.0)));
    }

    #[test]
    fn splits_new_leaders_and_new_halves_wait_out_the_cooldown() {
        let p = policy();
        let busy = cpu(1.8, 2.0);
        let mut s = LoadSplitState::default();
        assert!(!p.due(&mut s, 0, 500.0, busy));
        assert!(p.due(&mut s, 10_000, 500.0, busy));
        LoadSplitPolicy::split_done(&mut s, 10_000);
        assert!(!p.due(&mut s, 11_000, 500.0, busy));
        assert!(!p.due(&mut s, 10_000 + LOAD_SPLIT_COOLDOWN_MS - 1, 500.0, busy));
        assert!(p.due(&mut s, 10_000 + LOAD_SPLIT_COOLDOWN_MS, 500.0, busy));
        // A span changed by someone else (a split by hand, one that committed after its
        // proposal timed out, a merge) counts as a split.
        let mut s = LoadSplitPolicy::fresh(0, 1);
        LoadSplitPolicy::observe_span(&mut s, LOAD_SPLIT_COOLDOWN_MS, 1);
        assert!(!p.due(&mut s, LOAD_SPLIT_COOLDOWN_MS, 500.0, busy));
        LoadSplitPolicy::observe_span(&mut s, LOAD_SPLIT_COOLDOWN_MS + 10_000, 2);
        assert!(!p.due(&mut s, LOAD_SPLIT_COOLDOWN_MS + 10_000, 500.0, busy));
        assert!(!p.due(&mut s, 2 * LOAD_SPLIT_COOLDOWN_MS + 9_999, 500.0, busy));
        assert!(p.due(&mut s, 2 * LOAD_SPLIT_COOLDOWN_MS + 10_000, 500.0, busy));
        // A new leader, or the right half of a split, starts in cooldown.
        let mut s = LoadSplitPolicy::fresh(5_000, 1);
        // The same span again is no change.
        LoadSplitPolicy::observe_span(&mut s, 5_000, 1);
        assert!(!p.due(&mut s, 5_000, 500.0, busy));
        assert!(!p.due(&mut s, 5_000 + LOAD_SPLIT_COOLDOWN_MS - 1, 500.0, busy));
        assert!(p.due(&mut s, 5_000 + LOAD_SPLIT_COOLDOWN_MS, 500.0, busy));
    }

    #[test]
    fn this_process_cpu_time_is_readable_and_grows_while_it_computes() {
        let Some(before) = process_cpu_seconds() else {
            return; // not Linux: the gate treats the node's CPU as unknown
        };
        // Spin until the kernel has charged at least one more tick (10 ms) to the process,
        // for at most 10 s of wall time.
        let start = std::time::Instant::now();
        let mut now = before;
        while now <= before && start.elapsed() < Duration::from_secs(10) {
            let mut x = 0u64;
            for i in 0..1_000_000u64 {
                x = x.wrapping_add(std::hint::black_box(i));
            }
            std::hint::black_box(x);
            now = process_cpu_seconds().expect("readable once, readable again");
        }
        assert!(now > before, "no CPU time charged after 10 s of spinning");
    }

    #[test]
    fn split_points_lie_strictly_inside_the_span_at_row_boundaries() {
        let s = span(&keys::kv_key(1, b"a"), &keys::kv_key(1, b"z"));
        assert_eq!(
            split_point(&s, &keys::kv_key(1, b"m")),
            Some(keys::kv_key(1, b"m"))
        );
        assert_eq!(split_point(&s, &keys::kv_key(1, b"a")), None);
        assert_eq!(split_point(&s, &keys::kv_key(1, b"z")), None);
        let row = keys::sql_row_key(1, 1, 1, &[keys::Datum::Int(3)]);
        let mut family = row.clone();
        family.push(0xfe);
        let s = span(&[keys::SPHERE_PREFIX], &[]);
        assert_eq!(split_point(&s, &family), Some(row));
    }

    #[test]
    fn measuring_finds_the_middle_row() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &spheredb_storage::DbOptions::default()).unwrap();
        let mut batch = rocksdb::WriteBatch::default();
        for i in 0..100u32 {
            let key = keys::kv_key(1, format!("k{i:03}").as_bytes());
            mvcc::store::put_version(&db, &mut batch, &key, 7, Some(&[0u8; 100]));
        }
        db.write(batch, false).unwrap();
        let size = measure_span(&db, &span(&[keys::SPHERE_PREFIX], &[])).unwrap();
        // Version key (sphere header, user key, ts) and write record (checksum, kind,
        // start ts, value flag, value).
        assert_eq!(
            size.size_bytes,
            100 * ((10 + 4 + 8) + (4 + 1 + 8 + 1 + 100))
        );
        let middle = size.middle_key.unwrap();
        assert!(
            middle >= keys::kv_key(1, b"k048") && middle <= keys::kv_key(1, b"k051"),
            "{middle:?}"
        );
    }
}
