//! Change feeds on real processes: every committed write delivered once per subscription, in
//! commit order per key and never at or below a checkpoint already delivered, across a
//! split, a merge, a leader kill and the killed node's restart; resuming from a stored
//! cursor; whole transactions in grouped mode.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use spheredb_client::feed::{Change, Cursor, FeedItem, Subscription};
use spheredb_client::{kv_key, Client};

use common::{eventually, ProcCluster};

const SPHERE: u64 = 11;
const FAST_ELECTIONS: &[&str] = &[
    "--heartbeat-interval-ms",
    "50",
    "--election-timeout-ms",
    "300",
];
/// Longest the feed may take to deliver what was written (generous: a leader kill).
const DELIVERY_TIMEOUT_MS: u64 = 60_000;
/// Resolve interval the subscriptions ask for.
const RESOLVE_INTERVAL_MS: u64 = 50;

/// What one subscription delivered, checked as it arrives.
#[derive(Default)]
struct Delivered {
    changes: Vec<Change>,
    /// Each key's commit timestamps, in delivery order.
    per_key: BTreeMap<Vec<u8>, Vec<u64>>,
    resolved: u64,
    cursors: Vec<Cursor>,
    /// Whole transactions (grouped mode), by commit ts.
    txns: BTreeMap<u64, Vec<Change>>,
}

impl Delivered {
    fn take(&mut self, item: FeedItem) -> Result<(), String> {
        match item {
            FeedItem::Change(change) => self.change(change)?,
            FeedItem::Txn { commit_ts, changes } => {
                for change in &changes {
                    if change.commit_ts != commit_ts {
                        return Err(format!("{change:?} in the transaction at {commit_ts}"));
                    }
                    self.change(change.clone())?;
                }
                if self.txns.insert(commit_ts, changes).is_some() {
                    return Err(format!("the transaction at {commit_ts} came twice"));
                }
            }
            FeedItem::Checkpoint(cursor) => {
                if cursor.resolved_ts() <= self.resolved {
                    return Err(format!(
                        "checkpoint {} after {}",
                        cursor.resolved_ts(),
                        self.resolved
                    ));
                }
                self.resolved = cursor.resolved_ts();
                self.cursors.push(cursor);
            }
        }
        Ok(())
    }

    fn change(&mut self, change: Change) -> Result<(), String> {
        if change.commit_ts <= self.resolved {
            return Err(format!(
                "{change:?} arrived after the checkpoint at {}",
                self.resolved
            ));
        }
        let seen = self.per_key.entry(change.key.clone()).or_default();
        if let Some(last) = seen.last() {
            if *last >= change.commit_ts {
                return Err(format!(
                    "{change:?} arrived after the same key's change at {last}"
                ));
            }
        }
        seen.push(change.commit_ts);
        self.changes.push(change);
        Ok(())
    }

    /// The newest value delivered for each key.
    fn latest(&self) -> HashMap<Vec<u8>, Option<Vec<u8>>> {
        let mut out = HashMap::new();
        for c in &self.changes {
            out.insert(c.key.clone(), c.value.clone());
        }
        out
    }
}

/// Reads `sub` until a checkpoint at or above `ts`, checking every item.
async fn follow_until(sub: &mut Subscription, delivered: &mut Delivered, ts: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(DELIVERY_TIMEOUT_MS);
    while delivered.resolved < ts {
        let item = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no checkpoint at {ts} within {DELIVERY_TIMEOUT_MS} ms (at {})",
                    delivered.resolved
                )
            })
            .expect("the subscription ended")
            .expect("the subscription failed");
        delivered.take(item).unwrap();
    }
}

/// Writes `count` keys `prefix00..` with value `round`, one put each.
async fn write_round(client: &Client, prefix: &str, count: usize, round: usize) {
    for i in 0..count {
        client
            .put(
                SPHERE,
                format!("{prefix}{i:02}").as_bytes(),
                format!("{round}").as_bytes(),
            )
            .await
            .unwrap();
    }
}

