//! A running SphereDB node: storage, the Raft group of each range, the gRPC server, and the
//! membership reconciler that grows a range to its replication factor.

use openraft::async_runtime::WatchReceiver;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use openraft::{BasicNode, ChangeMembers, Config, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use spheredb_client::limits;
use spheredb_client::proto::raft::raft_transport_server::RaftTransportServer;
use spheredb_client::proto::v1::admin_client::AdminClient;
use spheredb_client::proto::v1::admin_server::AdminServer;
use spheredb_client::proto::v1::kv_server::KvServer;
use spheredb_client::proto::v1::{JoinRequest, RangeDescriptor};
use spheredb_client::ClientError;
use spheredb_raft::group_commit::GroupCommit;
use spheredb_raft::layout::{StateTag, NODE_RECORDS};
use spheredb_raft::log_store::{read_state, write_state, LogStore};
use spheredb_raft::network::{
    PeerChannels, RaftService, RangeRegistry, TransportFaults, MAX_RAFT_MESSAGE_SIZE_BYTES,
};
use spheredb_raft::state_machine::StateMachine;
use spheredb_raft::{registry, Command, NodeId, RaftHandle, RangeId};
use spheredb_storage::{Db, DbOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin_service::AdminService;
use crate::config::NodeConfig;
use crate::kv_service::KvService;

/// The one range of the foundation release: it covers the whole keyspace.
pub const FIRST_RANGE_ID: RangeId = 1;
/// Generation of a range that has never split, merged or changed replicas.
pub const FIRST_GENERATION: u64 = 1;
/// Period of the membership reconciler on the leader.
pub const RECONCILE_INTERVAL_MS: u64 = 300;
/// A learner this close to the leader's last log index is promoted to voter.
pub const PROMOTE_LAG_ENTRIES: u64 = 64;
/// How long a joining node keeps trying to reach the cluster.
pub const JOIN_DEADLINE_MS: u64 = 120_000;
/// Time allowed for one join attempt.
pub const JOIN_ATTEMPT_TIMEOUT_MS: u64 = 5_000;
/// Pause between join attempts.
pub const JOIN_RETRY_PAUSE_MS: u64 = 500;

/// What a node remembers about itself across restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeIdentity {
    node_id: NodeId,
    cluster_id: u64,
    addr: String,
}

/// State shared by the services of a node.
pub struct NodeShared {
    pub node_id: NodeId,
    pub cluster_id: u64,
    pub addr: String,
    pub db: Db,
    pub raft: RaftHandle,
    pub started: Instant,
    pub group_commit: GroupCommit,
}

impl NodeShared {
    /// The descriptor of the node's range as the node sees it.
    pub fn descriptor(&self) -> RangeDescriptor {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership();
        RangeDescriptor {
            range_id: FIRST_RANGE_ID,
            generation: FIRST_GENERATION,
            start_key: Vec::new(),
            end_key: Vec::new(),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
        }
    }

    /// Checks the range named by a request against this node's view.
    pub fn check_range(&self, range_id: u64, generation: u64) -> Result<(), ClientError> {
        if range_id != FIRST_RANGE_ID {
            return Err(ClientError::RangeNotFound(format!(
                "range {range_id} does not exist; call Admin.RangeList for the current ranges"
            )));
        }
        if generation != FIRST_GENERATION {
            return Err(ClientError::StaleGeneration {
                message: format!("range {range_id} is at generation {FIRST_GENERATION}, request named {generation}"),
                descriptors: vec![self.descriptor()],
            });
        }
        Ok(())
    }
}

/// A running node.
pub struct Node {
    shared: Arc<NodeShared>,
    faults: Arc<TransportFaults>,
    ranges: RangeRegistry,
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    reconciler: Option<JoinHandle<()>>,
}

fn raft_config(cfg: &NodeConfig) -> anyhow::Result<Arc<Config>> {
    let config = Config {
        cluster_name: "spheredb".into(),
        heartbeat_interval: cfg.heartbeat_interval_ms,
        election_timeout_min: cfg.election_timeout_ms,
        election_timeout_max: cfg.election_timeout_ms * 2,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_log_threshold),
        max_in_snapshot_log_to_keep: cfg.log_kept_behind_snapshot,
        max_payload_entries: 256,
        install_snapshot_timeout: 60_000,
        ..Default::default()
    };
    Ok(Arc::new(
        config.validate().context("invalid raft configuration")?,
    ))
}

