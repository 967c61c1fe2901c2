//! Helpers for multi-node tests: real `spheredb` processes on loopback, and polling with
//! generous deadlines (tests never assert timings).
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use spheredb_client::proto::v1::{RangeStatus, StatusResponse};
use spheredb_client::{Client, ClientOptions};

/// Generous liveness deadline for anything a test waits on.
pub const LIVENESS_DEADLINE_MS: u64 = 60_000;

/// Polls `check` until it returns `Some` or the liveness deadline passes.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            started.elapsed() < Duration::from_millis(LIVENESS_DEADLINE_MS),
            "timed out after {LIVENESS_DEADLINE_MS} ms waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The range a new cluster keeps user data in until it splits.
pub const USER_RANGE: u64 = spheredb_engine::ids::FIRST_USER_RANGE_ID;

/// The status of range `range_id` in a node's status.
pub fn range(s: &StatusResponse, range_id: u64) -> Option<&RangeStatus> {
    s.ranges.iter().find(|r| {
        r.descriptor
            .as_ref()
            .is_some_and(|d| d.range_id == range_id)
    })
}

/// True when every range in the cluster's map has at least `want` voters and a known leader.
pub async fn fully_replicated(client: &Client, want: usize) -> bool {
    match client.range_list().await {
        Ok(list) => list.ranges.iter().all(|d| {
            d.voters.len() >= want
                && d.learners.is_empty()
                && list
                    .loads
                    .iter()
                    .any(|l| l.range_id == d.range_id && l.leader_node_id.is_some())
        }),
        Err(_) => false,
    }
}

/// Counters (splits, merges, replicas added/removed, leader transfers, WAL syncs) of every
/// live node.
pub async fn node_counters(cluster: &ProcCluster) -> Vec<(String, HashMap<String, u64>)> {
    let mut out = Vec::new();
    for p in cluster.procs.iter().filter(|p| p.child.is_some()) {
        if let Some(s) = status(&p.addr, false).await {
            out.push((p.addr.clone(), s.counters));
        }
    }
    out
}

/// Placement actions (splits, merges, replica and leader moves) the live nodes have made
/// since they started (each wakes the ranges it touches), once every live node answers.
pub async fn placement_actions(cluster: &ProcCluster) -> u64 {
    let live = cluster.procs.iter().filter(|p| p.child.is_some()).count();
    eventually("every live node to report its counters", || async {
        let counters = node_counters(cluster).await;
        (counters.len() == live).then(|| {
            counters
                .iter()
                .flat_map(|(_, counters)| counters.iter())
                .filter(|(name, _)| !name.starts_with("wal_"))
                .map(|(_, n)| n)
                .sum()
        })
    })
    .await
}

/// A loopback port nobody is listening on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Status of the node at `addr`, if it answers.
pub async fn status(addr: &str, digest: bool) -> Option<StatusResponse> {
    let options = ClientOptions {
        call_deadline_ms: 2_000,
        connections_per_node: 1,
        ..Default::default()
    };
    let client = Client::connect(&[addr], options).await.ok()?;
    client.status(addr, digest).await.ok()
}

/// One `spheredb start` process.
pub struct Proc {
    pub data_dir: PathBuf,
    pub addr: String,
    /// Where it serves SQL (PostgreSQL protocol), unless the test's arguments say otherwise.
    pub sql_addr: String,
    pub child: Option<Child>,
    /// Environment variables the process starts with (e.g. FAILPOINTS).
    pub env: Vec<(String, String)>,
    extra_args: Vec<String>,
    log: PathBuf,
}

/// A cluster of real processes in a temporary directory. Every process is killed on drop.
pub struct ProcCluster {
    pub dir: tempfile::TempDir,
    pub procs: Vec<Proc>,
}

impl ProcCluster {
    /// Starts one more node that joins through the first; returns its index.
    pub fn add_node(&mut self, extra_args: &[&str]) -> usize {
        let i = self.procs.len();
        let addr = format!("127.0.0.1:{}", free_port());
        let data_dir = self.dir.path().join(format!("node{}", i + 1));
        let log = self.dir.path().join(format!("node{}.log", i + 1));
        let mut args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let sql_addr = format!("127.0.0.1:{}", free_port());
        if !extra_args.contains(&"--sql-listen") {
            args.push("--sql-listen".into());
            args.push(sql_addr.clone());
        }
        if i > 0 {
            args.push("--join".into());
            args.push(self.procs[0].addr.clone());
        }
        let mut p = Proc {
            data_dir,
            addr,
            sql_addr,
            child: None,
            env: Vec::new(),
            extra_args: args,
            log,
        };
        p.spawn();
        self.procs.push(p);
        i
    }

