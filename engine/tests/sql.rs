//! SQL end to end: the sqllogictest suite (query/tests/slt) through the PostgreSQL wire
//! protocol of a 3-node cluster of real processes, and the real clients people use: psql and
//! Python's psycopg 3 (installed by scripts/install-sql-test-deps.sh).

mod common;

use std::path::PathBuf;
use std::process::Command;

use async_trait::async_trait;
use common::ProcCluster;
use sqllogictest::{DBOutput, DefaultColumnType};
use tokio_postgres::{NoTls, SimpleQueryMessage};

/// One connection of the sqllogictest runner: statements go over the simple query protocol,
/// as psql sends them, and come back as PostgreSQL's text.
struct PgConnection {
    client: tokio_postgres::Client,
}

#[derive(Debug)]
struct SqlFailure(tokio_postgres::Error);

impl std::fmt::Display for SqlFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_db_error() {
            Some(db) => write!(f, "{} (SQLSTATE {})", db.message(), db.code().code()),
            None => write!(f, "{}", self.0),
        }
    }
}

impl std::error::Error for SqlFailure {}

async fn connect(sql_addr: &str) -> Result<PgConnection, SqlFailure> {
    let (host, port) = sql_addr.split_once(':').expect("host:port");
    let (client, connection) = tokio_postgres::connect(
        &format!("host={host} port={port} user=spheredb dbname=spheredb"),
        NoTls,
    )
    .await
    .map_err(SqlFailure)?;
    tokio::spawn(connection);
    Ok(PgConnection { client })
}

#[async_trait]
impl sqllogictest::AsyncDB for PgConnection {
    type Error = SqlFailure;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SqlFailure> {
        let messages = self.client.simple_query(sql).await.map_err(SqlFailure)?;
        let mut columns = None;
        let mut rows = Vec::new();
        let mut count = 0;
        for m in messages {
            match m {
                SimpleQueryMessage::RowDescription(c) => columns = Some(c.len()),
                SimpleQueryMessage::Row(row) => rows.push(
                    (0..row.len())
                        .map(|i| match row.get(i) {
                            None => "NULL".to_string(),
                            Some("") => "(empty)".to_string(),
                            Some(v) => v.to_string(),
                        })
                        .collect(),
                ),
                SimpleQueryMessage::CommandComplete(n) => count = n,
                _ => {}
            }
        }
        Ok(match columns {
            Some(n) => DBOutput::Rows {
                types: vec![DefaultColumnType::Any; n],
                rows,
            },
            None => DBOutput::StatementComplete(count),
        })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "spheredb"
    }

    async fn sleep(dur: std::time::Duration) {
        tokio::time::sleep(dur).await;
    }

    fn error_sql_state(err: &SqlFailure) -> Option<String> {
        err.0.code().map(|c| c.code().to_string())
    }
}

fn slt_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../query/tests/slt");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "slt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .slt files in {}", dir.display());
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sql_logic_test_suite_passes_over_the_wire_protocol() {
    let cluster = ProcCluster::start(3, &[]).await;
    // Each file gets its own node of the three, round robin, so every node's front end runs
    // some of the suite; all see the same catalog and rows.
    for (i, file) in slt_files().iter().enumerate() {
        let sql_addr = cluster.procs[i % 3].sql_addr.clone();
        common::eventually("the SQL front end to accept connections", || async {
            connect(&sql_addr).await.ok().map(|_| ())
        })
        .await;
        let mut runner = sqllogictest::Runner::new(move || {
            let sql_addr = sql_addr.clone();
            async move { connect(&sql_addr).await }
        });
        if let Err(e) = runner.run_file_async(file).await {
            panic!(
                "{}:\n{}\n--- node log ---\n{}",
                file.display(),
                e.display(true),
                cluster.log(i % 3)
            );
        }
    }
}

/// A one-node cluster whose SQL front end accepts connections, and its SQL address.
async fn one_node() -> (ProcCluster, String) {
    one_node_with(&[]).await
}

