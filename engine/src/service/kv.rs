//! The KV gRPC service over a sphere's keyspaces: its raw KV keys and its SQL rows.
//!
//! Validates every request before it reaches Raft (limits, range, generation), writes through
//! Raft, and reads after a ReadIndex (or lease) barrier so reads are linearizable.
//! Routing a request to the local replica (or to the error that tells the client where to
//! go) is here too. Works only with local replicas; does not import `node`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use openraft::async_runtime::WatchReceiver;
use std::time::Duration;

use openraft::ReadPolicy;
use spheredb_client::limits::{self, check_key, check_value};
use spheredb_client::proto::v1::kv_server::Kv;
use spheredb_client::proto::v1::{
    BatchRequest, BatchResponse, CompareAndSwapRequest, CompareAndSwapResponse, DeleteRequest,
    DeleteResponse, GetRequest, GetResponse, Header, KeyValue, Keyspace as WireKeyspace,
    PutRequest, PutResponse, RangeDescriptor, ReadConsistency, ScanRequest, ScanResponse,
};
use spheredb_client::ClientError;
use spheredb_raft::network::{Replica, ReplicaDirectory};
use spheredb_raft::state_machine::quarantine;
use spheredb_raft::{Command, CommandResponse, NodeId, RangeId, RangeRecord, WriteOp};
use spheredb_storage::mvcc::{self, Timestamp};
use spheredb_storage::{keys, Db, StorageError};
use tonic::{Request, Response, Status};

use crate::descriptor::wire_descriptor;
use crate::disk::DiskGuard;
use crate::errors::{read_error, storage_error, txn_refused, wire_lock};
use crate::range::timestamps::{NodeTimestamps, ReadTs};
use crate::replica::descriptor;

/// Longest a write waits for commit before answering "outcome unknown".
pub const WRITE_TIMEOUT_MS: u64 = 5_000;
/// Longest a read waits for its linearizability barrier.
pub const READ_TIMEOUT_MS: u64 = 5_000;
/// Locks one refused read reports, for the client to resolve together.
pub const MAX_LOCKS_PER_ANSWER: usize = 64;

/// The keyspace of one sphere a request addresses: its keys are `rest` in it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SphereSpace {
    pub(crate) keyspace: keys::Keyspace,
    pub(crate) sphere: u64,
}

impl SphereSpace {
    fn of(header: &Header) -> Result<SphereSpace, ClientError> {
        let keyspace = match WireKeyspace::try_from(header.keyspace) {
            Ok(WireKeyspace::Kv) => keys::Keyspace::Kv,
            Ok(WireKeyspace::Sql) => keys::Keyspace::Sql,
            Err(_) => {
                return Err(ClientError::InvalidArgument(format!(
                    "unknown keyspace {} in the request header (0: KV, 1: SQL)",
                    header.keyspace
                )))
            }
        };
        Ok(SphereSpace {
            keyspace,
            sphere: header.sphere_id,
        })
    }

    pub(crate) fn key(&self, rest: &[u8]) -> Vec<u8> {
        self.keyspace.key(self.sphere, rest)
    }

    /// The part of `key` after this keyspace's header; `None` for a key outside it.
    fn rest<'k>(&self, key: &'k [u8]) -> Option<&'k [u8]> {
        match keys::decode_sphere_key(key) {
            Some((keyspace, sphere, rest))
                if keyspace == self.keyspace && sphere == self.sphere =>
            {
                Some(rest)
            }
            _ => None,
        }
    }
}

/// The KV service of a node.
pub struct KvService {
    node_id: NodeId,
    db: Db,
    replicas: Arc<ReplicaDirectory>,
    /// Refuses client writes while the disk is nearly full.
    disk: Arc<DiskGuard>,
    /// Commit and read timestamps of the ranges this node leads.
    timestamps: Arc<NodeTimestamps>,
}