async fn join_cluster(seeds: &[String], addr: &str, token: &[u8]) -> anyhow::Result<(NodeId, u64)> {
    let started = Instant::now();
    let mut targets: Vec<String> = seeds.to_vec();
    let mut attempt = 0usize;
    let mut last_error = String::from("no attempt made");
    while started.elapsed() < Duration::from_millis(JOIN_DEADLINE_MS) {
        let target = targets[attempt % targets.len()].clone();
        attempt += 1;
        let result = async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))?
                .connect_timeout(Duration::from_millis(JOIN_ATTEMPT_TIMEOUT_MS))
                .connect()
                .await?;
            let mut req = tonic::Request::new(JoinRequest {
                addr: addr.to_string(),
                join_token: token.to_vec(),
            });
            req.set_timeout(Duration::from_millis(JOIN_ATTEMPT_TIMEOUT_MS));
            Ok::<_, anyhow::Error>(AdminClient::new(channel).join(req).await)
        }
        .await;
        match result {
            Ok(Ok(resp)) => {
                let resp = resp.into_inner();
                return Ok((resp.node_id, resp.cluster_id));
            }
            Ok(Err(status)) => match ClientError::from_status(&status) {
                ClientError::NotLeader { leader: Some(l) } => {
                    targets.insert(0, l.addr.clone());
                    attempt = 0;
                    last_error = format!("redirected to leader {}", l.addr);
                    continue;
                }
                e @ ClientError::InvalidArgument(_) => bail!("join refused by {target}: {e}"),
                e => last_error = format!("{target}: {e}"),
            },
            Err(e) => last_error = format!("{target}: {e:#}"),
        }
        tracing::info!(%last_error, "join attempt failed; retrying");
        tokio::time::sleep(Duration::from_millis(JOIN_RETRY_PAUSE_MS)).await;
    }
    bail!("could not join the cluster through {seeds:?} within {JOIN_DEADLINE_MS} ms: {last_error}")
}

