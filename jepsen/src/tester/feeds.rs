//! The changefeed workload's consumers: while the writers run, each follows the workload's
//! span through a change-feed subscription (one delivers changes one by one, one whole
//! transactions), records everything it gets, and now and then drops the subscription and
//! resumes from the cursor of its last checkpoint, as a device that restarts would. A
//! subscription that fails, or that brings no checkpoint for a while, is resumed the same
//! way after a bounded backoff.
//!
//! ```text
//! start: an oracle timestamp before any write; every consumer starts there
//!   -> writers and nemesis run; consumers follow, resuming every few seconds
//!   -> heal, recovery -> finish: a final oracle timestamp, above every acknowledged commit;
//!      each consumer follows until a checkpoint passes it -> feeds.jsonl -> check
//! ```
//!
//! Every write transaction begins after the start timestamp was handed out and fetches its
//! own start timestamp from the oracle, which its commit lies above (the client sends the
//! newest timestamp it has seen), so every write commits after the consumers' start.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use spheredb_client::{Change, Client, ClientOptions, Cursor, FeedItem, Subscription};

use super::history::Recorder;
use super::workload::{WorkloadKind, SPHERE};
use crate::check::changefeed::{FeedChange, FeedEntry, FeedRecord};

/// The consumers, by whether they ask for whole transactions.
const CONSUMER_GROUPED: [bool; 2] = [false, true];
/// How often idle ranges checkpoint for the consumers: often, so checkpoints interleave
/// with commits and a change that comes too late shows.
const FEED_RESOLVE_INTERVAL_MS: u64 = 50;
/// Call deadline of the consumers' clients (opening each stream of a subscription).
const FEED_CALL_DEADLINE_MS: u64 = 5_000;
/// Extra time over a call deadline before a consumer gives up on a call.
const CALL_SLACK_MS: u64 = 2_000;
/// Mean time a subscription is followed before it is dropped and resumed from its last
/// cursor; each one's is drawn from [half, 1.5 x] of it.
const RESUBSCRIBE_EVERY_MS: u64 = 3_000;
/// A subscription that brings no checkpoint for this long is dropped and resumed.
const FEED_STALL_MS: u64 = 5_000;
/// Longest one wait for the next item, before the consumer looks at the clock again
/// (`Subscription::next` loses nothing when its wait is cut short).
const FEED_POLL_MS: u64 = 250;
/// Subscriptions one consumer starts at most, whatever the time.
const MAX_SUBSCRIPTIONS_PER_CONSUMER: usize = 10_000;
/// Items and waits one subscription is followed for at most.
const MAX_POLLS_PER_SUBSCRIPTION: usize = 10_000_000;
/// Pause before a failed subscription is resumed; doubles up to [`MAX_BACKOFF_MS`].
const INITIAL_BACKOFF_MS: u64 = 100;
const MAX_BACKOFF_MS: u64 = 2_000;
/// Time the consumers get, once given the final timestamp, to reach it.
pub const FINAL_FOLLOW_MS: u64 = 30_000;
/// Time over [`FINAL_FOLLOW_MS`] the tester waits for the consumers to stop.
const STOP_SLACK_MS: u64 = 10_000;
/// Time after the run's deadline the consumers follow at most, final timestamp or not:
/// the writers' drain, the recovery wait and the final follow fit in it.
const CONSUMER_TAIL_MS: u64 = 180_000;
/// Attempts at the start and the final timestamp.
const TIMESTAMP_ATTEMPTS: usize = 10;
/// Pause between those attempts.
const TIMESTAMP_RETRY_PAUSE_MS: u64 = 250;
/// Records kept, all consumers together; past it the consumers stop (their check then
/// ends unknown, never with a false anomaly: what was kept is a prefix).
const MAX_FEED_RECORDS: usize = 5_000_000;

/// What every consumer shares.
struct Shared {
    addrs: Vec<String>,
    recorder: Arc<Recorder>,
    records: Mutex<Vec<FeedRecord>>,
    /// Every consumer starts after this timestamp, taken before any write.
    start_ts: u64,
    /// The final timestamp; 0 until known.
    target_ts: AtomicU64,
    /// Set when the consumers must stop (no final timestamp could be had).
    stop: AtomicBool,
    /// Nobody follows past this, final timestamp or not.
    give_up_at: Instant,
}

impl Shared {
    fn full(&self) -> bool {
        self.records.lock().unwrap_or_else(|p| p.into_inner()).len() >= MAX_FEED_RECORDS
    }
}