/// As [`one_node`], with extra `spheredb start` arguments.
async fn one_node_with(args: &[&str]) -> (ProcCluster, String) {
    let cluster = ProcCluster::start(1, args).await;
    let sql_addr = cluster.procs[0].sql_addr.clone();
    common::eventually("the SQL front end to accept connections", || async {
        connect(&sql_addr).await.ok().map(|_| ())
    })
    .await;
    (cluster, sql_addr)
}

/// The SQLSTATE `statement` fails with (the test fails if it succeeds).
async fn refused(sql: &tokio_postgres::Client, statement: &str) -> String {
    match sql.batch_execute(statement).await {
        Ok(()) => panic!("{statement} succeeded"),
        Err(e) => e
            .code()
            .map(|c| c.code().to_string())
            .unwrap_or_else(|| e.to_string()),
    }
}

/// Runs `program` with `args`, failing with its output if it fails (or is not installed).
fn run(program: &str, args: &[&str], input: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{program} did not start ({e}); run scripts/install-sql-test-deps.sh")
        });
    if let Some(text) = input {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn psql_and_psycopg_create_write_query_and_retry_conflicts() {
    let cluster = ProcCluster::start(3, &[]).await;
    let sql_addr = cluster.procs[1].sql_addr.clone();
    common::eventually("the SQL front end to accept connections", || async {
        connect(&sql_addr).await.ok().map(|_| ())
    })
    .await;
    let (host, port) = sql_addr.split_once(':').unwrap();
    // psql: a script over the simple query protocol, with a transaction.
    let psql = |script: &str| {
        run(
            "psql",
            &[
                "-h",
                host,
                "-p",
                port,
                "-U",
                "spheredb",
                "-d",
                "spheredb",
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
            ],
            Some(script),
        )
    };
    psql(
        "CREATE TABLE notes (sphere_id BIGINT, id BIGINT, body TEXT NOT NULL, \
         PRIMARY KEY (sphere_id, id));\n\
         BEGIN;\n\
         INSERT INTO notes VALUES (1, 1, 'one'), (1, 2, 'two'), (2, 1, 'other sphere');\n\
         UPDATE notes SET body = 'TWO' WHERE sphere_id = 1 AND id = 2;\n\
         COMMIT;\n",
    );
    let out = psql("SELECT id, body FROM notes WHERE sphere_id = 1 ORDER BY id;");
    assert_eq!(out.trim(), "1|one\n2|TWO", "{out}");
    let out = psql("SELECT count(*) FROM notes;");
    assert_eq!(out.trim(), "3", "{out}");

    // psycopg 3: the extended query protocol with parameters, and a transaction that
    // conflicts with another, which the driver sees as SQLSTATE 40001 and runs again.
    let script = r#"
import sys, psycopg
from psycopg import errors
dsn = f"host={sys.argv[1]} port={sys.argv[2]} user=spheredb dbname=spheredb"
with psycopg.connect(dsn, autocommit=True) as conn:
    conn.execute("INSERT INTO notes (sphere_id, id, body) VALUES (%s, %s, %s)", (3, 1, "from python"))
    row = conn.execute("SELECT body FROM notes WHERE sphere_id = %s AND id = %s", (3, 1)).fetchone()
    assert row == ("from python",), row
    # Parameters are values, never SQL: a negative number after a minus is not a comment,
    # and a comment in a string stays in the string.
    assert conn.execute("SELECT 5-%s", (-3,)).fetchone()[0] == 8
    n = conn.execute("SELECT count(*) FROM notes WHERE body = %s", ("x' OR true --",)).fetchone()[0]
    assert n == 0, n
    try:
        conn.execute("SELECT 1; SELECT 2 WHERE %s", (True,))
        raise SystemExit("a prepared statement with two commands ran")
    except errors.SyntaxError:
        pass
# An error inside a transaction (here found while describing the query) fails the
# transaction until ROLLBACK, and nothing of it commits.
with psycopg.connect(dsn) as conn:
    conn.execute("INSERT INTO notes (sphere_id, id, body) VALUES (%s, %s, %s)", (3, 2, "doomed"))
    try:
        conn.execute("SELECT nosuch FROM notes WHERE sphere_id = %s", (3,))
        raise SystemExit("an unknown column was accepted")
    except errors.UndefinedColumn:
        pass
    try:
        conn.execute("SELECT 1")
        raise SystemExit("a failed transaction went on")
    except errors.InFailedSqlTransaction:
        pass
    conn.rollback()
    assert conn.execute("SELECT count(*) FROM notes WHERE sphere_id = 3 AND id = 2").fetchone()[0] == 0
a = psycopg.connect(dsn)
b = psycopg.connect(dsn)
a.execute("UPDATE notes SET body = 'a' WHERE sphere_id = 3 AND id = 1")
b.execute("UPDATE notes SET body = 'b' WHERE sphere_id = 3 AND id = 1")
a.commit()
try:
    b.commit()
    raise SystemExit("the second writer committed over the first")
except errors.SerializationFailure:
    # A failed COMMIT ends the transaction, as in PostgreSQL.
    status = b.info.transaction_status
    assert status == psycopg.pq.TransactionStatus.IDLE, status
    b.rollback()
attempts = 0
while True:
    attempts += 1
    try:
        with b.transaction():
            b.execute("UPDATE notes SET body = body || '+b' WHERE sphere_id = 3 AND id = 1")
        break
    except errors.SerializationFailure:
        if attempts >= 5:
            raise
body = b.execute("SELECT body FROM notes WHERE sphere_id = 3 AND id = 1").fetchone()[0]
assert body == "a+b", body
print("ok", attempts)
"#;
    let out = run("/usr/bin/python3", &["-c", script, host, port], None);
    assert!(out.starts_with("ok"), "{out}");
}

/// Drivers that bind typed binary parameters (tokio-postgres here; JDBC does the same) learn
/// the types of INSERT, UPDATE and DELETE parameters from Describe, and RETURNING rows come
/// back over the extended protocol with the statement's own command tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prepared_dml_binds_typed_parameters_and_returns_rows() {
    use tokio_postgres::types::Type;
    let (_cluster, sql_addr) = one_node().await;
    let client = connect(&sql_addr).await.unwrap().client;
    client
        .batch_execute(
            "CREATE TABLE kv (sphere_id BIGINT, id INT, v TEXT NOT NULL, n BIGINT, \
             PRIMARY KEY (sphere_id, id))",
        )
        .await
        .unwrap();

    let insert = client
        .prepare("INSERT INTO kv (sphere_id, id, v) VALUES ($1, $2, $3) RETURNING id, v")
        .await
        .unwrap();
    assert_eq!(insert.params(), &[Type::INT8, Type::INT4, Type::TEXT]);
    assert_eq!(insert.columns().len(), 2);
    let rows = client
        .query(&insert, &[&5i64, &7i32, &"seven"])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i32>(0), 7);
    assert_eq!(rows[0].get::<_, &str>(1), "seven");

    let upsert = client
        .prepare(
            "INSERT INTO kv (sphere_id, id, v, n) VALUES ($1, $2, $3, $4::BIGINT) \
             ON CONFLICT (sphere_id, id) DO UPDATE SET v = kv.v || excluded.v, n = excluded.n",
        )
        .await
        .unwrap();
    assert_eq!(
        upsert.params(),
        &[Type::INT8, Type::INT4, Type::TEXT, Type::INT8]
    );
    assert_eq!(
        client
            .execute(&upsert, &[&5i64, &7i32, &"!", &(1i64 << 40)])
            .await
            .unwrap(),
        1
    );

    let update = client
        .prepare("UPDATE kv SET n = n + $1 WHERE sphere_id = $2 AND id = $3")
        .await
        .unwrap();
    assert_eq!(update.params()[1..], [Type::INT8, Type::INT4]);
    let select = client
        .prepare("SELECT v, n FROM kv WHERE sphere_id = $1 AND id = $2")
        .await
        .unwrap();
    let row = client.query_one(&select, &[&5i64, &7i32]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "seven!");
    assert_eq!(row.get::<_, i64>(1), 1i64 << 40);

    // EXPLAIN answers the plan (never the rows), and the whole key is pushed into the scan.
    let plan: Vec<String> = client
        .simple_query("EXPLAIN SELECT v FROM kv WHERE sphere_id = 5 AND id = 7")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(1).unwrap_or_default().to_string()),
            _ => None,
        })
        .collect();
    let plan = plan.join("\n");
    assert!(
        plan.contains("TableScan: kv")
            && plan.contains("full_filters=[")
            && plan.contains("kv.id ="),
        "{plan}"
    );
    assert!(!plan.contains("seven"), "{plan}");

    let delete = client
        .prepare("DELETE FROM kv WHERE sphere_id = $1 AND id = $2 RETURNING n")
        .await
        .unwrap();
    assert_eq!(delete.params(), &[Type::INT8, Type::INT4]);
    let rows = client.query(&delete, &[&5i64, &7i32]).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i64>(0), 1i64 << 40);
    assert!(client
        .query_opt(&select, &[&5i64, &7i32])
        .await
        .unwrap()
        .is_none());

    // A prepared statement of a table this connection dropped and created again with other
    // columns is described again, and answered under its new columns; statements whose
    // column names come from their parameters' expressions and SHOW run as prepared.
    let all = client.prepare("SELECT * FROM kv").await.unwrap();
    assert_eq!(all.columns().len(), 4);
    client
        .batch_execute(
            "DROP TABLE kv; CREATE TABLE kv (sphere_id BIGINT, id INT, PRIMARY KEY (sphere_id, id)); \
             INSERT INTO kv VALUES (1, 2)",
        )
        .await
        .unwrap();
    let all = client.prepare("SELECT * FROM kv").await.unwrap();
    assert_eq!(all.columns().len(), 2);
    let row = client.query_one(&all, &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(1), 2);
    let upper = client
        .query_one("SELECT upper($1::TEXT)", &[&"ab"])
        .await
        .unwrap();
    assert_eq!(upper.get::<_, &str>(0), "AB");
    client.query("SHOW statement_timeout", &[]).await.unwrap();
}

