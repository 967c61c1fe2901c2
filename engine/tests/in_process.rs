//! Multi-node behaviour with in-process nodes over real tonic on loopback, where the test
//! needs a handle on a node (transport fault injection, direct reads of a replica).

mod common;

use openraft::async_runtime::WatchReceiver;
use std::io::{Read, Write};
use std::time::Duration;

use common::{eventually, in_process_config as config, three_nodes_with};
use prost::Message;
use spheredb_client::proto::v1::admin_client::AdminClient;
use spheredb_client::proto::v1::kv_client::KvClient;
use spheredb_client::proto::v1::{
    ErrorCode, GetRequest, Header, PutRequest, RangeListRequest, RangeRef,
};
use spheredb_client::{Client, ClientOptions};
use spheredb_engine::Node;
use spheredb_raft::{Command, RaftHandle, WriteOp};
use spheredb_storage::keys;

/// The user range's Raft group on `node`.
fn user_raft(node: &Node) -> RaftHandle {
    node.raft(common::USER_RANGE)
        .expect("node holds the user range")
}

/// The node leading the user range, as `node` sees it.
fn leader_node(node: &Node) -> Option<u64> {
    let m = user_raft(node).metrics().borrow_watched().clone();
    let leader = m.current_leader?;
    m.membership_config
        .membership()
        .get_node(&leader)
        .map(|n| n.node_id)
}

async fn three_nodes(dir: &std::path::Path) -> Vec<Node> {
    three_nodes_with(dir, |_| {}).await
}

/// A one-node cluster and a client of it.
async fn one_node(dir: &std::path::Path) -> (Node, Client) {
    let node = Node::start(config(dir, "n1", None, 1)).await.unwrap();
    let client = Client::connect(&[node.addr()], ClientOptions::default())
        .await
        .unwrap();
    (node, client)
}

/// The user range's generation, from the range list.
async fn user_range_generation(node: &Node) -> u64 {
    let client = Client::connect(&[node.addr()], ClientOptions::default())
        .await
        .unwrap();
    client
        .range_list()
        .await
        .unwrap()
        .ranges
        .iter()
        .find(|d| d.range_id == common::USER_RANGE)
        .expect("the range list names the user range")
        .generation
}

fn local(node: &Node, sphere: u64, key: &[u8]) -> Option<Vec<u8>> {
    spheredb_storage::mvcc::store::get_at(node.db(), None, &keys::kv_key(sphere, key), u64::MAX)
        .unwrap()
        .and_then(|v| v.value)
}

/// Cuts node `cut` off from the other nodes, both ways; returns the others' indexes.
fn isolate(nodes: &[Node], cut: usize) -> Vec<usize> {
    let others: Vec<usize> = (0..nodes.len()).filter(|i| *i != cut).collect();
    nodes[cut]
        .faults()
        .block(others.iter().map(|i| nodes[*i].node_id()));
    for i in &others {
        nodes[*i].faults().block([nodes[cut].node_id()]);
    }
    others
}

/// A client of the nodes at `indexes` only.
async fn client_of(nodes: &[Node], indexes: &[usize]) -> Client {
    let addrs: Vec<String> = indexes
        .iter()
        .map(|i| nodes[*i].addr().to_string())
        .collect();
    Client::connect(&addrs, ClientOptions::default())
        .await
        .unwrap()
}