    /// Starts `n` nodes: the first bootstraps, the rest join it. Waits for `n.min(3)` voters.
    pub async fn start(n: usize, extra_args: &[&str]) -> ProcCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = ProcCluster {
            dir,
            procs: Vec::new(),
        };
        for i in 0..n {
            cluster.add_node(extra_args);
            if i == 0 {
                let a = cluster.procs[0].addr.clone();
                eventually("the first node to lead", || async {
                    range(&status(&a, false).await?, USER_RANGE)?.leader_id
                })
                .await;
            }
        }
        let want = n.min(3);
        let client = cluster.client().await;
        eventually("every range to reach its replication factor", || async {
            fully_replicated(&client, want).await.then_some(())
        })
        .await;
        cluster
    }

    /// Every node address.
    pub fn addrs(&self) -> Vec<String> {
        self.procs.iter().map(|p| p.addr.clone()).collect()
    }

    /// Index of the node leading the first user range.
    pub async fn leader(&self) -> usize {
        self.leader_of(USER_RANGE).await
    }

    /// Index of the running node leading `range_id`.
    pub async fn leader_of(&self, range_id: u64) -> usize {
        let addrs = self.addrs();
        eventually("a leader", || async {
            for a in &addrs {
                if let Some(s) = status(a, false).await {
                    if let Some(l) = range(&s, range_id).and_then(|r| r.leader_id) {
                        let leader_addr = s.nodes.iter().find(|n| n.node_id == l)?.addr.clone();
                        let idx = addrs.iter().position(|x| *x == leader_addr)?;
                        if self.procs[idx].child.is_some() {
                            return Some(idx);
                        }
                    }
                }
            }
            None
        })
        .await
    }

    /// A client with every node as a seed.
    pub async fn client(&self) -> Client {
        let addrs = self.addrs();
        eventually("a client connection", || async {
            Client::connect(&addrs, ClientOptions::default()).await.ok()
        })
        .await
    }

    /// Contents of node `i`'s log, for failure messages.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.procs[i].log).unwrap_or_default()
    }
}

impl Proc {
    /// Starts (or restarts) the process with its data dir and listen address.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_spheredb"))
            .arg("start")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(&self.addr)
            .args(&self.extra_args)
            .env(
                "SPHEREDB_LOG",
                std::env::var("SPHEREDB_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning spheredb");
        self.child = Some(child);
    }

    /// Restarts with only --data-dir and --listen (as an operator would after a crash).
    pub fn restart_plain(&mut self) {
        self.extra_args.clear();
        self.spawn();
    }

    /// CPU time (user + system) the process has used so far, in clock ticks.
    pub fn cpu_ticks(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        for (i, p) in self.procs.iter_mut().enumerate() {
            // A node that exited by itself is worth knowing about in a failure report.
            if let Some(Ok(Some(status))) = p.child.as_mut().map(|c| c.try_wait()) {
                eprintln!(
                    "node {} (process {i}) had exited by itself: {status}",
                    p.addr
                );
                p.child = None;
            }
            p.kill9();
        }
        if std::thread::panicking() || std::env::var_os("SPHEREDB_TEST_KEEP").is_some() {
            // Keep the nodes' logs and data of a failed test.
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()).keep();
            eprintln!("node logs kept in {}", kept.display());
        }
    }
}

/// Configuration of in-process node `name` under `dir`, on a free loopback port, with fast
/// elections; joining `join` when given.
pub fn in_process_config(
    dir: &std::path::Path,
    name: &str,
    join: Option<&str>,
    rf: usize,
) -> spheredb_engine::NodeConfig {
    let mut c = spheredb_engine::NodeConfig::new(dir.join(name));
    c.listen = "127.0.0.1:0".into();
    c.join = join.map(|j| vec![j.to_string()]).unwrap_or_default();
    c.replication_factor = rf;
    c.heartbeat_interval_ms = 50;
    c.election_timeout_ms = 300;
    c
}

/// Three in-process nodes whose configuration `tweak` adjusts, once every range has three
/// voters and a leader on every node.
pub async fn three_nodes_with(
    dir: &std::path::Path,
    tweak: fn(&mut spheredb_engine::NodeConfig),
) -> Vec<spheredb_engine::Node> {
    use openraft::async_runtime::WatchReceiver;
    let start = |name: &str, join: Option<&str>| {
        let mut c = in_process_config(dir, name, join, 3);
        tweak(&mut c);
        spheredb_engine::Node::start(c)
    };
    let first = start("n1", None).await.unwrap();
    let seed = first.addr().to_string();
    let second = start("n2", Some(&seed)).await.unwrap();
    let third = start("n3", Some(&seed)).await.unwrap();
    let nodes = vec![first, second, third];
    eventually("three voters in every range on every node", || async {
        nodes
            .iter()
            .all(|n| {
                [spheredb_engine::ids::META_RANGE_ID, USER_RANGE]
                    .iter()
                    .all(|r| {
                        n.raft(*r).is_some_and(|raft| {
                            let m = raft.metrics().borrow_watched().clone();
                            m.membership_config.membership().voter_ids().count() == 3
                                && m.current_leader.is_some()
                        })
                    })
            })
            .then_some(())
    })
    .await;
    nodes
}
