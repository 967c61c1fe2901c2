//! Client workloads, run through the client library by concurrent workers at a bounded
//! rate, each operation recorded as invoke + ok/fail/info.
//!
//! - **register**: a few keys at a time, each a compare-and-set register (read, write,
//!   cas) with unique values. A key retires after a fixed number of operations and a fresh
//!   one takes its slot, so every per-key history stays short enough to check quickly.
//! - **set**: adds of unique elements (one key per element), then one final read of all
//!   of them after the cluster has healed.
//!
//! Outcomes follow the client's error contract: a read that fails is `fail` (it constrains
//! nothing); a write whose outcome is unknown (`Indeterminate`, deadline exceeded, an
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

/// Which workload to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    Register,
    Set,
}

impl WorkloadKind {
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Register => "register",
            WorkloadKind::Set => "set",
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
}

#[derive(Debug, Clone)]
enum Op {
    Read {
        key: i64,
    },
    Write {
        key: i64,
        value: i64,
    },
    Cas {
        key: i64,
        from: Option<i64>,
        to: i64,
    },
    Add {
        element: i64,
    },
}

impl Op {
    fn function(&self) -> Function {
        match self {
            Op::Read { .. } => Function::Read,
            Op::Write { .. } => Function::Write,
            Op::Cas { .. } => Function::Cas,
            Op::Add { .. } => Function::Add,
        }
    }

    fn key(&self) -> Option<i64> {
        match self {
            Op::Read { key } | Op::Write { key, .. } | Op::Cas { key, .. } => Some(*key),
            Op::Add { .. } => None,
        }
    }

    fn input(&self) -> Json {
        match self {
            Op::Read { .. } => Json::Null,
            Op::Write { value, .. } => json!(value),
            Op::Cas { from, to, .. } => json!([from, to]),
            Op::Add { element } => json!(element),
        }
    }
}

/// How an operation ended.
struct Completion {
    kind: EventType,
    value: Json,
    error: Option<String>,
}

fn register_key(key: i64) -> Vec<u8> {
    format!("r/{key}").into_bytes()
}

fn set_key(element: i64) -> Vec<u8> {
    format!("{SET_PREFIX}{element:012}").into_bytes()
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

/// `info` for errors that leave a write's outcome unknown, `fail` otherwise.
fn write_failure(e: &ClientError) -> EventType {
    match e {
        ClientError::Indeterminate(_)
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
                let element = self.next_value();
                (element <= MAX_SET_ELEMENTS).then_some(Op::Add { element })
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
                let op = match rng.random_range(0..3) {
                    0 => Op::Read { key },
                    1 => Op::Write {
                        key,
                        value: self.next_value(),
                    },
                    _ => Op::Cas {
                        key,
                        from: state.last_value.get(&key).copied().flatten(),
                        to: self.next_value(),
                    },
                };
                Some(op)
            }
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
            Op::Read { key } => match client.get(SPHERE, &register_key(*key)).await {
                Ok(found) => {
                    let value = found.as_deref().map_or(Json::Null, decode_value);
                    self.remember(*key, value.as_i64());
                    done(EventType::Ok, value)
                }
                Err(e) => failed(EventType::Fail, Json::Null, e),
            },
            Op::Write { key, value } => {
                let bytes = value.to_string().into_bytes();
                match client.put(SPHERE, &register_key(*key), &bytes).await {
                    Ok(()) => {
                        self.remember(*key, Some(*value));
                        done(EventType::Ok, op.input())
                    }
                    Err(e) => failed(write_failure(&e), op.input(), e),
                }
            }
            Op::Cas { key, from, to } => {
                let expected = from.map(|v| v.to_string().into_bytes());
                let new_value = to.to_string().into_bytes();
                let result = client
                    .compare_and_swap(
                        SPHERE,
                        &register_key(*key),
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
        let keys: Vec<Option<i64>> = match self.cfg.kind {
            WorkloadKind::Register => self.state().used_keys.iter().map(|&k| Some(k)).collect(),
            WorkloadKind::Set => vec![None],
        };
        let mut succeeded = 0;
        let mut client: Option<Client> = None;
        let give_up_at = Instant::now() + Duration::from_millis(FINAL_READS_TOTAL_MS);
        for key in keys {
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
                    f: Function::Read,
                    key,
                    value,
                    time_ns: 0,
                    error,
                    lane,
                };
                self.recorder
                    .record(read(EventType::Invoke, Json::Null, None));
                let completion = match key {
                    Some(key) => self.execute(&c, &Op::Read { key }).await,
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

    #[test]
    fn register_keys_rotate_and_values_are_unique() {
        let cfg = WorkloadConfig {
            kind: WorkloadKind::Register,
            concurrency: 2,
            rate_ops_per_sec: 10.0,
            seed: 1,
            op_timeout_ms: 1_000,
            key_count: 2,
            ops_per_key: 3,
            read_consistency: Consistency::Linearizable,
        };
        let w = Workload::new(
            cfg,
            vec!["127.0.0.1:1".into()],
            Arc::new(Recorder::new()),
            Instant::now(),
        );
        let mut rng = StdRng::seed_from_u64(1);
        let mut values = BTreeSet::new();
        for _ in 0..30 {
            match w.generate(&mut rng) {
                Some(Op::Write { value, .. }) => assert!(values.insert(value)),
                Some(Op::Cas { to, .. }) => assert!(values.insert(to)),
                Some(_) => {}
                None => panic!("register never runs out"),
            }
        }
        let used = w.state().used_keys.clone();
        // 30 operations over 2 slots of 3 operations each: about 10 keys.
        assert!(used.len() >= 8, "{used:?}");
        assert_eq!(decode_value(b"42"), json!(42));
        assert_eq!(decode_value(b"x"), json!("x"));
        assert_eq!(set_key(5), b"set/000000000005".to_vec());
    }
}
