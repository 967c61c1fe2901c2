//! A cluster of real `spheredb start` processes, each on its own loopback IP (127.0.0.11,
//! 127.0.0.12, ...) so per-link firewall rules can cut single links, in fresh data
//! directories under the run folder. Every process is killed when the [`Cluster`] is
//! dropped, also on a panic or an aborted run.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use spheredb_client::proto::v1::StatusResponse;
use spheredb_client::{Client, ClientOptions};
use tokio::task::JoinSet;

/// Longest the cluster may take to form (first leader, every node a voter).
pub const CLUSTER_START_TIMEOUT_MS: u64 = 60_000;
/// Time budget of one status call; a paused or cut-off node does not answer.
pub const STATUS_DEADLINE_MS: u64 = 1_000;
/// Pause between two polls of the cluster state.
const POLL_INTERVAL_MS: u64 = 100;
/// Text a node built with the `failpoints` feature logs when FAILPOINTS is set.
const FAILPOINTS_LOG_MARKER: &str = "failpoints active";
/// Longest a node may take to log that its failpoints are active.
const FAILPOINTS_LOG_TIMEOUT_MS: u64 = 10_000;
/// Node log filter: enough to see elections and restarts, not every request.
const NODE_LOG_FILTER: &str = "info,openraft=warn";

/// Why the cluster could not be started or controlled.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "{}: spheredb binary not found; build it first with `cargo build --bin spheredb` \
         (for --failpoints: `cargo build -p spheredb-engine --features failpoints --bin spheredb`)",
        path.display()
    )]
    MissingBinary { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot start node {node}: {source}")]
    Spawn { node: String, source: io::Error },
    #[error("no free port on {ip}: {source}")]
    NoPort { ip: Ipv4Addr, source: io::Error },
    #[error("timed out after {timeout_ms} ms waiting for {what}; node logs are in {}", dir.display())]
    Timeout {
        what: String,
        timeout_ms: u64,
        dir: PathBuf,
    },
    #[error(
        "failpoints were requested (--failpoints, or the slow-apply nemesis) but node {node} \
         does not log {FAILPOINTS_LOG_MARKER:?}: the binary was built without the \
         `failpoints` feature; rebuild it with `cargo build --workspace` or \
         `cargo build -p spheredb-engine --features failpoints --bin spheredb`"
    )]
    FailpointsMissing { node: String },
}

/// How to run the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The `spheredb` binary.
    pub bin: PathBuf,
    pub nodes: usize,
    /// IP of the first node; the others follow it.
    pub first_ip: Ipv4Addr,
    /// Folder for data directories and logs.
    pub dir: PathBuf,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_ms: u64,
    /// `--snapshot-log-threshold` of every node.
    pub snapshot_log_threshold: u64,
    /// `--log-kept-behind-snapshot` of every node.
    pub log_kept_behind_snapshot: u64,
    /// FAILPOINTS value for every node, e.g. `kv-read-skip-barrier=return`.
    pub failpoints: Option<String>,
    /// libfaketime to preload, for the clock nemesis.
    pub faketime_lib: Option<PathBuf>,
    /// Skew the monotonic clock too (see [`Cluster::spawn`]).
    pub fake_monotonic: bool,
    /// Rate of each node's clocks relative to real time (libfaketime's `x` factor; empty:
    /// real time). Needs `fake_monotonic` to reach the nodes' timers.
    pub clock_rates: Vec<f64>,
}

/// One node: its fixed identity and its current process.
#[derive(Debug)]
pub struct Node {
    /// `n1`, `n2`, ...
    pub name: String,
    pub ip: Ipv4Addr,
    /// `ip:port`, also what the node advertises.
    pub addr: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// libfaketime's timestamp file (clock offset), when the clock nemesis is on.
    pub clock_file: Option<PathBuf>,
    child: Option<Child>,
    paused: bool,
}

/// A process that exited without the tester killing it.
#[derive(Debug, Clone)]
pub struct UnexpectedExit {
    pub node: String,
    pub status: String,
}

/// The processes of a cluster. Not shared across awaits: queries go through [`StatusView`].
#[derive(Debug)]
pub struct Cluster {
    cfg: ClusterConfig,
    nodes: Vec<Node>,
    unexpected_exits: Vec<UnexpectedExit>,
}

