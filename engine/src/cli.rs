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
    /// Show the cluster: nodes, liveness, range leader, applied index per replica.
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
}

#[derive(Debug, Subcommand)]
pub enum KvOp {
    /// Write KEY = VALUE.
    Put { key: String, value: String },
    /// Read KEY.
    Get { key: String },
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
    /// List keys in [START, END), in order.
    Scan {
        #[arg(long, default_value = "")]
        start: String,
        #[arg(long, default_value = "")]
        end: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// Runs a parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Start(args) => start(args).await,
        Command::Status { host, format } => {
            let (first, rows) = crate::status::gather(&host)
                .await
                .with_context(|| format!("asking {host} for status (is a node running there?)"))?;
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&crate::status::to_json(&first, &rows))?
                ),
                Format::Text => print!("{}", crate::status::to_text(&first, &rows)),
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
                ..Default::default()
            };
            let client = Client::connect(&[host.as_str()], options)
                .await
                .with_context(|| format!("connecting to {host} (is a node running there?)"))?;
            kv(&client, sphere, op).await
        }
        Command::Demo { base_port, nodes } => crate::demo::run(base_port, nodes).await,
    }
}

async fn kv(client: &Client, sphere: u64, op: KvOp) -> anyhow::Result<()> {
    match op {
        KvOp::Put { key, value } => {
            client.put(sphere, key.as_bytes(), value.as_bytes()).await?;
            println!("OK");
        }
        KvOp::Get { key } => match client.get(sphere, key.as_bytes()).await? {
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
        KvOp::Scan { start, end, limit } => {
            for kv in client
                .scan(sphere, start.as_bytes(), end.as_bytes(), limit)
                .await?
            {
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
    };
    let node = Node::start(cfg).await?;
    eprintln!(
        "spheredb node {} serving on {}",
        node.node_id(),
        node.addr()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("shutting down");
    node.shutdown().await
}