fn user_range_of(list: &spheredb_client::proto::v1::RangeListResponse, key: &[u8]) -> u64 {
    let key = kv_key(SPHERE, key);
    list.ranges
        .iter()
        .find(|r| r.start_key <= key && (r.end_key.is_empty() || key < r.end_key))
        .map(|r| r.range_id)
        .expect("a range holds the key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn feeds_deliver_every_write_once_across_splits_merges_and_a_leader_kill() {
    let mut cluster = ProcCluster::start(3, FAST_ELECTIONS).await;
    let client = cluster.client().await;
    let mut plain = client
        .feed(SPHERE)
        .resolve_interval_ms(RESOLVE_INTERVAL_MS)
        .with_prev_value()
        .subscribe()
        .await
        .unwrap();
    let mut grouped = client
        .feed(SPHERE)
        .resolve_interval_ms(RESOLVE_INTERVAL_MS)
        .grouped()
        .subscribe()
        .await
        .unwrap();
    let mut seen = Delivered::default();
    let mut seen_grouped = Delivered::default();
    let mut expected = 0usize;

    write_round(&client, "k", 20, 0).await;
    expected += 20;
    let ts = client.timestamp().await.unwrap();
    follow_until(&mut plain, &mut seen, ts).await;
    let cursor = seen.cursors.last().cloned().unwrap();

    // A split in the middle of the span, then writes on both sides and a transaction over
    // both ranges.
    client.split(&kv_key(SPHERE, b"k10")).await.unwrap();
    write_round(&client, "k", 20, 1).await;
    expected += 20;
    let mut txn = client.begin().await.unwrap();
    txn.put(SPHERE, b"k03", b"txn").unwrap();
    txn.put(SPHERE, b"k15", b"txn").unwrap();
    txn.commit().await.unwrap();
    expected += 2;
    let ts = client.timestamp().await.unwrap();
    follow_until(&mut plain, &mut seen, ts).await;

    // The two halves merge back.
    let list = client.range_list().await.unwrap();
    let left = user_range_of(&list, b"k03");
    client.merge(left).await.unwrap();
    write_round(&client, "k", 20, 2).await;
    expected += 20;
    let ts = client.timestamp().await.unwrap();
    follow_until(&mut plain, &mut seen, ts).await;

    // The range's leader is killed while writes go on, then comes back.
    let list = client.range_list().await.unwrap();
    let range = user_range_of(&list, b"k03");
    let leader = cluster.leader_of(range).await;
    cluster.procs[leader].kill9();
    write_round(&client, "k", 20, 3).await;
    expected += 20;
    cluster.procs[leader].spawn();
    write_round(&client, "k", 20, 4).await;
    expected += 20;
    let last = client.timestamp().await.unwrap();
    follow_until(&mut plain, &mut seen, last).await;
    follow_until(&mut grouped, &mut seen_grouped, last).await;

    assert_eq!(seen.changes.len(), expected, "every write once");
    assert_eq!(
        seen_grouped.changes.len(),
        expected,
        "every write once, grouped"
    );
    let latest = seen.latest();
    for i in 0..20 {
        let key = format!("k{i:02}").into_bytes();
        assert_eq!(latest[&key], Some(b"4".to_vec()));
        assert_eq!(client.get(SPHERE, &key).await.unwrap(), Some(b"4".to_vec()));
    }
    // Previous values: the first write of round 1 replaced round 0's value.
    let replaced = seen
        .changes
        .iter()
        .find(|c| c.key == b"k00" && c.value.as_deref() == Some(b"1".as_slice()))
        .unwrap();
    assert_eq!(replaced.prev_value.as_deref(), Some(b"0".as_slice()));
    // The transaction over both ranges came whole.
    let txn_ts = seen
        .changes
        .iter()
        .find(|c| c.value.as_deref() == Some(b"txn".as_slice()))
        .unwrap()
        .commit_ts;
    let whole = &seen_grouped.txns[&txn_ts];
    assert_eq!(
        whole.iter().map(|c| c.key.clone()).collect::<Vec<_>>(),
        vec![b"k03".to_vec(), b"k15".to_vec()]
    );

    // A subscription resumed from the cursor stored after round 0 delivers the rest again,
    // once each.
    let cursor = Cursor::parse(&cursor.to_string()).unwrap();
    let mut resumed = client
        .feed(SPHERE)
        .since(&cursor)
        .resolve_interval_ms(RESOLVE_INTERVAL_MS)
        .subscribe()
        .await
        .unwrap();
    let mut again = Delivered {
        resolved: cursor.resolved_ts(),
        ..Delivered::default()
    };
    follow_until(&mut resumed, &mut again, last).await;
    let key_ts = |c: &Change| (c.key.clone(), c.commit_ts);
    let mut after: Vec<(Vec<u8>, u64)> = seen
        .changes
        .iter()
        .filter(|c| c.commit_ts > cursor.resolved_ts() && c.commit_ts <= last)
        .map(key_ts)
        .collect();
    let mut resent: Vec<(Vec<u8>, u64)> = again
        .changes
        .iter()
        .filter(|c| c.commit_ts <= last)
        .map(key_ts)
        .collect();
    after.sort();
    resent.sort();
    assert_eq!(resent, after);
    drop((plain, grouped, resumed));
    eventually("the restarted node to serve", || async {
        common::status(&cluster.procs[leader].addr, false).await
    })
    .await;
}

/// A subscriber that stops taking changes while writes go on is disconnected by the server
/// (nothing piles up for it there) and, once it reads again, resumes from its checkpoint
/// with nothing lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_subscriber_is_disconnected_and_resumes_whole() {
    const SLOW_CONSUMER_TIMEOUT_MS: &str = "300";
    /// Long enough for the server's queue, the connection's window and the client's buffer
    /// to fill, and far longer than the timeout.
    const PAUSE_MS: u64 = 4_000;
    const WRITERS: usize = 4;
    /// Large, so the writes outrun the HTTP/2 windows (megabytes) in a pause.
    const VALUE_SIZE_BYTES: usize = 64 << 10;
    const MIN_RESOLVE_INTERVAL_MS: u64 = 10;
    let mut args = FAST_ELECTIONS.to_vec();
    args.extend(["--feed-slow-consumer-timeout-ms", SLOW_CONSUMER_TIMEOUT_MS]);
    let cluster = ProcCluster::start(3, &args).await;
    let client = cluster.client().await;
    let mut sub = client
        .feed(SPHERE)
        .resolve_interval_ms(MIN_RESOLVE_INTERVAL_MS)
        .subscribe()
        .await
        .unwrap();
    let before = client.timestamp().await.unwrap();
    let mut seen = Delivered::default();
    follow_until(&mut sub, &mut seen, before).await;

    // The subscriber sleeps while writers go on. A leader move (the allocator balances
    // leaders of a new cluster) may end the stream first; the pause then goes again.
    const PAUSES: usize = 3;
    let disconnected = |cluster: &ProcCluster| {
        (0..cluster.procs.len()).any(|i| {
            cluster
                .log(i)
                .contains("disconnected: resume from the last cursor")
        })
    };
    let mut written = 0;
    for pause in 0..PAUSES {
        let stop_at = tokio::time::Instant::now() + Duration::from_millis(PAUSE_MS);
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let client = client.clone();
                tokio::spawn(async move {
                    let mut written = 0usize;
                    while tokio::time::Instant::now() < stop_at {
                        let key = format!("slow{pause}-{w}-{written:05}");
                        client
                            .put(SPHERE, key.as_bytes(), &vec![b'v'; VALUE_SIZE_BYTES])
                            .await
                            .unwrap();
                        written += 1;
                    }
                    written
                })
            })
            .collect();
        for w in writers {
            written += w.await.unwrap();
        }
        let after = client.timestamp().await.unwrap();
        follow_until(&mut sub, &mut seen, after).await;
        assert_eq!(
            seen.changes.len(),
            written,
            "every write delivered once after pause {pause}"
        );
        if disconnected(&cluster) {
            break;
        }
    }
    assert!(
        disconnected(&cluster),
        "the slow subscriber was never disconnected ({written} writes of \
         {VALUE_SIZE_BYTES} bytes in {PAUSES} pauses of {PAUSE_MS} ms)"
    );
    assert!(sub.streams_reopened() >= 1);
}

