//! Change feeds on real processes: every committed write delivered once per subscription, in
//! commit order per key and never at or below a checkpoint already delivered, across a
//! split, a merge, a leader kill and the killed node's restart; resuming from a stored
//! cursor; whole transactions in grouped mode.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use spheredb_client::feed::{Change, Cursor, FeedItem, Subscription};
use spheredb_client::{kv_key, Client, ClientError};

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

/// How many times a put whose outcome is unknown is tried again.
const MAX_AMBIGUOUS_PUTS: usize = 5;

/// Puts `key`, trying again while the outcome is unknown (a leader killed or moved with the
/// put in flight); returns how many attempts besides the last may have been applied.
async fn put_retrying(client: &Client, key: &[u8], value: &[u8]) -> usize {
    let mut ambiguous = 0;
    loop {
        match client.put(SPHERE, key, value).await {
            Ok(()) => return ambiguous,
            Err(ClientError::OutcomeUnknown(_)) if ambiguous < MAX_AMBIGUOUS_PUTS => ambiguous += 1,
            Err(e) => panic!("put {}: {e}", String::from_utf8_lossy(key)),
        }
    }
}

/// Writes `count` keys `prefix00..` with value `round`, one put each; returns how many
/// more writes than `count` may have been applied (see [`put_retrying`]).
async fn write_round(client: &Client, prefix: &str, count: usize, round: usize) -> usize {
    let mut ambiguous = 0;
    for i in 0..count {
        let key = format!("{prefix}{i:02}");
        ambiguous += put_retrying(client, key.as_bytes(), format!("{round}").as_bytes()).await;
    }
    ambiguous
}

