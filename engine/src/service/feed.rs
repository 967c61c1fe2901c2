//! The `Feed` service: change feeds of the part of a sphere's key span that one range holds,
//! served by the range's leader.
//!
//! A stream works in rounds. Each round resolves a timestamp and then delivers, from MVCC
//! history, every change committed after the previous round's resolved timestamp and at or
//! below this one, then the resolved timestamp itself. The catch-up from a `since` cursor is
//! the first round, so catch-up and live changes can neither overlap nor leave a gap: every
//! round reads exactly the window `(previous resolved, resolved]`.
//!
//! A round resolves at `min(T, oldest lock's start ts - 1)`, where `T` is an oracle timestamp
//! fetched after the round began:
//! - the range's leader first reads at `T` (`range::timestamps`): every single-range write it
//!   proposes from then on commits above `T`, and the writes in flight at or below `T` apply
//!   before the round goes on;
//! - the node's batched leadership check ([`crate::range::leadership`]), or else a ReadIndex
//!   barrier, then confirms the leadership with a quorum and that the replica applied
//!   everything committed: a deposed leader cannot resolve, and a later leader seeds its
//!   commit timestamps from an oracle timestamp fetched after it took over, above `T`;
//! - a transaction's commit at or below `T` has its locks on the range until it applies, and
//!   commits above its start ts: the oldest lock bounds the resolved ts. A prewrite not yet
//!   applied is no risk: its transaction takes its commit ts from the oracle after every
//!   prewrite applied, so above `T`.
//!
//! A round whose range changed meanwhile (a split, merge or replica change: a new generation)
//! delivers nothing and ends the stream with the new descriptors; the subscriber re-subscribes
//! from its last resolved ts. Nothing GC, splits, merges or snapshots do is a change: they
//! write no new versions, and the window is read from versions.
//!
//! Bounds: pages of [`FEED_PAGE_MAX_EVENTS`] / [`FEED_PAGE_MAX_BYTES`], read one at a time;
//! [`FEED_STREAM_BUFFER_MESSAGES`] messages queued per stream; a subscriber that takes none
//! for `--feed-slow-consumer-timeout-ms` is disconnected (it resumes from its cursor);
//! [`MAX_CATCHUP_READS_PER_NODE`] pages read at once per node; [`MAX_FEEDS_PER_NODE`] streams.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use spheredb_client::proto::v1::feed_server::Feed;
use spheredb_client::proto::v1::{FeedEvent, ReadConsistency, SubscribeRequest, SubscribeResponse};
use spheredb_client::ClientError;
use spheredb_raft::network::Replica;
use spheredb_storage::mvcc::changes::{scan_changes, ChangePage, ChangeResume, ChangeScan};
use spheredb_storage::mvcc::locks::OldestLock;
use spheredb_storage::mvcc::{self, Timestamp};
use spheredb_storage::{keys, Db};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::errors::{not_leader_hint, wire_lock};
use crate::range::leadership::LeaderChecks;
use crate::range::timestamps::NodeTimestamps;
use crate::replica::leader_node;
use crate::service::kv::{check_history, KvService};

/// How often an idle stream resolves and checkpoints, unless the subscriber asks otherwise.
pub const DEFAULT_RESOLVE_INTERVAL_MS: u64 = 250;
/// The shortest resolve interval a subscriber may ask for.
pub const MIN_RESOLVE_INTERVAL_MS: u64 = 10;
/// The longest resolve interval a subscriber may ask for.
pub const MAX_RESOLVE_INTERVAL_MS: u64 = 60_000;
/// Most changes in one message.
pub const FEED_PAGE_MAX_EVENTS: usize = 1_024;
/// Most bytes of keys and values in one message (one change may cross it).
pub const FEED_PAGE_MAX_BYTES: usize = 1 << 20;
/// Messages queued for one subscriber before its stream waits for it.
pub const FEED_STREAM_BUFFER_MESSAGES: usize = 16;
/// A subscriber that takes no message for this long is disconnected.
pub const DEFAULT_SLOW_CONSUMER_TIMEOUT_MS: u64 = 10_000;
/// Pages of MVCC history read at once on a node, across all its streams.
pub const MAX_CATCHUP_READS_PER_NODE: usize = 4;
/// Streams a node serves at once.
pub const MAX_FEEDS_PER_NODE: usize = 10_000;
/// Locks a round reads to find the oldest; with more, the resolved ts waits.
pub const MAX_LOCKS_READ_PER_ROUND: usize = 10_000;
/// Longest one round may wait for its read timestamp and leadership check.
pub const ROUND_TIMEOUT_MS: u64 = 5_000;

type EventStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<SubscribeResponse, Status>> + Send + 'static>>;

/// The `Feed` service of a node.
pub struct FeedService {
    kv: Arc<KvService>,
    db: Db,
    timestamps: Arc<NodeTimestamps>,
    checks: Arc<LeaderChecks>,
    reads: Arc<Semaphore>,
    feeds: Arc<Semaphore>,
    slow_consumer_timeout_ms: u64,
}

impl FeedService {
    pub fn new(
        kv: Arc<KvService>,
        db: Db,
        timestamps: Arc<NodeTimestamps>,
        checks: Arc<LeaderChecks>,
        slow_consumer_timeout_ms: u64,
    ) -> Self {
        FeedService {
            kv,
            db,
            timestamps,
            checks,
            slow_consumer_timeout_ms,
            reads: Arc::new(Semaphore::new(MAX_CATCHUP_READS_PER_NODE)),
            feeds: Arc::new(Semaphore::new(MAX_FEEDS_PER_NODE)),
        }
    }
}

/// One stream: what it serves and where it stands.
struct Stream {
    kv: Arc<KvService>,
    db: Db,
    timestamps: Arc<NodeTimestamps>,
    checks: Arc<LeaderChecks>,
    reads: Arc<Semaphore>,
    replica: Arc<Replica>,
    generation: u64,
    /// Internal keys: `[start, request_end)`.
    start: Vec<u8>,
    request_end: Vec<u8>,
    with_prev_value: bool,
    resolve_interval: Duration,
    /// Every change at or below it was sent.
    resolved: Timestamp,
    out: mpsc::Sender<Result<SubscribeResponse, Status>>,
    /// The error that ended the stream, sent after everything `out` queued.
    last_error: Arc<OnceLock<Status>>,
    /// A subscriber that takes no message for this long is disconnected.
    slow_consumer_timeout: Duration,
}

/// The subscriber went away or fell too far behind: the stream ends.
enum Stop {
    Gone,
    Failed(ClientError),
}

impl From<ClientError> for Stop {
    fn from(e: ClientError) -> Stop {
        Stop::Failed(e)
    }
}

impl Stream {
    async fn run(mut self) {
        let mut applies = self.replica.shared.watch_applies();
        loop {
            // Marked seen before the round reads, so an apply during the round wakes the next.
            applies.borrow_and_update();
            match self.round().await {
                Ok(()) => {}
                Err(Stop::Gone) => return,
                Err(Stop::Failed(e)) => {
                    self.fail(e);
                    return;
                }
            }
            tokio::select! {
                changed = applies.changed() => {
                    if changed.is_err() {
                        self.fail(ClientError::Unavailable(
                            "the range's replica stopped on this node; re-subscribe".into(),
                        ));
                        return;
                    }
                }
                _ = tokio::time::sleep(self.resolve_interval) => {}
                _ = self.out.closed() => return,
            }
        }
    }

    /// Ends the stream with `error`, delivered after the messages already queued (the queue
    /// may be full: a slow subscriber).
    fn fail(&self, error: ClientError) {
        if let ClientError::ResourceExhausted(why) = &error {
            tracing::info!(
                range = self.replica.shared.range_id,
                "change feed ended: {why}"
            );
        }
        // Set once: the stream ends here.
        let _ = self.last_error.set(error.to_status());
    }

    /// The part of the request the range holds now, or the error that ends the stream when
    /// the range changed (the subscriber re-subscribes where it stands).
    fn served_end(&self) -> Result<Vec<u8>, ClientError> {
        // A range being merged away must not resolve: once the merge applies, the left range
        // commits on these keys from its own timestamps, which a round here may have passed.
        if let Some(frozen) = self.replica.shared.frozen() {
            return Err(ClientError::Unavailable(format!(
                "range {} is being merged into range {}; re-subscribe from the last resolved timestamp",
                self.replica.shared.range_id, frozen.into
            )));
        }
        let span = self.replica.shared.span();
        match &span {
            Some(s) if s.generation == self.generation && s.contains(&self.start) => {
                Ok(if s.end_key.is_empty() || s.end_key >= self.request_end {
                    self.request_end.clone()
                } else {
                    s.end_key.clone()
                })
            }
            _ => Err(match self.kv.outside(&self.replica, span) {
                ClientError::KeyNotInRange { descriptors, .. } => ClientError::StaleGeneration {
                    message: format!(
                        "range {} split, merged or changed replicas; re-subscribe from the \
                         last resolved timestamp",
                        self.replica.shared.range_id
                    ),
                    descriptors,
                },
                other => other,
            }),
        }
    }

