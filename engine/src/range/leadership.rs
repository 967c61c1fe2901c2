//! Batched leadership checks (TiKV's `CheckLeader`). A change feed's round must know that its
//! replica still leads the range before it resolves a timestamp, or a deposed leader could
//! publish one that a new leader then commits under. A ReadIndex per range and round would
//! send a heartbeat round per range and keep every followed range awake; instead the rounds
//! waiting for a check are gathered, and each peer node is asked once for all of them. A peer
//! reads its replicas' votes from their Raft cores without waking them, so followed ranges
//! quiesce like any idle range and keep resolving while quiesced.
//!
//! What a confirmation proves: the leader's committed vote for itself in the round's term,
//! every entry of its log committed and applied here (its term's first entry included, so all
//! an earlier leader committed), and a majority of voters (the leader included) that held the
//! leader's vote after the round began. Votes only grow, so no leader of a later term can have
//! been elected before those answers. A round that gets no confirmation falls back to a
//! ReadIndex.
//!
//! The decisions are pure functions ([`leader_ready`], [`quorum_confirms`]); the batcher only
//! carries the claims.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::vote::RaftLeaderId;
use spheredb_raft::network::{LeaderClaim, PeerChannels, Replica, MAX_LEADER_CLAIMS_PER_CHECK};
use spheredb_raft::types::{NodeId, RangeId, ReplicaId, ReplicaNode, Vote};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;

/// Rounds waiting for a check on a node; a round that finds the queue full falls back to a
/// ReadIndex.
pub const MAX_PENDING_LEADER_CHECKS: usize = 10_000;
/// Batches whose answers are awaited at once: a slow peer holds up its batch, not later ones.
pub const MAX_LEADER_CHECK_BATCHES_IN_FLIGHT: usize = 4;
/// Time allowed for a peer node to answer one batch.
pub const CHECK_LEADER_TIMEOUT_MS: u64 = 1_000;
/// Longest a round waits for its check, queue and leader's own state included.
pub const CONFIRM_TIMEOUT_MS: u64 = 2_000;

/// What a leader's Raft core holds, read in one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderState {
    pub vote: Vote,
    pub last_log_index: Option<u64>,
    pub committed_index: Option<u64>,
}

/// Whether leader `me` may stand on a quorum's confirmation in `term` instead of a ReadIndex:
/// its vote is committed, for itself, in `term`, and every entry of its log is committed (its
/// term's first entry included) and applied (`applied_index`).
pub fn leader_ready(
    state: &LeaderState,
    me: ReplicaId,
    term: u64,
    applied_index: Option<u64>,
) -> bool {
    let leader = state.vote.leader_id();
    state.vote.is_committed()
        && leader.term() == term
        && *leader.node_id() == me
        && state.last_log_index.is_some()
        && state.committed_index == state.last_log_index
        && applied_index >= state.committed_index
}

/// Whether `leader` and the voters in `confirmed` make a majority of `voters`.
pub fn quorum_confirms(
    voters: &BTreeSet<ReplicaId>,
    leader: ReplicaId,
    confirmed: &BTreeSet<ReplicaId>,
) -> bool {
    let acks = voters
        .iter()
        .filter(|v| **v == leader || confirmed.contains(v))
        .count();
    acks * 2 > voters.len()
}

/// One round waiting for its check.
struct Pending {
    range_id: RangeId,
    leader: ReplicaId,
    voters: BTreeSet<ReplicaId>,
    /// The other voters and their nodes.
    peers: Vec<(ReplicaId, ReplicaNode)>,
    vote: Vote,
    done: oneshot::Sender<bool>,
}

/// A node's leadership checks, batched per peer node.
pub struct LeaderChecks {
    pending: mpsc::Sender<Pending>,
}

impl LeaderChecks {
    /// Starts the batcher, which asks peers through `peers`; it stops when this is dropped.
    pub fn start(peers: PeerChannels) -> LeaderChecks {
        let (pending, queue) = mpsc::channel(MAX_PENDING_LEADER_CHECKS);
        tokio::spawn(batch_loop(peers, queue));
        LeaderChecks { pending }
    }