async fn shutdown(nodes: Vec<Node>) {
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_on_any_node_reach_all_three_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = three_nodes(dir.path()).await;
    for (i, node) in nodes.iter().enumerate() {
        // A client seeded with only this node follows NotLeader hints to the leader.
        let client = Client::connect(&[node.addr()], ClientOptions::default())
            .await
            .unwrap();
        client
            .put(
                5,
                format!("from-{i}").as_bytes(),
                format!("v{i}").as_bytes(),
            )
            .await
            .unwrap();
    }
    for node in &nodes {
        eventually("every write on every replica", || async {
            (0..3)
                .all(|i| {
                    local(node, 5, format!("from-{i}").as_bytes())
                        == Some(format!("v{i}").into_bytes())
                })
                .then_some(())
        })
        .await;
    }
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn isolated_node_cannot_commit_and_heals_when_reconnected() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = three_nodes(dir.path()).await;
    let leader_id = eventually("a leader", || async { leader_node(&nodes[0]) }).await;
    let isolated = nodes.iter().position(|n| n.node_id() == leader_id).unwrap();
    let generation = user_range_generation(&nodes[isolated]).await;
    let others = isolate(&nodes, isolated);

    // Nor serve a LEASE read without a quorum: leases are not trusted (see
    // `KvService::read_barrier`), so the read waits for a ReadIndex round that cannot finish.
    let mut raw = KvClient::connect(format!("http://{}", nodes[isolated].addr()))
        .await
        .unwrap();
    let lease_read = raw
        .get(GetRequest {
            header: Some(Header {
                sphere_id: 9,
                range: Some(RangeRef {
                    range_id: common::USER_RANGE,
                    generation,
                }),
                causal_ts: 0,
                keyspace: 0,
            }),
            key: b"anything".to_vec(),
            consistency: spheredb_client::proto::v1::ReadConsistency::Lease as i32,
            at_ts: 0,
        })
        .await;
    assert!(
        lease_read.is_err(),
        "an isolated leader served a LEASE read without a quorum: {lease_read:?}"
    );

    // The isolated (old) leader must not commit anything.
    let doomed = Command::Write {
        ops: vec![WriteOp {
            key: keys::kv_key(9, b"doomed"),
            value: Some(b"lost".to_vec()),
        }],
        commit_ts: Some(1),
    };
    let attempt = tokio::time::timeout(
        Duration::from_secs(3),
        user_raft(&nodes[isolated]).client_write(doomed),
    )
    .await;
    assert!(
        !matches!(attempt, Ok(Ok(_))),
        "an isolated node committed a write"
    );

    // The majority elects a new leader and keeps committing.
    let client = client_of(&nodes, &others).await;
    client.put(9, b"during", b"partition").await.unwrap();
    assert_eq!(local(&nodes[isolated], 9, b"during"), None);

    for n in &nodes {
        n.faults().heal();
    }
    eventually("the healed node to catch up", || async {
        (local(&nodes[isolated], 9, b"during") == Some(b"partition".to_vec())).then_some(())
    })
    .await;
    for n in &nodes {
        assert_eq!(
            local(n, 9, b"doomed"),
            None,
            "uncommitted write surfaced on node {}",
            n.node_id()
        );
    }
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_behind_the_purged_log_catches_up_from_a_snapshot_streamed_in_many_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = three_nodes_with(dir.path(), |c| {
        c.snapshot_log_threshold = 10;
        c.log_kept_behind_snapshot = 0;
    })
    .await;
    let leader_id = eventually("a leader", || async { leader_node(&nodes[0]) }).await;
    let lagging = nodes.iter().position(|n| n.node_id() != leader_id).unwrap();
    let behind_at = user_raft(&nodes[lagging])
        .metrics()
        .borrow_watched()
        .last_log_index
        .unwrap_or(0);
    let others = isolate(&nodes, lagging);

    // About 3 MiB: the snapshot spans several transport chunks (1 MiB each) and several
    // install batches.
    let client = client_of(&nodes, &others).await;
    const KEYS: usize = 48;
    let value = |i: usize| vec![(i % 251) as u8; 64 << 10];
    for i in 0..KEYS {
        client
            .put(9, format!("big{i:03}").as_bytes(), &value(i))
            .await
            .unwrap();
    }
    // The majority snapshots and purges its log past everything the lagging node holds, so
    // only a snapshot can bring it back.
    eventually(
        "the leader to purge its log past the lagging node",
        || async {
            others
                .iter()
                .all(|i| {
                    let m = user_raft(&nodes[*i]).metrics().borrow_watched().clone();
                    m.purged.is_some_and(|p| p.index > behind_at + 1)
                })
                .then_some(())
        },
    )
    .await;

    for n in &nodes {
        n.faults().heal();
    }
    eventually("the lagging node to install the snapshot", || async {
        (0..KEYS)
            .all(|i| local(&nodes[lagging], 9, format!("big{i:03}").as_bytes()) == Some(value(i)))
            .then_some(())
    })
    .await;
    let snapshot_dir = dir
        .path()
        .join(format!("n{}", lagging + 1))
        .join("snapshots");
    let leftovers = || -> Vec<String> {
        std::fs::read_dir(&snapshot_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains(".tmp"))
            .collect()
    };
    // A second transfer the leader started before the first one landed may still be
    // receiving (and then be refused); its temporary file must go when it ends, not stay.
    eventually("temporary snapshot files to be removed", || async {
        leftovers().is_empty().then_some(())
    })
    .await;
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_with_a_damaged_value_is_quarantined_and_replaced_while_its_node_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = three_nodes(dir.path()).await;
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr().to_string()).collect();
    let client = Client::connect(&addrs, ClientOptions::default())
        .await
        .unwrap();
    client.put(9, b"precious", b"v1").await.unwrap();
    eventually("every replica to hold the value", || async {
        nodes
            .iter()
            .all(|n| local(n, 9, b"precious") == Some(b"v1".to_vec()))
            .then_some(())
    })
    .await;
    // The leader's copy of the value loses a bit on disk.
    let leader_id = eventually("a leader", || async { leader_node(&nodes[0]) }).await;
    let damaged = nodes.iter().position(|n| n.node_id() == leader_id).unwrap();
    let old_replica = user_raft(&nodes[damaged]).metrics().borrow_watched().id;
    let key = keys::kv_key(9, b"precious");
    let db = nodes[damaged].db();
    let write = spheredb_storage::ColumnFamilyName::Write;
    let mut key_end = key.clone();
    key_end.push(0);
    let (version, framed) = db.iter_span(write, &key, &key_end).next().unwrap().unwrap();
    let mut framed = framed.to_vec();
    let last = framed.len() - 1;
    framed[last] ^= 0x01;
    db.raw().put_cf(db.cf(write), &version, &framed).unwrap();

    // The read that meets it fails loudly, never with wrong data.
    let err = client.get(9, b"precious").await.unwrap_err();
    assert!(
        matches!(err, spheredb_client::ClientError::Corruption(_)),
        "{err}"
    );
    // The node keeps serving (no fail-stop); the replica is replaced by a fresh copy on the
    // same node (three nodes, three replicas), under a new replica id.
    eventually(
        "the damaged replica to be replaced by a sound one",
        || async {
            let raft = nodes[damaged].raft(common::USER_RANGE)?;
            let m = raft.metrics().borrow_watched().clone();
            (m.id > old_replica
                && m.membership_config.membership().voter_ids().count() == 3
                && local(&nodes[damaged], 9, b"precious") == Some(b"v1".to_vec()))
            .then_some(())
        },
    )
    .await;
    assert_eq!(
        client.get(9, b"precious").await.unwrap().as_deref(),
        Some(&b"v1"[..])
    );
    // Its health check ran many times since the group stopped: the node did not fail-stop.
    let fatal = tokio::time::timeout(Duration::from_millis(500), nodes[damaged].failed()).await;
    assert!(fatal.is_err(), "the node failed: {fatal:?}");
    shutdown(nodes).await;
}

