//! Timestamps on a node: batches of oracle timestamps, and the commit-ts rules
//! (`range::commit_ts`) of every range this node leads, each behind its own lock.
//!
//! Every commit ts and every seed is a timestamp the oracle handed out to this node, so any
//! timestamp the oracle hands out later is above it: a write acknowledged before a client asks
//! the oracle for a read ts is visible at that ts, and a new leader seeded from a fresh
//! timestamp starts above everything its predecessors fixed or read. A write's commit ts comes
//! from a batch fetched after the write arrived, so it is also above every timestamp handed
//! out before the write began: a snapshot read at such a timestamp never sees it. One fetch
//! (one `GetTimestamps` call of [`TS_BATCH_SIZE`]) serves every write that arrived before it
//! began, so the oracle's cost is one round trip per wave of writes, not per write.
//!
//! A write is proposed while its range's lock is held, after its commit ts was fixed, so
//! proposals reach the log in commit-ts order and a key's versions rise in log order. The
//! proposal is conditional on the leadership it was seeded under: a leader that lost and
//! regained leadership meanwhile cannot slip in a write fixed under the old seed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::impls::ProgressResponder;
use openraft::vote::RaftLeaderId;
use spheredb_client::proto::v1::txn_client::TxnClient;
use spheredb_client::proto::v1::GetTimestampsRequest;
use spheredb_client::ClientError;
use spheredb_raft::network::{Replica, ReplicaDirectory};
use spheredb_raft::{Command, CommandResponse, RaftHandle, RangeId, TypeConfig};
use spheredb_storage::mvcc::Timestamp;

use crate::errors::{not_leader, write_error};
use crate::meta::tso::{physical_ms, Tso};
use crate::peers::Peers;
use crate::range::commit_ts::{CommitTsRules, Epoch};
use crate::replica::leading_meta;

/// Timestamps fetched from the oracle at a time: one fetch serves every write that arrived
/// before it began.
pub const TS_BATCH_SIZE: u64 = 1 << 12;
/// Longest one fetch of a batch may take.
pub const TS_FETCH_TIMEOUT_MS: u64 = 3_000;
/// Nodes asked per fetch (following `NotLeader` hints).
pub const TS_FETCH_ATTEMPTS: usize = 3;
/// Batches a write may use up before it gives up (each is one fetch; the second always
/// suffices unless reads push the floor past a fresh batch).
pub const MAX_BATCHES_PER_WRITE: usize = 3;
/// A read at a timestamp more than this far past the newest one this node knows is refused
/// without asking the oracle; a closer one is checked against a fresh timestamp.
pub const MAX_READ_TS_AHEAD_MS: u64 = 10_000;
/// Clocks of ranges no longer here are dropped once this many more are kept than the node
/// has replicas.
const STALE_CLOCKS_BOUND: usize = 64;

/// The node's current batch of oracle timestamps.
#[derive(Debug, Default)]
struct Batch {
    /// Smallest unused timestamp.
    next: Timestamp,
    /// First timestamp past the batch.
    end: Timestamp,
    fetched_at: Option<Instant>,
}

/// One range leader's rules, and the wake-up of reads waiting for writes in flight.
#[derive(Debug, Default)]
pub struct RangeClock {
    rules: tokio::sync::Mutex<CommitTsRules>,
    applied: tokio::sync::Notify,
}

/// What a write proposes under: the epoch and leadership its range's rules were seeded
/// for, its keys, and how long it waits for its answer.
#[derive(Debug, Clone, Copy)]
pub struct Proposal<'a> {
    pub epoch: Epoch,
    pub leader_id: LeaderId,
    pub keys: &'a [Vec<u8>],
    pub timeout_ms: u64,
}

/// Why a write was not proposed or not answered.
#[derive(Debug)]
pub enum Proposed {
    /// The timestamp source had none above the range's floor: fetch more and retry.
    NoTimestamp,
    Failed(ClientError),
}

impl RangeClock {
    /// Seeds the rules for `epoch` from `fresh` unless they already are.
    pub async fn seed(&self, epoch: Epoch, fresh: Timestamp) {
        let mut rules = self.rules.lock().await;
        if !rules.seeded_for(epoch) {
            rules.seed(epoch, fresh);
        }
    }

