//! Change-feed subscriptions: the committed writes of a sphere (or a span of its keys) after
//! a cursor, merged from every range of the span, with checkpoints to resume from.
//!
//! ```no_run
//! # async fn demo(client: spheredb_client::Client) -> Result<(), spheredb_client::ClientError> {
//! use spheredb_client::feed::FeedItem;
//! // A stored cursor (`Cursor::parse`) resumes where an earlier subscription stood.
//! let mut feed = client.feed(7).subscribe().await?;
//! while let Some(item) = feed.next().await {
//!     match item? {
//!         FeedItem::Change(change) => println!("{:?} at {}", change.key, change.commit_ts),
//!         FeedItem::Txn { commit_ts, changes } => println!("{} changes at {commit_ts}", changes.len()),
//!         // Store the cursor with the application's own state, in the same transaction.
//!         FeedItem::Checkpoint(cursor) => println!("resume from {cursor}"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! How it works: the span is followed in *pieces*, one stream per piece, each served by the
//! leader of the range holding the piece's start (`Feed.Subscribe`). A stream serves its
//! range's part of the piece; when the range ends first, the rest becomes a piece of its own.
//! A stream that ends (a split, merge, leader change, restart) is opened again from its
//! piece's last resolved timestamp, and the changes it sends again are dropped: each piece
//! remembers, per key, the newest commit ts it delivered above its resolved ts. So within one
//! subscription every change is delivered once, each key's changes in commit order; from a
//! stored cursor delivery is at least once (changes after the cursor's timestamp).
//!
//! The checkpoint's timestamp is the lowest resolved ts of all pieces: no change at or below
//! it will follow anywhere on the span. In grouped mode changes are held until a checkpoint
//! passes them and then delivered a transaction at a time (all changes of one commit ts), so
//! a device never applies half a transaction.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spheredb_storage::keys;
use spheredb_storage::mvcc::physical_ms;
use tokio::sync::mpsc;

use crate::client::{Client, Retry};
use crate::error::ClientError;
use crate::proto::v1::{LockInfo, SubscribeRequest, SubscribeResponse};

/// Messages from the streams of a subscription queued for its consumer.
pub const SUBSCRIPTION_BUFFER_MESSAGES: usize = 64;
/// In grouped mode, most bytes of changes held back waiting for a checkpoint; past it the
/// subscription fails (resume from the last cursor, or follow without grouping).
pub const MAX_GROUPED_BUFFER_BYTES: usize = 64 << 20;
/// A piece's stream that fails this many times in a row without a checkpoint in between ends
/// the subscription with its last error.
pub const MAX_STREAM_FAILURES_IN_A_ROW: u32 = 32;
/// First pause before a failed stream is opened again; doubles up to
/// [`MAX_STREAM_BACKOFF_MS`].
pub const INITIAL_STREAM_BACKOFF_MS: u64 = 20;
/// Longest pause before a failed stream is opened again.
pub const MAX_STREAM_BACKOFF_MS: u64 = 1_000;
/// A lock that holds a piece's resolved ts back and is older than this is resolved by the
/// subscription (its transaction's coordinator may have died); at most once per this long
/// per piece.
pub const RESOLVE_BLOCKING_LOCK_AFTER_MS: u64 = 2_000;
/// A stream that sends nothing (not even a checkpoint) for this long, or for two resolve
/// intervals when those are longer, is given up and opened again: servers checkpoint at
/// least every resolve interval.
pub const STREAM_SILENCE_TIMEOUT_MS: u64 = 15_000;

/// How long a stream resolving every `resolve_interval_ms` may stay silent.
fn silence_timeout_ms(resolve_interval_ms: u64) -> u64 {
    STREAM_SILENCE_TIMEOUT_MS.max(resolve_interval_ms.saturating_mul(2))
}

/// One committed write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The user key, in the sphere's raw keyspace.
    pub key: Vec<u8>,
    /// The value written; `None` for a delete.
    pub value: Option<Vec<u8>>,
    pub commit_ts: u64,
    /// The value before, when asked for ([`FeedBuilder::with_prev_value`]) and the key had
    /// one.
    pub prev_value: Option<Vec<u8>>,
}

