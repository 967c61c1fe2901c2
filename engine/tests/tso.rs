//! The timestamp oracle against a meta-range leader cut off from the others: it must not
//! hand out a timestamp below its successor's. In-process nodes (their transports can drop a
//! peer's messages); the tests here run one at a time, since the failpoint one configures a
//! process-wide failpoint.

mod common;

use openraft::async_runtime::WatchReceiver;
use spheredb_client::proto::v1::txn_client::TxnClient;
use spheredb_client::proto::v1::{GetTimestampsRequest, TransferLeaderRequest};
use spheredb_engine::ids::META_RANGE_ID;
use spheredb_engine::meta::tso::physical_ms;
use spheredb_engine::Node;
use tonic::transport::Channel;

use common::{eventually, three_nodes_with};

/// The tests of this file, one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn leads_meta(node: &Node) -> bool {
    node.raft(META_RANGE_ID)
        .is_some_and(|r| r.metrics().borrow_watched().state.is_leader())
}

async fn oracle(node: &Node) -> TxnClient<Channel> {
    TxnClient::connect(format!("http://{}", node.addr()))
        .await
        .unwrap()
}

async fn one_timestamp(oracle: &mut TxnClient<Channel>) -> Result<u64, tonic::Status> {
    oracle
        .get_timestamps(GetTimestampsRequest { count: 1 })
        .await
        .map(|r| r.into_inner().first)
}

/// Cuts the meta-range leader off, takes a timestamp from its successor, then asks the
/// cut-off leader again; returns an error naming what went wrong if it answered with a
/// timestamp at or below the successor's.
async fn cut_off_leader_then_ask_it(dir: &std::path::Path) -> Result<(), String> {
    // A reserve window long enough that the cut-off leader's outlasts the successor's
    // election, so a leader that skips confirming its leadership has timestamps left.
    let nodes = three_nodes_with(dir, |c| c.tso_reserve_window_ms = 30_000).await;
    let old = eventually("a meta-range leader", || async {
        nodes.iter().position(leads_meta)
    })
    .await;
    let mut old_oracle = oracle(&nodes[old]).await;
    // Its window is reserved (3 s ahead) and its leadership confirmed.
    let before = one_timestamp(&mut old_oracle).await.unwrap();

    let others: Vec<usize> = (0..nodes.len()).filter(|i| *i != old).collect();
    nodes[old]
        .faults()
        .block(others.iter().map(|i| nodes[*i].node_id()));
    for i in &others {
        nodes[*i].faults().block([nodes[old].node_id()]);
    }
    let successor = eventually("a successor leading the meta range", || async {
        others.iter().copied().find(|i| leads_meta(&nodes[*i]))
    })
    .await;
    let new_oracle = oracle(&nodes[successor]).await;
    let from_successor = eventually("a timestamp from the successor", || async {
        one_timestamp(&mut new_oracle.clone()).await.ok()
    })
    .await;
    assert!(from_successor > before, "{from_successor} after {before}");
    let still_leader = leads_meta(&nodes[old]);
    let outcome = match one_timestamp(&mut old_oracle).await {
        Ok(ts) if ts <= from_successor => Err(format!(
            "the cut-off leader (still leading: {still_leader}) handed out {ts}, at or below \
             {from_successor} its successor handed out before"
        )),
        _ => Ok(()),
    };
    for n in nodes {
        n.shutdown().await.unwrap();
    }
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_meta_leader_hands_out_no_timestamp_below_its_successors() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    cut_off_leader_then_ask_it(dir.path()).await.unwrap();
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oracle_that_skips_confirming_its_leadership_is_caught() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    fail::cfg("tso-skip-leadership-confirm", "return").unwrap();
    let outcome = cut_off_leader_then_ask_it(dir.path()).await;
    fail::remove("tso-skip-leadership-confirm");
    assert!(
        outcome.is_err(),
        "a cut-off leader that does not confirm its leadership went unnoticed"
    );
}

/// Each new meta-range leader starts at the limit its predecessors reserved, a reserve
/// window ahead of the wall clock, so after a leader change the oracle runs ahead of the
/// clock. A range leader whose newest timestamp is from before the change must still serve
/// snapshot reads at the new timestamps: only the oracle can say whether one is from the
/// future, not the distance from the wall clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_at_timestamps_of_an_oracle_ahead_of_the_clock_are_served() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let nodes = three_nodes_with(dir.path(), |c| c.tso_reserve_window_ms = 60_000).await;
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr().to_string()).collect();
    let client = spheredb_client::Client::connect(&addrs, Default::default())
        .await
        .unwrap();
    // The key's range leader takes its timestamps from the oracle as it is now.
    client.put(3, b"k", b"before").await.unwrap();
    let before = client.timestamp().await.unwrap();
    let old = eventually("a meta-range leader", || async {
        nodes.iter().position(leads_meta)
    })
    .await;
    let to = (old + 1) % nodes.len();
    let admin = client.admin(&addrs[old]).unwrap();
    // Refused while the target catches up with the meta range's log.
    eventually("the meta-range leadership handed over", || async {
        admin
            .clone()
            .transfer_leader(TransferLeaderRequest {
                range_id: META_RANGE_ID,
                to_node_id: nodes[to].node_id(),
            })
            .await
            .ok()
    })
    .await;
    let after = eventually("a timestamp from the new meta-range leader", || async {
        if !leads_meta(&nodes[to]) {
            return None;
        }
        client.timestamp().await.ok()
    })
    .await;
    let ahead_ms = physical_ms(after) - physical_ms(before);
    assert!(
        ahead_ms >= 20_000,
        "the new oracle leader started only {ahead_ms} ms past its predecessor"
    );
    let mut txn = client.begin().await.unwrap();
    let read = txn.get(3, b"k").await;
    for n in nodes {
        n.shutdown().await.unwrap();
    }
    assert_eq!(read.unwrap(), Some(b"before".to_vec()));
}