impl KvService {
    /// A service of node `node_id` over its local `replicas`, whose data is in `db`.
    pub fn new(
        node_id: NodeId,
        db: Db,
        replicas: Arc<ReplicaDirectory>,
        disk: Arc<DiskGuard>,
        timestamps: Arc<NodeTimestamps>,
    ) -> Self {
        KvService {
            node_id,
            db,
            replicas,
            disk,
            timestamps,
        }
    }

    /// Refuses a write while the node's disk is nearly full; nothing is written.
    pub(crate) fn check_disk(&self) -> Result<(), ClientError> {
        self.disk.check_write()
    }

    /// Finds the local replica a request for `range_id` at `generation` touching `key` must
    /// go to, or the error that tells the client where to go instead.
    pub(crate) fn route_to(
        &self,
        range_id: RangeId,
        generation: u64,
        key: &[u8],
    ) -> Result<Arc<Replica>, ClientError> {
        let Some(replica) = self.replicas.get(range_id) else {
            return Err(self.not_here(range_id, key));
        };
        let Some(desc) = descriptor(&replica) else {
            return Err(ClientError::RangeNotFound(format!(
                "range {range_id} is still being copied to this node; ask its leader"
            )));
        };
        if desc.generation != generation {
            return Err(ClientError::StaleGeneration {
                message: format!(
                    "range {range_id} is at generation {}, the request named {generation}",
                    desc.generation
                ),
                descriptors: self.hint_descriptors(&desc, key),
            });
        }
        if !keys::span_contains(&desc.start_key, &desc.end_key, key) {
            return Err(ClientError::KeyNotInRange {
                message: format!("key is outside range {range_id}"),
                descriptors: self.hint_descriptors(&desc, key),
            });
        }
        if let Some(frozen) = replica.shared.frozen() {
            return Err(ClientError::Unavailable(format!(
                "range {range_id} is being merged into range {}; retry shortly",
                frozen.into
            )));
        }
        if let Some(reason) = replica.shared.quarantined() {
            return Err(ClientError::Unavailable(format!(
                "the replica of range {range_id} on node {} is quarantined ({reason}); its \
                 other replicas serve the range while it is replaced",
                self.node_id
            )));
        }
        // A leader wakes for the request. A follower stays as it is: it only answers
        // NotLeader, and waking its election timer while the leader sleeps would start an
        // election nobody needs.
        if replica.raft.is_leader() {
            replica.touch();
        }
        Ok(replica)
    }

    /// The error for a failed read of `replica`'s data. Damaged data quarantines the
    /// replica: it stops serving and its Raft group stops, the node stays up, and the
    /// allocator replaces the replica from a sound copy.
    pub(crate) fn read_failed(&self, replica: &Replica, e: StorageError) -> ClientError {
        if e.is_corruption() {
            match quarantine(&self.db, &replica.shared, &e.to_string()) {
                Ok(()) => {
                    let raft = replica.raft.clone();
                    let range_id = replica.shared.range_id;
                    tokio::spawn(async move {
                        if let Err(e) = raft.shutdown().await {
                            tracing::warn!(range_id, "stopping a quarantined replica: {e}");
                        }
                    });
                }
                Err(q) => tracing::error!(
                    range_id = replica.shared.range_id,
                    "cannot record a quarantine: {q}"
                ),
            }
        }
        storage_error(e)
    }

    /// The error for a request naming a range this node has no replica of.
    fn not_here(&self, range_id: RangeId, key: &[u8]) -> ClientError {
        match self.replicas.covering(key).and_then(|r| descriptor(&r)) {
            Some(desc) => ClientError::KeyNotInRange {
                message: format!(
                    "range {range_id} has no replica on node {}; range {} holds the key",
                    self.node_id, desc.range_id
                ),
                descriptors: vec![desc],
            },
            None => ClientError::RangeNotFound(format!(
                "range {range_id} has no replica on node {}; reload the range map (Admin.RangeList)",
                self.node_id
            )),
        }
    }

    /// `desc`, plus the local range now holding `key` when that is another one.
    fn hint_descriptors(&self, desc: &RangeDescriptor, key: &[u8]) -> Vec<RangeDescriptor> {
        let mut out = vec![desc.clone()];
        if let Some(other) = self.replicas.covering(key) {
            if other.shared.range_id != desc.range_id {
                out.extend(descriptor(&other));
            }
        }
        out
    }

