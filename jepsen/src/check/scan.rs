//! Range reads checked against what was acknowledged: the `scan` workload's full and partial
//! scans, and the `set` workload's reads during the run.
//!
//! A multi-range scan is not one atomic snapshot, but each key in it is read linearizably
//! (every range confirms its leadership and waits for its apply before serving), so each key
//! is checked on its own against the key's writes and deletes:
//!
//! - **missing**: the key is absent, yet a write of it definitely happened before the read
//!   began (acknowledged before the invocation, or seen by a read that completed before it)
//!   and no delete that was not refused could fall between that write and this read;
//! - **stale**: the read returned a value that a later mutation had definitely replaced before
//!   the read began;
//! - **phantom**: the read returned a value nobody wrote, one whose write was refused, or one
//!   whose write started only after the read ended;
//! - **misplaced**: a key outside the requested range, or the same key twice.
//!
//! A scan *as of a timestamp* (invoked with `[start end at]`, `at` 0 for a fresh timestamp
//! from the oracle, completing with `[ts [[key value] ...]]`) is checked the same way with
//! its snapshot taken when its timestamp was handed out: it "began" when the first read at
//! that timestamp began. Reads at one timestamp must also agree on every key they share:
//!
//! - **changed**: two reads at the same timestamp returned different values for a key (a
//!   commit landed at or below a timestamp already read).
//!
//! Values are unique per write, so a value names its write. Times are positions in the
//! history, which the tester records in real-time order. The check is linear in the number
//! of (read, key) pairs times the mutations of a key.

use std::collections::{BTreeMap, HashMap};

use crate::history::{Event, EventType, Function, Value};

/// Anomalies listed in a report; the counts are always complete.
pub const MAX_LISTED_ANOMALIES: usize = 10;

/// Position of an event that never happened (an operation that never completed).
const NEVER: usize = usize::MAX;

/// How a mutation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MutationOutcome {
    Ok,
    /// Refused: it did not take effect.
    Failed,
    /// `info`, or never completed: it may take effect at any time after its invocation.
    Unknown,
}

/// A write (`value` set) or delete (`value` `None`) of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mutation {
    pub key: i64,
    pub value: Option<i64>,
    pub invoke: usize,
    /// Position of the completion; [`usize::MAX`] when it never completed.
    pub complete: usize,
    pub outcome: MutationOutcome,
}

/// A successful read of the keys in `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeRead {
    pub start: i64,
    pub end: i64,
    pub invoke: usize,
    pub complete: usize,
    /// Keys and values in the order returned.
    pub returned: Vec<(i64, i64)>,
    /// 1-based history line of the completion, for reports.
    pub line: usize,
    /// The timestamp of a read as of a timestamp; `None` for a linearizable read.
    pub at_ts: Option<i64>,
}

/// What the range reads showed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeReadReport {
    pub reads: usize,
    /// (read, key) pairs checked.
    pub keys_checked: usize,
    pub mutations_ok: usize,
    pub mutations_failed: usize,
    pub mutations_unknown: usize,
    pub missing_count: usize,
    pub stale_count: usize,
    pub phantom_count: usize,
    pub misplaced_count: usize,
    /// Keys that two reads at one timestamp returned differently.
    pub changed_count: usize,
    /// Reads as of a timestamp among `reads`.
    pub snapshot_reads: usize,
    /// Absent keys that only a delete of unknown outcome excuses (it may take effect at any
    /// time after its invocation, so such a key is never reported missing again).
    pub excused_by_unknown_delete: usize,
    /// The first [`MAX_LISTED_ANOMALIES`] anomalies, described.
    pub anomalies: Vec<String>,
}

impl RangeReadReport {
    pub fn anomaly_count(&self) -> usize {
        self.missing_count
            + self.stale_count
            + self.phantom_count
            + self.misplaced_count
            + self.changed_count
    }

