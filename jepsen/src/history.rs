//! Operation histories: the events a Jepsen-style test records (invocations
//! and their completions), the values they carry, and the pairing of events
//! into operations with a call time and a return time.
//!
//! Time is the position of an event in the history, not a wall clock: a
//! history is already a total order of what the test observed, and using
//! positions keeps clock skew between client nodes out of the analysis.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

/// What an event says about an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// The client started the operation.
    Invoke,
    /// The operation definitely took effect, with the recorded result.
    Ok,
    /// The operation definitely did not take effect.
    Fail,
    /// The outcome is unknown (timeout, lost connection): the operation may
    /// take effect at any point after its invocation, or never.
    Info,
}

impl EventType {
    /// Parses Jepsen's names (`invoke`, `ok`, `fail`, `info`), without colon.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "invoke" => Some(Self::Invoke),
            "ok" => Some(Self::Ok),
            "fail" => Some(Self::Fail),
            "info" => Some(Self::Info),
            _ => None,
        }
    }
}

/// The operation a client performed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Function {
    Read,
    Write,
    Cas,
    Put,
    Get,
    Append,
    Add,
    /// A transaction: its value lists micro-operations (`[:append k v]`, `[:r k nil]`).
    Txn,
    /// A bank transfer, `[from to amount]`.
    Transfer,
}

impl Function {
    /// Parses Jepsen's `:f` names, without colon.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "read" => Some(Self::Read),
            "write" => Some(Self::Write),
            "cas" => Some(Self::Cas),
            "put" => Some(Self::Put),
            "get" => Some(Self::Get),
            "append" => Some(Self::Append),
            "add" => Some(Self::Add),
            "txn" => Some(Self::Txn),
            "transfer" => Some(Self::Transfer),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Cas => "cas",
            Self::Put => "put",
            Self::Get => "get",
            Self::Append => "append",
            Self::Add => "add",
            Self::Txn => "txn",
            Self::Transfer => "transfer",
        }
    }

    /// Reads change no state, so a read whose result is unknown or that
    /// failed constrains nothing and can be left out of the check.
    pub fn is_read(self) -> bool {
        matches!(self, Self::Read | Self::Get)
    }
}

impl fmt::Display for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, ":{}", self.name())
    }
}

/// A value carried by an operation: the EDN subset Jepsen histories use.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    Nil,
    Bool(bool),
    Int(i64),
    Str(String),
    Keyword(String),
    /// Vectors and lists alike: histories do not distinguish them.
    List(Vec<Value>),
    Set(BTreeSet<Value>),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Nil => write!(f, "nil"),
            Self::Bool(b) => write!(f, "{b}"),
            Self::Int(i) => write!(f, "{i}"),
            Self::Str(s) => write!(f, "{s:?}"),
            Self::Keyword(k) => write!(f, ":{k}"),
            Self::List(items) => {
                write!(f, "[")?;
                write_joined(f, items.iter())?;
                write!(f, "]")
            }
            Self::Set(items) => {
                write!(f, "#{{")?;
                write_joined(f, items.iter())?;
                write!(f, "}}")
            }
        }
    }
}

fn write_joined<'a>(
    f: &mut fmt::Formatter<'_>,
    items: impl Iterator<Item = &'a Value>,
) -> fmt::Result {
    for (i, item) in items.enumerate() {
        if i > 0 {
            write!(f, " ")?;
        }
        write!(f, "{item}")?;
    }
    Ok(())
}

/// One line of a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub process: i64,
    pub kind: EventType,
    pub f: Function,
    /// The key for keyed models; `None` when the history has no `:key`.
    pub key: Option<Value>,
    pub value: Value,
    /// Wall-clock time from the history, kept for reports only.
    pub time_ns: Option<u64>,
    /// 1-based line in the source file.
    pub line: usize,
}

/// The result of an operation as the checker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Took effect and returned this value.
    Ok(Value),
    /// May take effect at any point after invocation, or never; any result
    /// is acceptable.
    Indeterminate,
}

/// An invocation paired with its completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub process: i64,
    pub f: Function,
    pub key: Option<Value>,
    /// The value given at invocation (e.g. what to write, `[from to]` for cas).
    pub input: Value,
    pub outcome: Outcome,
    /// Position of the invocation in the history.
    pub call: usize,
    /// Position of the completion; `None` means +infinity (indeterminate).
    pub ret: Option<usize>,
    pub invoke_line: usize,
    pub complete_line: Option<usize>,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "process {} {}", self.process, self.f)?;
        if let Some(key) = &self.key {
            write!(f, " {key}")?;
        }
        if !self.f.is_read() {
            write!(f, " {}", self.input)?;
        }
        match (&self.outcome, self.f.is_read()) {
            (Outcome::Ok(value), true) => write!(f, " => {value}")?,
            (Outcome::Ok(_), false) => write!(f, " => ok")?,
            (Outcome::Indeterminate, _) => write!(f, " => indeterminate")?,
        }
        match self.complete_line {
            Some(done) => write!(f, " (lines {}-{done})", self.invoke_line),
            None => write!(f, " (line {}, never completed)", self.invoke_line),
        }
    }
}

/// Structural problems that make a history impossible to interpret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error("line {line}: process {process} completes an operation it never invoked")]
    CompletionWithoutInvoke { line: usize, process: i64 },
    #[error(
        "line {line}: process {process} invokes an operation while its operation \
         from line {pending_line} is still pending"
    )]
    InvokeWhilePending {
        line: usize,
        process: i64,
        pending_line: usize,
    },
    #[error(
        "line {line}: process {process} completes {completed} but invoked {invoked} \
         at line {invoke_line}"
    )]
    MismatchedCompletion {
        line: usize,
        process: i64,
        invoked: Function,
        completed: Function,
        invoke_line: usize,
    },
}

