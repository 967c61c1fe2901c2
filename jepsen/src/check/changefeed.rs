//! The change-feed checker: writers commit transactions that put one unique value (the
//! transaction's id) on 1 to 3 keys, and consumers follow the keys' change feed, dropping and
//! resuming their subscription from the last checkpoint's cursor now and then. What the
//! consumers recorded (`feeds.jsonl`, [`FeedRecord`]) is checked against the writers' history
//! (`history.jsonl`, transactions `[["w", key, id], ...]`):
//!
//! - **lost**: once a consumer's checkpoint passed the final timestamp (an oracle timestamp
//!   taken after every writer stopped, so above every acknowledged commit), every write of
//!   every `ok` transaction was delivered to it, in one of its subscriptions (each resumes
//!   where the last checkpoint left off, so together they cover every commit up to there);
//!   and a transaction whose outcome was unknown was delivered whole or not at all;
//! - **failed-write-delivered**: a write of a transaction that ended `fail` was delivered;
//! - **unwritten**: a value nobody wrote to that key was delivered (or a delete, which no
//!   writer issues);
//! - **duplicate**: one subscription delivered one key's change at one commit timestamp twice;
//! - **out-of-order**: one subscription delivered a key's changes out of commit order;
//! - **below-checkpoint**: a change at or below a checkpoint its subscription had already
//!   delivered;
//! - **below-cursor**: a change at or below the timestamp its subscription started from;
//! - **checkpoint-regressed**: a checkpoint not above the one before it in its subscription,
//!   or not above the timestamp the subscription started from;
//! - **inconsistent**: one write delivered at two commit timestamps, or two values at one key
//!   and commit timestamp;
//! - **cursor**: a subscription did not start where the consumer's last checkpoint stood, or
//!   a checkpoint's cursor did not read back as the same timestamp;
//! - **txn-mismatch** (grouped consumers): a transaction item holding a change of another
//!   commit timestamp, or a lone change delivered outside a transaction item;
//! - **split-txn** (grouped consumers): a transaction item holding some but not all of one
//!   write transaction's writes: a device would have applied half a transaction.
//!
//! Delivery after a resume is at least once, so duplicates and order are checked within a
//! subscription only; everything else across the whole consumer.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde_json::{json, Value as Json};

use crate::history::{Event, EventType, Function, Value};

/// Anomalies listed per kind in a report; the counts are always complete.
pub const MAX_LISTED_PER_KIND: usize = 5;

/// What the change-feed checker can find.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FeedAnomaly {
    Lost,
    FailedWriteDelivered,
    Unwritten,
    Duplicate,
    OutOfOrder,
    BelowCheckpoint,
    BelowCursor,
    CheckpointRegressed,
    Inconsistent,
    Cursor,
    TxnMismatch,
    SplitTxn,
    Gap,
}

impl FeedAnomaly {
    /// Every kind, in the order reports list them.
    pub const ALL: [FeedAnomaly; 13] = [
        FeedAnomaly::Lost,
        FeedAnomaly::FailedWriteDelivered,
        FeedAnomaly::Unwritten,
        FeedAnomaly::Duplicate,
        FeedAnomaly::OutOfOrder,
        FeedAnomaly::BelowCheckpoint,
        FeedAnomaly::BelowCursor,
        FeedAnomaly::CheckpointRegressed,
        FeedAnomaly::Inconsistent,
        FeedAnomaly::Cursor,
        FeedAnomaly::TxnMismatch,
        FeedAnomaly::SplitTxn,
        FeedAnomaly::Gap,
    ];

    /// The name report lines start with (`lost: ...`).
    pub fn name(self) -> &'static str {
        match self {
            FeedAnomaly::Lost => "lost",
            FeedAnomaly::FailedWriteDelivered => "failed-write-delivered",
            FeedAnomaly::Unwritten => "unwritten",
            FeedAnomaly::Duplicate => "duplicate",
            FeedAnomaly::OutOfOrder => "out-of-order",
            FeedAnomaly::BelowCheckpoint => "below-checkpoint",
            FeedAnomaly::BelowCursor => "below-cursor",
            FeedAnomaly::CheckpointRegressed => "checkpoint-regressed",
            FeedAnomaly::Inconsistent => "inconsistent",
            FeedAnomaly::Cursor => "cursor",
            FeedAnomaly::TxnMismatch => "txn-mismatch",
            FeedAnomaly::SplitTxn => "split-txn",
            FeedAnomaly::Gap => "gap",
        }
    }
}

/// One change as a consumer recorded it: the user key and value as text (lossy UTF-8; the
/// workload writes ASCII only), `None` for a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedChange {
    pub key: String,
    pub value: Option<String>,
    pub commit_ts: u64,
}

/// What one line of `feeds.jsonl` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEntry {
    /// A subscription started; `since` is the timestamp it delivers changes after (its
    /// cursor's, as the subscription reports it).
    Subscribe {
        since: u64,
    },
    /// A subscription could not be started (nothing was delivered).
    Refused {
        error: String,
    },
    /// A change (ungrouped mode).
    Change(FeedChange),
    /// A whole transaction (grouped mode).
    Txn {
        commit_ts: u64,
        changes: Vec<FeedChange>,
    },
    Checkpoint {
        ts: u64,
    },
    /// The cursor of the checkpoint at `ts` did not read back as that checkpoint.
    BadCursor {
        ts: u64,
        error: String,
    },
    /// The subscription ended: an error, or dropped on purpose to resume from the cursor.
    Ended {
        reason: String,
    },
    /// The final timestamp the consumer was told to reach.
    Final {
        ts: u64,
    },
}

