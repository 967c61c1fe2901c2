//! `transfers`: money moved between two accounts in one transaction (read both balances,
//! write both), in SphereDB with both accounts in one range (one-phase commit) and in two
//! ranges (Percolator's two phases), and in PostgreSQL 15 under REPEATABLE READ, over a
//! client sweep. Every system retries its own conflicts (SphereDB's write conflicts and
//! locks, PostgreSQL's serialization failures and deadlocks) with the same bounded,
//! jittered backoff; the abort rate is the share of attempts that ended in a conflict.
//! Pairs run in ABBA order on fresh servers, as `compare` does; ratios are throughput over
//! PostgreSQL's in the same pair. Each run ends by checking that the accounts still hold
//! the money they started with.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::Rng;
use serde::Serialize;
use spheredb_client::{Client, ClientError};

use crate::closed_loop::{
    self, Failure, Measured, Point, MAX_ATTEMPTS, RETRY_BACKOFF_INITIAL_MS, RETRY_BACKOFF_MAX_MS,
};
use crate::compare::pair_order;
use crate::postgres::PgServer;
use crate::target::{self, System, BENCH_SPHERE};

/// Every account's opening balance.
pub const OPENING_BALANCE: i64 = 1_000_000;
/// Transfers move 1 to this much.
pub const MAX_TRANSFER_AMOUNT: i64 = 100;
/// How long the benchmark waits for the meta range to list the split's new range.
const SPLIT_VISIBLE_POLLS: usize = 100;
const SPLIT_VISIBLE_POLL_MS: u64 = 100;
/// Accounts per page of the closing balance check.
const TOTAL_SCAN_PAGE_KEYS: u32 = 1_000;
/// PostgreSQL connections kept for setup and the closing check.
const SETUP_CONNECTIONS: usize = 4;
/// Accounts per preload write.
const PRELOAD_CHUNK_ACCOUNTS: usize = 128;

/// A system the transfer benchmark drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum TxnSystem {
    /// SphereDB, both accounts of a transfer in one range: a one-phase commit.
    #[value(name = "spheredb-1pc")]
    #[serde(rename = "spheredb-1pc")]
    Spheredb1pc,
    /// SphereDB, the accounts in two ranges: prewrite, commit the primary, then the
    /// secondary.
    #[value(name = "spheredb-2pc")]
    #[serde(rename = "spheredb-2pc")]
    Spheredb2pc,
    /// PostgreSQL 15, one server, REPEATABLE READ.
    #[serde(rename = "postgres")]
    Postgres,
}

impl std::fmt::Display for TxnSystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TxnSystem::Spheredb1pc => "spheredb-1pc",
            TxnSystem::Spheredb2pc => "spheredb-2pc",
            TxnSystem::Postgres => "postgres",
        })
    }
}

/// Default accounts of the transfer benchmark.
pub const DEFAULT_ACCOUNTS: u64 = 10_000;

/// Everything the benchmark needs (the `transfers` command's arguments).
#[derive(clap::Args)]
pub struct TransferConfig {
    /// Client counts to sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub clients: Vec<usize>,
    /// Systems compared; every pair runs each once, in alternating order (ABBA).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "spheredb-1pc,spheredb-2pc,postgres"
    )]
    pub systems: Vec<TxnSystem>,
    /// Pairs per point (each system once per pair).
    #[arg(long, default_value_t = 2)]
    pub pairs: usize,
    /// Accounts in all (uniformly chosen; fewer accounts, more conflicts); SphereDB keeps
    /// half in each of two ranges.
    #[arg(long, default_value_t = DEFAULT_ACCOUNTS)]
    pub accounts: u64,
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
    /// Where transfers.md and transfers.json go.
    #[arg(long, default_value = "bench-results/transfers")]
    pub out_dir: PathBuf,
}

/// One run's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct TransferResult {
    pub system: TxnSystem,
    pub clients: usize,
    /// Transfers committed within the measured window.
    pub transfers: u64,
    pub transfers_per_sec: f64,
    /// Attempts in the window, and those that ended in a conflict and were retried.
    pub attempts: u64,
    pub aborts: u64,
    /// Transfers that failed for another reason or ran out of attempts.
    pub errors: u64,
    /// From a transfer's first attempt to its commit, retries included.
    pub p50_us: u64,
    pub p99_us: u64,
}

closed_loop::measured!(TransferResult, transfers_per_sec);

/// The key of account `i` (SphereDB): the first half under `acct/a/`, the second under
/// `acct/b/`, with a range boundary at `acct/b/`.
fn account_key(i: u64, accounts: u64) -> Vec<u8> {
    let half = accounts / 2;
    if i < half {
        format!("acct/a/{i:010}").into_bytes()
    } else {
        format!("acct/b/{:010}", i - half).into_bytes()
    }
}

