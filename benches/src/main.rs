//! `spheredb-bench`: load generator for SphereDB and etcd, and their side-by-side comparison.

mod closed_loop;
mod compare;
mod cpu;
/// Generated client of etcd's KV, Maintenance and Watch services (subset).
mod etcd {
    tonic::include_proto!("etcdserverpb");
}
mod feed;
mod postgres;
mod runner;
mod sql;
mod target;
mod transfer;
mod tso;
mod workload;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use spheredb_client::client::{DEFAULT_CONNECTIONS_PER_NODE, MAX_CONNECTIONS_PER_NODE};

use runner::RunConfig;
use target::{Conn, ReadConsistency, System};
use workload::{KeyDistribution, Workload};

/// Default measured window.
const DEFAULT_DURATION_SECS: f64 = 20.0;
/// Default warm-up excluded from the results.
const DEFAULT_WARMUP_SECS: f64 = 3.0;
/// Default key space.
const DEFAULT_KEYS: u64 = 100_000;
/// Default value size (the targets are stated for 256 B values).
const DEFAULT_VALUE_SIZE_BYTES: usize = 256;

#[derive(Parser)]
#[command(
    name = "spheredb-bench",
    version,
    about = "Load generator comparing SphereDB with etcd and PostgreSQL"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One measurement against a cluster this tool starts, or an existing one (--endpoints).
    Run {
        #[arg(long, value_enum, default_value = "spheredb")]
        target: System,
        /// Existing cluster addresses (host:port, comma separated); default: start a fresh 3-node cluster.
        #[arg(long, value_delimiter = ',')]
        endpoints: Vec<String>,
        /// Concurrent clients.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Open loop at this many operations per second in total (default: closed loop).
        #[arg(long)]
        rate: Option<f64>,
        /// Skip the preload (the keys already exist).
        #[arg(long)]
        no_preload: bool,
        #[command(flatten)]
        common: Common,
    },
    /// SphereDB and etcd over a client sweep (and open-loop rates), each run on a fresh
    /// cluster, the systems of a pair in alternating order (ABBA): a Markdown table of medians
    /// and per-pair ratios with range counts and CPU, plus JSON and an SVG plot.
    Compare {
        /// Client counts to sweep.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
        clients: Vec<usize>,
        /// Open-loop points: total arrival rates in operations per second (latency from each
        /// operation's intended start), run with the largest --clients as concurrency.
        #[arg(long, value_delimiter = ',')]
        rates: Vec<f64>,
        /// Systems compared; every pair runs each once, in alternating order (ABBA).
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "spheredb,spheredb-1range,etcd,etcd-leader"
        )]
        systems: Vec<System>,
        /// Pairs per point (each system once per pair); an even number, so that the
        /// alternating order cancels drift.
        #[arg(long, default_value_t = 2)]
        pairs: usize,
        /// Where compare.md, compare.json and compare.svg go.
        #[arg(long, default_value = "bench-results")]
        out_dir: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Transfers between two accounts in a transaction, SphereDB (one range: one-phase
    /// commit; two ranges: two phases) against PostgreSQL 15 (REPEATABLE READ) on the same
    /// machine, over a client sweep, ABBA pairs on fresh servers: a Markdown table of
    /// medians, ratios against PostgreSQL and abort rates, plus JSON.
    Transfers(transfer::TransferConfig),
    /// SphereDB's SQL beside PostgreSQL 15 over the PostgreSQL wire protocol: point selects,
    /// single-row inserts and upserts by primary key, and pgbench's TPC-B-like transaction,
    /// over a client sweep, ABBA pairs on fresh servers: a Markdown table of medians, ratios
    /// against PostgreSQL and abort rates, plus JSON.
    Sql(sql::SqlConfig),
    /// Change feeds beside etcd watch: write→delivery latency for one subscriber at fixed
    /// write rates and for a subscriber on each of many spheres, catch-up speed from a cursor
    /// behind many writes, and what a following feed costs kv0's throughput; ABBA pairs on
    /// fresh clusters, medians in a Markdown table, plus JSON.
    Feed(feed::FeedConfig),
    /// The timestamp oracle's throughput and latency over a client sweep, beside single-key
    /// writes on the same fresh 3-node cluster (the latency a transaction pays anyway).
    Tso {
        /// Client counts to sweep.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
        clients: Vec<usize>,
        /// Measured seconds per point and operation.
        #[arg(long, default_value_t = 5.0)]
        duration_secs: f64,
        /// Warm-up seconds per point and operation, excluded from results.
        #[arg(long, default_value_t = 1.0)]
        warmup_secs: f64,
        /// The spheredb binary [default: next to this one].
        #[arg(long)]
        spheredb_bin: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
struct Common {
    #[arg(long, value_enum, default_value = "kv0")]
    workload: Workload,
    #[arg(long, value_enum, default_value = "zipfian")]
    distribution: KeyDistribution,
    #[arg(long, value_enum, default_value = "linearizable")]
    read_consistency: ReadConsistency,
    /// Keys in the key space (preloaded before measuring).
    #[arg(long, default_value_t = DEFAULT_KEYS)]
    keys: u64,
    #[arg(long, default_value_t = DEFAULT_VALUE_SIZE_BYTES)]
    value_size_bytes: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = DEFAULT_DURATION_SECS)]
    duration_secs: f64,
    /// Warm-up seconds per run, excluded from results.
    #[arg(long, default_value_t = DEFAULT_WARMUP_SECS)]
    warmup_secs: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// HTTP/2 connections the load generator opens to each node, the same for every system
    /// (etcd: that many balanced channels, each with a connection to every member); its
    /// clients take them in turn.
    #[arg(long, default_value_t = DEFAULT_CONNECTIONS_PER_NODE,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_CONNECTIONS_PER_NODE as u64))]
    connections: usize,
    /// The spheredb binary [default: next to this one].
    #[arg(long)]
    spheredb_bin: Option<PathBuf>,
    /// The etcd binary (Debian: apt-get install -y etcd-server).
    #[arg(long, default_value = "etcd")]
    etcd_bin: PathBuf,
}