    /// Fixes the write's commit ts (from `take_above`, given the floor) and proposes the
    /// entry `command` builds for it, both while the rules are held, so entries reach the log
    /// in commit-ts order. Then waits for the answer; the keys stay in flight until the write
    /// applies or can no longer apply, even past the timeout, since a read must not skip a
    /// write that may still commit below its ts.
    pub async fn propose(
        self: &Arc<Self>,
        raft: &RaftHandle,
        p: Proposal<'_>,
        take_above: impl FnOnce(Timestamp) -> Option<Timestamp>,
        command: impl FnOnce(Timestamp) -> Command,
    ) -> Result<CommandResponse, Proposed> {
        let mut rules = self.rules.lock().await;
        if !rules.seeded_for(p.epoch) {
            return Err(Proposed::Failed(ClientError::Unavailable(
                "the range's leadership changed; retry".into(),
            )));
        }
        let commit_ts = take_above(rules.commit_floor()).ok_or(Proposed::NoTimestamp)?;
        rules.begin_write(p.keys, commit_ts);
        let (responder, answer) = ProgressResponder::<TypeConfig, _>::complete_only();
        let submitted = raft
            .write(command(commit_ts))
            .with_leader(p.leader_id)
            .responder(responder)
            .await;
        drop(rules);
        let in_flight = InFlightWrite {
            clock: self.clone(),
            keys: p.keys.to_vec(),
            commit_ts,
        };
        if let Err(fatal) = submitted {
            in_flight.end().await;
            return Err(Proposed::Failed(ClientError::Unavailable(format!(
                "raft stopped: {fatal}"
            ))));
        }
        let mut answer = Box::pin(answer);
        let timeout_ms = p.timeout_ms;
        match tokio::time::timeout(Duration::from_millis(timeout_ms), &mut answer).await {
            Ok(result) => {
                in_flight.end().await;
                match result {
                    Ok(Ok(resp)) => Ok(resp.data),
                    Ok(Err(e)) => Err(Proposed::Failed(write_error(
                        openraft::errors::RaftError::APIError(e),
                    ))),
                    Err(_) => Err(Proposed::Failed(ClientError::Indeterminate(
                        "raft dropped the write's answer; it may or may not have applied".into(),
                    ))),
                }
            }
            Err(_) => {
                // The answer comes when the entry applies or the leadership ends; openraft
                // answers or drops every responder then.
                tokio::spawn(async move {
                    let _ = answer.await;
                    in_flight.end().await;
                });
                Err(Proposed::Failed(ClientError::Indeterminate(format!(
                    "write not committed within {timeout_ms} ms; it may still apply"
                ))))
            }
        }
    }
}

/// Where a read reads, once the writes it waited for applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadTs(pub Timestamp);

/// The node's timestamps: its batch, and the clock of every range it leads.
pub struct NodeTimestamps {
    replicas: Arc<ReplicaDirectory>,
    peers: Arc<Peers>,
    tso: Arc<Tso>,
    batch: Mutex<Batch>,
    /// Held by the one fetch in progress; others wait for it and use its batch.
    fetching: tokio::sync::Mutex<()>,
    clocks: Mutex<HashMap<RangeId, Arc<RangeClock>>>,
}

impl NodeTimestamps {
    pub fn new(replicas: Arc<ReplicaDirectory>, peers: Arc<Peers>, tso: Arc<Tso>) -> Self {
        NodeTimestamps {
            replicas,
            peers,
            tso,
            batch: Mutex::default(),
            fetching: tokio::sync::Mutex::new(()),
            clocks: Mutex::default(),
        }
    }

    fn clock(&self, range_id: RangeId) -> Arc<RangeClock> {
        let mut clocks = self.clocks.lock().unwrap_or_else(|p| p.into_inner());
        if clocks.len() > self.replicas.count() + STALE_CLOCKS_BOUND {
            clocks.retain(|id, _| self.replicas.get(*id).is_some());
        }
        clocks.entry(range_id).or_default().clone()
    }

