//! Recording a run: client events (invoke, then ok/fail/info) and nemesis faults, with times
//! in nanoseconds since the start of the run, and writing them as the JSON-lines history the
//! checker reads (`crate::parse::jsonl`).

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{json, Value as Json};

use crate::history::{EventType, Function};

/// One client event.
#[derive(Debug, Clone)]
pub struct Record {
    pub process: i64,
    pub kind: EventType,
    pub f: Function,
    pub key: Option<i64>,
    pub value: Json,
    pub time_ns: u64,
    /// Why the operation failed or is indeterminate, for people reading the history.
    pub error: Option<String>,
    /// Timeline row in the report: the worker that ran it (final reads get their own row).
    pub lane: usize,
}

/// One fault the nemesis injected, and when it was healed.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    /// Fault name, e.g. `kill-leader`.
    pub kind: String,
    /// Node names the fault hit, e.g. `n2`.
    pub targets: Vec<String>,
    /// Human-readable detail (the links cut, the clock offset).
    pub detail: String,
    pub start_ns: u64,
    /// `None` while active.
    pub end_ns: Option<u64>,
}

/// Collects events from every worker and the nemesis.
pub struct Recorder {
    started: Instant,
    events: Mutex<Vec<Record>>,
    faults: Mutex<Vec<FaultRecord>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// A recorder whose time zero is now.
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            events: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
        }
    }

    /// Nanoseconds since the recorder was created.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Appends an event stamped now. Events are appended under one lock, so their order in
    /// the history is the order in which they happened.
    pub fn record(&self, mut record: Record) {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        record.time_ns = self.now_ns();
        events.push(record);
    }

    /// Notes a fault that starts now; returns its index for [`Recorder::fault_healed`].
    pub fn fault_started(&self, kind: &str, targets: Vec<String>, detail: String) -> usize {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        faults.push(FaultRecord {
            kind: kind.to_string(),
            targets,
            detail,
            start_ns: self.now_ns(),
            end_ns: None,
        });
        faults.len() - 1
    }

    /// Notes that fault `index` was healed now.
    pub fn fault_healed(&self, index: usize) {
        let now = self.now_ns();
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fault) = faults.get_mut(index) {
            fault.end_ns.get_or_insert(now);
        }
    }

    /// Notes that fault `index`, an action whose effect was known only at its end (a churn
    /// action), ended now, and what it did.
    pub fn fault_done(&self, index: usize, targets: Vec<String>, detail: String) {
        self.fault_healed(index);
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fault) = faults.get_mut(index) {
            fault.targets = targets;
            fault.detail = detail;
        }
    }

    /// A copy of the client events so far.
    pub fn events(&self) -> Vec<Record> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A copy of the faults so far.
    pub fn faults(&self) -> Vec<FaultRecord> {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn type_name(kind: EventType) -> &'static str {
    match kind {
        EventType::Invoke => "invoke",
        EventType::Ok => "ok",
        EventType::Fail => "fail",
        EventType::Info => "info",
    }
}

/// One history line for a client event.
pub fn record_json(record: &Record) -> Json {
    let mut line = json!({
        "process": record.process,
        "type": type_name(record.kind),
        "f": record.f.name(),
        "value": record.value,
        "time": record.time_ns,
    });
    if let Some(map) = line.as_object_mut() {
        if let Some(key) = record.key {
            map.insert("key".into(), json!(key));
        }
        if let Some(error) = &record.error {
            map.insert("error".into(), json!(error));
        }
    }
    line
}