/// Two distinct accounts: from one half (`same_half`) or one from each.
fn pick_accounts(rng: &mut StdRng, accounts: u64, same_half: bool) -> (u64, u64) {
    let half = accounts / 2;
    if same_half {
        let base = if rng.random_bool(0.5) { 0 } else { half };
        let a = rng.random_range(0..half);
        let mut b = rng.random_range(0..half - 1);
        if b >= a {
            b += 1;
        }
        (base + a, base + b)
    } else {
        let a = rng.random_range(0..half);
        let b = half + rng.random_range(0..half);
        if rng.random_bool(0.5) {
            (a, b)
        } else {
            (b, a)
        }
    }
}

fn parse_balance(v: Option<Vec<u8>>, key: &[u8]) -> Result<i64, Failure> {
    let v = v.ok_or_else(|| {
        Failure::Other(anyhow::anyhow!(
            "account {} is missing",
            String::from_utf8_lossy(key)
        ))
    })?;
    std::str::from_utf8(&v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            Failure::Other(anyhow::anyhow!(
                "account {} holds no balance",
                String::from_utf8_lossy(key)
            ))
        })
}

fn spheredb_failure(e: ClientError) -> Failure {
    match e {
        ClientError::WriteConflict { .. }
        | ClientError::Locked { .. }
        | ClientError::TxnAborted(_) => Failure::Conflict,
        other => Failure::Other(other.into()),
    }
}

/// A client's connection to the system under test.
enum Session {
    Spheredb(Client),
    Postgres {
        client: tokio_postgres::Client,
        select: tokio_postgres::Statement,
        update: tokio_postgres::Statement,
    },
}

const PG_SELECT: &str = "SELECT id, balance FROM accounts WHERE id = $1 OR id = $2";
const PG_UPDATE: &str = "UPDATE accounts SET balance = $2 WHERE id = $1";

impl Session {
    async fn spheredb_attempt(
        client: &Client,
        from: Vec<u8>,
        to: Vec<u8>,
        amount: i64,
    ) -> Result<(), Failure> {
        let mut txn = client.begin().await.map_err(spheredb_failure)?;
        let result = async {
            let a = parse_balance(
                txn.get(BENCH_SPHERE, &from)
                    .await
                    .map_err(spheredb_failure)?,
                &from,
            )?;
            let b = parse_balance(
                txn.get(BENCH_SPHERE, &to).await.map_err(spheredb_failure)?,
                &to,
            )?;
            txn.put(BENCH_SPHERE, &from, (a - amount).to_string().as_bytes())
                .map_err(spheredb_failure)?;
            txn.put(BENCH_SPHERE, &to, (b + amount).to_string().as_bytes())
                .map_err(spheredb_failure)?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => txn.commit().await.map_err(spheredb_failure),
            Err(e) => {
                txn.rollback().await.ok();
                Err(e)
            }
        }
    }

    async fn postgres_attempt(
        client: &mut tokio_postgres::Client,
        select: &tokio_postgres::Statement,
        update: &tokio_postgres::Statement,
        from: i64,
        to: i64,
        amount: i64,
    ) -> Result<(), Failure> {
        let pg = |e: tokio_postgres::Error| {
            let conflict = e.code().is_some_and(|c| {
                *c == tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
                    || *c == tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED
            });
            if conflict {
                Failure::Conflict
            } else {
                Failure::Other(e.into())
            }
        };
        let txn = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await
            .map_err(pg)?;
        let rows = txn.query(select, &[&from, &to]).await.map_err(pg)?;
        let balance = |id: i64| -> Result<i64, Failure> {
            rows.iter()
                .find(|r| r.get::<_, i64>(0) == id)
                .map(|r| r.get::<_, i64>(1))
                .ok_or_else(|| Failure::Other(anyhow::anyhow!("account {id} is missing")))
        };
        let (a, b) = (balance(from)?, balance(to)?);
        // Rows are updated in id order so that two transfers never deadlock on each other.
        let mut updates = [(from, a - amount), (to, b + amount)];
        updates.sort_unstable();
        for (id, balance) in updates {
            txn.execute(update, &[&id, &balance]).await.map_err(pg)?;
        }
        // Dropping the transaction on an error above rolls it back.
        txn.commit().await.map_err(pg)
    }