    /// Whether `replica` leads its range in `term` with everything committed applied, as
    /// confirmed by a quorum of its voters after this call began, within
    /// [`CONFIRM_TIMEOUT_MS`]. `false` proves nothing either way: the caller confirms with a
    /// ReadIndex instead.
    pub async fn confirm(&self, replica: &Replica, term: u64) -> bool {
        let timeout = Duration::from_millis(CONFIRM_TIMEOUT_MS);
        tokio::time::timeout(timeout, self.try_confirm(replica, term))
            .await
            .unwrap_or(false)
    }

    async fn try_confirm(&self, replica: &Replica, term: u64) -> bool {
        // A Raft instance's own replica id never changes.
        let me = replica.raft.metrics().borrow_watched().id;
        // Vote, log and membership from the core in one step (metrics lag it).
        let read = replica
            .raft
            .with_raft_state(|s| {
                let membership = s.membership_state.effective().membership();
                let voters: BTreeSet<ReplicaId> = membership.voter_ids().collect();
                let nodes: Vec<(ReplicaId, ReplicaNode)> = voters
                    .iter()
                    .filter_map(|id| membership.get_node(id).map(|n| (*id, n.clone())))
                    .collect();
                let state = LeaderState {
                    vote: *s.vote_ref(),
                    last_log_index: s.log_ids.last().map(|l| l.index),
                    committed_index: s.local_committed().map(|l| l.index),
                };
                let uniform = membership.get_joint_config().len() == 1;
                (state, uniform, voters, nodes)
            })
            .await;
        let Ok((state, uniform, voters, nodes)) = read else {
            return false;
        };
        if !uniform || !leader_ready(&state, me, term, replica.shared.applied_index()) {
            return false;
        }
        if quorum_confirms(&voters, me, &BTreeSet::new()) {
            // The only voter: nobody else can lead.
            return true;
        }
        let (done, answer) = oneshot::channel();
        let pending = Pending {
            range_id: replica.shared.range_id,
            leader: me,
            voters,
            peers: nodes.into_iter().filter(|(id, _)| *id != me).collect(),
            vote: state.vote,
            done,
        };
        if self.pending.try_send(pending).is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }
}