/// `AS OF SYSTEM TIME` reads the rows as they were at a timestamp: in a query of its own
/// (simple and extended protocol) and in a `BEGIN AS OF SYSTEM TIME` transaction, which
/// refuses writes. A time the oracle has not reached, and the clause on statements that
/// write or inside a transaction, are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn as_of_system_time_reads_history_and_writes_nothing() {
    let (cluster, sql_addr) = one_node().await;
    let sql = connect(&sql_addr).await.unwrap().client;
    sql.batch_execute(
        "CREATE TABLE h (sphere_id BIGINT, id INT, v TEXT, PRIMARY KEY (sphere_id, id)); \
         INSERT INTO h VALUES (1, 1, 'old'); \
         CREATE TABLE gone (sphere_id BIGINT, id INT, x DOUBLE PRECISION, PRIMARY KEY (sphere_id, id)); \
         INSERT INTO gone VALUES (1, 1, 2.5)",
    )
    .await
    .unwrap();
    // Every transaction acknowledged before it took a lower timestamp; every later one, which
    // begins at a fresh timestamp, commits above it.
    let ts = cluster.client().await.timestamp().await.unwrap();
    sql.batch_execute(
        "UPDATE h SET v = 'new' WHERE sphere_id = 1 AND id = 1; INSERT INTO h VALUES (1, 2, 'later'); \
         DROP TABLE gone; CREATE TABLE gone (sphere_id BIGINT, id INT, PRIMARY KEY (sphere_id, id)); \
         CREATE TABLE later (sphere_id BIGINT, PRIMARY KEY (sphere_id))",
    )
    .await
    .unwrap();

    let rows_of = |messages: Vec<SimpleQueryMessage>| -> Vec<String> {
        messages
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("NULL"))
                        .collect::<Vec<_>>()
                        .join("|"),
                ),
                _ => None,
            })
            .collect()
    };
    let then = sql
        .simple_query(&format!(
            "SELECT id, v FROM h AS OF SYSTEM TIME {ts} WHERE sphere_id = 1 ORDER BY id"
        ))
        .await
        .unwrap();
    assert_eq!(rows_of(then), ["1|old"]);
    let now = sql
        .simple_query("SELECT id, v FROM h WHERE sphere_id = 1 ORDER BY id")
        .await
        .unwrap();
    assert_eq!(rows_of(now), ["1|new", "2|later"]);

    let prepared = sql
        .prepare(&format!(
            "SELECT v FROM h AS OF SYSTEM TIME '{ts}' WHERE sphere_id = $1 AND id = $2"
        ))
        .await
        .unwrap();
    let row = sql.query_one(&prepared, &[&1i64, &1i32]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "old");
    // Described and read over the catalog of that time: the dropped table, its columns as
    // they were (a binary FLOAT8 read as anything else would decode wrong).
    let dropped = sql
        .prepare(&format!(
            "SELECT x FROM gone AS OF SYSTEM TIME {ts} WHERE sphere_id = 1"
        ))
        .await
        .unwrap();
    assert_eq!(
        dropped.columns()[0].type_(),
        &tokio_postgres::types::Type::FLOAT8
    );
    let row = sql.query_one(&dropped, &[]).await.unwrap();
    assert_eq!(row.get::<_, f64>(0), 2.5);
    assert_eq!(
        refused(&sql, &format!("SELECT * FROM later AS OF SYSTEM TIME {ts}")).await,
        "42P01"
    );

    sql.batch_execute(&format!("BEGIN AS OF SYSTEM TIME {ts}"))
        .await
        .unwrap();
    let count = sql
        .query_one("SELECT count(*) FROM h WHERE sphere_id = 1", &[])
        .await
        .unwrap();
    assert_eq!(count.get::<_, i64>(0), 1);
    for (statement, expected) in [
        ("UPDATE h SET v = 'x' WHERE sphere_id = 1", "25006"),
        ("INSERT INTO h SELECT sphere_id, id + 10, v FROM h", "25006"),
        (
            "CREATE TABLE t2 (sphere_id BIGINT, PRIMARY KEY (sphere_id))",
            "25006",
        ),
        ("DROP TABLE h", "25006"),
        // The lock is refused by the transaction itself.
        ("SELECT v FROM h WHERE sphere_id = 1 FOR UPDATE", "22023"),
    ] {
        assert_eq!(refused(&sql, statement).await, expected, "{statement}");
        // The block failed; start it again for the next statement.
        sql.batch_execute("ROLLBACK").await.unwrap();
        sql.batch_execute(&format!("BEGIN AS OF SYSTEM TIME {ts}"))
            .await
            .unwrap();
    }
    // Its COMMIT commits nothing.
    sql.batch_execute("COMMIT").await.unwrap();

    for (statement, expected) in [
        (
            "SELECT v FROM h AS OF SYSTEM TIME '2100-01-01 00:00:00' WHERE sphere_id = 1",
            "22023",
        ),
        (
            "INSERT INTO h AS OF SYSTEM TIME '-1s' VALUES (1, 3, 'x')",
            "0A000",
        ),
        ("SELECT 1 AS OF SYSTEM TIME 'yesterday'", "22023"),
        // Reads take timestamp 0 for "the latest": refused rather than read the present.
        ("SELECT v FROM h AS OF SYSTEM TIME 0", "22023"),
    ] {
        assert_eq!(refused(&sql, statement).await, expected, "{statement}");
    }
    sql.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        refused(&sql, "SELECT v FROM h AS OF SYSTEM TIME '-1s'").await,
        "25001"
    );
    sql.batch_execute("ROLLBACK").await.unwrap();
    let now = sql
        .simple_query("SELECT id, v FROM h WHERE sphere_id = 1 ORDER BY id")
        .await
        .unwrap();
    assert_eq!(
        rows_of(now),
        ["1|new", "2|later"],
        "nothing the refused statements tried was written"
    );
    assert_eq!(
        refused(&sql, "SELECT * FROM t2").await,
        "42P01",
        "the read-only transaction created a table"
    );
}

