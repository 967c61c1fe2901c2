//! Timestamps on a node: batches of oracle timestamps, and the commit-ts rules
//! (`range::commit_ts`) of every range this node leads, each behind its own lock.
//!
//! Every commit ts and every seed is a timestamp the oracle handed out to this node, so any
//! timestamp the oracle hands out later is above it: a write acknowledged before a client asks
//! the oracle for a read ts is visible at that ts, and a new leader seeded from a fresh
//! timestamp starts above everything its predecessors fixed or read.
//!
//! A write's commit ts comes from a batch whose fetch began at most the node's staleness
//! bound (`--commit-ts-staleness-ms`) before the write arrived, and lies above the timestamp
//! its client sent as the newest it has seen (`causal_ts`). So it is above every timestamp the
//! oracle handed out more than that bound before the write arrived, and above every one in the
//! client's own past: a snapshot read at such a timestamp never sees the write. One fetch
//! (one `GetTimestamps` call of [`TS_BATCH_SIZE`]) serves every write of that window, so under
//! load the oracle costs a round trip per window, not per wave of writes; a batch half that
//! old is refreshed in the background, so writes rarely wait for one. With a bound of 0 every
//! write waits for a fetch that began after it arrived: strict real-time order across ranges,
//! for one oracle round trip per wave of writes. Fetches overlap (at most
//! [`MAX_FETCHES_IN_FLIGHT`]): a write that arrives while a fetch is under way starts the next
//! one at once rather than waiting for the first to end, so it waits for about one round trip,
//! not two.
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
pub const TS_FETCH_TIMEOUT_MS: u64 = 1_500;
/// Nodes asked per fetch (the known meta-range leader first, `NotLeader` hints next).
pub const TS_FETCH_ATTEMPTS: usize = 6;
/// Fetches under way at once. A write that finds them all begun before it arrived waits for
/// the newest to end and then starts its own.
pub const MAX_FETCHES_IN_FLIGHT: usize = 2;
/// Batches a write may try before it gives up: one fetch each, needed again only when
/// concurrent writes used a batch up or reads pushed the range's floor past it.
pub const MAX_BATCHES_PER_WRITE: usize = 3;
/// A read timestamp whose physical part is this far past the wall clock is refused without
/// asking the oracle. The oracle runs ahead of the clock only by the reserve windows of leader
/// changes in a row (3 s each by default), never by an hour.
pub const MAX_READ_TS_AHEAD_OF_CLOCK_MS: u64 = 3_600_000;
/// Clocks of ranges no longer here are dropped once this many more are kept than the node
/// has replicas.
const STALE_CLOCKS_BOUND: usize = 64;

/// How a fetch of a batch ended (`None` while it is under way), for every caller waiting on
/// it.
type FetchOutcome = tokio::sync::watch::Receiver<Option<Result<(), ClientError>>>;

/// A fetch of a batch under way.
#[derive(Debug)]
struct Fetch {
    /// Before the request was sent: every timestamp it brings was handed out after this.
    began: Instant,
    outcome: FetchOutcome,
}

/// The node's current batch of oracle timestamps.
#[derive(Debug, Default)]
struct Batch {
    /// Smallest unused timestamp.
    next: Timestamp,
    /// First timestamp past the batch.
    end: Timestamp,
    fetched_at: Option<Instant>,
    /// Counts the batches fetched, so a caller that found one used up fetches another
    /// instead of waiting for the same one again.
    seq: u64,
}

/// One range leader's rules, and the wake-up of reads waiting for writes in flight.
#[derive(Default)]
pub struct RangeClock {
    rules: tokio::sync::Mutex<CommitTsRules>,
    /// Writes waiting to be proposed. Whoever holds `rules` next proposes every one of them
    /// in a row, so that they reach Raft together (openraft merges consecutive proposals
    /// into one append) instead of one per hand-over of the lock. Each entry belongs to a
    /// write's task waiting for the lock, so it holds no more than those tasks do.
    queue: Mutex<Vec<QueuedWrite>>,
    applied: tokio::sync::Notify,
}

