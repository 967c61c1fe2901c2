//! A key-value store of strings with put, get and append. A missing key
//! reads as the empty string (and so does a `nil` get result). Keys are
//! independent, so the history is partitioned by key and each key is a
//! string register checked on its own.

use super::{Model, ModelError};
use crate::history::{Function, Operation, Outcome, Value};

#[derive(Debug, Clone, Copy, Default)]
pub struct Kv;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KvOp {
    /// `None`: result unknown, any value is acceptable.
    Get(Option<String>),
    Put(String),
    Append(String),
}

fn string_value(op: &Operation, value: &Value, what: &str) -> Result<String, ModelError> {
    match value {
        Value::Str(s) => Ok(s.clone()),
        Value::Nil => Ok(String::new()),
        other => Err(ModelError::new(
            op,
            format!("{what} must be a string, found {other}"),
        )),
    }
}

impl Model for Kv {
    type Op = KvOp;
    type State = String;

    fn name(&self) -> &'static str {
        "kv"
    }

    fn init(&self) -> String {
        String::new()
    }

    fn prepare(&self, op: &Operation) -> Result<KvOp, ModelError> {
        if op.key.is_none() {
            return Err(ModelError::new(op, "kv operations need a :key"));
        }
        match op.f {
            Function::Get => Ok(KvOp::Get(match &op.outcome {
                Outcome::Ok(value) => Some(string_value(op, value, ":get result")?),
                Outcome::Indeterminate => None,
            })),
            Function::Put => Ok(KvOp::Put(string_value(op, &op.input, ":put value")?)),
            Function::Append => Ok(KvOp::Append(string_value(op, &op.input, ":append value")?)),
            _ => Err(ModelError::unsupported(
                self.name(),
                op,
                ":put, :get and :append",
            )),
        }
    }

    fn partition_key(&self, op: &Operation) -> Option<Value> {
        op.key.clone()
    }

    fn step(&self, state: &String, op: &KvOp) -> Option<String> {
        match op {
            KvOp::Get(Some(value)) => (value == state).then(|| state.clone()),
            KvOp::Get(None) => Some(state.clone()),
            KvOp::Put(value) => Some(value.clone()),
            KvOp::Append(suffix) => Some(format!("{state}{suffix}")),
        }
    }

    fn state_heap_bytes(&self, state: &String) -> usize {
        state.capacity()
    }

    fn describe_state(&self, state: &String) -> String {
        format!("{state:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{check_events, CheckOptions, Verdict};
    use crate::model::ModelKind;
    use crate::parse::{parse_str, Format};

    fn check(edn: &str) -> Verdict {
        let events = parse_str(Format::Edn, edn).expect("valid EDN");
        check_events(ModelKind::Kv, &events, &CheckOptions::default())
            .expect("checkable")
            .verdict
    }

    fn op(process: u32, kind: &str, f: &str, key: &str, value: &str) -> String {
        format!("{{:process {process}, :type :{kind}, :f :{f}, :key \"{key}\", :value {value}}}\n")
    }

    #[test]
    fn appends_and_gets_per_key() {
        let h = [
            op(0, "invoke", "append", "a", "\"x\""),
            op(0, "ok", "append", "a", "\"x\""),
            op(1, "invoke", "get", "b", "nil"),
            op(1, "ok", "get", "b", "\"\""),
            op(0, "invoke", "append", "a", "\"y\""),
            op(1, "invoke", "get", "a", "nil"),
            op(1, "ok", "get", "a", "\"xy\""),
            op(0, "ok", "append", "a", "\"y\""),
            op(0, "invoke", "put", "b", "\"z\""),
            op(0, "ok", "put", "b", "\"z\""),
            op(1, "invoke", "get", "b", "nil"),
            op(1, "ok", "get", "b", "\"z\""),
        ]
        .concat();
        assert_eq!(check(&h), Verdict::Ok);
    }

    #[test]
    fn lost_append_is_illegal_and_names_the_key() {
        let h = [
            op(0, "invoke", "append", "a", "\"x\""),
            op(0, "ok", "append", "a", "\"x\""),
            op(0, "invoke", "append", "a", "\"y\""),
            op(0, "ok", "append", "a", "\"y\""),
            op(1, "invoke", "get", "a", "nil"),
            op(1, "ok", "get", "a", "\"y\""),
            op(1, "invoke", "get", "b", "nil"),
            op(1, "ok", "get", "b", "nil"),
        ]
        .concat();
        let Verdict::Illegal(explanation) = check(&h) else {
            panic!("lost append accepted");
        };
        assert_eq!(explanation.partition, Some(Value::Str("a".into())));
        assert_eq!(explanation.state, "\"xy\"");
    }

    #[test]
    fn info_append_may_take_effect_late() {
        let h = [
            op(0, "invoke", "append", "a", "\"x\""),
            op(0, "info", "append", "a", "nil"),
            op(1, "invoke", "get", "a", "nil"),
            op(1, "ok", "get", "a", "\"\""),
            op(1, "invoke", "append", "a", "\"y\""),
            op(1, "ok", "append", "a", "\"y\""),
            op(1, "invoke", "get", "a", "nil"),
            op(1, "ok", "get", "a", "\"yx\""),
        ]
        .concat();
        assert_eq!(check(&h), Verdict::Ok);
    }

    #[test]
    fn requires_a_key() {
        let h =
            "{:process 0, :type :invoke, :f :get}\n{:process 0, :type :ok, :f :get, :value \"\"}\n";
        let events = parse_str(Format::Edn, h).expect("valid EDN");
        let err =
            check_events(ModelKind::Kv, &events, &CheckOptions::default()).expect_err("no key");
        assert!(err.to_string().contains(":key"), "{err}");
    }
}
