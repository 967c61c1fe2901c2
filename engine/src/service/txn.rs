//! The `Txn` service: the timestamp oracle's front door (`meta::tso`, served by the
//! meta-range leader; other nodes answer `NOT_LEADER` with its address), and the Percolator
//! calls of transactions (prewrite, pessimistic lock, commit, rollback, status checks,
//! heartbeats, one-phase commit), served by the leader of the range each call names.
//!
//! Every call is checked here (keys in the named range and generation, sizes, timestamps the
//! oracle handed out) and proposed through Raft; the Percolator rules themselves run when
//! the entry applies (`spheredb_raft::txn`), alike on every replica. Commits go through the
//! range's commit-ts rules (`range::timestamps`), so that single-range writes proposed after a
//! transaction's commit commit above it and linearizable reads see it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use spheredb_client::limits::{self, check_value};
use spheredb_client::proto::v1::txn_mutation::Op as WireOp;
use spheredb_client::proto::v1::txn_server::Txn;
use spheredb_client::proto::v1::txn_status_response::State as WireState;
use spheredb_client::proto::v1::{
    CheckTxnStatusRequest, CommitOnePhaseRequest, CommitOnePhaseResponse, CommitRequest,
    CommitResponse, GetTimestampsRequest, GetTimestampsResponse, Header, PessimisticLockRequest,
    PessimisticLockResponse, PrewriteRequest, PrewriteResponse, RollbackRequest, RollbackResponse,
    TxnHeartbeatRequest, TxnMutation as WireMutation, TxnStatusResponse,
};
use spheredb_client::ClientError;
use spheredb_raft::network::{Replica, ReplicaDirectory};
use spheredb_raft::{Command, CommandResponse, TxnKey, TxnMutation, TxnOp, TxnState, WriteOp};
use spheredb_storage::keys;
use spheredb_storage::mvcc::Timestamp;
use tonic::{Request, Response, Status};

use crate::errors::{not_leader_hint, txn_refused, write_error};
use crate::meta::tso::Tso;
use crate::peers::Peers;
use crate::range::timestamps::NodeTimestamps;
use crate::replica::leading_meta;
use crate::service::kv::{KvService, WRITE_TIMEOUT_MS};

/// Longest TTL a transaction may ask for its locks. A lock's TTL counts from its
/// transaction's start, and a running transaction's heartbeat raises it to its age plus a few
/// seconds, so this bounds how long a transaction may run.
pub const MAX_TXN_TTL_MS: u64 = 3_600_000;

pub struct TxnService {
    kv: Arc<KvService>,
    replicas: Arc<ReplicaDirectory>,
    peers: Arc<Peers>,
    tso: Arc<Tso>,
    timestamps: Arc<NodeTimestamps>,
}

impl TxnService {
    pub fn new(
        kv: Arc<KvService>,
        replicas: Arc<ReplicaDirectory>,
        peers: Arc<Peers>,
        tso: Arc<Tso>,
        timestamps: Arc<NodeTimestamps>,
    ) -> TxnService {
        TxnService {
            kv,
            replicas,
            peers,
            tso,
            timestamps,
        }
    }

