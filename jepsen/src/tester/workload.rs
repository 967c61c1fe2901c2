//! Client workloads, run through the client library by concurrent workers at a bounded
//! rate, each operation recorded as invoke + ok/fail/info.
//!
//! - **register**: a few keys at a time, several workers on each (as in Jepsen's etcd
//!   suite), each key a compare-and-set register with reads, writes, cas and deletes (a
//!   delete is a write of nil) over a small value domain, so that cas often succeeds and
//!   often fails. A key retires after a fixed number of operations and a fresh one takes its
//!   slot, so every per-key history stays short enough to check quickly.
//! - **set**: adds of unique elements (one key per element); reads of a window of recent
//!   elements during the run, and one final read of the whole set after the cluster healed.
//! - **scan**: a fixed key space pre-split over many ranges; writes of unique values,
//!   deletes, and full and partial scans that cross range boundaries while ranges split,
//!   merge and move, some of them as of a timestamp from the oracle (one snapshot across
//!   ranges), some repeated at a timestamp read before. Every scanned key is checked against
//!   what was acknowledged, and reads at one timestamp against each other
//!   ([`crate::check::scan`]).
//! - **changefeed**: write transactions of 1 to 3 keys of a span pre-split over a few
//!   ranges, each putting its own unique value (its id) on every key it writes, so each
//!   delivered change names the write it came from; consumers ([`super::feeds`]) follow the
//!   span's change feed meanwhile ([`crate::check::changefeed`]).
//!
//! Outcomes follow the client's error contract: a read that fails is `fail` (it constrains
//! nothing); a write whose outcome is unknown (`OutcomeUnknown`, deadline exceeded, an
//! internal error) is `info`; any other error of a write means it was not applied: `fail`.
//! As in Jepsen, a worker whose operation ended `info` continues as a new process (its old
//! operation may still be in flight) with a new connection.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value as Json};
use spheredb_client::{Client, ClientError, ClientOptions, Consistency};

use super::history::{Record, Recorder};
use crate::history::{EventType, Function};

/// Most operations one worker issues, whatever the time limit.
pub const MAX_OPS_PER_WORKER: usize = 1_000_000;
/// Most elements the set workload adds (the final read must return them in one scan).
pub const MAX_SET_ELEMENTS: i64 = 100_000;
/// Attempts at each final read before giving up on it.
pub const MAX_FINAL_READ_ATTEMPTS: usize = 10;
/// Time budget of one final read; the cluster has healed, so it may wait longer.
pub const FINAL_READ_DEADLINE_MS: u64 = 5_000;
/// Time budget of all final reads together; keys not read by then stay unread.
pub const FINAL_READS_TOTAL_MS: u64 = 60_000;
/// Pause before retrying a failed connection or final read.
const RETRY_PAUSE_MS: u64 = 250;
/// Extra time over the client's own deadline before the tester gives up on a call.
const CALL_SLACK_MS: u64 = 2_000;
/// First process id of final reads, far above any worker's.
const FINAL_PROCESS_BASE: i64 = 1_000_000_000;
/// Sphere the tests write to.
pub const SPHERE: u64 = 7;
/// Key prefix of set elements; the final read scans it.
const SET_PREFIX: &str = "set/";
/// End of the set prefix's span (`/` + 1 is `0`).
const SET_END: &str = "set0";
/// One set operation in this many is a read of a window of recent elements.
const SET_READ_EVERY_OPS: u32 = 10;
/// Elements in one window read during the run (bounded, so the history stays small).
const SET_READ_WINDOW_ELEMENTS: i64 = 200;
/// Key prefix of the scan workload's keys.
const SCAN_PREFIX: &str = "k/";
/// Keys of the scan workload: `k/000000` up to this many.
pub const SCAN_KEYS: i64 = 200;
/// Ranges the scan workload's key space is split into before the run.
pub const SCAN_INITIAL_RANGES: i64 = 8;
/// Longest a split before the run may take, each.
const SCAN_SPLIT_DEADLINE_MS: u64 = 10_000;
/// Key prefix of the bank workload's accounts, and the end of its span.
const BANK_PREFIX: &str = "bank/";
const BANK_END: &str = "bank0";
/// Accounts of the bank workload, and each one's balance before the run.
pub const BANK_ACCOUNTS: i64 = 8;
pub const BANK_INITIAL_BALANCE: i64 = 100;
/// Ranges the accounts are split into before the run (transfers cross them).
const BANK_INITIAL_RANGES: i64 = 4;
/// Largest amount one transfer moves.
const BANK_MAX_TRANSFER: i64 = 5;
/// One bank operation in this many is a read of every balance.
const BANK_READ_EVERY_OPS: u32 = 4;
/// Key prefix of the list-append workload's lists, and the end of its span.
const LIST_PREFIX: &str = "la/";
const LIST_END: &str = "la0";
/// Lists a list-append transaction picks from at a time; the window moves on every
/// [`LIST_KEY_LIFETIME_OPS`] transactions, so each list stays short enough to check.
const LIST_ACTIVE_KEYS: i64 = 5;
const LIST_KEY_LIFETIME_OPS: i64 = 100;
/// Most micro-operations in one list-append transaction.
const LIST_MAX_MOPS: usize = 4;
/// Lists are spread over this many shards of the key space (`la/<shard>/<list>`), one range
/// each before the run, so a transaction's lists lie in several ranges however far the
/// window has moved.
const LIST_SHARDS: i64 = 4;
/// Key prefix of the changefeed workload's keys, and the end of its span.
const FEED_PREFIX: &str = "feed/";
const FEED_END: &str = "feed0";
/// Keys the changefeed workload writes, `feed/<shard>/<key>` for keys `0..FEED_KEYS`.
pub const FEED_KEYS: i64 = 64;
/// Shards of the changefeed keys (key % shards), one range each before the run
/// (`feed/<shard>/`), so most transactions of two or three keys commit in two phases across
/// ranges: their locks are what a feed's resolved timestamp must wait for.
const FEED_SHARDS: i64 = 4;
/// Most keys one changefeed transaction writes.
const FEED_MAX_KEYS_PER_TXN: usize = 3;
/// Random draws of a key per transaction; a transaction that drew the same key again
/// writes fewer keys.
const FEED_MAX_KEY_DRAWS: usize = 12;