/// A write waiting in [`RangeClock::queue`].
struct QueuedWrite {
    raft: RaftHandle,
    proposal: Proposal,
    take_above: Box<dyn FnOnce(Timestamp) -> Result<Timestamp, u64> + Send>,
    command: Box<dyn FnOnce(Timestamp) -> Command + Send>,
    responder: openraft::alias::WriteResponderOf<TypeConfig>,
    /// The commit ts the write was proposed at, or why it was not.
    proposed: tokio::sync::oneshot::Sender<Result<Timestamp, Proposed>>,
}

/// What a write proposes under: the epoch and leadership its range's rules were seeded
/// for, its keys, and how long its caller waits for the answer.
#[derive(Debug, Clone)]
pub struct Proposal {
    pub epoch: Epoch,
    pub leader_id: LeaderId,
    pub keys: Vec<Vec<u8>>,
    pub timeout_ms: u64,
    /// A transaction's commit at this timestamp, fixed by its client, rather than a write
    /// whose commit ts the leader fixes (see [`CommitTsRules::note_commit`]).
    pub txn_commit_ts: Option<Timestamp>,
}

/// Why a write was not proposed or not answered.
#[derive(Debug)]
pub enum Proposed {
    /// The timestamp source had none above the range's floor in batch `batch`: fetch
    /// another and retry.
    NoTimestamp {
        batch: u64,
    },
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