    /// Finds the local replica of the range `header` names, leading or not (a follower's
    /// proposal answers `NOT_LEADER`), and checks that every key is a distinct sphere key of
    /// it and that there are not too many.
    fn route<'k>(
        &self,
        header: &Option<Header>,
        keys: impl IntoIterator<Item = &'k [u8]>,
    ) -> Result<Arc<Replica>, ClientError> {
        let Some(range) = header.as_ref().and_then(|h| h.range.as_ref()) else {
            return Err(ClientError::InvalidArgument(
                "request names no range: set header.range from Admin.RangeList".into(),
            ));
        };
        let mut seen = BTreeSet::new();
        let mut total_bytes = 0usize;
        let mut replica = None;
        for key in keys {
            if keys::decode_sphere_key(key).is_none() {
                return Err(ClientError::InvalidArgument(
                    "a transaction key is not an encoded sphere key (Keyspace::key(sphere, key))"
                        .into(),
                ));
            }
            limits::check_key(key)?;
            total_bytes += key.len();
            if !seen.insert(key) {
                return Err(ClientError::InvalidArgument(format!(
                    "{} appears twice in one call",
                    crate::errors::key_text(key)
                )));
            }
            if replica.is_none() {
                replica = Some(self.kv.route_to(range.range_id, range.generation, key)?);
            }
        }
        if seen.len() > limits::MAX_BATCH_OPS || total_bytes > limits::MAX_BATCH_SIZE_BYTES {
            return Err(ClientError::InvalidArgument(format!(
                "{} keys of {total_bytes} bytes in one call, over the limit of {} keys or {} bytes",
                seen.len(),
                limits::MAX_BATCH_OPS,
                limits::MAX_BATCH_SIZE_BYTES
            )));
        }
        let replica = replica.ok_or_else(|| {
            ClientError::InvalidArgument("a transaction call names no key".into())
        })?;
        let span = replica.shared.span();
        if !seen
            .iter()
            .all(|key| span.as_ref().is_some_and(|s| s.contains(key)))
        {
            return Err(self.kv.outside(&replica, span));
        }
        Ok(replica)
    }

    /// Proposes `command` (a transaction command whose timestamps are its client's) on
    /// `replica`'s range and maps the answer.
    async fn propose(
        &self,
        replica: &Replica,
        command: Command,
    ) -> Result<CommandResponse, ClientError> {
        let write = replica.raft.client_write(command);
        let answer = tokio::time::timeout(Duration::from_millis(WRITE_TIMEOUT_MS), write)
            .await
            .map_err(|_| {
                ClientError::OutcomeUnknown(format!(
                    "not committed within {WRITE_TIMEOUT_MS} ms; it may still apply"
                ))
            })?
            .map_err(write_error)?;
        self.answer(replica, answer.data)
    }

    fn answer(
        &self,
        replica: &Replica,
        response: CommandResponse,
    ) -> Result<CommandResponse, ClientError> {
        match response {
            CommandResponse::TxnRefused(refusal) => Err(txn_refused(refusal)),
            CommandResponse::Rejected { reason } => Err(ClientError::InvalidArgument(reason)),
            CommandResponse::Frozen { into } => Err(ClientError::Unavailable(format!(
                "range is being merged into range {into}; retry shortly"
            ))),
            CommandResponse::OutsideSpan { span } => {
                Err(self.kv.outside(replica, span.map(|s| *s)))
            }
            other => Ok(other),
        }
    }

    /// The checks of a call that locks `keys` (prewrite, pessimistic lock), and the range's
    /// read floor raised to its start ts (`NodeTimestamps::note_lock`); returns the replica.
    async fn before_locking<'k>(
        &self,
        header: &Option<Header>,
        keys: impl IntoIterator<Item = &'k [u8]>,
        primary: &[u8],
        start_ts: Timestamp,
        ttl_ms: u64,
    ) -> Result<Arc<Replica>, ClientError> {
        check_ttl(ttl_ms)?;
        let replica = self.route(header, keys)?;
        if keys::decode_sphere_key(primary).is_none() {
            return Err(ClientError::InvalidArgument(
                "the primary is not an encoded sphere key".into(),
            ));
        }
        self.check_ts("start ts", start_ts).await?;
        self.kv.check_disk()?;
        self.timestamps.note_lock(&replica, start_ts).await?;
        Ok(replica)
    }

    /// Checks that `ts` is a timestamp the oracle handed out (a transaction's timestamps
    /// must be: a commit above the oracle would land above reads still to come).
    async fn check_ts(&self, what: &str, ts: Timestamp) -> Result<(), ClientError> {
        if ts == 0 {
            return Err(ClientError::InvalidArgument(format!(
                "the transaction's {what} is 0; take it from the oracle (GetTimestamps)"
            )));
        }
        self.timestamps.check_read_ts(ts).await
    }
}

fn check_ttl(ttl_ms: u64) -> Result<(), ClientError> {
    if ttl_ms == 0 || ttl_ms > MAX_TXN_TTL_MS {
        return Err(ClientError::InvalidArgument(format!(
            "lock TTL {ttl_ms} ms is outside 1..={MAX_TXN_TTL_MS} ms"
        )));
    }
    Ok(())
}

