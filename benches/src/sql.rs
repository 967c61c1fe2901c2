//! `sql`: SphereDB's SQL beside PostgreSQL 15 on the same machine, both driven over the
//! PostgreSQL wire protocol by the same driver (tokio-postgres, prepared statements), with
//! the same schema, the same data and fsync on: point selects and single-row inserts and
//! upserts by primary key, and pgbench's TPC-B-like transaction, over a client sweep. Pairs
//! run in ABBA order on fresh servers; ratios are throughput over PostgreSQL's in the same
//! pair. Both systems retry their conflicts (SQLSTATE 40001, and PostgreSQL's deadlocks)
//! the same way; every TPC-B run ends by checking that the balances add up.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::Rng;
use serde::Serialize;
use tokio_postgres::error::SqlState;
use tokio_postgres::{IsolationLevel, Statement};

use crate::closed_loop::{
    self, Failure, Measured, Point, MAX_ATTEMPTS, RETRY_BACKOFF_INITIAL_MS, RETRY_BACKOFF_MAX_MS,
};
use crate::compare::pair_order;
use crate::postgres::PgServer;
use crate::target::{self, System};

/// Rows per INSERT while loading, and connections loading at once.
const LOAD_CHUNK_ROWS: u64 = 500;
const LOAD_CONNECTIONS: usize = 8;
/// Tellers per branch, as in TPC-B.
const TELLERS_PER_BRANCH: u64 = 10;
/// TPC-B's deltas: -5000 to 5000.
const MAX_TPCB_DELTA: i64 = 5_000;
/// Characters of each row's text value.
const VALUE_CHARS: usize = 100;
/// Inserted ids start here, a block per client, above every loaded id.
const INSERT_ID_BLOCK: i64 = 1_000_000_000;

/// What the clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SqlWorkload {
    /// `SELECT v FROM items WHERE sphere_id = $1 AND id = $2`, uniform over the loaded rows.
    PointSelect,
    /// A single-row INSERT of a new primary key.
    Insert,
    /// A single-row `INSERT ... ON CONFLICT (sphere_id, id) DO UPDATE` of a loaded row.
    Upsert,
    /// pgbench's TPC-B-like transaction: update an account, read it back, update its teller
    /// and branch, insert a history row (BEGIN, five statements, COMMIT), a branch per sphere.
    Tpcb,
}

impl std::fmt::Display for SqlWorkload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SqlWorkload::PointSelect => "point-select",
            SqlWorkload::Insert => "insert",
            SqlWorkload::Upsert => "upsert",
            SqlWorkload::Tpcb => "tpcb",
        })
    }
}

/// The systems compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SqlSystem {
    /// Three SphereDB nodes (replication factor 3), clients spread over their SQL ports.
    Spheredb,
    /// One PostgreSQL 15 server.
    Postgres,
}

impl std::fmt::Display for SqlSystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SqlSystem::Spheredb => "spheredb",
            SqlSystem::Postgres => "postgres",
        })
    }
}

/// The `sql` command's arguments.
#[derive(clap::Args)]
pub struct SqlConfig {
    /// Workloads to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "point-select,insert,upsert,tpcb"
    )]
    pub workloads: Vec<SqlWorkload>,
    /// Client counts to sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub clients: Vec<usize>,
    /// Systems compared; every pair runs each once, in alternating order (ABBA).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "spheredb,postgres"
    )]
    pub systems: Vec<SqlSystem>,
    /// Pairs per point (each system once per pair).
    #[arg(long, default_value_t = 2)]
    pub pairs: usize,
    /// Spheres (TPC-B: branches) the rows are spread over.
    #[arg(long, default_value_t = 100)]
    pub spheres: u64,
    /// Loaded rows per sphere (TPC-B: accounts per branch).
    #[arg(long, default_value_t = 100)]
    pub rows_per_sphere: u64,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 10.0)]
    pub duration_secs: f64,
    /// Warm-up seconds per run, excluded from results.
    #[arg(long, default_value_t = 3.0)]
    pub warmup_secs: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The spheredb binary [default: next to this one].
    #[arg(long, default_value_os_t = target::default_spheredb_bin())]
    pub spheredb_bin: PathBuf,
    /// PostgreSQL's server binaries (initdb, pg_ctl, postgres).
    #[arg(long, default_value = crate::postgres::DEFAULT_PG_BIN_DIR)]
    pub pg_bin_dir: PathBuf,
    /// Where sql.md and sql.json go.
    #[arg(long, default_value = "bench-results/sql")]
    pub out_dir: PathBuf,
}