    async fn attempt(
        &mut self,
        from: u64,
        to: u64,
        accounts: u64,
        amount: i64,
    ) -> Result<(), Failure> {
        match self {
            Session::Spheredb(client) => {
                Self::spheredb_attempt(
                    client,
                    account_key(from, accounts),
                    account_key(to, accounts),
                    amount,
                )
                .await
            }
            Session::Postgres {
                client,
                select,
                update,
            } => {
                Self::postgres_attempt(client, select, update, from as i64, to as i64, amount).await
            }
        }
    }
}

/// One client of the run: its session and how it picks accounts.
struct TransferClient {
    session: Session,
    accounts: u64,
    same_half: bool,
}

impl closed_loop::Client for TransferClient {
    /// From, to, amount.
    type Op = (u64, u64, i64);

    fn pick(&mut self, rng: &mut StdRng) -> Self::Op {
        let (from, to) = pick_accounts(rng, self.accounts, self.same_half);
        (from, to, rng.random_range(1..=MAX_TRANSFER_AMOUNT))
    }

    async fn attempt(&mut self, &(from, to, amount): &Self::Op) -> Result<(), Failure> {
        self.session.attempt(from, to, self.accounts, amount).await
    }
}

/// A fresh server of `system` with its accounts loaded.
enum Server {
    /// The cluster's processes live as long as this value.
    Spheredb {
        _cluster: target::Cluster,
        client: Client,
    },
    Postgres(PgServer),
}

impl Server {
    async fn start(system: TxnSystem, cfg: &TransferConfig) -> anyhow::Result<Server> {
        match system {
            TxnSystem::Spheredb1pc | TxnSystem::Spheredb2pc => {
                // Load-based splits off: the accounts stay in exactly the two ranges made here.
                let cluster =
                    target::start_spheredb(&cfg.spheredb_bin, 3, System::SpheredbOneRange).await?;
                let client = Client::connect(&cluster.endpoints, Default::default()).await?;
                client
                    .split(&spheredb_client::kv_key(BENCH_SPHERE, b"acct/b/"))
                    .await
                    .context("splitting the accounts into two ranges")?;
                // Load-based splits are off: the two halves must be exactly two ranges, or
                // `1pc` would not be one phase and `2pc` not two ranges.
                // The meta range lists the new range a moment after the split answers.
                let mut ranges = 0;
                for _ in 0..SPLIT_VISIBLE_POLLS {
                    ranges = target::spheredb_user_ranges(&cluster.endpoints).await?;
                    if ranges == 2 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(SPLIT_VISIBLE_POLL_MS)).await;
                }
                if ranges != 2 {
                    bail!("the accounts are in {ranges} ranges after the split, not 2");
                }
                let mut ops = Vec::new();
                for i in 0..cfg.accounts {
                    ops.push((
                        account_key(i, cfg.accounts),
                        Some(OPENING_BALANCE.to_string().into_bytes()),
                    ));
                    if ops.len() == PRELOAD_CHUNK_ACCOUNTS || i + 1 == cfg.accounts {
                        client
                            .batch(BENCH_SPHERE, &std::mem::take(&mut ops))
                            .await?;
                    }
                }
                Ok(Server::Spheredb {
                    _cluster: cluster,
                    client,
                })
            }
            TxnSystem::Postgres => {
                let port = std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port();
                let server = PgServer::start(&cfg.pg_bin_dir, port)?;
                let client = server.connect().await?;
                client
                    .batch_execute(&format!(
                        "CREATE TABLE accounts (id BIGINT PRIMARY KEY, balance BIGINT NOT NULL);
                         INSERT INTO accounts SELECT g, {OPENING_BALANCE}
                           FROM generate_series(0, {}) AS g;",
                        cfg.accounts - 1
                    ))
                    .await
                    .context("loading PostgreSQL's accounts")?;
                // Apart: VACUUM cannot run in the implicit transaction of a multi-statement query.
                client
                    .batch_execute("VACUUM ANALYZE accounts")
                    .await
                    .context("vacuuming PostgreSQL's accounts")?;
                Ok(Server::Postgres(server))
            }
        }
    }

    async fn session(&self) -> anyhow::Result<Session> {
        match self {
            Server::Spheredb { client, .. } => Ok(Session::Spheredb(client.clone())),
            Server::Postgres(server) => {
                let client = server.connect().await?;
                let select = client.prepare(PG_SELECT).await?;
                let update = client.prepare(PG_UPDATE).await?;
                Ok(Session::Postgres {
                    client,
                    select,
                    update,
                })
            }
        }
    }

    /// The money in all accounts, read in one snapshot.
    async fn total_balance(&self, accounts: u64) -> anyhow::Result<i64> {
        match self {
            Server::Spheredb { client, .. } => {
                let mut txn = client.begin().await?;
                let (mut total, mut found) = (0, 0u64);
                let mut from = b"acct/".to_vec();
                loop {
                    let page = txn
                        .scan(BENCH_SPHERE, &from, b"acct0", TOTAL_SCAN_PAGE_KEYS)
                        .await?;
                    let Some(last) = page.last() else { break };
                    from = last.key.clone();
                    from.push(0);
                    for kv in &page {
                        found += 1;
                        total += parse_balance(Some(kv.value.clone()), &kv.key)
                            .map_err(|_| anyhow::anyhow!("a balance does not parse"))?;
                    }
                }
                txn.rollback().await?;
                if found != accounts {
                    bail!("{found} accounts found, {accounts} loaded");
                }
                Ok(total)
            }
            Server::Postgres(server) => {
                let client = server.connect().await?;
                let row = client
                    .query_one("SELECT sum(balance)::BIGINT, count(*) FROM accounts", &[])
                    .await?;
                let count: i64 = row.get(1);
                if count as u64 != accounts {
                    bail!("{count} accounts found, {accounts} loaded");
                }
                Ok(row.get(0))
            }
        }
    }
}