/// The mutation `m`, checked.
fn mutation(m: WireMutation) -> Result<TxnMutation, ClientError> {
    let op = match WireOp::try_from(m.op) {
        Ok(WireOp::Put) => {
            check_value(&m.value)?;
            TxnOp::Put(m.value)
        }
        Ok(WireOp::Delete) => TxnOp::Delete,
        Ok(WireOp::Lock) => TxnOp::Lock,
        Err(_) => {
            return Err(ClientError::InvalidArgument(format!(
                "unknown mutation op {}",
                m.op
            )))
        }
    };
    Ok(TxnMutation { key: m.key, op })
}

fn status_response(response: CommandResponse) -> Result<TxnStatusResponse, ClientError> {
    let (state, commit_ts, ttl_ms) = match response {
        CommandResponse::TxnStatus(TxnState::Committed(ts)) => (WireState::Committed, ts, 0),
        CommandResponse::TxnStatus(TxnState::RolledBack) => (WireState::RolledBack, 0, 0),
        CommandResponse::TxnStatus(TxnState::Alive { ttl_ms }) => (WireState::Alive, 0, ttl_ms),
        CommandResponse::TxnStatus(TxnState::NotFound) => (WireState::NotFound, 0, 0),
        other => {
            return Err(ClientError::Internal(format!(
                "unexpected answer to a status check: {other}"
            )))
        }
    };
    Ok(TxnStatusResponse {
        state: state as i32,
        commit_ts,
        ttl_ms,
    })
}

fn done<T: Default>(response: CommandResponse) -> Result<T, ClientError> {
    match response {
        CommandResponse::Done => Ok(T::default()),
        other => Err(ClientError::Internal(format!(
            "unexpected answer to a transaction call: {other}"
        ))),
    }
}

type Reply<T> = Result<Response<T>, Status>;

fn reply<T>(r: Result<T, ClientError>) -> Reply<T> {
    r.map(Response::new).map_err(|e| e.to_status())
}

#[tonic::async_trait]
impl Txn for TxnService {
    async fn get_timestamps(
        &self,
        request: Request<GetTimestampsRequest>,
    ) -> Reply<GetTimestampsResponse> {
        let count = request.into_inner().count;
        reply(
            async {
                let meta = leading_meta(&self.replicas)
                    .ok_or_else(|| not_leader_hint(self.peers.meta_leader_hint()))?;
                let first = self.tso.timestamps(&meta, count).await?;
                Ok::<_, ClientError>(GetTimestampsResponse { first, count })
            }
            .await,
        )
    }

    async fn prewrite(&self, request: Request<PrewriteRequest>) -> Reply<PrewriteResponse> {
        let req = request.into_inner();
        reply(
            async {
                let replica = self
                    .before_locking(
                        &req.header,
                        req.mutations.iter().map(|m| m.key.as_slice()),
                        &req.primary,
                        req.start_ts,
                        req.ttl_ms,
                    )
                    .await?;
                let mutations = req
                    .mutations
                    .into_iter()
                    .map(mutation)
                    .collect::<Result<Vec<_>, _>>()?;
                let command = Command::Prewrite {
                    mutations,
                    primary: req.primary,
                    start_ts: req.start_ts,
                    ttl_ms: req.ttl_ms,
                };
                done(self.propose(&replica, command).await?)
            }
            .await,
        )
    }

    async fn pessimistic_lock(
        &self,
        request: Request<PessimisticLockRequest>,
    ) -> Reply<PessimisticLockResponse> {
        let req = request.into_inner();
        reply(
            async {
                let replica = self
                    .before_locking(
                        &req.header,
                        req.keys.iter().map(Vec::as_slice),
                        &req.primary,
                        req.start_ts,
                        req.ttl_ms,
                    )
                    .await?;
                let command = Command::Prewrite {
                    mutations: req
                        .keys
                        .into_iter()
                        .map(|key| TxnMutation {
                            key,
                            op: TxnOp::PessimisticLock,
                        })
                        .collect(),
                    primary: req.primary,
                    start_ts: req.start_ts,
                    ttl_ms: req.ttl_ms,
                };
                done(self.propose(&replica, command).await?)
            }
            .await,
        )
    }