impl Node {
    /// Opens the data directory, joins or bootstraps the cluster as needed, and starts serving.
    pub async fn start(cfg: NodeConfig) -> anyhow::Result<Node> {
        if cfg.replication_factor == 0 {
            bail!("--replication-factor must be at least 1");
        }
        let db = Db::open(&cfg.data_dir.join("db"), &DbOptions::default())
            .with_context(|| format!("opening the database under {}", cfg.data_dir.display()))?;
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .with_context(|| {
                format!("binding {} (is another node using this port?)", cfg.listen)
            })?;
        let local_addr = listener.local_addr()?;

        let identity: Option<NodeIdentity> = read_state(&db, NODE_RECORDS, StateTag::NodeIdentity)?;
        let advertise = match (&cfg.advertise, &identity) {
            (Some(a), _) => a.clone(),
            (None, Some(id)) if cfg.listen == id.addr || local_addr.to_string() == id.addr => {
                id.addr.clone()
            }
            (None, _) if local_addr.ip().is_unspecified() => {
                bail!("--listen {} binds every interface; give --advertise HOST:PORT so peers can reach this node", cfg.listen)
            }
            (None, _) => local_addr.to_string(),
        };

        let identity = match identity {
            Some(id) => {
                if !cfg.join.is_empty() {
                    tracing::info!(
                        node_id = id.node_id,
                        "data directory already belongs to a cluster; ignoring --join"
                    );
                }
                id
            }
            None if cfg.join.is_empty() => {
                let id = NodeIdentity {
                    node_id: 1,
                    cluster_id: rand::random::<u64>() | 1,
                    addr: advertise.clone(),
                };
                write_state(&db, NODE_RECORDS, StateTag::NodeIdentity, &id, true)?;
                tracing::info!(cluster_id = id.cluster_id, "bootstrapping a new cluster");
                id
            }
            None => {
                let token: Vec<u8> = match read_state(&db, NODE_RECORDS, StateTag::JoinToken)? {
                    Some(t) => t,
                    None => {
                        let t = rand::random::<[u8; 16]>().to_vec();
                        write_state(&db, NODE_RECORDS, StateTag::JoinToken, &t, true)?;
                        t
                    }
                };
                tracing::info!(seeds = ?cfg.join, "joining cluster");
                let (node_id, cluster_id) = join_cluster(&cfg.join, &advertise, &token).await?;
                let id = NodeIdentity {
                    node_id,
                    cluster_id,
                    addr: advertise.clone(),
                };
                write_state(&db, NODE_RECORDS, StateTag::NodeIdentity, &id, true)?;
                tracing::info!(node_id, "joined cluster");
                id
            }
        };
        let node_id = identity.node_id;
        let addr = advertise;

        let group_commit = GroupCommit::start(Arc::new(db.clone()))?;
        let faults = Arc::new(TransportFaults::default());
        // Peer connections leave from the advertised IP (when it is a concrete address) so
        // per-link network rules can tell nodes apart on one host.
        let local_ip = addr
            .parse::<SocketAddr>()
            .ok()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified());
        let peers = PeerChannels::new(node_id, local_ip, faults.clone());
        let log_store = LogStore::new(db.clone(), FIRST_RANGE_ID, group_commit.clone());
        let sm = StateMachine::open(
            db.clone(),
            FIRST_RANGE_ID,
            Vec::new(),
            Vec::new(),
            &cfg.data_dir.join("snapshots"),
        )?;
        let raft = RaftHandle::new(
            node_id,
            raft_config(&cfg)?,
            peers.factory(FIRST_RANGE_ID),
            log_store,
            sm,
        )
        .await
        .map_err(|e| anyhow!("starting raft for range {FIRST_RANGE_ID}: {e}"))?;
        let ranges: RangeRegistry =
            Arc::new(RwLock::new(HashMap::from([(FIRST_RANGE_ID, raft.clone())])));

        let shared = Arc::new(NodeShared {
            node_id,
            cluster_id: identity.cluster_id,
            addr: addr.clone(),
            db,
            raft: raft.clone(),
            started: Instant::now(),
            group_commit,
        });