/// What a subscription delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedItem {
    /// A change (ungrouped mode), as soon as it is read.
    Change(Change),
    /// Every change of one transaction on the span, in key order (grouped mode), once a
    /// checkpoint passed it.
    Txn {
        commit_ts: u64,
        changes: Vec<Change>,
    },
    /// No change at or below `cursor.resolved_ts()` will follow; resuming from `cursor`
    /// delivers the changes after it.
    Checkpoint(Cursor),
}

/// Where a subscription stands: its span and a resolved timestamp. Opaque to applications:
/// store [`Cursor::to_string`] and give it back through [`Cursor::parse`]. It names no
/// range, so it survives splits, merges, leader changes and restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    sphere: u64,
    start: Vec<u8>,
    end: Vec<u8>,
    resolved_ts: u64,
}

const CURSOR_VERSION: u8 = 1;

impl Cursor {
    /// The timestamp every change at or below which was delivered.
    pub fn resolved_ts(&self) -> u64 {
        self.resolved_ts
    }

    pub fn sphere(&self) -> u64 {
        self.sphere
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = vec![CURSOR_VERSION];
        out.extend_from_slice(&self.sphere.to_be_bytes());
        out.extend_from_slice(&self.resolved_ts.to_be_bytes());
        for part in [&self.start, &self.end] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Reads a cursor from its text form ([`Cursor::to_string`]).
    pub fn parse(text: &str) -> Result<Cursor, ClientError> {
        let bad = |why: &str| {
            ClientError::InvalidArgument(format!(
                "not a change-feed cursor ({why}); pass a cursor a checkpoint printed"
            ))
        };
        let bytes = hex_decode(text.trim()).ok_or_else(|| bad("not hexadecimal"))?;
        let (body, crc) = bytes
            .split_at_checked(bytes.len().saturating_sub(4))
            .ok_or_else(|| bad("too short"))?;
        let crc: [u8; 4] = crc.try_into().map_err(|_| bad("too short"))?;
        if crc32fast::hash(body) != u32::from_be_bytes(crc) {
            return Err(bad("its checksum does not match"));
        }
        let mut rest = body;
        let mut take = |n: usize| -> Result<&[u8], ClientError> {
            let (head, tail) = rest.split_at_checked(n).ok_or_else(|| bad("truncated"))?;
            rest = tail;
            Ok(head)
        };
        if take(1)? != [CURSOR_VERSION] {
            return Err(bad("unknown version"));
        }
        let u64_of = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or_default());
        let sphere = u64_of(take(8)?);
        let resolved_ts = u64_of(take(8)?);
        let len = u32::from_be_bytes(take(4)?.try_into().unwrap_or_default()) as usize;
        let start = take(len)?.to_vec();
        let len = u32::from_be_bytes(take(4)?.try_into().unwrap_or_default()) as usize;
        let end = take(len)?.to_vec();
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(Cursor {
            sphere,
            start,
            end,
            resolved_ts,
        })
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.encode() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A subscription being set up ([`Client::feed`]).
pub struct FeedBuilder {
    client: Client,
    sphere: u64,
    start: Vec<u8>,
    end: Vec<u8>,
    since: Option<u64>,
    with_prev_value: bool,
    grouped: bool,
    resolve_interval_ms: u64,
}

impl Client {
    /// A change feed of `sphere`'s keys; [`FeedBuilder::subscribe`] starts it.
    pub fn feed(&self, sphere: u64) -> FeedBuilder {
        FeedBuilder {
            client: self.clone(),
            sphere,
            start: Vec::new(),
            end: Vec::new(),
            since: None,
            with_prev_value: false,
            grouped: false,
            resolve_interval_ms: 0,
        }
    }
}

impl FeedBuilder {
    /// Follows only `[start, end)` of the sphere's keys (empty `end`: to the sphere's end).
    pub fn span(mut self, start: &[u8], end: &[u8]) -> Self {
        self.start = start.to_vec();
        self.end = end.to_vec();
        self
    }

    /// Resumes from `cursor`: its span, and the changes after its timestamp.
    pub fn since(mut self, cursor: &Cursor) -> Self {
        self.sphere = cursor.sphere;
        self.start = cursor.start.clone();
        self.end = cursor.end.clone();
        self.since = Some(cursor.resolved_ts);
        self
    }

    /// Delivers the changes committed after `ts` (an oracle timestamp); without it or
    /// [`FeedBuilder::since`], the changes committed after the subscription began.
    pub fn since_ts(mut self, ts: u64) -> Self {
        self.since = Some(ts);
        self
    }

    /// Each change carries the key's value before it.
    pub fn with_prev_value(mut self) -> Self {
        self.with_prev_value = true;
        self
    }

    /// Delivers whole transactions ([`FeedItem::Txn`]) once a checkpoint passed them.
    pub fn grouped(mut self) -> Self {
        self.grouped = true;
        self
    }

    /// How often idle ranges checkpoint (0: the servers' default).
    pub fn resolve_interval_ms(mut self, ms: u64) -> Self {
        self.resolve_interval_ms = ms;
        self
    }

    /// Starts following the span.
    pub async fn subscribe(self) -> Result<Subscription, ClientError> {
        if !self.end.is_empty() && self.end <= self.start {
            return Err(ClientError::InvalidArgument(
                "the span to follow is empty: end must be above start, or empty".into(),
            ));
        }
        let since = match self.since {
            Some(ts) => ts,
            None => self.client.timestamp().await?,
        };
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_BUFFER_MESSAGES);
        let reopened = Arc::new(AtomicU64::new(0));
        let spec = StreamSpec {
            sphere: self.sphere,
            with_prev_value: self.with_prev_value,
            resolve_interval_ms: self.resolve_interval_ms,
            reopened: reopened.clone(),
        };
        let first = Piece {
            start: self.start.clone(),
            end: self.end.clone(),
            resolved: since,
            seen: HashMap::new(),
        };
        let mut pieces = BTreeMap::new();
        pieces.insert(first.start.clone(), (first.end.clone(), since));
        spawn_piece(self.client.clone(), spec, first, tx.clone());
        Ok(Subscription {
            sphere: self.sphere,
            start: self.start,
            end: self.end,
            grouped: self.grouped,
            pieces,
            resolved: since,
            messages: rx,
            _tx: tx,
            ready: std::collections::VecDeque::new(),
            held: BTreeMap::new(),
            held_bytes: 0,
            failed: false,
            reopened,
        })
    }
}

/// What every stream of a subscription asks for.
#[derive(Clone)]
struct StreamSpec {
    sphere: u64,
    with_prev_value: bool,
    resolve_interval_ms: u64,
    /// Streams that ended with an error and were opened again (shared by all pieces).
    reopened: Arc<AtomicU64>,
}

/// A part of the span followed by one stream at a time.
struct Piece {
    start: Vec<u8>,
    /// Empty: the end of the span (which may be the sphere's end).
    end: Vec<u8>,
    resolved: u64,
    /// The newest commit ts delivered per key above `resolved`.
    seen: HashMap<Vec<u8>, u64>,
}

impl Piece {
    /// Whether a change is new to this piece: above its resolved ts and above what was
    /// already delivered for its key (a reopened stream replays from `resolved`).
    fn admit(&mut self, key: &[u8], commit_ts: u64) -> bool {
        if commit_ts <= self.resolved {
            return false;
        }
        let newest = self.seen.entry(key.to_vec()).or_insert(0);
        if commit_ts <= *newest {
            return false;
        }
        *newest = commit_ts;
        true
    }