/// A read below the GC horizon answers 72000 (snapshot_too_old), which drivers do not retry:
/// the same `AS OF SYSTEM TIME` would meet it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn as_of_below_the_gc_horizon_is_snapshot_too_old() {
    let (cluster, sql_addr) = one_node_with(&["--gc-ttl", "2s", "--gc-interval-ms", "200"]).await;
    let sql = connect(&sql_addr).await.unwrap().client;
    sql.batch_execute(
        "CREATE TABLE g (sphere_id BIGINT, id INT, PRIMARY KEY (sphere_id, id)); \
         INSERT INTO g VALUES (1, 1)",
    )
    .await
    .unwrap();
    let ts = cluster.client().await.timestamp().await.unwrap();
    let read = format!("SELECT * FROM g AS OF SYSTEM TIME {ts} WHERE sphere_id = 1");
    assert_eq!(sql.query(&read, &[]).await.unwrap().len(), 1);
    // Time passes and writes move the horizon past `ts`.
    let mut id = 1;
    common::eventually("the GC horizon to pass the timestamp read at", || {
        id += 1;
        let (sql, read) = (&sql, &read);
        let write = format!("INSERT INTO g VALUES (1, {id})");
        async move {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            sql.batch_execute(&write).await.ok()?;
            match sql.query(read.as_str(), &[]).await {
                Err(e) => {
                    let code = e.code().map(|c| c.code().to_string());
                    assert_eq!(code.as_deref(), Some("72000"), "{e}");
                    Some(())
                }
                Ok(_) => None,
            }
        }
    })
    .await;
}