/// Pairs invocations with completions and drops what constrains nothing.
///
/// - `:ok` gives a definite operation returning at its completion.
/// - `:fail` means the operation did not happen: dropped.
/// - `:info`, or no completion at all, gives an indeterminate operation with
///   a return time of +infinity; indeterminate reads are dropped because a
///   read without a result cannot be wrong and changes no state.
pub fn pair_operations(events: &[Event]) -> Result<Vec<Operation>, HistoryError> {
    let mut pending: HashMap<i64, (usize, &Event)> = HashMap::new();
    let mut ops: Vec<Operation> = Vec::new();
    for (position, event) in events.iter().enumerate() {
        if event.kind == EventType::Invoke {
            if let Some((_, earlier)) = pending.get(&event.process) {
                return Err(HistoryError::InvokeWhilePending {
                    line: event.line,
                    process: event.process,
                    pending_line: earlier.line,
                });
            }
            pending.insert(event.process, (position, event));
            continue;
        }
        let Some((call, invoke)) = pending.remove(&event.process) else {
            return Err(HistoryError::CompletionWithoutInvoke {
                line: event.line,
                process: event.process,
            });
        };
        if invoke.f != event.f {
            return Err(HistoryError::MismatchedCompletion {
                line: event.line,
                process: event.process,
                invoked: invoke.f,
                completed: event.f,
                invoke_line: invoke.line,
            });
        }
        let key = invoke.key.clone().or_else(|| event.key.clone());
        match event.kind {
            EventType::Ok => ops.push(Operation {
                process: event.process,
                f: invoke.f,
                key,
                input: invoke.value.clone(),
                outcome: Outcome::Ok(event.value.clone()),
                call,
                ret: Some(position),
                invoke_line: invoke.line,
                complete_line: Some(event.line),
            }),
            EventType::Info if !invoke.f.is_read() => ops.push(indeterminate(call, invoke)),
            EventType::Info | EventType::Fail | EventType::Invoke => {}
        }
    }
    // Invocations still open when the history ends are indeterminate too.
    let mut open: Vec<(usize, &Event)> = pending
        .into_values()
        .filter(|(_, invoke)| !invoke.f.is_read())
        .collect();
    open.sort_by_key(|(call, _)| *call);
    ops.extend(
        open.into_iter()
            .map(|(call, invoke)| indeterminate(call, invoke)),
    );
    ops.sort_by_key(|op| op.call);
    Ok(ops)
}

fn indeterminate(call: usize, invoke: &Event) -> Operation {
    Operation {
        process: invoke.process,
        f: invoke.f,
        key: invoke.key.clone(),
        input: invoke.value.clone(),
        outcome: Outcome::Indeterminate,
        call,
        ret: None,
        invoke_line: invoke.line,
        complete_line: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(process: i64, kind: EventType, f: Function, value: Value, line: usize) -> Event {
        Event {
            process,
            kind,
            f,
            key: None,
            value,
            time_ns: None,
            line,
        }
    }

    #[test]
    fn pairs_and_drops() {
        use EventType::*;
        use Function::*;
        let events = vec![
            ev(0, Invoke, Write, Value::Int(1), 1),
            ev(1, Invoke, Read, Value::Nil, 2),
            ev(
                2,
                Invoke,
                Cas,
                Value::List(vec![Value::Int(1), Value::Int(2)]),
                3,
            ),
            ev(0, Ok, Write, Value::Int(1), 4),
            ev(1, Info, Read, Value::Nil, 5),
            ev(
                2,
                Fail,
                Cas,
                Value::List(vec![Value::Int(1), Value::Int(2)]),
                6,
            ),
            ev(3, Invoke, Write, Value::Int(5), 7),
            ev(3, Info, Write, Value::Keyword("timed-out".into()), 8),
            ev(4, Invoke, Write, Value::Int(6), 9),
        ];
        let ops = pair_operations(&events).expect("well-formed");
        assert_eq!(ops.len(), 3);
        assert_eq!(ops[0].ret, Some(3));
        assert_eq!(ops[1].outcome, Outcome::Indeterminate);
        assert_eq!(ops[1].input, Value::Int(5));
        assert_eq!(ops[1].ret, None);
        assert_eq!(ops[2].ret, None);
    }

    #[test]
    fn rejects_malformed() {
        use EventType::*;
        use Function::*;
        let orphan = vec![ev(0, Ok, Write, Value::Int(1), 7)];
        assert_eq!(
            pair_operations(&orphan),
            Err(HistoryError::CompletionWithoutInvoke {
                line: 7,
                process: 0
            })
        );
        let twice = vec![
            ev(0, Invoke, Write, Value::Int(1), 1),
            ev(0, Invoke, Write, Value::Int(2), 2),
        ];
        assert!(matches!(
            pair_operations(&twice),
            Err(HistoryError::InvokeWhilePending { line: 2, .. })
        ));
        let mismatch = vec![
            ev(0, Invoke, Write, Value::Int(1), 1),
            ev(0, Ok, Read, Value::Int(1), 2),
        ];
        assert!(matches!(
            pair_operations(&mismatch),
            Err(HistoryError::MismatchedCompletion { line: 2, .. })
        ));
    }
}