    /// Moves the piece's resolved ts forward; false if `ts` is not ahead of it. Changes
    /// delivered above the new ts stay remembered: a stream reopened from it replays them.
    fn resolve(&mut self, ts: u64) -> bool {
        if ts <= self.resolved {
            return false;
        }
        self.resolved = ts;
        self.seen.retain(|_, delivered| *delivered > ts);
        true
    }
}

enum PieceMessage {
    Changes(Vec<Change>),
    Resolved {
        start: Vec<u8>,
        ts: u64,
    },
    /// The piece starting at `start` now ends at `at`; a new piece `[at, end)` stands at
    /// `resolved`.
    Split {
        start: Vec<u8>,
        at: Vec<u8>,
        end: Vec<u8>,
        resolved: u64,
    },
    Failed(ClientError),
}

/// A running subscription; [`Subscription::next`] yields what it delivers. Dropping it stops
/// every stream.
pub struct Subscription {
    sphere: u64,
    start: Vec<u8>,
    end: Vec<u8>,
    grouped: bool,
    /// Each piece's end and resolved ts, by start.
    pieces: BTreeMap<Vec<u8>, (Vec<u8>, u64)>,
    /// The checkpoint last delivered.
    resolved: u64,
    messages: mpsc::Receiver<PieceMessage>,
    /// Kept so the channel stays open while pieces are handed over.
    _tx: mpsc::Sender<PieceMessage>,
    ready: std::collections::VecDeque<FeedItem>,
    /// Grouped mode: changes above the checkpoint, by commit ts.
    held: BTreeMap<u64, Vec<Change>>,
    held_bytes: usize,
    failed: bool,
    reopened: Arc<AtomicU64>,
}

impl Subscription {
    /// The next change, transaction or checkpoint; `None` after an error was returned.
    pub async fn next(&mut self) -> Option<Result<FeedItem, ClientError>> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Some(Ok(item));
            }
            if self.failed {
                return None;
            }
            let message = self.messages.recv().await?;
            if let Err(e) = self.take(message) {
                self.failed = true;
                return Some(Err(e));
            }
        }
    }

    /// How many times a stream of this subscription ended with an error (a leader change, a
    /// split, a node down, the subscriber too slow to keep up) and was opened again from its
    /// last checkpoint. Nothing is lost or repeated by it.
    pub fn streams_reopened(&self) -> u64 {
        self.reopened.load(Ordering::Relaxed)
    }

    /// The cursor of the last checkpoint (or of the start).
    pub fn cursor(&self) -> Cursor {
        Cursor {
            sphere: self.sphere,
            start: self.start.clone(),
            end: self.end.clone(),
            resolved_ts: self.resolved,
        }
    }

    fn take(&mut self, message: PieceMessage) -> Result<(), ClientError> {
        match message {
            PieceMessage::Changes(changes) if self.grouped => {
                for change in changes {
                    self.held_bytes += change_bytes(&change);
                    self.held.entry(change.commit_ts).or_default().push(change);
                }
                if self.held_bytes > MAX_GROUPED_BUFFER_BYTES {
                    return Err(ClientError::ResourceExhausted(format!(
                        "more than {MAX_GROUPED_BUFFER_BYTES} bytes of changes wait for a \
                         checkpoint; resume from the last cursor, or follow ungrouped"
                    )));
                }
            }
            PieceMessage::Changes(changes) => {
                self.ready.extend(changes.into_iter().map(FeedItem::Change));
            }
            PieceMessage::Resolved { start, ts } => {
                if let Some((_, resolved)) = self.pieces.get_mut(&start) {
                    *resolved = (*resolved).max(ts);
                }
                self.checkpoint();
            }
            PieceMessage::Split {
                start,
                at,
                end,
                resolved,
            } => {
                if let Some((piece_end, _)) = self.pieces.get_mut(&start) {
                    *piece_end = at.clone();
                }
                self.pieces.insert(at, (end, resolved));
            }
            PieceMessage::Failed(e) => return Err(e),
        }
        Ok(())
    }

    /// Delivers a checkpoint (and in grouped mode the transactions it passed) when the lowest
    /// resolved ts of all pieces moved.
    fn checkpoint(&mut self) {
        let lowest = self.pieces.values().map(|(_, ts)| *ts).min().unwrap_or(0);
        if lowest <= self.resolved {
            return;
        }
        self.resolved = lowest;
        let later = self.held.split_off(&lowest.saturating_add(1));
        for (commit_ts, mut changes) in std::mem::replace(&mut self.held, later) {
            self.held_bytes -= changes.iter().map(change_bytes).sum::<usize>();
            changes.sort_by(|a, b| a.key.cmp(&b.key));
            self.ready.push_back(FeedItem::Txn { commit_ts, changes });
        }
        self.ready.push_back(FeedItem::Checkpoint(self.cursor()));
    }
}