    async fn commit(&self, request: Request<CommitRequest>) -> Reply<CommitResponse> {
        let req = request.into_inner();
        reply(
            async {
                let replica = self.route(&req.header, req.keys.iter().map(Vec::as_slice))?;
                if req.commit_ts <= req.start_ts {
                    return Err(ClientError::InvalidArgument(format!(
                        "commit ts {} is not above the start ts {}",
                        req.commit_ts, req.start_ts
                    )));
                }
                self.check_ts("commit ts", req.commit_ts).await?;
                let command = Command::CommitTxn {
                    keys: req.keys.into_iter().map(TxnKey).collect(),
                    start_ts: req.start_ts,
                    commit_ts: req.commit_ts,
                };
                let response = tokio::time::timeout(
                    Duration::from_millis(WRITE_TIMEOUT_MS),
                    self.timestamps.propose_txn_commit(
                        &replica,
                        req.commit_ts,
                        command,
                        WRITE_TIMEOUT_MS,
                    ),
                )
                .await
                .map_err(|_| {
                    ClientError::OutcomeUnknown(format!(
                        "commit not applied within {WRITE_TIMEOUT_MS} ms; it may still apply"
                    ))
                })??;
                done(self.answer(&replica, response)?)
            }
            .await,
        )
    }

    async fn rollback(&self, request: Request<RollbackRequest>) -> Reply<RollbackResponse> {
        let req = request.into_inner();
        reply(
            async {
                let replica = self.route(&req.header, req.keys.iter().map(Vec::as_slice))?;
                let command = Command::RollbackTxn {
                    keys: req.keys.into_iter().map(TxnKey).collect(),
                    start_ts: req.start_ts,
                };
                done(self.propose(&replica, command).await?)
            }
            .await,
        )
    }

    async fn check_txn_status(
        &self,
        request: Request<CheckTxnStatusRequest>,
    ) -> Reply<TxnStatusResponse> {
        let req = request.into_inner();
        reply(
            async {
                let replica = self.route(&req.header, [req.primary.as_slice()])?;
                // The current ts decides whether locks expired: one from the future would
                // roll back live transactions.
                self.check_ts("current ts", req.current_ts).await?;
                let command = Command::CheckTxnStatus {
                    primary: req.primary,
                    start_ts: req.start_ts,
                    current_ts: req.current_ts,
                    rollback_if_missing: req.rollback_if_missing,
                };
                status_response(self.propose(&replica, command).await?)
            }
            .await,
        )
    }

    async fn heartbeat(&self, request: Request<TxnHeartbeatRequest>) -> Reply<TxnStatusResponse> {
        let req = request.into_inner();
        reply(
            async {
                check_ttl(req.ttl_ms)?;
                let replica = self.route(&req.header, [req.primary.as_slice()])?;
                let command = Command::TxnHeartbeat {
                    primary: req.primary,
                    start_ts: req.start_ts,
                    ttl_ms: req.ttl_ms,
                };
                status_response(self.propose(&replica, command).await?)
            }
            .await,
        )
    }

    async fn commit_one_phase(
        &self,
        request: Request<CommitOnePhaseRequest>,
    ) -> Reply<CommitOnePhaseResponse> {
        let mut req = request.into_inner();
        reply(
            async {
                let replica =
                    self.route(&req.header, req.mutations.iter().map(|m| m.key.as_slice()))?;
                self.check_ts("start ts", req.start_ts).await?;
                let mut ops = Vec::with_capacity(req.mutations.len());
                for m in req.mutations {
                    let key = m.key.clone();
                    match mutation(m)?.op {
                        TxnOp::Put(value) => ops.push(WriteOp {
                            key,
                            value: Some(value),
                        }),
                        TxnOp::Delete => ops.push(WriteOp { key, value: None }),
                        TxnOp::Lock | TxnOp::PessimisticLock => {
                            return Err(ClientError::InvalidArgument(
                                "a one-phase commit writes keys; lock-only keys take two phases"
                                    .into(),
                            ))
                        }
                    }
                }
                // The commit lands above the start ts (and above the client's causal ts).
                if let Some(h) = req.header.as_mut() {
                    h.causal_ts = h.causal_ts.max(req.start_ts);
                }
                let keys: Vec<Vec<u8>> = ops.iter().map(|op| op.key.clone()).collect();
                let start_ts = req.start_ts;
                done(
                    self.kv
                        .write(&replica, &req.header, keys, move |ts| {
                            Command::OnePhaseTxn {
                                ops: ops.clone(),
                                start_ts,
                                commit_ts: Some(ts),
                            }
                        })
                        .await?,
                )
            }
            .await,
        )
    }
}