/// One line of `feeds.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedRecord {
    pub consumer: u64,
    pub grouped: bool,
    /// The consumer's subscription (1, 2, ...); 0 for lines about no subscription in
    /// particular.
    pub sub: u64,
    pub entry: FeedEntry,
    /// Nanoseconds since the start of the run, as in the history.
    pub time_ns: Option<u64>,
    /// 1-based line in `feeds.jsonl` (0 before the records were written).
    pub line: usize,
}

fn change_json(change: &FeedChange) -> Json {
    json!({"key": change.key, "value": change.value, "ts": change.commit_ts})
}

impl FeedRecord {
    /// The record as one JSON line, e.g. `{"consumer":0,"grouped":false,"sub":2,
    /// "type":"change","key":"feed/1/000005","value":"42","ts":123,"time":456}`.
    pub fn to_json(&self) -> Json {
        let mut map = serde_json::Map::new();
        map.insert("consumer".into(), json!(self.consumer));
        map.insert("grouped".into(), json!(self.grouped));
        map.insert("sub".into(), json!(self.sub));
        let mut put = |name: &str, value: Json| {
            map.insert(name.to_string(), value);
        };
        match &self.entry {
            FeedEntry::Subscribe { since } => {
                put("type", json!("subscribe"));
                put("since", json!(since));
            }
            FeedEntry::Refused { error } => {
                put("type", json!("refused"));
                put("error", json!(error));
            }
            FeedEntry::Change(change) => {
                put("type", json!("change"));
                put("key", json!(change.key));
                put("value", json!(change.value));
                put("ts", json!(change.commit_ts));
            }
            FeedEntry::Txn { commit_ts, changes } => {
                put("type", json!("txn"));
                put("ts", json!(commit_ts));
                put(
                    "changes",
                    Json::Array(changes.iter().map(change_json).collect()),
                );
            }
            FeedEntry::Checkpoint { ts } => {
                put("type", json!("checkpoint"));
                put("ts", json!(ts));
            }
            FeedEntry::BadCursor { ts, error } => {
                put("type", json!("bad-cursor"));
                put("ts", json!(ts));
                put("error", json!(error));
            }
            FeedEntry::Ended { reason } => {
                put("type", json!("ended"));
                put("reason", json!(reason));
            }
            FeedEntry::Final { ts } => {
                put("type", json!("final"));
                put("ts", json!(ts));
            }
        }
        if let Some(time) = self.time_ns {
            map.insert("time".into(), json!(time));
        }
        Json::Object(map)
    }

    fn from_json(json: &Json, line: usize) -> Result<FeedRecord, String> {
        let u64_field = |name: &str| -> Result<u64, String> {
            json.get(name)
                .and_then(Json::as_u64)
                .ok_or_else(|| format!("missing or not a non-negative integer: \"{name}\""))
        };
        let str_field = |name: &str| -> Result<String, String> {
            json.get(name)
                .and_then(Json::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("missing or not a string: \"{name}\""))
        };
        let kind = str_field("type")?;
        let entry = match kind.as_str() {
            "subscribe" => FeedEntry::Subscribe {
                since: u64_field("since")?,
            },
            "refused" => FeedEntry::Refused {
                error: str_field("error")?,
            },
            "change" => FeedEntry::Change(change_from_json(json)?),
            "txn" => {
                let changes = json
                    .get("changes")
                    .and_then(Json::as_array)
                    .ok_or("missing or not a list: \"changes\"")?;
                FeedEntry::Txn {
                    commit_ts: u64_field("ts")?,
                    changes: changes
                        .iter()
                        .map(change_from_json)
                        .collect::<Result<_, _>>()?,
                }
            }
            "checkpoint" => FeedEntry::Checkpoint {
                ts: u64_field("ts")?,
            },
            "bad-cursor" => FeedEntry::BadCursor {
                ts: u64_field("ts")?,
                error: str_field("error")?,
            },
            "ended" => FeedEntry::Ended {
                reason: str_field("reason")?,
            },
            "final" => FeedEntry::Final {
                ts: u64_field("ts")?,
            },
            other => return Err(format!("unknown \"type\" {other:?}")),
        };
        Ok(FeedRecord {
            consumer: u64_field("consumer")?,
            grouped: json.get("grouped").and_then(Json::as_bool).unwrap_or(false),
            sub: u64_field("sub")?,
            entry,
            time_ns: json.get("time").and_then(Json::as_u64),
            line,
        })
    }
}

fn change_from_json(json: &Json) -> Result<FeedChange, String> {
    let key = json
        .get("key")
        .and_then(Json::as_str)
        .ok_or("a change without a string \"key\"")?
        .to_string();
    let value = match json.get("value") {
        None | Some(Json::Null) => None,
        Some(Json::String(v)) => Some(v.clone()),
        Some(other) => return Err(format!("a change's \"value\" is {other}, not a string")),
    };
    let commit_ts = json
        .get("ts")
        .and_then(Json::as_u64)
        .ok_or("a change without an integer \"ts\"")?;
    Ok(FeedChange {
        key,
        value,
        commit_ts,
    })
}

/// The records as `feeds.jsonl` text, one line each.
pub fn records_jsonl(records: &[FeedRecord]) -> String {
    let mut out = String::new();
    for record in records {
        out.push_str(&record.to_json().to_string());
        out.push('\n');
    }
    out
}

/// Reads `feeds.jsonl` text; blank lines are skipped.
pub fn parse_feed_records(text: &str) -> Result<Vec<FeedRecord>, String> {
    let mut records = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let json: Json = serde_json::from_str(raw)
            .map_err(|e| format!("feeds.jsonl line {line}: invalid JSON: {e}"))?;
        records.push(
            FeedRecord::from_json(&json, line)
                .map_err(|e| format!("feeds.jsonl line {line}: {e}"))?,
        );
    }
    Ok(records)
}

/// One write transaction of the history.
#[derive(Debug, Clone)]
struct Write {
    /// The value it put on every key: unique in the run.
    id: i64,
    keys: Vec<String>,
    /// `Ok`, `Fail`, or `Info` (also when it never completed).
    outcome: EventType,
    invoke_line: usize,
    complete_line: Option<usize>,
}