/// Which workload to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    Register,
    Set,
    Scan,
    Bank,
    ListAppend,
    Changefeed,
}

impl WorkloadKind {
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Register => "register",
            WorkloadKind::Set => "set",
            WorkloadKind::Scan => "scan",
            WorkloadKind::Bank => "bank",
            WorkloadKind::ListAppend => "list-append",
            WorkloadKind::Changefeed => "changefeed",
        }
    }

    /// The workload's keys as a `[start, end)` span of user keys, for the churn nemesis.
    pub fn key_span(self) -> (Vec<u8>, Vec<u8>) {
        match self {
            WorkloadKind::Register => (b"r/".to_vec(), b"r0".to_vec()),
            WorkloadKind::Set => (SET_PREFIX.as_bytes().to_vec(), SET_END.as_bytes().to_vec()),
            WorkloadKind::Scan => (scan_key(0), scan_key(SCAN_KEYS)),
            WorkloadKind::Bank => (
                BANK_PREFIX.as_bytes().to_vec(),
                BANK_END.as_bytes().to_vec(),
            ),
            WorkloadKind::ListAppend => (
                LIST_PREFIX.as_bytes().to_vec(),
                LIST_END.as_bytes().to_vec(),
            ),
            WorkloadKind::Changefeed => (
                FEED_PREFIX.as_bytes().to_vec(),
                FEED_END.as_bytes().to_vec(),
            ),
        }
    }

    /// A random key inside the workload's span, where the churn nemesis splits.
    pub fn split_point(self, rng: &mut StdRng) -> Vec<u8> {
        match self {
            WorkloadKind::Register => register_key(rng.random_range(0..1_000)),
            WorkloadKind::Set => set_key(rng.random_range(1..MAX_SET_ELEMENTS)),
            WorkloadKind::Scan => scan_key(rng.random_range(1..SCAN_KEYS)),
            WorkloadKind::Bank => bank_key(rng.random_range(1..BANK_ACCOUNTS)),
            WorkloadKind::ListAppend => {
                let shard = rng.random_range(0..LIST_SHARDS);
                format!("{LIST_PREFIX}{shard}/{:08}", rng.random_range(0..1_000)).into_bytes()
            }
            WorkloadKind::Changefeed => feed_key(rng.random_range(0..FEED_KEYS)).into_bytes(),
        }
    }
}

/// How to run the workload.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    pub kind: WorkloadKind,
    pub concurrency: usize,
    /// Target operations per second, all workers together.
    pub rate_ops_per_sec: f64,
    pub seed: u64,
    /// Client call deadline: short, so faults turn into timeouts quickly.
    pub op_timeout_ms: u64,
    /// Register keys in use at a time.
    pub key_count: usize,
    /// Operations on one register key before it is retired.
    pub ops_per_key: usize,
    /// Register values are drawn from `0..value_domain`.
    pub value_domain: i64,
    /// How the clients' reads are made linearizable.
    pub read_consistency: Consistency,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    generation: i64,
    ops: usize,
}

#[derive(Debug, Default)]
struct RegisterState {
    slots: Vec<Slot>,
    /// Last value known per key, for the `from` of the next cas.
    last_value: HashMap<i64, Option<i64>>,
    used_keys: BTreeSet<i64>,
}

/// Shared by the workers of one run.
pub struct Workload {
    cfg: WorkloadConfig,
    addrs: Vec<String>,
    recorder: Arc<Recorder>,
    deadline: Instant,
    state: Mutex<RegisterState>,
    /// Source of unique values and set elements.
    next_value: AtomicI64,
    /// Timestamps of the last scans as of a fresh timestamp, with their spans, to read again
    /// (at most [`MAX_REPEATABLE_SNAPSHOTS`]).
    snapshots: Mutex<Vec<(i64, i64, i64)>>,
    /// List-append transactions generated, which moves the window of lists.
    list_txns: AtomicI64,
}

/// Snapshot timestamps the scan workload keeps for reading again.
const MAX_REPEATABLE_SNAPSHOTS: usize = 16;

#[derive(Debug, Clone)]
enum Op {
    Read {
        key: i64,
    },
    Write {
        key: i64,
        value: i64,
    },
    /// Recorded as a write of nil.
    Delete {
        key: i64,
    },
    Cas {
        key: i64,
        from: Option<i64>,
        to: i64,
    },
    Add {
        element: i64,
    },
    /// Set elements, or scan keys, in `[start, end)`.
    ReadRange {
        start: i64,
        end: i64,
    },
    /// Scan keys in `[start, end)` as of `at`, or of a fresh timestamp when `None`.
    ReadRangeAt {
        start: i64,
        end: i64,
        at: Option<i64>,
    },
    /// Bank: move `amount` from account `from` to `to` in one transaction.
    Transfer {
        from: i64,
        to: i64,
        amount: i64,
    },
    /// Bank: every balance, from one snapshot.
    ReadBalances,
    /// List-append: one transaction of appends and reads.
    ListTxn {
        mops: Vec<ListMop>,
    },
    /// Changefeed: one transaction putting `id` on each of `keys` (distinct).
    FeedWrite {
        id: i64,
        keys: Vec<i64>,
    },
}

/// One micro-operation of a list-append transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListMop {
    Append { key: i64, elem: i64 },
    Read { key: i64 },
}

impl ListMop {
    fn key(self) -> i64 {
        match self {
            ListMop::Append { key, .. } | ListMop::Read { key } => key,
        }
    }
}

impl Op {
    fn function(&self) -> Function {
        match self {
            Op::Read { .. } | Op::ReadRange { .. } | Op::ReadRangeAt { .. } | Op::ReadBalances => {
                Function::Read
            }
            Op::Write { .. } | Op::Delete { .. } => Function::Write,
            Op::Cas { .. } => Function::Cas,
            Op::Add { .. } => Function::Add,
            Op::Transfer { .. } => Function::Transfer,
            Op::ListTxn { .. } | Op::FeedWrite { .. } => Function::Txn,
        }
    }

