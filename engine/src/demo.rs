//! `spheredb demo`: a local 3-node cluster with sample sphere data.

use std::io::IsTerminal;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use spheredb_client::{Client, ClientOptions};

/// Longest the demo waits for its cluster to form.
pub const DEMO_STARTUP_DEADLINE_MS: u64 = 60_000;
/// The demo's range size threshold: small, so its sample data splits into several ranges.
pub const DEMO_RANGE_SPLIT_SIZE_BYTES: u64 = 8 << 10;
/// Ranges the demo waits for after loading its sample data.
pub const DEMO_MIN_RANGES: usize = 4;

/// Child processes, killed when dropped.
struct Children(Vec<(u64, String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, _, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port(preferred: u16) -> anyhow::Result<u16> {
    if TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        return Ok(preferred);
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn_node(
    dir: &Path,
    index: u16,
    addr: &str,
    sql_addr: &str,
    join: Option<&str>,
) -> anyhow::Result<Child> {
    let data = dir.join(format!("node{index}"));
    std::fs::create_dir_all(&data)?;
    let log = std::fs::File::create(dir.join(format!("node{index}.log")))?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("start")
        .arg("--data-dir")
        .arg(&data)
        .arg("--listen")
        .arg(addr)
        .arg("--sql-listen")
        .arg(sql_addr)
        .arg("--range-split-size-bytes")
        .arg(DEMO_RANGE_SPLIT_SIZE_BYTES.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(j) = join {
        cmd.arg("--join").arg(j);
    }
    cmd.spawn().context("starting a node process")
}

async fn wait_for<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(DEMO_STARTUP_DEADLINE_MS) {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("timed out waiting for {what}")
}

/// The fewest voters of any range the node at `addr` holds, and the meta range's leader.
async fn voters(addr: &str) -> Option<(usize, Option<u64>)> {
    let client = Client::connect(&[addr], ClientOptions::default())
        .await
        .ok()?;
    let status = client.status(addr, false).await.ok()?;
    let fewest = status
        .ranges
        .iter()
        .map(|r| r.descriptor.as_ref().map_or(0, |d| d.voters.len()))
        .min()?;
    Some((fewest, status.ranges.first()?.leader_id))
}

const ALBUM_SPHERE: u64 = 1;
const TEAM_SPHERE: u64 = 2;

async fn load_sample(client: &Client) -> anyhow::Result<usize> {
    let mut album = Vec::new();
    for i in 0..400u32 {
        album.push((
            format!("photo/{i:04}").into_bytes(),
            Some(format!("{{\"title\":\"Summer {i}\",\"by\":\"member{}\"}}", i % 7).into_bytes()),
        ));
    }
    client.batch(ALBUM_SPHERE, &album).await?;
    let mut team = Vec::new();
    for i in 0..200u32 {
        team.push((
            format!("task/{i:03}").into_bytes(),
            Some(format!("{{\"title\":\"Task {i}\",\"done\":{}}}", i % 3 == 0).into_bytes()),
        ));
    }
    client.batch(TEAM_SPHERE, &team).await?;
    client.put(ALBUM_SPHERE, b"name", b"Family album").await?;
    client.put(TEAM_SPHERE, b"name", b"Platform team").await?;
    Ok(album.len() + team.len() + 2)
}

/// Runs the demo.
pub async fn run(base_port: u16, nodes: u16) -> anyhow::Result<()> {
    if nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let dir = tempfile::Builder::new()
        .prefix("spheredb-demo-")
        .tempdir()?;
    let mut addrs = Vec::new();
    let mut sql_addrs = Vec::new();
    for i in 0..nodes {
        let port = free_port(base_port.saturating_add(i))?;
        addrs.push(format!("127.0.0.1:{port}"));
        let sql_port = free_port(DEMO_SQL_PORT.saturating_add(i))?;
        sql_addrs.push(format!("127.0.0.1:{sql_port}"));
    }
    println!(
        "Starting {nodes} SphereDB nodes in {}",
        dir.path().display()
    );
    let mut children = Children(Vec::new());
    children.0.push((
        1,
        addrs[0].clone(),
        spawn_node(dir.path(), 1, &addrs[0], &sql_addrs[0], None)?,
    ));
    wait_for("the first node", || async {
        voters(&addrs[0]).await.is_some_and(|(_, l)| l.is_some())
    })
    .await?;
    // One at a time, so node ids follow the port order.
    for i in 1..nodes {
        let child = spawn_node(
            dir.path(),
            i + 1,
            &addrs[i as usize],
            &sql_addrs[i as usize],
            Some(&addrs[0]),
        )?;
        children
            .0
            .push((u64::from(i) + 1, addrs[i as usize].clone(), child));
        let want = usize::from((i + 1).min(3));
        wait_for(&format!("node {} to join", i + 1), || async {
            voters(&addrs[0]).await.is_some_and(|(v, _)| v >= want)
        })
        .await?;
    }
    let client = Client::connect(&addrs, ClientOptions::default()).await?;
    let loaded = load_sample(&client).await?;
    println!("Cluster is up: {} nodes, {loaded} sample keys in spheres {ALBUM_SPHERE} (album) and {TEAM_SPHERE} (team).", nodes);
    println!("Ranges split past {DEMO_RANGE_SPLIT_SIZE_BYTES} bytes in this demo (64 MiB by default); waiting for the splits...");
    let ranges = wait_for_ranges(&client).await;
    println!("{ranges} ranges.\n");
    let exe = std::env::current_exe()?.display().to_string();
    let sql = load_sql_sample(&sql_addrs[0]).await?;
    println!(
        "SQL (PostgreSQL protocol) on {}; sample tables spheres, members, posts, comments.",
        sql_addrs.join(", ")
    );
    let (sql_host, sql_port) = sql_addrs[0]
        .split_once(':')
        .unwrap_or(("127.0.0.1", "5433"));
    println!("  psql -h {sql_host} -p {sql_port} -U spheredb spheredb");
    println!("  {exe} sql --host {}", sql_addrs[0]);
    println!("and try:\n{DEMO_QUERIES}");
    println!("Try, in another terminal:");
    println!("  {exe} status --host {}", addrs[0]);
    println!(
        "  {exe} kv --host {} --sphere {ALBUM_SPHERE} scan --limit 5",
        addrs[0]
    );
    println!(
        "  {exe} kv --host {} --sphere {TEAM_SPHERE} put task/999 '{{\"title\":\"ship it\"}}'",
        addrs[0]
    );
    println!(
        "  {exe} feed --host {} --sphere {TEAM_SPHERE}   # follows the team's changes; write in another terminal",
        addrs[0]
    );
    println!("Node logs are in {}.\n", dir.path().display());

    if std::io::stdin().is_terminal() {
        println!("Press Ctrl-C to stop the cluster and delete its data.");
        tokio::signal::ctrl_c().await?;
        println!("\nStopping.");
        return Ok(());
    }
    // SQL first: the KV tour kills a node, maybe the one serving this connection.
    sql_tour(&sql).await?;
    tour(&client, &addrs, &mut children).await
}

/// The first SQL port the demo's nodes try (then the next ones).
pub const DEMO_SQL_PORT: u16 = 5433;

/// The demo's sample schema: spheres, their members, posts and comments, every table
/// keyed by sphere first.
pub const DEMO_SCHEMA: &str = "
CREATE TABLE spheres (sphere_id BIGINT, name TEXT NOT NULL, created_at TIMESTAMPTZ,
  PRIMARY KEY (sphere_id));
CREATE TABLE members (sphere_id BIGINT, user_id BIGINT, role TEXT NOT NULL DEFAULT 'member',
  PRIMARY KEY (sphere_id, user_id));
CREATE TABLE posts (sphere_id BIGINT, post_id BIGINT, author_id BIGINT NOT NULL, title TEXT,
  body TEXT, likes INT DEFAULT 0, PRIMARY KEY (sphere_id, post_id));
CREATE TABLE comments (sphere_id BIGINT, post_id BIGINT, comment_id UUID DEFAULT gen_random_uuid(),
  author_id BIGINT, body TEXT, PRIMARY KEY (sphere_id, post_id, comment_id));
INSERT INTO spheres VALUES (1, 'Family album', now()), (2, 'Climbing club', now()), (3, 'Team Rocket', now());
INSERT INTO members VALUES (1, 10, 'owner'), (1, 11, 'member'), (2, 10, 'member'), (2, 12, 'owner'), (3, 13, 'owner');
INSERT INTO posts (sphere_id, post_id, author_id, title, body) VALUES
  (1, 1, 10, 'Summer 2026', 'Photos from the lake'), (1, 2, 11, 'Grandma turns 90', 'Party on Sunday'),
  (2, 1, 12, 'Route of the week', 'The arete on the north face'), (3, 1, 13, 'Launch', 'Ship it on Friday');
INSERT INTO comments (sphere_id, post_id, author_id, body) VALUES
  (1, 1, 11, 'Lovely!'), (1, 1, 10, 'Thanks'), (2, 1, 10, 'Done it twice');
";

/// What the demo suggests trying.
pub const DEMO_QUERIES: &str = "  SELECT title, likes FROM posts WHERE sphere_id = 1 ORDER BY post_id;
  SELECT s.name, count(*) AS posts FROM posts p JOIN spheres s ON s.sphere_id = p.sphere_id GROUP BY s.name ORDER BY s.name;
  BEGIN; UPDATE posts SET likes = likes + 1 WHERE sphere_id = 1 AND post_id = 1; COMMIT;
  SELECT p.title, c.body FROM comments c JOIN posts p USING (sphere_id, post_id) WHERE c.sphere_id = 1;
";

/// Creates the sample schema through node 1's SQL front end; returns the connection.
async fn load_sql_sample(sql_addr: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (host, port) = sql_addr.split_once(':').context("SQL address")?;
    let config = format!("host={host} port={port} user=spheredb dbname=spheredb");
    let started = Instant::now();
    let client = loop {
        match tokio_postgres::connect(&config, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                break client;
            }
            Err(e) if started.elapsed() > Duration::from_millis(DEMO_STARTUP_DEADLINE_MS) => {
                bail!("the SQL front end on {sql_addr} did not answer: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    client
        .batch_execute(DEMO_SCHEMA)
        .await
        .map_err(|e| anyhow::anyhow!("creating the sample schema: {e:?}"))?;
    Ok(client)
}

/// Runs the suggested queries and prints their results.
async fn sql_tour(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    for query in DEMO_QUERIES.lines().filter(|q| !q.trim().is_empty()) {
        println!("\nspheredb=> {}", query.trim());
        let results = crate::sql_cli::execute(client, query).await?;
        print!(
            "{}",
            crate::sql_cli::render(&results, crate::sql_cli::SqlFormat::Table)
        );
    }
    Ok(())
}

/// Waits (bounded) until the sample data has split into [`DEMO_MIN_RANGES`] ranges; returns
/// the number of ranges seen last.
async fn wait_for_ranges(client: &Client) -> usize {
    let started = Instant::now();
    let mut seen = 0;
    while started.elapsed() < Duration::from_millis(DEMO_STARTUP_DEADLINE_MS) {
        seen = client.range_list().await.map_or(seen, |l| l.ranges.len());
        if seen >= DEMO_MIN_RANGES {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    seen
}

/// Most feed items the tour prints before it moves on.
const TOUR_FEED_MAX_ITEMS: usize = 32;

/// Follows the team sphere's feed while a few writes (one of them a transaction over two
/// keys) land, and prints what it delivers up to a checkpoint past the last write.
async fn follow_feed(client: &Client) -> anyhow::Result<()> {
    use spheredb_client::feed::FeedItem;
    println!("\n$ feed --sphere {TEAM_SPHERE} --grouped   (while tasks are written)");
    let mut feed = client.feed(TEAM_SPHERE).grouped().subscribe().await?;
    client
        .put(TEAM_SPHERE, b"task/1000", br#"{"title":"write the docs"}"#)
        .await?;
    let mut txn = client.begin().await?;
    txn.put(TEAM_SPHERE, b"task/1001", br#"{"title":"review"}"#)?;
    txn.put(TEAM_SPHERE, b"task/1002", br#"{"title":"release"}"#)?;
    txn.commit().await?;
    client.delete(TEAM_SPHERE, b"task/1000").await?;
    let last = client.timestamp().await?;
    for _ in 0..TOUR_FEED_MAX_ITEMS {
        let next =
            tokio::time::timeout(Duration::from_millis(DEMO_STARTUP_DEADLINE_MS), feed.next());
        let Ok(Some(item)) = next.await else {
            println!("(the feed went quiet)");
            break;
        };
        match item? {
            FeedItem::Txn { commit_ts, changes } => {
                println!("transaction at {commit_ts}:");
                for c in changes {
                    match c.value {
                        Some(v) => println!(
                            "  {} = {}",
                            String::from_utf8_lossy(&c.key),
                            String::from_utf8_lossy(&v)
                        ),
                        None => println!("  {} deleted", String::from_utf8_lossy(&c.key)),
                    }
                }
            }
            FeedItem::Change(_) => {}
            FeedItem::Checkpoint(cursor) => {
                if cursor.resolved_ts() >= last {
                    println!(
                        "checkpoint at {} (a cursor to resume from)",
                        cursor.resolved_ts()
                    );
                    break;
                }
            }
        }
    }
    Ok(())
}

async fn tour(client: &Client, addrs: &[String], children: &mut Children) -> anyhow::Result<()> {
    println!("== Tour (stdin is not a terminal) ==\n");
    let (list, rows) = crate::service::status::gather(&addrs[0]).await?;
    print!("{}", crate::service::status::to_text(&list, &rows));
    println!("\n$ kv --sphere {ALBUM_SPHERE} scan --limit 3");
    for kv in client.scan(ALBUM_SPHERE, b"photo/", b"", 3).await? {
        println!(
            "{}\t{}",
            String::from_utf8_lossy(&kv.key),
            String::from_utf8_lossy(&kv.value)
        );
    }
    follow_feed(client).await?;
    let leader = list.leader_id;
    if children.0.len() >= 3 {
        if let Some(leader) = leader {
            println!("\nKilling the meta range's leader (node {leader}) with SIGKILL...");
            if let Some(pos) = children.0.iter().position(|(id, _, _)| *id == leader) {
                let (_, _, mut child) = children.0.remove(pos);
                child.kill()?;
                child.wait()?;
            }
            let started = Instant::now();
            let survivor = children.0[0].1.clone();
            wait_for("a new leader", || async {
                voters(&survivor)
                    .await
                    .is_some_and(|(_, l)| l.is_some_and(|l| l != leader))
            })
            .await?;
            println!(
                "New leader elected after {} ms.",
                started.elapsed().as_millis()
            );
            let name = client.get(ALBUM_SPHERE, b"name").await?;
            println!(
                "Read back sphere {ALBUM_SPHERE} name: {}",
                name.map_or("(missing!)".into(), |v| String::from_utf8_lossy(&v)
                    .into_owned())
            );
            let photos = client
                .scan(ALBUM_SPHERE, b"photo/", b"photo0", 10_000)
                .await?;
            println!("All {} photos still readable.", photos.len());
        }
    }
    println!("\nTour done; stopping the cluster.");
    Ok(())
}