impl Write {
    fn describe(&self) -> String {
        let outcome = match self.outcome {
            EventType::Ok => "ok",
            EventType::Fail => "fail",
            EventType::Info | EventType::Invoke => "unknown outcome",
        };
        let lines = match self.complete_line {
            Some(done) => format!("history lines {}-{done}", self.invoke_line),
            None => format!("history line {}, never completed", self.invoke_line),
        };
        format!(
            "transaction {} writing [{}] ({outcome}; {lines})",
            self.id,
            self.keys.join(" ")
        )
    }
}

/// A write transaction's value: `[["w", key, id], ...]`, one id for all its keys.
fn write_of(value: &Value) -> Result<(i64, Vec<String>), String> {
    let Value::List(mops) = value else {
        return Err(format!(
            "a write transaction's value is {value}, not a list"
        ));
    };
    let mut id: Option<i64> = None;
    let mut keys = Vec::new();
    for mop in mops {
        let Value::List(parts) = mop else {
            return Err(format!("{mop} is not [\"w\" key value]"));
        };
        match parts.as_slice() {
            [Value::Str(f), Value::Str(key), Value::Int(v)] if f == "w" => {
                if id.is_some_and(|i| i != *v) {
                    return Err(format!("{value} writes more than one value"));
                }
                id = Some(*v);
                keys.push(key.clone());
            }
            _ => return Err(format!("{mop} is not [\"w\" key value]")),
        }
    }
    let id = id.ok_or_else(|| "a write transaction that writes nothing".to_string())?;
    Ok((id, keys))
}

/// The write transactions of a history, with their outcomes.
fn writes_from_events(events: &[Event]) -> Result<Vec<Write>, String> {
    let mut writes: Vec<Write> = Vec::new();
    let mut open: HashMap<i64, usize> = HashMap::new();
    for event in events {
        if event.f != Function::Txn {
            continue;
        }
        if event.kind == EventType::Invoke {
            let (id, keys) =
                write_of(&event.value).map_err(|e| format!("history line {}: {e}", event.line))?;
            if let Some(pending) = open.insert(event.process, writes.len()) {
                return Err(format!(
                    "history line {}: process {} invokes a transaction while the one from \
                     line {} is pending",
                    event.line, event.process, writes[pending].invoke_line
                ));
            }
            writes.push(Write {
                id,
                keys,
                outcome: EventType::Info,
                invoke_line: event.line,
                complete_line: None,
            });
            continue;
        }
        let Some(index) = open.remove(&event.process) else {
            return Err(format!(
                "history line {}: process {} completes a transaction it never invoked",
                event.line, event.process
            ));
        };
        if let Some(write) = writes.get_mut(index) {
            write.outcome = event.kind;
            write.complete_line = Some(event.line);
        }
    }
    Ok(writes)
}

/// One anomaly, with its evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedFinding {
    pub kind: FeedAnomaly,
    pub explanation: String,
}

/// What the change-feed checker found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedReport {
    pub consumers: usize,
    /// Consumers whose checkpoint passed the final timestamp: their lost writes were checked.
    pub reached_final: usize,
    pub subscriptions: usize,
    /// Changes delivered, alone or in transactions, all consumers together.
    pub changes: usize,
    pub checkpoints: usize,
    pub writes_ok: usize,
    pub writes_failed: usize,
    pub writes_unknown: usize,
    /// Every anomaly found, by kind.
    pub counts: BTreeMap<FeedAnomaly, usize>,
    /// The first [`MAX_LISTED_PER_KIND`] anomalies of each kind.
    pub findings: Vec<FeedFinding>,
    /// Why the check is incomplete: consumers that did not reach the final timestamp.
    pub unchecked: Vec<String>,
}

impl FeedReport {
    fn found(&mut self, kind: FeedAnomaly, explanation: String) {
        let count = self.counts.entry(kind).or_insert(0);
        *count += 1;
        if *count <= MAX_LISTED_PER_KIND {
            self.findings.push(FeedFinding { kind, explanation });
        }
    }

    pub fn anomaly_count(&self) -> usize {
        self.counts.values().sum()
    }

    /// Whether lost writes were checked for every consumer (and there was one).
    pub fn complete(&self) -> bool {
        self.consumers > 0 && self.unchecked.is_empty()
    }

    /// The report as lines for people: `<kind>: <evidence>` per listed anomaly, kind by kind,
    /// then what could not be checked.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for kind in FeedAnomaly::ALL {
            let listed: Vec<&FeedFinding> =
                self.findings.iter().filter(|f| f.kind == kind).collect();
            for finding in &listed {
                lines.push(format!("{}: {}", kind.name(), finding.explanation));
            }
            let count = self.counts.get(&kind).copied().unwrap_or(0);
            if count > listed.len() {
                lines.push(format!(
                    "{}: ... and {} more",
                    kind.name(),
                    count - listed.len()
                ));
            }
        }
        lines.extend(self.unchecked.iter().cloned());
        lines
    }
}

/// One subscription of a consumer, as far as it went.
struct Sub {
    number: u64,
    since: u64,
    line: usize,
    /// The newest checkpoint it delivered.
    checkpoint: Option<u64>,
    /// Each (key, commit ts) it delivered, with the line.
    delivered: HashMap<(String, u64), usize>,
    /// Each key's newest commit ts it delivered.
    newest: HashMap<String, u64>,
}