    async fn round(&mut self) -> Result<(), Stop> {
        let end = self.served_end()?;
        let term = self.leading_term()?;
        let fresh = self.timestamps.fresh_ts();
        let resolve_at = with_timeout(fresh, "a fresh timestamp").await?;
        let read = self.kv.read_ts(
            &self.replica,
            &self.start,
            &end,
            Some(resolve_at),
            ReadConsistency::Linearizable as i32,
        );
        with_timeout(read, "the read timestamp").await?;
        // The node's batched check confirms the leadership without waking the range; when it
        // cannot (entries in flight, a peer down), a ReadIndex does, on an awake range.
        if !self.checks.confirm(&self.replica, term).await {
            self.replica.touch();
            let barrier = self
                .kv
                .read_barrier(&self.replica, ReadConsistency::Linearizable as i32);
            with_timeout(barrier, "the leadership check").await?;
        }
        // Everything committed at or below `resolve_at` has applied here now, except the
        // transactions whose locks are still on the span.
        let (db, start, lock_end) = (self.db.clone(), self.start.clone(), end.clone());
        let oldest = tokio::task::spawn_blocking(move || {
            mvcc::locks::oldest_lock(&db, &start, &lock_end, MAX_LOCKS_READ_PER_ROUND)
        })
        .await
        .map_err(|e| ClientError::Internal(format!("the feed's lock read failed: {e}")))?
        .map_err(|e| self.kv.read_failed(&self.replica, e))?;
        let oldest_start = match &oldest {
            OldestLock::Found(..) if resolve_ignoring_locks() => Some(None),
            OldestLock::None => Some(None),
            OldestLock::Found(_, lock) => Some(Some(lock.start_ts)),
            OldestLock::TooMany(..) => {
                tracing::warn!(
                    range_id = self.replica.shared.range_id,
                    "more than {MAX_LOCKS_READ_PER_ROUND} locks on a followed span; its \
                     resolved timestamp waits while the oldest of them read is resolved"
                );
                None
            }
        };
        let resolved = resolved_ts(self.resolved, resolve_at, oldest_start);
        // The checkpoint names the lock holding it back, for the subscriber to resolve once
        // it is old (with too many to know the oldest, the oldest of those read).
        let lock = match oldest {
            OldestLock::Found(key, lock) | OldestLock::TooMany(key, lock) => {
                Some(wire_lock(spheredb_raft::txn::lock_info(&key, &lock)))
            }
            OldestLock::None => None,
        };
        let mut pages = Vec::new();
        if resolved > self.resolved {
            check_history(&self.replica, self.resolved)?;
            let mut resume: Option<ChangeResume> = None;
            loop {
                let page = self.read_page(&end, resolved, resume.take()).await?;
                resume = page.resume.clone();
                pages.push(page);
                if resume.is_none() {
                    break;
                }
                if pages.len() >= FEED_STREAM_BUFFER_MESSAGES {
                    // Sent before reading on, so a round's memory stays bounded; they are all
                    // at or below `resolved`, which the round still sends last.
                    check_history(&self.replica, self.resolved)?;
                    self.check_unchanged(term)?;
                    for page in pages.drain(..) {
                        self.send(self.message(page)?).await?;
                    }
                }
            }
            // Versions the reads needed could have been collected under them, and the range
            // must still hold what was read: both checked after the reads.
            check_history(&self.replica, self.resolved)?;
        }
        self.check_unchanged(term)?;
        for page in pages {
            self.send(self.message(page)?).await?;
        }
        let mut checkpoint = SubscribeResponse {
            resolved_ts: resolved,
            oldest_lock: lock,
            ..SubscribeResponse::default()
        };
        self.set_served(&mut checkpoint, &end);
        self.send(checkpoint).await?;
        self.resolved = resolved;
        Ok(())
    }

    /// The term this replica leads the range in, or `NotLeader`.
    fn leading_term(&self) -> Result<u64, ClientError> {
        let metrics = self.replica.raft.metrics().borrow_watched().clone();
        if metrics.state.is_leader() {
            Ok(metrics.current_term)
        } else {
            Err(not_leader_hint(leader_node(&self.replica)))
        }
    }