    /// Proposes a write and waits at most `p.timeout_ms` for its answer. The work runs in a
    /// task of its own (see [`RangeClock::propose_and_wait`]), so a caller that goes away (a
    /// cancelled request) cannot leave the write's keys in flight for good.
    pub async fn propose(
        self: &Arc<Self>,
        raft: RaftHandle,
        p: Proposal,
        take_above: impl FnOnce(Timestamp) -> Result<Timestamp, u64> + Send + 'static,
        command: impl FnOnce(Timestamp) -> Command + Send + 'static,
    ) -> Result<CommandResponse, Proposed> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let clock = self.clone();
        let timeout_ms = p.timeout_ms;
        tokio::spawn(async move {
            let result = clock.propose_and_wait(raft, p, take_above, command).await;
            // The caller may have stopped waiting; the keys are out of flight either way.
            let _ = tx.send(result);
        });
        match tokio::time::timeout(Duration::from_millis(timeout_ms), rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Proposed::Failed(ClientError::OutcomeUnknown(
                "the write's task ended without an answer; it may or may not have applied".into(),
            ))),
            Err(_) => Err(Proposed::Failed(ClientError::OutcomeUnknown(format!(
                "write not committed within {timeout_ms} ms; it may still apply"
            )))),
        }
    }

    /// Fixes the write's commit ts (from `take_above`, given the floor) and proposes the
    /// entry `command` builds for it, both while the rules are held, so entries reach the log
    /// in commit-ts order (see [`RangeClock::propose_queued`]). Then waits for the answer,
    /// however long it takes: openraft answers when the entry applies, or when it is
    /// truncated or purged and can no longer apply. The keys stay in flight until then,
    /// since a read must not skip a write that may still commit below its ts.
    async fn propose_and_wait(
        self: Arc<Self>,
        raft: RaftHandle,
        p: Proposal,
        take_above: impl FnOnce(Timestamp) -> Result<Timestamp, u64> + Send + 'static,
        command: impl FnOnce(Timestamp) -> Command + Send + 'static,
    ) -> Result<CommandResponse, Proposed> {
        let (responder, answer) = ProgressResponder::<TypeConfig, _>::complete_only();
        let (proposed, mut proposed_rx) = tokio::sync::oneshot::channel();
        let keys = p.keys.clone();
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(QueuedWrite {
                raft,
                proposal: p,
                take_above: Box::new(take_above),
                command: Box::new(command),
                responder,
                proposed,
            });
        // Whoever holds the rules proposes this write along with the rest of the queue;
        // when nobody has by the time the rules are free, this task does.
        let proposed = tokio::select! {
            biased;
            proposed = &mut proposed_rx => proposed,
            mut rules = self.rules.lock() => {
                self.propose_queued(&mut rules).await;
                drop(rules);
                proposed_rx.await
            }
        };
        let commit_ts = match proposed {
            Ok(Ok(commit_ts)) => commit_ts,
            Ok(Err(not_proposed)) => return Err(not_proposed),
            Err(_) => {
                return Err(Proposed::Failed(ClientError::Internal(
                    "the write left the proposal queue unanswered".into(),
                )))
            }
        };
        if let Some(delay_ms) = answer_delay_ms() {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        let result = match answer.await {
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(e)) => Err(Proposed::Failed(write_error(
                openraft::errors::RaftError::APIError(e),
            ))),
            Err(_) => Err(Proposed::Failed(ClientError::OutcomeUnknown(
                "raft dropped the write's answer; it may or may not have applied".into(),
            ))),
        };
        self.rules.lock().await.end_write(&keys, commit_ts);
        self.applied.notify_waiters();
        result
    }

    /// Proposes every queued write, in queue order, while `rules` is held: each gets its
    /// commit ts and goes to Raft before the next gets one, so the log holds them in
    /// commit-ts order. A write that gets no timestamp or that Raft refuses is answered so
    /// and leaves nothing in flight.
    async fn propose_queued(&self, rules: &mut CommitTsRules) {
        let queued = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()));
        for q in queued {
            let p = &q.proposal;
            if !rules.seeded_for(p.epoch) {
                let _ = q
                    .proposed
                    .send(Err(Proposed::Failed(ClientError::Unavailable(
                        "the range's leadership changed; retry".into(),
                    ))));
                continue;
            }
            let commit_ts = match p.txn_commit_ts {
                Some(ts) => {
                    rules.note_commit(ts);
                    ts
                }
                None => match (q.take_above)(rules.commit_floor()) {
                    Ok(ts) => {
                        rules.begin_write(&p.keys, ts);
                        ts
                    }
                    Err(batch) => {
                        let _ = q.proposed.send(Err(Proposed::NoTimestamp { batch }));
                        continue;
                    }
                },
            };
            // A send that does not complete leaves nothing queued (the channel's send is
            // cancel-safe), and this task is not cancelled but by the runtime's shutdown.
            let submitted = q
                .raft
                .write((q.command)(commit_ts))
                .with_leader(p.leader_id)
                .responder(q.responder)
                .await;
            let answer = match submitted {
                Ok(()) => Ok(commit_ts),
                Err(fatal) => {
                    rules.end_write(&p.keys, commit_ts);
                    self.applied.notify_waiters();
                    Err(Proposed::Failed(ClientError::Unavailable(format!(
                        "raft stopped: {fatal}"
                    ))))
                }
            };
            // The writer's task ends the flight when the answer comes; it is not cancelled
            // but by the runtime's shutdown, when nothing is waited for any more.
            let _ = q.proposed.send(answer);
        }
    }
}

/// The failpoint `kv-write-answer-delay=return(MS)`: a proposed write waits `MS` longer for
/// its answer, as behind a slow commit, so that tests can give up on it while it is in
/// flight.
fn answer_delay_ms() -> Option<u64> {
    fail::fail_point!("kv-write-answer-delay", |arg: Option<String>| {
        arg.as_deref().and_then(|a| a.parse().ok())
    });
    None
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
    /// The fetches under way, oldest first.
    fetches: Mutex<Vec<Fetch>>,
    clocks: Mutex<HashMap<RangeId, Arc<RangeClock>>>,
    /// How long before a write arrived the fetch of the batch it takes its commit ts from may
    /// have begun.
    staleness: Duration,
}