    /// The smallest unused timestamp above `floor` of a batch fetched after `since`, if the
    /// batch has one.
    fn take_above(&self, floor: Timestamp, since: Instant) -> Option<Timestamp> {
        let mut b = self.batch.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = b.fetched_at.is_some_and(|t| t > since);
        let ts = b.next.max(floor.saturating_add(1));
        if !fresh || ts >= b.end {
            return None;
        }
        b.next = ts + 1;
        Some(ts)
    }

    /// The newest oracle timestamp this node holds (0 before its first fetch).
    pub fn newest_known(&self) -> Timestamp {
        let b = self.batch.lock().unwrap_or_else(|p| p.into_inner());
        b.end.saturating_sub(1)
    }

    /// Fetches a new batch unless one was fetched since `since` (another caller's fetch,
    /// which began after the caller needed one, serves it too). Returns the batch's first
    /// timestamp: handed out after the call began.
    async fn refresh(&self, since: Instant) -> Result<Timestamp, ClientError> {
        let _fetching = self.fetching.lock().await;
        {
            let b = self.batch.lock().unwrap_or_else(|p| p.into_inner());
            if b.fetched_at.is_some_and(|at| at > since) {
                return Ok(b.end - TS_BATCH_SIZE);
            }
        }
        let requested_at = Instant::now();
        let first = self.fetch(TS_BATCH_SIZE).await?;
        let mut b = self.batch.lock().unwrap_or_else(|p| p.into_inner());
        *b = Batch {
            next: first,
            end: first + TS_BATCH_SIZE,
            fetched_at: Some(requested_at),
        };
        Ok(first)
    }

    /// `count` timestamps from the oracle: this node's own when it leads the meta range, else
    /// the meta-range leader's.
    async fn fetch(&self, count: u64) -> Result<Timestamp, ClientError> {
        if let Some(meta) = leading_meta(&self.replicas) {
            return self.tso.timestamps(&meta, count).await;
        }
        let mut target = self.peers.meta_leader_hint();
        let mut last = ClientError::Unavailable("the meta-range leader is not known yet".into());
        for _ in 0..TS_FETCH_ATTEMPTS {
            let Some(node) = target.take() else {
                break;
            };
            let mut txn = TxnClient::new(self.peers.channel(&node.addr)?);
            let mut req = tonic::Request::new(GetTimestampsRequest { count });
            req.set_timeout(Duration::from_millis(TS_FETCH_TIMEOUT_MS));
            match txn.get_timestamps(req).await {
                Ok(resp) if resp.get_ref().count == count => return Ok(resp.get_ref().first),
                Ok(resp) => {
                    return Err(ClientError::Internal(format!(
                        "the oracle at {} handed out {} timestamps for {count} asked",
                        node.addr,
                        resp.get_ref().count
                    )))
                }
                Err(status) => {
                    last = ClientError::from_status(&status);
                    if let ClientError::NotLeader { leader } = &last {
                        target = leader.clone();
                    }
                }
            }
        }
        Err(last)
    }

    /// The clock of `replica`'s range, seeded for the leadership and span it has now.
    async fn leading_clock(
        &self,
        replica: &Replica,
    ) -> Result<(Arc<RangeClock>, Epoch, LeaderId), ClientError> {
        let leader = replica.raft.as_leader().map_err(|f| not_leader(&f))?;
        let leader_id = leader.to_committed_leader_id();
        let generation = replica
            .shared
            .span()
            .map(|s| s.generation)
            .ok_or_else(|| ClientError::Unavailable("the range has no span yet".into()))?;
        let epoch = Epoch {
            term: leader.leader_id().term(),
            generation,
        };
        let clock = self.clock(replica.shared.range_id);
        if !clock.rules.lock().await.seeded_for(epoch) {
            // Fetched after this leadership began, so above every timestamp read or committed
            // under an earlier one.
            let fresh = self.refresh(Instant::now()).await?;
            clock.seed(epoch, fresh).await;
        }
        Ok((clock, epoch, leader_id))
    }

