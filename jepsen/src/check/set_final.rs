//! Direct check of a grow-only set history with final reads, as Jepsen's set checker does:
//! every acknowledged add must be in the last successful read of the whole set, and nothing
//! may be in it that was never attempted or whose add definitely failed. Adds with an unknown
//! outcome may or may not be there. Reads of a window during the run are checked by
//! [`crate::check::scan::check_set_reads`].
//!
//! This is linear in the history, where the [`crate::model::SetModel`] search is not: a
//! tester run adds thousands of elements.

use std::collections::{BTreeMap, BTreeSet};

use crate::history::{Event, EventType, Function, Value};

/// Elements listed per category in a report; the counts are always complete.
pub const MAX_LISTED_ELEMENTS: usize = 32;

/// What the final read showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetReport {
    /// `None` when no read succeeded, so nothing can be said.
    pub final_read_size: Option<usize>,
    /// Adds acknowledged `ok`.
    pub acknowledged: usize,
    /// Adds that failed (definitely not applied).
    pub failed: usize,
    /// Adds with an unknown outcome (`info`, or never completed).
    pub indeterminate: usize,
    /// Acknowledged adds missing from the final read.
    pub lost: Vec<Value>,
    pub lost_count: usize,
    /// Elements in the final read that were never attempted, or whose add failed.
    pub unexpected: Vec<Value>,
    pub unexpected_count: usize,
    /// Indeterminate adds that did take effect.
    pub recovered_count: usize,
    /// Elements the final read returned more than once.
    pub duplicated_count: usize,
}

impl SetReport {
    /// `Some(true)` valid, `Some(false)` anomalies found, `None` no final read.
    pub fn valid(&self) -> Option<bool> {
        self.final_read_size?;
        Some(self.lost_count == 0 && self.unexpected_count == 0 && self.duplicated_count == 0)
    }

    /// The findings as lines of text.
    pub fn lines(&self) -> Vec<String> {
        let Some(size) = self.final_read_size else {
            return vec!["no final read succeeded; the history says nothing".into()];
        };
        let mut lines = vec![format!(
            "final read: {size} elements; adds: {} acknowledged, {} failed, {} indeterminate \
             ({} of those took effect)",
            self.acknowledged, self.failed, self.indeterminate, self.recovered_count
        )];
        if self.lost_count > 0 {
            lines.push(format!(
                "lost: {} acknowledged adds missing from the final read: {}",
                self.lost_count,
                listed(&self.lost, self.lost_count)
            ));
        }
        if self.unexpected_count > 0 {
            lines.push(format!(
                "unexpected: {} elements never added or whose add failed: {}",
                self.unexpected_count,
                listed(&self.unexpected, self.unexpected_count)
            ));
        }
        if self.duplicated_count > 0 {
            lines.push(format!(
                "duplicated: {} elements read more than once",
                self.duplicated_count
            ));
        }
        lines
    }
}

fn listed(shown: &[Value], total: usize) -> String {
    let mut text = shown
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    if total > shown.len() {
        text.push_str(&format!(" ... ({} more)", total - shown.len()));
    }
    text
}