/// The running consumers.
pub struct Consumers {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<bool>>,
}

/// What the consumers did.
pub struct FeedsEnd {
    /// Consumers whose checkpoint passed the final timestamp.
    pub reached: usize,
    /// Everything they recorded, in order (lines not numbered yet).
    pub records: Vec<FeedRecord>,
    pub notes: Vec<String>,
    pub problems: Vec<String>,
}

/// A client for the consumers, first trying node `first % n`.
async fn connect(addrs: &[String], first: usize) -> Option<Client> {
    let n = addrs.len();
    if n == 0 {
        return None;
    }
    let seeds: Vec<String> = (0..n).map(|i| addrs[(first + i) % n].clone()).collect();
    let options = ClientOptions {
        call_deadline_ms: FEED_CALL_DEADLINE_MS,
        ..ClientOptions::default()
    };
    let budget = Duration::from_millis(FEED_CALL_DEADLINE_MS + CALL_SLACK_MS);
    tokio::time::timeout(budget, Client::connect(&seeds, options))
        .await
        .ok()?
        .ok()
}

/// A fresh oracle timestamp, in at most [`TIMESTAMP_ATTEMPTS`] attempts.
async fn oracle_timestamp(addrs: &[String]) -> Result<u64, String> {
    let budget = Duration::from_millis(FEED_CALL_DEADLINE_MS + CALL_SLACK_MS);
    let mut last_error = String::from("no attempt made");
    for attempt in 0..TIMESTAMP_ATTEMPTS {
        match connect(addrs, attempt).await {
            Some(client) => match tokio::time::timeout(budget, client.timestamp()).await {
                Ok(Ok(ts)) => return Ok(ts),
                Ok(Err(e)) => last_error = e.to_string(),
                Err(_) => last_error = "no answer in time".into(),
            },
            None => last_error = "cannot connect".into(),
        }
        tokio::time::sleep(Duration::from_millis(TIMESTAMP_RETRY_PAUSE_MS)).await;
    }
    Err(last_error)
}

fn feed_change(change: &Change) -> FeedChange {
    FeedChange {
        key: String::from_utf8_lossy(&change.key).into_owned(),
        value: change
            .value
            .as_ref()
            .map(|v| String::from_utf8_lossy(v).into_owned()),
        commit_ts: change.commit_ts,
    }
}

impl Consumers {
    /// Takes the start timestamp and starts the consumers; call before any writer starts.
    /// `run_deadline` is when the writers stop.
    pub async fn start(
        addrs: Vec<String>,
        recorder: Arc<Recorder>,
        seed: u64,
        run_deadline: Instant,
    ) -> Result<Consumers, String> {
        let start_ts = oracle_timestamp(&addrs)
            .await
            .map_err(|e| format!("no start timestamp for the change-feed consumers: {e}"))?;
        let shared = Arc::new(Shared {
            addrs,
            recorder,
            records: Mutex::new(Vec::new()),
            start_ts,
            target_ts: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            give_up_at: run_deadline + Duration::from_millis(CONSUMER_TAIL_MS),
        });
        let tasks = CONSUMER_GROUPED
            .iter()
            .enumerate()
            .map(|(index, &grouped)| {
                let consumer = Consumer {
                    shared: shared.clone(),
                    index: index as u64,
                    grouped,
                    rng: StdRng::seed_from_u64(
                        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                            .wrapping_add(0xFEED + index as u64),
                    ),
                    cursor: None,
                    resolved: start_ts,
                    subscriptions: 0,
                    final_by: None,
                };
                tokio::spawn(consumer.run())
            })
            .collect();
        Ok(Consumers { shared, tasks })
    }

    /// After the writers stopped and the cluster recovered: takes the final timestamp, lets
    /// every consumer follow until a checkpoint passes it (at most [`FINAL_FOLLOW_MS`]), and
    /// returns what they recorded.
    pub async fn finish(self) -> FeedsEnd {
        let mut notes = Vec::new();
        let mut problems = Vec::new();
        match oracle_timestamp(&self.shared.addrs).await {
            Ok(ts) => self.shared.target_ts.store(ts, Ordering::SeqCst),
            Err(e) => {
                notes.push(format!(
                    "no final timestamp for the change-feed consumers ({e}); lost writes are \
                     not checked"
                ));
                self.shared.stop.store(true, Ordering::SeqCst);
            }
        }
        let until = Instant::now() + Duration::from_millis(FINAL_FOLLOW_MS + STOP_SLACK_MS);
        let mut reached = 0;
        for mut task in self.tasks {
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, &mut task).await {
                Ok(Ok(true)) => reached += 1,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    problems.push(format!("a change-feed consumer stopped abnormally: {e}"))
                }
                Err(_) => {
                    task.abort();
                    notes.push("a change-feed consumer did not stop in time".into());
                }
            }
        }
        if self.shared.full() {
            notes.push(format!(
                "the change-feed consumers recorded {MAX_FEED_RECORDS} items and stopped"
            ));
        }
        let records = std::mem::take(
            &mut *self
                .shared
                .records
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        FeedsEnd {
            reached,
            records,
            notes,
            problems,
        }
    }
}