/// One closed-loop run of `clients` clients against a fresh server of `system`.
async fn run_one(
    system: TxnSystem,
    clients: usize,
    seed: u64,
    cfg: &TransferConfig,
) -> anyhow::Result<TransferResult> {
    let server = Server::start(system, cfg).await?;
    // Every client's connection before the clock starts: 64 PostgreSQL connections and
    // their prepared statements are setup, not warm-up.
    let same_half = system != TxnSystem::Spheredb2pc;
    let mut sessions = Vec::with_capacity(clients);
    for _ in 0..clients {
        sessions.push(TransferClient {
            session: server.session().await?,
            accounts: cfg.accounts,
            same_half,
        });
    }
    let totals = closed_loop::run(sessions, seed, cfg.warmup_secs, cfg.duration_secs).await?;
    let money = server.total_balance(cfg.accounts).await?;
    let expected = OPENING_BALANCE * cfg.accounts as i64;
    if money != expected {
        bail!("{system}: the accounts hold {money} after the run, {expected} before");
    }
    let result = TransferResult {
        system,
        clients,
        transfers: totals.done,
        transfers_per_sec: totals.done as f64 / cfg.duration_secs,
        attempts: totals.attempts,
        aborts: totals.aborts,
        errors: totals.errors,
        p50_us: totals.latency_us.value_at_quantile(0.50),
        p99_us: totals.latency_us.value_at_quantile(0.99),
    };
    drop(server);
    Ok(result)
}

/// One row of the report: a system at a client count, medians over its pairs.
#[derive(Serialize)]
struct Row {
    clients: usize,
    system: TxnSystem,
    transfers_per_sec: f64,
    #[serde(flatten)]
    point: Point,
}

fn rows_of(
    clients: &[usize],
    systems: &[TxnSystem],
    results: &[(usize, TransferResult)],
) -> Vec<Row> {
    let mut rows = Vec::new();
    for &c in clients {
        let of = |s: TxnSystem| -> Vec<&(usize, TransferResult)> {
            results
                .iter()
                .filter(|(_, r)| r.clients == c && r.system == s)
                .collect()
        };
        let pg = of(TxnSystem::Postgres);
        for &system in systems {
            let baseline = (system != TxnSystem::Postgres).then_some(pg.as_slice());
            let point = Point::of(&of(system), baseline);
            rows.push(Row {
                clients: c,
                system,
                transfers_per_sec: point.throughput,
                point,
            });
        }
    }
    rows
}

