//! Versions and snapshot reads through the KV API on three in-process nodes: reads as of a
//! timestamp see what was acknowledged before the oracle handed it out, and nothing written
//! after it by a client that had it or more than the commit-ts staleness bound later, and
//! stay the same while writes go on. The tests run one at a time, since the failpoint one configures a
//! process-wide failpoint.

mod common;

use spheredb_client::{Client, ClientError, ClientOptions};

use common::three_nodes_with;

/// The tests of this file, one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SPHERE: u64 = 5;
/// Rounds of read-then-write in the repeatability check.
const ROUNDS: usize = 20;

async fn client_of(nodes: &[spheredb_engine::Node]) -> Client {
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr().to_string()).collect();
    Client::connect(&addrs, ClientOptions::default())
        .await
        .unwrap()
}

/// Each round reads a key as of a fresh timestamp, overwrites it, and reads it again as of
/// the same timestamp; returns the rounds whose two reads differed.
async fn reads_then_writes(client: &Client) -> Vec<String> {
    let mut changed = Vec::new();
    for round in 0..ROUNDS {
        let key = format!("r{}", round % 3);
        let ts = client.timestamp().await.unwrap();
        let before = client.get_at(SPHERE, key.as_bytes(), ts).await.unwrap();
        client
            .put(SPHERE, key.as_bytes(), format!("v{round}").as_bytes())
            .await
            .unwrap();
        let after = client.get_at(SPHERE, key.as_bytes(), ts).await.unwrap();
        if before != after {
            changed.push(format!("round {round}: {before:?} then {after:?} at {ts}"));
        }
    }
    changed
}

