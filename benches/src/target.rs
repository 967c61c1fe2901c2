//! The systems under test: starting a local 3-node cluster of each, and one client type that
//! speaks to either.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tonic::transport::Channel;

use crate::etcd::kv_client::KvClient as EtcdKv;
use crate::etcd::maintenance_client::MaintenanceClient;
use crate::etcd::{request_op, PutRequest, RangeRequest, RequestOp, StatusRequest, TxnRequest};
use crate::runner::RunConfig;

/// Longest a cluster may take to come up.
pub const CLUSTER_STARTUP_DEADLINE_MS: u64 = 60_000;
/// Keys per write during preload (etcd's default `--max-txn-ops` is 128).
pub const PRELOAD_CHUNK_KEYS: usize = 128;
/// Sphere the benchmark writes into.
pub const BENCH_SPHERE: u64 = 1;

/// A system the benchmark can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum System {
    /// SphereDB with its defaults: ranges split under load (see `range_count` in results).
    #[serde(rename = "spheredb")]
    Spheredb,
    /// SphereDB kept to one range (load-based splits off), one Raft group like etcd's.
    #[value(name = "spheredb-1range")]
    #[serde(rename = "spheredb-1range")]
    SpheredbOneRange,
    /// etcd through a client balanced over every member, as etcd's own clients do: a
    /// linearizable read at a follower pays a ReadIndex hop to the leader.
    #[serde(rename = "etcd")]
    Etcd,
    /// etcd through its leader only, as SphereDB's client goes to each range's leader.
    #[value(name = "etcd-leader")]
    #[serde(rename = "etcd-leader")]
    EtcdLeader,
}

impl System {
    pub fn is_spheredb(self) -> bool {
        matches!(self, System::Spheredb | System::SpheredbOneRange)
    }
}

impl std::fmt::Display for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            System::Spheredb => "spheredb",
            System::SpheredbOneRange => "spheredb-1range",
            System::Etcd => "etcd",
            System::EtcdLeader => "etcd-leader",
        })
    }
}

/// `--range-split-qps` and `--range-split-size-bytes` no benchmark reaches: keep
/// `spheredb-1range` in one range.
const NEVER_SPLIT_QPS: &str = "1000000000";
const NEVER_SPLIT_SIZE_BYTES: &str = "1099511627776";

/// Read consistency requested of the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum ReadConsistency {
    /// SphereDB ReadIndex; etcd's default linearizable read.
    Linearizable,
    /// SphereDB leader lease; etcd has none and reads linearizably.
    Lease,
    /// etcd serializable (any member); SphereDB does not serve follower reads yet.
    Follower,
}