/// How following one subscription ended.
enum FollowEnd {
    /// A checkpoint passed the final timestamp.
    Reached,
    /// Dropped on purpose, to resume from the last cursor.
    Restart,
    Failed(String),
    /// Out of time or records.
    Stop,
}

/// One consumer: a device following the span.
struct Consumer {
    shared: Arc<Shared>,
    index: u64,
    grouped: bool,
    rng: StdRng,
    /// The cursor of the last checkpoint, in the text form a device would store.
    cursor: Option<String>,
    /// The resolved ts of the last checkpoint (the start timestamp before any).
    resolved: u64,
    subscriptions: u64,
    /// The final timestamp and when to give up on it, once known.
    final_by: Option<(u64, Instant)>,
}

impl Consumer {
    fn record(&self, sub: u64, entry: FeedEntry) {
        let mut records = self
            .shared
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if records.len() >= MAX_FEED_RECORDS {
            return;
        }
        records.push(FeedRecord {
            consumer: self.index,
            grouped: self.grouped,
            sub,
            entry,
            time_ns: Some(self.shared.recorder.now_ns()),
            line: 0,
        });
    }

    /// Notices the final timestamp once it is known (and records it, once).
    fn poll_final(&mut self) -> Option<u64> {
        if self.final_by.is_none() {
            let ts = self.shared.target_ts.load(Ordering::SeqCst);
            if ts > 0 {
                self.final_by = Some((ts, Instant::now() + Duration::from_millis(FINAL_FOLLOW_MS)));
                self.record(0, FeedEntry::Final { ts });
            }
        }
        self.final_by.map(|(ts, _)| ts)
    }

    fn reached(&self) -> bool {
        self.final_by.is_some_and(|(ts, _)| self.resolved >= ts)
    }

    fn must_stop(&self) -> bool {
        let now = Instant::now();
        self.shared.stop.load(Ordering::SeqCst)
            || now >= self.shared.give_up_at
            || self.final_by.is_some_and(|(_, by)| now >= by)
            || self.shared.full()
    }

    /// Follows until a checkpoint passes the final timestamp (true), or time runs out.
    async fn run(mut self) -> bool {
        let mut client: Option<Client> = None;
        let mut backoff_ms = INITIAL_BACKOFF_MS;
        for _ in 0..MAX_SUBSCRIPTIONS_PER_CONSUMER {
            self.poll_final();
            if self.reached() {
                return true;
            }
            if self.must_stop() {
                return false;
            }
            let connected = match &client {
                Some(c) => c.clone(),
                None => match connect(&self.shared.addrs, self.index as usize).await {
                    Some(c) => {
                        client = Some(c.clone());
                        c
                    }
                    None => {
                        backoff_ms = self.pause(backoff_ms).await;
                        continue;
                    }
                },
            };
            let (mut sub, number) = match self.subscribe(&connected).await {
                Ok(s) => s,
                Err(error) => {
                    self.record(0, FeedEntry::Refused { error });
                    client = None;
                    backoff_ms = self.pause(backoff_ms).await;
                    continue;
                }
            };
            match self.follow(&mut sub, number).await {
                FollowEnd::Reached => return true,
                FollowEnd::Restart => backoff_ms = INITIAL_BACKOFF_MS,
                FollowEnd::Failed(reason) => {
                    self.record(number, FeedEntry::Ended { reason });
                    client = None;
                    backoff_ms = self.pause(backoff_ms).await;
                }
                FollowEnd::Stop => return false,
            }
        }
        false
    }

    /// Sleeps `backoff_ms`; returns the next backoff.
    async fn pause(&self, backoff_ms: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
        (backoff_ms * 2).min(MAX_BACKOFF_MS)
    }