impl Common {
    fn run_config(&self, clients: usize, rate: Option<f64>) -> RunConfig {
        RunConfig {
            workload: self.workload,
            clients,
            rate_ops_per_sec: rate,
            warmup_secs: self.warmup_secs,
            duration_secs: self.duration_secs,
            keys: self.keys,
            value_size_bytes: self.value_size_bytes,
            distribution: self.distribution,
            consistency: self.read_consistency,
            seed: self.seed,
            connections: self.connections,
        }
    }

    fn spheredb_bin(&self) -> PathBuf {
        self.spheredb_bin
            .clone()
            .unwrap_or_else(target::default_spheredb_bin)
    }
}

async fn main_inner() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Run {
            target: system,
            endpoints,
            clients,
            rate,
            no_preload,
            common,
        } => {
            let cfg = common.run_config(clients, rate);
            let result = if endpoints.is_empty() {
                compare::fresh_run(system, &cfg, &common.spheredb_bin(), &common.etcd_bin).await?
            } else {
                let cluster = target::Cluster::existing(system, endpoints);
                let mut conn = Conn::connect(&cluster, &cfg).await?;
                if !no_preload {
                    runner::preload(&mut conn, &cfg).await?;
                }
                runner::run(system, conn, &cfg, &[]).await?
            };
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
        Cmd::Compare {
            clients,
            rates,
            systems,
            pairs,
            out_dir,
            common,
        } => {
            anyhow::ensure!(pairs > 0, "--pairs must be at least 1");
            let md = compare::run(compare::CompareConfig {
                base: common.run_config(1, None),
                client_sweep: clients,
                rate_sweep: rates,
                systems,
                pairs,
                spheredb_bin: common.spheredb_bin(),
                etcd_bin: common.etcd_bin.clone(),
                out_dir: out_dir.clone(),
            })
            .await?;
            println!("{md}");
            eprintln!(
                "wrote {0}/compare.md, {0}/compare.json, {0}/compare.svg",
                out_dir.display()
            );
        }
        Cmd::Transfers(cfg) => {
            let out_dir = cfg.out_dir.clone();
            let md = transfer::run(cfg).await?;
            println!("{md}");
            eprintln!(
                "wrote {0}/transfers.md, {0}/transfers.json",
                out_dir.display()
            );
        }
        Cmd::Sql(cfg) => {
            let out_dir = cfg.out_dir.clone();
            let md = sql::run(cfg).await?;
            println!("{md}");
            eprintln!("wrote {0}/sql.md, {0}/sql.json", out_dir.display());
        }
        Cmd::Feed(cfg) => {
            let out_dir = cfg.out_dir.clone();
            let md = feed::run(cfg).await?;
            println!("{md}");
            eprintln!("wrote {0}/feed.md, {0}/feed.json", out_dir.display());
        }
        Cmd::Tso {
            clients,
            duration_secs,
            warmup_secs,
            spheredb_bin,
        } => {
            let md = tso::run(&tso::TsoConfig {
                clients,
                duration_secs,
                warmup_secs,
                spheredb_bin: spheredb_bin.unwrap_or_else(target::default_spheredb_bin),
            })
            .await?;
            println!("{md}");
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    if let Err(e) = main_inner().await {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}