impl NodeTimestamps {
    pub fn new(
        replicas: Arc<ReplicaDirectory>,
        peers: Arc<Peers>,
        tso: Arc<Tso>,
        staleness: Duration,
    ) -> Self {
        NodeTimestamps {
            replicas,
            peers,
            tso,
            staleness,
            batch: Mutex::default(),
            fetches: Mutex::default(),
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
    /// batch has one; else the sequence number of the batch that had none.
    fn take_above(&self, floor: Timestamp, since: Instant) -> Result<Timestamp, u64> {
        let mut b = self.batch.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = b.fetched_at.is_some_and(|t| t > since);
        let ts = b.next.max(floor.saturating_add(1));
        if !fresh || ts >= b.end {
            return Err(b.seq);
        }
        b.next = ts + 1;
        Ok(ts)
    }

    /// The newest oracle timestamp this node holds (0 before its first fetch).
    pub fn newest_known(&self) -> Timestamp {
        let b = self.batch.lock().unwrap_or_else(|p| p.into_inner());
        b.end.saturating_sub(1)
    }

    /// Waits for a batch fetched after `since` that is newer than batch `used_up` (a fetch
    /// another caller began after `since` serves this one too), fetching one unless one is
    /// under way. Returns the batch's first timestamp: handed out after `since`.
    async fn refresh(
        self: &Arc<Self>,
        since: Instant,
        used_up: Option<u64>,
    ) -> Result<Timestamp, ClientError> {
        // Each turn either returns or waits for a fetch to end. A fetch that began after
        // `since` serves this call, and its failure is this call's; the turns are bounded by
        // the fetches under way when the call began, plus the one it starts or joins.
        for _ in 0..=MAX_FETCHES_IN_FLIGHT + 1 {
            {
                let b = self.batch.lock().unwrap_or_else(|p| p.into_inner());
                let newer = used_up.is_none_or(|used| b.seq > used);
                if b.fetched_at.is_some_and(|at| at > since) && newer {
                    return Ok(b.end - TS_BATCH_SIZE);
                }
            }
            let (outcome, serves_this_call) = {
                let mut fetches = self.fetches.lock().unwrap_or_else(|p| p.into_inner());
                match fetches.iter().rev().find(|f| f.began > since) {
                    Some(f) => (f.outcome.clone(), true),
                    None if fetches.len() < MAX_FETCHES_IN_FLIGHT => {
                        (self.start_fetch(&mut fetches), true)
                    }
                    // All under way began too early; the newest ends first, most likely.
                    None => match fetches.last() {
                        Some(f) => (f.outcome.clone(), false),
                        None => {
                            return Err(ClientError::Internal(
                                "no fetch under way and none allowed".into(),
                            ))
                        }
                    },
                }
            };
            let ended = wait_for_fetch(outcome).await;
            if serves_this_call {
                ended?;
            }
        }
        Err(ClientError::Unavailable(
            "no timestamp batch fetched after the write arrived; retry".into(),
        ))
    }

    /// Starts fetching a batch in a task of its own, so that it ends (and leaves the list of
    /// fetches under way) even when every caller waiting for it has gone, and adds it to
    /// `fetches`, the locked list: the task removes it under that lock, so only after this.
    fn start_fetch(self: &Arc<Self>, fetches: &mut Vec<Fetch>) -> FetchOutcome {
        let began = Instant::now();
        let (done, outcome) = tokio::sync::watch::channel(None);
        let listed = ListedFetch {
            timestamps: self.clone(),
            outcome: outcome.clone(),
        };
        tokio::spawn(async move {
            let me = &listed.timestamps;
            let result = match me.fetch(TS_BATCH_SIZE).await {
                Ok(first) => me.install(first, began),
                Err(e) => Err(e),
            };
            drop(listed);
            // Nobody may be waiting any more; the batch is installed either way.
            let _ = done.send(Some(result));
        });
        fetches.push(Fetch {
            began,
            outcome: outcome.clone(),
        });
        outcome
    }

    /// Takes the batch starting at `first`, fetched by a call that began at `began`, unless
    /// the node's batch holds higher timestamps. Either way the node's batch is fresh as of
    /// the later of the two fetches' beginnings: the oracle hands out ever higher
    /// timestamps, so the higher batch was handed out after the lower one, which was handed
    /// out after its own fetch began.
    fn install(&self, first: Timestamp, began: Instant) -> Result<(), ClientError> {
        let end = first.checked_add(TS_BATCH_SIZE).ok_or_else(|| {
            ClientError::Internal(format!(
                "the oracle handed out a batch at {first}, past the end of time"
            ))
        })?;
        let mut b = self.batch.lock().unwrap_or_else(|p| p.into_inner());
        let fresh_as_of = b.fetched_at.map_or(began, |at| at.max(began));
        if first >= b.end {
            *b = Batch {
                next: first,
                end,
                fetched_at: Some(fresh_as_of),
                seq: b.seq + 1,
            };
        } else {
            b.fetched_at = Some(fresh_as_of);
        }
        Ok(())
    }

    /// `count` timestamps from the oracle: this node's own when it leads the meta range, else
    /// the meta-range leader's.
    async fn fetch(&self, count: u64) -> Result<Timestamp, ClientError> {
        if let Some(meta) = leading_meta(&self.replicas) {
            return self.tso.timestamps(&meta, count).await;
        }
        // The meta-range leader as this node knows it first, then every node it knows (a node
        // without a meta replica may not know the leader yet); a `NotLeader` hint goes first.
        let mut candidates: Vec<String> = Vec::new();
        if let Some(leader) = self.peers.meta_leader_hint() {
            candidates.push(leader.addr);
        }
        let mut others: Vec<(u64, String)> = self.peers.known_nodes().into_iter().collect();
        others.sort();
        candidates.extend(others.into_iter().map(|(_, addr)| addr));
        let mut last = ClientError::Unavailable("no node is known to ask for timestamps".into());
        let mut asked: Vec<String> = Vec::new();
        while asked.len() < TS_FETCH_ATTEMPTS {
            let Some(addr) = candidates.iter().find(|a| !asked.contains(a)).cloned() else {
                break;
            };
            asked.push(addr.clone());
            let mut txn = TxnClient::new(self.peers.channel(&addr)?);
            let mut req = tonic::Request::new(GetTimestampsRequest { count });
            req.set_timeout(Duration::from_millis(TS_FETCH_TIMEOUT_MS));
            match txn.get_timestamps(req).await {
                Ok(resp) if resp.get_ref().count == count => return Ok(resp.get_ref().first),
                Ok(resp) => {
                    return Err(ClientError::Internal(format!(
                        "the oracle at {addr} handed out {} timestamps for {count} asked",
                        resp.get_ref().count
                    )))
                }
                Err(status) => {
                    last = ClientError::from_status(&status);
                    if let ClientError::NotLeader {
                        leader: Some(leader),
                    } = &last
                    {
                        candidates.insert(0, leader.addr.clone());
                    }
                }
            }
        }
        Err(last)
    }

    /// The clock of `replica`'s range, seeded for the leadership and span it has now.
    async fn leading_clock(
        self: &Arc<Self>,
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
            let fresh = self.refresh(Instant::now(), None).await?;
            clock.seed(epoch, fresh).await;
        }
        Ok((clock, epoch, leader_id))
    }

    /// Proposes the write of `keys` that `command` builds for a commit ts above `causal_ts`
    /// (the newest timestamp the write's client has seen; 0 for none), as a single-range
    /// transaction on `replica`'s range, and waits at most `timeout_ms` for its answer.
    pub async fn propose(
        self: &Arc<Self>,
        replica: &Replica,
        keys: Vec<Vec<u8>>,
        command: Arc<dyn Fn(Timestamp) -> Command + Send + Sync>,
        causal_ts: Timestamp,
        timeout_ms: u64,
    ) -> Result<CommandResponse, ClientError> {
        let arrived = Instant::now();
        let (clock, epoch, leader_id) = self.leading_clock(replica).await?;
        // The commit ts comes from a batch fetched at most the staleness bound before the
        // write arrived: above every timestamp handed out before that, so a snapshot read at
        // one of those never sees it. A batch that had none high enough is followed by one
        // fetched after the write arrived, above everything handed out before.
        let mut fresh_since = arrived.checked_sub(self.staleness).unwrap_or(arrived);
        if causal_ts > self.newest_known() {
            // The client has seen a timestamp newer than this node's batch: a batch fetched
            // now lies above it, unless it is one the oracle has not handed out, which would
            // push commits above timestamps still to come, so that reads at those miss them.
            fresh_since = arrived;
            self.refresh(arrived, None).await?;
            if causal_ts > self.newest_known() {
                return Err(ClientError::InvalidArgument(format!(
                    "the request's causal timestamp {causal_ts} is ahead of the timestamp \
                     oracle; send only timestamps the oracle handed out"
                )));
            }
        } else {
            self.refresh_in_background(arrived);
        }
        for _ in 0..MAX_BATCHES_PER_WRITE {
            let me = self.clone();
            let since = fresh_since;
            let take = move |floor: Timestamp| me.take_above(floor.max(causal_ts), since);
            let command = command.clone();
            let proposal = Proposal {
                epoch,
                leader_id,
                keys: keys.clone(),
                timeout_ms,
                txn_commit_ts: None,
            };
            match clock
                .propose(replica.raft.clone(), proposal, take, move |ts| command(ts))
                .await
            {
                Err(Proposed::NoTimestamp { batch }) => {
                    fresh_since = arrived;
                    self.refresh(arrived, Some(batch)).await?;
                }
                Err(Proposed::Failed(e)) => return Err(e),
                Ok(resp) => return Ok(resp),
            }
        }
        Err(ClientError::Unavailable(format!(
            "no commit timestamp above the range's reads after {MAX_BATCHES_PER_WRITE} oracle batches; retry"
        )))
    }

    /// A timestamp the oracle handed out after this call began, taken from the node's batch
    /// (fetching a new one): above the commit ts of every write this node proposed before,
    /// and above every timestamp the oracle handed out before the call. A change feed resolves
    /// at it.
    pub async fn fresh_ts(self: &Arc<Self>) -> Result<Timestamp, ClientError> {
        let began = Instant::now();
        let mut used_up = None;
        for _ in 0..MAX_BATCHES_PER_WRITE {
            self.refresh(began, used_up).await?;
            match self.take_above(0, began) {
                Ok(ts) => return Ok(ts),
                Err(batch) => used_up = Some(batch),
            }
        }
        Err(ClientError::Unavailable(format!(
            "no fresh timestamp after {MAX_BATCHES_PER_WRITE} oracle batches; retry"
        )))
    }

    /// Raises the read floor of `replica`'s range to a transaction's `start_ts` before its
    /// locks are proposed there (see [`CommitTsRules::note_lock`]).
    pub async fn note_lock(
        self: &Arc<Self>,
        replica: &Replica,
        start_ts: Timestamp,
    ) -> Result<(), ClientError> {
        let (clock, _, _) = self.leading_clock(replica).await?;
        clock.rules.lock().await.note_lock(start_ts);
        Ok(())
    }

    /// Proposes the commit of a transaction's keys on `replica`'s range at `commit_ts` (which
    /// its client took from the oracle; checked by the caller) in the range's commit order,
    /// and waits at most `timeout_ms` for its answer.
    pub async fn propose_txn_commit(
        self: &Arc<Self>,
        replica: &Replica,
        commit_ts: Timestamp,
        command: Command,
        timeout_ms: u64,
    ) -> Result<CommandResponse, ClientError> {
        let (clock, epoch, leader_id) = self.leading_clock(replica).await?;
        let proposal = Proposal {
            epoch,
            leader_id,
            keys: Vec::new(),
            timeout_ms,
            txn_commit_ts: Some(commit_ts),
        };
        match clock
            .propose(
                replica.raft.clone(),
                proposal,
                move |_| Ok(commit_ts),
                move |_| command,
            )
            .await
        {
            Ok(resp) => Ok(resp),
            Err(Proposed::Failed(e)) => Err(e),
            Err(Proposed::NoTimestamp { .. }) => Err(ClientError::Internal(
                "a transaction commit asked for a commit timestamp".into(),
            )),
        }
    }

    /// Starts fetching a batch, without waiting for it, when the node's batch is half as old
    /// as writes may take, so that under steady writes the batch is renewed before writes
    /// would have to wait for it.
    fn refresh_in_background(self: &Arc<Self>, now: Instant) {
        if self.staleness.is_zero() {
            return;
        }
        let due = {
            let b = self.batch.lock().unwrap_or_else(|p| p.into_inner());
            b.fetched_at
                .is_some_and(|at| now.saturating_duration_since(at) >= self.staleness / 2)
        };
        if due {
            let mut fetches = self.fetches.lock().unwrap_or_else(|p| p.into_inner());
            if fetches.is_empty() {
                self.start_fetch(&mut fetches);
            }
        }
    }

    /// Checks a snapshot read's timestamp: refused when it is past the newest timestamp the
    /// oracle has handed out (a timestamp from the future would let later writes commit
    /// below a read already served, since new leaders seed from the oracle).
    pub async fn check_read_ts(self: &Arc<Self>, ts: Timestamp) -> Result<(), ClientError> {
        if ts <= self.newest_known() {
            return Ok(());
        }
        let wall_ms = crate::meta::tso::wall_clock_ms();
        if physical_ms(ts) > wall_ms.saturating_add(MAX_READ_TS_AHEAD_OF_CLOCK_MS) {
            // Far past anything an oracle leader can reach: refused without a fetch, so a
            // flood of such reads costs the oracle nothing.
            return Err(ClientError::InvalidArgument(format!(
                "read timestamp {ts} is more than {MAX_READ_TS_AHEAD_OF_CLOCK_MS} ms past the \
                 clock; read at a timestamp the oracle handed out (spheredb timestamp)"
            )));
        }
        // The oracle has moved on since this node last heard from it (an idle node's newest
        // timestamp may be hours old), and its clock need not follow the wall clock: each new
        // oracle leader starts at the limit its predecessors reserved, a window ahead of
        // their clocks. So only the oracle can tell: a batch fetched after the read arrived
        // lies above every timestamp handed out before it. Concurrent reads (and writes)
        // share one fetch.
        let arrived = Instant::now();
        self.refresh(arrived, None).await?;
        let known = self.newest_known();
        if ts <= known {
            return Ok(());
        }
        Err(ClientError::InvalidArgument(format!(
            "read timestamp {ts} is ahead of the timestamp oracle, which had handed out at \
             most {known} when the read arrived; read at a timestamp the oracle handed out \
             (spheredb timestamp)"
        )))
    }

    /// Begins a read of `[start, end)` (empty `end`: unbounded) on `replica`'s range, which this
    /// node leads: at `at` for a snapshot read, else at the latest timestamp. Raises the
    /// range's `max_read_ts`, waits (at most `timeout_ms`) for the writes in flight at or below
    /// the read's timestamp, and returns the timestamp to read at. The caller confirms its
    /// leadership (ReadIndex) afterwards and reads right after that, so nothing can change
    /// the replica's data between the confirmation and the read but its own applies.
    pub async fn begin_read(
        self: &Arc<Self>,
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

/// A fetch's place in the list of fetches under way, given up when its task ends, however it
/// ends.
struct ListedFetch {
    timestamps: Arc<NodeTimestamps>,
    outcome: FetchOutcome,
}

impl Drop for ListedFetch {
    fn drop(&mut self) {
        self.timestamps
            .fetches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|f| !f.outcome.same_channel(&self.outcome));
    }
}

/// The outcome of a fetch, once it ended.
async fn wait_for_fetch(mut outcome: FetchOutcome) -> Result<(), ClientError> {
    match outcome.wait_for(Option::is_some).await {
        Ok(ended) => ended.clone().unwrap_or(Ok(())),
        Err(_) => Err(ClientError::Internal(
            "the timestamp fetch task ended without an answer".into(),
        )),
    }
}

/// The committed leader id a proposal is conditional on.
pub type LeaderId = openraft::alias::CommittedLeaderIdOf<TypeConfig>;