async fn batch_loop(peers: PeerChannels, mut queue: mpsc::Receiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(MAX_LEADER_CHECK_BATCHES_IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        // Whatever queued while the previous batches were out goes in this one.
        let mut batch = vec![first];
        while batch.len() < MAX_LEADER_CLAIMS_PER_CHECK {
            match queue.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let peers = peers.clone();
        tokio::spawn(async move {
            check_batch(&peers, batch).await;
            drop(permit);
        });
    }
}

/// Sends one message per peer node for `batch` and answers each round as soon as its quorum
/// is in (a slow or unreachable peer delays only the rounds that need it); the batch ends
/// once every round is answered.
async fn check_batch(peers: &PeerChannels, batch: Vec<Pending>) {
    // Per node: its address, the claims, and the round each claim is for.
    let mut by_node: HashMap<NodeId, (String, Vec<LeaderClaim>, Vec<usize>)> = HashMap::new();
    for (round, p) in batch.iter().enumerate() {
        for (replica_id, node) in &p.peers {
            let (_, claims, rounds) = by_node
                .entry(node.node_id)
                .or_insert_with(|| (node.addr.clone(), Vec::new(), Vec::new()));
            claims.push(LeaderClaim {
                range_id: p.range_id,
                replica_id: *replica_id,
                vote: p.vote,
            });
            rounds.push(round);
        }
    }
    let timeout = Duration::from_millis(CHECK_LEADER_TIMEOUT_MS);
    let mut answers = JoinSet::new();
    for (node_id, (addr, claims, rounds)) in by_node {
        let peers = peers.clone();
        answers.spawn(async move {
            let answer = peers.check_leader(node_id, &addr, &claims, timeout).await;
            (node_id, claims, rounds, answer)
        });
    }
    let mut waiting: Vec<Option<(Pending, BTreeSet<ReplicaId>)>> = batch
        .into_iter()
        .map(|p| Some((p, BTreeSet::new())))
        .collect();
    let mut unanswered = waiting.len();
    while unanswered > 0 {
        let Some(joined) = answers.join_next().await else {
            break;
        };
        let (node_id, claims, rounds, answer) = match joined {
            Ok(answered) => answered,
            Err(e) => {
                tracing::warn!("a leadership check task failed: {e}");
                continue;
            }
        };
        let confirmed = match answer {
            Ok(confirmed) => confirmed,
            Err(e) => {
                tracing::debug!(node_id, "leadership check unanswered: {e}");
                continue;
            }
        };
        for index in confirmed {
            // An index the node was never sent is ignored, as is a claim already settled.
            let (Some(claim), Some(&round)) = (claims.get(index), rounds.get(index)) else {
                continue;
            };
            let Some(Some((p, acks))) = waiting.get_mut(round) else {
                continue;
            };
            acks.insert(claim.replica_id);
            if quorum_confirms(&p.voters, p.leader, acks) {
                if let Some((p, _)) = waiting[round].take() {
                    let _ = p.done.send(true);
                }
                unanswered -= 1;
            }
        }
    }
    // Dropping the rest answers them `false`, and dropping `answers` stops the stragglers.
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vote(term: u64, leader: ReplicaId, committed: bool) -> Vote {
        if committed {
            Vote::new_committed(term, leader)
        } else {
            Vote::new(term, leader)
        }
    }

    fn state(vote: Vote, last: Option<u64>, committed: Option<u64>) -> LeaderState {
        LeaderState {
            vote,
            last_log_index: last,
            committed_index: committed,
        }
    }

    #[test]
    fn a_leader_stands_on_a_check_only_with_its_whole_log_committed_and_applied() {
        let ready = state(vote(3, 1, true), Some(10), Some(10));
        assert!(leader_ready(&ready, 1, 3, Some(10)));
        assert!(!leader_ready(&ready, 1, 3, Some(9)), "not applied yet");
        assert!(!leader_ready(&ready, 1, 4, Some(10)), "another term");
        assert!(
            !leader_ready(&ready, 2, 3, Some(10)),
            "another leader's vote"
        );
        let uncommitted_tail = state(vote(3, 1, true), Some(11), Some(10));
        assert!(
            !leader_ready(&uncommitted_tail, 1, 3, Some(10)),
            "its term's first entry may not be committed"
        );
        let candidate = state(vote(3, 1, false), Some(10), Some(10));
        assert!(!leader_ready(&candidate, 1, 3, Some(10)), "not granted yet");
        let empty = state(vote(3, 1, true), None, None);
        assert!(!leader_ready(&empty, 1, 3, None));
    }

    #[test]
    fn a_quorum_counts_the_leader_and_the_voters_that_confirmed() {
        let three: BTreeSet<ReplicaId> = [1, 2, 3].into();
        assert!(!quorum_confirms(&three, 1, &BTreeSet::new()));
        assert!(quorum_confirms(&three, 1, &[2].into()));
        assert!(
            !quorum_confirms(&three, 1, &[4].into()),
            "not a voter of the range"
        );
        let five: BTreeSet<ReplicaId> = [1, 2, 3, 4, 5].into();
        assert!(!quorum_confirms(&five, 1, &[2].into()));
        assert!(quorum_confirms(&five, 1, &[2, 5].into()));
        let one: BTreeSet<ReplicaId> = [1].into();
        assert!(quorum_confirms(&one, 1, &BTreeSet::new()));
        let four: BTreeSet<ReplicaId> = [1, 2, 3, 4].into();
        assert!(
            !quorum_confirms(&four, 1, &[2].into()),
            "half of an even set is no majority: the other half could elect"
        );
        assert!(quorum_confirms(&four, 1, &[2, 3].into()));
        assert!(
            !quorum_confirms(&three, 9, &[2].into()),
            "a leader outside the voters counts for nothing"
        );
    }

    #[test]
    fn a_replica_confirms_only_the_exact_committed_vote_it_holds() {
        use spheredb_raft::network::confirms_claim;
        let claim = LeaderClaim {
            range_id: 7,
            replica_id: 2,
            vote: vote(3, 1, true),
        };
        assert!(confirms_claim(&claim, 2, &vote(3, 1, true)));
        assert!(
            !confirms_claim(&claim, 2, &vote(4, 3, false)),
            "voted for a newer candidate"
        );
        assert!(
            !confirms_claim(&claim, 2, &vote(4, 3, true)),
            "a newer leader"
        );
        assert!(
            !confirms_claim(&claim, 3, &vote(3, 1, true)),
            "another replica"
        );
        assert!(
            !confirms_claim(&claim, 2, &vote(3, 2, false)),
            "a vote for another candidate of the same term"
        );
        let uncommitted = LeaderClaim {
            vote: vote(3, 1, false),
            ..claim
        };
        assert!(!confirms_claim(&uncommitted, 2, &vote(3, 1, false)));
    }
}