/// A cancel request (sent on its own connection with the session's key) stops the running
/// statement with 57014; its writes are never committed, an explicit transaction is failed
/// until ROLLBACK, and the connection goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_request_stops_the_running_statement_and_commits_nothing() {
    let (_cluster, sql_addr) = one_node().await;
    let sql = std::sync::Arc::new(connect(&sql_addr).await.unwrap().client);
    sql.batch_execute(
        "CREATE TABLE c (sphere_id BIGINT, id INT, n BIGINT, PRIMARY KEY (sphere_id, id)); \
         BEGIN; INSERT INTO c VALUES (1, 1, 0)",
    )
    .await
    .unwrap();
    let e = cancel_until_stopped(
        &sql,
        "SELECT count(*) FROM generate_series(1, 100000000000)",
    )
    .await;
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
    let after = sql.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(after.code().map(|c| c.code()), Some("25P02"), "{after}");
    sql.batch_execute("COMMIT").await.unwrap();
    // Read on another connection: a cancel sent just before the query ended may still be
    // on its way to this one.
    let other = std::sync::Arc::new(connect(&sql_addr).await.unwrap().client);
    let rows = other.query("SELECT * FROM c", &[]).await.unwrap();
    assert!(
        rows.is_empty(),
        "the canceled transaction's insert was committed"
    );
    common::eventually("the canceled connection to serve again", || async {
        sql.query_one("SELECT 1", &[]).await.ok().map(|_| ())
    })
    .await;

    // Statements sent together outside BEGIN are one transaction: the write before the
    // canceled query is rolled back with it.
    let e = cancel_until_stopped(
        &other,
        "INSERT INTO c VALUES (1, 2, 0); SELECT count(*) FROM generate_series(1, 100000000000)",
    )
    .await;
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
    let third = connect(&sql_addr).await.unwrap().client;
    assert!(
        third
            .query("SELECT * FROM c", &[])
            .await
            .unwrap()
            .is_empty(),
        "the write before the canceled statement was committed"
    );
}

/// Runs `endless` (a statement that would run for hours) on `sql` and sends cancel requests
/// until it ends; its error.
async fn cancel_until_stopped(
    sql: &std::sync::Arc<tokio_postgres::Client>,
    endless: &'static str,
) -> tokio_postgres::Error {
    /// Cancels sent, one every 100 ms, before the test gives up: a cancel that arrives
    /// while the session is idle is forgotten, as in PostgreSQL.
    const MAX_CANCELS: usize = 600;
    let token = sql.cancel_token();
    let running = {
        let sql = sql.clone();
        tokio::spawn(async move { sql.simple_query(endless).await })
    };
    let mut cancels = 0;
    while !running.is_finished() {
        assert!(
            cancels < MAX_CANCELS,
            "{cancels} cancel requests did not stop {endless}"
        );
        token.cancel_query(NoTls).await.unwrap();
        cancels += 1;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    match running.await.unwrap() {
        Ok(_) => panic!("{endless} ended by itself"),
        Err(e) => e,
    }
}
