//! A grow-only set with `add` and a read of the whole set (`read`). A read
//! must return exactly the elements added before it in the linearization:
//! so a final read contains every acknowledged add, and nothing that was
//! never attempted; indeterminate adds may or may not be in it. Operations
//! carrying a `:key` are partitioned by it; without keys there is one set.

use std::collections::BTreeSet;

use super::{Model, ModelError};
use crate::history::{Function, Operation, Outcome, Value};

#[derive(Debug, Clone, Copy, Default)]
pub struct SetModel;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SetOp {
    Add(Value),
    /// `None`: result unknown, any value is acceptable.
    Read(Option<ReadResult>),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReadResult {
    Elements(BTreeSet<Value>),
    /// The read returned an element twice, which no set can do.
    Duplicates,
}

impl Model for SetModel {
    type Op = SetOp;
    type State = BTreeSet<Value>;

    fn name(&self) -> &'static str {
        "set"
    }

    fn init(&self) -> BTreeSet<Value> {
        BTreeSet::new()
    }

    fn prepare(&self, op: &Operation) -> Result<SetOp, ModelError> {
        match op.f {
            Function::Add => Ok(SetOp::Add(op.input.clone())),
            Function::Read => {
                let Outcome::Ok(value) = &op.outcome else {
                    return Ok(SetOp::Read(None));
                };
                let result = match value {
                    Value::Nil => ReadResult::Elements(BTreeSet::new()),
                    Value::Set(items) => ReadResult::Elements(items.clone()),
                    Value::List(items) => {
                        let unique: BTreeSet<Value> = items.iter().cloned().collect();
                        if unique.len() == items.len() {
                            ReadResult::Elements(unique)
                        } else {
                            ReadResult::Duplicates
                        }
                    }
                    other => {
                        return Err(ModelError::new(
                            op,
                            format!(":read result must be a collection, found {other}"),
                        ))
                    }
                };
                Ok(SetOp::Read(Some(result)))
            }
            _ => Err(ModelError::unsupported(self.name(), op, ":add and :read")),
        }
    }

    fn partition_key(&self, op: &Operation) -> Option<Value> {
        op.key.clone()
    }

    fn step(&self, state: &BTreeSet<Value>, op: &SetOp) -> Option<BTreeSet<Value>> {
        match op {
            SetOp::Add(element) => {
                let mut next = state.clone();
                next.insert(element.clone());
                Some(next)
            }
            SetOp::Read(None) => Some(state.clone()),
            SetOp::Read(Some(ReadResult::Elements(seen))) => (seen == state).then(|| state.clone()),
            SetOp::Read(Some(ReadResult::Duplicates)) => None,
        }
    }

    fn state_heap_bytes(&self, state: &BTreeSet<Value>) -> usize {
        // B-tree nodes hold up to 11 elements; count them as if full, plus
        // the heap data of string elements.
        let element_bytes: usize = state
            .iter()
            .map(|v| {
                std::mem::size_of::<Value>()
                    + match v {
                        Value::Str(s) | Value::Keyword(s) => s.capacity(),
                        _ => 0,
                    }
            })
            .sum();
        element_bytes + element_bytes / 4
    }

    fn describe_state(&self, state: &BTreeSet<Value>) -> String {
        Value::Set(state.clone()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use crate::check::{check_events, CheckOptions, Verdict};
    use crate::model::ModelKind;
    use crate::parse::{parse_str, Format};

    fn check(jsonl: &str) -> Verdict {
        let events = parse_str(Format::Jsonl, jsonl).expect("valid JSONL");
        check_events(ModelKind::Set, &events, &CheckOptions::default())
            .expect("checkable")
            .verdict
    }

    fn op(process: u32, kind: &str, f: &str, value: &str) -> String {
        format!("{{\"process\":{process},\"type\":\"{kind}\",\"f\":\"{f}\",\"value\":{value}}}\n")
    }

    #[test]
    fn final_read_with_all_acknowledged_adds_is_ok() {
        let h = [
            op(0, "invoke", "add", "1"),
            op(1, "invoke", "add", "2"),
            op(0, "ok", "add", "1"),
            op(2, "invoke", "add", "3"),
            op(2, "info", "add", "3"),
            op(1, "ok", "add", "2"),
            op(0, "invoke", "read", "null"),
            op(0, "ok", "read", "[2, 1]"),
        ]
        .concat();
        assert_eq!(check(&h), Verdict::Ok);
        // The indeterminate add of 3 may also have happened.
        let with_3 = h.replace("[2, 1]", "[1, 2, 3]");
        assert_eq!(check(&with_3), Verdict::Ok);
    }

    #[test]
    fn lost_acknowledged_add_is_illegal() {
        let h = [
            op(0, "invoke", "add", "1"),
            op(0, "ok", "add", "1"),
            op(0, "invoke", "add", "2"),
            op(0, "ok", "add", "2"),
            op(1, "invoke", "read", "null"),
            op(1, "ok", "read", "[2]"),
        ]
        .concat();
        assert!(matches!(check(&h), Verdict::Illegal(_)));
    }

    #[test]
    fn element_never_attempted_is_illegal() {
        let h = [
            op(0, "invoke", "add", "1"),
            op(0, "ok", "add", "1"),
            op(1, "invoke", "read", "null"),
            op(1, "ok", "read", "[1, 9]"),
        ]
        .concat();
        assert!(matches!(check(&h), Verdict::Illegal(_)));
    }

    #[test]
    fn failed_add_must_not_appear() {
        let h = [
            op(0, "invoke", "add", "1"),
            op(0, "fail", "add", "1"),
            op(1, "invoke", "read", "null"),
            op(1, "ok", "read", "[1]"),
        ]
        .concat();
        assert!(matches!(check(&h), Verdict::Illegal(_)));
    }

    #[test]
    fn duplicate_elements_are_illegal() {
        let h = [
            op(0, "invoke", "add", "1"),
            op(0, "ok", "add", "1"),
            op(1, "invoke", "read", "null"),
            op(1, "ok", "read", "[1, 1]"),
        ]
        .concat();
        assert!(matches!(check(&h), Verdict::Illegal(_)));
    }
}
