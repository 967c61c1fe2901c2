//! Versions and snapshot reads through the KV API on three in-process nodes: reads as of a
//! timestamp see exactly what was acknowledged before the oracle handed it out, and stay the
//! same while writes go on.

mod common;

use spheredb_client::{Client, ClientError, ClientOptions};

use common::three_nodes_with;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_as_of_a_timestamp_see_what_was_acknowledged_before_it_and_never_change() {
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

    // Writes after a read at a timestamp commit above it: the read stays the same.
    let changed = reads_then_writes(&client).await;
    assert!(changed.is_empty(), "snapshot reads changed: {changed:?}");

    // A timestamp the oracle has not handed out is refused.
    let future = client.timestamp().await.unwrap() + (3_600_000u64 << 18);
    let err = client.get_at(SPHERE, b"k", future).await.unwrap_err();
    assert!(matches!(err, ClientError::InvalidArgument(_)), "{err}");
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}