    /// Ends the stream when the range's span changed since the round began, or when the
    /// replica stopped leading in `term`: only a follower installs snapshots, so a replica
    /// that led in one term throughout read no half-installed snapshot.
    fn check_unchanged(&self, term: u64) -> Result<(), ClientError> {
        self.served_end()?;
        if self.leading_term()? != term {
            return Err(not_leader_hint(leader_node(&self.replica)));
        }
        Ok(())
    }

    async fn read_page(
        &self,
        end: &[u8],
        until: Timestamp,
        resume: Option<ChangeResume>,
    ) -> Result<ChangePage, Stop> {
        let _permit = self
            .reads
            .acquire()
            .await
            .map_err(|_| ClientError::Unavailable("the node is shutting down".into()))?;
        let db = self.db.clone();
        let (start, end) = (self.start.clone(), end.to_vec());
        let (since, with_prev_value) = (self.resolved, self.with_prev_value);
        let read = tokio::task::spawn_blocking(move || {
            let snapshot = db.raw().snapshot();
            let scan = ChangeScan {
                start: &start,
                end: &end,
                since,
                until,
                with_prev_value,
                max_changes: FEED_PAGE_MAX_EVENTS,
                max_bytes: FEED_PAGE_MAX_BYTES,
            };
            scan_changes(&db, &snapshot, &scan, resume.as_ref())
        })
        .await
        .map_err(|e| ClientError::Internal(format!("the feed's read task failed: {e}")))?;
        Ok(read.map_err(|e| self.kv.read_failed(&self.replica, e))?)
    }

