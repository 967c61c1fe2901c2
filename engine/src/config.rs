//! Node configuration and its defaults.

use std::path::PathBuf;

/// Default client/peer port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";
/// Default number of voters per range.
pub const DEFAULT_REPLICATION_FACTOR: usize = 3;
/// Default leader heartbeat period.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 100;
/// Default lower bound of the randomized election timeout; the upper bound is twice this.
pub const DEFAULT_ELECTION_TIMEOUT_MS: u64 = 500;
/// Default number of log entries since the last snapshot that triggers a new snapshot.
/// (etcd's `--snapshot-count` default is also 100,000.)
pub const DEFAULT_SNAPSHOT_LOG_THRESHOLD: u64 = 100_000;
/// Log entries kept behind a snapshot so slightly lagging followers avoid a snapshot install.
pub const DEFAULT_LOG_KEPT_BEHIND_SNAPSHOT: u64 = 1_000;

/// Default range size past which a range splits.
pub const DEFAULT_RANGE_SPLIT_SIZE_BYTES: u64 = 64 << 20;
/// Default load (requests per second, averaged over the load window) past which a range
/// splits.
pub const DEFAULT_RANGE_SPLIT_QPS: f64 = 2_500.0;
/// How long a range's load must stay over the threshold, check after check, before it
/// splits by load: a burst does not split a range (CockroachDB samples 10 s too).
pub const DEFAULT_RANGE_SPLIT_SUSTAIN_MS: u64 = 10_000;
/// Share of the node's cores its process must keep busy (capped at
/// `range::split::LOAD_SPLIT_ENOUGH_BUSY_CORES`) for a range it leads to split by load. A load split pays off only by moving half of a hot range's leader work to
/// another node; while the leader's node has cores to spare it only adds a Raft group,
/// which on the same three nodes halves every group's batches and costs CPU per write
/// (measured in `docs/performance/write-path.md`: four ranges on three nodes served 30 %
/// fewer writes per second than one, at 65 % more CPU per write).
pub const DEFAULT_RANGE_SPLIT_MIN_NODE_CPU_FRACTION: f64 = 0.75;

/// Default size under which a range merges with a small right neighbour (their sum must
/// stay under it too).
pub const DEFAULT_RANGE_MERGE_SIZE_BYTES: u64 = 16 << 20;
/// Default load (requests per second) under which a range counts as cold for merging.
pub const DEFAULT_RANGE_MERGE_QPS: f64 = 100.0;
/// Default time after a range's span last changed before it may merge: a range just split
/// (by load, say) is not merged straight back.
pub const DEFAULT_RANGE_MERGE_AFTER_SPLIT_MS: u64 = 10 * 60_000;
/// Default time after a node's last heartbeat when its replicas are replaced elsewhere.
pub const DEFAULT_DEAD_NODE_TIMEOUT_MS: u64 = 5 * 60_000;
/// Default idle time after which a range stops heartbeating.
pub const DEFAULT_QUIESCE_AFTER_MS: u64 = 3_000;
/// Default period of the node's heartbeat to the meta-range leader.
pub const DEFAULT_NODE_HEARTBEAT_INTERVAL_MS: u64 = 1_000;