fn change_bytes(change: &Change) -> usize {
    change.key.len()
        + change.value.as_ref().map_or(0, Vec::len)
        + change.prev_value.as_ref().map_or(0, Vec::len)
        + 8
}

/// Starts following `piece` in a task of its own. (A plain function: a piece's task starts
/// the tasks of the pieces it splits off, and the boxed future breaks that cycle of types.)
fn spawn_piece(client: Client, spec: StreamSpec, piece: Piece, tx: mpsc::Sender<PieceMessage>) {
    let task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(follow_piece(client, spec, piece, tx));
    tokio::spawn(task);
}

/// Follows `piece` until the subscription is dropped or fails: opens a stream, delivers what
/// it sends, opens it again when it ends.
async fn follow_piece(
    client: Client,
    spec: StreamSpec,
    mut piece: Piece,
    tx: mpsc::Sender<PieceMessage>,
) {
    let mut failures = 0u32;
    let mut backoff_ms = INITIAL_STREAM_BACKOFF_MS;
    let mut lock_resolved_at: Option<Instant> = None;
    loop {
        let outcome = stream_once(&client, &spec, &mut piece, &tx, &mut lock_resolved_at).await;
        let error = match outcome {
            StreamEnd::Gone => return,
            StreamEnd::Failed { error, progressed } => {
                if progressed {
                    failures = 0;
                    backoff_ms = INITIAL_STREAM_BACKOFF_MS;
                }
                error
            }
        };
        failures += 1;
        let fatal = matches!(
            error,
            ClientError::HistoryCompacted { .. }
                | ClientError::InvalidArgument(_)
                | ClientError::Corruption(_)
        );
        if fatal || failures >= MAX_STREAM_FAILURES_IN_A_ROW {
            let _ = tx.send(PieceMessage::Failed(error)).await;
            return;
        }
        spec.reopened.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            sphere = spec.sphere,
            resolved = piece.resolved,
            "a change feed stream reopens from its checkpoint: {error}"
        );
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
            _ = tx.closed() => return,
        }
        backoff_ms = (backoff_ms * 2).min(MAX_STREAM_BACKOFF_MS);
    }
}