    /// The findings as lines of text.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "{} range reads ({} key reads) against {} acknowledged, {} refused and {} \
             indeterminate writes and deletes",
            self.reads,
            self.keys_checked,
            self.mutations_ok,
            self.mutations_failed,
            self.mutations_unknown
        )];
        if self.snapshot_reads > 0 {
            lines.push(format!(
                "{} of the range reads were as of a timestamp",
                self.snapshot_reads
            ));
        }
        if self.excused_by_unknown_delete > 0 {
            lines.push(format!(
                "{} absent keys excused only by a delete of unknown outcome",
                self.excused_by_unknown_delete
            ));
        }
        if self.anomaly_count() > 0 {
            lines.push(format!(
                "anomalies: {} missing, {} stale, {} phantom, {} misplaced, {} changed",
                self.missing_count,
                self.stale_count,
                self.phantom_count,
                self.misplaced_count,
                self.changed_count
            ));
            lines.extend(self.anomalies.iter().cloned());
        }
        lines
    }

    fn note(&mut self, text: String) {
        if self.anomalies.len() < MAX_LISTED_ANOMALIES {
            self.anomalies.push(text);
        }
    }
}

/// Checks every read against the mutations.
pub fn check_range_reads(mutations: &[Mutation], reads: &[RangeRead]) -> RangeReadReport {
    let mut report = RangeReadReport {
        reads: reads.len(),
        snapshot_reads: reads.iter().filter(|r| r.at_ts.is_some()).count(),
        ..RangeReadReport::default()
    };
    // A read as of a timestamp sees the state of when that timestamp was handed out: during
    // the first read at it.
    let mut taken_at: HashMap<i64, usize> = HashMap::new();
    for r in reads {
        if let Some(ts) = r.at_ts {
            let began = taken_at.entry(ts).or_insert(r.invoke);
            *began = (*began).min(r.invoke);
        }
    }
    let reads: Vec<RangeRead> = reads
        .iter()
        .map(|r| RangeRead {
            invoke: r
                .at_ts
                .and_then(|ts| taken_at.get(&ts).copied())
                .unwrap_or(r.invoke),
            ..r.clone()
        })
        .collect();
    let reads = &reads[..];
    check_repeated_snapshots(&mut report, reads);
    for m in mutations {
        match m.outcome {
            MutationOutcome::Ok => report.mutations_ok += 1,
            MutationOutcome::Failed => report.mutations_failed += 1,
            MutationOutcome::Unknown => report.mutations_unknown += 1,
        }
    }
    let mut by_key: BTreeMap<i64, Vec<&Mutation>> = BTreeMap::new();
    for m in mutations {
        by_key.entry(m.key).or_default().push(m);
    }
    // When each (key, value) was first seen by a read: the write was in place by then.
    let mut first_seen: HashMap<(i64, i64), usize> = HashMap::new();
    for r in reads {
        for &(k, v) in &r.returned {
            let seen = first_seen.entry((k, v)).or_insert(NEVER);
            *seen = (*seen).min(r.complete);
        }
    }
    for r in reads {
        let mut returned: BTreeMap<i64, i64> = BTreeMap::new();
        for &(k, v) in &r.returned {
            if k < r.start || k >= r.end {
                report.misplaced_count += 1;
                report.note(format!(
                    "misplaced: line {}: read of [{}, {}) returned key {k}",
                    r.line, r.start, r.end
                ));
            } else if returned.insert(k, v).is_some() {
                report.misplaced_count += 1;
                report.note(format!(
                    "misplaced: line {}: key {k} returned twice",
                    r.line
                ));
            }
        }
        if r.start >= r.end {
            continue;
        }
        for (&key, ms) in by_key.range(r.start..r.end) {
            report.keys_checked += 1;
            match returned.get(&key) {
                Some(&value) => check_present(&mut report, r, key, value, ms, &first_seen),
                None => check_absent(&mut report, r, key, ms, &first_seen),
            }
        }
        for (&key, &value) in &returned {
            if !by_key.contains_key(&key) {
                report.phantom_count += 1;
                report.note(format!(
                    "phantom: line {}: key {key} = {value}, a key nobody wrote",
                    r.line
                ));
            }
        }
    }
    report
}

/// Reads at one timestamp must agree on every key both cover.
fn check_repeated_snapshots(report: &mut RangeReadReport, reads: &[RangeRead]) {
    let mut by_ts: BTreeMap<i64, Vec<&RangeRead>> = BTreeMap::new();
    for r in reads {
        if let Some(ts) = r.at_ts {
            by_ts.entry(ts).or_default().push(r);
        }
    }
    for (ts, group) in by_ts {
        let first = group[0];
        let seen: BTreeMap<i64, i64> = first.returned.iter().copied().collect();
        for later in &group[1..] {
            let again: BTreeMap<i64, i64> = later.returned.iter().copied().collect();
            let (lo, hi) = (first.start.max(later.start), first.end.min(later.end));
            for key in lo..hi {
                let (a, b) = (seen.get(&key), again.get(&key));
                if a != b {
                    report.changed_count += 1;
                    report.note(format!(
                        "changed: lines {} and {}: key {key} read as {} then {} at timestamp {ts}",
                        first.line,
                        later.line,
                        a.map_or("absent".into(), |v| v.to_string()),
                        b.map_or("absent".into(), |v| v.to_string()),
                    ));
                }
            }
        }
    }
}