    fn key(&self) -> Option<i64> {
        match self {
            Op::Read { key } | Op::Write { key, .. } | Op::Delete { key } | Op::Cas { key, .. } => {
                Some(*key)
            }
            Op::Add { .. }
            | Op::ReadRange { .. }
            | Op::ReadRangeAt { .. }
            | Op::Transfer { .. }
            | Op::ReadBalances
            | Op::ListTxn { .. }
            | Op::FeedWrite { .. } => None,
        }
    }

    fn input(&self) -> Json {
        match self {
            Op::Read { .. } | Op::Delete { .. } => Json::Null,
            Op::Write { value, .. } => json!(value),
            Op::Cas { from, to, .. } => json!([from, to]),
            Op::Add { element } => json!(element),
            Op::ReadRange { start, end } => json!([start, end]),
            Op::ReadRangeAt { start, end, at } => json!([start, end, at.unwrap_or(0)]),
            Op::Transfer { from, to, amount } => json!([from, to, amount]),
            Op::ReadBalances => Json::Null,
            Op::ListTxn { mops } => list_txn_value(mops, None),
            Op::FeedWrite { id, keys } => feed_write_value(*id, keys),
        }
    }
}

/// How an operation ended.
struct Completion {
    kind: EventType,
    value: Json,
    error: Option<String>,
}

/// A list-append transaction's value: `[["append", k, e], ["r", k, null | [e...]]]`, with
/// each read's result from `reads` (in order) when given.
fn list_txn_value(mops: &[ListMop], reads: Option<&[Vec<i64>]>) -> Json {
    let mut read_results = reads.map(|r| r.iter());
    Json::Array(
        mops.iter()
            .map(|mop| match *mop {
                ListMop::Append { key, elem } => json!(["append", key, elem]),
                ListMop::Read { key } => {
                    let result = read_results
                        .as_mut()
                        .and_then(Iterator::next)
                        .map_or(Json::Null, |elems| json!(elems));
                    json!(["r", key, result])
                }
            })
            .collect(),
    )
}

/// A changefeed transaction's value: `[["w", key, id], ...]`, each key as stored, so the
/// checker matches delivered changes without knowing the key layout.
fn feed_write_value(id: i64, keys: &[i64]) -> Json {
    Json::Array(
        keys.iter()
            .map(|&k| json!(["w", feed_key(k), id]))
            .collect(),
    )
}

/// The stored key of changefeed key `key`: `feed/<shard>/<key>`.
fn feed_key(key: i64) -> String {
    format!("{FEED_PREFIX}{}/{key:06}", key % FEED_SHARDS)
}

fn bank_key(account: i64) -> Vec<u8> {
    format!("{BANK_PREFIX}{account:03}").into_bytes()
}

fn list_key(key: i64) -> Vec<u8> {
    format!("{LIST_PREFIX}{}/{key:08}", key % LIST_SHARDS).into_bytes()
}

/// A stored list: comma-separated integers (absent: empty).
fn decode_list(stored: Option<&[u8]>) -> Result<Vec<i64>, String> {
    let Some(bytes) = stored else {
        return Ok(Vec::new());
    };
    let text = String::from_utf8_lossy(bytes);
    if text.is_empty() {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|e| {
            e.parse::<i64>()
                .map_err(|_| format!("a stored list holds {text:?}, not integers"))
        })
        .collect()
}

fn register_key(key: i64) -> Vec<u8> {
    format!("r/{key}").into_bytes()
}

fn set_key(element: i64) -> Vec<u8> {
    format!("{SET_PREFIX}{element:012}").into_bytes()
}

fn scan_key(key: i64) -> Vec<u8> {
    format!("{SCAN_PREFIX}{key:06}").into_bytes()
}

/// The number in a scan workload key, or `None` for a key the workload never writes.
fn scan_key_number(user_key: &[u8]) -> Option<i64> {
    std::str::from_utf8(user_key.strip_prefix(SCAN_PREFIX.as_bytes())?)
        .ok()?
        .parse()
        .ok()
}

/// A stored value as history JSON: the integer it encodes, or the raw text if it is not one
/// (which the checker will then reject as a value nobody wrote).
fn decode_value(bytes: &[u8]) -> Json {
    let text = String::from_utf8_lossy(bytes);
    match text.parse::<i64>() {
        Ok(n) => json!(n),
        Err(_) => json!(text),
    }
}

/// A transaction that failed before its commit: nothing of it was written.
fn fail_with(value: Json, e: ClientError) -> Completion {
    Completion {
        kind: EventType::Fail,
        value,
        error: Some(e.to_string()),
    }
}

/// `info` for errors that leave a write's outcome unknown, `fail` otherwise.
fn write_failure(e: &ClientError) -> EventType {
    match e {
        ClientError::OutcomeUnknown(_)
        | ClientError::DeadlineExceeded { .. }
        | ClientError::Internal(_)
        | ClientError::Corruption(_) => EventType::Info,
        _ => EventType::Fail,
    }
}

