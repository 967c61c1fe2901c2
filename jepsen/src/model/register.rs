//! A single compare-and-set register, initially nil, with read, write and
//! cas. A cas that completed `:ok` was applied, so the register must have
//! held `from`; an indeterminate cas applies if the register holds `from`
//! and otherwise leaves it alone, as a failed compare would. Operations with
//! different `:key`s are different registers, checked independently.

use super::{Model, ModelError};
use crate::history::{Function, Operation, Outcome, Value};

#[derive(Debug, Clone, Copy, Default)]
pub struct CasRegister;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RegisterOp {
    /// `None`: result unknown, any value is acceptable.
    Read(Option<Value>),
    Write(Value),
    Cas {
        from: Value,
        to: Value,
        definite: bool,
    },
}

impl Model for CasRegister {
    type Op = RegisterOp;
    type State = Value;

    fn name(&self) -> &'static str {
        "cas-register"
    }

    fn init(&self) -> Value {
        Value::Nil
    }

    fn prepare(&self, op: &Operation) -> Result<RegisterOp, ModelError> {
        match op.f {
            Function::Read => Ok(RegisterOp::Read(match &op.outcome {
                Outcome::Ok(value) => Some(value.clone()),
                Outcome::Indeterminate => None,
            })),
            Function::Write => Ok(RegisterOp::Write(op.input.clone())),
            Function::Cas => match &op.input {
                Value::List(pair) if pair.len() == 2 => Ok(RegisterOp::Cas {
                    from: pair[0].clone(),
                    to: pair[1].clone(),
                    definite: matches!(op.outcome, Outcome::Ok(_)),
                }),
                other => Err(ModelError::new(
                    op,
                    format!(":cas value must be [from to], found {other}"),
                )),
            },
            _ => Err(ModelError::unsupported(
                self.name(),
                op,
                ":read, :write and :cas",
            )),
        }
    }

    /// Operations carrying a `:key` are independent registers, one per key (Jepsen's
    /// "independent" register tests); without keys there is one register.
    fn partition_key(&self, op: &Operation) -> Option<Value> {
        op.key.clone()
    }

    fn step(&self, state: &Value, op: &RegisterOp) -> Option<Value> {
        match op {
            RegisterOp::Read(Some(value)) => (value == state).then(|| state.clone()),
            RegisterOp::Read(None) => Some(state.clone()),
            RegisterOp::Write(value) => Some(value.clone()),
            RegisterOp::Cas { from, to, .. } if from == state => Some(to.clone()),
            RegisterOp::Cas { definite: true, .. } => None,
            RegisterOp::Cas {
                definite: false, ..
            } => Some(state.clone()),
        }
    }

    fn describe_state(&self, state: &Value) -> String {
        state.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{check_events, CheckOptions, Verdict};
    use crate::history::Event;
    use crate::model::ModelKind;
    use crate::parse::{parse_str, Format};

    fn check(log: &str) -> Verdict {
        let events: Vec<Event> = parse_str(Format::JepsenLog, log).expect("valid log");
        check_events(ModelKind::CasRegister, &events, &CheckOptions::default())
            .expect("checkable")
            .verdict
    }

    fn log(lines: &[&str]) -> String {
        lines
            .iter()
            .map(|l| format!("INFO  jepsen.util - {l}\n"))
            .collect()
    }

    #[test]
    fn steps() {
        let m = CasRegister;
        let cas = |from, to, definite| RegisterOp::Cas {
            from: Value::Int(from),
            to: Value::Int(to),
            definite,
        };
        assert_eq!(
            m.step(&Value::Int(1), &cas(1, 2, true)),
            Some(Value::Int(2))
        );
        assert_eq!(m.step(&Value::Int(3), &cas(1, 2, true)), None);
        assert_eq!(
            m.step(&Value::Int(3), &cas(1, 2, false)),
            Some(Value::Int(3))
        );
        assert_eq!(
            m.step(&Value::Nil, &RegisterOp::Read(Some(Value::Nil))),
            Some(Value::Nil)
        );
        assert_eq!(
            m.step(&Value::Nil, &RegisterOp::Read(Some(Value::Int(1)))),
            None
        );
    }

    #[test]
    fn sequential_history_is_ok() {
        let h = log(&[
            "0 :invoke :read nil",
            "0 :ok :read nil",
            "0 :invoke :write 1",
            "0 :ok :write 1",
            "1 :invoke :cas [1 2]",
            "1 :ok :cas [1 2]",
            "0 :invoke :read nil",
            "0 :ok :read 2",
        ]);
        assert_eq!(check(&h), Verdict::Ok);
    }

    #[test]
    fn stale_read_after_completed_write_is_illegal() {
        let h = log(&[
            "0 :invoke :write 1",
            "0 :ok :write 1",
            "0 :invoke :write 2",
            "0 :ok :write 2",
            "1 :invoke :read nil",
            "1 :ok :read 1",
        ]);
        let Verdict::Illegal(explanation) = check(&h) else {
            panic!("stale read accepted");
        };
        assert_eq!(explanation.linearized, 2);
        assert_eq!(explanation.state, "2");
        assert_eq!(explanation.blocked.len(), 1);
        assert_eq!(explanation.blocked[0].op.invoke_line, 5);
        assert!(explanation.blocked[0].rejected);
    }

    #[test]
    fn concurrent_read_may_see_either_value() {
        let h = log(&[
            "0 :invoke :write 1",
            "0 :ok :write 1",
            "0 :invoke :write 2",
            "1 :invoke :read nil",
            "1 :ok :read 1",
            "0 :ok :write 2",
        ]);
        assert_eq!(check(&h), Verdict::Ok);
    }

    #[test]
    fn info_write_may_take_effect_late() {
        // The write of 3 times out, then reads see 1 and, much later, 3.
        let h = log(&[
            "0 :invoke :write 1",
            "0 :ok :write 1",
            "1 :invoke :write 3",
            "1 :info :write :timed-out",
            "2 :invoke :read nil",
            "2 :ok :read 1",
            "2 :invoke :read nil",
            "2 :ok :read 3",
        ]);
        assert_eq!(check(&h), Verdict::Ok);
        // A value nobody wrote is still illegal.
        let h = log(&[
            "1 :invoke :write 3",
            "1 :info :write :timed-out",
            "2 :invoke :read nil",
            "2 :ok :read 4",
        ]);
        assert!(matches!(check(&h), Verdict::Illegal(_)));
    }

    #[test]
    fn info_write_may_never_take_effect() {
        let h = log(&[
            "1 :invoke :write 3",
            "1 :info :write :timed-out",
            "2 :invoke :read nil",
            "2 :ok :read nil",
        ]);
        assert_eq!(check(&h), Verdict::Ok);
    }

    #[test]
    fn info_write_cannot_take_effect_before_invocation() {
        let h = log(&[
            "2 :invoke :read nil",
            "2 :ok :read 3",
            "1 :invoke :write 3",
            "1 :info :write :timed-out",
        ]);
        assert!(matches!(check(&h), Verdict::Illegal(_)));
    }

    #[test]
    fn failed_ops_are_dropped() {
        let h = log(&[
            "0 :invoke :write 1",
            "0 :ok :write 1",
            "1 :invoke :cas [1 5]",
            "1 :fail :cas [1 5]",
            "2 :invoke :read nil",
            "2 :fail :read :timed-out",
            "2 :invoke :read nil",
            "2 :ok :read 1",
        ]);
        assert_eq!(check(&h), Verdict::Ok);
    }

    #[test]
    fn cas_must_match() {
        let h = log(&[
            "0 :invoke :write 1",
            "0 :ok :write 1",
            "1 :invoke :cas [2 5]",
            "1 :ok :cas [2 5]",
        ]);
        assert!(matches!(check(&h), Verdict::Illegal(_)));
    }

    #[test]
    fn keys_are_independent_registers() {
        let op = |p: u32, kind: &str, f: &str, key: u32, value: &str| {
            format!("{{\"process\":{p},\"type\":\"{kind}\",\"f\":\"{f}\",\"key\":{key},\"value\":{value}}}\n")
        };
        let h = [
            op(0, "invoke", "write", 1, "1"),
            op(0, "ok", "write", 1, "1"),
            op(1, "invoke", "read", 2, "null"),
            op(1, "ok", "read", 2, "null"),
            op(1, "invoke", "read", 1, "null"),
            op(1, "ok", "read", 1, "1"),
        ]
        .concat();
        let events = parse_str(Format::Jsonl, &h).expect("valid JSONL");
        let report = check_events(ModelKind::CasRegister, &events, &CheckOptions::default())
            .expect("checkable");
        assert_eq!(report.verdict, Verdict::Ok);
        assert_eq!(report.partitions, 2);
        // A stale read on one key is found even though the other key is fine.
        let stale = h.replace(
            &op(1, "ok", "read", 1, "1"),
            &op(1, "ok", "read", 1, "null"),
        );
        let events = parse_str(Format::Jsonl, &stale).expect("valid JSONL");
        let verdict = check_events(ModelKind::CasRegister, &events, &CheckOptions::default())
            .expect("checkable")
            .verdict;
        assert!(matches!(verdict, Verdict::Illegal(_)), "{verdict:?}");
    }

    #[test]
    fn rejects_unsupported_function() {
        let h = log(&["0 :invoke :append 1", "0 :ok :append 1"]);
        let events = parse_str(Format::JepsenLog, &h).expect("valid log");
        let err = check_events(ModelKind::CasRegister, &events, &CheckOptions::default())
            .expect_err("append is not a register op");
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