/// Asserts that `delivered` changes account for `expected` writes plus at most `ambiguous`
/// whose outcome was unknown.
fn assert_delivered_once(delivered: usize, expected: usize, ambiguous: usize, what: &str) {
    assert!(
        (expected..=expected + ambiguous).contains(&delivered),
        "{what}: {delivered} changes delivered for {expected} writes \
         ({ambiguous} more may have been applied)"
    );
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
    let mut ambiguous = 0usize;

    ambiguous += write_round(&client, "k", 20, 0).await;
    expected += 20;
    let ts = client.timestamp().await.unwrap();
    follow_until(&mut plain, &mut seen, ts).await;
    let cursor = seen.cursors.last().cloned().unwrap();

    // A split in the middle of the span, then writes on both sides and a transaction over
    // both ranges.
    client.split(&kv_key(SPHERE, b"k10")).await.unwrap();
    ambiguous += write_round(&client, "k", 20, 1).await;
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
    ambiguous += write_round(&client, "k", 20, 2).await;
    expected += 20;
    let ts = client.timestamp().await.unwrap();
    follow_until(&mut plain, &mut seen, ts).await;

    // The range's leader is killed while writes go on, then comes back.
    let list = client.range_list().await.unwrap();
    let range = user_range_of(&list, b"k03");
    let leader = cluster.leader_of(range).await;
    cluster.procs[leader].kill9();
    ambiguous += write_round(&client, "k", 20, 3).await;
    expected += 20;
    cluster.procs[leader].spawn();
    ambiguous += write_round(&client, "k", 20, 4).await;
    expected += 20;
    let last = client.timestamp().await.unwrap();
    follow_until(&mut plain, &mut seen, last).await;
    follow_until(&mut grouped, &mut seen_grouped, last).await;

    assert_delivered_once(seen.changes.len(), expected, ambiguous, "every write once");
    assert_delivered_once(
        seen_grouped.changes.len(),
        expected,
        ambiguous,
        "every write once, grouped",
    );
    let key_ts = |c: &Change| (c.key.clone(), c.commit_ts);
    let plain_set: std::collections::BTreeSet<_> = seen.changes.iter().map(key_ts).collect();
    let grouped_set: std::collections::BTreeSet<_> =
        seen_grouped.changes.iter().map(key_ts).collect();
    assert_eq!(
        plain_set, grouped_set,
        "plain and grouped deliver the same changes"
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
    /// How long writers may go on while the subscriber sleeps. The server's queue, the
    /// connection's HTTP/2 windows, the sockets and the client's buffer hold tens of
    /// megabytes between them, and a loaded debug build writes a few megabytes a second, so
    /// the writers go on until the server reports the disconnect, up to this bound.
    const MAX_PAUSE_MS: u64 = 45_000;
    const POLL_INTERVAL_MS: u64 = 200;
    const WRITERS: usize = 4;
    /// Large, so the writes outrun the buffers quickly.
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
    let (mut written, mut ambiguous) = (0, 0);
    for pause in 0..PAUSES {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(MAX_PAUSE_MS);
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let client = client.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let (mut written, mut ambiguous) = (0usize, 0usize);
                    while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
                        let key = format!("slow{pause}-{w}-{written:05}");
                        let value = vec![b'v'; VALUE_SIZE_BYTES];
                        ambiguous += put_retrying(&client, key.as_bytes(), &value).await;
                        written += 1;
                    }
                    (written, ambiguous)
                })
            })
            .collect();
        while !disconnected(&cluster) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            let (w_written, w_ambiguous) = w.await.unwrap();
            written += w_written;
            ambiguous += w_ambiguous;
        }
        let after = client.timestamp().await.unwrap();
        follow_until(&mut sub, &mut seen, after).await;
        assert_delivered_once(
            seen.changes.len(),
            written,
            ambiguous,
            &format!("every write delivered once after pause {pause}"),
        );
        if disconnected(&cluster) {
            break;
        }
    }
    assert!(
        disconnected(&cluster),
        "the slow subscriber was never disconnected ({written} writes of \
         {VALUE_SIZE_BYTES} bytes in {PAUSES} pauses of up to {MAX_PAUSE_MS} ms)"
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

/// A followed range that goes idle quiesces: its feed confirms leadership through the
/// node's batched checks, which wake no replica. Its checkpoints keep advancing while every
/// replica sleeps, and a write wakes it and is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_followed_range_quiesces_and_keeps_resolving() {
    const QUIESCE_AFTER_MS: &str = "500";
    /// Checkpoints followed while the range sleeps.
    const QUIET_CHECKPOINTS: usize = 20;
    /// Quiet phases started over because the allocator moved something meanwhile.
    const MAX_PLACEMENT_RESTARTS: usize = 3;
    /// Quiet phases started over though nothing was moved.
    const MAX_OTHER_RESTARTS: usize = 2;
    let mut args = FAST_ELECTIONS.to_vec();
    args.extend(["--quiesce-after-ms", QUIESCE_AFTER_MS]);
    let cluster = ProcCluster::start(3, &args).await;
    let client = cluster.client().await;
    client.put(SPHERE, b"before", b"1").await.unwrap();
    let mut sub = client
        .feed(SPHERE)
        .resolve_interval_ms(RESOLVE_INTERVAL_MS)
        .subscribe()
        .await
        .unwrap();
    let mut seen = Delivered::default();
    let ts = client.timestamp().await.unwrap();
    follow_until(&mut sub, &mut seen, ts).await;
    let range = user_range_of(&client.range_list().await.unwrap(), b"before");
    let quiesced_everywhere = || async {
        let mut quiesced = 0;
        for addr in cluster.addrs() {
            let status = common::status(&addr, false).await?;
            quiesced += status
                .ranges
                .iter()
                .filter(|r| r.descriptor.as_ref().is_some_and(|d| d.range_id == range))
                .filter(|r| r.quiesced)
                .count();
        }
        Some(quiesced == cluster.procs.len())
    };
    // The subscription's rounds go on meanwhile (every 50 ms); they must not keep it awake.
    let quiesce = || async {
        eventually("the followed range to quiesce on every replica", || async {
            quiesced_everywhere().await?.then_some(())
        })
        .await
    };
    quiesce().await;
    // Something else may wake the range: the allocator still spreading leaders (a transfer
    // wakes the range; counted), or, rarely, a check that a starved peer core answered too
    // late (the round then falls back to a ReadIndex; not counted). A quiet phase woken starts
    // over, a bounded number of times; rounds that wake the range wake phase after phase and
    // fail.
    let (mut placement_restarts, mut other_restarts) = (0, 0);
    let mut actions_before = common::placement_actions(&cluster).await;
    let mut after_quiesce = client.timestamp().await.unwrap();
    let mut checkpoints = 0;
    // Sampled after every checkpoint: a woken range stays awake for at least the quiesce
    // delay (500 ms, ten resolve intervals), so a round that woke it would show.
    while checkpoints < QUIET_CHECKPOINTS || seen.resolved <= after_quiesce {
        let before = seen.resolved;
        follow_until(&mut sub, &mut seen, before + 1).await;
        checkpoints += 1;
        // A node that did not answer (a loaded machine) tells nothing either way.
        if quiesced_everywhere().await != Some(false) {
            continue;
        }
        quiesce().await;
        let actions = common::placement_actions(&cluster).await;
        eprintln!(
            "checkpoint {checkpoints} of a quiet phase woke the range (placement actions \
             {actions_before} -> {actions}); starting the phase over"
        );
        if actions > actions_before {
            placement_restarts += 1;
        } else {
            other_restarts += 1;
        }
        assert!(
            placement_restarts <= MAX_PLACEMENT_RESTARTS && other_restarts <= MAX_OTHER_RESTARTS,
            "checkpoint {checkpoints} of the quiesced range woke it: {placement_restarts} quiet \
             phases woken with placement actions, {other_restarts} without"
        );
        actions_before = actions;
        after_quiesce = client.timestamp().await.unwrap();
        checkpoints = 0;
    }
    client.put(SPHERE, b"after", b"2").await.unwrap();
    let ts = client.timestamp().await.unwrap();
    follow_until(&mut sub, &mut seen, ts).await;
    assert_eq!(
        seen.latest().get(b"after".as_slice()),
        Some(&Some(b"2".to_vec())),
        "the write that woke the range is delivered"
    );
}
