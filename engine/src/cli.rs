//! The `spheredb` command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use spheredb_client::{Client, ClientOptions, Consistency};

use crate::config::{self, NodeConfig};
use crate::node::Node;

/// SphereDB: a distributed database for data organised in spheres.
#[derive(Debug, Parser)]
#[command(name = "spheredb", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Output format of informational commands.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a node. Without --join it bootstraps a new cluster; with --join it joins one.
    /// A restarted node needs only --data-dir and --listen.
    Start(StartArgs),
    /// Show the cluster: nodes (liveness, replicas, leaders, actions), and ranges (span,
    /// replicas, leader, size, load).
    Status {
        /// Any node of the cluster.
        #[arg(long, env = "SPHEREDB_HOST", default_value = config::DEFAULT_LISTEN)]
        host: String,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Read and write a sphere's keys.
    Kv {
        /// Any node of the cluster.
        #[arg(long, env = "SPHEREDB_HOST", default_value = config::DEFAULT_LISTEN)]
        host: String,
        /// The sphere whose keyspace to use.
        #[arg(long, env = "SPHEREDB_SPHERE", default_value_t = 0)]
        sphere: u64,
        /// Serve reads from the leader's lease instead of a ReadIndex round trip.
        #[arg(long)]
        lease_reads: bool,
        #[command(subcommand)]
        op: KvOp,
    },
    /// Inspect and split ranges.
    Range {
        /// Any node of the cluster.
        #[arg(long, env = "SPHEREDB_HOST", default_value = config::DEFAULT_LISTEN)]
        host: String,
        #[command(subcommand)]
        op: RangeOp,
    },
    /// Manage nodes.
    Node {
        /// Any node of the cluster.
        #[arg(long, env = "SPHEREDB_HOST", default_value = config::DEFAULT_LISTEN)]
        host: String,
        #[command(subcommand)]
        op: NodeOp,
    },
    /// Follow a sphere's changes: one line per change (key, value, commit timestamp) and per
    /// checkpoint (a resolved timestamp and the cursor to resume from with --since).
    Feed(crate::feed_cli::FeedArgs),
    /// Get a timestamp from the cluster's timestamp oracle (the meta-range leader): above
    /// every timestamp handed out before. Prints it and its physical time.
    Timestamp {
        /// Any node of the cluster.
        #[arg(long, env = "SPHEREDB_HOST", default_value = config::DEFAULT_LISTEN)]
        host: String,
    },
    /// A SQL shell (PostgreSQL protocol) on a node: interactive, or -e SQL / -f FILE.
    Sql(crate::sql_cli::SqlArgs),
    /// Start a 3-node cluster on loopback in a temporary directory, load sample data and
    /// show how to use it. Stays up until Ctrl-C; with stdin not a terminal it runs a short
    /// scripted tour and exits.
    Demo {
        /// First port; nodes use this and the next ones.
        #[arg(long, default_value_t = 7400)]
        base_port: u16,
        /// Nodes to start.
        #[arg(long, default_value_t = 3)]
        nodes: u16,
    },
}

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// Directory for the node's data; created if missing.
    #[arg(long, env = "SPHEREDB_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address to serve clients and peers on.
    #[arg(long, env = "SPHEREDB_LISTEN", default_value = config::DEFAULT_LISTEN)]
    pub listen: String,
    /// Address others use to reach this node [default: the bound address].
    #[arg(long, env = "SPHEREDB_ADVERTISE")]
    pub advertise: Option<String>,
    /// Address to serve SQL on (PostgreSQL wire protocol: `psql -h HOST -p PORT -U spheredb
    /// spheredb`), or `off`. Given explicitly, a port in use is an error; the default is
    /// skipped with a warning when its port is taken (another node on this machine).
    #[arg(long, env = "SPHEREDB_SQL_LISTEN")]
    pub sql_listen: Option<String>,
    /// Comma-separated addresses of nodes of the cluster to join.
    #[arg(long, env = "SPHEREDB_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,
    /// Voters per range.
    #[arg(long, env = "SPHEREDB_REPLICATION_FACTOR", default_value_t = config::DEFAULT_REPLICATION_FACTOR)]
    pub replication_factor: usize,
    /// Leader heartbeat period in milliseconds.
    #[arg(long, env = "SPHEREDB_HEARTBEAT_INTERVAL_MS", default_value_t = config::DEFAULT_HEARTBEAT_INTERVAL_MS)]
    pub heartbeat_interval_ms: u64,
    /// Minimum election timeout in milliseconds (the maximum is twice this).
    #[arg(long, env = "SPHEREDB_ELECTION_TIMEOUT_MS", default_value_t = config::DEFAULT_ELECTION_TIMEOUT_MS)]
    pub election_timeout_ms: u64,
    /// Log entries since the last snapshot that trigger a new snapshot.
    #[arg(long, env = "SPHEREDB_SNAPSHOT_LOG_THRESHOLD", default_value_t = config::DEFAULT_SNAPSHOT_LOG_THRESHOLD)]
    pub snapshot_log_threshold: u64,
    /// Log entries kept behind a snapshot for lagging followers.
    #[arg(long, env = "SPHEREDB_LOG_KEPT_BEHIND_SNAPSHOT", default_value_t = config::DEFAULT_LOG_KEPT_BEHIND_SNAPSHOT)]
    pub log_kept_behind_snapshot: u64,
    /// A range whose data grows past this many bytes splits in two.
    #[arg(long, env = "SPHEREDB_RANGE_SPLIT_SIZE_BYTES", default_value_t = config::DEFAULT_RANGE_SPLIT_SIZE_BYTES)]
    pub range_split_size_bytes: u64,
    /// A range serving more requests per second than this splits in two, once it has stayed
    /// so for --range-split-sustain-ms and its leader's node keeps at least
    /// --range-split-min-node-cpu-fraction of its cores busy.
    #[arg(long, env = "SPHEREDB_RANGE_SPLIT_QPS", default_value_t = config::DEFAULT_RANGE_SPLIT_QPS)]
    pub range_split_qps: f64,
    /// How long a range must stay busy (over --range-split-qps, its node short of CPU) at
    /// every one-second check before it splits by load. A range splits by load at most once
    /// a minute, and not in the minute after its leader moved here.
    #[arg(long, env = "SPHEREDB_RANGE_SPLIT_SUSTAIN_MS", default_value_t = config::DEFAULT_RANGE_SPLIT_SUSTAIN_MS)]
    pub range_split_sustain_ms: u64,
    /// Share of its cores (0.0 to 1.0; at most 2 cores count as enough) this node's process
    /// must keep busy, by getrusage, for a range it leads to split by load: a load split
    /// helps only by moving leader work off a node short of CPU. Nodes sharing one machine
    /// rarely reach it, so they do not split by load (0: split on load alone).
    #[arg(long, env = "SPHEREDB_RANGE_SPLIT_MIN_NODE_CPU_FRACTION", default_value_t = config::DEFAULT_RANGE_SPLIT_MIN_NODE_CPU_FRACTION, value_parser = cpu_fraction)]
    pub range_split_min_node_cpu_fraction: f64,
    /// Neighbouring ranges smaller than this (each, and together) and colder than
    /// --range-merge-qps merge into one (0: ranges never merge by themselves).
    #[arg(long, env = "SPHEREDB_RANGE_MERGE_SIZE_BYTES", default_value_t = config::DEFAULT_RANGE_MERGE_SIZE_BYTES)]
    pub range_merge_size_bytes: u64,
    /// Requests per second under which a range is cold enough to merge.
    #[arg(long, env = "SPHEREDB_RANGE_MERGE_QPS", default_value_t = config::DEFAULT_RANGE_MERGE_QPS)]
    pub range_merge_qps: f64,
    /// A range whose span changed (split or merge) less than this long ago (ms) does not merge.
    #[arg(long, env = "SPHEREDB_RANGE_MERGE_AFTER_SPLIT_MS", default_value_t = config::DEFAULT_RANGE_MERGE_AFTER_SPLIT_MS)]
    pub range_merge_after_split_ms: u64,
    /// A node silent this long (ms) is dead: its replicas are re-created on other nodes.
    #[arg(long, env = "SPHEREDB_DEAD_NODE_TIMEOUT_MS", default_value_t = config::DEFAULT_DEAD_NODE_TIMEOUT_MS)]
    pub dead_node_timeout_ms: u64,
    /// A range idle this long (ms) stops heartbeating until the next request (0: never).
    #[arg(long, env = "SPHEREDB_QUIESCE_AFTER_MS", default_value_t = config::DEFAULT_QUIESCE_AFTER_MS)]
    pub quiesce_after_ms: u64,
    /// Period (ms) of the node's report to the meta range; the allocator runs at this period.
    #[arg(long, env = "SPHEREDB_NODE_HEARTBEAT_INTERVAL_MS", default_value_t = config::DEFAULT_NODE_HEARTBEAT_INTERVAL_MS)]
    pub node_heartbeat_interval_ms: u64,
    /// Free disk space (bytes) under which the node refuses client writes with
    /// RESOURCE_EXHAUSTED, nothing written, until space is freed (0: never refuse).
    #[arg(long, env = "SPHEREDB_DISK_RESERVE_BYTES", default_value_t = config::DEFAULT_DISK_RESERVE_BYTES)]
    pub disk_reserve_bytes: u64,
    /// Size (bytes) of the ballast file kept in the data directory and deleted when free
    /// space falls under half the reserve, so the node can still compact and recover (0: none).
    #[arg(long, env = "SPHEREDB_BALLAST_SIZE_BYTES", default_value_t = config::DEFAULT_BALLAST_SIZE_BYTES)]
    pub ballast_size_bytes: u64,
    /// How far (ms) past its clock the timestamp oracle (on the meta-range leader) reserves
    /// timestamps through Raft; it reserves again when a third of that is left. Longer
    /// means fewer Raft writes, and a larger gap in timestamps after a leader change.
    #[arg(long, env = "SPHEREDB_TSO_RESERVE_WINDOW_MS", default_value_t = config::DEFAULT_TSO_RESERVE_WINDOW_MS,
          value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(3..))]
    pub tso_reserve_window_ms: u64,
    /// How old (ms) a node's batch of oracle timestamps may be when a write takes its commit
    /// timestamp from it. A write then commits above every timestamp the oracle handed out
    /// more than this long before the write arrived, and above every timestamp its client
    /// had seen; 0 fetches a batch after every write's arrival (one oracle round trip per
    /// wave of writes: strict real-time order across ranges, at a large CPU cost).
    #[arg(long, env = "SPHEREDB_COMMIT_TS_STALENESS_MS", default_value_t = config::DEFAULT_COMMIT_TS_STALENESS_MS,
          value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(..=60_000))]
    pub commit_ts_staleness_ms: u64,
    /// How long old versions are kept (e.g. 25h, 90m, 30s): reads `--at` a timestamp older
    /// than this answer HISTORY_COMPACTED, and versions behind it are collected.
    #[arg(long, env = "SPHEREDB_GC_TTL", default_value = "25h", value_parser = parse_duration_ms)]
    pub gc_ttl: u64,
    /// Period (ms) of the node's pass over its ranges that raises GC horizons and collects
    /// old versions (bounded work per range per pass).
    #[arg(long, env = "SPHEREDB_GC_INTERVAL_MS", default_value_t = config::DEFAULT_GC_INTERVAL_MS,
          value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..))]
    pub gc_interval_ms: u64,
    /// A change-feed subscriber that takes no message for this long (ms) is disconnected
    /// with RESOURCE_EXHAUSTED; it resumes from its cursor. Nothing is buffered for it
    /// beyond a few pages meanwhile.
    #[arg(long, env = "SPHEREDB_FEED_SLOW_CONSUMER_TIMEOUT_MS",
          default_value_t = crate::service::feed::DEFAULT_SLOW_CONSUMER_TIMEOUT_MS,
          value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(100..=3_600_000))]
    pub feed_slow_consumer_timeout_ms: u64,
}