    /// The message of `page`; a key that is not a sphere's key is corruption (a change would
    /// otherwise vanish without a trace).
    fn message(&self, page: ChangePage) -> Result<SubscribeResponse, ClientError> {
        let events = page
            .changes
            .into_iter()
            .map(|c| {
                let Some((_, user)) = keys::decode_kv_key(&c.key) else {
                    return Err(ClientError::Corruption(format!(
                        "range {}: a change of key {:02x?} in a sphere's span is not a sphere key",
                        self.replica.shared.range_id, c.key
                    )));
                };
                Ok(FeedEvent {
                    key: user.to_vec(),
                    deleted: c.value.is_none(),
                    value: c.value.unwrap_or_default(),
                    commit_ts: c.commit_ts,
                    has_prev_value: c.prev_value.is_some(),
                    prev_value: c.prev_value.unwrap_or_default(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(SubscribeResponse {
            events,
            ..SubscribeResponse::default()
        })
    }

    fn set_served(&self, message: &mut SubscribeResponse, end: &[u8]) {
        if end == self.request_end.as_slice() {
            message.served_to_request_end = true;
        } else if let Some((_, user)) = keys::decode_kv_key(end) {
            message.served_end = user.to_vec();
        }
    }

    async fn send(&self, message: SubscribeResponse) -> Result<(), Stop> {
        match tokio::time::timeout(self.slow_consumer_timeout, self.out.send(Ok(message))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Stop::Gone),
            Err(_) => Err(Stop::Failed(ClientError::ResourceExhausted(format!(
                "the subscriber took no message for {} ms (--feed-slow-consumer-timeout-ms); \
                 disconnected: resume from the last cursor",
                self.slow_consumer_timeout.as_millis()
            )))),
        }
    }
}

/// The resolved ts of a round that stood at `last`, read at the oracle timestamp `fresh`
/// (see the module comment), given the oldest start ts among the span's locks: `Some(None)`
/// when there is none, `None` when there were too many to read (then it stays at `last`).
/// A lock's transaction commits above its start ts, so the resolved ts stays below it.
pub fn resolved_ts(
    last: Timestamp,
    fresh: Timestamp,
    oldest_lock_start: Option<Option<Timestamp>>,
) -> Timestamp {
    let bound = match oldest_lock_start {
        None => last,
        Some(None) => fresh,
        Some(Some(start_ts)) => fresh.min(start_ts.saturating_sub(1)),
    };
    bound.max(last)
}

/// Whether the failpoint `feed-resolve-ignoring-locks` is active: deliberately broken, a round
/// resolves at its fresh timestamp even while transactions' locks are on the span, so their
/// commits arrive at or below a resolved timestamp already sent.
fn resolve_ignoring_locks() -> bool {
    fail::fail_point!("feed-resolve-ignoring-locks", |_| true);
    false
}

async fn with_timeout<T>(
    step: impl std::future::Future<Output = Result<T, ClientError>>,
    what: &str,
) -> Result<T, ClientError> {
    match tokio::time::timeout(Duration::from_millis(ROUND_TIMEOUT_MS), step).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Unavailable(format!(
            "no {what} within {ROUND_TIMEOUT_MS} ms; re-subscribe"
        ))),
    }
}

#[tonic::async_trait]
impl Feed for FeedService {
    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let req = request.into_inner();
        let opened = async {
            let (space, replica) = self.kv.route(&req.header, &req.start)?;
            if space.keyspace != keys::Keyspace::Kv {
                return Err(ClientError::InvalidArgument(
                    "feeds follow a sphere's raw KV keys; feeds of SQL tables are not built yet"
                        .into(),
                ));
            }
            let sphere = space.sphere;
            // Only the leader serves a feed; a follower says where the leader is before the
            // stream opens, so the subscriber goes there at once.
            if !replica.raft.is_leader() {
                return Err(not_leader_hint(leader_node(&replica)));
            }
            let generation = req
                .header
                .as_ref()
                .and_then(|h| h.range.as_ref())
                .map(|r| r.generation)
                .unwrap_or_default();
            if !req.end.is_empty() && req.end <= req.start {
                return Err(ClientError::InvalidArgument(
                    "the span to follow is empty: end must be above start, or empty".into(),
                ));
            }
            let resolve_interval_ms = match req.resolve_interval_ms {
                0 => DEFAULT_RESOLVE_INTERVAL_MS,
                n if (MIN_RESOLVE_INTERVAL_MS..=MAX_RESOLVE_INTERVAL_MS).contains(&n) => n,
                n => {
                    return Err(ClientError::InvalidArgument(format!(
                        "resolve interval {n} ms is outside {MIN_RESOLVE_INTERVAL_MS}..={MAX_RESOLVE_INTERVAL_MS} ms"
                    )))
                }
            };
            if req.since > 0 {
                self.timestamps.check_read_ts(req.since).await?;
            }
            check_history(&replica, req.since)?;
            let permit = self.feeds.clone().try_acquire_owned().map_err(|_| {
                ClientError::ResourceExhausted(format!(
                    "this node serves {MAX_FEEDS_PER_NODE} change feeds already; retry later"
                ))
            })?;
            Ok((sphere, replica, generation, resolve_interval_ms, permit))
        }
        .await;
        let (sphere, replica, generation, resolve_interval_ms, permit) =
            opened.map_err(|e| e.to_status())?;
        let (out, stream) = mpsc::channel(FEED_STREAM_BUFFER_MESSAGES);
        let last_error = Arc::new(OnceLock::new());
        let request_end = if req.end.is_empty() {
            keys::kv_sphere_span(sphere).1
        } else {
            keys::kv_key(sphere, &req.end)
        };
        let feed = Stream {
            kv: self.kv.clone(),
            db: self.db.clone(),
            timestamps: self.timestamps.clone(),
            checks: self.checks.clone(),
            reads: self.reads.clone(),
            replica,
            generation,
            start: keys::kv_key(sphere, &req.start),
            request_end,
            with_prev_value: req.with_prev_value,
            resolve_interval: Duration::from_millis(resolve_interval_ms),
            resolved: req.since,
            out,
            last_error: last_error.clone(),
            slow_consumer_timeout: Duration::from_millis(self.slow_consumer_timeout_ms),
        };
        tokio::spawn(feed.run());
        // The error that ended the stream comes after every queued message: the sender is
        // dropped after it is set, so it is there once the queue ends. The stream counts
        // against the node's bound until the response is dropped, queued messages included.
        let last = std::iter::once_with(move || {
            drop(permit);
            last_error.get().cloned()
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(stream)
                .chain(tokio_stream::iter(last).filter_map(|e| e.map(Err))),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::resolved_ts;

    #[test]
    fn the_resolved_ts_stays_below_every_lock_and_never_goes_back() {
        assert_eq!(resolved_ts(10, 50, Some(None)), 50);
        assert_eq!(
            resolved_ts(10, 50, Some(Some(30))),
            29,
            "below the lock's start"
        );
        assert_eq!(
            resolved_ts(10, 50, Some(Some(80))),
            50,
            "a newer lock: the fresh ts"
        );
        assert_eq!(
            resolved_ts(40, 50, Some(Some(30))),
            40,
            "an old lock never lowers it"
        );
        assert_eq!(
            resolved_ts(40, 50, None),
            40,
            "too many locks to know: it waits"
        );
        assert_eq!(resolved_ts(40, 30, Some(None)), 40);
    }
}