    /// Proposes the write of `keys` that `command` builds for a commit ts, as a single-range
    /// transaction on `replica`'s range, and waits at most `timeout_ms` for its answer.
    pub async fn propose(
        &self,
        replica: &Replica,
        keys: Vec<Vec<u8>>,
        command: impl Fn(Timestamp) -> Command,
        timeout_ms: u64,
    ) -> Result<CommandResponse, ClientError> {
        // The commit ts comes from a batch fetched after the write arrived: above every
        // timestamp handed out before, so a snapshot read at one of those never sees it.
        let needed_at = Instant::now();
        let (clock, epoch, leader_id) = self.leading_clock(replica).await?;
        for _ in 0..MAX_BATCHES_PER_WRITE {
            match clock
                .propose(
                    &replica.raft,
                    Proposal {
                        epoch,
                        leader_id,
                        keys: &keys,
                        timeout_ms,
                    },
                    |floor| self.take_above(floor, needed_at),
                    &command,
                )
                .await
            {
                Err(Proposed::NoTimestamp) => {
                    self.refresh(needed_at).await?;
                }
                Err(Proposed::Failed(e)) => return Err(e),
                Ok(resp) => return Ok(resp),
            }
        }
        Err(ClientError::Unavailable(format!(
            "no commit timestamp above the range's reads after {MAX_BATCHES_PER_WRITE} oracle batches; retry"
        )))
    }

    /// Checks a snapshot read's timestamp: refused when it is past the newest timestamp the
    /// oracle has handed out (a timestamp from the future would let later writes commit
    /// below a read already served, since new leaders seed from the oracle).
    pub async fn check_read_ts(&self, ts: Timestamp) -> Result<(), ClientError> {
        let known = self.newest_known();
        if ts <= known {
            return Ok(());
        }
        let ahead_ms = physical_ms(ts).saturating_sub(physical_ms(known));
        if known == 0 || ahead_ms <= MAX_READ_TS_AHEAD_MS {
            self.refresh(Instant::now()).await?;
            if ts <= self.newest_known() {
                return Ok(());
            }
        }
        Err(ClientError::InvalidArgument(format!(
            "read timestamp {ts} is ahead of the timestamp oracle; read at a timestamp the \
             oracle handed out (spheredb timestamp)"
        )))
    }

    /// Begins a read of `[start, end)` (empty `end`: unbounded) on `replica`'s range, whose
    /// barrier already confirmed this node leads it: at `at` for a snapshot read, else at the
    /// latest timestamp. Waits, at most `timeout_ms`, for the writes in flight at or below
    /// the read's timestamp, and returns the timestamp to read at.
    pub async fn begin_read(
        &self,
        replica: &Replica,
        start: &[u8],
        end: &[u8],
        at: Option<Timestamp>,
        timeout_ms: u64,
    ) -> Result<ReadTs, ClientError> {
        let (clock, _, _) = self.leading_clock(replica).await?;
        let (ts, mut blocking) = {
            let mut rules = clock.rules.lock().await;
            let ts = at.unwrap_or_else(|| rules.latest_read_ts());
            let blocking = rules.begin_read(start, end, ts);
            (ts, blocking)
        };
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
        while !blocking.is_empty() {
            let applied = clock.applied.notified();
            tokio::pin!(applied);
            applied.as_mut().enable();
            {
                let rules = clock.rules.lock().await;
                if !rules.any_in_flight(&blocking) {
                    break;
                }
                blocking.retain(|w| rules.any_in_flight(std::slice::from_ref(w)));
            }
            if tokio::time::timeout_at(deadline, applied).await.is_err() {
                return Err(ClientError::Unavailable(format!(
                    "writes in flight on the keys read did not apply within {timeout_ms} ms"
                )));
            }
        }
        Ok(ReadTs(ts))
    }
}

/// The committed leader id a proposal is conditional on.
pub type LeaderId = openraft::alias::CommittedLeaderIdOf<TypeConfig>;

/// A write's keys in flight, until [`InFlightWrite::end`].
struct InFlightWrite {
    clock: Arc<RangeClock>,
    keys: Vec<Vec<u8>>,
    commit_ts: Timestamp,
}

impl InFlightWrite {
    async fn end(self) {
        self.clock
            .rules
            .lock()
            .await
            .end_write(&self.keys, self.commit_ts);
        self.clock.applied.notify_waiters();
    }
}