enum StreamEnd {
    /// The subscription was dropped.
    Gone,
    Failed {
        error: ClientError,
        /// A checkpoint arrived before the failure.
        progressed: bool,
    },
}

async fn stream_once(
    client: &Client,
    spec: &StreamSpec,
    piece: &mut Piece,
    tx: &mpsc::Sender<PieceMessage>,
    lock_resolved_at: &mut Option<Instant>,
) -> StreamEnd {
    let routing_key = keys::kv_key(spec.sphere, &piece.start);
    let request = SubscribeRequest {
        header: None,
        start: piece.start.clone(),
        end: piece.end.clone(),
        since: piece.resolved,
        with_prev_value: spec.with_prev_value,
        resolve_interval_ms: spec.resolve_interval_ms,
    };
    let opened = client
        .call_with(
            &routing_key,
            Retry::Always,
            Client::feed_stub,
            |mut feed, header, range| {
                let request = SubscribeRequest {
                    header: Some(header),
                    ..request.clone()
                };
                async move { Ok((feed.subscribe(request).await?.into_inner(), range)) }
            },
        )
        .await;
    let (mut stream, range) = match opened {
        Ok(s) => s,
        Err(error) => {
            return StreamEnd::Failed {
                error,
                progressed: false,
            }
        }
    };
    let silence_timeout = Duration::from_millis(silence_timeout_ms(spec.resolve_interval_ms));
    let opened_at_resolved = piece.resolved;
    let mut progressed = false;
    let mut first_checkpoint = true;
    loop {
        let message = tokio::select! {
            m = tokio::time::timeout(silence_timeout, stream.message()) => m,
            _ = tx.closed() => return StreamEnd::Gone,
        };
        let message: SubscribeResponse = match message {
            Err(_) => {
                return StreamEnd::Failed {
                    error: ClientError::Unavailable(format!(
                        "the change feed sent nothing for {} ms",
                        silence_timeout.as_millis()
                    )),
                    progressed,
                }
            }
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => {
                return StreamEnd::Failed {
                    error: ClientError::Unavailable("the change feed's stream ended".into()),
                    progressed,
                }
            }
            Ok(Err(status)) => {
                // A leader change or a split seen by the server corrects the routing cache,
                // as a failed call would, so the stream reopens at the right place.
                let error = ClientError::from_status(&status);
                client.note_failure(&range, &error);
                return StreamEnd::Failed { error, progressed };
            }
        };
        let fresh: Vec<Change> = message
            .events
            .into_iter()
            .filter_map(|e| {
                if !piece.admit(&e.key, e.commit_ts) {
                    return None;
                }
                Some(Change {
                    key: e.key,
                    value: (!e.deleted).then_some(e.value),
                    commit_ts: e.commit_ts,
                    prev_value: e.has_prev_value.then_some(e.prev_value),
                })
            })
            .collect();
        if !fresh.is_empty() && tx.send(PieceMessage::Changes(fresh)).await.is_err() {
            return StreamEnd::Gone;
        }
        if message.resolved_ts == 0 {
            continue;
        }
        if std::mem::take(&mut first_checkpoint) && !message.served_to_request_end {
            // The range ends inside the piece: the rest is a piece of its own, which stands
            // where this one stood when the stream opened (this stream never served it).
            let at = message.served_end.clone();
            let inside = at.as_slice() > piece.start.as_slice()
                && (piece.end.is_empty() || at.as_slice() < piece.end.as_slice());
            if !inside {
                return StreamEnd::Failed {
                    error: ClientError::Internal(format!(
                        "the change feed's server said it serves a piece up to a key outside \
                         it ({at:?}); its ranges are inconsistent"
                    )),
                    progressed,
                };
            }
            let (rest_seen, own_seen): (HashMap<_, _>, HashMap<_, _>) =
                std::mem::take(&mut piece.seen)
                    .into_iter()
                    .partition(|(key, _)| key.as_slice() >= at.as_slice());
            piece.seen = own_seen;
            let rest = Piece {
                start: at.clone(),
                end: std::mem::replace(&mut piece.end, at.clone()),
                resolved: opened_at_resolved,
                seen: rest_seen,
            };
            let split = PieceMessage::Split {
                start: piece.start.clone(),
                at,
                end: rest.end.clone(),
                resolved: rest.resolved,
            };
            if tx.send(split).await.is_err() {
                return StreamEnd::Gone;
            }
            spawn_piece(client.clone(), spec.clone(), rest, tx.clone());
        }
        if piece.resolve(message.resolved_ts) {
            progressed = true;
            let resolved = PieceMessage::Resolved {
                start: piece.start.clone(),
                ts: piece.resolved,
            };
            if tx.send(resolved).await.is_err() {
                return StreamEnd::Gone;
            }
        }
        if let Some(lock) = message.oldest_lock {
            resolve_if_stale(client, lock, lock_resolved_at);
        }
    }
}