/// `key` read as `value` by `r`: the value's write must not have been refused, must have
/// started before the read ended, and must not have been replaced before the read began (by
/// a mutation acknowledged, or seen by another read, before it began, after the value's
/// write was itself in place): this also catches a later read going back to an older value.
fn check_present(
    report: &mut RangeReadReport,
    r: &RangeRead,
    key: i64,
    value: i64,
    ms: &[&Mutation],
    first_seen: &HashMap<(i64, i64), usize>,
) {
    let Some(write) = ms.iter().find(|m| m.value == Some(value)) else {
        report.phantom_count += 1;
        report.note(format!(
            "phantom: line {}: key {key} = {value}, a value never written to it",
            r.line
        ));
        return;
    };
    if write.outcome == MutationOutcome::Failed || write.invoke > r.complete {
        report.phantom_count += 1;
        report.note(format!(
            "phantom: line {}: key {key} = {value}, whose write {}",
            r.line,
            if write.outcome == MutationOutcome::Failed {
                "was refused"
            } else {
                "started after the read ended"
            }
        ));
        return;
    }
    // A mutation is in place by its acknowledgement, or by the end of the first read that saw
    // its value, whichever is earlier (values are unique, so a seen value names its write).
    let in_place_by = |m: &Mutation| -> usize {
        let acked = if m.outcome == MutationOutcome::Ok {
            m.complete
        } else {
            NEVER
        };
        let seen = m
            .value
            .and_then(|v| first_seen.get(&(key, v)).copied())
            .unwrap_or(NEVER);
        acked.min(seen)
    };
    let written_by = in_place_by(write);
    let replaced = ms.iter().find(|m| {
        !std::ptr::eq(**m, *write)
            && m.outcome != MutationOutcome::Failed
            && written_by != NEVER
            && written_by < m.invoke
            && in_place_by(m) < r.invoke
    });
    if let Some(m) = replaced {
        report.stale_count += 1;
        report.note(format!(
            "stale: line {}: key {key} = {value}, but {} had replaced it before the read began",
            r.line,
            describe(m)
        ));
    }
}

/// `key` absent from `r`: no write of it may have definitely preceded the read unless a delete
/// could fall between them.
fn check_absent(
    report: &mut RangeReadReport,
    r: &RangeRead,
    key: i64,
    ms: &[&Mutation],
    first_seen: &HashMap<(i64, i64), usize>,
) {
    for write in ms.iter().filter(|m| m.outcome != MutationOutcome::Failed) {
        let Some(value) = write.value else { continue };
        let acked_before = write.outcome == MutationOutcome::Ok && write.complete < r.invoke;
        let seen_before = first_seen
            .get(&(key, value))
            .is_some_and(|&seen| seen < r.invoke);
        if !(acked_before || seen_before) {
            continue;
        }
        // A delete may sit between the write and the read unless it was refused, began
        // after the read ended, or ended before the write began.
        let deletable = ms.iter().any(|d| {
            d.value.is_none()
                && d.outcome != MutationOutcome::Failed
                && d.invoke < r.complete
                && !(d.complete != NEVER && d.complete < write.invoke)
        });
        if deletable {
            let only_unknown_deletes = ms.iter().all(|d| {
                d.value.is_some()
                    || d.outcome != MutationOutcome::Ok
                    || d.invoke >= r.complete
                    || d.complete < write.invoke
            });
            if only_unknown_deletes {
                report.excused_by_unknown_delete += 1;
            }
        } else {
            report.missing_count += 1;
            report.note(format!(
                "missing: line {}: key {key} absent, but {} {} before the read began and no \
                 delete could follow it",
                r.line,
                describe(write),
                if acked_before {
                    "was acknowledged"
                } else {
                    "was seen by a read"
                }
            ));
            return;
        }
    }
}

fn describe(m: &Mutation) -> String {
    match m.value {
        Some(v) => format!("the write of {v}"),
        None => "a delete".to_string(),
    }
}