/// Parses a duration such as `25h`, `90m`, `30s`, `1d` or `500ms` into milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit; write e.g. 25h, 90m, 30s or 500ms"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}; use ms, s, m, h or d"
            ))
        }
    };
    n.checked_mul(unit_ms)
        .filter(|ms| *ms > 0)
        .ok_or_else(|| format!("{text:?} is out of range"))
}

#[derive(Debug, Subcommand)]
pub enum RangeOp {
    /// List every range: span, generation, replicas, leader, size and load.
    List {
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Split the range holding a key at that key's row.
    Split {
        /// The sphere of --key.
        #[arg(long, default_value_t = 0)]
        sphere: u64,
        /// A key of the sphere's raw keyspace to split at.
        #[arg(
            long,
            conflicts_with = "encoded_key",
            required_unless_present = "encoded_key"
        )]
        key: Option<String>,
        /// An encoded key (hex) to split at, for SQL rows or other keyspaces.
        #[arg(long)]
        encoded_key: Option<String>,
    },
    /// Merge a range with the range that follows it (its right neighbour). The neighbour's
    /// replicas first move onto the same nodes; the merged range keeps this range's id.
    Merge {
        /// Id of the left-hand range (`spheredb range list` shows ids).
        #[arg(long)]
        range: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeOp {
    /// Move every replica off a node; it then holds nothing and can be stopped. Waits until
    /// the node is empty unless --no-wait.
    Decommission {
        /// Id of the node to drain (`spheredb status` lists them).
        #[arg(long)]
        node: u64,
        /// Return once the drain has started.
        #[arg(long)]
        no_wait: bool,
        /// Longest to wait for the drain, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum KvOp {
    /// Write KEY = VALUE.
    Put { key: String, value: String },
    /// Read KEY: its latest value, or with --at its value as of a timestamp.
    Get {
        key: String,
        /// Read as of this timestamp (time travel); take one from `spheredb timestamp`.
        #[arg(long, value_name = "TS")]
        at: Option<u64>,
    },
    /// Delete KEY.
    Delete { key: String },
    /// Set KEY to NEW if it holds EXPECTED (--expect-absent: if it does not exist).
    Cas {
        key: String,
        #[arg(long, conflicts_with = "expect_absent")]
        expect: Option<String>,
        #[arg(long)]
        expect_absent: bool,
        #[arg(long)]
        new: String,
    },
    /// Run SCRIPT atomically, as one transaction (snapshot isolation; retried on conflicts):
    /// statements separated by `;` or new lines, each `get KEY`, `put KEY VALUE`,
    /// `delete KEY` or `lock KEY` (lock without writing). Prints each get's result once the
    /// transaction committed. Keys and values are single words.
    ///
    /// Example: spheredb kv --sphere 7 txn 'get alice; put alice 90; put bob 110'
    Txn { script: String },
    /// List keys in [START, END), in order.
    Scan {
        #[arg(long, default_value = "")]
        start: String,
        #[arg(long, default_value = "")]
        end: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Read as of this timestamp: one consistent snapshot across ranges.
        #[arg(long, value_name = "TS")]
        at: Option<u64>,
    },
}

/// Runs a parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Start(args) => start(args).await,
        Command::Status { host, format } => {
            let (list, rows) = crate::service::status::gather(&host)
                .await
                .with_context(|| format!("asking {host} for status (is a node running there?)"))?;
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&crate::service::status::to_json(&list, &rows))?
                ),
                Format::Text => print!("{}", crate::service::status::to_text(&list, &rows)),
            }
            Ok(())
        }
        Command::Kv {
            host,
            sphere,
            lease_reads,
            op,
        } => {
            let options = ClientOptions {
                consistency: if lease_reads {
                    Consistency::Lease
                } else {
                    Consistency::Linearizable
                },
                // One call: one connection per node is plenty.
                connections_per_node: 1,
                ..Default::default()
            };
            let client = Client::connect(&[host.as_str()], options)
                .await
                .with_context(|| format!("connecting to {host} (is a node running there?)"))?;
            kv(&client, sphere, op).await
        }
        Command::Range { host, op } => {
            let client = Client::connect(&[host.as_str()], ClientOptions::default())
                .await
                .with_context(|| format!("connecting to {host} (is a node running there?)"))?;
            range(&client, op).await
        }
        Command::Node { host, op } => {
            let client = Client::connect(&[host.as_str()], ClientOptions::default())
                .await
                .with_context(|| format!("connecting to {host} (is a node running there?)"))?;
            node(&client, op).await
        }
        Command::Timestamp { host } => {
            let options = ClientOptions {
                connections_per_node: 1,
                ..Default::default()
            };
            let client = Client::connect(&[host.as_str()], options)
                .await
                .with_context(|| format!("connecting to {host} (is a node running there?)"))?;
            let ts = client.timestamp().await.context("getting a timestamp")?;
            let physical_ms = crate::meta::tso::physical_ms(ts);
            let logical = ts & (crate::meta::tso::TIMESTAMPS_PER_MS - 1);
            println!("{ts} (physical {physical_ms} ms since the Unix epoch, logical {logical})");
            Ok(())
        }
        Command::Feed(args) => crate::feed_cli::run(args).await,
        Command::Sql(args) => crate::sql_cli::run(args).await,
        Command::Demo { base_port, nodes } => crate::demo::run(base_port, nodes).await,
    }
}