/// Resolves a lock that holds the resolved ts back, in the background, once it is older
/// than [`RESOLVE_BLOCKING_LOCK_AFTER_MS`] (its coordinator may be gone); a running
/// transaction's lock is left alone by the resolution itself.
fn resolve_if_stale(client: &Client, lock: LockInfo, resolved_at: &mut Option<Instant>) {
    if resolved_at
        .is_some_and(|at| at.elapsed() < Duration::from_millis(RESOLVE_BLOCKING_LOCK_AFTER_MS))
    {
        return;
    }
    let wall_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    if physical_ms(lock.start_ts).saturating_add(RESOLVE_BLOCKING_LOCK_AFTER_MS) > wall_ms {
        return;
    }
    *resolved_at = Some(Instant::now());
    let client = client.clone();
    tokio::spawn(async move {
        if let Err(e) = client.resolve_locks(&[lock]).await {
            // Tried again on a later checkpoint that still reports the lock.
            tracing::warn!("resolving a lock that holds a change feed back: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_damaged_ones_are_refused() {
        let cursor = Cursor {
            sphere: 7,
            start: b"a".to_vec(),
            end: Vec::new(),
            resolved_ts: 123 << 18,
        };
        let text = cursor.to_string();
        assert_eq!(Cursor::parse(&text).unwrap(), cursor);
        let mut damaged = text.clone().into_bytes();
        damaged[4] = if damaged[4] == b'0' { b'1' } else { b'0' };
        assert!(Cursor::parse(std::str::from_utf8(&damaged).unwrap()).is_err());
        assert!(Cursor::parse("zz").is_err());
        assert!(Cursor::parse("").is_err());
    }

    fn change(key: &str, ts: u64) -> Change {
        Change {
            key: key.as_bytes().to_vec(),
            value: Some(b"v".to_vec()),
            commit_ts: ts,
            prev_value: None,
        }
    }

    fn subscription(grouped: bool) -> Subscription {
        let (tx, rx) = mpsc::channel(4);
        let mut pieces = BTreeMap::new();
        pieces.insert(Vec::new(), (b"m".to_vec(), 10));
        pieces.insert(b"m".to_vec(), (Vec::new(), 10));
        Subscription {
            sphere: 1,
            start: Vec::new(),
            end: Vec::new(),
            grouped,
            pieces,
            resolved: 10,
            messages: rx,
            _tx: tx,
            ready: Default::default(),
            held: BTreeMap::new(),
            held_bytes: 0,
            failed: false,
            reopened: Default::default(),
        }
    }

    #[test]
    fn a_checkpoint_waits_for_the_slowest_piece_and_releases_whole_transactions() {
        let mut sub = subscription(true);
        sub.take(PieceMessage::Changes(vec![
            change("b", 12),
            change("a", 12),
            change("c", 15),
        ]))
        .unwrap();
        sub.take(PieceMessage::Resolved {
            start: Vec::new(),
            ts: 20,
        })
        .unwrap();
        assert!(sub.ready.is_empty(), "the other piece still stands at 10");
        sub.take(PieceMessage::Changes(vec![change("n", 12)]))
            .unwrap();
        sub.take(PieceMessage::Resolved {
            start: b"m".to_vec(),
            ts: 13,
        })
        .unwrap();
        let items: Vec<FeedItem> = sub.ready.drain(..).collect();
        assert_eq!(
            items[0],
            FeedItem::Txn {
                commit_ts: 12,
                changes: vec![change("a", 12), change("b", 12), change("n", 12)]
            }
        );
        assert!(matches!(&items[1], FeedItem::Checkpoint(c) if c.resolved_ts() == 13));
        assert_eq!(
            items.len(),
            2,
            "the change at 15 waits for a checkpoint past it"
        );
        assert_eq!(sub.held_bytes, change_bytes(&change("c", 15)));
    }

    #[test]
    fn a_piece_remembers_changes_above_its_checkpoint_across_reopens() {
        let mut piece = Piece {
            start: Vec::new(),
            end: Vec::new(),
            resolved: 10,
            seen: HashMap::new(),
        };
        assert!(piece.admit(b"a", 12));
        assert!(
            piece.admit(b"b", 20),
            "a lock below 20 holds the checkpoint at 15"
        );
        assert!(piece.resolve(15));
        assert!(!piece.resolve(15), "resolved timestamps only move forward");
        // The stream reopens from 15 and replays what it had sent above it.
        assert!(!piece.admit(b"a", 12), "at or below the checkpoint");
        assert!(!piece.admit(b"b", 20), "delivered before the checkpoint");
        assert!(piece.admit(b"b", 21));
        assert!(piece.resolve(30));
        assert!(piece.seen.is_empty(), "nothing above 30 was delivered");
    }

    #[test]
    fn a_split_piece_holds_the_checkpoint_at_its_own_resolved_ts() {
        let mut sub = subscription(false);
        sub.take(PieceMessage::Split {
            start: b"m".to_vec(),
            at: b"t".to_vec(),
            end: Vec::new(),
            resolved: 10,
        })
        .unwrap();
        sub.take(PieceMessage::Resolved {
            start: Vec::new(),
            ts: 30,
        })
        .unwrap();
        sub.take(PieceMessage::Resolved {
            start: b"m".to_vec(),
            ts: 30,
        })
        .unwrap();
        assert!(sub.ready.is_empty());
        sub.take(PieceMessage::Resolved {
            start: b"t".to_vec(),
            ts: 25,
        })
        .unwrap();
        assert!(
            matches!(sub.ready.pop_front(), Some(FeedItem::Checkpoint(c)) if c.resolved_ts() == 25)
        );
    }
}