    /// Checks the header and finds the local replica for `user_key` of the named sphere and
    /// keyspace. Returns the keyspace and the replica.
    pub(crate) fn route(
        &self,
        header: &Option<Header>,
        user_key: &[u8],
    ) -> Result<(SphereSpace, Arc<Replica>), ClientError> {
        let Some(header) = header else {
            return Err(ClientError::InvalidArgument(
                "request has no header: name the sphere and the range (Admin.RangeList lists ranges)".into(),
            ));
        };
        let Some(range) = &header.range else {
            return Err(ClientError::InvalidArgument(
                "request names no range: set header.range from Admin.RangeList".into(),
            ));
        };
        let space = SphereSpace::of(header)?;
        let key = space.key(user_key);
        let replica = self.route_to(range.range_id, range.generation, &key)?;
        replica.ops.fetch_add(1, Ordering::Relaxed);
        Ok((space, replica))
    }

    /// `KeyNotInRange` with the range's current descriptor.
    pub(crate) fn outside(
        &self,
        replica: &Replica,
        span: Option<spheredb_raft::RangeSpan>,
    ) -> ClientError {
        let descriptors = span
            .map(|s| {
                let m = replica
                    .raft
                    .metrics()
                    .borrow_watched()
                    .membership_config
                    .membership()
                    .clone();
                vec![wire_descriptor(&RangeRecord::new(s, &m))]
            })
            .unwrap_or_default();
        ClientError::KeyNotInRange {
            message: format!(
                "range {} changed its span while the request was in flight; nothing was written",
                replica.shared.range_id
            ),
            descriptors,
        }
    }

    /// Writes `keys` through Raft as a single-range transaction: `command` builds the entry
    /// for the commit ts the range's leader fixes (see `range::timestamps`).
    pub(crate) async fn write(
        &self,
        replica: &Arc<Replica>,
        header: &Option<Header>,
        keys: Vec<Vec<u8>>,
        command: impl Fn(Timestamp) -> Command + Send + Sync + 'static,
    ) -> Result<CommandResponse, ClientError> {
        let command: Arc<dyn Fn(Timestamp) -> Command + Send + Sync> = Arc::new(command);
        let causal_ts = header.as_ref().map_or(0, |h| h.causal_ts);
        // Refused before proposing, so nothing is written and the caller may retry.
        self.disk.check_write()?;
        if ack_write_before_commit() {
            // Deliberately broken (failpoint `kv-write-ack-before-commit`, off unless
            // FAILPOINTS names it): the write is proposed in the background and reported
            // as done at once, so a crash or leader change can lose an acknowledged write
            // and a read right after the ack can miss it. The Jepsen tests use it to show
            // the tester detects lost writes.
            let acked = fake_success(&command(0));
            let (timestamps, replica) = (self.timestamps.clone(), replica.clone());
            tokio::spawn(async move {
                let _ = timestamps
                    .propose(&replica, keys, command, causal_ts, WRITE_TIMEOUT_MS)
                    .await;
            });
            return Ok(acked);
        }
        // Bounded as a whole (seeding the range's timestamps, fetching a batch, the commit):
        // the proposal runs detached, so giving up here cannot strand its keys in flight.
        let proposal = self
            .timestamps
            .propose(replica, keys, command, causal_ts, WRITE_TIMEOUT_MS);
        let answer = tokio::time::timeout(Duration::from_millis(WRITE_TIMEOUT_MS), proposal)
            .await
            .map_err(|_| {
                ClientError::OutcomeUnknown(format!(
                    "write not committed within {WRITE_TIMEOUT_MS} ms; it may still apply"
                ))
            })?;
        match answer? {
            CommandResponse::Rejected { reason } => Err(ClientError::InvalidArgument(reason)),
            CommandResponse::Frozen { into } => Err(ClientError::Unavailable(format!(
                "range is being merged into range {into}; retry shortly"
            ))),
            CommandResponse::OutsideSpan { span } => Err(self.outside(replica, span.map(|s| *s))),
            CommandResponse::TxnRefused(refusal) => Err(txn_refused(refusal)),
            other => Ok(other),
        }
    }