/// A write acknowledged before the oracle hands out a timestamp must be seen at it; returns
/// what was seen instead otherwise.
async fn acknowledged_writes_show_at_later_timestamps(client: &Client) -> Result<(), String> {
    for i in 0..5 {
        let value = format!("ack{i}");
        client
            .put(SPHERE, b"acked", value.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let ts = client.timestamp().await.map_err(|e| e.to_string())?;
        let seen = client
            .get_at(SPHERE, b"acked", ts)
            .await
            .map_err(|e| e.to_string())?;
        if seen.as_deref() != Some(value.as_bytes()) {
            return Err(format!(
                "{value} was acknowledged before timestamp {ts}, which reads {seen:?}"
            ));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_as_of_a_timestamp_see_what_was_acknowledged_before_it_and_never_change() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let nodes = three_nodes_with(dir.path(), |_| {}).await;
    let client = client_of(&nodes).await;

    client.put(SPHERE, b"k", b"v1").await.unwrap();
    client.put(SPHERE, b"other", b"o1").await.unwrap();
    let t1 = client.timestamp().await.unwrap();
    client.put(SPHERE, b"k", b"v2").await.unwrap();
    let t2 = client.timestamp().await.unwrap();
    assert!(client.delete(SPHERE, b"k").await.unwrap());
    let t3 = client.timestamp().await.unwrap();

    assert_eq!(
        client.get_at(SPHERE, b"k", t1).await.unwrap(),
        Some(b"v1".to_vec())
    );
    assert_eq!(
        client.get_at(SPHERE, b"k", t2).await.unwrap(),
        Some(b"v2".to_vec())
    );
    assert_eq!(client.get_at(SPHERE, b"k", t3).await.unwrap(), None);
    assert_eq!(client.get(SPHERE, b"k").await.unwrap(), None);
    // A long value lives apart from its version record and reads back the same.
    let long = vec![b'x'; 4096];
    client.put(SPHERE, b"long", &long).await.unwrap();
    let t4 = client.timestamp().await.unwrap();
    assert_eq!(
        client.get_at(SPHERE, b"long", t4).await.unwrap(),
        Some(long)
    );

    let at = |ts| {
        let client = &client;
        async move {
            client
                .scan_at(SPHERE, b"", b"", 100, ts)
                .await
                .unwrap()
                .into_iter()
                .map(|kv| (kv.key, kv.value))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        at(t1).await,
        vec![
            (b"k".to_vec(), b"v1".to_vec()),
            (b"other".to_vec(), b"o1".to_vec())
        ]
    );
    assert_eq!(at(t3).await, vec![(b"other".to_vec(), b"o1".to_vec())]);

    acknowledged_writes_show_at_later_timestamps(&client)
        .await
        .unwrap();
    // Writes after a read at a timestamp commit above it: the read stays the same.
    let changed = reads_then_writes(&client).await;
    assert!(changed.is_empty(), "snapshot reads changed: {changed:?}");
    // A client that has seen no timestamp, writing well past the staleness bound after `t`
    // was handed out, commits above `t`: its node's batch is fresher than that.
    let t = client.timestamp().await.unwrap();
    let staleness_ms = spheredb_engine::config::DEFAULT_COMMIT_TS_STALENESS_MS;
    tokio::time::sleep(std::time::Duration::from_millis(4 * staleness_ms)).await;
    let other = client_of(&nodes).await;
    other.put(SPHERE, b"late", b"x").await.unwrap();
    assert_eq!(client.get_at(SPHERE, b"late", t).await.unwrap(), None);

    // A timestamp the oracle has not handed out is refused.
    let future = client.timestamp().await.unwrap() + (3_600_000u64 << 18);
    let err = client.get_at(SPHERE, b"k", future).await.unwrap_err();
    assert!(matches!(err, ClientError::InvalidArgument(_)), "{err}");
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}

/// Versions of `key` of `SPHERE` stored on `node`.
fn stored_versions(node: &spheredb_engine::Node, key: &[u8]) -> usize {
    let key = spheredb_storage::keys::kv_key(SPHERE, key);
    let mut end = key.clone();
    end.push(0);
    node.db()
        .iter_span(spheredb_storage::ColumnFamilyName::Write, &key, &end)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versions_behind_the_gc_horizon_are_collected_and_reads_there_are_refused() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let nodes = three_nodes_with(dir.path(), |c| {
        c.gc_ttl_ms = 2_000;
        c.gc_interval_ms = 200;
    })
    .await;
    let client = client_of(&nodes).await;
    for i in 0..5 {
        client
            .put(SPHERE, b"hot", format!("v{i}").as_bytes())
            .await
            .unwrap();
    }
    let old = client.timestamp().await.unwrap();
    assert_eq!(
        client.get_at(SPHERE, b"hot", old).await.unwrap(),
        Some(b"v4".to_vec())
    );
    // Time passes; a write moves the nodes' newest oracle timestamp on.
    tokio::time::sleep(std::time::Duration::from_millis(3_000)).await;
    client.put(SPHERE, b"hot", b"latest").await.unwrap();
    let horizon = common::eventually("a read below the horizon to be refused", || async {
        match client.get_at(SPHERE, b"hot", old).await {
            Err(ClientError::HistoryCompacted { horizon, .. }) => Some(horizon),
            _ => None,
        }
    })
    .await;
    assert!(horizon > old, "horizon {horizon} not above {old}");
    // A change feed from there is refused the same way, with the horizon to resync from.
    let mut feed = client.feed(SPHERE).since_ts(old).subscribe().await.unwrap();
    match feed.next().await {
        Some(Err(ClientError::HistoryCompacted { horizon: h, .. })) => assert!(h > old),
        other => panic!("a feed from below the horizon: {other:?}"),
    }
    // Every replica keeps the newest version at or below the horizon (v4, which reads at the
    // horizon see) and the ones above it (the latest); v0 to v3 go.
    common::eventually("old versions to be collected on every replica", || async {
        nodes
            .iter()
            .all(|n| stored_versions(n, b"hot") == 2)
            .then_some(())
    })
    .await;
    assert_eq!(
        client.get(SPHERE, b"hot").await.unwrap(),
        Some(b"latest".to_vec())
    );
    let now = client.timestamp().await.unwrap();
    assert_eq!(
        client.get_at(SPHERE, b"hot", now).await.unwrap(),
        Some(b"latest".to_vec())
    );
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}

/// With the failpoint `sm-commit-ts-from-clock` (versions stamped from the applying replica's
/// clock, 5 s fast, instead of the commit ts the leader fixed), an acknowledged write lands
/// above a timestamp the oracle hands out after it: the read at that timestamp misses it.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versions_stamped_from_the_clock_at_apply_are_caught() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let nodes = three_nodes_with(dir.path(), |_| {}).await;
    let client = client_of(&nodes).await;
    fail::cfg("sm-commit-ts-from-clock", "return(5000)").unwrap();
    let outcome = acknowledged_writes_show_at_later_timestamps(&client).await;
    fail::remove("sm-commit-ts-from-clock");
    for n in nodes {
        n.shutdown().await.unwrap();
    }
    assert!(
        outcome.is_err(),
        "versions stamped at apply from a fast clock went unnoticed"
    );
}

/// A write whose caller gives up while it is in flight (the failpoint
/// `kv-write-answer-delay` holds its answer back for 2 s; the caller waits 200 ms) still
/// applies, and its key is released: a read afterwards answers with the write's value. A
/// write's key stays in flight until Raft answers for its entry, and the proposal runs in a
/// task of its own, so a request the server drops cannot take that answer with it.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_whose_caller_gave_up_does_not_block_reads_of_its_key() {
    use spheredb_client::proto::v1::kv_client::KvClient;
    use spheredb_client::proto::v1::{Header, PutRequest, RangeRef};
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let nodes = three_nodes_with(dir.path(), |_| {}).await;
    let client = client_of(&nodes).await;
    client.put(SPHERE, b"stuck", b"before").await.unwrap();
    // The range map's generation may lag the range's own: a refusal names the current one.
    // Retry until the write is taken and times out.
    fail::cfg("kv-write-answer-delay", "return(2000)").unwrap();
    let generation = std::sync::Mutex::new(None::<u64>);
    let timed_out = common::eventually("a write taken by the leader to time out", || async {
        let list = client.range_list().await.ok()?;
        let mut range = list
            .ranges
            .iter()
            .find(|d| d.range_id == common::USER_RANGE)?
            .clone();
        if let Some(g) = *generation.lock().unwrap() {
            range.generation = g;
        }
        let leader_id = list
            .loads
            .iter()
            .find(|l| l.range_id == common::USER_RANGE)?
            .leader_node_id?;
        let leader = nodes.iter().find(|n| n.node_id() == leader_id)?;
        let mut raw = KvClient::connect(format!("http://{}", leader.addr()))
            .await
            .ok()?;
        let mut req = tonic::Request::new(PutRequest {
            header: Some(Header {
                sphere_id: SPHERE,
                range: Some(RangeRef {
                    range_id: range.range_id,
                    generation: range.generation,
                }),
                causal_ts: 0,
                keyspace: 0,
            }),
            key: b"stuck".to_vec(),
            value: b"after".to_vec(),
        });
        req.set_timeout(std::time::Duration::from_millis(200));
        match raw.put(req).await {
            // The client's own deadline: cancelled, or the server's answer to it.
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
                ) =>
            {
                Some(Ok(()))
            }
            Ok(_) => Some(Err("the write answered within 200 ms".to_string())),
            Err(status) => {
                if let ClientError::StaleGeneration { descriptors, .. } =
                    ClientError::from_status(&status)
                {
                    *generation.lock().unwrap() = descriptors
                        .iter()
                        .find(|d| d.range_id == common::USER_RANGE)
                        .map(|d| d.generation);
                }
                None
            }
        }
    })
    .await;
    fail::remove("kv-write-answer-delay");
    timed_out.unwrap();
    let read = client.get(SPHERE, b"stuck").await;
    let outcome = match &read {
        Ok(Some(v)) if v.as_slice() == b"after" => Ok(()),
        other => Err(format!(
            "reading the key after its writer gave up: {other:?}"
        )),
    };
    for n in nodes {
        n.shutdown().await.unwrap();
    }
    outcome.unwrap();
}