/// A cluster of local processes, killed on drop.
pub struct Cluster {
    pub system: System,
    pub endpoints: Vec<String>,
    /// SphereDB's SQL (PostgreSQL protocol) addresses, one per node; empty for etcd.
    pub sql_endpoints: Vec<String>,
    children: Vec<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Cluster {
    /// A cluster someone else runs, reached at `endpoints`.
    pub fn existing(system: System, endpoints: Vec<String>) -> Cluster {
        Cluster {
            system,
            endpoints,
            sql_endpoints: Vec::new(),
            children: Vec::new(),
            _dir: None,
        }
    }

    /// Process ids of the members, for CPU accounting.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<(Stdio, Stdio)> {
    let f = std::fs::File::create(dir.join(name))?;
    Ok((Stdio::from(f.try_clone()?), Stdio::from(f)))
}

async fn wait_until<F, Fut>(what: &str, mut ready: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(CLUSTER_STARTUP_DEADLINE_MS) {
        if ready().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what} did not come up within {CLUSTER_STARTUP_DEADLINE_MS} ms")
}

async fn spheredb_voters(addr: &str) -> usize {
    let Ok(client) = spheredb_client::Client::connect(&[addr], Default::default()).await else {
        return 0;
    };
    let Ok(status) = client.status(addr, false).await else {
        return 0;
    };
    // The fewest voters of any range the node holds; a range without a leader counts as 0.
    status
        .ranges
        .iter()
        .map(|r| {
            r.descriptor
                .as_ref()
                .filter(|_| r.leader_id.is_some())
                .map_or(0, |d| d.voters.len())
        })
        .min()
        .unwrap_or(0)
}

/// Starts a fresh 3-node SphereDB cluster of `system` from `bin`.
pub async fn start_spheredb(bin: &Path, nodes: usize, system: System) -> anyhow::Result<Cluster> {
    let dir = tempfile::Builder::new()
        .prefix("spheredb-bench-")
        .tempdir()?;
    let mut cluster = Cluster {
        system,
        endpoints: Vec::new(),
        sql_endpoints: Vec::new(),
        children: Vec::new(),
        _dir: Some(dir),
    };
    let dir = cluster
        ._dir
        .as_ref()
        .map(|d| d.path().to_path_buf())
        .unwrap_or_default();
    for i in 0..nodes {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let sql_addr = format!("127.0.0.1:{}", free_port()?);
        let (out, err) = log_file(&dir, &format!("node{i}.log"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("start")
            .arg("--data-dir")
            .arg(dir.join(format!("node{i}")))
            .arg("--listen")
            .arg(&addr)
            .arg("--sql-listen")
            .arg(&sql_addr)
            .arg("--replication-factor")
            .arg(nodes.min(3).to_string())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if i > 0 {
            cmd.arg("--join").arg(&cluster.endpoints[0]);
        }
        if system == System::SpheredbOneRange {
            cmd.arg("--range-split-qps")
                .arg(NEVER_SPLIT_QPS)
                .arg("--range-split-size-bytes")
                .arg(NEVER_SPLIT_SIZE_BYTES);
        }
        cluster.children.push(
            cmd.spawn()
                .with_context(|| format!("starting {}", bin.display()))?,
        );
        cluster.endpoints.push(addr);
        cluster.sql_endpoints.push(sql_addr);
        let (first, want) = (cluster.endpoints[0].clone(), i + 1);
        wait_until("spheredb", || async {
            spheredb_voters(&first).await >= want.min(3)
        })
        .await?;
    }
    Ok(cluster)
}

/// Starts a fresh 3-member etcd cluster from `bin` (fsync on, as etcd always does), reached
/// as `system` says.
pub async fn start_etcd(bin: &Path, members: usize, system: System) -> anyhow::Result<Cluster> {
    let dir = tempfile::Builder::new().prefix("etcd-bench-").tempdir()?;
    let mut peers = Vec::new();
    let mut clients = Vec::new();
    for i in 0..members {
        peers.push((
            format!("m{i}"),
            format!("http://127.0.0.1:{}", free_port()?),
        ));
        clients.push(format!("127.0.0.1:{}", free_port()?));
    }
    let initial: Vec<String> = peers.iter().map(|(n, u)| format!("{n}={u}")).collect();
    let mut children = Vec::new();
    for (i, (name, peer)) in peers.iter().enumerate() {
        let (out, err) = log_file(dir.path(), &format!("{name}.log"))?;
        let client_url = format!("http://{}", clients[i]);
        let child = Command::new(bin)
            .args(["--name", name])
            .arg("--data-dir")
            .arg(dir.path().join(name))
            .args([
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
            ])
            .args([
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
            ])
            .args([
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-state",
                "new",
            ])
            .args([
                "--initial-cluster-token",
                "spheredb-bench",
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (install it with: apt-get install -y etcd-server)",
                    bin.display()
                )
            })?;
        children.push(child);
    }
    let cluster = Cluster {
        system,
        endpoints: clients,
        sql_endpoints: Vec::new(),
        children,
        _dir: Some(dir),
    };
    let eps = cluster.endpoints.clone();
    wait_until("etcd", || async {
        match etcd_connect(&eps, 1).await {
            Ok(kv) => kv
                .next()
                .put(PutRequest {
                    key: b"bench-ready".to_vec(),
                    value: b"1".to_vec(),
                    lease: 0,
                })
                .await
                .is_ok(),
            Err(_) => false,
        }
    })
    .await?;
    Ok(cluster)
}

/// `connections` etcd connections, each balanced over every member, as etcd's own clients
/// do.
async fn etcd_connect(endpoints: &[String], connections: usize) -> anyhow::Result<EtcdPool> {
    let mut pool = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        let endpoints = endpoints
            .iter()
            .map(|e| Channel::from_shared(format!("http://{e}")).map(|c| c.tcp_nodelay(true)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut kv = EtcdKv::new(Channel::balance_list(endpoints.into_iter()));
        kv.range(RangeRequest {
            key: b"bench-probe".to_vec(),
            serializable: true,
            ..Default::default()
        })
        .await?;
        pool.push(kv);
    }
    Ok(EtcdPool {
        pool: Arc::new(pool),
        next: Arc::new(AtomicUsize::new(0)),
    })
}

/// etcd connections that successive calls take in turn, as the SphereDB client takes its
/// connections to a node.
#[derive(Clone)]
pub struct EtcdPool {
    pool: Arc<Vec<EtcdKv<Channel>>>,
    next: Arc<AtomicUsize>,
}

impl EtcdPool {
    pub fn next(&self) -> EtcdKv<Channel> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        self.pool[turn % self.pool.len()].clone()
    }
}

/// The client endpoint of the member that leads, as the members report it.
async fn etcd_leader(endpoints: &[String]) -> anyhow::Result<String> {
    let mut leader_id = None;
    let mut members = Vec::new();
    for e in endpoints {
        let channel = Channel::from_shared(format!("http://{e}"))?
            .connect()
            .await?;
        let status = MaintenanceClient::new(channel)
            .status(StatusRequest {})
            .await?
            .into_inner();
        let me = status.header.map_or(0, |h| h.member_id);
        members.push((me, e.clone()));
        leader_id = leader_id.or(Some(status.leader).filter(|l| *l != 0));
    }
    let leader = leader_id.context("no etcd member names a leader")?;
    members
        .into_iter()
        .find(|(id, _)| *id == leader)
        .map(|(_, e)| e)
        .with_context(|| format!("the leader {leader:x} is not among {endpoints:?}"))
}

/// Ranges of a SphereDB cluster holding user data (all but the meta range).
pub async fn spheredb_user_ranges(endpoints: &[String]) -> anyhow::Result<usize> {
    let client = spheredb_client::Client::connect(endpoints, Default::default()).await?;
    let list = client.range_list().await?;
    Ok(list.ranges.iter().filter(|r| r.range_id != 1).count())
}

/// A client of either system.
#[derive(Clone)]
pub enum Conn {
    Spheredb(spheredb_client::Client),
    Etcd(EtcdPool, ReadConsistency),
}

impl Conn {
    /// Connects to `cluster` with the read consistency and connections of `cfg`.
    pub async fn connect(cluster: &Cluster, cfg: &RunConfig) -> anyhow::Result<Conn> {
        let consistency = cfg.consistency;
        match cluster.system {
            System::Spheredb | System::SpheredbOneRange => {
                let consistency = match consistency {
                    ReadConsistency::Linearizable => spheredb_client::Consistency::Linearizable,
                    ReadConsistency::Lease => spheredb_client::Consistency::Lease,
                    ReadConsistency::Follower => {
                        bail!("SphereDB does not serve follower reads yet")
                    }
                };
                let options = spheredb_client::ClientOptions {
                    consistency,
                    connections_per_node: cfg.connections,
                    ..Default::default()
                };
                Ok(Conn::Spheredb(
                    spheredb_client::Client::connect(&cluster.endpoints, options).await?,
                ))
            }
            System::Etcd => Ok(Conn::Etcd(
                etcd_connect(&cluster.endpoints, cfg.connections).await?,
                consistency,
            )),
            System::EtcdLeader => {
                let leader = etcd_leader(&cluster.endpoints).await?;
                Ok(Conn::Etcd(
                    etcd_connect(&[leader], cfg.connections).await?,
                    consistency,
                ))
            }
        }
    }

    /// Reads `key`.
    pub async fn get(&mut self, key: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
        match self {
            Conn::Spheredb(c) => Ok(c.get(BENCH_SPHERE, key).await?),
            Conn::Etcd(kv, consistency) => {
                let resp = kv
                    .next()
                    .range(RangeRequest {
                        key: key.to_vec(),
                        serializable: *consistency == ReadConsistency::Follower,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                Ok(resp.kvs.into_iter().next().map(|kv| kv.value))
            }
        }
    }

    /// Writes `key = value`.
    pub async fn put(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        match self {
            Conn::Spheredb(c) => Ok(c.put(BENCH_SPHERE, key, value).await?),
            Conn::Etcd(kv, _) => {
                kv.next()
                    .put(PutRequest {
                        key: key.to_vec(),
                        value: value.to_vec(),
                        lease: 0,
                    })
                    .await?;
                Ok(())
            }
        }
    }

    /// Writes `pairs` in chunks of [`PRELOAD_CHUNK_KEYS`].
    pub async fn preload(&mut self, pairs: Vec<(Vec<u8>, Vec<u8>)>) -> anyhow::Result<()> {
        for chunk in pairs.chunks(PRELOAD_CHUNK_KEYS) {
            match self {
                Conn::Spheredb(c) => {
                    let ops: Vec<(Vec<u8>, Option<Vec<u8>>)> = chunk
                        .iter()
                        .map(|(k, v)| (k.clone(), Some(v.clone())))
                        .collect();
                    c.batch(BENCH_SPHERE, &ops).await?;
                }
                Conn::Etcd(kv, _) => {
                    let success = chunk
                        .iter()
                        .map(|(k, v)| RequestOp {
                            request: Some(request_op::Request::RequestPut(PutRequest {
                                key: k.clone(),
                                value: v.clone(),
                                lease: 0,
                            })),
                        })
                        .collect();
                    kv.next()
                        .txn(TxnRequest {
                            success,
                            failure: vec![],
                        })
                        .await?;
                }
            }
        }
        Ok(())
    }
}

/// Finds the `spheredb` binary next to this one, or says how to build it.
pub fn default_spheredb_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("spheredb")))
        .unwrap_or_else(|| PathBuf::from("spheredb"))
}