fn code_of(status: &tonic::Status) -> ErrorCode {
    let wire = spheredb_client::proto::v1::Error::decode(status.details())
        .expect("status carries an Error");
    ErrorCode::try_from(wire.code).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_clear_errors_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = one_node(dir.path()).await;
    let addr = node.addr().to_string();
    client.put(1, b"k", b"v").await.unwrap();

    let mut raw = KvClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_encoding_message_size(64 << 20);
    let generation = user_range_generation(&node).await;
    let header = |range_id| {
        Some(Header {
            sphere_id: 1,
            range: Some(RangeRef {
                range_id,
                generation,
            }),
            causal_ts: 0,
            keyspace: 0,
        })
    };
    let put = |key: Vec<u8>, value: Vec<u8>, range_id| PutRequest {
        header: header(range_id),
        key,
        value,
    };
    let err = raw
        .put(put(vec![], b"v".to_vec(), common::USER_RANGE))
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), ErrorCode::InvalidArgument);
    assert!(err.message().contains("key is empty"), "{}", err.message());

    let err = raw
        .put(put(vec![b'k'; 5 << 10], b"v".to_vec(), common::USER_RANGE))
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), ErrorCode::InvalidArgument);
    assert!(
        err.message().contains("over the limit"),
        "{}",
        err.message()
    );

    let err = raw
        .put(put(b"k".to_vec(), vec![0; 9 << 20], common::USER_RANGE))
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), ErrorCode::InvalidArgument);

    let err = raw
        .put(put(b"k".to_vec(), b"v".to_vec(), 99))
        .await
        .unwrap_err();
    // No range 99: the answer names the range that holds the key, so the client can retry.
    assert_eq!(code_of(&err), ErrorCode::KeyNotInRange);
    let hint = spheredb_client::proto::v1::Error::decode(err.details()).unwrap();
    assert_eq!(hint.descriptors[0].range_id, common::USER_RANGE);

    let err = raw
        .get(GetRequest {
            header: None,
            key: b"k".to_vec(),
            consistency: 0,
            at_ts: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), ErrorCode::InvalidArgument);

    // Larger than any message the server decodes: refused by the transport, not a crash.
    let err = raw
        .put(put(b"k".to_vec(), vec![0; 40 << 20], common::USER_RANGE))
        .await
        .unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok);

    // The client library refuses bad input before sending it.
    assert!(matches!(
        client.put(1, b"", b"v").await,
        Err(spheredb_client::ClientError::InvalidArgument(_))
    ));

    // Garbage bytes on the gRPC port: the connection is dropped, the node keeps serving.
    for seed in 0u8..3 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let garbage: Vec<u8> = (0..4096u32)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        let _ = s.write_all(&garbage);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    client.put(1, b"after", b"garbage").await.unwrap();
    assert_eq!(
        client.get(1, b"after").await.unwrap().as_deref(),
        Some(&b"garbage"[..])
    );
    assert_eq!(
        client.get(1, b"k").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
    node.shutdown().await.unwrap();
}