async fn range(client: &Client, op: RangeOp) -> anyhow::Result<()> {
    match op {
        RangeOp::List { format } => {
            let list = client.range_list().await?;
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&crate::service::status::ranges_json(&list))?
                ),
                Format::Text => print!("{}", crate::service::status::ranges_text(&list)),
            }
        }
        RangeOp::Split {
            sphere,
            key,
            encoded_key,
        } => {
            let split_key = match (key, encoded_key) {
                (Some(k), _) => spheredb_storage::keys::kv_key(sphere, k.as_bytes()),
                (None, Some(hex)) => decode_hex(&hex)?,
                (None, None) => anyhow::bail!("give --key or --encoded-key"),
            };
            let resp = client.split(&split_key).await?;
            for d in [resp.left, resp.right].into_iter().flatten() {
                print_range(&d);
            }
        }
        RangeOp::Merge { range } => print_range(&client.merge(range).await?),
    }
    Ok(())
}

/// One line per range: id, generation and span.
fn print_range(d: &spheredb_client::proto::v1::RangeDescriptor) {
    println!(
        "range {} generation {} [{}, {})",
        d.range_id,
        d.generation,
        crate::service::status::show_key(&d.start_key),
        crate::service::status::show_key(&d.end_key)
    );
}

async fn node(client: &Client, op: NodeOp) -> anyhow::Result<()> {
    match op {
        NodeOp::Decommission {
            node,
            no_wait,
            timeout_secs,
        } => {
            let started = std::time::Instant::now();
            loop {
                let left = client.decommission(node).await?;
                if left == 0 {
                    println!("node {node} holds no replicas; it can be stopped");
                    return Ok(());
                }
                if no_wait {
                    println!("node {node} is draining; {left} replicas left");
                    return Ok(());
                }
                if started.elapsed().as_secs() >= timeout_secs {
                    anyhow::bail!("node {node} still holds {left} replicas after {timeout_secs} s; it keeps draining, run the command again to follow it");
                }
                eprintln!("draining node {node}: {left} replicas left");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

/// Parses a share of the cores, 0.0 to 1.0.
fn cpu_fraction(s: &str) -> Result<f64, String> {
    let f: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if (0.0..=1.0).contains(&f) {
        Ok(f)
    } else {
        Err(format!(
            "{f} is not a share of the cores between 0.0 and 1.0"
        ))
    }
}

fn decode_hex(hex: &str) -> anyhow::Result<Vec<u8>> {
    let hex = hex.trim_start_matches("0x");
    if !hex.len().is_multiple_of(2) {
        anyhow::bail!("--encoded-key must have an even number of hex digits");
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&hex[i..i + 2], 16)
                .with_context(|| format!("--encoded-key: bad hex at {i}"))
        })
        .collect()
}

async fn kv(client: &Client, sphere: u64, op: KvOp) -> anyhow::Result<()> {
    match op {
        KvOp::Put { key, value } => {
            client.put(sphere, key.as_bytes(), value.as_bytes()).await?;
            println!("OK");
        }
        KvOp::Get { key, at } => match match at {
            Some(ts) => client.get_at(sphere, key.as_bytes(), ts).await?,
            None => client.get(sphere, key.as_bytes()).await?,
        } {
            Some(v) => println!("{}", String::from_utf8_lossy(&v)),
            None => {
                eprintln!("(not found)");
                std::process::exit(1);
            }
        },
        KvOp::Delete { key } => {
            let existed = client.delete(sphere, key.as_bytes()).await?;
            println!("{}", if existed { "deleted" } else { "(not found)" });
        }
        KvOp::Cas {
            key,
            expect,
            expect_absent,
            new,
        } => {
            if expect.is_none() && !expect_absent {
                anyhow::bail!("give --expect VALUE or --expect-absent");
            }
            let (ok, current) = client
                .compare_and_swap(
                    sphere,
                    key.as_bytes(),
                    expect.as_deref().map(str::as_bytes),
                    Some(new.as_bytes()),
                )
                .await?;
            if ok {
                println!("swapped");
            } else {
                println!(
                    "not swapped; current value: {}",
                    current.map_or("(absent)".to_string(), |v| String::from_utf8_lossy(&v)
                        .into_owned())
                );
                std::process::exit(1);
            }
        }
        KvOp::Txn { script } => {
            let steps = parse_txn_script(&script).map_err(anyhow::Error::msg)?;
            let read = run_txn_script(client, sphere, &steps)
                .await
                .context("running the transaction")?;
            for (key, value) in read {
                match value {
                    Some(v) => println!("{key}\t{}", String::from_utf8_lossy(&v)),
                    None => println!("{key}\t(not found)"),
                }
            }
            println!("committed");
        }
        KvOp::Scan {
            start,
            end,
            limit,
            at,
        } => {
            let pairs = match at {
                Some(ts) => {
                    client
                        .scan_at(sphere, start.as_bytes(), end.as_bytes(), limit, ts)
                        .await?
                }
                None => {
                    client
                        .scan(sphere, start.as_bytes(), end.as_bytes(), limit)
                        .await?
                }
            };
            for kv in pairs {
                println!(
                    "{}\t{}",
                    String::from_utf8_lossy(&kv.key),
                    String::from_utf8_lossy(&kv.value)
                );
            }
        }
    }
    Ok(())
}

/// One statement of a `kv txn` script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptStep {
    Get(String),
    Put(String, String),
    Delete(String),
    Lock(String),
}

/// Parses a `kv txn` script (see [`KvOp::Txn`]).
pub fn parse_txn_script(script: &str) -> Result<Vec<ScriptStep>, String> {
    let mut steps = Vec::new();
    for (n, statement) in script
        .split([';', '\n'])
        .map(str::trim)
        .enumerate()
        .filter(|(_, s)| !s.is_empty())
    {
        let words: Vec<&str> = statement.split_whitespace().collect();
        let step = match words.as_slice() {
            ["get", key] => ScriptStep::Get(key.to_string()),
            ["put", key, value] => ScriptStep::Put(key.to_string(), value.to_string()),
            ["delete", key] => ScriptStep::Delete(key.to_string()),
            ["lock", key] => ScriptStep::Lock(key.to_string()),
            _ => {
                return Err(format!(
                    "statement {} ({statement:?}) is not `get KEY`, `put KEY VALUE`, `delete KEY` \
                     or `lock KEY`",
                    n + 1
                ))
            }
        };
        steps.push(step);
    }
    if steps.is_empty() {
        return Err("the script has no statement".into());
    }
    Ok(steps)
}

/// Runs a `kv txn` script in one transaction; returns each get's key and value.
async fn run_txn_script(
    client: &Client,
    sphere: u64,
    steps: &[ScriptStep],
) -> Result<Vec<(String, Option<Vec<u8>>)>, spheredb_client::ClientError> {
    client
        .transact(|txn| {
            let steps = steps.to_vec();
            Box::pin(async move {
                let mut read = Vec::new();
                for step in &steps {
                    match step {
                        ScriptStep::Get(key) => {
                            read.push((key.clone(), txn.get(sphere, key.as_bytes()).await?))
                        }
                        ScriptStep::Put(key, value) => {
                            txn.put(sphere, key.as_bytes(), value.as_bytes())?
                        }
                        ScriptStep::Delete(key) => txn.delete(sphere, key.as_bytes())?,
                        ScriptStep::Lock(key) => txn.lock(sphere, key.as_bytes()).await?,
                    }
                }
                Ok(read)
            })
        })
        .await
}

async fn start(args: StartArgs) -> anyhow::Result<()> {
    let cfg = NodeConfig {
        data_dir: args.data_dir,
        listen: args.listen,
        advertise: args.advertise,
        join: args.join.into_iter().filter(|s| !s.is_empty()).collect(),
        replication_factor: args.replication_factor,
        heartbeat_interval_ms: args.heartbeat_interval_ms,
        election_timeout_ms: args.election_timeout_ms,
        snapshot_log_threshold: args.snapshot_log_threshold,
        log_kept_behind_snapshot: args.log_kept_behind_snapshot,
        range_split_size_bytes: args.range_split_size_bytes,
        range_split_qps: args.range_split_qps,
        range_split_sustain_ms: args.range_split_sustain_ms,
        range_split_min_node_cpu_fraction: args.range_split_min_node_cpu_fraction,
        range_merge_size_bytes: args.range_merge_size_bytes,
        range_merge_qps: args.range_merge_qps,
        range_merge_after_split_ms: args.range_merge_after_split_ms,
        dead_node_timeout_ms: args.dead_node_timeout_ms,
        quiesce_after_ms: args.quiesce_after_ms,
        node_heartbeat_interval_ms: args.node_heartbeat_interval_ms,
        disk_reserve_bytes: args.disk_reserve_bytes,
        ballast_size_bytes: args.ballast_size_bytes,
        tso_reserve_window_ms: args.tso_reserve_window_ms,
        commit_ts_staleness_ms: args.commit_ts_staleness_ms,
        gc_ttl_ms: args.gc_ttl,
        gc_interval_ms: args.gc_interval_ms,
        feed_slow_consumer_timeout_ms: args.feed_slow_consumer_timeout_ms,
    };
    let node = Node::start(cfg).await?;
    eprintln!(
        "spheredb node {} serving on {}",
        node.node_id(),
        node.addr()
    );
    start_sql(args.sql_listen.as_deref(), node.addr().to_string()).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        reason = node.failed() => {
            // Fail-stop: exit non-zero without a clean shutdown, which would sync a WAL
            // that just failed. Peers see the node as dead and replace its replicas.
            anyhow::bail!(
                "node {} stopped: {reason}. Check the disk and the log above, then restart it",
                node.node_id()
            );
        }
    }
    eprintln!("shutting down");
    node.shutdown().await
}