/// Runs the sweep and writes `transfers.md` and `transfers.json` into the output directory.
pub async fn run(cfg: TransferConfig) -> anyhow::Result<String> {
    anyhow::ensure!(!cfg.systems.is_empty(), "--systems names no system");
    anyhow::ensure!(
        cfg.accounts >= 4,
        "--accounts must be at least 4 (two in each range)"
    );
    closed_loop::check_sweep(
        &cfg.clients,
        cfg.pairs,
        cfg.duration_secs,
        cfg.warmup_secs,
        SETUP_CONNECTIONS,
    )?;
    std::fs::create_dir_all(&cfg.out_dir)?;
    let total_runs = cfg.clients.len() * cfg.pairs * cfg.systems.len();
    let mut done = 0;
    let mut results = Vec::new();
    for &clients in &cfg.clients {
        for pair in 0..cfg.pairs {
            for system in pair_order(&cfg.systems, pair) {
                done += 1;
                eprintln!(
                    "[{done}/{total_runs}] {system} clients={clients} pair={}",
                    pair + 1
                );
                let seed = cfg.seed.wrapping_add(pair as u64);
                let r = run_one(system, clients, seed, &cfg).await?;
                eprintln!("    {}", r.summary("transfers"));
                results.push((pair, r));
            }
        }
    }
    let pg_version = cfg.systems.contains(&TxnSystem::Postgres).then(|| {
        crate::postgres::version(&cfg.pg_bin_dir).unwrap_or_else(|e| format!("unknown ({e:#})"))
    });
    let rows = rows_of(&cfg.clients, &cfg.systems, &results);
    let mut md = format!(
        "Transfers: read two balances, write both, in one transaction; {} accounts (uniform), \
         {} s measured after {} s warm-up, {} pairs per point (order alternating ABBA), fresh \
         servers per run, {} cores. SphereDB: 3 nodes, replication factor 3, the accounts in \
         two ranges; `1pc` moves money within a range, `2pc` across the two. PostgreSQL{}: one \
         server, fsync and synchronous_commit on, REPEATABLE READ. Conflicts are retried (at \
         most {MAX_ATTEMPTS} attempts, jittered backoff {RETRY_BACKOFF_INITIAL_MS}–\
         {RETRY_BACKOFF_MAX_MS} ms); the abort rate is the share of attempts that ended in a \
         conflict. Latency runs from a transfer's first attempt to its commit. Medians; ratios \
         are throughput over PostgreSQL's in the same pair. Every run ends with the total of \
         all balances checked.\n\n",
        cfg.accounts,
        cfg.duration_secs,
        cfg.warmup_secs,
        cfg.pairs,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        pg_version
            .as_ref()
            .map_or(String::new(), |v| format!(" ({v})")),
    );
    md.push_str("| clients | system | transfers/s | vs PostgreSQL | per-pair | p50 / p99 ms | abort rate | errors |\n");
    md.push_str("|---:|---|---:|---:|---|---:|---:|---:|\n");
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {} |\n",
            r.clients,
            r.system,
            r.point.cells()
        ));
    }
    let runs: Vec<&TransferResult> = results.iter().map(|(_, r)| r).collect();
    let json = serde_json::json!({
        "accounts": cfg.accounts,
        "duration_secs": cfg.duration_secs,
        "warmup_secs": cfg.warmup_secs,
        "postgres": pg_version,
        "rows": rows,
        "runs": runs,
    });
    closed_loop::write_report(&cfg.out_dir, "transfers", &md, &json)?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn one_phase_pairs_stay_in_a_half_and_two_phase_pairs_cross() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..1000 {
            let (a, b) = pick_accounts(&mut rng, 10, true);
            assert_ne!(a, b);
            assert_eq!(a < 5, b < 5);
            assert_eq!(
                account_key(a, 10)[..7],
                account_key(b, 10)[..7],
                "one range's prefix"
            );
            let (a, b) = pick_accounts(&mut rng, 10, false);
            assert_ne!(a < 5, b < 5);
            assert!(a < 10 && b < 10);
        }
    }

    #[test]
    fn account_keys_split_at_the_range_boundary() {
        assert!(account_key(4, 10) < b"acct/b/".to_vec());
        assert!(account_key(5, 10) >= b"acct/b/".to_vec());
        assert!(account_key(9, 10) < b"acct0".to_vec());
    }

    fn result(system: TxnSystem, tps: f64) -> TransferResult {
        TransferResult {
            system,
            clients: 16,
            transfers: tps as u64,
            transfers_per_sec: tps,
            attempts: 100,
            aborts: 10,
            errors: 0,
            p50_us: 1000,
            p99_us: 5000,
        }
    }

    #[test]
    fn ratios_are_per_pair_against_postgres() {
        let systems = [TxnSystem::Spheredb1pc, TxnSystem::Postgres];
        let results = vec![
            (0, result(TxnSystem::Spheredb1pc, 300.0)),
            (0, result(TxnSystem::Postgres, 400.0)),
            (1, result(TxnSystem::Postgres, 500.0)),
            (1, result(TxnSystem::Spheredb1pc, 250.0)),
        ];
        let rows = rows_of(&[16], &systems, &results);
        assert_eq!(rows[0].point.pair_ratios_vs_postgres, vec![0.75, 0.5]);
        assert_eq!(rows[0].point.ratio_vs_postgres, Some(0.625));
        assert!((rows[0].point.abort_rate - 0.1).abs() < 1e-9);
        assert_eq!(rows[1].point.ratio_vs_postgres, None);
    }
}