/// A feed from below the GC horizon answers HISTORY_COMPACTED with the horizon, and one from
/// the horizon delivers what came after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_feed_from_below_the_gc_horizon_is_refused_with_the_horizon() {
    let mut args = FAST_ELECTIONS.to_vec();
    args.extend(["--gc-ttl", "2s", "--gc-interval-ms", "200"]);
    let cluster = ProcCluster::start(3, &args).await;
    let client = cluster.client().await;
    client.put(SPHERE, b"early", b"1").await.unwrap();
    let before = client.timestamp().await.unwrap();
    // Time passes; a write moves the newest oracle timestamp past the GC TTL.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    client.put(SPHERE, b"late", b"1").await.unwrap();
    let horizon = eventually("a feed from below the GC horizon to be refused", || async {
        let mut feed = client
            .feed(SPHERE)
            .since_ts(before)
            .subscribe()
            .await
            .ok()?;
        match tokio::time::timeout(Duration::from_secs(10), feed.next()).await {
            Ok(Some(Err(spheredb_client::ClientError::HistoryCompacted { horizon, .. }))) => {
                Some(horizon)
            }
            _ => None,
        }
    })
    .await;
    assert!(horizon > before, "horizon {horizon} not above {before}");
    let mut from_horizon = client
        .feed(SPHERE)
        .since_ts(horizon)
        .resolve_interval_ms(RESOLVE_INTERVAL_MS)
        .subscribe()
        .await
        .unwrap();
    let mut resynced = Delivered {
        resolved: horizon,
        ..Delivered::default()
    };
    let now = client.timestamp().await.unwrap();
    follow_until(&mut from_horizon, &mut resynced, now).await;
    assert_eq!(
        resynced.latest().get(b"late".as_slice()),
        Some(&Some(b"1".to_vec())),
        "the write after the horizon is delivered"
    );
}