/// An invocation's position and event, with its completion's (`None`: never completed).
type Paired<'a> = (usize, &'a Event, Option<(usize, &'a Event)>);

/// Pairs invocations with completions by process.
fn pair(events: &[Event]) -> Vec<Paired<'_>> {
    let mut open: HashMap<i64, usize> = HashMap::new();
    let mut ops: Vec<Paired<'_>> = Vec::new();
    for (pos, e) in events.iter().enumerate() {
        if e.kind == EventType::Invoke {
            open.insert(e.process, ops.len());
            ops.push((pos, e, None));
        } else if let Some(i) = open.remove(&e.process) {
            ops[i].2 = Some((pos, e));
        }
    }
    ops
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

/// The `[start end]` or `[start end at]` of a scan's invocation.
fn scan_bounds(v: &Value) -> Option<(i64, i64, Option<i64>)> {
    match v {
        Value::List(b) if b.len() == 3 => Some((int(&b[0])?, int(&b[1])?, Some(int(&b[2])?))),
        _ => bounds(v).map(|(s, e)| (s, e, None)),
    }
}

/// The `[start end]` of a range read's invocation.
fn bounds(v: &Value) -> Option<(i64, i64)> {
    match v {
        Value::List(b) if b.len() == 2 => Some((int(&b[0])?, int(&b[1])?)),
        _ => None,
    }
}

fn outcome_of(completion: Option<(usize, &Event)>) -> (usize, MutationOutcome) {
    match completion {
        Some((pos, e)) if e.kind == EventType::Ok => (pos, MutationOutcome::Ok),
        Some((pos, e)) if e.kind == EventType::Fail => (pos, MutationOutcome::Failed),
        _ => (NEVER, MutationOutcome::Unknown),
    }
}

/// The `scan` workload's history: `write` of `:key` with an integer (`nil`: a delete), and
/// `read` invoked with `[start end]` returning `[[key value] ...]`.
pub fn check_scan_history(events: &[Event]) -> Result<RangeReadReport, String> {
    let mut mutations = Vec::new();
    let mut reads = Vec::new();
    for (invoke, e, completion) in pair(events) {
        match e.f {
            Function::Write => {
                let key = e
                    .key
                    .as_ref()
                    .and_then(int)
                    .ok_or_else(|| format!("line {}: a write needs an integer :key", e.line))?;
                let value = match &e.value {
                    Value::Nil => None,
                    v => Some(int(v).ok_or_else(|| {
                        format!("line {}: a write's value must be an integer or nil", e.line)
                    })?),
                };
                let (complete, outcome) = outcome_of(completion);
                mutations.push(Mutation {
                    key,
                    value,
                    invoke,
                    complete,
                    outcome,
                });
            }
            Function::Read => {
                let Some((complete, done)) = completion.filter(|(_, c)| c.kind == EventType::Ok)
                else {
                    continue;
                };
                let (start, end, at) = scan_bounds(&e.value).ok_or_else(|| {
                    format!(
                        "line {}: a scan is invoked with [start end] or [start end at]",
                        e.line
                    )
                })?;
                let (at_ts, pairs) = match (at, &done.value) {
                    (None, Value::List(pairs)) => (None, pairs),
                    (Some(at), Value::List(v)) if v.len() == 2 => {
                        let (Some(ts), Value::List(pairs)) = (int(&v[0]), &v[1]) else {
                            return Err(format!(
                                "line {}: a scan as of a timestamp returns [ts pairs]",
                                done.line
                            ));
                        };
                        if at != 0 && at != ts {
                            return Err(format!(
                                "line {}: a scan asked for timestamp {at} answered at {ts}",
                                done.line
                            ));
                        }
                        (Some(ts), pairs)
                    }
                    _ => {
                        return Err(format!(
                            "line {}: a scan returns a list of pairs ([ts pairs] as of a \
                             timestamp)",
                            done.line
                        ))
                    }
                };
                // A pair that is not two integers (a value nobody wrote, a foreign key) is
                // kept as a key or value no write has: a phantom or misplaced key.
                let returned = pairs
                    .iter()
                    .map(|p| bounds(p).unwrap_or((start.saturating_sub(1), i64::MIN)))
                    .collect();
                reads.push(RangeRead {
                    start,
                    end,
                    invoke,
                    complete,
                    returned,
                    line: done.line,
                    at_ts,
                });
            }
            other => return Err(format!("line {}: the scan history has no {other}", e.line)),
        }
    }
    Ok(check_range_reads(&mutations, &reads))
}

/// The `set` workload's reads during the run: `add` of an element (its own key and value),
/// and partial reads invoked with `[lo hi]` returning the elements in that window. Reads
/// invoked without bounds (the final read) are left to the final-read check.
pub fn check_set_reads(events: &[Event]) -> RangeReadReport {
    let mut mutations = Vec::new();
    let mut reads = Vec::new();
    for (invoke, e, completion) in pair(events) {
        match e.f {
            Function::Add => {
                let Some(element) = int(&e.value) else {
                    continue;
                };
                let (complete, outcome) = outcome_of(completion);
                mutations.push(Mutation {
                    key: element,
                    value: Some(element),
                    invoke,
                    complete,
                    outcome,
                });
            }
            Function::Read => {
                let (Some((start, end)), Some((complete, done))) = (
                    bounds(&e.value),
                    completion.filter(|(_, c)| c.kind == EventType::Ok),
                ) else {
                    continue;
                };
                let Value::List(items) = &done.value else {
                    continue;
                };
                reads.push(RangeRead {
                    start,
                    end,
                    invoke,
                    complete,
                    returned: items.iter().filter_map(int).map(|x| (x, x)).collect(),
                    line: done.line,
                    at_ts: None,
                });
            }
            _ => {}
        }
    }
    check_range_reads(&mutations, &reads)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(key: i64, value: Option<i64>, invoke: usize, complete: usize, ok: bool) -> Mutation {
        Mutation {
            key,
            value,
            invoke,
            complete,
            outcome: if ok {
                MutationOutcome::Ok
            } else if complete == NEVER {
                MutationOutcome::Unknown
            } else {
                MutationOutcome::Failed
            },
        }
    }

    fn read(start: i64, end: i64, invoke: usize, complete: usize, kv: &[(i64, i64)]) -> RangeRead {
        RangeRead {
            start,
            end,
            invoke,
            complete,
            returned: kv.to_vec(),
            line: complete + 1,
            at_ts: None,
        }
    }

    fn read_at(ts: i64, invoke: usize, complete: usize, kv: &[(i64, i64)]) -> RangeRead {
        RangeRead {
            at_ts: Some(ts),
            ..read(0, 5, invoke, complete, kv)
        }
    }

    #[test]
    fn a_read_as_of_a_timestamp_began_when_its_timestamp_was_handed_out() {
        // Key 1 = 10 acked at 1, overwritten with 20 (invoked 4, acked 5). A read at a
        // timestamp taken by a read invoked at 2 may return 10 even when repeated after 5.
        let ms = [m(1, Some(10), 0, 1, true), m(1, Some(20), 4, 5, true)];
        let reads = [read_at(7, 2, 3, &[(1, 10)]), read_at(7, 6, 7, &[(1, 10)])];
        let r = check_range_reads(&ms, &reads);
        assert_eq!(r.anomaly_count(), 0, "{r:?}");
        assert_eq!(r.snapshot_reads, 2);
        // The same second read as a linearizable read is stale.
        let r = check_range_reads(&ms, &[reads[0].clone(), read(0, 5, 6, 7, &[(1, 10)])]);
        assert_eq!(r.stale_count, 1, "{r:?}");
    }

    #[test]
    fn reads_at_one_timestamp_that_disagree_are_changed() {
        let ms = [m(1, Some(10), 0, 1, true), m(1, Some(20), 2, 5, true)];
        // The write of 20 overlaps the first read, so either value is fine for it alone;
        // the second read at the same timestamp must agree with the first.
        let reads = [read_at(7, 2, 3, &[(1, 10)]), read_at(7, 6, 7, &[(1, 20)])];
        let r = check_range_reads(&ms, &reads);
        assert_eq!(r.changed_count, 1, "{r:?}");
        let reads = [read_at(7, 2, 3, &[(1, 10)]), read_at(7, 6, 7, &[])];
        assert_eq!(check_range_reads(&ms, &reads).changed_count, 1);
    }

    #[test]
    fn an_acknowledged_key_missing_from_a_later_scan_is_missing() {
        let ms = [m(1, Some(10), 0, 1, true)];
        let r = check_range_reads(&ms, &[read(0, 5, 2, 3, &[])]);
        assert_eq!(r.missing_count, 1, "{r:?}");
        // A read that overlaps the write may miss it.
        let r = check_range_reads(&ms, &[read(0, 5, 0, 3, &[])]);
        assert_eq!(r.anomaly_count(), 0, "{r:?}");
        // A key outside the read's range is not expected in it.
        let r = check_range_reads(&ms, &[read(2, 5, 2, 3, &[])]);
        assert_eq!(r.anomaly_count(), 0, "{r:?}");
    }

    #[test]
    fn a_possible_delete_excuses_absence_and_a_definite_one_forbids_presence() {
        // Write acked, then an indeterminate delete: the key may be gone.
        let ms = [m(1, Some(10), 0, 1, true), m(1, None, 2, NEVER, false)];
        let r = check_range_reads(&ms, &[read(0, 5, 4, 5, &[])]);
        assert_eq!(r.anomaly_count(), 0, "{r:?}");
        // Write acked, delete acked, then a read still sees the value: stale.
        let ms = [m(1, Some(10), 0, 1, true), m(1, None, 2, 3, true)];
        let r = check_range_reads(&ms, &[read(0, 5, 4, 5, &[(1, 10)])]);
        assert_eq!(r.stale_count, 1, "{r:?}");
        // A delete that ended before the write began cannot explain absence.
        let ms = [m(1, None, 0, 1, true), m(1, Some(10), 2, 3, true)];
        let r = check_range_reads(&ms, &[read(0, 5, 4, 5, &[])]);
        assert_eq!(r.missing_count, 1, "{r:?}");
    }

    #[test]
    fn a_value_seen_then_gone_without_a_delete_is_missing() {
        // The write never completed, but one read saw it; a later read must see it too.
        let ms = [m(1, Some(10), 0, NEVER, false)];
        let reads = [read(0, 5, 1, 2, &[(1, 10)]), read(0, 5, 3, 4, &[])];
        let r = check_range_reads(&ms, &reads);
        assert_eq!(r.missing_count, 1, "{r:?}");
    }

    #[test]
    fn phantoms_and_misplaced_keys_are_found() {
        let ms = [m(1, Some(10), 0, 1, false), m(2, Some(20), 5, 6, true)];
        let reads = [read(
            0,
            5,
            2,
            3,
            &[(1, 10), (2, 20), (3, 30), (7, 1), (3, 30)],
        )];
        let r = check_range_reads(&ms, &reads);
        // 1=10 was refused; 2=20 was written after the read; 3 nobody wrote (twice).
        assert_eq!(r.phantom_count, 3, "{r:?}");
        assert_eq!(r.misplaced_count, 2, "{r:?}");
    }

    #[test]
    fn a_read_going_back_to_an_older_value_is_stale() {
        // 10 acked, then 11 written with an unknown outcome; one read sees 11, a later read 10.
        let ms = [m(1, Some(10), 0, 1, true), m(1, Some(11), 2, NEVER, false)];
        let reads = [read(0, 5, 3, 4, &[(1, 11)]), read(0, 5, 5, 6, &[(1, 10)])];
        let r = check_range_reads(&ms, &reads);
        assert_eq!(r.stale_count, 1, "{r:?}");
        // Overlapping reads may see them in either order.
        let reads = [read(0, 5, 3, 6, &[(1, 11)]), read(0, 5, 5, 7, &[(1, 10)])];
        assert_eq!(check_range_reads(&ms, &reads).anomaly_count(), 0);
    }

    #[test]
    fn absences_excused_only_by_an_unknown_delete_are_counted() {
        let ms = [m(1, Some(10), 0, 1, true), m(1, None, 2, NEVER, false)];
        let r = check_range_reads(&ms, &[read(0, 5, 4, 5, &[])]);
        assert_eq!((r.anomaly_count(), r.excused_by_unknown_delete), (0, 1));
    }

    #[test]
    fn overwritten_values_are_stale_only_when_the_overwrite_preceded_the_read() {
        let ms = [m(1, Some(10), 0, 1, true), m(1, Some(11), 2, 3, true)];
        assert_eq!(
            check_range_reads(&ms, &[read(0, 5, 4, 5, &[(1, 10)])]).stale_count,
            1
        );
        assert_eq!(
            check_range_reads(&ms, &[read(0, 5, 2, 5, &[(1, 10)])]).anomaly_count(),
            0
        );
    }
}