/// The schema, the same text for both systems (SphereDB's rule: keys begin with sphere_id).
const SCHEMA: &[&str] = &[
    "CREATE TABLE items (sphere_id BIGINT NOT NULL, id BIGINT NOT NULL, v TEXT, \
     PRIMARY KEY (sphere_id, id))",
    "CREATE TABLE branches (sphere_id BIGINT NOT NULL, bbalance BIGINT NOT NULL, \
     PRIMARY KEY (sphere_id))",
    "CREATE TABLE tellers (sphere_id BIGINT NOT NULL, tid BIGINT NOT NULL, \
     tbalance BIGINT NOT NULL, PRIMARY KEY (sphere_id, tid))",
    "CREATE TABLE accounts (sphere_id BIGINT NOT NULL, aid BIGINT NOT NULL, \
     abalance BIGINT NOT NULL, PRIMARY KEY (sphere_id, aid))",
    "CREATE TABLE history (sphere_id BIGINT NOT NULL, hid UUID NOT NULL DEFAULT \
     gen_random_uuid(), tid BIGINT NOT NULL, aid BIGINT NOT NULL, delta BIGINT NOT NULL, \
     mtime TIMESTAMP, PRIMARY KEY (sphere_id, hid))",
];

const POINT_SELECT: &str = "SELECT v FROM items WHERE sphere_id = $1 AND id = $2";
const INSERT: &str =
    "INSERT INTO items (sphere_id, id, v) VALUES ($1::BIGINT, $2::BIGINT, $3::TEXT)";
const UPSERT: &str = "INSERT INTO items (sphere_id, id, v) VALUES ($1::BIGINT, $2::BIGINT, \
                      $3::TEXT) ON CONFLICT (sphere_id, id) DO UPDATE SET v = excluded.v";
const TPCB: [&str; 5] = [
    "UPDATE accounts SET abalance = abalance + $3::BIGINT WHERE sphere_id = $1 AND aid = $2",
    "SELECT abalance FROM accounts WHERE sphere_id = $1 AND aid = $2",
    "UPDATE tellers SET tbalance = tbalance + $3::BIGINT WHERE sphere_id = $1 AND tid = $2",
    "UPDATE branches SET bbalance = bbalance + $2::BIGINT WHERE sphere_id = $1",
    "INSERT INTO history (sphere_id, tid, aid, delta, mtime) VALUES ($1::BIGINT, $2::BIGINT, \
     $3::BIGINT, $4::BIGINT, CURRENT_TIMESTAMP)",
];

/// A row's text value, the same in both systems.
fn value_of(sphere: u64, id: i64) -> String {
    let seed = format!("{sphere}-{id}-");
    seed.chars().cycle().take(VALUE_CHARS).collect()
}

/// The INSERT statements that load a workload's rows.
fn load_statements(workload: SqlWorkload, cfg: &SqlConfig) -> Vec<String> {
    let mut out = Vec::new();
    let mut chunked = |table: &str, rows: Vec<String>| {
        for chunk in rows.chunks(LOAD_CHUNK_ROWS as usize) {
            out.push(format!("INSERT INTO {table} VALUES {}", chunk.join(", ")));
        }
    };
    let spheres = 1..=cfg.spheres;
    match workload {
        SqlWorkload::PointSelect | SqlWorkload::Upsert => chunked(
            "items",
            spheres
                .flat_map(|s| {
                    (0..cfg.rows_per_sphere as i64)
                        .map(move |id| format!("({s}, {id}, '{}')", value_of(s, id)))
                })
                .collect(),
        ),
        SqlWorkload::Insert => {}
        SqlWorkload::Tpcb => {
            chunked(
                "branches",
                spheres.clone().map(|s| format!("({s}, 0)")).collect(),
            );
            chunked(
                "tellers",
                spheres
                    .clone()
                    .flat_map(|s| (0..TELLERS_PER_BRANCH).map(move |t| format!("({s}, {t}, 0)")))
                    .collect(),
            );
            chunked(
                "accounts",
                spheres
                    .flat_map(|s| (0..cfg.rows_per_sphere).map(move |a| format!("({s}, {a}, 0)")))
                    .collect(),
            );
        }
    }
    out
}