/// The SQL front end's default address: loopback, the port PostgreSQL's plus one.
pub const DEFAULT_SQL_LISTEN: &str = "127.0.0.1:5433";
/// Attempts, [`SQL_CLIENT_RETRY_MS`] apart, of the SQL layer to load the cluster's range map
/// through its own node (a joining node may not serve it yet) before it gives up.
pub const SQL_CLIENT_CONNECT_ATTEMPTS: u32 = 120;
pub const SQL_CLIENT_RETRY_MS: u64 = 500;

/// Binds the SQL listener (now, so a taken port is reported at once) and serves it in the
/// background through a client of this node.
async fn start_sql(sql_listen: Option<&str>, node_addr: String) -> anyhow::Result<()> {
    let (addr, explicit) = match sql_listen {
        Some("off") => return Ok(()),
        Some(addr) => (addr, true),
        None => (DEFAULT_SQL_LISTEN, false),
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::warn!(
                %addr,
                "SQL is not served: the default SQL address is in use; pass --sql-listen HOST:PORT"
            );
            return Ok(());
        }
        Err(e) => anyhow::bail!("cannot serve SQL on {addr}: {e}; pass another --sql-listen"),
    };
    eprintln!("spheredb SQL (PostgreSQL protocol) on {addr}");
    tokio::spawn(async move {
        let mut last_error = String::new();
        for _ in 0..SQL_CLIENT_CONNECT_ATTEMPTS {
            match Client::connect(&[node_addr.as_str()], ClientOptions::default()).await {
                Ok(client) => {
                    if let Err(e) = spheredb_query::serve(listener, client).await {
                        tracing::error!(error = %e, "the SQL listener failed; SQL is not served");
                    }
                    return;
                }
                Err(e) => last_error = e.to_string(),
            }
            tokio::time::sleep(std::time::Duration::from_millis(SQL_CLIENT_RETRY_MS)).await;
        }
        tracing::error!(error = %last_error, "SQL is not served: no range map from this node");
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txn_scripts_parse_statement_by_statement_and_bad_ones_say_which() {
        assert_eq!(
            parse_txn_script("get a; put b 1\n delete c;lock d;").unwrap(),
            vec![
                ScriptStep::Get("a".into()),
                ScriptStep::Put("b".into(), "1".into()),
                ScriptStep::Delete("c".into()),
                ScriptStep::Lock("d".into()),
            ]
        );
        let err = parse_txn_script("get a; put b").unwrap_err();
        assert!(err.contains("statement 2"), "{err}");
        assert!(parse_txn_script(" ; ").is_err());
    }
}