/// The history as JSON lines: client events, plus nemesis start/stop lines (process
/// `"nemesis"`, which the checker skips) merged in time order.
pub fn history_jsonl(events: &[Record], faults: &[FaultRecord]) -> String {
    let mut nemesis: Vec<(u64, Json)> = Vec::new();
    for fault in faults {
        let value = format!(
            "{} {} {}",
            fault.kind,
            fault.targets.join(","),
            fault.detail
        );
        nemesis.push((
            fault.start_ns,
            json!({"process": "nemesis", "type": "info", "f": "start",
                   "value": value.trim_end(), "time": fault.start_ns}),
        ));
        if let Some(end) = fault.end_ns {
            nemesis.push((
                end,
                json!({"process": "nemesis", "type": "info", "f": "stop",
                       "value": fault.kind, "time": end}),
            ));
        }
    }
    nemesis.sort_by_key(|(time, _)| *time);
    let mut out = String::new();
    let mut pending = nemesis.into_iter().peekable();
    for record in events {
        while let Some((_, line)) = pending.next_if(|(time, _)| *time <= record.time_ns) {
            out.push_str(&line.to_string());
            out.push('\n');
        }
        out.push_str(&record_json(record).to_string());
        out.push('\n');
    }
    for (_, line) in pending {
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

/// Writes `text` to `path`.
pub fn write_file(path: &Path, text: &str) -> io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// An invocation with its completion, for counting and plotting.
#[derive(Debug, Clone)]
pub struct OpSpan {
    pub process: i64,
    pub f: Function,
    pub lane: usize,
    pub invoke_ns: u64,
    /// `None` when the run ended before the operation completed.
    pub complete_ns: Option<u64>,
    /// `Ok`, `Fail` or `Info` (also for never-completed operations).
    pub outcome: EventType,
}

impl OpSpan {
    /// Latency in milliseconds, when the operation completed.
    pub fn latency_ms(&self) -> Option<f64> {
        self.complete_ns
            .map(|done| done.saturating_sub(self.invoke_ns) as f64 / 1e6)
    }
}

/// Pairs each invocation with the next completion of the same process.
pub fn op_spans(events: &[Record]) -> Vec<OpSpan> {
    let mut open: HashMap<i64, usize> = HashMap::new();
    let mut spans: Vec<OpSpan> = Vec::new();
    for record in events {
        if record.kind == EventType::Invoke {
            open.insert(record.process, spans.len());
            spans.push(OpSpan {
                process: record.process,
                f: record.f,
                lane: record.lane,
                invoke_ns: record.time_ns,
                complete_ns: None,
                outcome: EventType::Info,
            });
        } else if let Some(index) = open.remove(&record.process) {
            if let Some(span) = spans.get_mut(index) {
                span.complete_ns = Some(record.time_ns);
                span.outcome = record.kind;
            }
        }
    }
    spans
}

/// Operation counts by outcome and by function.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpCounts {
    pub invoked: usize,
    pub ok: usize,
    pub fail: usize,
    /// `info`, plus operations still open when the run ended.
    pub info: usize,
    /// `(function, outcome) -> count`, outcome named as in the history.
    pub by_function: std::collections::BTreeMap<(String, String), usize>,
}

/// Counts operations.
pub fn count_ops(spans: &[OpSpan]) -> OpCounts {
    let mut counts = OpCounts {
        invoked: spans.len(),
        ..OpCounts::default()
    };
    for span in spans {
        match span.outcome {
            EventType::Ok => counts.ok += 1,
            EventType::Fail => counts.fail += 1,
            EventType::Info | EventType::Invoke => counts.info += 1,
        }
        *counts
            .by_function
            .entry((
                span.f.name().to_string(),
                type_name(span.outcome).to_string(),
            ))
            .or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{parse_str, Format};

    fn rec(process: i64, kind: EventType, f: Function, key: Option<i64>, value: Json) -> Record {
        Record {
            process,
            kind,
            f,
            key,
            value,
            time_ns: 0,
            error: None,
            lane: process as usize,
        }
    }

    #[test]
    fn history_parses_with_the_checker_jsonl_parser() {
        let recorder = Recorder::new();
        recorder.record(rec(
            0,
            EventType::Invoke,
            Function::Cas,
            Some(3),
            json!([null, 5]),
        ));
        let fault = recorder.fault_started("kill-leader", vec!["n1".into()], String::new());
        recorder.record(rec(
            0,
            EventType::Ok,
            Function::Cas,
            Some(3),
            json!([null, 5]),
        ));
        recorder.fault_healed(fault);
        recorder.record(rec(
            1,
            EventType::Invoke,
            Function::Read,
            Some(3),
            Json::Null,
        ));
        let mut failed = rec(1, EventType::Fail, Function::Read, Some(3), Json::Null);
        failed.error = Some("unavailable".into());
        recorder.record(failed);
        let text = history_jsonl(&recorder.events(), &recorder.faults());
        assert_eq!(text.lines().count(), 6, "{text}");
        assert!(text.contains("\"process\":\"nemesis\""));
        let events = parse_str(Format::Jsonl, &text).expect("parses");
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].key, Some(crate::history::Value::Int(3)));
        assert!(events[3].time_ns >= events[0].time_ns);
        let spans = op_spans(&recorder.events());
        let counts = count_ops(&spans);
        assert_eq!(
            (counts.invoked, counts.ok, counts.fail, counts.info),
            (2, 1, 1, 0)
        );
    }
}