    /// Waits until a read on `replica` is linearizable.
    ///
    /// `LEASE` is served with ReadIndex, as `LINEARIZABLE` is. The pinned openraft's leader
    /// lease is not safe to serve reads from: a follower forgets on restart that it acked the
    /// leader (its lease promise), so it can vote for a new leader while the old one still
    /// trusts its lease, and the lease has no clock-drift margin. A read that trusted it could
    /// miss a write acknowledged by the new leader. ReadIndex confirms leadership with a quorum
    /// round on every read, which costs one round trip and is always safe.
    pub(crate) async fn read_barrier(
        &self,
        replica: &Replica,
        consistency: i32,
    ) -> Result<(), ClientError> {
        match ReadConsistency::try_from(consistency) {
            Ok(ReadConsistency::Lease | ReadConsistency::Linearizable) => {}
            Err(_) => {
                return Err(ClientError::InvalidArgument(format!(
                    "unknown read consistency {consistency}"
                )))
            }
        }
        if consistency == ReadConsistency::Lease as i32 && lease_longer_than_election_timeout() {
            // Deliberately broken (failpoint `kv-lease-longer-than-election`): a leader
            // trusts a lease of BROKEN_LEASE_ELECTION_TIMEOUTS election timeouts from its last
            // quorum acknowledgement and serves locally. A deposed leader that has not heard
            // of its successor then serves stale reads well after the new leader was elected.
            let metrics = replica.raft.metrics().borrow_watched().clone();
            let lease = Duration::from_millis(
                replica.raft.config().election_timeout_min * BROKEN_LEASE_ELECTION_TIMEOUTS,
            );
            let acked_recently = metrics
                .last_quorum_acked
                .as_ref()
                .is_some_and(|acked| openraft::Instant::elapsed(&**acked) < lease);
            if metrics.state.is_leader() && acked_recently {
                return Ok(());
            }
        }
        if skip_wait_for_apply() {
            // Deliberately broken (failpoint `kv-read-skip-apply-wait`): leadership is
            // confirmed with a quorum round, but the read does not wait for the state machine
            // to apply up to the read index, so a new leader still applying its predecessor's
            // last entries serves state from before writes that were already acknowledged.
            let confirm = replica.raft.get_read_linearizer(ReadPolicy::ReadIndex);
            return match tokio::time::timeout(Duration::from_millis(READ_TIMEOUT_MS), confirm).await
            {
                Err(_) => Err(ClientError::Unavailable(format!(
                    "could not confirm leadership within {READ_TIMEOUT_MS} ms"
                ))),
                Ok(Err(e)) => Err(read_error(e)),
                Ok(Ok(linearizer)) => {
                    let read_index = linearizer.read_log_id().log_id();
                    if linearizer.applied() < Some(read_index) {
                        // Shows, when a run misses the bug, whether it ever had the chance.
                        tracing::warn!(
                            range_id = replica.shared.range_id,
                            applied = ?linearizer.applied(),
                            ?read_index,
                            "failpoint kv-read-skip-apply-wait: read served before applying up to the read index"
                        );
                    }
                    Ok(())
                }
            };
        }
        let barrier = replica.raft.ensure_linearizable(ReadPolicy::ReadIndex);
        match tokio::time::timeout(Duration::from_millis(READ_TIMEOUT_MS), barrier).await {
            Err(_) => Err(ClientError::Unavailable(format!(
                "could not confirm leadership within {READ_TIMEOUT_MS} ms"
            ))),
            Ok(Err(e)) => Err(read_error(e)),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// The timestamp to read `[start, end)` at on `replica` (see `range::timestamps`), once
    /// the writes in flight below it applied.
    pub(crate) async fn read_ts(
        &self,
        replica: &Replica,
        start: &[u8],
        end: &[u8],
        at: Option<Timestamp>,
        consistency: i32,
    ) -> Result<Timestamp, ClientError> {
        if skip_read_barrier() && !replica.raft.is_leader() {
            // The failpoint `kv-read-skip-barrier` serves followers and deposed leaders from
            // their local state: the newest versions they applied.
            return Ok(at.unwrap_or(Timestamp::MAX));
        }
        if consistency == ReadConsistency::Lease as i32 && lease_longer_than_election_timeout() {
            // The failpoint `kv-lease-longer-than-election`: a leader that trusts its lease
            // serves from local state, without its range's timestamp bookkeeping either.
            return Ok(at.unwrap_or(Timestamp::MAX));
        }
        let begin = self
            .timestamps
            .begin_read(replica, start, end, at, READ_TIMEOUT_MS);
        match tokio::time::timeout(Duration::from_millis(READ_TIMEOUT_MS), begin).await {
            Ok(ts) => ts.map(|ReadTs(ts)| ts),
            Err(_) => Err(ClientError::Unavailable(format!(
                "no read timestamp within {READ_TIMEOUT_MS} ms (seeding the range's \
                 timestamps, or writes in flight on the keys read); retry"
            ))),
        }
    }

    /// The timestamp of a snapshot read asked for with `at_ts` (`None` for 0: the latest),
    /// refused when the oracle has not reached it.
    async fn snapshot_ts(&self, at_ts: Timestamp) -> Result<Option<Timestamp>, ClientError> {
        if at_ts == 0 {
            return Ok(None);
        }
        self.timestamps.check_read_ts(at_ts).await?;
        Ok(Some(at_ts))
    }

    /// Refuses a read at `read_ts` of `[start, end)` from `snapshot` when transactions'
    /// locks are on it that may commit at or below `read_ts`: the read cannot know those
    /// writes yet. The client resolves the locks it is told of and reads again.
    fn check_locks(
        &self,
        replica: &Replica,
        snapshot: &rocksdb::Snapshot<'_>,
        start: &[u8],
        end: &[u8],
        read_ts: Timestamp,
    ) -> Result<(), ClientError> {
        let locks = mvcc::locks::locks_blocking_read(
            &self.db,
            snapshot,
            start,
            end,
            read_ts,
            MAX_LOCKS_PER_ANSWER,
        )
        .map_err(|e| self.read_failed(replica, e))?;
        let Some((first, lock)) = locks.first() else {
            return Ok(());
        };
        Err(ClientError::Locked {
            message: format!(
                "{} ({} locks in all) is locked by the transaction that started at {}, which may \
                 commit below the read's timestamp {read_ts}",
                crate::errors::key_text(first),
                locks.len(),
                lock.start_ts
            ),
            locks: locks
                .iter()
                .map(|(key, lock)| wire_lock(spheredb_raft::txn::lock_info(key, lock)))
                .collect(),
        })
    }

    /// After the barrier: the span may have changed while waiting (a split applied), or the
    /// range frozen for a merge; the read is only correct if the key is still served here.
    fn check_still_in_span(&self, replica: &Replica, key: &[u8]) -> Result<(), ClientError> {
        if let Some(frozen) = replica.shared.frozen() {
            return Err(ClientError::Unavailable(format!(
                "range is being merged into range {}; retry shortly",
                frozen.into
            )));
        }
        let span = replica.shared.span();
        if span.as_ref().is_some_and(|s| s.contains(key)) {
            Ok(())
        } else {
            Err(self.outside(replica, span))
        }
    }
}

/// Refuses a read at `read_ts` below the range's GC horizon. Checked after reading: a horizon
/// applied before the read began may have let collection remove versions it needed, and one
/// applied later is caught here too, since collection only starts once a horizon is applied.
pub(crate) fn check_history(replica: &Replica, read_ts: Timestamp) -> Result<(), ClientError> {
    let horizon = replica.shared.gc_horizon();
    if read_ts < horizon {
        return Err(ClientError::HistoryCompacted {
            message: format!(
                "range {} keeps history back to timestamp {horizon} only (--gc-ttl); the read \
                 asked for {read_ts}",
                replica.shared.range_id
            ),
            horizon,
        });
    }
    Ok(())
}

/// Whether the failpoint `kv-read-skip-barrier` is active. Always false unless the engine is
/// built with the `failpoints` feature and FAILPOINTS activates it (e.g. `=return`).
fn skip_read_barrier() -> bool {
    fail::fail_point!("kv-read-skip-barrier", |_| true);
    false
}

/// Lease of the failpoint `kv-lease-longer-than-election`, in election timeouts: a correct
/// lease would be shorter than one, less the clock drift bound.
const BROKEN_LEASE_ELECTION_TIMEOUTS: u64 = 10;

/// Whether the failpoint `kv-lease-longer-than-election` is active; see [`skip_read_barrier`].
fn lease_longer_than_election_timeout() -> bool {
    fail::fail_point!("kv-lease-longer-than-election", |_| true);
    false
}

/// Whether the failpoint `kv-read-skip-apply-wait` is active; see [`skip_read_barrier`].
fn skip_wait_for_apply() -> bool {
    fail::fail_point!("kv-read-skip-apply-wait", |_| true);
    false
}

/// Whether the failpoint `kv-write-ack-before-commit` is active; see [`skip_read_barrier`].
fn ack_write_before_commit() -> bool {
    fail::fail_point!("kv-write-ack-before-commit", |_| true);
    false
}

/// The answer an applied `cmd` would most likely get, for acknowledging it before it commits
/// (failpoint `kv-write-ack-before-commit` only).
fn fake_success(cmd: &Command) -> CommandResponse {
    match cmd {
        Command::CompareAndSwap { new_value, .. } => CommandResponse::Swapped {
            succeeded: true,
            current: new_value.clone(),
        },
        Command::Delete { .. } => CommandResponse::Deleted { existed: true },
        _ => CommandResponse::Done,
    }
}

fn unexpected(resp: CommandResponse) -> ClientError {
    ClientError::Internal(format!("unexpected command response {resp:?}"))
}

type Reply<T> = Result<Response<T>, Status>;

fn answer<T>(r: Result<T, ClientError>) -> Reply<T> {
    r.map(Response::new).map_err(|e| e.to_status())
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(&self, request: Request<GetRequest>) -> Reply<GetResponse> {
        let req = request.into_inner();
        answer(
            async {
                check_key(&req.key)?;
                let (space, replica) = self.route(&req.header, &req.key)?;
                let at = self.snapshot_ts(req.at_ts).await?;
                let key = space.key(&req.key);
                let mut key_end = key.clone();
                key_end.push(0);
                // The read's timestamp is fixed (and the writes in flight below it waited
                // for) before the barrier, so the data is read right after the barrier.
                let read_ts = self
                    .read_ts(&replica, &key, &key_end, at, req.consistency)
                    .await?;
                // The failpoint `kv-read-skip-barrier` (off unless FAILPOINTS names it)
                // serves the read from local state without confirming leadership, so a
                // deposed leader or a follower answers with possibly stale data.
                if !skip_read_barrier() {
                    self.read_barrier(&replica, req.consistency).await?;
                }
                self.check_still_in_span(&replica, &key)?;
                let snapshot = self.db.raw().snapshot();
                self.check_locks(&replica, &snapshot, &key, &key_end, read_ts)?;
                let version = mvcc::store::get_at(&self.db, Some(&snapshot), &key, read_ts)
                    .map_err(|e| self.read_failed(&replica, e))?;
                drop(snapshot);
                check_history(&replica, read_ts)?;
                let value = version.and_then(|v| v.value);
                Ok(GetResponse {
                    found: value.is_some(),
                    value: value.unwrap_or_default(),
                    read_ts,
                })
            }
            .await,
        )
    }

    async fn put(&self, request: Request<PutRequest>) -> Reply<PutResponse> {
        let req = request.into_inner();
        answer(
            async {
                check_key(&req.key)?;
                check_value(&req.value)?;
                let (space, replica) = self.route(&req.header, &req.key)?;
                let op = WriteOp {
                    key: space.key(&req.key),
                    value: Some(req.value),
                };
                let keys = vec![op.key.clone()];
                let ops = vec![op];
                match self
                    .write(&replica, &req.header, keys, move |ts| Command::Write {
                        ops: ops.clone(),
                        commit_ts: Some(ts),
                    })
                    .await?
                {
                    CommandResponse::Done => Ok(PutResponse {}),
                    other => Err(unexpected(other)),
                }
            }
            .await,
        )
    }

    async fn delete(&self, request: Request<DeleteRequest>) -> Reply<DeleteResponse> {
        let req = request.into_inner();
        answer(
            async {
                check_key(&req.key)?;
                let (space, replica) = self.route(&req.header, &req.key)?;
                let key = space.key(&req.key);
                match self
                    .write(&replica, &req.header, vec![key.clone()], move |ts| {
                        Command::Delete {
                            key: key.clone(),
                            commit_ts: Some(ts),
                        }
                    })
                    .await?
                {
                    CommandResponse::Deleted { existed } => Ok(DeleteResponse { existed }),
                    other => Err(unexpected(other)),
                }
            }
            .await,
        )
    }

    async fn scan(&self, request: Request<ScanRequest>) -> Reply<ScanResponse> {
        let req = request.into_inner();
        answer(
            async {
                let (space, replica) = self.route(&req.header, &req.start)?;
                let limit = match req.limit {
                    0 => limits::DEFAULT_SCAN_LIMIT,
                    n if n > limits::MAX_SCAN_LIMIT => {
                        return Err(ClientError::InvalidArgument(format!(
                            "scan limit {n} is over the maximum of {}",
                            limits::MAX_SCAN_LIMIT
                        )))
                    }
                    n => n,
                };
                if !req.end.is_empty() && req.end <= req.start {
                    return Ok(ScanResponse::default());
                }
                let at = self.snapshot_ts(req.at_ts).await?;
                let start = space.key(&req.start);
                let request_end = if req.end.is_empty() {
                    space.keyspace.span(space.sphere).1
                } else {
                    space.key(&req.end)
                };
                // As in `get`: the timestamp first, then the barrier, then the data.
                let read_ts = self
                    .read_ts(&replica, &start, &request_end, at, req.consistency)
                    .await?;
                // Same failpoint as in `get`: stale scans from any node.
                if !skip_read_barrier() {
                    self.read_barrier(&replica, req.consistency).await?;
                }
                // The span is read before and after the RocksDB snapshot is taken, and must
                // be the same both times: then the snapshot holds exactly what this replica
                // had applied over that span. (A merge applied in between would widen the
                // span over keys the snapshot may hold stale; a split would narrow it.) Else
                // the client retries on fresh descriptors.
                let db = &self.db;
                self.check_still_in_span(&replica, &start)?;
                let before = replica.shared.span();
                let snapshot = db.raw().snapshot();
                let span = replica.shared.span();
                if span != before || !span.as_ref().is_some_and(|s| s.contains(&start)) {
                    drop(snapshot);
                    return Err(self.outside(&replica, span));
                }
                // One range per request: stop at the range's end and say where to go on.
                // The client resumes at exactly that key, never at its cached range's end,
                // which a split or merge may have moved.
                let mut end = request_end;
                let mut clamped = false;
                if let Some(span) = span {
                    if !span.end_key.is_empty() && span.end_key < end {
                        end = span.end_key;
                        clamped = true;
                    }
                }
                let page = mvcc::store::scan_at(
                    db,
                    &snapshot,
                    &start,
                    &end,
                    read_ts,
                    limit as usize,
                    limits::MAX_SCAN_RESPONSE_BYTES,
                )
                .map_err(|e| self.read_failed(&replica, e))?;
                // Locks over what the page covered, from the same snapshot.
                let page_end = page.resume_key.clone().unwrap_or_else(|| end.clone());
                self.check_locks(&replica, &snapshot, &start, &page_end, read_ts)?;
                drop(snapshot);
                check_history(&replica, read_ts)?;
                let resume_key = match page.resume_key {
                    Some(key) => Some(key),
                    None if clamped => Some(end),
                    None => None,
                };
                let resume_key = match resume_key {
                    None => None,
                    Some(key) => match space.rest(&key) {
                        Some(user) => Some(user.to_vec()),
                        None => {
                            return Err(ClientError::Internal(format!(
                                "scan of sphere {} stopped at key {key:?} outside its keyspace",
                                space.sphere
                            )))
                        }
                    },
                };
                let pairs = page
                    .pairs
                    .into_iter()
                    .filter_map(|(k, v)| {
                        space.rest(&k).map(|user| KeyValue {
                            key: user.to_vec(),
                            value: v,
                        })
                    })
                    .collect();
                Ok(ScanResponse {
                    pairs,
                    more: resume_key.is_some(),
                    resume_key: resume_key.unwrap_or_default(),
                    read_ts,
                })
            }
            .await,
        )
    }

    async fn compare_and_swap(
        &self,
        request: Request<CompareAndSwapRequest>,
    ) -> Reply<CompareAndSwapResponse> {
        let req = request.into_inner();
        answer(
            async {
                check_key(&req.key)?;
                let (space, replica) = self.route(&req.header, &req.key)?;
                if let Some(v) = &req.expected {
                    check_value(v)?;
                }
                if let Some(v) = &req.new_value {
                    check_value(v)?;
                }
                let key = space.key(&req.key);
                let (expected, new_value) = (req.expected, req.new_value);
                match self
                    .write(&replica, &req.header, vec![key.clone()], move |ts| {
                        Command::CompareAndSwap {
                            key: key.clone(),
                            expected: expected.clone(),
                            new_value: new_value.clone(),
                            commit_ts: Some(ts),
                        }
                    })
                    .await?
                {
                    CommandResponse::Swapped { succeeded, current } => {
                        Ok(CompareAndSwapResponse { succeeded, current })
                    }
                    other => Err(unexpected(other)),
                }
            }
            .await,
        )
    }

    async fn batch(&self, request: Request<BatchRequest>) -> Reply<BatchResponse> {
        let req = request.into_inner();
        answer(
            async {
                let first = req.ops.first().map(|op| op.key.clone()).unwrap_or_default();
                let (space, replica) = self.route(&req.header, &first)?;
                if req.ops.len() > limits::MAX_BATCH_OPS {
                    return Err(ClientError::InvalidArgument(format!(
                        "batch of {} ops is over the limit of {}",
                        req.ops.len(),
                        limits::MAX_BATCH_OPS
                    )));
                }
                let mut total_bytes = 0usize;
                let mut ops = Vec::with_capacity(req.ops.len());
                for op in req.ops {
                    check_key(&op.key)?;
                    if let Some(v) = &op.value {
                        check_value(v)?;
                    }
                    total_bytes += op.key.len() + op.value.as_ref().map_or(0, Vec::len);
                    ops.push(WriteOp {
                        key: space.key(&op.key),
                        value: op.value,
                    });
                }
                if total_bytes > limits::MAX_BATCH_SIZE_BYTES {
                    return Err(ClientError::InvalidArgument(format!(
                        "batch of {total_bytes} bytes is over the limit of {} bytes",
                        limits::MAX_BATCH_SIZE_BYTES
                    )));
                }
                if ops.is_empty() {
                    return Ok(BatchResponse {});
                }
                let span = replica.shared.span();
                if !ops
                    .iter()
                    .all(|op| span.as_ref().is_some_and(|s| s.contains(&op.key)))
                {
                    return Err(self.outside(&replica, span));
                }
                let keys = ops.iter().map(|op| op.key.clone()).collect();
                match self
                    .write(&replica, &req.header, keys, move |ts| Command::Write {
                        ops: ops.clone(),
                        commit_ts: Some(ts),
                    })
                    .await?
                {
                    CommandResponse::Done => Ok(BatchResponse {}),
                    other => Err(unexpected(other)),
                }
            }
            .await,
        )
    }
}