        let (stop, stop_rx) = watch::channel(false);
        let server = {
            let mut stop_rx = stop_rx.clone();
            let kv = KvServer::new(KvService::new(shared.clone()))
                .max_decoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES)
                .max_encoding_message_size(limits::MAX_GRPC_MESSAGE_SIZE_BYTES);
            let admin = AdminServer::new(AdminService::new(shared.clone()));
            let raft_svc =
                RaftTransportServer::new(RaftService::new(ranges.clone(), faults.clone()))
                    .max_decoding_message_size(MAX_RAFT_MESSAGE_SIZE_BYTES)
                    .max_encoding_message_size(MAX_RAFT_MESSAGE_SIZE_BYTES);
            // A custom incoming stream bypasses the builder's socket options: without
            // TCP_NODELAY here, small responses wait on delayed ACKs (~40 ms tail latency).
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(
                tonic::transport::Server::builder()
                    .tcp_nodelay(true)
                    .add_service(kv)
                    .add_service(admin)
                    .add_service(raft_svc)
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = stop_rx.wait_for(|s| *s).await;
                    }),
            )
        };

        // Node 1 is always the bootstrapping node. Checking the Raft state rather than whether
        // this start created the identity also finishes a bootstrap a crash interrupted.
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| anyhow!("reading raft state: {e}"))?;
        if node_id == 1 && !initialized {
            let members = BTreeMap::from([(node_id, BasicNode { addr: addr.clone() })]);
            raft.initialize(members)
                .await
                .map_err(|e| anyhow!("initialising the cluster: {e}"))?;
        }

        let reconciler = tokio::spawn(reconcile_loop(
            shared.clone(),
            cfg.replication_factor,
            stop_rx,
        ));
        tracing::info!(node_id, %addr, "node serving");
        Ok(Node {
            shared,
            faults,
            ranges,
            local_addr,
            stop,
            server: Some(server),
            reconciler: Some(reconciler),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.shared.node_id
    }

    /// The address the node serves on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address peers and clients use.
    pub fn addr(&self) -> &str {
        &self.shared.addr
    }

    /// The Raft group of the node's range.
    pub fn raft(&self) -> &RaftHandle {
        &self.shared.raft
    }

    /// The node's database.
    pub fn db(&self) -> &Db {
        &self.shared.db
    }

    /// Transport fault injection (partition tests).
    pub fn faults(&self) -> &Arc<TransportFaults> {
        &self.faults
    }

    /// Stops serving, stops Raft, and syncs the WAL.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        if let Some(r) = self.reconciler.take() {
            r.abort();
            let _ = r.await;
        }
        if let Some(s) = self.server.take() {
            match s.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("server ended with an error: {e}"),
                Err(e) => tracing::warn!("server task failed: {e}"),
            }
        }
        let rafts: Vec<RaftHandle> = self
            .ranges
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, r)| r)
            .collect();
        for raft in rafts {
            if let Err(e) = raft.shutdown().await {
                tracing::warn!("raft shutdown: {e}");
            }
        }
        self.shared.group_commit.shutdown();
        self.shared.db.sync_wal()?;
        Ok(())
    }
}

/// On the leader: initialise the registry if a crash interrupted bootstrap, add registered
/// nodes as learners, and promote caught-up learners until the range has enough voters.
/// One membership change at a time.
async fn reconcile_loop(
    shared: Arc<NodeShared>,
    replication_factor: usize,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(Duration::from_millis(RECONCILE_INTERVAL_MS)) => {}
        }
        if let Err(e) = reconcile_once(&shared, replication_factor).await {
            tracing::debug!("membership reconcile: {e:#}");
        }
    }
}

async fn reconcile_once(shared: &NodeShared, replication_factor: usize) -> anyhow::Result<()> {
    if !shared.raft.is_leader() {
        return Ok(());
    }
    if registry::cluster_id(&shared.db)?.is_none() {
        shared
            .raft
            .client_write(Command::InitCluster {
                cluster_id: shared.cluster_id,
                node_id: shared.node_id,
                addr: shared.addr.clone(),
            })
            .await?;
        return Ok(());
    }
    let metrics = shared.raft.metrics().borrow_watched().clone();
    let membership = metrics.membership_config.membership().clone();
    if metrics.membership_config.log_id() != metrics.committed_membership_config.log_id() {
        return Ok(()); // a change is still in flight
    }
    let in_config: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
    for node in registry::nodes(&shared.db)? {
        if !in_config.contains(&node.node_id) {
            tracing::info!(node_id = node.node_id, addr = %node.addr, "adding learner");
            shared
                .raft
                .add_learner(node.node_id, BasicNode { addr: node.addr }, false)
                .await?;
            return Ok(());
        }
    }
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    if voters.len() >= replication_factor {
        return Ok(());
    }
    let last_index = metrics.last_log_index.unwrap_or(0);
    let replication = metrics.replication.unwrap_or_default();
    for learner in membership.learner_ids() {
        let matched = replication
            .get(&learner)
            .and_then(|m| m.as_ref())
            .map_or(0, |l| l.index);
        if matched + PROMOTE_LAG_ENTRIES >= last_index {
            tracing::info!(node_id = learner, "promoting learner to voter");
            shared
                .raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([learner])), true)
                .await?;
            return Ok(());
        }
    }
    Ok(())
}