/// A fresh server of a system.
enum Server {
    /// The cluster's processes live as long as this value.
    Spheredb(target::Cluster),
    Postgres(PgServer),
}

impl Server {
    async fn start(system: SqlSystem, cfg: &SqlConfig) -> anyhow::Result<Server> {
        Ok(match system {
            SqlSystem::Spheredb => Server::Spheredb(
                target::start_spheredb(&cfg.spheredb_bin, 3, System::Spheredb).await?,
            ),
            SqlSystem::Postgres => {
                let port = std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port();
                Server::Postgres(PgServer::start(&cfg.pg_bin_dir, port)?)
            }
        })
    }

    /// Connection `i`: SphereDB's are spread over the nodes.
    async fn connect(&self, i: usize) -> anyhow::Result<tokio_postgres::Client> {
        match self {
            Server::Postgres(server) => server.connect().await,
            Server::Spheredb(cluster) => {
                let addr = &cluster.sql_endpoints[i % cluster.sql_endpoints.len()];
                let (host, port) = addr
                    .rsplit_once(':')
                    .with_context(|| format!("SQL address {addr}"))?;
                let config = format!("host={host} port={port} user=spheredb dbname=spheredb");
                let (client, connection) = tokio_postgres::connect(&config, tokio_postgres::NoTls)
                    .await
                    .with_context(|| format!("connecting to SphereDB's SQL at {addr}"))?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        eprintln!("    SphereDB SQL connection ended: {e}");
                    }
                });
                Ok(client)
            }
        }
    }

    /// Creates the schema and loads the workload's rows over several connections.
    async fn load(&self, workload: SqlWorkload, cfg: &SqlConfig) -> anyhow::Result<()> {
        let setup = self.connect(0).await?;
        for ddl in SCHEMA {
            setup
                .batch_execute(ddl)
                .await
                .with_context(|| format!("running {ddl}"))?;
        }
        let statements = load_statements(workload, cfg);
        let mut tasks = Vec::new();
        for part in 0..LOAD_CONNECTIONS {
            let mine: Vec<String> = statements
                .iter()
                .skip(part)
                .step_by(LOAD_CONNECTIONS)
                .cloned()
                .collect();
            let client = self.connect(part).await?;
            tasks.push(tokio::spawn(async move {
                for s in mine {
                    // A range that splits under the load answers 40001; run it again.
                    let mut backoff_ms = RETRY_BACKOFF_INITIAL_MS;
                    for attempt in 1..=MAX_ATTEMPTS {
                        match client.batch_execute(&s).await.map_err(failure) {
                            Ok(()) => break,
                            Err(Failure::Conflict) if attempt < MAX_ATTEMPTS => {
                                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                                backoff_ms = (backoff_ms * 2).min(RETRY_BACKOFF_MAX_MS);
                            }
                            Err(Failure::Conflict) => {
                                bail!("loading the benchmark's rows: {MAX_ATTEMPTS} conflicts")
                            }
                            Err(Failure::Other(e)) => {
                                return Err(e.context("loading the benchmark's rows"))
                            }
                        }
                    }
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        if let Server::Postgres(_) = self {
            setup
                .batch_execute("VACUUM ANALYZE")
                .await
                .context("vacuuming PostgreSQL's tables")?;
        }
        Ok(())
    }

    /// Checks TPC-B's invariant: the branches, tellers and accounts each hold the sum of the
    /// history's deltas.
    async fn check_balances(&self) -> anyhow::Result<()> {
        let client = self.connect(0).await?;
        let mut sums = Vec::new();
        for (table, column) in [
            ("branches", "bbalance"),
            ("tellers", "tbalance"),
            ("accounts", "abalance"),
            ("history", "delta"),
        ] {
            let row = client
                .query_one(
                    &format!("SELECT CAST(COALESCE(SUM({column}), 0) AS BIGINT) FROM {table}"),
                    &[],
                )
                .await
                .with_context(|| format!("summing {table}"))?;
            sums.push((table, row.get::<_, i64>(0)));
        }
        if sums.iter().any(|(_, s)| *s != sums[0].1) {
            bail!("TPC-B balances do not add up: {sums:?}");
        }
        Ok(())
    }
}

/// One client: its connection, its prepared statements and how it picks rows.
struct SqlClient {
    workload: SqlWorkload,
    client: tokio_postgres::Client,
    statements: Vec<Statement>,
    spheres: u64,
    rows_per_sphere: u64,
    /// Inserts: this client's next id.
    next_id: i64,
}

/// Whether an error is a conflict the transaction should be run again for.
fn failure(e: tokio_postgres::Error) -> Failure {
    let conflict = e.code().is_some_and(|c| {
        *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    });
    if conflict {
        Failure::Conflict
    } else {
        Failure::Other(e.into())
    }
}

/// One operation's parameters: sphere, row id (TPC-B: account), teller and delta.
pub struct SqlOp {
    sphere: i64,
    id: i64,
    teller: i64,
    delta: i64,
}

impl closed_loop::Client for SqlClient {
    type Op = SqlOp;

    fn pick(&mut self, rng: &mut StdRng) -> SqlOp {
        let sphere = rng.random_range(1..=self.spheres) as i64;
        let id = match self.workload {
            SqlWorkload::Insert => {
                self.next_id += 1;
                self.next_id
            }
            _ => rng.random_range(0..self.rows_per_sphere) as i64,
        };
        SqlOp {
            sphere,
            id,
            teller: rng.random_range(0..TELLERS_PER_BRANCH) as i64,
            delta: rng.random_range(-MAX_TPCB_DELTA..=MAX_TPCB_DELTA),
        }
    }

    async fn attempt(&mut self, op: &SqlOp) -> Result<(), Failure> {
        let s = &self.statements;
        match self.workload {
            SqlWorkload::PointSelect => {
                let row = self
                    .client
                    .query_opt(&s[0], &[&op.sphere, &op.id])
                    .await
                    .map_err(failure)?;
                if row.is_none() {
                    return Err(Failure::Other(anyhow::anyhow!(
                        "row ({}, {}) is missing",
                        op.sphere,
                        op.id
                    )));
                }
                Ok(())
            }
            SqlWorkload::Insert | SqlWorkload::Upsert => {
                let v = value_of(op.sphere as u64, op.id);
                let n = self
                    .client
                    .execute(&s[0], &[&op.sphere, &op.id, &v])
                    .await
                    .map_err(failure)?;
                if n != 1 {
                    return Err(Failure::Other(anyhow::anyhow!("{n} rows written, not 1")));
                }
                Ok(())
            }
            SqlWorkload::Tpcb => {
                // REPEATABLE READ in both: SphereDB's snapshot isolation, and PostgreSQL's.
                let txn = self
                    .client
                    .build_transaction()
                    .isolation_level(IsolationLevel::RepeatableRead)
                    .start()
                    .await
                    .map_err(failure)?;
                txn.execute(&s[0], &[&op.sphere, &op.id, &op.delta])
                    .await
                    .map_err(failure)?;
                txn.query_one(&s[1], &[&op.sphere, &op.id])
                    .await
                    .map_err(failure)?;
                txn.execute(&s[2], &[&op.sphere, &op.teller, &op.delta])
                    .await
                    .map_err(failure)?;
                txn.execute(&s[3], &[&op.sphere, &op.delta])
                    .await
                    .map_err(failure)?;
                txn.execute(&s[4], &[&op.sphere, &op.teller, &op.id, &op.delta])
                    .await
                    .map_err(failure)?;
                // Dropping the transaction on an error above rolls it back.
                txn.commit().await.map_err(failure)
            }
        }
    }
}

/// One run's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct SqlResult {
    pub workload: SqlWorkload,
    pub system: SqlSystem,
    pub clients: usize,
    /// Operations (TPC-B: transactions) committed in the measured window.
    pub ops: u64,
    pub ops_per_sec: f64,
    pub attempts: u64,
    pub aborts: u64,
    pub errors: u64,
    /// From an operation's first attempt to its commit, retries included.
    pub p50_us: u64,
    pub p99_us: u64,
}

closed_loop::measured!(SqlResult, ops_per_sec);

/// One closed-loop run against a fresh, freshly loaded server.
async fn run_one(
    workload: SqlWorkload,
    system: SqlSystem,
    clients: usize,
    seed: u64,
    cfg: &SqlConfig,
) -> anyhow::Result<SqlResult> {
    let server = Server::start(system, cfg).await?;
    server.load(workload, cfg).await?;
    let texts: Vec<&str> = match workload {
        SqlWorkload::PointSelect => vec![POINT_SELECT],
        SqlWorkload::Insert => vec![INSERT],
        SqlWorkload::Upsert => vec![UPSERT],
        SqlWorkload::Tpcb => TPCB.to_vec(),
    };
    // Connections and prepared statements before the clock starts.
    let mut sessions = Vec::with_capacity(clients);
    for c in 0..clients {
        let client = server.connect(c).await?;
        let mut statements = Vec::with_capacity(texts.len());
        for t in &texts {
            statements.push(
                client
                    .prepare(t)
                    .await
                    .with_context(|| format!("preparing {t}"))?,
            );
        }
        sessions.push(SqlClient {
            workload,
            client,
            statements,
            spheres: cfg.spheres,
            rows_per_sphere: cfg.rows_per_sphere,
            next_id: INSERT_ID_BLOCK * (c as i64 + 1),
        });
    }
    let totals = closed_loop::run(sessions, seed, cfg.warmup_secs, cfg.duration_secs).await?;
    if workload == SqlWorkload::Tpcb {
        server.check_balances().await?;
    }
    Ok(SqlResult {
        workload,
        system,
        clients,
        ops: totals.done,
        ops_per_sec: totals.done as f64 / cfg.duration_secs,
        attempts: totals.attempts,
        aborts: totals.aborts,
        errors: totals.errors,
        p50_us: totals.latency_us.value_at_quantile(0.50),
        p99_us: totals.latency_us.value_at_quantile(0.99),
    })
}

/// One row of the report: medians over a point's pairs.
#[derive(Debug, Serialize)]
struct Row {
    workload: SqlWorkload,
    clients: usize,
    system: SqlSystem,
    ops_per_sec: f64,
    #[serde(flatten)]
    point: Point,
}

fn rows_of(cfg: &SqlConfig, results: &[(usize, SqlResult)]) -> Vec<Row> {
    let mut rows = Vec::new();
    for &workload in &cfg.workloads {
        for &clients in &cfg.clients {
            let of = |s: SqlSystem| -> Vec<&(usize, SqlResult)> {
                results
                    .iter()
                    .filter(|(_, r)| {
                        r.workload == workload && r.clients == clients && r.system == s
                    })
                    .collect()
            };
            let pg = of(SqlSystem::Postgres);
            for &system in &cfg.systems {
                let baseline = (system != SqlSystem::Postgres).then_some(pg.as_slice());
                let point = Point::of(&of(system), baseline);
                rows.push(Row {
                    workload,
                    clients,
                    system,
                    ops_per_sec: point.throughput,
                    point,
                });
            }
        }
    }
    rows
}

/// Runs every workload over the sweep and writes `sql.md` and `sql.json`.
pub async fn run(cfg: SqlConfig) -> anyhow::Result<String> {
    anyhow::ensure!(!cfg.systems.is_empty(), "--systems names no system");
    anyhow::ensure!(!cfg.workloads.is_empty(), "--workloads names no workload");
    anyhow::ensure!(
        cfg.spheres > 0 && cfg.rows_per_sphere > 0,
        "--spheres and --rows-per-sphere must be at least 1"
    );
    closed_loop::check_sweep(
        &cfg.clients,
        cfg.pairs,
        cfg.duration_secs,
        cfg.warmup_secs,
        LOAD_CONNECTIONS + 2,
    )?;
    std::fs::create_dir_all(&cfg.out_dir)?;
    let total_runs = cfg.workloads.len() * cfg.clients.len() * cfg.pairs * cfg.systems.len();
    let mut done = 0;
    let mut results = Vec::new();
    for &workload in &cfg.workloads {
        for &clients in &cfg.clients {
            for pair in 0..cfg.pairs {
                for system in pair_order(&cfg.systems, pair) {
                    done += 1;
                    eprintln!(
                        "[{done}/{total_runs}] {workload} {system} clients={clients} pair={}",
                        pair + 1
                    );
                    let seed = cfg.seed.wrapping_add(pair as u64);
                    let r = run_one(workload, system, clients, seed, &cfg)
                        .await
                        .with_context(|| {
                            format!("{workload} on {system} with {clients} clients")
                        })?;
                    eprintln!("    {}", r.summary("ops"));
                    results.push((pair, r));
                }
            }
        }
    }
    let pg_version = cfg.systems.contains(&SqlSystem::Postgres).then(|| {
        crate::postgres::version(&cfg.pg_bin_dir).unwrap_or_else(|e| format!("unknown ({e:#})"))
    });
    let rows = rows_of(&cfg, &results);
    let mut md = format!(
        "SQL over the PostgreSQL wire protocol, the same driver (tokio-postgres, prepared \
         statements), schema and data for both: {} spheres × {} rows (TPC-B: a branch per \
         sphere, {TELLERS_PER_BRANCH} tellers and {} accounts each), uniform choice, {} s \
         measured after {} s warm-up, {} pairs per point (order alternating ABBA), fresh \
         servers per run, {} cores. SphereDB: 3 nodes, replication factor 3, clients spread \
         over the nodes' SQL ports. PostgreSQL{}: one server, fsync and synchronous_commit \
         on. TPC-B runs in REPEATABLE READ on both (snapshot isolation); conflicts are \
         retried (at most {MAX_ATTEMPTS} attempts, jittered backoff \
         {RETRY_BACKOFF_INITIAL_MS}–{RETRY_BACKOFF_MAX_MS} ms) and every TPC-B run ends with \
         the balances checked. Medians; ratios are throughput over PostgreSQL's in the same \
         pair.\n\n",
        cfg.spheres,
        cfg.rows_per_sphere,
        cfg.rows_per_sphere,
        cfg.duration_secs,
        cfg.warmup_secs,
        cfg.pairs,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        pg_version
            .as_ref()
            .map_or(String::new(), |v| format!(" ({v})")),
    );
    md.push_str("| workload | clients | system | ops/s | vs PostgreSQL | per-pair | p50 / p99 ms | abort rate | errors |\n");
    md.push_str("|---|---:|---|---:|---:|---|---:|---:|---:|\n");
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r.workload,
            r.clients,
            r.system,
            r.point.cells()
        ));
    }
    let runs: Vec<&SqlResult> = results.iter().map(|(_, r)| r).collect();
    let json = serde_json::json!({
        "spheres": cfg.spheres,
        "rows_per_sphere": cfg.rows_per_sphere,
        "duration_secs": cfg.duration_secs,
        "warmup_secs": cfg.warmup_secs,
        "postgres": pg_version,
        "rows": rows,
        "runs": runs,
    });
    closed_loop::write_report(&cfg.out_dir, "sql", &md, &json)?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_statements_cover_every_row_once() {
        let cfg = SqlConfig {
            workloads: vec![],
            clients: vec![1],
            systems: vec![SqlSystem::Postgres],
            pairs: 1,
            spheres: 3,
            rows_per_sphere: 400,
            duration_secs: 1.0,
            warmup_secs: 0.0,
            seed: 1,
            spheredb_bin: PathBuf::new(),
            pg_bin_dir: PathBuf::new(),
            out_dir: PathBuf::new(),
        };
        let items = load_statements(SqlWorkload::PointSelect, &cfg);
        let rows: usize = items.iter().map(|s| s.matches("'),").count() + 1).sum();
        assert_eq!(rows, 1_200);
        assert_eq!(items.len(), 3, "1,200 rows in chunks of {LOAD_CHUNK_ROWS}");
        let tpcb = load_statements(SqlWorkload::Tpcb, &cfg);
        assert!(tpcb[0].starts_with("INSERT INTO branches VALUES (1, 0), (2, 0), (3, 0)"));
        assert!(load_statements(SqlWorkload::Insert, &cfg).is_empty());
    }

    #[test]
    fn values_are_the_same_length_everywhere() {
        assert_eq!(value_of(1, 2).len(), VALUE_CHARS);
        assert_eq!(value_of(99, INSERT_ID_BLOCK * 64).len(), VALUE_CHARS);
        assert_ne!(value_of(1, 2), value_of(2, 1));
    }
}