    /// Subscribes from the stored cursor (the start timestamp before any checkpoint).
    async fn subscribe(&mut self, client: &Client) -> Result<(Subscription, u64), String> {
        let (start, end) = WorkloadKind::Changefeed.key_span();
        let mut builder = client
            .feed(SPHERE)
            .span(&start, &end)
            .resolve_interval_ms(FEED_RESOLVE_INTERVAL_MS);
        if self.grouped {
            builder = builder.grouped();
        }
        builder = match &self.cursor {
            Some(text) => {
                let cursor = Cursor::parse(text)
                    .map_err(|e| format!("the stored cursor does not parse: {e}"))?;
                builder.since(&cursor)
            }
            None => builder.since_ts(self.shared.start_ts),
        };
        let budget = Duration::from_millis(FEED_CALL_DEADLINE_MS + CALL_SLACK_MS);
        let sub = match tokio::time::timeout(budget, builder.subscribe()).await {
            Ok(Ok(sub)) => sub,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => {
                return Err(format!(
                    "no subscription within {} ms",
                    FEED_CALL_DEADLINE_MS + CALL_SLACK_MS
                ))
            }
        };
        self.subscriptions += 1;
        // Where the subscription says it starts: the checker holds it to the last
        // checkpoint.
        let since = sub.cursor().resolved_ts();
        self.record(self.subscriptions, FeedEntry::Subscribe { since });
        Ok((sub, self.subscriptions))
    }

    /// Records the items of `sub` until it is time to resume, it fails or stalls, or a
    /// checkpoint passes the final timestamp.
    async fn follow(&mut self, sub: &mut Subscription, number: u64) -> FollowEnd {
        let planned_ms = self
            .rng
            .random_range(RESUBSCRIBE_EVERY_MS / 2..=RESUBSCRIBE_EVERY_MS * 3 / 2);
        let resubscribe_at = Instant::now() + Duration::from_millis(planned_ms);
        let mut progressed_at = Instant::now();
        for _ in 0..MAX_POLLS_PER_SUBSCRIPTION {
            let final_ts = self.poll_final();
            if self.reached() {
                return FollowEnd::Reached;
            }
            if self.must_stop() {
                return FollowEnd::Stop;
            }
            let now = Instant::now();
            // Planned restarts stop once the final timestamp is known: from then on the
            // consumer only catches up.
            if final_ts.is_none() && now >= resubscribe_at {
                self.record(
                    number,
                    FeedEntry::Ended {
                        reason: "dropped to resume from the last cursor, as a device restart \
                                 would"
                            .into(),
                    },
                );
                return FollowEnd::Restart;
            }
            if now.duration_since(progressed_at) >= Duration::from_millis(FEED_STALL_MS) {
                self.record(
                    number,
                    FeedEntry::Ended {
                        reason: format!("no checkpoint for {FEED_STALL_MS} ms; resuming"),
                    },
                );
                return FollowEnd::Restart;
            }
            let item =
                match tokio::time::timeout(Duration::from_millis(FEED_POLL_MS), sub.next()).await {
                    Err(_) => continue,
                    Ok(None) => return FollowEnd::Failed("the subscription ended".into()),
                    Ok(Some(Err(e))) => return FollowEnd::Failed(e.to_string()),
                    Ok(Some(Ok(item))) => item,
                };
            match item {
                FeedItem::Change(change) => {
                    self.record(number, FeedEntry::Change(feed_change(&change)));
                }
                FeedItem::Txn { commit_ts, changes } => {
                    let changes = changes.iter().map(feed_change).collect();
                    self.record(number, FeedEntry::Txn { commit_ts, changes });
                }
                FeedItem::Checkpoint(cursor) => {
                    progressed_at = Instant::now();
                    self.checkpoint(number, &cursor);
                }
            }
        }
        FollowEnd::Restart
    }

    /// Records a checkpoint and stores its cursor as text, checking that it reads back.
    fn checkpoint(&mut self, number: u64, cursor: &Cursor) {
        let ts = cursor.resolved_ts();
        self.record(number, FeedEntry::Checkpoint { ts });
        let text = cursor.to_string();
        match Cursor::parse(&text) {
            Ok(back) if back.resolved_ts() == ts && back == *cursor => {}
            Ok(back) => self.record(
                number,
                FeedEntry::BadCursor {
                    ts,
                    error: format!("it reads back as timestamp {}", back.resolved_ts()),
                },
            ),
            Err(e) => self.record(
                number,
                FeedEntry::BadCursor {
                    ts,
                    error: e.to_string(),
                },
            ),
        }
        self.cursor = Some(text);
        self.resolved = ts;
    }
}