/// Checks `:add` operations against the last successful `:read` (whose value lists the
/// elements). Pairs events by process, like [`crate::history::pair_operations`].
pub fn check_set_final(events: &[Event]) -> SetReport {
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum AddState {
        Pending,
        Acknowledged,
        Failed,
        Indeterminate,
    }
    let mut adds: BTreeMap<Value, AddState> = BTreeMap::new();
    let mut pending_add: BTreeMap<i64, Value> = BTreeMap::new();
    let mut final_read: Option<&Value> = None;
    // Reads of the whole set are invoked without bounds; reads of a window during the run
    // carry `[lo hi]` and are checked by `crate::check::scan::check_set_reads`.
    let mut whole_set_read: BTreeMap<i64, bool> = BTreeMap::new();
    for event in events {
        match (event.f, event.kind) {
            (Function::Add, EventType::Invoke) => {
                adds.insert(event.value.clone(), AddState::Pending);
                pending_add.insert(event.process, event.value.clone());
            }
            (Function::Add, kind) => {
                let element = pending_add
                    .remove(&event.process)
                    .unwrap_or_else(|| event.value.clone());
                let state = match kind {
                    EventType::Ok => AddState::Acknowledged,
                    EventType::Fail => AddState::Failed,
                    EventType::Info | EventType::Invoke => AddState::Indeterminate,
                };
                adds.insert(element, state);
            }
            (Function::Read, EventType::Invoke) => {
                whole_set_read.insert(event.process, event.value == Value::Nil);
            }
            (Function::Read, EventType::Ok)
                if whole_set_read.remove(&event.process).unwrap_or(true) =>
            {
                final_read = Some(&event.value);
            }
            _ => {}
        }
    }
    let count = |wanted: AddState| adds.values().filter(|s| **s == wanted).count();
    let mut report = SetReport {
        final_read_size: None,
        acknowledged: count(AddState::Acknowledged),
        failed: count(AddState::Failed),
        // Adds never completed are as uncertain as `info` ones.
        indeterminate: count(AddState::Indeterminate) + count(AddState::Pending),
        lost: Vec::new(),
        lost_count: 0,
        unexpected: Vec::new(),
        unexpected_count: 0,
        recovered_count: 0,
        duplicated_count: 0,
    };
    let Some(read) = final_read else {
        return report;
    };
    let items: Vec<Value> = match read {
        Value::List(items) => items.clone(),
        Value::Set(items) => items.iter().cloned().collect(),
        Value::Nil => Vec::new(),
        other => vec![other.clone()],
    };
    let seen: BTreeSet<Value> = items.iter().cloned().collect();
    report.final_read_size = Some(seen.len());
    report.duplicated_count = items.len() - seen.len();
    for (element, state) in &adds {
        let present = seen.contains(element);
        match (state, present) {
            (AddState::Acknowledged, false) => {
                report.lost_count += 1;
                if report.lost.len() < MAX_LISTED_ELEMENTS {
                    report.lost.push(element.clone());
                }
            }
            (AddState::Indeterminate | AddState::Pending, true) => report.recovered_count += 1,
            _ => {}
        }
    }
    for element in &seen {
        let allowed = matches!(
            adds.get(element),
            Some(AddState::Acknowledged | AddState::Indeterminate | AddState::Pending)
        );
        if !allowed {
            report.unexpected_count += 1;
            if report.unexpected.len() < MAX_LISTED_ELEMENTS {
                report.unexpected.push(element.clone());
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{parse_str, Format};

    fn op(process: u32, kind: &str, f: &str, value: &str) -> String {
        format!("{{\"process\":{process},\"type\":\"{kind}\",\"f\":\"{f}\",\"value\":{value}}}\n")
    }

    fn check(lines: &[String]) -> SetReport {
        let events = parse_str(Format::Jsonl, &lines.concat()).expect("valid JSONL");
        check_set_final(&events)
    }

    #[test]
    fn all_acknowledged_present_is_valid() {
        let report = check(&[
            op(0, "invoke", "add", "1"),
            op(0, "ok", "add", "1"),
            op(1, "invoke", "add", "2"),
            op(1, "info", "add", "2"),
            op(2, "invoke", "add", "3"),
            op(2, "fail", "add", "3"),
            op(3, "invoke", "read", "null"),
            op(3, "ok", "read", "[1, 2]"),
        ]);
        assert_eq!(report.valid(), Some(true), "{:?}", report.lines());
        assert_eq!(report.recovered_count, 1);
        assert_eq!(report.acknowledged, 1);
        assert_eq!(report.failed, 1);
    }

    #[test]
    fn lost_and_unexpected_are_reported() {
        let report = check(&[
            op(0, "invoke", "add", "1"),
            op(0, "ok", "add", "1"),
            op(2, "invoke", "add", "3"),
            op(2, "fail", "add", "3"),
            op(3, "invoke", "read", "null"),
            op(3, "ok", "read", "[3, 9]"),
        ]);
        assert_eq!(report.valid(), Some(false));
        assert_eq!(report.lost, vec![Value::Int(1)]);
        assert_eq!(report.unexpected, vec![Value::Int(3), Value::Int(9)]);
        assert!(report.lines().iter().any(|l| l.starts_with("lost: 1")));
    }

    #[test]
    fn without_a_read_nothing_is_known() {
        let report = check(&[
            op(0, "invoke", "add", "1"),
            op(0, "ok", "add", "1"),
            op(3, "invoke", "read", "null"),
            op(3, "fail", "read", "null"),
        ]);
        assert_eq!(report.valid(), None);
    }

    #[test]
    fn duplicates_are_anomalies() {
        let report = check(&[
            op(0, "invoke", "add", "1"),
            op(0, "ok", "add", "1"),
            op(3, "invoke", "read", "null"),
            op(3, "ok", "read", "[1, 1]"),
        ]);
        assert_eq!(report.valid(), Some(false));
        assert_eq!(report.duplicated_count, 1);
    }
}