impl Workload {
    pub fn new(
        cfg: WorkloadConfig,
        addrs: Vec<String>,
        recorder: Arc<Recorder>,
        deadline: Instant,
    ) -> Workload {
        let state = RegisterState {
            slots: vec![
                Slot {
                    generation: 0,
                    ops: 0
                };
                cfg.key_count.max(1)
            ],
            ..RegisterState::default()
        };
        Workload {
            cfg,
            addrs,
            recorder,
            deadline,
            state: Mutex::new(state),
            next_value: AtomicI64::new(1),
            snapshots: Mutex::new(Vec::new()),
            list_txns: AtomicI64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RegisterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A client whose first seed is node `first % n`, so workers spread their connections
    /// (and, when the nodes disagree about who leads, their view of the leader).
    async fn connect(&self, first: usize, deadline_ms: u64) -> Option<Client> {
        let n = self.addrs.len();
        let seeds: Vec<String> = (0..n)
            .map(|i| self.addrs[(first + i) % n].clone())
            .collect();
        let options = ClientOptions {
            call_deadline_ms: deadline_ms,
            consistency: self.cfg.read_consistency,
            ..ClientOptions::default()
        };
        let budget = Duration::from_millis(deadline_ms + CALL_SLACK_MS);
        tokio::time::timeout(budget, Client::connect(&seeds, options))
            .await
            .ok()?
            .ok()
    }

    fn next_value(&self) -> i64 {
        self.next_value.fetch_add(1, Ordering::Relaxed)
    }

    /// The next operation, or `None` when the workload has nothing more to do.
    fn generate(&self, rng: &mut StdRng) -> Option<Op> {
        match self.cfg.kind {
            WorkloadKind::Set => {
                if rng.random_ratio(1, SET_READ_EVERY_OPS) {
                    // A window ending at the newest element: the adds most likely in flight.
                    let newest = self.next_value.load(Ordering::Relaxed);
                    let start = (newest - SET_READ_WINDOW_ELEMENTS).max(1);
                    return Some(Op::ReadRange {
                        start,
                        end: start + SET_READ_WINDOW_ELEMENTS,
                    });
                }
                let element = self.next_value();
                (element <= MAX_SET_ELEMENTS).then_some(Op::Add { element })
            }
            WorkloadKind::Scan => {
                let op = match rng.random_range(0..20) {
                    0..=8 => Op::Write {
                        key: rng.random_range(0..SCAN_KEYS),
                        value: self.next_value(),
                    },
                    9..=11 => Op::Delete {
                        key: rng.random_range(0..SCAN_KEYS),
                    },
                    12..=13 => Op::ReadRange {
                        start: 0,
                        end: SCAN_KEYS,
                    },
                    14 => Op::ReadRangeAt {
                        start: 0,
                        end: SCAN_KEYS,
                        at: None,
                    },
                    15 => {
                        let snapshots = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
                        match snapshots.get(rng.random_range(0..snapshots.len().max(1))) {
                            Some(&(at, start, end)) => Op::ReadRangeAt {
                                start,
                                end,
                                at: Some(at),
                            },
                            None => Op::ReadRangeAt {
                                start: 0,
                                end: SCAN_KEYS,
                                at: None,
                            },
                        }
                    }
                    _ => {
                        let start = rng.random_range(0..SCAN_KEYS);
                        Op::ReadRange {
                            start,
                            end: rng.random_range(start + 1..=SCAN_KEYS),
                        }
                    }
                };
                Some(op)
            }
            WorkloadKind::Bank => {
                if rng.random_ratio(1, BANK_READ_EVERY_OPS) {
                    return Some(Op::ReadBalances);
                }
                let from = rng.random_range(0..BANK_ACCOUNTS);
                let to = (from + rng.random_range(1..BANK_ACCOUNTS)) % BANK_ACCOUNTS;
                Some(Op::Transfer {
                    from,
                    to,
                    amount: rng.random_range(1..=BANK_MAX_TRANSFER),
                })
            }
            WorkloadKind::ListAppend => {
                let n = self.list_txns.fetch_add(1, Ordering::Relaxed);
                let base = n / LIST_KEY_LIFETIME_OPS;
                let mops = (0..rng.random_range(1..=LIST_MAX_MOPS))
                    .map(|_| {
                        let key = base + rng.random_range(0..LIST_ACTIVE_KEYS);
                        if rng.random_bool(0.5) {
                            ListMop::Append {
                                key,
                                elem: self.next_value(),
                            }
                        } else {
                            ListMop::Read { key }
                        }
                    })
                    .collect();
                Some(Op::ListTxn { mops })
            }
            WorkloadKind::Changefeed => {
                let want = rng.random_range(1..=FEED_MAX_KEYS_PER_TXN);
                let mut keys: Vec<i64> = Vec::with_capacity(want);
                for _ in 0..FEED_MAX_KEY_DRAWS {
                    if keys.len() == want {
                        break;
                    }
                    let key = rng.random_range(0..FEED_KEYS);
                    if !keys.contains(&key) {
                        keys.push(key);
                    }
                }
                keys.sort_unstable();
                Some(Op::FeedWrite {
                    id: self.next_value(),
                    keys,
                })
            }
            WorkloadKind::Register => {
                let mut state = self.state();
                let slot_index = rng.random_range(0..state.slots.len());
                let key_count = state.slots.len() as i64;
                let slot = &mut state.slots[slot_index];
                let key = slot.generation * key_count + slot_index as i64;
                slot.ops += 1;
                if slot.ops >= self.cfg.ops_per_key {
                    slot.generation += 1;
                    slot.ops = 0;
                }
                state.used_keys.insert(key);
                let domain = self.cfg.value_domain.max(1);
                let op = match rng.random_range(0..20) {
                    0..=6 => Op::Read { key },
                    7..=11 => Op::Write {
                        key,
                        value: rng.random_range(0..domain),
                    },
                    12..=13 => Op::Delete { key },
                    _ => Op::Cas {
                        key,
                        // Half the time the value last seen (likely to succeed), else any
                        // value of the domain or nil.
                        from: if rng.random_bool(0.5) {
                            state.last_value.get(&key).copied().flatten()
                        } else {
                            Some(rng.random_range(0..domain)).filter(|_| rng.random_ratio(5, 6))
                        },
                        to: rng.random_range(0..domain),
                    },
                };
                Some(op)
            }
        }
    }

    /// The stored key of register or scan key number `key`.
    fn key_bytes(&self, key: i64) -> Vec<u8> {
        match self.cfg.kind {
            WorkloadKind::Scan => scan_key(key),
            _ => register_key(key),
        }
    }

    /// Splits the scan workload's key space into [`SCAN_INITIAL_RANGES`] ranges, so that
    /// scans cross range boundaries from the first operation. Returns the splits made.
    pub async fn prepare(&self) -> Result<usize, String> {
        let split_keys: Vec<Vec<u8>> = match self.cfg.kind {
            WorkloadKind::Scan => (1..SCAN_INITIAL_RANGES)
                .map(|i| scan_key(i * SCAN_KEYS / SCAN_INITIAL_RANGES))
                .collect(),
            WorkloadKind::Bank => (1..BANK_INITIAL_RANGES)
                .map(|i| bank_key(i * BANK_ACCOUNTS / BANK_INITIAL_RANGES))
                .collect(),
            WorkloadKind::ListAppend => (1..LIST_SHARDS)
                .map(|shard| format!("{LIST_PREFIX}{shard}/").into_bytes())
                .collect(),
            WorkloadKind::Changefeed => (1..FEED_SHARDS)
                .map(|shard| format!("{FEED_PREFIX}{shard}/").into_bytes())
                .collect(),
            WorkloadKind::Register | WorkloadKind::Set => return Ok(0),
        };
        let client = self
            .connect(0, SCAN_SPLIT_DEADLINE_MS)
            .await
            .ok_or("cannot connect to split the key space")?;
        let mut made = 0;
        for key in split_keys {
            client
                .split(&spheredb_client::kv_key(SPHERE, &key))
                .await
                .map_err(|e| format!("split at {}: {e}", String::from_utf8_lossy(&key)))?;
            made += 1;
        }
        if self.cfg.kind == WorkloadKind::Bank {
            // Every account's opening balance, in one transaction across the ranges.
            let ops: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..BANK_ACCOUNTS)
                .map(|a| {
                    let balance = BANK_INITIAL_BALANCE.to_string().into_bytes();
                    (bank_key(a), Some(balance))
                })
                .collect();
            client
                .batch(SPHERE, &ops)
                .await
                .map_err(|e| format!("opening the accounts: {e}"))?;
        }
        Ok(made)
    }

    /// The total of every balance, which the bank workload's reads must always show.
    pub fn bank_total() -> i64 {
        BANK_ACCOUNTS * BANK_INITIAL_BALANCE
    }

    /// A bank transfer in one transaction; `fail` without a write when `from` holds less
    /// than `amount`.
    async fn transfer(&self, client: &Client, from: i64, to: i64, amount: i64) -> Completion {
        let input = json!([from, to, amount]);
        let mut txn = match client.begin().await {
            Ok(t) => t,
            Err(e) => return fail_with(input, e),
        };
        let read = async {
            let a = txn.get(SPHERE, &bank_key(from)).await?;
            let b = txn.get(SPHERE, &bank_key(to)).await?;
            Ok::<_, ClientError>((a, b))
        }
        .await;
        let (a, b) = match read {
            Ok((Some(a), Some(b))) => (decode_value(&a), decode_value(&b)),
            Ok(_) => {
                return Completion {
                    kind: EventType::Fail,
                    value: input,
                    error: Some("an account is missing".into()),
                }
            }
            Err(e) => return fail_with(input, e),
        };
        let (Some(a), Some(b)) = (a.as_i64(), b.as_i64()) else {
            return Completion {
                kind: EventType::Fail,
                value: input,
                error: Some(format!("balances {a} and {b} are not numbers")),
            };
        };
        if a < amount {
            let _ = txn.rollback().await;
            return Completion {
                kind: EventType::Fail,
                value: input,
                error: Some(format!("insufficient funds: {a} < {amount}")),
            };
        }
        let written = txn
            .put(SPHERE, &bank_key(from), (a - amount).to_string().as_bytes())
            .and_then(|()| txn.put(SPHERE, &bank_key(to), (b + amount).to_string().as_bytes()));
        if let Err(e) = written {
            return fail_with(input, e);
        }
        match txn.commit().await {
            Ok(()) => Completion {
                kind: EventType::Ok,
                value: input,
                error: None,
            },
            Err(e) => Completion {
                kind: write_failure(&e),
                value: input,
                error: Some(e.to_string()),
            },
        }
    }

    /// Every balance, from one transaction's snapshot.
    async fn read_balances(&self, client: &Client) -> Completion {
        let read = async {
            let mut txn = client.begin().await?;
            let pairs = txn
                .scan(
                    SPHERE,
                    BANK_PREFIX.as_bytes(),
                    BANK_END.as_bytes(),
                    BANK_ACCOUNTS as u32 + 1,
                )
                .await?;
            txn.rollback().await?;
            Ok::<_, ClientError>(pairs)
        }
        .await;
        match read {
            Ok(pairs) => {
                let mut balances = vec![Json::Null; BANK_ACCOUNTS as usize];
                for kv in pairs {
                    let account = std::str::from_utf8(&kv.key)
                        .ok()
                        .and_then(|k| k.strip_prefix(BANK_PREFIX))
                        .and_then(|n| n.parse::<usize>().ok());
                    match account {
                        Some(a) if a < balances.len() => balances[a] = decode_value(&kv.value),
                        // A key the workload never wrote: the read is wrong as a whole.
                        _ => balances.push(json!(String::from_utf8_lossy(&kv.key))),
                    }
                }
                Completion {
                    kind: EventType::Ok,
                    value: Json::Array(balances),
                    error: None,
                }
            }
            Err(e) => fail_with(Json::Null, e),
        }
    }

    /// One changefeed transaction: `id` on every key of `keys`, committed at once (in two
    /// phases when the keys lie in several ranges).
    async fn feed_write(&self, client: &Client, id: i64, keys: &[i64]) -> Completion {
        let input = feed_write_value(id, keys);
        let mut txn = match client.begin().await {
            Ok(t) => t,
            Err(e) => return fail_with(input, e),
        };
        let value = id.to_string();
        for &key in keys {
            // Dropping the transaction rolls back whatever it locked (nothing yet: writes
            // are buffered until the commit).
            if let Err(e) = txn.put(SPHERE, feed_key(key).as_bytes(), value.as_bytes()) {
                return fail_with(input, e);
            }
        }
        match txn.commit().await {
            Ok(()) => Completion {
                kind: EventType::Ok,
                value: input,
                error: None,
            },
            Err(e) => Completion {
                kind: write_failure(&e),
                value: input,
                error: Some(e.to_string()),
            },
        }
    }

    /// One list-append transaction: appends read the list and write it back longer.
    async fn list_txn(&self, client: &Client, mops: &[ListMop]) -> Completion {
        let input = list_txn_value(mops, None);
        let mut txn = match client.begin().await {
            Ok(t) => t,
            Err(e) => return fail_with(input, e),
        };
        let mut reads = Vec::new();
        for mop in mops {
            let key = list_key(mop.key());
            let current = match txn.get(SPHERE, &key).await {
                Ok(v) => v,
                Err(e) => return fail_with(input, e),
            };
            let mut list = match decode_list(current.as_deref()) {
                Ok(l) => l,
                Err(e) => {
                    return Completion {
                        kind: EventType::Fail,
                        value: input,
                        error: Some(e),
                    }
                }
            };
            match *mop {
                ListMop::Read { .. } => reads.push(list),
                ListMop::Append { elem, .. } => {
                    list.push(elem);
                    let text: Vec<String> = list.iter().map(i64::to_string).collect();
                    if let Err(e) = txn.put(SPHERE, &key, text.join(",").as_bytes()) {
                        return fail_with(input, e);
                    }
                }
            }
        }
        match txn.commit().await {
            Ok(()) => Completion {
                kind: EventType::Ok,
                value: list_txn_value(mops, Some(&reads)),
                error: None,
            },
            Err(e) => Completion {
                kind: write_failure(&e),
                value: input,
                error: Some(e.to_string()),
            },
        }
    }

    fn remember(&self, key: i64, value: Option<i64>) {
        self.state().last_value.insert(key, value);
    }

    async fn execute(&self, client: &Client, op: &Op) -> Completion {
        let done = |kind, value| Completion {
            kind,
            value,
            error: None,
        };
        let failed = |kind, value, e: ClientError| Completion {
            kind,
            value,
            error: Some(e.to_string()),
        };
        match op {
            Op::Read { key } => match client.get(SPHERE, &self.key_bytes(*key)).await {
                Ok(found) => {
                    let value = found.as_deref().map_or(Json::Null, decode_value);
                    self.remember(*key, value.as_i64());
                    done(EventType::Ok, value)
                }
                Err(e) => failed(EventType::Fail, Json::Null, e),
            },
            Op::Write { key, value } => {
                let bytes = value.to_string().into_bytes();
                match client.put(SPHERE, &self.key_bytes(*key), &bytes).await {
                    Ok(()) => {
                        self.remember(*key, Some(*value));
                        done(EventType::Ok, op.input())
                    }
                    Err(e) => failed(write_failure(&e), op.input(), e),
                }
            }
            Op::Delete { key } => match client.delete(SPHERE, &self.key_bytes(*key)).await {
                Ok(_) => {
                    self.remember(*key, None);
                    done(EventType::Ok, Json::Null)
                }
                Err(e) => failed(write_failure(&e), Json::Null, e),
            },
            Op::ReadRange { start, end } => self.read_range(client, *start, *end).await,
            Op::ReadRangeAt { start, end, at } => {
                self.read_range_at(client, *start, *end, *at).await
            }
            Op::Cas { key, from, to } => {
                let expected = from.map(|v| v.to_string().into_bytes());
                let new_value = to.to_string().into_bytes();
                let result = client
                    .compare_and_swap(
                        SPHERE,
                        &self.key_bytes(*key),
                        expected.as_deref(),
                        Some(&new_value),
                    )
                    .await;
                match result {
                    Ok((true, _)) => {
                        self.remember(*key, Some(*to));
                        done(EventType::Ok, op.input())
                    }
                    Ok((false, current)) => {
                        let current = current.as_deref().map_or(Json::Null, decode_value);
                        self.remember(*key, current.as_i64());
                        Completion {
                            kind: EventType::Fail,
                            value: op.input(),
                            error: Some(format!("compare failed; found {current}")),
                        }
                    }
                    Err(e) => failed(write_failure(&e), op.input(), e),
                }
            }
            Op::Transfer { from, to, amount } => self.transfer(client, *from, *to, *amount).await,
            Op::ReadBalances => self.read_balances(client).await,
            Op::ListTxn { mops } => self.list_txn(client, mops).await,
            Op::FeedWrite { id, keys } => self.feed_write(client, *id, keys).await,
            Op::Add { element } => {
                let bytes = element.to_string().into_bytes();
                match client.put(SPHERE, &set_key(*element), &bytes).await {
                    Ok(()) => done(EventType::Ok, op.input()),
                    Err(e) => failed(write_failure(&e), op.input(), e),
                }
            }
        }
    }

    fn record(
        &self,
        process: i64,
        lane: usize,
        op: &Op,
        kind: EventType,
        value: Json,
        error: Option<String>,
    ) {
        self.recorder.record(Record {
            process,
            kind,
            f: op.function(),
            key: op.key(),
            value,
            time_ns: 0,
            error,
            lane,
        });
    }

    /// One worker: operations at the configured rate until the deadline. Returns how many
    /// operations it invoked.
    pub async fn worker(self: Arc<Self>, index: usize) -> usize {
        let mut rng = StdRng::seed_from_u64(
            self.cfg
                .seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(index as u64 + 1),
        );
        let concurrency = self.cfg.concurrency.max(1);
        // Each worker waits on average `concurrency / rate` seconds between operations,
        // drawn uniformly so the workers do not march in step.
        let mean_gap_ms = concurrency as f64 * 1_000.0 / self.cfg.rate_ops_per_sec.max(0.001);
        let mut process = index as i64;
        let mut client: Option<Client> = None;
        let mut invoked = 0;
        for _ in 0..MAX_OPS_PER_WORKER {
            let gap_ms = rng.random_range(0.0..=2.0 * mean_gap_ms);
            tokio::time::sleep(Duration::from_secs_f64(gap_ms / 1_000.0)).await;
            if Instant::now() >= self.deadline {
                break;
            }
            let connected = match &client {
                Some(c) => c.clone(),
                None => match self.connect(index, self.cfg.op_timeout_ms).await {
                    Some(c) => {
                        client = Some(c.clone());
                        c
                    }
                    None => {
                        tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await;
                        continue;
                    }
                },
            };
            let Some(op) = self.generate(&mut rng) else {
                break;
            };
            invoked += 1;
            self.record(process, index, &op, EventType::Invoke, op.input(), None);
            let budget = Duration::from_millis(self.cfg.op_timeout_ms + CALL_SLACK_MS);
            let completion = match tokio::time::timeout(budget, self.execute(&connected, &op)).await
            {
                Ok(c) => c,
                Err(_) => Completion {
                    kind: if op.function().is_read() {
                        EventType::Fail
                    } else {
                        EventType::Info
                    },
                    value: op.input(),
                    error: Some("no answer within the tester's own deadline".into()),
                },
            };
            let kind = completion.kind;
            self.record(
                process,
                index,
                &op,
                kind,
                completion.value,
                completion.error,
            );
            if kind == EventType::Info {
                process += concurrency as i64;
                client = None;
            }
        }
        invoked
    }

    /// Reads every key (register) or the whole set once more after the cluster healed, so
    /// lost writes show. Returns how many final reads succeeded.
    pub async fn final_reads(&self) -> usize {
        let lane = self.cfg.concurrency;
        let mut process = FINAL_PROCESS_BASE;
        // `None`: the read of the whole set.
        let reads: Vec<Option<Op>> = match self.cfg.kind {
            WorkloadKind::Register => self
                .state()
                .used_keys
                .iter()
                .map(|&key| Some(Op::Read { key }))
                .collect(),
            WorkloadKind::Set => vec![None],
            WorkloadKind::Scan => vec![Some(Op::ReadRange {
                start: 0,
                end: SCAN_KEYS,
            })],
            WorkloadKind::Bank => vec![Some(Op::ReadBalances)],
            WorkloadKind::ListAppend => {
                // Every list the run may have appended to, in one transaction.
                let generated = self.list_txns.load(Ordering::Relaxed);
                let last_key = generated / LIST_KEY_LIFETIME_OPS + LIST_ACTIVE_KEYS;
                vec![Some(Op::ListTxn {
                    mops: (0..last_key).map(|key| ListMop::Read { key }).collect(),
                })]
            }
            // The consumers' final checkpoint plays the part of a final read
            // (`super::feeds::Consumers::finish`).
            WorkloadKind::Changefeed => Vec::new(),
        };
        let mut succeeded = 0;
        let mut client: Option<Client> = None;
        let give_up_at = Instant::now() + Duration::from_millis(FINAL_READS_TOTAL_MS);
        for op in reads {
            for attempt in 0..MAX_FINAL_READ_ATTEMPTS {
                if Instant::now() >= give_up_at {
                    return succeeded;
                }
                if client.is_none() {
                    client = self.connect(attempt, FINAL_READ_DEADLINE_MS).await;
                }
                let Some(c) = client.clone() else {
                    tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await;
                    continue;
                };
                let read = |kind, value, error| Record {
                    process,
                    kind,
                    f: op.as_ref().map_or(Function::Read, Op::function),
                    key: op.as_ref().and_then(Op::key),
                    value,
                    time_ns: 0,
                    error,
                    lane,
                };
                let input = op.as_ref().map_or(Json::Null, Op::input);
                self.recorder.record(read(EventType::Invoke, input, None));
                let completion = match &op {
                    Some(op) => self.execute(&c, op).await,
                    None => self.read_set(&c).await,
                };
                let ok = completion.kind == EventType::Ok;
                self.recorder
                    .record(read(completion.kind, completion.value, completion.error));
                process += 1;
                if ok {
                    succeeded += 1;
                    break;
                }
                client = None;
                tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await;
            }
        }
        succeeded
    }

    /// A scan of set elements or scan keys in `[start, end)`.
    async fn read_range(&self, client: &Client, start: i64, end: i64) -> Completion {
        let (from, to) = match self.cfg.kind {
            WorkloadKind::Set => (set_key(start), set_key(end)),
            _ => (scan_key(start), scan_key(end)),
        };
        // One more than the range can hold, so a scan that returned too much shows.
        let limit = u32::try_from(end - start + 1).unwrap_or(u32::MAX);
        match client.scan(SPHERE, &from, &to, limit).await {
            Ok(pairs) => {
                let items = pairs.iter().map(|kv| match self.cfg.kind {
                    WorkloadKind::Set => decode_value(&kv.value),
                    _ => {
                        // A key that is not the workload's shows as key -1: misplaced.
                        let key = scan_key_number(&kv.key).unwrap_or(-1);
                        json!([key, decode_value(&kv.value)])
                    }
                });
                Completion {
                    kind: EventType::Ok,
                    value: Json::Array(items.collect()),
                    error: None,
                }
            }
            Err(e) => Completion {
                kind: EventType::Fail,
                value: Json::Null,
                error: Some(e.to_string()),
            },
        }
    }

    /// A scan of scan keys in `[start, end)` as of `at`, or of a fresh timestamp.
    async fn read_range_at(
        &self,
        client: &Client,
        start: i64,
        end: i64,
        at: Option<i64>,
    ) -> Completion {
        let fail = |e: ClientError| Completion {
            kind: EventType::Fail,
            value: Json::Null,
            error: Some(e.to_string()),
        };
        let ts = match at {
            Some(ts) => ts,
            None => match client.timestamp().await {
                Ok(ts) => ts as i64,
                Err(e) => return fail(e),
            },
        };
        let limit = u32::try_from(end - start + 1).unwrap_or(u32::MAX);
        match client
            .scan_at(SPHERE, &scan_key(start), &scan_key(end), limit, ts as u64)
            .await
        {
            Ok(pairs) => {
                if at.is_none() {
                    let mut snapshots = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
                    if snapshots.len() == MAX_REPEATABLE_SNAPSHOTS {
                        snapshots.remove(0);
                    }
                    snapshots.push((ts, start, end));
                }
                let items: Vec<Json> = pairs
                    .iter()
                    .map(|kv| {
                        let key = scan_key_number(&kv.key).unwrap_or(-1);
                        json!([key, decode_value(&kv.value)])
                    })
                    .collect();
                Completion {
                    kind: EventType::Ok,
                    value: json!([ts, items]),
                    error: None,
                }
            }
            Err(e) => fail(e),
        }
    }

    async fn read_set(&self, client: &Client) -> Completion {
        let limit = u32::try_from(MAX_SET_ELEMENTS).unwrap_or(u32::MAX);
        match client
            .scan(SPHERE, SET_PREFIX.as_bytes(), SET_END.as_bytes(), limit)
            .await
        {
            Ok(pairs) => Completion {
                kind: EventType::Ok,
                value: Json::Array(pairs.iter().map(|kv| decode_value(&kv.value)).collect()),
                error: None,
            },
            Err(e) => Completion {
                kind: EventType::Fail,
                value: Json::Null,
                error: Some(e.to_string()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(kind: WorkloadKind) -> Workload {
        let cfg = WorkloadConfig {
            kind,
            concurrency: 2,
            rate_ops_per_sec: 10.0,
            seed: 1,
            op_timeout_ms: 1_000,
            key_count: 2,
            ops_per_key: 3,
            value_domain: 5,
            read_consistency: Consistency::Linearizable,
        };
        Workload::new(
            cfg,
            vec!["127.0.0.1:1".into()],
            Arc::new(Recorder::new()),
            Instant::now(),
        )
    }

    #[test]
    fn register_keys_rotate_and_values_stay_in_the_domain() {
        let w = workload(WorkloadKind::Register);
        let mut rng = StdRng::seed_from_u64(1);
        let mut deletes = 0;
        for _ in 0..60 {
            match w.generate(&mut rng) {
                Some(Op::Write { value, .. }) => assert!((0..5).contains(&value)),
                Some(Op::Cas { from, to, .. }) => {
                    assert!((0..5).contains(&to));
                    assert!(from.is_none_or(|f| (0..5).contains(&f)));
                }
                Some(Op::Delete { .. }) => deletes += 1,
                Some(Op::Read { .. }) => {}
                other => panic!("not a register operation: {other:?}"),
            }
        }
        assert!(deletes > 0, "the register workload deletes");
        let used = w.state().used_keys.clone();
        // 60 operations over 2 slots of 3 operations each: about 20 keys.
        assert!(used.len() >= 16, "{used:?}");
        assert_eq!(decode_value(b"42"), json!(42));
        assert_eq!(decode_value(b"x"), json!("x"));
        assert_eq!(set_key(5), b"set/000000000005".to_vec());
    }

    #[test]
    fn scan_ops_stay_in_the_key_space_and_keys_decode() {
        let w = workload(WorkloadKind::Scan);
        let mut rng = StdRng::seed_from_u64(3);
        let (mut scans, mut writes) = (0, 0);
        for _ in 0..200 {
            match w.generate(&mut rng) {
                Some(
                    Op::ReadRange { start, end }
                    | Op::ReadRangeAt {
                        start,
                        end,
                        at: None,
                    },
                ) => {
                    assert!(0 <= start && start < end && end <= SCAN_KEYS);
                    scans += 1;
                }
                Some(Op::Write { key, .. } | Op::Delete { key }) => {
                    assert!((0..SCAN_KEYS).contains(&key));
                    writes += 1;
                }
                other => panic!("not a scan operation: {other:?}"),
            }
        }
        assert!(scans > 20 && writes > 20, "{scans} scans, {writes} writes");
        assert_eq!(scan_key_number(&scan_key(42)), Some(42));
        assert_eq!(scan_key_number(b"r/1"), None);
        let (start, end) = WorkloadKind::Scan.key_span();
        assert!(start <= scan_key(0) && scan_key(SCAN_KEYS - 1) < end);
    }

    #[test]
    fn changefeed_transactions_write_distinct_keys_of_the_span_with_unique_values() {
        let w = workload(WorkloadKind::Changefeed);
        let mut rng = StdRng::seed_from_u64(7);
        let (start, end) = WorkloadKind::Changefeed.key_span();
        let mut ids = BTreeSet::new();
        let mut multi_shard = 0;
        for _ in 0..200 {
            let Some(Op::FeedWrite { id, keys }) = w.generate(&mut rng) else {
                panic!("not a changefeed operation");
            };
            assert!(ids.insert(id), "value {id} used twice");
            assert!(
                (1..=FEED_MAX_KEYS_PER_TXN).contains(&keys.len()),
                "{keys:?}"
            );
            let distinct: BTreeSet<i64> = keys.iter().copied().collect();
            assert_eq!(distinct.len(), keys.len(), "{keys:?}");
            for &k in &keys {
                assert!((0..FEED_KEYS).contains(&k));
                let stored = feed_key(k).into_bytes();
                assert!(start <= stored && stored < end);
            }
            let shards: BTreeSet<i64> = keys.iter().map(|k| k % FEED_SHARDS).collect();
            if shards.len() > 1 {
                multi_shard += 1;
            }
        }
        assert!(multi_shard > 50, "{multi_shard} of 200 cross ranges");
        assert_eq!(
            feed_write_value(9, &[1, 6]),
            json!([["w", "feed/1/000001", 9], ["w", "feed/2/000006", 9]])
        );
    }

    #[test]
    fn set_reads_cover_a_window_of_recent_elements() {
        let w = workload(WorkloadKind::Set);
        let mut rng = StdRng::seed_from_u64(5);
        let mut reads = 0;
        for _ in 0..300 {
            if let Some(Op::ReadRange { start, end }) = w.generate(&mut rng) {
                assert_eq!(end - start, SET_READ_WINDOW_ELEMENTS);
                assert!(start >= 1);
                reads += 1;
            }
        }
        assert!(
            (10..=60).contains(&reads),
            "{reads} reads in 300 operations"
        );
    }
}