/// Key `i` of the scan test, in key order.
fn scan_key(i: u32) -> Vec<u8> {
    format!("s{i:04}").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_with_a_stale_range_cache_scans_every_key_after_splits() {
    const KEYS: u32 = 300;
    const SPHERE: u64 = 1;
    let dir = tempfile::tempdir().unwrap();
    let (node, stale) = one_node(dir.path()).await;
    let addr = node.addr().to_string();
    for i in 0..KEYS {
        stale.put(SPHERE, &scan_key(i), b"v").await.unwrap();
    }
    // The stale client caches the one user range that holds every key.
    assert_eq!(
        stale.scan(SPHERE, b"", b"", 0).await.unwrap().len(),
        KEYS as usize
    );

    // Another client splits that range twice. The stale client still believes the first
    // range ends where the user range used to end (the end of the keyspace).
    let admin = Client::connect(&[addr.as_str()], ClientOptions::default())
        .await
        .unwrap();
    for at in [100, 200] {
        admin
            .split(&keys::kv_key(SPHERE, &scan_key(at)))
            .await
            .unwrap();
    }

    // The range map comes in pages by range id: two ranges a page covers every range once.
    eventually("the meta range to list both splits", || async {
        (admin.range_list().await.ok()?.ranges.len() >= 4).then_some(())
    })
    .await;
    let mut raw_admin = AdminClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (mut paged, mut after_range_id) = (Vec::new(), 0);
    loop {
        let page = raw_admin
            .range_list(RangeListRequest {
                after_range_id,
                limit: 2,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.ranges.len() <= 2);
        paged.extend(page.ranges.iter().map(|d| d.range_id));
        match page.ranges.last() {
            Some(last) if page.more => after_range_id = last.range_id,
            _ => break,
        }
    }
    let whole: Vec<u64> = admin
        .range_list()
        .await
        .unwrap()
        .ranges
        .iter()
        .map(|d| d.range_id)
        .collect();
    assert_eq!(paged, whole);
    assert!(
        paged.len() >= 4,
        "meta, user and two split ranges: {paged:?}"
    );

    // Each range stops the scan at its own end; the client must go on from exactly there,
    // not from the end of its cached descriptor (which skipped every key past the first split).
    let all = stale.scan(SPHERE, b"", b"", 0).await.unwrap();
    let got: Vec<Vec<u8>> = all.into_iter().map(|kv| kv.key).collect();
    let want: Vec<Vec<u8>> = (0..KEYS).map(scan_key).collect();
    assert_eq!(
        got.len(),
        want.len(),
        "scan after splits returned {} keys",
        got.len()
    );
    assert_eq!(got, want);
    // Partial scans across both split points, and small pages, are exact too.
    let part = stale
        .scan(SPHERE, &scan_key(50), &scan_key(250), 0)
        .await
        .unwrap();
    assert_eq!(part.len(), 200);
    assert_eq!(part.first().unwrap().key, scan_key(50));
    assert_eq!(part.last().unwrap().key, scan_key(249));
    let page = stale.scan(SPHERE, &scan_key(95), b"", 10).await.unwrap();
    let page: Vec<Vec<u8>> = page.into_iter().map(|kv| kv.key).collect();
    assert_eq!(page, (95..105).map(scan_key).collect::<Vec<_>>());

    // A batch across the split, from a client whose map predates it, commits whole as a
    // transaction.
    let ops = vec![
        (scan_key(10), Some(b"x".to_vec())),
        (scan_key(150), Some(b"x".to_vec())),
    ];
    stale.batch(SPHERE, &ops).await.unwrap();
    assert_eq!(
        stale.get(SPHERE, &scan_key(10)).await.unwrap().as_deref(),
        Some(&b"x"[..])
    );
    assert_eq!(
        stale.get(SPHERE, &scan_key(150)).await.unwrap().as_deref(),
        Some(&b"x"[..])
    );
    // Within one range a batch still applies.
    stale
        .batch(
            SPHERE,
            &[(scan_key(110), Some(b"y".to_vec())), (scan_key(120), None)],
        )
        .await
        .unwrap();
    assert_eq!(stale.get(SPHERE, &scan_key(120)).await.unwrap(), None);
    node.shutdown().await.unwrap();
}

/// Allocates `size_bytes` of real blocks at `path` (a file filling the disk).
fn fill(path: &std::path::Path, size_bytes: u64) {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::create(path).unwrap();
    // SAFETY: a valid descriptor and non-negative offsets.
    let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, size_bytes as libc::off_t) };
    assert_eq!(
        rc, 0,
        "could not allocate {size_bytes} bytes for the filler file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_are_refused_while_the_disk_is_nearly_full_and_resume_by_themselves() {
    const FILLER_BYTES: u64 = 512 << 20;
    let dir = tempfile::tempdir().unwrap();
    let filler = dir.path().join("filler");
    fill(&filler, FILLER_BYTES);
    // The reserve sits halfway into the filler: under it while the filler is there, over it
    // (by 256 MiB, room for whatever else writes to this disk meanwhile) once it is gone.
    let free = spheredb_engine::disk::free_bytes(dir.path()).unwrap();
    let mut cfg = config(dir.path(), "n1", None, 1);
    cfg.disk_reserve_bytes = free + FILLER_BYTES / 2;
    cfg.ballast_size_bytes = 0;
    let node = Node::start(cfg).await.unwrap();
    let addr = node.addr().to_string();
    let client = Client::connect(&[addr.as_str()], ClientOptions::default())
        .await
        .unwrap();
    let err = client.put(1, b"k", b"v").await.unwrap_err();
    assert!(
        matches!(&err, spheredb_client::ClientError::ResourceExhausted(m) if m.contains("nothing was written")),
        "{err}"
    );
    // Reads still work, and the refused write is not there.
    assert_eq!(client.get(1, b"k").await.unwrap(), None);

    std::fs::remove_file(&filler).unwrap();
    eventually("writes to be accepted once space is freed", || async {
        client.put(1, b"k", b"v").await.ok()
    })
    .await;
    assert_eq!(
        client.get(1, b"k").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
    node.shutdown().await.unwrap();
}