/// A loopback port free right now on `ip`.
fn free_port(ip: Ipv4Addr) -> Result<u16, ClusterError> {
    let listener = TcpListener::bind(SocketAddrV4::new(ip, 0))
        .map_err(|source| ClusterError::NoPort { ip, source })?;
    let port = listener
        .local_addr()
        .map_err(|source| ClusterError::NoPort { ip, source })?
        .port();
    Ok(port)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Cluster {
    /// Lays out the nodes (addresses, folders) without starting anything.
    pub fn new(cfg: ClusterConfig) -> Result<Cluster, ClusterError> {
        if !cfg.bin.is_file() {
            return Err(ClusterError::MissingBinary {
                path: cfg.bin.clone(),
            });
        }
        let first = u32::from(cfg.first_ip);
        let mut nodes = Vec::with_capacity(cfg.nodes);
        for i in 0..cfg.nodes {
            let name = format!("n{}", i + 1);
            let ip = Ipv4Addr::from(first.saturating_add(i as u32));
            if !ip.is_loopback() {
                return Err(ClusterError::Io {
                    path: cfg.dir.clone(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("node address {ip} is outside 127.0.0.0/8"),
                    ),
                });
            }
            let port = free_port(ip)?;
            let node_dir = cfg.dir.join("nodes").join(&name);
            std::fs::create_dir_all(&node_dir).map_err(io_err(&node_dir))?;
            let clock_file = match &cfg.faketime_lib {
                Some(_) => {
                    let path = node_dir.join("faketime");
                    let rate = cfg.clock_rates.get(i).copied().unwrap_or(1.0);
                    write_clock_offset(&path, 0, rate).map_err(io_err(&path))?;
                    Some(path)
                }
                None => None,
            };
            nodes.push(Node {
                addr: format!("{ip}:{port}"),
                name: name.clone(),
                ip,
                data_dir: node_dir.join("data"),
                log_path: cfg.dir.join("nodes").join(format!("{name}.log")),
                clock_file,
                child: None,
                paused: false,
            });
        }
        Ok(Cluster {
            cfg,
            nodes,
            unexpected_exits: Vec::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    pub fn names(&self, indices: &[usize]) -> Vec<String> {
        indices
            .iter()
            .filter_map(|&i| self.nodes.get(i).map(|n| n.name.clone()))
            .collect()
    }

    /// Starts node `i` (bootstrapping when it is the first and has no data, joining node 1
    /// when `join` is set, otherwise restarting from its data directory).
    pub fn spawn(&mut self, i: usize, join: bool) -> Result<(), ClusterError> {
        let seed = self.nodes[0].addr.clone();
        let node = &mut self.nodes[i];
        if node.child.is_some() {
            return Ok(());
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .map_err(io_err(&node.log_path))?;
        let log_err: File = log.try_clone().map_err(io_err(&node.log_path))?;
        let mut cmd = Command::new(&self.cfg.bin);
        cmd.arg("start")
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--listen")
            .arg(&node.addr)
            .arg("--heartbeat-interval-ms")
            .arg(self.cfg.heartbeat_interval_ms.to_string())
            .arg("--election-timeout-ms")
            .arg(self.cfg.election_timeout_ms.to_string())
            .arg("--replication-factor")
            .arg(self.cfg.nodes.to_string())
            .arg("--snapshot-log-threshold")
            .arg(self.cfg.snapshot_log_threshold.to_string())
            .arg("--log-kept-behind-snapshot")
            .arg(self.cfg.log_kept_behind_snapshot.to_string());
        if join {
            cmd.arg("--join").arg(&seed);
        }
        cmd.env("SPHEREDB_LOG", NODE_LOG_FILTER)
            // Settings from the tester's environment must not leak into the nodes.
            .env_remove("SPHEREDB_JOIN")
            .env_remove("SPHEREDB_ADVERTISE")
            .env_remove("FAILPOINTS")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Own process group: a terminal's Ctrl-C reaches the tester only, which then
            // stops every node itself (paused ones too).
            .process_group(0);
        if let Some(spec) = &self.cfg.failpoints {
            cmd.env("FAILPOINTS", spec);
        }
        let rate = self.cfg.clock_rates.get(i).copied();
        if let (Some(lib), Some(rate)) = (&self.cfg.faketime_lib, rate) {
            // A fixed rate for the process's life, from its start: given in the environment,
            // parsed once (a timestamp file without cache would be re-read on every clock
            // call, tokio's frequent ones included). Both clocks are faked, so timers and
            // timeouts follow the rate.
            cmd.env("LD_PRELOAD", lib)
                .env("FAKETIME", format!("+0 x{rate:.6}"));
        } else if let (Some(lib), Some(clock)) = (&self.cfg.faketime_lib, &node.clock_file) {
            // libfaketime re-reads the offset file on every clock call (no cache), so
            // rewriting the file moves this node's clock at once.
            cmd.env("LD_PRELOAD", lib)
                .env("FAKETIME_TIMESTAMP_FILE", clock)
                .env("FAKETIME_NO_CACHE", "1");
            // By default only the wall clock is skewed, as on a machine whose clock is off:
            // CLOCK_MONOTONIC never jumps back on Linux. A faked backward jump trips
            // openraft's debug assertion that time never decreases (utime.rs), which stops
            // the node's Raft core; `fake_monotonic` asks for exactly that.
            if !self.cfg.fake_monotonic {
                cmd.env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
            }
        }
        let child = cmd.spawn().map_err(|source| ClusterError::Spawn {
            node: node.name.clone(),
            source,
        })?;
        node.child = Some(child);
        node.paused = false;
        Ok(())
    }

    /// Restarts node `i` from its data directory if it is not running.
    pub fn restart(&mut self, i: usize) -> Result<(), ClusterError> {
        self.spawn(i, false)
    }

    /// `kill -9` of node `i`, waiting for it to exit.
    pub fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(mut child) = node.child.take() {
            // SIGKILL also ends a stopped process.
            let _ = child.kill();
            let _ = child.wait();
        }
        node.paused = false;
    }

    /// SIGSTOP of node `i`.
    pub fn pause(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(child) = &node.child {
            if send_signal(child, libc::SIGSTOP) {
                node.paused = true;
            }
        }
    }

    /// SIGCONT of node `i`.
    pub fn resume(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(child) = &node.child {
            send_signal(child, libc::SIGCONT);
        }
        node.paused = false;
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    pub fn is_paused(&self, i: usize) -> bool {
        self.nodes[i].paused
    }

    /// Nodes that run and are not paused: the ones that can answer.
    pub fn responsive(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.is_running(i) && !self.is_paused(i))
            .collect()
    }

    /// Notices processes that exited on their own (a crash is a finding), forgetting them
    /// so a heal restarts them.
    pub fn reap(&mut self) -> Vec<UnexpectedExit> {
        let mut found = Vec::new();
        for node in &mut self.nodes {
            let exited: Option<ExitStatus> = node
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                node.child = None;
                node.paused = false;
                found.push(UnexpectedExit {
                    node: node.name.clone(),
                    status: status.to_string(),
                });
            }
        }
        self.unexpected_exits.extend(found.iter().cloned());
        found
    }

    /// Every process exit the tester did not cause, so far.
    pub fn unexpected_exits(&self) -> &[UnexpectedExit] {
        &self.unexpected_exits
    }

    /// Sets node `i`'s clock offset (only with libfaketime).
    pub fn set_clock_offset(&self, i: usize, offset_secs: i64) -> Result<(), ClusterError> {
        match &self.nodes[i].clock_file {
            Some(path) => {
                let rate = self.cfg.clock_rates.get(i).copied().unwrap_or(1.0);
                write_clock_offset(path, offset_secs, rate).map_err(io_err(path))
            }
            None => Ok(()),
        }
    }

    /// Kills every process (resuming paused ones is not needed: SIGKILL ends them).
    pub fn stop_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }

    /// Removes the data directories (logs stay).
    pub fn remove_data(&self) {
        for node in &self.nodes {
            let _ = std::fs::remove_dir_all(&node.data_dir);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn send_signal(child: &Child, signal: libc::c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return false;
    };
    // SAFETY: kill(2) with a pid we spawned and have not reaped; no memory is involved.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// Writes a libfaketime offset ("+5" seconds ahead, "-5" behind) and rate ("x1.01": clocks
/// run 1 % fast, measured from the process's start) atomically, so the node never reads a
/// half-written file.
fn write_clock_offset(path: &Path, offset_secs: i64, rate: f64) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let text = if rate == 1.0 {
        format!("{offset_secs:+}\n")
    } else {
        format!("{offset_secs:+} x{rate:.6}\n")
    };
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Cluster state as the nodes report it, through one shared status client.
#[derive(Clone)]
pub struct StatusView {
    client: Client,
    addrs: Vec<String>,
}

/// The range a fresh cluster keeps all user data in (the tester's workloads stay far below
/// the split threshold, so it never splits).
pub const USER_RANGE_ID: u64 = 2;

/// The status of the user range in a node's status.
fn user_range(s: &StatusResponse) -> Option<&spheredb_client::proto::v1::RangeStatus> {
    s.ranges.iter().find(|r| {
        r.descriptor
            .as_ref()
            .is_some_and(|d| d.range_id == USER_RANGE_ID)
    })
}

/// What the nodes said about leadership.
#[derive(Debug, Clone, Default)]
pub struct LeaderView {
    /// Index of the leader named by the answer with the highest term.
    pub leader: Option<usize>,
    /// Voters in that answer's range descriptor.
    pub voters: usize,
    /// Nodes that answered.
    pub answered: Vec<usize>,
    /// Whether every answer names the same leader.
    pub agreed: bool,
}

impl StatusView {
    /// Connects the status client through any node of `addrs`.
    pub async fn connect(addrs: Vec<String>) -> Option<StatusView> {
        let options = ClientOptions {
            call_deadline_ms: STATUS_DEADLINE_MS,
            ..ClientOptions::default()
        };
        let connect = Client::connect(&addrs, options);
        let client = tokio::time::timeout(Duration::from_millis(STATUS_DEADLINE_MS * 3), connect)
            .await
            .ok()?
            .ok()?;
        Some(StatusView { client, addrs })
    }

    async fn status(&self, i: usize) -> Option<StatusResponse> {
        let addr = self.addrs.get(i)?;
        let call = self.client.status(addr, false);
        tokio::time::timeout(Duration::from_millis(STATUS_DEADLINE_MS), call)
            .await
            .ok()?
            .ok()
    }

    /// Asks the nodes in `candidates` (concurrently) who leads.
    pub async fn leaders(&self, candidates: &[usize]) -> LeaderView {
        let mut set = JoinSet::new();
        for &i in candidates {
            let view = self.clone();
            set.spawn(async move { (i, view.status(i).await) });
        }
        let mut answers: Vec<(usize, StatusResponse)> = Vec::new();
        while let Some(joined) = set.join_next().await {
            if let Ok((i, Some(status))) = joined {
                answers.push((i, status));
            }
        }
        let mut view = LeaderView {
            answered: answers.iter().map(|(i, _)| *i).collect(),
            ..LeaderView::default()
        };
        view.answered.sort_unstable();
        let best = answers
            .iter()
            .filter_map(|(_, s)| {
                let range = user_range(s)?;
                let leader_id = range.leader_id?;
                Some((range.term, leader_id, s))
            })
            .max_by_key(|(term, _, _)| *term);
        let Some((_, leader_id, status)) = best else {
            return view;
        };
        let leader_addr = status
            .nodes
            .iter()
            .find(|n| n.node_id == leader_id)
            .map(|n| n.addr.clone());
        view.leader = leader_addr.and_then(|a| self.addrs.iter().position(|x| *x == a));
        view.voters = user_range(status)
            .and_then(|r| r.descriptor.as_ref())
            .map_or(0, |d| d.voters.len());
        view.agreed = answers
            .iter()
            .all(|(_, s)| user_range(s).and_then(|r| r.leader_id) == Some(leader_id));
        view
    }
}

/// Polls `check` every [`POLL_INTERVAL_MS`] until it returns `Some` or `timeout_ms` passes.
pub async fn poll_until<T, F, Fut>(timeout_ms: u64, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    let max_polls = timeout_ms / POLL_INTERVAL_MS + 1;
    for _ in 0..max_polls {
        if let Some(v) = check().await {
            return Some(v);
        }
        if started.elapsed() >= Duration::from_millis(timeout_ms) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
    None
}

/// Starts every node: the first bootstraps, the others join one at a time until each is a
/// voter. Returns the cluster and a status view over it.
pub async fn start(cfg: ClusterConfig) -> Result<(Cluster, StatusView), ClusterError> {
    let dir = cfg.dir.clone();
    let timeout = |what: &str| ClusterError::Timeout {
        what: what.to_string(),
        timeout_ms: CLUSTER_START_TIMEOUT_MS,
        dir: dir.join("nodes"),
    };
    let mut cluster = Cluster::new(cfg)?;
    cluster.spawn(0, false)?;
    let addrs = cluster.addrs();
    let first = vec![addrs[0].clone()];
    let view = poll_until(CLUSTER_START_TIMEOUT_MS, || {
        StatusView::connect(first.clone())
    })
    .await
    .ok_or_else(|| timeout("node n1 to answer"))?;
    let view = StatusView {
        client: view.client,
        addrs: addrs.clone(),
    };
    poll_until(CLUSTER_START_TIMEOUT_MS, || async {
        view.leaders(&[0]).await.leader.map(|_| ())
    })
    .await
    .ok_or_else(|| timeout("node n1 to lead"))?;
    for i in 1..cluster.len() {
        cluster.spawn(i, true)?;
        let want = i + 1;
        let started: Vec<usize> = (0..=i).collect();
        poll_until(CLUSTER_START_TIMEOUT_MS, || async {
            let seen = view.leaders(&started).await;
            (seen.leader.is_some() && seen.voters >= want).then_some(())
        })
        .await
        .ok_or_else(|| timeout(&format!("node n{want} to become a voter")))?;
    }
    if cluster.cfg.failpoints.is_some() {
        for i in 0..cluster.len() {
            let path = cluster.node(i).log_path.clone();
            let logged = poll_until(FAILPOINTS_LOG_TIMEOUT_MS, || async {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                text.contains(FAILPOINTS_LOG_MARKER).then_some(())
            })
            .await;
            if logged.is_none() {
                return Err(ClusterError::FailpointsMissing {
                    node: cluster.node(i).name.clone(),
                });
            }
        }
    }
    Ok((cluster, view))
}