/// Default reach of the timestamp oracle's reservations past its clock (see `meta::tso`).
pub const DEFAULT_TSO_RESERVE_WINDOW_MS: u64 = 3_000;
/// Default age an oracle batch may have when a write takes its commit ts from it (see
/// `range::timestamps`): a write commits above every timestamp the oracle handed out more
/// than this long before it arrived.
pub const DEFAULT_COMMIT_TS_STALENESS_MS: u64 = 50;
/// Default age past which old versions are garbage-collected and reads refused (25 h): the
/// limit of time travel and of change-feed resumption.
pub const DEFAULT_GC_TTL_MS: u64 = 25 * 3_600_000;
/// Default period of the node's GC pass (see `range::gc`).
pub const DEFAULT_GC_INTERVAL_MS: u64 = 10_000;
/// Default free space under which a node refuses client writes (see `disk.rs`).
pub const DEFAULT_DISK_RESERVE_BYTES: u64 = 256 << 20;
/// Default size of the ballast file a node keeps for recovering from a full disk.
pub const DEFAULT_BALLAST_SIZE_BYTES: u64 = 64 << 20;

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where the node keeps its RocksDB and snapshots.
    pub data_dir: PathBuf,
    /// Address to bind for clients and peers (`host:port`; port 0 picks a free one).
    pub listen: String,
    /// Address other nodes and clients use to reach this node; defaults to the bound address.
    pub advertise: Option<String>,
    /// Seeds of an existing cluster to join. Empty on the first node and on restarts.
    pub join: Vec<String>,
    /// Voters per range.
    pub replication_factor: usize,
    /// Leader heartbeat period.
    pub heartbeat_interval_ms: u64,
    /// Lower bound of the election timeout.
    pub election_timeout_ms: u64,
    /// Log entries since the last snapshot that trigger a new one.
    pub snapshot_log_threshold: u64,
    /// Log entries kept behind a snapshot.
    pub log_kept_behind_snapshot: u64,
    /// A range larger than this splits.
    pub range_split_size_bytes: u64,
    /// A range busier than this (requests/s over the load window) splits, once it has
    /// stayed so for `range_split_sustain_ms` while its leader's node keeps at least
    /// `range_split_min_node_cpu_fraction` of its cores busy.
    pub range_split_qps: f64,
    /// How long a range must stay busier than `range_split_qps` before it splits.
    pub range_split_sustain_ms: u64,
    /// Least busy share of the leader node's cores (0.0–1.0) for a load split.
    pub range_split_min_node_cpu_fraction: f64,
    /// Two neighbours both smaller than this, together too, and both colder than
    /// `range_merge_qps`, merge (0: never merge by themselves).
    pub range_merge_size_bytes: u64,
    /// Requests per second under which a range is cold enough to merge.
    pub range_merge_qps: f64,
    /// A range whose span changed less than this long ago does not merge.
    pub range_merge_after_split_ms: u64,
    /// A node silent this long is dead: its replicas are replaced on other nodes.
    pub dead_node_timeout_ms: u64,
    /// A range idle this long stops heartbeating (0: never).
    pub quiesce_after_ms: u64,
    /// Period of the node's heartbeat to the meta-range leader (the allocator runs at the
    /// same period).
    pub node_heartbeat_interval_ms: u64,
    /// Free disk space under which the node refuses client writes (0: never refuse).
    pub disk_reserve_bytes: u64,
    /// Size of the ballast file released when the disk is nearly full (0: none).
    pub ballast_size_bytes: u64,
    /// How far past its clock the timestamp oracle reserves timestamps through Raft.
    pub tso_reserve_window_ms: u64,
    /// How old an oracle batch may be when a write takes its commit ts from it (0: fetched
    /// after the write arrived).
    pub commit_ts_staleness_ms: u64,
    /// Versions older than this (behind the newest oracle timestamp) are collected.
    pub gc_ttl_ms: u64,
    /// Period of the node's GC pass.
    pub gc_interval_ms: u64,
    /// A change-feed subscriber that takes no message for this long is disconnected.
    pub feed_slow_consumer_timeout_ms: u64,
}

impl NodeConfig {
    /// A configuration with defaults for everything but the data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        NodeConfig {
            data_dir: data_dir.into(),
            listen: DEFAULT_LISTEN.to_string(),
            advertise: None,
            join: Vec::new(),
            replication_factor: DEFAULT_REPLICATION_FACTOR,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            election_timeout_ms: DEFAULT_ELECTION_TIMEOUT_MS,
            snapshot_log_threshold: DEFAULT_SNAPSHOT_LOG_THRESHOLD,
            log_kept_behind_snapshot: DEFAULT_LOG_KEPT_BEHIND_SNAPSHOT,
            range_split_size_bytes: DEFAULT_RANGE_SPLIT_SIZE_BYTES,
            range_split_qps: DEFAULT_RANGE_SPLIT_QPS,
            range_split_sustain_ms: DEFAULT_RANGE_SPLIT_SUSTAIN_MS,
            range_split_min_node_cpu_fraction: DEFAULT_RANGE_SPLIT_MIN_NODE_CPU_FRACTION,
            range_merge_size_bytes: DEFAULT_RANGE_MERGE_SIZE_BYTES,
            range_merge_qps: DEFAULT_RANGE_MERGE_QPS,
            range_merge_after_split_ms: DEFAULT_RANGE_MERGE_AFTER_SPLIT_MS,
            dead_node_timeout_ms: DEFAULT_DEAD_NODE_TIMEOUT_MS,
            quiesce_after_ms: DEFAULT_QUIESCE_AFTER_MS,
            node_heartbeat_interval_ms: DEFAULT_NODE_HEARTBEAT_INTERVAL_MS,
            disk_reserve_bytes: DEFAULT_DISK_RESERVE_BYTES,
            ballast_size_bytes: DEFAULT_BALLAST_SIZE_BYTES,
            tso_reserve_window_ms: DEFAULT_TSO_RESERVE_WINDOW_MS,
            commit_ts_staleness_ms: DEFAULT_COMMIT_TS_STALENESS_MS,
            gc_ttl_ms: DEFAULT_GC_TTL_MS,
            gc_interval_ms: DEFAULT_GC_INTERVAL_MS,
            feed_slow_consumer_timeout_ms: crate::service::feed::DEFAULT_SLOW_CONSUMER_TIMEOUT_MS,
        }
    }
}