/// The check of one consumer's records, in order.
struct ConsumerCheck<'a> {
    consumer: u64,
    grouped: bool,
    writes: &'a HashMap<i64, &'a Write>,
    sub: Option<Sub>,
    /// Where the next subscription must start: the last checkpoint delivered to the
    /// consumer, or where its first subscription started.
    resume_from: Option<u64>,
    max_checkpoint: Option<u64>,
    final_ts: Option<u64>,
    /// Each write delivered, `(key, id)`, with its commit ts and first line.
    delivered: HashMap<(String, i64), (u64, usize)>,
    /// The value delivered at each (key, commit ts), with its first line.
    at_ts: HashMap<(String, u64), (Option<String>, usize)>,
}

fn describe_change(change: &FeedChange) -> String {
    match &change.value {
        Some(v) => format!("{}={v:?} at {}", change.key, change.commit_ts),
        None => format!("the delete of {} at {}", change.key, change.commit_ts),
    }
}

impl ConsumerCheck<'_> {
    fn mode(&self) -> &'static str {
        if self.grouped {
            "grouped"
        } else {
            "ungrouped"
        }
    }

    /// Where a record is, for evidence.
    fn place(&self, line: usize) -> String {
        let sub = self
            .sub
            .as_ref()
            .map_or(String::new(), |s| format!(" subscription {}", s.number));
        format!(
            "consumer {} ({}){sub}, feeds.jsonl line {line}",
            self.consumer,
            self.mode()
        )
    }

    fn take(&mut self, record: &FeedRecord, report: &mut FeedReport) -> Result<(), String> {
        let line = record.line;
        match &record.entry {
            FeedEntry::Subscribe { since } => {
                report.subscriptions += 1;
                match self.resume_from {
                    Some(expected) if expected != *since => report.found(
                        FeedAnomaly::Cursor,
                        format!(
                            "consumer {} ({}) subscription {}, feeds.jsonl line {line}: \
                             started from {since}, but the consumer's last checkpoint was \
                             {expected}",
                            self.consumer,
                            self.mode(),
                            record.sub
                        ),
                    ),
                    Some(_) => {}
                    None => self.resume_from = Some(*since),
                }
                self.sub = Some(Sub {
                    number: record.sub,
                    since: *since,
                    line,
                    checkpoint: None,
                    delivered: HashMap::new(),
                    newest: HashMap::new(),
                });
            }
            FeedEntry::Refused { .. } => {}
            FeedEntry::Ended { .. } => self.sub = None,
            FeedEntry::Final { ts } => self.final_ts = Some(*ts),
            FeedEntry::BadCursor { ts, error } => {
                let place = self.place(line);
                report.found(
                    FeedAnomaly::Cursor,
                    format!("{place}: the cursor of checkpoint {ts} does not read back: {error}"),
                );
            }
            FeedEntry::Checkpoint { ts } => {
                report.checkpoints += 1;
                let place = self.place(line);
                let Some(sub) = self.sub.as_mut() else {
                    return Err(format!(
                        "feeds.jsonl line {line}: a checkpoint outside any subscription"
                    ));
                };
                match sub.checkpoint {
                    Some(last) if *ts <= last => report.found(
                        FeedAnomaly::CheckpointRegressed,
                        format!("{place}: checkpoint {ts} came after checkpoint {last}"),
                    ),
                    None if *ts <= sub.since => report.found(
                        FeedAnomaly::CheckpointRegressed,
                        format!(
                            "{place}: checkpoint {ts} is not above {} the subscription \
                             started from (line {})",
                            sub.since, sub.line
                        ),
                    ),
                    _ => {}
                }
                sub.checkpoint = Some(sub.checkpoint.map_or(*ts, |last| last.max(*ts)));
                // A device stores the cursor of the checkpoint it got last.
                self.resume_from = Some(*ts);
                self.max_checkpoint = Some(self.max_checkpoint.map_or(*ts, |m| m.max(*ts)));
            }
            FeedEntry::Change(change) => {
                if self.grouped {
                    let place = self.place(line);
                    report.found(
                        FeedAnomaly::TxnMismatch,
                        format!(
                            "{place}: {} came alone, not in a transaction",
                            describe_change(change)
                        ),
                    );
                }
                self.change(change, line, report)?;
            }
            FeedEntry::Txn { commit_ts, changes } => {
                let mut by_write: BTreeMap<i64, BTreeSet<&str>> = BTreeMap::new();
                for change in changes {
                    if change.commit_ts != *commit_ts {
                        let place = self.place(line);
                        report.found(
                            FeedAnomaly::TxnMismatch,
                            format!(
                                "{place}: the transaction at {commit_ts} holds {}",
                                describe_change(change)
                            ),
                        );
                    }
                    if let Some(id) = self.change(change, line, report)? {
                        by_write.entry(id).or_default().insert(change.key.as_str());
                    }
                }
                let writes = self.writes;
                for (id, keys) in by_write {
                    let Some(write) = writes.get(&id) else {
                        continue;
                    };
                    let all: BTreeSet<&str> = write.keys.iter().map(String::as_str).collect();
                    if keys != all {
                        let place = self.place(line);
                        report.found(
                            FeedAnomaly::SplitTxn,
                            format!(
                                "{place}: the transaction delivered at {commit_ts} holds only \
                                 [{}] of {}",
                                keys.into_iter().collect::<Vec<_>>().join(" "),
                                write.describe()
                            ),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks one delivered change; returns the id of the write it delivers, if any.
    fn change(
        &mut self,
        change: &FeedChange,
        line: usize,
        report: &mut FeedReport,
    ) -> Result<Option<i64>, String> {
        report.changes += 1;
        let place = self.place(line);
        let what = describe_change(change);
        let writes = self.writes;
        let Some(sub) = self.sub.as_mut() else {
            return Err(format!(
                "feeds.jsonl line {line}: a change outside any subscription"
            ));
        };
        // Where it stands against the subscription's start and checkpoints.
        if change.commit_ts <= sub.since {
            report.found(
                FeedAnomaly::BelowCursor,
                format!(
                    "{place}: {what} is at or below {} the subscription started from (line {})",
                    sub.since, sub.line
                ),
            );
        } else if let Some(checkpoint) = sub.checkpoint.filter(|c| change.commit_ts <= *c) {
            report.found(
                FeedAnomaly::BelowCheckpoint,
                format!(
                    "{place}: {what} arrived after the same subscription's checkpoint \
                     {checkpoint}"
                ),
            );
        }
        // Once per subscription, each key in commit order.
        let slot = (change.key.clone(), change.commit_ts);
        if let Some(first) = sub.delivered.get(&slot) {
            report.found(
                FeedAnomaly::Duplicate,
                format!(
                    "{place}: {what} was delivered before in this subscription, at line {first}"
                ),
            );
        } else {
            if let Some(newest) = sub
                .newest
                .get(&change.key)
                .filter(|n| **n >= change.commit_ts)
            {
                report.found(
                    FeedAnomaly::OutOfOrder,
                    format!("{place}: {what} came after the same key's change at {newest}"),
                );
            }
            sub.delivered.insert(slot.clone(), line);
            let newest = sub.newest.entry(change.key.clone()).or_insert(0);
            *newest = (*newest).max(change.commit_ts);
        }
        // One value per key and commit ts, across subscriptions.
        match self.at_ts.entry(slot) {
            Entry::Occupied(seen) => {
                let (other, first) = seen.get();
                if *other != change.value {
                    report.found(
                        FeedAnomaly::Inconsistent,
                        format!(
                            "{place}: {what}, but line {first} delivered {} at the same key \
                             and commit timestamp",
                            other
                                .as_deref()
                                .map_or("a delete".to_string(), |v| format!("{v:?}"))
                        ),
                    );
                }
            }
            Entry::Vacant(vacant) => {
                vacant.insert((change.value.clone(), line));
            }
        }
        // Who wrote it.
        let Some(text) = &change.value else {
            report.found(
                FeedAnomaly::Unwritten,
                format!("{place}: {what}; no writer deletes"),
            );
            return Ok(None);
        };
        let write = text
            .parse::<i64>()
            .ok()
            .and_then(|id| writes.get(&id))
            .copied()
            .filter(|w| w.keys.contains(&change.key));
        let Some(write) = write else {
            report.found(
                FeedAnomaly::Unwritten,
                format!("{place}: {what}; nobody wrote that value to that key"),
            );
            return Ok(None);
        };
        if write.outcome == EventType::Fail {
            report.found(
                FeedAnomaly::FailedWriteDelivered,
                format!("{place}: {what}, written by {}", write.describe()),
            );
        }
        let written = (change.key.clone(), write.id);
        match self.delivered.entry(written) {
            Entry::Occupied(seen) => {
                let (ts, first) = seen.get();
                if *ts != change.commit_ts {
                    report.found(
                        FeedAnomaly::Inconsistent,
                        format!(
                            "{place}: {what}, but line {first} delivered the same write at \
                             {ts} ({})",
                            write.describe()
                        ),
                    );
                }
            }
            Entry::Vacant(vacant) => {
                vacant.insert((change.commit_ts, line));
            }
        }
        Ok(Some(write.id))
    }

    /// After the consumer's last record: every acknowledged write delivered, once its
    /// checkpoint passed the final timestamp.
    fn finish(&self, all_writes: &[Write], report: &mut FeedReport) {
        let who = format!("consumer {} ({})", self.consumer, self.mode());
        let (final_ts, checkpoint) = match (self.final_ts, self.max_checkpoint) {
            (Some(t), Some(c)) if c >= t => (t, c),
            (Some(t), c) => {
                report.unchecked.push(format!(
                    "{who} never reached the final timestamp {t} (last checkpoint {}): its \
                     lost writes are not checked",
                    c.map_or("none".to_string(), |c| c.to_string())
                ));
                return;
            }
            (None, _) => {
                report.unchecked.push(format!(
                    "{who} was given no final timestamp: its lost writes are not checked"
                ));
                return;
            }
        };
        report.reached_final += 1;
        for write in all_writes {
            let (delivered, missing): (Vec<&String>, Vec<&String>) = write
                .keys
                .iter()
                .partition(|k| self.delivered.contains_key(&((*k).clone(), write.id)));
            if missing.is_empty() {
                continue;
            }
            // A transaction of unknown outcome committed if any of its writes was delivered,
            // at that commit ts; the rest of it is owed once a checkpoint passed that ts
            // (its commit may also have landed above the final timestamp, late).
            let committed_below_checkpoint = delivered.iter().any(|k| {
                self.delivered
                    .get(&((*k).clone(), write.id))
                    .is_some_and(|(ts, _)| *ts <= checkpoint)
            });
            let missing_keys = missing
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(" ");
            match write.outcome {
                EventType::Ok => report.found(
                    FeedAnomaly::Lost,
                    format!(
                        "{who}: [{missing_keys}] of {} never delivered, though the \
                         consumer's checkpoint {checkpoint} passed the final timestamp \
                         {final_ts}",
                        write.describe()
                    ),
                ),
                EventType::Info | EventType::Invoke if committed_below_checkpoint => report.found(
                    FeedAnomaly::Lost,
                    format!(
                        "{who}: {} committed (some of its writes were delivered) but \
                         [{missing_keys}] never were, though the consumer's checkpoint \
                         {checkpoint} passed its commit timestamp and the final timestamp \
                         {final_ts}",
                        write.describe()
                    ),
                ),
                _ => {}
            }
        }
    }
}

/// Checks what the consumers recorded (`records`, in the order they were recorded) against
/// the writers' history (`events`). An error means the input cannot be interpreted (a
/// malformed write, a change outside any subscription), not an anomaly.
pub fn check(events: &[Event], records: &[FeedRecord]) -> Result<FeedReport, String> {
    let writes = writes_from_events(events)?;
    let mut by_id: HashMap<i64, &Write> = HashMap::new();
    for write in &writes {
        if let Some(other) = by_id.insert(write.id, write) {
            return Err(format!(
                "value {} is written by two transactions (history lines {} and {})",
                write.id, other.invoke_line, write.invoke_line
            ));
        }
    }
    let mut report = FeedReport::default();
    for write in &writes {
        match write.outcome {
            EventType::Ok => report.writes_ok += 1,
            EventType::Fail => report.writes_failed += 1,
            EventType::Info | EventType::Invoke => report.writes_unknown += 1,
        }
    }
    let mut consumers: BTreeMap<u64, Vec<&FeedRecord>> = BTreeMap::new();
    for record in records {
        consumers.entry(record.consumer).or_default().push(record);
    }
    report.consumers = consumers.len();
    for (consumer, records) in consumers {
        let mut check = ConsumerCheck {
            consumer,
            grouped: records.first().is_some_and(|r| r.grouped),
            writes: &by_id,
            sub: None,
            resume_from: None,
            max_checkpoint: None,
            final_ts: None,
            delivered: HashMap::new(),
            at_ts: HashMap::new(),
        };
        for record in records {
            check.take(record, &mut report)?;
        }
        check.finish(&writes, &mut report);
    }
    check_gaps(records, &mut report);
    Ok(report)
}

/// The commit timestamps of each change some consumer delivered: what every subscription
/// whose span covers it (all of them here) must deliver once a checkpoint passes it.
fn known_changes(records: &[FeedRecord]) -> Vec<(u64, String)> {
    let mut known: BTreeSet<(u64, String)> = BTreeSet::new();
    for record in records {
        match &record.entry {
            FeedEntry::Change(c) => {
                known.insert((c.commit_ts, c.key.clone()));
            }
            FeedEntry::Txn { changes, .. } => {
                known.extend(changes.iter().map(|c| (c.commit_ts, c.key.clone())));
            }
            _ => {}
        }
    }
    known.into_iter().collect()
}

/// Flags every checkpoint a subscription delivered without a change it had to deliver
/// first: one that some subscription delivered, committed after this one's start and at or
/// below the checkpoint. A resolved timestamp published before all such changes were
/// read loses them for that subscription, even when a resume from an older cursor (or
/// another consumer) delivers them, which the completeness check alone would accept.
fn check_gaps(records: &[FeedRecord], report: &mut FeedReport) {
    let known = known_changes(records);
    // Per (consumer, subscription): its start, what it delivered, how far it was checked.
    struct Seen {
        since: u64,
        checked_to: u64,
        delivered: HashSet<(u64, String)>,
    }
    let mut subs: HashMap<(u64, u64), Seen> = HashMap::new();
    for record in records {
        let id = (record.consumer, record.sub);
        match &record.entry {
            FeedEntry::Subscribe { since } => {
                subs.insert(
                    id,
                    Seen {
                        since: *since,
                        checked_to: *since,
                        delivered: HashSet::new(),
                    },
                );
            }
            FeedEntry::Change(c) => {
                if let Some(s) = subs.get_mut(&id) {
                    s.delivered.insert((c.commit_ts, c.key.clone()));
                }
            }
            FeedEntry::Txn { changes, .. } => {
                if let Some(s) = subs.get_mut(&id) {
                    s.delivered
                        .extend(changes.iter().map(|c| (c.commit_ts, c.key.clone())));
                }
            }
            FeedEntry::Checkpoint { ts } => {
                let Some(s) = subs.get_mut(&id) else { continue };
                if *ts <= s.checked_to {
                    continue;
                }
                let first = known.partition_point(|(t, _)| *t <= s.checked_to);
                for (commit_ts, key) in known[first..].iter().take_while(|(t, _)| t <= ts) {
                    if *commit_ts > s.since && !s.delivered.contains(&(*commit_ts, key.clone())) {
                        report.found(
                            FeedAnomaly::Gap,
                            format!(
                                "consumer {} subscription {} (from {}) delivered checkpoint {ts} \
                                 (feeds.jsonl line {}) without the change of {key} at \
                                 {commit_ts}, which another subscription delivered",
                                record.consumer, record.sub, s.since, record.line
                            ),
                        );
                    }
                }
                s.checked_to = *ts;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{parse_str, Format};

    /// Writers' history: transaction 1 writes a and b (ok), 2 writes c (ok), 3 writes a
    /// (fail), 4 writes b and c (unknown outcome).
    fn history() -> Vec<Event> {
        let lines = [
            r#"{"process":0,"type":"invoke","f":"txn","value":[["w","a",1],["w","b",1]]}"#,
            r#"{"process":1,"type":"invoke","f":"txn","value":[["w","c",2]]}"#,
            r#"{"process":0,"type":"ok","f":"txn","value":[["w","a",1],["w","b",1]]}"#,
            r#"{"process":1,"type":"ok","f":"txn","value":[["w","c",2]]}"#,
            r#"{"process":0,"type":"invoke","f":"txn","value":[["w","a",3]]}"#,
            r#"{"process":0,"type":"fail","f":"txn","value":[["w","a",3]],"error":"conflict"}"#,
            r#"{"process":1,"type":"invoke","f":"txn","value":[["w","b",4],["w","c",4]]}"#,
            r#"{"process":1,"type":"info","f":"txn","value":[["w","b",4],["w","c",4]]}"#,
        ];
        parse_str(Format::Jsonl, &lines.join("\n")).unwrap()
    }

    fn rec(consumer: u64, sub: u64, entry: FeedEntry) -> FeedRecord {
        FeedRecord {
            consumer,
            grouped: consumer == 1,
            sub,
            entry,
            time_ns: None,
            line: 0,
        }
    }

    fn ch(key: &str, value: i64, ts: u64) -> FeedChange {
        FeedChange {
            key: key.into(),
            value: Some(value.to_string()),
            commit_ts: ts,
        }
    }

    fn change(sub: u64, key: &str, value: i64, ts: u64) -> FeedRecord {
        rec(0, sub, FeedEntry::Change(ch(key, value, ts)))
    }

    fn checkpoint(consumer: u64, sub: u64, ts: u64) -> FeedRecord {
        rec(consumer, sub, FeedEntry::Checkpoint { ts })
    }

    fn subscribe(consumer: u64, sub: u64, since: u64) -> FeedRecord {
        rec(consumer, sub, FeedEntry::Subscribe { since })
    }

    /// A clean run: the ungrouped consumer (0) gets transaction 1 across a resume (twice:
    /// delivery after a resume is at least once), 2 and the unknown 4 (which committed); the
    /// grouped one (1) gets 1, 2 and 4 whole.
    fn clean() -> Vec<FeedRecord> {
        vec![
            subscribe(0, 1, 10),
            change(1, "a", 1, 20),
            checkpoint(0, 1, 15),
            change(1, "b", 1, 20),
            rec(
                0,
                1,
                FeedEntry::Ended {
                    reason: "resume".into(),
                },
            ),
            subscribe(0, 2, 15),
            change(2, "a", 1, 20),
            change(2, "b", 1, 20),
            checkpoint(0, 2, 25),
            change(2, "c", 2, 30),
            change(2, "b", 4, 35),
            change(2, "c", 4, 35),
            rec(0, 0, FeedEntry::Final { ts: 40 }),
            checkpoint(0, 2, 41),
            subscribe(1, 1, 10),
            rec(
                1,
                1,
                FeedEntry::Txn {
                    commit_ts: 20,
                    changes: vec![ch("a", 1, 20), ch("b", 1, 20)],
                },
            ),
            checkpoint(1, 1, 25),
            rec(
                1,
                1,
                FeedEntry::Txn {
                    commit_ts: 30,
                    changes: vec![ch("c", 2, 30)],
                },
            ),
            rec(
                1,
                1,
                FeedEntry::Txn {
                    commit_ts: 35,
                    changes: vec![ch("b", 4, 35), ch("c", 4, 35)],
                },
            ),
            rec(1, 0, FeedEntry::Final { ts: 40 }),
            checkpoint(1, 1, 45),
        ]
    }

    /// The records with lines numbered as if read from a file.
    fn numbered(mut records: Vec<FeedRecord>) -> Vec<FeedRecord> {
        for (i, r) in records.iter_mut().enumerate() {
            r.line = i + 1;
        }
        records
    }

    fn run(records: Vec<FeedRecord>) -> FeedReport {
        check(&history(), &numbered(records)).unwrap()
    }

    /// The kinds found, gaps aside: most anomalies injected here also leave a subscription
    /// short of a change another one delivered, which the gap test checks on its own.
    fn kinds(report: &FeedReport) -> Vec<FeedAnomaly> {
        report
            .counts
            .keys()
            .copied()
            .filter(|k| *k != FeedAnomaly::Gap)
            .collect()
    }

    #[test]
    fn a_clean_run_passes_and_its_records_round_trip_through_jsonl() {
        let report = run(clean());
        assert_eq!(report.anomaly_count(), 0, "{:?}", report.lines());
        assert!(report.complete(), "{:?}", report.unchecked);
        assert_eq!(report.reached_final, 2);
        assert_eq!(report.subscriptions, 3);
        assert_eq!(
            (
                report.writes_ok,
                report.writes_failed,
                report.writes_unknown
            ),
            (2, 1, 1)
        );
        let records = numbered(clean());
        let text = records_jsonl(&records);
        assert_eq!(parse_feed_records(&text).unwrap(), records);
        assert!(parse_feed_records("{\"consumer\":0,\"sub\":1,\"type\":\"nope\"}").is_err());
    }

    #[test]
    fn a_consumer_short_of_the_final_timestamp_leaves_the_check_incomplete() {
        let mut records = clean();
        records.retain(|r| !(r.consumer == 1 && r.entry == FeedEntry::Checkpoint { ts: 45 }));
        let report = run(records);
        assert_eq!(report.anomaly_count(), 0, "{:?}", report.lines());
        assert!(!report.complete());
        assert!(report.lines()[0].contains("never reached the final timestamp 40"));
    }

    #[test]
    fn a_lost_ok_write_is_flagged() {
        let mut records = clean();
        // The ungrouped consumer never gets c=2.
        records.retain(|r| *r != change(2, "c", 2, 30));
        let report = run(records);
        assert_eq!(
            kinds(&report),
            vec![FeedAnomaly::Lost],
            "{:?}",
            report.lines()
        );
        let lines = report.lines();
        let first = &lines[0];
        assert!(
            first.starts_with("lost: consumer 0 (ungrouped): [c] of transaction 2"),
            "{first}"
        );
    }

    #[test]
    fn half_of_an_unknown_transaction_is_flagged_as_lost() {
        let mut records = clean();
        // Before the final checkpoint, above the one before it: only c is missing.
        records.retain(|r| !matches!(&r.entry, FeedEntry::Change(c) if r.consumer == 0 && c.key == "c" && c.commit_ts == 35));
        let report = run(records);
        assert_eq!(
            kinds(&report),
            vec![FeedAnomaly::Lost],
            "{:?}",
            report.lines()
        );
        assert!(report.lines()[0].contains("[c] never were"));
    }

    #[test]
    fn a_duplicate_within_a_subscription_is_flagged() {
        let mut records = clean();
        records.insert(8, change(2, "b", 1, 20));
        let report = run(records);
        assert_eq!(
            kinds(&report),
            vec![FeedAnomaly::Duplicate],
            "{:?}",
            report.lines()
        );
    }

    #[test]
    fn a_change_below_a_delivered_checkpoint_is_flagged() {
        let mut records = clean();
        // After checkpoint 25 of subscription 2, a change at 22: b's newest is 20, so it is
        // in order, just too late.
        records.insert(9, change(2, "b", 1, 22));
        let report = run(records);
        assert!(
            report.counts.contains_key(&FeedAnomaly::BelowCheckpoint),
            "{:?}",
            report.lines()
        );
        assert!(report
            .lines()
            .iter()
            .any(|l| l.starts_with("below-checkpoint: consumer 0 (ungrouped) subscription 2")));
        // Also the same write at two commit timestamps.
        assert!(report.counts.contains_key(&FeedAnomaly::Inconsistent));
    }

    #[test]
    fn a_change_at_the_cursor_after_a_resume_is_flagged() {
        let mut records = clean();
        records.insert(6, change(2, "c", 2, 15));
        let report = run(records);
        assert!(
            report.counts.contains_key(&FeedAnomaly::BelowCursor),
            "{:?}",
            report.lines()
        );
    }

    #[test]
    fn a_regressing_checkpoint_is_flagged() {
        let mut records = clean();
        records.insert(9, checkpoint(0, 2, 24));
        let report = run(records);
        assert_eq!(
            kinds(&report),
            vec![FeedAnomaly::CheckpointRegressed],
            "{:?}",
            report.lines()
        );
        let mut records = clean();
        // A resumed subscription whose first checkpoint is its own cursor.
        records.insert(6, checkpoint(0, 2, 15));
        let report = run(records);
        assert_eq!(
            kinds(&report),
            vec![FeedAnomaly::CheckpointRegressed],
            "{:?}",
            report.lines()
        );
    }

    #[test]
    fn a_resume_from_the_wrong_cursor_is_flagged() {
        let mut records = clean();
        records[5] = subscribe(0, 2, 16);
        let report = run(records);
        assert!(
            report.counts.contains_key(&FeedAnomaly::Cursor),
            "{:?}",
            report.lines()
        );
    }

    #[test]
    fn a_failed_write_delivered_is_flagged() {
        let mut records = clean();
        records.insert(9, change(2, "a", 3, 27));
        let report = run(records);
        assert_eq!(
            kinds(&report),
            vec![FeedAnomaly::FailedWriteDelivered],
            "{:?}",
            report.lines()
        );
        assert!(report.lines()[0].contains("transaction 3 writing [a] (fail;"));
    }

    #[test]
    fn a_value_nobody_wrote_is_flagged() {
        let mut records = clean();
        records.insert(9, change(2, "a", 2, 27));
        records.insert(
            9,
            rec(
                0,
                2,
                FeedEntry::Change(FeedChange {
                    key: "b".into(),
                    value: None,
                    commit_ts: 27,
                }),
            ),
        );
        let report = run(records);
        assert_eq!(report.counts.get(&FeedAnomaly::Unwritten), Some(&2));
    }

    #[test]
    fn a_split_transaction_in_grouped_mode_is_flagged() {
        let mut records = clean();
        let split = records
            .iter()
            .position(|r| matches!(&r.entry, FeedEntry::Txn { commit_ts: 20, .. }))
            .unwrap();
        records[split] = rec(
            1,
            1,
            FeedEntry::Txn {
                commit_ts: 20,
                changes: vec![ch("a", 1, 20)],
            },
        );
        records.insert(
            split + 1,
            rec(
                1,
                1,
                FeedEntry::Txn {
                    commit_ts: 20,
                    changes: vec![ch("b", 1, 20)],
                },
            ),
        );
        let report = run(records);
        assert_eq!(
            report.counts.get(&FeedAnomaly::SplitTxn),
            Some(&2),
            "{:?}",
            report.lines()
        );
        assert_eq!(kinds(&report), vec![FeedAnomaly::SplitTxn]);
        assert!(report.lines()[0].contains("holds only [a] of transaction 1 writing [a b]"));
    }

    #[test]
    fn a_transaction_holding_another_commit_ts_is_flagged() {
        let mut records = clean();
        let at = records
            .iter()
            .position(|r| matches!(&r.entry, FeedEntry::Txn { commit_ts: 30, .. }))
            .unwrap();
        records[at] = rec(
            1,
            1,
            FeedEntry::Txn {
                commit_ts: 30,
                changes: vec![ch("c", 2, 31)],
            },
        );
        let report = run(records);
        assert_eq!(
            kinds(&report),
            vec![FeedAnomaly::TxnMismatch],
            "{:?}",
            report.lines()
        );
    }

    #[test]
    fn malformed_input_is_an_error_not_an_anomaly() {
        let records = numbered(vec![change(1, "a", 1, 20)]);
        assert!(check(&history(), &records).is_err());
        let twice = parse_str(
            Format::Jsonl,
            &[
                r#"{"process":0,"type":"invoke","f":"txn","value":[["w","a",1]]}"#,
                r#"{"process":0,"type":"ok","f":"txn","value":[["w","a",1]]}"#,
                r#"{"process":0,"type":"invoke","f":"txn","value":[["w","b",1]]}"#,
            ]
            .join("\n"),
        )
        .unwrap();
        assert!(check(&twice, &[]).is_err());
    }

    #[test]
    fn a_checkpoint_passed_without_a_change_another_subscription_delivered_is_a_gap() {
        let mut records = clean();
        // Subscription 2 of consumer 0 loses c at 30 but reaches checkpoint 41 anyway; the
        // grouped consumer delivered it.
        records.retain(|r| !matches!(&r.entry, FeedEntry::Change(c) if r.consumer == 0 && r.sub == 2 && c.key == "c" && c.commit_ts == 30));
        let report = run(records);
        assert!(
            report.counts.contains_key(&FeedAnomaly::Gap),
            "{:?}",
            report.lines()
        );
    }
}
